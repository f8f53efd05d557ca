//! Barriers in the etcd store (`baton_core::barrier` has the semantics).
//!
//! Layout under the prefix `P` for a barrier `K` (`#` cannot occur in a key, so a barrier's
//! entries never mix with the lock entries of the same name, and `list` never shows them):
//! - `P/K#bgen`: the generation now filling, JSON `{"generation": G, "parties": N}`
//!   (`N` of the last generation that passed); absent means generation 0. Without a lease;
//!   written only when a generation passes, so its mod revision changes exactly then;
//! - `P/K#b/<G>/<lease id, hex>`: one per party waiting in generation `G`, attached to the
//!   party's own etcd lease (TTL [`ARRIVAL_TTL`]); value: JSON with the parties it asks
//!   for and the holder.
//!
//! Arrive: one read (the generation key and the arrivals), then one transaction guarded
//! by the generation key's mod revision (the generation has not passed) and by no arrival
//! of `G` having been created or rewritten since the read. When the read arrivals plus this
//! one make `parties`, that transaction is the pass: it also requires every arrival read to
//! still exist (same create revision), so the arrivals of `G` at the pass are exactly the
//! ones counted, and writes `G + 1` to the generation key; the completing party writes no
//! arrival at all. Otherwise it creates this party's arrival key. A guard that fails
//! (someone arrived, left or passed meanwhile) reads again and decides again, so at most
//! `parties - 1` arrivals wait in a generation and each generation is decided once.
//!
//! Wait: a waiting party watches the generation key from its arrival's revision (no
//! polling; the keep-alive every [`ARRIVAL_TTL`]/3 is the only periodic request). When the
//! generation moved past `G`, it passed with it if its arrival key still exists (the pass
//! required it to), then revokes its lease, which deletes the key.
//!
//! Give up (timeout, cancel, error): a transaction deletes the arrival only if the
//! generation key is unchanged; if the generation passed meanwhile, the party returns the
//! pass. Its lease is revoked in every case before the call returns.
//!
//! Dead parties: a party that dies while waiting stops keeping its lease alive, and etcd
//! deletes its arrival when the lease expires: within [`ARRIVAL_TTL`] of its last
//! keep-alive (plus etcd's expiry check, every 500 ms). A party on this host and boot whose
//! process is gone is recognised at once (`Holder::liveness`): the next arrival revokes
//! its lease before counting.

use std::time::Instant;

