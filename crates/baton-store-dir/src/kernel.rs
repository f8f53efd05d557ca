//! The directory store in its default mode: kernel OFD locks, one file per slot.
//!
//! Layout under the root (one directory per key, `/` in the key written as `%`):
//!
//! ```text
//! ROOT/jobs%nightly/limit    the key's limit, created once (temp file + link)
//! ROOT/jobs%nightly/token    the token counter: 20 digits and a newline
//! ROOT/jobs%nightly/gate     semaphore waiters queue on its lock; releases poke it
//! ROOT/jobs%nightly/waiting  each waiting request holds a read lock on it (for delete)
//! ROOT/jobs%nightly/slot.0   the lock of slot 0; its contents: the holder's record
//! ROOT/jobs%nightly/slot.1   ... one file per slot
//! ```
//!
//! Guarantees:
//! - Limit: a slot is an exclusive OFD lock on `slot.N`; there are `limit` slot files.
//! - Tokens: the counter is read and written while holding an OFD lock on `token` (and,
//!   inside this process, a mutex), after the slot is taken and before the lease is
//!   returned. A holder killed before writing it returned no token to anyone; one killed
//!   after leaves the new value. The next token is `max(counter + 1, now in µs since the
//!   epoch)`, so tokens keep increasing even if the store is wiped (a tmpfs after reboot),
//!   as long as the wall clock does not go back across the wipe.
//! - Holder info: the holder writes its record into its locked slot file with one
//!   `pwrite`, behind a header with the record's length and checksum, so a reader never
//!   mistakes a torn write for a record (it retries, then reports it unreadable). The
//!   record describes exactly the lock file it is in. Release overwrites the header before
//!   unlocking; a killed holder leaves its record, which `status` reports beside a free lock.
//! - Recovery: the kernel drops a dead holder's locks when its process exits.
//! - No residue: a cancelled wait's thread is interrupted and joined before the acquire
//!   returns (see `wait.rs`).
//! - Delete: refused while a request waits (it cannot write-lock `waiting`) or a slot is
//!   held (it cannot lock every slot file); with every slot locked it renames the key's
//!   directory away and only then unlocks (see `root/retire.rs`). A grant checks after
//!   locking its slot that its directory is still the key's, so a request that had the
//!   old directory open starts over on the key made anew.
//!
//! Descriptors are cached per key: the counter's (used under a mutex) and each free slot's
//! (taken out while held, so two holders in one process never share an open file
//! description, and therefore conflict exactly as two processes do).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use baton_core::kit::errors;
use baton_core::kit::sys::{self, lock, LockKind, Range};
use baton_core::kit::time::unix_ms_now;
use baton_core::{
    AcquireRequest, BarrierPassed, BarrierRequest, Capabilities, Error, ErrorKind, Holder,
    HolderId, Key, KeyStatus, Lease, Liveness, Op, Recovery, Released, SlotState, SlotStatus,
    Store, StoreUrl, Token, Wait,
};
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::fs;
use crate::root::{exited_slot, Root, DELETED_TRIES};
use crate::wait::{WaitFor, Waiter};

/// The directory store in its default (kernel-lock) mode. See the module docs for the
/// mechanism and its bounds.
#[derive(Debug)]
pub struct DirStore {
    root: Root,
    /// Cached descriptors, per key.
    files: Mutex<HashMap<Key, Arc<KeyFiles>>>,
    /// Held leases: the locked slot file of each, by (key, slot, token).
    held: Mutex<HashMap<(Key, u32, u64), HeldSlot>>,
}

/// A key's open files, valid for one key directory (see `files_for`).
#[derive(Debug)]
struct KeyFiles {
    dir: Arc<OwnedFd>,
    limit: u32,
    /// The token counter. The mutex serializes this process's increments (an OFD lock
    /// does not conflict with itself); the OFD lock serializes processes.
    token: Mutex<Option<OwnedFd>>,
    /// The gate, poked after a semaphore release so the front waiter looks again.
    gate: Mutex<Option<OwnedFd>>,
    /// Free slot descriptors, by slot; `None` while held or not opened yet.
    free: Mutex<Vec<Option<OwnedFd>>>,
}

