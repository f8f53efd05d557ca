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
//! No property asserts on speed. The only times checked are liveness bounds (generous:
//! something that must happen does happen) and that a timed wait waited at least its
//! timeout. Measurements (how long a killed holder's slot took to come back) are returned
//! and printed.

mod clock;
pub mod history;
mod properties;
mod support;
pub mod worker;

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{Result, Store, StoreUrl};

pub use clock::monotonic_ns;
pub use properties::*;

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

/// How to reach the store under test.
///
/// Build one with [`Harness::new`] in the store's `tests/conformance.rs`; [`suite!`] calls
/// that function once per test.
pub struct Harness {
    url: String,
    open: OpenFn,
    recovery: Recovery,
    ttl: Option<Duration>,
    worker_test: String,
    keep: Option<Box<dyn Any + Send + Sync>>,
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
            worker_test: worker::WORKER_TEST.into(),
            keep: None,
        }
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
/// Each test runs its property on a fresh multi-threaded Tokio runtime.
#[macro_export]
macro_rules! suite {
    ($open:path, $harness:path) => {
        $crate::suite!(@tests $open, $harness;
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
        );
    };
    (@tests $open:path, $harness:path; $($property:ident,)*) => {
        /// Runs a worker job when the suite started this binary as a worker; otherwise
        /// does nothing.
        #[test]
        fn __baton_conformance_worker() {
            $crate::worker::main($open);
        }

        $(
            #[test]
            fn $property() {
                let harness = $crate::Harness::__in_module($harness(), module_path!());
                let _ = $crate::__private::runtime().block_on($crate::$property(&harness));
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
