//! Skeleton: replaced by the real directory store.
#![allow(missing_docs)]
use async_trait::async_trait;
use baton_core::*;
use std::path::PathBuf;

pub fn default_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/baton-{}", rustix::process::geteuid().as_raw()))
}

#[derive(Debug)]
pub struct DirStore {
    url: StoreUrl,
}

impl DirStore {
    pub fn open(url: &StoreUrl) -> Result<DirStore> {
        Ok(DirStore { url: url.clone() })
    }
}

#[async_trait]
impl Store for DirStore {
    fn url(&self) -> &StoreUrl {
        &self.url
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::new("at once")
    }
    async fn acquire(&self, _req: &AcquireRequest) -> Result<Lease> {
        Err(Error::new(ErrorKind::Unsupported, "skeleton"))
    }
    async fn release(&self, _lease: &Lease) -> Result<Released> {
        Err(Error::new(ErrorKind::Unsupported, "skeleton"))
    }
    async fn inspect(&self, _key: &Key) -> Result<KeyStatus> {
        Err(Error::new(ErrorKind::Unsupported, "skeleton"))
    }
    async fn list(&self) -> Result<Vec<Key>> {
        Err(Error::new(ErrorKind::Unsupported, "skeleton"))
    }
}
