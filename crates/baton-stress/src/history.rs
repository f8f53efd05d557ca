//! Histories: what the processes of a run did (a stress run, or a conformance property).
//!
//! A history is a JSON Lines file, one [`Event`] per line with a `type` field. Every process
//! of a run (the orchestrator and its workers) appends to the same file with `O_APPEND` and one
//! `write` per line, so lines never interleave. Times are nanoseconds on the host's
//! monotonic clock ([`crate::clock::monotonic_ns`]).
//!
//! The times are taken so that the checkers only ever report real violations: a grant is
//! recorded *after* `acquire` returned and a release *before* `release` is called, so the
//! recorded interval of a lease lies inside the interval the store really held it. Two
//! recorded intervals that overlap therefore overlapped in the store too.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use baton_core::{Key, Lease, LeaseState, Released, Token};

use crate::clock::{instant_ns, monotonic_ns};
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
    /// A holder's command (run under [`baton_core::supervisor`], as `baton run` runs it)
    /// is gone: every process of its group exited and was reaped. `t_ns` is the
    /// supervisor's own reading, taken even while the holder was paused.
    CommandGone {
        /// The holder.
        pid: u32,
        /// When the group was found empty.
        t_ns: u64,
        /// The lease's key.
        key: Key,
        /// The lease's token.
        token: Token,
        /// The supervisor had to stop the group (a deadline or a loss), rather than the
        /// holder ending it after its hold.
        stopped: bool,
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
    /// The harness cut a worker off its server (its fault proxy holds all traffic).
    Partitioned {
        /// The process cut off (not the one recording).
        pid: u32,
        /// When, just before the proxy changed.
        t_ns: u64,
    },
    /// The harness healed a worker's partition.
    Healed {
        /// The process whose traffic passes again.
        pid: u32,
        /// When, just before the proxy changed.
        t_ns: u64,
    },
    /// A stress worker began its event (one event per worker process).
    Start {
        /// The worker.
        pid: u32,
        /// When.
        t_ns: u64,
        /// The event's number in the run (`0..events`; workflow: the job's number).
        id: u64,
    },
    /// A stress worker finished its event, with what it knows of the outcome.
    Done {
        /// The worker.
        pid: u32,
        /// When.
        t_ns: u64,
        /// The event's number.
        id: u64,
        /// `ok` (the result was written), `fenced` (the fence refused the result: the
        /// lease was lost), `unknown` (an operation timed out: it may or may not have
        /// happened) or `error`.
        outcome: String,
        /// Why, when not `ok`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// A probe worker began: it is not one of the run's events, only an acquire (or, at the
    /// end of a `crash` run, one per slot) that shows how soon a killed holder's slot came
    /// back. Its grants are checked like any other; its pid counts no event.
    Probe {
        /// The probe.
        pid: u32,
        /// When.
        t_ns: u64,
        /// How many slots it takes (and holds until it has them all).
        slots: u32,
    },
    /// A party is about to arrive at a barrier.
    Arrive {
        /// The party.
        pid: u32,
        /// When, just before the call.
        t_ns: u64,
        /// The barrier's key.
        key: Key,
    },
    /// A party passed a barrier: all its parties had arrived.
    Passed {
        /// The party.
        pid: u32,
        /// When the call returned.
        t_ns: u64,
        /// The barrier's key.
        key: Key,
        /// The generation that passed.
        generation: u64,
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
            | Event::CommandGone { pid, .. }
            | Event::Failed { pid, .. }
            | Event::Clock { pid, .. }
            | Event::Held { pid, .. }
            | Event::Renewed { pid, .. }
            | Event::Lost { pid, .. }
            | Event::FenceWrite { pid, .. }
            | Event::Paused { pid, .. }
            | Event::Resumed { pid, .. }
            | Event::Partitioned { pid, .. }
            | Event::Healed { pid, .. }
            | Event::Start { pid, .. }
            | Event::Done { pid, .. }
            | Event::Probe { pid, .. }
            | Event::Arrive { pid, .. }
            | Event::Passed { pid, .. } => *pid,
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
            | Event::CommandGone { t_ns, .. }
            | Event::Failed { t_ns, .. }
            | Event::Clock { t_ns, .. }
            | Event::Held { t_ns, .. }
            | Event::Renewed { t_ns, .. }
            | Event::Lost { t_ns, .. }
            | Event::FenceWrite { t_ns, .. }
            | Event::Paused { t_ns, .. }
            | Event::Resumed { t_ns, .. }
            | Event::Partitioned { t_ns, .. }
            | Event::Healed { t_ns, .. }
            | Event::Start { t_ns, .. }
            | Event::Done { t_ns, .. }
            | Event::Probe { t_ns, .. }
            | Event::Arrive { t_ns, .. }
            | Event::Passed { t_ns, .. } => *t_ns,
        }
    }
}

