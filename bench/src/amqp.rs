//! Benchmarks 19–21: baton's RabbitMQ store (`amqp://…`) against the token-message
//! semaphore of the RabbitMQ blog (2014) in pika (`bench/peers/amqp_peer.py`), on one
//! broker.
//!
//! - 15, in-process, uncontended: `acquire` (`NoWait`, ttl 30 s) + `release` through the
//!   library, against the peer's `basic.get` + `basic.reject` of the token message.
//! - 16, per call: `baton run -s amqp://… -k K -- true`.
//! - 17, contended: N clients (8 and 32) on one mutex for a fixed time: baton's N store
//!   handles in one process (`contended.rs`, mutual exclusion checked), the peer's N forked
//!   processes consuming the token (prefetch 1) and rejecting it back.
//!
//! The broker is `BATON_TEST_AMQP`, or one started for the run with
//! `scripts/server-rabbitmq` (and stopped after it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton::{Key, Wait};
use serde_json::{json, Value};

use crate::contended::{self, Warm};
use crate::locks::BatonLock;
use crate::record::Recorder;
use crate::server::ServerGuard;
use crate::util::{fmt_ns, fmt_ns_list, median, now_ns, python_peer, random_suffix, Result};

/// The lease time to live every request carries.
const TTL: Duration = Duration::from_secs(30);

/// Settings for the RabbitMQ benchmarks.
pub struct Config {
    /// Rounds of each implementation, alternating (in-process and per call).
    pub rounds: usize,
    /// acquire + release pairs per round (baton and the peer).
    pub ops: u64,
    /// Calls per round of `baton run`.
    pub calls: usize,
    /// Client counts of the contended benchmark.
    pub clients: Vec<usize>,
    /// How long each contended round runs.
    pub duration: Duration,
    /// The `baton` binary.
    pub baton: PathBuf,
    /// A Python with pika (`None` or no pika: the peer is skipped, and the report says so).
    pub python: Option<PathBuf>,
    /// The directory of the Python peers.
    pub peers: PathBuf,
    /// `scripts/server-rabbitmq`, to start a broker when `BATON_TEST_AMQP` is unset.
    pub server_script: PathBuf,
    /// A directory for a broker this run starts.
    pub dir: PathBuf,
}

/// The report section and how many violations of mutual exclusion were seen.
pub struct Outcome {
    /// The Markdown section.
    pub markdown: String,
    /// Violations (overlapping holds, tokens out of order).
    pub violations: usize,
}

