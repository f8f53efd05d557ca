//! baton's contract, run against the directory store in lease-file mode
//! (`dir:<temp dir>?mode=lease`). Workers on this host that are SIGKILLed are reclaimed
//! at once (their process is provably gone); the TTL bound applies to other hosts.
//!
//! The suite's workers do not run a keeper, so the TTL is long: a worker stalled past it
//! on a loaded machine would rightly lose its lease, which these kernel-lock-era
//! properties do not model (the lease properties will).

use std::sync::Arc;
use std::time::Duration;

use baton_conformance::{Harness, Recovery};
use baton_core::{Result, Store, StoreUrl};
use baton_store_dir::LeaseStore;

const TTL: Duration = Duration::from_secs(30);

fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    Ok(Arc::new(LeaseStore::open(url)?))
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("a temporary store directory");
    Harness::new(format!("dir:{}?mode=lease", dir.path().display()), open)
        .ttl(TTL)
        .recovery(Recovery::Within(TTL))
        .keep(dir)
}

baton_conformance::suite!(open, harness);
