//! The queue view: a key's state read in one transaction ([`View`]) and where a request
//! stands in the key's queue ([`Standing`]).
//!
//! Guarantees:
//! - Expiry depends only on the host's `CLOCK_MONOTONIC` and the kernel's boot id, never
//!   on the wall clock: a lease is stale iff it was granted in another boot or its expiry
//!   on that clock (`expires_boot_ns`: nanoseconds since boot) has passed.
//! - Fairness: a waiter holds a ticket (an ever-increasing number); a request is granted
//!   only while the free slots outnumber the live tickets ahead of it, so nobody barges
//!   past a queued waiter.

use std::time::Duration;

use baton_core::Key;
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension};

use crate::core::{corrupt, Fail, Inner};
use crate::layout::{
    int, int_in, int_value, text, HeldBackRow, LeaseRow, TicketRow, MAX_LOCK_DELAY_MS,
};
use crate::sys::Probe;

/// A key's state, read in one transaction.
pub(crate) struct View {
    pub(crate) lim: u32,
    /// `max(seq, every lease token)`: the last token granted.
    pub(crate) last_token: i64,
    pub(crate) leases: Vec<LeaseRow>,
    /// The key's lock-delay in ms, if it has one.
    pub(crate) delay_ms: Option<i64>,
    pub(crate) held_back: Vec<HeldBackRow>,
}

impl View {
    /// How long the lock-delay still holds `slot` back (`None`: it does not).
    pub(crate) fn held_back(&self, slot: u32, boot_id: &str, now: i64) -> Option<Duration> {
        self.held_back
            .iter()
            .find(|h| h.slot == slot && h.boot_id == boot_id && now < h.until_boot_ns)
            .map(|h| Duration::from_nanos(u64::try_from(h.until_boot_ns - now).unwrap_or(0)))
    }

    /// Slots below the limit that are free of live leases but held back, with how long.
    pub(crate) fn held_back_free(&self, boot_id: &str, now: i64) -> Vec<(u32, Duration)> {
        (0..self.lim)
            .filter(|s| {
                !self
                    .leases
                    .iter()
                    .any(|l| l.slot == *s && self.lease_live(l, boot_id, now))
            })
            .filter_map(|s| self.held_back(s, boot_id, now).map(|d| (s, d)))
            .collect()
    }

    pub(crate) fn lease_live(&self, l: &LeaseRow, boot_id: &str, now: i64) -> bool {
        l.boot_id == boot_id && now < l.expires_boot_ns
    }

    pub(crate) fn ticket_live(t: &TicketRow, boot_id: &str, now: i64) -> bool {
        t.boot_id == boot_id && now < t.expires_boot_ns
    }
}

/// Where a request stands in the key's queue.
pub(crate) struct Standing {
    /// Slots free for this request: `lim - live leases`, saturating.
    pub(crate) available: u32,
    /// My ticket is in the table.
    pub(crate) mine_present: bool,
    /// Live tickets ahead of me, counted only up to `available` (enough to decide).
    pub(crate) live_ahead: u32,
    /// Tickets ahead of me by TTL alone (for pacing the polls).
    pub(crate) queued_ahead: usize,
    /// Tickets found dead (expired, another boot, or their lock dropped).
    pub(crate) dead_tickets: Vec<i64>,
}

impl Standing {
    pub(crate) fn grantable(&self) -> bool {
        self.live_ahead < self.available
    }
}

/// Whose place a look at the queue is for, and how much it counts.
pub(crate) struct Look<'a> {
    pub(crate) key: &'a Key,
    /// The request's ticket, if it has one.
    pub(crate) mine: Option<i64>,
    /// This boot's `CLOCK_MONOTONIC`, in ns.
    pub(crate) now: i64,
    /// Whether to count every ticket ahead ([`Standing::queued_ahead`]).
    pub(crate) count_ahead: bool,
}

