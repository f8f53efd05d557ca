//! Which properties a store runs: each property names what it needs (capabilities the
//! store declares, facilities its harness gives), and [`crate::suite!`] runs it only when
//! both are there. A property left out says so, with the reason, through
//! [`crate::skipped`] (on stderr, and in the test command's summary), so nothing is
//! skipped silently.

use baton_core::Capabilities;

use crate::servers::Server;
use crate::{skipped, Harness};

/// A capability a property needs: the check, and its name for a skip.
pub type Cap = (fn(&Capabilities) -> bool, &'static str);

/// What a property needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    /// Capability checks, each with the words for a skip.
    pub caps: &'static [Cap],
    /// The harness gives lease timing ([`Harness::lease`]).
    pub lease_timing: bool,
    /// The harness names at least one way to damage the store ([`Harness::corrupt`]).
    pub corrupt: bool,
    /// The store talks to a server over TCP ([`Harness::network`] or [`Harness::servers`]).
    pub network: bool,
    /// The store talks to a server over TCP and the harness can start private servers
    /// ([`Harness::servers`]).
    pub servers: bool,
    /// The harness can start a private cluster.
    pub cluster: bool,
}

const RENEW: Cap = (|c| c.renew, "renew (leases that expire)");
const BREAK: Cap = (|c| c.break_lease, "break");
const RESIZE: Cap = (|c| c.resize, "resize");
const FIFO: Cap = (|c| c.fifo, "FIFO waiters");
const WAITERS: Cap = (|c| c.waiters, "a waiter count");
const DELETE: Cap = (|c| c.delete, "delete");
const DELAY: Cap = (|c| c.lock_delay, "lock-delay");
const BARRIER: Cap = (|c| c.barrier, "barriers");

/// What property `name` needs; every property of the suite is listed (a name not listed
/// needs nothing).
pub fn needs(name: &str) -> Needs {
    let lease = Needs {
        caps: &[RENEW],
        lease_timing: true,
        ..Needs::default()
    };
    match name {
        "barrier_passes_in_generations" => Needs {
            caps: &[BARRIER],
            ..Needs::default()
        },
        "waiters_are_served_in_order" => Needs {
            caps: &[FIFO, WAITERS],
            ..Needs::default()
        },
        "delete_removes_only_an_unused_key" | "delete_racing_grants_never_shares_a_slot" => Needs {
            caps: &[DELETE],
            ..Needs::default()
        },
        "paused_holder_is_superseded"
        | "killed_lease_holder_recovers"
        | "wall_clock_jump_keeps_lease"
        | "stopping_group_is_dead_before_regrant" => lease,
        "break_frees_and_holder_learns" => Needs {
            caps: &[RENEW, BREAK],
            lease_timing: true,
            ..Needs::default()
        },
        "resize_never_evicts" | "resize_steps_all_count" => Needs {
            caps: &[RESIZE],
            ..Needs::default()
        },
        "lock_delay_holds_back_lost_slots" => Needs {
            caps: &[RENEW, DELAY],
            lease_timing: true,
            ..Needs::default()
        },
        "garbage_is_a_clear_error" => Needs {
            caps: &[RENEW],
            lease_timing: true,
            corrupt: true,
            ..Needs::default()
        },
        "partition_loses_before_regrant" | "server_clock_step_keeps_lease" => Needs {
            caps: &[RENEW],
            lease_timing: true,
            network: true,
            ..Needs::default()
        },
        "restart_keeps_tokens_rising" | "waiters_ride_out_restart" => Needs {
            servers: true,
            ..Needs::default()
        },
        "frozen_server_loses_before_regrant" => Needs {
            caps: &[RENEW],
            lease_timing: true,
            servers: true,
            ..Needs::default()
        },
        "leader_kill_keeps_limit" => Needs {
            servers: true,
            cluster: true,
            ..Needs::default()
        },
        _ => Needs::default(),
    }
}

/// Why `h` cannot run property `name`, if it cannot.
pub fn skip_reason(h: &Harness, name: &str) -> Option<String> {
    if let Some(why) = h.skip_reason() {
        return Some(why.to_owned());
    }
    let n = needs(name);
    let caps = h.open().capabilities();
    for (has, what) in n.caps {
        if !has(&caps) {
            return Some(format!("the store does not declare {what}"));
        }
    }
    if n.lease_timing && h.lease_timing().is_none() {
        return Some("the harness gives no lease timing (Harness::lease)".into());
    }
    if n.corrupt && h.corruptions().is_empty() {
        return Some("the harness names no way to damage the store (Harness::corrupt)".into());
    }
    if n.network && !h.is_network() {
        return Some("the store is not networked (Harness::network)".into());
    }
    if n.servers && h.private_servers().is_none() {
        return Some(
            "the store has no server of its own to restart or partition (Harness::servers)".into(),
        );
    }
    if n.cluster && !h.private_servers().is_some_and(|s| s.cluster) {
        return Some("the store's server script starts no cluster (Servers::cluster)".into());
    }
    None
}

/// Private test servers a networked store's harness can start: `scripts/server-NAME`'s
/// `start`/`stop` (and `start-cluster`/`stop-cluster` when `cluster`), and the harness
/// for a server's URL.
#[derive(Clone, Copy, Debug)]
pub struct Servers {
    /// `NAME` of `scripts/server-NAME`.
    pub script: &'static str,
    /// The script starts a cluster too.
    pub cluster: bool,
    /// The harness for the store at a private server's URL.
    pub at: fn(&str) -> Harness,
}

/// Reports `test` skipped and answers true when `h` cannot run property `name`.
#[doc(hidden)]
pub fn skip(h: &Harness, test: &str, name: &str) -> bool {
    match skip_reason(h, name) {
        Some(why) => {
            skipped(test, &why);
            true
        }
        None => false,
    }
}

/// Starts the private server (or cluster) property `name` runs against, and the harness
/// for it; `None` (reported skipped) when `harness` cannot run it.
#[doc(hidden)]
pub fn private_server(
    harness: &Harness,
    module: &str,
    test: &str,
    name: &str,
    cluster: bool,
) -> Option<(Harness, Server)> {
    if skip(harness, test, name) {
        return None;
    }
    let servers = harness.private_servers()?;
    let (start, stop) = if cluster {
        ("start-cluster", "stop-cluster")
    } else {
        ("start", "stop")
    };
    let server = Server::start(servers.script, start, stop)
        .unwrap_or_else(|e| panic!("cannot start a private {} server: {e}", servers.script));
    let h = Harness::__in_module((servers.at)(server.url()), module);
    Some((h, server))
}
