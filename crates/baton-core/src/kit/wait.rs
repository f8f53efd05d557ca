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

/// Whether an acquire that met `e` should ask again (see the module docs).
pub fn rides_out(e: &Error) -> bool {
    e.kind() == ErrorKind::Unavailable && e.is_retryable()
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
