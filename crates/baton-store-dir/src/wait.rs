//! Waiting for a slot without spinning and without a stampede, and cancelling the wait
//! without leaving anything behind.
//!
//! - A mutex's waiters block in the kernel on the slot's lock (`F_OFD_SETLKW`). The kernel
//!   queues them and wakes one per release (Linux ≥ 4.19 wakes only waiters that can win).
//! - A semaphore's waiters block in the kernel on the key's `gate` lock, so only one of
//!   them, the front waiter, looks at the slots. It retries them when inotify reports a
//!   release (a holder writes to `gate` after unlocking) or a slot file closed after
//!   writing (a holder's death closes its files), and every 250 ms as a backstop (the
//!   kernel reports the close of a dying process just before it drops its locks).
//!
//! A blocked `fcntl` cannot be cancelled from outside, so the wait runs on its own thread
//! and is cancelled as `flock -w` times out: a signal without `SA_RESTART` makes the call
//! return `EINTR`. The signal ([`wait_signal`]) is only ever sent to baton's own waiting
//! threads; its handler does nothing. Cancellation sets a flag first and repeats the
//! signal until the thread has finished, so a signal that arrives just before the thread
//! blocks is not lost. A lock the thread takes after the wait was abandoned is dropped.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::fs;

/// The real-time signal baton sends to its own waiting threads to interrupt them.
pub fn wait_signal() -> libc::c_int {
    libc::SIGRTMAX() - 3
}

extern "C" fn on_wait_signal(_: libc::c_int) {}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction with a handler that does nothing is async-signal-safe; the
        // struct is zeroed and then filled; no SA_RESTART so blocked calls see EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_wait_signal as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(wait_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// What the waiting thread is asked to wait for.
pub enum WaitFor {
    /// Block on this slot's lock (a mutex).
    Slot { slot: u32, fd: OwnedFd },
    /// Become the front waiter through the gate, then take the first free slot.
    AnySlot {
        gate: OwnedFd,
        slots: Vec<OwnedFd>,
        /// `/proc/self/fd/N` of the key directory, for inotify.
        dir_path: String,
    },
}

struct Shared {
    cancelled: AtomicBool,
    finished: AtomicBool,
    wake: OwnedFd,
}

/// A wait running on its own thread. Dropping it cancels the wait and returns only after
/// the thread is gone, so nothing of the wait outlives it.
pub struct Waiter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    rx: Option<oneshot::Receiver<io::Result<(u32, OwnedFd)>>>,
}

impl Waiter {
    /// Starts waiting.
    pub fn start(what: WaitFor) -> io::Result<Waiter> {
        install_handler();
        // SAFETY: eventfd has no memory-safety preconditions; we own the returned fd.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            cancelled: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            wake,
        });
        let (tx, rx) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("baton-wait".into())
            .spawn(move || {
                let result = run(&thread_shared, what);
                // If the receiver is gone the wait was abandoned: the fd inside the result
                // is dropped here, which releases a lock taken too late.
                let _ = tx.send(result);
                thread_shared.finished.store(true, Ordering::SeqCst);
            })?;
        Ok(Waiter {
            shared,
            thread: Some(thread),
            rx: Some(rx),
        })
    }

    /// The slot and its locked file, once the wait succeeds.
    pub async fn wait(&mut self) -> io::Result<(u32, OwnedFd)> {
        let rx = self
            .rx
            .as_mut()
            .ok_or_else(|| io::Error::other("wait already finished"))?;
        let result = rx.await.unwrap_or_else(|_| {
            Err(io::Error::other(
                "the waiting thread ended without an answer",
            ))
        });
        self.rx = None;
        self.join();
        result
    }

    fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let Some(thread) = self.thread.as_ref() else {
            return;
        };
        // Drop the receiver first so a lock taken from now on is released by the thread.
        self.rx = None;
        self.shared.cancelled.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        let _ = rustix::io::write(self.shared.wake.as_fd(), &one.to_ne_bytes());
        let pthread = thread.as_pthread_t();
        while !self.shared.finished.load(Ordering::SeqCst) {
            // SAFETY: the thread has not been joined, so its pthread_t is valid even if it
            // has just returned; the signal's handler is installed and does nothing.
            unsafe {
                libc::pthread_kill(pthread, wait_signal());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.join();
    }
}

