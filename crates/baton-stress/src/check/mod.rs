//! The checkers: one file per property, each reading a history (and, where the property is
//! about the protected resource, the rows the resource accepted) and listing violations.
//!
//! - [`limit`]: at most `limit` overlapping holders, and no slot held twice;
//! - [`tokens`]: accepted tokens strictly increase (distinct, and rising in grant order);
//! - [`results`]: every event's result recorded exactly once (no lost, no doubled results);
//! - [`stale`]: no stale write accepted by the fenced resource;
//! - [`barrier`]: workflow stages never overlap and every party passes every stage;
//! - [`completeness`]: every event started and ended, and the store granted what it had
//!   to (every event when workers wait forever; at least one with `--wait`);
//! - [`recovery`]: a killed holder's slot comes back within the store's bound;
//! - [`stopped`]: a holder's command (its whole process group) is gone by the end of its
//!   lease (`pause` and `partition` holders run one that is slow to stop);
//! - [`unknown`]: which events' outcomes are unknown (timed out, killed), so the others
//!   treat them as neither success nor failure.

pub mod barrier;
pub mod completeness;
pub mod limit;
pub mod recovery;
pub mod results;
pub mod stale;
pub mod stopped;
pub mod tokens;
pub mod unknown;

use std::fmt;

use serde::Serialize;

/// At most this many violations are listed per property; the count is always exact.
pub const MAX_LISTED: usize = 50;

/// One violation of a property, with the processes whose events show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// The property: `limit`, `tokens`, `results`, `stale`, `recovery`, `barrier`,
    /// `completeness`, `liveness`, `stopped`.
    pub property: &'static str,
    /// What happened, naming the violating events (several lines for several events).
    pub message: String,
    /// The processes involved.
    pub pids: Vec<u32>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.property, self.message)
    }
}

