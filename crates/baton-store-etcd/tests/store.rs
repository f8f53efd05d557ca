//! The etcd store's own properties, beyond the shared contract: one release wakes one
//! waiter, first come first served, semaphore hand-over when a predecessor that is not
//! the closest releases, a waiter whose lease was revoked is never granted (etcd issue
//! #11456), a dead waiter's key goes with its lease, a barrier party that dies while it
//! waits stops counting, concurrent arrivals grouped into generations, failover past a dead member, tokens
//! rising across a server restart, a cluster that keeps the limit when its leader dies,
//! and a clear `Unavailable` from a cluster that is down or a connection that hangs.
//!
//! Against `BATON_TEST_ETCD` (and `BATON_TEST_ETCD_CLUSTER`), or private servers started
//! with `scripts/server-etcd`. No test asserts on speed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_conformance::proxy::{Fault, ProxySet};
use baton_conformance::servers::url_from_env;
use baton_core::{
    AcquireRequest, ErrorKind, Holder, Key, Lease, Released, Result, Store, StoreUrl, Wait,
};
use baton_store_etcd::EtcdStore;

use common::{entry, etcdctl, unique_prefix};

const BOUND: Duration = Duration::from_secs(30);

fn server_url(var: &str) -> Option<String> {
    match url_from_env(var) {
        Ok(u) => Some(u),
        Err(why) => {
            baton_conformance::skipped("etcd store test", &why);
            None
        }
    }
}

fn store(url: &str) -> Arc<EtcdStore> {
    let u = StoreUrl::parse(url).expect("a store URL");
    Arc::new(EtcdStore::open(&u).expect("open the etcd store"))
}

fn key(name: &str) -> Key {
    Key::new(format!("store/{name}")).expect("a valid key")
}

fn request(key: &Key, limit: u32, wait: Wait) -> AcquireRequest {
    let mut r = AcquireRequest::new(key.clone(), Holder::current(vec!["test".into()]));
    r.limit = limit;
    r.wait = wait;
    r.ttl = Some(Duration::from_secs(10));
    r
}

