//! The grant: one attempt (one call of the server-side function `attempt`), the wait
//! loop around it, the waiter's ticket in the queue, what a waiter has seen of the lease
//! rows ([`Watch`]: takeovers and the lock-delay's hold-back), and leaving the queue.
//!
//! Guarantees:
//! - Limit: every grant is one call of the server-side function `attempt`, which locks
//!   the key's row (`FOR UPDATE`), counts the key's lease rows and grants only if fewer
//!   than the limit are there. A row goes only by release, break, or a claim.
//! - Expiry: no clock of the server's decides it (`now()` is a wall clock). Every renewal
//!   raises the row's renewal counter; a waiter ([`Watch`]) takes a slot over only after it
//!   has seen the same token and counter for the lease's TTL on its own monotonic clock,
//!   counted from when the look that showed them came back (after the renewal that wrote
//!   them was sent, so after the holder's keeper gave up: its deadline is `sent + TTL ×
//!   (1 − drift) − margin`), or at once when the holder ran on the waiter's host and its
//!   process is gone. The claim names slot, token, counter and state, and `attempt` checks
//!   them under the rows' locks: a renewal racing it either commits first (the counter
//!   moved, the claim fails) or finds the row gone or held back and answers `Lost`.
//! - Lock-delay: a key created with one keeps a lost lease's row (taken over, broken),
//!   marked lost, until a waiter has seen it so for the delay on its own clock; releases
//!   delete the row at once.
//! - Tokens: `seq` in the key's row, raised in the granting transaction to
//!   `max(seq, every token in the table) + 1`, committed durably, so they survive a
//!   server restart.
//! - Fairness: a waiter holds a ticket (a `bigserial`); a request is granted only while
//!   the free slots outnumber the live tickets ahead of it.
//! - No residue: a waiter's ticket is guarded by a session advisory lock taken on the
//!   waiter's own connection before the ticket becomes visible; a waiter whose process
//!   or connection dies loses the lock with its session, and the next look at the queue
//!   deletes its ticket. A wait that gives up (timeout, cancel, error) deletes its ticket
//!   before the acquire returns. A waiter that stops refreshing (SIGSTOP) loses its place
//!   after [`TICKET_TTL`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::kit::errors::{busy, check_limit, limit_mismatch};
use baton_core::kit::runtime::Cancel;
use baton_core::kit::time::{next_wake, Refresh};
use baton_core::{AcquireRequest, Error, ErrorKind, Holder, Key, Lease, Liveness, Token, Wait};
use tokio_postgres::types::Type;

use crate::core::{corrupt, Conn, Fail, Inner};
use crate::layout::{col, delay_of, looked, u32_of, Encoded, Looked, RowId, MAX_LIMIT};
use crate::listen::woken;

/// How long a waiter's ticket lives without being refreshed; a waiting request refreshes
/// it every third of this. A waiter that stops (SIGSTOP) loses its place after this
/// long; one whose connection dies loses it at once. (The kit's, for every store.)
pub use baton_core::kit::time::TICKET_TTL;

/// A waiter looks at the queue at least this often even without a notification (a
/// waiter ahead of it that died frees nothing and sends nothing).
pub(crate) const BACKSTOP: Duration = Duration::from_secs(1);

/// What one `attempt` call decided.
enum Attempt {
    Granted(Box<Lease>),
    Busy {
        lim: u32,
        held: u32,
        ahead: u32,
        /// The key's lease rows at the look.
        rows: Vec<Looked>,
        delay: Duration,
    },
    Mismatch {
        lim: u32,
    },
    Queued {
        ticket: i64,
        /// Live tickets ahead of this one.
        ahead: u32,
        /// Slots free at the look.
        free: u32,
        /// The key's lease rows at the look.
        rows: Vec<Looked>,
        delay: Duration,
    },
}

/// What one grant attempt asks of the server-side function `attempt`, besides the
/// store's own values (advisory lock number, channel, PID namespace).
struct Look<'a> {
    req: &'a AcquireRequest,
    /// The request's parts as written into rows.
    enc: &'a Encoded,
    /// Whether the key's limit must equal the request's (the first look of an acquire).
    check_lim: bool,
    /// The waiter's ticket, once a look has queued it.
    ticket: Option<i64>,
    /// Whether to queue (a request that waits) rather than answer busy.
    queue: bool,
    /// Whether to write the ticket's expiry afresh.
    refresh: bool,
    /// The rows this waiter may claim, as [`Watch::claims`] flattens them.
    claims: &'a [i64],
    /// When the call was sent: a granted lease's keeper counts its TTL from here.
    sent_at: Instant,
}

