//! Passwords that stay out of `ps`: one mechanism for every store that needs one.
//!
//! A password written in a store URL on the command line (`baton run -s
//! postgres://u:secret@db/x -- job`) is visible to every user of the machine in `ps` and
//! `/proc/PID/cmdline`. This module gives the stores three other places for it, and the
//! CLI a warning for the first:
//!
//! - **A password file named in the URL**, `?password_file=/etc/baton/pg.pass`
//!   ([`read_password_file`]). The file must be a regular file (a symlink is followed and
//!   its target judged: secret mounts are symlinks), owned by this user or root, and give
//!   no permission at all to its group or others (`chmod 600`); anything else is refused,
//!   not ignored, because the user asked for that file. Its content is the password,
//!   without one trailing newline; a file of several lines, a NUL or an empty password is
//!   refused.
//! - **The store's usual environment and files**, the ones its own tools read: for
//!   PostgreSQL `PGPASSWORD`, then `PGPASSFILE` or `~/.pgpass` ([`pgpass_lookup`], with
//!   libpq's semantics); for etcd `ETCDCTL_USER=user[:password]` and `ETCDCTL_PASSWORD`.
//! - **`BATON_STORE`**: an environment variable is readable only by its own user and root.
//!
//! Every store keeps one order: a password in the URL (user info or a `password` query
//! parameter), else the password file, else the environment, else the store's password
//! file (`.pgpass`). A URL that gives both a password and a `password_file` is refused as
//! ambiguous.
//!
//! [`Secret`] holds a password; its `Debug` and `Display` print `***`.

use std::ffi::OsString;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, ErrorKind, Op, StoreUrl};

/// The URL parameter that names a password file.
pub const PASSWORD_FILE_PARAM: &str = "password_file";

/// The largest password file read, in bytes; a bigger one is refused.
pub const MAX_PASSWORD_FILE: u64 = 4096;

/// The largest `.pgpass` read, in bytes; past it the rest is not read.
const MAX_PGPASS: u64 = 1 << 20;

/// A password. `Debug` and `Display` never show it; [`Secret::expose`] does.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Secret {
        Secret(password.into())
    }

    /// The password itself. Hand it to the driver; never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a store's password came from, for messages (never the password itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource {
    /// The URL's user info or `password` parameter.
    Url,
    /// The URL's `password_file`.
    File(PathBuf),
    /// An environment variable.
    Env(&'static str),
    /// A store's own password file (`.pgpass`).
    StoreFile(PathBuf),
}

/// How the stores read environment variables: the process environment, or a map in tests.
///
/// `None` for a variable that is unset or empty (an empty password is no password).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// The process environment, as an [`EnvLookup`].
pub fn process_env(name: &str) -> Option<OsString> {
    std::env::var_os(name).filter(|v| !v.is_empty())
}

/// Reads the password file `path` named by a store URL, refusing one that others could
/// read or change (see the module doc). Errors are [`ErrorKind::InvalidInput`] for a file
/// that is refused, [`ErrorKind::Unavailable`] for one that cannot be read.
pub fn read_password_file(path: &Path) -> Result<Secret, Error> {
    let shown = path.display();
    let refuse = |why: String| {
        Error::new(
            ErrorKind::InvalidInput,
            format!("password file {shown}: {why}"),
        )
        .with_op(Op::Open)
    };
    if !path.is_absolute() {
        return Err(refuse(
            "must be an absolute path (the file must not depend on each process's current \
             directory)"
                .into(),
        ));
    }
    // O_NONBLOCK: a FIFO or device named by mistake must not hang the open; it is refused
    // below as not a regular file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot open password file {shown}"),
            )
            .with_op(Op::Open)
            .with_source(e)
        })?;
    let meta = file.metadata().map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("cannot read password file {shown}"),
        )
        .with_op(Op::Open)
        .with_source(e)
    })?;
    check_private(&meta).map_err(refuse)?;
    if meta.len() > MAX_PASSWORD_FILE {
        return Err(refuse(format!(
            "is {} bytes; a password file holds one password (at most {MAX_PASSWORD_FILE} bytes)",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_PASSWORD_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot read password file {shown}"),
            )
            .with_op(Op::Open)
            .with_source(e)
        })?;
    parse_password_file(&bytes).map_err(refuse)
}

/// Whether a password file's metadata makes it private to its owner: a regular file,
/// owned by this user or root, with no permission for group or others.
fn check_private(meta: &std::fs::Metadata) -> Result<(), String> {
    if !meta.file_type().is_file() {
        return Err("is not a regular file".into());
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "is owned by uid {}, not by this user ({me}) or root: its owner can change it",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "has mode {mode:04o}: its group or others can read or change it (chmod 600 it)"
        ));
    }
    Ok(())
}

