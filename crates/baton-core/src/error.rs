//! The one public error type. Every store maps its own failures into it, naming the
//! operation, the key and the store (with secrets redacted), and keeping the source.

use std::fmt;

use crate::Key;

/// What went wrong, in terms a caller can act on.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Every slot is held and the request said not to wait.
    Busy,
    /// Every slot stayed held until the wait's deadline.
    Timeout,
    /// The wait was cancelled (signal, dropped future) before a grant.
    Cancelled,
    /// The lease was lost: the holder can no longer prove it holds it.
    Lost,
    /// The lease is not held (released already, or lost and maybe re-granted).
    NotHeld,
    /// The key does not exist in the store (status of a key never used).
    NotFound,
    /// The key is not a valid key.
    InvalidKey,
    /// Some other argument is invalid: a URL, a limit, a duration.
    InvalidInput,
    /// The key exists with another limit than the one requested.
    LimitMismatch,
    /// The store cannot be reached or used right now (I/O error, permission, network).
    Unavailable,
    /// The store holds state baton did not write or cannot read: garbage, truncation,
    /// a symlink where a file belongs, a value of the wrong type.
    Corrupt,
    /// The store does not support this operation.
    Unsupported,
    /// A fenced write carried a token older than one the resource has already seen: its
    /// holder lost the lock. The write was not made.
    Fenced,
}

impl ErrorKind {
    /// A short lowercase name, used in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Busy => "busy",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Lost => "lost",
            ErrorKind::NotHeld => "not_held",
            ErrorKind::NotFound => "not_found",
            ErrorKind::InvalidKey => "invalid_key",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::LimitMismatch => "limit_mismatch",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Fenced => "fenced",
        }
    }
}

/// The operation that failed.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Opening a store from its URL.
    Open,
    /// Acquiring a slot.
    Acquire,
    /// Releasing a lease.
    Release,
    /// Reading a key's status.
    Inspect,
    /// Listing keys.
    List,
    /// Renewing a lease.
    Renew,
    /// Breaking a holder's lease.
    Break,
    /// Changing a key's limit.
    Resize,
    /// Parsing user input (key, URL, duration).
    Parse,
    /// Arriving at a barrier.
    Barrier,
    /// Removing a key.
    Delete,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Open => "open store",
            Op::Acquire => "acquire",
            Op::Release => "release",
            Op::Inspect => "status",
            Op::List => "list",
            Op::Renew => "renew",
            Op::Break => "break",
            Op::Resize => "resize",
            Op::Parse => "parse",
            Op::Barrier => "barrier",
            Op::Delete => "delete",
        })
    }
}

