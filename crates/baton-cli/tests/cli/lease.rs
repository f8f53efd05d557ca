//! `baton run` on a lease store (`dir:PATH?mode=lease`): the keeper renews the lease while
//! the command runs, and a lost lease stops the command and exits 76.

use crate::util::{process_alive, read_pid, wait_until, Dir, TestCommand};

fn lease_cmd(dir: &Dir, args: &[&str]) -> TestCommand {
    let url = format!("{}?mode=lease", dir.store());
    let mut cmd = dir.bare(&["-s", &url]);
    cmd.args(args);
    cmd
}

fn lease_held(dir: &Dir, key: &str) -> bool {
    let out = lease_cmd(dir, &["status", "--json", key]).output();
    out.code == Some(0)
        && serde_json::from_str::<serde_json::Value>(out.stdout.trim())
            .is_ok_and(|v| v["held"].as_u64() == Some(1))
}

#[test]
fn renewals_keep_a_short_lease_for_a_long_command() {
    let dir = Dir::new();
    // A 1 s TTL and a command that runs 4 s: only renewals keep the lease. (A shorter
    // TTL would rightly be lost on a machine loaded enough to delay renewals.)
    let holder = lease_cmd(&dir, &["run", "--ttl", "1s", "-k", "k", "--", "sleep", "4"]).spawn();
    wait_until("the lease is held", || lease_held(&dir, "k"));
    // A waiter that watches for twice the TTL never sees the lease go stale.
    lease_cmd(&dir, &["run", "-w", "2s", "-k", "k", "--", "true"])
        .output()
        .code(75);
    holder.finish().code(0);
    lease_cmd(&dir, &["run", "--no-wait", "-k", "k", "--", "true"])
        .output()
        .code(0);
}

