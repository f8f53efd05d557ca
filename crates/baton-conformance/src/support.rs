//! What every property needs: a scratch directory and history, unique keys, recorded and
//! bounded store calls, and worker processes.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{
    AcquireRequest, Error, ErrorKind, Holder, HolderId, Key, KeyStatus, Lease, Released, Result,
    Store, Wait,
};
use tempfile::TempDir;

use crate::history::{read_history_so_far, Event, Recorder};
use crate::worker::{Job, Task, Worker};
use crate::{monotonic_ns, Harness, LeaseTiming, LIVENESS_BOUND};

/// One property's run: the store, a scratch directory with the history, and its workers.
pub(crate) struct Lab<'h> {
    pub h: &'h Harness,
    pub store: Arc<dyn Store>,
    property: &'static str,
    suffix: String,
    dir: TempDir,
    pub history: PathBuf,
    recorder: Recorder,
    workers: usize,
}

impl<'h> Lab<'h> {
    pub fn new(h: &'h Harness, property: &'static str) -> Lab<'h> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("baton-conformance-{property}-"))
            .tempdir()
            .expect("a scratch directory");
        let history = dir.path().join("history.jsonl");
        let recorder = Recorder::open(&history).expect("the history file");
        let suffix = HolderId::random().to_string()[..12].to_owned();
        Lab {
            h,
            store: h.open(),
            property,
            suffix,
            dir,
            history,
            recorder,
            workers: 0,
        }
    }

    /// A key no other property or run uses: `conformance/<property>/<name>-<random>`.
    pub fn key(&self, name: &str) -> Key {
        Key::new(format!(
            "conformance/{}/{name}-{}",
            self.property, self.suffix
        ))
        .expect("a valid key")
    }

    /// A fresh holder identity for this process.
    pub fn holder(&self) -> Holder {
        Holder::current(vec!["baton-conformance".into(), self.property.into()])
    }

    /// A request by a fresh holder.
    pub fn request(&self, key: &Key, limit: u32, wait: Wait) -> AcquireRequest {
        AcquireRequest {
            key: key.clone(),
            limit,
            wait,
            ttl: self.h.request_ttl(),
            holder: self.holder(),
            lock_delay: None,
        }
    }

    /// The timing of the lease properties; panics, naming the fix, if the harness has none.
    pub fn lease_timing(&self) -> LeaseTiming {
        self.h.lease_timing().unwrap_or_else(|| {
            panic!(
                "{}: the lease properties need the harness to say which TTL to use: \
                 Harness::lease(LeaseTiming {{ ttl, detection }})",
                self.property
            )
        })
    }

    /// A request by a fresh holder with the lease properties' TTL.
    pub fn lease_request(&self, key: &Key, limit: u32, wait: Wait) -> AcquireRequest {
        AcquireRequest {
            ttl: Some(self.lease_timing().ttl),
            ..self.request(key, limit, wait)
        }
    }

    /// Appends an event to the history; panics if it cannot.
    pub fn record(&self, event: Event) {
        self.recorder.record(&event).expect("record to the history");
    }

    /// Acquires through `store`, recording the request and the grant (or refusal); panics
    /// if the call does not return within its wait plus [`LIVENESS_BOUND`].
    pub async fn acquire_on(&self, store: &dyn Store, req: &AcquireRequest) -> Result<Lease> {
        let bound = match req.wait {
            Wait::Timeout(t) => t + LIVENESS_BOUND,
            Wait::NoWait | Wait::Forever => LIVENESS_BOUND,
        };
        let pid = std::process::id();
        let t_request_ns = monotonic_ns();
        self.record(Event::Request {
            pid,
            t_ns: t_request_ns,
            key: req.key.clone(),
        });
        let what = format!("acquire '{}' ({:?})", req.key, req.wait);
        let result = bounded(&what, bound, store.acquire(req)).await;
        let t_ns = monotonic_ns();
        match &result {
            Ok(lease) => {
                self.record(Event::Grant {
                    pid,
                    t_ns,
                    t_request_ns,
                    lease: lease.clone(),
                });
                assert_eq!(lease.key, req.key, "a lease for another key");
                assert_eq!(lease.limit, req.limit, "a lease with another limit");
                assert_eq!(lease.holder.id, req.holder.id, "a lease for another holder");
            }
            Err(e) => self.record(Event::Refused {
                pid,
                t_ns,
                key: req.key.clone(),
                kind: e.kind().as_str().into(),
                message: format!("{e:#}"),
            }),
        }
        result
    }

    /// [`Lab::acquire_on`] this lab's store handle.
    pub async fn acquire(&self, req: &AcquireRequest) -> Result<Lease> {
        self.acquire_on(self.store.as_ref(), req).await
    }

    /// Acquires and expects a grant.
    pub async fn grant(&self, req: &AcquireRequest) -> Lease {
        match self.acquire(req).await {
            Ok(lease) => lease,
            Err(e) => panic!("acquire '{}' ({:?}) failed: {e:#}", req.key, req.wait),
        }
    }

    /// Acquires and expects an error of `kind`; returns it.
    pub async fn refused(&self, req: &AcquireRequest, kind: ErrorKind, why: &str) -> Error {
        match self.acquire(req).await {
            Ok(lease) => panic!(
                "{why}: expected {kind:?}, but acquire '{}' ({:?}) was granted slot {} token {}",
                req.key, req.wait, lease.slot, lease.token
            ),
            Err(e) => {
                assert_eq!(e.kind(), kind, "{why}: acquire '{}' failed: {e:#}", req.key);
                e
            }
        }
    }

    /// Releases, recording it; panics if the call fails or does not return in time.
    pub async fn release(&self, lease: &Lease) -> Released {
        self.release_on(self.store.as_ref(), lease).await
    }

    /// [`Lab::release`] through `store` (the handle that acquired the lease).
    pub async fn release_on(&self, store: &dyn Store, lease: &Lease) -> Released {
        let pid = std::process::id();
        self.record(Event::Release {
            pid,
            t_ns: monotonic_ns(),
            key: lease.key.clone(),
            slot: lease.slot,
            token: lease.token,
        });
        let what = format!("release '{}' token {}", lease.key, lease.token);
        let result = bounded(&what, LIVENESS_BOUND, store.release(lease)).await;
        self.record(Event::Released {
            pid,
            t_ns: monotonic_ns(),
            key: lease.key.clone(),
            token: lease.token,
            outcome: result.as_ref().ok().copied(),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
        });
        result.unwrap_or_else(|e| panic!("{what} failed: {e:#}"))
    }

    /// Inspects a key; panics if that fails.
    pub async fn inspect(&self, key: &Key) -> KeyStatus {
        let what = format!("inspect '{key}'");
        let status = bounded(&what, LIVENESS_BOUND, self.store.inspect(key))
            .await
            .unwrap_or_else(|e| panic!("{what} failed: {e:#}"));
        assert_eq!(&status.key, key, "inspect answered for another key");
        status
    }

    /// Starts a worker process on `key`.
    pub fn spawn(&mut self, key: &Key, limit: u32, task: Task) -> Worker {
        self.spawn_with(key, limit, self.h.request_ttl(), task, &[])
    }

    /// Starts a worker process on `key` asking for `ttl`, with extra environment variables.
    pub fn spawn_with(
        &mut self,
        key: &Key,
        limit: u32,
        ttl: Option<Duration>,
        task: Task,
        env: &[(String, String)],
    ) -> Worker {
        let url = self.h.url().to_owned();
        self.spawn_at(url, key, limit, ttl, task, env)
    }

    /// [`Lab::spawn_with`], the worker opening the store at `url`.
    pub fn spawn_at(
        &mut self,
        url: String,
        key: &Key,
        limit: u32,
        ttl: Option<Duration>,
        task: Task,
        env: &[(String, String)],
    ) -> Worker {
        self.workers += 1;
        let name = format!("worker-{}", self.workers);
        let job = Job {
            url,
            history: self.history.clone(),
            key: key.clone(),
            limit,
            ttl_ms: ttl.map(|d| d.as_millis() as u64),
            task,
        };
        Worker::spawn_with_env(self.h.worker_test(), self.dir.path(), &name, &job, env)
    }

    /// Starts a [`Task::Keep`] worker on `key` with the lease properties' TTL: it acquires,
    /// keeps the lease with a keeper, and records what the keeper does.
    pub fn spawn_keeper(&mut self, key: &Key, limit: u32, keep: Keep) -> Worker {
        let release = self.path(&format!("release-{}", self.workers + 1));
        let task = Task::Keep {
            release,
            fence: keep.fence,
            after_loss: keep.after_loss,
            marks: keep.marks,
            child: keep.child,
            child_script: keep.child_script,
            grace_ms: u64::try_from(keep.grace.as_millis()).unwrap_or(u64::MAX),
        };
        let ttl = Some(self.lease_timing().ttl);
        let url = keep.url.unwrap_or_else(|| self.h.url().to_owned());
        self.spawn_at(url, key, limit, ttl, task, &keep.env)
    }

    /// SIGSTOPs a worker, recording it just before.
    pub fn pause(&self, worker: &mut Worker) {
        self.record(Event::Paused {
            pid: worker.pid(),
            t_ns: monotonic_ns(),
        });
        worker.signal(libc::SIGSTOP);
    }

    /// SIGCONTs a worker, recording it just before.
    pub fn resume(&self, worker: &mut Worker) {
        self.record(Event::Resumed {
            pid: worker.pid(),
            t_ns: monotonic_ns(),
        });
        worker.signal(libc::SIGCONT);
    }

    /// Starts a worker that acquires `key` (waiting forever) and holds it until told to
    /// let go, or killed.
    pub fn spawn_holder(&mut self, key: &Key, limit: u32) -> Worker {
        let release = self
            .dir
            .path()
            .join(format!("release-{}", self.workers + 1));
        self.spawn(key, limit, Task::Hold { release })
    }

    /// SIGKILLs a worker and reaps it, recording the kill (just before the signal) in the
    /// history so that the checkers end its leases there.
    pub fn kill(&self, worker: &mut Worker) {
        self.record(Event::Killed {
            pid: worker.pid(),
            t_ns: monotonic_ns(),
        });
        worker.kill();
    }

    /// A path in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The history so far.
    pub fn events(&self) -> Vec<Event> {
        read_history_so_far(&self.history).expect("read the history")
    }

    /// Waits until the history has an event of `worker` matching `pred`; panics if the
    /// worker exits first, records a failure, or [`LIVENESS_BOUND`] passes.
    pub async fn wait_for(
        &self,
        worker: &mut Worker,
        what: &str,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let start = std::time::Instant::now();
        loop {
            let events = self.events();
            let mine = || events.iter().filter(|e| e.pid() == worker.pid());
            if let Some(e) = mine().find(|e| pred(e)) {
                return e.clone();
            }
            if let Some(Event::Failed { message, .. }) =
                mine().find(|e| matches!(e, Event::Failed { .. }))
            {
                panic!(
                    "{} failed while the test waited for {what}: {message}",
                    worker.name()
                );
            }
            if let Some(status) = worker.exited() {
                panic!(
                    "{} (pid {}) exited ({status}) while the test waited for {what}: {}",
                    worker.name(),
                    worker.pid(),
                    worker.stderr_text()
                );
            }
            if start.elapsed() > LIVENESS_BOUND {
                panic!(
                    "{} (pid {}) did not reach {what} within {LIVENESS_BOUND:?}: {}",
                    worker.name(),
                    worker.pid(),
                    worker.stderr_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for a hold worker's grant and returns its lease.
    pub async fn lease_of(&self, worker: &mut Worker) -> Lease {
        match self
            .wait_for(worker, "its grant", |e| matches!(e, Event::Grant { .. }))
            .await
        {
            Event::Grant { lease, .. } => lease,
            _ => unreachable!("matched a grant"),
        }
    }

    /// Waits for a hold worker to have asked for the key.
    pub async fn requested(&self, worker: &mut Worker) -> u64 {
        self.wait_for(worker, "its request", |e| {
            matches!(e, Event::Request { .. })
        })
        .await
        .t_ns()
    }

    /// Tells a hold worker to let go, waits for it to release and exit, and checks that its
    /// release answered `Released`. Returns the time it recorded just before releasing.
    pub async fn let_go(&self, worker: &mut Worker) -> u64 {
        worker.let_go();
        let released = self
            .wait_for(worker, "its release", |e| {
                matches!(e, Event::Released { .. })
            })
            .await;
        worker.finish(LIVENESS_BOUND).await;
        let Event::Released { outcome, error, .. } = released else {
            unreachable!("matched a release")
        };
        assert_eq!(
            outcome,
            Some(Released::Released),
            "{}'s release of its held lease: {error:?}",
            worker.name()
        );
        self.events()
            .iter()
            .find(|e| e.pid() == worker.pid() && matches!(e, Event::Release { .. }))
            .map(Event::t_ns)
            .expect("a release event before the released event")
    }
}

/// What a [`Task::Keep`] worker does besides keeping its lease (see [`Lab::spawn_keeper`]).
#[derive(Default)]
pub(crate) struct Keep {
    /// Write through the fence of this database after the grant (and after a loss).
    pub fence: Option<PathBuf>,
    /// After a loss, wait for this file before releasing and writing again.
    pub after_loss: Option<PathBuf>,
    /// Record the wall clock each time the next of these files appears.
    pub marks: Vec<PathBuf>,
    /// Extra environment for the worker process.
    pub env: Vec<(String, String)>,
    /// Run a child while holding and stop it on a loss (see [`Task::Keep`]).
    pub child: bool,
    /// The child's shell script (default `exec sleep 3600`).
    pub child_script: Option<String>,
    /// The child's kill grace.
    pub grace: Duration,
    /// Open the store at this URL instead of the harness's (through a fault proxy).
    pub url: Option<String>,
}

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        // A failing property keeps its history and the workers' stderr for the report.
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            report(&format!(
                "{}: history and worker logs kept in {}",
                self.property,
                self.dir.path().display()
            ));
        }
    }
}

/// Awaits `fut`, panicking with `what` if it takes longer than `bound`.
pub(crate) async fn bounded<T>(what: &str, bound: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(bound, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within {bound:?} (liveness bound)"),
    }
}

/// The environment variable naming a file that every skipped test appends a line to;
/// `bash scripts/test` sets it and prints the list at the end.
pub const SKIPS_ENV: &str = "BATON_TEST_SKIPS";

/// Says that `what` was skipped and why: on the stderr file descriptor (so a person sees
/// it even though libtest captures test output) and, when [`SKIPS_ENV`] names a file,
/// as a line appended to it for the test command's summary.
pub fn skipped(what: &str, why: &str) {
    report(&format!("SKIPPED {what}: {why}"));
    if let Some(path) = std::env::var_os(SKIPS_ENV) {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write per line, so lines of tests running at once do not interleave.
            let _ = f.write_all(format!("{what}: {why}\n").as_bytes());
        }
    }
}

/// Prints a measurement where the test output shows it even when libtest captures output
/// (straight to the stderr file descriptor, not through `eprintln!`).
pub(crate) fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "baton-conformance: {line}");
}
