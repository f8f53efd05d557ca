//! Lease-file mode (`dir:PATH?mode=lease`): heartbeats, stale reclaim on the reader's
//! monotonic clock, race-free reclaim, break, and hostile files.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::{
    AcquireRequest, ErrorKind, Holder, Keeper, KeeperConfig, Key, LeaseState, Released, SlotState,
    Store, StoreUrl, Wait,
};
use baton_store_dir::{DirStore, LeaseStore};

fn url(dir: &std::path::Path) -> StoreUrl {
    StoreUrl::parse(&format!("dir:{}?mode=lease", dir.display())).expect("url")
}

fn store(dir: &std::path::Path) -> Arc<LeaseStore> {
    Arc::new(LeaseStore::open(&url(dir)).expect("open"))
}

fn req(key: &str, ttl_ms: u64, wait: Wait) -> AcquireRequest {
    let mut r = AcquireRequest::new(
        Key::new(key).expect("key"),
        Holder::current(vec!["test".into()]),
    );
    r.ttl = Some(Duration::from_millis(ttl_ms));
    r.wait = wait;
    r
}

#[tokio::test]
async fn grant_release_and_status() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let lease = s
        .acquire(&req("a/b", 5000, Wait::NoWait))
        .await
        .expect("acquire");
    assert_eq!(lease.ttl, Some(Duration::from_secs(5)));
    let st = s.inspect(&lease.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Held);
    assert_eq!(st.slots[0].token, Some(lease.token));
    assert_eq!(st.last_token, Some(lease.token));
    let err = store(tmp.path())
        .acquire(&req("a/b", 5000, Wait::NoWait))
        .await
        .expect_err("busy");
    assert_eq!(err.kind(), ErrorKind::Busy);
    s.renew(&lease).await.expect("renew");
    assert_eq!(
        s.release(&lease).await.expect("release"),
        Released::Released
    );
    assert_eq!(s.release(&lease).await.expect("again"), Released::NotHeld);
    let next = store(tmp.path())
        .acquire(&req("a/b", 5000, Wait::NoWait))
        .await
        .expect("free");
    assert!(next.token > lease.token);
    assert_eq!(
        s.list().await.expect("list"),
        vec![Key::new("a/b").expect("key")]
    );
}

#[tokio::test]
async fn a_silent_holder_is_reclaimed_after_its_ttl_and_learns_it_lost() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (store(tmp.path()), store(tmp.path()));
    let old = a.acquire(&req("k", 300, Wait::NoWait)).await.expect("a");
    // b has never seen the lease: a no-wait request cannot judge it stale.
    let err = b
        .acquire(&req("k", 300, Wait::NoWait))
        .await
        .expect_err("busy");
    assert_eq!(err.kind(), ErrorKind::Busy);
    let t0 = Instant::now();
    let new = b
        .acquire(&req("k", 300, Wait::Timeout(Duration::from_secs(20))))
        .await
        .expect("reclaimed");
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "only after a whole TTL of silence"
    );
    assert!(new.token > old.token);
    assert_eq!(
        a.renew(&old).await.expect_err("lost").kind(),
        ErrorKind::Lost
    );
    assert_eq!(a.release(&old).await.expect("release"), Released::NotHeld);
    let st = b.inspect(&new.key).await.expect("inspect");
    assert_eq!(
        st.slots[0].token,
        Some(new.token),
        "the stale release freed nothing"
    );
}

#[tokio::test]
async fn a_renewed_lease_is_never_reclaimed() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a: Arc<dyn Store> = store(tmp.path());
    let sent = Instant::now();
    let lease = a.acquire(&req("k", 300, Wait::NoWait)).await.expect("a");
    let keeper = Keeper::start(
        a.clone(),
        lease,
        KeeperConfig::for_ttl(Duration::from_millis(300)),
        sent,
    )
    .expect("keeper");
    let err = store(tmp.path())
        .acquire(&req("k", 300, Wait::Timeout(Duration::from_millis(1500))))
        .await
        .expect_err("still held");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(
        matches!(keeper.state(), LeaseState::Held { .. }),
        "{:?}",
        keeper.state()
    );
    keeper.stop();
}

