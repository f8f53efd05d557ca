//! SQLite-store behaviour the shared conformance suite does not cover: TTL expiry and
//! renewal, clocks, FIFO order, the on-disk format, hostile or corrupt files, and a burst
//! of processes on one database.
//!
//! No test asserts on speed: waits are liveness bounds ("it happens within 30 s").

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton_core::{
    AcquireRequest, ErrorKind, Holder, Key, Lease, Released, SlotState, Store, StoreUrl, Wait,
};
use baton_store_sqlite::{SqliteStore, APPLICATION_ID, SCHEMA_VERSION};
use rusqlite::Connection;

const LIVENESS: Duration = Duration::from_secs(30);

fn url(path: &Path) -> StoreUrl {
    StoreUrl::parse(&format!("sqlite:{}", path.display())).expect("url")
}

fn open(path: &Path) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(&url(path)).expect("open"))
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

fn req_ttl(key: &str, wait: Wait, ttl: Duration) -> AcquireRequest {
    let mut r = req(key, 1, wait);
    r.ttl = Some(ttl);
    r
}

fn db(dir: &Path) -> PathBuf {
    dir.join("locks.db")
}

/// Rows of a table, counted on a connection of the test's own.
fn count(path: &Path, table: &str) -> i64 {
    let c = Connection::open(path).expect("sqlite");
    c.busy_timeout(Duration::from_secs(10)).expect("busy");
    c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .expect("count")
}

fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is valid for clock_gettime to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIVENESS, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {LIVENESS:?}"))
}

#[tokio::test]
async fn grants_release_and_answer_not_held() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("sub/dir/locks.db");
    let s = open(&path);
    assert!(path.is_file(), "the file and its directories are created");
    let lease = s
        .acquire(&req("a/b", 1, Wait::NoWait))
        .await
        .expect("acquire");
    assert_eq!(lease.slot, 0);
    assert_eq!(lease.ttl, Some(baton_store_sqlite::DEFAULT_TTL));
    assert!(lease.sent_at.is_some());
    let st = s.inspect(&lease.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Held);
    assert_eq!(st.slots[0].token, Some(lease.token));
    assert_eq!(
        st.slots[0].holder.as_ref().map(|h| h.id),
        Some(lease.holder.id)
    );
    assert_eq!(st.last_token, Some(lease.token));
    assert_eq!(st.waiters, Some(0));
    // The heartbeat and the expiry, for display: the grant is the first heartbeat, and
    // the expiry lies about a TTL later.
    let slot = &st.slots[0];
    assert_eq!(slot.renewed_unix_ms, slot.since_unix_ms, "{slot:?}");
    let (renewed, expires) = (
        slot.renewed_unix_ms.expect("renewed"),
        slot.expires_unix_ms.expect("expires"),
    );
    let ttl_ms = baton_store_sqlite::DEFAULT_TTL.as_millis() as u64;
    assert!(
        expires > renewed && expires <= renewed + ttl_ms + 1000,
        "{slot:?}"
    );
    let err = s
        .acquire(&req("a/b", 1, Wait::NoWait))
        .await
        .expect_err("busy");
    assert_eq!(err.kind(), ErrorKind::Busy, "{err:#}");
    assert_eq!(count(&path, "baton_waiters"), 0, "no-wait leaves no ticket");
    assert_eq!(
        s.release(&lease).await.expect("release"),
        Released::Released
    );
    assert_eq!(s.release(&lease).await.expect("release"), Released::NotHeld);
    assert_eq!(
        s.inspect(&lease.key).await.expect("inspect").slots[0].state,
        SlotState::Free
    );
    assert_eq!(
        s.list().await.expect("list"),
        vec![Key::new("a/b").expect("key")]
    );
    // The file is marked as baton's and is in WAL mode.
    let c = Connection::open(&path).expect("sqlite");
    let app: i32 = c
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .expect("app id");
    let ver: i32 = c
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("mode");
    assert_eq!(
        (app, ver, mode.as_str()),
        (APPLICATION_ID, SCHEMA_VERSION, "wal")
    );
}

