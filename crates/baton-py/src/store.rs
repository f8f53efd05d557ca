//! A store as a Python object, lock requests, and operations run for asyncio.
//!
//! Guarantees:
//! - Every operation that can wait releases the GIL and can be interrupted by a signal
//!   handler that raises (Ctrl-C), cancelling the operation first (see `runtime`).
//! - An asyncio operation runs as a task on the runtime and reports once, through
//!   `loop.call_soon_threadsafe(callback, value, error)`. `AsyncOp.cancel()` drops the
//!   task's future (the library's cancel); the report that follows then carries
//!   `(None, None)`, so the caller can wait for the cancel to be complete.
//! - In a forked child the store is reopened from its URL on first use; the parent's is
//!   disowned (see `runtime::disown_store`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use baton::{AcquireRequest, BarrierRequest, Key, Wait};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::convert;
use crate::errors::{self, to_py};
use crate::lease::Lease;
use crate::runtime::{self, lock, BoxFuture, Cell};

/// An operation running for asyncio; `cancel()` drops it.
#[pyclass(module = "baton._baton", frozen)]
pub struct AsyncOp {
    abort: tokio::task::AbortHandle,
}

#[pymethods]
impl AsyncOp {
    /// Cancels the operation: its future is dropped on the runtime, and the report that
    /// follows is `(None, None)` unless it had finished already.
    fn cancel(&self) {
        self.abort.abort();
    }
}

/// Runs `fut` on the runtime for asyncio: when it ends, `convert` makes its Python value
/// (with the GIL) and `callback(value, error)` is scheduled on `event_loop`. A value the
/// loop cannot take any more (closed) is dropped, which releases a lease best effort.
pub fn start<T, C>(
    py: Python<'_>,
    fut: BoxFuture<T>,
    convert: C,
    event_loop: Py<PyAny>,
    callback: Py<PyAny>,
) -> PyResult<AsyncOp>
where
    T: Send + 'static,
    C: FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
{
    let _ = py;
    let rt = runtime::handle()?;
    let task = rt.spawn(fut);
    let abort = task.abort_handle();
    rt.spawn(async move {
        let outcome = task.await;
        // Taking the GIL can wait: not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || {
            Python::attach(|py| {
                let (value, error) = match outcome {
                    Ok(v) => match convert(py, v) {
                        Ok(v) => (v, py.None()),
                        Err(e) => (py.None(), e.into_value(py).into_any()),
                    },
                    Err(_) => (py.None(), py.None()),
                };
                let _ =
                    event_loop.call_method1(py, "call_soon_threadsafe", (callback, value, error));
            })
        })
        .await;
    });
    Ok(AsyncOp { abort })
}

/// A store, opened from a URL.
#[pyclass(module = "baton._baton", frozen)]
pub struct Store {
    url: baton::StoreUrl,
    cell: Cell<runtime::Opened>,
}

impl Store {
    /// Opens the store `url` names (`None`: the default store).
    pub fn open(url: Option<&str>) -> PyResult<Store> {
        let url = match url {
            Some(u) => baton::StoreUrl::parse(u),
            None => baton::default_url(),
        }
        .map_err(to_py)?;
        let store = Store {
            url,
            cell: Arc::new(Mutex::new(None)),
        };
        store.inner()?;
        runtime::register_store(&store.cell);
        Ok(store)
    }

    /// This process's store object (reopened after a fork).
    pub fn inner(&self) -> PyResult<Arc<dyn baton::Store>> {
        let pid = runtime::pid();
        let mut cell = lock(&self.cell);
        if let Some((p, s)) = &*cell {
            if *p == pid {
                return Ok(Arc::clone(s));
            }
        }
        if let Some((_, old)) = cell.take() {
            runtime::disown_store(old);
        }
        let rt = runtime::handle()?;
        let _enter = rt.enter();
        let s = baton::open_url(&self.url).map_err(to_py)?;
        *cell = Some((pid, Arc::clone(&s)));
        Ok(s)
    }

    fn key(&self, key: &str) -> PyResult<Key> {
        Key::new(key).map_err(|e| to_py(e.context(baton::Op::Parse, None, &self.url)))
    }

