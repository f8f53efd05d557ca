//! Leader election (`baton_core::leader`) on the directory store, in kernel mode and in
//! lease mode: one of two contenders is elected, the other waits and takes over when the
//! first resigns, dies (a child process killed with SIGKILL) or stops heartbeating;
//! `leader()` names the leader; `observe` sees changes; a lost lease resolves `lost()`.
//!
//! Waits are liveness bounds ([`BOUND`]), never timing assertions.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use baton_core::{
    campaign, leader, observe, AcquireRequest, Holder, Key, Leadership, LeaseState, Released,
    Store, StoreUrl, Wait,
};

/// How long a test waits for something that should happen promptly before failing.
const BOUND: Duration = Duration::from_secs(20);

/// The store URL the child-process helper campaigns on.
const CHILD_URL: &str = "BATON_TEST_LEADER_URL";

fn url(dir: &std::path::Path, lease: bool) -> String {
    let mode = if lease { "?mode=lease" } else { "" };
    format!("dir:{}{mode}", dir.display())
}

/// A store object of its own on `url`: two of them conflict like two processes.
fn open(url: &str) -> Arc<dyn Store> {
    baton_store_dir::open(&StoreUrl::parse(url).expect("url")).expect("open")
}

fn key() -> Key {
    Key::new("sched").expect("key")
}

fn me(name: &str) -> Holder {
    Holder::current(vec![name.into()])
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, fut)
        .await
        .unwrap_or_else(|_| panic!("not within {BOUND:?}: {what}"))
}

/// Whether a campaign is still waiting after a short look. Giving up drops the campaign,
/// which the store guarantees leaves nothing behind.
async fn still_waits(store: &Arc<dyn Store>) -> bool {
    let attempt = campaign(Arc::clone(store), key(), me("peek"), None);
    tokio::time::timeout(Duration::from_millis(200), attempt)
        .await
        .is_err()
}

async fn resign_hands_over(lease: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let url = url(tmp.path(), lease);
    let (a, b) = (open(&url), open(&url));
    assert_eq!(
        leader(&*a, &key()).await.expect("leader"),
        None,
        "no key yet"
    );

    let first = within("first elected", campaign(a.clone(), key(), me("a"), None))
        .await
        .expect("campaign a");
    assert!(first.is_leading());
    let now = leader(&*b, &key()).await.expect("leader").expect("a leads");
    let holder = now.holder.as_ref().expect("holder info");
    assert_eq!(holder.id, first.lease().holder.id);
    assert_eq!(holder.pid, std::process::id());
    assert_eq!(now.token, Some(first.token()));
    assert!(now.since().is_some());

    assert!(still_waits(&b).await, "a second contender waits");
    let contender = tokio::spawn(campaign(b.clone(), key(), me("b"), None));
    let first_token = first.token();
    assert_eq!(first.resign().await.expect("resign"), Released::Released);
    let second = within("second elected", contender)
        .await
        .expect("join")
        .expect("campaign b");
    assert!(second.token() > first_token);
    let now = leader(&*a, &key()).await.expect("leader").expect("b leads");
    assert_eq!(
        now.holder.map(|h| h.id),
        Some(second.lease().holder.id),
        "leader() names the new leader"
    );
    assert_eq!(second.resign().await.expect("resign"), Released::Released);
    assert_eq!(leader(&*a, &key()).await.expect("leader"), None);
}

#[tokio::test]
async fn kernel_one_is_elected_and_the_other_takes_over_on_resign() {
    resign_hands_over(false).await;
}

#[tokio::test]
async fn lease_one_is_elected_and_the_other_takes_over_on_resign() {
    resign_hands_over(true).await;
}

/// Not a test on its own: the child process of `leader_dies`, which campaigns on the
/// store in `$BATON_TEST_LEADER_URL` and then waits to be killed.
#[tokio::test]
#[ignore = "run only as the child of a take-over test"]
async fn child_campaigns_and_waits() {
    let Ok(url) = std::env::var(CHILD_URL) else {
        return;
    };
    let leadership = campaign(open(&url), key(), me("child"), None)
        .await
        .expect("child campaign");
    // The parent kills us long before this.
    tokio::time::sleep(Duration::from_secs(60)).await;
    drop(leadership);
}

/// A child process that campaigns on `url`; killed if the test ends first.
struct ChildLeader(Child);