#[tokio::test]
async fn relative_paths_are_refused() {
    let err =
        SqliteStore::open(&StoreUrl::parse("sqlite:locks.db").expect("url")).expect_err("relative");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("absolute"), "{err}");
}

#[tokio::test]
async fn a_key_keeps_its_limit_and_tokens_survive_reopening() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = open(&db(tmp.path()));
    let a = s.acquire(&req("k", 2, Wait::NoWait)).await.expect("a");
    let err = s
        .acquire(&req("k", 3, Wait::NoWait))
        .await
        .expect_err("mismatch");
    assert_eq!(err.kind(), ErrorKind::LimitMismatch, "{err:#}");
    assert_eq!(err.current_limit(), Some(2));
    let b = s.acquire(&req("k", 2, Wait::NoWait)).await.expect("b");
    assert_ne!(a.slot, b.slot);
    assert!(b.token > a.token);
    s.release(&a).await.expect("release");
    s.release(&b).await.expect("release");
    drop(s);
    let s = open(&db(tmp.path()));
    let c = s.acquire(&req("k", 2, Wait::NoWait)).await.expect("c");
    assert!(c.token > b.token, "{:?} after {:?}", c.token, b.token);
    assert_eq!(c.slot, 0, "the lowest free slot");
}

#[tokio::test]
async fn a_queued_waiter_is_not_passed_by_a_no_wait_request() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = open(&db(tmp.path()));
    let key = Key::new("nobarge").expect("key");
    let held = s
        .acquire(&req("nobarge", 1, Wait::NoWait))
        .await
        .expect("a");
    let s2 = Arc::clone(&s);
    let waiter = tokio::spawn(async move { s2.acquire(&req("nobarge", 1, Wait::Forever)).await });
    within("the waiter queueing", async {
        while s.inspect(&key).await.expect("inspect").waiters != Some(1) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    s.release(&held).await.expect("release");
    // Either the waiter already has the slot, or it is still first in line: a no-wait
    // newcomer is Busy in both cases.
    let err = s
        .acquire(&req("nobarge", 1, Wait::NoWait))
        .await
        .expect_err("no barging");
    assert_eq!(err.kind(), ErrorKind::Busy, "{err:#}");
    let lease = within("the waiter", waiter)
        .await
        .expect("task")
        .expect("granted");
    assert!(lease.token > held.token);
}

#[tokio::test]
async fn an_expired_lease_is_reclaimed_and_its_old_holder_told() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = open(&db(tmp.path()));
    let ttl = Duration::from_millis(300);
    let old = s
        .acquire(&req_ttl("ttl", Wait::NoWait, ttl))
        .await
        .expect("old");
    // While live, renew works.
    let renewed = s.renew(&old).await.expect("renew while live");
    assert_eq!(renewed.token, old.token);
    // Nobody renews now: another acquirer gets the slot once the TTL has run out.
    let new = within(
        "a grant after the TTL",
        s.acquire(&req_ttl(
            "ttl",
            Wait::Timeout(LIVENESS),
            Duration::from_secs(60),
        )),
    )
    .await
    .expect("reclaimed");
    assert!(new.token > old.token);
    assert_eq!(new.slot, old.slot);
    let err = s.renew(&old).await.expect_err("lost");
    assert_eq!(err.kind(), ErrorKind::Lost, "{err:#}");
    assert_eq!(s.release(&old).await.expect("release"), Released::NotHeld);
    let st = s.inspect(&new.key).await.expect("inspect");
    assert_eq!(
        (st.slots[0].state, st.slots[0].token),
        (SlotState::Held, Some(new.token)),
        "the old holder's release freed the new holder's slot: {st:?}"
    );
    s.release(&new).await.expect("release");
}

