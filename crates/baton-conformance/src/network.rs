//! The networked-store properties: the contract over a network that fails (a partition
//! between holder and server, a server restart, a cluster losing its leader).
//!
//! [`crate::suite!`] runs them for a store whose harness says how to start its servers
//! ([`crate::Harness::servers`]). [`partition_loses_before_regrant`] needs only the
//! harness's URL (whose `host:port` endpoints get a [`crate::proxy::FaultProxy`] each) and
//! its [`crate::LeaseTiming`]. [`restart_keeps_tokens_rising`], [`leader_kill_keeps_limit`]
//! and [`frozen_server_loses_before_regrant`] restart, kill or freeze a server, so the
//! suite gives them a private server of their own ([`crate::servers::Server`]) rather than
//! the one the other tests share.

use std::time::{Duration, Instant};

use baton_core::{ErrorKind, KeeperConfig, Lease, Released, Token, Wait};

use crate::group::{largest_grace, stubborn_script};
use crate::history::{check_limit, check_tokens, Event};
use crate::lease::superseded_holder_gave_up;
use crate::proxy::{Fault, ProxySet};
use crate::servers::Server;
use crate::support::{bounded, report, Keep, Lab};
use crate::worker::Task;
use crate::{fence, instant_ns, monotonic_ns, Harness, LIVENESS_BOUND};

/// What [`partition_loses_before_regrant`] measured.
#[derive(Clone, Copy, Debug)]
pub struct PartitionReport {
    /// From the partitioned holder's child being dead (killed and reaped) to the earliest
    /// moment the store can have granted the slot again (the new lease's send time).
    pub child_dead_to_regrant: Duration,
    /// From the start of the partition to the new holder's grant.
    pub partition_to_grant: Duration,
}

