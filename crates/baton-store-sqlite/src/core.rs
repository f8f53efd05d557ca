//! The database file: opening connections, checking or creating baton's schema, retrying
//! on a busy database, and reading rows without trusting their types.
//!
//! Guarantees:
//! - A file is used only if it is empty (it then gets baton's schema) or carries baton's
//!   `application_id` and a `user_version` this code knows. Anything else is refused
//!   before anything is written to it; the journal mode is switched to WAL only after.
//! - `SQLITE_BUSY` and `SQLITE_LOCKED` (every extended code) never reach a caller: the
//!   whole transaction is retried with jittered exponential backoff until the caller's
//!   deadline; only then does the caller get a timeout it chose.
//! - A value of the wrong type in a row is [`ErrorKind::Corrupt`], never a panic and
//!   never a guess.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use baton_core::{Error, ErrorKind};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, Row, TransactionBehavior};

use crate::sys::Jitter;

/// `PRAGMA application_id` of a baton database: "batn" in ASCII.
pub const APPLICATION_ID: i32 = 0x6261_746E;

/// `PRAGMA user_version` of the schema this code writes (and the newest it reads).
/// Version 2 added lock-delays (`baton_lock_delays`, `baton_held_back`). A version-1 file
/// gets the two tables beside its own and stays version 1, so older batons keep using
/// it, until a key with a lock-delay is created in it: that transaction raises it to 2,
/// so that no baton that would ignore the delay grants in it any more.
pub const SCHEMA_VERSION: i32 = 2;

/// The `user_version` of files written before lock-delays, still read and written.
const SCHEMA_VERSION_1: i32 = 1;

/// How long SQLite's own busy handler waits inside one statement before the retry loop
/// (with jitter, which SQLite's handler lacks) takes over.
const BUSY_TIMEOUT: Duration = Duration::from_millis(10);

/// First and largest backoff between retries of a busy transaction. The cap is 50 ms
/// for the first second a transaction stays busy, then grows to 1 s: with a thousand
/// processes contending, retries every 50 ms would keep both cores busy failing, and the
/// process holding the write lock would wait for a core to finish and let go.
const BACKOFF_MIN: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_millis(50);
const BACKOFF_MAX_LONG: Duration = Duration::from_secs(1);
const LONG_BUSY: Duration = Duration::from_secs(1);

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

const TABLES: [&str; 5] = [
    "baton_keys",
    "baton_leases",
    "baton_waiters",
    "baton_lock_delays",
    "baton_held_back",
];

/// Raises a version-1 file to version 2 inside the caller's write transaction (called
/// when a key with a lock-delay is created).
pub(crate) fn require_lock_delay_schema(tx: &Connection) -> Result<(), Fail> {
    let version: i32 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(())
}

/// A failure inside a transaction: either the database was busy (retry the whole
/// transaction) or a real error (give up).
#[derive(Debug)]
pub(crate) enum Fail {
    Busy(rusqlite::Error),
    Err(Error),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Fail {
        if is_busy(&e) {
            Fail::Busy(e)
        } else {
            Fail::Err(sql_error(e))
        }
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Err(e)
    }
}

/// Why a retried transaction stopped without a result.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The database stayed busy until the deadline.
    Deadline(rusqlite::Error),
    /// The caller cancelled.
    Cancelled,
    /// A real error.
    Err(Error),
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

/// Maps a SQLite error that is not "busy" to baton's kinds.
pub(crate) fn sql_error(e: rusqlite::Error) -> Error {
    let (kind, what) = match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => (
            ErrorKind::Corrupt,
            "the file is not a SQLite database (garbage, truncated or encrypted)",
        ),
        Some(ErrorCode::DatabaseCorrupt) => (
            ErrorKind::Corrupt,
            "the database is corrupt (damaged or truncated)",
        ),
        Some(ErrorCode::CannotOpen) => (ErrorKind::Unavailable, "cannot open the database file"),
        Some(ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => (
            ErrorKind::Unavailable,
            "no permission to write the database (or its directory, for the -wal and -shm files)",
        ),
        Some(ErrorCode::DiskFull) => (ErrorKind::Unavailable, "the disk is full"),
        Some(ErrorCode::SystemIoFailure) => (ErrorKind::Unavailable, "I/O error on the database"),
        Some(ErrorCode::FileLockingProtocolFailed) => (
            ErrorKind::Unavailable,
            "file locking failed (a network filesystem?)",
        ),
        _ => match &e {
            rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..) => (
                ErrorKind::Corrupt,
                "a row holds a value baton did not write",
            ),
            _ => (ErrorKind::Unavailable, "database error"),
        },
    };
    Error::new(kind, what).with_source(e)
}

pub(crate) fn corrupt(msg: impl Into<String>) -> Fail {
    Fail::Err(Error::new(ErrorKind::Corrupt, msg))
}

/// Runs `f` until it is not busy, backing off with jitter between tries, until
/// `deadline` (`None`: no deadline) or until `cancel` is set.
pub(crate) fn retry<T>(
    deadline: Option<Instant>,
    cancel: Option<&AtomicBool>,
    mut f: impl FnMut() -> Result<T, Fail>,
) -> Result<T, Stop> {
    let mut backoff = BACKOFF_MIN;
    let started = Instant::now();
    let mut jitter = Jitter::new();
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Stop::Cancelled);
        }
        match f() {
            Ok(v) => return Ok(v),
            Err(Fail::Err(e)) => return Err(Stop::Err(e)),
            Err(Fail::Busy(e)) => {
                let hi = backoff.as_micros() as u64;
                let mut pause = Duration::from_micros(jitter.between(hi / 2, hi));
                if let Some(d) = deadline {
                    let now = Instant::now();
                    if now >= d {
                        return Err(Stop::Deadline(e));
                    }
                    pause = pause.min(d - now);
                }
                std::thread::sleep(pause);
                let cap = if started.elapsed() < LONG_BUSY {
                    BACKOFF_MAX
                } else {
                    BACKOFF_MAX_LONG
                };
                backoff = (backoff * 2).min(cap);
            }
        }
    }
}

/// Opens one connection to the database file, set up for baton: busy timeout,
/// `synchronous=NORMAL` (WAL: a commit survives a process crash; a power loss may lose
/// the last commits but never corrupts).
pub(crate) fn connect(path: &Path) -> Result<Connection, Fail> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
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
            tx.pragma_update(None, "application_id", APPLICATION_ID)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        tx.commit()?;
        return check_or_init(conn, path);
    }
    if app != APPLICATION_ID {
        return Err(corrupt(format!(
            "{shown} is not a baton database (application_id {app:#x}, {objects} schema \
             object(s)); refusing to use or change it: give baton a file of its own"
        )));
    }
    if version == SCHEMA_VERSION_1 && has_tables(conn, &TABLES[..3])? && !has_tables(conn, &TABLES)?
    {
        // Add the lock-delay tables; the version stays 1 (see SCHEMA_VERSION).
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(LOCK_DELAY_TABLES)?;
        tx.commit()?;
    }
    if version != SCHEMA_VERSION && version != SCHEMA_VERSION_1 {
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

/// `PRAGMA data_version`: changes whenever another connection commits.
pub(crate) fn data_version(conn: &Connection) -> Result<i64, Fail> {
    Ok(conn.pragma_query_value(None, "data_version", |r| r.get::<_, i64>(0))?)
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
