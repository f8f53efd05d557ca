//! Running a store's work on the store's own executor, from whatever runtime the caller
//! uses, with cancellation and give-back.
//!
//! Guarantees:
//! - [`StoreRuntime::run`] runs a future to its end on the store's runtime even if the
//!   caller stops waiting (a release that has started is finished).
//! - [`StoreRuntime::grant`] (and [`blocking_grant`] for stores whose calls block a
//!   thread): when the caller's future is dropped, the work sees [`Cancel`] resolve (or its
//!   [`CancelFlag`] set) and stops; a grant the work produced that nobody is left to
//!   receive is handed to `give_back`, so no slot is kept by a request that went away.
//! - A task that panicked or whose runtime stopped answers `Unavailable`, naming the
//!   operation, key and store: never a hang, never a panic in the caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::{Error, ErrorKind, Key, Op, StoreUrl};

/// What an error of the runtime itself concerns: the operation, key and store.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    /// The operation.
    pub op: Op,
    /// The key, if the operation has one.
    pub key: Option<&'a Key>,
    /// The store.
    pub store: &'a StoreUrl,
}

impl<'a> Call<'a> {
    /// A call of `op` on `key` of `store`.
    pub fn new(op: Op, key: Option<&'a Key>, store: &'a StoreUrl) -> Call<'a> {
        Call { op, key, store }
    }

    /// The `Unavailable` error of a task that did not answer: `the store's runtime stopped`.
    pub fn stopped(&self) -> Error {
        Error::new(ErrorKind::Unavailable, "the store's runtime stopped")
            .context(self.op, self.key, self.store)
    }

    /// The `Cancelled` error of a wait whose caller went away.
    pub fn cancelled(&self) -> Error {
        Error::new(ErrorKind::Cancelled, "cancelled").context(self.op, self.key, self.store)
    }
}

/// A store's own tokio runtime on threads of its own. Dropping it tells the threads to
/// stop without waiting (a store may be dropped inside another runtime); tasks still
/// running end there and their connections close.
pub struct StoreRuntime {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for StoreRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreRuntime").finish_non_exhaustive()
    }
}

