//! baton's contract against a 3-member etcd cluster (`BATON_TEST_ETCD_CLUSTER`), through
//! all three members' endpoints: the same suite as `conformance.rs`, where every write
//! goes through Raft and a request may land on a follower.

mod common;

use baton_conformance::Harness;

use common::open;

fn harness() -> Harness {
    // Networked (the partition property proxies every member), but no private servers:
    // the restart, freeze and leader-kill properties run once, from conformance.rs.
    common::harness("BATON_TEST_ETCD_CLUSTER").network()
}

baton_conformance::suite!(open, harness);
