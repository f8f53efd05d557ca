//! Benchmarks 12–14: baton's Redis store (`redis://…`) against what Redis users run
//! without it, on one server with `appendonly yes` + `appendfsync always` (what the store
//! requires: every acknowledged write is on the server's disk first).
//!
//! - 12, in-process, uncontended: `acquire` (`NoWait`, ttl 30 s) + `release` through the
//!   library, against redis-py's `Lock` and python-redis-lock's `Lock`
//!   (`bench/peers/redis_peer.py`). Rounds alternate; medians and ratios. Beside them, the
//!   floor: raw round trips (`PING`, a read-only `EVALSHA`, an `EVALSHA` that writes) timed
//!   from this process on one TCP connection, and redis-py's `PING`.
//! - 13, per call: `baton run -s redis://… -k K -- true` against a redis-py one-shot (a
//!   fresh `python -c` that connects, takes a `Lock`, runs `true`, releases).
//! - 14, contended: N clients (8 and 32) on one key for a fixed time. baton: each client
//!   its own store handle, `Wait::Forever` + release, mutual exclusion checked as for etcd
//!   (`contended.rs`). The Python peers: N forked processes, each its own connection,
//!   blocking acquire + release, their grant..release intervals merged and checked for
//!   overlap too. Beside acquisitions/s, hand-offs/s: grants whose client is not the
//!   previous grant's, in grant order.
//!
//! The server is `BATON_TEST_REDIS`, or one started for the run with `scripts/server-redis`
//! (and stopped after it).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
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

/// The Python peers, as `redis_peer.py` names them, and as the report does.
const PEERS: [(&str, &str); 2] = [
    ("redis-py", "redis-py `Lock`"),
    ("redis-lock", "python-redis-lock `Lock`"),
];

/// Settings for the Redis benchmarks.
pub struct Config {
    /// Rounds of each implementation, alternating (in-process and per call).
    pub rounds: usize,
    /// acquire + release pairs per round (baton in-process).
    pub ops: u64,
    /// acquire + release pairs per round of a Python peer.
    pub peer_ops: u64,
    /// Round trips per round of the floor measurements.
    pub floor_ops: u64,
    /// Calls per round of `baton run` and the redis-py one-shot.
    pub calls: usize,
    /// Client counts of the contended benchmark.
    pub clients: Vec<usize>,
    /// How long each contended round runs.
    pub duration: Duration,
    /// The `baton` binary.
    pub baton: PathBuf,
    /// A Python with redis and python-redis-lock (`None` or missing modules: the peers are
    /// skipped, and the report says so).
    pub python: Option<PathBuf>,
    /// The directory of the Python peers.
    pub peers: PathBuf,
    /// `scripts/server-redis`, to start a server when `BATON_TEST_REDIS` is unset.
    pub server_script: PathBuf,
    /// A directory for a server this run starts.
    pub dir: PathBuf,
}

/// The report section and how many violations of mutual exclusion were seen.
pub struct Outcome {
    /// The Markdown section.
    pub markdown: String,
    /// Violations (overlapping holds, tokens out of order, a holder finding another inside).
    pub violations: usize,
}

/// The server `BATON_TEST_REDIS` names, or one started for the run.
fn server(cfg: &Config) -> Result<ServerGuard> {
    if let Some(server) = ServerGuard::from_env("BATON_TEST_REDIS") {
        return Ok(server);
    }
    ServerGuard::start(
        "BATON_TEST_REDIS",
        &cfg.server_script,
        cfg.dir.join("redis"),
        None,
    )
}

/// The server's `host` and `port` (the URL's authority, without a user or password).
fn endpoint(url: &str) -> Result<(String, u16)> {
    let rest = url
        .strip_prefix("redis://")
        .ok_or_else(|| format!("not a redis:// URL: {url}"))?;
    let auth = rest.split(['/', '?']).next().unwrap_or(rest);
    let hostport = auth.rsplit_once('@').map_or(auth, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| format!("bad port in {url}"))?),
        None => (hostport, 6379),
    };
    Ok((host.to_owned(), port))
}

