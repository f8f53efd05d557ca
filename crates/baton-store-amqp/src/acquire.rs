//! The grant, on the acquire's own connection (heartbeat: half the lease's TTL).
//!
//! 1. The key's queues exist (`ensure_key`, under the key's `init` lock the first time;
//!    the new gate's token `base` is the floor a delete of the key left).
//! 2. The request joins the waiters: it consumes `waiters` (to be counted) and `gate`
//!    (single active consumer: the broker makes waiters active in the order they came).
//!    When a delete removed the key's queues meanwhile (the broker cancels the consumers
//!    of a deleted queue, or answers `NOT_FOUND`), it goes back to 1.
//! 3. Before it queues up, it checks the key's limit (the `meta` message; a waiter
//!    already queued takes the limit a resize gives the key). Given the gate message,
//!    its token is the message's
//!    `base` + `x-delivery-count` + 1 (every hand-over of the never-acknowledged gate
//!    message adds one, and quorum queues keep the count across broker restarts).
//! 4. It consumes `slots` (prefetch 1), reading the limit at every delivery: the first
//!    slot message below the limit, while fewer than the limit hold the key, is its
//!    slot, kept unacknowledged ([`Inner::take_slot`]: slots above a lowered limit are
//!    set aside and counted). It declares its `held` proof queue and writes its record.
//! 5. It returns the gate by closing the gate channel: the next waiter becomes active.
//!
//! Whatever ends an acquire without a grant, closing its connection returns everything
//! it had (the gate, a slot, its place among the waiters) and deletes its exclusive
//! queues: nothing of it is left.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::kit::errors;
use baton_core::kit::time::{unix_ms_now, validate_ttl};
use baton_core::{AcquireRequest, Error, ErrorKind, Lease, Token, Wait};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};

use crate::core::{persistent, quorum, soft, Found, Held, Inner};
use crate::layout::{self, Floor, Gate, Names, Record};

/// How long a no-wait acquire waits for the gate or a slot that the broker said was
/// there (the gate passes through each request's hands in milliseconds).
pub(crate) const NO_WAIT_BOUND: Duration = Duration::from_secs(2);

/// How many times in a row an acquire makes a key anew that a delete removed under it
/// before it gives up.
const VANISHED_TRIES: u32 = 100;

/// The end of [`Inner::queue_up`].
enum Queued {
    /// The gate message came: the counting channel, the gate channel, the counting
    /// consumer (kept to the end) and the gate message.
    Passed(Box<(Channel, Channel, Consumer, Delivery)>),
    /// The key's queues were deleted: make the key anew and queue up again.
    Vanished,
}

/// How an acquire without a grant ends.
#[derive(Debug)]
pub(crate) enum Ending {
    /// Its connection is to be closed, which withdraws everything.
    Withdraw(Error),
    /// Its connection was handed over (it holds back a lost lease's slot) and closes by
    /// itself.
    HandedOver(Error),
}

impl From<Error> for Ending {
    fn from(e: Error) -> Ending {
        Ending::Withdraw(e)
    }
}

/// The heartbeat timeout of a lease's connection: half its TTL, in whole seconds (at
/// least 1). Safety does not rest on it (a lost slot is held back for the TTL after the
/// broker returned it, which is after the holder's last frame reached the broker, so
/// after its last renewal was sent); it decides how soon the broker notices a silent
/// holder (measured: about 2.5 heartbeat timeouts).
pub(crate) fn heartbeat(ttl: Duration) -> u16 {
    let s = (ttl.as_millis() / 2).div_ceil(1000);
    s.clamp(1, u128::from(u16::MAX)) as u16
}

