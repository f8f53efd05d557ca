//! baton's RabbitMQ store, `amqp://user:pass@host:5672/vhost`: locks and semaphores as
//! a few queues per key on one broker.
//!
//! Per key, a quorum queue with single-active-consumer holds one "gate" message: waiters
//! consume it, and the broker makes them active one at a time in the order they came. The
//! waiter holding the gate takes a slot message from the key's slots queue (`limit`
//! messages, prefetch 1, never acknowledged while held) and hands the gate on by closing
//! its channel. A held slot is an unacknowledged delivery on the holder's own connection,
//! whose heartbeat timeout is half the lease's TTL: the slot returns when that connection
//! closes (at once when the holder's process died, after missed heartbeats when it went
//! silent), and a slot returned without a release is held back for the lease's TTL, so
//! the old holder has declared its loss (and `baton run` stopped its command) first. The fencing
//! token is the gate message's `base` + its `x-delivery-count` + 1: every hand-over adds
//! one, and a quorum queue keeps it across broker restarts. A delete (holding the gate
//! and the key's creation lock) leaves the key's last token in a durable floor queue, and
//! the key's next creation starts its gate's `base` there. A resize rewrites the key's
//! limit in its meta message under the creation lock, and the gate holder reads it at
//! every slot delivery, so a raise reaches a waiter already at the head of the line and
//! a lowered limit evicts nobody. See `README.md` for the
//! layout, the bounds, what was verified on the broker and what the store cannot do.

mod acquire;
mod admin;
mod config;
mod core;
mod delete;
mod layout;
mod lease;
mod store;

use std::sync::Arc;

use baton_core::kit::context;
use baton_core::{Result, Store, StoreUrl};

pub use crate::core::Inner as AmqpBackend;
pub use config::{AmqpConfig, DEFAULT_PREFIX};
pub use store::AmqpStore;

/// Opens the store an `amqp` URL names (without connecting: the first operation does),
/// behind the error-context layer: every error names its operation, key and store.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    Ok(context::layer(Arc::new(AmqpStore::open(url)?)))
}
