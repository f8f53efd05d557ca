//! Worker processes: the embedding binary re-run with a hidden subcommand (`baton stress
//! __worker`) and a [`Job`] in [`JOB_ENV`]. Each worker runs one event (or, in `workflow`,
//! its share of every stage's jobs), records everything it does in the run's history, and
//! exits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::supervisor::{self, StopPolicy, Supervisor};
use baton_core::{
    AcquireRequest, BarrierRequest, ErrorKind, Holder, Keeper, KeeperConfig, Key, Lease,
    LeaseState, Store, StoreUrl, Wait,
};
use serde::{Deserialize, Serialize};

use crate::clock::{instant_ns, monotonic_ns};
use crate::history::{record_keeper, Event, Recorder};
use crate::recording::RecordingStore;
use crate::resource::{self, CLAIM, RESULT};
use crate::OpenFn;

/// The environment variable that carries a worker's job, as JSON.
pub const JOB_ENV: &str = "BATON_STRESS_JOB";

/// What a worker process does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    /// The store's URL (with any secret: it travels in the environment, never in argv).
    pub url: String,
    /// The history to append to.
    pub history: PathBuf,
    /// The fenced results database.
    pub results: PathBuf,
    /// The key.
    pub key: Key,
    /// The key's limit.
    pub limit: u32,
    /// The TTL to ask for, in ms (lease stores).
    pub ttl_ms: u64,
    /// How long to hold each lease, in µs.
    pub hold_us: u64,
    /// How long to wait for a slot, in ms; `None` waits forever.
    pub wait_ms: Option<u64>,
    /// The event's number (storm, crash, pause, single) or the worker's (workflow).
    pub id: u64,
    /// The orchestrator's pid: the worker exits if it is gone.
    pub parent: u32,
    /// For a probe (`crash`): how many slots to take, holding each until it has them all,
    /// then release; no event, no writes to the resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<u32>,
    /// For `workflow`: the stages to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<WorkflowJob>,
    /// A command (`sh -c`) each event runs while it holds, under the supervisor `baton
    /// run` uses, stopped with `grace_ms` between SIGTERM and SIGKILL: when it is gone,
    /// `command_gone` is recorded with the supervisor's own time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The command's kill grace, in ms.
    #[serde(default)]
    pub grace_ms: u64,
}

/// A workflow worker's share: in each stage, jobs `id, id + workers, id + 2·workers, …`
/// below `jobs`, then the barrier.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkflowJob {
    /// How many stages.
    pub stages: u32,
    /// Jobs per stage.
    pub jobs: u64,
    /// How many worker processes (the barrier's parties).
    pub workers: u32,
    /// The barrier's key.
    pub barrier: Key,
}

/// Runs the job in [`JOB_ENV`] and returns the process's exit code: 0 when the worker did
/// its job (whatever the store and the fence answered: the history says), 1 when it could
/// not record, 2 for a missing or bad job.
pub fn main(open: OpenFn) -> u8 {
    let job = match std::env::var(JOB_ENV) {
        Ok(text) => match serde_json::from_str::<Job>(&text) {
            Ok(job) => job,
            Err(e) => {
                eprintln!("baton: stress worker: bad job in {JOB_ENV}: {e}");
                return 2;
            }
        },
        Err(_) => {
            eprintln!("baton: stress worker: no job in {JOB_ENV} (this subcommand is internal)");
            return 2;
        }
    };
    die_with_parent(job.parent);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: stress worker: cannot start: {e}");
            return 1;
        }
    };
    match runtime.block_on(run(open, &job)) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("baton: stress worker {}: {message}", job.id);
            1
        }
    }
}

/// A worker must not outlive the run that started it.
fn die_with_parent(parent: u32) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and has no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    // The parent may have died before the prctl took effect.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != parent {
        std::process::exit(3);
    }
}

struct Ctx<'a> {
    job: &'a Job,
    rec: Recorder,
    store: Arc<dyn Store>,
    pid: u32,
    holder: Holder,
}

