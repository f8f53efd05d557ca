//! Property: a holder's command — its whole process group — is gone before its lease could
//! be granted to anyone else (contract point 3, for `baton run`'s commands).
//!
//! A holder that runs a command records `command_gone` with the instant its supervisor
//! found the group empty (the supervisor's own reading, taken even while the holder was
//! paused). With [`Ends::Deadlines`], a lease ends at its last loss deadline if it was not
//! released first; the command must be gone by then. A command that outlived its lease's
//! end is a violation, whatever the store did: it ran while the slot could be someone
//! else's.

use std::collections::HashMap;

use baton_core::{Key, Token};

use super::{push, Violation};
use crate::history::Event;
use crate::intervals::{first_time, intervals_ending, ms, Ends};

/// Lists every command of `key` that was still running when its lease ended.
pub fn check(events: &[Event], key: &Key, ends: Ends) -> Vec<Violation> {
    let gone: HashMap<Token, (u32, u64, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::CommandGone {
                pid,
                t_ns,
                key: k,
                token,
                stopped,
            } if k == key => Some((*token, (*pid, *t_ns, *stopped))),
            _ => None,
        })
        .collect();
    if gone.is_empty() {
        return Vec::new();
    }
    let t0 = first_time(events);
    let mut out = Vec::new();
    for iv in intervals_ending(events, key, ends) {
        let (Some(&(pid, t_gone, stopped)), Some(end)) = (gone.get(&iv.token), iv.t_release_ns)
        else {
            continue;
        };
        if t_gone > end {
            push(
                &mut out,
                Violation {
                    property: "stopped",
                    message: format!(
                        "the command of pid {pid} (token {}) was gone only at {:.3}ms, {:.3}ms \
                         after its lease ended ({}):\n  {}",
                        iv.token,
                        ms(t_gone, t0),
                        (t_gone - end) as f64 / 1e6,
                        if stopped {
                            "its supervisor stopped it too late"
                        } else {
                            "it was not stopped"
                        },
                        iv.describe(t0)
                    ),
                    pids: vec![pid],
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::testutil::{grant, key, release};

    fn held(pid: u32, token: u64, deadline_ns: u64) -> Event {
        Event::Held {
            pid,
            t_ns: 11,
            key: key(),
            token: Token(token),
            deadline_ns,
        }
    }

    fn gone(pid: u32, token: u64, t_ns: u64) -> Event {
        Event::CommandGone {
            pid,
            t_ns,
            key: key(),
            token: Token(token),
            stopped: true,
        }
    }

    #[test]
    fn a_command_gone_by_its_deadline_passes_and_one_gone_later_is_reported() {
        // Pid 1's lease ends at its deadline (100) before its late release (400).
        let base = vec![
            grant(1, 0, 10, 0, 1),
            held(1, 1, 100),
            release(1, 400, 0, 1),
        ];
        let mut ok = base.clone();
        ok.push(gone(1, 1, 99));
        assert!(check(&ok, &key(), Ends::Deadlines).is_empty());
        let mut late = base;
        late.push(gone(1, 1, 150));
        let v = check(&late, &key(), Ends::Deadlines);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!((v[0].property, v[0].pids.clone()), ("stopped", vec![1]));
        assert!(
            v[0].message.contains("after its lease ended"),
            "{}",
            v[0].message
        );
    }

    #[test]
    fn a_command_ended_before_its_release_passes() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            held(1, 1, 1_000),
            gone(1, 1, 300),
            release(1, 400, 0, 1),
        ];
        assert!(check(&h, &key(), Ends::Deadlines).is_empty());
    }
}
