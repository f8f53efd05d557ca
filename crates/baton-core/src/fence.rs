//! The fence helper for a SQLite resource: the resource side of fencing tokens.
//!
//! A lock cannot stop a holder that was paused or partitioned past its lease from writing
//! late (DESIGN, contract point 2). The resource can: it remembers, per key, the highest
//! token it has seen, and refuses a write that carries a lower one. This module keeps that
//! table (`baton_fence`) in the resource's own SQLite database and runs the caller's write
//! in the same `BEGIN IMMEDIATE` transaction as the check, so no write can slip between
//! check and record.
//!
//! ```no_run
//! # fn demo(token: baton_core::Token) -> baton_core::Result<()> {
//! use baton_core::fence::{Fence, FenceRule};
//! let mut conn = rusqlite::Connection::open("results.db").expect("open");
//! Fence::new(FenceRule::SameOrNewer).write(&mut conn, "nightly-report", token, |tx| {
//!     tx.execute("INSERT INTO results(day, total) VALUES ('2026-11-23', 42)", [])
//! })?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::{Error, ErrorKind, Token};

/// Re-exported so callers name the same SQLite types the fence uses.
pub use rusqlite;

/// Which tokens a fence accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceRule {
    /// A token at least as high as the highest seen: one grant may write many times, and
    /// anything from an older grant is refused. The usual choice.
    SameOrNewer,
    /// Only a token higher than the highest seen: each grant writes once (a second write
    /// with the same token is refused too).
    NewerOnly,
}

/// A fence over a SQLite database.
#[derive(Clone, Copy, Debug)]
pub struct Fence {
    rule: FenceRule,
}

const TABLE: &str = "CREATE TABLE IF NOT EXISTS baton_fence (
    key TEXT PRIMARY KEY NOT NULL,
    token INTEGER NOT NULL
) STRICT";

impl Fence {
    /// A fence that accepts tokens by `rule`.
    pub fn new(rule: FenceRule) -> Fence {
        Fence { rule }
    }

