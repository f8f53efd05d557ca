//! The grant: one acquire attempt in one write transaction, the wait between attempts,
//! and the lock-delay hold-back of a slot whose lease was lost.
//!
//! Guarantees:
//! - Limit: every grant happens in a `BEGIN IMMEDIATE` transaction (one writer at a time)
//!   that counts the key's live leases and grants only if fewer than the limit are live.
//!   Stale leases are deleted in the same transaction as the grant that reuses their
//!   slot, so two processes that both judge a lease stale cannot both win.
//! - Tokens: `seq` in the key's row, raised in the granting transaction to
//!   `max(seq, every token in the table) + 1`; it is in the file, so it survives restarts.
//! - Lock-delay (keys created with one): when a lease is lost rather than released (it
//!   expired, or was broken), the transaction that finds it so writes a `baton_held_back`
//!   row for its slot: held back until its expiry (or, for a break, the break) plus the
//!   delay, on the same `CLOCK_MONOTONIC` as expiry, so no wall-clock step shortens it. No
//!   grant uses a slot with such a row of this boot before then. A row of an earlier boot
//!   is void: the reboot ended every holder (the store is local to one host).
//! - No residue: a waiter that gives up deletes its ticket before the acquire returns
//!   (timeout, error) or right after (a dropped future); a waiter that dies leaves a
//!   ticket whose lock the kernel dropped, which the next look at the queue ignores and
//!   deletes; a waiter that is stopped (SIGSTOP) loses its ticket after [`TICKET_TTL`].

use std::time::{Duration, Instant};

use baton_core::kit::errors;
use baton_core::kit::runtime::CancelFlag;
use baton_core::kit::time::{monotonic_ns, next_wake, unix_ms_now, Refresh, TICKET_TTL};
use baton_core::{format_duration, AcquireRequest, Error, ErrorKind, Key, Lease, Op, Token, Wait};
use rusqlite::{Connection, TransactionBehavior};

use crate::core::{self, corrupt, retry, Fail, Inner, Stop};
use crate::layout::{self, Encoded, HeldBackRow, LeaseRow};
use crate::queue::{Look, View};
use crate::sys::{Probe, TicketLock};

/// How long a no-wait acquire keeps retrying a database that other connections keep
/// busy (a busy database is not a busy lock).
const NOWAIT_BUSY_BOUND: Duration = Duration::from_secs(10);

/// How long an abandoned wait keeps trying to delete its ticket (after that the ticket's
/// lock, dropped with the wait, marks it dead anyway).
const CLEANUP_BUSY_BOUND: Duration = Duration::from_secs(10);

enum Attempt {
    Granted(Box<Lease>),
    /// No slot for this request; it is queued under this ticket (none for no-wait).
    Queued {
        queued_ahead: usize,
        /// How long until the first live lease of the key expires: a lease that runs out
        /// writes nothing, so a waiter must look again then by itself.
        next_expiry: Option<Duration>,
    },
    Busy {
        lim: u32,
        held: usize,
        /// The shortest lock-delay left on a slot held back, if any is, and the delay.
        held_back: Option<(Duration, Duration)>,
    },
}

/// One acquire's wait: the request and its bounds, and its place in the queue, carried
/// from attempt to attempt.
struct Waiting<'a> {
    req: &'a AcquireRequest,
    enc: &'a Encoded,
    /// Whether the request queues when no slot is free (false for no-wait).
    queue: bool,
    /// When the wait gives up (`None`: never, or no wait).
    deadline: Option<Instant>,
    /// Until when a busy database is retried.
    busy_deadline: Option<Instant>,
    /// Set when the acquire's future is dropped.
    cancel: &'a CancelFlag,
    /// The request's ticket in the queue, once it has one.
    ticket: Option<i64>,
    /// The ticket's proof of life, held as long as the ticket.
    lock: Option<TicketLock>,
    probe: Probe,
}

