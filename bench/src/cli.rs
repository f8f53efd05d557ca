//! Benchmark 2: one `baton run -s dir:X -k K -- true` per call against util-linux
//! `flock FILE true`, the whole process life of each (spawn, lock, run `true`, unlock,
//! exit), alternating in rounds. A third command, `baton --version`, runs in the same
//! rounds as a reference: the start-up and exit of the baton binary alone (no store, no
//! child), so the report can split baton run's time into start-up and the rest.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use baton_stress::stats::percentile;
use serde_json::json;

use crate::inproc::verdict;
use crate::record::Recorder;
use crate::util::{fmt_ns, median, Result};

/// Settings for benchmark 2.
pub struct Config {
    /// Rounds of both.
    pub rounds: usize,
    /// Calls per round of each.
    pub calls: usize,
    /// The `baton` binary.
    pub baton: PathBuf,
    /// The lock directory.
    pub dir: PathBuf,
}

fn call(mut cmd: Command, what: &str) -> Result<f64> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let ns = t.elapsed().as_nanos() as f64;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(ns)
}

fn baton_cmd(baton: &Path, store: &Path) -> Command {
    let mut c = Command::new(baton);
    c.arg("run")
        .arg("-s")
        .arg(format!("dir:{}", store.display()))
        .args(["-k", "bench-cli", "--", "true"]);
    c
}

fn version_cmd(baton: &Path) -> Command {
    let mut c = Command::new(baton);
    c.arg("--version");
    c
}

fn flock_cmd(file: &Path) -> Command {
    let mut c = Command::new("flock");
    c.arg(file).arg("true");
    c
}

/// Runs benchmark 2 and returns its report section.
pub fn run(cfg: &Config, rec: &mut Recorder) -> Result<String> {
    let store = cfg.dir.join("cli-store");
    let file = cfg.dir.join("cli.lock");
    let mut times: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    let names = ["baton run", "flock(1)", "baton --version"];
    // Warm the page cache and create the key once.
    call(baton_cmd(&cfg.baton, &store), "baton run")?;
    call(flock_cmd(&file), "flock")?;
    call(version_cmd(&cfg.baton), "baton --version")?;
    for round in 0..cfg.rounds {
        for j in 0..3 {
            let which = (j + round) % 3;
            for i in 0..cfg.calls {
                let cmd = match which {
                    0 => baton_cmd(&cfg.baton, &store),
                    1 => flock_cmd(&file),
                    _ => version_cmd(&cfg.baton),
                };
                let ns = call(cmd, names[which])?;
                rec.write(
                    "cli",
                    json!({"impl": names[which], "round": round, "call": i, "ns": ns}),
                )?;
                times[which].push(ns);
            }
        }
        eprintln!("  cli: round {}/{} done", round + 1, cfg.rounds);
    }
    let b = median(&times[0]);
    let f = median(&times[1]);
    let v = median(&times[2]);
    let ratio = b / f;
    rec.write(
        "cli_summary",
        json!({"baton_ns": b, "flock_ns": f, "baton_version_ns": v, "ratio": ratio}),
    )?;
    let mut md = format!(
        "### 2. One locked command per process: `baton run` vs `flock(1)`\n\n\
         {} rounds × {} calls of each, alternating; each call is a whole process life \
         (spawn, lock, run `true`, unlock, exit) timed by the parent.\n\n\
         | command | median / call | p90 / call |\n|---|---:|---:|\n",
        cfg.rounds, cfg.calls
    );
    for i in 0..names.len() {
        let mut v: Vec<u64> = times[i].iter().map(|&x| x as u64).collect();
        v.sort_unstable();
        md.push_str(&format!(
            "| `{}` | {} | {} |\n",
            [
                "baton run -s dir:X -k K -- true",
                "flock FILE true",
                "baton --version (reference: start-up + exit only)",
            ][i],
            fmt_ns(median(&times[i])),
            fmt_ns(percentile(&v, 90.0) as f64)
        ));
    }
    md.push_str(&format!(
        "\n- baton run / flock = **{ratio:.2}×** (target ≤ 1.1×: **{}**)\n\
         - of baton run's {}, the baton binary's own start-up and exit (`baton --version`) \
         take {}; the rest, {}, is everything baton run does beyond starting: open the \
         store, take the lock, spawn `true` and wait for it, release. flock(1) does its whole \
         job, `true` included, in {}\n",
        verdict(ratio <= 1.1),
        fmt_ns(b),
        fmt_ns(v),
        fmt_ns(b - v),
        fmt_ns(f),
    ));
    Ok(md)
}
