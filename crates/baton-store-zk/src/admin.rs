//! Inspect, list, break and resize, on the store's own session. A holder is a request
//! node that claimed a slot node; a waiter is one that has not. ZooKeeper shows no
//! heartbeat of a session, so `renewed` is not shown: a holder is live while its session
//! is (the server ends it within the session timeout of the holder's last contact).

use std::collections::HashMap;

use baton_core::kit::{errors, status};
use baton_core::{Error, Holder, HolderId, Key, KeyStatus, Liveness, Resize, SlotStatus, Token};
use zookeeper_client as zk;

use crate::core::Inner;
use crate::layout;

pub(crate) const MAX_LIMIT: u32 = 100_000;

/// One holder as the store shows it.
struct Holding {
    slot: u32,
    node: String,
    slot_node: String,
    token: u64,
    json: String,
    since: Option<u64>,
}

impl Inner {
    /// The key's limit, its holders and its count of waiters.
    async fn look(&self, c: &zk::Client, key: &Key) -> Result<(u32, Vec<Holding>, u32), Error> {
        let kp = layout::key_path(&self.config.root, key);
        let (data, _) = match self.raw(c.get_data(&kp)).await? {
            Ok(v) => v,
            Err(zk::Error::NoNode) => return Err(errors::no_such_key()),
            Err(e) => return Err(self.map(e)),
        };
        let limit = layout::parse_limit(&kp, &data)?;
        let names = match self.raw(c.list_children(&kp)).await? {
            Ok(n) => n,
            Err(zk::Error::NoNode) => return Err(errors::no_such_key()),
            Err(e) => return Err(self.map(e)),
        };
        let (q, slots) = layout::parse_children(&kp, &names)?;
        let mut by_guid: HashMap<String, u32> = HashMap::new();
        for s in slots {
            let p = format!("{kp}/{}", layout::slot_name(s));
            if let Ok((d, _)) = self.bounded(c.get_data(&p)).await {
                by_guid.insert(String::from_utf8_lossy(&d).into_owned(), s);
            }
        }
        let mut holders = Vec::new();
        let mut waiters = 0;
        for e in q {
            let p = format!("{kp}/{}", e.name);
            let (d, stat) = match self.raw(c.get_data(&p)).await? {
                Ok(v) => v,
                Err(zk::Error::NoNode) => continue,
                Err(e) => return Err(self.map(e)),
            };
            match by_guid.get(&e.guid) {
                Some(&slot) => holders.push(Holding {
                    slot,
                    node: p,
                    slot_node: format!("{kp}/{}", layout::slot_name(slot)),
                    token: stat.czxid as u64,
                    json: String::from_utf8_lossy(&d).into_owned(),
                    since: u64::try_from(stat.ctime).ok(),
                }),
                // A waiter whose process is known dead is not waiting (its session
                // lingers for its timeout; the next acquire deletes its node).
                None => {
                    let dead = std::str::from_utf8(&d)
                        .ok()
                        .and_then(Holder::from_json)
                        .is_some_and(|h| h.liveness() == Liveness::Dead);
                    if !dead {
                        waiters += 1;
                    }
                }
            }
        }
        Ok((limit, holders, waiters))
    }

