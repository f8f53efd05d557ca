//! Deleting a key: what both modes share.
//!
//! Each mode's `delete` first makes sure nobody holds or waits for the key and takes every
//! one of its slots itself (kernel mode locks them, lease mode claims a generation of each),
//! so that nobody can be granted a slot while the key goes. Then [`Root::retire`]:
//!
//! 1. records the key's last token in `+retired/NAME` (`+` is never in a key), so that the
//!    key made again starts its tokens above it ([`Root::token_floor`]);
//! 2. renames the key's directory to `.NAME.deleted.PID.N` (a name starting with `.` is
//!    never a key): from then on, a request that opens the key makes a new directory;
//!
//! and once the mode has let go of its slots, [`Retired::remove`] removes the renamed
//! directory and its files.
//!
//! A process that has the old directory open (a cached descriptor, a waiter blocked on a
//! slot's lock) can still lock or claim in it after step 2. So a grant checks, after it has
//! taken its slot, that its directory is still the one at the key's name
//! ([`Root::is_current`]), and starts over on the key made anew if not. The rename comes
//! before the slots are let go, so any slot taken in the old directory is taken after the
//! rename, and that check sees it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use baton_core::kit::sys::lock;
use baton_core::{Error, Key, Op};
use rustix::fs::AtFlags;

use super::{dir_name, Root};
use crate::fs;

/// The directory of token floors in the root.
pub(super) const RETIRED: &str = "+retired";

/// A key directory renamed out of the way by [`Root::retire`], still to be removed.
pub(crate) struct Retired<'a> {
    root: &'a Root,
    /// The key's directory name, and the name it was renamed to.
    key_name: String,
    name: String,
}

impl Retired<'_> {
    /// Removes the renamed directory and every file in it, and any left by earlier
    /// deletes of the key. What keeps one (a subdirectory, which baton never makes; a file
    /// that a request which still had the old directory open made in it just then) does
    /// not fail the delete, which is done: such a directory is never listed, and the key's
    /// next delete tries again.
    pub fn remove(self) {
        let root = self.root.fd.as_fd();
        fs::remove_dir(root, &self.name);
        for old in fs::deleted_names(root, &self.key_name).unwrap_or_default() {
            fs::remove_dir(root, &old);
        }
    }
}

impl Root {
    /// Whether `dir` is still the directory at `key`'s name (not deleted, not replaced).
    pub fn is_current(&self, key: &Key, dir: &OwnedFd) -> bool {
        let at_name = rustix::fs::statat(self.fd.as_fd(), dir_name(key), AtFlags::SYMLINK_NOFOLLOW);
        match (at_name, rustix::fs::fstat(dir)) {
            (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
            _ => false,
        }
    }

    /// Forgets the cached directory of `key`, so that the next use opens it by name again.
    pub fn forget(&self, key: &Key) {
        lock(&self.keys).remove(key);
    }

    /// The last token of `key` before it was last deleted, if it ever was: a key made
    /// again starts its tokens above it.
    pub fn token_floor(&self, key: &Key) -> io::Result<Option<u64>> {
        let flags = rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC;
        let top =
            match rustix::fs::openat(self.fd.as_fd(), RETIRED, flags, rustix::fs::Mode::empty()) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
        match fs::open_existing_ro(top.as_fd(), &dir_name(key))? {
            Some(fd) => fs::read_counter(fd.as_fd()),
            None => Ok(None),
        }
    }

    /// Records `last_token` as `key`'s token floor and renames its directory `dir` out of
    /// the way (see the module docs). The caller holds every slot of the key.
    pub fn retire(&self, key: &Key, dir: &OwnedFd, last_token: u64) -> Result<Retired<'_>, Error> {
        let op = Op::Delete;
        let floor = self
            .token_floor(key)
            .map_err(|e| self.io_err(op, key, "cannot read the key's token floor", e))?
            .unwrap_or(0)
            .max(last_token);
        let none = |_: std::os::fd::BorrowedFd<'_>| Ok(());
        let top = fs::open_dir(self.fd.as_fd(), RETIRED, true, self.share, &none)
            .map_err(|e| self.io_err(op, key, "cannot open the token floor directory", e))?
            .ok_or_else(|| {
                self.err(
                    baton_core::ErrorKind::Unavailable,
                    op,
                    key,
                    "the token floor directory vanished",
                )
            })?;
        let name = dir_name(key);
        fs::write_atomic(
            top.as_fd(),
            &name,
            format!("{floor:020}\n").as_bytes(),
            self.share,
        )
        .map_err(|e| self.io_err(op, key, "cannot record the key's token floor", e))?;
        if !self.is_current(key, dir) {
            return Err(self.err(
                baton_core::ErrorKind::NotFound,
                op,
                key,
                "the key was deleted meanwhile",
            ));
        }
        let gone = fs::deleted_name(&name);
        rustix::fs::renameat(
            self.fd.as_fd(),
            name.as_str(),
            self.fd.as_fd(),
            gone.as_str(),
        )
        .map_err(|e| self.io_err(op, key, "cannot remove the key's directory", e.into()))?;
        self.forget(key);
        Ok(Retired {
            root: self,
            key_name: name,
            name: gone,
        })
    }
}