impl Event {
    /// The `fence_write` event for a write by `pid` through the fence for `key` with
    /// `token` that returned `result`, timed now.
    pub fn fence_write<T>(
        pid: u32,
        key: &Key,
        token: Token,
        result: &Result<T, baton_core::Error>,
    ) -> Event {
        Event::FenceWrite {
            pid,
            t_ns: monotonic_ns(),
            key: key.clone(),
            token,
            accepted: result.is_ok(),
            kind: result.as_ref().err().map(|e| e.kind().as_str().into()),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
        }
    }
}

/// Records every state a lease's keeper publishes (`held` with each new deadline, then
/// `lost`) until the keeper stops or declares the lease lost. Spawn it beside the keeper
/// and await it after stopping the keeper: it ends with the first line it cannot write,
/// and the holder must then stop with that error (its history is incomplete).
///
/// These lines come after the keeper has acted on them; the write-ahead record of a
/// lease's end is [`crate::recording::RecordingStore`]'s `renewed` lines.
pub async fn record_keeper(
    rec: Recorder,
    mut rx: tokio::sync::watch::Receiver<LeaseState>,
    pid: u32,
    key: Key,
    token: Token,
) -> io::Result<()> {
    loop {
        let state = rx.borrow_and_update().clone();
        let event = match &state {
            LeaseState::Held { deadline } => Event::Held {
                pid,
                t_ns: monotonic_ns(),
                key: key.clone(),
                token,
                deadline_ns: instant_ns(*deadline),
            },
            LeaseState::Lost { at, reason } => Event::Lost {
                pid,
                t_ns: monotonic_ns(),
                key: key.clone(),
                token,
                at_ns: instant_ns(*at),
                reason: reason.clone(),
            },
            LeaseState::Stopped => return Ok(()),
        };
        rec.record(&event)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot record {event:?}: {e}")))?;
        if !matches!(state, LeaseState::Held { .. }) || rx.changed().await.is_err() {
            return Ok(());
        }
    }
}

/// Parses complete JSON Lines (no partial last line).
fn parse_lines(complete: &[u8]) -> io::Result<Vec<Event>> {
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

/// Reads a finished history: one whose writers have all exited. Every line must be whole
/// and parse; a last line without its newline is data lost (a writer died mid-line or a
/// write failed), so it is an error, not something to skip. A missing file has no events.
pub fn read_history(path: &Path) -> io::Result<Vec<Event>> {
    let Some(text) = read_bytes(path)? else {
        return Ok(Vec::new());
    };
    if !text.is_empty() && text.last() != Some(&b'\n') {
        let start = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the history {} ends in a torn line {:?} though every writer has exited",
                path.display(),
                String::from_utf8_lossy(&text[start..])
            ),
        ));
    }
    parse_lines(&text)
}

/// Reads a history that may still be growing: a last line without its newline is still
/// being written and is left out; any other line that does not parse is an error.
pub fn read_history_so_far(path: &Path) -> io::Result<Vec<Event>> {
    let Some(text) = read_bytes(path)? else {
        return Ok(Vec::new());
    };
    match text.iter().rposition(|&b| b == b'\n') {
        Some(end) => parse_lines(&text[..end]),
        None => Ok(Vec::new()),
    }
}

fn read_bytes(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a history as it grows: each [`Tail::poll`] returns the complete lines appended
/// since the last one. The orchestrator of a stress run uses it to see grants as they
/// happen (to kill or pause a holder while it holds).
#[derive(Debug)]
pub struct Tail {
    path: std::path::PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    /// Follows the history at `path` from its beginning.
    pub fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_owned(),
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// The events appended since the last call. A missing file has no events yet.
    pub fn poll(&mut self) -> io::Result<Vec<Event>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(end) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(end + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        parse_lines(&complete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::Token;
    use std::io::Write;

    #[test]
    fn histories_round_trip_and_a_partial_last_line_is_skipped_only_while_growing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.jsonl");
        let rec = Recorder::open(&path).expect("open");
        let events = vec![
            crate::check::testutil::grant(1, 0, 10, 0, 1),
            crate::check::testutil::release(1, 20, 0, 1),
            Event::Released {
                pid: 1,
                t_ns: 21,
                key: crate::check::testutil::key(),
                token: Token(1),
                outcome: Some(Released::Released),
                error: None,
            },
        ];
        for e in &events {
            rec.record(e).expect("record");
        }
        assert_eq!(read_history(&path).expect("whole"), events);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"type\":\"rea"))
            .expect("partial");
        assert_eq!(read_history_so_far(&path).expect("read so far"), events);
        // Once every writer has exited, a torn last line is lost data.
        let err = read_history(&path).expect_err("torn");
        assert!(err.to_string().contains("torn line"), "{err}");
        assert!(read_history(&dir.path().join("none"))
            .expect("missing")
            .is_empty());
    }
}
