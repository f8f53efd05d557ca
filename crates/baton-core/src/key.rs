//! Keys: 1–200 bytes of `[A-Za-z0-9._-]` with `/` as a separator; no `..`, no leading
//! or trailing `/`, no empty or `.` segment. A [`Key`] value is always valid.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, ErrorKind, Op};

/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 200;

/// A validated lock name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Key(String);

impl Key {
    /// Validates `name` as a key. The error says which rule it breaks.
    pub fn new(name: impl Into<String>) -> Result<Key, Error> {
        let name = name.into();
        match Key::check(&name) {
            Ok(()) => Ok(Key(name)),
            Err(why) => Err(Error::new(
                ErrorKind::InvalidKey,
                format!(
                    "invalid key {}: {why}",
                    serde_json::to_string(&name).unwrap_or_default()
                ),
            )
            .with_op(Op::Parse)),
        }
    }

    fn check(name: &str) -> Result<(), String> {
        if name.is_empty() {
            return Err("a key cannot be empty".into());
        }
        if name.len() > MAX_KEY_LEN {
            return Err(format!(
                "a key is at most {MAX_KEY_LEN} bytes, this one has {}",
                name.len()
            ));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
        {
            return Err(format!(
                "{c:?} is not allowed (use letters, digits, '.', '_', '-' and '/' between parts)"
            ));
        }
        if name.starts_with('/') {
            return Err("a key cannot start with '/'".into());
        }
        if name.ends_with('/') {
            return Err("a key cannot end with '/'".into());
        }
        if name.contains("..") {
            return Err("a key cannot contain '..'".into());
        }
        for part in name.split('/') {
            if part.is_empty() {
                return Err("a key cannot contain an empty part ('//')".into());
            }
            if part == "." {
                return Err("a key cannot contain a '.' part".into());
            }
        }
        Ok(())
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Key {
    type Err = Error;
    fn from_str(s: &str) -> Result<Key, Error> {
        Key::new(s)
    }
}

impl TryFrom<String> for Key {
    type Error = Error;
    fn try_from(s: String) -> Result<Key, Error> {
        Key::new(s)
    }
}

impl From<Key> for String {
    fn from(k: Key) -> String {
        k.0
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.0)
    }
}

/// Derives a key from a command line, as lockex does: a readable prefix made of the
/// program's base name, then the first 16 bytes of the SHA-256 of the exact argv (each
/// argument followed by a NUL byte) in hex.
///
/// The result is the same in every process, on every host and in every release of baton
/// for the same argv: it depends on nothing but the arguments' bytes.
pub fn derive_key<S: AsRef<std::ffi::OsStr>>(argv: &[S]) -> Key {
    use std::os::unix::ffi::OsStrExt;
    let mut hasher = Sha256::new();
    for arg in argv {
        hasher.update(arg.as_ref().as_bytes());
        hasher.update([0u8]);
    }
    let digest = hasher.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let program = argv
        .first()
        .map(|a| {
            let bytes = a.as_ref().as_bytes();
            let base = bytes.rsplit(|b| *b == b'/').next().unwrap_or(bytes);
            base.iter()
                .map(|&b| {
                    if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                        b as char
                    } else {
                        '_'
                    }
                })
                .take(40)
                .collect::<String>()
        })
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "cmd".into());
    Key(format!("cmd/{program}-{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_keys() {
        for k in [
            "a",
            "jobs/nightly",
            "a.b_c-d/e",
            "x".repeat(200).as_str(),
            "v1.2/x",
        ] {
            Key::new(k).expect(k);
        }
    }

    #[test]
    fn rejects_each_rule_with_its_reason() {
        let cases = [
            ("", "empty"),
            ("/a", "start with '/'"),
            ("a/", "end with '/'"),
            ("a//b", "empty part"),
            ("a/../b", "'..'"),
            ("..", "'..'"),
            ("a..b", "'..'"),
            ("./a", "'.' part"),
            ("a b", "not allowed"),
            ("a\0b", "not allowed"),
            ("ключ", "not allowed"),
            ("a:b", "not allowed"),
        ];
        for (bad, why) in cases {
            let err = Key::new(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::InvalidKey);
            assert!(err.to_string().contains(why), "{bad:?}: {err}");
        }
        let long = "x".repeat(201);
        assert!(Key::new(long)
            .expect_err("long")
            .to_string()
            .contains("at most 200"));
    }

    #[test]
    fn derived_keys_are_stable_valid_and_distinct() {
        let a = derive_key(&["/usr/bin/backup", "--all"]);
        // Pinned: the derivation must never change between releases.
        assert_eq!(a.as_str(), "cmd/backup-5f5a738a9da6133a87c88b65e8e8df5f");
        assert_eq!(a, derive_key(&["/usr/bin/backup", "--all"]));
        assert_ne!(a, derive_key(&["/usr/bin/backup", "--al", "l"]));
        assert_ne!(a, derive_key(&["/usr/bin/backup", "--all "]));
        Key::new(derive_key(&["we!rd prog name \u{e9}"]).as_str()).expect("valid");
        Key::new(derive_key::<&str>(&[]).as_str()).expect("valid");
    }
}
