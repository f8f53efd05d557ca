//! Benchmark 3: two processes hand one lock back and forth.
//!
//! Both sides run the same protocol, for baton and for raw flock alike. A pipe pair
//! carries turn-taking messages, so the hand-off is strict (the releaser cannot barge
//! back in) and the waiter is surely blocked in the lock when the holder lets go:
//!
//! ```text
//! waiter: write READY ─────────────┐      acquire() blocks …
//! holder: read READY, sleep settle, t_rel = now, release()
//! waiter:                          … acquire() returns, t_grant = now, write t_grant
//! holder: read t_grant → latency = t_grant − t_rel; roles swap
//! ```
//!
//! Times are `CLOCK_MONOTONIC`, one clock for both processes. The latency therefore
//! covers the releaser's release call, the kernel's wake-up, and the waiter's path from
//! wake-up to its acquire returning.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use baton::Wait;
use baton_stress::stats::percentile;
use serde_json::json;

use crate::inproc::verdict;
use crate::locks::{self, Impl};
use crate::record::Recorder;
use crate::util::{fmt_ns, now_ns, Result};

/// Settings for benchmark 3.
pub struct Config {
    /// Rounds of each implementation, alternating.
    pub rounds: usize,
    /// Hand-offs per round.
    pub handoffs: u64,
    /// How long the holder waits after READY before releasing, so the waiter is blocked.
    pub settle_us: u64,
    /// The lock directory.
    pub dir: PathBuf,
}

/// Hand-offs dropped at the start of each round (process warm-up).
const WARMUP: usize = 5;

/// Runs benchmark 3 and returns its report section.
pub fn run(cfg: &Config, rec: &mut Recorder) -> Result<String> {
    let imps = [Impl::Baton, Impl::Flock];
    let mut all: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..cfg.rounds {
        for j in 0..2 {
            let which = (j + round) % 2;
            let imp = imps[which];
            let work = cfg.dir.join(format!("handoff-{}-{round}", imp.name()));
            std::fs::create_dir_all(&work)?;
            let lat = pair(imp, &work, cfg)?;
            let kept: Vec<u64> = lat.iter().skip(WARMUP).copied().collect();
            rec.write(
                "handoff",
                json!({"impl": imp.name(), "round": round, "settle_us": cfg.settle_us,
                       "latencies_ns": lat, "warmup_dropped": WARMUP}),
            )?;
            all[which].extend(kept);
        }
        eprintln!("  handoff: round {}/{} done", round + 1, cfg.rounds);
    }
    let mut md = format!(
        "### 3. Hand-off latency between two processes\n\n\
         {} rounds × {} hand-offs of each, alternating; release → the other process's grant, \
         both stamped on `CLOCK_MONOTONIC`; strict turns by a pipe pair; the holder waits {} µs \
         after the waiter says it is about to block. First {WARMUP} hand-offs of each round dropped.\n\n\
         | implementation | samples | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|\n",
        cfg.rounds, cfg.handoffs, cfg.settle_us
    );
    let mut p50 = [0u64; 2];
    for (i, imp) in imps.iter().enumerate() {
        let v = &mut all[i];
        v.sort_unstable();
        p50[i] = percentile(v, 50.0);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            if *imp == Impl::Baton {
                "baton"
            } else {
                "raw flock"
            },
            v.len(),
            fmt_ns(p50[i] as f64),
            fmt_ns(percentile(v, 90.0) as f64),
            fmt_ns(percentile(v, 99.0) as f64),
            fmt_ns(v.last().copied().unwrap_or(0) as f64),
        ));
        rec.write(
            "handoff_summary",
            json!({"impl": imp.name(), "samples": v.len(), "p50_ns": p50[i],
                   "p90_ns": percentile(v, 90.0), "p99_ns": percentile(v, 99.0)}),
        )?;
    }
    let ratio = p50[0] as f64 / p50[1].max(1) as f64;
    md.push_str(&format!(
        "\n- baton p50 / raw flock p50 = **{ratio:.2}×** (target ≤ 1.2×: **{}**)\n",
        verdict(ratio <= 1.2)
    ));
    Ok(md)
}

