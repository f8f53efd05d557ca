//! baton's core model, shared by every store, the CLI and the stress harness.
//!
//! This crate has no store dependencies. It defines:
//! - [`Key`]: a validated lock name;
//! - [`Holder`]: who holds a lease (random id, host, pid, pid start time, boot id, user, command);
//! - [`Lease`] and [`Token`]: one granted slot and its fencing token;
//! - [`Wait`]: forever, with a timeout, or not at all;
//! - [`Error`] / [`ErrorKind`]: the one public error, with kinds a caller can act on;
//! - [`Store`]: the small async trait every store implements, and [`StoreExt`] with the
//!   convenience built on it ([`LeaseGuard`], `acquire`, `try_acquire`, `acquire_timeout`);
//! - [`StoreUrl`]: a store URL whose `Debug`/`Display` never show secrets;
//! - [`Keeper`]: renews a lease every TTL/3 and declares it lost before the store could
//!   re-grant it;
//! - [`leader`](mod@leader): leader election on any store ([`campaign`], [`Leadership`],
//!   [`leader()`], [`observe`]);
//! - `fence` (feature `fence-sqlite`): the fence helper that makes a SQLite resource
//!   reject writes from holders that lost the lock;
//! - [`barrier`](mod@barrier): a reusable barrier of N parties over any store that has one;
//! - [`supervisor`](mod@supervisor): runs a command under a supervisor that keeps its
//!   whole process group from outliving the lease (used by `baton run`);
//! - [`secret`](mod@secret): passwords kept out of `ps` (a password file named in the URL,
//!   the store's own environment and files) and the warning for one on the command line;
//! - [`parse_duration`]: `500ms`, `2s`, `1m30s`.

pub mod barrier;
mod duration;
mod error;
#[cfg(feature = "fence-sqlite")]
pub mod fence;
mod guard;
mod holder;
mod keeper;
mod key;
pub mod kit;
pub mod leader;
mod lease;
mod resize;
pub mod secret;
mod store;
pub mod supervisor;
mod url;

pub use duration::{format_duration, parse_duration};
pub use error::{Error, ErrorKind, Op, Result};
pub use guard::{LeaseGuard, LockRequest, StoreExt};
pub use holder::{boot_id, hostname, pid_start_ticks, Holder, HolderId, Liveness, ProcessRef};
pub use keeper::{Keeper, KeeperConfig, LeaseState};
pub use key::{derive_key, Key, MAX_KEY_LEN};
pub use leader::{campaign, leader, observe, Leader, Leadership};
pub use lease::{Lease, Token, Wait};
pub use resize::Resize;
pub use store::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, KeyStatus, Recovery, Released,
    SlotState, SlotStatus, Store,
};
pub use url::{percent_decode, Authority, StoreUrl};

/// Milliseconds since the Unix epoch for a wall-clock time (0 before the epoch).
///
/// Wall-clock times in baton are for display only; no decision is made from them.
pub fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The wall-clock time for milliseconds since the Unix epoch.
pub fn from_unix_ms(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}
