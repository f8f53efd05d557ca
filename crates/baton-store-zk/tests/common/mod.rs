//! Shared by the ZooKeeper store's conformance tests: opening the store, the harness
//! under a prefix of its own, and ways to damage a key's nodes the way a stray program
//! could.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_conformance::{Harness, LeaseTiming, Recovery};
use baton_core::{Key, Result, Store, StoreUrl};
use baton_store_zk::ZkConfig;
use zookeeper_client as zk;

/// The store as users open it.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    baton_store_zk::open(url)
}

/// The TTL of the suite's leases: the base properties' workers hold leases without a
/// keeper, so it (their session timeout) outlasts every hold.
pub const TTL: Duration = Duration::from_secs(10);

/// The whole suite's harness for the server or ensemble the environment variable `var`
/// names (skipped when it is unset), with the ways to damage a key.
pub fn harness(var: &str) -> Harness {
    match baton_conformance::servers::url_from_env(var) {
        Err(why) => Harness::skipped(why, open),
        Ok(url) => harness_at(&url)
            .corrupt("garbage-in-the-key-node", garbage_key_data)
            .corrupt("persistent-child-of-the-wrong-name", wrong_child),
    }
}

/// The harness for the server at `url`, under a prefix of its own.
pub fn harness_at(url: &str) -> Harness {
    let prefix = format!(
        "t-{}-{:x}",
        std::process::id(),
        baton_core::HolderId::random().0 as u64
    );
    let url = url.trim_end_matches('/');
    Harness::new(format!("{url}/{prefix}"), open)
        .ttl(TTL)
        // The session timeout, the server's tick and the watch.
        .recovery(Recovery::Within(TTL + Duration::from_secs(3)))
        .lease(LeaseTiming {
            ttl: Duration::from_secs(3),
            detection: Duration::from_secs(3),
        })
}

/// Runs `f` on a session of its own on the server `url` names, with the key node's path.
fn with_node(
    url: &str,
    key: &Key,
    f: impl AsyncFnOnce(&zk::Client, String) -> std::result::Result<(), zk::Error> + Send,
) -> std::io::Result<Vec<PathBuf>> {
    let u = StoreUrl::parse(url).map_err(|e| std::io::Error::other(e.to_string()))?;
    let c = ZkConfig::from_url(&u).map_err(|e| std::io::Error::other(e.to_string()))?;
    // The hooks are called from within the suite's runtime: this one runs on a thread
    // of its own.
    std::thread::scope(|s| {
        s.spawn(|| damage(&c, key, f))
            .join()
            .map_err(|_| std::io::Error::other("the damaging thread panicked"))?
    })?;
    Ok(Vec::new())
}

fn damage(
    c: &ZkConfig,
    key: &Key,
    f: impl AsyncFnOnce(&zk::Client, String) -> std::result::Result<(), zk::Error>,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = zk::Client::connect(&c.hosts)
            .await
            .map_err(std::io::Error::other)?;
        let kp = format!("{}/keys/{}", c.root, key.as_str().replace('/', "%"));
        // A key node of the hook's own, whatever was there.
        match client.delete(&kp, None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(std::io::Error::other(e)),
        }
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        match client.mkdir(&kp, &persistent).await {
            Ok(()) | Err(zk::Error::NodeExists) => {}
            Err(e) => return Err(std::io::Error::other(e)),
        }
        f(&client, kp).await.map_err(std::io::Error::other)
    })
}

/// The key node's data is not a limit.
pub fn garbage_key_data(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    with_node(url, key, async |c, kp| {
        c.set_data(&kp, b"three-ish", None).await.map(|_| ())
    })
}

/// A child under the key node that is neither a request node nor a slot node.
pub fn wrong_child(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    with_node(url, key, async |c, kp| {
        c.set_data(&kp, b"baton-zk 1 limit=1", None).await?;
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        c.create(&format!("{kp}/q-not-a-guid"), b"{}", &persistent)
            .await
            .map(|_| ())
    })
}
