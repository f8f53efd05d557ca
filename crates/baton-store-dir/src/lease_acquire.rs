//! Lease mode's grant: one pass over a key's slots (judge each, reclaim a stale one,
//! apply the lock-delay, claim a generation with `link(2)`, take a token), and the wait
//! that repeats the pass.
//!
//! Guarantees (the mechanism is in `lease.rs`'s module docs):
//! - A slot is taken only by creating its next generation, and kept only if that is still
//!   the highest generation after creating it ([`LeaseStore::claim`]).
//! - A lease is judged stale only after this acquirer has seen the same generation and
//!   heartbeat for the lease's whole TTL on its own monotonic clock ([`LeaseStore::judge`]),
//!   or at once when its holder was on this host and its process is gone. A no-wait
//!   acquire makes one pass, so it never judges a silent holder on another host stale.
//! - On a key with a lock-delay, a lost lease is first replaced by a tombstone, and the
//!   slot is granted again only once this host has seen the tombstone for the whole delay
//!   ([`LeaseStore::held_back`]).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_core::kit::errors;
use baton_core::kit::sys::lock;
use baton_core::kit::time::{unix_ms_now, validate_ttl};
use baton_core::{AcquireRequest, Error, ErrorKind, Key, Lease, Liveness, Op, Token, Wait};

use crate::fs;
use crate::lease::{Held, LeaseStore};
use crate::lease_layout::{
    at_maximum, now_ns, read_record, seen_file, slot_file, token_file, LeaseRecord, Listing, State,
};
use crate::root::DELETED_TRIES;

/// How often a waiting acquirer looks again, at most (it starts faster and backs off).
pub(crate) const MAX_POLL: Duration = Duration::from_millis(200);
const MIN_POLL: Duration = Duration::from_millis(2);

/// What a waiting acquirer has seen of a slot, and since when (monotonic).
pub(crate) struct Seen {
    gen: u64,
    heartbeat: u64,
    since: Instant,
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
    /// back, `held` how many slots are simply held.
    Busy {
        held_back: Option<Duration>,
        held: u32,
    },
}

impl LeaseStore {
    /// Acquires as `req` says: a pass over the slots, then, while the request waits, a
    /// pass again at a poll that starts at 2 ms and backs off to 200 ms (or, when only
    /// held-back slots are in the way, once their lock-delay ends).
    pub(crate) async fn acquire_lease(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        let (mut dir, mut limit) = self.root.key_for_acquire(req)?;
        let ttl = validate_ttl(req.ttl, &req.key)?;
        let started = Instant::now();
        let mut seen = HashMap::new();
        let mut backoff = MIN_POLL;
        let mut deleted = 0;
        loop {
            if !self.root.is_current(&req.key, &dir) {
                // Deleted while this request waited: wait for the key made anew.
                deleted += 1;
                self.root.forget(&req.key);
                (dir, limit) = self.root.key_for_acquire(req)?;
                seen.clear();
            }
            // Read afresh each pass, as the limit is: a malformed delay is Corrupt.
            let pass = match self.root.lock_delay(&dir, &req.key, Op::Acquire) {
                Ok(delay) => self
                    .try_once(&dir, req, limit, ttl, &mut seen, delay)
                    .await
                    .map(|pass| (pass, delay)),
                Err(e) => Err(e),
            };
            let (pass, delay) = match pass {
                Ok(got) => got,
                // The key's files were removed under this pass: start over on the key
                // made anew (see `root/retire.rs`).
                Err(_) if deleted < DELETED_TRIES && !self.root.is_current(&req.key, &dir) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let (held_back, held) = match pass {
                Pass::Granted(lease) => return Ok(*lease),
                Pass::Busy { held_back, held } => (held_back, held),
            };
            // Only held-back slots in the way: sleep until the first delay ends, no polling.
            let poll = match held_back {
                Some(left) if held == 0 => left,
                Some(left) => backoff.min(left),
                None => backoff,
            };
            let sleep = match req.wait {
                Wait::NoWait => {
                    let e = busy(limit, held, delay.zip(held_back));
                    return Err(self.root.ctx(e, Op::Acquire, &req.key));
                }
                Wait::Timeout(d) => {
                    let left = d.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(req.timed_out(
                            &format!("all {limit} slot(s) stayed held"),
                            &self.root.url,
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
        let mut plain_held = 0u32;
        let all_slots: Vec<u32> = (0..limit)
            .chain(listing.gens.keys().copied().filter(|s| *s >= limit))
            .collect();
        for slot in all_slots {
            let gen = listing.current(slot);
            let record = if gen == 0 {
                None
            } else {
                match read_record(dir.as_fd(), slot, gen) {
                    Ok(Some(r)) => Some(r),
                    // Cleaned up under us: a newer generation exists; look again later.
                    Ok(None) => {
                        held += 1;
                        plain_held += 1;
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
                    plain_held += 1;
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
                .take_token(dir.as_fd(), key)
                .map_err(|e| io_err("cannot take a token", e))?;
            let record = LeaseRecord::held(slot, gen, token, ttl, req.holder.clone())
                .map_err(|e| io_err("cannot take the slot", e))?;
            let now = record.acquired_unix_ms;
            if self
                .claim(dir.as_fd(), &record)
                .map_err(|e| io_err("cannot create a lease file", e))?
            {
                if !self.root.is_current(key, dir) {
                    // A slot of a deleted key's directory (see `root/retire.rs`): not a
                    // grant; the next pass looks at the key made anew.
                    return Ok(busy);
                }
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

    /// Takes the next token with the `token.T` chain; the first token of a key made
    /// again after a delete is above the token floor the delete left.
    fn take_token(&self, dir: BorrowedFd<'_>, key: &Key) -> io::Result<Token> {
        loop {
            let listing = Listing::read(dir)?;
            let last = match listing.tokens.is_empty() {
                true => self.root.token_floor(key)?.unwrap_or(0),
                false => listing.last_token(),
            };
            let next = last.checked_add(1).ok_or_else(|| at_maximum("token"))?;
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
    pub(crate) fn claim(&self, dir: BorrowedFd<'_>, record: &LeaseRecord) -> io::Result<bool> {
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
    pub(crate) fn held_back(
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
        let now = now_ns();
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
                .filter(|ns| *ns <= now_ns())
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
                    renewed_unix_ms: unix_ms_now(),
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
}

/// `Busy` for a no-wait acquire: the kit's wording (`held` slots simply held; `held_back`
/// the key's lock-delay and the least of it left on a held-back slot), and when no
/// lock-delay is the reason, why waiting may still help (only a waiting acquirer judges a
/// silent holder stale).
fn busy(limit: u32, held: u32, held_back: Option<(Duration, Duration)>) -> Error {
    if let Some((delay, left)) = held_back {
        return errors::busy(held, limit, None, Some((delay, left)));
    }
    let e = errors::busy(limit, limit, None, None);
    Error::new(
        ErrorKind::Busy,
        format!(
            "{} (a silent holder on another host is judged stale only by a waiting acquirer, \
             after its TTL)",
            e.message()
        ),
    )
}
