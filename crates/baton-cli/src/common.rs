//! What every subcommand shares: the failure type that carries an exit code and the one
//! `baton: ` line to print, opening the store, the Tokio runtime, and writing to stdout
//! so that a closed pipe ends baton quietly.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton::{Op, Store, StoreUrl};

use crate::exit_code;

/// A failure: the exit code and the message printed after `baton: ` (nothing when the
/// message is empty, as for a closed stdout).
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// One line, without the `baton: ` prefix; empty to print nothing.
    pub message: String,
}

impl Failure {
    /// A failure with `code` and `message`.
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// A usage error (exit 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure::new(exit_code::USAGE, message)
    }

    /// Ends baton with `code` and prints nothing.
    pub fn quiet(code: u8) -> Failure {
        Failure::new(code, String::new())
    }

    /// A failure to write to stdout: quiet success when the reader went away (as
    /// `head` does), otherwise a failure.
    pub fn stdout(err: io::Error) -> Failure {
        if err.kind() == io::ErrorKind::BrokenPipe {
            Failure::quiet(exit_code::SUCCESS)
        } else {
            Failure::new(
                exit_code::FAILURE,
                format!("cannot write to standard output: {err}"),
            )
        }
    }
}

impl From<baton::Error> for Failure {
    fn from(err: baton::Error) -> Failure {
        let code = exit_code::for_error(err.kind());
        // A parse error's message already names what was parsed ("invalid key ...");
        // the generic "parse: " prefix would only add noise.
        let message = if err.op() == Some(Op::Parse) {
            format!("{err:#}")
                .strip_prefix("parse: ")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{err:#}"))
        } else {
            format!("{err:#}")
        };
        Failure::new(code, message)
    }
}

/// The store URL: `-s/--store` (or `BATON_STORE`, which clap fills in), else the
/// default directory store. A relative file path (`-s ./locks`, `-s sqlite:jobs.db`) is
/// made absolute against the working directory, so the child's `BATON_STORE` names the
/// same store wherever the child goes.
pub fn store_url(arg: Option<&str>) -> Result<StoreUrl, Failure> {
    match arg {
        Some(text) if !text.trim().is_empty() => {
            let url = StoreUrl::parse(text)?;
            // `-s` may come from BATON_STORE (clap fills it): warn only when the URL with
            // its password is really on the command line, where `ps` shows it.
            if std::env::args_os().any(|a| a.to_string_lossy().contains(text)) {
                baton::secret::warn_if_password_on_command_line(&url);
            }
            Ok(match std::env::current_dir() {
                Ok(cwd) => url.resolve_against(&cwd),
                // The store refuses the relative path and says so.
                Err(_) => url,
            })
        }
        _ => Ok(baton::default_url()?),
    }
}

/// Opens the store that `-s/--store`, `BATON_STORE` or the default names.
pub fn open_store(arg: Option<&str>) -> Result<Arc<dyn Store>, Failure> {
    let url = store_url(arg)?;
    Ok(baton::open_url(&url)?)
}

/// A single-threaded Tokio runtime with I/O, time and signals.
///
/// Single-threaded on purpose: `run` spawns its child from the main thread, which lives
/// as long as baton, because `PR_SET_PDEATHSIG` fires when the *thread* that forked the
/// child exits.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(exit_code::FAILURE, format!("cannot start: {e}")))
}

/// Writes `text` to stdout and flushes it.
pub fn print(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(Failure::stdout)
}

/// Writes one JSON value as one line (JSON Lines) to stdout.
pub fn print_json(value: &serde_json::Value) -> Result<(), Failure> {
    print(&format!("{value}\n"))
}

/// Prints a line to stderr, prefixed `baton: `. Errors writing to stderr are ignored:
/// there is nowhere left to report them.
pub fn eprint_line(message: &str) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "baton: {message}");
}

/// Aligns `rows` into columns two spaces apart; the last column is not padded. Each
/// `Row::Line` is printed as it is, outside the alignment (notes under a row).
pub fn table(rows: &[Row], indent: &str) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        if let Row::Cells(cells) = row {
            for (i, cell) in cells.iter().enumerate() {
                let w = cell.chars().count();
                match widths.get_mut(i) {
                    Some(max) => *max = (*max).max(w),
                    None => widths.push(w),
                }
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        out.push_str(indent);
        match row {
            Row::Cells(cells) => {
                let mut line = String::new();
                for (i, cell) in cells.iter().enumerate() {
                    if i + 1 == cells.len() {
                        line.push_str(cell);
                    } else {
                        let pad = widths[i] - cell.chars().count();
                        line.push_str(cell);
                        line.push_str(&" ".repeat(pad + 2));
                    }
                }
                out.push_str(line.trim_end());
            }
            Row::Line(text) => out.push_str(text),
        }
        out.push('\n');
    }
    out
}

/// One row of a [`table`].
pub enum Row {
    /// Cells to align.
    Cells(Vec<String>),
    /// A line printed as it is.
    Line(String),
}

/// How long ago `unix_ms` was, for display (`3m20s`); `0ms` for a time in the future.
pub fn age_since(unix_ms: u64) -> Duration {
    SystemTime::now()
        .duration_since(baton::from_unix_ms(unix_ms))
        .unwrap_or(Duration::ZERO)
}
