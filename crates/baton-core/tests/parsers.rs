//! Every parser of input a user or another process controls never panics, and refuses
//! what it cannot read with an error of the right kind: keys (`InvalidKey`), store URLs
//! (`InvalidInput`), durations (a sentence), holder records (`None`), holder ids, password
//! files and `.pgpass` text.
//!
//! Inputs are arbitrary strings and mutations of valid examples (truncation, byte flips,
//! insertions of NULs, unicode and huge numbers), bounded in size so no case can hang.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use baton_core::secret::{parse_password_file, pgpass_find, PgHost, PgTarget};
use baton_core::{
    derive_key, parse_duration, ErrorKind, Holder, HolderId, Key, Op, StoreUrl, MAX_KEY_LEN,
};
use proptest::prelude::*;

/// Pieces a mutation inserts: the bytes parsers trip on.
const NASTY: &[&str] = &[
    "\0",
    "\u{7f}",
    "\u{e9}",
    "\u{202e}",
    "\u{1f600}",
    "\u{fffd}",
    "18446744073709551616",
    "99999999999999999999999999999999999999",
    "-1",
    "+1",
    "%",
    "%zz",
    "%+1",
    "..",
    "/",
    "//",
    ":",
    "@",
    "?",
    "&",
    "=",
    "\\",
    "*",
    "\n",
    "\r\n",
    " ",
    "{",
    "}",
    "\"",
    "[",
    "1e999",
    "NaN",
];

/// One mutation of `valid`: truncated, a byte flipped, a nasty piece inserted, or a
/// piece repeated; the bytes are then read as UTF-8, lossily.
fn mutated(valid: Vec<&'static str>) -> impl Strategy<Value = String> {
    let seeds = proptest::sample::select(valid);
    (
        seeds,
        0usize..4,
        any::<prop::sample::Index>(),
        any::<u8>(),
        proptest::sample::select(NASTY.to_vec()),
        1usize..8,
    )
        .prop_map(|(seed, how, at, byte, piece, times)| {
            let mut b = seed.as_bytes().to_vec();
            let i = if b.is_empty() {
                0
            } else {
                at.index(b.len() + 1)
            };
            match how {
                0 => b.truncate(i),
                1 if !b.is_empty() => {
                    let j = i.min(b.len() - 1);
                    b[j] ^= byte | 1;
                }
                2 => {
                    for _ in 0..times {
                        b.splice(i..i, piece.bytes());
                    }
                }
                _ => {
                    let tail = b[i..].to_vec();
                    for _ in 0..times {
                        b.extend_from_slice(&tail);
                    }
                }
            }
            String::from_utf8_lossy(&b).into_owned()
        })
}

/// Arbitrary text, bounded: any unicode, or mostly the characters a parser splits on.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,300}",
        "[a-zA-Z0-9./_:@?&=%*\\\\ -]{0,300}",
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

const VALID_KEYS: &[&str] = &[
    "a",
    "jobs/nightly",
    "a.b_c-d/e",
    "v1.2/x",
    "cmd/backup-5f5a738a9da6133a87c88b65e8e8df5f",
];

/// The rules of a key, checked independently of `Key::new`.
fn is_valid_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_KEY_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        && !s.contains("..")
        && s.split('/').all(|p| !p.is_empty() && p != ".")
}

