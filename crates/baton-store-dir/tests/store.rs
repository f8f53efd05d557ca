//! Directory-store behaviour the shared conformance suite does not cover: the on-disk
//! format, hostile or corrupt state, and limits.

use std::os::unix::fs::symlink;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{
    AcquireRequest, ErrorKind, Holder, Key, Released, SlotState, Store, StoreUrl, Wait,
};
use baton_store_dir::DirStore;

fn store(dir: &std::path::Path) -> Arc<DirStore> {
    let url = StoreUrl::parse(&format!("dir:{}", dir.display())).expect("url");
    Arc::new(DirStore::open(&url).expect("open"))
}

fn req(key: &str, limit: u32, wait: Wait) -> AcquireRequest {
    let mut r = AcquireRequest::new(
        Key::new(key).expect("key"),
        Holder::current(vec!["test".into()]),
    );
    r.limit = limit;
    r.wait = wait;
    r
}

#[tokio::test]
async fn grants_write_holder_info_and_release_removes_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let lease = s
        .acquire(&req("a/b", 1, Wait::NoWait))
        .await
        .expect("acquire");
    let dir = tmp.path().join("a%b");
    assert!(dir.join("slot.0").is_file());
    let info = std::fs::read(dir.join("slot.0")).expect("slot file");
    let info = String::from_utf8_lossy(&info);
    assert!(info.starts_with("baton1 "), "{info}");
    assert!(info.contains(&lease.holder.id.to_string()), "{info}");
    let st = s.inspect(&lease.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Held);
    assert_eq!(st.slots[0].token, Some(lease.token));
    assert_eq!(st.last_token, Some(lease.token));
    assert_eq!(
        s.release(&lease).await.expect("release"),
        Released::Released
    );
    let after = std::fs::read(dir.join("slot.0")).expect("slot file");
    assert!(
        !String::from_utf8_lossy(&after[..33]).contains(&lease.holder.id.to_string())
            && after.starts_with(b"baton1 00000000 "),
        "release clears the record's header"
    );
    assert_eq!(
        s.inspect(&lease.key).await.expect("inspect").slots[0].state,
        SlotState::Free
    );
    assert_eq!(
        s.list().await.expect("list"),
        vec![Key::new("a/b").expect("key")]
    );
}

#[tokio::test]
async fn a_second_open_in_one_process_conflicts_like_another_process() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (store(tmp.path()), store(tmp.path()));
    let lease = a.acquire(&req("k", 1, Wait::NoWait)).await.expect("first");
    let err = b
        .acquire(&req("k", 1, Wait::NoWait))
        .await
        .expect_err("busy");
    assert_eq!(err.kind(), ErrorKind::Busy);
    let err = b
        .acquire(&req("k", 1, Wait::Timeout(Duration::from_millis(100))))
        .await
        .expect_err("timeout");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    a.release(&lease).await.expect("release");
    b.acquire(&req("k", 1, Wait::NoWait))
        .await
        .expect("free now");
}

#[tokio::test]
async fn limit_is_stored_with_the_key_and_a_mismatch_names_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let _l = s
        .acquire(&req("sem", 3, Wait::NoWait))
        .await
        .expect("acquire");
    let err = s
        .acquire(&req("sem", 2, Wait::NoWait))
        .await
        .expect_err("mismatch");
    assert_eq!(err.kind(), ErrorKind::LimitMismatch);
    assert_eq!(err.current_limit(), Some(3));
    assert!(err.to_string().contains("limit of 3"), "{err}");
    // A fresh store object reads the limit from disk.
    let err = store(tmp.path())
        .acquire(&req("sem", 1, Wait::NoWait))
        .await
        .expect_err("mismatch");
    assert_eq!(err.current_limit(), Some(3));
}

#[tokio::test]
async fn semaphore_waiter_gets_the_slot_that_frees() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let l0 = s.acquire(&req("sem", 2, Wait::NoWait)).await.expect("0");
    let l1 = s.acquire(&req("sem", 2, Wait::NoWait)).await.expect("1");
    assert_ne!(l0.slot, l1.slot);
    let s2 = Arc::clone(&s);
    let waiter = tokio::spawn(async move {
        s2.acquire(&req("sem", 2, Wait::Timeout(Duration::from_secs(20))))
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.release(&l1).await.expect("release");
    let got = waiter.await.expect("join").expect("granted");
    assert_eq!(got.slot, l1.slot);
    assert!(got.token > l1.token);
}

#[tokio::test]
async fn tokens_never_go_back_even_if_the_counter_is_wiped() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let a = s.acquire(&req("k", 1, Wait::NoWait)).await.expect("a");
    s.release(&a).await.expect("rel");
    std::fs::remove_file(tmp.path().join("k/token")).expect("wipe counter");
    let b = s.acquire(&req("k", 1, Wait::NoWait)).await.expect("b");
    assert!(b.token > a.token, "{:?} then {:?}", a.token, b.token);
}

