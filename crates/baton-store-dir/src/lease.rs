//! Lease-file mode, `dir:PATH?mode=lease`: for shared filesystems (NFS, Lustre) where
//! kernel locks are not trusted. No decision uses a kernel lock, a file's mtime or a PID
//! alone.
//!
//! Layout in a key's directory:
//!
//! ```text
//! limit            the key's limit, created once (temp file + link)
//! token.T          the last token handed out is the highest T
//! slot.N.G         generation G of slot N: JSON {state, token, holder, ttl, heartbeat}
//! ```
//!
//! Guarantees, and why they hold:
//! - **One winner per generation.** A slot's current lease is its highest generation. A
//!   slot is taken by creating `slot.N.(G+1)` with `link(2)`, which fails if the name
//!   exists, so of all contenders that saw generation G free or stale exactly one creates
//!   G+1. A contender that was paused between judging and creating, and creates a name
//!   that an earlier winner already cleaned up, finds a higher generation when it checks
//!   after creating, and withdraws. The highest generation file is never deleted, which
//!   is what makes that check sound.
//! - **Stale only after a TTL of silence, on the reader's clock.** The holder rewrites its
//!   file with a higher heartbeat count. A reader judges a lease stale only after it has
//!   seen the same generation and heartbeat for the lease's whole TTL on its own monotonic
//!   clock, so no clock is compared across hosts and mtimes are never read. A holder on
//!   this host whose process is gone (same boot id, PID no longer running with the same
//!   start time) is reclaimed at once.
//! - **Tokens** come from the same construction: `token.(T+1)` is created with `link(2)`,
//!   checked to be the highest, and the lower ones removed.
//! - **Loss before re-grant.** A renewal checks before and after rewriting that no higher
//!   generation exists; with the keeper's deadline (send time + TTL·(1−drift) − margin) a
//!   holder stops before any reader can have seen a TTL of silence.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use baton_core::{
    unix_ms, AcquireRequest, Capabilities, Error, ErrorKind, Holder, HolderId, Key, KeyStatus,
    Lease, Liveness, Op, Released, SlotState, SlotStatus, Store, StoreUrl, Token, Wait,
};
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::fs;
use crate::root::{lock, Root};

/// The TTL of a lease whose request names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How often a waiting acquirer looks again, at most (it starts faster and backs off).
const MAX_POLL: Duration = Duration::from_millis(200);
const MIN_POLL: Duration = Duration::from_millis(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum State {
    Held,
    Released,
    Broken,
}

/// The contents of `slot.N.G`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LeaseRecord {
    state: State,
    slot: u32,
    gen: u64,
    token: Token,
    ttl_ms: u64,
    heartbeat: u64,
    acquired_unix_ms: u64,
    renewed_unix_ms: u64,
    holder: Holder,
}

/// The directory store in lease-file mode. See the module docs.
#[derive(Debug)]
pub struct LeaseStore {
    root: Root,
    held: Mutex<HashMap<(Key, u32, u64), Held>>,
    reclaim_pause: Mutex<Option<Duration>>,
    reclaim_pauses: std::sync::atomic::AtomicU32,
}

#[derive(Debug)]
struct Held {
    gen: u64,
    holder: HolderId,
}

/// What a waiting acquirer has seen of a slot, and since when (monotonic).
struct Seen {
    gen: u64,
    heartbeat: u64,
    since: Instant,
}

/// The lease and token files of a key directory.
#[derive(Default)]
struct Listing {
    tokens: Vec<u64>,
    gens: BTreeMap<u32, Vec<u64>>,
}

impl Listing {
    fn read(dir: BorrowedFd<'_>) -> io::Result<Listing> {
        let mut out = Listing::default();
        for (name, is_file) in fs::names(dir)? {
            let mut parts = name.split('.');
            let parsed = match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("token"), Some(t), None, None) => {
                    t.parse().map(|t| out.tokens.push(t)).is_ok()
                }
                (Some("slot"), Some(n), Some(g), None) => match (n.parse(), g.parse()) {
                    (Ok(n), Ok(g)) => {
                        out.gens.entry(n).or_default().push(g);
                        true
                    }
                    _ => false,
                },
                _ => false,
            };
            if parsed && !is_file {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("'{name}' is not a regular file (a symlink?); refusing to use it"),
                ));
            }
        }
        out.tokens.sort_unstable();
        for gens in out.gens.values_mut() {
            gens.sort_unstable();
        }
        Ok(out)
    }

    /// The current generation of a slot (0: never taken).
    fn current(&self, slot: u32) -> u64 {
        self.gens
            .get(&slot)
            .and_then(|g| g.last().copied())
            .unwrap_or(0)
    }

    fn last_token(&self) -> u64 {
        self.tokens.last().copied().unwrap_or(0)
    }
}

