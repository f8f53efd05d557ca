//! The PostgreSQL store: one row per granted lease, one row per queued waiter, one row
//! per key with its limit and token sequence, in one schema of one database.
//!
//! This file holds the public store type, its opening, and the thin [`Store`] impl: each
//! operation runs on the store's own runtime and is given up there when its caller stops
//! waiting (a grant nobody receives is released). The work is in files by role, each
//! stating what it guarantees:
//! - `core.rs`: the connection (runtime, pool, bounded statements, error mapping):
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

use async_trait::async_trait;
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, SlotStatus, Store, StoreUrl,
};
use tokio::sync::{broadcast, oneshot, watch};

use crate::barrier;
use crate::config::PostgresConfig;
use crate::core::{Inner, OwnedRuntime};
use crate::layout::{magic, pid_namespace};
use crate::schema::Sql;

/// The PostgreSQL store. See the crate docs and README for the mechanism and its bounds.
pub struct PostgresStore {
    pub(crate) inner: Arc<Inner>,
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
