//! What an operator sees and changes: a key's status, the list of keys, breaking leases
//! and resizing a key.
//!
//! Guarantees: `status` reports one read of the key (one etcd revision); a break revokes
//! each chosen holder's etcd lease, which deletes its slot and waiter keys at once (its
//! next renewal answers lost), and on a key with a lock-delay holds the slot back from the
//! break; a resize rewrites only an existing limit key, so it never creates a key, and
//! waiters watch the limit key, so a resize wakes them.

use std::collections::HashMap;
use std::time::Duration;

use baton_core::kit::errors;
use baton_core::kit::status::{above_limit_note, broken, held_back_note, keys_from_names};
use baton_core::kit::time::unix_ms_now;
use baton_core::{HolderId, Key, KeyStatus, Op, Resize, Result, SlotStatus, Token};
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};

use crate::acquire::HoldBack;
use crate::core::Inner;
use crate::layout::{parse_limit, show, SlotEntry};

impl Inner {
    pub(crate) async fn inspect(&self, key: &Key) -> Result<KeyStatus> {
        let op = Op::Inspect;
        let names = self.names(key);
        let view = self.read_view(op, key, &names).await?;
        let Some((limit, _)) = view.limit else {
            return Err(errors::no_such_key());
        };
        // The slot's status from its record and its holder's waiter key, with when its
        // lease was renewed and expires as etcd's lease clock says (estimates, for
        // display only: etcd tells whole seconds left, not instants).
        let slot_of = |x: &SlotEntry, ttl: Option<(Duration, Duration)>| -> SlotStatus {
            let name = names.waiter_named(&x.value.waiter);
            let entry = view.entries.iter().find(|e| e.key == name.as_bytes());
            let holder_json = entry
                .and_then(|e| serde_json::from_slice::<serde_json::Value>(&e.value).ok())
                .and_then(|v| v.get("holder").map(ToString::to_string))
                .unwrap_or_default();
            let token = u64::try_from(x.create_rev).unwrap_or_default();
            let mut st = SlotStatus::of_record(
                x.slot,
                token,
                &name,
                &holder_json,
                Some(x.value.acquired_unix_ms),
                None,
            );
            if entry.is_none() {
                st.note = Some("its waiter key is gone (being released)".into());
            }
            if let Some((left, granted)) = ttl {
                let expires = unix_ms_now().saturating_add(ms(left));
                st.expires_unix_ms = Some(expires);
                st.renewed_unix_ms = Some(expires.saturating_sub(ms(granted)));
            }
            if x.slot >= limit {
                st.note = Some(above_limit_note(limit));
            }
            st
        };
        // One `LeaseTimeToLive` per held slot and per hold-back.
        let mut ttls = HashMap::new();
        for x in &view.slots {
            if let Some(t) = self.lease_ttl(x.lease).await {
                ttls.insert(x.slot, t);
            }
        }
        let mut hold_left = HashMap::new();
        for (slot, id, _) in &view.holds {
            if let Some(left) = self.lease_left(*id).await {
                hold_left.insert(*slot, left);
            }
        }
        let hold_note = |s: u32| -> Option<String> {
            let delay = view.delay?;
            if view.held_back(s) {
                // Held back until its etcd lease ends (unknown: about now).
                let left = hold_left.get(&s).copied().unwrap_or(Duration::ZERO);
                return Some(held_back_note(delay, Some(left)));
            }
            view.orphans()
                .iter()
                .any(|(slot, _)| *slot == s)
                .then(|| held_back_note(delay, None))
        };
        let mut slots = Vec::new();
        for s in 0..limit {
            slots.push(match view.slots.iter().find(|x| x.slot == s) {
                None => SlotStatus {
                    note: hold_note(s),
                    ..SlotStatus::free(s)
                },
                Some(x) => slot_of(x, ttls.get(&s).copied()),
            });
        }
        for x in view.slots.iter().filter(|x| x.slot >= limit) {
            slots.push(slot_of(x, ttls.get(&x.slot).copied()));
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
            lock_delay_ms: view.delay.map(ms),
        })
    }

    pub(crate) async fn list(&self) -> Result<Vec<Key>> {
        let prefix = format!("{}/", self.config.prefix);
        let resp = self
            .call(Op::List, None, |mut c, _| {
                let p = prefix.clone();
                async move {
                    c.get(p, Some(GetOptions::new().with_prefix().with_keys_only()))
                        .await
                }
            })
            .await?;
        let names: Vec<String> = resp.kvs().iter().map(|kv| show(kv.key())).collect();
        keys_from_names(names.iter().filter_map(|name| {
            let k = name.strip_prefix(&prefix)?.strip_suffix("#limit")?;
            Some((k, name.as_str()))
        }))
    }

    pub(crate) async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>> {
        let op = Op::Break;
        let names = self.names(key);
        let status = self.inspect(key).await?;
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
            let was_live = self.revoke(op, key, s.lease).await?;
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
            freed.push(broken(
                s.slot,
                u64::try_from(s.create_rev).ok().map(Token),
                who,
                Some(s.value.acquired_unix_ms),
                was_live,
            ));
        }
        Ok(freed)
    }

    /// Reads the limit and writes the changed one only if the limit key is unchanged
    /// since (its mod revision; retried on conflict), so a relative change counts from the
    /// limit it replaces.
    pub(crate) async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus> {
        if let Resize::To(limit) = change {
            errors::check_limit(limit, u32::MAX)?;
        }
        let names = self.names(key);
        for _ in 0..errors::RESIZE_TRIES {
            let resp = self
                .call(Op::Resize, Some(key), |mut c, _| {
                    let k = names.limit.clone();
                    async move { c.get(k, None).await }
                })
                .await?;
            let Some(kv) = resp.kvs().first() else {
                return Err(errors::no_such_key_to_resize());
            };
            let limit = change.apply(parse_limit(&names, kv)?, u32::MAX)?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    names.limit.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::put(names.limit.clone(), limit.to_string(), None)]);
            if self.txn(Op::Resize, key, txn).await?.succeeded() {
                return self.inspect(key).await;
            }
        }
        Err(errors::kept_changing("resize it"))
    }

    /// Reads every entry of the key at one revision, refuses while a slot is held or held
    /// back or a request waits, and deletes them all in a transaction that fails if any of
    /// them changed since (retried). Tokens are create revisions, which keep rising across
    /// a key made again.
    pub(crate) async fn delete(&self, key: &Key) -> Result<()> {
        let names = self.names(key);
        let all = names.all();
        for _ in 0..errors::RESIZE_TRIES {
            let resp = self
                .call(Op::Delete, Some(key), |mut c, _| {
                    let k = all.clone();
                    async move { c.get(k, Some(GetOptions::new().with_prefix())).await }
                })
                .await?;
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            let count = |prefix: &str| {
                resp.kvs()
                    .iter()
                    .filter(|kv| kv.key().starts_with(prefix.as_bytes()))
                    .count()
            };
            if !resp
                .kvs()
                .iter()
                .any(|kv| kv.key() == names.limit.as_bytes())
            {
                return Err(errors::no_such_key());
            }
            // A holder keeps its waiter key while it holds; a grant record without its
            // slot is a lost lease the lock-delay may still hold back.
            let held = count(&names.slots);
            let waiting = count(&names.waiters).saturating_sub(held);
            let held_back = count(&names.holds) + count(&names.grants).saturating_sub(held);
            if held + waiting + held_back > 0 {
                let waiting = u32::try_from(waiting).unwrap_or(u32::MAX);
                return Err(errors::in_use(held, Some(waiting), held_back));
            }
            let txn = Txn::new()
                .when([
                    Compare::mod_revision(all.clone(), CompareOp::Less, revision + 1).with_prefix(),
                ])
                .and_then([TxnOp::delete(
                    all.clone(),
                    Some(DeleteOptions::new().with_prefix()),
                )]);
            if self.txn(Op::Delete, key, txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(errors::kept_changing("delete it"))
    }
}

/// Milliseconds of `d`, for status.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
