//! Property: no stale write is accepted. A write whose token is lower than one the
//! resource already accepted for the same fence key must be refused (the fence helper
//! does it); this checker verifies it from the rows the resource committed, in commit
//! order, and from the history's refused writes.

use std::collections::HashMap;

use super::{push, Violation};
use crate::history::Event;
use crate::resource::Row;

/// Lists every accepted row whose token is lower than an earlier accepted row's for the
/// same fence key, up to [`super::MAX_LISTED`]; also counts the writes the fence refused
/// (returned second), which is how a run shows that late writes were stopped.
pub fn check(events: &[Event], rows: &[Row]) -> (Vec<Violation>, usize) {
    let mut out = Vec::new();
    let mut highest: HashMap<&str, &Row> = HashMap::new();
    for row in rows {
        match highest.get(row.fence_key.as_str()) {
            Some(h) if row.token < h.token => push(
                &mut out,
                Violation {
                    property: "stale",
                    message: format!(
                        "stale write accepted on '{}': pid {} (event {}) wrote with token {} \
                         after pid {} (event {}) had written with token {}",
                        row.fence_key, row.pid, row.id, row.token, h.pid, h.id, h.token
                    ),
                    pids: vec![h.pid, row.pid],
                },
            ),
            Some(h) if row.token == h.token => {}
            _ => {
                highest.insert(&row.fence_key, row);
            }
        }
    }
    let refused = events
        .iter()
        .filter(|e| {
            matches!(e, Event::FenceWrite { accepted: false, kind: Some(k), .. } if k == "fenced")
        })
        .count();
    (out, refused)
}
