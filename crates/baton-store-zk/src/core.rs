//! The connection: a long-lived session for reading and administration, one shared
//! session per lease TTL for the leases and waiting requests of this handle (its timeout
//! is that TTL), every call bounded by the URL's timeout, and the one mapping of
//! ZooKeeper's errors into `baton_core::Error`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use baton_core::kit::runtime::StoreRuntime;
use baton_core::{Error, ErrorKind, StoreUrl};
use tokio::sync::Mutex;
use zookeeper_client as zk;

use crate::config::ZkConfig;
use crate::layout;

/// The session timeout of the store's own reading session.
const ADMIN_SESSION: Duration = Duration::from_secs(10);

/// The process that first opened a ZooKeeper session in this memory image (0: none yet).
/// `zookeeper-client` does its I/O through `async-io`, whose reactor is process-wide and
/// driven by a thread spawned once per process: a forked child inherits the reactor but
/// not its thread, and its connects are never woken. A child whose parent never connected
/// is unaffected.
static FIRST_PID: AtomicU32 = AtomicU32::new(0);

/// Refuses, clearly, to connect from a forked child of a process that used the client.
fn check_not_forked(hosts: &str) -> Result<(), Error> {
    let me = std::process::id();
    match FIRST_PID.compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => Ok(()),
        Err(first) if first == me => Ok(()),
        Err(first) => Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "ZooKeeper at {hosts}: cannot connect from a forked child (pid {me}) of a                  process that used the ZooKeeper client (pid {first}): the client's I/O                  reactor (async-io) does not survive fork(); open the store in a process                  started with exec (Python: multiprocessing's spawn or forkserver), or only                  after forking"
            ),
        )
        .permanent()),
    }
}

/// A granted lease's session and nodes, kept while the lease is held from this handle.
pub(crate) struct Held {
    pub(crate) client: zk::Client,
    pub(crate) node: String,
    pub(crate) slot_node: String,
}

/// The ZooKeeper store's state and operations, run on its runtime as [`crate::ZkStore`].
pub struct Inner {
    pub(crate) url: StoreUrl,
    pub(crate) config: ZkConfig,
    pub(crate) runtime: StoreRuntime,
    admin: Mutex<Option<zk::Client>>,
    /// The sessions this handle's requests and leases run in, by TTL (the session
    /// timeout asked for): shared, as a kazoo or Curator client shares its one session, so
    /// a lease costs no session of its own (see `lease_session`).
    sessions: Mutex<HashMap<Duration, zk::Client>>,
    /// Leases granted through this handle, by key and token.
    pub(crate) held: StdMutex<HashMap<(String, u64), Arc<Held>>>,
    /// How many times a watch woke a waiting acquire of this handle (not a timeout).
    pub(crate) wakeups: AtomicU64,
}

impl Inner {
    pub(crate) fn new(url: StoreUrl, config: ZkConfig, runtime: StoreRuntime) -> Inner {
        Inner {
            url,
            config,
            runtime,
            admin: Mutex::new(None),
            sessions: Mutex::new(HashMap::new()),
            held: StdMutex::new(HashMap::new()),
            wakeups: AtomicU64::new(0),
        }
    }

    /// A new session with the given timeout (the server bounds it by its own
    /// `minSessionTimeout`/`maxSessionTimeout`; the negotiated value is the client's).
    pub(crate) async fn session(&self, timeout: Duration) -> Result<zk::Client, Error> {
        check_not_forked(&self.config.hosts)?;
        let connect = zk::Client::connector()
            .with_session_timeout(timeout)
            .with_connection_timeout(self.config.timeout)
            .with_fail_eagerly()
            .connect(&self.config.hosts);
        let c = self.bounded(connect).await?;
        self.ensure_root(&c).await?;
        Ok(c)
    }

    async fn ensure_root(&self, c: &zk::Client) -> Result<(), Error> {
        let opts = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        let dir = layout::keys_dir(&self.config.root);
        match self.bounded(c.check_stat(&dir)).await? {
            Some(_) => Ok(()),
            None => match self.bounded(c.mkdir(&dir, &opts)).await {
                Ok(()) => Ok(()),
                Err(e) if e.message().contains("node already exists") => Ok(()),
                Err(e) => Err(e),
            },
        }
    }