#[tokio::test]
async fn a_dead_holder_on_this_host_is_reclaimed_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut dead = req("k", 60_000, Wait::NoWait);
    // Same host and boot, same pid, another start time: that process is gone.
    dead.holder.pid_start = dead.holder.pid_start.map(|t| t + 1);
    let old = store(tmp.path()).acquire(&dead).await.expect("dead holder");
    let st = store(tmp.path()).inspect(&old.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Free);
    let note = st.slots[0].note.clone().unwrap_or_default();
    assert!(
        note.contains(&format!("token {}", old.token.0))
            && note.contains("was not released: its holder's process exited"),
        "{note}"
    );
    let new = store(tmp.path())
        .acquire(&req("k", 60_000, Wait::NoWait))
        .await
        .expect("at once");
    assert!(new.token > old.token);
}

#[tokio::test]
async fn of_32_contenders_for_a_stale_lease_exactly_one_wins_even_with_one_paused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let _stale = store(tmp.path())
        .acquire(&req("k", 300, Wait::NoWait))
        .await
        .expect("holder");
    let paused = store(tmp.path());
    paused.set_reclaim_pause(Some(Duration::from_millis(1200)));
    let mut tasks = Vec::new();
    for i in 0..32 {
        let s = if i == 0 {
            paused.clone()
        } else {
            store(tmp.path())
        };
        tasks.push(tokio::spawn(async move {
            let s: Arc<dyn Store> = s;
            let sent = Instant::now();
            // Winners take a 1 s TTL so that a loaded machine cannot starve a live
            // winner's keeper into losing (which would rightly let a second one win).
            let got = s
                .acquire(&req("k", 1000, Wait::Timeout(Duration::from_secs(4))))
                .await;
            match got {
                Ok(lease) => {
                    // The winner keeps its lease alive, so nobody may win after it.
                    let keeper = Keeper::start(
                        s.clone(),
                        lease.clone(),
                        KeeperConfig::for_ttl(Duration::from_secs(1)),
                        sent,
                    )
                    .expect("keeper");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let state = keeper.state();
                    keeper.stop();
                    Ok((lease, state))
                }
                Err(e) => Err(e.kind()),
            }
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.expect("join") {
            Ok(w) => winners.push(w),
            Err(kind) => assert_eq!(kind, ErrorKind::Timeout),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one winner: {winners:?}");
    assert!(
        matches!(winners[0].1, LeaseState::Held { .. }),
        "the winner kept it: {:?}",
        winners[0].1
    );
    assert_eq!(
        paused.reclaim_pauses(),
        1,
        "the paused contender judged the lease stale and paused"
    );
    let st = store(tmp.path())
        .inspect(&Key::new("k").expect("key"))
        .await
        .expect("inspect");
    assert_eq!(st.slots[0].token, Some(winners[0].0.token));
}

#[tokio::test]
async fn wall_clock_fields_never_decide() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let lease = s
        .acquire(&req("k", 5000, Wait::NoWait))
        .await
        .expect("acquire");
    // Make the lease look ancient by its wall-clock fields (as after a clock jump).
    let file = tmp.path().join("k").join("slot.0.1");
    let text = std::fs::read_to_string(&file).expect("lease file");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    v["renewed_unix_ms"] = 0.into();
    v["acquired_unix_ms"] = 0.into();
    std::fs::write(&file, v.to_string()).expect("rewrite");
    let err = store(tmp.path())
        .acquire(&req("k", 5000, Wait::Timeout(Duration::from_millis(400))))
        .await
        .expect_err("still held");
    assert_eq!(err.kind(), ErrorKind::Timeout);
    s.renew(&lease).await.expect("still ours");
}

#[tokio::test]
async fn break_frees_the_slot_and_the_holder_learns_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = store(tmp.path());
    let lease = a.acquire(&req("k", 60_000, Wait::NoWait)).await.expect("a");
    let b = store(tmp.path());
    let broken = b
        .break_lease(&lease.key, Some(baton_core::HolderId::random()))
        .await
        .expect("break other");
    assert!(
        broken.is_empty(),
        "a holder id that holds nothing breaks nothing"
    );
    let broken = b
        .break_lease(&lease.key, Some(lease.holder.id))
        .await
        .expect("break");
    assert_eq!(broken.len(), 1);
    assert_eq!(broken[0].token, Some(lease.token));
    assert_eq!(
        a.renew(&lease).await.expect_err("lost").kind(),
        ErrorKind::Lost
    );
    let next = b
        .acquire(&req("k", 60_000, Wait::NoWait))
        .await
        .expect("free");
    assert!(next.token > lease.token);
}

#[tokio::test]
async fn hostile_lease_files_get_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let lease = s
        .acquire(&req("g", 60_000, Wait::NoWait))
        .await
        .expect("acquire");
    std::fs::write(tmp.path().join("g/slot.0.1"), b"\x00garbage").expect("junk");
    let err = store(tmp.path())
        .acquire(&req("g", 60_000, Wait::NoWait))
        .await
        .expect_err("corrupt");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err:#}");
    let st = s.inspect(&lease.key).await.expect("status still works");
    assert!(
        st.slots[0]
            .note
            .as_deref()
            .unwrap_or("")
            .contains("unreadable"),
        "{st:?}"
    );

    std::fs::create_dir(tmp.path().join("l")).expect("mkdir");
    std::fs::write(tmp.path().join("l/limit"), "1\n").expect("limit");
    let outside = tempfile::tempdir().expect("outside");
    std::fs::write(outside.path().join("x"), "{}").expect("x");
    std::os::unix::fs::symlink(outside.path().join("x"), tmp.path().join("l/slot.0.1"))
        .expect("symlink");
    let err = s
        .acquire(&req("l", 60_000, Wait::NoWait))
        .await
        .expect_err("symlink");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err:#}");
}

#[tokio::test]
async fn the_two_modes_never_share_a_store() {
    let tmp = tempfile::tempdir().expect("tmp");
    let _lease_mode = store(tmp.path());
    let kernel = StoreUrl::parse(&format!("dir:{}", tmp.path().display())).expect("url");
    let err = DirStore::open(&kernel).expect_err("mode mismatch");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("mode=lease"), "{err}");
}