#[tokio::test]
async fn hostile_state_gets_a_clear_error_and_frees_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let outside = tempfile::tempdir().expect("outside");

    // A key directory that is a symlink is refused, not followed.
    symlink(outside.path(), tmp.path().join("evil")).expect("symlink");
    let err = s
        .acquire(&req("evil", 1, Wait::NoWait))
        .await
        .expect_err("symlink dir");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err:#}");
    assert!(format!("{err:#}").contains("symlink"), "{err:#}");
    assert_eq!(
        std::fs::read_dir(outside.path()).expect("read").count(),
        0,
        "nothing written through the link"
    );

    // A slot file that is a symlink is refused.
    std::fs::create_dir(tmp.path().join("s")).expect("mkdir");
    std::fs::write(tmp.path().join("s/limit"), "1\n").expect("limit");
    symlink(outside.path().join("target"), tmp.path().join("s/slot.0")).expect("symlink");
    let err = s
        .acquire(&req("s", 1, Wait::NoWait))
        .await
        .expect_err("symlink slot");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err:#}");
    assert!(!outside.path().join("target").exists());

    // Garbage limit and counter files.
    for (key, file, junk) in [
        ("l", "limit", "lots\n"),
        ("l2", "limit", ""),
        ("t", "token", "12abc"),
    ] {
        std::fs::create_dir(tmp.path().join(key)).expect("mkdir");
        if file != "limit" {
            std::fs::write(tmp.path().join(key).join("limit"), "1\n").expect("limit");
        }
        std::fs::write(tmp.path().join(key).join(file), junk).expect("junk");
        let err = s.acquire(&req(key, 1, Wait::NoWait)).await.expect_err(key);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{key}: {err:#}");
    }
    // The slot was not left held by the failed grant (the counter failed after locking).
    std::fs::write(tmp.path().join("t/token"), "").expect("reset counter");
    s.acquire(&req("t", 1, Wait::NoWait))
        .await
        .expect("slot was released after the error");

    // Garbage holder info: status still works and says so; the holder keeps its slot.
    let lease = s
        .acquire(&req("g", 1, Wait::NoWait))
        .await
        .expect("acquire");
    std::fs::write(tmp.path().join("g/slot.0"), b"\x00\xffgarbage").expect("junk");
    let st = s.inspect(&lease.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Held);
    assert!(
        st.slots[0]
            .note
            .as_deref()
            .unwrap_or("")
            .contains("unreadable"),
        "{st:?}"
    );
    let err = store(tmp.path())
        .acquire(&req("g", 1, Wait::NoWait))
        .await
        .expect_err("still held");
    assert_eq!(err.kind(), ErrorKind::Busy);

    // A FIFO where a slot file belongs is refused without blocking.
    std::fs::create_dir(tmp.path().join("f")).expect("mkdir");
    std::fs::write(tmp.path().join("f/limit"), "1\n").expect("limit");
    let fifo =
        std::ffi::CString::new(tmp.path().join("f/slot.0").to_str().expect("utf8")).expect("c");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let err = s
        .acquire(&req("f", 1, Wait::NoWait))
        .await
        .expect_err("fifo");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err:#}");

    // list skips what is not a key directory and does not follow the symlink.
    let keys: Vec<String> = s
        .list()
        .await
        .expect("list")
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert!(!keys.contains(&"evil".to_string()), "{keys:?}");
}

#[tokio::test]
async fn relative_and_unknown_urls_are_refused() {
    for u in ["dir:rel/path", "dir:/x?mode=nope"] {
        let url = StoreUrl::parse(u).expect("url");
        let err = DirStore::open(&url).expect_err(u);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{u}");
    }
}

#[tokio::test]
async fn dropped_waits_leave_no_ghost_holder() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (key, limit) in [("mutex", 1u32), ("sem", 2)] {
        let s = store(tmp.path());
        let mut held = Vec::new();
        for _ in 0..limit {
            held.push(
                s.acquire(&req(key, limit, Wait::NoWait))
                    .await
                    .expect("fill"),
            );
        }
        // Several waits abandoned in different ways: dropped futures and timeouts.
        for _ in 0..5 {
            let forever = req(key, limit, Wait::Forever);
            let fut = s.acquire(&forever);
            assert!(tokio::time::timeout(Duration::from_millis(30), fut)
                .await
                .is_err());
            let err = s
                .acquire(&req(key, limit, Wait::Timeout(Duration::from_millis(20))))
                .await
                .expect_err("timeout");
            assert_eq!(err.kind(), ErrorKind::Timeout);
        }
        for lease in held {
            s.release(&lease).await.expect("release");
        }
        // Every slot is free for someone else: no abandoned waiter took one.
        let other = store(tmp.path());
        for _ in 0..limit {
            other
                .acquire(&req(key, limit, Wait::NoWait))
                .await
                .expect("free after cancelled waits");
        }
    }
}

