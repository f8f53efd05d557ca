//! baton's Redis store, `redis://[user:pass@]host:6379/0`: locks and semaphores as a few
//! Redis keys per lock, each operation one Lua script.
//!
//! Holders sit in a sorted set scored by their renewal counters; a waiter takes a lease
//! over only after it has seen the counter stand still for the TTL on its own monotonic
//! clock, by compare-and-swap on the counter in the script, because Redis's clocks
//! (`TIME`, key expiry) are wall clocks. Tokens come from `INCR` (durable with
//! `appendfsync always`, which the store checks). Waiters queue in arrival order and each
//! sleeps in `BLPOP` on a list of its own; a release pushes to exactly one. See
//! Barriers: an arrival per waiting party, the completing arrival passes the generation and
//! pushes to every other party's list. See `README.md` for the layout, the bounds and what the store cannot do.

mod acquire;
mod admin;
mod barrier;
mod config;
mod core;
mod direct;
mod layout;
mod lease;
mod store;

use std::sync::Arc;

use baton_core::kit::context;
use baton_core::{Result, Store, StoreUrl};

pub use crate::core::Inner as RedisBackend;
pub use baton_core::kit::time::DEFAULT_TTL;
pub use config::{Durability, RedisConfig, DEFAULT_PREFIX};
pub use store::RedisStore;

/// Opens the store a `redis` URL names (without connecting: the first operation does),
/// behind the error-context layer: every error names its operation, key and store.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    Ok(context::layer(Arc::new(RedisStore::open(url)?)))
}
