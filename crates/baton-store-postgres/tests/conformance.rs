//! baton's contract, run against the PostgreSQL store on the server `scripts/test` starts
//! (`BATON_TEST_POSTGRES`), in a schema of its own: the whole suite, chosen by the store's
//! capabilities; the properties that restart or freeze a server get a private one.
//!
//! The base properties' workers hold leases without a keeper, so their TTL
//! outlasts every hold by a wide margin; the lease properties use a short TTL of their own
//! and run a keeper.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_conformance::servers::url_from_env;
use baton_conformance::{Harness, LeaseTiming, Recovery, Servers};
use baton_core::{Key, Result, Store, StoreUrl};

const TTL: Duration = Duration::from_secs(10);
const SCHEMA: &str = "baton_conformance";

fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    baton_store_postgres::open(url)
}

fn harness() -> Harness {
    let base = match url_from_env("BATON_TEST_POSTGRES") {
        Ok(u) => u,
        Err(why) => return Harness::skipped(why, open),
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    harness_at(&format!("{base}{sep}schema={SCHEMA}"))
        .servers(Servers {
            script: "postgres",
            cluster: false,
            at: harness_at,
        })
        .corrupt("negative-limit", negative_limit)
        .corrupt("negative-sequence", negative_sequence)
        .corrupt("garbage-lease-row", garbage_lease_row)
}

/// The harness for the server at `url` (the shared one, or a private one the suite starts
/// to restart or freeze).
fn harness_at(url: &str) -> Harness {
    Harness::new(url, open)
        .ttl(TTL)
        // TTL, plus the waiter's wake-up and a loaded machine's scheduling.
        .recovery(Recovery::Within(TTL + Duration::from_secs(3)))
        .lease(LeaseTiming {
            ttl: Duration::from_secs(1),
            detection: Duration::from_secs(2),
        })
}

/// Runs one statement with the key as `$1` on its own thread and runtime (the hooks are
/// called from inside the test's runtime).
fn exec(url: &str, statement: String, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    let driver_url = url.split('?').next().unwrap_or(url).to_owned();
    let key = key.as_str().to_owned();
    std::thread::spawn(move || -> std::io::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&driver_url, tokio_postgres::NoTls)
                .await
                .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            let n = client
                .execute(&statement, &[&key])
                .await
                .map_err(std::io::Error::other)?;
            if n == 0 {
                return Err(std::io::Error::other(format!(
                    "{statement}: no row changed"
                )));
            }
            Ok(())
        })
    })
    .join()
    .map_err(|_| std::io::Error::other("the damage thread panicked"))??;
    // Rows, not files: there is nothing on disk for the suite to compare.
    Ok(Vec::new())
}

/// A hand-edited limit below 1.
fn negative_limit(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    exec(
        url,
        format!("UPDATE {SCHEMA}.keys SET lim = -3 WHERE key = $1"),
        key,
    )
}

/// A token sequence that went negative.
fn negative_sequence(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    exec(
        url,
        format!("UPDATE {SCHEMA}.keys SET seq = -7 WHERE key = $1"),
        key,
    )
}

/// A lease row baton never wrote: negative slot and token, garbage holder.
fn garbage_lease_row(url: &str, key: &Key) -> std::io::Result<Vec<PathBuf>> {
    exec(
        url,
        format!(
            "INSERT INTO {SCHEMA}.leases (key, slot, token, holder_id, holder_json, acquired_at, \
             renewed_at, expires_at, ttl_ms) VALUES ($1, -1, -5, 'x', '{{not json', now(), now(), \
             now() + interval '1 hour', 1000)"
        ),
        key,
    )
}

baton_conformance::suite!(open, harness);
