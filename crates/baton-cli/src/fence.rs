//! `baton fence`: make a write to a SQLite database only if the writer still holds the
//! lock, judged by its fencing token (the resource side of contract point 2).
//!
//! Inside `baton run`, `baton fence --db results.db "INSERT ..."` takes the key and token
//! from `BATON_KEY` and `BATON_TOKEN`, and runs the SQL in the same transaction as the
//! check: a holder that was paused past its lease, and whose slot someone else has taken
//! since, has its late write refused (exit 77) and nothing is written.

use std::io::Read;
use std::path::PathBuf;

use baton::fence::{rusqlite, Fence, FenceRule};
use baton::{Key, Token};
use clap::Args as ClapArgs;

use crate::common::{eprint_line, Failure};
use crate::exit_code;

/// Options of `baton fence`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The SQLite database to write to (created if missing).
    #[arg(long, value_name = "FILE")]
    pub db: PathBuf,

    /// The key whose tokens fence the write. Default: $BATON_KEY (set by baton run).
    #[arg(short = 'k', long, value_name = "KEY")]
    pub key: Option<String>,

    /// The writer's fencing token. Default: $BATON_TOKEN (set by baton run).
    #[arg(long, value_name = "N")]
    pub token: Option<u64>,

    /// Accept only a token higher than any seen: one write per grant. By default a token
    /// equal to the highest seen is accepted (one grant may write many times).
    #[arg(long)]
    pub once: bool,

    /// The SQL to run (one or more statements); read from standard input when absent.
    #[arg(value_name = "SQL")]
    pub sql: Option<String>,
}

/// Runs `baton fence`; returns the exit code.
pub fn run(args: Args) -> Result<u8, Failure> {
    let key = match args.key.or_else(|| std::env::var("BATON_KEY").ok()) {
        Some(k) => Key::new(k)?,
        None => {
            return Err(Failure::usage(
                "no key: pass -k KEY, or run inside baton run (BATON_KEY)",
            ))
        }
    };
    let token = match args.token {
        Some(t) => t,
        None => match std::env::var("BATON_TOKEN") {
            Ok(t) => t
                .parse()
                .map_err(|_| Failure::usage(format!("BATON_TOKEN is not a number: {t:?}")))?,
            Err(_) => {
                return Err(Failure::usage(
                    "no token: pass --token N, or run inside baton run (BATON_TOKEN)",
                ))
            }
        },
    };
    let sql = match args.sql {
        Some(sql) => sql,
        None => {
            let mut sql = String::new();
            std::io::stdin()
                .read_to_string(&mut sql)
                .map_err(|e| Failure::usage(format!("cannot read SQL from standard input: {e}")))?;
            sql
        }
    };
    if sql.trim().is_empty() {
        return Err(Failure::usage("no SQL to run"));
    }
    let mut conn = rusqlite::Connection::open(&args.db).map_err(|e| {
        Failure::new(
            exit_code::UNAVAILABLE,
            format!("fence: cannot open {}: {e}", args.db.display()),
        )
    })?;
    let rule = if args.once {
        FenceRule::NewerOnly
    } else {
        FenceRule::SameOrNewer
    };
    match Fence::new(rule).write(&mut conn, key.as_str(), Token(token), |tx| {
        tx.execute_batch(&sql)
    }) {
        Ok(()) => Ok(exit_code::SUCCESS),
        Err(e) if e.kind() == baton::ErrorKind::Fenced => {
            eprint_line(&format!("{e:#}"));
            Ok(exit_code::FENCED)
        }
        Err(e) => Err(e.into()),
    }
}