#[tokio::test]
async fn resize_lowers_without_evicting_and_raises_at_once() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let mut r = req("sem", 60_000, Wait::NoWait);
    r.limit = 3;
    let held: Vec<_> = fill(&s, &r, 3).await;
    let key = Key::new("sem").expect("key");
    // Lower to 1: all three keep their slots; no new grant until they drain below 1.
    let st = store(tmp.path())
        .resize(&key, baton_core::Resize::To(1))
        .await
        .expect("resize");
    assert_eq!(st.limit, 1);
    assert_eq!(st.held(), 3, "nobody evicted");
    let mut one = r.clone();
    one.limit = 1;
    for lease in &held[..2] {
        s.release(lease).await.expect("release");
        let err = store(tmp.path())
            .acquire(&one)
            .await
            .expect_err("still full");
        assert_eq!(err.kind(), ErrorKind::Busy);
    }
    s.release(&held[2]).await.expect("release");
    let got = store(tmp.path())
        .acquire(&one)
        .await
        .expect("drained: one grant");
    assert_eq!(got.slot, 0);
    // The old limit is refused now, naming the new one.
    let err = store(tmp.path()).acquire(&r).await.expect_err("mismatch");
    assert_eq!(err.current_limit(), Some(1));
    // Raise to 2: a second grant at once.
    store(tmp.path())
        .resize(&key, baton_core::Resize::To(2))
        .await
        .expect("raise");
    let mut two = r.clone();
    two.limit = 2;
    let second = store(tmp.path()).acquire(&two).await.expect("raised");
    assert_eq!(second.slot, 1);
    assert_eq!(
        store(tmp.path())
            .resize(&key, baton_core::Resize::To(0))
            .await
            .expect_err("zero")
            .kind(),
        ErrorKind::InvalidInput
    );
}

async fn fill(s: &Arc<LeaseStore>, r: &AcquireRequest, n: usize) -> Vec<baton_core::Lease> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut r = r.clone();
        r.holder = Holder::current(vec!["test".into()]);
        out.push(s.acquire(&r).await.expect("fill"));
    }
    out
}

fn delayed(key: &str, ttl_ms: u64, delay_ms: u64, wait: Wait) -> AcquireRequest {
    let mut r = req(key, ttl_ms, wait);
    r.lock_delay = Some(Duration::from_millis(delay_ms));
    r
}

#[tokio::test]
async fn lock_delay_is_kept_with_the_key_and_shown() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let a = s
        .acquire(&delayed("d", 5000, 1500, Wait::NoWait))
        .await
        .expect("acquire");
    assert!(s.capabilities().lock_delay);
    assert_eq!(
        s.inspect(&a.key).await.expect("inspect").lock_delay_ms,
        Some(1500)
    );
    s.release(&a).await.expect("release");
    // A later request with another delay does not change the key's; resize keeps it.
    let b = s
        .acquire(&delayed("d", 5000, 9000, Wait::NoWait))
        .await
        .expect("a clean release never waits");
    s.release(&b).await.expect("release");
    s.resize(&a.key, baton_core::Resize::To(3))
        .await
        .expect("resize");
    let st = s.inspect(&a.key).await.expect("inspect");
    assert_eq!((st.limit, st.lock_delay_ms), (3, Some(1500)));
    // A key created without one has none.
    let c = s
        .acquire(&req("plain", 5000, Wait::NoWait))
        .await
        .expect("acquire");
    assert_eq!(
        s.inspect(&c.key).await.expect("inspect").lock_delay_ms,
        None
    );
}