#[tokio::test]
async fn an_expired_lease_answers_not_held_even_before_reclaim() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = open(&db(tmp.path()));
    let lease = s
        .acquire(&req_ttl("late", Wait::NoWait, Duration::from_millis(50)))
        .await
        .expect("lease");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = s.inspect(&lease.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Free, "{st:?}");
    assert!(st.slots[0].note.is_some(), "{st:?}");
    assert_eq!(
        s.renew(&lease).await.expect_err("lost").kind(),
        ErrorKind::Lost
    );
    assert_eq!(s.release(&lease).await.expect("release"), Released::NotHeld);
}

/// Rewrites one lease row's clock fields by hand.
fn set_lease(path: &Path, key: &str, sets: &str) {
    let c = Connection::open(path).expect("sqlite");
    c.busy_timeout(Duration::from_secs(10)).expect("busy");
    let n = c
        .execute(
            &format!("UPDATE baton_leases SET {sets} WHERE key = ?1"),
            [key],
        )
        .expect("update");
    assert_eq!(n, 1);
}

#[tokio::test]
async fn expiry_ignores_the_wall_clock() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = db(tmp.path());
    let s = open(&path);
    let year_3000_ms: i64 = 32_503_680_000_000;

    // Wall-clock fields far in the future, monotonic expiry passed: stale.
    let a = s
        .acquire(&req_ttl("wall/a", Wait::NoWait, Duration::from_secs(600)))
        .await
        .expect("a");
    set_lease(
        &path,
        "wall/a",
        &format!(
            "acquired_ms = {year_3000_ms}, renewed_ms = {year_3000_ms}, expires_boot_ns = {}",
            monotonic_ns() - 1
        ),
    );
    let st = s.inspect(&a.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Free, "{st:?}");
    let b = s
        .acquire(&req("wall/a", 1, Wait::NoWait))
        .await
        .expect("the stale lease is reclaimed");
    assert!(b.token > a.token);
    assert_eq!(s.renew(&a).await.expect_err("lost").kind(), ErrorKind::Lost);

    // Wall-clock fields from 1970, monotonic expiry ahead: live.
    let c = s
        .acquire(&req_ttl("wall/c", Wait::NoWait, Duration::from_secs(600)))
        .await
        .expect("c");
    set_lease(
        &path,
        "wall/c",
        &format!(
            "acquired_ms = 0, renewed_ms = 0, expires_boot_ns = {}",
            monotonic_ns() + 600_000_000_000
        ),
    );
    let st = s.inspect(&c.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Held, "{st:?}");
    let err = s
        .acquire(&req("wall/c", 1, Wait::NoWait))
        .await
        .expect_err("still held");
    assert_eq!(err.kind(), ErrorKind::Busy);
    s.renew(&c).await.expect("a live lease renews");
}

#[tokio::test]
async fn a_lease_from_another_boot_is_stale() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = db(tmp.path());
    let s = open(&path);
    let a = s
        .acquire(&req_ttl("boot", Wait::NoWait, Duration::from_secs(600)))
        .await
        .expect("a");
    set_lease(
        &path,
        "boot",
        "boot_id = '00000000-0000-0000-0000-000000000000'",
    );
    let st = s.inspect(&a.key).await.expect("inspect");
    assert_eq!(st.slots[0].state, SlotState::Free, "{st:?}");
    assert!(
        st.slots[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("reboot")),
        "{st:?}"
    );
    let b = s.acquire(&req("boot", 1, Wait::NoWait)).await.expect("b");
    assert!(b.token > a.token);
    assert_eq!(s.renew(&a).await.expect_err("lost").kind(), ErrorKind::Lost);
    assert_eq!(s.release(&a).await.expect("release"), Released::NotHeld);
}

