//! Properties of what a store declares: its [`Capabilities`](baton_core::Capabilities)
//! are honest, its waiters are served in order when it says FIFO, and its waiters ride
//! out a restart of its server.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_core::{
    BarrierRequest, ErrorKind, Recovery as Bound, Released, Resize, Store, StoreExt, Wait,
};

use crate::servers::Server;
use crate::support::{bounded, report, Lab};
use crate::{Harness, Recovery, LIVENESS_BOUND};

/// Every capability the store declares works, and every one it does not declare answers
/// `Unsupported` (so a forgotten method cannot pass as "not declared", and a declared one
/// cannot hide behind the trait's default):
/// - renew, break, resize, barrier and delete are called on a fresh key: declared → anything but
///   `Unsupported`; not declared → `Unsupported`;
/// - a declared lock-delay is kept by the key and shown by status; an undeclared one is
///   refused, not ignored;
/// - a declared waiter count is shown by status (`waiters` is `Some`);
/// - the recovery bound's kind agrees with the harness's (at once, or within a TTL).
pub async fn capabilities_are_honest(h: &Harness) {
    let lab = Lab::new(h, "capabilities_are_honest");
    let caps = lab.store.capabilities();
    let store = lab.store.url().to_string();
    let key = lab.key("caps");
    let lease = lab.grant(&lab.request(&key, 1, Wait::NoWait)).await;
    let check = |what: &str, declared: bool, r: Result<(), baton_core::Error>| match (declared, r) {
        (true, Err(e)) if e.kind() == ErrorKind::Unsupported => {
            panic!("{store} declares {what} but answers Unsupported: {e:#}")
        }
        (false, Ok(())) => panic!("{store} does not declare {what} but it worked"),
        (false, Err(e)) if e.kind() != ErrorKind::Unsupported => {
            panic!("{store} does not declare {what}; expected Unsupported, got {e:#}")
        }
        _ => {}
    };
    let renewed = lab.store.renew(&lease).await;
    let lease = renewed.as_ref().cloned().unwrap_or(lease);
    check("renew", caps.renew, renewed.map(|_| ()));
    let status = lab.inspect(&key).await;
    if caps.waiters {
        assert!(
            status.waiters.is_some(),
            "{store} declares waiter counts but status shows none: {status:?}"
        );
    }
    check(
        "resize",
        caps.resize,
        lab.store.resize(&key, Resize::To(1)).await.map(|_| ()),
    );
    let barrier = BarrierRequest {
        key: lab.key("caps-barrier"),
        parties: 1,
        wait: Wait::Timeout(Duration::from_secs(10)),
        holder: lab.holder(),
    };
    check(
        "barrier",
        caps.barrier,
        lab.store.barrier(&barrier).await.map(|_| ()),
    );
    check(
        "break",
        caps.break_lease,
        lab.store.break_lease(&key, None).await.map(|_| ()),
    );
    let _ = lab.store.release(&lease).await;
    check(
        "delete",
        caps.delete,
        lab.store.delete(&key).await.map(|_| ()),
    );

    let delayed = lab.key("caps-delay");
    let mut req = lab.request(&delayed, 1, Wait::NoWait);
    req.lock_delay = Some(Duration::from_secs(1));
    match (caps.lock_delay, lab.acquire(&req).await) {
        (true, Ok(l)) => {
            let st = lab.inspect(&delayed).await;
            assert_eq!(
                st.lock_delay_ms,
                Some(1000),
                "{store} declares lock-delay but status does not show the key's: {st:?}"
            );
            assert_eq!(lab.release(&l).await, Released::Released);
        }
        (true, Err(e)) => panic!("{store} declares lock-delay but refused one: {e:#}"),
        (false, Ok(_)) => panic!("{store} does not declare lock-delay but accepted one"),
        (false, Err(e)) => assert!(
            matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::Unsupported),
            "{store}: an undeclared lock-delay must be refused clearly, got {e:#}"
        ),
    }

    match (caps.bound, h.recovery_kind()) {
        (Bound::AtOnce, Recovery::AtOnce) | (Bound::WithinTtl { .. }, Recovery::Within(_)) => {}
        (declared, harness) => {
            panic!("{store} declares recovery {declared:?} but its harness checks {harness:?}")
        }
    }
    assert!(
        !caps.recovery.is_empty(),
        "{store} gives no recovery bound in words"
    );
}

