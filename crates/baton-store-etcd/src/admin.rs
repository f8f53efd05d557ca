//! What an operator sees and changes: a key's status, the list of keys, breaking leases
//! and resizing a key.
//!
//! Guarantees: `status` reports one read of the key (one etcd revision); a break revokes
//! each chosen holder's etcd lease, which deletes its slot and waiter keys at once (its
//! next renewal answers lost), and on a key with a lock-delay holds the slot back from the
//! break; a resize rewrites only an existing limit key, so it never creates a key, and
//! waiters watch the limit key, so a resize wakes them.

use std::collections::HashMap;

use baton_core::{
    format_duration, Error, ErrorKind, Holder, HolderId, Key, KeyStatus, Op, SlotState, SlotStatus,
    Token,
};
use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::acquire::HoldBack;
use crate::core::{is_lease_not_found, Inner};
use crate::layout::{show, HoldValue, WaiterValue};

impl Inner {
    pub(crate) async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let op = Op::Inspect;
        let names = self.names(key);
        let view = self.read_view(op, key, &names).await?;
        let Some((limit, _)) = view.limit else {
            return Err(self.err(
                ErrorKind::NotFound,
                op,
                Some(key),
                "no such key (a key is created by its first acquire)",
            ));
        };
        let holder_of = |waiter: &str| -> (Option<Holder>, Option<String>) {
            let name = format!("{}{waiter}", names.waiters);
            match view.entries.iter().find(|e| e.key == name.as_bytes()) {
                None => (None, Some("its waiter key is gone (being released)".into())),
                Some(e) => match serde_json::from_slice::<WaiterValue>(&e.value) {
                    Ok(v) => (Some(v.holder), None),
                    Err(_) => (None, Some(format!("holder info unreadable ({name})"))),
                },
            }
        };
        let mut hold_left = HashMap::new();
        for (slot, id, _) in &view.holds {
            if let Some(left) = self.lease_left(*id).await {
                hold_left.insert(*slot, left);
            }
        }
        let hold_note = |s: u32| -> Option<String> {
            let d = format_duration(view.delay?);
            if let Some((_, _, value)) = view.holds.iter().find(|(slot, _, _)| *slot == s) {
                let until = hold_left.get(&s).map_or_else(
                    || "until its etcd lease ends".to_owned(),
                    |left| format!("for about another {}", format_duration(*left)),
                );
                let what = serde_json::from_slice::<HoldValue>(value)
                    .map(|h| {
                        let how = if h.how == "broken" {
                            "was broken"
                        } else {
                            "expired"
                        };
                        format!("the lease with token {} {how}", h.token)
                    })
                    .unwrap_or_else(|_| "a lease was lost".into());
                return Some(format!(
                    "held back: {what}; the lock-delay of {d} holds the slot back {until}"
                ));
            }
            view.orphans().iter().any(|(slot, _)| *slot == s).then(|| {
                format!("lost (expired): the next acquire holds the slot back for the lock-delay of {d}")
            })
        };
        let mut slots = Vec::new();
        for s in 0..limit {
            slots.push(match view.slots.iter().find(|x| x.slot == s) {
                None => SlotStatus {
                    note: hold_note(s),
                    ..SlotStatus::free(s)
                },
                Some(x) => {
                    let (holder, note) = holder_of(&x.value.waiter);
                    SlotStatus {
                        slot: s,
                        state: SlotState::Held,
                        token: u64::try_from(x.create_rev).ok().map(Token),
                        holder,
                        since_unix_ms: Some(x.value.acquired_unix_ms),
                        renewed_unix_ms: None,
                        expires_unix_ms: None,
                        note,
                    }
                }
            });
        }
        for x in view.slots.iter().filter(|x| x.slot >= limit) {
            let (holder, _) = holder_of(&x.value.waiter);
            slots.push(SlotStatus {
                slot: x.slot,
                state: SlotState::Held,
                token: u64::try_from(x.create_rev).ok().map(Token),
                holder,
                since_unix_ms: Some(x.value.acquired_unix_ms),
                renewed_unix_ms: None,
                expires_unix_ms: None,
                note: Some(format!(
                    "above the limit of {limit} (the key was resized down): held until released"
                )),
            });
        }
        let holding: Vec<String> = view.slots.iter().map(|s| s.value.waiter.clone()).collect();
        let waiters = view
            .entries
            .iter()
            .filter(|e| {
                let name = show(&e.key);
                let id = name.strip_prefix(&names.waiters).unwrap_or("");
                !holding.iter().any(|h| h == id) && !e.holder_dead()
            })
            .count();
        Ok(KeyStatus {
            key: key.clone(),
            limit,
            slots,
            waiters: Some(u32::try_from(waiters).unwrap_or(u32::MAX)),
            last_token: view
                .slots
                .iter()
                .map(|s| s.create_rev)
                .max()
                .and_then(|r| u64::try_from(r).ok())
                .map(Token),
            lock_delay_ms: view
                .delay
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        })
    }

    pub(crate) async fn list(&self) -> Result<Vec<Key>, Error> {
        let op = Op::List;
        let prefix = format!("{}/", self.config.prefix);
        let resp = self
            .call(op, None, |mut c, _| {
                let p = prefix.clone();
                async move {
                    c.get(p, Some(GetOptions::new().with_prefix().with_keys_only()))
                        .await
                }
            })
            .await?;
        let mut keys = Vec::new();
        for kv in resp.kvs() {
            let name = show(kv.key());
            let Some(k) = name
                .strip_prefix(&prefix)
                .and_then(|n| n.strip_suffix("#limit"))
            else {
                continue;
            };
            keys.push(Key::new(k).map_err(|_| {
                self.err(
                    ErrorKind::Corrupt,
                    op,
                    None,
                    format!("{name} names '{k}', which is not a valid key"),
                )
            })?);
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    pub(crate) async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let op = Op::Break;
        let names = self.names(key);
        let status = self.inspect(key).await.map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                self.err(ErrorKind::NotFound, op, Some(key), "no such key")
            } else {
                e
            }
        })?;
        let view = self.read_view(op, key, &names).await?;
        let mut freed = Vec::new();
        for s in &view.slots {
            let st = status.slots.iter().find(|x| x.slot == s.slot);
            let who = st.and_then(|x| x.holder.clone());
            if let Some(want) = holder {
                if who.as_ref().map(|h| h.id) != Some(want) {
                    continue;
                }
            }
            // Revoking the holder's lease deletes its slot and waiter keys at once; its next
            // renewal answers lost.
            let id = s.lease;
            let gone = self
                .call(op, Some(key), |mut c, _| async move {
                    match c.lease_revoke(id).await {
                        Ok(_) => Ok(true),
                        Err(e) if is_lease_not_found(&e) => Ok(false),
                        Err(e) => Err(e),
                    }
                })
                .await?;
            if let Some(delay) = view.delay {
                // The loss is the break: hold the slot back from now.
                if let Some((_, g_mod)) = view.grants.iter().find(|(slot, _)| *slot == s.slot) {
                    self.hold_back(HoldBack {
                        op,
                        key,
                        names: &names,
                        slot: s.slot,
                        g_mod: *g_mod,
                        delay,
                        how: "broken",
                    })
                    .await?;
                }
            }
            freed.push(SlotStatus {
                slot: s.slot,
                state: SlotState::Free,
                token: u64::try_from(s.create_rev).ok().map(Token),
                holder: who,
                since_unix_ms: Some(s.value.acquired_unix_ms),
                renewed_unix_ms: None,
                expires_unix_ms: None,
                note: Some(if gone {
                    "freed by break; its holder's next renew answers lost".into()
                } else {
                    "had already expired; etcd removed it".into()
                }),
            });
        }
        Ok(freed)
    }

    pub(crate) async fn resize(&self, key: &Key, limit: u32) -> Result<KeyStatus, Error> {
        let op = Op::Resize;
        if limit == 0 {
            return Err(self.err(
                ErrorKind::InvalidInput,
                op,
                Some(key),
                "the limit must be at least 1 slot",
            ));
        }
        let names = self.names(key);
        let txn = Txn::new()
            .when([Compare::create_revision(
                names.limit.clone(),
                CompareOp::Greater,
                0,
            )])
            .and_then([TxnOp::put(names.limit.clone(), limit.to_string(), None)]);
        let resp = self
            .call(op, Some(key), |mut c, _| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(self.err(
                ErrorKind::NotFound,
                op,
                Some(key),
                "no such key (a key is created by its first acquire, with its limit)",
            ));
        }
        self.inspect(key).await
    }
}