/// Contract points 2, 3 and 5 across a partition: "a partitioned holder cannot be stopped
/// by any lock", so it must stop itself, before the store can grant its slot again.
///
/// A worker process opens the store through a fault proxy, acquires with the lease TTL,
/// keeps the lease with a keeper, runs a child that is slow to stop (under the largest
/// kill grace the TTL allows) as `baton run` does, and writes once through a fence. The
/// test then partitions it from the server (the proxy holds all traffic, both ways, for
/// longer than the TTL) and acquires the key straight from the server. Checked:
/// - the holder declares the lease lost and its child's whole group is dead (stopped and
///   reaped) before the new lease's send time, and before its own last successful
///   renewal's send time plus the TTL (the earliest the server can expire the lease);
/// - the new grant has a higher token, and its write through the fence is accepted;
/// - after the partition heals, the old holder never silently resumes: one more renewal
///   answers lost or not-held, its release answers not-held (the new holder keeps the
///   slot), and its write with the old token is refused by the fence.
pub async fn partition_loses_before_regrant(h: &Harness) -> PartitionReport {
    let mut lab = Lab::new(h, "partition_loses_before_regrant");
    let timing = lab.lease_timing();
    let validity = KeeperConfig::for_ttl(timing.ttl).validity();
    let grace = largest_grace(&KeeperConfig::for_ttl(timing.ttl));
    let key = lab.key("partition");
    let db = lab.path("fenced.db");
    let after_loss = lab.path("after-loss");
    let proxies = ProxySet::start(h.url())
        .unwrap_or_else(|e| panic!("cannot put a fault proxy in front of the store: {e}"));
    let mut old = lab.spawn_keeper(
        &key,
        1,
        Keep {
            fence: Some(db.clone()),
            after_loss: Some(after_loss.clone()),
            // A command slow to stop (a slow SIGTERM handler, a grandchild that ignores
            // SIGTERM) under the largest grace the TTL allows: all of it must be dead in
            // time.
            child: true,
            child_script: Some(stubborn_script(&lab.path("pids"), grace / 2)),
            grace,
            url: Some(proxies.url().to_owned()),
            ..Keep::default()
        },
    );
    let old_lease = lab.lease_of(&mut old).await;
    lab.wait_for(&mut old, "its write through the fence", |e| {
        matches!(e, Event::FenceWrite { .. })
    })
    .await;
    lab.wait_for(&mut old, "a renewal", |e| {
        matches!(e, Event::Renewed { ok: true, .. } | Event::Lost { .. })
    })
    .await;

    let partitioned = Instant::now();
    let partition_ns = monotonic_ns();
    proxies.set(Fault::Partition);
    let bound = timing.recovery() + LIVENESS_BOUND;
    let req = lab.lease_request(&key, 1, Wait::Timeout(bound));
    let new_lease = lab.acquire(&req).await.unwrap_or_else(|e| {
        panic!(
            "the slot of a holder partitioned past its TTL ({:?}) did not come back within \
             {bound:?}: {e:#}",
            timing.ttl
        )
    });
    let partition_to_grant = partitioned.elapsed();
    let regrant_ns = instant_ns(new_lease.sent_at.unwrap_or_else(|| {
        panic!(
            "a lease store's lease has no sent_at (Lease::sent_at); every lease store must set it"
        )
    }));
    assert!(
        new_lease.token > old_lease.token,
        "the new holder's token {} is not above the partitioned holder's {}",
        new_lease.token,
        old_lease.token
    );
    let write = fence::write(&db, &key, new_lease.token);
    lab.record(write.clone());
    assert!(
        matches!(write, Event::FenceWrite { accepted: true, .. }),
        "the new holder's write through the fence was refused: {write:?}"
    );

    // The partitioned holder must have stopped (it keeps running: only its traffic is held).
    // The worker records its child's death (after the reap) as `killed` with the child's
    // pid; nothing else in this history is killed.
    let waited = Instant::now();
    let child_dead = loop {
        if let Some(t) = lab.events().iter().find_map(|e| match e {
            Event::Killed { t_ns, .. } => Some(*t_ns),
            _ => None,
        }) {
            break t;
        }
        if let Some(status) = old.exited() {
            panic!(
                "the partitioned holder exited ({status}) before killing its child: {}",
                old.stderr_text()
            );
        }
        assert!(
            waited.elapsed() < LIVENESS_BOUND,
            "the partitioned holder did not kill its child within {LIVENESS_BOUND:?}\n(history: {})",
            lab.history.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let events = lab.events();
    let old_pid = old.pid();
    let mine = |e: &&Event| e.pid() == old_pid;
    assert!(
        events
            .iter()
            .filter(mine)
            .any(|e| matches!(e, Event::Lost { .. })),
        "the partitioned holder's keeper never declared its lease lost\n(history: {})",
        lab.history.display()
    );
    // The earliest the server can expire the old lease: its last successful renewal's
    // send time (or the grant's request time) plus the TTL.
    let last_proof_ns = events
        .iter()
        .filter(mine)
        .filter_map(|e| match e {
            Event::Renewed {
                token,
                t_sent_ns,
                ok: true,
                ..
            } if *token == old_lease.token => Some(*t_sent_ns),
            Event::Grant { t_request_ns, .. } => Some(*t_request_ns),
            _ => None,
        })
        .max()
        .unwrap_or(partition_ns);
    let server_expiry_ns = last_proof_ns + timing.ttl.as_nanos() as u64;
    assert!(
        child_dead < regrant_ns && child_dead < server_expiry_ns,
        "loss before re-grant broken across a partition: the holder's child died {} after \
         the new lease was sent and {} after the earliest server expiry\n(history: {})",
        ms(regrant_ns, child_dead),
        ms(server_expiry_ns, child_dead),
        lab.history.display()
    );

    // Heal; the old holder asks the store once more, releases and writes with its old token.
    proxies.set(Fault::Pass);
    std::fs::write(&after_loss, b"go").expect("the after-loss signal");
    old.finish(LIVENESS_BOUND).await;
    superseded_holder_gave_up(
        &lab, &db, old_pid, &old_lease, &new_lease, child_dead, "healed",
    )
    .await;

    let measured = PartitionReport {
        child_dead_to_regrant: Duration::from_nanos(regrant_ns.saturating_sub(child_dead)),
        partition_to_grant,
    };
    report(&format!(
        "partition_loses_before_regrant on {}: TTL {:?} (keeper validity {validity:?}); the \
         partitioned holder's child was dead {:?} before the store could grant the slot \
         again; partition -> new grant in {:?}",
        lab.store.url(),
        timing.ttl,
        measured.child_dead_to_regrant,
        measured.partition_to_grant
    ));
    measured
}

fn ms(from_ns: u64, to_ns: u64) -> String {
    format!("{:.1}ms", (to_ns as i128 - from_ns as i128) as f64 / 1e6)
}

/// Retries `op` on `Unavailable` errors (a server coming back) for up to the liveness
/// bound; returns its last result.
async fn until_available<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = baton_core::Result<T>>,
{
    let start = Instant::now();
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if e.kind() == ErrorKind::Unavailable && start.elapsed() < LIVENESS_BOUND => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e:#}"),
        }
    }
}

