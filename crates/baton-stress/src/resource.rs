//! The fenced resource of a stress run: a SQLite database (`results.db`) that workers
//! write through the fence helper (`baton_core::fence`), so that a write from a holder that
//! lost its lease is refused. Every write, accepted or refused, goes into the history; the
//! rows the database accepted are what [`crate::check::results`] and
//! [`crate::check::stale`] read.
//!
//! The fence key is the lock's key and slot (`KEY#SLOT`): holders of one slot follow one
//! another, so their tokens must rise; holders of different slots of a semaphore hold at
//! the same time and their tokens are not ordered.

use std::path::Path;
use std::time::Duration;

use baton_core::fence::rusqlite::{self, Connection};
use baton_core::fence::{Fence, FenceRule};
use baton_core::{Error, ErrorKind, Key, Token};

use crate::history::Event;

/// What a row records.
pub const CLAIM: &str = "claim";
/// The event's result: exactly one per event that succeeded.
pub const RESULT: &str = "result";

/// One row the resource accepted, in commit order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The event.
    pub id: u64,
    /// The writer.
    pub pid: u32,
    /// The fence key (`KEY#SLOT`).
    pub fence_key: String,
    /// The token the write carried.
    pub token: u64,
    /// [`CLAIM`] (right after the grant, so later writes of older holders are refused) or
    /// [`RESULT`].
    pub kind: String,
}

/// The fence key of a slot of `key`.
pub fn fence_key(key: &Key, slot: u32) -> String {
    format!("{key}#{slot}")
}

fn open(db: &Path) -> Result<Connection, Error> {
    let conn = Connection::open(db).map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("cannot open the results database {}", db.display()),
        )
        .with_source(e)
    })?;
    conn.busy_timeout(Duration::from_secs(60)).map_err(|e| {
        Error::new(ErrorKind::Unavailable, "cannot set a busy timeout").with_source(e)
    })?;
    Ok(conn)
}

/// Creates the results database with WAL on, before any worker starts.
pub fn create(db: &Path) -> Result<(), Error> {
    let conn = open(db)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE IF NOT EXISTS stress_writes (
             id INTEGER NOT NULL, pid INTEGER NOT NULL, fence_key TEXT NOT NULL,
             token INTEGER NOT NULL, kind TEXT NOT NULL);",
    )
    .map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("cannot create the results database {}", db.display()),
        )
        .with_source(e)
    })
}

/// The environment variable that breaks the resource on purpose, **for testing the
/// checkers only** (the CLI tests set it to show that the `stale` and `results` checkers
/// fail end to end; no store fault can reach them while the fence works):
///
/// - `unfenced`: every write is committed without asking the fence (so with falling
///   tokens a stale write is accepted);
/// - `lost-result`: a `result` write is reported accepted but not committed.
pub const FAULT_ENV: &str = "BATON_STRESS_RESOURCE_FAULT";

/// Writes one row through the fence for `fence_key` and returns the `fence_write` event
/// that records how it went (its `key` is the lock's key).
pub fn write(db: &Path, key: &Key, slot: u32, token: Token, id: u64, kind: &str) -> Event {
    let pid = std::process::id();
    let fkey = fence_key(key, slot);
    let fault = std::env::var(FAULT_ENV).unwrap_or_default();
    let insert = |tx: &rusqlite::Transaction<'_>| {
        if fault == "lost-result" && kind == RESULT {
            return Ok(0);
        }
        tx.execute(
            "INSERT INTO stress_writes(id, pid, fence_key, token, kind)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![id as i64, pid, fkey, token.0 as i64, kind],
        )
    };
    let result = open(db).and_then(|mut conn| {
        if fault == "unfenced" {
            let unavailable =
                |e| Error::new(ErrorKind::Unavailable, "unfenced write failed").with_source(e);
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            insert(&tx).map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        } else {
            Fence::new(FenceRule::SameOrNewer)
                .write(&mut conn, &fkey, token, |tx| insert(tx))
                .map(|_| ())
        }
    });
    Event::fence_write(pid, key, token, &result)
}

/// Every row the resource accepted, in commit order.
pub fn rows(db: &Path) -> Result<Vec<Row>, Error> {
    let conn = open(db)?;
    let read = || -> rusqlite::Result<Vec<Row>> {
        let mut stmt = conn
            .prepare("SELECT id, pid, fence_key, token, kind FROM stress_writes ORDER BY rowid")?;
        let rows = stmt.query_map([], |r| {
            Ok(Row {
                id: r.get::<_, i64>(0)? as u64,
                pid: r.get(1)?,
                fence_key: r.get(2)?,
                token: r.get::<_, i64>(3)? as u64,
                kind: r.get(4)?,
            })
        })?;
        rows.collect()
    };
    read().map_err(|e| {
        Error::new(
            ErrorKind::Corrupt,
            format!("cannot read the results database {}", db.display()),
        )
        .with_source(e)
    })
}
