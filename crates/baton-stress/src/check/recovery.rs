//! Property: a dead holder's slot comes back within the store's documented bound
//! (contract point 4): at once for kernel locks, within TTL + detection for lease stores
//! ([`store_bound`] maps a store to its bound).
//!
//! For each holder SIGKILLed while holding a slot, the slot's recovery time is measured at
//! its next grant (to anyone) after the kill: from the kill, or from that grant's request
//! if it came later (a slot nobody asked for cannot show that it came back sooner). The
//! `crash` scenario makes sure someone asks: after every kill it starts a probe (one
//! acquire), and at the end a probe that takes every slot, so a kill with no waiter pending
//! is measured, and a semaphore slot that never comes back is found even when other slots
//! served every waiter. A slot with no later grant, though someone asked for the key after
//! the kill, is a violation.

use std::time::Duration;

use baton_core::{Key, StoreUrl};

use super::{push, Violation};
use crate::history::Event;
use crate::intervals::{first_time, intervals, ms};

/// How soon a store must give a dead holder's slot back, and why, from the store's own
/// documentation (its README's recovery bound), for leases of `ttl`. `lease_store`:
/// whether the store's leases expire (`capabilities().renew`).
///
/// - `dir:PATH` (kernel locks) and `noop:`: at once; 500 ms of scheduling slack (the
///   kill, the kernel's cleanup and the waiter's wake-up);
/// - `dir:PATH?mode=lease`, `sqlite:`, `postgres://`: the TTL after the last renewal,
///   plus a waiter's detection (a poll, a wake-up, or, where the server's clock is a wall
///   clock, the waiter's own TTL of watching, which starts no later than its request):
///   TTL + 1 s;
/// - `etcd://`: etcd's lease TTL (whole seconds, at least 2 s), its 500 ms expiry check
///   and the waiter's watch round trip: max(TTL, 2 s) + 1.5 s;
/// - any other store: TTL + 2 s for a lease store, 500 ms otherwise (no bound of its own is
///   known to the harness).
pub fn store_bound(url: &StoreUrl, lease_store: bool, ttl: Duration) -> (Duration, String) {
    let slack = Duration::from_millis(500);
    let second = Duration::from_secs(1);
    match (url.scheme(), lease_store) {
        ("dir", false) => (
            slack,
            "kernel locks come back at once (+500ms slack)".into(),
        ),
        ("noop", _) => (slack, "noop holds nothing (+500ms slack)".into()),
        ("dir" | "sqlite" | "postgres" | "postgresql", true) => (
            ttl + second,
            "within the TTL after the last renewal, plus detection (+1s)".into(),
        ),
        ("etcd", true) => (
            ttl.max(2 * second) + Duration::from_millis(1500),
            "etcd's lease TTL (at least 2s) plus its expiry check and a watch (+1.5s)".into(),
        ),
        (_, true) => (
            ttl + 2 * second,
            "no documented bound known: TTL + 2s".into(),
        ),
        (_, false) => (
            slack,
            "no documented bound known: at once (+500ms slack)".into(),
        ),
    }
}

/// The recovery times measured (ns, one per kill whose slot was granted again) and the
/// kills whose slot came back later than `bound_ns` or never, up to
/// [`super::MAX_LISTED`].
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
        let next = ivs
            .iter()
            .filter(|iv| iv.slot == held.slot && iv.t_grant_ns > *t_kill)
            .min_by_key(|iv| iv.t_grant_ns);
        match next {
            Some(iv) => {
                let from = (*t_kill).max(iv.t_request_ns);
                let took = iv.t_grant_ns - from;
                times.push(took);
                if took > bound_ns {
                    push(
                        &mut out,
                        Violation {
                            property: "recovery",
                            message: format!(
                                "slot {} of '{key}' came back {:.3}ms after pid {pid} was \
                                 killed at {:.3}ms{} (bound {:.3}ms)",
                                held.slot,
                                took as f64 / 1e6,
                                ms(*t_kill, t0),
                                if from > *t_kill {
                                    format!(" and pid {} asked at {:.3}ms", iv.pid, ms(from, t0))
                                } else {
                                    String::new()
                                },
                                bound_ns as f64 / 1e6
                            ),
                            pids: vec![*pid, iv.pid],
                        },
                    );
                }
            }
            None if asked_after(events, &ivs, key, *pid, *t_kill) => push(
                &mut out,
                Violation {
                    property: "recovery",
                    message: format!(
                        "slot {} of '{key}' never came back after pid {pid} was killed at \
                         {:.3}ms, though the key was asked for after the kill",
                        held.slot,
                        ms(*t_kill, t0)
                    ),
                    pids: vec![*pid],
                },
            ),
            // Nobody asked for the key after the kill: there is nothing to measure.
            None => {}
        }
    }
    (times, out)
}

/// Whether another process asked for `key` after `pid` was killed at `t_kill`: a request
/// made later, one still waiting then, or a refusal after it.
fn asked_after(
    events: &[Event],
    ivs: &[crate::intervals::Interval],
    key: &Key,
    pid: u32,
    t_kill: u64,
) -> bool {
    ivs.iter()
        .any(|iv| iv.pid != pid && iv.t_request_ns < t_kill && iv.t_grant_ns > t_kill)
        || events.iter().any(|e| match e {
            Event::Request {
                pid: p,
                t_ns,
                key: k,
            }
            | Event::Refused {
                pid: p,
                t_ns,
                key: k,
                ..
            } => k == key && *p != pid && *t_ns > t_kill,
            _ => false,
        })
}
