//! The etcd store: a waiter key per request, attached to the request's own etcd lease and
//! ordered by create revision; a slot key per grant; the limit in a key of its own.
//!
//! Layout under the prefix `P` for a key `K` (`#` cannot occur in a key, so no key's
//! entries can be mistaken for another's):
//! - `P/K#limit`: the limit, a decimal number, without a lease;
//! - `P/K#w/<lease id, hex>`: one per request, waiting or holding, attached to the
//!   request's lease; value: JSON with the holder and the TTL;
//! - `P/K#s/<slot>`: one per grant, attached to the holder's lease; value: JSON with the
//!   waiter's id. The grant's fencing token is this key's create revision.
//! - `P/K#delay`: the key's lock-delay in ms, created with the limit (keys with one only);
//! - `P/K#g/<slot>`: (keys with a lock-delay) written without a lease in the transaction
//!   that creates the slot key, deleted with it by a clean release. A `#g` key whose slot
//!   key is gone is a lease that was lost (expired or broken), not released;
//! - `P/K#h/<slot>`: (keys with a lock-delay) the slot is held back while it exists: the
//!   first process to see a loss (the breaker, or an acquirer that finds an orphaned `#g`
//!   key) creates it, in the transaction that deletes the `#g` key, attached to an etcd
//!   lease of the delay's TTL, so etcd's own lease clock ends the delay and no wall clock
//!   is read.
//!
//! Guarantees:
//! - Limit: a slot key is created only by a transaction that requires the slot key to be
//!   absent, the slot number to be below the limit read with the same transaction's
//!   guard on the limit key's mod revision, and the requester's waiter key to exist
//!   (its lease alive). Slot keys are unique, so at most `limit` exist at once.
//! - Tokens: etcd revisions rise with every write of the cluster and survive restarts, so
//!   a slot key's create revision is above every earlier grant's.
//! - Fairness: a request is granted only when fewer than `limit` waiter keys were created
//!   before its own, so nobody overtakes an earlier waiter.
//! - No herd: a waiter watches only the `limit` waiter keys closest ahead of it (and the
//!   limit key; and the slot keys when its turn has come but every slot below the limit is
//!   still taken). If fewer than `limit` keys remain ahead, one of those it watches is
//!   gone, so it never misses its turn; a deletion wakes at most `limit` waiters.
//! - No residue: an acquire that fails, times out or is cancelled revokes its lease,
//!   which deletes its waiter key; a waiter that dies leaves a key that etcd deletes when
//!   its lease's TTL runs out.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use baton_core::{
    format_duration, unix_ms, AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error,
    ErrorKind, Holder, HolderId, Key, KeyStatus, Lease, Liveness, Op, Released, SlotState,
    SlotStatus, Store, StoreUrl, Token, Wait,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, LeaseGrantOptions,
    PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, OnceCell};

use crate::config::EtcdConfig;

#[path = "barrier.rs"]
mod barrier;

pub use barrier::ARRIVAL_TTL;

/// The TTL of a lease whose request gives none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// The longest TTL a request may ask for (etcd's own maximum is about 9 × 10^10 s; a
/// lease longer than this is a mistake).
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a cancelled or failed acquire keeps trying to revoke its lease.
const CLEANUP_BOUND: Duration = Duration::from_secs(10);

/// The etcd store. See the crate docs and README for the mechanism and its bounds.
pub struct EtcdStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("url", &self.inner.url)
            .field("endpoints", &self.inner.config.endpoints)
            .field("prefix", &self.inner.config.prefix)
            .finish_non_exhaustive()
    }
}

/// The runtime the store's client lives on: its own threads, so that the caller's
/// runtime (a current-thread one, or the keeper's) never has to drive the client's
/// background tasks. Dropping this stops it, from its own thread.
struct RuntimeThread {
    handle: tokio::runtime::Handle,
    _stop: std::sync::mpsc::Sender<()>,
}

impl RuntimeThread {
    fn start() -> std::io::Result<RuntimeThread> {
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

struct Inner {
    url: StoreUrl,
    config: EtcdConfig,
    runtime: RuntimeThread,
    /// One client per endpoint, connected on first use.
    clients: Vec<OnceCell<Client>>,
    /// The endpoint requests go to first; moves on when it fails.
    current: AtomicUsize,
    /// Grants made through this handle: (key, token) → (etcd lease id, waiter key), so
    /// release and renew need no lookup.
    granted: Mutex<HashMap<(String, u64), Granted>>,
    /// Leases of released grants, kept for the next acquire with the same TTL (it then
    /// needs no lease grant, one etcd write fewer). Unused ones expire on their own.
    pool: Mutex<Vec<Granted>>,
    /// How many times a watch event woke a waiting acquire of this handle.
    wakeups: AtomicU64,
}

/// How many released leases a handle keeps for reuse.
const POOL_MAX: usize = 8;

/// An etcd lease carrying (or having carried) one grant of this handle.
#[derive(Clone, Copy)]
struct Granted {
    id: i64,
    /// Its TTL in etcd, whole seconds.
    server_ttl: u64,
    /// When the request that last started its TTL was sent.
    refreshed: Instant,
}

impl Granted {
    /// Fresh enough to carry a new grant: at most a third of its TTL used.
    fn reusable(&self) -> bool {
        self.refreshed.elapsed() < Duration::from_secs(self.server_ttl) / 3
    }
}

/// The TTL etcd is asked for: whole seconds, never below what the request asked, so the
/// keeper's deadline, counted from the requested TTL, comes first (etcd also raises a TTL
/// below its minimum, 2s with default settings).
fn server_ttl_of(ttl: Duration) -> u64 {
    ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)
}

/// The value of a waiter key.
#[derive(Serialize, Deserialize)]
struct WaiterValue {
    holder: Holder,
    ttl_ms: u64,
}

/// The value of a slot key.
#[derive(Serialize, Deserialize)]
struct SlotValue {
    /// The waiter key's last path part: the lease id in hex.
    waiter: String,
    acquired_unix_ms: u64,
}

/// A waiter key as read.
struct Entry {
    key: Vec<u8>,
    create_rev: i64,
    lease: i64,
    value: Vec<u8>,
}

impl Entry {
    /// True when the entry's holder was on this host and boot and its process is gone
    /// (a positive finding only; see [`baton_core::Holder::liveness`]).
    fn holder_dead(&self) -> bool {
        serde_json::from_slice::<WaiterValue>(&self.value)
            .is_ok_and(|v| v.holder.liveness() == Liveness::Dead)
    }
}

/// A slot key as read, checked.
struct SlotEntry {
    slot: u32,
    create_rev: i64,
    lease: i64,
    value: SlotValue,
}

/// A key's state at one revision.
struct View {
    revision: i64,
    /// The limit, and the limit key's mod revision; `None` when there is no limit key.
    limit: Option<(u32, i64)>,
    /// Waiter keys, by create revision.
    entries: Vec<Entry>,
    slots: Vec<SlotEntry>,
    /// The key's lock-delay, if it has one.
    delay: Option<Duration>,
    /// `#g/<slot>` keys: (slot, mod revision).
    grants: Vec<(u32, i64)>,
    /// `#h/<slot>` keys: (slot, the etcd lease that ends the hold, its value).
    holds: Vec<(u32, i64, Vec<u8>)>,
}

impl View {
    /// Grant records whose slot key is gone: leases lost, not yet held back.
    fn orphans(&self) -> Vec<(u32, i64)> {
        self.grants
            .iter()
            .filter(|(slot, _)| !self.slots.iter().any(|s| s.slot == *slot))
            // One already held back is garbage (no grant is made while a hold exists);
            // it must not make an acquirer try to hold it back again and again.
            .filter(|(slot, _)| !self.held_back(*slot))
            .copied()
            .collect()
    }

