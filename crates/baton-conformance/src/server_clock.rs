//! Contract point 7 on the server's side: "A step of any wall clock — a client's or the
//! server's — never makes a live lease stale."
//!
//! The property needs a private server whose wall clock the suite can step: a
//! [`SteppedServer`], which [`Harness::stepped_server`] starts for the stores whose server
//! scripts can run it under libfaketime (`scripts/server-postgres`, `scripts/server-etcd`,
//! given `BATON_SERVER_FAKETIME`). A store without one, or whose server does not in fact
//! see the stepped clock (the suite reads the server's own clock after each step), is
//! reported as skipped on stderr, never passed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use baton_core::{ErrorKind, KeeperConfig, Released, SlotState, StoreUrl, Wait};

use crate::history::Event;
use crate::servers::Server;
use crate::support::{report, skipped, Keep, Lab};
use crate::{instant_ns, monotonic_ns, Harness, LIBFAKETIME_ENV, LIVENESS_BOUND};

/// How a stepped server's own wall clock is read.
#[derive(Debug)]
enum Probe {
    /// `scripts/server-NAME now DIR` prints it in ms since the Unix epoch.
    Script,
    /// The `Date` header of an HTTP answer from this `host:port` (whole seconds).
    HttpDate(String),
}

/// A private server of the harness's store whose wall clock the suite can step (and only
/// its wall clock: `CLOCK_MONOTONIC` is left alone, as a real step leaves it). Stopped
/// when dropped.
#[derive(Debug)]
pub struct SteppedServer {
    server: Server,
    url: String,
    control: PathBuf,
    probe: Probe,
}

impl SteppedServer {
    /// The store URL of the private server: the harness's URL with the server's address.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sets the server's wall clock to `offset` from the real time (libfaketime's syntax:
    /// `+2h`, `-2h`, `+0`). The offset file is replaced by a rename, so the server never
    /// reads a half-written one.
    pub fn step(&self, offset: &str) -> std::io::Result<()> {
        let tmp = self.control.with_extension("new");
        std::fs::write(&tmp, format!("{offset}\n"))?;
        std::fs::rename(&tmp, &self.control)
    }

    /// How far the server's wall clock is ahead of ours, in ms (seconds resolution for an
    /// HTTP probe).
    pub fn skew_ms(&self) -> std::io::Result<i64> {
        let server = match &self.probe {
            Probe::Script => {
                let out = self.server.run("now")?;
                out.trim().parse::<i64>().map_err(|e| {
                    std::io::Error::other(format!("the server's clock reads {out:?}: {e}"))
                })?
            }
            Probe::HttpDate(addr) => http_date_ms(addr)?,
        };
        Ok(server - wall_ms())
    }
}

