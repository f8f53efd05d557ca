//! The connection: a pool of connections to the database file, transactions retried
//! while the database is busy, the private failure types ([`Fail`] inside a
//! transaction, [`Stop`] for a retry loop that gave up) and their mapping into
//! [`baton_core::Error`]; and opening the store, with the checks on the file's place
//! made before SQLite touches it.
//!
//! Guarantees:
//! - `SQLITE_BUSY` and `SQLITE_LOCKED` (every extended code) never reach a caller: the
//!   whole transaction is retried with jittered exponential backoff until the caller's
//!   deadline; only then does the caller get a timeout it chose.
//! - Any other SQLite error becomes a baton error of a kind chosen by its code
//!   ([`sql_error`]); an error leaves named with the operation, the key and the store
//!   ([`Inner::ctx`], [`Inner::stopped`]).
//! - A database on a network filesystem is refused unless the URL says
//!   `?unsafe_network_fs=1`; in a shared (setgid, group-writable) directory the database
//!   and waiter files are created group-writable before SQLite opens them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use baton_core::kit::runtime::CancelFlag;
use baton_core::kit::sys::{self as ksys, lock, Jitter};
use baton_core::{format_duration, Error, ErrorKind, Key, Op, StoreUrl};
use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};

use crate::config::SqliteConfig;
use crate::layout;
use crate::sys;

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

/// How long release, renew, inspect, list, break, resize and opening keep retrying a
/// busy database before answering `Unavailable`.
pub(crate) const OP_BUSY_BOUND: Duration = Duration::from_secs(30);

/// Idle connections kept for reuse.
const POOL_MAX: usize = 8;

/// The store's state, shared by every operation's blocking thread. Its `impl` blocks
/// are spread over the role files: this one (connections, transactions, errors),
/// `queue.rs`, `acquire.rs`, `lease.rs`, `admin.rs` and `barrier.rs`.
pub(crate) struct Inner {
    pub(crate) url: StoreUrl,
    pub(crate) config: SqliteConfig,
    /// The waiter lock file beside the database.
    pub(crate) lock_path: PathBuf,
    pub(crate) boot_id: String,
    pool: Mutex<Vec<Connection>>,
}

/// A failure inside a transaction: either the database was busy (retry the whole
/// transaction) or a real error (give up): one of SQLite's, mapped into baton's kinds
/// where it leaves ([`sql_error`]), so that what it concerns is said once ([`Fail::at`],
/// [`Fail::in_row`]), or baton's own.
#[derive(Debug)]
pub(crate) enum Fail {
    Busy(rusqlite::Error),
    Sql(rusqlite::Error),
    Err(Error),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Fail {
        if is_busy(&e) {
            Fail::Busy(e)
        } else {
            Fail::Sql(e)
        }
    }
}

impl Fail {
    /// A SQLite error of the database file at `path`, named in its message.
    pub(crate) fn at(self, path: &Path) -> Fail {
        match self {
            Fail::Sql(e) => Fail::Err(sql_error_at(e, Some(path))),
            other => other,
        }
    }

