//! A connection of one caller at a time: the command is written and its answer read by
//! the task that sends it, with no driver task between them (the redis crate's
//! multiplexed connection hands every command to a task of its own and the answer back).
//! [`crate::core::Inner`] keeps the idle ones and lends one to each operation.
//!
//! Guarantees: an answer is read whole before the connection is lent again; a
//! connection whose command failed on the wire, or whose caller went away mid-command,
//! is dropped (never lent again), so an answer can never be read by the wrong command.

use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One TCP connection to the server, speaking RESP2.
pub(crate) struct Direct {
    io: BufReader<TcpStream>,
    frame: Vec<u8>,
    db: i64,
    /// A command failed on the wire: what comes next on it is unknown.
    broken: bool,
}

impl Direct {
    /// Connects to `host:port`, authenticates and selects `db` (the caller bounds it).
    pub(crate) async fn connect(
        host: &str,
        port: u16,
        user: Option<&str>,
        password: Option<&str>,
        db: i64,
    ) -> RedisResult<Direct> {
        let s = TcpStream::connect((host, port)).await?;
        s.set_nodelay(true)?;
        let mut c = Direct {
            io: BufReader::new(s),
            frame: Vec::new(),
            db,
            broken: false,
        };
        if let Some(p) = password {
            let mut auth = redis::cmd("AUTH");
            if let Some(u) = user {
                auth.arg(u);
            }
            auth.arg(p);
            c.call(&auth.get_packed_command()).await?;
        }
        if db != 0 {
            c.call(&redis::cmd("SELECT").arg(db).get_packed_command())
                .await?;
        }
        Ok(c)
    }

    /// Whether the connection may carry another command: every command on it was
    /// answered whole.
    pub(crate) fn reusable(&self) -> bool {
        !self.broken
    }

    /// Writes one packed command and reads its answer (a server error as `Err`).
    async fn call(&mut self, packed: &[u8]) -> RedisResult<Value> {
        self.send(packed).await?;
        self.read_value().await?.extract_error()
    }

    async fn send(&mut self, packed: &[u8]) -> RedisResult<()> {
        // Until the answer is read whole, the connection counts as broken (a caller that
        // goes away mid-command leaves it so).
        self.broken = true;
        self.io.get_mut().write_all(packed).await?;
        Ok(())
    }

    /// Reads one whole RESP2 answer and parses it.
    async fn read_value(&mut self) -> RedisResult<Value> {
        let v = self.read_frame().await?;
        self.broken = false;
        Ok(v)
    }

    async fn read_frame(&mut self) -> RedisResult<Value> {
        self.frame.clear();
        // Values still to read: an array adds its elements.
        let mut pending: u64 = 1;
        while pending > 0 {
            pending -= 1;
            let start = self.frame.len();
            let n = self.io.read_until(b'\n', &mut self.frame).await?;
            if n == 0 {
                return Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
            let line = &self.frame[start..];
            if line.len() < 3 || !line.ends_with(b"\r\n") {
                return Err(bad("a line without CRLF"));
            }
            let len = || -> RedisResult<i64> {
                std::str::from_utf8(&line[1..line.len() - 2])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| bad("a bad length"))
            };
            match line[0] {
                b'+' | b'-' | b':' => {}
                b'$' => {
                    let n = len()?;
                    if n >= 0 {
                        let at = self.frame.len();
                        let body = usize::try_from(n).map_err(|_| bad("a bad length"))? + 2;
                        self.frame.resize(at + body, 0);
                        self.io.read_exact(&mut self.frame[at..]).await?;
                    }
                }
                b'*' => {
                    let n = len()?;
                    if n > 0 {
                        pending += u64::try_from(n).map_err(|_| bad("a bad length"))?;
                    }
                }
                _ => return Err(bad("an answer of an unknown type")),
            }
        }
        redis::parse_redis_value(&self.frame)
    }
}

fn bad(what: &str) -> RedisError {
    RedisError::from((ErrorKind::ParseError, "Redis answered", what.to_owned()))
}

impl ConnectionLike for Direct {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move { self.call(&cmd.get_packed_command()).await })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.send(&cmd.get_packed_pipeline()).await?;
            let mut out = Vec::with_capacity(count);
            for i in 0..offset + count {
                self.broken = true;
                let v = self.read_frame().await?;
                if i >= offset {
                    out.push(v);
                }
            }
            self.broken = false;
            Ok(out)
        })
    }

    fn get_db(&self) -> i64 {
        self.db
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use baton_core::{AcquireRequest, Holder, HolderId, Key, Store, StoreUrl, Wait};

    use super::*;
    use crate::core::Inner;

    /// Where an uncontended acquire + release spends its time: one writing `EVALSHA` on
    /// this connection and on the redis crate's multiplexed one, and the store's two
    /// calls through `Store` (hopping onto the store's runtime) and as one task on that
    /// runtime (no hop). A measurement, not a check: `cargo test --release -p
    /// baton-store-redis --lib -- --ignored --nocapture where_the_time_goes` with
    /// `BATON_TEST_REDIS` set.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore]
    async fn where_the_time_goes() {
        let url = StoreUrl::parse(&std::env::var("BATON_TEST_REDIS").expect("BATON_TEST_REDIS"))
            .expect("url");
        let cfg = crate::RedisConfig::from_url(&url).expect("config");
        let script = redis::Script::new("return redis.call('INCR', ARGV[1])");
        let mut own = Direct::connect(&cfg.host, cfg.port, None, None, cfg.db)
            .await
            .expect("connect");
        let info = format!("redis://{}:{}/{}", cfg.host, cfg.port, cfg.db);
        let mut multiplexed = redis::Client::open(info)
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let store = Arc::new(crate::RedisStore::open(&url).expect("open"));
        let mut req = AcquireRequest::new(
            Key::new("bench/where").expect("key"),
            Holder::current(vec![]),
        );
        req.wait = Wait::NoWait;
        req.ttl = Some(Duration::from_secs(30));
        let n = 3000u32;
        for round in 0..4 {
            let t = Instant::now();
            for _ in 0..n {
                let _: i64 = script
                    .arg("bench-where")
                    .invoke_async(&mut own)
                    .await
                    .expect("own");
            }
            let own_t = t.elapsed() / n;
            let t = Instant::now();
            for _ in 0..n {
                let _: i64 = script
                    .arg("bench-where")
                    .invoke_async(&mut multiplexed)
                    .await
                    .expect("multiplexed");
            }
            let mux_t = t.elapsed() / n;
            let t = Instant::now();
            for _ in 0..n / 3 {
                let l = store.acquire(&req).await.expect("acquire");
                store.release(&l).await.expect("release");
            }
            let hop_t = t.elapsed() / (n / 3);
            let (s2, r2) = (Arc::clone(&store), req.clone());
            let no_hop_t = store
                .runtime
                .handle()
                .spawn(async move {
                    let inner: &Inner = &s2;
                    let t = Instant::now();
                    for _ in 0..n / 3 {
                        let id = format!("{:032x}", HolderId::random().0);
                        let l = inner.acquire_inner(&r2, &id).await.expect("acquire");
                        inner.release(&l).await.expect("release");
                    }
                    t.elapsed() / (n / 3)
                })
                .await
                .expect("task");
            eprintln!(
                "round {round}: EVALSHA (INCR) own connection {own_t:?}, multiplexed {mux_t:?}; \
                 acquire + release through Store {hop_t:?}, on the store's runtime {no_hop_t:?}"
            );
        }
    }
}
