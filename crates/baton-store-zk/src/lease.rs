//! Release and renew. A lease granted through this handle has its own session: renew is
//! a round trip on it (`exists` on the request node), which proves the session alive at
//! the send time, so the server cannot expire it before send time + session timeout
//! (the lease's TTL). A lease from another handle is found by its token (czxid).

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

    pub(crate) async fn release(&self, lease: &Lease) -> Result<Released, Error> {
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
        // Dropping the last handle on the session closes it; the server deletes anything
        // left of it.
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
        let guid = node
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_prefix("q-"))
            .and_then(|r| r.rsplit_once('-'))
            .map(|(g, _)| g.to_owned())
            .unwrap_or_default();
        if let Some(sp) = slot_node {
            if let Ok((d, stat)) = self.bounded(c.get_data(sp)).await {
                if d == guid.as_bytes() {
                    match self.raw(c.delete(sp, Some(stat.version))).await? {
                        Ok(()) | Err(zk::Error::NoNode) | Err(zk::Error::BadVersion) => {}
                        Err(e) => return Err(self.map(e)),
                    }
                }
            }
        }
        match self.raw(c.delete(node, None)).await? {
            Ok(()) => Ok(Released::Released),
            Err(zk::Error::NoNode) => Ok(Released::NotHeld),
            Err(e) => Err(self.map(e)),
        }
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
