//! `redis://[user[:password]@]host[:port][/db][?options]`, parsed from the store URL.
//!
//! The password, by [`baton_core::secret`]'s order: the URL's, else the file
//! `?password_file=PATH` names (private to its owner, or refused), else `REDISCLI_AUTH`
//! (redis-cli's variable). `Debug` never shows it.

use std::fmt;
use std::time::Duration;

use baton_core::secret::{self, EnvLookup, PasswordSource, PasswordSources, Secret};
use baton_core::{parse_duration, Error, ErrorKind, Op, StoreUrl};

/// The key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "baton";

/// What the store asks of the server's persistence before it hands out tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `appendonly yes` and `appendfsync always`, or the store refuses to run (the
    /// default): only then does a token survive a crash of the server.
    Require,
    /// Whatever the server does: tokens and leases may go back after a server crash.
    Off,
}

/// The Redis store's configuration. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `host:port` of the server.
    pub host: String,
    /// The TCP port.
    pub port: u16,
    /// The database number (`/0` when the URL names none).
    pub db: i64,
    /// User (Redis 6 ACL) and password.
    pub user: Option<String>,
    /// The password, if any.
    pub password: Option<String>,
    /// Where the password came from.
    pub password_source: Option<PasswordSource>,
    /// Every Redis key baton writes starts with `PREFIX:` (`?prefix=`, default `baton`).
    pub prefix: String,
    /// The bound on one round trip (`?timeout=`, default 5s); also the connect timeout.
    pub timeout: Duration,
    /// What the server's persistence must be (`?durable=require|off`).
    pub durable: Durability,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("db", &self.db)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("password_source", &self.password_source)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("durable", &self.durable)
            .finish()
    }
}

impl RedisConfig {
    /// Parses a `redis://` URL. Options: `timeout` (a duration such as `500ms`, `5s`),
    /// `prefix`, `durable` (`require`, the default, or `off`) and `password_file`.
    pub fn from_url(url: &StoreUrl) -> Result<RedisConfig, Error> {
        RedisConfig::from_url_env(url, &secret::process_env)
    }