impl Inner {
    /// Records in `tx` that lease `l` of `view`'s key was lost (`how`: expired or broken)
    /// at `lost_ns` on this boot's monotonic clock, when the key has a lock-delay: its slot
    /// is held back until `lost_ns` + the delay. A lease of an earlier boot is not held
    /// back (the reboot ended its holder). Returns the row written, if any.
    pub(crate) fn record_loss(
        &self,
        tx: &Connection,
        key: &str,
        view: &View,
        l: &LeaseRow,
        how: &str,
        lost_ns: i64,
    ) -> Result<Option<HeldBackRow>, Fail> {
        let Some(ms) = view.delay_ms else {
            return Ok(None);
        };
        if l.boot_id != self.boot_id {
            return Ok(None);
        }
        let until = lost_ns.saturating_add(ms.saturating_mul(1_000_000));
        let wall = i64::try_from(unix_ms_now()).unwrap_or(i64::MAX);
        // A later loss of the same slot only ever pushes the end further out.
        tx.prepare_cached(
            "INSERT INTO baton_held_back(key, slot, token, how, lost_ms, boot_id, until_boot_ns)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT(key, slot) DO UPDATE SET token = excluded.token, how = excluded.how,
                 lost_ms = excluded.lost_ms, boot_id = excluded.boot_id,
                 until_boot_ns = excluded.until_boot_ns
             WHERE baton_held_back.boot_id != excluded.boot_id
                OR baton_held_back.until_boot_ns < excluded.until_boot_ns",
        )?
        .execute(rusqlite::params![
            key,
            l.slot,
            l.token,
            how,
            wall,
            self.boot_id,
            until
        ])?;
        Ok(Some(HeldBackRow {
            slot: l.slot,
            how: how.to_owned(),
            boot_id: self.boot_id.clone(),
            until_boot_ns: until,
        }))
    }

