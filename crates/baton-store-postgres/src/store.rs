//! The PostgreSQL store: one row per granted lease, one row per queued waiter, one row
//! per key with its limit and token sequence, in one schema of one database.
//!
//! Guarantees:
//! - Limit: every grant is one call of the server-side function `attempt`, which locks
//!   the key's row (`FOR UPDATE`), counts the key's lease rows and grants only if fewer
//!   than the limit are there. A row goes only by release, break, or a claim.
//! - Expiry: no clock of the server's decides it (`now()` is a wall clock). Every renewal
//!   raises the row's renewal counter; a waiter ([`Watch`]) takes a slot over only after it
//!   has seen the same token and counter for the lease's TTL on its own monotonic clock,
//!   counted from when the look that showed them came back (after the renewal that wrote
//!   them was sent, so after the holder's keeper gave up: its deadline is `sent + TTL ×
//!   (1 − drift) − margin`), or at once when the holder ran on the waiter's host and its
//!   process is gone. The claim names slot, token, counter and state, and `attempt` checks
//!   them under the rows' locks: a renewal racing it either commits first (the counter
//!   moved, the claim fails) or finds the row gone or held back and answers `Lost`.
//! - Lock-delay: a key created with one keeps a lost lease's row (taken over, broken),
//!   marked lost, until a waiter has seen it so for the delay on its own clock; releases
//!   delete the row at once.
//! - Tokens: `seq` in the key's row, raised in the granting transaction to
//!   `max(seq, every token in the table) + 1`, committed durably, so they survive a
//!   server restart.
//! - Fairness: a waiter holds a ticket (a `bigserial`); a request is granted only while
//!   the free slots outnumber the live tickets ahead of it.
//! - Waking: a release (and an abandoned wait) sends `NOTIFY` on the schema's channel
//!   with the key as payload; one listening connection per store handle wakes that key's
//!   waiters. A waiter also looks every quarter of the shortest TTL it watches (to see
//!   renewals soon after they happen), when its first observation matures, and at a slow
//!   backstop interval.
//! - No residue: a waiter's ticket is guarded by a session advisory lock taken on the
//!   waiter's own connection before the ticket becomes visible; a waiter whose process
//!   or connection dies loses the lock with its session, and the next look at the queue
//!   deletes its ticket. A wait that gives up (timeout, cancel, error) deletes its ticket
//!   before the acquire returns. A waiter that stops refreshing (SIGSTOP) loses its place
//!   after [`TICKET_TTL`].
//! - Bounded: every round trip has a deadline ([`crate::PostgresConfig::timeout`]); past
//!   it the connection is dropped (its session ends on the server) and the operation
//!   answers `Unavailable`. The server is told the same bound as `statement_timeout`.
//! - Runtime: connections are driven by a small Tokio runtime the store owns, so callers
//!   may use any runtime (or several), and a renewal from the keeper's runtime never
//!   depends on the caller's runtime being polled.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use baton_core::{
    format_duration, AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind,
    Holder, HolderId, Key, KeyStatus, Lease, Liveness, Op, Released, SlotState, SlotStatus, Store,
    StoreUrl, Token, Wait,
};
use futures_util::StreamExt;
use tokio::sync::{broadcast, oneshot, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, NoTls, Row};

#[path = "barrier.rs"]
mod barrier;

use crate::config::PostgresConfig;
use crate::schema::{
    Sql, ADDED_IN_2, CORRUPT_STATE, FUNCTIONS, LOCK_TAKEN, SCHEMA_VERSION, SESSION_CHANGED, SHAPE,
};

/// The TTL of a lease whose request gives none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// How long a waiter's ticket lives without being refreshed; a waiting request refreshes
/// it every third of this. A waiter that stops (SIGSTOP) loses its place after this
/// long; one whose connection dies loses it at once.
pub const TICKET_TTL: Duration = Duration::from_secs(10);

/// A waiter looks at the queue at least this often even without a notification (a
/// waiter ahead of it that died frees nothing and sends nothing).
const BACKSTOP: Duration = Duration::from_secs(1);

/// The most slots a key may have: a limit is a count of concurrent holders, and `status`
/// lists every slot.
pub const MAX_LIMIT: u32 = 1_000_000;

/// Idle connections kept for reuse.
const POOL_MAX: usize = 16;

/// How long a waiter waits for the listening connection before it relies on polling.
const LISTEN_READY_BOUND: Duration = Duration::from_secs(2);

/// How often the listening connection proves it is alive.
const LISTEN_PING: Duration = Duration::from_secs(10);

/// The PostgreSQL store. See the crate docs and README for the mechanism and its bounds.
pub struct PostgresStore {
    inner: Arc<Inner>,
    _runtime: OwnedRuntime,
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.inner.url)
            .field("schema", &self.inner.cfg.schema)
            .finish_non_exhaustive()
    }
}

/// The store's runtime: a current-thread runtime on a thread of its own, so a request,
/// its connection's I/O and its answer meet on one thread (no hops between workers).
/// Dropping it tells the thread to stop, without waiting (the store may be dropped inside
/// another runtime).
struct OwnedRuntime {
    stop: Option<oneshot::Sender<()>>,
}

impl OwnedRuntime {
    fn start() -> std::io::Result<(OwnedRuntime, tokio::runtime::Handle)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("baton-postgres".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
                // Tasks still running (a wait whose caller went away) end here; their
                // connections close, and the server ends their sessions.
                rt.shutdown_background();
            })?;
        Ok((OwnedRuntime { stop: Some(stop) }, handle))
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Wakes waiters.
#[derive(Clone, Debug)]
enum Wake {
    /// Something changed for this key.
    Key(Arc<str>),
    /// Look again, whatever the key (the listener reconnected: notifications may be lost).
    All,
}

struct Inner {
    url: StoreUrl,
    cfg: PostgresConfig,
    handle: tokio::runtime::Handle,
    sql: Sql,
    /// First half of every advisory lock number this schema uses.
    magic: i32,
    /// The NOTIFY channel.
    channel: String,
    /// This process's PID namespace (`pid:[inode]`), written with every grant: a waiter
    /// judges a holder's PID only when it shares the holder's namespace and boot.
    pid_ns: Option<String>,
    pool: Mutex<Vec<Conn>>,
    schema_ready: AtomicBool,
    setup: tokio::sync::Mutex<()>,
    wake: broadcast::Sender<Wake>,
    listener_started: AtomicBool,
    listening: watch::Receiver<bool>,
    listening_tx: Mutex<Option<watch::Sender<bool>>>,
}

/// One connection; its driver task ends when it is dropped.
struct Conn {
    client: Client,
    driver: tokio::task::AbortHandle,
    reused: bool,
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
enum Fail {
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
    fn breaks_conn(&self) -> bool {
        match self {
            Fail::Pg(e) => e.as_db_error().is_none(),
            Fail::Timeout(_) => true,
            Fail::Err(_) => false,
        }
    }

