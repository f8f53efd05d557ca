//! Property support: which events' outcomes are known.
//!
//! An operation that timed out, or a worker killed mid-event, may or may not have done what
//! it set out to do: its outcome is *unknown*, and the other checkers must accept either
//! (a result recorded once, or not at all) rather than count it as a success or a failure.

use std::collections::BTreeMap;

use crate::history::Event;

/// What is known of one event's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The result was written (the fence accepted it).
    Ok,
    /// The fence refused the result: the holder had lost its lease. Nothing was written.
    Fenced,
    /// The event failed before writing anything (the store refused or failed).
    Failed(String),
    /// Unknown: an operation timed out, the worker was killed, or it ended without saying.
    Unknown(String),
}

impl Outcome {
    /// A short name: `ok`, `fenced`, `failed`, `unknown`.
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Fenced => "fenced",
            Outcome::Failed(_) => "failed",
            Outcome::Unknown(_) => "unknown",
        }
    }
}

/// One event of a run: the worker that ran it and what is known of its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventOutcome {
    /// The worker process.
    pub pid: u32,
    /// The outcome.
    pub outcome: Outcome,
    /// How many `done` records the worker wrote (exactly one unless killed).
    pub done: usize,
    /// Every process that recorded a `start` of this event, in order: exactly one. A
    /// doubled event id is kept here (and reported by [`super::results`]), never folded
    /// into one.
    pub started_by: Vec<u32>,
}

/// The outcome of every event (`start` record) in a history, by event number. An event
/// started twice keeps its first worker as `pid` and lists every starter in
/// `started_by`.
pub fn outcomes(events: &[Event]) -> BTreeMap<u64, EventOutcome> {
    let mut out: BTreeMap<u64, EventOutcome> = BTreeMap::new();
    let mut pid_of: BTreeMap<u32, u64> = BTreeMap::new();
    for e in events {
        if let Event::Start { pid, id, .. } = e {
            pid_of.insert(*pid, *id);
            out.entry(*id)
                .or_insert_with(|| EventOutcome {
                    pid: *pid,
                    outcome: Outcome::Unknown("the worker ended without saying how".into()),
                    done: 0,
                    started_by: Vec::new(),
                })
                .started_by
                .push(*pid);
        }
    }
    for e in events {
        match e {
            Event::Done {
                id,
                outcome,
                message,
                ..
            } => {
                if let Some(o) = out.get_mut(id) {
                    o.done += 1;
                    let why = message.clone().unwrap_or_default();
                    o.outcome = match outcome.as_str() {
                        "ok" => Outcome::Ok,
                        "fenced" => Outcome::Fenced,
                        "error" => Outcome::Failed(why),
                        _ => Outcome::Unknown(why),
                    };
                }
            }
            Event::Killed { pid, .. } => {
                if let Some(o) = pid_of.get(pid).and_then(|id| out.get_mut(id)) {
                    if o.done == 0 {
                        o.outcome = Outcome::Unknown("killed".into());
                    }
                }
            }
            _ => {}
        }
    }
    out
}