    fn run<T: Send + 'static>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(Arc<dyn baton::Store>) -> BoxFuture<T>,
    ) -> PyResult<T> {
        let store = self.inner()?;
        runtime::wait_interruptible(py, f(store))
    }

    fn barrier_request(
        &self,
        key: &str,
        parties: u32,
        wait: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<BarrierRequest> {
        let req = BarrierRequest {
            key: self.key(key)?,
            parties,
            wait: convert::wait(wait)?,
            holder: runtime::new_holder()?,
        };
        baton::barrier::validate(&req).map_err(to_py)?;
        Ok(req)
    }
}

fn passed(py: Python<'_>, p: &baton::BarrierPassed) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    d.set_item("key", p.key.as_str())?;
    d.set_item("generation", p.generation)?;
    d.set_item("parties", p.parties)?;
    Ok(d.into_any().unbind())
}

#[pymethods]
impl Store {
    /// The store's URL, without secrets.
    #[getter]
    fn url(&self) -> String {
        self.url.to_string()
    }

    /// What the store can do: renew (leases expire unless renewed), break_lease, resize,
    /// fifo, lock_delay, barrier, waiters (status counts them), delete, and recovery (how
    /// soon a dead holder's slot comes back).
    #[getter]
    fn capabilities<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner()?.capabilities();
        let d = PyDict::new(py);
        d.set_item("renew", c.renew)?;
        d.set_item("break_lease", c.break_lease)?;
        d.set_item("resize", c.resize)?;
        d.set_item("fifo", c.fifo)?;
        d.set_item("lock_delay", c.lock_delay)?;
        d.set_item("barrier", c.barrier)?;
        d.set_item("waiters", c.waiters)?;
        d.set_item("delete", c.delete)?;
        d.set_item("recovery", c.recovery)?;
        Ok(d)
    }

    /// A request for one slot of `key` (validated now; nothing is sent until acquired).
    #[pyo3(signature = (key, slots=1, ttl=None, wait=None))]
    fn request(
        slf: Py<Self>,
        py: Python<'_>,
        key: &str,
        slots: u32,
        ttl: Option<&Bound<'_, PyAny>>,
        wait: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Request> {
        let me = slf.get();
        if slots == 0 {
            return Err(errors::invalid("slots must be at least 1"));
        }
        let _ = py;
        Ok(Request {
            key: me.key(key)?,
            limit: slots,
            ttl: convert::ttl(ttl)?,
            wait: convert::wait(wait)?,
            store: slf,
        })
    }

    /// A key's status as a dict.
    fn status<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyDict>> {
        let key = self.key(key)?;
        let st = self.run(py, |s| Box::pin(async move { s.inspect(&key).await }))?;
        convert::status(py, &st.map_err(to_py)?)
    }

    /// Who leads `key` (the holder of its one slot), or None.
    fn leader<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Option<Bound<'py, PyDict>>> {
        let key = self.key(key)?;
        let l = self.run(py, |s| {
            Box::pin(async move { baton::leader(&*s, &key).await })
        })?;
        convert::leader(py, l.map_err(to_py)?.as_ref())
    }

    /// Changes a key's limit (lease stores): to `limit`, or by the step `by` (negative
    /// lowers it); returns the new status.
    #[pyo3(signature = (key, limit=None, by=None))]
    fn resize<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        limit: Option<u32>,
        by: Option<i64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let key = self.key(key)?;
        let change = match (limit, by) {
            (Some(n), None) => baton::Resize::To(n),
            (None, Some(step)) if step != 0 => baton::Resize::By(step),
            _ => return Err(pyo3::exceptions::PyValueError::new_err(
                "resize takes a limit (resize(key, 4)) or a non-zero step (resize(key, by=-1)), \
                     not both",
            )),
        };
        let st = self.run(py, |s| {
            Box::pin(async move { s.resize(&key, change).await })
        })?;
        convert::status(py, &st.map_err(to_py)?)
    }

    /// Every key in the store, sorted.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let keys = self.run(py, |s| Box::pin(async move { s.list().await }))?;
        let keys: Vec<String> = keys
            .map_err(to_py)?
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect();
        PyList::new(py, keys)
    }

    /// Frees the slots of `key` held by `holder` (every holder's when None), on lease
    /// stores; returns how many slots it freed.
    #[pyo3(signature = (key, holder=None))]
    fn break_lease(&self, py: Python<'_>, key: &str, holder: Option<&str>) -> PyResult<usize> {
        let key = self.key(key)?;
        let holder = holder
            .map(|h| h.parse::<baton::HolderId>())
            .transpose()
            .map_err(to_py)?;
        let freed = self.run(py, |s| {
            Box::pin(async move { s.break_lease(&key, holder).await })
        })?;
        Ok(freed.map_err(to_py)?.len())
    }

    /// Removes a key nobody holds or waits for (BusyError while one does).
    fn delete(&self, py: Python<'_>, key: &str) -> PyResult<()> {
        let key = self.key(key)?;
        let r = self.run(py, |s| Box::pin(async move { s.delete(&key).await }))?;
        r.map_err(to_py)
    }

    /// Arrives at barrier `key` and waits until `parties` parties have arrived.
    #[pyo3(signature = (key, parties, wait=None))]
    fn barrier(
        &self,
        py: Python<'_>,
        key: &str,
        parties: u32,
        wait: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let req = self.barrier_request(key, parties, wait)?;
        let p = self.run(py, |s| Box::pin(async move { s.barrier(&req).await }))?;
        passed(py, &p.map_err(to_py)?)
    }

    /// The asyncio form of `barrier` (see `start`).
    #[pyo3(signature = (key, parties, wait, event_loop, callback))]
    fn _barrier_start(
        &self,
        py: Python<'_>,
        key: &str,
        parties: u32,
        wait: Option<&Bound<'_, PyAny>>,
        event_loop: Py<PyAny>,
        callback: Py<PyAny>,
    ) -> PyResult<AsyncOp> {
        let req = self.barrier_request(key, parties, wait)?;
        let store = self.inner()?;
        start(
            py,
            Box::pin(async move { store.barrier(&req).await }),
            |py, r| passed(py, &r.map_err(to_py)?),
            event_loop,
            callback,
        )
    }

    fn __repr__(&self) -> String {
        format!("<baton.Store {}>", self.url)
    }
}

