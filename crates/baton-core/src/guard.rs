//! Convenience built on [`Store`]: a request builder with Tokio-style names and a guard
//! that releases its lease.

use std::sync::Arc;
use std::time::Duration;

use crate::kit::wait::Notice;
use crate::{AcquireRequest, Error, Holder, Key, Lease, Released, Result, Store, Wait};

/// Convenience methods for any shared store.
pub trait StoreExt {
    /// Starts a request for `key` (a mutex, waiting forever, held by this process, until
    /// changed with the builder's methods).
    fn lock(&self, key: Key) -> LockRequest;
}

impl StoreExt for Arc<dyn Store> {
    fn lock(&self, key: Key) -> LockRequest {
        let holder = Holder::current(std::env::args().collect());
        LockRequest {
            store: Arc::clone(self),
            req: AcquireRequest::new(key, holder),
            notice: None,
        }
    }
}

/// A request being built; finish it with [`LockRequest::acquire`],
/// [`LockRequest::try_acquire`] or [`LockRequest::acquire_timeout`].
///
/// A waiting acquire rides out an outage of the store (a server restart, a leader
/// election): it backs off and asks again within its wait ([`crate::kit::wait`]); see
/// [`LockRequest::on_outage`] to hear about it.
#[must_use = "a LockRequest does nothing until acquired"]
pub struct LockRequest {
    store: Arc<dyn Store>,
    req: AcquireRequest,
    notice: Option<Arc<Notice>>,
}

impl LockRequest {
    /// Makes the key a semaphore of `limit` slots.
    pub fn limit(mut self, limit: u32) -> LockRequest {
        self.req.limit = limit;
        self
    }

    /// Sets the lease's time to live (lease stores).
    pub fn ttl(mut self, ttl: Duration) -> LockRequest {
        self.req.ttl = Some(ttl);
        self
    }

    /// Sets the key's lock-delay when this request creates it (lease stores; see
    /// [`AcquireRequest::lock_delay`]).
    pub fn lock_delay(mut self, delay: Duration) -> LockRequest {
        self.req.lock_delay = Some(delay);
        self
    }

    /// Sets who holds the lease (default: this process, with its argv as the command).
    pub fn holder(mut self, holder: Holder) -> LockRequest {
        self.req.holder = holder;
        self
    }

    /// Calls `f` with the error and the back-off each time a waiting acquire meets an
    /// outage of the store and will ask again.
    pub fn on_outage(
        mut self,
        f: impl Fn(&Error, Duration) + Send + Sync + 'static,
    ) -> LockRequest {
        self.notice = Some(Arc::new(f));
        self
    }

    /// Waits as long as it takes for a slot.
    pub async fn acquire(mut self) -> Result<LeaseGuard> {
        self.req.wait = Wait::Forever;
        self.run().await
    }

    /// Takes a slot only if one is free now; else fails with `Busy`.
    pub async fn try_acquire(mut self) -> Result<LeaseGuard> {
        self.req.wait = Wait::NoWait;
        self.run().await
    }

    /// Waits at most `timeout` for a slot; else fails with `Timeout`.
    pub async fn acquire_timeout(mut self, timeout: Duration) -> Result<LeaseGuard> {
        self.req.wait = Wait::Timeout(timeout);
        self.run().await
    }

    async fn run(self) -> Result<LeaseGuard> {
        let lease =
            crate::kit::wait::acquire(&*self.store, &self.req, self.notice.as_deref()).await?;
        Ok(LeaseGuard {
            store: self.store,
            lease: Some(lease),
        })
    }
}

/// A held lease that is released when the guard goes.
///
/// [`LeaseGuard::release`] is the reliable path: it reports what the store did. `Drop` is
/// a best-effort fallback that calls [`Store::release_now`](crate::Store::release_now).
/// The directory store releases at once; SQLite, PostgreSQL and etcd release on their own
/// runtime and **block the dropping thread** until the store answers (bounded: a few
/// seconds, or the PostgreSQL store's `timeout` plus one second), so do not drop a guard
/// where blocking hurts (inside a tight async loop) — call `release().await` instead.
/// When `release_now` gives up or the store has none, the lease is released by a task
/// spawned on the current Tokio runtime, if there is one, and otherwise only when the
/// process exits or the lease expires.
#[must_use = "the lease is released when the guard is dropped"]
#[derive(Debug)]
pub struct LeaseGuard {
    store: Arc<dyn Store>,
    lease: Option<Lease>,
}

impl LeaseGuard {
    /// The lease this guard holds.
    pub fn lease(&self) -> &Lease {
        // The lease is only taken out by release() and drop(), which consume the guard.
        self.lease.as_ref().expect("lease present until release")
    }

    /// Releases the lease and reports whether it was still held.
    pub async fn release(mut self) -> Result<Released> {
        match self.lease.take() {
            Some(lease) => self.store.release(&lease).await,
            None => Ok(Released::NotHeld),
        }
    }

    /// Takes the lease out of the guard, which then releases nothing when dropped: the
    /// caller releases it (or lets it expire). For a lease known to be lost, whose
    /// release may wait on a store that does not answer and must not block a `Drop`.
    pub fn disarm(mut self) -> Lease {
        self.lease.take().expect("lease present until release")
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if self.store.release_now(&lease) {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let store = Arc::clone(&self.store);
            handle.spawn(async move {
                let _ = store.release(&lease).await;
            });
        }
    }
}
