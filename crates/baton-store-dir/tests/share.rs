//! Group-shared store directories: a setgid, group-writable store directory gets every
//! file and directory baton creates in it owned by its group and group-writable, in both
//! modes, whatever the creating process's umask.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{AcquireRequest, BarrierRequest, Holder, Key, Store, StoreUrl, Wait};

fn req(key: &str, limit: u32) -> AcquireRequest {
    let mut r = AcquireRequest::new(
        Key::new(key).expect("key"),
        Holder::current(vec!["test".into()]),
    );
    r.limit = limit;
    r.wait = Wait::NoWait;
    r
}

/// A group this process may give files to: `nogroup` (65534) as root, else its own.
fn some_group() -> u32 {
    // SAFETY: geteuid and getegid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        65534
    } else {
        unsafe { libc::getegid() }
    }
}

/// Every entry under `root` (not `root` itself), with its metadata.
fn walk(root: &Path, out: &mut Vec<(std::path::PathBuf, std::fs::Metadata)>) {
    for entry in std::fs::read_dir(root).expect("read_dir") {
        let entry = entry.expect("entry");
        let meta = entry.metadata().expect("metadata");
        let path = entry.path();
        if meta.is_dir() {
            walk(&path, out);
        }
        out.push((path, meta));
    }
}

fn shared_dir(tmp: &Path, gid: u32) -> std::path::PathBuf {
    let dir = tmp.join("locks");
    std::fs::create_dir(&dir).expect("mkdir");
    std::os::unix::fs::chown(&dir, None, Some(gid)).expect("chgrp");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2770)).expect("chmod");
    dir
}

async fn exercise(store: Arc<dyn Store>) {
    let lease = store.acquire(&req("jobs/gpu", 2)).await.expect("acquire");
    let other = store.acquire(&req("jobs/gpu", 2)).await.expect("acquire 2");
    store.release(&lease).await.expect("release");
    store.release(&other).await.expect("release 2");
    let b = BarrierRequest {
        key: Key::new("meet").expect("key"),
        parties: 1,
        wait: Wait::Timeout(Duration::from_secs(20)),
        holder: Holder::current(vec!["test".into()]),
    };
    store.barrier(&b).await.expect("barrier");
}

fn check_tree(dir: &Path, gid: u32) {
    let mut all = Vec::new();
    walk(dir, &mut all);
    assert!(all.len() > 5, "{all:?}");
    for (path, meta) in all {
        assert_eq!(meta.gid(), gid, "{} has the wrong group", path.display());
        let want = if meta.is_dir() { 0o2770 } else { 0o660 };
        assert_eq!(
            meta.mode() & 0o7777,
            want,
            "{} has mode {:o}",
            path.display(),
            meta.mode() & 0o7777
        );
    }
}

#[tokio::test]
async fn a_setgid_group_directory_gets_group_writable_files_in_both_modes() {
    let gid = some_group();
    for mode in ["", "?mode=lease"] {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = shared_dir(tmp.path(), gid);
        let url = StoreUrl::parse(&format!("dir:{}{mode}", dir.display())).expect("url");
        exercise(baton_store_dir::open(&url).expect("open")).await;
        check_tree(&dir, gid);
    }
}

#[tokio::test]
async fn a_private_directory_keeps_the_umask() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("locks");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let url = StoreUrl::parse(&format!("dir:{}", dir.display())).expect("url");
    exercise(baton_store_dir::open(&url).expect("open")).await;
    let mut all = Vec::new();
    walk(&dir, &mut all);
    for (path, meta) in all {
        assert_eq!(
            meta.mode() & 0o2000,
            0,
            "{} is setgid in a private store",
            path.display()
        );
    }
}
