//! `delete` on the directory store, in both modes: what it refuses, what it leaves, and
//! that requests which had the key's old directory open never share a slot with requests
//! on the key made anew.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::{AcquireRequest, ErrorKind, Holder, Key, Store, StoreUrl, Wait};
use baton_store_dir::{DirStore, LeaseStore};

fn open(dir: &Path, lease: bool) -> Arc<dyn Store> {
    if lease {
        let url = StoreUrl::parse(&format!("dir:{}?mode=lease", dir.display())).expect("url");
        Arc::new(LeaseStore::open(&url).expect("open"))
    } else {
        let url = StoreUrl::parse(&format!("dir:{}", dir.display())).expect("url");
        Arc::new(DirStore::open(&url).expect("open"))
    }
}

fn req(key: &str, limit: u32, wait: Wait, lease: bool) -> AcquireRequest {
    let mut r = AcquireRequest::new(
        Key::new(key).expect("key"),
        Holder::current(vec!["test".into()]),
    );
    r.limit = limit;
    r.wait = wait;
    if lease {
        r.ttl = Some(Duration::from_secs(30));
    }
    r
}

/// The names in the store's root that a delete leaves behind: renamed key directories.
fn leftovers(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .expect("read root")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".deleted."))
        .collect()
}

/// A process that had the key's directory open (here: another handle that used it)
/// takes its next slot on the key made anew, where a third handle sees it held.
async fn a_handle_that_used_the_key_goes_on_to_the_key_made_anew(lease: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b, c) = (
        open(tmp.path(), lease),
        open(tmp.path(), lease),
        open(tmp.path(), lease),
    );
    let first = a
        .acquire(&req("k", 1, Wait::NoWait, lease))
        .await
        .expect("first");
    a.release(&first).await.expect("release");
    b.delete(&first.key).await.expect("delete");
    assert!(
        leftovers(tmp.path()).is_empty(),
        "the old directory is gone"
    );
    let again = a
        .acquire(&req("k", 2, Wait::NoWait, lease))
        .await
        .expect("made anew, with another limit");
    assert!(
        again.token > first.token,
        "{} then {}",
        first.token,
        again.token
    );
    let st = c.inspect(&again.key).await.expect("status");
    assert_eq!((st.limit, st.held()), (2, 1), "{st:?}");
    a.release(&again).await.expect("release");
}

#[tokio::test]
async fn kernel_a_handle_that_used_the_key_goes_on_to_the_key_made_anew() {
    a_handle_that_used_the_key_goes_on_to_the_key_made_anew(false).await;
}

#[tokio::test]
async fn lease_a_handle_that_used_the_key_goes_on_to_the_key_made_anew() {
    a_handle_that_used_the_key_goes_on_to_the_key_made_anew(true).await;
}