/// The password a password file's bytes hold: the content without one trailing `\n` or
/// `\r\n`; refused when empty, not UTF-8, or holding another line break or a NUL.
pub fn parse_password_file(bytes: &[u8]) -> Result<Secret, String> {
    let body = bytes
        .strip_suffix(b"\r\n")
        .or_else(|| bytes.strip_suffix(b"\n"))
        .unwrap_or(bytes);
    if body.is_empty() {
        return Err("is empty".into());
    }
    if body.iter().any(|b| matches!(b, b'\n' | b'\r' | 0)) {
        return Err(
            "holds more than one line or a NUL byte; it must hold the password alone".into(),
        );
    }
    let text = std::str::from_utf8(body).map_err(|_| "is not UTF-8 text".to_owned())?;
    Ok(Secret::new(text))
}

/// The `password_file` a URL names, if any; refused when empty.
pub fn password_file_param(url: &StoreUrl) -> Result<Option<PathBuf>, Error> {
    match url.param(PASSWORD_FILE_PARAM) {
        None => Ok(None),
        Some("") => Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{PASSWORD_FILE_PARAM} needs a path (?{PASSWORD_FILE_PARAM}=/etc/baton/store.pass)"
            ),
        )
        .with_op(Op::Open)
        .with_store(url)),
        Some(p) => Ok(Some(PathBuf::from(
            crate::url::percent_decode(p).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("{PASSWORD_FILE_PARAM} is not valid percent-encoded UTF-8"),
                )
                .with_op(Op::Open)
                .with_store(url)
            })?,
        ))),
    }
}

/// What a store needs to know to pick its password, in precedence order.
#[derive(Clone, Debug, Default)]
pub struct PasswordSources {
    /// A password the URL carries itself.
    pub url: Option<Secret>,
    /// The URL's `password_file`.
    pub file: Option<PathBuf>,
    /// Environment variables to try, in order (`PGPASSWORD`).
    pub env: Vec<&'static str>,
}

impl PasswordSources {
    /// The password by the one order every store keeps: URL, password file, environment.
    /// `None` when none gives one (the store may then try its own password file). A URL
    /// that gives both a password and a password file is refused.
    pub fn resolve(&self, env: EnvLookup<'_>) -> Result<Option<(Secret, PasswordSource)>, Error> {
        if let (Some(_), Some(_)) = (&self.url, &self.file) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the URL gives both a password and a {PASSWORD_FILE_PARAM}; give one \
                     (the file, to keep the password off the command line)"
                ),
            )
            .with_op(Op::Open));
        }
        if let Some(p) = &self.url {
            return Ok(Some((p.clone(), PasswordSource::Url)));
        }
        if let Some(f) = &self.file {
            return Ok(Some((
                read_password_file(f)?,
                PasswordSource::File(f.clone()),
            )));
        }
        for name in &self.env {
            if let Some(v) = env(name) {
                let v = v.into_string().map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidInput,
                        format!("{name} is not valid UTF-8"),
                    )
                    .with_op(Op::Open)
                })?;
                return Ok(Some((Secret::new(v), PasswordSource::Env(name))));
            }
        }
        Ok(None)
    }
}

/// Refuses a `scheme://user:password@host/…` URL whose user info is ambiguous: one where
/// a `/`, `?` or `#` comes before the first `@`, or where the host part holds two `@`.
/// Then either the password holds one of them unencoded (`u:pa/ss@h`, `u:p@ss@h`), which
/// the redaction of [`StoreUrl`] (the last `@` before the first `/`) and a driver that
/// splits at the first `@` (the PostgreSQL driver does) read differently, or an `@`
/// follows the host (`h/db?name=a@b`), which such a driver takes for the user info. The
/// error names neither the URL nor any part of it: it might print the password.
pub fn check_user_info(url: &StoreUrl) -> Result<(), Error> {
    let Some(after) = url.rest().strip_prefix("//") else {
        return Ok(());
    };
    let Some(at) = after.find('@') else {
        return Ok(());
    };
    let host_end = after.find(['/', '?', '#']).unwrap_or(after.len());
    // More than one '@' anywhere: the parsers end the user info at the first, the
    // redaction of `Display` at the last, so none may be left to guess.
    if at > host_end || after.matches('@').count() > 1 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the user info of the URL is ambiguous: percent-encode a '/', '?', '#' or '@' in \
             the user or password (%2F, %3F, %23, %40) and an '@' after the host, or \
             better, keep the password out of the URL (password_file)",
        )
        .with_op(Op::Open)
        .with_store(format!("{}://…", url.scheme())));
    }
    Ok(())
}

/// Whether a URL carries a password itself: in its user info (`//user:password@`) or in a
/// secret query parameter (`?password=`).
pub fn url_has_password(url: &StoreUrl) -> bool {
    url.redacted() != url.expose_secret()
}

