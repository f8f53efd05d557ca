//! PostgreSQL-specific behaviour, against the real server `scripts/test` starts
//! (`BATON_TEST_POSTGRES`) or a private one started here (restarts, a server going away):
//! waking by `LISTEN`/`NOTIFY`, first-come-first-served order, waiters whose session dies
//! or whose wait is abandoned, tokens across a server restart, an unreachable, silent or
//! partitioned server, and tables baton did not write.
//!
//! Tests run on current-thread runtimes on purpose: the store drives its connections on
//! its own runtime, whatever the caller uses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_conformance::servers::{url_from_env, Server};
use baton_core::{
    AcquireRequest, BarrierRequest, ErrorKind, Holder, Key, Lease, Released, Store, StoreUrl, Wait,
};
use baton_store_postgres::{PostgresStore, SCHEMA_VERSION};
use tokio_postgres::{Client, NoTls};

/// Anything that must happen does so within this (a liveness bound, not a speed check).
const LIVENESS: Duration = Duration::from_secs(30);

/// The shared server's URL, or `None` (with a note) when the tests are skipped.
fn base_url(test: &str) -> Option<String> {
    match url_from_env("BATON_TEST_POSTGRES") {
        Ok(u) => Some(u),
        Err(why) => {
            baton_conformance::skipped(&format!("postgres store test {test}"), &why);
            None
        }
    }
}

fn with_schema(base: &str, schema: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}schema={schema}")
}

fn suffix() -> String {
    format!("{:08x}", baton_core::HolderId::random().0 as u32)
}

fn open(url: &str) -> Arc<PostgresStore> {
    let u = StoreUrl::parse(url).expect("url");
    Arc::new(PostgresStore::open(&u).unwrap_or_else(|e| panic!("open {u}: {e:#}")))
}

fn key(name: &str) -> Key {
    Key::new(format!("pgtest/{name}-{}", suffix())).expect("key")
}

fn request(key: &Key, limit: u32, wait: Wait, ttl: Duration) -> AcquireRequest {
    let mut r = AcquireRequest::new(key.clone(), Holder::current(vec!["pgtest".into()]));
    r.limit = limit;
    r.wait = wait;
    r.ttl = Some(ttl);
    r
}

/// A plain driver connection for looking at (and damaging) the tables by hand.
async fn raw(url: &str) -> Client {
    let driver = url.split('?').next().unwrap_or(url);
    let (client, conn) = tokio_postgres::connect(driver, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect by hand: {e}"));
    tokio::spawn(conn);
    client
}

async fn waiter_rows(c: &Client, schema: &str, key: &Key) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM {schema}.waiters WHERE key = $1"),
        &[&key.as_str()],
    )
    .await
    .expect("count waiters")
    .get(0)
}

/// Waits (bounded) until `inspect` shows `n` live waiters.
async fn until_waiters(store: &PostgresStore, key: &Key, n: u32) {
    let start = Instant::now();
    loop {
        let st = store.inspect(key).await.expect("inspect");
        if st.waiters == Some(n) {
            return;
        }
        assert!(
            start.elapsed() < LIVENESS,
            "inspect never showed {n} waiter(s): {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn release_wakes_a_listening_waiter() {
    let Some(base) = base_url("release_wakes_a_listening_waiter") else {
        return;
    };
    let schema = "baton_storetest";
    let url = with_schema(&base, schema);
    let store = open(&url);
    let k = key("wake");
    let held = store
        .acquire(&request(&k, 1, Wait::NoWait, Duration::from_secs(60)))
        .await
        .expect("first grant");
    let s2 = Arc::clone(&store);
    let r = request(&k, 1, Wait::Timeout(LIVENESS), Duration::from_secs(60));
    let waiter = tokio::spawn(async move { s2.acquire(&r).await });
    until_waiters(&store, &k, 1).await;
    // The store's listening session is there, on the schema's channel.
    let c = raw(&base).await;
    let listening: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND query = $1",
            &[&format!("LISTEN \"baton_{schema}\"")],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert!(listening >= 1, "no session listens on baton_{schema}");
    let released_at = Instant::now();
    assert_eq!(
        store.release(&held).await.expect("release"),
        Released::Released
    );
    let lease = waiter.await.expect("join").expect("the waiter is granted");
    eprintln!(
        "release_wakes_a_listening_waiter: granted {:?} after the release (the waiter's \
         backstop look is every 1s, its ticket refresh every 3.3s)",
        released_at.elapsed()
    );
    assert!(lease.token > held.token);
    store.release(&lease).await.expect("release");
}

#[tokio::test(flavor = "current_thread")]
async fn a_waiter_whose_session_dies_leaves_the_queue() {
    let Some(base) = base_url("a_waiter_whose_session_dies_leaves_the_queue") else {
        return;
    };
    let schema = "baton_storetest";
    let url = with_schema(&base, schema);
    let store = open(&url);
    let c = raw(&base).await;
    let k = key("dead-waiter");
    let ttl = Duration::from_secs(60);
    let held = store
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect("grant");
    // The doomed waiter, then one behind it.
    let doomed = open(&url);
    let r = request(&k, 1, Wait::Timeout(LIVENESS), ttl);
    let d2 = Arc::clone(&doomed);
    let doomed_wait = tokio::spawn(async move { d2.acquire(&r).await });
    until_waiters(&store, &k, 1).await;
    let behind = open(&url);
    let r = request(&k, 1, Wait::Timeout(LIVENESS), ttl);
    let b2 = Arc::clone(&behind);
    let behind_wait = tokio::spawn(async move { b2.acquire(&r).await });
    until_waiters(&store, &k, 2).await;
    // End the first waiter's server session, as a crash of its process or host would.
    let killed: i64 = c
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM {schema}.waiters \
                 WHERE key = $1 ORDER BY ticket LIMIT 1) t"
            ),
            &[&k.as_str()],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(killed, 1);
    let e = doomed_wait
        .await
        .expect("join")
        .expect_err("a waiter whose session ended cannot be granted");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
    // Its ticket no longer counts, at once (no TTL to wait out).
    until_waiters(&store, &k, 1).await;
    store.release(&held).await.expect("release");
    let lease = behind_wait
        .await
        .expect("join")
        .expect("the waiter behind is granted");
    assert_eq!(
        waiter_rows(&c, schema, &k).await,
        0,
        "the dead ticket was swept"
    );
    behind.release(&lease).await.expect("release");
}

