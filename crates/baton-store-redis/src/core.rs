//! The connection to Redis: the scripts' connections (each lent to one operation at a
//! time, [`crate::direct`], kept idle between operations), a connection of its own for
//! each waiting request's `BLPOP`, the server checks made on every new connection, and the
//! one mapping of Redis's failures into [`baton_core::Error`].
//!
//! Guarantees: every round trip is bounded by the URL's `timeout`; a connection that
//! failed or timed out, or whose operation was cancelled mid-command, is dropped and the
//! next call connects anew, so a restarted server is found again. A server baton cannot keep its contract on (Redis Cluster, a replica,
//! a Sentinel, an eviction policy other than `noeviction`, and without `?durable=off` no
//! `appendonly yes` + `appendfsync always`) is refused with the reason and the fix,
//! marked permanent. Scripts are sent by SHA and reloaded when the server lost them.

use std::time::Duration;

use baton_core::kit::runtime::StoreRuntime;
use baton_core::{Error, ErrorKind, StoreUrl};
use redis::{Script, Value};

use crate::direct::Direct;

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
    /// The scripts' idle connections.
    idle: std::sync::Mutex<Vec<Direct>>,
    pub(crate) scripts: Scripts,
}

/// How many idle script connections a handle keeps (more are made while operations
/// overlap, and closed after).
const IDLE_MAX: usize = 4;

/// The answer of a script: its values as text.
pub(crate) type Answer = Vec<String>;

impl Inner {
    pub(crate) fn new(
        url: StoreUrl,
        config: RedisConfig,
        runtime: StoreRuntime,
    ) -> Result<Inner, Error> {
        Ok(Inner {
            url,
            config,
            runtime,
            idle: std::sync::Mutex::new(Vec::new()),
            scripts: Scripts::new(),
        })
    }

    fn where_(&self) -> String {
        format!("{}:{}", self.config.host, self.config.port)
    }

    /// A script connection for one operation: an idle one, or a new one (checked).
    pub(crate) async fn conn(&self) -> Result<Direct, Error> {
        let idle = self.idle.lock().map(|mut g| g.pop()).unwrap_or(None);
        if let Some(c) = idle {
            return Ok(c);
        }
        let mut c = self.connect().await?;
        self.check_server(&mut c).await?;
        Ok(c)
    }

    /// A new connection, connected and authenticated within twice the request timeout
    /// (not checked: a waiter's `BLPOP` connection, whose store checked its server).
    pub(crate) async fn connect(&self) -> Result<Direct, Error> {
        let bound = self.config.timeout * 2;
        let cfg = &self.config;
        let connect = Direct::connect(
            &cfg.host,
            cfg.port,
            cfg.user.as_deref(),
            cfg.password.as_deref(),
            cfg.db,
        );
        match tokio::time::timeout(bound, connect).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.map(e)),
            Err(_) => Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "Redis at {} did not answer within {:?}",
                    self.where_(),
                    bound
                ),
            )),
        }
    }

    /// Gives back a connection after its operation: kept if every command on it was
    /// answered whole, else closed.
    pub(crate) fn put_back(&self, c: Direct) {
        if !c.reusable() {
            return;
        }
        if let Ok(mut g) = self.idle.lock() {
            if g.len() < IDLE_MAX {
                g.push(c);
            }
        }
    }

    /// Refuses a server baton cannot keep its contract on.
    async fn check_server(&self, c: &mut impl redis::aio::ConnectionLike) -> Result<(), Error> {
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
        self.put_back(c);
        r.and_then(answer)
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
