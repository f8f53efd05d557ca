//! Benchmark 4: a storm of N processes on one mutex for a fixed time.
//!
//! Each worker loops: stamp the request, acquire, stamp the grant, enter the critical
//! section, spin `hold` ns, leave, stamp, release. Mutual exclusion is checked two ways:
//!
//! - live: a counter in shared memory that every holder increments on entry and
//!   decrements on exit; entry must see 0 and exit must see 1, or a violation is counted;
//! - after the run: every grant..release interval of every worker (monotonic stamps taken
//!   inside the held period) is sorted by grant, and each must start after the previous
//!   one ended; for baton the fencing tokens must rise strictly in the same order.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use baton::Wait;
use baton_stress::stats::{jain, percentile};
use serde_json::json;

use crate::locks::{self, Impl};
use crate::record::Recorder;
use crate::util::{fmt_ns, now_ns, spin_ns, Result};

/// Settings for benchmark 4.
pub struct Config {
    /// Process counts.
    pub ns: Vec<usize>,
    /// Rounds per N and implementation, alternating.
    pub rounds: usize,
    /// Length of each round.
    pub duration: Duration,
    /// Work inside the critical section, in ns (busy-wait).
    pub hold_ns: u64,
    /// The lock directory.
    pub dir: PathBuf,
}

/// The shared-memory page every worker of a round maps.
#[repr(C)]
struct Shared {
    ready: AtomicU64,
    go: AtomicU64,
    deadline_ns: AtomicU64,
    in_cs: AtomicI64,
    violations: AtomicU64,
}

struct Map {
    ptr: *mut libc::c_void,
}

impl Map {
    fn open(path: &Path, create: bool) -> Result<Map> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .open(path)?;
        if create {
            file.set_len(4096)?;
        }
        // SAFETY: mapping one page of a file we just opened; MAP_SHARED so all processes
        // see the same atomics. The mapping outlives the file handle, as mmap allows.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()).into());
        }
        Ok(Map { ptr })
    }

    fn shared(&self) -> &Shared {
        // SAFETY: the page is mapped for the life of self, zero-filled at creation (a
        // valid value of every atomic), page-aligned, and only ever accessed atomically.
        unsafe { &*(self.ptr as *const Shared) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: ptr came from mmap of 4096 bytes and is unmapped once.
        unsafe {
            libc::munmap(self.ptr, 4096);
        }
    }
}

/// One acquisition: request, grant, release stamps and the token (0 for flock).
const REC: usize = 4;

/// The worker side: waits for the start signal, storms until the deadline, writes its
/// records (u64 little-endian, four per acquisition) to `out`.
pub fn worker(imp: Impl, target: &Path, shm: &Path, hold_ns: u64, out: &Path) -> Result<()> {
    let map = Map::open(shm, false)?;
    let sh = map.shared();
    let mut lock = locks::open(imp, target, Wait::Forever)?;
    let mut recs: Vec<u64> = Vec::with_capacity(1 << 16);
    sh.ready.fetch_add(1, Ordering::SeqCst);
    while sh.go.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_micros(200));
    }
    let deadline = sh.deadline_ns.load(Ordering::SeqCst);
    loop {
        let t_req = now_ns();
        if t_req >= deadline {
            break;
        }
        let token = lock.acquire()?;
        let t_grant = now_ns();
        if sh.in_cs.fetch_add(1, Ordering::SeqCst) != 0 {
            sh.violations.fetch_add(1, Ordering::SeqCst);
        }
        spin_ns(hold_ns);
        if sh.in_cs.fetch_sub(1, Ordering::SeqCst) != 1 {
            sh.violations.fetch_add(1, Ordering::SeqCst);
        }
        let t_rel = now_ns();
        lock.release()?;
        recs.extend_from_slice(&[t_req, t_grant, t_rel, token]);
    }
    let bytes: Vec<u8> = recs.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    Ok(())
}

struct RoundResult {
    acquisitions: u64,
    per_worker: Vec<u64>,
    waits: Vec<u64>,
    live_violations: u64,
    overlap_violations: u64,
    token_violations: u64,
    seconds: f64,
}

