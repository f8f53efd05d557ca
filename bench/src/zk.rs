//! Benchmarks 15–18: baton's ZooKeeper store (`zk://…`) against kazoo, the Python client
//! ZooKeeper users run (lockex is a kazoo CLI), on one standalone server (tickTime 500 ms,
//! the transaction log fsynced before every answer: ZooKeeper's default).
//!
//! - 15, in-process, uncontended: `acquire` (`NoWait`, ttl 30 s) + `release` through the
//!   library, against kazoo's `Lock` (`acquire(blocking=False)` + `release()` on one
//!   connected client, `bench/peers/kazoo_peer.py`). Beside them, the floor: a raw
//!   ephemeral create + delete on one session through the `zookeeper-client` crate and
//!   through kazoo, and the crate's session open + create + delete + close (what a
//!   session per lease costs: baton's design until it shared one session per store handle
//!   and TTL).
//! - 16, per call: `baton run -s zk://… -k K -- true` against a kazoo one-shot doing what
//!   lockex does (a fresh `python -c`: connect, `Lock` acquire, run `true`, release, stop).
//! - 17, contended: N clients (8 and 32) on one key for a fixed time; baton N store
//!   handles, kazoo N forked processes each with its own session; throughput, waits,
//!   Jain's fairness index, violations of mutual exclusion (`contended.rs` for baton, the
//!   merged grant..release intervals for kazoo).
//! - 18, waiters: a holder and N waiters queued on one mutex (baton: one handle and session; kazoo: a process each); the
//!   holder releases and each waiter releases as soon as it is granted, so the queue
//!   drains through N hand-offs. Counted: the watch events that woke a waiter (baton: the
//!   store's hidden `wakeups()` counter; kazoo: its `Lock`'s predecessor-watch callback),
//!   which must be one per release; and for baton a semaphore of 4, where a release may
//!   wake at most 4.
//!
//! The server is `BATON_TEST_ZK`, or one started for the run with
//! `scripts/server-zookeeper` (and stopped after it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use baton::{AcquireRequest, Holder, Key, Released, Store, StoreUrl, Wait};
use serde_json::{json, Value};
use zookeeper_client as zk;

use crate::contended::{self, Warm};
use crate::locks::BatonLock;
use crate::record::Recorder;
use crate::server::ServerGuard;
use crate::util::{fmt_ns, fmt_ns_list, median, now_ns, python_peer, random_suffix, Result};

/// The lease time to live (the session timeout) every request carries.
const TTL: Duration = Duration::from_secs(30);

/// Settings for the ZooKeeper benchmarks.
pub struct Config {
    /// Rounds of each implementation, alternating (in-process and per call).
    pub rounds: usize,
    /// acquire + release pairs per round (baton in-process).
    pub ops: u64,
    /// acquire + release pairs per round of kazoo.
    pub peer_ops: u64,
    /// Round trips per round of the floor measurements.
    pub floor_ops: u64,
    /// Calls per round of `baton run` and the kazoo one-shot.
    pub calls: usize,
    /// Client counts of the contended benchmark.
    pub clients: Vec<usize>,
    /// How long each contended round runs.
    pub duration: Duration,
    /// Waiters queued on one mutex (benchmark 18).
    pub waiters: usize,
    /// The `baton` binary.
    pub baton: PathBuf,
    /// A Python with kazoo (`None` or no kazoo: the peer is skipped, and the report says so).
    pub python: Option<PathBuf>,
    /// The directory of the Python peers.
    pub peers: PathBuf,
    /// `scripts/server-zookeeper`, to start a server when `BATON_TEST_ZK` is unset.
    pub server_script: PathBuf,
    /// A directory for a server this run starts.
    pub dir: PathBuf,
}

/// The report section and how many violations of mutual exclusion were seen.
pub struct Outcome {
    /// The Markdown section.
    pub markdown: String,
    /// Violations (overlapping holds, tokens out of order, a holder finding another
    /// inside), and waiters that woke more than one per release.
    pub violations: usize,
}

/// The server `BATON_TEST_ZK` names, or one started for the run.
fn server(cfg: &Config) -> Result<ServerGuard> {
    if let Some(server) = ServerGuard::from_env("BATON_TEST_ZK") {
        return Ok(server);
    }
    ServerGuard::start(
        "BATON_TEST_ZK",
        &cfg.server_script,
        cfg.dir.join("zookeeper"),
        None,
    )
}

