//! baton's directory store, `dir:PATH` — the default store, with no daemon.
//!
//! Two modes share one crate and one on-disk root:
//! - **kernel** (the default, [`DirStore`]): each slot of a key is a file holding a Linux
//!   open-file-description lock, so the kernel frees a dead holder's slot the moment its
//!   process exits. A semaphore of N slots is N files. Holder info sits beside each lock.
//! - **lease** (`dir:PATH?mode=lease`, [`LeaseStore`]): for shared filesystems without
//!   reliable kernel locks (NFS, Lustre). Each slot is a chain of lease files created with
//!   `link(2)`, kept alive by a heartbeat, and reclaimed only after a reader has seen no
//!   heartbeat for a whole TTL on its own monotonic clock.
//!
//! Every file is opened relative to the store's directory with `O_NOFOLLOW | O_CLOEXEC`.
//! See `README.md` for the layout, the bounds and what the store cannot do.
//!
//! Files, by role:
//! - `config.rs`: [`DirConfig`] from the URL.
//! - `root.rs`: what both modes share: the store directory, key directories, the limit
//!   file, the mode marker, `list`, and how I/O errors become baton errors.
//! - `fs.rs`: file-level helpers (no-follow opens, atomic creates, the token counter) and
//!   whole-file OFD locks over `baton_core::kit::sys`.
//! - `share.rs`: group-shared store directories.
//! - `kernel.rs`: kernel mode, [`DirStore`]; `wait.rs`: its waits on kernel locks.
//! - `lease.rs`: lease mode, [`LeaseStore`] (release, renew, the thin `impl Store`);
//!   `lease_layout.rs`: its files and records; `lease_acquire.rs`: the grant;
//!   `lease_admin.rs`: status, break and resize.
//! - `barrier.rs`: barriers, both modes.
//!
//! The mechanisms every store shares (TTL policy, standard errors and status notes, OFD
//! locks, the error-context layer) come from `baton_core::kit`.

use std::sync::Arc;

use baton_core::kit::context;
use baton_core::{Error, Store, StoreUrl};

mod barrier;
mod config;
mod fs;
mod kernel;
mod lease;
mod lease_acquire;
mod lease_admin;
mod lease_layout;
mod root;
mod share;
mod wait;

pub use baton_core::kit::time::ARRIVAL_TTL;
pub use config::{default_dir, DirConfig, Mode};
pub use kernel::DirStore;
pub use lease::LeaseStore;
pub use wait::wait_signal;

/// Opens the directory store a `dir:` URL names, in the mode it asks for, behind the
/// error-context layer.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>, Error> {
    let store: Arc<dyn Store> = match DirConfig::from_url(url)?.mode {
        Mode::Kernel => Arc::new(DirStore::open(url)?),
        Mode::Lease => Arc::new(LeaseStore::open(url)?),
    };
    Ok(context::layer(store))
}
