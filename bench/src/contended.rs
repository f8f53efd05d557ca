//! The contended round the network-store benchmarks share: N clients in one process, each
//! on its own store handle or connection, loop acquire + release on one lock for a fixed
//! time, and mutual exclusion is checked for real: a counter every holder bumps on entry
//! (it must have been 0), grant..release intervals that must not overlap, and, for locks
//! with fencing tokens, tokens that must rise in grant order.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton::{AcquireRequest, Holder, Key, Lease, Released, Store, Wait};
use baton_stress::stats::{jain, percentile};

use crate::util::{now_ns, Result};

/// One contended round's results.
pub struct Contended {
    /// Acquisitions, all clients together.
    pub total: u64,
    /// Hand-offs: grants, in grant order, whose client is not the previous grant's.
    pub handoffs: u64,
    /// How long the round ran.
    pub seconds: f64,
    /// The median wait for a grant, ns.
    pub p50: u64,
    /// The 99th percentile wait for a grant, ns.
    pub p99: u64,
    /// Jain's fairness index of the clients' acquisition counts.
    pub jain: f64,
    /// Violations (overlapping holds, tokens out of order, a holder finding another
    /// inside, a release of a lease the store no longer had).
    pub violations: usize,
}

impl Contended {
    /// Acquisitions per second.
    pub fn per_s(&self) -> f64 {
        self.total as f64 / self.seconds
    }

    /// Hand-offs per second.
    pub fn handoffs_per_s(&self) -> f64 {
        self.handoffs as f64 / self.seconds
    }
}

/// One contender: takes and gives back one lock, on a handle or connection of its own.
pub trait Client: Send + 'static {
    /// Takes the lock, waiting as long as it takes; returns the grant's fencing token (0
    /// for a lock without tokens).
    fn acquire(&mut self) -> impl Future<Output = Result<u64>> + Send;
    /// Gives back the lock taken last; `false` when the store says it was no longer held.
    fn release(&mut self) -> impl Future<Output = Result<bool>> + Send;
}

/// The runtime a round runs on: two workers, like the machine's two cores.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// What one client saw: per hold (grant ns, release ns, token), and its waits.
#[derive(Default)]
struct ClientLog {
    who: usize,
    holds: Vec<(u64, u64, u64)>,
    waits: Vec<u64>,
}

/// Runs `clients` against each other on `rt` for `duration`, then stops `rt`. With
/// `tokens`, tokens must rise in grant order.
pub fn run<C: Client>(
    rt: tokio::runtime::Runtime,
    clients: Vec<C>,
    duration: Duration,
    tokens: bool,
) -> Result<Contended> {
    let inside = Arc::new(AtomicU32::new(0));
    let bad = Arc::new(AtomicU32::new(0));
    let logs = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let end = start + duration;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (who, mut client) in clients.into_iter().enumerate() {
            let (inside, bad, logs) = (Arc::clone(&inside), Arc::clone(&bad), Arc::clone(&logs));
            tasks.push(tokio::spawn(async move {
                let mut log = ClientLog {
                    who,
                    ..ClientLog::default()
                };
                while Instant::now() < end {
                    let t_req = now_ns();
                    let token = client.acquire().await?;
                    let t_grant = now_ns();
                    if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                        bad.fetch_add(1, Ordering::SeqCst);
                    }
                    let t_rel = now_ns();
                    if inside.fetch_sub(1, Ordering::SeqCst) != 1 {
                        bad.fetch_add(1, Ordering::SeqCst);
                    }
                    log.waits.push(t_grant - t_req);
                    log.holds.push((t_grant, t_rel, token));
                    if !client.release().await? {
                        bad.fetch_add(1, Ordering::SeqCst);
                    }
                }
                logs.lock().map_err(|_| "poisoned")?.push(log);
                Ok::<_, crate::util::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok::<_, crate::util::Error>(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let logs = std::mem::take(&mut *logs.lock().map_err(|_| "poisoned")?);
    rt.shutdown_background();
    Ok(summarize(
        logs,
        seconds,
        bad.load(Ordering::SeqCst) as usize,
        tokens,
    ))
}

fn summarize(
    logs: Vec<ClientLog>,
    seconds: f64,
    inside_violations: usize,
    tokens: bool,
) -> Contended {
    let counts: Vec<u64> = logs.iter().map(|l| l.holds.len() as u64).collect();
    let mut waits: Vec<u64> = logs.iter().flat_map(|l| l.waits.iter().copied()).collect();
    waits.sort_unstable();
    let mut holds: Vec<(u64, u64, u64, usize)> = logs
        .into_iter()
        .flat_map(|l| l.holds.into_iter().map(move |(g, r, t)| (g, r, t, l.who)))
        .collect();
    holds.sort_unstable();
    let handoffs = holds.windows(2).filter(|w| w[1].3 != w[0].3).count() as u64;
    let mut violations = inside_violations;
    for w in holds.windows(2) {
        if w[1].0 < w[0].1 {
            violations += 1;
        }
        if tokens && w[1].2 <= w[0].2 {
            violations += 1;
        }
    }
    Contended {
        total: holds.len() as u64,
        handoffs,
        seconds,
        p50: percentile(&waits, 50.0),
        p99: percentile(&waits, 99.0),
        jain: jain(&counts),
        violations,
    }
}

/// A baton client: its own store handle, one request, the lease it holds.
struct Baton {
    store: Arc<dyn Store>,
    req: AcquireRequest,
    lease: Option<Lease>,
}

impl Client for Baton {
    async fn acquire(&mut self) -> Result<u64> {
        let lease = self.store.acquire(&self.req).await?;
        let token = lease.token.0;
        self.lease = Some(lease);
        Ok(token)
    }

    async fn release(&mut self) -> Result<bool> {
        let lease = self.lease.take().ok_or("a release without a lease")?;
        Ok(self.store.release(&lease).await? == Released::Released)
    }
}

/// How a baton round warms its handles up, outside the clock.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Warm {
    /// One acquire + release per handle (it connects).
    Cycle,
    /// That, then hold the key with a `NoWait` acquire and check that a waiting acquire
    /// is not granted within 20 ms (it also starts the handle's listener).
    CycleAndProbe,
}

/// A contended round through baton on `url`: `n` handles, acquire (`Wait::Forever`, `ttl`)
/// + release on `key`; tokens must rise.
pub fn baton(
    url: &str,
    n: usize,
    key: Key,
    ttl: Duration,
    duration: Duration,
    warm: Warm,
) -> Result<Contended> {
    let rt = runtime()?;
    let stores: Vec<Arc<dyn Store>> = (0..n)
        .map(|_| baton::open(url))
        .collect::<std::result::Result<_, _>>()?;
    let mut req = AcquireRequest::new(key, Holder::current(vec!["baton-bench".into()]));
    req.wait = Wait::Forever;
    req.ttl = Some(ttl);
    rt.block_on(async {
        for store in &stores {
            let lease = store.acquire(&req).await?;
            store.release(&lease).await?;
            if warm == Warm::CycleAndProbe {
                let mut hold = req.clone();
                hold.wait = Wait::NoWait;
                let lease = store.acquire(&hold).await?;
                let waiting =
                    tokio::time::timeout(Duration::from_millis(20), store.acquire(&req)).await;
                if waiting.is_ok() {
                    return Err::<(), crate::util::Error>(
                        "a second grant while the key was held".into(),
                    );
                }
                store.release(&lease).await?;
            }
        }
        Ok(())
    })?;
    let clients = stores
        .into_iter()
        .map(|store| Baton {
            store,
            req: req.clone(),
            lease: None,
        })
        .collect();
    run(rt, clients, duration, true)
}
