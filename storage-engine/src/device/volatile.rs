//! A device with a volatile write cache, for power-loss tests: writes stay in this process's
//! memory until a sync writes them through, so killing the process (`kill -9`) loses exactly the
//! writes that were never flushed — what a power cut does to a disk's cache. Reads see the cached
//! writes. Zeroing and discarding go through at once (the simulation is stricter only about
//! writes). Enabled by the engine's test-only `--simulate-volatile-cache`.

use super::{AlignedBuf, BlockIo, BufResult, DeviceDescription, ALIGN};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;

pub struct VolatileCache {
    inner: Arc<dyn BlockIo>,
    /// Unflushed 4 KiB blocks by device offset.
    dirty: Arc<Mutex<BTreeMap<u64, Box<[u8]>>>>,
}

impl VolatileCache {
    pub fn new(inner: Arc<dyn BlockIo>) -> VolatileCache {
        VolatileCache { inner, dirty: Arc::default() }
    }

    fn put(dirty: &Mutex<BTreeMap<u64, Box<[u8]>>>, offset: u64, data: &[u8]) {
        let mut d = dirty.lock();
        for (i, block) in data.chunks(ALIGN).enumerate() {
            d.insert(offset + (i * ALIGN) as u64, block.into());
        }
    }

    fn overlay(dirty: &Mutex<BTreeMap<u64, Box<[u8]>>>, offset: u64, buf: &mut [u8]) {
        let d = dirty.lock();
        for (at, block) in d.range(offset..offset + buf.len() as u64) {
            let i = (at - offset) as usize;
            buf[i..i + ALIGN].copy_from_slice(block);
        }
    }

    fn forget(&self, offset: u64, len: u64) {
        let mut d = self.dirty.lock();
        let gone: Vec<u64> = d.range(offset..offset + len).map(|(k, _)| *k).collect();
        for k in gone {
            d.remove(&k);
        }
    }

    /// Writes every cached block through (blocking).
    fn write_through(inner: &dyn BlockIo, dirty: &Mutex<BTreeMap<u64, Box<[u8]>>>) -> io::Result<()> {
        let blocks = std::mem::take(&mut *dirty.lock());
        let mut buf = AlignedBuf::new(ALIGN);
        for (at, block) in blocks {
            buf.copy_from_slice(&block);
            inner.write_blocking(at, &buf)?;
        }
        inner.sync_blocking()
    }
}

impl BlockIo for VolatileCache {
    fn read_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        let (fut, dirty) = (self.inner.read_at(offset, buf, range.clone()), self.dirty.clone());
        Box::pin(async move {
            let (r, mut buf) = fut.await;
            if r.is_ok() {
                Self::overlay(&dirty, offset, &mut buf[range]);
            }
            (r, buf)
        })
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        Self::put(&self.dirty, offset, &buf[range]);
        Box::pin(async move { (Ok(()), buf) })
    }

    fn sync(&self) -> BoxFuture<'static, io::Result<()>> {
        let (inner, dirty) = (self.inner.clone(), self.dirty.clone());
        Box::pin(async move { tokio::task::spawn_blocking(move || Self::write_through(inner.as_ref(), &dirty)).await.map_err(io::Error::other)? })
    }

    fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_blocking(offset, buf)?;
        Self::overlay(&self.dirty, offset, buf);
        Ok(())
    }

    fn write_blocking(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        Self::put(&self.dirty, offset, buf);
        Ok(())
    }

    fn sync_blocking(&self) -> io::Result<()> {
        Self::write_through(self.inner.as_ref(), &self.dirty)
    }

    fn zero_range_blocking(&self, offset: u64, len: u64) -> io::Result<()> {
        self.forget(offset, len);
        self.inner.zero_range_blocking(offset, len)
    }

    fn discard_blocking(&self, offset: u64, len: u64) {
        self.forget(offset, len);
        self.inner.discard_blocking(offset, len)
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn describe(&self) -> DeviceDescription {
        let mut d = self.inner.describe();
        d.kind = "file (simulated volatile cache)";
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{FileDevice, IoEngine, OpenOptions};

    #[test]
    fn unflushed_writes_are_seen_but_only_flushed_ones_reach_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions { create_size: Some(1 << 20), io_engine: IoEngine::Sync, read_only: false, lock_wait: Default::default() };
        let file: Arc<dyn BlockIo> = Arc::new(FileDevice::open(&dir.path().join("d"), &opts).unwrap());
        let v = VolatileCache::new(file.clone());
        let mut a = AlignedBuf::new(ALIGN);
        a.fill(0xaa);
        v.write_blocking(8192, &a).unwrap();
        let mut back = AlignedBuf::new(3 * ALIGN);
        v.read_blocking(4096, &mut back).unwrap();
        assert!(back[4096..8192].iter().all(|b| *b == 0xaa) && back[..4096].iter().all(|b| *b == 0), "the cache is read");
        file.read_blocking(4096, &mut back).unwrap();
        assert!(back.iter().all(|b| *b == 0), "not on the disk before a flush");
        v.sync_blocking().unwrap();
        file.read_blocking(4096, &mut back).unwrap();
        assert!(back[4096..8192].iter().all(|b| *b == 0xaa), "on the disk after it");
    }
}
