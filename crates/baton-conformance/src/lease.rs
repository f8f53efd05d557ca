//! The lease properties: what a store whose leases expire unless renewed must keep on top
//! of the rest of the contract (DESIGN.md, "The contract", points 2–7 as they bear on
//! leases). [`crate::suite!`] runs them where the store declares renew.
//!
//! They use the harness's [`LeaseTiming`]: a short TTL (about a second), so that a paused
//! holder is superseded within a test. Holders that must stay live run a [`Keeper`], in a
//! worker process ([`Task::Keep`](crate::worker::Task::Keep)) or in the test, exactly as
//! `baton run` does.
//!
//! Only one time is compared that is not a liveness bound: a paused holder's last
//! deadline against the moment the store granted its slot again. That ordering is
//! contract point 3, a correctness property; how far apart the two were is reported.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use baton_core::{
    ErrorKind, HolderId, Keeper, KeeperConfig, Key, Lease, LeaseState, Released, Resize, SlotState,
    Store, Wait,
};

use crate::history::{check_limit, Event};
use crate::support::{bounded, report, skipped, Keep, Lab};
use crate::worker::RecordingStore;
use crate::{fence, instant_ns, monotonic_ns, Harness, LIVENESS_BOUND};

/// How long a property lets a waiter sit before it checks that the waiter is still waiting
/// (well under the lease TTL, so a waiter never watches long enough to judge a renewing
/// holder stale).
const SETTLE: Duration = Duration::from_millis(300);

/// The environment variable that points the suite at libfaketime when it is not where
/// Debian's `faketime` package puts it.
pub const LIBFAKETIME_ENV: &str = "BATON_LIBFAKETIME";

/// What [`paused_holder_is_superseded`] measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SupersedeReport {
    /// From the paused holder's last deadline (when its keeper would declare the lease
    /// lost) to the earliest moment the store can have granted the slot again (the new
    /// lease's send time). The contract requires the deadline first; this is the margin.
    pub deadline_to_regrant: Duration,
    /// From the SIGSTOP of the holder to the return of the new holder's acquire.
    pub pause_to_grant: Duration,
}

/// The events of process `pid`.
fn of(events: &[Event], pid: u32) -> impl Iterator<Item = &Event> {
    events.iter().filter(move |e| e.pid() == pid)
}

fn lost_event(events: &[Event], pid: u32) -> Option<(u64, String)> {
    of(events, pid).find_map(|e| match e {
        Event::Lost { at_ns, reason, .. } => Some((*at_ns, reason.clone())),
        _ => None,
    })
}

