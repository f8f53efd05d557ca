//! `baton run`: exit statuses, contention, signals, the child's environment and death.

use std::fs;

use crate::util::{process_alive, read_pid, wait_until, Dir};

#[test]
fn the_commands_exit_code_passes_through() {
    let dir = Dir::new();
    dir.cmd(&["run", "-k", "k", "--", "sh", "-c", "exit 7"])
        .output()
        .code(7);
    dir.cmd(&["run", "-k", "k", "--", "true"]).output().code(0);
}

#[test]
fn death_by_signal_is_128_plus_the_signal() {
    let dir = Dir::new();
    let out = dir
        .cmd(&["run", "-k", "k", "--", "sh", "-c", "kill -TERM $$"])
        .output();
    out.code(143);
    assert_eq!(out.signal, None, "baton itself exits, it is not killed");
}

#[test]
fn the_lock_is_released_after_the_command_exits() {
    let dir = Dir::new();
    dir.cmd(&["run", "-k", "k", "--", "true"]).output().code(0);
    dir.cmd(&["run", "--no-wait", "-k", "k", "--", "true"])
        .output()
        .code(0);
    assert!(!dir.held("k", 1), "nothing holds k after both runs");
}

#[test]
fn not_acquired_is_75_and_e_and_w_change_how() {
    let dir = Dir::new();
    let _holder = dir.cmd(&["run", "-k", "busy", "--", "sleep", "30"]).spawn();
    dir.wait_held("busy", 1);

    dir.cmd(&["run", "--no-wait", "-k", "busy", "--", "true"])
        .output()
        .code(75)
        .one_error_line()
        .stderr_has("held");
    dir.cmd(&["run", "--nonblock", "-E", "9", "-k", "busy", "--", "true"])
        .output()
        .code(9)
        .one_error_line();
    dir.cmd(&["run", "-w", "300ms", "-k", "busy", "--", "true"])
        .output()
        .code(75)
        .one_error_line();
    dir.cmd(&[
        "run",
        "--timeout",
        "0.2",
        "-E",
        "3",
        "-k",
        "busy",
        "--",
        "true",
    ])
    .output()
    .code(3);
    dir.cmd(&["run", "-w", "0", "-k", "busy", "--", "true"])
        .output()
        .code(75);
    // The command never ran when the lock was not acquired.
    let marker = dir.file("ran");
    dir.cmd(&["run", "--no-wait", "-k", "busy", "--", "touch"])
        .args(&[marker.to_str().expect("utf-8 path")])
        .output()
        .code(75);
    assert!(
        !marker.exists(),
        "the command must not run without the lock"
    );
}

#[test]
fn a_semaphore_admits_n_holders() {
    let dir = Dir::new();
    let _a = dir
        .cmd(&["run", "-n", "2", "-k", "pool", "--", "sleep", "30"])
        .spawn();
    let _b = dir
        .cmd(&["run", "-n", "2", "-k", "pool", "--", "sleep", "30"])
        .spawn();
    dir.wait_held("pool", 2);
    dir.cmd(&["run", "-n", "2", "--no-wait", "-k", "pool", "--", "true"])
        .output()
        .code(75);
}

#[test]
fn the_environment_reaches_the_command() {
    let dir = Dir::new();
    let out = dir
        .cmd(&[
            "run",
            "-k",
            "jobs/env",
            "--",
            "sh",
            "-c",
            r#"printf '%s|%s|%s|%s|%s\n' "$BATON_KEY" "$BATON_TOKEN" "$BATON_SLOT" "$BATON_HOLDER" "$BATON_STORE""#,
        ])
        .output();
    out.code(0);
    let line = out.stdout.trim();
    let parts: Vec<&str> = line.split('|').collect();
    assert_eq!(parts.len(), 5, "{line}");
    assert_eq!(parts[0], "jobs/env");
    assert!(
        !parts[1].is_empty() && parts[1].parse::<u64>().is_ok(),
        "token: {line}"
    );
    assert_eq!(parts[2], "0");
    assert!(
        parts[3].len() == 32 && parts[3].bytes().all(|b| b.is_ascii_hexdigit()),
        "holder: {line}"
    );
    assert_eq!(parts[4], dir.store());
}

