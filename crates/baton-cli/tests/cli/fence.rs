//! `baton fence`: a write to a SQLite database that only a current holder can make.

use crate::util::Dir;

fn rows(db: &std::path::Path) -> Vec<String> {
    let conn = rusqlite_open(db);
    let mut stmt = conn
        .prepare("SELECT v FROM t ORDER BY rowid")
        .expect("prepare");
    stmt.query_map([], |r| r.get::<_, String>(0))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

fn rusqlite_open(db: &std::path::Path) -> baton::fence::rusqlite::Connection {
    baton::fence::rusqlite::Connection::open(db).expect("open db")
}

#[test]
fn a_holder_writes_and_a_stale_token_is_refused() {
    let dir = Dir::new();
    let db = dir.file("results.db");
    rusqlite_open(&db)
        .execute_batch("CREATE TABLE t(v TEXT)")
        .expect("table");
    let db_arg = db.to_str().expect("utf8");
    // Inside baton run: key and token from the environment.
    let script = format!(
        "baton_bin=$1; $baton_bin fence --db {db_arg} \"INSERT INTO t VALUES ('first')\" && echo $BATON_TOKEN"
    );
    let out = dir
        .cmd(&[
            "run",
            "-k",
            "report",
            "--",
            "sh",
            "-c",
            &script,
            "sh",
            crate::util::baton_bin(),
        ])
        .output();
    out.code(0);
    let token: u64 = out.stdout.trim().parse().expect("the token");
    let out = dir
        .cmd(&[
            "run",
            "-k",
            "report",
            "--",
            "sh",
            "-c",
            &script,
            "sh",
            crate::util::baton_bin(),
        ])
        .output();
    out.code(0);
    // A late writer with the first grant's token: refused, nothing written.
    let out = dir
        .bare(&[
            "fence",
            "--db",
            db_arg,
            "-k",
            "report",
            "--token",
            &token.to_string(),
            "INSERT INTO t VALUES ('late')",
        ])
        .output();
    out.code(77).one_error_line().stderr_has("refused");
    assert_eq!(rows(&db), vec!["first", "first"]);
    // --once: the same token twice is refused the second time.
    let big = (token + 1_000_000).to_string();
    dir.bare(&[
        "fence",
        "--db",
        db_arg,
        "-k",
        "report",
        "--token",
        &big,
        "--once",
        "INSERT INTO t VALUES ('a')",
    ])
    .output()
    .code(0);
    dir.bare(&[
        "fence",
        "--db",
        db_arg,
        "-k",
        "report",
        "--token",
        &big,
        "--once",
        "INSERT INTO t VALUES ('b')",
    ])
    .output()
    .code(77);
    assert_eq!(rows(&db).len(), 3);
}

#[test]
fn fence_needs_a_key_a_token_and_sql() {
    let dir = Dir::new();
    let db = dir.file("r.db");
    let db_arg = db.to_str().expect("utf8");
    dir.bare(&["fence", "--db", db_arg, "SELECT 1"])
        .output()
        .code(2)
        .one_error_line()
        .stderr_has("no key");
    dir.bare(&["fence", "--db", db_arg, "-k", "k", "SELECT 1"])
        .output()
        .code(2)
        .one_error_line()
        .stderr_has("no token");
    dir.bare(&[
        "fence", "--db", db_arg, "-k", "../x", "--token", "1", "SELECT 1",
    ])
    .output()
    .code(2)
    .one_error_line();
    // Bad SQL: a clear error, the token not recorded.
    dir.bare(&[
        "fence",
        "--db",
        db_arg,
        "-k",
        "k",
        "--token",
        "5",
        "INSERT INTO nosuch VALUES (1)",
    ])
    .output()
    .code(69)
    .one_error_line()
    .stderr_has("fenced write failed");
    dir.bare(&[
        "fence", "--db", db_arg, "-k", "k", "--token", "1", "SELECT 1",
    ])
    .output()
    .code(0);
}