#[tokio::test]
async fn timed_out_and_cancelled_waits_leave_no_ticket() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = db(tmp.path());
    let s = open(&path);
    let key = Key::new("residue").expect("key");
    let held = s
        .acquire(&req("residue", 1, Wait::NoWait))
        .await
        .expect("held");

    let err = s
        .acquire(&req(
            "residue",
            1,
            Wait::Timeout(Duration::from_millis(200)),
        ))
        .await
        .expect_err("timeout");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:#}");
    assert_eq!(count(&path, "baton_waiters"), 0, "after a timeout");

    // A dropped future: its ticket existed while it waited, and goes right after.
    let s2 = Arc::clone(&s);
    let task = tokio::spawn(async move { s2.acquire(&req("residue", 1, Wait::Forever)).await });
    within("the waiter queueing", async {
        while count(&path, "baton_waiters") != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    task.abort();
    assert!(task.await.expect_err("aborted").is_cancelled());
    within("the cancelled waiter's ticket going", async {
        while count(&path, "baton_waiters") != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(s.inspect(&key).await.expect("inspect").waiters, Some(0));

    s.release(&held).await.expect("release");
    let again = s
        .acquire(&req("residue", 1, Wait::NoWait))
        .await
        .expect("free, with nobody queued");
    s.release(&again).await.expect("release");
    assert_eq!(count(&path, "baton_leases"), 0);
}

#[tokio::test]
async fn break_frees_a_holder_and_its_renew_answers_lost() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = open(&db(tmp.path()));
    let a = s.acquire(&req("brk", 2, Wait::NoWait)).await.expect("a");
    let b = s.acquire(&req("brk", 2, Wait::NoWait)).await.expect("b");
    let freed = s
        .break_lease(&a.key, Some(a.holder.id))
        .await
        .expect("break");
    assert_eq!(freed.len(), 1, "{freed:?}");
    assert_eq!(freed[0].token, Some(a.token));
    assert_eq!(s.renew(&a).await.expect_err("lost").kind(), ErrorKind::Lost);
    assert_eq!(s.release(&a).await.expect("release"), Released::NotHeld);
    s.renew(&b).await.expect("the other holder keeps its lease");
    let freed = s.break_lease(&a.key, None).await.expect("break all");
    assert_eq!(freed.len(), 1);
    assert!(s.break_lease(&a.key, None).await.expect("none").is_empty());
    let err = s
        .break_lease(&Key::new("nope").expect("key"), None)
        .await
        .expect_err("no key");
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn shrinking_a_limit_evicts_nobody_and_grants_resume_below_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let s = open(&db(tmp.path()));
    let a = s.acquire(&req("rs", 2, Wait::NoWait)).await.expect("a");
    let b = s.acquire(&req("rs", 2, Wait::NoWait)).await.expect("b");
    let st = s
        .resize(&a.key, baton_core::Resize::To(1))
        .await
        .expect("resize");
    assert_eq!(st.limit, 1);
    assert_eq!(st.held(), 2, "nobody evicted: {st:?}");
    s.renew(&b)
        .await
        .expect("the holder above the new limit keeps its lease");
    let err = s
        .acquire(&req("rs", 2, Wait::NoWait))
        .await
        .expect_err("old limit");
    assert_eq!(err.kind(), ErrorKind::LimitMismatch);
    s.release(&a).await.expect("release");
    let err = s
        .acquire(&req("rs", 1, Wait::NoWait))
        .await
        .expect_err("still full");
    assert_eq!(err.kind(), ErrorKind::Busy, "1 held, limit 1: {err:#}");
    s.release(&b).await.expect("release");
    let c = s.acquire(&req("rs", 1, Wait::NoWait)).await.expect("c");
    assert_eq!((c.slot, c.limit), (0, 1));
    // Growing it lets a second holder in.
    s.resize(&c.key, baton_core::Resize::To(3))
        .await
        .expect("grow");
    let d = s.acquire(&req("rs", 3, Wait::NoWait)).await.expect("d");
    assert_eq!(d.slot, 1);
    let err = s
        .resize(&c.key, baton_core::Resize::To(0))
        .await
        .expect_err("zero");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

// ---- corrupt and foreign files ----

fn assert_refused(path: &Path, what: &str) {
    let before = std::fs::read(path).expect("read");
    let err = SqliteStore::open(&url(path)).expect_err(what);
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{what}: {err:#}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{what}: the error names the file: {err}"
    );
    assert_eq!(
        std::fs::read(path).expect("read"),
        before,
        "{what}: changed"
    );
}

#[test]
fn garbage_and_truncated_files_are_refused_untouched() {
    let tmp = tempfile::tempdir().expect("tmp");
    let garbage = tmp.path().join("garbage.db");
    let bytes: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&garbage, &bytes).expect("write");
    assert_refused(&garbage, "garbage");

    // A real baton database, cut short.
    let path = db(tmp.path());
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let s = open(&path);
        let l = s
            .acquire(&req("t", 1, Wait::NoWait))
            .await
            .expect("acquire");
        s.release(&l).await.expect("release");
    });
    // Dropping the runtime joins its blocking threads, the last users of the store.
    drop(rt);
    let rt = tokio::runtime::Runtime::new().expect("rt");
    assert!(
        !tmp.path().join("locks.db-wal").exists(),
        "checkpointed on close"
    );
    let full = std::fs::read(&path).expect("read");
    std::fs::write(&path, &full[..100]).expect("truncate");
    assert_refused(&path, "a baton database truncated to 100 bytes");

    // Cut after the first page: the header is readable, the tables are not.
    std::fs::write(&path, &full[..full.len().min(4096)]).expect("truncate");
    let before = std::fs::read(&path).expect("read");
    match SqliteStore::open(&url(&path)) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:#}"),
        Ok(s) => {
            let s = Arc::new(s);
            let err = rt
                .block_on(s.acquire(&req("t", 1, Wait::NoWait)))
                .expect_err("a truncated database");
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{err:#}");
        }
    }
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

#[test]
fn another_apps_database_is_refused_untouched() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = tmp.path().join("theirs.db");
    {
        let c = Connection::open(&path).expect("sqlite");
        c.execute_batch("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes(body) VALUES ('mine');")
            .expect("their schema");
    }
    assert_refused(&path, "another application's database");
    assert!(!tmp.path().join("theirs.db-wal").exists());

    // Another application that marked its file with its own application_id, no tables.
    let path = tmp.path().join("marked.db");
    {
        let c = Connection::open(&path).expect("sqlite");
        c.pragma_update(None, "application_id", 0x1234_5678)
            .expect("id");
    }
    assert_refused(&path, "another application's empty database");
}

