//! The directory store: kernel OFD locks, one file per slot.
//!
//! Layout under the root (one directory per key, `/` in the key written as `%`):
//!
//! ```text
//! ROOT/jobs%nightly/limit           the key's limit, created once (temp file + link)
//! ROOT/jobs%nightly/token           the token counter: 20 digits and a newline
//! ROOT/jobs%nightly/gate            semaphore waiters queue on this lock
//! ROOT/jobs%nightly/slot.0 ...      one lock file per slot
//! ROOT/jobs%nightly/slot.0.holder   JSON: holder, token, slot; written atomically
//! ```
//!
//! Guarantees:
//! - Limit: a slot is an exclusive OFD lock on `slot.N`; there are `limit` slot files.
//! - Tokens: the counter is read and written while holding an OFD lock on `token`, after
//!   the slot is taken and before the lease is returned. A holder killed before writing it
//!   returned no token to anyone; one killed after leaves the new value. The next token is
//!   `max(counter + 1, now in µs since the epoch)`, so tokens keep increasing even if the
//!   store is wiped (a tmpfs after reboot), as long as the wall clock does not go back
//!   across the wipe.
//! - Recovery: the kernel drops a dead holder's locks when its process exits.
//! - No residue: a cancelled wait's thread is interrupted and joined before the acquire
//!   returns (see `wait.rs`); holder info of a dead holder is overwritten by the next one.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use baton_core::{
    unix_ms, AcquireRequest, Capabilities, Error, ErrorKind, Holder, Key, KeyStatus, Lease,
    Liveness, Op, Released, SlotState, SlotStatus, Store, StoreUrl, Token, Wait,
};
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::fs;
use crate::root::{lock, Root};
use crate::wait::{WaitFor, Waiter};

/// The directory store in its default (kernel-lock) mode. See the crate docs for the
/// mechanism and its bounds.
#[derive(Debug)]
pub struct DirStore {
    root: Root,
    /// Held leases: the locked slot file of each, by (key, slot, token).
    held: Mutex<HashMap<(Key, u32, u64), HeldSlot>>,
}

#[derive(Debug)]
struct HeldSlot {
    fd: OwnedFd,
    holder: baton_core::HolderId,
}

/// What `slot.N.holder` holds.
#[derive(Serialize, Deserialize)]
struct HolderRecord {
    slot: u32,
    token: Token,
    acquired_unix_ms: u64,
    holder: Holder,
}

