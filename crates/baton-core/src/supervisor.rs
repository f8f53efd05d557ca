//! A command run while holding a lease (what `baton run` protects), started under a small supervisor so that the
//! command's whole process group is dead before the slot can be granted again — also
//! when baton itself dies.
//!
//! Shape: baton forks a **supervisor** (a copy of baton that never execs and runs only
//! async-signal-safe system calls), and the supervisor forks and execs the **command** in
//! a new process group whose id is the command's pid.
//!
//! Guarantees:
//! - The supervisor is a child subreaper (`PR_SET_CHILD_SUBREAPER`): whatever the command
//!   starts in its process group and leaves behind is reparented to it, and it exits only
//!   when no process of that group is left (`waitpid(-pgid)` answers `ECHILD`). So when the
//!   command exits, baton keeps the slot (and keeps renewing its lease) until the last
//!   process of the group has exited, as flock(1)'s inherited descriptor does.
//! - The supervisor inherits baton's descriptors, among them a kernel-lock store's locked
//!   slot file: if baton dies, the kernel frees that lock only when the supervisor exits,
//!   which is after the whole group is dead.
//! - baton tells the supervisor, through a pipe, the instant by which the group must be
//!   dead (the keeper's deadline on a lease store; none on a kernel-lock store) each time a
//!   renewal moves it, and "stop now" when the lease is lost. The supervisor enforces the
//!   last deadline it heard on its own, even if baton is paused: SIGTERM at
//!   `deadline - grace - reserve`, SIGKILL at `deadline - reserve`. When the pipe reaches
//!   end-of-file (baton died, even of SIGKILL), it sends SIGTERM at once and SIGKILL after
//!   the grace (or at `deadline - reserve` if that is sooner). It then waits for the
//!   group to be empty before it exits.
//! - The command gets `PR_SET_PDEATHSIG(SIGKILL)` (re-checked after it is set), so it
//!   dies if the supervisor is killed outright; baton is a subreaper too and then kills
//!   and reaps the rest of the group itself.
//! - What escapes: a process that leaves the command's process group (`setsid`,
//!   `setpgid`) is not stopped; a frozen host or VM cannot be stopped by any lock (the
//!   fencing token protects the resource).
//! - Signals baton forwards go to the command's process group; the supervisor blocks
//!   every signal and is not in that group.
//! - When one of stdin, stdout or stderr is the terminal and baton is its foreground job,
//!   the command's group becomes the foreground job, and baton takes the terminal back when
//!   the command stops or exits. When the command stops (Ctrl-Z), the supervisor stops
//!   itself so baton sees it, and baton stops too, so the shell's job control sees it; when
//!   resumed, baton resumes both.
//!
//! [`Child::spawn`] must be called from the main thread before any thread could hold a
//! lock the supervisor might need: the supervisor calls nothing that allocates or locks.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// How the command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(u8),
    /// It died of this signal.
    Signal(libc::c_int),
}

/// The terminal baton shares with its child, when baton is its foreground job.
#[derive(Clone, Copy, Debug)]
pub struct Tty {
    fd: libc::c_int,
}

impl Tty {
    /// The terminal on stdin, stdout or stderr (the first that is one) if baton's
    /// process group is its foreground job. Ignores `SIGTTOU` from then on, so baton
    /// can hand the terminal back and forth while in the background.
    pub fn foreground() -> Option<Tty> {
        // SAFETY: getpgrp, isatty and tcgetpgrp only read process and fd state.
        let me = unsafe { libc::getpgrp() };
        let fd = [0, 1, 2]
            .into_iter()
            .find(|&fd| unsafe { libc::isatty(fd) == 1 && libc::tcgetpgrp(fd) == me })?;
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        }
        Some(Tty { fd })
    }

    /// Makes process group `pgid` the terminal's foreground job (errors ignored: the
    /// terminal may be gone).
    fn give_to(self, pgid: libc::pid_t) {
        // SAFETY: tcsetpgrp on a descriptor we were given; SIGTTOU is ignored.
        unsafe {
            libc::tcsetpgrp(self.fd, pgid);
        }
    }

    /// Makes baton's own process group the foreground job again.
    pub fn take_back(self) {
        // SAFETY: getpgrp cannot fail.
        self.give_to(unsafe { libc::getpgrp() });
    }

    fn baton_is_foreground(self) -> bool {
        // SAFETY: both only read state.
        unsafe { libc::tcgetpgrp(self.fd) == libc::getpgrp() }
    }
}

