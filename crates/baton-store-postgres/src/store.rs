//! The PostgreSQL store: one row per granted lease, one row per queued waiter, one row
//! per key with its limit and token sequence, in one schema of one database.
//!
//! This file holds the public store type, its opening, and the thin [`Store`] impl: each
//! operation runs on the store's own runtime (`baton_core::kit::runtime`) and is given up
//! there when its caller stops waiting (a grant nobody receives is released). Errors are
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

use async_trait::async_trait;
use baton_core::kit::runtime::{Call, StoreRuntime};
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, SlotStatus, Store, StoreUrl,
};
use tokio::sync::{broadcast, watch};

use crate::acquire::BACKSTOP;
use crate::config::PostgresConfig;
use crate::core::Inner;
use crate::layout::{magic, pid_namespace};
use crate::schema::Sql;

/// The PostgreSQL store. See the crate docs and README for the mechanism and its bounds.
pub struct PostgresStore {
    pub(crate) inner: Arc<Inner>,
    /// The store's own runtime: one thread, where a request, its connection's I/O and its
    /// answer meet. Dropping the store stops it.
    runtime: StoreRuntime,
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
    /// connection; dropping the store stops it. Its errors are bare (kind and message):
    /// [`crate::open`] adds the operation, key and store to each.
    pub fn open(url: &StoreUrl) -> Result<PostgresStore, Error> {
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
        let inner = Inner {
            url: url.clone(),
            magic: magic(&cfg.schema),
            channel: format!("baton_{}", cfg.schema),
            pid_ns: pid_namespace(),
            cfg,
            handle: runtime.handle().clone(),
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
            runtime,
        })
    }

    /// The schema baton's tables live in.
    pub fn schema(&self) -> &str {
        &self.inner.cfg.schema
    }

    fn call<'a>(&'a self, op: Op, key: Option<&'a Key>) -> Call<'a> {
        Call::new(op, key, &self.inner.url)
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
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

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        // The TTL is checked (`kit::time::validate_ttl`) where the request is encoded.
        req.validate()?;
        let inner = Arc::clone(&self.inner);
        let give_back = Arc::clone(&self.inner);
        let req = req.clone();
        self.runtime
            .grant(
                self.call(Op::Acquire, Some(&req.key)),
                |cancel| inner.acquire_task(req.clone(), cancel),
                // Nobody waits for it any more (the acquire was cancelled): give it back.
                move |lease| async move {
                    let _ = give_back.release_step(&lease).await;
                },
            )
            .await
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        let inner = Arc::clone(&self.inner);
        let l = lease.clone();
        self.runtime
            .run(self.call(Op::Release, Some(&lease.key)), async move {
                inner.release_step(&l).await.map_err(|f| inner.map(f))
            })
            .await
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let inner = Arc::clone(&self.inner);
        let l = lease.clone();
        let bound = self.inner.cfg.timeout + Duration::from_secs(1);
        self.runtime
            .block_for(bound, async move { inner.release_step(&l).await.is_ok() })
            .unwrap_or(false)
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let inner = Arc::clone(&self.inner);
        let k = key.clone();
        self.runtime
            .run(self.call(Op::Inspect, Some(key)), async move {
                inner.inspect_step(&k).await
            })
            .await
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        let inner = Arc::clone(&self.inner);
        self.runtime
            .run(
                self.call(Op::List, None),
                async move { inner.list_step().await },
            )
            .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let inner = Arc::clone(&self.inner);
        let l = lease.clone();
        self.runtime
            .run(self.call(Op::Renew, Some(&lease.key)), async move {
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
        self.runtime
            .run(self.call(Op::Break, Some(key)), async move {
                inner.break_step(&k, holder).await
            })
            .await
    }

    async fn resize(&self, key: &Key, limit: u32) -> Result<KeyStatus, Error> {
        let inner = Arc::clone(&self.inner);
        let k = key.clone();
        self.runtime
            .run(self.call(Op::Resize, Some(key)), async move {
                inner.resize_step(&k, limit).await?;
                inner.inspect_step(&k).await
            })
            .await
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        baton_core::barrier::validate(req)?;
        let parties = i32::try_from(req.parties).map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                format!("a barrier has at most {} parties", i32::MAX),
            )
        })?;
        let inner = Arc::clone(&self.inner);
        let req = req.clone();
        // Dropping the future withdraws the arrival (the task sees its cancel and
        // withdraws); a pass nobody receives needs no giving back.
        self.runtime
            .grant(
                self.call(Op::Barrier, Some(&req.key)),
                |cancel| inner.barrier_task(req.clone(), parties, cancel),
                |_passed| async {},
            )
            .await
    }
}
