//! What both modes of the directory store share: the root directory (checked and opened
//! once), key directories (opened without following symlinks, cached per key), the limit
//! file, the mode marker, listing keys, and how I/O errors become baton errors.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::kit::sys::lock;
use baton_core::kit::{errors, status};
use baton_core::{
    AcquireRequest, Error, ErrorKind, Holder, Key, Op, Resize, SlotStatus, StoreUrl, Token,
};

use crate::config::{DirConfig, Mode};
use crate::fs;
use crate::share::{self, Sharing};

mod retire;

/// An open store directory.
#[derive(Debug)]
pub(crate) struct Root {
    pub url: StoreUrl,
    pub config: DirConfig,
    /// Who the files this store creates are for: its directory's group, when the
    /// directory says it is shared (see `share.rs`).
    pub share: Sharing,
    fd: OwnedFd,
    keys: Mutex<HashMap<Key, KeyDir>>,
}

#[derive(Debug)]
struct KeyDir {
    dir: Arc<OwnedFd>,
    limit: u32,
}

/// The file in the root that records which mode the store is in, so that a kernel-mode
/// and a lease-mode process never lock the same key by different means.
const MODE_FILE: &str = ".baton-mode";

/// How many times a request opens a key again because the key was deleted under it (a
/// bound against a loop that never ends, far above what deletes in a tight loop cause).
pub(crate) const DELETED_TRIES: u32 = 1000;

/// The directory of barriers in the root (`+` is never in a key).
const BARRIERS: &str = "+barriers";

impl Root {
    /// Opens the store directory of `url`, which must ask for `mode` (`hint` says how to
    /// open a URL of the other mode).
    pub fn open_in(url: &StoreUrl, mode: Mode, hint: &str) -> Result<Root, Error> {
        let root = Root::open(url)?;
        if root.config.mode != mode {
            return Err(Error::new(ErrorKind::InvalidInput, hint.to_owned())
                .with_op(Op::Open)
                .with_store(url));
        }
        Ok(root)
    }

    /// Opens (creating if needed) the store directory of `url`, in the mode it asks for.
    pub fn open(url: &StoreUrl) -> Result<Root, Error> {
        let config = DirConfig::from_url(url)?;
        let mut shown = format!("dir:{}", config.root.display());
        if config.mode == Mode::Lease {
            shown.push_str("?mode=lease");
        }
        let shown = StoreUrl::parse(&shown).unwrap_or_else(|_| url.clone());
        let fail = |kind: ErrorKind, msg: String| {
            Error::new(kind, msg).with_op(Op::Open).with_store(&shown)
        };
        // What the store's directory refuses (permissions, a symlink, another owner, the
        // other mode) does not change by itself: no retry helps.
        let fail_with = |(kind, msg, e): RootError| match e {
            Some(e) if !share::is_denied(&e) => fail(kind, msg).with_source(e),
            Some(e) => fail(kind, msg).with_source(e).permanent(),
            None => fail(kind, msg).permanent(),
        };
        let fd = open_root(&config).map_err(fail_with)?;
        // The default directory is this user's alone, whatever its bits say.
        let share = if config.is_default {
            Sharing::Private
        } else {
            Sharing::of_dir(fd.as_fd()).map_err(|e| {
                fail(
                    ErrorKind::Unavailable,
                    format!("cannot stat the store directory {}", config.root.display()),
                )
                .with_source(e)
            })?
        };
        check_mode(&fd, config.mode, share, &config.root).map_err(fail_with)?;
        Ok(Root {
            url: shown,
            config,
            share,
            fd,
            keys: Mutex::new(HashMap::new()),
        })
    }

    /// An error about `key` in this store.
    pub fn err(&self, kind: ErrorKind, op: Op, key: &Key, msg: impl Into<String>) -> Error {
        Error::new(kind, msg)
            .with_op(op)
            .with_key(key)
            .with_store(&self.url)
    }

