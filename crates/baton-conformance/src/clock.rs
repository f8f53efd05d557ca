//! The host's monotonic clock, in nanoseconds.
//!
//! Every time in a conformance history comes from `CLOCK_MONOTONIC`, which all processes
//! on one host share, so a worker's event and the test's own event can be ordered.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_back() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} then {b}");
    }
}
