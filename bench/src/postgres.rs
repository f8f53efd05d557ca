//! Benchmarks 7 and 8: baton's PostgreSQL store (`postgres://…`) against what people use
//! without it, on one server.
//!
//! - In-process, uncontended: `acquire` (`NoWait`, ttl 30 s) + `release` through the
//!   library, against a raw `pg_advisory_lock` + `pg_advisory_unlock` cycle on one
//!   connection (tokio-postgres, prepared statements), and against a psycopg lease-table
//!   lock written the way people hand-roll one (`bench/peers/pg_lease_peer.py`). Rounds
//!   alternate; medians and ratios.
//! - Contended: N clients (8 and 32), each with its own store handle and so its own
//!   connections, loop acquire (`Wait::Forever`) + release on one key for a fixed time;
//!   the same N clients with raw `pg_advisory_lock` on their own connections as a
//!   reference. Mutual exclusion is checked for real: a counter every holder bumps on
//!   entry (it must have been 0), grant..release intervals that must not overlap, and
//!   baton's tokens, which must rise in grant order.
//!
//! The server is `BATON_TEST_POSTGRES`, or one started for the run with
//! `scripts/server-postgres` (and stopped after it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use baton::{Key, Wait};
use serde_json::json;

use crate::contended::{self, Contended, Warm};
use crate::locks::BatonLock;
use crate::record::Recorder;
use crate::server::ServerGuard;
use crate::util::{fmt_ns, fmt_ns_list, median, now_ns, python_peer, random_suffix, Result};

/// The lease time to live every request carries.
const TTL: Duration = Duration::from_secs(30);
/// baton's tables for the benchmark live in their own schema.
const SCHEMA: &str = "baton_bench";

/// Settings for the PostgreSQL benchmarks.
pub struct Config {
    /// Rounds of each implementation, alternating (in-process).
    pub rounds: usize,
    /// acquire + release pairs per round (baton, raw advisory lock).
    pub ops: u64,
    /// acquire + release pairs per round of the Python peer.
    pub peer_ops: u64,
    /// Client counts of the contended benchmark.
    pub clients: Vec<usize>,
    /// How long each contended round runs.
    pub duration: Duration,
    /// Rounds of each implementation per client count (contended).
    pub contended_rounds: usize,
    /// A Python with psycopg installed.
    pub python: PathBuf,
    /// The directory of the Python peers.
    pub peers: PathBuf,
    /// `scripts/server-postgres`, to start a server when `BATON_TEST_POSTGRES` is unset.
    pub server_script: PathBuf,
    /// Where a server this run starts keeps its data (a directory on disk that the
    /// `postgres` OS user can reach, such as the system's temporary directory).
    pub dir: PathBuf,
}

/// The report section and how many violations of mutual exclusion were seen.
pub struct Outcome {
    /// The Markdown section.
    pub markdown: String,
    /// Violations (overlapping holds, tokens out of order, a holder finding another inside).
    pub violations: usize,
}

/// The server `BATON_TEST_POSTGRES` names, or one started for the run.
fn server(cfg: &Config) -> Result<ServerGuard> {
    if let Some(server) = ServerGuard::from_env("BATON_TEST_POSTGRES") {
        return Ok(server);
    }
    // On a disk, not the lock directory's tmpfs (commits are timed with their WAL
    // flush), and open to the `postgres` OS user the script runs the server as when
    // it runs as root.
    let tmp = tempfile::Builder::new()
        .prefix("baton-bench-pg.")
        .tempdir_in(&cfg.dir)?;
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let dir = tmp.path().join("postgres");
    ServerGuard::start("BATON_TEST_POSTGRES", &cfg.server_script, dir, Some(tmp))
}

fn store_url(base: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}schema={SCHEMA}")
}

/// The raw cycle: `pg_advisory_lock` + `pg_advisory_unlock` on one connection.
struct RawAdvisory {
    rt: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    lock: tokio_postgres::Statement,
    unlock: tokio_postgres::Statement,
    id: i64,
}

impl RawAdvisory {
    fn connect(url: &str, id: i64) -> Result<RawAdvisory> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (client, lock, unlock) = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let lock = client.prepare("SELECT pg_advisory_lock($1)::text").await?;
            let unlock = client.prepare("SELECT pg_advisory_unlock($1)").await?;
            Ok::<_, tokio_postgres::Error>((client, lock, unlock))
        })?;
        Ok(RawAdvisory {
            rt,
            client,
            lock,
            unlock,
            id,
        })
    }

    fn cycles(&self, ops: u64) -> Result<u64> {
        self.rt.block_on(async {
            let t0 = now_ns();
            for _ in 0..ops {
                self.client.query_one(&self.lock, &[&self.id]).await?;
                let r = self.client.query_one(&self.unlock, &[&self.id]).await?;
                if !r.get::<_, bool>(0) {
                    return Err("pg_advisory_unlock answered false".into());
                }
            }
            Ok(now_ns() - t0)
        })
    }
}

