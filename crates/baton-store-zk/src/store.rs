//! The ZooKeeper store's public type and its [`Backend`]: opening it, its configuration,
//! and each operation delegated to the role files: `acquire.rs` (the grant), `lease.rs`
//! (renew, release), `admin.rs` (status, list, break, resize), `barrier.rs`; `layout.rs`
//! has what the store keeps in ZooKeeper. [`OnRuntime`] runs them on the store's own
//! runtime.
//!
//! Guarantees: an acquire whose future is dropped is cancelled on the store's runtime; a
//! cancelled or failed acquire deletes its nodes by GUID (and, if it cannot confirm that,
//! goes on deleting them in the background until the server answers or the session ends;
//! a release does the same), and a grant made as its caller went away is released.

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
use crate::config::ZkConfig;
use crate::core::Inner;

/// What the store adds to a lease's TTL (the session timeout) before a dead holder's
/// slot is free: the server's expiry rounds up to its next tick (500 ms on the test
/// server, at most a few seconds on any sane one), then the watch reaches the waiter.
const RECOVERY_EXTRA: Duration = Duration::from_secs(3);

/// The ZooKeeper store. See the crate docs and README for the mechanism and its bounds;
/// [`ZkStore::open`] opens one, and it derefs to [`Inner`] for its configuration.
pub type ZkStore = OnRuntime<Inner>;

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZkStore")
            .field("url", &self.url)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The store's configuration.
    pub fn config(&self) -> &ZkConfig {
        &self.config
    }

    /// How many times a watch event woke a waiting acquire of this handle (for tests and
    /// benchmarks that check a release wakes only the waiters it concerns).
    #[doc(hidden)]
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Backend for Inner {
    /// Opens the ZooKeeper store the URL names. Does not connect: the first operation
    /// does, so this never blocks.
    fn open(url: &StoreUrl) -> Result<Inner, Error> {
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
        Ok(Inner::new(url.clone(), config, runtime))
    }

    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn runtime(&self) -> &StoreRuntime {
        &self.runtime
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
        if req.lock_delay.is_some_and(|d| !d.is_zero()) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the ZooKeeper store has no lock-delay",
            ));
        }
        Ok(())
    }

    async fn acquire(
        self: Arc<Self>,
        req: AcquireRequest,
        mut cancel: Cancel,
    ) -> Result<Lease, Error> {
        let guid = format!("{:032x}", HolderId::random().0);
        let cancelled = || Call::new(Op::Acquire, Some(&req.key), &self.url).cancelled();
        let (client, _ttl) = tokio::select! {
            r = self.acquire_session(&req) => r?,
            _ = &mut cancel => return Err(cancelled()),
        };
        let call = Call::new(Op::Acquire, Some(&req.key), &self.url);
        backend::or_withdraw(
            call,
            self.contend(&client, &req, &guid),
            &mut cancel,
            || async {
                let confirmed = self.withdraw(&client, &req, &guid).await;
                if !confirmed {
                    // The session lives on for the handle's other requests: what is left
                    // of this one goes as soon as the server answers.
                    let kp = crate::layout::key_path(&self.config.root, &req.key);
                    self.delete_later(client.clone(), kp, guid.clone());
                }
                confirmed
            },
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
