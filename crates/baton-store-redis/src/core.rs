//! The connection to Redis: one multiplexed connection per store handle for the scripts
//! (reconnected after a failure), a connection of its own for each waiting request's
//! `BLPOP`, the server checks made on every new connection, and the one mapping of
//! Redis's failures into [`baton_core::Error`].
//!
//! Guarantees: every round trip is bounded by the URL's `timeout`; a connection that
//! failed or timed out is dropped and the next call connects anew, so a restarted server
//! is found again. A server baton cannot keep its contract on (Redis Cluster, a replica,
//! a Sentinel, an eviction policy other than `noeviction`, and without `?durable=off` no
//! `appendonly yes` + `appendfsync always`) is refused with the reason and the fix,
//! marked permanent. Scripts are sent by SHA and reloaded when the server lost them.

use std::time::Duration;

use baton_core::kit::runtime::StoreRuntime;
use baton_core::{Error, ErrorKind, StoreUrl};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Script, Value};
use tokio::sync::Mutex;

use crate::config::{Durability, RedisConfig};
use crate::layout;

/// The store's scripts, loaded by SHA.
pub(crate) struct Scripts {
    pub(crate) attempt: Script,
    pub(crate) renew: Script,
    pub(crate) release: Script,
    pub(crate) withdraw: Script,
    pub(crate) inspect: Script,
    pub(crate) break_: Script,
    pub(crate) resize: Script,
    pub(crate) delete: Script,
    pub(crate) arrive: Script,
    pub(crate) look: Script,
    pub(crate) leave: Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| Script::new(&format!("{}{body}", layout::PRELUDE));
        let b = |body: &str| {
            Script::new(&format!(
                "{}{}{body}",
                layout::PRELUDE,
                layout::BARRIER_PRELUDE
            ))
        };
        Scripts {
            attempt: s(layout::ATTEMPT),
            renew: s(layout::RENEW),
            release: s(layout::RELEASE),
            withdraw: s(layout::WITHDRAW),
            inspect: s(layout::INSPECT),
            break_: s(layout::BREAK),
            resize: s(layout::RESIZE),
            delete: s(layout::DELETE),
            arrive: b(layout::BARRIER_ARRIVE),
            look: b(layout::BARRIER_LOOK),
            leave: b(layout::BARRIER_LEAVE),
        }
    }
}

/// The Redis store's state and operations, run on its runtime as [`crate::RedisStore`].
pub struct Inner {
    pub(crate) url: StoreUrl,
    pub(crate) config: RedisConfig,
    pub(crate) runtime: StoreRuntime,
    client: Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    pub(crate) scripts: Scripts,
}

/// The answer of a script: its values as text.
pub(crate) type Answer = Vec<String>;

impl Inner {
    pub(crate) fn new(
        url: StoreUrl,
        config: RedisConfig,
        runtime: StoreRuntime,
    ) -> Result<Inner, Error> {
        let info = redis::ConnectionInfo {
            addr: redis::ConnectionAddr::Tcp(config.host.clone(), config.port),
            redis: redis::RedisConnectionInfo {
                db: config.db,
                username: config.user.clone(),
                password: config.password.clone(),
                ..Default::default()
            },
        };
        let client = Client::open(info).map_err(|e| {
            Error::new(ErrorKind::InvalidInput, "the Redis client refused the URL").with_source(e)
        })?;
        Ok(Inner {
            url,
            config,
            runtime,
            client,
            conn: Mutex::new(None),
            scripts: Scripts::new(),
        })
    }

    fn where_(&self) -> String {
        format!("{}:{}", self.config.host, self.config.port)
    }

