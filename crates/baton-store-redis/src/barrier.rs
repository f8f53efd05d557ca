//! Barriers: each party's arrival is a member of a sorted set scored by its refresh
//! counter; the arrival that completes a generation passes it in the same script, records
//! the generation for every other party and pushes to each one's own wake-up list.
//!
//! Guarantees: generations are counted in the script, so every party of one generation
//! gets the same number; a party that gives up withdraws its arrival in one script,
//! which answers the pass instead if its generation passed meanwhile (contract point 6);
//! a party that died leaves the set once another party has seen its refresh counter stand
//! still for the arrival TTL on its own monotonic clock (at once when it ran on that
//! party's host and is provably gone). Waiting parties sleep in `BLPOP`.

use std::collections::HashMap;
use std::time::Instant;

use baton_core::kit::errors;
use baton_core::kit::time::{next_wake, Refresh, ARRIVAL_TTL};
use baton_core::{BarrierPassed, BarrierRequest, Error, ErrorKind, Holder, Liveness, Wait};

use crate::core::{Answer, Inner};
use crate::layout;

/// What an arrival or a look answered.
enum Look {
    Passed(u64),
    Mismatch(u32),
    Gone,
    /// The other arrivals: (id, refresh count) and whether it is dead on this host.
    Waiting(Vec<((String, String), bool)>),
}

fn parse(a: &Answer) -> Result<Look, Error> {
    let bad = || layout::corrupt("the barrier script answered something baton does not write");
    match a.first().map(String::as_str) {
        Some("passed") => Ok(Look::Passed(
            a.get(1).and_then(|g| g.parse().ok()).ok_or_else(bad)?,
        )),
        Some("mismatch") => Ok(Look::Mismatch(
            a.get(1).and_then(|g| g.parse().ok()).ok_or_else(bad)?,
        )),
        Some("gone") => Ok(Look::Gone),
        Some("waiting") => Ok(Look::Waiting(
            a[1..]
                .chunks(3)
                .filter(|c| c.len() == 3)
                .map(|c| {
                    let dead = c[2]
                        .split_once('|')
                        .and_then(|(_, j)| Holder::from_json(j))
                        .is_some_and(|h| h.liveness() == Liveness::Dead);
                    ((c[0].clone(), c[1].clone()), dead)
                })
                .collect(),
        )),
        _ => Err(Error::new(
            ErrorKind::Unavailable,
            format!("the barrier script answered {a:?}"),
        )),
    }
}

impl Inner {
    /// Arrives as `id` and waits (the caller calls [`Inner::barrier_leave`] when this
    /// fails).
    pub(crate) async fn barrier_inner(
        &self,
        req: &BarrierRequest,
        id: &str,
    ) -> Result<BarrierPassed, Error> {
        let base = layout::barrier_base(&self.config.prefix, &req.key);
        let deadline = match req.wait {
            Wait::Timeout(d) => Instant::now().checked_add(d),
            _ => None,
        };
        let info = format!("{}|{}", ARRIVAL_TTL.as_millis(), req.holder.to_json()?);
        let passed = |generation| BarrierPassed {
            key: req.key.clone(),
            generation,
            parties: req.parties,
        };
        let mut first_seen: HashMap<(String, String), (Instant, bool)> = HashMap::new();
        let mut refresh = Refresh::new(ARRIVAL_TTL, Instant::now());
        let mut wake: Option<crate::direct::Direct> = None;
        let wake_key = format!("{base}:wake:{id}");
        let mut arrived = false;
        loop {
            let now = Instant::now();
            let claims: Vec<&(String, String)> = first_seen
                .iter()
                .filter(|(_, (t, dead))| *dead || now >= *t + ARRIVAL_TTL)
                .map(|(c, _)| c)
                .collect();
            let mut args = vec![base.clone(), id.to_owned()];
            if !arrived {
                args.push(req.parties.to_string());
                args.push(info.clone());
            }
            args.push(claims.len().to_string());
            for (cid, count) in claims {
                args.push(cid.clone());
                args.push(count.clone());
            }
            let sent = Instant::now();
            let script = if arrived {
                &self.scripts.look
            } else {
                &self.scripts.arrive
            };
            let look = parse(&self.run(script, &args).await?)?;
            let got = Instant::now();
            refresh.done(sent);
            let others = match look {
                Look::Passed(g) => return Ok(passed(g)),
                Look::Mismatch(have) => return Err(errors::limit_mismatch(have, req.parties)),
                Look::Gone => {
                    // Taken as dead by another party (it did not see us refresh in time):
                    // arrive again.
                    arrived = false;
                    continue;
                }
                Look::Waiting(others) => others,
            };
            arrived = true;
            let mut next = HashMap::new();
            let mut dead_now = false;
            for (k, dead) in others {
                let first = first_seen.get(&k).map_or(got, |(t, _)| *t);
                dead_now |= dead;
                next.insert(k, (first, dead));
            }
            first_seen = next;
            if req.wait == Wait::NoWait {
                return Err(errors::barrier_gave_up(None));
            }
            let now = Instant::now();
            if let (Some(d), Wait::Timeout(t)) = (deadline, req.wait) {
                if now >= d {
                    return Err(errors::barrier_gave_up(Some(t)));
                }
            }
            if dead_now {
                continue;
            }
            let stale = first_seen.values().map(|(t, _)| *t + ARRIVAL_TTL).min();
            let until = next_wake([deadline, Some(refresh.due_at()), stale])
                .unwrap_or_else(|| refresh.due_at());
            if until > now {
                // A barrier's pushes only wake it: the next look finds out.
                self.sleep_on(&mut wake, &wake_key, until - now).await?;
            }
        }
    }

    /// Withdraws arrival `id`: the pass when its generation passed meanwhile, `None` when
    /// it was withdrawn (or the server did not answer: it then leaves within the arrival
    /// TTL).
    pub(crate) async fn barrier_leave(&self, req: &BarrierRequest, id: &str) -> Option<u64> {
        let base = layout::barrier_base(&self.config.prefix, &req.key);
        let bound = self.config.timeout * 3;
        let r = tokio::time::timeout(bound, self.run(&self.scripts.leave, &[base, id.to_owned()]))
            .await;
        match r {
            Ok(Ok(a)) => match parse(&a) {
                Ok(Look::Passed(g)) => Some(g),
                _ => None,
            },
            _ => None,
        }
    }
}
