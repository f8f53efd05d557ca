//! The `Store` trait: the small set of operations every store implements.
//!
//! Convenience built on it (guards, `try_acquire`, `acquire_timeout`) lives in
//! [`crate::StoreExt`]; mechanisms a store implementation shares with the others live in
//! [`crate::kit`]. Operations a store may lack (renew, break, resize, barrier) have
//! default bodies that answer [`ErrorKind::Unsupported`]; [`Capabilities`] says which of
//! them a store has, whether it queues waiters (fifo) and counts them, whether a key can
//! have a lock-delay, and how soon a dead holder's slot comes back ([`Recovery`]).

use std::fmt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{
    format_duration, Error, ErrorKind, Holder, HolderId, Key, Lease, Op, Resize, Result, StoreUrl,
    Token, Wait,
};

/// A request for one slot of a key.
#[derive(Clone, Debug)]
pub struct AcquireRequest {
    /// The key.
    pub key: Key,
    /// How many slots the key has: 1 for a mutex, N for a semaphore. A key keeps the
    /// limit it was created with; another limit gets [`ErrorKind::LimitMismatch`].
    pub limit: u32,
    /// How long to wait for a slot.
    pub wait: Wait,
    /// Time to live for lease stores; kernel-lock stores ignore it.
    pub ttl: Option<Duration>,
    /// Who asks.
    pub holder: Holder,
    /// Lock-delay (DESIGN, contract point 8), for lease stores: after a lease of this key
    /// is lost rather than released (it expired, was broken, or its session died), the
    /// slot is not granted again for this long, so a stalled holder's in-flight work can
    /// drain. Set when the request creates the key; an existing key keeps the delay it was
    /// created with. `None` (or zero): no delay. Clean releases never wait.
    pub lock_delay: Option<Duration>,
}

impl AcquireRequest {
    /// A request for a mutex on `key` by this process, waiting forever.
    pub fn new(key: Key, holder: Holder) -> AcquireRequest {
        AcquireRequest {
            key,
            limit: 1,
            wait: Wait::Forever,
            ttl: None,
            holder,
            lock_delay: None,
        }
    }

    /// Checks the parts every store checks the same way.
    pub fn validate(&self) -> Result<()> {
        if self.limit == 0 {
            return Err(
                Error::new(ErrorKind::InvalidInput, "the limit must be at least 1 slot")
                    .with_op(Op::Acquire)
                    .with_key(&self.key),
            );
        }
        Ok(())
    }

    /// When a wait that starts at `start` gives up: `Some` only for [`Wait::Timeout`]
    /// (`None` too when the sum overflows `Instant`, which is as good as forever).
    pub fn deadline(&self, start: Instant) -> Option<Instant> {
        match self.wait {
            Wait::Timeout(d) => start.checked_add(d),
            _ => None,
        }
    }

    /// The [`ErrorKind::Timeout`] error of this request's wait running out on `store`:
    /// `<what> for <the timeout>`, such as `every slot stayed held for 5s`.
    pub fn timed_out(&self, what: &str, store: impl fmt::Display) -> Error {
        let d = match self.wait {
            Wait::Timeout(d) => format_duration(d),
            _ => String::from("the wait"),
        };
        Error::new(ErrorKind::Timeout, format!("{what} for {d}"))
            .with_op(Op::Acquire)
            .with_key(&self.key)
            .with_store(store)
    }
}

/// What `release` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Released {
    /// The lease was held and is now released.
    Released,
    /// The lease was not held: released before, or lost. Nothing was freed.
    NotHeld,
}

/// How soon a dead holder's slot comes back, as a bound the conformance suite checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Recovery {
    /// At once: the kernel frees a dead holder's lock with its process.
    AtOnce,
    /// Within the lease's TTL plus `extra` (the store's rounding or its sweep period).
    WithinTtl {
        /// What the store adds to the TTL.
        extra: Duration,
    },
}

impl Default for Recovery {
    fn default() -> Recovery {
        Recovery::WithinTtl {
            extra: Duration::ZERO,
        }
    }
}

impl Recovery {
    /// The bound for a lease of `ttl`.
    pub fn bound(self, ttl: Duration) -> Duration {
        match self {
            Recovery::AtOnce => Duration::ZERO,
            Recovery::WithinTtl { extra } => ttl.saturating_add(extra),
        }
    }
}

