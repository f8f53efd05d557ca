//! The grant. The request node is created in the handle's session for the request's TTL
//! (timeout: the TTL; shared by its leases and waiting requests), named by a GUID so that
//! a create whose answer was lost is found again. The first `limit` request nodes hold; a
//! waiter watches the `limit` nodes nearest ahead of it and the key node (a resize), and
//! looks again when one of them changes. Whatever ends an acquire without a grant,
//! `withdraw` deletes its nodes by GUID; if it cannot confirm that, the deletion goes on
//! in the background until the server answers (`delete_later`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use baton_core::kit::errors;
use baton_core::kit::time::{unix_ms_now, validate_ttl};
use baton_core::{AcquireRequest, Error, ErrorKind, Holder, Lease, Liveness, Token, Wait};
use zookeeper_client as zk;

use crate::core::{Held, Inner};
use crate::layout::{self, Entry};

fn ephemeral() -> zk::CreateOptions<'static> {
    zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all())
}

/// An error of the wait made worth retrying: an expired session only ends this attempt.
fn retryable(e: Error) -> Error {
    if e.kind() == ErrorKind::Lost {
        Error::new(
            ErrorKind::Unavailable,
            format!("{}; the request was withdrawn", e.message()),
        )
    } else {
        e
    }
}

impl Inner {
    /// The session an acquire of `req` runs in, and the TTL it is for (its timeout).
    pub(crate) async fn acquire_session(
        &self,
        req: &AcquireRequest,
    ) -> Result<(zk::Client, Duration), Error> {
        let ttl = validate_ttl(req.ttl, &req.key)?;
        let c = self.lease_session(ttl).await.map_err(retryable)?;
        Ok((c, ttl))
    }

