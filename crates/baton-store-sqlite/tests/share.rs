//! A database in a setgid, group-writable directory is shared by that group: the
//! database, its `-wal` and `-shm` files and baton's waiter file are all owned by the
//! group and group-writable, whatever the creating process's umask.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use baton_core::{AcquireRequest, Holder, Key, Store, StoreUrl, Wait};
use baton_store_sqlite::SqliteStore;

/// A group this process may give files to: `nogroup` (65534) as root, else its own.
fn some_group() -> u32 {
    // SAFETY: geteuid and getegid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        65534
    } else {
        unsafe { libc::getegid() }
    }
}

#[tokio::test]
async fn a_database_in_a_setgid_group_directory_is_group_writable_with_its_side_files() {
    let gid = some_group();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("db");
    std::fs::create_dir(&dir).expect("mkdir");
    std::os::unix::fs::chown(&dir, None, Some(gid)).expect("chgrp");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2770)).expect("chmod");
    let path = dir.join("jobs.db");
    let url = StoreUrl::parse(&format!("sqlite:{}", path.display())).expect("url");
    let store = SqliteStore::open(&url).expect("open");
    let mut r = AcquireRequest::new(
        Key::new("gpu").expect("key"),
        Holder::current(vec!["test".into()]),
    );
    r.limit = 2;
    r.wait = Wait::NoWait;
    let lease = store.acquire(&r).await.expect("acquire");
    // While the connection is open, SQLite keeps -wal and -shm.
    for suffix in ["", "-wal", "-shm", "-baton-waiters"] {
        let file = format!("{}{suffix}", path.display());
        let meta = std::fs::metadata(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(meta.gid(), gid, "{file} has the wrong group");
        assert_eq!(
            meta.mode() & 0o777,
            0o660,
            "{file} has mode {:o}",
            meta.mode() & 0o777
        );
    }
    store.release(&lease).await.expect("release");
}
