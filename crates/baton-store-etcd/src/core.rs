//! The connection to etcd: one client per member on the store's runtime
//! ([`baton_core::kit::runtime`]), the call that moves to the next member when one fails,
//! the one mapping of etcd's failures into [`baton_core::Error`], the lease calls every
//! role makes (keep-alive, revoke, time to live) and the watch a waiting acquire or
//! barrier party sleeps on.
//!
//! Guarantees: every etcd request of the store goes through [`Inner::call`], so each try
//! is bounded by the request timeout, a failure a member can recover from moves on to the
//! next member (at most two rounds over the members), and what any member would answer the
//! same is returned at once; `Unavailable` means no member answered. etcd refusing the
//! credentials or the access is permanent (retrying will not help). Revoking a lease
//! (`revoke_quiet`) is bounded too, so a clean-up never hangs the caller.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use baton_core::kit::runtime::StoreRuntime;
use baton_core::kit::wait::rides_out;
use baton_core::{format_duration, Error, ErrorKind, HolderId, Key, Op, StoreUrl};
use etcd_client::{
    Client, ConnectOptions, LeaseGrantOptions, Txn, TxnOpResponse, TxnResponse, WatchOptions,
    WatchResponse, WatchStream,
};
use tokio::sync::OnceCell;

use crate::config::EtcdConfig;
use crate::lease::Granted;

/// How long a cancelled or failed acquire keeps trying to revoke its lease.
const CLEANUP_BOUND: Duration = Duration::from_secs(10);

/// The etcd store's state and operations, run on its runtime as [`crate::EtcdStore`].
pub struct Inner {
    pub(crate) url: StoreUrl,
    pub(crate) config: EtcdConfig,
    pub(crate) runtime: StoreRuntime,
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
            let code = s.code() as i32;
            match code {
                UNAVAILABLE | DEADLINE_EXCEEDED | CANCELLED | UNKNOWN | ABORTED | INTERNAL
                | RESOURCE_EXHAUSTED => Failure::Transient(e),
                // The message is etcd's whole answer: the status adds nothing to it.
                _ if refuses_credentials(code, s.message()) => Failure::Fatal(
                    Error::new(
                        ErrorKind::Unavailable,
                        format!(
                            "etcd refused the credentials or the access: {}",
                            s.message()
                        ),
                    )
                    .permanent(),
                ),
                _ => Failure::Fatal(Error::new(
                    ErrorKind::Unavailable,
                    format!("etcd refused the request: {}", s.message()),
                )),
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

/// Whether etcd's answer refuses the credentials or the access: a denied permission, an
/// invalid token, or (at connect, as `InvalidArgument` or `FailedPrecondition`) a wrong
/// user or password, or authentication that is not enabled.
fn refuses_credentials(code: i32, message: &str) -> bool {
    use tonic_code::*;
    matches!(code, UNAUTHENTICATED | PERMISSION_DENIED)
        || [
            "authentication failed",
            "authentication is not enabled",
            "user name is empty",
        ]
        .iter()
        .any(|m| message.contains(m))
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
pub(crate) struct Watch {
    pub(crate) stream: Option<WatchStream>,
    pub(crate) targets: Vec<String>,
    /// The store's revision when every watch was in place: what changed after it is
    /// delivered; what changed up to it the caller must read (`None`: polling).
    pub(crate) from: Option<i64>,
}

impl Inner {
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
                Failure::Fatal(err) => return Err(err.context(op, key, &self.url)),
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
        Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "no etcd member answered ({})",
                failures
                    .iter()
                    .take(4)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        )
        .context(op, key, &self.url))
    }

    /// Runs transaction `txn` (resent as is on every try).
    pub(crate) async fn txn(&self, op: Op, key: &Key, txn: Txn) -> Result<TxnResponse, Error> {
        self.call(op, Some(key), |mut c, _| {
            let t = txn.clone();
            async move { c.txn(t).await }
        })
        .await
    }