    /// Runs `write` in one `BEGIN IMMEDIATE` transaction with the fence check: if `token`
    /// is accepted for `key`, records it as the highest and commits the write; otherwise
    /// rolls back and fails with [`ErrorKind::Fenced`]. An error from `write` rolls back
    /// everything, the token included.
    pub fn write<T>(
        &self,
        conn: &mut Connection,
        key: &str,
        token: Token,
        write: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, Error> {
        let sql_err = |what: &str, e: rusqlite::Error| {
            let kind = match e.sqlite_error_code() {
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                    ErrorKind::Corrupt
                }
                _ => ErrorKind::Unavailable,
            };
            Error::new(kind, format!("fence on '{key}': {what}")).with_source(e)
        };
        let stored = i64::try_from(token.0).map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("fence on '{key}': token {token} does not fit SQLite's INTEGER"),
            )
        })?;
        // Writers queue on SQLite's lock rather than failing with "database is locked".
        conn.busy_timeout(Duration::from_secs(60))
            .map_err(|e| sql_err("cannot set a busy timeout", e))?;
        conn.execute_batch(TABLE)
            .map_err(|e| sql_err("cannot create the fence table", e))?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| sql_err("cannot begin a transaction", e))?;
        let highest: Option<i64> = tx
            .query_row("SELECT token FROM baton_fence WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| sql_err("cannot read the highest token (is baton_fence baton's?)", e))?;
        let accepted = match (highest, self.rule) {
            (None, _) => true,
            (Some(h), FenceRule::SameOrNewer) => stored >= h,
            (Some(h), FenceRule::NewerOnly) => stored > h,
        };
        if !accepted {
            let h = highest.unwrap_or_default();
            return Err(Error::new(
                ErrorKind::Fenced,
                format!(
                    "fence on '{key}': token {token} refused, token {h} was seen already (its holder lost the lock)"
                ),
            ));
        }
        tx.execute(
            "INSERT INTO baton_fence(key, token) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET token = excluded.token",
            rusqlite::params![key, stored],
        )
        .map_err(|e| sql_err("cannot record the token", e))?;
        let out = write(&tx).map_err(|e| sql_err("the fenced write failed", e))?;
        tx.commit().map_err(|e| sql_err("cannot commit", e))?;
        Ok(out)
    }

    /// The highest token seen for `key`, if any.
    pub fn highest(conn: &Connection, key: &str) -> Result<Option<Token>, Error> {
        let sql_err = |e: rusqlite::Error| {
            Error::new(ErrorKind::Unavailable, format!("fence on '{key}'")).with_source(e)
        };
        let exists: bool = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'baton_fence'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(sql_err)?
            > 0;
        if !exists {
            return Ok(None);
        }
        let t: Option<i64> = conn
            .query_row("SELECT token FROM baton_fence WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql_err)?;
        Ok(t.and_then(|t| u64::try_from(t).ok()).map(Token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("tmp");
        let conn = Connection::open(dir.path().join("r.db")).expect("open");
        conn.execute_batch("CREATE TABLE results(v TEXT)")
            .expect("table");
        (dir, conn)
    }

    fn count(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM results", [], |r| r.get(0))
            .expect("count")
    }

    #[test]
    fn older_tokens_are_refused_and_write_nothing() {
        let (_d, mut conn) = db();
        let f = Fence::new(FenceRule::SameOrNewer);
        let ins =
            |tx: &rusqlite::Transaction<'_>| tx.execute("INSERT INTO results VALUES ('x')", []);
        f.write(&mut conn, "k", Token(5), ins).expect("first");
        f.write(&mut conn, "k", Token(5), ins)
            .expect("same grant writes again");
        f.write(&mut conn, "k", Token(9), ins).expect("newer");
        let err = f.write(&mut conn, "k", Token(7), ins).expect_err("stale");
        assert_eq!(err.kind(), ErrorKind::Fenced);
        assert!(err.to_string().contains("token 9"), "{err}");
        assert_eq!(count(&conn), 3, "the refused write was not made");
        assert_eq!(Fence::highest(&conn, "k").expect("highest"), Some(Token(9)));
        // Keys are fenced separately.
        f.write(&mut conn, "other", Token(1), ins)
            .expect("other key");
    }

    #[test]
    fn newer_only_refuses_a_second_write_of_one_grant() {
        let (_d, mut conn) = db();
        let f = Fence::new(FenceRule::NewerOnly);
        let ins =
            |tx: &rusqlite::Transaction<'_>| tx.execute("INSERT INTO results VALUES ('x')", []);
        f.write(&mut conn, "k", Token(5), ins).expect("first");
        assert_eq!(
            f.write(&mut conn, "k", Token(5), ins)
                .expect_err("again")
                .kind(),
            ErrorKind::Fenced
        );
        assert_eq!(count(&conn), 1);
    }

    #[test]
    fn a_failed_write_rolls_back_the_token_too() {
        let (_d, mut conn) = db();
        let f = Fence::new(FenceRule::SameOrNewer);
        let bad = |tx: &rusqlite::Transaction<'_>| tx.execute("INSERT INTO nosuch VALUES (1)", []);
        f.write(&mut conn, "k", Token(9), bad).expect_err("bad sql");
        assert_eq!(Fence::highest(&conn, "k").expect("highest"), None);
    }

    #[test]
    fn a_foreign_fence_table_is_a_clear_error() {
        let (_d, mut conn) = db();
        conn.execute_batch("DROP TABLE results; CREATE TABLE baton_fence(x BLOB)")
            .expect("foreign");
        let err = Fence::new(FenceRule::SameOrNewer)
            .write(&mut conn, "k", Token(1), |_| Ok(()))
            .expect_err("foreign table");
        assert!(err.to_string().contains("fence on 'k'"), "{err:#}");
    }
}
