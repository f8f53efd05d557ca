//! What the store keeps in ZooKeeper, under the root `/PREFIX`:
//!
//! - `/PREFIX/keys/ENC` — one persistent node per key (ENC is the key with `/` written as
//!   `%`), data `baton-zk 1 limit=N`: the key's limit stays until the key is resized, as
//!   in every store.
//! - `ENC/q-GUID-SEQ` — one ephemeral sequential node per request, in its own session,
//!   data: the holder's JSON. Ordered by SEQ; the first `limit` hold. Its `czxid` is the
//!   token.
//! - `ENC/slot-N` — ephemeral, created by a holder to claim slot N, data: its GUID.

use baton_core::kit::errors;
use baton_core::{Error, Key};

/// The data of a key node begins with this.
pub(crate) const KEY_MAGIC: &str = "baton-zk 1 limit=";

pub(crate) fn keys_dir(root: &str) -> String {
    format!("{root}/keys")
}

pub(crate) fn key_path(root: &str, key: &Key) -> String {
    format!("{}/{}", keys_dir(root), key.as_str().replace('/', "%"))
}

pub(crate) fn key_of(name: &str) -> String {
    name.replace('%', "/")
}

pub(crate) fn key_data(limit: u32) -> Vec<u8> {
    format!("{KEY_MAGIC}{limit}").into_bytes()
}

pub(crate) fn corrupt(why: impl std::fmt::Display) -> Error {
    errors::corrupt("a ZooKeeper node is not baton's:", why)
}

/// The limit a key node records.
pub(crate) fn parse_limit(path: &str, data: &[u8]) -> Result<u32, Error> {
    std::str::from_utf8(data)
        .ok()
        .and_then(|s| s.strip_prefix(KEY_MAGIC))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            corrupt(format!(
                "{path} holds {:?}, not '{KEY_MAGIC}N'",
                String::from_utf8_lossy(&data[..data.len().min(40)])
            ))
        })
}

/// One request node: its name, GUID and sequence number.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) guid: String,
    pub(crate) seq: u64,
}

pub(crate) fn queue_prefix(guid: &str) -> String {
    format!("q-{guid}-")
}

/// The request nodes among a key node's children, in queue order, and the claimed slots
/// (slot, claimant's GUID is read separately). Anything else is `Corrupt`.
pub(crate) fn parse_children(
    path: &str,
    names: &[String],
) -> Result<(Vec<Entry>, Vec<u32>), Error> {
    let mut q = Vec::new();
    let mut slots = Vec::new();
    for n in names {
        if let Some(rest) = n.strip_prefix("q-") {
            let parsed = rest.rsplit_once('-').and_then(|(g, s)| {
                (g.len() == 32 && g.chars().all(|c| c.is_ascii_hexdigit()))
                    .then_some(())
                    .and_then(|_| s.parse::<u64>().ok())
                    .map(|seq| (g.to_owned(), seq))
            });
            let (guid, seq) = parsed
                .ok_or_else(|| corrupt(format!("{path}/{n} is not a request node's name")))?;
            q.push(Entry {
                name: n.clone(),
                guid,
                seq,
            });
        } else if let Some(s) = n.strip_prefix("slot-") {
            slots.push(
                s.parse::<u32>()
                    .map_err(|_| corrupt(format!("{path}/{n} is not a slot node's name")))?,
            );
        } else {
            return Err(corrupt(format!(
                "{path} has a child '{n}' that is not baton's"
            )));
        }
    }
    q.sort_by_key(|e| e.seq);
    slots.sort_unstable();
    Ok((q, slots))
}

pub(crate) fn slot_name(slot: u32) -> String {
    format!("slot-{slot}")
}
