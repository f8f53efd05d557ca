//! The SQLite store: one row per granted lease, one row per queued waiter, one row per
//! key with its limit and token sequence.
//!
//! Guarantees:
//! - Limit: every grant happens in a `BEGIN IMMEDIATE` transaction (one writer at a time)
//!   that counts the key's live leases and grants only if fewer than the limit are live.
//!   Stale leases are deleted in the same transaction as the grant that reuses their
//!   slot, so two processes that both judge a lease stale cannot both win.
//! - Tokens: `seq` in the key's row, raised in the granting transaction to
//!   `max(seq, every token in the table) + 1`; it is in the file, so it survives restarts.
//! - Expiry depends only on the host's `CLOCK_MONOTONIC` and the kernel's boot id, never
//!   on the wall clock: a lease is stale iff it was granted in another boot or its expiry
//!   on that clock (`expires_boot_ns`: nanoseconds since boot) has passed.
//! - Fairness: a waiter holds a ticket (an ever-increasing number); a request is granted
//!   only while the free slots outnumber the live tickets ahead of it, so nobody barges
//!   past a queued waiter.
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

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use baton_core::{
    format_duration, unix_ms, AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error,
    ErrorKind, Holder, HolderId, Key, KeyStatus, Lease, Op, Released, SlotState, SlotStatus, Store,
    StoreUrl, Token, Wait,
};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::oneshot;

#[path = "barrier.rs"]
mod barrier;

pub use barrier::ARRIVAL_TTL;

use crate::config::SqliteConfig;
use crate::core::{self, corrupt, int, int_in, int_value, retry, text, Fail, Stop};
use crate::sys::{self, monotonic_ns, Probe, TicketLock};

/// The TTL of a lease whose request gives none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How long a waiter's ticket lives without being refreshed; a waiting process refreshes
/// it every third of this. A waiter that stops (SIGSTOP, a debugger) loses its place in
/// the queue after this long; one that dies loses it at once.
pub const TICKET_TTL: Duration = Duration::from_secs(10);

/// How long a no-wait acquire keeps retrying a database that other connections keep
/// busy (a busy database is not a busy lock).
const NOWAIT_BUSY_BOUND: Duration = Duration::from_secs(10);

/// How long release, renew, inspect, list, break, resize and opening keep retrying a
/// busy database before answering `Unavailable`.
const OP_BUSY_BOUND: Duration = Duration::from_secs(30);

/// How long an abandoned wait keeps trying to delete its ticket (after that the ticket's
/// lock, dropped with the wait, marks it dead anyway).
const CLEANUP_BUSY_BOUND: Duration = Duration::from_secs(10);

/// Idle connections kept for reuse.
const POOL_MAX: usize = 8;

/// The SQLite store. See the crate docs and README for the mechanism and its bounds.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("url", &self.inner.url)
            .field("path", &self.inner.config.path)
            .finish_non_exhaustive()
    }
}

struct Inner {
    url: StoreUrl,
    config: SqliteConfig,
    /// The waiter lock file beside the database.
    lock_path: PathBuf,
    boot_id: String,
    pool: Mutex<Vec<Connection>>,
}

/// A lease row as read, types checked.
struct LeaseRow {
    slot: u32,
    token: i64,
    holder_id: String,
    boot_id: String,
    expires_boot_ns: i64,
    holder_json: String,
    acquired_ms: i64,
}

/// A ticket row as read, types checked.
struct TicketRow {
    ticket: i64,
    boot_id: String,
    expires_boot_ns: i64,
}

/// A `baton_held_back` row as read, types checked.
struct HeldBackRow {
    slot: u32,
    token: i64,
    how: String,
    boot_id: String,
    until_boot_ns: i64,
}

/// A key's state, read in one transaction.
struct View {
    lim: u32,
    /// `max(seq, every lease token)`: the last token granted.
    last_token: i64,
    leases: Vec<LeaseRow>,
    /// The key's lock-delay in ms, if it has one.
    delay_ms: Option<i64>,
    held_back: Vec<HeldBackRow>,
}

