//! Lease-file mode, `dir:PATH?mode=lease`: for shared filesystems (NFS, Lustre) where
//! kernel locks are not trusted. No decision uses a kernel lock, a file's mtime or a PID
//! alone.
//!
//! Layout in a key's directory:
//!
//! ```text
//! limit            the key's limit (and lock-delay), created once (temp file + link)
//! token.T          the last token handed out is the highest T
//! slot.N.G         generation G of slot N: JSON {state, token, holder, ttl, heartbeat}
//! seen.N.G.BOOT    when a host (by boot id) first saw tombstone G of slot N, in ns on
//!                  its CLOCK_MONOTONIC (keys with a lock-delay only)
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
//! - **Lock-delay** (keys created with one). A lease that is lost rather than released
//!   (judged stale, its holder on this host gone, or broken) is first replaced by a
//!   tombstone generation (`expired` or `broken`), created with `link(2)` like any other,
//!   and the slot is granted again only once the delay has passed since the loss. Hosts
//!   share no monotonic clock, so each host measures from the first time one of its
//!   processes saw the tombstone (`seen.N.G.BOOT`, created once, never rewritten): that is
//!   never before the loss, so a host can only wait longer than the delay, never less,
//!   and no wall clock is read. The tombstone's writer stamps its own host at once.
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
    /// A tombstone a waiter wrote over a lease it found lost (stale or its holder gone),
    /// so that the key's lock-delay runs before the slot is granted again.
    Expired,
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
    /// `seen.N.G.BOOT` markers: (slot, generation, file name).
    seen: Vec<(u32, u64, String)>,
}