/// What a waiting acquire has seen of a key's lease rows, on its own monotonic clock
/// (DESIGN, contract point 7: the server's clock is a wall clock and decides nothing).
///
/// A row is stale once this waiter has seen it unchanged (same token, same renewal count)
/// for the lease's whole TTL, counted from the moment the look that first showed it came
/// back: that look read the row after the renewal that wrote it committed, which was
/// after the holder sent it, so the holder's keeper (deadline `sent + TTL × (1 − drift) −
/// margin`) has given the lease up before this waiter's TTL runs out. A row held back by a
/// lock-delay is freed once seen unchanged for the delay. A holder on this host, boot and
/// PID namespace whose process is gone ([`Holder::liveness`]) is stale at once (the
/// server sends holder details only for rows of the caller's boot and PID namespace). The observations live only in
/// this waiter: one that dies takes them along, and the next waiter starts counting anew.
#[derive(Default)]
struct Watch {
    seen: HashMap<u32, Observed>,
}

struct Observed {
    id: RowId,
    since: Instant,
    /// How long the row must stay unchanged: the lease's TTL, or the key's lock-delay.
    wait: Duration,
    holder: Option<Holder>,
}

impl Watch {
    /// Records a look's rows, which came back at `at`.
    fn update(&mut self, rows: &[Looked], delay: Duration, at: Instant) {
        self.seen
            .retain(|slot, _| rows.iter().any(|r| r.id.slot == *slot));
        for r in rows {
            let wait = if r.id.lost { delay } else { r.ttl };
            match self.seen.get(&r.id.slot) {
                Some(o) if o.id == r.id => {}
                _ => {
                    self.seen.insert(
                        r.id.slot,
                        Observed {
                            id: r.id,
                            since: at,
                            wait,
                            holder: r.holder.clone(),
                        },
                    );
                }
            }
        }
    }

    /// The rows that may be claimed now, as the flat `(slot, token, renewals, lost)`
    /// array `attempt` takes.
    fn claims(&self, now: Instant) -> Vec<i64> {
        let mut out = Vec::new();
        for o in self.seen.values() {
            let dead = !o.id.lost
                && o.holder
                    .as_ref()
                    .is_some_and(|h| h.liveness() == Liveness::Dead);
            if dead || now.duration_since(o.since) >= o.wait {
                out.extend([
                    i64::from(o.id.slot),
                    o.id.token,
                    o.id.renewals,
                    i64::from(o.id.lost),
                ]);
            }
        }
        out
    }

    /// How long until the next row may be claimed, if any is watched.
    fn next(&self, now: Instant) -> Option<Duration> {
        self.seen
            .values()
            .map(|o| (o.since + o.wait).saturating_duration_since(now))
            .min()
    }

    /// How long until the next held-back (lost) row may be freed, if any is watched.
    fn next_lost(&self, now: Instant) -> Option<Duration> {
        self.seen
            .values()
            .filter(|o| o.id.lost)
            .map(|o| (o.since + o.wait).saturating_duration_since(now))
            .min()
    }

    /// How often to look so that a renewal is seen soon after it happens (a late sight
    /// only delays a takeover): a quarter of the shortest TTL watched.
    fn cadence(&self) -> Option<Duration> {
        self.seen
            .values()
            .filter(|o| !o.id.lost)
            .map(|o| (o.wait / 4).max(Duration::from_millis(20)))
            .min()
    }
}

