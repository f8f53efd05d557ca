//! The SQLite store: one row per granted lease, one row per queued waiter, one row per
//! key with its limit and token sequence.
//!
//! This file holds the public type, [`SqliteStore`], and its [`Store`] impl, which runs
//! each operation on a blocking thread and delegates to `Inner`. `Inner`'s `impl`
//! blocks are spread over the files named by role, each of which states what it
//! guarantees:
//! - `core.rs`: connections, retried transactions, the mapping of failures into
//!   [`Error`], and opening;
//! - `layout.rs`: the schema, the rows and the checks on values read;
//! - `queue.rs`: a key's state and a request's place in its queue (expiry, fairness);
//! - `acquire.rs`: the grant and the wait (limit, tokens, lock-delay, no residue);
//! - `lease.rs`: release and renew; `admin.rs`: inspect, list, break and resize;
//! - `barrier.rs`: barriers.
//!
//! Guarantees (of this file):
//! - An acquire whose future is dropped stops waiting, and a lease granted but never
//!   delivered (the future was dropped meanwhile) is released, not left to expire.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, SlotStatus, Store, StoreUrl,
};
use tokio::sync::oneshot;

use crate::config::SqliteConfig;
use crate::core::{Inner, OP_BUSY_BOUND};

/// The TTL of a lease whose request gives none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// The SQLite store. See the crate docs and README for the mechanism and its bounds.
pub struct SqliteStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("url", &self.inner.url)
            .field("path", &self.inner.config.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the SQLite store the URL names: `sqlite:/abs/path.db`.
    ///
    /// Refuses, without writing to it, a file that is not a SQLite database or is another
    /// application's ([`ErrorKind::Corrupt`]), and a file on a network filesystem
    /// ([`ErrorKind::Unavailable`]; see [`crate::NETWORK_FILESYSTEMS`]) unless the URL
    /// says `?unsafe_network_fs=1`. Blocks while it sets the database up; call it from a
    /// blocking context or accept a short block (it retries a busy database for up to 30 s).
    pub fn open(url: &StoreUrl) -> Result<SqliteStore, Error> {
        let config = SqliteConfig::from_url(url)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner::open(url, config)?),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.config.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: Op,
        key: Option<&Key>,
        f: impl FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(r) => r,
            Err(e) => Err(self
                .inner
                .err(
                    ErrorKind::Unavailable,
                    op,
                    key,
                    "the database thread failed",
                )
                .with_source(e)),
        }
    }
}

/// Cancels a waiting acquire when its future is dropped, and releases a lease that was
/// granted but never delivered.
struct CancelGuard {
    cancel: Arc<AtomicBool>,
    rx: Option<oneshot::Receiver<Result<Lease, Error>>>,
    inner: Arc<Inner>,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        self.cancel.store(true, Ordering::Relaxed);
        rx.close();
        if let Ok(Ok(lease)) = rx.try_recv() {
            let inner = Arc::clone(&self.inner);
            std::thread::spawn(move || {
                inner.give_back(&lease);
            });
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::new(
            "within the lease's TTL (30s unless the request sets one) after its holder dies",
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
        let (tx, rx) = oneshot::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut guard = CancelGuard {
            cancel: Arc::clone(&cancel),
            rx: Some(rx),
            inner: Arc::clone(&self.inner),
        };
        let inner = Arc::clone(&self.inner);
        let req2 = req.clone();
        tokio::task::spawn_blocking(move || {
            let result = inner.acquire_blocking(&req2, &cancel);
            if let Err(Ok(lease)) = tx.send(result) {
                // Nobody waits for it any more (the acquire was cancelled): give it back.
                inner.give_back(&lease);
            }
        });
        let stopped = || {
            self.inner.err(
                ErrorKind::Unavailable,
                Op::Acquire,
                Some(&req.key),
                "the database thread stopped",
            )
        };
        let Some(rx) = guard.rx.as_mut() else {
            return Err(stopped());
        };
        let result = rx.await;
        guard.rx = None;
        result.unwrap_or_else(|_| Err(stopped()))
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        let l = lease.clone();
        self.blocking(Op::Release, Some(&lease.key), move |inner| {
            inner.release_blocking(&l, Instant::now().checked_add(OP_BUSY_BOUND))
        })
        .await
    }

    fn release_now(&self, lease: &Lease) -> bool {
        self.inner
            .release_blocking(lease, Instant::now().checked_add(Duration::from_secs(5)))
            .is_ok()
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let k = key.clone();
        self.blocking(Op::Inspect, Some(key), move |inner| {
            inner.inspect_blocking(&k)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        self.blocking(Op::List, None, |inner| inner.list_blocking())
            .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let l = lease.clone();
        self.blocking(Op::Renew, Some(&lease.key), move |inner| {
            inner.renew_blocking(&l)
        })
        .await
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let k = key.clone();
        self.blocking(Op::Break, Some(key), move |inner| {
            inner.break_blocking(&k, holder)
        })
        .await
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        baton_core::barrier::validate(req)
            .map_err(|e| self.inner.ctx(e, Op::Barrier, Some(&req.key)))?;
        // The wait runs on a blocking thread; dropping this future sets `cancel`, and the
        // thread withdraws the arrival before it ends.
        let cancel = Arc::new(AtomicBool::new(false));
        struct SetOnDrop(Arc<AtomicBool>);
        impl Drop for SetOnDrop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _guard = SetOnDrop(Arc::clone(&cancel));
        let req2 = req.clone();
        self.blocking(Op::Barrier, Some(&req.key), move |inner| {
            inner.barrier_blocking(&req2, &cancel)
        })
        .await
    }

    async fn resize(&self, key: &Key, limit: u32) -> Result<KeyStatus, Error> {
        let k = key.clone();
        self.blocking(Op::Resize, Some(key), move |inner| {
            inner.resize_blocking(&k, limit)?;
            inner.inspect_blocking(&k)
        })
        .await
    }
}
