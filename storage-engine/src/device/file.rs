//! A file or block device behind [`BlockIo`].

use super::uring::Uring;
use super::{AlignedBuf, BlockIo, BufResult, DeviceDescription};
use futures::future::BoxFuture;
use futures::FutureExt;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which data path a device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngine {
    /// io_uring when the kernel allows it, else pread/pwrite.
    Auto,
    /// io_uring; opening fails if it is unavailable.
    Uring,
    /// pread/pwrite on a thread pool.
    Sync,
}

#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Create a missing regular file of this size.
    pub create_size: Option<u64>,
    pub io_engine: IoEngine,
    /// Open read-only (offline check).
    pub read_only: bool,
    /// How long to wait for another holder of the device's lock to go away.
    pub lock_wait: std::time::Duration,
}

pub struct FileDevice {
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    block: bool,
    direct: bool,
    uring: Option<Uring>,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl FileDevice {
    pub fn open(path: &Path, opts: &OpenOptions) -> io::Result<FileDevice> {
        let exists = path.exists();
        if !exists {
            match opts.create_size {
                Some(size) if !opts.read_only => {
                    let f = File::create_new(path).map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
                    f.set_len(size)?;
                }
                _ => return Err(io::Error::new(io::ErrorKind::NotFound, format!("device {} does not exist", path.display()))),
            }
        }
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(!opts.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(false)?, false),
            Err(e) => return Err(io::Error::new(e.kind(), format!("opening {}: {e}", path.display()))),
        };
        let lock = if opts.read_only { libc::LOCK_SH } else { libc::LOCK_EX };
        // A process killed with io_uring requests in flight releases its file references (and so
        // its lock) only when the kernel has torn the ring down: wait a little before giving up.
        let t0 = std::time::Instant::now();
        // SAFETY: flock on a valid fd.
        while unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
            if t0.elapsed() >= opts.lock_wait {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, format!("device {} is in use by another process (locked)", path.display())));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let block = file.metadata()?.file_type().is_block_device();
        let size = if block {
            let mut sz: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut sz as *mut u64) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            sz
        } else {
            file.metadata()?.len()
        };
        let uring = match opts.io_engine {
            IoEngine::Sync => None,
            IoEngine::Uring => Some(Uring::start(file.as_raw_fd())?),
            IoEngine::Auto => match Uring::start(file.as_raw_fd()) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::warn!(device = %path.display(), "io_uring unavailable ({e}); using pread/pwrite");
                    None
                }
            },
        };
        Ok(FileDevice { path: path.to_path_buf(), file: Arc::new(file), size, block, direct, uring })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// The pread/pwrite fallback: runs `op` on tokio's blocking pool, handing the buffer back.
fn on_blocking_pool(
    file: Arc<File>,
    mut buf: AlignedBuf,
    op: impl FnOnce(&File, &mut AlignedBuf) -> io::Result<()> + Send + 'static,
) -> BoxFuture<'static, BufResult> {
    async move {
        let r = tokio::task::spawn_blocking(move || {
            let res = op(&file, &mut buf);
            (res, buf)
        })
        .await;
        r.unwrap_or_else(|e| (Err(io::Error::other(e)), AlignedBuf::new(0)))
    }
    .boxed()
}

impl BlockIo for FileDevice {
    fn read_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        if let Some(u) = &self.uring {
            return u.rw(false, offset, buf, range).boxed();
        }
        on_blocking_pool(self.file.clone(), buf, move |f, b| f.read_exact_at(&mut b[range], offset))
    }

    fn write_at(&self, offset: u64, buf: AlignedBuf, range: Range<usize>) -> BoxFuture<'static, BufResult> {
        if let Some(u) = &self.uring {
            return u.rw(true, offset, buf, range).boxed();
        }
        on_blocking_pool(self.file.clone(), buf, move |f, b| f.write_all_at(&b[range], offset))
    }

    fn sync(&self) -> BoxFuture<'static, io::Result<()>> {
        if let Some(u) = &self.uring {
            return u.fsync().boxed();
        }
        let file = self.file.clone();
        async move { tokio::task::spawn_blocking(move || file.sync_data()).await.map_err(io::Error::other)? }.boxed()
    }

    fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_blocking(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn sync_blocking(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn zero_range_blocking(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads a [u64; 2] through the pointer.
            if unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) } == 0 {
                return Ok(());
            }
        } else if self.fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len).is_ok() {
            return Ok(());
        }
        // Fallback: write zeroes.
        let chunk = AlignedBuf::new(1 << 20);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file.write_all_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    fn discard_blocking(&self, offset: u64, len: u64) {
        if !self.block {
            let _ = self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len);
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> DeviceDescription {
        DeviceDescription {
            path: self.path.display().to_string(),
            kind: if self.block { "block" } else { "file" },
            io_engine: if self.uring.is_some() { "io_uring" } else { "sync" },
            direct_io: self.direct,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_engines_round_trip_data() {
        let dir = tempfile::tempdir().unwrap();
        for engine in [IoEngine::Sync, IoEngine::Auto] {
            let path = dir.path().join(format!("{engine:?}.img"));
            let opts = OpenOptions { create_size: Some(1 << 20), io_engine: engine, read_only: false, lock_wait: Default::default() };
            let dev = FileDevice::open(&path, &opts).unwrap();
            assert_eq!(dev.size(), 1 << 20);
            let mut buf = AlignedBuf::new(8192);
            buf[..4096].fill(0xab);
            buf[4096..].fill(0xcd);
            let (r, buf) = dev.write_at(4096, buf, 4096..8192).await;
            r.unwrap();
            dev.sync().await.unwrap();
            let (r, out) = dev.read_at(4096, AlignedBuf::new(4096), 0..4096).await;
            r.unwrap();
            assert!(out.iter().all(|b| *b == 0xcd));
            drop(buf);
            dev.zero_range_blocking(4096, 4096).unwrap();
            let (r, out) = dev.read_at(4096, out, 0..4096).await;
            r.unwrap();
            assert!(out.iter().all(|b| *b == 0));
        }
    }

    #[test]
    fn a_locked_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let opts = OpenOptions { create_size: Some(1 << 20), io_engine: IoEngine::Sync, read_only: false, lock_wait: Default::default() };
        let _a = FileDevice::open(&path, &opts).unwrap();
        let err = FileDevice::open(&path, &opts).err().unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
