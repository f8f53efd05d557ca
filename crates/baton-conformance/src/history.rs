//! Histories: what the processes of a conformance run did, and the checkers that read them.
//!
//! A history is a JSON Lines file, one [`Event`] per line with a `type` field. Every process
//! of a run (the test and its workers) appends to the same file with `O_APPEND` and one
//! `write` per line, so lines never interleave. Times are nanoseconds on the host's
//! monotonic clock ([`crate::monotonic_ns`]).
//!
//! The times are taken so that the checkers only ever report real violations: a grant is
//! recorded *after* `acquire` returned and a release *before* `release` is called, so the
//! recorded interval of a lease lies inside the interval the store really held it. Two
//! recorded intervals that overlap therefore overlapped in the store too.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use baton_core::{Key, Lease, Released, Token};
use serde::{Deserialize, Serialize};

/// One thing a process did, with the monotonic time it did it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A worker started and opened the store.
    Ready {
        /// The process.
        pid: u32,
        /// When.
        t_ns: u64,
    },
    /// A process is about to call `acquire`.
    Request {
        /// The process.
        pid: u32,
        /// When, just before the call.
        t_ns: u64,
        /// The key asked for.
        key: Key,
    },
    /// `acquire` returned a lease.
    Grant {
        /// The process.
        pid: u32,
        /// When, just after the call returned.
        t_ns: u64,
        /// When the call began.
        t_request_ns: u64,
        /// What the store granted.
        lease: Lease,
    },
    /// `acquire` failed.
    Refused {
        /// The process.
        pid: u32,
        /// When the call returned.
        t_ns: u64,
        /// The key asked for.
        key: Key,
        /// The error's kind, as [`baton_core::ErrorKind::as_str`] names it.
        kind: String,
        /// The error, displayed.
        message: String,
    },
    /// A process is about to call `release`.
    Release {
        /// The process.
        pid: u32,
        /// When, just before the call.
        t_ns: u64,
        /// The lease's key.
        key: Key,
        /// The lease's slot.
        slot: u32,
        /// The lease's token.
        token: Token,
    },
    /// `release` returned.
    Released {
        /// The process.
        pid: u32,
        /// When the call returned.
        t_ns: u64,
        /// The lease's key.
        key: Key,
        /// The lease's token.
        token: Token,
        /// What the store answered, or `None` when it failed (see `error`).
        outcome: Option<Released>,
        /// The error, displayed, when the call failed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The test is about to SIGKILL a worker: whatever it holds, it holds no longer than
    /// from here until it dies, so the leases it never released end here.
    Killed {
        /// The process killed (not the one recording).
        pid: u32,
        /// When, just before the signal was sent.
        t_ns: u64,
    },
    /// A worker gave up on its job.
    Failed {
        /// The process.
        pid: u32,
        /// When.
        t_ns: u64,
        /// Why.
        message: String,
    },
    /// A process read its wall clock (`SystemTime::now()`), to show that a faked clock
    /// took effect.
    Clock {
        /// The process.
        pid: u32,
        /// When, on the monotonic clock.
        t_ns: u64,
        /// What the wall clock said, in ms since the Unix epoch (negative before it).
        unix_ms: i64,
    },
    /// The holder's keeper published a deadline: it will declare the lease lost then
    /// unless a renewal succeeds first.
    Held {
        /// The holder.
        pid: u32,
        /// When the holder saw the new deadline.
        t_ns: u64,
        /// The lease's key.
        key: Key,
        /// The lease's token.
        token: Token,
        /// The deadline, on the monotonic clock.
        deadline_ns: u64,
    },
    /// A renewal (by the holder's keeper) returned.
    Renewed {
        /// The holder.
        pid: u32,
        /// When it returned.
        t_ns: u64,
        /// When it was called, no earlier than the keeper's send time (its deadline counts
        /// from the send time, so `t_sent_ns + validity` bounds that deadline from above).
        t_sent_ns: u64,
        /// The lease's key.
        key: Key,
        /// The lease's token.
        token: Token,
        /// Whether the store renewed the lease.
        ok: bool,
        /// When it did not: the error's kind.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        /// When it did not: the error, displayed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The holder's keeper declared the lease lost.
    Lost {
        /// The holder.
        pid: u32,
        /// When the holder saw it.
        t_ns: u64,
        /// The lease's key.
        key: Key,
        /// The lease's token.
        token: Token,
        /// When the keeper declared it, on the monotonic clock.
        at_ns: u64,
        /// Why, in the keeper's words.
        reason: String,
    },
    /// A write to the fenced resource (a SQLite database behind `baton_core::fence`)
    /// returned.
    FenceWrite {
        /// The writer.
        pid: u32,
        /// When the write returned.
        t_ns: u64,
        /// The key the fence tracks.
        key: Key,
        /// The token the write carried.
        token: Token,
        /// Whether the resource accepted it.
        accepted: bool,
        /// When it did not: the error's kind (`fenced` for a refused token).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        /// When it did not: the error, displayed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The test is about to SIGSTOP a worker.
    Paused {
        /// The process paused (not the one recording).
        pid: u32,
        /// When, just before the signal was sent.
        t_ns: u64,
    },
    /// The test is about to SIGCONT a worker.
    Resumed {
        /// The process resumed (not the one recording).
        pid: u32,
        /// When, just before the signal was sent.
        t_ns: u64,
    },
}

impl Event {
    /// The process that recorded the event; for `killed`, `paused` and `resumed`, the
    /// process the test signalled.
    pub fn pid(&self) -> u32 {
        match self {
            Event::Ready { pid, .. }
            | Event::Request { pid, .. }
            | Event::Grant { pid, .. }
            | Event::Refused { pid, .. }
            | Event::Release { pid, .. }
            | Event::Released { pid, .. }
            | Event::Killed { pid, .. }
            | Event::Failed { pid, .. }
            | Event::Clock { pid, .. }
            | Event::Held { pid, .. }
            | Event::Renewed { pid, .. }
            | Event::Lost { pid, .. }
            | Event::FenceWrite { pid, .. }
            | Event::Paused { pid, .. }
            | Event::Resumed { pid, .. } => *pid,
        }
    }

    /// When the event was recorded, on the monotonic clock.
    pub fn t_ns(&self) -> u64 {
        match self {
            Event::Ready { t_ns, .. }
            | Event::Request { t_ns, .. }
            | Event::Grant { t_ns, .. }
            | Event::Refused { t_ns, .. }
            | Event::Release { t_ns, .. }
            | Event::Released { t_ns, .. }
            | Event::Killed { t_ns, .. }
            | Event::Failed { t_ns, .. }
            | Event::Clock { t_ns, .. }
            | Event::Held { t_ns, .. }
            | Event::Renewed { t_ns, .. }
            | Event::Lost { t_ns, .. }
            | Event::FenceWrite { t_ns, .. }
            | Event::Paused { t_ns, .. }
            | Event::Resumed { t_ns, .. } => *t_ns,
        }
    }
}

/// Appends events to a history file: `O_APPEND`, one `write` per line.
#[derive(Debug)]
pub struct Recorder {
    file: File,
}

impl Recorder {
    /// Opens (creating if needed) the history at `path` for appending.
    pub fn open(path: &Path) -> io::Result<Recorder> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Recorder { file })
    }

    /// Appends one event as one line, in a single `write` so that lines from concurrent
    /// processes never interleave.
    pub fn record(&self, event: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        let written = (&self.file).write(&line)?;
        if written != line.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "short write to the history: {written} of {} bytes",
                    line.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Reads a history. A last line without its newline is still being written and is left
/// out; any other line that does not parse is an error.
pub fn read_history(path: &Path) -> io::Result<Vec<Event>> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let complete = match text.iter().rposition(|&b| b == b'\n') {
        Some(end) => &text[..end],
        None => return Ok(Vec::new()),
    };
    complete
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            serde_json::from_slice(line).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "history line {:?} does not parse: {e}",
                        String::from_utf8_lossy(line)
                    ),
                )
            })
        })
        .collect()
}