fn psycopg(cfg: &Config, url: &str, ops: u64) -> Result<f64> {
    let script = cfg.peers.join("pg_lease_peer.py");
    python_peer(&cfg.python, &script, [url, &ops.to_string()])
}

/// Runs benchmarks 7 and 8; returns the report section.
pub fn run(cfg: &Config, rec: &mut Recorder) -> Result<Outcome> {
    let server = server(cfg)?;
    let url = store_url(&server.url);
    let key = format!("bench/inproc-{}", random_suffix());
    let mut baton = BatonLock::open_url(&url, &key, Wait::NoWait)?.with_ttl(TTL);
    // A reference, not a configuration to run: the same store on sessions that do not
    // wait for the WAL flush at commit, to show what the grant's durable commit costs.
    let mut nosync = BatonLock::open_url(
        &format!("{url}&options=-c%20synchronous_commit%3Doff"),
        &format!("{key}-nosync"),
        Wait::NoWait,
    )?
    .with_ttl(TTL);
    let raw = RawAdvisory::connect(
        &server.url,
        0x6261_746f_6e00 + i64::from(std::process::id()),
    )?;
    let warm = (cfg.ops / 10).max(20);
    baton.uncontended(warm)?;
    nosync.uncontended(warm)?;
    raw.cycles(warm)?;
    let names = ["baton", "advisory", "psycopg-lease", "baton-no-flush"];
    let mut samples: [Vec<f64>; 4] = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for r in 0..cfg.rounds {
        for j in 0..4 {
            let which = (j + r) % 4;
            let (ns, ops) = match which {
                0 => (baton.uncontended(cfg.ops)? as f64 / cfg.ops as f64, cfg.ops),
                1 => (raw.cycles(cfg.ops)? as f64 / cfg.ops as f64, cfg.ops),
                2 => (psycopg(cfg, &server.url, cfg.peer_ops)?, cfg.peer_ops),
                _ => (
                    nosync.uncontended(cfg.ops)? as f64 / cfg.ops as f64,
                    cfg.ops,
                ),
            };
            rec.write(
                "postgres_inproc",
                json!({"impl": names[which], "round": r, "ops": ops, "ns_per_op": ns}),
            )?;
            samples[which].push(ns);
        }
    }
    drop(baton);
    drop(nosync);
    let b = median(&samples[0]);
    let a = median(&samples[1]);
    let p = median(&samples[2]);
    let nf = median(&samples[3]);
    let rate_ratio = a / b;
    let peer_ratio = p / b;
    let rate_met = rate_ratio >= 0.5;
    let peer_met = peer_ratio >= 2.0;
    rec.write(
        "postgres_inproc_summary",
        json!({"baton_median_ns": b, "advisory_median_ns": a, "psycopg_median_ns": p,
               "baton_no_flush_median_ns": nf,
               "baton_rate_vs_advisory": rate_ratio, "target_rate": 0.5, "rate_met": rate_met,
               "psycopg_over_baton": peer_ratio, "target_speedup": 2.0, "speedup_met": peer_met}),
    )?;
    eprintln!(
        "  postgres: baton {} advisory {} psycopg {}",
        fmt_ns(b),
        fmt_ns(a),
        fmt_ns(p)
    );
    let mut md = format!(
        "### 7. PostgreSQL store: in-process acquire + release, uncontended\n\n\
         Server: PostgreSQL {} on loopback (`scripts/server-postgres`). {} rounds, alternating; \
         baton and the advisory lock {} ops a round, the Python peer {}. **baton**: \
         `Store::acquire` (`Wait::NoWait`, ttl 30 s) + `Store::release` on `postgres://…` \
         through the library (a current-thread runtime; the store drives its connections on \
         its own). **advisory**: `SELECT pg_advisory_lock($1)` + `SELECT \
         pg_advisory_unlock($1)` on one connection (tokio-postgres, prepared statements): a \
         session lock with no TTL, no token, no queue, no holder record. **psycopg-lease**: \
         `bench/peers/pg_lease_peer.py`, a lease table taken by `INSERT … ON CONFLICT DO \
         UPDATE … WHERE expires_at < now()` and freed by `DELETE`, autocommit (psycopg {}).\n\n\
         | implementation | median per acquire + release | rounds |\n\
         |---|---:|---|\n\
         | baton (postgres store) | {} | {} |\n\
         | raw advisory lock cycle | {} | {} |\n\
         | psycopg lease table (Python) | {} | {} |\n\
         | reference: baton on sessions with `synchronous_commit=off` (grants not durable: not a setting to use) | {} | {} |\n\n\
         baton's rate / the advisory cycle's: **{rate_ratio:.2}×** (target ≥ 0.5×: **{}**). \
         psycopg / baton: **{peer_ratio:.2}×** (target ≥ 2× faster: **{}**). Without the \
         grant's WAL flush baton's rate would be {:.2}× the advisory cycle's.\n\n",
        server_version(&server.url),
        cfg.rounds,
        cfg.ops,
        cfg.peer_ops,
        python_psycopg_version(&cfg.python),
        fmt_ns(b),
        fmt_ns_list(&samples[0]),
        fmt_ns(a),
        fmt_ns_list(&samples[1]),
        fmt_ns(p),
        fmt_ns_list(&samples[2]),
        fmt_ns(nf),
        fmt_ns_list(&samples[3]),
        if rate_met { "met" } else { "missed" },
        if peer_met { "met" } else { "missed" },
        a / nf,
    );

    // Benchmark 8: contended.
    md.push_str(&format!(
        "### 8. PostgreSQL store: contended throughput\n\n\
         N clients in one process, each with its own store handle (baton) or its own \
         connection (advisory), loop acquire (`Wait::Forever`) + release on one key for \
         {:.1} s; {} round(s) per N and implementation, alternating. The hold is empty. \
         Checked: a counter each holder bumps on entry (must have been 0), grant..release \
         intervals that must not overlap, baton's tokens rising in grant order.\n\n\
         | N | implementation | acquisitions/s | p50 wait | p99 wait | fairness (Jain) | violations |\n\
         |---:|---|---:|---:|---:|---:|---:|\n",
        cfg.duration.as_secs_f64(),
        cfg.contended_rounds
    ));
    let mut violations = 0;
    for &n in &cfg.clients {
        let mut per: [Vec<Contended>; 2] = [Vec::new(), Vec::new()];
        for r in 0..cfg.contended_rounds {
            for j in 0..2 {
                let which = (j + r) % 2;
                let c = if which == 0 {
                    let key = Key::new(format!("bench/contended-{}", random_suffix()))?;
                    // Every handle connects, checks the schema and starts its listener
                    // once, outside the clock.
                    contended::baton(&url, n, key, TTL, cfg.duration, Warm::CycleAndProbe)?
                } else {
                    contended_advisory(&server.url, n, cfg.duration)?
                };
                let name = ["baton", "advisory"][which];
                rec.write(
                    "postgres_contended",
                    json!({"impl": name, "clients": n, "round": r,
                           "acquisitions": c.total, "seconds": c.seconds, "per_s": c.per_s(),
                           "wait_p50_ns": c.p50, "wait_p99_ns": c.p99, "jain": c.jain,
                           "violations": c.violations}),
                )?;
                violations += c.violations;
                per[which].push(c);
            }
        }
        for (which, name) in [(0, "baton"), (1, "advisory")] {
            let cs = &per[which];
            let rate = median(&cs.iter().map(|c| c.per_s()).collect::<Vec<_>>());
            let p50 = median(&cs.iter().map(|c| c.p50 as f64).collect::<Vec<_>>());
            let p99 = median(&cs.iter().map(|c| c.p99 as f64).collect::<Vec<_>>());
            let j = median(&cs.iter().map(|c| c.jain).collect::<Vec<_>>());
            let v: usize = cs.iter().map(|c| c.violations).sum();
            eprintln!(
                "  postgres contended N={n} {name}: {rate:.0}/s p50 {}",
                fmt_ns(p50)
            );
            md.push_str(&format!(
                "| {n} | {name} | {rate:.0} | {} | {} | {j:.3} | {v} |\n",
                fmt_ns(p50),
                fmt_ns(p99)
            ));
        }
    }
    md.push('\n');
    Ok(Outcome {
        markdown: md,
        violations,
    })
}