/// Contract point 2, **Fencing**, across a server restart: "every grant returns a token
/// greater than every earlier token for that key, even after the store restarts".
///
/// `server` is a private server the harness's URL points at. The test takes leases on a
/// mutex and a 2-slot semaphore, restarts the server (`scripts/server-NAME restart`), and
/// takes more through the old store handle (which must reconnect) and a new one: every
/// token must be above every earlier token of its key. Returns how long the store took to
/// answer again.
pub async fn restart_keeps_tokens_rising(h: &Harness, server: &Server) -> Duration {
    let lab = Lab::new(h, "restart_keeps_tokens_rising");
    let keys = [(lab.key("mutex"), 1u32), (lab.key("semaphore"), 2u32)];
    // Tokens are per key: each key's history, in grant order.
    let mut before: Vec<Vec<Token>> = vec![Vec::new(); keys.len()];
    for ((key, limit), seen) in keys.iter().zip(&mut before) {
        for _ in 0..3 {
            let lease = lab.grant(&lab.request(key, *limit, Wait::NoWait)).await;
            assert_eq!(lab.release(&lease).await, Released::Released);
            seen.push(lease.token);
        }
    }
    let restarted = Instant::now();
    server
        .run("restart")
        .unwrap_or_else(|e| panic!("cannot restart the server: {e}"));
    let reopened = h.open();
    let mut back_after = None;
    for store in [&lab.store, &reopened] {
        for ((key, limit), seen) in keys.iter().zip(&mut before) {
            let req = lab.request(key, *limit, Wait::Timeout(Duration::from_secs(5)));
            let lease: Lease =
                until_available(&format!("acquire '{key}' after the server restart"), || {
                    lab.acquire_on(store.as_ref(), &req)
                })
                .await;
            back_after.get_or_insert_with(|| restarted.elapsed());
            let max_before = seen.iter().max().copied().expect("tokens before");
            assert!(
                lease.token > max_before,
                "after a server restart, '{key}' granted token {} (its tokens before: {seen:?})",
                lease.token
            );
            assert_eq!(
                lab.release_on(store.as_ref(), &lease).await,
                Released::Released
            );
            seen.push(lease.token);
        }
    }
    let back = back_after.unwrap_or_default();
    report(&format!(
        "restart_keeps_tokens_rising on {}: the store answered {back:?} after the restart \
         began; tokens kept rising",
        lab.store.url()
    ));
    back
}

/// What [`leader_kill_keeps_limit`] measured.
#[derive(Clone, Copy, Debug)]
pub struct LeaderKillReport {
    /// Grants in the run.
    pub grants: usize,
    /// From the leader's SIGKILL to the first grant asked for after it.
    pub kill_to_next_grant: Duration,
}

/// Contract points 1 and 2 while a cluster loses its leader: no two holders at once, tokens
/// rising, and the lock usable again.
///
/// Four worker processes churn on a mutex (acquire, hold up to 20 ms, release, again),
/// through every endpoint of the harness's URL, which names `cluster`'s members. Half a
/// second in, the test SIGKILLs the cluster's leader (`scripts/server-NAME kill-leader`),
/// lets the workers go on for a few seconds, then stops them and revives the member. A
/// failed or timed-out operation is recorded with an unknown outcome; the checkers see
/// only grants the store answered. Returns the grant count and the time from the kill to
/// the first grant asked for after it.
pub async fn leader_kill_keeps_limit(h: &Harness, cluster: &Server) -> LeaderKillReport {
    let mut lab = Lab::new(h, "leader_kill_keeps_limit");
    let key = lab.key("leader-kill");
    let start = lab.path("start");
    let stop = lab.path("stop");
    let mut workers: Vec<_> = (0..4)
        .map(|_| {
            lab.spawn(
                &key,
                1,
                Task::Churn {
                    start: start.clone(),
                    stop: stop.clone(),
                    max_hold_us: 20_000,
                },
            )
        })
        .collect();
    std::fs::write(&start, b"go").expect("the start signal");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kill_ns = monotonic_ns();
    let killed = cluster
        .run("kill-leader")
        .unwrap_or_else(|e| panic!("cannot kill the cluster's leader: {e}"));
    lab.record(Event::Killed {
        pid: 0,
        t_ns: kill_ns,
    });
    // Long enough for a new election and for leases of the old term to run out.
    tokio::time::sleep(Duration::from_secs(6)).await;
    std::fs::write(&stop, b"stop").expect("the stop signal");
    for w in &mut workers {
        w.finish(LIVENESS_BOUND + Duration::from_secs(10)).await;
    }
    let revived = cluster.run("revive");

    let events = lab.events();
    if let Err(violation) = check_limit(&events, &key, 1) {
        panic!(
            "two holders while the cluster lost its leader: {violation}\n(history: {})",
            lab.history.display()
        );
    }
    if let Err(violation) = check_tokens(&events, &key, 1) {
        panic!(
            "tokens while the cluster lost its leader: {violation}\n(history: {})",
            lab.history.display()
        );
    }
    let grants = events
        .iter()
        .filter(|e| matches!(e, Event::Grant { .. }))
        .count();
    let next_grant_ns = events
        .iter()
        .filter_map(|e| match e {
            Event::Grant { t_request_ns, t_ns, .. } if *t_request_ns >= kill_ns => Some(*t_ns),
            _ => None,
        })
        .min()
        .unwrap_or_else(|| {
            panic!(
                "no grant after the leader was killed ({}): the lock never came back\n(history: {})",
                killed.trim(),
                lab.history.display()
            )
        });
    // The survivors still serve this handle.
    let req = lab.request(&key, 1, Wait::Timeout(Duration::from_secs(10)));
    let lease = bounded(
        "an acquire after the leader kill",
        LIVENESS_BOUND,
        until_available("acquire after the leader kill", || lab.store.acquire(&req)),
    )
    .await;
    assert_eq!(lab.release(&lease).await, Released::Released);
    revived.unwrap_or_else(|e| panic!("cannot revive the killed member: {e}"));
    let measured = LeaderKillReport {
        grants,
        kill_to_next_grant: Duration::from_nanos(next_grant_ns - kill_ns),
    };
    report(&format!(
        "leader_kill_keeps_limit on {}: killed {}; {} grants, no overlap; first grant asked \
         for after the kill came {:?} after it",
        lab.store.url(),
        killed.trim(),
        measured.grants,
        measured.kill_to_next_grant
    ));
    measured
}

