//! The kernel NBD driver through generic netlink (`--attach kernel-nbd`): the handshake is done
//! here (`fusedisk::NbdConn`), then the socket, already in the transmission phase, is handed to
//! the kernel with NBD_CMD_CONNECT and the volume appears as `/dev/nbdN`. Messages come from
//! `netlink` (unit-tested); this machine class has no `nbd` module, so this path is not exercised
//! by the test suite — the FUSE view (`fusedisk`) is the default.

use crate::fusedisk::{Endpoint, NbdConn};
use crate::netlink as nl;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

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

/// Connects a free /dev/nbdN to the export; returns its index.
pub fn connect(ep: &Endpoint, export: &str) -> io::Result<u32> {
    let mut g = Genl::open()?;
    let conn = NbdConn::connect(ep, export)?;
    let c =
        nl::Connect { index: None, size: conn.size, block_size: 4096, timeout_secs: 30, server_flags: conn.flags as u64, fds: vec![conn.fd as u32] };
    let family = g.family;
    let reply = g.call(|seq| nl::connect(family, seq, &c))?;
    // The kernel holds its own reference to the socket now.
    drop(conn);
    nl::connected_index(&reply).map_err(nl_err)
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
