//! What stores ask of the kernel, written once: open-file-description locks, the
//! filesystem type, user and group names, a poison-tolerant mutex, backoff jitter.
//!
//! Guarantees:
//! - An OFD lock ([`ofd_try_lock`], [`ofd_lock_wait`]) belongs to one open file
//!   description: another description, in this process or another, conflicts with it,
//!   and the kernel drops it when the description closes, including when its process
//!   dies. [`ofd_is_locked`] sees locks of every other description without taking one.
//! - `EINTR` is retried where waiting is not the point; [`ofd_lock_wait`] returns
//!   `Interrupted` so a caller can look at a signal and decide.
//! - [`lock`] never panics on a poisoned mutex: the data a panicking thread left is
//!   still the store's best knowledge.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Which OFD lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// A shared (read) lock.
    Read,
    /// An exclusive (write) lock.
    Write,
}

/// A byte range of a file: [`Range::WHOLE`], or one byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    start: i64,
    len: i64,
}

impl Range {
    /// The whole file, however long it grows.
    pub const WHOLE: Range = Range { start: 0, len: 0 };

    /// Byte `n` alone (a waiter's ticket, a slot's byte).
    pub fn byte(n: i64) -> Range {
        Range { start: n, len: 1 }
    }
}

fn flock_of(kind: libc::c_int, range: Range) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (l_pid must be 0 for
    // OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = range.start as libc::off_t;
    fl.l_len = range.len as libc::off_t;
    fl
}

fn kind_of(kind: LockKind) -> libc::c_int {
    match kind {
        LockKind::Read => libc::F_RDLCK,
        LockKind::Write => libc::F_WRLCK,
    }
}