    pub(crate) async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let c = self.admin().await?;
        let (limit, holders, waiters) = self.look(&c, key).await?;
        let mut slots: Vec<SlotStatus> = (0..limit).map(SlotStatus::free).collect();
        for h in &holders {
            let id = Holder::from_json(&h.json)
                .map(|x| format!("{:032x}", x.id.0))
                .unwrap_or_default();
            let st = SlotStatus::of_record(h.slot, h.token, &id, &h.json, h.since, None);
            if (h.slot as usize) < slots.len() {
                slots[h.slot as usize] = st;
            } else {
                let mut st = st;
                st.note = Some(status::above_limit_note(limit));
                slots.push(st);
            }
        }
        let last_token = holders.iter().map(|h| h.token).max().map(Token);
        Ok(KeyStatus {
            key: key.clone(),
            limit,
            slots,
            waiters: Some(waiters),
            last_token,
            lock_delay_ms: None,
        })
    }

    pub(crate) async fn list(&self) -> Result<Vec<Key>, Error> {
        let c = self.admin().await?;
        let dir = layout::keys_dir(&self.config.root);
        let names = match self.raw(c.list_children(&dir)).await? {
            Ok(n) => n,
            Err(zk::Error::NoNode) => return Ok(Vec::new()),
            Err(e) => return Err(self.map(e)),
        };
        let keys: Vec<(String, String)> = names
            .iter()
            .map(|n| (layout::key_of(n), format!("{dir}/{n}")))
            .collect();
        status::keys_from_names(keys.iter().map(|(k, n)| (k.as_str(), n.as_str())))
    }

    pub(crate) async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let c = self.admin().await?;
        let (_, holders, _) = self.look(&c, key).await?;
        let mut out = Vec::new();
        for h in holders {
            let who = Holder::from_json(&h.json);
            if let Some(id) = holder {
                if who.as_ref().map(|w| w.id) != Some(id) {
                    continue;
                }
            }
            let r = self.delete_lease(&c, &h.node, Some(&h.slot_node)).await?;
            let was_live = r == baton_core::Released::Released;
            out.push(status::broken(
                h.slot,
                Some(Token(h.token)),
                who,
                h.since,
                was_live,
            ));
        }
        Ok(out)
    }

    /// Reads the limit and writes the changed one only if the node's version is unchanged
    /// since (retried on conflict), so a relative change counts from the limit it replaces.
    pub(crate) async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus, Error> {
        if let Resize::To(limit) = change {
            errors::check_limit(limit, MAX_LIMIT)?;
        }
        let c = self.admin().await?;
        let kp = layout::key_path(&self.config.root, key);
        let mut tries = 0;
        loop {
            tries += 1;
            if tries > errors::RESIZE_TRIES {
                return Err(errors::kept_changing("resize it"));
            }
            let (data, stat) = match self.raw(c.get_data(&kp)).await? {
                Ok(v) => v,
                Err(zk::Error::NoNode) => return Err(errors::no_such_key_to_resize()),
                Err(e) => return Err(self.map(e)),
            };
            let limit = change.apply(layout::parse_limit(&kp, &data)?, MAX_LIMIT)?;
            match self
                .raw(c.set_data(&kp, &layout::key_data(limit), Some(stat.version)))
                .await?
            {
                Ok(_) => break,
                Err(zk::Error::BadVersion) => continue,
                Err(zk::Error::NoNode) => return Err(errors::no_such_key_to_resize()),
                Err(e) => return Err(self.map(e)),
            }
        }
        self.inspect(key).await
    }

    /// Deletes the key's node: ZooKeeper refuses while it has children (a holder's or a
    /// waiter's node, each in a live session), so nobody's request is lost. Tokens are
    /// czxids, which keep rising across a key made again.
    pub(crate) async fn delete(&self, key: &Key) -> Result<(), Error> {
        let c = self.admin().await?;
        let kp = layout::key_path(&self.config.root, key);
        for _ in 0..errors::RESIZE_TRIES {
            match self.raw(c.delete(&kp, None)).await? {
                Ok(()) => return Ok(()),
                Err(zk::Error::NoNode) => return Err(errors::no_such_key()),
                Err(zk::Error::NotEmpty) => {
                    let st = self.inspect(key).await?;
                    let waiting = st.waiters.unwrap_or(0);
                    if st.held() > 0 || waiting > 0 {
                        return Err(errors::in_use(st.held(), st.waiters, 0));
                    }
                    // The last child went between the delete and the look: try again.
                }
                Err(e) => return Err(self.map(e)),
            }
        }
        Err(errors::kept_changing("delete it"))
    }
}