impl Inner {
    /// Reads `key`'s row, its leases, its lock-delay and its held-back slots, every value
    /// checked (`None`: no such key).
    pub(crate) fn read_view(&self, tx: &Connection, key: &Key) -> Result<Option<View>, Fail> {
        let k = key.as_str();
        let row = tx
            .prepare_cached("SELECT lim, seq FROM baton_keys WHERE key = ?1")?
            .query_row([k], |r| {
                Ok((Value::from(r.get_ref(0)?), Value::from(r.get_ref(1)?)))
            })
            .optional()?;
        let Some((lim, seq)) = row else {
            return Ok(None);
        };
        let in_key = |f: Fail| f.in_row(format_args!("baton_keys row of '{k}'"));
        let lim = int_value((&lim).into(), "lim")
            .and_then(|v| {
                u32::try_from(v)
                    .ok()
                    .filter(|v| *v >= 1)
                    .ok_or_else(|| corrupt(format!("column lim holds {v}, not a limit")))
            })
            .map_err(in_key)?;
        let seq = int_value((&seq).into(), "seq")
            .and_then(|v| {
                (v >= 0)
                    .then_some(v)
                    .ok_or_else(|| corrupt(format!("column seq holds {v}, not a token sequence")))
            })
            .map_err(in_key)?;
        let mut stmt = tx.prepare_cached(
            "SELECT slot, token, holder_id, boot_id, expires_boot_ns, holder_json, acquired_ms,
                    renewed_ms
             FROM baton_leases WHERE key = ?1 ORDER BY slot",
        )?;
        let mut rows = stmt.query([k])?;
        let mut leases = Vec::new();
        while let Some(r) = rows.next()? {
            let read = || -> Result<LeaseRow, Fail> {
                Ok(LeaseRow {
                    slot: int_in(r, 0, "slot", 0, i64::from(u32::MAX))? as u32,
                    token: int_in(r, 1, "token", 0, i64::MAX)?,
                    holder_id: text(r, 2, "holder_id")?,
                    boot_id: text(r, 3, "boot_id")?,
                    expires_boot_ns: int(r, 4, "expires_boot_ns")?,
                    holder_json: text(r, 5, "holder_json")?,
                    acquired_ms: int(r, 6, "acquired_ms")?,
                    renewed_ms: int(r, 7, "renewed_ms")?,
                })
            };
            leases.push(read().map_err(|f| f.in_row(format_args!("a baton_leases row of '{k}'")))?);
        }
        drop(rows);
        drop(stmt);
        let last_token = leases.iter().map(|l| l.token).fold(seq, i64::max);
        let delay_ms = tx
            .prepare_cached("SELECT delay_ms FROM baton_lock_delays WHERE key = ?1")?
            .query_row([k], |r| Ok(Value::from(r.get_ref(0)?)))
            .optional()?
            .map(|v| {
                int_value((&v).into(), "delay_ms").and_then(|ms| {
                    (1..=MAX_LOCK_DELAY_MS)
                        .contains(&ms)
                        .then_some(ms)
                        .ok_or_else(|| {
                            corrupt(format!(
                            "baton_lock_delays row of '{k}': delay_ms holds {ms}, not a lock-delay"
                        ))
                        })
                })
            })
            .transpose()?;
        let mut held_back = Vec::new();
        let mut stmt = tx.prepare_cached(
            "SELECT slot, token, how, boot_id, until_boot_ns FROM baton_held_back WHERE key = ?1",
        )?;
        let mut rows = stmt.query([k])?;
        while let Some(r) = rows.next()? {
            let read = || -> Result<HeldBackRow, Fail> {
                // The token is checked, not kept: status names the slot and its delay.
                int_in(r, 1, "token", 0, i64::MAX)?;
                let row = HeldBackRow {
                    slot: int_in(r, 0, "slot", 0, i64::from(u32::MAX))? as u32,
                    how: text(r, 2, "how")?,
                    boot_id: text(r, 3, "boot_id")?,
                    until_boot_ns: int(r, 4, "until_boot_ns")?,
                };
                if row.how != "expired" && row.how != "broken" {
                    return Err(corrupt(format!("column how holds {:?}", row.how)));
                }
                Ok(row)
            };
            held_back.push(
                read().map_err(|f| f.in_row(format_args!("a baton_held_back row of '{k}'")))?,
            );
        }
        Ok(Some(View {
            lim,
            last_token,
            leases,
            delay_ms,
            held_back,
        }))
    }