impl View {
    /// How long the lock-delay still holds `slot` back (`None`: it does not).
    fn held_back(&self, slot: u32, boot_id: &str, now: i64) -> Option<Duration> {
        self.held_back
            .iter()
            .find(|h| h.slot == slot && h.boot_id == boot_id && now < h.until_boot_ns)
            .map(|h| Duration::from_nanos(u64::try_from(h.until_boot_ns - now).unwrap_or(0)))
    }

    /// Slots below the limit that are free of live leases but held back, with how long.
    fn held_back_free(&self, boot_id: &str, now: i64) -> Vec<(u32, Duration)> {
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

    fn lease_live(&self, l: &LeaseRow, boot_id: &str, now: i64) -> bool {
        l.boot_id == boot_id && now < l.expires_boot_ns
    }

    fn ticket_live(t: &TicketRow, boot_id: &str, now: i64) -> bool {
        t.boot_id == boot_id && now < t.expires_boot_ns
    }
}

/// Where a request stands in the key's queue.
struct Standing {
    /// Slots free for this request: `lim - live leases`, saturating.
    available: u32,
    /// My ticket is in the table.
    mine_present: bool,
    /// Live tickets ahead of me, counted only up to `available` (enough to decide).
    live_ahead: u32,
    /// Tickets ahead of me by TTL alone (for pacing the polls).
    queued_ahead: usize,
    /// Tickets found dead (expired, another boot, or their lock dropped).
    dead_tickets: Vec<i64>,
}

impl Standing {
    fn grantable(&self) -> bool {
        self.live_ahead < self.available
    }
}

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

impl Inner {
    fn err(&self, kind: ErrorKind, op: Op, key: Option<&Key>, msg: impl Into<String>) -> Error {
        Error::new(kind, msg).context(op, key, &self.url)
    }

    fn ctx(&self, e: Error, op: Op, key: Option<&Key>) -> Error {
        e.context(op, key, &self.url)
    }

    /// Maps a stopped retry loop for operations bounded by [`OP_BUSY_BOUND`].
    fn stopped(&self, s: Stop, op: Op, key: Option<&Key>) -> Error {
        match s {
            Stop::Err(e) => self.ctx(e, op, key),
            Stop::Deadline(e) => self
                .err(
                    ErrorKind::Unavailable,
                    op,
                    key,
                    format!(
                        "the database stayed locked by other connections for {}",
                        format_duration(OP_BUSY_BOUND)
                    ),
                )
                .with_source(e),
            Stop::Cancelled => self.err(ErrorKind::Cancelled, op, key, "cancelled"),
        }
    }

    /// A connection from the pool, or a new one.
    fn conn(&self, deadline: Option<Instant>) -> Result<Connection, Stop> {
        if let Some(c) = lock(&self.pool).pop() {
            return Ok(c);
        }
        retry(deadline, None, || core::connect(&self.config.path))
    }

    fn put(&self, conn: Connection) {
        // A connection left inside a transaction (it cannot be, but) is not reused.
        if conn.is_autocommit() {
            let mut pool = lock(&self.pool);
            if pool.len() < POOL_MAX {
                pool.push(conn);
            }
        }
    }