/// Makes one baton table non-STRICT (as a careless tool might), then runs `sql`.
fn tamper(path: &Path, table: &str, sql: &str) {
    {
        let c = Connection::open(path).expect("sqlite");
        c.execute_batch(&format!(
            "PRAGMA writable_schema = ON;
             UPDATE sqlite_schema SET sql = replace(sql, ') STRICT', ')') WHERE name = '{table}';
             PRAGMA writable_schema = OFF;"
        ))
        .expect("unstrict");
    }
    let c = Connection::open(path).expect("sqlite");
    c.execute_batch(sql).expect("tamper");
}

#[test]
fn wrong_typed_values_are_corrupt_not_panics_and_free_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = db(tmp.path());
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let held = rt.block_on(async {
        let s = open(&path);
        s.acquire(&req("lim", 1, Wait::NoWait)).await.expect("lim");
        s.acquire(&req("tok", 1, Wait::NoWait)).await.expect("tok")
    });
    tamper(
        &path,
        "baton_keys",
        "UPDATE baton_keys SET lim = 'two' WHERE key = 'lim';",
    );
    tamper(
        &path,
        "baton_leases",
        "UPDATE baton_leases SET token = 'abc' WHERE key = 'tok';",
    );
    let before = std::fs::read(&path).expect("read");

    rt.block_on(async {
        let s = open(&path);
        for key in ["lim", "tok"] {
            let err = s.acquire(&req(key, 1, Wait::NoWait)).await.expect_err(key);
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{key}: {err:#}");
            assert!(err.to_string().contains("TEXT"), "{key}: {err}");
            let err = s
                .acquire(&req(key, 1, Wait::Timeout(Duration::from_millis(100))))
                .await
                .expect_err(key);
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{key}: {err:#}");
            let err = s
                .inspect(&Key::new(key).expect("key"))
                .await
                .expect_err(key);
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{key}: {err:#}");
        }
        // The damaged lease is not freed by its holder's release or taken by a renew.
        assert_eq!(s.release(&held).await.expect("release"), Released::NotHeld);
        assert_eq!(
            s.renew(&held).await.expect_err("renew").kind(),
            ErrorKind::Lost
        );
        assert_eq!(s.list().await.expect("list").len(), 2);
    });
    assert_eq!(count(&path, "baton_waiters"), 0);
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "the file changed"
    );
    let c = Connection::open(&path).expect("sqlite");
    let tok: String = c
        .query_row(
            "SELECT token FROM baton_leases WHERE key = 'tok'",
            [],
            |r| r.get(0),
        )
        .expect("row");
    assert_eq!(tok, "abc");
}

// ---- a burst of processes ----

const WORKER_ENV: &str = "BATON_SQLITE_TEST_WORKER";
/// Processes in the burst; `BATON_SQLITE_BURST=1000` tries a bigger one by hand.
fn burst() -> usize {
    std::env::var("BATON_SQLITE_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}
const BURST_LIMIT: u32 = 2;

/// Run by worker processes only: acquire, record, release, record.
#[test]
fn burst_worker() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        return;
    };
    let (db_path, history) = spec.split_once('\n').expect("spec");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let s = SqliteStore::open(&url(Path::new(db_path))).expect("open");
        let lease: Lease = s
            .acquire(&req("burst", BURST_LIMIT, Wait::Forever))
            .await
            .expect("acquire");
        let granted = monotonic_ns();
        std::thread::sleep(Duration::from_millis(1));
        let releasing = monotonic_ns();
        let line = format!("{granted} {releasing} {} {}\n", lease.slot, lease.token);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(history)
            .expect("history");
        f.write_all(line.as_bytes()).expect("write");
        assert_eq!(
            s.release(&lease).await.expect("release"),
            Released::Released
        );
    });
}

