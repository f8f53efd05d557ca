//! Leader election on any [`Store`]: the leader of a key is the holder of slot 0 of that
//! key as a mutex (a key of limit 1). There is one mechanism, built only on the `Store`
//! trait, so election works — with each store's own recovery bound — on every store.
//!
//! - [`campaign`] waits until this holder is elected and returns a [`Leadership`];
//! - [`Leadership::lost`] resolves when leadership is lost, [`Leadership::resign`] ends it;
//! - [`leader`] says who leads now (holder, token, since), or that nobody does;
//! - [`observe`] reports changes of leader, by polling.
//!
//! Guarantees (they are the store's contract, DESIGN.md, applied to a key of limit 1):
//! - **At most one leader.** At no instant of the store's own time are two leaderships
//!   of one key granted.
//! - **Fencing.** Every election returns a token ([`Leadership::token`]) greater than
//!   that of every earlier election of the key. A leader that was paused or partitioned
//!   may still act after it lost leadership — no lock can stop it — so a resource that
//!   must only be changed by the current leader must check the token.
//! - **Loss before re-election.** On a lease store (`capabilities().renew`) a keeper
//!   renews the lease every TTL/3 on its own thread, and [`Leadership::lost`] resolves
//!   before the store could elect anyone else. On a kernel-lock store the lock lasts as
//!   long as the process holds the `Leadership`, and `lost` never resolves.
//! - **Take-over.** When a leader resigns, the next contender is elected at once; when it
//!   dies, within the store's recovery bound (at once for kernel locks, within the TTL
//!   for lease stores).
//! - **No residue.** A campaign that is cancelled (its future dropped, for example by
//!   `tokio::time::timeout`) leaves nothing behind in the store.
//!
//! [`leader`] and [`observe`] only read: what they report may already have changed when
//! the caller looks at it. Never decide that *you* lead from them; hold a `Leadership`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    from_unix_ms, Error, ErrorKind, Holder, Keeper, KeeperConfig, Key, KeyStatus, Lease,
    LeaseGuard, LeaseState, Op, Released, Result, SlotState, Store, StoreExt, Token,
};

/// Who leads a key, as the store reports it.
///
/// Fields are `None` when the store cannot tell: the directory store, for one, has a
/// short window after a lock is taken and before its holder has written who it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Leader {
    /// The key.
    pub key: Key,
    /// The leader's fencing token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Token>,
    /// The leader: id, host, pid, user, command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<Holder>,
    /// When it was elected, in milliseconds since the Unix epoch (display only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix_ms: Option<u64>,
}

impl Leader {
    /// When it was elected, on the wall clock (display only).
    pub fn since(&self) -> Option<SystemTime> {
        self.since_unix_ms.map(from_unix_ms)
    }

    /// The leader of a key, from its status: `None` when slot 0 is free. A key whose limit
    /// is not 1 is a semaphore, not a leader key: `LimitMismatch`.
    pub fn from_status(status: &KeyStatus) -> Result<Option<Leader>> {
        if status.limit != 1 {
            return Err(Error::new(
                ErrorKind::LimitMismatch,
                format!(
                    "the key is a semaphore of {} slots; a leader key is a mutex (1 slot)",
                    status.limit
                ),
            )
            .with_op(Op::Inspect)
            .with_key(&status.key)
            .with_current_limit(status.limit));
        }
        Ok(status
            .slots
            .iter()
            .find(|s| s.slot == 0 && s.state == SlotState::Held)
            .map(|s| Leader {
                key: status.key.clone(),
                token: s.token,
                holder: s.holder.clone(),
                since_unix_ms: s.since_unix_ms,
            }))
    }
}

/// Being the leader of a key: holds the lease of slot 0 and, on a lease store, the keeper
/// that renews it.
///
/// [`Leadership::resign`] is the reliable way to step down: it reports what the store
/// did. Dropping a `Leadership` stops the keeper and releases the lease as
/// [`LeaseGuard`]'s `Drop` does: at once on stores that can release synchronously (the
/// directory store), else by a task on the current Tokio runtime, else only when the
/// lease expires or the process exits.
#[must_use = "leadership ends when the Leadership is dropped"]
#[derive(Debug)]
pub struct Leadership {
    // Declared before `guard` so that it drops first: renewals stop before the release.
    keeper: Option<Keeper>,
    guard: LeaseGuard,
}

impl Leadership {
    /// The lease of slot 0 that makes this holder the leader.
    pub fn lease(&self) -> &Lease {
        self.guard.lease()
    }

    /// The key.
    pub fn key(&self) -> &Key {
        &self.lease().key
    }

    /// This election's fencing token: greater than every earlier election's. Pass it to
    /// the resources the leader changes.
    pub fn token(&self) -> Token {
        self.lease().token
    }

    /// Whether this holder still leads, as far as it can tell: `false` once the keeper
    /// has declared the lease lost. Always `true` on a kernel-lock store.
    pub fn is_leading(&self) -> bool {
        self.keeper
            .as_ref()
            .is_none_or(|k| matches!(k.state(), LeaseState::Held { .. }))
    }

    /// Resolves when leadership is lost, with the keeper's final state (`Lost` and why).
    ///
    /// On a lease store it resolves no later than the keeper's deadline, which falls
    /// before the store could elect anyone else; stop acting as the leader then. On a
    /// kernel-lock store it never resolves: the kernel holds the lock for as long as the
    /// process lives and keeps this `Leadership`.
    pub async fn lost(&self) -> LeaseState {
        match &self.keeper {
            Some(keeper) => keeper.lost().await,
            None => std::future::pending().await,
        }
    }