/// Waits until `key` has `n` waiters queued.
async fn queued(store: &EtcdStore, key: &Key, n: u32) {
    let start = Instant::now();
    loop {
        let s = store.inspect(key).await.expect("inspect");
        if s.waiters == Some(n) {
            return;
        }
        assert!(
            start.elapsed() < BOUND,
            "'{key}' never had {n} waiters: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Pending = tokio::task::JoinHandle<Result<Lease>>;

fn spawn_acquire(store: &Arc<EtcdStore>, req: AcquireRequest) -> Pending {
    let s = Arc::clone(store);
    tokio::spawn(async move { s.acquire(&req).await })
}

async fn granted(p: Pending) -> Lease {
    tokio::time::timeout(BOUND, p)
        .await
        .expect("the waiter was granted within the liveness bound")
        .expect("the task ran")
        .expect("the waiter was granted")
}

/// A mutex release wakes only the next waiter (the others watch other keys), and waiters
/// are granted in the order they came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_wakes_one_waiter_in_order() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let url = format!("{base}{}", unique_prefix());
    let k = key("fifo");
    let holder = store(&url);
    let first = holder
        .acquire(&request(&k, 1, Wait::NoWait))
        .await
        .expect("the first grant");
    let waiters: Vec<Arc<EtcdStore>> = (0..3).map(|_| store(&url)).collect();
    let mut pending = Vec::new();
    for (i, w) in waiters.iter().enumerate() {
        pending.push(Some(spawn_acquire(w, request(&k, 1, Wait::Forever))));
        queued(&holder, &k, i as u32 + 1).await;
    }
    let mut previous = first;
    for i in 0..3 {
        let before: Vec<u64> = waiters.iter().map(|w| w.wakeups()).collect();
        assert_eq!(
            holder.release(&previous).await.expect("release"),
            Released::Released
        );
        let lease = granted(pending[i].take().expect("pending")).await;
        assert!(lease.token > previous.token, "tokens must rise");
        // Those still waiting were not woken by a release that was not theirs to see.
        for (j, w) in waiters.iter().enumerate().skip(i + 1) {
            assert_eq!(
                w.wakeups(),
                before[j],
                "waiter {j} woke when waiter {i}'s predecessor released"
            );
            assert!(
                !pending[j].as_ref().expect("pending").is_finished(),
                "waiter {j} was granted before waiter {i} released"
            );
        }
        previous = lease;
    }
    assert_eq!(
        holder.release(&previous).await.expect("release"),
        Released::Released
    );
}

/// A 2-slot semaphore: the fourth request waits behind two holders and a waiter; when the
/// first holder releases, the waiter gets its slot; when the second holder (not the
/// fourth request's closest predecessor) releases, the fourth is granted too. Watching
/// only the closest predecessor would miss that wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_hands_over_past_a_non_adjacent_release() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let url = format!("{base}{}", unique_prefix());
    let k = key("semaphore");
    let s = store(&url);
    // A TTL long enough that the waiters' own keep-alive (every third of it), after which
    // a waiter also looks again, cannot hide a missed wake-up within the liveness bound.
    let request = |k: &Key, limit: u32, wait: Wait| {
        let mut r = request(k, limit, wait);
        r.ttl = Some(Duration::from_secs(120));
        r
    };
    let h1 = s.acquire(&request(&k, 2, Wait::NoWait)).await.expect("h1");
    let h2 = s.acquire(&request(&k, 2, Wait::NoWait)).await.expect("h2");
    assert_ne!(h1.slot, h2.slot);
    let w3 = spawn_acquire(&store(&url), request(&k, 2, Wait::Forever));
    queued(&s, &k, 1).await;
    let w4 = spawn_acquire(&store(&url), request(&k, 2, Wait::Forever));
    queued(&s, &k, 2).await;

    assert_eq!(
        s.release(&h1).await.expect("release h1"),
        Released::Released
    );
    let l3 = granted(w3).await;
    assert_eq!(l3.slot, h1.slot, "the freed slot number is reused");
    assert!(
        !w4.is_finished(),
        "the fourth request overtook: 3 holders of 2 slots"
    );

    assert_eq!(
        s.release(&h2).await.expect("release h2"),
        Released::Released
    );
    let l4 = granted(w4).await;
    assert_eq!(l4.slot, h2.slot);
    assert!(l4.token > l3.token);
    let status = s.inspect(&k).await.expect("inspect");
    assert_eq!(status.held(), 2, "{status:?}");
    for l in [l3, l4] {
        assert_eq!(s.release(&l).await.expect("release"), Released::Released);
    }
}

/// etcd issue #11456: a waiter whose lease is revoked while it waits must get an error
/// when its turn comes, never a grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_whose_lease_was_revoked_is_not_granted() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let url = format!("{base}{}", unique_prefix());
    let k = key("revoked-waiter");
    let s = store(&url);
    let held = s
        .acquire(&request(&k, 1, Wait::NoWait))
        .await
        .expect("grant");
    let waiter = spawn_acquire(&store(&url), request(&k, 1, Wait::Forever));
    queued(&s, &k, 1).await;

    // The waiter's lease id is the last part of its waiter key.
    let listing = etcdctl(
        &url,
        &[
            "get",
            "--prefix",
            "--keys-only",
            &entry(&url, &k, "#w/").expect("name"),
        ],
    )
    .expect("list waiter keys");
    let held_id = listing
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.rsplit('/').next().unwrap_or("").to_owned())
        .collect::<Vec<_>>();
    assert_eq!(held_id.len(), 2, "a holder and a waiter: {listing}");
    // Which one is the waiter: not the holder's (revoke both candidates' leases except
    // the holder's, found through its slot key).
    let slot_lease = etcdctl(
        &url,
        &["get", &entry(&url, &k, "#s/0").expect("name"), "-w", "json"],
    )
    .expect("read the slot key");
    let waiter_id = held_id
        .iter()
        .find(|id| {
            let n = i64::from_str_radix(id, 16).unwrap_or(0);
            !slot_lease.contains(&format!("\"lease\":{n}"))
        })
        .expect("the waiter's lease id")
        .clone();
    etcdctl(&url, &["lease", "revoke", &waiter_id]).expect("revoke the waiter's lease");

    assert_eq!(s.release(&held).await.expect("release"), Released::Released);
    let outcome = tokio::time::timeout(BOUND, waiter)
        .await
        .expect("the waiter answered within the liveness bound")
        .expect("the task ran");
    match outcome {
        Ok(lease) => panic!("a waiter whose lease was revoked was granted {lease:?}"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Lost, "{e:#}"),
    }
    let status = s.inspect(&k).await.expect("inspect");
    assert_eq!((status.held(), status.waiters), (0, Some(0)), "{status:?}");
}

