//! One [`Store`] for every store that runs its work on a runtime of its own.
//!
//! A networked store implements [`Backend`]: its operations, written as plain async
//! methods of its shared state. [`OnRuntime`] turns that into a [`Store`], once for every
//! such store:
//! - each operation runs on the store's [`StoreRuntime`] (so a caller on any runtime, or
//!   none, is served, and a release that has started is finished);
//! - an acquire or a barrier wait whose caller goes away sees its [`Cancel`] resolve, and
//!   a grant it made that nobody is left to receive is released;
//! - [`Store::release_now`] blocks at most [`Backend::release_bound`].
//!
//! Guarantees are those of [`crate::kit::runtime`]; this file only wires them.

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::kit::runtime::{Call, Cancel, StoreRuntime};
use crate::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, Resize, Result, SlotStatus, Store, StoreUrl,
};

/// What a store that runs on its own runtime implements; [`OnRuntime`] makes it a
/// [`Store`]. Each method runs on [`Backend::runtime`].
pub trait Backend: Send + Sync + Sized + 'static {
    /// Opens the store the URL names (without blocking: connecting is the first
    /// operation's work).
    fn open(url: &StoreUrl) -> Result<Self>;

    /// The store's URL.
    fn url(&self) -> &StoreUrl;

    /// The runtime every operation runs on.
    fn runtime(&self) -> &StoreRuntime;

    /// What the store can do: see [`Store::capabilities`].
    fn capabilities(&self) -> Capabilities;

    /// Checks what only this store limits in a request (after
    /// [`AcquireRequest::validate`]), before any work starts.
    fn check(&self, req: &AcquireRequest) -> Result<()> {
        let _ = req;
        Ok(())
    }

    /// One acquire. It watches `cancel` beside its wait, and on an error or a cancel it
    /// withdraws what it left in the store (marking the error `grant_unknown` when it
    /// cannot confirm that it did).
    fn acquire(
        self: Arc<Self>,
        req: AcquireRequest,
        cancel: Cancel,
    ) -> impl Future<Output = Result<Lease>> + Send;

    /// See [`Store::release`]. (It may spawn tidying on the runtime, hence the `Arc`.)
    fn release(self: &Arc<Self>, lease: &Lease) -> impl Future<Output = Result<Released>> + Send;

    /// How long [`Store::release_now`] may block for a release.
    fn release_bound(&self) -> Duration {
        Duration::from_secs(5)
    }

    /// See [`Store::renew`].
    fn renew(&self, lease: &Lease) -> impl Future<Output = Result<Lease>> + Send;

    /// See [`Store::inspect`].
    fn inspect(&self, key: &Key) -> impl Future<Output = Result<KeyStatus>> + Send;

    /// See [`Store::list`].
    fn list(&self) -> impl Future<Output = Result<Vec<Key>>> + Send;

    /// See [`Store::break_lease`].
    fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> impl Future<Output = Result<Vec<SlotStatus>>> + Send;

    /// See [`Store::resize`].
    fn resize(&self, key: &Key, change: Resize) -> impl Future<Output = Result<KeyStatus>> + Send;

    /// See [`Store::delete`].
    fn delete(&self, key: &Key) -> impl Future<Output = Result<()>> + Send;

    /// One barrier wait (already validated). Whatever ends it (a pass, an error, a
    /// cancel), an arrival that did not pass is withdrawn before it returns.
    fn barrier(
        self: Arc<Self>,
        req: BarrierRequest,
        cancel: Cancel,
    ) -> impl Future<Output = Result<BarrierPassed>> + Send;
}

/// The end of a [`Backend::acquire`] that withdraws what it leaves: `work` races `cancel`;
/// when it fails or is cancelled, `withdraw` removes the request from the store and says
/// whether it could confirm that. A request that failed `Unavailable` and whose withdrawal
/// could not be confirmed may have been granted: its error says so (`grant_unknown`).
pub async fn or_withdraw<T, W, WFut>(
    call: Call<'_>,
    work: impl Future<Output = Result<T>>,
    cancel: &mut Cancel,
    withdraw: W,
) -> Result<T>
where
    W: FnOnce() -> WFut,
    WFut: Future<Output = bool>,
{
    let result = tokio::select! {
        r = work => r,
        _ = cancel => Err(call.cancelled()),
    };
    match result {
        Ok(v) => Ok(v),
        Err(e) => {
            let confirmed = withdraw().await;
            if !confirmed && e.kind() == ErrorKind::Unavailable {
                Err(e.with_grant_unknown())
            } else {
                Err(e)
            }
        }
    }
}

