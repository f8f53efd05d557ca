//! baton's contract against a 3-member etcd cluster (`BATON_TEST_ETCD_CLUSTER`), through
//! all three members' endpoints: the same suite as `conformance.rs`, where every write
//! goes through Raft and a request may land on a follower.

mod common;

use baton_conformance::Harness;

use common::open;

fn harness() -> Harness {
    common::harness("BATON_TEST_ETCD_CLUSTER")
}

baton_conformance::network_suite!(open, harness);
