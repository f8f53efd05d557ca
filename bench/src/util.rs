//! Small shared helpers: the monotonic clock, statistics, errors, machine facts.

use std::path::Path;
use std::process::Command;

/// The error type of the harness: any error, with a message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// The harness's result.
pub type Result<T> = std::result::Result<T, Error>;

/// Nanoseconds on `CLOCK_MONOTONIC`: one clock for every process on the host, so a
/// release time taken in one process and a grant time taken in another can be subtracted.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Busy-waits `ns` nanoseconds (simulated work inside a critical section).
pub fn spin_ns(ns: u64) {
    if ns == 0 {
        return;
    }
    let end = now_ns() + ns;
    while now_ns() < end {
        std::hint::spin_loop();
    }
}

/// The median of `xs` (mean of the middle two for an even count); 0 when empty.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0..=100) of sorted `xs`, nearest-rank; 0 when empty.
pub fn percentile_sorted(xs: &[u64], p: f64) -> u64 {
    if xs.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * xs.len() as f64).ceil() as usize;
    xs[rank.clamp(1, xs.len()) - 1]
}

/// Jain's fairness index of `xs`: 1 when all are equal, 1/n when one gets everything.
pub fn jain(xs: &[u64]) -> f64 {
    let sum: f64 = xs.iter().map(|&x| x as f64).sum();
    let sq: f64 = xs.iter().map(|&x| (x as f64) * (x as f64)).sum();
    if sq == 0.0 {
        return 0.0;
    }
    sum * sum / (xs.len() as f64 * sq)
}

/// The output of a command, trimmed, or `unknown`.
pub fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// The filesystem type of `dir` (`tmpfs`, `ext4`, ...): `findmnt`'s name, else `stat -f`'s.
pub fn fs_type(dir: &Path) -> String {
    let d = dir.to_string_lossy();
    // Stacked mounts print one line each; the last is the one on top.
    let t = command_output("findmnt", &["-n", "-o", "FSTYPE", "-T", &d]);
    if let Some(top) = t.lines().last().filter(|_| t != "unknown") {
        return top.trim().to_owned();
    }
    command_output("stat", &["-f", "-c", "%T", &d])
}

/// Formats nanoseconds for people: `850 ns`, `12.3 µs`, `4.56 ms`.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.1} µs", ns / 1_000.0)
    } else {
        format!("{:.2} ms", ns / 1_000_000.0)
    }
}
