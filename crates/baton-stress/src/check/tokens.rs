//! Property: every grant of a key has a token greater than every token granted before it
//! (contract point 2).
//!
//! "Before" is what the history can prove: a grant recorded before another was even
//! requested. Tokens must also be distinct. With `limit == 1` leases never overlap (the
//! [`super::limit`] checker checks that), so grants are totally ordered by their recorded
//! times and tokens must rise strictly in that order.

use std::collections::HashMap;

use baton_core::{Key, Token};

use super::{push, Violation};
use crate::history::Event;
use crate::intervals::{first_time, intervals};

/// Lists every repeated token and every token that did not rise, up to
/// [`super::MAX_LISTED`].
pub fn check(events: &[Event], key: &Key, limit: u32) -> Vec<Violation> {
    let ivs = intervals(events, key);
    let t0 = first_time(events);
    let mut out = Vec::new();
    let mut seen: HashMap<Token, usize> = HashMap::new();
    for (i, iv) in ivs.iter().enumerate() {
        if let Some(&j) = seen.get(&iv.token) {
            push(
                &mut out,
                Violation {
                    property: "tokens",
                    message: format!(
                        "token {} of '{key}' granted twice:\n  {}\n  {}",
                        iv.token,
                        ivs[j].describe(t0),
                        iv.describe(t0)
                    ),
                    pids: vec![ivs[j].pid, iv.pid],
                },
            );
        }
        seen.insert(iv.token, i);
    }
    let mut by_grant: Vec<usize> = (0..ivs.len()).collect();
    by_grant.sort_by_key(|&i| ivs[i].t_grant_ns);
    let mut by_request: Vec<usize> = (0..ivs.len()).collect();
    by_request.sort_by_key(|&i| ivs[i].t_request_ns);
    // Sweep the requests in time order, keeping the greatest token among the grants
    // recorded before the current request.
    let mut next = 0;
    let mut max: Option<usize> = None;
    for &i in &by_request {
        while next < by_grant.len() && ivs[by_grant[next]].t_grant_ns < ivs[i].t_request_ns {
            let g = by_grant[next];
            if max.is_none_or(|m| ivs[g].token > ivs[m].token) {
                max = Some(g);
            }
            next += 1;
        }
        if let Some(m) = max {
            if ivs[i].token <= ivs[m].token {
                push(
                    &mut out,
                    Violation {
                        property: "tokens",
                        message: format!(
                            "token of '{key}' did not rise: a grant requested after an earlier \
                             grant returned got a token not greater than it:\n  earlier {}\n  \
                             later   {}",
                            ivs[m].describe(t0),
                            ivs[i].describe(t0)
                        ),
                        pids: vec![ivs[m].pid, ivs[i].pid],
                    },
                );
            }
        }
    }
    if limit == 1 {
        for pair in by_grant.windows(2) {
            let (a, b) = (&ivs[pair[0]], &ivs[pair[1]]);
            if b.token <= a.token {
                push(
                    &mut out,
                    Violation {
                        property: "tokens",
                        message: format!(
                            "mutex '{key}': tokens did not rise in grant order:\n  {}\n  {}",
                            a.describe(t0),
                            b.describe(t0)
                        ),
                        pids: vec![a.pid, b.pid],
                    },
                );
            }
        }
    }
    out
}
