//! `strata-csi fuse-disk`: a volume's NBD export as one file, `disk`, on a FUSE mount, for a
//! loop device to sit on when the kernel has neither ublk nor NBD. Unlike a fixed-size view, the
//! file follows the export: every stat asks the engine for the export's size (so a grown volume
//! grows the file, and `losetup --set-capacity` then the filesystem can follow), and a broken
//! connection (an engine restart) is re-established and the requests in flight retried instead
//! of failing the mount.
//!
//! Concurrent: the FUSE session thread only reads requests and hands reads, writes, flushes and
//! discards to a pool of worker threads, which share one pipelined NBD connection
//! (`nbdclient::Client`); replies go back to the kernel as they complete. The mount asks for
//! asynchronous direct I/O and 1 MiB requests, so a loop device with `--direct-io=on` above it
//! keeps many requests of a filesystem's size in flight.

use crate::nbdclient::{self, Client, NbdConn};
use fuser::{
    consts, FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request,
};
use parking_lot::Mutex;
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

pub use crate::nbdclient::Endpoint;

/// Largest single NBD request sent (larger FUSE requests are split), and the FUSE mount's
/// largest request.
const MAX_REQ: usize = 1 << 20;
/// How long a broken connection is retried before requests fail with EIO.
const RECONNECT_FOR: Duration = Duration::from_secs(120);
/// Worker threads (requests in flight at the engine from one mount).
const WORKERS: usize = 32;
/// Requests the kernel may queue to the mount in the background (asynchronous direct I/O).
const MAX_BACKGROUND: u16 = 64;

const ROOT: u64 = 1;
const DISK: u64 = 2;
const TTL: Duration = Duration::ZERO;

/// The connection to the export, shared by the workers; re-made when it breaks.
struct Conn {
    ep: Endpoint,
    export: String,
    client: Mutex<Option<Arc<Client>>>,
    /// The export's size as last seen.
    size: AtomicU64,
    /// Set when reconnecting failed for RECONNECT_FOR: requests then fail at once (after one
    /// connection attempt each) instead of each waiting the whole window again.
    gave_up: AtomicBool,
}

