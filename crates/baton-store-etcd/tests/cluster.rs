//! baton's contract against a 3-member etcd cluster (`BATON_TEST_ETCD_CLUSTER`), through
//! all three members' endpoints: the same suite as `conformance.rs`, where every write
//! goes through Raft and a request may land on a follower.

mod common;

use std::time::Duration;

use baton_conformance::{Harness, LeaseTiming, Recovery};

use common::{garbage_limit, open, slot_without_lease, unique_prefix, waiter_without_lease};

const TTL: Duration = Duration::from_secs(10);

fn harness() -> Harness {
    match baton_conformance::servers::url_from_env("BATON_TEST_ETCD_CLUSTER") {
        Err(why) => Harness::skipped(why, open),
        Ok(url) => Harness::new(format!("{url}{}", unique_prefix()), open)
            .ttl(TTL)
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