#[tokio::test]
async fn broken_lease_is_held_back_and_a_waiter_sleeps_until_the_delay_ends() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let a = s
        .acquire(&delayed("d", 5000, 800, Wait::NoWait))
        .await
        .expect("acquire");
    let broke = Instant::now();
    assert_eq!(s.break_lease(&a.key, None).await.expect("break").len(), 1);
    let err = store(tmp.path())
        .acquire(&delayed("d", 5000, 800, Wait::NoWait))
        .await
        .expect_err("held back");
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("lock-delay of 800ms"), "{err:#}");
    let note = s.inspect(&a.key).await.expect("inspect").slots[0]
        .note
        .clone()
        .unwrap_or_default();
    assert!(note.starts_with("held back"), "{note}");
    let b = store(tmp.path())
        .acquire(&delayed(
            "d",
            5000,
            800,
            Wait::Timeout(Duration::from_secs(30)),
        ))
        .await
        .expect("granted after the delay");
    assert!(broke.elapsed() >= Duration::from_millis(800));
    assert!(b.token > a.token);
    assert_eq!(s.release(&a).await.expect("release"), Released::NotHeld);
}

#[tokio::test]
async fn garbage_lock_delay_state_is_corrupt_and_frees_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let a = s
        .acquire(&delayed("d", 5000, 60_000, Wait::NoWait))
        .await
        .expect("acquire");
    s.break_lease(&a.key, None).await.expect("break");
    let dir = tmp.path().join("d");
    let stamp = std::fs::read_dir(&dir)
        .expect("key dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seen."))
        })
        .expect("the breaker's lock-delay stamp");
    for garbage in ["", "soon\n", "-1\n", "99999999999999999999\n"] {
        std::fs::write(&stamp, garbage).expect("damage the stamp");
        let err = store(tmp.path())
            .acquire(&delayed("d", 5000, 1, Wait::NoWait))
            .await
            .expect_err("a garbage stamp");
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{garbage:?}: {err:#}");
    }
    std::fs::write(dir.join("limit"), "1\nlock-delay-ms soon\n").expect("damage the limit");
    let err = store(tmp.path())
        .acquire(&delayed("d", 5000, 1, Wait::NoWait))
        .await
        .expect_err("a garbage delay");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err:#}");
}

#[tokio::test]
async fn a_held_slot_shows_its_last_heartbeat_and_an_expiry_estimate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    let lease = s
        .acquire(&req("hb", 5000, Wait::NoWait))
        .await
        .expect("acquire");
    let first = s.inspect(&lease.key).await.expect("inspect").slots[0].clone();
    assert_eq!(first.state, SlotState::Held);
    let renewed = first.renewed_unix_ms.expect("renewed_unix_ms");
    assert_eq!(first.since_unix_ms, Some(renewed));
    assert_eq!(first.expires_unix_ms, Some(renewed + 5000));
    std::thread::sleep(Duration::from_millis(20));
    s.renew(&lease).await.expect("renew");
    let after = s.inspect(&lease.key).await.expect("inspect").slots[0].clone();
    let renewed_again = after.renewed_unix_ms.expect("renewed_unix_ms");
    assert!(renewed_again > renewed, "{renewed_again} > {renewed}");
    assert_eq!(after.expires_unix_ms, Some(renewed_again + 5000));
    let c = s.capabilities();
    assert!(c.renew && c.break_lease && c.resize && c.lock_delay && c.barrier);
    assert!(!c.fifo && !c.waiters);
}

#[tokio::test]
async fn ttls_outside_the_one_policy_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = store(tmp.path());
    for ttl_ms in [9, 7 * 24 * 3600 * 1000 + 1] {
        let err = s
            .acquire(&req("ttl", ttl_ms, Wait::NoWait))
            .await
            .expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err:#}");
        assert!(err.message().contains("between 10ms and"), "{err:#}");
    }
}
