//! Worker processes: the test binary re-run as a separate OS process with a job.
//!
//! [`crate::suite!`] adds a hidden test, `__baton_conformance_worker`, to the store's test
//! binary. It does nothing unless the environment variable [`WORKER_ENV`] holds a [`Job`]
//! as JSON; then it opens the store by URL, does the job, records what it did in the job's
//! history file, and exits. The suite starts workers with [`std::env::current_exe`] and
//! libtest's arguments, which work the same under `cargo test` and `cargo nextest run`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use baton_core::{AcquireRequest, Holder, Key, Released, StoreUrl, Wait};
use serde::{Deserialize, Serialize};

use crate::history::{Event, Recorder};
use crate::{monotonic_ns, OpenFn, LIVENESS_BOUND};

/// The environment variable that carries a worker's job.
pub const WORKER_ENV: &str = "BATON_CONFORMANCE_WORKER";

/// The name of the hidden test that runs workers, inside the module that invoked
/// [`crate::suite!`].
pub const WORKER_TEST: &str = "__baton_conformance_worker";

/// What a worker process does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    /// The store's URL, opened with the suite's open function.
    pub url: String,
    /// The history to append events to.
    pub history: PathBuf,
    /// The key to work on.
    pub key: Key,
    /// The key's limit.
    pub limit: u32,
    /// The TTL to ask for, in milliseconds (lease stores).
    pub ttl_ms: Option<u64>,
    /// The task.
    pub task: Task,
}

/// A worker's task.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "task", rename_all = "snake_case")]
pub enum Task {
    /// Wait until `start` exists, then acquire and release the key `rounds` times,
    /// holding each lease for a random time up to `max_hold_us` microseconds.
    Storm {
        /// The start signal: a file the test creates when every worker is ready.
        start: PathBuf,
        /// How many leases to take, one after another.
        rounds: u32,
        /// The longest hold, in microseconds.
        max_hold_us: u64,
    },
    /// Acquire the key (waiting forever) and hold it until `release` exists, then release
    /// it and exit. The test may kill the worker instead, while it holds or still waits.
    Hold {
        /// The release signal: a file the test creates.
        release: PathBuf,
    },
}

/// Runs the job in [`WORKER_ENV`], if there is one, and exits the process; returns at once
/// when there is none (the hidden worker test then passes as a no-op).
pub fn main(open: OpenFn) {
    let Ok(text) = std::env::var(WORKER_ENV) else {
        return;
    };
    die_with_parent();
    let code = match serde_json::from_str::<Job>(&text) {
        Ok(job) => {
            let runtime = crate::__private::runtime();
            match runtime.block_on(run(open, &job)) {
                Ok(()) => 0,
                Err(message) => {
                    if let Ok(rec) = Recorder::open(&job.history) {
                        let _ = rec.record(&Event::Failed {
                            pid: std::process::id(),
                            t_ns: monotonic_ns(),
                            message: message.clone(),
                        });
                    }
                    eprintln!("baton-conformance worker: {message}");
                    1
                }
            }
        }
        Err(e) => {
            eprintln!("baton-conformance worker: bad job in {WORKER_ENV}: {e}");
            2
        }
    };
    std::process::exit(code);
}

/// A worker must not outlive the test that started it (a test that panics or is killed).
fn die_with_parent() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and has no memory effects.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        }
        // The parent may have died before the prctl took effect.
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } == 1 {
            std::process::exit(3);
        }
    }
}

