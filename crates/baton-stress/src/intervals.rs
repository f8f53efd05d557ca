//! Leases as a history shows them: who held a slot of a key from when to when.
//!
//! A lease's interval runs from the return of `acquire` to the call of `release`, or to the
//! moment its holder was about to be SIGKILLed. With [`Ends::Deadlines`], it ends no later
//! than its holder's last loss deadline (a lease store's keeper declares the lease lost
//! then; contract point 3), so a holder paused past its TTL holds only until its deadline.
//!
//! That deadline is the latest of what the history shows the keeper could have had: the
//! deadlines it published (`held`), and for each renewal recorded as successful
//! (`renewed`, written before the keeper saw the answer: see [`crate::recording`]) the
//! renewal's call time plus the keeper's validity, an upper bound of the deadline that
//! renewal gave. So a holder stopped between a renewal and its `held` line still holds
//! until the renewal's deadline, never less. A lease with a TTL and neither (its holder was
//! stopped at once) ends at the earliest deadline its keeper could have had: the request
//! time plus the validity; stress workers write their first deadline before their grant, so this
//! fallback is for histories without one. Recorded intervals lie inside the store's real
//! ones, so two that overlap really did.

use std::collections::HashMap;

use baton_core::{KeeperConfig, Key, Token};

use crate::history::Event;

/// One lease as a history shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    /// The holding process.
    pub pid: u32,
    /// The slot.
    pub slot: u32,
    /// The token.
    pub token: Token,
    /// When `acquire` was called.
    pub t_request_ns: u64,
    /// When `acquire` returned.
    pub t_grant_ns: u64,
    /// When `release` was about to be called, the holder was about to be killed, or (with
    /// [`Ends::Deadlines`]) its last loss deadline passed, whichever came first; `None` if
    /// none of these happened (held to the end).
    pub t_release_ns: Option<u64>,
}

impl Interval {
    /// The interval in words, with times in ms since `t0`.
    pub fn describe(&self, t0: u64) -> String {
        let end = match self.t_release_ns {
            Some(t) => format!("{:.3}ms", ms(t, t0)),
            None => "never released".into(),
        };
        format!(
            "pid {} slot {} token {}: granted {:.3}ms (asked {:.3}ms), released {end}",
            self.pid,
            self.slot,
            self.token,
            ms(self.t_grant_ns, t0),
            ms(self.t_request_ns, t0),
        )
    }
}

/// Milliseconds from `t0` to `t`, for messages.
pub fn ms(t: u64, t0: u64) -> f64 {
    t.saturating_sub(t0) as f64 / 1e6
}

/// The earliest time in a history (0 for an empty one): the origin of times in messages.
pub fn first_time(events: &[Event]) -> u64 {
    events.iter().map(Event::t_ns).min().unwrap_or(0)
}

/// Where an interval may end besides a release or a kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ends {
    /// Only at a release or a kill.
    Release,
    /// Also at the holder's last recorded loss deadline (`held` events), whichever is
    /// earliest: for lease stores, whose holders count as holding only until then.
    Deadlines,
}

/// The leases of `key` in a history, in the order they were granted (recorded), ending at
/// a release or a kill. A release is matched to the grant of the same process, key and
/// token; a kill ends every lease the killed process still held.
pub fn intervals(events: &[Event], key: &Key) -> Vec<Interval> {
    intervals_ending(events, key, Ends::Release)
}

/// [`intervals`], with the ends chosen by `ends`.
pub fn intervals_ending(events: &[Event], key: &Key, ends: Ends) -> Vec<Interval> {
    let mut out: Vec<Interval> = Vec::new();
    // The first loss deadline each lease's keeper could have had: it counts from when the
    // request was sent, which is after `t_request_ns`, so this is never later than it.
    let mut first_deadline: Vec<Option<u64>> = Vec::new();
    let mut open: HashMap<(u32, Token), usize> = HashMap::new();
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| e.t_ns());
    for event in sorted {
        match event {
            Event::Grant {
                pid,
                t_ns,
                t_request_ns,
                lease,
            } if &lease.key == key => {
                open.insert((*pid, lease.token), out.len());
                first_deadline.push(lease.ttl.map(|ttl| {
                    t_request_ns + KeeperConfig::for_ttl(ttl).validity().as_nanos() as u64
                }));
                out.push(Interval {
                    pid: *pid,
                    slot: lease.slot,
                    token: lease.token,
                    t_request_ns: *t_request_ns,
                    t_grant_ns: *t_ns,
                    t_release_ns: None,
                });
            }
            Event::Release {
                pid,
                t_ns,
                key: k,
                token,
                ..
            } if k == key => {
                if let Some(i) = open.remove(&(*pid, *token)) {
                    out[i].t_release_ns = Some(*t_ns);
                }
            }
            Event::Killed { pid, t_ns } => {
                open.retain(|(p, _), &mut i| {
                    if p == pid {
                        out[i].t_release_ns = Some(*t_ns);
                    }
                    p != pid
                });
            }
            _ => {}
        }
    }
    if ends == Ends::Deadlines {
        // The validity of each lease's keeper, to bound the deadline a renewal gave.
        let mut validity: HashMap<(u32, Token), u64> = HashMap::new();
        for event in events {
            if let Event::Grant { pid, lease, .. } = event {
                if &lease.key == key {
                    if let Some(ttl) = lease.ttl {
                        let v = KeeperConfig::for_ttl(ttl).validity().as_nanos() as u64;
                        validity.insert((*pid, lease.token), v);
                    }
                }
            }
        }
        // The last deadline each lease's keeper can have had: deadlines only move later
        // while the lease is held, so the greatest one is the last.
        let mut last: HashMap<(u32, Token), u64> = HashMap::new();
        let mut later = |pid: u32, token: Token, deadline: u64| {
            let d = last.entry((pid, token)).or_insert(deadline);
            *d = (*d).max(deadline);
        };
        for event in events {
            match event {
                Event::Held {
                    pid,
                    key: k,
                    token,
                    deadline_ns,
                    ..
                } if k == key => later(*pid, *token, *deadline_ns),
                Event::Renewed {
                    pid,
                    key: k,
                    token,
                    t_sent_ns,
                    ok: true,
                    ..
                } if k == key => {
                    if let Some(v) = validity.get(&(*pid, *token)) {
                        later(*pid, *token, t_sent_ns + v);
                    }
                }
                _ => {}
            }
        }
        for (iv, first) in out.iter_mut().zip(first_deadline) {
            // A holder stopped before its keeper's first deadline was recorded still held
            // only until that deadline.
            let recorded = last.get(&(iv.pid, iv.token)).copied();
            let d = match (recorded, first) {
                (Some(r), Some(f)) => Some(r.max(f)),
                (r, f) => r.or(f),
            };
            if let Some(d) = d {
                let d = d.max(iv.t_grant_ns);
                iv.t_release_ns = Some(iv.t_release_ns.map_or(d, |t| t.min(d)));
            }
        }
    }
    out
}
