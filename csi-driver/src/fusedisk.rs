//! `strata-csi fuse-disk`: a volume's NBD export as one file, `disk`, on a FUSE mount, for a
//! loop device to sit on when the kernel has no NBD module. Unlike a fixed-size view, the file
//! follows the export: every stat asks the engine for the export's size (so a grown volume
//! grows the file, and `losetup --set-capacity` then the filesystem can follow), and a broken
//! connection (an engine restart) is re-established and the request retried instead of failing
//! the mount.
//!
//! The NBD client is minimal and blocking: fixed newstyle handshake, NBD_OPT_GO, simple
//! replies, one request at a time (the FUSE session is single-threaded).

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
};
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
/// Largest single NBD request sent (larger FUSE requests are split).
const MAX_REQ: usize = 1 << 20;
/// How long a broken connection is retried before requests fail with EIO.
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// Where the engine's NBD server listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One NBD connection to an export.
pub struct NbdConn {
    s: Box<dyn Stream>,
    pub size: u64,
    /// Transmission flags from the handshake.
    pub flags: u16,
    /// The socket (for handing it to the kernel NBD driver).
    pub fd: std::os::fd::RawFd,
    handle: u64,
}

impl NbdConn {
    pub fn connect(ep: &Endpoint, export: &str) -> io::Result<NbdConn> {
        use std::os::fd::AsRawFd;
        let (mut s, fd): (Box<dyn Stream>, _) = match ep {
            Endpoint::Unix(p) => {
                let u = std::os::unix::net::UnixStream::connect(p)?;
                let fd = u.as_raw_fd();
                (Box::new(u), fd)
            }
            Endpoint::Tcp(a) => {
                let t = std::net::TcpStream::connect(a)?;
                t.set_nodelay(true)?;
                let fd = t.as_raw_fd();
                (Box::new(t), fd)
            }
        };
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if be64(&hello[0..8]) != NBDMAGIC || be64(&hello[8..16]) != IHAVEOPT {
            return Err(bad("the server does not speak newstyle NBD"));
        }
        s.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let (magic, typ, len) = (be64(&h[0..8]), be32(&h[12..16]), be32(&h[16..20]) as usize);
            if magic != REPLY_MAGIC_OPT || len > 1 << 20 {
                return Err(bad("bad option reply"));
            }
            let mut body = vec![0u8; len];
            s.read_exact(&mut body)?;
            match typ {
                REP_ACK => break,
                REP_INFO if len >= 12 && u16::from_be_bytes([body[0], body[1]]) == INFO_EXPORT => {
                    size = Some(be64(&body[2..10]));
                    flags = u16::from_be_bytes([body[10], body[11]]);
                }
                REP_INFO => {}
                t if t & 0x8000_0000 != 0 => {
                    return Err(io::Error::new(io::ErrorKind::NotFound, format!("export {export}: {}", String::from_utf8_lossy(&body))));
                }
                _ => return Err(bad("unexpected option reply")),
            }
        }
        let size = size.ok_or_else(|| bad("the server sent no export size"))?;
        Ok(NbdConn { s, size, flags, fd, handle: 0 })
    }

    fn request(&mut self, cmd: u16, offset: u64, len: u32, payload: &[u8], out: &mut [u8]) -> io::Result<u32> {
        self.handle += 1;
        let mut r = Vec::with_capacity(28 + payload.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.s.write_all(&r)?;
        if cmd == CMD_DISC {
            return Ok(0);
        }
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if be32(&h[0..4]) != SIMPLE_REPLY_MAGIC || be64(&h[8..16]) != self.handle {
            return Err(bad("reply out of step"));
        }
        let err = be32(&h[4..8]);
        if err == 0 && cmd == CMD_READ {
            self.s.read_exact(out)?;
        }
        Ok(err)
    }

    pub fn read(&mut self, offset: u64, out: &mut [u8]) -> io::Result<u32> {
        let len = out.len() as u32;
        self.request(CMD_READ, offset, len, &[], out)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<u32> {
        self.request(CMD_WRITE, offset, data.len() as u32, data, &mut [])
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        self.request(CMD_FLUSH, 0, 0, &[], &mut [])
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[], &mut []);
    }
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

const ROOT: u64 = 1;
const DISK: u64 = 2;
const TTL: Duration = Duration::ZERO;

struct Disk {
    ep: Endpoint,
    export: String,
    conn: Option<NbdConn>,
    size: u64,
    /// Set when reconnecting failed for RECONNECT_FOR: requests then fail at once (after one
    /// connection attempt each) instead of each waiting the whole window again.
    gave_up: bool,
}

impl Disk {
    /// Runs `op` on the connection, reconnecting (for up to two minutes) when it breaks; an NBD
    /// error reply is returned as is.
    fn with_conn(&mut self, mut op: impl FnMut(&mut NbdConn) -> io::Result<u32>) -> Result<(), i32> {
        let t0 = Instant::now();
        loop {
            if self.conn.is_none() {
                match NbdConn::connect(&self.ep, &self.export) {
                    Ok(c) => {
                        self.size = c.size;
                        self.conn = Some(c);
                        self.gave_up = false;
                    }
                    Err(e) if !self.gave_up && t0.elapsed() < RECONNECT_FOR => {
                        tracing::warn!(export = %self.export, "reconnecting to the engine: {e}");
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                    Err(e) => {
                        if !self.gave_up {
                            tracing::error!(export = %self.export, "the engine stayed unreachable for {RECONNECT_FOR:?}: failing I/O until it is back: {e}");
                        }
                        self.gave_up = true;
                        return Err(libc::EIO);
                    }
                }
            }
            let c = self.conn.as_mut().expect("connected above");
            match op(c) {
                Ok(0) => return Ok(()),
                Ok(err) => return Err(err as i32),
                Err(e) => {
                    tracing::warn!(export = %self.export, "NBD connection broken, retrying: {e}");
                    self.conn = None;
                }
            }
        }
    }

    /// The export's size now (a new handshake: the volume may have grown).
    fn refresh_size(&mut self) {
        if let Ok(c) = NbdConn::connect(&self.ep, &self.export) {
            self.size = c.size;
            c.disconnect();
        }
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT { (FileType::Directory, 0o755, 0, 2) } else { (FileType::RegularFile, 0o600, self.size, 1) };
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
    fn lookup(&mut self, _: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == "disk" {
            self.refresh_size();
            reply.entry(&TTL, &self.attr(DISK), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT => reply.attr(&TTL, &self.attr(ROOT)),
            DISK => {
                self.refresh_size();
                reply.attr(&TTL, &self.attr(DISK));
            }
            _ => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == DISK {
            reply.opened(0, 0);
        } else {
            reply.error(libc::EISDIR);
        }
    }

    fn read(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, offset: i64, size: u32, _flags: i32, _lock: Option<u64>, reply: ReplyData) {
        let off = offset.max(0) as u64;
        let len = (size as u64).min(self.size.saturating_sub(off)) as usize;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_REQ);
            let at = off + done as u64;
            if let Err(e) = self.with_conn(|c| c.read(at, &mut buf[done..done + n])) {
                return reply.error(e);
            }
            done += n;
        }
        reply.data(&buf);
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
        if off + data.len() as u64 > self.size {
            return reply.error(libc::ENOSPC);
        }
        for (i, chunk) in data.chunks(MAX_REQ).enumerate() {
            let at = off + (i * MAX_REQ) as u64;
            if let Err(e) = self.with_conn(|c| c.write(at, chunk)) {
                return reply.error(e);
            }
        }
        reply.written(data.len() as u32);
    }

    fn fsync(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        match self.with_conn(|c| c.flush()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
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
    let conn = NbdConn::connect(&ep, export).map_err(|e| anyhow::anyhow!("connecting to export {export}: {e}"))?;
    let disk = Disk { ep, export: export.to_string(), size: conn.size, conn: Some(conn), gave_up: false };
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
