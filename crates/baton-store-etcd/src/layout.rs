//! What the etcd store keeps in etcd: the names of a key's entries, the records they
//! hold, and the one read of a key's whole state ([`View`]), checked as it is parsed.
//!
//! Layout under the prefix `P` for a key `K` (`#` cannot occur in a key, so no key's
//! entries can be mistaken for another's):
//! - `P/K#limit`: the limit, a decimal number, without a lease;
//! - `P/K#w/<lease id, hex>`: one per request, waiting or holding, attached to the
//!   request's lease; value: JSON with the holder and the TTL;
//! - `P/K#s/<slot>`: one per grant, attached to the holder's lease; value: JSON with the
//!   waiter's id. The grant's fencing token is this key's create revision.
//! - `P/K#delay`: the key's lock-delay in ms, created with the limit (keys with one only);
//! - `P/K#g/<slot>`: (keys with a lock-delay) written without a lease in the transaction
//!   that creates the slot key, deleted with it by a clean release. A `#g` key whose slot
//!   key is gone is a lease that was lost (expired or broken), not released;
//! - `P/K#h/<slot>`: (keys with a lock-delay) the slot is held back while it exists: the
//!   first process to see a loss (the breaker, or an acquirer that finds an orphaned `#g`
//!   key) creates it, in the transaction that deletes the `#g` key, attached to an etcd
//!   lease of the delay's TTL, so etcd's own lease clock ends the delay and no wall clock
//!   is read.
//!
//! Guarantees: a [`View`] is built only from entries that pass baton's checks: a waiter,
//! slot or hold-back key without an etcd lease, a slot key without a slot number or
//! baton's record, a `#g` or `#h` key without a slot number, a limit or lock-delay that is
//! not a number in range, and lock-delay records without the delay are `Corrupt`, naming
//! the entry, rather than guessed at. (A waiter key's value is read only where it is
//! needed; `status` shows an unreadable one as such.)

use std::time::{Duration, SystemTime};

use baton_core::kit::errors;
use baton_core::{unix_ms, Error, ErrorKind, Holder, Key, Liveness, Op};
use etcd_client::{GetOptions, KeyValue, SortOrder, SortTarget, Txn, TxnOp, TxnResponse};
use serde::{Deserialize, Serialize};

use crate::core::{txn_reads, Inner};

/// The value of a waiter key.
#[derive(Serialize, Deserialize)]
pub(crate) struct WaiterValue {
    pub(crate) holder: Holder,
    pub(crate) ttl_ms: u64,
}

/// The value of a slot key.
#[derive(Serialize, Deserialize)]
pub(crate) struct SlotValue {
    /// The waiter key's last path part: the lease id in hex.
    pub(crate) waiter: String,
    pub(crate) acquired_unix_ms: u64,
}

/// A waiter key as read.
pub(crate) struct Entry {
    pub(crate) key: Vec<u8>,
    pub(crate) create_rev: i64,
    pub(crate) lease: i64,
    pub(crate) value: Vec<u8>,
}

impl Entry {
    /// True when the entry's holder was on this host and boot and its process is gone
    /// (a positive finding only; see [`baton_core::Holder::liveness`]).
    pub(crate) fn holder_dead(&self) -> bool {
        serde_json::from_slice::<WaiterValue>(&self.value)
            .is_ok_and(|v| v.holder.liveness() == Liveness::Dead)
    }
}

/// A slot key as read, checked.
pub(crate) struct SlotEntry {
    pub(crate) slot: u32,
    pub(crate) create_rev: i64,
    pub(crate) lease: i64,
    pub(crate) value: SlotValue,
}

/// A key's state at one revision.
pub(crate) struct View {
    pub(crate) revision: i64,
    /// The limit, and the limit key's mod revision; `None` when there is no limit key.
    pub(crate) limit: Option<(u32, i64)>,
    /// Waiter keys, by create revision.
    pub(crate) entries: Vec<Entry>,
    pub(crate) slots: Vec<SlotEntry>,
    /// The key's lock-delay, if it has one.
    pub(crate) delay: Option<Duration>,
    /// `#g/<slot>` keys: (slot, mod revision).
    pub(crate) grants: Vec<(u32, i64)>,
    /// `#h/<slot>` keys: (slot, the etcd lease that ends the hold, its value).
    pub(crate) holds: Vec<(u32, i64, Vec<u8>)>,
}

