//! Barriers in the SQLite store (`baton_core::barrier` has the semantics).
//!
//! Two tables, created on first use beside the lock tables:
//! - `baton_barriers(key, generation, parties)`: the generation now filling and its size;
//! - `baton_barrier_arrivals(key, holder_id, boot_id, expires_boot_ns, passed)`: one row
//!   per waiting party. The arrival that completes a generation marks every live arrival
//!   of it `passed = generation` and starts the next generation, in one `BEGIN IMMEDIATE`
//!   transaction; each waiter then sees its own row marked, deletes it and returns.
//!
//! Dead parties: a waiting party refreshes its row's expiry every [`ARRIVAL_TTL`]/3; a
//! row past its expiry (or from another boot) is deleted by the next arrival, so a party
//! that died while waiting stops counting within [`ARRIVAL_TTL`]. A party stopped (SIGSTOP)
//! longer than that loses its arrival too, and gets an error when it resumes.
//!
//! Waiting: a party sleeps with backoff (1 ms doubling to 50 ms) between reads of
//! `PRAGMA data_version`, which changes only when another connection commits, and reads
//! its row only then; no write happens while it waits except the refresh.

use std::time::{Duration, Instant};

use baton_core::kit::errors;
use baton_core::kit::runtime::CancelFlag;
use baton_core::kit::time::{monotonic_ns, next_wake, Refresh, ARRIVAL_TTL};
use baton_core::{format_duration, BarrierPassed, BarrierRequest, Error, ErrorKind, Op, Wait};
use rusqlite::{OptionalExtension, TransactionBehavior};

use crate::core::{self, retry, Fail, Inner, OP_BUSY_BOUND};

const TABLES: &str = "
CREATE TABLE IF NOT EXISTS baton_barriers(
    key TEXT PRIMARY KEY NOT NULL,
    generation INTEGER NOT NULL CHECK (generation >= 0),
    parties INTEGER NOT NULL CHECK (parties >= 1)
) STRICT;
CREATE TABLE IF NOT EXISTS baton_barrier_arrivals(
    key TEXT NOT NULL,
    holder_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    expires_boot_ns INTEGER NOT NULL,
    passed INTEGER,
    PRIMARY KEY (key, holder_id)
) STRICT;
";

/// Where an arrival stands.
enum Arrival {
    Passed(u64),
    Waiting,
    /// The row is gone: expired while this party was stopped.
    Gone,
}

