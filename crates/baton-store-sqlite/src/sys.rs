//! What the store asks of the kernel: the boot-time clock, the filesystem type of the
//! database's directory, and open-file-description locks that mark a waiter alive.
//!
//! Guarantees:
//! - [`monotonic_ns`] never goes back and is the same clock for every process of the host
//!   (nanoseconds since boot, not counting suspend): the clock the holder's keeper
//!   measures its TTL on (`std::time::Instant`), so the store never counts time the
//!   holder cannot count.
//! - A [`TicketLock`] is held by exactly one open file description; the kernel drops it
//!   when that description is closed, including when its process dies. [`Probe`] sees
//!   locks held by any other open file description, in this process or another.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Nanoseconds on `CLOCK_MONOTONIC`: host-wide, never going back, reset only by a reboot
/// (which the boot id detects), not advancing during suspend.
pub(crate) fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for clock_gettime to write; CLOCK_MONOTONIC always
    // exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // time_t and c_long are i64 on 64-bit Linux, i32 on some 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    (ts.tv_sec as i64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as i64)
}

/// Filesystems on which SQLite's WAL mode is unsafe, by `statfs` `f_type` magic.
///
/// WAL keeps its index in a shared-memory file (`-shm`) that every connection maps; on a
/// filesystem shared by several hosts each host maps its own copy, and POSIX locks may
/// be emulated or not propagated, so two hosts can both believe they hold the write
/// lock. SQLite's documentation: "WAL does not work over a network filesystem".
pub const NETWORK_FILESYSTEMS: &[(u32, &str)] = &[
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFE53_4D42, "SMB2"),
    (0xFF53_4D42, "CIFS"),
    (0x0BD0_0BD0, "Lustre"),
    (0x0102_1997, "9p"),
    (0x6573_5546, "FUSE"),
];

/// The name of the network filesystem whose `statfs` `f_type` is `f_type`, or `None` for
/// a filesystem not in [`NETWORK_FILESYSTEMS`].
///
/// `f_type` is a signed word on some architectures; only its low 32 bits are the magic.
pub fn network_filesystem(f_type: u64) -> Option<&'static str> {
    let magic = (f_type & 0xFFFF_FFFF) as u32;
    NETWORK_FILESYSTEMS
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// `statfs(path).f_type`.
pub(crate) fn fs_type(path: &Path) -> io::Result<u64> {
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

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))
}

/// Opens the waiter lock file (created readable by all, like the database's own side
/// files; a read-only descriptor is enough to take and test read locks).
fn open_lock_file(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path)?;
    // SAFETY: c is NUL-terminated; open returns a new descriptor or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The group that shares directory `dir`: its group when it has the setgid bit and the
/// group may read, write and search it (`install -d -m 2770 -g team /srv/db`), as the
/// directory store decides. `None` for a private directory.
pub(crate) fn shared_group(dir: &Path) -> io::Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir)?;
    Ok((meta.mode() & 0o2070 == 0o2070).then_some(meta.gid()))
}

/// Creates `path` empty, owned by group `gid` and mode 0660, before it gets its name (a
/// temporary file, fixed, then linked into place), so no member ever finds it with the
/// creator's umask on it. An existing file is left as it is. SQLite gives the `-wal` and
/// `-shm` files it creates later the database file's mode (and, in a setgid directory,
/// the directory's group).
pub(crate) fn create_shared(path: &Path, gid: u32) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    let mut tmp = path.as_os_str().to_owned();
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tmp.push(format!(".baton-tmp.{}.{seq}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let c = cstring(&tmp)?;
    // SAFETY: c is NUL-terminated; open returns a new descriptor or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            0o600 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let fixed = (|| {
        let file = std::fs::File::from(fd);
        let st = file.metadata()?;
        // SAFETY: the descriptor is open; uid -1 keeps the owner.
        if st.gid() != gid && unsafe { libc::fchown(file.as_raw_fd(), u32::MAX, gid) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor is open.
        if unsafe { libc::fchmod(file.as_raw_fd(), 0o660) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Closed before the file becomes the database: closing any descriptor of a
        // database drops every POSIX lock this process's SQLite connections hold on it.
        drop(file);
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    fixed
}

/// Whether this process may read and write `path`, by its effective ids, asked without
/// opening it (closing a descriptor of a database would drop the POSIX locks this
/// process's SQLite connections hold on it). A missing file answers `Ok`.
pub(crate) fn check_writable(path: &Path) -> io::Result<()> {
    let c = cstring(path)?;
    // SAFETY: c is NUL-terminated; faccessat only reads it.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::R_OK | libc::W_OK,
            libc::AT_EACCESS,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::NotFound => Ok(()),
        _ => Err(e),
    }
}

/// Whether this process may act as a member of group `gid`.
pub(crate) fn is_member(gid: u32) -> bool {
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

/// This user, for messages: `user 'alice' (uid 1000)`, or `uid 1000` without a name.
pub(crate) fn user_label() -> String {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed passwd is a valid out-parameter; buf outlives the call and its length
    // is passed; result points to pw or is null.
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
        return format!("uid {uid}");
    }
    // SAFETY: pw_name points to a NUL-terminated string inside buf.
    match unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }.to_str() {
        Ok(name) => format!("user '{name}' (uid {uid})"),
        Err(_) => format!("uid {uid}"),
    }
}

/// `'team' (gid 1001)`, or `gid 1001` for a group without a name.
pub(crate) fn group_label(gid: u32) -> String {
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: zeroed group is a valid out-parameter; buf outlives the call and its length
    // is passed; result points to grp or is null.
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
        return format!("gid {gid}");
    }
    // SAFETY: gr_name points to a NUL-terminated string inside buf.
    match unsafe { std::ffi::CStr::from_ptr(grp.gr_name) }.to_str() {
        Ok(name) => format!("'{name}' (gid {gid})"),
        Err(_) => format!("gid {gid}"),
    }
}