/// A client of the raw reference: `pg_advisory_lock` + `pg_advisory_unlock` on its own
/// connection.
struct Advisory {
    client: tokio_postgres::Client,
    lock: tokio_postgres::Statement,
    unlock: tokio_postgres::Statement,
    id: i64,
}

impl contended::Client for Advisory {
    async fn acquire(&mut self) -> Result<u64> {
        self.client.query_one(&self.lock, &[&self.id]).await?;
        Ok(0)
    }

    async fn release(&mut self) -> Result<bool> {
        // The answer is not checked: the counter and the intervals catch a second holder.
        self.client.query_one(&self.unlock, &[&self.id]).await?;
        Ok(true)
    }
}

fn contended_advisory(url: &str, n: usize, duration: Duration) -> Result<Contended> {
    let rt = contended::runtime()?;
    let id = 0x6261_746f_6e01 + i64::from(std::process::id());
    let url = url.to_owned();
    let clients = rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..n {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let lock = client.prepare("SELECT pg_advisory_lock($1)::text").await?;
            let unlock = client.prepare("SELECT pg_advisory_unlock($1)").await?;
            clients.push(Advisory {
                client,
                lock,
                unlock,
                id,
            });
        }
        Ok::<_, crate::util::Error>(clients)
    })?;
    contended::run(rt, clients, duration, false)
}

fn server_version(url: &str) -> String {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return "?".into(),
    };
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(conn);
        let row = client.query_one("SHOW server_version", &[]).await.ok()?;
        row.try_get::<_, String>(0).ok()
    })
    .map(|v| v.split_whitespace().next().unwrap_or("?").to_owned())
    .unwrap_or_else(|| "?".into())
}

fn python_psycopg_version(python: &Path) -> String {
    Command::new(python)
        .args(["-c", "import psycopg; print(psycopg.__version__)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}
