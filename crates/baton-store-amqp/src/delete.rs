//! Delete, on a connection of its own (its exclusive queues and the gate it takes go
//! with it whatever ends the delete).
//!
//! 1. It takes the key's `init` lock, under which keys are created: no request makes the
//!    key anew until the delete is over, and the key's floor is read only under it.
//! 2. It refuses while a request is counted on `waiters`, then takes the gate like a
//!    no-wait request: the gate message must come within [`NO_WAIT_BOUND`] (else a
//!    request holds it, waiting for a slot or about to be granted: the key is in use).
//!    Holding the gate, nobody else can be granted a slot of the key.
//! 3. Holding the gate, it checks the slots: every slot message back in `slots`, and no
//!    slot's newest record unreleased (held, or lost and so held back), twice.
//! 4. It writes the key's token floor, `base` = the gate's base + its `x-delivery-count`
//!    (every token granted so far is at most that), to `PREFIX.floor.K` with a confirm,
//!    and only then deletes the gate: the gate's absence says the key is gone. The gate
//!    goes first, so the broker cancels the requests that queued behind the delete at
//!    once; they make the key anew when the lock is gone (`acquire.rs`).
//! 5. It removes the key's name from the key list and deletes the rest of its queues,
//!    then lets go of the lock (closing its connection).

use std::time::{Duration, Instant};

use baton_core::kit::errors;
use baton_core::{Error, ErrorKind, Key};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::FieldTable;
use lapin::Connection;

use crate::acquire::{delivery_count, next, NO_WAIT_BOUND};
use crate::core::{soft, Found, Inner, ADMIN_HEARTBEAT};
use crate::layout::{self, Floor, Gate, Names, Record};

/// How long a delete waits for slots whose release is under way (a record marked
/// released whose slot message is not back yet) before it calls them held.
const RELEASE_BOUND: Duration = Duration::from_secs(1);

/// How many times the key's name is looked for again in the key list after it was
/// removed (another reader can have it out of the queue for a moment).
const UNLIST_TRIES: usize = 20;

impl Inner {
    pub(crate) async fn delete(&self, key: &Key) -> Result<(), Error> {
        let names = Names::new(&self.config.prefix, key);
        let admin = self.admin().await?;
        if matches!(self.look(&admin, &names.gate()).await?, Found::Missing) {
            return Err(errors::no_such_key());
        }
        drop(admin);
        let conn = self.connect(ADMIN_HEARTBEAT).await?;
        let r = self.delete_on(&conn, &names).await;
        // Lets go of the lock and returns the gate when the delete did not delete it.
        self.hang_up(&conn).await;
        r
    }

