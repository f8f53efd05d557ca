//! What lease mode keeps in a key's directory, and how it is read back:
//!
//! ```text
//! limit            the key's limit (and lock-delay), created once (temp file + link)
//! resize           resizes take turns on its OFD lock (empty)
//! token.T          the last token handed out is the highest T
//! slot.N.G         generation G of slot N: JSON {state, token, holder, ttl, heartbeat}
//! seen.N.G.BOOT    when a host (by boot id) first saw tombstone G of slot N, in ns on
//!                  its CLOCK_MONOTONIC (keys with a lock-delay only)
//! ```
//!
//! Guarantees: a file baton did not write (not baton's JSON, a record that names another
//! slot or generation, a symlink where a lease file belongs, a counter at `u64::MAX`) is
//! `InvalidData`, which the store reports as `Corrupt`; it is never taken for a free slot.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use baton_core::{Holder, Token};
use serde::{Deserialize, Serialize};

use crate::fs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum State {
    Held,
    Released,
    Broken,
    /// A tombstone a waiter wrote over a lease it found lost (stale or its holder gone),
    /// so that the key's lock-delay runs before the slot is granted again.
    Expired,
}

/// The contents of `slot.N.G`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LeaseRecord {
    pub state: State,
    pub slot: u32,
    pub gen: u64,
    pub token: Token,
    pub ttl_ms: u64,
    pub heartbeat: u64,
    pub acquired_unix_ms: u64,
    pub renewed_unix_ms: u64,
    pub holder: Holder,
}

impl LeaseRecord {
    /// A held lease of `slot` in the generation after `gen`, stamped now.
    pub fn held(
        slot: u32,
        gen: u64,
        token: Token,
        ttl: std::time::Duration,
        holder: Holder,
    ) -> io::Result<LeaseRecord> {
        let now = baton_core::kit::time::unix_ms_now();
        Ok(LeaseRecord {
            state: State::Held,
            slot,
            gen: gen
                .checked_add(1)
                .ok_or_else(|| at_maximum("lease generation"))?,
            token,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            heartbeat: 0,
            acquired_unix_ms: now,
            renewed_unix_ms: now,
            holder,
        })
    }
}

/// The lease and token files of a key directory.
#[derive(Default)]
pub(crate) struct Listing {
    pub tokens: Vec<u64>,
    pub gens: BTreeMap<u32, Vec<u64>>,
    /// `seen.N.G.BOOT` markers: (slot, generation, file name).
    pub seen: Vec<(u32, u64, String)>,
}

impl Listing {
    pub fn read(dir: BorrowedFd<'_>) -> io::Result<Listing> {
        let mut out = Listing::default();
        for (name, is_file) in fs::names(dir)? {
            let mut parts = name.split('.');
            let parts = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            );
            let parsed = match parts {
                (Some("token"), Some(t), None, None, None) => {
                    t.parse().map(|t| out.tokens.push(t)).is_ok()
                }
                (Some("slot"), Some(n), Some(g), None, None) => match (n.parse(), g.parse()) {
                    (Ok(n), Ok(g)) => {
                        out.gens.entry(n).or_default().push(g);
                        true
                    }
                    _ => false,
                },
                (Some("seen"), Some(n), Some(g), Some(_), None) => match (n.parse(), g.parse()) {
                    (Ok(n), Ok(g)) => {
                        out.seen.push((n, g, name.clone()));
                        true
                    }
                    _ => false,
                },
                _ => false,
            };
            if parsed && !is_file {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("'{name}' is not a regular file (a symlink?); refusing to use it"),
                ));
            }
        }
        out.tokens.sort_unstable();
        for gens in out.gens.values_mut() {
            gens.sort_unstable();
        }
        Ok(out)
    }

    /// The current generation of a slot (0: never taken).
    pub fn current(&self, slot: u32) -> u64 {
        self.gens
            .get(&slot)
            .and_then(|g| g.last().copied())
            .unwrap_or(0)
    }

    pub fn last_token(&self) -> u64 {
        self.tokens.last().copied().unwrap_or(0)
    }
}

pub(crate) fn slot_file(slot: u32, gen: u64) -> String {
    format!("slot.{slot}.{gen}")
}

pub(crate) fn token_file(token: u64) -> String {
    format!("token.{token}")
}

pub(crate) fn seen_file(slot: u32, gen: u64, boot: &str) -> String {
    format!("seen.{slot}.{gen}.{boot}")
}

/// This host's `CLOCK_MONOTONIC` in ns, as the `seen.N.G.BOOT` stamps record it.
pub(crate) fn now_ns() -> u64 {
    u64::try_from(baton_core::kit::time::monotonic_ns()).unwrap_or(0)
}

/// Reads `slot.N.G`: `Ok(None)` when it is gone (cleaned up: a newer generation exists).
pub(crate) fn read_record(
    dir: BorrowedFd<'_>,
    slot: u32,
    gen: u64,
) -> io::Result<Option<LeaseRecord>> {
    let name = slot_file(slot, gen);
    let Some(fd) = fs::open_existing_ro(dir, &name)? else {
        return Ok(None);
    };
    let bytes = fs::read_small(fd.as_fd(), &name)?;
    let record: LeaseRecord = serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("lease file '{name}' is not baton's JSON: {e}"),
        )
    })?;
    if record.slot != slot || record.gen != gen {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "lease file '{name}' says slot {} generation {}",
                record.slot, record.gen
            ),
        ));
    }
    Ok(Some(record))
}

/// A counter kept in file names (a token, a lease generation) at `u64::MAX`: nothing baton
/// wrote can get there, so it is corrupt or hostile state, and it must not wrap.
pub(crate) fn at_maximum(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the {what} in a file name is at its maximum (u64::MAX): not a value baton wrote"),
    )
}