fn mkfifo(path: &Path) -> Result<()> {
    let p = CString::new(path.to_string_lossy().as_bytes())?;
    // SAFETY: p is NUL-terminated.
    if unsafe { libc::mkfifo(p.as_ptr(), 0o600) } != 0 {
        return Err(format!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )
        .into());
    }
    Ok(())
}

/// Runs one pair of workers and returns the latencies in hand-off order.
fn pair(imp: Impl, work: &Path, cfg: &Config) -> Result<Vec<u64>> {
    for f in ["a2b", "b2a"] {
        let p = work.join(f);
        let _ = std::fs::remove_file(&p);
        mkfifo(&p)?;
    }
    let target = match imp {
        Impl::Baton | Impl::BatonLease => work.join("store"),
        Impl::Flock => work.join("lock"),
    };
    let exe = std::env::current_exe()?;
    let spawn = |role: &str| {
        Command::new(&exe)
            .args(["pingpong", "--impl", imp.name(), "--role", role])
            .args(["--handoffs", &cfg.handoffs.to_string()])
            .args(["--settle-us", &cfg.settle_us.to_string()])
            .arg("--target")
            .arg(&target)
            .arg("--fifos")
            .arg(work)
            .stdout(Stdio::piped())
            .spawn()
    };
    let a = spawn("a")?;
    let b = spawn("b")?;
    let mut lat = Vec::new();
    for (role, child) in [("a", a), ("b", b)] {
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(format!(
                "pingpong worker {role} ({}) failed: {}",
                imp.name(),
                out.status
            )
            .into());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let xs = v["latencies"]
            .as_array()
            .ok_or("pingpong worker printed no latencies")?;
        for x in xs {
            let pair = x.as_array().ok_or("bad latency record")?;
            let idx = pair.first().and_then(|v| v.as_u64()).ok_or("bad index")?;
            let ns = pair.get(1).and_then(|v| v.as_u64()).ok_or("bad latency")?;
            lat.push((idx, ns));
        }
    }
    lat.sort_unstable();
    Ok(lat.into_iter().map(|(_, ns)| ns).collect())
}

/// The worker side: role `a` starts as the holder. Prints `{"latencies": [[i, ns], ...]}`
/// for the hand-offs where it was the releaser.
pub fn worker(
    imp: Impl,
    role: &str,
    target: &Path,
    fifos: &Path,
    handoffs: u64,
    settle_us: u64,
) -> Result<()> {
    let mut lock = locks::open(imp, target, Wait::Forever)?;
    let is_a = role == "a";
    if is_a {
        lock.acquire()?;
    }
    // Open order matters: a FIFO open blocks until its other end opens.
    let (mut rx, mut tx) = if is_a {
        let tx = OpenOptions::new().write(true).open(fifos.join("a2b"))?;
        let rx = OpenOptions::new().read(true).open(fifos.join("b2a"))?;
        (rx, tx)
    } else {
        let rx = OpenOptions::new().read(true).open(fifos.join("a2b"))?;
        let tx = OpenOptions::new().write(true).open(fifos.join("b2a"))?;
        (rx, tx)
    };
    let mut holding = is_a;
    let mut lat: Vec<(u64, u64)> = Vec::new();
    for i in 0..handoffs {
        if holding {
            let mut ready = [0u8; 1];
            rx.read_exact(&mut ready)?;
            std::thread::sleep(Duration::from_micros(settle_us));
            let t_rel = now_ns();
            lock.release()?;
            let mut granted = [0u8; 8];
            rx.read_exact(&mut granted)?;
            let t_grant = u64::from_le_bytes(granted);
            lat.push((i, t_grant.saturating_sub(t_rel)));
            holding = false;
        } else {
            tx.write_all(b"R")?;
            lock.acquire()?;
            let t_grant = now_ns();
            tx.write_all(&t_grant.to_le_bytes())?;
            holding = true;
        }
    }
    if holding {
        lock.release()?;
    }
    println!("{}", json!({"latencies": lat}));
    Ok(())
}
