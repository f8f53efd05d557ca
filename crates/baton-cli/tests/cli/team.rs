//! A store shared by a team: several real users on one key, in a setgid, group-writable
//! directory, on every local store (dir, dir lease, sqlite); a user outside the group is
//! refused with one clear line and exit 69, and leaves nothing behind. Relative store
//! paths resolve against the working directory.
//!
//! The multi-user tests need root, to create the test users and group (`baton-test`,
//! `baton-test-a`, `baton-test-b` in it, `baton-test-x` outside it; created once,
//! idempotently) and to run baton as them (`setpriv --reuid --regid --init-groups`).
//! Without root they are skipped visibly (stderr and the `BATON_TEST_SKIPS` ledger), and
//! under `CI=true` they fail instead.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use crate::util::{baton_bin, Dir, BOUND};

/// The group the team shares.
const GROUP: &str = "baton-test";
/// Members of [`GROUP`].
const MEMBERS: [&str; 2] = ["baton-test-a", "baton-test-b"];
/// A user outside [`GROUP`].
const OUTSIDER: &str = "baton-test-x";

/// The local stores: a name, the store's shared directory and its URL.
fn stores(place: &Place) -> Vec<(&'static str, PathBuf, String)> {
    let dir = |name: &str| place.locks.join(name);
    vec![
        (
            "dir",
            dir("kernel"),
            format!("dir:{}", dir("kernel").display()),
        ),
        (
            "dir lease",
            dir("lease"),
            format!("dir:{}?mode=lease", dir("lease").display()),
        ),
        (
            "sqlite",
            dir("sqlite"),
            format!("sqlite:{}/jobs.db", dir("sqlite").display()),
        ),
    ]
}

/// Records a skipped test where people see it; under `CI=true` it fails instead.
fn skip(what: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what}: {why} (CI=true: a skipped test fails the run)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {what}: {why}");
    if let Some(path) = std::env::var_os("BATON_TEST_SKIPS") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(format!("{what}: {why}\n").as_bytes());
        }
    }
}

fn run_ok(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Creates the test group and users if they are missing; `Err(why)` when this process
/// cannot (not root, no `useradd`).
fn team() -> Result<&'static Team, String> {
    static TEAM: OnceLock<Result<Team, String>> = OnceLock::new();
    static SETUP: Mutex<()> = Mutex::new(());
    let _one = SETUP.lock().unwrap_or_else(|p| p.into_inner());
    TEAM.get_or_init(|| {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root to create test users and run baton as them".into());
        }
        for tool in ["groupadd", "useradd", "setpriv"] {
            if !run_ok("sh", &["-c", &format!("command -v {tool}")]) {
                return Err(format!("{tool} is not installed"));
            }
        }
        if !run_ok("getent", &["group", GROUP]) && !run_ok("groupadd", &["-f", GROUP]) {
            return Err(format!("groupadd {GROUP} failed"));
        }
        let users = MEMBERS
            .iter()
            .map(|u| (*u, GROUP))
            .chain([(OUTSIDER, "nogroup")]);
        for (user, group) in users {
            if run_ok("id", &["-u", user]) {
                continue;
            }
            let made = run_ok(
                "useradd",
                &[
                    "--system",
                    "--no-create-home",
                    "--no-user-group",
                    "--gid",
                    group,
                    "--shell",
                    "/usr/sbin/nologin",
                    user,
                ],
            );
            if !made && !run_ok("id", &["-u", user]) {
                return Err(format!("useradd {user} failed"));
            }
        }
        let gid = Command::new("getent")
            .args(["group", GROUP])
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split(':')
                    .nth(2)
                    .and_then(|g| g.trim().parse().ok())
            })
            .ok_or_else(|| format!("cannot read the gid of {GROUP}"))?;
        // The baton under test lives under target/, which other users may not reach: a
        // world-readable link or copy, for the whole run. Copies left by earlier runs
        // (a static has no destructor) are removed once their process is gone.
        let tmp = std::env::temp_dir();
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("baton-team-bin-") {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let bin_dir = tmp.join(format!("baton-team-bin-{}", std::process::id()));
        std::fs::create_dir_all(&bin_dir).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let bin = bin_dir.join("baton");
        let _ = std::fs::remove_file(&bin);
        if std::fs::hard_link(baton_bin(), &bin).is_err() {
            std::fs::copy(baton_bin(), &bin).map_err(|e| format!("copy baton: {e}"))?;
        }
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        Ok(Team { gid, bin })
    })
    .as_ref()
    .map_err(Clone::clone)
}