/// What a store can do beyond acquire, release, inspect and list. Declared once, in the
/// store's `capabilities()`; the conformance suite runs each property a declaration
/// promises, and fails a store that declares a capability and then answers `Unsupported`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Leases expire unless renewed (`renew` works).
    pub renew: bool,
    /// Another process can free a holder's slot (`break_lease` works).
    pub break_lease: bool,
    /// A key's limit can change (`resize` works).
    pub resize: bool,
    /// Waiters are served first come, first served.
    pub fifo: bool,
    /// A key can have a lock-delay ([`AcquireRequest::lock_delay`]).
    pub lock_delay: bool,
    /// Barriers work ([`Store::barrier`]).
    pub barrier: bool,
    /// `inspect` counts the requests that wait ([`KeyStatus::waiters`]).
    pub waiters: bool,
    /// A key nobody holds or waits for can be removed ([`Store::delete`]).
    pub delete: bool,
    /// How soon a dead holder's slot comes back, as a bound.
    pub bound: Recovery,
    /// The same, in words, for `status` and docs.
    pub recovery: &'static str,
}

impl Capabilities {
    /// Capabilities with everything off and `recovery` set (the bound: within the TTL).
    pub fn new(recovery: &'static str) -> Capabilities {
        Capabilities {
            recovery,
            ..Capabilities::default()
        }
    }

    /// What every lease store of baton has: renew, break, resize, FIFO waiters, lock-delay,
    /// barriers, a waiter count and delete, with a dead holder's slot back within the TTL plus
    /// `extra`.
    pub fn lease_store(recovery: &'static str, extra: Duration) -> Capabilities {
        Capabilities {
            renew: true,
            break_lease: true,
            resize: true,
            fifo: true,
            lock_delay: true,
            barrier: true,
            waiters: true,
            delete: true,
            bound: Recovery::WithinTtl { extra },
            recovery,
        }
    }

    /// Sets `renew`.
    pub fn with_renew(mut self, on: bool) -> Capabilities {
        self.renew = on;
        self
    }

    /// Sets `break_lease`.
    pub fn with_break(mut self, on: bool) -> Capabilities {
        self.break_lease = on;
        self
    }

    /// Sets `resize`.
    pub fn with_resize(mut self, on: bool) -> Capabilities {
        self.resize = on;
        self
    }

    /// Sets `fifo`.
    pub fn with_fifo(mut self, on: bool) -> Capabilities {
        self.fifo = on;
        self
    }

    /// Sets `lock_delay`.
    pub fn with_lock_delay(mut self, on: bool) -> Capabilities {
        self.lock_delay = on;
        self
    }

    /// Sets `barrier`.
    pub fn with_barrier(mut self, on: bool) -> Capabilities {
        self.barrier = on;
        self
    }

    /// Sets `waiters`.
    pub fn with_waiters(mut self, on: bool) -> Capabilities {
        self.waiters = on;
        self
    }

    /// Sets `delete`.
    pub fn with_delete(mut self, on: bool) -> Capabilities {
        self.delete = on;
        self
    }

    /// Sets the recovery bound.
    pub fn with_bound(mut self, bound: Recovery) -> Capabilities {
        self.bound = bound;
        self
    }
}

/// The state of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    /// Nobody holds it.
    Free,
    /// Somebody holds it.
    Held,
}

