//! The locks the benchmarks run: baton's directory store through the library (kernel mode,
//! and lease-file mode for benchmark 1 and the syscall count), and a raw `flock(2)` on one
//! open file. All block until granted unless asked not to wait.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use baton::{AcquireRequest, Holder, Key, Lease, Released, Store, Wait};

use crate::util::Result;

/// Which implementation a worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Impl {
    /// baton's directory store (`dir:PATH`), through the library.
    Baton,
    /// `flock(LOCK_EX)` / `flock(LOCK_UN)` on a file opened once.
    Flock,
    /// baton's directory store in lease-file mode (`dir:PATH?mode=lease`). Benchmark 1
    /// and the syscall count only: the multi-process benchmarks compare kernel locks.
    BatonLease,
}

impl Impl {
    /// The name used in results and reports.
    pub fn name(self) -> &'static str {
        match self {
            Impl::Baton => "baton",
            Impl::Flock => "flock",
            Impl::BatonLease => "baton-lease",
        }
    }
}

/// A blocking mutex.
pub trait BenchLock {
    /// Blocks until granted; returns the fencing token (0 when there is none).
    fn acquire(&mut self) -> Result<u64>;
    /// Releases what `acquire` took.
    fn release(&mut self) -> Result<()>;
}

/// Opens the lock `imp` names: for baton `target` is the store directory, for flock the
/// lock file.
pub fn open(imp: Impl, target: &Path, wait: Wait) -> Result<Box<dyn BenchLock>> {
    Ok(match imp {
        Impl::Baton => Box::new(BatonLock::open(target, "bench", wait)?),
        Impl::Flock => Box::new(RawFlock::open(target)?),
        Impl::BatonLease => Box::new(BatonLock::open_url(&lease_url(target), "bench", wait)?),
    })
}

/// The lease-file mode URL of the store directory `dir`.
pub fn lease_url(dir: &Path) -> String {
    format!("dir:{}?mode=lease", dir.display())
}

/// `flock(2)` on one open file description.
pub struct RawFlock {
    fd: OwnedFd,
}

impl RawFlock {
    /// Opens (creating) the lock file.
    pub fn open(path: &Path) -> Result<RawFlock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        Ok(RawFlock { fd: file.into() })
    }

    fn flock(&self, op: libc::c_int) -> Result<()> {
        loop {
            // SAFETY: fd is a valid open descriptor for the life of self.
            if unsafe { libc::flock(self.fd.as_raw_fd(), op) } == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("flock: {e}").into());
            }
        }
    }
}

impl BenchLock for RawFlock {
    fn acquire(&mut self) -> Result<u64> {
        self.flock(libc::LOCK_EX)?;
        Ok(0)
    }

    fn release(&mut self) -> Result<()> {
        self.flock(libc::LOCK_UN)
    }
}

/// baton's directory store (either mode), driven through the `Store` trait on a
/// current-thread runtime.
pub struct BatonLock {
    rt: tokio::runtime::Runtime,
    store: Arc<dyn Store>,
    req: AcquireRequest,
    lease: Option<Lease>,
}

impl BatonLock {
    /// Opens the directory store at `dir` and prepares a mutex request for `key`.
    pub fn open(dir: &Path, key: &str, wait: Wait) -> Result<BatonLock> {
        BatonLock::open_url(&format!("dir:{}", dir.display()), key, wait)
    }

    /// Opens the store `url` names (`baton::open` picks the mode) and prepares a mutex
    /// request for `key`.
    pub fn open_url(url: &str, key: &str, wait: Wait) -> Result<BatonLock> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let store = baton::open(url)?;
        let mut req =
            AcquireRequest::new(Key::new(key)?, Holder::current(vec!["baton-bench".into()]));
        req.wait = wait;
        Ok(BatonLock {
            rt,
            store,
            req,
            lease: None,
        })
    }

    /// Sets the lease time to live (lease stores such as SQLite require one).
    pub fn with_ttl(mut self, ttl: std::time::Duration) -> BatonLock {
        self.req.ttl = Some(ttl);
        self
    }

    /// `ops` uncontended acquire + release pairs inside one `block_on`, so the runtime's
    /// entry cost is not counted per operation. Returns the elapsed nanoseconds.
    pub fn uncontended(&mut self, ops: u64) -> Result<u64> {
        let store = &self.store;
        let req = &self.req;
        self.rt.block_on(async {
            let start = crate::util::now_ns();
            for _ in 0..ops {
                let lease = store.acquire(req).await?;
                if store.release(&lease).await? != Released::Released {
                    return Err("release answered not-held for a held lease".into());
                }
            }
            Ok(crate::util::now_ns() - start)
        })
    }
}

impl BenchLock for BatonLock {
    fn acquire(&mut self) -> Result<u64> {
        let lease = self.rt.block_on(self.store.acquire(&self.req))?;
        let token = lease.token.0;
        self.lease = Some(lease);
        Ok(token)
    }

    fn release(&mut self) -> Result<()> {
        let Some(lease) = self.lease.take() else {
            return Err("release without a lease".into());
        };
        match self.rt.block_on(self.store.release(&lease))? {
            Released::Released => Ok(()),
            Released::NotHeld => Err("release answered not-held for a held lease".into()),
        }
    }
}
