//! The grant: a waiter key per request, attached to the request's own etcd lease and
//! ordered by create revision; a slot key per grant; the limit in a key of its own. One
//! acquire is a fast path (one transaction when nobody waits or holds), else a queue
//! position, then rounds of: sweep dead waiters ahead, hold back slots whose lease was
//! lost (keys with a lock-delay), claim a free slot in a guarded transaction, or watch
//! what can wake this request and wait for it.
//!
//! Guarantees:
//! - Limit: a slot key is created only by a transaction that requires the slot key to be
//!   absent, the slot number to be below the limit read with the same transaction's
//!   guard on the limit key's mod revision, and the requester's waiter key to exist
//!   (its lease alive). Slot keys are unique, so at most `limit` exist at once.
//! - Tokens: etcd revisions rise with every write of the cluster and survive restarts, so
//!   a slot key's create revision is above every earlier grant's.
//! - Fairness: a request is granted only when fewer than `limit` waiter keys were created
//!   before its own, so nobody overtakes an earlier waiter.
//! - No herd: a waiter watches only the `limit` waiter keys closest ahead of it (and the
//!   limit key; and the slot keys when its turn has come but every slot below the limit is
//!   still taken). If fewer than `limit` keys remain ahead, one of those it watches is
//!   gone, so it never misses its turn; a deletion wakes at most `limit` waiters.
//! - No residue: an acquire that fails, times out or is cancelled revokes its lease,
//!   which deletes its waiter key; a waiter that dies leaves a key that etcd deletes when
//!   its lease's TTL runs out.

use std::time::{Duration, Instant, SystemTime};

use baton_core::kit::errors;
use baton_core::kit::sys::lock;
use baton_core::kit::time::{next_wake, renew_every, validate_ttl};
use baton_core::{unix_ms, AcquireRequest, Error, ErrorKind, Key, Lease, Op, Token, Wait};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::core::{random_lease_id, Inner, Watch};
use crate::layout::{show, HoldValue, Names, View, WaiterValue, MAX_LOCK_DELAY};
use crate::lease::{server_ttl_of, Granted};

/// One acquire in progress: what every step of it reads, and the two things that change
/// while it waits (when its lease's TTL last started, and whether it has waited).
struct Attempt<'a> {
    req: &'a AcquireRequest,
    names: Names,
    /// The request's etcd lease.
    id: i64,
    /// Its waiter key.
    mine: String,
    /// The lease id in hex: the slot record's `waiter`.
    my_hex: String,
    ttl: Duration,
    /// The lease's TTL in etcd, whole seconds, as granted.
    server_ttl: u64,
    deadline: Option<Instant>,
    /// When the request that last started the lease's TTL was sent.
    refreshed: Instant,
    waited: bool,
}

/// What the first transaction found.
enum FirstTry {
    /// Slot 0, at this revision (the fast path).
    Granted(i64),
    /// Queued: the key's state after the waiter key was written.
    Queued(View),
}

/// What a claim of a free slot came to.
enum Claim {
    /// This slot, with this token.
    Won { slot: u32, token: i64 },
    /// Someone changed the key first: its state now.
    Raced(View),
    /// Its turn has come but every slot below the limit is taken or held back.
    Full,
}

/// The arguments of [`Inner::hold_back`].
pub(crate) struct HoldBack<'a> {
    pub(crate) op: Op,
    pub(crate) key: &'a Key,
    pub(crate) names: &'a Names,
    pub(crate) slot: u32,
    /// The mod revision of the lost grant's `#g` record.
    pub(crate) g_mod: i64,
    pub(crate) delay: Duration,
    /// `expired` or `broken`.
    pub(crate) how: &'a str,
}

