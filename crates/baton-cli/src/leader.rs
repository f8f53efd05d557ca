//! `baton leader KEY`: who leads a key — the holder of its one slot — or that nobody does.
//!
//! Exit 0 when there is a leader, 1 when there is none (a free key, or a key the store
//! does not have), so a script can branch on it. `--json` prints one line,
//! `{"type":"leader",...}` or `{"type":"no_leader",...}`. `--wait` polls until there is a
//! leader. Reading never changes the store; candidates campaign with `baton run -k KEY`,
//! whose waiters are the standbys.

use std::sync::Arc;
use std::time::Duration;

use baton::{format_duration, Key, Leader, Store};
use clap::Args as ClapArgs;

use crate::common::{age_since, open_store, print, print_json, runtime, table, Failure, Row};
use crate::exit_code;

/// Options of `baton leader`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The key whose leader to show (a key held with `baton run -k KEY`, one slot).
    #[arg(value_name = "KEY")]
    pub key: String,

    /// Print one JSON line: {"type":"leader",...} or {"type":"no_leader","key":...}.
    #[arg(long)]
    pub json: bool,

    /// Wait until there is a leader, looking about every 200ms, then show it.
    #[arg(long)]
    pub wait: bool,
}

/// How often `--wait` looks again, at most (it starts faster).
const MAX_POLL: Duration = Duration::from_millis(200);

/// Runs `baton leader`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    let key = Key::new(args.key.as_str())?;
    let store = open_store(store)?;
    runtime()?.block_on(async {
        let found = if args.wait {
            wait_for_leader(&store, &key).await?
        } else {
            baton::leader(&*store, &key).await?
        };
        show(&key, found.as_ref(), args.json)
    })
}

/// Polls until the key has a leader; a signal ends baton as usual (reading leaves nothing
/// behind in the store).
async fn wait_for_leader(store: &Arc<dyn Store>, key: &Key) -> Result<Option<Leader>, Failure> {
    let mut poll = Duration::from_millis(10);
    loop {
        if let Some(leader) = baton::leader(&**store, key).await? {
            return Ok(Some(leader));
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(MAX_POLL);
    }
}

/// Prints the leader, or that there is none, and returns the exit code.
fn show(key: &Key, leader: Option<&Leader>, json: bool) -> Result<u8, Failure> {
    match (leader, json) {
        (Some(leader), true) => print_json(&leader_json(leader))?,
        (Some(leader), false) => print(&human(leader))?,
        (None, true) => print_json(&serde_json::json!({
            "type": "no_leader",
            "key": key.as_str(),
        }))?,
        (None, false) => print(&format!("no leader for '{key}'\n"))?,
    }
    Ok(if leader.is_some() {
        exit_code::SUCCESS
    } else {
        exit_code::FAILURE
    })
}

/// The leader as a JSON object with `type: "leader"`; `holder` is the whole holder record
/// (id, host, pid, user, command, ...), as in `status --json`.
fn leader_json(leader: &Leader) -> serde_json::Value {
    let mut value = serde_json::json!({
        "type": "leader",
        "key": leader.key.as_str(),
        "token": leader.token.map(|t| t.0),
        "holder": leader.holder.as_ref().map(|h| serde_json::to_value(h).unwrap_or_default()),
        "since_unix_ms": leader.since_unix_ms,
    });
    if let (Some(obj), Some(since)) = (value.as_object_mut(), leader.since_unix_ms) {
        let age = age_since(since);
        obj.insert("age_ms".into(), (age.as_millis() as u64).into());
        obj.insert("age".into(), format_duration(age).into());
    }
    value
}

/// The leader for people: a line naming the key, then one aligned `field  value` row per
/// field; `-` where the store cannot tell.
fn human(leader: &Leader) -> String {
    let dash = || "-".to_owned();
    let holder = leader.holder.as_ref();
    let rows: Vec<Row> = [
        ("pid", holder.map_or_else(dash, |h| h.pid.to_string())),
        ("host", holder.map_or_else(dash, |h| h.host.clone())),
        ("user", holder.map_or_else(dash, |h| h.user.clone())),
        ("token", leader.token.map_or_else(dash, |t| t.to_string())),
        (
            "age",
            leader
                .since_unix_ms
                .map_or_else(dash, |ms| format_duration(age_since(ms))),
        ),
        ("since", leader.since_unix_ms.map_or_else(dash, utc)),
        ("holder", holder.map_or_else(dash, |h| h.id.to_string())),
        ("command", holder.map_or_else(dash, |h| h.command_line())),
    ]
    .into_iter()
    .map(|(name, value)| Row::Cells(vec![name.to_owned(), value]))
    .collect();
    format!("leader of '{}':\n{}", leader.key, table(&rows, "  "))
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time, `2024-05-01T12:00:00Z`
/// (display only; the days-to-civil conversion of H. Hinnant's date algorithms).
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_formats_rfc3339() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_714_564_800_999), "2024-05-01T12:00:00Z");
    }
}