struct Team {
    gid: u32,
    bin: PathBuf,
}

impl Team {
    /// `baton ARGS...` as `user` (with its groups), or as this process for `None`.
    fn baton(&self, user: Option<&str>, cwd: &Path, args: &[&str]) -> Command {
        let mut cmd = match user {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={}", primary_group(user)))
                    .arg("--init-groups")
                    .arg("--")
                    .arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args(args)
            .current_dir(cwd)
            .env_remove("BATON_STORE")
            .env_remove("XDG_RUNTIME_DIR")
            .stdin(Stdio::null());
        cmd
    }

    /// A world-searchable test directory with `locks/{kernel,lease,sqlite}`, one shared
    /// store directory per local store (mode `mode`, group [`GROUP`]), and a shared work
    /// directory `work`.
    fn place(&self, mode: u32) -> Place {
        let dir = Dir::new();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod tmp");
        let locks = dir.path().join("locks");
        let work = dir.path().join("work");
        std::fs::create_dir(&locks).expect("mkdir");
        std::fs::set_permissions(&locks, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let shared = ["kernel", "lease", "sqlite"].map(|s| (locks.join(s), mode));
        for (d, m) in shared.into_iter().chain([(work.clone(), 0o2770)]) {
            std::fs::create_dir(&d).expect("mkdir");
            std::os::unix::fs::chown(&d, Some(0), Some(self.gid)).expect("chgrp");
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(m)).expect("chmod");
        }
        Place { dir, locks, work }
    }
}

fn primary_group(user: &str) -> &'static str {
    if user == OUTSIDER {
        "nogroup"
    } else {
        GROUP
    }
}

struct Place {
    dir: Dir,
    locks: PathBuf,
    work: PathBuf,
}

/// Makes `path` an empty file the whole group may write.
fn shared_file(path: &Path, gid: u32) {
    std::fs::write(path, "").expect("create");
    std::os::unix::fs::chown(path, None, Some(gid)).expect("chgrp");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).expect("chmod");
}

