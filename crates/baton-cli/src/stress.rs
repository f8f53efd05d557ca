//! `baton stress SCENARIO`: prove the contract on a store with real processes.
//!
//! Each scenario starts worker processes (this binary again, `baton stress __worker`, with
//! the job in the environment), records what they do in a JSON Lines history on the
//! host's monotonic clock, then runs the checkers (`baton-stress`). Prints a summary
//! (`--json`: one JSON object), optionally writes an HTML report, and exits 0 when every
//! property held, 1 when one did not (the violations are listed), 69 when the store cannot
//! run the scenario, 2 for usage errors.

use std::path::PathBuf;
use std::time::Duration;

use baton::{format_duration, parse_duration, Key, StoreUrl};
use baton_stress::scenario::{self, Config, Progress, Scenario, Summary, WorkerCommand};
use clap::{Args as ClapArgs, Subcommand};

use crate::common::{print, print_json, store_url, Failure};
use crate::exit_code;

/// What every run checks, for `--help`.
const CHECKS: &str = "\
What a run checks (exit 1 on any violation):
  limit         never more than -n holders, no slot held twice, every slot in 0..N; on
                lease stores a lease ends at its keeper's deadline, recorded before the
                keeper acts on a renewal
  tokens        tokens distinct and rising
  results       each event started once, its result recorded exactly once
  stale         the fenced resource accepted no write with a lower token
  completeness  every --events event started and ended
  liveness      waiting forever (no -w), every event was granted; with -w, at least one
  recovery      crash: a killed holder's slot comes back within the store's bound (500ms
                for dir: kernel locks; TTL + 1s for dir:?mode=lease, sqlite:, postgres://;
                max(TTL, 2s) + 1.5s for etcd://), measured by a probe after every kill
                and one that takes every slot at the end
  barrier       workflow: stages never overlap, every party passes every stage
A run that outlives its bound (last start + ceil(events/slots) x (hold + 1s) + each
planned fault's recovery + the wait + 60s) is stopped and fails.
noop:?FAULTS breaks a store on purpose to show each checker failing (the baton-stress
README lists them).";

/// Options of `baton stress`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The scenario.
    #[command(subcommand)]
    pub scenario: Cmd,
}

/// The scenarios.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// N processes start at Gaussian times, each acquires, holds, and writes its result
    /// through the fence.
    #[command(after_help = CHECKS)]
    Storm(StormArgs),
    /// A storm whose holders are SIGKILLed at random points while holding; measures death
    /// to next grant.
    #[command(after_help = CHECKS)]
    Crash(CrashArgs),
    /// A storm whose holders are SIGSTOPped past their TTL, then resumed (lease stores);
    /// their late writes must be refused by the fence.
    #[command(after_help = CHECKS)]
    Pause(PauseArgs),
    /// A storm whose holders are cut off their server through a fault proxy past their TTL,
    /// then healed (networked lease stores); they must give up before anyone else is
    /// granted, and their late writes must be refused by the fence.
    #[command(after_help = CHECKS)]
    Partition(PartitionArgs),
    /// S stages of J jobs on a W-slot semaphore, a barrier between stages.
    #[command(after_help = CHECKS)]
    Workflow(WorkflowArgs),
    /// One process acquiring, holding and recording, for debugging a store.
    #[command(after_help = CHECKS)]
    Single(SingleArgs),
    /// Internal: one worker process of a run (the job comes in the environment).
    #[command(name = "__worker", hide = true)]
    Worker,
}

/// Options every scenario takes.
#[derive(Debug, ClapArgs)]
pub struct Common {
    /// The key to stress (default: stress/SCENARIO).
    #[arg(short = 'k', long, value_name = "KEY")]
    pub key: Option<String>,

    /// The key's slots (1: a mutex).
    #[arg(short = 'n', long, value_name = "SLOTS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: u32,

    /// The seed of every random choice (default: a fresh one, printed in the summary).
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,

    /// Write a self-contained HTML report (timeline, wait histogram) to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// Print the summary as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Keep the run's files (history.jsonl, results.db, workers.log) in DIR.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Lease TTL on lease stores (kernel-lock stores ignore it).
    #[arg(long, value_name = "DURATION", default_value = "2s")]
    pub ttl: String,

    /// How long each worker waits for a slot (default: forever, and then every event must
    /// be granted; with a wait, timeouts are legitimate).
    #[arg(short = 'w', long, value_name = "DURATION")]
    pub wait: Option<String>,

    /// No progress on stderr.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

/// Options of the storm-shaped scenarios.
#[derive(Debug, ClapArgs)]
pub struct Shape {
    /// How many events (one process each).
    #[arg(long, value_name = "N")]
    pub events: Option<u64>,

