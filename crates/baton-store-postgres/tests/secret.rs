//! Where the PostgreSQL store takes its password from, and in which order: the URL, its
//! `password_file`, `PGPASSWORD`, `PGPASSFILE`/`~/.pgpass`. Parsing only: the test server
//! trusts loopback connections, so it would accept any password.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use baton_core::secret::PasswordSource;
use baton_core::{Error, ErrorKind, StoreUrl};
use baton_store_postgres::PostgresConfig;

fn write(dir: &Path, name: &str, content: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    p
}

fn parse(url: &str, env: &[(&str, &str)]) -> Result<PostgresConfig, Error> {
    let env: Vec<(String, OsString)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), OsString::from(v)))
        .collect();
    let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    PostgresConfig::from_url_env(&StoreUrl::parse(url).expect("url"), &lookup)
}

fn password(c: &PostgresConfig) -> Option<String> {
    c.pg.get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

#[test]
fn the_url_then_its_file_then_pgpassword_then_pgpass() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = write(dir.path(), "pg.pass", "from-file\n", 0o600);
    let pgpass = write(
        dir.path(),
        "pgpass",
        "db1:5432:locks:bob:from-pgpass\n",
        0o600,
    );
    let pgpass_s = pgpass.to_str().expect("utf8");
    let file_url = format!("postgres://bob@db1/locks?password_file={}", file.display());
    let all_env = [("PGPASSWORD", "from-env"), ("PGPASSFILE", pgpass_s)];

    let c = parse("postgres://bob:from-url@db1/locks", &all_env).expect("url");
    assert_eq!(password(&c).as_deref(), Some("from-url"));
    assert_eq!(c.password_source, Some(PasswordSource::Url));

    let c = parse(&file_url, &all_env).expect("file");
    assert_eq!(password(&c).as_deref(), Some("from-file"));
    assert_eq!(c.password_source, Some(PasswordSource::File(file.clone())));

    let c = parse("postgres://bob@db1/locks", &all_env).expect("env");
    assert_eq!(password(&c).as_deref(), Some("from-env"));
    assert_eq!(c.password_source, Some(PasswordSource::Env("PGPASSWORD")));

    let c = parse("postgres://bob@db1/locks", &[("PGPASSFILE", pgpass_s)]).expect("pgpass");
    assert_eq!(password(&c).as_deref(), Some("from-pgpass"));
    assert_eq!(
        c.password_source,
        Some(PasswordSource::StoreFile(pgpass.clone()))
    );

    // No entry for another database, user or port: no password at all.
    for other in [
        "postgres://bob@db1/other",
        "postgres://alice@db1/locks",
        "postgres://bob@db1:6000/locks",
    ] {
        let c = parse(other, &[("PGPASSFILE", pgpass_s)]).expect(other);
        assert_eq!(password(&c), None, "{other}");
        assert_eq!(c.password_source, None);
    }
    for shown in [
        format!("{:?}", parse(&file_url, &all_env).expect("file")),
        format!(
            "{:?}",
            parse("postgres://bob:from-url@db1/locks", &[]).expect("url")
        ),
    ] {
        assert!(!shown.contains("from-"), "{shown}");
    }
}

#[test]
fn a_password_file_is_refused_unless_private_or_alone() {
    let dir = tempfile::tempdir().expect("tmp");
    let open = write(dir.path(), "open.pass", "s3cret\n", 0o644);
    let private = write(dir.path(), "pg.pass", "s3cret\n", 0o600);
    for url in [
        format!("postgres://bob@db1/locks?password_file={}", open.display()),
        format!(
            "postgres://bob:hunter2@db1/locks?password_file={}",
            private.display()
        ),
        format!(
            "postgres://bob@db1/locks?password=hunter2&password_file={}",
            private.display()
        ),
        "postgres://bob@db1/locks?password_file=".to_owned(),
        "postgres://bob@db1/locks?password_file=relative.pass".to_owned(),
    ] {
        let err = parse(&url, &[]).expect_err(&url);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{url}: {err}");
        let shown = format!("{err:#} {err:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
    let missing = format!(
        "postgres://bob@db1/locks?password_file={}",
        dir.path().join("missing").display()
    );
    assert_eq!(
        parse(&missing, &[]).expect_err("missing").kind(),
        ErrorKind::Unavailable
    );
}

#[test]
fn the_password_file_parameter_does_not_reach_the_driver() {
    let dir = tempfile::tempdir().expect("tmp");
    let private = write(dir.path(), "pg.pass", "s3cret", 0o600);
    let url = format!(
        "postgres://bob@db1/locks?application_name=x&password_file={}&schema=jobs",
        private.display()
    );
    let c = parse(&url, &[]).expect("cfg");
    assert_eq!(c.schema, "jobs");
    assert_eq!(c.pg.get_application_name(), Some("x"));
    assert_eq!(password(&c).as_deref(), Some("s3cret"));
}

#[test]
fn ambiguous_user_info_is_refused_without_echoing_it() {
    for url in [
        "postgres://bob:pa/S3CR3T@db1/locks",
        "postgres://bob:pa?S3CR3T@db1/locks",
        "postgres://bob:pa#S3CR3T@db1/locks",
        "postgres://bob:@S3CR3T@db1/locks",
        // The driver would take `db1/locks?application_name=a` for the user info.
        "postgres://db1/locks?application_name=a@S3CR3T",
        "postgres:///locks?@host=/run/postgresql&user=bob&password=S3CR3T",
    ] {
        let err = parse(url, &[]).expect_err(url);
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{url}: {err}");
        let shown = format!("{err:#} {err:?}");
        assert!(!shown.contains("S3CR3T"), "{shown}");
    }
    let c = parse("postgres://bob:pa%2FS3CR3T%40x@db1/locks", &[]).expect("encoded");
    assert_eq!(password(&c).as_deref(), Some("pa/S3CR3T@x"));
}
