//! What the store keeps in RabbitMQ: the queues of a key, their names and arguments, and
//! the bodies of the messages baton publishes.
//!
//! Per key `K`, every name starting `PREFIX.k.K`:
//! - `.gate`: a durable quorum queue with single-active-consumer and one message, the
//!   gate (body: the key's limit and token base). Waiters consume it in arrival order; the one the broker
//!   makes active holds the gate while it takes a slot, then returns it (closes its
//!   channel), which makes the next waiter active. The message is never acknowledged, so
//!   its `x-delivery-count` rises by one at every hand-over: the fencing token is the
//!   base + that count + 1.
//! - `.slots`: a durable quorum queue of one message per slot number below the key's
//!   span (body: the slot number; the span is the highest limit the key had), consumed
//!   only by the gate's holder, and the nudges of resizes ([`NUDGE`]). A held slot is an unacknowledged
//!   delivery on its holder's connection; closing the channel returns it.
//! - `.waiters`: a durable classic queue that never has messages: every waiting acquire
//!   consumes it, so its consumer count is the number of waiters (a single-active-consumer
//!   quorum queue counts only its active consumer).
//! - `.meta`: a durable classic queue with one message: the key's limit (the one that
//!   counts: a resize rewrites it, under the `init` lock), the highest slot number ever
//!   made (`span`) and the rewrite's generation (`gen`; after a resize that died between
//!   its publish and its acknowledgement, the highest generation wins).
//! - `.rec.N`: a durable classic queue per slot with the holder records of slot N (the
//!   newest wins), and `.held.N.TOKEN`: an exclusive queue of the holder's connection,
//!   which exists exactly as long as that grant: a record whose `held` queue is gone is
//!   stale.
//! - `.init`: an exclusive queue, the lock under which a key's queues are created and
//!   deleted.
//!
//! And `PREFIX.keys`, a durable classic queue with one message per key (its name), for
//! `list`; and per key deleted at least once, `PREFIX.floor.K`, a durable classic queue
//! with one persistent message, the key's token floor (outside `PREFIX.k.K`: it outlives
//! the key's deletion, and the key's next creation starts its gate's `base` there).

use baton_core::kit::errors;
use baton_core::{Error, Key};
use serde::{Deserialize, Serialize};

/// The highest limit a key can have (one message and one record queue per slot).
pub(crate) const MAX_LIMIT: u32 = 1000;

/// The queue names of one key.
#[derive(Clone, Debug)]
pub(crate) struct Names {
    key: String,
    prefix: String,
    base: String,
}

impl Names {
    pub(crate) fn new(prefix: &str, key: &Key) -> Names {
        Names {
            key: key.as_str().to_owned(),
            prefix: prefix.to_owned(),
            base: format!("{prefix}.k.{}", key.as_str()),
        }
    }

    pub(crate) fn key(&self) -> &str {
        &self.key
    }

    pub(crate) fn gate(&self) -> String {
        format!("{}.gate", self.base)
    }

    pub(crate) fn slots(&self) -> String {
        format!("{}.slots", self.base)
    }

    pub(crate) fn waiters(&self) -> String {
        format!("{}.waiters", self.base)
    }

    pub(crate) fn meta(&self) -> String {
        format!("{}.meta", self.base)
    }

    pub(crate) fn init(&self) -> String {
        format!("{}.init", self.base)
    }

    pub(crate) fn record(&self, slot: u32) -> String {
        format!("{}.rec.{slot}", self.base)
    }

    pub(crate) fn held(&self, slot: u32, token: u64) -> String {
        format!("{}.held.{slot}.{token}", self.base)
    }

    /// The key's token floor, kept when the key is deleted (not under the key's own
    /// names, which a delete removes).
    pub(crate) fn floor(&self) -> String {
        format!("{}.floor.{}", self.prefix, self.key)
    }
}

/// The queue of key names.
pub(crate) fn keys_queue(prefix: &str) -> String {
    format!("{prefix}.keys")
}

/// The gate message's body, and the meta message's. The gate message is written once,
/// when the key is made (its `limit` is the key's first); the meta message's `limit` is
/// the key's limit now.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Gate {
    pub(crate) limit: u32,
    /// What the key's tokens start above: a grant's token is `base` + the gate message's
    /// `x-delivery-count` + 1. A key made anew after a delete starts at its floor (see
    /// [`Floor`]); a gate written before delete existed has none (0).
    #[serde(default)]
    pub(crate) base: u64,
    /// Slot messages exist for the numbers below `span` (at least `limit`): a lowered
    /// limit leaves the messages above it, held or free, and a raised one makes messages
    /// only for numbers never made. 0 in a message written before resize existed.
    #[serde(default)]
    pub(crate) span: u32,
    /// The meta message's generation: every resize writes the next one.
    #[serde(default)]
    pub(crate) gen: u64,
}

impl Gate {
    pub(crate) fn parse(what: &str, data: &[u8]) -> Result<Gate, Error> {
        let g: Gate = serde_json::from_slice(data)
            .map_err(|e| errors::corrupt(what, format!("is not baton's ({e})")))?;
        if g.limit == 0 || g.limit > MAX_LIMIT {
            return Err(errors::corrupt(
                what,
                format!("names a limit of {} slots", g.limit),
            ));
        }
        if g.span > MAX_LIMIT {
            return Err(errors::corrupt(
                what,
                format!("names {} slot numbers", g.span),
            ));
        }
        Ok(g)
    }

