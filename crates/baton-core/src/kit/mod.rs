//! The kit: the mechanisms every store needs, written once.
//!
//! A store crate implements what is particular to its server (the connection, the layout
//! of its records, the grant) and takes the rest from here, so two stores never say the
//! same thing in two ways:
//!
//! - [`backend`]: one `Store` for every store that runs on a runtime of its own: the store
//!   writes its operations as a [`backend::Backend`], [`backend::OnRuntime`] does the rest.
//! - [`context`]: the error-context layer (operation, key and store on every error).
//! - [`runtime`]: run on the store's own executor, cancel when the caller goes away, give
//!   back a grant nobody waits for; the blocking-thread twin for stores whose calls block.
//! - [`time`]: one TTL policy ([`time::MIN_TTL`] to [`time::MAX_TTL`], [`time::DEFAULT_TTL`]),
//!   the TTL/3 renewal cadence, next-wake arithmetic, the host's monotonic clock.
//! - [`errors`]: the standard errors (busy, limit mismatch, no such key, barrier give-ups)
//!   in one wording.
//! - [`status`]: status, list and break built the same way on every store.
//! - [`wait`]: waiters that ride out a store's restart.
//! - [`sys`]: OFD locks, the filesystem type, user and group names, a poison-tolerant
//!   mutex, backoff jitter.

pub mod backend;
pub mod context;
pub mod errors;
pub mod runtime;
pub mod status;
pub mod sys;
pub mod time;
pub mod wait;