impl DirStore {
    /// Opens (creating if needed) the directory store the URL names: `dir:PATH`, or `dir:`
    /// for the default directory. The default directory is created mode 0700 and refused
    /// if it is a symlink or another user owns it. `mode=lease` is refused here: open it
    /// with [`crate::open`] or [`crate::LeaseStore::open`].
    pub fn open(url: &StoreUrl) -> Result<DirStore, Error> {
        let root = Root::open(url)?;
        if root.config.mode != Mode::Kernel {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "this is a lease-mode URL; open it with baton_store_dir::open or LeaseStore::open",
            )
            .with_op(Op::Open)
            .with_store(url));
        }
        Ok(DirStore {
            root,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root.config.root
    }

    /// Takes the next token: `max(counter + 1, now in µs)`, written before it is returned.
    fn next_token(&self, dir: &OwnedFd, key: &Key) -> Result<Token, Error> {
        let fd = fs::open_file(dir.as_fd(), "token", true).map_err(|e| {
            self.root
                .io_err(Op::Acquire, key, "cannot open the token counter", e)
        })?;
        // Held for two syscalls; a blocking wait is shorter than any handoff.
        loop {
            match fs::lock_wait(fd.as_fd()) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(self.root.io_err(
                        Op::Acquire,
                        key,
                        "cannot lock the token counter",
                        e,
                    ))
                }
            }
        }
        let last = fs::read_counter(fd.as_fd()).map_err(|e| {
            self.root
                .io_err(Op::Acquire, key, "cannot read the token counter", e)
        })?;
        let now_us = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let next = last.map_or(0, |t| t.saturating_add(1)).max(now_us);
        if last == Some(u64::MAX) {
            return Err(self.root.err(
                ErrorKind::Corrupt,
                Op::Acquire,
                key,
                "the token counter is exhausted",
            ));
        }
        fs::write_counter(fd.as_fd(), next).map_err(|e| {
            self.root
                .io_err(Op::Acquire, key, "cannot write the token counter", e)
        })?;
        // The lock goes with `fd`.
        Ok(Token(next))
    }

    fn slot_name(slot: u32) -> String {
        format!("slot.{slot}")
    }

    fn holder_name(slot: u32) -> String {
        format!("slot.{slot}.holder")
    }

    /// Tries each slot once without waiting.
    fn try_slots(
        &self,
        dir: &OwnedFd,
        key: &Key,
        limit: u32,
    ) -> Result<Option<(u32, OwnedFd)>, Error> {
        for slot in 0..limit {
            let fd = self.open_slot(dir, key, slot)?;
            let got = fs::try_lock(fd.as_fd()).map_err(|e| {
                self.root
                    .io_err(Op::Acquire, key, "cannot lock a slot file", e)
            })?;
            if got {
                return Ok(Some((slot, fd)));
            }
        }
        Ok(None)
    }

    fn open_slot(&self, dir: &OwnedFd, key: &Key, slot: u32) -> Result<OwnedFd, Error> {
        fs::open_file(dir.as_fd(), &Self::slot_name(slot), true).map_err(|e| {
            self.root.io_err(
                Op::Acquire,
                key,
                &format!("cannot open slot file slot.{slot}"),
                e,
            )
        })
    }

    async fn wait_for_slot(
        &self,
        dir: &OwnedFd,
        key: &Key,
        limit: u32,
        wait: Wait,
    ) -> Result<(u32, OwnedFd), Error> {
        let what = if limit == 1 {
            WaitFor::Slot {
                slot: 0,
                fd: self.open_slot(dir, key, 0)?,
            }
        } else {
            let gate = fs::open_file(dir.as_fd(), "gate", true).map_err(|e| {
                self.root
                    .io_err(Op::Acquire, key, "cannot open the gate file", e)
            })?;
            let slots = (0..limit)
                .map(|s| self.open_slot(dir, key, s))
                .collect::<Result<Vec<_>, _>>()?;
            WaitFor::AnySlot {
                gate,
                slots,
                dir_path: format!("/proc/self/fd/{}", dir.as_raw_fd()),
            }
        };
        let mut waiter = Waiter::start(what).map_err(|e| {
            self.root
                .io_err(Op::Acquire, key, "cannot start waiting", e)
        })?;
        let result = match wait {
            Wait::Timeout(d) => match tokio::time::timeout(d, waiter.wait()).await {
                Ok(r) => r,
                Err(_) => {
                    // Dropping the waiter interrupts and joins its thread: nothing is left
                    // queued in the kernel when this returns.
                    drop(waiter);
                    return Err(self.root.err(
                        ErrorKind::Timeout,
                        Op::Acquire,
                        key,
                        format!(
                            "all {limit} slot(s) stayed held for {}",
                            baton_core::format_duration(d)
                        ),
                    ));
                }
            },
            _ => waiter.wait().await,
        };
        result.map_err(|e| {
            self.root
                .io_err(Op::Acquire, key, "waiting for a slot failed", e)
        })
    }

    fn release_sync(&self, lease: &Lease) -> Result<Released, Error> {
        let entry = (lease.key.clone(), lease.slot, lease.token.0);
        let held = {
            let mut map = lock(&self.held);
            match map.get(&entry) {
                Some(h) if h.holder == lease.holder.id => map.remove(&entry),
                _ => None,
            }
        };
        let Some(held) = held else {
            return Ok(Released::NotHeld);
        };
        // The holder file is ours while we hold the slot; remove it before unlocking so a
        // reader never sees our record beside someone else's lock.
        if let Ok(Some((dir, _))) = self.root.key_dir(&lease.key, None, Op::Release) {
            let _ = fs::remove(dir.as_fd(), &Self::holder_name(lease.slot));
        }
        drop(held.fd); // close: the kernel drops the lock and wakes a waiter
        Ok(Released::Released)
    }

    fn read_holder(&self, dir: &OwnedFd, slot: u32) -> Result<Option<HolderRecord>, String> {
        let name = Self::holder_name(slot);
        let fd = match fs::open_existing_ro(dir.as_fd(), &name) {
            Ok(Some(fd)) => fd,
            Ok(None) => return Ok(None),
            Err(e) => return Err(format!("holder info unreadable: {e}")),
        };
        let bytes = fs::read_small(fd.as_fd(), &name)
            .map_err(|e| format!("holder info unreadable: {e}"))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("holder info unreadable (not baton's JSON): {e}"))
    }
}

