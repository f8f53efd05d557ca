//! `amqp://user:pass@host:5672/vhost[?prefix=baton&timeout=5s&password_file=PATH]`,
//! parsed from the store URL.
//!
//! The vhost is the path after the host, percent-decoded (`%2f` is `/`, RabbitMQ's
//! default vhost; an empty path is `/` too). The password comes from the URL, else the
//! file `?password_file=` names (private to its owner, or refused); without either, the
//! user and password are `guest`. `Debug` hides the password.

use std::fmt;
use std::time::Duration;

use baton_core::secret::{self, PasswordSources, Secret};
use baton_core::{parse_duration, percent_decode, Error, ErrorKind, Op, StoreUrl};

/// The prefix of every queue baton declares when the URL names none.
pub const DEFAULT_PREFIX: &str = "baton";

/// The RabbitMQ store's configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpConfig {
    /// The broker's host.
    pub host: String,
    /// Its AMQP port (5672 unless the URL gives one).
    pub port: u16,
    /// The user (`guest` unless the URL gives one).
    pub user: String,
    /// The password (`guest` unless the URL gives one).
    pub password: String,
    /// The virtual host.
    pub vhost: String,
    /// The first part of every queue name (`?prefix=`, `[A-Za-z0-9_-]`, at most 32).
    pub prefix: String,
    /// The bound on one request and on connecting (`?timeout=`, default 5s).
    pub timeout: Duration,
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"***")
            .field("vhost", &self.vhost)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl AmqpConfig {
    /// The broker's address for lapin, with this heartbeat timeout (seconds) if one is
    /// given, and the connect bounded by `timeout`.
    pub fn uri(&self, heartbeat: Option<u16>) -> lapin::uri::AMQPUri {
        use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
        AMQPUri {
            scheme: AMQPScheme::AMQP,
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: self.user.clone(),
                    password: self.password.clone(),
                },
                host: self.host.clone(),
                port: self.port,
            },
            vhost: self.vhost.clone(),
            query: AMQPQueryString {
                heartbeat,
                connection_timeout: Some(self.timeout.as_millis() as u64),
                ..AMQPQueryString::default()
            },
        }
    }

    /// Parses an `amqp://` URL. Options: `prefix`, `timeout` (a duration such as `5s`),
    /// `password_file`.
    pub fn from_url(url: &StoreUrl) -> Result<AmqpConfig, Error> {
        let bad = |why: String| {
            Error::new(ErrorKind::InvalidInput, why)
                .with_op(Op::Open)
                .with_store(url)
        };
        if url.scheme() != "amqp" {
            return Err(bad(format!(
                "not a RabbitMQ store URL (scheme '{}', expected amqp://user:pass@host:5672/vhost)",
                url.scheme()
            )));
        }
        secret::check_user_info(url)?;
        let a = url.authority(5672, "amqp://guest:guest@127.0.0.1:5672/%2f")?;
        if a.endpoints.len() != 1 {
            return Err(bad(
                "the RabbitMQ store connects to one broker (one host:port)".into(),
            ));
        }
        let (host, port) = a.endpoints[0].clone();
        let vhost = if a.path.is_empty() {
            "/".to_owned()
        } else {
            percent_decode(&a.path)
                .ok_or_else(|| bad("the vhost is not valid percent-encoded UTF-8".into()))?
        };
        let mut prefix = DEFAULT_PREFIX.to_owned();
        let mut timeout = Duration::from_secs(5);
        for (name, value) in url.query() {
            match name {
                "prefix" => {
                    let ok = !value.is_empty()
                        && value.len() <= 32
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
                    if !ok {
                        return Err(bad(format!(
                            "the prefix must be 1 to 32 of [A-Za-z0-9_-], not '{value}'"
                        )));
                    }
                    prefix = value.to_owned();
                }
                secret::PASSWORD_FILE_PARAM => {}
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
                        "unknown option '{other}' (the RabbitMQ store knows: prefix, timeout, \
                         password_file)"
                    )))
                }
            }
        }
        let sources = PasswordSources {
            url: a.password.clone().map(Secret::new),
            file: secret::password_file_param(url)?,
            env: Vec::new(),
        };
        let password = sources
            .resolve(&secret::process_env)
            .map_err(|e| e.context(Op::Open, None, url))?
            .map(|(p, _)| p.expose().to_owned());
        Ok(AmqpConfig {
            host,
            port,
            user: a.user.unwrap_or_else(|| "guest".into()),
            password: password.unwrap_or_else(|| "guest".into()),
            vhost,
            prefix,
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AmqpConfig, Error> {
        AmqpConfig::from_url(&StoreUrl::parse(s).expect("url"))
    }

    #[test]
    fn host_vhost_and_options() {
        let c = parse("amqp://u:p%40ss@h:1234/v%2fx?prefix=t-1&timeout=2s").expect("config");
        assert_eq!((c.host.as_str(), c.port), ("h", 1234));
        assert_eq!((c.user.as_str(), c.password.as_str()), ("u", "p@ss"));
        assert_eq!(c.vhost, "v/x");
        assert_eq!(c.prefix, "t-1");
        assert_eq!(c.timeout, Duration::from_secs(2));
        let d = parse("amqp://h").expect("config");
        assert_eq!(
            (d.vhost.as_str(), d.port, d.user.as_str()),
            ("/", 5672, "guest")
        );
        assert_eq!(parse("amqp://h/%2f").expect("config").vhost, "/");
        assert!(!format!("{c:?}").contains("p@ss"));
    }

    #[test]
    fn bad_urls_are_clear_errors() {
        for u in [
            "amqp://h1,h2",
            "amqp://h?prefix=a.b",
            "amqp://h?timeout=never",
            "amqp://h?colour=red",
            "amqps://h",
            "amqp:h",
        ] {
            let e = parse(u).expect_err(u);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{u}: {e}");
        }
    }
}
