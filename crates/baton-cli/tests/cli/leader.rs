//! `baton leader KEY`: who holds a key's one slot (the leader among `baton run` standbys),
//! exit 0, or "no leader", exit 1.

use crate::util::{wait_until, Dir, TestCommand};

/// `baton leader --json KEY`, parsed: the exit code and the one JSON line.
fn leader_json(cmd: &mut TestCommand) -> (Option<i32>, serde_json::Value) {
    let out = cmd.output();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line; outcome: {out:#?}");
    let value =
        serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("JSON ({e}); outcome: {out:#?}"));
    (out.code, value)
}

/// The pid of KEY's leader, if it has one.
fn leader_pid(dir: &Dir, key: &str) -> Option<i64> {
    match leader_json(&mut dir.cmd(&["leader", "--json", key])) {
        (Some(0), v) => {
            assert_eq!(v["type"], "leader", "{v}");
            v["holder"]["pid"].as_i64()
        }
        (Some(1), v) => {
            assert_eq!(v["type"], "no_leader", "{v}");
            None
        }
        other => panic!("unexpected: {other:?}"),
    }
}

#[test]
fn the_holder_leads_and_a_standby_takes_over_when_it_ends() {
    let dir = Dir::new();
    let first = dir
        .cmd(&["run", "-k", "sched", "--", "sleep", "30"])
        .spawn();
    wait_until("the first run leads", || {
        leader_pid(&dir, "sched") == Some(i64::from(first.pid()))
    });
    let out = dir.cmd(&["leader", "sched"]).output();
    out.code(0)
        .stdout_has("leader of 'sched'")
        .stdout_has(&first.pid().to_string())
        .stdout_has("sleep 30");

    let (code, v) = leader_json(&mut dir.cmd(&["leader", "--json", "sched"]));
    assert_eq!(code, Some(0));
    assert_eq!(v["key"], "sched");
    assert!(v["token"].as_u64().is_some(), "{v}");
    assert!(v["since_unix_ms"].as_u64().is_some(), "{v}");
    assert!(
        v["holder"]["id"].as_str().is_some_and(|id| id.len() == 32),
        "{v}"
    );
    assert_eq!(v["holder"]["command"], serde_json::json!(["sleep", "30"]));
    let first_token = v["token"].as_u64().unwrap_or_default();

    // A standby waits; when the leader ends it is elected, with a higher token.
    let standby = dir
        .cmd(&["run", "-k", "sched", "--", "sleep", "30"])
        .spawn();
    assert_eq!(leader_pid(&dir, "sched"), Some(i64::from(first.pid())));
    first.signal(libc::SIGTERM);
    first.finish();
    wait_until("the standby leads", || {
        leader_pid(&dir, "sched") == Some(i64::from(standby.pid()))
    });
    let (_, v) = leader_json(&mut dir.cmd(&["leader", "--json", "sched"]));
    assert!(v["token"].as_u64().unwrap_or_default() > first_token, "{v}");

    standby.signal(libc::SIGTERM);
    standby.finish();
    dir.cmd(&["leader", "sched"])
        .output()
        .code(1)
        .stdout_has("no leader");
    let (code, v) = leader_json(&mut dir.cmd(&["leader", "--json", "sched"]));
    assert_eq!(code, Some(1));
    assert_eq!(v, serde_json::json!({"type": "no_leader", "key": "sched"}));
}

#[test]
fn a_missing_key_has_no_leader() {
    let dir = Dir::new();
    let out = dir.cmd(&["leader", "never/used"]).output();
    out.code(1).stdout_has("no leader");
    assert!(out.stderr.is_empty(), "{out:#?}");
    let (code, v) = leader_json(&mut dir.cmd(&["leader", "--json", "never/used"]));
    assert_eq!(code, Some(1));
    assert_eq!(v["type"], "no_leader");
    assert_eq!(v["key"], "never/used");
}

#[test]
fn a_bad_key_or_a_semaphore_is_a_usage_error() {
    let dir = Dir::new();
    dir.cmd(&["leader", "a/../b"])
        .output()
        .code(2)
        .one_error_line()
        .stderr_has("invalid key");
    dir.cmd(&["leader"]).output().code(2).one_error_line();
    dir.cmd(&["run", "-n", "2", "-k", "pool", "--", "true"])
        .output()
        .code(0);
    dir.cmd(&["leader", "pool"])
        .output()
        .code(2)
        .one_error_line()
        .stderr_has("semaphore");
}

#[test]
fn wait_blocks_until_a_lease_store_has_a_leader() {
    let dir = Dir::new();
    let url = format!("{}?mode=lease", dir.store());
    let waiter = dir
        .bare(&["-s", &url, "leader", "--wait", "--json", "sched"])
        .spawn();
    let holder = dir
        .bare(&["-s", &url, "run", "-k", "sched", "--", "sleep", "30"])
        .spawn();
    let out = waiter.finish();
    out.code(0);
    let v: serde_json::Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {out:#?}"));
    assert_eq!(v["type"], "leader");
    assert_eq!(v["holder"]["pid"].as_i64(), Some(i64::from(holder.pid())));
}
