//! The Tokio runtime the package runs store operations on, waits that Python can
//! interrupt, and what a forked child must not inherit.
//!
//! Guarantees:
//! - One runtime per process, made on first use. A forked child has none of its parent's
//!   threads, so it gets a runtime of its own; the parent's is leaked in the child, never
//!   dropped (dropping would wait for threads that do not exist there).
//! - A synchronous wait never holds the GIL. It polls the operation once on the calling
//!   thread (an uncontended lock needs no thread hop), then waits on the runtime, waking at
//!   least every [`SIGNAL_CHECK`] to let Python run its signal handlers. When a handler
//!   raises (Ctrl-C: `KeyboardInterrupt`), the operation's future is dropped before the
//!   exception reaches Python: that is the library's cancel, after which the store keeps
//!   nothing of the wait.
//! - The holder template (host, pid, boot id, user, argv) is read once per process.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use baton::{Holder, HolderId, Keeper, Lease, Store};
use pyo3::prelude::*;

/// How often a synchronous wait lets Python check for signals.
pub const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// A boxed store operation.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Locks a mutex, ignoring poisoning: the data behind these mutexes stays consistent
/// whatever panicked (a panic here is a bug, and the next caller must still be able to
/// release its lease).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This process's id, cached (0: not known yet). A fork clears it in the child, through
/// `pthread_atfork`, so that the child looks its own pid up: every fork, whoever calls it.
static PID: AtomicU32 = AtomicU32::new(0);

extern "C" fn forget_pid_in_child() {
    PID.store(0, Ordering::Relaxed);
}

/// The current process id, without a system call on the hot path.
pub fn pid() -> u32 {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registers a child handler that only stores to an atomic, which is
        // async-signal-safe; no other handlers.
        unsafe {
            libc::pthread_atfork(None, None, Some(forget_pid_in_child));
        }
    });
    match PID.load(Ordering::Relaxed) {
        0 => {
            let pid = std::process::id();
            PID.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

struct PerProcess {
    pid: u32,
    runtime: &'static tokio::runtime::Runtime,
    holder: Holder,
}

static PROCESS: Mutex<Option<PerProcess>> = Mutex::new(None);

fn per_process<T>(f: impl FnOnce(&PerProcess) -> T) -> PyResult<T> {
    let pid = pid();
    let mut slot = lock(&PROCESS);
    match &*slot {
        Some(p) if p.pid == pid => {}
        _ => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("baton-py")
                .enable_all()
                .build()
                .map_err(|e| {
                    crate::errors::to_py(
                        baton::Error::new(
                            baton::ErrorKind::Unavailable,
                            "cannot start the runtime for store operations",
                        )
                        .with_source(e),
                    )
                })?;
            // A parent's runtime (after a fork) is leaked on purpose, as is this one at
            // exit: both live as long as the process.
            let runtime: &'static tokio::runtime::Runtime = Box::leak(Box::new(runtime));
            let holder = Holder::current(std::env::args().collect());
            if let Some(old) = slot.take() {
                std::mem::forget(old);
            }
            *slot = Some(PerProcess {
                pid,
                runtime,
                holder,
            });
        }
    }
    let p = slot.as_ref().ok_or_else(|| {
        pyo3::exceptions::PyRuntimeError::new_err("baton: no runtime (internal error)")
    })?;
    Ok(f(p))
}

/// This process's runtime.
pub fn handle() -> PyResult<tokio::runtime::Handle> {
    per_process(|p| p.runtime.handle().clone())
}

/// A holder for one new lease of this process: the process's identity with a fresh id.
pub fn new_holder() -> PyResult<Holder> {
    per_process(|p| {
        let mut h = p.holder.clone();
        h.id = HolderId::random();
        h
    })
}

/// Runs `fut` to completion with the GIL released, waking every [`SIGNAL_CHECK`] to run
/// Python's signal handlers. If one raises, `fut` is dropped (cancelling the operation)
/// before the error is returned.
pub fn wait_interruptible<T: Send + 'static>(py: Python<'_>, fut: BoxFuture<T>) -> PyResult<T> {
    let rt = handle()?;
    let mut fut = Some(fut);
    // First poll on this thread: an uncontended lock completes here, no hop.
    let first = py.detach(|| {
        let _enter = rt.enter();
        let f = fut.as_mut().map(|f| {
            let mut cx = Context::from_waker(Waker::noop());
            f.as_mut().poll(&mut cx)
        });
        match f {
            Some(Poll::Ready(v)) => Some(v),
            _ => None,
        }
    });
    if let Some(v) = first {
        return Ok(v);
    }
    loop {
        let step = py.detach(|| {
            let f = fut.as_mut()?;
            rt.block_on(async {
                tokio::select! {
                    biased;
                    v = f => Some(v),
                    () = tokio::time::sleep(SIGNAL_CHECK) => None,
                }
            })
        });
        if let Some(v) = step {
            return Ok(v);
        }
        if let Err(e) = py.check_signals() {
            // Cancel: drop the operation (inside the runtime, without the GIL) before
            // Python sees the exception, so the store holds nothing of this wait.
            let f = fut.take();
            py.detach(move || {
                let _enter = rt.enter();
                drop(f);
            });
            return Err(e);
        }
    }
}

