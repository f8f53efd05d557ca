//! Small shared helpers: the monotonic clock, the median, errors, machine facts
//! (percentiles and Jain's index are `baton_stress::stats`'s).

use std::ffi::OsStr;
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

/// Eight random hex digits: a suffix that keeps this run's keys apart from other runs'.
pub fn random_suffix() -> String {
    format!("{:08x}", baton::HolderId::random().0 as u32)
}

/// Runs a Python peer, `python script args…`, which prints `{"ns_per_op": …}`; returns
/// that number.
pub fn python_peer<S: AsRef<OsStr>>(
    python: &Path,
    script: &Path,
    args: impl IntoIterator<Item = S>,
) -> Result<f64> {
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{} printed no JSON: {e}", script.display()))?;
    Ok(v["ns_per_op"]
        .as_f64()
        .ok_or_else(|| format!("{} printed no ns_per_op", script.display()))?)
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

/// Formats a list of nanoseconds for people, comma-separated.
pub fn fmt_ns_list(xs: &[f64]) -> String {
    xs.iter().map(|x| fmt_ns(*x)).collect::<Vec<_>>().join(", ")
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