/// The URL's servers as ZooKeeper clients name them: `h1:p1,h2:p2`.
fn hosts(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("zk://")
        .ok_or_else(|| format!("not a zk:// URL: {url}"))?;
    Ok(rest.split(['/', '?']).next().unwrap_or(rest).to_owned())
}

/// `ops` ephemeral creates + deletes on one session of the `zookeeper-client` crate;
/// with `session`, each pair on a session of its own, opened and closed around it (what
/// a session per lease costs at the least). Returns ns per pair.
fn raw_floor(hosts: &str, base: &str, ops: u64, session: bool) -> Result<f64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let connect = || async {
            zk::Client::connector()
                .with_session_timeout(TTL)
                .connect(hosts)
                .await
        };
        let c = connect().await?;
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        match c.mkdir(base, &persistent).await {
            Ok(()) | Err(zk::Error::NodeExists) => {}
            Err(e) => return Err(e.into()),
        }
        let eph = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        let path = format!("{base}/n-");
        let pair = |c: zk::Client| {
            let path = path.clone();
            let eph = eph.clone();
            async move {
                let (_, seq) = c.create(&path, b"", &eph).await?;
                c.delete(&format!("{path}{seq}"), None).await?;
                Ok::<_, crate::util::Error>(())
            }
        };
        for _ in 0..ops.min(50) {
            pair(c.clone()).await?;
        }
        let t0 = now_ns();
        for _ in 0..ops {
            if session {
                let s = connect().await?;
                pair(s.clone()).await?;
                drop(s);
            } else {
                pair(c.clone()).await?;
            }
        }
        let ns = (now_ns() - t0) as f64 / ops as f64;
        let _ = c.delete(base, None).await;
        Ok(ns)
    })
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

/// Runs `python kazoo_peer.py ARGS…`; returns its JSON.
fn peer_json(cfg: &Config, python: &Path, args: &[&str]) -> Result<Value> {
    let script = cfg.peers.join("kazoo_peer.py");
    let out = Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed: {}",
            script.display(),
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{} printed no JSON: {e}", script.display()))?)
}

/// What a waiters round through baton measured.
struct Waiters {
    wakeups: u64,
    releases: u64,
    handoff_ns: f64,
}

