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

/// The queues of `names` under `prefix` on the broker at `url` that exist, with their
/// ready messages (passive declarations, each on a channel of its own).
async fn existing(url: &str, names: &[String]) -> Vec<(String, u32)> {
    let u = StoreUrl::parse(url).expect("url");
    let c = baton_store_amqp::AmqpConfig::from_url(&u).expect("config");
    let uri = c.uri(None);
    let conn = lapin::Connection::connect_uri(uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let mut out = Vec::new();
    for n in names {
        let ch = conn.create_channel().await.expect("channel");
        let opts = lapin::options::QueueDeclareOptions {
            passive: true,
            ..lapin::options::QueueDeclareOptions::default()
        };
        if let Ok(q) = ch
            .queue_declare(n.as_str().into(), opts, lapin::types::FieldTable::default())
            .await
        {
            out.push((n.clone(), q.message_count()));
            let _ = ch.close(200, "OK".into()).await;
        }
    }
    let _ = conn.close(200, "OK".into()).await;
    out
}

/// A store under a prefix of its own at `url`, and the prefix.
fn store_and_prefix(url: &str) -> (Arc<dyn Store>, String) {
    let prefix = format!(
        "d-{}-{:x}",
        std::process::id(),
        baton_core::HolderId::random().0 as u64
    );
    let u = StoreUrl::parse(&format!("{url}?prefix={prefix}")).expect("url");
    (baton_store_amqp::open(&u).expect("open"), prefix)
}

/// Every queue a key of `limit` slots can have (its proof queues aside, which live only
/// as long as a grant's connection), and its floor.
fn key_queues(prefix: &str, key: &str, limit: u32) -> Vec<String> {
    let base = format!("{prefix}.k.{key}");
    let mut v: Vec<String> = ["gate", "slots", "waiters", "meta", "init"]
        .iter()
        .map(|q| format!("{base}.{q}"))
        .collect();
    v.extend((0..limit).map(|s| format!("{base}.rec.{s}")));
    v.push(format!("{prefix}.floor.{key}"));
    v
}

/// A deleted key's token floor outlives the key and a broker restart: delete leaves
/// nothing of the key but its floor queue (one message), and the key made again after
/// a restart grants tokens above every token it granted before.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_rise_across_a_delete_and_a_broker_restart() {
    if store("tokens_rise_across_a_delete_and_a_broker_restart").is_none() {
        return;
    }
    let server = Server::start("rabbitmq", "start", "stop").expect("a private broker");
    let (s, prefix) = store_and_prefix(server.url());
    let key = Key::new("del/key").expect("key");
    let mut last = 0;
    for _ in 0..4 {
        let l = s
            .acquire(&req("del/key", 2, Wait::NoWait, TTL))
            .await
            .expect("before");
        assert!(l.token.0 > last, "{} after {last}", l.token);
        last = l.token.0;
        s.release(&l).await.expect("release");
    }
    s.delete(&key).await.expect("delete");
    let left = existing(server.url(), &key_queues(&prefix, "del/key", 2)).await;
    assert_eq!(
        left,
        vec![(format!("{prefix}.floor.del/key"), 1)],
        "delete must leave only the floor"
    );
    tokio::task::block_in_place(|| server.run("restart")).expect("restart");
    let start = Instant::now();
    let l = loop {
        match s
            .acquire(&req(
                "del/key",
                1,
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
            Err(e) => panic!("after the restart: {e:#}"),
        }
    };
    assert!(
        l.token.0 > last,
        "the key made again after a delete and a restart granted token {} after {last}",
        l.token
    );
    assert_eq!(s.inspect(&key).await.expect("status").limit, 1);
    s.release(&l).await.expect("release");
    // And once more, without a restart: the floor of the second life is above the first.
    last = l.token.0;
    s.delete(&key).await.expect("the second delete");
    let again = s
        .acquire(&req("del/key", 1, Wait::NoWait, TTL))
        .await
        .expect("the third life");
    assert!(again.token.0 > last, "{} after {last}", again.token);
    s.release(&again).await.expect("release");
}

/// A lost lease's slot (its holder's connection ended without a release) is held back,
/// so delete refuses the key (its holder may still be at work) until a request has
/// waited out the TTL and released it.
#[tokio::test(flavor = "multi_thread")]
async fn delete_refuses_a_held_back_slot() {
    let Some(s) = store("delete_refuses_a_held_back_slot") else {
        return;
    };
    let ttl = Duration::from_secs(1);
    let key = Key::new("back").expect("key");
    let other = baton_store_amqp::open(s.url()).expect("open");
    let theirs = other
        .acquire(&req("back", 1, Wait::NoWait, ttl))
        .await
        .expect("theirs");
    drop(other);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = s.delete(&key).await.expect_err("a lost slot");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e:#}");
    assert!(e.to_string().contains("held back"), "{e:#}");
    let l = s
        .acquire(&req("back", 1, Wait::Timeout(Duration::from_secs(10)), ttl))
        .await
        .expect("after the hold-back");
    assert!(l.token > theirs.token);
    let e = s.delete(&key).await.expect_err("held");
    assert!(e.to_string().contains("1 slot(s) held"), "{e:#}");
    s.release(&l).await.expect("release");
    s.delete(&key).await.expect("delete");
}

/// Deletes racing acquires: every waiting acquire is granted (one whose key was deleted
/// under it makes the key anew), none hangs, no two hold the one slot at once, every
/// grant is released as held, and the tokens rise in the order of the grants across
/// every life of the key. Some deletes succeed; the others are refused as in use (or
/// find no key). At the end nothing of the key is left but its floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletes_racing_acquires_lose_and_duplicate_no_grant() {
    let Some(_) = store("deletes_racing_acquires_lose_and_duplicate_no_grant") else {
        return;
    };
    let url = baton_conformance::servers::url_from_env("BATON_TEST_AMQP").expect("url");
    let (s, prefix) = store_and_prefix(&url);
    let key = Key::new("race").expect("key");
    let holding = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    const ROUNDS: usize = 25;
    let run = async {
        let mut tasks = Vec::new();
        for w in 0..3usize {
            let (s, holding, tokens) = (Arc::clone(&s), Arc::clone(&holding), Arc::clone(&tokens));
            tasks.push(tokio::spawn(async move {
                let mut granted = 0;
                for i in 0..ROUNDS {
                    // One worker asks without waiting; Busy is its only refusal.
                    let wait = if w == 0 {
                        Wait::NoWait
                    } else {
                        Wait::Timeout(Duration::from_secs(30))
                    };
                    let l = match s.acquire(&req("race", 1, wait, TTL)).await {
                        Ok(l) => l,
                        Err(e) if w == 0 && e.kind() == ErrorKind::Busy => continue,
                        Err(e) => panic!("worker {w}, round {i}: {e:#}"),
                    };
                    let before = holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    assert_eq!(before, 0, "two holders of the one slot");
                    tokens.lock().expect("tokens").push(l.token.0);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    holding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    assert_eq!(
                        s.release(&l).await.expect("release"),
                        Released::Released,
                        "worker {w}: a grant was lost"
                    );
                    granted += 1;
                    tokio::time::sleep(Duration::from_millis(10 + 7 * (i as u64 % 5))).await;
                }
                granted
            }));
        }
        let deleter = {
            let (s, key, done) = (Arc::clone(&s), key.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                let (mut ok, mut busy, mut missing) = (0, 0, 0);
                let mut i = 0u64;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    i += 1;
                    match s.delete(&key).await {
                        Ok(()) => ok += 1,
                        Err(e) if e.kind() == ErrorKind::Busy => {
                            assert!(e.to_string().contains("in use"), "{e:#}");
                            busy += 1
                        }
                        Err(e) if e.kind() == ErrorKind::NotFound => missing += 1,
                        Err(e) => panic!("delete {i}: {e:#}"),
                    }
                    tokio::time::sleep(Duration::from_millis(2 + i % 11)).await;
                }
                (ok, busy, missing)
            })
        };
        let mut granted = 0;
        for t in tasks {
            granted += t.await.expect("worker");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (granted, deleter.await.expect("deleter"))
    };
    let (granted, (ok, busy, missing)) = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("a request or a delete hung");
    eprintln!("{granted} grants; deletes: {ok} done, {busy} in use, {missing} no key");
    assert!(
        granted >= 2 * ROUNDS,
        "the waiting workers were not all granted"
    );
    assert!(ok > 0, "no delete succeeded: the race was not run");
    let tokens = tokens.lock().expect("tokens").clone();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens did not rise in grant order: {tokens:?}"
    );
    // Idle now: the last delete succeeds (or the key is gone already).
    match s.delete(&key).await {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => panic!("the last delete: {e:#}"),
    }
    assert_eq!(
        s.inspect(&key).await.expect_err("gone").kind(),
        ErrorKind::NotFound
    );
    assert!(!s.list().await.expect("list").contains(&key));
    let left = existing(&url, &key_queues(&prefix, "race", 1)).await;
    assert_eq!(left, vec![(format!("{prefix}.floor.race"), 1)], "orphans");
}