    /// Steps down: stops renewing and releases the lease, so the next contender can be
    /// elected at once. Answers [`Released::NotHeld`] when leadership was already lost.
    pub async fn resign(self) -> Result<Released> {
        let Leadership { keeper, guard } = self;
        if let Some(keeper) = keeper {
            keeper.stop();
        }
        guard.release().await
    }
}

/// Campaigns for leadership of `key`: waits, as long as it takes, until `holder` is
/// elected, and returns the [`Leadership`].
///
/// `ttl` is the lease's time to live on lease stores (`None`: the store's default);
/// kernel-lock stores ignore it. On a store with `capabilities().renew`, a [`Keeper`] is
/// started that renews the lease every TTL/3.
///
/// To give up, drop the future (for a bound, wrap it in `tokio::time::timeout`): the store
/// guarantees that a cancelled wait leaves nothing behind.
///
/// Errors: `LimitMismatch` when the key exists as a semaphore of more than one slot,
/// `Unavailable` or `Corrupt` from the store.
pub async fn campaign(
    store: Arc<dyn Store>,
    key: Key,
    holder: Holder,
    ttl: Option<Duration>,
) -> Result<Leadership> {
    let mut request = store.lock(key).limit(1).holder(holder);
    if let Some(ttl) = ttl {
        request = request.ttl(ttl);
    }
    // Taken before the request is sent: a lease without its own `sent_at` counts its
    // first deadline from here.
    let sent_at = Instant::now();
    let guard = request.acquire().await?;
    let keeper = match (store.capabilities().renew, guard.lease().ttl) {
        (true, Some(ttl)) => Some(Keeper::start(
            Arc::clone(&store),
            guard.lease().clone(),
            KeeperConfig::for_ttl(ttl),
            sent_at,
        )?),
        _ => None,
    };
    Ok(Leadership { keeper, guard })
}

/// Who leads `key` now: the holder of its slot 0, or `None` when nobody does or the key
/// does not exist.
///
/// Errors: `LimitMismatch` when the key is a semaphore of more than one slot, and the
/// store's own errors (`Unavailable`, `Corrupt`).
pub async fn leader(store: &dyn Store, key: &Key) -> Result<Option<Leader>> {
    match store.inspect(key).await {
        Ok(status) => Leader::from_status(&status),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Watches who leads `key`: the receiver starts with the current leader and sees every
/// change (a new leader, a new election of the same holder, no leader).
///
/// This **polls**: a task on the current Tokio runtime calls [`leader`] every `interval`
/// (at least 1 ms), so a change is seen no later than `interval` plus one `inspect` after
/// the store shows it. Changes that come and go between two polls are not seen. What the
/// store shows is bounded by its recovery: a lease-store leader that died silently on
/// another host is shown as the leader until a contender reclaims its lease after the TTL.
///
/// The task stops when every receiver is dropped, and also on an error that retrying
/// cannot fix (the key became a semaphore, corrupt state); then `changed()` answers an
/// error. Errors that may pass (`Unavailable`) keep the last value and poll again.
///
/// Errors: those of [`leader`], for the first poll. Must be called within a Tokio runtime.
pub async fn observe(
    store: Arc<dyn Store>,
    key: Key,
    interval: Duration,
) -> Result<watch::Receiver<Option<Leader>>> {
    let first = leader(&*store, &key).await?;
    let (tx, rx) = watch::channel(first);
    let interval = interval.max(Duration::from_millis(1));
    tokio::spawn(async move {
        loop {
            let now = tokio::select! {
                () = tx.closed() => return,
                now = async {
                    tokio::time::sleep(interval).await;
                    leader(&*store, &key).await
                } => now,
            };
            match now {
                Ok(now) => {
                    tx.send_if_modified(|current| {
                        if *current == now {
                            return false;
                        }
                        *current = now;
                        true
                    });
                }
                Err(err) if err.is_retryable() => {}
                Err(_) => return,
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SlotStatus;

    fn status(limit: u32, held: bool) -> KeyStatus {
        let holder = Holder::current(vec!["sched".into()]);
        KeyStatus {
            key: Key::new("sched").expect("key"),
            limit,
            slots: (0..limit)
                .map(|slot| SlotStatus {
                    slot,
                    state: if held {
                        SlotState::Held
                    } else {
                        SlotState::Free
                    },
                    token: held.then_some(Token(7)),
                    holder: held.then(|| holder.clone()),
                    since_unix_ms: held.then_some(1_000),
                    renewed_unix_ms: None,
                    expires_unix_ms: None,
                    note: None,
                })
                .collect(),
            waiters: None,
            last_token: Some(Token(7)),
            lock_delay_ms: None,
        }
    }

    #[test]
    fn the_leader_is_the_holder_of_slot_0() {
        let st = status(1, true);
        let leader = Leader::from_status(&st).expect("ok").expect("a leader");
        assert_eq!(leader.token, Some(Token(7)));
        assert_eq!(leader.holder, st.slots[0].holder);
        assert_eq!(leader.since(), Some(from_unix_ms(1_000)));
        assert_eq!(Leader::from_status(&status(1, false)).expect("ok"), None);
    }

    #[test]
    fn a_semaphore_is_not_a_leader_key() {
        let err = Leader::from_status(&status(3, true)).expect_err("semaphore");
        assert_eq!(err.kind(), ErrorKind::LimitMismatch);
        assert_eq!(err.current_limit(), Some(3));
    }
}
