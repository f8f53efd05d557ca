//! A fault proxy: a TCP proxy on loopback between a store client and its server that can
//! pass traffic, delay it, hold it (a partition) or cut every connection.
//!
//! The conformance suite's networked-store properties and the `partition` scenario point
//! a holder at the proxy and the rest of the test straight at the server, so the holder
//! alone is cut off. [`ProxySet`] puts one proxy in front of each endpoint of a URL.
//!
//! A partition holds traffic rather than dropping it: bytes already sent wait in the
//! proxy and arrive late when it heals, as TCP retransmissions would after a real
//! partition; new connections are accepted (the kernel does that) but not forwarded until
//! it heals. [`Fault::Cut`] closes every open connection, as a reset would.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything at once.
    Pass,
    /// Forward everything, each chunk after this delay.
    Delay(Duration),
    /// Forward nothing, in either direction, on old and new connections, until the fault
    /// changes; held bytes are delivered then (unless it changes to `Cut`).
    Partition,
    /// Close every connection open now; later connections pass.
    Cut,
}

/// One proxy in front of one upstream address, run on a thread of its own.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    fault: watch::Sender<(Fault, u64)>,
    /// Dropped with the proxy: stops its thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("fault", &self.fault.borrow().0)
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`. Callable from
    /// sync and async code: the proxy runs on a thread and runtime of its own, stopped
    /// when the proxy is dropped.
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The fault, and a count of cuts so a connection knows a cut came after it opened.
        let (fault, rx) = watch::channel((Fault::Pass, 0u64));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("baton-fault-proxy".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = accept_loop(listener, upstream, rx) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here, on its own thread, ends every connection.
            })?;
        Ok(FaultProxy {
            addr,
            upstream,
            fault,
            _stop: stop,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Changes what the proxy does, from now on, to every connection.
    pub fn set(&self, fault: Fault) {
        self.fault.send_modify(|(f, cuts)| {
            if fault == Fault::Cut {
                *cuts += 1;
                *f = Fault::Pass;
            } else {
                *f = fault;
            }
        });
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    fault: watch::Receiver<(Fault, u64)>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let fault = fault.clone();
        tokio::spawn(async move {
            let _ = connection(client, upstream, fault).await;
        });
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut fault: watch::Receiver<(Fault, u64)>,
) -> io::Result<()> {
    let cuts_at_open = fault.borrow().1;
    // A partition holds new connections too: do not even reach the server until it heals.
    if !wait_to_forward(&mut fault, cuts_at_open).await {
        return Ok(());
    }
    let server = TcpStream::connect(upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(pump(cr, sw, fault.clone(), cuts_at_open));
    let down = tokio::spawn(pump(sr, cw, fault, cuts_at_open));
    // When either direction ends (EOF, error or cut), end both: dropping the halves
    // closes the sockets.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    Ok(())
}

/// Waits until the fault lets traffic through; `false` when the connection was cut.
async fn wait_to_forward(fault: &mut watch::Receiver<(Fault, u64)>, cuts_at_open: u64) -> bool {
    loop {
        let (now, cuts) = *fault.borrow_and_update();
        if cuts != cuts_at_open {
            return false;
        }
        if now != Fault::Partition {
            return true;
        }
        if fault.changed().await.is_err() {
            return false;
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<(Fault, u64)>,
    cuts_at_open: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut watch_cut = fault.clone();
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // A cut closes an idle connection too.
            _ = cut(&mut watch_cut, cuts_at_open) => return,
        };
        let delay = match fault.borrow().0 {
            Fault::Delay(d) => Some(d),
            _ => None,
        };
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if !wait_to_forward(&mut fault, cuts_at_open).await {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Resolves when a cut happens after the connection opened.
async fn cut(fault: &mut watch::Receiver<(Fault, u64)>, cuts_at_open: u64) {
    loop {
        if fault.borrow_and_update().1 != cuts_at_open {
            return;
        }
        if fault.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// One [`FaultProxy`] per endpoint of a store URL, and the URL rewritten to go through
/// them.
#[derive(Debug)]
pub struct ProxySet {
    proxies: Vec<FaultProxy>,
    url: String,
}

impl ProxySet {
    /// Puts a proxy in front of every `host:port` endpoint of `url` (the comma-separated
    /// list between `://` (after any `user:pass@`) and the next `/` or `?`, as in
    /// `postgres://u@127.0.0.1:5432/db` or `etcd://127.0.0.1:1,127.0.0.1:2/prefix`).
    pub fn start(url: &str) -> io::Result<ProxySet> {
        let (prefix, hosts, suffix) = split_endpoints(url).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "the URL has no host:port endpoints to put a proxy in front of",
            )
        })?;
        let mut proxies = Vec::new();
        let mut rewritten = Vec::new();
        for host in hosts.split(',') {
            let upstream: SocketAddr = resolve(host)?;
            let proxy = FaultProxy::start(upstream)?;
            rewritten.push(proxy.addr().to_string());
            proxies.push(proxy);
        }
        Ok(ProxySet {
            url: format!("{prefix}{}{suffix}", rewritten.join(",")),
            proxies,
        })
    }

    /// The `host:port` endpoints of `url`, comma-separated, if it names any (a networked
    /// store's URL does; `dir:` and `sqlite:` do not).
    pub fn endpoints(url: &str) -> Option<&str> {
        split_endpoints(url).map(|(_, hosts, _)| hosts)
    }

    /// The store URL that goes through the proxies.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sets the same fault on every proxy.
    pub fn set(&self, fault: Fault) {
        for p in &self.proxies {
            p.set(fault);
        }
    }

    /// The proxies, in the URL's endpoint order.
    pub fn proxies(&self) -> &[FaultProxy] {
        &self.proxies
    }
}

