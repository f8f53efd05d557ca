//! A grant's life after it is made: renew (one script that raises the lease's renewal
//! counter) and release.
//!
//! Guarantees: both name the lease by slot and token, so a lease granted through any
//! handle is renewed or released the same way, and a lease that was taken over or broken
//! (its slot holds another token, or is marked lost for the lock-delay) answers `Lost` to
//! renew and `NotHeld` to release, freeing nothing. A release hands the slot to exactly
//! one waiter.

use baton_core::{Error, ErrorKind, Lease, Released};

use crate::core::Inner;
use crate::layout;

impl Inner {
    fn lease_args(&self, lease: &Lease) -> [String; 3] {
        [
            layout::base(&self.config.prefix, &lease.key),
            lease.slot.to_string(),
            lease.token.0.to_string(),
        ]
    }

    pub(crate) async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let a = self
            .run(&self.scripts.renew, &self.lease_args(lease))
            .await?;
        match a.first().map(String::as_str) {
            Some("ok") => Ok(lease.clone()),
            Some("lost") => Err(Error::new(
                ErrorKind::Lost,
                format!(
                    "the lease with token {} was taken over or broken (its slot is held back by \
                     the key's lock-delay)",
                    lease.token
                ),
            )),
            Some("gone") => Err(Error::new(
                ErrorKind::Lost,
                format!(
                    "the lease with token {} was taken over, broken or released",
                    lease.token
                ),
            )),
            _ => Err(Error::new(
                ErrorKind::Unavailable,
                format!("the renew script answered {a:?}"),
            )),
        }
    }

    pub(crate) async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        let a = self
            .run(&self.scripts.release, &self.lease_args(lease))
            .await?;
        match a.first().map(String::as_str) {
            Some("released") => Ok(Released::Released),
            Some("not_held") => Ok(Released::NotHeld),
            _ => Err(Error::new(
                ErrorKind::Unavailable,
                format!("the release script answered {a:?}"),
            )),
        }
    }
}
