//! The connections: one of its own per acquire (it becomes the lease's connection, whose
//! heartbeat timeout is half the lease's TTL), one shared for reading and administration; every call
//! bounded by the URL's timeout; queue declarations; and the one mapping of lapin's
//! errors into `baton_core::Error`.
//!
//! lapin's automatic recovery stays off: a recovered connection would not hold what the
//! old one held (its unacknowledged slot, its place among the waiters), so a lease never
//! survives its connection.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use baton_core::kit::runtime::StoreRuntime;
use baton_core::{Error, ErrorKind, StoreUrl};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Queue};
use tokio::sync::Mutex;

use crate::config::AmqpConfig;

/// The heartbeat of the store's own reading connection, in seconds.
pub(crate) const ADMIN_HEARTBEAT: u16 = 10;

/// A granted lease's connection and channel, kept while the lease is held from this
/// handle. The slot is the unacknowledged delivery on `channel`.
pub(crate) struct Held {
    pub(crate) conn: Arc<Connection>,
    pub(crate) channel: Channel,
    /// The exclusive queue that proves the grant to readers (`layout::Names::held`).
    pub(crate) proof: String,
    /// The slot's record queue and the holder's record in it.
    pub(crate) record_queue: String,
    pub(crate) record: crate::layout::Record,
}

/// What a passive declaration of a queue found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Found {
    /// The queue exists: its ready messages and consumers.
    Queue { messages: u32, consumers: u32 },
    /// It exists and is exclusive to another connection.
    Locked,
    /// There is no such queue.
    Missing,
}

/// How many channels the admin connection opens before it is replaced. Its looks open a
/// channel each (a passive declaration of a missing queue closes its channel), and once
/// the channel numbers wrap past the broker's `channel_max` (2047 by default) lapin 4.12
/// answers a reused number with the error of the channel that had it before: the first
/// look at a key not made yet then came back hundreds of grants later as "no queue
/// …gate". A new connection long before the wrap keeps that from happening.
const ADMIN_CHANNELS: u32 = 1000;

/// The RabbitMQ store's state and operations, run on its runtime as [`crate::AmqpStore`].
pub struct Inner {
    pub(crate) url: StoreUrl,
    pub(crate) config: AmqpConfig,
    pub(crate) runtime: StoreRuntime,
    admin: Mutex<Option<Arc<Connection>>>,
    /// Channels opened on the current admin connection (see [`ADMIN_CHANNELS`]).
    admin_channels: AtomicU32,
    /// The current admin connection's address, to count its channels.
    admin_at: AtomicUsize,
    /// Leases granted through this handle, by key and token.
    held: StdMutex<HashMap<(String, u64), Arc<Held>>>,
}

/// Queue arguments: `x-queue-type=quorum`, with single-active-consumer when `sac`.
pub(crate) fn quorum(sac: bool) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if sac {
        t.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    t
}

