//! Status and list, read on the store's own connection without changing anything: a
//! queue's messages are read by fetching them unacknowledged and closing the channel,
//! which returns them.
//!
//! A key's limit is its `meta` message; its waiters are the consumers of its `waiters`
//! queue; slot N is held when the newest record in `rec.N` has its proof queue
//! (`held.N.TOKEN`, exclusive to the holder's connection) still there.

use std::time::Duration;

use baton_core::kit::errors;
use baton_core::{Key, KeyStatus, SlotStatus};
use lapin::Connection;

use crate::core::{Found, Inner};
use crate::layout::{self, Gate, Names, Record};

impl Inner {
    pub(crate) async fn inspect(&self, key: &Key) -> Result<KeyStatus, baton_core::Error> {
        let conn = self.admin().await?;
        let names = Names::new(&self.config.prefix, key);
        if matches!(self.look(&conn, &names.gate()).await?, Found::Missing) {
            return Err(errors::no_such_key());
        }
        let limit = self.limit_of(&conn, &names).await?;
        let waiters = match self.look(&conn, &names.waiters()).await? {
            Found::Queue { consumers, .. } => Some(consumers),
            _ => None,
        };
        let mut slots = Vec::with_capacity(limit as usize);
        for slot in 0..limit {
            slots.push(self.slot_status(&conn, &names, slot).await?);
        }
        Ok(KeyStatus {
            key: key.clone(),
            limit,
            slots,
            waiters,
            last_token: None,
            lock_delay_ms: None,
        })
    }

    /// The key's limit, from its meta message (another reader may have it for a moment:
    /// look again).
    pub(crate) async fn limit_of(
        &self,
        conn: &Connection,
        names: &Names,
    ) -> Result<u32, baton_core::Error> {
        for _ in 0..50 {
            if let Some(m) = self.peek_all(conn, &names.meta()).await?.first() {
                return Ok(Gate::parse("the key's meta message", m)?.limit);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(errors::corrupt(
            format!("the key's meta queue ({})", names.meta()),
            "has no message",
        ))
    }

    async fn slot_status(
        &self,
        conn: &Connection,
        names: &Names,
        slot: u32,
    ) -> Result<SlotStatus, baton_core::Error> {
        let records = self.peek_all(conn, &names.record(slot)).await?;
        let Some(r) = Record::newest(slot, &records)? else {
            return Ok(SlotStatus::free(slot));
        };
        if r.released {
            return Ok(SlotStatus::free(slot));
        }
        let mine = self
            .held(names.key(), r.token)
            .is_some_and(|h| h.conn.status().connected() && h.channel.status().connected());
        let live = mine
            || !matches!(
                self.look(conn, &names.held(slot, r.token)).await?,
                Found::Missing
            );
        if !live {
            return Ok(SlotStatus::free(slot));
        }
        let id = baton_core::Holder::from_json(&r.holder)
            .map(|h| h.id.to_string())
            .unwrap_or_default();
        Ok(SlotStatus::of_record(
            slot,
            r.token,
            &id,
            &r.holder,
            Some(r.since_unix_ms),
            None,
        ))
    }

    pub(crate) async fn list(&self) -> Result<Vec<Key>, baton_core::Error> {
        let conn = self.admin().await?;
        let names = self
            .peek_all(&conn, &layout::keys_queue(&self.config.prefix))
            .await?;
        let mut keys: Vec<Key> = names
            .iter()
            .filter_map(|n| std::str::from_utf8(n).ok())
            .filter_map(|n| Key::new(n).ok())
            .collect();
        keys.sort();
        keys.dedup();
        Ok(keys)
    }
}
