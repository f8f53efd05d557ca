//! The grant: one script call per attempt, the FIFO queue, the wait on the request's own
//! wake-up list, and the takeover of leases and queue entries that stood still.
//!
//! Guarantees:
//! - **Takeover by the waiter's monotonic clock (contract point 7).** Every answer to a
//!   request that is not granted lists the key's leases as `(slot, grant, renewal count,
//!   lost)` and the waiters ahead as `(id, refresh count)`. The request remembers, on its
//!   own monotonic clock, when it first saw each in that exact state (counting from when
//!   the answer came back, which is after the renewal that wrote it was sent). Only one
//!   that stood still for its TTL (for a lease held back by a lock-delay: for the delay),
//!   or whose process is gone on this host, is named in the next attempt, and the script
//!   removes it only if it is still in that state (compare-and-swap on the counter). The
//!   server's clock plays no part: a step of it cannot end a lease that is renewed.
//! - **FIFO without polling.** A queued request sleeps in `BLPOP` on its own list; a
//!   release pushes to the one waiter its slot made eligible (and when that slot is the
//!   only free one, grants it to the head waiter in the same script and pushes the
//!   grant, so the waiter needs no script of its own). It wakes on its own only to
//!   refresh its queue entry (every TTL/3), to take over what stood still, or at its
//!   deadline.
//! - **Retries are the same request.** An attempt whose answer was lost is recognised by
//!   the request id on the next one; a request that gives up is withdrawn by id
//!   (`store.rs`), which also releases a grant nobody received.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use baton_core::kit::errors;
use baton_core::kit::time::{next_wake, unix_ms_now, validate_ttl, Refresh};
use baton_core::{AcquireRequest, Error, ErrorKind, Holder, Lease, Liveness, Token, Wait};

use crate::core::Inner;
use crate::layout;

/// One lease or waiter as an answer showed it, and how to name it in a claim.
struct Seen {
    claim: [String; 5],
    /// How long it must stand still before it may be taken over.
    wait: Duration,
    dead: bool,
}

/// What every attempt of one request sends.
#[derive(Clone, Copy)]
struct Request<'a> {
    base: &'a str,
    id: &'a str,
    req: &'a AcquireRequest,
    ttl: Duration,
    holder_json: &'a str,
    wait: bool,
}

/// What an attempt answered.
enum Attempted {
    Granted {
        slot: u32,
        token: u64,
    },
    Mismatch(u32),
    Waiting {
        held: u32,
        limit: u32,
        ahead: u32,
        /// How many of the held slots are held back by the lock-delay, and the delay.
        lost: u32,
        delay: Duration,
        seen: Vec<Seen>,
    },
}

fn num<T: std::str::FromStr>(v: Option<&String>, what: &str) -> Result<T, Error> {
    v.and_then(|s| s.parse::<T>().ok())
        .ok_or_else(|| layout::corrupt(format!("the store answered a bad {what}")))
}

fn dead(holder: Option<&Holder>) -> bool {
    holder.is_some_and(|h| h.liveness() == Liveness::Dead)
}

/// The slot and token of a grant a release pushed (`g SLOT TOKEN`).
fn granted_by_release(pushed: &str) -> Option<(u32, u64)> {
    let mut w = pushed.strip_prefix("g ")?.split(' ');
    let slot = w.next()?.parse().ok()?;
    let token = w.next()?.parse().ok()?;
    Some((slot, token))
}

/// The holder id as the scripts store it.
pub(crate) fn holder_id(h: &Holder) -> String {
    format!("{:032x}", h.id.0)
}

