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

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use baton_core::kit::status;
use baton_core::kit::time::unix_ms_now;
use baton_core::{
    Error, Holder, HolderId, Key, KeyStatus, Liveness, Op, Resize, SlotState, SlotStatus, Token,
};

use crate::fs;
use crate::lease::LeaseStore;
use crate::lease_layout::{at_maximum, read_record, seen_file, LeaseRecord, Listing, State};
use crate::root::exited_slot;

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
            Some(ns) => Duration::from_nanos(crate::lease_layout::now_ns().saturating_sub(ns)),
            None => Duration::from_millis(unix_ms_now().saturating_sub(r.renewed_unix_ms)),
        };
        match delay.checked_sub(elapsed).filter(|l| !l.is_zero()) {
            Some(left) => status::held_back_note(delay, Some(left)),
            None => format!(
                "free: the lease with token {} {how}; its lock-delay of {} is over",
                r.token,
                baton_core::format_duration(delay)
            ),
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