fn resolve(host: &str) -> io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    host.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot resolve {host}"),
        )
    })
}

/// Splits `scheme://[user@]h1:p1,h2:p2/rest` into (`scheme://[user@]`, `h1:p1,h2:p2`,
/// `/rest`).
fn split_endpoints(url: &str) -> Option<(&str, &str, &str)> {
    let start = url.find("://")? + 3;
    let after = &url[start..];
    let end = after.find(['/', '?']).unwrap_or(after.len());
    let authority = &after[..end];
    let at = authority.rfind('@').map(|i| i + 1).unwrap_or(0);
    let hosts = &authority[at..];
    if hosts.is_empty() || !hosts.split(',').all(|h| h.rsplit_once(':').is_some()) {
        return None;
    }
    Some((&url[..start + at], hosts, &url[start + end..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn splits_endpoints_of_urls() {
        assert_eq!(
            split_endpoints("postgres://u:p@127.0.0.1:5432/db?x=1"),
            Some(("postgres://u:p@", "127.0.0.1:5432", "/db?x=1"))
        );
        assert_eq!(
            split_endpoints("etcd://127.0.0.1:1,127.0.0.1:2/prefix"),
            Some(("etcd://", "127.0.0.1:1,127.0.0.1:2", "/prefix"))
        );
        assert_eq!(split_endpoints("etcd://h:1"), Some(("etcd://", "h:1", "")));
        assert_eq!(split_endpoints("dir:/tmp/x"), None);
        assert_eq!(split_endpoints("postgres://nohostport/db"), None);
    }

    /// An echo server on a thread; returns its address.
    fn echo_server() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut std::net::TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn passes_holds_heals_and_cuts() {
        let proxy = FaultProxy::start(echo_server()).expect("proxy");
        let mut s = std::net::TcpStream::connect(proxy.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        assert_eq!(roundtrip(&mut s, b"one").expect("pass"), b"one");

        // A partition: nothing comes back while it lasts...
        proxy.set(Fault::Partition);
        s.write_all(b"two").expect("write");
        let mut buf = [0u8; 3];
        let err = s.read_exact(&mut buf).expect_err("held");
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{err:?}"
        );
        // ...and a new connection gets nowhere either.
        let mut s2 = std::net::TcpStream::connect(proxy.addr()).expect("connect");
        s2.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        s2.write_all(b"new").expect("write");
        assert!(s2.read_exact(&mut buf).is_err(), "a new connection passed");

        // Healed: the held bytes arrive late.
        proxy.set(Fault::Pass);
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.read_exact(&mut buf).expect("held bytes delivered");
        assert_eq!(&buf, b"two");
        assert_eq!(roundtrip(&mut s, b"three").expect("pass"), b"three");

        // A cut closes open connections; new ones pass.
        proxy.set(Fault::Cut);
        let mut closed = false;
        for _ in 0..50 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
            }
        }
        assert!(closed, "the connection survived a cut");
        let mut s3 = std::net::TcpStream::connect(proxy.addr()).expect("connect");
        s3.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        assert_eq!(roundtrip(&mut s3, b"four").expect("after cut"), b"four");
    }

    #[test]
    fn rewrites_a_url_through_proxies() {
        let a = echo_server();
        let b = echo_server();
        let set = ProxySet::start(&format!("etcd://{a},{b}/p")).expect("proxies");
        assert_eq!(set.proxies().len(), 2);
        let want = format!(
            "etcd://{},{}/p",
            set.proxies()[0].addr(),
            set.proxies()[1].addr()
        );
        assert_eq!(set.url(), want);
        assert_eq!(set.proxies()[1].upstream(), b);
    }
}