#[async_trait]
impl Store for DirStore {
    fn url(&self) -> &StoreUrl {
        &self.root.url
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new("at once: the kernel drops a dead holder's lock when its process exits")
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        let key = &req.key;
        let (dir, limit) = self.root.key_for_acquire(req)?;
        let (slot, fd) = match self.try_slots(&dir, key, limit)? {
            Some(got) => got,
            None => match req.wait {
                Wait::NoWait => {
                    return Err(self.root.err(
                        ErrorKind::Busy,
                        Op::Acquire,
                        key,
                        format!("all {limit} slot(s) are held"),
                    ))
                }
                wait => self.wait_for_slot(&dir, key, limit, wait).await?,
            },
        };
        // From here on, an error drops `fd`, which releases the slot.
        let token = self.next_token(&dir, key)?;
        let acquired_unix_ms = unix_ms(SystemTime::now());
        let record = HolderRecord {
            slot,
            token,
            acquired_unix_ms,
            holder: req.holder.clone(),
        };
        let json = serde_json::to_vec(&record).map_err(|e| {
            self.root.err(
                ErrorKind::Unavailable,
                Op::Acquire,
                key,
                format!("cannot encode holder info: {e}"),
            )
        })?;
        fs::write_atomic(dir.as_fd(), &Self::holder_name(slot), &json).map_err(|e| {
            self.root
                .io_err(Op::Acquire, key, "cannot write holder info", e)
        })?;
        lock(&self.held).insert(
            (key.clone(), slot, token.0),
            HeldSlot {
                fd,
                holder: req.holder.id,
            },
        );
        Ok(Lease {
            key: key.clone(),
            slot,
            limit,
            token,
            holder: req.holder.clone(),
            ttl: None,
            acquired_unix_ms,
            sent_at: None,
        })
    }

    async fn release(&self, lease: &Lease) -> Result<Released, Error> {
        self.release_sync(lease)
    }

    fn release_now(&self, lease: &Lease) -> bool {
        let _ = self.release_sync(lease);
        true
    }

    async fn inspect(&self, key: &Key) -> Result<KeyStatus, Error> {
        let (dir, limit) = self.root.existing_key(key, Op::Inspect)?;
        let mut slots = Vec::with_capacity(limit as usize);
        for slot in 0..limit {
            let locked = match fs::open_existing_ro(dir.as_fd(), &Self::slot_name(slot)) {
                Ok(Some(fd)) => fs::is_locked(fd.as_fd()).map_err(|e| {
                    self.root
                        .io_err(Op::Inspect, key, "cannot test a slot's lock", e)
                })?,
                Ok(None) => false,
                Err(e) => {
                    return Err(self.root.io_err(
                        Op::Inspect,
                        key,
                        &format!("bad slot file slot.{slot}"),
                        e,
                    ))
                }
            };
            let record = self.read_holder(&dir, slot);
            let mut status = SlotStatus {
                slot,
                state: if locked {
                    SlotState::Held
                } else {
                    SlotState::Free
                },
                token: None,
                holder: None,
                since_unix_ms: None,
                note: None,
            };
            match (locked, record) {
                (true, Ok(Some(r))) if r.holder.liveness() != Liveness::Dead => {
                    status.token = Some(r.token);
                    status.since_unix_ms = Some(r.acquired_unix_ms);
                    status.holder = Some(r.holder);
                }
                (true, Ok(_)) => {
                    status.note = Some("held; the holder has not written its info yet".into())
                }
                (_, Err(why)) => status.note = Some(why),
                (false, Ok(Some(r))) => {
                    status.note = Some(format!(
                        "free; the last holder (pid {}, token {}) exited without releasing",
                        r.holder.pid, r.token
                    ))
                }
                (false, Ok(None)) => {}
            }
            slots.push(status);
        }
        let last_token = fs::open_existing_ro(dir.as_fd(), "token")
            .ok()
            .flatten()
            .and_then(|fd| fs::read_counter(fd.as_fd()).ok().flatten())
            .map(Token);
        Ok(KeyStatus {
            key: key.clone(),
            limit,
            slots,
            waiters: None,
            last_token,
        })
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        self.root.list()
    }
}