/// Runs `fut` to completion with the GIL released, ignoring signals (a release must not
/// be cut in half).
pub fn wait_quietly<T: Send + 'static>(py: Python<'_>, mut fut: BoxFuture<T>) -> PyResult<T> {
    let rt = handle()?;
    Ok(py.detach(move || {
        {
            let _enter = rt.enter();
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
        }
        rt.block_on(fut)
    }))
}

/// What a lease holds in this process: the store, the lease, its keeper.
pub struct Held {
    /// The process that acquired it.
    pub pid: u32,
    /// The store that granted it.
    pub store: Arc<dyn Store>,
    /// The grant.
    pub lease: Lease,
    /// The keeper renewing it, on lease stores.
    pub keeper: Option<Keeper>,
}

/// A shared, takeable slot: the lease or store a Python object owns.
pub type Cell<T> = Arc<Mutex<Option<T>>>;

/// A store as opened by one process (its pid).
pub type Opened = (u32, Arc<dyn Store>);

/// Everything a forked child must disown, by weak reference.
#[derive(Default)]
struct Registry {
    leases: Vec<Weak<Mutex<Option<Held>>>>,
    stores: Vec<Weak<Mutex<Option<Opened>>>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    leases: Vec::new(),
    stores: Vec::new(),
});

fn prune<T>(v: &mut Vec<Weak<T>>) {
    if v.len() >= 64 && v.len().is_power_of_two() {
        v.retain(|w| w.strong_count() > 0);
    }
}

/// Registers a held lease, so that a forked child disowns it.
pub fn register_lease(cell: &Cell<Held>) {
    let mut r = lock(&REGISTRY);
    prune(&mut r.leases);
    r.leases.push(Arc::downgrade(cell));
}

/// Registers an open store, so that a forked child disowns it.
pub fn register_store(cell: &Cell<Opened>) {
    let mut r = lock(&REGISTRY);
    prune(&mut r.stores);
    r.stores.push(Arc::downgrade(cell));
}

/// Lets go of a store that belongs to another process (the parent, in a forked child)
/// without any I/O on its behalf. A kernel-lock directory store is dropped: that only
/// closes this process's copies of the descriptors, so the child stops keeping the
/// parent's locks alive, and never unlocks them (the parent's descriptors still hold
/// them). Any other store is leaked: its connections, threads and runtimes belong to the
/// parent, and closing a copied database connection can disturb the parent's.
pub fn disown_store(store: Arc<dyn Store>) {
    if store.url().scheme() == "dir" && !store.capabilities().renew {
        drop(store);
    } else {
        std::mem::forget(store);
    }
}

/// Lets go of a lease that belongs to another process: never released, never renewed.
pub fn disown(held: Held) {
    let Held {
        store,
        keeper,
        lease,
        ..
    } = held;
    // The keeper's thread does not exist here; joining it would hang.
    std::mem::forget(keeper);
    drop(lease);
    disown_store(store);
}

/// In a forked child: disowns every lease and store of the parent. Called by
/// `os.register_at_fork(after_in_child=...)`; a mutex held by a thread of the parent at
/// the fork is skipped (the pid check on next use catches what this misses).
pub fn after_fork_in_child() {
    let pid = pid();
    let Ok(mut r) = REGISTRY.try_lock() else {
        return;
    };
    let (leases, stores) = (std::mem::take(&mut r.leases), std::mem::take(&mut r.stores));
    drop(r);
    for cell in leases.iter().filter_map(Weak::upgrade) {
        if let Ok(mut slot) = cell.try_lock() {
            if slot.as_ref().is_some_and(|h| h.pid != pid) {
                if let Some(held) = slot.take() {
                    disown(held);
                }
            }
        }
    }
    for cell in stores.iter().filter_map(Weak::upgrade) {
        if let Ok(mut slot) = cell.try_lock() {
            if slot.as_ref().is_some_and(|(p, _)| *p != pid) {
                if let Some((_, store)) = slot.take() {
                    disown_store(store);
                }
            }
        }
    }
}