    /// Reads ticket rows of `key` below `below`, in queue order, handing each to `f`
    /// until it answers false.
    pub(crate) fn each_ticket(
        &self,
        tx: &Connection,
        key: &Key,
        below: i64,
        mut f: impl FnMut(TicketRow) -> bool,
    ) -> Result<(), Fail> {
        let k = key.as_str();
        let mut stmt = tx.prepare_cached(
            "SELECT ticket, boot_id, expires_boot_ns FROM baton_waiters
             WHERE key = ?1 AND ticket < ?2 ORDER BY ticket",
        )?;
        let mut rows = stmt.query(rusqlite::params![k, below])?;
        while let Some(r) = rows.next()? {
            let read = || -> Result<TicketRow, Fail> {
                Ok(TicketRow {
                    ticket: int(r, 0, "ticket")?,
                    boot_id: text(r, 1, "boot_id")?,
                    expires_boot_ns: int(r, 2, "expires_boot_ns")?,
                })
            };
            let t = read().map_err(|f| f.in_row(format_args!("a baton_waiters row of '{k}'")))?;
            if !f(t) {
                break;
            }
        }
        Ok(())
    }

    /// Where a request holding `mine` (or no ticket) stands. Only the tickets ahead that
    /// decide are read: none while every slot is held, else the first ones until
    /// `available` live ones are found, so a look costs O(limit), not O(queue). With
    /// `count_ahead`, also counts the tickets ahead (an index range count, for pacing).
    pub(crate) fn standing(
        &self,
        tx: &Connection,
        view: &View,
        look: Look<'_>,
        probe: &mut Probe,
    ) -> Result<Standing, Fail> {
        let Look {
            key,
            mine,
            now,
            count_ahead,
        } = look;
        let live_leases = view
            .leases
            .iter()
            .filter(|l| view.lease_live(l, &self.boot_id, now))
            .count();
        let held_back = view.held_back_free(&self.boot_id, now).len();
        let available = view
            .lim
            .saturating_sub(u32::try_from(live_leases + held_back).unwrap_or(u32::MAX));
        let mine_present = match mine {
            Some(m) => tx
                .prepare_cached("SELECT 1 FROM baton_waiters WHERE ticket = ?1 AND key = ?2")?
                .exists(rusqlite::params![m, key.as_str()])?,
            None => false,
        };
        let below = mine.filter(|_| mine_present).unwrap_or(i64::MAX);
        let mut dead_tickets = Vec::new();
        let mut live_ahead = 0u32;
        if available > 0 {
            self.each_ticket(tx, key, below, |t| {
                if View::ticket_live(&t, &self.boot_id, now) && probe.alive(t.ticket) {
                    live_ahead += 1;
                } else {
                    dead_tickets.push(t.ticket);
                }
                live_ahead < available
            })?;
        }
        let queued_ahead = if count_ahead {
            let n: i64 = tx
                .prepare_cached(
                    "SELECT count(*) FROM baton_waiters WHERE key = ?1 AND ticket < ?2",
                )?
                .query_row(rusqlite::params![key.as_str(), below], |r| r.get(0))?;
            usize::try_from(n).unwrap_or(0)
        } else {
            0
        };
        Ok(Standing {
            available,
            mine_present,
            live_ahead,
            queued_ahead,
            dead_tickets,
        })
    }
}
