//! The base properties: one public async function per point of the contract (DESIGN.md,
//! "The contract") that every store runs, kernel-lock and lease stores alike. Each makes
//! its own keys, so they can run in parallel against one store, and panics with the
//! offending history when the store breaks the contract.
//!
//! The lease properties (a paused holder, loss before re-grant, clocks, break, resize,
//! damaged state) live in the `lease` module and take the same [`Harness`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::{
    hostname, ErrorKind, Key, Lease, Liveness, Released, SlotState, SlotStatus, Wait,
};

use crate::history::{check_limit, check_tokens, Event};
use crate::support::{bounded, report, Lab};
use crate::worker::{Task, Worker};
use crate::{monotonic_ns, Harness, Recovery, LIVENESS_BOUND};

/// How long a property lets a waiter sit before it checks that the waiter is still waiting.
/// Not a speed requirement: a slow store only makes the check weaker, never fail.
const SETTLE: Duration = Duration::from_millis(300);

/// Runs `procs` worker processes that each acquire and release `key` `rounds` times, all
/// starting at once, and returns the history after checking every grant happened.
async fn storm(lab: &mut Lab<'_>, key: &Key, limit: u32, procs: usize, rounds: u32) -> Vec<Event> {
    let name = key.as_str().rsplit('/').next().unwrap_or("storm");
    let start = lab.path(&format!("start-{name}"));
    let task = Task::Storm {
        start: start.clone(),
        rounds,
        max_hold_us: 2_000,
    };
    let mut workers: Vec<Worker> = (0..procs)
        .map(|_| lab.spawn(key, limit, task.clone()))
        .collect();
    for w in &mut workers {
        lab.wait_for(w, "ready", |e| matches!(e, Event::Ready { .. }))
            .await;
    }
    std::fs::write(&start, b"go").expect("the start signal");
    for w in &mut workers {
        w.finish(LIVENESS_BOUND).await;
    }
    let events = lab.events();
    let grants = events
        .iter()
        .filter(|e| matches!(e, Event::Grant { lease, .. } if &lease.key == key))
        .count();
    assert_eq!(
        grants,
        procs * rounds as usize,
        "every acquisition of the storm on '{key}' should have been granted"
    );
    events
}

fn slot_of(status: &baton_core::KeyStatus, slot: u32) -> &SlotStatus {
    status
        .slots
        .iter()
        .find(|s| s.slot == slot)
        .unwrap_or_else(|| panic!("inspect '{}' has no slot {slot}: {status:?}", status.key))
}

/// Contract point 1, **Limit**: "At no instant of the store's own time are more than
/// `limit` unexpired leases granted for one key."
///
/// Six worker processes each acquire and release one key 30 times, for a mutex (limit 1)
/// and a semaphore (limit 3), recording each grant after `acquire` returns and each release
/// before `release` is called; the history must never show more than `limit` leases held
/// at once, nor one slot held twice ([`check_limit`]).
pub async fn limit_never_exceeded(h: &Harness) {
    for limit in [1, 3] {
        let mut lab = Lab::new(h, "limit_never_exceeded");
        let key = lab.key(&format!("limit-{limit}"));
        let events = storm(&mut lab, &key, limit, 6, 30).await;
        if let Err(violation) = check_limit(&events, &key, limit) {
            panic!(
                "limit broken: {violation}\n(history: {})",
                lab.history.display()
            );
        }
        for e in &events {
            if let Event::Grant { lease, .. } = e {
                assert_eq!(
                    lease.limit, limit,
                    "a lease reports another limit: {lease:?}"
                );
            }
        }
        let status = lab.inspect(&key).await;
        assert_eq!(status.limit, limit, "inspect after the storm: {status:?}");
        assert_eq!(status.held(), 0, "everyone released: {status:?}");
    }
}