#[tokio::test(flavor = "current_thread")]
async fn an_abandoned_acquire_leaves_nothing() {
    let Some(base) = base_url("an_abandoned_acquire_leaves_nothing") else {
        return;
    };
    let schema = "baton_storetest";
    let url = with_schema(&base, schema);
    let store = open(&url);
    let c = raw(&base).await;
    let k = key("abandoned");
    let ttl = Duration::from_secs(60);
    let held = store
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect("grant");
    // A timed-out wait cleans up before it returns.
    let e = store
        .acquire(&request(
            &k,
            1,
            Wait::Timeout(Duration::from_millis(300)),
            ttl,
        ))
        .await
        .expect_err("times out");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e:#}");
    assert_eq!(waiter_rows(&c, schema, &k).await, 0);
    // A dropped future cleans up right after.
    let r = request(&k, 1, Wait::Forever, ttl);
    let dropped = tokio::time::timeout(Duration::from_millis(500), store.acquire(&r)).await;
    assert!(
        dropped.is_err(),
        "the slot is held: the acquire must still wait"
    );
    let start = Instant::now();
    while waiter_rows(&c, schema, &k).await != 0 {
        assert!(
            start.elapsed() < LIVENESS,
            "the cancelled wait left its ticket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let st = store.inspect(&k).await.expect("inspect");
    assert_eq!(st.waiters, Some(0));
    assert_eq!(st.held(), 1);
    assert_eq!(
        store.release(&held).await.expect("release"),
        Released::Released
    );
    let rows: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM {schema}.leases WHERE key = $1"),
            &[&k.as_str()],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0, "no lease left behind");
}

async fn arrival_rows(c: &Client, schema: &str, key: &Key) -> i64 {
    c.query_one(
        &format!("SELECT count(*) FROM {schema}.barrier_arrivals WHERE key = $1"),
        &[&key.as_str()],
    )
    .await
    .expect("count arrivals")
    .get(0)
}

fn barrier_request(key: &Key, parties: u32, wait: Wait) -> BarrierRequest {
    BarrierRequest {
        key: key.clone(),
        parties,
        wait,
        holder: Holder::current(vec!["pgtest".into(), "barrier".into()]),
    }
}

/// Waits (bounded) until the key has `n` arrival rows.
async fn until_arrivals(c: &Client, schema: &str, key: &Key, n: i64) {
    let start = Instant::now();
    while arrival_rows(c, schema, key).await != n {
        assert!(
            start.elapsed() < LIVENESS,
            "the barrier never had {n} arrival row(s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_barrier_party_whose_session_dies_stops_counting() {
    let Some(base) = base_url("a_barrier_party_whose_session_dies_stops_counting") else {
        return;
    };
    let schema = "baton_storetest";
    let url = with_schema(&base, schema);
    let store = open(&url);
    let c = raw(&base).await;
    let k = key("dead-party");
    // The tables exist before they are looked at by hand.
    store.list().await.expect("first use creates the tables");
    // A party of 2 arrives on a handle of its own and waits.
    let doomed = open(&url);
    let r = barrier_request(&k, 2, Wait::Timeout(LIVENESS));
    let d2 = Arc::clone(&doomed);
    let doomed_wait = tokio::spawn(async move { d2.barrier(&r).await });
    until_arrivals(&c, schema, &k, 1).await;
    // End its server session, as a crash of its process or host would.
    let killed: i64 = c
        .query_one(
            &format!(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM \
                 {schema}.barrier_arrivals WHERE key = $1) t"
            ),
            &[&k.as_str()],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(killed, 1);
    let e = tokio::time::timeout(LIVENESS, doomed_wait)
        .await
        .expect("the dead party's wait ends")
        .expect("join")
        .expect_err("a party whose session ended cannot pass");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
    // Its arrival no longer counts, at once (no TTL to wait out): a second party alone
    // does not pass with the phantom, and the dead row is swept by its arrival.
    let lone = store
        .barrier(&barrier_request(
            &k,
            2,
            Wait::Timeout(Duration::from_millis(400)),
        ))
        .await;
    assert_eq!(
        lone.as_ref().map_err(|e| e.kind()).err(),
        Some(ErrorKind::Timeout),
        "a party of 2 passed with a dead one: {lone:?}"
    );
    assert_eq!(arrival_rows(&c, schema, &k).await, 0, "nothing left behind");
    // Two live parties pass, in the generation the dead one never completed.
    let other = open(&url);
    let r = barrier_request(&k, 2, Wait::Timeout(LIVENESS));
    let o2 = Arc::clone(&other);
    let first = tokio::spawn(async move { o2.barrier(&r).await });
    let second = store
        .barrier(&barrier_request(&k, 2, Wait::Timeout(LIVENESS)))
        .await
        .expect("the second of 2 live parties");
    let first = first
        .await
        .expect("join")
        .expect("the first of 2 live parties");
    assert_eq!(first.generation, 0, "{first:?}");
    assert_eq!(second.generation, 0, "{second:?}");
    assert_eq!(
        arrival_rows(&c, schema, &k).await,
        0,
        "passed rows are gone"
    );

    // A dropped barrier future withdraws its arrival right after.
    let r = barrier_request(&k, 2, Wait::Forever);
    let dropped = tokio::time::timeout(Duration::from_millis(500), store.barrier(&r)).await;
    assert!(dropped.is_err(), "a lone party of 2 must still wait");
    until_arrivals(&c, schema, &k, 0).await;
}

#[tokio::test(flavor = "current_thread")]
async fn limits_tokens_and_mismatch() {
    let Some(base) = base_url("limits_tokens_and_mismatch") else {
        return;
    };
    let store = open(&with_schema(&base, "baton_storetest"));
    let k = key("sem");
    let ttl = Duration::from_secs(60);
    let a = store
        .acquire(&request(&k, 2, Wait::NoWait, ttl))
        .await
        .expect("a");
    let b = store
        .acquire(&request(&k, 2, Wait::NoWait, ttl))
        .await
        .expect("b");
    assert_ne!(a.slot, b.slot);
    assert!(b.token > a.token);
    let e = store
        .acquire(&request(&k, 2, Wait::NoWait, ttl))
        .await
        .expect_err("full");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e:#}");
    let e = store
        .acquire(&request(&k, 3, Wait::NoWait, ttl))
        .await
        .expect_err("other limit");
    assert_eq!(e.kind(), ErrorKind::LimitMismatch, "{e:#}");
    assert_eq!(e.current_limit(), Some(2));
    let e = store
        .acquire(&request(&key("huge"), u32::MAX, Wait::NoWait, ttl))
        .await
        .expect_err("a limit no status could list");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e:#}");
    // Renew keeps the lease; after release, renew answers lost and release not held.
    let renewed = store.renew(&a).await.expect("renew");
    assert_eq!(renewed.token, a.token);
    for l in [&a, &b] {
        assert_eq!(store.release(l).await.expect("release"), Released::Released);
        assert_eq!(store.release(l).await.expect("release"), Released::NotHeld);
        let e = store.renew(l).await.expect_err("renew after release");
        assert_eq!(e.kind(), ErrorKind::Lost, "{e:#}");
    }
}

#[test]
fn tokens_survive_a_server_restart_and_a_down_server_is_unavailable() {
    if base_url("tokens_survive_a_server_restart_and_a_down_server_is_unavailable").is_none() {
        return;
    }
    let server = Server::start("postgres", "start", "stop").expect("a private server");
    let url = server
        .var("BATON_TEST_POSTGRES")
        .expect("the script prints BATON_TEST_POSTGRES")
        .to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = open(&url);
    let k = key("restart");
    let ttl = Duration::from_secs(60);
    let grant = |store: Arc<PostgresStore>| {
        let r = request(&k, 1, Wait::NoWait, ttl);
        async move {
            let l: Lease = store.acquire(&r).await?;
            store.release(&l).await?;
            Ok::<_, baton_core::Error>(l.token)
        }
    };
    let mut last = baton_core::Token(0);
    for _ in 0..3 {
        let t = rt
            .block_on(grant(Arc::clone(&store)))
            .expect("grant before restart");
        assert!(t > last);
        last = t;
    }
    server.run("restart").expect("restart");
    // The same handle (its pooled connections died with the server) and a new one.
    let t = rt
        .block_on(grant(Arc::clone(&store)))
        .expect("grant after restart");
    assert!(t > last, "token {t} after the restart is not above {last}");
    last = t;
    let t = rt
        .block_on(grant(open(&url)))
        .expect("grant on a new handle");
    assert!(t > last);

    server.run("stop").expect("stop");
    for s in [Arc::clone(&store), open(&url)] {
        let e = rt
            .block_on(grant(s))
            .expect_err("no grant from a stopped server");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
        assert!(
            e.to_string().contains("127.0.0.1"),
            "names the server: {e:#}"
        );
    }
    server.run("start").expect("start again");
    let t = rt
        .block_on(grant(Arc::clone(&store)))
        .expect("grant after start");
    assert!(t > last);
}

#[tokio::test(flavor = "current_thread")]
async fn a_silent_server_is_unavailable_not_a_hang() {
    // Accepts TCP connections (the kernel does) and never says a word.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let store = open(&format!(
        "postgres://baton@127.0.0.1:{port}/baton?timeout=500ms&connect_timeout=1"
    ));
    let k = key("silent");
    for wait in [Wait::NoWait, Wait::Forever] {
        let e = tokio::time::timeout(
            LIVENESS,
            store.acquire(&request(&k, 1, wait, Duration::from_secs(10))),
        )
        .await
        .expect("bounded")
        .expect_err("no grant");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
    }
    let e = tokio::time::timeout(LIVENESS, store.list())
        .await
        .expect("bounded")
        .expect_err("no list");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
    drop(listener);
    // Nothing listens at all.
    let e = store
        .acquire(&request(&k, 1, Wait::NoWait, Duration::from_secs(10)))
        .await
        .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
}

#[tokio::test(flavor = "current_thread")]
async fn tables_baton_did_not_write_are_corrupt() {
    let Some(base) = base_url("tables_baton_did_not_write_are_corrupt") else {
        return;
    };
    let c = raw(&base).await;
    let k = key("hostile");
    let ttl = Duration::from_secs(10);

    // Another program's table where baton's belongs.
    let schema = format!("baton_hostile_{}", suffix());
    c.batch_execute(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.keys (key text, lim text, seq text);"
    ))
    .await
    .expect("create");
    let store = open(&with_schema(&base, &schema));
    let e = store
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect_err("not baton's table");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");
    assert!(e.to_string().contains("lim"), "names the column: {e:#}");
    let e = store.list().await.expect_err("list");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");
    c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("drop");

    // A schema from a newer baton.
    let schema = format!("baton_hostile_{}", suffix());
    let store = open(&with_schema(&base, &schema));
    let l = store
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect("a fresh schema works");
    store.release(&l).await.expect("release");
    c.execute(
        &format!("UPDATE {schema}.meta SET value = '99' WHERE name = 'schema_version'"),
        &[],
    )
    .await
    .expect("bump");
    let e = open(&with_schema(&base, &schema))
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect_err("newer schema");
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e:#}");

    // A column retyped under a handle that already checked the schema.
    c.batch_execute(&format!(
        "UPDATE {schema}.meta SET value = '{SCHEMA_VERSION}' WHERE name = 'schema_version'; \
         ALTER TABLE {schema}.keys ALTER COLUMN seq TYPE text"
    ))
    .await
    .expect("retype");
    let e = store
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect_err("retyped column");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");
    let e = store.inspect(&k).await.expect_err("inspect");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");

    // A limit no key can have (status would list two billion slots).
    c.batch_execute(&format!(
        "UPDATE {schema}.meta SET value = '{SCHEMA_VERSION}' WHERE name = 'schema_version'; \
         ALTER TABLE {schema}.keys ALTER COLUMN seq TYPE bigint USING seq::bigint; \
         UPDATE {schema}.keys SET lim = 2147483647"
    ))
    .await
    .expect("huge limit");
    let e = store.inspect(&k).await.expect_err("inspect");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");
    let e = store
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect_err("acquire");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");
    c.batch_execute(&format!("UPDATE {schema}.keys SET lim = 1"))
        .await
        .expect("limit back");

    // A key name no key can have.
    c.batch_execute(&format!(
        "INSERT INTO {schema}.keys VALUES ('../etc/passwd', 1, 0)"
    ))
    .await
    .expect("bad key");
    let e = open(&with_schema(&base, &schema))
        .list()
        .await
        .expect_err("bad key in list");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");
    c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("drop");
}