impl Inner {
    async fn attempt(&self, r: &Request<'_>, claims: &[[String; 5]]) -> Result<Attempted, Error> {
        let Request {
            base,
            id,
            req,
            ttl,
            holder_json,
            wait,
        } = *r;
        let delay = req.lock_delay.unwrap_or_default();
        let mut args = vec![
            base.to_owned(),
            id.to_owned(),
            req.limit.to_string(),
            ttl.as_millis().to_string(),
            holder_json.to_owned(),
            holder_id(&req.holder),
            delay.as_millis().to_string(),
            if wait { "wait" } else { "nowait" }.to_owned(),
            claims.len().to_string(),
        ];
        for c in claims {
            args.extend(c.iter().cloned());
        }
        let a = self.run(&self.scripts.attempt, &args).await?;
        match a.first().map(String::as_str) {
            Some("granted") => Ok(Attempted::Granted {
                slot: num(a.get(1), "slot")?,
                token: num(a.get(2), "token")?,
            }),
            Some("mismatch") => Ok(Attempted::Mismatch(num(a.get(1), "limit")?)),
            Some("queued" | "busy") => {
                let held = num(a.get(1), "count of holders")?;
                let limit = num(a.get(2), "limit")?;
                let ahead = num(a.get(3), "queue position")?;
                let delay_ms: u64 = num(a.get(4), "lock-delay")?;
                let nh: usize = num(a.get(5), "count of holders")?;
                let mut i = 6;
                let mut seen = Vec::new();
                let mut lost_n = 0;
                for _ in 0..nh {
                    let f = a
                        .get(i..i + 6)
                        .ok_or_else(|| layout::corrupt("a short answer"))?;
                    i += 6;
                    let lost = f[3] == "1";
                    lost_n += u32::from(lost);
                    let ttl_ms: u64 = num(Some(&f[4]), "lease TTL")?;
                    let holder = Holder::from_json(&f[5]);
                    seen.push(Seen {
                        claim: [
                            "h".into(),
                            f[0].clone(),
                            f[1].clone(),
                            f[2].clone(),
                            f[3].clone(),
                        ],
                        wait: Duration::from_millis(if lost { delay_ms } else { ttl_ms }),
                        dead: !lost && dead(holder.as_ref()),
                    });
                }
                let nw: usize = num(a.get(i), "count of waiters")?;
                i += 1;
                for _ in 0..nw {
                    let f = a
                        .get(i..i + 3)
                        .ok_or_else(|| layout::corrupt("a short answer"))?;
                    i += 3;
                    let (ttl_ms, json) = layout::waiter_info(&f[2]).ok_or_else(|| {
                        layout::corrupt(format!("the waiter record of {} is not baton's", f[0]))
                    })?;
                    seen.push(Seen {
                        claim: [
                            "w".into(),
                            f[0].clone(),
                            "-".into(),
                            f[1].clone(),
                            "0".into(),
                        ],
                        wait: Duration::from_millis(ttl_ms),
                        dead: dead(Holder::from_json(json).as_ref()),
                    });
                }
                Ok(Attempted::Waiting {
                    held,
                    limit,
                    ahead,
                    lost: lost_n,
                    delay: Duration::from_millis(delay_ms),
                    seen,
                })
            }
            _ => Err(Error::new(
                ErrorKind::Unavailable,
                format!("the acquire script answered {a:?}"),
            )),
        }
    }

