//! The orchestrator: starts the worker processes of a scenario on a seeded schedule, kills
//! or pauses holders while they hold, waits for all, then runs every checker on the
//! history and the resource and sums the run up.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_core::{Error, ErrorKind, Key, Op, StoreUrl};
use serde::Serialize;

use crate::check::{self, Violation};
use crate::clock::monotonic_ns;
use crate::command;
use crate::history::{read_history, Event, Recorder, Tail};
use crate::intervals::{intervals_ending, Ends};
use crate::proxy::{Fault, ProxySet};
use crate::resource;
use crate::rng::Rng;
use crate::stats::{jain, percentile};
use crate::worker::{Job, WorkflowJob, JOB_ENV};
use crate::OpenFn;

/// A scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Processes start at Gaussian times, each acquires, holds, writes its result.
    Storm,
    /// A storm whose holders are SIGKILLed at random points while holding.
    Crash,
    /// A storm whose holders are SIGSTOPped past their TTL, then resumed (lease stores).
    Pause,
    /// Through a fault proxy (networked stores).
    Partition,
    /// Stages of jobs on a semaphore with a barrier between stages.
    Workflow,
    /// One process acquiring and recording, for debugging a store.
    Single,
}

impl Scenario {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Storm => "storm",
            Scenario::Crash => "crash",
            Scenario::Pause => "pause",
            Scenario::Partition => "partition",
            Scenario::Workflow => "workflow",
            Scenario::Single => "single",
        }
    }
}

/// How to start a worker: this program with these arguments (the job goes in
/// [`JOB_ENV`]).
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    /// The program (usually `std::env::current_exe()`).
    pub program: PathBuf,
    /// Its arguments (`["stress", "__worker"]` for the `baton` binary).
    pub args: Vec<String>,
}

/// How progress is shown on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// A bar when stderr is a terminal, else a plain line every few seconds.
    Auto,
    /// Nothing.
    Off,
}

/// A run's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The scenario.
    pub scenario: Scenario,
    /// The store URL, as given (secrets included: it reaches workers by environment).
    pub url: String,
    /// The key.
    pub key: Key,
    /// The key's slots.
    pub slots: u32,
    /// The seed of every random choice.
    pub seed: u64,
    /// How many events (processes); workflow: ignored.
    pub events: u64,
    /// The standard deviation of start times.
    pub stddev: Duration,
    /// How long each holder holds.
    pub hold: Duration,
    /// The TTL for lease stores.
    pub ttl: Duration,
    /// How long a worker waits for a slot (or a barrier); `None`: forever.
    pub wait: Option<Duration>,
    /// Crash / pause: the share of holders killed or paused.
    pub fraction: f64,
    /// Pause: how long a paused holder stays stopped (longer than the TTL plus the store's
    /// detection, so that another holder takes over meanwhile).
    pub pause_for: Duration,
    /// Crash: how soon a killed holder's slot must come back; `None`: the store's bound.
    pub recovery_bound: Option<Duration>,
    /// Workflow: stages.
    pub stages: u32,
    /// Workflow: jobs per stage.
    pub jobs: u64,
    /// Workflow: worker processes.
    pub procs: u32,
    /// Where to keep the run's files (history, results, worker log); `None`: a temporary
    /// directory, removed afterwards.
    pub dir: Option<PathBuf>,
    /// How to start workers.
    pub worker: WorkerCommand,
    /// Progress display.
    pub progress: Progress,
    /// The command that replays this run, for the summary.
    pub replay: String,
}

