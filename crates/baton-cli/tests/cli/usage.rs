//! Usage errors: exit 2 and exactly one `baton: ` line on stderr; help and version exit 0.

use crate::util::Dir;

#[test]
fn each_bad_input_is_exit_2_with_one_line() {
    let dir = Dir::new();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "-k", "../x", "--", "true"], "invalid key"),
        (&["run", "-k", "", "--", "true"], "cannot be empty"),
        (&["run", "-k", "a b", "--", "true"], "invalid key"),
        (&["run", "-w", "5x", "--", "true"], "invalid duration"),
        (&["run", "--"], "no command"),
        (&["run"], "no command"),
        (&["run", "-n", "0", "--", "true"], "'0'"),
        (&["run", "-n", "x", "--", "true"], "invalid value"),
        (
            &["run", "--no-wait", "-w", "1s", "--", "true"],
            "cannot be used",
        ),
        (&["run", "--bogus", "--", "true"], "--bogus"),
        (&["status", "../x"], "invalid key"),
        (&["break", "k", "--holder", "xyz"], "holder id"),
        (&["frobnicate"], "frobnicate"),
        (&[], "subcommand"),
    ];
    for (args, why) in cases {
        let out = dir.cmd(args).output();
        assert_eq!(out.code, Some(2), "{args:?}: {out:#?}");
        out.one_error_line().stderr_has(why);
    }
}

#[test]
fn bad_store_urls_are_exit_2_with_one_line() {
    let dir = Dir::new();
    let cases: &[(&str, &str)] = &[
        ("nonsense", "no scheme"),
        ("foo:bar", "foo"),
        ("dir:/x?color=red", "color"),
    ];
    for (url, why) in cases {
        let out = dir.bare(&["-s", url, "run", "--", "true"]).output();
        assert_eq!(out.code, Some(2), "{url}: {out:#?}");
        out.one_error_line().stderr_has(why);
        // -s after the subcommand, and BATON_STORE, work the same.
        let out = dir.bare(&["run", "-s", url, "--", "true"]).output();
        assert_eq!(out.code, Some(2), "{url} after run: {out:#?}");
        let out = dir.bare(&["list"]).env("BATON_STORE", url).output();
        assert_eq!(out.code, Some(2), "BATON_STORE={url}: {out:#?}");
        out.one_error_line();
    }
}

#[test]
fn the_store_comes_from_s_then_baton_store() {
    let dir = Dir::new();
    dir.cmd(&["run", "-k", "from-flag", "--", "true"])
        .output()
        .code(0);
    let out = dir.bare(&["list"]).env("BATON_STORE", dir.store()).output();
    out.code(0).stdout_has("from-flag");
    // -s wins over BATON_STORE.
    let out = dir
        .bare(&["list", "-s", &dir.store()])
        .env("BATON_STORE", "dir:/nonexistent-baton-test/x")
        .output();
    out.code(0).stdout_has("from-flag");
}

#[test]
fn another_limit_for_an_existing_key_is_exit_2_naming_the_limit() {
    let dir = Dir::new();
    dir.cmd(&["run", "-n", "3", "-k", "sem", "--", "true"])
        .output()
        .code(0);
    dir.cmd(&["run", "-n", "2", "-k", "sem", "--", "true"])
        .output()
        .code(2)
        .one_error_line()
        .stderr_has("limit of 3");
    dir.cmd(&["run", "-k", "sem", "--", "true"])
        .output()
        .code(2)
        .stderr_has("-n 3");
}

#[test]
fn help_documents_every_exit_code_and_exits_0() {
    let dir = Dir::new();
    for args in [&["--help"][..], &["run", "--help"], &["help", "run"]] {
        let out = dir.cmd(args).output();
        out.code(0);
        for code in ["128+N", "2 ", "69", "75", "126", "127", "-E"] {
            out.stdout_has(code);
        }
    }
    let out = dir.cmd(&["--version"]).output();
    out.code(0).stdout_has("baton ");
}

#[test]
fn help_names_every_store_this_build_has() {
    let dir = Dir::new();
    let out = dir.cmd(&["--help"]).output();
    out.code(0);
    for kind in baton::built() {
        out.stdout_has(kind.example);
    }
    let planned: Vec<_> = baton::STORES.iter().filter(|k| k.planned).collect();
    for kind in &planned {
        out.stdout_has(kind.example);
    }
    if !planned.is_empty() {
        out.stdout_has("Not built yet");
    }
}

#[test]
fn a_closed_stdout_ends_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let dir = Dir::new();
    dir.cmd(&["run", "-k", "k", "--", "true"]).output().code(0);
    for args in [&["list"][..], &["status"], &["status", "--json", "k"]] {
        // A pipe whose reader is gone before baton starts: every write fails (EPIPE).
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two descriptors for pipe2 to fill.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are fresh and owned here.
        let (reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(reader);
        let mut cmd = dir.cmd(args);
        let out = cmd.stdout_to(writer).output();
        assert_eq!(out.code, Some(0), "{args:?}: {out:#?}");
        assert_eq!(out.stderr, "", "{args:?}: no message for a closed pipe");
    }
}