#[tokio::test(flavor = "current_thread")]
async fn passwords_never_show() {
    let store = open("postgres://bob:hunter2@127.0.0.1:1/baton?connect_timeout=1");
    let e = store
        .acquire(&request(
            &key("pw"),
            1,
            Wait::NoWait,
            Duration::from_secs(5),
        ))
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
    let shown = format!("{e:#} {e:?} {store:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn a_partitioned_client_fails_within_its_timeout() {
    use baton_conformance::proxy::ProxySet;
    let Some(base) = base_url("a_partitioned_client_fails_within_its_timeout") else {
        return;
    };
    // The proxy runs a runtime of its own: started outside the test's.
    let proxies = ProxySet::start(&base).expect("a fault proxy");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(partitioned(base, &proxies));
}

async fn partitioned(base: String, proxies: &baton_conformance::proxy::ProxySet) {
    use baton_conformance::proxy::Fault;
    let cut_off = open(&format!(
        "{}?schema=baton_storetest&timeout=1s&connect_timeout=1",
        proxies.url()
    ));
    let direct = open(&with_schema(&base, "baton_storetest"));
    let ttl = Duration::from_secs(60);
    let k = key("partition");
    let lease = cut_off
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect("grant through the proxy");
    // A waiter through the proxy too, on a key the direct handle holds.
    let k2 = key("partition-wait");
    let held = direct
        .acquire(&request(&k2, 1, Wait::NoWait, ttl))
        .await
        .expect("grant");
    let s2 = Arc::clone(&cut_off);
    let r = request(&k2, 1, Wait::Forever, ttl);
    let waiter = tokio::spawn(async move { s2.acquire(&r).await });
    until_waiters(&direct, &k2, 1).await;

    proxies.set(Fault::Partition);
    // Every operation answers within its bound instead of hanging on the held traffic.
    let bounded = |what: &'static str, e: baton_core::Error| {
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{what}: {e:#}");
    };
    match tokio::time::timeout(LIVENESS, cut_off.renew(&lease)).await {
        Ok(Err(e)) => bounded("renew", e),
        other => panic!("renew during a partition: {other:?}"),
    }
    match tokio::time::timeout(
        LIVENESS,
        cut_off.acquire(&request(&key("p3"), 1, Wait::NoWait, ttl)),
    )
    .await
    {
        Ok(Err(e)) => bounded("acquire", e),
        other => panic!("acquire during a partition: {other:?}"),
    }
    match tokio::time::timeout(LIVENESS, waiter).await {
        Ok(Ok(Err(e))) => bounded("a waiting acquire", e),
        other => panic!("a waiter during a partition: {other:?}"),
    }
    // The server still has the lease (it is a row, with its TTL).
    assert_eq!(direct.inspect(&k).await.expect("inspect").held(), 1);

    proxies.set(Fault::Pass);
    let renewed = cut_off
        .renew(&lease)
        .await
        .expect("renew after the partition heals");
    assert_eq!(
        cut_off.release(&renewed).await.expect("release"),
        Released::Released
    );
    assert_eq!(
        direct.release(&held).await.expect("release"),
        Released::Released
    );
    // The waiter cut off mid-wait left nothing that blocks the key for long: its ticket
    // dies with its session or at its TTL.
    let l = direct
        .acquire(&request(&k2, 1, Wait::Timeout(LIVENESS), ttl))
        .await
        .expect("the key is free again");
    direct.release(&l).await.expect("release");
}

#[tokio::test(flavor = "current_thread")]
async fn a_missing_function_is_created_again() {
    let Some(base) = base_url("a_missing_function_is_created_again") else {
        return;
    };
    let c = raw(&base).await;
    let schema = format!("baton_fn_{}", suffix());
    let url = with_schema(&base, &schema);
    let k = key("fn");
    let ttl = Duration::from_secs(10);
    let l = open(&url)
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect("grant");
    open(&url).release(&l).await.expect("release");
    c.batch_execute(&format!(
        "DROP FUNCTION {schema}.leave(text, bigint, integer, text)"
    ))
    .await
    .expect("drop");
    let store = open(&url);
    let l = store
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect("a new handle puts the function back");
    store.release(&l).await.expect("release");
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
             WHERE n.nspname = $1 AND p.proname = 'leave'",
            &[&schema],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1);
    c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("drop schema");
}

