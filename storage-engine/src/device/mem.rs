//! Devices for tests that run in process: `MemDevice` keeps its blocks in memory (sparse: only
//! written 4 KiB blocks take memory), and `Faulty` wraps any device to fail reads or writes with
//! EIO or to delay them, switched at run time. (`volatile::VolatileCache` is the third double:
//! it drops unflushed writes, as a power cut does.)

use super::{AlignedBuf, BlockIo, BufResult, DeviceDescription, ALIGN};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A device in memory; blocks never written read as zeroes.
pub struct MemDevice {
    size: u64,
    blocks: Mutex<HashMap<u64, Box<[u8]>>>,
}

impl MemDevice {
    pub fn new(size: u64) -> MemDevice {
        MemDevice { size: size / ALIGN as u64 * ALIGN as u64, blocks: Mutex::default() }
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        if !offset.is_multiple_of(ALIGN as u64) || !len.is_multiple_of(ALIGN) || offset + len as u64 > self.size {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unaligned or out of range: {len} bytes at {offset}")));
        }
        Ok(())
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let b = self.blocks.lock();
        for (i, chunk) in buf.chunks_mut(ALIGN).enumerate() {
            match b.get(&(offset + (i * ALIGN) as u64)) {
                Some(block) => chunk.copy_from_slice(block),
                None => chunk.fill(0),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        let mut b = self.blocks.lock();
        for (i, chunk) in buf.chunks(ALIGN).enumerate() {
            b.insert(offset + (i * ALIGN) as u64, chunk.into());
        }
        Ok(())
    }

    fn forget(&self, offset: u64, len: u64) {
        let mut b = self.blocks.lock();
        let mut at = offset - offset % ALIGN as u64;
        while at < offset + len {
            b.remove(&at);
            at += ALIGN as u64;
        }
    }

    /// Bytes of memory the written blocks take.
    pub fn resident(&self) -> u64 {
        self.blocks.lock().len() as u64 * ALIGN as u64
    }
}

impl BlockIo for MemDevice {
    fn read_at(&self, offset: u64, mut buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        let r = self.read(offset, &mut buf[range]);
        Box::pin(async move { (r, buf) })
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        let r = self.write(offset, &buf[range]);
        Box::pin(async move { (r, buf) })
    }

    fn sync(&self) -> BoxFuture<'static, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read(offset, buf)
    }

    fn write_blocking(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write(offset, buf)
    }

    fn sync_blocking(&self) -> io::Result<()> {
        Ok(())
    }

    fn zero_range_blocking(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len as usize)?;
        self.forget(offset, len);
        Ok(())
    }

    fn discard_blocking(&self, offset: u64, len: u64) {
        self.forget(offset, len);
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> DeviceDescription {
        DeviceDescription { path: "memory".into(), kind: "memory (test)", io_engine: "none", direct_io: false }
    }
}

/// Faults switched on and off while a test runs.
#[derive(Default)]
pub struct Faults {
    /// Data writes (and syncs) fail with EIO.
    pub fail_writes: AtomicBool,
    /// Data reads fail with EIO.
    pub fail_reads: AtomicBool,
    /// Every data I/O waits this long first (milliseconds).
    pub delay_ms: AtomicU64,
}

impl Faults {
    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::Acquire))
    }
}

/// A device whose data path fails or stalls on demand (metadata I/O is left alone, so a pool
/// opens and its journal works: the faults are the data path's).
pub struct Faulty {
    inner: Arc<dyn BlockIo>,
    pub faults: Arc<Faults>,
}

impl Faulty {
    pub fn new(inner: Arc<dyn BlockIo>) -> Faulty {
        Faulty { inner, faults: Arc::default() }
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected EIO on {what}"))
}

impl BlockIo for Faulty {
    fn read_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        let (faults, fut) = (self.faults.clone(), self.inner.read_at(offset, buf, range));
        Box::pin(async move {
            tokio::time::sleep(faults.delay()).await;
            let (r, buf) = fut.await;
            if faults.fail_reads.load(Ordering::Acquire) {
                return (Err(eio("read")), buf);
            }
            (r, buf)
        })
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        let faults = self.faults.clone();
        if faults.fail_writes.load(Ordering::Acquire) {
            return Box::pin(async move { (Err(eio("write")), buf) });
        }
        let fut = self.inner.write_at(offset, buf, range);
        Box::pin(async move {
            tokio::time::sleep(faults.delay()).await;
            fut.await
        })
    }

    fn sync(&self) -> BoxFuture<'static, io::Result<()>> {
        let (faults, fut) = (self.faults.clone(), self.inner.sync());
        Box::pin(async move {
            if faults.fail_writes.load(Ordering::Acquire) {
                return Err(eio("sync"));
            }
            fut.await
        })
    }

    fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_blocking(offset, buf)
    }

    fn write_blocking(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_blocking(offset, buf)
    }

    fn sync_blocking(&self) -> io::Result<()> {
        self.inner.sync_blocking()
    }

    fn zero_range_blocking(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range_blocking(offset, len)
    }

    fn discard_blocking(&self, offset: u64, len: u64) {
        self.inner.discard_blocking(offset, len)
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn describe(&self) -> DeviceDescription {
        let mut d = self.inner.describe();
        d.kind = "fault-injecting (test)";
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_reads_back_writes_and_faults_switch_on_and_off() {
        let m = Arc::new(MemDevice::new(1 << 20));
        let mut a = AlignedBuf::new(2 * ALIGN);
        a.fill(7);
        m.write_blocking(ALIGN as u64, &a).unwrap();
        let mut back = AlignedBuf::new(3 * ALIGN);
        m.read_blocking(0, &mut back).unwrap();
        assert!(back[..ALIGN].iter().all(|b| *b == 0) && back[ALIGN..].iter().all(|b| *b == 7));
        assert_eq!(m.resident(), 2 * ALIGN as u64, "sparse");
        m.zero_range_blocking(ALIGN as u64, ALIGN as u64).unwrap();
        m.read_blocking(0, &mut back).unwrap();
        assert!(back[..2 * ALIGN].iter().all(|b| *b == 0) && back[2 * ALIGN..].iter().all(|b| *b == 7));
        assert!(m.read_blocking(1 << 20, &mut back).is_err(), "past the end");
        let f = Faulty::new(m.clone());
        let (r, buf) = f.write_at(0, a, 0..ALIGN).await;
        r.unwrap();
        f.faults.fail_writes.store(true, Ordering::Release);
        let (r, buf) = f.write_at(0, buf, 0..ALIGN).await;
        assert!(r.unwrap_err().to_string().contains("injected EIO"));
        assert!(f.sync().await.is_err());
        f.faults.fail_writes.store(false, Ordering::Release);
        f.faults.fail_reads.store(true, Ordering::Release);
        let (r, _) = f.read_at(0, buf, 0..ALIGN).await;
        assert!(r.is_err());
    }
}
