//! A hostile or damaged store: a clear `baton: ` line and exit 69 (or a note in `status`),
//! never a panic, never a followed symlink.

use std::fs;
use std::os::unix::fs::symlink;

use crate::util::Dir;

fn no_panic(out: &crate::util::Outcome) {
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
}

#[test]
fn a_key_directory_that_is_a_symlink_is_refused() {
    let dir = Dir::new();
    let target = dir.file("elsewhere");
    fs::create_dir_all(&target).expect("mkdir");
    fs::create_dir_all(dir.store_dir()).expect("mkdir");
    symlink(&target, dir.store_dir().join("evil")).expect("symlink");
    let out = dir.cmd(&["run", "-k", "evil", "--", "true"]).output();
    no_panic(&out);
    out.code(69).one_error_line().stderr_has("symlink");
    assert_eq!(
        fs::read_dir(&target).expect("read").count(),
        0,
        "nothing was created through the symlink"
    );
}

#[test]
fn a_slot_file_that_is_a_symlink_is_refused() {
    let dir = Dir::new();
    dir.cmd(&["run", "-k", "s", "--", "true"]).output().code(0);
    let victim = dir.file("victim");
    fs::write(&victim, "precious\n").expect("write");
    let slot = dir.store_dir().join("s").join("slot.0");
    fs::remove_file(&slot).expect("rm slot.0");
    symlink(&victim, &slot).expect("symlink");
    let marker = dir.file("ran");
    let out = dir
        .cmd(&["run", "-k", "s", "--", "touch"])
        .args(&[marker.to_str().expect("utf-8")])
        .output();
    no_panic(&out);
    out.code(69).one_error_line();
    assert!(!marker.exists(), "the command must not run");
    let out = dir.cmd(&["status", "s"]).output();
    no_panic(&out);
    out.code(69).one_error_line();
    assert_eq!(fs::read_to_string(&victim).expect("read"), "precious\n");
}

#[test]
fn a_garbage_limit_file_is_refused_not_reset() {
    let dir = Dir::new();
    dir.cmd(&["run", "-k", "l", "--", "true"]).output().code(0);
    let limit = dir.store_dir().join("l").join("limit");
    fs::write(&limit, "banana\n").expect("write");
    let out = dir.cmd(&["run", "-k", "l", "--", "true"]).output();
    no_panic(&out);
    out.code(69).one_error_line().stderr_has("limit");
    assert_eq!(fs::read_to_string(&limit).expect("read"), "banana\n");
}

#[test]
fn garbage_holder_info_shows_as_a_note() {
    let dir = Dir::new();
    let _holder = dir.cmd(&["run", "-k", "g", "--", "sleep", "30"]).spawn();
    dir.wait_held("g", 1);
    let info = dir.store_dir().join("g").join("slot.0");
    fs::write(&info, b"\x00\xffnot json{{{").expect("write");

    let out = dir.cmd(&["status", "g"]).output();
    no_panic(&out);
    out.code(0).stdout_has("held").stdout_has("note: ");
    let out = dir.cmd(&["status", "--json", "g"]).output();
    out.code(0);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    assert_eq!(v["slots"][0]["state"], "held");
    assert!(v["slots"][0]["note"].as_str().is_some(), "{v}");
    // Garbage frees nobody's slot.
    dir.cmd(&["run", "--no-wait", "-k", "g", "--", "true"])
        .output()
        .code(75);
}

#[test]
fn garbage_holder_info_beside_a_free_slot_does_not_block() {
    let dir = Dir::new();
    dir.cmd(&["run", "-k", "f", "--", "true"]).output().code(0);
    let info = dir.store_dir().join("f").join("slot.0");
    fs::write(&info, "garbage").expect("write");
    let out = dir.cmd(&["status", "f"]).output();
    out.code(0).stdout_has("free").stdout_has("note: ");
    dir.cmd(&["run", "--no-wait", "-k", "f", "--", "true"])
        .output()
        .code(0);
}

#[test]
fn a_default_directory_that_is_a_symlink_is_refused() {
    let dir = Dir::new();
    let real = dir.file("real");
    fs::create_dir_all(&real).expect("mkdir");
    symlink(&real, dir.path().join("baton")).expect("symlink");
    for args in [
        &["run", "-k", "k", "--", "true"][..],
        &["status"],
        &["list"],
    ] {
        let out = dir.bare(args).output();
        no_panic(&out);
        out.code(69).one_error_line().stderr_has("symlink");
    }
    assert_eq!(fs::read_dir(&real).expect("read").count(), 0);
}

#[test]
fn a_default_directory_owned_by_another_user_is_refused() {
    let dir = Dir::new();
    let default = dir.path().join("baton");
    fs::create_dir(&default).expect("mkdir");
    std::os::unix::fs::chown(&default, Some(65534), Some(65534))
        .expect("chown (tests run as root)");
    for args in [&["run", "-k", "k", "--", "true"][..], &["list"]] {
        let out = dir.bare(args).output();
        no_panic(&out);
        out.code(69).one_error_line().stderr_has("65534");
    }
    assert_eq!(fs::read_dir(&default).expect("read").count(), 0);
}

#[test]
fn the_default_directory_is_used_without_s() {
    let dir = Dir::new();
    dir.bare(&["run", "-k", "d", "--", "true"]).output().code(0);
    assert!(dir.path().join("baton").join("d").is_dir());
    let out = dir.bare(&["list"]).output();
    out.code(0);
    assert_eq!(out.stdout, "d\n");
}
