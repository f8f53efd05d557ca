//! `status`, `list` and `break` against a live holder.

use crate::util::{process_alive, read_pid, wait_until, Dir};

#[test]
fn status_and_list_show_a_live_holder() {
    let dir = Dir::new();
    let holder = dir
        .cmd(&["run", "-k", "jobs/nightly", "--", "sleep", "30"])
        .spawn();
    dir.cmd(&["run", "-n", "2", "-k", "pool", "--", "true"])
        .output()
        .code(0);
    dir.wait_held("jobs/nightly", 1);

    let out = dir.cmd(&["list"]).output();
    out.code(0);
    assert_eq!(out.stdout, "jobs/nightly\npool\n");
    let out = dir.cmd(&["list", "--json"]).output();
    out.code(0);
    let keys: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k["type"] == "key"));
    assert_eq!(keys[0]["key"], "jobs/nightly");

    let out = dir.cmd(&["status", "jobs/nightly"]).output();
    out.code(0)
        .stdout_has("jobs/nightly: 1 of 1 slot(s) held, 0 free")
        .stdout_has(&holder.pid().to_string())
        .stdout_has("sleep 30")
        .stdout_has("held");

    let out = dir.cmd(&["status", "--json"]).output();
    out.code(0);
    let lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "one line per key: {}", out.stdout);
    let nightly = &lines[0];
    assert_eq!(nightly["type"], "key");
    assert_eq!(nightly["limit"], 1);
    assert_eq!(nightly["held"], 1);
    let slot = &nightly["slots"][0];
    assert_eq!(slot["state"], "held");
    assert_eq!(slot["holder"]["pid"], holder.pid());
    assert_eq!(
        slot["holder"]["command"],
        serde_json::json!(["sleep", "30"])
    );
    assert!(slot["token"].as_u64().is_some());
    assert!(slot["age"].as_str().is_some());
    let pool = &lines[1];
    assert_eq!(pool["limit"], 2);
    assert_eq!(pool["free"], 2);
}

#[test]
fn status_of_a_missing_key_is_exit_1() {
    let dir = Dir::new();
    dir.cmd(&["run", "-k", "there", "--", "true"])
        .output()
        .code(0);
    dir.cmd(&["status", "missing"])
        .output()
        .code(1)
        .one_error_line()
        .stderr_has("no such key");
}

#[test]
fn break_on_the_directory_store_explains_and_shows_the_holder() {
    let dir = Dir::new();
    let holder = dir.cmd(&["run", "-k", "b", "--", "sleep", "30"]).spawn();
    dir.wait_held("b", 1);
    let out = dir.cmd(&["break", "b"]).output();
    out.code(1)
        .one_error_line()
        .stderr_has("does not support")
        .stderr_has("--kill")
        .stdout_has(&holder.pid().to_string());
    assert!(
        dir.held("b", 1),
        "break without --kill leaves the holder alone"
    );
    dir.cmd(&["break", "missing"])
        .output()
        .code(1)
        .one_error_line();
}

#[test]
fn break_kill_stops_a_live_holder_and_frees_the_slot() {
    let dir = Dir::new();
    let pidfile = dir.file("cmd.pid");
    let script = format!(r#"echo $$ > "{}"; exec sleep 30"#, pidfile.display());
    let holder = dir
        .cmd(&["run", "-k", "bk", "--", "sh", "-c", &script])
        .spawn();
    let command = read_pid(&pidfile);
    dir.wait_held("bk", 1);

    // Another holder id matches nobody: nothing is signalled.
    let other = "0".repeat(32);
    dir.cmd(&["break", "bk", "--kill", "--holder", &other])
        .output()
        .code(1)
        .one_error_line();
    assert!(process_alive(command));

    let out = dir.cmd(&["break", "bk", "--kill", "--json"]).output();
    out.code(0);
    let line: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("one JSON line");
    assert_eq!(line["type"], "signalled");
    assert_eq!(line["pid"], holder.pid());
    // baton passed SIGTERM on to its command, which died of it.
    holder.finish().code(143);
    wait_until("the command is gone", || !process_alive(command));
    dir.cmd(&["run", "--no-wait", "-k", "bk", "--", "true"])
        .output()
        .code(0);
}

#[test]
fn break_kill_never_signals_a_dead_holder() {
    let dir = Dir::new();
    let holder = dir.cmd(&["run", "-k", "dead", "--", "sleep", "30"]).spawn();
    dir.wait_held("dead", 1);
    holder.signal(libc::SIGKILL);
    let _ = holder.finish();
    // The kernel freed the lock; the holder file stays behind as a note.
    let out = dir.cmd(&["break", "dead", "--kill"]).output();
    out.code(1).one_error_line();
    assert!(!out.stdout.contains("sent SIGTERM"), "{out:#?}");
}
