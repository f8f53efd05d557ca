//! baton's contract (DESIGN.md, "The contract") as a test suite that every store runs.
//!
//! Each property of the contract is one public async function taking a [`Harness`], which
//! says how to open the store under test. Properties make their own keys (with a random
//! suffix), so they can run in parallel against one store. Properties that need separate
//! OS processes (a holder SIGKILLed mid-hold, many processes contending for a key) re-run
//! the test binary as a worker; see [`worker`].
//!
//! A store wires the suite in with [`suite!`] in its `tests/conformance.rs`, which turns
//! every property into a `#[test]` and adds the hidden worker entry:
//!
//! ```ignore
//! use std::sync::Arc;
//! use baton_conformance::{Harness, Recovery};
//! use baton_core::{Result, Store, StoreUrl};
//!
//! fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
//!     Ok(Arc::new(baton_store_dir::DirStore::open(url)?))
//! }
//!
//! fn harness() -> Harness {
//!     let dir = tempfile::tempdir().expect("temp dir");
//!     Harness::new(format!("dir:{}", dir.path().display()), open)
//!         .recovery(Recovery::AtOnce)
//!         .keep(dir)
//! }
//!
//! baton_conformance::suite!(open, harness);
//! ```
//!
//! The same macro serves every store: what runs is chosen by the store's
//! [`Capabilities`](baton_core::Capabilities) and by what its harness gives
//! ([`gate::needs`] lists each property's needs). A lease store's harness says which TTL
//! the lease properties use and how to damage the store; a networked store's says how to
//! start private servers, for the properties that partition, restart, freeze or kill one:
//!
//! ```ignore
//! fn harness() -> Harness {
//!     let dir = tempfile::tempdir().expect("temp dir");
//!     Harness::new(format!("dir:{}?mode=lease", dir.path().display()), open)
//!         .ttl(Duration::from_secs(30))
//!         .recovery(Recovery::Within(Duration::from_secs(30)))
//!         .lease(LeaseTiming { ttl: Duration::from_secs(1), detection: Duration::from_secs(1) })
//!         .corrupt("garbage-lease-file", garbage_lease_file)
//!         .keep(dir)
//! }
//!
//! baton_conformance::suite!(open, harness);
//! ```
//!
//! A property a store's declaration or harness rules out is reported as skipped, with
//! the reason, on stderr and in `scripts/test`'s summary; a store that declares a
//! capability and then answers `Unsupported` fails ([`capabilities_are_honest`]).
//!
//! No property asserts on speed. The only times checked are liveness bounds (generous:
//! something that must happen does happen), that a timed wait waited at least its
//! timeout, and one ordering that is a correctness property, not a speed: a paused
//! holder's last deadline falls before the store grants its slot again. Measurements (how
//! long a killed holder's slot took to come back, by how much loss preceded the re-grant)
//! are returned and printed.

mod barrier;
mod capability;
mod clock;
mod fence;
pub mod gate;
mod group;
pub mod history;
mod lease;
mod lock_delay;
mod network;
mod properties;
mod server_clock;
/// The fault proxy (it lives in `baton-stress`, whose `partition` scenario uses it too).
pub use baton_stress::proxy;
pub mod servers;
mod support;
pub mod worker;
pub use support::{skipped, SKIPS_ENV};

use std::any::Any;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{Key, Result, Store, StoreUrl};

pub use barrier::*;
pub use capability::*;
pub use clock::{instant_ns, monotonic_ns};
pub use gate::Servers;
pub use group::*;
pub use lease::*;
pub use lock_delay::*;
pub use network::*;
pub use properties::*;
pub use server_clock::*;

/// Opens a store from its URL. The suite calls it in the test process and in every worker.
pub type OpenFn = fn(&StoreUrl) -> Result<Arc<dyn Store>>;

/// The bound on anything that must happen eventually (a waiter granted after a release, a
/// worker finishing its job). Generous on purpose: it is a liveness check, not a speed
/// check; a slow machine must not fail it.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(30);

/// How soon a dead holder's slot comes back (contract point 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Kernel locks: the kernel frees the slot when the process dies, so once the dead
    /// holder is reaped, inspect shows the slot free and a no-wait acquire gets it.
    AtOnce,
    /// Lease stores: the slot comes back within this bound after the holder died.
    Within(Duration),
}

impl Recovery {
    /// The longest a dead holder's slot may stay taken.
    pub fn bound(self) -> Duration {
        match self {
            Recovery::AtOnce => Duration::ZERO,
            Recovery::Within(d) => d,
        }
    }
}

/// The timing of the lease properties (those that need renew).
///
/// The lease properties ask for their own TTL, short so that expiry happens within a test
/// (a paused holder must be superseded in seconds); the rest of the suite keeps
/// [`Harness::ttl`], which must outlast every hold of a worker that does not renew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// The TTL the lease properties ask for. About a second: long enough that a loaded
    /// machine renews in time (every TTL/3), short enough that each property stays within
    /// seconds.
    pub ttl: Duration,
    /// How long after a TTL of silence the store may take to notice and grant the slot
    /// again (a waiter's polling, a loaded machine's scheduling).
    pub detection: Duration,
}

