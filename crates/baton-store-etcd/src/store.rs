//! The etcd store's public type and its [`Backend`]: opening it, its configuration, and
//! each operation delegated to the role files: `acquire.rs` (the grant), `lease.rs`
//! (renew, release), `admin.rs` (status, list, break, resize) and `barrier.rs`;
//! `layout.rs` has what the store keeps in etcd. [`OnRuntime`] runs them on the store's
//! own runtime (`core.rs` has the connection).
//!
//! Guarantees: an acquire or barrier wait whose future is dropped is cancelled on the
//! store's runtime. A cancelled or failed acquire revokes its etcd lease (which deletes
//! its waiter key), and a grant made as its caller went away is released; a barrier wait
//! revokes its arrival's lease whatever happens, before the task ends.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::kit::backend::{self, Backend, OnRuntime};
use baton_core::kit::runtime::{Call, Cancel, StoreRuntime};
use baton_core::kit::time::DEFAULT_TTL;
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, Resize, SlotStatus, StoreUrl,
};
use tokio::sync::OnceCell;

use crate::config::EtcdConfig;
use crate::core::{random_lease_id, Inner};

/// What etcd adds to a lease's TTL before a dead holder's slot is free: the TTL rounded up
/// to whole seconds (up to 1 s; a TTL below etcd's minimum, 2 s with default settings, is
/// raised to it), and etcd's expiry check every 500 ms.
const RECOVERY_EXTRA: Duration = Duration::from_millis(2500);

/// The etcd store. See the crate docs and README for the mechanism and its bounds;
/// [`EtcdStore::open`] opens one, and it derefs to [`Inner`] for its configuration.
pub type EtcdStore = OnRuntime<Inner>;

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("url", &self.url)
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The store's configuration (endpoints, prefix, timeouts).
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// How many times a watch event woke a waiting acquire of this handle (for tests that
    /// check a release wakes only the waiters it concerns).
    #[doc(hidden)]
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }
}

impl Backend for Inner {
    /// Opens the etcd store the URL names. Does not connect: the first operation does,
    /// so this never blocks; an unreachable cluster shows as `Unavailable` then.
    fn open(url: &StoreUrl) -> Result<Inner, Error> {
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
        Ok(Inner {
            url: url.clone(),
            config,
            runtime,
            clients,
            current: AtomicUsize::new(0),
            granted: Mutex::new(HashMap::new()),
            pool: Mutex::new(Vec::new()),
            wakeups: AtomicU64::new(0),
        })
    }

    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn runtime(&self) -> &StoreRuntime {
        &self.runtime
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::lease_store(
            "within the lease's TTL (30s unless the request sets one; etcd counts whole \
             seconds, 2s at least) after its holder dies, plus etcd's expiry check",
            RECOVERY_EXTRA,
        )
    }

    async fn acquire(
        self: Arc<Self>,
        req: AcquireRequest,
        mut cancel: Cancel,
    ) -> Result<Lease, Error> {
        let pooled = self.take_pooled(req.ttl.unwrap_or(DEFAULT_TTL));
        let id = pooled.unwrap_or_else(random_lease_id);
        // A failed or cancelled request revokes its lease (which deletes its waiter key).
        // A request that reached no member may still be delivered later; if the clean-up
        // could not confirm either, a grant may exist (it expires with its lease).
        let call = Call::new(Op::Acquire, Some(&req.key), &self.url);
        backend::or_withdraw(
            call,
            self.acquire_inner(&req, id, pooled.is_some()),
            &mut cancel,
            || self.revoke_quiet(id),
        )
        .await
    }

    async fn release(self: &Arc<Self>, lease: &Lease) -> Result<Released, Error> {
        Inner::release(self, lease).await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        Inner::renew(self, lease).await
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        Inner::inspect(self, key).await
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        Inner::list(self).await
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        Inner::break_lease(self, key, holder).await
    }

    async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus, Error> {
        Inner::resize(self, key, change).await
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        Inner::delete(self, key).await
    }

    /// Whatever happens (a pass, an error, a cancel), the arrival's etcd lease is revoked
    /// before the task ends, so no arrival outlives the call.
    async fn barrier(
        self: Arc<Self>,
        req: BarrierRequest,
        cancel: Cancel,
    ) -> Result<BarrierPassed, Error> {
        let id = random_lease_id();
        let result = tokio::select! {
            r = self.barrier_inner(&req, id) => r,
            _ = cancel => Err(Call::new(Op::Barrier, Some(&req.key), &self.url).cancelled()),
        };
        // Leaving (after a pass) or withdrawing (the generation key is unchanged, or the
        // wait was cancelled): the arrival goes with its lease.
        self.revoke_quiet(id).await;
        result
    }
}