async fn run(open: OpenFn, job: &Job) -> Result<(), String> {
    let rec = Recorder::open(&job.history)
        .map_err(|e| format!("cannot open history {}: {e}", job.history.display()))?;
    let record = |event: Event| {
        rec.record(&event)
            .map_err(|e| format!("cannot record to the history: {e}"))
    };
    let url = StoreUrl::parse(&job.url).map_err(|e| format!("{e:#}"))?;
    let store = open(&url).map_err(|e| format!("cannot open {url}: {e:#}"))?;
    let pid = std::process::id();
    let holder = Holder::current(vec!["baton-conformance-worker".into()]);
    record(Event::Ready {
        pid,
        t_ns: monotonic_ns(),
    })?;
    let (wait, rounds, max_hold_us, signal) = match &job.task {
        Task::Storm {
            start,
            rounds,
            max_hold_us,
        } => {
            wait_for_file(start, LIVENESS_BOUND).await?;
            (Wait::Timeout(LIVENESS_BOUND), *rounds, *max_hold_us, None)
        }
        Task::Hold { release } => (Wait::Forever, 1, 0, Some(release)),
    };
    let req = AcquireRequest {
        key: job.key.clone(),
        limit: job.limit,
        wait,
        ttl: job.ttl_ms.map(Duration::from_millis),
        holder,
    };
    let mut rng = u64::from(pid) ^ monotonic_ns() | 1;
    for round in 0..rounds {
        let t_request_ns = monotonic_ns();
        record(Event::Request {
            pid,
            t_ns: t_request_ns,
            key: job.key.clone(),
        })?;
        let lease = match store.acquire(&req).await {
            Ok(lease) => lease,
            Err(e) => {
                record(Event::Refused {
                    pid,
                    t_ns: monotonic_ns(),
                    key: job.key.clone(),
                    kind: e.kind().as_str().into(),
                    message: format!("{e:#}"),
                })?;
                return Err(format!("acquire {} of {rounds} failed: {e:#}", round + 1));
            }
        };
        record(Event::Grant {
            pid,
            t_ns: monotonic_ns(),
            t_request_ns,
            lease: lease.clone(),
        })?;
        match signal {
            Some(release) => wait_for_file(release, Duration::MAX).await?,
            None if max_hold_us > 0 => {
                // xorshift: a random hold, so that workers interleave differently each round.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                std::thread::sleep(Duration::from_micros(rng % (max_hold_us + 1)));
            }
            None => {}
        }
        record(Event::Release {
            pid,
            t_ns: monotonic_ns(),
            key: lease.key.clone(),
            slot: lease.slot,
            token: lease.token,
        })?;
        let result = store.release(&lease).await;
        record(Event::Released {
            pid,
            t_ns: monotonic_ns(),
            key: lease.key.clone(),
            token: lease.token,
            outcome: result.as_ref().ok().copied(),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
        })?;
        match result {
            Ok(Released::Released) => {}
            Ok(Released::NotHeld) => {
                return Err(format!(
                    "release of a held lease (token {}) answered not-held",
                    lease.token
                ))
            }
            Err(e) => return Err(format!("release failed: {e:#}")),
        }
    }
    Ok(())
}

async fn wait_for_file(path: &Path, bound: Duration) -> Result<(), String> {
    let start = std::time::Instant::now();
    while !path.exists() {
        if start.elapsed() > bound {
            return Err(format!("{} never appeared", path.display()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A running worker process, seen from the test. Dropping it kills the process.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    pid: u32,
    name: String,
    stderr: PathBuf,
    release: Option<PathBuf>,
    status: Option<ExitStatus>,
}

impl Worker {
    /// Starts a worker running `job`, as the test `entry` of this very test binary.
    /// Its stderr goes to `<scratch>/<name>.stderr`.
    pub fn spawn(entry: &str, scratch: &Path, name: &str, job: &Job) -> Worker {
        let exe = std::env::current_exe().expect("the test binary's path");
        let stderr = scratch.join(format!("{name}.stderr"));
        let err_file = std::fs::File::create(&stderr).expect("worker stderr file");
        let json = serde_json::to_string(job).expect("job as JSON");
        let child = Command::new(exe)
            .args([
                entry,
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "--quiet",
            ])
            .env(WORKER_ENV, json)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .expect("start a worker process");
        let release = match &job.task {
            Task::Hold { release } => Some(release.clone()),
            Task::Storm { .. } => None,
        };
        Worker {
            pid: child.id(),
            child,
            name: name.into(),
            stderr,
            release,
            status: None,
        }
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The worker's name in this test (for messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells a [`Task::Hold`] worker to release its lease and exit.
    pub fn let_go(&self) {
        let path = self
            .release
            .as_ref()
            .expect("only a hold worker can let go");
        std::fs::write(path, b"go").expect("create the release signal");
    }

    /// SIGKILLs the worker and reaps it; when this returns, the process is gone and the
    /// kernel has closed its files.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Whether the process has exited, without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the worker to exit on its own, at most `bound`; panics (after killing it)
    /// if it did not, or if it failed.
    pub async fn finish(&mut self, bound: Duration) {
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = self.exited() {
                assert!(
                    status.success(),
                    "worker {} (pid {}) failed with {status}: {}",
                    self.name,
                    self.pid,
                    self.stderr_text()
                );
                return;
            }
            if start.elapsed() > bound {
                self.kill();
                panic!(
                    "worker {} (pid {}) did not finish within {bound:?}: {}",
                    self.name,
                    self.pid,
                    self.stderr_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the worker wrote to stderr.
    pub fn stderr_text(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        if text.trim().is_empty() {
            "(no stderr)".into()
        } else {
            text
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}