#[tokio::test]
async fn a_deleted_key_directory_is_reopened_not_reused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let lease = s.acquire(&req("k", 1, Wait::NoWait)).await.expect("first");
    s.release(&lease).await.expect("release");
    std::fs::remove_dir_all(tmp.path().join("k")).expect("rm key dir");
    let again = s.acquire(&req("k", 1, Wait::NoWait)).await.expect("again");
    assert!(tmp.path().join("k/slot.0").exists(), "recreated on disk");
    let err = store(tmp.path())
        .acquire(&req("k", 1, Wait::NoWait))
        .await
        .expect_err("busy");
    assert_eq!(
        err.kind(),
        ErrorKind::Busy,
        "the other process sees the same lock"
    );
    s.release(&again).await.expect("release");
}

#[tokio::test]
async fn a_lock_delay_on_kernel_locks_is_refused_not_ignored() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    assert!(!s.capabilities().lock_delay);
    let mut r = req("delayed", 1, Wait::NoWait);
    r.lock_delay = Some(std::time::Duration::from_secs(5));
    let err = s
        .acquire(&r)
        .await
        .expect_err("a lock-delay on kernel locks");
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err:#}");
    assert!(err.to_string().contains("mode=lease"), "{err:#}");
    // Nothing was created, and a zero delay is no delay.
    assert!(s.list().await.expect("list").is_empty());
    r.lock_delay = Some(std::time::Duration::ZERO);
    let lease = s.acquire(&r).await.expect("no delay");
    s.release(&lease).await.expect("release");
}

#[tokio::test]
async fn a_record_beside_a_free_lock_reads_like_an_ended_lease() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let lease = s
        .acquire(&req("gone", 1, Wait::NoWait))
        .await
        .expect("acquire");
    let slot = tmp.path().join("gone/slot.0");
    let record = std::fs::read(&slot).expect("read");
    assert_eq!(
        s.release(&lease).await.expect("release"),
        Released::Released
    );
    // What a holder killed before releasing leaves: its record, and no lock.
    std::fs::write(&slot, &record).expect("write");
    let st = s.inspect(&lease.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Free);
    let note = st.slots[0].note.clone().unwrap_or_default();
    assert_eq!(
        note,
        format!(
            "free: the lease with token {} (pid {} on {}) was not released: its holder's \
             process exited; the next acquire reclaims it",
            lease.token.0, lease.holder.pid, lease.holder.host
        )
    );
    let c = s.capabilities();
    assert_eq!(c.bound, baton_core::Recovery::AtOnce);
    assert!(c.barrier && !c.renew);
}

#[tokio::test]
async fn list_passes_over_directories_that_are_not_keys_and_barriers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    s.acquire(&req("ok", 1, Wait::NoWait))
        .await
        .expect("acquire");
    std::fs::create_dir_all(tmp.path().join("+barriers/b")).expect("mkdir");
    std::fs::create_dir(tmp.path().join(".hidden")).expect("mkdir");
    let keys: Vec<String> = s
        .list()
        .await
        .expect("list")
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(keys, ["ok"]);
    // A folder that is not baton's (a mount point's lost+found) does not fail list.
    std::fs::create_dir(tmp.path().join("not a key")).expect("mkdir");
    std::fs::create_dir(tmp.path().join("lost+found")).expect("mkdir");
    let keys: Vec<String> = s
        .list()
        .await
        .expect("list")
        .iter()
        .map(|k| k.to_string())
        .collect();
    assert_eq!(keys, ["ok"]);
}

#[tokio::test]
async fn open_puts_every_error_in_context() {
    let tmp = tempfile::tempdir().expect("tmp");
    let url = StoreUrl::parse(&format!("dir:{}", tmp.path().display())).expect("url");
    let s = baton_store_dir::open(&url).expect("open");
    let err = s
        .inspect(&Key::new("missing").expect("key"))
        .await
        .expect_err("no such key");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(err.key(), Some("missing"));
    assert!(err.store().is_some() && err.op().is_some(), "{err:#}");
    assert!(err.message().starts_with("no such key"), "{err:#}");
}
