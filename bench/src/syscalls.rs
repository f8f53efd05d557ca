//! Syscalls per uncontended acquire + release, counted by `strace -c -f` on this binary's
//! `loop` subcommand. Two runs with different op counts are subtracted, so start-up and
//! store opening cancel out and what is left is exact per-op counts.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::locks::Impl;
use crate::record::Recorder;
use crate::util::Result;

fn counts(imp: Impl, target: &Path, ops: u64, out: &Path) -> Result<BTreeMap<String, u64>> {
    let exe = std::env::current_exe()?;
    let status = Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(out)
        .arg(&exe)
        .args([
            "loop",
            "--impl",
            imp.name(),
            "--ops",
            &ops.to_string(),
            "--target",
        ])
        .arg(target)
        .status()
        .map_err(|e| format!("cannot run strace: {e}"))?;
    if !status.success() {
        return Err(format!("strace of the {} loop failed: {status}", imp.name()).into());
    }
    let text = std::fs::read_to_string(out)?;
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "% time  seconds  usecs/call  calls  [errors]  syscall"
        if f.len() < 5 || f[0].parse::<f64>().is_err() || f.last() == Some(&"total") {
            continue;
        }
        if let (Ok(calls), Some(name)) = (f[3].parse::<u64>(), f.last()) {
            map.insert((*name).to_owned(), calls);
        }
    }
    Ok(map)
}

fn per_op(imp: Impl, target: &Path, ops: u64, tmp: &Path) -> Result<BTreeMap<String, f64>> {
    let small = counts(imp, target, ops, &tmp.join("small.strace"))?;
    let big = counts(imp, target, ops * 11, &tmp.join("big.strace"))?;
    let mut out = BTreeMap::new();
    for (name, &n) in &big {
        let d = n.saturating_sub(small.get(name).copied().unwrap_or(0)) as f64 / (ops * 10) as f64;
        if d >= 0.05 {
            out.insert(name.clone(), d);
        }
    }
    Ok(out)
}

/// Counts syscalls per op for baton (both modes) and raw flock; returns the report section,
/// or a line saying why it could not (no strace).
pub fn run(dir: &Path, ops: u64, rec: &mut Recorder) -> Result<String> {
    if Command::new("strace").arg("-V").output().is_err() {
        return Ok("*(strace is not installed: syscall counts skipped)*\n".into());
    }
    let baton = per_op(Impl::Baton, &dir.join("strace-store"), ops, dir)?;
    let raw = per_op(Impl::Flock, &dir.join("strace.lock"), ops, dir)?;
    // The lease mode makes ~10× the syscalls per op; fewer ops keep strace's run short.
    let lease = per_op(
        Impl::BatonLease,
        &dir.join("strace-lease"),
        (ops / 4).max(10),
        dir,
    )?;
    let mut names: Vec<&String> = baton.keys().chain(raw.keys()).chain(lease.keys()).collect();
    names.sort();
    names.dedup();
    let mut md = String::from(
        "\n**Syscalls per acquire + release** (`strace -f -c` of the `loop` subcommand, \
         two op counts subtracted):\n\n\
         | syscall | baton | raw flock | baton lease mode |\n|---|---:|---:|---:|\n",
    );
    let fmt = |v: Option<&f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
    for n in &names {
        md.push_str(&format!(
            "| `{n}` | {} | {} | {} |\n",
            fmt(baton.get(*n)),
            fmt(raw.get(*n)),
            fmt(lease.get(*n))
        ));
    }
    let tb: f64 = baton.values().sum();
    let tr: f64 = raw.values().sum();
    let tl: f64 = lease.values().sum();
    md.push_str(&format!(
        "| **total** | **{tb:.1}** | **{tr:.1}** | **{tl:.1}** |\n"
    ));
    rec.write(
        "syscalls",
        json!({"baton": baton, "raw_flock": raw, "baton_lease": lease}),
    )?;
    Ok(md)
}

