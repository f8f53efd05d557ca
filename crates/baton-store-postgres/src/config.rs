//! `postgres://[user[:password]@]host[:port]/dbname[?params]`, parsed from the store URL.
//!
//! baton's own parameters (`schema`, `timeout`) are taken out; every other parameter goes
//! to the driver as libpq would read it (`connect_timeout`, `application_name`,
//! `keepalives_idle`, `tcp_user_timeout`, `options`, `sslmode=disable|prefer`, ...).
//!
//! The password, by [`baton_core::secret`]'s order: the URL's (`user:password@` or
//! `?password=`), else the file `?password_file=PATH` names (private to its owner, or
//! refused), else `PGPASSWORD`, else the first matching entry of `PGPASSFILE` or
//! `~/.pgpass` (libpq's format; ignored when its group or others can read it). The
//! `.pgpass` entry is looked up for the first host and port of the URL, its database and
//! its user (this user's name when the URL names none).

use std::fmt;
use std::time::Duration;

use baton_core::secret::{self, EnvLookup, PasswordSource, PasswordSources, PgHost, PgTarget};
use baton_core::{parse_duration, Error, ErrorKind, Op, StoreUrl};
use tokio_postgres::config::SslMode;

/// The schema baton's tables live in when the URL names none.
pub const DEFAULT_SCHEMA: &str = "baton";

/// How long one round trip to the server may take when the URL sets no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting may take when the URL sets no `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL store's configuration.
#[derive(Clone)]
pub struct PostgresConfig {
    /// The driver's connection settings (host, port, user, password, database, ...).
    pub pg: tokio_postgres::Config,
    /// The schema baton's tables live in (`?schema=NAME`, default `baton`): lowercase
    /// letters, digits and `_`, starting with a letter or `_`, at most 40 bytes.
    pub schema: String,
    /// The bound on every round trip to the server (`?timeout=10s`): past it the
    /// connection is dropped and the operation fails as unavailable. The server is told
    /// the same bound as its `statement_timeout`.
    pub timeout: Duration,
    /// Where the password came from (`None`: no password; the server may not ask).
    pub password_source: Option<PasswordSource>,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio_postgres::Config's Debug shows the password as `_`.
        f.debug_struct("PostgresConfig")
            .field("pg", &self.pg)
            .field("schema", &self.schema)
            .field("timeout", &self.timeout)
            .field("password_source", &self.password_source)
            .finish()
    }
}

impl PostgresConfig {
    /// Parses a `postgres://` or `postgresql://` URL, taking a password the URL does not
    /// carry from its `password_file`, `PGPASSWORD` or `.pgpass` (see the module doc).
    pub fn from_url(url: &StoreUrl) -> Result<PostgresConfig, Error> {
        PostgresConfig::from_url_env(url, &secret::process_env)
    }

    /// [`PostgresConfig::from_url`] reading environment variables (`PGPASSWORD`,
    /// `PGPASSFILE`, `HOME`) through `env` instead of the process environment.
    pub fn from_url_env(url: &StoreUrl, env: EnvLookup<'_>) -> Result<PostgresConfig, Error> {
        let bad = |why: String| {
            Error::new(ErrorKind::InvalidInput, why)
                .with_op(Op::Open)
                .with_store(url)
        };
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(bad(format!(
                "not a PostgreSQL store URL (scheme '{}', expected postgres://host/db)",
                url.scheme()
            )));
        }
        secret::check_user_info(url)?;
        let raw = url.expose_secret();
        let (main, query) = match raw.split_once('?') {
            Some((m, q)) => (m, Some(q)),
            None => (raw, None),
        };
        let mut schema = DEFAULT_SCHEMA.to_owned();
        let mut timeout = DEFAULT_TIMEOUT;
        let mut passed = Vec::new();
        let password_file = secret::password_file_param(url)?;
        for part in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            match name {
                "schema" => {
                    if !valid_schema(value) {
                        return Err(bad(format!(
                            "schema must be 1-40 lowercase letters, digits or '_', starting \
                             with a letter or '_', not '{value}'"
                        )));
                    }
                    schema = value.to_owned();
                }
                "timeout" => {
                    timeout = parse_duration(value)
                        .ok()
                        .filter(|d| *d >= Duration::from_millis(100))
                        .ok_or_else(|| {
                            bad(format!(
                                "timeout must be a duration of at least 100ms (like 10s), not '{value}'"
                            ))
                        })?;
                }
                "sslmode" if !matches!(value, "disable" | "prefer" | "allow") => {
                    return Err(bad(format!(
                        "sslmode={value} needs TLS, which this build of the PostgreSQL store \
                         does not have (use sslmode=disable on a trusted network, or a TLS \
                         tunnel)"
                    )));
                }
                secret::PASSWORD_FILE_PARAM => {}
                _ => passed.push(part),
            }
        }
        let driver_url = if passed.is_empty() {
            main.to_owned()
        } else {
            format!("{main}?{}", passed.join("&"))
        };
        let mut pg: tokio_postgres::Config = driver_url.parse().map_err(|e| {
            // The driver's message names the bad part; it never echoes the password.
            bad(format!("cannot read the URL: {e}"))
        })?;
        if pg.get_hosts().is_empty() {
            return Err(bad(
                "no host given (example: postgres://user@db.example:5432/baton)".into(),
            ));
        }
        if pg.get_dbname().is_none() {
            return Err(bad(
                "no database given (example: postgres://user@db.example:5432/baton)".into(),
            ));
        }
        let password_source = resolve_password(&mut pg, password_file, env)
            .map_err(|e| e.context(Op::Open, None, url))?;
        if pg.get_ssl_mode() == SslMode::Prefer {
            // Without TLS support `prefer` falls back to plain text anyway; say it plainly.
            pg.ssl_mode(SslMode::Disable);
        }
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        // A black-holed connection must not hang: keepalives find a dead peer while idle,
        // the user timeout while data waits unacknowledged, the operation timeout always.
        pg.keepalives(true);
        if pg.get_keepalives_idle() > Duration::from_secs(10) {
            pg.keepalives_idle(Duration::from_secs(10));
        }
        if pg.get_keepalives_interval().is_none() {
            pg.keepalives_interval(Duration::from_secs(2));
        }
        if pg.get_keepalives_retries().is_none() {
            pg.keepalives_retries(3);
        }
        if pg.get_tcp_user_timeout().is_none() {
            pg.tcp_user_timeout(timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("baton");
        }
        let ms = timeout.as_millis();
        let server_side = format!(
            "-c statement_timeout={ms} -c idle_in_transaction_session_timeout={} -c lock_timeout={ms}",
            ms.saturating_mul(2)
        );
        let options = match pg.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{server_side} {o}"),
            _ => server_side,
        };
        pg.options(options);
        Ok(PostgresConfig {
            pg,
            schema,
            timeout,
            password_source,
        })
    }
}