/// How the supervisor stops the group when it must.
#[derive(Clone, Copy, Debug)]
pub struct StopPolicy {
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Between SIGKILL and the deadline, for the group to be reaped.
    pub reserve: Duration,
}

/// A running command and its supervisor.
#[derive(Debug)]
pub struct Child {
    /// The supervisor's pid (baton's child).
    supervisor: libc::pid_t,
    /// The command's pid, which is also its process group id.
    pid: libc::pid_t,
    /// baton → supervisor: deadlines and "stop now"; closing it means baton is gone.
    control: libc::c_int,
    /// supervisor → baton: the command's wait status when the group is empty.
    report: libc::c_int,
    tty: Option<Tty>,
    /// The supervisor has been reaped.
    done: bool,
    /// The supervisor stopped the group itself (a deadline, or a stop request).
    stopped: bool,
    /// When the supervisor found the group empty, on the monotonic clock in ns.
    gone_ns: Option<u64>,
}

/// A message to the supervisor: a tag and two values, [`MSG_LEN`] bytes.
const MSG_DEADLINE: u64 = 1;
const MSG_STOP: u64 = 2;
const MSG_GO: u64 = 3;
const MSG_LEN: usize = 24;
/// A report from the supervisor: the command's raw wait status.
const REPORT_STATUS: i32 = 1;
/// The same, when the supervisor had begun stopping the group (SIGTERM sent).
const REPORT_STOPPED: i32 = 2;

/// Everything the supervisor and the command need, built before the fork so that after
/// it nothing allocates.
struct Prepared {
    /// Program paths to try in order (`PATH` search done here); owns what
    /// `candidate_ptrs` points into, as `_argv` and `_envp` do for theirs.
    _candidates: Vec<CString>,
    candidate_ptrs: Vec<*const libc::c_char>,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// Environment entries whose numeric values come only with [`Supervisor::run`]
    /// (`NAME=` then room for 20 digits and the NUL), and where each value starts.
    _late: Vec<Vec<u8>>,
    /// Where each late value is written (into `_late`'s buffers, which never move).
    late_values: Vec<*mut u8>,
    tty_fd: Option<libc::c_int>,
    stop: StopPolicy,
    verbose: bool,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment variable contains a NUL byte",
        )
    })
}

fn ptrs(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

impl Prepared {
    fn new(
        argv: &[OsString],
        env: &[(&str, String)],
        late: &[&str],
        tty: Option<Tty>,
        stop: StopPolicy,
        verbose: bool,
    ) -> io::Result<Prepared> {
        let program = argv
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command"))?;
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| {
                !env.iter().any(|(name, _)| OsStr::new(name) == k)
                    && !late.iter().any(|name| OsStr::new(name) == k)
            })
            .collect();
        vars.extend(
            env.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        );
        let envp: Vec<CString> = vars
            .iter()
            .map(|(k, v)| {
                let mut b = k.as_bytes().to_vec();
                b.push(b'=');
                b.extend_from_slice(v.as_bytes());
                cstring(&b)
            })
            .collect::<io::Result<_>>()?;
        let candidates = candidates(program)?;
        let mut late: Vec<Vec<u8>> = late
            .iter()
            .map(|name| {
                let mut b = name.as_bytes().to_vec();
                b.push(b'=');
                // Room for 20 digits and the NUL; until `run`, the value is empty.
                b.resize(b.len() + 21, 0);
                b
            })
            .collect();
        let late_values: Vec<*mut u8> = late
            .iter_mut()
            // SAFETY: within the buffer: the name and '=' come before the 21 bytes.
            .map(|b| unsafe { b.as_mut_ptr().add(b.len() - 21) })
            .collect();
        let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|s| s.as_ptr()).collect();
        envp_ptrs.extend(late.iter().map(|b| b.as_ptr().cast::<libc::c_char>()));
        envp_ptrs.push(std::ptr::null());
        Ok(Prepared {
            candidate_ptrs: ptrs(&candidates),
            _candidates: candidates,
            argv_ptrs: ptrs(&argv),
            _argv: argv,
            envp_ptrs,
            _envp: envp,
            _late: late,
            late_values,
            tty_fd: tty.map(|t| t.fd),
            stop,
            verbose,
        })
    }
}

