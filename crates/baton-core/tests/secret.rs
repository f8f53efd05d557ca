//! The password mechanism the stores share: password files refused unless private,
//! `.pgpass` with libpq's semantics, the order of sources, the command-line warning.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use baton_core::secret::{
    command_line_password_warning, pgpass_find, pgpass_lookup, read_password_file, PasswordSource,
    PasswordSources, PgHost, PgTarget, Secret,
};
use baton_core::{ErrorKind, StoreUrl};

fn write(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

#[test]
fn a_private_password_file_is_read() {
    let dir = tempfile::tempdir().expect("tmp");
    for mode in [0o600, 0o400] {
        let p = write(dir.path(), &format!("pw{mode:o}"), "s3cret\n", mode);
        assert_eq!(read_password_file(&p).expect("read").expose(), "s3cret");
    }
    // A symlink is followed and its target judged (secret mounts are symlinks).
    let target = write(dir.path(), "target", "t0ps3cret", 0o600);
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    assert_eq!(
        read_password_file(&link).expect("read").expose(),
        "t0ps3cret"
    );
}

#[test]
fn a_password_file_others_can_reach_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o666] {
        let p = write(dir.path(), &format!("pw{mode:o}"), "s3cret", mode);
        let err = read_password_file(&p).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{mode:o}: {err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        assert!(!format!("{err:#} {err:?}").contains("s3cret"), "{err:?}");
    }
    let open = write(dir.path(), "open", "s3cret", 0o644);
    let link = dir.path().join("link-to-open");
    std::os::unix::fs::symlink(&open, &link).expect("symlink");
    let err = read_password_file(&link).expect_err("symlink to an open file");
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");

    // Owned by another user (who could rewrite it): only root can set that up.
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let theirs = write(dir.path(), "theirs", "s3cret", 0o600);
        std::os::unix::fs::chown(&theirs, Some(65534), None).expect("chown");
        let err = read_password_file(&theirs).expect_err("another owner");
        assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    }
}

#[test]
fn a_password_file_that_is_not_one_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let not_regular = dir.path().join("d");
    std::fs::create_dir(&not_regular).expect("mkdir");
    std::fs::set_permissions(&not_regular, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let err = read_password_file(&not_regular).expect_err("directory");
    assert!(err.to_string().contains("not a regular file"), "{err}");

    // A FIFO must be refused without waiting for a writer.
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("c path");
    // SAFETY: c is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = read_password_file(&fifo).expect_err("fifo");
    assert!(err.to_string().contains("not a regular file"), "{err}");

    for (name, content) in [
        ("empty", ""),
        ("nl", "\n"),
        ("two", "a\nb\n"),
        ("nul", "a\0"),
    ] {
        let p = write(dir.path(), name, content, 0o600);
        let err = read_password_file(&p).expect_err(name);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{name}: {err}");
    }
    let big = write(dir.path(), "big", &"x".repeat(5000), 0o600);
    assert_eq!(
        read_password_file(&big).expect_err("big").kind(),
        ErrorKind::InvalidInput
    );

    let err = read_password_file(Path::new("relative/pw")).expect_err("relative");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let err = read_password_file(&dir.path().join("missing")).expect_err("missing");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
}

fn tcp<'a>(host: &'a str, port: u16, dbname: &'a str, user: &'a str) -> PgTarget<'a> {
    PgTarget {
        host: PgHost::Tcp(host),
        port,
        dbname,
        user,
    }
}

fn find(text: &str, t: &PgTarget<'_>) -> Option<String> {
    pgpass_find(text, t).map(|s| s.expose().to_owned())
}