#[test]
fn a_broken_lease_stops_the_command_and_exits_76() {
    let dir = Dir::new();
    let pidfile = dir.file("child.pid");
    let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
    let holder = lease_cmd(
        &dir,
        &[
            "run",
            "--ttl",
            "600ms",
            "--kill-grace",
            "200ms",
            "-k",
            "k",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .spawn();
    wait_until("the child has started", || {
        pidfile.exists() && lease_held(&dir, "k")
    });
    let child = read_pid(&pidfile);
    lease_cmd(&dir, &["break", "k"]).output().code(0);
    let out = holder.finish();
    out.code(76).stderr_has("lost");
    assert!(!process_alive(child), "the command was stopped");
}

#[test]
fn a_paused_holder_is_taken_over_and_stops_when_resumed() {
    let dir = Dir::new();
    let pidfile = dir.file("child.pid");
    let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
    let holder = lease_cmd(
        &dir,
        &[
            "run", "--ttl", "500ms", "-k", "k", "--", "sh", "-c", &script,
        ],
    )
    .spawn();
    wait_until("the child has started", || {
        pidfile.exists() && lease_held(&dir, "k")
    });
    let before = lease_cmd(&dir, &["status", "--json", "k"]).output();
    let v: serde_json::Value = serde_json::from_str(before.stdout.trim()).expect("json");
    let old_token = v["slots"][0]["token"].as_u64().expect("token");

    holder.signal(libc::SIGSTOP);
    // A waiter sees no heartbeat for a whole TTL and takes the slot with a higher token.
    let out = lease_cmd(
        &dir,
        &[
            "run",
            "-w",
            "20s",
            "-k",
            "k",
            "--",
            "sh",
            "-c",
            "echo $BATON_TOKEN",
        ],
    )
    .output();
    out.code(0);
    let new_token: u64 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("a token: {out:?}"));
    assert!(new_token > old_token, "{new_token} > {old_token}");

    holder.signal(libc::SIGCONT);
    let out = holder.finish();
    out.code(76).stderr_has("lost");
    assert!(
        !process_alive(read_pid(&pidfile)),
        "the command was stopped"
    );
}

#[test]
fn ttl_is_checked() {
    let dir = Dir::new();
    lease_cmd(&dir, &["run", "--ttl", "5ms", "-k", "k", "--", "true"])
        .output()
        .code(2)
        .one_error_line()
        .stderr_has("too short");
    lease_cmd(&dir, &["run", "--ttl", "x", "-k", "k", "--", "true"])
        .output()
        .code(2)
        .one_error_line();
    lease_cmd(
        &dir,
        &["run", "--kill-grace", "soon", "-k", "k", "--", "true"],
    )
    .output()
    .code(2)
    .one_error_line();
}

#[test]
fn resize_changes_the_limit_and_never_evicts() {
    let dir = Dir::new();
    let a = lease_cmd(&dir, &["run", "-n", "2", "-k", "sem", "--", "sleep", "30"]).spawn();
    let b = lease_cmd(&dir, &["run", "-n", "2", "-k", "sem", "--", "sleep", "30"]).spawn();
    wait_until("two holders", || {
        let out = lease_cmd(&dir, &["status", "--json", "sem"]).output();
        serde_json::from_str::<serde_json::Value>(out.stdout.trim())
            .is_ok_and(|v| v["held"].as_u64() == Some(2))
    });
    let out = lease_cmd(&dir, &["resize", "sem", "1"]).output();
    out.code(0).stdout_has("2 hold it now");
    // Both still hold; the new limit is what requests must ask for now.
    lease_cmd(
        &dir,
        &["run", "--no-wait", "-n", "1", "-k", "sem", "--", "true"],
    )
    .output()
    .code(75);
    lease_cmd(
        &dir,
        &["run", "--no-wait", "-n", "2", "-k", "sem", "--", "true"],
    )
    .output()
    .code(2)
    .stderr_has("limit of 1");
    drop(a);
    drop(b);
    let out = lease_cmd(&dir, &["resize", "--json", "sem", "3"]).output();
    out.code(0);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(v["type"], "resized");
    assert_eq!(v["limit"], 3);
    // A step: +N and -N change the limit (a bare -N is a step, not a flag).
    let out = lease_cmd(&dir, &["resize", "--json", "sem", "+2"]).output();
    out.code(0);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(
        (v["change"].as_str(), v["limit"].as_u64()),
        (Some("+2"), Some(5))
    );
    lease_cmd(&dir, &["resize", "sem", "-3"])
        .output()
        .code(0)
        .stdout_has("by -3 to 2 slot(s)");
    // A step below 1 is refused, naming the limit, and changes nothing.
    lease_cmd(&dir, &["resize", "sem", "-2"])
        .output()
        .code(2)
        .stderr_has("limit of 2")
        .one_error_line();
    let out = lease_cmd(&dir, &["status", "--json", "sem"]).output();
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(v["limit"].as_u64(), Some(2), "{out:?}");
    for bad in ["0", "+0", "x", "1.5", "--3"] {
        lease_cmd(&dir, &["resize", "sem", bad])
            .output()
            .code(2)
            .one_error_line();
    }
    lease_cmd(&dir, &["resize", "nosuch", "2"])
        .output()
        .code(1)
        .one_error_line();
    // The kernel-lock store cannot resize, and says so.
    let kernel = Dir::new();
    kernel
        .cmd(&["run", "-k", "kk", "--", "true"])
        .output()
        .code(0);
    kernel
        .cmd(&["resize", "kk", "2"])
        .output()
        .code(69)
        .one_error_line();
}

#[test]
fn lock_delay_is_set_at_creation_shown_and_a_clean_exit_never_waits() {
    let dir = Dir::new();
    lease_cmd(
        &dir,
        &["run", "--lock-delay", "30s", "-k", "k", "--", "true"],
    )
    .output()
    .code(0);
    let out = lease_cmd(&dir, &["status", "--json", "k"]).output();
    out.code(0);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(v["lock_delay_ms"].as_u64(), Some(30_000), "{out:?}");
    lease_cmd(&dir, &["status", "k"])
        .output()
        .code(0)
        .stdout_has("lock-delay 30s");
    // The command exited: a clean release, so the next run is granted at once.
    lease_cmd(&dir, &["run", "--no-wait", "-k", "k", "--", "true"])
        .output()
        .code(0);
    lease_cmd(&dir, &["run", "--help"])
        .output()
        .code(0)
        .stdout_has("--lock-delay");
}

#[test]
fn a_broken_lease_holds_its_slot_back_for_the_lock_delay() {
    let dir = Dir::new();
    let holder = lease_cmd(
        &dir,
        &[
            "run",
            "--lock-delay",
            "30s",
            "--ttl",
            "600ms",
            "--kill-grace",
            "200ms",
            "-k",
            "k",
            "--",
            "sleep",
            "30",
        ],
    )
    .spawn();
    wait_until("the lease is held", || lease_held(&dir, "k"));
    lease_cmd(&dir, &["break", "k"]).output().code(0);
    holder.finish().code(76);
    lease_cmd(&dir, &["run", "--no-wait", "-k", "k", "--", "true"])
        .output()
        .code(75)
        .one_error_line()
        .stderr_has("lock-delay of 30s");
    lease_cmd(&dir, &["status", "k"])
        .output()
        .code(0)
        .stdout_has("held back");
}

#[test]
fn a_lock_delay_on_kernel_locks_is_a_clear_error() {
    let dir = Dir::new();
    let out = dir
        .cmd(&["run", "--lock-delay", "5s", "-k", "k", "--", "true"])
        .output();
    assert_ne!(out.code, Some(0), "{out:?}");
    out.one_error_line().stderr_has("mode=lease");
}

/// A private test server of `scripts/server-NAME`, stopped (and thawed first) when dropped.
struct PrivateServer {
    script: std::path::PathBuf,
    dir: tempfile::TempDir,
    url: String,
}

impl PrivateServer {
    /// Starts one, or `None` (a note; a failure under `CI=true`) when the shared test
    /// server of that kind is not there, which says its packages are missing.
    fn start(name: &str, var: &str) -> Option<PrivateServer> {
        if std::env::var(var).map_or(true, |v| v.trim().is_empty()) {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("CI=true and {var} is not set: run the suite with `bash scripts/test`");
            }
            crate::util::skipped(
                &format!("frozen {name} server"),
                &format!("{var} is not set (bash scripts/test sets it)"),
            );
            return None;
        }
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts")
            .join(format!("server-{name}"));
        let dir = tempfile::tempdir().expect("server dir");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run the server script");
        assert!(out.status.success(), "{name} did not start: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let url = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("BATON_TEST_"))
            .and_then(|l| l.split_once('='))
            .map(|(_, v)| v.trim().replace("\\,", ","))
            .expect("the script prints NAME=URL");
        Some(PrivateServer { script, dir, url })
    }

    fn run(&self, what: &str) {
        let ok = std::process::Command::new("bash")
            .arg(&self.script)
            .arg(what)
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "server {what} failed");
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("thaw")
            .arg(self.dir.path())
            .status();
        let _ = std::process::Command::new("bash")
            .arg(&self.script)
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// A server frozen (SIGSTOP) under a running command, end to end: `baton run` stops the
/// command's group and exits 76 while the server is still frozen (it does not wait for
/// the store to answer again), on every networked store.
#[test]
fn a_frozen_server_ends_the_run_with_76_while_it_is_still_frozen() {
    for (name, var) in [
        ("postgres", "BATON_TEST_POSTGRES"),
        ("redis", "BATON_TEST_REDIS"),
        ("etcd", "BATON_TEST_ETCD"),
        ("zookeeper", "BATON_TEST_ZK"),
        ("rabbitmq", "BATON_TEST_AMQP"),
    ] {
        let Some(server) = PrivateServer::start(name, var) else {
            continue;
        };
        let dir = Dir::new();
        let pidfile = dir.file("child.pid");
        let run = dir
            .bare(&[
                "-s",
                &server.url,
                "run",
                "-k",
                "frozen",
                "--ttl",
                "2s",
                "--",
                "sh",
                "-c",
            ])
            .args(&[&format!("echo $$ > {}; exec sleep 600", pidfile.display())])
            .spawn();
        wait_until("the command started", || pidfile.exists());
        let child = read_pid(&pidfile);
        server.run("freeze");
        let out = run.finish();
        out.code(76).stderr_has("lost");
        assert!(
            !process_alive(child),
            "{name}: the command outlived the run"
        );
        // Only now does the server answer again.
        server.run("thaw");
    }
}

/// A RabbitMQ broker killed (kill -9) under a running command: the lease's connection
/// is gone, so `baton run` stops the command's group and exits 76 (it never resumes the
/// lease on a new connection, even once the broker is back).
#[test]
fn a_killed_broker_ends_the_run_with_76() {
    let Some(server) = PrivateServer::start("rabbitmq", "BATON_TEST_AMQP") else {
        return;
    };
    let dir = Dir::new();
    let pidfile = dir.file("child.pid");
    let run = dir
        .bare(&[
            "-s",
            &server.url,
            "run",
            "-k",
            "killed-broker",
            "--ttl",
            "2s",
            "--",
            "sh",
            "-c",
        ])
        .args(&[&format!("echo $$ > {}; exec sleep 600", pidfile.display())])
        .spawn();
    wait_until("the command started", || pidfile.exists());
    let child = read_pid(&pidfile);
    // kill -9 of the broker, then a start on the same data directory.
    server.run("crash");
    let out = run.finish();
    out.code(76).stderr_has("lost");
    assert!(!process_alive(child), "the command outlived the run");
}

#[test]
fn delete_removes_an_unused_key_and_refuses_one_in_use() {
    let dir = Dir::new();
    let url = format!("sqlite:{}", dir.file("locks.db").display());
    let cmd = |args: &[&str]| {
        let mut c = dir.bare(&["-s", &url]);
        c.args(args);
        c
    };
    let holder = cmd(&["run", "-n", "2", "-k", "gpu", "--", "sleep", "30"]).spawn();
    wait_until("a holder", || {
        let out = cmd(&["status", "--json", "gpu"]).output();
        serde_json::from_str::<serde_json::Value>(out.stdout.trim())
            .is_ok_and(|v| v["held"].as_u64() == Some(1))
    });
    // In use: refused, exit 75, one line naming the holder count; nothing changes.
    cmd(&["delete", "gpu"])
        .output()
        .code(75)
        .stderr_has("1 slot(s) held")
        .one_error_line();
    // SIGTERM: baton stops its command and releases.
    holder.signal(libc::SIGTERM);
    holder.finish();
    let out = cmd(&["delete", "--json", "gpu"]).output();
    out.code(0);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("json");
    assert_eq!(
        (v["type"].as_str(), v["key"].as_str()),
        (Some("deleted"), Some("gpu"))
    );
    cmd(&["status", "gpu"]).output().code(1);
    cmd(&["delete", "gpu"]).output().code(1).one_error_line();
    // Made anew with another limit.
    cmd(&["run", "-n", "3", "-k", "gpu", "--", "true"])
        .output()
        .code(0);
    // The directory store (the default) deletes too: refused while held, then gone.
    let kernel = Dir::new();
    let holder = kernel
        .cmd(&["run", "-k", "kk", "--", "sleep", "30"])
        .spawn();
    wait_until("a holder", || {
        let out = kernel.cmd(&["status", "--json", "kk"]).output();
        serde_json::from_str::<serde_json::Value>(out.stdout.trim())
            .is_ok_and(|v| v["held"].as_u64() == Some(1))
    });
    kernel
        .cmd(&["delete", "kk"])
        .output()
        .code(75)
        .stderr_has("1 slot(s) held")
        .one_error_line();
    holder.signal(libc::SIGTERM);
    holder.finish();
    kernel.cmd(&["delete", "kk"]).output().code(0);
    kernel.cmd(&["status", "kk"]).output().code(1);
    let listed = kernel.cmd(&["list"]).output();
    listed.code(0);
    assert!(!listed.stdout.contains("kk"), "{}", listed.stdout);
}