fn round(imp: Impl, n: usize, cfg: &Config, work: &Path) -> Result<RoundResult> {
    std::fs::create_dir_all(work)?;
    let shm_path = work.join("shm");
    let map = Map::open(&shm_path, true)?;
    let sh = map.shared();
    let target = match imp {
        Impl::Baton | Impl::BatonLease => work.join("store"),
        Impl::Flock => work.join("lock"),
    };
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::with_capacity(n);
    for i in 0..n {
        let child = Command::new(&exe)
            .args(["storm-worker", "--impl", imp.name()])
            .args(["--hold-ns", &cfg.hold_ns.to_string()])
            .arg("--target")
            .arg(&target)
            .arg("--shm")
            .arg(&shm_path)
            .arg("--out")
            .arg(work.join(format!("w{i}.bin")))
            .stdin(Stdio::null())
            .spawn()?;
        children.push(child);
    }
    let t0 = std::time::Instant::now();
    while sh.ready.load(Ordering::SeqCst) < n as u64 {
        if t0.elapsed() > Duration::from_secs(120) {
            for c in &mut children {
                let _ = c.kill();
            }
            return Err("storm workers did not all start within 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let start = now_ns() + 20_000_000; // let the last spawned settle into its poll
    let deadline = start + cfg.duration.as_nanos() as u64;
    sh.deadline_ns.store(deadline, Ordering::SeqCst);
    while now_ns() < start {
        std::thread::sleep(Duration::from_millis(1));
    }
    sh.go.store(1, Ordering::SeqCst);
    let mut failed = None;
    for (i, mut c) in children.into_iter().enumerate() {
        let st = c.wait()?;
        if !st.success() && failed.is_none() {
            failed = Some(format!("storm worker {i} ({}) failed: {st}", imp.name()));
        }
    }
    if let Some(f) = failed {
        return Err(f.into());
    }
    let mut all: Vec<[u64; REC]> = Vec::new();
    let mut per_worker = Vec::with_capacity(n);
    let mut waits = Vec::new();
    for i in 0..n {
        let bytes = std::fs::read(work.join(format!("w{i}.bin")))?;
        let mut count = 0;
        for chunk in bytes.chunks_exact(8 * REC) {
            let mut r = [0u64; REC];
            for (k, w) in chunk.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                r[k] = u64::from_le_bytes(b);
            }
            if r[1] < deadline {
                count += 1;
                waits.push(r[1] - r[0]);
            }
            all.push(r);
        }
        per_worker.push(count);
    }
    all.sort_unstable_by_key(|r| r[1]);
    let mut overlap = 0;
    let mut tokens = 0;
    for w in all.windows(2) {
        if w[1][1] < w[0][2] {
            overlap += 1;
        }
        if imp == Impl::Baton && w[1][3] <= w[0][3] {
            tokens += 1;
        }
    }
    waits.sort_unstable();
    let _ = std::fs::remove_dir_all(work);
    Ok(RoundResult {
        acquisitions: per_worker.iter().sum(),
        per_worker,
        waits,
        live_violations: sh.violations.load(Ordering::SeqCst),
        overlap_violations: overlap,
        token_violations: tokens,
        seconds: cfg.duration.as_secs_f64(),
    })
}

/// What benchmark 4 found.
pub struct Outcome {
    /// The report section.
    pub markdown: String,
    /// Violations of mutual exclusion or token order, over all rounds.
    pub violations: u64,
}

/// Runs benchmark 4.
pub fn run(cfg: &Config, rec: &mut Recorder) -> Result<Outcome> {
    let imps = [Impl::Baton, Impl::Flock];
    let mut md = format!(
        "### 4. Storm: N processes on one mutex\n\n\
         Per N and implementation {} round(s) of {:.1} s, alternating; each holder spins {} in \
         the critical section. Throughput counts grants before the deadline; wait = request → \
         grant; fairness is Jain's index over per-process grant counts (1 = equal shares, \
         1/N = one process got all). Violations = live in-critical-section counter (shared \
         memory) + overlapping grant..release intervals in the merged monotonic history \
         + (baton) fencing tokens not strictly rising in grant order.\n\n\
         | N | implementation | acquisitions/s | p50 wait | p99 wait | Jain fairness | min–max per process | violations |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|\n",
        cfg.rounds,
        cfg.duration.as_secs_f64(),
        fmt_ns(cfg.hold_ns as f64)
    );
    let mut total_violations = 0;
    for &n in &cfg.ns {
        let mut res: [Vec<RoundResult>; 2] = [Vec::new(), Vec::new()];
        for r in 0..cfg.rounds {
            for j in 0..2 {
                let which = (j + r + n) % 2;
                let imp = imps[which];
                let work = cfg.dir.join(format!("storm-{}-{n}-{r}", imp.name()));
                let rr = round(imp, n, cfg, &work)?;
                let v = rr.live_violations + rr.overlap_violations + rr.token_violations;
                rec.write(
                    "storm",
                    json!({"impl": imp.name(), "n": n, "round": r, "seconds": rr.seconds,
                           "hold_ns": cfg.hold_ns, "acquisitions": rr.acquisitions,
                           "per_process": rr.per_worker,
                           "wait_p50_ns": percentile(&rr.waits, 50.0),
                           "wait_p99_ns": percentile(&rr.waits, 99.0),
                           "jain": jain(&rr.per_worker),
                           "live_violations": rr.live_violations,
                           "overlap_violations": rr.overlap_violations,
                           "token_violations": rr.token_violations,
                           "violations": v}),
                )?;
                total_violations += v;
                res[which].push(rr);
            }
        }
        eprintln!("  storm: N={n} done");
        for (i, imp) in imps.iter().enumerate() {
            let rs = &res[i];
            let acq: u64 = rs.iter().map(|r| r.acquisitions).sum();
            let secs: f64 = rs.iter().map(|r| r.seconds).sum();
            let mut waits: Vec<u64> = rs.iter().flat_map(|r| r.waits.iter().copied()).collect();
            waits.sort_unstable();
            let mut per = vec![0u64; n];
            for r in rs {
                for (k, c) in r.per_worker.iter().enumerate() {
                    per[k] += c;
                }
            }
            let v: u64 = rs
                .iter()
                .map(|r| r.live_violations + r.overlap_violations + r.token_violations)
                .sum();
            let min = per.iter().min().copied().unwrap_or(0);
            let max = per.iter().max().copied().unwrap_or(0);
            md.push_str(&format!(
                "| {n} | {} | {:.0} | {} | {} | {:.3} | {min}–{max} | {v} |\n",
                if *imp == Impl::Baton {
                    "baton"
                } else {
                    "raw flock"
                },
                acq as f64 / secs,
                fmt_ns(percentile(&waits, 50.0) as f64),
                fmt_ns(percentile(&waits, 99.0) as f64),
                jain(&per),
            ));
        }
    }
    Ok(Outcome {
        markdown: md,
        violations: total_violations,
    })
}