#[test]
fn pgpass_lines_match_as_libpq_matches_them() {
    let text = "\
# a comment:*:*:*:nope
db1:5432:locks:bob:first
db1:5432:locks:bob:second
*:5433:*:bob:any-host
db2:*:*:*:wild\\:card\\\\pw
db\\:3:5432:x:y:escaped-host
db4:5432:short
db5:5432:locks:\\*:literal-star
db6:5432:locks:bob:pass:with:colons\r
localhost:5432:locks:bob:socket
";
    let t = |h, p, d, u| find(text, &tcp(h, p, d, u));
    assert_eq!(t("db1", 5432, "locks", "bob").as_deref(), Some("first"));
    assert_eq!(t("db1", 5432, "locks", "alice"), None);
    assert_eq!(t("anything", 5433, "x", "bob").as_deref(), Some("any-host"));
    assert_eq!(t("db2", 1, "x", "y").as_deref(), Some("wild:card\\pw"));
    assert_eq!(t("db:3", 5432, "x", "y").as_deref(), Some("escaped-host"));
    assert_eq!(t("db4", 5432, "short", ""), None);
    assert_eq!(
        t("db5", 5432, "locks", "bob"),
        None,
        "\\* is a literal star"
    );
    assert_eq!(
        t("db5", 5432, "locks", "*").as_deref(),
        Some("literal-star")
    );
    assert_eq!(
        t("db6", 5432, "locks", "bob").as_deref(),
        Some("pass:with:colons")
    );
    let socket = PgTarget {
        host: PgHost::Unix(Path::new("/var/run/postgresql")),
        port: 5432,
        dbname: "locks",
        user: "bob",
    };
    assert_eq!(find(text, &socket).as_deref(), Some("socket"));
    assert_eq!(find("", &socket), None);
}

fn env_of(vars: &[(&str, &Path)]) -> impl Fn(&str) -> Option<OsString> {
    let vars: Vec<(String, OsString)> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_os_str().to_owned()))
        .collect();
    move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

#[test]
fn pgpass_is_ignored_when_others_can_read_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let target = tcp("db1", 5432, "locks", "bob");
    let private = write(dir.path(), "private", "*:*:*:*:pw\n", 0o600);
    let env = env_of(&[("PGPASSFILE", &private)]);
    let (pw, path) = pgpass_lookup(&target, &env).expect("found");
    assert_eq!((pw.expose(), path), ("pw", private));
    let open = write(dir.path(), "open", "*:*:*:*:pw\n", 0o640);
    assert!(pgpass_lookup(&target, &env_of(&[("PGPASSFILE", &open)])).is_none());
    // Without PGPASSFILE: $HOME/.pgpass.
    write(dir.path(), ".pgpass", "db1:*:*:*:home\n", 0o600);
    let env = env_of(&[("HOME", dir.path())]);
    assert_eq!(
        pgpass_lookup(&target, &env).map(|(p, _)| p.expose().to_owned()),
        Some("home".into())
    );
    assert!(pgpass_lookup(&target, &|_| None).is_none());
}

#[test]
fn sources_keep_one_order_and_refuse_two_explicit_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = write(dir.path(), "pw", "from-file\n", 0o600);
    let env = |name: &str| (name == "PGPASSWORD").then(|| OsString::from("from-env"));
    let mut s = PasswordSources {
        url: None,
        file: None,
        env: vec!["PGPASSWORD"],
    };
    let got = |s: &PasswordSources| {
        s.resolve(&env)
            .expect("resolve")
            .map(|(p, src)| (p.expose().to_owned(), src))
    };
    assert_eq!(
        got(&s),
        Some(("from-env".into(), PasswordSource::Env("PGPASSWORD")))
    );
    s.file = Some(file.clone());
    assert_eq!(
        got(&s),
        Some(("from-file".into(), PasswordSource::File(file)))
    );
    s.file = None;
    s.url = Some(Secret::new("from-url"));
    assert_eq!(got(&s), Some(("from-url".into(), PasswordSource::Url)));
    s.file = Some(dir.path().join("pw"));
    let err = s.resolve(&env).expect_err("both");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(!format!("{err:#}").contains("from-"), "{err:#}");
    s.url = None;
    s.file = None;
    assert_eq!(s.resolve(&|_| None).expect("none").map(|_| ()), None);
}

#[test]
fn a_password_on_the_command_line_is_warned_about_in_one_line() {
    let url = StoreUrl::parse("postgres://bob:hunter2@db1/locks").expect("url");
    let w = command_line_password_warning(&url).expect("warned");
    assert!(!w.contains("hunter2") && !w.contains('\n'), "{w}");
    assert!(
        w.contains("BATON_STORE") && w.contains("password_file"),
        "{w}"
    );
    let q = StoreUrl::parse("postgres://db1/locks?password=hunter2").expect("url");
    assert!(command_line_password_warning(&q).is_some());
    for quiet in [
        "postgres://bob@db1/locks",
        "postgres://bob@db1/locks?password_file=/etc/baton/pg.pass",
        "etcd://h1:2379/baton",
        "dir:/tmp/x",
    ] {
        let u = StoreUrl::parse(quiet).expect("url");
        assert_eq!(command_line_password_warning(&u), None, "{quiet}");
    }
}