/// A persistent message's properties.
pub(crate) fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// The soft (channel) error of a broker's answer, if it was one.
pub(crate) fn soft(e: &lapin::Error) -> Option<AMQPSoftError> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => match p.kind() {
            AMQPErrorKind::Soft(s) => Some(s.clone()),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

impl Inner {
    pub(crate) fn new(url: StoreUrl, config: AmqpConfig, runtime: StoreRuntime) -> Inner {
        Inner {
            url,
            config,
            runtime,
            admin: Mutex::new(None),
            admin_channels: AtomicU32::new(0),
            admin_at: AtomicUsize::new(0),
            held: StdMutex::new(HashMap::new()),
        }
    }

    fn broker(&self) -> String {
        format!("RabbitMQ at {}:{}", self.config.host, self.config.port)
    }

    /// A new connection whose heartbeat timeout is `heartbeat` seconds, without automatic
    /// recovery.
    pub(crate) async fn connect(&self, heartbeat: u16) -> Result<Arc<Connection>, Error> {
        let uri = self.config.uri(Some(heartbeat));
        let props = ConnectionProperties::default().with_connection_name("baton".into());
        Ok(Arc::new(
            self.bounded(Connection::connect_uri(uri, props)).await?,
        ))
    }

    /// The store's own connection for reading and administration, reconnected when it
    /// ends.
    /// It is replaced (the old one closes when its last user lets go) before it has
    /// opened [`ADMIN_CHANNELS`] channels.
    pub(crate) async fn admin(&self) -> Result<Arc<Connection>, Error> {
        let mut g = self.admin.lock().await;
        if let Some(c) = g.as_ref() {
            if c.status().connected()
                && self.admin_channels.load(Ordering::Relaxed) < ADMIN_CHANNELS
            {
                return Ok(Arc::clone(c));
            }
        }
        let c = self.connect(ADMIN_HEARTBEAT).await?;
        self.admin_channels.store(0, Ordering::Relaxed);
        self.admin_at
            .store(Arc::as_ptr(&c) as usize, Ordering::Relaxed);
        *g = Some(Arc::clone(&c));
        Ok(c)
    }

    /// A new channel on `conn`.
    pub(crate) async fn channel(&self, conn: &Connection) -> Result<Channel, Error> {
        if std::ptr::eq(
            conn,
            self.admin_at.load(Ordering::Relaxed) as *const Connection,
        ) {
            self.admin_channels.fetch_add(1, Ordering::Relaxed);
        }
        self.bounded(conn.create_channel()).await
    }

    /// A new channel on `conn` in confirm mode.
    pub(crate) async fn confirm_channel(&self, conn: &Connection) -> Result<Channel, Error> {
        let ch = self.channel(conn).await?;
        self.bounded(ch.confirm_select(ConfirmSelectOptions::default()))
            .await?;
        Ok(ch)
    }

    /// Publishes `body` to `queue` (through the default exchange) and waits for the
    /// broker's confirm; `ch` must be in confirm mode.
    pub(crate) async fn publish(
        &self,
        ch: &Channel,
        queue: &str,
        body: &[u8],
    ) -> Result<(), Error> {
        let confirm = self
            .bounded(ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                persistent(),
            ))
            .await?;
        let c = self.bounded(confirm).await?;
        if c.is_ack() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Unavailable,
                format!("{} refused a message for {queue}", self.broker()),
            ))
        }
    }

    /// Declares `queue` (durable) with `args`, creating it if needed.
    pub(crate) async fn declare(
        &self,
        ch: &Channel,
        queue: &str,
        args: FieldTable,
    ) -> Result<Queue, Error> {
        self.bounded(ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), args))
            .await
    }

    /// What a passive declaration of `queue` finds, on a channel of its own (the broker
    /// closes a channel whose passive declaration fails).
    pub(crate) async fn look(&self, conn: &Connection, queue: &str) -> Result<Found, Error> {
        let ch = self.channel(conn).await?;
        let opts = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let r = self
            .raw(ch.queue_declare(queue.into(), opts, FieldTable::default()))
            .await?;
        match r {
            Ok(q) => {
                let _ = self.bounded(ch.close(200, "OK".into())).await;
                Ok(Found::Queue {
                    messages: q.message_count(),
                    consumers: q.consumer_count(),
                })
            }
            Err(e) => match soft(&e) {
                Some(AMQPSoftError::NOTFOUND) => Ok(Found::Missing),
                Some(AMQPSoftError::RESOURCELOCKED) => Ok(Found::Locked),
                _ => Err(self.map(e)),
            },
        }
    }

    /// One call, bounded by the URL's timeout.
    pub(crate) async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<T, Error> {
        match self.raw(fut).await? {
            Ok(v) => Ok(v),
            Err(e) => Err(self.map(e)),
        }
    }

    /// A call whose answer is wanted raw (`NOT_FOUND`, `RESOURCE_LOCKED` decide what
    /// happens), bounded by the URL's timeout.
    pub(crate) async fn raw<T>(
        &self,
        fut: impl Future<Output = Result<T, lapin::Error>>,
    ) -> Result<Result<T, lapin::Error>, Error> {
        self.within(self.config.timeout, fut).await
    }

    /// `fut`, bounded by `bound`.
    pub(crate) async fn within<T>(
        &self,
        bound: Duration,
        fut: impl Future<Output = T>,
    ) -> Result<T, Error> {
        tokio::time::timeout(bound, fut).await.map_err(|_| {
            Error::new(
                ErrorKind::Unavailable,
                format!("{} did not answer within {:?}", self.broker(), bound),
            )
        })
    }

    pub(crate) fn map(&self, e: lapin::Error) -> Error {
        let head = self.broker();
        if let Some(s) = soft(&e) {
            return match s {
                AMQPSoftError::ACCESSREFUSED => Error::new(
                    ErrorKind::Unavailable,
                    format!("{head} refused the access: {e}"),
                )
                .permanent(),
                AMQPSoftError::PRECONDITIONFAILED => Error::new(
                    ErrorKind::Corrupt,
                    format!("{head}: a queue of baton's is not as baton declares it: {e}"),
                ),
                _ => Error::new(ErrorKind::Unavailable, format!("{head}: {e}")).with_source(e),
            };
        }
        match e.kind() {
            lapin::ErrorKind::ProtocolError(p)
                if matches!(
                    p.kind(),
                    AMQPErrorKind::Hard(lapin::protocol::AMQPHardError::NOTALLOWED)
                ) =>
            {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("{head} refused the connection (vhost or user): {e}"),
                )
                .permanent()
            }
            _ => Error::new(ErrorKind::Unavailable, format!("{head}: {e}")).with_source(e),
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
