//! Release and renew. A lease granted through this handle lives in the handle's session
//! for its TTL: renew is a round trip on it (`exists` on the request node), which proves
//! the session alive at the send time, so the server cannot expire it before send time +
//! session timeout (the lease's TTL). A lease from another handle is found by its token
//! (czxid).

use std::sync::Arc;
use std::time::Duration;

use baton_core::{Error, ErrorKind, Lease, Released};
use zookeeper_client as zk;

use crate::core::Inner;
use crate::layout;

fn lost(lease: &Lease, why: &str) -> Error {
    Error::new(
        ErrorKind::Lost,
        format!("the lease with token {} {why}", lease.token),
    )
}

impl Inner {
    pub(crate) async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let Some(h) = self.held(lease.key.as_str(), lease.token.0) else {
            return match self.find_by_token(lease).await? {
                Some(_) => Ok(lease.clone()),
                None => Err(lost(lease, "was broken, released or its session expired")),
            };
        };
        if h.client.state().is_terminated() {
            return Err(lost(lease, "ended with its ZooKeeper session"));
        }
        match self.raw(h.client.check_stat(&h.node)).await? {
            Ok(Some(stat)) if stat.czxid as u64 == lease.token.0 => Ok(lease.clone()),
            Ok(_) => Err(lost(lease, "was broken (its node is gone)")),
            Err(zk::Error::SessionExpired) => Err(lost(lease, "ended: its session expired")),
            Err(e) => Err(self.map(e)),
        }
    }

    pub(crate) async fn release(self: &Arc<Self>, lease: &Lease) -> Result<Released, Error> {
        let Some(h) = self.forget(lease.key.as_str(), lease.token.0) else {
            return match self.find_by_token(lease).await? {
                Some((node, slot_node)) => {
                    let c = self.admin().await?;
                    self.delete_lease(&c, &node, slot_node.as_deref()).await
                }
                None => Ok(Released::NotHeld),
            };
        };
        if h.client.state().is_terminated() {
            return Ok(Released::NotHeld);
        }
        let r = self
            .delete_lease(&h.client, &h.node, Some(&h.slot_node))
            .await;
        if matches!(&r, Err(e) if e.kind() != ErrorKind::Lost) {
            // Not confirmed, and the session lives on for the handle's other requests: its
            // nodes would keep the slot held. They go as soon as the server answers.
            if let Some((kp, guid)) = node_guid(&h.node) {
                self.delete_later(h.client.clone(), kp.to_owned(), guid.to_owned());
            }
        }
        drop(h);
        match r {
            Err(e) if e.kind() == ErrorKind::Lost => Ok(Released::NotHeld),
            other => other,
        }
    }

    /// Deletes a lease's slot node (when it is the lease's) and then its request node.
    pub(crate) async fn delete_lease(
        &self,
        c: &zk::Client,
        node: &str,
        slot_node: Option<&str>,
    ) -> Result<Released, Error> {
        let guid = node_guid(node).map(|(_, g)| g).unwrap_or_default();
        if let Some(sp) = slot_node {
            // A slot node that cannot be read is not known to be gone: the release is not
            // confirmed (in the handle's shared session it would hold the slot on).
            match self.raw(c.get_data(sp)).await? {
                Ok((d, stat)) if d == guid.as_bytes() => {
                    match self.raw(c.delete(sp, Some(stat.version))).await? {
                        Ok(()) | Err(zk::Error::NoNode) | Err(zk::Error::BadVersion) => {}
                        Err(e) => return Err(self.map(e)),
                    }
                }
                Ok(_) | Err(zk::Error::NoNode) => {}
                Err(e) => return Err(self.map(e)),
            }
        }
        match self.raw(c.delete(node, None)).await? {
            Ok(()) => Ok(Released::Released),
            Err(zk::Error::NoNode) => Ok(Released::NotHeld),
            Err(e) => Err(self.map(e)),
        }
    }

    /// Deletes what a request or a lease left in session `c` (its nodes, found by GUID)
    /// in the background, until the server confirms it or the session ends: the
    /// guaranteed delete of Curator, which the leak of kazoo#732 and CURATOR-315 lacked.
    /// The session is the handle's, shared by its other requests, so it does not end
    /// soon by itself; an error no retry mends (corrupt state) ends the attempts.
    pub(crate) fn delete_later(self: &Arc<Self>, c: zk::Client, kp: String, guid: String) {
        let me = Arc::clone(self);
        self.runtime.handle().spawn(async move {
            while !c.state().is_terminated() {
                match me.withdraw_once(&c, &kp, &guid).await {
                    Ok(()) => return,
                    // Hostile state (a child name baton did not write) will not mend
                    // itself: stop rather than retry for the session's whole life.
                    Err(e) if !e.is_retryable() => return,
                    Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
        });
    }

    /// The request node of a lease (by its czxid) and the slot node it claimed.
    async fn find_by_token(
        &self,
        lease: &Lease,
    ) -> Result<Option<(String, Option<String>)>, Error> {
        let c = self.admin().await?;
        let kp = layout::key_path(&self.config.root, &lease.key);
        let names = match self.raw(c.list_children(&kp)).await? {
            Ok(n) => n,
            Err(zk::Error::NoNode) => return Ok(None),
            Err(e) => return Err(self.map(e)),
        };
        let (q, _) = layout::parse_children(&kp, &names)?;
        for e in q {
            let p = format!("{kp}/{}", e.name);
            if let Ok(Ok(Some(stat))) = self.raw(c.check_stat(&p)).await {
                if stat.czxid as u64 == lease.token.0 {
                    let slot = format!("{kp}/{}", layout::slot_name(lease.slot));
                    return Ok(Some((p, Some(slot))));
                }
            }
        }
        Ok(None)
    }
}

/// The key path and GUID of a request node `KEY_PATH/q-GUID-SEQ`.
fn node_guid(node: &str) -> Option<(&str, &str)> {
    let (kp, name) = node.rsplit_once('/')?;
    let (guid, _) = name.strip_prefix("q-")?.rsplit_once('-')?;
    Some((kp, guid))
}
