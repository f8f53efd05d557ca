//! `baton-bench`: side-by-side benchmarks of baton's stores against what their users run
//! without baton: for the directory store, raw `flock(2)`, Python's fasteners and
//! filelock, and util-linux `flock(1)` (benchmarks 1–4); for SQLite, raw `BEGIN IMMEDIATE`
//! transactions (5–6); for PostgreSQL, advisory locks and a lease table (7–8); for etcd,
//! `etcdctl lock` and python-etcd3 (9–11); for Redis, redis-py's and python-redis-lock's
//! `Lock` (12–14); for ZooKeeper, kazoo's `Lock` (15–18); for RabbitMQ, a pika
//! token-message semaphore (19–21). See `bench/README.md`.
//!
//! `baton-bench run` runs every benchmark, writes raw results as JSON Lines and prints a
//! Markdown report on stdout (progress goes to stderr). The hidden subcommands are the
//! worker processes the benchmarks start from this same binary.

mod amqp;
mod cli;
mod contended;
mod etcd;
mod handoff;
mod inproc;
mod locks;
mod postgres;
mod record;
mod redis;
mod server;
mod sqlite;
mod storm;
mod syscalls;
mod util;
mod zk;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::locks::Impl;
use crate::util::Result;

#[derive(Parser)]
#[command(name = "baton-bench", about = "Side-by-side benchmarks of baton")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs every benchmark and prints the Markdown report.
    Run(RunArgs),
    /// Uncontended acquire + release in a loop (what `strace -c` counts).
    Loop {
        /// Which lock.
        #[arg(long = "impl", value_enum)]
        imp: Impl,
        /// The store directory (baton) or lock file (flock).
        #[arg(long)]
        target: PathBuf,
        /// How many pairs.
        #[arg(long, default_value_t = 1000)]
        ops: u64,
    },
    /// One side of the hand-off benchmark.
    #[command(hide = true)]
    Pingpong {
        #[arg(long = "impl", value_enum)]
        imp: Impl,
        #[arg(long)]
        role: String,
        #[arg(long)]
        target: PathBuf,
        #[arg(long)]
        fifos: PathBuf,
        #[arg(long)]
        handoffs: u64,
        #[arg(long)]
        settle_us: u64,
    },
    /// One process of the storm benchmark.
    #[command(hide = true)]
    StormWorker {
        #[arg(long = "impl", value_enum)]
        imp: Impl,
        #[arg(long)]
        target: PathBuf,
        #[arg(long)]
        shm: PathBuf,
        #[arg(long)]
        hold_ns: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// One process of the SQLite burst benchmark.
    #[command(hide = true)]
    SqliteBurstWorker {
        #[arg(long = "impl", value_enum)]
        imp: sqlite::BurstImpl,
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        shm: PathBuf,
        #[arg(long)]
        n: usize,
        #[arg(long)]
        slot: usize,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// A small version for CI: seconds, every code path, fails on a violation.
    #[arg(long)]
    quick: bool,
    /// Where the JSON Lines results go.
    #[arg(long, default_value = "bench/results")]
    results: PathBuf,
    /// The `baton` binary for benchmark 2.
    #[arg(long, default_value = "target/release/baton")]
    baton: PathBuf,
    /// A Python with fasteners and filelock installed.
    #[arg(long, default_value = "bench/.venv/bin/python")]
    python: PathBuf,
    /// The directory of the Python peer scripts.
    #[arg(long, default_value = "bench/peers")]
    peers: PathBuf,
    /// Where lock files go (default: /dev/shm if it is tmpfs, else /tmp).
    #[arg(long)]
    lock_dir: Option<PathBuf>,
    /// Run only these benchmarks (comma-separated: inproc,cli,handoff,storm,sqlite,sqlite-burst,postgres,etcd,redis,zk,amqp).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Loop { imp, target, ops } => run_loop(imp, &target, ops),
        Cmd::Pingpong {
            imp,
            role,
            target,
            fifos,
            handoffs,
            settle_us,
        } => handoff::worker(imp, &role, &target, &fifos, handoffs, settle_us),
        Cmd::StormWorker {
            imp,
            target,
            shm,
            hold_ns,
            out,
        } => storm::worker(imp, &target, &shm, hold_ns, &out),
        Cmd::SqliteBurstWorker {
            imp,
            db,
            shm,
            n,
            slot,
        } => sqlite::burst_worker(imp, &db, &shm, n, slot),
    };
    if let Err(e) = result {
        eprintln!("baton-bench: {e}");
        std::process::exit(1);
    }
}