impl Listing {
    fn read(dir: BorrowedFd<'_>) -> io::Result<Listing> {
        let mut out = Listing::default();
        for (name, is_file) in fs::names(dir)? {
            let mut parts = name.split('.');
            let parts = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            );
            let parsed = match parts {
                (Some("token"), Some(t), None, None, None) => {
                    t.parse().map(|t| out.tokens.push(t)).is_ok()
                }
                (Some("slot"), Some(n), Some(g), None, None) => match (n.parse(), g.parse()) {
                    (Ok(n), Ok(g)) => {
                        out.gens.entry(n).or_default().push(g);
                        true
                    }
                    _ => false,
                },
                (Some("seen"), Some(n), Some(g), Some(_), None) => match (n.parse(), g.parse()) {
                    (Ok(n), Ok(g)) => {
                        out.seen.push((n, g, name.clone()));
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

fn seen_file(slot: u32, gen: u64, boot: &str) -> String {
    format!("seen.{slot}.{gen}.{boot}")
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// Nanoseconds on this host's `CLOCK_MONOTONIC`: shared by every process of one boot,
/// never stepped by a wall-clock change.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for clock_gettime to write; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// What an acquirer makes of a slot's current generation.
enum Verdict {
    /// It can be taken now.
    Free,
    /// Someone holds it (or may: a lease not yet seen silent for its TTL).
    Held,
    /// Its lease was lost and the key's lock-delay holds it back for this much longer.
    HeldBack(Duration),
}

/// The end of one pass over a key's slots.
enum Pass {
    Granted(Box<Lease>),
    /// No slot could be taken: `held_back` is the shortest lock-delay left on a slot held
    /// back, `held` whether some slot is simply held.
    Busy {
        held_back: Option<Duration>,
        held: bool,
    },
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
            let next = Listing::read(dir)?
                .last_token()
                .checked_add(1)
                .ok_or_else(|| at_maximum("token"))?;
            if !fs::create_once(dir, &token_file(next), b"", self.root.share)? {
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
        if !fs::create_once(dir, &name, &json, self.root.share)? {
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
        for (_, _, name) in after
            .seen
            .iter()
            .filter(|(slot, gen, _)| *slot == record.slot && *gen < record.gen)
        {
            let _ = fs::remove(dir, name);
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

    /// How much longer the lock-delay after the loss that tombstone `gen` of `slot`
    /// records holds the slot back on this host (`None`: it is over), measured from when
    /// this host first saw the tombstone, on its monotonic clock. The first look stamps
    /// the host (`seen.N.G.BOOT`, created once); a stamp that is not a time baton wrote,
    /// or lies in this boot's future, is `InvalidData` (Corrupt) and frees nothing.
    fn held_back(
        &self,
        dir: BorrowedFd<'_>,
        slot: u32,
        gen: u64,
        delay: Duration,
    ) -> io::Result<Option<Duration>> {
        let boot = baton_core::boot_id().ok_or_else(|| {
            io::Error::other("this host has no boot id: the lock-delay cannot be measured")
        })?;
        if boot.is_empty() || !boot.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            return Err(io::Error::other(format!("unusable boot id {boot:?}")));
        }
        let name = seen_file(slot, gen, &boot);
        let now = monotonic_ns();
        let since = if fs::create_once(dir, &name, format!("{now}\n").as_bytes(), self.root.share)?
        {
            now
        } else {
            let fd = fs::open_existing_ro(dir, &name)?.ok_or_else(|| {
                io::Error::other(format!("'{name}' vanished while the slot is held back"))
            })?;
            let bytes = fs::read_small(fd.as_fd(), &name)?;
            std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.strip_suffix('\n'))
                .filter(|t| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok())
                .filter(|ns| *ns <= monotonic_ns())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "lock-delay stamp '{name}' holds {:?}, not a time of this boot baton wrote",
                            String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
                        ),
                    )
                })?
        };
        let elapsed = Duration::from_nanos(now.saturating_sub(since));
        Ok(delay.checked_sub(elapsed).filter(|left| !left.is_zero()))
    }

    /// What an acquirer with the key's lock-delay `delay` makes of a slot: [`Self::judge`],
    /// and for a lost lease on a key with a delay, a tombstone first (so that the delay
    /// runs from the loss) and then the delay.
    fn verdict(
        &self,
        dir: BorrowedFd<'_>,
        record: Option<&LeaseRecord>,
        seen: &mut HashMap<u32, Seen>,
        slot: u32,
        delay: Option<Duration>,
    ) -> io::Result<Verdict> {
        let free = self.judge(record, seen, slot);
        let (Some(r), Some(delay)) = (record, delay) else {
            return Ok(if free { Verdict::Free } else { Verdict::Held });
        };
        match r.state {
            State::Released => Ok(Verdict::Free),
            State::Held if !free => Ok(Verdict::Held),
            State::Broken | State::Expired => Ok(self
                .held_back(dir, slot, r.gen, delay)?
                .map_or(Verdict::Free, Verdict::HeldBack)),
            State::Held => {
                let tombstone = LeaseRecord {
                    state: State::Expired,
                    gen: r
                        .gen
                        .checked_add(1)
                        .ok_or_else(|| at_maximum("lease generation"))?,
                    heartbeat: 0,
                    renewed_unix_ms: now_ms(),
                    ..r.clone()
                };
                seen.remove(&slot);
                if !self.claim(dir, &tombstone)? {
                    // Someone else moved the slot on first: look again next pass.
                    return Ok(Verdict::Held);
                }
                // The pass goes on from the generation it listed, so even a delay that
                // were somehow over already is taken up by the next pass.
                let left = self.held_back(dir, slot, tombstone.gen, delay)?;
                Ok(Verdict::HeldBack(left.unwrap_or(Duration::from_millis(1))))
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
        delay: Option<Duration>,
    ) -> Result<Pass, Error> {
        let key = &req.key;
        let io_err = |what: &str, e| self.root.io_err(Op::Acquire, key, what, e);
        let listing = Listing::read(dir.as_fd())
            .map_err(|e| io_err("cannot list the key's lease files", e))?;
        // Slots of a limit that was lowered still count while held.
        let mut free = Vec::new();
        let mut held = 0u32;
        let mut held_back: Option<Duration> = None;
        let mut plain_held = false;
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
                        plain_held = true;
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
            let verdict = self
                .verdict(dir.as_fd(), record.as_ref(), seen, slot, delay)
                .map_err(|e| io_err(&format!("cannot apply the lock-delay to slot {slot}"), e))?;
            match verdict {
                Verdict::Free if slot < limit => free.push((slot, gen, record)),
                Verdict::Free => {}
                Verdict::Held => {
                    held += 1;
                    plain_held = true;
                }
                Verdict::HeldBack(left) => {
                    held += 1;
                    held_back = Some(held_back.map_or(left, |h| h.min(left)));
                }
            }
        }
        let busy = Pass::Busy {
            held_back,
            held: plain_held,
        };
        if held >= limit {
            return Ok(busy);
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
                gen: gen.checked_add(1).ok_or_else(|| {
                    io_err("cannot take the slot", at_maximum("lease generation"))
                })?,
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
                return Ok(Pass::Granted(Box::new(Lease {
                    key: key.clone(),
                    slot,
                    limit,
                    token,
                    holder: req.holder.clone(),
                    ttl: Some(ttl),
                    acquired_unix_ms: now,
                    sent_at: Some(sent_at),
                })));
            }
            seen.remove(&slot);
        }
        Ok(busy)
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

    /// The `status` note of a tombstone on a key with a lock-delay: whether the delay
    /// still holds the slot back, read from this host's stamp without writing one (no
    /// stamp yet: estimated from the tombstone's wall-clock time, for display only).
    fn held_back_note(&self, dir: &OwnedFd, r: &LeaseRecord, delay: Option<Duration>) -> String {
        let how = if r.state == State::Broken {
            "was broken"
        } else {
            "was lost (expired, or its holder died)"
        };
        let Some(delay) = delay else {
            return format!("free: the lease with token {} {how}", r.token);
        };
        let stamped = baton_core::boot_id()
            .map(|boot| seen_file(r.slot, r.gen, &boot))
            .and_then(|name| {
                let fd = fs::open_existing_ro(dir.as_fd(), &name).ok()??;
                let bytes = fs::read_small(fd.as_fd(), &name).ok()?;
                std::str::from_utf8(&bytes)
                    .ok()?
                    .trim_end()
                    .parse::<u64>()
                    .ok()
            });
        let elapsed = match stamped {
            Some(ns) => Duration::from_nanos(monotonic_ns().saturating_sub(ns)),
            None => Duration::from_millis(now_ms().saturating_sub(r.renewed_unix_ms)),
        };
        let d = baton_core::format_duration;
        match delay.checked_sub(elapsed).filter(|l| !l.is_zero()) {
            Some(left) => format!(
                "held back: the lease with token {} {how}; the lock-delay of {} holds the slot back for about another {}",
                r.token,
                d(delay),
                d(left)
            ),
            None => format!(
                "free: the lease with token {} {how}; its lock-delay of {} is over",
                r.token,
                d(delay)
            ),
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
        fs::write_atomic(
            dir.as_fd(),
            &slot_file(record.slot, record.gen),
            &json,
            self.root.share,
        )
        .map_err(|e| {
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
        c.lock_delay = true;
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
        let mut backoff = MIN_POLL;
        loop {
            // Read afresh each pass, as the limit is: a malformed delay is Corrupt.
            let delay = self.root.lock_delay(&dir, &req.key, Op::Acquire)?;
            let (held_back, held) = match self
                .try_once(&dir, req, limit, ttl, &mut seen, delay)
                .await?
            {
                Pass::Granted(lease) => return Ok(*lease),
                Pass::Busy { held_back, held } => (held_back, held),
            };
            // Only held-back slots in the way: sleep until the first delay ends, no polling.
            let poll = match held_back {
                Some(left) if !held => left,
                Some(left) => backoff.min(left),
                None => backoff,
            };
            let sleep = match req.wait {
                Wait::NoWait => {
                    let why = match (held_back, delay) {
                        (Some(left), Some(d)) => format!(
                            "all {limit} slot(s) are held or held back: a lost lease's slot is held back by the key's lock-delay of {} for about another {}",
                            baton_core::format_duration(d),
                            baton_core::format_duration(left)
                        ),
                        _ => format!(
                            "all {limit} slot(s) are held (a silent holder on another host is judged stale only by a waiting acquirer, after its TTL)"
                        ),
                    };
                    return Err(self.root.err(ErrorKind::Busy, Op::Acquire, &req.key, why));
                }
                Wait::Timeout(d) => {
                    let left = d.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(self.root.err(
                            ErrorKind::Timeout,
                            Op::Acquire,
                            &req.key,
                            format!(
                                "all {limit} slot(s) stayed held for {}",
                                baton_core::format_duration(d)
                            ),
                        ));
                    }
                    poll.min(left)
                }
                Wait::Forever => poll,
            };
            tokio::time::sleep(sleep).await;
            backoff = (backoff * 2).min(MAX_POLL);
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
        fs::write_atomic(
            dir.as_fd(),
            &slot_file(record.slot, record.gen),
            &json,
            self.root.share,
        )
        .map_err(|e| {
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
        let delay = self.root.lock_delay(&dir, key, Op::Break)?;
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
                gen: gen.checked_add(1).ok_or_else(|| {
                    io_err("cannot break the lease", at_maximum("lease generation"))
                })?,
                heartbeat: 0,
                renewed_unix_ms: now_ms(),
                holder: breaker.clone(),
                ..r.clone()
            };
            if self
                .claim(dir.as_fd(), &tombstone)
                .map_err(|e| io_err("cannot write the break", e))?
            {
                if let Some(delay) = delay {
                    // Start this host's lock-delay clock at the break. Should the stamp
                    // fail, this host's next acquirer stamps it later: later is safe.
                    let _ = self.held_back(dir.as_fd(), slot, tombstone.gen, delay);
                }
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
        let delay = self.root.lock_delay(&dir, key, Op::Inspect)?;
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
                    Ok(Some(r))
                        if delay.is_some() && matches!(r.state, State::Broken | State::Expired) =>
                    {
                        status.note = Some(self.held_back_note(&dir, &r, delay));
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
            lock_delay_ms: delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
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

/// A counter kept in file names (a token, a lease generation) at `u64::MAX`: nothing baton
/// wrote can get there, so it is corrupt or hostile state, and it must not wrap.
fn at_maximum(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the {what} in a file name is at its maximum (u64::MAX): not a value baton wrote"),
    )
}
