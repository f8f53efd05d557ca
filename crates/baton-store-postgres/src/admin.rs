//! Looking at and steering a key from outside its holders: `status` (the key's row, its
//! lease rows and its live waiters), `list`, `break`, and `resize`.
//!
//! Guarantees: nothing here decides that a lease is stale: what `status` says about
//! staleness comes from the server's clock and this host's process table, for display
//! only. A break frees the key's lease rows (or, with a lock-delay, holds them back) and
//! wakes its waiters; their holders' next renew answers `Lost`. A resize changes only the
//! limit: slots above a lowered limit stay held until released.

use std::time::Duration;

use baton_core::kit::errors::{
    check_limit, in_use, kept_changing, no_such_key, no_such_key_to_resize, RESIZE_TRIES,
};
use baton_core::kit::status::{above_limit_note, broken, held_back_note, keys_from_names};
use baton_core::{
    Error, Holder, HolderId, Key, KeyStatus, Liveness, Resize, SlotState, SlotStatus, Token,
};
use tokio_postgres::types::Type;

use crate::core::{Fail, Inner};
use crate::layout::{col, key_row, lease_row, LeaseRow, MAX_LIMIT};

impl Inner {
    pub(crate) async fn inspect_step(&self, key: &Key) -> Result<KeyStatus, Error> {
        let k = key.as_str().to_owned();
        let magic = self.magic;
        let found = self
            .with_conn(|inner, conn| {
                let k = k.clone();
                Box::pin(async move {
                    let rows = inner
                        .query(conn, &inner.sql.key_row, &[(&k, Type::TEXT)])
                        .await?;
                    let Some(row) = rows.first() else {
                        return Ok(None);
                    };
                    let (lim, seq, delay) = key_row(row, &k)?;
                    let leases = inner
                        .query(conn, &inner.sql.lease_rows, &[(&k, Type::TEXT)])
                        .await?;
                    let mut out = Vec::new();
                    for r in &leases {
                        out.push(lease_row(r, &k)?);
                    }
                    let w = inner
                        .query(
                            conn,
                            &inner.sql.live_waiters,
                            &[(&k, Type::TEXT), (&magic, Type::INT4)],
                        )
                        .await?;
                    let waiters = match w.first() {
                        Some(r) => col::<i64>(r, 0)?,
                        None => 0,
                    };
                    Ok(Some((lim, seq, delay, out, waiters)))
                })
            })
            .await
            .map_err(|f| self.map(f))?;
        let Some((lim, seq, delay, leases, waiters)) = found else {
            return Err(no_such_key());
        };
        let mut slots = Vec::with_capacity(lim as usize);
        for s in 0..lim {
            slots.push(match leases.iter().find(|l| l.slot == s) {
                Some(l) => slot_status(l, delay, self.pid_ns.as_deref()),
                None => SlotStatus::free(s),
            });
        }
        for l in leases.iter().filter(|l| l.slot >= lim && !l.lost) {
            let mut st = slot_status(l, delay, self.pid_ns.as_deref());
            st.note = Some(above_limit_note(lim));
            slots.push(st);
        }
        let last = leases.iter().map(|l| l.token).fold(seq, u64::max);
        Ok(KeyStatus {
            key: key.clone(),
            limit: lim,
            slots,
            waiters: Some(u32::try_from(waiters).unwrap_or(u32::MAX)),
            last_token: Some(Token(last)),
            lock_delay_ms: (delay > 0).then_some(delay),
        })
    }

    pub(crate) async fn list_step(&self) -> Result<Vec<Key>, Error> {
        let names = self
            .with_conn(|inner, conn| {
                Box::pin(async move {
                    let rows = inner.query(conn, &inner.sql.list, &[]).await?;
                    let mut names = Vec::new();
                    for r in &rows {
                        names.push(col::<String>(r, 0)?);
                    }
                    Ok(names)
                })
            })
            .await
            .map_err(|f| self.map(f))?;
        let entry = format!("the keys table of schema \"{}\"", self.cfg.schema);
        keys_from_names(names.iter().map(|n| (n.as_str(), entry.as_str())))
    }

    pub(crate) async fn break_step(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let k = key.as_str().to_owned();
        let want = holder.map(|h| h.to_string());
        let freed = self
            .with_conn(|inner, conn| {
                let (k, want) = (k.clone(), want.clone());
                Box::pin(async move {
                    let rows = inner
                        .query(conn, &inner.sql.key_row, &[(&k, Type::TEXT)])
                        .await?;
                    let Some(row) = rows.first() else {
                        return Ok(None);
                    };
                    key_row(row, &k)?;
                    let rows = inner
                        .query(
                            conn,
                            &inner.sql.break_leases,
                            &[(&k, Type::TEXT), (&want, Type::TEXT)],
                        )
                        .await?;
                    let mut freed = Vec::new();
                    for r in &rows {
                        let slot: Option<i32> = col(r, 0)?;
                        let token: Option<i64> = col(r, 1)?;
                        let json: Option<String> = col(r, 2)?;
                        let since: Option<f64> = col(r, 3)?;
                        let held_back: Option<bool> = col(r, 4)?;
                        let mut st = broken(
                            slot.and_then(|s| u32::try_from(s).ok()).unwrap_or(u32::MAX),
                            token.and_then(|t| u64::try_from(t).ok()).map(Token),
                            json.and_then(|j| Holder::from_json(&j)),
                            since.filter(|s| *s >= 0.0).map(|s| s as u64),
                            true,
                        );
                        if held_back == Some(true) {
                            st.note = Some(
                                "broken; held back by the key's lock-delay before it is \
                                 granted again; its holder's next renew answers lost"
                                    .into(),
                            );
                        }
                        freed.push(st);
                    }
                    if !freed.is_empty() {
                        inner
                            .query(
                                conn,
                                &inner.sql.notify,
                                &[(&inner.channel.as_str(), Type::TEXT), (&k, Type::TEXT)],
                            )
                            .await?;
                    }
                    Ok(Some(freed))
                })
            })
            .await
            .map_err(|f| self.map(f))?;
        freed.ok_or_else(no_such_key)
    }

