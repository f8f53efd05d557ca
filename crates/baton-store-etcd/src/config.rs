//! `etcd://[user[:password]@]h1:2379[,h2:2379...][/prefix][?options]`, parsed from the
//! store URL.
//!
//! The credentials, as etcdctl reads them and by [`baton_core::secret`]'s order: the user
//! is the URL's, else the one `ETCDCTL_USER` names (`user` or `user:password`); the
//! password is the URL's, else the file `?password_file=PATH` names (private to its owner,
//! or refused), else the one `ETCDCTL_USER` gives with its user (only when the URL names
//! no other user), else `ETCDCTL_PASSWORD`. A user without a password, or a password
//! without a user, is refused.

use std::fmt;
use std::time::Duration;

use baton_core::secret::{self, EnvLookup, PasswordSource, PasswordSources, Secret};
use baton_core::{parse_duration, Error, ErrorKind, Op, StoreUrl};

/// The key prefix when the URL names none.
pub const DEFAULT_PREFIX: &str = "/baton";

/// The etcd store's configuration. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// The members' client endpoints, `host:port`, in the order given; the store starts
    /// with the first and moves to the next when one fails.
    pub endpoints: Vec<String>,
    /// Every key baton writes lies under this prefix (no trailing `/`).
    pub prefix: String,
    /// User and password for etcd's authentication, from the URL, its password file or
    /// etcdctl's environment (see the module doc).
    pub user: Option<(String, String)>,
    /// Where the password came from (`None`: no authentication).
    pub password_source: Option<PasswordSource>,
    /// The bound on one request to one member (`?timeout=`, default 5s).
    pub timeout: Duration,
    /// The bound on opening a connection to one member (`?connect_timeout=`, default 2s).
    pub connect_timeout: Duration,
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("user", &self.user.as_ref().map(|(u, _)| (u, "***")))
            .field("password_source", &self.password_source)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl EtcdConfig {
    /// Parses an `etcd://` URL. Options: `timeout` and `connect_timeout` (durations such
    /// as `500ms`, `5s`) and `password_file`.
    pub fn from_url(url: &StoreUrl) -> Result<EtcdConfig, Error> {
        EtcdConfig::from_url_env(url, &secret::process_env)
    }

    /// [`EtcdConfig::from_url`] reading `ETCDCTL_USER` and `ETCDCTL_PASSWORD` through
    /// `env` instead of the process environment.
    pub fn from_url_env(url: &StoreUrl, env: EnvLookup<'_>) -> Result<EtcdConfig, Error> {
        let bad = |why: String| url.invalid(why);
        url.expect_scheme(&["etcd"], "an etcd", "etcd://host:2379[/prefix]")?;
        secret::check_user_info(url)?;
        let example = "etcd://10.0.0.1:2379,10.0.0.2:2379/baton";
        let authority = url.authority(2379, example)?;
        if authority.user.as_deref() == Some("") {
            return Err(bad("the user name is empty".into()));
        }
        let (url_user, url_password) = (authority.user, authority.password);
        let endpoints: Vec<String> = authority
            .endpoints
            .iter()
            .map(|(host, port)| format!("{host}:{port}"))
            .collect();
        let path = format!("/{}", authority.path);
        let prefix = path.trim_end_matches('/');
        let prefix = if prefix.is_empty() {
            DEFAULT_PREFIX.to_owned()
        } else {
            if !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'))
            {
                return Err(bad(format!(
                    "the key prefix '{prefix}' may only hold letters, digits, '/', '.', '_' and '-'"
                )));
            }
            prefix.to_owned()
        };
        let (user, password_source) = credentials(url, url_user, url_password, env)
            .map_err(|e| e.context(Op::Open, None, url))?;
        let mut config = EtcdConfig {
            endpoints,
            prefix,
            user,
            password_source,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        };
        for (name, value) in url.query() {
            let d = || {
                parse_duration(value)
                    .ok()
                    .filter(|d| *d >= Duration::from_millis(10) && *d <= Duration::from_secs(600))
                    .ok_or_else(|| {
                        bad(format!(
                            "{name} must be a duration between 10ms and 10m (like 500ms or 5s), not '{value}'"
                        ))
                    })
            };
            match name {
                "timeout" => config.timeout = d()?,
                "connect_timeout" => config.connect_timeout = d()?,
                secret::PASSWORD_FILE_PARAM => {}
                other => {
                    return Err(bad(format!(
                        "unknown parameter '{other}' (known: timeout, connect_timeout, \
                         password_file)"
                    )))
                }
            }
        }
        Ok(config)
    }
}

