//! Benchmark 1: uncontended acquire + release in one process.
//!
//! Every implementation runs `rounds` rounds; each round runs every implementation once,
//! in an order that rotates from round to round, so a noisy neighbour hurts all of them
//! alike. The report uses each implementation's median over rounds of ns/op.
//!
//! Beside the contestants it times the steps baton performs per acquire + release,
//! re-enacted with the same syscalls (as `strace` shows them) on the same filesystem, so
//! the cost of baton can be split into measured parts rather than guessed.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use baton::Wait;
use serde_json::json;

use crate::locks::{BatonLock, BenchLock, RawFlock};
use crate::record::Recorder;
use crate::util::{fmt_ns, median, now_ns, Result};

/// Settings for benchmark 1.
pub struct Config {
    /// Rounds of every implementation.
    pub rounds: usize,
    /// Operations per round for baton, the Python peers and the step re-enactments.
    pub ops: u64,
    /// Operations per round for the raw flock pair (it is ~50× faster; more ops keep
    /// the clock's resolution out of the number).
    pub raw_ops: u64,
    /// A directory on tmpfs (or /tmp) for the locks.
    pub dir: PathBuf,
    /// A second directory on another filesystem (/tmp when `dir` is tmpfs), if any.
    pub other_dir: Option<PathBuf>,
    /// The Python interpreter with fasteners and filelock.
    pub python: PathBuf,
    /// The directory of the peer scripts.
    pub peers: PathBuf,
}

/// What benchmark 1 found.
pub struct Outcome {
    /// The report section.
    pub markdown: String,
}

type Step = Box<dyn FnMut() -> Result<Sample>>;

struct Sample {
    ns_per_op: f64,
    /// User and system CPU per op from `getrusage`, for in-process contestants. Kept in
    /// the raw results only: the kernel samples these at ticks, too coarse for a table.
    cpu: Option<(f64, f64)>,
}

struct Entry {
    name: String,
    kind: &'static str,
    run: Step,
    samples: Vec<Sample>,
}

fn cpu_ns() -> (u64, u64) {
    // SAFETY: ru is a valid, writable rusage; RUSAGE_SELF always exists.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1_000;
    (ns(ru.ru_utime), ns(ru.ru_stime))
}

/// Times `ops` calls of `f` (after a short warm-up), with user/system CPU per op.
fn timed(ops: u64, mut f: impl FnMut() -> Result<()>) -> Result<Sample> {
    for _ in 0..(ops / 20).max(5) {
        f()?;
    }
    let (u0, s0) = cpu_ns();
    let t0 = now_ns();
    for _ in 0..ops {
        f()?;
    }
    let dt = now_ns() - t0;
    let (u1, s1) = cpu_ns();
    let n = ops as f64;
    Ok(Sample {
        ns_per_op: dt as f64 / n,
        cpu: Some(((u1 - u0) as f64 / n, (s1 - s0) as f64 / n)),
    })
}

fn baton_entry(name: &str, dir: &Path, ops: u64) -> Result<Entry> {
    let mut lock = BatonLock::open(dir, "inproc", Wait::NoWait)?;
    lock.uncontended((ops / 20).max(5))?;
    Ok(Entry {
        name: name.into(),
        kind: "contestant",
        run: Box::new(move || {
            let (u0, s0) = cpu_ns();
            let dt = lock.uncontended(ops)?;
            let (u1, s1) = cpu_ns();
            let n = ops as f64;
            Ok(Sample {
                ns_per_op: dt as f64 / n,
                cpu: Some(((u1 - u0) as f64 / n, (s1 - s0) as f64 / n)),
            })
        }),
        samples: Vec::new(),
    })
}

fn python_entry(cfg: &Config, peer: &'static str, ops: u64) -> Entry {
    let python = cfg.python.clone();
    let script = cfg.peers.join(format!("{peer}_peer.py"));
    let lock = cfg.dir.join(format!("{peer}.lock"));
    Entry {
        name: peer.into(),
        kind: "contestant",
        run: Box::new(move || {
            let out = Command::new(&python)
                .arg(&script)
                .arg(&lock)
                .arg(ops.to_string())
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
            let ns = v["ns_per_op"]
                .as_f64()
                .ok_or_else(|| format!("{} printed no ns_per_op", script.display()))?;
            Ok(Sample {
                ns_per_op: ns,
                cpu: None,
            })
        }),
        samples: Vec::new(),
    }
}

fn step(name: &str, ops: u64, f: impl FnMut() -> Result<()> + 'static) -> Entry {
    let mut f = f;
    Entry {
        name: name.into(),
        kind: "step",
        run: Box::new(move || timed(ops, &mut f)),
        samples: Vec::new(),
    }
}

fn cstr(s: &str) -> Result<CString> {
    Ok(CString::new(s)?)
}

fn check(rc: libc::c_int, what: &str) -> Result<libc::c_int> {
    if rc < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()).into());
    }
    Ok(rc)
}

