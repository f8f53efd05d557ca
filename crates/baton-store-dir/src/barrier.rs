//! Barriers in the directory store, both modes (`baton_core::barrier` has the semantics).
//!
//! Layout: `PATH/+barriers/<key>/` (`+` is never in a key, so `list` never shows it) with
//! - `lock`: an OFD lock taken briefly around every decision (arrive, withdraw), so a
//!   generation is decided exactly once;
//! - `arr.<G>.<holder>`: one file per party waiting in generation `G`, holding the
//!   party's holder id and parties, locked (OFD) by the party while it waits;
//! - `gen.<G>`: written once when generation `G` passes, listing the parties that passed.
//!
//! The arrival that makes the count reach `parties` writes `gen.<G>` and returns; the
//! others see it (inotify on the directory wakes them, with a 250 ms backstop) and return.
//!
//! Dead parties:
//! - kernel mode: a party's lock on its arrival file goes with its process, so the next
//!   count (any arrival, or a waiter woken by the close) skips and deletes it at once;
//! - lease mode (shared filesystems, where locks of another host may not be visible): a
//!   waiting party rewrites its arrival every [`ARRIVAL_TTL`]/3, and a waiter that has
//!   seen an arrival unchanged for [`ARRIVAL_TTL`] on its own monotonic clock deletes it.
//!   A dead party therefore stops counting within [`ARRIVAL_TTL`] (plus one backstop) of
//!   its last heartbeat while another party waits; the decision lock itself is an OFD
//!   lock, which needs a filesystem that passes byte-range locks on (NFSv4 and Lustre do).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_core::kit::errors;
use baton_core::kit::runtime::{self, Call, CancelFlag};
use baton_core::kit::time::{next_wake, Refresh, ARRIVAL_TTL};
use baton_core::{BarrierPassed, BarrierRequest, Error, ErrorKind, Op, StoreUrl, Wait};
use rustix::fs::{AtFlags, Mode as FileMode, OFlags};

use crate::fs;
use crate::root::Root;
use crate::share::Sharing;

/// The backstop between looks when nothing was reported.
const BACKSTOP: Duration = Duration::from_millis(250);

/// How dead parties are recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// By the OFD lock on the arrival file.
    Kernel,
    /// By the heartbeat in the arrival file.
    Heartbeat,
}

/// Runs a barrier wait on a blocking thread; dropping the future withdraws the arrival
/// (the thread notices within the backstop and withdraws before it ends).
pub(crate) async fn barrier(
    root: &Root,
    liveness: Liveness,
    req: &BarrierRequest,
) -> Result<BarrierPassed, Error> {
    let url = root.url.clone();
    baton_core::barrier::validate(req).map_err(|e| e.context(Op::Barrier, Some(&req.key), &url))?;
    let dir = root.barrier_dir(&req.key)?;
    let req2 = req.clone();
    let url2 = url.clone();
    let share = root.share;
    // Dropping this future sets the party's cancel flag: it withdraws and returns.
    runtime::blocking_grant(
        Call::new(Op::Barrier, Some(&req.key), &url),
        move |cancel| {
            Party::new(dir, &url2, liveness, &req2, share).and_then(|mut p| p.run(cancel))
        },
        // A pass nobody waits for needs no giving back: the arrival is already gone.
        |_| {},
    )
    .await
}

struct Party<'a> {
    dir: OwnedFd,
    url: &'a StoreUrl,
    liveness: Liveness,
    req: &'a BarrierRequest,
    me: String,
    share: Sharing,
    lock: OwnedFd,
    inotify: Option<OwnedFd>,
    /// Lease mode: what each arrival held when first seen so, and since when.
    seen: HashMap<String, (Vec<u8>, Instant)>,
}

