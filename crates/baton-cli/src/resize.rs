//! `baton resize KEY N|+N|-N`: set a semaphore's limit, or change it by a step (lease
//! stores). A step is applied atomically to the limit the store has, so two at once both
//! count; the limit stays at least 1. Lowering the limit never evicts a holder: new
//! grants stop until the holders drain below it.

use baton::{Key, Resize};
use clap::Args as ClapArgs;

use crate::common::{open_store, print, runtime, Failure};
use crate::exit_code;

/// Options of `baton resize`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The key (it must exist).
    pub key: String,

    /// The new limit (how many may hold the key at once), or a step: +N raises it by N,
    /// -N lowers it by N (never below 1).
    #[arg(value_name = "N|+N|-N", allow_hyphen_values = true, value_parser = parse_change)]
    pub change: Resize,

    /// Print one JSON line {"type":"resized",...}.
    #[arg(long)]
    pub json: bool,
}

/// Runs `baton resize`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    let key = Key::new(args.key.as_str())?;
    let store = open_store(store)?;
    let status = runtime()?.block_on(store.resize(&key, args.change))?;
    let held = status.held();
    let by = match args.change {
        Resize::By(step) => format!(" by {step:+}"),
        Resize::To(_) => String::new(),
    };
    let text = if args.json {
        serde_json::json!({
            "type": "resized",
            "key": key.as_str(),
            "change": args.change.to_string(),
            "limit": status.limit,
            "held": held,
        })
        .to_string()
    } else if held > status.limit as usize {
        format!(
            "resized '{key}'{by} to {} slot(s); {held} hold it now, so new grants wait until fewer than {} do",
            status.limit, status.limit
        )
    } else {
        format!(
            "resized '{key}'{by} to {} slot(s); {held} held",
            status.limit
        )
    };
    print(&format!("{text}\n"))?;
    Ok(exit_code::SUCCESS)
}

/// Parses `N`, `+N` or `-N` (the message says which forms there are).
fn parse_change(s: &str) -> Result<Resize, String> {
    s.parse::<Resize>().map_err(|e| e.to_string())
}
