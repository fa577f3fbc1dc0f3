//! Devices: a block device or a regular file, opened with O_DIRECT where the filesystem allows
//! it. Data I/O goes through io_uring (one ring thread per device handing completions back to
//! tokio) or, where io_uring is unavailable, through pread/pwrite on tokio's blocking pool.
//! Metadata I/O (superblock, journal) uses plain blocking calls.

mod buf;
pub mod discover;
mod file;
pub mod mem;
mod uring;
pub mod volatile;

pub use buf::{AlignedBuf, BufPool, ALIGN};
pub use file::{FileDevice, IoEngine, OpenOptions};

use futures::future::BoxFuture;
use std::io;
use std::ops::Range;

/// Result of a data I/O: the outcome and the buffer handed back to the caller.
pub type BufResult = (io::Result<()>, AlignedBuf);

/// What the pool needs from a device. Offsets and lengths are multiples of [`ALIGN`].
pub trait BlockIo: Send + Sync {
    /// Reads `buf[range]` from `offset`.
    fn read_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult>;
    /// Writes `buf[range]` at `offset`.
    fn write_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult>;
    /// fdatasync: everything written before is durable when this returns.
    fn sync(&self) -> BoxFuture<'static, io::Result<()>>;

    /// Blocking read for metadata (buffer must be aligned).
    fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Blocking write for metadata (buffer must be aligned).
    fn write_blocking(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    fn sync_blocking(&self) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zeroes.
    fn zero_range_blocking(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Gives the range back to the backing store where it can (hole punch); content undefined after.
    fn discard_blocking(&self, offset: u64, len: u64);

    fn size(&self) -> u64;
    fn describe(&self) -> DeviceDescription;
}

/// Facts about an open device, for `service pool show`.
#[derive(Debug, Clone)]
pub struct DeviceDescription {
    pub path: String,
    pub kind: &'static str,
    pub io_engine: &'static str,
    pub direct_io: bool,
}
