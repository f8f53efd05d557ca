//! The connection: the pool of connections (each driven by a
//! task of that runtime, with its hot statements prepared once), one statement bounded by
//! the timeout, the short step with its one retry, and the private failure type [`Fail`]
//! with its one mapping into baton's [`Error`] (kind, brief message naming the server as
//! `host:port`, never the password).
//!
//! Guarantees:
//! - Bounded: every round trip has a deadline ([`crate::PostgresConfig::timeout`]); past
//!   it the connection is dropped (its session ends on the server) and the operation
//!   answers `Unavailable`. The server is told the same bound as `statement_timeout`.
//! - Runtime: connections are driven by the store's own runtime
//!   (`baton_core::kit::runtime::StoreRuntime`, one thread), so callers may use any
//!   runtime (or several), and a renewal from the keeper's runtime never depends on the
//!   caller's runtime being polled.
//! - Errors are bare (kind and message): the context layer of `crate::open` names the
//!   operation, key and store. Errors that retrying cannot cure (refused credentials,
//!   insufficient privilege, tables that are not baton's) are marked permanent.
//! - A pooled connection goes back to the pool only when it can still be trusted (not
//!   closed, not timed out, not left inside a transaction).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use baton_core::kit::runtime::StoreRuntime;
use baton_core::kit::sys::lock;
use baton_core::{format_duration, Error, ErrorKind, StoreUrl};
use tokio::sync::{broadcast, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, Row};

use crate::config::PostgresConfig;
use crate::listen::Wake;
use crate::schema::{Sql, CORRUPT_STATE, LOCK_TAKEN, SESSION_CHANGED};

/// Idle connections kept for reuse.
const POOL_MAX: usize = 16;

/// The store's shared state, behind the public handle: every operation is a method of it,
/// run on the store's runtime.
/// The PostgreSQL store's state and operations, run on its runtime as
/// [`crate::PostgresStore`].
pub struct Inner {
    pub(crate) url: StoreUrl,
    pub(crate) cfg: PostgresConfig,
    /// The store's own runtime: one thread. Dropping the store stops it.
    pub(crate) runtime: StoreRuntime,
    pub(crate) sql: Sql,
    /// First half of every advisory lock number this schema uses.
    pub(crate) magic: i32,
    /// The NOTIFY channel.
    pub(crate) channel: String,
    /// This process's PID namespace (`pid:[inode]`), written with every grant: a waiter
    /// judges a holder's PID only when it shares the holder's namespace and boot.
    pub(crate) pid_ns: Option<String>,
    pub(crate) pool: Mutex<Vec<Conn>>,
    pub(crate) schema_ready: AtomicBool,
    pub(crate) setup: tokio::sync::Mutex<()>,
    pub(crate) wake: broadcast::Sender<Wake>,
    pub(crate) listener_started: AtomicBool,
    pub(crate) listening: watch::Receiver<bool>,
    pub(crate) listening_tx: Mutex<Option<watch::Sender<bool>>>,
}