/// The latest moment the holder `pid` of `token` believed it held its lease: the latest
/// deadline its keeper published, or, for a renewal the history shows but whose deadline
/// the holder had no time to record, the renewal's call time plus the keeper's validity
/// (the keeper counts from its send time, which is earlier).
fn believed_until(events: &[Event], pid: u32, token: baton_core::Token, validity: Duration) -> u64 {
    of(events, pid)
        .filter_map(|e| match e {
            Event::Held {
                token: t,
                deadline_ns,
                ..
            } if *t == token => Some(*deadline_ns),
            Event::Renewed {
                token: t,
                t_sent_ns,
                ok: true,
                ..
            } if *t == token => Some(t_sent_ns + validity.as_nanos() as u64),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

fn ms_between(from_ns: u64, to_ns: u64) -> String {
    let d = to_ns as i128 - from_ns as i128;
    format!("{:.1}ms", d as f64 / 1e6)
}

/// Contract points 2, 3 and 5 for a paused holder: "a paused or partitioned holder cannot
/// be stopped by any lock"; the store must let someone else in, the holder must give up
/// before that, and the resource must refuse the holder's late writes.
///
/// A worker process acquires with the lease TTL, keeps the lease with a keeper (recording
/// every deadline it sets and every renewal) and writes once to a SQLite resource through
/// the fence helper with its token. The test SIGSTOPs it; an acquirer in the test (waiting
/// at most the recovery bound plus [`LIVENESS_BOUND`]) gets the slot with a higher token
/// and writes through the fence. The test SIGCONTs the worker, which must then see its
/// keeper declare the lease lost, get `Lost` or `NotHeld` from one more renew of its own,
/// `NotHeld` from release, and `Fenced` from a write with its old token; the resource
/// holds the first two writes only, and the new holder still holds the slot. Loss before re-grant: the latest deadline the paused holder
/// believed in lies before the new lease's send time (both on this host's monotonic
/// clock). Returns and prints the margin.
pub async fn paused_holder_is_superseded(h: &Harness) -> SupersedeReport {
    let mut lab = Lab::new(h, "paused_holder_is_superseded");
    let timing = lab.lease_timing();
    let validity = KeeperConfig::for_ttl(timing.ttl).validity();
    let key = lab.key("paused");
    let db = lab.path("fenced.db");
    let after_loss = lab.path("after-loss");
    let mut old = lab.spawn_keeper(
        &key,
        1,
        Keep {
            fence: Some(db.clone()),
            after_loss: Some(after_loss.clone()),
            ..Keep::default()
        },
    );
    let old_lease = lab.lease_of(&mut old).await;
    lab.wait_for(&mut old, "its write through the fence", |e| {
        matches!(e, Event::FenceWrite { .. })
    })
    .await;
    // Pause a lease that has been renewed, the usual state of a long-running holder. (On
    // a starved machine its keeper may give up first; the worker then waits for the
    // after-loss signal like a paused holder, and the property still holds.)
    lab.wait_for(&mut old, "a renewal", |e| {
        matches!(e, Event::Renewed { ok: true, .. } | Event::Lost { .. })
    })
    .await;
    let paused = Instant::now();
    lab.pause(&mut old);
    let paused_ns = monotonic_ns();

    let bound = timing.recovery() + LIVENESS_BOUND;
    let req = lab.lease_request(&key, 1, Wait::Timeout(bound));
    let new_lease = lab.acquire(&req).await.unwrap_or_else(|e| {
        panic!(
            "the slot of a holder paused past its TTL ({:?}) did not come back within \
             {bound:?}: {e:#}",
            timing.ttl
        )
    });
    let pause_to_grant = paused.elapsed();
    assert!(
        new_lease.token > old_lease.token,
        "the new holder's token {} is not above the paused holder's {}",
        new_lease.token,
        old_lease.token
    );
    let regrant_ns = instant_ns(new_lease.sent_at.unwrap_or_else(|| {
        panic!(
            "a lease store's lease has no sent_at (Lease::sent_at): the keeper's deadline \
             counts from it, so every lease store must set it"
        )
    }));
    let write = fence::write(&db, &key, new_lease.token);
    lab.record(write.clone());
    assert!(
        matches!(write, Event::FenceWrite { accepted: true, .. }),
        "the new holder's write through the fence was refused: {write:?}"
    );

    std::fs::write(&after_loss, b"go").expect("the after-loss signal");
    lab.resume(&mut old);
    // Wait for the old holder to give up, failing at once if it shows it still believed
    // it held the lease after the re-grant.
    let started = Instant::now();
    loop {
        let events = lab.events();
        let until = believed_until(&events, old.pid(), old_lease.token, validity);
        assert!(
            until < regrant_ns,
            "loss before re-grant broken: the paused holder (pid {}, token {}) believed it held \
             the lease until {} after the store granted it again (token {}, sent {} after \
             the pause)\n(history: {})",
            old.pid(),
            old_lease.token,
            ms_between(regrant_ns, until),
            new_lease.token,
            ms_between(paused_ns, regrant_ns),
            lab.history.display()
        );
        if lost_event(&events, old.pid()).is_some() || old.exited().is_some() {
            break;
        }
        assert!(
            started.elapsed() <= validity + LIVENESS_BOUND,
            "the resumed holder's keeper did not declare its lease lost: {}",
            old.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    old.finish(LIVENESS_BOUND).await;

    let events = lab.events();
    let until = believed_until(&events, old.pid(), old_lease.token, validity);
    assert!(
        until < regrant_ns,
        "loss before re-grant broken: the paused holder believed it held the lease until {} \
         after the store granted it again\n(history: {})",
        ms_between(regrant_ns, until),
        lab.history.display()
    );
    let (lost_at, _) = lost_event(&events, old.pid())
        .unwrap_or_else(|| panic!("the resumed holder's keeper never declared its lease lost"));
    let resumed_ns = of(&events, old.pid())
        .find_map(|e| matches!(e, Event::Resumed { .. }).then(|| e.t_ns()))
        .expect("the resume is in the history");
    superseded_holder_gave_up(
        &lab,
        &db,
        old.pid(),
        &old_lease,
        &new_lease,
        resumed_ns,
        "resumed",
    )
    .await;

    let measured = SupersedeReport {
        deadline_to_regrant: Duration::from_nanos(regrant_ns - until),
        pause_to_grant,
    };
    let early = if lost_at < paused_ns {
        " (its keeper had declared loss before the pause: a starved machine)"
    } else {
        ""
    };
    report(&format!(
        "paused_holder_is_superseded on {}: TTL {:?} (keeper validity {:?}); the paused \
         holder's last deadline fell {:?} before the store could grant the slot again{early}; \
         SIGSTOP -> new grant in {:?}",
        lab.store.url(),
        timing.ttl,
        validity,
        measured.deadline_to_regrant,
        measured.pause_to_grant
    ));
    measured
}

/// What a superseded holder (`old_pid`, which held `old`) must have done once let go again
/// (`how`: resumed after a pause, healed after a partition) and run to its end, as its
/// history shows from `since_ns` on: its renewal answered lost or not-held, its release
/// not-held, and its second write through the fence at `db` (with the old token) was
/// refused, so the resource holds its first write and the new holder's only. The new
/// holder (`new`, granted in this process) still holds its slot; the helper releases it.
pub(crate) async fn superseded_holder_gave_up(
    lab: &Lab<'_>,
    db: &Path,
    old_pid: u32,
    old: &Lease,
    new: &Lease,
    since_ns: u64,
    how: &str,
) {
    let events = lab.events();
    let late_renewal = of(&events, old_pid)
        .filter(|e| e.t_ns() > since_ns)
        .filter_map(|e| match e {
            Event::Renewed { ok, kind, .. } => Some((*ok, kind.clone())),
            _ => None,
        })
        .last();
    assert!(
        matches!(&late_renewal, Some((false, Some(k))) if k == ErrorKind::Lost.as_str()
            || k == ErrorKind::NotHeld.as_str()),
        "the {how} holder's renewal of its superseded lease (token {}) should answer lost \
         or not-held: {late_renewal:?}\n(history: {})",
        old.token,
        lab.history.display()
    );
    let released = of(&events, old_pid).find_map(|e| match e {
        Event::Released { outcome, error, .. } => Some((*outcome, error.clone())),
        _ => None,
    });
    assert_eq!(
        released.as_ref().map(|r| r.0),
        Some(Some(Released::NotHeld)),
        "the {how} holder's release of its lost lease (token {}) should answer not-held: \
         {released:?}",
        old.token
    );
    let late_write = of(&events, old_pid)
        .filter_map(|e| match e {
            Event::FenceWrite { accepted, kind, .. } => Some((*accepted, kind.clone())),
            _ => None,
        })
        .nth(1);
    assert_eq!(
        late_write,
        Some((false, Some(ErrorKind::Fenced.as_str().into()))),
        "the {how} holder's write with its old token {} should be refused as fenced",
        old.token
    );
    assert_eq!(
        fence::rows(db),
        vec![(old_pid, old.token.0), (std::process::id(), new.token.0)],
        "the fenced resource should hold the old holder's first write and the new holder's, \
         and nothing after"
    );
    let status = lab.inspect(&new.key).await;
    let slot = status.slots.iter().find(|s| s.slot == new.slot);
    assert_eq!(
        slot.map(|s| (s.state, s.token)),
        Some((SlotState::Held, Some(new.token))),
        "the {how} holder's stale release freed the new holder's slot: {status:?}"
    );
    assert_eq!(lab.release(new).await, Released::Released);
}

/// Contract point 4, **Recovery**, for a lease holder: "within TTL + detection for lease
/// stores".
///
/// A worker process holds with the lease TTL and renews with a keeper; an acquirer waits
/// (and is not granted while the holder renews); the test SIGKILLs the holder, and the
/// waiter must be granted within the harness's recovery bound (`ttl + detection`) plus
/// [`LIVENESS_BOUND`], with a higher token. Stores that see at once that a holder on this
/// host is gone are fast; either way the time is returned and printed.
pub async fn killed_lease_holder_recovers(h: &Harness) -> Duration {
    let mut lab = Lab::new(h, "killed_lease_holder_recovers");
    let timing = lab.lease_timing();
    let key = lab.key("crash");
    let bound = timing.recovery() + LIVENESS_BOUND;

    let mut victim = lab.spawn_keeper(&key, 1, Keep::default());
    let dead = lab.lease_of(&mut victim).await;
    lab.wait_for(&mut victim, "a renewal", |e| {
        matches!(e, Event::Renewed { ok: true, .. })
    })
    .await;
    let store = Arc::clone(&lab.store);
    let req = lab.lease_request(&key, 1, Wait::Timeout(bound));
    let waiter = tokio::spawn(async move {
        let t_request_ns = monotonic_ns();
        let result = store.acquire(&req).await;
        (t_request_ns, result, monotonic_ns(), Instant::now())
    });
    tokio::time::sleep(SETTLE).await;
    assert!(
        !waiter.is_finished(),
        "an acquire returned while a live holder renewed the only slot: {:?}",
        waiter.await.map(|(_, r, _, _)| r)
    );
    let killed = Instant::now();
    lab.kill(&mut victim);
    let (t_request_ns, result, t_ns, granted) =
        bounded("the waiter after the kill", bound + LIVENESS_BOUND, waiter)
            .await
            .expect("the waiting task");
    let lease = result.unwrap_or_else(|e| {
        panic!("the slot of a SIGKILLed lease holder did not come back within {bound:?}: {e:#}")
    });
    let kill_to_grant = granted - killed;
    lab.record(Event::Grant {
        pid: std::process::id(),
        t_ns,
        t_request_ns,
        lease: lease.clone(),
    });
    assert!(
        lease.token > dead.token,
        "token {} after the dead holder's {}",
        lease.token,
        dead.token
    );
    assert_eq!(lab.release(&lease).await, Released::Released);
    check_limit(&lab.events(), &key, 1).unwrap_or_else(|v| panic!("{v}"));
    report(&format!(
        "killed_lease_holder_recovers on {}: TTL {:?}; SIGKILL -> waiting acquirer granted in \
         {kill_to_grant:?} (the harness's recovery bound: {:?})",
        lab.store.url(),
        timing.ttl,
        timing.recovery()
    ));
    kill_to_grant
}

/// Where libfaketime is: `$BATON_LIBFAKETIME`, else where Debian's `faketime` package (or
/// another distribution) installs it.
fn libfaketime() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(LIBFAKETIME_ENV) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dirs) = std::fs::read_dir("/usr/lib") {
        for dir in dirs.flatten() {
            candidates.push(dir.path().join("faketime/libfaketime.so.1"));
        }
    }
    for dir in ["/usr/lib", "/usr/lib64", "/usr/local/lib"] {
        candidates.push(Path::new(dir).join("faketime/libfaketime.so.1"));
    }
    candidates.sort();
    candidates.into_iter().find(|p| p.is_file())
}

fn wall_ms() -> i64 {
    match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// Contract point 7, **Clocks**: "TTL arithmetic uses monotonic time on the client.
/// Wall-clock jumps never make a live lease stale."
///
/// A worker process holds with the lease TTL and a keeper, under libfaketime with only
/// `CLOCK_REALTIME` faked (`FAKETIME_DONT_FAKE_MONOTONIC=1`), its offset read from a file
/// the test rewrites. The test jumps the holder's wall clock 10 days forward, checks from
/// the holder's own reading (`clock` in the history) that the jump took effect, and waits
/// on the key for 2.5 TTLs: the wait must time out (the lease stays live), the holder must
/// go on renewing, and the store must never answer a renewal with lost. Then the same for
/// a jump 20 days back (to 10 days behind). The holder then releases (`Released`).
///
/// Needs libfaketime (Debian package `faketime`; or set `BATON_LIBFAKETIME`). Without it
/// the property fails under `CI=true` and is skipped, with a notice, otherwise.
pub async fn wall_clock_jump_keeps_lease(h: &Harness) {
    let Some(preload) = libfaketime() else {
        let why = format!(
            "libfaketime not found: install Debian's faketime package \
             (apt-get install -y faketime) or set {LIBFAKETIME_ENV} to libfaketime.so.1"
        );
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "wall_clock_jump_keeps_lease cannot run under CI=true: {why}"
        );
        skipped("wall_clock_jump_keeps_lease", &why);
        return;
    };
    conclusive("wall_clock_jump_keeps_lease", || jump_attempt(h, &preload)).await;
}

async fn jump_attempt(h: &Harness, preload: &Path) -> Result<(), String> {
    let mut lab = Lab::new(h, "wall_clock_jump_keeps_lease");
    let timing = lab.lease_timing();
    let validity = KeeperConfig::for_ttl(timing.ttl).validity();
    let key = lab.key("jump");
    let spec = lab.path("faketime");
    std::fs::write(&spec, "+0\n").expect("the faketime offset file");
    let jumps = [("forward", "+10d", 10i64), ("backward", "-10d", -10)];
    let marks: Vec<PathBuf> = jumps
        .iter()
        .map(|(name, _, _)| lab.path(&format!("jumped-{name}")))
        .collect();
    let env: Vec<(String, String)> = [
        ("LD_PRELOAD", preload.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE", spec.display().to_string()),
        // Read the offset file at every clock call, so a rewrite is a jump.
        ("FAKETIME_NO_CACHE", "1".into()),
        // Fake only the wall clock; libfaketime before 0.9.8 spells it without the prefix.
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
        ("DONT_FAKE_MONOTONIC", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut holder = lab.spawn_keeper(
        &key,
        1,
        Keep {
            marks: marks.clone(),
            env,
            ..Keep::default()
        },
    );
    let lease = lab.lease_of(&mut holder).await;
    let pid = holder.pid();

    for ((name, offset, days), mark) in jumps.iter().zip(&marks) {
        std::fs::write(&spec, format!("{offset}\n")).expect("the faketime offset file");
        let jumped_ns = monotonic_ns();
        std::fs::write(mark, b"go").expect("the clock mark");
        let reading = lab
            .wait_for(&mut holder, "its wall clock after the jump", |e| {
                matches!(e, Event::Clock { t_ns, .. } if *t_ns > jumped_ns)
                    || matches!(e, Event::Lost { .. })
            })
            .await;
        let Event::Clock { unix_ms, .. } = reading else {
            return keeper_missed(&lab, pid, lease.token, "the holder");
        };
        let skew_ms = unix_ms - wall_ms();
        let expected_ms = days * 86_400_000;
        assert!(
            (skew_ms - expected_ms).abs() < 3_600_000,
            "libfaketime did not take effect in the holder ({}): after the {name} jump its \
             wall clock is {:.2} days off ours, not {days}: {}",
            preload.display(),
            skew_ms as f64 / 86_400_000.0,
            holder.stderr_text()
        );

        let watch = timing.ttl * 5 / 2;
        let req = lab.lease_request(&key, 1, Wait::Timeout(watch));
        match lab.acquire(&req).await {
            Err(e) if e.kind() == ErrorKind::Timeout => {}
            Err(e) => panic!("a wait on a live lease failed: {e:#}"),
            Ok(granted) => {
                let events = lab.events();
                let until = believed_until(&events, pid, lease.token, validity);
                let regrant_ns = granted.sent_at.map(instant_ns).unwrap_or(0);
                assert!(
                    until < regrant_ns,
                    "after its wall clock jumped {name} ({offset}), a live lease (token {}) \
                     was granted to a watcher (token {}) while its holder still held it \
                     (its deadline was {} after the new grant)\n(history: {})",
                    lease.token,
                    granted.token,
                    ms_between(regrant_ns, until),
                    lab.history.display()
                );
                // The holder's deadline had passed: it was starved past its TTL and rightly
                // lost the lease (its keeper says so once it runs). Not a clock bug.
                assert_eq!(lab.release(&granted).await, Released::Released);
                return keeper_missed(&lab, pid, lease.token, "the holder");
            }
        }
        let events = lab.events();
        if lost_event(&events, pid).is_some() {
            return keeper_missed(&lab, pid, lease.token, "the holder");
        }
        let renewed = of(&events, pid).any(
            |e| matches!(e, Event::Renewed { ok: true, t_sent_ns, .. } if *t_sent_ns > jumped_ns),
        );
        assert!(
            renewed,
            "the holder did not renew its lease after the {name} jump"
        );
        let status = lab.inspect(&key).await;
        assert_eq!(
            status
                .slots
                .iter()
                .find(|s| s.slot == lease.slot)
                .map(|s| (s.state, s.token)),
            Some((SlotState::Held, Some(lease.token))),
            "after the {name} jump: {status:?}"
        );
    }
    lab.let_go(&mut holder).await;
    let events = lab.events();
    if lost_event(&events, pid).is_some() {
        return keeper_missed(&lab, pid, lease.token, "the holder");
    }
    Ok(())
}

/// The store's answer to a renewal of `token` by `pid` that took a *live* lease away, if
/// any: a `renewed` event whose error is `lost` or `not_held`, for a renewal sent before
/// the deadline the holder had at the time (a renewal sent after it, by a holder that was
/// starved past its deadline, may rightly find the lease gone).
fn taken_by_store(
    events: &[Event],
    pid: u32,
    token: baton_core::Token,
    validity: Duration,
) -> Option<String> {
    of(events, pid).find_map(|e| match e {
        Event::Renewed {
            token: t,
            ok: false,
            kind: Some(kind),
            error,
            t_sent_ns,
            ..
        } if *t == token
            && (kind == ErrorKind::Lost.as_str() || kind == ErrorKind::NotHeld.as_str()) =>
        {
            let before: Vec<Event> = of(events, pid)
                .filter(|e| e.t_ns() <= *t_sent_ns)
                .cloned()
                .collect();
            let live_until = believed_until(&before, pid, token, validity);
            (*t_sent_ns < live_until).then(|| {
                format!(
                    "{} (the renewal was sent {} before the holder's deadline)",
                    error.clone().unwrap_or_else(|| kind.clone()),
                    ms_between(*t_sent_ns, live_until)
                )
            })
        }
        _ => None,
    })
}

/// A live lease's keeper (of `pid`, `token`) declared loss, or its deadline passed. If the
/// store took the lease away while it was live, that is a violation: panic. Otherwise the
/// keeper missed its own deadline (the machine starved it for most of a TTL), which
/// proves nothing about the store: the attempt is inconclusive.
fn keeper_missed(
    lab: &Lab<'_>,
    pid: u32,
    token: baton_core::Token,
    who: &str,
) -> Result<(), String> {
    let events = lab.events();
    let validity = KeeperConfig::for_ttl(lab.lease_timing().ttl).validity();
    if let Some(answer) = taken_by_store(&events, pid, token, validity) {
        panic!(
            "the store took {who}'s live lease (token {token}) away: {answer}\n(history: {})",
            lab.history.display()
        );
    }
    let reason = of(&events, pid)
        .find_map(|e| match e {
            Event::Lost {
                token: t, reason, ..
            } if *t == token => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "its deadline passed before it could renew".into());
    Err(format!("{who}'s keeper missed its own deadline: {reason}"))
}

/// How many times a property that needs a live lease tries before it gives up: an
/// attempt in which a keeper missed its own deadline proves nothing (see
/// [`keeper_missed`]), so it is tried again, with a notice.
const ATTEMPTS: usize = 3;

/// Runs `attempt` until one is conclusive (`Ok`), at most [`ATTEMPTS`] times; panics if
/// none was.
async fn conclusive<F, Fut>(property: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let mut why = Vec::new();
    for n in 1..=ATTEMPTS {
        match attempt().await {
            Ok(()) => return,
            Err(e) => {
                report(&format!(
                    "{property}: attempt {n} of {ATTEMPTS} inconclusive: {e}"
                ));
                why.push(e);
            }
        }
    }
    panic!(
        "{property}: none of {ATTEMPTS} attempts was conclusive; each time a holder's keeper \
         missed its own deadline, so the machine starved it for most of a TTL (give the \
         harness a longer LeaseTiming::ttl):\n  {}",
        why.join("\n  ")
    );
}

/// A lease held in the test process through `store`, kept by a keeper whose renewals are
/// recorded in the history.
async fn keep_here(
    lab: &Lab<'_>,
    store: &Arc<dyn Store>,
    key: &Key,
    limit: u32,
) -> (Lease, Keeper) {
    let req = lab.lease_request(key, limit, Wait::NoWait);
    let sent = Instant::now();
    let lease = lab
        .acquire_on(store.as_ref(), &req)
        .await
        .unwrap_or_else(|e| panic!("acquire '{key}' (limit {limit}): {e:#}"));
    let recording =
        RecordingStore::new(Arc::clone(store), &lab.history).unwrap_or_else(|e| panic!("{e}"));
    let keeper = Keeper::start(
        Arc::new(recording),
        lease.clone(),
        KeeperConfig::for_ttl(lab.lease_timing().ttl),
        sent,
    )
    .unwrap_or_else(|e| panic!("start a keeper: {e:#}"));
    (lease, keeper)
}

/// Checks that a keeper in this process still holds `lease`: panics if the store took it
/// away, and is inconclusive if the keeper missed its own deadline.
fn still_held(lab: &Lab<'_>, keeper: &Keeper, lease: &Lease, who: &str) -> Result<(), String> {
    match keeper.state() {
        LeaseState::Held { .. } => Ok(()),
        LeaseState::Stopped => panic!("{who}'s keeper stopped on its own"),
        LeaseState::Lost { .. } => keeper_missed(lab, std::process::id(), lease.token, who),
    }
}

/// `baton break KEY [--holder ID]` (lease stores): a break frees exactly the named holder's
/// slot, the holder learns it at its next renewal, and the next grant's token is higher.
///
/// Two holders of a semaphore of 2, each on its own store handle with a keeper. Breaking
/// with a holder id that holds nothing frees nothing (both still held, keepers still
/// held). Breaking one holder returns its slot and token; its keeper declares loss, its
/// own renew answers `Lost` (or `NotHeld`) and its release `NotHeld`; the other holder
/// keeps its slot; a new acquirer gets the freed slot with a token above both.
pub async fn break_frees_and_holder_learns(h: &Harness) {
    conclusive("break_frees_and_holder_learns", || break_attempt(h)).await;
}

async fn break_attempt(h: &Harness) -> Result<(), String> {
    let lab = Lab::new(h, "break_frees_and_holder_learns");
    let timing = lab.lease_timing();
    assert!(
        lab.store.capabilities().break_lease,
        "{} does not support break_lease, which every lease store must (baton break)",
        lab.store.url()
    );
    let key = lab.key("broken");
    let (a_store, c_store) = (h.open(), h.open());
    let (a, a_keeper) = keep_here(&lab, &a_store, &key, 2).await;
    let (c, c_keeper) = keep_here(&lab, &c_store, &key, 2).await;

    let nobody = HolderId::random();
    let freed = bounded(
        "break by a holder id that holds nothing",
        LIVENESS_BOUND,
        lab.store.break_lease(&key, Some(nobody)),
    )
    .await
    .unwrap_or_else(|e| panic!("break '{key}' --holder {nobody}: {e:#}"));
    assert!(
        freed.is_empty(),
        "a break naming a holder that holds nothing freed {freed:?}"
    );
    let status = lab.inspect(&key).await;
    let held: Vec<_> = status
        .slots
        .iter()
        .filter(|s| s.state == SlotState::Held)
        .map(|s| (s.slot, s.token))
        .collect();
    let mut expected = vec![(a.slot, Some(a.token)), (c.slot, Some(c.token))];
    expected.sort();
    assert_eq!(
        held, expected,
        "after a break that named nobody: {status:?}"
    );
    still_held(
        &lab,
        &a_keeper,
        &a,
        "the first holder, after a break naming nobody",
    )?;

    let freed = bounded(
        "break by holder id",
        LIVENESS_BOUND,
        lab.store.break_lease(&key, Some(a.holder.id)),
    )
    .await
    .unwrap_or_else(|e| panic!("break '{key}' --holder {}: {e:#}", a.holder.id));
    assert_eq!(
        freed.iter().map(|s| s.slot).collect::<Vec<_>>(),
        vec![a.slot],
        "break --holder should free exactly the holder's slot: {freed:?}"
    );
    if let Some(token) = freed[0].token {
        assert_eq!(token, a.token, "the broken slot's token: {freed:?}");
    }
    let state = bounded(
        "the broken holder's keeper",
        timing.ttl + LIVENESS_BOUND,
        a_keeper.lost(),
    )
    .await;
    assert!(
        matches!(state, LeaseState::Lost { .. }),
        "the broken holder's keeper should declare loss: {state:?}"
    );
    match bounded("renew after a break", LIVENESS_BOUND, a_store.renew(&a)).await {
        Ok(renewed) => panic!("a broken lease was renewed: {renewed:?}"),
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::Lost | ErrorKind::NotHeld),
            "renewing a broken lease should answer lost or not-held: {e:#}"
        ),
    }
    assert_eq!(
        lab.release_on(a_store.as_ref(), &a).await,
        Released::NotHeld,
        "releasing a broken lease"
    );
    still_held(&lab, &c_keeper, &c, "the holder the break did not name")?;

    let next = lab.grant(&lab.lease_request(&key, 2, Wait::NoWait)).await;
    assert_eq!(next.slot, a.slot, "the freed slot is the only free one");
    assert!(
        next.token > a.token && next.token > c.token,
        "token {} after tokens {} and {}",
        next.token,
        a.token,
        c.token
    );
    let status = lab.inspect(&key).await;
    assert_eq!(status.held(), 2, "{status:?}");
    c_keeper.stop();
    assert_eq!(
        lab.release_on(c_store.as_ref(), &c).await,
        Released::Released
    );
    assert_eq!(lab.release(&next).await, Released::Released);
    Ok(())
}

/// `baton resize KEY N`: "Lowering it never evicts holders; it stops new grants until they
/// drain" (the `Store::resize` contract), and raising it grants at once.
///
/// Three holders of a semaphore of 3 keep their leases with keepers; the limit goes down
/// to 1: resize answers the new limit with all three still held, and after a TTL (renewals
/// included) inspect still shows all three and every keeper still holds. Requests (with
/// the new limit) are `Busy` / `Timeout` while any holder remains, also after two of the
/// three released; once the last one releases, one is granted. Raising the limit to 3 then
/// grants two more at once, and a third is `Busy`. Run where the store declares resize.
pub async fn resize_never_evicts(h: &Harness) {
    conclusive("resize_never_evicts", || resize_attempt(h)).await;
}

async fn resize_attempt(h: &Harness) -> Result<(), String> {
    let lab = Lab::new(h, "resize_never_evicts");
    let timing = lab.lease_timing();
    let key = lab.key("resize");
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(keep_here(&lab, &lab.store, &key, 3).await);
    }
    let tokens = |status: &baton_core::KeyStatus| {
        let mut t: Vec<_> = status
            .slots
            .iter()
            .filter(|s| s.state == SlotState::Held)
            .filter_map(|s| s.token)
            .collect();
        t.sort();
        t
    };
    let mut ours: Vec<_> = held.iter().map(|(l, _)| l.token).collect();
    ours.sort();

    let status = bounded(
        "resize to 1",
        LIVENESS_BOUND,
        lab.store.resize(&key, Resize::To(1)),
    )
    .await
    .unwrap_or_else(|e| panic!("resize '{key}' 1: {e:#}"));
    assert_eq!(status.limit, 1, "resize answered {status:?}");
    assert_eq!(tokens(&status), ours, "resize evicted a holder: {status:?}");
    tokio::time::sleep(timing.ttl).await;
    let status = lab.inspect(&key).await;
    assert_eq!(status.limit, 1, "{status:?}");
    assert_eq!(
        tokens(&status),
        ours,
        "a TTL after lowering the limit, a holder is gone: {status:?}"
    );
    for (i, (lease, keeper)) in held.iter().enumerate() {
        still_held(
            &lab,
            keeper,
            lease,
            &format!("holder {i}, a TTL after the limit was lowered"),
        )?;
    }
    lab.refused(
        &lab.lease_request(&key, 1, Wait::NoWait),
        ErrorKind::Busy,
        "3 holders, limit lowered to 1",
    )
    .await;
    lab.refused(
        &lab.lease_request(&key, 1, Wait::Timeout(SETTLE)),
        ErrorKind::Timeout,
        "3 holders, limit lowered to 1",
    )
    .await;

    let (last, last_keeper) = held.pop().expect("three holders");
    for (lease, keeper) in held {
        keeper.stop();
        assert_eq!(lab.release(&lease).await, Released::Released);
    }
    lab.refused(
        &lab.lease_request(&key, 1, Wait::NoWait),
        ErrorKind::Busy,
        "1 holder left, limit 1",
    )
    .await;
    last_keeper.stop();
    assert_eq!(lab.release(&last).await, Released::Released);
    let one = lab.grant(&lab.lease_request(&key, 1, Wait::NoWait)).await;
    assert_eq!(one.slot, 0, "the only slot of a limit of 1: {one:?}");
    assert!(
        one.token > *ours.last().expect("tokens"),
        "token {} after {ours:?}",
        one.token
    );

    let status = bounded(
        "resize to 3",
        LIVENESS_BOUND,
        lab.store.resize(&key, Resize::To(3)),
    )
    .await
    .unwrap_or_else(|e| panic!("resize '{key}' 3: {e:#}"));
    assert_eq!(status.limit, 3, "resize answered {status:?}");
    let mut more = Vec::new();
    for _ in 0..2 {
        more.push(lab.grant(&lab.lease_request(&key, 3, Wait::NoWait)).await);
    }
    lab.refused(
        &lab.lease_request(&key, 3, Wait::NoWait),
        ErrorKind::Busy,
        "3 held after raising the limit to 3",
    )
    .await;
    let mut slots: Vec<u32> = more.iter().chain([&one]).map(|l| l.slot).collect();
    slots.sort();
    assert_eq!(slots, vec![0, 1, 2], "distinct slots below the new limit");
    for lease in more.iter().chain([&one]) {
        assert_eq!(lab.release(lease).await, Released::Released);
    }
    check_limit(&lab.events(), &key, 3).unwrap_or_else(|v| panic!("{v}"));
    Ok(())
}

/// `baton resize KEY +N` / `-N`: a step is applied atomically to the limit the store has
/// (the [`Resize`] contract), so steps made at once all count, and a step that would leave
/// the limit below 1 is refused, naming the limit, and changes nothing.
///
/// A key of limit 2 gets eight `+1` steps and then four `-1` steps, each set at once from
/// its own task: the limit ends at 6. A `-6` step is refused `InvalidInput` with the
/// current limit 6 and leaves it 6; a holder is granted and stays held across a `-5` step
/// to 1. Run where the store declares resize.
pub async fn resize_steps_all_count(h: &Harness) {
    let lab = Lab::new(h, "resize_steps_all_count");
    let key = lab.key("steps");
    let first = lab.grant(&lab.lease_request(&key, 2, Wait::NoWait)).await;
    assert_eq!(lab.release(&first).await, Released::Released);
    for (step, n, after) in [(1i64, 8, 10u32), (-1, 4, 6)] {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (store, key) = (Arc::clone(&lab.store), key.clone());
                tokio::spawn(async move { store.resize(&key, Resize::By(step)).await })
            })
            .collect();
        for t in tasks {
            bounded("a resize step", LIVENESS_BOUND, t)
                .await
                .expect("the resize task")
                .unwrap_or_else(|e| panic!("resize '{key}' by {step:+}: {e:#}"));
        }
        let status = lab.inspect(&key).await;
        assert_eq!(
            status.limit,
            after,
            "{n} steps of {step:+} at once, from limit {}: some step was lost ({status:?})",
            after as i64 - step * n as i64
        );
    }
    let e = bounded(
        "resize by -6",
        LIVENESS_BOUND,
        lab.store.resize(&key, Resize::By(-6)),
    )
    .await
    .expect_err("a step to a limit of 0 must be refused");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e:#}");
    assert_eq!(
        e.current_limit(),
        Some(6),
        "the error names the limit: {e:#}"
    );
    assert_eq!(
        lab.inspect(&key).await.limit,
        6,
        "a refused step changed the limit"
    );
    let held = lab.grant(&lab.lease_request(&key, 6, Wait::NoWait)).await;
    let status = bounded(
        "resize by -5",
        LIVENESS_BOUND,
        lab.store.resize(&key, Resize::By(-5)),
    )
    .await
    .unwrap_or_else(|e| panic!("resize '{key}' by -5: {e:#}"));
    assert_eq!(status.limit, 1, "{status:?}");
    assert_eq!(
        status.held(),
        1,
        "a step down evicted the holder: {status:?}"
    );
    assert_eq!(lab.release(&held).await, Released::Released);
}

/// A file's state, to show a store left a damaged file alone.
#[derive(Debug, PartialEq, Eq)]
enum Snapshot {
    Missing,
    Link(PathBuf),
    File(Vec<u8>),
    Other(String),
}

fn snapshot(path: &Path) -> Snapshot {
    match std::fs::symlink_metadata(path) {
        Err(_) => Snapshot::Missing,
        Ok(m) if m.file_type().is_symlink() => {
            Snapshot::Link(std::fs::read_link(path).unwrap_or_default())
        }
        Ok(m) if m.is_file() => Snapshot::File(std::fs::read(path).unwrap_or_default()),
        Ok(m) => Snapshot::Other(format!("{:?}", m.file_type())),
    }
}

/// Damaged state is refused, not guessed at ("Hostile state" in each store's README):
/// garbage or a symlink where a lease file belongs, a database that is not one. The store
/// must answer [`ErrorKind::Corrupt`] with a message, never panic, hang, grant, or "repair"
/// the damage by overwriting it.
///
/// For each of the harness's [`Harness::corrupt`] hooks: a key gets a lease, released; the
/// hook damages the store; then on a fresh handle (opening may itself refuse the store,
/// as `Corrupt`) and on the handle opened before the damage, a no-wait and a timed acquire
/// must fail with `Corrupt`, and inspect must either fail with `Corrupt` or answer. The
/// files the hook damaged must be unchanged. The errors are printed.
pub async fn garbage_is_a_clear_error(h: &Harness) {
    assert!(
        !h.corruptions().is_empty(),
        "garbage_is_a_clear_error needs the harness to say how to damage the store: \
         Harness::corrupt(name, hook)"
    );
    for &(name, damage) in h.corruptions() {
        let lab = Lab::new(h, "garbage_is_a_clear_error");
        let key = lab.key(name);
        let lease = lab.grant(&lab.lease_request(&key, 1, Wait::NoWait)).await;
        assert_eq!(lab.release(&lease).await, Released::Released);
        let damaged = damage(h.url(), &key)
            .unwrap_or_else(|e| panic!("the '{name}' hook could not damage the store: {e}"));
        let before: Vec<Snapshot> = damaged.iter().map(|p| snapshot(p)).collect();

        let refusals = std::cell::RefCell::new(Vec::<(String, String)>::new());
        let corrupt = |what: &str, e: &baton_core::Error| {
            assert_eq!(
                e.kind(),
                ErrorKind::Corrupt,
                "{name}: {what} should fail as corrupt: {e:#}"
            );
            assert!(
                !e.message().trim().is_empty(),
                "{name}: {what} failed as corrupt without saying why"
            );
            refusals
                .borrow_mut()
                .push((what.to_owned(), format!("{e:#}")));
        };
        let mut stores: Vec<(&str, Arc<dyn Store>)> = Vec::new();
        match h.try_open() {
            Ok(store) => stores.push(("a new handle", store)),
            Err(e) => corrupt("opening the store", &e),
        }
        stores.push((
            "the handle opened before the damage",
            Arc::clone(&lab.store),
        ));
        for (which, store) in stores {
            for wait in [Wait::NoWait, Wait::Timeout(SETTLE)] {
                let req = lab.lease_request(&key, 1, wait);
                let what = format!("acquire ({wait:?}) on {which}");
                match lab.acquire_on(store.as_ref(), &req).await {
                    Ok(granted) => panic!("{name}: {what} was granted {granted:?}"),
                    Err(e) => corrupt(&what, &e),
                }
            }
            let what = format!("inspect on {which}");
            match bounded(&what, LIVENESS_BOUND, store.inspect(&key)).await {
                Ok(_) => {}
                Err(e) => corrupt(&what, &e),
            }
        }
        let refusals = refusals.into_inner();
        let ops: Vec<&str> = refusals.iter().map(|(what, _)| what.as_str()).collect();
        report(&format!(
            "garbage_is_a_clear_error on {} ({name}): refused as corrupt: {}; first error: {}",
            lab.store.url(),
            ops.join(", "),
            refusals.first().map(|r| r.1.as_str()).unwrap_or("-")
        ));
        let after: Vec<Snapshot> = damaged.iter().map(|p| snapshot(p)).collect();
        for ((path, b), a) in damaged.iter().zip(&before).zip(&after) {
            assert_eq!(
                a,
                b,
                "{name}: the store changed {} that it should have refused",
                path.display()
            );
        }
    }
}
