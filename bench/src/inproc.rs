//! Benchmark 1: uncontended acquire + release in one process.
//!
//! Every implementation runs `rounds` rounds; each round runs every implementation once,
//! in an order that rotates from round to round, so a noisy neighbour hurts all of them
//! alike. The report uses each implementation's median over rounds of ns/op.
//!
//! Beside the contestants it times the steps baton performs per acquire + release,
//! re-enacted with the same syscalls (as `strace` shows them) on the same filesystem, so
//! the cost of baton can be split into measured parts rather than guessed.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use baton::Wait;
use serde_json::json;

use crate::locks::{BatonLock, BenchLock, RawFlock};
use crate::record::Recorder;
use crate::util::{fmt_ns, median, now_ns, python_peer, Result};

/// Settings for benchmark 1.
pub struct Config {
    /// Rounds of every implementation.
    pub rounds: usize,
    /// Operations per round for baton (kernel mode) and the step re-enactments.
    pub ops: u64,
    /// Operations per round for the Python peers and baton's lease-file mode (10-300×
    /// slower per op than kernel-mode baton, so fewer ops give rounds of similar length).
    pub peer_ops: u64,
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

fn baton_entry(name: &str, url: &str, ops: u64) -> Result<Entry> {
    let mut lock = BatonLock::open_url(url, "inproc", Wait::NoWait)?;
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
    let script = cfg.peers.join("peer.py");
    let lock = cfg.dir.join(format!("{peer}.lock"));
    Entry {
        name: peer.into(),
        kind: "contestant",
        run: Box::new(move || {
            let ns = python_peer(
                &python,
                &script,
                [
                    OsStr::new(peer),
                    lock.as_os_str(),
                    OsStr::new(&ops.to_string()),
                ],
            )?;
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

fn check(rc: libc::c_int, what: &str) -> Result<libc::c_int> {
    if rc < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()).into());
    }
    Ok(rc)
}

fn open_rw(path: &Path) -> Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Ok(file.into())
}

fn fstat(fd: libc::c_int) -> Result<()> {
    // SAFETY: st is a valid, writable stat buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; fd is open.
    check(unsafe { libc::fstat(fd, &mut st) }, "fstat")?;
    Ok(())
}

/// An OFD lock command on the whole file, as the store's `fs::{try_lock, lock_wait,
/// unlock}` issue it.
fn ofd(fd: libc::c_int, cmd: libc::c_int, ty: libc::c_int) -> Result<()> {
    // SAFETY: flock is plain data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fd is open, fl valid for the call.
    check(unsafe { libc::fcntl(fd, cmd, &mut fl) }, "fcntl")?;
    Ok(())
}

fn pwrite(fd: libc::c_int, bytes: &[u8]) -> Result<()> {
    // SAFETY: bytes is valid for its length; fd is open.
    let n = unsafe { libc::pwrite(fd, bytes.as_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(format!("pwrite: {}", std::io::Error::last_os_error()).into());
    }
    Ok(())
}

/// The store's record framing: `baton1 <len, 8 hex> <FNV-1a 64, 16 hex>\n` + body.
fn framed(body: &[u8]) -> Vec<u8> {
    let sum = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut out = format!("baton1 {:08x} {sum:016x}\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

fn unix_now() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// The steps of one baton acquire + release as the directory store makes them since
/// commit 8d14b2c (descriptors cached per key, the holder record written into the locked
/// slot file): each step issues the syscalls the `strace` table below counts, on cached
/// descriptors in the same filesystem, with the user-space work that sits between them
/// (counter parsing and formatting, JSON encoding, record framing). Together they issue
/// exactly the store's 9 syscalls per acquire + release, each once.
fn steps(dir: &Path, ops: u64) -> Result<Vec<Entry>> {
    let sdir = dir.join("steps");
    std::fs::create_dir_all(&sdir)?;
    let mut out = Vec::new();

    // Root::key_dir: one fstat of the cached key directory (is it still linked?).
    let d: OwnedFd = std::fs::File::open(&sdir)?.into();
    out.push(step(
        "key directory: 1 fstat of the cached directory fd",
        ops,
        move || fstat(d.as_raw_fd()),
    ));

    // try_slots + release_sync's unlock: lock and unlock the cached slot descriptor.
    let slot = open_rw(&sdir.join("slot.0"))?;
    out.push(step(
        "slot: F_OFD_SETLK (F_WRLCK) at acquire + F_OFD_SETLK (F_UNLCK) at release, cached fd",
        ops,
        move || {
            ofd(slot.as_raw_fd(), libc::F_OFD_SETLK, libc::F_WRLCK)?;
            ofd(slot.as_raw_fd(), libc::F_OFD_SETLK, libc::F_UNLCK)
        },
    ));

    // next_token: mutex, F_OFD_SETLKW, one 22-byte pread, parse, max with the clock,
    // format, pwrite of 21 bytes, F_UNLCK.
    let token = std::sync::Mutex::new(open_rw(&sdir.join("token"))?);
    pwrite(
        token.lock().map_err(|_| "poisoned")?.as_raw_fd(),
        format!("{:020}\n", 0).as_bytes(),
    )?;
    out.push(step(
        "token: F_OFD_SETLKW + pread (22 B) + parse + pwrite (21 B) + F_UNLCK, cached fd",
        ops,
        move || {
            let guard = token.lock().map_err(|_| "poisoned")?;
            let fd = guard.as_raw_fd();
            ofd(fd, libc::F_OFD_SETLKW, libc::F_WRLCK)?;
            let mut buf = [0u8; 22];
            // SAFETY: buf is valid for its length; fd is open.
            let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let text = std::str::from_utf8(&buf[..n.max(0) as usize])?;
            if text.len() != 21 || !text[..20].bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("token counter holds {text:?}").into());
            }
            let last: u64 = text[..20].parse()?;
            let next = (last + 1).max(unix_now().as_micros() as u64);
            pwrite(fd, format!("{next:020}\n").as_bytes())?;
            ofd(fd, libc::F_OFD_SETLK, libc::F_UNLCK)
        },
    ));

    // acquire: the holder record, JSON-encoded, framed and written with one pwrite.
    #[derive(serde::Serialize)]
    struct HolderRecord {
        slot: u32,
        token: baton::Token,
        acquired_unix_ms: u64,
        holder: baton::Holder,
    }
    let holder = baton::Holder::current(vec!["baton-bench".into()]);
    let rec_fd = open_rw(&sdir.join("slot.1"))?;
    out.push(step(
        "holder record: serde_json encode + header (FNV-1a) + 1 pwrite into the slot file",
        ops,
        move || {
            let rec = HolderRecord {
                slot: 0,
                token: baton::Token(unix_now().as_micros() as u64),
                acquired_unix_ms: unix_now().as_millis() as u64,
                holder: holder.clone(),
            };
            pwrite(rec_fd.as_raw_fd(), &framed(&serde_json::to_vec(&rec)?))
        },
    ));

    // release_sync: clear the record with the 33-byte empty header (its unlock is in the
    // slot row above).
    let clear_fd = open_rw(&sdir.join("slot.2"))?;
    out.push(step(
        "release: 1 pwrite of the 33-byte empty header (the F_UNLCK is in the slot row)",
        ops,
        move || pwrite(clear_fd.as_raw_fd(), &framed(b"")),
    ));
    Ok(out)
}

/// The name of baton's lease-file mode row.
const LEASE: &str = "baton lease (`?mode=lease`)";

/// Runs benchmark 1.
pub fn run(cfg: &Config, rec: &mut Recorder) -> Result<Outcome> {
    let url = |dir: &Path| format!("dir:{}", dir.display());
    let mut entries = vec![baton_entry("baton", &url(&cfg.dir.join("baton")), cfg.ops)?];
    if let Some(other) = &cfg.other_dir {
        let fs = other
            .parent()
            .map_or_else(|| "unknown".into(), crate::util::fs_type);
        entries.push(baton_entry(
            &format!("baton on /tmp ({fs})"),
            &url(&other.join("baton")),
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
    entries.push(python_entry(cfg, "fasteners", cfg.peer_ops));
    entries.push(python_entry(cfg, "filelock", cfg.peer_ops));
    entries.push(baton_entry(
        LEASE,
        &crate::locks::lease_url(&cfg.dir.join("baton-lease")),
        cfg.peer_ops,
    )?);
    entries.push(python_entry(cfg, "softfilelock", cfg.peer_ops));
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
    let lease = med(LEASE);
    let soft = med("softfilelock");

    let mut md = String::new();
    md.push_str(&format!(
        "### 1. In-process acquire + release, uncontended\n\n\
         {} rounds; per round baton and the steps do {} ops, baton's lease mode and the Python \
         peers {} ops, raw flock {} ops; the order rotates each round. Locks in `{}` ({}). \
         Python times exclude interpreter start-up (timed inside the script).\n\n\
         | implementation | median / op | min / op | max / op |\n\
         |---|---:|---:|---:|\n",
        cfg.rounds,
        cfg.ops,
        cfg.peer_ops,
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
    let r4 = soft / lease;
    md.push_str(&format!(
        "\n- baton / raw flock = **{r1:.1}×** (target ≤ 3×: **{}**)\n\
         - fasteners / baton = **{r2:.2}×** (target ≥ 2×: **{}**)\n\
         - filelock / baton = **{r3:.2}×**\n\
         - lease-file mode, for filesystems without trustworthy kernel locks: \
         softfilelock (`filelock.SoftFileLock`) / baton lease = **{r4:.2}×** (no target)\n",
        verdict(r1 <= 3.0),
        verdict(r2 >= 2.0),
    ));
    rec.write(
        "inproc_summary",
        json!({"baton_ns": baton, "raw_ns": raw, "fasteners_ns": fasteners, "filelock_ns": filelock,
               "baton_lease_ns": lease, "softfilelock_ns": soft,
               "baton_over_raw": r1, "fasteners_over_baton": r2, "filelock_over_baton": r3,
               "softfilelock_over_baton_lease": r4}),
    )?;

    md.push_str(
        "\n**Where baton's time goes** (kernel mode). Each step below re-enacts one part of \
         what the directory store does per acquire + release, on cached descriptors in the \
         same filesystem, with the user-space work between its syscalls; together the steps \
         issue the store's syscalls (the `strace` table below), each once. Same rounds, \
         interleaved with the contestants.\n\n\
         | step | median / op | share of baton |\n|---|---:|---:|\n",
    );
    let mut sum = 0.0;
    let mut step_rows = Vec::new();
    for e in entries.iter().filter(|e| e.kind == "step") {
        let m = median(&e.samples.iter().map(|s| s.ns_per_op).collect::<Vec<_>>());
        sum += m;
        step_rows.push(json!({"step": e.name, "ns": m, "share": m / baton}));
        md.push_str(&format!(
            "| {} | {} | {:.0}% |\n",
            e.name,
            fmt_ns(m),
            100.0 * m / baton
        ));
    }
    let rest = baton - sum;
    md.push_str(&format!(
        "| *sum of the steps* | {} | {:.0}% |\n\
         | *rest, not re-enacted: the library's own user-space work — the boxed async \
         acquire/release futures on the runtime, request validation, key and holder clones \
         into the lease and the held-slots map, HashMap look-ups (SipHash), building and \
         dropping the `Lease` (the profile below splits user space by what it is)* | {}{} | {:.0}% |\n",
        fmt_ns(sum),
        100.0 * sum / baton,
        if rest < 0.0 { "−" } else { "" },
        fmt_ns(rest.abs()),
        100.0 * rest / baton
    ));
    if rest < 0.0 {
        md.push_str(
            "\nThe steps add up to more than baton's own median: each step runs in its own loop \
             with its own warm-up, and on a busy machine the rounds' medians drift by about as \
             much as the difference.\n",
        );
    }
    rec.write(
        "inproc_steps",
        json!({"baton_ns": baton, "steps": step_rows, "sum_ns": sum, "rest_ns": rest}),
    )?;
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