fn open_dyn(url: &StoreUrl) -> baton_core::Result<Arc<dyn Store>> {
    baton_store_postgres::open(url)
}

#[tokio::test(flavor = "current_thread")]
async fn barrier_parties_meet_generation_after_generation() {
    let Some(base) = base_url("barrier_parties_meet_generation_after_generation") else {
        return;
    };
    let url = with_schema(&base, "baton_storetest");
    let k = key("rounds");
    let parties = 4;
    let rounds = 5u64;
    let tasks: Vec<_> = (0..parties)
        .map(|_| {
            let store = open(&url);
            let k = k.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..rounds {
                    let p = store
                        .barrier(&barrier_request(&k, parties, Wait::Timeout(LIVENESS)))
                        .await
                        .unwrap_or_else(|e| panic!("a round: {e:#}"));
                    seen.push(p.generation);
                }
                seen
            })
        })
        .collect();
    for t in tasks {
        let seen = t.await.expect("join");
        assert_eq!(
            seen,
            (0..rounds).collect::<Vec<_>>(),
            "every party, every round"
        );
    }
}

fn with_delay(mut r: AcquireRequest, delay: Duration) -> AcquireRequest {
    r.lock_delay = Some(delay);
    r
}

/// Lock-delay (DESIGN, contract point 8): a lease that is lost (broken, or taken over
/// after a waiter saw no renewal for its TTL) holds its slot back for the key's delay,
/// and its holder's renew answers lost and its release not held; a released lease frees
/// its slot at once. The only time checked is "not before the delay".
#[tokio::test(flavor = "current_thread")]
async fn lock_delay_holds_a_lost_slot_back_and_a_released_one_does_not() {
    let Some(base) = base_url("lock_delay_holds_a_lost_slot_back_and_a_released_one_does_not")
    else {
        return;
    };
    let store = open(&with_schema(&base, "baton_storetest"));
    assert!(store.capabilities().lock_delay);
    let delay = Duration::from_millis(1500);
    let long = Duration::from_secs(60);
    let k = key("delay");

    // The request that creates the key sets its delay; status shows it.
    let first = store
        .acquire(&with_delay(request(&k, 1, Wait::NoWait, long), delay))
        .await
        .expect("first grant");
    let st = store.inspect(&k).await.expect("inspect");
    assert_eq!(st.lock_delay_ms, Some(1500), "{st:?}");

    // A clean release never waits.
    assert_eq!(
        store.release(&first).await.expect("release"),
        Released::Released
    );
    let second = store
        .acquire(&request(&k, 1, Wait::NoWait, long))
        .await
        .expect("a released slot is granted at once");

    // A broken lease holds the slot back.
    let freed = store.break_lease(&k, None).await.expect("break");
    let broken_at = Instant::now();
    assert_eq!(freed.len(), 1, "{freed:?}");
    let e = store
        .renew(&second)
        .await
        .expect_err("a broken lease is not renewed");
    assert_eq!(e.kind(), ErrorKind::Lost, "{e:#}");
    assert_eq!(
        store.release(&second).await.expect("release"),
        Released::NotHeld
    );
    let e = store
        .acquire(&request(&k, 1, Wait::NoWait, long))
        .await
        .expect_err("held back by the lock-delay");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e:#}");
    let st = store.inspect(&k).await.expect("inspect");
    assert_eq!(st.held(), 0, "{st:?}");
    assert!(
        st.slots[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("lock-delay")),
        "{st:?}"
    );
    let third = store
        .acquire(&request(&k, 1, Wait::Timeout(LIVENESS), long))
        .await
        .expect("granted after the delay");
    let granted_at = Instant::now();
    assert!(
        granted_at >= broken_at + delay,
        "granted {:?} after the break, before the {delay:?} lock-delay",
        granted_at - broken_at
    );
    assert!(third.token > second.token);

    // A lease taken over after its TTL (it is never renewed) is lost, not released: the
    // slot is held back again, for the delay after the takeover.
    assert_eq!(
        store.release(&third).await.expect("release"),
        Released::Released
    );
    let ttl = Duration::from_millis(300);
    let silent = store
        .acquire(&request(&k, 1, Wait::NoWait, ttl))
        .await
        .expect("a released slot is granted at once");
    let acquired_at = Instant::now();
    let next = store
        .acquire(&request(&k, 1, Wait::Timeout(LIVENESS), long))
        .await
        .expect("taken over, then granted after the delay");
    let granted_at = Instant::now();
    assert!(
        granted_at >= acquired_at + ttl + delay,
        "granted {:?} after the silent holder's grant, before its TTL and the lock-delay",
        granted_at - acquired_at
    );
    let e = store.renew(&silent).await.expect_err("taken over");
    assert_eq!(e.kind(), ErrorKind::Lost, "{e:#}");
    assert_eq!(
        store.release(&silent).await.expect("release"),
        Released::NotHeld
    );
    assert_eq!(
        store.release(&next).await.expect("release"),
        Released::Released
    );

    // A key created without a delay has none: a break frees the slot at once.
    let plain = key("no-delay");
    let l = store
        .acquire(&request(&plain, 1, Wait::NoWait, long))
        .await
        .expect("grant");
    assert_eq!(
        store.inspect(&plain).await.expect("inspect").lock_delay_ms,
        None
    );
    store.break_lease(&plain, None).await.expect("break");
    let l2 = store
        .acquire(&request(&plain, 1, Wait::NoWait, long))
        .await
        .expect("a broken slot without a lock-delay is free at once");
    assert!(l2.token > l.token);
    store.release(&l2).await.expect("release");
}

