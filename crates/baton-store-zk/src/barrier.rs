//! Barriers, apart from locks of the same name: `/PREFIX/barriers/ENC` (persistent, data
//! `baton-zk barrier 1 parties=N gen=G`) and one ephemeral sequential arrival
//! `a-GUID-SEQ` per waiting party, in the store's own session, data `waiting`. The arrival
//! that sees `parties` waiting passes the generation in one transaction: the barrier's
//! data (by version) and every passing arrival's data (by version, `passed:G`). Each party
//! watches its own arrival, so it is woken exactly when it passes. A party that gives up
//! deletes its arrival only if it is still waiting (version 0); otherwise it passed.

use std::time::Instant;

use baton_core::kit::errors;
use baton_core::{BarrierPassed, BarrierRequest, Error, ErrorKind, Key, Wait};
use zookeeper_client as zk;

use crate::core::Inner;
use crate::layout;

const MAGIC: &str = "baton-zk barrier 1 ";
const WAITING: &[u8] = b"waiting";

fn barrier_path(root: &str, key: &Key) -> String {
    format!("{root}/barriers/{}", key.as_str().replace('/', "%"))
}

fn data(parties: u32, generation: u64) -> Vec<u8> {
    format!("{MAGIC}parties={parties} gen={generation}").into_bytes()
}

fn parse(path: &str, d: &[u8]) -> Result<(u32, u64), Error> {
    let s = std::str::from_utf8(d)
        .ok()
        .and_then(|s| s.strip_prefix(MAGIC));
    let parsed = s.and_then(|s| {
        let (p, g) = s.split_once(' ')?;
        let p = p.strip_prefix("parties=")?.parse::<u32>().ok()?;
        let g = g.strip_prefix("gen=")?.parse::<u64>().ok()?;
        Some((p, g))
    });
    parsed.ok_or_else(|| layout::corrupt(format!("{path} is not a barrier record")))
}

fn passed(d: &[u8]) -> Option<u64> {
    std::str::from_utf8(d)
        .ok()?
        .strip_prefix("passed:")?
        .parse()
        .ok()
}

fn arrival_prefix(guid: &str) -> String {
    format!("a-{guid}-")
}

fn seq_of(name: &str) -> u64 {
    name.rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

impl Inner {
    async fn ensure_barrier(&self, c: &zk::Client, bp: &str, parties: u32) -> Result<(), Error> {
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        let dir = format!("{}/barriers", self.config.root);
        if self.bounded(c.check_stat(&dir)).await?.is_none() {
            match self.raw(c.mkdir(&dir, &persistent)).await? {
                Ok(()) | Err(zk::Error::NodeExists) => {}
                Err(e) => return Err(self.map(e)),
            }
        }
        match self
            .raw(c.create(bp, &data(parties, 0), &persistent))
            .await?
        {
            Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
            Err(e) => Err(self.map(e)),
        }
    }

    pub(crate) async fn barrier_inner(
        &self,
        req: &BarrierRequest,
        guid: &str,
    ) -> Result<BarrierPassed, Error> {
        let deadline = match req.wait {
            Wait::NoWait => Some(Instant::now()),
            Wait::Timeout(d) => Some(Instant::now() + d),
            Wait::Forever => None,
        };
        let c = self.admin().await?;
        let bp = barrier_path(&self.config.root, &req.key);
        self.ensure_barrier(&c, &bp, req.parties).await?;
        let (d, _) = self.bounded(c.get_data(&bp)).await?;
        parse(&bp, &d)?;
        let seq = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        let (_, n) = self
            .bounded(c.create(&format!("{bp}/{}", arrival_prefix(guid)), WAITING, &seq))
            .await?;
        let me = format!("{bp}/{}{n}", arrival_prefix(guid));
        let pass = |generation| BarrierPassed {
            key: req.key.clone(),
            generation,
            parties: req.parties,
        };
        loop {
            let (mine, _, my_watch) = match self.raw(c.get_and_watch_data(&me)).await? {
                Ok(v) => v,
                Err(zk::Error::NoNode) => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        "this party's arrival vanished (its session ended)",
                    ))
                }
                Err(e) => return Err(self.map(e)),
            };
            if let Some(g) = passed(&mine) {
                return Ok(pass(g));
            }
            let (bd, bstat, b_watch) = self.bounded(c.get_and_watch_data(&bp)).await?;
            let (parties, generation) = parse(&bp, &bd)?;
            let mut names = self.bounded(c.list_children(&bp)).await?;
            names.sort_by_key(|n| seq_of(n));
            let mut waiting = Vec::new();
            for name in names.iter().filter(|n| n.starts_with("a-")) {
                let p = format!("{bp}/{name}");
                if let Ok(Ok((d, st))) = self.raw(c.get_data(&p)).await {
                    if d == WAITING {
                        waiting.push((p, st.version));
                    }
                }
            }
            if parties != req.parties {
                if waiting.iter().any(|(p, _)| *p != me) {
                    return Err(errors::limit_mismatch(parties, req.parties));
                }
                let _ = self
                    .raw(c.set_data(&bp, &data(req.parties, generation), Some(bstat.version)))
                    .await?;
                continue;
            }
            if waiting.len() >= parties as usize {
                let mut w = c.new_multi_writer();
                let next = data(parties, generation + 1);
                let mark = format!("passed:{generation}").into_bytes();
                let mut ok = w.add_set_data(&bp, &next, Some(bstat.version)).is_ok();
                for (p, v) in waiting.iter().take(parties as usize) {
                    ok &= w.add_set_data(p, &mark, Some(*v)).is_ok();
                }
                if ok {
                    // Lost races (a party withdrew, another completed) are looked at again.
                    let _ = tokio::time::timeout(self.config.timeout, w.commit()).await;
                }
                continue;
            }
            let changed = async {
                tokio::select! {
                    _ = my_watch.changed() => {}
                    _ = b_watch.changed() => {}
                }
            };
            match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() || tokio::time::timeout(left, changed).await.is_err() {
                        return Err(errors::barrier_gave_up(match req.wait {
                            Wait::Timeout(t) => Some(t),
                            _ => None,
                        }));
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Withdraws this party's arrival unless its generation passed: then answers it.
    pub(crate) async fn barrier_leave(&self, req: &BarrierRequest, guid: &str) -> Option<u64> {
        let c = self.admin().await.ok()?;
        let bp = barrier_path(&self.config.root, &req.key);
        let names = self.bounded(c.list_children(&bp)).await.ok()?;
        let prefix = arrival_prefix(guid);
        let name = names.into_iter().find(|n| n.starts_with(&prefix))?;
        let p = format!("{bp}/{name}");
        match self.raw(c.delete(&p, Some(0))).await {
            Ok(Err(zk::Error::BadVersion)) => {
                let (d, _) = self.bounded(c.get_data(&p)).await.ok()?;
                let g = passed(&d);
                let _ = self.raw(c.delete(&p, None)).await;
                g
            }
            _ => None,
        }
    }
}