    async fn delete_on(&self, conn: &Connection, names: &Names) -> Result<(), Error> {
        let _lock = self.lock_key(conn, names).await?;
        if matches!(self.look(conn, &names.gate()).await?, Found::Missing) {
            return Err(errors::no_such_key());
        }
        let waiting = self.waiting(conn, names).await?;
        if waiting > 0 {
            let span = self.meta_of(conn, names).await?.span();
            let (held, back) = self.slot_use(conn, names, span).await?;
            return Err(errors::in_use(held, Some(waiting), back));
        }

        // The gate, as a no-wait request takes it.
        let gate_ch = self.channel(conn).await?;
        self.bounded(gate_ch.basic_qos(1, BasicQosOptions::default()))
            .await?;
        let mut gate = self
            .bounded(gate_ch.basic_consume(
                names.gate().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ))
            .await?;
        let Some(pass) = next(&mut gate, Some(Instant::now() + NO_WAIT_BOUND)).await? else {
            // A request holds the gate: it waits for a slot, or is being granted one.
            let span = self.meta_of(conn, names).await?.span();
            let (held, back) = self.slot_use(conn, names, span).await?;
            let waiting = self.waiting(conn, names).await?.max(1);
            return Err(errors::in_use(held, Some(waiting), back));
        };
        let g = Gate::parse("the gate message", &pass.data)?;
        let last = g
            .base
            .checked_add(delivery_count(&pass)?)
            .ok_or_else(|| errors::corrupt("the gate message's base", "overflows a token"))?;

        // Every slot number ever made, above a lowered limit too (a resize writes the meta
        // message under the `init` lock, which this holds).
        let span = self.meta_of(conn, names).await?.span();
        // Holding the gate: no slot can be taken, only given back. Read twice, so that a
        // record another reader had out of its queue for a moment is not missed.
        for _ in 0..2 {
            self.unused(conn, names, span).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The floor first, confirmed; then the gate, whose absence says the key is gone.
        let ch = self.confirm_channel(conn).await?;
        let floor = names.floor();
        self.declare(&ch, &floor, FieldTable::default()).await?;
        self.bounded(ch.queue_purge(floor.as_str().into(), QueuePurgeOptions::default()))
            .await?;
        let body = serde_json::to_vec(&Floor { base: last })
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("floor message: {e}")))?;
        self.publish(&ch, &floor, &body).await?;
        self.drop_queue(conn, &names.gate()).await?;
        self.unlist(conn, names).await?;
        let mut rest = vec![names.slots(), names.waiters(), names.meta()];
        rest.extend((0..span).map(|s| names.record(s)));
        for q in rest {
            self.drop_queue(conn, &q).await?;
        }
        let _ = self
            .bounded(ch.queue_delete(names.init().as_str().into(), QueueDeleteOptions::default()))
            .await;
        Ok(())
    }

    /// The requests counted as waiting for the key.
    async fn waiting(&self, conn: &Connection, names: &Names) -> Result<u32, Error> {
        Ok(match self.look(conn, &names.waiters()).await? {
            Found::Queue { consumers, .. } => consumers,
            _ => 0,
        })
    }

    /// Fine when no slot below `limit` (the key's span: every slot number made) is held or
    /// held back, with the gate held (no slot can be taken meanwhile); otherwise `Busy`,
    /// naming what holds the key.
    async fn unused(&self, conn: &Connection, names: &Names, limit: u32) -> Result<(), Error> {
        let until = Instant::now() + RELEASE_BOUND;
        loop {
            let (held, back) = self.slot_use(conn, names, limit).await?;
            if held > 0 || back > 0 {
                return Err(errors::in_use(held, Some(0), back));
            }
            let ready = match self.look(conn, &names.slots()).await? {
                Found::Queue { messages, .. } => messages,
                _ => 0,
            };
            if ready >= limit {
                return Ok(());
            }
            // A release marks its record released before its slot message is back.
            if Instant::now() >= until {
                let out = limit.saturating_sub(ready) as usize;
                return Err(errors::in_use(out, Some(0), 0));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// How many of the key's slots are held (the newest record not released, its proof
    /// queue there) and held back (not released, the proof gone: a lost lease, whose
    /// holder may still be at work until a request has waited out its TTL).
    pub(crate) async fn slot_use(
        &self,
        conn: &Connection,
        names: &Names,
        limit: u32,
    ) -> Result<(usize, usize), Error> {
        let (mut held, mut back) = (0, 0);
        for slot in 0..limit {
            let records = self.peek_all(conn, &names.record(slot)).await?;
            let Some(r) = Record::newest(slot, &records)?.filter(|r| !r.released) else {
                continue;
            };
            let mine = self
                .held(names.key(), r.token)
                .is_some_and(|h| h.conn.status().connected() && h.channel.status().connected());
            let live = mine
                || !matches!(
                    self.look(conn, &names.held(slot, r.token)).await?,
                    Found::Missing
                );
            if live {
                held += 1;
            } else {
                back += 1;
            }
        }
        Ok((held, back))
    }

    /// Deletes `queue` (a missing one too).
    async fn drop_queue(&self, conn: &Connection, queue: &str) -> Result<(), Error> {
        let ch = self.channel(conn).await?;
        match self
            .raw(ch.queue_delete(queue.into(), QueueDeleteOptions::default()))
            .await?
        {
            Ok(_) => {
                let _ = self.bounded(ch.close(200, "OK".into())).await;
                Ok(())
            }
            Err(e) if soft(&e) == Some(AMQPSoftError::NOTFOUND) => Ok(()),
            Err(e) => Err(self.map(e)),
        }
    }

    /// Removes the key's name from the key list: every message of the list is fetched,
    /// the key's acknowledged (removed), the others returned when the channel closes.
    /// Another reader can hold some of them out of the queue for a moment: look again
    /// until the name is gone.
    async fn unlist(&self, conn: &Connection, names: &Names) -> Result<(), Error> {
        let keys = layout::keys_queue(&self.config.prefix);
        let name = names.key().as_bytes();
        for _ in 0..UNLIST_TRIES {
            let ch = self.channel(conn).await?;
            let mut fetched = 0usize;
            loop {
                match self
                    .raw(ch.basic_get(keys.as_str().into(), BasicGetOptions::default()))
                    .await?
                {
                    Ok(Some(m)) => {
                        fetched += 1;
                        if m.delivery.data == name {
                            self.bounded(m.delivery.ack(BasicAckOptions::default()))
                                .await?;
                        }
                        if fetched > 100_000 {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) if soft(&e) == Some(AMQPSoftError::NOTFOUND) => return Ok(()),
                    Err(e) => return Err(self.map(e)),
                }
            }
            let _ = self.bounded(ch.close(200, "OK".into())).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let left = self.peek_all(conn, &keys).await?;
            if !left.iter().any(|n| n.as_slice() == name) {
                return Ok(());
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "the key's name stayed in the key list ({keys}) under {UNLIST_TRIES} \
                 attempts to remove it"
            ),
        ))
    }
}
