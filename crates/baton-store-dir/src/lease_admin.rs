//! Lease mode's `status`, `break` and `resize`.
//!
//! Guarantees:
//! - `status` reads and never writes (not even this host's lock-delay stamp). A held
//!   slot shows its last heartbeat (`renewed_unix_ms`, the time its holder wrote into the
//!   lease file at its last renewal) and an estimate of its expiry (that plus the TTL):
//!   wall-clock times for display only, since no decision of this store reads a wall clock.
//! - `break` frees each held slot (of one holder, or all) by creating a `broken`
//!   tombstone generation with `link(2)`, so a renewal of the broken lease answers lost;
//!   on a key with a lock-delay, the slot is then held back for the delay.
//! - `resize` replaces the limit file atomically; lowering it never evicts a holder.
//! - `delete` claims every slot before it renames the key's directory away, and gives
//!   them back if it cannot finish (see [`LeaseStore::delete_key`]).

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_core::kit::time::unix_ms_now;
use baton_core::kit::{errors, status};
use baton_core::{
    Error, Holder, HolderId, Key, KeyStatus, Liveness, Op, Resize, SlotState, SlotStatus, Token,
};

use crate::fs;
use crate::lease::LeaseStore;
use crate::lease_layout::{
    at_maximum, read_record, seen_file, slot_file, LeaseRecord, Listing, State,
};
use crate::root::exited_slot;

/// The TTL of the claims a delete makes on a key's slots while it removes the key; the
/// delete gives up if it has not got to the rename within half of it.
const DELETE_TTL: Duration = Duration::from_secs(60);

