//! What only the ZooKeeper store has: the semaphore's wake-ups when holders release out
//! of order (why a waiter watches the `limit` nodes ahead, not only the one `limit`
//! places ahead), a mutex release that wakes one waiter of many, a clear error in a
//! forked child, and its URL errors.
//! Runs on `BATON_TEST_ZK`.

use std::sync::Arc;
use std::time::Duration;

use baton_core::{AcquireRequest, ErrorKind, Holder, Key, Released, Store, StoreUrl, Wait};

/// A hang guard only (never a timing threshold): far beyond any grant here.
const GUARD: Duration = Duration::from_secs(60);

/// The test server's URL under a prefix of this test's own.
fn url() -> Option<StoreUrl> {
    let url = match baton_conformance::servers::url_from_env("BATON_TEST_ZK") {
        Ok(u) => u,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return None;
        }
    };
    let prefix = format!("st-{:x}", baton_core::HolderId::random().0 as u64);
    StoreUrl::parse(&format!("{}/{prefix}", url.trim_end_matches('/'))).ok()
}

fn store() -> Option<Arc<dyn Store>> {
    Some(baton_store_zk::open(&url()?).expect("open"))
}

fn req(key: &Key, limit: u32, wait: Wait) -> AcquireRequest {
    let mut r = AcquireRequest::new(key.clone(), Holder::current(vec!["store-test".into()]));
    r.limit = limit;
    r.wait = wait;
    r.ttl = Some(Duration::from_secs(10));
    r
}