/// One lease as a history shows it: from the return of `acquire` to the call of `release`.
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
    /// When `release` was about to be called, or the holder was about to be killed; `None`
    /// if neither happened (held to the end).
    pub t_release_ns: Option<u64>,
}

impl Interval {
    fn describe(&self, t0: u64) -> String {
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

fn ms(t: u64, t0: u64) -> f64 {
    t.saturating_sub(t0) as f64 / 1e6
}

/// The leases of `key` in a history, in the order they were granted (recorded). A release
/// is matched to the grant of the same process, key and token; a kill ends every lease the
/// killed process still held.
pub fn intervals(events: &[Event], key: &Key) -> Vec<Interval> {
    let mut out: Vec<Interval> = Vec::new();
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
    out
}

fn first_time(events: &[Event]) -> u64 {
    events.iter().map(Event::t_ns).min().unwrap_or(0)
}

/// Checks contract point 1 on a history: at no instant were more than `limit` leases of
/// `key` held, and no slot was held by two leases at once.
///
/// Sweeps the grant and release times in order; at equal times grants come first, since
/// a lease recorded as released at `t` was really released after `t` and one recorded as
/// granted at `t` was really granted before it.
pub fn check_limit(events: &[Event], key: &Key, limit: u32) -> Result<(), String> {
    let ivs = intervals(events, key);
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
        if let Some(&other) = by_slot.get(&iv.slot) {
            return Err(format!(
                "slot {} of '{key}' held twice at {:.3}ms:\n  {}\n  {}",
                iv.slot,
                ms(t, t0),
                ivs[other].describe(t0),
                iv.describe(t0)
            ));
        }
        by_slot.insert(iv.slot, i);
        open.insert(i);
        if open.len() > limit as usize {
            let held: Vec<String> = open
                .iter()
                .map(|&j| format!("  {}", ivs[j].describe(t0)))
                .collect();
            return Err(format!(
                "{} leases of '{key}' (limit {limit}) held at once at {:.3}ms:\n{}",
                open.len(),
                ms(t, t0),
                held.join("\n")
            ));
        }
    }
    Ok(())
}

/// Checks contract point 2 on a history: every grant of `key` has a token greater than
/// every token granted before it.
///
/// "Before" is what the history can prove: a grant recorded before another was even
/// requested. Tokens must also be distinct. With `limit == 1` leases never overlap (check
/// that with [`check_limit`]), so grants are totally ordered by their recorded times and
/// tokens must rise strictly in that order.
pub fn check_tokens(events: &[Event], key: &Key, limit: u32) -> Result<(), String> {
    let ivs = intervals(events, key);
    let t0 = first_time(events);
    let mut seen: HashMap<Token, usize> = HashMap::new();
    for (i, iv) in ivs.iter().enumerate() {
        if let Some(&j) = seen.get(&iv.token) {
            return Err(format!(
                "token {} of '{key}' granted twice:\n  {}\n  {}",
                iv.token,
                ivs[j].describe(t0),
                iv.describe(t0)
            ));
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
                return Err(format!(
                    "token of '{key}' did not rise: a grant requested after an earlier grant \
                     returned got a token not greater than it:\n  earlier {}\n  later   {}",
                    ivs[m].describe(t0),
                    ivs[i].describe(t0)
                ));
            }
        }
    }
    if limit == 1 {
        for pair in by_grant.windows(2) {
            let (a, b) = (&ivs[pair[0]], &ivs[pair[1]]);
            if b.token <= a.token {
                return Err(format!(
                    "mutex '{key}': tokens did not rise in grant order:\n  {}\n  {}",
                    a.describe(t0),
                    b.describe(t0)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::Holder;

    fn key() -> Key {
        Key::new("conformance/checker").expect("key")
    }

    fn grant(pid: u32, t_request_ns: u64, t_ns: u64, slot: u32, token: u64) -> Event {
        Event::Grant {
            pid,
            t_ns,
            t_request_ns,
            lease: Lease {
                key: key(),
                slot,
                limit: 1,
                token: Token(token),
                holder: Holder::current(vec!["checker".into()]),
                ttl: None,
                acquired_unix_ms: 0,
                sent_at: None,
            },
        }
    }

    fn release(pid: u32, t_ns: u64, slot: u32, token: u64) -> Event {
        Event::Release {
            pid,
            t_ns,
            key: key(),
            slot,
            token: Token(token),
        }
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
        check_limit(&h, &key(), 1).expect("limit");
        check_tokens(&h, &key(), 1).expect("tokens");
    }

    #[test]
    fn overlapping_mutex_history_fails() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            grant(2, 5, 15, 0, 2),
            release(1, 20, 0, 1),
            release(2, 40, 0, 2),
        ];
        let err = check_limit(&h, &key(), 1).expect_err("overlap");
        assert!(err.contains("slot 0"), "{err}");
        // The same leases on different slots still break the limit of 1.
        let h = vec![
            grant(1, 0, 10, 0, 1),
            grant(2, 5, 15, 1, 2),
            release(1, 20, 0, 1),
        ];
        let err = check_limit(&h, &key(), 1).expect_err("overlap");
        assert!(err.contains("2 leases"), "{err}");
        check_limit(&h, &key(), 2).expect("fits a limit of 2");
    }

    #[test]
    fn a_lease_never_released_stays_held() {
        let h = vec![grant(1, 0, 10, 0, 1), grant(2, 5, 1_000, 0, 2)];
        check_limit(&h, &key(), 1).expect_err("the first is still held");
    }

    #[test]
    fn a_kill_ends_the_killed_process_leases() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            Event::Killed { pid: 1, t_ns: 20 },
            grant(2, 5, 30, 0, 2),
        ];
        check_limit(&h, &key(), 1).expect("the first holder died before the second grant");
        let h = vec![
            grant(1, 0, 10, 0, 1),
            grant(2, 5, 15, 0, 2),
            Event::Killed { pid: 1, t_ns: 20 },
        ];
        check_limit(&h, &key(), 1).expect_err("granted before the kill");
        let h = vec![
            grant(1, 0, 10, 0, 1),
            Event::Killed { pid: 3, t_ns: 20 },
            grant(2, 5, 30, 0, 2),
        ];
        check_limit(&h, &key(), 1).expect_err("another process was killed");
    }

    #[test]
    fn release_and_grant_at_the_same_instant_overlap() {
        let h = vec![
            grant(1, 0, 10, 0, 1),
            release(1, 20, 0, 1),
            grant(2, 5, 20, 0, 2),
        ];
        check_limit(&h, &key(), 1).expect_err("touching intervals overlap");
    }

    #[test]
    fn a_slot_held_twice_fails_even_within_the_limit() {
        let h = vec![
            grant(1, 0, 10, 1, 1),
            grant(2, 0, 12, 1, 2),
            release(1, 20, 1, 1),
            release(2, 30, 1, 2),
        ];
        let err = check_limit(&h, &key(), 3).expect_err("slot 1 twice");
        assert!(err.contains("slot 1"), "{err}");
    }

    #[test]
    fn falling_or_repeated_tokens_fail() {
        // Sequential grants: the second token is lower.
        let h = vec![
            grant(1, 0, 10, 0, 5),
            release(1, 20, 0, 5),
            grant(1, 30, 40, 0, 4),
        ];
        let err = check_tokens(&h, &key(), 3).expect_err("fell");
        assert!(err.contains("did not rise"), "{err}");
        // Repeated token.
        let h = vec![grant(1, 0, 10, 0, 5), grant(2, 0, 12, 1, 5)];
        let err = check_tokens(&h, &key(), 3).expect_err("repeated");
        assert!(err.contains("twice"), "{err}");
        // Concurrent requests may be granted out of token order on a semaphore...
        let h = vec![grant(1, 0, 12, 0, 6), grant(2, 0, 10, 1, 7)];
        check_tokens(&h, &key(), 3).expect("concurrent grants");
        // ...but not on a mutex, where grants are ordered.
        let h = vec![
            grant(2, 0, 10, 0, 7),
            release(2, 11, 0, 7),
            grant(1, 0, 12, 0, 6),
        ];
        check_tokens(&h, &key(), 1).expect_err("mutex order");
    }

    #[test]
    fn histories_round_trip_and_skip_a_partial_last_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.jsonl");
        let rec = Recorder::open(&path).expect("open");
        let events = vec![
            grant(1, 0, 10, 0, 1),
            release(1, 20, 0, 1),
            Event::Released {
                pid: 1,
                t_ns: 21,
                key: key(),
                token: Token(1),
                outcome: Some(Released::Released),
                error: None,
            },
        ];
        for e in &events {
            rec.record(e).expect("record");
        }
        (&rec.file).write_all(b"{\"type\":\"rea").expect("partial");
        assert_eq!(read_history(&path).expect("read"), events);
        assert!(read_history(&dir.path().join("none"))
            .expect("missing")
            .is_empty());
    }
}
