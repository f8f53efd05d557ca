//! `baton run`: run a command while holding a slot of a key.
//!
//! Guarantees:
//! - The command starts only after the slot is granted, and the slot is released only
//!   after the command has exited (the directory store's locks are `O_CLOEXEC`, so the
//!   command never holds them itself; if baton is killed, the kernel frees them).
//! - A signal while waiting cancels the wait by dropping the acquire, which every store
//!   guarantees leaves nothing behind, and baton exits 128+N.
//! - Once the command runs, the [`FORWARDED`](crate::signals::FORWARDED) signals go to its
//!   process group, and baton's exit status is the command's (128+N for signal N).
//! - On a lease store, a keeper on its own thread renews the lease every TTL/3. When it
//!   declares the lease lost (before the store could grant it again), baton sends the
//!   command's process group SIGTERM, then SIGKILL after `--kill-grace`, and exits
//!   [`LEASE_LOST`](crate::exit_code::LEASE_LOST). What the command did meanwhile is only
//!   safe if the resource it writes checks `BATON_TOKEN`.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::{
    derive_key, format_duration, parse_duration, ErrorKind, Holder, Keeper, KeeperConfig, Key,
    LeaseGuard, LeaseState, Store, StoreExt, Wait,
};
use clap::Args as ClapArgs;
use tokio::signal::unix::{signal, SignalKind};

use crate::child::{Child, Exit, Tty};
use crate::common::{eprint_line, open_store, runtime, Failure};
use crate::exit_code;
use crate::signals::{self, Signals};

/// Options of `baton run`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The key to lock; derived from the command line when not given (see --verbose).
    #[arg(short = 'k', long, value_name = "KEY")]
    pub key: Option<String>,

    /// How many may hold the key at once (a semaphore); a new key keeps this limit,
    /// and an existing key must be asked for with the limit it has.
    #[arg(short = 'n', long, value_name = "SLOTS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: u32,

    /// Do not wait: fail at once (exit 75, or -E) when every slot is held.
    #[arg(long, visible_alias = "nonblock", conflicts_with = "wait")]
    pub no_wait: bool,

    /// Wait at most this long for a slot (500ms, 2s, 1m30s, or seconds as in 2.5);
    /// 0 means do not wait. Default: wait as long as it takes.
    #[arg(short = 'w', long, visible_alias = "timeout", value_name = "DURATION")]
    pub wait: Option<String>,

    /// The exit code when the slot is not acquired (default 75).
    #[arg(short = 'E', long, value_name = "CODE")]
    pub conflict_exit_code: Option<u8>,

    /// Lease stores: the lease's time to live. baton renews it every TTL/3 while the
    /// command runs; if it cannot, it stops the command before the lease could be granted
    /// to anyone else. Default: the store's (30s for dir:PATH?mode=lease). Kernel-lock
    /// stores (dir:PATH) ignore it: their locks last exactly as long as baton.
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<String>,

    /// Lease stores: the key's lock-delay (as in Chubby and Consul), set when this run
    /// creates the key (an existing key keeps its own). After a holder of the key is lost
    /// rather than released (its lease expired, it was broken with `baton break`, or its
    /// process died), no one is granted its slot for this long, so writes a stalled
    /// holder still had in flight drain before the next holder starts. A command that
    /// exits, however it exits, releases cleanly and never makes anyone wait. Kernel-lock
    /// stores (dir:PATH) refuse it: they never learn that a lock was lost.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub lock_delay: Option<Duration>,

    /// When the lease is lost: how long the command has between SIGTERM and SIGKILL.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub kill_grace: String,

    /// Print the key, and the slot and token when granted, to stderr.
    #[arg(short = 'v', long)]
    pub verbose: bool,

    /// Print a JSON line {"type":"grant",...} to stderr when the slot is granted.
    #[arg(long)]
    pub json: bool,

    /// The command to run and its arguments (after `--`).
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// Runs `baton run`; returns the exit code.
pub fn run(store: Option<&str>, args: Args) -> Result<u8, Failure> {
    if args.command.is_empty() {
        return Err(Failure::usage(
            "no command to run (usage: baton run [OPTIONS] -- COMMAND [ARGS...])",
        ));
    }
    let key = match &args.key {
        Some(text) => Key::new(text.as_str())?,
        None => derive_key(&args.command),
    };
    let wait = match (&args.no_wait, &args.wait) {
        (true, _) => Wait::NoWait,
        (false, Some(text)) => match parse_duration(text).map_err(Failure::usage)? {
            d if d.is_zero() => Wait::NoWait,
            d => Wait::Timeout(d),
        },
        (false, None) => Wait::Forever,
    };
    let ttl = match &args.ttl {
        Some(text) => match parse_duration(text).map_err(Failure::usage)? {
            d if d < Duration::from_millis(100) => {
                return Err(Failure::usage(format!(
                    "--ttl {text} is too short: at least 100ms (renewals happen every TTL/3)"
                )))
            }
            d => Some(d),
        },
        None => None,
    };
    let grace = parse_duration(&args.kill_grace).map_err(Failure::usage)?;
    let store = open_store(store)?;
    if args.verbose {
        eprint_line(&format!("key {key}"));
        if ttl.is_some() && !store.capabilities().renew {
            eprint_line(&format!(
                "--ttl has no effect on {}: its locks last exactly as long as baton",
                store.url()
            ));
        }
    }
    let opts = Options { wait, ttl, grace };
    runtime()?.block_on(hold_and_run(store, key, opts, &args))
}

