//! The host's monotonic clock, in nanoseconds.
//!
//! Every time in a history comes from `CLOCK_MONOTONIC`, which all processes on one host
//! share, so events recorded by different processes can be ordered.

/// Nanoseconds on the host's monotonic clock (`CLOCK_MONOTONIC`); comparable between
/// processes on one host, meaningless across hosts or reboots.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// An [`Instant`](std::time::Instant) (a keeper's deadline, a lease's `sent_at`) as
/// nanoseconds on the same clock as [`monotonic_ns`].
///
/// On Linux `Instant` reads `CLOCK_MONOTONIC` too, so this only maps between the two
/// representations: it reads both clocks at one moment and carries the difference over.
pub fn instant_ns(instant: std::time::Instant) -> u64 {
    let now = std::time::Instant::now();
    let now_ns = monotonic_ns();
    if instant >= now {
        now_ns + (instant - now).as_nanos() as u64
    } else {
        now_ns.saturating_sub((now - instant).as_nanos() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_map_onto_the_monotonic_clock() {
        let before = monotonic_ns();
        let instant = std::time::Instant::now();
        let after = monotonic_ns();
        let mapped = instant_ns(instant);
        // The two reads of the pair happen within microseconds of each other.
        assert!(
            mapped + 1_000_000 >= before && mapped <= after + 1_000_000,
            "{before} <= {mapped} <= {after}"
        );
        let later = instant_ns(instant + std::time::Duration::from_secs(1));
        assert!((later - mapped).abs_diff(1_000_000_000) < 1_000_000);
    }

    #[test]
    fn never_goes_back() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} then {b}");
    }
}