use baton_core::kit::errors::barrier_gave_up;
use baton_core::kit::time::{next_wake, Refresh, ARRIVAL_TTL};
use baton_core::{
    BarrierPassed, BarrierRequest, Error, ErrorKind, Holder, Key, Liveness, Op, Wait,
};
use etcd_client::{Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::core::{gets, txn_reads, wait_for_change, Inner};
use crate::layout::{corrupt, show};

/// When a barrier wait that starts at `start` gives up: at once for a no-wait arrival,
/// after the timeout, or never.
fn deadline(wait: Wait, start: Instant) -> Option<Instant> {
    match wait {
        Wait::Timeout(d) => start.checked_add(d),
        Wait::NoWait => Some(start),
        Wait::Forever => None,
    }
}

/// What a give-up answers: `Busy` for a no-wait arrival, `Timeout` when the wait ran out.
fn gave_up(wait: Wait) -> Error {
    barrier_gave_up(match wait {
        Wait::Timeout(d) => Some(d),
        Wait::NoWait | Wait::Forever => None,
    })
}

/// The generation key's value.
#[derive(Serialize, Deserialize)]
struct GenValue {
    generation: u64,
    parties: u32,
}

/// An arrival key's value.
#[derive(Serialize, Deserialize)]
struct ArrivalValue {
    parties: u32,
    holder: Holder,
}

/// One barrier's etcd keys.
struct BarrierNames {
    gen: String,
    /// `P/K#b/`: every generation's arrivals.
    all: String,
}

impl BarrierNames {
    fn arrivals(&self, g: u64) -> String {
        format!("{}{g}/", self.all)
    }
    fn arrival(&self, g: u64, id: i64) -> String {
        format!("{}{g}/{id:016x}", self.all)
    }
}

/// An arrival as read.
struct Arrival {
    key: String,
    create_rev: i64,
    lease: i64,
    parties: u32,
    dead: bool,
}

/// The barrier's state at one revision.
struct State {
    revision: i64,
    generation: u64,
    /// The generation key's mod revision (0: absent).
    gen_mod: i64,
    /// The arrivals of `generation`.
    arrivals: Vec<Arrival>,
}

/// What a waiting party finds when it looks.
enum Standing {
    Waiting,
    Passed,
    /// Its arrival is gone without a pass (its lease expired or was revoked).
    Gone,
}

impl Inner {
    fn barrier_names(&self, key: &Key) -> BarrierNames {
        let base = format!("{}/{}", self.config.prefix, key.as_str());
        BarrierNames {
            gen: format!("{base}#bgen"),
            all: format!("{base}#b/"),
        }
    }

    fn parse_gen(&self, names: &BarrierNames, kv: Option<&KeyValue>) -> Result<(u64, i64), Error> {
        match kv {
            None => Ok((0, 0)),
            Some(kv) => {
                let v: GenValue = serde_json::from_slice(kv.value()).map_err(|e| {
                    corrupt(
                        &names.gen,
                        format_args!("does not hold baton's barrier generation: {e}"),
                    )
                })?;
                Ok((v.generation, kv.mod_revision()))
            }
        }
    }

    /// Reads the generation key and the arrivals (all generations; those of the current
    /// one are kept).
    async fn barrier_state(&self, key: &Key, names: &BarrierNames) -> Result<State, Error> {
        let op = Op::Barrier;
        let txn = Txn::new().and_then([
            TxnOp::get(names.gen.clone(), None),
            TxnOp::get(names.all.clone(), Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.txn(op, key, txn).await?;
        let (revision, g) = txn_reads(&resp, 2)?;
        let (generation, gen_mod) = self.parse_gen(names, g[0].kvs().first())?;
        let mine = names.arrivals(generation);
        let mut arrivals = Vec::new();
        for kv in g[1].kvs() {
            let name = show(kv.key());
            if !name.starts_with(&mine) {
                continue;
            }
            if kv.lease() == 0 {
                return Err(corrupt(
                    &name,
                    "is a barrier arrival without an etcd lease: baton did not write it (delete \
                     it with etcdctl if nobody uses it)",
                ));
            }
            let v: ArrivalValue = serde_json::from_slice(kv.value()).map_err(|e| {
                corrupt(
                    &name,
                    format_args!("does not hold baton's barrier arrival: {e}"),
                )
            })?;
            arrivals.push(Arrival {
                key: name,
                create_rev: kv.create_revision(),
                lease: kv.lease(),
                parties: v.parties,
                dead: v.holder.liveness() == Liveness::Dead,
            });
        }
        arrivals.sort_by_key(|a| a.create_rev);
        Ok(State {
            revision,
            generation,
            gen_mod,
            arrivals,
        })
    }

    /// Arrives at the barrier and waits, on the store's runtime, with etcd lease `id` for
    /// the arrival (granted only if this party has to wait). The caller revokes lease `id`
    /// afterwards, whatever this returns.
    pub(crate) async fn barrier_inner(
        &self,
        req: &BarrierRequest,
        id: i64,
    ) -> Result<BarrierPassed, Error> {
        let op = Op::Barrier;
        let key = &req.key;
        let names = self.barrier_names(key);
        let start = Instant::now();
        let deadline = deadline(req.wait, start);
        let passed = |generation: u64| BarrierPassed {
            key: key.clone(),
            generation,
            parties: req.parties,
        };
        let value = serde_json::to_vec(&ArrivalValue {
            parties: req.parties,
            holder: req.holder.clone(),
        })
        .map_err(|e| {
            Error::new(ErrorKind::InvalidInput, "cannot encode the holder").with_source(e)
        })?;
        let ttl_secs = ARRIVAL_TTL.as_secs().max(1);
        let mut refreshed: Option<Instant> = None;
        // Dead parties' leases this party revoked (or tried to): each is tried once.
        let mut revoked: Vec<i64> = Vec::new();

        // Arrive: decide on a read, commit guarded by what was read.
        let (g, gen_mod, my_rev) = loop {
            let st = self.barrier_state(key, &names).await?;
            let g = st.generation;
            // Parties of this generation whose process is gone (this host and boot): their
            // arrivals would count until their leases run out.
            let dead: Vec<i64> = st
                .arrivals
                .iter()
                .filter(|a| a.dead && !revoked.contains(&a.lease))
                .map(|a| a.lease)
                .collect();
            if !dead.is_empty() {
                for d in dead {
                    self.revoke_quiet(d).await;
                    revoked.push(d);
                }
                continue;
            }
            if let Some(a) = st.arrivals.iter().find(|a| a.parties != req.parties) {
                return Err(Error::new(
                    ErrorKind::LimitMismatch,
                    format!(
                        "generation {g} of this barrier has {} parties ({}), not {}",
                        a.parties, a.key, req.parties
                    ),
                )
                .with_current_limit(a.parties));
            }
            let prefix = names.arrivals(g);
            let mut guard = vec![
                Compare::mod_revision(names.gen.clone(), CompareOp::Equal, st.gen_mod),
                // No arrival of G created or rewritten since the read.
                Compare::mod_revision(prefix.clone(), CompareOp::Less, st.revision + 1)
                    .with_prefix(),
            ];
            if st.arrivals.len() as u64 + 1 >= u64::from(req.parties) {
                // This arrival completes G: pass it, if every arrival read is still there.
                guard.extend(st.arrivals.iter().map(|a| {
                    Compare::create_revision(a.key.clone(), CompareOp::Equal, a.create_rev)
                }));
                let next = serde_json::to_vec(&GenValue {
                    generation: g + 1,
                    parties: req.parties,
                })
                .map_err(|e| {
                    Error::new(ErrorKind::InvalidInput, "cannot encode the generation")
                        .with_source(e)
                })?;
                let txn =
                    Txn::new()
                        .when(guard)
                        .and_then([TxnOp::put(names.gen.clone(), next, None)]);
                if self.txn(op, key, txn).await?.succeeded() {
                    return Ok(passed(g));
                }
                continue;
            }
            if req.wait == Wait::NoWait {
                return Err(gave_up(req.wait));
            }
            if refreshed.is_none() {
                let (sent, _) = self.grant_lease(op, key, id, ttl_secs).await?;
                refreshed = Some(sent);
            }
            let mine = names.arrival(g, id);
            let txn = Txn::new().when(guard).and_then([TxnOp::put(
                mine,
                value.clone(),
                Some(PutOptions::new().with_lease(id)),
            )]);
            let resp = self.txn(op, key, txn).await?;
            if resp.succeeded() {
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                break (g, st.gen_mod, rev);
            }
        };

        // Wait: watch the generation key; keep the lease alive.
        let mine = names.arrival(g, id);
        let mut keep = Refresh::new(ARRIVAL_TTL, refreshed.unwrap_or(start));
        let mut from = my_rev + 1;
        let mut watch: Option<etcd_client::WatchStream> = None;
        loop {
            // A watch from the current revision (live at once; see `Inner::watch_keys`);
            // what changed since the last look and before the watch is read now.
            let mut changed = false;
            if watch.is_none() {
                let w = self
                    .watch_keys(op, key, vec![names.gen.clone()], &[])
                    .await?;
                // Without a stream (no member answered): poll until one does.
                changed = w.from.is_some_and(|r| r >= from);
                watch = w.stream;
            }
            let until = next_wake([Some(keep.due_at()), deadline]).unwrap_or(keep.due_at());
            // Woken only by the generation moving past `g` (or the key's deletion).
            let look = changed
                || wait_for_change(&mut watch, until, |r| {
                    r.events().iter().any(|e| {
                        e.event_type() == EventType::Delete
                            || e.kv().is_none_or(|kv| {
                                self.parse_gen(&names, Some(kv))
                                    .map_or(true, |(n, _)| n > g)
                            })
                    })
                })
                .await;
            if look {
                let (standing, rev) = self.standing(key, &names, &mine, g, gen_mod).await?;
                from = rev + 1;
                match standing {
                    Standing::Passed => return Ok(passed(g)),
                    Standing::Gone => return Err(self.gone(id)),
                    Standing::Waiting => {}
                }
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return self.withdraw(req, &names, &mine, g, gen_mod, id).await;
            }
            if keep.due(now) {
                match self.keep_alive(op, key, id).await {
                    Ok(sent) => keep.done(sent),
                    Err(e) if e.kind() == ErrorKind::Lost => {
                        return match self.standing(key, &names, &mine, g, gen_mod).await? {
                            (Standing::Passed, _) => Ok(passed(g)),
                            _ => Err(self.gone(id)),
                        };
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }

    fn gone(&self, id: i64) -> Error {
        Error::new(
            ErrorKind::Lost,
            format!(
                "this party's arrival (etcd lease {id:x}) expired or was revoked while it \
                 waited (stopped for longer than {}s?) and did not count; arrive again",
                ARRIVAL_TTL.as_secs()
            ),
        )
    }

    /// Where this party's arrival `mine` in generation `g` stands, and the revision read.
    async fn standing(
        &self,
        key: &Key,
        names: &BarrierNames,
        mine: &str,
        g: u64,
        gen_mod: i64,
    ) -> Result<(Standing, i64), Error> {
        let op = Op::Barrier;
        let txn = Txn::new().and_then([
            TxnOp::get(names.gen.clone(), None),
            TxnOp::get(mine.to_owned(), None),
        ]);
        let resp = self.txn(op, key, txn).await?;
        let (revision, r) = txn_reads(&resp, 2)?;
        let (generation, m) = self.parse_gen(names, r[0].kvs().first())?;
        let here = !r[1].kvs().is_empty();
        let standing = if m == gen_mod {
            if here {
                Standing::Waiting
            } else {
                Standing::Gone
            }
        } else if generation > g {
            if here {
                Standing::Passed
            } else {
                Standing::Gone
            }
        } else {
            return Err(corrupt(
                &names.gen,
                format_args!(
                    "went back to generation {generation} while a party waits in generation \
                     {g}: something other than baton wrote it"
                ),
            ));
        };
        Ok((standing, revision))
    }

    /// Deletes this party's arrival unless its generation passed meanwhile (then the pass
    /// is the answer).
    async fn withdraw(
        &self,
        req: &BarrierRequest,
        names: &BarrierNames,
        mine: &str,
        g: u64,
        gen_mod: i64,
        id: i64,
    ) -> Result<BarrierPassed, Error> {
        let op = Op::Barrier;
        let key = &req.key;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                names.gen.clone(),
                CompareOp::Equal,
                gen_mod,
            )])
            .and_then([TxnOp::delete(mine.to_owned(), None)])
            .or_else([TxnOp::get(mine.to_owned(), None)]);
        let resp = self.txn(op, key, txn).await?;
        if !resp.succeeded() && gets(&resp).first().is_some_and(|r| !r.kvs().is_empty()) {
            // The generation passed with this arrival in it.
            return Ok(BarrierPassed {
                key: key.clone(),
                generation: g,
                parties: req.parties,
            });
        }
        if !resp.succeeded() {
            return Err(self.gone(id));
        }
        Err(gave_up(req.wait))
    }
}