impl Config {
    /// How long the whole run may take before the harness stops it and fails it: a store
    /// that hangs must not hang the run forever. Derived from the scenario, generously
    /// (timing is not what it judges): the last scheduled start, plus
    /// `ceil(events / slots) × (hold + 1s)` of serial work (workflow: per stage,
    /// `ceil(jobs / slots) × (hold + 1s)`), plus per planned kill `2 × TTL + 5s` and per
    /// planned pause or partition `pause_for + 2 × TTL + 5s` (the store's recovery), plus
    /// 60s. `last_start` comes from the seeded schedule.
    pub fn time_bound(&self, last_start: Duration, faults: u64) -> Duration {
        let per_event = self.hold + Duration::from_secs(1);
        let slots = u64::from(self.slots.max(1));
        let serial = match self.scenario {
            Scenario::Workflow => u64::from(self.stages) * self.jobs.div_ceil(slots),
            Scenario::Single => 1,
            _ => self.events.div_ceil(slots),
        };
        let per_fault = match self.scenario {
            Scenario::Crash => self.ttl * 2 + Duration::from_secs(5),
            Scenario::Pause | Scenario::Partition => {
                self.pause_for + self.ttl * 2 + Duration::from_secs(5)
            }
            _ => Duration::ZERO,
        };
        let wait = self.wait.unwrap_or(Duration::ZERO);
        // Crash: the final probe waits for every slot.
        let probes = match self.scenario {
            Scenario::Crash => {
                (self.ttl * 2 + Duration::from_secs(10)).saturating_mul(self.slots.max(1))
            }
            _ => Duration::ZERO,
        };
        last_start
            + probes
            + per_event.saturating_mul(u32::try_from(serial).unwrap_or(u32::MAX))
            + per_fault.saturating_mul(u32::try_from(faults).unwrap_or(u32::MAX))
            + wait
            + Duration::from_secs(60)
    }
}

/// Wait-time statistics, in ms.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Waits {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Longest.
    pub max_ms: f64,
}

/// A run's summary: what `--json` prints and the table shows.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Always `summary`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The scenario.
    pub scenario: Scenario,
    /// The store, secrets hidden.
    pub store: String,
    /// The key.
    pub key: String,
    /// Its slots.
    pub slots: u32,
    /// The seed.
    pub seed: u64,
    /// Events run (workflow: jobs over all stages).
    pub events: u64,
    /// Grants recorded.
    pub grants: u64,
    /// Outcomes: `ok`, `fenced`, `failed`, `unknown` → count.
    pub outcomes: BTreeMap<&'static str, u64>,
    /// From the first request to the last release, in s.
    pub wall_s: f64,
    /// Grants per second of wall time.
    pub throughput_per_s: f64,
    /// Time from request to grant.
    pub wait: Waits,
    /// The hold asked for, in ms.
    pub hold_ms: f64,
    /// Wall time / grants − hold, in ms: what each handoff cost beyond the work.
    pub overhead_per_handoff_ms: f64,
    /// Jain's fairness index over the waits of the granted events (1 = all waited alike).
    pub fairness: f64,
    /// Holders SIGKILLed.
    pub killed: u64,
    /// Holders SIGSTOPped.
    pub paused: u64,
    /// Holders cut off their server (partition).
    pub partitioned: u64,
    /// Writes the fence refused (late writes of holders that lost their lease).
    pub fenced_writes: u64,
    /// Pause: paused holders whose slot another holder was granted while they were
    /// stopped (their late writes are the ones the fence must refuse).
    pub superseded: u64,
    /// Pause and partition: holders' commands (slow to stop) that their supervisor had
    /// stopped on its own, at the lease's deadline or on its loss, before the holder came
    /// back to end them; every command is checked gone by its lease's end (`stopped`).
    pub commands_stopped: u64,
    /// Crash: death (or the request, if later) → next grant of the slot, in ms, when
    /// measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_ms: Option<Waits>,
    /// Crash: the recovery bound enforced, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_bound_ms: Option<f64>,
    /// Crash: where that bound comes from (the store's documented bound, or the flag).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_bound_basis: Option<String>,
    /// Crash: probe workers run (one after each kill, one taking every slot at the end);
    /// their grants are checked but not counted in `grants`.
    pub probes: u64,
    /// Workflow: last arrival → first pass of each stage's barrier, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage_transition_ms: Option<Waits>,
    /// How many violations in all.
    pub violation_count: usize,
    /// The violations (at most 50 per property listed).
    pub violations: Vec<Violation>,
    /// Errors that are not violations of a property but fail the run (a worker that
    /// crashed on its own, a store that failed).
    pub errors: Vec<String>,
    /// Where the run's files were kept, if they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// The command that replays the run.
    pub replay: String,
}

impl Summary {
    /// Whether the run passed: no violation, no error.
    pub fn passed(&self) -> bool {
        self.violation_count == 0 && self.errors.is_empty()
    }
}

/// What a run produced: its summary and its history (for the report).
#[derive(Debug)]
pub struct RunOutput {
    /// The summary.
    pub summary: Summary,
    /// Every event, sorted by time.
    pub events: Vec<Event>,
}

fn fail(kind: ErrorKind, message: impl Into<String>) -> Error {
    Error::new(kind, message)
}