impl Harness {
    /// Starts a private server of this harness's store under libfaketime (`preload`), with
    /// a wall clock [`SteppedServer::step`] can move; `Err` says why the store has none.
    /// The server is found by the harness URL's scheme (its script in `scripts/`), and its
    /// URL keeps the harness URL's path and parameters (database, schema, prefix).
    pub fn stepped_server(&self, preload: &Path) -> Result<SteppedServer, String> {
        let (scheme, rest) = self
            .url()
            .split_once("://")
            .ok_or_else(|| format!("the harness URL {} has no scheme", self.url()))?;
        let (script, var, control): (&str, &str, &str) = match scheme {
            "postgres" | "postgresql" => ("postgres", "BATON_TEST_POSTGRES", "faketime"),
            "etcd" => ("etcd", "BATON_TEST_ETCD", "member/faketime"),
            "redis" => ("redis", "BATON_TEST_REDIS", "faketime"),
            "zk" => ("zookeeper", "BATON_TEST_ZK", "faketime"),
            other => {
                return Err(format!(
                    "the {other} store has no server whose clock the suite can step"
                ))
            }
        };
        let env = [(
            "BATON_SERVER_FAKETIME".to_owned(),
            preload.display().to_string(),
        )];
        let server = Server::start_with_env(script, "start", "stop", &env)
            .map_err(|e| format!("cannot start a private {script} server: {e}"))?;
        let private = server
            .var(var)
            .ok_or_else(|| format!("scripts/server-{script} printed no {var}"))?
            .to_owned();
        let authority = |u: &str| -> String {
            let after = u.split_once("://").map_or(u, |(_, r)| r);
            after
                .split(['/', '?'])
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        let host = authority(&private);
        let tail = &rest[authority(self.url()).len()..];
        let probe = match script {
            "postgres" | "redis" | "zookeeper" => Probe::Script,
            _ => Probe::HttpDate(host.rsplit('@').next().unwrap_or(&host).to_owned()),
        };
        Ok(SteppedServer {
            control: server.dir().join(control),
            url: format!("{scheme}://{host}{tail}"),
            server,
            probe,
        })
    }
}

/// Where libfaketime is: `$BATON_LIBFAKETIME`, else where Debian's `faketime` package (or
/// another distribution) installs it.
fn find_libfaketime() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(LIBFAKETIME_ENV) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let mut candidates = Vec::new();
    for dir in ["/usr/lib", "/usr/lib64", "/usr/local/lib"] {
        if let Ok(dirs) = std::fs::read_dir(dir) {
            for d in dirs.flatten() {
                candidates.push(d.path().join("faketime/libfaketime.so.1"));
            }
        }
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

/// The server's time from the `Date` header of its answer to `GET /version`.
fn http_date_ms(addr: &str) -> std::io::Result<i64> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET /version HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let date = answer
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("date"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .ok_or_else(|| std::io::Error::other(format!("no Date header from {addr}")))?;
    parse_http_date(&date)
        .ok_or_else(|| std::io::Error::other(format!("cannot read the Date header {date:?}")))
}

/// `Tue, 01 Dec 2026 11:09:39 GMT` in ms since the Unix epoch.
fn parse_http_date(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, month, year, hms, "GMT"] = parts.as_slice() else {
        return None;
    };
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let m = months.iter().position(|x| x == month)? as i64 + 1;
    let (d, y): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, min, sec] = t.as_slice() else {
        return None;
    };
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + min) * 60_000 + sec * 1000)
}

/// Contract point 7, **Clocks**, the server's wall clock: "A step of any wall clock — a
/// client's or the server's — never makes a live lease stale."
///
/// A private server runs under libfaketime ([`Harness::stepped_server`]). A worker holds a
/// key with the lease TTL and a keeper; a waiter queues on the key (waiting 3 TTLs), and
/// while it waits the server's wall clock steps 2 hours forward; the suite reads the
/// server's own clock to check the step took effect. The waiter must time out (the lease
/// stays live), the holder must go on renewing with no renewal answered lost, and the slot
/// must show held by the holder's token. Then the same with the clock 2 hours behind.
/// Finally a waiter queues, the holder releases (`Released`), and the waiter is granted.
///
/// Needs libfaketime (Debian package `faketime`; or set `BATON_LIBFAKETIME`): without it
/// the property fails under `CI=true` and is skipped, with a notice, otherwise. A store
/// with no such server, or whose server does not see the step, is skipped with a notice.
/// An attempt in which the holder's keeper missed its *own* deadline (a starved machine)
/// proves nothing and is tried again, up to three times, as the lease properties do.
pub async fn server_clock_step_keeps_lease(h: &Harness) {
    let Some(preload) = find_libfaketime() else {
        let why = format!(
            "libfaketime not found: install Debian's faketime package \
             (apt-get install -y faketime) or set {LIBFAKETIME_ENV} to libfaketime.so.1"
        );
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{NAME} cannot run under CI=true: {why}"
        );
        skipped(NAME, &why);
        return;
    };
    let server = match tokio::task::block_in_place(|| h.stepped_server(&preload)) {
        Ok(s) => s,
        Err(why) => {
            skipped(NAME, &why);
            return;
        }
    };
    let mut why = Vec::new();
    for n in 1..=ATTEMPTS {
        match step_attempt(h, &server).await {
            Ok(Stepped::Yes) => {
                report(&format!(
                    "{NAME} on {}: the server's wall clock stepped +2h and -2h (checked on \
                     the server); the live lease stayed its holder's and the waiter was \
                     granted after the release",
                    server.url()
                ));
                return;
            }
            Ok(Stepped::No(what)) => {
                skipped(NAME, &what);
                return;
            }
            Err(e) => {
                report(&format!(
                    "{NAME}: attempt {n} of {ATTEMPTS} inconclusive: {e}"
                ));
                why.push(e);
            }
        }
    }
    panic!(
        "{NAME}: none of {ATTEMPTS} attempts was conclusive; each time the holder's keeper \
         missed its own deadline, so the machine starved it for most of a TTL (give the \
         harness a longer LeaseTiming::ttl):\n  {}",
        why.join("\n  ")
    );
}

