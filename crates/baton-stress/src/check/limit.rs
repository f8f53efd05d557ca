//! Property: at no instant are more than `limit` leases of a key held, and no slot is held
//! by two leases at once, and every slot granted is one of the key's (`0..limit`)
//! (contract point 1).

use std::collections::{BTreeSet, HashMap};

use baton_core::Key;

use super::{push, Violation};
use crate::history::Event;
use crate::intervals::{first_time, intervals_ending, ms, Ends};

/// Lists every instant where more than `limit` leases of `key` were held, and every slot
/// held twice, up to [`super::MAX_LISTED`].
///
/// Sweeps the grant and release times in order; at equal times grants come first, since
/// a lease recorded as released at `t` was really released after `t` and one recorded as
/// granted at `t` was really granted before it.
pub fn check(events: &[Event], key: &Key, limit: u32, ends: Ends) -> Vec<Violation> {
    let ivs = intervals_ending(events, key, ends);
    let t0 = first_time(events);
    // (time, 0 = grant / 1 = release, interval index)
    let mut points: Vec<(u64, u8, usize)> = Vec::with_capacity(ivs.len() * 2);
    for (i, iv) in ivs.iter().enumerate() {
        points.push((iv.t_grant_ns, 0, i));
        if let Some(t) = iv.t_release_ns {
            points.push((t, 1, i));
        }
    }
    points.sort();
    let mut out = Vec::new();
    let mut open: BTreeSet<usize> = BTreeSet::new();
    let mut by_slot: HashMap<u32, usize> = HashMap::new();
    for (t, kind, i) in points {
        let iv = &ivs[i];
        if kind == 1 {
            open.remove(&i);
            if by_slot.get(&iv.slot) == Some(&i) {
                by_slot.remove(&iv.slot);
            }
            continue;
        }
        let twice = by_slot.get(&iv.slot).copied();
        if let Some(other) = twice {
            push(
                &mut out,
                Violation {
                    property: "limit",
                    message: format!(
                        "slot {} of '{key}' held twice at {:.3}ms:\n  {}\n  {}",
                        iv.slot,
                        ms(t, t0),
                        ivs[other].describe(t0),
                        iv.describe(t0)
                    ),
                    pids: vec![ivs[other].pid, iv.pid],
                },
            );
        }
        by_slot.insert(iv.slot, i);
        open.insert(i);
        // A slot held twice on a mutex is the same overlap; say it once.
        if open.len() > limit as usize && (twice.is_none() || limit > 1) {
            let held: Vec<String> = open
                .iter()
                .map(|&j| format!("  {}", ivs[j].describe(t0)))
                .collect();
            push(
                &mut out,
                Violation {
                    property: "limit",
                    message: format!(
                        "{} leases of '{key}' (limit {limit}) held at once at {:.3}ms:\n{}",
                        open.len(),
                        ms(t, t0),
                        held.join("\n")
                    ),
                    pids: open.iter().map(|&j| ivs[j].pid).collect(),
                },
            );
        }
    }
    // A slot must be one of the key's: 0..limit (listed after the overlaps).
    for iv in ivs.iter().filter(|iv| iv.slot >= limit) {
        push(
            &mut out,
            Violation {
                property: "limit",
                message: format!(
                    "slot {} of '{key}' granted, outside its limit of {limit}:\n  {}",
                    iv.slot,
                    iv.describe(t0)
                ),
                pids: vec![iv.pid],
            },
        );
    }
    out
}