/// Contract point 9 where the store declares FIFO: three waiters queued one after the
/// other are granted in that order (and with rising tokens) once the holder releases, and
/// a no-wait newcomer does not pass them. The queue is observed through status's waiter
/// count, so the store must declare `waiters` too.
pub async fn waiters_are_served_in_order(h: &Harness) {
    let lab = Lab::new(h, "waiters_are_served_in_order");
    let key = lab.key("fifo");
    let first = lab.grant(&lab.request(&key, 1, Wait::NoWait)).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..3u32 {
        let store = Arc::clone(&lab.store);
        let order = Arc::clone(&order);
        let req = lab.request(&key, 1, Wait::Forever);
        tasks.push(tokio::spawn(async move {
            let lease = store
                .acquire(&req)
                .await
                .expect("a queued waiter is granted");
            order
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((i, lease.token));
            store.release(&lease).await.expect("release")
        }));
        // Queue them in a known order: wait until this one shows in the count.
        bounded("the waiter queueing", LIVENESS_BOUND, async {
            while lab.inspect(&key).await.waiters != Some(i + 1) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
    lab.release(&first).await;
    // Either a waiter has the slot, or one is next in line: a no-wait newcomer is Busy.
    // Only when the queue drained first (each waiter releases at once, and a store that
    // hands off within its release can serve all three before the newcomer's request
    // arrives) may it be granted, after all three.
    let newcomer = lab.acquire(&lab.request(&key, 1, Wait::NoWait)).await;
    match &newcomer {
        Ok(l) => {
            let _ = lab.release(l).await;
            let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
            assert!(
                order.len() == 3 && order.iter().all(|(_, t)| *t < l.token),
                "a no-wait newcomer passed the queue: {l:?}, waiters granted before it: {order:?}"
            );
        }
        Err(err) => assert_eq!(err.kind(), ErrorKind::Busy, "{err:#}"),
    }
    for t in tasks {
        let released = bounded("the waiters", LIVENESS_BOUND, t)
            .await
            .expect("waiter task");
        assert_eq!(released, Released::Released);
    }
    let order = order.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let who: Vec<u32> = order.iter().map(|(i, _)| *i).collect();
    assert_eq!(who, vec![0, 1, 2], "grants out of queue order: {order:?}");
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "tokens not rising in grant order: {order:?}"
    );
    let st = lab.inspect(&key).await;
    assert_eq!(st.waiters, Some(0), "waiters left behind: {st:?}");
}

/// `baton delete KEY` (the `Store::delete` contract): a key nobody holds or waits for
/// is removed, and one in use is refused and kept.
///
/// While a slot is held, delete is `Busy` and the key keeps its holder; where the store
/// counts waiters, a request waiting behind the holder is served when the holder
/// releases (the refused delete lost nothing). Once nothing holds or waits: delete
/// succeeds, status is `NotFound`, list leaves the key out, a second delete is
/// `NotFound`, and the next acquire makes the key anew with another limit and a token
/// above every token the key granted before. Run where the store declares delete.
pub async fn delete_removes_only_an_unused_key(h: &Harness) {
    let lab = Lab::new(h, "delete_removes_only_an_unused_key");
    let caps = lab.store.capabilities();
    let key = lab.key("delete");
    let held = lab.grant(&lab.request(&key, 1, Wait::NoWait)).await;
    let busy = |what: &'static str| {
        move |r: baton_core::Result<()>| {
            let e = r.expect_err(what);
            assert_eq!(e.kind(), ErrorKind::Busy, "{what}: {e:#}");
            assert!(e.to_string().contains("in use"), "{what}: {e:#}");
        }
    };
    busy("delete of a held key must be refused")(lab.store.delete(&key).await);
    assert_eq!(
        lab.inspect(&key).await.held(),
        1,
        "a refused delete freed the holder"
    );
    let mut last = held.token;
    if caps.waiters {
        let store = Arc::clone(&lab.store);
        let req = lab.request(&key, 1, Wait::Forever);
        let waiter = tokio::spawn(async move {
            let lease = store.acquire(&req).await.expect("the waiter is granted");
            store.release(&lease).await.expect("release");
            lease.token
        });
        bounded("the waiter queueing", LIVENESS_BOUND, async {
            while lab.inspect(&key).await.waiters != Some(1) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        let e = lab
            .store
            .delete(&key)
            .await
            .expect_err("delete with a waiter");
        assert!(
            e.kind() == ErrorKind::Busy && e.to_string().contains("waiting"),
            "a delete refused while a request waits must say so: {e:#}"
        );
        assert_eq!(lab.release(&held).await, Released::Released);
        last = bounded("the waiter", LIVENESS_BOUND, waiter)
            .await
            .expect("waiter task");
    } else {
        assert_eq!(lab.release(&held).await, Released::Released);
    }
    bounded("delete", LIVENESS_BOUND, lab.store.delete(&key))
        .await
        .unwrap_or_else(|e| panic!("delete of an unused key '{key}': {e:#}"));
    let gone = lab
        .store
        .inspect(&key)
        .await
        .expect_err("status of a deleted key");
    assert_eq!(gone.kind(), ErrorKind::NotFound, "{gone:#}");
    let keys = lab.store.list().await.expect("list");
    assert!(
        !keys.contains(&key),
        "list still names a deleted key: {keys:?}"
    );
    let again = lab.store.delete(&key).await.expect_err("a second delete");
    assert_eq!(again.kind(), ErrorKind::NotFound, "{again:#}");
    // Made anew, with another limit; its tokens go on rising.
    let anew = lab.grant(&lab.request(&key, 3, Wait::NoWait)).await;
    assert!(
        anew.token > last,
        "a key made again after delete granted token {} after {last}",
        anew.token
    );
    assert_eq!(lab.inspect(&key).await.limit, 3);
    assert_eq!(lab.release(&anew).await, Released::Released);
    let missing = lab.key("never-made");
    let e = lab
        .store
        .delete(&missing)
        .await
        .expect_err("delete of a key never made");
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e:#}");
}

/// Deletes racing grants never let two requests hold a mutex at once, and never let a
/// token go back: four handles take and release one key in a loop (half of them without
/// waiting, half waiting 30 ms), with short gaps, while a fifth deletes the key whenever
/// it can, for two seconds, or longer until it has deleted the key and seen four grants
/// (at most twenty). Every grant bumps a counter that must have been 0 and
/// records its token, which must be above every earlier grant's. The key must have been
/// deleted and granted again in the race, or it proves nothing.
pub async fn delete_racing_grants_never_shares_a_slot(h: &Harness) {
    use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
    let lab = Lab::new(h, "delete_racing_grants_never_shares_a_slot");
    let key = lab.key("race");
    let inside = Arc::new(AtomicU32::new(0));
    let tokens = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let grants = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for n in 0..4u64 {
        let store = h.open();
        let wait = if n % 2 == 0 {
            Wait::NoWait
        } else {
            Wait::Timeout(Duration::from_millis(30))
        };
        let req = lab.request(&key, 1, wait);
        let (inside, tokens) = (Arc::clone(&inside), Arc::clone(&tokens));
        let (done, grants) = (Arc::clone(&done), Arc::clone(&grants));
        tasks.push(tokio::spawn(async move {
            let mut granted = 0u64;
            while !done.load(Ordering::SeqCst) {
                let lease = match bounded("acquire", LIVENESS_BOUND, store.acquire(&req)).await {
                    Ok(lease) => lease,
                    Err(e) if matches!(e.kind(), ErrorKind::Busy | ErrorKind::Timeout) => {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    Err(e) => panic!("an acquire racing deletes failed: {e:#}"),
                };
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two holders of a mutex at once while its key was being deleted"
                );
                tokens.lock().expect("tokens").push(lease.token);
                tokio::time::sleep(Duration::from_micros(300)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                let released = bounded("release", LIVENESS_BOUND, store.release(&lease)).await;
                assert_eq!(
                    released.expect("release"),
                    Released::Released,
                    "a grant was released by someone else"
                );
                granted += 1;
                grants.fetch_add(1, Ordering::SeqCst);
                // A gap now and then, so that the key is sometimes free to delete.
                tokio::time::sleep(Duration::from_millis(1 + (granted + n) % 3)).await;
            }
            granted
        }));
    }
    // Two seconds at least, and until the race has happened (a slow store needs longer),
    // but never more than twenty.
    let mut deleted = 0u32;
    loop {
        let elapsed = started.elapsed();
        let raced = deleted >= 1 && grants.load(Ordering::SeqCst) >= 4;
        if elapsed >= Duration::from_secs(20) || (raced && elapsed >= Duration::from_secs(2)) {
            done.store(true, Ordering::SeqCst);
            break;
        }
        match bounded("delete", LIVENESS_BOUND, lab.store.delete(&key)).await {
            Ok(()) => deleted += 1,
            Err(e) if matches!(e.kind(), ErrorKind::Busy | ErrorKind::NotFound) => {}
            Err(e) => panic!("a delete racing grants failed: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.expect("a racing task panicked");
    }
    let tokens = tokens.lock().expect("tokens").clone();
    if let Some(w) = tokens.windows(2).find(|w| w[0] >= w[1]) {
        panic!(
            "a token went back across deletes: {} then {} (all: {tokens:?})",
            w[0], w[1]
        );
    }
    report(&format!(
        "delete_racing_grants_never_shares_a_slot: {granted} grants, {deleted} deletes"
    ));
    assert!(
        granted >= 4 && deleted >= 1,
        "the race did not happen: {granted} grants, {deleted} deletes in 20 s"
    );
}

/// What [`waiters_ride_out_restart`] measured.
#[derive(Clone, Copy, Debug)]
pub struct RideOutReport {
    /// From the restart's start to the last waiter's grant.
    pub restart_to_last_grant: Duration,
}

/// Waiters ride out a server restart (DESIGN: a routine database restart must not end
/// every standby). A holder holds a mutex; three waiters wait for it through
/// [`StoreExt::lock`] (the path `baton run` takes), each on its own store handle. The
/// server restarts (`scripts/server-NAME restart`), then the holder releases: every
/// waiter is granted, one at a time (no two hold at once), with tokens above the
/// holder's. The waiters' wait is forever: an outage may not end it.
pub async fn waiters_ride_out_restart(h: &Harness, server: &Server) -> RideOutReport {
    let lab = Lab::new(h, "waiters_ride_out_restart");
    let key = lab.key("standby");
    let holder = lab.grant(&lab.request(&key, 1, Wait::NoWait)).await;
    let held = Arc::new(Mutex::new(0u32));
    let outages = Arc::new(Mutex::new(0u32));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let store: Arc<dyn Store> = h.open();
        let mut req = store.lock(key.clone());
        if let Some(ttl) = h.request_ttl() {
            req = req.ttl(ttl);
        }
        let (held, outages) = (Arc::clone(&held), Arc::clone(&outages));
        tasks.push(tokio::spawn(async move {
            let o = Arc::clone(&outages);
            let guard = req
                .on_outage(move |_, _| *o.lock().unwrap_or_else(|p| p.into_inner()) += 1)
                .acquire()
                .await
                .unwrap_or_else(|e| panic!("a waiter did not ride out the restart: {e:#}"));
            {
                let mut n = held.lock().unwrap_or_else(|p| p.into_inner());
                *n += 1;
                assert_eq!(*n, 1, "two waiters hold the mutex at once");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let token = guard.lease().token;
            *held.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
            let released = guard.release().await.unwrap_or(Released::NotHeld);
            (token, released)
        }));
    }
    // Let the waiters queue before the restart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Instant::now();
    server
        .run("restart")
        .unwrap_or_else(|e| panic!("cannot restart the server: {e}"));
    // The holder releases after the restart (through a fresh handle if its own cannot).
    let released = match lab.store.release(&holder).await {
        Ok(r) => r,
        Err(_) => h.open().release(&holder).await.unwrap_or(Released::NotHeld),
    };
    let mut tokens = Vec::new();
    for t in tasks {
        let (token, rel) = bounded("the standbys after the restart", LIVENESS_BOUND * 2, t)
            .await
            .expect("waiter task");
        assert_eq!(rel, Released::Released, "a standby's lease was lost");
        tokens.push(token);
    }
    let last = restarted.elapsed();
    assert!(
        tokens.iter().all(|t| *t > holder.token),
        "a standby got a token at or below the holder's {}: {tokens:?}",
        holder.token
    );
    report(&format!(
        "waiters_ride_out_restart on {}: holder's release answered {released:?}; 3 standbys \
         granted {last:?} after the restart began; {} outage retries",
        lab.store.url(),
        *outages.lock().unwrap_or_else(|p| p.into_inner())
    ));
    RideOutReport {
        restart_to_last_grant: last,
    }
}
