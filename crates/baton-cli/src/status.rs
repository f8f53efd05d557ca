//! `baton status [KEY]`: each key's limit, its slots and their holders, as an aligned
//! table or as JSON Lines (`{"type":"key",...}` per key, its slots inside). On lease
//! stores a held slot also shows its last heartbeat (renewal) and when it expires unless
//! renewed, as the store records or estimates them: for people, not for decisions.
//!
//! A key the store does not have is a failure (exit 1, the store's `NotFound`).

use std::sync::Arc;

use baton::{format_duration, Key, KeyStatus, SlotState, SlotStatus, Store};
use clap::Args as ClapArgs;

use crate::common::{
    age_since, eprint_line, open_store, print, print_json, runtime, table, Failure, Row,
};
use crate::exit_code;

/// Options of `baton status`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The key to show; every key when not given.
    #[arg(value_name = "KEY")]
    pub key: Option<String>,

    /// Print JSON Lines: {"type":"key",...} per key, with its slots.
    #[arg(long)]
    pub json: bool,
}

/// Runs `baton status`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    let wanted = args.key.as_deref().map(Key::new).transpose()?;
    let store = open_store(store)?;
    runtime()?.block_on(async {
        let keys = match wanted {
            Some(key) => vec![key],
            None => store.list().await?,
        };
        show(&store, &keys, args.json).await
    })
}

/// Inspects and prints each key. A key that cannot be read is reported on its own line
/// and the others are still shown; the exit code is then the first failure's.
async fn show(store: &Arc<dyn Store>, keys: &[Key], json: bool) -> Result<u8, Failure> {
    let mut code = exit_code::SUCCESS;
    let mut first = true;
    for key in keys {
        let status = match store.inspect(key).await {
            Ok(status) => status,
            Err(err) => {
                let failure = Failure::from(err);
                eprint_line(&failure.message);
                if code == exit_code::SUCCESS {
                    code = failure.code;
                }
                continue;
            }
        };
        if json {
            print_json(&key_json(&status))?;
        } else {
            let mut text = String::new();
            if !first {
                text.push('\n');
            }
            text.push_str(&human(&status));
            print(&text)?;
        }
        first = false;
    }
    Ok(code)
}

/// One key as a JSON object with `type: "key"`.
pub fn key_json(status: &KeyStatus) -> serde_json::Value {
    let held = status.held();
    serde_json::json!({
        "type": "key",
        "key": status.key.as_str(),
        "limit": status.limit,
        "held": held,
        "free": status.slots.len().saturating_sub(held),
        "waiters": status.waiters,
        "last_token": status.last_token.map(|t| t.0),
        "lock_delay_ms": status.lock_delay_ms,
        "slots": status.slots.iter().map(slot_json).collect::<Vec<_>>(),
    })
}

/// One slot as a JSON object; `age_ms` is how long it has been held.
pub fn slot_json(slot: &SlotStatus) -> serde_json::Value {
    let mut value = serde_json::json!({
        "slot": slot.slot,
        "state": state_name(slot.state),
    });
    if let Some(obj) = value.as_object_mut() {
        if let Some(token) = slot.token {
            obj.insert("token".into(), token.0.into());
        }
        if let Some(holder) = &slot.holder {
            obj.insert(
                "holder".into(),
                serde_json::to_value(holder).unwrap_or(serde_json::Value::Null),
            );
        }
        if let Some(since) = slot.since_unix_ms {
            obj.insert("since_unix_ms".into(), since.into());
            let age = age_since(since);
            obj.insert("age_ms".into(), (age.as_millis() as u64).into());
            obj.insert("age".into(), format_duration(age).into());
        }
        if let Some(renewed) = slot.renewed_unix_ms {
            obj.insert("renewed_unix_ms".into(), renewed.into());
            let ago = age_since(renewed);
            obj.insert("heartbeat_age_ms".into(), (ago.as_millis() as u64).into());
        }
        if let Some(expires) = slot.expires_unix_ms {
            obj.insert("expires_unix_ms".into(), expires.into());
            obj.insert(
                "expires_in_ms".into(),
                (time_until(expires).as_millis() as u64).into(),
            );
        }
        if let Some(note) = &slot.note {
            obj.insert("note".into(), note.clone().into());
        }
    }
    value
}

/// How long until `unix_ms` on this host's wall clock (zero when it has passed). For
/// display only, like the store's estimate it is computed from.
fn time_until(unix_ms: u64) -> std::time::Duration {
    baton::from_unix_ms(unix_ms)
        .duration_since(std::time::SystemTime::now())
        .unwrap_or(std::time::Duration::ZERO)
}

fn state_name(state: SlotState) -> &'static str {
    match state {
        SlotState::Free => "free",
        SlotState::Held => "held",
    }
}

/// One key for people: a summary line, then an aligned table of its slots, a slot's
/// note under its row.
pub fn human(status: &KeyStatus) -> String {
    let held = status.held();
    let mut summary = format!(
        "{}: {held} of {} slot(s) held, {} free",
        status.key,
        status.limit,
        status.slots.len().saturating_sub(held)
    );
    if let Some(w) = status.waiters {
        summary.push_str(&format!(", {w} waiting"));
    }
    if let Some(t) = status.last_token {
        summary.push_str(&format!(", last token {t}"));
    }
    if let Some(ms) = status.lock_delay_ms {
        // A slot the delay holds back says so, and for how much longer, in its note.
        summary.push_str(&format!(
            ", lock-delay {}",
            format_duration(std::time::Duration::from_millis(ms))
        ));
    }
    summary.push('\n');
    summary.push_str(&slots_table(&status.slots));
    summary
}

/// The slots as an aligned table with a header, indented two spaces.
pub fn slots_table(slots: &[SlotStatus]) -> String {
    let mut rows = vec![Row::Cells(
        [
            "SLOT",
            "STATE",
            "TOKEN",
            "PID",
            "HOST",
            "USER",
            "AGE",
            "HEARTBEAT",
            "EXPIRES",
            "HOLDER",
            "COMMAND",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
    )];
    for slot in slots {
        let dash = || "-".to_owned();
        let holder = slot.holder.as_ref();
        rows.push(Row::Cells(vec![
            slot.slot.to_string(),
            state_name(slot.state).to_owned(),
            slot.token.map_or_else(dash, |t| t.to_string()),
            holder.map_or_else(dash, |h| h.pid.to_string()),
            holder.map_or_else(dash, |h| h.host.clone()),
            holder.map_or_else(dash, |h| h.user.clone()),
            slot.since_unix_ms
                .map_or_else(dash, |ms| format_duration(age_since(ms))),
            slot.renewed_unix_ms
                .map_or_else(dash, |ms| format!("{} ago", format_duration(age_since(ms)))),
            slot.expires_unix_ms
                .map_or_else(dash, |ms| format!("in {}", format_duration(time_until(ms)))),
            holder.map_or_else(dash, |h| h.id.to_string()),
            holder.map_or_else(dash, |h| h.command_line()),
        ]));
        if let Some(note) = &slot.note {
            rows.push(Row::Line(format!("      note: {note}")));
        }
    }
    table(&rows, "  ")
}
