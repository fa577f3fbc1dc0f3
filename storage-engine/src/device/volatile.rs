//! A device with a volatile write cache, for power-loss tests: writes stay in this process's
//! memory until a sync writes them through, so killing the process (`kill -9`) loses exactly the
//! writes that were never flushed — what a power cut does to a disk's cache. Reads see the cached
//! writes. Zeroing and discarding go through at once (the simulation is stricter only about
//! writes). Enabled by the engine's test-only `--simulate-volatile-cache`.
//!
//! The simulation keeps a disk's ordering: a block stays in the cache (and is read from it)
//! until its write-through is on the inner device, and a zero or discard waits for a
//! write-through in progress, so it can never be undone by an older cached block landing
//! after it.

use super::{AlignedBuf, BlockIo, BufResult, DeviceDescription, ALIGN};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;

/// A cached 4 KiB block: the sequence number of its write, and its data.
type Block = (u64, Arc<[u8]>);

/// Unflushed 4 KiB blocks by device offset.
#[derive(Default)]
struct Cache {
    blocks: Mutex<BTreeMap<u64, Block>>,
    seq: AtomicU64,
    /// Counts write-throughs that took blocks out of the cache: a read of the inner device that
    /// overlapped one is read again (the block it missed there may have left the cache since).
    moved: AtomicU64,
    /// Held by a write-through for its whole run, and by zeroing and discarding.
    through: Mutex<()>,
}

pub struct VolatileCache {
    inner: Arc<dyn BlockIo>,
    cache: Arc<Cache>,
}

impl VolatileCache {
    pub fn new(inner: Arc<dyn BlockIo>) -> VolatileCache {
        VolatileCache { inner, cache: Arc::default() }
    }
}

impl Cache {
    fn put(&self, offset: u64, data: &[u8]) {
        let seq = self.seq.fetch_add(1, Relaxed);
        let mut d = self.blocks.lock();
        for (i, block) in data.chunks(ALIGN).enumerate() {
            d.insert(offset + (i * ALIGN) as u64, (seq, block.into()));
        }
    }

    /// Lays the cached blocks over `buf`, read from the inner device after `moved` read
    /// `before`; false when a write-through moved blocks meanwhile (read again).
    fn overlay(&self, before: u64, offset: u64, buf: &mut [u8]) -> bool {
        let d = self.blocks.lock();
        if self.moved.load(Acquire) != before {
            return false;
        }
        for (at, (_, block)) in d.range(offset..offset + buf.len() as u64) {
            let i = (at - offset) as usize;
            buf[i..i + ALIGN].copy_from_slice(block);
        }
        true
    }

    /// Drops the cached blocks of a range and runs `then` on the inner device, with no
    /// write-through in progress.
    fn forget_then<T>(&self, offset: u64, len: u64, then: impl FnOnce() -> T) -> T {
        let _t = self.through.lock();
        let mut d = self.blocks.lock();
        let gone: Vec<u64> = d.range(offset..offset + len).map(|(at, _)| *at).collect();
        for at in gone {
            d.remove(&at);
        }
        drop(d);
        then()
    }

    /// Writes every cached block through (blocking). A block leaves the cache only once it is
    /// on the inner device, and only if no newer write replaced it meanwhile.
    fn write_through(&self, inner: &dyn BlockIo) -> io::Result<()> {
        let _t = self.through.lock();
        let blocks: Vec<(u64, Block)> = self.blocks.lock().iter().map(|(at, b)| (*at, b.clone())).collect();
        let mut buf = AlignedBuf::new(ALIGN);
        for (at, (_, block)) in &blocks {
            buf.copy_from_slice(block);
            inner.write_blocking(*at, &buf)?;
        }
        inner.sync_blocking()?;
        let mut d = self.blocks.lock();
        self.moved.fetch_add(1, Release);
        for (at, (seq, _)) in blocks {
            if d.get(&at).is_some_and(|(s, _)| *s == seq) {
                d.remove(&at);
            }
        }
        Ok(())
    }
}

impl BlockIo for VolatileCache {
    fn read_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        let (inner, cache) = (self.inner.clone(), self.cache.clone());
        Box::pin(async move {
            let mut buf = buf;
            loop {
                let before = cache.moved.load(Acquire);
                let (r, mut b) = inner.read_at(offset, buf, range.clone()).await;
                if r.is_err() || cache.overlay(before, offset, &mut b[range.clone()]) {
                    return (r, b);
                }
                buf = b;
            }
        })
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        self.cache.put(offset, &buf[range]);
        Box::pin(async move { (Ok(()), buf) })
    }

    fn sync(&self) -> BoxFuture<'static, io::Result<()>> {
        let (inner, cache) = (self.inner.clone(), self.cache.clone());
        Box::pin(async move { tokio::task::spawn_blocking(move || cache.write_through(inner.as_ref())).await.map_err(io::Error::other)? })
    }

    fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        loop {
            let before = self.cache.moved.load(Acquire);
            self.inner.read_blocking(offset, buf)?;
            if self.cache.overlay(before, offset, buf) {
                return Ok(());
            }
        }
    }

    fn write_blocking(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.cache.put(offset, buf);
        Ok(())
    }

    fn sync_blocking(&self) -> io::Result<()> {
        self.cache.write_through(self.inner.as_ref())
    }

    fn zero_range_blocking(&self, offset: u64, len: u64) -> io::Result<()> {
        self.cache.forget_then(offset, len, || self.inner.zero_range_blocking(offset, len))
    }

    fn discard_blocking(&self, offset: u64, len: u64) {
        self.cache.forget_then(offset, len, || self.inner.discard_blocking(offset, len))
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

    /// A disk orders a zero after a write it completed earlier: a flush running at the same time
    /// never puts the older data back, and a read during the flush sees the cached write.
    #[test]
    fn a_flush_in_progress_neither_undoes_a_later_zero_nor_hides_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions { create_size: Some(1 << 20), io_engine: IoEngine::Sync, read_only: false, lock_wait: Default::default() };
        let file: Arc<dyn BlockIo> = Arc::new(FileDevice::open(&dir.path().join("d"), &opts).unwrap());
        let v = Arc::new(VolatileCache::new(file.clone()));
        let mut a = AlignedBuf::new(16 * ALIGN);
        a.fill(0xaa);
        let mut back = AlignedBuf::new(16 * ALIGN);
        for round in 0..300 {
            v.write_blocking(0, &a).unwrap();
            let flusher = {
                let v = v.clone();
                std::thread::spawn(move || v.sync_blocking().unwrap())
            };
            let mut seen = AlignedBuf::new(16 * ALIGN);
            v.read_blocking(0, &mut seen).unwrap();
            assert!(seen.iter().all(|b| *b == 0xaa), "round {round}: a completed write reads back while a flush runs");
            v.zero_range_blocking(0, 16 * ALIGN as u64).unwrap();
            flusher.join().unwrap();
            v.sync_blocking().unwrap();
            file.read_blocking(0, &mut back).unwrap();
            assert!(back.iter().all(|b| *b == 0), "round {round}: the zero after the write stays on the disk");
        }
    }
}
