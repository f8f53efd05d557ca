//! Administration: inspect (a key's status), list, break and resize.
//!
//! Guarantees:
//! - Inspect reads one snapshot (one read transaction) and writes nothing; it counts
//!   only live waiters (ticket not expired, its lock still held).
//! - Break deletes the leases in one write transaction and records each as lost (broken
//!   if it was live, else expired), so a lock-delay holds its slot back as after any
//!   other loss.
//! - Resize changes only the limit: leases above a lowered limit stay held until
//!   released (inspect shows them).

use std::time::Duration;

use baton_core::kit::time::{monotonic_ns, unix_ms_now};
use baton_core::kit::{errors, status};
use baton_core::{
    Error, Holder, HolderId, Key, KeyStatus, Op, Resize, SlotState, SlotStatus, Token,
};
use rusqlite::TransactionBehavior;

use crate::core::{Fail, Inner};
use crate::layout::{self, int_in, text, LeaseRow};
use crate::queue::View;
use crate::sys::Probe;

impl Inner {
    pub(crate) fn inspect_blocking(&self, key: &Key) -> Result<KeyStatus, Error> {
        let op = Op::Inspect;
        let mut probe = Probe::new(&self.lock_path);
        let now = monotonic_ns();
        let (view, waiters) = self
            .with_tx(TransactionBehavior::Deferred, op, Some(key), |tx| {
                let Some(view) = self.read_view(tx, key)? else {
                    return Ok(None);
                };
                let mut waiters = 0usize;
                self.each_ticket(tx, key, i64::MAX, |t| {
                    if View::ticket_live(&t, &self.boot_id, now) && probe.alive(t.ticket) {
                        waiters += 1;
                    }
                    true
                })?;
                Ok(Some((view, waiters)))
            })?
            .ok_or_else(|| self.ctx(errors::no_such_key(), op, Some(key)))?;
        let mut slots = Vec::with_capacity(view.lim as usize);
        for s in 0..view.lim {
            let mut st = match view.leases.iter().find(|l| l.slot == s) {
                Some(l) => self.slot_status(&view, l, now),
                None => SlotStatus::free(s),
            };
            let expired_here = view.leases.iter().find(|l| {
                l.slot == s && l.boot_id == self.boot_id && !view.lease_live(l, &self.boot_id, now)
            });
            let delay = view.delay_ms.map(|ms| Duration::from_millis(ms as u64));
            if let (SlotState::Free, Some(l), Some(delay)) = (st.state, expired_here, delay) {
                // Expired but not yet cleaned up: held back from its expiry on.
                let until = l
                    .expires_boot_ns
                    .saturating_add(i64::try_from(delay.as_nanos()).unwrap_or(i64::MAX));
                if now < until {
                    let left = Duration::from_nanos((until - now) as u64);
                    st.note = Some(status::held_back_note(delay, Some(left)));
                }
            } else if st.state == SlotState::Free {
                if let (Some(left), Some(delay)) = (view.held_back(s, &self.boot_id, now), delay) {
                    st.note = Some(status::held_back_note(delay, Some(left)));
                }
            }
            slots.push(st);
        }
        for l in view.leases.iter().filter(|l| l.slot >= view.lim) {
            if view.lease_live(l, &self.boot_id, now) {
                let mut st = self.slot_status(&view, l, now);
                st.note = Some(status::above_limit_note(view.lim));
                slots.push(st);
            }
        }
        Ok(KeyStatus {
            key: key.clone(),
            limit: view.lim,
            slots,
            waiters: Some(u32::try_from(waiters).unwrap_or(u32::MAX)),
            last_token: Some(Token(view.last_token as u64)),
            lock_delay_ms: view.delay_ms.map(|ms| ms as u64),
        })
    }

    fn slot_status(&self, view: &View, l: &LeaseRow, now: i64) -> SlotStatus {
        let expired = if view.lease_live(l, &self.boot_id, now) {
            None
        } else if l.boot_id != self.boot_id {
            Some("was granted before the machine rebooted")
        } else {
            Some("expired without being renewed or released")
        };
        let mut st = SlotStatus::of_record(
            l.slot,
            l.token as u64,
            &l.holder_id,
            &l.holder_json,
            u64::try_from(l.acquired_ms).ok(),
            expired,
        );
        if st.state == SlotState::Held {
            // For display only: the heartbeat as recorded, and the expiry on this boot's
            // monotonic clock carried over to the wall clock now.
            st.renewed_unix_ms = u64::try_from(l.renewed_ms).ok();
            let left_ms = u64::try_from(l.expires_boot_ns.saturating_sub(now) / 1_000_000);
            st.expires_unix_ms = left_ms.ok().map(|ms| unix_ms_now().saturating_add(ms));
        }
        st
    }

    pub(crate) fn list_blocking(&self) -> Result<Vec<Key>, Error> {
        let names = self.with_tx(TransactionBehavior::Deferred, Op::List, None, |tx| {
            let mut stmt = tx.prepare_cached("SELECT key FROM baton_keys")?;
            let mut rows = stmt.query([])?;
            let mut names = Vec::new();
            while let Some(r) = rows.next()? {
                names.push(text(r, 0, "key").map_err(|f| f.in_row("a baton_keys row"))?);
            }
            Ok(names)
        })?;
        let names = names.iter().map(|n| (n.as_str(), "baton_keys"));
        status::keys_from_names(names).map_err(|e| self.ctx(e, Op::List, None))
    }

