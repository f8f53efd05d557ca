//! Waking waiters: one listening connection per store handle (`LISTEN` on the schema's
//! channel, started by the first operation that waits), which forwards every
//! notification to the waiters of its key, and the start of an operation that may wait
//! for one.
//!
//! Guarantees:
//! - Waking: a release (and an abandoned wait) sends `NOTIFY` on the schema's channel
//!   with the key as payload; one listening connection per store handle wakes that key's
//!   waiters. A waiter also looks every quarter of the shortest TTL it watches (to see
//!   renewals soon after they happen), when its first observation matures, and at a slow
//!   backstop interval.
//! - A wake-up is never lost unnoticed: a waiter subscribes before it first looks, and
//!   when the listener reconnects or a waiter falls behind, every waiter looks again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use baton_core::kit::sys::lock;
use baton_core::Error;
use futures_util::StreamExt;
use tokio::sync::{broadcast, watch};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::config::PostgresConfig;
use crate::core::{Conn, Inner};

/// How long a waiter waits for the listening connection before it relies on polling.
const LISTEN_READY_BOUND: Duration = Duration::from_secs(2);

/// How often the listening connection proves it is alive.
const LISTEN_PING: Duration = Duration::from_secs(10);

/// Wakes waiters.
#[derive(Clone, Debug)]
pub(crate) enum Wake {
    /// Something changed for this key.
    Key(Arc<str>),
    /// Look again, whatever the key (the listener reconnected: notifications may be lost).
    All,
}

impl Inner {
    /// The start of an operation that may wait for a notification (an acquire, a barrier
    /// arrival): subscribes to wake-ups first (so none is missed), starts the listening
    /// connection when `waits`, checks a connection out and the schema, and waits (bounded)
    /// until the listener is ready.
    pub(crate) async fn begin(
        &self,
        waits: bool,
    ) -> Result<(Conn, broadcast::Receiver<Wake>), Error> {
        let wake_rx = self.wake.subscribe();
        if waits {
            self.start_listener();
        }
        let conn = self.checkout().await.map_err(|f| self.map(f))?;
        if let Err(f) = self.ensure_schema(&conn).await {
            if !f.breaks_conn() {
                self.checkin(conn);
            }
            return Err(self.map(f));
        }
        if waits {
            let mut listening = self.listening.clone();
            let _ = tokio::time::timeout(LISTEN_READY_BOUND, listening.wait_for(|l| *l)).await;
        }
        Ok((conn, wake_rx))
    }

    fn start_listener(&self) {
        if self.listener_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(ready) = lock(&self.listening_tx).take() else {
            return;
        };
        let cfg = self.cfg.clone();
        let channel = self.channel.clone();
        let wake = self.wake.clone();
        self.runtime
            .handle()
            .spawn(listen(cfg, channel, wake, ready));
    }
}

/// Waits until a wake-up concerns `key`; `true` when it concerns every key (the
/// listener reconnected, or wake-ups were lost), which always deserves a look.
pub(crate) async fn woken(rx: &mut broadcast::Receiver<Wake>, key: &str) -> bool {
    loop {
        match rx.recv().await {
            Ok(Wake::Key(k)) if &*k == key => return false,
            Ok(Wake::Key(_)) => {}
            Ok(Wake::All) | Err(broadcast::error::RecvError::Lagged(_)) => return true,
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// The listening connection: `LISTEN` on the schema's channel, forwarding each
/// notification to the waiters; reconnects when the connection fails.
async fn listen(
    cfg: PostgresConfig,
    channel: String,
    wake: broadcast::Sender<Wake>,
    ready: watch::Sender<bool>,
) {
    loop {
        if let Ok(Ok((client, mut connection))) =
            tokio::time::timeout(cfg.timeout, cfg.pg.connect(NoTls)).await
        {
            let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let driver = tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(m) = messages.next().await {
                    match m {
                        Ok(AsyncMessage::Notification(n)) => {
                            if ntx.send(n.payload().to_owned()).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            let listened = tokio::time::timeout(
                cfg.timeout,
                client.batch_execute(&format!("LISTEN \"{channel}\"")),
            )
            .await;
            if matches!(listened, Ok(Ok(()))) {
                ready.send_replace(true);
                let _ = wake.send(Wake::All);
                loop {
                    tokio::select! {
                        n = nrx.recv() => match n {
                            Some(k) => { let _ = wake.send(Wake::Key(Arc::from(k))); }
                            None => break,
                        },
                        _ = tokio::time::sleep(LISTEN_PING) => {
                            // Repeating LISTEN is harmless and proves the session is
                            // still there (and keeps it visible in pg_stat_activity).
                            let ping = tokio::time::timeout(
                                cfg.timeout,
                                client.batch_execute(&format!("LISTEN \"{channel}\"")),
                            )
                            .await;
                            if !matches!(ping, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                ready.send_replace(false);
                // Notifications may have been lost while the connection failed.
                let _ = wake.send(Wake::All);
            }
            driver.abort();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
