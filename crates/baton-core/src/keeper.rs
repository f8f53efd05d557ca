//! The keeper: renews a lease every TTL/3 and declares it lost, on the holder's monotonic
//! clock, before the store could grant the slot to someone else (DESIGN, contract point 3).
//!
//! Guarantees:
//! - It runs on its own threads with its own Tokio runtime, so user work (a busy or
//!   blocked runtime of the caller) cannot starve renewals or the loss deadline. Each
//!   renewal is its own task on a two-worker runtime, so a store that blocks inside
//!   `renew` (file I/O on a hung NFS server) cannot hold up the deadline, which fires on
//!   the other worker; a renewal stuck in the kernel never delays `stop()` either.
//! - The deadline is `send_time + TTL × (1 − drift) − margin`, where `send_time` is when
//!   the last successful renewal (or the acquire) was *sent*. The store extends a lease
//!   from a moment after it received the request, so the store's expiry is later than
//!   `send_time + TTL`; with `drift` bounding how much faster the store's clock may run
//!   than ours, the deadline falls before any re-grant.
//! - Loss is declared at the deadline even if a renewal is still in flight (a hung
//!   connection cannot postpone it), and at once when the store answers `Lost` or
//!   `NotHeld`. Once lost, a lease never becomes held again.
//! - With a stop lead ([`KeeperConfig::with_stop_lead`]), loss is declared that much
//!   before the deadline, so a holder whose work takes time to stop (a command given
//!   SIGTERM and a grace before SIGKILL) is stopped *by* the deadline, not from it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::{Error, ErrorKind, Lease, Store};

/// Timing of a keeper.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KeeperConfig {
    /// The lease's time to live.
    pub ttl: Duration,
    /// How much faster the store's clock may run than the holder's, as a fraction
    /// (0.01 = 1 %).
    pub drift: f64,
    /// Safety margin subtracted from every deadline (scheduling delay, signal delivery).
    pub margin: Duration,
    /// How long before the deadline the keeper declares the lease lost, so that the
    /// holder's work can be stopped in that time and be over by the deadline (for
    /// `baton run`: the kill grace plus [`KILL_RESERVE`](KeeperConfig::kill_reserve)).
    /// Zero by default.
    pub stop_lead: Duration,
}

impl KeeperConfig {
    /// Defaults for a TTL: 1 % drift and a margin of TTL/10 capped at 1 s.
    pub fn for_ttl(ttl: Duration) -> KeeperConfig {
        KeeperConfig {
            ttl,
            drift: 0.01,
            margin: (ttl / 10).min(Duration::from_secs(1)),
            stop_lead: Duration::ZERO,
        }
    }

    /// The same timing with loss declared `lead` before the deadline. A lead above
    /// [`KeeperConfig::max_stop_lead`] would declare loss before a renewal could land;
    /// callers check it first (`baton run` refuses such a `--kill-grace`).
    pub fn with_stop_lead(mut self, lead: Duration) -> KeeperConfig {
        self.stop_lead = lead;
        self
    }

    /// How long after `send_time` the holder must be done: its work stopped, before the
    /// store could grant the slot again.
    pub fn validity(&self) -> Duration {
        self.ttl
            .mul_f64((1.0 - self.drift).clamp(0.0, 1.0))
            .saturating_sub(self.margin)
    }

    /// How long after `send_time` the keeper declares loss: the validity less the stop
    /// lead.
    pub fn stop_after(&self) -> Duration {
        self.validity().saturating_sub(self.stop_lead)
    }

    /// The largest stop lead that still leaves half the TTL after each renewal's send
    /// time for the next renewal (sent at TTL/3) to be answered.
    pub fn max_stop_lead(&self) -> Duration {
        self.validity().saturating_sub(self.ttl / 2)
    }

    /// The time a killed process group is given to be reaped between SIGKILL and the
    /// deadline: TTL/20, at most 250 ms.
    pub fn kill_reserve(&self) -> Duration {
        (self.ttl / 20).min(Duration::from_millis(250))
    }
}

/// A lease's state as the keeper sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// Held; the keeper will declare it lost at `deadline - stop_lead` unless renewed
    /// first.
    Held {
        /// The instant by which the holder must be done, on the monotonic clock
        /// (`send_time + validity`).
        deadline: Instant,
    },
    /// Lost, with why. Final.
    Lost {
        /// When the keeper declared it (monotonic).
        at: Instant,
        /// Why, in words.
        reason: String,
    },
    /// The keeper was stopped (before a release). Final.
    Stopped,
}

