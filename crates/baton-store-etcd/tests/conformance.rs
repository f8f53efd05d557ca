//! baton's contract, run against the etcd store: the whole suite, chosen by the store's
//! capabilities, on the one-member server `scripts/test` starts (`BATON_TEST_ETCD`), each
//! test under a prefix of its own; the properties that restart, freeze or kill a server
//! get private ones (a single server, or a 3-member cluster for the leader kill).
//!
//! The base properties' workers hold leases without a keeper, so their TTL
//! outlasts every hold by a wide margin; the lease properties use etcd's shortest TTL
//! (2 s with default settings: etcd counts whole seconds and raises shorter ones) and run
//! a keeper.

mod common;

use baton_conformance::{Harness, Servers};

use common::open;

fn harness() -> Harness {
    common::harness("BATON_TEST_ETCD").servers(Servers {
        script: "etcd",
        cluster: true,
        at: common::harness_at,
    })
}

baton_conformance::suite!(open, harness);