fn open_dir(dir: &Path) -> Result<OwnedFd> {
    let p = cstr(&dir.to_string_lossy())?;
    // SAFETY: p is NUL-terminated; the returned fd is owned by the OwnedFd.
    let fd = check(
        unsafe {
            libc::open(
                p.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        },
        "open dir",
    )?;
    // SAFETY: fd is fresh and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat(dir: &OwnedFd, name: &CString, flags: libc::c_int) -> Result<libc::c_int> {
    // SAFETY: dir is open, name NUL-terminated.
    check(
        unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o666) },
        "openat",
    )
}

fn fstat(fd: libc::c_int) -> Result<()> {
    // SAFETY: st is a valid, writable stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; fd is open.
    check(unsafe { libc::fstat(fd, &mut st) }, "fstat")?;
    Ok(())
}

fn ofd(fd: libc::c_int, cmd: libc::c_int, ty: libc::c_int) -> Result<()> {
    // SAFETY: flock is plain data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fd is open, fl valid for the call.
    check(unsafe { libc::fcntl(fd, cmd, &mut fl) }, "fcntl")?;
    Ok(())
}

fn close(fd: libc::c_int) {
    // SAFETY: fd was opened by the caller and is closed once.
    unsafe {
        libc::close(fd);
    }
}

const RW_CREATE: libc::c_int =
    libc::O_RDWR | libc::O_CREAT | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// The steps of one baton acquire + release, each with the syscalls strace shows for it.
fn steps(dir: &Path, ops: u64) -> Result<Vec<Entry>> {
    let sdir = dir.join("steps");
    std::fs::create_dir_all(&sdir)?;
    let mut out = Vec::new();

    let d = open_dir(&sdir)?;
    let name = cstr("slot.0")?;
    out.push(step(
        "slot: openat(O_CREAT) + fstat + OFD F_SETLK + close",
        ops,
        move || {
            let fd = openat(&d, &name, RW_CREATE)?;
            fstat(fd)?;
            ofd(fd, libc::F_OFD_SETLK, libc::F_WRLCK)?;
            close(fd);
            Ok(())
        },
    ));

    let d = open_dir(&sdir)?;
    let name = cstr("token")?;
    let mut buf = vec![0u8; 64 * 1024 + 1];
    out.push(step(
        "token: openat + fstat + OFD F_SETLKW + 2×pread (64 KiB buffer) + pwrite + close",
        ops,
        move || {
            let fd = openat(&d, &name, RW_CREATE)?;
            fstat(fd)?;
            ofd(fd, libc::F_OFD_SETLKW, libc::F_WRLCK)?;
            // The store allocates and zeroes its read buffer per read.
            buf.iter_mut().for_each(|b| *b = 0);
            // SAFETY: buf is valid for its length; fd is open.
            let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = n.max(0) as usize;
            // SAFETY: as above, reading past what was read.
            unsafe { libc::pread(fd, buf.as_mut_ptr().add(n).cast(), buf.len() - n, n as i64) };
            let rec = format!("{:020}\n", now_ns());
            // SAFETY: rec is valid for its length; fd is open.
            unsafe { libc::pwrite(fd, rec.as_ptr().cast(), rec.len(), 0) };
            close(fd);
            Ok(())
        },
    ));

    let d = open_dir(&sdir)?;
    let target = cstr("slot.0.holder")?;
    let body = vec![b'x'; 283];
    let mut seq = 0u64;
    out.push(step(
        "holder info: getpid + openat(tmp, O_EXCL) + write + renameat + close, then unlinkat",
        ops,
        move || {
            seq += 1;
            let tmp = cstr(&format!(".slot.0.holder.tmp.{}.{seq}", std::process::id()))?;
            let fd = openat(
                &d,
                &tmp,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            )?;
            // SAFETY: body valid for its length; fd open; names NUL-terminated.
            unsafe {
                libc::write(fd, body.as_ptr().cast(), body.len());
                check(
                    libc::renameat(d.as_raw_fd(), tmp.as_ptr(), d.as_raw_fd(), target.as_ptr()),
                    "renameat",
                )?;
            }
            close(fd);
            // SAFETY: names NUL-terminated, dir open.
            check(
                unsafe { libc::unlinkat(d.as_raw_fd(), target.as_ptr(), 0) },
                "unlinkat",
            )?;
            Ok(())
        },
    ));

    let d = open_dir(&sdir)?;
    out.push(step("key directory: 2×fstat", ops, move || {
        fstat(d.as_raw_fd())?;
        fstat(d.as_raw_fd())
    }));

    #[derive(serde::Serialize)]
    struct Record {
        slot: u32,
        token: u64,
        acquired_unix_ms: u64,
        holder: baton::Holder,
    }
    let holder = baton::Holder::current(vec!["baton-bench".into()]);
    out.push(step(
        "user space: encode holder JSON (serde_json)",
        ops,
        move || {
            let rec = Record {
                slot: 0,
                token: now_ns(),
                acquired_unix_ms: 0,
                holder: holder.clone(),
            };
            std::hint::black_box(serde_json::to_vec(&rec)?);
            Ok(())
        },
    ));
    Ok(out)
}

