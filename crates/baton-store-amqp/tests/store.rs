//! RabbitMQ-specific tests on the broker `scripts/test` starts (`BATON_TEST_AMQP`), and on
//! private brokers for the crash: what the store's design rests on, checked on the real
//! broker (README, "Verified on the broker").

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_conformance::servers::Server;
use baton_core::{AcquireRequest, ErrorKind, Holder, Key, Released, Store, StoreUrl, Wait};

/// A store under a prefix of its own on the shared broker (or at `url`), or `None` (a
/// skip; a failure under CI=true) when there is none.
fn store(tag: &str) -> Option<Arc<dyn Store>> {
    let url = match baton_conformance::servers::url_from_env("BATON_TEST_AMQP") {
        Ok(u) => u,
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{tag}: CI=true and {why}"
            );
            baton_conformance::skipped(tag, &why);
            return None;
        }
    };
    Some(store_at(&url))
}

fn store_at(url: &str) -> Arc<dyn Store> {
    let prefix = format!(
        "s-{}-{:x}",
        std::process::id(),
        baton_core::HolderId::random().0 as u64
    );
    let u = StoreUrl::parse(&format!("{url}?prefix={prefix}")).expect("url");
    baton_store_amqp::open(&u).expect("open")
}

fn req(key: &str, limit: u32, wait: Wait, ttl: Duration) -> AcquireRequest {
    let mut r = AcquireRequest::new(
        Key::new(key).expect("key"),
        Holder::current(vec!["test".into()]),
    );
    r.limit = limit;
    r.wait = wait;
    r.ttl = Some(ttl);
    r
}

const TTL: Duration = Duration::from_secs(10);

