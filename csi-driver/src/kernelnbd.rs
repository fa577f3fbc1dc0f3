//! The kernel NBD driver through generic netlink (`--attach kernel-nbd`): the handshakes are
//! done here (`nbdclient::NbdConn`), then the sockets, already in the transmission phase, are
//! handed to the kernel with NBD_CMD_CONNECT (one per queue) and the volume appears as
//! `/dev/nbdN`. The device is set up to survive an engine restart: a request that gets no answer
//! for `io_timeout` is requeued, and while every socket is dead the kernel holds requests for up
//! to `dead_conn_timeout`; a `Keeper` thread watches the sockets and, when they die, connects
//! again and hands the kernel the new ones with NBD_CMD_RECONFIGURE, so the filesystem above
//! sees a pause, not an error. Messages come from `netlink` (unit-tested); the VM tier
//! (`e2e/vm/`) runs this against Debian's kernel.

use crate::nbdclient::{Endpoint, NbdConn};
use crate::netlink as nl;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a device is set up.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Sockets (and so hardware queues) per device.
    pub connections: u32,
    /// Seconds a request may go unanswered before the kernel gives its socket up and requeues it.
    pub io_timeout_secs: u64,
    /// Seconds the kernel holds requests while no socket is alive (an engine restart), before
    /// it fails them.
    pub dead_conn_timeout_secs: u64,
}

impl Default for Params {
    fn default() -> Params {
        Params { connections: 2, io_timeout_secs: 10, dead_conn_timeout_secs: 120 }
    }
}

/// Whether the kernel has the NBD driver loaded.
pub fn available() -> bool {
    Path::new("/sys/module/nbd").exists()
}

pub fn device(index: u32) -> String {
    format!("/dev/nbd{index}")
}

/// Where the node plugin remembers which /dev/nbdN serves a volume.
pub fn index_file(state: &Path, volume: &str) -> PathBuf {
    state.join(format!("{volume}.nbd"))
}

