//! Store URLs. `Display` and `Debug` never show a password or a secret query parameter,
//! so a URL can be printed in errors, in `status` and in a child's `BATON_STORE`.

use std::fmt;

use crate::{Error, ErrorKind, Op};

/// A parsed store URL: `scheme:rest`, e.g. `dir:/tmp/baton`, `sqlite:/var/lib/x.db`,
/// `postgres://user:secret@host/db`, `etcd://h1:2379,h2:2379/prefix`.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    raw: String,
    scheme: String,
    redacted: String,
}

/// Query parameters whose values are secrets.
const SECRET_PARAMS: &[&str] = &["password", "pass", "secret", "token", "key", "auth"];

impl StoreUrl {
    /// Parses a store URL. A bare path (starting with `/`, `./` or `../`) means `dir:PATH`.
    pub fn parse(text: &str) -> Result<StoreUrl, Error> {
        let bad = |why: String| {
            Error::new(ErrorKind::InvalidInput, format!("invalid store URL: {why}"))
                .with_op(Op::Parse)
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(bad(
                "empty (examples: dir:/tmp/locks, sqlite:/var/lib/baton.db, postgres://host/db)"
                    .into(),
            ));
        }
        if text.starts_with('/') || text.starts_with("./") || text.starts_with("../") {
            return StoreUrl::parse(&format!("dir:{text}"));
        }
        let Some((scheme, rest)) = text.split_once(':') else {
            return Err(bad(format!(
                "'{}' has no scheme (examples: dir:/tmp/locks, sqlite:/var/lib/baton.db)",
                redact_loose(text)
            )));
        };
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
        {
            return Err(bad(format!("'{}' has no valid scheme", redact_loose(text))));
        }
        if text.chars().any(|c| c.is_control()) {
            return Err(bad("it contains control characters".into()));
        }
        let scheme = scheme.to_ascii_lowercase();
        let redacted = format!("{scheme}:{}", redact(rest));
        Ok(StoreUrl {
            raw: format!("{scheme}:{rest}"),
            scheme,
            redacted,
        })
    }

    /// The scheme, lowercase: `dir`, `sqlite`, `postgres`, ...
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// Everything after `scheme:`, secrets included. Only a store's own connect code
    /// should read this.
    pub fn rest(&self) -> &str {
        &self.raw[self.scheme.len() + 1..]
    }

    /// The part after the scheme up to `?` (for `dir:PATH?mode=lease`: `PATH`).
    pub fn path(&self) -> &str {
        let rest = self.rest();
        rest.split_once('?').map_or(rest, |(p, _)| p)
    }

