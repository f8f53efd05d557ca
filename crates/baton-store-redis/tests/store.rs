//! What only the Redis store has: the refusal of servers it cannot keep its contract on
//! (eviction, no fsync-always append-only file, Redis Cluster), and wrong-typed keys.
//! Each test runs its own `redis-server` (from `scripts/server-redis`, or started here for
//! Cluster), so changing its configuration disturbs no other test. Skipped without
//! `BATON_TEST_REDIS` (the sign that a Redis can run here).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use baton_core::{AcquireRequest, ErrorKind, Holder, Key, Store, StoreUrl, Wait};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/server-redis")
}

/// A private server from `scripts/server-redis`, stopped when dropped.
struct Private {
    dir: tempfile::TempDir,
    url: String,
    port: String,
}

impl Private {
    fn start() -> Option<Private> {
        if baton_conformance::servers::url_from_env("BATON_TEST_REDIS").is_err() {
            eprintln!("SKIPPED: BATON_TEST_REDIS is not set");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("scripts/server-redis");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let url = line
            .strip_prefix("BATON_TEST_REDIS=")
            .expect("url")
            .to_owned();
        let port = std::fs::read_to_string(dir.path().join("port")).expect("port");
        Some(Private {
            dir,
            url,
            port: port.trim().to_owned(),
        })
    }

    fn cli(&self, args: &[&str]) -> String {
        cli(&self.port, args)
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn cli(port: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", port])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn open(url: &str) -> Arc<dyn Store> {
    baton_store_redis::open(&StoreUrl::parse(url).expect("url")).expect("open")
}

fn request(key: &str) -> AcquireRequest {
    let mut r = AcquireRequest::new(Key::new(key).expect("key"), Holder::current(vec![]));
    r.wait = Wait::NoWait;
    r.ttl = Some(Duration::from_secs(10));
    r
}

#[tokio::test]
async fn refuses_an_evicting_server() {
    let Some(s) = Private::start() else { return };
    s.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let e = open(&s.url)
        .acquire(&request("k"))
        .await
        .expect_err("refused");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:#}");
    assert!(!e.is_retryable(), "{e:#}");
    assert!(e.to_string().contains("noeviction"), "{e:#}");
}

#[tokio::test]
async fn refuses_a_server_without_fsync_always_unless_told() {
    let Some(s) = Private::start() else { return };
    s.cli(&["CONFIG", "SET", "appendfsync", "everysec"]);
    let e = open(&s.url)
        .acquire(&request("k"))
        .await
        .expect_err("refused");
    assert!(!e.is_retryable(), "{e:#}");
    assert!(e.to_string().contains("appendfsync everysec"), "{e:#}");
    s.cli(&["CONFIG", "SET", "appendonly", "no"]);
    let e = open(&s.url)
        .acquire(&request("k"))
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("append-only"), "{e:#}");
    let off = format!("{}?durable=off", s.url);
    let store = open(&off);
    let lease = store
        .acquire(&request("k"))
        .await
        .expect("granted with durable=off");
    store.release(&lease).await.expect("released");
}

#[tokio::test]
async fn wrong_typed_keys_are_corrupt_and_left_alone() {
    let Some(s) = Private::start() else { return };
    let store = open(&s.url);
    let lease = store.acquire(&request("k")).await.expect("granted");
    store.release(&lease).await.expect("released");
    s.cli(&["SET", "baton:{k}:token", "not-a-number"]);
    let e = store.acquire(&request("k")).await.expect_err("corrupt");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");
    assert!(e.to_string().contains("baton:{k}:token"), "{e:#}");
    assert_eq!(s.cli(&["GET", "baton:{k}:token"]), "not-a-number");
    s.cli(&["DEL", "baton:{k}:token"]);
    s.cli(&["SET", "baton:{k}:waiters", "x"]);
    let e = store
        .inspect(&Key::new("k").expect("key"))
        .await
        .expect_err("corrupt");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}");
}

/// A server with cluster mode on, started here (the script starts plain servers).
struct ClusterNode {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn refuses_redis_cluster() {
    let Some(s) = Private::start() else { return };
    drop(s);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port().to_string()
    };
    let child = Command::new("redis-server")
        .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
        .args(["--cluster-enabled", "yes", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let _node = ClusterNode { child, _dir: dir };
    for _ in 0..100 {
        if cli(&port, &["PING"]) == "PONG" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("redis://127.0.0.1:{port}/0?durable=off");
    let e = open(&url)
        .acquire(&request("k"))
        .await
        .expect_err("refused");
    assert!(!e.is_retryable(), "{e:#}");
    assert!(e.to_string().contains("Redis Cluster"), "{e:#}");
}