/// The gate message's `x-delivery-count`: how many times it was handed over before.
pub(crate) fn delivery_count(d: &Delivery) -> Result<u64, Error> {
    let Some(headers) = d.properties.headers().as_ref() else {
        return Ok(0);
    };
    match headers.inner().get("x-delivery-count") {
        None => Ok(0),
        Some(v) => {
            let n: Option<i128> = match v {
                AMQPValue::LongLongInt(n) => Some(i128::from(*n)),
                AMQPValue::LongInt(n) => Some(i128::from(*n)),
                AMQPValue::ShortInt(n) => Some(i128::from(*n)),
                AMQPValue::ShortShortInt(n) => Some(i128::from(*n)),
                AMQPValue::LongUInt(n) => Some(i128::from(*n)),
                AMQPValue::ShortUInt(n) => Some(i128::from(*n)),
                AMQPValue::ShortShortUInt(n) => Some(i128::from(*n)),
                _ => None,
            };
            n.and_then(|n| u64::try_from(n).ok()).ok_or_else(|| {
                errors::corrupt(
                    "the gate message's x-delivery-count",
                    format!("is not a count: {v:?}"),
                )
            })
        }
    }
}

impl Inner {
    /// The acquire's own connection, whose heartbeat timeout is half the lease's TTL.
    pub(crate) async fn lease_connection(
        &self,
        req: &AcquireRequest,
    ) -> Result<Arc<Connection>, Error> {
        let ttl = validate_ttl(req.ttl, &req.key)?;
        self.connect(heartbeat(ttl)).await
    }

    /// Closes a connection (bounded); the broker returns what it held either way.
    pub(crate) async fn hang_up(&self, conn: &Connection) {
        let _ = self.bounded(conn.close(200, "OK".into())).await;
    }