/// Waits until the store counts `n` waiters on `key` (a hang guard, not a threshold).
async fn queued(s: &Arc<dyn Store>, key: &Key, n: u32) {
    let look = async {
        while s.inspect(key).await.expect("inspect").waiters != Some(n) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(GUARD, look)
        .await
        .unwrap_or_else(|_| panic!("the store never counted {n} waiter(s)"));
}

/// Limit 2, holders A (first) and B, waiters C and D. B releases first: C, with A and B
/// ahead, must be granted (a waiter that watched only the node two places ahead, A,
/// would sleep on). Then A releases: D is granted. Grants keep queue order.
#[tokio::test(flavor = "multi_thread")]
async fn a_semaphore_waiter_wakes_when_holders_release_out_of_order() {
    let Some(s) = store() else { return };
    let key = Key::new("store/out-of-order").expect("key");
    let a = s.acquire(&req(&key, 2, Wait::NoWait)).await.expect("a");
    let b = s.acquire(&req(&key, 2, Wait::NoWait)).await.expect("b");
    let (s2, k2) = (Arc::clone(&s), key.clone());
    let c = tokio::spawn(async move { s2.acquire(&req(&k2, 2, Wait::Forever)).await });
    // C is queued before D: wait until the store counts it.
    queued(&s, &key, 1).await;
    let (s3, k3) = (Arc::clone(&s), key.clone());
    let d = tokio::spawn(async move { s3.acquire(&req(&k3, 2, Wait::Forever)).await });
    queued(&s, &key, 2).await;
    assert_eq!(s.release(&b).await.expect("release b"), Released::Released);
    let c = tokio::time::timeout(GUARD, c)
        .await
        .expect("C was never woken after B released out of order")
        .expect("task")
        .expect("c");
    assert_eq!(c.slot, b.slot, "C takes the slot B freed");
    assert!(c.token > a.token && c.token > b.token, "C's token rises");
    assert!(
        !d.is_finished(),
        "D passed C or was granted with every slot held"
    );
    assert_eq!(s.release(&a).await.expect("release a"), Released::Released);
    let d = tokio::time::timeout(GUARD, d)
        .await
        .expect("D was never woken after A released")
        .expect("task")
        .expect("d");
    assert!(d.token > c.token, "D's token rises");
    for l in [c, d] {
        assert_eq!(s.release(&l).await.expect("release"), Released::Released);
    }
    let st = s.inspect(&key).await;
    assert!(
        st.as_ref()
            .map_or(true, |st| st.held() == 0 && st.waiters == Some(0)),
        "{st:?}"
    );
}

/// A mutex with a holder and 6 waiters (each its own session, all through one handle):
/// every release wakes exactly one waiter, the next in line, and the others sleep on.
#[tokio::test(flavor = "multi_thread")]
async fn a_mutex_release_wakes_one_waiter() {
    let Some(url) = url() else { return };
    let s = Arc::new(baton_store_zk::ZkStore::open(&url).expect("open"));
    let dyn_s: Arc<dyn Store> = s.clone();
    let key = Key::new("store/one-wake").expect("key");
    let mut held = s.acquire(&req(&key, 1, Wait::NoWait)).await.expect("first");
    let mut waiters = Vec::new();
    for i in 0..6u32 {
        let (s2, k2) = (Arc::clone(&s), key.clone());
        waiters.push(tokio::spawn(async move {
            s2.acquire(&req(&k2, 1, Wait::Forever)).await
        }));
        queued(&dyn_s, &key, i + 1).await;
    }
    // Every waiter has looked and is asleep on its watch.
    let mut woken = s.wakeups();
    for (i, w) in waiters.into_iter().enumerate() {
        assert_eq!(s.release(&held).await.expect("release"), Released::Released);
        let next = tokio::time::timeout(GUARD, w)
            .await
            .unwrap_or_else(|_| panic!("waiter {i} was never granted"))
            .expect("task")
            .expect("grant");
        assert!(next.token > held.token, "tokens rise");
        assert_eq!(
            s.wakeups() - woken,
            1,
            "release {i} woke {} waiters, not one",
            s.wakeups() - woken
        );
        woken = s.wakeups();
        held = next;
    }
    assert_eq!(s.release(&held).await.expect("release"), Released::Released);
}

/// A forked child of a process that used the client cannot connect (`async-io`'s
/// process-wide reactor keeps its driver thread in the parent): it is told so at once,
/// with the way out, instead of hanging until a timeout.
#[test]
fn a_forked_child_is_told_why_it_cannot_connect() {
    let Some(url) = url() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let s = baton_store_zk::open(&url).expect("open");
    let key = Key::new("store/fork").expect("key");
    let lease = rt
        .block_on(s.acquire(&req(&key, 1, Wait::NoWait)))
        .expect("the parent's grant");
    rt.block_on(s.release(&lease)).expect("release");
    // SAFETY: the child only builds a runtime, opens the store and exits with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let s = baton_store_zk::open(&url).expect("open");
            let started = std::time::Instant::now();
            match rt.block_on(s.acquire(&req(&key, 1, Wait::NoWait))) {
                Err(e)
                    if e.kind() == ErrorKind::Unavailable
                        && format!("{e:#}").contains("forked child")
                        && started.elapsed() < Duration::from_secs(1) =>
                {
                    0
                }
                other => {
                    eprintln!("child: {other:?} after {:?}", started.elapsed());
                    1
                }
            }
        })
        .unwrap_or(2);
        // SAFETY: ends the child without running the parent's destructors or test harness.
        unsafe { libc::_exit(code) };
    }
    // A hang guard: the child must answer long before this.
    let mut status = 0;
    let deadline = std::time::Instant::now() + GUARD;
    loop {
        // SAFETY: waits for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the forked child hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the forked child was not told clearly why it cannot connect (status {status})"
    );
}

#[test]
fn bad_urls_are_refused_clearly() {
    for u in [
        "zk://h:2181/zookeeper",
        "zk://h:notaport",
        "zk://h?timeout=0s",
        "zk://user:pw@h",
    ] {
        let url = match StoreUrl::parse(u) {
            Ok(url) => url,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::InvalidInput, "{u}: {e}");
                continue;
            }
        };
        let e = baton_store_zk::open(&url).expect_err(u);
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{u}: {e}");
        assert!(!format!("{e:#}").contains("pw"), "{u}: {e:#}");
    }
}