impl LeaseTiming {
    /// The store's recovery bound at this TTL: `ttl + detection`.
    pub fn recovery(&self) -> Duration {
        self.ttl + self.detection
    }
}

/// Damages a store for [`garbage_is_a_clear_error`]: given the store's URL and a key that
/// exists in it (with a released lease), it damages the store the way a stray program,
/// a bad disk or a hostile user could, and returns the files it damaged, which the store
/// must leave exactly as they are. It is store-specific (lease files, a database), so each
/// store's `tests/conformance.rs` provides its own.
pub type CorruptFn = fn(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>>;

/// How to reach the store under test.
///
/// Build one with [`Harness::new`] in the store's `tests/conformance.rs`; [`suite!`] calls
/// that function once per test.
pub struct Harness {
    url: String,
    open: OpenFn,
    recovery: Recovery,
    ttl: Option<Duration>,
    lease: Option<LeaseTiming>,
    corruptions: Vec<(&'static str, CorruptFn)>,
    worker_test: String,
    keep: Option<Box<dyn Any + Send + Sync>>,
    skip: Option<String>,
    servers: Option<Servers>,
    network: bool,
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold secrets; show it the way StoreUrl does.
        let url = StoreUrl::parse(&self.url)
            .map(|u| u.to_string())
            .unwrap_or_else(|_| "(invalid URL)".into());
        f.debug_struct("Harness")
            .field("url", &url)
            .field("recovery", &self.recovery)
            .field("ttl", &self.ttl)
            .field("lease", &self.lease)
            .field(
                "corruptions",
                &self.corruptions.iter().map(|c| c.0).collect::<Vec<_>>(),
            )
            .field("worker_test", &self.worker_test)
            .finish_non_exhaustive()
    }
}

impl Harness {
    /// A harness for the store at `url`, opened with `open` (in the test and in workers).
    /// Recovery defaults to [`Recovery::AtOnce`], TTL to none.
    pub fn new(url: impl Into<String>, open: OpenFn) -> Harness {
        Harness {
            url: url.into(),
            open,
            recovery: Recovery::AtOnce,
            ttl: None,
            lease: None,
            corruptions: Vec::new(),
            worker_test: worker::WORKER_TEST.into(),
            keep: None,
            skip: None,
            servers: None,
            network: false,
        }
    }

    /// A harness whose tests are skipped, saying why on stderr: for a networked store
    /// whose test server is not there outside CI (see [`servers::url_from_env`]).
    pub fn skipped(why: impl Into<String>, open: OpenFn) -> Harness {
        let mut h = Harness::new("skipped:", open);
        h.skip = Some(why.into());
        h
    }

    /// Why this harness's tests are skipped, if they are.
    pub fn skip_reason(&self) -> Option<&str> {
        self.skip.as_deref()
    }

    /// Sets how soon a dead holder's slot comes back.
    pub fn recovery(mut self, recovery: Recovery) -> Harness {
        self.recovery = recovery;
        self
    }

    /// Sets the TTL every request asks for (lease stores).
    pub fn ttl(mut self, ttl: Duration) -> Harness {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the timing of the lease properties; a lease store's harness needs it.
    pub fn lease(mut self, timing: LeaseTiming) -> Harness {
        self.lease = Some(timing);
        self
    }

    /// Adds a way to damage the store, named `name` (letters, digits, `-`, `_`), for
    /// [`garbage_is_a_clear_error`]; call it once per kind of damage.
    pub fn corrupt(mut self, name: &'static str, damage: CorruptFn) -> Harness {
        self.corruptions.push((name, damage));
        self
    }

    /// Says how to start private servers of the store (a networked store): the
    /// properties that partition, restart, freeze or kill a server need it.
    pub fn servers(mut self, servers: Servers) -> Harness {
        self.servers = Some(servers);
        self
    }

    /// Says the store talks to a server over TCP at the URL's `host:port` endpoints (the
    /// partition property puts a fault proxy in front of each). Implied by
    /// [`Harness::servers`].
    pub fn network(mut self) -> Harness {
        self.network = true;
        self
    }

    /// Whether the store is networked ([`Harness::network`]).
    pub fn is_network(&self) -> bool {
        self.network || self.servers.is_some()
    }

    /// The private servers the harness can start, if any.
    pub fn private_servers(&self) -> Option<&Servers> {
        self.servers.as_ref()
    }

    /// Keeps `value` alive as long as the harness (a temporary directory, a server guard).
    pub fn keep(mut self, value: impl Any + Send + Sync) -> Harness {
        self.keep = Some(Box::new(value));
        self
    }

    /// The store URL under test.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How soon a dead holder's slot comes back.
    pub fn recovery_kind(&self) -> Recovery {
        self.recovery
    }

    /// The TTL requests ask for.
    pub fn request_ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// The timing of the lease properties, if the harness has one.
    pub fn lease_timing(&self) -> Option<LeaseTiming> {
        self.lease
    }

    /// The ways to damage the store, by name.
    pub fn corruptions(&self) -> &[(&'static str, CorruptFn)] {
        &self.corruptions
    }

    /// Opens a new handle on the store, or says why it cannot.
    pub fn try_open(&self) -> Result<Arc<dyn Store>> {
        let url = StoreUrl::parse(&self.url)?;
        (self.open)(&url)
    }

    /// Opens a new handle on the store; panics (failing the test) if it cannot.
    pub fn open(&self) -> Arc<dyn Store> {
        let url = StoreUrl::parse(&self.url)
            .unwrap_or_else(|e| panic!("the harness URL does not parse: {e:#}"));
        (self.open)(&url).unwrap_or_else(|e| panic!("cannot open {url}: {e:#}"))
    }

    /// The libtest name of the hidden worker test ([`suite!`] sets it from the module it
    /// was invoked in).
    pub fn worker_test(&self) -> &str {
        &self.worker_test
    }

    #[doc(hidden)]
    pub fn __in_module(mut self, module_path: &str) -> Harness {
        // libtest names a test by its module path without the crate name.
        self.worker_test = match module_path.split_once("::") {
            Some((_, inner)) => format!("{inner}::{}", worker::WORKER_TEST),
            None => worker::WORKER_TEST.into(),
        };
        self
    }
}

/// Turns every property of the suite into a `#[test]` in the invoking module, and adds the
/// hidden worker entry test (`__baton_conformance_worker`) that worker processes run.
///
/// `$open` is an [`OpenFn`]; `$harness` is a `fn() -> Harness`, called once per test.
/// Each test runs its property on a fresh multi-threaded Tokio runtime — or, when the
/// store does not declare what the property needs or the harness lacks a facility it
/// needs ([`gate::needs`]), reports it skipped with the reason ([`skipped`]). Every store
/// invokes this one macro; its capabilities and harness choose what runs.
#[macro_export]
macro_rules! suite {
    ($open:path, $harness:path) => {
        $crate::suite!(@tests $open, $harness;
            plain:
            limit_never_exceeded,
            tokens_strictly_increase,
            wait_modes,
            killed_holder_frees_slot,
            holder_info_matches,
            release_is_idempotent,
            timed_out_acquire_leaves_nothing,
            bad_keys_rejected,
            semaphore_slots_distinct,
            list_names_keys,
            capabilities_are_honest,
            barrier_passes_in_generations,
            waiters_are_served_in_order,
            delete_removes_only_an_unused_key,
            delete_racing_grants_never_shares_a_slot,
            paused_holder_is_superseded,
            killed_lease_holder_recovers,
            wall_clock_jump_keeps_lease,
            break_frees_and_holder_learns,
            resize_never_evicts,
            resize_steps_all_count,
            garbage_is_a_clear_error,
            stopping_group_is_dead_before_regrant,
            lock_delay_holds_back_lost_slots,
            partition_loses_before_regrant,
            server_clock_step_keeps_lease,
            ;
            server:
            restart_keeps_tokens_rising,
            frozen_server_loses_before_regrant,
            waiters_ride_out_restart,
            ;
            cluster:
            leader_kill_keeps_limit,
            ;
        );
    };
    (@tests $open:path, $harness:path;
        plain: $($plain:ident,)* ;
        server: $($server:ident,)* ;
        cluster: $($cluster:ident,)* ;
    ) => {
        /// Runs a worker job when the suite started this binary as a worker; otherwise
        /// does nothing.
        #[test]
        fn __baton_conformance_worker() {
            $crate::worker::main($open);
        }

        $(
            #[test]
            fn $plain() {
                let harness = $crate::Harness::__in_module($harness(), module_path!());
                let test = format!("{} {}::{}", env!("CARGO_PKG_NAME"), module_path!(), stringify!($plain));
                if $crate::gate::skip(&harness, &test, stringify!($plain)) {
                    return;
                }
                let _ = $crate::__private::runtime().block_on($crate::$plain(&harness));
            }
        )*
        $(
            #[test]
            fn $server() {
                let harness = $crate::Harness::__in_module($harness(), module_path!());
                let test = format!("{} {}::{}", env!("CARGO_PKG_NAME"), module_path!(), stringify!($server));
                let Some((h, server)) = $crate::gate::private_server(
                    &harness,
                    module_path!(),
                    &test,
                    stringify!($server),
                    false,
                ) else {
                    return;
                };
                let _ = $crate::__private::runtime().block_on($crate::$server(&h, &server));
            }
        )*
        $(
            #[test]
            fn $cluster() {
                let harness = $crate::Harness::__in_module($harness(), module_path!());
                let test = format!("{} {}::{}", env!("CARGO_PKG_NAME"), module_path!(), stringify!($cluster));
                let Some((h, server)) = $crate::gate::private_server(
                    &harness,
                    module_path!(),
                    &test,
                    stringify!($cluster),
                    true,
                ) else {
                    return;
                };
                let _ = $crate::__private::runtime().block_on($crate::$cluster(&h, &server));
            }
        )*
    };
}

#[doc(hidden)]
pub mod __private {
    /// The runtime tests and workers run on: multi-threaded, so that a store that blocks a
    /// thread in one task does not stall the test's other tasks.
    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a Tokio runtime")
    }
}