fn fcntl(fd: BorrowedFd<'_>, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    // SAFETY: fd is a valid open descriptor; fl points to a valid flock for the call.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, fl as *mut libc::flock) };
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Takes an OFD lock on `range` if no other description holds a conflicting one:
/// `Ok(false)` when one does.
pub fn ofd_try_lock(fd: BorrowedFd<'_>, kind: LockKind, range: Range) -> io::Result<bool> {
    loop {
        let mut fl = flock_of(kind_of(kind), range);
        match fcntl(fd, libc::F_OFD_SETLK, &mut fl) {
            Ok(()) => return Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                return Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Takes an OFD lock on `range`, blocking until no other description holds a conflicting
/// one. Returns `Interrupted` when a signal arrives first.
pub fn ofd_lock_wait(fd: BorrowedFd<'_>, kind: LockKind, range: Range) -> io::Result<()> {
    let mut fl = flock_of(kind_of(kind), range);
    fcntl(fd, libc::F_OFD_SETLKW, &mut fl)
}

/// Drops this description's lock on `range` (it also goes when the description closes).
pub fn ofd_unlock(fd: BorrowedFd<'_>, range: Range) -> io::Result<()> {
    let mut fl = flock_of(libc::F_UNLCK, range);
    fcntl(fd, libc::F_OFD_SETLK, &mut fl)
}

/// Whether another open file description holds a lock on `range` that conflicts with
/// `kind`, tested without taking one.
pub fn ofd_is_locked(fd: BorrowedFd<'_>, kind: LockKind, range: Range) -> io::Result<bool> {
    let mut fl = flock_of(kind_of(kind), range);
    fcntl(fd, libc::F_OFD_GETLK, &mut fl)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))
}

/// `statfs(path).f_type`: the filesystem's magic number.
pub fn fs_type(path: &Path) -> io::Result<u64> {
    let c = cstring(path)?;
    // SAFETY: zeroed statfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The field's type differs by architecture (i64, u32, ...); widen its bits.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 as u64)
}

/// Whether this process may act as a member of group `gid`: root, the effective group, or
/// a supplementary group.
pub fn is_member(gid: u32) -> bool {
    // SAFETY: these calls cannot fail; getgroups writes at most `n` entries.
    unsafe {
        if libc::geteuid() == 0 || libc::getegid() == gid {
            return true;
        }
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n <= 0 {
            return false;
        }
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let n = libc::getgroups(n, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

/// The name of group `gid` from the group database, if it has one.
pub fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed group is a valid out-parameter; buf outlives the call and its
    // length is passed; result points to grp or is null.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrgid_r(
            gid,
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || grp.gr_name.is_null() {
        return None;
    }
    // SAFETY: gr_name points to a NUL-terminated string inside buf.
    let name = unsafe { std::ffi::CStr::from_ptr(grp.gr_name) };
    name.to_str().ok().map(str::to_owned)
}

/// The name of user `uid` from the password database, if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: as in group_name.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || pw.pw_name.is_null() {
        return None;
    }
    // SAFETY: pw_name points to a NUL-terminated string inside buf.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
    name.to_str().ok().map(str::to_owned)
}

/// `'team' (gid 1001)`, or `gid 1001` for a group without a name.
pub fn group_label(gid: u32) -> String {
    match group_name(gid) {
        Some(name) => format!("'{name}' (gid {gid})"),
        None => format!("gid {gid}"),
    }
}

/// This user, for messages: `user 'alice' (uid 1000)`, or `uid 1000` without a name.
pub fn user_label() -> String {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    match user_name(uid) {
        Some(name) => format!("user '{name}' (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// Locks `m`, taking the data over from a thread that panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A small non-cryptographic generator for backoff jitter (xorshift64*), seeded from
/// the clock, the pid and the thread.
#[derive(Debug)]
pub struct Jitter(u64);

impl Default for Jitter {
    fn default() -> Self {
        Jitter::new()
    }
}

impl Jitter {
    /// A generator seeded from this moment, process and thread.
    pub fn new() -> Jitter {
        let local = 0u8;
        let seed = (super::time::monotonic_ns() as u64)
            ^ (u64::from(std::process::id()) << 32)
            ^ (&local as *const u8 as u64).rotate_left(17);
        Jitter(seed | 1)
    }

    /// A uniform value in `[lo, hi]`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        lo + r % (hi.saturating_sub(lo) + 1)
    }

    /// A duration uniform in `[lo, hi]` (microsecond grain).
    pub fn duration(
        &mut self,
        lo: std::time::Duration,
        hi: std::time::Duration,
    ) -> std::time::Duration {
        let lo_us = u64::try_from(lo.as_micros()).unwrap_or(u64::MAX);
        let hi_us = u64::try_from(hi.as_micros()).unwrap_or(u64::MAX);
        std::time::Duration::from_micros(self.between(lo_us, hi_us.max(lo_us)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn ofd_locks_conflict_between_descriptions_and_go_with_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("locks");
        let open = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .expect("open")
        };
        let a = open();
        let b = open();
        assert!(!ofd_is_locked(b.as_fd(), LockKind::Write, Range::byte(7)).expect("probe"));
        assert!(ofd_try_lock(a.as_fd(), LockKind::Read, Range::byte(7)).expect("lock"));
        assert!(ofd_is_locked(b.as_fd(), LockKind::Write, Range::byte(7)).expect("probe"));
        assert!(!ofd_is_locked(b.as_fd(), LockKind::Write, Range::byte(8)).expect("probe"));
        assert!(!ofd_try_lock(b.as_fd(), LockKind::Write, Range::WHOLE).expect("try"));
        drop(a);
        assert!(!ofd_is_locked(b.as_fd(), LockKind::Write, Range::byte(7)).expect("probe"));
        assert!(ofd_try_lock(b.as_fd(), LockKind::Write, Range::WHOLE).expect("try"));
        ofd_unlock(b.as_fd(), Range::WHOLE).expect("unlock");
    }

    #[test]
    fn the_temp_dir_has_a_filesystem_type() {
        let dir = tempfile::tempdir().expect("tmp");
        assert!(fs_type(dir.path()).expect("statfs") != 0);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let mut j = Jitter::new();
        for _ in 0..1000 {
            let v = j.between(10, 20);
            assert!((10..=20).contains(&v));
        }
    }

    #[test]
    fn a_poisoned_mutex_is_still_usable() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = std::sync::Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().expect("lock");
            panic!("poison");
        })
        .join();
        assert_eq!(*lock(&m), 1);
    }
}