fn nl_err(e: nl::ParseError) -> io::Error {
    match e {
        nl::ParseError::Errno(n) => io::Error::from_raw_os_error(n),
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// A generic netlink socket, resolved to the "nbd" family.
struct Genl {
    fd: OwnedFd,
    seq: u32,
    family: u16,
}

impl Genl {
    fn open() -> io::Result<Genl> {
        // SAFETY: plain socket(2)/bind(2) calls; the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_GENERIC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        let r = unsafe {
            libc::bind(fd.as_raw_fd(), &sa as *const libc::sockaddr_nl as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_nl>() as u32)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut g = Genl { fd, seq: 0, family: 0 };
        let reply = g.call(nl::get_family)?;
        g.family = nl::family_id(&reply).map_err(nl_err)?;
        Ok(g)
    }

    /// Sends one request; returns its data reply (empty when the kernel only acknowledged).
    fn call(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> io::Result<Vec<u8>> {
        self.seq += 1;
        let seq = self.seq;
        let msg = build(seq);
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut data = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut b = &buf[..n as usize];
            while b.len() >= 16 {
                let len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                let mseq = u32::from_ne_bytes(b[8..12].try_into().expect("4 bytes"));
                if len < 16 || len > b.len() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
                }
                if mseq == seq {
                    if kind == nl::NLMSG_ERROR {
                        // An error, or the acknowledgement that ends the exchange.
                        nl::reply_attrs(&b[..len]).map_err(nl_err)?;
                        return Ok(data);
                    }
                    data = b[..len].to_vec();
                }
                b = &b[len.next_multiple_of(4).min(b.len())..];
            }
        }
    }
}

/// Connects a free /dev/nbdN to the export over `p.connections` sockets; returns its index and
/// the sockets (the kernel holds its own references; these are for a `Keeper` to watch).
pub fn connect(ep: &Endpoint, export: &str, p: Params) -> io::Result<(u32, Vec<NbdConn>)> {
    let mut g = Genl::open()?;
    let conns = (0..p.connections.max(1)).map(|_| NbdConn::connect(ep, export)).collect::<io::Result<Vec<_>>>()?;
    let c = nl::Connect {
        index: None,
        size: conns[0].size,
        // 512-byte sectors, as the FUSE view's loop device has: a filesystem made through one
        // attach path must mount through the other (xfs refuses a larger sector than its own).
        block_size: 512,
        timeout_secs: p.io_timeout_secs,
        dead_conn_timeout_secs: p.dead_conn_timeout_secs,
        server_flags: conns[0].flags as u64,
        fds: conns.iter().map(|c| c.sock.fd() as u32).collect(),
    };
    let family = g.family;
    let reply = g.call(|seq| nl::connect(family, seq, &c))?;
    Ok((nl::connected_index(&reply).map_err(nl_err)?, conns))
}

/// Hands the kernel new sockets for dead ones of device `index`.
fn reconnect(index: u32, fds: &[RawFd]) -> io::Result<()> {
    let mut g = Genl::open()?;
    let family = g.family;
    let fds: Vec<u32> = fds.iter().map(|f| *f as u32).collect();
    g.call(|seq| nl::reconfigure(family, seq, index, &fds, None)).map(|_| ())
}

/// Whether a socket's peer has gone (or the kernel shut it): polled, never read, since the
/// kernel owns the data on it.
fn hung_up(fds: &[RawFd], wait: Duration) -> Vec<usize> {
    let mut p: Vec<libc::pollfd> = fds.iter().map(|fd| libc::pollfd { fd: *fd, events: libc::POLLRDHUP, revents: 0 }).collect();
    // SAFETY: poll(2) over a slice of pollfd that lives across the call.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, wait.as_millis() as i32) };
    if n <= 0 {
        return Vec::new();
    }
    p.iter().enumerate().filter(|(_, p)| p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0).map(|(i, _)| i).collect()
}

/// Watches one device's sockets and replaces dead ones (see the module's doc).
struct Keeper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// The keepers of this node plugin's kernel NBD devices, by volume.
#[derive(Default)]
pub struct Keepers {
    by_volume: Mutex<HashMap<String, Keeper>>,
}

impl Keepers {
    /// Starts watching device `index` of `export`, whose sockets are `conns` (none for an adopted
    /// device).
    pub fn start(&self, index: u32, ep: Endpoint, export: &str, conns: Vec<NbdConn>, p: Params) {
        self.stop(export);
        let stop = Arc::new(AtomicBool::new(false));
        let (s, name) = (stop.clone(), export.to_string());
        let thread = std::thread::Builder::new()
            .name(format!("nbd{index}-keeper"))
            .spawn(move || keep(index, &ep, &name, conns, p, &s))
            .expect("spawning a thread");
        self.by_volume.lock().insert(export.to_string(), Keeper { stop, thread });
    }

    /// Watches the devices an earlier run of this plugin connected (their index files in
    /// `state`, still connected): their sockets are the kernel's alone, so these keepers have none
    /// to watch and go by requests that stay in flight instead (see `keep`).
    pub fn adopt(&self, state: &Path, ep: &Endpoint, p: Params) {
        let Ok(dir) = std::fs::read_dir(state) else { return };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(volume) = name.strip_suffix(".nbd") else { continue };
            let Some(index) = std::fs::read_to_string(e.path()).ok().and_then(|s| s.trim().parse::<u32>().ok()) else { continue };
            if !Path::new(&format!("/sys/block/nbd{index}/pid")).exists() {
                continue;
            }
            tracing::info!(device = %device(index), volume, "adopted a device connected by an earlier run of the plugin");
            self.start(index, ep.clone(), volume, Vec::new(), p);
        }
    }

    /// Stops watching (before a disconnect, which would look like a dead engine).
    pub fn stop(&self, export: &str) {
        if let Some(k) = self.by_volume.lock().remove(export) {
            k.stop.store(true, Ordering::Release);
            let _ = k.thread.join();
        }
    }
}

const POLL: Duration = Duration::from_millis(500);

/// Device `index`'s requests in flight and requests completed so far (reads + writes), from
/// sysfs (`stat`: fields 1 and 5 are reads and writes completed, field 9 requests in flight).
fn progress(index: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/sys/block/nbd{index}/stat")).unwrap_or_default();
    let f: Vec<u64> = stat.split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    (at(8), at(0) + at(4))
}

/// Whether a device's I/O is stuck: requests in flight and none completed since the last look.
struct Stuck {
    last: u64,
    polls: u32,
}

impl Stuck {
    fn new() -> Stuck {
        Stuck { last: 0, polls: 0 }
    }