    /// The request never left: the pooled connection was already closed.
    fn never_sent(&self) -> bool {
        matches!(self, Fail::Pg(e) if e.is_closed())
    }
}

fn corrupt(msg: impl Into<String>) -> Fail {
    Fail::Err(Error::new(ErrorKind::Corrupt, msg))
}

/// What one `attempt` call decided.
enum Attempt {
    Granted(Box<Lease>),
    Busy {
        lim: u32,
        held: u32,
        ahead: u32,
        /// The key's lease rows at the look.
        rows: Vec<Looked>,
        delay: Duration,
    },
    Mismatch {
        lim: u32,
    },
    Queued {
        ticket: i64,
        /// Live tickets ahead of this one.
        ahead: u32,
        /// Slots free at the look.
        free: u32,
        /// The key's lease rows at the look.
        rows: Vec<Looked>,
        delay: Duration,
    },
}

/// The identity of a lease row as a claim names it: any renewal, release, break or
/// takeover changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RowId {
    slot: u32,
    token: i64,
    renewals: i64,
    /// Held back by the key's lock-delay after the lease was lost.
    lost: bool,
}

/// A lease row as a look saw it.
#[derive(Clone, Debug)]
struct Looked {
    id: RowId,
    ttl: Duration,
    holder: Option<Holder>,
}

/// What a waiting acquire has seen of a key's lease rows, on its own monotonic clock
/// (DESIGN, contract point 7: the server's clock is a wall clock and decides nothing).
///
/// A row is stale once this waiter has seen it unchanged (same token, same renewal count)
/// for the lease's whole TTL, counted from the moment the look that first showed it came
/// back: that look read the row after the renewal that wrote it committed, which was
/// after the holder sent it, so the holder's keeper (deadline `sent + TTL × (1 − drift) −
/// margin`) has given the lease up before this waiter's TTL runs out. A row held back by a
/// lock-delay is freed once seen unchanged for the delay. A holder on this host, boot and
/// PID namespace whose process is gone ([`Holder::liveness`]) is stale at once (the
/// server sends holder details only for rows of the caller's boot and PID namespace). The observations live only in
/// this waiter: one that dies takes them along, and the next waiter starts counting anew.
#[derive(Default)]
struct Watch {
    seen: HashMap<u32, Observed>,
}

struct Observed {
    id: RowId,
    since: Instant,
    /// How long the row must stay unchanged: the lease's TTL, or the key's lock-delay.
    wait: Duration,
    holder: Option<Holder>,
}

impl Watch {
    /// Records a look's rows, which came back at `at`.
    fn update(&mut self, rows: &[Looked], delay: Duration, at: Instant) {
        self.seen
            .retain(|slot, _| rows.iter().any(|r| r.id.slot == *slot));
        for r in rows {
            let wait = if r.id.lost { delay } else { r.ttl };
            match self.seen.get(&r.id.slot) {
                Some(o) if o.id == r.id => {}
                _ => {
                    self.seen.insert(
                        r.id.slot,
                        Observed {
                            id: r.id,
                            since: at,
                            wait,
                            holder: r.holder.clone(),
                        },
                    );
                }
            }
        }
    }

    /// The rows that may be claimed now, as the flat `(slot, token, renewals, lost)`
    /// array `attempt` takes.
    fn claims(&self, now: Instant) -> Vec<i64> {
        let mut out = Vec::new();
        for o in self.seen.values() {
            let dead = !o.id.lost
                && o.holder
                    .as_ref()
                    .is_some_and(|h| h.liveness() == Liveness::Dead);
            if dead || now.duration_since(o.since) >= o.wait {
                out.extend([
                    i64::from(o.id.slot),
                    o.id.token,
                    o.id.renewals,
                    i64::from(o.id.lost),
                ]);
            }
        }
        out
    }

    /// How long until the next row may be claimed, if any is watched.
    fn next(&self, now: Instant) -> Option<Duration> {
        self.seen
            .values()
            .map(|o| (o.since + o.wait).saturating_duration_since(now))
            .min()
    }

    /// How often to look so that a renewal is seen soon after it happens (a late sight
    /// only delays a takeover): a quarter of the shortest TTL watched.
    fn cadence(&self) -> Option<Duration> {
        self.seen
            .values()
            .filter(|o| !o.id.lost)
            .map(|o| (o.wait / 4).max(Duration::from_millis(20)))
            .min()
    }
}

/// A boxed future borrowing the store and a connection.
type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

impl Inner {
    fn err(&self, kind: ErrorKind, op: Op, key: Option<&Key>, msg: impl Into<String>) -> Error {
        Error::new(kind, msg).context(op, key, &self.url)
    }

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

    /// Maps a failed step to baton's error for `op` on `key`.
    fn map(&self, f: Fail, op: Op, key: Option<&Key>) -> Error {
        match f {
            Fail::Err(e) => e.context(op, key, &self.url),
            Fail::Timeout(what) => self.err(
                ErrorKind::Unavailable,
                op,
                key,
                format!(
                    "the PostgreSQL server at {} did not answer {what} within {} (connection dropped)",
                    self.server(),
                    format_duration(self.cfg.timeout)
                ),
            ),
            Fail::Pg(e) => {
                let Some(db) = e.as_db_error() else {
                    return self
                        .err(
                            ErrorKind::Unavailable,
                            op,
                            key,
                            format!("cannot reach the PostgreSQL server at {}", self.server()),
                        )
                        .with_source(e);
                };
                let code = db.code().code();
                let msg = db.message().to_owned();
                // baton's own messages say everything; the driver's copy would repeat it.
                if code == CORRUPT_STATE {
                    return self.err(ErrorKind::Corrupt, op, key, msg);
                }
                if code == SESSION_CHANGED || code == LOCK_TAKEN {
                    return self.err(ErrorKind::Unavailable, op, key, msg);
                }
                let (kind, text) = if code == SqlState::INSUFFICIENT_PRIVILEGE.code() {
                    (
                        ErrorKind::Unavailable,
                        format!(
                            "permission denied in schema \"{}\" ({msg}); the user needs to \
                             create a schema or own this one",
                            self.cfg.schema
                        ),
                    )
                } else if code.starts_with("42") || code.starts_with("22") || code.starts_with("23")
                {
                    // Undefined or mistyped columns, missing tables or functions, values
                    // that do not fit: the tables are not what baton created.
                    self.schema_ready.store(false, Ordering::Relaxed);
                    (
                        ErrorKind::Corrupt,
                        format!(
                            "the tables in schema \"{}\" are not what baton expects ({code}: {msg})",
                            self.cfg.schema
                        ),
                    )
                } else if code == SqlState::QUERY_CANCELED.code()
                    || code == SqlState::LOCK_NOT_AVAILABLE.code()
                {
                    (
                        ErrorKind::Unavailable,
                        format!(
                            "the server gave up after {} ({msg}); another session may hold a \
                             lock on baton's rows for too long",
                            format_duration(self.cfg.timeout)
                        ),
                    )
                } else {
                    (
                        ErrorKind::Unavailable,
                        format!("the PostgreSQL server at {} refused: {msg} ({code})", self.server()),
                    )
                };
                self.err(kind, op, key, text).with_source(e)
            }
        }
    }