/// A waiter that died where this host cannot see it (another host) blocks the queue only
/// until etcd expires its lease; then the next waiter is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_remote_waiter_goes_with_its_lease() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let url = format!("{base}{}", unique_prefix());
    let k = key("dead-waiter");
    let s = store(&url);
    // Create the key (limit 1), then plant a waiter from "another host" with a 2 s lease
    // that nobody keeps alive.
    let l = s
        .acquire(&request(&k, 1, Wait::NoWait))
        .await
        .expect("grant");
    let mut ghost = Holder::current(vec!["ghost".into()]);
    ghost.host = "some-other-host".into();
    let value = serde_json::json!({ "holder": ghost, "ttl_ms": 2000 }).to_string();
    let granted_lease = etcdctl(&url, &["lease", "grant", "2"]).expect("lease grant");
    let lease_hex = granted_lease
        .split_whitespace()
        .nth(1)
        .expect("etcdctl prints: lease ID granted with TTL(2s)")
        .to_owned();
    let ghost_key = entry(&url, &k, &format!("#w/{lease_hex:0>16}")).expect("name");
    etcdctl(
        &url,
        &["put", &format!("--lease={lease_hex}"), &ghost_key, &value],
    )
    .expect("plant the waiter");
    assert_eq!(s.release(&l).await.expect("release"), Released::Released);

    let lease = s
        .acquire(&request(&k, 1, Wait::Timeout(BOUND)))
        .await
        .expect("granted once the dead waiter's lease ran out");
    let left = etcdctl(&url, &["get", &ghost_key]).expect("read");
    assert!(
        left.trim().is_empty(),
        "the dead waiter's key is still there: {left}"
    );
    assert_eq!(
        s.release(&lease).await.expect("release"),
        Released::Released
    );
}

/// A handle reuses the etcd lease of a released grant for its next grant: the old grant
/// stays released (its renew answers lost, its release not-held) and the new one works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_lease_never_revives_an_old_grant() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let url = format!("{base}{}", unique_prefix());
    let s = store(&url);
    let k = key("reuse");
    let old = s
        .acquire(&request(&k, 1, Wait::NoWait))
        .await
        .expect("grant");
    assert_eq!(s.release(&old).await.expect("release"), Released::Released);
    let new = s
        .acquire(&request(&k, 1, Wait::NoWait))
        .await
        .expect("grant again");
    assert!(new.token > old.token);
    let e = s
        .renew(&old)
        .await
        .expect_err("the released grant cannot be renewed");
    assert_eq!(e.kind(), ErrorKind::Lost, "{e:#}");
    assert_eq!(s.release(&old).await.expect("release"), Released::NotHeld);
    assert_eq!(s.inspect(&k).await.expect("inspect").held(), 1);
    s.renew(&new).await.expect("the new grant renews");
    // Another handle releases it too (it finds the lease through the slot key).
    let other = store(&url);
    assert_eq!(
        other.release(&new).await.expect("release"),
        Released::Released
    );
    assert_eq!(s.release(&new).await.expect("release"), Released::NotHeld);
}

/// The first endpoint is dead (nothing listens): operations go through the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_past_a_dead_member() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let live = base.strip_prefix("etcd://").expect("an etcd URL");
    let url = format!(
        "etcd://127.0.0.1:{dead_port},{live}{}?connect_timeout=500ms",
        unique_prefix()
    );
    let s = store(&url);
    let k = key("failover");
    let lease = s
        .acquire(&request(&k, 1, Wait::NoWait))
        .await
        .expect("acquire through the live member");
    let renewed = s.renew(&lease).await.expect("renew");
    assert!(renewed.sent_at >= lease.sent_at);
    assert_eq!(s.inspect(&k).await.expect("inspect").held(), 1);
    assert_eq!(
        s.release(&lease).await.expect("release"),
        Released::Released
    );
}

