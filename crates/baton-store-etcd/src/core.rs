//! The connection to etcd: the store's own runtime, one client per member, the call that
//! moves to the next member when one fails, the one mapping of etcd's failures into
//! [`baton_core::Error`], the lease calls every role makes (keep-alive, revoke, time to
//! live) and the watch a waiting acquire sleeps on.
//!
//! Guarantees: every etcd request of the store goes through [`Inner::call`], so each try
//! is bounded by the request timeout, a failure a member can recover from moves on to the
//! next member (at most two rounds over the members), and what any member would answer the
//! same is returned at once; `Unavailable` means no member answered. Revoking a lease
//! (`revoke_quiet`) is bounded too, so a clean-up never hangs the caller.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use baton_core::{format_duration, Error, ErrorKind, HolderId, Key, Op, StoreUrl};
use etcd_client::{Client, ConnectOptions, TxnOpResponse, TxnResponse, WatchOptions};
use tokio::sync::OnceCell;

use crate::config::EtcdConfig;
use crate::lease::Granted;

/// How long a cancelled or failed acquire keeps trying to revoke its lease.
const CLEANUP_BOUND: Duration = Duration::from_secs(10);

/// The runtime the store's client lives on: its own threads, so that the caller's
/// runtime (a current-thread one, or the keeper's) never has to drive the client's
/// background tasks. Dropping this stops it, from its own thread.
pub(crate) struct RuntimeThread {
    pub(crate) handle: tokio::runtime::Handle,
    _stop: std::sync::mpsc::Sender<()>,
}

impl RuntimeThread {
    pub(crate) fn start() -> std::io::Result<RuntimeThread> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("baton-etcd")
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("baton-etcd-owner".into())
            .spawn(move || {
                // Returns when the store (the sender) is gone.
                let _ = stopped.recv();
                rt.shutdown_background();
            })?;
        Ok(RuntimeThread {
            handle,
            _stop: stop,
        })
    }
}

pub(crate) struct Inner {
    pub(crate) url: StoreUrl,
    pub(crate) config: EtcdConfig,
    pub(crate) runtime: RuntimeThread,
    /// One client per endpoint, connected on first use.
    pub(crate) clients: Vec<OnceCell<Client>>,
    /// The endpoint requests go to first; moves on when it fails.
    pub(crate) current: AtomicUsize,
    /// Grants made through this handle: (key, token) → (etcd lease id, waiter key), so
    /// release and renew need no lookup.
    pub(crate) granted: Mutex<HashMap<(String, u64), Granted>>,
    /// Leases of released grants, kept for the next acquire with the same TTL (it then
    /// needs no lease grant, one etcd write fewer). Unused ones expire on their own.
    pub(crate) pool: Mutex<Vec<Granted>>,
    /// How many times a watch event woke a waiting acquire of this handle.
    pub(crate) wakeups: AtomicU64,
}

/// What a failed etcd call means for the caller.
enum Failure {
    /// The member did not answer or cannot serve now: try another.
    Transient(etcd_client::Error),
    /// Any member would answer the same.
    Fatal(Error),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A plain map; a panic while holding it cannot leave it inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A random positive etcd lease id (ids are chosen by the client so that a retried grant
/// is recognised as the same grant).
pub(crate) fn random_lease_id() -> i64 {
    loop {
        let id = (HolderId::random().0 as u64 & (i64::MAX as u64)) as i64;
        if id > 0 {
            return id;
        }
    }
}

fn classify(e: etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(ref s) => {
            use tonic_code::*;
            match s.code() as i32 {
                UNAVAILABLE | DEADLINE_EXCEEDED | CANCELLED | UNKNOWN | ABORTED | INTERNAL
                | RESOURCE_EXHAUSTED => Failure::Transient(e),
                UNAUTHENTICATED | PERMISSION_DENIED => Failure::Fatal(
                    Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "etcd refused the credentials or the access: {}",
                            s.message()
                        ),
                    )
                    .with_source(e),
                ),
                _ => Failure::Fatal(
                    Error::new(
                        ErrorKind::Unavailable,
                        format!("etcd refused the request: {}", s.message()),
                    )
                    .with_source(e),
                ),
            }
        }
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::EndpointError(_) => {
            Failure::Transient(e)
        }
        E::LeaseKeepAliveError(_) => Failure::Transient(e),
        other => Failure::Fatal(
            Error::new(ErrorKind::Unavailable, "the etcd client failed").with_source(other),
        ),
    }
}