    /// Standard deviation of the start times (seconds, or 500ms, 2s).
    #[arg(long, value_name = "DURATION")]
    pub stddev: Option<String>,

    /// How long each holder holds (seconds, or 500ms).
    #[arg(long, value_name = "DURATION")]
    pub hold: Option<String>,
}

/// Options of `stress storm`.
#[derive(Debug, ClapArgs)]
pub struct StormArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    shape: Shape,
}

/// Options of `stress crash`.
#[derive(Debug, ClapArgs)]
pub struct CrashArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    shape: Shape,
    /// The share of holders SIGKILLed (0 to 1).
    #[arg(long, value_name = "F", default_value_t = 0.3)]
    kill_fraction: f64,
    /// How soon a killed holder's slot must come back, counted from the kill (or from a
    /// later request). Default: the store's documented bound — 500ms for kernel locks
    /// (dir:), TTL + 1s for dir:?mode=lease, sqlite: and postgres://, max(TTL, 2s) + 1.5s
    /// for etcd://, TTL + 2s for other lease stores.
    #[arg(long, value_name = "DURATION")]
    recovery_bound: Option<String>,
}

/// Options of `stress pause`.
#[derive(Debug, ClapArgs)]
pub struct PauseArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    shape: Shape,
    /// The share of holders SIGSTOPped and later resumed (0 to 1).
    #[arg(long, value_name = "F", default_value_t = 0.3)]
    pause_fraction: f64,
    /// How long a paused holder stays stopped (default 2 × TTL + 4s: past its TTL and the
    /// store's detection, so another holder takes over meanwhile).
    #[arg(long, value_name = "DURATION")]
    pause_for: Option<String>,
}

/// Options of `stress partition`.
#[derive(Debug, ClapArgs)]
pub struct PartitionArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    shape: Shape,
    /// The share of holders cut off (0 to 1).
    #[arg(long, value_name = "F", default_value_t = 0.3)]
    partition_fraction: f64,
    /// How long a partition lasts (default 2 × TTL + 4s: past the TTL and the store's
    /// detection, so another holder takes over meanwhile).
    #[arg(long, value_name = "DURATION")]
    partition_for: Option<String>,
}

/// Options of `stress workflow`.
#[derive(Debug, ClapArgs)]
pub struct WorkflowArgs {
    #[command(flatten)]
    common: Common,
    /// Stages, with a barrier between each two.
    #[arg(long, value_name = "S", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    stages: u32,
    /// Jobs per stage.
    #[arg(long, value_name = "J", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    jobs: u64,
    /// Slots of the semaphore every job takes (replaces -n).
    #[arg(long, value_name = "W", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    workers: u32,
    /// Worker processes sharing the jobs (the barrier's parties; default 2 × W).
    #[arg(long, value_name = "P", value_parser = clap::value_parser!(u32).range(1..))]
    procs: Option<u32>,
    /// How long each job holds its slot.
    #[arg(long, value_name = "DURATION", default_value = "0")]
    hold: String,
}

/// Options of `stress single`.
#[derive(Debug, ClapArgs)]
pub struct SingleArgs {
    #[command(flatten)]
    common: Common,
    /// How long to hold.
    #[arg(long, value_name = "DURATION", default_value = "100ms")]
    hold: String,
}

fn duration(flag: &str, text: &str) -> Result<Duration, Failure> {
    parse_duration(text).map_err(|e| Failure::usage(format!("{flag} {text}: {e}")))
}

fn fraction(flag: &str, f: f64) -> Result<f64, Failure> {
    if (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(Failure::usage(format!(
            "{flag} {f}: must be between 0 and 1"
        )))
    }
}

/// Defaults per scenario: (events, stddev, hold).
fn shape(s: &Shape, defaults: (u64, &str, &str)) -> Result<(u64, Duration, Duration), Failure> {
    let events = s.events.unwrap_or(defaults.0);
    if events == 0 {
        return Err(Failure::usage("--events must be at least 1"));
    }
    let stddev = duration("--stddev", s.stddev.as_deref().unwrap_or(defaults.1))?;
    let hold = duration("--hold", s.hold.as_deref().unwrap_or(defaults.2))?;
    Ok((events, stddev, hold))
}

