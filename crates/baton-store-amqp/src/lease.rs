//! Release and renew. A lease lives on its own connection: the slot is the
//! unacknowledged delivery on its channel, so only the handle that granted it can renew
//! or release it. Renew is a synchronous round trip on that channel (a passive
//! declaration of the lease's proof queue): its answer proves the connection alive at the
//! send time, and a slot the broker returns later, without a release, is held back for the
//! TTL after it came back, so no one else holds it before send time + TTL.
//! A connection or channel that closed, or a blocked connection, is a lost lease at once.

use baton_core::{Error, ErrorKind, Lease, Released};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::core::{soft, Inner};

fn lost(lease: &Lease, why: &str) -> Error {
    Error::new(
        ErrorKind::Lost,
        format!("the lease with token {} {why}", lease.token),
    )
}

impl Inner {
    pub(crate) async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        let Some(h) = self.held(lease.key.as_str(), lease.token.0) else {
            return Err(lost(
                lease,
                "is not held through this store handle (released, or granted elsewhere: a \
                 RabbitMQ lease lives on its holder's connection)",
            ));
        };
        let status = h.conn.status();
        if !status.connected() {
            return Err(lost(lease, "ended with its connection to the broker"));
        }
        if status.blocked() {
            return Err(lost(
                lease,
                "cannot be proven: the broker blocked its connection (a resource alarm)",
            ));
        }
        if !h.channel.status().connected() {
            return Err(lost(lease, "ended: the broker closed its channel"));
        }
        let opts = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match self
            .raw(
                h.channel
                    .queue_declare(h.proof.as_str().into(), opts, FieldTable::default()),
            )
            .await?
        {
            Ok(_) => Ok(lease.clone()),
            Err(e) if soft(&e).is_some() => Err(lost(lease, &format!("ended: {e}"))),
            Err(e) if !h.conn.status().connected() => {
                Err(lost(lease, &format!("ended with its connection: {e}")))
            }
            Err(e) => Err(self.map(e)),
        }
    }

    pub(crate) async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        let Some(h) = self.forget(lease.key.as_str(), lease.token.0) else {
            return Ok(Released::NotHeld);
        };
        let held = h.conn.status().connected() && h.channel.status().connected();
        if held {
            // Marked released, the slot is the next holder's at once (a slot whose
            // newest record is not released is held back for the record's TTL).
            let mut r = h.record.clone();
            r.released = true;
            if let Ok(body) = serde_json::to_vec(&r) {
                let _ = self.publish(&h.channel, &h.record_queue, &body).await;
            }
        }
        // Closing the channel returns the slot message to the queue; closing the
        // connection deletes the proof queue. Either alone frees the slot.
        let closed = held
            && self
                .bounded(h.channel.close(200, "OK".into()))
                .await
                .is_ok();
        self.hang_up(&h.conn).await;
        Ok(if closed {
            Released::Released
        } else {
            Released::NotHeld
        })
    }
}