/// Runs benchmark 1.
pub fn run(cfg: &Config, rec: &mut Recorder) -> Result<Outcome> {
    let mut entries = vec![baton_entry("baton", &cfg.dir.join("baton"), cfg.ops)?];
    if let Some(other) = &cfg.other_dir {
        let fs = other
            .parent()
            .map_or_else(|| "unknown".into(), crate::util::fs_type);
        entries.push(baton_entry(
            &format!("baton on /tmp ({fs})"),
            &other.join("baton"),
            cfg.ops,
        )?);
    }
    let mut raw = RawFlock::open(&cfg.dir.join("raw.lock"))?;
    entries.push(Entry {
        name: "raw flock".into(),
        kind: "contestant",
        run: Box::new({
            let ops = cfg.raw_ops;
            move || {
                timed(ops, || {
                    raw.acquire()?;
                    raw.release()
                })
            }
        }),
        samples: Vec::new(),
    });
    entries.push(python_entry(cfg, "fasteners", cfg.ops));
    entries.push(python_entry(cfg, "filelock", cfg.ops));
    entries.extend(steps(&cfg.dir, cfg.ops)?);

    for round in 0..cfg.rounds {
        let n = entries.len();
        for i in 0..n {
            let e = &mut entries[(i + round) % n];
            let s = (e.run)()?;
            rec.write(
                "inproc",
                json!({"impl": e.name, "kind": e.kind, "round": round,
                       "ns_per_op": s.ns_per_op,
                       "user_ns_per_op": s.cpu.map(|c| c.0), "sys_ns_per_op": s.cpu.map(|c| c.1)}),
            )?;
            e.samples.push(s);
        }
        eprintln!("  inproc: round {}/{} done", round + 1, cfg.rounds);
    }

    let med = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| median(&e.samples.iter().map(|s| s.ns_per_op).collect::<Vec<_>>()))
            .unwrap_or(f64::NAN)
    };
    let baton = med("baton");
    let raw = med("raw flock");
    let fasteners = med("fasteners");
    let filelock = med("filelock");

    let mut md = String::new();
    md.push_str(&format!(
        "### 1. In-process acquire + release, uncontended\n\n\
         {} rounds; per round baton, the Python peers and the steps do {} ops, raw flock {} ops; \
         the order rotates each round. Locks in `{}` ({}). Python times exclude interpreter start-up \
         (timed inside the script).\n\n\
         | implementation | median / op | min / op | max / op |\n\
         |---|---:|---:|---:|\n",
        cfg.rounds,
        cfg.ops,
        cfg.raw_ops,
        cfg.dir.display(),
        crate::util::fs_type(&cfg.dir)
    ));
    let row = |e: &Entry| {
        let v: Vec<f64> = e.samples.iter().map(|s| s.ns_per_op).collect();
        let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = v.iter().cloned().fold(0.0, f64::max);
        format!(
            "| {} | {} | {} | {} |\n",
            e.name,
            fmt_ns(median(&v)),
            fmt_ns(min),
            fmt_ns(max),
        )
    };
    for e in entries.iter().filter(|e| e.kind == "contestant") {
        md.push_str(&row(e));
    }
    let r1 = baton / raw;
    let r2 = fasteners / baton;
    let r3 = filelock / baton;
    md.push_str(&format!(
        "\n- baton / raw flock = **{r1:.1}×** (target ≤ 3×: **{}**)\n\
         - fasteners / baton = **{r2:.2}×** (target ≥ 2×: **{}**)\n\
         - filelock / baton = **{r3:.2}×**\n",
        verdict(r1 <= 3.0),
        verdict(r2 >= 2.0),
    ));
    rec.write(
        "inproc_summary",
        json!({"baton_ns": baton, "raw_ns": raw, "fasteners_ns": fasteners, "filelock_ns": filelock,
               "baton_over_raw": r1, "fasteners_over_baton": r2, "filelock_over_baton": r3}),
    )?;

    md.push_str(
        "\n**Where baton's time goes.** Each step below re-enacts, with the same syscalls on the \
         same filesystem, one part of what the directory store does per acquire + release \
         (the syscall list is the `strace` table further down). Same rounds, interleaved with \
         the contestants.\n\n\
         | step | median / op | share of baton |\n|---|---:|---:|\n",
    );
    let mut sum = 0.0;
    for e in entries.iter().filter(|e| e.kind == "step") {
        let m = median(&e.samples.iter().map(|s| s.ns_per_op).collect::<Vec<_>>());
        sum += m;
        md.push_str(&format!(
            "| {} | {} | {:.0}% |\n",
            e.name,
            fmt_ns(m),
            100.0 * m / baton
        ));
    }
    md.push_str(&format!(
        "| *sum of the steps* | {} | {:.0}% |\n\
         | *rest: library bookkeeping (async, maps, clones, 64 KiB read-buffer allocation, errors)* | {} | {:.0}% |\n",
        fmt_ns(sum),
        100.0 * sum / baton,
        fmt_ns((baton - sum).max(0.0)),
        100.0 * (baton - sum).max(0.0) / baton
    ));
    Ok(Outcome { markdown: md })
}

/// `met` or `MISSED`.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}
