//! `baton run` keeps the slot for the command's whole process group: the group is dead
//! before anyone else is granted the slot — when the command leaves a background process
//! behind, when baton is SIGKILLed, on kernel locks and on lease stores — and a kill
//! grace that does not fit in the TTL is refused.

use std::path::Path;

use crate::util::{process_alive, read_pid, wait_until, Dir, TestCommand};

/// `baton -s URL ARGS...` in `dir`.
fn on(dir: &Dir, url: &str, args: &[&str]) -> TestCommand {
    let mut cmd = dir.bare(&["-s", url]);
    cmd.args(args);
    cmd
}

/// A command whose group is slow to stop: a grandchild that ignores SIGTERM (only SIGKILL
/// ends it), the shell waiting for it. Writes the grandchild's pid to `bg`.
fn stubborn(bg: &Path) -> String {
    format!(
        "(trap '' TERM; exec sleep 3600) & echo $! > {}; wait",
        bg.display()
    )
}

/// SIGKILLs a holding baton whose command ignores SIGTERM, then checks, from inside the
/// next grant, that the old command's grandchild was gone by then.
fn killed_baton_group_dies_before_the_next_grant(url: &str, extra: &[&str]) {
    let dir = Dir::new();
    let bg = dir.file("bg.pid");
    let script = stubborn(&bg);
    let mut args = vec!["run", "-k", "g", "--kill-grace", "300ms"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", &script]);
    let holder = on(&dir, url, &args).spawn();
    let grandchild = read_pid(&bg);
    holder.signal(libc::SIGKILL);
    let verdict = dir.file("verdict");
    let check = format!(
        "if kill -0 {grandchild} 2>/dev/null && ! grep -q '^State:.*Z' /proc/{grandchild}/status; \
         then echo alive > {v}; else echo gone > {v}; fi",
        v = verdict.display()
    );
    let mut next = vec!["run", "-k", "g", "-w", "60s"];
    next.extend_from_slice(extra);
    next.extend_from_slice(&["--", "sh", "-c", &check]);
    on(&dir, url, &next).output().code(0);
    holder.finish();
    let seen = std::fs::read_to_string(&verdict).unwrap_or_default();
    assert_eq!(
        seen.trim(),
        "gone",
        "the next holder was granted while the SIGKILLed holder's grandchild {grandchild} ran"
    );
    assert!(!process_alive(grandchild), "the grandchild was stopped");
}

#[test]
fn a_killed_baton_takes_its_whole_group_down_before_the_kernel_lock_is_free() {
    let dir = Dir::new();
    killed_baton_group_dies_before_the_next_grant(&dir.store(), &[]);
}

#[test]
fn a_killed_baton_takes_its_whole_group_down_before_a_lease_is_granted_again() {
    let dir = Dir::new();
    let url = format!("{}?mode=lease", dir.store());
    killed_baton_group_dies_before_the_next_grant(&url, &["--ttl", "2s"]);
}

#[test]
fn a_killed_baton_takes_its_whole_group_down_on_sqlite() {
    let dir = Dir::new();
    let url = format!("sqlite:{}", dir.file("locks.db").display());
    killed_baton_group_dies_before_the_next_grant(&url, &["--ttl", "2s"]);
}

#[test]
fn the_slot_is_kept_until_the_last_process_of_the_group_exits() {
    let dir = Dir::new();
    let go = dir.file("go");
    let bg = dir.file("bg.pid");
    // The command exits at once, leaving a background process that waits for `go`.
    let script = format!(
        "(while [ ! -e {go} ]; do sleep 0.02; done) & echo $! > {bg}; exit 4",
        go = go.display(),
        bg = bg.display()
    );
    let holder = dir
        .cmd(&["run", "-k", "k", "--", "sh", "-c", &script])
        .spawn();
    let left = read_pid(&bg);
    dir.cmd(&["run", "--no-wait", "-k", "k", "--", "true"])
        .output()
        .code(75);
    assert!(process_alive(left), "the background process still runs");
    std::fs::write(&go, b"").expect("write go");
    // baton's status is the command's own, given once the group is empty.
    holder.finish().code(4);
    assert!(!process_alive(left));
    dir.cmd(&["run", "--no-wait", "-k", "k", "--", "true"])
        .output()
        .code(0);
}

#[test]
fn a_kill_grace_that_does_not_fit_the_ttl_is_a_usage_error() {
    let dir = Dir::new();
    let url = format!("{}?mode=lease", dir.store());
    on(
        &dir,
        &url,
        &[
            "run",
            "--ttl",
            "10s",
            "--kill-grace",
            "8s",
            "-k",
            "k",
            "--",
            "true",
        ],
    )
    .output()
    .code(2)
    .one_error_line()
    .stderr_has("the largest grace for this TTL is 3.6s")
    .stderr_has("--ttl of at least");
    // The default grace (10s) shrinks to fit a short TTL instead of being refused.
    on(&dir, &url, &["run", "--ttl", "1s", "-k", "k", "--", "true"])
        .output()
        .code(0);
    // Kernel locks have no deadline: any grace is fine.
    let kernel = Dir::new();
    kernel
        .cmd(&["run", "--kill-grace", "1h", "-k", "k", "--", "true"])
        .output()
        .code(0);
}

#[test]
fn a_paused_baton_cannot_keep_its_command_past_the_lease() {
    let dir = Dir::new();
    let url = format!("{}?mode=lease", dir.store());
    let bg = dir.file("bg.pid");
    let script = stubborn(&bg);
    let holder = on(
        &dir,
        &url,
        &[
            "run",
            "--ttl",
            "1s",
            "--kill-grace",
            "200ms",
            "-k",
            "p",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .spawn();
    let grandchild = read_pid(&bg);
    // baton frozen: no renewal, no signal from it. Its supervisor stops the group by the
    // deadline on its own.
    holder.signal(libc::SIGSTOP);
    wait_until("the paused holder's group is stopped", || {
        !process_alive(grandchild)
    });
    holder.signal(libc::SIGCONT);
    holder.finish().code(76).stderr_has("lost");
}

#[test]
fn a_process_that_leaves_the_group_escapes_as_documented() {
    let dir = Dir::new();
    let escaped = dir.file("escaped.pid");
    // `setsid -f` forks a process into a session (and group) of its own; the command
    // then exits at once.
    let script = format!(
        "setsid -f sh -c 'echo $$ > {}; exec sleep 30' </dev/null >/dev/null 2>&1",
        escaped.display()
    );
    let out = dir
        .cmd(&["run", "-k", "e", "--", "sh", "-c", &script])
        .output();
    out.code(0);
    let pid = read_pid(&escaped);
    // baton did not wait for it, and did not stop it: it left the command's group.
    assert!(process_alive(pid), "the setsid process was stopped");
    // SAFETY: kill with a pid this test's command started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

#[test]
fn a_supervisor_that_runs_too_late_says_so() {
    let dir = Dir::new();
    let url = format!("{}?mode=lease", dir.store());
    let bg = dir.file("bg.pid");
    let script = stubborn(&bg);
    let holder = on(
        &dir,
        &url,
        &[
            "run",
            "--ttl",
            "1s",
            "--kill-grace",
            "200ms",
            "-k",
            "late",
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .spawn();
    let grandchild = read_pid(&bg);
    // The supervisor is baton's child; freeze it with baton, past the lease's deadline.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", holder.pid()))
        .expect("baton's children");
    let supervisor: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the supervisor's pid");
    holder.signal(libc::SIGSTOP);
    // SAFETY: kill with the pid of this test's baton's child.
    unsafe { libc::kill(supervisor, libc::SIGSTOP) };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // SAFETY: as above.
    unsafe { libc::kill(supervisor, libc::SIGCONT) };
    wait_until("the group is stopped", || !process_alive(grandchild));
    holder.signal(libc::SIGCONT);
    holder
        .finish()
        .code(76)
        .stderr_has("ms after it was due")
        .stderr_has("may have outlived its lease");
}
