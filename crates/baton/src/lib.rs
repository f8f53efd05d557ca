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
//! Each store is a feature: `dir` and `sqlite` (both default), `postgres`, `etcd`, `zk`,
//! `redis`, `amqp`. [`open`] picks the store
//! from the URL's scheme by [`STORES`], the one registry of stores, and says clearly when a
//! scheme is unknown or its store is not in this build.
//! `noop:` is always there and is for testing the stress checkers only: it grants every
//! request, so it breaks the contract on purpose ([`noop`]).

use std::sync::Arc;

pub use baton_core::*;

pub mod noop;

/// Opens a store from its URL.
pub type OpenFn = fn(&StoreUrl) -> Result<Arc<dyn Store>>;

/// One store of the design: its URL schemes, an example URL, what it is, and how to open
/// it when this build has it. [`STORES`] is the one list that [`open`], the CLI's
/// `--help` and the "this build has" messages are made from; a test checks that the
/// README's store table names every entry.
#[derive(Clone, Copy, Debug)]
pub struct StoreKind {
    /// The URL schemes it answers to (the first is its name).
    pub schemes: &'static [&'static str],
    /// An example URL, as the README's store table writes it.
    pub example: &'static str,
    /// What it is, in a few words.
    pub summary: &'static str,
    /// How to open it; `None` when this build does not have it (its feature is off, or
    /// it is not built yet).
    pub open: Option<OpenFn>,
    /// Designed but not built yet in any build.
    pub planned: bool,
}

impl StoreKind {
    /// The store's name: its first scheme.
    pub fn name(&self) -> &'static str {
        self.schemes[0]
    }
}

/// Every store of the design, built or not, in the order the docs list them.
pub const STORES: &[StoreKind] = &[
    StoreKind {
        schemes: &["dir"],
        example: "dir:PATH[?mode=lease]",
        summary: "kernel locks; ?mode=lease: lease files (NFS)",
        #[cfg(feature = "dir")]
        open: Some(baton_store_dir::open),
        #[cfg(not(feature = "dir"))]
        open: None,
        planned: false,
    },
    StoreKind {
        schemes: &["sqlite"],
        example: "sqlite:/abs/path.db",
        summary: "lease rows in a SQLite file, FIFO",
        #[cfg(feature = "sqlite")]
        open: Some(baton_store_sqlite::open_store),
        #[cfg(not(feature = "sqlite"))]
        open: None,
        planned: false,
    },
    StoreKind {
        schemes: &["postgres", "postgresql"],
        example: "postgres://user@host:5432/db",
        summary: "lease rows on PostgreSQL, FIFO",
        #[cfg(feature = "postgres")]
        open: Some(baton_store_postgres::open),
        #[cfg(not(feature = "postgres"))]
        open: None,
        planned: false,
    },
    StoreKind {
        schemes: &["etcd"],
        example: "etcd://h1:2379,h2:2379",
        summary: "etcd leases, FIFO",
        #[cfg(feature = "etcd")]
        open: Some(baton_store_etcd::open),
        #[cfg(not(feature = "etcd"))]
        open: None,
        planned: false,
    },
    StoreKind {
        schemes: &["zk"],
        example: "zk://h1:2181,h2:2181/prefix",
        summary: "ZooKeeper ephemeral sequential nodes, FIFO",
        #[cfg(feature = "zk")]
        open: Some(baton_store_zk::open),
        #[cfg(not(feature = "zk"))]
        open: None,
        planned: false,
    },
    StoreKind {
        schemes: &["redis"],
        example: "redis://host:6379/0",
        summary: "Redis leases with renewal counters, FIFO",
        #[cfg(feature = "redis")]
        open: Some(baton_store_redis::open),
        #[cfg(not(feature = "redis"))]
        open: None,
        planned: false,
    },
    StoreKind {
        schemes: &["amqp"],
        example: "amqp://user:pass@host:5672/vhost",
        summary: "RabbitMQ gate and slot queues, FIFO",
        #[cfg(feature = "amqp")]
        open: Some(baton_store_amqp::open),
        #[cfg(not(feature = "amqp"))]
        open: None,
        planned: false,
    },
    StoreKind {
        schemes: &["noop"],
        example: "noop:",
        summary: "grants all: tests stress checkers only",
        open: Some(noop::open),
        planned: false,
    },
];