    /// Looks again; true once I/O has made no progress for two looks in a row.
    fn check(&mut self, index: u32) -> bool {
        let (inflight, done) = progress(index);
        self.polls = if inflight > 0 && done == self.last { self.polls + 1 } else { 0 };
        self.last = done;
        if self.polls >= 2 {
            self.polls = 0;
            return true;
        }
        false
    }
}

/// Offers the kernel up to `n` new sockets for device `index`'s dead ones; returns how many
/// connections were made and handed over. The kernel answers success whether or not it had a
/// dead socket to replace (a spare one it just closes), so this cannot tell; `Stuck` tells later.
fn offer(index: u32, ep: &Endpoint, export: &str, n: u32) -> u32 {
    let mut offered = 0;
    for _ in 0..n.max(1) {
        let Ok(c) = NbdConn::connect(ep, export) else { break };
        if reconnect(index, &[c.sock.fd()]).is_err() {
            break;
        }
        // The kernel holds its own reference to the socket now.
        offered += 1;
    }
    offered
}

/// A device's keeper: reconnects at once when a socket it holds hangs up; and, when requests stay
/// in flight without completing for two polls in a row (the kernel may have given up a socket
/// this keeper does not hold, or, for an adopted device, holds them all), offers the kernel new
/// sockets. With no sockets, `hung_up` only waits a poll.
fn keep(index: u32, ep: &Endpoint, export: &str, mut conns: Vec<NbdConn>, p: Params, stop: &AtomicBool) {
    let mut stuck = Stuck::new();
    let whose = if conns.is_empty() { " (adopted device)" } else { "" };
    while !stop.load(Ordering::Acquire) {
        let fds: Vec<RawFd> = conns.iter().map(|c| c.sock.fd()).collect();
        let dead = hung_up(&fds, POLL);
        if dead.is_empty() {
            if stuck.check(index) {
                let n = offer(index, ep, export, p.connections);
                if n > 0 {
                    tracing::info!(device = %device(index), volume = export, offered = n, "I/O is stuck: offered the kernel new NBD connections{whose}");
                }
            }
            continue;
        }
        tracing::warn!(device = %device(index), volume = export, "{} of {} NBD connections lost: reconnecting", dead.len(), fds.len());
        let t0 = Instant::now();
        let mut fresh = Vec::new();
        // Connect again (the engine may take a while to come back), then hand the new sockets
        // over; the kernel takes them only once it has seen the old ones die.
        while !stop.load(Ordering::Acquire) && t0.elapsed() < Duration::from_secs(p.dead_conn_timeout_secs.max(1)) {
            while fresh.len() < dead.len() {
                match NbdConn::connect(ep, export) {
                    Ok(c) => fresh.push(c),
                    Err(e) => {
                        tracing::debug!(volume = export, "reconnecting: {e}");
                        break;
                    }
                }
            }
            if fresh.len() == dead.len() {
                let new_fds: Vec<RawFd> = fresh.iter().map(|c| c.sock.fd()).collect();
                match reconnect(index, &new_fds) {
                    Ok(()) => break,
                    Err(e) => tracing::debug!(device = %device(index), "RECONFIGURE: {e}"),
                }
            }
            std::thread::sleep(POLL);
        }
        if fresh.len() < dead.len() || stop.load(Ordering::Acquire) {
            if !stop.load(Ordering::Acquire) {
                tracing::error!(device = %device(index), volume = export, "the engine stayed unreachable for {}s: the device fails I/O", p.dead_conn_timeout_secs);
            }
            return;
        }
        tracing::info!(device = %device(index), volume = export, "NBD connections restored after {:?}", t0.elapsed());
        for (i, c) in dead.into_iter().zip(fresh) {
            conns[i] = c;
        }
    }
}

/// Tells the kernel the export's new size (after the volume grew).
pub fn resize(index: u32, size: u64) -> io::Result<()> {
    let mut g = Genl::open()?;
    let family = g.family;
    g.call(|seq| nl::reconfigure(family, seq, index, &[], Some(size))).map(|_| ())
}

pub fn disconnect(index: u32) -> io::Result<()> {
    let mut g = Genl::open()?;
    let family = g.family;
    g.call(|seq| nl::disconnect(family, seq, index)).map(|_| ())
}
