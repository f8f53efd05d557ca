//! baton: mutexes, counting semaphores and leader leases, each grant carrying a fencing
//! token, over a store chosen by URL.
//!
//! ```no_run
//! # async fn demo() -> baton::Result<()> {
//! use baton::StoreExt;
//! let store = baton::open("dir:/tmp/baton-demo")?;
//! let guard = store.lock(baton::Key::new("nightly-backup")?).try_acquire().await?;
//! println!("token {}", guard.lease().token);
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! Each store is a feature: `dir` and `sqlite` (both default), `postgres`, `etcd`. [`open`] picks the store
//! from the URL's scheme and says clearly when a scheme is unknown or its feature is off.
//! `noop:` is always there and is for testing the stress checkers only: it grants every
//! request, so it breaks the contract on purpose ([`noop`]).

use std::sync::Arc;

pub use baton_core::*;

pub mod noop;

/// The schemes this build knows, for error messages.
pub const SCHEMES: &[&str] = &[
    #[cfg(feature = "dir")]
    "dir",
    #[cfg(feature = "sqlite")]
    "sqlite",
    #[cfg(feature = "postgres")]
    "postgres",
    #[cfg(feature = "postgres")]
    "postgresql",
    #[cfg(feature = "etcd")]
    "etcd",
    "noop",
];

/// Stores in the design that this build does not have yet.
const PLANNED: &[&str] = &[
    #[cfg(not(feature = "sqlite"))]
    "sqlite",
    #[cfg(not(feature = "postgres"))]
    "postgres",
    #[cfg(not(feature = "postgres"))]
    "postgresql",
    #[cfg(not(feature = "etcd"))]
    "etcd",
    "zk",
    "redis",
    "amqp",
];

/// Opens the store a URL names. A bare path means `dir:PATH`.
///
/// Errors: `InvalidInput` for a malformed URL or an unknown scheme, `Unavailable` when
/// the store cannot be used (a directory that cannot be created, a foreign owner).
pub fn open(url: &str) -> Result<Arc<dyn Store>> {
    let url = StoreUrl::parse(url)?;
    open_url(&url)
}

/// Opens the store a parsed URL names.
pub fn open_url(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    match url.scheme() {
        #[cfg(feature = "dir")]
        "dir" => baton_store_dir::open(url),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(baton_store_sqlite::SqliteStore::open(url)?)),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => baton_store_postgres::open(url),
        #[cfg(feature = "etcd")]
        "etcd" => baton_store_etcd::open(url),
        "noop" => noop::open(url),
        planned if PLANNED.contains(&planned) => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the {planned} store is not built yet (this build has: {})",
                SCHEMES.join(", ")
            ),
        )
        .with_op(Op::Open)
        .with_store(url)),
        other => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "unknown store scheme '{other}' (this build has: {})",
                SCHEMES.join(", ")
            ),
        )
        .with_op(Op::Open)
        .with_store(url)),
    }
}

/// The default store: `$BATON_STORE` if set, else the default directory store
/// (`$XDG_RUNTIME_DIR/baton`, else `/tmp/baton-$UID`).
pub fn default_url() -> Result<StoreUrl> {
    match std::env::var("BATON_STORE") {
        Ok(s) if !s.trim().is_empty() => StoreUrl::parse(&s),
        _ => StoreUrl::parse(&format!("dir:{}", baton_store_dir::default_dir().display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_unbuilt_schemes_say_which() {
        let err = open("nosuch:x").expect_err("unknown");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(
            err.to_string().contains("unknown store scheme 'nosuch'"),
            "{err}"
        );
        let err = open("zk://u:secret@h/db").expect_err("unbuilt");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("not built yet"), "{err}");
        assert!(!format!("{err:#} {err:?}").contains("secret"), "{err:?}");
    }

    #[test]
    fn opens_a_directory_store() {
        let tmp = std::env::temp_dir().join(format!("baton-facade-{}", std::process::id()));
        let store = open(&format!("dir:{}", tmp.display())).expect("open");
        assert_eq!(store.url().scheme(), "dir");
        let _ = std::fs::remove_dir_all(tmp);
    }
}