    /// A bare error (a `kit::errors` one) given this store's context for `key`.
    pub fn ctx(&self, e: Error, op: Op, key: &Key) -> Error {
        e.context(op, Some(key), &self.url)
    }

    /// An I/O error about `key`: `InvalidData` (something baton did not write, a symlink)
    /// is `Corrupt`; a permission error is a permanent `Unavailable` (with who may write
    /// the store); anything else is `Unavailable`.
    pub fn io_err(&self, op: Op, key: &Key, what: &str, e: io::Error) -> Error {
        let kind = if e.kind() == io::ErrorKind::InvalidData {
            ErrorKind::Corrupt
        } else {
            ErrorKind::Unavailable
        };
        if share::is_denied(&e) {
            let hint = self.share.denied_hint(&self.config.root);
            return self
                .err(kind, op, key, format!("{what} ({hint})"))
                .with_source(e)
                .permanent();
        }
        self.err(kind, op, key, what.to_owned()).with_source(e)
    }

    /// The directory and limit for an acquire: creates the key with the request's limit
    /// if it is new, and refuses a request whose limit differs from the key's.
    pub fn key_for_acquire(&self, req: &AcquireRequest) -> Result<(Arc<OwnedFd>, u32), Error> {
        req.validate()
            .map_err(|e| e.context(Op::Acquire, Some(&req.key), &self.url))?;
        let key = &req.key;
        let delay_ms = req
            .lock_delay
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .filter(|ms| *ms > 0);
        let (dir, limit) = self
            .key_dir(key, Some((req.limit, delay_ms)), Op::Acquire)?
            .ok_or_else(|| {
                self.err(
                    ErrorKind::Unavailable,
                    Op::Acquire,
                    key,
                    "the key's directory vanished",
                )
            })?;
        if limit != req.limit {
            return Err(self.ctx(errors::limit_mismatch(limit, req.limit), Op::Acquire, key));
        }
        Ok((dir, limit))
    }

