//! The `noop:` store: **for testing the checkers only.** It grants every request at once,
//! ignoring the limit, with tokens from a counter local to the process, so two processes
//! get the same tokens and any number hold a mutex at once. It breaks every property of the
//! contract on purpose: `baton stress storm -s noop:` must fail, naming the overlapping
//! holders, which proves the checkers can fail. Never use it to coordinate anything.
//!
//! Query parameters add faults, so that each of `baton stress`'s checkers can be shown to
//! fail end to end (the CLI tests run them through the real binary):
//!
//! | parameter | fault | the checker that must fire |
//! |---|---|---|
//! | `tokens=falling` | each token is lower than the one before, in any process (a count down from 2^62 by the wall clock, in µs) | `tokens` ("did not rise") |
//! | `tokens=repeat` | every token is 1 | `tokens` ("granted twice") |
//! | `slot=never-frees` | every grant is on a slot never granted before (the pid × 1024 + a counter): a slot, once held, never comes back | `recovery` ("never came back", `crash`) |
//! | `delay=DURATION` | every acquire answers only after DURATION | `recovery` (over the bound, `crash`) |
//! | `barrier=early` | a barrier passes at once, without waiting for the other parties | `barrier` (`workflow`) |
//! | `leases=on` | a lease store: grants carry the TTL and a send time, renewals succeed, so `pause` runs and the checkers end leases at the holders' deadlines (`Ends::Deadlines`) | `limit` under deadlines (`pause`) |
//! | `acquire=busy` | every acquire answers `Busy` | `liveness` |
//!
//! Parameters combine (`noop:?leases=on&tokens=falling`); an unknown one, or a bad value,
//! is refused, so a typo is not silently a different fault.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, Key, KeyStatus,
    Lease, Op, Released, Result, SlotState, SlotStatus, Store, StoreUrl, Token,
};

/// How tokens are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tokens {
    /// 1, 2, 3, … in each process.
    Counter,
    /// Falling with time, in every process.
    Falling,
    /// Always 1.
    Repeat,
}

/// The faults asked for in the URL.
#[derive(Clone, Copy, Debug)]
struct Faults {
    tokens: Tokens,
    fresh_slots: bool,
    delay: Duration,
    early_barrier: bool,
    leases: bool,
    busy: bool,
}

/// The store that grants everything (see the module docs: for testing checkers only).
#[derive(Debug)]
pub struct NoopStore {
    url: StoreUrl,
    next: AtomicU64,
    faults: Faults,
}

fn bad(url: &StoreUrl, why: String) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("{why} (the noop store is for testing the checkers only)"),
    )
    .with_op(Op::Open)
    .with_store(url)
}

/// Opens `noop:`, with the faults its query asks for (see the module docs). A path, an
/// unknown parameter or a bad value is refused, so a typo is not silently a no-op.
pub fn open(url: &StoreUrl) -> Result<Arc<dyn Store>> {
    if !url.path().is_empty() {
        return Err(bad(
            url,
            "the noop store takes no path after 'noop:', only ?faults".into(),
        ));
    }
    let mut faults = Faults {
        tokens: Tokens::Counter,
        fresh_slots: false,
        delay: Duration::ZERO,
        early_barrier: false,
        leases: false,
        busy: false,
    };
    for (name, value) in url.query() {
        match (name, value) {
            ("tokens", "falling") => faults.tokens = Tokens::Falling,
            ("tokens", "repeat") => faults.tokens = Tokens::Repeat,
            ("slot", "never-frees") => faults.fresh_slots = true,
            ("delay", d) => {
                faults.delay = baton_core::parse_duration(d)
                    .map_err(|e| bad(url, format!("delay={d}: {e}")))?
            }
            ("barrier", "early") => faults.early_barrier = true,
            ("leases", "on") => faults.leases = true,
            ("acquire", "busy") => faults.busy = true,
            _ => {
                return Err(bad(
                    url,
                    format!(
                        "unknown noop fault '{name}={value}' (tokens=falling|repeat, \
                         slot=never-frees, delay=DURATION, barrier=early, leases=on, acquire=busy)"
                    ),
                ))
            }
        }
    }
    Ok(baton_core::kit::context::layer(Arc::new(NoopStore {
        url: url.clone(),
        next: AtomicU64::new(0),
        faults,
    })))
}