impl Ctx<'_> {
    fn record(&self, event: Event) -> Result<(), String> {
        self.rec
            .record(&event)
            .map_err(|e| format!("cannot record to the history: {e}"))
    }

    fn done(&self, id: u64, outcome: &str, message: Option<String>) -> Result<(), String> {
        self.record(Event::Done {
            pid: self.pid,
            t_ns: monotonic_ns(),
            id,
            outcome: outcome.into(),
            message,
        })
    }
}

async fn run(open: OpenFn, job: &Job) -> Result<(), String> {
    let rec = Recorder::open(&job.history)
        .map_err(|e| format!("cannot open the history {}: {e}", job.history.display()))?;
    let pid = std::process::id();
    let url = StoreUrl::parse(&job.url).map_err(|e| format!("{e:#}"))?;
    let store = match open(&url) {
        Ok(store) => store,
        Err(e) => {
            // Record the event as failed so the run says why, then stop.
            let event = Event::Start {
                pid,
                t_ns: monotonic_ns(),
                id: job.id,
            };
            let cannot = |w: std::io::Error| format!("cannot record to the history: {w}");
            rec.record(&event).map_err(cannot)?;
            rec.record(&Event::Done {
                pid,
                t_ns: monotonic_ns(),
                id: job.id,
                outcome: "error".into(),
                message: Some(format!("cannot open the store: {e:#}")),
            })
            .map_err(cannot)?;
            return Ok(());
        }
    };
    let ctx = Ctx {
        job,
        rec,
        store,
        pid,
        holder: Holder::current(vec!["baton-stress-worker".into(), job.id.to_string()]),
    };
    match (&job.workflow, job.probe) {
        (_, Some(slots)) => probe(&ctx, slots).await,
        (None, None) => event(&ctx, job.id).await,
        (Some(w), None) => workflow(&ctx, w).await,
    }
}

/// One event: acquire, claim the fence, hold, write the result through the fence,
/// release. The outcome goes into the history as `done`.
async fn event(ctx: &Ctx<'_>, id: u64) -> Result<(), String> {
    ctx.record(Event::Start {
        pid: ctx.pid,
        t_ns: monotonic_ns(),
        id,
    })?;
    // With a command, its supervisor exists before the acquire, so that the holder record
    // names it (as `baton run` does).
    let grace = Duration::from_millis(ctx.job.grace_ms);
    let supervisor = match &ctx.job.command {
        Some(script) => Some(start_command(ctx, script, grace)?),
        None => None,
    };
    let own;
    let ctx = match &supervisor {
        Some(s) => {
            let mut holder = ctx.holder.clone();
            holder.supervisor = s.process();
            own = Ctx {
                job: ctx.job,
                rec: Recorder::open(&ctx.job.history)
                    .map_err(|e| format!("cannot open the history: {e}"))?,
                store: Arc::clone(&ctx.store),
                pid: ctx.pid,
                holder,
            };
            &own
        }
        None => ctx,
    };
    let (lease, sent) = match acquire(ctx).await? {
        Ok(granted) => granted,
        Err((outcome, message)) => return ctx.done(id, outcome, Some(message)),
    };
    let lead = supervisor.as_ref().map(|_| grace);
    let kept = keep(ctx, &lease, sent, lead)?;
    let command = match supervisor {
        Some(s) => Some(run_command(s, &lease, kept.as_ref())?),
        None => None,
    };
    let (outcome, message) = hold_and_write(ctx, &lease, id).await?;
    if let Some(c) = command {
        c.finish(ctx, &lease).await?;
    }
    if let Some(k) = kept {
        k.stop().await?;
    }
    release(ctx, &lease).await?;
    ctx.done(id, outcome, message)
}

/// Forks the supervisor of an event's command (it waits for the grant).
fn start_command(ctx: &Ctx<'_>, script: &str, grace: Duration) -> Result<Supervisor, String> {
    let policy = StopPolicy {
        grace,
        reserve: KeeperConfig::for_ttl(Duration::from_millis(ctx.job.ttl_ms)).kill_reserve(),
    };
    let argv = ["sh".into(), "-c".into(), script.into()];
    Supervisor::start(&argv, &[], &["BATON_TOKEN"], None, policy, false)
        .map_err(|e| format!("cannot start the command's supervisor: {e}"))
}