    /// Reads the limit and writes the changed one only if it is still the limit read (a
    /// compare-and-set, retried on conflict), so a relative change counts from the limit
    /// it replaces.
    pub(crate) async fn resize_step(&self, key: &Key, change: Resize) -> Result<(), Error> {
        if let Resize::To(limit) = change {
            check_limit(limit, MAX_LIMIT)?;
        }
        let k = key.as_str().to_owned();
        for _ in 0..RESIZE_TRIES {
            let done = self
                .with_conn(|inner, conn| {
                    let k = k.clone();
                    Box::pin(async move {
                        let rows = inner
                            .query(conn, &inner.sql.key_row, &[(&k, Type::TEXT)])
                            .await?;
                        let Some(row) = rows.first() else {
                            return Err(Fail::Err(no_such_key_to_resize()));
                        };
                        let (current, _, _) = key_row(row, &k)?;
                        let limit = change.apply(current, MAX_LIMIT).map_err(Fail::Err)?;
                        // MAX_LIMIT fits an INT4.
                        let (old, new) = (
                            i32::try_from(current).unwrap_or(i32::MAX),
                            i32::try_from(limit).unwrap_or(i32::MAX),
                        );
                        let rows = inner
                            .query(
                                conn,
                                &format!(
                                    "WITH u AS ({} RETURNING 1) SELECT count(*) FROM u",
                                    inner.sql.resize
                                ),
                                &[(&k, Type::TEXT), (&new, Type::INT4), (&old, Type::INT4)],
                            )
                            .await?;
                        let n = match rows.first() {
                            Some(r) => col::<i64>(r, 0)?,
                            None => 0,
                        };
                        if n > 0 {
                            // A raised limit may let waiters in.
                            inner
                                .query(
                                    conn,
                                    &inner.sql.notify,
                                    &[(&inner.channel.as_str(), Type::TEXT), (&k, Type::TEXT)],
                                )
                                .await?;
                        }
                        Ok(n > 0)
                    })
                })
                .await
                .map_err(|f| self.map(f))?;
            if done {
                return Ok(());
            }
        }
        Err(kept_changing("resize it"))
    }

    /// One server-side function (`delete_key`) that takes the key row's lock, refuses
    /// while a lease is held or held back or a live waiter queues, and otherwise keeps the
    /// key's last token as its floor and removes its rows.
    pub(crate) async fn delete_step(&self, key: &Key) -> Result<(), Error> {
        let k = key.as_str().to_owned();
        let magic = self.magic;
        let (found, held, waiting, back) = self
            .with_conn(|inner, conn| {
                let k = k.clone();
                Box::pin(async move {
                    let rows = inner
                        .query(
                            conn,
                            &inner.sql.delete,
                            &[(&k, Type::TEXT), (&magic, Type::INT4)],
                        )
                        .await?;
                    let r = rows
                        .first()
                        .ok_or_else(|| Fail::Err(no_answer("delete_key")))?;
                    Ok((
                        col::<bool>(r, 0)?,
                        col::<i64>(r, 1)?,
                        col::<i64>(r, 2)?,
                        col::<i64>(r, 3)?,
                    ))
                })
            })
            .await
            .map_err(|f| self.map(f))?;
        let n = |v: i64| usize::try_from(v).unwrap_or(0);
        match (found, held + waiting + back) {
            (false, _) => Err(no_such_key()),
            (true, 0) => Ok(()),
            (true, _) => Err(in_use(
                n(held),
                Some(u32::try_from(waiting).unwrap_or(u32::MAX)),
                n(back),
            )),
        }
    }
}

/// A slot as `status` shows it. What it says about staleness comes from the server's
/// clock and this host's process table, for display: only a waiter's own observations
/// (or a dead process on its host) take a lease over.
fn slot_status(l: &LeaseRow, delay_ms: u64, pid_ns: Option<&str>) -> SlotStatus {
    if l.lost {
        // How long it stays held back is up to the waiters' own observations, which
        // status cannot see.
        let mut st = SlotStatus::free(l.slot);
        st.note = Some(held_back_note(Duration::from_millis(delay_ms), None));
        return st;
    }
    let dead = pid_ns.is_some()
        && l.pid_ns.as_deref() == pid_ns
        && Holder::from_json(&l.holder_json).is_some_and(|h| h.liveness() == Liveness::Dead);
    let mut st = SlotStatus::of_record(
        l.slot,
        l.token,
        &l.holder_id,
        &l.holder_json,
        l.since_ms,
        dead.then_some("has a holder whose process on this host is gone"),
    );
    if st.state == SlotState::Held {
        st.renewed_unix_ms = l.renewed_ms;
        st.expires_unix_ms = l.expires_ms;
        if l.overdue && st.note.is_none() {
            st.note = Some(
                "not renewed within its TTL by the server's clock: its holder may be dead; a \
                 waiter takes it over once it has seen no renewal for the TTL"
                    .into(),
            );
        }
    }
    st
}

/// `Unavailable`: a function of baton's answered no row.
fn no_answer(function: &str) -> Error {
    Error::new(
        baton_core::ErrorKind::Unavailable,
        format!("the server function {function} answered no row"),
    )
}
