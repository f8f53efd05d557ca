//! Group-shared stores. A store directory whose setgid bit is set and whose group may
//! read, write and search it (`install -d -m 2770 -g team /srv/locks`) is shared by that
//! group: every file and directory baton creates in it is owned by that group and made
//! `0660` (files) or `2770` (directories) before it gets its name, whatever the creating
//! user's umask, so every member can open it for writing (an OFD write lock needs that).
//!
//! The directory itself is the one source of truth: no URL parameter has to be repeated
//! by every user, so no member who forgets one can create files the others cannot open.
//! Others get nothing on what baton creates, not even read: a read-only descriptor can
//! take a read lock, which would block every holder.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use baton_core::kit::sys::{group_label, is_member, user_label};
use rustix::fs::Mode;

/// The mode of a file baton creates in a group-shared store.
pub const SHARED_FILE_MODE: u32 = 0o660;
/// The mode of a directory baton creates in a group-shared store.
pub const SHARED_DIR_MODE: u32 = 0o2770;

/// Who the files a store creates are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// The creating user's umask decides, as for any file (the default directory is 0700).
    Private,
    /// Shared by the group `gid`: members read and write everything, others nothing.
    Group(u32),
}

impl Sharing {
    /// What the store directory `root` says: shared by its group when it has the setgid
    /// bit and the group may read, write and search it.
    pub fn of_dir(root: BorrowedFd<'_>) -> io::Result<Sharing> {
        let st = rustix::fs::fstat(root).map_err(io::Error::from)?;
        Ok(Self::of_mode(st.st_mode, st.st_gid))
    }

    /// [`Sharing::of_dir`] from a directory's `st_mode` and `st_gid`.
    pub fn of_mode(mode: u32, gid: u32) -> Sharing {
        if mode & 0o2070 == 0o2070 {
            Sharing::Group(gid)
        } else {
            Sharing::Private
        }
    }

    /// Gives a file or directory baton just created (and has not named yet) the store's
    /// group and mode. Nothing to do for a private store.
    pub fn fix(self, fd: BorrowedFd<'_>, is_dir: bool) -> io::Result<()> {
        let Sharing::Group(gid) = self else {
            return Ok(());
        };
        let st = rustix::fs::fstat(fd).map_err(io::Error::from)?;
        if st.st_gid != gid {
            // Setgid inheritance normally gave it the group already; a member may chown
            // to any group it is in, so this fails only for a non-member.
            // SAFETY: fd is an open descriptor; uid -1 leaves the owner as it is; gid
            // came from the directory's stat.
            let rc = unsafe { libc::fchown(fd.as_raw_fd(), u32::MAX, gid) };
            if rc != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "cannot give a new file the store's group {}: {}",
                        group_label(gid),
                        io::Error::last_os_error()
                    ),
                ));
            }
        }
        let want = if is_dir {
            SHARED_DIR_MODE
        } else {
            SHARED_FILE_MODE
        };
        if st.st_mode & 0o7777 != want {
            rustix::fs::fchmod(fd, Mode::from_raw_mode(want)).map_err(io::Error::from)?;
        }
        Ok(())
    }

    /// The hint for a permission error in this store: which group it is shared with and
    /// whether this user is in it, or how to share a private store.
    pub fn denied_hint(self, root: &std::path::Path) -> String {
        match self {
            Sharing::Group(gid) if !is_member(gid) => format!(
                "the store {} is shared by group {}, which {} is not in; members need read and write",
                root.display(),
                group_label(gid),
                user_label()
            ),
            Sharing::Group(gid) => format!(
                "the store {} is shared by group {}, but this file is not group-writable (created by hand or by an older baton? its owner can run chmod g+rw on it)",
                root.display(),
                group_label(gid)
            ),
            Sharing::Private => format!(
                "the store {} is not group-shared, so its files are writable by their creator only (to share it: chgrp GROUP {} && chmod 2770 {})",
                root.display(),
                root.display(),
                root.display()
            ),
        }
    }
}

/// Whether a permission error is the kind [`Sharing::denied_hint`] explains.
pub fn is_denied(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied
        || matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_setgid_group_rwx_directories_are_shared() {
        assert_eq!(Sharing::of_mode(0o42770, 7), Sharing::Group(7));
        assert_eq!(Sharing::of_mode(0o42775, 7), Sharing::Group(7));
        assert_eq!(Sharing::of_mode(0o40770, 7), Sharing::Private);
        assert_eq!(Sharing::of_mode(0o42750, 7), Sharing::Private);
        assert_eq!(Sharing::of_mode(0o41777, 7), Sharing::Private);
        assert_eq!(Sharing::of_mode(0o40700, 7), Sharing::Private);
    }
}
