//! `delete` on the directory store, in both modes: what it refuses, what it leaves, and
//! that requests which had the key's old directory open never share a slot with requests
//! on the key made anew.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
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

/// Deletes race grants on one mutex key from four handles: no two grants ever overlap,
/// tokens rise in grant order across every key made anew, and nothing is left behind.
async fn deletes_racing_grants_never_share_the_slot(lease: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let inside = Arc::new(AtomicU32::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let stop = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for n in 0..4 {
        let s = open(tmp.path(), lease);
        let (inside, tokens) = (Arc::clone(&inside), Arc::clone(&tokens));
        tasks.push(tokio::spawn(async move {
            let wait = if n % 2 == 0 {
                Wait::NoWait
            } else {
                Wait::Timeout(Duration::from_millis(30))
            };
            let mut granted = 0u32;
            while Instant::now() < stop {
                let lease_now = match s.acquire(&req("race", 1, wait, lease)).await {
                    Ok(l) => l,
                    Err(e) if matches!(e.kind(), ErrorKind::Busy | ErrorKind::Timeout) => {
                        tokio::task::yield_now().await;
                        continue;
                    }
                    Err(e) => panic!("acquire: {e:#}"),
                };
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                tokens.lock().expect("tokens").push(lease_now.token.0);
                tokio::time::sleep(Duration::from_micros(200)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                s.release(&lease_now).await.expect("release");
                granted += 1;
                // A gap now and then, so the key is sometimes free to delete.
                tokio::time::sleep(Duration::from_millis(u64::from(granted % 3))).await;
            }
            granted
        }));
    }
    let deleter = open(tmp.path(), lease);
    let key = Key::new("race").expect("key");
    let mut deleted = 0u32;
    while Instant::now() < stop {
        match deleter.delete(&key).await {
            Ok(()) => deleted += 1,
            Err(e) if matches!(e.kind(), ErrorKind::Busy | ErrorKind::NotFound) => {}
            Err(e) => panic!("delete: {e:#}"),
        }
        tokio::task::yield_now().await;
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.expect("task");
    }
    let tokens = tokens.lock().expect("tokens").clone();
    eprintln!("{granted} grants, {deleted} deletes");
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens went back: {tokens:?}"
    );
    assert!(
        granted > 20 && deleted > 2,
        "the race did not happen: {granted} grants, {deleted} deletes"
    );
    // A request that still had the old directory open may have made a file in it just
    // as it went; the key's next delete removes what is left.
    match deleter.delete(&key).await {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let l = deleter
                .acquire(&req("race", 1, Wait::NoWait, lease))
                .await
                .expect("acquire");
            deleter.release(&l).await.expect("release");
            deleter.delete(&key).await.expect("delete");
        }
        Err(e) => panic!("delete: {e:#}"),
    }
    assert!(
        leftovers(tmp.path()).is_empty(),
        "{:?}",
        leftovers(tmp.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kernel_deletes_racing_grants_never_share_the_slot() {
    deletes_racing_grants_never_share_the_slot(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_deletes_racing_grants_never_share_the_slot() {
    deletes_racing_grants_never_share_the_slot(true).await;
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
