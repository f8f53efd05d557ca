//! File-level helpers: every path is opened relative to a directory descriptor with
//! `O_NOFOLLOW | O_CLOEXEC`, so a symlink planted in the store is refused, never followed.
//! Locks are Linux open-file-description (OFD) locks on the whole file: they belong to the
//! open file, not to the process (so two opens in one process conflict, as two processes
//! do), the kernel drops them when the last descriptor closes (process death included),
//! and `F_OFD_GETLK` tests a lock without taking it.
//!
//! Every file and directory is created under a temporary name, given the store's group and
//! mode ([`Sharing`]), and only then linked or renamed to its real name, so nobody can open
//! a new file while the creator's umask is still on it, and a failed create leaves nothing.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use baton_core::kit::sys::{self, LockKind, Range};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

pub use crate::share::Sharing;

/// The largest file baton reads from the store (holder info, limit, counter).
pub const MAX_SMALL_FILE: usize = 64 * 1024;

/// The width of the token counter file: 20 decimal digits (any u64) and a newline.
pub const COUNTER_LEN: usize = 21;

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

/// Maps an `openat` error, naming a symlink planted where a file belongs as corruption.
fn open_errno(e: rustix::io::Errno, name: &str) -> io::Error {
    if e == rustix::io::Errno::LOOP {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("'{name}' is a symlink (refusing to follow it)"),
        )
    } else {
        errno(e)
    }
}

/// Opens (creating if `create`) the regular file `name` in `dir`, read-write, without
/// following symlinks. Anything but a regular file is refused with `InvalidData`.
///
/// A new file is made under a temporary name, given `share`'s group and mode, and only
/// then linked into place: nobody ever opens it with the creator's umask still on it.
pub fn open_file(
    dir: BorrowedFd<'_>,
    name: &str,
    create: bool,
    share: Sharing,
) -> io::Result<OwnedFd> {
    let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    loop {
        match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => {
                check_regular(&fd, name)?;
                return Ok(fd);
            }
            Err(rustix::io::Errno::NOENT) if create => {}
            Err(e) => return Err(open_errno(e, name)),
        }
        let tmp = temp_name(name);
        let fd = create_temp(dir, &tmp, 0o666, share)?;
        let linked = link_into_place(dir, &tmp, name, &fd);
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
        match linked {
            Ok(true) => return Ok(fd),
            // Someone else created it meanwhile: open theirs.
            Ok(false) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Creates the temporary file `tmp` in `dir` (read-write, exclusive, not following a
/// symlink) with `mode` for a private store and `share`'s group and mode otherwise.
fn create_temp(dir: BorrowedFd<'_>, tmp: &str, mode: u32, share: Sharing) -> io::Result<OwnedFd> {
    let fd = rustix::fs::openat(
        dir,
        tmp,
        OFlags::RDWR
            | OFlags::CREATE
            | OFlags::EXCL
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | OFlags::NONBLOCK,
        Mode::from_raw_mode(mode),
    )
    .map_err(errno)?;
    if let Err(e) = share.fix(fd.as_fd(), false) {
        let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::empty());
        return Err(e);
    }
    Ok(fd)
}

/// Links the temporary file `tmp` (open as `fd`) to `name`: `Ok(false)` when `name`
/// exists already.
fn link_into_place(dir: BorrowedFd<'_>, tmp: &str, name: &str, fd: &OwnedFd) -> io::Result<bool> {
    match rustix::fs::linkat(dir, tmp, dir, name, AtFlags::empty()) {
        Ok(()) => Ok(true),
        // Over NFS a retransmitted LINK can fail although the first one worked: the
        // temporary file's link count says what really happened.
        Err(_) if rustix::fs::fstat(fd).is_ok_and(|st| st.st_nlink >= 2) => Ok(true),
        Err(rustix::io::Errno::EXIST) => Ok(false),
        Err(e) => Err(errno(e)),
    }
}

/// Opens `name` in `dir` read-only if it exists (`Ok(None)` if not), without following
/// symlinks; anything but a regular file is refused.
pub fn open_existing_ro(dir: BorrowedFd<'_>, name: &str) -> io::Result<Option<OwnedFd>> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => {
            check_regular(&fd, name)?;
            Ok(Some(fd))
        }
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(open_errno(e, name)),
    }
}

