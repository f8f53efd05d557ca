//! Shared by the etcd store's tests: opening the store, unique prefixes, the conformance
//! harness, and ways to damage the store's keys with `etcdctl`, the way a stray program or
//! a hostile user could.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use baton_conformance::{Harness, LeaseTiming, Recovery};
use baton_core::{Key, Result, Store, StoreUrl};
use baton_store_etcd::EtcdConfig;

/// The store as users open it: behind the error-context layer.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    baton_store_etcd::open(url)
}

/// The TTL of the suite's leases: the base properties' workers hold leases
/// without a keeper, so it outlasts every hold by a wide margin.
pub const TTL: Duration = Duration::from_secs(10);

/// The conformance harness for the server or cluster `url`, under a prefix of its own:
/// the lease properties use etcd's shortest TTL (2 s with default settings: etcd counts
/// whole seconds and raises shorter ones) and run a keeper.
pub fn harness_at(url: &str) -> Harness {
    Harness::new(format!("{url}{}", unique_prefix()), open)
        .ttl(TTL)
        // TTL, plus etcd's lease expiry check (every 500 ms) and a watch round trip.
        .recovery(Recovery::Within(TTL + Duration::from_secs(2)))
        .lease(LeaseTiming {
            ttl: Duration::from_secs(2),
            detection: Duration::from_secs(2),
        })
}

/// The whole suite's harness for the server the environment variable `var` names (skipped
/// when it is unset), with the ways to damage the store's keys.
pub fn harness(var: &str) -> Harness {
    match baton_conformance::servers::url_from_env(var) {
        Err(why) => Harness::skipped(why, open),
        Ok(url) => harness_at(&url)
            .corrupt("garbage-limit", garbage_limit)
            .corrupt("slot-without-lease", slot_without_lease)
            .corrupt("waiter-without-lease", waiter_without_lease),
    }
}

/// A key prefix no other test uses: `/baton-test/<pid>-<random>`.
pub fn unique_prefix() -> String {
    format!(
        "/baton-test/{}-{:x}",
        std::process::id(),
        baton_core::HolderId::random().0 as u64
    )
}

/// Runs `etcdctl` against the URL's members with `args`.
pub fn etcdctl(url: &str, args: &[&str]) -> std::io::Result<String> {
    let cfg = config(url)?;
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(cfg.endpoints.join(","))
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn config(url: &str) -> std::io::Result<EtcdConfig> {
    let u = StoreUrl::parse(url).map_err(|e| std::io::Error::other(e.to_string()))?;
    EtcdConfig::from_url(&u).map_err(|e| std::io::Error::other(e.to_string()))
}

/// The etcd key of `key`'s entry `suffix` (`#limit`, `#s/0`, `#w/...`).
pub fn entry(url: &str, key: &Key, suffix: &str) -> std::io::Result<String> {
    Ok(format!("{}/{}{suffix}", config(url)?.prefix, key.as_str()))
}

/// The limit key holds words, not a number.
pub fn garbage_limit(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    etcdctl(url, &["put", &entry(url, key, "#limit")?, "three-ish"])?;
    Ok(Vec::new())
}

/// A slot key that baton did not write: no lease, and a value that is not its record.
pub fn slot_without_lease(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    etcdctl(url, &["put", &entry(url, key, "#s/0")?, "{not json"])?;
    Ok(Vec::new())
}

/// A waiter key without a lease (it would block the queue forever if obeyed).
pub fn waiter_without_lease(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    etcdctl(
        url,
        &["put", &entry(url, key, "#w/00000000000000ff")?, "{}"],
    )?;
    Ok(Vec::new())
}