impl Conn {
    /// The current client, connecting (and retrying for up to RECONNECT_FOR) when there is none
    /// or it broke. One thread connects while the others wait for it on the lock.
    fn client(&self, t0: Instant) -> Result<Arc<Client>, i32> {
        let mut cur = self.client.lock();
        loop {
            if let Some(c) = cur.as_ref().filter(|c| !c.is_broken()) {
                return Ok(c.clone());
            }
            match NbdConn::connect(&self.ep, &self.export).and_then(Client::new) {
                Ok(c) => {
                    self.size.store(c.size, Ordering::Relaxed);
                    if self.gave_up.swap(false, Ordering::Relaxed) || cur.is_some() {
                        tracing::info!(export = %self.export, "reconnected to the engine");
                    }
                    *cur = Some(c);
                }
                Err(e) if !self.gave_up.load(Ordering::Relaxed) && t0.elapsed() < RECONNECT_FOR => {
                    tracing::warn!(export = %self.export, "reconnecting to the engine: {e}");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => {
                    if !self.gave_up.swap(true, Ordering::Relaxed) {
                        tracing::error!(export = %self.export, "the engine stayed unreachable for {RECONNECT_FOR:?}: failing I/O until it is back: {e}");
                    }
                    return Err(libc::EIO);
                }
            }
        }
    }

    /// Runs one NBD request, on a new connection when the current one breaks (the request is
    /// sent again: reads, writes, flushes and discards can be repeated); an NBD error reply is
    /// returned as its errno.
    fn call(&self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Result<Vec<u8>, i32> {
        let t0 = Instant::now();
        loop {
            let c = self.client(t0)?;
            match c.call(cmd, offset, len, payload) {
                Ok((0, data)) => return Ok(data),
                Ok((err, _)) => return Err(err as i32),
                Err(e) => {
                    tracing::warn!(export = %self.export, "NBD connection broken, retrying: {e}");
                    c.kill();
                }
            }
        }
    }

    /// The export's size now (a new handshake: the volume may have grown).
    fn refresh_size(&self) -> u64 {
        if let Ok(c) = NbdConn::connect(&self.ep, &self.export) {
            self.size.store(c.size, Ordering::Relaxed);
            c.disconnect();
        }
        self.size.load(Ordering::Relaxed)
    }
}

type Job = Box<dyn FnOnce(&Conn) + Send>;

struct Disk {
    conn: Arc<Conn>,
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Disk {
    fn new(conn: Conn) -> io::Result<Disk> {
        let conn = Arc::new(conn);
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..WORKERS {
            let (rx, conn) = (rx.clone(), conn.clone());
            std::thread::Builder::new().name(format!("fuse-io-{i}")).spawn(move || loop {
                let job = rx.lock().recv();
                match job {
                    Ok(job) => job(&conn),
                    Err(_) => return,
                }
            })?;
        }
        Ok(Disk { conn, jobs: tx })
    }

    /// Runs `job` on a worker; the session thread goes on to the next request.
    fn spawn(&self, job: impl FnOnce(&Conn) + Send + 'static) {
        if let Err(e) = self.jobs.send(Box::new(job)) {
            // Only when every worker is gone; answer on this thread.
            (e.0)(&self.conn);
        }
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
        let len = (size as u64).min(self.conn.size.load(Ordering::Relaxed).saturating_sub(off)) as usize;
        self.spawn(move |conn| {
            if len <= MAX_REQ {
                return match conn.call(nbdclient::CMD_READ, off, len as u32, &[]) {
                    Ok(data) => reply.data(&data),
                    Err(e) => reply.error(e),
                };
            }
            let mut buf = Vec::with_capacity(len);
            while buf.len() < len {
                let n = (len - buf.len()).min(MAX_REQ);
                match conn.call(nbdclient::CMD_READ, off + buf.len() as u64, n as u32, &[]) {
                    Ok(data) => buf.extend_from_slice(&data),
                    Err(e) => return reply.error(e),
                }
            }
            reply.data(&buf);
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
        // The session reuses its buffer for the next request.
        let data = data.to_vec();
        self.spawn(move |conn| {
            for (i, chunk) in data.chunks(MAX_REQ).enumerate() {
                let at = off + (i * MAX_REQ) as u64;
                if let Err(e) = conn.call(nbdclient::CMD_WRITE, at, chunk.len() as u32, chunk) {
                    return reply.error(e);
                }
            }
            reply.written(data.len() as u32);
        });
    }

    fn fsync(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        self.spawn(move |conn| match conn.call(nbdclient::CMD_FLUSH, 0, 0, &[]) {
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
        let flags = self.conn.client.lock().as_ref().map_or(0, |c| c.flags);
        let cmd = if mode == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE && flags & nbdclient::FLAG_SEND_TRIM != 0 {
            nbdclient::CMD_TRIM
        } else if mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE && flags & nbdclient::FLAG_SEND_WRITE_ZEROES != 0 {
            nbdclient::CMD_WRITE_ZEROES
        } else {
            return reply.error(libc::EOPNOTSUPP);
        };
        let (off, len) = (offset.max(0) as u64, length.max(0) as u64);
        if off + len > self.conn.size.load(Ordering::Relaxed) {
            return reply.error(libc::EINVAL);
        }
        self.spawn(move |conn| {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(1 << 30);
                if let Err(e) = conn.call(cmd, off + done, n as u32, &[]) {
                    return reply.error(e);
                }
                done += n;
            }
            reply.ok();
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
    let conn =
        Conn { ep, export: export.to_string(), size: AtomicU64::new(first.size), client: Mutex::new(Some(first)), gave_up: AtomicBool::new(false) };
    let opts = [
        MountOption::FSName(format!("strata:{export}")),
        MountOption::Subtype("strata".into()),
        MountOption::RW,
        MountOption::NoExec,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    fuser::mount2(Disk::new(conn)?, mountpoint, &opts)?;
    Ok(())
}
