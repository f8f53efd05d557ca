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
//! - The command runs under a supervisor ([`baton::supervisor`]) that keeps the slot until the
//!   last process of the command's process group has exited, and stops that group if
//!   baton dies — before a kernel lock is freed, and before a lease could be granted
//!   again.
//! - On a lease store, a keeper on its own thread renews the lease every TTL/3. The whole
//!   process group must be dead by the keeper's deadline (`send_time + TTL × (1 − drift) −
//!   margin`, before any re-grant): SIGTERM goes out at that deadline less `--kill-grace`
//!   less a reaping reserve, SIGKILL at the deadline less the reserve, and baton exits
//!   [`LEASE_LOST`](crate::exit_code::LEASE_LOST). A grace that does not fit in the TTL is
//!   a usage error. What the command did meanwhile is only safe if the resource it writes
//!   checks `BATON_TOKEN`.

use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::{
    derive_key, format_duration, parse_duration, ErrorKind, Holder, Keeper, KeeperConfig, Key,
    LeaseGuard, LeaseState, Store, StoreExt, Wait,
};
use clap::Args as ClapArgs;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::common::{eprint_line, open_store, runtime, Failure};
use crate::exit_code;
use crate::signals::{self, Signals};
use baton::supervisor::{Child, Exit, StopPolicy, Supervisor, Tty};

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
    /// command runs; if it cannot, the command's whole process group is dead (SIGTERM,
    /// then SIGKILL after --kill-grace, reaped) before the lease could be granted to
    /// anyone else. Default: 30s. Kernel-lock stores (dir:PATH) ignore it: their locks
    /// last as long as baton or the command's process group, whichever is longer.
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

    /// How long the command has between SIGTERM and SIGKILL when it must stop (the lease
    /// is being lost, or baton died). On a lease store it must fit in the TTL (at most
    /// about TTL/2 − TTL/10); default 10s, or the largest that fits a shorter TTL.
    #[arg(long, value_name = "DURATION")]
    pub kill_grace: Option<String>,

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
    let store = open_store(store)?;
    let grace = kill_grace(args.kill_grace.as_deref(), ttl, store.capabilities().renew)?;
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

/// The default `--kill-grace`.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// The TTL `baton run` checks a grace against when `--ttl` is not given (every store's
/// default).
const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// The stop lead a keeper gets for `grace`: SIGTERM goes out this long before the
/// deadline, SIGKILL `reserve` before it.
fn stop_lead(config: &KeeperConfig, grace: Duration) -> Duration {
    grace + config.kill_reserve()
}

/// The largest grace that fits `ttl`.
fn max_grace(ttl: Duration) -> Duration {
    let c = KeeperConfig::for_ttl(ttl);
    c.max_stop_lead().saturating_sub(c.kill_reserve())
}