    /// Acquires for request `id` (the caller withdraws it when this fails).
    pub(crate) async fn acquire_inner(
        &self,
        req: &AcquireRequest,
        id: &str,
    ) -> Result<Lease, Error> {
        let ttl = validate_ttl(req.ttl, &req.key)?;
        let deadline = req.deadline(Instant::now());
        let base = layout::base(&self.config.prefix, &req.key);
        let holder_json = req.holder.to_json()?;
        let waits = req.wait != Wait::NoWait;
        // First sight of each lease or waiter in its exact state.
        let mut first_seen: HashMap<[String; 5], (Instant, Duration, bool)> = HashMap::new();
        let mut refresh = Refresh::new(ttl, Instant::now());
        let mut wake: Option<crate::direct::Direct> = None;
        let wake_key = format!("{base}:wake:{id}");
        let mut tries_without_wait = 0u32;
        loop {
            let now = Instant::now();
            let claims: Vec<[String; 5]> = first_seen
                .iter()
                .filter(|(_, (t, wait, dead))| *dead || now >= *t + *wait)
                .map(|(c, _)| c.clone())
                .collect();
            let sent = Instant::now();
            let r = Request {
                base: &base,
                id,
                req,
                ttl,
                holder_json: &holder_json,
                wait: waits,
            };
            let answer = self.attempt(&r, &claims).await?;
            let got = Instant::now();
            refresh.done(sent);
            let (held, limit, ahead, lost, delay, seen) = match answer {
                Attempted::Granted { slot, token } => {
                    return Ok(Lease {
                        key: req.key.clone(),
                        slot,
                        limit: req.limit,
                        token: Token(token),
                        holder: req.holder.clone(),
                        ttl: Some(ttl),
                        acquired_unix_ms: unix_ms_now(),
                        sent_at: Some(sent),
                    })
                }
                Attempted::Mismatch(have) => return Err(errors::limit_mismatch(have, req.limit)),
                Attempted::Waiting {
                    held,
                    limit,
                    ahead,
                    lost,
                    delay,
                    seen,
                } => (held, limit, ahead, lost, delay, seen),
            };
            let mut next = HashMap::new();
            let mut due_now = false;
            for s in seen {
                let first = first_seen.get(&s.claim).map_or(got, |(t, _, _)| *t);
                due_now |= s.dead;
                next.insert(s.claim, (first, s.wait, s.dead));
            }
            first_seen = next;
            // A dead holder or waiter on this host: take it over at once (a bounded number
            // of times, so a record that keeps failing its claim cannot spin).
            if due_now && tries_without_wait < 3 {
                tries_without_wait += 1;
                continue;
            }
            tries_without_wait = 0;
            if !waits {
                let ahead = (ahead > 0).then_some(ahead);
                let held_back = (lost > 0).then_some((delay, delay));
                let held = held.saturating_sub(lost);
                return Err(errors::busy(held, limit, ahead, held_back));
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(req.timed_out("every slot stayed held", &self.url));
            }
            let takeover = first_seen
                .values()
                .map(|(t, w, _)| Some(*t + *w))
                .min()
                .flatten();
            let until = next_wake([deadline, Some(refresh.due_at()), takeover])
                .unwrap_or_else(|| refresh.due_at());
            if until > now {
                let pushed = self.sleep_on(&mut wake, &wake_key, until - now).await?;
                if let Some((slot, token)) = pushed.as_deref().and_then(granted_by_release) {
                    // The release granted this request the slot: its lease counts from the
                    // last attempt's send, which came before the grant.
                    return Ok(Lease {
                        key: req.key.clone(),
                        slot,
                        limit: req.limit,
                        token: Token(token),
                        holder: req.holder.clone(),
                        ttl: Some(ttl),
                        acquired_unix_ms: unix_ms_now(),
                        sent_at: Some(sent),
                    });
                }
            }
        }
    }

    /// Sleeps in `BLPOP` on the request's own list for at most `d` (a push wakes it);
    /// returns what was pushed, if anything was.
    pub(crate) async fn sleep_on(
        &self,
        wake: &mut Option<crate::direct::Direct>,
        key: &str,
        d: Duration,
    ) -> Result<Option<String>, Error> {
        if wake.is_none() {
            *wake = Some(self.connect().await?);
        }
        let Some(c) = wake.as_mut() else {
            return Ok(None);
        };
        // BLPOP takes seconds with decimals (Redis 6+); 0 would block forever.
        let secs = d.as_secs_f64().max(0.01);
        let bound = d + self.config.timeout;
        let r = tokio::time::timeout(
            bound,
            redis::cmd("BLPOP")
                .arg(key)
                .arg(format!("{secs:.3}"))
                .query_async::<redis::Value>(c),
        )
        .await;
        match r {
            // [list, value], or nil when the wait ran out.
            Ok(Ok(redis::Value::Array(kv))) => Ok(match kv.get(1) {
                Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            }),
            Ok(Ok(_)) => Ok(None),
            Ok(Err(e)) => {
                *wake = None;
                let e = self.map(e);
                if e.is_retryable() {
                    // The next attempt finds out whether the server is there.
                    Ok(None)
                } else {
                    Err(e)
                }
            }
            Err(_) => {
                // The server did not answer: a new connection next time.
                *wake = None;
                Ok(None)
            }
        }
    }

    /// Withdraws request `id`: its queue entry and a grant nobody received. False when the
    /// server did not confirm.
    pub(crate) async fn withdraw(&self, req: &AcquireRequest, id: &str) -> bool {
        let base = layout::base(&self.config.prefix, &req.key);
        let args = [base, id.to_owned()];
        let bound = self.config.timeout * 3;
        matches!(
            tokio::time::timeout(bound, self.run(&self.scripts.withdraw, &args)).await,
            Ok(Ok(_))
        )
    }
}