    /// Grants etcd lease `id` with a TTL of `secs` seconds (a retry of a grant whose answer
    /// was lost counts as granted). Returns when the last try was sent, and the TTL etcd
    /// granted (`None` after such a retry).
    pub(crate) async fn grant_lease(
        &self,
        op: Op,
        key: &Key,
        id: i64,
        secs: u64,
    ) -> Result<(Instant, Option<i64>), Error> {
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        let mut sent = Instant::now();
        let ttl = self
            .call(op, Some(key), |mut c, _| {
                sent = Instant::now();
                async move {
                    let opts = LeaseGrantOptions::new().with_id(id);
                    match c.lease_grant(secs, Some(opts)).await {
                        Ok(r) => Ok(Some(r.ttl())),
                        Err(e) if is_lease_exists(&e) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        Ok((sent, ttl))
    }

    /// Revokes lease `id`: true when it was revoked, false when it was gone already.
    pub(crate) async fn revoke(&self, op: Op, key: &Key, id: i64) -> Result<bool, Error> {
        self.call(op, Some(key), |mut c, _| async move {
            match c.lease_revoke(id).await {
                Ok(_) => Ok(true),
                Err(e) if is_lease_not_found(&e) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
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
            Err(Error::new(
                ErrorKind::Lost,
                format!("etcd lease {id:x} expired or was revoked"),
            ))
        }
    }

    /// What is left of etcd lease `id`'s TTL, as etcd says (`None`: it did not say).
    pub(crate) async fn lease_left(&self, id: i64) -> Option<Duration> {
        self.lease_ttl(id).await.map(|(left, _)| left)
    }

    /// What is left of etcd lease `id`'s TTL and the TTL it was granted with, as etcd says
    /// (`None`: it did not say, or the lease is gone).
    pub(crate) async fn lease_ttl(&self, id: i64) -> Option<(Duration, Duration)> {
        let r = self
            .call(Op::Inspect, None, |mut c, _| async move {
                c.lease_time_to_live(id, None).await
            })
            .await
            .ok()?;
        let secs = |t: i64| u64::try_from(t).ok().map(Duration::from_secs);
        Some((secs(r.ttl())?, secs(r.granted_ttl())?))
    }

    /// Opens one watch stream on `targets` from revision `from` (those in `prefixes` as
    /// prefixes); without a stream when no member answered (the caller then polls at the
    /// keep-alive pace until one does).
    /// Watches `targets` (a prefix each when it is in `prefixes`) from the current
    /// revision, and waits for etcd to confirm each watch. A watch created from a revision
    /// already past is served from etcd's catch-up loop, which runs every 100 ms; from the
    /// current one it is live at once. The caller compares [`Watch::from`] with the
    /// revision it read and reads again when something changed in between.
    pub(crate) async fn watch_keys(
        &self,
        op: Op,
        key: &Key,
        targets: Vec<String>,
        prefixes: &[String],
    ) -> Result<Watch, Error> {
        let t2 = targets.clone();
        let timeout = self.config.timeout;
        let watched = self
            .call(op, Some(key), |mut c, _| {
                let targets = t2.clone();
                let prefixes = prefixes.to_vec();
                async move {
                    let mut stream: Option<WatchStream> = None;
                    for t in &targets {
                        let mut o = WatchOptions::new();
                        if prefixes.contains(t) {
                            o = o.with_prefix();
                        }
                        match stream.as_mut() {
                            None => stream = Some(c.watch(t.clone(), Some(o)).await?),
                            Some(s) => s.watch(t.clone(), Some(o)).await?,
                        }
                    }
                    let mut s = stream
                        .ok_or_else(|| etcd_client::Error::WatchError("nothing to watch".into()))?;
                    // One `created` answer per watch; an event among them is a change the
                    // caller must see, and counts as a change after the read.
                    let (mut created, mut from) = (0, 0i64);
                    let confirm = async {
                        while created < targets.len() {
                            match s.message().await? {
                                Some(r) => {
                                    let rev = r.header().map(|h| h.revision()).unwrap_or(0);
                                    if r.created() {
                                        created += 1;
                                    }
                                    if !r.events().is_empty() {
                                        from = i64::MAX;
                                    } else {
                                        from = from.max(rev);
                                    }
                                }
                                None => {
                                    return Err(etcd_client::Error::WatchError(
                                        "the watch stream ended".into(),
                                    ))
                                }
                            }
                        }
                        Ok::<_, etcd_client::Error>(())
                    };
                    match tokio::time::timeout(timeout, confirm).await {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(etcd_client::Error::WatchError(
                                "etcd did not confirm the watch in time".into(),
                            ))
                        }
                    }
                    Ok((s, from))
                }
            })
            .await;
        Ok(match polling(watched)? {
            Some((stream, from)) => Watch {
                stream: Some(stream),
                targets,
                from: Some(from),
            },
            None => Watch {
                stream: None,
                targets,
                from: None,
            },
        })
    }

    /// [`wait_for_change`] for a waiting acquire: any event on what it watches wakes it
    /// (and counts in [`Inner::wakeups`]).
    pub(crate) async fn wait_for_acquire(&self, watch: &mut Watch, until: Instant) -> bool {
        wait_for_change(&mut watch.stream, until, |_| {
            self.wakeups.fetch_add(1, Ordering::Relaxed);
            true
        })
        .await
    }
}

/// A watch stream that could be opened, or `None` (poll) when no member answered; other
/// errors end the wait.
pub(crate) fn polling<T>(stream: Result<T, Error>) -> Result<Option<T>, Error> {
    match stream {
        Ok(s) => Ok(Some(s)),
        // Fall back to polling at the keep-alive pace until a member answers.
        Err(e) if rides_out(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// How often a wait without a watch stream looks again.
const POLL: Duration = Duration::from_millis(250);

/// Waits on `stream` (or polls every [`POLL`], without one) until an answer with events
/// that `wakes` accepts, or `until`: true when something may have changed (such an event,
/// a cancelled or broken stream, a poll), false at `until`. A cancelled or broken stream
/// is dropped, so the caller's next round watches again.
pub(crate) async fn wait_for_change(
    stream: &mut Option<WatchStream>,
    until: Instant,
    mut wakes: impl FnMut(&WatchResponse) -> bool,
) -> bool {
    let Some(s) = stream.as_mut() else {
        tokio::time::sleep_until(until.min(Instant::now() + POLL).into()).await;
        return true;
    };
    let sleep = tokio::time::sleep_until(until.into());
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            m = s.message() => match m {
                Ok(Some(r)) if r.canceled() => { *stream = None; return true; }
                Ok(Some(r)) if r.events().is_empty() => continue,
                Ok(Some(r)) => if wakes(&r) { return true; },
                // The stream broke (a member down): read again, watch again.
                Ok(None) | Err(_) => { *stream = None; return true; }
            },
            _ = &mut sleep => return false,
        }
    }
}