    /// The store's own session for reading and administration, reconnected when it ends.
    pub(crate) async fn admin(&self) -> Result<zk::Client, Error> {
        let mut g = self.admin.lock().await;
        if let Some(c) = g.as_ref() {
            if !c.state().is_terminated() {
                return Ok(c.clone());
            }
        }
        let c = self.session(ADMIN_SESSION).await?;
        *g = Some(c.clone());
        Ok(c)
    }

    /// The session for requests and leases with this TTL: the handle's live one, or a new
    /// one. Every lease in it ends when it ends (its keeper learns at its next renewal),
    /// and its server expires it no sooner than its timeout after the last request any of
    /// them sent, so each lease's own deadline (send time of its last answered request +
    /// TTL) still comes first.
    pub(crate) async fn lease_session(&self, ttl: Duration) -> Result<zk::Client, Error> {
        let mut g = self.sessions.lock().await;
        if let Some(c) = g.get(&ttl) {
            if !c.state().is_terminated() {
                return Ok(c.clone());
            }
        }
        let c = self.session(ttl).await?;
        g.insert(ttl, c.clone());
        Ok(c)
    }

    /// One call, bounded by the URL's timeout.
    pub(crate) async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, zk::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.config.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.map(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "ZooKeeper at {} did not answer within {:?}",
                    self.config.hosts, self.config.timeout
                ),
            )),
        }
    }

    /// A call whose answer is wanted raw (`NoNode`, `NodeExists` decide what happens).
    pub(crate) async fn raw<T>(
        &self,
        fut: impl Future<Output = Result<T, zk::Error>>,
    ) -> Result<Result<T, zk::Error>, Error> {
        tokio::time::timeout(self.config.timeout, fut)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "ZooKeeper at {} did not answer within {:?}",
                        self.config.hosts, self.config.timeout
                    ),
                )
            })
    }

    pub(crate) fn map(&self, e: zk::Error) -> Error {
        let head = format!("ZooKeeper at {}", self.config.hosts);
        match e {
            zk::Error::SessionExpired => {
                Error::new(ErrorKind::Lost, format!("{head}: the session expired"))
            }
            zk::Error::ConnectionLoss
            | zk::Error::NoHosts
            | zk::Error::Timeout
            | zk::Error::Throttled
            | zk::Error::ClientClosed => {
                Error::new(ErrorKind::Unavailable, format!("{head}: {e}")).with_source(e)
            }
            // The client's own connection errors ("no response from connection in …").
            zk::Error::Custom(_) | zk::Error::UnexpectedError(_) => {
                Error::new(ErrorKind::Unavailable, format!("{head}: {e}")).with_source(e)
            }
            zk::Error::NoAuth | zk::Error::AuthFailed | zk::Error::InvalidAcl => Error::new(
                ErrorKind::Unavailable,
                format!("{head} refused the access: {e}"),
            )
            .permanent(),
            zk::Error::NoChildrenForEphemerals => layout::corrupt(format!(
                "an ephemeral node stands where a key node belongs ({e})"
            )),
            _ => Error::new(ErrorKind::Unavailable, format!("{head} failed: {e}"))
                .with_source(e)
                .permanent(),
        }
    }

    pub(crate) fn held(&self, key: &str, token: u64) -> Option<Arc<Held>> {
        self.held
            .lock()
            .ok()?
            .get(&(key.to_owned(), token))
            .cloned()
    }

    pub(crate) fn forget(&self, key: &str, token: u64) -> Option<Arc<Held>> {
        self.held.lock().ok()?.remove(&(key.to_owned(), token))
    }

    pub(crate) fn keep(&self, key: &str, token: u64, held: Held) {
        if let Ok(mut m) = self.held.lock() {
            m.insert((key.to_owned(), token), Arc::new(held));
        }
    }
}