/// Contract point 2, **Fencing**: "Every grant returns a token greater than every earlier
/// token for that key, even after the store restarts."
///
/// Checks grants one after another in this process (across a fresh store handle, which is
/// what a restart is for a store without a server), three leases of a semaphore held at
/// once, and grants across worker processes for a mutex and a semaphore
/// ([`check_tokens`]).
pub async fn tokens_strictly_increase(h: &Harness) {
    let mut lab = Lab::new(h, "tokens_strictly_increase");

    let key = lab.key("sequential");
    let mut last: Option<Lease> = None;
    for round in 0..10 {
        let wait = if round % 2 == 0 {
            Wait::NoWait
        } else {
            Wait::Forever
        };
        let lease = lab.grant(&lab.request(&key, 1, wait)).await;
        if let Some(prev) = &last {
            assert!(
                lease.token > prev.token,
                "grant {round}: token {} after token {}",
                lease.token,
                prev.token
            );
        }
        assert_eq!(lab.release(&lease).await, Released::Released);
        last = Some(lease);
    }
    // A new handle on the same store: tokens go on rising.
    let reopened = h.open();
    for round in 0..3 {
        let req = lab.request(&key, 1, Wait::NoWait);
        let lease = lab
            .acquire_on(reopened.as_ref(), &req)
            .await
            .unwrap_or_else(|e| panic!("acquire on a reopened store: {e:#}"));
        let prev = last.as_ref().expect("earlier grants");
        assert!(
            lease.token > prev.token,
            "after reopening the store, grant {round}: token {} after token {}",
            lease.token,
            prev.token
        );
        let released = bounded("release", LIVENESS_BOUND, reopened.release(&lease))
            .await
            .unwrap_or_else(|e| panic!("release on the reopened store: {e:#}"));
        assert_eq!(released, Released::Released);
        last = Some(lease);
    }
    drop(reopened);
    let status = lab.inspect(&key).await;
    if let (Some(last_token), Some(prev)) = (status.last_token, &last) {
        assert_eq!(
            last_token, prev.token,
            "inspect's last token is not the last token granted: {status:?}"
        );
    }

    // A semaphore's slots held at once: every new grant's token is above all before it.
    let sem = lab.key("semaphore");
    let mut held = Vec::new();
    for _ in 0..3 {
        let lease = lab.grant(&lab.request(&sem, 3, Wait::NoWait)).await;
        if let Some(max) = held.iter().map(|l: &Lease| l.token).max() {
            assert!(lease.token > max, "token {} after {max}", lease.token);
        }
        held.push(lease);
    }
    for lease in &held {
        assert_eq!(lab.release(lease).await, Released::Released);
    }
    let events = lab.events();
    for k in [&key, &sem] {
        check_tokens(&events, k, if k == &key { 1 } else { 3 })
            .unwrap_or_else(|v| panic!("in one process: {v}"));
    }

    // Across processes.
    for limit in [1, 3] {
        let key = lab.key(&format!("processes-{limit}"));
        let events = storm(&mut lab, &key, limit, 4, 15).await;
        if let Err(violation) = check_tokens(&events, &key, limit) {
            panic!(
                "fencing broken across processes: {violation}\n(history: {})",
                lab.history.display()
            );
        }
    }
}

/// The three wait modes (`Wait` in baton-core), while another process holds the only slot:
/// `NoWait` fails with `Busy`; `Timeout(300ms)` fails with `Timeout` after waiting at least
/// about 300 ms; `Forever` is not granted while the holder holds, and is granted after it
/// releases.
pub async fn wait_modes(h: &Harness) {
    let mut lab = Lab::new(h, "wait_modes");
    let key = lab.key("held");
    let mut holder = lab.spawn_holder(&key, 1);
    let held = lab.lease_of(&mut holder).await;

    lab.refused(
        &lab.request(&key, 1, Wait::NoWait),
        ErrorKind::Busy,
        "no-wait on a held key",
    )
    .await;

    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    lab.refused(
        &lab.request(&key, 1, Wait::Timeout(timeout)),
        ErrorKind::Timeout,
        "a timed wait on a held key",
    )
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= timeout - timeout / 20,
        "a {timeout:?} wait gave up after only {waited:?}"
    );

    let store = Arc::clone(&lab.store);
    let req = lab.request(&key, 1, Wait::Forever);
    let waiter = tokio::spawn(async move {
        let t_request_ns = monotonic_ns();
        let result = store.acquire(&req).await;
        (t_request_ns, result, monotonic_ns())
    });
    tokio::time::sleep(SETTLE).await;
    assert!(
        !waiter.is_finished(),
        "a wait-forever acquire returned while another process held the only slot \
         (token {}): {:?}",
        held.token,
        waiter.await.map(|(_, r, _)| r)
    );
    let t_release_ns = lab.let_go(&mut holder).await;
    let (t_request_ns, result, t_grant_ns) = bounded(
        "a wait-forever acquire after the holder released",
        LIVENESS_BOUND,
        waiter,
    )
    .await
    .expect("the waiting task");
    let lease = result.unwrap_or_else(|e| panic!("wait-forever failed: {e:#}"));
    assert!(
        t_grant_ns > t_release_ns,
        "the waiter was granted before the holder released"
    );
    assert!(
        lease.token > held.token,
        "token {} after token {}",
        lease.token,
        held.token
    );
    // Put the waiter's grant in the history, so the limit check sees both leases.
    let pid = std::process::id();
    let grant = Event::Grant {
        pid,
        t_ns: t_grant_ns,
        t_request_ns,
        lease: lease.clone(),
    };
    crate::history::Recorder::open(&lab.history)
        .and_then(|r| r.record(&grant))
        .expect("record the grant");
    assert_eq!(lab.release(&lease).await, Released::Released);
    check_limit(&lab.events(), &key, 1).unwrap_or_else(|v| panic!("{v}"));
}