/// Runs a scenario. Fails (without running) when the store cannot run it: `pause` on a
/// store without leases, `partition` on a store without a network, a store that cannot be
/// opened; violations are in the summary, not errors.
pub fn run(config: &Config, open: OpenFn) -> Result<RunOutput, Error> {
    let url = StoreUrl::parse(&config.url)?;
    let store = open(&url)?;
    let caps = store.capabilities();
    match config.scenario {
        Scenario::Partition if ProxySet::endpoints(&config.url).is_none() => {
            return Err(fail(
                ErrorKind::Unsupported,
                format!(
                    "the partition scenario needs a networked store (postgres://, etcd://) to cut \
                     through a fault proxy; {} has no network",
                    url
                ),
            )
            .with_op(Op::Open))
        }
        Scenario::Partition if !caps.renew => {
            return Err(fail(
                ErrorKind::Unsupported,
                format!("the partition scenario needs a lease store; {url} has no leases"),
            ))
        }
        Scenario::Pause if !caps.renew => {
            return Err(fail(
                ErrorKind::Unsupported,
                format!(
                    "the pause scenario needs a lease store (every store but kernel-lock dir:PATH, \
                     e.g. dir:PATH?mode=lease or sqlite:PATH): {url} holds kernel locks, which a paused holder keeps forever, so there is \
                     nothing to expire"
                ),
            ))
        }
        _ => {}
    }
    drop(store);
    let temp;
    let dir: &Path = match &config.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| {
                fail(
                    ErrorKind::Unavailable,
                    format!("cannot create {}: {e}", d.display()),
                )
            })?;
            d
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("baton-stress-")
                .tempdir()
                .map_err(|e| {
                    fail(
                        ErrorKind::Unavailable,
                        format!("cannot create a scratch directory: {e}"),
                    )
                })?;
            temp.path()
        }
    };
    let history = dir.join("history.jsonl");
    let results = dir.join("results.db");
    for stale in [&history, &results] {
        let _ = std::fs::remove_file(stale);
    }
    resource::create(&results)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("workers.log"))
        .map_err(|e| {
            fail(
                ErrorKind::Unavailable,
                format!("cannot open the worker log: {e}"),
            )
        })?;
    let (recovery_bound, recovery_basis) = match config.recovery_bound {
        Some(b) => (b, "--recovery-bound".to_owned()),
        None => check::recovery::store_bound(&url, caps.renew, config.ttl),
    };
    let mut orchestra = Orchestra::new(config, &history, &results, log, recovery_bound)?;
    orchestra.play()?;
    let events = {
        let mut events = read_history(&history).map_err(|e| {
            fail(
                ErrorKind::Corrupt,
                format!("cannot read the history {}: {e}", history.display()),
            )
        })?;
        events.sort_by_key(Event::t_ns);
        events
    };
    let rows = resource::rows(&results)?;
    let mut summary = analyze(config, &url, caps.renew, &events, &rows);
    if config.scenario == Scenario::Crash {
        summary.recovery_bound_ms = Some(recovery_bound.as_secs_f64() * 1e3);
        summary.recovery_bound_basis = Some(recovery_basis);
        let (times, vs) =
            check::recovery::check(&events, &config.key, recovery_bound.as_nanos() as u64);
        summary.violation_count += vs.len();
        summary.violations.extend(vs);
        if !times.is_empty() {
            summary.recovery_ms = Some(waits(times));
        }
    }
    summary.errors.extend(orchestra.errors);
    summary.dir = config.dir.as_ref().map(|d| d.display().to_string());
    Ok(RunOutput { summary, events })
}

/// An action on a holder, planned before the run from the seed.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// SIGKILL this far into the hold (fraction of the hold).
    Kill(f64),
    /// SIGSTOP this far into the hold, SIGCONT after `pause_for`.
    Pause(f64),
    /// Cut the holder off its server this far into the hold, heal after `pause_for`.
    Partition(f64),
}

/// What the orchestrator does to a worker when it is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Signal(libc::c_int),
    Cut,
    Heal,
}

struct Orchestra<'c> {
    config: &'c Config,
    history: PathBuf,
    results: PathBuf,
    log: std::fs::File,
    rec: Recorder,
    /// (start offset, id, plan)
    schedule: Vec<(Duration, u64, Option<Plan>)>,
    errors: Vec<String>,
    /// Partition: the fault proxies of the workers planned to be cut off, by worker id.
    proxies: HashMap<u64, ProxySet>,
    /// Crash: the recovery bound (probes wait that long, plus [`PROBE_SLACK`]).
    recovery_bound: Duration,
}

