//! Write-ahead lease ends: the store as a holder's keeper sees it.
//!
//! A holder counts as holding until its keeper's deadline, and the keeper moves that
//! deadline on each renewal it sees succeed. If the history learned of a new deadline only
//! after the keeper did (as `held` lines do, written by a task that watches the keeper),
//! a holder paused or cut off between the two would show an interval that ends too early,
//! and a re-grant between the recorded and the real deadline — the very loss-before-re-grant
//! violation the checkers look for — would pass. [`RecordingStore`] closes that gap: it
//! records every renewal (`renewed`, with the time it was called) *before* its answer
//! reaches the keeper. A successful renewal the history does not show never reaches the
//! keeper either: when the line cannot be written the keeper gets an error instead (and
//! keeps its old deadline), and [`RecordingStore::failure`] says why, so the worker can
//! stop with it.
//!
//! The keeper's deadline after a renewal is its send time plus
//! [`KeeperConfig::validity`](baton_core::KeeperConfig::validity); the recorded call time
//! is no earlier than that send time, so `t_sent_ns + validity` bounds the deadline from
//! above ([`crate::intervals`] ends leases there). The stress workers and the conformance
//! suite's workers both keep their leases through it.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Released, Resize, SlotStatus, Store, StoreUrl,
};

use crate::clock::monotonic_ns;
use crate::history::{Event, Recorder};

/// `inner`, recording each renewal to a history before the keeper sees its answer (see the
/// module docs). Every other operation passes straight through.
#[derive(Debug)]
pub struct RecordingStore {
    inner: Arc<dyn Store>,
    rec: Recorder,
    failure: Mutex<Option<String>>,
}

impl RecordingStore {
    /// `inner`, recording its renewals to the history at `history`.
    pub fn new(inner: Arc<dyn Store>, history: &Path) -> Result<RecordingStore, String> {
        Ok(RecordingStore {
            inner,
            rec: Recorder::open(history)
                .map_err(|e| format!("cannot open the history {}: {e}", history.display()))?,
            failure: Mutex::new(None),
        })
    }

    /// Why a renewal could not be recorded, if one could not (the first such failure).
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

#[async_trait]
impl Store for RecordingStore {
    fn url(&self) -> &StoreUrl {
        self.inner.url()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn acquire(&self, req: &AcquireRequest) -> baton_core::Result<Lease> {
        self.inner.acquire(req).await
    }

    async fn release(&self, lease: &Lease) -> baton_core::Result<Released> {
        self.inner.release(lease).await
    }

    fn release_now(&self, lease: &Lease) -> bool {
        self.inner.release_now(lease)
    }

    async fn inspect(&self, key: &Key) -> baton_core::Result<KeyStatus> {
        self.inner.inspect(key).await
    }

    async fn list(&self) -> baton_core::Result<Vec<Key>> {
        self.inner.list().await
    }

    async fn renew(&self, lease: &Lease) -> baton_core::Result<Lease> {
        let t_sent_ns = monotonic_ns();
        let result = self.inner.renew(lease).await;
        let event = Event::Renewed {
            pid: std::process::id(),
            t_ns: monotonic_ns(),
            t_sent_ns,
            key: lease.key.clone(),
            token: lease.token,
            ok: result.is_ok(),
            kind: result.as_ref().err().map(|e| e.kind().as_str().into()),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
        };
        // A renewal the history does not show must not count: the checkers bound the
        // keeper's deadline by the renewals they see.
        if let Err(e) = self.rec.record(&event) {
            let why = format!("cannot record a renewal to the history: {e}");
            self.failure
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get_or_insert(why);
            return Err(Error::new(
                ErrorKind::Unavailable,
                "cannot record a renewal to the history",
            )
            .with_source(e));
        }
        result
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> baton_core::Result<Vec<SlotStatus>> {
        self.inner.break_lease(key, holder).await
    }

    async fn resize(&self, key: &Key, change: Resize) -> baton_core::Result<KeyStatus> {
        self.inner.resize(key, change).await
    }

    async fn delete(&self, key: &Key) -> baton_core::Result<()> {
        self.inner.delete(key).await
    }

    async fn barrier(&self, req: &BarrierRequest) -> baton_core::Result<BarrierPassed> {
        self.inner.barrier(req).await
    }
}
