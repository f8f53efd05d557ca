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

use baton_core::{
    format_duration, Error, ErrorKind, Holder, HolderId, Key, KeyStatus, Op, SlotState, SlotStatus,
    Token,
};
use rusqlite::TransactionBehavior;

use crate::core::{corrupt, Fail, Inner};
use crate::layout::{text, LeaseRow};
use crate::queue::View;
use crate::sys::{monotonic_ns, Probe};

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
            .ok_or_else(|| {
                self.err(
                    ErrorKind::NotFound,
                    op,
                    Some(key),
                    "no such key (a key is created by its first acquire)",
                )
            })?;
        let mut slots = Vec::with_capacity(view.lim as usize);
        for s in 0..view.lim {
            let mut st = match view.leases.iter().find(|l| l.slot == s) {
                Some(l) => self.slot_status(&view, l, now),
                None => SlotStatus::free(s),
            };
            let expired_here = view.leases.iter().find(|l| {
                l.slot == s && l.boot_id == self.boot_id && !view.lease_live(l, &self.boot_id, now)
            });
            if let (SlotState::Free, Some(l), Some(ms)) = (st.state, expired_here, view.delay_ms) {
                // Expired but not yet cleaned up: held back from its expiry on.
                let until = l
                    .expires_boot_ns
                    .saturating_add(ms.saturating_mul(1_000_000));
                if now < until {
                    st.note = Some(format!(
                        "held back: the lease with token {} expired; the lock-delay of {} holds the slot back for about another {}",
                        l.token,
                        format_duration(Duration::from_millis(ms as u64)),
                        format_duration(Duration::from_nanos((until - now) as u64))
                    ));
                }
            } else if st.state == SlotState::Free {
                if let (Some(left), Some(h), Some(ms)) = (
                    view.held_back(s, &self.boot_id, now),
                    view.held_back.iter().find(|h| h.slot == s),
                    view.delay_ms,
                ) {
                    st.note = Some(format!(
                        "held back: the lease with token {} {}; the lock-delay of {} holds the slot back for about another {}",
                        h.token,
                        if h.how == "broken" { "was broken" } else { "expired" },
                        format_duration(Duration::from_millis(ms as u64)),
                        format_duration(left)
                    ));
                }
            }
            slots.push(st);
        }
        for l in view.leases.iter().filter(|l| l.slot >= view.lim) {
            if view.lease_live(l, &self.boot_id, now) {
                let mut st = self.slot_status(&view, l, now);
                st.note = Some(format!(
                    "above the limit of {} (the key was resized down): held until released",
                    view.lim
                ));
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
        SlotStatus::of_record(
            l.slot,
            l.token as u64,
            &l.holder_id,
            &l.holder_json,
            u64::try_from(l.acquired_ms).ok(),
            expired,
        )
    }

    pub(crate) fn list_blocking(&self) -> Result<Vec<Key>, Error> {
        let names = self.with_tx(TransactionBehavior::Deferred, Op::List, None, |tx| {
            let mut stmt = tx.prepare_cached("SELECT key FROM baton_keys")?;
            let mut rows = stmt.query([])?;
            let mut names = Vec::new();
            while let Some(r) = rows.next()? {
                names.push(text(r, 0, "key").map_err(|f| match f {
                    Fail::Err(e) => corrupt(format!("a baton_keys row: {}", e.message())),
                    other => other,
                })?);
            }
            Ok(names)
        })?;
        let mut keys = names
            .into_iter()
            .map(|n| {
                Key::new(n.clone()).map_err(|_| {
                    self.err(
                        ErrorKind::Corrupt,
                        Op::List,
                        None,
                        format!("baton_keys holds '{n}', which is not a valid key"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        keys.sort();
        keys.dedup();
        Ok(keys)
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
                freed.push(SlotStatus {
                    slot: l.slot,
                    state: SlotState::Free,
                    token: Some(Token(l.token as u64)),
                    holder: Holder::from_json(&l.holder_json),
                    since_unix_ms: u64::try_from(l.acquired_ms).ok(),
                    renewed_unix_ms: None,
                    expires_unix_ms: None,
                    note: Some(if live {
                        "freed by break; its holder's next renew answers lost".into()
                    } else {
                        "had already expired; removed by break".into()
                    }),
                });
            }
            Ok(Some(freed))
        })?;
        freed.ok_or_else(|| self.err(ErrorKind::NotFound, op, Some(key), "no such key"))
    }

    pub(crate) fn resize_blocking(&self, key: &Key, limit: u32) -> Result<(), Error> {
        let op = Op::Resize;
        if limit == 0 {
            return Err(self.err(
                ErrorKind::InvalidInput,
                op,
                Some(key),
                "the limit must be at least 1 slot",
            ));
        }
        let n = self.with_tx(TransactionBehavior::Immediate, op, Some(key), |tx| {
            Ok(tx
                .prepare_cached("UPDATE baton_keys SET lim = ?2 WHERE key = ?1")?
                .execute(rusqlite::params![key.as_str(), limit])?)
        })?;
        if n == 0 {
            return Err(self.err(
                ErrorKind::NotFound,
                op,
                Some(key),
                "no such key (a key is created by its first acquire, with its limit)",
            ));
        }
        Ok(())
    }
}
