//! baton's contract, run against the SQLite store (`sqlite:<temp dir>/baton.db`): the
//! whole suite plus the lease properties (pause, kill, wall-clock jump, break, resize,
//! a corrupt database).
//!
//! The base properties' workers hold leases without a keeper, so their TTL
//! outlasts every hold by a wide margin; the lease properties use a short TTL of their own
//! and run a keeper.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_conformance::{Harness, LeaseTiming, Recovery};
use baton_core::{Key, Result, Store, StoreUrl};

const TTL: Duration = Duration::from_secs(10);

fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    baton_store_sqlite::open_store(url)
}

fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("a temporary directory for the database");
    Harness::new(format!("sqlite:{}/baton.db", dir.path().display()), open)
        .ttl(TTL)
        // TTL, plus the waiter's polling and a loaded machine's scheduling.
        .recovery(Recovery::Within(TTL + Duration::from_secs(2)))
        .lease(LeaseTiming {
            ttl: Duration::from_secs(1),
            detection: Duration::from_secs(2),
        })
        .corrupt("garbage-database", garbage_database)
        .keep(dir)
}

/// Overwrites the database with garbage in place ("file is not a database"): the main
/// file and, since in WAL mode the newest pages live in `-wal` and its index in `-shm`,
/// those too, so that handles which already have them open read garbage as well.
fn garbage_database(url: &str, _key: &Key) -> std::io::Result<Vec<PathBuf>> {
    let path = PathBuf::from(
        url.strip_prefix("sqlite:")
            .ok_or_else(|| std::io::Error::other(url.to_owned()))?,
    );
    let mut damaged = Vec::new();
    for side in ["", "-wal", "-shm"] {
        let mut p = path.clone().into_os_string();
        p.push(side);
        let p = PathBuf::from(p);
        if side.is_empty() || p.exists() {
            std::fs::write(&p, vec![0x5a; 8192])?;
            // -shm is SQLite's wal-index, rebuilt by design: not the store's data.
            if side != "-shm" {
                damaged.push(p);
            }
        }
    }
    Ok(damaged)
}

baton_conformance::suite!(open, harness);
