//! Benchmarks 5 and 6: baton's SQLite store (`sqlite:PATH`) against the raw SQLite
//! transactions a hand-rolled lock table needs, on the same filesystem.
//!
//! - `sqlite`: uncontended acquire (`NoWait`) + release in one process vs two
//!   `BEGIN IMMEDIATE` write transactions (INSERT a row; DELETE it) on a connection with
//!   `journal_mode=WAL`, `synchronous=NORMAL` and a busy timeout. Rounds alternate.
//! - `sqlite-burst`: N processes released at once by a futex in shared memory, each
//!   doing one acquire (`Wait::Forever`, limit 1, one key) + release through the store,
//!   vs N processes each doing one `BEGIN IMMEDIATE; UPDATE; COMMIT` with a 60 s busy
//!   timeout. Each worker stamps its grant (or commit) on `CLOCK_MONOTONIC` into its slot
//!   of the shared page; a worker that fails, or is still running at the per-process
//!   timeout (then killed), counts as an error.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use baton::Wait;
use baton_stress::stats::percentile;
use rusqlite::Connection;
use serde_json::json;

use crate::locks::{BatonLock, BenchLock};
use crate::record::Recorder;
use crate::util::{fmt_ns, median, now_ns, Result};

/// The lease time to live every request carries (the SQLite store is a lease store).
const TTL: Duration = Duration::from_secs(30);
/// The raw side's busy timeout in the burst.
const RAW_BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Formats a latency: `fmt_ns` below a second, seconds above.
fn fmt_lat(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else {
        fmt_ns(ns)
    }
}

/// The store URL of the database file `db`.
fn url(db: &Path) -> String {
    format!("sqlite:{}", db.display())
}

/// Opens a raw connection set up as a hand-rolled lock table would be.
fn raw_conn(db: &Path, busy: Duration) -> Result<Connection> {
    let conn = Connection::open(db)?;
    conn.busy_timeout(busy)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("journal_mode is {mode}, not wal").into());
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

// ---------------------------------------------------------------------------------------
// Benchmark 5: in-process, uncontended.

/// Settings for the in-process SQLite benchmark.
pub struct InprocConfig {
    /// Rounds of each implementation, alternating.
    pub rounds: usize,
    /// acquire + release pairs (baton) or transaction pairs (raw) per round.
    pub ops: u64,
    /// A directory for the databases.
    pub dir: PathBuf,
}

/// The raw pair: `BEGIN IMMEDIATE; INSERT; COMMIT` then `BEGIN IMMEDIATE; DELETE; COMMIT`.
fn raw_pair(conn: &Connection) -> Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    conn.prepare_cached("INSERT INTO locks (key, holder, token) VALUES (?1, ?2, ?3)")?
        .execute(rusqlite::params!["inproc", "baton-bench", 1])?;
    conn.execute_batch("COMMIT")?;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    conn.prepare_cached("DELETE FROM locks WHERE key = ?1")?
        .execute(["inproc"])?;
    conn.execute_batch("COMMIT")?;
    Ok(())
}