/// Appends `v` to `out` unless [`MAX_LISTED`] are listed already; returns whether it was
/// listed. Callers count every violation themselves.
pub(crate) fn push(out: &mut Vec<Violation>, v: Violation) {
    if out.len() < MAX_LISTED {
        out.push(v);
    }
}

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use crate::history::Event;
    use crate::intervals::Ends;
    use crate::resource::{CLAIM, RESULT};
    use baton_core::Token;

    #[test]
    fn a_lease_ends_at_its_holders_deadline_on_lease_stores() {
        // Pid 1 was paused past its deadline (100); pid 2 got the slot at 150.
        let held = Event::Held {
            pid: 1,
            t_ns: 11,
            key: key(),
            token: Token(1),
            deadline_ns: 100,
        };
        let h = vec![
            grant(1, 0, 10, 0, 1),
            held,
            grant(2, 5, 150, 0, 2),
            release(2, 160, 0, 2),
            release(1, 400, 0, 1),
        ];
        assert!(limit::check(&h, &key(), 1, Ends::Deadlines).is_empty());
        let v = limit::check(&h, &key(), 1, Ends::Release);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].pids, vec![1, 2]);
    }

    #[test]
    fn a_lease_without_a_recorded_deadline_ends_at_the_first_one_it_could_have() {
        // Pid 1 (TTL 100ms: validity 89ms from its request at 0) was stopped before its
        // keeper's deadline was recorded; pid 2 got the slot at 200ms.
        let mut first = grant(1, 0, 10, 0, 1);
        if let Event::Grant { lease, .. } = &mut first {
            lease.ttl = Some(std::time::Duration::from_millis(100));
        }
        let h = vec![
            first,
            grant(2, 5, 200_000_000, 0, 2),
            release(2, 210_000_000, 0, 2),
            release(1, 400_000_000, 0, 1),
        ];
        assert!(limit::check(&h, &key(), 1, Ends::Deadlines).is_empty());
        assert_eq!(limit::check(&h, &key(), 1, Ends::Release).len(), 1);
    }

    #[test]
    fn a_renewal_recorded_before_the_keeper_saw_it_extends_the_lease() {
        // Pid 1 (TTL 100ms: validity 89ms) renewed at 50ms and was stopped before its
        // `held` line; its last recorded deadline is 89ms, but the renewal gave it until
        // 139ms. Pid 2's grant at 120ms is a re-grant before that deadline.
        let mut first = grant(1, 0, 10, 0, 1);
        if let Event::Grant { lease, .. } = &mut first {
            lease.ttl = Some(std::time::Duration::from_millis(100));
        }
        let renewed = |ok| Event::Renewed {
            pid: 1,
            t_ns: 51_000_000,
            t_sent_ns: 50_000_000,
            key: key(),
            token: Token(1),
            ok,
            kind: None,
            error: None,
        };
        let h = vec![
            Event::Held {
                pid: 1,
                t_ns: 9,
                key: key(),
                token: Token(1),
                deadline_ns: 89_000_000,
            },
            first,
            renewed(true),
            grant(2, 5, 120_000_000, 0, 2),
            release(2, 130_000_000, 0, 2),
        ];
        let v = limit::check(&h, &key(), 1, Ends::Deadlines);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].pids, vec![1, 2]);
        // A renewal that failed gave no new deadline.
        let mut failed = h.clone();
        failed[2] = renewed(false);
        assert!(limit::check(&failed, &key(), 1, Ends::Deadlines).is_empty());
    }

    #[test]
    fn every_overlap_is_listed() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            grant(2, 0, 20, 0, 2),
            grant(3, 0, 30, 0, 3),
            release(1, 40, 0, 1),
        ];
        let v = limit::check(&h, &key(), 1, Ends::Release);
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v.iter().all(|v| v.property == "limit"));
    }

    #[test]
    fn results_must_be_recorded_exactly_once() {
        let h = vec![
            start(1, 0, 0),
            done(1, 10, 0, "ok"),
            start(2, 0, 1),
            done(2, 10, 1, "ok"),
            start(3, 0, 2),
            done(3, 10, 2, "fenced"),
            start(4, 0, 3),
            Event::Killed { pid: 4, t_ns: 5 },
            start(5, 0, 4),
            done(5, 10, 4, "unknown"),
        ];
        // Event 0 once, 1 lost, 2 fenced yet written, 3 killed (unknown) once, 4 unknown
        // twice, 9 made up.
        let rows = vec![
            row(0, 1, 1, RESULT),
            row(0, 1, 1, CLAIM),
            row(2, 3, 3, RESULT),
            row(3, 4, 4, RESULT),
            row(4, 5, 5, RESULT),
            row(4, 5, 5, RESULT),
            row(9, 6, 6, RESULT),
        ];
        let v = results::check(&h, &rows);
        let text: Vec<String> = v.iter().map(|v| v.message.clone()).collect();
        assert_eq!(v.len(), 4, "{text:#?}");
        assert!(
            text[0].starts_with("event 1 (pid 2) succeeded but has 0"),
            "{text:#?}"
        );
        assert!(
            text[1].starts_with("event 2 (pid 3) was fenced"),
            "{text:#?}"
        );
        assert!(
            text[2].contains("event 4") && text[2].contains("unknown"),
            "{text:#?}"
        );
        assert!(
            text[3].contains("event 9, which no worker ran"),
            "{text:#?}"
        );
        let known = unknown::outcomes(&h);
        assert_eq!(
            known[&3].outcome,
            unknown::Outcome::Unknown("killed".into())
        );
    }

    #[test]
    fn a_doubled_event_or_outcome_is_reported() {
        // Event 0 started by two workers; event 1 recorded its outcome twice.
        let h = vec![
            start(1, 0, 0),
            start(2, 1, 0),
            done(1, 10, 0, "ok"),
            start(3, 0, 1),
            done(3, 10, 1, "ok"),
            done(3, 11, 1, "ok"),
        ];
        let rows = vec![row(0, 1, 1, RESULT), row(1, 3, 2, RESULT)];
        let text: Vec<String> = results::check(&h, &rows)
            .into_iter()
            .map(|v| v.message)
            .collect();
        assert_eq!(text.len(), 2, "{text:#?}");
        assert_eq!(text[0], "event 0 was started 2 times (pids [1, 2])");
        assert_eq!(text[1], "event 1 (pid 3) recorded its outcome 2 times");
        assert_eq!(unknown::outcomes(&h)[&0].started_by, vec![1, 2]);
    }

    #[test]
    fn every_party_must_pass_and_none_before_the_last_arrives() {
        let arrive = |pid, t_ns| Event::Arrive {
            pid,
            t_ns,
            key: key(),
        };
        let passed = |pid, t_ns| Event::Passed {
            pid,
            t_ns,
            key: key(),
            generation: 0,
        };
        // Party 2 never passed stage 0.
        let h = vec![arrive(1, 10), arrive(2, 20), passed(1, 25)];
        let (_, v) = barrier::check(&h, 1, 1, 2);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].message, "stage 0: 1 of 2 parties passed the barrier");
        assert_eq!(
            v[0].pids,
            vec![2],
            "the party that arrived but never passed"
        );
        // Party 1 passed at 15, before party 2 arrived at 20.
        let h = vec![arrive(1, 10), passed(1, 15), arrive(2, 20), passed(2, 21)];
        let (times, v) = barrier::check(&h, 1, 1, 2);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].message.contains("passed at") && v[0].message.contains("before the last"),
            "{}",
            v[0].message
        );
        assert!(times.is_empty());
    }

    #[test]
    fn a_stale_write_accepted_is_caught() {
        let rows = vec![
            row(0, 1, 5, CLAIM),
            row(0, 1, 5, RESULT),
            row(1, 2, 7, CLAIM),
            row(0, 1, 5, RESULT),
        ];
        let refused = Event::FenceWrite {
            pid: 1,
            t_ns: 9,
            key: key(),
            token: Token(5),
            accepted: false,
            kind: Some("fenced".into()),
            error: None,
        };
        let (v, n) = stale::check(&[refused], &rows);
        assert_eq!(n, 1);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(
            v[0].message.contains("token 5 after pid 2"),
            "{}",
            v[0].message
        );
        let (v, _) = stale::check(&[], &rows[..3]);
        assert!(v.is_empty(), "{v:?}");
    }

    #[test]
    fn recovery_is_measured_from_the_kill_to_the_next_grant() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            Event::Request {
                pid: 2,
                t_ns: 15,
                key: key(),
            },
            Event::Killed { pid: 1, t_ns: 20 },
            grant(2, 15, 1_000_020, 0, 2),
        ];
        let (times, v) = recovery::check(&h, &key(), 2_000_000);
        assert_eq!(times, vec![1_000_000]);
        assert!(v.is_empty());
        let (_, v) = recovery::check(&h, &key(), 500_000);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("bound 0.500ms"), "{}", v[0].message);
        // Nobody waiting at the kill: nothing to measure.
        let (times, v) = recovery::check(&h[..1], &key(), 1);
        assert!(times.is_empty() && v.is_empty());
    }

    #[test]
    fn a_slot_that_never_comes_back_is_caught_even_when_another_slot_served() {
        // A semaphore of 2: pid 1 dies holding slot 0; pid 2 waited and got slot 1; a
        // probe (pid 3) asked after the kill and got slot 1 again. Slot 0 never came back.
        let h = vec![
            grant(1, 0, 10, 0, 1),
            grant(4, 0, 11, 1, 2),
            Event::Request {
                pid: 2,
                t_ns: 15,
                key: key(),
            },
            Event::Killed { pid: 1, t_ns: 20 },
            release(4, 30, 1, 2),
            grant(2, 15, 31, 1, 3),
            release(2, 40, 1, 3),
            Event::Request {
                pid: 3,
                t_ns: 50,
                key: key(),
            },
            grant(3, 50, 51, 1, 4),
        ];
        let (times, v) = recovery::check(&h, &key(), 1_000_000_000);
        assert!(times.is_empty(), "{times:?}");
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("slot 0") && v[0].message.contains("never came back"));
        // Nobody asked after the kill: nothing to judge.
        let quiet = vec![grant(1, 0, 10, 0, 1), Event::Killed { pid: 1, t_ns: 20 }];
        assert!(recovery::check(&quiet, &key(), 1).1.is_empty());
    }

    #[test]
    fn recovery_counts_from_a_request_made_after_the_kill() {
        // No waiter at the kill (20); a probe asked at 1_000 and got the slot at 1_500.
        let h = vec![
            grant(1, 0, 10, 0, 1),
            Event::Killed { pid: 1, t_ns: 20 },
            grant(3, 1_000, 1_500, 0, 2),
        ];
        let (times, v) = recovery::check(&h, &key(), 600);
        assert_eq!(times, vec![500]);
        assert!(v.is_empty(), "{v:?}");
        let (_, v) = recovery::check(&h, &key(), 400);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("asked at"), "{}", v[0].message);
    }

    #[test]
    fn each_store_has_its_own_recovery_bound() {
        use baton_core::StoreUrl;
        use std::time::Duration;
        let ttl = Duration::from_millis(500);
        let bound = |url: &str, lease| {
            recovery::store_bound(&StoreUrl::parse(url).expect("url"), lease, ttl).0
        };
        assert_eq!(bound("dir:/tmp/x", false), Duration::from_millis(500));
        assert_eq!(
            bound("dir:/tmp/x?mode=lease", true),
            ttl + Duration::from_secs(1)
        );
        assert_eq!(
            bound("sqlite:/tmp/x.db", true),
            ttl + Duration::from_secs(1)
        );
        assert_eq!(bound("postgres://h/db", true), ttl + Duration::from_secs(1));
        assert_eq!(bound("etcd://h:2379", true), Duration::from_millis(3500));
    }

    #[test]
    fn a_stage_that_starts_early_breaks_the_barrier() {
        let arrive = |pid, t_ns| Event::Arrive {
            pid,
            t_ns,
            key: key(),
        };
        let passed = |pid, t_ns| Event::Passed {
            pid,
            t_ns,
            key: key(),
            generation: 0,
        };
        let good = vec![
            start(1, 0, 0),
            done(1, 10, 0, "ok"),
            start(2, 0, 1),
            done(2, 20, 1, "ok"),
            arrive(1, 11),
            arrive(2, 21),
            passed(1, 25),
            passed(2, 26),
            start(1, 30, 2),
            done(1, 40, 2, "ok"),
        ];
        let (times, v) = barrier::check(&good, 2, 1, 2);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(times, vec![4]);
        let mut bad = good.clone();
        bad.push(start(2, 15, 3)); // stage 1 began before stage 0 ended at 20
        let (_, v) = barrier::check(&bad, 2, 1, 2);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].message.contains("stage 1 began"), "{}", v[0].message);
    }
}

