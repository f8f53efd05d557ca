//! `baton resize KEY N`: change a semaphore's limit (lease stores: SQLite, the directory
//! store's lease mode). Lowering the limit never evicts a holder: new grants stop until
//! the holders drain below it.

use baton::Key;
use clap::Args as ClapArgs;

use crate::common::{open_store, print, runtime, Failure};
use crate::exit_code;

/// Options of `baton resize`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The key (it must exist).
    pub key: String,

    /// The new limit: how many may hold the key at once.
    #[arg(value_parser = clap::value_parser!(u32).range(1..))]
    pub limit: u32,

    /// Print one JSON line {"type":"resized",...}.
    #[arg(long)]
    pub json: bool,
}

/// Runs `baton resize`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    let key = Key::new(args.key.as_str())?;
    let store = open_store(store)?;
    let status = runtime()?.block_on(store.resize(&key, args.limit))?;
    let held = status.held();
    let text = if args.json {
        serde_json::json!({
            "type": "resized",
            "key": key.as_str(),
            "limit": status.limit,
            "held": held,
        })
        .to_string()
    } else if held > status.limit as usize {
        format!(
            "resized '{key}' to {} slot(s); {held} hold it now, so new grants wait until fewer than {} do",
            status.limit, status.limit
        )
    } else {
        format!("resized '{key}' to {} slot(s); {held} held", status.limit)
    };
    print(&format!("{text}\n"))?;
    Ok(exit_code::SUCCESS)
}