/// Where `program` may be, in the order `execvp` tries: itself when it names a path,
/// else each directory of `PATH` (default `/usr/local/bin:/usr/bin:/bin`).
fn candidates(program: &OsStr) -> io::Result<Vec<CString>> {
    let bytes = program.as_bytes();
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the command's name is empty",
        ));
    }
    if bytes.contains(&b'/') {
        return Ok(vec![cstring(bytes)?]);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut out = Vec::new();
    for dir in path.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() { b"." as &[u8] } else { dir };
        let full = Path::new(OsStr::from_bytes(dir)).join(program);
        out.push(cstring(full.as_os_str().as_bytes())?);
    }
    Ok(out)
}

fn pipe() -> io::Result<[libc::c_int; 2]> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid out-array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fds)
}

fn close_pair(fds: [libc::c_int; 2]) {
    // SAFETY: closing descriptors this module created.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
}

/// Reads exactly `buf.len()` bytes; `false` at end-of-file before that.
fn read_full(fd: libc::c_int, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of `buf`.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Ok(false);
        }
        got += n as usize;
    }
    Ok(true)
}

/// The monotonic clock in nanoseconds (`CLOCK_MONOTONIC`, the clock of [`Instant`]).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `at` on the monotonic clock in nanoseconds.
pub fn instant_ns(at: Instant) -> u64 {
    let (now, ns) = (Instant::now(), monotonic_ns());
    if at >= now {
        ns.saturating_add(u64::try_from((at - now).as_nanos()).unwrap_or(u64::MAX))
    } else {
        ns.saturating_sub(u64::try_from((now - at).as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A supervisor started before the lease is acquired, waiting to start the command: its
/// pid goes into the holder record ([`crate::Holder::supervisor`]), so that a store that
/// judges a holder dead by its process sees it alive while its command's group runs.
/// Dropped without [`Supervisor::run`], it exits without starting anything.
#[derive(Debug)]
pub struct Supervisor {
    pid: libc::pid_t,
    control: libc::c_int,
    report: libc::c_int,
    tty: Option<Tty>,
}

impl Supervisor {
    /// Forks the supervisor for `argv`, with `env` added to this process's environment,
    /// and the variables named in `late` (at most two) set to the numbers given to
    /// [`Supervisor::run`]. It stops the command's group as `stop` says when it must.
    pub fn start(
        argv: &[OsString],
        env: &[(&str, String)],
        late: &[&str],
        tty: Option<Tty>,
        stop: StopPolicy,
        verbose: bool,
    ) -> io::Result<Supervisor> {
        if late.len() > 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "at most two late environment variables",
            ));
        }
        let prepared = Prepared::new(argv, env, late, tty, stop, verbose)?;
        // Orphans of a supervisor that was killed outright come to this process, which
        // then kills and reaps them (see `Child::try_wait`).
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let control = pipe()?;
        let report = match pipe() {
            Ok(p) => p,
            Err(e) => {
                close_pair(control);
                return Err(e);
            }
        };
        // SAFETY: the child runs only `supervise`, which calls async-signal-safe functions
        // on memory prepared before the fork and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let err = io::Error::last_os_error();
            close_pair(control);
            close_pair(report);
            return Err(err);
        }
        if pid == 0 {
            // SAFETY: in the forked child; see `supervise`.
            unsafe { supervise(&prepared, control, report) }
        }
        // SAFETY: closing the supervisor's ends, which this process does not use.
        unsafe {
            libc::close(control[0]);
            libc::close(report[1]);
        }
        Ok(Supervisor {
            pid,
            control: control[1],
            report: report[0],
            tty,
        })
    }

    /// The supervisor process, for the holder record; `None` if its start time cannot be
    /// read (then the holder record names only the holder process).
    pub fn process(&self) -> Option<crate::ProcessRef> {
        let pid = u32::try_from(self.pid).ok()?;
        crate::pid_start_ticks(pid).map(|start| crate::ProcessRef { pid, start })
    }

    /// Starts the command, with the late variables set to `values` (in order), its group
    /// held from the start to `deadline` (the keeper's, on a lease store; later ones go
    /// through [`Child::deadline`]). The deadline reaches the supervisor before the
    /// command starts: a caller paused or descheduled just after this returns cannot
    /// leave the command running with no deadline at all. Returns once the command has
    /// been exec'd; an exec failure is the error (`NotFound` for a missing program, as a
    /// shell's 127).
    pub fn run(self, values: &[u64], deadline: Option<Instant>) -> io::Result<Child> {
        let me = std::mem::ManuallyDrop::new(self);
        let mut child = Child {
            supervisor: me.pid,
            pid: 0,
            control: me.control,
            report: me.report,
            tty: me.tty,
            done: false,
            stopped: false,
            gone_ns: None,
        };
        if let Some(by) = deadline {
            child.deadline(by);
        }
        child.send(
            MSG_GO,
            values.first().copied().unwrap_or(0),
            values.get(1).copied().unwrap_or(0),
        );
        let mut first = [0u8; 8];
        let started = read_full(child.report, &mut first)?;
        let pid = i32::from_ne_bytes([first[0], first[1], first[2], first[3]]);
        let errno = i32::from_ne_bytes([first[4], first[5], first[6], first[7]]);
        if !started || pid <= 0 || errno != 0 {
            child.reap_supervisor_blocking();
            let err = if !started {
                io::Error::other("the command's supervisor ended before starting it")
            } else {
                io::Error::from_raw_os_error(errno.max(1))
            };
            return Err(err);
        }
        child.pid = pid;
        Ok(child)
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Never told to go: closing the control pipe makes it exit at once.
        // SAFETY: closing descriptors this struct owns; waitpid with a valid out-pointer.
        unsafe {
            libc::close(self.control);
            libc::close(self.report);
            let mut st = 0;
            while libc::waitpid(self.pid, &mut st, 0) < 0
                && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
            {}
        }
    }
}

