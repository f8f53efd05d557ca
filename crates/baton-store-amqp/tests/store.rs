//! RabbitMQ-specific tests on the broker `scripts/test` starts (`BATON_TEST_AMQP`).

use std::sync::Arc;
use std::time::Duration;

use baton_core::{AcquireRequest, Holder, Key, Store, StoreUrl, Wait};

fn store(tag: &str) -> Option<Arc<dyn Store>> {
    let url = match baton_conformance::servers::url_from_env("BATON_TEST_AMQP") {
        Ok(u) => u,
        Err(why) => {
            baton_conformance::skipped(tag, &why);
            return None;
        }
    };
    let prefix = format!(
        "s-{}-{:x}",
        std::process::id(),
        baton_core::HolderId::random().0 as u64
    );
    let u = StoreUrl::parse(&format!("{url}?prefix={prefix}")).expect("url");
    Some(baton_store_amqp::open(&u).expect("open"))
}

fn req(key: &str, limit: u32, wait: Wait) -> AcquireRequest {
    let mut r = AcquireRequest::new(
        Key::new(key).expect("key"),
        Holder::current(vec!["test".into()]),
    );
    r.limit = limit;
    r.wait = wait;
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiter_is_counted() {
    let Some(s) = store("a_waiter_is_counted") else {
        return;
    };
    let held = s.acquire(&req("w", 1, Wait::NoWait)).await.expect("first");
    let s2 = Arc::clone(&s);
    let t = tokio::spawn(async move { s2.acquire(&req("w", 1, Wait::Forever)).await });
    for _ in 0..5 {
        let st = s
            .inspect(&Key::new("w").expect("key"))
            .await
            .expect("inspect");
        eprintln!("waiters {:?} held {}", st.waiters, st.held());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.release(&held).await.expect("release");
    let l = t.await.expect("task").expect("granted");
    s.release(&l).await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_restart() {
    let Ok(dir) = std::env::var("RMQ_DIR") else {
        return;
    };
    let url = std::env::var("RMQ_URL").expect("url");
    let u = StoreUrl::parse(&format!("{url}?prefix=dbg{}", std::process::id())).expect("url");
    let s = baton_store_amqp::open(&u).expect("open");
    for _ in 0..3 {
        let l = s.acquire(&req("sem", 2, Wait::NoWait)).await.expect("acq");
        eprintln!("token {}", l.token);
        s.release(&l).await.expect("rel");
    }
    if let Ok(w) = std::env::var("RMQ_WAIT") {
        tokio::time::sleep(Duration::from_secs(w.parse().expect("secs"))).await;
    }
    let st = std::process::Command::new("scripts/server-rabbitmq")
        .current_dir("../..")
        .args(["restart", &dir])
        .status()
        .expect("restart");
    eprintln!("restarted {st:?}");
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let r = s
            .acquire(&req("sem", 2, Wait::Timeout(Duration::from_secs(5))))
            .await;
        eprintln!(
            "after restart {:?}: {:?}",
            t.elapsed(),
            r.as_ref().map(|l| l.token)
        );
        if let Ok(l) = r {
            s.release(&l).await.expect("rel");
        }
    }
}