impl Inner {
    /// One grant attempt.
    async fn attempt(&self, conn: &Conn, look: Look<'_>) -> Result<Attempt, Fail> {
        let Look {
            req,
            enc,
            check_lim,
            ticket,
            queue,
            refresh,
            claims,
            sent_at,
        } = look;
        let key = req.key.as_str();
        check_limit(req.limit, MAX_LIMIT)?;
        // MAX_LIMIT fits an INT4.
        let lim = i32::try_from(req.limit).unwrap_or(i32::MAX);
        let ticket_ttl = TICKET_TTL.as_millis() as i64;
        let rows = self
            .query_hot(
                conn,
                &self.sql.attempt,
                &[
                    (&key, Type::TEXT),
                    (&lim, Type::INT4),
                    (&check_lim, Type::BOOL),
                    (&ticket, Type::INT8),
                    (&queue, Type::BOOL),
                    (&enc.holder_id, Type::TEXT),
                    (&enc.holder_json, Type::TEXT),
                    (&enc.ttl_ms, Type::INT8),
                    (&self.magic, Type::INT4),
                    (&ticket_ttl, Type::INT8),
                    (&refresh, Type::BOOL),
                    (&enc.lock_delay_ms, Type::INT8),
                    (&claims, Type::INT8_ARRAY),
                    (&self.channel.as_str(), Type::TEXT),
                    (&self.pid_ns, Type::TEXT),
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| corrupt("the attempt function", "returned no row"))?;
        let outcome: String = col(row, 0)?;
        let lim = u32_of(col::<Option<i32>>(row, 3)?, "limit")?;
        match outcome.as_str() {
            "granted" => {
                let slot = u32_of(col::<Option<i32>>(row, 1)?, "slot")?;
                let token = col::<Option<i64>>(row, 2)?
                    .and_then(|t| u64::try_from(t).ok())
                    .ok_or_else(|| corrupt("the attempt function", "granted no token"))?;
                let now_ms = col::<Option<i64>>(row, 7)?
                    .and_then(|t| u64::try_from(t).ok())
                    .unwrap_or(0);
                Ok(Attempt::Granted(Box::new(Lease {
                    key: req.key.clone(),
                    slot,
                    limit: lim,
                    token: Token(token),
                    holder: req.holder.clone(),
                    ttl: Some(enc.ttl),
                    acquired_unix_ms: now_ms,
                    sent_at: Some(sent_at),
                })))
            }
            "busy" => Ok(Attempt::Busy {
                lim,
                held: u32_of(col::<Option<i32>>(row, 5)?, "held count")?,
                ahead: u32_of(col::<Option<i32>>(row, 6)?, "queue length")?,
                rows: looked(row)?,
                delay: delay_of(row)?,
            }),
            "mismatch" => Ok(Attempt::Mismatch { lim }),
            "queued" => {
                let ticket = col::<Option<i64>>(row, 4)?
                    .ok_or_else(|| corrupt("the attempt function", "queued without a ticket"))?;
                let held = u32_of(col::<Option<i32>>(row, 5)?, "held count")?;
                let ahead = u32_of(col::<Option<i32>>(row, 6)?, "queue position")?;
                Ok(Attempt::Queued {
                    ticket,
                    ahead,
                    free: lim.saturating_sub(held),
                    rows: looked(row)?,
                    delay: delay_of(row)?,
                })
            }
            other => Err(corrupt(
                "the attempt function",
                format!("answered '{other}', which this baton does not know"),
            )),
        }
    }

    /// Deletes an abandoned wait's ticket and its lock; drops the connection when that
    /// fails (its session's end releases the lock, which marks the ticket dead).
    async fn leave(&self, conn: Conn, key: &Key, ticket: Option<i64>) {
        let Some(t) = ticket else {
            self.checkin(conn);
            return;
        };
        let k = key.as_str();
        let r = self
            .query(
                &conn,
                &self.sql.leave,
                &[
                    (&k, Type::TEXT),
                    (&t, Type::INT8),
                    (&self.magic, Type::INT4),
                    (&self.channel.as_str(), Type::TEXT),
                ],
            )
            .await;
        if r.is_ok() {
            self.checkin(conn);
        }
    }

    /// The whole acquire, on the store's runtime.
    pub(crate) async fn acquire_task(
        self: Arc<Inner>,
        req: AcquireRequest,
        mut cancel: Cancel,
    ) -> Result<Lease, Error> {
        let key = req.key.clone();
        let enc = Encoded::new(&req)?;
        let start = Instant::now();
        let deadline = req.deadline(start);
        let queue = req.wait != Wait::NoWait;
        let (mut conn, mut wake_rx) = self.begin(queue).await?;
        let mut ticket: Option<i64> = None;
        let mut first = true;
        let mut refreshed = Refresh::new(TICKET_TTL, start);
        let mut watch = Watch::default();
        let mut claims: Vec<i64> = Vec::new();
        loop {
            let sent_at = Instant::now();
            let check_lim = first;
            // The ticket's expiry is written only every third of its TTL; the looks in
            // between are read-only unless they grant.
            let refresh = refreshed.due(sent_at);
            if refresh || ticket.is_none() {
                refreshed.done(sent_at);
            }
            let outcome = self
                .attempt(
                    &conn,
                    Look {
                        req: &req,
                        enc: &enc,
                        check_lim,
                        ticket,
                        queue,
                        refresh,
                        claims: &claims,
                        sent_at,
                    },
                )
                .await;
            // A row this look shows was written before the look read it: its TTL counts
            // from now, when the answer is here.
            let seen_at = Instant::now();
            first = false;
            let sent_claims = std::mem::take(&mut claims);
            let mut skip = match outcome {
                Ok(Attempt::Granted(lease)) => {
                    self.checkin(conn);
                    return Ok(*lease);
                }
                Ok(Attempt::Busy {
                    lim,
                    held,
                    ahead,
                    rows,
                    delay,
                }) => {
                    // A no-wait request has seen nothing for long: it can only take over
                    // from a holder on this host whose process is gone.
                    watch.update(&rows, delay, seen_at);
                    let now = Instant::now();
                    let dead = watch.claims(now);
                    if !dead.is_empty() && dead != sent_claims {
                        claims = dead;
                        continue;
                    }
                    self.checkin(conn);
                    // A held-back slot comes back once a waiter has seen it so for the
                    // delay: for a request arriving now, about the whole delay.
                    let held_back = rows
                        .iter()
                        .any(|r| r.id.lost)
                        .then(|| (delay, watch.next_lost(now).unwrap_or(delay)));
                    return Err(busy(held, lim, Some(ahead), held_back));
                }
                Ok(Attempt::Mismatch { lim }) => {
                    self.checkin(conn);
                    return Err(limit_mismatch(lim, req.limit));
                }
                Ok(Attempt::Queued {
                    ticket: t,
                    ahead,
                    free,
                    rows,
                    delay,
                }) => {
                    ticket = Some(t);
                    watch.update(&rows, delay, seen_at);
                    // Every waiter watches, not only the first in line: whoever sees a row
                    // stale first claims it, and the slot then goes to the first in line.
                    let stale = watch.claims(Instant::now());
                    if !stale.is_empty() && stale != sent_claims {
                        claims = stale;
                        continue;
                    }
                    // Each wake-up (a release, an abandoned wait) lets at most one more
                    // request in; with `ahead` live requests before this one and `free`
                    // slots, the first `ahead - free` wake-ups are for others. A waiter
                    // ahead that died sends none: the backstop look covers that.
                    ahead.saturating_sub(free)
                }
                Err(f) if ticket.is_none() && conn.reused && f.never_sent() => {
                    // A pooled connection that died with a server restart: the request
                    // never left, so a fresh connection may try again.
                    drop(conn);
                    conn = match self.connect().await {
                        Ok(c) => c,
                        Err(f) => return Err(self.map(f)),
                    };
                    first = check_lim;
                    continue;
                }
                Err(f) => {
                    let unknown = f.breaks_conn();
                    let mut e = self.map(f);
                    if unknown {
                        // The call may have run on the server: a grant we never saw
                        // expires at its TTL.
                        e = e.with_grant_unknown();
                        drop(conn);
                    } else {
                        self.leave(conn, &key, ticket).await;
                    }
                    return Err(e);
                }
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                self.leave(conn, &key, ticket).await;
                return Err(req.timed_out("every slot stayed held", &self.url));
            }
            // The next look: the backstop, the ticket's refresh, the next observation to
            // mature, the look cadence, or the deadline, whichever comes first.
            let wake = next_wake([
                Some(now + BACKSTOP),
                Some(refreshed.due_at()),
                watch.next(now).map(|n| now + n + Duration::from_millis(2)),
                watch.cadence().map(|c| now + c),
                deadline,
            ])
            .unwrap_or(now + BACKSTOP);
            let look_at = tokio::time::Instant::from_std(wake.max(now));
            loop {
                tokio::select! {
                    _ = &mut cancel => {
                        self.leave(conn, &key, ticket).await;
                        return Err(Error::new(ErrorKind::Cancelled, "cancelled"));
                    }
                    _ = tokio::time::sleep_until(look_at) => break,
                    all = woken(&mut wake_rx, key.as_str()) => {
                        if all || skip == 0 {
                            break;
                        }
                        skip -= 1;
                    }
                }
            }
        }
    }
}