#[test]
fn a_burst_of_processes_never_sees_database_is_locked() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = db(tmp.path());
    let history = tmp.path().join("history");
    std::fs::write(&history, b"").expect("history");
    let exe = std::env::current_exe().expect("exe");
    let n = burst();
    let children: Vec<_> = (0..n)
        .map(|_| {
            std::process::Command::new(&exe)
                .args(["--exact", "burst_worker", "--test-threads=1", "--quiet"])
                .env(
                    WORKER_ENV,
                    format!("{}\n{}", path.display(), history.display()),
                )
                // libtest prints a failing worker's panic on stdout.
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut failures = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        if !out.status.success() {
            failures.push(format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} processes failed; first:\n{}",
        failures.len(),
        failures[0]
    );
    let text = std::fs::read_to_string(&history).expect("history");
    let mut events = Vec::new();
    let mut tokens = Vec::new();
    for line in text.lines() {
        let f: Vec<i64> = line
            .split(' ')
            .map(|x| x.parse().expect("number"))
            .collect();
        // A release sorts before a grant at the same instant: the intervals are closed
        // inside the real leases, so touching ends are not an overlap.
        events.push((f[0], 1i32));
        events.push((f[1], -1i32));
        assert!((f[2] as u32) < BURST_LIMIT, "slot {} >= limit", f[2]);
        tokens.push(f[3]);
    }
    assert_eq!(tokens.len(), n, "every process recorded its lease");
    events.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        max = max.max(now);
    }
    assert!(
        max <= BURST_LIMIT as i32,
        "{max} leases overlapped, limit {BURST_LIMIT}"
    );
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), n, "tokens are unique");
    assert_eq!(count(&path, "baton_leases"), 0);
    assert_eq!(count(&path, "baton_waiters"), 0);
}