    /// The slot numbers that have a message: `0..span()`.
    pub(crate) fn span(&self) -> u32 {
        self.span.max(self.limit)
    }

    /// The meta message of the highest generation among `messages` (a resize that died
    /// between its publish and its acknowledgement leaves two).
    pub(crate) fn newest_meta(messages: &[Vec<u8>]) -> Result<Option<Gate>, Error> {
        let mut best: Option<Gate> = None;
        for m in messages {
            let g = Gate::parse("the key's meta message", m)?;
            if best.as_ref().is_none_or(|b| g.gen > b.gen) {
                best = Some(g);
            }
        }
        Ok(best)
    }
}

/// The body of the message in a key's floor queue ([`Names::floor`]): every token the
/// key granted before it was deleted is below `base` + 1, so a key made anew whose gate
/// starts at this `base` grants only higher ones.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Floor {
    pub(crate) base: u64,
}

impl Floor {
    /// The highest floor among `messages` (a delete leaves one), 0 when there is none.
    pub(crate) fn highest(messages: &[Vec<u8>]) -> Result<u64, Error> {
        let mut base = 0;
        for m in messages {
            let f: Floor = serde_json::from_slice(m).map_err(|e| {
                errors::corrupt(
                    "the key's token floor message",
                    format!("is not baton's ({e})"),
                )
            })?;
            base = base.max(f.base);
        }
        Ok(base)
    }
}

/// The body of the message a resize that raised the limit publishes to `slots` when no
/// slot message was ready: it wakes a gate holder waiting for a slot, which reads the
/// limit again (a slot it set aside may be below the new one) and acknowledges it.
pub(crate) const NUDGE: &[u8] = b"resized";

/// A message of the `slots` queue: a slot number, or a resize's nudge (`None`).
pub(crate) fn parse_slot(data: &[u8]) -> Result<Option<u32>, Error> {
    if data == NUDGE {
        return Ok(None);
    }
    std::str::from_utf8(data)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|s| *s < MAX_LIMIT)
        .map(Some)
        .ok_or_else(|| {
            errors::corrupt(
                "a slot message",
                format!(
                    "is not a slot number below {MAX_LIMIT}: {:?}",
                    String::from_utf8_lossy(data)
                ),
            )
        })
}

/// A holder record: who holds slot `slot` with `token`, since when, with which TTL, and
/// whether the holder released it. A slot whose newest record was not released was lost
/// (its holder's connection ended), and the next holder waits out the record's TTL before
/// it takes the slot: the old holder stops its work by then.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) token: u64,
    /// The holder, as [`baton_core::Holder::to_json`] writes it.
    pub(crate) holder: String,
    pub(crate) since_unix_ms: u64,
    pub(crate) ttl_ms: u64,
    #[serde(default)]
    pub(crate) released: bool,
}

impl Record {
    /// The newest of the records in `messages` (the highest token).
    pub(crate) fn newest(slot: u32, messages: &[Vec<u8>]) -> Result<Option<Record>, Error> {
        let mut newest: Option<Record> = None;
        for m in messages {
            let r: Record = serde_json::from_slice(m).map_err(|e| {
                errors::corrupt(
                    format!("the holder record of slot {slot}"),
                    format!("is not baton's ({e})"),
                )
            })?;
            // A release re-publishes its record marked released: on a tie, that one.
            let newer = newest
                .as_ref()
                .is_none_or(|n| r.token > n.token || (r.token == n.token && r.released));
            if newer {
                newest = Some(r);
            }
        }
        Ok(newest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_written_before_delete_existed_has_base_zero() {
        let g = Gate::parse("gate", br#"{"limit":3}"#).expect("old gate");
        assert_eq!(
            g,
            Gate {
                limit: 3,
                base: 0,
                span: 0,
                gen: 0
            }
        );
        assert_eq!(g.span(), 3);
        let g = Gate::parse("gate", br#"{"limit":1,"base":41}"#).expect("new gate");
        assert_eq!(g.base, 41);
    }

    #[test]
    fn the_newest_meta_message_wins_and_slot_messages_parse() {
        let m = |limit: u32, gen: u64| {
            serde_json::to_vec(&Gate {
                limit,
                base: 0,
                span: 5,
                gen,
            })
            .expect("json")
        };
        let g = Gate::newest_meta(&[m(2, 3), m(4, 7), m(1, 5)]).expect("metas");
        assert_eq!(g.map(|g| (g.limit, g.span())), Some((4, 5)));
        assert_eq!(Gate::newest_meta(&[]).expect("none"), None);
        assert_eq!(parse_slot(b"7").expect("slot"), Some(7));
        assert_eq!(parse_slot(NUDGE).expect("nudge"), None);
        assert!(parse_slot(b"1000").is_err());
    }

    #[test]
    fn the_highest_floor_wins_and_none_is_zero() {
        assert_eq!(Floor::highest(&[]).expect("none"), 0);
        let f = |b: u64| serde_json::to_vec(&Floor { base: b }).expect("json");
        assert_eq!(Floor::highest(&[f(7), f(12), f(3)]).expect("floors"), 12);
        let e = Floor::highest(&[b"many".to_vec()]).expect_err("garbage");
        assert_eq!(e.kind(), baton_core::ErrorKind::Corrupt);
    }
}
