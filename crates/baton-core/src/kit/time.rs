//! One TTL policy and the time arithmetic every store shares.
//!
//! Guarantees:
//! - Every store accepts the same TTLs: [`MIN_TTL`] to [`MAX_TTL`], checked by
//!   [`validate_ttl`] with one wording. (A store whose server counts coarser, such as
//!   etcd's whole seconds, rounds up on the server and says so in its README.)
//! - A lease is renewed every [`renew_every`] (TTL/3), so two renewals can fail before
//!   the TTL runs out; [`Refresh`] is that cadence for records a store refreshes itself
//!   (waiter tickets, barrier arrivals).
//! - [`monotonic_ns`] is host-wide and never goes back: the clock `std::time::Instant`
//!   uses, so a store never counts time the holder's keeper cannot count.

use std::time::{Duration, Instant};

use crate::{format_duration, Error, ErrorKind, Key, Op};

/// The TTL of a lease whose request sets none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// The shortest TTL any store accepts. Renewals come every TTL/3, so a shorter TTL would
/// leave no time for one round trip to a server.
pub const MIN_TTL: Duration = Duration::from_millis(10);

/// The longest TTL any store accepts: a week. A holder renews every TTL/3 whatever the
/// TTL, so a longer TTL only lengthens how long a dead holder keeps its slot.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a barrier arrival lives without being refreshed (its owner refreshes it every
/// third of this while it waits).
pub const ARRIVAL_TTL: Duration = Duration::from_secs(10);

/// How long a queued waiter's ticket lives without being refreshed (its owner refreshes
/// it every third of this while it waits), so a dead waiter leaves the queue within it.
pub const TICKET_TTL: Duration = Duration::from_secs(10);

/// The request's TTL, or [`DEFAULT_TTL`], checked against [`MIN_TTL`] and [`MAX_TTL`].
pub fn validate_ttl(ttl: Option<Duration>, key: &Key) -> Result<Duration, Error> {
    let ttl = ttl.unwrap_or(DEFAULT_TTL);
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "the TTL must be between {} and {}, not {}",
                format_duration(MIN_TTL),
                format_duration(MAX_TTL),
                format_duration(ttl)
            ),
        )
        .with_op(Op::Acquire)
        .with_key(key));
    }
    Ok(ttl)
}

/// How often a lease of `ttl` is renewed: a third of it.
pub fn renew_every(ttl: Duration) -> Duration {
    ttl / 3
}

/// A record refreshed every third of its TTL (a waiter's ticket, a barrier arrival).
#[derive(Clone, Copy, Debug)]
pub struct Refresh {
    every: Duration,
    last: Instant,
}

impl Refresh {
    /// A record of `ttl` written at `now`.
    pub fn new(ttl: Duration, now: Instant) -> Refresh {
        Refresh {
            every: renew_every(ttl),
            last: now,
        }
    }

    /// How often it is refreshed.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// When the next refresh is due.
    pub fn due_at(&self) -> Instant {
        self.last + self.every
    }

    /// Whether a refresh is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.due_at()
    }

    /// Records a refresh done at `now`.
    pub fn done(&mut self, now: Instant) {
        self.last = now;
    }
}

/// The earliest of the instants that can end a wait (a backstop, the request's deadline,
/// a refresh due, the next expiry); `None` entries do not count. `None` when all are
/// `None`.
pub fn next_wake(candidates: impl IntoIterator<Item = Option<Instant>>) -> Option<Instant> {
    candidates.into_iter().flatten().min()
}

/// Nanoseconds on `CLOCK_MONOTONIC`: host-wide, never going back, reset only by a reboot
/// (which the boot id detects), not advancing during suspend.
pub fn monotonic_ns() -> i64 {
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

/// Milliseconds since the Unix epoch on the wall clock, for display only (status).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::new("k").expect("key")
    }

    #[test]
    fn one_ttl_policy() {
        assert_eq!(validate_ttl(None, &key()).expect("default"), DEFAULT_TTL);
        assert_eq!(validate_ttl(Some(MIN_TTL), &key()).expect("min"), MIN_TTL);
        assert_eq!(validate_ttl(Some(MAX_TTL), &key()).expect("max"), MAX_TTL);
        for bad in [
            Duration::ZERO,
            Duration::from_millis(9),
            MAX_TTL + Duration::from_millis(1),
            Duration::MAX,
        ] {
            let e = validate_ttl(Some(bad), &key()).expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.message().contains("between 10ms and"), "{e}");
        }
    }

    #[test]
    fn refresh_is_due_after_a_third() {
        let t0 = Instant::now();
        let mut r = Refresh::new(Duration::from_secs(3), t0);
        assert!(!r.due(t0));
        assert!(r.due(t0 + Duration::from_secs(1)));
        r.done(t0 + Duration::from_secs(1));
        assert_eq!(r.due_at(), t0 + Duration::from_secs(2));
    }

    #[test]
    fn next_wake_is_the_earliest_known() {
        let t0 = Instant::now();
        let a = t0 + Duration::from_secs(2);
        let b = t0 + Duration::from_secs(1);
        assert_eq!(next_wake([Some(a), None, Some(b)]), Some(b));
        assert_eq!(next_wake([None, None]), None);
    }

    #[test]
    fn monotonic_never_goes_back() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }
}
