//! `baton barrier KEY --parties N [-w DURATION]`: wait until N parties have arrived.
//!
//! Each caller arrives; all return once N have arrived. The barrier is reusable: the next
//! N arrivals form the next generation. When `-w` runs out, the caller's arrival is
//! withdrawn and baton exits 75. See `baton::barrier` for what each store guarantees about
//! parties that die while waiting.

use std::time::Duration;

use baton::{parse_duration, Key};
use clap::Args as ClapArgs;
use serde_json::json;

use crate::common::{open_store, print, print_json, runtime, Failure};
use crate::exit_code;
use crate::signals::Signals;

/// Options of `baton barrier`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The barrier's name (a key; it does not interfere with a lock of the same name).
    #[arg(value_name = "KEY")]
    pub key: String,

    /// How many parties make the barrier pass (every party must give the same number).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub parties: u32,

    /// Wait at most this long (500ms, 2s, 1m); then withdraw and exit 75.
    #[arg(short = 'w', long, value_name = "DURATION")]
    pub wait: Option<String>,

    /// Print one JSON line: {"type":"passed","key":...,"generation":...,"parties":...}.
    #[arg(long)]
    pub json: bool,
}

/// Runs `baton barrier`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    let key = Key::new(args.key.as_str())?;
    let wait: Option<Duration> = args
        .wait
        .as_deref()
        .map(|w| parse_duration(w).map_err(|e| Failure::usage(format!("-w {w}: {e}"))))
        .transpose()?;
    let store = open_store(store)?;
    let passed = runtime()?.block_on(async {
        // A signal while waiting withdraws the arrival (the wait's future is dropped) and
        // ends baton with 128+N, as `run` does while waiting for a lock.
        let mut signals = Signals::install()
            .map_err(|e| Failure::new(exit_code::FAILURE, format!("cannot catch signals: {e}")))?;
        tokio::select! {
            r = baton::barrier::wait(&*store, &key, args.parties, wait) => r.map_err(Failure::from),
            sig = signals.recv() => Err(Failure::quiet(exit_code::for_signal(sig))),
        }
    })?;
    if args.json {
        print_json(&json!({
            "type": "passed",
            "key": passed.key.as_str(),
            "generation": passed.generation,
            "parties": passed.parties,
        }))?;
    } else {
        print(&format!(
            "barrier '{}': generation {} passed ({} parties)\n",
            passed.key, passed.generation, passed.parties
        ))?;
    }
    Ok(exit_code::SUCCESS)
}