/// The one-line warning for a store URL given on the command line with a password in it,
/// or `None` when it has none. The CLI prints it once, to stderr, for `-s/--store`
/// (not for `BATON_STORE`, which other users cannot read).
pub fn command_line_password_warning(url: &StoreUrl) -> Option<String> {
    url_has_password(url).then(|| {
        format!(
            "baton: warning: the store URL {url} on the command line holds a password, which \
             every user of this machine can read (ps); set BATON_STORE instead, or name a \
             file with ?{PASSWORD_FILE_PARAM}=PATH"
        )
    })
}

/// Prints [`command_line_password_warning`] to stderr, at most once per process.
pub fn warn_if_password_on_command_line(url: &StoreUrl) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if let Some(w) = command_line_password_warning(url) {
        ONCE.call_once(|| eprintln!("{w}"));
    }
}

/// This user's name, as libpq and the PostgreSQL driver default the database user to.
pub fn current_user() -> String {
    crate::holder::user_name()
}

/// The host a `.pgpass` entry is matched against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgHost<'a> {
    /// A TCP host name or address.
    Tcp(&'a str),
    /// A Unix-socket directory; matched as `localhost` (libpq does so for its default
    /// socket directory) or as the directory's path.
    Unix(&'a Path),
}

/// What a `.pgpass` entry is matched against: host, port, database and user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgTarget<'a> {
    /// The server.
    pub host: PgHost<'a>,
    /// Its port.
    pub port: u16,
    /// The database.
    pub dbname: &'a str,
    /// The user.
    pub user: &'a str,
}

/// The password `.pgpass` text gives `target`, with libpq's semantics: one entry a line,
/// `hostname:port:database:username:password`; the first entry whose four fields match
/// wins; `*` in a field matches anything; `\:` and `\\` stand for `:` and `\`; lines that
/// start with `#` and lines of fewer than five fields are skipped; the password is the
/// rest of the line, unescaped.
pub fn pgpass_find(text: &str, target: &PgTarget<'_>) -> Option<Secret> {
    let port = target.port.to_string();
    let hosts: Vec<String> = match target.host {
        PgHost::Tcp(h) => vec![h.to_owned()],
        PgHost::Unix(p) => vec!["localhost".to_owned(), p.to_string_lossy().into_owned()],
    };
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((fields, password)) = split_pgpass_line(line) else {
            continue;
        };
        let matches = |field: &PgField, want: &str| field.wildcard || field.text == want;
        if hosts.iter().any(|h| matches(&fields[0], h))
            && matches(&fields[1], &port)
            && matches(&fields[2], target.dbname)
            && matches(&fields[3], target.user)
        {
            return Some(Secret::new(password));
        }
    }
    None
}

/// One of a `.pgpass` line's first four fields, unescaped.
struct PgField {
    text: String,
    /// The field was a bare `*` (an escaped `\*` is a literal star).
    wildcard: bool,
}

/// A `.pgpass` line's four match fields and its password; `None` for fewer than five.
fn split_pgpass_line(line: &str) -> Option<([PgField; 4], String)> {
    let mut fields: Vec<PgField> = Vec::with_capacity(4);
    let mut chars = line.chars();
    let mut text = String::new();
    let mut escaped_any = false;
    while fields.len() < 4 {
        match chars.next() {
            None => return None,
            Some('\\') => {
                escaped_any = true;
                if let Some(c) = chars.next() {
                    text.push(c);
                }
            }
            Some(':') => {
                let wildcard = text == "*" && !escaped_any;
                fields.push(PgField {
                    text: std::mem::take(&mut text),
                    wildcard,
                });
                escaped_any = false;
            }
            Some(c) => text.push(c),
        }
    }
    let mut password = String::new();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                password.push(n);
            }
        } else {
            password.push(c);
        }
    }
    let fields: [PgField; 4] = fields.try_into().ok()?;
    Some((fields, password))
}

/// The password `.pgpass` gives `target`: the file `PGPASSFILE` names, else
/// `$HOME/.pgpass`. As libpq does, a file that is not a regular file, or that its group or
/// others can read or write, is ignored (`None`), as is one that cannot be read.
pub fn pgpass_lookup(target: &PgTarget<'_>, env: EnvLookup<'_>) -> Option<(Secret, PathBuf)> {
    let path = match env("PGPASSFILE") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env("HOME")?).join(".pgpass"),
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.file_type().is_file() || meta.mode() & 0o077 != 0 {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_PGPASS).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    pgpass_find(&text, target).map(|s| (s, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn password_file_content() {
        assert_eq!(parse_password_file(b"pw\n").map(|s| s.0), Ok("pw".into()));
        assert_eq!(parse_password_file(b"pw\r\n").map(|s| s.0), Ok("pw".into()));
        assert_eq!(parse_password_file(b" pw ").map(|s| s.0), Ok(" pw ".into()));
        for bad in [&b""[..], b"\n", b"a\nb", b"a\n\n", b"a\0", b"\xff"] {
            assert!(parse_password_file(bad).is_err(), "{bad:?}");
        }
    }
}
