//! The error-context layer: every error a store returns names its operation, key and
//! store, filled in here once instead of at each of a store's call sites.
//!
//! Guarantees: [`layer`] wraps a store so that every error from every operation carries
//! the operation, the key (when the operation has one) and the store's redacted URL. What
//! the store already set is kept (an error of `release` raised while acquiring still says
//! `acquire`). Nothing else changes: the same calls reach the store, in the same order.
//! A store crate's `open` (SQLite's `open_store`: its `open` returns the concrete type)
//! returns its store through this layer, so the store's own code
//! may return bare errors (`Error::new(kind, message)`).

use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, HolderId, Key, KeyStatus, Lease,
    Op, Released, Resize, Result, SlotStatus, Store, StoreUrl,
};

/// A store whose errors all carry their context; see the module docs.
#[derive(Debug)]
pub struct Contextual {
    inner: Arc<dyn Store>,
}

/// Wraps `store` in the error-context layer .
pub fn layer(store: Arc<dyn Store>) -> Arc<dyn Store> {
    Arc::new(Contextual { inner: store })
}

impl Contextual {
    fn ctx<T>(&self, r: Result<T>, op: Op, key: Option<&Key>) -> Result<T> {
        r.map_err(|e| e.context(op, key, self.inner.url()))
    }
}

#[async_trait]
impl Store for Contextual {
    fn url(&self) -> &StoreUrl {
        self.inner.url()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease> {
        let r = self.inner.acquire(req).await;
        self.ctx(r, Op::Acquire, Some(&req.key))
    }

    async fn release(&self, lease: &Lease) -> Result<Released> {
        let r = self.inner.release(lease).await;
        self.ctx(r, Op::Release, Some(&lease.key))
    }

    fn release_now(&self, lease: &Lease) -> bool {
        self.inner.release_now(lease)
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus> {
        let r = self.inner.inspect(key).await;
        self.ctx(r, Op::Inspect, Some(key))
    }

    async fn list(&self) -> Result<Vec<Key>> {
        let r = self.inner.list().await;
        self.ctx(r, Op::List, None)
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease> {
        let r = self.inner.renew(lease).await;
        self.ctx(r, Op::Renew, Some(&lease.key))
    }

    async fn break_lease(&self, key: &Key, holder: Option<HolderId>) -> Result<Vec<SlotStatus>> {
        let r = self.inner.break_lease(key, holder).await;
        self.ctx(r, Op::Break, Some(key))
    }

    async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus> {
        let r = self.inner.resize(key, change).await;
        self.ctx(r, Op::Resize, Some(key))
    }

    async fn delete(&self, key: &Key) -> Result<()> {
        let r = self.inner.delete(key).await;
        self.ctx(r, Op::Delete, Some(key))
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed> {
        let r = self.inner.barrier(req).await;
        self.ctx(r, Op::Barrier, Some(&req.key))
    }
}
