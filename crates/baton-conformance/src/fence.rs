//! The fenced resource of the lease properties: a SQLite database in the scratch directory,
//! written through `baton_core::fence` (contract point 2: safety comes from the resource
//! checking the token). Every write, accepted or refused, goes into the history.

use std::path::Path;

use baton_core::fence::rusqlite::{self, Connection};
use baton_core::fence::{Fence, FenceRule};
use baton_core::{Error, ErrorKind, Key, Token};

use crate::history::Event;

/// Writes one row `(pid, token)` to `db` through the fence for `key`, and returns the
/// `fence_write` event that records how it went.
pub(crate) fn write(db: &Path, key: &Key, token: Token) -> Event {
    let pid = std::process::id();
    let result = Connection::open(db)
        .map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot open the fenced database {}", db.display()),
            )
            .with_source(e)
        })
        .and_then(|mut conn| {
            Fence::new(FenceRule::SameOrNewer).write(&mut conn, key.as_str(), token, |tx| {
                tx.execute(
                    "CREATE TABLE IF NOT EXISTS conformance_writes (
                         pid INTEGER NOT NULL, token INTEGER NOT NULL)",
                    [],
                )?;
                tx.execute(
                    "INSERT INTO conformance_writes(pid, token) VALUES (?1, ?2)",
                    rusqlite::params![pid, token.0 as i64],
                )
            })
        });
    Event::fence_write(pid, key, token, &result)
}

/// The rows the fence let through, as `(pid, token)` in the order they were written.
pub(crate) fn rows(db: &Path) -> Vec<(u32, u64)> {
    let conn = Connection::open(db)
        .unwrap_or_else(|e| panic!("cannot open the fenced database {}: {e}", db.display()));
    let mut stmt = conn
        .prepare("SELECT pid, token FROM conformance_writes ORDER BY rowid")
        .unwrap_or_else(|e| panic!("cannot read the fenced writes: {e}"));
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .unwrap_or_else(|e| panic!("cannot read the fenced writes: {e}"));
    rows
}
