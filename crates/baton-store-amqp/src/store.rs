//! The RabbitMQ store's public type: opening it, its configuration, and the `Store`
//! trait, each operation run on the store's own runtime and delegated to the role files:
//! `acquire.rs` (the grant), `lease.rs` (renew, release), `admin.rs` (status, list);
//! `layout.rs` has what the store keeps in RabbitMQ.
//!
//! Guarantees: an acquire whose future is dropped is cancelled on the store's runtime; a
//! cancelled or failed acquire closes its connection, which returns all it had to the
//! broker, and a grant made as its caller went away is released.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use baton_core::kit::runtime::{Call, Cancel, StoreRuntime};
use baton_core::{
    AcquireRequest, Capabilities, Error, ErrorKind, Key, KeyStatus, Lease, Op, Released, Store,
    StoreUrl,
};

use crate::acquire::Ending;
use crate::config::AmqpConfig;
use crate::core::Inner;
use crate::layout::MAX_LIMIT;

/// What the store adds to a lease's TTL (its connection's heartbeat timeout) before a
/// silently dead holder's slot is free: the broker checks heartbeats in whole periods and
/// may notice a missed one up to another timeout late (measured: see README).
const RECOVERY_EXTRA: Duration = Duration::from_secs(3);

/// The RabbitMQ store. See the crate docs and README for the mechanism and its bounds.
pub struct AmqpStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for AmqpStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpStore")
            .field("url", &self.inner.url)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl AmqpStore {
    /// Opens the RabbitMQ store the URL names. Does not connect: the first operation
    /// does, so this never blocks.
    pub fn open(url: &StoreUrl) -> Result<AmqpStore, Error> {
        let config = AmqpConfig::from_url(url)?;
        let runtime = StoreRuntime::start("baton-amqp", 2).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                "cannot start the RabbitMQ client's threads",
            )
            .with_op(Op::Open)
            .with_store(url)
            .with_source(e)
        })?;
        Ok(AmqpStore {
            inner: Arc::new(Inner::new(url.clone(), config, runtime)),
        })
    }

    /// The store's configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
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
impl Store for AmqpStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::lease_store(
            "at once when the holder's connection closes (its process died); within the \
             heartbeat timeout of its connection (the lease's TTL, 30s unless the request \
             sets one) plus a few seconds when it went silent",
            RECOVERY_EXTRA,
        )
        .with_break(false)
        .with_resize(false)
        .with_lock_delay(false)
        .with_barrier(false)
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
                "the RabbitMQ store has no lock-delay",
            ));
        }
        let (inner, back, req2) = (
            Arc::clone(&self.inner),
            Arc::clone(&self.inner),
            req.clone(),
        );
        let work = |mut cancel: Cancel| async move {
            let cancelled =
                |inner: &Inner| Call::new(Op::Acquire, Some(&req2.key), &inner.url).cancelled();
            let conn = tokio::select! {
                r = inner.lease_connection(&req2) => r?,
                _ = &mut cancel => return Err(cancelled(&inner)),
            };
            let result = tokio::select! {
                r = inner.contend(&conn, &req2) => r,
                _ = &mut cancel => Err(Ending::Withdraw(cancelled(&inner))),
            };
            match result {
                Ok((lease, held)) => {
                    inner.keep(lease.key.as_str(), lease.token.0, held);
                    Ok(lease)
                }
                Err(Ending::Withdraw(e)) => {
                    // Everything the request had lives on its connection: closing it
                    // returns the gate and a slot, and ends its place among the waiters.
                    inner.hang_up(&conn).await;
                    Err(e)
                }
                Err(Ending::HandedOver(e)) => Err(e),
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
}
