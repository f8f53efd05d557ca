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

/// A frozen (SIGSTOPped) private server: the holder's command group is gone before the
/// slot is granted again after the thaw.
#[test]
fn frozen_server_loses_before_regrant() {
    if baton_conformance::servers::url_from_env("BATON_TEST_ETCD").is_err() {
        baton_conformance::skipped(
            "etcd frozen_server_loses_before_regrant",
            "BATON_TEST_ETCD is not set (bash scripts/test sets it)",
        );
        return;
    }
    let server =
        baton_conformance::servers::Server::start("etcd", "start", "stop").expect("a private etcd");
    let h = Harness::__in_module(common::harness_at(server.url()), module_path!());
    baton_conformance::__private::runtime().block_on(
        baton_conformance::frozen_server_loses_before_regrant(&h, &server),
    );
}
