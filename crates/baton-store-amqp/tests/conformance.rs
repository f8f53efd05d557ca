//! baton's contract, run against the RabbitMQ store: the whole suite, chosen by the
//! store's capabilities, on the broker `scripts/test` starts (`BATON_TEST_AMQP`), each
//! test under a queue prefix of its own; the properties that restart or freeze a broker
//! get private ones from `scripts/server-rabbitmq`.
//!
//! The base properties' workers hold leases without a keeper, so their TTL (the
//! heartbeat timeout of their connections) outlasts every hold by a wide margin; the lease
//! properties use a 1 s TTL with a keeper.

use std::sync::Arc;
use std::time::Duration;

use baton_conformance::{Harness, LeaseTiming, Recovery, Servers};
use baton_core::{Result, Store, StoreUrl};

fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    baton_store_amqp::open(url)
}

const TTL: Duration = Duration::from_secs(10);

fn harness() -> Harness {
    match baton_conformance::servers::url_from_env("BATON_TEST_AMQP") {
        Err(why) => Harness::skipped(why, open),
        Ok(url) => harness_at(&url).servers(Servers {
            script: "rabbitmq",
            cluster: false,
            at: harness_at,
        }),
    }
}

/// The harness for the broker at `url`, under a queue prefix of its own.
fn harness_at(url: &str) -> Harness {
    let prefix = format!(
        "t-{}-{:x}",
        std::process::id(),
        baton_core::HolderId::random().0 as u64
    );
    let sep = if url.contains('?') { '&' } else { '?' };
    Harness::new(format!("{url}{sep}prefix={prefix}"), open)
        .ttl(TTL)
        // A killed holder's connection closes at once; a silent one is noticed within
        // the heartbeat timeout (the TTL) and up to another one more.
        .recovery(Recovery::Within(TTL + Duration::from_secs(3)))
        .lease(LeaseTiming {
            ttl: Duration::from_secs(1),
            detection: Duration::from_secs(3),
        })
}

baton_conformance::suite!(open, harness);
