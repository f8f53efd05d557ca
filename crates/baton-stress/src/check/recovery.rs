//! Property: a dead holder's slot comes back within the store's documented bound
//! (contract point 4): at once for kernel locks, within TTL + detection for lease stores.
//!
//! For each holder SIGKILLed while holding a slot, with some request pending at that
//! moment, the recovery time is from the kill to the next grant of that slot. A slot that
//! never came back while requests were pending is a violation too.

use baton_core::Key;

use super::{push, Violation};
use crate::history::Event;
use crate::intervals::{first_time, intervals, ms};

/// The recovery times measured (ns, one per kill with a waiter) and the kills that took
/// longer than `bound_ns`, up to [`super::MAX_LISTED`].
pub fn check(events: &[Event], key: &Key, bound_ns: u64) -> (Vec<u64>, Vec<Violation>) {
    let ivs = intervals(events, key);
    let t0 = first_time(events);
    let mut times = Vec::new();
    let mut out = Vec::new();
    for e in events {
        let Event::Killed { pid, t_ns: t_kill } = e else {
            continue;
        };
        // The lease the killed process held at the kill (its interval ends there).
        let Some(held) = ivs
            .iter()
            .find(|iv| iv.pid == *pid && iv.t_release_ns == Some(*t_kill))
        else {
            continue;
        };
        let pending = ivs
            .iter()
            .any(|iv| iv.t_request_ns < *t_kill && iv.t_grant_ns > *t_kill)
            || events.iter().any(|e| {
                matches!(e, Event::Request { t_ns, key: k, pid: p, .. }
                    if k == key && *t_ns < *t_kill && p != pid
                    && !ivs.iter().any(|iv| iv.pid == *p && iv.t_request_ns == *t_ns))
            });
        if !pending {
            continue;
        }
        let next = ivs
            .iter()
            .filter(|iv| iv.slot == held.slot && iv.t_grant_ns > *t_kill)
            .map(|iv| iv.t_grant_ns)
            .min();
        match next {
            Some(t) => {
                let took = t - t_kill;
                times.push(took);
                if took > bound_ns {
                    push(
                        &mut out,
                        Violation {
                            property: "recovery",
                            message: format!(
                                "slot {} of '{key}' came back {:.3}ms after pid {pid} was \
                                 killed at {:.3}ms (bound {:.3}ms)",
                                held.slot,
                                took as f64 / 1e6,
                                ms(*t_kill, t0),
                                bound_ns as f64 / 1e6
                            ),
                            pids: vec![*pid],
                        },
                    );
                }
            }
            // Other slots may have served every waiter; only no grant at all is a failure.
            None if ivs.iter().all(|iv| iv.t_grant_ns <= *t_kill) => push(
                &mut out,
                Violation {
                    property: "recovery",
                    message: format!(
                        "slot {} of '{key}' never came back after pid {pid} was killed at \
                         {:.3}ms, though requests were waiting",
                        held.slot,
                        ms(*t_kill, t0)
                    ),
                    pids: vec![*pid],
                },
            ),
            None => {}
        }
    }
    (times, out)
}
