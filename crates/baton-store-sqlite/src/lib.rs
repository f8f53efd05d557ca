//! baton's SQLite store, `sqlite:/abs/path/to/file.db`: leases as rows in one SQLite file
//! shared by the processes of one host.
//!
//! Each granted slot is a row with a TTL on the host's boot-time clock; a holder renews
//! it, and a dead holder's slot comes back when the TTL runs out. Every grant is one
//! `BEGIN IMMEDIATE` transaction in WAL mode, so there is one writer at a time and the
//! limit holds; a busy database is retried with jittered backoff and never reaches the
//! caller as "database is locked". Waiters queue first come, first served by ticket.
//! Fencing tokens come from a per-key sequence in the file. See `README.md` for the
//! schema, the bounds and what the store cannot do.

mod acquire;
mod admin;
mod barrier;
mod config;
mod core;
mod layout;
mod lease;
mod queue;
mod store;
mod sys;

use std::sync::Arc;

use baton_core::{Error, Store, StoreUrl};

pub use baton_core::kit::time::{ARRIVAL_TTL, DEFAULT_TTL, TICKET_TTL};
pub use config::SqliteConfig;
pub use layout::{APPLICATION_ID, SCHEMA_VERSION};
pub use store::SqliteStore;
pub use sys::{network_filesystem, NETWORK_FILESYSTEMS};

/// Opens the SQLite store the URL names (`sqlite:/abs/path.db`): [`SqliteStore::open`].
pub fn open(url: &StoreUrl) -> Result<SqliteStore, Error> {
    SqliteStore::open(url)
}

/// [`open`], with the store behind the error-context layer
/// (`baton_core::kit::context::layer`): every error it returns names its operation, key
/// and store.
pub fn open_store(url: &StoreUrl) -> Result<Arc<dyn Store>, Error> {
    Ok(baton_core::kit::context::layer(Arc::new(open(url)?)))
}