/// The end of a [`Backend::barrier`] whose arrival stays until it leaves: `work` races
/// `cancel`; whatever ends it without a pass, `leave` withdraws the arrival and answers
/// the generation that passed meanwhile, if one did (then the wait passed after all).
pub async fn or_leave<L, LFut>(
    req: &BarrierRequest,
    call: Call<'_>,
    work: impl Future<Output = Result<BarrierPassed>>,
    cancel: Cancel,
    leave: L,
) -> Result<BarrierPassed>
where
    L: FnOnce() -> LFut,
    LFut: Future<Output = Option<u64>>,
{
    let result = tokio::select! {
        r = work => r,
        _ = cancel => Err(call.cancelled()),
    };
    match result {
        Ok(p) => Ok(p),
        Err(e) => match leave().await {
            Some(generation) => Ok(BarrierPassed {
                key: req.key.clone(),
                generation,
                parties: req.parties,
            }),
            None => Err(e),
        },
    }
}

/// A [`Backend`] as a [`Store`]: see the module docs. It derefs to the backend, for the
/// store's own accessors (its configuration, counters for tests).
pub struct OnRuntime<B: Backend> {
    backend: Arc<B>,
}

impl<B: Backend> OnRuntime<B> {
    /// Opens the backend the URL names: [`Backend::open`].
    pub fn open(url: &StoreUrl) -> Result<OnRuntime<B>> {
        Ok(OnRuntime {
            backend: Arc::new(B::open(url)?),
        })
    }

    /// Runs `work` on the store's runtime and waits for it from any runtime.
    async fn run<T, F, Fut>(&self, op: Op, key: Option<&Key>, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<B>) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let b = &self.backend;
        let fut = work(Arc::clone(b));
        b.runtime().run(Call::new(op, key, b.url()), fut).await
    }
}

impl<B: Backend> Deref for OnRuntime<B> {
    type Target = B;

    fn deref(&self) -> &B {
        &self.backend
    }
}

impl<B: Backend + fmt::Debug> fmt::Debug for OnRuntime<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.backend.fmt(f)
    }
}

#[async_trait]
impl<B: Backend + fmt::Debug> Store for OnRuntime<B> {
    fn url(&self) -> &StoreUrl {
        self.backend.url()
    }

    fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease> {
        req.validate()?;
        self.backend.check(req)?;
        let (b, back, req2) = (
            Arc::clone(&self.backend),
            Arc::clone(&self.backend),
            req.clone(),
        );
        // A grant made as its caller went away is released.
        let give_back = |lease: Lease| async move {
            let _ = back.release(&lease).await;
        };
        let call = Call::new(Op::Acquire, Some(&req.key), self.backend.url());
        self.backend
            .runtime()
            .grant(call, |cancel| b.acquire(req2, cancel), give_back)
            .await
    }

    async fn release(&self, lease: &Lease) -> Result<Released> {
        let l = lease.clone();
        self.run(Op::Release, Some(&lease.key), |b| async move {
            b.release(&l).await
        })
        .await
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let (b, l) = (Arc::clone(&self.backend), lease.clone());
        let release = async move { b.release(&l).await.is_ok() };
        self.backend
            .runtime()
            .block_for(self.backend.release_bound(), release)
            .unwrap_or(false)
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus> {
        let k = key.clone();
        self.run(
            Op::Inspect,
            Some(key),
            |b| async move { b.inspect(&k).await },
        )
        .await
    }

    async fn list(&self) -> Result<Vec<Key>> {
        self.run(Op::List, None, |b| async move { b.list().await })
            .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease> {
        let l = lease.clone();
        self.run(
            Op::Renew,
            Some(&lease.key),
            |b| async move { b.renew(&l).await },
        )
        .await
    }

    async fn break_lease(&self, key: &Key, holder: Option<HolderId>) -> Result<Vec<SlotStatus>> {
        let k = key.clone();
        self.run(Op::Break, Some(key), |b| async move {
            b.break_lease(&k, holder).await
        })
        .await
    }

    async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus> {
        let k = key.clone();
        self.run(Op::Resize, Some(key), |b| async move {
            b.resize(&k, change).await
        })
        .await
    }

    async fn delete(&self, key: &Key) -> Result<()> {
        let k = key.clone();
        self.run(Op::Delete, Some(key), |b| async move { b.delete(&k).await })
            .await
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed> {
        crate::barrier::validate(req)?;
        let (b, req2) = (Arc::clone(&self.backend), req.clone());
        let call = Call::new(Op::Barrier, Some(&req.key), self.backend.url());
        // A pass holds nothing: there is nothing to give back.
        let nothing = |_: BarrierPassed| async {};
        self.backend
            .runtime()
            .grant(call, |cancel| b.barrier(req2, cancel), nothing)
            .await
    }
}