    /// [`RedisConfig::from_url`] reading `REDISCLI_AUTH` through `env`.
    pub fn from_url_env(url: &StoreUrl, env: EnvLookup<'_>) -> Result<RedisConfig, Error> {
        let bad = |why: String| {
            Error::new(ErrorKind::InvalidInput, why)
                .with_op(Op::Open)
                .with_store(url)
        };
        match url.scheme() {
            "redis" => {}
            "rediss" => {
                return Err(bad(
                    "TLS (rediss://) is not supported by baton's Redis store; use redis:// on a \
                     trusted network or a TLS tunnel"
                        .into(),
                ))
            }
            s if s.starts_with("redis+sentinel") || s == "redis-sentinel" => {
                return Err(bad(
                    "Redis Sentinel is not supported: a failover to an asynchronous replica can \
                     lose granted leases and tokens; point baton at one primary (redis://host:6379/0)"
                        .into(),
                ))
            }
            other => {
                return Err(bad(format!(
                    "not a Redis store URL (scheme '{other}', expected redis://host:6379/0)"
                )))
            }
        }
        secret::check_user_info(url)?;
        let authority = url.authority(6379, "redis://127.0.0.1:6379/0")?;
        if authority.endpoints.len() > 1 {
            return Err(bad(
                "several hosts: Redis Cluster and replica sets are not supported (one primary only; \
                 see the store's README)"
                    .into(),
            ));
        }
        // `redis://:password@host` is the usual form without a user.
        let user = authority.user.filter(|u| !u.is_empty());
        let url_password = authority.password;
        let (host, port) = authority.endpoints[0].clone();
        let path = authority.path;
        let db_text = path.trim_start_matches('/').trim_end_matches('/');
        let db = if db_text.is_empty() {
            0
        } else {
            db_text
                .parse::<i64>()
                .ok()
                .filter(|d| (0..=100_000).contains(d))
                .ok_or_else(|| {
                    bad(format!(
                        "the database must be a number such as /0, not '/{db_text}'"
                    ))
                })?
        };
        let file = secret::password_file_param(url)?;
        let sources = PasswordSources {
            url: url_password.map(Secret::new),
            file,
            env: vec!["REDISCLI_AUTH"],
        };
        let found = sources
            .resolve(env)
            .map_err(|e| e.context(Op::Open, None, url))?;
        let (password, password_source) = match found {
            Some((p, s)) => (Some(p.expose().to_owned()), Some(s)),
            None => (None, None),
        };
        if user.is_some() && password.is_none() {
            return Err(bad(format!(
                "user '{}' needs a password: ?password_file=PATH, REDISCLI_AUTH, or \
                 redis://user:password@host:6379/0 in BATON_STORE",
                user.as_deref().unwrap_or_default()
            )));
        }
        let mut config = RedisConfig {
            host,
            port,
            db,
            user,
            password,
            password_source,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: Duration::from_secs(5),
            durable: Durability::Require,
        };
        for (name, value) in url.query() {
            match name {
                "timeout" => {
                    config.timeout = parse_duration(value)
                        .ok()
                        .filter(|d| {
                            *d >= Duration::from_millis(10) && *d <= Duration::from_secs(600)
                        })
                        .ok_or_else(|| {
                            bad(format!(
                                "timeout must be a duration between 10ms and 10m (like 500ms or \
                                 5s), not '{value}'"
                            ))
                        })?
                }
                "prefix" => {
                    if value.is_empty()
                        || value.len() > 100
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
                    {
                        return Err(bad(format!(
                            "the prefix '{value}' must be 1-100 letters, digits, '.', '_' or '-'"
                        )));
                    }
                    config.prefix = value.to_owned();
                }
                "durable" => {
                    config.durable = match value {
                        "require" | "yes" | "true" => Durability::Require,
                        "off" | "no" | "false" => Durability::Off,
                        _ => {
                            return Err(bad(format!(
                                "durable must be 'require' or 'off', not '{value}'"
                            )))
                        }
                    }
                }
                secret::PASSWORD_FILE_PARAM => {}
                other => {
                    return Err(bad(format!(
                        "unknown parameter '{other}' (known: timeout, prefix, durable, \
                         password_file)"
                    )))
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(u: &str) -> Result<RedisConfig, Error> {
        RedisConfig::from_url_env(&StoreUrl::parse(u).expect("url"), &|_| None)
    }

    #[test]
    fn parses_host_db_user_and_options() {
        let c = parse("redis://127.0.0.1:6390/3").expect("cfg");
        assert_eq!((c.host.as_str(), c.port, c.db), ("127.0.0.1", 6390, 3));
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        assert_eq!(c.durable, Durability::Require);
        let c = parse("redis://bob:s%40cret@h/?timeout=2s&prefix=t-1&durable=off").expect("cfg");
        assert_eq!((c.host.as_str(), c.port, c.db), ("h", 6379, 0));
        assert_eq!(c.user.as_deref(), Some("bob"));
        assert_eq!(c.password.as_deref(), Some("s@cret"));
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.durable, Durability::Off);
        assert!(!format!("{c:?}").contains("cret"));
        let c = parse("redis://:pw@h:1").expect("cfg");
        assert_eq!((c.user, c.password.as_deref()), (None, Some("pw")));
    }

    #[test]
    fn refuses_bad_urls() {
        for u in [
            "redis:h:6379",
            "redis://",
            "redis://h:notaport",
            "redis://h:0",
            "redis://h:6379/zero",
            "redis://h:6379/-1",
            "redis://h:6379?timeout=forever",
            "redis://h:6379?color=blue",
            "redis://h:6379?prefix=a%7Bb",
            "redis://h:6379?durable=maybe",
            "redis://bob@h:6379",
            "redis://h1:6379,h2:6379",
            "rediss://h:6379",
            "redis+sentinel://h:26379/mymaster",
            "redis://h 1:6379",
            "dir:/x",
        ] {
            let Ok(url) = StoreUrl::parse(u) else {
                continue;
            };
            let err = RedisConfig::from_url_env(&url, &|_| None).expect_err(u);
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{u}: {err}");
        }
    }
}
