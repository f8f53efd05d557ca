//! Contract point 8, **Lock-delay**: after a lease is lost rather than released, its slot
//! is not granted again until the key's lock-delay has passed; a clean release is granted
//! on at once.
//!
//! Every check is an order of recorded times on this host's monotonic clock, never an
//! upper bound on how fast the store is: a grant's own send time ([`Lease::sent_at`],
//! taken before the store was asked, so no later than the grant) must come at least the
//! delay after the earliest moment the loss can have happened (just before the break was
//! asked for; the SIGKILL of a holder that was renewing until then).

use std::time::Duration;

use baton_core::{ErrorKind, Lease, Released, Wait};

use crate::history::Event;
use crate::support::{bounded, report, Keep, Lab};
use crate::{instant_ns, monotonic_ns, Harness, LIVENESS_BOUND};

/// The lock-delay the property gives its key: well above the lease TTL it uses (about a
/// second), so that a store measuring the delay from the wrong moment shows.
const DELAY: Duration = Duration::from_secs(2);

/// Lock-delay (contract point 8), on stores whose capabilities declare it; others are
/// reported as skipped on stderr.
///
/// A key is created with a lock-delay, which `inspect` must show. Then:
/// 1. a clean release is granted on without the delay: a no-wait acquire right after a
///    release is granted;
/// 2. a broken lease holds its slot back: every grant after the break (a no-wait acquire
///    at once, which must otherwise be `Busy` naming the lock-delay, then a waiting one)
///    was sent no sooner than the delay after the break was asked for;
/// 3. a lease whose holder process was SIGKILLed while renewing (so it expires) holds its
///    slot back the same way: the waiting acquirer's grant was sent no sooner than the
///    delay after the kill.
///
/// Tokens rise across all of it.
pub async fn lock_delay_holds_back_lost_slots(h: &Harness) {
    let mut lab = Lab::new(h, "lock_delay_holds_back_lost_slots");
    let timing = lab.lease_timing();
    let key = lab.key("delayed");
    let req = |lab: &Lab<'_>, wait: Wait| {
        let mut r = lab.lease_request(&key, 1, wait);
        r.lock_delay = Some(DELAY);
        r
    };

    // The request that creates the key sets its delay; status shows it.
    let first = lab.grant(&req(&lab, Wait::NoWait)).await;
    let status = lab.inspect(&key).await;
    assert_eq!(
        status.lock_delay_ms,
        Some(DELAY.as_millis() as u64),
        "status of a key created with a lock-delay of {DELAY:?}: {status:?}"
    );

    // 1. A clean release never waits.
    assert_eq!(lab.release(&first).await, Released::Released);
    let clean = lab.acquire(&req(&lab, Wait::NoWait)).await.unwrap_or_else(|e| {
        panic!("a no-wait acquire right after a clean release was refused (a clean release must never wait for the lock-delay): {e:#}")
    });
    assert!(clean.token > first.token, "tokens must rise");

    // 2. A break is a loss: the slot is held back for the delay from the break on.
    let t_break_ns = monotonic_ns();
    let freed = bounded(
        "break of the held lease",
        LIVENESS_BOUND,
        lab.store.break_lease(&key, None),
    )
    .await
    .unwrap_or_else(|e| panic!("break '{key}': {e:#}"));
    assert_eq!(freed.len(), 1, "the break freed {freed:?}");
    match lab.acquire(&req(&lab, Wait::NoWait)).await {
        Ok(early) => {
            held_back_since(&early, t_break_ns, "the break", "a no-wait acquire");
            assert_eq!(lab.release(&early).await, Released::Released);
        }
        Err(e) => {
            assert_eq!(
                e.kind(),
                ErrorKind::Busy,
                "no-wait acquire after a break: {e:#}"
            );
            assert!(
                e.to_string().contains("lock-delay"),
                "a no-wait acquire refused because of the lock-delay must say so: {e:#}"
            );
            let waited = lab
                .acquire(&req(&lab, Wait::Timeout(DELAY + LIVENESS_BOUND)))
                .await
                .unwrap_or_else(|e| {
                    panic!("a waiting acquire after a break was not granted once the lock-delay passed: {e:#}")
                });
            held_back_since(&waited, t_break_ns, "the break", "a waiting acquire");
            assert!(waited.token > clean.token, "tokens must rise");
            assert_eq!(lab.release(&waited).await, Released::Released);
        }
    }
    // The broken holder's own release frees nothing.
    assert_eq!(lab.release(&clean).await, Released::NotHeld);

    // 3. A holder killed while renewing: its lease expires, and the slot is held back for
    // the delay after that (which is after the kill).
    let mut victim = lab.spawn_keeper(&key, 1, Keep::default());
    let dead = lab.lease_of(&mut victim).await;
    lab.wait_for(&mut victim, "a renewal", |e| {
        matches!(e, Event::Renewed { ok: true, .. })
    })
    .await;
    let t_kill_ns = monotonic_ns();
    lab.kill(&mut victim);
    let bound = timing.recovery() + DELAY + LIVENESS_BOUND;
    let after = lab
        .acquire(&req(&lab, Wait::Timeout(bound)))
        .await
        .unwrap_or_else(|e| {
            panic!("the slot of a SIGKILLed holder did not come back after TTL + lock-delay: {e:#}")
        });
    held_back_since(
        &after,
        t_kill_ns,
        "the SIGKILL of its holder",
        "a waiting acquire",
    );
    assert!(after.token > dead.token, "tokens must rise");
    assert_eq!(lab.release(&after).await, Released::Released);

    // And a clean release after all that still never waits.
    let last = lab.grant(&req(&lab, Wait::NoWait)).await;
    assert_eq!(lab.release(&last).await, Released::Released);
    report(&format!(
        "lock_delay_holds_back_lost_slots on {}: lock-delay {DELAY:?} held back a broken and \
         an expired lease's slot; a clean release was granted on at once",
        lab.store.url()
    ));
}

/// Checks that `lease` was sent for no sooner than [`DELAY`] after `loss_ns`.
fn held_back_since(lease: &Lease, loss_ns: u64, loss: &str, who: &str) {
    let sent = lease.sent_at.map(instant_ns).unwrap_or_else(|| {
        panic!(
            "a lease store's lease has no sent_at (Lease::sent_at), so its grant cannot be ordered"
        )
    });
    let after = Duration::from_nanos(sent.saturating_sub(loss_ns));
    assert!(
        sent >= loss_ns && after >= DELAY,
        "{who} was granted slot {} (token {}) {after:?} after {loss}, inside the key's \
         lock-delay of {DELAY:?}",
        lease.slot,
        lease.token
    );
}
