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
        // What is left of the wait: a last look without waiting once it has run out.
        let last = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                attempt.wait = if left.is_zero() {
                    Wait::NoWait
                } else {
                    Wait::Timeout(left)
                };
                left.is_zero()
            }
            None => false,
        };
        let e = match store.acquire(&attempt).await {
            Ok(lease) => return Ok(lease),
            Err(e) => e,
        };
        if last || matches!(req.wait, Wait::NoWait) || !rides_out(&e) {
            // The wait ran out during the outage: the outage is the truth to tell.
            return Err(e);
        }
        let mut pause = jitter.duration(backoff / 2, backoff);
        if let Some(d) = deadline {
            pause = pause.min(d.saturating_duration_since(Instant::now()));
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
    use crate::{Holder, Key, KeyStatus, Released, StoreUrl, Token};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Answers `outages` retryable `Unavailable` errors (or a permanent one), then grants.
    #[derive(Debug)]
    struct Flaky {
        url: StoreUrl,
        outages: u32,
        permanent: bool,
        calls: AtomicU32,
    }

    #[async_trait::async_trait]
    impl Store for Flaky {
        fn url(&self) -> &StoreUrl {
            &self.url
        }
        fn capabilities(&self) -> crate::Capabilities {
            crate::Capabilities::new("test")
        }
        async fn acquire(&self, req: &AcquireRequest) -> crate::Result<Lease> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.outages {
                let e = Error::new(ErrorKind::Unavailable, "restarting");
                return Err(if self.permanent { e.permanent() } else { e });
            }
            Ok(Lease {
                key: req.key.clone(),
                slot: 0,
                limit: 1,
                token: Token(1),
                holder: req.holder.clone(),
                ttl: None,
                acquired_unix_ms: 0,
                sent_at: None,
            })
        }
        async fn release(&self, _: &Lease) -> crate::Result<Released> {
            Ok(Released::Released)
        }
        async fn inspect(&self, _: &Key) -> crate::Result<KeyStatus> {
            Err(Error::new(ErrorKind::Unsupported, "test"))
        }
        async fn list(&self) -> crate::Result<Vec<Key>> {
            Ok(Vec::new())
        }
    }

    fn flaky(outages: u32, permanent: bool) -> Flaky {
        Flaky {
            url: StoreUrl::parse("noop:").expect("url"),
            outages,
            permanent,
            calls: AtomicU32::new(0),
        }
    }

    fn request(wait: Wait) -> AcquireRequest {
        let mut r = AcquireRequest::new(Key::new("k").expect("key"), Holder::current(vec![]));
        r.wait = wait;
        r
    }

    #[tokio::test]
    async fn a_waiting_acquire_asks_again_after_an_outage() {
        let store = flaky(3, false);
        let told = std::sync::Arc::new(AtomicU32::new(0));
        let t = std::sync::Arc::clone(&told);
        let notice = move |_: &Error, _: Duration| {
            t.fetch_add(1, Ordering::SeqCst);
        };
        let lease = acquire(&store, &request(Wait::Forever), Some(&notice))
            .await
            .expect("granted after the outage");
        assert_eq!(lease.token, Token(1));
        assert_eq!(store.calls.load(Ordering::SeqCst), 4);
        assert_eq!(told.load(Ordering::SeqCst), 3, "every retry is told");
    }

    #[tokio::test]
    async fn no_wait_and_permanent_errors_end_at_once() {
        let store = flaky(1, false);
        let e = acquire(&store, &request(Wait::NoWait), None)
            .await
            .expect_err("no-wait asks once");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(store.calls.load(Ordering::SeqCst), 1);
        let store = flaky(1, true);
        acquire(&store, &request(Wait::Forever), None)
            .await
            .expect_err("permanent");
        assert_eq!(store.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_outage_longer_than_the_wait_ends_it_after_a_last_look() {
        let store = flaky(u32::MAX, false);
        let wait = Duration::from_millis(300);
        let started = Instant::now();
        let e = acquire(&store, &request(Wait::Timeout(wait)), None)
            .await
            .expect_err("the wait ran out");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        // Order, not speed: it used the whole wait before giving up.
        assert!(started.elapsed() >= wait);
        assert!(store.calls.load(Ordering::SeqCst) >= 2);
    }

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
