//! Property: every event's result is recorded exactly once: no lost results, no doubled
//! ones, none from nowhere.
//!
//! An event that succeeded has exactly one `result` row in the resource; one refused by the
//! fence or failed before writing has none; one whose outcome is unknown (see
//! [`super::unknown`]) has at most one. Every event is started by one worker, which records
//! its outcome once (`done`).

use std::collections::BTreeMap;

use super::unknown::{outcomes, Outcome};
use super::{push, Violation};
use crate::history::Event;
use crate::resource::{Row, RESULT};

/// Lists every event whose result was lost, doubled or made up, up to
/// [`super::MAX_LISTED`].
pub fn check(events: &[Event], rows: &[Row]) -> Vec<Violation> {
    let mut out = Vec::new();
    let known = outcomes(events);
    let mut count: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.kind == RESULT) {
        count.entry(row.id).or_default().push(row.pid);
    }
    for (id, o) in &known {
        let writers = count.get(id).map(Vec::as_slice).unwrap_or(&[]);
        let n = writers.len();
        let problem = match &o.outcome {
            Outcome::Ok if n != 1 => Some(format!("succeeded but has {n} result rows")),
            Outcome::Fenced | Outcome::Failed(_) if n != 0 => {
                Some(format!("was {} but has {n} result rows", o.outcome.name()))
            }
            Outcome::Unknown(_) if n > 1 => {
                Some(format!("has an unknown outcome but {n} result rows"))
            }
            _ => None,
        };
        if let Some(p) = problem {
            let mut pids = vec![o.pid];
            pids.extend(writers.iter().filter(|&&w| w != o.pid));
            push(
                &mut out,
                Violation {
                    property: "results",
                    message: format!("event {id} (pid {}) {p}", o.pid),
                    pids,
                },
            );
        }
        if o.started_by.len() > 1 {
            push(
                &mut out,
                Violation {
                    property: "results",
                    message: format!(
                        "event {id} was started {} times (pids {:?})",
                        o.started_by.len(),
                        o.started_by
                    ),
                    pids: o.started_by.clone(),
                },
            );
        }
        if o.done > 1 {
            push(
                &mut out,
                Violation {
                    property: "results",
                    message: format!(
                        "event {id} (pid {}) recorded its outcome {} times",
                        o.pid, o.done
                    ),
                    pids: vec![o.pid],
                },
            );
        }
    }
    for (id, writers) in &count {
        if !known.contains_key(id) {
            push(
                &mut out,
                Violation {
                    property: "results",
                    message: format!(
                        "result rows for event {id}, which no worker ran (pids {writers:?})"
                    ),
                    pids: writers.clone(),
                },
            );
        }
    }
    out
}