fn check_regular(fd: &OwnedFd, name: &str) -> io::Result<()> {
    let st = rustix::fs::fstat(fd).map_err(errno)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("'{name}' is not a regular file"),
        ));
    }
    Ok(())
}

/// Opens the directory `name` in `dir`, creating it if `create`, without following a
/// symlink. `Ok(None)` when it does not exist and `create` is false.
///
/// A new directory is made under a temporary name, given `share`'s group and mode, filled
/// by `fill` (the key's limit file, so that no key is ever seen without it), and only
/// then renamed into place (never over an existing one). Should `fill` fail, nothing is
/// left behind.
pub fn open_dir(
    dir: BorrowedFd<'_>,
    name: &str,
    create: bool,
    share: Sharing,
    fill: &dyn Fn(BorrowedFd<'_>) -> io::Result<()>,
) -> io::Result<Option<OwnedFd>> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    // A directory removed right after it was made (a key deleted at once) is made again,
    // a few times.
    let mut made = 0;
    loop {
        match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => return Ok(Some(fd)),
            Err(rustix::io::Errno::NOENT) if create && made < 16 => {}
            Err(rustix::io::Errno::NOENT) if !create => return Ok(None),
            Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
                // O_NOFOLLOW | O_DIRECTORY answers ENOTDIR for a symlink: say which it is.
                let is_link = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
                    .unwrap_or(false);
                let what = if is_link {
                    "a symlink (refusing to follow it)"
                } else {
                    "not a directory"
                };
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("'{name}' is {what}"),
                ));
            }
            Err(e) => return Err(errno(e)),
        }
        made += 1;
        create_dir(dir, name, share, fill)?;
    }
}

/// Creates directory `name` in `dir` by way of a temporary one (see [`open_dir`]); an
/// existing `name` is left as it is.
fn create_dir(
    dir: BorrowedFd<'_>,
    name: &str,
    share: Sharing,
    fill: &dyn Fn(BorrowedFd<'_>) -> io::Result<()>,
) -> io::Result<()> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let tmp = temp_name(name);
    rustix::fs::mkdirat(dir, tmp.as_str(), Mode::from_raw_mode(0o777)).map_err(errno)?;
    let result = rustix::fs::openat(dir, tmp.as_str(), flags, Mode::empty())
        .map_err(errno)
        .and_then(|fd| {
            share.fix(fd.as_fd(), true)?;
            fill(fd.as_fd())?;
            Ok(fd)
        })
        .and_then(|fd| {
            match rustix::fs::renameat_with(
                dir,
                tmp.as_str(),
                dir,
                name,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => Ok(None),
                Err(rustix::io::Errno::EXIST) => Ok(Some(fd)),
                // A filesystem without RENAME_NOREPLACE: create it in place instead.
                Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o777)) {
                        Ok(()) => {
                            let made = rustix::fs::openat(dir, name, flags, Mode::empty())
                                .map_err(errno)?;
                            share.fix(made.as_fd(), true)?;
                            fill(made.as_fd())?;
                        }
                        Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(errno(e)),
                    }
                    Ok(Some(fd))
                }
                Err(e) => Err(errno(e)),
            }
        });
    match result {
        // Renamed into place: nothing left to clean.
        Ok(None) => Ok(()),
        Ok(Some(fd)) => {
            remove_tree(dir, &tmp, fd.as_fd());
            Ok(())
        }
        Err(e) => {
            if let Ok(fd) = rustix::fs::openat(dir, tmp.as_str(), flags, Mode::empty()) {
                remove_tree(dir, &tmp, fd.as_fd());
            } else {
                let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::REMOVEDIR);
            }
            Err(e)
        }
    }
}

