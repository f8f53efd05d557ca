//! A granted lease as a Python object, and the keeper that renews it on lease stores.
//!
//! Guarantees:
//! - On a lease store (`capabilities().renew`) a [`baton::Keeper`] renews the lease every
//!   TTL/3 on its own thread, whatever Python does (the GIL is never needed for renewals).
//!   `lost` is true as soon as the keeper declares the lease lost; `on_lost` callbacks
//!   then run once, on a thread of baton's, with the GIL.
//! - `release()` stops the keeper, then releases; it raises `LostError` when the lease
//!   was lost (declared by the keeper, or found not held by the store). A second
//!   `release()` does nothing.
//! - A forked child's copy is inert: it never renews, never releases, reports `lost`,
//!   and closes (kernel-lock stores) or leaks (others) its copy of the parent's resources.
//! - A lease dropped unreleased is released best effort: at once on the kernel-lock
//!   directory store, else by a task on the runtime.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use baton::{ErrorKind, Keeper, KeeperConfig, LeaseState, Op, Released, Store};
use pyo3::prelude::*;
use tokio::sync::watch;

use crate::errors::{self, to_py};
use crate::runtime::{self, lock, Cell, Held};

/// Callbacks waiting for a loss, and whether the loss has been announced.
#[derive(Default)]
struct OnLost {
    fired: bool,
    callbacks: Vec<Py<PyAny>>,
    watching: bool,
}

/// One granted slot of a key: returned by `Lock.acquire()` and by `with` / `async with`
/// a Lock.
///
/// `token` is the fencing token, an int strictly greater than every earlier grant's for
/// this key in this store: pass it to what you write, and have that refuse lower ones
/// (`baton.fenced`).
#[pyclass(module = "baton", frozen)]
pub struct Lease {
    /// The key.
    #[pyo3(get)]
    key: String,
    /// Which slot of the key (0 for a mutex).
    #[pyo3(get)]
    slot: u32,
    /// The key's limit when granted.
    #[pyo3(get)]
    limit: u32,
    /// The fencing token: greater than every earlier grant's for this key.
    #[pyo3(get)]
    token: u64,
    /// The holder id (32 hex digits), as `status` shows it.
    #[pyo3(get)]
    holder: String,
    /// The lease's time to live in seconds (lease stores), or None.
    #[pyo3(get)]
    ttl: Option<f64>,
    /// When it was granted, in Unix seconds (display only).
    #[pyo3(get)]
    acquired: f64,
    /// The store's URL, without secrets.
    #[pyo3(get)]
    store: String,
    pid: u32,
    held: Cell<Held>,
    state: Option<watch::Receiver<LeaseState>>,
    /// Why the lease was found lost at release, when the keeper had not said so.
    lost_at_release: Mutex<Option<String>>,
    on_lost: Arc<Mutex<OnLost>>,
}

impl Lease {
    /// Wraps a grant, starting a keeper on lease stores. `sent_at` was taken before the
    /// request was sent. If the keeper cannot start, the lease is released.
    pub fn start(
        store: Arc<dyn Store>,
        lease: baton::Lease,
        sent_at: Instant,
    ) -> Result<Lease, baton::Error> {
        let keeper = match (store.capabilities().renew, lease.ttl) {
            (true, Some(ttl)) => match Keeper::start(
                Arc::clone(&store),
                lease.clone(),
                KeeperConfig::for_ttl(ttl),
                sent_at,
            ) {
                Ok(k) => Some(k),
                Err(e) => {
                    let (s, l) = (Arc::clone(&store), lease.clone());
                    if let Ok(rt) = runtime::handle() {
                        rt.spawn(async move { s.release(&l).await });
                    }
                    return Err(e);
                }
            },
            _ => None,
        };
        let state = keeper.as_ref().map(Keeper::watch);
        let pid = runtime::pid();
        let out = Lease {
            key: lease.key.as_str().to_owned(),
            slot: lease.slot,
            limit: lease.limit,
            token: lease.token.0,
            holder: lease.holder.id.to_string(),
            ttl: lease.ttl.map(|d| d.as_secs_f64()),
            acquired: lease.acquired_unix_ms as f64 / 1000.0,
            store: store.url().to_string(),
            pid,
            held: Arc::new(Mutex::new(Some(Held {
                pid,
                store,
                lease,
                keeper,
            }))),
            state,
            lost_at_release: Mutex::new(None),
            on_lost: Arc::new(Mutex::new(OnLost::default())),
        };
        runtime::register_lease(&out.held);
        Ok(out)
    }