/// The compare-and-swap a takeover is: a claim naming a renewal count that a renewal has
/// since raised changes nothing (the lease stays, its renewals go on); a claim naming the
/// current count takes the slot, and the old holder's renew then answers lost and its
/// release not held. `attempt` is called by hand to put the two in either order.
#[tokio::test(flavor = "current_thread")]
async fn a_takeover_and_a_renewal_never_both_win() {
    let Some(base) = base_url("a_takeover_and_a_renewal_never_both_win") else {
        return;
    };
    let schema = "baton_storetest";
    let store = open(&with_schema(&base, schema));
    let k = key("cas");
    let long = Duration::from_secs(60);
    let held = store
        .acquire(&request(&k, 1, Wait::NoWait, long))
        .await
        .expect("grant");
    let c = raw(&base).await;
    let read = format!("SELECT renewals FROM {schema}.leases WHERE key = $1");
    let seen: i64 = c
        .query_one(&read, &[&k.as_str()])
        .await
        .expect("the lease row")
        .get(0);
    let held = store.renew(&held).await.expect("renew");
    let claim = |renewals: i64| -> Vec<i64> {
        vec![i64::from(held.slot), held.token.0 as i64, renewals, 0]
    };
    let attempt = format!(
        "SELECT o_outcome FROM {schema}.attempt($1, 1, false, NULL, false, 'claimant', \
         '{{}}', 60000, 0, 10000, false, 0, $2, 'baton_{schema}', NULL)"
    );
    // The renewal came first: the claim names a count that is gone.
    let outcome: String = c
        .query_one(&attempt, &[&k.as_str(), &claim(seen)])
        .await
        .expect("a stale claim")
        .get(0);
    assert_eq!(outcome, "busy");
    let held = store
        .renew(&held)
        .await
        .expect("the lease is still its holder's");
    // The claim comes first: the renewal after it finds the lease gone.
    let now: i64 = c
        .query_one(&read, &[&k.as_str()])
        .await
        .expect("the lease row")
        .get(0);
    assert_eq!(now, seen + 2, "every renewal raises the count by one");
    let outcome: String = c
        .query_one(&attempt, &[&k.as_str(), &claim(now)])
        .await
        .expect("a current claim")
        .get(0);
    assert_eq!(outcome, "granted");
    let e = store.renew(&held).await.expect_err("taken over");
    assert_eq!(e.kind(), ErrorKind::Lost, "{e:#}");
    assert_eq!(
        store.release(&held).await.expect("release"),
        Released::NotHeld
    );
    let st = store.inspect(&k).await.expect("inspect");
    assert_eq!(st.held(), 1, "the claimant holds it: {st:?}");
    store.break_lease(&k, None).await.expect("clean up");
}

