//! Python values in and out: durations as the CLI takes them, and status, leader and
//! barrier results as plain dicts (wall-clock times as Unix seconds, for display only).

use std::time::Duration;

use baton::{Holder, KeyStatus, Leader, SlotState, Wait};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::errors;

/// A duration from a string as the CLI takes it (`"500ms"`, `"1m30s"`, `"2.5"`), a number
/// of seconds, or a `datetime.timedelta`. `what` names the argument in errors.
pub fn duration(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Duration> {
    if let Ok(text) = value.extract::<String>() {
        return baton::parse_duration(&text).map_err(|e| errors::invalid(format!("{what}: {e}")));
    }
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(errors::wrong_type(format!(
            "{what}: expected a duration (seconds or a string such as '500ms'), got a bool"
        )));
    }
    let secs: f64 = match value.extract::<f64>() {
        Ok(s) => s,
        Err(_) => match value.call_method0("total_seconds") {
            Ok(s) => s.extract()?,
            Err(_) => {
                return Err(errors::wrong_type(format!(
                    "{what}: expected a duration (seconds, a string such as '500ms', or a \
                     timedelta), got {}",
                    value.get_type().name()?
                )))
            }
        },
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(errors::invalid(format!(
            "{what}: invalid duration {secs}: must be a finite number of seconds, at least 0"
        )));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| errors::invalid(format!("{what}: duration {secs} is out of range")))
}

/// How long to wait: `None` forever, `0` not at all, else at most that long.
pub fn wait(value: Option<&Bound<'_, PyAny>>) -> PyResult<Wait> {
    match value {
        None => Ok(Wait::Forever),
        Some(v) if v.is_none() => Ok(Wait::Forever),
        Some(v) => match duration(v, "wait")? {
            d if d.is_zero() => Ok(Wait::NoWait),
            d => Ok(Wait::Timeout(d)),
        },
    }
}

/// A lease's TTL: `None` for the store's default; at least 100 ms, as the CLI requires.
pub fn ttl(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Duration>> {
    let Some(v) = value.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    let d = duration(v, "ttl")?;
    if d < Duration::from_millis(100) {
        return Err(errors::invalid(format!(
            "ttl {} is too short: at least 100ms (renewals happen every TTL/3)",
            baton::format_duration(d)
        )));
    }
    Ok(Some(d))
}

fn secs(ms: Option<u64>) -> Option<f64> {
    ms.map(|ms| ms as f64 / 1000.0)
}

/// A holder as a dict: id, pid, host, user, command, started.
pub fn holder<'py>(py: Python<'py>, h: &Holder) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("holder", h.id.to_string())?;
    d.set_item("pid", h.pid)?;
    d.set_item("host", &h.host)?;
    d.set_item("user", &h.user)?;
    d.set_item("command", PyList::new(py, &h.command)?)?;
    d.set_item("started", secs(Some(h.started_unix_ms)))?;
    Ok(d)
}

/// A key's status as a dict (see the `.pyi` for its fields).
pub fn status<'py>(py: Python<'py>, st: &KeyStatus) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("key", st.key.as_str())?;
    d.set_item("limit", st.limit)?;
    d.set_item("held", st.held())?;
    d.set_item("waiters", st.waiters)?;
    d.set_item("last_token", st.last_token.map(|t| t.0))?;
    d.set_item("lock_delay", secs(st.lock_delay_ms))?;
    let holders = PyList::empty(py);
    let slots = PyList::empty(py);
    for s in &st.slots {
        let slot = PyDict::new(py);
        slot.set_item("slot", s.slot)?;
        let held = s.state == SlotState::Held;
        slot.set_item("state", if held { "held" } else { "free" })?;
        slot.set_item("token", s.token.map(|t| t.0))?;
        slot.set_item("note", s.note.as_deref())?;
        slots.append(&slot)?;
        if held {
            let h = match &s.holder {
                Some(h) => holder(py, h)?,
                None => PyDict::new(py),
            };
            h.set_item("slot", s.slot)?;
            h.set_item("token", s.token.map(|t| t.0))?;
            h.set_item("created", secs(s.since_unix_ms))?;
            h.set_item("heartbeat", secs(s.renewed_unix_ms))?;
            h.set_item("expires", secs(s.expires_unix_ms))?;
            h.set_item("note", s.note.as_deref())?;
            holders.append(h)?;
        }
    }
    d.set_item("holders", holders)?;
    d.set_item("slots", slots)?;
    Ok(d)
}

/// Who leads, as a dict, or `None`.
pub fn leader<'py>(py: Python<'py>, l: Option<&Leader>) -> PyResult<Option<Bound<'py, PyDict>>> {
    let Some(l) = l else { return Ok(None) };
    let d = match &l.holder {
        Some(h) => holder(py, h)?,
        None => PyDict::new(py),
    };
    d.set_item("key", l.key.as_str())?;
    d.set_item("token", l.token.map(|t| t.0))?;
    d.set_item("since", secs(l.since_unix_ms))?;
    Ok(Some(d))
}
