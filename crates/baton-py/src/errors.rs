//! baton's errors as Python exceptions: the classes live in `baton._errors` (so that
//! `TimeoutError` can also be Python's builtin one); the message is the CLI's line,
//! `format!("{err:#}")`.

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use baton::ErrorKind;

static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The exception class for an error kind.
fn class_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Busy => "BusyError",
        ErrorKind::Timeout => "TimeoutError",
        ErrorKind::Lost => "LostError",
        ErrorKind::NotHeld => "NotHeldError",
        ErrorKind::NotFound => "NotFoundError",
        ErrorKind::InvalidKey => "InvalidKeyError",
        ErrorKind::InvalidInput => "InvalidInputError",
        ErrorKind::LimitMismatch => "LimitMismatchError",
        ErrorKind::Unavailable => "UnavailableError",
        ErrorKind::Corrupt => "CorruptError",
        ErrorKind::Unsupported => "UnsupportedError",
        ErrorKind::Fenced => "FencedError",
        _ => "Error",
    }
}

fn class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    let module = MODULE.get_or_try_init(py, || py.import("baton._errors").map(|m| m.unbind()))?;
    Ok(module.bind(py).getattr(name)?.cast_into::<PyType>()?)
}

/// The Python exception for a baton error, with `kind`, `retryable`, `grant_unknown`,
/// `current_limit`, `op`, `key` and `store` attributes.
pub fn to_py(err: baton::Error) -> PyErr {
    Python::attach(|py| build(py, &err).unwrap_or_else(|e| e))
}

fn build(py: Python<'_>, err: &baton::Error) -> Result<PyErr, PyErr> {
    let cls = class(py, class_name(err.kind()))?;
    let exc = cls.call1((format!("{err:#}"),))?;
    exc.setattr("kind", err.kind().as_str())?;
    exc.setattr("retryable", err.is_retryable())?;
    exc.setattr("grant_unknown", err.grant_unknown())?;
    exc.setattr("current_limit", err.current_limit())?;
    exc.setattr("op", err.op().map(|o| o.to_string()))?;
    exc.setattr("key", err.key())?;
    exc.setattr("store", err.store())?;
    Ok(PyErr::from_value(exc))
}

/// A `baton.Error` subclass of `kind` with a message of ours (no Rust error behind it).
pub fn new(kind: ErrorKind, message: impl Into<String>) -> PyErr {
    to_py(baton::Error::new(kind, message))
}

/// `InvalidInputError` for a bad argument (a duration, a limit).
pub fn invalid(message: impl Into<String>) -> PyErr {
    new(ErrorKind::InvalidInput, message)
}

/// `TypeError` for an argument of the wrong type.
pub fn wrong_type(message: impl Into<String>) -> PyErr {
    PyTypeError::new_err(message.into())
}

/// An internal error that should not happen.
pub fn internal(message: &str) -> PyErr {
    PyRuntimeError::new_err(format!("baton: internal error: {message}"))
}