    /// The wait and the grant on `conn`. On failure the caller hangs up, which withdraws
    /// everything, unless the connection was handed over.
    pub(crate) async fn contend(
        &self,
        conn: &Arc<Connection>,
        req: &AcquireRequest,
    ) -> Result<(Lease, Held), Ending> {
        let ttl = validate_ttl(req.ttl, &req.key)?;
        let deadline = req.deadline(Instant::now());
        let names = Names::new(&self.config.prefix, &req.key);
        // A delete can remove the key between its creation (or the look that found it)
        // and the wait: the wait then ends (the broker cancels the consumers of a deleted
        // queue) and the request makes the key anew, as an acquire after the delete would.
        let mut vanished = 0;
        let (count_ch, gate_ch, _counted, pass) = loop {
            self.ensure_key(conn, &names, req.limit).await?;
            // The key's limit when the request joins: once queued, a waiter takes the
            // limit a resize gives the key meanwhile.
            match self.entry_limit(conn, &names).await? {
                Some(have) if have != req.limit => {
                    return Err(errors::limit_mismatch(have, req.limit).into());
                }
                Some(_) => {}
                None => {
                    vanished += 1;
                    if vanished >= VANISHED_TRIES {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!(
                                "the key was deleted under {VANISHED_TRIES} attempts to wait \
                                 for it in a row"
                            ),
                        )
                        .into());
                    }
                    continue;
                }
            }
            if req.wait == Wait::NoWait {
                if let Some(busy) = self.busy_now(conn, &names, req.limit).await? {
                    return Err(busy.into());
                }
            }
            match self.queue_up(conn, req, &names, deadline).await? {
                Queued::Passed(passed) => break *passed,
                Queued::Vanished => {
                    vanished += 1;
                    if vanished >= VANISHED_TRIES {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!(
                                "the key was deleted under {VANISHED_TRIES} attempts to wait \
                                 for it in a row"
                            ),
                        )
                        .into());
                    }
                }
            }
        };
        // The gate message's limit is the key's first; the meta message has the limit now.
        let g = Gate::parse("the gate message", &pass.data)?;
        let token = g
            .base
            .checked_add(delivery_count(&pass)? + 1)
            .ok_or_else(|| errors::corrupt("the gate message's base", "overflows a token"))?;

        // Holding the gate: the first slot that is (or comes) free is this request's.
        let ch = self.confirm_channel(conn).await?;
        self.bounded(ch.basic_qos(1, BasicQosOptions::default()))
            .await?;
        let Some((slot, limit)) = self.take_slot(conn, &ch, req, &names, deadline).await? else {
            return Err(self.gave_up(conn, req, &names).await.into());
        };

        // A slot lost rather than released: its old holder stops its work by its own
        // deadline, at most the old lease's TTL after the broker returned the slot.
        let rec = names.record(slot);
        let before = self.peek_all(conn, &rec).await?;
        if let Some(prev) = Record::newest(slot, &before)?.filter(|r| !r.released) {
            let hold = Duration::from_millis(prev.ttl_ms);
            let until = Instant::now() + hold;
            if req.wait == Wait::NoWait || deadline.is_some_and(|d| d < until) {
                // This request cannot wait so long: the slot stays held back on this
                // connection until then and is marked released, so that the requests
                // after this one need not wait the whole TTL again; the gate goes on.
                self.bounded(gate_ch.close(200, "OK".into())).await?;
                self.bounded(count_ch.close(200, "OK".into())).await?;
                self.hold_back(Arc::clone(conn), ch, rec, prev, until);
                if req.wait == Wait::NoWait {
                    return Err(Ending::HandedOver(errors::busy(limit, limit, None, None)));
                }
                if let Some(d) = deadline {
                    tokio::time::sleep_until(d.into()).await;
                }
                return Err(Ending::HandedOver(
                    req.timed_out("every slot stayed held", &self.url),
                ));
            }
            tokio::time::sleep_until(until.into()).await;
        }

        let sent = Instant::now();
        let proof = names.held(slot, token);
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        };
        self.bounded(ch.queue_declare(proof.as_str().into(), exclusive, FieldTable::default()))
            .await?;
        let record = Record {
            token,
            holder: req.holder.to_json()?,
            since_unix_ms: unix_ms_now(),
            ttl_ms: ttl.as_millis() as u64,
            released: false,
        };
        let body = serde_json::to_vec(&record)
            .map_err(|e| Error::new(ErrorKind::Unavailable, format!("holder record: {e}")))?;
        self.declare(&ch, &rec, FieldTable::default()).await?;
        self.bounded(ch.queue_purge(rec.as_str().into(), QueuePurgeOptions::default()))
            .await?;
        self.publish(&ch, &rec, &body).await?;
        // Hand the gate on, and stop counting as a waiter.
        self.bounded(gate_ch.close(200, "OK".into())).await?;
        self.bounded(count_ch.close(200, "OK".into())).await?;

        let lease = Lease {
            key: req.key.clone(),
            slot,
            limit: req.limit,
            token: Token(token),
            holder: req.holder.clone(),
            ttl: Some(ttl),
            acquired_unix_ms: unix_ms_now(),
            sent_at: Some(sent),
        };
        Ok((
            lease,
            Held {
                conn: Arc::clone(conn),
                channel: ch,
                proof,
                record_queue: rec,
                record,
            },
        ))
    }

    /// The key's limit from its meta message, or `None` when the key's gate is gone (a
    /// delete removed the key meanwhile: it deletes the gate before the meta queue).
    async fn entry_limit(&self, conn: &Connection, names: &Names) -> Result<Option<u32>, Error> {
        match self.meta_of(conn, names).await {
            Ok(m) => Ok(Some(m.limit)),
            Err(e) => match self.look(conn, &names.gate()).await? {
                Found::Missing => Ok(None),
                _ => Err(e),
            },
        }
    }

    /// The gate holder's slot: consumes `slots` (prefetch 1) on `ch`, reading the key's
    /// limit again at every delivery (a resize changes it under the `init` lock, not
    /// under the gate, so that it reaches a holder already waiting). A slot numbered at or
    /// above the limit is set aside (kept unacknowledged, and the consumer started anew
    /// for the next message); a resize's nudge is acknowledged. A slot below the limit is
    /// taken when fewer than the limit hold the key: always when no slot was ever made
    /// above the limit, else only once every ready message is in this request's hands,
    /// so that it can count the slots out (held, or held back) above the limit too.
    /// The slots set aside go back to the queue; the one taken stays unacknowledged on
    /// `ch`. `None` when the wait ran out. Returns the slot and the limit it was taken
    /// under.
    async fn take_slot(
        &self,
        conn: &Connection,
        ch: &Channel,
        req: &AcquireRequest,
        names: &Names,
        deadline: Option<Instant>,
    ) -> Result<Option<(u32, u32)>, Error> {
        let consume = || {
            ch.basic_consume(
                names.slots().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
        };
        let mut slots = self.bounded(consume()).await?;
        let mut hand: Vec<(u32, Delivery)> = Vec::new();
        loop {
            let Some(d) = next(&mut slots, self.wait_bound(req, deadline)).await? else {
                return Ok(None);
            };
            let set_aside = match layout::parse_slot(&d.data)? {
                None => {
                    self.bounded(d.ack(BasicAckOptions::default())).await?;
                    false
                }
                Some(n) => {
                    hand.push((n, d));
                    true
                }
            };
            let meta = self.meta_of(conn, names).await?;
            if let Some(i) = hand.iter().position(|(n, _)| *n < meta.limit) {
                let room = if meta.span() <= meta.limit {
                    true
                } else {
                    let ready = match self.look(conn, &names.slots()).await? {
                        Found::Queue { messages, .. } => messages,
                        _ => 0,
                    };
                    let mut mine: Vec<u32> = hand
                        .iter()
                        .map(|(n, _)| *n)
                        .filter(|n| *n < meta.span())
                        .collect();
                    mine.sort_unstable();
                    mine.dedup();
                    ready == 0 && meta.span() - (mine.len() as u32) < meta.limit
                };
                if room {
                    // No more deliveries; the one taken stays unacknowledged on `ch`.
                    self.bounded(ch.basic_cancel(slots.tag(), BasicCancelOptions::default()))
                        .await?;
                    let (slot, _taken) = hand.swap_remove(i);
                    for (_, other) in hand {
                        let back = BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        };
                        self.bounded(other.nack(back)).await?;
                    }
                    return Ok(Some((slot, meta.limit)));
                }
            }
            if set_aside {
                // The consumer is at its prefetch: a new one takes the next message (a
                // cancelled consumer's delivery stays unacknowledged on its channel).
                self.bounded(ch.basic_cancel(slots.tag(), BasicCancelOptions::default()))
                    .await?;
                slots = self.bounded(consume()).await?;
            }
        }
    }

    /// Joins the waiters: counted on `waiters` (on a channel without a prefetch limit: the
    /// broker counts only consumers that could take a message), queued on the gate, until
    /// the gate message comes. `Vanished` when the key's queues were deleted before or
    /// during the wait (its channels are closed then).
    async fn queue_up(
        &self,
        conn: &Connection,
        req: &AcquireRequest,
        names: &Names,
        deadline: Option<Instant>,
    ) -> Result<Queued, Ending> {
        let count_ch = self.channel(conn).await?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        // Kept to the end: lapin cancels a consumer whose handle is dropped.
        let counted = match self
            .raw(count_ch.basic_consume(
                names.waiters().as_str().into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            ))
            .await?
        {
            Ok(c) => c,
            Err(e) if soft(&e) == Some(AMQPSoftError::NOTFOUND) => return Ok(Queued::Vanished),
            Err(e) => return Err(self.map(e).into()),
        };
        let gate_ch = self.channel(conn).await?;
        self.bounded(gate_ch.basic_qos(1, BasicQosOptions::default()))
            .await?;
        let mut gate = match self
            .raw(gate_ch.basic_consume(
                names.gate().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ))
            .await?
        {
            Ok(c) => c,
            Err(e) if soft(&e) == Some(AMQPSoftError::NOTFOUND) => {
                let _ = self.bounded(count_ch.close(200, "OK".into())).await;
                return Ok(Queued::Vanished);
            }
            Err(e) => return Err(self.map(e).into()),
        };
        let bound = self.wait_bound(req, deadline);
        match next(&mut gate, bound).await {
            Ok(Some(pass)) => Ok(Queued::Passed(Box::new((count_ch, gate_ch, counted, pass)))),
            Ok(None) => Err(self.gave_up(conn, req, names).await.into()),
            Err(e) => {
                // The broker cancels the consumers of a deleted queue; the key may be
                // made anew already by the time this looks, so any end of the wait on a
                // connection still up goes back to making sure the key exists (which
                // makes it only when its gate is missing, under the `init` lock). A
                // lost connection is not a deleted key.
                if conn.status().connected() {
                    let _ = self.bounded(gate_ch.close(200, "OK".into())).await;
                    let _ = self.bounded(count_ch.close(200, "OK".into())).await;
                    return Ok(Queued::Vanished);
                }
                Err(e.into())
            }
        }
    }

    /// Keeps the slot delivered on `ch` until `until`, then marks the lost lease's record
    /// `prev` released and hangs up, which returns the slot. If this process dies first,
    /// the slot returns unreleased and the next holder waits the whole TTL: never less.
    fn hold_back(
        &self,
        conn: Arc<Connection>,
        ch: Channel,
        rec: String,
        prev: Record,
        until: Instant,
    ) {
        let bound = self.config.timeout;
        tokio::spawn(async move {
            tokio::time::sleep_until(until.into()).await;
            let mut r = prev;
            r.released = true;
            if let Ok(body) = serde_json::to_vec(&r) {
                let publish = async {
                    let confirm = ch
                        .basic_publish(
                            "".into(),
                            rec.as_str().into(),
                            BasicPublishOptions::default(),
                            &body,
                            persistent(),
                        )
                        .await?;
                    confirm.await
                };
                let _ = tokio::time::timeout(bound, publish).await;
            }
            let _ = tokio::time::timeout(bound, ch.close(200, "OK".into())).await;
            let _ = tokio::time::timeout(bound, conn.close(200, "OK".into())).await;
        });
    }

    /// A no-wait request's `Busy`, when no slot is free or earlier requests wait (it must
    /// not pass them, nor wait behind them); `None` when it may go on.
    pub(crate) async fn busy_now(
        &self,
        conn: &Connection,
        names: &Names,
        limit: u32,
    ) -> Result<Option<Error>, Error> {
        let free = self.look(conn, &names.slots()).await?;
        let queued = self.look(conn, &names.waiters()).await?;
        if let Found::Queue { consumers, .. } = queued {
            let none_free = match free {
                Found::Queue { messages: 0, .. } => true,
                // Ready messages above a lowered limit are no free slot: count the slots out
                // (under another limit than the key's, the request goes on to be told so).
                Found::Queue { messages, .. } if consumers == 0 => {
                    match self.meta_of(conn, names).await {
                        Ok(m) if m.limit == limit => m.span().saturating_sub(messages) >= limit,
                        _ => false,
                    }
                }
                _ => false,
            };
            if none_free || consumers > 0 {
                let ahead = (consumers > 0).then_some(consumers);
                return Ok(Some(self.busy(conn, names, limit, ahead).await));
            }
        }
        Ok(None)
    }

    /// A no-wait request's first look, on the store's own connection before the request
    /// opens one of its own: an existing key that is busy answers at once.
    pub(crate) async fn busy_at_once(&self, req: &AcquireRequest) -> Result<Option<Error>, Error> {
        if req.wait != Wait::NoWait {
            return Ok(None);
        }
        let conn = self.admin().await?;
        let names = Names::new(&self.config.prefix, &req.key);
        if matches!(self.look(&conn, &names.gate()).await?, Found::Missing) {
            return Ok(None);
        }
        self.busy_now(&conn, &names, req.limit).await
    }

    /// How long the next wait may take: the request's deadline, or for a no-wait request
    /// the short bound in which what the broker said was free must come.
    fn wait_bound(&self, req: &AcquireRequest, deadline: Option<Instant>) -> Option<Instant> {
        match req.wait {
            Wait::NoWait => Some(Instant::now() + NO_WAIT_BOUND),
            _ => deadline,
        }
    }

    /// The error of a wait that ran out: `Busy` for a no-wait request, else `Timeout`.
    async fn gave_up(&self, conn: &Connection, req: &AcquireRequest, names: &Names) -> Error {
        if req.wait == Wait::NoWait {
            self.busy(conn, names, req.limit, None).await
        } else {
            req.timed_out("every slot stayed held", &self.url)
        }
    }

    async fn busy(
        &self,
        conn: &Connection,
        names: &Names,
        limit: u32,
        ahead: Option<u32>,
    ) -> Error {
        let free = match self.look(conn, &names.slots()).await {
            Ok(Found::Queue { messages, .. }) => messages,
            _ => 0,
        };
        let out = self.slots_out(conn, names, limit, free).await;
        errors::busy(out, limit, ahead, None)
    }

    /// How many slots are out of `slots` (held, held back, or being taken), from the
    /// number of `ready` messages: every slot number below the key's span has one message
    /// (a nudge counts as ready, so this can be one low). `limit` stands for the span
    /// when the meta message cannot be read.
    async fn slots_out(&self, conn: &Connection, names: &Names, limit: u32, ready: u32) -> u32 {
        let span = match self.meta_of(conn, names).await {
            Ok(m) => m.span(),
            Err(_) => limit,
        };
        span.saturating_sub(ready)
    }

    /// Creates the key's queues and messages unless its gate exists, under the key's
    /// `init` lock (an exclusive queue) so that two first acquires do not both create.
    async fn ensure_key(&self, conn: &Connection, names: &Names, limit: u32) -> Result<(), Error> {
        let lock = names.init();
        let until = Instant::now() + self.config.timeout * 2;
        if !matches!(self.look(conn, &names.gate()).await?, Found::Missing) {
            // Complete once its creator let go of the creation lock: a quorum queue
            // consumed before its Raft member is up crashes the consuming channel
            // (RabbitMQ 3.10.8 answers INTERNAL_ERROR and closes the connection).
            while self.look(conn, &lock).await? == Found::Locked && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return Ok(());
        }
        let ch = self.lock_key(conn, names).await?;
        if matches!(self.look(conn, &names.gate()).await?, Found::Missing) {
            self.create_key(conn, names, limit).await?;
        }
        self.bounded(ch.queue_delete(lock.as_str().into(), QueueDeleteOptions::default()))
            .await?;
        let _ = self.bounded(ch.close(200, "OK".into())).await;
        Ok(())
    }

    /// Takes the key's `init` lock (an exclusive queue of `conn`): the lock under which
    /// its queues are created and deleted. Gives up after twice the URL's timeout. The
    /// lock goes when the returned channel deletes it or when `conn` closes.
    pub(crate) async fn lock_key(
        &self,
        conn: &Connection,
        names: &Names,
    ) -> Result<Channel, Error> {
        let lock = names.init();
        let until = Instant::now() + self.config.timeout * 2;
        loop {
            let ch = self.channel(conn).await?;
            let exclusive = QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            };
            match self
                .raw(ch.queue_declare(lock.as_str().into(), exclusive, FieldTable::default()))
                .await?
            {
                Ok(_) => return Ok(ch),
                Err(e) if soft(&e) == Some(AMQPSoftError::RESOURCELOCKED) => {
                    if Instant::now() >= until {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!("the key's creation lock ({lock}) stayed taken"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(self.map(e)),
            }
        }
    }

    /// The key's queues, the slot messages, the meta message, the key's name in the key
    /// list and, last, the gate: the gate's existence says the key is complete. The gate
    /// starts its tokens above the key's floor, which a delete of the key left (read under
    /// the `init` lock, which every delete takes too).
    async fn create_key(&self, conn: &Connection, names: &Names, limit: u32) -> Result<(), Error> {
        let base = Floor::highest(&self.peek_all(conn, &names.floor()).await?)?;
        let ch = self.confirm_channel(conn).await?;
        let slots = names.slots();
        self.declare(&ch, &slots, quorum(false)).await?;
        // Left by a creation that died before it made the gate: nobody holds them.
        self.bounded(ch.queue_purge(slots.as_str().into(), QueuePurgeOptions::default()))
            .await?;
        for s in 0..limit {
            self.publish(&ch, &slots, s.to_string().as_bytes()).await?;
        }
        self.declare(&ch, &names.waiters(), FieldTable::default())
            .await?;
        let body = serde_json::to_vec(&Gate {
            limit,
            base,
            span: limit,
            gen: 0,
        })
        .map_err(|e| Error::new(ErrorKind::Unavailable, format!("gate message: {e}")))?;
        let meta = names.meta();
        self.declare(&ch, &meta, FieldTable::default()).await?;
        self.bounded(ch.queue_purge(meta.as_str().into(), QueuePurgeOptions::default()))
            .await?;
        self.publish(&ch, &meta, &body).await?;
        let keys = layout::keys_queue(&self.config.prefix);
        self.declare(&ch, &keys, FieldTable::default()).await?;
        let key_name = names.key().to_owned();
        self.publish(&ch, &keys, key_name.as_bytes()).await?;
        let gate = names.gate();
        self.declare(&ch, &gate, quorum(true)).await?;
        self.publish(&ch, &gate, &body).await?;
        let _ = self.bounded(ch.close(200, "OK".into())).await;
        Ok(())
    }

    /// Every message of `queue`, read without taking it: fetched unacknowledged, then
    /// returned when the channel closes.
    pub(crate) async fn peek_all(
        &self,
        conn: &Connection,
        queue: &str,
    ) -> Result<Vec<Vec<u8>>, Error> {
        let ch = self.channel(conn).await?;
        let mut out = Vec::new();
        let r = self.peek_on(&ch, queue, &mut out).await;
        let _ = self.bounded(ch.close(200, "OK".into())).await;
        r.map(|()| out)
    }

    async fn peek_on(
        &self,
        ch: &Channel,
        queue: &str,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), Error> {
        loop {
            match self
                .raw(ch.basic_get(queue.into(), BasicGetOptions::default()))
                .await?
            {
                Ok(Some(m)) => {
                    out.push(m.delivery.data);
                    if out.len() > 100_000 {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) if soft(&e) == Some(AMQPSoftError::NOTFOUND) => return Ok(()),
                Err(e) => return Err(self.map(e)),
            }
        }
    }
}

/// The next delivery of `consumer`, or `None` when `until` passes first. A consumer that
/// ends (its channel or connection closed) is `Unavailable`.
pub(crate) async fn next(
    consumer: &mut Consumer,
    until: Option<Instant>,
) -> Result<Option<Delivery>, Error> {
    let got = match until {
        None => consumer.next().await,
        Some(t) => {
            let left = t.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.next()).await {
                Ok(d) => d,
                Err(_) => return Ok(None),
            }
        }
    };
    match got {
        Some(Ok(d)) => Ok(Some(d)),
        Some(Err(e)) => Err(Error::new(
            ErrorKind::Unavailable,
            format!("the broker ended the wait: {e}"),
        )
        .with_source(e)),
        None => Err(Error::new(
            ErrorKind::Unavailable,
            "the broker ended the wait (the consumer was cancelled)",
        )),
    }
}
