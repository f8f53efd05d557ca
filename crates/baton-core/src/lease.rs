//! Leases, fencing tokens and wait modes.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Holder, Key};

/// A fencing token: strictly greater than every token granted before for the same key in
/// the same store. A protected resource that remembers the highest token it has seen and
/// rejects lower ones is safe even from a holder that was paused past its lease.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Token(pub u64);

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.0)
    }
}

/// How long an acquire may wait for a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Wait {
    /// Wait until a slot is free.
    #[default]
    Forever,
    /// Wait at most this long, then fail with [`crate::ErrorKind::Timeout`].
    Timeout(Duration),
    /// Do not wait: fail with [`crate::ErrorKind::Busy`] if no slot is free now.
    NoWait,
}

/// One granted slot of a key.
///
/// A `Lease` is plain data: it names the grant, and the store that granted it keeps
/// whatever it needs to hold it (an open file, a session). Pass it back to
/// [`crate::Store::release`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The key.
    pub key: Key,
    /// Which slot of the key, `0..limit`.
    pub slot: u32,
    /// The key's limit when the lease was granted.
    pub limit: u32,
    /// The fencing token of this grant.
    pub token: Token,
    /// Who holds it.
    pub holder: Holder,
    /// The lease's time to live, for stores that expire leases; `None` for kernel locks,
    /// which last as long as the holding process.
    #[serde(
        default,
        rename = "ttl_ms",
        skip_serializing_if = "Option::is_none",
        with = "opt_ms"
    )]
    pub ttl: Option<Duration>,
    /// When it was granted, in milliseconds since the Unix epoch (display only).
    pub acquired_unix_ms: u64,
    /// For lease stores: the monotonic instant just before the request that created this
    /// grant was sent. The store's expiry counts from a later moment, so the keeper's first
    /// deadline counts from this one. Not serialized (an `Instant` means nothing elsewhere).
    #[serde(skip)]
    pub sent_at: Option<std::time::Instant>,
}

mod opt_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(d.as_millis() as u64),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}