#[test]
fn tokens_increase_from_run_to_run() {
    let dir = Dir::new();
    let token = || {
        let out = dir
            .cmd(&["run", "-k", "t", "--", "sh", "-c", "echo $BATON_TOKEN"])
            .output();
        out.code(0);
        out.stdout.trim().parse::<u64>().expect("token")
    };
    let first = token();
    let second = token();
    assert!(second > first, "{second} > {first}");
}

#[test]
fn json_announces_the_grant() {
    let dir = Dir::new();
    let out = dir
        .cmd(&[
            "run",
            "--json",
            "-k",
            "j",
            "--",
            "sh",
            "-c",
            "echo $BATON_TOKEN",
        ])
        .output();
    out.code(0);
    let grant: serde_json::Value =
        serde_json::from_str(out.stderr.trim()).expect("one JSON line on stderr");
    assert_eq!(grant["type"], "grant");
    assert_eq!(grant["key"], "j");
    assert_eq!(grant["slot"], 0);
    assert_eq!(grant["token"].to_string(), out.stdout.trim());
}

#[test]
fn the_derived_key_is_stable_and_depends_on_the_argv() {
    let dir = Dir::new();
    let key_of = |args: &[&str]| {
        let out = dir.cmd(&["run", "-v", "--"]).args(args).output();
        out.code(0);
        let line = out
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("baton: key "))
            .unwrap_or_else(|| panic!("no key line: {out:#?}"))
            .to_owned();
        line
    };
    let a = key_of(&["sh", "-c", "exit 0"]);
    assert!(a.starts_with("cmd/sh-"), "{a}");
    assert_eq!(a, key_of(&["sh", "-c", "exit 0"]), "same argv, same key");
    assert_ne!(a, key_of(&["sh", "-c", "exit  0"]), "other argv, other key");
    // The derived key is the one actually locked.
    let out = dir.cmd(&["list"]).output();
    out.code(0).stdout_has(&a);
}

#[test]
fn a_missing_command_is_127_and_a_non_executable_one_126() {
    let dir = Dir::new();
    dir.cmd(&["run", "-k", "k", "--", "/nonexistent/baton-test-cmd"])
        .output()
        .code(127)
        .one_error_line()
        .stderr_has("not found");
    let script = dir.file("not-executable.sh");
    fs::write(&script, "#!/bin/sh\nexit 0\n").expect("write");
    dir.cmd(&["run", "-k", "k", "--"])
        .args(&[script.to_str().expect("utf-8")])
        .output()
        .code(126)
        .one_error_line();
    // The slot was released even though the command never started.
    dir.cmd(&["run", "--no-wait", "-k", "k", "--", "true"])
        .output()
        .code(0);
}

#[test]
fn sigterm_is_forwarded_to_the_command() {
    let dir = Dir::new();
    let ready = dir.file("ready");
    let got = dir.file("got");
    let script = format!(
        r#"trap 'echo term > "{got}"; exit 42' TERM; echo ready > "{ready}"; sleep 30 & wait"#,
        got = got.display(),
        ready = ready.display()
    );
    let baton = dir
        .cmd(&["run", "-k", "fwd", "--", "sh", "-c", &script])
        .spawn();
    wait_until("the command set its trap", || ready.exists());
    baton.signal(libc::SIGTERM);
    let out = baton.finish();
    out.code(42);
    assert_eq!(
        fs::read_to_string(&got).expect("the trap ran").trim(),
        "term"
    );
    // And the slot is free again.
    dir.cmd(&["run", "--no-wait", "-k", "fwd", "--", "true"])
        .output()
        .code(0);
}

#[test]
fn other_signals_are_forwarded_too() {
    let dir = Dir::new();
    let ready = dir.file("ready");
    let script = format!(
        r#"trap 'exit 10' USR1; trap 'exit 11' HUP; echo ready > "{}"; sleep 30 & wait"#,
        ready.display()
    );
    let baton = dir
        .cmd(&["run", "-k", "fwd", "--", "sh", "-c", &script])
        .spawn();
    wait_until("the command set its traps", || ready.exists());
    baton.signal(libc::SIGUSR1);
    baton.finish().code(10);
}