    /// Reads the key node (creating it with the request's limit) and checks that it and
    /// its children are baton's and that the request asks for the key's limit.
    async fn ensure_key(&self, c: &zk::Client, kp: &str, limit: u32) -> Result<(), Error> {
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        loop {
            match self.raw(c.get_data(kp)).await? {
                Err(zk::Error::NoNode) => {
                    match self
                        .raw(c.create(kp, &layout::key_data(limit), &persistent))
                        .await?
                    {
                        Ok(_) | Err(zk::Error::NodeExists) => continue,
                        Err(e) => return Err(self.map(e)),
                    }
                }
                Err(e) => return Err(self.map(e)),
                Ok((data, _)) => {
                    let have = layout::parse_limit(kp, &data)?;
                    let names = match self.raw(c.list_children(kp)).await? {
                        Ok(n) => n,
                        Err(zk::Error::NoNode) => continue,
                        Err(e) => return Err(self.map(e)),
                    };
                    layout::parse_children(kp, &names)?;
                    if have != limit {
                        return Err(errors::limit_mismatch(have, limit));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// The request node with this GUID, if the server has it: its name and czxid.
    async fn find(
        &self,
        c: &zk::Client,
        kp: &str,
        guid: &str,
    ) -> Result<Option<(String, i64)>, Error> {
        let names = match self.raw(c.list_children(kp)).await? {
            Ok(n) => n,
            Err(zk::Error::NoNode) => return Ok(None),
            Err(e) => return Err(self.map(e)),
        };
        let prefix = layout::queue_prefix(guid);
        let Some(name) = names.into_iter().find(|n| n.starts_with(&prefix)) else {
            return Ok(None);
        };
        match self.raw(c.check_stat(&format!("{kp}/{name}"))).await? {
            Ok(Some(stat)) => Ok(Some((name, stat.czxid))),
            Ok(None) => Ok(None),
            Err(e) => Err(self.map(e)),
        }
    }

    /// Creates the request node, or finds the one an earlier try created.
    async fn enqueue(
        &self,
        c: &zk::Client,
        kp: &str,
        guid: &str,
        limit: u32,
        data: &[u8],
    ) -> Result<(String, i64), Error> {
        let seq = zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all());
        let path = format!("{kp}/{}", layout::queue_prefix(guid));
        for _ in 0..10 {
            self.ensure_key(c, kp, limit).await?;
            match tokio::time::timeout(self.config.timeout, c.create(&path, data, &seq)).await {
                Ok(Ok((stat, n))) => {
                    return Ok((format!("{}{n}", layout::queue_prefix(guid)), stat.czxid))
                }
                // The key node was deleted between the look and the create.
                Ok(Err(zk::Error::NoNode)) => continue,
                Ok(Err(e @ (zk::Error::ConnectionLoss | zk::Error::Timeout))) => {
                    if let Some(found) = self.find(c, kp, guid).await? {
                        return Ok(found);
                    }
                    let _ = e;
                    continue;
                }
                Ok(Err(e)) => return Err(self.map(e)),
                Err(_) => {
                    if let Some(found) = self.find(c, kp, guid).await? {
                        return Ok(found);
                    }
                }
            }
        }
        Err(Error::new(
            ErrorKind::Unavailable,
            format!("could not create a request node under {kp}"),
        ))
    }

    /// The wait, in the acquire's session `c`. On success the session is kept with the
    /// lease; on failure the caller withdraws.
    pub(crate) async fn contend(
        &self,
        c: &zk::Client,
        req: &AcquireRequest,
        guid: &str,
    ) -> Result<Lease, Error> {
        self.contend_inner(c, req, guid).await.map_err(retryable)
    }

    async fn contend_inner(
        &self,
        c: &zk::Client,
        req: &AcquireRequest,
        guid: &str,
    ) -> Result<Lease, Error> {
        let ttl = validate_ttl(req.ttl, &req.key)?;
        let deadline = req.deadline(Instant::now());
        let kp = layout::key_path(&self.config.root, &req.key);
        let data = req.holder.to_json()?;
        let (me, czxid) = self
            .enqueue(c, &kp, guid, req.limit, data.as_bytes())
            .await?;
        loop {
            match self
                .step(c, req, guid, &kp, &me, czxid, ttl, deadline)
                .await
            {
                Ok(Some(lease)) => return Ok(lease),
                Ok(None) => {}
                // A connection that drops while the session lives: the request keeps its
                // place; look again once the client has reconnected.
                // (Not when the request node is gone: someone deleted it.)
                Err(e)
                    if e.kind() == ErrorKind::Unavailable
                        && e.is_retryable()
                        && !c.state().is_terminated()
                        && deadline.is_none_or(|d| Instant::now() < d) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let node = format!("{kp}/{me}");
                    if matches!(self.raw(c.check_stat(&node)).await, Ok(Ok(None))) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One look at the queue: the grant, or `None` after waiting for a change.
    #[allow(clippy::too_many_arguments)]
    async fn step(
        &self,
        c: &zk::Client,
        req: &AcquireRequest,
        guid: &str,
        kp: &str,
        me: &str,
        czxid: i64,
        ttl: Duration,
        deadline: Option<Instant>,
    ) -> Result<Option<Lease>, Error> {
        let kp = kp.to_owned();
        // A grant is decided by this look: the new holder's lease counts from it (the
        // slot was not free before it), and its session was alive when it was sent.
        let sent = Instant::now();
        let (kdata, _, key_watch) = match self.raw(c.get_and_watch_data(&kp)).await? {
            Ok(v) => v,
            Err(zk::Error::NoNode) => return Err(self.vanished(me)),
            Err(e) => return Err(self.map(e)),
        };
        let limit = layout::parse_limit(&kp, &kdata)?;
        let names = match self.raw(c.list_children(&kp)).await? {
            Ok(n) => n,
            Err(zk::Error::NoNode) => return Err(self.vanished(me)),
            Err(e) => return Err(self.map(e)),
        };
        let (q, slots) = layout::parse_children(&kp, &names)?;
        let idx = q
            .iter()
            .position(|e| e.guid == guid)
            .ok_or_else(|| self.vanished(me))?;
        if self.sweep_dead(c, &kp, &q[..idx]).await? {
            return Ok(None);
        }
        if (idx as u64) < u64::from(limit) {
            if let Some(slot) = self.claim(c, &kp, guid, limit, &slots).await? {
                let negotiated = c.session_timeout();
                self.keep(
                    req.key.as_str(),
                    czxid as u64,
                    Held {
                        client: c.clone(),
                        node: format!("{kp}/{me}"),
                        slot_node: format!("{kp}/{}", layout::slot_name(slot)),
                    },
                );
                return Ok(Some(Lease {
                    key: req.key.clone(),
                    slot,
                    limit: req.limit,
                    token: Token(czxid as u64),
                    holder: req.holder.clone(),
                    // The server may have bounded the session timeout below the TTL.
                    ttl: Some(ttl.min(negotiated)),
                    acquired_unix_ms: unix_ms_now(),
                    sent_at: Some(sent),
                }));
            }
        }
        if req.wait == Wait::NoWait {
            let held = slots.len() as u32;
            let ahead = idx.saturating_sub(held as usize) as u32;
            return Err(errors::busy(
                held,
                limit,
                (ahead > 0).then_some(ahead),
                None,
            ));
        }
        // Otherwise watch the `limit` nodes nearest ahead: only their going can bring
        // this request within the first `limit` (a node farther ahead going leaves
        // `limit` nodes ahead still).
        let mut watches = Vec::new();
        let mut gone = false;
        if (idx as u64) < u64::from(limit) {
            // Within the first `limit` but no slot free yet (a holder above a lowered
            // limit, or a release between its two deletes): watch the children.
            match self.raw(c.get_and_watch_children(&kp)).await? {
                Ok((_, _, w)) => watches.push(w),
                Err(zk::Error::NoNode) => gone = true,
                Err(e) => return Err(self.map(e)),
            }
        } else {
            let ahead: &[Entry] = &q[idx - limit as usize..idx];
            for e in ahead {
                let p = format!("{kp}/{}", e.name);
                match self.raw(c.check_and_watch_stat(&p)).await? {
                    Ok((Some(_), w)) => watches.push(w),
                    Ok((None, _)) => gone = true,
                    Err(e) => return Err(self.map(e)),
                }
            }
        }
        if gone {
            return Ok(None);
        }
        let changed = async {
            let mut fs: Vec<_> = watches.into_iter().map(|w| Box::pin(w.changed())).collect();
            fs.push(Box::pin(key_watch.changed()));
            futures_select_any(fs).await;
            self.wakeups.fetch_add(1, Ordering::Relaxed);
        };
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match left {
            Some(l) if l.is_zero() => {
                return Err(req.timed_out("every slot stayed held", &self.url))
            }
            Some(l) => {
                if tokio::time::timeout(l, changed).await.is_err() {
                    return Err(req.timed_out("every slot stayed held", &self.url));
                }
            }
            None => changed.await,
        }
        Ok(None)
    }

    /// Deletes the nodes ahead whose holder is known dead (a process on this host that is
    /// gone: its session would linger for its timeout). True when one was deleted.
    async fn sweep_dead(&self, c: &zk::Client, kp: &str, ahead: &[Entry]) -> Result<bool, Error> {
        let mut swept = false;
        for e in ahead {
            let p = format!("{kp}/{}", e.name);
            let Ok(Ok((d, _))) = self.raw(c.get_data(&p)).await else {
                continue;
            };
            let dead = std::str::from_utf8(&d)
                .ok()
                .and_then(Holder::from_json)
                .is_some_and(|h| h.liveness() == Liveness::Dead);
            if dead {
                self.withdraw_once(c, kp, &e.guid).await?;
                swept = true;
            }
        }
        Ok(swept)
    }

    fn vanished(&self, me: &str) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!("the request node {me} vanished (its session ended)"),
        )
    }

    /// Claims the lowest free slot below `limit` by creating its ephemeral node.
    async fn claim(
        &self,
        c: &zk::Client,
        kp: &str,
        guid: &str,
        limit: u32,
        taken: &[u32],
    ) -> Result<Option<u32>, Error> {
        for slot in (0..limit).filter(|s| !taken.contains(s)) {
            let p = format!("{kp}/{}", layout::slot_name(slot));
            match self
                .raw(c.create(&p, guid.as_bytes(), &ephemeral()))
                .await?
            {
                Ok(_) => return Ok(Some(slot)),
                Err(zk::Error::NodeExists) => continue,
                Err(zk::Error::ConnectionLoss) => {
                    // The answer was lost: the slot is ours if it names our GUID.
                    if let Ok(Ok((d, _))) = self.raw(c.get_data(&p)).await {
                        if d == guid.as_bytes() {
                            return Ok(Some(slot));
                        }
                    }
                    continue;
                }
                Err(e) => return Err(self.map(e)),
            }
        }
        Ok(None)
    }

    /// Deletes the request's nodes (found by GUID), retrying within a bound. True when
    /// the server confirmed nothing of the request is left.
    pub(crate) async fn withdraw(&self, c: &zk::Client, req: &AcquireRequest, guid: &str) -> bool {
        let kp = layout::key_path(&self.config.root, &req.key);
        let until = Instant::now() + self.config.timeout * 3;
        while Instant::now() < until {
            if c.state().is_terminated() {
                // The session is over: the server deleted its ephemeral nodes.
                return true;
            }
            match self.withdraw_once(c, &kp, guid).await {
                Ok(()) => return true,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        false
    }

    pub(crate) async fn withdraw_once(
        &self,
        c: &zk::Client,
        kp: &str,
        guid: &str,
    ) -> Result<(), Error> {
        let names = match self.raw(c.list_children(kp)).await? {
            Ok(n) => n,
            Err(zk::Error::NoNode) => return Ok(()),
            Err(e) => return Err(self.map(e)),
        };
        for n in names.iter().filter(|n| n.starts_with("slot-")) {
            let p = format!("{kp}/{n}");
            if let Ok(Ok((d, stat))) = self.raw(c.get_data(&p)).await {
                if d == guid.as_bytes() {
                    match self.raw(c.delete(&p, Some(stat.version))).await? {
                        Ok(()) | Err(zk::Error::NoNode) => {}
                        Err(e) => return Err(self.map(e)),
                    }
                }
            }
        }
        let prefix = layout::queue_prefix(guid);
        for n in names.iter().filter(|n| n.starts_with(&prefix)) {
            match self.raw(c.delete(&format!("{kp}/{n}"), None)).await? {
                Ok(()) | Err(zk::Error::NoNode) => {}
                Err(e) => return Err(self.map(e)),
            }
        }
        Ok(())
    }
}

/// Resolves when the first of `fs` does.
async fn futures_select_any<F: std::future::Future + Unpin>(fs: Vec<F>) {
    let mut fs = fs;
    std::future::poll_fn(move |cx| {
        for f in fs.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}
