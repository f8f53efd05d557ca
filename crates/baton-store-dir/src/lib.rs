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

use std::sync::Arc;

use baton_core::{Error, Store, StoreUrl};

mod barrier;
mod config;
mod fs;
mod kernel;
mod lease;
mod root;
mod share;
mod wait;

pub use barrier::ARRIVAL_TTL;
pub use config::{default_dir, DirConfig, Mode};
pub use kernel::DirStore;
pub use lease::LeaseStore;
pub use wait::wait_signal;

/// Opens the directory store a `dir:` URL names, in the mode it asks for.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>, Error> {
    match DirConfig::from_url(url)?.mode {
        Mode::Kernel => Ok(Arc::new(DirStore::open(url)?)),
        Mode::Lease => Ok(Arc::new(LeaseStore::open(url)?)),
    }
}
