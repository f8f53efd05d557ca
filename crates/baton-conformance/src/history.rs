//! Histories: what the processes of a conformance run did, and the checkers that read them.
//!
//! The history model and the checkers are `baton-stress`'s (one implementation, used by
//! the stress harness and this suite alike); this module re-exports them and keeps the
//! suite's `Result<(), String>` form of the two checkers it uses.
//!
//! The times are taken so that the checkers only ever report real violations: a grant is
//! recorded *after* `acquire` returned and a release *before* `release` is called, so the
//! recorded interval of a lease lies inside the interval the store really held it. Two
//! recorded intervals that overlap therefore overlapped in the store too.

use baton_core::Key;

pub use baton_stress::history::{
    read_history, read_history_so_far, record_keeper, Event, Recorder,
};
pub use baton_stress::intervals::{intervals, Interval};

/// Checks contract point 1 on a history: at no instant were more than `limit` leases of
/// `key` held, and no slot was held by two leases at once. Fails with the first violation
/// ([`baton_stress::check::limit`]).
pub fn check_limit(events: &[Event], key: &Key, limit: u32) -> Result<(), String> {
    first(baton_stress::check::limit::check(
        events,
        key,
        limit,
        baton_stress::intervals::Ends::Release,
    ))
}

/// Checks contract point 2 on a history: every grant of `key` has a token greater than
/// every token granted before it. Fails with the first violation
/// ([`baton_stress::check::tokens`]).
pub fn check_tokens(events: &[Event], key: &Key, limit: u32) -> Result<(), String> {
    first(baton_stress::check::tokens::check(events, key, limit))
}

fn first(violations: Vec<baton_stress::check::Violation>) -> Result<(), String> {
    match violations.into_iter().next() {
        Some(v) => Err(v.message),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The checkers' own tests live with them in baton-stress; this one checks that the
    // suite's wrappers pass the first violation on.
    #[test]
    fn wrappers_report_the_first_violation() {
        let key = Key::new("conformance/wrapper").expect("key");
        assert_eq!(check_limit(&[], &key, 1), Ok(()));
        assert_eq!(check_tokens(&[], &key, 1), Ok(()));
        let grant = |pid: u32, t_ns: u64| Event::Grant {
            pid,
            t_ns,
            t_request_ns: 0,
            lease: baton_core::Lease {
                key: key.clone(),
                slot: 0,
                limit: 1,
                token: baton_core::Token(1),
                holder: baton_core::Holder::current(vec!["wrapper".into()]),
                ttl: None,
                acquired_unix_ms: 0,
                sent_at: None,
            },
        };
        let h = vec![grant(1, 10), grant(2, 20)];
        let err = check_limit(&h, &key, 1).expect_err("overlap");
        assert!(
            err.starts_with("slot 0 of 'conformance/wrapper' held twice"),
            "{err}"
        );
        let err = check_tokens(&h, &key, 1).expect_err("repeated token");
        assert!(err.contains("granted twice"), "{err}");
    }
}