    /// Runs `f` in a retried transaction of `behavior` on a pooled connection.
    fn with_tx<T>(
        &self,
        behavior: TransactionBehavior,
        op: Op,
        key: Option<&Key>,
        mut f: impl FnMut(&Transaction<'_>) -> Result<T, Fail>,
    ) -> Result<T, Error> {
        let deadline = Instant::now().checked_add(OP_BUSY_BOUND);
        let mut conn = self.conn(deadline).map_err(|s| self.stopped(s, op, key))?;
        let result = retry(deadline, None, || {
            let tx = conn.transaction_with_behavior(behavior)?;
            let v = f(&tx)?;
            tx.commit()?;
            Ok(v)
        });
        self.put(conn);
        result.map_err(|s| self.stopped(s, op, key))
    }

    fn read_view(&self, tx: &Connection, key: &Key) -> Result<Option<View>, Fail> {
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
        let in_key = |f: Fail| match f {
            Fail::Err(e) if e.kind() == ErrorKind::Corrupt => {
                corrupt(format!("baton_keys row of '{k}': {}", e.message()))
            }
            other => other,
        };
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
            "SELECT slot, token, holder_id, boot_id, expires_boot_ns, holder_json, acquired_ms
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
                })
            };
            leases.push(read().map_err(|f| match f {
                Fail::Err(e) if e.kind() == ErrorKind::Corrupt => {
                    corrupt(format!("a baton_leases row of '{k}': {}", e.message()))
                }
                other => other,
            })?);
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
                let row = HeldBackRow {
                    slot: int_in(r, 0, "slot", 0, i64::from(u32::MAX))? as u32,
                    token: int_in(r, 1, "token", 0, i64::MAX)?,
                    how: text(r, 2, "how")?,
                    boot_id: text(r, 3, "boot_id")?,
                    until_boot_ns: int(r, 4, "until_boot_ns")?,
                };
                if row.how != "expired" && row.how != "broken" {
                    return Err(corrupt(format!("column how holds {:?}", row.how)));
                }
                Ok(row)
            };
            held_back.push(read().map_err(|f| match f {
                Fail::Err(e) if e.kind() == ErrorKind::Corrupt => {
                    corrupt(format!("a baton_held_back row of '{k}': {}", e.message()))
                }
                other => other,
            })?);
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
    fn each_ticket(
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
            let t = read().map_err(|f| match f {
                Fail::Err(e) if e.kind() == ErrorKind::Corrupt => {
                    corrupt(format!("a baton_waiters row of '{k}': {}", e.message()))
                }
                other => other,
            })?;
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
    #[allow(clippy::too_many_arguments)]
    fn standing(
        &self,
        tx: &Connection,
        view: &View,
        key: &Key,
        mine: Option<i64>,
        now: i64,
        probe: &mut Probe,
        count_ahead: bool,
    ) -> Result<Standing, Fail> {
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

    /// Records in `tx` that lease `l` of `view`'s key was lost (`how`: expired or broken)
    /// at `lost_ns` on this boot's monotonic clock, when the key has a lock-delay: its slot
    /// is held back until `lost_ns` + the delay. A lease of an earlier boot is not held
    /// back (the reboot ended its holder). Returns the row written, if any.
    fn record_loss(
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
        let wall = i64::try_from(unix_ms(SystemTime::now())).unwrap_or(i64::MAX);
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
            token: l.token,
            how: how.to_owned(),
            boot_id: self.boot_id.clone(),
            until_boot_ns: until,
        }))
    }

    /// One acquire attempt in one write transaction. `ticket` and `lock` are the
    /// request's place in the queue, updated here.
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        conn: &mut Connection,
        req: &AcquireRequest,
        enc: &Encoded,
        first: bool,
        queue: bool,
        ticket: &mut Option<i64>,
        lock: &mut Option<TicketLock>,
        probe: &mut Probe,
    ) -> Result<Attempt, Fail> {
        let k = req.key.as_str();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Taken before the clock the expiry counts from: the keeper's first deadline.
        let sent_at = Instant::now();
        let now = monotonic_ns();
        let created = tx
            .prepare_cached(
                "INSERT INTO baton_keys(key, lim, seq) VALUES (?1, ?2, 0) ON CONFLICT(key) DO NOTHING",
            )?
            .execute(rusqlite::params![k, req.limit])?;
        if let (1, Some(ms)) = (created, enc.lock_delay_ms) {
            // In the transaction that creates the key: no one sees it without its delay.
            core::require_lock_delay_schema(&tx)?;
            tx.prepare_cached("INSERT INTO baton_lock_delays(key, delay_ms) VALUES (?1, ?2)")?
                .execute(rusqlite::params![k, ms])?;
        }
        let view = self
            .read_view(&tx, &req.key)?
            .ok_or_else(|| corrupt("the key's row vanished inside a transaction"))?;
        if first && view.lim != req.limit {
            return Err(Fail::Err(
                Error::new(
                    ErrorKind::LimitMismatch,
                    format!(
                        "the key has a limit of {} slot(s), not {} (use -n {}, or another key)",
                        view.lim, req.limit, view.lim
                    ),
                )
                .with_current_limit(view.lim),
            ));
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
        let standing = self.standing(&tx, &view, &req.key, *ticket, now, probe, queue)?;
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
            let wall = unix_ms(SystemTime::now());
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
        let s = self.standing(&tx, &view, key, ticket, monotonic_ns(), probe, false)?;
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
    fn acquire_blocking(&self, req: &AcquireRequest, cancel: &AtomicBool) -> Result<Lease, Error> {
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
        let mut probe = Probe::new(&self.lock_path);
        let mut ticket: Option<i64> = None;
        let mut lock: Option<TicketLock> = None;
        let result = self.wait_loop(
            &mut conn,
            req,
            &enc,
            queue,
            deadline,
            busy_deadline,
            cancel,
            &mut ticket,
            &mut lock,
            &mut probe,
        );
        if result.is_err() {
            self.drop_ticket(&mut conn, ticket);
        }
        drop(lock);
        self.put(conn);
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn wait_loop(
        &self,
        conn: &mut Connection,
        req: &AcquireRequest,
        enc: &Encoded,
        queue: bool,
        deadline: Option<Instant>,
        busy_deadline: Option<Instant>,
        cancel: &AtomicBool,
        ticket: &mut Option<i64>,
        lock: &mut Option<TicketLock>,
        probe: &mut Probe,
    ) -> Result<Lease, Error> {
        let key = &req.key;
        let timed_out = |waited_for: &str| req.timed_out(waited_for, &self.url);
        let refresh_every = TICKET_TTL / 3;
        let mut first = true;
        loop {
            let mut seen = core::data_version(conn).unwrap_or(i64::MIN);
            let outcome = retry(busy_deadline, Some(cancel), || {
                self.attempt(conn, req, enc, first, queue, ticket, lock, probe)
            });
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
                    return Err(self.err(
                        ErrorKind::Busy,
                        Op::Acquire,
                        Some(key),
                        if let Some((left, d)) = held_back {
                            format!(
                                "{held} of {lim} slot(s) are held, and a lost lease's slot is held back by the key's lock-delay of {} for about another {}",
                                format_duration(d),
                                format_duration(left)
                            )
                        } else if held as u32 >= lim {
                            format!("all {lim} slot(s) are held")
                        } else {
                            format!(
                                "{held} of {lim} slot(s) are held and earlier requests wait for the rest"
                            )
                        },
                    ))
                }
                Attempt::Queued {
                    queued_ahead,
                    next_expiry,
                } => (queued_ahead, next_expiry),
            };
            let refreshed = Instant::now();
            // A holder that dies (or stops renewing) leaves its row to expire silently.
            let look_at = next_expiry.map(|d| refreshed + d + Duration::from_millis(1));
            let mut interval = Duration::from_millis(1);
            // Wait for a change worth a write attempt, or for the ticket to need a refresh.
            loop {
                if cancel.load(Ordering::Relaxed) {
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
                if now.duration_since(refreshed) >= refresh_every
                    || look_at.is_some_and(|t| now >= t)
                {
                    break;
                }
                // The head of the queue looks often; waiters far behind, who cannot be
                // served before those ahead, look less often (every look takes locks
                // whose cost grows with the number of connections).
                let cap = Duration::from_millis((2 + 4 * queued_ahead as u64).min(1000));
                let mut pause = interval.min(cap);
                if let Some(d) = deadline {
                    pause = pause.min(d - now);
                }
                if let Some(t) = look_at {
                    pause = pause.min(t.saturating_duration_since(now));
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
                match self.worth_attempt(conn, key, *ticket, probe) {
                    Ok(true) | Err(_) => break,
                    Ok(false) => {}
                }
            }
        }
    }

    fn release_blocking(
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

    fn renew_blocking(&self, lease: &Lease) -> Result<Lease, Error> {
        let ttl = lease.ttl.unwrap_or(DEFAULT_TTL);
        let ttl_ns = ttl_nanos(ttl).map_err(|e| self.ctx(e, Op::Renew, Some(&lease.key)))?;
        let holder_id = lease.holder.id.to_string();
        let (n, sent_at) = self.with_tx(
            TransactionBehavior::Immediate,
            Op::Renew,
            Some(&lease.key),
            |tx| {
                let sent_at = Instant::now();
                let now = monotonic_ns();
                let wall = i64::try_from(unix_ms(SystemTime::now())).unwrap_or(i64::MAX);
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

    fn inspect_blocking(&self, key: &Key) -> Result<KeyStatus, Error> {
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

    fn list_blocking(&self) -> Result<Vec<Key>, Error> {
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

    fn break_blocking(
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

    fn resize_blocking(&self, key: &Key, limit: u32) -> Result<(), Error> {
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

/// The parts of a request written into rows, encoded once.
struct Encoded {
    holder_id: String,
    holder_json: String,
    ttl: Duration,
    /// The lock-delay for a key this request creates (`None`: none, or zero).
    lock_delay_ms: Option<i64>,
}

/// The longest lock-delay a key can have: far beyond any use, and small enough that
/// `until_boot_ns` arithmetic never overflows.
const MAX_LOCK_DELAY_MS: i64 = 365 * 24 * 3600 * 1000;

impl Encoded {
    fn new(req: &AcquireRequest) -> Result<Encoded, Error> {
        let ttl = req.ttl.unwrap_or(DEFAULT_TTL);
        ttl_nanos(ttl)?;
        let holder_json = req.holder.to_json()?;
        let lock_delay_ms = match req.lock_delay.filter(|d| !d.is_zero()) {
            None => None,
            Some(d) => Some(
                i64::try_from(d.as_millis().max(1))
                    .ok()
                    .filter(|ms| *ms <= MAX_LOCK_DELAY_MS)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::InvalidInput,
                            "the lock-delay is too large (at most 365 days)",
                        )
                    })?,
            ),
        };
        Ok(Encoded {
            holder_id: req.holder.id.to_string(),
            holder_json,
            ttl,
            lock_delay_ms,
        })
    }
}

fn ttl_nanos(ttl: Duration) -> Result<i64, Error> {
    if ttl < Duration::from_millis(1) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the TTL must be at least 1ms",
        ));
    }
    i64::try_from(ttl.as_nanos())
        .ok()
        .filter(|n| *n < i64::MAX / 2)
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "the TTL is too large"))
}

fn token_i64(t: Token) -> Result<i64, Fail> {
    // A token above i64::MAX was never granted by this store: no row can match it.
    Ok(i64::try_from(t.0).unwrap_or(-1))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The pool is a plain Vec; a panic while holding it cannot leave it inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SqliteStore {
    /// Opens (creating if needed) the SQLite store the URL names: `sqlite:/abs/path.db`.
    ///
    /// Refuses, without writing to it, a file that is not a SQLite database or is another
    /// application's ([`ErrorKind::Corrupt`]), and a file on a network filesystem
    /// ([`ErrorKind::Unavailable`]; see [`crate::NETWORK_FILESYSTEMS`]) unless the URL
    /// says `?unsafe_network_fs=1`. Blocks while it sets the database up; call it from a
    /// blocking context or accept a short block (it retries a busy database for up to 30 s).
    pub fn open(url: &StoreUrl) -> Result<SqliteStore, Error> {
        let config = SqliteConfig::from_url(url)?;
        let fail =
            |kind: ErrorKind, msg: String| Error::new(kind, msg).with_op(Op::Open).with_store(url);
        let path = config.path.clone();
        let parent = path.parent().unwrap_or(Path::new("/")).to_owned();
        std::fs::create_dir_all(&parent).map_err(|e| {
            fail(
                ErrorKind::Unavailable,
                format!("cannot create the directory {}", parent.display()),
            )
            .with_source(e)
        })?;
        if !config.unsafe_network_fs {
            let probe_at = if path.exists() {
                path.as_path()
            } else {
                parent.as_path()
            };
            let t = sys::fs_type(probe_at).map_err(|e| {
                fail(
                    ErrorKind::Unavailable,
                    format!("cannot stat the filesystem of {}", probe_at.display()),
                )
                .with_source(e)
            })?;
            if let Some(name) = sys::network_filesystem(t) {
                return Err(fail(
                    ErrorKind::Unavailable,
                    format!(
                        "{} is on a {name} filesystem, where SQLite's WAL mode is unsafe \
                         (hosts do not share its lock memory); put the database on a local \
                         disk, or use a store made for many hosts (postgres://, etcd://); \
                         add ?unsafe_network_fs=1 only if this filesystem is local to one host",
                        path.display()
                    ),
                ));
            }
        }
        // A setgid, group-writable directory shares the database with its group: create
        // the file (and the waiter file) group-writable before SQLite opens it, whatever
        // this user's umask; SQLite then gives -wal and -shm the database file's mode.
        let mut lock_path = path.clone().into_os_string();
        lock_path.push("-baton-waiters");
        let lock_path = PathBuf::from(lock_path);
        let group = sys::shared_group(&parent).ok().flatten();
        let denied_hint = |e: &std::io::Error| -> String {
            let denied = e.kind() == std::io::ErrorKind::PermissionDenied;
            match group {
                Some(gid) if denied && !sys::is_member(gid) => format!(
                    " (the directory {} is shared by group {}, which {} is not in; members need read and write)",
                    parent.display(),
                    sys::group_label(gid),
                    sys::user_label()
                ),
                _ if denied => format!(
                    " (to share a database with a group: chgrp GROUP {0} && chmod 2770 {0})",
                    parent.display()
                ),
                _ => String::new(),
            }
        };
        if let Some(gid) = group {
            for file in [&path, &lock_path] {
                sys::create_shared(file, gid).map_err(|e| {
                    fail(
                        ErrorKind::Unavailable,
                        format!("cannot create {}{}", file.display(), denied_hint(&e)),
                    )
                    .with_source(e)
                })?;
            }
        }
        if let Err(e) = sys::check_writable(&path) {
            // SQLite would say only "unable to open database file": say who may.
            if e.kind() == std::io::ErrorKind::PermissionDenied {
                return Err(fail(
                    ErrorKind::Unavailable,
                    format!(
                        "cannot open {} for writing{}",
                        path.display(),
                        denied_hint(&e)
                    ),
                )
                .with_source(e));
            }
        }
        let boot_id = baton_core::boot_id().ok_or_else(|| {
            fail(
                ErrorKind::Unavailable,
                "cannot read the kernel's boot id (/proc/sys/kernel/random/boot_id); the \
                 SQLite store needs it to tell leases granted before a reboot"
                    .into(),
            )
        })?;
        let deadline = Instant::now().checked_add(OP_BUSY_BOUND);
        let conn = retry(deadline, None, || {
            let mut conn = core::connect(&path)?;
            core::check_or_init(&mut conn, &path)?;
            Ok(conn)
        })
        .map_err(|s| match s {
            Stop::Err(e) => {
                let named = if e.message().contains(&*path.to_string_lossy()) {
                    e.message().to_owned()
                } else {
                    format!("{}: {}", path.display(), e.message())
                };
                let kind = e.kind();
                fail(kind, named).with_source(e)
            }
            Stop::Deadline(e) => fail(
                ErrorKind::Unavailable,
                format!(
                    "{}: the database stayed locked by other connections for {}",
                    path.display(),
                    format_duration(OP_BUSY_BOUND)
                ),
            )
            .with_source(e),
            Stop::Cancelled => fail(ErrorKind::Cancelled, "cancelled".into()),
        })?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                url: url.clone(),
                config,
                lock_path,
                boot_id,
                pool: Mutex::new(vec![conn]),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.config.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: Op,
        key: Option<&Key>,
        f: impl FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(r) => r,
            Err(e) => Err(self
                .inner
                .err(
                    ErrorKind::Unavailable,
                    op,
                    key,
                    "the database thread failed",
                )
                .with_source(e)),
        }
    }
}

/// Cancels a waiting acquire when its future is dropped, and releases a lease that was
/// granted but never delivered.
struct CancelGuard {
    cancel: Arc<AtomicBool>,
    rx: Option<oneshot::Receiver<Result<Lease, Error>>>,
    inner: Arc<Inner>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        self.cancel.store(true, Ordering::Relaxed);
        rx.close();
        if let Ok(Ok(lease)) = rx.try_recv() {
            let inner = Arc::clone(&self.inner);
            std::thread::spawn(move || {
                let _ = inner.release_blocking(&lease, Instant::now().checked_add(OP_BUSY_BOUND));
            });
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::new(
            "within the lease's TTL (30s unless the request sets one) after its holder dies",
        );
        c.renew = true;
        c.break_lease = true;
        c.resize = true;
        c.fifo = true;
        c.lock_delay = true;
        c
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        req.validate()
            .map_err(|e| self.inner.ctx(e, Op::Acquire, Some(&req.key)))?;
        let (tx, rx) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut guard = CancelGuard {
            cancel: Arc::clone(&cancel),
            rx: Some(rx),
            inner: Arc::clone(&self.inner),
        };
        let inner = Arc::clone(&self.inner);
        let req2 = req.clone();
        tokio::task::spawn_blocking(move || {
            let result = inner.acquire_blocking(&req2, &cancel);
            if let Err(Ok(lease)) = tx.send(result) {
                // Nobody waits for it any more (the acquire was cancelled): give it back.
                let _ = inner.release_blocking(&lease, Instant::now().checked_add(OP_BUSY_BOUND));
            }
        });
        let stopped = || {
            self.inner.err(
                ErrorKind::Unavailable,
                Op::Acquire,
                Some(&req.key),
                "the database thread stopped",
            )
        };
        let Some(rx) = guard.rx.as_mut() else {
            return Err(stopped());
        };
        let result = rx.await;
        guard.rx = None;
        result.unwrap_or_else(|_| Err(stopped()))
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        let l = lease.clone();
        self.blocking(Op::Release, Some(&lease.key), move |inner| {
            inner.release_blocking(&l, Instant::now().checked_add(OP_BUSY_BOUND))
        })
        .await
    }

    fn release_now(&self, lease: &Lease) -> bool {
        self.inner
            .release_blocking(lease, Instant::now().checked_add(Duration::from_secs(5)))
            .is_ok()
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let k = key.clone();
        self.blocking(Op::Inspect, Some(key), move |inner| {
            inner.inspect_blocking(&k)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        self.blocking(Op::List, None, |inner| inner.list_blocking())
            .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let l = lease.clone();
        self.blocking(Op::Renew, Some(&lease.key), move |inner| {
            inner.renew_blocking(&l)
        })
        .await
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let k = key.clone();
        self.blocking(Op::Break, Some(key), move |inner| {
            inner.break_blocking(&k, holder)
        })
        .await
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        baton_core::barrier::validate(req)
            .map_err(|e| self.inner.ctx(e, Op::Barrier, Some(&req.key)))?;
        // The wait runs on a blocking thread; dropping this future sets `cancel`, and the
        // thread withdraws the arrival before it ends.
        let cancel = Arc::new(AtomicBool::new(false));
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _guard = SetOnDrop(Arc::clone(&cancel));
        let req2 = req.clone();
        self.blocking(Op::Barrier, Some(&req.key), move |inner| {
            inner.barrier_blocking(&req2, &cancel)
        })
        .await
    }

    async fn resize(&self, key: &Key, limit: u32) -> Result<KeyStatus, Error> {
        let k = key.clone();
        self.blocking(Op::Resize, Some(key), move |inner| {
            inner.resize_blocking(&k, limit)?;
            inner.inspect_blocking(&k)
        })
        .await
    }
}
