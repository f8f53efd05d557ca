//! baton's ZooKeeper store, `zk://h1:2181,h2:2181/prefix[?timeout=5s]`: locks and
//! semaphores as ephemeral sequential znodes.
//!
//! Each acquire runs in the store handle's session for the lease's TTL (its timeout; one
//! per handle and TTL, shared by the handle's leases and waiting requests), and creates `q-<guid>-<seq>` (ephemeral, sequential) under the key's node;
//! the first `limit` nodes hold. A waiter watches the `limit` nodes nearest ahead of it
//! (one for a mutex), so a release wakes at most `limit` waiters, in queue order. A holder
//! claims a slot by creating the ephemeral `slot-N`. The token is its queue node's
//! `czxid`. Renewal is a round trip on the lease's session. See `README.md` for the
//! layout, the bounds and what the store cannot do.

mod acquire;
mod admin;
mod barrier;
mod config;
mod core;
mod layout;
mod lease;
mod store;

use std::sync::Arc;

use baton_core::kit::context;
use baton_core::{Result, Store, StoreUrl};

pub use crate::core::Inner as ZkBackend;
pub use config::{ZkConfig, DEFAULT_PREFIX};
pub use store::ZkStore;

/// Opens the store a `zk` URL names (without connecting: the first operation does),
/// behind the error-context layer: every error names its operation, key and store.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    Ok(context::layer(Arc::new(ZkStore::open(url)?)))
}
