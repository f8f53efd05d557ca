//! The etcd store's public type: opening it, its configuration, and the `Store` trait,
//! each operation run on the store's own runtime (`core.rs`) and delegated to the role
//! files: `acquire.rs` (the grant), `lease.rs` (renew, release), `admin.rs` (status, list,
//! break, resize) and `barrier.rs`; `layout.rs` has what the store keeps in etcd.
//!
//! Guarantees: an acquire or barrier wait whose future is dropped is cancelled on the
//! store's runtime. A cancelled or failed acquire revokes its etcd lease (which deletes
//! its waiter key), and a grant made as its caller went away is released; a barrier wait
//! revokes its arrival's lease whatever happens, before the task ends.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, SlotStatus, Store, StoreUrl,
};
use tokio::sync::{oneshot, OnceCell};

use crate::config::EtcdConfig;
use crate::core::{random_lease_id, Inner, RuntimeThread};

/// The TTL of a lease whose request gives none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// The etcd store. See the crate docs and README for the mechanism and its bounds.
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("url", &self.inner.url)
            .field("endpoints", &self.inner.config.endpoints)
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Opens the etcd store the URL names. Does not connect: the first operation does,
    /// so this never blocks; an unreachable cluster shows as `Unavailable` then.
    pub fn open(url: &StoreUrl) -> Result<EtcdStore, Error> {
        let config = EtcdConfig::from_url(url)?;
        let runtime = RuntimeThread::start().map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                "cannot start the etcd client's threads",
            )
            .with_op(Op::Open)
            .with_store(url)
            .with_source(e)
        })?;
        let clients = config.endpoints.iter().map(|_| OnceCell::new()).collect();
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                url: url.clone(),
                config,
                runtime,
                clients,
                current: AtomicUsize::new(0),
                granted: Mutex::new(HashMap::new()),
                pool: Mutex::new(Vec::new()),
                wakeups: AtomicU64::new(0),
            }),
        })
    }

    /// The store's configuration (endpoints, prefix, timeouts).
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// How many times a watch event woke a waiting acquire of this handle (for tests that
    /// check a release wakes only the waiters it concerns).
    #[doc(hidden)]
    pub fn wakeups(&self) -> u64 {
        self.inner.wakeups.load(Ordering::Relaxed)
    }

    /// A barrier wait on the store's runtime. Whatever happens (a pass, an error, this
    /// future dropped), the arrival's etcd lease is revoked before the task ends, so no
    /// arrival outlives the call.
    async fn barrier_on_runtime(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        baton_core::barrier::validate(req)
            .map_err(|e| self.inner.ctx(e, Op::Barrier, Some(&req.key)))?;
        let id = random_lease_id();
        let (tx, rx) = oneshot::channel::<Result<BarrierPassed, Error>>();
        // Dropped with this future: the task then withdraws the arrival.
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let inner = Arc::clone(&self.inner);
        let req2 = req.clone();
        self.inner.runtime.handle.spawn(async move {
            let result = tokio::select! {
                r = inner.barrier_inner(&req2, id) => r,
                _ = cancel_rx => Err(inner.err(ErrorKind::Cancelled, Op::Barrier, Some(&req2.key), "cancelled")),
            };
            // Leaving (after a pass) or withdrawing (the generation key is unchanged, or
            // the wait was cancelled): the arrival goes with its lease.
            inner.revoke_quiet(id).await;
            let _ = tx.send(result);
        });
        let result = rx.await;
        drop(cancel_tx);
        result.unwrap_or_else(|_| {
            Err(self.inner.err(
                ErrorKind::Unavailable,
                Op::Barrier,
                Some(&req.key),
                "the etcd client's task stopped",
            ))
        })
    }

    /// Runs `f` on the store's runtime and waits for it from any runtime.
    async fn on_runtime<T: Send + 'static, Fut>(
        &self,
        op: Op,
        key: Option<&Key>,
        f: impl FnOnce(Arc<Inner>) -> Fut,
    ) -> Result<T, Error>
    where
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let fut = f(Arc::clone(&self.inner));
        match self.inner.runtime.handle.spawn(fut).await {
            Ok(r) => r,
            Err(e) => Err(self
                .inner
                .err(
                    ErrorKind::Unavailable,
                    op,
                    key,
                    "the etcd client's task failed",
                )
                .with_source(e)),
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::new(
            "within the lease's TTL (30s unless the request sets one; etcd counts whole \
             seconds, 2s at least) after its holder dies",
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
            .map_err(|e| self.inner.ctx(e, Op::Acquire, Some(&req.key)))?;
        let pooled = self.inner.take_pooled(req.ttl.unwrap_or(DEFAULT_TTL));
        let id = pooled.unwrap_or_else(random_lease_id);
        let (tx, rx) = oneshot::channel::<Result<Lease, Error>>();
        // Dropped with this future: the task then gives up and cleans up.
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let inner = Arc::clone(&self.inner);
        let req2 = req.clone();
        self.inner.runtime.handle.spawn(async move {
            let result = tokio::select! {
                r = inner.acquire_inner(&req2, id, pooled.is_some()) => r,
                _ = cancel_rx => Err(inner.err(ErrorKind::Cancelled, Op::Acquire, Some(&req2.key), "cancelled")),
            };
            match result {
                Ok(lease) => {
                    if let Err(Ok(lease)) = tx.send(Ok(lease)) {
                        // Nobody waits for it any more: give it back.
                        let _ = inner.release(&lease).await;
                    }
                }
                Err(e) => {
                    // A request that reached no member may still be delivered later; if
                    // the clean-up could not confirm either, a grant may exist (it expires
                    // with its lease).
                    let e = if !inner.revoke_quiet(id).await && e.kind() == ErrorKind::Unavailable {
                        e.with_grant_unknown()
                    } else {
                        e
                    };
                    let _ = tx.send(Err(e));
                }
            }
        });
        let result = rx.await;
        drop(cancel_tx);
        result.unwrap_or_else(|_| {
            Err(self.inner.err(
                ErrorKind::Unavailable,
                Op::Acquire,
                Some(&req.key),
                "the etcd client's task stopped",
            ))
        })
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        let l = lease.clone();
        self.on_runtime(Op::Release, Some(&lease.key), |inner| async move {
            inner.release(&l).await
        })
        .await
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let inner = Arc::clone(&self.inner);
        let l = lease.clone();
        self.inner.runtime.handle.spawn(async move {
            let _ = tx.send(inner.release(&l).await.is_ok());
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false)
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let k = key.clone();
        self.on_runtime(Op::Inspect, Some(key), |inner| async move {
            inner.inspect(&k).await
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        self.on_runtime(Op::List, None, |inner| async move { inner.list().await })
            .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let l = lease.clone();
        self.on_runtime(Op::Renew, Some(&lease.key), |inner| async move {
            inner.renew(&l).await
        })
        .await
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let k = key.clone();
        self.on_runtime(Op::Break, Some(key), |inner| async move {
            inner.break_lease(&k, holder).await
        })
        .await
    }

    async fn resize(&self, key: &Key, limit: u32) -> Result<KeyStatus, Error> {
        let k = key.clone();
        self.on_runtime(Op::Resize, Some(key), |inner| async move {
            inner.resize(&k, limit).await
        })
        .await
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        self.barrier_on_runtime(req).await
    }
}
