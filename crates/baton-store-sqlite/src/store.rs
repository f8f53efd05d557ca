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
//!   delivered (the future was dropped meanwhile) is released, not left to expire
//!   (`baton_core::kit::runtime::blocking_grant`).

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use baton_core::kit::runtime::{self, Call};
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, HolderId, Key, KeyStatus,
    Lease, Op, Released, Resize, SlotStatus, Store, StoreUrl,
};

use crate::config::SqliteConfig;
use crate::core::{Inner, OP_BUSY_BOUND};

/// How long after a lease's TTL runs out its first waiter takes the slot: the waiter
/// looks again 1 ms after the expiry it read, plus scheduling.
const RECOVERY_EXTRA: Duration = Duration::from_millis(2);

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
    /// application's ([`ErrorKind::Corrupt`](baton_core::ErrorKind::Corrupt)), and a file
    /// on a network filesystem ([`ErrorKind::Unavailable`](baton_core::ErrorKind::Unavailable);
    /// see [`crate::NETWORK_FILESYSTEMS`]) unless the URL says `?unsafe_network_fs=1`. Blocks
    /// while it sets the database up; call it from a blocking context or accept a short
    /// block (it retries a busy database for up to 30 s).
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

    /// Runs `f` on a blocking thread ([`runtime::blocking`]).
    async fn blocking<T: Send + 'static>(
        &self,
        op: Op,
        key: Option<&Key>,
        f: impl FnOnce(&Inner) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = Arc::clone(&self.inner);
        runtime::blocking(Call::new(op, key, &self.inner.url), move || f(&inner)).await
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::lease_store(
            "within the lease's TTL (30s unless the request sets one) after its holder dies",
            RECOVERY_EXTRA,
        )
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        req.validate()
            .map_err(|e| self.inner.ctx(e, Op::Acquire, Some(&req.key)))?;
        // The wait runs on a blocking thread that sees `cancel` set when this future is
        // dropped; a lease granted meanwhile is released, not left to expire.
        let (inner, giver) = (Arc::clone(&self.inner), Arc::clone(&self.inner));
        let req2 = req.clone();
        runtime::blocking_grant(
            Call::new(Op::Acquire, Some(&req.key), &self.inner.url),
            move |cancel| inner.acquire_blocking(&req2, cancel),
            move |lease: Lease| giver.give_back(&lease),
        )
        .await
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
        // Dropping this future sets `cancel`; the thread withdraws the arrival before it
        // ends. A pass nobody receives has nothing to give back.
        let inner = Arc::clone(&self.inner);
        let req2 = req.clone();
        runtime::blocking_grant(
            Call::new(Op::Barrier, Some(&req.key), &self.inner.url),
            move |cancel| inner.barrier_blocking(&req2, cancel),
            |_: BarrierPassed| {},
        )
        .await
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        let k = key.clone();
        self.blocking(Op::Delete, Some(key), move |inner| {
            inner.delete_blocking(&k)
        })
        .await
    }

    async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus, Error> {
        let k = key.clone();
        self.blocking(Op::Resize, Some(key), move |inner| {
            inner.resize_blocking(&k, change)?;
            inner.inspect_blocking(&k)
        })
        .await
    }
}
