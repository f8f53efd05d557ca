//! `baton delete KEY`: remove a key that nobody holds or waits for (its limit, lock-delay
//! and records go; the next acquire creates it anew, and its tokens keep rising).
//! Refused, changing nothing, while anyone holds or waits for it.

use baton::Key;
use clap::Args as ClapArgs;

use crate::common::{open_store, print, runtime, Failure};
use crate::exit_code;

/// Options of `baton delete`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The key.
    pub key: String,

    /// Print one JSON line {"type":"deleted","key":...}.
    #[arg(long)]
    pub json: bool,
}

/// Runs `baton delete`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    let key = Key::new(args.key.as_str())?;
    let store = open_store(store)?;
    runtime()?.block_on(store.delete(&key))?;
    let text = if args.json {
        serde_json::json!({ "type": "deleted", "key": key.as_str() }).to_string()
    } else {
        format!("deleted '{key}'")
    };
    print(&format!("{text}\n"))?;
    Ok(exit_code::SUCCESS)
}