/// A validated request for one slot: key, limit, TTL, wait.
#[pyclass(module = "baton._baton", frozen)]
pub struct Request {
    store: Py<Store>,
    key: Key,
    limit: u32,
    ttl: Option<std::time::Duration>,
    wait: Wait,
}

impl Request {
    fn prepare(&self) -> PyResult<(Arc<dyn baton::Store>, AcquireRequest)> {
        let store = self.store.get().inner()?;
        let mut req = AcquireRequest::new(self.key.clone(), runtime::new_holder()?);
        req.limit = self.limit;
        req.wait = self.wait;
        req.ttl = self.ttl;
        Ok((store, req))
    }
}

#[pymethods]
impl Request {
    /// The key.
    #[getter]
    fn key(&self) -> &str {
        self.key.as_str()
    }

    /// Acquires a slot, waiting as the request says, with the GIL released.
    fn acquire(&self, py: Python<'_>) -> PyResult<Lease> {
        let (store, req) = self.prepare()?;
        let sent_at = Instant::now();
        let s = Arc::clone(&store);
        let granted = runtime::wait_interruptible(
            py,
            Box::pin(async move { baton::kit::wait::acquire(&*s, &req, None).await }),
        )?;
        Lease::start(store, granted.map_err(to_py)?, sent_at).map_err(to_py)
    }

    /// The asyncio form of `acquire` (see `start`): reports `(Lease, None)` or
    /// `(None, error)`.
    fn _acquire_start(
        &self,
        py: Python<'_>,
        event_loop: Py<PyAny>,
        callback: Py<PyAny>,
    ) -> PyResult<AsyncOp> {
        let (store, req) = self.prepare()?;
        let sent_at = Instant::now();
        let s = Arc::clone(&store);
        start(
            py,
            Box::pin(async move { baton::kit::wait::acquire(&*s, &req, None).await }),
            move |py, granted| {
                let lease = Lease::start(store, granted.map_err(to_py)?, sent_at).map_err(to_py)?;
                Ok(Py::new(py, lease)?.into_any())
            },
            event_loop,
            callback,
        )
    }
}
