//! A grant's life after it is made: renew (a keep-alive of its etcd lease), release, and
//! the handle's record of its grants and of the released leases it keeps for reuse.
//!
//! Guarantees: a release deletes a grant's keys only while the slot key is still the
//! grant's (same create revision and etcd lease), so releasing a grant that expired or was
//! broken never touches its successor's; a grant made through another handle is released
//! by revoking its etcd lease, after its lock-delay record is deleted (so the release does
//! not read as a loss). A lease kept for reuse carries no keys and at most a third of its
//! TTL is used when it is reused; unused ones expire on their own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::kit::sys::lock;
use baton_core::kit::time::renew_every;
use baton_core::{Error, ErrorKind, Lease, Op, Released};
use etcd_client::{Compare, CompareOp, KeyValue, Txn, TxnOp};

use crate::core::Inner;

/// How many released leases a handle keeps for reuse.
const POOL_MAX: usize = 8;

/// An etcd lease carrying (or having carried) one grant of this handle.
#[derive(Clone, Copy)]
pub(crate) struct Granted {
    pub(crate) id: i64,
    /// Its TTL in etcd, whole seconds.
    pub(crate) server_ttl: u64,
    /// When the request that last started its TTL was sent.
    pub(crate) refreshed: Instant,
}

impl Granted {
    /// Fresh enough to carry a new grant: at most a third of its TTL used.
    fn reusable(&self) -> bool {
        self.refreshed.elapsed() < renew_every(Duration::from_secs(self.server_ttl))
    }
}

/// The TTL etcd is asked for: whole seconds, never below what the request asked, so the
/// keeper's deadline, counted from the requested TTL, comes first (etcd also raises a TTL
/// below its minimum, 2s with default settings).
pub(crate) fn server_ttl_of(ttl: Duration) -> u64 {
    ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)
}

impl Inner {
    /// The etcd lease id of a grant: from this handle's record, else from the slot key
    /// (`None` when the slot key is not the grant's any more).
    async fn lease_id_of(&self, op: Op, lease: &Lease) -> Result<Option<i64>, Error> {
        if let Some(g) = lock(&self.granted)
            .get(&(lease.key.as_str().to_owned(), lease.token.0))
            .copied()
        {
            return Ok(Some(g.id));
        }
        let slot_key = self.names(&lease.key).slot(lease.slot);
        let resp = self
            .call(op, Some(&lease.key), |mut c, _| {
                let k = slot_key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .filter(|kv| u64::try_from(kv.create_revision()).ok() == Some(lease.token.0))
            .map(KeyValue::lease))
    }

    pub(crate) async fn release(self: &Arc<Self>, lease: &Lease) -> Result<Released, Error> {
        let op = Op::Release;
        let names = self.names(&lease.key);
        let mine = lock(&self.granted).remove(&(lease.key.as_str().to_owned(), lease.token.0));
        let Some(g) = mine else {
            // Granted through another handle: revoking its lease deletes the grant's slot
            // and waiter keys in one step (each etcd lease carries one grant at a time).
            // Gone already (expired, broken): not held.
            return match self.lease_id_of(op, lease).await? {
                None => Ok(Released::NotHeld),
                Some(id) => Ok(
                    if self.forget_grant(lease).await? && self.revoke(op, &lease.key, id).await? {
                        Released::Released
                    } else {
                        Released::NotHeld
                    },
                ),
            };
        };
        // Delete this grant's keys, if they are still this grant's, and keep the lease for
        // the next acquire when it is fresh.
        let slot_key = names.slot(lease.slot);
        let token = i64::try_from(lease.token.0).unwrap_or(-1);
        let txn = Txn::new()
            .when([
                Compare::create_revision(slot_key.clone(), CompareOp::Equal, token),
                Compare::lease(slot_key.clone(), CompareOp::Equal, g.id),
            ])
            .and_then([
                TxnOp::delete(slot_key.clone(), None),
                TxnOp::delete(names.waiter(g.id), None),
                // A clean release: no lock-delay record of a loss stays behind.
                TxnOp::delete(names.grant(lease.slot), None),
            ]);
        let resp = match self.txn(op, &lease.key, txn).await {
            Ok(r) => r,
            Err(e) => {
                // Keep it known so that a retry can release it.
                lock(&self.granted).insert((lease.key.as_str().to_owned(), lease.token.0), g);
                return Err(e);
            }
        };
        let pooled = resp.succeeded() && g.reusable() && {
            let mut pool = lock(&self.pool);
            pool.len() < POOL_MAX && {
                pool.push(g);
                true
            }
        };
        if !pooled {
            // No keys left on it (or not ours any more): revoking is tidiness.
            let inner = Arc::clone(self);
            self.runtime
                .handle()
                .spawn(async move { inner.revoke_quiet(g.id).await });
        }
        Ok(if resp.succeeded() {
            Released::Released
        } else {
            Released::NotHeld
        })
    }

    /// Before a release by revoking: deletes the grant's lock-delay record while the slot
    /// key is still the grant's, so the revocation reads as a release, not a loss. False
    /// when the slot key is not the grant's any more.
    async fn forget_grant(&self, lease: &Lease) -> Result<bool, Error> {
        let names = self.names(&lease.key);
        let token = i64::try_from(lease.token.0).unwrap_or(-1);
        let txn = Txn::new()
            .when([Compare::create_revision(
                names.slot(lease.slot),
                CompareOp::Equal,
                token,
            )])
            .and_then([TxnOp::delete(names.grant(lease.slot), None)]);
        Ok(self.txn(Op::Release, &lease.key, txn).await?.succeeded())
    }

    /// A pooled lease for a request with this TTL, if one is fresh enough.
    pub(crate) fn take_pooled(&self, ttl: Duration) -> Option<i64> {
        let want = server_ttl_of(ttl);
        let mut pool = lock(&self.pool);
        pool.retain(Granted::reusable);
        let i = pool.iter().position(|g| g.server_ttl == want)?;
        Some(pool.swap_remove(i).id)
    }

    pub(crate) async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let op = Op::Renew;
        let lost = || {
            Error::new(
                ErrorKind::Lost,
                format!(
                    "the lease (slot {}, token {}) expired, was broken or was released",
                    lease.slot, lease.token
                ),
            )
        };
        let Some(id) = self.lease_id_of(op, lease).await? else {
            return Err(lost());
        };
        match self.keep_alive(op, &lease.key, id).await {
            Ok(sent_at) => {
                if let Some(g) =
                    lock(&self.granted).get_mut(&(lease.key.as_str().to_owned(), lease.token.0))
                {
                    g.refreshed = sent_at;
                }
                let mut renewed = lease.clone();
                renewed.sent_at = Some(sent_at);
                Ok(renewed)
            }
            Err(e) if e.kind() == ErrorKind::Lost => {
                lock(&self.granted).remove(&(lease.key.as_str().to_owned(), lease.token.0));
                Err(lost())
            }
            Err(e) => Err(e),
        }
    }
}