#[derive(Debug)]
struct HeldSlot {
    fd: OwnedFd,
    holder: HolderId,
    files: Arc<KeyFiles>,
}

/// The holder's record inside `slot.N`.
#[derive(Serialize, Deserialize)]
struct HolderRecord {
    slot: u32,
    token: Token,
    acquired_unix_ms: u64,
    holder: Holder,
}

/// `baton1 <length, 8 hex> <FNV-1a 64 of the body, 16 hex>\n`, then the body.
const HEADER_LEN: usize = 33;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn encode_record(body: &[u8]) -> Vec<u8> {
    let mut out = format!("baton1 {:08x} {:016x}\n", body.len(), fnv1a(body)).into_bytes();
    out.extend_from_slice(body);
    out
}

/// What a slot file says: nothing (never held, or released), a record, or garbage.
enum Contents {
    Empty,
    Record(HolderRecord),
    Unreadable(String),
}

fn decode_record(bytes: &[u8]) -> Contents {
    if bytes.is_empty() {
        return Contents::Empty;
    }
    let bad = |why: &str| Contents::Unreadable(format!("holder info unreadable: {why}"));
    if bytes.len() < HEADER_LEN || !bytes.starts_with(b"baton1 ") || bytes[HEADER_LEN - 1] != b'\n'
    {
        return bad("not a record baton wrote");
    }
    let header = std::str::from_utf8(&bytes[7..HEADER_LEN - 1]).unwrap_or("");
    let mut parts = header.split(' ');
    let (Some(len), Some(sum), None) = (parts.next(), parts.next(), parts.next()) else {
        return bad("bad header");
    };
    let (Ok(len), Ok(sum)) = (usize::from_str_radix(len, 16), u64::from_str_radix(sum, 16)) else {
        return bad("bad header");
    };
    if len == 0 {
        return Contents::Empty;
    }
    let Some(body) = HEADER_LEN
        .checked_add(len)
        .and_then(|end| bytes.get(HEADER_LEN..end))
    else {
        return bad("shorter than its header says");
    };
    if fnv1a(body) != sum {
        return bad("checksum mismatch");
    }
    match serde_json::from_slice(body) {
        Ok(r) => Contents::Record(r),
        Err(e) => bad(&format!("not baton's JSON: {e}")),
    }
}

/// The header of an empty record: written over the old one at release.
fn empty_record() -> Vec<u8> {
    encode_record(b"")
}

