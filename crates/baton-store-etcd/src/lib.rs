//! baton's etcd store, `etcd://h1:2379,h2:2379[/prefix]`: locks and semaphores as keys
//! under a prefix, each request with its own etcd lease.
//!
//! A request writes a waiter key attached to a fresh etcd lease; waiters are served in
//! the order of their keys' create revisions, each watching only the keys that can wake
//! it (the etcd `concurrency` recipe, extended to semaphores). A grant creates a slot key
//! in a transaction that also proves the waiter's lease is alive; the slot key's create
//! revision is the fencing token. A dead holder's keys vanish when etcd expires its lease.
//! Barriers: an arrival key per waiting party on its own etcd lease, and a generation key
//! that the completing arrival advances in the same guarded transaction.
//! See `README.md` for the layout, the bounds and what the store cannot do.

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

pub use crate::core::Inner as EtcdBackend;
pub use baton_core::kit::time::{ARRIVAL_TTL, DEFAULT_TTL};
pub use config::{EtcdConfig, DEFAULT_PREFIX};
pub use store::EtcdStore;

/// Opens the store a `etcd` URL names (without connecting: the first operation does),
/// behind the error-context layer: every error names its operation, key and store.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    Ok(context::layer(Arc::new(EtcdStore::open(url)?)))
}