/// Where the CPU goes in an uncontended baton loop, sampled by `perf record -g`: the
/// kernel/user split, user space's self time by kind, and the inclusive share of the
/// store's own functions. Returns the
/// report section, or a line saying why there is none.
pub fn profile(dir: &Path, ops: u64, rec: &mut Recorder) -> Result<String> {
    let data = dir.join("perf.data");
    let exe = std::env::current_exe()?;
    let recorded = Command::new("perf")
        .args(["record", "-q", "-g", "-o"])
        .arg(&data)
        .arg(&exe)
        .args([
            "loop",
            "--impl",
            "baton",
            "--ops",
            &ops.to_string(),
            "--target",
        ])
        .arg(dir.join("perf-store"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !recorded {
        return Ok("\n*(perf is not usable here: no CPU profile)*\n".into());
    }
    let report = |args: &[&str]| -> String {
        Command::new("perf")
            .args(["report", "-q", "-g", "none", "-i"])
            .arg(&data)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let pct = |line: &str| {
        line.split_whitespace()
            .next()
            .and_then(|p| p.trim_end_matches('%').parse::<f64>().ok())
    };
    let mut kernel = 0.0;
    let mut user = 0.0;
    for line in report(&["--no-children", "--sort", "dso"]).lines() {
        if let Some(p) = pct(line) {
            if line.contains("[kernel") {
                kernel += p;
            } else {
                user += p;
            }
        }
    }
    // User space's self time by kind: what the "rest" row of the step table is made of.
    let mut kinds: Vec<(&'static str, f64)> = USER_KINDS.iter().map(|(k, _)| (*k, 0.0)).collect();
    for line in report(&["--no-children", "--sort", "sym"]).lines() {
        let (Some(p), Some(sym)) = (pct(line), line.split("[.] ").nth(1)) else {
            continue;
        };
        let kind = user_kind(sym.trim());
        if let Some(k) = kinds.iter_mut().find(|(k, _)| *k == kind) {
            k.1 += p;
        }
    }
    let mut rows: Vec<(f64, String)> = Vec::new();
    for line in report(&["--children", "--sort", "sym"]).lines() {
        let Some(p) = pct(line) else { continue };
        let Some(sym) = line.split("[.] ").nth(1) else {
            continue;
        };
        let sym = sym.trim();
        let interesting = sym.starts_with("baton_store_dir::")
            || sym.starts_with("<baton_store_dir::")
            || sym.starts_with("serde_json::")
            || sym.starts_with("__memset");
        if interesting && p >= 1.0 && !rows.iter().any(|(_, s)| s == sym) {
            rows.push((p, sym.to_owned()));
        }
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    rows.truncate(12);
    rec.write(
        "profile",
        serde_json::json!({"kernel_pct": kernel, "user_pct": user,
                           "user_self_pct": kinds.iter().map(|(k, p)| (k.to_string(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
                           "functions": rows.iter().map(|(p, s)| serde_json::json!({"sym": s, "inclusive_pct": p})).collect::<Vec<_>>()}),
    )?;
    let mut md = format!(
        "\n**CPU profile of baton's uncontended loop** (`perf record -g`, {ops} acquire + release \
         pairs): **{kernel:.0}%** of samples in the kernel, **{user:.0}%** in user space \
         (baton, libc, serde_json). User space's own (self) samples by kind:\n\n\
         | user-space code | self share of all samples |\n|---|---:|\n"
    );
    for (k, p) in &kinds {
        md.push_str(&format!("| {k} | {p:.1}% |\n"));
    }
    md.push_str(
        "\nInclusive share of the store's functions (callees included, kernel time too):\n\n\
         | function | inclusive share |\n|---|---:|\n",
    );
    for (p, s) in rows {
        md.push_str(&format!("| `{s}` | {p:.1}% |\n"));
    }
    Ok(md)
}

/// Whether a symbol belongs to a kind of code.
type SymbolTest = fn(&str) -> bool;

/// The kinds of user-space code the profile tells apart, each with a test on the symbol;
/// the first that matches wins.
const USER_KINDS: &[(&str, SymbolTest)] = &[
    ("libc syscall wrappers, vDSO clock", |s| {
        [
            "__fcntl",
            "__libc_fcntl",
            "fcntl",
            "__libc_pwrite",
            "__libc_pread",
            "__pwrite",
            "__pread",
            "pwrite",
            "pread",
            "__fstat",
            "fstat",
            "__vdso_",
            "clock_gettime",
        ]
        .iter()
        .any(|p| s.starts_with(p))
    }),
    ("allocator (malloc, free, realloc)", |s| {
        [
            "malloc",
            "_int_",
            "free",
            "cfree",
            "realloc",
            "__libc_",
            "tcache",
            "__rust_",
            "unlink_chunk",
        ]
        .iter()
        .any(|p| s.starts_with(p))
    }),
    ("memcpy / memmove / memset", |s| {
        s.starts_with("__mem") || s.starts_with("mem")
    }),
    ("serde_json encoding (serde, itoa)", |s| {
        s.contains("serde") || s.contains("itoa")
    }),
    ("clones (String, Vec, Holder)", |s| {
        s.contains("core::clone::Clone>::clone")
    }),
    ("hashing (SipHash for the HashMaps)", |s| {
        s.contains("core::hash::") || s.contains("hashbrown")
    }),
    ("formatting (format!, integers to text)", |s| {
        s.contains("core::fmt") || s.contains("alloc::fmt")
    }),
    ("tokio runtime (block_on, context, thread-locals)", |s| {
        s.contains("tokio::") || s.contains("std::thread::local") || s.contains("futures")
    }),
    ("baton's own code (store, core, the bench loop)", |s| {
        s.contains("baton")
    }),
    ("other", |_| true),
];

fn user_kind(sym: &str) -> &'static str {
    USER_KINDS
        .iter()
        .find(|(_, test)| test(sym))
        .map_or("other", |(k, _)| k)
}
