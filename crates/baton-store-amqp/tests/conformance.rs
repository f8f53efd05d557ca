//! baton's contract, run against the RabbitMQ store: the whole suite, chosen by the
//! store's capabilities, on the broker `scripts/test` starts (`BATON_TEST_AMQP`), each
//! test under a queue prefix of its own; the properties that restart or freeze a broker
//! get private ones from `scripts/server-rabbitmq`.
//!
//! The base properties' workers hold leases without a keeper, so their TTL (the
//! heartbeat timeout of their connections) outlasts every hold by a wide margin; the lease
//! properties use a 1 s TTL with a keeper.

use std::path::PathBuf;
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
        Ok(url) => harness_at(&url)
            .servers(Servers {
                script: "rabbitmq",
                cluster: false,
                at: harness_at,
            })
            .corrupt("garbage-holder-record", garbage_record),
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

/// A message that is not a holder record in the record queue of slot 0 (published on a
/// thread of its own: the hook is called from inside the test's runtime).
fn garbage_record(url: &str, key: &baton_core::Key) -> std::io::Result<Vec<PathBuf>> {
    let u = StoreUrl::parse(url).map_err(|e| std::io::Error::other(e.to_string()))?;
    let c = baton_store_amqp::AmqpConfig::from_url(&u)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let queue = format!("{}.k.{}.rec.0", c.prefix, key.as_str());
    let uri = c.uri(None);
    std::thread::spawn(move || -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
            let io = |e: lapin::Error| std::io::Error::other(e.to_string());
            let conn = lapin::Connection::connect_uri(uri, lapin::ConnectionProperties::default())
                .await
                .map_err(io)?;
            let ch = conn.create_channel().await.map_err(io)?;
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(io)?;
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                b"{\"token\": \"many\"}",
                lapin::BasicProperties::default(),
            )
            .await
            .map_err(io)?
            .await
            .map_err(io)?;
            conn.close(200, "OK".into()).await.map_err(io)?;
            Ok(())
        })
    })
    .join()
    .map_err(|_| std::io::Error::other("the publishing thread panicked"))??;
    Ok(Vec::new())
}

baton_conformance::suite!(open, harness);
