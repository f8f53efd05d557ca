//! The SQLite store's URL parser never panics and refuses what it cannot read with
//! `InvalidInput`. Inputs are arbitrary text after the scheme and mutations of valid URLs
//! (truncation, byte flips, NULs, unicode, huge numbers), bounded in size.

use baton_core::{Error, ErrorKind, StoreUrl};
use baton_store_sqlite::SqliteConfig;
use proptest::prelude::*;

/// Pieces a mutation inserts: the bytes parsers trip on.
const NASTY: &[&str] = &[
    "\0",
    "\u{7f}",
    "\u{e9}",
    "\u{202e}",
    "\u{1f600}",
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
    "[",
    "]",
    ",",
    " ",
    "\n",
    "1e999",
    "0",
];

/// One mutation of a valid example: truncated, a byte flipped, a nasty piece inserted,
/// or its tail repeated; the bytes are then read as UTF-8, lossily.
fn mutated(valid: Vec<&'static str>) -> impl Strategy<Value = String> {
    (
        proptest::sample::select(valid),
        0usize..4,
        any::<prop::sample::Index>(),
        any::<u8>(),
        proptest::sample::select(NASTY.to_vec()),
        1usize..8,
    )
        .prop_map(|(seed, how, at, byte, piece, times)| {
            let mut b = seed.as_bytes().to_vec();
            let i = at.index(b.len() + 1);
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

/// Arbitrary text, bounded: any unicode, or mostly the characters a URL splits on.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,200}",
        "[a-z0-9./_:@?&=%,\\[\\] -]{0,200}",
        proptest::collection::vec(any::<u8>(), 0..200)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

const VALID: &[&str] = &[
    "sqlite:/var/lib/x.db",
    "sqlite:///var/lib/x.db?unsafe_network_fs=1",
    "sqlite:/x.db?unsafe_network_fs=false",
    "sqlite:/var/lib/baton/locks.db",
];

fn parse(url: &StoreUrl) -> Result<SqliteConfig, Error> {
    SqliteConfig::from_url(url)
}

fn check(text: &str) {
    let Ok(url) = StoreUrl::parse(text) else {
        return;
    };
    match parse(&url) {
        Ok(cfg) => {
            let shown = format!("{cfg:?}");
            assert!(
                !shown.contains("hunter2") || url.redacted().contains("hunter2"),
                "{shown}"
            );
        }
        Err(e) => {
            let file = url.param("password_file").is_some();
            assert!(
                e.kind() == ErrorKind::InvalidInput || (file && e.kind() == ErrorKind::Unavailable),
                "{text:?}: {e:?}"
            );
            let shown = format!("{e:#} {e:?}");
            assert!(
                !shown.contains("hunter2") || url.redacted().contains("hunter2"),
                "{text:?}: {shown}"
            );
        }
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
    fn arbitrary_text_after_the_scheme_never_panics(s in text(), slashes in any::<bool>(), scheme in proptest::sample::select(vec!["sqlite"])) {
        check(&format!("{scheme}:{}{s}", if slashes { "//" } else { "" }));
    }

    #[test]
    fn mutated_urls_never_panic(s in mutated(VALID.to_vec())) {
        check(&s);
    }
}