/// What [`killed_holder_frees_slot`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// From SIGKILL of the holder to the grant of an acquirer that was already waiting.
    pub kill_to_waiter_grant: Duration,
    /// From SIGKILL (and reaping) of the holder to the first successful no-wait acquire.
    pub kill_to_free: Duration,
}

/// Contract point 4, **Recovery**: "A dead holder's slot comes back: at once for kernel
/// locks (the kernel drops them with the process); within TTL + detection for lease
/// stores. Each store documents its bound and the conformance suite measures it."
///
/// A worker process acquires and holds; the test SIGKILLs it while another acquirer waits,
/// which must then be granted (within the recovery bound plus [`LIVENESS_BOUND`]); then,
/// with a second killed holder, a no-wait acquire must succeed at once after reaping it
/// ([`Recovery::AtOnce`]) or within the bound. Returns and prints the times measured.
pub async fn killed_holder_frees_slot(h: &Harness) -> RecoveryReport {
    let mut lab = Lab::new(h, "killed_holder_frees_slot");
    let key = lab.key("crash");
    let bound = h.recovery_kind().bound() + LIVENESS_BOUND;

    let mut victim = lab.spawn_holder(&key, 1);
    let dead = lab.lease_of(&mut victim).await;
    lab.refused(
        &lab.request(&key, 1, Wait::NoWait),
        ErrorKind::Busy,
        "the key is held by a live process",
    )
    .await;
    let store = Arc::clone(&lab.store);
    let req = lab.request(&key, 1, Wait::Timeout(bound));
    let waiter = tokio::spawn(async move {
        let result = store.acquire(&req).await;
        (result, Instant::now())
    });
    tokio::time::sleep(SETTLE).await;
    assert!(
        !waiter.is_finished(),
        "an acquire returned while a live process held the only slot: {:?}",
        waiter.await.map(|(r, _)| r)
    );
    let killed = Instant::now();
    lab.kill(&mut victim);
    let (result, granted) = bounded("the waiter after the kill", bound + LIVENESS_BOUND, waiter)
        .await
        .expect("the waiting task");
    let lease = result.unwrap_or_else(|e| {
        panic!("the slot of a SIGKILLed holder did not come back to a waiter: {e:#}")
    });
    let kill_to_waiter_grant = granted - killed;
    assert!(
        lease.token > dead.token,
        "token {} after the dead holder's {}",
        lease.token,
        dead.token
    );
    assert_eq!(lab.release(&lease).await, Released::Released);

    let mut victim = lab.spawn_holder(&key, 1);
    let dead = lab.lease_of(&mut victim).await;
    let killed = Instant::now();
    lab.kill(&mut victim);
    let reaped = Instant::now();
    let lease = loop {
        match lab.acquire(&lab.request(&key, 1, Wait::NoWait)).await {
            Ok(lease) => break lease,
            Err(e) if e.kind() == ErrorKind::Busy => {
                assert!(
                    h.recovery_kind() != Recovery::AtOnce,
                    "the slot of a SIGKILLed, reaped holder is still busy, but this store \
                     recovers at once: {e:#}"
                );
                assert!(
                    reaped.elapsed() <= bound,
                    "the slot of a SIGKILLed holder is still busy after {bound:?}: {e:#}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no-wait acquire after a kill: {e:#}"),
        }
    };
    let kill_to_free = killed.elapsed();
    assert!(lease.token > dead.token);
    assert_eq!(lab.release(&lease).await, Released::Released);
    check_limit(&lab.events(), &key, 1).unwrap_or_else(|v| panic!("{v}"));

    let measured = RecoveryReport {
        kill_to_waiter_grant,
        kill_to_free,
    };
    report(&format!(
        "killed_holder_frees_slot on {}: SIGKILL -> waiting acquirer granted in {:?}; \
         SIGKILL -> no-wait acquire granted in {:?}",
        lab.store.url(),
        measured.kill_to_waiter_grant,
        measured.kill_to_free
    ));
    measured
}

/// `inspect` tells the truth about holders (contract point 4 relies on it, and `baton
/// status` shows it): while a worker process holds a slot, the slot is `Held` with the
/// worker's pid, host, holder id and token, and the recorded holder is `Alive`; once the
/// worker is killed, the slot shows `Free` (at once for kernel-lock stores, within the
/// recovery bound for others).
pub async fn holder_info_matches(h: &Harness) {
    let mut lab = Lab::new(h, "holder_info_matches");
    let key = lab.key("info");
    let mut worker = lab.spawn_holder(&key, 2);
    let lease = lab.lease_of(&mut worker).await;
    assert_eq!(lease.holder.pid, worker.pid(), "the worker's own lease");

    let status = lab.inspect(&key).await;
    assert_eq!(status.limit, 2, "{status:?}");
    assert_eq!(status.slots.len(), 2, "one entry per slot: {status:?}");
    assert_eq!(status.held(), 1, "{status:?}");
    let slot = slot_of(&status, lease.slot);
    assert_eq!(slot.state, SlotState::Held, "{slot:?}");
    assert_eq!(slot.token, Some(lease.token), "{slot:?}");
    let holder = slot
        .holder
        .as_ref()
        .unwrap_or_else(|| panic!("a held slot without its holder: {slot:?}"));
    assert_eq!(holder.pid, worker.pid(), "{holder:?}");
    assert_eq!(holder.host, hostname(), "{holder:?}");
    assert_eq!(holder.id, lease.holder.id, "{holder:?}");
    assert_eq!(holder.liveness(), Liveness::Alive, "{holder:?}");
    if let Some(last) = status.last_token {
        assert!(last >= lease.token, "last token {last} < {}", lease.token);
    }

    lab.kill(&mut worker);
    let killed = Instant::now();
    loop {
        let status = lab.inspect(&key).await;
        let slot = slot_of(&status, lease.slot);
        if slot.state == SlotState::Free && status.held() == 0 {
            break;
        }
        assert!(
            h.recovery_kind() != Recovery::AtOnce,
            "the holder was SIGKILLed and reaped, yet inspect still shows it: {status:?}"
        );
        assert!(
            killed.elapsed() <= h.recovery_kind().bound() + LIVENESS_BOUND,
            "a dead holder's slot still shows held: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Contract point 5, **Release**: "Idempotent. Releasing a lease that was lost answers
/// 'not held' and never frees a slot that someone else now holds."
///
/// Release answers `Released`, then `NotHeld`; a stale copy of a released lease answers
/// `NotHeld` after another holder (in this process, then in another process) took the
/// slot, and that holder still holds it: inspect shows its token and a third party's
/// no-wait acquire is `Busy`.
pub async fn release_is_idempotent(h: &Harness) {
    let mut lab = Lab::new(h, "release_is_idempotent");
    let key = lab.key("release");

    let first = lab.grant(&lab.request(&key, 1, Wait::NoWait)).await;
    let stale_first = first.clone();
    assert_eq!(lab.release(&first).await, Released::Released);
    assert_eq!(
        lab.release(&first).await,
        Released::NotHeld,
        "a second release of the same lease"
    );

    let second = lab.grant(&lab.request(&key, 1, Wait::NoWait)).await;
    assert_eq!(second.slot, first.slot, "a mutex has one slot");
    assert_eq!(
        lab.release(&stale_first).await,
        Released::NotHeld,
        "a stale lease, after another holder took the slot"
    );
    let status = lab.inspect(&key).await;
    let slot = slot_of(&status, second.slot);
    assert_eq!(
        (slot.state, slot.token),
        (SlotState::Held, Some(second.token)),
        "a stale release freed the slot someone else holds: {status:?}"
    );
    lab.refused(
        &lab.request(&key, 1, Wait::NoWait),
        ErrorKind::Busy,
        "the slot is still held after a stale release",
    )
    .await;
    let stale_second = second.clone();
    assert_eq!(lab.release(&second).await, Released::Released);

    let mut other = lab.spawn_holder(&key, 1);
    let theirs = lab.lease_of(&mut other).await;
    for stale in [&stale_first, &stale_second] {
        assert_eq!(
            lab.release(stale).await,
            Released::NotHeld,
            "a stale lease (token {}) while another process holds the slot",
            stale.token
        );
    }
    let status = lab.inspect(&key).await;
    let slot = slot_of(&status, theirs.slot);
    assert_eq!(
        (slot.state, slot.token),
        (SlotState::Held, Some(theirs.token)),
        "a stale release freed another process's slot: {status:?}"
    );
    lab.refused(
        &lab.request(&key, 1, Wait::NoWait),
        ErrorKind::Busy,
        "another process still holds the slot after stale releases",
    )
    .await;
    lab.let_go(&mut other).await;
    check_limit(&lab.events(), &key, 1).unwrap_or_else(|v| panic!("{v}"));
}

/// Contract point 6, **No residue**: "An acquire that gives up (timeout, cancel, error)
/// leaves nothing behind in the store: no queued waiter, no orphan node, no lease."
///
/// While a worker process holds the key: a timed-out and a no-wait acquire fail; a
/// wait-forever acquire is cancelled by dropping its future, another by aborting its task;
/// a second worker process is SIGKILLed while it waits. After the holder releases, inspect
/// shows every slot free and no waiters (now, and again a moment later, in case an
/// abandoned wait would grab the slot late), and a no-wait acquire succeeds at once.
pub async fn timed_out_acquire_leaves_nothing(h: &Harness) {
    let mut lab = Lab::new(h, "timed_out_acquire_leaves_nothing");
    let key = lab.key("residue");
    let mut holder = lab.spawn_holder(&key, 1);
    lab.lease_of(&mut holder).await;

    lab.refused(
        &lab.request(&key, 1, Wait::Timeout(Duration::from_millis(200))),
        ErrorKind::Timeout,
        "a timed wait on a held key",
    )
    .await;
    lab.refused(
        &lab.request(&key, 1, Wait::NoWait),
        ErrorKind::Busy,
        "no-wait on a held key",
    )
    .await;

    let req = lab.request(&key, 1, Wait::Forever);
    if let Ok(granted) = tokio::time::timeout(SETTLE, lab.store.acquire(&req)).await {
        panic!("a wait-forever acquire returned while the key was held: {granted:?}");
    }

    let store = Arc::clone(&lab.store);
    let req = lab.request(&key, 1, Wait::Forever);
    let task = tokio::spawn(async move { store.acquire(&req).await });
    tokio::time::sleep(SETTLE).await;
    task.abort();
    match task.await {
        Err(e) if e.is_cancelled() => {}
        other => panic!("a wait-forever acquire returned while the key was held: {other:?}"),
    }

    let mut waiter = lab.spawn_holder(&key, 1);
    lab.requested(&mut waiter).await;
    tokio::time::sleep(SETTLE).await;
    let granted = lab
        .events()
        .into_iter()
        .any(|e| e.pid() == waiter.pid() && matches!(e, Event::Grant { .. }));
    assert!(!granted, "a second process was granted a held mutex");
    lab.kill(&mut waiter);

    lab.let_go(&mut holder).await;
    for when in ["right after the release", "a moment later"] {
        let status = lab.inspect(&key).await;
        assert_eq!(
            status.held(),
            0,
            "{when}, abandoned acquires left a holder behind: {status:?}"
        );
        assert_eq!(
            status.waiters.unwrap_or(0),
            0,
            "{when}, abandoned acquires left waiters behind: {status:?}"
        );
        tokio::time::sleep(SETTLE).await;
    }
    let lease = lab.grant(&lab.request(&key, 1, Wait::NoWait)).await;
    assert_eq!(lab.release(&lease).await, Released::Released);
    check_limit(&lab.events(), &key, 1).unwrap_or_else(|v| panic!("{v}"));
}

/// Bad input is refused, not guessed at: `Key` rejects names outside the key grammar
/// (DESIGN.md, "Vocabulary"); the store refuses `limit = 0` with `InvalidInput`; and a key
/// keeps its limit: a request with another limit fails at once with `LimitMismatch`, and
/// the error names the key's limit (`current_limit`).
pub async fn bad_keys_rejected(h: &Harness) {
    let long = "k".repeat(baton_core::MAX_KEY_LEN + 1);
    for bad in [
        "",
        "/abs",
        "trailing/",
        "a//b",
        "../up",
        "a/../b",
        "./here",
        "sp ace",
        "co:lon",
        "nul\0byte",
        "ключ",
        long.as_str(),
    ] {
        let err = Key::new(bad).expect_err(bad);
        assert_eq!(err.kind(), ErrorKind::InvalidKey, "{bad:?}: {err}");
        let json = serde_json::to_string(bad).expect("json");
        assert!(
            serde_json::from_str::<Key>(&json).is_err(),
            "{bad:?} deserialized as a key"
        );
    }

    let lab = Lab::new(h, "bad_keys_rejected");
    let key = lab.key("limits");
    for wait in [Wait::NoWait, Wait::Forever] {
        lab.refused(
            &lab.request(&key, 0, wait),
            ErrorKind::InvalidInput,
            "limit 0",
        )
        .await;
    }
    let held = lab.grant(&lab.request(&key, 2, Wait::NoWait)).await;
    for (limit, wait) in [(3, Wait::Forever), (1, Wait::NoWait), (1, Wait::Forever)] {
        let err = lab
            .refused(
                &lab.request(&key, limit, wait),
                ErrorKind::LimitMismatch,
                "a request with another limit than the key's",
            )
            .await;
        assert_eq!(
            err.current_limit(),
            Some(2),
            "the error should name the key's limit: {err:#}"
        );
    }
    let status = lab.inspect(&key).await;
    assert_eq!(status.limit, 2, "{status:?}");
    assert_eq!(status.held(), 1, "{status:?}");
    assert_eq!(lab.release(&held).await, Released::Released);
}

/// Contract point 1 for a semaphore, slot by slot: `limit` holders at once get `limit`
/// distinct slots, which inspect shows held with their tokens; the next no-wait acquire is
/// `Busy` and a timed one `Timeout`; a released slot is the one the next acquire gets.
pub async fn semaphore_slots_distinct(h: &Harness) {
    let lab = Lab::new(h, "semaphore_slots_distinct");
    let key = lab.key("sem");
    let limit = 3;
    let mut leases = Vec::new();
    for _ in 0..limit {
        leases.push(lab.grant(&lab.request(&key, limit, Wait::NoWait)).await);
    }
    let slots: BTreeSet<u32> = leases.iter().map(|l| l.slot).collect();
    assert_eq!(
        slots.len(),
        limit as usize,
        "slots not distinct: {leases:?}"
    );

    let status = lab.inspect(&key).await;
    assert_eq!(status.limit, limit, "{status:?}");
    assert_eq!(status.slots.len(), limit as usize, "{status:?}");
    assert_eq!(status.held(), limit as usize, "{status:?}");
    let listed: BTreeSet<u32> = status.slots.iter().map(|s| s.slot).collect();
    assert_eq!(listed, slots, "inspect's slots are not the granted ones");
    for lease in &leases {
        let slot = slot_of(&status, lease.slot);
        assert_eq!(
            (slot.state, slot.token),
            (SlotState::Held, Some(lease.token)),
            "{status:?}"
        );
    }

    lab.refused(
        &lab.request(&key, limit, Wait::NoWait),
        ErrorKind::Busy,
        "every slot held",
    )
    .await;
    lab.refused(
        &lab.request(&key, limit, Wait::Timeout(Duration::from_millis(100))),
        ErrorKind::Timeout,
        "every slot held",
    )
    .await;

    let freed = leases.remove(1);
    assert_eq!(lab.release(&freed).await, Released::Released);
    let again = lab.grant(&lab.request(&key, limit, Wait::NoWait)).await;
    assert_eq!(again.slot, freed.slot, "the only free slot");
    leases.push(again);
    for lease in &leases {
        assert_eq!(lab.release(lease).await, Released::Released);
    }
    let status = lab.inspect(&key).await;
    assert_eq!(status.held(), 0, "{status:?}");
    check_limit(&lab.events(), &key, limit).unwrap_or_else(|v| panic!("{v}"));
}

/// `list` names the keys in use, sorted and without repeats (`baton list` relies on it).
pub async fn list_names_keys(h: &Harness) {
    let lab = Lab::new(h, "list_names_keys");
    let a = lab.key("b-second");
    let b = lab.key("a-first");
    let la = lab.grant(&lab.request(&a, 1, Wait::NoWait)).await;
    let lb = lab.grant(&lab.request(&b, 2, Wait::NoWait)).await;
    let keys = bounded("list", LIVENESS_BOUND, lab.store.list())
        .await
        .unwrap_or_else(|e| panic!("list failed: {e:#}"));
    for k in [&a, &b] {
        assert!(keys.contains(k), "list lacks '{k}': {keys:?}");
    }
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "list is not sorted without repeats: {keys:?}"
    );
    assert_eq!(lab.release(&la).await, Released::Released);
    assert_eq!(lab.release(&lb).await, Released::Released);
}