impl Inner {
    /// Arrives at `req.key` and waits (see the module docs); gives up at the wait's
    /// deadline or when `cancel` is set, withdrawing the arrival first.
    pub(crate) fn barrier_blocking(
        &self,
        req: &BarrierRequest,
        cancel: &CancelFlag,
    ) -> Result<BarrierPassed, Error> {
        let key = req.key.as_str().to_owned();
        let me = req.holder.id.to_string();
        let parties = i64::from(req.parties);
        let busy_deadline = Instant::now().checked_add(OP_BUSY_BOUND);
        let deadline = match req.wait {
            Wait::Timeout(d) => Instant::now().checked_add(d),
            Wait::NoWait => Some(Instant::now()),
            Wait::Forever => None,
        };
        let mut conn = self
            .conn(busy_deadline)
            .map_err(|s| self.stopped(s, Op::Barrier, Some(&req.key)))?;
        let boot = self.boot_id.clone();
        let passed = |generation: u64| BarrierPassed {
            key: req.key.clone(),
            generation,
            parties: req.parties,
        };
        // Arrive.
        let arrived = retry(busy_deadline, Some(cancel), || {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(TABLES)?;
            let now = monotonic_ns();
            tx.execute(
                "DELETE FROM baton_barrier_arrivals WHERE key = ?1
                 AND (boot_id != ?2 OR expires_boot_ns <= ?3)",
                rusqlite::params![key, boot, now],
            )?;
            let live: i64 = tx.query_row(
                "SELECT count(*) FROM baton_barrier_arrivals WHERE key = ?1 AND passed IS NULL",
                [&key],
                |r| r.get(0),
            )?;
            let row: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT generation, parties FROM baton_barriers WHERE key = ?1",
                    [&key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let generation = match row {
                Some((g, p)) if p != parties && live > 0 => {
                    return Err(Fail::Err(
                        Error::new(
                            ErrorKind::LimitMismatch,
                            format!(
                                "generation {g} of this barrier has {p} parties, not {parties}"
                            ),
                        )
                        .with_current_limit(u32::try_from(p).unwrap_or(u32::MAX)),
                    ))
                }
                Some((g, _)) => g,
                None => 0,
            };
            tx.execute(
                "INSERT INTO baton_barriers(key, generation, parties) VALUES (?1, ?2, ?3)
                 ON CONFLICT(key) DO UPDATE SET parties = excluded.parties",
                rusqlite::params![key, generation, parties],
            )?;
            let expires = now.saturating_add(ARRIVAL_TTL.as_nanos() as i64);
            tx.execute(
                "INSERT OR REPLACE INTO baton_barrier_arrivals
                 (key, holder_id, boot_id, expires_boot_ns, passed) VALUES (?1, ?2, ?3, ?4, NULL)",
                rusqlite::params![key, me, boot, expires],
            )?;
            let outcome = if live + 1 >= parties {
                tx.execute(
                    "UPDATE baton_barrier_arrivals SET passed = ?2 WHERE key = ?1 AND passed IS NULL",
                    rusqlite::params![key, generation],
                )?;
                tx.execute(
                    "DELETE FROM baton_barrier_arrivals WHERE key = ?1 AND holder_id = ?2",
                    rusqlite::params![key, me],
                )?;
                tx.execute(
                    "UPDATE baton_barriers SET generation = generation + 1 WHERE key = ?1",
                    [&key],
                )?;
                Some(generation as u64)
            } else {
                None
            };
            tx.commit()?;
            Ok(outcome)
        });
        let arrived = match arrived {
            Ok(a) => a,
            Err(s) => {
                self.put(conn);
                return Err(self.stopped(s, Op::Barrier, Some(&req.key)));
            }
        };
        if let Some(g) = arrived {
            self.put(conn);
            return Ok(passed(g));
        }
        // Wait.
        let mut seen = i64::MIN;
        let mut interval = Duration::from_millis(1);
        let mut refresh = Refresh::new(ARRIVAL_TTL, Instant::now());
        let result = loop {
            let v = core::data_version(&conn).unwrap_or(i64::MAX);
            if v != seen {
                seen = v;
                match self.arrival_standing(&conn, &key, &me) {
                    Ok(Arrival::Passed(g)) => {
                        break self.leave(&mut conn, &key, &me, Ok(passed(g)))
                    }
                    Ok(Arrival::Waiting) => {}
                    Ok(Arrival::Gone) => {
                        break Err(self.err(
                            ErrorKind::Lost,
                            Op::Barrier,
                            Some(&req.key),
                            format!(
                                "this party's arrival expired (it was stopped for longer than {}) \
                                 and was dropped; arrive again",
                                format_duration(ARRIVAL_TTL)
                            ),
                        ))
                    }
                    Err(e) => break self.leave(&mut conn, &key, &me, Err(e)),
                }
            }
            let stop = cancel.is_set();
            let now = Instant::now();
            if stop || deadline.is_some_and(|d| now >= d) {
                let why = if stop {
                    self.err(
                        ErrorKind::Cancelled,
                        Op::Barrier,
                        Some(&req.key),
                        "cancelled",
                    )
                } else {
                    let timeout = match req.wait {
                        Wait::Timeout(d) => Some(d),
                        Wait::NoWait | Wait::Forever => None,
                    };
                    self.ctx(
                        errors::barrier_gave_up(timeout),
                        Op::Barrier,
                        Some(&req.key),
                    )
                };
                break self.withdraw(&mut conn, &key, &me, why, &passed);
            }
            if refresh.due(now) {
                refresh.done(now);
                let expires = monotonic_ns().saturating_add(ARRIVAL_TTL.as_nanos() as i64);
                let _ = retry(busy_deadline, None, || {
                    conn.execute(
                        "UPDATE baton_barrier_arrivals SET expires_boot_ns = ?3
                         WHERE key = ?1 AND holder_id = ?2 AND passed IS NULL",
                        rusqlite::params![key, me, expires],
                    )?;
                    Ok(())
                });
            }
            let mut pause = interval;
            if let Some(wake) = next_wake([deadline, Some(refresh.due_at())]) {
                pause = pause.min(wake.saturating_duration_since(now));
            }
            std::thread::sleep(pause);
            interval = (interval * 2).min(Duration::from_millis(50));
        };
        self.put(conn);
        result
    }

    fn arrival_standing(
        &self,
        conn: &rusqlite::Connection,
        key: &str,
        me: &str,
    ) -> Result<Arrival, Error> {
        let row: Option<Option<i64>> = conn
            .query_row(
                "SELECT passed FROM baton_barrier_arrivals WHERE key = ?1 AND holder_id = ?2",
                [key, me],
                |r| r.get(0),
            )
            .optional()
            .map_err(core::sql_error)?;
        Ok(match row {
            Some(Some(g)) => Arrival::Passed(g.max(0) as u64),
            Some(None) => Arrival::Waiting,
            None => Arrival::Gone,
        })
    }

    /// Deletes this party's row after it passed (or failed to read it).
    fn leave(
        &self,
        conn: &mut rusqlite::Connection,
        key: &str,
        me: &str,
        result: Result<BarrierPassed, Error>,
    ) -> Result<BarrierPassed, Error> {
        let deadline = Instant::now().checked_add(OP_BUSY_BOUND);
        let _ = retry(deadline, None, || {
            conn.execute(
                "DELETE FROM baton_barrier_arrivals WHERE key = ?1 AND holder_id = ?2",
                [key, me],
            )?;
            Ok(())
        });
        result
    }

    /// Withdraws this party's arrival, unless its generation passed meanwhile (then the
    /// pass is the answer).
    fn withdraw(
        &self,
        conn: &mut rusqlite::Connection,
        key: &str,
        me: &str,
        why: Error,
        passed: &dyn Fn(u64) -> BarrierPassed,
    ) -> Result<BarrierPassed, Error> {
        let deadline = Instant::now().checked_add(OP_BUSY_BOUND);
        let outcome = retry(deadline, None, || {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<Option<i64>> = tx
                .query_row(
                    "SELECT passed FROM baton_barrier_arrivals WHERE key = ?1 AND holder_id = ?2",
                    [key, me],
                    |r| r.get(0),
                )
                .optional()?;
            tx.execute(
                "DELETE FROM baton_barrier_arrivals WHERE key = ?1 AND holder_id = ?2",
                [key, me],
            )?;
            tx.commit()?;
            Ok(row.flatten())
        });
        match outcome {
            Ok(Some(g)) => Ok(passed(g.max(0) as u64)),
            Ok(None) => Err(why),
            // The row stays; it expires within ARRIVAL_TTL.
            Err(_) => Err(why),
        }
    }
}