/// Removes the directory `name` of `dir` and the files in it, as far as it can: a
/// subdirectory in it (baton never makes one) keeps it, and so may a file someone creates
/// in it meanwhile, after a few tries. True when it is gone.
pub fn remove_dir(dir: BorrowedFd<'_>, name: &str) -> bool {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    for _ in 0..8 {
        let Ok(fd) = rustix::fs::openat(dir, name, flags, Mode::empty()) else {
            return true;
        };
        remove_tree(dir, name, fd.as_fd());
        std::thread::yield_now();
    }
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).is_err()
}

/// The names [`deleted_name`] gave `name` in `dir`: directories of a deleted key that
/// are still there.
pub fn deleted_names(dir: BorrowedFd<'_>, name: &str) -> io::Result<Vec<String>> {
    let prefix = format!(".{name}.deleted.");
    Ok(entries_of_all(dir)?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

/// Removes the temporary directory `tmp` of `dir` (open as `fd`) and the files in it.
fn remove_tree(dir: BorrowedFd<'_>, tmp: &str, fd: BorrowedFd<'_>) {
    if let Ok(all) = entries_of_all(fd) {
        for name in all {
            let _ = rustix::fs::unlinkat(fd, name.as_str(), AtFlags::empty());
        }
    }
    let _ = rustix::fs::unlinkat(dir, tmp, AtFlags::REMOVEDIR);
}

/// Every name in `dir` but `.` and `..`.
fn entries_of_all(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut entries = rustix::fs::Dir::read_from(dir).map_err(errno)?;
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(errno)?;
        let Ok(name) = entry.file_name().to_str() else {
            continue;
        };
        if name != "." && name != ".." {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// Reads a whole small file (at most [`MAX_SMALL_FILE`] bytes), in 4 KiB chunks, so that
/// the usual few-byte file costs no large zeroed buffer.
pub fn read_small(fd: BorrowedFd<'_>, name: &str) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = rustix::io::pread(fd, &mut chunk, out.len() as u64).map_err(errno)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&chunk[..n]);
        if out.len() > MAX_SMALL_FILE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("'{name}' is larger than {MAX_SMALL_FILE} bytes"),
            ));
        }
    }
}

/// Writes `contents` to `name` in `dir` atomically: a temporary file in the same
/// directory, then `rename` over the target. Readers see the old or the new file whole.
pub fn write_atomic(
    dir: BorrowedFd<'_>,
    name: &str,
    contents: &[u8],
    share: Sharing,
) -> io::Result<()> {
    let tmp = temp_name(name);
    let fd = create_temp(dir, &tmp, 0o644, share)?;
    let result = write_all(fd.as_fd(), contents)
        .and_then(|()| rustix::fs::renameat(dir, tmp.as_str(), dir, name).map_err(errno));
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    }
    result
}

/// Creates `name` in `dir` with `contents` only if it does not exist yet, atomically
/// (temporary file, then `link`, which fails if the target exists). Returns `false` when
/// the file existed already; its contents are then someone else's.
pub fn create_once(
    dir: BorrowedFd<'_>,
    name: &str,
    contents: &[u8],
    share: Sharing,
) -> io::Result<bool> {
    let tmp = temp_name(name);
    let fd = create_temp(dir, &tmp, 0o644, share)?;
    let result =
        write_all(fd.as_fd(), contents).and_then(|()| link_into_place(dir, &tmp, name, &fd));
    let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    result
}

fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = rustix::io::write(fd, data).map_err(errno)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// A temporary name beside `name` that no other process or thread uses.
fn temp_name(name: &str) -> String {
    unique_name(name, "tmp")
}

/// The name a deleted key's directory `name` is renamed to before it is removed: no
/// other process or thread uses it, and it starts with `.`, so it is never a key.
pub fn deleted_name(name: &str) -> String {
    unique_name(name, "deleted")
}

fn unique_name(name: &str, what: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        ".{name}.{what}.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes `name` from `dir`; a missing file is not an error.
pub fn remove(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(errno(e)),
    }
}