/// Waits until `cond` holds of the key's status (10 s at most).
async fn until_status(
    s: &Arc<dyn Store>,
    key: &Key,
    what: &str,
    cond: impl Fn(&baton_core::KeyStatus) -> bool,
) {
    let start = Instant::now();
    loop {
        let st = s.inspect(key).await.expect("inspect");
        if cond(&st) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{what}: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// amqp-locks' use: a greedy acquirer waits on a key of one slot while another holds it;
/// `resize +1` grants it at once, beside the holder; `resize -1` evicts nobody (both
/// renew), and with the holder below the limit gone, the one above it still counts:
/// nobody else is granted until both released, and then one at a time.
#[tokio::test(flavor = "multi_thread")]
async fn a_waiter_is_granted_by_a_raised_limit_and_a_lowered_one_evicts_nobody() {
    let Some(s) = store("a_waiter_is_granted_by_a_raised_limit") else {
        return;
    };
    let key = Key::new("greedy").expect("key");
    let first = s
        .acquire(&req("greedy", 1, Wait::NoWait, TTL))
        .await
        .expect("first");
    let s2 = Arc::clone(&s);
    let waiter =
        tokio::spawn(async move { s2.acquire(&req("greedy", 1, Wait::Forever, TTL)).await });
    until_status(&s, &key, "the waiter is counted", |st| {
        st.waiters == Some(1)
    })
    .await;

    let st = s
        .resize(&key, baton_core::Resize::By(1))
        .await
        .expect("resize +1");
    assert_eq!(st.limit, 2, "{st:?}");
    let second = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter is granted after resize +1")
        .expect("task")
        .expect("granted");
    assert!(second.token > first.token, "{second:?} after {first:?}");
    assert_ne!(second.slot, first.slot);
    assert_eq!(s.inspect(&key).await.expect("inspect").held(), 2);

    let st = s
        .resize(&key, baton_core::Resize::By(-1))
        .await
        .expect("resize -1");
    assert_eq!(st.limit, 1, "{st:?}");
    assert_eq!(st.held(), 2, "resize -1 evicted a holder: {st:?}");
    for l in [&first, &second] {
        s.renew(l).await.expect("a holder renews after resize -1");
    }
    // The holder of slot 1 (above the limit) is left: it still counts.
    let (low, high) = if first.slot == 0 {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(s.release(&low).await.expect("release"), Released::Released);
    let e = s
        .acquire(&req("greedy", 1, Wait::NoWait, TTL))
        .await
        .expect_err("one holds a key of one slot (above the lowered limit)");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e:#}");
    assert_eq!(s.release(&high).await.expect("release"), Released::Released);
    for round in 0..3 {
        let one = s
            .acquire(&req("greedy", 1, Wait::NoWait, TTL))
            .await
            .unwrap_or_else(|e| panic!("round {round}: nobody holds: {e:#}"));
        assert_eq!(one.slot, 0);
        let e = s
            .acquire(&req("greedy", 1, Wait::NoWait, TTL))
            .await
            .expect_err("a second holder of a key of one slot");
        assert_eq!(e.kind(), ErrorKind::Busy, "round {round}: {e:#}");
        assert_eq!(s.release(&one).await.expect("release"), Released::Released);
    }
    let st = s.inspect(&key).await.expect("inspect");
    assert_eq!((st.limit, st.held(), st.slots.len()), (1, 0, 1), "{st:?}");
}

/// A waiter that set aside the free slots above a lowered limit is woken by a resize
/// that raises the limit over one of them (no new slot message is made: the resize's
/// nudge wakes it), and is granted that slot.
#[tokio::test(flavor = "multi_thread")]
async fn a_raised_limit_reaches_a_waiter_holding_slots_above_the_old_one() {
    let Some(s) = store("a_raised_limit_reaches_a_waiter") else {
        return;
    };
    let key = Key::new("aside").expect("key");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(
            s.acquire(&req("aside", 3, Wait::NoWait, TTL))
                .await
                .expect("three holders"),
        );
    }
    held.sort_by_key(|l| l.slot);
    let st = s
        .resize(&key, baton_core::Resize::To(1))
        .await
        .expect("resize 1");
    assert_eq!((st.limit, st.held()), (1, 3), "{st:?}");
    let (zero, rest) = held.split_first().expect("three");
    for l in rest {
        assert_eq!(s.release(l).await.expect("release"), Released::Released);
    }
    let s2 = Arc::clone(&s);
    let waiter =
        tokio::spawn(async move { s2.acquire(&req("aside", 1, Wait::Forever, TTL)).await });
    until_status(&s, &key, "the waiter is counted", |st| {
        st.waiters == Some(1)
    })
    .await;
    // Let it take the free slots 1 and 2 and set them aside.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiter.is_finished(), "granted above the limit");
    let st = s
        .resize(&key, baton_core::Resize::By(1))
        .await
        .expect("resize +1");
    assert_eq!(st.limit, 2, "{st:?}");
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter is granted after resize +1")
        .expect("task")
        .expect("granted");
    assert_eq!(got.slot, 1, "{got:?}");
    assert_eq!(s.inspect(&key).await.expect("inspect").held(), 2);
    for l in [zero, &got] {
        assert_eq!(s.release(l).await.expect("release"), Released::Released);
    }
}

/// Publishes `body` to `queue` on the broker at `url` (confirmed), as a client of its own.
async fn publish_raw(url: &str, queue: &str, body: &[u8]) {
    let u = StoreUrl::parse(url).expect("url");
    let c = baton_store_amqp::AmqpConfig::from_url(&u).expect("config");
    let uri = c.uri(None);
    let conn = lapin::Connection::connect_uri(uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.basic_publish(
        "".into(),
        queue.into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let _ = conn.close(200, "OK".into()).await;
}

/// A resize that died between publishing the new meta message and acknowledging the old
/// one leaves both: the newest generation is the limit (for `status` and for requests),
/// and the next resize counts from it and leaves one meta message.
#[tokio::test(flavor = "multi_thread")]
async fn a_resize_that_died_before_its_acknowledgement_leaves_the_newest_limit() {
    let Some(url) = baton_conformance::servers::url_from_env("BATON_TEST_AMQP").ok() else {
        baton_conformance::skipped("a_resize_that_died", "no broker (BATON_TEST_AMQP)");
        return;
    };
    let (s, prefix) = store_and_prefix(&url);
    let key = Key::new("twice").expect("key");
    let l = s
        .acquire(&req("twice", 4, Wait::NoWait, TTL))
        .await
        .expect("grant");
    s.release(&l).await.expect("release");
    let st = s
        .resize(&key, baton_core::Resize::To(2))
        .await
        .expect("resize 2");
    assert_eq!(st.limit, 2);
    // The meta message the resize replaced, as if its acknowledgement never happened.
    let meta = format!("{prefix}.k.twice.meta");
    publish_raw(&url, &meta, br#"{"limit":4,"base":0,"span":4,"gen":0}"#).await;
    assert_eq!(
        existing(&url, std::slice::from_ref(&meta)).await,
        vec![(meta.clone(), 2)]
    );
    assert_eq!(s.inspect(&key).await.expect("inspect").limit, 2);
    let e = s
        .acquire(&req("twice", 4, Wait::NoWait, TTL))
        .await
        .expect_err("the old limit");
    assert_eq!(e.kind(), ErrorKind::LimitMismatch, "{e:#}");
    let l = s
        .acquire(&req("twice", 2, Wait::NoWait, TTL))
        .await
        .expect("the newest limit");
    s.release(&l).await.expect("release");
    let st = s
        .resize(&key, baton_core::Resize::By(1))
        .await
        .expect("resize +1");
    assert_eq!(st.limit, 3, "counted from the newest limit: {st:?}");
    assert_eq!(
        existing(&url, std::slice::from_ref(&meta)).await,
        vec![(meta, 1)]
    );
    s.delete(&key).await.expect("delete");
}