/// Sets `pg`'s password by the documented order and says where it came from.
fn resolve_password(
    pg: &mut tokio_postgres::Config,
    file: Option<std::path::PathBuf>,
    env: EnvLookup<'_>,
) -> Result<Option<PasswordSource>, Error> {
    let sources = PasswordSources {
        url: pg
            .get_password()
            .map(|p| secret::Secret::new(String::from_utf8_lossy(p))),
        file,
        env: vec!["PGPASSWORD"],
    };
    if let Some((password, source)) = sources.resolve(env)? {
        if source != PasswordSource::Url {
            pg.password(password.expose());
        }
        return Ok(Some(source));
    }
    let user = pg
        .get_user()
        .map_or_else(secret::current_user, str::to_owned);
    let dbname = pg.get_dbname().unwrap_or_default().to_owned();
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let found = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => secret::pgpass_lookup(
            &PgTarget {
                host: PgHost::Tcp(h),
                port,
                dbname: &dbname,
                user: &user,
            },
            env,
        ),
        Some(tokio_postgres::config::Host::Unix(p)) => secret::pgpass_lookup(
            &PgTarget {
                host: PgHost::Unix(p),
                port,
                dbname: &dbname,
                user: &user,
            },
            env,
        ),
        None => None,
    };
    Ok(found.map(|(password, path)| {
        pg.password(password.expose());
        PasswordSource::StoreFile(path)
    }))
}

fn valid_schema(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_lowercase() || c == '_' => {}
        _ => return false,
    }
    s.len() <= 40
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with("pg_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(u: &str) -> Result<PostgresConfig, Error> {
        PostgresConfig::from_url_env(&StoreUrl::parse(u).expect("url"), &|_| None)
    }

    #[test]
    fn parses_urls_and_baton_parameters() {
        let c =
            parse("postgres://bob:hunter2@db1:6543/locks?schema=jobs&timeout=3s&connect_timeout=2")
                .expect("cfg");
        assert_eq!(c.schema, "jobs");
        assert_eq!(c.timeout, Duration::from_secs(3));
        assert_eq!(c.pg.get_ports(), &[6543]);
        assert_eq!(c.pg.get_dbname(), Some("locks"));
        assert_eq!(c.pg.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert!(!format!("{c:?}").contains("hunter2"));
        let c = parse("postgresql://db1/locks").expect("cfg");
        assert_eq!(c.schema, DEFAULT_SCHEMA);
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert!(c
            .pg
            .get_options()
            .unwrap_or("")
            .contains("statement_timeout=10000"));
    }

    #[test]
    fn refuses_bad_urls_without_echoing_secrets() {
        for u in [
            "postgres://db1",
            "postgres://db1/x?schema=Bad-Name",
            "postgres://db1/x?schema=pg_catalog",
            "postgres://db1/x?timeout=soon",
            "postgres://db1/x?sslmode=require",
            "postgres://bob:hunter2@db1/x?frobnicate=1",
            "sqlite:/x.db",
        ] {
            let err = parse(u).expect_err(u);
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{u}: {err}");
            assert!(!format!("{err:#}").contains("hunter2"), "{err:#}");
        }
    }
}
