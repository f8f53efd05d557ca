//! The `baton` command: run a command while holding a lock, and inspect and manage locks.
//!
//! This file only parses arguments and hands each subcommand to its module; exit codes
//! live in `exit_code.rs`. Every failure prints exactly one line, `baton: <what>: <why>`,
//! to stderr; a closed stdout ends baton quietly.

mod barrier;
mod brk;
mod common;
mod delete;
mod exit_code;
mod fence;
mod leader;
mod list;
mod resize;
mod run;
mod signals;
mod status;
mod stress;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::common::{eprint_line, Failure};

/// baton: mutexes and counting semaphores with fencing tokens, over a store chosen by URL.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    subcommand_required = true,
    after_help = exit_code::HELP_TABLE
)]
struct Cli {
    /// The store URL (see --help for every store this build has). Default: $BATON_STORE,
    /// else $XDG_RUNTIME_DIR/baton, else /tmp/baton-$UID.
    #[arg(
        short = 's',
        long,
        global = true,
        env = "BATON_STORE",
        hide_env_values = true,
        value_name = "URL"
    )]
    store: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a command while holding a slot of a key: baton run -k KEY -- COMMAND [ARGS...]
    ///
    /// The command gets BATON_KEY, BATON_TOKEN (the fencing token), BATON_SLOT,
    /// BATON_HOLDER and BATON_STORE in its environment. It runs in its own process
    /// group; SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to baton are
    /// passed on to it. The slot is released when the last process of that group has
    /// exited; if baton dies, the group is stopped (SIGTERM, SIGKILL after --kill-grace)
    /// before the slot can be granted again. A process that leaves the group (setsid)
    /// is not stopped.
    ///
    /// A wait rides out an outage of the store (a server restart, an election): baton
    /// backs off and asks again within the wait (forever by default), saying so on the
    /// first retry and, with -v, on every one. Only the wait running out, a permanent
    /// error (refused credentials, a permission or symlink in the lock directory) or a
    /// signal ends it.
    #[command(
        after_help = exit_code::HELP_TABLE,
        override_usage = "baton run [OPTIONS] [--] COMMAND [ARGS...]"
    )]
    Run(run::Args),

    /// Show each key's limit, slots, holders (token, pid, host, user, age) and notes.
    #[command(after_help = exit_code::HELP_TABLE)]
    Status(status::Args),

    /// List every key in the store.
    #[command(after_help = exit_code::HELP_TABLE)]
    List(list::Args),

    /// Free a dead or stuck holder's slot (lease stores); --kill stops live holders.
    ///
    /// The directory store cannot break a lock and does not need to: the kernel frees a
    /// slot the moment its holder exits. There, `break` shows the holders and exits 1,
    /// and `break --kill` sends SIGTERM to each holder that is alive on this host.
    #[command(name = "break", after_help = exit_code::HELP_TABLE)]
    Break(brk::Args),

    /// Show who leads a key: the holder of its one slot (pid, host, user, token, age).
    ///
    /// Candidates campaign with `baton run -k KEY -- COMMAND`: the one that holds the key
    /// leads, the others wait as standbys and the next takes over when it exits. Exits 0
    /// when there is a leader, 1 when there is none (also for a key the store does not
    /// have), 2 for a bad key or a key that is a semaphore of several slots.
    #[command(after_help = exit_code::HELP_TABLE)]
    Leader(leader::Args),

    /// Change a semaphore's limit to N, or by +N/-N (lease stores; not kernel-lock dir:PATH).
    ///
    /// Lowering it never evicts a holder: new grants wait until fewer than the new limit
    /// hold the key. Requests must then ask for the new limit (-n).
    #[command(after_help = exit_code::HELP_TABLE)]
    Resize(resize::Args),

    /// Remove a key nobody holds or waits for (every store).
    ///
    /// Its limit, lock-delay and records go; the next acquire creates it anew, with its
    /// own limit, and its tokens keep rising from the old ones. While a slot is held (or
    /// held back by a lock-delay) or a request waits, it is refused and changes nothing:
    /// exit 75. No such key: exit 1.
    #[command(after_help = exit_code::HELP_TABLE)]
    Delete(delete::Args),

    /// Write to a SQLite database only if this holder's fencing token is still current.
    ///
    /// Inside `baton run`: `baton fence --db results.db "INSERT ..."` takes the key and
    /// token from BATON_KEY and BATON_TOKEN and runs the SQL in the same transaction as
    /// the check. A holder that lost the lock (paused past its lease, and someone else
    /// wrote since with a newer token) has its write refused: exit 77, nothing written.
    #[command(after_help = exit_code::HELP_TABLE)]
    Fence(fence::Args),

    /// Wait until N parties have arrived at a barrier (reusable: the next N form the next
    /// generation); -w gives up, withdraws the arrival and exits 75.
    #[command(after_help = exit_code::HELP_TABLE)]
    Barrier(barrier::Args),

    /// Prove the contract on a store with real processes: storm, crash, pause, partition,
    /// workflow, single. Exits 0 when every property held, 1 listing the violations.
    #[command(after_help = exit_code::HELP_TABLE)]
    Stress(stress::Args),
}

fn main() -> ExitCode {
    let command = Cli::command().mut_arg("store", |a| a.long_help(store_help()));
    let cli = match command
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(cli) => cli,
        Err(err) => return clap_exit(&err),
    };
    let store = cli.store.as_deref();
    let result = match cli.command {
        Command::Run(args) => run::run(store, args),
        Command::Status(args) => status::run(store, args),
        Command::List(args) => list::run(store, args),
        Command::Break(args) => brk::run(store, args),
        Command::Leader(args) => leader::run(store, args),
        Command::Resize(args) => resize::run(store, args),
        Command::Delete(args) => delete::run(store, args),
        Command::Fence(args) => fence::run(args),
        Command::Barrier(args) => barrier::run(store, args),
        Command::Stress(args) => stress::run(store, args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Failure { code, message }) => {
            if !message.is_empty() {
                eprint_line(&message);
            }
            ExitCode::from(code)
        }
    }
}

/// The long help of `-s/--store`: every store this build has, from the one registry
/// ([`baton::STORES`]), with an example URL.
fn store_help() -> String {
    let mut text = String::from("The store, by URL. This build has:\n");
    for kind in baton::built() {
        text.push_str(&format!("  {:<30} {}\n", kind.example, kind.summary));
    }
    let planned: Vec<&str> = baton::STORES
        .iter()
        .filter(|k| k.planned)
        .map(|k| k.example)
        .collect();
    if !planned.is_empty() {
        text.push_str(&format!("Not built yet: {}.\n", planned.join(", ")));
    }
    text.push_str(
        "A bare path (/abs, ./rel, ../rel) means dir:PATH; a relative dir: or sqlite: path \
         is resolved against the working directory. Default: $BATON_STORE, else \
         $XDG_RUNTIME_DIR/baton, else /tmp/baton-$UID (created 0700).",
    );
    text
}

/// `--help` and `--version` print as clap formats them and exit 0; any other clap error
/// becomes one `baton: ` line (its first paragraph) and exit 2.
fn clap_exit(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            // A closed stdout while printing help is not worth a message.
            let _ = err.print();
            ExitCode::from(exit_code::SUCCESS)
        }
        _ => {
            let text = err.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|line| !line.is_empty())
                .collect();
            let joined = first.join(" ");
            let message = joined.strip_prefix("error: ").unwrap_or(&joined);
            eprint_line(&format!("{message} (see baton --help)"));
            ExitCode::from(exit_code::USAGE)
        }
    }
}