impl NoopStore {
    fn token(&self) -> Token {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        match self.faults.tokens {
            Tokens::Counter => Token(n),
            Tokens::Repeat => Token(1),
            Tokens::Falling => {
                let us = std::time::UNIX_EPOCH
                    .elapsed()
                    .map_or(0, |d| d.as_micros() as u64);
                // Falling with time, and within one process even in the same µs.
                Token((1u64 << 62).saturating_sub(us).saturating_sub(n))
            }
        }
    }

    fn slot(&self) -> u32 {
        if self.faults.fresh_slots {
            let n = self.next.load(Ordering::Relaxed) as u32;
            std::process::id().wrapping_mul(1024).wrapping_add(n % 1024)
        } else {
            0
        }
    }
}

#[async_trait]
impl Store for NoopStore {
    fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new("nothing is held, so nothing needs to come back (noop: testing only)")
            .with_renew(self.faults.leases)
            .with_barrier(true)
            .with_bound(baton_core::Recovery::AtOnce)
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease> {
        req.validate()?;
        let sent = Instant::now();
        if !self.faults.delay.is_zero() {
            tokio::time::sleep(self.faults.delay).await;
        }
        if self.faults.busy {
            return Err(Error::new(
                ErrorKind::Busy,
                "noop:?acquire=busy answers busy to everyone (testing only)",
            )
            .with_op(Op::Acquire)
            .with_store(&self.url)
            .with_key(&req.key));
        }
        let token = self.token();
        Ok(Lease {
            key: req.key.clone(),
            slot: self.slot(),
            limit: req.limit,
            token,
            holder: req.holder.clone(),
            ttl: if self.faults.leases { req.ttl } else { None },
            acquired_unix_ms: baton_core::unix_ms(std::time::SystemTime::now()),
            sent_at: self.faults.leases.then_some(sent),
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

    async fn renew(&self, lease: &Lease) -> Result<Lease> {
        if !self.faults.leases {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "noop: has no leases unless ?leases=on (testing only)",
            )
            .with_op(Op::Renew)
            .with_store(&self.url));
        }
        Ok(Lease {
            sent_at: Some(Instant::now()),
            ..lease.clone()
        })
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed> {
        if !self.faults.early_barrier {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "the noop store does not support barriers unless ?barrier=early (testing only)",
            )
            .with_op(Op::Barrier)
            .with_store(&self.url));
        }
        Ok(BarrierPassed {
            key: req.key.clone(),
            generation: self.next.fetch_add(1, Ordering::Relaxed),
            parties: req.parties,
        })
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
        let err = open(&StoreUrl::parse("noop:?tokens=wobbly").expect("url")).expect_err("typo");
        assert!(err.to_string().contains("unknown noop fault"), "{err}");
    }

    #[tokio::test]
    async fn faults_do_what_they_say() {
        let open = |q: &str| open(&StoreUrl::parse(&format!("noop:?{q}")).expect("url"));
        let key = Key::new("k").expect("key");
        let req = AcquireRequest::new(key, Holder::current(vec!["t".into()]));
        let store = open("tokens=falling&slot=never-frees").expect("open");
        let a = store.acquire(&req).await.expect("a");
        let b = store.acquire(&req).await.expect("b");
        assert!(b.token < a.token, "{:?} {:?}", a.token, b.token);
        assert_ne!(a.slot, b.slot);
        let store = open("tokens=repeat").expect("open");
        let a = store.acquire(&req).await.expect("a");
        let b = store.acquire(&req).await.expect("b");
        assert_eq!((a.token, b.token), (Token(1), Token(1)));
        let store = open("acquire=busy").expect("open");
        let err = store.acquire(&req).await.expect_err("busy");
        assert_eq!(err.kind(), ErrorKind::Busy);
        let store = open("leases=on").expect("open");
        assert!(store.capabilities().renew);
        let lease = store.acquire(&req).await.expect("lease");
        assert!(lease.sent_at.is_some());
        store.renew(&lease).await.expect("renews");
        let store = open("barrier=early").expect("open");
        let passed = store
            .barrier(&BarrierRequest {
                key: Key::new("b").expect("key"),
                parties: 3,
                wait: baton_core::Wait::Forever,
                holder: Holder::current(vec!["t".into()]),
            })
            .await
            .expect("passes alone");
        assert_eq!(passed.parties, 3);
        assert!(open("delay=soon").is_err());
    }
}
