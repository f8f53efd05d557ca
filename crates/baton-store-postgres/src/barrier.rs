//! Barriers in the PostgreSQL store (`baton_core::barrier` has the semantics).
//!
//! Two tables beside the lease tables, created on first use:
//! - `barriers(key, generation, parties)`: the generation now filling and its size; its
//!   row lock (`FOR UPDATE`) orders every decision about a key (arrive, withdraw);
//! - `barrier_arrivals(ticket, key, holder_id, pid, passed, expires_at)`: one row per
//!   waiting party, `passed` NULL while its generation fills.
//!
//! An arrival is one transaction on the party's own connection: it locks the barrier row,
//! deletes the arrivals of dead parties, counts the live ones, and either completes the
//! generation (marks every live arrival `passed = generation`, raises `generation`,
//! `NOTIFY`s `barrier:<key>` on the schema's channel) or inserts its own arrival. A new
//! arrival takes the session advisory lock `(barrier number of the schema, ticket mod
//! 2³¹−1)` in the same transaction, before the row is visible to anyone.
//!
//! Waiting: the party looks at its own row (one read, no lock, no write) when the
//! listening connection reports `barrier:<key>`, and at a one-second backstop; it
//! refreshes the row's expiry every [`ARRIVAL_TTL`]/3. Once marked it deletes its row,
//! drops its lock and returns.
//!
//! Dead parties: an arrival counts while its advisory lock is held and its expiry (server
//! clock) has not passed. The next decision at the key tests each row with
//! `pg_try_advisory_xact_lock_shared`: when that succeeds the party's session is gone
//! (process killed, connection cut, backend terminated) and the row is deleted. So a
//! party that dies stops counting at once (at the next arrival); one that is stopped
//! (SIGSTOP) or cut off while its server session lingers stops counting within
//! [`ARRIVAL_TTL`] (10 s, server clock), and gets `Lost` if it resumes.
//!
//! `Store::barrier` (in `store.rs`) runs [`Inner::barrier_task`] through the kit's
//! `StoreRuntime::grant`: dropping the caller's future resolves the task's `Cancel`, and
//! the task withdraws the arrival.

use std::sync::Arc;
use std::time::Instant;

use baton_core::kit::errors::barrier_gave_up;
use baton_core::kit::runtime::Cancel;
use baton_core::kit::time::{next_wake, Refresh, ARRIVAL_TTL};
use baton_core::{BarrierPassed, BarrierRequest, Error, ErrorKind, Key, Wait};
use tokio_postgres::types::Type;

use crate::acquire::BACKSTOP;
use crate::core::{corrupt, Conn, Fail, Inner};
use crate::layout::{col, magic};
use crate::listen::woken;

/// What the arriving transaction decided.
enum Arrived {
    /// This arrival completed the generation.
    Passed(u64),
    /// Another count waits at the key.
    Mismatch(u32),
    /// Waiting, with this ticket.
    Waiting(i64),
}

/// Where a waiting arrival stands.
enum Standing {
    Passed(u64),
    Waiting,
    /// The row is gone: it expired while this party was stopped.
    Gone,
}

/// The statements, for one schema.
struct BarrierSql {
    ensure_row: String,
    lock_row: String,
    sweep: String,
    live: String,
    mark: String,
    advance: String,
    set_parties: String,
    insert: String,
    look: String,
    refresh: String,
    delete: String,
}