// ---- lock-delay ----

fn delayed(key: &str, wait: Wait, delay: Duration) -> AcquireRequest {
    let mut r = req_ttl(key, wait, Duration::from_secs(600));
    r.lock_delay = Some(delay);
    r
}

fn user_version(path: &Path) -> i32 {
    Connection::open(path)
        .expect("sqlite")
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version")
}

#[tokio::test]
async fn an_expired_lease_is_held_back_from_its_expiry_for_the_lock_delay() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = db(tmp.path());
    let s = open(&path);
    assert!(s.capabilities().lock_delay);
    let minute = Duration::from_secs(60);
    let a = s
        .acquire(&delayed("ld/a", Wait::NoWait, minute))
        .await
        .expect("a");
    assert_eq!(
        s.inspect(&a.key).await.expect("inspect").lock_delay_ms,
        Some(60_000)
    );
    set_lease(
        &path,
        "ld/a",
        &format!("expires_boot_ns = {}", monotonic_ns() - 1),
    );
    let err = s
        .acquire(&delayed("ld/a", Wait::NoWait, Duration::ZERO))
        .await
        .expect_err("held back");
    assert_eq!(err.kind(), ErrorKind::Busy);
    assert!(err.to_string().contains("lock-delay of 1m"), "{err:#}");
    let st = s.inspect(&a.key).await.expect("inspect");
    assert!(
        st.slots[0]
            .note
            .as_deref()
            .is_some_and(|n| n.starts_with("held back")),
        "{st:?}"
    );
    // A waiter times out inside the delay, and leaves no ticket.
    let err = s
        .acquire(&delayed(
            "ld/a",
            Wait::Timeout(Duration::from_millis(200)),
            minute,
        ))
        .await
        .expect_err("still held back");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err:#}");
    assert_eq!(count(&path, "baton_waiters"), 0);
    // The delay runs from the expiry: an expiry over a minute ago frees the slot.
    let _ = s.acquire(&delayed("ld/a", Wait::NoWait, minute)).await;
    let c = Connection::open(&path).expect("sqlite");
    c.execute(
        "UPDATE baton_held_back SET until_boot_ns = ?1 WHERE key = 'ld/a'",
        [monotonic_ns() - 1],
    )
    .expect("age the hold-back");
    let b = s
        .acquire(&delayed("ld/a", Wait::NoWait, minute))
        .await
        .expect("the delay is over");
    assert!(b.token > a.token);
    assert_eq!(count(&path, "baton_held_back"), 0);
    // A clean release never waits.
    assert_eq!(s.release(&b).await.expect("release"), Released::Released);
    s.acquire(&delayed("ld/a", Wait::NoWait, minute))
        .await
        .expect("after a clean release");
}

