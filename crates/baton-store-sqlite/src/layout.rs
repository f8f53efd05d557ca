//! What lives in the database: baton's schema (checked, or created in an empty file,
//! when the store opens), the rows as read, the parts of a request as written, and the
//! checks that a value read is one baton wrote.
//!
//! Guarantees:
//! - A file is used only if it is empty (it then gets baton's schema) or carries baton's
//!   `application_id` and a `user_version` this code knows. Anything else is refused
//!   before anything is written to it; the journal mode is switched to WAL only after.
//! - A value of the wrong type in a row is [`ErrorKind::Corrupt`], never a panic and
//!   never a guess.
//! - A request's TTL and lock-delay are checked ([`Encoded::new`]) before anything is
//!   written, so no expiry or hold-back arithmetic overflows.

use std::path::Path;
use std::time::{Duration, Instant};

use baton_core::kit::errors;
use baton_core::kit::time::validate_ttl;
use baton_core::{AcquireRequest, Error, ErrorKind, Key, Token};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Row, TransactionBehavior};

use crate::core::{corrupt, Fail};

/// `PRAGMA application_id` of a baton database: "batn" in ASCII.
pub const APPLICATION_ID: i32 = 0x6261_746E;

/// `PRAGMA user_version` of the schema this code writes (and the newest it reads).
/// Version 2 added lock-delays (`baton_lock_delays`, `baton_held_back`), version 3 the
/// token floors of deleted keys (`baton_retired_keys`). An older file gets the newer
/// tables beside its own and keeps its version, so older batons keep using it, until a
/// transaction uses what they would ignore: creating a key with a lock-delay raises it to
/// 2, deleting a key to 3 (a baton that knows no floors would hand a key made again its
/// old tokens).
pub const SCHEMA_VERSION: i32 = 3;

/// The first version with lock-delays.
const LOCK_DELAY_VERSION: i32 = 2;

/// The `user_version` of files written before lock-delays, still read and written.
const SCHEMA_VERSION_1: i32 = 1;

const SCHEMA: &str = "
CREATE TABLE baton_keys(
    key TEXT PRIMARY KEY NOT NULL,
    lim INTEGER NOT NULL CHECK (lim >= 1),
    seq INTEGER NOT NULL CHECK (seq >= 0)
) STRICT;
CREATE TABLE baton_leases(
    key TEXT NOT NULL,
    slot INTEGER NOT NULL CHECK (slot >= 0),
    token INTEGER NOT NULL,
    holder_id TEXT NOT NULL,
    holder_json TEXT NOT NULL,
    acquired_ms INTEGER NOT NULL,
    renewed_ms INTEGER NOT NULL,
    ttl_ms INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    expires_boot_ns INTEGER NOT NULL,
    PRIMARY KEY (key, slot)
) STRICT;
CREATE TABLE baton_waiters(
    ticket INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    holder_id TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    expires_boot_ns INTEGER NOT NULL
) STRICT;
CREATE INDEX baton_waiters_by_key ON baton_waiters(key, ticket);
" /* then LOCK_DELAY_TABLES */;

/// The lock-delay tables (schema version 2): a key's delay, set when the key is created,
/// and per slot, until when (on `boot_id`'s `CLOCK_MONOTONIC`) a lost lease holds it back.
pub(crate) const LOCK_DELAY_TABLES: &str = "
CREATE TABLE IF NOT EXISTS baton_lock_delays(
    key TEXT PRIMARY KEY NOT NULL,
    delay_ms INTEGER NOT NULL CHECK (delay_ms >= 1)
) STRICT;
CREATE TABLE IF NOT EXISTS baton_held_back(
    key TEXT NOT NULL,
    slot INTEGER NOT NULL CHECK (slot >= 0),
    token INTEGER NOT NULL,
    how TEXT NOT NULL CHECK (how IN ('expired', 'broken')),
    lost_ms INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    until_boot_ns INTEGER NOT NULL,
    PRIMARY KEY (key, slot)
) STRICT;
";

/// The token floors of deleted keys (schema version 3): a key made again takes its
/// tokens on from the last one its earlier life granted.
pub(crate) const RETIRED_TABLE: &str = "
CREATE TABLE IF NOT EXISTS baton_retired_keys(
    key TEXT PRIMARY KEY NOT NULL,
    seq INTEGER NOT NULL CHECK (seq >= 0)
) STRICT;
";

const TABLES: [&str; 6] = [
    "baton_keys",
    "baton_leases",
    "baton_waiters",
    "baton_lock_delays",
    "baton_held_back",
    "baton_retired_keys",
];

