//! The signals `baton run` catches: while it waits for the lock they cancel the wait;
//! once the command runs they are forwarded to the command's process group.
//!
//! Catching starts when [`Signals::install`] returns; until then a signal has its default
//! effect (baton dies of it, before it holds anything).

use std::future::poll_fn;
use std::io;
use std::task::{Context, Poll};

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals baton catches and forwards.
pub const FORWARDED: [libc::c_int; 6] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Streams of the [`FORWARDED`] signals.
pub struct Signals {
    streams: Vec<(libc::c_int, Signal)>,
}

impl Signals {
    /// Starts catching the [`FORWARDED`] signals. Needs a Tokio runtime with signals.
    pub fn install() -> io::Result<Signals> {
        let streams = FORWARDED
            .iter()
            .map(|&n| Ok((n, signal(SignalKind::from_raw(n))?)))
            .collect::<io::Result<_>>()?;
        Ok(Signals { streams })
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<libc::c_int> {
        for (number, stream) in &mut self.streams {
            // `None` only once the runtime shuts down; such a stream never fires again.
            if let Poll::Ready(Some(())) = stream.poll_recv(cx) {
                return Poll::Ready(*number);
            }
        }
        Poll::Pending
    }

    /// The next signal received.
    pub async fn recv(&mut self) -> libc::c_int {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// A signal received already and not yet taken, if any; never waits.
    pub async fn pending(&mut self) -> Option<libc::c_int> {
        poll_fn(|cx| match self.poll_next(cx) {
            Poll::Ready(n) => Poll::Ready(Some(n)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }
}

/// The conventional name of a signal (`SIGTERM`), for messages.
pub fn name(signal: libc::c_int) -> String {
    let known = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGTERM, "SIGTERM"),
    ];
    known
        .iter()
        .find(|(n, _)| *n == signal)
        .map(|(_, name)| (*name).to_owned())
        .unwrap_or_else(|| format!("signal {signal}"))
}
