//! `sqlite:/abs/path/to/file.db[?unsafe_network_fs=1]`, parsed from the store URL.

use std::path::PathBuf;

use baton_core::{Error, ErrorKind, Op, StoreUrl};

/// The SQLite store's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteConfig {
    /// The database file: an absolute path. The file and its parent directory are created
    /// if missing.
    pub path: PathBuf,
    /// Use the file even when it lies on a network filesystem (NFS, SMB, Lustre, 9p,
    /// FUSE), where SQLite's WAL mode is unsafe across hosts. Only for a filesystem the
    /// user knows to be local to one host (a FUSE overlay in a rootless container).
    pub unsafe_network_fs: bool,
}

impl SqliteConfig {
    /// Parses `sqlite:/abs/path` (also spelled `sqlite:///abs/path`). The only query
    /// parameter is `unsafe_network_fs` (`1`/`true` or `0`/`false`). Relative paths are
    /// refused: a lock file must not depend on the current directory of each process.
    pub fn from_url(url: &StoreUrl) -> Result<SqliteConfig, Error> {
        let bad = |why: String| {
            Error::new(ErrorKind::InvalidInput, why)
                .with_op(Op::Open)
                .with_store(url)
        };
        if url.scheme() != "sqlite" {
            return Err(bad(format!(
                "not a SQLite store URL (scheme '{}', expected sqlite:/abs/path.db)",
                url.scheme()
            )));
        }
        let mut unsafe_network_fs = false;
        for (name, value) in url.query() {
            match (name, value) {
                ("unsafe_network_fs", "1" | "true") => unsafe_network_fs = true,
                ("unsafe_network_fs", "0" | "false") => unsafe_network_fs = false,
                ("unsafe_network_fs", other) => {
                    return Err(bad(format!(
                        "unsafe_network_fs must be 1 or 0, not '{other}'"
                    )))
                }
                (other, _) => {
                    return Err(bad(format!(
                        "unknown parameter '{other}' (known: unsafe_network_fs)"
                    )))
                }
            }
        }
        let raw = url.path();
        // `sqlite:///abs` is the spelling some tools use for an absolute path; an
        // authority (`sqlite://host/x`) is not a thing for a local file and stays refused.
        let raw = match raw.strip_prefix("//") {
            Some(rest) if rest.starts_with('/') => rest,
            _ => raw,
        };
        if raw.starts_with("//") {
            return Err(bad(format!(
                "'{raw}' names a host; the SQLite store is a local file                  (example: sqlite:/var/lib/baton/locks.db)"
            )));
        }
        if raw.is_empty() {
            return Err(bad(
                "no database file given (example: sqlite:/var/lib/baton/locks.db)".into(),
            ));
        }
        let path = PathBuf::from(raw);
        if !path.is_absolute() {
            return Err(bad(format!(
                "the database file must be an absolute path, not '{raw}' \
                 (example: sqlite:/var/lib/baton/locks.db)"
            )));
        }
        if path.file_name().is_none() || raw.ends_with('/') {
            return Err(bad(format!(
                "'{raw}' names a directory; give the database file (example: sqlite:{}locks.db)",
                if raw.ends_with('/') {
                    raw
                } else {
                    "/var/lib/baton/"
                }
            )));
        }
        Ok(SqliteConfig {
            path,
            unsafe_network_fs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(u: &str) -> Result<SqliteConfig, Error> {
        SqliteConfig::from_url(&StoreUrl::parse(u).expect("url"))
    }

    #[test]
    fn parses_paths_and_the_override() {
        let cfg = parse("sqlite:/var/lib/x.db").expect("cfg");
        assert_eq!(cfg.path, PathBuf::from("/var/lib/x.db"));
        assert!(!cfg.unsafe_network_fs);
        let cfg = parse("sqlite:///var/lib/x.db?unsafe_network_fs=1").expect("cfg");
        assert_eq!(cfg.path, PathBuf::from("/var/lib/x.db"));
        assert!(cfg.unsafe_network_fs);
    }

    #[test]
    fn refuses_relative_paths_and_unknown_parameters() {
        for u in [
            "sqlite:x.db",
            "sqlite:./x.db",
            "sqlite:",
            "sqlite://host/x.db",
            "sqlite:/var/lib/",
            "sqlite:/x.db?mode=wal",
            "sqlite:/x.db?unsafe_network_fs=maybe",
            "dir:/x",
        ] {
            let err = parse(u).expect_err(u);
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{u}: {err}");
        }
        let err = parse("sqlite:x.db").expect_err("relative");
        assert!(err.to_string().contains("absolute path"), "{err}");
    }
}
