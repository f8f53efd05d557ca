//! The SQLite store's URL parser never panics and refuses what it cannot read with
//! `InvalidInput`. Inputs are arbitrary text after the scheme and mutations of valid URLs
//! (truncation, byte flips, NULs, unicode, huge numbers), bounded in size.

use baton_core::{Error, ErrorKind, StoreUrl};
use baton_store_sqlite::SqliteConfig;
use proptest::prelude::*;

#[path = "../../baton-core/tests/support/mutate.rs"]
mod mutate;
use mutate::{mutated, text};

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