/// The server's clock ends no lease: a lease row whose stamps say it expired two hours ago
/// (as after the server's clock stepped forward) is still its holder's, renewed, and not
/// granted to anyone else; `status` shows it held, with a note.
#[tokio::test(flavor = "current_thread")]
async fn a_lease_the_server_clock_calls_expired_stays_held() {
    let Some(base) = base_url("a_lease_the_server_clock_calls_expired_stays_held") else {
        return;
    };
    let schema = "baton_storetest";
    let store = open(&with_schema(&base, schema));
    let k = key("stamps");
    let held = store
        .acquire(&request(&k, 1, Wait::NoWait, Duration::from_secs(60)))
        .await
        .expect("grant");
    let c = raw(&base).await;
    c.execute(
        &format!(
            "UPDATE {schema}.leases SET renewed_at = now() - interval '2 hours', \
             expires_at = now() - interval '2 hours' WHERE key = $1"
        ),
        &[&k.as_str()],
    )
    .await
    .expect("back-date the stamps");
    let st = store.inspect(&k).await.expect("inspect");
    assert_eq!(st.held(), 1, "{st:?}");
    assert!(st.slots[0].note.is_some(), "{st:?}");
    let e = store
        .acquire(&request(&k, 1, Wait::NoWait, Duration::from_secs(60)))
        .await
        .expect_err("still held");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e:#}");
    let held = store.renew(&held).await.expect("renewed");
    let st = store.inspect(&k).await.expect("inspect");
    let slot = &st.slots[0];
    assert!(
        slot.renewed_unix_ms.is_some() && slot.expires_unix_ms > slot.renewed_unix_ms,
        "{st:?}"
    );
    assert_eq!(
        store.release(&held).await.expect("release"),
        Released::Released
    );
}