/// Runs the in-process SQLite benchmark; returns the report section.
pub fn run_inproc(cfg: &InprocConfig, rec: &mut Recorder) -> Result<String> {
    std::fs::create_dir_all(&cfg.dir)?;
    let mut baton =
        BatonLock::open_url(&url(&cfg.dir.join("baton.db")), "inproc", Wait::NoWait)?.with_ttl(TTL);
    let raw = raw_conn(&cfg.dir.join("raw.db"), Duration::from_secs(5))?;
    raw.execute_batch(
        "CREATE TABLE IF NOT EXISTS locks (key TEXT PRIMARY KEY, holder TEXT NOT NULL, \
         token INTEGER NOT NULL)",
    )?;
    let warm = (cfg.ops / 20).max(5);
    baton.uncontended(warm)?;
    for _ in 0..warm {
        raw_pair(&raw)?;
    }
    // A reference, not a contestant: the store runs each call on tokio's blocking pool,
    // so an acquire + release pays two empty `spawn_blocking` round trips at least.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let hops = |ops: u64| -> Result<f64> {
        rt.block_on(async {
            let t0 = now_ns();
            for _ in 0..ops {
                tokio::task::spawn_blocking(|| ()).await?;
                tokio::task::spawn_blocking(|| ()).await?;
            }
            Ok((now_ns() - t0) as f64 / ops as f64)
        })
    };
    hops(warm)?;
    let names = ["baton", "raw", "2x-spawn-blocking"];
    let mut samples: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for r in 0..cfg.rounds {
        for j in 0..3 {
            let which = (j + r) % 3;
            let ns = if which == 0 {
                baton.uncontended(cfg.ops)? as f64 / cfg.ops as f64
            } else if which == 2 {
                hops(cfg.ops)?
            } else {
                let t0 = now_ns();
                for _ in 0..cfg.ops {
                    raw_pair(&raw)?;
                }
                (now_ns() - t0) as f64 / cfg.ops as f64
            };
            rec.write(
                "sqlite_inproc",
                json!({"impl": names[which], "round": r, "ops": cfg.ops, "ns_per_op": ns}),
            )?;
            samples[which].push(ns);
        }
    }
    let b = median(&samples[0]);
    let w = median(&samples[1]);
    let hop = median(&samples[2]);
    let ratio = b / w;
    let met = ratio <= 3.0;
    rec.write(
        "sqlite_inproc_summary",
        json!({"baton_median_ns": b, "raw_median_ns": w, "spawn_blocking_x2_median_ns": hop,
               "ratio": ratio,
               "target": 3.0, "met": met}),
    )?;
    eprintln!(
        "  sqlite: baton {} raw {} ratio {ratio:.2}",
        fmt_ns(b),
        fmt_ns(w)
    );
    Ok(format!(
        "### 5. SQLite store: in-process acquire + release, uncontended\n\n\
         {} rounds × {} ops, alternating. **baton**: `Store::acquire` (`Wait::NoWait`, ttl \
         30 s) + `Store::release` on `sqlite:` through the library. **raw**: the two write \
         transactions a hand-rolled lock table needs, `BEGIN IMMEDIATE; INSERT; COMMIT` + \
         `BEGIN IMMEDIATE; DELETE; COMMIT` (rusqlite, cached statements, `journal_mode=WAL`, \
         `synchronous=NORMAL`, busy timeout set), same filesystem.\n\n\
         | implementation | median per acquire + release | rounds |\n\
         |---|---:|---|\n\
         | baton (sqlite store) | {} | {} |\n\
         | raw SQLite (2 write transactions) | {} | {} |\n\
         | reference: 2 empty `spawn_blocking` round trips (the store's thread hops) | {} | {} |\n\n\
         Ratio baton / raw: **{ratio:.2}×** (target ≤ 3×: **{}**).\n\n",
        cfg.rounds,
        cfg.ops,
        fmt_ns(b),
        samples[0]
            .iter()
            .map(|x| fmt_ns(*x))
            .collect::<Vec<_>>()
            .join(", "),
        fmt_ns(w),
        samples[1]
            .iter()
            .map(|x| fmt_ns(*x))
            .collect::<Vec<_>>()
            .join(", "),
        fmt_ns(hop),
        samples[2]
            .iter()
            .map(|x| fmt_ns(*x))
            .collect::<Vec<_>>()
            .join(", "),
        if met { "met" } else { "missed" },
    ))
}

// ---------------------------------------------------------------------------------------
// Benchmark 6: a burst of N processes.

/// Which side a burst worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BurstImpl {
    /// One acquire + release through baton's SQLite store.
    Baton,
    /// One `BEGIN IMMEDIATE; UPDATE; COMMIT`.
    Raw,
}

impl BurstImpl {
    fn name(self) -> &'static str {
        match self {
            BurstImpl::Baton => "baton",
            BurstImpl::Raw => "raw",
        }
    }
}

/// Settings for the burst.
pub struct BurstConfig {
    /// Processes per burst.
    pub n: usize,
    /// Bursts of each implementation, alternating.
    pub rounds: usize,
    /// A worker still running this long after the start signal is killed (an error).
    pub per_process_timeout: Duration,
    /// All workers must be spawned and ready within this, or the burst is abandoned.
    pub spawn_timeout: Duration,
    /// A directory for the databases.
    pub dir: PathBuf,
}

/// Slot states (0: not done yet).
const OK: u64 = 1;
const FAILED: u64 = 2;

/// The header of the shared mapping; slot `i` (two u64: grant stamp, state) follows at
/// `HEADER + 16 i`.
#[repr(C)]
struct Header {
    ready: AtomicU64,
    start_ns: AtomicU64,
    /// 0 until the start signal; a futex word.
    go: AtomicU32,
}
const HEADER: usize = 64;