impl StoreRuntime {
    /// Starts a runtime named `name`: with `workers == 1` a current-thread runtime on one
    /// thread (a request, its connection's I/O and its answer meet on one thread), else a
    /// multi-thread runtime of `workers` threads.
    pub fn start(name: &str, workers: usize) -> std::io::Result<StoreRuntime> {
        let rt = if workers <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name(name)
                .enable_all()
                .build()?
        };
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let _ = rt.block_on(stopped);
                rt.shutdown_background();
            })?;
        Ok(StoreRuntime {
            handle,
            stop: Some(stop),
        })
    }

    /// The runtime's handle, for tasks the store spawns itself (listeners, keep-alives).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `fut` on the store's runtime and waits for it from any runtime. The task runs
    /// to its end even if the caller stops waiting.
    pub async fn run<T, Fut>(&self, call: Call<'_>, fut: Fut) -> Result<T, Error>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        match self.handle.spawn(fut).await {
            Ok(r) => r,
            Err(e) => Err(call.stopped().with_source(e)),
        }
    }

    /// Runs a cancellable piece of work that may produce a grant. `work` receives a
    /// [`Cancel`] that resolves when the caller's future is dropped; a value produced
    /// after the caller left goes to `give_back`.
    pub async fn grant<T, W, Fut, G, GFut>(
        &self,
        call: Call<'_>,
        work: W,
        give_back: G,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        W: FnOnce(Cancel) -> Fut,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
        G: FnOnce(T) -> GFut + Send + 'static,
        GFut: Future<Output = ()> + Send + 'static,
    {
        let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
        let (tx, rx) = oneshot::channel::<Result<T, Error>>();
        let fut = work(Cancel(cancel_rx));
        self.handle.spawn(async move {
            let result = fut.await;
            if let Err(Ok(value)) = tx.send(result) {
                // Nobody waits for it any more (the caller was cancelled): give it back.
                give_back(value).await;
            }
        });
        let result = rx.await;
        drop(cancel_tx);
        result.unwrap_or_else(|_| Err(call.stopped()))
    }

    /// Runs `fut` on the store's runtime and blocks this thread for its answer, at most
    /// `bound`: for [`crate::Store::release_now`], which a `Drop` calls. `None` when the
    /// bound passed or the runtime stopped (the task still runs to its end).
    pub fn block_for<T, Fut>(&self, bound: Duration, fut: Fut) -> Option<T>
    where
        T: Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(bound).ok()
    }
}

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Resolves when the caller of [`StoreRuntime::grant`] has gone away (its future was
/// dropped, or the grant was delivered and the caller stopped listening). Use it in a
/// `tokio::select!` beside the wait.
#[derive(Debug)]
pub struct Cancel(oneshot::Receiver<()>);

impl Cancel {
    /// A `Cancel` that never resolves, for work run outside [`StoreRuntime::grant`].
    pub fn never() -> Cancel {
        let (tx, rx) = oneshot::channel();
        std::mem::forget(tx);
        Cancel(rx)
    }
}

impl Future for Cancel {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // The sender is never used to send: it is dropped when the caller goes away.
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// The cancel flag of [`blocking_grant`]'s work: set when the caller's future is dropped.
/// Blocking work checks it between steps (a wait that sleeps re-checks at least every
/// few hundred milliseconds).
#[derive(Clone, Debug, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// Whether the caller has gone away.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs blocking `f` on tokio's blocking pool and waits for it from any runtime.
pub async fn blocking<T, F>(call: Call<'_>, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Error> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(call.stopped().with_source(e)),
    }
}

/// [`StoreRuntime::grant`] for stores whose calls block a thread (SQLite): `work` runs on
/// tokio's blocking pool and sees its [`CancelFlag`] set when the caller's future is
/// dropped; a grant it produces after that goes to `give_back`, on a thread of its own.
pub async fn blocking_grant<T, W, G>(call: Call<'_>, work: W, give_back: G) -> Result<T, Error>
where
    T: Send + 'static,
    W: FnOnce(&CancelFlag) -> Result<T, Error> + Send + 'static,
    G: FnOnce(T) + Send + 'static,
{
    /// Sets the flag when the caller's future is dropped, and gives back a grant that
    /// arrived in the meantime.
    struct Guard<T: Send + 'static, G: FnOnce(T) + Send + 'static> {
        cancel: CancelFlag,
        rx: Option<oneshot::Receiver<Result<T, Error>>>,
        give_back: Arc<std::sync::Mutex<Option<G>>>,
    }
    impl<T: Send + 'static, G: FnOnce(T) + Send + 'static> Drop for Guard<T, G> {
        fn drop(&mut self) {
            let Some(mut rx) = self.rx.take() else { return };
            self.cancel.set();
            rx.close();
            if let Ok(Ok(value)) = rx.try_recv() {
                if let Some(g) = take(&self.give_back) {
                    std::thread::spawn(move || g(value));
                }
            }
        }
    }
    fn take<G>(m: &std::sync::Mutex<Option<G>>) -> Option<G> {
        m.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    let (tx, rx) = oneshot::channel();
    let cancel = CancelFlag::default();
    let give_back = Arc::new(std::sync::Mutex::new(Some(give_back)));
    let mut guard = Guard {
        cancel: cancel.clone(),
        rx: Some(rx),
        give_back: Arc::clone(&give_back),
    };
    tokio::task::spawn_blocking(move || {
        let result = work(&cancel);
        if let Err(Ok(value)) = tx.send(result) {
            // Nobody waits for it any more (the caller was cancelled): give it back.
            if let Some(g) = take(&give_back) {
                g(value);
            }
        }
    });
    let Some(rx) = guard.rx.as_mut() else {
        return Err(call.stopped());
    };
    let result = rx.await;
    guard.rx = None;
    result.unwrap_or_else(|_| Err(call.stopped()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn url() -> StoreUrl {
        StoreUrl::parse("noop:").expect("url")
    }

    #[tokio::test]
    async fn run_answers_from_the_store_runtime() {
        let rt = StoreRuntime::start("test-rt", 1).expect("runtime");
        let u = url();
        let v = rt
            .run(Call::new(Op::List, None, &u), async { Ok(7) })
            .await
            .expect("ran");
        assert_eq!(v, 7);
    }

    #[tokio::test]
    async fn a_panicking_task_is_unavailable_not_a_panic() {
        let rt = StoreRuntime::start("test-rt", 2).expect("runtime");
        let u = url();
        let e = rt
            .run(Call::new(Op::List, None, &u), async {
                if u32::MAX > 1 {
                    panic!("boom");
                }
                Ok(())
            })
            .await
            .expect_err("panicked");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(e.op(), Some(Op::List));
    }

    #[tokio::test]
    async fn a_dropped_grant_is_cancelled_and_a_late_grant_given_back() {
        let rt = StoreRuntime::start("test-rt", 1).expect("runtime");
        let u = url();
        let given_back = Arc::new(AtomicU32::new(0));
        let gb = Arc::clone(&given_back);
        let (seen_tx, seen_rx) = oneshot::channel::<()>();
        let fut = rt.grant(
            Call::new(Op::Acquire, None, &u),
            |cancel| async move {
                cancel.await;
                let _ = seen_tx.send(());
                // Produced after the caller left: must be given back.
                Ok(42u32)
            },
            move |v| async move {
                gb.store(v, Ordering::SeqCst);
            },
        );
        // Poll once so the task starts, then drop the caller's future.
        let _ = tokio::time::timeout(Duration::from_millis(50), fut).await;
        tokio::time::timeout(Duration::from_secs(5), seen_rx)
            .await
            .expect("work saw the cancel")
            .expect("sender kept");
        for _ in 0..100 {
            if given_back.load(Ordering::SeqCst) == 42 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the late grant was not given back");
    }

    #[tokio::test]
    async fn a_dropped_blocking_grant_sets_the_flag_and_gives_back() {
        let u = url();
        let given_back = Arc::new(AtomicU32::new(0));
        let gb = Arc::clone(&given_back);
        let fut = blocking_grant(
            Call::new(Op::Acquire, None, &u),
            |cancel| {
                while !cancel.is_set() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(9u32)
            },
            move |v| gb.store(v, Ordering::SeqCst),
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), fut).await;
        for _ in 0..200 {
            if given_back.load(Ordering::SeqCst) == 9 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the late blocking grant was not given back");
    }

    #[test]
    fn block_for_waits_at_most_the_bound() {
        let rt = StoreRuntime::start("test-rt", 1).expect("runtime");
        assert_eq!(rt.block_for(Duration::from_secs(5), async { 3 }), Some(3));
        let never = rt.block_for(Duration::from_millis(20), async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        assert_eq!(never, None);
    }
}