/// A schema version 1 made (leases that expired by the server's clock) is upgraded in
/// place by the first use: its live lease stays its holder's (its TTL taken from its
/// stamps), tokens go on from its sequence (also after the key is deleted and made
/// again), and the version row says the current version.
#[tokio::test(flavor = "current_thread")]
async fn a_version_1_schema_is_upgraded_in_place() {
    let Some(base) = base_url("a_version_1_schema_is_upgraded_in_place") else {
        return;
    };
    let schema = format!("baton_v1_{}", suffix());
    let c = raw(&base).await;
    c.batch_execute(&format!(
        "CREATE SCHEMA {schema};
         CREATE TABLE {schema}.meta (name text PRIMARY KEY, value text NOT NULL);
         INSERT INTO {schema}.meta VALUES ('schema_version', '1');
         CREATE TABLE {schema}.keys (key text PRIMARY KEY, lim integer NOT NULL, seq bigint NOT NULL);
         CREATE TABLE {schema}.leases (key text NOT NULL, slot integer NOT NULL,
             token bigint NOT NULL, holder_id text NOT NULL, holder_json text NOT NULL,
             acquired_at timestamptz NOT NULL, renewed_at timestamptz NOT NULL,
             expires_at timestamptz NOT NULL, PRIMARY KEY (key, slot));
         CREATE TABLE {schema}.waiters (ticket bigserial PRIMARY KEY, key text NOT NULL,
             holder_id text NOT NULL, pid integer NOT NULL, expires_at timestamptz NOT NULL);
         INSERT INTO {schema}.keys VALUES ('old/key', 1, 5);
         INSERT INTO {schema}.leases VALUES ('old/key', 0, 5, 'h', '{{}}', now(), now(),
             now() + interval '60 seconds');"
    ))
    .await
    .expect("a version 1 schema");
    let store = open(&with_schema(&base, &schema));
    let k = Key::new("old/key").expect("key");
    let e = store
        .acquire(&request(&k, 1, Wait::NoWait, Duration::from_secs(60)))
        .await
        .expect_err("the version 1 lease is still held");
    assert_eq!(e.kind(), ErrorKind::Busy, "{e:#}");
    let version: String = c
        .query_one(
            &format!("SELECT value FROM {schema}.meta WHERE name = 'schema_version'"),
            &[],
        )
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, SCHEMA_VERSION.to_string());
    let ttl: i64 = c
        .query_one(&format!("SELECT ttl_ms FROM {schema}.leases"), &[])
        .await
        .expect("ttl")
        .get(0);
    assert_eq!(ttl, 60_000);
    let st = store.inspect(&k).await.expect("inspect");
    assert_eq!(st.held(), 1, "{st:?}");
    store.break_lease(&k, None).await.expect("break");
    let l = store
        .acquire(&request(&k, 1, Wait::NoWait, Duration::from_secs(60)))
        .await
        .expect("grant after the upgrade");
    assert_eq!(l.token.0, 6);
    store.release(&l).await.expect("release");
    // Deleted and made again with another limit: tokens go on from the old key's.
    store.delete(&k).await.expect("delete");
    let again = store
        .acquire(&request(&k, 2, Wait::NoWait, Duration::from_secs(60)))
        .await
        .expect("the key made again");
    assert_eq!((again.token.0, again.limit), (7, 2));
    store.release(&again).await.expect("release");
    c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .expect("drop");
}

/// A holder whose process is gone is taken over at once only by a waiter that can see
/// its PID: the same host, boot and PID namespace. The same dead PID recorded from
/// another PID namespace (a container sharing the host's name) proves nothing: the slot
/// stays held until a waiter has seen it unrenewed for the TTL.
#[tokio::test(flavor = "current_thread")]
async fn a_dead_holder_is_taken_over_at_once_only_from_its_own_pid_namespace() {
    let Some(base) =
        base_url("a_dead_holder_is_taken_over_at_once_only_from_its_own_pid_namespace")
    else {
        return;
    };
    let schema = "baton_storetest";
    let store = open(&with_schema(&base, schema));
    let c = raw(&base).await;
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    child.wait().expect("reap true");
    let mut gone = Holder::current(vec!["pgtest".into()]);
    gone.pid = child.id();
    let long = Duration::from_secs(60);
    let own_ns = std::fs::read_link("/proc/self/ns/pid")
        .expect("our PID namespace")
        .display()
        .to_string();
    for (ns, at_once) in [("pid:[1]", false), (own_ns.as_str(), true)] {
        let k = key("dead");
        let mut req = request(&k, 1, Wait::NoWait, long);
        req.holder = gone.clone();
        let held = store.acquire(&req).await.expect("grant");
        c.execute(
            &format!("UPDATE {schema}.leases SET pid_ns = $2 WHERE key = $1"),
            &[&k.as_str(), &ns],
        )
        .await
        .expect("set the namespace");
        let got = store.acquire(&request(&k, 1, Wait::NoWait, long)).await;
        match (at_once, got) {
            (true, Ok(l)) => {
                assert!(l.token > held.token);
                assert_eq!(
                    store.release(&held).await.expect("release"),
                    Released::NotHeld
                );
                store.release(&l).await.expect("release");
            }
            (false, Err(e)) if e.kind() == ErrorKind::Busy => {
                let st = store.inspect(&k).await.expect("inspect");
                assert_eq!(st.held(), 1, "{st:?}");
                assert_eq!(
                    store.release(&held).await.expect("release"),
                    Released::Released
                );
            }
            (at_once, got) => {
                panic!("namespace {ns}: taken over at once should be {at_once}: {got:?}")
            }
        }
    }
}