    /// The key's directory and limit, creating the key with `create`'s limit and
    /// lock-delay (ms) if it is new; `Ok(None)` when the key does not exist and `create` is
    /// `None`.
    pub fn key_dir(
        &self,
        key: &Key,
        create: Option<(u32, Option<u64>)>,
        op: Op,
    ) -> Result<Option<(Arc<OwnedFd>, u32)>, Error> {
        let cached = lock(&self.keys).get(key).map(|k| (k.dir.clone(), k.limit));
        if let Some((dir, limit)) = cached {
            // A directory deleted (or replaced) under a long-lived process must not be
            // used: others lock the files of the one at the key's name.
            if self.is_current(key, &dir) {
                // Lease mode supports resize: its limit is read afresh every time.
                if self.config.mode == Mode::Lease {
                    match self.read_limit(&dir, key, op) {
                        Ok(limit) => return Ok(Some((dir, limit))),
                        // Deleted just now: open it again by name, below.
                        Err(_) if !self.is_current(key, &dir) => {}
                        Err(e) => return Err(e),
                    }
                } else {
                    return Ok(Some((dir, limit)));
                }
            }
        }
        let name = dir_name(key);
        let record = create.map(|(want, delay_ms)| limit_record(want, delay_ms));
        // A new key's directory gets its limit file before it gets its name: nobody sees
        // the key without its limit, and a create that fails leaves no key behind.
        let fill = |new: std::os::fd::BorrowedFd<'_>| -> io::Result<()> {
            match &record {
                Some(r) => fs::create_once(new, "limit", r.as_bytes(), self.share).map(|_| ()),
                None => Ok(()),
            }
        };
        // A key deleted while this opens it (see `root/retire.rs`) loses its files under
        // us: that is not an error but a key to open again by name.
        let mut tries = 0;
        let (dir, limit) = loop {
            let dir = fs::open_dir(self.fd.as_fd(), &name, create.is_some(), self.share, &fill)
                .map_err(|e| self.io_err(op, key, "cannot open the key's directory", e))?;
            let Some(dir) = dir else { return Ok(None) };
            match self.limit_of_opened(&dir, key, create, &record, op) {
                Ok(Some(limit)) => break (dir, limit),
                Ok(None) => return Ok(None),
                Err(e) => {
                    tries += 1;
                    if tries < DELETED_TRIES && !self.is_current(key, &dir) {
                        continue;
                    }
                    return Err(e);
                }
            }
        };
        let dir = Arc::new(dir);
        lock(&self.keys).insert(
            key.clone(),
            KeyDir {
                dir: dir.clone(),
                limit,
            },
        );
        Ok(Some((dir, limit)))
    }

    /// The limit of a key directory just opened, recorded first with `record` when
    /// `create` asks for it: `None` when the key is not (or not yet) there.
    fn limit_of_opened(
        &self,
        dir: &OwnedFd,
        key: &Key,
        create: Option<(u32, Option<u64>)>,
        record: &Option<String>,
        op: Op,
    ) -> Result<Option<u32>, Error> {
        match create {
            Some((want, _)) => {
                // The lock-delay lives in the limit file, so that a key is created with
                // both at once (one `link`) and no reader ever sees one without the other.
                // A directory left without one (by a crash of an older baton) gets it here.
                let record = record.clone().unwrap_or_default();
                match fs::create_once(dir.as_fd(), "limit", record.as_bytes(), self.share) {
                    Ok(true) => Ok(Some(want)),
                    Ok(false) => self.read_limit(dir, key, op).map(Some),
                    Err(e) => Err(self.io_err(op, key, "cannot record the key's limit", e)),
                }
            }
            None => {
                // A directory without its limit file is a key being created right now
                // (the directory comes first, then the limit file in one `link`): not
                // there yet for a reader, never a guess at its limit.
                if fs::open_existing_ro(dir.as_fd(), "limit")
                    .map_err(|e| self.io_err(op, key, "cannot open the key's limit file", e))?
                    .is_none()
                {
                    return Ok(None);
                }
                self.read_limit(dir, key, op).map(Some)
            }
        }
    }

    /// The key's directory and limit for `status`, `break` and `resize`: `NotFound` if
    /// the key does not exist.
    pub fn existing_key(&self, key: &Key, op: Op) -> Result<(Arc<OwnedFd>, u32), Error> {
        self.key_dir(key, None, op)?.ok_or_else(|| {
            let e = if op == Op::Resize {
                errors::no_such_key_to_resize()
            } else {
                errors::no_such_key()
            };
            self.ctx(e, op, key)
        })
    }

    fn read_limit(&self, dir: &OwnedFd, key: &Key, op: Op) -> Result<u32, Error> {
        self.read_meta(dir, key, op).map(|(limit, _)| limit)
    }

    /// The key's lock-delay (lease mode), read afresh from its limit file: `None` when it
    /// has none. A malformed file is `Corrupt`, never "no delay".
    pub fn lock_delay(&self, dir: &OwnedFd, key: &Key, op: Op) -> Result<Option<Duration>, Error> {
        self.read_meta(dir, key, op)
            .map(|(_, ms)| ms.map(Duration::from_millis))
    }

    /// The limit file: `N\n`, then `lock-delay-ms D\n` when the key has a lock-delay.
    fn read_meta(&self, dir: &OwnedFd, key: &Key, op: Op) -> Result<(u32, Option<u64>), Error> {
        let corrupt = |what: &str, why: String| self.ctx(errors::corrupt(what, why), op, key);
        let fd = fs::open_existing_ro(dir.as_fd(), "limit")
            .map_err(|e| self.io_err(op, key, "cannot open the key's limit file", e))?
            .ok_or_else(|| corrupt("the key's directory", "has no limit file".into()))?;
        let bytes = fs::read_small(fd.as_fd(), "limit")
            .map_err(|e| self.io_err(op, key, "cannot read the key's limit file", e))?;
        parse_limit_record(&bytes).ok_or_else(|| {
            corrupt(
                "the key's limit file",
                format!(
                    "holds {:?}, not a limit baton wrote",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
                ),
            )
        })
    }

    /// Changes a key's limit (lease mode): the limit file is replaced atomically. Two
    /// resizes take turns on the key's `resize` lock file, so a relative change counts
    /// from the limit it replaces.
    pub fn set_limit(&self, key: &Key, change: Resize) -> Result<(), Error> {
        let op = Op::Resize;
        let (dir, _) = self.existing_key(key, op)?;
        let _turn = self.resize_turn(&dir, key, op)?;
        if !self.is_current(key, &dir) {
            // Deleted while this waited for its turn.
            return Err(self.ctx(errors::no_such_key_to_resize(), op, key));
        }
        // The lock-delay is the key's for life: a resize keeps it.
        let (current, delay_ms) = self.read_meta(&dir, key, op)?;
        let limit = change
            .apply(current, u32::MAX)
            .map_err(|e| self.ctx(e, op, key))?;
        fs::write_atomic(
            dir.as_fd(),
            "limit",
            limit_record(limit, delay_ms).as_bytes(),
            self.share,
        )
        .map_err(|e| self.io_err(op, key, "cannot write the key's limit", e))
        // `_turn` closes here, and its lock goes with it.
    }

    /// Waits for the key's `resize` lock (lease mode), which a resize and a delete hold
    /// while they change the key's limit or remove the key: held while the returned file
    /// is open.
    pub fn resize_turn(&self, dir: &OwnedFd, key: &Key, op: Op) -> Result<OwnedFd, Error> {
        let turn = fs::open_file(dir.as_fd(), "resize", true, self.share)
            .map_err(|e| self.io_err(op, key, "cannot open the key's resize lock", e))?;
        loop {
            match fs::lock_wait(turn.as_fd()) {
                Ok(()) => return Ok(turn),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_err(op, key, "cannot lock the key's resize lock", e)),
            }
        }
    }

    /// The directory of barrier `key` (`+barriers/<key>`: `+` is never in a key, so
    /// `list` never mistakes it for one), created if needed.
    pub fn barrier_dir(&self, key: &Key) -> Result<OwnedFd, Error> {
        let none = |_: std::os::fd::BorrowedFd<'_>| Ok(());
        let top = fs::open_dir(self.fd.as_fd(), BARRIERS, true, self.share, &none)
            .map_err(|e| self.io_err(Op::Barrier, key, "cannot open the barriers directory", e))?
            .ok_or_else(|| {
                self.err(
                    ErrorKind::Unavailable,
                    Op::Barrier,
                    key,
                    "the barriers directory vanished",
                )
            })?;
        fs::open_dir(top.as_fd(), &dir_name(key), true, self.share, &none)
            .map_err(|e| self.io_err(Op::Barrier, key, "cannot open the barrier's directory", e))?
            .ok_or_else(|| {
                self.err(
                    ErrorKind::Unavailable,
                    Op::Barrier,
                    key,
                    "the barrier's directory vanished",
                )
            })
    }

    /// Every key in the store, sorted: each subdirectory but baton's own (`+barriers`;
    /// names starting with `.` are never listed). A directory whose name is not a key's is
    /// `Corrupt`, naming it.
    pub fn list(&self) -> Result<Vec<Key>, Error> {
        let fail = |e: Error| e.context(Op::List, None, &self.url);
        let names = fs::subdirs(self.fd.as_fd()).map_err(|e| {
            fail(
                Error::new(ErrorKind::Unavailable, "cannot read the store directory")
                    .with_source(e),
            )
        })?;
        // The directory is a plain directory that people and other programs may share
        // (a mount point's `lost+found`, a stray folder): a subdirectory whose name is not
        // a key is not baton's, and is passed over rather than failing every `list`.
        let keys: Vec<(String, String)> = names
            .into_iter()
            .filter(|n| n != BARRIERS && n != retire::RETIRED)
            .map(|n| (n.replace('%', "/"), format!("the directory '{n}'")))
            .filter(|(k, _)| Key::new(k.as_str()).is_ok())
            .collect();
        status::keys_from_names(keys.iter().map(|(k, n)| (k.as_str(), n.as_str()))).map_err(fail)
    }
}

