//! The node plugin's NBD client: the fixed-newstyle handshake (NBD_OPT_GO) to the local engine's
//! export, and `Client`, a pipelined transmission-phase client that many threads share: each
//! request is sent under a writer lock and waits for its own reply, which one reader thread
//! routes by handle as replies arrive (in any order). The FUSE view (`fusedisk`) keeps many
//! requests in flight through it; the kernel NBD path (`kernelnbd`) uses only the handshake and
//! hands the socket to the kernel.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

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
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Transmission flags (from the handshake) this client looks at.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Where the engine's NBD server listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

/// A connected socket of either kind.
#[derive(Debug)]
pub enum Sock {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Sock {
    fn connect(ep: &Endpoint) -> io::Result<Sock> {
        Ok(match ep {
            Endpoint::Unix(p) => Sock::Unix(std::os::unix::net::UnixStream::connect(p)?),
            Endpoint::Tcp(a) => {
                let t = std::net::TcpStream::connect(a)?;
                t.set_nodelay(true)?;
                Sock::Tcp(t)
            }
        })
    }

    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    pub fn fd(&self) -> RawFd {
        match self {
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn write_vectored(&mut self, b: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write_vectored(b),
            Sock::Tcp(s) => s.write_vectored(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket that finished the handshake for one export and is in the transmission phase.
pub struct NbdConn {
    pub sock: Sock,
    pub size: u64,
    /// Transmission flags from the handshake.
    pub flags: u16,
}

impl NbdConn {
    pub fn connect(ep: &Endpoint, export: &str) -> io::Result<NbdConn> {
        let mut s = Sock::connect(ep)?;
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
        Ok(NbdConn { sock: s, size, flags })
    }

    /// Ends the session politely (NBD_CMD_DISC).
    pub fn disconnect(mut self) {
        let _ = self.sock.write_all(&request_header(CMD_DISC, 0, 0, 0));
    }
}

/// The 28-byte header of a request.
pub fn request_header(cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut r = [0u8; 28];
    r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    r[6..8].copy_from_slice(&cmd.to_be_bytes());
    r[8..16].copy_from_slice(&handle.to_be_bytes());
    r[16..24].copy_from_slice(&offset.to_be_bytes());
    r[24..28].copy_from_slice(&len.to_be_bytes());
    r
}

/// A simple reply's header: (error, handle), or None when the magic is wrong.
pub fn parse_reply(h: &[u8; 16]) -> Option<(u32, u64)> {
    (be32(&h[0..4]) == SIMPLE_REPLY_MAGIC).then(|| (be32(&h[4..8]), be64(&h[8..16])))
}

/// What a request gets: the server's error (0 = success) and, for a read, its data.
pub type Answer = io::Result<(u32, Vec<u8>)>;

/// Called once with a request's answer, on the reader thread (or on the caller's, when the
/// request could not be sent).
pub type Done = Box<dyn FnOnce(Answer) + Send>;

struct Waiter {
    /// Bytes of payload that follow a successful reply (reads only).
    read_len: usize,
    done: Done,
}

/// A pipelined client over one connection. Any number of threads may submit at once; replies
/// are handed to each request's `Done` as they arrive. When the connection breaks, every request
/// in flight (and every later one) gets an error and the caller makes a new client.
pub struct Client {
    writer: Mutex<Sock>,
    waiters: Mutex<Waiters>,
    next: AtomicU64,
    broken: AtomicBool,
    pub size: u64,
    pub flags: u16,
}

#[derive(Default)]
struct Waiters {
    map: HashMap<u64, Waiter>,
    /// Set (under this lock) by the reader when it stops, so no request waits on a dead reader.
    closed: bool,
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the NBD connection is broken")
}

impl Client {
    /// A client over a connection that finished its handshake; starts its reader thread.
    pub fn new(conn: NbdConn) -> io::Result<Arc<Client>> {
        let reader = conn.sock.try_clone()?;
        let c = Arc::new(Client {
            writer: Mutex::new(conn.sock),
            waiters: Mutex::new(Waiters::default()),
            next: AtomicU64::new(1),
            broken: AtomicBool::new(false),
            size: conn.size,
            flags: conn.flags,
        });
        let weak = Arc::downgrade(&c);
        std::thread::Builder::new().name("nbd-reader".into()).spawn(move || read_replies(reader, weak))?;
        Ok(c)
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Marks the connection broken and shuts the socket, which stops the reader (and so fails
    /// every request in flight).
    pub fn kill(&self) {
        self.broken.store(true, Ordering::Release);
        self.writer.lock().shutdown();
    }

    /// Sends one request; `done` gets its answer later (data filled for reads). Returns at once.
    pub fn submit(&self, cmd: u16, offset: u64, len: u32, payload: &[u8], done: Done) {
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut w = self.waiters.lock();
            if w.closed || self.is_broken() {
                drop(w);
                return done(Err(broken()));
            }
            let read_len = if cmd == CMD_READ { len as usize } else { 0 };
            w.map.insert(handle, Waiter { read_len, done });
        }
        let head = request_header(cmd, handle, offset, len);
        let sent = {
            let mut s = self.writer.lock();
            write_all_vectored(&mut s, &head, payload)
        };
        if let Err(e) = sent {
            // The reader may have failed the request already; if not, it is failed here.
            let waiter = self.waiters.lock().map.remove(&handle);
            self.kill();
            if let Some(w) = waiter {
                (w.done)(Err(e));
            }
        }
    }

    /// Sends one request and waits for its answer.
    pub fn call(&self, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> Answer {
        let (tx, rx) = sync_channel(1);
        self.submit(
            cmd,
            offset,
            len,
            payload,
            Box::new(move |a| {
                let _ = tx.send(a);
            }),
        );
        rx.recv().unwrap_or_else(|_| Err(broken()))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.writer.get_mut().shutdown();
    }
}

/// Writes a header and a payload, in as few system calls as the socket takes.
fn write_all_vectored(s: &mut Sock, head: &[u8], payload: &[u8]) -> io::Result<()> {
    let total = head.len() + payload.len();
    let mut done = 0;
    while done < total {
        let n = if done < head.len() {
            s.write_vectored(&[io::IoSlice::new(&head[done..]), io::IoSlice::new(payload)])?
        } else {
            s.write(&payload[done - head.len()..])?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        done += n;
    }
    Ok(())
}

/// The reader thread: hands each reply to the request it answers, until the socket fails or the
/// client is dropped; then fails whatever still waits.
fn read_replies(mut s: Sock, client: std::sync::Weak<Client>) {
    let why = loop {
        let mut h = [0u8; 16];
        if let Err(e) = s.read_exact(&mut h) {
            break e;
        }
        let Some((err, handle)) = parse_reply(&h) else { break bad("a reply with a bad magic") };
        let Some(c) = client.upgrade() else { return };
        let Some(w) = c.waiters.lock().map.remove(&handle) else { break bad("a reply to no request in flight") };
        drop(c);
        let mut data = Vec::new();
        if err == 0 && w.read_len > 0 {
            data = vec![0u8; w.read_len];
            if let Err(e) = s.read_exact(&mut data) {
                (w.done)(Err(io::Error::new(e.kind(), e.to_string())));
                break e;
            }
        }
        (w.done)(Ok((err, data)));
    };
    if let Some(c) = client.upgrade() {
        if !c.is_broken() {
            tracing::warn!("NBD connection lost: {why}");
        }
        c.broken.store(true, Ordering::Release);
        let waiting: Vec<Waiter> = {
            let mut w = c.waiters.lock();
            w.closed = true;
            w.map.drain().map(|(_, w)| w).collect()
        };
        for w in waiting {
            (w.done)(Err(broken()));
        }
    }
    s.shutdown();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_reply_parse() {
        let h = request_header(CMD_WRITE, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..8], &[0, 0, 0, 1], "flags 0, command WRITE");
        assert_eq!(be64(&h[8..16]), 0x0102_0304_0506_0708);
        assert_eq!(be64(&h[16..24]), 4096);
        assert_eq!(be32(&h[24..28]), 512);
        let mut r = [0u8; 16];
        r[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        r[4..8].copy_from_slice(&5u32.to_be_bytes());
        r[8..16].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(parse_reply(&r), Some((5, 9)));
        r[0] = 0;
        assert_eq!(parse_reply(&r), None);
    }

    /// A server that answers requests out of order: every reply reaches the request it answers.
    #[test]
    fn replies_in_any_order_reach_their_requests() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut reqs = Vec::new();
            for _ in 0..8 {
                let mut h = [0u8; 28];
                b.read_exact(&mut h).unwrap();
                reqs.push((be64(&h[8..16]), be64(&h[16..24]), be32(&h[24..28])));
            }
            // Answer in reverse: each read returns its offset's low byte repeated.
            for (handle, off, len) in reqs.into_iter().rev() {
                let mut r = [0u8; 16];
                r[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                r[8..16].copy_from_slice(&handle.to_be_bytes());
                b.write_all(&r).unwrap();
                b.write_all(&vec![off as u8; len as usize]).unwrap();
            }
            b
        });
        let c = Client::new(NbdConn { sock: Sock::Unix(a), size: 1 << 20, flags: 0 }).unwrap();
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || c.call(CMD_READ, i, 100 + i as u32, &[]).unwrap())
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            let (err, data) = t.join().unwrap();
            assert_eq!(err, 0);
            assert_eq!(data, vec![i as u8; 100 + i]);
        }
        let b = server.join().unwrap();
        // The server goes away: a request in flight fails instead of waiting forever.
        let c2 = c.clone();
        let waiting = std::thread::spawn(move || c2.call(CMD_FLUSH, 0, 0, &[]));
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(b);
        assert!(waiting.join().unwrap().is_err());
        assert!(c.is_broken());
        assert!(c.call(CMD_FLUSH, 0, 0, &[]).is_err(), "a broken client refuses new requests");
    }
}