impl View {
    /// Grant records whose slot key is gone: leases lost, not yet held back.
    pub(crate) fn orphans(&self) -> Vec<(u32, i64)> {
        self.grants
            .iter()
            .filter(|(slot, _)| !self.slots.iter().any(|s| s.slot == *slot))
            // One already held back is garbage (no grant is made while a hold exists);
            // it must not make an acquirer try to hold it back again and again.
            .filter(|(slot, _)| !self.held_back(*slot))
            .copied()
            .collect()
    }

    pub(crate) fn held_back(&self, slot: u32) -> bool {
        self.holds.iter().any(|(s, _, _)| *s == slot)
    }
}

/// The value of a `#h/<slot>` key (for `status`; no decision reads it).
#[derive(Serialize, Deserialize)]
pub(crate) struct HoldValue {
    /// The lost grant's token.
    pub(crate) token: i64,
    /// `expired` or `broken`.
    pub(crate) how: String,
    pub(crate) lost_unix_ms: u64,
}

/// The names of one key's entries.
pub(crate) struct Names {
    pub(crate) limit: String,
    pub(crate) waiters: String,
    pub(crate) slots: String,
    pub(crate) delay: String,
    pub(crate) grants: String,
    pub(crate) holds: String,
}

impl Names {
    /// The prefix every entry of the key has.
    pub(crate) fn all(&self) -> String {
        self.limit
            .strip_suffix("limit")
            .unwrap_or(&self.limit)
            .to_owned()
    }
    pub(crate) fn grant(&self, slot: u32) -> String {
        format!("{}{slot}", self.grants)
    }
    pub(crate) fn hold(&self, slot: u32) -> String {
        format!("{}{slot}", self.holds)
    }
    pub(crate) fn waiter(&self, id: i64) -> String {
        format!("{}{id:016x}", self.waiters)
    }
    /// The waiter key whose last part is `hex` (a slot record's `waiter`).
    pub(crate) fn waiter_named(&self, hex: &str) -> String {
        format!("{}{hex}", self.waiters)
    }
    pub(crate) fn slot(&self, slot: u32) -> String {
        format!("{}{slot}", self.slots)
    }
}

/// `Corrupt`, permanent: `what` (an etcd key) is not what baton writes, for the reason
/// `why`.
pub(crate) fn corrupt(what: impl std::fmt::Display, why: impl std::fmt::Display) -> Error {
    errors::corrupt(what, why).permanent()
}

pub(crate) fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// The longest lock-delay a key can have.
pub(crate) const MAX_LOCK_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

fn parse_delay(names: &Names, kv: &KeyValue) -> Result<Duration, Error> {
    std::str::from_utf8(kv.value())
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_millis)
        .filter(|d| !d.is_zero() && *d <= MAX_LOCK_DELAY)
        .ok_or_else(|| {
            corrupt(
                &names.delay,
                format_args!(
                    "holds {:?}, not a lock-delay (milliseconds, 1 or more)",
                    String::from_utf8_lossy(&kv.value()[..kv.value().len().min(40)])
                ),
            )
        })
}

pub(crate) fn parse_limit(names: &Names, kv: &KeyValue) -> Result<u32, Error> {
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            corrupt(
                &names.limit,
                format_args!(
                    "holds {:?}, not a limit (a number of slots, 1 or more)",
                    String::from_utf8_lossy(&kv.value()[..kv.value().len().min(40)])
                ),
            )
        })
}