/// The id a probe worker runs under (it runs no event).
const PROBE_ID: u64 = u64::MAX;

/// How much longer than the recovery bound a probe waits for a slot: the probe only has to
/// outlast the bound for the checker to judge it.
const PROBE_SLACK: Duration = Duration::from_secs(5);

impl<'c> Orchestra<'c> {
    fn new(
        config: &'c Config,
        history: &Path,
        results: &Path,
        log: std::fs::File,
        recovery_bound: Duration,
    ) -> Result<Orchestra<'c>, Error> {
        let rec = Recorder::open(history).map_err(|e| {
            fail(
                ErrorKind::Unavailable,
                format!("cannot open the history {}: {e}", history.display()),
            )
        })?;
        let mut rng = Rng::new(config.seed);
        let mut schedule = Vec::new();
        match config.scenario {
            Scenario::Workflow => {
                for id in 0..u64::from(config.procs) {
                    schedule.push((Duration::ZERO, id, None));
                }
            }
            Scenario::Single => schedule.push((Duration::ZERO, 0, None)),
            _ => {
                let sigma = config.stddev.as_secs_f64();
                for id in 0..config.events {
                    // Centred 3σ after the start, so almost no start is clipped to 0.
                    let at = (3.0 * sigma + sigma * rng.gaussian()).max(0.0);
                    let plan = match config.scenario {
                        Scenario::Crash if rng.chance(config.fraction) => {
                            Some(Plan::Kill(rng.unit()))
                        }
                        Scenario::Pause if rng.chance(config.fraction) => {
                            Some(Plan::Pause(rng.unit() * 0.5))
                        }
                        Scenario::Partition if rng.chance(config.fraction) => {
                            Some(Plan::Partition(rng.unit() * 0.5))
                        }
                        _ => None,
                    };
                    schedule.push((Duration::from_secs_f64(at), id, plan));
                }
                schedule.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
            }
        }
        Ok(Orchestra {
            config,
            history: history.to_owned(),
            results: results.to_owned(),
            log,
            rec,
            schedule,
            errors: Vec::new(),
            proxies: HashMap::new(),
            recovery_bound,
        })
    }

    fn job(&self, id: u64) -> Job {
        let c = self.config;
        Job {
            url: match self.proxies.get(&id) {
                Some(proxies) => proxies.url().to_owned(),
                None => c.url.clone(),
            },
            history: self.history.clone(),
            results: self.results.clone(),
            key: c.key.clone(),
            limit: c.slots,
            ttl_ms: c.ttl.as_millis() as u64,
            hold_us: c.hold.as_micros() as u64,
            wait_ms: c.wait.map(|w| w.as_millis() as u64),
            id,
            parent: std::process::id(),
            probe: None,
            workflow: (c.scenario == Scenario::Workflow).then(|| WorkflowJob {
                stages: c.stages,
                jobs: c.jobs,
                workers: c.procs,
                barrier: barrier_key(&c.key),
            }),
            // Holders that are paused or cut off run a command slow to stop under the
            // largest grace their TTL allows: its whole group must be dead by the lease's
            // deadline (the `stopped` checker).
            command: matches!(c.scenario, Scenario::Pause | Scenario::Partition)
                .then(|| command::slow_to_stop(self.grace() / 2, None)),
            grace_ms: if matches!(c.scenario, Scenario::Pause | Scenario::Partition) {
                self.grace().as_millis() as u64
            } else {
                0
            },
        }
    }

    /// The kill grace of the holders' commands.
    fn grace(&self) -> Duration {
        command::largest_grace(self.config.ttl)
    }

    /// A probe that takes `slots` slots, waiting up to the recovery bound plus
    /// [`PROBE_SLACK`] for each.
    fn probe_job(&self, slots: u32) -> Job {
        Job {
            probe: Some(slots),
            wait_ms: Some((self.recovery_bound + PROBE_SLACK).as_millis() as u64),
            ..self.job(PROBE_ID)
        }
    }

    fn spawn(&self, id: u64) -> Result<Child, Error> {
        self.spawn_job(&self.job(id))
    }

    fn spawn_job(&self, job: &Job) -> Result<Child, Error> {
        let job = serde_json::to_string(job)
            .map_err(|e| fail(ErrorKind::InvalidInput, format!("cannot encode a job: {e}")))?;
        let stderr = self
            .log
            .try_clone()
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        Command::new(&self.config.worker.program)
            .args(&self.config.worker.args)
            .env(JOB_ENV, job)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                fail(
                    ErrorKind::Unavailable,
                    format!(
                        "cannot start a worker ({}): {e}",
                        self.config.worker.program.display()
                    ),
                )
            })
    }

    fn signal(&self, pid: u32, sig: libc::c_int) {
        // SAFETY: kill(2) on a child we started and have not reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }

    /// Records what the orchestrator did; a line that cannot be written fails the run
    /// (the checkers would judge a history that misses a kill or a pause).
    fn note(&mut self, event: Event) {
        if let Err(e) = self.rec.record(&event) {
            self.errors
                .push(format!("cannot record {event:?} to the history: {e}"));
        }
    }

    /// Starts every worker on schedule, acts on the planned holders, and waits for all.
    fn play(&mut self) -> Result<(), Error> {
        let total = match self.config.scenario {
            Scenario::Workflow => u64::from(self.config.stages) * self.config.jobs,
            _ => self.schedule.len() as u64,
        };
        let mut bar = Bar::new(self.config.progress, total, self.config.scenario.name());
        let start = Instant::now();
        let mut next = 0;
        let mut children: HashMap<u32, (u64, Child)> = HashMap::new();
        let mut plans: HashMap<u32, Plan> = HashMap::new();
        // Actions due: (when, pid, action).
        let mut due: Vec<(Instant, u32, Action)> = Vec::new();
        let mut ids: HashMap<u32, u64> = HashMap::new();
        let mut killed: std::collections::HashSet<u32> = Default::default();
        let mut tail = Tail::new(&self.history);
        let mut done = 0u64;
        let pause_for = self.config.pause_for;
        let last_start = self.schedule.iter().map(|s| s.0).max().unwrap_or_default();
        let faults = self.schedule.iter().filter(|s| s.2.is_some()).count() as u64;
        let bound = self.config.time_bound(last_start, faults);
        let mut final_probe = false;
        loop {
            let now = Instant::now();
            if now > start + bound {
                // Whatever is still running is stuck (or the store is): stop it and let
                // the checkers say which events never ended.
                self.errors.push(format!(
                    "the run did not finish within its bound of {:.0}s ({} worker(s) still \
                     running, {} not started); they were killed",
                    bound.as_secs_f64(),
                    children.len(),
                    self.schedule.len() - next
                ));
                for (_, child) in children.values_mut() {
                    // A stopped worker dies of SIGKILL too.
                    let _ = child.kill();
                    let _ = child.wait();
                }
                break;
            }
            while next < self.schedule.len() && start + self.schedule[next].0 <= now {
                let (_, id, plan) = self.schedule[next];
                if let Some(Plan::Partition(_)) = plan {
                    // Only the holders to be cut off go through a proxy of their own.
                    match ProxySet::start(&self.config.url) {
                        Ok(p) => {
                            self.proxies.insert(id, p);
                        }
                        Err(e) => {
                            self.kill_all(&mut children);
                            return Err(fail(
                                ErrorKind::Unavailable,
                                format!("cannot start a fault proxy: {e}"),
                            ));
                        }
                    }
                }
                match self.spawn(id) {
                    Ok(child) => {
                        let pid = child.id();
                        ids.insert(pid, id);
                        if let Some(p) = plan {
                            plans.insert(pid, p);
                        }
                        children.insert(pid, (id, child));
                    }
                    Err(e) => {
                        self.kill_all(&mut children);
                        return Err(e);
                    }
                }
                next += 1;
            }
            let fresh = tail
                .poll()
                .map_err(|e| fail(ErrorKind::Corrupt, format!("cannot read the history: {e}")))?;
            for e in &fresh {
                match e {
                    // A kill is timed from the grant. A pause or a partition is timed
                    // from the holder's accepted claim on the fence, the start of its
                    // hold: stopped before its claim, a holder would claim after its
                    // successor and its late write would not be the one the fence must
                    // refuse.
                    Event::Grant { pid, .. } if matches!(plans.get(pid), Some(Plan::Kill(_))) => {
                        if let Some(Plan::Kill(f)) = plans.remove(pid) {
                            due.push((
                                now + self.config.hold.mul_f64(f),
                                *pid,
                                Action::Signal(libc::SIGKILL),
                            ));
                        }
                    }
                    Event::FenceWrite {
                        pid,
                        accepted: true,
                        ..
                    } if matches!(plans.get(pid), Some(Plan::Pause(_) | Plan::Partition(_))) => {
                        let hold = self.config.hold;
                        match plans.remove(pid) {
                            Some(Plan::Pause(f)) => {
                                let at = now + hold.mul_f64(f);
                                due.push((at, *pid, Action::Signal(libc::SIGSTOP)));
                                due.push((at + pause_for, *pid, Action::Signal(libc::SIGCONT)));
                            }
                            Some(Plan::Partition(f)) => {
                                let at = now + hold.mul_f64(f);
                                due.push((at, *pid, Action::Cut));
                                due.push((at + pause_for, *pid, Action::Heal));
                            }
                            _ => {}
                        }
                    }
                    Event::Done { .. } => {
                        done += 1;
                        bar.set(done);
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            let mut i = 0;
            while i < due.len() {
                if due[i].0 > now {
                    i += 1;
                    continue;
                }
                let (_, pid, action) = due.swap_remove(i);
                if !children.contains_key(&pid) {
                    continue;
                }
                let t_ns = monotonic_ns();
                match action {
                    Action::Signal(libc::SIGKILL) => {
                        self.note(Event::Killed { pid, t_ns });
                        killed.insert(pid);
                        // The killed event is done with; count it.
                        done += 1;
                        bar.set(done);
                    }
                    Action::Signal(libc::SIGSTOP) => self.note(Event::Paused { pid, t_ns }),
                    Action::Signal(_) => self.note(Event::Resumed { pid, t_ns }),
                    Action::Cut => {
                        self.note(Event::Partitioned { pid, t_ns });
                        if let Some(p) = ids.get(&pid).and_then(|id| self.proxies.get(id)) {
                            p.set(Fault::Partition);
                        }
                    }
                    Action::Heal => {
                        self.note(Event::Healed { pid, t_ns });
                        if let Some(p) = ids.get(&pid).and_then(|id| self.proxies.get(id)) {
                            p.set(Fault::Pass);
                        }
                    }
                }
                if let Action::Signal(sig) = action {
                    self.signal(pid, sig);
                }
                if action == Action::Signal(libc::SIGKILL) {
                    // Someone must ask for the slot after the kill, or its recovery
                    // cannot be measured.
                    match self.spawn_job(&self.probe_job(1)) {
                        Ok(child) => {
                            children.insert(child.id(), (PROBE_ID, child));
                        }
                        Err(e) => self.errors.push(format!("cannot start a probe: {e:#}")),
                    }
                }
            }
            let mut ended = Vec::new();
            for (pid, (id, child)) in children.iter_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        if !status.success() && !killed.contains(pid) {
                            self.errors.push(format!(
                                "worker {id} (pid {pid}) failed ({status}); see workers.log in \
                                 the run's directory (--dir)"
                            ));
                        }
                        ended.push(*pid);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.errors
                            .push(format!("cannot wait for worker {id}: {e}"));
                        ended.push(*pid);
                    }
                }
            }
            for pid in ended {
                // A paused worker that ended was resumed: nothing is pending for it.
                children.remove(&pid);
                due.retain(|d| d.1 != pid);
                if let Some(id) = ids.remove(&pid) {
                    self.proxies.remove(&id);
                }
            }
            if next == self.schedule.len() && children.is_empty() {
                if self.config.scenario == Scenario::Crash && !final_probe {
                    // Every slot must come back, even one no waiter needed.
                    final_probe = true;
                    match self.spawn_job(&self.probe_job(self.config.slots)) {
                        Ok(child) => {
                            children.insert(child.id(), (PROBE_ID, child));
                            continue;
                        }
                        Err(e) => self.errors.push(format!("cannot start a probe: {e:#}")),
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        bar.finish();
        Ok(())
    }

    fn kill_all(&self, children: &mut HashMap<u32, (u64, Child)>) {
        for (_, child) in children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The barrier key of a workflow on `key`.
pub fn barrier_key(key: &Key) -> Key {
    Key::new(format!("{key}.barrier")).unwrap_or_else(|_| key.clone())
}

/// Progress on stderr: a bar on a terminal, else a line every 2 s.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    total: u64,
    what: &'static str,
    last: Instant,
    count: u64,
}

impl Bar {
    fn new(progress: Progress, total: u64, what: &'static str) -> Bar {
        let on = progress == Progress::Auto;
        let tty = on && std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} events",
            ) {
                bar.set_style(style);
            }
            bar.set_prefix(format!("baton stress {what}"));
            bar
        });
        Bar {
            bar,
            plain: on && !tty,
            total,
            what,
            last: Instant::now(),
            count: 0,
        }
    }

    fn set(&mut self, count: u64) {
        self.count = count;
        if let Some(bar) = &self.bar {
            bar.set_position(count);
        } else if self.plain && self.last.elapsed() >= Duration::from_secs(2) {
            self.last = Instant::now();
            eprintln!(
                "baton: stress {}: {count}/{} events done",
                self.what, self.total
            );
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn waits(mut ns: Vec<u64>) -> Waits {
    ns.sort_unstable();
    Waits {
        p50_ms: ms(percentile(&ns, 50.0)),
        p99_ms: ms(percentile(&ns, 99.0)),
        max_ms: ms(ns.last().copied().unwrap_or(0)),
    }
}

/// How many paused or partitioned holders had their slot granted to another while they
/// were stopped or cut off.
fn superseded(events: &[Event], key: &Key) -> u64 {
    let ivs = intervals_ending(events, key, Ends::Release);
    let mut paused_at: HashMap<u32, u64> = HashMap::new();
    let mut n = 0;
    for e in events {
        match e {
            Event::Paused { pid, t_ns } | Event::Partitioned { pid, t_ns } => {
                paused_at.insert(*pid, *t_ns);
            }
            Event::Resumed { pid, t_ns } | Event::Healed { pid, t_ns } => {
                let Some(from) = paused_at.remove(pid) else {
                    continue;
                };
                let Some(mine) = ivs.iter().find(|iv| iv.pid == *pid) else {
                    continue;
                };
                if ivs.iter().any(|iv| {
                    iv.pid != *pid
                        && iv.slot == mine.slot
                        && iv.t_grant_ns > from
                        && iv.t_grant_ns < *t_ns
                }) {
                    n += 1;
                }
            }
            _ => {}
        }
    }
    n
}

/// Runs every checker that applies and computes the summary.
fn analyze(
    config: &Config,
    url: &StoreUrl,
    lease_store: bool,
    events: &[Event],
    rows: &[resource::Row],
) -> Summary {
    let key = &config.key;
    let ends = if lease_store {
        Ends::Deadlines
    } else {
        Ends::Release
    };
    let mut violations: Vec<Violation> = Vec::new();
    let mut count = 0;
    let mut add = |vs: Vec<Violation>| {
        count += vs.len();
        violations.extend(vs);
    };
    add(check::limit::check(events, key, config.slots, ends));
    add(check::tokens::check(events, key, config.slots));
    add(check::results::check(events, rows));
    add(check::stopped::check(events, key, ends));
    let (stale, fenced_writes) = check::stale::check(events, rows);
    add(stale);
    let mut stage_transition_ms = None;
    if config.scenario == Scenario::Workflow {
        let (times, vs) = check::barrier::check(events, config.jobs, config.stages, config.procs);
        add(vs);
        stage_transition_ms = Some(waits(times));
    }
    let expected_events = match config.scenario {
        Scenario::Workflow => u64::from(config.stages) * config.jobs,
        Scenario::Single => 1,
        _ => config.events,
    };
    let (complete, n) = check::completeness::check(
        events,
        check::completeness::Expected {
            events: expected_events,
            wait_forever: config.wait.is_none(),
        },
    );
    count += n;
    violations.extend(complete);
    let known = check::unknown::outcomes(events);
    let mut outcomes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut errors = Vec::new();
    for (id, o) in &known {
        *outcomes.entry(o.outcome.name()).or_default() += 1;
        if let check::unknown::Outcome::Failed(why) = &o.outcome {
            errors.push(format!("event {id} (pid {}) failed: {why}", o.pid));
        }
    }
    let expected = match config.scenario {
        Scenario::Workflow => u64::from(config.stages) * config.jobs,
        Scenario::Single => 1,
        _ => config.events,
    };
    if config.scenario == Scenario::Workflow {
        // Every job must complete, without an error.
        let ok = outcomes.get("ok").copied().unwrap_or(0);
        if ok != expected {
            errors.push(format!("{ok} of {expected} workflow jobs completed"));
        }
    }
    let probe_pids: std::collections::HashSet<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Probe { pid, .. } => Some(*pid),
            _ => None,
        })
        .collect();
    let probes = probe_pids.len() as u64;
    let ivs: Vec<_> = intervals_ending(events, key, Ends::Release)
        .into_iter()
        .filter(|iv| !probe_pids.contains(&iv.pid))
        .collect();
    let grants = ivs.len() as u64;
    let t_first = events
        .iter()
        .filter_map(|e| match e {
            Event::Request { t_ns, .. } => Some(*t_ns),
            _ => None,
        })
        .min()
        .unwrap_or(0);
    let t_last = ivs
        .iter()
        .filter_map(|iv| iv.t_release_ns)
        .max()
        .unwrap_or(t_first);
    let wall_ns = t_last.saturating_sub(t_first);
    let wait_ns: Vec<u64> = ivs
        .iter()
        .map(|iv| iv.t_grant_ns.saturating_sub(iv.t_request_ns))
        .collect();
    let hold_ms = config.hold.as_secs_f64() * 1e3;
    let count_of = |f: &dyn Fn(&Event) -> bool| events.iter().filter(|e| f(e)).count() as u64;
    Summary {
        kind: "summary",
        scenario: config.scenario,
        store: url.to_string(),
        key: key.to_string(),
        slots: config.slots,
        seed: config.seed,
        events: expected,
        grants,
        outcomes,
        wall_s: wall_ns as f64 / 1e9,
        throughput_per_s: if wall_ns > 0 {
            grants as f64 / (wall_ns as f64 / 1e9)
        } else {
            0.0
        },
        wait: waits(wait_ns.clone()),
        hold_ms,
        overhead_per_handoff_ms: if grants > 0 {
            ms(wall_ns) / grants as f64 - hold_ms
        } else {
            0.0
        },
        fairness: jain(&wait_ns),
        killed: count_of(&|e| matches!(e, Event::Killed { .. })),
        paused: count_of(&|e| matches!(e, Event::Paused { .. })),
        partitioned: count_of(&|e| matches!(e, Event::Partitioned { .. })),
        fenced_writes: fenced_writes as u64,
        superseded: superseded(events, key),
        commands_stopped: events
            .iter()
            .filter(|e| matches!(e, Event::CommandGone { stopped: true, .. }))
            .count() as u64,
        recovery_ms: None,
        recovery_bound_ms: None,
        recovery_bound_basis: None,
        probes,
        stage_transition_ms,
        violation_count: count,
        violations,
        errors,
        dir: None,
        replay: config.replay.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::testutil::{grant, key, release};

    #[test]
    fn a_paused_holder_is_superseded_only_by_a_grant_of_its_slot_while_stopped() {
        let paused = Event::Paused { pid: 1, t_ns: 20 };
        let resumed = Event::Resumed { pid: 1, t_ns: 100 };
        let h = vec![
            grant(1, 0, 10, 0, 1),
            paused.clone(),
            grant(2, 5, 50, 0, 2),
            release(2, 60, 0, 2),
            resumed.clone(),
            release(1, 110, 0, 1),
        ];
        assert_eq!(superseded(&h, &key()), 1);
        // Another slot, or a grant after the resume, supersedes nobody.
        let h = vec![
            grant(1, 0, 10, 0, 1),
            paused,
            grant(2, 5, 50, 1, 2),
            resumed,
            grant(3, 5, 120, 0, 3),
        ];
        assert_eq!(superseded(&h, &key()), 0);
    }

    #[test]
    fn the_time_bound_grows_with_the_work_and_the_faults() {
        let config = Config {
            scenario: Scenario::Crash,
            url: "noop:".into(),
            key: key(),
            slots: 2,
            seed: 1,
            events: 10,
            stddev: Duration::ZERO,
            hold: Duration::from_secs(1),
            ttl: Duration::from_secs(2),
            wait: None,
            fraction: 0.5,
            pause_for: Duration::ZERO,
            recovery_bound: None,
            stages: 0,
            jobs: 0,
            procs: 0,
            dir: None,
            worker: WorkerCommand {
                program: PathBuf::from("baton"),
                args: Vec::new(),
            },
            progress: Progress::Off,
            replay: String::new(),
        };
        // 3s of starts + 5 × 2s of serial work + 2 kills × 9s + the final probe's
        // 2 × 14s + 60s.
        assert_eq!(
            config.time_bound(Duration::from_secs(3), 2),
            Duration::from_secs(3 + 10 + 18 + 28 + 60)
        );
    }
}
