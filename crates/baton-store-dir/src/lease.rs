//! Lease-file mode, `dir:PATH?mode=lease`: for shared filesystems (NFS, Lustre) where
//! kernel locks are not trusted. No decision uses a kernel lock, a file's mtime or a PID
//! alone.
//!
//! The files of a key are in `lease_layout.rs`; the grant in `lease_acquire.rs`; status,
//! break and resize in `lease_admin.rs`. This file holds the store, its release and renew,
//! and the thin `impl Store`.
//!
//! Guarantees, and why they hold:
//! - **One winner per generation.** A slot's current lease is its highest generation. A
//!   slot is taken by creating `slot.N.(G+1)` with `link(2)`, which fails if the name
//!   exists, so of all contenders that saw generation G free or stale exactly one creates
//!   G+1. A contender that was paused between judging and creating, and creates a name
//!   that an earlier winner already cleaned up, finds a higher generation when it checks
//!   after creating, and withdraws. The highest generation file is never deleted, which
//!   is what makes that check sound.
//! - **Stale only after a TTL of silence, on the reader's clock.** The holder rewrites its
//!   file with a higher heartbeat count. A reader judges a lease stale only after it has
//!   seen the same generation and heartbeat for the lease's whole TTL on its own monotonic
//!   clock, so no clock is compared across hosts and mtimes are never read. A holder on
//!   this host whose process is gone (same boot id, PID no longer running with the same
//!   start time) is reclaimed at once.
//! - **Tokens** come from the same construction: `token.(T+1)` is created with `link(2)`,
//!   checked to be the highest, and the lower ones removed.
//! - **Lock-delay** (keys created with one). A lease that is lost rather than released
//!   (judged stale, its holder on this host gone, or broken) is first replaced by a
//!   tombstone generation (`expired` or `broken`), created with `link(2)` like any other,
//!   and the slot is granted again only once the delay has passed since the loss. Hosts
//!   share no monotonic clock, so each host measures from the first time one of its
//!   processes saw the tombstone (`seen.N.G.BOOT`, created once, never rewritten): that is
//!   never before the loss, so a host can only wait longer than the delay, never less,
//!   and no wall clock is read. The tombstone's writer stamps its own host at once.
//! - **Loss before re-grant.** A renewal checks before and after rewriting that no higher
//!   generation exists; with the keeper's deadline (send time + TTL·(1−drift) − margin) a
//!   holder stops before any reader can have seen a TTL of silence.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use baton_core::kit::sys::lock;
use baton_core::kit::time::unix_ms_now;
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, HolderId, Key,
    KeyStatus, Lease, Op, Released, Resize, SlotStatus, Store, StoreUrl,
};

use crate::config::Mode;
use crate::fs;
use crate::lease_acquire::MAX_POLL;
use crate::lease_layout::{read_record, slot_file, LeaseRecord, Listing, State};
use crate::root::Root;

/// The directory store in lease-file mode. See the module docs.
#[derive(Debug)]
pub struct LeaseStore {
    pub(crate) root: Root,
    /// The leases this process holds, by (key, slot, token).
    pub(crate) held: Mutex<HashMap<(Key, u32, u64), Held>>,
    pub(crate) reclaim_pause: Mutex<Option<Duration>>,
    pub(crate) reclaim_pauses: AtomicU32,
}

/// A lease this process holds: its generation and holder.
#[derive(Debug)]
pub(crate) struct Held {
    pub gen: u64,
    pub holder: HolderId,
}

impl LeaseStore {
    /// Opens the store a `dir:PATH?mode=lease` URL names.
    pub fn open(url: &StoreUrl) -> Result<LeaseStore, Error> {
        let root = Root::open_in(
            url,
            Mode::Lease,
            "not a lease-mode URL (add ?mode=lease), or open it with baton_store_dir::open",
        )?;
        Ok(LeaseStore {
            root,
            held: Mutex::new(HashMap::new()),
            reclaim_pause: Mutex::new(None),
            reclaim_pauses: AtomicU32::new(0),
        })
    }

    /// For tests: pause this long between judging a held lease stale and reclaiming it,
    /// to show that a paused reclaimer cannot steal the slot from a later winner.
    #[doc(hidden)]
    pub fn set_reclaim_pause(&self, pause: Option<Duration>) {
        *lock(&self.reclaim_pause) = pause;
    }

    /// For tests: how many times this store paused before a reclaim.
    #[doc(hidden)]
    pub fn reclaim_pauses(&self) -> u32 {
        self.reclaim_pauses.load(Ordering::SeqCst)
    }