/// A waiting acquire is counted (on a channel without a prefetch limit: the broker counts
/// only consumers that could take a message), and no longer once granted.
#[tokio::test(flavor = "multi_thread")]
async fn a_waiter_is_counted_until_granted() {
    let Some(s) = store("a_waiter_is_counted_until_granted") else {
        return;
    };
    let key = Key::new("w").expect("key");
    let held = s
        .acquire(&req("w", 1, Wait::NoWait, TTL))
        .await
        .expect("first");
    let s2 = Arc::clone(&s);
    let t = tokio::spawn(async move { s2.acquire(&req("w", 1, Wait::Forever, TTL)).await });
    let start = Instant::now();
    while s.inspect(&key).await.expect("inspect").waiters != Some(1) {
        assert!(start.elapsed() < Duration::from_secs(10), "never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.release(&held).await.expect("release"), Released::Released);
    let l = t.await.expect("task").expect("granted");
    assert!(l.token > held.token);
    let st = s.inspect(&key).await.expect("inspect");
    assert_eq!(st.waiters, Some(0), "{st:?}");
    assert_eq!(st.held(), 1, "{st:?}");
    s.release(&l).await.expect("release");
}

/// Every way a grant ends hands the gate message on and so raises the token: a release,
/// a holder whose connection closed without a release (its store handle dropped), a
/// timed-out request that held the gate while it waited for a slot, and a cancelled one.
/// A slot lost without a release is held back for the lost lease's TTL: a no-wait
/// request is Busy meanwhile, a waiting one is granted after it.
#[tokio::test(flavor = "multi_thread")]
async fn every_way_a_grant_ends_raises_the_token() {
    let Some(s) = store("every_way_a_grant_ends_raises_the_token") else {
        return;
    };
    let ttl = Duration::from_secs(2);
    let mut last = s
        .acquire(&req("ends", 1, Wait::NoWait, ttl))
        .await
        .expect("first");
    // A release.
    s.release(&last).await.expect("release");
    let next = s
        .acquire(&req("ends", 1, Wait::NoWait, ttl))
        .await
        .expect("after a release");
    assert!(next.token > last.token, "{next:?} after {last:?}");
    last = next;
    // A timed-out request: it holds the gate while it waits for the held slot.
    let e = s
        .acquire(&req(
            "ends",
            1,
            Wait::Timeout(Duration::from_millis(300)),
            ttl,
        ))
        .await
        .expect_err("held");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e:#}");
    // A cancelled one.
    let _ = tokio::time::timeout(
        Duration::from_millis(300),
        s.acquire(&req("ends", 1, Wait::Forever, ttl)),
    )
    .await
    .expect_err("still held");
    s.release(&last).await.expect("release");
    let next = s
        .acquire(&req("ends", 1, Wait::NoWait, ttl))
        .await
        .expect("after a timeout and a cancel");
    assert!(next.token.0 > last.token.0 + 2, "{next:?} after {last:?}");
    last = next;
    // A holder whose connection closed without a release: the slot is held back.
    let url = s.url().clone();
    let other = baton_store_amqp::open(&url).expect("open");
    s.release(&last).await.expect("release");
    let theirs = other
        .acquire(&req("ends", 1, Wait::NoWait, ttl))
        .await
        .expect("theirs");
    assert!(theirs.token > last.token);
    drop(other);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let e = s
        .acquire(&req("ends", 1, Wait::NoWait, ttl))
        .await
        .expect_err("held back");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e:#}");
    let start = Instant::now();
    let next = s
        .acquire(&req("ends", 1, Wait::Timeout(Duration::from_secs(30)), ttl))
        .await
        .expect("after the hold-back");
    assert!(next.token > theirs.token, "{next:?} after {theirs:?}");
    // The no-wait request above left the hold-back to its connection, which marks the
    // slot released when the TTL is over: the wait is at most about the TTL.
    assert!(
        start.elapsed() < ttl + Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    s.release(&next).await.expect("release");
}

/// Fencing across a broker crash (kill -9 and a start on the same data): tokens of a key
/// whose queues had a few seconds to settle keep rising (the quorum queue keeps the gate
/// message's delivery count). A clean restart is the conformance suite's
/// `restart_keeps_tokens_rising`.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_rise_across_a_broker_crash() {
    if store("tokens_rise_across_a_broker_crash").is_none() {
        return;
    }
    let server = Server::start("rabbitmq", "start", "stop").expect("a private broker");
    let s = store_at(server.url());
    for limit in [1, 3] {
        let key = format!("crash-{limit}");
        for _ in 0..3 {
            let l = s
                .acquire(&req(&key, limit, Wait::NoWait, TTL))
                .await
                .expect("before");
            s.release(&l).await.expect("release");
        }
    }
    // RabbitMQ 3.10.8 can lose a quorum queue younger than about a second to kill -9
    // (README): let them settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| server.run("crash")).expect("crash");
    for limit in [1, 3] {
        let key = format!("crash-{limit}");
        let start = Instant::now();
        let l = loop {
            match s
                .acquire(&req(
                    &key,
                    limit,
                    Wait::Timeout(Duration::from_secs(30)),
                    TTL,
                ))
                .await
            {
                Ok(l) => break l,
                Err(e) if e.kind() == ErrorKind::Unavailable => {
                    assert!(start.elapsed() < Duration::from_secs(60), "{e:#}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("after the crash: {e:#}"),
            }
        };
        assert!(l.token.0 > 3, "'{key}': token {} after 3 grants", l.token);
        s.release(&l).await.expect("release");
    }
}

/// A handle's admin connection outlives its channel numbers wrapping (past the broker's
/// `channel_max`, 2047): a look at a key not made yet, whose channel the broker closed,
/// is not answered again thousands of channels later. Without the admin connection's
/// replacement the 683rd grant in a row on one handle failed with "no queue …gate".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_at_a_missing_key_is_not_answered_again_after_many_looks() {
    let Some(s) = store("a_look_at_a_missing_key_is_not_answered_again_after_many_looks") else {
        return;
    };
    let ttl = Duration::from_secs(30);
    // The first no-wait request looks for the key's gate before it exists.
    let l = s
        .acquire(&req("wrap/key", 1, Wait::NoWait, ttl))
        .await
        .expect("the first grant");
    s.release(&l).await.expect("release");
    let key = Key::new("wrap/key").expect("key");
    for i in 0..2200 {
        s.inspect(&key)
            .await
            .unwrap_or_else(|e| panic!("status {i}: {e:#}"));
    }
    let again = s
        .acquire(&req("wrap/key", 1, Wait::NoWait, ttl))
        .await
        .unwrap_or_else(|e| panic!("a grant after many looks: {e:#}"));
    assert!(again.token > l.token);
    s.release(&again).await.expect("release");
}