fn slot_file(slot: u32, gen: u64) -> String {
    format!("slot.{slot}.{gen}")
}

fn token_file(token: u64) -> String {
    format!("token.{token}")
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

impl LeaseStore {
    /// Opens the store a `dir:PATH?mode=lease` URL names.
    pub fn open(url: &StoreUrl) -> Result<LeaseStore, Error> {
        let root = Root::open_in(
            url,
            Mode::Lease,
            "not a lease-mode URL (add ?mode=lease), or open it with baton_store_dir::open",
        )?;
        Ok(LeaseStore {
            root,
            held: Mutex::new(HashMap::new()),
            reclaim_pause: Mutex::new(None),
            reclaim_pauses: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// For tests: pause this long between judging a held lease stale and reclaiming it,
    /// to show that a paused reclaimer cannot steal the slot from a later winner.
    #[doc(hidden)]
    pub fn set_reclaim_pause(&self, pause: Option<Duration>) {
        *lock(&self.reclaim_pause) = pause;
    }

    /// For tests: how many times this store paused before a reclaim.
    #[doc(hidden)]
    pub fn reclaim_pauses(&self) -> u32 {
        self.reclaim_pauses
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn read_record(
        &self,
        dir: BorrowedFd<'_>,
        slot: u32,
        gen: u64,
    ) -> io::Result<Option<LeaseRecord>> {
        let name = slot_file(slot, gen);
        let Some(fd) = fs::open_existing_ro(dir, &name)? else {
            return Ok(None);
        };
        let bytes = fs::read_small(fd.as_fd(), &name)?;
        let record: LeaseRecord = serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("lease file '{name}' is not baton's JSON: {e}"),
            )
        })?;
        if record.slot != slot || record.gen != gen {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "lease file '{name}' says slot {} generation {}",
                    record.slot, record.gen
                ),
            ));
        }
        Ok(Some(record))
    }

    /// Takes the next token with the `token.T` chain.
    fn take_token(&self, dir: BorrowedFd<'_>) -> io::Result<Token> {
        loop {
            let next = Listing::read(dir)?.last_token() + 1;
            if !fs::create_once(dir, &token_file(next), b"")? {
                continue;
            }
            let after = Listing::read(dir)?;
            if after.last_token() != next {
                // A paused process re-created a number that was cleaned up, or someone
                // went higher meanwhile: ours is not the highest, so it is not ours.
                fs::remove(dir, &token_file(next))?;
                continue;
            }
            for old in after.tokens.iter().filter(|t| **t < next) {
                let _ = fs::remove(dir, &token_file(*old));
            }
            return Ok(Token(next));
        }
    }

    /// Creates generation `gen` of `slot`; true if it is now the slot's current one.
    fn claim(&self, dir: BorrowedFd<'_>, record: &LeaseRecord) -> io::Result<bool> {
        let name = slot_file(record.slot, record.gen);
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        if !fs::create_once(dir, &name, &json)? {
            return Ok(false);
        }
        let after = Listing::read(dir)?;
        if after.current(record.slot) != record.gen {
            fs::remove(dir, &name)?;
            return Ok(false);
        }
        if let Some(gens) = after.gens.get(&record.slot) {
            for old in gens.iter().filter(|g| **g < record.gen) {
                let _ = fs::remove(dir, &slot_file(record.slot, *old));
            }
        }
        Ok(true)
    }

    /// Whether the current lease of a slot is free to take: released, broken, never
    /// taken, stale after a TTL of silence seen by this acquirer, or held by a process of
    /// this host that is gone.
    fn judge(
        &self,
        record: Option<&LeaseRecord>,
        seen: &mut HashMap<u32, Seen>,
        slot: u32,
    ) -> bool {
        let Some(r) = record else { return true };
        if r.state != State::Held {
            return true;
        }
        if r.holder.liveness() == Liveness::Dead {
            return true;
        }
        let now = Instant::now();
        match seen.get(&slot) {
            Some(s) if s.gen == r.gen && s.heartbeat == r.heartbeat => {
                now.duration_since(s.since) >= Duration::from_millis(r.ttl_ms)
            }
            _ => {
                seen.insert(
                    slot,
                    Seen {
                        gen: r.gen,
                        heartbeat: r.heartbeat,
                        since: now,
                    },
                );
                false
            }
        }
    }

    /// One pass over the slots: a lease if one could be taken.
    async fn try_once(
        &self,
        dir: &OwnedFd,
        req: &AcquireRequest,
        limit: u32,
        ttl: Duration,
        seen: &mut HashMap<u32, Seen>,
    ) -> Result<Option<Lease>, Error> {
        let key = &req.key;
        let io_err = |what: &str, e| self.root.io_err(Op::Acquire, key, what, e);
        let listing = Listing::read(dir.as_fd())
            .map_err(|e| io_err("cannot list the key's lease files", e))?;
        // Slots of a limit that was lowered still count while held.
        let mut free = Vec::new();
        let mut held = 0u32;
        let all_slots: Vec<u32> = (0..limit)
            .chain(listing.gens.keys().copied().filter(|s| *s >= limit))
            .collect();
        for slot in all_slots {
            let gen = listing.current(slot);
            let record = if gen == 0 {
                None
            } else {
                match self.read_record(dir.as_fd(), slot, gen) {
                    Ok(Some(r)) => Some(r),
                    // Cleaned up under us: a newer generation exists; look again later.
                    Ok(None) => {
                        held += 1;
                        continue;
                    }
                    Err(e) => {
                        return Err(io_err(
                            &format!("bad lease file {}", slot_file(slot, gen)),
                            e,
                        ))
                    }
                }
            };
            if self.judge(record.as_ref(), seen, slot) {
                if slot < limit {
                    free.push((slot, gen, record));
                }
            } else {
                held += 1;
            }
        }
        if held >= limit {
            return Ok(None);
        }
        for (slot, gen, record) in free {
            let reclaiming = record.as_ref().is_some_and(|r| r.state == State::Held);
            let pause = *lock(&self.reclaim_pause);
            if let (true, Some(pause)) = (reclaiming, pause) {
                self.reclaim_pauses
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(pause).await;
            }
            let sent_at = Instant::now();
            let token = self
                .take_token(dir.as_fd())
                .map_err(|e| io_err("cannot take a token", e))?;
            let now = now_ms();
            let record = LeaseRecord {
                state: State::Held,
                slot,
                gen: gen + 1,
                token,
                ttl_ms: ttl.as_millis() as u64,
                heartbeat: 0,
                acquired_unix_ms: now,
                renewed_unix_ms: now,
                holder: req.holder.clone(),
            };
            if self
                .claim(dir.as_fd(), &record)
                .map_err(|e| io_err("cannot create a lease file", e))?
            {
                lock(&self.held).insert(
                    (key.clone(), slot, token.0),
                    Held {
                        gen: record.gen,
                        holder: req.holder.id,
                    },
                );
                return Ok(Some(Lease {
                    key: key.clone(),
                    slot,
                    limit,
                    token,
                    holder: req.holder.clone(),
                    ttl: Some(ttl),
                    acquired_unix_ms: now,
                    sent_at: Some(sent_at),
                }));
            }
            seen.remove(&slot);
        }
        Ok(None)
    }

    /// The held generation of a lease this process took, if it is still the current one
    /// and still says it is ours.
    fn current_record(
        &self,
        lease: &Lease,
        op: Op,
    ) -> Result<Option<(std::sync::Arc<OwnedFd>, LeaseRecord)>, Error> {
        let entry = (lease.key.clone(), lease.slot, lease.token.0);
        let gen = match lock(&self.held).get(&entry) {
            Some(h) if h.holder == lease.holder.id => h.gen,
            _ => return Ok(None),
        };
        let (dir, _) = self.root.existing_key(&lease.key, op)?;
        let io_err = |e| {
            self.root
                .io_err(op, &lease.key, "cannot read the lease file", e)
        };
        let listing = Listing::read(dir.as_fd()).map_err(io_err)?;
        if listing.current(lease.slot) != gen {
            return Ok(None);
        }
        match self
            .read_record(dir.as_fd(), lease.slot, gen)
            .map_err(io_err)?
        {
            Some(r)
                if r.state == State::Held
                    && r.token == lease.token
                    && r.holder.id == lease.holder.id =>
            {
                Ok(Some((dir, r)))
            }
            _ => Ok(None),
        }
    }

    fn forget(&self, lease: &Lease) {
        lock(&self.held).remove(&(lease.key.clone(), lease.slot, lease.token.0));
    }

    fn release_sync(&self, lease: &Lease) -> Result<Released, Error> {
        let Some((dir, mut record)) = self.current_record(lease, Op::Release)? else {
            self.forget(lease);
            return Ok(Released::NotHeld);
        };
        record.state = State::Released;
        record.renewed_unix_ms = now_ms();
        let json = serde_json::to_vec(&record).map_err(|e| {
            self.root.err(
                ErrorKind::Unavailable,
                Op::Release,
                &lease.key,
                e.to_string(),
            )
        })?;
        fs::write_atomic(dir.as_fd(), &slot_file(record.slot, record.gen), &json).map_err(|e| {
            self.root
                .io_err(Op::Release, &lease.key, "cannot write the lease file", e)
        })?;
        self.forget(lease);
        Ok(Released::Released)
    }
}