impl BarrierSql {
    fn new(schema: &str) -> BarrierSql {
        let s = format!("\"{schema}\"");
        BarrierSql {
            ensure_row: format!(
                "INSERT INTO {s}.barriers (key, generation, parties) VALUES ($1, 0, $2) \
                 ON CONFLICT (key) DO NOTHING"
            ),
            lock_row: format!(
                "SELECT generation, parties FROM {s}.barriers WHERE key = $1 FOR UPDATE"
            ),
            // Arrivals whose session is gone (nobody holds their lock), and waiting ones
            // that stopped refreshing.
            sweep: format!(
                "DELETE FROM {s}.barrier_arrivals a WHERE a.key = $1 \
                 AND ((a.passed IS NULL AND a.expires_at <= clock_timestamp()) \
                 OR pg_try_advisory_xact_lock_shared($2, (a.ticket % 2147483647)::integer))"
            ),
            live: format!(
                "SELECT count(*) FROM {s}.barrier_arrivals WHERE key = $1 AND passed IS NULL"
            ),
            mark: format!(
                "UPDATE {s}.barrier_arrivals SET passed = $2 WHERE key = $1 AND passed IS NULL"
            ),
            advance: format!(
                "UPDATE {s}.barriers SET generation = generation + 1, parties = $2 WHERE key = $1"
            ),
            set_parties: format!("UPDATE {s}.barriers SET parties = $2 WHERE key = $1"),
            insert: format!(
                "INSERT INTO {s}.barrier_arrivals (key, holder_id, pid, expires_at) \
                 VALUES ($1, $2, pg_backend_pid(), \
                 clock_timestamp() + $3::float8 * interval '1 millisecond') RETURNING ticket"
            ),
            look: format!(
                "SELECT passed, pid, pg_backend_pid() FROM {s}.barrier_arrivals WHERE ticket = $1"
            ),
            refresh: format!(
                "UPDATE {s}.barrier_arrivals \
                 SET expires_at = clock_timestamp() + $2::float8 * interval '1 millisecond' \
                 WHERE ticket = $1 AND passed IS NULL"
            ),
            delete: format!("DELETE FROM {s}.barrier_arrivals WHERE ticket = $1 RETURNING passed"),
        }
    }
}

impl Inner {
    /// The first half of the advisory locks of this schema's barrier arrivals (not the
    /// waiters' number, so ticket numbers of the two tables never meet).
    fn barrier_magic(&self) -> i32 {
        magic(&format!("{}:barrier", self.sql.schema))
    }