/// What `run` parsed from its duration options.
struct Options {
    wait: Wait,
    ttl: Option<Duration>,
    grace: Duration,
}

async fn hold_and_run(
    store: Arc<dyn Store>,
    key: Key,
    opts: Options,
    args: &Args,
) -> Result<u8, Failure> {
    let wait = opts.wait;
    let mut signals = Signals::install()
        .map_err(|e| Failure::new(exit_code::FAILURE, format!("cannot catch signals: {e}")))?;
    let command: Vec<String> = args
        .command
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut request = store
        .lock(key.clone())
        .limit(args.slots)
        .lock_delay(args.lock_delay.unwrap_or_default())
        .holder(Holder::current(command));
    if let Some(ttl) = opts.ttl {
        request = request.ttl(ttl);
    }
    let sent_at = Instant::now();
    if args.verbose {
        let how = match wait {
            Wait::Forever => "as long as it takes".to_owned(),
            Wait::Timeout(d) => format!("at most {}", format_duration(d)),
            Wait::NoWait => "not waiting".to_owned(),
        };
        eprint_line(&format!(
            "acquiring '{key}' on {} ({} slot(s), {how})",
            store.url(),
            args.slots
        ));
    }
    let acquire = async {
        match wait {
            Wait::Forever => request.acquire().await,
            Wait::Timeout(d) => request.acquire_timeout(d).await,
            Wait::NoWait => request.try_acquire().await,
        }
    };
    // A signal drops the acquire future: the store cancels the wait and keeps nothing.
    let outcome = tokio::select! {
        outcome = acquire => outcome,
        sig = signals.recv() => {
            if args.verbose {
                eprint_line(&format!("{} while waiting for '{key}': gave up", signals::name(sig)));
            }
            return Ok(exit_code::for_signal(sig));
        }
    };
    let guard = match outcome {
        Ok(guard) => guard,
        Err(err) if matches!(err.kind(), ErrorKind::Busy | ErrorKind::Timeout) => {
            eprint_line(&format!("{err:#}"));
            return Ok(args.conflict_exit_code.unwrap_or(exit_code::NOT_ACQUIRED));
        }
        Err(err) => return Err(err.into()),
    };
    // A signal that came while the grant was being made: do not start the command.
    if let Some(sig) = signals.pending().await {
        release(guard).await;
        return Ok(exit_code::for_signal(sig));
    }
    announce(&guard, &store, args);
    let keeper = keep(&guard, &store, sent_at)?;
    let code = supervise(
        &guard,
        &store,
        args,
        &mut signals,
        keeper.as_ref(),
        opts.grace,
    )
    .await;
    let lost = keeper
        .as_ref()
        .is_some_and(|k| matches!(k.state(), LeaseState::Lost { .. }));
    if let Some(keeper) = keeper {
        keeper.stop();
    }
    if lost {
        // Releasing a lost lease frees nothing (it answers not-held); no need to say so.
        let _ = guard.release().await;
    } else {
        release(guard).await;
    }
    code
}

/// Starts a keeper for a lease store's lease; kernel-lock stores need none.
fn keep(
    guard: &LeaseGuard,
    store: &Arc<dyn Store>,
    sent_at: Instant,
) -> Result<Option<Keeper>, Failure> {
    let lease = guard.lease();
    let (true, Some(ttl)) = (store.capabilities().renew, lease.ttl) else {
        return Ok(None);
    };
    Keeper::start(
        store.clone(),
        lease.clone(),
        KeeperConfig::for_ttl(ttl),
        sent_at,
    )
    .map(Some)
    .map_err(Failure::from)
}

/// Prints the grant as `--verbose` and `--json` ask.
fn announce(guard: &LeaseGuard, store: &Arc<dyn Store>, args: &Args) {
    let lease = guard.lease();
    if args.verbose {
        eprint_line(&format!(
            "granted '{}' slot {} of {}, token {}, holder {}",
            lease.key, lease.slot, lease.limit, lease.token, lease.holder.id
        ));
    }
    if args.json {
        let line = serde_json::json!({
            "type": "grant",
            "key": lease.key.as_str(),
            "slot": lease.slot,
            "limit": lease.limit,
            "token": lease.token.0,
            "holder": lease.holder.id.to_string(),
            "pid": lease.holder.pid,
            "store": store.url().to_string(),
        });
        eprintln!("{line}");
    }
}

