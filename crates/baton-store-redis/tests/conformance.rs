//! baton's contract, run against the Redis store: the whole suite, chosen by the store's
//! capabilities, on the server `scripts/test` starts (`BATON_TEST_REDIS`), each test under
//! a key prefix of its own; the properties that restart, freeze or step the clock of a
//! server get private ones from `scripts/server-redis`.
//!
//! The base properties' workers hold leases without a keeper, so their TTL outlasts every
//! hold by a wide margin; the lease properties use a 1 s TTL with a keeper.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use baton_conformance::{Harness, LeaseTiming, Recovery, Servers};
use baton_core::{Key, Result, Store, StoreUrl};
use baton_store_redis::RedisConfig;

fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    baton_store_redis::open(url)
}

const TTL: Duration = Duration::from_secs(10);

fn harness() -> Harness {
    match baton_conformance::servers::url_from_env("BATON_TEST_REDIS") {
        Err(why) => Harness::skipped(why, open),
        Ok(url) => harness_at(&url)
            .servers(Servers {
                script: "redis",
                cluster: false,
                at: harness_at,
            })
            .corrupt("string-where-the-key-record-is", string_meta)
            .corrupt("garbage-holder-record", garbage_holder),
    }
}

/// The harness for the server at `url`, under a key prefix of its own.
fn harness_at(url: &str) -> Harness {
    let prefix = format!(
        "t-{}-{:x}",
        std::process::id(),
        baton_core::HolderId::random().0 as u64
    );
    let sep = if url.contains('?') { '&' } else { '?' };
    Harness::new(format!("{url}{sep}prefix={prefix}"), open)
        .ttl(TTL)
        // The TTL on a waiter's clock, its next look and a round trip.
        .recovery(Recovery::Within(TTL + Duration::from_secs(2)))
        .lease(LeaseTiming {
            ttl: Duration::from_secs(1),
            detection: Duration::from_secs(2),
        })
}

fn cli(url: &str, args: &[&str]) -> std::io::Result<String> {
    let u = StoreUrl::parse(url).map_err(|e| std::io::Error::other(e.to_string()))?;
    let c = RedisConfig::from_url(&u).map_err(|e| std::io::Error::other(e.to_string()))?;
    let out = Command::new("redis-cli")
        .args([
            "-h",
            &c.host,
            "-p",
            &c.port.to_string(),
            "-n",
            &c.db.to_string(),
        ])
        .args(args)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.starts_with("ERR") || text.starts_with("WRONGTYPE") {
        return Err(std::io::Error::other(format!(
            "redis-cli {args:?} failed: {text}"
        )));
    }
    Ok(text)
}

fn base(url: &str, key: &Key) -> std::io::Result<String> {
    let u = StoreUrl::parse(url).map_err(|e| std::io::Error::other(e.to_string()))?;
    let c = RedisConfig::from_url(&u).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(format!("{}:{{{}}}", c.prefix, key.as_str()))
}

/// A string where the key's record (a hash) is.
fn string_meta(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    let meta = format!("{}:meta", base(url, key)?);
    cli(url, &["DEL", &meta])?;
    cli(url, &["SET", &meta, "three-ish"])?;
    Ok(Vec::new())
}

/// Slot 0 named as held, with a record of garbage.
fn garbage_holder(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    let b = base(url, key)?;
    cli(
        url,
        &[
            "HSET",
            &format!("{b}:slot:0"),
            "grant",
            "x",
            "token",
            "many",
            "ttl",
            "-",
        ],
    )?;
    cli(url, &["ZADD", &format!("{b}:holders"), "0", "0"])?;
    Ok(Vec::new())
}

baton_conformance::suite!(open, harness);