/// The user and password by the documented order, and where the password came from.
type Credentials = (Option<(String, String)>, Option<PasswordSource>);

fn credentials(
    url: &StoreUrl,
    url_user: Option<String>,
    url_password: Option<String>,
    env: EnvLookup<'_>,
) -> Result<Credentials, Error> {
    let bad = |why: String| Error::new(ErrorKind::InvalidInput, why).with_op(Op::Open);
    let text = |name: &str| {
        env(name)
            .map(|v| {
                v.into_string()
                    .map_err(|_| bad(format!("{name} is not valid UTF-8")))
            })
            .transpose()
    };
    // etcdctl: `--user user[:password]`, `--password` only with a bare user.
    let env_user = text("ETCDCTL_USER")?.map(|u| match u.split_once(':') {
        Some((u, p)) => (u.to_owned(), Some(p.to_owned())),
        None => (u, None),
    });
    let env_password = text("ETCDCTL_PASSWORD")?;
    if let Some((_, Some(_))) = &env_user {
        if env_password.is_some() {
            return Err(bad(
                "ETCDCTL_USER gives a password and ETCDCTL_PASSWORD another; give one".into(),
            ));
        }
    }
    let (user, env_pair_password) = match (url_user, env_user) {
        (Some(u), Some((eu, ep))) => {
            let p = if eu == u { ep } else { None };
            (Some(u), p)
        }
        (Some(u), None) => (Some(u), None),
        (None, Some((eu, ep))) => (Some(eu), ep),
        (None, None) => (None, None),
    };
    if user.as_deref() == Some("") {
        return Err(bad("ETCDCTL_USER names an empty user".into()));
    }
    let file = secret::password_file_param(url)?;
    let sources = PasswordSources {
        url: url_password.map(Secret::new),
        file,
        env: Vec::new(),
    };
    let mut found = sources.resolve(env)?;
    // A password from the environment alone, with no user anywhere, is not for us (etcdctl
    // ignores it too): it must not stop an unauthenticated store from opening.
    if found.is_none() && user.is_some() {
        found = env_pair_password
            .map(|p| (Secret::new(p), PasswordSource::Env("ETCDCTL_USER")))
            .or_else(|| {
                env_password.map(|p| (Secret::new(p), PasswordSource::Env("ETCDCTL_PASSWORD")))
            });
    }
    match (user, found) {
        (None, None) => Ok((None, None)),
        (Some(u), Some((p, source))) => Ok((Some((u, p.expose().to_owned())), Some(source))),
        (Some(u), None) => Err(bad(format!(
            "user '{u}' needs a password: ?password_file=PATH, ETCDCTL_PASSWORD, or \
             etcd://user:password@host:2379 in BATON_STORE"
        ))),
        (None, Some((_, source))) => Err(bad(format!(
            "a password ({}) but no user: name one in the URL (etcd://user@host:2379) or in \
             ETCDCTL_USER",
            match source {
                PasswordSource::Url => "in the URL".to_owned(),
                PasswordSource::File(f) => format!("from {}", f.display()),
                PasswordSource::Env(v) => format!("from {v}"),
                PasswordSource::StoreFile(f) => format!("from {}", f.display()),
            }
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(u: &str) -> Result<EtcdConfig, Error> {
        EtcdConfig::from_url_env(&StoreUrl::parse(u).expect("url"), &|_| None)
    }

    #[test]
    fn parses_endpoints_prefix_user_and_options() {
        let c = parse("etcd://h1:2379,h2:2380").expect("cfg");
        assert_eq!(c.endpoints, ["h1:2379", "h2:2380"]);
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        assert!(c.user.is_none());
        let c = parse("etcd://bob:s%40cret@10.0.0.1/locks/prod/?timeout=2s&connect_timeout=500ms")
            .expect("cfg");
        assert_eq!(c.endpoints, ["10.0.0.1:2379"]);
        assert_eq!(c.prefix, "/locks/prod");
        assert_eq!(c.user, Some(("bob".into(), "s@cret".into())));
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert!(!format!("{c:?}").contains("cret"));
    }

    #[test]
    fn refuses_bad_urls() {
        for u in [
            "etcd:h1:2379",
            "etcd://",
            "etcd://h1:notaport",
            "etcd://h1:0",
            "etcd://h1:2379/pre#fix",
            "etcd://h1:2379?timeout=forever",
            "etcd://h1:2379?color=blue",
            "etcd://bob@h1:2379",
            "etcd://bob:a%+1@h1:2379",
            "etcd://h 1:2379",
            "dir:/x",
        ] {
            let err = parse(u).expect_err(u);
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{u}: {err}");
        }
    }
}