    fn held_back(&self, slot: u32) -> bool {
        self.holds.iter().any(|(s, _, _)| *s == slot)
    }
}

/// The value of a `#h/<slot>` key (for `status`; no decision reads it).
#[derive(Serialize, Deserialize)]
struct HoldValue {
    /// The lost grant's token.
    token: i64,
    /// `expired` or `broken`.
    how: String,
    lost_unix_ms: u64,
}

/// The names of one key's entries.
struct Names {
    limit: String,
    waiters: String,
    slots: String,
    delay: String,
    grants: String,
    holds: String,
}

impl Names {
    fn grant(&self, slot: u32) -> String {
        format!("{}{slot}", self.grants)
    }
    fn hold(&self, slot: u32) -> String {
        format!("{}{slot}", self.holds)
    }
    fn waiter(&self, id: i64) -> String {
        format!("{}{id:016x}", self.waiters)
    }
    fn slot(&self, slot: u32) -> String {
        format!("{}{slot}", self.slots)
    }
}

/// What a failed etcd call means for the caller.
enum Failure {
    /// The member did not answer or cannot serve now: try another.
    Transient(etcd_client::Error),
    /// Any member would answer the same.
    Fatal(Error),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A plain map; a panic while holding it cannot leave it inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// A random positive etcd lease id (ids are chosen by the client so that a retried grant
/// is recognised as the same grant).
fn random_lease_id() -> i64 {
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

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// The reads (`get`s) of a transaction's answer, in order.
fn gets(resp: &TxnResponse) -> Vec<etcd_client::GetResponse> {
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
fn txn_reads(resp: &TxnResponse, n: usize) -> Result<(i64, Vec<etcd_client::GetResponse>), Error> {
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

fn is_lease_exists(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("lease already exists"))
}

impl Inner {
    fn err(&self, kind: ErrorKind, op: Op, key: Option<&Key>, msg: impl Into<String>) -> Error {
        Error::new(kind, msg).context(op, key, &self.url)
    }

    fn ctx(&self, e: Error, op: Op, key: Option<&Key>) -> Error {
        e.context(op, key, &self.url)
    }

    /// The value of a slot key: granted to `waiter` (its lease id in hex), now.
    fn slot_value(&self, waiter: String, op: Op, key: &Key) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(&SlotValue {
            waiter,
            acquired_unix_ms: unix_ms(SystemTime::now()),
        })
        .map_err(|e| {
            self.err(
                ErrorKind::InvalidInput,
                op,
                Some(key),
                "cannot encode the slot",
            )
            .with_source(e)
        })
    }

    fn names(&self, key: &Key) -> Names {
        let base = format!("{}/{}", self.config.prefix, key.as_str());
        Names {
            limit: format!("{base}#limit"),
            waiters: format!("{base}#w/"),
            slots: format!("{base}#s/"),
            delay: format!("{base}#delay"),
            grants: format!("{base}#g/"),
            holds: format!("{base}#h/"),
        }
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
    async fn call<T, F, Fut>(&self, op: Op, key: Option<&Key>, mut f: F) -> Result<T, Error>
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

    fn read_ops(&self, names: &Names) -> Vec<TxnOp> {
        vec![
            TxnOp::get(names.limit.clone(), None),
            TxnOp::get(
                names.waiters.clone(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend),
                ),
            ),
            TxnOp::get(names.slots.clone(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(names.delay.clone(), None),
            TxnOp::get(names.grants.clone(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(names.holds.clone(), Some(GetOptions::new().with_prefix())),
        ]
    }

    /// Parses the responses of [`Inner::read_ops`], the last six of `resp`.
    fn parse_view(&self, names: &Names, resp: &TxnResponse) -> Result<View, Error> {
        let (revision, g) = txn_reads(resp, 6)?;
        let limit = match g[0].kvs().first() {
            None => None,
            Some(kv) => Some((parse_limit(names, kv)?, kv.mod_revision())),
        };
        let mut entries = Vec::new();
        for kv in g[1].kvs() {
            if kv.lease() == 0 {
                return Err(corrupt(format!(
                    "{} is a waiter key without an etcd lease: baton did not write it (delete it \
                     with etcdctl if nobody uses it)",
                    show(kv.key())
                )));
            }
            entries.push(Entry {
                key: kv.key().to_vec(),
                create_rev: kv.create_revision(),
                lease: kv.lease(),
                value: kv.value().to_vec(),
            });
        }
        entries.sort_by_key(|e| e.create_rev);
        let mut slots = Vec::new();
        for kv in g[2].kvs() {
            let name = show(kv.key());
            let slot = name
                .strip_prefix(&names.slots)
                .and_then(|s| s.parse::<u32>().ok())
                .ok_or_else(|| {
                    corrupt(format!(
                        "{name} is not a slot key baton writes (no slot number)"
                    ))
                })?;
            if kv.lease() == 0 {
                return Err(corrupt(format!(
                    "{name} is a slot key without an etcd lease: baton did not write it"
                )));
            }
            let value: SlotValue = serde_json::from_slice(kv.value())
                .map_err(|e| corrupt(format!("{name} does not hold baton's slot record: {e}")))?;
            slots.push(SlotEntry {
                slot,
                create_rev: kv.create_revision(),
                lease: kv.lease(),
                value,
            });
        }
        slots.sort_by_key(|s| s.slot);
        let delay = match g[3].kvs().first() {
            None => None,
            Some(kv) => Some(parse_delay(names, kv)?),
        };
        let slot_of = |prefix: &str, kv: &KeyValue| -> Result<u32, Error> {
            let name = show(kv.key());
            name.strip_prefix(prefix)
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u32>().ok())
                .ok_or_else(|| {
                    corrupt(format!("{name} is not a key baton writes (no slot number)"))
                })
        };
        let mut grants = Vec::new();
        for kv in g[4].kvs() {
            grants.push((slot_of(&names.grants, kv)?, kv.mod_revision()));
        }
        let mut holds = Vec::new();
        for kv in g[5].kvs() {
            let slot = slot_of(&names.holds, kv)?;
            if kv.lease() == 0 {
                // Without a lease it would hold the slot back for ever.
                return Err(corrupt(format!(
                    "{} holds a slot back without an etcd lease: baton did not write it",
                    show(kv.key())
                )));
            }
            holds.push((slot, kv.lease(), kv.value().to_vec()));
        }
        if delay.is_none() && !(grants.is_empty() && holds.is_empty()) {
            return Err(corrupt(format!(
                "{} is missing although the key has lock-delay records",
                names.delay
            )));
        }
        Ok(View {
            revision,
            limit,
            entries,
            slots,
            delay,
            grants,
            holds,
        })
    }

    async fn read_view(&self, op: Op, key: &Key, names: &Names) -> Result<View, Error> {
        let ops = self.read_ops(names);
        let resp = self
            .call(op, Some(key), |mut c, _| {
                let ops = ops.clone();
                async move { c.txn(Txn::new().and_then(ops)).await }
            })
            .await?;
        self.parse_view(names, &resp)
            .map_err(|e| self.ctx(e, op, Some(key)))
    }

    /// Revokes lease `id` (gone already counts as done); false when no member confirmed.
    async fn revoke_quiet(&self, id: i64) -> bool {
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
    async fn keep_alive(&self, op: Op, key: &Key, id: i64) -> Result<Instant, Error> {
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

    /// The whole acquire, on the store's runtime. The caller revokes lease `id` when this
    /// fails.
    async fn acquire_inner(
        &self,
        req: &AcquireRequest,
        id: i64,
        pooled: bool,
    ) -> Result<Lease, Error> {
        let op = Op::Acquire;
        let key = &req.key;
        let ttl = req.ttl.unwrap_or(DEFAULT_TTL);
        if ttl < Duration::from_millis(1) || ttl > MAX_TTL {
            return Err(self.err(
                ErrorKind::InvalidInput,
                op,
                Some(key),
                format!(
                    "the TTL must be between 1ms and {}, not {}",
                    format_duration(MAX_TTL),
                    format_duration(ttl)
                ),
            ));
        }
        let lock_delay = req.lock_delay.filter(|d| !d.is_zero());
        if lock_delay.is_some_and(|d| d > MAX_LOCK_DELAY) {
            return Err(self.err(
                ErrorKind::InvalidInput,
                op,
                Some(key),
                "the lock-delay is too large (at most 365 days)",
            ));
        }
        let server_ttl = server_ttl_of(ttl);
        let names = self.names(key);
        let start = Instant::now();
        let deadline = req.deadline(start);
        let value = serde_json::to_vec(&WaiterValue {
            holder: req.holder.clone(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        })
        .map_err(|e| {
            self.err(
                ErrorKind::InvalidInput,
                op,
                Some(key),
                "cannot encode the holder",
            )
            .with_source(e)
        })?;

        // A pooled lease is refreshed (which also proves it is still there); one that
        // is gone is granted again under the same id.
        let reused = if pooled {
            match self.keep_alive(op, key, id).await {
                Ok(sent) => Some(sent),
                Err(e) if e.kind() == ErrorKind::Lost => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        let mut refreshed = Instant::now();
        let granted_ttl = if let Some(sent) = reused {
            refreshed = sent;
            None
        } else {
            self.call(op, Some(key), |mut c, _| {
                refreshed = Instant::now();
                async move {
                    match c
                        .lease_grant(
                            server_ttl as i64,
                            Some(LeaseGrantOptions::new().with_id(id)),
                        )
                        .await
                    {
                        Ok(r) => Ok(Some(r.ttl())),
                        // A retry of a grant whose answer was lost.
                        Err(e) if is_lease_exists(&e) => Ok(None),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?
        };
        // A grant is sent again on every try: count from before the first one.
        if reused.is_none() {
            refreshed = start.min(refreshed);
        }
        let server_ttl = granted_ttl.map_or(server_ttl, |t| u64::try_from(t).unwrap_or(server_ttl));
        let mine = names.waiter(id);
        let create = {
            let mut ops = vec![
                TxnOp::put(
                    mine.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(id)),
                ),
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::create_revision(
                            names.limit.clone(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then(
                            std::iter::once(TxnOp::put(
                                names.limit.clone(),
                                req.limit.to_string(),
                                None,
                            ))
                            // The delay comes into being with the limit, never after it.
                            .chain(lock_delay.map(|d| {
                                TxnOp::put(
                                    names.delay.clone(),
                                    d.as_millis().max(1).to_string(),
                                    None,
                                )
                            }))
                            .collect::<Vec<_>>(),
                        ),
                ),
            ];
            ops.extend(self.read_ops(&names));
            Txn::new()
                .when([Compare::create_revision(mine.clone(), CompareOp::Equal, 0)])
                .and_then(ops)
                .or_else(self.read_ops(&names))
        };
        // The fast path, one round trip: nobody waits or holds and the limit is the one
        // asked for, so this request takes slot 0 at once. Otherwise the nested
        // transaction queues it and reads the key's state.
        let slot0 = self.slot_value(format!("{id:016x}"), op, key)?;
        let first = Txn::new()
            .when([
                Compare::version(names.waiters.clone(), CompareOp::Equal, 0).with_prefix(),
                Compare::version(names.slots.clone(), CompareOp::Equal, 0).with_prefix(),
                Compare::value(names.limit.clone(), CompareOp::Equal, req.limit.to_string()),
                // Keys with a lock-delay always take the full path (hold-backs, records).
                Compare::version(names.delay.clone(), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    mine.clone(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(id)),
                ),
                TxnOp::put(names.slot(0), slot0, Some(PutOptions::new().with_lease(id))),
            ])
            .or_else([TxnOp::txn(create)]);
        let resp = self
            .call(op, Some(key), |mut c, _| {
                let t = first.clone();
                async move { c.txn(t).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            return self
                .granted(
                    req, &names, id, 0, req.limit, revision, ttl, refreshed, false,
                )
                .await;
        }
        let inner = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Txn(t) => Some(t),
                _ => None,
            })
            .ok_or_else(|| {
                self.err(
                    ErrorKind::Unavailable,
                    op,
                    Some(key),
                    "etcd answered a transaction without its nested part",
                )
            })?;
        let mut view = self
            .parse_view(&names, &inner)
            .map_err(|e| self.ctx(e, op, Some(key)))?;
        view.revision = revision;
        if let Some((lim, _)) = view.limit {
            if lim != req.limit {
                return Err(self
                    .err(
                        ErrorKind::LimitMismatch,
                        op,
                        Some(key),
                        format!(
                            "the key has a limit of {lim} slot(s), not {} (use -n {lim}, or another key)",
                            req.limit
                        ),
                    )
                    .with_current_limit(lim));
            }
        }
        let keep_every = Duration::from_secs(server_ttl.max(1)) / 3;
        let mut waited = false;
        let mut watch: Option<(etcd_client::WatchStream, Vec<String>)> = None;
        loop {
            let Some((limit, limit_mod)) = view.limit else {
                return Err(self.err(
                    ErrorKind::Corrupt,
                    op,
                    Some(key),
                    format!("{} vanished while requests use the key", names.limit),
                ));
            };
            let my_hex = format!("{id:016x}");
            if let Some(s) = view.slots.iter().find(|s| s.value.waiter == my_hex) {
                // A claim whose answer was lost, seen again.
                return self
                    .granted(
                        req,
                        &names,
                        id,
                        s.slot,
                        limit,
                        s.create_rev,
                        ttl,
                        refreshed,
                        waited,
                    )
                    .await;
            }
            let Some(pos) = view.entries.iter().position(|e| e.key == mine.as_bytes()) else {
                return Err(self.err(
                    ErrorKind::Lost,
                    op,
                    Some(key),
                    format!(
                        "this request's etcd lease {id:x} expired or was revoked while it waited \
                         (its waiter key is gone), so it was not granted"
                    ),
                ));
            };
            let my_rev = view.entries[pos].create_rev;
            // Waiters ahead whose process died on this host: their keys would block the
            // queue until their leases run out. Holders are left to their TTL.
            let holding: Vec<String> = view.slots.iter().map(|s| s.value.waiter.clone()).collect();
            let dead: Vec<i64> = view.entries[..pos]
                .iter()
                .filter(|e| !holding.iter().any(|h| e.key.ends_with(h.as_bytes())))
                .filter(|e| e.holder_dead())
                .map(|e| e.lease)
                .collect();
            if !dead.is_empty() {
                for d in dead {
                    self.revoke_quiet(d).await;
                }
                view = self.read_view(op, key, &names).await?;
                continue;
            }
            // Leases lost since anyone looked: hold their slots back from now on.
            if let (Some(delay), false) = (view.delay, view.orphans().is_empty()) {
                for (slot, g_mod) in view.orphans() {
                    self.hold_back(op, key, &names, slot, g_mod, delay, "expired")
                        .await?;
                }
                view = self.read_view(op, key, &names).await?;
                continue;
            }
            let mut watch_slots = false;
            if (pos as u64) < u64::from(limit) {
                let taken: Vec<u32> = view.slots.iter().map(|s| s.slot).collect();
                if let Some(slot) = (0..limit).find(|s| !taken.contains(s) && !view.held_back(*s)) {
                    let slot_key = names.slot(slot);
                    let sv = self.slot_value(my_hex.clone(), op, key)?;
                    let mut when = vec![
                        Compare::create_revision(mine.clone(), CompareOp::Equal, my_rev),
                        Compare::create_revision(slot_key.clone(), CompareOp::Equal, 0),
                        Compare::mod_revision(names.limit.clone(), CompareOp::Equal, limit_mod),
                    ];
                    let mut then = vec![TxnOp::put(
                        slot_key.clone(),
                        sv,
                        Some(PutOptions::new().with_lease(id)),
                    )];
                    if view.delay.is_some() {
                        // Not held back, no unrecorded loss; and record this grant, so
                        // that its loss (the slot key gone without a release) shows.
                        when.push(Compare::create_revision(
                            names.hold(slot),
                            CompareOp::Equal,
                            0,
                        ));
                        when.push(Compare::create_revision(
                            names.grant(slot),
                            CompareOp::Equal,
                            0,
                        ));
                        then.push(TxnOp::put(names.grant(slot), my_hex.clone(), None));
                    }
                    let claim = Txn::new()
                        .when(when)
                        .and_then(then)
                        .or_else(self.read_ops(&names));
                    let resp = self
                        .call(op, Some(key), |mut c, _| {
                            let t = claim.clone();
                            async move { c.txn(t).await }
                        })
                        .await?;
                    if resp.succeeded() {
                        let token = resp.header().map(|h| h.revision()).unwrap_or(0);
                        return self
                            .granted(req, &names, id, slot, limit, token, ttl, refreshed, waited)
                            .await;
                    }
                    view = self
                        .parse_view(&names, &resp)
                        .map_err(|e| self.ctx(e, op, Some(key)))?;
                    continue;
                }
                watch_slots = true;
            }
            if req.wait == Wait::NoWait {
                let held = view.slots.len();
                let held_back = self.hold_left(&view).await;
                return Err(self.err(
                    ErrorKind::Busy,
                    op,
                    Some(key),
                    if let (Some(d), Some(left)) = (view.delay, held_back) {
                        format!(
                            "{held} of {limit} slot(s) are held, and a lost lease's slot is held back by the key's lock-delay of {} for about another {}",
                            format_duration(d),
                            format_duration(left)
                        )
                    } else if held as u64 >= u64::from(limit) {
                        format!("all {limit} slot(s) are held")
                    } else {
                        format!(
                            "{held} of {limit} slot(s) are held and earlier requests wait for the rest"
                        )
                    },
                ));
            }
            waited = true;
            // Watch only what can wake this request: the `limit` waiter keys closest ahead
            // (if fewer than `limit` remain ahead, one of them is gone), the limit key (a
            // resize), and the slot keys when it is its turn but no slot below the limit
            // is free (a holder above a lowered limit releasing).
            let ahead = &view.entries[..pos];
            let first = ahead.len().saturating_sub(limit as usize);
            let mut targets: Vec<String> = ahead[first..].iter().map(|e| show(&e.key)).collect();
            targets.push(names.limit.clone());
            if watch_slots {
                targets.push(names.slots.clone());
                if view.delay.is_some() {
                    // A hold-back ends by its etcd lease expiring: a deletion to wake on.
                    targets.push(names.holds.clone());
                }
            }
            let stale = watch.as_ref().is_none_or(|(_, t)| *t != targets);
            if stale {
                watch = None;
                let from = view.revision + 1;
                let t2 = targets.clone();
                let prefixes = [names.slots.clone(), names.holds.clone()];
                match self
                    .call(op, Some(key), |mut c, _| {
                        let targets = t2.clone();
                        let prefixes = prefixes.clone();
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
                            stream.ok_or_else(|| {
                                etcd_client::Error::WatchError("nothing to watch".into())
                            })
                        }
                    })
                    .await
                {
                    Ok(s) => watch = Some((s, targets)),
                    Err(e) if e.kind() == ErrorKind::Unavailable => {
                        // Fall back to polling at the keep-alive pace until a member answers.
                    }
                    Err(e) => return Err(e),
                }
            }
            // Wait for an event, the next keep-alive, or the deadline.
            let next_keep = refreshed + keep_every;
            let until = deadline.map_or(next_keep, |d| d.min(next_keep));
            let woke = match watch.as_mut() {
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
                                Ok(None) | Err(_) => { watch = None; break true; }
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
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(req.timed_out("every slot stayed held", &self.url));
            }
            if !woke || now >= next_keep {
                refreshed = self.keep_alive(op, key, id).await.map_err(|e| {
                    if e.kind() == ErrorKind::Lost {
                        self.err(
                            ErrorKind::Lost,
                            op,
                            Some(key),
                            format!(
                                "this request's etcd lease {id:x} expired or was revoked while it \
                                 waited, so it was not granted"
                            ),
                        )
                    } else {
                        e
                    }
                })?;
            }
            view = self.read_view(op, key, &names).await?;
        }
    }

    /// Holds `slot` back for `delay` from now: creates its `#h` key on an etcd lease of
    /// the delay's TTL (whole seconds, rounded up; etcd may raise it to its minimum), in a
    /// transaction that deletes the lost grant's record `#g` (still at `g_mod`), so that
    /// of all who see the loss one holds the slot back. Losing that race is fine.
    #[allow(clippy::too_many_arguments)]
    async fn hold_back(
        &self,
        op: Op,
        key: &Key,
        names: &Names,
        slot: u32,
        g_mod: i64,
        delay: Duration,
        how: &str,
    ) -> Result<(), Error> {
        let secs = i64::try_from(server_ttl_of(delay)).unwrap_or(i64::MAX);
        let hold = random_lease_id();
        self.call(op, Some(key), |mut c, _| async move {
            match c
                .lease_grant(secs, Some(LeaseGrantOptions::new().with_id(hold)))
                .await
            {
                Ok(_) => Ok(()),
                Err(e) if is_lease_exists(&e) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await?;
        let value = serde_json::to_vec(&HoldValue {
            token: g_mod,
            how: how.to_owned(),
            lost_unix_ms: unix_ms(SystemTime::now()),
        })
        .map_err(|e| self.err(ErrorKind::InvalidInput, op, Some(key), e.to_string()))?;
        let txn = Txn::new()
            .when([
                Compare::mod_revision(names.grant(slot), CompareOp::Equal, g_mod),
                Compare::create_revision(names.slot(slot), CompareOp::Equal, 0),
                Compare::create_revision(names.hold(slot), CompareOp::Equal, 0),
            ])
            .and_then([
                TxnOp::put(
                    names.hold(slot),
                    value,
                    Some(PutOptions::new().with_lease(hold)),
                ),
                TxnOp::delete(names.grant(slot), None),
            ]);
        let resp = self
            .call(op, Some(key), |mut c, _| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await;
        if !resp.as_ref().is_ok_and(|r| r.succeeded()) {
            self.revoke_quiet(hold).await;
        }
        resp.map(|_| ())
    }

    /// How long the first hold-back of `view` still lasts, by etcd's lease clock (`None`:
    /// nothing is held back, or etcd did not say).
    async fn hold_left(&self, view: &View) -> Option<Duration> {
        let mut left: Option<Duration> = None;
        for (_, id, _) in &view.holds {
            if let Some(d) = self.lease_left(*id).await {
                left = Some(left.map_or(d, |l| l.min(d)));
            }
        }
        left.or_else(|| (!view.holds.is_empty()).then_some(Duration::ZERO))
    }

    /// What is left of etcd lease `id`'s TTL, as etcd says (`None`: it did not say).
    async fn lease_left(&self, id: i64) -> Option<Duration> {
        self.call(Op::Inspect, None, |mut c, _| async move {
            c.lease_time_to_live(id, None).await
        })
        .await
        .ok()
        .map(|r| r.ttl())
        .and_then(|t| u64::try_from(t).ok())
        .map(Duration::from_secs)
    }

    /// Finishes a grant: after a wait, one keep-alive so the keeper's first deadline counts
    /// from now; records the lease id for release and renew.
    #[allow(clippy::too_many_arguments)]
    async fn granted(
        &self,
        req: &AcquireRequest,
        _names: &Names,
        id: i64,
        slot: u32,
        limit: u32,
        token: i64,
        ttl: Duration,
        refreshed: Instant,
        waited: bool,
    ) -> Result<Lease, Error> {
        let sent_at = if waited {
            self.keep_alive(Op::Acquire, &req.key, id).await?
        } else {
            refreshed
        };
        let token = u64::try_from(token).map_err(|_| {
            self.err(
                ErrorKind::Corrupt,
                Op::Acquire,
                Some(&req.key),
                format!("etcd answered a negative revision {token}"),
            )
        })?;
        lock(&self.granted).insert(
            (req.key.as_str().to_owned(), token),
            Granted {
                id,
                server_ttl: server_ttl_of(ttl),
                refreshed: sent_at,
            },
        );
        Ok(Lease {
            key: req.key.clone(),
            slot,
            limit,
            token: Token(token),
            holder: req.holder.clone(),
            ttl: Some(ttl),
            acquired_unix_ms: unix_ms(SystemTime::now()),
            sent_at: Some(sent_at),
        })
    }

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

    async fn revoke(&self, op: Op, key: &Key, id: i64) -> Result<bool, Error> {
        self.call(op, Some(key), |mut c, _| async move {
            match c.lease_revoke(id).await {
                Ok(_) => Ok(true),
                Err(e) if is_lease_not_found(&e) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn release(self: &Arc<Self>, lease: &Lease) -> Result<Released, Error> {
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
        let resp = self
            .call(op, Some(&lease.key), |mut c, _| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await;
        let resp = match resp {
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
                .handle
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
        let resp = self
            .call(Op::Release, Some(&lease.key), |mut c, _| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    /// A pooled lease for a request with this TTL, if one is fresh enough.
    fn take_pooled(&self, ttl: Duration) -> Option<i64> {
        let want = server_ttl_of(ttl);
        let mut pool = lock(&self.pool);
        pool.retain(Granted::reusable);
        let i = pool.iter().position(|g| g.server_ttl == want)?;
        Some(pool.swap_remove(i).id)
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let op = Op::Renew;
        let lost = || {
            self.err(
                ErrorKind::Lost,
                op,
                Some(&lease.key),
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

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let op = Op::Inspect;
        let names = self.names(key);
        let view = self.read_view(op, key, &names).await?;
        let Some((limit, _)) = view.limit else {
            return Err(self.err(
                ErrorKind::NotFound,
                op,
                Some(key),
                "no such key (a key is created by its first acquire)",
            ));
        };
        let holder_of = |waiter: &str| -> (Option<Holder>, Option<String>) {
            let name = format!("{}{waiter}", names.waiters);
            match view.entries.iter().find(|e| e.key == name.as_bytes()) {
                None => (None, Some("its waiter key is gone (being released)".into())),
                Some(e) => match serde_json::from_slice::<WaiterValue>(&e.value) {
                    Ok(v) => (Some(v.holder), None),
                    Err(_) => (None, Some(format!("holder info unreadable ({name})"))),
                },
            }
        };
        let mut hold_left = HashMap::new();
        for (slot, id, _) in &view.holds {
            if let Some(left) = self.lease_left(*id).await {
                hold_left.insert(*slot, left);
            }
        }
        let hold_note = |s: u32| -> Option<String> {
            let d = format_duration(view.delay?);
            if let Some((_, _, value)) = view.holds.iter().find(|(slot, _, _)| *slot == s) {
                let until = hold_left.get(&s).map_or_else(
                    || "until its etcd lease ends".to_owned(),
                    |left| format!("for about another {}", format_duration(*left)),
                );
                let what = serde_json::from_slice::<HoldValue>(value)
                    .map(|h| {
                        let how = if h.how == "broken" {
                            "was broken"
                        } else {
                            "expired"
                        };
                        format!("the lease with token {} {how}", h.token)
                    })
                    .unwrap_or_else(|_| "a lease was lost".into());
                return Some(format!(
                    "held back: {what}; the lock-delay of {d} holds the slot back {until}"
                ));
            }
            view.orphans().iter().any(|(slot, _)| *slot == s).then(|| {
                format!("lost (expired): the next acquire holds the slot back for the lock-delay of {d}")
            })
        };
        let mut slots = Vec::new();
        for s in 0..limit {
            slots.push(match view.slots.iter().find(|x| x.slot == s) {
                None => SlotStatus {
                    note: hold_note(s),
                    ..SlotStatus::free(s)
                },
                Some(x) => {
                    let (holder, note) = holder_of(&x.value.waiter);
                    SlotStatus {
                        slot: s,
                        state: SlotState::Held,
                        token: u64::try_from(x.create_rev).ok().map(Token),
                        holder,
                        since_unix_ms: Some(x.value.acquired_unix_ms),
                        renewed_unix_ms: None,
                        expires_unix_ms: None,
                        note,
                    }
                }
            });
        }
        for x in view.slots.iter().filter(|x| x.slot >= limit) {
            let (holder, _) = holder_of(&x.value.waiter);
            slots.push(SlotStatus {
                slot: x.slot,
                state: SlotState::Held,
                token: u64::try_from(x.create_rev).ok().map(Token),
                holder,
                since_unix_ms: Some(x.value.acquired_unix_ms),
                renewed_unix_ms: None,
                expires_unix_ms: None,
                note: Some(format!(
                    "above the limit of {limit} (the key was resized down): held until released"
                )),
            });
        }
        let holding: Vec<String> = view.slots.iter().map(|s| s.value.waiter.clone()).collect();
        let waiters = view
            .entries
            .iter()
            .filter(|e| {
                let name = show(&e.key);
                let id = name.strip_prefix(&names.waiters).unwrap_or("");
                !holding.iter().any(|h| h == id) && !e.holder_dead()
            })
            .count();
        Ok(KeyStatus {
            key: key.clone(),
            limit,
            slots,
            waiters: Some(u32::try_from(waiters).unwrap_or(u32::MAX)),
            last_token: view
                .slots
                .iter()
                .map(|s| s.create_rev)
                .max()
                .and_then(|r| u64::try_from(r).ok())
                .map(Token),
            lock_delay_ms: view
                .delay
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        })
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        let op = Op::List;
        let prefix = format!("{}/", self.config.prefix);
        let resp = self
            .call(op, None, |mut c, _| {
                let p = prefix.clone();
                async move {
                    c.get(p, Some(GetOptions::new().with_prefix().with_keys_only()))
                        .await
                }
            })
            .await?;
        let mut keys = Vec::new();
        for kv in resp.kvs() {
            let name = show(kv.key());
            let Some(k) = name
                .strip_prefix(&prefix)
                .and_then(|n| n.strip_suffix("#limit"))
            else {
                continue;
            };
            keys.push(Key::new(k).map_err(|_| {
                self.err(
                    ErrorKind::Corrupt,
                    op,
                    None,
                    format!("{name} names '{k}', which is not a valid key"),
                )
            })?);
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let op = Op::Break;
        let names = self.names(key);
        let status = self.inspect(key).await.map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                self.err(ErrorKind::NotFound, op, Some(key), "no such key")
            } else {
                e
            }
        })?;
        let view = self.read_view(op, key, &names).await?;
        let mut freed = Vec::new();
        for s in &view.slots {
            let st = status.slots.iter().find(|x| x.slot == s.slot);
            let who = st.and_then(|x| x.holder.clone());
            if let Some(want) = holder {
                if who.as_ref().map(|h| h.id) != Some(want) {
                    continue;
                }
            }
            // Revoking the holder's lease deletes its slot and waiter keys at once; its next
            // renewal answers lost.
            let id = s.lease;
            let gone = self
                .call(op, Some(key), |mut c, _| async move {
                    match c.lease_revoke(id).await {
                        Ok(_) => Ok(true),
                        Err(e) if is_lease_not_found(&e) => Ok(false),
                        Err(e) => Err(e),
                    }
                })
                .await?;
            if let Some(delay) = view.delay {
                // The loss is the break: hold the slot back from now.
                if let Some((_, g_mod)) = view.grants.iter().find(|(slot, _)| *slot == s.slot) {
                    self.hold_back(op, key, &names, s.slot, *g_mod, delay, "broken")
                        .await?;
                }
            }
            freed.push(SlotStatus {
                slot: s.slot,
                state: SlotState::Free,
                token: u64::try_from(s.create_rev).ok().map(Token),
                holder: who,
                since_unix_ms: Some(s.value.acquired_unix_ms),
                renewed_unix_ms: None,
                expires_unix_ms: None,
                note: Some(if gone {
                    "freed by break; its holder's next renew answers lost".into()
                } else {
                    "had already expired; etcd removed it".into()
                }),
            });
        }
        Ok(freed)
    }

    async fn resize(&self, key: &Key, limit: u32) -> Result<KeyStatus, Error> {
        let op = Op::Resize;
        if limit == 0 {
            return Err(self.err(
                ErrorKind::InvalidInput,
                op,
                Some(key),
                "the limit must be at least 1 slot",
            ));
        }
        let names = self.names(key);
        let txn = Txn::new()
            .when([Compare::create_revision(
                names.limit.clone(),
                CompareOp::Greater,
                0,
            )])
            .and_then([TxnOp::put(names.limit.clone(), limit.to_string(), None)]);
        let resp = self
            .call(op, Some(key), |mut c, _| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(self.err(
                ErrorKind::NotFound,
                op,
                Some(key),
                "no such key (a key is created by its first acquire, with its limit)",
            ));
        }
        self.inspect(key).await
    }
}

/// The longest lock-delay a key can have.
const MAX_LOCK_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

fn parse_delay(names: &Names, kv: &KeyValue) -> Result<Duration, Error> {
    std::str::from_utf8(kv.value())
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_millis)
        .filter(|d| !d.is_zero() && *d <= MAX_LOCK_DELAY)
        .ok_or_else(|| {
            corrupt(format!(
                "{} holds {:?}, not a lock-delay (milliseconds, 1 or more)",
                names.delay,
                String::from_utf8_lossy(&kv.value()[..kv.value().len().min(40)])
            ))
        })
}

fn parse_limit(names: &Names, kv: &KeyValue) -> Result<u32, Error> {
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|n| *n >= 1)
        .ok_or_else(|| {
            corrupt(format!(
                "{} holds {:?}, not a limit (a number of slots, 1 or more)",
                names.limit,
                String::from_utf8_lossy(&kv.value()[..kv.value().len().min(40)])
            ))
        })
}

impl EtcdStore {
    /// Opens the etcd store the URL names. Does not connect: the first operation does,
    /// so this never blocks; an unreachable cluster shows as `Unavailable` then.
    pub fn open(url: &StoreUrl) -> Result<EtcdStore, Error> {
        let config = EtcdConfig::from_url(url)?;
        let runtime = RuntimeThread::start().map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                "cannot start the etcd client's threads",
            )
            .with_op(Op::Open)
            .with_store(url)
            .with_source(e)
        })?;
        let clients = config.endpoints.iter().map(|_| OnceCell::new()).collect();
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                url: url.clone(),
                config,
                runtime,
                clients,
                current: AtomicUsize::new(0),
                granted: Mutex::new(HashMap::new()),
                pool: Mutex::new(Vec::new()),
                wakeups: AtomicU64::new(0),
            }),
        })
    }

    /// The store's configuration (endpoints, prefix, timeouts).
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// How many times a watch event woke a waiting acquire of this handle (for tests that
    /// check a release wakes only the waiters it concerns).
    #[doc(hidden)]
    pub fn wakeups(&self) -> u64 {
        self.inner.wakeups.load(Ordering::Relaxed)
    }

    /// A barrier wait on the store's runtime. Whatever happens (a pass, an error, this
    /// future dropped), the arrival's etcd lease is revoked before the task ends, so no
    /// arrival outlives the call.
    async fn barrier_on_runtime(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        baton_core::barrier::validate(req)
            .map_err(|e| self.inner.ctx(e, Op::Barrier, Some(&req.key)))?;
        let id = random_lease_id();
        let (tx, rx) = oneshot::channel::<Result<BarrierPassed, Error>>();
        // Dropped with this future: the task then withdraws the arrival.
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let inner = Arc::clone(&self.inner);
        let req2 = req.clone();
        self.inner.runtime.handle.spawn(async move {
            let result = tokio::select! {
                r = inner.barrier_inner(&req2, id) => r,
                _ = cancel_rx => Err(inner.err(ErrorKind::Cancelled, Op::Barrier, Some(&req2.key), "cancelled")),
            };
            // Leaving (after a pass) or withdrawing (the generation key is unchanged, or
            // the wait was cancelled): the arrival goes with its lease.
            inner.revoke_quiet(id).await;
            let _ = tx.send(result);
        });
        let result = rx.await;
        drop(cancel_tx);
        result.unwrap_or_else(|_| {
            Err(self.inner.err(
                ErrorKind::Unavailable,
                Op::Barrier,
                Some(&req.key),
                "the etcd client's task stopped",
            ))
        })
    }

    /// Runs `f` on the store's runtime and waits for it from any runtime.
    async fn on_runtime<T: Send + 'static, Fut>(
        &self,
        op: Op,
        key: Option<&Key>,
        f: impl FnOnce(Arc<Inner>) -> Fut,
    ) -> Result<T, Error>
    where
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let fut = f(Arc::clone(&self.inner));
        match self.inner.runtime.handle.spawn(fut).await {
            Ok(r) => r,
            Err(e) => Err(self
                .inner
                .err(
                    ErrorKind::Unavailable,
                    op,
                    key,
                    "the etcd client's task failed",
                )
                .with_source(e)),
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    fn url(&self) -> &StoreUrl {
        &self.inner.url
    }

    fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::new(
            "within the lease's TTL (30s unless the request sets one; etcd counts whole \
             seconds, 2s at least) after its holder dies",
        );
        c.renew = true;
        c.break_lease = true;
        c.resize = true;
        c.fifo = true;
        c.lock_delay = true;
        c
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        req.validate()
            .map_err(|e| self.inner.ctx(e, Op::Acquire, Some(&req.key)))?;
        let pooled = self.inner.take_pooled(req.ttl.unwrap_or(DEFAULT_TTL));
        let id = pooled.unwrap_or_else(random_lease_id);
        let (tx, rx) = oneshot::channel::<Result<Lease, Error>>();
        // Dropped with this future: the task then gives up and cleans up.
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let inner = Arc::clone(&self.inner);
        let req2 = req.clone();
        self.inner.runtime.handle.spawn(async move {
            let result = tokio::select! {
                r = inner.acquire_inner(&req2, id, pooled.is_some()) => r,
                _ = cancel_rx => Err(inner.err(ErrorKind::Cancelled, Op::Acquire, Some(&req2.key), "cancelled")),
            };
            match result {
                Ok(lease) => {
                    if let Err(Ok(lease)) = tx.send(Ok(lease)) {
                        // Nobody waits for it any more: give it back.
                        let _ = inner.release(&lease).await;
                    }
                }
                Err(e) => {
                    // A request that reached no member may still be delivered later; if
                    // the clean-up could not confirm either, a grant may exist (it expires
                    // with its lease).
                    let e = if !inner.revoke_quiet(id).await && e.kind() == ErrorKind::Unavailable {
                        e.with_grant_unknown()
                    } else {
                        e
                    };
                    let _ = tx.send(Err(e));
                }
            }
        });
        let result = rx.await;
        drop(cancel_tx);
        result.unwrap_or_else(|_| {
            Err(self.inner.err(
                ErrorKind::Unavailable,
                Op::Acquire,
                Some(&req.key),
                "the etcd client's task stopped",
            ))
        })
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        let l = lease.clone();
        self.on_runtime(Op::Release, Some(&lease.key), |inner| async move {
            inner.release(&l).await
        })
        .await
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let inner = Arc::clone(&self.inner);
        let l = lease.clone();
        self.inner.runtime.handle.spawn(async move {
            let _ = tx.send(inner.release(&l).await.is_ok());
        });
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or(false)
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let k = key.clone();
        self.on_runtime(Op::Inspect, Some(key), |inner| async move {
            inner.inspect(&k).await
        })
        .await
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        self.on_runtime(Op::List, None, |inner| async move { inner.list().await })
            .await
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let l = lease.clone();
        self.on_runtime(Op::Renew, Some(&lease.key), |inner| async move {
            inner.renew(&l).await
        })
        .await
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let k = key.clone();
        self.on_runtime(Op::Break, Some(key), |inner| async move {
            inner.break_lease(&k, holder).await
        })
        .await
    }

    async fn resize(&self, key: &Key, limit: u32) -> Result<KeyStatus, Error> {
        let k = key.clone();
        self.on_runtime(Op::Resize, Some(key), |inner| async move {
            inner.resize(&k, limit).await
        })
        .await
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        self.barrier_on_runtime(req).await
    }
}