    fn foreign(&self) -> bool {
        self.pid != runtime::pid()
    }

    fn keeper_lost(&self) -> Option<String> {
        match self.state.as_ref().map(|rx| rx.borrow().clone()) {
            Some(LeaseState::Lost { reason, .. }) => Some(reason),
            _ => None,
        }
    }

    fn lost_error(&self, reason: &str) -> PyErr {
        let key = baton::Key::new(&self.key);
        let mut err = baton::Error::new(ErrorKind::Lost, format!("the lease was lost: {reason}"))
            .with_op(Op::Renew)
            .with_store(&self.store);
        if let Ok(key) = &key {
            err = err.with_key(key);
        }
        to_py(err)
    }

    fn disown_if_foreign(&self) -> bool {
        if !self.foreign() {
            return false;
        }
        if let Some(held) = lock(&self.held).take() {
            runtime::disown(held);
        }
        true
    }
}

#[pymethods]
impl Lease {
    /// True once the keeper has declared the lease lost (or the store found it not held at
    /// release, or this is a forked child's copy). Always false on kernel-lock stores,
    /// whose lock lasts as long as the process.
    #[getter]
    fn lost(&self) -> bool {
        self.foreign() || self.keeper_lost().is_some() || lock(&self.lost_at_release).is_some()
    }

    /// Why the lease was lost, or None.
    #[getter]
    fn lost_reason(&self) -> Option<String> {
        if self.foreign() {
            return Some("this is a forked child's copy; the parent holds the lease".into());
        }
        self.keeper_lost()
            .or_else(|| lock(&self.lost_at_release).clone())
    }

    /// True while the lease is neither released nor lost.
    #[getter]
    fn held(&self) -> bool {
        !self.lost() && lock(&self.held).is_some()
    }

    /// Releases the lease (idempotent). Raises `LostError` if it was lost.
    fn release(&self, py: Python<'_>) -> PyResult<()> {
        if self.disown_if_foreign() {
            return Ok(());
        }
        let Some(held) = lock(&self.held).take() else {
            return Ok(());
        };
        let Held {
            store,
            lease,
            keeper,
            ..
        } = held;
        if let Some(keeper) = keeper {
            py.detach(move || keeper.stop());
        }
        let outcome =
            runtime::wait_quietly(py, Box::pin(async move { store.release(&lease).await }))?;
        if let Some(reason) = self.keeper_lost() {
            return Err(self.lost_error(&reason));
        }
        match outcome {
            Ok(Released::Released) => Ok(()),
            Ok(Released::NotHeld) => {
                let reason = "the store no longer held it at release (it expired, was broken or \
                              was taken over)"
                    .to_string();
                *lock(&self.lost_at_release) = Some(reason.clone());
                Err(self.lost_error(&reason))
            }
            Err(e) => Err(to_py(e)),
        }
    }

    /// `release()` for asyncio, without blocking the loop (a coroutine).
    fn release_async(slf: Py<Self>, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let start = slf.bind(py).getattr("_release_start")?;
        Ok(py
            .import("baton")?
            .getattr("_run")?
            .call1((start,))?
            .unbind())
    }

