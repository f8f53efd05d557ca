//! The Redis store's public type and its [`Backend`]: opening it, its configuration,
//! and each operation delegated to the role files: `acquire.rs` (the grant), `lease.rs`
//! (renew, release), `admin.rs` (status, list, break, resize), `barrier.rs`; `layout.rs`
//! has what the store keeps in Redis and its scripts. [`OnRuntime`] runs them on the
//! store's own runtime.
//!
//! Guarantees: an acquire whose future is dropped is cancelled on the store's runtime; a
//! cancelled or failed acquire withdraws its request by id (its queue entry, and a grant
//! it may have got), and a grant made as its caller went away is released.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use baton_core::kit::backend::{self, Backend, OnRuntime};
use baton_core::kit::runtime::{Call, Cancel, StoreRuntime};
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, Resize, SlotStatus, StoreUrl,
};

use crate::admin::MAX_LIMIT;
use crate::config::RedisConfig;
use crate::core::Inner;

/// What the store adds to a lease's TTL before a dead holder's slot is free: a waiter's
/// next look after the TTL (it wakes for it) and one round trip.
const RECOVERY_EXTRA: Duration = Duration::from_millis(1000);

/// The Redis store. See the crate docs and README for the mechanism and its bounds;
/// [`RedisStore::open`] opens one, and it derefs to [`Inner`] for its configuration.
pub type RedisStore = OnRuntime<Inner>;

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.url)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The store's configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }
}

impl Backend for Inner {
    /// Opens the Redis store the URL names. Does not connect: the first operation does
    /// (and checks the server), so this never blocks.
    fn open(url: &StoreUrl) -> Result<Inner, Error> {
        let config = RedisConfig::from_url(url)?;
        let runtime = StoreRuntime::start("baton-redis", 2).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                "cannot start the Redis client's threads",
            )
            .with_op(Op::Open)
            .with_store(url)
            .with_source(e)
        })?;
        Inner::new(url.clone(), config, runtime).map_err(|e| e.context(Op::Open, None, url))
    }

    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn runtime(&self) -> &StoreRuntime {
        &self.runtime
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::lease_store(
            "within the lease's TTL (30s unless the request sets one) after its holder's last \
             renewal, as a waiter counts it on its own monotonic clock, plus one round trip",
            RECOVERY_EXTRA,
        )
    }

    fn check(&self, req: &AcquireRequest) -> Result<(), Error> {
        if req.limit > MAX_LIMIT {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the limit must be at most {MAX_LIMIT} slots, not {}",
                    req.limit
                ),
            ));
        }
        Ok(())
    }

    async fn acquire(
        self: Arc<Self>,
        req: AcquireRequest,
        mut cancel: Cancel,
    ) -> Result<Lease, Error> {
        let id = format!("{:032x}", HolderId::random().0);
        let call = Call::new(Op::Acquire, Some(&req.key), &self.url);
        backend::or_withdraw(call, self.acquire_inner(&req, &id), &mut cancel, || {
            self.withdraw(&req, &id)
        })
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

    /// Whatever happens (a pass, an error, a cancel), a party that did not pass withdraws
    /// its arrival before the task ends; one whose generation passed meanwhile returns
    /// the pass.
    async fn barrier(
        self: Arc<Self>,
        req: BarrierRequest,
        cancel: Cancel,
    ) -> Result<BarrierPassed, Error> {
        let id = format!("{:032x}", HolderId::random().0);
        let call = Call::new(Op::Barrier, Some(&req.key), &self.url);
        backend::or_leave(&req, call, self.barrier_inner(&req, &id), cancel, || {
            self.barrier_leave(&req, &id)
        })
        .await
    }
}
