//! baton's contract, run against the ZooKeeper store: the whole suite, chosen by the
//! store's capabilities, on the server `scripts/test` starts (`BATON_TEST_ZK`), each test
//! under a prefix of its own; the properties that partition, restart or freeze a server
//! get private ones from `scripts/server-zookeeper` (a single server, or a 3-server
//! ensemble for the leader kill).
//!
//! The base properties' workers hold leases without a keeper, so their TTL (their
//! session timeout) outlasts every hold; the lease properties use a 3 s TTL with a keeper
//! (a session of 1 s would be at the mercy of a loaded machine's scheduler).

mod common;

use baton_conformance::{Harness, Servers};

use common::open;

fn harness() -> Harness {
    common::harness("BATON_TEST_ZK").servers(Servers {
        script: "zookeeper",
        cluster: true,
        at: common::harness_at,
    })
}

baton_conformance::suite!(open, harness);