/// A running command, and the task that tells its supervisor the keeper's deadlines.
struct Command {
    child: supervisor::Child,
    forward: Option<tokio::task::JoinHandle<()>>,
}

/// Starts the command of a granted lease; its supervisor follows the keeper's deadlines.
fn run_command(s: Supervisor, lease: &Lease, kept: Option<&Kept>) -> Result<Command, String> {
    let first = kept.and_then(|k| match k.keeper.state() {
        LeaseState::Held { deadline } => Some(deadline),
        _ => None,
    });
    let child = s
        .run(&[lease.token.0], first)
        .map_err(|e| format!("cannot start the command: {e}"))?;
    let forward = match kept {
        Some(k) => {
            let control = child
                .control()
                .map_err(|e| format!("cannot talk to the command's supervisor: {e}"))?;
            let mut watch = k.keeper.watch();
            Some(tokio::spawn(async move {
                loop {
                    let state = watch.borrow_and_update().clone();
                    match state {
                        LeaseState::Held { deadline } => control.deadline(deadline),
                        LeaseState::Lost { .. } => {
                            control.stop_now();
                            return;
                        }
                        LeaseState::Stopped => return,
                    }
                    if watch.changed().await.is_err() {
                        return;
                    }
                }
            }))
        }
        None => None,
    };
    Ok(Command { child, forward })
}