impl Child {
    /// Starts `argv` at once: [`Supervisor::start`] then [`Supervisor::run`], for a caller
    /// whose holder record needs no supervisor.
    pub fn spawn(
        argv: &[OsString],
        env: &[(&str, String)],
        tty: Option<Tty>,
        stop: StopPolicy,
        verbose: bool,
    ) -> io::Result<Child> {
        Supervisor::start(argv, env, &[], tty, stop, verbose)?.run(&[], None)
    }

    /// Whether the supervisor had to stop the group (its deadline came, or a stop was
    /// asked), known once [`Child::try_wait`] has returned the exit.
    pub fn was_stopped(&self) -> bool {
        self.stopped
    }

    /// When the supervisor found the command's whole process group gone (every process
    /// of it exited and reaped), on the monotonic clock in nanoseconds ([`monotonic_ns`]);
    /// known once [`Child::try_wait`] has returned the exit. It is the supervisor's own
    /// reading, taken even while the caller was paused.
    pub fn gone_at_ns(&self) -> Option<u64> {
        self.gone_ns
    }

    /// A handle that tells the supervisor deadlines and "stop now" from another task
    /// (a duplicate of the control pipe's write end).
    pub fn control(&self) -> io::Result<Control> {
        // SAFETY: fcntl F_DUPFD_CLOEXEC on a descriptor this struct owns.
        let fd = unsafe { libc::fcntl(self.control, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Control { fd })
    }

    /// The command's pid, which is also its process group id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Sends `signal` to the command's process group. The supervisor reaps the group and
    /// is reaped only by [`Child::try_wait`], in the same task that forwards, so the group
    /// id cannot have been reused.
    ///
    /// A signal meant to end the command (SIGTERM, SIGINT, SIGHUP, SIGQUIT) is followed by
    /// SIGCONT, as `timeout(1)` does: a stopped process would otherwise keep it pending
    /// and never end.
    pub fn forward(&self, signal: libc::c_int) {
        if self.done {
            return;
        }
        // SAFETY: kill has no memory-safety preconditions. An error (the group is gone
        // already) is harmless: the supervisor's exit is on its way.
        unsafe {
            libc::kill(-self.pid, signal);
            if matches!(
                signal,
                libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT
            ) {
                libc::kill(-self.pid, libc::SIGCONT);
            }
        }
    }

    fn send(&self, tag: u64, a: u64, b: u64) {
        send_on(self.control, tag, a, b);
    }

    /// Tells the supervisor the instant by which the whole group must be dead.
    pub fn deadline(&self, by: Instant) {
        self.send(MSG_DEADLINE, instant_ns(by), 0);
    }

    /// Tells the supervisor to stop the group now: SIGTERM, then SIGKILL after the grace
    /// (or at the last deadline less the reserve, if sooner).
    pub fn stop_now(&self) {
        self.send(MSG_STOP, 0, 0);
    }

    /// Reaps the supervisor if it has exited, with the command's exit; `None` while the
    /// command or any process of its group runs. Handles a stop (Ctrl-Z) when baton shares
    /// the terminal with it: baton stops too, and on resuming, resumes the command.
    pub fn try_wait(&mut self) -> io::Result<Option<Exit>> {
        if self.done {
            return Err(io::Error::other("the command was reaped already"));
        }
        loop {
            let mut status: libc::c_int = 0;
            let flags = libc::WNOHANG
                | if self.tty.is_some() {
                    libc::WUNTRACED
                } else {
                    0
                };
            // SAFETY: status is a valid out-pointer for the call.
            let rc = unsafe { libc::waitpid(self.supervisor, &mut status, flags) };
            if rc == 0 {
                return Ok(None);
            }
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if libc::WIFSTOPPED(status) {
                self.stopped();
                continue;
            }
            self.done = true;
            self.release_tty();
            return self.command_exit(status).map(Some);
        }
    }

    /// The command's exit as the supervisor reported it. A supervisor that died without
    /// reporting (killed outright) leaves the group to baton: it is killed and reaped here
    /// before the error is returned.
    fn command_exit(&mut self, supervisor_status: libc::c_int) -> io::Result<Exit> {
        let mut msg = [0u8; 16];
        let reported = read_full(self.report, &mut msg).unwrap_or(false);
        if reported {
            let mut at = [0u8; 8];
            at.copy_from_slice(&msg[8..]);
            self.gone_ns = Some(u64::from_ne_bytes(at));
        }
        let tag = i32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]);
        let status = i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]);
        if reported && (tag == REPORT_STATUS || tag == REPORT_STOPPED) {
            self.stopped = tag == REPORT_STOPPED;
            return Ok(decode(status));
        }
        self.kill_and_reap_group();
        let how = match decode(supervisor_status) {
            Exit::Code(c) => format!("exited with {c}"),
            Exit::Signal(s) => format!("died of signal {s}"),
        };
        Err(io::Error::other(format!(
            "the command's supervisor (pid {}) {how}; the command's process group {} was \
             killed",
            self.supervisor, self.pid
        )))
    }

    /// SIGKILLs the command's group and reaps what baton (a subreaper) was given of it.
    fn kill_and_reap_group(&self) {
        // SAFETY: kill and waitpid with a valid out-pointer. The group's processes are
        // baton's children now (subreaper) or already gone.
        unsafe {
            libc::kill(-self.pid, libc::SIGKILL);
            loop {
                let mut st = 0;
                let rc = libc::waitpid(-self.pid, &mut st, 0);
                if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
        }
    }

    fn reap_supervisor_blocking(&mut self) {
        loop {
            let mut st = 0;
            // SAFETY: status is a valid out-pointer.
            let rc = unsafe { libc::waitpid(self.supervisor, &mut st, 0) };
            if rc >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
        self.done = true;
    }

    /// The command stopped on a job-control signal (the supervisor stopped itself to show
    /// it): stop baton as its shell expects, then resume both when baton is resumed.
    fn stopped(&self) {
        let Some(tty) = self.tty else { return };
        tty.take_back();
        // SAFETY: stopping ourselves; SIGTSTP is not caught, so its default action (stop)
        // applies. The call returns once baton is continued.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGTSTP);
        }
        if tty.baton_is_foreground() {
            tty.give_to(self.pid);
        }
        // SAFETY: resuming our own child and the command's group.
        unsafe {
            libc::kill(self.supervisor, libc::SIGCONT);
        }
        self.forward(libc::SIGCONT);
    }

    fn release_tty(&mut self) {
        if let Some(tty) = self.tty.take() {
            tty.take_back();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // baton is ending before the command (an error while it ran): the terminal goes
        // back to baton's group so the shell finds it where it left it. Closing the
        // control pipe tells the supervisor to stop the group.
        self.release_tty();
        // SAFETY: closing descriptors this struct owns.
        unsafe {
            libc::close(self.control);
            libc::close(self.report);
        }
    }
}

/// Writes one message to the supervisor's control pipe.
fn send_on(fd: libc::c_int, tag: u64, a: u64, b: u64) {
    let mut msg = [0u8; MSG_LEN];
    msg[..8].copy_from_slice(&tag.to_ne_bytes());
    msg[8..16].copy_from_slice(&a.to_ne_bytes());
    msg[16..].copy_from_slice(&b.to_ne_bytes());
    // SAFETY: writing a small buffer; a pipe write of up to PIPE_BUF bytes is atomic. An
    // error (the supervisor is gone) is harmless.
    unsafe {
        libc::write(fd, msg.as_ptr().cast(), msg.len());
    }
}

/// Tells a running command's supervisor deadlines and "stop now" from any thread
/// ([`Child::control`]).
#[derive(Debug)]
pub struct Control {
    fd: libc::c_int,
}

impl Control {
    /// As [`Child::deadline`].
    pub fn deadline(&self, by: Instant) {
        send_on(self.fd, MSG_DEADLINE, instant_ns(by), 0);
    }

    /// As [`Child::stop_now`].
    pub fn stop_now(&self) {
        send_on(self.fd, MSG_STOP, 0, 0);
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // SAFETY: closing the duplicate this struct owns.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// A raw wait status as an [`Exit`].
fn decode(status: libc::c_int) -> Exit {
    if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        // WEXITSTATUS is 0..=255.
        Exit::Code(libc::WEXITSTATUS(status) as u8)
    }
}

/// Writes all of `buf` to `fd`, in the forked supervisor (async-signal-safe).
unsafe fn write_all_raw(fd: libc::c_int, buf: &[u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unwritten part of `buf`.
        let n = unsafe { libc::write(fd, buf[done..].as_ptr().cast(), buf.len() - done) };
        if n < 0 {
            // SAFETY: reading errno.
            if unsafe { *libc::__errno_location() } == libc::EINTR {
                continue;
            }
            return;
        }
        done += n as usize;
    }
}

fn report_pair(a: i32, b: i32) -> [u8; 8] {
    let mut m = [0u8; 8];
    m[..4].copy_from_slice(&a.to_ne_bytes());
    m[4..].copy_from_slice(&b.to_ne_bytes());
    m
}

/// The 8 bytes of `msg` at `at`.
fn field(msg: &[u8; MSG_LEN], at: usize) -> [u8; 8] {
    let mut f = [0u8; 8];
    f.copy_from_slice(&msg[at..at + 8]);
    f
}

/// Writes `value` in decimal at `out`, then a NUL (at most 21 bytes), without allocating.
///
/// # Safety
/// `out` must be valid for 21 bytes of writes.
unsafe fn write_decimal(out: *mut u8, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (value % 10) as u8;
        n += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for i in 0..n {
        // SAFETY: i < 20 < 21.
        unsafe { *out.add(i) = digits[n - 1 - i] };
    }
    // SAFETY: n <= 20.
    unsafe { *out.add(n) = 0 };
}

/// Writes to stderr that the supervisor's SIGKILL went out `late_ns` after it was due.
///
/// # Safety
/// Async-signal-safe: only stack buffers and `write`.
unsafe fn warn_late(late_ns: u64) {
    let head = b"baton: the supervisor sent SIGKILL ";
    let tail = b" ms after it was due (the host did not run it in time): the command may have outlived its lease\n";
    let mut buf = [0u8; 200];
    let mut n = head.len();
    buf[..n].copy_from_slice(head);
    let mut digits = [0u8; 21];
    // SAFETY: digits has 21 bytes.
    unsafe { write_decimal(digits.as_mut_ptr(), late_ns / 1_000_000) };
    let len = digits.iter().position(|b| *b == 0).unwrap_or(0);
    buf[n..n + len].copy_from_slice(&digits[..len]);
    n += len;
    buf[n..n + tail.len()].copy_from_slice(tail);
    n += tail.len();
    // SAFETY: writing a stack buffer to fd 2.
    unsafe { write_all_raw(2, &buf[..n]) };
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The supervisor, in the forked copy of baton. Never returns.
///
/// # Safety
/// Only in the child of `fork`, with `p` and the pipes prepared by [`Child::spawn`].
/// Everything here is an async-signal-safe system call on memory that was allocated
/// before the fork; nothing allocates, locks or unwinds.
unsafe fn supervise(p: &Prepared, control: [libc::c_int; 2], report: [libc::c_int; 2]) -> ! {
    // SAFETY (whole body): see the function's contract.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_BLOCK, &all, &mut old);
        libc::close(control[1]);
        libc::close(report[0]);
        let (control, report) = (control[0], report[1]);
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        // Wait to be told to go (the lease is granted); end-of-file first means the
        // acquire gave up or baton died: nothing was started, nothing to stop. A deadline
        // told before the go is the first one: the group is held to it from its start.
        let mut first_deadline: Option<u64> = None;
        loop {
            let mut msg = [0u8; MSG_LEN];
            let mut got = 0usize;
            while got < MSG_LEN {
                let n = libc::read(control, msg[got..].as_mut_ptr().cast(), MSG_LEN - got);
                if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                if n <= 0 {
                    libc::_exit(0);
                }
                got += n as usize;
            }
            match u64::from_ne_bytes(field(&msg, 0)) {
                MSG_GO => {
                    for (i, &out) in p.late_values.iter().enumerate() {
                        write_decimal(out, u64::from_ne_bytes(field(&msg, 8 + 8 * i)));
                    }
                    break;
                }
                MSG_DEADLINE => first_deadline = Some(u64::from_ne_bytes(field(&msg, 8))),
                _ => {}
            }
        }
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        let sfd = libc::signalfd(-1, &chld, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        let mut errp = [0; 2];
        if sfd < 0 || libc::pipe2(errp.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            let e = *libc::__errno_location();
            write_all_raw(report, &report_pair(0, e));
            libc::_exit(1);
        }
        let me = libc::getpid();
        let pid = libc::fork();
        if pid < 0 {
            let e = *libc::__errno_location();
            write_all_raw(report, &report_pair(0, e));
            libc::_exit(1);
        }
        if pid == 0 {
            command(p, errp[1], me);
        }
        libc::close(errp[1]);
        // The command makes its own group too; doing it here as well closes the race
        // with a signal sent to the group before the command ran setpgid.
        libc::setpgid(pid, pid);
        let mut ebuf = [0u8; 4];
        let mut got = 0usize;
        loop {
            let n = libc::read(errp[0], ebuf[got..].as_mut_ptr().cast(), 4 - got);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
            got += n as usize;
            if got == 4 {
                break;
            }
        }
        libc::close(errp[0]);
        let exec_errno = if got == 4 {
            i32::from_ne_bytes(ebuf)
        } else {
            0
        };
        write_all_raw(report, &report_pair(pid, exec_errno));
        if exec_errno != 0 {
            let mut st = 0;
            while libc::waitpid(pid, &mut st, 0) < 0 && *libc::__errno_location() == libc::EINTR {}
            libc::_exit(0);
        }

        let grace = duration_ns(p.stop.grace);
        let reserve = duration_ns(p.stop.reserve);
        // The instant by which the group must be dead, as baton last said (frozen once a
        // stop has begun: a stop is never taken back).
        let mut deadline: Option<u64> = first_deadline;
        // baton asked for a stop, or is gone.
        let mut stop_requested = false;
        let mut baton_gone = false;
        // When SIGTERM went out, and whether SIGKILL did.
        let mut termed: Option<u64> = None;
        let mut killed = false;
        let mut status: Option<libc::c_int> = None;
        let mut said_waiting = false;
        let wflags = libc::WNOHANG
            | if p.tty_fd.is_some() {
                libc::WUNTRACED
            } else {
                0
            };
        loop {
            // Reap what has ended; stop when nothing of the group is left.
            let mut empty = false;
            loop {
                let mut st = 0;
                let rc = libc::waitpid(-pid, &mut st, wflags);
                if rc > 0 {
                    if rc == pid {
                        if libc::WIFSTOPPED(st) {
                            // Show the stop to baton, which handles job control.
                            libc::kill(me, libc::SIGSTOP);
                        } else {
                            status = Some(st);
                        }
                    }
                    continue;
                }
                if rc < 0 {
                    let e = *libc::__errno_location();
                    if e == libc::EINTR {
                        continue;
                    }
                    empty = e == libc::ECHILD;
                }
                break;
            }
            if empty {
                // No status: the command was reaped by someone else (cannot happen while
                // this process is its parent); report it as killed.
                let st = status.unwrap_or(libc::SIGKILL);
                let tag = if termed.is_some() {
                    REPORT_STOPPED
                } else {
                    REPORT_STATUS
                };
                // The status, then when the group was found empty (monotonic ns).
                let mut msg = [0u8; 16];
                msg[..8].copy_from_slice(&report_pair(tag, st));
                msg[8..].copy_from_slice(&monotonic_ns().to_ne_bytes());
                write_all_raw(report, &msg);
                libc::_exit(0);
            }
            if status.is_some() && !said_waiting && p.verbose {
                said_waiting = true;
                write_all_raw(
                    2,
                    b"baton: the command exited; keeping the slot until the processes it left in its process group exit\n",
                );
            }
            let now = monotonic_ns();
            let term_due = if stop_requested {
                Some(0)
            } else {
                deadline.map(|d| d.saturating_sub(grace).saturating_sub(reserve))
            };
            if termed.is_none() && term_due.is_some_and(|t| now >= t) {
                libc::kill(-pid, libc::SIGTERM);
                libc::kill(-pid, libc::SIGCONT);
                termed = Some(now);
            }
            let by_grace = termed.map(|t| t.saturating_add(grace));
            let by_deadline = deadline.map(|d| d.saturating_sub(reserve));
            let kill_due = match (by_grace, by_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if !killed && kill_due.is_some_and(|t| now >= t) {
                libc::kill(-pid, libc::SIGKILL);
                killed = true;
                // Sent so late that the group may outlive the deadline: this process was
                // not scheduled in time (an overloaded or paused host). Say so.
                if let Some(d) = deadline.filter(|d| d.saturating_sub(now) < reserve / 2) {
                    warn_late(now.saturating_sub(d.saturating_sub(reserve)));
                }
            }
            // Sleep until the next thing due, a child's end, or a message.
            let wake = match (
                term_due.filter(|_| termed.is_none()),
                kill_due.filter(|_| !killed),
            ) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let timeout_ms: libc::c_int = match wake {
                None => -1,
                Some(t) if t <= now => 0,
                Some(t) => ((t - now) / 1_000_000 + 1).min(60_000) as libc::c_int,
            };
            let mut fds = [
                libc::pollfd {
                    fd: sfd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: if baton_gone { -1 } else { control },
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let rc = libc::poll(fds.as_mut_ptr(), 2, timeout_ms);
            if rc <= 0 {
                continue;
            }
            if fds[0].revents != 0 {
                let mut info: libc::signalfd_siginfo = std::mem::zeroed();
                while libc::read(
                    sfd,
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                ) > 0
                {}
            }
            if fds[1].revents != 0 {
                let mut msg = [0u8; MSG_LEN];
                let n = libc::read(control, msg.as_mut_ptr().cast(), MSG_LEN);
                if n == MSG_LEN as isize {
                    match u64::from_ne_bytes(field(&msg, 0)) {
                        MSG_DEADLINE if termed.is_none() => {
                            deadline = Some(u64::from_ne_bytes(field(&msg, 8)));
                        }
                        MSG_STOP => stop_requested = true,
                        _ => {}
                    }
                } else if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                    baton_gone = true;
                    stop_requested = true;
                }
            }
        }
    }
}

/// The command, in the supervisor's forked child: its own process group, death with the
/// supervisor, the terminal, default signals, then exec. Never returns.
///
/// # Safety
/// As [`supervise`].
unsafe fn command(p: &Prepared, errw: libc::c_int, supervisor: libc::pid_t) -> ! {
    // SAFETY (whole body): see the function's contract.
    unsafe {
        libc::setpgid(0, 0);
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            let e = *libc::__errno_location();
            write_all_raw(errw, &e.to_ne_bytes());
            libc::_exit(127);
        }
        // If the supervisor died before the prctl above, nothing would kill this process.
        if libc::getppid() != supervisor {
            libc::_exit(1);
        }
        if let Some(fd) = p.tty_fd {
            // The command takes the terminal itself so it owns it before it can read.
            libc::tcsetpgrp(fd, libc::getpid());
            // Ignored signals stay ignored across exec: give SIGTTOU back.
            libc::signal(libc::SIGTTOU, libc::SIG_DFL);
        }
        // baton's runtime ignores SIGPIPE; the command gets the default, as std's spawn
        // gives it, and an empty signal mask (the supervisor blocked everything).
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // execvp's search: the first candidate that is not missing; EACCES is remembered
        // and reported if nothing else is found.
        let mut err = libc::ENOENT;
        let mut saw_eacces = false;
        for &path in &p.candidate_ptrs {
            if path.is_null() {
                break;
            }
            libc::execve(path, p.argv_ptrs.as_ptr(), p.envp_ptrs.as_ptr());
            err = *libc::__errno_location();
            match err {
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                libc::EACCES => saw_eacces = true,
                _ => break,
            }
        }
        if saw_eacces && matches!(err, libc::ENOENT | libc::ENOTDIR) {
            err = libc::EACCES;
        }
        write_all_raw(errw, &err.to_ne_bytes());
        libc::_exit(127);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_search_follows_execvp() {
        let c = candidates(OsStr::new("./x")).expect("candidates");
        assert_eq!(c, vec![CString::new("./x").expect("c")]);
        assert!(candidates(OsStr::new("")).is_err());
        let sh = candidates(OsStr::new("sh")).expect("candidates");
        assert!(sh.iter().all(|p| p.as_bytes().ends_with(b"/sh")), "{sh:?}");
    }

    #[test]
    fn instants_map_onto_the_monotonic_clock() {
        let now = Instant::now();
        let a = instant_ns(now + Duration::from_secs(5));
        let b = instant_ns(now);
        let diff = a - b;
        assert!(diff.abs_diff(5_000_000_000) < 1_000_000_000, "{diff}");
    }
}
