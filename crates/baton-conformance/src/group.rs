//! Contract point 3 for the holder's whole command: "the child's whole process group is
//! dead (SIGKILLed and reaped) before the store can grant the slot again" — for a command
//! that handles SIGTERM slowly, a grandchild that ignores SIGTERM, and a holder that is
//! paused or SIGKILLed while they run.
//!
//! The holder is a worker process that keeps its lease with a keeper and runs a child
//! under [`baton_core::supervisor`], the supervisor `baton run` uses. The child's script
//! writes the pid of each process of its group to a file; when the slot has been granted
//! to someone else, every one of those processes must be gone. That check is made the
//! moment the new grant returns, which is after the store granted it, so it can only
//! err towards failing: a process still alive then was certainly alive at the re-grant.

use std::path::Path;
use std::time::Duration;

use baton_core::{pid_start_ticks, KeeperConfig, Lease, Wait};
use baton_stress::command::slow_to_stop;

use crate::support::{Keep, Lab};
use crate::worker::Worker;
use crate::{Harness, LIVENESS_BOUND};

/// What [`stopping_group_is_dead_before_regrant`] saw.
#[derive(Clone, Copy, Debug)]
pub struct GroupReport {
    /// Processes of the old holder's group that were checked at each re-grant.
    pub processes: usize,
    /// The kill grace the holder's command had.
    pub grace: Duration,
}

/// How the holder is taken out of the picture.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// SIGSTOP the holder process (its keeper stops renewing, and it cannot signal its
    /// child either: the supervisor must stop the group on its own by the deadline).
    Pause,
    /// SIGKILL the holder process (its supervisor learns it at once).
    Kill,
}

/// The command slow to stop, naming its three processes in `pids`.
pub(crate) fn stubborn_script(pids: &Path, half_grace: Duration) -> String {
    slow_to_stop(half_grace, Some(pids))
}

/// The processes named in `pids` with their start times, once all three have written.
async fn group_of(pids: &Path, holder: &mut Worker) -> Vec<(u32, Option<u64>)> {
    let started = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(pids).unwrap_or_default();
        let list: Vec<u32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if list.len() >= 3 {
            return list.into_iter().map(|p| (p, pid_start_ticks(p))).collect();
        }
        if let Some(status) = holder.exited() {
            panic!(
                "the holder exited ({status}) before its command started: {}",
                holder.stderr_text()
            );
        }
        assert!(
            started.elapsed() < LIVENESS_BOUND,
            "the holder's command did not write its pids within {LIVENESS_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The largest kill grace `baton run` accepts for `config`'s TTL.
pub(crate) fn largest_grace(config: &KeeperConfig) -> Duration {
    baton_stress::command::largest_grace(config.ttl)
}

/// Whether `pid` (started at `ticks`) still runs: a zombie, a missing process and a pid
/// reused by another process all count as gone.
fn running(pid: u32, ticks: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next())
        .unwrap_or("");
    state != "Z" && pid_start_ticks(pid) == ticks
}

/// Contract point 3 with a command that is slow to stop, on every lease store: for a
/// holder that is paused, then for one that is SIGKILLed, the slot is granted to a new
/// acquirer only once every process of the old holder's command group is gone (the slow
/// SIGTERM handler, the SIGTERM-ignoring grandchild and the plain background process),
/// and the new token is higher.
pub async fn stopping_group_is_dead_before_regrant(h: &Harness) -> GroupReport {
    let mut lab = Lab::new(h, "stopping_group_is_dead_before_regrant");
    let timing = lab.lease_timing();
    let config = KeeperConfig::for_ttl(timing.ttl);
    let grace = largest_grace(&config);
    assert!(
        grace >= Duration::from_millis(20),
        "the harness's TTL {:?} leaves no kill grace",
        timing.ttl
    );
    let mut processes = 0;
    for fault in [Fault::Pause, Fault::Kill] {
        let key = lab.key(&format!("group-{fault:?}").to_lowercase());
        let pids = lab.path(&format!("pids-{fault:?}"));
        let mut old = lab.spawn_keeper(
            &key,
            1,
            Keep {
                child: true,
                child_script: Some(stubborn_script(&pids, grace / 2)),
                grace,
                ..Keep::default()
            },
        );
        let old_lease: Lease = lab.lease_of(&mut old).await;
        let group = group_of(&pids, &mut old).await;
        processes += group.len();
        match fault {
            Fault::Pause => lab.pause(&mut old),
            Fault::Kill => lab.kill(&mut old),
        }
        let bound = timing.recovery() + LIVENESS_BOUND;
        let req = lab.lease_request(&key, 1, Wait::Timeout(bound));
        let new_lease = lab.acquire(&req).await.unwrap_or_else(|e| {
            panic!("{fault:?}: the slot did not come back within {bound:?}: {e:#}")
        });
        let alive: Vec<u32> = group
            .iter()
            .filter(|(pid, ticks)| running(*pid, *ticks))
            .map(|(pid, _)| *pid)
            .collect();
        assert!(
            alive.is_empty(),
            "{fault:?}: the slot was granted again (token {}) while processes {alive:?} of \
             the old holder's command group (of {group:?}) still ran; grace {grace:?}, TTL \
             {:?}",
            new_lease.token,
            timing.ttl
        );
        assert!(
            new_lease.token > old_lease.token,
            "{fault:?}: the new token {} is not above the old {}",
            new_lease.token,
            old_lease.token
        );
        lab.release(&new_lease).await;
        if let Fault::Pause = fault {
            // Resumed, the old holder learns the loss and ends on its own.
            lab.resume(&mut old);
            old.finish(LIVENESS_BOUND + timing.ttl).await;
        }
    }
    GroupReport { processes, grace }
}
