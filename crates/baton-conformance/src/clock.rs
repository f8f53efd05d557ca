//! The host's monotonic clock, in nanoseconds.
//!
//! Every time in a conformance history comes from `CLOCK_MONOTONIC`, which all processes
//! on one host share, so a worker's event and the test's own event can be ordered. The
//! clock is `baton-stress`'s, shared with the stress harness.

pub use baton_stress::clock::{instant_ns, monotonic_ns};