impl Inner {
    /// The value of a slot key: granted to `waiter` (its lease id in hex), now.
    pub(crate) fn slot_value(&self, waiter: String) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(&SlotValue {
            waiter,
            acquired_unix_ms: unix_ms(SystemTime::now()),
        })
        .map_err(|e| Error::new(ErrorKind::InvalidInput, "cannot encode the slot").with_source(e))
    }

    pub(crate) fn names(&self, key: &Key) -> Names {
        let base = format!("{}/{}", self.config.prefix, key.as_str());
        Names {
            limit: format!("{base}#limit"),
            waiters: format!("{base}#w/"),
            slots: format!("{base}#s/"),
            delay: format!("{base}#delay"),
            grants: format!("{base}#g/"),
            holds: format!("{base}#h/"),
        }
    }

    pub(crate) fn read_ops(&self, names: &Names) -> Vec<TxnOp> {
        vec![
            TxnOp::get(names.limit.clone(), None),
            TxnOp::get(
                names.waiters.clone(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend),
                ),
            ),
            TxnOp::get(names.slots.clone(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(names.delay.clone(), None),
            TxnOp::get(names.grants.clone(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(names.holds.clone(), Some(GetOptions::new().with_prefix())),
        ]
    }

    /// Parses the responses of [`Inner::read_ops`], the last six of `resp`.
    pub(crate) fn parse_view(&self, names: &Names, resp: &TxnResponse) -> Result<View, Error> {
        let (revision, g) = txn_reads(resp, 6)?;
        let limit = match g[0].kvs().first() {
            None => None,
            Some(kv) => Some((parse_limit(names, kv)?, kv.mod_revision())),
        };
        let mut entries = Vec::new();
        for kv in g[1].kvs() {
            if kv.lease() == 0 {
                return Err(corrupt(
                    show(kv.key()),
                    "is a waiter key without an etcd lease: baton did not write it (delete it \
                     with etcdctl if nobody uses it)",
                ));
            }
            entries.push(Entry {
                key: kv.key().to_vec(),
                create_rev: kv.create_revision(),
                lease: kv.lease(),
                value: kv.value().to_vec(),
            });
        }
        entries.sort_by_key(|e| e.create_rev);
        let mut slots = Vec::new();
        for kv in g[2].kvs() {
            let name = show(kv.key());
            let slot = name
                .strip_prefix(&names.slots)
                .and_then(|s| s.parse::<u32>().ok())
                .ok_or_else(|| corrupt(&name, "is not a slot key baton writes (no slot number)"))?;
            if kv.lease() == 0 {
                return Err(corrupt(
                    &name,
                    "is a slot key without an etcd lease: baton did not write it",
                ));
            }
            let value: SlotValue = serde_json::from_slice(kv.value()).map_err(|e| {
                corrupt(
                    &name,
                    format_args!("does not hold baton's slot record: {e}"),
                )
            })?;
            slots.push(SlotEntry {
                slot,
                create_rev: kv.create_revision(),
                lease: kv.lease(),
                value,
            });
        }
        slots.sort_by_key(|s| s.slot);
        let delay = match g[3].kvs().first() {
            None => None,
            Some(kv) => Some(parse_delay(names, kv)?),
        };
        let slot_of = |prefix: &str, kv: &KeyValue| -> Result<u32, Error> {
            let name = show(kv.key());
            name.strip_prefix(prefix)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u32>().ok())
                .ok_or_else(|| corrupt(&name, "is not a key baton writes (no slot number)"))
        };
        let mut grants = Vec::new();
        for kv in g[4].kvs() {
            grants.push((slot_of(&names.grants, kv)?, kv.mod_revision()));
        }
        let mut holds = Vec::new();
        for kv in g[5].kvs() {
            let slot = slot_of(&names.holds, kv)?;
            if kv.lease() == 0 {
                // Without a lease it would hold the slot back for ever.
                return Err(corrupt(
                    show(kv.key()),
                    "holds a slot back without an etcd lease: baton did not write it",
                ));
            }
            holds.push((slot, kv.lease(), kv.value().to_vec()));
        }
        if delay.is_none() && !(grants.is_empty() && holds.is_empty()) {
            return Err(corrupt(
                &names.delay,
                "is missing although the key has lock-delay records",
            ));
        }
        Ok(View {
            revision,
            limit,
            entries,
            slots,
            delay,
            grants,
            holds,
        })
    }

    pub(crate) async fn read_view(&self, op: Op, key: &Key, names: &Names) -> Result<View, Error> {
        let resp = self
            .txn(op, key, Txn::new().and_then(self.read_ops(names)))
            .await?;
        self.parse_view(names, &resp)
    }
}
