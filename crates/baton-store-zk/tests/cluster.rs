//! baton's contract against a 3-server ZooKeeper ensemble (`BATON_TEST_ZK_CLUSTER`),
//! through all three servers' addresses: the same suite as `conformance.rs`, where every
//! write goes through the leader's quorum and a session may sit on a follower.

mod common;

use baton_conformance::Harness;

use common::open;

fn harness() -> Harness {
    // Networked (the partition property proxies every server), but no private servers:
    // the restart, freeze and leader-kill properties run once, from conformance.rs.
    common::harness("BATON_TEST_ZK_CLUSTER").network()
}

baton_conformance::suite!(open, harness);
