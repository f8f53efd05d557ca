//! baton's PostgreSQL store, `postgres://user@host:5432/db[?schema=baton&timeout=10s]`:
//! leases as rows in one schema of a PostgreSQL database, shared by every host that can
//! reach it.
//!
//! Each granted slot is a row with a renewal counter that its holder's renewals raise. The
//! server's clock (a wall clock, which may step) never ends a lease: a waiter takes a slot
//! over only after it has seen the row's counter stand still for the lease's TTL on its own
//! monotonic clock (or its holder's process gone on the waiter's own host), by a
//! compare-and-swap on slot, token and counter. A key may have a lock-delay: a lease lost
//! rather than released holds its slot back for that long. Every grant is
//! one call of a server-side function that locks the key's row, so the limit holds
//! whatever the number of clients. Waiters queue first come, first served by ticket,
//! are woken by `LISTEN`/`NOTIFY`, and leave the queue when their session ends. Fencing
//! tokens come from a per-key sequence in a table. Barriers are two more tables, with dead
//! parties found the same way as dead waiters (see `barrier.rs`). See `README.md` for the schema, the
//! bounds and what the store cannot do (TLS, transaction-mode poolers).

use std::sync::Arc;

use baton_core::{Result, Store, StoreUrl};

mod acquire;
mod admin;
mod barrier;
mod config;
mod core;
mod layout;
mod lease;
mod listen;
mod schema;
mod store;

pub use crate::core::Inner as PostgresBackend;
pub use acquire::TICKET_TTL;
pub use config::{PostgresConfig, DEFAULT_CONNECT_TIMEOUT, DEFAULT_SCHEMA, DEFAULT_TIMEOUT};
pub use layout::{DEFAULT_TTL, MAX_LIMIT};
pub use schema::SCHEMA_VERSION;
pub use store::PostgresStore;

/// Opens the store a `postgres` (or `postgresql`) URL names, wrapped in the error-context
/// layer (`baton_core::kit::context`): every error names its operation, key and store.
/// Connects lazily: a server that is down shows on the first operation as `Unavailable`.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    Ok(baton_core::kit::context::layer(Arc::new(
        PostgresStore::open(url)?,
    )))
}