/// Starts the command, forwards signals to it until it exits, and returns its status.
async fn supervise(
    guard: &LeaseGuard,
    store: &Arc<dyn Store>,
    args: &Args,
    signals: &mut Signals,
    keeper: Option<&Keeper>,
    grace: Duration,
) -> Result<u8, Failure> {
    let lease = guard.lease();
    let env = [
        ("BATON_KEY", lease.key.to_string()),
        ("BATON_TOKEN", lease.token.to_string()),
        ("BATON_SLOT", lease.slot.to_string()),
        ("BATON_HOLDER", lease.holder.id.to_string()),
        // Display redacts secrets; the child never sees a password.
        ("BATON_STORE", store.url().to_string()),
    ];
    // Catch SIGCHLD before the child exists, so its exit cannot go unnoticed.
    let mut sigchld = signal(SignalKind::child())
        .map_err(|e| Failure::new(exit_code::FAILURE, format!("cannot catch SIGCHLD: {e}")))?;
    let tty = Tty::foreground();
    // This runs on the main thread (current-thread runtime): see child.rs on PDEATHSIG.
    let mut child = match Child::spawn(&args.command, &env, tty) {
        Ok(child) => child,
        Err(err) => {
            if let Some(tty) = tty {
                tty.take_back();
            }
            return Err(exec_failure(&args.command[0], &err));
        }
    };
    let exit = loop {
        if let Some(exit) = reap(&mut child)? {
            break exit;
        }
        tokio::select! {
            _ = sigchld.recv() => {}
            sig = signals.recv() => {
                if args.verbose {
                    eprint_line(&format!(
                        "forwarding {} to the command's process group {}",
                        signals::name(sig),
                        child.pid()
                    ));
                }
                child.forward(sig);
            }
            state = lost(keeper) => {
                let reason = match state {
                    LeaseState::Lost { reason, .. } => reason,
                    other => format!("{other:?}"),
                };
                eprint_line(&format!(
                    "lease on '{}' lost ({reason}); stopping the command: SIGTERM now, SIGKILL after {}",
                    lease.key,
                    format_duration(grace)
                ));
                stop_child(&mut child, &mut sigchld, signals, grace).await?;
                return Ok(exit_code::LEASE_LOST);
            }
        }
    };
    Ok(match exit {
        Exit::Code(code) => code,
        Exit::Signal(sig) => exit_code::for_signal(sig),
    })
}

/// The command's exit, once it has exited; a failure to wait is baton's failure.
fn reap(child: &mut Child) -> Result<Option<Exit>, Failure> {
    child.try_wait().map_err(|err| {
        Failure::new(
            exit_code::FAILURE,
            format!("cannot wait for the command (pid {}): {err}", child.pid()),
        )
    })
}

/// Resolves when the keeper declares the lease lost; never without a keeper.
async fn lost(keeper: Option<&Keeper>) -> LeaseState {
    match keeper {
        Some(k) => k.lost().await,
        None => std::future::pending().await,
    }
}

/// SIGTERM to the command's group, SIGKILL after `grace`, and wait until it has exited.
async fn stop_child(
    child: &mut Child,
    sigchld: &mut tokio::signal::unix::Signal,
    signals: &mut Signals,
    grace: Duration,
) -> Result<(), Failure> {
    child.forward(libc::SIGTERM);
    let kill_at = tokio::time::Instant::now() + grace;
    let mut killed = false;
    loop {
        if reap(child)?.is_some() {
            return Ok(());
        }
        tokio::select! {
            _ = sigchld.recv() => {}
            sig = signals.recv() => child.forward(sig),
            _ = tokio::time::sleep_until(kill_at), if !killed => {
                child.forward(libc::SIGKILL);
                killed = true;
            }
        }
    }
}

/// Why the command could not start, with a shell's exit code: 127 when it was not
/// found, 126 when it cannot be executed.
fn exec_failure(program: &OsString, err: &std::io::Error) -> Failure {
    let name = program.to_string_lossy();
    if err.kind() == std::io::ErrorKind::NotFound {
        Failure::new(
            exit_code::NOT_FOUND,
            format!("cannot run '{name}': command not found"),
        )
    } else {
        Failure::new(
            exit_code::CANNOT_EXECUTE,
            format!("cannot run '{name}': {err}"),
        )
    }
}

/// Releases the slot; says so only when something went wrong.
async fn release(guard: LeaseGuard) {
    let key = guard.lease().key.clone();
    match guard.release().await {
        Ok(baton::Released::Released) => {}
        Ok(baton::Released::NotHeld) => eprint_line(&format!(
            "release '{key}': the lease was no longer held when the command ended"
        )),
        Err(err) => eprint_line(&format!("{err:#}")),
    }
}