/// One slot of a key, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// The slot number.
    pub slot: u32,
    /// Free or held.
    pub state: SlotState,
    /// The holder's fencing token, when held and known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
    /// The holder, when held and known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder>,
    /// When it was granted, in ms since the Unix epoch, when held and known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix_ms: Option<u64>,
    /// When the lease was last renewed (its heartbeat), in ms since the Unix epoch, on
    /// lease stores that record it. For display only: no decision is made from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_unix_ms: Option<u64>,
    /// When the lease expires unless renewed, in ms since the Unix epoch, as the store
    /// estimates it (lease stores). For display only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    /// Anything odd about the slot, in words (unreadable holder info, a stale record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl SlotStatus {
    /// A free slot with nothing recorded about it.
    pub fn free(slot: u32) -> SlotStatus {
        SlotStatus {
            slot,
            state: SlotState::Free,
            token: None,
            holder: None,
            since_unix_ms: None,
            renewed_unix_ms: None,
            expires_unix_ms: None,
            note: None,
        }
    }

    /// A slot as a store's lease record shows it: the grant's `token`, the holder's id and
    /// its JSON ([`Holder::to_json`]), and when it was granted. Held when `expired` is
    /// `None`; otherwise free, with a note that the lease `expired` (the reason, such as
    /// `expired without being renewed or released`) and that the next acquire reclaims it.
    pub fn of_record(
        slot: u32,
        token: u64,
        holder_id: &str,
        holder_json: &str,
        since_unix_ms: Option<u64>,
        expired: Option<&str>,
    ) -> SlotStatus {
        let mut st = SlotStatus::free(slot);
        let holder = Holder::from_json(holder_json);
        match expired {
            None => {
                st.state = SlotState::Held;
                st.token = Some(Token(token));
                st.since_unix_ms = since_unix_ms;
                if holder.is_none() {
                    st.note = Some(format!("holder info unreadable (holder id {holder_id})"));
                }
                st.holder = holder;
            }
            Some(why) => {
                let who = holder
                    .map(|h| format!("pid {} on {}", h.pid, h.host))
                    .unwrap_or_else(|| format!("holder {holder_id}"));
                st.note = Some(format!(
                    "free: the lease with token {token} ({who}) {why}; the next acquire \
                     reclaims it"
                ));
            }
        }
        st
    }
}

/// A key's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The key.
    pub key: Key,
    /// Its limit.
    pub limit: u32,
    /// Its slots, in order.
    pub slots: Vec<SlotStatus>,
    /// How many requests wait, when the store can tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiters: Option<u32>,
    /// The last token granted, when the store can tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_token: Option<Token>,
    /// The key's lock-delay in milliseconds, when it has one ([`AcquireRequest::lock_delay`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_delay_ms: Option<u64>,
}

impl KeyStatus {
    /// How many slots are held.
    pub fn held(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state == SlotState::Held)
            .count()
    }
}

/// A store: where coordination state lives. Every store keeps the contract in DESIGN.md;
/// `baton-conformance` checks it.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// The store's URL (its `Display` hides secrets).
    fn url(&self) -> &StoreUrl;

    /// What the store can do beyond the required operations.
    fn capabilities(&self) -> Capabilities;

    /// Acquires one slot of `req.key`, waiting as `req.wait` says.
    ///
    /// Fails with `Busy` (no-wait), `Timeout`, `LimitMismatch`, `Unavailable` or `Corrupt`.
    /// An acquire that fails or is cancelled (its future dropped) leaves nothing behind.
    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease>;

    /// Releases a lease. Idempotent: a lease released before, or lost, answers
    /// [`Released::NotHeld`] and frees nothing.
    async fn release(&self, lease: &Lease) -> Result<Released>;

    /// Synchronous best-effort release used by [`crate::LeaseGuard`]'s `Drop`; `false`
    /// when this store cannot release without awaiting.
    fn release_now(&self, lease: &Lease) -> bool {
        let _ = lease;
        false
    }

    /// A key's limit, slots and holders.
    async fn inspect(&self, key: &Key) -> Result<KeyStatus>;

    /// Every key the store knows, sorted.
    async fn list(&self) -> Result<Vec<Key>>;

    /// Renews a lease (lease stores). Kernel-lock stores answer `Unsupported`.
    async fn renew(&self, lease: &Lease) -> Result<Lease> {
        Err(unsupported(self.url(), Op::Renew, &lease.key))
    }

    /// Frees the slots of `key` held by `holder` (all holders when `None`), returning the
    /// slots it freed.
    async fn break_lease(&self, key: &Key, holder: Option<HolderId>) -> Result<Vec<SlotStatus>> {
        let _ = holder;
        Err(unsupported(self.url(), Op::Break, key))
    }

    /// Changes a key's limit, to a number or by a step ([`Resize`], applied atomically to
    /// the limit the store has). Lowering it never evicts holders; it stops new grants
    /// until they drain.
    async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus> {
        let _ = change;
        Err(unsupported(self.url(), Op::Resize, key))
    }

    /// Removes a key that nobody holds or waits for: its limit, lock-delay and records go
    /// (the next acquire creates it anew), and its tokens keep rising (a key made again
    /// never hands out a token its earlier life did). Refuses with `Busy`, naming what
    /// holds it, while a slot is held, a lost lease's slot is held back, or a request waits
    /// (where the store can see waiters); `NotFound` when there is no such key.
    async fn delete(&self, key: &Key) -> Result<()> {
        Err(unsupported(self.url(), Op::Delete, key))
    }

    /// Arrives at the barrier `req.key` and waits until `req.parties` parties (this one
    /// included) have arrived; see [`crate::barrier`] for the semantics every store keeps.
    /// Fails with `Timeout` (or `Busy` for [`Wait::NoWait`]) when the others do not come in
    /// time, and then this arrival is withdrawn.
    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed> {
        Err(unsupported(self.url(), Op::Barrier, &req.key))
    }
}