    /// One acquire attempt in one write transaction. `w.ticket` and `w.lock` are the
    /// request's place in the queue, updated here.
    fn attempt(
        &self,
        conn: &mut Connection,
        w: &mut Waiting<'_>,
        first: bool,
    ) -> Result<Attempt, Fail> {
        let (req, enc, queue) = (w.req, w.enc, w.queue);
        let (ticket, lock, probe) = (&mut w.ticket, &mut w.lock, &mut w.probe);
        let k = req.key.as_str();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Taken before the clock the expiry counts from: the keeper's first deadline.
        let sent_at = Instant::now();
        let now = monotonic_ns();
        let created = tx
            .prepare_cached(
                "INSERT INTO baton_keys(key, lim, seq) VALUES (?1, ?2, \
                 coalesce((SELECT seq FROM baton_retired_keys WHERE key = ?1), 0)) \
                 ON CONFLICT(key) DO NOTHING",
            )?
            .execute(rusqlite::params![k, req.limit])?;
        if let (1, Some(ms)) = (created, enc.lock_delay_ms) {
            // In the transaction that creates the key: no one sees it without its delay.
            layout::require_lock_delay_schema(&tx)?;
            tx.prepare_cached("INSERT INTO baton_lock_delays(key, delay_ms) VALUES (?1, ?2)")?
                .execute(rusqlite::params![k, ms])?;
        }
        let view = self
            .read_view(&tx, &req.key)?
            .ok_or_else(|| corrupt("the key's row vanished inside a transaction"))?;
        if first && view.lim != req.limit {
            return Err(Fail::Err(errors::limit_mismatch(view.lim, req.limit)));
        }
        let mut view = view;
        let mut losses = Vec::new();
        for l in &view.leases {
            if !view.lease_live(l, &self.boot_id, now) {
                tx.prepare_cached(
                    "DELETE FROM baton_leases WHERE key = ?1 AND slot = ?2 AND token = ?3",
                )?
                .execute(rusqlite::params![k, l.slot, l.token])?;
                // It expired at its expiry, so the delay runs from then, not from now. (A
                // no-wait look rolls this back with the rest; the next look finds it again.)
                losses.extend(self.record_loss(&tx, k, &view, l, "expired", l.expires_boot_ns)?);
            }
        }
        for h in losses {
            view.held_back
                .retain(|x| x.slot != h.slot || x.until_boot_ns > h.until_boot_ns);
            if !view.held_back.iter().any(|x| x.slot == h.slot) {
                view.held_back.push(h);
            }
        }
        let look = Look {
            key: &req.key,
            mine: *ticket,
            now,
            count_ahead: queue,
        };
        let standing = self.standing(&tx, &view, look, probe)?;
        for t in &standing.dead_tickets {
            tx.prepare_cached("DELETE FROM baton_waiters WHERE ticket = ?1")?
                .execute([t])?;
        }
        if standing.grantable() {
            let live: Vec<u32> = view
                .leases
                .iter()
                .filter(|l| view.lease_live(l, &self.boot_id, now))
                .map(|l| l.slot)
                .collect();
            let slot = (0..view.lim)
                .find(|s| !live.contains(s) && view.held_back(*s, &self.boot_id, now).is_none())
                .ok_or_else(|| corrupt("no free slot number although slots are free"))?;
            tx.prepare_cached("DELETE FROM baton_held_back WHERE key = ?1 AND slot = ?2")?
                .execute(rusqlite::params![k, slot])?;
            let token = view.last_token.checked_add(1).ok_or_else(|| {
                corrupt("the key's token sequence is exhausted (it reached 2^63 - 1)")
            })?;
            let ttl_ns = i64::try_from(enc.ttl.as_nanos()).unwrap_or(i64::MAX);
            let expires = now.saturating_add(ttl_ns);
            let wall = unix_ms_now();
            let wall_i = i64::try_from(wall).unwrap_or(i64::MAX);
            tx.prepare_cached("UPDATE baton_keys SET seq = ?2 WHERE key = ?1")?
                .execute(rusqlite::params![k, token])?;
            tx.prepare_cached(
                "INSERT INTO baton_leases(key, slot, token, holder_id, holder_json, acquired_ms,
                     renewed_ms, ttl_ms, boot_id, expires_boot_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8, ?9)",
            )?
            .execute(rusqlite::params![
                k,
                slot,
                token,
                enc.holder_id,
                enc.holder_json,
                wall_i,
                i64::try_from(enc.ttl.as_millis()).unwrap_or(i64::MAX),
                self.boot_id,
                expires
            ])?;
            if let Some(t) = ticket.filter(|_| standing.mine_present) {
                tx.prepare_cached("DELETE FROM baton_waiters WHERE ticket = ?1")?
                    .execute([t])?;
            }
            tx.commit()?;
            *ticket = None;
            *lock = None;
            return Ok(Attempt::Granted(Box::new(Lease {
                key: req.key.clone(),
                slot,
                limit: view.lim,
                token: Token(token as u64),
                holder: req.holder.clone(),
                ttl: Some(enc.ttl),
                acquired_unix_ms: wall,
                sent_at: Some(sent_at),
            })));
        }
        if !queue {
            // Rolled back on drop: a no-wait request leaves nothing behind.
            let held = view
                .leases
                .iter()
                .filter(|l| view.lease_live(l, &self.boot_id, now))
                .count();
            let held_back = view
                .held_back_free(&self.boot_id, now)
                .into_iter()
                .map(|(_, d)| d)
                .min()
                .zip(view.delay_ms.map(|ms| Duration::from_millis(ms as u64)));
            return Ok(Attempt::Busy {
                lim: view.lim,
                held,
                held_back,
            });
        }
        // A lock-delay that ends writes nothing either: look again then too.
        let next_expiry = view
            .leases
            .iter()
            .filter(|l| view.lease_live(l, &self.boot_id, now))
            .map(|l| Duration::from_nanos(u64::try_from(l.expires_boot_ns - now).unwrap_or(0)))
            .chain(
                view.held_back_free(&self.boot_id, now)
                    .into_iter()
                    .map(|(_, d)| d),
            )
            .min();
        let ticket_ttl = i64::try_from(TICKET_TTL.as_nanos()).unwrap_or(i64::MAX);
        let expires = now.saturating_add(ticket_ttl);
        match ticket.filter(|_| standing.mine_present) {
            Some(t) => {
                tx.prepare_cached(
                    "UPDATE baton_waiters SET expires_boot_ns = ?2 WHERE ticket = ?1",
                )?
                .execute(rusqlite::params![t, expires])?;
                tx.commit()?;
                Ok(Attempt::Queued {
                    queued_ahead: standing.queued_ahead,
                    next_expiry,
                })
            }
            None => {
                tx.prepare_cached(
                    "INSERT INTO baton_waiters(key, holder_id, boot_id, expires_boot_ns)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(rusqlite::params![
                    k,
                    enc.holder_id,
                    self.boot_id,
                    expires
                ])?;
                let t = tx.last_insert_rowid();
                // The lock is taken before the ticket is visible to anyone, so no reader
                // can see the ticket without its proof of life.
                let l = TicketLock::take(&self.lock_path, t).map_err(|e| {
                    Fail::Err(
                        Error::new(
                            ErrorKind::Unavailable,
                            format!("cannot lock the waiter file {}", self.lock_path.display()),
                        )
                        .with_source(e),
                    )
                })?;
                tx.commit()?;
                *ticket = Some(t);
                *lock = Some(l);
                Ok(Attempt::Queued {
                    queued_ahead: standing.queued_ahead,
                    next_expiry,
                })
            }
        }
    }

    /// A cheap read-only look: should the waiter run a write attempt now?
    fn worth_attempt(
        &self,
        conn: &mut Connection,
        key: &Key,
        ticket: Option<i64>,
        probe: &mut Probe,
    ) -> Result<bool, Fail> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let Some(view) = self.read_view(&tx, key)? else {
            return Ok(true);
        };
        let look = Look {
            key,
            mine: ticket,
            now: monotonic_ns(),
            count_ahead: false,
        };
        let s = self.standing(&tx, &view, look, probe)?;
        drop(tx);
        Ok(!s.mine_present || s.grantable())
    }

    /// Deletes an abandoned wait's ticket, retrying a busy database for a while.
    fn drop_ticket(&self, conn: &mut Connection, ticket: Option<i64>) {
        let Some(t) = ticket else { return };
        let deadline = Instant::now().checked_add(CLEANUP_BUSY_BOUND);
        let _ = retry(deadline, None, || {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.prepare_cached("DELETE FROM baton_waiters WHERE ticket = ?1")?
                .execute([t])?;
            tx.commit()?;
            Ok(())
        });
    }

    /// The whole acquire, on a blocking thread.
    pub(crate) fn acquire_blocking(
        &self,
        req: &AcquireRequest,
        cancel: &CancelFlag,
    ) -> Result<Lease, Error> {
        let key = &req.key;
        let start = Instant::now();
        let enc = Encoded::new(req).map_err(|e| self.ctx(e, Op::Acquire, Some(key)))?;
        let (deadline, busy_deadline, queue) = match req.wait {
            Wait::NoWait => (None, start.checked_add(NOWAIT_BUSY_BOUND), false),
            Wait::Timeout(d) => {
                let dl = start.checked_add(d);
                (dl, dl, true)
            }
            Wait::Forever => (None, None, true),
        };
        let mut conn = self.conn(busy_deadline).map_err(|s| match s {
            Stop::Deadline(e) => self
                .err(
                    ErrorKind::Unavailable,
                    Op::Acquire,
                    Some(key),
                    "the database stayed locked by other connections",
                )
                .with_source(e),
            other => self.stopped(other, Op::Acquire, Some(key)),
        })?;
        let mut w = Waiting {
            req,
            enc: &enc,
            queue,
            deadline,
            busy_deadline,
            cancel,
            ticket: None,
            lock: None,
            probe: Probe::new(&self.lock_path),
        };
        let result = self.wait_loop(&mut conn, &mut w);
        if result.is_err() {
            self.drop_ticket(&mut conn, w.ticket);
        }
        drop(w.lock);
        self.put(conn);
        result
    }

    /// Attempts until a grant, a refusal or the end of the wait, sleeping between
    /// attempts until the database changes in a way worth another.
    fn wait_loop(&self, conn: &mut Connection, w: &mut Waiting<'_>) -> Result<Lease, Error> {
        let (req, queue, deadline, busy_deadline, cancel) =
            (w.req, w.queue, w.deadline, w.busy_deadline, w.cancel);
        let key = &req.key;
        let timed_out = |waited_for: &str| req.timed_out(waited_for, &self.url);
        let mut first = true;
        loop {
            let mut seen = core::data_version(conn).unwrap_or(i64::MIN);
            let outcome = retry(busy_deadline, Some(cancel), || self.attempt(conn, w, first));
            let outcome = match outcome {
                Ok(o) => o,
                Err(Stop::Err(e)) => return Err(self.ctx(e, Op::Acquire, Some(key))),
                Err(Stop::Cancelled) => {
                    return Err(self.err(ErrorKind::Cancelled, Op::Acquire, Some(key), "cancelled"))
                }
                Err(Stop::Deadline(e)) if queue => {
                    return Err(
                        timed_out("the database stayed locked by other connections").with_source(e)
                    )
                }
                Err(Stop::Deadline(e)) => {
                    return Err(self
                        .err(
                            ErrorKind::Unavailable,
                            Op::Acquire,
                            Some(key),
                            format!(
                                "the database stayed locked by other connections for {}",
                                format_duration(NOWAIT_BUSY_BOUND)
                            ),
                        )
                        .with_source(e))
                }
            };
            first = false;
            let (queued_ahead, next_expiry) = match outcome {
                Attempt::Granted(lease) => return Ok(*lease),
                Attempt::Busy {
                    lim,
                    held,
                    held_back,
                } => {
                    let held = u32::try_from(held).unwrap_or(u32::MAX);
                    let held_back = held_back.map(|(left, delay)| (delay, left));
                    return Err(self.ctx(
                        errors::busy(held, lim, None, held_back),
                        Op::Acquire,
                        Some(key),
                    ));
                }
                Attempt::Queued {
                    queued_ahead,
                    next_expiry,
                } => (queued_ahead, next_expiry),
            };
            // The attempt refreshed the ticket; the next refresh is due a third of its TTL on.
            let refresh = Refresh::new(TICKET_TTL, Instant::now());
            // A holder that dies (or stops renewing) leaves its row to expire silently.
            let look_at = next_expiry.map(|d| Instant::now() + d + Duration::from_millis(1));
            let mut interval = Duration::from_millis(1);
            // Wait for a change worth a write attempt, or for the ticket to need a refresh.
            loop {
                if cancel.is_set() {
                    return Err(self.err(
                        ErrorKind::Cancelled,
                        Op::Acquire,
                        Some(key),
                        "cancelled",
                    ));
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return Err(timed_out("every slot stayed held"));
                }
                if refresh.due(now) || look_at.is_some_and(|t| now >= t) {
                    break;
                }
                // The head of the queue looks often; waiters far behind, who cannot be
                // served before those ahead, look less often (every look takes locks
                // whose cost grows with the number of connections).
                let cap = Duration::from_millis((2 + 4 * queued_ahead as u64).min(1000));
                let mut pause = interval.min(cap);
                if let Some(wake) = next_wake([deadline, look_at, Some(refresh.due_at())]) {
                    pause = pause.min(wake.saturating_duration_since(now));
                }
                std::thread::sleep(pause);
                interval = (interval * 2).min(cap);
                let v = match core::data_version(conn) {
                    Ok(v) => v,
                    Err(_) => break,
                };
                if v == seen {
                    continue;
                }
                // No reset of the backoff on a change: ticket refreshes change the
                // database all the time, and a waiter far back must keep to its pace.
                seen = v;
                match self.worth_attempt(conn, key, w.ticket, &mut w.probe) {
                    Ok(true) | Err(_) => break,
                    Ok(false) => {}
                }
            }
        }
    }
}