/// Raises an older file to `version` inside the caller's write transaction.
fn require_version(tx: &Connection, version: i32) -> Result<(), Fail> {
    let have: i32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if have < version {
        tx.pragma_update(None, "user_version", version)?;
    }
    Ok(())
}

/// Raises a version-1 file to version 2 (called when a key with a lock-delay is created).
pub(crate) fn require_lock_delay_schema(tx: &Connection) -> Result<(), Fail> {
    require_version(tx, LOCK_DELAY_VERSION)
}

/// Raises an older file to version 3 (called when a key is deleted).
pub(crate) fn require_retired_schema(tx: &Connection) -> Result<(), Fail> {
    require_version(tx, SCHEMA_VERSION)
}

/// Checks that `conn`'s file is baton's (creating the schema in an empty file) and puts
/// it in WAL mode. Nothing is written to a file that is not baton's.
pub(crate) fn check_or_init(conn: &mut Connection, path: &Path) -> Result<(), Fail> {
    let shown = path.display();
    let (app, version, objects) = header(conn)?;
    if app == 0 && objects == 0 {
        // Empty: switch to WAL first (it cannot change inside a transaction), then create
        // the schema in a write transaction that checks again, since another process may
        // be doing the same.
        wal(conn, path)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (app, _, objects) = header(&tx)?;
        if app == 0 && objects == 0 {
            tx.execute_batch(SCHEMA)?;
            tx.execute_batch(LOCK_DELAY_TABLES)?;
            tx.execute_batch(RETIRED_TABLE)?;
            tx.pragma_update(None, "application_id", APPLICATION_ID)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;
        return check_or_init(conn, path);
    }
    if app != APPLICATION_ID {
        return Err(Fail::Err(
            errors::corrupt(
                &shown,
                format_args!(
                    "is not a baton database (application_id {app:#x}, {objects} schema \
                     object(s)); refusing to use or change it: give baton a file of its own"
                ),
            )
            .permanent(),
        ));
    }
    let known = (SCHEMA_VERSION_1..=SCHEMA_VERSION).contains(&version);
    if known
        && version < SCHEMA_VERSION
        && has_tables(conn, &TABLES[..3])?
        && !has_tables(conn, &TABLES)?
    {
        // Add the newer tables; the version stays (see SCHEMA_VERSION).
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(LOCK_DELAY_TABLES)?;
        tx.execute_batch(RETIRED_TABLE)?;
        tx.commit()?;
    }
    if !known {
        let kind = if version > SCHEMA_VERSION {
            ErrorKind::Unsupported
        } else {
            ErrorKind::Corrupt
        };
        return Err(Fail::Err(Error::new(
            kind,
            format!(
                "{shown} is a baton database of schema version {version}; this baton knows \
                 version {SCHEMA_VERSION} (a newer baton wrote it?)"
            ),
        )));
    }
    if let Some(missing) = missing_table(conn, &TABLES)? {
        return Err(corrupt(format!(
            "{shown} carries baton's application_id but has no table {missing}"
        )));
    }
    wal(conn, path)
}

fn missing_table(conn: &Connection, tables: &[&'static str]) -> Result<Option<&'static str>, Fail> {
    let mut stmt = conn.prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(tables
        .iter()
        .copied()
        .find(|t| !names.iter().any(|n| n == *t)))
}

fn has_tables(conn: &Connection, tables: &[&'static str]) -> Result<bool, Fail> {
    missing_table(conn, tables).map(|m| m.is_none())
}

/// `(application_id, user_version, number of schema objects)`, read in one statement so
/// that all three come from one snapshot: read one by one, they could straddle another
/// process's commit of the schema and show its tables without its application_id.
fn header(conn: &Connection) -> Result<(i32, i32, i64), Fail> {
    Ok(conn.query_row(
        "SELECT (SELECT application_id FROM pragma_application_id()),
                (SELECT user_version FROM pragma_user_version()),
                (SELECT count(*) FROM sqlite_schema)",
        [],
        |r| {
            Ok((
                r.get::<_, i32>(0)?,
                r.get::<_, i32>(1)?,
                r.get::<_, i64>(2)?,
            ))
        },
    )?)
}

fn wal(conn: &Connection, path: &Path) -> Result<(), Fail> {
    let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
    if mode.eq_ignore_ascii_case("wal") {
        return Ok(());
    }
    // SQLite answers the old mode, rather than "busy", when another connection's lock
    // stops the switch (several processes opening a new file at once): try again for a
    // while before calling it a failure.
    let give_up = Instant::now() + Duration::from_secs(5);
    let mut mode: String;
    loop {
        mode = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if mode.eq_ignore_ascii_case("wal") || Instant::now() >= give_up {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if mode.eq_ignore_ascii_case("wal") {
        Ok(())
    } else {
        Err(Fail::Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "cannot switch {} to WAL mode (it stays in '{mode}' mode)",
                path.display()
            ),
        )))
    }
}

fn type_name(v: ValueRef<'_>) -> &'static str {
    match v {
        ValueRef::Null => "NULL",
        ValueRef::Integer(_) => "an INTEGER",
        ValueRef::Real(_) => "a REAL",
        ValueRef::Text(_) => "TEXT",
        ValueRef::Blob(_) => "a BLOB",
    }
}

/// Reads an INTEGER column; anything else is corruption.
pub(crate) fn int(row: &Row<'_>, idx: usize, col: &str) -> Result<i64, Fail> {
    int_value(row.get_ref(idx)?, col)
}

/// An INTEGER value; anything else is corruption.
pub(crate) fn int_value(v: ValueRef<'_>, col: &str) -> Result<i64, Fail> {
    match v {
        ValueRef::Integer(i) => Ok(i),
        other => Err(corrupt(format!(
            "column {col} holds {} where baton writes an INTEGER",
            type_name(other)
        ))),
    }
}

/// Reads an INTEGER column that must lie in `lo..=hi`.
pub(crate) fn int_in(row: &Row<'_>, idx: usize, col: &str, lo: i64, hi: i64) -> Result<i64, Fail> {
    let v = int(row, idx, col)?;
    if v < lo || v > hi {
        return Err(corrupt(format!(
            "column {col} holds {v}, outside {lo}..={hi}"
        )));
    }
    Ok(v)
}

/// Reads a TEXT column; anything else is corruption.
pub(crate) fn text(row: &Row<'_>, idx: usize, col: &str) -> Result<String, Fail> {
    match row.get_ref(idx)? {
        ValueRef::Text(b) => String::from_utf8(b.to_vec())
            .map_err(|_| corrupt(format!("column {col} holds TEXT that is not UTF-8"))),
        other => Err(corrupt(format!(
            "column {col} holds {} where baton writes TEXT",
            type_name(other)
        ))),
    }
}

/// A lease row as read, types checked.
pub(crate) struct LeaseRow {
    pub(crate) slot: u32,
    pub(crate) token: i64,
    pub(crate) holder_id: String,
    pub(crate) boot_id: String,
    pub(crate) expires_boot_ns: i64,
    pub(crate) holder_json: String,
    pub(crate) acquired_ms: i64,
    /// When it was last renewed (or granted), wall-clock ms, for status only.
    pub(crate) renewed_ms: i64,
}

/// A ticket row as read, types checked.
pub(crate) struct TicketRow {
    pub(crate) ticket: i64,
    pub(crate) boot_id: String,
    pub(crate) expires_boot_ns: i64,
}

/// A `baton_held_back` row as read, types checked.
pub(crate) struct HeldBackRow {
    pub(crate) slot: u32,
    pub(crate) how: String,
    pub(crate) boot_id: String,
    pub(crate) until_boot_ns: i64,
}

/// The parts of a request written into rows, encoded once.
pub(crate) struct Encoded {
    pub(crate) holder_id: String,
    pub(crate) holder_json: String,
    pub(crate) ttl: Duration,
    /// The lock-delay for a key this request creates (`None`: none, or zero).
    pub(crate) lock_delay_ms: Option<i64>,
}

/// The longest lock-delay a key can have: far beyond any use, and small enough that
/// `until_boot_ns` arithmetic never overflows.
pub(crate) const MAX_LOCK_DELAY_MS: i64 = 365 * 24 * 3600 * 1000;

impl Encoded {
    pub(crate) fn new(req: &AcquireRequest) -> Result<Encoded, Error> {
        let ttl = validate_ttl(req.ttl, &req.key)?;
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

/// A lease's TTL in nanoseconds, checked against the one TTL policy
/// (`baton_core::kit::time::validate_ttl`): a lease handed to renew may not have come from
/// this store's acquire.
pub(crate) fn ttl_nanos(ttl: Duration, key: &Key) -> Result<i64, Error> {
    // The kit's wording; the operation is the caller's (renew), not acquire.
    let ttl = validate_ttl(Some(ttl), key)
        .map_err(|e| Error::new(ErrorKind::InvalidInput, e.message().to_owned()))?;
    // At most MAX_TTL (a week): far inside i64 nanoseconds.
    Ok(i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX))
}

pub(crate) fn token_i64(t: Token) -> Result<i64, Fail> {
    // A token above i64::MAX was never granted by this store: no row can match it.
    Ok(i64::try_from(t.0).unwrap_or(-1))
}
