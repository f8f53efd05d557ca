//! baton's contract, run against the directory store in lease-file mode
//! (`dir:<temp dir>?mode=lease`), lease properties included. Workers on this host that
//! are SIGKILLed are reclaimed at once (their process is provably gone); the TTL bound
//! applies to other hosts and to paused holders.
//!
//! Two TTLs: the properties every store runs use workers that do not renew, so they ask
//! for a long TTL (a worker stalled past it on a loaded machine would rightly lose its
//! lease); the lease properties renew with a keeper and ask for a short one, so a paused
//! holder is superseded within seconds.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton_conformance::{Harness, LeaseTiming, Recovery};
use baton_core::{Key, Result, Store, StoreUrl};

const TTL: Duration = Duration::from_secs(30);

/// The lease properties' timing: a waiting acquirer notices a TTL of silence within its
/// polling interval (at most 200 ms), plus a loaded machine's scheduling.
const LEASE: LeaseTiming = LeaseTiming {
    ttl: Duration::from_secs(1),
    detection: Duration::from_secs(1),
};

fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    baton_store_dir::open(url)
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("a temporary store directory");
    Harness::new(format!("dir:{}?mode=lease", dir.path().display()), open)
        .ttl(TTL)
        .recovery(Recovery::Within(TTL))
        .lease(LEASE)
        .corrupt("garbage-lease-file", garbage_lease_file)
        .corrupt("symlink-lease-file", symlink_lease_file)
        .keep(dir)
}

/// A key's directory in a `dir:PATH?mode=lease` store (see the store's README, "Lease
/// mode"), and the current generation of its slot 0 (`slot.0.G`).
fn slot_zero(url: &str, key: &Key) -> io::Result<(PathBuf, u64)> {
    let root = url
        .strip_prefix("dir:")
        .and_then(|u| u.strip_suffix("?mode=lease"))
        .ok_or_else(|| io::Error::other(format!("not a lease-mode dir URL: {url}")))?;
    let dir = Path::new(root).join(key.as_str().replace('/', "%"));
    let mut gen = None;
    for entry in std::fs::read_dir(&dir)? {
        let name = entry?.file_name();
        let g = name
            .to_str()
            .and_then(|n| n.strip_prefix("slot.0."))
            .and_then(|g| g.parse::<u64>().ok());
        gen = gen.max(g);
    }
    let gen = gen.ok_or_else(|| io::Error::other(format!("no slot.0.* in {}", dir.display())))?;
    Ok((dir, gen))
}

/// Garbage where the current lease file of slot 0 belongs.
fn garbage_lease_file(url: &str, key: &Key) -> io::Result<Vec<PathBuf>> {
    let (dir, gen) = slot_zero(url, key)?;
    let file = dir.join(format!("slot.0.{gen}"));
    std::fs::write(&file, b"\x00\xffnot a lease {\"state\":")?;
    Ok(vec![file])
}

/// A symlink as the next generation of slot 0, pointing at a copy of the current lease
/// file: it must be refused, not followed.
fn symlink_lease_file(url: &str, key: &Key) -> io::Result<Vec<PathBuf>> {
    let (dir, gen) = slot_zero(url, key)?;
    let target = dir
        .parent()
        .ok_or_else(|| io::Error::other("a key directory has a parent"))?
        .join(format!("planted-lease-{gen}"));
    std::fs::copy(dir.join(format!("slot.0.{gen}")), &target)?;
    let link = dir.join(format!("slot.0.{}", gen + 1));
    std::os::unix::fs::symlink(&target, &link)?;
    Ok(vec![link, target])
}

baton_conformance::suite!(open, harness);
