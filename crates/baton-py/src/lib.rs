//! `baton._baton`: the native half of the `baton` Python package (the Python half, in
//! `python/baton/`, adds the `Lock` context managers, asyncio glue and exception classes).
//!
//! Everything here is a thin layer over the Rust library: stores come from
//! `baton::open_url`, grants from `Store::acquire`, renewals from `baton::Keeper`. What
//! this layer adds is how Python waits (GIL released, signals checked, cancellation by
//! dropping the future), how asyncio is told (`loop.call_soon_threadsafe`), and what a
//! forked child may touch (nothing of its parent's).

use pyo3::prelude::*;

mod convert;
mod errors;
mod lease;
mod runtime;
mod store;

/// Opens the store `url` names; `None`: the default store (`$BATON_STORE`, else the
/// default directory).
#[pyfunction]
#[pyo3(signature = (url=None))]
fn open(url: Option<&str>) -> PyResult<store::Store> {
    store::Store::open(url)
}

/// A duration in seconds from what `ttl=` and `wait=` take: `"500ms"`, `"1m30s"`, `2.5`,
/// a `timedelta`.
#[pyfunction]
fn parse_duration(value: &Bound<'_, PyAny>) -> PyResult<f64> {
    Ok(convert::duration(value, "duration")?.as_secs_f64())
}

/// Disowns the parent's leases and stores; `os.register_at_fork(after_in_child=...)`.
#[pyfunction]
fn _after_fork_in_child() {
    runtime::after_fork_in_child();
}

#[pymodule]
fn _baton(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(open, m)?)?;
    m.add_function(wrap_pyfunction!(parse_duration, m)?)?;
    m.add_function(wrap_pyfunction!(_after_fork_in_child, m)?)?;
    m.add_class::<store::Store>()?;
    m.add_class::<store::Request>()?;
    m.add_class::<store::AsyncOp>()?;
    m.add_class::<lease::Lease>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
