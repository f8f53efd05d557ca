//! baton's contract, run against the directory store (`dir:<temp dir>`).

use std::sync::Arc;

use baton_conformance::{Harness, Recovery};
use baton_core::{Result, Store, StoreUrl};

fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    baton_store_dir::open(url)
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("a temporary store directory");
    Harness::new(format!("dir:{}", dir.path().display()), open)
        .recovery(Recovery::AtOnce)
        .keep(dir)
}

baton_conformance::suite!(open, harness);