    /// Releases in the background, reporting to `callback(None, error_or_None)` through
    /// `loop.call_soon_threadsafe` (the asyncio form; see `baton.Lease.release_async`).
    fn _release_start(
        slf: Py<Self>,
        py: Python<'_>,
        event_loop: Py<PyAny>,
        callback: Py<PyAny>,
    ) -> PyResult<crate::store::AsyncOp> {
        let me = slf.get();
        if me.disown_if_foreign() {
            return crate::store::start(
                py,
                Box::pin(async {}),
                |py, ()| Ok(py.None()),
                event_loop,
                callback,
            );
        }
        let held = lock(&me.held).take();
        let lease_obj = slf.clone_ref(py);
        let fut = Box::pin(async move {
            let Some(Held {
                store,
                lease,
                keeper,
                ..
            }) = held
            else {
                return Ok(Released::Released);
            };
            if let Some(keeper) = keeper {
                // Joining the keeper's thread blocks: not on a runtime worker.
                let _ = tokio::task::spawn_blocking(move || keeper.stop()).await;
            }
            store.release(&lease).await
        });
        crate::store::start(
            py,
            fut,
            move |py, outcome| {
                let me = lease_obj.get();
                if let Some(reason) = me.keeper_lost() {
                    return Err(me.lost_error(&reason));
                }
                match outcome {
                    Ok(Released::Released) => Ok(py.None()),
                    Ok(Released::NotHeld) => {
                        let reason = "the store no longer held it at release (it expired, was \
                                      broken or was taken over)"
                            .to_string();
                        *lock(&me.lost_at_release) = Some(reason.clone());
                        Err(me.lost_error(&reason))
                    }
                    Err(e) => Err(to_py(e)),
                }
            },
            event_loop,
            callback,
        )
    }

    /// Calls `callback()` (no arguments) once when the keeper declares the lease lost: on
    /// a thread of baton's, with the GIL; at once, in this thread, if it is lost already.
    /// Never called on kernel-lock stores (their lease cannot be lost while the process
    /// lives) or in a forked child. An exception from the callback is reported as
    /// unraisable (printed), never raised elsewhere.
    fn on_lost(&self, py: Python<'_>, callback: Py<PyAny>) -> PyResult<()> {
        if self.foreign() {
            return Ok(());
        }
        let Some(rx) = self.state.clone() else {
            return Ok(());
        };
        let fire_now = {
            let mut on = lock(&self.on_lost);
            if on.fired || self.keeper_lost().is_some() {
                on.fired = true;
                true
            } else {
                on.callbacks.push(callback.clone_ref(py));
                if !on.watching {
                    on.watching = true;
                    watch_for_loss(rx, Arc::clone(&self.on_lost))?;
                }
                false
            }
        };
        if fire_now {
            callback.call0(py)?;
        }
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "<baton.Lease key={:?} slot={} token={} holder={} {}>",
            self.key,
            self.slot,
            self.token,
            self.holder,
            if self.lost() {
                "lost"
            } else if lock(&self.held).is_some() {
                "held"
            } else {
                "released"
            }
        )
    }
}

/// Waits, on a thread of its own, for the keeper's final state; on a loss, runs the
/// callbacks with the GIL.
fn watch_for_loss(
    mut rx: watch::Receiver<LeaseState>,
    on_lost: Arc<Mutex<OnLost>>,
) -> PyResult<()> {
    let rt = runtime::handle()?;
    std::thread::Builder::new()
        .name("baton-on-lost".into())
        .spawn(move || {
            let last = rt.block_on(async {
                loop {
                    let state = rx.borrow_and_update().clone();
                    if !matches!(state, LeaseState::Held { .. }) {
                        return state;
                    }
                    if rx.changed().await.is_err() {
                        return rx.borrow().clone();
                    }
                }
            });
            if !matches!(last, LeaseState::Lost { .. }) {
                return;
            }
            let callbacks = {
                let mut on = lock(&on_lost);
                on.fired = true;
                std::mem::take(&mut on.callbacks)
            };
            if callbacks.is_empty() {
                return;
            }
            Python::attach(|py| {
                for cb in callbacks {
                    if let Err(e) = cb.call0(py) {
                        e.write_unraisable(py, Some(cb.bind(py)));
                    }
                }
            });
        })
        .map(|_| ())
        .map_err(|e| errors::internal(&format!("cannot start the on_lost thread: {e}")))
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(held) = lock(&self.held).take() else {
            return;
        };
        if held.pid != runtime::pid() {
            runtime::disown(held);
            return;
        }
        let Held {
            store,
            lease,
            keeper,
            ..
        } = held;
        drop(keeper);
        if store.release_now(&lease) {
            return;
        }
        if let Ok(rt) = runtime::handle() {
            rt.spawn(async move {
                let _ = store.release(&lease).await;
            });
        }
    }
}