/// Nothing listens, or a listener accepts and never answers: every operation fails with
/// `Unavailable` naming the members, within its bound, never hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_or_silent_cluster_is_unavailable() {
    let refused = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let refused_port = refused.local_addr().expect("addr").port();
    drop(refused);
    // Accepts connections and never answers (a black hole).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let silent_port = silent.local_addr().expect("addr").port();
    let _keep = std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().flatten() {
            held.push(c);
        }
    });
    for url in [
        format!("etcd://127.0.0.1:{refused_port}?timeout=1s&connect_timeout=500ms"),
        format!("etcd://127.0.0.1:{silent_port}?timeout=1s&connect_timeout=500ms"),
    ] {
        let s = store(&url);
        let k = key("down");
        let e = tokio::time::timeout(BOUND, s.acquire(&request(&k, 1, Wait::Forever)))
            .await
            .expect("the acquire answered within the bound")
            .expect_err("no grant from a cluster that is down");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{url}: {e:#}");
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
        let e = tokio::time::timeout(BOUND, s.inspect(&k))
            .await
            .expect("inspect answered within the bound")
            .expect_err("no status from a cluster that is down");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{url}: {e:#}");
    }
}

/// A connection that goes silent mid-use (every byte held, both ways, by a fault proxy):
/// renew and acquire answer `Unavailable` within their bound instead of hanging, and once
/// the traffic flows again the same handle works. The proxy is made and dropped outside
/// any runtime (it owns one).
#[test]
fn black_holed_connection_is_bounded_and_heals() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let proxies = ProxySet::start(&format!(
        "{base}{}?timeout=1s&connect_timeout=500ms",
        unique_prefix()
    ))
    .expect("a fault proxy in front of etcd");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let s = store(proxies.url());
        let k = key("black-hole");
        let lease = s
            .acquire(&request(&k, 1, Wait::NoWait))
            .await
            .expect("grant through the proxy");
        proxies.set(Fault::Partition);
        let e = tokio::time::timeout(BOUND, s.renew(&lease))
            .await
            .expect("renew answered within the bound")
            .expect_err("no renewal through a black hole");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
        let other = key("black-hole-other");
        let e = tokio::time::timeout(BOUND, s.acquire(&request(&other, 1, Wait::Forever)))
            .await
            .expect("acquire answered within the bound")
            .expect_err("no grant through a black hole");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
        assert!(
            e.grant_unknown(),
            "an acquire cut off mid-request may still be granted later: {e:#}"
        );
        proxies.set(Fault::Pass);
        let start = Instant::now();
        loop {
            match s.renew(&lease).await {
                Ok(_) => break,
                Err(e) if e.kind() == ErrorKind::Unavailable && start.elapsed() < BOUND => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("renew after the black hole lifted: {e:#}"),
            }
        }
        assert_eq!(
            s.release(&lease).await.expect("release"),
            Released::Released
        );
    });
    rt.shutdown_background();
    drop(proxies);
}

/// The environment variable that makes [`__barrier_party`] arrive at a barrier:
/// `<url> <key> <remote|local>`.
const BARRIER_PARTY_ENV: &str = "BATON_ETCD_TEST_BARRIER_PARTY";