#[test]
fn a_signal_while_waiting_cancels_the_wait_and_leaves_nothing() {
    let dir = Dir::new();
    let holder = dir.cmd(&["run", "-k", "w", "--", "sleep", "30"]).spawn();
    dir.wait_held("w", 1);
    let marker = dir.file("ran");
    let waiter = dir
        .cmd(&["run", "-v", "-k", "w", "--", "touch"])
        .args(&[marker.to_str().expect("utf-8")])
        .spawn();
    wait_until("the waiter is waiting", || {
        waiter.stderr().contains("acquiring 'w'")
    });
    waiter.signal(libc::SIGINT);
    waiter.finish().code(130);
    assert!(!marker.exists(), "the waiter's command must never run");
    // Stop the holder (baton forwards SIGTERM to sleep, which dies of it).
    holder.signal(libc::SIGTERM);
    holder.finish().code(143);
    // Nothing was left queued: the key is free at once.
    dir.cmd(&["run", "--no-wait", "-k", "w", "--", "true"])
        .output()
        .code(0);
    assert!(!marker.exists());
}

#[test]
fn the_command_dies_when_baton_is_killed() {
    let dir = Dir::new();
    let pidfile = dir.file("child.pid");
    let script = format!(r#"echo $$ > "{}"; exec sleep 60"#, pidfile.display());
    let baton = dir
        .cmd(&["run", "-k", "kill9", "--", "sh", "-c", &script])
        .spawn();
    let child = read_pid(&pidfile);
    assert!(process_alive(child), "the command runs");
    baton.signal(libc::SIGKILL);
    let out = baton.finish();
    assert_eq!(out.signal, Some(libc::SIGKILL));
    wait_until(&format!("the command (pid {child}) is gone"), || {
        !process_alive(child)
    });
    // The kernel freed the lock with baton.
    dir.cmd(&["run", "--no-wait", "-k", "kill9", "--", "true"])
        .output()
        .code(0);
}

#[test]
fn the_command_runs_in_its_own_process_group() {
    let dir = Dir::new();
    let out = dir
        .cmd(&[
            "run",
            "-k",
            "pg",
            "--",
            "sh",
            "-c",
            "echo $$ $(ps -o pgid= -p $$)",
        ])
        .output();
    out.code(0);
    let fields: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 2, "{out:#?}");
    assert_eq!(fields[0], fields[1], "pid == pgid: {out:#?}");
}

#[test]
fn an_interactive_command_gets_the_terminal() {
    // `script` gives baton a terminal on which it is the foreground job, as an
    // interactive shell would; the command reads from it. Were the command left in a
    // background process group, the read would stop it (SIGTTIN) and this would hang
    // until the bound.
    let dir = Dir::new();
    let inner = format!(
        "{} -s {} run -k tty -- sh -c 'read x; echo got:$x; exit 3'",
        crate::util::baton_bin(),
        dir.store()
    );
    let mut child = std::process::Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .env_remove("BATON_STORE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("script(1) from util-linux");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"hello\n").expect("write");
        // Keep stdin open until the answer comes: script ends its session at EOF.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut out = String::new();
            let _ = { stdout }.read_to_string(&mut out);
            let _ = tx.send(out);
        });
        let out = match rx.recv_timeout(crate::util::BOUND) {
            Ok(out) => out,
            Err(_) => {
                let _ = child.kill();
                panic!("the command did not read from the terminal within the bound");
            }
        };
        drop(stdin);
        assert!(out.contains("got:hello"), "{out:?}");
    }
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(3));
}

#[test]
fn the_command_inherits_no_file_of_the_store() {
    let dir = Dir::new();
    let out = dir
        .cmd(&[
            "run",
            "-n",
            "2",
            "-k",
            "fds",
            "--",
            "sh",
            "-c",
            "for f in /proc/$$/fd/*; do readlink $f; done; true",
        ])
        .output();
    out.code(0);
    let store = dir.store_dir();
    assert!(
        !out.stdout.contains(store.to_str().expect("utf-8")),
        "the command has a store file open: {}",
        out.stdout
    );
    assert!(!out.stdout.is_empty(), "it listed its descriptors");
}
