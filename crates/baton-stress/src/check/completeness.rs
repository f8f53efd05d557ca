//! Property: the run did what it was asked, and the store let it. Every event of the run
//! (`0..events`; workflow: every job of every stage) started and ended — its worker
//! recorded `done`, or was SIGKILLed by the harness — and the store granted what it must:
//!
//! - with the default wait (forever), every event that did not fail with an error was
//!   granted: a waiter that waits forever has no business giving up, so `Busy`, `Timeout`
//!   or `Cancelled` there is a liveness violation;
//! - with `--wait`, timeouts are legitimate (holders may keep the slots longer than a
//!   waiter waits), so only a run in which nothing at all was granted fails.
//!
//! A store that answers `Busy` to everyone therefore fails the run instead of passing with
//! every outcome "unknown". (A store that never answers is stopped by the run's overall
//! bound: see [`crate::scenario::Config::time_bound`].)

use std::collections::{BTreeMap, HashMap};

use super::{push, Violation};
use crate::history::Event;

/// What the run asked for.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    /// How many events (ids `0..events`).
    pub events: u64,
    /// Whether workers waited forever (no `--wait`): then every event must be granted.
    pub wait_forever: bool,
}

/// Lists every event that never started, never ended, or (waiting forever) was never
/// granted, and a run without a single grant, up to [`super::MAX_LISTED`]; the count is
/// the list's length plus what did not fit, returned second.
pub fn check(events: &[Event], expected: Expected) -> (Vec<Violation>, usize) {
    let mut out = Vec::new();
    let mut count = 0;
    let mut add = |out: &mut Vec<Violation>, v: Violation| {
        count += 1;
        push(out, v);
    };
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| e.t_ns());
    // Per event: its worker, whether it ended, whether it was granted, its last refusal.
    #[derive(Default)]
    struct Seen {
        pid: u32,
        ended: bool,
        granted: bool,
        failed: bool,
        refused: Option<String>,
    }
    let mut seen: BTreeMap<u64, Seen> = BTreeMap::new();
    // The event each worker is running now.
    let mut current: HashMap<u32, u64> = HashMap::new();
    let mut grants = 0u64;
    for e in sorted {
        match e {
            Event::Start { pid, id, .. } => {
                current.insert(*pid, *id);
                seen.entry(*id).or_insert_with(|| Seen {
                    pid: *pid,
                    ..Seen::default()
                });
            }
            Event::Grant { pid, .. } => {
                // Only the grants of the run's events count (not a probe's).
                if let Some(s) = current.get(pid).and_then(|id| seen.get_mut(id)) {
                    s.granted = true;
                    grants += 1;
                }
            }
            Event::Refused {
                pid, kind, message, ..
            } => {
                if let Some(s) = current.get(pid).and_then(|id| seen.get_mut(id)) {
                    s.refused = Some(format!("{kind}: {message}"));
                }
            }
            Event::Done {
                pid, id, outcome, ..
            } => {
                if let Some(s) = seen.get_mut(id) {
                    s.ended = true;
                    s.failed |= outcome == "error";
                }
                current.remove(pid);
            }
            Event::Killed { pid, .. } => {
                if let Some(s) = current.remove(pid).and_then(|id| seen.get_mut(&id)) {
                    s.ended = true;
                }
            }
            _ => {}
        }
    }
    let missing: Vec<u64> = (0..expected.events)
        .filter(|id| !seen.contains_key(id))
        .collect();
    if !missing.is_empty() {
        add(
            &mut out,
            Violation {
                property: "completeness",
                message: format!(
                    "{} of {} events never started: {}",
                    missing.len(),
                    expected.events,
                    list(&missing)
                ),
                pids: Vec::new(),
            },
        );
    }
    for (id, s) in &seen {
        if *id >= expected.events {
            add(
                &mut out,
                Violation {
                    property: "completeness",
                    message: format!(
                        "event {id} (pid {}) is not one of the run's {} events",
                        s.pid, expected.events
                    ),
                    pids: vec![s.pid],
                },
            );
        }
        if !s.ended {
            add(
                &mut out,
                Violation {
                    property: "completeness",
                    message: format!(
                        "event {id} (pid {}) started but never ended (no `done`, not killed)",
                        s.pid
                    ),
                    pids: vec![s.pid],
                },
            );
        }
        if expected.wait_forever && s.ended && !s.granted && !s.failed {
            add(
                &mut out,
                Violation {
                    property: "liveness",
                    message: format!(
                        "event {id} (pid {}) waited forever but was never granted ({})",
                        s.pid,
                        s.refused.as_deref().unwrap_or("no refusal recorded")
                    ),
                    pids: vec![s.pid],
                },
            );
        }
    }
    if grants == 0 && expected.events > 0 && !seen.is_empty() {
        add(
            &mut out,
            Violation {
                property: "liveness",
                message: format!("nothing was granted in {} events that started", seen.len()),
                pids: Vec::new(),
            },
        );
    }
    (out, count)
}

/// A list of event ids, shortened past 20.
fn list(ids: &[u64]) -> String {
    let shown: Vec<String> = ids.iter().take(20).map(u64::to_string).collect();
    if ids.len() > 20 {
        format!("{}, … ({} more)", shown.join(", "), ids.len() - 20)
    } else {
        shown.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::testutil::*;

    fn refused(pid: u32, t_ns: u64, kind: &str) -> Event {
        Event::Refused {
            pid,
            t_ns,
            key: key(),
            kind: kind.into(),
            message: "no".into(),
        }
    }

    #[test]
    fn a_store_that_is_always_busy_fails_the_run() {
        let h = vec![
            start(1, 0, 0),
            refused(1, 5, "busy"),
            done(1, 6, 0, "unknown"),
            start(2, 0, 1),
            refused(2, 5, "timeout"),
            done(2, 6, 1, "unknown"),
        ];
        let forever = Expected {
            events: 2,
            wait_forever: true,
        };
        let (v, n) = check(&h, forever);
        assert_eq!(n, 3, "{v:?}");
        assert!(v.iter().all(|v| v.property == "liveness"), "{v:?}");
        assert!(v[0].message.contains("never granted (busy"), "{v:?}");
        // With --wait, timeouts are legitimate, but nothing granted at all is not.
        let bounded = Expected {
            wait_forever: false,
            ..forever
        };
        let (v, _) = check(&h, bounded);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.starts_with("nothing was granted"), "{v:?}");
        let mut one = h.clone();
        one.insert(4, grant(2, 1, 4, 0, 1));
        assert!(check(&one, bounded).0.is_empty());
    }

    #[test]
    fn every_event_must_start_and_end() {
        let h = vec![
            start(1, 0, 0),
            grant(1, 0, 1, 0, 1),
            done(1, 2, 0, "ok"),
            start(2, 0, 2),
            grant(2, 0, 3, 0, 2),
            start(3, 0, 3),
            grant(3, 0, 4, 0, 3),
            Event::Killed { pid: 3, t_ns: 5 },
        ];
        let (v, n) = check(
            &h,
            Expected {
                events: 4,
                wait_forever: true,
            },
        );
        let text: Vec<&str> = v.iter().map(|v| v.message.as_str()).collect();
        assert_eq!(n, 2, "{text:#?}");
        assert!(
            text[0].starts_with("1 of 4 events never started: 1"),
            "{text:#?}"
        );
        assert!(
            text[1].starts_with("event 2 (pid 2) started but never ended"),
            "{text:#?}"
        );
    }
}