/// The smallest TTL (to the millisecond) that `grace` fits.
fn min_ttl_for(grace: Duration) -> Option<Duration> {
    let (mut lo, mut hi) = (1u64, 1u64 << 40);
    if max_grace(Duration::from_millis(hi)) < grace {
        return None;
    }
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if max_grace(Duration::from_millis(mid)) >= grace {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(Duration::from_millis(lo))
}

/// `--kill-grace`, checked against the TTL on a lease store: an explicit grace that does
/// not fit is a usage error naming the largest that fits and the smallest TTL for it; the
/// default shrinks to fit.
fn kill_grace(
    text: Option<&str>,
    ttl: Option<Duration>,
    lease_store: bool,
) -> Result<Duration, Failure> {
    let ttl = ttl.unwrap_or(DEFAULT_TTL);
    let Some(text) = text else {
        return Ok(if lease_store {
            DEFAULT_GRACE.min(max_grace(ttl))
        } else {
            DEFAULT_GRACE
        });
    };
    let grace = parse_duration(text).map_err(Failure::usage)?;
    if lease_store && grace > max_grace(ttl) {
        let smallest = min_ttl_for(grace)
            .map(|t| {
                format!(
                    ", or a --ttl of at least {} for this grace",
                    format_duration(t)
                )
            })
            .unwrap_or_default();
        return Err(Failure::usage(format!(
            "--kill-grace {text} does not fit in a {} lease: the command must be dead before \
             the lease could be granted again, and renewals need half the TTL; the largest \
             grace for this TTL is {}{smallest}",
            format_duration(ttl),
            format_duration(max_grace(ttl)),
        )));
    }
    Ok(grace)
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
    let mut holder = Holder::current(command);
    // The supervisor comes first, so that the holder record names it: a store that judges
    // a holder dead by its process then sees it alive while the command's group runs.
    // Catch SIGCHLD before it exists, so its exit cannot go unnoticed.
    let sigchld = signal(SignalKind::child())
        .map_err(|e| Failure::new(exit_code::FAILURE, format!("cannot catch SIGCHLD: {e}")))?;
    let tty = Tty::foreground();
    let env = [
        ("BATON_KEY", key.to_string()),
        ("BATON_HOLDER", holder.id.to_string()),
        // Display redacts secrets; the child never sees a password.
        ("BATON_STORE", store.url().to_string()),
    ];
    let reserve = if store.capabilities().renew {
        KeeperConfig::for_ttl(opts.ttl.unwrap_or(DEFAULT_TTL)).kill_reserve()
    } else {
        Duration::ZERO
    };
    let policy = StopPolicy {
        grace: opts.grace,
        reserve,
    };
    let launch = Launch {
        env,
        policy,
        tty,
        verbose: args.verbose,
    };
    // On a lease store the supervisor is started before the acquire, so that the holder
    // record names it. On a kernel-lock store it is started after the grant, so that it
    // inherits the locked slot file: the kernel then frees the lock only when the
    // supervisor exits, after the whole group.
    let early = if store.capabilities().renew {
        let s = launch
            .start(&args.command)
            .map_err(|e| exec_failure(&args.command[0], &e))?;
        holder.supervisor = s.process();
        Some(s)
    } else {
        None
    };
    let mut request = store
        .lock(key.clone())
        .limit(args.slots)
        .lock_delay(args.lock_delay.unwrap_or_default())
        .holder(holder);
    if let Some(ttl) = opts.ttl {
        request = request.ttl(ttl);
    }
    // A waiting acquire rides out an outage of the store (a restart, an election): the
    // first retry is always said, the rest under --verbose, so a wait is never silent.
    let verbose = args.verbose;
    let told = std::sync::atomic::AtomicBool::new(false);
    request = request.on_outage(move |err, pause| {
        if verbose || !told.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprint_line(&format!(
                "{err:#}; still waiting: asking again in {}{}",
                format_duration(pause),
                if verbose {
                    ""
                } else {
                    " (-v shows every retry)"
                }
            ));
        }
    });
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
    let keeper = match keep(&guard, &store, sent_at, opts.grace) {
        Ok(k) => k,
        Err(failure) => {
            release(guard).await;
            return Err(failure);
        }
    };
    let started = Started {
        early,
        launch,
        sigchld,
    };
    let code = supervise(
        &guard,
        started,
        args,
        &mut signals,
        keeper.as_ref(),
        opts.grace,
    )
    .await;
    let lost = matches!(code, Ok(exit_code::LEASE_LOST))
        || keeper
            .as_ref()
            .is_some_and(|k| matches!(k.state(), LeaseState::Lost { .. }));
    if let Some(keeper) = keeper {
        keeper.stop();
    }
    if lost {
        // Releasing a lost lease frees nothing (it answers not-held); no need to say so.
        // The store may be the reason it was lost (frozen, cut off): try briefly, then
        // exit; whatever is left of the lease ends with its TTL.
        let lease = guard.disarm();
        let _ = tokio::time::timeout(LOST_RELEASE_BOUND, store.release(&lease)).await;
    } else {
        release(guard).await;
    }
    code
}

/// How long `baton run` tries to release a lease it has already lost before it exits.
const LOST_RELEASE_BOUND: Duration = Duration::from_secs(1);

