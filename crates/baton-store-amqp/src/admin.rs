//! Status and list, read on the store's own connection without changing anything: a
//! queue's messages are read by fetching them unacknowledged and closing the channel,
//! which returns them.
//!
//! A key's limit is its `meta` message (slots above a lowered limit are shown while
//! held); its waiters are the consumers of its `waiters`
//! queue; slot N is held when the newest record in `rec.N` has its proof queue
//! (`held.N.TOKEN`, exclusive to the holder's connection) still there.

use std::time::Duration;

use baton_core::kit::errors;
use baton_core::{Error, ErrorKind, Key, KeyStatus, Resize, SlotState, SlotStatus};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{Channel, Connection};

use crate::core::{Found, Inner, ADMIN_HEARTBEAT};
use crate::layout::{self, Gate, Names, Record, MAX_LIMIT, NUDGE};

impl Inner {
    pub(crate) async fn inspect(&self, key: &Key) -> Result<KeyStatus, baton_core::Error> {
        let conn = self.admin().await?;
        let names = Names::new(&self.config.prefix, key);
        if matches!(self.look(&conn, &names.gate()).await?, Found::Missing) {
            return Err(errors::no_such_key());
        }
        let meta = self.meta_of(&conn, &names).await?;
        let limit = meta.limit;
        let waiters = match self.look(&conn, &names.waiters()).await? {
            Found::Queue { consumers, .. } => Some(consumers),
            _ => None,
        };
        let mut slots = Vec::with_capacity(limit as usize);
        for slot in 0..meta.span() {
            let s = self.slot_status(&conn, &names, slot).await?;
            // Above a lowered limit, only the slots still held.
            if slot < limit || s.state == SlotState::Held {
                slots.push(s);
            }
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

    /// The key's meta message of the highest generation (another reader may have it out
    /// of its queue for a moment: look again).
    pub(crate) async fn meta_of(
        &self,
        conn: &Connection,
        names: &Names,
    ) -> Result<Gate, baton_core::Error> {
        for _ in 0..50 {
            if let Some(g) = Gate::newest_meta(&self.peek_all(conn, &names.meta()).await?)? {
                return Ok(g);
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

    /// Changes the key's limit under its `init` lock (on a connection of its own, which
    /// lets go of the lock whatever ends the resize). The limit is the key's meta message,
    /// read and rewritten under the lock, so steps made at once each count from the limit
    /// the one before wrote. A raised limit makes slot messages only for numbers never
    /// made (the key's `span`): a number below the span has its message already, held or
    /// free. A lowered one removes nothing: a holder above it keeps its slot, and the gate
    /// holders set such slots aside and count them (`acquire.rs`).
    pub(crate) async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus, Error> {
        if let Resize::To(limit) = change {
            errors::check_limit(limit, MAX_LIMIT)?;
        }
        let names = Names::new(&self.config.prefix, key);
        let admin = self.admin().await?;
        if matches!(self.look(&admin, &names.gate()).await?, Found::Missing) {
            return Err(errors::no_such_key_to_resize());
        }
        drop(admin);
        let conn = self.connect(ADMIN_HEARTBEAT).await?;
        let r = self.resize_on(&conn, &names, change).await;
        self.hang_up(&conn).await;
        r?;
        self.inspect(key).await
    }

    async fn resize_on(
        &self,
        conn: &Connection,
        names: &Names,
        change: Resize,
    ) -> Result<(), Error> {
        let _lock = self.lock_key(conn, names).await?;
        if matches!(self.look(conn, &names.gate()).await?, Found::Missing) {
            return Err(errors::no_such_key_to_resize());
        }
        let ch = self.confirm_channel(conn).await?;
        let (old, taken) = self.take_meta(&ch, names).await?;
        let limit = change.apply(old.limit, MAX_LIMIT)?;
        if limit == old.limit {
            return Ok(());
        }
        let span = old.span();
        let mut meta = Gate {
            limit: old.limit,
            base: old.base,
            span: span.max(limit),
            gen: old.gen + 1,
        };
        let mut taken = taken;
        if limit > span {
            // The span first: a resize that dies after it leaves numbers without their
            // message (fewer slots than the limit), never two messages for one number.
            self.rewrite_meta(&ch, names, &meta, taken).await?;
            let slots = names.slots();
            for n in span..limit {
                self.publish(&ch, &slots, n.to_string().as_bytes()).await?;
            }
            taken = self.take_meta(&ch, names).await?.1;
            meta.gen += 1;
        }
        meta.limit = limit;
        self.rewrite_meta(&ch, names, &meta, taken).await?;
        if limit > old.limit {
            // A gate holder waiting for a slot has every ready slot message in its hands,
            // set aside as above the old limit: wake it to read the limit again.
            if let Found::Queue { messages: 0, .. } = self.look(conn, &names.slots()).await? {
                self.publish(&ch, &names.slots(), NUDGE).await?;
            }
        }
        Ok(())
    }

    /// Every message of the key's meta queue, taken unacknowledged on `ch` (another reader
    /// may have them out for a moment: look again), and the newest of them.
    async fn take_meta(&self, ch: &Channel, names: &Names) -> Result<(Gate, Vec<Delivery>), Error> {
        let meta = names.meta();
        for _ in 0..50 {
            let mut taken = Vec::new();
            while let Some(m) = self
                .bounded(ch.basic_get(meta.as_str().into(), BasicGetOptions::default()))
                .await?
            {
                taken.push(m.delivery);
                if taken.len() > 100 {
                    break;
                }
            }
            let bodies: Vec<Vec<u8>> = taken.iter().map(|d| d.data.clone()).collect();
            if let Some(g) = Gate::newest_meta(&bodies)? {
                return Ok((g, taken));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(errors::corrupt(
            format!("the key's meta queue ({meta})"),
            "has no message",
        ))
    }

    /// Publishes `meta` (confirmed), then acknowledges the meta messages it replaces. A
    /// resize that dies between the two leaves both: readers take the newest generation,
    /// and the next resize takes both and acknowledges both.
    async fn rewrite_meta(
        &self,
        ch: &Channel,
        names: &Names,
        meta: &Gate,
        taken: Vec<Delivery>,
    ) -> Result<(), Error> {
        let body = serde_json::to_vec(meta)
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("meta message: {e}")))?;
        self.publish(ch, &names.meta(), &body).await?;
        for d in taken {
            self.bounded(d.ack(BasicAckOptions::default())).await?;
        }
        Ok(())
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