fn cancelled_error() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "wait cancelled")
}

/// Blocks on `fd`'s lock until taken or cancelled.
fn lock_blocking(shared: &Shared, fd: BorrowedFd<'_>) -> io::Result<()> {
    loop {
        if shared.cancelled.load(Ordering::SeqCst) {
            return Err(cancelled_error());
        }
        match fs::lock_wait(fd) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn run(shared: &Shared, what: WaitFor) -> io::Result<(u32, OwnedFd)> {
    match what {
        WaitFor::Slot { slot, fd } => {
            lock_blocking(shared, fd.as_fd())?;
            Ok((slot, fd))
        }
        WaitFor::AnySlot {
            gate,
            slots,
            dir_path,
        } => {
            lock_blocking(shared, gate.as_fd())?;
            let notify = Inotify::watch_closes(&dir_path)?;
            let mut slots: Vec<Option<OwnedFd>> = slots.into_iter().map(Some).collect();
            loop {
                if shared.cancelled.load(Ordering::SeqCst) {
                    return Err(cancelled_error());
                }
                for (i, fd) in slots.iter_mut().enumerate() {
                    let Some(f) = fd.as_ref() else { continue };
                    if fs::try_lock(f.as_fd())? {
                        // The gate goes when `gate` drops: the next waiter moves up.
                        let taken = fd.take().ok_or_else(|| io::Error::other("slot vanished"))?;
                        return Ok((i as u32, taken));
                    }
                }
                notify.wait(shared.wake.as_fd(), Duration::from_millis(250))?;
            }
        }
    }
}

/// An inotify watch for releases in one key directory: writes to `gate`, and closes of
/// slot files opened for writing.
struct Inotify {
    fd: OwnedFd,
}

impl Inotify {
    fn watch_closes(dir_path: &str) -> io::Result<Inotify> {
        // SAFETY: no preconditions; we own the returned descriptor.
        let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path = std::ffi::CString::new(dir_path)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: fd is valid and path is NUL-terminated.
        let wd =
            unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_CLOSE_WRITE) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Inotify { fd })
    }

    /// Waits until a release is reported, the wake fd is signalled, a signal arrives, or
    /// `backstop` passes. Events about other files (the token counter, holder records)
    /// are read and ignored without returning.
    fn wait(&self, wake: BorrowedFd<'_>, backstop: Duration) -> io::Result<()> {
        let deadline = std::time::Instant::now() + backstop;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut fds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: fds is a valid array of two pollfd for the duration of the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, left.as_millis() as libc::c_int) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::Interrupted {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            if rc == 0 || fds[1].revents != 0 || self.drain()? {
                return Ok(());
            }
        }
    }

    /// Reads every queued event; true if one of them is a release.
    fn drain(&self) -> io::Result<bool> {
        let mut relevant = false;
        let mut buf = [0u8; 4096];
        loop {
            let n = match rustix::io::read(&self.fd, &mut buf) {
                Ok(0) | Err(rustix::io::Errno::AGAIN) => return Ok(relevant),
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut at = 0;
            // struct inotify_event { int wd; u32 mask; u32 cookie; u32 len; char name[len]; }
            while at + 16 <= n {
                let word =
                    |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
                let mask = word(at + 4);
                let len = word(at + 12) as usize;
                let name = buf.get(at + 16..at + 16 + len).unwrap_or(&[]);
                let name = name.split(|b| *b == 0).next().unwrap_or(&[]);
                let is_slot = name.starts_with(b"slot.");
                if (mask & libc::IN_MODIFY != 0 && name == b"gate")
                    || (mask & libc::IN_CLOSE_WRITE != 0 && is_slot)
                    || mask & libc::IN_Q_OVERFLOW != 0
                {
                    relevant = true;
                }
                at += 16 + len;
            }
        }
    }
}
