//! The PostgreSQL store: one row per granted lease, one row per queued waiter, one row
//! per key with its limit and token sequence, in one schema of one database.
//!
//! This file holds the public store type, its opening, and its [`Backend`]: [`OnRuntime`]
//! runs each operation on the store's own runtime and gives it up there when its caller
//! stops waiting (a grant nobody receives is released). Errors are
//! bare; `crate::open` wraps the store in the context layer, which names the operation,
//! key and store. The work is in files by role, each
//! stating what it guarantees:
//! - `core.rs`: the connection (pool, bounded statements, error mapping):
//!   *Bounded*, *Runtime*;
//! - `layout.rs`: the rows, their decoding and the numbers baton owns in a schema;
//! - `schema.rs` (and `schema/sql.rs`): the tables and functions, and their checks;
//! - `acquire.rs`: the grant and the wait: *Limit*, *Expiry*, *Lock-delay*, *Tokens*,
//!   *Fairness*, *No residue*;
//! - `listen.rs`: `LISTEN`/`NOTIFY`: *Waking*;
//! - `lease.rs`: renew and release;
//! - `admin.rs`: status, list, break and resize;
//! - `barrier.rs`: barriers.

use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::kit::backend::{Backend, OnRuntime};
use baton_core::kit::runtime::{Cancel, StoreRuntime};
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, Resize, SlotStatus, StoreUrl,
};
use tokio::sync::{broadcast, watch};

use crate::acquire::BACKSTOP;
use crate::config::PostgresConfig;
use crate::core::Inner;
use crate::layout::{magic, pid_namespace};
use crate::schema::Sql;

/// The PostgreSQL store. See the crate docs and README for the mechanism and its bounds;
/// [`PostgresStore::open`] opens one, and it derefs to [`Inner`] for its schema.
pub type PostgresStore = OnRuntime<Inner>;

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.url)
            .field("schema", &self.cfg.schema)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The schema baton's tables live in.
    pub fn schema(&self) -> &str {
        &self.cfg.schema
    }
}

impl Backend for Inner {
    /// Opens the PostgreSQL store the URL names: `postgres://user@host:5432/db`.
    ///
    /// Connects lazily: a server that is down shows on the first operation, as
    /// [`ErrorKind::Unavailable`]. The schema (default `baton`, `?schema=NAME`) is created
    /// on first use. Starts the store's own runtime thread, where a request, its
    /// connection's I/O and its answer meet, and which drives every connection; dropping
    /// the store stops it. Its errors are bare (kind and message): [`crate::open`] adds
    /// the operation, key and store to each.
    fn open(url: &StoreUrl) -> Result<Inner, Error> {
        let cfg = PostgresConfig::from_url(url)?;
        let runtime = StoreRuntime::start("baton-postgres", 1).map_err(|e| {
            Error::new(ErrorKind::Unavailable, "cannot start the store's runtime")
                .with_op(Op::Open)
                .with_store(url)
                .with_source(e)
        })?;
        let (wake, _) = broadcast::channel(1024);
        let (listening_tx, listening) = watch::channel(false);
        let sql = Sql::new(&cfg.schema);
        Ok(Inner {
            url: url.clone(),
            magic: magic(&cfg.schema),
            channel: format!("baton_{}", cfg.schema),
            pid_ns: pid_namespace(),
            cfg,
            runtime,
            sql,
            pool: Mutex::new(Vec::new()),
            schema_ready: AtomicBool::new(false),
            setup: tokio::sync::Mutex::new(()),
            wake,
            listener_started: AtomicBool::new(false),
            listening,
            listening_tx: Mutex::new(Some(listening_tx)),
        })
    }

    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn runtime(&self) -> &StoreRuntime {
        &self.runtime
    }

    fn capabilities(&self) -> Capabilities {
        // A waiter looks at least every BACKSTOP and every quarter TTL, so it sees the
        // lease unrenewed for its TTL within a look of the TTL's end.
        Capabilities::lease_store(
            "at once when its holder ran on the waiter's host and its process is gone; \
             otherwise once a waiter has seen no renewal for the lease's TTL on its own \
             clock, so a TTL after the next request when nobody was waiting",
            BACKSTOP,
        )
    }

    /// The TTL is checked (`kit::time::validate_ttl`) where the request is encoded.
    async fn acquire(self: Arc<Self>, req: AcquireRequest, cancel: Cancel) -> Result<Lease, Error> {
        self.acquire_task(req, cancel).await
    }

    async fn release(self: &Arc<Self>, lease: &Lease) -> Result<Released, Error> {
        self.release_step(lease).await.map_err(|f| self.map(f))
    }

    fn release_bound(&self) -> Duration {
        self.cfg.timeout + Duration::from_secs(1)
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        self.renew_step(lease).await
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        self.inspect_step(key).await
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        self.list_step().await
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        self.break_step(key, holder).await
    }

    async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus, Error> {
        self.resize_step(key, change).await?;
        self.inspect_step(key).await
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        self.delete_step(key).await
    }

    /// Dropping the caller's future withdraws the arrival (the task sees its cancel and
    /// withdraws).
    async fn barrier(
        self: Arc<Self>,
        req: BarrierRequest,
        cancel: Cancel,
    ) -> Result<BarrierPassed, Error> {
        let parties = i32::try_from(req.parties).map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("a barrier has at most {} parties", i32::MAX),
            )
        })?;
        self.barrier_task(req, parties, cancel).await
    }
}