/// An arrival at a barrier: see [`crate::barrier`].
#[derive(Clone, Debug)]
pub struct BarrierRequest {
    /// The barrier's name (a key; barriers and locks of one name do not interfere).
    pub key: Key,
    /// How many parties make a generation pass (at least 1). Every party of a generation
    /// must ask for the same number.
    pub parties: u32,
    /// How long to wait for the others.
    pub wait: Wait,
    /// Who arrives.
    pub holder: Holder,
}

/// A barrier generation that passed: `parties` parties had arrived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierPassed {
    /// The barrier's name.
    pub key: Key,
    /// The generation that passed: 0 for the first group of `parties` arrivals at this
    /// key, then 1, and so on.
    pub generation: u64,
    /// How many parties it had.
    pub parties: u32,
}

fn unsupported(url: &StoreUrl, op: Op, key: &Key) -> Error {
    Error::new(
        ErrorKind::Unsupported,
        format!("the {} store does not support this", url.scheme()),
    )
    .with_op(op)
    .with_key(key)
    .with_store(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(wait: Wait) -> AcquireRequest {
        let mut r = AcquireRequest::new(
            Key::new("k").expect("key"),
            Holder::current(vec!["true".into()]),
        );
        r.wait = wait;
        r
    }

    #[test]
    fn deadlines_and_timeouts() {
        let now = Instant::now();
        let d = Duration::from_secs(5);
        assert_eq!(req(Wait::Timeout(d)).deadline(now), Some(now + d));
        assert_eq!(req(Wait::Forever).deadline(now), None);
        assert_eq!(req(Wait::NoWait).deadline(now), None);
        let e = req(Wait::Timeout(d)).timed_out("every slot stayed held", "mem:");
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert_eq!(e.message(), "every slot stayed held for 5s");
        assert_eq!(
            (e.op(), e.key(), e.store()),
            (Some(Op::Acquire), Some("k"), Some("mem:"))
        );
    }

    #[test]
    fn slots_from_records() {
        let me = Holder::current(vec!["true".into()]);
        let json = me.to_json().expect("json");
        let held = SlotStatus::of_record(0, 7, "h1", &json, Some(9), None);
        assert_eq!(held.state, SlotState::Held);
        assert_eq!((held.token, held.since_unix_ms), (Some(Token(7)), Some(9)));
        assert_eq!(held.holder.as_ref(), Some(&me));
        assert_eq!(held.note, None);
        let unreadable = SlotStatus::of_record(1, 7, "h1", "{not json", None, None);
        assert_eq!(
            unreadable.note.as_deref(),
            Some("holder info unreadable (holder id h1)")
        );
        let gone = SlotStatus::of_record(2, 7, "h1", "{not json", Some(9), Some("expired"));
        assert_eq!(gone.state, SlotState::Free);
        assert_eq!(
            (gone.token, gone.holder, gone.since_unix_ms),
            (None, None, None)
        );
        assert_eq!(
            gone.note.as_deref(),
            Some("free: the lease with token 7 (holder h1) expired; the next acquire reclaims it")
        );
        assert_eq!(SlotStatus::free(3).state, SlotState::Free);
    }
}
