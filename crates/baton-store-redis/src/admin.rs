//! Status, list, break and resize, with `kit::status`'s vocabulary.
//!
//! Guarantees: status reads a key in one script (one consistent view); the heartbeat and
//! expiry it shows are the server's wall-clock stamps plus the TTL, for display only. List
//! scans the prefix's key records and answers sorted, without duplicates; a name that is
//! not a key is `Corrupt`. Break frees (or, with a lock-delay, holds back) exactly the
//! named holder's slots; resize never evicts.

use std::time::Duration;

use baton_core::kit::{errors, status};
use baton_core::{
    Error, ErrorKind, Holder, HolderId, Key, KeyStatus, Liveness, Resize, SlotState, SlotStatus,
    Token,
};

use crate::core::Inner;
use crate::layout;

/// The most slots a key may have (a script walks its slots).
pub(crate) const MAX_LIMIT: u32 = 100_000;

fn num<T: std::str::FromStr>(v: Option<&String>) -> Result<T, Error> {
    v.and_then(|s| s.parse::<T>().ok())
        .ok_or_else(|| layout::corrupt("the store answered a bad number"))
}

impl Inner {
    pub(crate) async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let base = layout::base(&self.config.prefix, key);
        let a = self.run(&self.scripts.inspect, &[base]).await?;
        if a.first().map(String::as_str) == Some("none") {
            return Err(errors::no_such_key());
        }
        let limit: u32 = num(a.get(1))?;
        let delay: u64 = num(a.get(2))?;
        let last: u64 = num(a.get(3))?;
        let waiters: u32 = num(a.get(4))?;
        let n: usize = num(a.get(5))?;
        let mut slots: Vec<SlotStatus> = (0..limit).map(SlotStatus::free).collect();
        let delay_d = Duration::from_millis(delay);
        for r in 0..n {
            let f = a
                .get(6 + r * 10..16 + r * 10)
                .ok_or_else(|| layout::corrupt("a short status answer"))?;
            let slot: u32 = num(Some(&f[0]))?;
            let token: u64 = num(Some(&f[1]))?;
            let acq: u64 = num(Some(&f[4])).unwrap_or(0);
            let ren: u64 = num(Some(&f[5])).unwrap_or(0);
            let ttl: u64 = num(Some(&f[6])).unwrap_or(0);
            let lost = f[7] == "1";
            let gone =
                !lost && Holder::from_json(&f[3]).is_some_and(|h| h.liveness() == Liveness::Dead);
            let mut st = if lost {
                let mut s = SlotStatus::free(slot);
                s.token = Some(Token(token));
                s.holder = Holder::from_json(&f[3]);
                s.note = Some(status::held_back_note(delay_d, None));
                s
            } else {
                let expired = gone.then_some(
                    "has no live process on this host (the next acquire takes the slot over)",
                );
                let mut s = SlotStatus::of_record(slot, token, &f[2], &f[3], Some(acq), expired);
                s.renewed_unix_ms = Some(ren);
                s.expires_unix_ms = Some(ren.saturating_add(ttl));
                if slot >= limit {
                    s.note = Some(status::above_limit_note(limit));
                }
                s
            };
            if st.state == SlotState::Held && st.since_unix_ms == Some(0) {
                st.since_unix_ms = None;
            }
            match slots.iter_mut().find(|s| s.slot == slot) {
                Some(s) => *s = st,
                None => slots.push(st),
            }
        }
        slots.sort_by_key(|s| s.slot);
        // Waiters whose process is gone on this host do not count: the next acquire
        // removes them.
        let i = 6 + n * 10;
        let nw: usize = num(a.get(i))?;
        let infos = a
            .get(i + 1..i + 1 + nw)
            .ok_or_else(|| layout::corrupt("a short status answer"))?;
        let dead = infos
            .iter()
            .filter(|w| {
                layout::waiter_info(w)
                    .and_then(|(_, j)| Holder::from_json(j))
                    .is_some_and(|h| h.liveness() == Liveness::Dead)
            })
            .count();
        let waiters = waiters.saturating_sub(u32::try_from(dead).unwrap_or(u32::MAX));
        Ok(KeyStatus {
            key: key.clone(),
            limit,
            slots,
            waiters: Some(waiters),
            last_token: (last > 0).then_some(Token(last)),
            lock_delay_ms: (delay > 0).then_some(delay),
        })
    }

    pub(crate) async fn list(&self) -> Result<Vec<Key>, Error> {
        let pattern = layout::meta_pattern(&self.config.prefix);
        let mut names: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut c = self.conn().await?;
            let (next, batch): (u64, Vec<String>) = self
                .bounded(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c),
                )
                .await?;
            self.put_back(c);
            names.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let prefix = &self.config.prefix;
        let pairs: Vec<(&str, &str)> = names
            .iter()
            .map(|n| (layout::key_of_meta(prefix, n).unwrap_or(n), n.as_str()))
            .collect();
        status::keys_from_names(pairs)
    }

    pub(crate) async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        let base = layout::base(&self.config.prefix, key);
        let hid = holder.map(|h| format!("{:032x}", h.0)).unwrap_or_default();
        let a = self.run(&self.scripts.break_, &[base, hid]).await?;
        if a.first().map(String::as_str) == Some("none") {
            return Err(errors::no_such_key());
        }
        let n: usize = num(a.get(1))?;
        let mut out = Vec::new();
        for r in 0..n {
            let f = a
                .get(2 + r * 5..7 + r * 5)
                .ok_or_else(|| layout::corrupt("a short break answer"))?;
            out.push(status::broken(
                num(Some(&f[0]))?,
                f[1].parse().ok().map(Token),
                Holder::from_json(&f[2]),
                f[3].parse().ok(),
                f[4] == "1",
            ));
        }
        Ok(out)
    }

    /// An absolute change is one script; a relative one reads the limit (the script's
    /// `changed` answer) and writes the changed limit only if it is still the one read,
    /// retried on conflict.
    pub(crate) async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus, Error> {
        let base = layout::base(&self.config.prefix, key);
        if let Resize::To(limit) = change {
            errors::check_limit(limit, MAX_LIMIT)?;
        }
        // The limit a relative change read, once the script answered it.
        let mut current: Option<u32> = None;
        for _ in 0..errors::RESIZE_TRIES {
            let (limit, replaces) = match (change, current) {
                (Resize::To(n), _) => (n, String::new()),
                // Only reads: 0 is never a limit, so the script answers `changed`.
                (Resize::By(_), None) => (1, "0".to_owned()),
                (Resize::By(_), Some(c)) => (change.apply(c, MAX_LIMIT)?, c.to_string()),
            };
            let a = self
                .run(
                    &self.scripts.resize,
                    &[base.clone(), limit.to_string(), replaces],
                )
                .await?;
            match (a.first().map(String::as_str), a.get(1)) {
                (Some("none"), _) => return Err(errors::no_such_key_to_resize()),
                (Some("ok"), _) => return self.inspect(key).await,
                (Some("changed"), Some(n)) if n.parse::<u32>().is_ok_and(|n| n >= 1) => {
                    current = n.parse().ok();
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        format!("the resize script answered {a:?}"),
                    ))
                }
            }
        }
        Err(errors::kept_changing("resize it"))
    }

    /// One script: refuses while a slot is held or held back or a request waits.
    pub(crate) async fn delete(&self, key: &Key) -> Result<(), Error> {
        let base = layout::base(&self.config.prefix, key);
        let a = self.run(&self.scripts.delete, &[base]).await?;
        let n = |i: usize| a.get(i).and_then(|v| v.parse::<u32>().ok());
        match a.first().map(String::as_str) {
            Some("none") => Err(errors::no_such_key()),
            Some("ok") => Ok(()),
            Some("in_use") if a.len() == 4 => Err(errors::in_use(
                n(1).unwrap_or(0) as usize,
                n(2),
                n(3).unwrap_or(0) as usize,
            )),
            _ => Err(Error::new(
                ErrorKind::Unavailable,
                format!("the delete script answered {a:?}"),
            )),
        }
    }
}