/// One connection; its driver task ends when it is dropped.
pub(crate) struct Conn {
    pub(crate) client: Client,
    driver: tokio::task::AbortHandle,
    pub(crate) reused: bool,
    /// The hot statements (attempt, release, renew), prepared once per connection.
    prepared: Mutex<HashMap<String, tokio_postgres::Statement>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Why a step failed, before it is mapped to baton's error.
#[derive(Debug)]
pub(crate) enum Fail {
    Pg(tokio_postgres::Error),
    /// No answer within the bound; the connection was dropped.
    Timeout(&'static str),
    Err(Error),
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Fail {
        Fail::Pg(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Fail {
        Fail::Err(e)
    }
}

impl Fail {
    /// The connection can no longer be trusted (closed, timed out, mid-transaction).
    pub(crate) fn breaks_conn(&self) -> bool {
        match self {
            Fail::Pg(e) => e.as_db_error().is_none(),
            Fail::Timeout(_) => true,
            Fail::Err(_) => false,
        }
    }

    /// The request never left: the pooled connection was already closed.
    pub(crate) fn never_sent(&self) -> bool {
        matches!(self, Fail::Pg(e) if e.is_closed())
    }
}

/// `Corrupt`: `what` (a row, a column, a function's answer) is not what baton wrote,
/// as `why` says (`baton_core::kit::errors::corrupt`).
pub(crate) fn corrupt(what: impl std::fmt::Display, why: impl std::fmt::Display) -> Fail {
    Fail::Err(baton_core::kit::errors::corrupt(what, why))
}

/// A boxed future borrowing the store and a connection.
pub(crate) type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub(crate) type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

impl Inner {
    fn server(&self) -> String {
        use tokio_postgres::config::Host;
        let host = match self.cfg.pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        match self.cfg.pg.get_ports().first() {
            Some(p) => format!("{host}:{p}"),
            None => format!("{host}:5432"),
        }
    }

    /// Maps a failed step to baton's error (bare: the context layer adds operation, key
    /// and store). A server's message is said once: in baton's text, not again as the
    /// driver's error beneath it.
    pub(crate) fn map(&self, f: Fail) -> Error {
        match f {
            Fail::Err(e) => e,
            Fail::Timeout(what) => Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the PostgreSQL server at {} did not answer {what} within {} (connection dropped)",
                    self.server(),
                    format_duration(self.cfg.timeout)
                ),
            ),
            Fail::Pg(e) => {
                let Some(db) = e.as_db_error() else {
                    // The driver's own refusals of the credentials (a password the server
                    // asks for and the URL lacks, an authentication method it cannot do)
                    // carry no SQLSTATE; retrying will not change them.
                    let text = e.to_string();
                    if text.starts_with("authentication error")
                        || text.starts_with("invalid configuration")
                    {
                        return Error::new(
                            ErrorKind::Unavailable,
                            format!(
                                "cannot log in to the PostgreSQL server at {}",
                                self.server()
                            ),
                        )
                        .with_source(e)
                        .permanent();
                    }
                    return Error::new(
                        ErrorKind::Unavailable,
                        format!("cannot reach the PostgreSQL server at {}", self.server()),
                    )
                    .with_source(e);
                };
                let code = db.code().code();
                let msg = db.message();
                // baton's own messages say everything; the driver's copy would repeat it.
                if code == CORRUPT_STATE {
                    return Error::new(ErrorKind::Corrupt, msg);
                }
                if code == SESSION_CHANGED || code == LOCK_TAKEN {
                    return Error::new(ErrorKind::Unavailable, msg);
                }
                if code.starts_with("28") {
                    // Class 28, invalid authorization: a refused user or password.
                    return Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "the PostgreSQL server at {} refused the credentials: {msg} ({code})",
                            self.server()
                        ),
                    )
                    .permanent();
                }
                if code == SqlState::INSUFFICIENT_PRIVILEGE.code() {
                    return Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "{msg}; the user needs to create a schema or own schema \"{}\"",
                            self.cfg.schema
                        ),
                    )
                    .permanent();
                }
                if code.starts_with("42") || code.starts_with("22") || code.starts_with("23") {
                    // Undefined or mistyped columns, missing tables or functions, values
                    // that do not fit: the tables are not what baton created.
                    self.schema_ready.store(false, Ordering::Relaxed);
                    return Error::new(
                        ErrorKind::Corrupt,
                        format!(
                            "the tables in schema \"{}\" are not what baton expects ({code}: {msg})",
                            self.cfg.schema
                        ),
                    )
                    .permanent();
                }
                let text = if code == SqlState::QUERY_CANCELED.code()
                    || code == SqlState::LOCK_NOT_AVAILABLE.code()
                {
                    format!(
                        "the server gave up after {} ({msg}); another session may hold a \
                         lock on baton's rows for too long",
                        format_duration(self.cfg.timeout)
                    )
                } else {
                    format!(
                        "the PostgreSQL server at {} refused: {msg} ({code})",
                        self.server()
                    )
                };
                Error::new(ErrorKind::Unavailable, text)
            }
        }
    }

    /// A pooled connection, or a new one.
    pub(crate) async fn checkout(&self) -> Result<Conn, Fail> {
        loop {
            let c = lock(&self.pool).pop();
            match c {
                Some(c) if !c.client.is_closed() => return Ok(c),
                Some(_) => continue,
                None => break,
            }
        }
        self.connect().await
    }

    /// A new connection, driven by the store's runtime.
    pub(crate) async fn connect(&self) -> Result<Conn, Fail> {
        let connect_bound = self
            .cfg
            .pg
            .get_connect_timeout()
            .copied()
            .unwrap_or(self.cfg.timeout)
            .saturating_mul(self.cfg.pg.get_hosts().len().max(1) as u32)
            + self.cfg.timeout;
        let (client, connection) = tokio::time::timeout(connect_bound, self.cfg.pg.connect(NoTls))
            .await
            .map_err(|_| Fail::Timeout("the connection"))??;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        })
        .abort_handle();
        Ok(Conn {
            client,
            driver,
            reused: false,
            prepared: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn checkin(&self, mut conn: Conn) {
        if conn.client.is_closed() {
            return;
        }
        conn.reused = true;
        let mut pool = lock(&self.pool);
        if pool.len() < POOL_MAX {
            pool.push(conn);
        }
    }

    /// One statement, bounded by the timeout.
    pub(crate) async fn query(
        &self,
        conn: &Conn,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, Fail> {
        match tokio::time::timeout(self.cfg.timeout, conn.client.query_typed(sql, params)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(Fail::Timeout("a query")),
        }
    }

    /// A hot statement, prepared on this connection the first time (the server then
    /// skips parsing and planning it), bounded by the timeout.
    pub(crate) async fn query_hot(
        &self,
        conn: &Conn,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, Fail> {
        let bound = self.cfg.timeout;
        let cached = lock(&conn.prepared).get(sql).cloned();
        let stmt = match cached {
            Some(s) => s,
            None => {
                let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
                let s = tokio::time::timeout(bound, conn.client.prepare_typed(sql, &types))
                    .await
                    .map_err(|_| Fail::Timeout("a query"))??;
                lock(&conn.prepared).insert(sql.to_owned(), s.clone());
                s
            }
        };
        let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
        match tokio::time::timeout(bound, conn.client.query(&stmt, &values)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => {
                // A statement the server no longer knows how to run (the schema changed
                // under it) is prepared again next time.
                lock(&conn.prepared).remove(sql);
                Err(e.into())
            }
            Err(_) => Err(Fail::Timeout("a query")),
        }
    }

    /// Runs one short step on a pooled connection: checks the schema first, retries once
    /// on a fresh connection when a pooled one turns out closed before the request left.
    pub(crate) async fn with_conn<T>(
        &self,
        f: impl for<'c> Fn(&'c Inner, &'c Conn) -> BoxFut<'c, Result<T, Fail>>,
    ) -> Result<T, Fail> {
        let mut tries = 0;
        loop {
            tries += 1;
            let conn = self.checkout().await?;
            let reused = conn.reused;
            let r = match self.ensure_schema(&conn).await {
                Ok(()) => f(self, &conn).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(v) => {
                    self.checkin(conn);
                    return Ok(v);
                }
                Err(e) if reused && e.never_sent() && tries < 3 => {
                    drop(conn);
                    continue;
                }
                Err(e) => {
                    if !e.breaks_conn() {
                        self.checkin(conn);
                    }
                    return Err(e);
                }
            }
        }
    }
}
