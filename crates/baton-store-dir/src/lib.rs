//! baton's directory store, `dir:PATH` — the default store, with no daemon.
//!
//! Each slot of a key is a file holding a Linux open-file-description lock (`F_OFD_SETLK`),
//! so the kernel frees a dead holder's slot the moment its process exits. A semaphore of
//! N slots is N files. Holder info sits beside each lock, written atomically, for
//! `status`. Tokens come from a per-key counter updated under its own lock. Every file is
//! opened relative to the store's directory with `O_NOFOLLOW | O_CLOEXEC`. See
//! `README.md` for the layout, the bounds and what the store cannot do.

mod config;
mod fs;
mod store;
mod wait;

pub use config::{default_dir, DirConfig};
pub use store::DirStore;
pub use wait::wait_signal;