    /// A pooled connection, or a new one.
    async fn checkout(&self) -> Result<Conn, Fail> {
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
    async fn connect(&self) -> Result<Conn, Fail> {
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

    fn checkin(&self, mut conn: Conn) {
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
    async fn query(&self, conn: &Conn, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, Fail> {
        match tokio::time::timeout(self.cfg.timeout, conn.client.query_typed(sql, params)).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(Fail::Timeout("a query")),
        }
    }

    /// A hot statement, prepared on this connection the first time (the server then
    /// skips parsing and planning it), bounded by the timeout.
    async fn query_hot(
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
    async fn with_conn<T>(
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

    /// Creates the schema on first use (once per process and store), checks its version
    /// and the shape of its tables.
    async fn ensure_schema(&self, conn: &Conn) -> Result<(), Fail> {
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _guard = self.setup.lock().await;
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        if !self.schema_looks_ready(conn).await? {
            self.create_schema(conn).await?;
            if !self.schema_looks_ready(conn).await? {
                return Err(corrupt(format!(
                    "schema \"{}\" is missing baton's version row or functions right after \
                     creating them",
                    self.sql.schema
                )));
            }
        }
        self.schema_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// `Ok(true)`: version, tables and functions are baton's; `Ok(false)`: something is
    /// missing (to be created); `Err`: something is there that is not baton's.
    async fn schema_looks_ready(&self, conn: &Conn) -> Result<bool, Fail> {
        let schema = self.sql.schema.as_str();
        let rows = self
            .query(conn, &self.sql.columns, &[(&schema, Type::TEXT)])
            .await?;
        let mut have: HashMap<(String, String), String> = HashMap::new();
        let mut tables: Vec<String> = Vec::new();
        for r in &rows {
            let t: String = col(r, 0)?;
            let c: String = col(r, 1)?;
            let ty: String = col(r, 2)?;
            if !tables.contains(&t) {
                tables.push(t.clone());
            }
            have.insert((t, c), ty);
        }
        let mut missing_table = false;
        for (table, cols) in SHAPE {
            if !tables.iter().any(|t| t == table) {
                missing_table = true;
                continue;
            }
            for (col, want) in *cols {
                match have.get(&((*table).to_owned(), (*col).to_owned())) {
                    Some(ty) if ty == want => {}
                    Some(ty) => {
                        return Err(corrupt(format!(
                            "table \"{schema}\".{table} has column {col} of type {ty}, not {want}: \
                             it is not baton's table (use another ?schema=)"
                        )))
                    }
                    None if ADDED_IN_2.contains(&(*table, *col)) => missing_table = true,
                    None => {
                        return Err(corrupt(format!(
                            "table \"{schema}\".{table} has no column {col}: it is not baton's \
                             table (use another ?schema=)"
                        )))
                    }
                }
            }
        }
        if missing_table {
            // A table or column this baton knows is missing (the barrier tables in a
            // schema made before them, version 1's tables): it is created, unless a newer
            // baton made the schema (its functions must not be replaced).
            if tables.iter().any(|t| t == "meta") {
                let rows = self.query(conn, &self.sql.version, &[]).await?;
                if let Some(r) = rows.first() {
                    if let Some(v) = col::<Option<String>>(r, 0)? {
                        if v.parse::<i32>().is_ok_and(|n| n > SCHEMA_VERSION) {
                            return Err(Fail::Err(Error::new(
                                ErrorKind::Unsupported,
                                format!(
                                    "schema \"{schema}\" has version {v}, made by a newer baton; \
                                     this one knows version {SCHEMA_VERSION}"
                                ),
                            )));
                        }
                    }
                }
            }
            return Ok(false);
        }
        let rows = self.query(conn, &self.sql.version, &[]).await?;
        let version = match rows.first() {
            None => return Ok(false),
            Some(r) => col::<Option<String>>(r, 0)?,
        };
        let want = SCHEMA_VERSION.to_string();
        match version.as_deref() {
            Some(v) if v == want => {}
            // Version 1 is upgraded in place (see SCHEMA_VERSION).
            Some("1") => return Ok(false),
            Some(v) if v.parse::<i32>().is_ok_and(|n| n > SCHEMA_VERSION) => {
                return Err(Fail::Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "schema \"{schema}\" has version {v}, made by a newer baton; this one \
                         knows version {SCHEMA_VERSION}"
                    ),
                )))
            }
            other => {
                return Err(corrupt(format!(
                    "schema \"{schema}\" has version {:?} in its meta table, not {SCHEMA_VERSION}",
                    other.unwrap_or("NULL")
                )))
            }
        }
        let rows = self
            .query(conn, &self.sql.functions, &[(&schema, Type::TEXT)])
            .await?;
        let mut fns = Vec::new();
        for r in &rows {
            fns.push((col::<String>(r, 0)?, col::<i16>(r, 1)?));
        }
        Ok(FUNCTIONS
            .iter()
            .all(|(f, n)| fns.iter().any(|(g, m)| g == f && m == n)))
    }

    /// Creates the tables and functions under a transaction-level advisory lock, so that
    /// concurrent first uses do not trip over each other.
    async fn create_schema(&self, conn: &Conn) -> Result<(), Fail> {
        let version = SCHEMA_VERSION.to_string();
        let setup = format!(
            "BEGIN; SELECT pg_advisory_xact_lock({}, 0); {} {} COMMIT;",
            self.magic, self.sql.create_tables, self.sql.create_functions
        );
        let r = tokio::time::timeout(self.cfg.timeout, conn.client.batch_execute(&setup)).await;
        let r = match r {
            Ok(r) => r.map_err(Fail::from),
            Err(_) => Err(Fail::Timeout("the schema setup")),
        };
        if let Err(e) = r {
            // The connection may be left inside the failed transaction.
            let _ =
                tokio::time::timeout(self.cfg.timeout, conn.client.batch_execute("ROLLBACK")).await;
            return Err(e);
        }
        self.query(conn, &self.sql.set_version, &[(&version, Type::TEXT)])
            .await?;
        Ok(())
    }

    /// One grant attempt.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        conn: &Conn,
        req: &AcquireRequest,
        enc: &Encoded,
        check_lim: bool,
        ticket: Option<i64>,
        queue: bool,
        refresh: bool,
        claims: &[i64],
        sent_at: Instant,
    ) -> Result<Attempt, Fail> {
        let key = req.key.as_str();
        let lim = i32::try_from(req.limit)
            .ok()
            .filter(|_| req.limit <= MAX_LIMIT)
            .ok_or_else(|| {
                Fail::Err(Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "the limit must be 1 to {MAX_LIMIT} slots, not {}",
                        req.limit
                    ),
                ))
            })?;
        let ticket_ttl = TICKET_TTL.as_millis() as i64;
        let rows = self
            .query_hot(
                conn,
                &self.sql.attempt,
                &[
                    (&key, Type::TEXT),
                    (&lim, Type::INT4),
                    (&check_lim, Type::BOOL),
                    (&ticket, Type::INT8),
                    (&queue, Type::BOOL),
                    (&enc.holder_id, Type::TEXT),
                    (&enc.holder_json, Type::TEXT),
                    (&enc.ttl_ms, Type::INT8),
                    (&self.magic, Type::INT4),
                    (&ticket_ttl, Type::INT8),
                    (&refresh, Type::BOOL),
                    (&enc.lock_delay_ms, Type::INT8),
                    (&claims, Type::INT8_ARRAY),
                    (&self.channel.as_str(), Type::TEXT),
                    (&self.pid_ns, Type::TEXT),
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| corrupt("the attempt function returned no row"))?;
        let outcome: String = col(row, 0)?;
        let lim = u32_of(col::<Option<i32>>(row, 3)?, "limit")?;
        match outcome.as_str() {
            "granted" => {
                let slot = u32_of(col::<Option<i32>>(row, 1)?, "slot")?;
                let token = col::<Option<i64>>(row, 2)?
                    .and_then(|t| u64::try_from(t).ok())
                    .ok_or_else(|| corrupt("the attempt function granted no token"))?;
                let now_ms = col::<Option<i64>>(row, 7)?
                    .and_then(|t| u64::try_from(t).ok())
                    .unwrap_or(0);
                Ok(Attempt::Granted(Box::new(Lease {
                    key: req.key.clone(),
                    slot,
                    limit: lim,
                    token: Token(token),
                    holder: req.holder.clone(),
                    ttl: Some(enc.ttl),
                    acquired_unix_ms: now_ms,
                    sent_at: Some(sent_at),
                })))
            }
            "busy" => Ok(Attempt::Busy {
                lim,
                held: u32_of(col::<Option<i32>>(row, 5)?, "held count")?,
                ahead: u32_of(col::<Option<i32>>(row, 6)?, "queue length")?,
                rows: looked(row)?,
                delay: delay_of(row)?,
            }),
            "mismatch" => Ok(Attempt::Mismatch { lim }),
            "queued" => {
                let ticket = col::<Option<i64>>(row, 4)?
                    .ok_or_else(|| corrupt("the attempt function queued without a ticket"))?;
                let held = u32_of(col::<Option<i32>>(row, 5)?, "held count")?;
                let ahead = u32_of(col::<Option<i32>>(row, 6)?, "queue position")?;
                Ok(Attempt::Queued {
                    ticket,
                    ahead,
                    free: lim.saturating_sub(held),
                    rows: looked(row)?,
                    delay: delay_of(row)?,
                })
            }
            other => Err(corrupt(format!(
                "the attempt function answered '{other}', which this baton does not know"
            ))),
        }
    }

    /// Deletes an abandoned wait's ticket and its lock; drops the connection when that
    /// fails (its session's end releases the lock, which marks the ticket dead).
    async fn leave(&self, conn: Conn, key: &Key, ticket: Option<i64>) {
        let Some(t) = ticket else {
            self.checkin(conn);
            return;
        };
        let k = key.as_str();
        let r = self
            .query(
                &conn,
                &self.sql.leave,
                &[
                    (&k, Type::TEXT),
                    (&t, Type::INT8),
                    (&self.magic, Type::INT4),
                    (&self.channel.as_str(), Type::TEXT),
                ],
            )
            .await;
        if r.is_ok() {
            self.checkin(conn);
        }
    }

    /// The start of an operation that may wait for a notification (an acquire, a barrier
    /// arrival): subscribes to wake-ups first (so none is missed), starts the listening
    /// connection when `waits`, checks a connection out and the schema, and waits (bounded)
    /// until the listener is ready.
    pub(super) async fn begin(
        &self,
        waits: bool,
        op: Op,
        key: &Key,
    ) -> Result<(Conn, broadcast::Receiver<Wake>), Error> {
        let wake_rx = self.wake.subscribe();
        if waits {
            self.start_listener();
        }
        let conn = self
            .checkout()
            .await
            .map_err(|f| self.map(f, op, Some(key)))?;
        if let Err(f) = self.ensure_schema(&conn).await {
            if !f.breaks_conn() {
                self.checkin(conn);
            }
            return Err(self.map(f, op, Some(key)));
        }
        if waits {
            let mut listening = self.listening.clone();
            let _ = tokio::time::timeout(LISTEN_READY_BOUND, listening.wait_for(|l| *l)).await;
        }
        Ok((conn, wake_rx))
    }

    fn start_listener(&self) {
        if self.listener_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(ready) = lock(&self.listening_tx).take() else {
            return;
        };
        let cfg = self.cfg.clone();
        let channel = self.channel.clone();
        let wake = self.wake.clone();
        self.handle.spawn(listen(cfg, channel, wake, ready));
    }

    /// The whole acquire, on the store's runtime.
    async fn acquire_task(
        self: Arc<Inner>,
        req: AcquireRequest,
        mut cancel: oneshot::Receiver<()>,
    ) -> Result<Lease, Error> {
        let key = req.key.clone();
        let op = Op::Acquire;
        let enc = Encoded::new(&req).map_err(|e| e.context(op, Some(&key), &self.url))?;
        let start = Instant::now();
        let deadline = req.deadline(start);
        let queue = req.wait != Wait::NoWait;
        let (mut conn, mut wake_rx) = self.begin(queue, op, &key).await?;
        let mut ticket: Option<i64> = None;
        let mut first = true;
        let mut refreshed = Instant::now();
        let mut watch = Watch::default();
        let mut claims: Vec<i64> = Vec::new();
        loop {
            let sent_at = Instant::now();
            let check_lim = first;
            // The ticket's expiry is written only every third of its TTL; the looks in
            // between are read-only unless they grant.
            let refresh = sent_at.duration_since(refreshed) >= TICKET_TTL / 3;
            if refresh || ticket.is_none() {
                refreshed = sent_at;
            }
            let outcome = self
                .attempt(
                    &conn, &req, &enc, check_lim, ticket, queue, refresh, &claims, sent_at,
                )
                .await;
            // A row this look shows was written before the look read it: its TTL counts
            // from now, when the answer is here.
            let seen_at = Instant::now();
            first = false;
            let sent_claims = std::mem::take(&mut claims);
            let mut skip = match outcome {
                Ok(Attempt::Granted(lease)) => {
                    self.checkin(conn);
                    return Ok(*lease);
                }
                Ok(Attempt::Busy {
                    lim,
                    held,
                    ahead,
                    rows,
                    delay,
                }) => {
                    // A no-wait request has seen nothing for long: it can only take over
                    // from a holder on this host whose process is gone.
                    watch.update(&rows, delay, seen_at);
                    let now = Instant::now();
                    let dead = watch.claims(now);
                    if !dead.is_empty() && dead != sent_claims {
                        claims = dead;
                        continue;
                    }
                    self.checkin(conn);
                    let held_back = rows.iter().filter(|r| r.id.lost).count();
                    let mut why = if held >= lim {
                        format!("all {lim} slot(s) are held")
                    } else {
                        format!(
                            "{held} of {lim} slot(s) are held and {ahead} earlier request(s) wait for the rest"
                        )
                    };
                    if held_back > 0 {
                        why.push_str(&format!(
                            " ({held_back} of them held back by the key's lock-delay of {} \
                             after a lost lease)",
                            format_duration(delay)
                        ));
                    }
                    return Err(self.err(ErrorKind::Busy, op, Some(&key), why));
                }
                Ok(Attempt::Mismatch { lim }) => {
                    self.checkin(conn);
                    return Err(self
                        .err(
                            ErrorKind::LimitMismatch,
                            op,
                            Some(&key),
                            format!(
                                "the key has a limit of {lim} slot(s), not {} (use -n {lim}, or another key)",
                                req.limit
                            ),
                        )
                        .with_current_limit(lim));
                }
                Ok(Attempt::Queued {
                    ticket: t,
                    ahead,
                    free,
                    rows,
                    delay,
                }) => {
                    ticket = Some(t);
                    watch.update(&rows, delay, seen_at);
                    // Every waiter watches, not only the first in line: whoever sees a row
                    // stale first claims it, and the slot then goes to the first in line.
                    let stale = watch.claims(Instant::now());
                    if !stale.is_empty() && stale != sent_claims {
                        claims = stale;
                        continue;
                    }
                    // Each wake-up (a release, an abandoned wait) lets at most one more
                    // request in; with `ahead` live requests before this one and `free`
                    // slots, the first `ahead - free` wake-ups are for others. A waiter
                    // ahead that died sends none: the backstop look covers that.
                    ahead.saturating_sub(free)
                }
                Err(f) if ticket.is_none() && conn.reused && f.never_sent() => {
                    // A pooled connection that died with a server restart: the request
                    // never left, so a fresh connection may try again.
                    drop(conn);
                    conn = match self.connect().await {
                        Ok(c) => c,
                        Err(f) => return Err(self.map(f, op, Some(&key))),
                    };
                    first = check_lim;
                    continue;
                }
                Err(f) => {
                    let unknown = f.breaks_conn();
                    let mut e = self.map(f, op, Some(&key));
                    if unknown {
                        // The call may have run on the server: a grant we never saw
                        // expires at its TTL.
                        e = e.with_grant_unknown();
                        drop(conn);
                    } else {
                        self.leave(conn, &key, ticket).await;
                    }
                    return Err(e);
                }
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                self.leave(conn, &key, ticket).await;
                return Err(req.timed_out("every slot stayed held", &self.url));
            }
            let mut pause = BACKSTOP.min(TICKET_TTL / 3);
            if let Some(n) = watch.next(now) {
                pause = pause.min(n + Duration::from_millis(2));
            }
            if let Some(c) = watch.cadence() {
                pause = pause.min(c);
            }
            if let Some(d) = deadline {
                pause = pause.min(d - now);
            }
            let look_at = tokio::time::Instant::now() + pause;
            loop {
                tokio::select! {
                    _ = &mut cancel => {
                        self.leave(conn, &key, ticket).await;
                        return Err(self.err(ErrorKind::Cancelled, op, Some(&key), "cancelled"));
                    }
                    _ = tokio::time::sleep_until(look_at) => break,
                    all = woken(&mut wake_rx, key.as_str()) => {
                        if all || skip == 0 {
                            break;
                        }
                        skip -= 1;
                    }
                }
            }
        }
    }

    async fn release_step(&self, lease: &Lease) -> Result<Released, Fail> {
        let key = lease.key.as_str().to_owned();
        let slot = i32::try_from(lease.slot).unwrap_or(-1);
        let token = i64::try_from(lease.token.0).unwrap_or(-1);
        let holder = lease.holder.id.to_string();
        let r = self
            .with_conn(|inner, conn| {
                let (key, holder) = (key.clone(), holder.clone());
                Box::pin(async move {
                    let rows = inner
                        .query_hot(
                            conn,
                            &inner.sql.release,
                            &[
                                (&key, Type::TEXT),
                                (&slot, Type::INT4),
                                (&token, Type::INT8),
                                (&holder, Type::TEXT),
                                (&inner.channel.as_str(), Type::TEXT),
                            ],
                        )
                        .await?;
                    let row = rows
                        .first()
                        .ok_or_else(|| corrupt("the release function returned no row"))?;
                    col::<Option<i32>>(row, 0)
                })
            })
            .await?;
        Ok(match r {
            Some(1) => Released::Released,
            _ => Released::NotHeld,
        })
    }

    async fn renew_step(&self, lease: &Lease) -> Result<Lease, Error> {
        let op = Op::Renew;
        let ttl = lease.ttl.unwrap_or(DEFAULT_TTL);
        let ttl_ms = ttl_ms(ttl).map_err(|e| e.context(op, Some(&lease.key), &self.url))?;
        let key = lease.key.as_str().to_owned();
        let slot = i32::try_from(lease.slot).unwrap_or(-1);
        let token = i64::try_from(lease.token.0).unwrap_or(-1);
        let holder = lease.holder.id.to_string();
        let sent = Arc::new(Mutex::new(Instant::now()));
        let sent2 = Arc::clone(&sent);
        let n = self
            .with_conn(move |inner, conn| {
                let (key, holder, sent) = (key.clone(), holder.clone(), Arc::clone(&sent2));
                Box::pin(async move {
                    *lock(&sent) = Instant::now();
                    let rows = inner
                        .query(
                            conn,
                            &format!(
                                "WITH u AS ({} RETURNING 1) SELECT count(*) FROM u",
                                inner.sql.renew
                            ),
                            &[
                                (&key, Type::TEXT),
                                (&slot, Type::INT4),
                                (&token, Type::INT8),
                                (&holder, Type::TEXT),
                                (&ttl_ms, Type::INT8),
                            ],
                        )
                        .await?;
                    let row = rows
                        .first()
                        .ok_or_else(|| corrupt("renew returned no row"))?;
                    col::<i64>(row, 0)
                })
            })
            .await
            .map_err(|f| self.map(f, op, Some(&lease.key)))?;
        if n == 1 {
            let mut renewed = lease.clone();
            renewed.ttl = Some(ttl);
            renewed.sent_at = Some(*lock(&sent));
            Ok(renewed)
        } else {
            Err(self.err(
                ErrorKind::Lost,
                op,
                Some(&lease.key),
                format!(
                    "the lease (slot {}, token {}) expired or was taken over",
                    lease.slot, lease.token
                ),
            ))
        }
    }

    async fn inspect_step(&self, key: &Key) -> Result<KeyStatus, Error> {
        let op = Op::Inspect;
        let k = key.as_str().to_owned();
        let magic = self.magic;
        let found = self
            .with_conn(|inner, conn| {
                let k = k.clone();
                Box::pin(async move {
                    let rows = inner
                        .query(conn, &inner.sql.key_row, &[(&k, Type::TEXT)])
                        .await?;
                    let Some(row) = rows.first() else {
                        return Ok(None);
                    };
                    let (lim, seq, delay) = key_row(row, &k)?;
                    let leases = inner
                        .query(conn, &inner.sql.lease_rows, &[(&k, Type::TEXT)])
                        .await?;
                    let mut out = Vec::new();
                    for r in &leases {
                        out.push(lease_row(r, &k)?);
                    }
                    let w = inner
                        .query(
                            conn,
                            &inner.sql.live_waiters,
                            &[(&k, Type::TEXT), (&magic, Type::INT4)],
                        )
                        .await?;
                    let waiters = match w.first() {
                        Some(r) => col::<i64>(r, 0)?,
                        None => 0,
                    };
                    Ok(Some((lim, seq, delay, out, waiters)))
                })
            })
            .await
            .map_err(|f| self.map(f, op, Some(key)))?;
        let Some((lim, seq, delay, leases, waiters)) = found else {
            return Err(self.err(
                ErrorKind::NotFound,
                op,
                Some(key),
                "no such key (a key is created by its first acquire)",
            ));
        };
        let mut slots = Vec::with_capacity(lim as usize);
        for s in 0..lim {
            slots.push(match leases.iter().find(|l| l.slot == s) {
                Some(l) => slot_status(l, delay, self.pid_ns.as_deref()),
                None => SlotStatus::free(s),
            });
        }
        for l in leases.iter().filter(|l| l.slot >= lim && !l.lost) {
            let mut st = slot_status(l, delay, self.pid_ns.as_deref());
            st.note = Some(format!(
                "above the limit of {lim} (the key was resized down): held until released"
            ));
            slots.push(st);
        }
        let last = leases.iter().map(|l| l.token).fold(seq, u64::max);
        Ok(KeyStatus {
            key: key.clone(),
            limit: lim,
            slots,
            waiters: Some(u32::try_from(waiters).unwrap_or(u32::MAX)),
            last_token: Some(Token(last)),
            lock_delay_ms: (delay > 0).then_some(delay),
        })
    }

    async fn list_step(&self) -> Result<Vec<Key>, Error> {
        let names = self
            .with_conn(|inner, conn| {
                Box::pin(async move {
                    let rows = inner.query(conn, &inner.sql.list, &[]).await?;
                    let mut names = Vec::new();
                    for r in &rows {
                        names.push(col::<String>(r, 0)?);
                    }
                    Ok(names)
                })
            })
            .await
            .map_err(|f| self.map(f, Op::List, None))?;
        let mut keys = Vec::with_capacity(names.len());
        for n in names {
            keys.push(Key::new(n.clone()).map_err(|_| {
                self.err(
                    ErrorKind::Corrupt,
                    Op::List,
                    None,
                    format!(
                        "the keys table of schema \"{}\" holds '{n}', which is not a valid key",
                        self.cfg.schema
                    ),
                )
            })?);
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    async fn break_step(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let op = Op::Break;
        let k = key.as_str().to_owned();
        let want = holder.map(|h| h.to_string());
        let freed = self
            .with_conn(|inner, conn| {
                let (k, want) = (k.clone(), want.clone());
                Box::pin(async move {
                    let rows = inner
                        .query(conn, &inner.sql.key_row, &[(&k, Type::TEXT)])
                        .await?;
                    let Some(row) = rows.first() else {
                        return Ok(None);
                    };
                    key_row(row, &k)?;
                    let rows = inner
                        .query(
                            conn,
                            &inner.sql.break_leases,
                            &[(&k, Type::TEXT), (&want, Type::TEXT)],
                        )
                        .await?;
                    let mut freed = Vec::new();
                    for r in &rows {
                        let slot: Option<i32> = col(r, 0)?;
                        let token: Option<i64> = col(r, 1)?;
                        let json: Option<String> = col(r, 2)?;
                        let since: Option<f64> = col(r, 3)?;
                        let held_back: Option<bool> = col(r, 4)?;
                        freed.push(SlotStatus {
                            slot: slot.and_then(|s| u32::try_from(s).ok()).unwrap_or(u32::MAX),
                            state: SlotState::Free,
                            token: token.and_then(|t| u64::try_from(t).ok()).map(Token),
                            holder: json.and_then(|j| Holder::from_json(&j)),
                            since_unix_ms: since.filter(|s| *s >= 0.0).map(|s| s as u64),
                            renewed_unix_ms: None,
                            expires_unix_ms: None,
                            note: Some(if held_back == Some(true) {
                                "broken; held back by the key's lock-delay before it is granted \
                                 again; its holder's next renew answers lost"
                                    .into()
                            } else {
                                "freed by break; its holder's next renew answers lost".into()
                            }),
                        });
                    }
                    if !freed.is_empty() {
                        inner
                            .query(
                                conn,
                                &inner.sql.notify,
                                &[(&inner.channel.as_str(), Type::TEXT), (&k, Type::TEXT)],
                            )
                            .await?;
                    }
                    Ok(Some(freed))
                })
            })
            .await
            .map_err(|f| self.map(f, op, Some(key)))?;
        freed.ok_or_else(|| self.err(ErrorKind::NotFound, op, Some(key), "no such key"))
    }

    async fn resize_step(&self, key: &Key, limit: u32) -> Result<(), Error> {
        let op = Op::Resize;
        let lim = i32::try_from(limit)
            .ok()
            .filter(|l| *l >= 1 && limit <= MAX_LIMIT)
            .ok_or_else(|| {
                self.err(
                    ErrorKind::InvalidInput,
                    op,
                    Some(key),
                    format!("the limit must be 1 to {MAX_LIMIT} slots, not {limit}"),
                )
            })?;
        let k = key.as_str().to_owned();
        let n = self
            .with_conn(|inner, conn| {
                let k = k.clone();
                Box::pin(async move {
                    let rows = inner
                        .query(
                            conn,
                            &format!(
                                "WITH u AS ({} RETURNING 1) SELECT count(*) FROM u",
                                inner.sql.resize
                            ),
                            &[(&k, Type::TEXT), (&lim, Type::INT4)],
                        )
                        .await?;
                    let n = match rows.first() {
                        Some(r) => col::<i64>(r, 0)?,
                        None => 0,
                    };
                    if n > 0 {
                        // A raised limit may let waiters in.
                        inner
                            .query(
                                conn,
                                &inner.sql.notify,
                                &[(&inner.channel.as_str(), Type::TEXT), (&k, Type::TEXT)],
                            )
                            .await?;
                    }
                    Ok(n)
                })
            })
            .await
            .map_err(|f| self.map(f, op, Some(key)))?;
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

/// Waits until a wake-up concerns `key`; `true` when it concerns every key (the
/// listener reconnected, or wake-ups were lost), which always deserves a look.
async fn woken(rx: &mut broadcast::Receiver<Wake>, key: &str) -> bool {
    loop {
        match rx.recv().await {
            Ok(Wake::Key(k)) if &*k == key => return false,
            Ok(Wake::Key(_)) => {}
            Ok(Wake::All) | Err(broadcast::error::RecvError::Lagged(_)) => return true,
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// The listening connection: `LISTEN` on the schema's channel, forwarding each
/// notification to the waiters; reconnects when the connection fails.
async fn listen(
    cfg: PostgresConfig,
    channel: String,
    wake: broadcast::Sender<Wake>,
    ready: watch::Sender<bool>,
) {
    loop {
        if let Ok(Ok((client, mut connection))) =
            tokio::time::timeout(cfg.timeout, cfg.pg.connect(NoTls)).await
        {
            let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let driver = tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(m) = messages.next().await {
                    match m {
                        Ok(AsyncMessage::Notification(n)) => {
                            if ntx.send(n.payload().to_owned()).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            let listened = tokio::time::timeout(
                cfg.timeout,
                client.batch_execute(&format!("LISTEN \"{channel}\"")),
            )
            .await;
            if matches!(listened, Ok(Ok(()))) {
                ready.send_replace(true);
                let _ = wake.send(Wake::All);
                loop {
                    tokio::select! {
                        n = nrx.recv() => match n {
                            Some(k) => { let _ = wake.send(Wake::Key(Arc::from(k))); }
                            None => break,
                        },
                        _ = tokio::time::sleep(LISTEN_PING) => {
                            // Repeating LISTEN is harmless and proves the session is
                            // still there (and keeps it visible in pg_stat_activity).
                            let ping = tokio::time::timeout(
                                cfg.timeout,
                                client.batch_execute(&format!("LISTEN \"{channel}\"")),
                            )
                            .await;
                            if !matches!(ping, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                ready.send_replace(false);
                // Notifications may have been lost while the connection failed.
                let _ = wake.send(Wake::All);
            }
            driver.abort();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The lease rows a look returned (`o_rows`, five numbers a row, and `o_holders`: the
/// holder's JSON for holders that share the caller's boot id, NULL for the others, whose
/// process this host cannot judge).
fn looked(row: &Row) -> Result<Vec<Looked>, Fail> {
    let nums: Vec<i64> = col::<Option<Vec<i64>>>(row, 9)?.unwrap_or_default();
    let holders: Vec<Option<String>> =
        col::<Option<Vec<Option<String>>>>(row, 10)?.unwrap_or_default();
    if nums.len() % 5 != 0 || nums.len() / 5 != holders.len() {
        return Err(corrupt(
            "the attempt function answered a malformed list of lease rows",
        ));
    }
    let mut out = Vec::with_capacity(holders.len());
    for (n, h) in nums.chunks_exact(5).zip(holders) {
        let slot = u32::try_from(n[0])
            .map_err(|_| corrupt(format!("the attempt function answered slot {}", n[0])))?;
        out.push(Looked {
            id: RowId {
                slot,
                token: n[1],
                renewals: n[2],
                lost: n[4] != 0,
            },
            ttl: Duration::from_millis(u64::try_from(n[3]).unwrap_or(0).max(1)),
            holder: h.as_deref().and_then(Holder::from_json),
        });
    }
    Ok(out)
}

/// The key's lock-delay a look returned (`o_delay_ms`).
fn delay_of(row: &Row) -> Result<Duration, Fail> {
    let ms: Option<i64> = col(row, 8)?;
    Ok(Duration::from_millis(ms.unwrap_or(0).max(0) as u64))
}

/// A lease row as read, types checked.
struct LeaseRow {
    slot: u32,
    token: u64,
    holder_id: String,
    holder_json: String,
    since_ms: Option<u64>,
    renewed_ms: Option<u64>,
    expires_ms: Option<u64>,
    /// Held back by the lock-delay after it was lost.
    lost: bool,
    /// The server's clock says a TTL passed since the last renewal (a hint for display).
    overdue: bool,
    /// The holder's PID namespace.
    pid_ns: Option<String>,
}

fn key_row(row: &Row, key: &str) -> Result<(u32, u64, u64), Fail> {
    let lim: Option<i32> = col(row, 0)?;
    let seq: Option<i64> = col(row, 1)?;
    let delay: Option<i64> = col(row, 2)?;
    let lim = lim
        .and_then(|l| u32::try_from(l).ok())
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or_else(|| {
            corrupt(format!(
                "the keys row of {key} holds the limit {}, not a limit of 1 to {MAX_LIMIT} slots",
                lim.map_or("NULL".into(), |l| l.to_string())
            ))
        })?;
    let seq = seq.and_then(|s| u64::try_from(s).ok()).ok_or_else(|| {
        corrupt(format!(
            "the keys row of {key} holds the token sequence {}, not a count of tokens",
            seq.map_or("NULL".into(), |s| s.to_string())
        ))
    })?;
    let delay = delay.and_then(|d| u64::try_from(d).ok()).ok_or_else(|| {
        corrupt(format!(
            "the keys row of {key} holds the lock-delay {}, not a number of milliseconds",
            delay.map_or("NULL".into(), |d| d.to_string())
        ))
    })?;
    Ok((lim, seq, delay))
}

fn unix_ms_of(v: Option<f64>) -> Option<u64> {
    v.filter(|s| s.is_finite() && *s >= 0.0).map(|s| s as u64)
}

fn lease_row(r: &Row, key: &str) -> Result<LeaseRow, Fail> {
    let slot: Option<i32> = col(r, 0)?;
    let token: Option<i64> = col(r, 1)?;
    let holder_id: Option<String> = col(r, 2)?;
    let holder_json: Option<String> = col(r, 3)?;
    let since: Option<f64> = col(r, 4)?;
    let renewed: Option<f64> = col(r, 5)?;
    let expires: Option<f64> = col(r, 6)?;
    let lost: Option<bool> = col(r, 7)?;
    let overdue: Option<bool> = col(r, 8)?;
    let pid_ns: Option<String> = col(r, 9)?;
    match (
        slot.and_then(|s| u32::try_from(s).ok()),
        token
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t >= 1),
        holder_id,
        lost,
    ) {
        (Some(slot), Some(token), Some(holder_id), Some(lost)) => Ok(LeaseRow {
            slot,
            token,
            holder_id,
            holder_json: holder_json.unwrap_or_default(),
            since_ms: unix_ms_of(since),
            renewed_ms: unix_ms_of(renewed),
            expires_ms: unix_ms_of(expires),
            lost,
            overdue: overdue.unwrap_or(false),
            pid_ns,
        }),
        _ => Err(corrupt(format!(
            "a leases row of {key} holds slot {}, token {}: not a lease baton wrote",
            slot.map_or("NULL".into(), |s| s.to_string()),
            token.map_or("NULL".into(), |t| t.to_string())
        ))),
    }
}

/// A slot as `status` shows it. What it says about staleness comes from the server's
/// clock and this host's process table, for display: only a waiter's own observations
/// (or a dead process on its host) take a lease over.
fn slot_status(l: &LeaseRow, delay_ms: u64, pid_ns: Option<&str>) -> SlotStatus {
    if l.lost {
        let mut st = SlotStatus::free(l.slot);
        st.note = Some(format!(
            "held back by the key's lock-delay of {}: the lease with token {} was lost (taken \
             over or broken); granted again once a waiter has seen it held back that long",
            format_duration(Duration::from_millis(delay_ms)),
            l.token
        ));
        return st;
    }
    let dead = pid_ns.is_some()
        && l.pid_ns.as_deref() == pid_ns
        && Holder::from_json(&l.holder_json).is_some_and(|h| h.liveness() == Liveness::Dead);
    let mut st = SlotStatus::of_record(
        l.slot,
        l.token,
        &l.holder_id,
        &l.holder_json,
        l.since_ms,
        dead.then_some("has a holder whose process on this host is gone"),
    );
    if st.state == SlotState::Held {
        st.renewed_unix_ms = l.renewed_ms;
        st.expires_unix_ms = l.expires_ms;
        if l.overdue && st.note.is_none() {
            st.note = Some(
                "not renewed within its TTL by the server's clock: its holder may be dead; a \
                 waiter takes it over once it has seen no renewal for the TTL"
                    .into(),
            );
        }
    }
    st
}

/// Column `i` of a row, or corrupt state when its type is not the one baton wrote (a
/// table altered by hand).
fn col<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> Result<T, Fail> {
    r.try_get(i).map_err(|e| {
        let (name, ty) = r
            .columns()
            .get(i)
            .map(|c| (c.name().to_owned(), c.type_().to_string()))
            .unwrap_or_default();
        corrupt(format!(
            "column {name} holds a value of type {ty} that baton did not write ({e}); the \
             tables were altered by hand"
        ))
    })
}

fn u32_of(v: Option<i32>, what: &str) -> Result<u32, Fail> {
    v.and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| corrupt(format!("the store answered {v:?} as a {what}")))
}

/// The parts of a request written into rows, encoded once.
struct Encoded {
    holder_id: String,
    holder_json: String,
    ttl: Duration,
    ttl_ms: i64,
    /// The lock-delay a new key gets (0: none).
    lock_delay_ms: i64,
}

impl Encoded {
    fn new(req: &AcquireRequest) -> Result<Encoded, Error> {
        let ttl = req.ttl.unwrap_or(DEFAULT_TTL);
        let ttl_ms = ttl_ms(ttl)?;
        let holder_json = req.holder.to_json()?;
        let lock_delay_ms = match req.lock_delay {
            Some(d) if !d.is_zero() => i64::try_from(d.as_millis().max(1))
                .ok()
                .filter(|ms| *ms <= 100 * 365 * 24 * 3600 * 1000)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidInput,
                        "the lock-delay is too large (over 100 years)",
                    )
                })?,
            _ => 0,
        };
        Ok(Encoded {
            holder_id: req.holder.id.to_string(),
            holder_json,
            ttl,
            ttl_ms,
            lock_delay_ms,
        })
    }
}

/// The TTL in whole milliseconds (the server's timestamps have microseconds; a TTL is
/// rounded down so that the server never counts longer than the holder).
fn ttl_ms(ttl: Duration) -> Result<i64, Error> {
    if ttl < Duration::from_millis(1) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the TTL must be at least 1ms",
        ));
    }
    i64::try_from(ttl.as_millis())
        .ok()
        .filter(|ms| *ms <= 100 * 365 * 24 * 3600 * 1000)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "the TTL is too large (over 100 years)",
            )
        })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain containers; a panic while holding one cannot leave it
    // inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// This process's PID namespace as the kernel names it (`pid:[4026531836]`). Two
/// processes with the same boot id but different namespaces (containers sharing the host's
/// name, as with host networking) cannot see each other's PIDs: a PID missing from our
/// `/proc` then proves nothing.
fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.display().to_string())
}

/// A stable 31-bit number from the schema name (FNV-1a), the first half of the
/// advisory locks baton takes in it; stable across processes and releases.
fn magic(schema: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("baton:{schema}").bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff) as i32
}

impl PostgresStore {
    /// Opens the PostgreSQL store the URL names: `postgres://user@host:5432/db`.
    ///
    /// Connects lazily: a server that is down shows on the first operation, as
    /// [`ErrorKind::Unavailable`]. The schema (default `baton`, `?schema=NAME`) is created
    /// on first use. Starts the store's own runtime thread, which drives every
    /// connection; dropping the store stops it.
    pub fn open(url: &StoreUrl) -> Result<PostgresStore, Error> {
        let cfg = PostgresConfig::from_url(url)?;
        let (runtime, handle) = OwnedRuntime::start().map_err(|e| {
            Error::new(ErrorKind::Unavailable, "cannot start the store's runtime")
                .with_op(Op::Open)
                .with_store(url)
                .with_source(e)
        })?;
        let (wake, _) = broadcast::channel(1024);
        let (listening_tx, listening) = watch::channel(false);
        let sql = Sql::new(&cfg.schema);
        let inner = Inner {
            url: url.clone(),
            magic: magic(&cfg.schema),
            channel: format!("baton_{}", cfg.schema),
            pid_ns: pid_namespace(),
            cfg,
            handle,
            sql,
            pool: Mutex::new(Vec::new()),
            schema_ready: AtomicBool::new(false),
            setup: tokio::sync::Mutex::new(()),
            wake,
            listener_started: AtomicBool::new(false),
            listening,
            listening_tx: Mutex::new(Some(listening_tx)),
        };
        Ok(PostgresStore {
            inner: Arc::new(inner),
            _runtime: runtime,
        })
    }

    /// The schema baton's tables live in.
    pub fn schema(&self) -> &str {
        &self.inner.cfg.schema
    }

    /// Runs `f` on the store's runtime and waits for it from whatever runtime the caller
    /// uses. The task runs to its end even if the caller stops waiting (a release still
    /// happens).
    async fn on_runtime<T: Send + 'static>(
        &self,
        op: Op,
        key: Option<&Key>,
        f: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
    ) -> Result<T, Error> {
        match self.inner.handle.spawn(f).await {
            Ok(r) => r,
            Err(e) => Err(self
                .inner
                .err(
                    ErrorKind::Unavailable,
                    op,
                    key,
                    "the store's runtime stopped",
                )
                .with_source(e)),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::new(
            "at once when its holder ran on the waiter's host and its process is gone; \
             otherwise once a waiter has seen no renewal for the lease's TTL (30s unless the \
             request sets one) on its own clock, so a TTL after the next request when nobody \
             was waiting",
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
            .map_err(|e| e.context(Op::Acquire, Some(&req.key), &self.inner.url))?;
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let (tx, rx) = oneshot::channel();
        let inner = Arc::clone(&self.inner);
        let req2 = req.clone();
        self.inner.handle.spawn(async move {
            let result = Arc::clone(&inner).acquire_task(req2, cancel_rx).await;
            if let Err(Ok(lease)) = tx.send(result) {
                // Nobody waits for it any more (the acquire was cancelled): give it back.
                let _ = inner.release_step(&lease).await;
            }
        });
        let result = rx.await;
        drop(cancel_tx);
        result.unwrap_or_else(|_| {
            Err(self.inner.err(
                ErrorKind::Unavailable,
                Op::Acquire,
                Some(&req.key),
                "the store's runtime stopped",
            ))
        })
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        let inner = Arc::clone(&self.inner);
        let l = lease.clone();
        self.on_runtime(Op::Release, Some(&lease.key), async move {
            inner
                .release_step(&l)
                .await
                .map_err(|f| inner.map(f, Op::Release, Some(&l.key)))
        })
        .await
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let inner = Arc::clone(&self.inner);
        let l = lease.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.handle.spawn(async move {
            let _ = tx.send(inner.release_step(&l).await.is_ok());
        });
        rx.recv_timeout(self.inner.cfg.timeout + Duration::from_secs(1))
            .unwrap_or(false)
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let inner = Arc::clone(&self.inner);
        let k = key.clone();
        self.on_runtime(Op::Inspect, Some(key), async move {
            inner.inspect_step(&k).await
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        let inner = Arc::clone(&self.inner);
        self.on_runtime(Op::List, None, async move { inner.list_step().await })
            .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let inner = Arc::clone(&self.inner);
        let l = lease.clone();
        self.on_runtime(Op::Renew, Some(&lease.key), async move {
            inner.renew_step(&l).await
        })
        .await
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let inner = Arc::clone(&self.inner);
        let k = key.clone();
        self.on_runtime(Op::Break, Some(key), async move {
            inner.break_step(&k, holder).await
        })
        .await
    }

    async fn resize(&self, key: &Key, limit: u32) -> Result<KeyStatus, Error> {
        let inner = Arc::clone(&self.inner);
        let k = key.clone();
        self.on_runtime(Op::Resize, Some(key), async move {
            inner.resize_step(&k, limit).await?;
            inner.inspect_step(&k).await
        })
        .await
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        barrier::barrier(self, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_is_stable_and_positive() {
        assert_eq!(magic("baton"), magic("baton"));
        assert_ne!(magic("baton"), magic("jobs"));
        assert!(magic("baton") >= 0);
    }
}