impl DirStore {
    /// Opens (creating if needed) the directory store the URL names: `dir:PATH`, or `dir:`
    /// for the default directory. The default directory is created mode 0700 and refused
    /// if it is a symlink or another user owns it. `mode=lease` is refused here: open it
    /// with [`crate::open`] or [`crate::LeaseStore::open`].
    pub fn open(url: &StoreUrl) -> Result<DirStore, Error> {
        let root = Root::open_in(
            url,
            Mode::Kernel,
            "this is a lease-mode URL; open it with baton_store_dir::open or LeaseStore::open",
        )?;
        Ok(DirStore {
            root,
            files: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root.config.root
    }

    /// The cached files of the key an acquire asks for (creating the key if new).
    fn files_for(&self, req: &AcquireRequest) -> Result<Arc<KeyFiles>, Error> {
        let (dir, limit) = self.root.key_for_acquire(req)?;
        let mut files = lock(&self.files);
        if let Some(f) = files.get(&req.key) {
            if Arc::ptr_eq(&f.dir, &dir) {
                return Ok(f.clone());
            }
        }
        // New, or the key's directory was replaced: start over with the new one.
        let f = Arc::new(KeyFiles {
            dir,
            limit,
            token: Mutex::new(None),
            gate: Mutex::new(None),
            free: Mutex::new((0..limit).map(|_| None).collect()),
        });
        files.insert(req.key.clone(), f.clone());
        Ok(f)
    }

    fn slot_name(slot: u32) -> String {
        format!("slot.{slot}")
    }

    fn open_slot(&self, dir: &OwnedFd, key: &Key, slot: u32) -> Result<OwnedFd, Error> {
        fs::open_file(dir.as_fd(), &Self::slot_name(slot), true, self.root.share).map_err(|e| {
            self.root.io_err(
                Op::Acquire,
                key,
                &format!("cannot open slot file slot.{slot}"),
                e,
            )
        })
    }

    /// Takes the next token: `max(counter + 1, now in µs)`, written before it is returned.
    fn next_token(&self, files: &KeyFiles, key: &Key) -> Result<Token, Error> {
        let io_err = |what: &str, e| self.root.io_err(Op::Acquire, key, what, e);
        let mut cached = lock(&files.token);
        if cached.is_none() {
            let fd = fs::open_file(files.dir.as_fd(), "token", true, self.root.share)
                .map_err(|e| io_err("cannot open the token counter", e))?;
            *cached = Some(fd);
        }
        let fd = cached
            .as_ref()
            .ok_or_else(|| {
                self.root
                    .err(ErrorKind::Unavailable, Op::Acquire, key, "no token counter")
            })?
            .as_fd();
        // Held for two syscalls; a blocking wait is shorter than any handoff.
        loop {
            match fs::lock_wait(fd) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err("cannot lock the token counter", e)),
            }
        }
        let result = fs::read_counter(fd)
            .map_err(|e| io_err("cannot read the token counter", e))
            .and_then(|last| match last {
                // A new counter: a key made again after a delete starts above its floor.
                None => self
                    .root
                    .token_floor(key)
                    .map_err(|e| io_err("cannot read the key's token floor", e)),
                last => Ok(last),
            })
            .and_then(|last| {
                if last == Some(u64::MAX) {
                    let e = errors::corrupt("the token counter", "is exhausted");
                    return Err(self.root.ctx(e, Op::Acquire, key));
                }
                let now_us = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(0);
                let next = last.map_or(0, |t| t + 1).max(now_us);
                fs::write_counter(fd, next)
                    .map_err(|e| io_err("cannot write the token counter", e))?;
                Ok(Token(next))
            });
        if fs::unlock(fd).is_err() {
            // The lock state is unknown: close the descriptor, which surely drops it.
            *cached = None;
        }
        result
    }

    /// Tries each slot once without waiting.
    fn try_slots(&self, files: &KeyFiles, key: &Key) -> Result<Option<(u32, OwnedFd)>, Error> {
        for slot in 0..files.limit {
            let cached = lock(&files.free)
                .get_mut(slot as usize)
                .and_then(Option::take);
            let fd = match cached {
                Some(fd) => fd,
                None => self.open_slot(&files.dir, key, slot)?,
            };
            let got = fs::try_lock(fd.as_fd()).map_err(|e| {
                self.root
                    .io_err(Op::Acquire, key, "cannot lock a slot file", e)
            })?;
            if got {
                return Ok(Some((slot, fd)));
            }
            self.put_back(files, slot, fd);
        }
        Ok(None)
    }

    /// Returns an unlocked slot descriptor to the cache.
    fn put_back(&self, files: &KeyFiles, slot: u32, fd: OwnedFd) {
        if let Some(entry) = lock(&files.free).get_mut(slot as usize) {
            *entry = Some(fd);
        }
    }