/// The status of a free slot whose last holder's process exited without releasing it, in
/// both modes: the words `SlotStatus::of_record` gives an ended lease on every store.
pub(crate) fn exited_slot(slot: u32, token: Token, holder: &Holder) -> SlotStatus {
    let json = holder.to_json().unwrap_or_default();
    SlotStatus::of_record(
        slot,
        token.0,
        &holder.id.to_string(),
        &json,
        None,
        Some("was not released: its holder's process exited"),
    )
}

/// The limit file's contents for `limit` and a lock-delay of `delay_ms`.
fn limit_record(limit: u32, delay_ms: Option<u64>) -> String {
    match delay_ms {
        Some(ms) => format!("{limit}\nlock-delay-ms {ms}\n"),
        None => format!("{limit}\n"),
    }
}

/// Parses what [`limit_record`] writes, and nothing else.
fn parse_limit_record(bytes: &[u8]) -> Option<(u32, Option<u64>)> {
    let text = std::str::from_utf8(bytes).ok()?;
    fn number(t: &str) -> Option<&str> {
        (!t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit())).then_some(t)
    }
    let mut lines = text.strip_suffix('\n')?.split('\n');
    let limit: u32 = number(lines.next()?)?.parse().ok().filter(|n| *n >= 1)?;
    let delay = match lines.next() {
        None => None,
        Some(line) => {
            let ms: u64 = number(line.strip_prefix("lock-delay-ms ")?)?.parse().ok()?;
            Some(ms).filter(|ms| *ms > 0)?;
            Some(ms)
        }
    };
    if lines.next().is_some() {
        return None;
    }
    Some((limit, delay))
}