/// A running keeper. Dropping it stops renewals (the lease then expires at its TTL unless
/// released).
#[derive(Debug)]
pub struct Keeper {
    state: watch::Receiver<LeaseState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    /// Starts keeping `lease`. The first deadline counts from `lease.sent_at`, which every
    /// lease store sets; for a lease without it, from `fallback_sent_at`, which must be an
    /// instant taken before the acquire request was sent.
    pub fn start(
        store: Arc<dyn Store>,
        lease: Lease,
        config: KeeperConfig,
        fallback_sent_at: Instant,
    ) -> Result<Keeper, Error> {
        let sent_at = lease.sent_at.unwrap_or(fallback_sent_at);
        let first_deadline = sent_at + config.validity();
        let (tx, rx) = watch::channel(LeaseState::Held {
            deadline: first_deadline,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("baton-keeper-rt")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Unavailable, "cannot start the lease keeper").with_source(e)
            })?;
        let thread = std::thread::Builder::new()
            .name("baton-keeper".into())
            .spawn(move || {
                runtime.block_on(keep(store, lease, config, first_deadline, tx, stop_rx));
                // Do not wait for a renewal still blocked in the store.
                runtime.shutdown_background();
            })
            .map_err(|e| {
                Error::new(ErrorKind::Unavailable, "cannot start the lease keeper").with_source(e)
            })?;
        Ok(Keeper {
            state: rx,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state change; select on `changed()` to react to loss.
    pub fn watch(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Resolves when the lease is lost (or the keeper stopped), with the final state.
    pub async fn lost(&self) -> LeaseState {
        let mut rx = self.state.clone();
        loop {
            let state = rx.borrow_and_update().clone();
            if !matches!(state, LeaseState::Held { .. }) {
                return state;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone();
            }
        }
    }

    /// Stops renewing and waits for the keeper's thread to end. Call it before releasing.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn keep(
    store: Arc<dyn Store>,
    mut lease: Lease,
    config: KeeperConfig,
    mut deadline: Instant,
    tx: watch::Sender<LeaseState>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let period = (config.ttl / 3).max(Duration::from_millis(1));
    let retry = (config.ttl / 20).max(Duration::from_millis(1));
    let mut next = Instant::now() + period;
    // The last transient renewal error, so that a loss says why renewals failed.
    let mut last_error: Option<String> = None;
    let lost = |reason: String| LeaseState::Lost {
        at: Instant::now(),
        reason,
    };
    // When loss is declared: the stop lead before the deadline.
    let stop_at = |deadline: Instant| deadline.checked_sub(config.stop_lead).unwrap_or(deadline);
    loop {
        // Wait for the next renewal, the deadline, or a stop.
        tokio::select! {
            _ = &mut stop => { let _ = tx.send(LeaseState::Stopped); return; }
            _ = tokio::time::sleep_until(stop_at(deadline).into()) => {
                let why = match &last_error {
                    Some(e) => format!("could not renew the lease before its deadline: {e}"),
                    None => "could not renew the lease before its deadline".into(),
                };
                let _ = tx.send(lost(why));
                return;
            }
            _ = tokio::time::sleep_until(next.into()) => {}
        }
        let sent_at = Instant::now();
        let mut renewal = tokio::spawn({
            let store = Arc::clone(&store);
            let lease = lease.clone();
            async move { store.renew(&lease).await }
        });
        let outcome = tokio::select! {
            _ = &mut stop => { let _ = tx.send(LeaseState::Stopped); return; }
            _ = tokio::time::sleep_until(stop_at(deadline).into()) => {
                renewal.abort();
                let _ = tx.send(lost("the store did not answer a renewal before the lease's deadline".into()));
                return;
            }
            r = &mut renewal => match r {
                Ok(r) => r,
                Err(e) => Err(Error::new(ErrorKind::Unavailable, format!("the renewal task failed: {e}"))),
            },
        };
        match outcome {
            Ok(renewed) => {
                last_error = None;
                lease = renewed;
                deadline = sent_at + config.validity();
                next = sent_at + period;
                let _ = tx.send(LeaseState::Held { deadline });
            }
            Err(e) if matches!(e.kind(), ErrorKind::Lost | ErrorKind::NotHeld) => {
                let _ = tx.send(lost(format!("{e:#}")));
                return;
            }
            // Transient: try again soon; the deadline still stands.
            Err(e) => {
                last_error = Some(format!("{e:#}"));
                next = Instant::now() + retry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AcquireRequest, Capabilities, Holder, Key, KeyStatus, Released, StoreUrl, Token};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    /// What the scripted store's `renew` does; this tests the keeper's reactions, not a
    /// store.
    #[derive(Clone, Copy, Debug)]
    enum Renew {
        Ok,
        Hang,
        /// Blocks its thread, as a store doing file I/O on a hung NFS server would.
        Block,
        Lost,
        Unavailable,
    }

    #[derive(Debug)]
    struct Scripted {
        url: StoreUrl,
        renew: Mutex<Renew>,
        renewals: AtomicU32,
        /// A blocking renewal has finished blocking.
        unblocked: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for Scripted {
        fn url(&self) -> &StoreUrl {
            &self.url
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::new("scripted")
        }
        async fn acquire(&self, _: &AcquireRequest) -> crate::Result<Lease> {
            unreachable!("the keeper never acquires")
        }
        async fn release(&self, _: &Lease) -> crate::Result<Released> {
            unreachable!("the keeper never releases")
        }
        async fn inspect(&self, _: &Key) -> crate::Result<KeyStatus> {
            unreachable!("the keeper never inspects")
        }
        async fn list(&self) -> crate::Result<Vec<Key>> {
            unreachable!("the keeper never lists")
        }
        async fn renew(&self, lease: &Lease) -> crate::Result<Lease> {
            let mode = *self.renew.lock().expect("lock");
            self.renewals.fetch_add(1, Ordering::SeqCst);
            match mode {
                Renew::Ok => Ok(lease.clone()),
                Renew::Hang => std::future::pending().await,
                Renew::Block => {
                    std::thread::sleep(Duration::from_secs(3));
                    self.unblocked.store(true, Ordering::SeqCst);
                    Ok(lease.clone())
                }
                Renew::Lost => Err(Error::new(ErrorKind::Lost, "taken over")),
                Renew::Unavailable => Err(Error::new(ErrorKind::Unavailable, "conn refused")),
            }
        }
    }

    fn setup(mode: Renew) -> (Arc<Scripted>, Lease) {
        let store = Arc::new(Scripted {
            url: StoreUrl::parse("scripted:").expect("url"),
            renew: Mutex::new(mode),
            renewals: AtomicU32::new(0),
            unblocked: std::sync::atomic::AtomicBool::new(false),
        });
        let lease = Lease {
            key: Key::new("k").expect("key"),
            slot: 0,
            limit: 1,
            token: Token(1),
            holder: Holder::current(vec![]),
            ttl: Some(Duration::from_millis(300)),
            acquired_unix_ms: 0,
            sent_at: None,
        };
        (store, lease)
    }

    #[test]
    fn validity_is_ttl_less_drift_and_margin() {
        let c = KeeperConfig::for_ttl(Duration::from_secs(30));
        assert_eq!(c.margin, Duration::from_secs(1));
        assert_eq!(c.validity(), Duration::from_millis(28_700));
        let short = KeeperConfig::for_ttl(Duration::from_millis(300));
        assert_eq!(short.validity(), Duration::from_millis(267));
    }

    #[tokio::test]
    async fn renewals_keep_the_lease_held() {
        let (store, lease) = setup(Renew::Ok);
        // A TTL long enough that a loaded machine renews in time; the test waits for the
        // renewals (order, not timing) and then the lease must still be held.
        let cfg = KeeperConfig::for_ttl(Duration::from_secs(3));
        let keeper = Keeper::start(store.clone(), lease, cfg, Instant::now()).expect("start");
        let mut watch = keeper.watch();
        while store.renewals.load(Ordering::SeqCst) < 2 {
            tokio::time::timeout(Duration::from_secs(30), watch.changed())
                .await
                .expect("a renewal within the liveness bound")
                .expect("the keeper runs");
            assert!(
                matches!(keeper.state(), LeaseState::Held { .. }),
                "{:?}",
                keeper.state()
            );
        }
        keeper.stop();
    }

    #[tokio::test]
    async fn a_hung_renewal_is_declared_lost_at_the_deadline() {
        let (store, lease) = setup(Renew::Hang);
        let cfg = KeeperConfig::for_ttl(Duration::from_millis(300));
        let sent = Instant::now();
        let keeper = Keeper::start(store, lease, cfg, sent).expect("start");
        let LeaseState::Lost { at, reason } = keeper.lost().await else {
            panic!("expected Lost, got {:?}", keeper.state())
        };
        assert!(at >= sent + cfg.validity(), "never before the deadline");
        assert!(reason.contains("deadline"), "{reason}");
    }

    #[test]
    fn a_stop_lead_moves_loss_earlier_within_bounds() {
        let c = KeeperConfig::for_ttl(Duration::from_secs(30));
        assert_eq!(c.max_stop_lead(), Duration::from_millis(13_700));
        assert_eq!(c.kill_reserve(), Duration::from_millis(250));
        let led = c.with_stop_lead(Duration::from_secs(10));
        assert_eq!(
            led.validity(),
            c.validity(),
            "the deadline itself does not move"
        );
        assert_eq!(led.stop_after(), Duration::from_millis(18_700));
        assert_eq!(c.stop_after(), c.validity());
    }

    #[tokio::test]
    async fn with_a_stop_lead_a_hung_renewal_is_declared_lost_that_much_earlier() {
        let (store, lease) = setup(Renew::Hang);
        let cfg = KeeperConfig::for_ttl(Duration::from_secs(3))
            .with_stop_lead(Duration::from_millis(1000));
        let sent = Instant::now();
        let keeper = Keeper::start(store, lease, cfg, sent).expect("start");
        let LeaseState::Held { deadline } = keeper.state() else {
            panic!("{:?}", keeper.state())
        };
        assert_eq!(
            deadline,
            sent + cfg.validity(),
            "Held names the deadline itself"
        );
        let LeaseState::Lost { at, .. } = keeper.lost().await else {
            panic!("expected Lost, got {:?}", keeper.state())
        };
        assert!(
            at >= sent + cfg.stop_after(),
            "never before deadline - lead"
        );
    }

    #[tokio::test]
    async fn a_renewal_blocking_its_thread_cannot_postpone_loss() {
        let (store, lease) = setup(Renew::Block);
        let cfg = KeeperConfig::for_ttl(Duration::from_millis(300));
        let sent = Instant::now();
        let keeper = Keeper::start(store.clone(), lease, cfg, sent).expect("start");
        let LeaseState::Lost { at, reason } = keeper.lost().await else {
            panic!("expected Lost, got {:?}", keeper.state())
        };
        assert!(reason.contains("did not answer"), "{reason}");
        assert!(at >= sent + cfg.stop_after(), "never before the deadline");
        // Declared while the renewal still blocks (it blocks 3 s, ten times the TTL).
        assert!(
            !store.unblocked.load(Ordering::SeqCst),
            "loss waited for the blocked renewal"
        );
        keeper.stop();
        assert!(
            !store.unblocked.load(Ordering::SeqCst),
            "stop() waited for the blocked renewal"
        );
    }

    #[tokio::test]
    async fn transient_errors_retry_until_the_deadline_then_lose() {
        let (store, lease) = setup(Renew::Unavailable);
        let cfg = KeeperConfig::for_ttl(Duration::from_millis(300));
        let keeper = Keeper::start(store.clone(), lease, cfg, Instant::now()).expect("start");
        assert!(matches!(keeper.lost().await, LeaseState::Lost { .. }));
        assert!(
            store.renewals.load(Ordering::SeqCst) >= 2,
            "retried before giving up"
        );
    }

    #[tokio::test]
    async fn a_store_that_says_lost_is_believed_at_once() {
        let (store, lease) = setup(Renew::Ok);
        let cfg = KeeperConfig::for_ttl(Duration::from_secs(3));
        let keeper = Keeper::start(store.clone(), lease, cfg, Instant::now()).expect("start");
        *store.renew.lock().expect("lock") = Renew::Lost;
        let state = keeper.lost().await;
        let LeaseState::Lost { reason, .. } = state else {
            panic!("{state:?}")
        };
        assert!(reason.contains("taken over"), "{reason}");
        // Once lost, it stays lost even if the store would renew again.
        *store.renew.lock().expect("lock") = Renew::Ok;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(keeper.state(), LeaseState::Lost { .. }));
    }

    #[tokio::test]
    async fn stop_ends_renewals() {
        let (store, lease) = setup(Renew::Ok);
        let cfg = KeeperConfig::for_ttl(Duration::from_millis(300));
        let keeper = Keeper::start(store.clone(), lease, cfg, Instant::now()).expect("start");
        let watch = keeper.watch();
        keeper.stop();
        assert_eq!(*watch.borrow(), LeaseState::Stopped);
        let n = store.renewals.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(store.renewals.load(Ordering::SeqCst), n);
    }
}
