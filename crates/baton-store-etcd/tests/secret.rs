//! Where the etcd store takes its credentials from, and in which order: the URL, its
//! `password_file`, `ETCDCTL_USER=user:password`, `ETCDCTL_PASSWORD` (as etcdctl reads
//! them). Parsing only.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use baton_core::secret::PasswordSource;
use baton_core::{Error, ErrorKind, StoreUrl};
use baton_store_etcd::EtcdConfig;

fn write(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

fn parse(url: &str, env: &[(&str, &str)]) -> Result<EtcdConfig, Error> {
    let env: Vec<(String, OsString)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), OsString::from(v)))
        .collect();
    let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    EtcdConfig::from_url_env(&StoreUrl::parse(url).expect("url"), &lookup)
}

fn user(c: &EtcdConfig) -> Option<(&str, &str)> {
    c.user.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
}

#[test]
fn the_url_then_its_file_then_etcdctl_variables() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = write(dir.path(), "etcd.pass", "from-file\n", 0o600);
    let file_url = format!("etcd://bob@h1:2379/baton?password_file={}", file.display());

    let c = parse(
        "etcd://bob:from-url@h1:2379",
        &[("ETCDCTL_PASSWORD", "from-env")],
    )
    .expect("url");
    assert_eq!(user(&c), Some(("bob", "from-url")));
    assert_eq!(c.password_source, Some(PasswordSource::Url));

    let c = parse(&file_url, &[("ETCDCTL_PASSWORD", "from-env")]).expect("file");
    assert_eq!(user(&c), Some(("bob", "from-file")));
    assert_eq!(c.password_source, Some(PasswordSource::File(file.clone())));

    let c = parse("etcd://bob@h1:2379", &[("ETCDCTL_PASSWORD", "from-env")]).expect("env");
    assert_eq!(user(&c), Some(("bob", "from-env")));
    assert_eq!(
        c.password_source,
        Some(PasswordSource::Env("ETCDCTL_PASSWORD"))
    );

    let c = parse("etcd://h1:2379", &[("ETCDCTL_USER", "alice:from-user-var")]).expect("pair");
    assert_eq!(user(&c), Some(("alice", "from-user-var")));
    assert_eq!(c.password_source, Some(PasswordSource::Env("ETCDCTL_USER")));

    let c = parse(
        "etcd://h1:2379",
        &[("ETCDCTL_USER", "alice"), ("ETCDCTL_PASSWORD", "from-env")],
    )
    .expect("user and password variables");
    assert_eq!(user(&c), Some(("alice", "from-env")));

    // The URL's user wins, and another user's password from ETCDCTL_USER is not used for it.
    let err = parse("etcd://bob@h1:2379", &[("ETCDCTL_USER", "alice:hers")]).expect_err("other");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(!format!("{err:#}").contains("hers"), "{err:#}");

    // A password in the environment with no user anywhere is not ours: no authentication.
    let c = parse("etcd://h1:2379", &[("ETCDCTL_PASSWORD", "stray")]).expect("no user");
    assert_eq!(user(&c), None);
    assert_eq!(c.password_source, None);

    for c in [
        parse(&file_url, &[]).expect("file"),
        parse("etcd://bob:from-url@h1:2379", &[]).expect("url"),
    ] {
        assert!(!format!("{c:?}").contains("from-"), "{c:?}");
    }
}

#[test]
fn ambiguous_or_unsafe_credentials_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let open = write(dir.path(), "open.pass", "s3cret", 0o644);
    let private = write(dir.path(), "etcd.pass", "s3cret", 0o600);
    let cases: Vec<(String, Vec<(&str, &str)>)> = vec![
        (
            format!("etcd://bob@h1:2379?password_file={}", open.display()),
            vec![],
        ),
        (
            format!(
                "etcd://bob:hunter2@h1:2379?password_file={}",
                private.display()
            ),
            vec![],
        ),
        (
            format!("etcd://h1:2379?password_file={}", private.display()),
            vec![],
        ),
        ("etcd://bob@h1:2379".into(), vec![]),
        (
            "etcd://h1:2379".into(),
            vec![
                ("ETCDCTL_USER", "bob:hunter2"),
                ("ETCDCTL_PASSWORD", "s3cret"),
            ],
        ),
        ("etcd://h1:2379?password_file=".into(), vec![]),
    ];
    for (url, env) in cases {
        let err = parse(&url, &env).expect_err(&url);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{url}: {err}");
        let shown = format!("{err:#} {err:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}

#[test]
fn ambiguous_user_info_is_refused_without_echoing_it() {
    for url in [
        "etcd://bob:x/S3CR3T@h1:2379/baton",
        "etcd://bob:x?S3CR3T@h1:2379/baton",
        "etcd://bob:p@S3CR3T@h1:2379/baton",
        "etcd://h1:2379/baton?password_file=/a@S3CR3T",
    ] {
        let err = parse(url, &[]).expect_err(url);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{url}: {err}");
        let shown = format!("{err:#} {err:?}");
        assert!(!shown.contains("S3CR3T"), "{shown}");
    }
    let c = parse("etcd://bob:x%2FS3CR3T@h1:2379/baton", &[]).expect("encoded");
    assert_eq!(user(&c), Some(("bob", "x/S3CR3T")));
}