/// Contract point 3 against a frozen server (SIGSTOPped: it stops answering without
/// closing a connection, as a paused VM or a stuck disk does), on a private server.
///
/// A holder keeps its lease and runs a command slow to stop (a slow SIGTERM handler, a
/// grandchild that ignores SIGTERM) under the largest grace its TTL allows. The server is
/// frozen: renewals hang, the holder's keeper declares the lease lost by its deadline, and
/// its command's whole group is stopped — all while the server cannot answer. The server
/// is thawed and a new holder acquires the key. Checked: the old command's group was gone
/// (as the holder recorded it, after the reap) before the new lease's send time, and the
/// new token is higher.
pub async fn frozen_server_loses_before_regrant(h: &Harness, server: &Server) {
    let mut lab = Lab::new(h, "frozen_server_loses_before_regrant");
    let timing = lab.lease_timing();
    let grace = largest_grace(&KeeperConfig::for_ttl(timing.ttl));
    let key = lab.key("frozen");
    let mut old = lab.spawn_keeper(
        &key,
        1,
        Keep {
            child: true,
            child_script: Some(stubborn_script(&lab.path("pids"), grace / 2)),
            grace,
            ..Keep::default()
        },
    );
    let old_lease = lab.lease_of(&mut old).await;
    lab.wait_for(&mut old, "a renewal", |e| {
        matches!(e, Event::Renewed { ok: true, .. } | Event::Lost { .. })
    })
    .await;
    server
        .run("freeze")
        .unwrap_or_else(|e| panic!("cannot freeze the server: {e}"));
    // The worker records its command's death (after the reap) as `killed` with the
    // command's pid; nothing else in this history is killed.
    let waited = Instant::now();
    let gone = loop {
        if let Some(e) = lab
            .events()
            .into_iter()
            .find(|e| matches!(e, Event::Killed { .. }))
        {
            break e;
        }
        assert!(
            waited.elapsed() < timing.ttl + LIVENESS_BOUND,
            "the holder's command was not stopped while the server was frozen: {}",
            old.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    server
        .run("thaw")
        .unwrap_or_else(|e| panic!("cannot thaw the server: {e}"));
    let bound = timing.recovery() + LIVENESS_BOUND;
    let req = lab.lease_request(&key, 1, Wait::Timeout(bound));
    let new_lease = until_available("acquire after the server thawed", || lab.acquire(&req)).await;
    assert!(
        new_lease.token > old_lease.token,
        "the new token {} is not above the frozen-out holder's {}",
        new_lease.token,
        old_lease.token
    );
    let regrant_ns = instant_ns(
        new_lease
            .sent_at
            .unwrap_or_else(|| panic!("a lease store's lease has no sent_at (Lease::sent_at)")),
    );
    assert!(
        gone.t_ns() <= regrant_ns,
        "the old holder's command group was gone only {:?} after the new lease was sent",
        Duration::from_nanos(gone.t_ns() - regrant_ns)
    );
    assert_eq!(lab.release(&new_lease).await, Released::Released);
    old.finish(LIVENESS_BOUND).await;
    report(&format!(
        "frozen_server_loses_before_regrant on {}: the command's group was gone {:?} before the \
         re-grant (grace {grace:?}, TTL {:?})",
        h.url(),
        Duration::from_nanos(regrant_ns - gone.t_ns()),
        timing.ttl
    ));
}