/// The store URL with a key prefix of this run's own.
fn store_url(server: &ServerGuard, run: &str) -> String {
    let sep = if server.url.contains('?') { '&' } else { '?' };
    format!("{}{sep}prefix=baton-bench-{run}", server.url)
}

/// One raw RESP connection, for the floor: a command written, one one-line reply read.
struct Raw {
    w: TcpStream,
    r: BufReader<TcpStream>,
    line: Vec<u8>,
}

impl Raw {
    fn connect(host: &str, port: u16) -> Result<Raw> {
        let w = TcpStream::connect((host, port))?;
        w.set_nodelay(true)?;
        let r = BufReader::new(w.try_clone()?);
        Ok(Raw {
            w,
            r,
            line: Vec::new(),
        })
    }

    /// Sends `args` as one RESP command; returns the reply's one line (simple, error,
    /// integer or bulk-string header).
    fn call(&mut self, args: &[&str]) -> Result<String> {
        let mut buf = format!("*{}\r\n", args.len());
        for a in args {
            buf.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        self.w.write_all(buf.as_bytes())?;
        self.line.clear();
        self.r.read_until(b'\n', &mut self.line)?;
        let line = String::from_utf8_lossy(&self.line).trim_end().to_owned();
        if line.starts_with('-') {
            return Err(format!("Redis answered {line} to {}", args[0]).into());
        }
        if let Some(n) = line.strip_prefix('$') {
            // A bulk string: read its body (and CRLF) too.
            if let Ok(n) = n.parse::<usize>() {
                let mut body = vec![0u8; n + 2];
                std::io::Read::read_exact(&mut self.r, &mut body)?;
                return Ok(String::from_utf8_lossy(&body[..n]).into_owned());
            }
        }
        Ok(line)
    }

    /// Script calls (`EVAL` + `EVALSHA`) and the server's µs spent in them, so far.
    fn script_stats(&mut self) -> Result<(u64, u64)> {
        let info = self.call(&["INFO", "commandstats"])?;
        let (mut calls, mut usec) = (0, 0);
        for line in info.lines() {
            let Some(rest) = line
                .strip_prefix("cmdstat_evalsha:")
                .or_else(|| line.strip_prefix("cmdstat_eval:"))
            else {
                continue;
            };
            for field in rest.trim().split(',') {
                match field.split_once('=') {
                    Some(("calls", v)) => calls += v.parse::<u64>().unwrap_or(0),
                    Some(("usec", v)) => usec += v.parse::<u64>().unwrap_or(0),
                    _ => {}
                }
            }
        }
        Ok((calls, usec))
    }

    /// `ops` calls of `args`; returns ns per round trip.
    fn time(&mut self, args: &[&str], ops: u64) -> Result<f64> {
        for _ in 0..ops.min(100) {
            self.call(args)?;
        }
        let t0 = now_ns();
        for _ in 0..ops {
            self.call(args)?;
        }
        Ok((now_ns() - t0) as f64 / ops as f64)
    }
}

/// The server's µs per call of the one-`INCR` script, in ns (`INFO commandstats` around 200
/// calls).
fn write_script_ns(raw: &mut Raw, sha: &str, key: &str) -> Result<f64> {
    let (c0, u0) = raw.script_stats()?;
    for _ in 0..200 {
        raw.call(&["EVALSHA", sha, "1", key])?;
    }
    let (c1, u1) = raw.script_stats()?;
    Ok((u1 - u0) as f64 * 1000.0 / (c1 - c0).max(1) as f64)
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

/// Runs `python redis_peer.py contended IMPL HOST PORT N SECS`; returns its JSON.
fn peer_contended(
    cfg: &Config,
    python: &Path,
    imp: &str,
    host: &str,
    port: u16,
    n: usize,
) -> Result<Value> {
    let script = cfg.peers.join("redis_peer.py");
    let out = Command::new(python)
        .arg(&script)
        .args([
            "contended",
            imp,
            host,
            &port.to_string(),
            &n.to_string(),
            &cfg.duration.as_secs_f64().to_string(),
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} contended {imp} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{} printed no JSON: {e}", script.display()))?)
}

/// The file system a directory is on, for the report (the server's fsyncs land there).
fn data_fs(cfg: &Config, external: bool) -> String {
    if external {
        "unknown (the server named by `BATON_TEST_REDIS`)".into()
    } else {
        format!(
            "**{}** (`{}`)",
            crate::util::fs_type(&cfg.dir),
            cfg.dir.join("redis").display()
        )
    }
}

/// Runs benchmarks 12–14; returns the report section.
pub fn run(cfg: &Config, rec: &mut Recorder) -> Result<Outcome> {
    std::fs::create_dir_all(&cfg.dir)?;
    let external = ServerGuard::from_env("BATON_TEST_REDIS").is_some();
    let server = server(cfg)?;
    let run_id = random_suffix();
    let url = store_url(&server, &run_id);
    let (host, port) = endpoint(&server.url)?;
    let port_s = port.to_string();
    let version = crate::util::command_output("redis-server", &["--version"])
        .split_whitespace()
        .find_map(|w| w.strip_prefix("v=").map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    let fs = data_fs(cfg, external);

    let python = cfg.python.as_deref().filter(|py| {
        Command::new(py)
            .args(["-c", "import redis, redis_lock"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if python.is_none() {
        eprintln!(
            "  redis: no Python with redis and python-redis-lock (bash bench/run.sh installs \
             them): peers skipped"
        );
    }

    // 12: in-process, with the floor in the same rounds.
    let mut baton = BatonLock::open_url(&url, "bench/inproc", Wait::NoWait)?.with_ttl(TTL);
    baton.uncontended((cfg.ops / 10).max(10))?;
    let mut raw = Raw::connect(&host, port)?;
    let read_sha = raw.call(&["SCRIPT", "LOAD", "return 1"])?;
    let write_sha = raw.call(&["SCRIPT", "LOAD", "return redis.call('INCR', KEYS[1])"])?;
    let floor_key = format!("baton-bench-{run_id}:floor");
    let names = [
        "baton",
        PEERS[0].0,
        PEERS[1].0,
        "raw PING",
        "raw EVALSHA (read-only)",
        "raw EVALSHA (INCR)",
        "redis-py PING",
    ];
    let k = names.len();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); k];
    // The server's own time in baton's scripts (INFO commandstats around baton's rounds;
    // nothing else runs scripts then).
    let (mut script_calls, mut script_usec) = (0u64, 0u64);
    for r in 0..cfg.rounds {
        for j in 0..k {
            let which = (j + r) % k;
            let ns = match (which, python) {
                (0, _) => {
                    let (c0, u0) = raw.script_stats()?;
                    let ns = baton.uncontended(cfg.ops)? as f64 / cfg.ops as f64;
                    let (c1, u1) = raw.script_stats()?;
                    // The INFO call itself is not a script.
                    script_calls += c1 - c0;
                    script_usec += u1 - u0;
                    ns
                }
                (1 | 2, Some(py)) => python_peer(
                    py,
                    &cfg.peers.join("redis_peer.py"),
                    [
                        "inproc",
                        names[which],
                        &host,
                        &port_s,
                        &cfg.peer_ops.to_string(),
                    ],
                )?,
                (3, _) => raw.time(&["PING"], cfg.floor_ops)?,
                (4, _) => raw.time(&["EVALSHA", &read_sha, "0"], cfg.floor_ops)?,
                (5, _) => raw.time(&["EVALSHA", &write_sha, "1", &floor_key], cfg.floor_ops)?,
                (6, Some(py)) => python_peer(
                    py,
                    &cfg.peers.join("redis_peer.py"),
                    ["ping", host.as_str(), &port_s, &cfg.floor_ops.to_string()],
                )?,
                _ => continue,
            };
            rec.write(
                "redis_inproc",
                json!({"impl": names[which], "round": r, "ns_per_op": ns}),
            )?;
            samples[which].push(ns);
        }
    }
    drop(baton);
    let med: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    let b = med[0];
    let py_ratio = med[1] / b;
    let lock_ratio = med[2] / b;
    let floor2 = 2.0 * med[5];
    let scripts_per_op = script_calls as f64 / (cfg.ops * cfg.rounds as u64) as f64;
    let server_ns_per_op = script_usec as f64 * 1000.0 / (cfg.ops * cfg.rounds as u64) as f64;
    let peer_met = py_ratio >= 2.0;
    rec.write(
        "redis_inproc_summary",
        json!({"baton_median_ns": b, "redis_py_median_ns": med[1],
               "redis_lock_median_ns": med[2], "raw_ping_median_ns": med[3],
               "raw_evalsha_read_median_ns": med[4], "raw_evalsha_write_median_ns": med[5],
               "redis_py_ping_median_ns": med[6],
               "baton_scripts_per_op": scripts_per_op, "baton_server_ns_per_op": server_ns_per_op,
               "redis_py_over_baton": py_ratio, "redis_lock_over_baton": lock_ratio,
               "target_speedup": 2.0, "speedup_met": peer_met, "peer_ran": python.is_some()}),
    )?;
    eprintln!(
        "  redis: baton {} redis-py {} redis-lock {} (floor: 2 writing EVALSHA {})",
        fmt_ns(b),
        fmt_ns(med[1]),
        fmt_ns(med[2]),
        fmt_ns(floor2)
    );
    let not_run = |i: usize| {
        if samples[i].is_empty() {
            "not run (no redis-py)".to_owned()
        } else {
            fmt_ns(med[i])
        }
    };
    let mut md = format!(
        "### 12. Redis store: in-process acquire + release, uncontended\n\n\
         Server: redis-server {version} on loopback (`appendonly yes`, `appendfsync always`: \
         each write is fsynced before the answer), its data on {fs}. {} rounds, alternating; \
         baton {} ops a round, the Python peers {}, the floor rows {} round trips. \
         **baton**: `Store::acquire` (`Wait::NoWait`, ttl 30 s) + `Store::release` on \
         `redis://…` through the library (a current-thread runtime): one Lua script per \
         operation, both of which write (the grant's slot record, holders set and `INCR`ed \
         token; the release's deletions). **redis-py `Lock`** (`redis.lock.Lock`, timeout \
         30 s, `acquire(blocking=False)` + `release()`): `SET NX PX`, then a \
         compare-and-delete script — two writes, no queue, no fencing token. \
         **python-redis-lock** (`redis_lock.Lock`, expire 30 s): a `GET` (is it held by this \
         object already?), `SET NX EX`, and a release script that deletes the key and pushes \
         a signal list — three round trips, two of them writes. The floor rows time single \
         round trips on one connection from this process (hand-written RESP, no client \
         library): a correct acquire + release needs at least two writing round trips.\n\n\
         | implementation | median per acquire + release (floor rows: per round trip) | rounds |\n\
         |---|---:|---|\n\
         | baton (Redis store) | {} | {} |\n\
         | {} | {} | {} |\n\
         | {} | {} | {} |\n\
         | floor: raw `PING` round trip | {} | {} |\n\
         | floor: raw `EVALSHA` of `return 1` (no write) | {} | {} |\n\
         | floor: raw `EVALSHA` of `INCR` (one fsynced write) | {} | {} |\n\
         | floor: redis-py `PING` round trip | {} | {} |\n\n",
        cfg.rounds,
        cfg.ops,
        cfg.peer_ops,
        cfg.floor_ops,
        fmt_ns(b),
        fmt_ns_list(&samples[0]),
        PEERS[0].1,
        not_run(1),
        fmt_ns_list(&samples[1]),
        PEERS[1].1,
        not_run(2),
        fmt_ns_list(&samples[2]),
        fmt_ns(med[3]),
        fmt_ns_list(&samples[3]),
        fmt_ns(med[4]),
        fmt_ns_list(&samples[4]),
        fmt_ns(med[5]),
        fmt_ns_list(&samples[5]),
        not_run(6),
        fmt_ns_list(&samples[6]),
    );
    if python.is_some() {
        md.push_str(&format!(
            "redis-py / baton: **{py_ratio:.2}×** (target ≥ 2× faster: **{}**); \
             python-redis-lock / baton: {lock_ratio:.2}×. baton / its floor (two writing \
             round trips, {}): {:.2}×. The server's own time in baton's scripts (`INFO \
             commandstats` around baton's rounds): {scripts_per_op:.2} scripts and {} of Lua \
             per acquire + release, beside {} for the `INCR` script's two calls.\n\n",
            if peer_met { "met" } else { "missed" },
            fmt_ns(floor2),
            b / floor2,
            fmt_ns(server_ns_per_op),
            fmt_ns(2.0 * write_script_ns(&mut raw, &write_sha, &floor_key)?),
        ));
    }

    let _ = raw.call(&["DEL", &floor_key]);
    drop(raw);

    // 13: per call, fresh processes.
    let key = format!("bench/cli-{run_id}");
    let py_key = format!("baton-bench-oneshot-{run_id}");
    let oneshot = format!(
        "import redis, subprocess\n\
         c = redis.Redis(host={host:?}, port={port}, db=0)\n\
         l = c.lock({py_key:?}, timeout=30)\n\
         assert l.acquire(blocking=True)\n\
         subprocess.run(['true'], check=True)\n\
         l.release()\n"
    );
    let dir_store = format!("dir:{}", cfg.dir.join("cli-dir").display());
    let dir_cmd = || {
        let mut c = Command::new(&cfg.baton);
        c.args(["run", "-s", &dir_store, "-k", &key, "--", "true"]);
        c
    };
    let baton_cmd = || {
        let mut c = Command::new(&cfg.baton);
        c.args(["run", "-s", &url, "-k", &key, "--", "true"]);
        c
    };
    let py_cmd = || {
        let mut c = Command::new(python.unwrap_or(Path::new("python3")));
        c.args(["-c", &oneshot]);
        c
    };
    let cli_names = [
        "baton run",
        "redis-py one-shot",
        "baton run (dir store)",
        "python -c pass",
    ];
    let bare_cmd = || {
        let mut c = Command::new(python.unwrap_or(Path::new("python3")));
        c.args(["-c", "pass"]);
        c
    };
    let mut calls: [Vec<f64>; 4] = Default::default();
    per_call(2, baton_cmd)?;
    per_call(2, dir_cmd)?;
    if python.is_some() {
        per_call(2, py_cmd)?;
    }
    for r in 0..cfg.rounds {
        for j in 0..4 {
            let which = (j + r) % 4;
            let ns = match (which, python) {
                (0, _) => per_call(cfg.calls, baton_cmd)?,
                (1, Some(_)) => per_call(cfg.calls, py_cmd)?,
                (2, _) => per_call(cfg.calls, dir_cmd)?,
                (3, Some(_)) => per_call(cfg.calls, bare_cmd)?,
                _ => continue,
            };
            rec.write(
                "redis_cli",
                json!({"impl": cli_names[which], "round": r, "calls": cfg.calls,
                       "ns_per_call": ns}),
            )?;
            calls[which].push(ns);
        }
    }
    let cm: Vec<f64> = calls.iter().map(|s| median(s)).collect();
    let cli_ratio = cm[0] / cm[1];
    let cli_met = python.is_some() && cli_ratio <= 0.3;
    rec.write(
        "redis_cli_summary",
        json!({"baton_median_ns": cm[0], "redis_py_oneshot_median_ns": cm[1],
               "baton_dir_median_ns": cm[2], "python_bare_median_ns": cm[3],
               "baton_over_redis_py": cli_ratio, "target": 0.3, "met": cli_met}),
    )?;
    md.push_str(&format!(
        "### 13. Redis store: one locked command per call\n\n\
         `baton run -s redis://… -k K -- true` against a redis-py one-shot: a fresh \
         `python -c` that imports redis, connects, takes a `Lock` (timeout 30 s, blocking), \
         runs `true` (`subprocess.run`) and releases. {} rounds of {} calls, alternating.\n\n\
         | command | median per call | rounds |\n|---|---:|---|\n\
         | `baton run … -- true` | {} | {} |\n\
         | redis-py one-shot | {} | {} |\n\
         | reference: `baton run -s dir:… -- true` (no network store) | {} | {} |\n\
         | reference: `python -c pass` (the interpreter alone) | {} | {} |\n\n",
        cfg.rounds,
        cfg.calls,
        fmt_ns(cm[0]),
        fmt_ns_list(&calls[0]),
        if python.is_some() {
            fmt_ns(cm[1])
        } else {
            "not run (no redis-py)".into()
        },
        fmt_ns_list(&calls[1]),
        fmt_ns(cm[2]),
        fmt_ns_list(&calls[2]),
        fmt_ns(cm[3]),
        fmt_ns_list(&calls[3]),
    ));
    if python.is_some() {
        md.push_str(&format!(
            "baton / redis-py: **{cli_ratio:.2}×** the time (target ≤ 0.3×: **{}**). Of \
             baton's {}, {} is the CLI itself (start-up, holder record, keeper, child), as \
             the dir-store row shows; the Redis part (connect, server checks, two scripts) \
             is {}.\n\n",
            if cli_met { "met" } else { "missed" },
            fmt_ns(cm[0]),
            fmt_ns(cm[2]),
            fmt_ns(cm[0] - cm[2]),
        ));
    }

    // 14: contended.
    md.push_str(&format!(
        "### 14. Redis store: contended throughput\n\n\
         N clients on one key for {:.1} s each, the hold empty. **baton**: N store handles in \
         one process (each its own connections), acquire (`Wait::Forever`) + release in a \
         loop; checked: a counter each holder bumps on entry (must have been 0), \
         grant..release intervals that must not overlap, tokens rising in grant order. \
         **The Python peers**: N forked processes (`bench/peers/redis_peer.py contended`), \
         each its own connection, blocking `acquire()` + `release()` in a loop; their \
         grant..release intervals (`CLOCK_MONOTONIC`) are merged and checked for overlap. \
         redis-py's blocking acquire polls `SET NX` every 0.1 s; python-redis-lock waits in \
         `BLPOP` on a signal list its release pushes to. Neither queues: a releaser may take \
         the lock straight back. **hand-offs/s** counts the grants (merged in grant order) \
         whose client is not the previous grant's: a lock that lets its releaser take it \
         straight back has many acquisitions and few hand-offs.\n\n\
         | N | implementation | acquisitions/s | hand-offs/s | p50 wait | p99 wait | fairness (Jain) | violations |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
        cfg.duration.as_secs_f64(),
    ));
    let mut violations = 0;
    let mut verdicts = Vec::new();
    for &n in &cfg.clients {
        let key = Key::new(format!("bench/contended-{n}-{}", random_suffix()))?;
        let c = contended::baton(&url, n, key, TTL, cfg.duration, Warm::Cycle)?;
        rec.write(
            "redis_contended",
            json!({"impl": "baton", "clients": n, "acquisitions": c.total, "seconds": c.seconds,
                   "per_s": c.per_s(), "handoffs": c.handoffs,
                   "handoffs_per_s": c.handoffs_per_s(), "wait_p50_ns": c.p50, "wait_p99_ns": c.p99,
                   "jain": c.jain, "violations": c.violations}),
        )?;
        eprintln!(
            "  redis contended N={n}: baton {:.0}/s ({:.0} hand-offs/s) p50 {} Jain {:.3}",
            c.per_s(),
            c.handoffs_per_s(),
            fmt_ns(c.p50 as f64),
            c.jain
        );
        violations += c.violations;
        md.push_str(&format!(
            "| {n} | baton | {:.0} | {:.0} | {} | {} | {:.3} | {} |\n",
            c.per_s(),
            c.handoffs_per_s(),
            fmt_ns(c.p50 as f64),
            fmt_ns(c.p99 as f64),
            c.jain,
            c.violations
        ));
        let mut py_rate = None;
        if let Some(py) = python {
            for (imp, label) in PEERS {
                let v = peer_contended(cfg, py, imp, &host, port, n)?;
                let mut v2 = v.clone();
                if let Some(o) = v2.as_object_mut() {
                    o.remove("counts");
                }
                rec.write("redis_contended", v2)?;
                let per_s = v["per_s"].as_f64().unwrap_or(0.0);
                let handoffs_s = v["handoffs_per_s"].as_f64().unwrap_or(0.0);
                let pv = v["violations"].as_u64().unwrap_or(0);
                eprintln!(
                    "  redis contended N={n}: {imp} {per_s:.0}/s ({handoffs_s:.0} hand-offs/s) Jain {:.3}",
                    v["jain"].as_f64().unwrap_or(0.0)
                );
                md.push_str(&format!(
                    "| {n} | {label} | {per_s:.0} | {handoffs_s:.0} | {} | {} | {:.3} | {pv} |\n",
                    fmt_ns(v["wait_p50_ns"].as_f64().unwrap_or(0.0)),
                    fmt_ns(v["wait_p99_ns"].as_f64().unwrap_or(0.0)),
                    v["jain"].as_f64().unwrap_or(0.0),
                ));
                if imp == "redis-py" {
                    py_rate = Some((per_s, handoffs_s));
                }
            }
        }
        verdicts.push((n, c.per_s(), c.handoffs_per_s(), py_rate, c.jain));
    }
    md.push('\n');
    for (n, rate, handoffs, py_rate, jain) in verdicts {
        let tput = py_rate.map(|(p, _)| rate / p);
        let handoff_ratio = py_rate.and_then(|(_, h)| (h > 0.0).then(|| handoffs / h));
        rec.write(
            "redis_contended_summary",
            json!({"clients": n, "baton_per_s": rate, "redis_py_per_s": py_rate.map(|p| p.0),
                   "baton_handoffs_per_s": handoffs,
                   "redis_py_handoffs_per_s": py_rate.map(|p| p.1),
                   "baton_over_redis_py": tput,
                   "baton_over_redis_py_handoffs": handoff_ratio, "target_throughput": 10.0,
                   "throughput_met": tput.map(|t| t >= 10.0), "jain": jain,
                   "target_jain": 0.99, "jain_met": jain >= 0.99}),
        )?;
        md.push_str(&format!(
            "N = {n}: baton / redis-py throughput **{}** (target ≥ 10×: **{}**); hand-offs/s \
             {}; baton's Jain {jain:.3} (target ≥ 0.99: **{}**).\n",
            tput.map_or("—".into(), |t| format!("{t:.1}×")),
            match tput {
                Some(t) if t >= 10.0 => "met",
                Some(_) => "missed",
                None => "not run",
            },
            handoff_ratio.map_or("—".into(), |t| format!("{t:.1}×")),
            if jain >= 0.99 { "met" } else { "missed" },
        ));
    }
    md.push('\n');
    Ok(Outcome {
        markdown: md,
        violations,
    })
}