/// Benchmark 18 through baton: `limit` holders and `n` waiters on one key, all on one
/// store handle (each acquire its own session); the holders release, each waiter releases
/// as soon as it is granted. Counts the store's watch wake-ups over the drain.
fn baton_waiters(url: &str, key: Key, limit: u32, n: usize) -> Result<Waiters> {
    let rt = contended::runtime()?;
    let store = Arc::new(baton_store_zk::ZkStore::open(&StoreUrl::parse(url)?)?);
    let mut req = AcquireRequest::new(key.clone(), Holder::current(vec!["baton-bench".into()]));
    req.limit = limit;
    req.ttl = Some(TTL);
    let out = rt.block_on(async {
        let mut hold = req.clone();
        hold.wait = Wait::NoWait;
        let mut holders = Vec::new();
        for _ in 0..limit {
            holders.push(store.acquire(&hold).await?);
        }
        let mut waiting = req.clone();
        waiting.wait = Wait::Forever;
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (s, r) = (Arc::clone(&store), waiting.clone());
            tasks.push(tokio::spawn(async move {
                let lease = s.acquire(&r).await?;
                let t = now_ns();
                if s.release(&lease).await? != Released::Released {
                    return Err::<u64, crate::util::Error>("a waiter's release: not held".into());
                }
                Ok(t)
            }));
        }
        // Every waiter is queued, then has had time to look and set its watches.
        let queued = async {
            loop {
                let st = store.inspect(&key).await?;
                if st.waiters == Some(n as u32) {
                    return Ok::<_, crate::util::Error>(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), queued)
            .await
            .map_err(|_| "the waiters did not queue within 120 s")??;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let w0 = store.wakeups();
        let t0 = now_ns();
        for h in &holders {
            store.release(h).await?;
        }
        let mut last = t0;
        for t in tasks {
            last = last.max(t.await??);
        }
        Ok::<_, crate::util::Error>(Waiters {
            wakeups: store.wakeups() - w0,
            releases: limit as u64 + n as u64,
            handoff_ns: (last - t0) as f64 / n as f64,
        })
    })?;
    rt.shutdown_background();
    Ok(out)
}

/// Runs benchmarks 15–18; returns the report section.
pub fn run(cfg: &Config, rec: &mut Recorder) -> Result<Outcome> {
    std::fs::create_dir_all(&cfg.dir)?;
    let external = ServerGuard::from_env("BATON_TEST_ZK").is_some();
    let server = server(cfg)?;
    let run_id = random_suffix();
    let base = server.url.trim_end_matches('/');
    let url = format!("{base}/baton-bench-{run_id}");
    let hosts = hosts(&server.url)?;
    let peer_path = format!("/baton-bench-kazoo-{run_id}");
    let fs = if external {
        "unknown (the server named by `BATON_TEST_ZK`)".to_owned()
    } else {
        format!(
            "**{}** (`{}`)",
            crate::util::fs_type(&cfg.dir),
            cfg.dir.join("zookeeper").display()
        )
    };
    let python = cfg.python.as_deref().filter(|py| {
        Command::new(py)
            .args(["-c", "import kazoo"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if python.is_none() {
        eprintln!("  zk: no Python with kazoo (bash bench/run.sh installs it): peer skipped");
    }
    let peer = |args: &[&str]| -> Result<Value> { peer_json(cfg, python.ok_or("no kazoo")?, args) };

    // 15: in-process, with the floor in the same rounds.
    let mut baton = BatonLock::open_url(&url, "bench/inproc", Wait::NoWait)?.with_ttl(TTL);
    baton.uncontended((cfg.ops / 10).max(5))?;
    let floor_base = format!("/baton-bench-floor-{run_id}");
    let names = [
        "baton",
        "kazoo",
        "raw create + delete (crate)",
        "raw session + create + delete + close (crate)",
        "kazoo create + delete",
    ];
    let k = names.len();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); k];
    let ops_s = cfg.peer_ops.to_string();
    let floor_s = cfg.floor_ops.to_string();
    for r in 0..cfg.rounds {
        for j in 0..k {
            let which = (j + r) % k;
            let ns = match (which, python) {
                (0, _) => baton.uncontended(cfg.ops)? as f64 / cfg.ops as f64,
                (1, Some(py)) => python_peer(
                    py,
                    &cfg.peers.join("kazoo_peer.py"),
                    ["inproc", &hosts, &peer_path, &ops_s],
                )?,
                (2, _) => raw_floor(&hosts, &floor_base, cfg.floor_ops, false)?,
                (3, _) => raw_floor(&hosts, &floor_base, (cfg.floor_ops / 2).max(5), true)?,
                (4, Some(py)) => python_peer(
                    py,
                    &cfg.peers.join("kazoo_peer.py"),
                    ["floor", &hosts, &peer_path, &floor_s],
                )?,
                _ => continue,
            };
            rec.write(
                "zk_inproc",
                json!({"impl": names[which], "round": r, "ns_per_op": ns}),
            )?;
            samples[which].push(ns);
        }
    }
    drop(baton);
    let med: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    let b = med[0];
    let kazoo_ratio = med[1] / b;
    let met = python.is_some() && kazoo_ratio >= 2.0;
    rec.write(
        "zk_inproc_summary",
        json!({"baton_median_ns": b, "kazoo_median_ns": med[1],
               "raw_create_delete_median_ns": med[2], "raw_session_create_delete_median_ns": med[3],
               "kazoo_create_delete_median_ns": med[4], "kazoo_over_baton": kazoo_ratio,
               "target_speedup": 2.0, "speedup_met": met, "peer_ran": python.is_some()}),
    )?;
    eprintln!(
        "  zk: baton {} kazoo {} (floor: create+delete {}, with a session {})",
        fmt_ns(b),
        fmt_ns(med[1]),
        fmt_ns(med[2]),
        fmt_ns(med[3])
    );
    let not_run = |s: &[f64], m: f64| {
        if s.is_empty() {
            "not run (no kazoo)".to_owned()
        } else {
            fmt_ns(m)
        }
    };
    let mut md = format!(
        "### 15. ZooKeeper store: in-process acquire + release, uncontended\n\n\
         Server: Debian's ZooKeeper standalone on loopback (`scripts/server-zookeeper`: \
         tickTime 500 ms, the transaction log fsynced before each answer), its data on {fs}. \
         {} rounds, alternating; baton {} ops a round, kazoo {}, the floor rows {} pairs \
         (the session row half that). **baton**: `Store::acquire` (`Wait::NoWait`, ttl 30 s) \
         + `Store::release` on `zk://…` through the library, in the handle's **one session \
         for the TTL** (opened by the first acquire, shared by every lease after it): the \
         key node read and its children checked, the request node created (ephemeral \
         sequential, `Create2` gives the czxid token), the key node read again and the \
         queue listed, the slot node created; the release reads and deletes the slot node \
         and deletes the request node (nine round trips, four of them logged writes). \
         **kazoo `Lock`** (`acquire(blocking=False)` + `release()`, one client connected \
         outside the loop): create the request node, list the children, delete it — one \
         session for every acquire, no slot, no token. The floor rows: an ephemeral create + \
         delete on one session (the least a lock needs), the same with a session opened and \
         closed around each pair (the least a session per lease needs, as baton's design \
         before this one had), and \
         kazoo's create + delete.\n\n\
         | implementation | median per acquire + release (floor rows: per pair) | rounds |\n\
         |---|---:|---|\n\
         | baton (ZooKeeper store) | {} | {} |\n\
         | kazoo `Lock` | {} | {} |\n\
         | floor: create + delete, one session (crate) | {} | {} |\n\
         | floor: session + create + delete + close (crate) | {} | {} |\n\
         | floor: kazoo create + delete | {} | {} |\n\n",
        cfg.rounds,
        cfg.ops,
        cfg.peer_ops,
        cfg.floor_ops,
        fmt_ns(b),
        fmt_ns_list(&samples[0]),
        not_run(&samples[1], med[1]),
        fmt_ns_list(&samples[1]),
        fmt_ns(med[2]),
        fmt_ns_list(&samples[2]),
        fmt_ns(med[3]),
        fmt_ns_list(&samples[3]),
        not_run(&samples[4], med[4]),
        fmt_ns_list(&samples[4]),
    );
    if python.is_some() {
        md.push_str(&format!(
            "kazoo / baton: **{kazoo_ratio:.2}×** (target ≥ 2× faster: **{}**). baton / its \
             floor, create + delete on one session ({}): {:.2}×; a session per lease would \
             cost at least {} a lease.\n\n",
            if met { "met" } else { "missed" },
            fmt_ns(med[2]),
            b / med[2],
            fmt_ns(med[3]),
        ));
    }

    // 16: per call, fresh processes.
    let key = format!("bench/cli-{run_id}");
    let oneshot = format!(
        "import subprocess\n\
         from kazoo.client import KazooClient\n\
         c = KazooClient(hosts={hosts:?})\n\
         c.start()\n\
         l = c.Lock({:?})\n\
         assert l.acquire(blocking=True)\n\
         subprocess.run(['true'], check=True)\n\
         l.release()\n\
         c.stop()\n\
         c.close()\n",
        format!("{peer_path}/oneshot")
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
    let py = python.unwrap_or(Path::new("python3"));
    let py_cmd = || {
        let mut c = Command::new(py);
        c.args(["-c", &oneshot]);
        c
    };
    let bare_cmd = || {
        let mut c = Command::new(py);
        c.args(["-c", "pass"]);
        c
    };
    let cli_names = [
        "baton run",
        "kazoo one-shot",
        "baton run (dir store)",
        "python -c pass",
    ];
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
                (3, _) => per_call(cfg.calls, bare_cmd)?,
                _ => continue,
            };
            rec.write(
                "zk_cli",
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
        "zk_cli_summary",
        json!({"baton_median_ns": cm[0], "kazoo_oneshot_median_ns": cm[1],
               "baton_dir_median_ns": cm[2], "python_bare_median_ns": cm[3],
               "baton_over_kazoo": cli_ratio, "target": 0.3, "met": cli_met}),
    )?;
    md.push_str(&format!(
        "### 16. ZooKeeper store: one locked command per call\n\n\
         `baton run -s zk://… -k K -- true` against a kazoo one-shot doing what lockex does: \
         a fresh `python -c` that imports kazoo, connects (`KazooClient.start()`), takes a \
         `Lock` (blocking), runs `true` (`subprocess.run`), releases and stops the client. \
         {} rounds of {} calls, alternating.\n\n\
         | command | median per call | rounds |\n|---|---:|---|\n\
         | `baton run … -- true` | {} | {} |\n\
         | kazoo one-shot | {} | {} |\n\
         | reference: `baton run -s dir:… -- true` (no network store) | {} | {} |\n\
         | reference: `python -c pass` (the interpreter alone) | {} | {} |\n\n",
        cfg.rounds,
        cfg.calls,
        fmt_ns(cm[0]),
        fmt_ns_list(&calls[0]),
        not_run(&calls[1], cm[1]),
        fmt_ns_list(&calls[1]),
        fmt_ns(cm[2]),
        fmt_ns_list(&calls[2]),
        fmt_ns(cm[3]),
        fmt_ns_list(&calls[3]),
    ));
    if python.is_some() {
        md.push_str(&format!(
            "baton / kazoo: **{cli_ratio:.2}×** the time (target ≤ 0.3×: **{}**). Of baton's \
             {}, {} is the CLI itself (start-up, holder record, keeper, child), as the \
             dir-store row shows; the ZooKeeper part (sessions, nodes) is {}.\n\n",
            if cli_met { "met" } else { "missed" },
            fmt_ns(cm[0]),
            fmt_ns(cm[2]),
            fmt_ns(cm[0] - cm[2]),
        ));
    }

    // 17: contended.
    md.push_str(&format!(
        "### 17. ZooKeeper store: contended throughput and fairness\n\n\
         N clients on one key for {:.1} s each, the hold empty. **baton**: N store handles \
         in one process, acquire (`Wait::Forever`, each handle its one session) + release in a loop; \
         checked: a counter each holder bumps on entry (must have been 0), grant..release \
         intervals that must not overlap, tokens rising in grant order. **kazoo**: N forked \
         processes (`bench/peers/kazoo_peer.py contended`), each its own session, blocking \
         `Lock.acquire()` + `release()` in a loop; their grant..release intervals \
         (`CLOCK_MONOTONIC`) merged and checked for overlap. Both queue FIFO by sequence \
         number.\n\n\
         | N | implementation | acquisitions/s | p50 wait | p99 wait | fairness (Jain) | violations |\n\
         |---:|---|---:|---:|---:|---:|---:|\n",
        cfg.duration.as_secs_f64(),
    ));
    let mut violations = 0;
    let mut verdicts = Vec::new();
    for &n in &cfg.clients {
        let key = Key::new(format!("bench/contended-{n}-{}", random_suffix()))?;
        let c = contended::baton(&url, n, key, TTL, cfg.duration, Warm::Cycle)?;
        rec.write(
            "zk_contended",
            json!({"impl": "baton", "clients": n, "acquisitions": c.total, "seconds": c.seconds,
                   "per_s": c.per_s(), "wait_p50_ns": c.p50, "wait_p99_ns": c.p99,
                   "jain": c.jain, "violations": c.violations}),
        )?;
        eprintln!(
            "  zk contended N={n}: baton {:.0}/s p50 {} Jain {:.3}",
            c.per_s(),
            fmt_ns(c.p50 as f64),
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
        let mut peer_rate = None;
        if python.is_some() {
            let v = peer(&[
                "contended",
                &hosts,
                &peer_path,
                &n.to_string(),
                &cfg.duration.as_secs_f64().to_string(),
            ])?;
            let mut v2 = v.clone();
            if let Some(o) = v2.as_object_mut() {
                o.remove("counts");
            }
            rec.write("zk_contended", v2)?;
            let per_s = v["per_s"].as_f64().unwrap_or(0.0);
            let pv = v["violations"].as_u64().unwrap_or(0);
            violations += pv as usize;
            eprintln!(
                "  zk contended N={n}: kazoo {per_s:.0}/s Jain {:.3}",
                v["jain"].as_f64().unwrap_or(0.0)
            );
            md.push_str(&format!(
                "| {n} | kazoo `Lock` | {per_s:.0} | {} | {} | {:.3} | {pv} |\n",
                fmt_ns(v["wait_p50_ns"].as_f64().unwrap_or(0.0)),
                fmt_ns(v["wait_p99_ns"].as_f64().unwrap_or(0.0)),
                v["jain"].as_f64().unwrap_or(0.0),
            ));
            peer_rate = Some(per_s);
        }
        verdicts.push((n, c.per_s(), peer_rate, c.jain, c.violations));
    }
    md.push('\n');
    for (n, rate, peer_rate, jain, v) in verdicts {
        let ratio = peer_rate.map(|p| rate / p);
        rec.write(
            "zk_contended_summary",
            json!({"clients": n, "baton_per_s": rate, "kazoo_per_s": peer_rate,
                   "baton_over_kazoo": ratio, "jain": jain, "violations": v}),
        )?;
        md.push_str(&format!(
            "N = {n}: baton / kazoo throughput **{}**; baton's Jain {jain:.3}; violations {v} \
             (target 0: **{}**).\n",
            ratio.map_or("—".into(), |t| format!("{t:.2}×")),
            if v == 0 { "met" } else { "missed" },
        ));
    }
    md.push('\n');

    // 18: N waiters.
    let n = cfg.waiters;
    md.push_str(&format!(
        "### 18. ZooKeeper store: {n} waiters on one key, wake-ups per release\n\n\
         A holder and {n} waiters queued behind it on one mutex (baton: {n} acquires on one \
         store handle, in its one session; kazoo: {n} forked processes, each its own \
         session). The holder \
         releases; each waiter releases as soon as it is granted, so the queue drains \
         through {n} hand-offs. Counted: the watch events that woke a waiting acquire \
         (baton: the store's hidden `ZkStore::wakeups()` counter; kazoo: calls of its \
         `Lock`'s predecessor-watch callback, summed over the processes). A herd would show \
         as many wake-ups per release; the recipe's promise is one (a semaphore: at most \
         `limit`). The semaphore row: 4 holders and {n} waiters on a key of limit 4.\n\n\
         | implementation | releases | wake-ups | wake-ups per waiter | drain time per hand-off |\n\
         |---|---:|---:|---:|---:|\n",
    ));
    let mut rows = Vec::new();
    for limit in [1u32, 4] {
        let key = Key::new(format!("bench/waiters-{limit}-{}", random_suffix()))?;
        let w = baton_waiters(&url, key, limit, n)?;
        let per = w.wakeups as f64 / n as f64;
        // Every waiter is woken at least once (its grant); more than `limit` per release
        // is a herd.
        if w.wakeups > w.releases * u64::from(limit) {
            violations += 1;
        }
        rec.write(
            "zk_waiters",
            json!({"impl": "baton", "limit": limit, "waiters": n, "releases": w.releases,
                   "wakeups": w.wakeups, "wakeups_per_waiter": per, "handoff_ns": w.handoff_ns}),
        )?;
        eprintln!(
            "  zk waiters N={n} limit {limit}: baton {} wake-ups for {} releases",
            w.wakeups, w.releases
        );
        rows.push(format!(
            "| baton, {} | {} | {} | {:.2} | {} |\n",
            if limit == 1 {
                "mutex".to_owned()
            } else {
                format!("semaphore of {limit}")
            },
            w.releases,
            w.wakeups,
            per,
            fmt_ns(w.handoff_ns)
        ));
    }
    if python.is_some() {
        let v = peer(&["waiters", &hosts, &peer_path, &n.to_string()])?;
        rec.write("zk_waiters", v.clone())?;
        let wk = v["wakeups"].as_u64().unwrap_or(0);
        let rel = v["releases"].as_u64().unwrap_or(0);
        eprintln!("  zk waiters N={n}: kazoo {wk} wake-ups for {rel} releases");
        rows.push(format!(
            "| kazoo `Lock`, mutex | {rel} | {wk} | {:.2} | {} |\n",
            wk as f64 / n as f64,
            fmt_ns(v["handoff_ns"].as_f64().unwrap_or(0.0))
        ));
    }
    for r in rows {
        md.push_str(&r);
    }
    md.push_str(
        "\nReleases count every holder's and every waiter's release; the last ones wake \
         nobody (no one is left behind them). Each waiter must be woken at least once (for \
         its grant): **1.00 wake-ups per waiter is herd-free**; a herd would be about N/2. \
         For the semaphore, a waiter watches the 4 nodes nearest ahead and may wake once \
         for each of them that goes before it is granted (at most 4 wake-ups per release).\n\n",
    );
    Ok(Outcome {
        markdown: md,
        violations,
    })
}