/// The stores this build has.
pub fn built() -> impl Iterator<Item = &'static StoreKind> {
    STORES.iter().filter(|k| k.open.is_some())
}

/// The schemes this build has, comma-separated, for messages.
pub fn built_schemes() -> String {
    built()
        .flat_map(|k| k.schemes.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Opens the store a URL names. A bare path means `dir:PATH`.
///
/// Errors: `InvalidInput` for a malformed URL or an unknown scheme, `Unsupported` for a
/// store this build does not have, `Unavailable` when the store cannot be used (a
/// directory that cannot be created, a foreign owner).
pub fn open(url: &str) -> Result<Arc<dyn Store>> {
    let url = StoreUrl::parse(url)?;
    open_url(&url)
}

/// Opens the store a parsed URL names.
pub fn open_url(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    let scheme = url.scheme();
    match STORES.iter().find(|k| k.schemes.contains(&scheme)) {
        Some(StoreKind {
            open: Some(open), ..
        }) => open(url),
        Some(kind) => Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "the {} store is {} (this build has: {})",
                kind.name(),
                if kind.planned {
                    "not built yet"
                } else {
                    "not in this build (its cargo feature is off)"
                },
                built_schemes()
            ),
        )
        .with_op(Op::Open)
        .with_store(url)),
        None => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "unknown store scheme '{scheme}' (this build has: {})",
                built_schemes()
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
        // A store whose feature is off in this build (the facade's tests run with the
        // default features).
        #[cfg(not(feature = "amqp"))]
        {
            let err = open("amqp://u:secret@h/vhost").expect_err("not in this build");
            assert_eq!(err.kind(), ErrorKind::Unsupported);
            assert!(err.to_string().contains("not in this build"), "{err}");
            assert!(!format!("{err:#} {err:?}").contains("secret"), "{err:?}");
        }
    }

    /// The README's store table names every store of the registry by its example URL's
    /// scheme, and says which are not built yet.
    #[test]
    fn the_readme_store_table_agrees_with_the_registry() {
        let readme = include_str!("../../../README.md");
        let table: Vec<&str> = readme
            .lines()
            .skip_while(|l| !l.starts_with("## Stores"))
            .take_while(|l| !l.starts_with("## ") || l.starts_with("## Stores"))
            .filter(|l| l.starts_with('|'))
            .collect();
        for kind in STORES {
            let scheme = kind.name();
            let row = table
                .iter()
                .find(|l| l.contains(&format!("`{scheme}:")))
                .unwrap_or_else(|| panic!("the README's store table has no row for {scheme}:"));
            if kind.planned {
                assert!(
                    row.contains("not built yet"),
                    "the README's row for {scheme}: must say it is not built yet: {row}"
                );
            }
        }
        for row in &table {
            if let Some(i) = row.find("://") {
                let before = &row[..i];
                let scheme = before
                    .rsplit(|c: char| !c.is_ascii_alphanumeric())
                    .next()
                    .unwrap_or("");
                assert!(
                    STORES.iter().any(|k| k.schemes.contains(&scheme)),
                    "the README's store table names {scheme}://, which the registry does not know"
                );
            }
        }
    }

    #[test]
    fn opens_a_directory_store() {
        let tmp = std::env::temp_dir().join(format!("baton-facade-{}", std::process::id()));
        let store = open(&format!("dir:{}", tmp.display())).expect("open");
        assert_eq!(store.url().scheme(), "dir");
        let _ = std::fs::remove_dir_all(tmp);
    }
}
