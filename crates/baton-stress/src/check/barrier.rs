//! Property (workflow): a barrier holds every party until all have arrived. No job of a
//! stage starts before every job of the stage before it finished, and every party passes
//! every generation.

use std::collections::BTreeMap;

use super::{push, Violation};
use crate::history::Event;
use crate::intervals::{first_time, ms};

/// Lists jobs that started before the previous stage finished and parties that did not
/// pass a stage, and returns the stage transition times (ns: the last arrival of a
/// generation to its first pass).
pub fn check(events: &[Event], jobs: u64, stages: u32, parties: u32) -> (Vec<u64>, Vec<Violation>) {
    let t0 = first_time(events);
    let mut out = Vec::new();
    let stage_of = |id: u64| id / jobs.max(1);
    let mut last_done: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
    let mut first_start: BTreeMap<u64, (u64, u32)> = BTreeMap::new();
    for e in events {
        match e {
            Event::Done { id, t_ns, pid, .. } => {
                let d = last_done.entry(stage_of(*id)).or_insert((*t_ns, *pid));
                if *t_ns > d.0 {
                    *d = (*t_ns, *pid);
                }
            }
            Event::Start { id, t_ns, pid } => {
                let s = first_start.entry(stage_of(*id)).or_insert((*t_ns, *pid));
                if *t_ns < s.0 {
                    *s = (*t_ns, *pid);
                }
            }
            _ => {}
        }
    }
    for (stage, (t_start, pid)) in &first_start {
        if *stage == 0 {
            continue;
        }
        if let Some((t_done, done_pid)) = last_done.get(&(stage - 1)) {
            if t_start < t_done {
                push(
                    &mut out,
                    Violation {
                        property: "barrier",
                        message: format!(
                            "stage {stage} began at {:.3}ms (pid {pid}) before stage {} ended \
                             at {:.3}ms (pid {done_pid})",
                            ms(*t_start, t0),
                            stage - 1,
                            ms(*t_done, t0)
                        ),
                        pids: vec![*pid, *done_pid],
                    },
                );
            }
        }
    }
    // Generations as the parties saw them: the k-th pass of each party is stage k.
    let mut arrivals: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    let mut passes: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for e in events {
        match e {
            Event::Arrive { pid, t_ns, .. } => arrivals.entry(*pid).or_default().push(*t_ns),
            Event::Passed { pid, t_ns, .. } => passes.entry(*pid).or_default().push(*t_ns),
            _ => {}
        }
    }
    let mut times = Vec::new();
    for stage in 0..stages as usize {
        let last_arrival = arrivals.values().filter_map(|a| a.get(stage)).max();
        let first_pass = passes.values().filter_map(|p| p.get(stage)).min();
        let passed = passes.values().filter(|p| p.len() > stage).count();
        if passed != parties as usize {
            push(
                &mut out,
                Violation {
                    property: "barrier",
                    message: format!(
                        "stage {stage}: {passed} of {parties} parties passed the barrier"
                    ),
                    // Parties that arrived (or passed earlier stages) but not this one.
                    pids: arrivals
                        .keys()
                        .chain(passes.keys())
                        .copied()
                        .collect::<std::collections::BTreeSet<u32>>()
                        .into_iter()
                        .filter(|pid| passes.get(pid).is_none_or(|p| p.len() <= stage))
                        .collect(),
                },
            );
        }
        if let (Some(a), Some(p)) = (last_arrival, first_pass) {
            if p < a {
                push(
                    &mut out,
                    Violation {
                        property: "barrier",
                        message: format!(
                            "stage {stage}: a party passed at {:.3}ms before the last arrived at \
                             {:.3}ms",
                            ms(*p, t0),
                            ms(*a, t0)
                        ),
                        pids: Vec::new(),
                    },
                );
            } else {
                times.push(p - a);
            }
        }
    }
    (times, out)
}