    async fn wait_for_slot(
        &self,
        files: &KeyFiles,
        key: &Key,
        wait: Wait,
    ) -> Result<(u32, OwnedFd), Error> {
        let dir = &files.dir;
        let limit = files.limit;
        let what = if limit == 1 {
            WaitFor::Slot {
                slot: 0,
                fd: self.open_slot(dir, key, 0)?,
            }
        } else {
            let gate = fs::open_file(dir.as_fd(), "gate", true, self.root.share).map_err(|e| {
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
        // Held (a read lock) while this request waits, so that a delete sees it.
        let waiting = fs::open_file(dir.as_fd(), "waiting", true, self.root.share)
            .and_then(|fd| {
                sys::ofd_try_lock(fd.as_fd(), LockKind::Read, Range::WHOLE)?;
                Ok(fd)
            })
            .map_err(|e| {
                self.root
                    .io_err(Op::Acquire, key, "cannot open the key's waiting file", e)
            })?;
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
        drop(waiting);
        result.map_err(|e| {
            self.root
                .io_err(Op::Acquire, key, "waiting for a slot failed", e)
        })
    }

    /// Takes a slot of the key `req` names, waiting as it says. A slot taken in a
    /// directory that is no longer the key's (the key was deleted meanwhile) is let go,
    /// and the request starts over on the key made anew.
    async fn take_slot(
        &self,
        req: &AcquireRequest,
    ) -> Result<(Arc<KeyFiles>, u32, OwnedFd), Error> {
        let key = &req.key;
        let started = Instant::now();
        for _ in 0..DELETED_TRIES {
            let files = self.files_for(req)?;
            let limit = files.limit;
            // An error in a directory the key no longer has (its files removed under us)
            // means: start over on the key made anew.
            let gone = |e: Error| match self.root.is_current(key, &files.dir) {
                true => Err(e),
                false => Ok(()),
            };
            let got = match self.try_slots(&files, key) {
                Ok(got) => got,
                Err(e) => {
                    gone(e)?;
                    self.root.forget(key);
                    continue;
                }
            };
            let (slot, fd) = match got {
                Some(got) => got,
                None => {
                    let wait = match req.wait {
                        Wait::NoWait => {
                            let e = errors::busy(limit, limit, None, None);
                            return Err(self.root.ctx(e, Op::Acquire, key));
                        }
                        Wait::Timeout(d) => Wait::Timeout(d.saturating_sub(started.elapsed())),
                        Wait::Forever => Wait::Forever,
                    };
                    match self.wait_for_slot(&files, key, wait).await {
                        Ok(got) => got,
                        Err(e) => {
                            gone(e)?;
                            self.root.forget(key);
                            continue;
                        }
                    }
                }
            };
            if self.root.is_current(key, &files.dir) {
                return Ok((files, slot, fd));
            }
            drop(fd);
            self.root.forget(key);
        }
        Err(self.root.err(
            ErrorKind::Unavailable,
            Op::Acquire,
            key,
            format!(
                "the key was deleted {DELETED_TRIES} times while this request was taking a slot"
            ),
        ))
    }

    /// Deletes a key nobody holds or waits for (see the module docs).
    fn delete_key(&self, key: &Key) -> Result<(), Error> {
        let op = Op::Delete;
        let share = self.root.share;
        let io_err = |what: &str, e| self.root.io_err(op, key, what, e);
        let (dir, limit) = self.root.existing_key(key, op)?;
        let waiting = fs::open_file(dir.as_fd(), "waiting", true, share)
            .map_err(|e| io_err("cannot open the key's waiting file", e))?;
        if !sys::ofd_try_lock(waiting.as_fd(), LockKind::Write, Range::WHOLE)
            .map_err(|e| io_err("cannot lock the key's waiting file", e))?
        {
            return Err(self.root.ctx(errors::in_use_by_waiters(), op, key));
        }
        let mut slots = Vec::with_capacity(limit as usize);
        let mut held = 0;
        for slot in 0..limit {
            let fd = fs::open_file(dir.as_fd(), &Self::slot_name(slot), true, share)
                .map_err(|e| io_err(&format!("cannot open slot file slot.{slot}"), e))?;
            if fs::try_lock(fd.as_fd()).map_err(|e| io_err("cannot lock a slot file", e))? {
                slots.push(fd);
            } else {
                held += 1;
            }
        }
        if held > 0 {
            return Err(self.root.ctx(errors::in_use(held, None, 0), op, key));
        }
        // Nobody takes a token without a slot, and every slot is this call's.
        let last = match fs::open_existing_ro(dir.as_fd(), "token")
            .map_err(|e| io_err("cannot open the token counter", e))?
        {
            Some(fd) => fs::read_counter(fd.as_fd())
                .map_err(|e| io_err("cannot read the token counter", e))?
                .unwrap_or(0),
            None => 0,
        };
        let retired = self.root.retire(key, &dir, last)?;
        // Let go of the slots only now: whoever locks one next finds its directory is no
        // longer the key's. A semaphore's front waiter is poked to look.
        drop(slots);
        drop(waiting);
        if let Ok(gate) = fs::open_file(dir.as_fd(), "gate", false, share) {
            let _ = rustix::io::pwrite(&gate, b"\n", 0);
        }
        retired.remove();
        Ok(())
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
        // Clear our record while we still hold the lock, so a reader never sees it beside
        // someone else's lock; then unlock.
        let _ = rustix::io::pwrite(&held.fd, &empty_record(), 0);
        if fs::unlock(held.fd.as_fd()).is_ok() {
            self.put_back(&held.files, lease.slot, held.fd);
        } else {
            drop(held.fd); // closing surely drops the lock
        }
        if held.files.limit > 1 {
            self.poke_gate(&held.files);
        }
        Ok(Released::Released)
    }

    /// Wakes a semaphore's front waiter (it watches the directory with inotify).
    fn poke_gate(&self, files: &KeyFiles) {
        let mut gate = lock(&files.gate);
        if gate.is_none() {
            *gate = fs::open_file(files.dir.as_fd(), "gate", true, self.root.share).ok();
        }
        if let Some(fd) = gate.as_ref() {
            let _ = rustix::io::pwrite(fd, b"\n", 0);
        }
    }

    /// Reads a slot file's record, retrying a few times if a write was caught half done.
    fn read_contents(fd: BorrowedFd<'_>) -> Contents {
        let mut last = Contents::Unreadable("holder info unreadable".into());
        for _ in 0..3 {
            match fs::read_small(fd, "slot") {
                Ok(bytes) => match decode_record(&bytes) {
                    Contents::Unreadable(why) => last = Contents::Unreadable(why),
                    good => return good,
                },
                Err(e) => return Contents::Unreadable(format!("holder info unreadable: {e}")),
            }
            std::thread::yield_now();
        }
        last
    }
}

#[async_trait]
impl Store for DirStore {
    fn url(&self) -> &StoreUrl {
        &self.root.url
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new("at once: the kernel drops a dead holder's lock when its process exits")
            .with_bound(Recovery::AtOnce)
            .with_barrier(true)
            .with_delete(true)
    }

    async fn delete(&self, key: &Key) -> Result<(), Error> {
        self.delete_key(key)
    }

    async fn acquire(&self, req: &AcquireRequest) -> Result<Lease, Error> {
        let key = &req.key;
        // The kernel frees a dead holder's lock at once and says nothing: this mode never
        // learns that a lease was lost rather than released, so it cannot hold a slot
        // back. Ignoring the delay would drop a safety margin the caller asked for.
        if req.lock_delay.is_some_and(|d| !d.is_zero()) {
            return Err(self.root.err(
                ErrorKind::Unsupported,
                Op::Acquire,
                key,
                "kernel locks cannot have a lock-delay: the kernel frees a dead holder's lock at once without telling anyone it was lost (use dir:PATH?mode=lease)",
            ));
        }
        let (files, slot, fd) = self.take_slot(req).await?;
        let limit = files.limit;
        // From here on, an error drops `fd`, which releases the slot.
        let token = self.next_token(&files, key)?;
        let acquired_unix_ms = unix_ms_now();
        let record = HolderRecord {
            slot,
            token,
            acquired_unix_ms,
            holder: req.holder.clone(),
        };
        let body = serde_json::to_vec(&record).map_err(|e| {
            self.root.err(
                ErrorKind::Unavailable,
                Op::Acquire,
                key,
                format!("cannot encode holder info: {e}"),
            )
        })?;
        let bytes = encode_record(&body);
        match rustix::io::pwrite(&fd, &bytes, 0) {
            Ok(n) if n == bytes.len() => {}
            Ok(_) => {
                return Err(self.root.err(
                    ErrorKind::Unavailable,
                    Op::Acquire,
                    key,
                    "cannot write holder info: short write (disk full?)",
                ))
            }
            Err(e) => {
                return Err(self.root.io_err(
                    Op::Acquire,
                    key,
                    "cannot write holder info",
                    e.into(),
                ))
            }
        }
        lock(&self.held).insert(
            (key.clone(), slot, token.0),
            HeldSlot {
                fd,
                holder: req.holder.id,
                files,
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
            let mut status = SlotStatus::free(slot);
            let fd = match fs::open_existing_ro(dir.as_fd(), &Self::slot_name(slot)) {
                Ok(Some(fd)) => fd,
                Ok(None) => {
                    slots.push(status);
                    continue;
                }
                Err(e) => {
                    return Err(self.root.io_err(
                        Op::Inspect,
                        key,
                        &format!("bad slot file slot.{slot}"),
                        e,
                    ))
                }
            };
            let locked = fs::is_locked(fd.as_fd()).map_err(|e| {
                self.root
                    .io_err(Op::Inspect, key, "cannot test a slot's lock", e)
            })?;
            let contents = Self::read_contents(fd.as_fd());
            if locked {
                status.state = SlotState::Held;
            }
            match (locked, contents) {
                (true, Contents::Record(r)) if r.holder.liveness() != Liveness::Dead => {
                    status.token = Some(r.token);
                    status.since_unix_ms = Some(r.acquired_unix_ms);
                    status.holder = Some(r.holder);
                }
                (true, Contents::Record(_) | Contents::Empty) => {
                    status.note = Some("held; the holder has not written its info yet".into())
                }
                (_, Contents::Unreadable(why)) => status.note = Some(why),
                (false, Contents::Record(r)) => status = exited_slot(slot, r.token, &r.holder),
                (false, Contents::Empty) => {}
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
            // The kernel queues waiters out of sight: nobody can count them.
            waiters: None,
            last_token,
            lock_delay_ms: None,
        })
    }

    async fn list(&self) -> Result<Vec<Key>, Error> {
        self.root.list()
    }

    async fn barrier(&self, req: &BarrierRequest) -> Result<BarrierPassed, Error> {
        crate::barrier::barrier(&self.root, crate::barrier::Liveness::Kernel, req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_torn_ones_are_refused() {
        let holder = Holder::current(vec!["x".into()]);
        let body = serde_json::to_vec(&HolderRecord {
            slot: 0,
            token: Token(7),
            acquired_unix_ms: 1,
            holder,
        })
        .expect("json");
        let bytes = encode_record(&body);
        assert!(matches!(decode_record(&bytes), Contents::Record(r) if r.token == Token(7)));
        assert!(matches!(decode_record(&empty_record()), Contents::Empty));
        // An empty header over a longer old record: the old bytes are ignored.
        let mut over = bytes.clone();
        over[..HEADER_LEN].copy_from_slice(&empty_record());
        assert!(matches!(decode_record(&over), Contents::Empty));
        // Torn: a new header over an old body.
        let mut torn = bytes.clone();
        torn[HEADER_LEN + 3] ^= 1;
        assert!(matches!(decode_record(&torn), Contents::Unreadable(_)));
        assert!(matches!(
            decode_record(&bytes[..bytes.len() - 1]),
            Contents::Unreadable(_)
        ));
        assert!(matches!(
            decode_record(b"\x00\xffgarbage"),
            Contents::Unreadable(_)
        ));
        assert!(matches!(decode_record(b""), Contents::Empty));
    }
}