/// Waits for every child, failing the test if one takes longer than the liveness bound.
/// Every child is waited for before this returns, also when one failed, so none
/// outlives the test's directory.
fn wait_all(children: Vec<(String, Child)>) {
    let started = std::time::Instant::now();
    let mut failed = Vec::new();
    for (what, mut child) in children {
        loop {
            match child.try_wait().expect("wait") {
                Some(status) => {
                    if !status.success() {
                        failed.push(format!("{what}: {status}"));
                    }
                    break;
                }
                None if started.elapsed() > BOUND * 6 => {
                    let _ = child.kill();
                    let _ = child.wait();
                    failed.push(format!("{what} did not finish within {:?}", BOUND * 6));
                    break;
                }
                None => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// The users that share a key: this process (root, which created nothing special) and
/// the two members.
fn sharers() -> [Option<&'static str>; 3] {
    [None, Some(MEMBERS[0]), Some(MEMBERS[1])]
}

const ROUNDS: usize = 6;

#[test]
fn team_members_share_a_counter_under_one_mutex_on_every_local_store() {
    let team = match team() {
        Ok(t) => t,
        Err(why) => return skip("team::counter", &why),
    };
    let place = team.place(0o2770);
    for (name, _, url) in stores(&place) {
        let counter = place
            .work
            .join(format!("counter-{}", name.replace(' ', "-")));
        std::fs::write(&counter, "0\n").expect("counter");
        std::os::unix::fs::chown(&counter, None, Some(team.gid)).expect("chgrp");
        std::fs::set_permissions(&counter, std::fs::Permissions::from_mode(0o660)).expect("chmod");
        // Each user runs a loop of jobs; every job reads, sleeps and writes the counter,
        // so any two jobs inside at once lose an increment.
        let script = format!(
            "i=0; while [ $i -lt {ROUNDS} ]; do \
               \"$0\" -s '{url}' run -k team/counter -- sh -c 'n=$(cat {c}); sleep 0.01; echo $((n+1)) > {c}' || exit 1; \
               i=$((i+1)); done",
            c = counter.display()
        );
        let children = sharers()
            .into_iter()
            .map(|user| {
                let mut cmd = match user {
                    Some(u) => {
                        let mut c = Command::new("setpriv");
                        c.arg(format!("--reuid={u}"))
                            .arg(format!("--regid={GROUP}"))
                            .arg("--init-groups")
                            .arg("--");
                        c.arg("sh");
                        c
                    }
                    None => Command::new("sh"),
                };
                cmd.arg("-c")
                    .arg(&script)
                    .arg(&team.bin)
                    .current_dir(place.dir.path())
                    .env_remove("BATON_STORE")
                    .stdin(Stdio::null());
                (
                    format!("{name}: jobs of {}", user.unwrap_or("root")),
                    cmd.spawn().expect("spawn"),
                )
            })
            .collect();
        wait_all(children);
        let got = std::fs::read_to_string(&counter).expect("read counter");
        assert_eq!(
            got.trim(),
            (ROUNDS * sharers().len()).to_string(),
            "{name}: increments lost"
        );
        // Every member sees the key.
        for user in sharers() {
            let out = team
                .baton(
                    user,
                    place.dir.path(),
                    &["-s", &url, "status", "team/counter"],
                )
                .output()
                .expect("status");
            assert!(
                out.status.success(),
                "{name}: status as {user:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn team_members_share_a_semaphore_storm_on_every_local_store() {
    let team = match team() {
        Ok(t) => t,
        Err(why) => return skip("team::storm", &why),
    };
    let place = team.place(0o2770);
    for (name, _, url) in stores(&place) {
        let tag = name.replace(' ', "-");
        let inside = place.work.join(format!("in-{tag}"));
        std::fs::create_dir(&inside).expect("mkdir inside");
        std::os::unix::fs::chown(&inside, None, Some(team.gid)).expect("chgrp");
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o2770)).expect("chmod");
        let log = place.work.join(format!("log-{tag}"));
        shared_file(&log, team.gid);
        // Inside its slot a job marks itself present, counts who is present, and logs the
        // count with its token; at most 2 may ever be present.
        let job = format!(
            "touch {i}/$$; n=$(ls {i} | wc -l); sleep 0.02; echo \"$n $BATON_TOKEN $BATON_SLOT\" >> {l}; rm {i}/$$",
            i = inside.display(),
            l = log.display()
        );
        let script = format!(
            "i=0; while [ $i -lt {ROUNDS} ]; do \"$0\" -s '{url}' run -k team/gpu -n 2 -- sh -c '{job}' || exit 1; i=$((i+1)); done"
        );
        let children = sharers()
            .into_iter()
            .flat_map(|user| [user, user])
            .enumerate()
            .map(|(n, user)| {
                let mut cmd = match user {
                    Some(u) => {
                        let mut c = Command::new("setpriv");
                        c.arg(format!("--reuid={u}"))
                            .arg(format!("--regid={GROUP}"))
                            .arg("--init-groups")
                            .arg("--")
                            .arg("sh");
                        c
                    }
                    None => Command::new("sh"),
                };
                cmd.arg("-c")
                    .arg(&script)
                    .arg(&team.bin)
                    .current_dir(place.dir.path())
                    .env_remove("BATON_STORE")
                    .stdin(Stdio::null());
                (
                    format!("{name}: worker {n} as {}", user.unwrap_or("root")),
                    cmd.spawn().expect("spawn"),
                )
            })
            .collect();
        wait_all(children);
        let text = std::fs::read_to_string(&log).expect("log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            ROUNDS * sharers().len() * 2,
            "{name}: every job logged once:\n{text}"
        );
        let mut tokens = std::collections::HashSet::new();
        for line in &lines {
            let mut parts = line.split(' ');
            let present: u32 = parts.next().and_then(|n| n.parse().ok()).expect("count");
            assert!(
                (1..=2).contains(&present),
                "{name}: {present} jobs inside a 2-slot key:\n{text}"
            );
            let token = parts.next().expect("token").to_owned();
            assert!(
                tokens.insert(token),
                "{name}: a token granted twice:\n{text}"
            );
        }
    }
}

#[test]
fn a_user_outside_the_group_is_refused_in_one_line_and_creates_nothing() {
    let team = match team() {
        Ok(t) => t,
        Err(why) => return skip("team::outsider", &why),
    };
    // 2770 keeps outsiders out of the directory; 2775 lets them look but not write.
    for mode in [0o2770, 0o2775] {
        let place = team.place(mode);
        for (name, store_dir, url) in stores(&place) {
            // A member made the store and a key first.
            let out = team
                .baton(
                    Some(MEMBERS[0]),
                    place.dir.path(),
                    &["-s", &url, "run", "-k", "team/old", "--", "true"],
                )
                .output()
                .expect("member run");
            assert!(
                out.status.success(),
                "{name} {mode:o}: member: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let before = tree(&store_dir);
            for args in [
                &["run", "-k", "team/new", "--", "true"][..],
                &["run", "-k", "team/old", "--", "true"][..],
                &["status", "team/old"][..],
            ] {
                let mut full = vec!["-s", url.as_str()];
                full.extend_from_slice(args);
                let out = team
                    .baton(Some(OUTSIDER), place.dir.path(), &full)
                    .output()
                    .expect("outsider run");
                let stderr = String::from_utf8_lossy(&out.stderr);
                let what = format!("{name} {mode:o} {args:?}: {stderr}");
                assert_eq!(out.status.code(), Some(69), "{what}");
                assert_eq!(stderr.lines().count(), 1, "{what}");
                assert!(stderr.starts_with("baton: "), "{what}");
                assert!(
                    stderr.contains(&format!("'{GROUP}'")),
                    "names the group: {what}"
                );
                assert!(stderr.contains(OUTSIDER), "names the user: {what}");
                assert!(
                    stderr.contains("ermission denied"),
                    "names the missing permission: {what}"
                );
            }
            assert_eq!(tree(&store_dir), before, "{name} {mode:o}: residue");
        }
    }
}

/// Every path under `dir`, sorted (what an outsider must not change).
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            // -wal and -shm come and go with connections; the database stays.
            let name = path.to_string_lossy();
            if !name.ends_with("-wal") && !name.ends_with("-shm") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn relative_store_paths_resolve_against_the_working_directory() {
    let dir = Dir::new();
    for (given, want) in [
        ("./locks", format!("dir:{}/locks", dir.path().display())),
        ("dir:./locks", format!("dir:{}/locks", dir.path().display())),
        (
            "dir:rel/locks?mode=lease",
            format!("dir:{}/rel/locks?mode=lease", dir.path().display()),
        ),
        (
            "sqlite:jobs.db",
            format!("sqlite:{}/jobs.db", dir.path().display()),
        ),
    ] {
        let out = dir
            .bare(&[
                "-s",
                given,
                "run",
                "-k",
                "rel",
                "--",
                "sh",
                "-c",
                "echo \"$BATON_STORE\"",
            ])
            .output();
        out.code(0);
        assert_eq!(out.stdout.trim(), want, "{given}");
        // The same store from anywhere, by its absolute URL.
        let other = Dir::new();
        let out = other.bare(&["-s", &want, "list"]).output();
        out.code(0).stdout_has("rel");
    }
    assert!(dir.path().join("locks/rel").is_dir());
    assert!(dir.path().join("jobs.db").is_file());
}

/// Polls `status --json KEY` as this process until `n` slots are held.
fn wait_held(team: &Team, cwd: &Path, url: &str, key: &str, n: u64) {
    crate::util::wait_until(&format!("{n} slot(s) of {key} held on {url}"), || {
        let Ok(out) = team
            .baton(None, cwd, &["-s", url, "status", "--json", key])
            .output()
        else {
            return false;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str::<serde_json::Value>(text.trim())
            .ok()
            .and_then(|v| v["held"].as_u64())
            .is_some_and(|h| h >= n)
    });
}

#[test]
fn a_member_breaks_another_members_lease_but_never_signals_their_process() {
    let team = match team() {
        Ok(t) => t,
        Err(why) => return skip("team::break", &why),
    };
    let place = team.place(0o2770);
    let [(_, _, kernel), (_, _, lease), _] = <[_; 3]>::try_from(stores(&place)).expect("3");
    let (a, b) = (Some(MEMBERS[0]), Some(MEMBERS[1]));
    let cwd = place.dir.path();

    // Kernel locks: --kill may only signal what the caller could signal anyway.
    let mut holder = team
        .baton(
            a,
            cwd,
            &["-s", &kernel, "run", "-k", "team/held", "--", "sleep", "60"],
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn holder");
    wait_held(team, cwd, &kernel, "team/held", 1);
    let out = team
        .baton(b, cwd, &["-s", &kernel, "break", "--kill", "team/held"])
        .output()
        .expect("break");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("runs as user '{}'", MEMBERS[0])),
        "{stdout}"
    );
    assert!(
        holder.try_wait().expect("try_wait").is_none(),
        "not signalled"
    );
    let _ = holder.kill();
    let _ = holder.wait();

    // Lease files: a member may break another member's lease; its baton stops the command.
    let mut holder = team
        .baton(
            a,
            cwd,
            &[
                "-s",
                &lease,
                "run",
                "--ttl",
                "3s",
                "-k",
                "team/held",
                "--",
                "sleep",
                "60",
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn holder");
    wait_held(team, cwd, &lease, "team/held", 1);
    let out = team
        .baton(b, cwd, &["-s", &lease, "break", "team/held"])
        .output()
        .expect("break");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = holder.try_wait().expect("try_wait") {
            break status;
        }
        assert!(started.elapsed() < BOUND, "the broken holder did not stop");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(76), "lost: {status}");
}

/// `sh -c SCRIPT` in a mount namespace of its own whose /proc hides other users'
/// processes (`hidepid=invisible`), as hardened hosts mount it; the host's /proc is not
/// touched.
fn with_hidden_proc(script: &str) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount -t proc -o hidepid=invisible proc /proc || exit 99; {script}"
        ))
        .stdin(Stdio::null());
    cmd
}

#[test]
fn a_member_who_cannot_see_another_members_process_never_takes_its_live_lease() {
    let team = match team() {
        Ok(t) => t,
        Err(why) => return skip("team::hidepid", &why),
    };
    let probe = with_hidden_proc("true").output().expect("unshare");
    if !probe.status.success() {
        return skip(
            "team::hidepid",
            &format!(
                "cannot mount a private /proc with hidepid: {}",
                String::from_utf8_lossy(&probe.stderr).trim()
            ),
        );
    }
    let place = team.place(0o2770);
    let [_, (_, _, lease), _] = <[_; 3]>::try_from(stores(&place)).expect("3");
    let cwd = place.dir.path();
    let mut holder = team
        .baton(
            Some(MEMBERS[0]),
            cwd,
            &[
                "-s",
                &lease,
                "run",
                "-k",
                "team/hidden",
                "--",
                "sleep",
                "60",
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn holder");
    wait_held(team, cwd, &lease, "team/hidden", 1);
    // To the other member, /proc/PID of the holder does not exist; the holder is alive.
    let out = with_hidden_proc(&format!(
        "exec setpriv --reuid={} --regid={GROUP} --init-groups -- {} -s '{lease}' run --no-wait -k team/hidden -- true",
        MEMBERS[1],
        team.bin.display()
    ))
    .current_dir(cwd)
    .env_remove("BATON_STORE")
    .output()
    .expect("second member");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "busy, not granted: {stderr}");
    assert!(
        holder.try_wait().expect("try_wait").is_none(),
        "holder alive"
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

#[test]
fn a_member_resizes_a_key_another_member_made_on_the_lease_stores() {
    let team = match team() {
        Ok(t) => t,
        Err(why) => return skip("team::resize", &why),
    };
    let place = team.place(0o2770);
    let cwd = place.dir.path();
    for (name, _, url) in stores(&place).into_iter().skip(1) {
        let made = team
            .baton(
                Some(MEMBERS[0]),
                cwd,
                &[
                    "-s",
                    &url,
                    "run",
                    "-k",
                    "team/size",
                    "-n",
                    "2",
                    "--",
                    "true",
                ],
            )
            .output()
            .expect("make the key");
        assert!(made.status.success(), "{name}: {made:?}");
        let out = team
            .baton(
                Some(MEMBERS[1]),
                cwd,
                &["-s", &url, "resize", "team/size", "3"],
            )
            .output()
            .expect("resize");
        assert!(
            out.status.success(),
            "{name}: resize by the other member: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = team
            .baton(
                Some(MEMBERS[0]),
                cwd,
                &[
                    "-s",
                    &url,
                    "run",
                    "-k",
                    "team/size",
                    "-n",
                    "3",
                    "--",
                    "true",
                ],
            )
            .output()
            .expect("run at the new limit");
        assert!(
            out.status.success(),
            "{name}: the first member sees the new limit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
