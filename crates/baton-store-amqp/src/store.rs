//! The RabbitMQ store's public type and its [`Backend`]: opening it, its configuration,
//! and each operation delegated to the role files: `acquire.rs` (the grant), `lease.rs`
//! (renew, release), `admin.rs` (status, list, resize), `delete.rs`; `layout.rs` has what the store keeps in
//! RabbitMQ. [`OnRuntime`] runs them on the store's own runtime.
//!
//! Guarantees: an acquire whose future is dropped is cancelled on the store's runtime; a
//! cancelled or failed acquire closes its connection, which returns all it had to the
//! broker (unless the connection was left holding back a lost lease's slot, which it
//! does for the lost lease's TTL and then closes), and a grant made as its caller went
//! away is released.
//!
//! Break and barriers answer `Unsupported` (README: why).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use baton_core::kit::backend::{Backend, OnRuntime};
use baton_core::kit::runtime::{Call, Cancel, StoreRuntime};
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, Resize, SlotStatus, StoreUrl,
};

use crate::acquire::Ending;
use crate::config::AmqpConfig;
use crate::core::Inner;
use crate::layout::MAX_LIMIT;

/// What the store adds to a lease's TTL before a dead holder's slot is free: a killed
/// holder's slot comes back at once and is then held back for the lost lease's TTL; a
/// silent holder's connection is closed by the broker after it missed heartbeats for
/// about 2.5 heartbeat timeouts (half the TTL, at least 1s: measured, README), and its
/// slot is then held back for the TTL too.
const RECOVERY_EXTRA: Duration = Duration::from_secs(3);

/// The RabbitMQ store. See the crate docs and README for the mechanism and its bounds;
/// [`AmqpStore::open`] opens one, and it derefs to [`Inner`] for its configuration.
pub type AmqpStore = OnRuntime<Inner>;

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpStore")
            .field("url", &self.url)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The store's configuration.
    pub fn config(&self) -> &AmqpConfig {
        &self.config
    }
}

fn unsupported(what: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("the RabbitMQ store has no {what}: {why}"),
    )
}

impl Backend for Inner {
    /// Opens the RabbitMQ store the URL names. Does not connect: the first operation
    /// does, so this never blocks.
    fn open(url: &StoreUrl) -> Result<Inner, Error> {
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
            "the lease's TTL (30s unless the request sets one) after the broker saw its \
             holder's connection end: at once when the holder's process died, after about \
             2.5 heartbeat timeouts (half the TTL, at least 1s) when it went silent",
            RECOVERY_EXTRA,
        )
        .with_break(false)
        .with_resize(true)
        .with_lock_delay(false)
        .with_barrier(false)
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
            return Err(unsupported(
                "lock-delay",
                "a lost lease's slot is always held back for its TTL",
            ));
        }
        Ok(())
    }

    async fn acquire(
        self: Arc<Self>,
        req: AcquireRequest,
        mut cancel: Cancel,
    ) -> Result<Lease, Error> {
        let cancelled = || Call::new(Op::Acquire, Some(&req.key), &self.url).cancelled();
        let busy = tokio::select! {
            r = self.busy_at_once(&req) => r?,
            _ = &mut cancel => return Err(cancelled()),
        };
        if let Some(e) = busy {
            return Err(e);
        }
        let conn = tokio::select! {
            r = self.lease_connection(&req) => r?,
            _ = &mut cancel => return Err(cancelled()),
        };
        let result = tokio::select! {
            r = self.contend(&conn, &req) => r,
            _ = &mut cancel => Err(Ending::Withdraw(cancelled())),
        };
        match result {
            Ok((lease, held)) => {
                self.keep(lease.key.as_str(), lease.token.0, held);
                Ok(lease)
            }
            Err(Ending::Withdraw(e)) => {
                // Everything the request had lives on its connection: closing it
                // returns the gate and a slot, and ends its place among the waiters.
                self.hang_up(&conn).await;
                Err(e)
            }
            Err(Ending::HandedOver(e)) => Err(e),
        }
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
        _key: &Key,
        _holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        Err(unsupported(
            "break",
            "a held slot is an unacknowledged delivery on its holder's connection, which \
             AMQP gives no other client a way to end (rabbitmqctl close_connection does)",
        ))
    }

    async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus, Error> {
        Inner::resize(self, key, change).await
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        Inner::delete(self, key).await
    }

    async fn barrier(
        self: Arc<Self>,
        _req: BarrierRequest,
        _cancel: Cancel,
    ) -> Result<BarrierPassed, Error> {
        Err(unsupported("barriers", "not built"))
    }
}