struct Shm {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Shm {
    fn open(path: &Path, n: usize, create: bool) -> Result<Shm> {
        let len = (HEADER + 16 * n).div_ceil(4096) * 4096;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(path)?;
        if create {
            file.set_len(len as u64)?;
        }
        // SAFETY: mapping `len` bytes of a file at least that long; MAP_SHARED so every
        // process sees the same atomics. The mapping outlives the file handle.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()).into());
        }
        Ok(Shm { ptr, len })
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned, zero-filled at creation (a valid value of
        // every atomic), lives as long as self, and is only accessed atomically.
        unsafe { &*(self.ptr as *const Header) }
    }

    fn slot(&self, i: usize) -> &[AtomicU64; 2] {
        assert!(HEADER + 16 * (i + 1) <= self.len, "slot {i} out of range");
        // SAFETY: in bounds (checked), 8-aligned, zero-filled, accessed atomically only.
        unsafe { &*((self.ptr as *const u8).add(HEADER + 16 * i) as *const [AtomicU64; 2]) }
    }

    /// Blocks until `go` is non-zero (shared, not private, futex: other processes).
    fn wait_go(&self) {
        let go = &self.header().go;
        while go.load(Ordering::SeqCst) == 0 {
            // SAFETY: the futex word is a valid, aligned u32 in a shared mapping.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    go.as_ptr(),
                    libc::FUTEX_WAIT,
                    0u32,
                    std::ptr::null::<libc::timespec>(),
                );
            }
        }
    }

    fn signal_go(&self) {
        let go = &self.header().go;
        go.store(1, Ordering::SeqCst);
        // SAFETY: as in wait_go; wakes every waiter.
        unsafe {
            libc::syscall(libc::SYS_futex, go.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
        }
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: ptr came from mmap of len bytes and is unmapped once.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// The worker: opens its store or connection, reports ready, waits for the start
/// signal, does its one acquire + release (or transaction), stamps its slot.
pub fn burst_worker(imp: BurstImpl, db: &Path, shm: &Path, n: usize, slot: usize) -> Result<()> {
    let map = Shm::open(shm, n, false)?;
    let s = map.slot(slot);
    let res = burst_one(imp, db, &map, s);
    if res.is_err() {
        s[1].store(FAILED, Ordering::SeqCst);
    }
    res
}

fn burst_one(imp: BurstImpl, db: &Path, map: &Shm, s: &[AtomicU64; 2]) -> Result<()> {
    match imp {
        BurstImpl::Baton => {
            let mut lock = BatonLock::open_url(&url(db), "burst", Wait::Forever)?.with_ttl(TTL);
            map.header().ready.fetch_add(1, Ordering::SeqCst);
            map.wait_go();
            lock.acquire()?;
            s[0].store(now_ns(), Ordering::SeqCst);
            lock.release()?;
        }
        BurstImpl::Raw => {
            let conn = raw_conn(db, RAW_BUSY_TIMEOUT)?;
            map.header().ready.fetch_add(1, Ordering::SeqCst);
            map.wait_go();
            conn.execute_batch(
                "BEGIN IMMEDIATE; UPDATE counter SET n = n + 1 WHERE id = 1; COMMIT",
            )?;
            s[0].store(now_ns(), Ordering::SeqCst);
        }
    }
    s[1].store(OK, Ordering::SeqCst);
    Ok(())
}

struct BurstResult {
    latencies: Vec<u64>,
    errors: u64,
    timeouts: u64,
    spawn_seconds: f64,
    seconds: f64,
    note: Option<String>,
}

fn kill_all(children: &mut [Option<Child>]) {
    for c in children.iter_mut().flatten() {
        let _ = c.kill();
    }
    for c in children.iter_mut().flatten() {
        let _ = c.wait();
    }
}

fn burst(imp: BurstImpl, cfg: &BurstConfig, work: &Path) -> Result<BurstResult> {
    std::fs::create_dir_all(work)?;
    let db = work.join("burst.db");
    match imp {
        BurstImpl::Baton => {
            // Create the schema before the workers open it.
            BatonLock::open_url(&url(&db), "burst", Wait::NoWait)?
                .with_ttl(TTL)
                .uncontended(1)?;
        }
        BurstImpl::Raw => {
            let conn = raw_conn(&db, RAW_BUSY_TIMEOUT)?;
            conn.execute_batch(
                "CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL); \
                 INSERT INTO counter VALUES (1, 0)",
            )?;
        }
    }
    let n = cfg.n;
    let shm_path = work.join("shm");
    let map = Shm::open(&shm_path, n, true)?;
    let exe = std::env::current_exe()?;
    let t_spawn = Instant::now();
    let mut children: Vec<Option<Child>> = Vec::with_capacity(n);
    for i in 0..n {
        let spawned = Command::new(&exe)
            .args(["sqlite-burst-worker", "--impl", imp.name()])
            .arg("--db")
            .arg(&db)
            .arg("--shm")
            .arg(&shm_path)
            .args(["--n", &n.to_string(), "--slot", &i.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn();
        match spawned {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                kill_all(&mut children);
                return Err(format!("cannot start burst worker {i}: {e}").into());
            }
        }
        if t_spawn.elapsed() > cfg.spawn_timeout {
            kill_all(&mut children);
            return Err(format!(
                "spawning {n} burst workers took over {:?}",
                cfg.spawn_timeout
            )
            .into());
        }
    }
    // Wait until all are ready (or have died trying).
    loop {
        let ready = map.header().ready.load(Ordering::SeqCst) as usize;
        let failed = (0..n)
            .filter(|&i| map.slot(i)[1].load(Ordering::SeqCst) == FAILED)
            .count();
        if ready + failed >= n {
            break;
        }
        if t_spawn.elapsed() > cfg.spawn_timeout {
            kill_all(&mut children);
            return Err(format!(
                "only {ready} of {n} burst workers ready after {:?}",
                cfg.spawn_timeout
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let spawn_seconds = t_spawn.elapsed().as_secs_f64();
    // Let the last ones settle into their futex wait.
    std::thread::sleep(Duration::from_millis(50));
    // Both clocks before the wake-up: waking N processes on a few cores can keep the
    // parent off a CPU for a while, and that time belongs to the burst.
    let t_go = Instant::now();
    let start = now_ns();
    map.header().start_ns.store(start, Ordering::SeqCst);
    map.signal_go();
    let deadline = t_go + cfg.per_process_timeout;
    let mut exit_failed = vec![false; n];
    let mut timed_out = vec![false; n];
    let mut running = n;
    while running > 0 {
        for (i, c) in children.iter_mut().enumerate() {
            let Some(child) = c else { continue };
            if let Some(st) = child.try_wait()? {
                exit_failed[i] = !st.success();
                *c = None;
                running -= 1;
            }
        }
        if running == 0 {
            break;
        }
        if Instant::now() >= deadline {
            for (i, c) in children.iter_mut().enumerate() {
                if let Some(child) = c {
                    let _ = child.kill();
                    let _ = child.wait();
                    timed_out[i] = true;
                    *c = None;
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = t_go.elapsed().as_secs_f64();
    let mut latencies = Vec::with_capacity(n);
    let mut errors = 0;
    for i in 0..n {
        let s = map.slot(i);
        let ok = s[1].load(Ordering::SeqCst) == OK && !exit_failed[i] && !timed_out[i];
        if ok {
            latencies.push(s[0].load(Ordering::SeqCst).saturating_sub(start));
        } else {
            errors += 1;
        }
    }
    latencies.sort_unstable();
    let timeouts = timed_out.iter().filter(|&&t| t).count() as u64;
    // A cross-check: the raw counter must count every commit.
    let mut note = None;
    if imp == BurstImpl::Raw {
        let conn = raw_conn(&db, Duration::from_secs(5))?;
        let count: i64 = conn.query_row("SELECT n FROM counter WHERE id = 1", [], |r| r.get(0))?;
        if count as usize != latencies.len() {
            note = Some(format!(
                "counter {count} ≠ {} successful commits",
                latencies.len()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(work);
    Ok(BurstResult {
        latencies,
        errors,
        timeouts,
        spawn_seconds,
        seconds,
        note,
    })
}

/// What the burst found.
pub struct BurstOutcome {
    /// The report section.
    pub markdown: String,
    /// Failed or timed-out processes, over all bursts.
    pub errors: u64,
}

/// Runs the burst benchmark.
pub fn run_burst(cfg: &BurstConfig, rec: &mut Recorder) -> Result<BurstOutcome> {
    let imps = [BurstImpl::Baton, BurstImpl::Raw];
    let mut lat: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut errs = [0u64; 2];
    let mut rows = String::new();
    for r in 0..cfg.rounds {
        for j in 0..2 {
            let which = (j + r) % 2;
            let imp = imps[which];
            let work = cfg.dir.join(format!("sqlite-burst-{}-{r}", imp.name()));
            let res = burst(imp, cfg, &work)?;
            let p50 = percentile(&res.latencies, 50.0);
            let p99 = percentile(&res.latencies, 99.0);
            let max = res.latencies.last().copied().unwrap_or(0);
            rec.write(
                "sqlite_burst",
                json!({"impl": imp.name(), "n": cfg.n, "round": r,
                       "ok": res.latencies.len(), "errors": res.errors,
                       "timeouts": res.timeouts, "spawn_seconds": res.spawn_seconds,
                       "seconds": res.seconds, "p50_ns": p50, "p99_ns": p99,
                       "max_ns": max, "note": res.note, "latencies_ns": res.latencies}),
            )?;
            eprintln!(
                "  sqlite-burst: {} N={} round {r}: errors {} p50 {} p99 {} ({:.1} s)",
                imp.name(),
                cfg.n,
                res.errors,
                fmt_lat(p50 as f64),
                fmt_lat(p99 as f64),
                res.seconds
            );
            rows.push_str(&format!(
                "| {r} | {} | {} | {} | {} | {} | {} | {:.1} s | {}{} |\n",
                if imp == BurstImpl::Baton {
                    "baton"
                } else {
                    "raw SQLite"
                },
                res.latencies.len(),
                res.errors,
                fmt_lat(p50 as f64),
                fmt_lat(p99 as f64),
                fmt_lat(max as f64),
                res.seconds,
                res.timeouts,
                res.note
                    .as_deref()
                    .map(|s| format!("; {s}"))
                    .unwrap_or_default(),
            ));
            errs[which] += res.errors;
            lat[which].extend_from_slice(&res.latencies);
        }
    }
    for l in &mut lat {
        l.sort_unstable();
    }
    let p = |i: usize, q: f64| percentile(&lat[i], q);
    let ratio = if p(1, 99.0) > 0 {
        p(0, 99.0) as f64 / p(1, 99.0) as f64
    } else {
        f64::NAN
    };
    let met_ratio = ratio <= 2.0;
    let met_errors = errs[0] == 0;
    rec.write(
        "sqlite_burst_summary",
        json!({"n": cfg.n, "rounds": cfg.rounds,
               "baton_errors": errs[0], "raw_errors": errs[1],
               "baton_p50_ns": p(0, 50.0), "baton_p99_ns": p(0, 99.0),
               "raw_p50_ns": p(1, 50.0), "raw_p99_ns": p(1, 99.0),
               "p99_ratio": ratio, "p99_target": 2.0, "p99_met": met_ratio,
               "errors_met": met_errors}),
    )?;
    let md = format!(
        "### 6. SQLite store: a burst of {n} processes\n\n\
         {rounds} burst(s) per implementation, alternating. {n} processes (this binary in a \
         hidden worker mode) open their store or connection, then wait on a futex in shared \
         memory; the parent wakes them all at once. **baton**: one `acquire` \
         (`Wait::Forever`, limit 1, one key, ttl 30 s) + release through `sqlite:`. **raw**: \
         one `BEGIN IMMEDIATE; UPDATE counter SET n = n + 1; COMMIT` with `busy_timeout` = \
         60 s, WAL, `synchronous=NORMAL`. Latency = start signal → grant (baton) or commit \
         (raw), `CLOCK_MONOTONIC`, stamped by the worker. Error = the worker failed, or was \
         still running {:.0} s after the signal (then killed).\n\n\
         | burst | implementation | ok | errors | p50 | p99 | max | burst time | killed at timeout |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---|\n{rows}\n\
         All bursts: baton p50 {} / p99 {}, raw p50 {} / p99 {}; errors baton {} (target 0: \
         **{}**), raw {}. Ratio of p99 baton / raw: **{ratio:.2}×** (target ≤ 2×: **{}**).\n\n",
        cfg.per_process_timeout.as_secs_f64(),
        fmt_lat(p(0, 50.0) as f64),
        fmt_lat(p(0, 99.0) as f64),
        fmt_lat(p(1, 50.0) as f64),
        fmt_lat(p(1, 99.0) as f64),
        errs[0],
        if met_errors { "met" } else { "missed" },
        errs[1],
        if met_ratio { "met" } else { "missed" },
        n = cfg.n,
        rounds = cfg.rounds,
    );
    Ok(BurstOutcome {
        markdown: md,
        errors: errs[0] + errs[1],
    })
}