impl LeaseStore {
    pub(crate) fn inspect_key(&self, key: &Key) -> Result<KeyStatus, Error> {
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
            let mut st = SlotStatus::free(slot);
            if gen > 0 {
                match read_record(dir.as_fd(), slot, gen) {
                    Ok(Some(r))
                        if r.state == State::Held && r.holder.liveness() == Liveness::Dead =>
                    {
                        st = match delay {
                            Some(delay) => SlotStatus {
                                note: Some(status::held_back_note(delay, None)),
                                ..st
                            },
                            None => exited_slot(slot, r.token, &r.holder),
                        };
                    }
                    Ok(Some(r)) if r.state == State::Held => {
                        st.state = SlotState::Held;
                        st.token = Some(r.token);
                        st.since_unix_ms = Some(r.acquired_unix_ms);
                        st.renewed_unix_ms = Some(r.renewed_unix_ms);
                        st.expires_unix_ms = Some(r.renewed_unix_ms.saturating_add(r.ttl_ms));
                        st.holder = Some(r.holder);
                        if slot >= limit {
                            st.note = Some(status::above_limit_note(limit));
                        }
                    }
                    Ok(Some(r)) if matches!(r.state, State::Broken | State::Expired) => {
                        st.note = Some(self.tombstone_note(&dir, &r, delay));
                    }
                    Ok(_) => {}
                    Err(e) => st.note = Some(format!("lease file unreadable: {e}")),
                }
            }
            slots.push(st);
        }
        Ok(KeyStatus {
            key: key.clone(),
            limit,
            slots,
            // Waiters poll and leave no trace in the key's directory: nobody can count them.
            waiters: None,
            last_token: Some(Token(listing.last_token())).filter(|t| t.0 > 0),
            lock_delay_ms: delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        })
    }

    /// The `status` note of a tombstone: what ended the lease, and on a key with a
    /// lock-delay whether the delay still holds the slot back, read from this host's stamp
    /// without writing one (no stamp yet: estimated from the tombstone's wall-clock time,
    /// for display only).
    fn tombstone_note(&self, dir: &OwnedFd, r: &LeaseRecord, delay: Option<Duration>) -> String {
        let how = if r.state == State::Broken {
            "was broken"
        } else {
            "was lost (expired, or its holder died)"
        };
        let Some(delay) = delay else {
            return format!("free: the lease with token {} {how}", r.token);
        };
        let elapsed = self.seen_for(dir, r).unwrap_or_else(|| {
            Duration::from_millis(unix_ms_now().saturating_sub(r.renewed_unix_ms))
        });
        match delay.checked_sub(elapsed).filter(|l| !l.is_zero()) {
            Some(left) => status::held_back_note(delay, Some(left)),
            None => format!(
                "free: the lease with token {} {how}; its lock-delay of {} is over",
                r.token,
                baton_core::format_duration(delay)
            ),
        }
    }

    /// How long ago this host first saw the tombstone `r`, by its `seen.N.G.BOOT` stamp
    /// (monotonic): `None` when it has no stamp.
    fn seen_for(&self, dir: &OwnedFd, r: &LeaseRecord) -> Option<Duration> {
        let name = seen_file(r.slot, r.gen, &baton_core::boot_id()?);
        let fd = fs::open_existing_ro(dir.as_fd(), &name).ok()??;
        let bytes = fs::read_small(fd.as_fd(), &name).ok()?;
        let ns: u64 = std::str::from_utf8(&bytes).ok()?.trim_end().parse().ok()?;
        Some(Duration::from_nanos(
            crate::lease_layout::now_ns().saturating_sub(ns),
        ))
    }

    /// Deletes a key nobody holds (see `root/retire.rs`). Every slot's current lease must
    /// be released, broken, or lost with no lock-delay still holding it back (on this
    /// host's stamp: a lost lease this host has not timed is held back). This call then
    /// claims the next generation of every slot itself, so that nobody can be granted one
    /// while the key goes, and retires the directory. Requests that poll the key leave no
    /// trace to count or refuse: they wait on for the key made anew.
    pub(crate) fn delete_key(&self, key: &Key) -> Result<(), Error> {
        let op = Op::Delete;
        let io_err = |what: &str, e| self.root.io_err(op, key, what, e);
        let (dir, _) = self.root.existing_key(key, op)?;
        // Resizes wait: the limit stays as read below until the key is gone.
        let _turn = self.root.resize_turn(&dir, key, op)?;
        if !self.root.is_current(key, &dir) {
            return Err(self.root.ctx(errors::no_such_key(), op, key));
        }
        let (_, limit) = self.root.existing_key(key, op)?;
        let delay = self.root.lock_delay(&dir, key, op)?;
        let listing =
            Listing::read(dir.as_fd()).map_err(|e| io_err("cannot list lease files", e))?;
        let (mut held, mut held_back, mut free) = (0, 0, Vec::new());
        let extra = listing.gens.keys().copied().filter(|s| *s >= limit);
        for slot in (0..limit).chain(extra) {
            let gen = listing.current(slot);
            let record = match gen {
                0 => None,
                gen => match read_record(dir.as_fd(), slot, gen)
                    .map_err(|e| io_err(&format!("bad lease file {}", slot_file(slot, gen)), e))?
                {
                    Some(r) => Some(r),
                    // Cleaned up under us: someone is taking the slot right now.
                    None => {
                        held += 1;
                        continue;
                    }
                },
            };
            let lost = match &record {
                None => false,
                Some(r) => match r.state {
                    State::Held if r.holder.liveness() != Liveness::Dead => {
                        held += 1;
                        continue;
                    }
                    State::Released => false,
                    State::Held | State::Broken | State::Expired => true,
                },
            };
            if let (true, Some(delay), Some(r)) = (lost, delay, &record) {
                if self.seen_for(&dir, r).is_none_or(|seen| seen < delay) {
                    held_back += 1;
                    continue;
                }
            }
            if slot < limit {
                free.push((slot, gen));
            }
        }
        if held + held_back > 0 {
            let e = errors::in_use(held, None, held_back);
            return Err(self.root.ctx(e, op, key));
        }
        let deleter = Holder::current(vec!["baton".into(), "delete".into()]);
        let started = Instant::now();
        let mut claimed = Vec::new();
        for (slot, gen) in free {
            let token = Token(listing.last_token());
            let record = LeaseRecord::held(slot, gen, token, DELETE_TTL, deleter.clone())
                .map_err(|e| io_err("cannot take the slot", e))?;
            let won = self.claim(dir.as_fd(), &record);
            if !matches!(won, Ok(true)) {
                self.unclaim(&dir, claimed);
                let e = errors::in_use(1, None, 0);
                return Err(match won {
                    Err(e) => io_err("cannot create a lease file", e),
                    Ok(_) => self.root.ctx(e, op, key),
                });
            }
            claimed.push(record);
        }
        // Nobody judges this call's claims stale before DELETE_TTL of silence; it stops
        // well before that, as a holder stops before its keeper's deadline.
        let after = Listing::read(dir.as_fd()).map_err(|e| io_err("cannot list lease files", e));
        let still = after
            .as_ref()
            .is_ok_and(|l| claimed.iter().all(|r| l.current(r.slot) == r.gen))
            && started.elapsed() < DELETE_TTL / 2;
        let last = after.as_ref().map(Listing::last_token).unwrap_or(0);
        if !still {
            self.unclaim(&dir, claimed);
            after?;
            return Err(self.root.err(
                baton_core::ErrorKind::Unavailable,
                op,
                key,
                "the delete took too long and let the key be: try again",
            ));
        }
        match self.root.retire(key, &dir, last) {
            Ok(retired) => {
                retired.remove();
                Ok(())
            }
            Err(e) => {
                self.unclaim(&dir, claimed);
                Err(e)
            }
        }
    }

    /// Gives back the slots a delete claimed, as released.
    fn unclaim(&self, dir: &OwnedFd, claimed: Vec<LeaseRecord>) {
        for mut r in claimed {
            r.state = State::Released;
            r.renewed_unix_ms = unix_ms_now();
            if let Ok(json) = serde_json::to_vec(&r) {
                let name = slot_file(r.slot, r.gen);
                let _ = fs::write_atomic(dir.as_fd(), &name, &json, self.root.share);
            }
        }
    }

    pub(crate) fn break_key(
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
            let Some(r) =
                read_record(dir.as_fd(), slot, gen).map_err(|e| io_err("bad lease file", e))?
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
                renewed_unix_ms: unix_ms_now(),
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
                // A held lease whose holder on this host is gone had ended on its own.
                let was_live = r.holder.liveness() != Liveness::Dead;
                broken.push(status::broken(
                    slot,
                    Some(r.token),
                    Some(r.holder),
                    Some(r.acquired_unix_ms),
                    was_live,
                ));
            }
        }
        Ok(broken)
    }

    pub(crate) fn resize_key(&self, key: &Key, change: Resize) -> Result<KeyStatus, Error> {
        // Lowering never evicts: acquires count holders in every slot, also those at or
        // above the new limit, and grant only below it, so grants stop until they drain.
        self.root.set_limit(key, change)?;
        self.inspect_key(key)
    }
}