/// `calls` runs of one command; returns the mean wall time per call in ns.
fn per_call(calls: usize, mut cmd: impl FnMut() -> Command) -> Result<f64> {
    let t0 = now_ns();
    for _ in 0..calls {
        let out = cmd().output()?;
        if !out.status.success() {
            return Err(format!(
                "{:?} failed ({}): {}",
                cmd(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
    }
    Ok((now_ns() - t0) as f64 / calls as f64)
}

/// Runs `python amqp_peer.py contended URL N SECS`; returns its JSON.
fn peer_contended(cfg: &Config, python: &Path, url: &str, n: usize) -> Result<Value> {
    let script = cfg.peers.join("amqp_peer.py");
    let out = Command::new(python)
        .arg(&script)
        .args([
            "contended",
            url,
            &n.to_string(),
            &cfg.duration.as_secs_f64().to_string(),
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} contended failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{} printed no JSON: {e}", script.display()))?)
}

/// Runs benchmarks 15–17; returns the report section.
pub fn run(cfg: &Config, rec: &mut Recorder) -> Result<Outcome> {
    std::fs::create_dir_all(&cfg.dir)?;
    let server = match ServerGuard::from_env("BATON_TEST_AMQP") {
        Some(s) => s,
        None => ServerGuard::start(
            "BATON_TEST_AMQP",
            &cfg.server_script,
            cfg.dir.join("rabbitmq"),
            None,
        )?,
    };
    let run_id = random_suffix();
    let sep = if server.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}prefix=baton-bench-{run_id}", server.url);
    let python = cfg.python.as_deref().filter(|py| {
        Command::new(py)
            .args(["-c", "import pika"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if python.is_none() {
        eprintln!("  amqp: no Python with pika (bash bench/run.sh installs it): peer skipped");
    }
    let peer_script = cfg.peers.join("amqp_peer.py");

    // 15: in-process.
    let mut baton = BatonLock::open_url(&url, "bench/inproc", Wait::NoWait)?.with_ttl(TTL);
    baton.uncontended((cfg.ops / 10).max(10))?;
    let names = ["baton", "pika token message"];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); 2];
    for r in 0..cfg.rounds {
        for j in 0..2 {
            let which = (j + r) % 2;
            let ns = match (which, python) {
                (0, _) => baton.uncontended(cfg.ops)? as f64 / cfg.ops as f64,
                (1, Some(py)) => python_peer(
                    py,
                    &peer_script,
                    ["inproc", server.url.as_str(), &cfg.ops.to_string()],
                )?,
                _ => continue,
            };
            rec.write(
                "amqp_inproc",
                json!({"impl": names[which], "round": r, "ns_per_op": ns}),
            )?;
            samples[which].push(ns);
        }
    }
    drop(baton);
    let med: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    rec.write(
        "amqp_inproc_summary",
        json!({"baton_median_ns": med[0], "pika_median_ns": med[1], "peer_ran": python.is_some()}),
    )?;
    let peer_cell = |i: usize| {
        if samples[i].is_empty() {
            "not run (no pika)".to_owned()
        } else {
            fmt_ns(med[i])
        }
    };
    let mut md = format!(
        "### 19. RabbitMQ store: in-process acquire + release, uncontended\n\n\
         Broker: RabbitMQ on loopback (`scripts/server-rabbitmq`). {} rounds of {} ops, \
         alternating. **baton**: `Store::acquire` (`Wait::NoWait`, ttl 30 s) + \
         `Store::release` through the library: a connection of the lease's own, the gate \
         and slot queues, a confirmed holder record; release marks the record released and \
         closes the channel and connection (about 20 round trips in all). **pika token \
         message** (the 2014 blog design): `basic.get` of the one token message, \
         `basic.reject(requeue)` and a `basic.qos` round trip on one open connection — no \
         queue of waiters, no fencing token, no record of the holder.\n\n\
         | implementation | median per acquire + release | rounds |\n|---|---:|---|\n\
         | baton (RabbitMQ store) | {} | {} |\n\
         | pika token message | {} | {} |\n\n",
        cfg.rounds,
        cfg.ops,
        fmt_ns(med[0]),
        fmt_ns_list(&samples[0]),
        peer_cell(1),
        fmt_ns_list(&samples[1]),
    );

    // 16: per call.
    let key = format!("bench/cli-{run_id}");
    let baton_cmd = || {
        let mut c = Command::new(&cfg.baton);
        c.args(["run", "-s", &url, "-k", &key, "--", "true"]);
        c
    };
    per_call(2, baton_cmd)?;
    let mut calls = Vec::new();
    for r in 0..cfg.rounds {
        let ns = per_call(cfg.calls, baton_cmd)?;
        rec.write(
            "amqp_cli",
            json!({"impl": "baton run", "round": r, "calls": cfg.calls, "ns_per_call": ns}),
        )?;
        calls.push(ns);
    }
    md.push_str(&format!(
        "### 20. RabbitMQ store: one locked command per call\n\n\
         `baton run -s amqp://… -k K -- true`, {} rounds of {} calls: median **{}** per \
         call (rounds: {}).\n\n",
        cfg.rounds,
        cfg.calls,
        fmt_ns(median(&calls)),
        fmt_ns_list(&calls),
    ));

    // 17: contended.
    md.push_str(&format!(
        "### 21. RabbitMQ store: contended throughput\n\n\
         N clients on one mutex for {:.1} s each, the hold empty. **baton**: N store handles \
         in one process, acquire (`Wait::Forever`) + release in a loop, checked for \
         overlapping holds and tokens out of order (`contended.rs`). **pika token \
         message**: N forked processes, each consuming the token (prefetch 1) and rejecting \
         it back at once; their grant..release intervals are merged and checked for \
         overlap. The broker hands a returned token to any consumer with room (round robin), \
         so a releaser can get it straight back.\n\n\
         | N | implementation | acquisitions/s | p50 wait | p99 wait | fairness (Jain) | violations |\n\
         |---:|---|---:|---:|---:|---:|---:|\n",
        cfg.duration.as_secs_f64(),
    ));
    let mut violations = 0;
    for &n in &cfg.clients {
        let key = Key::new(format!("bench/contended-{n}-{}", random_suffix()))?;
        let c = contended::baton(&url, n, key, TTL, cfg.duration, Warm::Cycle)?;
        rec.write(
            "amqp_contended",
            json!({"impl": "baton", "clients": n, "acquisitions": c.total, "seconds": c.seconds,
                   "per_s": c.per_s(), "wait_p50_ns": c.p50, "wait_p99_ns": c.p99,
                   "jain": c.jain, "violations": c.violations}),
        )?;
        eprintln!(
            "  amqp contended N={n}: baton {:.0}/s Jain {:.3}",
            c.per_s(),
            c.jain
        );
        violations += c.violations;
        md.push_str(&format!(
            "| {n} | baton | {:.0} | {} | {} | {:.3} | {} |\n",
            c.per_s(),
            fmt_ns(c.p50 as f64),
            fmt_ns(c.p99 as f64),
            c.jain,
            c.violations
        ));
        if let Some(py) = python {
            let v = peer_contended(cfg, py, &server.url, n)?;
            rec.write("amqp_contended", v.clone())?;
            let pv = v["violations"].as_u64().unwrap_or(0);
            violations += pv as usize;
            md.push_str(&format!(
                "| {n} | pika token message | {:.0} | {} | {} | {:.3} | {pv} |\n",
                v["per_s"].as_f64().unwrap_or(0.0),
                fmt_ns(v["wait_p50_ns"].as_f64().unwrap_or(0.0)),
                fmt_ns(v["wait_p99_ns"].as_f64().unwrap_or(0.0)),
                v["jain"].as_f64().unwrap_or(0.0),
            ));
        }
    }
    md.push('\n');
    Ok(Outcome {
        markdown: md,
        violations,
    })
}