fn flock_at(kind: libc::c_int, offset: i64) -> libc::flock {
    // SAFETY: an all-zero flock is valid (l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = offset as libc::off_t;
    fl.l_len = 1;
    fl
}

/// A waiter's proof of life: a read lock on byte `ticket` of the lock file, held by an
/// open file description of its own. Dropping it (or the process dying) drops the lock.
#[derive(Debug)]
pub(crate) struct TicketLock {
    _fd: OwnedFd,
}

impl TicketLock {
    /// Locks byte `ticket` of `path`, without waiting (nobody else ever locks it: ticket
    /// numbers are never reused).
    pub(crate) fn take(path: &Path, ticket: i64) -> io::Result<TicketLock> {
        let fd = open_lock_file(path)?;
        let fl = flock_at(libc::F_RDLCK, ticket);
        loop {
            // SAFETY: fd is open; fl is a valid flock.
            let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
            if rc == 0 {
                return Ok(TicketLock { _fd: fd });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Tests whether the waiter holding a ticket is still alive.
#[derive(Debug)]
pub(crate) struct Probe {
    fd: Option<OwnedFd>,
    path: std::path::PathBuf,
}

impl Probe {
    /// A probe on the lock file at `path`, opened on first use.
    pub(crate) fn new(path: &Path) -> Probe {
        Probe {
            fd: None,
            path: path.to_owned(),
        }
    }

    /// True when some open file description holds byte `ticket`, or when that cannot be
    /// told (the safe answer: the ticket then lives until its TTL).
    pub(crate) fn alive(&mut self, ticket: i64) -> bool {
        if self.fd.is_none() {
            match open_lock_file(&self.path) {
                Ok(fd) => self.fd = Some(fd),
                Err(_) => return true,
            }
        }
        let Some(fd) = &self.fd else { return true };
        let mut fl = flock_at(libc::F_WRLCK, ticket);
        // SAFETY: fd is open; fl is a valid flock that F_OFD_GETLK overwrites.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        rc != 0 || fl.l_type != libc::F_UNLCK as libc::c_short
    }
}

/// A small non-cryptographic generator for backoff jitter (xorshift64*), seeded from
/// the clock, the pid and the thread.
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new() -> Jitter {
        let local = 0u8;
        let seed = (monotonic_ns() as u64)
            ^ (u64::from(std::process::id()) << 32)
            ^ (&local as *const u8 as u64).rotate_left(17);
        Jitter(seed | 1)
    }

    /// A uniform value in `[lo, hi]` (both in microseconds).
    pub(crate) fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        lo + r % (hi.saturating_sub(lo) + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_filesystems_are_recognised() {
        assert_eq!(network_filesystem(0x6969), Some("NFS"));
        assert_eq!(network_filesystem(0x517B), Some("SMB"));
        assert_eq!(network_filesystem(0xFE53_4D42), Some("SMB2"));
        assert_eq!(network_filesystem(0xFF53_4D42), Some("CIFS"));
        // A signed f_type (i64 on x86_64) sign-extends the high magics.
        assert_eq!(
            network_filesystem(0xFF53_4D42_u32 as i32 as i64 as u64),
            Some("CIFS")
        );
        assert_eq!(network_filesystem(0x0BD0_0BD0), Some("Lustre"));
        assert_eq!(network_filesystem(0x0102_1997), Some("9p"));
        assert_eq!(network_filesystem(0x6573_5546), Some("FUSE"));
        // ext4, xfs, btrfs, tmpfs, overlayfs are local.
        for local in [
            0xEF53_u64,
            0x5846_5342,
            0x9123_683E,
            0x0102_1994,
            0x794C_7630,
        ] {
            assert_eq!(network_filesystem(local), None, "{local:#x}");
        }
    }

    #[test]
    fn the_temp_dir_is_local() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = fs_type(dir.path()).expect("statfs");
        assert_eq!(network_filesystem(t), None, "{t:#x}");
    }

    #[test]
    fn ticket_locks_are_seen_by_other_descriptions_and_dropped_with_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("locks");
        let mut probe = Probe::new(&path);
        assert!(!probe.alive(7));
        let lock = TicketLock::take(&path, 7).expect("lock");
        assert!(probe.alive(7));
        assert!(!probe.alive(8));
        // Another lock in the same process is another open file description.
        let other = TicketLock::take(&path, 8).expect("lock");
        assert!(probe.alive(8));
        drop(lock);
        assert!(!probe.alive(7));
        assert!(probe.alive(8));
        drop(other);
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
