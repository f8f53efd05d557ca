//! `zk://h1[:2181],h2[:2181]/prefix[?timeout=5s]`, parsed from the store URL.
//!
//! `ZKHOSTS` (lockex's variable) is not read: the URL names the servers.

use std::time::Duration;

use baton_core::{parse_duration, Error, ErrorKind, Op, StoreUrl};

/// The znode under which baton keeps everything when the URL names no prefix.
pub const DEFAULT_PREFIX: &str = "baton";

/// The ZooKeeper store's configuration (it has no secrets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZkConfig {
    /// `h1:p1,h2:p2`, as the client connects to it.
    pub hosts: String,
    /// The path of baton's root znode, `/PREFIX` (nested prefixes allowed: `a/b`).
    pub root: String,
    /// The bound on one round trip and on connecting (`?timeout=`, default 5s).
    pub timeout: Duration,
}

impl ZkConfig {
    /// Parses a `zk://` URL. Options: `timeout` (a duration such as `500ms`, `5s`).
    pub fn from_url(url: &StoreUrl) -> Result<ZkConfig, Error> {
        let bad = |why: String| {
            Error::new(ErrorKind::InvalidInput, why)
                .with_op(Op::Open)
                .with_store(url)
        };
        if url.scheme() != "zk" {
            return Err(bad(format!(
                "not a ZooKeeper store URL (scheme '{}', expected zk://host:2181/prefix)",
                url.scheme()
            )));
        }
        let authority = url.authority(2181, "zk://127.0.0.1:2181/baton")?;
        if authority.user.is_some() || authority.password.is_some() {
            return Err(bad(
                "ZooKeeper authentication (user:password@) is not supported by baton's \
                 ZooKeeper store"
                    .into(),
            ));
        }
        let hosts = authority
            .endpoints
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let path = authority.path.trim_matches('/');
        let prefix = if path.is_empty() {
            DEFAULT_PREFIX
        } else {
            path
        };
        let ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s != "zookeeper"
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if !prefix.split('/').all(ok) {
            return Err(bad(format!(
                "the prefix must be names of [A-Za-z0-9._-] separated by '/' (not 'zookeeper', \
                 '.' or '..'), not '{prefix}'"
            )));
        }
        let mut timeout = Duration::from_secs(5);
        for (name, value) in url.query() {
            match name {
                "timeout" => {
                    timeout = parse_duration(value)
                        .ok()
                        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(600))
                        .ok_or_else(|| {
                            bad(format!(
                                "timeout must be a duration between 1ms and 10m, such as 5s, \
                                 not '{value}'"
                            ))
                        })?;
                }
                other => {
                    return Err(bad(format!(
                        "unknown option '{other}' (the ZooKeeper store knows: timeout)"
                    )))
                }
            }
        }
        Ok(ZkConfig {
            hosts,
            root: format!("/{prefix}"),
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ZkConfig, Error> {
        ZkConfig::from_url(&StoreUrl::parse(s).expect("url"))
    }

    #[test]
    fn hosts_prefix_and_timeout() {
        let c = parse("zk://h1:1,h2/a/b?timeout=2s").expect("config");
        assert_eq!(c.hosts, "h1:1,h2:2181");
        assert_eq!(c.root, "/a/b");
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(parse("zk://h").expect("config").root, "/baton");
    }

    #[test]
    fn bad_urls_are_clear_errors() {
        for u in [
            "zk://h/zookeeper",
            "zk://h/a/../b",
            "zk://h/a b",
            "zk://h?timeout=never",
            "zk://h?colour=red",
            "zk://u:p@h",
            "zk:h",
        ] {
            let e = parse(u).expect_err(u);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{u}: {e}");
        }
    }
}