    /// A new connection: with the request timeout on every answer (`scripts`), or with
    /// none (a waiter's `BLPOP`, bounded by its caller), checked before use.
    pub(crate) async fn connect(&self, bounded: bool) -> Result<MultiplexedConnection, Error> {
        let mut cfg = AsyncConnectionConfig::new().set_connection_timeout(self.config.timeout);
        if bounded {
            cfg = cfg.set_response_timeout(self.config.timeout);
        }
        let bound = self.config.timeout * 2;
        let mut c = match tokio::time::timeout(
            bound,
            self.client
                .get_multiplexed_async_connection_with_config(&cfg),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.map(e)),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "Redis at {} did not answer within {:?}",
                        self.where_(),
                        bound
                    ),
                ))
            }
        };
        if bounded {
            self.check_server(&mut c).await?;
        }
        Ok(c)
    }

    /// The scripts' connection, connected (and checked) when there is none.
    pub(crate) async fn conn(&self) -> Result<MultiplexedConnection, Error> {
        let mut g = self.conn.lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let c = self.connect(true).await?;
        *g = Some(c.clone());
        Ok(c)
    }

    async fn drop_conn(&self) {
        *self.conn.lock().await = None;
    }

    /// Refuses a server baton cannot keep its contract on.
    async fn check_server(&self, c: &mut MultiplexedConnection) -> Result<(), Error> {
        let info: String = self.bounded(redis::cmd("INFO").query_async(c)).await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let refuse = |why: String| Error::new(ErrorKind::Unavailable, why).permanent();
        if field("redis_mode") == Some("sentinel") {
            return Err(refuse(format!(
                "{} is a Redis Sentinel, not a data server: point baton at the primary itself \
                 (Sentinel failover is not supported: it can lose leases and tokens)",
                self.where_()
            )));
        }
        if field("cluster_enabled") == Some("1") {
            return Err(refuse(format!(
                "{} runs Redis Cluster, which baton does not support: replication is \
                 asynchronous, so a failover can lose leases and tokens; use one primary",
                self.where_()
            )));
        }
        if field("role") == Some("slave") {
            return Err(refuse(format!(
                "{} is a replica (role:slave): point baton at the primary",
                self.where_()
            )));
        }
        if let Some(p) = field("maxmemory_policy") {
            if p != "noeviction" {
                return Err(refuse(format!(
                    "{} has maxmemory-policy {p}: Redis may evict lock records and tokens when \
                     memory runs short; set `maxmemory-policy noeviction`",
                    self.where_()
                )));
            }
        }
        if self.config.durable == Durability::Require {
            let fix = "set `appendonly yes` and `appendfsync always` on the server, or accept \
                       tokens that can go back after a server crash with ?durable=off";
            if field("aof_enabled") != Some("1") {
                return Err(refuse(format!(
                    "{} does not write an append-only file (appendonly no), so a restart can \
                     hand out tokens again: {fix}",
                    self.where_()
                )));
            }
            let fsync: Result<Vec<String>, Error> = self
                .bounded(
                    redis::cmd("CONFIG")
                        .arg("GET")
                        .arg("appendfsync")
                        .query_async(c),
                )
                .await;
            match fsync {
                Ok(v) if v.get(1).map(String::as_str) == Some("always") => {}
                Ok(v) => {
                    return Err(refuse(format!(
                        "{} has appendfsync {}, so a crash can lose the last tokens: {fix}",
                        self.where_(),
                        v.get(1).map(String::as_str).unwrap_or("(unknown)")
                    )))
                }
                Err(e) => {
                    return Err(refuse(format!(
                        "cannot read appendfsync from {} ({}): {fix}",
                        self.where_(),
                        e.message()
                    )))
                }
            }
        }
        Ok(())
    }

    /// `fut` bounded by the request timeout, its failure mapped.
    pub(crate) async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.config.timeout + Duration::from_millis(100), fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.map(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "Redis at {} did not answer within {:?}",
                    self.where_(),
                    self.config.timeout
                ),
            )),
        }
    }

    /// Runs `script` with `args` (the base name first); a failed connection is dropped.
    pub(crate) async fn run(&self, script: &Script, args: &[String]) -> Result<Answer, Error> {
        let mut c = self.conn().await?;
        let mut inv = script.prepare_invoke();
        for a in args {
            inv.arg(a);
        }
        let r: Result<Value, Error> = self.bounded(inv.invoke_async(&mut c)).await;
        match r {
            Ok(v) => answer(v),
            Err(e) => {
                if e.kind() == ErrorKind::Unavailable && e.is_retryable() {
                    self.drop_conn().await;
                }
                Err(e)
            }
        }
    }

    /// Maps a Redis failure.
    pub(crate) fn map(&self, e: redis::RedisError) -> Error {
        if e.code() == Some("CORRUPT") {
            // Redis appends where in the script the error rose: not the user's concern.
            let detail = e.detail().unwrap_or("a record is not baton's");
            let detail = detail.split(" script: ").next().unwrap_or(detail);
            return layout::corrupt(detail.trim_end());
        }
        let head = format!("Redis at {}", self.where_());
        if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
        {
            return Error::new(ErrorKind::Unavailable, format!("{head}: {e}")).with_source(e);
        }
        match e.code() {
            Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "MISCONF") => Error::new(
                ErrorKind::Unavailable,
                format!("{head} cannot serve now: {e}"),
            )
            .with_source(e),
            Some("NOAUTH" | "WRONGPASS" | "NOPERM") => Error::new(
                ErrorKind::Unavailable,
                format!("{head} refused the credentials or the access: {e}"),
            )
            .permanent(),
            Some("WRONGTYPE") => layout::corrupt(format!("a Redis key of the wrong type ({e})")),
            Some("READONLY") => Error::new(
                ErrorKind::Unavailable,
                format!("{head} is read-only (a replica?): point baton at the primary ({e})"),
            )
            .permanent(),
            _ => Error::new(ErrorKind::Unavailable, format!("{head} failed: {e}"))
                .with_source(e)
                .permanent(),
        }
    }
}

/// A script's answer as text values; `Unavailable` for anything else.
fn answer(v: Value) -> Result<Answer, Error> {
    let Value::Array(items) = v else {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!("Redis answered a script with {v:?}, not a list"),
        ));
    };
    Ok(items
        .into_iter()
        .map(|i| match i {
            Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            Value::SimpleString(s) => s,
            Value::Int(n) => n.to_string(),
            Value::Okay => "OK".into(),
            Value::Nil => String::new(),
            other => format!("{other:?}"),
        })
        .collect())
}