impl ChildLeader {
    fn start(url: &str) -> ChildLeader {
        let exe = std::env::current_exe().expect("test binary");
        let child = Command::new(exe)
            .args(["--exact", "child_campaigns_and_waits", "--ignored"])
            .env(CHILD_URL, url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the child");
        ChildLeader(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGKILL, and reap it so that its pid is gone (a zombie still looks alive).
    fn kill(&mut self) {
        self.0.kill().expect("kill");
        self.0.wait().expect("wait");
    }
}

impl Drop for ChildLeader {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn a_dead_leader_is_replaced(lease: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let url = url(tmp.path(), lease);
    let store = open(&url);
    let mut child = ChildLeader::start(&url);
    within("the child leads", async {
        loop {
            let now = leader(&*store, &key()).await.expect("leader");
            if now.and_then(|l| l.holder).map(|h| h.pid) == Some(child.pid()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(still_waits(&store).await, "nobody else is elected");
    let old = leader(&*store, &key())
        .await
        .expect("leader")
        .expect("child");

    child.kill();
    // Kernel locks die with the process; a lease whose holder's process is gone on this
    // host is reclaimed at once.
    let next = within(
        "elected after the leader died",
        campaign(store.clone(), key(), me("next"), None),
    )
    .await
    .expect("campaign");
    assert!(Some(next.token()) > old.token, "a higher token");
    let now = leader(&*store, &key()).await.expect("leader").expect("us");
    assert_eq!(now.holder.map(|h| h.pid), Some(std::process::id()));
    next.resign().await.expect("resign");
}

#[tokio::test]
async fn kernel_a_dead_leader_is_replaced() {
    a_dead_leader_is_replaced(false).await;
}

#[tokio::test]
async fn lease_a_dead_leader_is_replaced() {
    a_dead_leader_is_replaced(true).await;
}

#[tokio::test]
async fn lease_a_silent_leader_is_replaced_after_its_ttl() {
    let tmp = tempfile::tempdir().expect("tmp");
    let url = url(tmp.path(), true);
    let (a, b) = (open(&url), open(&url));
    // A leader whose keeper stopped: a lease that nobody renews. Its process (this one)
    // is alive, so only a TTL of silence frees it.
    let mut req = AcquireRequest::new(key(), me("silent"));
    req.ttl = Some(Duration::from_millis(300));
    req.wait = Wait::NoWait;
    let silent = a.acquire(&req).await.expect("acquire");
    let next = within(
        "elected after the TTL",
        campaign(b.clone(), key(), me("next"), Some(Duration::from_secs(5))),
    )
    .await
    .expect("campaign");
    assert!(next.token() > silent.token);
    assert_eq!(
        a.release(&silent).await.expect("release"),
        Released::NotHeld,
        "the silent leader's release frees nothing"
    );
    assert!(next.is_leading());
    next.resign().await.expect("resign");
}

#[tokio::test]
async fn lease_a_broken_leadership_resolves_lost() {
    let tmp = tempfile::tempdir().expect("tmp");
    let url = url(tmp.path(), true);
    let (a, b) = (open(&url), open(&url));
    // Renewals every 333 ms; the break is seen at the next one.
    let leading: Leadership = campaign(a, key(), me("a"), Some(Duration::from_secs(1)))
        .await
        .expect("campaign");
    let broken = b.break_lease(&key(), None).await.expect("break");
    assert_eq!(broken.len(), 1);
    let state = within("lost() resolves", leading.lost()).await;
    assert!(matches!(state, LeaseState::Lost { .. }), "{state:?}");
    assert!(!leading.is_leading());
    assert_eq!(leading.resign().await.expect("resign"), Released::NotHeld);
}

async fn observe_sees_changes(lease: bool) {
    let tmp = tempfile::tempdir().expect("tmp");
    let url = url(tmp.path(), lease);
    let (a, b) = (open(&url), open(&url));
    let mut rx = observe(b, key(), Duration::from_millis(20))
        .await
        .expect("observe");
    assert_eq!(*rx.borrow_and_update(), None);

    let leading = campaign(a, key(), me("a"), None).await.expect("campaign");
    let want = Some(leading.lease().holder.id);
    within("observe sees the leader", async {
        loop {
            let seen = rx
                .borrow_and_update()
                .as_ref()
                .and_then(|l| l.holder.clone());
            if seen.map(|h| h.id) == want {
                return;
            }
            rx.changed().await.expect("observer runs");
        }
    })
    .await;

    leading.resign().await.expect("resign");
    within("observe sees no leader", async {
        while rx.borrow_and_update().is_some() {
            rx.changed().await.expect("observer runs");
        }
    })
    .await;
}

#[tokio::test]
async fn kernel_observe_sees_changes() {
    observe_sees_changes(false).await;
}

#[tokio::test]
async fn lease_observe_sees_changes() {
    observe_sees_changes(true).await;
}
