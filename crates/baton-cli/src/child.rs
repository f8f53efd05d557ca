//! The command `baton run` protects: started in its own process group, killed by the
//! kernel if baton dies, reaped without a race against signal forwarding, and given the
//! terminal when baton had it.
//!
//! Guarantees:
//! - The child runs in a new process group whose id is its pid, so a forwarded signal
//!   reaches everything it started (`kill(-pgid)`), and a signal baton's own group gets
//!   from the terminal does not reach it twice.
//! - `PR_SET_PDEATHSIG(SIGKILL)` is set between fork and exec, then the parent's pid is
//!   checked again, so a child forked just as baton died does not outlive it either. The
//!   signal fires when the forking *thread* exits: [`Child::spawn`] must be called from
//!   the main thread (baton runs a current-thread Tokio runtime for that reason).
//! - The child is reaped only by [`Child::try_wait`], in the same task that forwards
//!   signals, so a signal is never forwarded to a process group whose leader has been
//!   reaped (and whose id the kernel could have handed out again).
//! - When one of stdin, stdout or stderr is the terminal and baton is its foreground job,
//!   the child's group becomes the foreground job (else an interactive command would be
//!   stopped by `SIGTTIN`), and baton takes the terminal back when the child stops or
//!   exits. When the child stops (Ctrl-Z), baton stops too, so the shell's job control
//!   sees it; when resumed, baton resumes the child.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// How the child ended.
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

/// A running child.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    tty: Option<Tty>,
}

impl Child {
    /// Starts `argv` with `env` added to baton's environment, in its own process group.
    ///
    /// Must be called from the main thread (see the module docs).
    pub fn spawn(argv: &[OsString], env: &[(&str, String)], tty: Option<Tty>) -> io::Result<Child> {
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).process_group(0);
        for (name, value) in env {
            cmd.env(name, value);
        }
        // SAFETY: getpid cannot fail.
        let parent = unsafe { libc::getpid() };
        let tty_fd = tty.map(|t| t.fd);
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid, _exit, getpid, tcsetpgrp, signal);
        // it allocates nothing and touches no lock.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // If baton died before the prctl above, nothing will kill this child.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                if let Some(fd) = tty_fd {
                    // std has already made the new process group; the child takes the
                    // terminal itself so it owns it before it can read from it.
                    libc::tcsetpgrp(fd, libc::getpid());
                    // Ignored signals stay ignored across exec: give SIGTTOU back.
                    libc::signal(libc::SIGTTOU, libc::SIG_DFL);
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = libc::pid_t::try_from(child.id())
            .map_err(|_| io::Error::other("the child's pid does not fit a pid_t"))?;
        // `child` is dropped without waiting; `try_wait` reaps the pid itself.
        Ok(Child { pid, tty })
    }

    /// The child's pid, which is also its process group id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Sends `signal` to the child's process group. Only called while the child has not
    /// been reaped, so the group id cannot have been reused.
    ///
    /// A signal meant to end the child (SIGTERM, SIGINT, SIGHUP, SIGQUIT) is followed by
    /// SIGCONT, as `timeout(1)` does: a stopped process would otherwise keep it pending
    /// and never end.
    pub fn forward(&self, signal: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions. An error (the group is gone
        // already) is harmless: the child's exit is on its way.
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

    /// Reaps the child if it has exited; `None` while it runs. Handles a stop (Ctrl-Z)
    /// when baton shares the terminal with it: baton stops too, and on resuming, resumes
    /// the child.
    pub fn try_wait(&mut self) -> io::Result<Option<Exit>> {
        loop {
            let mut status: libc::c_int = 0;
            let flags = libc::WNOHANG
                | if self.tty.is_some() {
                    libc::WUNTRACED
                } else {
                    0
                };
            // SAFETY: status is a valid out-pointer for the call.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, flags) };
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
            if libc::WIFEXITED(status) {
                self.release_tty();
                // WEXITSTATUS is 0..=255.
                return Ok(Some(Exit::Code(libc::WEXITSTATUS(status) as u8)));
            }
            if libc::WIFSIGNALED(status) {
                self.release_tty();
                return Ok(Some(Exit::Signal(libc::WTERMSIG(status))));
            }
            if libc::WIFSTOPPED(status) {
                self.stopped();
            }
        }
    }

    /// The child stopped on a job-control signal: stop baton as its shell expects, then
    /// resume the child when baton is resumed.
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
        // baton is ending before the child (an error while it ran): the terminal goes back
        // to baton's group so the shell finds it where it left it.
        self.release_tty();
    }
}