#[async_trait]
impl Store for LeaseStore {
    fn url(&self) -> &StoreUrl {
        &self.root.url
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::new(
            "within the TTL after the last heartbeat; at once when the holder was on this host and its process is gone",
        );
        c.renew = true;
        c.break_lease = true;
        c.resize = true;
        c
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        let (dir, limit) = self.root.key_for_acquire(req)?;
        let ttl = req.ttl.unwrap_or(DEFAULT_TTL);
        if ttl < Duration::from_millis(10) {
            return Err(self.root.err(
                ErrorKind::InvalidInput,
                Op::Acquire,
                &req.key,
                "the TTL must be at least 10ms",
            ));
        }
        let started = Instant::now();
        let mut seen = HashMap::new();
        let mut poll = MIN_POLL;
        loop {
            if let Some(lease) = self.try_once(&dir, req, limit, ttl, &mut seen).await? {
                return Ok(lease);
            }
            let sleep = match req.wait {
                Wait::NoWait => {
                    return Err(self.root.err(
                        ErrorKind::Busy,
                        Op::Acquire,
                        &req.key,
                        format!(
                            "all {limit} slot(s) are held (a silent holder on another host is judged stale only by a waiting acquirer, after its TTL)"
                        ),
                    ))
                }
                Wait::Timeout(d) => {
                    let left = d.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(self.root.err(
                            ErrorKind::Timeout,
                            Op::Acquire,
                            &req.key,
                            format!("all {limit} slot(s) stayed held for {}", baton_core::format_duration(d)),
                        ));
                    }
                    poll.min(left)
                }
                Wait::Forever => poll,
            };
            tokio::time::sleep(sleep).await;
            poll = (poll * 2).min(MAX_POLL);
        }
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        self.release_sync(lease)
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let _ = self.release_sync(lease);
        true
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let lost = |why: &str| {
            self.root
                .err(ErrorKind::Lost, Op::Renew, &lease.key, why.to_owned())
        };
        let Some((dir, mut record)) = self.current_record(lease, Op::Renew)? else {
            self.forget(lease);
            return Err(lost("the lease was taken over, broken or released"));
        };
        record.heartbeat += 1;
        record.renewed_unix_ms = now_ms();
        let json = serde_json::to_vec(&record).map_err(|e| {
            self.root
                .err(ErrorKind::Unavailable, Op::Renew, &lease.key, e.to_string())
        })?;
        fs::write_atomic(dir.as_fd(), &slot_file(record.slot, record.gen), &json).map_err(|e| {
            self.root
                .io_err(Op::Renew, &lease.key, "cannot write the heartbeat", e)
        })?;
        // A reclaimer that judged us stale before our write may have created the next
        // generation meanwhile: check after writing too.
        let listing = Listing::read(dir.as_fd()).map_err(|e| {
            self.root
                .io_err(Op::Renew, &lease.key, "cannot list lease files", e)
        })?;
        if listing.current(lease.slot) != record.gen {
            self.forget(lease);
            return Err(lost("the lease was taken over"));
        }
        Ok(lease.clone())
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let (dir, _) = self.root.existing_key(key, Op::Break)?;
        let io_err = |what: &str, e| self.root.io_err(Op::Break, key, what, e);
        let listing =
            Listing::read(dir.as_fd()).map_err(|e| io_err("cannot list lease files", e))?;
        let breaker = Holder::current(vec!["baton".into(), "break".into()]);
        let mut broken = Vec::new();
        for (&slot, gens) in &listing.gens {
            let Some(&gen) = gens.last() else { continue };
            let Some(r) = self
                .read_record(dir.as_fd(), slot, gen)
                .map_err(|e| io_err("bad lease file", e))?
            else {
                continue;
            };
            if r.state != State::Held || holder.is_some_and(|h| h != r.holder.id) {
                continue;
            }
            let tombstone = LeaseRecord {
                state: State::Broken,
                gen: gen + 1,
                heartbeat: 0,
                renewed_unix_ms: now_ms(),
                holder: breaker.clone(),
                ..r.clone()
            };
            if self
                .claim(dir.as_fd(), &tombstone)
                .map_err(|e| io_err("cannot write the break", e))?
            {
                broken.push(SlotStatus {
                    slot,
                    state: SlotState::Free,
                    token: Some(r.token),
                    holder: Some(r.holder),
                    since_unix_ms: Some(r.acquired_unix_ms),
                    renewed_unix_ms: None,
                    expires_unix_ms: None,
                    note: Some("broken".into()),
                });
            }
        }
        Ok(broken)
    }

    async fn resize(&self, key: &Key, limit: u32) -> Result<KeyStatus, Error> {
        // Lowering never evicts: acquires count holders in every slot, also those at or
        // above the new limit, and grant only below it, so grants stop until they drain.
        self.root.set_limit(key, limit)?;
        self.inspect(key).await
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let (dir, limit) = self.root.existing_key(key, Op::Inspect)?;
        let listing = Listing::read(dir.as_fd()).map_err(|e| {
            self.root
                .io_err(Op::Inspect, key, "cannot list lease files", e)
        })?;
        let mut slots = Vec::new();
        let extra = listing.gens.keys().copied().filter(|s| *s >= limit);
        for slot in (0..limit).chain(extra) {
            let gen = listing.current(slot);
            let mut status = SlotStatus::free(slot);
            if gen > 0 {
                match self.read_record(dir.as_fd(), slot, gen) {
                    Ok(Some(r))
                        if r.state == State::Held && r.holder.liveness() == Liveness::Dead =>
                    {
                        status.note = Some(format!(
                            "free; the last holder (pid {}, token {}) is gone and the next acquirer reclaims its lease",
                            r.holder.pid, r.token
                        ));
                    }
                    Ok(Some(r)) if r.state == State::Held => {
                        status.state = SlotState::Held;
                        status.token = Some(r.token);
                        status.since_unix_ms = Some(r.acquired_unix_ms);
                        let ago = now_ms().saturating_sub(r.renewed_unix_ms);
                        status.note = Some(format!(
                            "ttl {}, heartbeat #{} about {} ago",
                            baton_core::format_duration(Duration::from_millis(r.ttl_ms)),
                            r.heartbeat,
                            baton_core::format_duration(Duration::from_millis(ago))
                        ));
                        status.holder = Some(r.holder);
                    }
                    Ok(Some(r)) if r.state == State::Broken => {
                        status.note = Some(format!("broken (was token {})", r.token))
                    }
                    Ok(_) => {}
                    Err(e) => status.note = Some(format!("lease file unreadable: {e}")),
                }
            }
            slots.push(status);
        }
        Ok(KeyStatus {
            key: key.clone(),
            limit,
            slots,
            waiters: None,
            last_token: Some(Token(listing.last_token())).filter(|t| t.0 > 0),
            lock_delay_ms: None,
        })
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        self.root.list()
    }

    async fn barrier(
        &self,
        req: &baton_core::BarrierRequest,
    ) -> Result<baton_core::BarrierPassed, Error> {
        crate::barrier::barrier(&self.root, crate::barrier::Liveness::Heartbeat, req).await
    }
}