impl<'a> Party<'a> {
    fn new(
        dir: OwnedFd,
        url: &'a StoreUrl,
        liveness: Liveness,
        req: &'a BarrierRequest,
        share: Sharing,
    ) -> Result<Party<'a>, Error> {
        let io_err = |what: &str, e: io::Error| {
            Error::new(ErrorKind::Unavailable, what.to_owned())
                .with_source(e)
                .context(Op::Barrier, Some(&req.key), url)
        };
        let lock = fs::open_file(dir.as_fd(), "lock", true, share)
            .map_err(|e| io_err("cannot open the barrier's lock file", e))?;
        let inotify = watch(dir.as_fd()).ok();
        Ok(Party {
            dir,
            url,
            liveness,
            req,
            me: req.holder.id.to_string(),
            share,
            lock,
            inotify,
            seen: HashMap::new(),
        })
    }

    fn err(&self, kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error::new(kind, msg).context(Op::Barrier, Some(&self.req.key), self.url)
    }

    fn io(&self, what: &str, e: io::Error) -> Error {
        self.err(ErrorKind::Unavailable, what.to_owned())
            .with_source(e)
    }

    /// Runs `f` holding the barrier's decision lock.
    fn locked<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, Error>) -> Result<T, Error> {
        loop {
            match fs::lock_wait(self.lock.as_fd()) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io("cannot lock the barrier", e)),
            }
        }
        let out = f(self);
        let _ = fs::unlock(self.lock.as_fd());
        out
    }

    fn names(&self) -> Result<Vec<String>, Error> {
        fs::names(self.dir.as_fd())
            .map(|v| v.into_iter().map(|(n, _)| n).collect())
            .map_err(|e| self.io("cannot read the barrier's directory", e))
    }

    /// The generation now filling: one past the highest that passed.
    fn current(&self, names: &[String]) -> u64 {
        names
            .iter()
            .filter_map(|n| n.strip_prefix("gen.")?.parse::<u64>().ok())
            .max()
            .map_or(0, |g| g + 1)
    }

    /// Whether generation `g` passed, and with whom.
    fn passed_list(&self, g: u64) -> Result<Option<Vec<String>>, Error> {
        let name = format!("gen.{g}");
        match fs::open_existing_ro(self.dir.as_fd(), &name) {
            Ok(Some(fd)) => {
                let bytes = fs::read_small(fd.as_fd(), &name)
                    .map_err(|e| self.io("cannot read a passed generation", e))?;
                Ok(Some(
                    String::from_utf8_lossy(&bytes)
                        .lines()
                        .map(str::to_owned)
                        .collect(),
                ))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(self.io("cannot open a passed generation", e)),
        }
    }

    /// The live arrivals of generation `g` (deleting dead ones), as (name, parties).
    fn live(&mut self, g: u64) -> Result<Vec<(String, u32)>, Error> {
        let prefix = format!("arr.{g}.");
        let mut out = Vec::new();
        for name in self.names()? {
            if !name.starts_with(&prefix) {
                continue;
            }
            let Ok(Some(fd)) = fs::open_existing_ro(self.dir.as_fd(), &name) else {
                continue;
            };
            let bytes = fs::read_small(fd.as_fd(), &name).unwrap_or_default();
            let alive = match self.liveness {
                Liveness::Kernel => fs::is_locked(fd.as_fd()).unwrap_or(true),
                Liveness::Heartbeat => {
                    let now = Instant::now();
                    let mine = name.ends_with(&self.me);
                    match self.seen.get(&name) {
                        Some((b, since)) if *b == bytes => {
                            mine || now.duration_since(*since) < ARRIVAL_TTL
                        }
                        _ => {
                            self.seen.insert(name.clone(), (bytes.clone(), now));
                            true
                        }
                    }
                }
            };
            if !alive {
                let _ = fs::remove(self.dir.as_fd(), &name);
                self.seen.remove(&name);
                continue;
            }
            let parties = String::from_utf8_lossy(&bytes)
                .lines()
                .next()
                .and_then(|l| l.parse::<u32>().ok())
                .unwrap_or(self.req.parties);
            out.push((name, parties));
        }
        out.sort();
        Ok(out)
    }

    /// Arrives (under the lock): returns the generation and the arrival's open file, or
    /// the generation that passed with this arrival.
    fn arrive(&mut self) -> Result<(u64, Option<OwnedFd>), Error> {
        self.locked(|p| {
            let g = p.current(&p.names()?);
            let live = p.live(g)?;
            if let Some((name, n)) = live.iter().find(|(_, n)| *n != p.req.parties) {
                return Err(p
                    .err(
                        ErrorKind::LimitMismatch,
                        format!(
                            "generation {g} of this barrier has {n} parties ({name}), not {}",
                            p.req.parties
                        ),
                    )
                    .with_current_limit(*n));
            }
            if live.len() as u64 + 1 >= u64::from(p.req.parties) {
                let mut list: Vec<String> = live
                    .iter()
                    .filter_map(|(n, _)| n.rsplit('.').next().map(str::to_owned))
                    .collect();
                list.push(p.me.clone());
                // The others see gen.G, delete their arrivals and return.
                p.pass(g, &list)?;
                return Ok((g, None));
            }
            let fd = p.create_arrival(g)?;
            Ok((g, Some(fd)))
        })
    }

    fn pass(&self, g: u64, list: &[String]) -> Result<(), Error> {
        let mut text = list.join("\n");
        text.push('\n');
        fs::create_once(
            self.dir.as_fd(),
            &format!("gen.{g}"),
            text.as_bytes(),
            self.share,
        )
        .map_err(|e| self.io("cannot record a passed generation", e))?;
        // Keep the last few generations for slow readers; older ones are residue.
        if g >= 8 {
            let _ = fs::remove(self.dir.as_fd(), &format!("gen.{}", g - 8));
        }
        Ok(())
    }

    /// Creates `arr.G.ME`, locked before it becomes visible (a temporary name, locked,
    /// then linked into place), so nobody takes a fresh arrival for a dead one.
    fn create_arrival(&self, g: u64) -> Result<OwnedFd, Error> {
        let tmp = format!(".arr.tmp.{}", self.me);
        let name = format!("arr.{g}.{}", self.me);
        let fd = rustix::fs::openat(
            self.dir.as_fd(),
            tmp.as_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            FileMode::from_raw_mode(0o644),
        )
        .map_err(|e| self.io("cannot create an arrival", e.into()))?;
        let made = self
            .share
            .fix(fd.as_fd(), false)
            .and_then(|()| fs::try_lock(fd.as_fd()))
            .and_then(|_| self.beat(fd.as_fd(), 0))
            .and_then(|()| {
                rustix::fs::linkat(
                    self.dir.as_fd(),
                    tmp.as_str(),
                    self.dir.as_fd(),
                    name.as_str(),
                    AtFlags::empty(),
                )
                .map_err(io::Error::from)
            });
        let _ = rustix::fs::unlinkat(self.dir.as_fd(), tmp.as_str(), AtFlags::empty());
        made.map_err(|e| self.io("cannot create an arrival", e))?;
        Ok(fd)
    }

    /// Writes the arrival's contents: parties, then a heartbeat count.
    fn beat(&self, fd: BorrowedFd<'_>, n: u64) -> io::Result<()> {
        let text = format!("{}\n{}\n{n}\n", self.req.parties, self.req.holder.pid);
        rustix::fs::ftruncate(fd, 0)?;
        rustix::io::pwrite(fd, text.as_bytes(), 0)?;
        Ok(())
    }

    fn run(&mut self, cancel: &CancelFlag) -> Result<BarrierPassed, Error> {
        let deadline = match self.req.wait {
            Wait::Timeout(d) => Instant::now().checked_add(d),
            Wait::NoWait => Some(Instant::now()),
            Wait::Forever => None,
        };
        let passed = |g: u64, req: &BarrierRequest| BarrierPassed {
            key: req.key.clone(),
            generation: g,
            parties: req.parties,
        };
        let (g, fd) = self.arrive()?;
        let Some(fd) = fd else {
            return Ok(passed(g, self.req));
        };
        let name = format!("arr.{g}.{}", self.me);
        let mut beats = 0u64;
        let mut refresh = Refresh::new(ARRIVAL_TTL, Instant::now());
        loop {
            if let Some(list) = self.passed_list(g)? {
                let _ = fs::remove(self.dir.as_fd(), &name);
                drop(fd);
                return if list.contains(&self.me) {
                    Ok(passed(g, self.req))
                } else {
                    Err(self.err(
                        ErrorKind::Lost,
                        "this party's arrival was dropped as dead (stopped too long?) and its \
                         generation passed without it; arrive again",
                    ))
                };
            }
            // A dead party may have left the count short of a pass: count again, and
            // pass for everyone if the live arrivals are enough.
            let done = self.locked(|p| {
                if p.passed_list(g)?.is_some() {
                    return Ok(true);
                }
                let live = p.live(g)?;
                if !live.iter().any(|(n, _)| *n == name) {
                    return Ok(false);
                }
                if live.len() as u64 >= u64::from(p.req.parties) {
                    let list: Vec<String> = live
                        .iter()
                        .take(p.req.parties as usize)
                        .filter_map(|(n, _)| n.rsplit('.').next().map(str::to_owned))
                        .collect();
                    p.pass(g, &list)?;
                    return Ok(true);
                }
                Ok(false)
            })?;
            if done {
                continue;
            }
            let now = Instant::now();
            let stop = cancel.is_set();
            if stop || deadline.is_some_and(|d| now >= d) {
                let why = if stop {
                    self.err(ErrorKind::Cancelled, "cancelled")
                } else {
                    let timeout = match self.req.wait {
                        Wait::Timeout(d) => Some(d),
                        _ => None,
                    };
                    errors::barrier_gave_up(timeout).context(
                        Op::Barrier,
                        Some(&self.req.key),
                        self.url,
                    )
                };
                // Withdraw under the lock, unless the generation passed meanwhile.
                let outcome = self.locked(|p| {
                    let list = p.passed_list(g)?;
                    let _ = fs::remove(p.dir.as_fd(), &name);
                    Ok(list)
                })?;
                drop(fd);
                return match outcome {
                    Some(list) if list.contains(&self.me) => Ok(passed(g, self.req)),
                    _ => Err(why),
                };
            }
            let heartbeat = self.liveness == Liveness::Heartbeat;
            if heartbeat && refresh.due(now) {
                beats += 1;
                refresh.done(now);
                let _ = self.beat(fd.as_fd(), beats);
            }
            let wake = next_wake([
                Some(now + BACKSTOP),
                deadline,
                heartbeat.then(|| refresh.due_at()),
            ]);
            let pause = wake.map_or(BACKSTOP, |w| w.saturating_duration_since(now));
            match &self.inotify {
                Some(ino) => wait_change(ino.as_fd(), pause),
                None => std::thread::sleep(pause),
            }
        }
    }
}

/// An inotify watch on the barrier's directory for anything that can change a decision:
/// files created, deleted, linked in, or closed after writing (a dying party's close).
fn watch(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: no preconditions; we own the returned descriptor.
    let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mask = libc::IN_CREATE | libc::IN_DELETE | libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO;
    // SAFETY: fd is valid and path is NUL-terminated.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), mask) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Waits until the watch reports something or `timeout` passes, then drains it.
fn wait_change(ino: BorrowedFd<'_>, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: ino.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    let mut buf = [0u8; 4096];
    while matches!(rustix::io::read(ino, &mut buf), Ok(n) if n > 0) {}
}
