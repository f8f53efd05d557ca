//! `baton list`: every key the store knows, sorted, one per line (or JSON Lines with
//! `type: "key"`).

use clap::Args as ClapArgs;

use crate::common::{open_store, print, runtime, Failure};
use crate::exit_code;

/// Options of `baton list`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Print JSON Lines: {"type":"key","key":...} per key.
    #[arg(long)]
    pub json: bool,
}

/// Runs `baton list`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    let store = open_store(store)?;
    let keys = runtime()?.block_on(store.list())?;
    let mut text = String::new();
    for key in keys {
        let line = if args.json {
            serde_json::json!({"type": "key", "key": key.as_str()}).to_string()
        } else {
            key.to_string()
        };
        text.push_str(&line);
        text.push('\n');
    }
    print(&text)?;
    Ok(exit_code::SUCCESS)
}