    /// A `Corrupt` value read from `row` (`a baton_leases row of 'k'`), named in its
    /// message; other failures pass unchanged.
    pub(crate) fn in_row(self, row: impl std::fmt::Display) -> Fail {
        let e = match self {
            Fail::Sql(e) => sql_error(e),
            Fail::Err(e) => e,
            busy @ Fail::Busy(_) => return busy,
        };
        if e.kind() == ErrorKind::Corrupt {
            corrupt(format!("{row}: {}", e.message()))
        } else {
            Fail::Err(e)
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

/// Maps a SQLite error that is not "busy" to baton's kinds: baton's words, then SQLite's
/// as the cause (`the disk is full: database or disk is full: Error code 13: …`), each
/// said once. Errors that retrying cannot mend (no permission, a read-only filesystem, a
/// file that is not a database) are permanent.
pub(crate) fn sql_error(e: rusqlite::Error) -> Error {
    sql_error_at(e, None)
}

/// [`sql_error`], naming the database file at `path` first when given.
pub(crate) fn sql_error_at(e: rusqlite::Error, path: Option<&Path>) -> Error {
    let permanent = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::PermissionDenied | ErrorCode::ReadOnly)
    );
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
    let msg = match path {
        Some(p) => format!("{}: {what}", p.display()),
        None => what.to_owned(),
    };
    let err = Error::new(kind, msg).with_source(e);
    if permanent {
        err.permanent()
    } else {
        err
    }
}

/// Whether an I/O error of opening the store is one retrying cannot mend: no permission,
/// or a read-only filesystem.
pub(crate) fn io_permanent(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied || e.raw_os_error() == Some(libc::EROFS)
}

pub(crate) fn corrupt(msg: impl Into<String>) -> Fail {
    Fail::Err(Error::new(ErrorKind::Corrupt, msg))
}

/// Runs `f` until it is not busy, backing off with jitter between tries, until
/// `deadline` (`None`: no deadline) or until `cancel` is set.
pub(crate) fn retry<T>(
    deadline: Option<Instant>,
    cancel: Option<&CancelFlag>,
    mut f: impl FnMut() -> Result<T, Fail>,
) -> Result<T, Stop> {
    let mut backoff = BACKOFF_MIN;
    let started = Instant::now();
    let mut jitter = Jitter::new();
    loop {
        if cancel.is_some_and(CancelFlag::is_set) {
            return Err(Stop::Cancelled);
        }
        match f() {
            Ok(v) => return Ok(v),
            Err(Fail::Err(e)) => return Err(Stop::Err(e)),
            Err(Fail::Sql(e)) => return Err(Stop::Err(sql_error(e))),
            Err(Fail::Busy(e)) => {
                let mut pause = jitter.duration(backoff / 2, backoff);
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

/// `PRAGMA data_version`: changes whenever another connection commits.
pub(crate) fn data_version(conn: &Connection) -> Result<i64, Fail> {
    Ok(conn.pragma_query_value(None, "data_version", |r| r.get::<_, i64>(0))?)
}

impl Inner {
    pub(crate) fn err(
        &self,
        kind: ErrorKind,
        op: Op,
        key: Option<&Key>,
        msg: impl Into<String>,
    ) -> Error {
        Error::new(kind, msg).context(op, key, &self.url)
    }

    pub(crate) fn ctx(&self, e: Error, op: Op, key: Option<&Key>) -> Error {
        e.context(op, key, &self.url)
    }

    /// Maps a stopped retry loop for operations bounded by [`OP_BUSY_BOUND`].
    pub(crate) fn stopped(&self, s: Stop, op: Op, key: Option<&Key>) -> Error {
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
    pub(crate) fn conn(&self, deadline: Option<Instant>) -> Result<Connection, Stop> {
        if let Some(c) = lock(&self.pool).pop() {
            return Ok(c);
        }
        retry(deadline, None, || connect(&self.config.path))
    }

    pub(crate) fn put(&self, conn: Connection) {
        // A connection left inside a transaction (it cannot be, but) is not reused.
        if conn.is_autocommit() {
            let mut pool = lock(&self.pool);
            if pool.len() < POOL_MAX {
                pool.push(conn);
            }
        }
    }

    /// Runs `f` in a retried transaction of `behavior` on a pooled connection.
    pub(crate) fn with_tx<T>(
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
}

/// What opening the store does before SQLite sees the file, and its first connection.
impl Inner {
    /// The body of [`SqliteStore::open`](crate::SqliteStore::open), after the URL is
    /// parsed.
    pub(crate) fn open(url: &StoreUrl, config: SqliteConfig) -> Result<Inner, Error> {
        let fail =
            |kind: ErrorKind, msg: String| Error::new(kind, msg).with_op(Op::Open).with_store(url);
        let path = config.path.clone();
        let parent = path.parent().unwrap_or(Path::new("/")).to_owned();
        std::fs::create_dir_all(&parent).map_err(|e| {
            let err = fail(
                ErrorKind::Unavailable,
                format!("cannot create the directory {}", parent.display()),
            )
            .with_retryable(!io_permanent(&e));
            err.with_source(e)
        })?;
        if !config.unsafe_network_fs {
            refuse_network_fs(&path, &parent, &fail)?;
        }
        // A setgid, group-writable directory shares the database with its group: create
        // the file (and the waiter file) group-writable before SQLite opens it, whatever
        // this user's umask; SQLite then gives -wal and -shm the database file's mode.
        let mut lock_path = path.clone().into_os_string();
        lock_path.push("-baton-waiters");
        let lock_path = PathBuf::from(lock_path);
        prepare_files(&path, &lock_path, &parent, &fail)?;
        let boot_id = baton_core::boot_id().ok_or_else(|| {
            fail(
                ErrorKind::Unavailable,
                "cannot read the kernel's boot id (/proc/sys/kernel/random/boot_id); the \
                 SQLite store needs it to tell leases granted before a reboot"
                    .into(),
            )
        })?;
        let conn = first_connection(&path, url, &fail)?;
        Ok(Inner {
            url: url.clone(),
            config,
            lock_path,
            boot_id,
            pool: Mutex::new(vec![conn]),
        })
    }
}

/// Makes an error of opening the store, with the operation and the store named.
type OpenFail<'a> = &'a dyn Fn(ErrorKind, String) -> Error;

/// Refuses a database on a network filesystem (see [`crate::NETWORK_FILESYSTEMS`]): the
/// file's, or its directory's while the file does not exist yet.
fn refuse_network_fs(path: &Path, parent: &Path, fail: OpenFail<'_>) -> Result<(), Error> {
    let probe_at = if path.exists() { path } else { parent };
    let t = ksys::fs_type(probe_at).map_err(|e| {
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
        )
        .permanent());
    }
    Ok(())
}

/// In a shared directory (setgid, group-writable), creates the database file and the
/// waiter file group-writable; then checks that this user may write the database.
fn prepare_files(
    path: &Path,
    lock_path: &Path,
    parent: &Path,
    fail: OpenFail<'_>,
) -> Result<(), Error> {
    let group = sys::shared_group(parent).ok().flatten();
    let denied_hint = |e: &std::io::Error| -> String {
        let denied = e.kind() == std::io::ErrorKind::PermissionDenied;
        match group {
            Some(gid) if denied && !ksys::is_member(gid) => format!(
                " (the directory {} is shared by group {}, which {} is not in; members need read and write)",
                parent.display(),
                ksys::group_label(gid),
                ksys::user_label()
            ),
            _ if denied => format!(
                " (to share a database with a group: chgrp GROUP {0} && chmod 2770 {0})",
                parent.display()
            ),
            _ => String::new(),
        }
    };
    if let Some(gid) = group {
        for file in [path, lock_path] {
            sys::create_shared(file, gid).map_err(|e| {
                fail(
                    ErrorKind::Unavailable,
                    format!("cannot create {}{}", file.display(), denied_hint(&e)),
                )
                .with_retryable(!io_permanent(&e))
                .with_source(e)
            })?;
        }
    }
    if let Err(e) = sys::check_writable(path) {
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
            .permanent()
            .with_source(e));
        }
    }
    Ok(())
}

/// How long opening asks again when the database looks read-only (see
/// [`first_connection`]).
const READONLY_GRACE: Duration = Duration::from_secs(2);

/// Opens the first connection, checking (or creating) the schema, retried while the
/// database is busy for up to [`OP_BUSY_BOUND`]; the error names the file.
fn first_connection(path: &Path, url: &StoreUrl, fail: OpenFail<'_>) -> Result<Connection, Error> {
    let started = Instant::now();
    let deadline = started.checked_add(OP_BUSY_BOUND);
    retry(deadline, None, || {
        let attempt = connect(path).and_then(|mut conn| {
            layout::check_or_init(&mut conn, path)?;
            Ok(conn)
        });
        attempt.map_err(|f| match f {
            // A database another user has just created: SQLite creates its -wal and
            // -shm with open(2) and only then fchmods (and, as root, fchowns) them to the
            // database's mode, so for that moment they look read-only to a team member.
            // Asked again, briefly, like a busy database; a database that really is
            // read-only is still refused after READONLY_GRACE.
            Fail::Sql(e)
                if e.sqlite_error_code() == Some(ErrorCode::ReadOnly)
                    && started.elapsed() < READONLY_GRACE =>
            {
                Fail::Busy(e)
            }
            // SQLite's errors name the file here, once (baton's own already do).
            f => f.at(path),
        })
    })
    .map_err(|s| match s {
        Stop::Err(e) => e.context(Op::Open, None, url),
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_failure(code: std::ffi::c_int, msg: &str) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(msg.into()))
    }

    #[test]
    fn a_full_disk_is_said_once() {
        let e = sql_error(sqlite_failure(
            rusqlite::ffi::SQLITE_FULL,
            "database or disk is full",
        ));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_retryable());
        let shown = format!("{e:#}");
        assert!(
            shown.starts_with("the disk is full: database or disk is full: "),
            "{shown}"
        );
        assert_eq!(shown.matches("the disk is full").count(), 1, "{shown}");
        let at = sql_error_at(
            sqlite_failure(rusqlite::ffi::SQLITE_IOERR, "disk I/O error"),
            Some(Path::new("/x.db")),
        );
        let shown = format!("{at:#}");
        assert!(
            shown.starts_with("/x.db: I/O error on the database: disk I/O error"),
            "{shown}"
        );
        assert_eq!(shown.matches("I/O error on the database").count(), 1);
    }

    #[test]
    fn what_retrying_cannot_mend_is_permanent() {
        for code in [rusqlite::ffi::SQLITE_PERM, rusqlite::ffi::SQLITE_READONLY] {
            let e = sql_error(sqlite_failure(code, "denied"));
            assert_eq!(e.kind(), ErrorKind::Unavailable);
            assert!(!e.is_retryable(), "{e:#}");
        }
        let e = sql_error(sqlite_failure(rusqlite::ffi::SQLITE_NOTADB, "not a db"));
        assert!(!e.is_retryable(), "{e:#}");
        assert!(io_permanent(&std::io::Error::from_raw_os_error(
            libc::EROFS
        )));
        assert!(io_permanent(&std::io::Error::from_raw_os_error(
            libc::EACCES
        )));
        assert!(!io_permanent(&std::io::Error::from_raw_os_error(libc::EIO)));
    }
}