/// The names of the subdirectories of `dir` (not following symlinks; others skipped).
pub fn subdirs(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    entries(dir, FileType::Directory)
}

/// Every name in `dir` that does not start with `.`, and whether it is a regular file
/// (not following symlinks).
pub fn names(dir: BorrowedFd<'_>) -> io::Result<Vec<(String, bool)>> {
    let all = entries_of(dir, None)?;
    Ok(all
        .into_iter()
        .map(|(n, t)| (n, t == FileType::RegularFile))
        .collect())
}

fn entries(dir: BorrowedFd<'_>, want: FileType) -> io::Result<Vec<String>> {
    Ok(entries_of(dir, Some(want))?
        .into_iter()
        .map(|(n, _)| n)
        .collect())
}

fn entries_of(dir: BorrowedFd<'_>, want: Option<FileType>) -> io::Result<Vec<(String, FileType)>> {
    let mut out = Vec::new();
    let mut entries = rustix::fs::Dir::read_from(dir).map_err(errno)?;
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(errno)?;
        let name: &CStr = entry.file_name();
        let Ok(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let kind = match entry.file_type() {
            FileType::Unknown => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| FileType::from_raw_mode(st.st_mode))
                .unwrap_or(FileType::Unknown),
            t => t,
        };
        if want.is_none_or(|w| w == kind) {
            out.push((name.to_owned(), kind));
        }
    }
    Ok(out)
}

/// Takes an exclusive OFD lock on the whole file if no other open file description
/// holds one: `Ok(false)` when one does.
pub fn try_lock(fd: BorrowedFd<'_>) -> io::Result<bool> {
    sys::ofd_try_lock(fd, LockKind::Write, Range::WHOLE)
}

/// Takes an exclusive OFD lock on the whole file, blocking until it is free. Returns
/// `Interrupted` when a signal arrives first (the caller decides whether to go on).
pub fn lock_wait(fd: BorrowedFd<'_>) -> io::Result<()> {
    sys::ofd_lock_wait(fd, LockKind::Write, Range::WHOLE)
}

/// Drops this open file description's lock (the lock also goes when the fd closes).
pub fn unlock(fd: BorrowedFd<'_>) -> io::Result<()> {
    sys::ofd_unlock(fd, Range::WHOLE)
}

/// Whether another open file description holds a lock on the file, tested without
/// taking one.
pub fn is_locked(fd: BorrowedFd<'_>) -> io::Result<bool> {
    sys::ofd_is_locked(fd, LockKind::Write, Range::WHOLE)
}

/// Reads the token counter: `Ok(None)` for an empty (new) counter, `InvalidData` for
/// anything that is not exactly [`COUNTER_LEN`] bytes of digits and a newline.
pub fn read_counter(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    // One read: a regular file's read is short only at its end, and one byte more than a
    // record tells a longer (foreign) file from a record.
    let mut buf = [0u8; COUNTER_LEN + 1];
    let len = rustix::io::pread(fd, &mut buf, 0).map_err(errno)?;
    let bytes = &buf[..len];
    if bytes.is_empty() {
        return Ok(None);
    }
    let garbage = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the token counter holds {:?}, not a number baton wrote",
                String::from_utf8_lossy(bytes)
            ),
        )
    };
    if bytes.len() != COUNTER_LEN || bytes[COUNTER_LEN - 1] != b'\n' {
        return Err(garbage());
    }
    let text = std::str::from_utf8(&bytes[..COUNTER_LEN - 1]).map_err(|_| garbage())?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(garbage());
    }
    text.parse().map(Some).map_err(|_| garbage())
}

/// Writes the token counter in place: one `pwrite` of a fixed-width record, so a reader
/// sees the old or the new value, and a writer killed before the write leaves the old.
pub fn write_counter(fd: BorrowedFd<'_>, value: u64) -> io::Result<()> {
    let record = format!("{value:020}\n");
    let n = rustix::io::pwrite(fd, record.as_bytes(), 0).map_err(errno)?;
    if n != record.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write to the token counter",
        ));
    }
    Ok(())
}