/// Starts a keeper for a lease store's lease; kernel-lock stores need none.
fn keep(
    guard: &LeaseGuard,
    store: &Arc<dyn Store>,
    sent_at: Instant,
    grace: Duration,
) -> Result<Option<Keeper>, Failure> {
    let lease = guard.lease();
    let (true, Some(ttl)) = (store.capabilities().renew, lease.ttl) else {
        return Ok(None);
    };
    let config = KeeperConfig::for_ttl(ttl);
    if grace > max_grace(ttl) {
        // The store granted another TTL than the one the grace was checked against.
        let why = format!(
            "the store granted a {} lease, too short for a kill grace of {} (at most {})",
            format_duration(ttl),
            format_duration(grace),
            format_duration(max_grace(ttl))
        );
        return Err(Failure::usage(why));
    }
    Keeper::start(
        store.clone(),
        lease.clone(),
        config.with_stop_lead(stop_lead(&config, grace)),
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

/// How the command's supervisor is started.
struct Launch {
    env: [(&'static str, String); 3],
    policy: StopPolicy,
    tty: Option<Tty>,
    verbose: bool,
}

impl Launch {
    /// Forks the supervisor (main thread only: job control needs it there).
    fn start(&self, command: &[OsString]) -> std::io::Result<Supervisor> {
        Supervisor::start(
            command,
            &self.env,
            &["BATON_TOKEN", "BATON_SLOT"],
            self.tty,
            self.policy,
            self.verbose,
        )
    }
}

/// The supervisor if it was started before the grant, how to start it otherwise, and
/// what watches it.
struct Started {
    early: Option<Supervisor>,
    launch: Launch,
    sigchld: tokio::signal::unix::Signal,
}

/// Starts the command under its supervisor, forwards signals to its process group and
/// the keeper's deadlines to the supervisor until the group is gone, and returns the
/// command's status.
async fn supervise(
    guard: &LeaseGuard,
    started: Started,
    args: &Args,
    signals: &mut Signals,
    keeper: Option<&Keeper>,
    grace: Duration,
) -> Result<u8, Failure> {
    let lease = guard.lease();
    let Started {
        early,
        launch,
        mut sigchld,
    } = started;
    let tty = launch.tty;
    let supervisor = match early {
        Some(s) => Ok(s),
        None => launch.start(&args.command),
    };
    let mut state = keeper.map(Keeper::watch);
    let first = match state.as_mut().map(|w| w.borrow_and_update().clone()) {
        Some(LeaseState::Held { deadline }) => Some(deadline),
        _ => None,
    };
    let run = supervisor.and_then(|s| s.run(&[lease.token.0, u64::from(lease.slot)], first));
    let mut child = match run {
        Ok(child) => child,
        Err(err) => {
            if let Some(tty) = tty {
                tty.take_back();
            }
            return Err(exec_failure(&args.command[0], &err));
        }
    };
    let mut lost_reason: Option<String> = None;
    // A renewal between the keeper's first deadline and the command's start.
    if let Some(LeaseState::Held { deadline }) =
        state.as_mut().map(|w| w.borrow_and_update().clone())
    {
        child.deadline(deadline);
    }
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
            changed = changed(state.as_mut()), if lost_reason.is_none() => match changed {
                Some(LeaseState::Held { deadline }) => child.deadline(deadline),
                Some(LeaseState::Lost { reason, .. }) => {
                    eprint_line(&format!(
                        "lease on '{}' lost ({reason}); stopping the command's process group: \
                         SIGTERM now, SIGKILL after {}",
                        lease.key,
                        format_duration(grace)
                    ));
                    child.stop_now();
                    lost_reason = Some(reason);
                }
                // Stopped, or the keeper is gone: nothing more will come.
                _ => state = None,
            },
        }
    };
    // Lost, also when baton was paused past the deadline (the supervisor then stopped
    // the group on its own, before the keeper could say so).
    let expired = keeper.is_some_and(|k| {
        child.was_stopped()
            || match k.state() {
                LeaseState::Lost { .. } => true,
                LeaseState::Held { deadline } => Instant::now() >= deadline,
                LeaseState::Stopped => false,
            }
    });
    if lost_reason.is_some() || expired {
        if lost_reason.is_none() {
            eprint_line(&format!(
                "lease on '{}' lost: its deadline passed while baton could not act; the \
                 command's process group was stopped by then",
                lease.key
            ));
        }
        return Ok(exit_code::LEASE_LOST);
    }
    Ok(match exit {
        Exit::Code(code) => code,
        Exit::Signal(sig) => exit_code::for_signal(sig),
    })
}

/// The command's exit, once its whole process group is gone; a failure to wait is
/// baton's failure.
fn reap(child: &mut Child) -> Result<Option<Exit>, Failure> {
    child.try_wait().map_err(|err| {
        Failure::new(
            exit_code::FAILURE,
            format!("cannot wait for the command (pid {}): {err}", child.pid()),
        )
    })
}

/// The keeper's next state change; never without a keeper.
async fn changed(state: Option<&mut watch::Receiver<LeaseState>>) -> Option<LeaseState> {
    match state {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
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