    /// The query parameters, in order, undecoded.
    pub fn query(&self) -> Vec<(&str, &str)> {
        match self.rest().split_once('?') {
            None => Vec::new(),
            Some((_, q)) => q
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| p.split_once('=').unwrap_or((p, "")))
                .collect(),
        }
    }

    /// One query parameter's value.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query()
            .into_iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The full URL, secrets included. Never print this.
    pub fn expose_secret(&self) -> &str {
        &self.raw
    }

    /// The URL with a relative file path made absolute against `cwd`: `dir:./locks`,
    /// `./locks` and `sqlite:jobs.db` name files as people type them, relative to where
    /// they stand, and every process that is handed the URL afterwards (a child's
    /// `BATON_STORE`, another directory) must name the same files. Only the file stores'
    /// schemes (`dir`, `sqlite`) have paths; every other URL, an empty path (`dir:`, the
    /// default directory) and an absolute path are returned as they are. `.` components
    /// are dropped; `..` is kept (it means what the filesystem says through symlinks).
    pub fn resolve_against(&self, cwd: &std::path::Path) -> StoreUrl {
        let path = self.path();
        if !matches!(self.scheme(), "dir" | "sqlite") || path.is_empty() || path.starts_with('/') {
            return self.clone();
        }
        if !cwd.is_absolute() {
            return self.clone();
        }
        let joined: std::path::PathBuf = cwd.join(path).components().collect();
        let Some(joined) = joined.to_str() else {
            return self.clone();
        };
        let query = &self.rest()[path.len()..];
        StoreUrl::parse(&format!("{}:{joined}{query}", self.scheme()))
            .unwrap_or_else(|_| self.clone())
    }

    /// The URL with secrets replaced by `***`; the same as `Display`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// An `InvalidInput` error about this URL (for a store's `from_url`): the operation
    /// is `open`, the store this URL, redacted.
    pub fn invalid(&self, why: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidInput, why)
            .with_op(Op::Open)
            .with_store(self)
    }

    /// Checks that the URL's scheme is one of `schemes`; else an error naming `what`
    /// store the caller is and an `example` URL.
    pub fn expect_scheme(&self, schemes: &[&str], what: &str, example: &str) -> Result<(), Error> {
        if schemes.contains(&self.scheme()) {
            return Ok(());
        }
        Err(self.invalid(format!(
            "not {what} store URL (scheme '{}', expected {example})",
            self.scheme()
        )))
    }

    /// The authority of a networked store's URL, `scheme://[user[:password]@]h1[:p1],h2[:p2]/path`:
    /// the user and password percent-decoded, each host with its port (`default_port`
    /// where none is given), and the path after the hosts (without its leading `/`).
    /// `example` goes into the errors. The query stays in [`StoreUrl::query`].
    pub fn authority(&self, default_port: u16, example: &str) -> Result<Authority, Error> {
        let Some(rest) = self.path().strip_prefix("//") else {
            return Err(self.invalid(format!(
                "a {} URL names its servers after '//' (example: {example})",
                self.scheme()
            )));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (user, password, hosts) = match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (u, p) = match userinfo.split_once(':') {
                    Some((u, p)) => (u, Some(p)),
                    None => (userinfo, None),
                };
                let u = percent_decode(u).ok_or_else(|| {
                    self.invalid("the user name is not valid percent-encoded UTF-8")
                })?;
                let p = p
                    .map(|p| {
                        percent_decode(p).ok_or_else(|| {
                            self.invalid("the password is not valid percent-encoded UTF-8")
                        })
                    })
                    .transpose()?;
                (Some(u), p, hosts)
            }
            None => (None, None, authority),
        };
        let mut endpoints = Vec::new();
        for h in hosts.split(',') {
            let h = h.trim();
            if h.is_empty() {
                continue;
            }
            let (host, port) = match h.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && !host.ends_with(':') => {
                    (host, Some(port))
                }
                _ => (h, None),
            };
            let port = match port {
                None => default_port,
                Some(p) => p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| self.invalid(format!("'{h}' has no valid port")))?,
            };
            if !host.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':')
            }) {
                return Err(self.invalid(format!("'{host}' is not a host name or address")));
            }
            endpoints.push((host.to_owned(), port));
        }
        if endpoints.is_empty() {
            return Err(self.invalid(format!("no server given (example: {example})")));
        }
        Ok(Authority {
            user,
            password,
            endpoints,
            path: path.to_owned(),
        })
    }
}

/// The authority of a networked store's URL: see [`StoreUrl::authority`].
#[derive(Clone, PartialEq, Eq)]
pub struct Authority {
    /// The user, percent-decoded (possibly empty: the caller decides whether that is
    /// allowed).
    pub user: Option<String>,
    /// The password, percent-decoded.
    pub password: Option<String>,
    /// Each server, as given, with its port.
    pub endpoints: Vec<(String, u16)>,
    /// What follows the servers' `/` (a key prefix, a database, a vhost), undecoded.
    pub path: String,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("endpoints", &self.endpoints)
            .field("path", &self.path)
            .finish()
    }
}

/// Percent-decodes `s` as UTF-8; `None` for a bad escape or bytes that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            // from_str_radix would take a sign (`%+1`).
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreUrl({:?})", self.redacted)
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<StoreUrl, Error> {
        StoreUrl::parse(s)
    }
}

/// Redacts `//user:password@` and secret query parameters in the part after the scheme.
///
/// The password ends at the *last* `@` of the URL, so a password someone typed with a raw
/// `/`, `?` or `@` in it is hidden too (at worst, a URL with an `@` in its query shows
/// less than it could).
fn redact(rest: &str) -> String {
    if let Some(after) = rest.strip_prefix("//") {
        if let Some((userinfo, tail)) = after.rsplit_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                if !user.contains(['/', '?']) {
                    return format!(
                        "//{user}:***@{}",
                        redact_plain(&format!("//{tail}"))[2..].to_owned()
                    );
                }
            }
        }
    }
    redact_plain(rest)
}