impl Command {
    /// Ends the command after the hold (if its supervisor has not stopped it already),
    /// waits until its whole group is gone, and records `command_gone`.
    async fn finish(mut self, ctx: &Ctx<'_>, lease: &Lease) -> Result<(), String> {
        if let Some(f) = self.forward.take() {
            f.abort();
        }
        let wait = |c: &mut supervisor::Child| {
            c.try_wait()
                .map(|e| e.is_some())
                .map_err(|e| format!("cannot wait for the command: {e}"))
        };
        // Gone already: its supervisor stopped it on its own (the deadline came while this
        // holder was paused or cut off).
        let on_its_own = wait(&mut self.child)?;
        if !on_its_own {
            self.child.stop_now();
            while !wait(&mut self.child)? {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let t_ns = self
            .child
            .gone_at_ns()
            .ok_or("the command's supervisor did not say when the group was gone")?;
        ctx.record(Event::CommandGone {
            pid: ctx.pid,
            t_ns,
            key: lease.key.clone(),
            token: lease.token,
            stopped: on_its_own && self.child.was_stopped(),
        })
    }
}

/// A probe: takes `slots` slots one after another (keeping each), then releases them all.
/// A refusal (the job's wait passed) ends it; the history shows what it got.
async fn probe(ctx: &Ctx<'_>, slots: u32) -> Result<(), String> {
    ctx.record(Event::Probe {
        pid: ctx.pid,
        t_ns: monotonic_ns(),
        slots,
    })?;
    let mut held = Vec::new();
    for slot in 0..slots {
        // One holder per slot: several leases of one key are never one holder's.
        let one = Ctx {
            job: ctx.job,
            rec: Recorder::open(&ctx.job.history)
                .map_err(|e| format!("cannot open the history: {e}"))?,
            store: Arc::clone(&ctx.store),
            pid: ctx.pid,
            holder: Holder::current(vec!["baton-stress-probe".into(), slot.to_string()]),
        };
        let Ok((lease, sent)) = acquire(&one).await? else {
            break;
        };
        let kept = keep(&one, &lease, sent, None)?;
        held.push((one, lease, kept));
    }
    for (one, lease, kept) in held {
        if let Some(k) = kept {
            k.stop().await?;
        }
        release(&one, &lease).await?;
    }
    Ok(())
}

/// Acquires a slot, recording `request` and `grant` or `refused`; returns the lease and
/// the instant just before the request was sent. The inner error is the event's outcome
/// when no slot was granted: `unknown` for a timeout (the outcome of a timed-out operation
/// is not known), `error` otherwise.
///
/// On a lease store the keeper's first deadline is recorded (`held`) *before* the grant:
/// a holder stopped right after its `grant` line still shows how long it may hold.
#[allow(clippy::type_complexity)]
async fn acquire(
    ctx: &Ctx<'_>,
) -> Result<Result<(Lease, Instant), (&'static str, String)>, String> {
    let job = ctx.job;
    let req = AcquireRequest {
        key: job.key.clone(),
        limit: job.limit,
        wait: job
            .wait_ms
            .map_or(Wait::Forever, |ms| Wait::Timeout(Duration::from_millis(ms))),
        ttl: Some(Duration::from_millis(job.ttl_ms)),
        holder: ctx.holder.clone(),
        lock_delay: None,
    };
    let sent = Instant::now();
    let t_request_ns = monotonic_ns();
    ctx.record(Event::Request {
        pid: ctx.pid,
        t_ns: t_request_ns,
        key: job.key.clone(),
    })?;
    match ctx.store.acquire(&req).await {
        Ok(lease) => {
            if let Some(deadline) = first_deadline(ctx, &lease, sent) {
                ctx.record(Event::Held {
                    pid: ctx.pid,
                    t_ns: monotonic_ns(),
                    key: lease.key.clone(),
                    token: lease.token,
                    deadline_ns: instant_ns(deadline),
                })?;
            }
            ctx.record(Event::Grant {
                pid: ctx.pid,
                t_ns: monotonic_ns(),
                t_request_ns,
                lease: lease.clone(),
            })?;
            Ok(Ok((lease, sent)))
        }
        Err(e) => {
            ctx.record(Event::Refused {
                pid: ctx.pid,
                t_ns: monotonic_ns(),
                key: job.key.clone(),
                kind: e.kind().as_str().into(),
                message: format!("{e:#}"),
            })?;
            let outcome = match e.kind() {
                ErrorKind::Timeout | ErrorKind::Busy | ErrorKind::Cancelled => "unknown",
                _ if e.grant_unknown() => "unknown",
                _ => "error",
            };
            Ok(Err((outcome, format!("acquire failed: {e:#}"))))
        }
    }
}

/// The TTL the keeper of `lease` keeps it for.
fn keeper_ttl(ctx: &Ctx<'_>, lease: &Lease) -> Duration {
    lease.ttl.unwrap_or(Duration::from_millis(ctx.job.ttl_ms))
}

/// On a lease store, the first deadline the keeper of `lease` will have (as
/// [`Keeper::start`] computes it).
fn first_deadline(ctx: &Ctx<'_>, lease: &Lease, sent: Instant) -> Option<Instant> {
    if !ctx.store.capabilities().renew {
        return None;
    }
    let validity = KeeperConfig::for_ttl(keeper_ttl(ctx, lease)).validity();
    Some(lease.sent_at.unwrap_or(sent) + validity)
}

/// A lease being kept: its keeper, whose renewals go through a [`RecordingStore`], and the
/// task that records the keeper's deadlines.
struct Kept {
    keeper: Keeper,
    recording: Arc<RecordingStore>,
    watcher: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Kept {
    /// Stops the keeper; fails if any of its renewals or deadlines could not be recorded.
    async fn stop(self) -> Result<(), String> {
        self.keeper.stop();
        let watched = self.watcher.await;
        if let Some(why) = self.recording.failure() {
            return Err(why);
        }
        match watched {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot record the keeper's state: {e}")),
            Err(e) => Err(format!("the keeper's recorder failed: {e}")),
        }
    }
}

/// On a lease store, starts a keeper for `lease` (its renewals recorded before it sees
/// them) and records its later deadlines (`held`) and a loss (`lost`) from a task.
///
/// With `grace` (a command that takes that long to stop), the keeper declares loss that
/// much (plus the reaping reserve) before the deadline, as `baton run`'s does.
fn keep(
    ctx: &Ctx<'_>,
    lease: &Lease,
    sent: Instant,
    grace: Option<Duration>,
) -> Result<Option<Kept>, String> {
    if !ctx.store.capabilities().renew {
        return Ok(None);
    }
    let recording = Arc::new(RecordingStore::new(
        Arc::clone(&ctx.store),
        &ctx.job.history,
    )?);
    let config = KeeperConfig::for_ttl(keeper_ttl(ctx, lease));
    let config = match grace {
        Some(g) => config.with_stop_lead(g + config.kill_reserve()),
        None => config,
    };
    let keeper = Keeper::start(
        Arc::clone(&recording) as Arc<dyn Store>,
        lease.clone(),
        config,
        sent,
    )
    .map_err(|e| format!("cannot start a keeper: {e:#}"))?;
    let rec = Recorder::open(&ctx.job.history).map_err(|e| format!("cannot open history: {e}"))?;
    let watcher = tokio::spawn(record_keeper(
        rec,
        keeper.watch(),
        ctx.pid,
        lease.key.clone(),
        lease.token,
    ));
    Ok(Some(Kept {
        keeper,
        recording,
        watcher,
    }))
}

/// Claims the fence right after the grant (so older holders' late writes are refused),
/// holds, then writes the result. A holder that was paused past its lease writes late on
/// purpose, without asking its keeper first: the fence, not the holder, must stop it.
async fn hold_and_write(
    ctx: &Ctx<'_>,
    lease: &Lease,
    id: u64,
) -> Result<(&'static str, Option<String>), String> {
    let job = ctx.job;
    let claim = resource::write(&job.results, &lease.key, lease.slot, lease.token, id, CLAIM);
    let claimed = fence_outcome(&claim);
    ctx.record(claim)?;
    if claimed.0 != "ok" {
        return Ok(claimed);
    }
    tokio::time::sleep(Duration::from_micros(job.hold_us)).await;
    let result = resource::write(
        &job.results,
        &lease.key,
        lease.slot,
        lease.token,
        id,
        RESULT,
    );
    let outcome = fence_outcome(&result);
    ctx.record(result)?;
    Ok(outcome)
}

fn fence_outcome(write: &Event) -> (&'static str, Option<String>) {
    match write {
        Event::FenceWrite { accepted: true, .. } => ("ok", None),
        Event::FenceWrite {
            kind: Some(k),
            error,
            ..
        } if k == "fenced" => ("fenced", error.clone()),
        // Any other failure of the database may or may not have committed.
        Event::FenceWrite { error, .. } => ("unknown", error.clone()),
        _ => ("unknown", None),
    }
}

/// Releases, recording `release` before the call and `released` after.
async fn release(ctx: &Ctx<'_>, lease: &Lease) -> Result<(), String> {
    ctx.record(Event::Release {
        pid: ctx.pid,
        t_ns: monotonic_ns(),
        key: lease.key.clone(),
        slot: lease.slot,
        token: lease.token,
    })?;
    let result = ctx.store.release(lease).await;
    ctx.record(Event::Released {
        pid: ctx.pid,
        t_ns: monotonic_ns(),
        key: lease.key.clone(),
        token: lease.token,
        outcome: result.as_ref().ok().copied(),
        error: result.as_ref().err().map(|e| format!("{e:#}")),
    })
}

/// A workflow worker: for each stage, its jobs (each an event of its own, numbered
/// `stage · jobs + job`), then the barrier.
async fn workflow(ctx: &Ctx<'_>, w: &WorkflowJob) -> Result<(), String> {
    for stage in 0..u64::from(w.stages) {
        let mut job = ctx.job.id;
        while job < w.jobs {
            event(ctx, stage * w.jobs + job).await?;
            job += u64::from(w.workers);
        }
        ctx.record(Event::Arrive {
            pid: ctx.pid,
            t_ns: monotonic_ns(),
            key: w.barrier.clone(),
        })?;
        let req = BarrierRequest {
            key: w.barrier.clone(),
            parties: w.workers,
            wait: ctx
                .job
                .wait_ms
                .map_or(Wait::Forever, |ms| Wait::Timeout(Duration::from_millis(ms))),
            holder: ctx.holder.clone(),
        };
        let passed = ctx
            .store
            .barrier(&req)
            .await
            .map_err(|e| format!("stage {stage}: {e:#}"))?;
        ctx.record(Event::Passed {
            pid: ctx.pid,
            t_ns: monotonic_ns(),
            key: w.barrier.clone(),
            generation: passed.generation,
        })?;
    }
    Ok(())
}
