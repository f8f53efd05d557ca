//! The `noop:` store: **for testing the checkers only.** It grants every request at once,
//! ignoring the limit, with tokens from a counter local to the process, so two processes
//! get the same tokens and any number hold a mutex at once. It breaks every property of the
//! contract on purpose: `baton stress storm -s noop:` must fail, naming the overlapping
//! holders, which proves the checkers can fail. Never use it to coordinate anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use baton_core::{
    AcquireRequest, Capabilities, Error, ErrorKind, Key, KeyStatus, Lease, Op, Released, Result,
    SlotState, SlotStatus, Store, StoreUrl, Token,
};

/// The store that grants everything (see the module docs: for testing checkers only).
#[derive(Debug)]
pub struct NoopStore {
    url: StoreUrl,
    next: AtomicU64,
}

/// Opens `noop:` (anything after the colon is refused, so a typo is not silently a no-op).
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    if !url.rest().is_empty() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "the noop store takes nothing after 'noop:' (it is for testing the checkers only)",
        )
        .with_op(Op::Open)
        .with_store(url));
    }
    Ok(Arc::new(NoopStore {
        url: url.clone(),
        next: AtomicU64::new(0),
    }))
}

#[async_trait]
impl Store for NoopStore {
    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new("nothing is held, so nothing needs to come back (noop: testing only)")
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease> {
        req.validate()?;
        Ok(Lease {
            key: req.key.clone(),
            slot: 0,
            limit: req.limit,
            token: Token(self.next.fetch_add(1, Ordering::Relaxed) + 1),
            holder: req.holder.clone(),
            ttl: None,
            acquired_unix_ms: baton_core::unix_ms(std::time::SystemTime::now()),
            sent_at: None,
        })
    }

    async fn release(&self, _lease: &Lease) -> Result<Released> {
        Ok(Released::Released)
    }

    fn release_now(&self, _lease: &Lease) -> bool {
        true
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus> {
        Ok(KeyStatus {
            key: key.clone(),
            limit: 1,
            slots: vec![SlotStatus {
                slot: 0,
                state: SlotState::Free,
                token: None,
                holder: None,
                since_unix_ms: None,
                renewed_unix_ms: None,
                expires_unix_ms: None,
                note: Some("the noop store holds nothing (testing only)".into()),
            }],
            waiters: None,
            last_token: None,
            lock_delay_ms: None,
        })
    }

    async fn list(&self) -> Result<Vec<Key>> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::Holder;

    #[tokio::test]
    async fn grants_everything_with_process_local_tokens() {
        let store = open(&StoreUrl::parse("noop:").expect("url")).expect("open");
        let key = Key::new("k").expect("key");
        let req = AcquireRequest::new(key, Holder::current(vec!["t".into()]));
        let a = store.acquire(&req).await.expect("first");
        let b = store
            .acquire(&req)
            .await
            .expect("second, though the mutex is held");
        assert_eq!((a.slot, b.slot), (0, 0));
        assert_eq!((a.token, b.token), (Token(1), Token(2)));
        let err = open(&StoreUrl::parse("noop:/x").expect("url")).expect_err("junk");
        assert!(
            err.to_string().contains("testing the checkers only"),
            "{err}"
        );
    }
}