#[tokio::test]
async fn a_late_release_or_a_break_is_a_loss_and_holds_the_slot_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = db(tmp.path());
    let s = open(&path);
    let minute = Duration::from_secs(60);
    let a = s
        .acquire(&delayed("ld/late", Wait::NoWait, minute))
        .await
        .expect("a");
    set_lease(
        &path,
        "ld/late",
        &format!("expires_boot_ns = {}", monotonic_ns() - 1),
    );
    assert_eq!(s.release(&a).await.expect("release"), Released::NotHeld);
    let err = s
        .acquire(&delayed("ld/late", Wait::NoWait, minute))
        .await
        .expect_err("held back after a late release");
    assert_eq!(err.kind(), ErrorKind::Busy, "{err:#}");

    let b = s
        .acquire(&delayed("ld/broken", Wait::NoWait, minute))
        .await
        .expect("b");
    s.break_lease(&b.key, None).await.expect("break");
    let err = s
        .acquire(&delayed("ld/broken", Wait::NoWait, minute))
        .await
        .expect_err("held back after a break");
    assert_eq!(err.kind(), ErrorKind::Busy, "{err:#}");
    assert!(err.to_string().contains("lock-delay"), "{err:#}");
    // A key without a delay is free at once after a break.
    let c = s
        .acquire(&req("ld/plain", 1, Wait::NoWait))
        .await
        .expect("c");
    s.break_lease(&c.key, None).await.expect("break");
    s.acquire(&req("ld/plain", 1, Wait::NoWait))
        .await
        .expect("no delay");
}

#[test]
fn garbage_lock_delay_rows_are_corrupt_and_free_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = db(tmp.path());
    let rt = tokio::runtime::Runtime::new().expect("rt");
    rt.block_on(async {
        let s = open(&path);
        let minute = Duration::from_secs(60);
        s.acquire(&delayed("d1", Wait::NoWait, minute))
            .await
            .expect("d1");
        let d2 = s
            .acquire(&delayed("d2", Wait::NoWait, minute))
            .await
            .expect("d2");
        s.break_lease(&d2.key, None).await.expect("break");
    });
    tamper(
        &path,
        "baton_lock_delays",
        "UPDATE baton_lock_delays SET delay_ms = 'soon' WHERE key = 'd1';",
    );
    tamper(
        &path,
        "baton_held_back",
        "PRAGMA ignore_check_constraints = ON;
         UPDATE baton_held_back SET how = 'forgiven' WHERE key = 'd2';",
    );
    rt.block_on(async {
        let s = open(&path);
        for key in ["d1", "d2"] {
            let err = s
                .acquire(&req_ttl(key, Wait::NoWait, Duration::from_secs(5)))
                .await
                .expect_err(key);
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{key}: {err:#}");
            let err = s
                .inspect(&Key::new(key).expect("key"))
                .await
                .expect_err(key);
            assert_eq!(err.kind(), ErrorKind::Corrupt, "{key}: {err:#}");
        }
    });
}

#[tokio::test]
async fn a_version_1_file_stays_1_until_a_key_gets_a_lock_delay_and_2_until_a_delete() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = db(tmp.path());
    drop(open(&path));
    // What a baton before lock-delays wrote.
    Connection::open(&path)
        .expect("sqlite")
        .execute_batch(
            "DROP TABLE baton_lock_delays; DROP TABLE baton_held_back; PRAGMA user_version = 1;",
        )
        .expect("downgrade");
    let s = open(&path);
    let a = s
        .acquire(&req("plain", 1, Wait::NoWait))
        .await
        .expect("plain");
    s.release(&a).await.expect("release");
    assert_eq!(user_version(&path), 1);
    let b = s
        .acquire(&delayed("delayed", Wait::NoWait, Duration::from_secs(1)))
        .await
        .expect("delayed");
    // Version 2 has lock-delays; only a delete raises it to 3.
    assert_eq!(user_version(&path), 2);
    assert_eq!(
        s.inspect(&b.key).await.expect("inspect").lock_delay_ms,
        Some(1000)
    );
    // A delete raises it to 3 (the token floors), and the key made again goes on from
    // the deleted one's tokens.
    s.release(&b).await.expect("release");
    s.delete(&b.key).await.expect("delete");
    assert_eq!(user_version(&path), SCHEMA_VERSION);
    let again = s
        .acquire(&req("delayed", 2, Wait::NoWait))
        .await
        .expect("made again");
    assert!(again.token > b.token, "{} after {}", again.token, b.token);
    assert_eq!(again.limit, 2);
}