/// Runs `baton stress`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    let (scenario, common) = match &args.scenario {
        Cmd::Worker => return Ok(baton_stress::worker::main(baton::open_url)),
        Cmd::Storm(a) => (Scenario::Storm, &a.common),
        Cmd::Crash(a) => (Scenario::Crash, &a.common),
        Cmd::Pause(a) => (Scenario::Pause, &a.common),
        Cmd::Partition(a) => (Scenario::Partition, &a.common),
        Cmd::Workflow(a) => (Scenario::Workflow, &a.common),
        Cmd::Single(a) => (Scenario::Single, &a.common),
    };
    let url: StoreUrl = store_url(store)?;
    let key = match &common.key {
        Some(k) => Key::new(k.as_str())?,
        None => Key::new(format!("stress/{}", scenario.name()))?,
    };
    let ttl = duration("--ttl", &common.ttl)?;
    if ttl < Duration::from_millis(100) {
        return Err(Failure::usage(format!(
            "--ttl {} is too short: at least 100ms (renewals happen every TTL/3)",
            common.ttl
        )));
    }
    let wait = common
        .wait
        .as_deref()
        .map(|w| duration("-w", w))
        .transpose()?;
    let seed = common.seed.unwrap_or_else(baton_stress::rng::fresh_seed);
    let program = std::env::current_exe().map_err(|e| {
        Failure::new(
            exit_code::FAILURE,
            format!("stress: cannot find this program to start workers: {e}"),
        )
    })?;
    let mut config = Config {
        scenario,
        url: url.expose_secret().to_owned(),
        key,
        slots: common.slots,
        seed,
        events: 1,
        stddev: Duration::ZERO,
        hold: Duration::from_millis(100),
        ttl,
        wait,
        fraction: 0.0,
        pause_for: ttl * 2 + Duration::from_secs(4),
        recovery_bound: None,
        stages: 0,
        jobs: 0,
        procs: 0,
        dir: common.dir.clone(),
        worker: WorkerCommand {
            program,
            args: vec!["stress".into(), "__worker".into()],
        },
        progress: if common.quiet {
            Progress::Off
        } else {
            Progress::Auto
        },
        replay: String::new(),
    };
    // Scenario flags, as they go into the replay command.
    let mut flags: Vec<String> = Vec::new();
    match &args.scenario {
        Cmd::Storm(a) => {
            (config.events, config.stddev, config.hold) = shape(&a.shape, (1000, "2s", "500ms"))?;
        }
        Cmd::Crash(a) => {
            (config.events, config.stddev, config.hold) = shape(&a.shape, (40, "1s", "200ms"))?;
            config.fraction = fraction("--kill-fraction", a.kill_fraction)?;
            flags.push(format!("--kill-fraction {}", a.kill_fraction));
            if let Some(b) = &a.recovery_bound {
                config.recovery_bound = Some(duration("--recovery-bound", b)?);
                flags.push(format!("--recovery-bound {b}"));
            }
        }
        Cmd::Pause(a) => {
            (config.events, config.stddev, config.hold) = shape(&a.shape, (10, "500ms", "200ms"))?;
            config.fraction = fraction("--pause-fraction", a.pause_fraction)?;
            flags.push(format!("--pause-fraction {}", a.pause_fraction));
            if let Some(p) = &a.pause_for {
                config.pause_for = duration("--pause-for", p)?;
                flags.push(format!("--pause-for {p}"));
            }
        }
        Cmd::Workflow(a) => {
            config.stages = a.stages;
            config.jobs = a.jobs;
            config.slots = a.workers;
            config.procs = a.procs.unwrap_or(a.workers.saturating_mul(2));
            config.hold = duration("--hold", &a.hold)?;
            config.events = u64::from(a.stages) * a.jobs;
            flags.push(format!(
                "--stages {} --jobs {} --workers {} --procs {} --hold {}",
                a.stages,
                a.jobs,
                a.workers,
                config.procs,
                format_duration(config.hold)
            ));
        }
        Cmd::Single(a) => config.hold = duration("--hold", &a.hold)?,
        Cmd::Partition(a) => {
            // Holds outlast the TTL, so a holder cut off early in its hold writes late.
            let hold = format_duration(ttl * 2 + Duration::from_secs(1));
            (config.events, config.stddev, config.hold) = shape(&a.shape, (10, "500ms", &hold))?;
            config.fraction = fraction("--partition-fraction", a.partition_fraction)?;
            flags.push(format!("--partition-fraction {}", a.partition_fraction));
            if let Some(p) = &a.partition_for {
                config.pause_for = duration("--partition-for", p)?;
                flags.push(format!("--partition-for {p}"));
            }
        }
        Cmd::Worker => {}
    }
    if matches!(
        scenario,
        Scenario::Storm | Scenario::Crash | Scenario::Pause | Scenario::Partition
    ) {
        flags.insert(
            0,
            format!(
                "--events {} --stddev {} --hold {}",
                config.events,
                format_duration(config.stddev),
                format_duration(config.hold)
            ),
        );
    }
    let mut replay = format!(
        "baton stress {} -s '{}' -k {} --seed {} --ttl {}",
        scenario.name(),
        url,
        config.key,
        seed,
        format_duration(ttl)
    );
    if scenario != Scenario::Workflow {
        replay.push_str(&format!(" -n {}", config.slots));
    }
    if let Some(w) = wait {
        replay.push_str(&format!(" -w {}", format_duration(w)));
    }
    for f in &flags {
        replay.push(' ');
        replay.push_str(f);
    }
    config.replay = replay;

    let out = scenario::run(&config, baton::open_url).map_err(|e| {
        let f = Failure::from(e);
        Failure::new(f.code, format!("stress {}: {}", scenario.name(), f.message))
    })?;
    if let Some(path) = &common.report {
        std::fs::write(path, baton_stress::report::html(&out.summary, &out.events)).map_err(
            |e| {
                Failure::new(
                    exit_code::FAILURE,
                    format!("cannot write the report {}: {e}", path.display()),
                )
            },
        )?;
    }
    let s = &out.summary;
    if common.json {
        let value = serde_json::to_value(s).map_err(|e| {
            Failure::new(
                exit_code::FAILURE,
                format!("cannot encode the summary: {e}"),
            )
        })?;
        print_json(&value)?;
    } else {
        print(&table(s))?;
    }
    if s.passed() {
        Ok(exit_code::SUCCESS)
    } else {
        Err(Failure::new(
            exit_code::FAILURE,
            format!(
                "stress {}: {} violation(s), {} error(s){}",
                scenario.name(),
                s.violation_count,
                s.errors.len(),
                if common.json { "" } else { " (listed above)" }
            ),
        ))
    }
}