/// The conformance property that races deletes against grants, and then what the race
/// leaves in the store's directory: a request that still had the old directory open may
/// have made a file in it just as it went, and the key's next delete removes what is left.
async fn deletes_racing_grants_leave_nothing(lease: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let url = match lease {
        true => format!("dir:{}?mode=lease", tmp.path().display()),
        false => format!("dir:{}", tmp.path().display()),
    };
    let mut h = baton_conformance::Harness::new(url, baton_store_dir::open);
    if lease {
        h = h.ttl(Duration::from_secs(30));
    }
    baton_conformance::delete_racing_grants_never_shares_a_slot(&h).await;
    let s = h.open();
    let mut keys = s.list().await.expect("list");
    for name in leftovers(tmp.path()) {
        let key = name[1..name.find(".deleted.").expect("a deleted name")].replace('%', "/");
        keys.push(Key::new(key).expect("a key"));
    }
    for key in keys {
        let mut r = req("any", 1, Wait::NoWait, lease);
        r.key = key;
        let l = s.acquire(&r).await.expect("acquire");
        s.release(&l).await.expect("release");
        s.delete(&l.key).await.expect("delete");
    }
    assert!(s.list().await.expect("list").is_empty());
    let left = leftovers(tmp.path());
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_deletes_racing_grants_leave_nothing() {
    deletes_racing_grants_leave_nothing(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_deletes_racing_grants_leave_nothing() {
    deletes_racing_grants_leave_nothing(true).await;
}

#[tokio::test]
async fn kernel_a_waiting_request_keeps_the_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    for limit in [1, 2] {
        let key = format!("waited{limit}");
        let s = open(tmp.path(), false);
        let mut held = Vec::new();
        for _ in 0..limit {
            held.push(
                s.acquire(&req(&key, limit, Wait::NoWait, false))
                    .await
                    .expect("hold"),
            );
        }
        let other = open(tmp.path(), false);
        let r = req(&key, limit, Wait::Forever, false);
        // The task hands its store back with the lease: dropping the store would let go.
        let waiter = tokio::spawn(async move { (other.acquire(&r).await, other) });
        // The waiter is queued once the delete says so; until then it says held.
        let deadline = Instant::now() + Duration::from_secs(10);
        let e = loop {
            let e = s.delete(&held[0].key).await.expect_err("in use");
            assert_eq!(e.kind(), ErrorKind::Busy, "{e:#}");
            if e.to_string().contains("waiting") || Instant::now() > deadline {
                break e;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(
            e.to_string().contains("requests are waiting"),
            "limit {limit}: {e:#}"
        );
        for l in &held {
            s.release(l).await.expect("release");
        }
        let (got, other) = tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter is granted")
            .expect("task");
        let got = got.expect("acquire");
        let e = s.delete(&got.key).await.expect_err("held by the waiter");
        assert!(e.to_string().contains("1 slot(s) held"), "{e:#}");
        other.release(&got).await.expect("release");
        s.delete(&got.key).await.expect("delete");
    }
}

/// The token floor, not the wall clock, keeps kernel-mode tokens rising: a counter far
/// ahead of the clock is carried over to the key made anew.
#[tokio::test]
async fn kernel_the_key_made_anew_starts_above_the_deleted_keys_counter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = open(tmp.path(), false);
    let l = s
        .acquire(&req("ahead", 1, Wait::NoWait, false))
        .await
        .expect("acquire");
    s.release(&l).await.expect("release");
    let ahead: u64 = l.token.0 + 1_000_000_000_000;
    std::fs::write(tmp.path().join("ahead/token"), format!("{ahead:020}\n")).expect("write");
    s.delete(&l.key).await.expect("delete");
    let again = s
        .acquire(&req("ahead", 1, Wait::NoWait, false))
        .await
        .expect("again");
    assert!(again.token.0 > ahead, "{} after {ahead}", again.token);
}

/// A file baton did not write in the key's directory does not stop the delete; the
/// renamed directory that keeps it is never listed, and the key can be made anew.
async fn a_foreign_file_stays_in_a_directory_nobody_lists(lease: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = open(tmp.path(), lease);
    let l = s
        .acquire(&req("kept", 1, Wait::NoWait, lease))
        .await
        .expect("acquire");
    s.release(&l).await.expect("release");
    std::fs::create_dir(tmp.path().join("kept/notes")).expect("a subdirectory");
    s.delete(&l.key).await.expect("delete");
    assert_eq!(leftovers(tmp.path()).len(), 1);
    assert!(s.list().await.expect("list").is_empty());
    let e = s.inspect(&l.key).await.expect_err("gone");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e:#}");
    let again = s
        .acquire(&req("kept", 1, Wait::NoWait, lease))
        .await
        .expect("again");
    assert!(again.token > l.token);
    assert_eq!(s.list().await.expect("list"), vec![again.key.clone()]);
}

#[tokio::test]
async fn kernel_a_foreign_file_stays_in_a_directory_nobody_lists() {
    a_foreign_file_stays_in_a_directory_nobody_lists(false).await;
}

#[tokio::test]
async fn lease_a_foreign_file_stays_in_a_directory_nobody_lists() {
    a_foreign_file_stays_in_a_directory_nobody_lists(true).await;
}

#[tokio::test]
async fn lease_a_broken_lease_held_back_by_its_lock_delay_keeps_the_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = open(tmp.path(), true);
    let mut r = req("delayed", 1, Wait::NoWait, true);
    r.lock_delay = Some(Duration::from_millis(800));
    let l = s.acquire(&r).await.expect("acquire");
    assert_eq!(s.break_lease(&l.key, None).await.expect("break").len(), 1);
    let e = s.delete(&l.key).await.expect_err("held back");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e:#}");
    assert!(e.to_string().contains("held back"), "{e:#}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    s.delete(&l.key).await.expect("the delay is over");
}