/// [`redact`] for a URL whose password, if any, ends before its first `/` and `?`.
fn redact_plain(rest: &str) -> String {
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let mut out = String::with_capacity(rest.len());
    if let Some(after) = main.strip_prefix("//") {
        let authority_end = after.find('/').unwrap_or(after.len());
        let (authority, path) = after.split_at(authority_end);
        out.push_str("//");
        match authority.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push('@');
                out.push_str(hosts);
            }
            None => out.push_str(authority),
        }
        out.push_str(path);
    } else {
        out.push_str(main);
    }
    if let Some(q) = query {
        out.push('?');
        let parts: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()) => {
                    format!("{k}=***")
                }
                _ => p.to_owned(),
            })
            .collect();
        out.push_str(&parts.join("&"));
    }
    out
}

/// Redaction for text that did not parse: hide anything between `:` and `@`.
fn redact_loose(text: &str) -> String {
    match (text.find("//"), text.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &text[..s + 2], &text[at..]),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schemes_paths_and_params() {
        let u = StoreUrl::parse("dir:/tmp/x?mode=lease").expect("parse");
        assert_eq!(u.scheme(), "dir");
        assert_eq!(u.path(), "/tmp/x");
        assert_eq!(u.param("mode"), Some("lease"));
        let bare = StoreUrl::parse("/var/lock/baton").expect("bare path");
        assert_eq!(bare.scheme(), "dir");
        assert_eq!(bare.path(), "/var/lock/baton");
        assert_eq!(
            StoreUrl::parse("SQLite:/a.db").expect("p").scheme(),
            "sqlite"
        );
    }

    #[test]
    fn secrets_never_show() {
        let u =
            StoreUrl::parse("postgres://bob:hunter2@db1:5432/locks?sslmode=require&password=x2")
                .expect("parse");
        let shown = format!("{u} {u:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("x2"), "{shown}");
        assert!(
            shown.contains("postgres://bob:***@db1:5432/locks"),
            "{shown}"
        );
        assert!(u.expose_secret().contains("hunter2"));
        let amqp = StoreUrl::parse("amqp://guest:p%40ss@h:5672/vh").expect("parse");
        assert_eq!(amqp.to_string(), "amqp://guest:***@h:5672/vh");
        let err = StoreUrl::parse("nonsense//u:pw@h").expect_err("no scheme");
        assert!(!err.to_string().contains("pw"), "{err}");
    }

    #[test]
    fn relative_file_paths_resolve_against_the_working_directory() {
        let cwd = std::path::Path::new("/home/ann/work");
        for (given, want) in [
            ("dir:./locks", "dir:/home/ann/work/locks"),
            ("./locks", "dir:/home/ann/work/locks"),
            (
                "dir:locks?mode=lease",
                "dir:/home/ann/work/locks?mode=lease",
            ),
            ("../shared/locks", "dir:/home/ann/work/../shared/locks"),
            ("sqlite:jobs.db", "sqlite:/home/ann/work/jobs.db"),
            (
                "sqlite:./db/jobs.db?unsafe_network_fs=1",
                "sqlite:/home/ann/work/db/jobs.db?unsafe_network_fs=1",
            ),
            ("dir:", "dir:"),
            ("dir:/abs", "dir:/abs"),
            ("sqlite:///abs.db", "sqlite:///abs.db"),
            ("postgres://h/db", "postgres://h/db"),
            ("etcd://h:2379/prefix", "etcd://h:2379/prefix"),
        ] {
            let got = StoreUrl::parse(given).expect(given).resolve_against(cwd);
            assert_eq!(got.expose_secret(), want, "{given}");
        }
        // A relative working directory resolves nothing (the store then refuses the path).
        let rel = StoreUrl::parse("dir:x").expect("p");
        assert_eq!(rel.resolve_against(std::path::Path::new("w")), rel);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "   ", "no-scheme", ":x", "a b:c", "dir:/tmp/\u{7}"] {
            let err = StoreUrl::parse(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad}");
        }
    }
}