/// Several waiters watch a lease whose holder stopped renewing (it lives on, so only a
/// TTL of silence can free it): whichever claims the stale row, the slot goes to the
/// first in line; the second is granted only after the first releases.
#[tokio::test(flavor = "current_thread")]
async fn a_stale_lease_goes_to_the_first_waiter_in_line() {
    let Some(base) = base_url("a_stale_lease_goes_to_the_first_waiter_in_line") else {
        return;
    };
    let store = open(&with_schema(&base, "baton_storetest"));
    let k = key("stale-fifo");
    let silent = store
        .acquire(&request(&k, 1, Wait::NoWait, Duration::from_millis(500)))
        .await
        .expect("grant");
    let first = {
        let (s, r) = (
            Arc::clone(&store),
            request(&k, 1, Wait::Timeout(LIVENESS), Duration::from_secs(60)),
        );
        tokio::spawn(async move { s.acquire(&r).await })
    };
    until_waiters(&store, &k, 1).await;
    let second = {
        let (s, r) = (
            Arc::clone(&store),
            request(&k, 1, Wait::Timeout(LIVENESS), Duration::from_secs(60)),
        );
        tokio::spawn(async move { s.acquire(&r).await })
    };
    until_waiters(&store, &k, 2).await;
    let first = first
        .await
        .expect("join")
        .expect("the first in line is granted");
    assert!(first.token > silent.token);
    assert!(!second.is_finished(), "the second waiter was granted too");
    let e = store.renew(&silent).await.expect_err("taken over");
    assert_eq!(e.kind(), ErrorKind::Lost, "{e:#}");
    assert_eq!(
        store.release(&first).await.expect("release"),
        Released::Released
    );
    let second = second
        .await
        .expect("join")
        .expect("granted after the release");
    assert!(second.token > first.token);
    store.release(&second).await.expect("release");
}

/// `base` with its user (and password) replaced by `user`.
fn with_user(base: &str, user: &str) -> String {
    let (scheme, rest) = base.split_once("://").expect("a URL");
    let host_at = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..host_at].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    format!("{scheme}://{user}@{rest}")
}

/// Errors that retrying cannot cure are permanent (a waiting acquire that rides out
/// outages must not ride out these): a role the server does not know (SQLSTATE class 28)
/// and a role that may not create baton's schema (42501). An unreachable server stays
/// retryable. Through `open`, every error names its operation, key and store.
#[tokio::test(flavor = "current_thread")]
async fn refused_credentials_and_privileges_are_permanent() {
    let Some(base) = base_url("refused_credentials_and_privileges_are_permanent") else {
        return;
    };
    let k = key("perm");
    let req = request(&k, 1, Wait::NoWait, Duration::from_secs(5));

    // A role that does not exist: the server refuses the login (28000).
    let who = format!("baton_nobody_{}", suffix());
    let u = StoreUrl::parse(&with_user(&base, &who)).expect("url");
    let store = open_dyn(&u).expect("open");
    let e = store.acquire(&req).await.expect_err("refused login");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
    assert!(!e.is_retryable(), "a refused login is permanent: {e:#}");
    assert_eq!(e.op(), Some(baton_core::Op::Acquire), "{e:#}");
    assert_eq!(e.key(), Some(k.as_str()), "{e:#}");

    // A role that may log in but not create a schema (42501).
    let c = raw(&base).await;
    let role = format!("baton_noperm_{}", suffix());
    c.batch_execute(&format!("CREATE ROLE {role} LOGIN"))
        .await
        .expect("create role");
    let u = StoreUrl::parse(&with_schema(
        &with_user(&base, &role),
        &format!("baton_noperm_{}", suffix()),
    ))
    .expect("url");
    let store = open_dyn(&u).expect("open");
    let e = store.acquire(&req).await.expect_err("no privilege");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
    assert!(!e.is_retryable(), "a missing privilege is permanent: {e:#}");
    let shown = format!("{e:#}");
    assert_eq!(
        shown.matches("permission denied").count(),
        1,
        "says it once: {shown}"
    );
    drop(store);
    let _ = c.batch_execute(&format!("DROP ROLE {role}")).await;

    // Nothing listens: retryable, an outage a waiter rides out.
    let store = open_dyn(
        &StoreUrl::parse("postgres://baton@127.0.0.1:1/baton?connect_timeout=1").expect("url"),
    )
    .expect("open");
    let e = store.acquire(&req).await.expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
    assert!(e.is_retryable(), "{e:#}");
}

/// One TTL policy for every store: 10ms to 7 days.
#[tokio::test(flavor = "current_thread")]
async fn ttls_outside_the_kit_bounds_are_refused() {
    let Some(base) = base_url("ttls_outside_the_kit_bounds_are_refused") else {
        return;
    };
    let store = open_dyn(&StoreUrl::parse(&base).expect("url")).expect("open");
    let k = key("ttl");
    for ttl in [
        Duration::from_millis(5),
        Duration::from_secs(7 * 24 * 3600 + 1),
    ] {
        let e = store
            .acquire(&request(&k, 1, Wait::NoWait, ttl))
            .await
            .expect_err("out of bounds");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{ttl:?}: {e:#}");
    }
    let lease = store
        .acquire(&request(&k, 1, Wait::NoWait, Duration::from_millis(10)))
        .await
        .expect("the shortest TTL");
    store.release(&lease).await.expect("release");
}
