//! baton's contract, run against the etcd store: the whole suite plus the lease
//! properties, on the one-member server `scripts/test` starts (`BATON_TEST_ETCD`), each
//! test under a prefix of its own.
//!
//! The kernel-lock-era properties' workers hold leases without a keeper, so their TTL
//! outlasts every hold by a wide margin; the lease properties use etcd's shortest TTL
//! (2 s with default settings: etcd counts whole seconds and raises shorter ones) and run
//! a keeper.

mod common;

use std::time::Duration;

use baton_conformance::{Harness, LeaseTiming, Recovery};

use common::{garbage_limit, open, slot_without_lease, unique_prefix, waiter_without_lease};

const TTL: Duration = Duration::from_secs(10);

fn harness() -> Harness {
    match baton_conformance::servers::url_from_env("BATON_TEST_ETCD") {
        Err(why) => Harness::skipped(why, open),
        Ok(url) => Harness::new(format!("{url}{}", unique_prefix()), open)
            .ttl(TTL)
            // TTL, plus etcd's lease expiry check (every 500 ms) and a watch round trip.
            .recovery(Recovery::Within(TTL + Duration::from_secs(2)))
            .lease(LeaseTiming {
                ttl: Duration::from_secs(2),
                detection: Duration::from_secs(2),
            })
            .corrupt("garbage-limit", garbage_limit)
            .corrupt("slot-without-lease", slot_without_lease)
            .corrupt("waiter-without-lease", waiter_without_lease),
    }
}

baton_conformance::network_suite!(open, harness);