/// The suite's tests of the two checkers it uses, moved here with them: the first
/// violation's message, as `baton-conformance` reports it.
#[cfg(test)]
mod suite_tests {
    use super::testutil::*;
    use super::*;
    use crate::history::Event;
    use crate::intervals::Ends;

    fn first(v: Vec<Violation>) -> Result<(), String> {
        v.into_iter().next().map_or(Ok(()), |v| Err(v.message))
    }

    fn lim(h: &[Event], limit: u32) -> Result<(), String> {
        first(limit::check(h, &key(), limit, Ends::Release))
    }

    fn tok(h: &[Event], limit: u32) -> Result<(), String> {
        first(tokens::check(h, &key(), limit))
    }

    #[test]
    fn disjoint_mutex_history_passes() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            release(1, 20, 0, 1),
            grant(2, 5, 30, 0, 2),
            release(2, 40, 0, 2),
            grant(1, 25, 50, 0, 3),
        ];
        lim(&h, 1).expect("limit");
        tok(&h, 1).expect("tokens");
    }

    #[test]
    fn overlapping_mutex_history_fails() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            grant(2, 5, 15, 0, 2),
            release(1, 20, 0, 1),
            release(2, 40, 0, 2),
        ];
        let err = lim(&h, 1).expect_err("overlap");
        assert!(err.contains("slot 0"), "{err}");
        // The same leases on different slots still break the limit of 1.
        let h = vec![
            grant(1, 0, 10, 0, 1),
            grant(2, 5, 15, 1, 2),
            release(1, 20, 0, 1),
        ];
        let err = lim(&h, 1).expect_err("overlap");
        assert!(err.contains("2 leases"), "{err}");
        lim(&h, 2).expect("fits a limit of 2");
    }

    #[test]
    fn a_lease_never_released_stays_held() {
        let h = vec![grant(1, 0, 10, 0, 1), grant(2, 5, 1_000, 0, 2)];
        lim(&h, 1).expect_err("the first is still held");
    }

    #[test]
    fn a_kill_ends_the_killed_process_leases() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            Event::Killed { pid: 1, t_ns: 20 },
            grant(2, 5, 30, 0, 2),
        ];
        lim(&h, 1).expect("the first holder died before the second grant");
        let h = vec![
            grant(1, 0, 10, 0, 1),
            grant(2, 5, 15, 0, 2),
            Event::Killed { pid: 1, t_ns: 20 },
        ];
        lim(&h, 1).expect_err("granted before the kill");
        let h = vec![
            grant(1, 0, 10, 0, 1),
            Event::Killed { pid: 3, t_ns: 20 },
            grant(2, 5, 30, 0, 2),
        ];
        lim(&h, 1).expect_err("another process was killed");
    }

    #[test]
    fn release_and_grant_at_the_same_instant_overlap() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            release(1, 20, 0, 1),
            grant(2, 5, 20, 0, 2),
        ];
        lim(&h, 1).expect_err("touching intervals overlap");
    }

    #[test]
    fn a_slot_held_twice_fails_even_within_the_limit() {
        let h = vec![
            grant(1, 0, 10, 1, 1),
            grant(2, 0, 12, 1, 2),
            release(1, 20, 1, 1),
            release(2, 30, 1, 2),
        ];
        let err = lim(&h, 3).expect_err("slot 1 twice");
        assert!(err.contains("slot 1"), "{err}");
        // A slot outside the limit, though only one lease is held.
        let h = vec![grant(1, 0, 10, 3, 1), release(1, 20, 3, 1)];
        let err = lim(&h, 3).expect_err("slot 3 of 3");
        assert!(err.contains("outside its limit of 3"), "{err}");
    }

    #[test]
    fn falling_or_repeated_tokens_fail() {
        // Sequential grants: the second token is lower.
        let h = vec![
            grant(1, 0, 10, 0, 5),
            release(1, 20, 0, 5),
            grant(1, 30, 40, 0, 4),
        ];
        let err = tok(&h, 3).expect_err("fell");
        assert!(err.contains("did not rise"), "{err}");
        // Repeated token.
        let h = vec![grant(1, 0, 10, 0, 5), grant(2, 0, 12, 1, 5)];
        let err = tok(&h, 3).expect_err("repeated");
        assert!(err.contains("twice"), "{err}");
        // Concurrent requests may be granted out of token order on a semaphore...
        let h = vec![grant(1, 0, 12, 0, 6), grant(2, 0, 10, 1, 7)];
        tok(&h, 3).expect("concurrent grants");
        // ...but not on a mutex, where grants are ordered.
        let h = vec![
            grant(2, 0, 10, 0, 7),
            release(2, 11, 0, 7),
            grant(1, 0, 12, 0, 6),
        ];
        tok(&h, 1).expect_err("mutex order");
    }
}
