//! Every exit code `baton` uses, in one place.
//!
//! `baton run` passes its command's own exit status through, so baton's own codes are
//! chosen where commands rarely go: the `sysexits.h` values for "temporarily unavailable"
//! (75) and "service unavailable" (69), the shell's 126/127 for a command that cannot run,
//! and the shell's 128+N for death by signal N. `--help` prints the same table
//! ([`HELP_TABLE`]); keep the two in step.

use baton::ErrorKind;

/// The command ran and exited 0, or a `status`/`list`/`break` did what was asked, or
/// `leader KEY` found a leader.
pub const SUCCESS: u8 = 0;

/// The operation was refused or found nothing to do: `status KEY` for a key the store
/// does not have, `break` on a store that cannot break a lease (the directory store:
/// the kernel frees a slot when its holder exits) or that found nothing to break, and
/// `leader KEY` when the key has no leader (or does not exist).
pub const FAILURE: u8 = 1;

/// A usage error: bad arguments, a bad key, duration or store URL, an unknown store
/// scheme, no command to run, `-n 0`, or `-n` different from the key's existing limit
/// (`leader KEY` for a key that is a semaphore of several slots).
pub const USAGE: u8 = 2;

/// The store cannot be used: unreachable, a permission problem, a directory owned by
/// someone else, state baton did not write (a symlink or garbage where its files belong),
/// or an operation the store does not support (`sysexits.h` `EX_UNAVAILABLE`).
pub const UNAVAILABLE: u8 = 69;

/// The lock was not acquired: every slot was busy with `--no-wait`, or stayed busy until
/// `-w` ran out (`sysexits.h` `EX_TEMPFAIL`, as `flock` uses 1 and lockrun 75).
/// `-E/--conflict-exit-code` replaces it.
pub const NOT_ACQUIRED: u8 = 75;

/// The lease was lost while the command ran (a lease store could not be renewed in
/// time, or the lease was broken or taken over): the command's whole process group was
/// stopped (SIGTERM, then SIGKILL after `--kill-grace`) and reaped before the lease could
/// be granted again.
pub const LEASE_LOST: u8 = 76;

/// `fence`: the write was refused because a newer token was seen already (the writer
/// lost the lock); nothing was written.
pub const FENCED: u8 = 77;

/// The command was found but cannot be executed (no permission, not an executable), as
/// a POSIX shell reports it.
pub const CANNOT_EXECUTE: u8 = 126;

/// The command was not found, as a POSIX shell reports it.
pub const NOT_FOUND: u8 = 127;

/// Added to a signal's number: the command died of signal N (exit 128+N), or baton was
/// stopped by signal N while still waiting for the lock.
pub const SIGNAL_BASE: u8 = 128;

/// The exit code for death by signal `signal` (128+N, capped at 255).
pub fn for_signal(signal: i32) -> u8 {
    u8::try_from(i32::from(SIGNAL_BASE) + signal).unwrap_or(u8::MAX)
}

/// The exit code for a baton error of `kind`.
///
/// `Busy` and `Timeout` give [`NOT_ACQUIRED`] here; `run` substitutes `-E` itself.
pub fn for_error(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Busy | ErrorKind::Timeout => NOT_ACQUIRED,
        ErrorKind::InvalidKey | ErrorKind::InvalidInput | ErrorKind::LimitMismatch => USAGE,
        ErrorKind::Unavailable | ErrorKind::Corrupt | ErrorKind::Unsupported => UNAVAILABLE,
        // NotFound: `status`/`break` of a key the store does not have.
        ErrorKind::NotFound => FAILURE,
        // Cancelled, Lost, NotHeld and kinds added later: the operation did not happen.
        _ => FAILURE,
    }
}

/// The exit-code table shown at the end of `baton --help` and `baton run --help`.
pub const HELP_TABLE: &str = "\
Exit status:
  N      baton run: the command's own exit status
  128+N  baton run: the command died of signal N (or baton got signal N while waiting)
  0      status, list, break, resize, delete, fence: done; leader: there is a leader;
         barrier: passed; stress: every property held
  1      status KEY, delete: no such key; break: the store cannot break leases, or nothing to break;
         leader: no leader; stress: a property was violated (listed) or an event failed
  2      usage error: bad option, key, duration or store URL, no command, -n 0,
         or -n differs from the key's existing limit; leader: the key is a semaphore
  69     the store cannot be used (unreachable, permissions, foreign owner, corrupt state);
         fence: the database cannot be used or the SQL failed (nothing written)
  75     run: not acquired (busy with --no-wait, or -w ran out); -E CODE changes it;
         barrier: -w ran out (the arrival was withdrawn); delete: the key is in use
  76     run: the lease was lost while the command ran; its process group was
         stopped before the lease could be granted again
  77     fence: the write was refused, a newer token was seen (this holder lost the lock)
  126    run: the command cannot be executed
  127    run: the command was not found";