/// gRPC status codes by number (the etcd client does not re-export tonic's `Code`).
mod tonic_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

/// A one-line reason for a failed call: gRPC's message and the innermost cause (e.g.
/// "tcp connect error: Connection refused (os error 111)").
fn brief(e: &etcd_client::Error) -> String {
    let head = match e {
        etcd_client::Error::GRpcStatus(s) => s.message().to_owned(),
        other => other.to_string(),
    };
    let mut inner: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => std::error::Error::source(s),
        etcd_client::Error::TransportError(t) => std::error::Error::source(t),
        _ => None,
    };
    let mut last = None;
    while let Some(c) = inner {
        last = Some(c.to_string());
        inner = c.source();
    }
    match last {
        Some(l) if !head.contains(&l) => format!("{head}: {l}"),
        _ => head,
    }
}

pub(crate) fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// The reads (`get`s) of a transaction's answer, in order.
pub(crate) fn gets(resp: &TxnResponse) -> Vec<etcd_client::GetResponse> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}

/// The revision a transaction's answer was taken at, and its last `n` reads;
/// `Unavailable` when it has fewer (etcd answered something else than was asked).
pub(crate) fn txn_reads(
    resp: &TxnResponse,
    n: usize,
) -> Result<(i64, Vec<etcd_client::GetResponse>), Error> {
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut g = gets(resp);
    if g.len() < n {
        return Err(Error::new(
            ErrorKind::Unavailable,
            "etcd answered a transaction with fewer reads than asked",
        ));
    }
    let last = g.split_off(g.len() - n);
    Ok((revision, last))
}

pub(crate) fn is_lease_exists(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease already exists"))
}

/// A watch on what can wake a waiting acquire, and what it watches.
pub(crate) type Watch = (etcd_client::WatchStream, Vec<String>);

impl Inner {
    pub(crate) fn err(
        &self,
        kind: ErrorKind,
        op: Op,
        key: Option<&Key>,
        msg: impl Into<String>,
    ) -> Error {
        Error::new(kind, msg).context(op, key, &self.url)
    }

    pub(crate) fn ctx(&self, e: Error, op: Op, key: Option<&Key>) -> Error {
        e.context(op, key, &self.url)
    }

    async fn client(&self, i: usize) -> Result<Client, etcd_client::Error> {
        let endpoint = &self.config.endpoints[i];
        self.clients[i]
            .get_or_try_init(|| async {
                let mut opts = ConnectOptions::new()
                    .with_connect_timeout(self.config.connect_timeout)
                    .with_timeout(self.config.timeout)
                    .with_keep_alive(Duration::from_secs(10), self.config.timeout)
                    .with_tcp_keepalive(Duration::from_secs(10))
                    .with_require_leader(true);
                if let Some((u, p)) = &self.config.user {
                    opts = opts.with_user(u.clone(), p.clone());
                }
                Client::connect([format!("http://{endpoint}")], Some(opts)).await
            })
            .await
            .cloned()
    }

