//! A granted lease: release, renew, and the give-back of a grant that nobody received.
//!
//! Guarantees:
//! - Release and renew touch only the row of this lease (key, slot, token and holder):
//!   a lease whose slot was since granted to another changes nothing.
//! - A release of a lease that had already expired answers `NotHeld` and counts as a
//!   loss, so the key's lock-delay still holds its slot back from the expiry on; a renew
//!   of an expired lease answers `Lost`.

use std::time::Instant;

use baton_core::kit::time::{monotonic_ns, unix_ms_now, DEFAULT_TTL};
use baton_core::{Error, ErrorKind, Lease, Op, Released};
use rusqlite::types::Value;
use rusqlite::{OptionalExtension, TransactionBehavior};

use crate::core::{retry, Inner, OP_BUSY_BOUND};
use crate::layout::{token_i64, ttl_nanos, LeaseRow};

impl Inner {
    pub(crate) fn release_blocking(
        &self,
        lease: &Lease,
        deadline: Option<Instant>,
    ) -> Result<Released, Error> {
        let op = Op::Release;
        let key = &lease.key;
        let holder_id = lease.holder.id.to_string();
        let mut conn = self
            .conn(deadline)
            .map_err(|s| self.stopped(s, op, Some(key)))?;
        let result = retry(deadline, None, || {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = monotonic_ns();
            let row = tx
                .prepare_cached(
                    "DELETE FROM baton_leases
                     WHERE key = ?1 AND slot = ?2 AND token = ?3 AND holder_id = ?4
                     RETURNING boot_id, expires_boot_ns",
                )?
                .query_row(
                    rusqlite::params![key.as_str(), lease.slot, token_i64(lease.token)?, holder_id],
                    |r| Ok((Value::from(r.get_ref(0)?), Value::from(r.get_ref(1)?))),
                )
                .optional()?;
            // A row that was ours but had expired is cleaned up, and answers NotHeld: the
            // holder had lost it (its keeper said so), even if nobody took the slot yet.
            let released = match &row {
                Some((Value::Text(b), Value::Integer(e))) if *b == self.boot_id && now < *e => {
                    Released::Released
                }
                _ => Released::NotHeld,
            };
            if let (Released::NotHeld, Some((Value::Text(b), Value::Integer(e)))) = (released, &row)
            {
                // A late release of an expired lease is a loss, not a release: its slot
                // stays held back for the key's lock-delay after the expiry.
                if let Some(view) = self.read_view(&tx, key)? {
                    let lost = LeaseRow {
                        slot: lease.slot,
                        token: token_i64(lease.token)?,
                        holder_id: holder_id.clone(),
                        boot_id: b.clone(),
                        expires_boot_ns: *e,
                        holder_json: String::new(),
                        acquired_ms: 0,
                        renewed_ms: 0,
                    };
                    self.record_loss(&tx, key.as_str(), &view, &lost, "expired", *e)?;
                }
            }
            tx.commit()?;
            Ok(released)
        });
        self.put(conn);
        result.map_err(|s| self.stopped(s, op, Some(key)))
    }

    pub(crate) fn renew_blocking(&self, lease: &Lease) -> Result<Lease, Error> {
        let ttl = lease.ttl.unwrap_or(DEFAULT_TTL);
        let ttl_ns =
            ttl_nanos(ttl, &lease.key).map_err(|e| self.ctx(e, Op::Renew, Some(&lease.key)))?;
        let holder_id = lease.holder.id.to_string();
        let (n, sent_at) = self.with_tx(
            TransactionBehavior::Immediate,
            Op::Renew,
            Some(&lease.key),
            |tx| {
                let sent_at = Instant::now();
                let now = monotonic_ns();
                let wall = i64::try_from(unix_ms_now()).unwrap_or(i64::MAX);
                Ok((
                    tx.prepare_cached(
                        "UPDATE baton_leases
                         SET expires_boot_ns = ?1, renewed_ms = ?2, ttl_ms = ?3
                         WHERE key = ?4 AND slot = ?5 AND token = ?6 AND holder_id = ?7
                           AND boot_id = ?8 AND expires_boot_ns > ?9",
                    )?
                    .execute(rusqlite::params![
                        now.saturating_add(ttl_ns),
                        wall,
                        i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
                        lease.key.as_str(),
                        lease.slot,
                        token_i64(lease.token)?,
                        holder_id,
                        self.boot_id,
                        now
                    ])?,
                    sent_at,
                ))
            },
        )?;
        if n == 1 {
            let mut renewed = lease.clone();
            renewed.ttl = Some(ttl);
            renewed.sent_at = Some(sent_at);
            Ok(renewed)
        } else {
            Err(self.err(
                ErrorKind::Lost,
                Op::Renew,
                Some(&lease.key),
                format!(
                    "the lease (slot {}, token {}) expired or was taken over",
                    lease.slot, lease.token
                ),
            ))
        }
    }

    /// Gives back a lease that was granted but never delivered (its acquire's future was
    /// dropped): a release bounded like any other, whose answer nobody waits for.
    pub(crate) fn give_back(&self, lease: &Lease) {
        let _ = self.release_blocking(lease, Instant::now().checked_add(OP_BUSY_BOUND));
    }
}