fn check_key(s: &str) {
    match Key::new(s) {
        Ok(k) => {
            assert!(is_valid_key(s), "accepted {s:?}");
            assert_eq!(k.as_str(), s);
            assert_eq!(s.parse::<Key>().expect("parse").as_str(), s);
        }
        Err(e) => {
            assert!(!is_valid_key(s), "refused {s:?}: {e}");
            assert_eq!(e.kind(), ErrorKind::InvalidKey, "{s:?}");
            assert_eq!(e.op(), Some(Op::Parse));
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }
    // A key read back from a store's JSON goes through the same check.
    let json = serde_json::to_string(s).expect("json");
    assert_eq!(
        serde_json::from_str::<Key>(&json).is_ok(),
        is_valid_key(s),
        "{s:?}"
    );
}

const VALID_URLS: &[&str] = &[
    "dir:/tmp/locks",
    "dir:/tmp/locks?mode=lease",
    "/var/lock/baton",
    "./locks",
    "sqlite:/var/lib/baton.db",
    "sqlite:///var/lib/baton.db?unsafe_network_fs=1",
    "postgres://bob:hunter2@db1:5432/locks?sslmode=disable&schema=jobs",
    "postgresql://db1/locks?password_file=/etc/baton/pg.pass",
    "etcd://h1:2379,h2:2379/baton?timeout=2s",
    "etcd://bob:s%40cret@[::1]:2379/p",
    "amqp://guest:guest@h:5672/vh",
];

fn check_url(s: &str) {
    match StoreUrl::parse(s) {
        Ok(u) => {
            assert!(!u.scheme().is_empty());
            assert_eq!(u.scheme(), u.scheme().to_ascii_lowercase());
            let _ = (u.path(), u.query(), u.param("mode"), u.redacted());
            let _ = format!("{u} {u:?}");
            // Parsing the full text again gives the same URL.
            assert_eq!(StoreUrl::parse(u.expose_secret()).expect("again"), u);
            // The networked stores' authority: servers with ports, or a clear error.
            match u.authority(1234, "x://h:1") {
                Ok(a) => {
                    assert!(!a.endpoints.is_empty());
                    assert!(a.endpoints.iter().all(|(h, p)| !h.is_empty() && *p != 0));
                    if a.password.is_some() {
                        assert!(format!("{a:?}").contains("password: Some(\"***\")"));
                    }
                }
                Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidInput, "{s:?}: {e}"),
            }
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{s:?}: {e}");
            assert!(e.to_string().starts_with("parse: invalid store URL"), "{e}");
        }
    }
}

const VALID_DURATIONS: &[&str] = &[
    "500ms", "2s", "1m30s", "1h5m", "2", "0.25", "1.5s", "0", "3d", "10m",
];

fn check_duration(s: &str) {
    match parse_duration(s) {
        Ok(_) => {}
        Err(e) => {
            assert!(e.contains("duration"), "{s:?}: {e}");
        }
    }
}

fn holder_json() -> &'static str {
    r#"{"id":"0123456789abcdef0123456789abcdef","host":"h1","pid":4242,"pid_start":123456,"boot_id":"b0","user":"bob","command":["backup","--all"],"started_unix_ms":1700000000000,"supervisor":{"pid":4241,"start":123400}}"#
}

fn check_holder(s: &str) {
    if let Some(h) = Holder::from_json(s) {
        let again = Holder::from_json(&h.to_json().expect("encode")).expect("decode");
        assert_eq!(again, h);
    }
}

