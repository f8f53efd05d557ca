//! Waiters that ride out a store's restart.
//!
//! Guarantees:
//! - An acquire that waits ([`Wait::Forever`] or [`Wait::Timeout`]) and meets an error the
//!   store marks retryable and `Unavailable` (a server restarting, a connection refused, a
//!   leader election) is not ended by it: it backs off (jittered, 100 ms doubling to 5 s)
//!   and asks again, for what is left of its wait. Only the wait running out, a permanent
//!   error, or the caller dropping the future ends it.
//! - A no-wait acquire ([`Wait::NoWait`]) asks once and reports what it met.
//! - Every retry is reported to the caller's notice (the CLI prints the first one, and
//!   every one under `-v`), so a wait that rides out an outage is never silent.
//! - Safety does not depend on it: a retried request is a new request. A grant the lost
//!   attempt may have made (`grant_unknown`) is held by nobody and ends with its lease.

use std::time::{Duration, Instant};

use super::sys::Jitter;
use crate::{AcquireRequest, Error, ErrorKind, Lease, Store, Wait};

/// The first back-off after an outage.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The longest back-off between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Called before each retry with the error met and how long the wait backs off.
pub type Notice = dyn Fn(&Error, Duration) + Send + Sync;

/// Whether an acquire that met `e` should ask again (see the module docs): `Unavailable`,
/// retryable as far as the store says, and not caused by a system error that waiting
/// cannot heal (a symlink where a directory must be, a permission refused, a read-only
/// filesystem), whichever store forgot to mark it permanent.
pub fn rides_out(e: &Error) -> bool {
    e.kind() == ErrorKind::Unavailable && e.is_retryable() && !caused_by_lasting_os_error(e)
}

fn caused_by_lasting_os_error(e: &Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if matches!(
                io.raw_os_error(),
                Some(
                    libc::ELOOP
                        | libc::ENOTDIR
                        | libc::EISDIR
                        | libc::EACCES
                        | libc::EPERM
                        | libc::EROFS
                        | libc::ENAMETOOLONG
                        | libc::EINVAL
                )
            ) || matches!(
                io.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidData
            ) {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// Acquires as `req` says, riding out outages of the store (see the module docs).
pub async fn acquire(
    store: &dyn Store,
    req: &AcquireRequest,
    notice: Option<&Notice>,
) -> Result<Lease, Error> {
    let start = Instant::now();
    let deadline = req.deadline(start);
    let mut backoff = FIRST_BACKOFF;
    let mut jitter = Jitter::new();
    let mut attempt = req.clone();
    loop {
        let e = match store.acquire(&attempt).await {
            Ok(lease) => return Ok(lease),
            Err(e) => e,
        };
        if matches!(req.wait, Wait::NoWait) || !rides_out(&e) {
            return Err(e);
        }
        let pause = jitter.duration(backoff / 2, backoff);
        let now = Instant::now();
        if let Some(d) = deadline {
            if now + pause >= d {
                // The wait runs out during the outage: the outage is the truth to tell.
                return Err(e);
            }
            attempt.wait = Wait::Timeout(d - (now + pause));
        }
        if let Some(n) = notice {
            n(&e, pause);
        }
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_ride_out_lasting_errors_do_not() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert!(rides_out(
            &Error::new(ErrorKind::Unavailable, "the server is down").with_source(refused)
        ));
        let symlink = std::io::Error::from_raw_os_error(libc::ELOOP);
        assert!(!rides_out(
            &Error::new(ErrorKind::Unavailable, "a symlink").with_source(symlink)
        ));
        assert!(!rides_out(
            &Error::new(ErrorKind::Unavailable, "bad password").permanent()
        ));
        assert!(!rides_out(&Error::new(ErrorKind::Corrupt, "garbage")));
        assert!(!rides_out(&Error::new(ErrorKind::Busy, "held")));
    }
}