fn run_loop(imp: Impl, target: &Path, ops: u64) -> Result<()> {
    let mut lock = locks::open(imp, target, baton::Wait::NoWait)?;
    for _ in 0..ops {
        lock.acquire()?;
        lock.release()?;
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    let wants = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let base = match &args.lock_dir {
        Some(d) => d.clone(),
        None if util::fs_type(Path::new("/dev/shm")) == "tmpfs" => PathBuf::from("/dev/shm"),
        None => std::env::temp_dir(),
    };
    let work = tempfile::Builder::new()
        .prefix("baton-bench.")
        .tempdir_in(&base)?;
    let dir = work.path().to_path_buf();
    // A second filesystem for the in-process baton row, when /tmp is not the lock dir's.
    let other = tempfile::Builder::new()
        .prefix("baton-bench.")
        .tempdir_in(std::env::temp_dir())?;
    let other_dir =
        (util::fs_type(other.path()) != util::fs_type(&dir)).then(|| other.path().to_path_buf());

    std::fs::create_dir_all(&args.results)?;
    let stamp = util::command_output("date", &["-u", "+%Y%m%dT%H%M%SZ"]);
    let mode = if args.quick { "quick" } else { "full" };
    let results = args.results.join(format!("{stamp}-{mode}.jsonl"));
    let mut rec = record::Recorder::create(&results)?;

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = util::command_output("uname", &["-r"]);
    let fs = util::fs_type(&dir);
    let commit = util::command_output("git", &["describe", "--always", "--dirty"]);
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    rec.write(
        "machine",
        json!({"mode": mode, "nproc": nproc, "cpu": cpu, "kernel": kernel,
               "lock_dir": dir, "lock_dir_fs": fs, "commit": commit, "loadavg_start": load0.trim(),
               "started_utc": stamp}),
    )?;
    let started = std::time::Instant::now();

    let mut md = format!(
        "## Results\n\n\
         Command: `bash bench/run.sh{}` · {stamp} · baton `{commit}`\n\n\
         Machine: {nproc} CPUs ({cpu}), Linux {kernel}; lock directory `{}` on **{fs}**; \
         load average at start {} (the machine is shared; every comparison below alternates \
         the implementations within one run and reports medians and ratios).\n\n",
        if args.quick { " --quick" } else { "" },
        dir.display(),
        load0
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
    let mut violations = 0;

    if wants("inproc") {
        eprintln!("benchmark 1: in-process acquire + release");
        let cfg = inproc::Config {
            rounds: if args.quick { 2 } else { 7 },
            ops: if args.quick { 300 } else { 20_000 },
            peer_ops: if args.quick { 100 } else { 3000 },
            raw_ops: if args.quick { 3000 } else { 200_000 },
            dir: dir.join("inproc"),
            other_dir: other_dir.as_ref().map(|d| d.join("inproc")),
            python: args.python.clone(),
            peers: args.peers.clone(),
        };
        std::fs::create_dir_all(&cfg.dir)?;
        md.push_str(&inproc::run(&cfg, &mut rec)?.markdown);
        md.push_str(&syscalls::run(
            &dir,
            if args.quick { 20 } else { 200 },
            &mut rec,
        )?);
        md.push_str(&syscalls::profile(
            &dir,
            if args.quick { 500 } else { 20_000 },
            &mut rec,
        )?);
        md.push('\n');
    }
    if wants("cli") {
        eprintln!("benchmark 2: baton run vs flock(1)");
        let cfg = cli::Config {
            rounds: if args.quick { 2 } else { 7 },
            calls: if args.quick { 5 } else { 50 },
            baton: args.baton.clone(),
            dir: dir.clone(),
        };
        md.push_str(&cli::run(&cfg, &mut rec)?);
        md.push('\n');
    }
    if wants("handoff") {
        eprintln!("benchmark 3: hand-off latency");
        let cfg = handoff::Config {
            rounds: if args.quick { 2 } else { 6 },
            handoffs: if args.quick { 40 } else { 500 },
            settle_us: 300,
            dir: dir.clone(),
        };
        md.push_str(&handoff::run(&cfg, &mut rec)?);
        md.push('\n');
    }
    if wants("storm") {
        eprintln!("benchmark 4: storm");
        let cfg = storm::Config {
            ns: if args.quick {
                vec![2, 8]
            } else {
                vec![2, 8, 32, 128]
            },
            rounds: if args.quick { 1 } else { 2 },
            duration: if args.quick {
                Duration::from_millis(300)
            } else {
                Duration::from_millis(1500)
            },
            hold_ns: 2_000,
            dir: dir.clone(),
        };
        let out = storm::run(&cfg, &mut rec)?;
        violations += out.violations;
        md.push_str(&out.markdown);
        md.push('\n');
    }
    if wants("sqlite") {
        eprintln!("benchmark 5: SQLite store, in-process");
        let cfg = sqlite::InprocConfig {
            rounds: if args.quick { 2 } else { 7 },
            ops: if args.quick { 100 } else { 2000 },
            dir: dir.join("sqlite"),
        };
        md.push_str(&sqlite::run_inproc(&cfg, &mut rec)?);
    }
    let mut burst_errors = 0;
    if wants("sqlite-burst") {
        eprintln!("benchmark 6: SQLite store, burst of processes");
        let cfg = sqlite::BurstConfig {
            n: if args.quick { 50 } else { 1000 },
            rounds: 1,
            per_process_timeout: Duration::from_secs(if args.quick { 30 } else { 120 }),
            spawn_timeout: Duration::from_secs(if args.quick { 30 } else { 60 }),
            dir: dir.clone(),
        };
        let out = sqlite::run_burst(&cfg, &mut rec)?;
        burst_errors = out.errors;
        md.push_str(&out.markdown);
    }
    if wants("postgres") {
        eprintln!("benchmarks 7 and 8: PostgreSQL store");
        let cfg = postgres::Config {
            rounds: if args.quick { 2 } else { 7 },
            ops: if args.quick { 100 } else { 2000 },
            peer_ops: if args.quick { 100 } else { 2000 },
            clients: vec![8, 32],
            duration: Duration::from_millis(if args.quick { 300 } else { 3000 }),
            contended_rounds: if args.quick { 1 } else { 2 },
            python: args.python.clone(),
            peers: args.peers.clone(),
            server_script: PathBuf::from("scripts/server-postgres"),
            dir: std::env::temp_dir(),
        };
        let out = postgres::run(&cfg, &mut rec)?;
        violations += out.violations as u64;
        md.push_str(&out.markdown);
    }
    if wants("etcd") {
        eprintln!("benchmarks 9 to 11: etcd store");
        let cfg = etcd::Config {
            rounds: if args.quick { 2 } else { 7 },
            ops: if args.quick { 30 } else { 500 },
            peer_ops: if args.quick { 30 } else { 500 },
            calls: if args.quick { 3 } else { 30 },
            clients: vec![8, 32],
            duration: Duration::from_millis(if args.quick { 300 } else { 3000 }),
            baton: args.baton.clone(),
            python: Some(args.python.clone()),
            peers: args.peers.clone(),
            server_script: PathBuf::from("scripts/server-etcd"),
            dir: dir.join("etcd"),
        };
        let out = etcd::run(&cfg, &mut rec)?;
        violations += out.violations as u64;
        md.push_str(&out.markdown);
    }
    if wants("redis") {
        eprintln!("benchmarks 12 to 14: Redis store");
        let cfg = redis::Config {
            rounds: if args.quick { 2 } else { 7 },
            ops: if args.quick { 30 } else { 1000 },
            peer_ops: if args.quick { 30 } else { 1000 },
            floor_ops: if args.quick { 30 } else { 1000 },
            calls: if args.quick { 3 } else { 30 },
            clients: vec![8, 32],
            duration: Duration::from_millis(if args.quick { 300 } else { 3000 }),
            baton: args.baton.clone(),
            python: Some(args.python.clone()),
            peers: args.peers.clone(),
            server_script: PathBuf::from("scripts/server-redis"),
            dir: dir.join("redis"),
        };
        let out = redis::run(&cfg, &mut rec)?;
        violations += out.violations as u64;
        md.push_str(&out.markdown);
    }
    if wants("zk") {
        eprintln!("benchmarks 15 to 18: ZooKeeper store");
        let cfg = zk::Config {
            rounds: if args.quick { 2 } else { 7 },
            ops: if args.quick { 10 } else { 200 },
            peer_ops: if args.quick { 10 } else { 200 },
            floor_ops: if args.quick { 10 } else { 200 },
            calls: if args.quick { 3 } else { 30 },
            clients: vec![8, 32],
            duration: Duration::from_millis(if args.quick { 300 } else { 3000 }),
            waiters: if args.quick { 10 } else { 100 },
            baton: args.baton.clone(),
            python: Some(args.python.clone()),
            peers: args.peers.clone(),
            server_script: PathBuf::from("scripts/server-zookeeper"),
            dir: dir.join("zk"),
        };
        let out = zk::run(&cfg, &mut rec)?;
        violations += out.violations as u64;
        md.push_str(&out.markdown);
    }
    if wants("amqp") {
        eprintln!("benchmarks 19 to 21: RabbitMQ store");
        let cfg = amqp::Config {
            rounds: if args.quick { 2 } else { 7 },
            ops: if args.quick { 20 } else { 300 },
            calls: if args.quick { 3 } else { 20 },
            clients: vec![8, 32],
            duration: Duration::from_millis(if args.quick { 500 } else { 3000 }),
            baton: args.baton.clone(),
            python: Some(args.python.clone()),
            peers: args.peers.clone(),
            server_script: PathBuf::from("scripts/server-rabbitmq"),
            dir: dir.join("amqp"),
        };
        let out = amqp::run(&cfg, &mut rec)?;
        violations += out.violations as u64;
        md.push_str(&out.markdown);
    }
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let secs = started.elapsed().as_secs_f64();
    rec.write(
        "done",
        json!({"seconds": secs, "violations": violations, "sqlite_burst_errors": burst_errors,
               "loadavg_end": load1.trim()}),
    )?;
    md.push_str(&format!(
        "Benchmarks took {secs:.0} s; load average at the end {}. Raw results: `{}`.\n",
        load1
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        results.display()
    ));
    println!("{md}");
    if violations > 0 {
        return Err(format!("{violations} violation(s) of mutual exclusion or token order").into());
    }
    if burst_errors > 0 {
        return Err(format!("{burst_errors} SQLite burst process(es) failed or timed out").into());
    }
    Ok(())
}
