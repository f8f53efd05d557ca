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
use baton_core::kit::runtime::{Call, Cancel, StoreRuntime};
use baton_core::kit::time::DEFAULT_TTL;
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, SlotStatus, Store, StoreUrl,
};
use tokio::sync::OnceCell;

use crate::config::EtcdConfig;
use crate::core::{random_lease_id, Inner};

/// What etcd adds to a lease's TTL before a dead holder's slot is free: the TTL rounded up
/// to whole seconds (up to 1 s; a TTL below etcd's minimum, 2 s with default settings, is
/// raised to it), and etcd's expiry check every 500 ms.
const RECOVERY_EXTRA: Duration = Duration::from_millis(2500);

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
        let runtime = StoreRuntime::start("baton-etcd", 2).map_err(|e| {
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
        self.inner
            .runtime
            .run(Call::new(op, key, &self.inner.url), fut)
            .await
    }
}

#[async_trait]
impl Store for EtcdStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::lease_store(
            "within the lease's TTL (30s unless the request sets one; etcd counts whole \
             seconds, 2s at least) after its holder dies, plus etcd's expiry check",
            RECOVERY_EXTRA,
        )
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        req.validate()?;
        let pooled = self.inner.take_pooled(req.ttl.unwrap_or(DEFAULT_TTL));
        let id = pooled.unwrap_or_else(random_lease_id);
        let (inner, back, req2) = (
            Arc::clone(&self.inner),
            Arc::clone(&self.inner),
            req.clone(),
        );
        let work = |cancel: Cancel| async move {
            let result = tokio::select! {
                r = inner.acquire_inner(&req2, id, pooled.is_some()) => r,
                _ = cancel => Err(Call::new(Op::Acquire, Some(&req2.key), &inner.url).cancelled()),
            };
            // A failed or cancelled request revokes its lease (which deletes its waiter key).
            // A request that reached no member may still be delivered later; if the clean-up
            // could not confirm either, a grant may exist (it expires with its lease).
            match result {
                Err(e) if !inner.revoke_quiet(id).await && e.kind() == ErrorKind::Unavailable => {
                    Err(e.with_grant_unknown())
                }
                r => r,
            }
        };
        // A grant made as its caller went away is released.
        let give_back = |lease: Lease| async move {
            let _ = back.release(&lease).await;
        };
        let call = Call::new(Op::Acquire, Some(&req.key), &self.inner.url);
        self.inner.runtime.grant(call, work, give_back).await
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        let l = lease.clone();
        self.on_runtime(Op::Release, Some(&lease.key), |inner| async move {
            inner.release(&l).await
        })
        .await
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let inner = Arc::clone(&self.inner);
        let l = lease.clone();
        let release = async move { inner.release(&l).await.is_ok() };
        let bound = Duration::from_secs(5);
        self.inner
            .runtime
            .block_for(bound, release)
            .unwrap_or(false)
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

    /// A barrier wait on the store's runtime. Whatever happens (a pass, an error, this
    /// future dropped), the arrival's etcd lease is revoked before the task ends, so no
    /// arrival outlives the call.
    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        baton_core::barrier::validate(req)?;
        let id = random_lease_id();
        let (inner, req2) = (Arc::clone(&self.inner), req.clone());
        let work = |cancel: Cancel| async move {
            let result = tokio::select! {
                r = inner.barrier_inner(&req2, id) => r,
                _ = cancel => Err(Call::new(Op::Barrier, Some(&req2.key), &inner.url).cancelled()),
            };
            // Leaving (after a pass) or withdrawing (the generation key is unchanged, or the
            // wait was cancelled): the arrival goes with its lease.
            inner.revoke_quiet(id).await;
            result
        };
        let call = Call::new(Op::Barrier, Some(&req.key), &self.inner.url);
        // A pass holds nothing: there is nothing to give back.
        let nothing = |_: BarrierPassed| async {};
        self.inner.runtime.grant(call, work, nothing).await
    }
}