    /// Runs `f` against a member, moving to the next member when one fails, for at most
    /// two rounds over the members; each try is bounded by the request timeout.
    /// `Unavailable` when no member answered.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        op: Op,
        key: Option<&Key>,
        mut f: F,
    ) -> Result<T, Error>
    where
        F: FnMut(Client, u32) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.config.endpoints.len();
        let mut failures: Vec<String> = Vec::new();
        for attempt in 0..(2 * n as u32) {
            let i = self.current.load(Ordering::Relaxed) % n;
            let bound = self.config.timeout + self.config.connect_timeout;
            let tried = tokio::time::timeout(bound, async {
                let c = self.client(i).await?;
                f(c, attempt).await
            })
            .await;
            let e = match tried {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => {
                    failures.push(format!(
                        "{}: no answer within {}",
                        self.config.endpoints[i],
                        format_duration(bound)
                    ));
                    let _ = self.current.compare_exchange(
                        i,
                        (i + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    continue;
                }
            };
            match classify(e) {
                Failure::Fatal(err) => return Err(self.ctx(err, op, key)),
                Failure::Transient(e) => {
                    failures.push(format!("{}: {}", self.config.endpoints[i], brief(&e)));
                    let _ = self.current.compare_exchange(
                        i,
                        (i + 1) % n,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt + 1))).await;
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        failures.retain(|f| seen.insert(f.clone()));
        Err(self.err(
            ErrorKind::Unavailable,
            op,
            key,
            format!(
                "no etcd member answered ({})",
                failures
                    .iter()
                    .take(4)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ))
    }

    /// Revokes lease `id` (gone already counts as done); false when no member confirmed.
    pub(crate) async fn revoke_quiet(&self, id: i64) -> bool {
        matches!(
            tokio::time::timeout(
                CLEANUP_BOUND,
                self.call(Op::Release, None, |mut c, _| async move {
                    match c.lease_revoke(id).await {
                        Ok(_) => Ok(()),
                        Err(e) if is_lease_not_found(&e) => Ok(()),
                        Err(e) => Err(e),
                    }
                }),
            )
            .await,
            Ok(Ok(()))
        )
    }

    /// One keep-alive round trip for lease `id`: the send instant when it is alive, `Lost`
    /// when etcd no longer has it.
    pub(crate) async fn keep_alive(&self, op: Op, key: &Key, id: i64) -> Result<Instant, Error> {
        let mut sent = Instant::now();
        let alive = self
            .call(op, Some(key), |mut c, _| {
                sent = Instant::now();
                async move {
                    match c.lease_keep_alive(id).await {
                        Ok(_) => Ok(true),
                        Err(e) if is_lease_not_found(&e) => Ok(false),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        if alive {
            Ok(sent)
        } else {
            Err(self.err(
                ErrorKind::Lost,
                op,
                Some(key),
                format!("etcd lease {id:x} expired or was revoked"),
            ))
        }
    }

    /// What is left of etcd lease `id`'s TTL, as etcd says (`None`: it did not say).
    pub(crate) async fn lease_left(&self, id: i64) -> Option<Duration> {
        self.call(Op::Inspect, None, |mut c, _| async move {
            c.lease_time_to_live(id, None).await
        })
        .await
        .ok()
        .map(|r| r.ttl())
        .and_then(|t| u64::try_from(t).ok())
        .map(Duration::from_secs)
    }

    /// Opens one watch stream on `targets` from revision `from` (those in `prefixes` as
    /// prefixes); `None` when no member answered (the caller then polls at the keep-alive
    /// pace until one does).
    pub(crate) async fn watch_keys(
        &self,
        op: Op,
        key: &Key,
        targets: Vec<String>,
        prefixes: &[String],
        from: i64,
    ) -> Result<Option<Watch>, Error> {
        let t2 = targets.clone();
        match self
            .call(op, Some(key), |mut c, _| {
                let targets = t2.clone();
                let prefixes = prefixes.to_vec();
                async move {
                    let mut stream: Option<etcd_client::WatchStream> = None;
                    for t in targets {
                        let mut o = WatchOptions::new().with_start_revision(from);
                        if prefixes.contains(&t) {
                            o = o.with_prefix();
                        }
                        match stream.as_mut() {
                            None => stream = Some(c.watch(t, Some(o)).await?),
                            Some(s) => s.watch(t, Some(o)).await?,
                        }
                    }
                    stream.ok_or_else(|| etcd_client::Error::WatchError("nothing to watch".into()))
                }
            })
            .await
        {
            Ok(s) => Ok(Some((s, targets))),
            Err(e) if e.kind() == ErrorKind::Unavailable => {
                // Fall back to polling at the keep-alive pace until a member answers.
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Waits on `watch` (or polls, without one) until an event or `until`: true when
    /// something may have changed (an event, a broken stream, a poll), false at `until`.
    /// A broken stream is dropped, so the next round watches again.
    pub(crate) async fn wait_for_change(&self, watch: &mut Option<Watch>, until: Instant) -> bool {
        match watch.as_mut() {
            Some((s, _)) => {
                let sleep = tokio::time::sleep_until(until.into());
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        m = s.message() => match m {
                            Ok(Some(r)) if r.created() && r.events().is_empty() && !r.canceled() => continue,
                            Ok(Some(r)) if r.canceled() || !r.events().is_empty() => {
                                self.wakeups.fetch_add(1, Ordering::Relaxed);
                                break true;
                            }
                            Ok(Some(_)) => continue,
                            // The stream broke (a member down): read again, watch again.
                            Ok(None) | Err(_) => { *watch = None; break true; }
                        },
                        _ = &mut sleep => break false,
                    }
                }
            }
            None => {
                let poll = Instant::now() + Duration::from_millis(250);
                tokio::time::sleep_until(until.min(poll).into()).await;
                true
            }
        }
    }
}
