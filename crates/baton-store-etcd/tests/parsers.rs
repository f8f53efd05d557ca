//! The etcd store's URL parser never panics and refuses what it cannot read with
//! `InvalidInput` (or `Unavailable`, for a `password_file` that cannot be opened),
//! never echoing the URL's password. Inputs are arbitrary text after the scheme and
//! mutations of valid URLs (truncation, byte flips, NULs, unicode, huge numbers), bounded
//! in size.

use baton_core::{Error, ErrorKind, StoreUrl};
use baton_store_etcd::EtcdConfig;
use proptest::prelude::*;

#[path = "../../baton-core/tests/support/mutate.rs"]
mod mutate;
use mutate::{mutated, text};

const VALID: &[&str] = &[
    "etcd://h1:2379,h2:2380",
    "etcd://bob:hunter2@10.0.0.1/locks/prod/?timeout=2s&connect_timeout=500ms",
    "etcd://bob:s%40hunter2@[::1]:2379/p",
    "etcd://bob@h1:2379?password_file=/nonexistent/etcd.pass",
    "etcd://h1",
];

fn parse(url: &StoreUrl) -> Result<EtcdConfig, Error> {
    EtcdConfig::from_url_env(url, &|_| None)
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
    fn arbitrary_text_after_the_scheme_never_panics(s in text(), slashes in any::<bool>(), scheme in proptest::sample::select(vec!["etcd"])) {
        check(&format!("{scheme}:{}{s}", if slashes { "//" } else { "" }));
    }

    #[test]
    fn mutated_urls_never_panic(s in mutated(VALID.to_vec())) {
        check(&s);
    }
}
