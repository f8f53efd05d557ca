//! What the store asks of the kernel that is SQLite's own: which filesystems are unsafe
//! for WAL, the files created for a group before SQLite opens them, and the
//! open-file-description locks that mark a waiter alive (built on
//! `baton_core::kit::sys`, which also has the clock, the filesystem type and the user and
//! group names this store uses).
//!
//! Guarantees:
//! - A [`TicketLock`] is held by exactly one open file description; the kernel drops it
//!   when that description is closed, including when its process dies. [`Probe`] sees
//!   locks held by any other open file description, in this process or another.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use baton_core::kit::sys::{ofd_is_locked, ofd_try_lock, LockKind, Range};

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
        if ofd_try_lock(fd.as_fd(), LockKind::Read, Range::byte(ticket))? {
            Ok(TicketLock { _fd: fd })
        } else {
            Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("byte {ticket} of the waiter file is locked by another description"),
            ))
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
        ofd_is_locked(fd.as_fd(), LockKind::Write, Range::byte(ticket)).unwrap_or(true)
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
        let t = baton_core::kit::sys::fs_type(dir.path()).expect("statfs");
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
}
