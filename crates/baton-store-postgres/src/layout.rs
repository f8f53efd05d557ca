//! What lives in the store, as this crate reads and writes it: the limits of a key's
//! values, the lease rows a look or `status` returns (decoded, their types checked), the
//! parts of a request written into rows, and the numbers baton owns in a schema (the
//! first half of its advisory locks) and on a host (the PID namespace written with every
//! grant).
//!
//! Guarantees: a value that is not what baton wrote (a column of another type, a NULL
//! where baton writes none, a slot, token, limit or lock-delay out of range) is `Corrupt`,
//! with a message naming the row or column, never a panic or a guess; the advisory lock
//! number of a schema is the same in every process and release.

use std::time::Duration;

use baton_core::kit::time::validate_ttl;
use baton_core::{AcquireRequest, Error, ErrorKind, Holder};
use tokio_postgres::Row;

use crate::core::{corrupt, Fail};

/// The TTL of a lease whose request gives none (the kit's, for every store).
pub use baton_core::kit::time::DEFAULT_TTL;

/// The longest lock-delay a key may have: a century, in milliseconds (the column is a
/// `bigint` of milliseconds; the kit bounds TTLs, not lock-delays, and a lock-delay only
/// holds back a lost lease's slot, so no shorter bound is needed for safety).
pub const MAX_LOCK_DELAY_MS: i64 = 100 * 365 * 24 * 3600 * 1000;

/// The most slots a key may have: a limit is a count of concurrent holders, and `status`
/// lists every slot.
pub const MAX_LIMIT: u32 = 1_000_000;

/// The identity of a lease row as a claim names it: any renewal, release, break or
/// takeover changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RowId {
    pub(crate) slot: u32,
    pub(crate) token: i64,
    pub(crate) renewals: i64,
    /// Held back by the key's lock-delay after the lease was lost.
    pub(crate) lost: bool,
}

/// A lease row as a look saw it.
#[derive(Clone, Debug)]
pub(crate) struct Looked {
    pub(crate) id: RowId,
    pub(crate) ttl: Duration,
    pub(crate) holder: Option<Holder>,
}

/// The lease rows a look returned (`o_rows`, five numbers a row, and `o_holders`: the
/// holder's JSON for holders that share the caller's boot id, NULL for the others, whose
/// process this host cannot judge).
pub(crate) fn looked(row: &Row) -> Result<Vec<Looked>, Fail> {
    let nums: Vec<i64> = col::<Option<Vec<i64>>>(row, 9)?.unwrap_or_default();
    let holders: Vec<Option<String>> =
        col::<Option<Vec<Option<String>>>>(row, 10)?.unwrap_or_default();
    if nums.len() % 5 != 0 || nums.len() / 5 != holders.len() {
        return Err(corrupt(
            "the attempt function",
            "answered a malformed list of lease rows",
        ));
    }
    let mut out = Vec::with_capacity(holders.len());
    for (n, h) in nums.chunks_exact(5).zip(holders) {
        let slot = u32::try_from(n[0])
            .map_err(|_| corrupt("the attempt function", format!("answered slot {}", n[0])))?;
        out.push(Looked {
            id: RowId {
                slot,
                token: n[1],
                renewals: n[2],
                lost: n[4] != 0,
            },
            ttl: Duration::from_millis(u64::try_from(n[3]).unwrap_or(0).max(1)),
            holder: h.as_deref().and_then(Holder::from_json),
        });
    }
    Ok(out)
}

/// The key's lock-delay a look returned (`o_delay_ms`).
pub(crate) fn delay_of(row: &Row) -> Result<Duration, Fail> {
    let ms: Option<i64> = col(row, 8)?;
    Ok(Duration::from_millis(ms.unwrap_or(0).max(0) as u64))
}

/// A lease row as read, types checked.
pub(crate) struct LeaseRow {
    pub(crate) slot: u32,
    pub(crate) token: u64,
    pub(crate) holder_id: String,
    pub(crate) holder_json: String,
    pub(crate) since_ms: Option<u64>,
    pub(crate) renewed_ms: Option<u64>,
    pub(crate) expires_ms: Option<u64>,
    /// Held back by the lock-delay after it was lost.
    pub(crate) lost: bool,
    /// The server's clock says a TTL passed since the last renewal (a hint for display).
    pub(crate) overdue: bool,
    /// The holder's PID namespace.
    pub(crate) pid_ns: Option<String>,
}

pub(crate) fn key_row(row: &Row, key: &str) -> Result<(u32, u64, u64), Fail> {
    let lim: Option<i32> = col(row, 0)?;
    let seq: Option<i64> = col(row, 1)?;
    let delay: Option<i64> = col(row, 2)?;
    let lim = lim
        .and_then(|l| u32::try_from(l).ok())
        .filter(|l| (1..=MAX_LIMIT).contains(l))
        .ok_or_else(|| {
            corrupt(
                format_args!("the keys row of {key}"),
                format!(
                    "holds the limit {}, not a limit of 1 to {MAX_LIMIT} slots",
                    lim.map_or("NULL".into(), |l| l.to_string())
                ),
            )
        })?;
    let seq = seq.and_then(|s| u64::try_from(s).ok()).ok_or_else(|| {
        corrupt(
            format_args!("the keys row of {key}"),
            format!(
                "holds the token sequence {}, not a count of tokens",
                seq.map_or("NULL".into(), |s| s.to_string())
            ),
        )
    })?;
    let delay = delay.and_then(|d| u64::try_from(d).ok()).ok_or_else(|| {
        corrupt(
            format_args!("the keys row of {key}"),
            format!(
                "holds the lock-delay {}, not a number of milliseconds",
                delay.map_or("NULL".into(), |d| d.to_string())
            ),
        )
    })?;
    Ok((lim, seq, delay))
}

