//! The barrier property: what every store that has barriers keeps (see
//! `baton_core::barrier` for the semantics).

use std::time::Duration;

use baton_core::{BarrierPassed, BarrierRequest, ErrorKind, Holder, Result, Wait};

use crate::support::{bounded, Lab};
use crate::{Harness, LIVENESS_BOUND};

/// How long a party that must not pass waits before it gives up.
const SHORT: Duration = Duration::from_millis(400);

fn request(key: &baton_core::Key, parties: u32, wait: Wait) -> BarrierRequest {
    BarrierRequest {
        key: key.clone(),
        parties,
        wait,
        holder: Holder::current(vec!["baton-conformance".into(), "barrier".into()]),
    }
}

/// Arrives at `req.key` through a store handle of its own, in a task.
fn arrive(h: &Harness, req: BarrierRequest) -> tokio::task::JoinHandle<Result<BarrierPassed>> {
    let store = h.open();
    tokio::spawn(async move { store.barrier(&req).await })
}

async fn all_pass(
    h: &Harness,
    key: &baton_core::Key,
    parties: u32,
    what: &str,
) -> Vec<BarrierPassed> {
    let tasks: Vec<_> = (0..parties)
        .map(|_| arrive(h, request(key, parties, Wait::Timeout(LIVENESS_BOUND))))
        .collect();
    let mut passed = Vec::new();
    for t in tasks {
        let r = bounded(what, LIVENESS_BOUND * 2, t)
            .await
            .expect("the arriving task");
        passed.push(r.unwrap_or_else(|e| panic!("{what}: a party did not pass: {e:#}")));
    }
    passed
}

/// Barriers (run where the store declares them; a store that declares barriers and then
/// answers `Unsupported` fails):
/// - 3 parties on separate store handles all pass, in one generation;
/// - a party alone gives up after its timeout with `Timeout`, and its arrival is withdrawn:
///   then 2 more arrivals (which would make 3 with a phantom) must time out too, and 3
///   fresh ones pass in the next generation;
/// - a party asking for another count while a generation waits gets `LimitMismatch`.
pub async fn barrier_passes_in_generations(h: &Harness) {
    let lab = Lab::new(h, "barrier_passes_in_generations");
    let key = lab.key("barrier");
    let probe = lab
        .store
        .barrier(&request(&key, 1, Wait::Timeout(LIVENESS_BOUND)))
        .await;
    let first = match probe {
        Err(e) => panic!("a barrier of 1 party did not pass at once: {e:#}"),
        Ok(p) => p,
    };
    assert_eq!(first.parties, 1, "{first:?}");

    let key = lab.key("three");
    let g0 = all_pass(h, &key, 3, "generation 0 of 3 parties").await;
    let gen0 = g0[0].generation;
    assert!(
        g0.iter()
            .all(|p| p.generation == gen0 && p.parties == 3 && p.key == key),
        "the 3 parties of one generation disagree: {g0:?}"
    );

    // A lone party times out, and leaves nothing behind.
    let lone = lab
        .store
        .barrier(&request(&key, 3, Wait::Timeout(SHORT)))
        .await;
    assert_eq!(
        lone.as_ref().map_err(|e| e.kind()).err(),
        Some(ErrorKind::Timeout),
        "a lone party of 3 should time out: {lone:?}"
    );
    let pair: Vec<_> = (0..2)
        .map(|_| arrive(h, request(&key, 3, Wait::Timeout(SHORT * 2))))
        .collect();
    for t in pair {
        let r = bounded("a party of a pair", LIVENESS_BOUND, t)
            .await
            .expect("the arriving task");
        assert_eq!(
            r.as_ref().map_err(|e| e.kind()).err(),
            Some(ErrorKind::Timeout),
            "2 parties of 3 passed: a timed-out arrival was not withdrawn: {r:?}"
        );
    }
    let g1 = all_pass(h, &key, 3, "the next generation of 3 parties").await;
    assert!(
        g1.iter().all(|p| p.generation > gen0),
        "the next generation did not follow generation {gen0}: {g1:?}"
    );

    // Another count while a generation waits.
    let key = lab.key("mismatch");
    let waiting = arrive(h, request(&key, 2, Wait::Timeout(LIVENESS_BOUND)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let other = lab
        .store
        .barrier(&request(&key, 5, Wait::Timeout(SHORT)))
        .await;
    assert_eq!(
        other.as_ref().map_err(|e| e.kind()).err(),
        Some(ErrorKind::LimitMismatch),
        "a party asking for 5 while a generation of 2 waits: {other:?}"
    );
    let partner = lab
        .store
        .barrier(&request(&key, 2, Wait::Timeout(LIVENESS_BOUND)))
        .await
        .unwrap_or_else(|e| panic!("the second of 2 parties: {e:#}"));
    let waited = bounded("the first of 2 parties", LIVENESS_BOUND, waiting)
        .await
        .expect("the arriving task")
        .unwrap_or_else(|e| panic!("the first of 2 parties: {e:#}"));
    assert_eq!(
        waited.generation, partner.generation,
        "{waited:?} {partner:?}"
    );
}