impl Inner {
    /// The whole acquire, on the store's runtime. The caller revokes lease `id` when this
    /// fails.
    pub(crate) async fn acquire_inner(
        &self,
        req: &AcquireRequest,
        id: i64,
        pooled: bool,
    ) -> Result<Lease, Error> {
        let key = &req.key;
        let ttl = validate_ttl(req.ttl, key)?;
        let lock_delay = req.lock_delay.filter(|d| !d.is_zero());
        if lock_delay.is_some_and(|d| d > MAX_LOCK_DELAY) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "the lock-delay is too large (at most 365 days)",
            ));
        }
        let server_ttl = server_ttl_of(ttl);
        let names = self.names(key);
        let start = Instant::now();
        let deadline = req.deadline(start);
        let value = serde_json::to_vec(&WaiterValue {
            holder: req.holder.clone(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        })
        .map_err(|e| {
            Error::new(ErrorKind::InvalidInput, "cannot encode the holder").with_source(e)
        })?;
        let (refreshed, server_ttl) = self
            .request_lease(key, id, pooled, server_ttl, start)
            .await?;
        let mut a = Attempt {
            req,
            mine: names.waiter(id),
            names,
            id,
            my_hex: format!("{id:016x}"),
            ttl,
            server_ttl,
            deadline,
            refreshed,
            waited: false,
        };
        match self.first_try(&a, value, lock_delay).await? {
            FirstTry::Granted(revision) => self.granted(&a, 0, req.limit, revision).await,
            FirstTry::Queued(view) => match view.limit {
                Some((have, _)) if have != req.limit => {
                    Err(errors::limit_mismatch(have, req.limit))
                }
                _ => self.wait_turn(&mut a, view).await,
            },
        }
    }

    /// Makes lease `id` ready to carry the request: refreshes a pooled one, else grants
    /// it. Returns when its TTL started and its TTL in etcd (whole seconds).
    async fn request_lease(
        &self,
        key: &Key,
        id: i64,
        pooled: bool,
        server_ttl: u64,
        start: Instant,
    ) -> Result<(Instant, u64), Error> {
        let op = Op::Acquire;
        // A pooled lease is refreshed (which also proves it is still there); one that
        // is gone is granted again under the same id.
        let reused = if pooled {
            match self.keep_alive(op, key, id).await {
                Ok(sent) => Some(sent),
                Err(e) if e.kind() == ErrorKind::Lost => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let (refreshed, granted_ttl) = match reused {
            Some(sent) => (sent, None),
            None => {
                let (_, ttl) = self.grant_lease(op, key, id, server_ttl).await?;
                // A grant is sent again on every try: count from before the first one.
                (start, ttl)
            }
        };
        let server_ttl = granted_ttl.map_or(server_ttl, |t| u64::try_from(t).unwrap_or(server_ttl));
        Ok((refreshed, server_ttl))
    }

    /// The first transaction: the fast path, else the queueing of this request (its waiter
    /// key, and the limit key with the lock-delay when the key is new) and a read of the
    /// key's state.
    async fn first_try(
        &self,
        a: &Attempt<'_>,
        value: Vec<u8>,
        lock_delay: Option<Duration>,
    ) -> Result<FirstTry, Error> {
        let op = Op::Acquire;
        let (req, names, id, mine) = (a.req, &a.names, a.id, &a.mine);
        let key = &req.key;
        let create = {
            let mut ops = vec![
                TxnOp::put(
                    mine.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(id)),
                ),
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::create_revision(
                            names.limit.clone(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then(
                            std::iter::once(TxnOp::put(
                                names.limit.clone(),
                                req.limit.to_string(),
                                None,
                            ))
                            // The delay comes into being with the limit, never after it.
                            .chain(lock_delay.map(|d| {
                                TxnOp::put(
                                    names.delay.clone(),
                                    d.as_millis().max(1).to_string(),
                                    None,
                                )
                            }))
                            .collect::<Vec<_>>(),
                        ),
                ),
            ];
            ops.extend(self.read_ops(names));
            Txn::new()
                .when([Compare::create_revision(mine.clone(), CompareOp::Equal, 0)])
                .and_then(ops)
                .or_else(self.read_ops(names))
        };
        // The fast path, one round trip: nobody waits or holds and the limit is the one
        // asked for, so this request takes slot 0 at once. Otherwise the nested
        // transaction queues it and reads the key's state.
        let slot0 = self.slot_value(a.my_hex.clone())?;
        let first = Txn::new()
            .when([
                Compare::version(names.waiters.clone(), CompareOp::Equal, 0).with_prefix(),
                Compare::version(names.slots.clone(), CompareOp::Equal, 0).with_prefix(),
                Compare::value(names.limit.clone(), CompareOp::Equal, req.limit.to_string()),
                // Keys with a lock-delay always take the full path (hold-backs, records).
                Compare::version(names.delay.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    mine.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(id)),
                ),
                TxnOp::put(names.slot(0), slot0, Some(PutOptions::new().with_lease(id))),
            ])
            .or_else([TxnOp::txn(create)]);
        let resp = self.txn(op, key, first).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            return Ok(FirstTry::Granted(revision));
        }
        let inner = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Txn(t) => Some(t),
                _ => None,
            })
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unavailable,
                    "etcd answered a transaction without its nested part",
                )
            })?;
        let mut view = self.parse_view(names, &inner)?;
        view.revision = revision;
        Ok(FirstTry::Queued(view))
    }

    /// The queued request's rounds, from `view`, until it is granted, gives up or fails.
    async fn wait_turn(&self, a: &mut Attempt<'_>, mut view: View) -> Result<Lease, Error> {
        let op = Op::Acquire;
        let (req, id) = (a.req, a.id);
        let key = &req.key;
        let keep_every = renew_every(Duration::from_secs(a.server_ttl.max(1)));
        let mut watch = Watch {
            stream: None,
            targets: Vec::new(),
            from: None,
        };
        loop {
            let Some((limit, limit_mod)) = view.limit else {
                return Err(crate::layout::corrupt(
                    &a.names.limit,
                    "vanished while requests use the key",
                ));
            };
            if let Some(s) = view.slots.iter().find(|s| s.value.waiter == a.my_hex) {
                // A claim whose answer was lost, seen again.
                return self.granted(a, s.slot, limit, s.create_rev).await;
            }
            let Some(pos) = view.entries.iter().position(|e| e.key == a.mine.as_bytes()) else {
                return Err(Error::new(
                    ErrorKind::Lost,
                    format!(
                        "this request's etcd lease {id:x} expired or was revoked while it waited \
                         (its waiter key is gone), so it was not granted"
                    ),
                ));
            };
            if self.sweep_dead(&view, pos).await {
                view = self.read_view(op, key, &a.names).await?;
                continue;
            }
            if self.hold_back_orphans(a, &view).await? {
                view = self.read_view(op, key, &a.names).await?;
                continue;
            }
            let mut watch_slots = false;
            if (pos as u64) < u64::from(limit) {
                match self.claim(a, &view, pos, limit, limit_mod).await? {
                    Claim::Won { slot, token } => return self.granted(a, slot, limit, token).await,
                    Claim::Raced(v) => {
                        view = v;
                        continue;
                    }
                    Claim::Full => watch_slots = true,
                }
            }
            if req.wait == Wait::NoWait {
                return Err(self.busy(&view, limit).await);
            }
            a.waited = true;
            let targets = watch_targets(&a.names, &view, pos, limit, watch_slots);
            if watch.stream.is_none() || watch.targets != targets {
                let prefixes = [a.names.slots.clone(), a.names.holds.clone()];
                watch = self.watch_keys(op, key, targets, &prefixes).await?;
                if watch.from.is_some_and(|r| r > view.revision) {
                    // Something changed between the read and the watch: read again (the
                    // watch stays if it still watches the right keys).
                    view = self.read_view(op, key, &a.names).await?;
                    continue;
                }
            }
            // Wait for an event, the next keep-alive, or the deadline.
            let next_keep = a.refreshed + keep_every;
            let until = next_wake([Some(next_keep), a.deadline]).unwrap_or(next_keep);
            let woke = self.wait_for_acquire(&mut watch, until).await;
            let now = Instant::now();
            if a.deadline.is_some_and(|d| now >= d) {
                return Err(req.timed_out("every slot stayed held", &self.url));
            }
            if !woke || now >= next_keep {
                a.refreshed = self.keep_alive(op, key, id).await.map_err(|e| {
                    if e.kind() == ErrorKind::Lost {
                        Error::new(
                            ErrorKind::Lost,
                            format!(
                                "this request's etcd lease {id:x} expired or was revoked while it \
                                 waited, so it was not granted"
                            ),
                        )
                    } else {
                        e
                    }
                })?;
            }
            view = self.read_view(op, key, &a.names).await?;
        }
    }

    /// Revokes the leases of waiters ahead of position `pos` whose process died on this
    /// host; true when there were any (the caller then reads again).
    async fn sweep_dead(&self, view: &View, pos: usize) -> bool {
        // Waiters ahead whose process died on this host: their keys would block the
        // queue until their leases run out. Holders are left to their TTL.
        let holding: Vec<String> = view.slots.iter().map(|s| s.value.waiter.clone()).collect();
        let dead: Vec<i64> = view.entries[..pos]
            .iter()
            .filter(|e| !holding.iter().any(|h| e.key.ends_with(h.as_bytes())))
            .filter(|e| e.holder_dead())
            .map(|e| e.lease)
            .collect();
        if dead.is_empty() {
            return false;
        }
        for d in dead {
            self.revoke_quiet(d).await;
        }
        true
    }

    /// Holds back the slots of grants lost since anyone looked (keys with a lock-delay);
    /// true when there were any (the caller then reads again).
    async fn hold_back_orphans(&self, a: &Attempt<'_>, view: &View) -> Result<bool, Error> {
        // Leases lost since anyone looked: hold their slots back from now on.
        let (Some(delay), false) = (view.delay, view.orphans().is_empty()) else {
            return Ok(false);
        };
        for (slot, g_mod) in view.orphans() {
            self.hold_back(HoldBack {
                op: Op::Acquire,
                key: &a.req.key,
                names: &a.names,
                slot,
                g_mod,
                delay,
                how: "expired",
            })
            .await?;
        }
        Ok(true)
    }

    /// Claims the first free slot below `limit` for the request at queue position `pos`
    /// (its turn has come), in a transaction guarded by its waiter key, the slot key's
    /// absence and the limit key's mod revision `limit_mod`.
    async fn claim(
        &self,
        a: &Attempt<'_>,
        view: &View,
        pos: usize,
        limit: u32,
        limit_mod: i64,
    ) -> Result<Claim, Error> {
        let op = Op::Acquire;
        let (names, mine, key) = (&a.names, &a.mine, &a.req.key);
        let my_rev = view.entries[pos].create_rev;
        let taken: Vec<u32> = view.slots.iter().map(|s| s.slot).collect();
        let Some(slot) = (0..limit).find(|s| !taken.contains(s) && !view.held_back(*s)) else {
            return Ok(Claim::Full);
        };
        let slot_key = names.slot(slot);
        let sv = self.slot_value(a.my_hex.clone())?;
        let mut when = vec![
            Compare::create_revision(mine.clone(), CompareOp::Equal, my_rev),
            Compare::create_revision(slot_key.clone(), CompareOp::Equal, 0),
            Compare::mod_revision(names.limit.clone(), CompareOp::Equal, limit_mod),
        ];
        let mut then = vec![TxnOp::put(
            slot_key.clone(),
            sv,
            Some(PutOptions::new().with_lease(a.id)),
        )];
        if view.delay.is_some() {
            // Not held back, no unrecorded loss; and record this grant, so
            // that its loss (the slot key gone without a release) shows.
            when.push(Compare::create_revision(
                names.hold(slot),
                CompareOp::Equal,
                0,
            ));
            when.push(Compare::create_revision(
                names.grant(slot),
                CompareOp::Equal,
                0,
            ));
            then.push(TxnOp::put(names.grant(slot), a.my_hex.clone(), None));
        }
        let claim = Txn::new()
            .when(when)
            .and_then(then)
            .or_else(self.read_ops(names));
        let resp = self.txn(op, key, claim).await?;
        if resp.succeeded() {
            let token = resp.header().map(|h| h.revision()).unwrap_or(0);
            return Ok(Claim::Won { slot, token });
        }
        Ok(Claim::Raced(self.parse_view(names, &resp)?))
    }

    /// The `Busy` answer to a request that does not wait.
    async fn busy(&self, view: &View, limit: u32) -> Error {
        let held = u32::try_from(view.slots.len()).unwrap_or(u32::MAX);
        let held_back = match view.delay {
            Some(d) => self.hold_left(view).await.map(|left| (d, left)),
            None => None,
        };
        errors::busy(held, limit, None, held_back)
    }

    /// Holds `slot` back for `delay` from now: creates its `#h` key on an etcd lease of
    /// the delay's TTL (whole seconds, rounded up; etcd may raise it to its minimum), in a
    /// transaction that deletes the lost grant's record `#g` (still at `g_mod`), so that
    /// of all who see the loss one holds the slot back. Losing that race is fine.
    pub(crate) async fn hold_back(&self, h: HoldBack<'_>) -> Result<(), Error> {
        let HoldBack {
            op,
            key,
            names,
            slot,
            g_mod,
            delay,
            how,
        } = h;
        let hold = random_lease_id();
        self.grant_lease(op, key, hold, server_ttl_of(delay))
            .await?;
        let value = serde_json::to_vec(&HoldValue {
            token: g_mod,
            how: how.to_owned(),
            lost_unix_ms: unix_ms(SystemTime::now()),
        })
        .map_err(|e| {
            Error::new(ErrorKind::InvalidInput, "cannot encode the hold-back").with_source(e)
        })?;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(names.grant(slot), CompareOp::Equal, g_mod),
                Compare::create_revision(names.slot(slot), CompareOp::Equal, 0),
                Compare::create_revision(names.hold(slot), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    names.hold(slot),
                    value,
                    Some(PutOptions::new().with_lease(hold)),
                ),
                TxnOp::delete(names.grant(slot), None),
            ]);
        let resp = self.txn(op, key, txn).await;
        if !resp.as_ref().is_ok_and(|r| r.succeeded()) {
            self.revoke_quiet(hold).await;
        }
        resp.map(|_| ())
    }

    /// How long the first hold-back of `view` still lasts, by etcd's lease clock (`None`:
    /// nothing is held back, or etcd did not say).
    async fn hold_left(&self, view: &View) -> Option<Duration> {
        let mut left: Option<Duration> = None;
        for (_, id, _) in &view.holds {
            if let Some(d) = self.lease_left(*id).await {
                left = Some(left.map_or(d, |l| l.min(d)));
            }
        }
        left.or_else(|| (!view.holds.is_empty()).then_some(Duration::ZERO))
    }

    /// Finishes a grant of `slot` (of `limit`) with token `token`: after a wait, one
    /// keep-alive so the keeper's first deadline counts from now; records the lease id for
    /// release and renew.
    async fn granted(
        &self,
        a: &Attempt<'_>,
        slot: u32,
        limit: u32,
        token: i64,
    ) -> Result<Lease, Error> {
        let (req, id, ttl) = (a.req, a.id, a.ttl);
        let sent_at = if a.waited {
            self.keep_alive(Op::Acquire, &req.key, id).await?
        } else {
            a.refreshed
        };
        let token = u64::try_from(token).map_err(|_| {
            Error::new(
                ErrorKind::Corrupt,
                format!("etcd answered a negative revision {token}"),
            )
        })?;
        lock(&self.granted).insert(
            (req.key.as_str().to_owned(), token),
            Granted {
                id,
                server_ttl: server_ttl_of(ttl),
                refreshed: sent_at,
            },
        );
        Ok(Lease {
            key: req.key.clone(),
            slot,
            limit,
            token: Token(token),
            holder: req.holder.clone(),
            ttl: Some(ttl),
            acquired_unix_ms: unix_ms(SystemTime::now()),
            sent_at: Some(sent_at),
        })
    }
}

/// What can wake the request at queue position `pos`.
fn watch_targets(
    names: &Names,
    view: &View,
    pos: usize,
    limit: u32,
    watch_slots: bool,
) -> Vec<String> {
    // Watch only what can wake this request: the `limit` waiter keys closest ahead
    // (if fewer than `limit` remain ahead, one of them is gone), the limit key (a
    // resize), and the slot keys when it is its turn but no slot below the limit
    // is free (a holder above a lowered limit releasing).
    let ahead = &view.entries[..pos];
    let first = ahead.len().saturating_sub(limit as usize);
    let mut targets: Vec<String> = ahead[first..].iter().map(|e| show(&e.key)).collect();
    targets.push(names.limit.clone());
    if watch_slots {
        targets.push(names.slots.clone());
        if view.delay.is_some() {
            // A hold-back ends by its etcd lease expiring: a deletion to wake on.
            targets.push(names.holds.clone());
        }
    }
    targets
}
