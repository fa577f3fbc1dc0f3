//! `strata-csi fuse-disk`: a volume's NBD export as one file, `disk`, on a FUSE mount, for a
//! loop device to sit on when the kernel has neither ublk nor NBD. Unlike a fixed-size view, the
//! file follows the export: every stat asks the engine for the export's size (so a grown volume
//! grows the file, and `losetup --set-capacity` then the filesystem can follow), and a broken
//! connection (an engine restart) is re-established and the requests in flight retried instead
//! of failing the mount.
//!
//! Concurrent: the FUSE session thread reads a request from the kernel and sends it at once on
//! one pipelined NBD connection (`nbdclient::Client`) without waiting; the connection's reader
//! thread answers the kernel as each reply arrives, in any order. A request whose connection
//! broke goes to a retry thread, which reconnects and sends it again. The mount asks for
//! asynchronous direct I/O and 1 MiB requests, so a loop device with `--direct-io=on` above it
//! keeps many requests of a filesystem's size in flight.

use crate::nbdclient::{self, Client, NbdConn};
use crate::retrying::{Conn, Req};
use fuser::{
    consts, FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request,
};
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

pub use crate::nbdclient::Endpoint;

/// The FUSE mount's largest request, sent as one NBD request.
const MAX_REQ: usize = 1 << 20;
/// Requests the kernel may queue to the mount in the background (asynchronous direct I/O).
const MAX_BACKGROUND: u16 = 64;

const ROOT: u64 = 1;
const DISK: u64 = 2;
const TTL: Duration = Duration::ZERO;

struct Disk {
    conn: Arc<Conn>,
}

impl Disk {
    fn new(ep: Endpoint, export: &str, first: Arc<Client>) -> io::Result<Disk> {
        Ok(Disk { conn: Conn::start(ep, export, first)? })
    }

    /// Sends one request; `reply` answers the kernel when it completes.
    fn request(&self, cmd: u16, offset: u64, len: u32, payload: Arc<[u8]>, reply: impl FnOnce(Result<Vec<u8>, i32>) + Send + 'static) {
        self.conn.submit(Req { cmd, offset, len, payload, since: Instant::now(), reply: Box::new(reply) });
    }

    fn attr(&self, ino: u64, size: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT { (FileType::Directory, 0o755, 0, 2) } else { (FileType::RegularFile, 0o600, size, 1) };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for Disk {
    fn init(&mut self, _: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // Each is a request the kernel may decline; the mount works without it, only slower.
        if let Err(missing) = config.add_capabilities(consts::FUSE_ASYNC_DIO) {
            tracing::info!("the kernel does not offer FUSE capabilities {missing:#x}: direct I/O is synchronous");
        }
        let _ = config.set_max_write(MAX_REQ as u32);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        Ok(())
    }

    fn lookup(&mut self, _: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == "disk" {
            let size = self.conn.refresh_size();
            reply.entry(&TTL, &self.attr(DISK, size), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT => reply.attr(&TTL, &self.attr(ROOT, 0)),
            DISK => {
                let size = self.conn.refresh_size();
                reply.attr(&TTL, &self.attr(DISK, size));
            }
            _ => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == DISK {
            // This mount is the export's only writer on this node, so cached pages stay valid
            // across opens (a loop device without direct I/O reopens nothing, but blkid does).
            reply.opened(0, consts::FOPEN_KEEP_CACHE);
        } else {
            reply.error(libc::EISDIR);
        }
    }

    fn read(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, offset: i64, size: u32, _flags: i32, _lock: Option<u64>, reply: ReplyData) {
        let off = offset.max(0) as u64;
        let len = (size as u64).min(self.conn.size.load(Ordering::Relaxed).saturating_sub(off));
        if len == 0 {
            return reply.data(&[]);
        }
        if len > MAX_REQ as u64 {
            return reply.error(libc::EINVAL);
        }
        self.request(nbdclient::CMD_READ, off, len as u32, Arc::from([]), move |r| match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        });
    }

    fn write(
        &mut self,
        _: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _wf: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        let off = offset.max(0) as u64;
        if off + data.len() as u64 > self.conn.size.load(Ordering::Relaxed) {
            return reply.error(libc::ENOSPC);
        }
        if data.len() > MAX_REQ {
            return reply.error(libc::EINVAL);
        }
        // The session reuses its buffer for the next request.
        let n = data.len() as u32;
        self.request(nbdclient::CMD_WRITE, off, n, Arc::from(data), move |r| match r {
            Ok(_) => reply.written(n),
            Err(e) => reply.error(e),
        });
    }

    fn fsync(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        self.request(nbdclient::CMD_FLUSH, 0, 0, Arc::from([]), move |r| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn flush(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    /// Discards (a loop device punches holes for them) become NBD TRIM, zeroing becomes
    /// WRITE_ZEROES, when the export offers them; the file's size never changes.
    fn fallocate(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, offset: i64, length: i64, mode: i32, reply: ReplyEmpty) {
        let flags = self.conn.flags;
        let cmd = if mode == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE && flags & nbdclient::FLAG_SEND_TRIM != 0 {
            nbdclient::CMD_TRIM
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE && flags & nbdclient::FLAG_SEND_WRITE_ZEROES != 0 {
            nbdclient::CMD_WRITE_ZEROES
        } else {
            return reply.error(libc::EOPNOTSUPP);
        };
        let (off, len) = (offset.max(0) as u64, length.max(0) as u64);
        if off + len > self.conn.size.load(Ordering::Relaxed) || len > u32::MAX as u64 {
            return reply.error(libc::EINVAL);
        }
        self.request(cmd, off, len as u32, Arc::from([]), move |r| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn readdir(&mut self, _: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let entries = [(ROOT, FileType::Directory, "."), (ROOT, FileType::Directory, ".."), (DISK, FileType::RegularFile, "disk")];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Serves `export` as `<mountpoint>/disk` until the mount is unmounted.
pub fn serve(ep: Endpoint, export: &str, mountpoint: &Path) -> anyhow::Result<()> {
    let first = NbdConn::connect(&ep, export).and_then(Client::new).map_err(|e| anyhow::anyhow!("connecting to export {export}: {e}"))?;
    let disk = Disk::new(ep, export, first)?;
    let opts = [
        MountOption::FSName(format!("strata:{export}")),
        MountOption::Subtype("strata".into()),
        MountOption::RW,
        MountOption::NoExec,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    fuser::mount2(disk, mountpoint, &opts)?;
    Ok(())
}
