//! The host's monotonic clock, in nanoseconds.
//!
//! Every time in a history comes from `CLOCK_MONOTONIC`, which all processes on one host
//! share, so events recorded by different processes can be ordered.

/// Nanoseconds on the host's monotonic clock (`CLOCK_MONOTONIC`); comparable between
/// processes on one host, meaningless across hosts or reboots.
pub fn monotonic_ns() -> u64 {
    // The kit's clock never answers below zero (it is time since boot).
    u64::try_from(baton_core::kit::time::monotonic_ns()).unwrap_or(0)
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
        // Orders, not tolerances: `Instant` reads the same clock, so a mapped instant lies
        // between the reads around it, however slow the machine is.
        let before = monotonic_ns();
        let instant = std::time::Instant::now();
        let mapped = instant_ns(instant);
        let after = monotonic_ns();
        assert!(
            before <= mapped && mapped <= after,
            "{before} <= {mapped} <= {after}"
        );
        let second = std::time::Duration::from_secs(1);
        let later = instant_ns(instant + second);
        let after_later = monotonic_ns();
        assert!(
            later >= before + 1_000_000_000 && later <= after_later + 1_000_000_000,
            "{before} + 1s <= {later} <= {after_later} + 1s"
        );
    }

    #[test]
    fn never_goes_back() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} then {b}");
    }
}