    /// The held generation of a lease this process took, if it is still the current one
    /// and still says it is ours.
    fn current_record(
        &self,
        lease: &Lease,
        op: Op,
    ) -> Result<Option<(Arc<OwnedFd>, LeaseRecord)>, Error> {
        let entry = (lease.key.clone(), lease.slot, lease.token.0);
        let gen = match lock(&self.held).get(&entry) {
            Some(h) if h.holder == lease.holder.id => h.gen,
            _ => return Ok(None),
        };
        let (dir, _) = self.root.existing_key(&lease.key, op)?;
        let io_err = |e| {
            self.root
                .io_err(op, &lease.key, "cannot read the lease file", e)
        };
        let listing = Listing::read(dir.as_fd()).map_err(io_err)?;
        if listing.current(lease.slot) != gen {
            return Ok(None);
        }
        match read_record(dir.as_fd(), lease.slot, gen).map_err(io_err)? {
            Some(r)
                if r.state == State::Held
                    && r.token == lease.token
                    && r.holder.id == lease.holder.id =>
            {
                Ok(Some((dir, r)))
            }
            _ => Ok(None),
        }
    }

    fn forget(&self, lease: &Lease) {
        lock(&self.held).remove(&(lease.key.clone(), lease.slot, lease.token.0));
    }

    /// Rewrites the current generation of `lease` (temp file + rename), stamped now.
    fn rewrite(
        &self,
        dir: &OwnedFd,
        record: &mut LeaseRecord,
        lease: &Lease,
        op: Op,
        what: &str,
    ) -> Result<(), Error> {
        record.renewed_unix_ms = unix_ms_now();
        let json = serde_json::to_vec(record).map_err(|e| {
            self.root
                .err(ErrorKind::Unavailable, op, &lease.key, e.to_string())
        })?;
        let name = slot_file(record.slot, record.gen);
        fs::write_atomic(dir.as_fd(), &name, &json, self.root.share)
            .map_err(|e| self.root.io_err(op, &lease.key, what, e))
    }

    fn release_sync(&self, lease: &Lease) -> Result<Released, Error> {
        let Some((dir, mut record)) = self.current_record(lease, Op::Release)? else {
            self.forget(lease);
            return Ok(Released::NotHeld);
        };
        record.state = State::Released;
        self.rewrite(
            &dir,
            &mut record,
            lease,
            Op::Release,
            "cannot write the lease file",
        )?;
        self.forget(lease);
        Ok(Released::Released)
    }

    fn renew_lease(&self, lease: &Lease) -> Result<Lease, Error> {
        let lost = |why: &str| {
            self.root
                .err(ErrorKind::Lost, Op::Renew, &lease.key, why.to_owned())
        };
        let Some((dir, mut record)) = self.current_record(lease, Op::Renew)? else {
            self.forget(lease);
            return Err(lost("the lease was taken over, broken or released"));
        };
        record.heartbeat += 1;
        self.rewrite(
            &dir,
            &mut record,
            lease,
            Op::Renew,
            "cannot write the heartbeat",
        )?;
        // A reclaimer that judged us stale before our write may have created the next
        // generation meanwhile: check after writing too.
        let listing = Listing::read(dir.as_fd()).map_err(|e| {
            self.root
                .io_err(Op::Renew, &lease.key, "cannot list lease files", e)
        })?;
        if listing.current(lease.slot) != record.gen {
            self.forget(lease);
            return Err(lost("the lease was taken over"));
        }
        Ok(lease.clone())
    }
}

#[async_trait]
impl Store for LeaseStore {
    fn url(&self) -> &StoreUrl {
        &self.root.url
    }

    fn capabilities(&self) -> Capabilities {
        // Waiters poll (no queue, so neither first come first served nor counted); a dead
        // holder's slot comes back within its TTL after the last heartbeat, plus one poll
        // of a waiting acquirer.
        Capabilities::lease_store(
            "within the TTL after the last heartbeat; at once when the holder was on this host and its process is gone",
            MAX_POLL,
        )
        .with_fifo(false)
        .with_waiters(false)
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        self.delete_key(key)
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        self.acquire_lease(req).await
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        self.release_sync(lease)
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let _ = self.release_sync(lease);
        true
    }

    async fn renew(&self, lease: &Lease) -> Result<Lease, Error> {
        self.renew_lease(lease)
    }

    async fn break_lease(
        &self,
        key: &Key,
        holder: Option<HolderId>,
    ) -> Result<Vec<SlotStatus>, Error> {
        self.break_key(key, holder)
    }

    async fn resize(&self, key: &Key, change: Resize) -> Result<KeyStatus, Error> {
        self.resize_key(key, change)
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        self.inspect_key(key)
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        self.root.list()
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        crate::barrier::barrier(&self.root, crate::barrier::Liveness::Heartbeat, req).await
    }
}