/// The directory name of a key: `/` becomes `%` (never valid in a key, so names are unique).
fn dir_name(key: &Key) -> String {
    key.as_str().replace('/', "%")
}

type RootError = (ErrorKind, String, Option<io::Error>);

/// Records the store's mode on first use and refuses a store used in the other mode.
fn check_mode(
    root: &OwnedFd,
    mode: Mode,
    share: Sharing,
    path: &std::path::Path,
) -> Result<(), RootError> {
    let want = format!("{}\n", mode.as_str());
    let read = |root: &OwnedFd| -> io::Result<Option<Vec<u8>>> {
        match fs::open_existing_ro(root.as_fd(), MODE_FILE)? {
            Some(fd) => Ok(Some(fs::read_small(fd.as_fd(), MODE_FILE)?)),
            None => Ok(None),
        }
    };
    let unreadable = |e: io::Error| {
        if share::is_denied(&e) {
            return (
                ErrorKind::Unavailable,
                format!(
                    "cannot read the store's mode file {MODE_FILE} ({})",
                    share.denied_hint(path)
                ),
                Some(e),
            );
        }
        (
            ErrorKind::Corrupt,
            format!("cannot read the store's mode file {MODE_FILE}"),
            Some(e),
        )
    };
    let found = match read(root).map_err(unreadable)? {
        Some(found) => found,
        None => match fs::create_once(root.as_fd(), MODE_FILE, want.as_bytes(), share) {
            Ok(true) => return Ok(()),
            Ok(false) => read(root).map_err(unreadable)?.unwrap_or_default(),
            Err(e) => {
                let hint = if share::is_denied(&e) {
                    format!(" ({})", share.denied_hint(path))
                } else {
                    String::new()
                };
                return Err((
                    ErrorKind::Unavailable,
                    format!("cannot record the store's mode in {MODE_FILE}{hint}"),
                    Some(e),
                ));
            }
        },
    };
    if found == want.as_bytes() {
        return Ok(());
    }
    let other = String::from_utf8_lossy(&found).trim().to_owned();
    let hint = match other.as_str() {
        "lease" => " (use dir:PATH?mode=lease)",
        "kernel" => " (use dir:PATH without mode=lease)",
        _ => "",
    };
    Err((
        ErrorKind::Corrupt,
        format!(
            "this directory is a store in mode '{other}', not '{}'{hint}; the two modes never share keys",
            mode.as_str()
        ),
        None,
    ))
}

