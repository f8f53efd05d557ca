//! Worker processes: the test binary re-run as a separate OS process with a job.
//!
//! [`crate::suite!`] adds a hidden test, `__baton_conformance_worker`, to the store's test
//! binary. It does nothing unless the environment variable [`WORKER_ENV`] holds a [`Job`]
//! as JSON; then it opens the store by URL, does the job, records what it did in the job's
//! history file, and exits. The suite starts workers with [`std::env::current_exe`] and
//! libtest's arguments, which work the same under `cargo test` and `cargo nextest run`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use baton_core::supervisor::{self, StopPolicy};
use baton_core::{
    AcquireRequest, Holder, Keeper, KeeperConfig, Key, Lease, LeaseState, Released, Store,
    StoreUrl, Wait,
};
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
    /// Acquire the key (waiting forever, with the job's TTL) and keep the lease with a
    /// [`Keeper`], recording every deadline it sets (`held`), every renewal (`renewed`)
    /// and a loss (`lost`). With `fence`, write once through the fence with the lease's
    /// token right after the grant. Then:
    /// - each time the next file of `marks` appears, record the wall clock (`clock`);
    /// - when `release` appears, stop the keeper, release and exit;
    /// - when the keeper declares the lease lost: with `after_loss`, wait for that file,
    ///   then renew once more, release, and (with `fence`) write through the fence again
    ///   with the old token; without it, release at once. Then exit. What the store and the fence answered is
    ///   in the history; the test judges it.
    Keep {
        /// The release signal.
        release: PathBuf,
        /// The fenced database, if any.
        fence: Option<PathBuf>,
        /// What to wait for after a loss before acting on it.
        after_loss: Option<PathBuf>,
        /// Files the test creates one after another to ask for a wall-clock reading.
        marks: Vec<PathBuf>,
        /// Run a child process while holding, under the same supervisor `baton run` uses
        /// ([`baton_core::supervisor`]): its process group is stopped (SIGTERM, SIGKILL
        /// after `grace_ms`) by the keeper's deadline, and at once if the lease is lost.
        /// When the whole group is gone, `killed` is recorded with the child's pid.
        #[serde(default)]
        child: bool,
        /// The child's shell script (`sh -c`); default `exec sleep 3600`.
        #[serde(default)]
        child_script: Option<String>,
        /// The child's kill grace, in milliseconds.
        #[serde(default)]
        grace_ms: u64,
    },
    /// Wait until `start` exists, then acquire (waiting up to 5 s) and release the key
    /// over and over, holding each lease up to `max_hold_us` microseconds, until `stop`
    /// exists. Unlike [`Task::Storm`], a failed acquire or release is recorded and the
    /// loop goes on: for properties that break the store under the workers (a killed
    /// server), where an operation's outcome may be unknown.
    Churn {
        /// The start signal.
        start: PathBuf,
        /// The stop signal.
        stop: PathBuf,
        /// The longest hold, in microseconds.
        max_hold_us: u64,
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
    if let Task::Keep {
        release,
        fence,
        after_loss,
        marks,
        child,
        child_script,
        grace_ms,
    } = &job.task
    {
        let signals = KeepSignals {
            release,
            fence: fence.as_deref(),
            after_loss: after_loss.as_deref(),
            marks,
            child: child.then(|| {
                (
                    child_script.as_deref().unwrap_or("exec sleep 3600"),
                    Duration::from_millis(*grace_ms),
                )
            }),
        };
        return keep(store, job, &rec, holder, signals).await;
    }
    let (wait, rounds, max_hold_us, signal, stop) = match &job.task {
        Task::Storm {
            start,
            rounds,
            max_hold_us,
        } => {
            wait_for_file(start, LIVENESS_BOUND).await?;
            (
                Wait::Timeout(LIVENESS_BOUND),
                *rounds,
                *max_hold_us,
                None,
                None,
            )
        }
        Task::Churn {
            start,
            stop,
            max_hold_us,
        } => {
            wait_for_file(start, LIVENESS_BOUND).await?;
            let wait = Wait::Timeout(Duration::from_secs(5));
            (wait, u32::MAX, *max_hold_us, None, Some(stop))
        }
        Task::Hold { release } => (Wait::Forever, 1, 0, Some(release), None),
        Task::Keep { .. } => unreachable!("handled above"),
    };
    let req = AcquireRequest {
        key: job.key.clone(),
        limit: job.limit,
        wait,
        ttl: job.ttl_ms.map(Duration::from_millis),
        holder,
        lock_delay: None,
    };
    let mut rng = u64::from(pid) ^ monotonic_ns() | 1;
    for round in 0..rounds {
        if stop.is_some_and(|p| p.exists()) {
            break;
        }
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
                if stop.is_some() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
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
        let result = release_recorded(&*store, &rec, pid, &lease).await?;
        match result {
            Ok(Released::Released) => {}
            // Churn: the store broke under the worker; the answer is in the history.
            _ if stop.is_some() => {}
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

/// The files a [`Task::Keep`] worker watches.
struct KeepSignals<'a> {
    release: &'a Path,
    fence: Option<&'a Path>,
    after_loss: Option<&'a Path>,
    marks: &'a [PathBuf],
    /// The child's script and kill grace.
    child: Option<(&'a str, Duration)>,
}

/// Releases `lease`, recording `release` just before the call (so an overlap the checker
/// reports is real) and `released` with the store's answer, which it returns.
async fn release_recorded(
    store: &dyn Store,
    rec: &Recorder,
    pid: u32,
    lease: &Lease,
) -> Result<baton_core::Result<Released>, String> {
    let record = |event: Event| {
        rec.record(&event)
            .map_err(|e| format!("cannot record to the history: {e}"))
    };
    record(Event::Release {
        pid,
        t_ns: monotonic_ns(),
        key: lease.key.clone(),
        slot: lease.slot,
        token: lease.token,
    })?;
    let result = store.release(lease).await;
    record(Event::Released {
        pid,
        t_ns: monotonic_ns(),
        key: lease.key.clone(),
        token: lease.token,
        outcome: result.as_ref().ok().copied(),
        error: result.as_ref().err().map(|e| format!("{e:#}")),
    })?;
    Ok(result)
}

fn clock_event(pid: u32) -> Event {
    let unix_ms = match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    };
    Event::Clock {
        pid,
        t_ns: monotonic_ns(),
        unix_ms,
    }
}

/// [`Task::Keep`].
async fn keep(
    store: Arc<dyn Store>,
    job: &Job,
    rec: &Recorder,
    mut holder: Holder,
    signals: KeepSignals<'_>,
) -> Result<(), String> {
    let record = |event: Event| {
        rec.record(&event)
            .map_err(|e| format!("cannot record to the history: {e}"))
    };
    let pid = std::process::id();
    record(clock_event(pid))?;
    let ttl = Duration::from_millis(job.ttl_ms.ok_or("a keep task needs a TTL")?);
    let config = KeeperConfig::for_ttl(ttl);
    // As `baton run` does: the child's supervisor exists before the acquire, so that the
    // holder record names it.
    let supervisor = match signals.child {
        Some((script, grace)) => {
            let argv = ["sh".into(), "-c".into(), script.into()];
            let policy = StopPolicy {
                grace,
                reserve: config.kill_reserve(),
            };
            let s =
                supervisor::Supervisor::start(&argv, &[], &["BATON_TOKEN"], None, policy, false)
                    .map_err(|e| format!("cannot start the child's supervisor: {e}"))?;
            holder.supervisor = s.process();
            Some(s)
        }
        None => None,
    };
    let req = AcquireRequest {
        key: job.key.clone(),
        limit: job.limit,
        wait: Wait::Forever,
        ttl: Some(ttl),
        holder,
        lock_delay: None,
    };
    let sent = Instant::now();
    let t_request_ns = monotonic_ns();
    record(Event::Request {
        pid,
        t_ns: t_request_ns,
        key: job.key.clone(),
    })?;
    let lease = store
        .acquire(&req)
        .await
        .map_err(|e| format!("acquire failed: {e:#}"))?;
    record(Event::Grant {
        pid,
        t_ns: monotonic_ns(),
        t_request_ns,
        lease: lease.clone(),
    })?;

    let recording: Arc<dyn Store> =
        Arc::new(RecordingStore::new(Arc::clone(&store), &job.history)?);
    let grace = signals.child.map(|(_, g)| g).unwrap_or_default();
    let keeper = Keeper::start(
        Arc::clone(&recording),
        lease.clone(),
        config.with_stop_lead(grace + config.kill_reserve()),
        sent,
    )
    .map_err(|e| format!("cannot start a keeper: {e:#}"))?;
    let watcher = {
        let rec = Recorder::open(&job.history).map_err(|e| format!("cannot open history: {e}"))?;
        tokio::spawn(crate::history::record_keeper(
            rec,
            keeper.watch(),
            pid,
            lease.key.clone(),
            lease.token,
        ))
    };
    if let Some(db) = signals.fence {
        let write = crate::fence::write(db, &lease.key, lease.token);
        let accepted = matches!(write, Event::FenceWrite { accepted: true, .. });
        record(write)?;
        if !accepted {
            return Err(format!(
                "the first write through the fence, with token {}, was refused",
                lease.token
            ));
        }
    }

    let mut child = match supervisor {
        Some(s) => {
            let first = match keeper.state() {
                LeaseState::Held { deadline } => Some(deadline),
                _ => None,
            };
            let c = s
                .run(&[lease.token.0], first)
                .map_err(|e| format!("cannot start the child: {e}"))?;
            if let LeaseState::Held { deadline } = keeper.state() {
                c.deadline(deadline);
            }
            Some(c)
        }
        None => None,
    };
    let mut marks = signals.marks.iter();
    let mut mark = marks.next();
    let mut told: Option<std::time::Instant> = None;
    let lost = loop {
        if mark.is_some_and(|p| p.exists()) {
            record(clock_event(pid))?;
            mark = marks.next();
            continue;
        }
        match keeper.state() {
            LeaseState::Lost { .. } => break true,
            LeaseState::Held { deadline } if told != Some(deadline) => {
                if let Some(c) = &child {
                    c.deadline(deadline);
                }
                told = Some(deadline);
            }
            _ => {}
        }
        if signals.release.exists() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    if let Some(mut c) = child.take() {
        // As `baton run` does: stop the group (on a loss) or wait for it to end (the
        // release signal also ends the child: it is asked to stop the same way), then it
        // is all dead and reaped.
        c.stop_now();
        loop {
            match c.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) => tokio::time::sleep(Duration::from_millis(2)).await,
                Err(e) => return Err(format!("cannot wait for the child: {e}")),
            }
        }
        record(Event::Killed {
            pid: u32::try_from(c.pid()).unwrap_or(0),
            t_ns: monotonic_ns(),
        })?;
    }
    if lost {
        // The watcher records the loss and ends; wait for it so the history has it first.
        let _ = watcher.await;
        if let Some(path) = signals.after_loss {
            wait_for_file(path, LIVENESS_BOUND).await?;
            // Ask the store too, as a holder that missed its keeper's news would: the
            // answer is recorded (`renewed`) for the test to judge.
            let _ = recording.renew(&lease).await;
        }
    } else {
        keeper.stop();
        let _ = watcher.await;
    }
    // The answer is in the history; the checker judges it.
    let _ = release_recorded(&*store, rec, pid, &lease).await?;
    if let (true, Some(db)) = (lost, signals.fence) {
        record(crate::fence::write(db, &lease.key, lease.token))?;
    }
    Ok(())
}

/// The store as the keeper of a [`Task::Keep`] worker sees it: every renewal is recorded
/// (`renewed`) before its answer reaches the keeper (the stress harness's write-ahead
/// lease ends, shared).
pub(crate) use baton_stress::recording::RecordingStore;

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
        Worker::spawn_with_env(entry, scratch, name, job, &[])
    }

    /// [`Worker::spawn`] with extra environment variables (`LD_PRELOAD` of libfaketime).
    pub fn spawn_with_env(
        entry: &str,
        scratch: &Path,
        name: &str,
        job: &Job,
        env: &[(String, String)],
    ) -> Worker {
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
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .spawn()
            .expect("start a worker process");
        let release = match &job.task {
            Task::Hold { release } | Task::Keep { release, .. } => Some(release.clone()),
            Task::Churn { stop, .. } => Some(stop.clone()),
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

    /// Tells a [`Task::Hold`] or [`Task::Keep`] worker to release its lease and exit.
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

    /// Sends `signal` (SIGSTOP, SIGCONT) to the worker; panics if it is gone.
    pub fn signal(&mut self, signal: libc::c_int) {
        assert!(
            self.exited().is_none(),
            "worker {} (pid {}) exited before it could be signalled: {}",
            self.name,
            self.pid,
            self.stderr_text()
        );
        // SAFETY: kill has no memory effects; the pid is our unreaped child, so it cannot
        // have been reused.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}): {}",
            self.pid,
            std::io::Error::last_os_error()
        );
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