/// The human summary.
fn table(s: &Summary) -> String {
    let mut out = format!(
        "baton stress {} on {}  key {}  slots {}  seed {}\n",
        s.scenario.name(),
        s.store,
        s.key,
        s.slots,
        s.seed
    );
    let outcomes: Vec<String> = s.outcomes.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<22}{v}\n"));
    // Durations in the unit a person reads them in (`3.2ms`, `8m24s`).
    let ms = |v: f64| baton_stress::report::human_ns((v * 1e6).max(0.0) as u64);
    line("events", format!("{} ({})", s.events, outcomes.join(", ")));
    line("grants", s.grants.to_string());
    line(
        "throughput",
        format!(
            "{:.1} grants/s over {}",
            s.throughput_per_s,
            ms(s.wall_s * 1e3)
        ),
    );
    line(
        "wait",
        format!(
            "p50 {}  p99 {}  max {}",
            ms(s.wait.p50_ms),
            ms(s.wait.p99_ms),
            ms(s.wait.max_ms)
        ),
    );
    line(
        "overhead per handoff",
        format!(
            "{} (wall / grants - hold {})",
            ms(s.overhead_per_handoff_ms),
            ms(s.hold_ms)
        ),
    );
    line(
        "fairness",
        format!("{:.3} (Jain's index of waits)", s.fairness),
    );
    if s.killed > 0 || s.scenario == Scenario::Crash {
        line("killed", s.killed.to_string());
    }
    if let Some(r) = &s.recovery_ms {
        line(
            "recovery",
            format!(
                "p50 {}  max {} (death to next grant)",
                ms(r.p50_ms),
                ms(r.max_ms)
            ),
        );
    }
    if s.paused > 0 || s.scenario == Scenario::Pause {
        line(
            "paused",
            format!("{} ({} superseded while stopped)", s.paused, s.superseded),
        );
    }
    if s.partitioned > 0 || s.scenario == Scenario::Partition {
        line(
            "partitioned",
            format!(
                "{} ({} superseded while cut off)",
                s.partitioned, s.superseded
            ),
        );
    }
    line("fenced writes", s.fenced_writes.to_string());
    if let Some(t) = &s.stage_transition_ms {
        line(
            "stage transition",
            format!(
                "p50 {}  max {} (last arrival to pass)",
                ms(t.p50_ms),
                ms(t.max_ms)
            ),
        );
    }
    line("violations", s.violation_count.to_string());
    for v in &s.violations {
        for (i, l) in v.to_string().lines().enumerate() {
            out.push_str(if i == 0 { "    " } else { "      " });
            out.push_str(l);
            out.push('\n');
        }
    }
    if s.violations.len() < s.violation_count {
        out.push_str(&format!(
            "    ... and {} more\n",
            s.violation_count - s.violations.len()
        ));
    }
    for e in &s.errors {
        out.push_str(&format!("  error: {e}\n"));
    }
    if let Some(d) = &s.dir {
        out.push_str(&format!("  files: {d}\n"));
    }
    out.push_str(&format!("replay: {}\n", s.replay));
    out
}