fn open_root(config: &DirConfig) -> Result<OwnedFd, RootError> {
    use rustix::fs::{FileType, Mode, OFlags};
    let root = &config.root;
    if config.is_default {
        // mkdir 0700 (not following a symlink someone planted), then check what is there.
        match rustix::fs::mkdir(root, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err((
                    ErrorKind::Unavailable,
                    format!("cannot create the default directory {}", root.display()),
                    Some(e.into()),
                ))
            }
        }
        let st = rustix::fs::lstat(root).map_err(|e| {
            (
                ErrorKind::Unavailable,
                format!("cannot stat {}", root.display()),
                Some(e.into()),
            )
        })?;
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft == FileType::Symlink {
            return Err((
                ErrorKind::Unavailable,
                format!(
                    "the default directory {} is a symlink; refusing to use it (remove it, or pass -s dir:PATH)",
                    root.display()
                ),
                None,
            ));
        }
        if ft != FileType::Directory {
            return Err((
                ErrorKind::Unavailable,
                format!(
                    "the default directory {} is not a directory",
                    root.display()
                ),
                None,
            ));
        }
        let me = rustix::process::geteuid().as_raw();
        if st.st_uid != me {
            return Err((
                ErrorKind::Unavailable,
                format!(
                    "the default directory {} belongs to uid {}, not to you (uid {me}); refusing to use it",
                    root.display(),
                    st.st_uid
                ),
                None,
            ));
        }
    } else if let Err(e) = std::fs::create_dir_all(root) {
        return Err((
            ErrorKind::Unavailable,
            format!("cannot create the store directory {}", root.display()),
            Some(e),
        ));
    }
    let mut flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    if config.is_default {
        flags |= OFlags::NOFOLLOW;
    }
    rustix::fs::open(root, flags, Mode::empty()).map_err(|e| {
        let e = io::Error::from(e);
        // A member-only directory refuses outsiders here: say whose it is.
        let hint = match rustix::fs::stat(root) {
            Ok(st) if share::is_denied(&e) => format!(
                " ({})",
                Sharing::of_mode(st.st_mode, st.st_gid).denied_hint(root)
            ),
            _ => String::new(),
        };
        (
            ErrorKind::Unavailable,
            format!("cannot open the store directory {}{hint}", root.display()),
            Some(e),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_records_round_trip_and_garbage_is_refused() {
        for (limit, delay) in [(1, None), (7, Some(1500)), (u32::MAX, Some(u64::MAX))] {
            let rec = limit_record(limit, delay);
            assert_eq!(
                parse_limit_record(rec.as_bytes()),
                Some((limit, delay)),
                "{rec:?}"
            );
        }
        for bad in [
            "",
            "1",
            "0\n",
            "x\n",
            "+1\n",
            "1\n\n",
            "1\nlock-delay-ms \n",
            "1\nlock-delay-ms 0\n",
            "1\nlock-delay-ms -5\n",
            "1\nlock-delay-ms 5",
            "1\nlock-delay-ms 5\nmore\n",
            "1\nlock-delay-ms 99999999999999999999999\n",
            "1\nlock-delay 5\n",
        ] {
            assert_eq!(parse_limit_record(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
