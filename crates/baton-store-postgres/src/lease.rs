//! The life of a grant after it is made: renewing it (its row's renewal counter goes up,
//! which is what a waiter watches) and releasing it, also when the acquire that won it
//! was given up (its lease is given back).
//!
//! Guarantees: a renewal or release names slot, token and holder, so it can only touch
//! the lease it was given: one taken over, broken or already released answers `Lost`
//! (renew) or `NotHeld` (release). A release deletes the row at once (no lock-delay) and
//! wakes the key's waiters.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use baton_core::kit::sys::lock;
use baton_core::kit::time::validate_ttl;
use baton_core::{Error, ErrorKind, Lease, Op, Released};
use tokio_postgres::types::Type;

use crate::core::{corrupt, Fail, Inner};
use crate::layout::{col, ttl_ms};

impl Inner {
    pub(crate) async fn release_step(&self, lease: &Lease) -> Result<Released, Fail> {
        let key = lease.key.as_str().to_owned();
        let slot = i32::try_from(lease.slot).unwrap_or(-1);
        let token = i64::try_from(lease.token.0).unwrap_or(-1);
        let holder = lease.holder.id.to_string();
        let r = self
            .with_conn(|inner, conn| {
                let (key, holder) = (key.clone(), holder.clone());
                Box::pin(async move {
                    let rows = inner
                        .query_hot(
                            conn,
                            &inner.sql.release,
                            &[
                                (&key, Type::TEXT),
                                (&slot, Type::INT4),
                                (&token, Type::INT8),
                                (&holder, Type::TEXT),
                                (&inner.channel.as_str(), Type::TEXT),
                            ],
                        )
                        .await?;
                    let row = rows
                        .first()
                        .ok_or_else(|| corrupt("the release function", "returned no row"))?;
                    col::<Option<i32>>(row, 0)
                })
            })
            .await?;
        Ok(match r {
            Some(1) => Released::Released,
            _ => Released::NotHeld,
        })
    }

    pub(crate) async fn renew_step(&self, lease: &Lease) -> Result<Lease, Error> {
        // A lease this store granted has a TTL within the kit's bounds; one made by hand
        // is checked the same way as a request.
        let ttl = validate_ttl(lease.ttl, &lease.key).map_err(|e| e.with_op(Op::Renew))?;
        let ttl_ms = ttl_ms(ttl);
        let key = lease.key.as_str().to_owned();
        let slot = i32::try_from(lease.slot).unwrap_or(-1);
        let token = i64::try_from(lease.token.0).unwrap_or(-1);
        let holder = lease.holder.id.to_string();
        let sent = Arc::new(Mutex::new(Instant::now()));
        let sent2 = Arc::clone(&sent);
        let n = self
            .with_conn(move |inner, conn| {
                let (key, holder, sent) = (key.clone(), holder.clone(), Arc::clone(&sent2));
                Box::pin(async move {
                    *lock(&sent) = Instant::now();
                    let rows = inner
                        .query(
                            conn,
                            &format!(
                                "WITH u AS ({} RETURNING 1) SELECT count(*) FROM u",
                                inner.sql.renew
                            ),
                            &[
                                (&key, Type::TEXT),
                                (&slot, Type::INT4),
                                (&token, Type::INT8),
                                (&holder, Type::TEXT),
                                (&ttl_ms, Type::INT8),
                            ],
                        )
                        .await?;
                    let row = rows
                        .first()
                        .ok_or_else(|| corrupt("the renewal", "returned no row"))?;
                    col::<i64>(row, 0)
                })
            })
            .await
            .map_err(|f| self.map(f))?;
        if n == 1 {
            let mut renewed = lease.clone();
            renewed.ttl = Some(ttl);
            renewed.sent_at = Some(*lock(&sent));
            Ok(renewed)
        } else {
            Err(Error::new(
                ErrorKind::Lost,
                format!(
                    "the lease (slot {}, token {}) expired or was taken over",
                    lease.slot, lease.token
                ),
            ))
        }
    }
}