fn unix_ms_of(v: Option<f64>) -> Option<u64> {
    v.filter(|s| s.is_finite() && *s >= 0.0).map(|s| s as u64)
}

pub(crate) fn lease_row(r: &Row, key: &str) -> Result<LeaseRow, Fail> {
    let slot: Option<i32> = col(r, 0)?;
    let token: Option<i64> = col(r, 1)?;
    let holder_id: Option<String> = col(r, 2)?;
    let holder_json: Option<String> = col(r, 3)?;
    let since: Option<f64> = col(r, 4)?;
    let renewed: Option<f64> = col(r, 5)?;
    let expires: Option<f64> = col(r, 6)?;
    let lost: Option<bool> = col(r, 7)?;
    let overdue: Option<bool> = col(r, 8)?;
    let pid_ns: Option<String> = col(r, 9)?;
    match (
        slot.and_then(|s| u32::try_from(s).ok()),
        token
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t >= 1),
        holder_id,
        lost,
    ) {
        (Some(slot), Some(token), Some(holder_id), Some(lost)) => Ok(LeaseRow {
            slot,
            token,
            holder_id,
            holder_json: holder_json.unwrap_or_default(),
            since_ms: unix_ms_of(since),
            renewed_ms: unix_ms_of(renewed),
            expires_ms: unix_ms_of(expires),
            lost,
            overdue: overdue.unwrap_or(false),
            pid_ns,
        }),
        _ => Err(corrupt(
            format_args!("a leases row of {key}"),
            format!(
                "holds slot {}, token {}: not a lease baton wrote",
                slot.map_or("NULL".into(), |s| s.to_string()),
                token.map_or("NULL".into(), |t| t.to_string())
            ),
        )),
    }
}

/// Column `i` of a row, or corrupt state when its type is not the one baton wrote (a
/// table altered by hand).
pub(crate) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    r: &'a Row,
    i: usize,
) -> Result<T, Fail> {
    r.try_get(i).map_err(|e| {
        let (name, ty) = r
            .columns()
            .get(i)
            .map(|c| (c.name().to_owned(), c.type_().to_string()))
            .unwrap_or_default();
        corrupt(
            format_args!("column {name}"),
            format!(
                "holds a value of type {ty} that baton did not write ({e}); the tables were \
                 altered by hand"
            ),
        )
    })
}

pub(crate) fn u32_of(v: Option<i32>, what: &str) -> Result<u32, Fail> {
    v.and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| corrupt("the store", format!("answered {v:?} as a {what}")))
}

/// The parts of a request written into rows, encoded once.
pub(crate) struct Encoded {
    pub(crate) holder_id: String,
    pub(crate) holder_json: String,
    pub(crate) ttl: Duration,
    pub(crate) ttl_ms: i64,
    /// The lock-delay a new key gets (0: none).
    pub(crate) lock_delay_ms: i64,
}

impl Encoded {
    pub(crate) fn new(req: &AcquireRequest) -> Result<Encoded, Error> {
        let ttl = validate_ttl(req.ttl, &req.key)?;
        let ttl_ms = ttl_ms(ttl);
        let holder_json = req.holder.to_json()?;
        let lock_delay_ms = match req.lock_delay {
            Some(d) if !d.is_zero() => i64::try_from(d.as_millis().max(1))
                .ok()
                .filter(|ms| *ms <= MAX_LOCK_DELAY_MS)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidInput,
                        "the lock-delay is too large (over 100 years)",
                    )
                })?,
            _ => 0,
        };
        Ok(Encoded {
            holder_id: req.holder.id.to_string(),
            holder_json,
            ttl,
            ttl_ms,
            lock_delay_ms,
        })
    }
}

/// The TTL in whole milliseconds (the server's timestamps have microseconds; a TTL is
/// rounded down so that the server never counts longer than the holder). The TTL was
/// checked by `kit::time::validate_ttl` (10ms to 7 days), so it fits.
pub(crate) fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// This process's PID namespace as the kernel names it (`pid:[4026531836]`). Two
/// processes with the same boot id but different namespaces (containers sharing the host's
/// name, as with host networking) cannot see each other's PIDs: a PID missing from our
/// `/proc` then proves nothing.
pub(crate) fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.display().to_string())
}

/// A stable 31-bit number from the schema name (FNV-1a), the first half of the
/// advisory locks baton takes in it; stable across processes and releases.
pub(crate) fn magic(schema: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("baton:{schema}").bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h & 0x7fff_ffff) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_is_stable_and_positive() {
        assert_eq!(magic("baton"), magic("baton"));
        assert_ne!(magic("baton"), magic("jobs"));
        assert!(magic("baton") >= 0);
    }
}