proptest! {
    // A failing case is printed, shrunk to its smallest input; no regression files.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn keys_never_panic(s in text()) {
        check_key(&s);
    }

    #[test]
    fn mutated_keys_never_panic(s in mutated(VALID_KEYS.to_vec())) {
        check_key(&s);
    }

    #[test]
    fn keys_at_the_length_limit(n in 190usize..210, c in proptest::sample::select(vec!['a', '/', '.', 'é'])) {
        let mut s = "k".repeat(n);
        s.insert(n / 2, c);
        check_key(&s);
    }

    #[test]
    fn derived_keys_are_always_valid(argv in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..6)) {
        let os: Vec<OsString> = argv.into_iter().map(OsString::from_vec).collect();
        let k = derive_key(&os);
        prop_assert!(is_valid_key(k.as_str()), "{k:?}");
        prop_assert_eq!(Key::new(k.as_str()).expect("valid"), k.clone());
        prop_assert_eq!(derive_key(&os), k);
    }

    #[test]
    fn store_urls_never_panic(s in text()) {
        check_url(&s);
    }

    #[test]
    fn mutated_store_urls_never_panic(s in mutated(VALID_URLS.to_vec())) {
        check_url(&s);
    }

    #[test]
    fn url_passwords_never_show(
        scheme in proptest::sample::select(vec!["postgres", "postgresql", "etcd", "amqp", "redis"]),
        user in "[a-z][a-z0-9_]{0,8}",
        pw in "[A-Za-z0-9._~!$'()*+,;=-]{0,12}",
        host in "[a-z][a-z0-9.-]{0,10}(:[0-9]{1,5})?",
        path in "(/[a-z0-9_]{0,8}){0,2}",
        qpw in "[A-Za-z0-9._~-]{0,12}",
    ) {
        let secret = format!("S3CR3T{pw}");
        let qsecret = format!("Q5ECR3T{qpw}");
        let url = format!("{scheme}://{user}:{secret}@{host}{path}?a=1&password={qsecret}&b=2");
        let u = StoreUrl::parse(&url).expect("valid");
        let shown = format!("{u} {u:?} {}", u.redacted());
        prop_assert!(!shown.contains("S3CR3T") && !shown.contains("Q5ECR3T"), "{}", shown);
        prop_assert!(u.expose_secret().contains(&secret));
    }

    #[test]
    fn durations_never_panic(s in text()) {
        check_duration(&s);
    }

    #[test]
    fn mutated_durations_never_panic(s in mutated(VALID_DURATIONS.to_vec())) {
        check_duration(&s);
    }

    // 23 digits: 10^22 ms is past the longest Duration (about 1.8 * 10^19 s).
    #[test]
    fn huge_durations_are_refused_not_wrapped(digits in 23usize..400, unit in proptest::sample::select(vec!["", "ms", "s", "m", "h", "d"])) {
        let s = format!("{}{unit}", "9".repeat(digits));
        prop_assert!(parse_duration(&s).is_err(), "{}", s);
    }

    #[test]
    fn holder_records_never_panic(s in text()) {
        check_holder(&s);
    }

    #[test]
    fn mutated_holder_records_never_panic(s in mutated(vec![holder_json()])) {
        check_holder(&s);
    }

    #[test]
    fn deeply_nested_holder_records_are_refused(depth in 1usize..5000) {
        let s = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        prop_assert!(Holder::from_json(&s).is_none());
        let s = format!("{{\"id\":{}", "{\"a\":".repeat(depth));
        prop_assert!(Holder::from_json(&s).is_none());
    }

    #[test]
    fn holder_ids_never_panic(s in prop_oneof![text(), "[0-9a-fA-F+-]{30,34}"]) {
        match s.parse::<HolderId>() {
            Ok(id) => prop_assert_eq!(id.to_string(), s.to_ascii_lowercase()),
            Err(e) => prop_assert_eq!(e.kind(), ErrorKind::InvalidInput),
        }
    }

    #[test]
    fn password_files_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(s) = parse_password_file(&b) {
            prop_assert!(!s.expose().is_empty());
            prop_assert!(!s.expose().contains(['\n', '\r', '\0']));
        }
    }

    #[test]
    fn pgpass_text_never_panics(
        s in prop_oneof![text(), mutated(vec!["db1:5432:locks:bob:pw\n*:*:*:*:wild\\:x\\\\\n# c\n"])],
        unix in any::<bool>(),
    ) {
        let host = if unix { PgHost::Unix(std::path::Path::new("/run/pg")) } else { PgHost::Tcp("db1") };
        let target = PgTarget { host, port: 5432, dbname: "locks", user: "bob" };
        let _ = pgpass_find(&s, &target);
    }
}

/// A password with a raw `/` or `?` (not percent-encoded, so not valid URL syntax, but
/// what a user types) never shows in `Display`: the redaction ends the password at the
/// URL's last `@`.
#[test]
fn a_raw_slash_or_question_mark_in_a_password_never_shows() {
    for url in [
        "postgres://bob:pa/S3CR3T@db1/locks",
        "postgres://bob:pa?S3CR3T@db1/locks",
        "etcd://bob:x/S3CR3T@h1:2379/baton",
    ] {
        let u = StoreUrl::parse(url).expect("parses");
        let shown = format!("{u} {u:?}");
        assert!(!shown.contains("S3CR3T"), "{shown}");
    }
}