/// Starts this test binary as a separate process that arrives at barrier `k` (2 parties)
/// and waits forever; `remote` makes its holder claim another host, so that nothing but
/// its etcd lease can tell it died.
fn barrier_party(url: &str, k: &Key, remote: bool) -> std::process::Child {
    let exe = std::env::current_exe().expect("the test binary's path");
    std::process::Command::new(exe)
        .args([
            "__barrier_party",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env(
            BARRIER_PARTY_ENV,
            format!(
                "{url} {} {}",
                k.as_str(),
                if remote { "remote" } else { "local" }
            ),
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start a barrier party process")
}

/// How many arrivals barrier `k` has, in any generation (read with `etcdctl`).
fn barrier_arrivals(url: &str, k: &Key) -> usize {
    etcdctl(
        url,
        &[
            "get",
            "--prefix",
            "--keys-only",
            &entry(url, k, "#b/").expect("name"),
        ],
    )
    .expect("list barrier arrivals")
    .lines()
    .filter(|l| !l.trim().is_empty())
    .count()
}

/// Waits until barrier `k` has `n` arrivals; the time it took.
async fn barrier_arrivals_become(url: &str, k: &Key, n: usize, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let have = barrier_arrivals(url, k);
        if have == n {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "barrier '{k}' still has {have} arrivals, not {n}, after {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn barrier_request(k: &Key, parties: u32, wait: Wait) -> baton_core::BarrierRequest {
    baton_core::BarrierRequest {
        key: k.clone(),
        parties,
        wait,
        holder: Holder::current(vec!["test".into()]),
    }
}

/// A party whose process dies (SIGKILL) while it waits at a barrier of 2 leaves no
/// phantom: on another host (as far as anyone can tell) its arrival is gone within
/// `ARRIVAL_TTL` (plus etcd's expiry check) once its lease is no longer kept alive; on
/// this host the next arrival sees its process is gone and withdraws it at once. Either
/// way a lone party then does not pass, and two live parties pass together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_party_that_dies_while_waiting_stops_counting() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let url = format!("{base}{}", unique_prefix());
    let s = store(&url);
    for remote in [true, false] {
        let k = key(if remote {
            "barrier-remote"
        } else {
            "barrier-local"
        });
        let mut child = barrier_party(&url, &k, remote);
        barrier_arrivals_become(&url, &k, 1, BOUND).await;
        child.kill().expect("kill the waiting party");
        child.wait().expect("reap the waiting party");
        if remote {
            // Only etcd's lease expiry removes it: within the TTL of the last keep-alive,
            // etcd's expiry check (500 ms), and a margin for a slow machine.
            let bound = baton_store_etcd::ARRIVAL_TTL + Duration::from_secs(3);
            let took = barrier_arrivals_become(&url, &k, 0, bound).await;
            eprintln!("the dead remote party's arrival went after {took:?}");
        }
        let lone = s.barrier(&barrier_request(&k, 2, Wait::NoWait)).await;
        assert_eq!(
            lone.as_ref().map_err(|e| e.kind()).err(),
            Some(ErrorKind::Busy),
            "a lone party passed with a dead one (remote: {remote}): {lone:?}"
        );
        assert_eq!(barrier_arrivals(&url, &k), 0, "the dead arrival stayed");
        let other = store(&url);
        let req = barrier_request(&k, 2, Wait::Timeout(BOUND));
        let r2 = req.clone();
        let first = tokio::spawn(async move { other.barrier(&r2).await });
        let second = s.barrier(&req).await.expect("the second of 2 live parties");
        let first = tokio::time::timeout(BOUND, first)
            .await
            .expect("the first party answered")
            .expect("the task ran")
            .expect("the first of 2 live parties");
        assert_eq!((first.generation, second.generation), (0, 0));
        assert_eq!(barrier_arrivals(&url, &k), 0, "arrivals left behind");
    }
}

/// 24 parties arrive at once at a barrier of 4, through 3 store handles: guarded
/// transactions that fail under contention read again, so they form exactly 6
/// generations of 4, numbered 0 to 5, and leave no arrival behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_groups_concurrent_arrivals() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let url = format!("{base}{}", unique_prefix());
    let k = key("barrier-crowd");
    let handles: Vec<Arc<EtcdStore>> = (0..3).map(|_| store(&url)).collect();
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let s = Arc::clone(&handles[i % 3]);
            let req = barrier_request(&k, 4, Wait::Timeout(BOUND));
            tokio::spawn(async move { s.barrier(&req).await })
        })
        .collect();
    let mut count = [0u32; 6];
    for t in tasks {
        let p = tokio::time::timeout(BOUND * 2, t)
            .await
            .expect("a party answered")
            .expect("the task ran")
            .expect("a party passed");
        let g = usize::try_from(p.generation).expect("a small generation");
        assert!(g < 6, "generation {g} of 24 arrivals in groups of 4");
        count[g] += 1;
    }
    assert_eq!(count, [4; 6], "parties per generation");
    assert_eq!(barrier_arrivals(&url, &k), 0, "arrivals left behind");
}