/// baton's error: a kind to act on, the operation, key and store it concerns, a message,
/// and the underlying cause.
///
/// `Display` prints `<op> '<key>' on <store>: <message>`; the alternate form (`{:#}`) adds
/// the chain of causes, which is what the CLI prints after `baton: `.
pub struct Error {
    kind: ErrorKind,
    op: Option<Op>,
    key: Option<String>,
    store: Option<String>,
    message: String,
    current_limit: Option<u32>,
    grant_unknown: bool,
    retryable: Option<bool>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with baton's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message that says why.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            op: None,
            key: None,
            store: None,
            message: message.into(),
            current_limit: None,
            grant_unknown: false,
            retryable: None,
            source: None,
        }
    }

    /// Names the operation that failed.
    pub fn with_op(mut self, op: Op) -> Error {
        self.op = Some(op);
        self
    }

    /// Names the key the operation was about.
    pub fn with_key(mut self, key: &Key) -> Error {
        self.key = Some(key.as_str().to_owned());
        self
    }

    /// Names the store, by its redacted URL.
    pub fn with_store(mut self, store: impl fmt::Display) -> Error {
        self.store = Some(store.to_string());
        self
    }

    /// Keeps the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    /// Records the limit the key already has (for [`ErrorKind::LimitMismatch`]).
    pub fn with_current_limit(mut self, limit: u32) -> Error {
        self.current_limit = Some(limit);
        self
    }

    /// Marks that it is unknown whether the store granted the request (a network store
    /// whose reply was lost). The caller must treat the outcome as unknown.
    pub fn with_grant_unknown(mut self) -> Error {
        self.grant_unknown = true;
        self
    }

    /// Says whether retrying may succeed, overriding what the kind alone suggests: the
    /// store knows that a refused credential (`Unavailable`, but permanent) will not
    /// change, or that a serialization conflict (`Corrupt`-looking, but transient) will.
    pub fn with_retryable(mut self, retryable: bool) -> Error {
        self.retryable = Some(retryable);
        self
    }

    /// Marks the error permanent: retrying the same call will not help.
    pub fn permanent(self) -> Error {
        self.with_retryable(false)
    }

    /// Fills in the operation, key and store where the error does not name them yet.
    pub fn context(mut self, op: Op, key: Option<&Key>, store: impl fmt::Display) -> Error {
        if self.op.is_none() {
            self.op = Some(op);
        }
        if self.key.is_none() {
            self.key = key.map(|k| k.as_str().to_owned());
        }
        if self.store.is_none() {
            self.store = Some(store.to_string());
        }
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operation that failed, if known.
    pub fn op(&self) -> Option<Op> {
        self.op
    }

    /// The key concerned, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The store concerned, as its redacted URL.
    pub fn store(&self) -> Option<&str> {
        self.store.as_deref()
    }

    /// The message, without operation, key or causes.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// For [`ErrorKind::LimitMismatch`]: the limit the key has now.
    pub fn current_limit(&self) -> Option<u32> {
        self.current_limit
    }

    /// True when it is unknown whether the store granted the request.
    pub fn grant_unknown(&self) -> bool {
        self.grant_unknown
    }

    /// Whether retrying the same call later may succeed: what the store said of this
    /// error ([`Error::with_retryable`]), or else what its kind suggests (`Busy`,
    /// `Timeout` and `Unavailable` are worth retrying).
    pub fn is_retryable(&self) -> bool {
        self.retryable.unwrap_or(matches!(
            self.kind,
            ErrorKind::Busy | ErrorKind::Timeout | ErrorKind::Unavailable
        ))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(op) = self.op {
            write!(f, "{op}")?;
            if let Some(key) = &self.key {
                write!(f, " '{key}'")?;
            }
            if let Some(store) = &self.store {
                write!(f, " on {store}")?;
            }
            f.write_str(": ")?;
        } else if let Some(key) = &self.key {
            write!(f, "'{key}': ")?;
        }
        f.write_str(&self.message)?;
        if f.alternate() {
            // Each thing once: a cause that says what is already said (a store's message
            // that repeats its driver's, a wrapped baton error) adds only what is new.
            let mut said: Vec<String> = vec![self.message.clone()];
            let mut cause: Option<&(dyn std::error::Error + 'static)> = match &self.source {
                Some(s) => Some(s.as_ref()),
                None => None,
            };
            while let Some(c) = cause {
                let text = match c.downcast_ref::<Error>() {
                    Some(e) => e.message.clone(),
                    None => c.to_string(),
                };
                let mut new = text.as_str();
                for s in &said {
                    if let Some(rest) = new.strip_prefix(s.as_str()) {
                        new = rest.trim_start_matches(": ");
                    }
                }
                if !new.is_empty() && !said.iter().any(|s| s.contains(new)) {
                    write!(f, ": {new}")?;
                    said.push(new.to_owned());
                }
                cause = c.source();
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("op", &self.op)
            .field("key", &self.key)
            .field("store", &self.store)
            .field("message", &self.message)
            .field("current_limit", &self.current_limit)
            .field("grant_unknown", &self.grant_unknown)
            .field("retryable", &self.retryable)
            .field("source", &self.source)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.source {
            Some(s) => Some(s.as_ref()),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_op_key_store_and_causes() {
        let key = Key::new("jobs/nightly").expect("valid");
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let err = Error::new(ErrorKind::Unavailable, "cannot open lock file")
            .with_op(Op::Acquire)
            .with_key(&key)
            .with_store("dir:/tmp/x")
            .with_source(io);
        assert_eq!(
            err.to_string(),
            "acquire 'jobs/nightly' on dir:/tmp/x: cannot open lock file"
        );
        assert_eq!(
            format!("{err:#}"),
            "acquire 'jobs/nightly' on dir:/tmp/x: cannot open lock file: denied"
        );
        assert!(err.is_retryable());
    }

    #[derive(Debug)]
    struct Chain(&'static str, Option<Box<Chain>>);
    impl fmt::Display for Chain {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for Chain {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1
                .as_deref()
                .map(|c| c as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn each_thing_is_said_once() {
        // A store message that repeats its driver's, over a driver error that repeats
        // its own cause: the full disk of the SQLite store.
        let driver = Chain(
            "the disk is full: database or disk is full",
            Some(Box::new(Chain(
                "database or disk is full: Error code 13",
                None,
            ))),
        );
        let err = Error::new(ErrorKind::Unavailable, "the disk is full").with_source(driver);
        assert_eq!(
            format!("{err:#}"),
            "the disk is full: database or disk is full: Error code 13"
        );
        // A wrapped baton error adds its message, not its context again.
        let inner = Error::new(ErrorKind::Unavailable, "I/O error on the database")
            .with_op(Op::Acquire)
            .with_source(Chain("disk I/O error", None));
        let outer =
            Error::new(ErrorKind::Unavailable, "I/O error on the database").with_source(inner);
        assert_eq!(
            format!("{outer:#}"),
            "I/O error on the database: disk I/O error"
        );
    }

    #[test]
    fn the_store_decides_retryability() {
        let refused = Error::new(ErrorKind::Unavailable, "etcd refused the credentials");
        assert!(refused.is_retryable());
        assert!(!refused.permanent().is_retryable());
        let transient = Error::new(ErrorKind::Corrupt, "x").with_retryable(true);
        assert!(transient.is_retryable());
    }
}