    pub(crate) fn break_blocking(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let op = Op::Break;
        let want = holder.map(|h| h.to_string());
        let freed = self.with_tx(TransactionBehavior::Immediate, op, Some(key), |tx| {
            let Some(view) = self.read_view(tx, key)? else {
                return Ok(None);
            };
            let now = monotonic_ns();
            let mut freed = Vec::new();
            for l in &view.leases {
                if want.as_ref().is_some_and(|w| *w != l.holder_id) {
                    continue;
                }
                tx.prepare_cached(
                    "DELETE FROM baton_leases WHERE key = ?1 AND slot = ?2 AND token = ?3",
                )?
                .execute(rusqlite::params![key.as_str(), l.slot, l.token])?;
                let live = view.lease_live(l, &self.boot_id, now);
                if live {
                    self.record_loss(tx, key.as_str(), &view, l, "broken", now)?;
                } else {
                    self.record_loss(tx, key.as_str(), &view, l, "expired", l.expires_boot_ns)?;
                }
                freed.push(status::broken(
                    l.slot,
                    Some(Token(l.token as u64)),
                    Holder::from_json(&l.holder_json),
                    u64::try_from(l.acquired_ms).ok(),
                    live,
                ));
            }
            Ok(Some(freed))
        })?;
        freed.ok_or_else(|| self.ctx(errors::no_such_key(), op, Some(key)))
    }

    /// Reads the limit and writes the changed one in one IMMEDIATE transaction, so a
    /// relative change counts from the limit it replaces.
    pub(crate) fn resize_blocking(&self, key: &Key, change: Resize) -> Result<(), Error> {
        let op = Op::Resize;
        let found = self.with_tx(TransactionBehavior::Immediate, op, Some(key), |tx| {
            let current = {
                let mut q = tx.prepare_cached("SELECT lim FROM baton_keys WHERE key = ?1")?;
                let mut rows = q.query([key.as_str()])?;
                match rows.next()? {
                    None => return Ok(false),
                    Some(r) => int_in(r, 0, "lim", 1, i64::from(u32::MAX))? as u32,
                }
            };
            let limit = change.apply(current, u32::MAX).map_err(Fail::Err)?;
            tx.prepare_cached("UPDATE baton_keys SET lim = ?2 WHERE key = ?1")?
                .execute(rusqlite::params![key.as_str(), limit])?;
            Ok(true)
        })?;
        if !found {
            return Err(self.ctx(errors::no_such_key_to_resize(), op, Some(key)));
        }
        Ok(())
    }

    /// In one IMMEDIATE transaction: refuses while a lease is live, a lost lease's slot is
    /// held back or a waiter's process is alive; otherwise keeps the key's last token in
    /// `baton_retired_keys` (so a key made again goes on from it) and removes its rows.
    pub(crate) fn delete_blocking(&self, key: &Key) -> Result<(), Error> {
        let op = Op::Delete;
        let mut probe = Probe::new(&self.lock_path);
        let now = monotonic_ns();
        let boot = self.boot_id.as_str();
        let outcome = self.with_tx(TransactionBehavior::Immediate, op, Some(key), |tx| {
            let Some(view) = self.read_view(tx, key)? else {
                return Ok(None);
            };
            let held = view
                .leases
                .iter()
                .filter(|l| view.lease_live(l, boot, now))
                .count();
            let delay_ns = view.delay_ms.unwrap_or(0).saturating_mul(1_000_000);
            let expired_held_back = view
                .leases
                .iter()
                .filter(|l| l.boot_id == boot && !view.lease_live(l, boot, now))
                .filter(|l| now < l.expires_boot_ns.saturating_add(delay_ns))
                .count();
            let held_back = expired_held_back
                + (0..view.lim)
                    .filter(|s| view.held_back(*s, boot, now).is_some())
                    .count();
            let mut waiting = 0u32;
            self.each_ticket(tx, key, i64::MAX, |t| {
                if View::ticket_live(&t, boot, now) && probe.alive(t.ticket) {
                    waiting += 1;
                }
                true
            })?;
            if held + held_back > 0 || waiting > 0 {
                return Ok(Some(Err(errors::in_use(held, Some(waiting), held_back))));
            }
            layout::require_retired_schema(tx)?;
            tx.prepare_cached(
                "INSERT INTO baton_retired_keys(key, seq) VALUES (?1, ?2) \
                 ON CONFLICT(key) DO UPDATE SET seq = max(seq, excluded.seq)",
            )?
            .execute(rusqlite::params![key.as_str(), view.last_token])?;
            for table in [
                "baton_leases",
                "baton_waiters",
                "baton_lock_delays",
                "baton_held_back",
                "baton_keys",
            ] {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE key = ?1"))?
                    .execute([key.as_str()])?;
            }
            Ok(Some(Ok(())))
        })?;
        match outcome {
            None => Err(self.ctx(errors::no_such_key(), op, Some(key))),
            Some(r) => r.map_err(|e| self.ctx(e, op, Some(key))),
        }
    }
}
