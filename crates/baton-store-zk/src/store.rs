//! The ZooKeeper store's public type: opening it, its configuration, and the `Store`
//! trait, each operation run on the store's own runtime and delegated to the role files:
//! `acquire.rs` (the grant), `lease.rs` (renew, release), `admin.rs` (status, list,
//! break, resize); `layout.rs` has what the store keeps in ZooKeeper.
//!
//! Guarantees: an acquire whose future is dropped is cancelled on the store's runtime; a
//! cancelled or failed acquire deletes its nodes by GUID and drops its session (the
//! server deletes what is left of it), and a grant made as its caller went away is
//! released.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use baton_core::kit::runtime::{Call, Cancel, StoreRuntime};
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, SlotStatus, Store, StoreUrl,
};

use crate::admin::MAX_LIMIT;
use crate::config::ZkConfig;
use crate::core::Inner;

/// What the store adds to a lease's TTL (the session timeout) before a dead holder's
/// slot is free: the server's expiry rounds up to its next tick (500 ms on the test
/// server, at most a few seconds on any sane one), then the watch reaches the waiter.
const RECOVERY_EXTRA: Duration = Duration::from_secs(3);

/// The ZooKeeper store. See the crate docs and README for the mechanism and its bounds.
pub struct ZkStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for ZkStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkStore")
            .field("url", &self.inner.url)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl ZkStore {
    /// Opens the ZooKeeper store the URL names. Does not connect: the first operation
    /// does, so this never blocks.
    pub fn open(url: &StoreUrl) -> Result<ZkStore, Error> {
        let config = ZkConfig::from_url(url)?;
        let runtime = StoreRuntime::start("baton-zk", 2).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                "cannot start the ZooKeeper client's threads",
            )
            .with_op(Op::Open)
            .with_store(url)
            .with_source(e)
        })?;
        Ok(ZkStore {
            inner: Arc::new(Inner::new(url.clone(), config, runtime)),
        })
    }

    /// The store's configuration.
    pub fn config(&self) -> &ZkConfig {
        &self.inner.config
    }

    /// How many times a watch event woke a waiting acquire of this handle (for tests and
    /// benchmarks that check a release wakes only the waiters it concerns).
    #[doc(hidden)]
    pub fn wakeups(&self) -> u64 {
        self.inner
            .wakeups
            .load(std::sync::atomic::Ordering::Relaxed)
    }

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
impl Store for ZkStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::lease_store(
            "within the holder's session timeout (the lease's TTL, 30s unless the request \
             sets one, within the server's minSessionTimeout..maxSessionTimeout) after its \
             last contact with the server, plus one server tick and a watch",
            RECOVERY_EXTRA,
        )
        .with_lock_delay(false)
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        req.validate()?;
        if req.limit > MAX_LIMIT {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the limit must be at most {MAX_LIMIT} slots, not {}",
                    req.limit
                ),
            ));
        }
        if req.lock_delay.is_some_and(|d| !d.is_zero()) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the ZooKeeper store has no lock-delay",
            ));
        }
        let guid = format!("{:032x}", HolderId::random().0);
        let (inner, back, req2) = (
            Arc::clone(&self.inner),
            Arc::clone(&self.inner),
            req.clone(),
        );
        let work = |mut cancel: Cancel| async move {
            let cancelled =
                |inner: &Inner| Call::new(Op::Acquire, Some(&req2.key), &inner.url).cancelled();
            let client = tokio::select! {
                r = inner.acquire_session(&req2) => r?,
                _ = &mut cancel => return Err(cancelled(&inner)),
            };
            let result = tokio::select! {
                r = inner.contend(&client, &req2, &guid) => r,
                _ = &mut cancel => Err(cancelled(&inner)),
            };
            match result {
                Ok(l) => Ok(l),
                Err(e) => {
                    let confirmed = inner.withdraw(&client, &req2, &guid).await;
                    // Dropping the session makes the server delete whatever is left.
                    drop(client);
                    if !confirmed && e.kind() == ErrorKind::Unavailable {
                        Err(e.with_grant_unknown())
                    } else {
                        Err(e)
                    }
                }
            }
        };
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
        self.inner
            .runtime
            .block_for(Duration::from_secs(5), release)
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
    /// future dropped), a party that did not pass withdraws its arrival before the task
    /// ends; one whose generation passed meanwhile returns the pass.
    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        baton_core::barrier::validate(req)?;
        let id = format!("{:032x}", HolderId::random().0);
        let (inner, req2) = (Arc::clone(&self.inner), req.clone());
        let work = |cancel: Cancel| async move {
            let result = tokio::select! {
                r = inner.barrier_inner(&req2, &id) => r,
                _ = cancel => Err(Call::new(Op::Barrier, Some(&req2.key), &inner.url).cancelled()),
            };
            match result {
                Ok(p) => Ok(p),
                Err(e) => match inner.barrier_leave(&req2, &id).await {
                    Some(generation) => Ok(BarrierPassed {
                        key: req2.key.clone(),
                        generation,
                        parties: req2.parties,
                    }),
                    None => Err(e),
                },
            }
        };
        let call = Call::new(Op::Barrier, Some(&req.key), &self.inner.url);
        // A pass holds nothing: there is nothing to give back.
        let nothing = |_: BarrierPassed| async {};
        self.inner.runtime.grant(call, work, nothing).await
    }
}