/// The barrier party process of [`barrier_party_that_dies_while_waiting_stops_counting`]
/// (does nothing unless started by it).
#[test]
fn __barrier_party() {
    let Ok(job) = std::env::var(BARRIER_PARTY_ENV) else {
        return;
    };
    let mut parts = job.split(' ');
    let (Some(url), Some(k), Some(how)) = (parts.next(), parts.next(), parts.next()) else {
        panic!("{BARRIER_PARTY_ENV} is not '<url> <key> <remote|local>': {job}");
    };
    let s = store(url);
    let mut req = barrier_request(&Key::new(k).expect("a key"), 2, Wait::Forever);
    if how == "remote" {
        req.holder.host = "some-other-host".into();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let r = rt.block_on(s.barrier(&req));
    panic!("the party was meant to wait until killed, but: {r:?}");
}

fn delayed(key: &Key, wait: Wait, delay: Duration) -> AcquireRequest {
    let mut r = request(key, 1, wait);
    r.lock_delay = Some(delay);
    r
}

#[tokio::test]
async fn lock_delay_holds_back_a_broken_slot_and_garbage_is_corrupt() {
    let Some(base) = server_url("BATON_TEST_ETCD") else {
        return;
    };
    let url = format!("{base}{}", unique_prefix());
    let s = store(&url);
    assert!(s.capabilities().lock_delay);
    let k = key("delayed");
    let minute = Duration::from_secs(60);
    let a = s
        .acquire(&delayed(&k, Wait::NoWait, minute))
        .await
        .expect("grant");
    let st = s.inspect(&k).await.expect("inspect");
    assert_eq!(st.lock_delay_ms, Some(60_000));
    // A held slot shows when its lease was renewed and expires (estimates from etcd's
    // lease clock, whole seconds).
    let held = &st.slots[0];
    let (renewed, expires) = (
        held.renewed_unix_ms.expect("renewed"),
        held.expires_unix_ms.expect("expires"),
    );
    assert!(renewed <= expires, "{held:?}");
    assert!(expires - renewed <= 11_000, "{held:?}");
    // A clean release never waits, and a later request cannot change the delay.
    assert_eq!(s.release(&a).await.expect("release"), Released::Released);
    let b = s
        .acquire(&delayed(&k, Wait::NoWait, Duration::from_secs(1)))
        .await
        .expect("granted at once after a clean release");
    s.break_lease(&k, None).await.expect("break");
    let err = s
        .acquire(&delayed(&k, Wait::NoWait, minute))
        .await
        .expect_err("held back");
    assert_eq!(err.kind(), ErrorKind::Busy, "{err:#}");
    assert!(err.to_string().contains("lock-delay of 1m"), "{err:#}");
    let st = s.inspect(&k).await.expect("inspect");
    assert!(
        st.slots[0]
            .note
            .as_deref()
            .is_some_and(|n| n.starts_with("held back") && n.contains("free again in about")),
        "{st:?}"
    );
    assert_eq!(st.waiters, Some(0), "no residue of the refused request");
    assert_eq!(s.release(&b).await.expect("release"), Released::NotHeld);

    // A hold-back without an etcd lease, or a garbage delay, is Corrupt.
    let hold = entry(&url, &k, "#h/0").expect("name");
    etcdctl(&url, &["put", &hold, "{}"]).expect("put a leaseless hold");
    let err = s
        .acquire(&delayed(&k, Wait::NoWait, minute))
        .await
        .expect_err("corrupt");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err:#}");
    etcdctl(&url, &["del", &hold]).expect("delete it");
    etcdctl(
        &url,
        &["put", &entry(&url, &k, "#delay").expect("name"), "soon"],
    )
    .expect("put a garbage delay");
    let err = s.inspect(&k).await.expect_err("corrupt");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err:#}");
}