const NAME: &str = "server_clock_step_keeps_lease";

/// How many times the property tries before it gives up: an attempt in which the holder's
/// keeper missed its own deadline (a starved machine) proves nothing about the store.
const ATTEMPTS: usize = 3;

/// Whether the server saw the steps.
enum Stepped {
    Yes,
    /// It did not: why, in words.
    No(String),
}

/// The latest deadline the holder `pid` believed in among `events`: those its keeper
/// published, and each successful renewal's call time plus the keeper's validity.
fn believed_until(events: &[&Event], validity: Duration) -> u64 {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Held { deadline_ns, .. } => Some(*deadline_ns),
            Event::Renewed {
                t_sent_ns,
                ok: true,
                ..
            } => Some(t_sent_ns + validity.as_nanos() as u64),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// One attempt: panics on a violation; `Err` when the holder's keeper missed its own
/// deadline (inconclusive).
async fn step_attempt(h: &Harness, server: &SteppedServer) -> Result<Stepped, String> {
    let mut lab = Lab::new(h, NAME);
    let timing = lab.lease_timing();
    let validity = KeeperConfig::for_ttl(timing.ttl).validity();
    let url = StoreUrl::parse(server.url()).expect("the stepped server's URL");
    let store = (h.open)(&url).unwrap_or_else(|e| panic!("cannot open {url}: {e:#}"));
    let key = lab.key("step");
    let mut holder = lab.spawn_keeper(
        &key,
        1,
        Keep {
            url: Some(server.url().to_owned()),
            ..Keep::default()
        },
    );
    let lease = lab.lease_of(&mut holder).await;
    let pid = holder.pid();
    // The holder's own loss, or a renewal the store refused while the holder still
    // believed it held: the first is inconclusive, the second a violation.
    let judge = |lab: &Lab<'_>, when: &str| -> Result<(), String> {
        let events = lab.events();
        let mine: Vec<&Event> = events.iter().filter(|e| e.pid() == pid).collect();
        for (i, e) in mine.iter().enumerate() {
            if let Event::Renewed {
                ok: false,
                kind: Some(k),
                t_sent_ns,
                ..
            } = e
            {
                let before = believed_until(&mine[..i], validity);
                if (k == ErrorKind::Lost.as_str() || k == ErrorKind::NotHeld.as_str())
                    && *t_sent_ns < before
                {
                    panic!(
                        "{when}, the store answered a renewal of a live lease (token {}) \
                         with {e:?}\n(history: {})",
                        lease.token,
                        lab.history.display()
                    );
                }
            }
        }
        match mine.iter().find_map(|e| match e {
            Event::Lost { reason, .. } => Some(reason.clone()),
            _ => None,
        }) {
            Some(reason) => Err(format!("{when}, the holder's keeper gave up: {reason}")),
            None => Ok(()),
        }
    };

    for (name, offset, hours) in [("forward", "+2h", 2i64), ("backward", "-2h", -2)] {
        let when = format!("after the server's clock stepped {name} ({offset})");
        let req = lab.lease_request(&key, 1, Wait::Timeout(timing.ttl * 3));
        let mut stepped_ns = 0;
        let (outcome, skew) = tokio::join!(lab.acquire_on(&*store, &req), async {
            // The waiter queues first; the clock steps while it waits.
            tokio::time::sleep(timing.ttl / 2).await;
            tokio::task::block_in_place(|| server.step(offset)).expect("the clock offset file");
            stepped_ns = monotonic_ns();
            tokio::task::block_in_place(|| server.skew_ms())
        });
        let skew = skew.unwrap_or_else(|e| panic!("cannot read the server's clock: {e}"));
        if (skew - hours * 3_600_000).abs() > 1_800_000 {
            let _ = tokio::task::block_in_place(|| server.step("+0"));
            if let Ok(granted) = &outcome {
                let _ = lab.release_on(&*store, granted).await;
            }
            lab.let_go(&mut holder).await;
            return Ok(Stepped::No(format!(
                "the {} server's wall clock did not move when libfaketime stepped it \
                 {offset} ({:.1} h off ours afterwards): the server does not read the clock \
                 through libc (Go programs, etcd among them, read the vDSO), so this \
                 property cannot step it",
                url.scheme(),
                skew as f64 / 3_600_000.0
            )));
        }
        match outcome {
            Err(e) if e.kind() == ErrorKind::Timeout => {}
            Err(e) => panic!("{when}, a wait on a live lease failed: {e:#}"),
            Ok(granted) => {
                let events = lab.events();
                let mine: Vec<&Event> = events.iter().filter(|e| e.pid() == pid).collect();
                let until = believed_until(&mine, validity);
                let regrant_ns = granted.sent_at.map(instant_ns).unwrap_or(0);
                assert!(
                    until < regrant_ns,
                    "{when}, a waiter was granted token {} while the holder of token {} \
                     still held it (its deadline was {:.1}ms after the new grant)\n\
                     (history: {})",
                    granted.token,
                    lease.token,
                    (until as f64 - regrant_ns as f64) / 1e6,
                    lab.history.display()
                );
                // The holder's deadline had passed: it was starved past its TTL and
                // rightly lost the lease. Not a clock bug.
                let _ = lab.release_on(&*store, &granted).await;
                let _ = tokio::task::block_in_place(|| server.step("+0"));
                judge(&lab, &when)?;
                return Err(format!(
                    "{when}, the holder's deadline passed before it renewed"
                ));
            }
        }
        if let Err(e) = judge(&lab, &when) {
            let _ = tokio::task::block_in_place(|| server.step("+0"));
            return Err(e);
        }
        let renewed = lab.events().iter().any(|e| {
            e.pid() == pid
                && matches!(e, Event::Renewed { ok: true, t_sent_ns, .. } if *t_sent_ns > stepped_ns)
        });
        assert!(
            renewed,
            "{when}, the holder did not renew its lease\n(history: {})",
            lab.history.display()
        );
        let status = store
            .inspect(&key)
            .await
            .unwrap_or_else(|e| panic!("inspect {when}: {e:#}"));
        assert_eq!(
            status
                .slots
                .iter()
                .find(|s| s.slot == lease.slot)
                .map(|s| (s.state, s.token)),
            Some((SlotState::Held, Some(lease.token))),
            "{when}: {status:?}"
        );
    }

    // The holder lets go; a waiter queued before that is granted.
    let req = lab.lease_request(&key, 1, Wait::Timeout(LIVENESS_BOUND));
    let (granted, _) = tokio::join!(lab.acquire_on(&*store, &req), async {
        tokio::time::sleep(timing.ttl / 2).await;
        lab.let_go(&mut holder).await
    });
    let _ = tokio::task::block_in_place(|| server.step("+0"));
    let granted = granted
        .unwrap_or_else(|e| panic!("the waiter was not granted after the holder released: {e:#}"));
    judge(&lab, "after the steps")?;
    let released = lab.events().into_iter().find_map(|e| match e {
        Event::Released {
            pid: p, outcome, ..
        } if p == pid => Some(outcome),
        _ => None,
    });
    assert_eq!(
        released,
        Some(Some(Released::Released)),
        "the holder's release after the steps"
    );
    assert!(granted.token > lease.token);
    assert_eq!(lab.release_on(&*store, &granted).await, Released::Released);
    Ok(Stepped::Yes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 01 Dec 2026 11:09:39 GMT"),
            Some(1_796_123_379_000)
        );
        assert_eq!(parse_http_date("yesterday"), None);
    }
}