    /// The whole arrival and wait, on the store's runtime; `cancel` resolves when the
    /// caller goes away, and the arrival is then withdrawn.
    pub(crate) async fn barrier_task(
        self: Arc<Inner>,
        req: BarrierRequest,
        parties: i32,
        mut cancel: Cancel,
    ) -> Result<BarrierPassed, Error> {
        let key = req.key.clone();
        let sql = BarrierSql::new(&self.sql.schema);
        let start = Instant::now();
        let deadline = match req.wait {
            Wait::Timeout(d) => start.checked_add(d),
            Wait::NoWait => Some(start),
            Wait::Forever => None,
        };
        let waits = req.wait != Wait::NoWait;
        let topic = format!("barrier:{}", key.as_str());
        let (mut conn, mut wake_rx) = self.begin(waits).await?;
        let passed = |generation: u64| BarrierPassed {
            key: key.clone(),
            generation,
            parties: req.parties,
        };
        let holder = req.holder.id.to_string();
        let mut tries = 0;
        let ticket = loop {
            tries += 1;
            match self.arrive(&conn, &sql, &key, parties, &holder).await {
                Ok(Arrived::Passed(g)) => {
                    self.checkin(conn);
                    return Ok(passed(g));
                }
                Ok(Arrived::Mismatch(p)) => {
                    self.checkin(conn);
                    return Err(Error::new(
                        ErrorKind::LimitMismatch,
                        format!(
                            "the generation waiting at this barrier has {p} parties, not {}",
                            req.parties
                        ),
                    )
                    .with_current_limit(p));
                }
                Ok(Arrived::Waiting(t)) => break t,
                Err(f) if conn.reused && f.never_sent() && tries < 3 => {
                    // A pooled connection that died with a server restart.
                    drop(conn);
                    conn = match self.connect().await {
                        Ok(c) => c,
                        Err(f) => return Err(self.map(f)),
                    };
                }
                Err(f) => {
                    // The transaction may be open or the session broken: dropping the
                    // connection ends the session, which rolls back or, after a commit,
                    // drops the arrival's lock (so it counts as dead).
                    drop(conn);
                    return Err(self.map(f));
                }
            }
        };
        let mut refresh = Refresh::new(ARRIVAL_TTL, Instant::now());
        loop {
            match self.standing(&conn, &sql, ticket).await {
                Ok(Standing::Passed(g)) => {
                    self.leave_barrier(conn, &sql, ticket).await;
                    return Ok(passed(g));
                }
                Ok(Standing::Waiting) => {}
                Ok(Standing::Gone) => {
                    self.leave_barrier(conn, &sql, ticket).await;
                    return Err(Error::new(
                        ErrorKind::Lost,
                        format!(
                            "this party's arrival expired (it was stopped or cut off for longer \
                             than {}s) and was dropped; arrive again",
                            ARRIVAL_TTL.as_secs()
                        ),
                    ));
                }
                Err(f) => {
                    drop(conn);
                    return Err(self.map(f));
                }
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                let timeout = match req.wait {
                    Wait::Timeout(d) => Some(d),
                    _ => None,
                };
                let why = barrier_gave_up(timeout);
                return self.withdraw(conn, &sql, &key, ticket, why, &passed).await;
            }
            if refresh.due(now) {
                refresh.done(now);
                let ttl_ms = ARRIVAL_TTL.as_millis() as i64;
                if let Err(f) = self
                    .query(
                        &conn,
                        &sql.refresh,
                        &[(&ticket, Type::INT8), (&ttl_ms, Type::INT8)],
                    )
                    .await
                {
                    drop(conn);
                    return Err(self.map(f));
                }
            }
            let wake = next_wake([Some(now + BACKSTOP), Some(refresh.due_at()), deadline])
                .unwrap_or(now + BACKSTOP);
            tokio::select! {
                _ = &mut cancel => {
                    let why = Error::new(ErrorKind::Cancelled, "cancelled");
                    return self.withdraw(conn, &sql, &key, ticket, why, &passed).await;
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake.max(now))) => {}
                _ = woken(&mut wake_rx, &topic) => {}
            }
        }
    }

    /// The arriving transaction (see the module docs).
    async fn arrive(
        &self,
        conn: &Conn,
        sql: &BarrierSql,
        key: &Key,
        parties: i32,
        holder: &str,
    ) -> Result<Arrived, Fail> {
        let k = key.as_str();
        let bm = self.barrier_magic();
        self.exec(conn, "BEGIN").await?;
        self.query(
            conn,
            &sql.ensure_row,
            &[(&k, Type::TEXT), (&parties, Type::INT4)],
        )
        .await?;
        let rows = self.query(conn, &sql.lock_row, &[(&k, Type::TEXT)]).await?;
        let row = rows
            .first()
            .ok_or_else(|| corrupt("the barrier's row", "vanished inside its transaction"))?;
        let generation: i64 = col(row, 0)?;
        let current: i32 = col(row, 1)?;
        let generation = u64::try_from(generation).map_err(|_| {
            corrupt(
                format_args!("the barriers row of {k}"),
                format!("holds the generation {generation}, not a count"),
            )
        })?;
        self.query(conn, &sql.sweep, &[(&k, Type::TEXT), (&bm, Type::INT4)])
            .await?;
        let rows = self.query(conn, &sql.live, &[(&k, Type::TEXT)]).await?;
        let live: i64 = match rows.first() {
            Some(r) => col(r, 0)?,
            None => 0,
        };
        if live > 0 && current != parties {
            self.exec(conn, "ROLLBACK").await?;
            return Ok(Arrived::Mismatch(u32::try_from(current).unwrap_or(0)));
        }
        let g = generation as i64;
        if live + 1 >= i64::from(parties) {
            self.query(conn, &sql.mark, &[(&k, Type::TEXT), (&g, Type::INT8)])
                .await?;
            self.query(
                conn,
                &sql.advance,
                &[(&k, Type::TEXT), (&parties, Type::INT4)],
            )
            .await?;
            if live > 0 {
                let topic = format!("barrier:{k}");
                self.query(
                    conn,
                    &self.sql.notify,
                    &[
                        (&self.channel.as_str(), Type::TEXT),
                        (&topic.as_str(), Type::TEXT),
                    ],
                )
                .await?;
            }
            self.exec(conn, "COMMIT").await?;
            return Ok(Arrived::Passed(generation));
        }
        if live == 0 && current != parties {
            self.query(
                conn,
                &sql.set_parties,
                &[(&k, Type::TEXT), (&parties, Type::INT4)],
            )
            .await?;
        }
        let ttl_ms = ARRIVAL_TTL.as_millis() as i64;
        let rows = self
            .query(
                conn,
                &sql.insert,
                &[
                    (&k, Type::TEXT),
                    (&holder, Type::TEXT),
                    (&ttl_ms, Type::INT8),
                ],
            )
            .await?;
        let ticket: i64 = match rows.first() {
            Some(r) => col(r, 0)?,
            None => return Err(corrupt("inserting an arrival", "returned no ticket")),
        };
        // Taken before the arrival is visible to anyone: nobody sees it without its lock.
        let rows = self
            .query(
                conn,
                "SELECT pg_try_advisory_lock($1, ($2 % 2147483647)::integer)",
                &[(&bm, Type::INT4), (&ticket, Type::INT8)],
            )
            .await?;
        let locked: bool = match rows.first() {
            Some(r) => col(r, 0)?,
            None => false,
        };
        if !locked {
            return Err(Fail::Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "advisory lock ({bm}, {}) of barrier arrival {ticket} is held by another session",
                    ticket % 2_147_483_647
                ),
            )));
        }
        self.exec(conn, "COMMIT").await?;
        Ok(Arrived::Waiting(ticket))
    }

    /// One look at this party's row.
    async fn standing(&self, conn: &Conn, sql: &BarrierSql, ticket: i64) -> Result<Standing, Fail> {
        let rows = self
            .query(conn, &sql.look, &[(&ticket, Type::INT8)])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(Standing::Gone);
        };
        let passed: Option<i64> = col(row, 0)?;
        let pid: i32 = col(row, 1)?;
        let now: i32 = col(row, 2)?;
        if pid != now {
            return Err(Fail::Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the barrier party's server session changed (backend pid {pid}, now {now}): \
                     a transaction-mode pooler (PgBouncer pool_mode=transaction) is between \
                     baton and PostgreSQL; connect directly or use session pooling"
                ),
            )));
        }
        Ok(match passed {
            Some(g) => Standing::Passed(u64::try_from(g).unwrap_or(0)),
            None => Standing::Waiting,
        })
    }

    /// Deletes this party's row (after its pass) and drops its lock; drops the
    /// connection when that fails (the session's end drops the lock).
    async fn leave_barrier(&self, conn: Conn, sql: &BarrierSql, ticket: i64) {
        let deleted = self
            .query(&conn, &sql.delete, &[(&ticket, Type::INT8)])
            .await;
        if deleted.is_ok() && self.unlock_arrival(&conn, ticket).await {
            self.checkin(conn);
        }
    }

    async fn unlock_arrival(&self, conn: &Conn, ticket: i64) -> bool {
        let bm = self.barrier_magic();
        self.query(
            conn,
            "SELECT pg_advisory_unlock($1, ($2 % 2147483647)::integer)",
            &[(&bm, Type::INT4), (&ticket, Type::INT8)],
        )
        .await
        .is_ok()
    }

    /// Withdraws this party's arrival under the barrier row's lock, unless its
    /// generation passed meanwhile (then the pass is the answer).
    async fn withdraw(
        &self,
        conn: Conn,
        sql: &BarrierSql,
        key: &Key,
        ticket: i64,
        why: Error,
        passed: &(dyn Fn(u64) -> BarrierPassed + Send + Sync),
    ) -> Result<BarrierPassed, Error> {
        let k = key.as_str();
        let outcome: Result<Option<i64>, Fail> = async {
            self.exec(&conn, "BEGIN").await?;
            self.query(&conn, &sql.lock_row, &[(&k, Type::TEXT)])
                .await?;
            let rows = self
                .query(&conn, &sql.delete, &[(&ticket, Type::INT8)])
                .await?;
            let g = match rows.first() {
                Some(r) => col::<Option<i64>>(r, 0)?,
                None => None,
            };
            self.exec(&conn, "COMMIT").await?;
            Ok(g)
        }
        .await;
        match outcome {
            Ok(g) => {
                if self.unlock_arrival(&conn, ticket).await {
                    self.checkin(conn);
                }
                match g {
                    Some(g) => Ok(passed(u64::try_from(g).unwrap_or(0))),
                    None => Err(why),
                }
            }
            // The session ends with the connection: the arrival's lock goes with it, and
            // the row counts as dead at the next decision.
            Err(_) => Err(why),
        }
    }

    /// One statement without parameters or rows (transaction control), bounded.
    async fn exec(&self, conn: &Conn, sql: &str) -> Result<(), Fail> {
        match tokio::time::timeout(self.cfg.timeout, conn.client.batch_execute(sql)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(Fail::Timeout("a query")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_locks_do_not_share_the_waiters_number() {
        assert_ne!(magic("baton:barrier"), magic("baton"));
    }
}
