//! baton's contract, run against the etcd store: the whole suite plus the lease
//! properties, on the one-member server `scripts/test` starts (`BATON_TEST_ETCD`), each
//! test under a prefix of its own.
//!
//! The base properties' workers hold leases without a keeper, so their TTL
//! outlasts every hold by a wide margin; the lease properties use etcd's shortest TTL
//! (2 s with default settings: etcd counts whole seconds and raises shorter ones) and run
//! a keeper.

mod common;

use baton_conformance::Harness;

use common::open;

fn harness() -> Harness {
    common::harness("BATON_TEST_ETCD")
}

baton_conformance::network_suite!(open, harness);
