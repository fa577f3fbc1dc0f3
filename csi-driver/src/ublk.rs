//! ublk (Linux's userspace block driver, `ublk_drv`): a volume as `/dev/ublkbN`, served by
//! `strata-csi ublk-disk`, one helper process per staged volume, over the same restart-proof NBD
//! connection as the FUSE view (`retrying`).
//!
//! The helper adds the device through `/dev/ublk-control` (io_uring commands, ioctl-encoded),
//! sets its parameters (512-byte logical sectors like the loop and NBD paths, so a filesystem made
//! on one path mounts on the others; discard and write-zeroes when the export has them; a volatile
//! cache when the export takes flushes), and runs one thread per hardware queue. Each queue thread
//! owns an io_uring on `/dev/ublkcN`: one FETCH command per tag waits for a request; the request's
//! descriptor (shared memory, mapped from the char device) says what to do; it goes to the engine
//! as an NBD request at once, and when the answer comes back (on the NBD reader thread) it is
//! handed to the queue thread through an eventfd, which commits it and fetches the tag's next
//! request in one command. Many requests per queue are in flight.
//!
//! Devices are made with user recovery (`UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`):
//! when a helper dies the kernel holds the device's I/O (and requeues what the helper had), and a
//! new helper takes the device over (START/END_USER_RECOVERY); the filesystem above sees a pause.
//! An engine restart does not even reach the kernel: the helper's connection reconnects and sends
//! its requests again. The node plugin's keeper (`Keepers`) starts the new helper.
//!
//! Facts (command numbers, structure layouts, flags) are from the kernel's UAPI header
//! `include/uapi/linux/ublk_cmd.h`.

use crate::attach::{self, AttachError};
use crate::nbdclient::{self, Client, Endpoint, NbdConn};
use crate::retrying::{Conn, Req};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONTROL: &str = "/dev/ublk-control";

/// `_IOC(dir, 'u', nr, size)`.
const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_R: u32 = 2;
const IOC_RW: u32 = 3;
/// sizeof(struct ublksrv_ctrl_cmd), sizeof(struct ublksrv_io_cmd).
const CTRL_CMD: u32 = 32;
const IO_CMD: u32 = 16;
const CMD_GET_DEV_INFO: u32 = ioc(IOC_R, 0x02, CTRL_CMD);
const CMD_ADD_DEV: u32 = ioc(IOC_RW, 0x04, CTRL_CMD);
const CMD_DEL_DEV: u32 = ioc(IOC_RW, 0x05, CTRL_CMD);
const CMD_START_DEV: u32 = ioc(IOC_RW, 0x06, CTRL_CMD);
const CMD_STOP_DEV: u32 = ioc(IOC_RW, 0x07, CTRL_CMD);
const CMD_SET_PARAMS: u32 = ioc(IOC_RW, 0x08, CTRL_CMD);
const CMD_START_USER_RECOVERY: u32 = ioc(IOC_RW, 0x10, CTRL_CMD);
const CMD_END_USER_RECOVERY: u32 = ioc(IOC_RW, 0x11, CTRL_CMD);
const CMD_GET_FEATURES: u32 = ioc(IOC_R, 0x13, CTRL_CMD);
const CMD_UPDATE_SIZE: u32 = ioc(IOC_RW, 0x15, CTRL_CMD);
const IO_FETCH_REQ: u32 = ioc(IOC_RW, 0x20, IO_CMD);
const IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_RW, 0x21, IO_CMD);

pub const F_USER_RECOVERY: u64 = 1 << 3;
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
pub const F_UPDATE_SIZE: u64 = 1 << 10;

pub const S_DEV_DEAD: u16 = 0;
pub const S_DEV_LIVE: u16 = 1;
pub const S_DEV_QUIESCED: u16 = 2;

const OP_READ: u8 = 0;
const OP_WRITE: u8 = 1;
const OP_FLUSH: u8 = 2;
const OP_DISCARD: u8 = 3;
const OP_WRITE_ZEROES: u8 = 5;

const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
const PARAM_TYPE_BASIC: u32 = 1 << 0;
const PARAM_TYPE_DISCARD: u32 = 1 << 1;
/// Descriptors of queue q start at q × UBLK_MAX_QUEUE_DEPTH × sizeof(struct ublksrv_io_desc).
const MAX_QUEUE_DEPTH: u64 = 4096;
/// The largest discard or zeroing asked of the engine at once.
const MAX_DISCARD: u32 = 64 << 20;
/// NBD_FLAG_SEND_FLUSH.
const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;

/// struct ublksrv_ctrl_dev_info.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    pub state: u16,
    pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pad1: u32,
    pub flags: u64,
    ublksrv_flags: u64,
    owner_uid: u32,
    owner_gid: u32,
    reserved1: u64,
    reserved2: u64,
}

/// struct ublk_param_basic.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct ParamBasic {
    attrs: u32,
    logical_bs_shift: u8,
    physical_bs_shift: u8,
    io_opt_shift: u8,
    io_min_shift: u8,
    max_sectors: u32,
    chunk_sectors: u32,
    dev_sectors: u64,
    virt_boundary_mask: u64,
}

/// struct ublk_param_discard.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct ParamDiscard {
    discard_alignment: u32,
    discard_granularity: u32,
    max_discard_sectors: u32,
    max_write_zeroes_sectors: u32,
    max_discard_segments: u16,
    reserved0: u16,
}

/// The head of struct ublk_params: its length, the types present, basic and discard.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Params {
    len: u32,
    types: u32,
    basic: ParamBasic,
    discard: ParamDiscard,
}

/// struct ublksrv_io_desc: one request, written by the kernel into the shared descriptor area.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct IoDesc {
    op_flags: u32,
    nr_sectors: u32,
    start_sector: u64,
    addr: u64,
}

const _: () = assert!(std::mem::size_of::<DevInfo>() == 64);
const _: () = assert!(std::mem::size_of::<ParamBasic>() == 32);
const _: () = assert!(std::mem::size_of::<ParamDiscard>() == 20);
const _: () = assert!(std::mem::size_of::<IoDesc>() == 24);

/// Whether this kernel has ublk (the control device exists: `modprobe ublk_drv`).
pub fn available() -> bool {
    Path::new(CONTROL).exists()
}

/// The ublk features this kernel has (UBLK_U_CMD_GET_FEATURES), or None without ublk.
pub fn features() -> Option<u64> {
    Control::open().ok()?.features().ok()
}

/// Whether `auto` should take ublk: the driver is there, recovers devices whose helper died
/// (reissuing what it had), and can change a live device's size (expansion online).
pub fn preferred(features: Option<u64>) -> bool {
    features.is_some_and(|f| {
        f & (F_USER_RECOVERY | F_USER_RECOVERY_REISSUE | F_UPDATE_SIZE) == (F_USER_RECOVERY | F_USER_RECOVERY_REISSUE | F_UPDATE_SIZE)
    })
}

pub fn device(id: u32) -> String {
    format!("/dev/ublkb{id}")
}

/// The control device: one command at a time on a small io_uring of 128-byte entries.
pub struct Control {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    fd: File,
}

impl Control {
    pub fn open() -> io::Result<Control> {
        let fd = OpenOptions::new().read(true).write(true).open(CONTROL)?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(Control { ring, fd })
    }

    /// One control command (struct ublksrv_ctrl_cmd: dev_id, queue_id = -1, len, addr, data[0]).
    fn cmd(&mut self, op: u32, dev_id: u32, data: u64, buf: *mut u8, len: usize) -> io::Result<i32> {
        let mut c = [0u8; 80];
        c[0..4].copy_from_slice(&dev_id.to_ne_bytes());
        c[4..6].copy_from_slice(&u16::MAX.to_ne_bytes());
        c[6..8].copy_from_slice(&(len as u16).to_ne_bytes());
        c[8..16].copy_from_slice(&(buf as u64).to_ne_bytes());
        c[16..24].copy_from_slice(&data.to_ne_bytes());
        let e = opcode::UringCmd80::new(types::Fd(self.fd.as_raw_fd()), op).cmd(c).build();
        // SAFETY: the entry's buffer (if any) outlives the command, which completes before return.
        unsafe { self.ring.submission().push(&e) }.map_err(|_| io::Error::other("the ublk control ring is full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            if let Some(cqe) = self.ring.completion().next() {
                return match cqe.result() {
                    r if r < 0 => Err(io::Error::from_raw_os_error(-r)),
                    r => Ok(r),
                };
            }
        }
    }

    pub fn features(&mut self) -> io::Result<u64> {
        let mut f = 0u64;
        self.cmd(CMD_GET_FEATURES, 0, 0, (&mut f as *mut u64).cast(), 8)?;
        Ok(f)
    }

    pub fn info(&mut self, id: u32) -> io::Result<DevInfo> {
        let mut info = DevInfo::default();
        self.cmd(CMD_GET_DEV_INFO, id, 0, (&mut info as *mut DevInfo).cast(), std::mem::size_of::<DevInfo>())?;
        Ok(info)
    }

    /// Adds a device (the kernel picks its id); the kernel's view of it.
    fn add(&mut self, mut info: DevInfo) -> io::Result<DevInfo> {
        info.dev_id = u32::MAX;
        self.cmd(CMD_ADD_DEV, u32::MAX, 0, (&mut info as *mut DevInfo).cast(), std::mem::size_of::<DevInfo>())?;
        Ok(info)
    }

    fn set_params(&mut self, id: u32, mut p: Params) -> io::Result<()> {
        p.len = std::mem::size_of::<Params>() as u32;
        self.cmd(CMD_SET_PARAMS, id, 0, (&mut p as *mut Params).cast(), std::mem::size_of::<Params>()).map(drop)
    }

    /// Starts the device once every queue has fetched; `pid` is the serving process.
    fn start(&mut self, id: u32, pid: u32) -> io::Result<()> {
        self.cmd(CMD_START_DEV, id, pid as u64, std::ptr::null_mut(), 0).map(drop)
    }

    fn start_recovery(&mut self, id: u32) -> io::Result<()> {
        self.cmd(CMD_START_USER_RECOVERY, id, 0, std::ptr::null_mut(), 0).map(drop)
    }

    fn end_recovery(&mut self, id: u32, pid: u32) -> io::Result<()> {
        self.cmd(CMD_END_USER_RECOVERY, id, pid as u64, std::ptr::null_mut(), 0).map(drop)
    }

    /// Removes the block device; the helper's queues see their commands aborted and end.
    pub fn stop(&mut self, id: u32) -> io::Result<()> {
        self.cmd(CMD_STOP_DEV, id, 0, std::ptr::null_mut(), 0).map(drop)
    }

    /// Deletes a stopped device; waits until its char device is closed.
    pub fn delete(&mut self, id: u32) -> io::Result<()> {
        self.cmd(CMD_DEL_DEV, id, 0, std::ptr::null_mut(), 0).map(drop)
    }

    /// Gives a live device a new size (kernels with UBLK_F_UPDATE_SIZE).
    pub fn update_size(&mut self, id: u32, bytes: u64) -> io::Result<()> {
        self.cmd(CMD_UPDATE_SIZE, id, bytes >> 9, std::ptr::null_mut(), 0).map(drop)
    }
}

/// How the helper shapes the device.
#[derive(Debug, Clone, Copy)]
pub struct Opts {
    pub queues: u16,
    pub depth: u16,
    /// The largest request (bytes): each tag has a buffer this big.
    pub max_io: u32,
}

impl Default for Opts {
    fn default() -> Opts {
        Opts { queues: 2, depth: 64, max_io: 256 << 10 }
    }
}

/// What the helper leaves in the state directory: the device's id and the serving process.
pub fn state_file(state: &Path, volume: &str) -> PathBuf {
    state.join(format!("{volume}.ublk"))
}

fn log_file(state: &Path, volume: &str) -> PathBuf {
    state.join(format!("{volume}.ublk.log"))
}

/// (device id, helper pid) from a state file.
pub fn read_state(path: &Path) -> Option<(u32, i32)> {
    let s = std::fs::read_to_string(path).ok()?;
    let mut it = s.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn write_state(path: &Path, id: u32) -> io::Result<()> {
    let tmp = path.with_extension("ublk.tmp");
    std::fs::write(&tmp, format!("{id} {}\n", std::process::id()))?;
    std::fs::rename(tmp, path)
}

/// Whether `pid` is a running ublk helper. A helper that ended is reaped here if it is our child
/// (one this plugin started, or inherited as a container's PID 1), and a zombie or a process that
/// reused the pid counts as gone.
fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: waitpid(2) without blocking; ECHILD when it is not our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let running = stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'));
    running && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"ublk-disk"))
}

/// An anonymous or device mapping, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(len: usize, prot: i32, flags: i32, fd: RawFd, offset: u64) -> io::Result<Map> {
        // SAFETY: a fresh mapping of `len` bytes; the kernel checks fd and offset.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, offset as libc::off_t) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map { ptr: ptr.cast(), len })
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One queue's answers from the NBD reader: (tag, result, data read).
type Answers = Arc<Mutex<Vec<(u16, i32, Vec<u8>)>>>;

const EVENT: u64 = u64::MAX;

fn io_cmd(op: u32, fd: RawFd, q: u16, tag: u16, result: i32, addr: u64) -> squeue::Entry {
    let mut c = [0u8; 16];
    c[0..2].copy_from_slice(&q.to_ne_bytes());
    c[2..4].copy_from_slice(&tag.to_ne_bytes());
    c[4..8].copy_from_slice(&result.to_ne_bytes());
    c[8..16].copy_from_slice(&addr.to_ne_bytes());
    opcode::UringCmd16::new(types::Fd(fd), op).cmd(c).build().user_data(tag as u64)
}

/// One hardware queue: its ring, descriptors and buffers. Runs on its own thread until every
/// tag's command is aborted (the device stopped).
struct Queue {
    q: u16,
    depth: u16,
    max_io: usize,
    cdev: Arc<File>,
    conn: Arc<Conn>,
}

impl Queue {
    fn run(self, ready: std::sync::mpsc::Sender<io::Result<()>>) -> io::Result<()> {
        let page = 4096usize;
        let desc_len = (self.depth as usize * std::mem::size_of::<IoDesc>()).div_ceil(page) * page;
        let setup = || -> io::Result<(IoUring, Map, Map, OwnedFd)> {
            let fd = self.cdev.as_raw_fd();
            let off = self.q as u64 * MAX_QUEUE_DEPTH * std::mem::size_of::<IoDesc>() as u64;
            let descs = Map::new(desc_len, libc::PROT_READ, libc::MAP_SHARED | libc::MAP_POPULATE, fd, off)?;
            let bufs =
                Map::new(self.depth as usize * self.max_io, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)?;
            let ring = IoUring::new((self.depth as u32 * 2).next_power_of_two())?;
            // SAFETY: eventfd(2) returns a new descriptor or -1.
            let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if efd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: efd is a new descriptor owned here.
            Ok((ring, descs, bufs, unsafe { OwnedFd::from_raw_fd(efd) }))
        };
        let (mut ring, descs, bufs, efd) = match setup() {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(io::Error::new(e.kind(), format!("queue {}: {e}", self.q))));
                return Err(e);
            }
        };
        let efd = Arc::new(efd);
        let fd = self.cdev.as_raw_fd();
        let buf = |tag: u16| bufs.ptr as u64 + tag as u64 * self.max_io as u64;
        let answers: Answers = Arc::default();
        let mut counter = [0u8; 8];
        let event_read = |counter: &mut [u8; 8]| opcode::Read::new(types::Fd(efd.as_raw_fd()), counter.as_mut_ptr(), 8).build().user_data(EVENT);
        {
            let mut sq = ring.submission();
            for tag in 0..self.depth {
                // SAFETY: the buffer lives as long as the ring (both dropped at the end of run).
                unsafe { sq.push(&io_cmd(IO_FETCH_REQ, fd, self.q, tag, 0, buf(tag))) }.map_err(|_| io::Error::other("ublk queue ring full"))?;
            }
            // SAFETY: `counter` outlives the ring.
            unsafe { sq.push(&event_read(&mut counter)) }.map_err(|_| io::Error::other("ublk queue ring full"))?;
        }
        ring.submit()?;
        let _ = ready.send(Ok(()));
        let mut live = self.depth as usize;
        let mut pending: Vec<squeue::Entry> = Vec::new();
        while live > 0 {
            match ring.submit_and_wait(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => r?,
            };
            let cqes: Vec<cqueue::Entry> = ring.completion().collect();
            for cqe in cqes {
                if cqe.user_data() == EVENT {
                    for (tag, res, data) in std::mem::take(&mut *answers.lock()) {
                        if !data.is_empty() {
                            // SAFETY: the tag's buffer is max_io bytes and a read is at most that;
                            // the kernel does not touch it until the commit below.
                            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf(tag) as *mut u8, data.len().min(self.max_io)) };
                        }
                        pending.push(io_cmd(IO_COMMIT_AND_FETCH_REQ, fd, self.q, tag, res, buf(tag)));
                    }
                    pending.push(event_read(&mut counter));
                    continue;
                }
                let tag = cqe.user_data() as u16;
                match cqe.result() {
                    0 => {
                        // SAFETY: the descriptor area holds `depth` descriptors, written by the
                        // kernel before it completed this tag's command.
                        let d = unsafe { std::ptr::read_volatile((descs.ptr as *const IoDesc).add(tag as usize)) };
                        if let Some(now) = self.request(tag, d, buf(tag) as *const u8, &answers, &efd) {
                            pending.push(io_cmd(IO_COMMIT_AND_FETCH_REQ, fd, self.q, tag, now, buf(tag)));
                        }
                    }
                    r => {
                        if r != -libc::ENODEV {
                            tracing::error!(queue = self.q, tag, "ublk command failed: {}", io::Error::from_raw_os_error(-r));
                        }
                        live -= 1;
                    }
                }
            }
            let mut sq = ring.submission();
            for e in pending.drain(..) {
                // SAFETY: as above; the ring has room for one command per tag plus the event read.
                unsafe { sq.push(&e) }.map_err(|_| io::Error::other("ublk queue ring full"))?;
            }
        }
        Ok(())
    }

    /// Sends one request to the engine; its answer comes back through `answers`. Returns a result
    /// to commit at once for a request that is not sent.
    fn request(&self, tag: u16, d: IoDesc, buf: *const u8, answers: &Answers, efd: &Arc<OwnedFd>) -> Option<i32> {
        let op = (d.op_flags & 0xff) as u8;
        let offset = d.start_sector << 9;
        let bytes = d.nr_sectors as u64 * 512;
        let cmd = match op {
            OP_READ => nbdclient::CMD_READ,
            OP_WRITE => nbdclient::CMD_WRITE,
            OP_FLUSH => nbdclient::CMD_FLUSH,
            OP_DISCARD => nbdclient::CMD_TRIM,
            OP_WRITE_ZEROES => nbdclient::CMD_WRITE_ZEROES,
            _ => return Some(-libc::EOPNOTSUPP),
        };
        if matches!(op, OP_READ | OP_WRITE) && bytes > self.max_io as u64 || bytes > u32::MAX as u64 {
            return Some(-libc::EINVAL);
        }
        let payload: Arc<[u8]> = if op == OP_WRITE {
            // SAFETY: the kernel copied the write's data into the tag's buffer (bytes <= max_io).
            Arc::from(unsafe { std::slice::from_raw_parts(buf, bytes as usize) })
        } else {
            Arc::from(&[][..])
        };
        let (answers, efd) = (answers.clone(), efd.clone());
        let len = if op == OP_FLUSH { 0 } else { bytes as u32 };
        let reply = move |r: Result<Vec<u8>, i32>| {
            let (res, data) = match r {
                Ok(data) if op == OP_READ && data.len() as u64 != bytes => (-libc::EIO, Vec::new()),
                Ok(data) if op == OP_READ => (bytes as i32, data),
                Ok(_) if op == OP_WRITE => (bytes as i32, Vec::new()),
                Ok(_) => (0, Vec::new()),
                Err(e) => (-e, Vec::new()),
            };
            answers.lock().push((tag, res, data));
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes to the eventfd this closure keeps open.
            unsafe { libc::write(efd.as_raw_fd(), one.as_ptr().cast(), 8) };
        };
        self.conn.submit(Req { cmd, offset, len, payload, since: Instant::now(), reply: Box::new(reply) });
        None
    }
}

/// `strata-csi ublk-disk`: serves `export` as a ublk device until the device is stopped. With a
/// state file naming a device whose helper died (the kernel holds its I/O), takes that device
/// over instead of adding one. The state file gets "ID PID" once the device is added.
pub fn serve(ep: Endpoint, export: &str, state: &Path, opts: Opts) -> anyhow::Result<()> {
    let first = NbdConn::connect(&ep, export).and_then(Client::new).map_err(|e| anyhow::anyhow!("connecting to export {export}: {e}"))?;
    let (size, nbd_flags) = (first.size, first.flags);
    let conn = Conn::start(ep, export, first)?;
    let mut ctl = Control::open().map_err(|e| anyhow::anyhow!("{CONTROL}: {e} (is the ublk_drv module loaded?)"))?;
    let features = ctl.features()?;
    let pid = std::process::id();
    let mut recover = None;
    if let Some((id, old)) = read_state(state) {
        // A device whose helper is gone: wait for the kernel to quiesce it, then take it over.
        let t0 = Instant::now();
        loop {
            match ctl.info(id) {
                Ok(info) if info.state == S_DEV_QUIESCED => break recover = Some(info),
                Ok(info) if info.state == S_DEV_LIVE && (pid_alive(old) || t0.elapsed() < Duration::from_secs(10)) => {
                    if pid_alive(old) && old != pid as i32 {
                        anyhow::bail!("/dev/ublkb{id} is served by process {old}");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(info) => anyhow::bail!("/dev/ublkb{id} is in state {} and cannot be recovered", info.state),
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    let info = match recover {
        Some(info) => {
            ctl.start_recovery(info.dev_id).map_err(|e| anyhow::anyhow!("starting the recovery of /dev/ublkb{}: {e}", info.dev_id))?;
            info
        }
        None => {
            let want = F_USER_RECOVERY | F_USER_RECOVERY_REISSUE | F_CMD_IOCTL_ENCODE | F_UPDATE_SIZE;
            let info = ctl.add(DevInfo {
                nr_hw_queues: opts.queues,
                queue_depth: opts.depth,
                max_io_buf_bytes: opts.max_io,
                flags: want & features,
                ..DevInfo::default()
            })?;
            write_state(state, info.dev_id)?;
            let mut p = Params { types: PARAM_TYPE_BASIC, ..Params::default() };
            p.basic = ParamBasic {
                attrs: if nbd_flags & NBD_FLAG_SEND_FLUSH != 0 { ATTR_VOLATILE_CACHE } else { 0 },
                logical_bs_shift: 9,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: 12,
                max_sectors: info.max_io_buf_bytes >> 9,
                dev_sectors: size >> 9,
                ..ParamBasic::default()
            };
            let (trim, zeroes) = (nbd_flags & nbdclient::FLAG_SEND_TRIM != 0, nbd_flags & nbdclient::FLAG_SEND_WRITE_ZEROES != 0);
            if trim || zeroes {
                p.types |= PARAM_TYPE_DISCARD;
                p.discard = ParamDiscard {
                    discard_granularity: 4096,
                    max_discard_sectors: if trim { MAX_DISCARD >> 9 } else { 0 },
                    max_write_zeroes_sectors: if zeroes { MAX_DISCARD >> 9 } else { 0 },
                    max_discard_segments: 1,
                    ..ParamDiscard::default()
                };
            }
            ctl.set_params(info.dev_id, p).map_err(|e| anyhow::anyhow!("setting the parameters of /dev/ublkb{}: {e}", info.dev_id))?;
            info
        }
    };
    let id = info.dev_id;
    let cpath = format!("/dev/ublkc{id}");
    let t0 = Instant::now();
    let cdev = loop {
        match OpenOptions::new().read(true).write(true).open(&cpath) {
            Ok(f) => break Arc::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && t0.elapsed() < Duration::from_secs(5) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => anyhow::bail!("{cpath}: {e}"),
        }
    };
    let mut threads = Vec::new();
    for q in 0..info.nr_hw_queues {
        let (tx, rx) = std::sync::mpsc::channel();
        let queue = Queue { q, depth: info.queue_depth, max_io: info.max_io_buf_bytes as usize, cdev: cdev.clone(), conn: conn.clone() };
        threads.push(std::thread::Builder::new().name(format!("ublk-q{q}")).spawn(move || queue.run(tx))?);
        rx.recv().map_err(|_| anyhow::anyhow!("ublk queue {q} ended during setup"))??;
    }
    if recover.is_some() {
        ctl.end_recovery(id, pid).map_err(|e| anyhow::anyhow!("ending the recovery of /dev/ublkb{id}: {e}"))?;
        write_state(state, id)?;
        tracing::info!(export, "took over {} (recovered)", device(id));
    } else {
        ctl.start(id, pid).map_err(|e| anyhow::anyhow!("starting /dev/ublkb{id}: {e}"))?;
        tracing::info!(export, queues = info.nr_hw_queues, depth = info.queue_depth, "serving {}", device(id));
    }
    drop(ctl);
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(export, "ublk queue: {e}"),
            Err(_) => tracing::error!(export, "a ublk queue thread panicked"),
        }
    }
    tracing::info!(export, "{} stopped", device(id));
    Ok(())
}

/// Makes sure a `strata-csi ublk-disk` helper serves the volume; returns its device. A device
/// whose helper died is taken over by a new helper (the kernel held its I/O meanwhile).
pub fn ensure(state: &Path, volume: &str, ep: &Endpoint, opts: Opts) -> Result<String, AttachError> {
    let file = state_file(state, volume);
    let mut ctl = Control::open()?;
    if let Some((id, pid)) = read_state(&file) {
        match ctl.info(id) {
            Ok(info) if info.state == S_DEV_LIVE && pid_alive(pid) => return Ok(device(id)),
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => std::fs::remove_file(&file)?,
            Err(e) => return Err(e.into()),
        }
    }
    std::fs::create_dir_all(state)?;
    let log = log_file(state, volume);
    let (queues, depth) = (opts.queues.to_string(), opts.depth.to_string());
    let args: [&OsStr; 8] = [
        "--export".as_ref(),
        volume.as_ref(),
        "--state-file".as_ref(),
        file.as_os_str(),
        "--queues".as_ref(),
        queues.as_ref(),
        "--depth".as_ref(),
        depth.as_ref(),
    ];
    let mut child = attach::spawn_helper("ublk-disk", &args, ep, &log)?;
    let me = child.id() as i32;
    let t0 = Instant::now();
    let id = loop {
        if let Some((id, pid)) = read_state(&file).filter(|s| s.1 == me) {
            if ctl.info(id).is_ok_and(|i| i.state == S_DEV_LIVE && i.ublksrv_pid == pid) && Path::new(&device(id)).exists() {
                break id;
            }
        }
        if let Some(e) = attach::helper_exited(&mut child, "ublk-disk", &log) {
            return Err(e);
        }
        if t0.elapsed() > Duration::from_secs(15) {
            return Err(AttachError::Timeout(format!("the ublk device of {volume} did not start within 15 s")));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The device tracks the helper; a thread reaps it when it exits (at unstage).
    std::thread::Builder::new().name(format!("reap-{volume}")).spawn(move || {
        let _ = child.wait();
    })?;
    Ok(device(id))
}

/// Undoes `ensure`: stops the device (its helper ends), waits for the helper, deletes the device.
pub fn release(state: &Path, volume: &str) -> Result<(), AttachError> {
    let file = state_file(state, volume);
    let Some((id, pid)) = read_state(&file) else { return Ok(()) };
    let mut ctl = Control::open()?;
    let gone = |e: &io::Error| e.raw_os_error() == Some(libc::ENODEV);
    match ctl.stop(id) {
        Err(e) if !gone(&e) => return Err(AttachError::Command { cmd: format!("ublk stop {}", device(id)), out: e.to_string() }),
        _ => {}
    }
    // Deleting waits for the helper to close the char device: wait for it to end first.
    let t0 = Instant::now();
    let mut killed = false;
    while pid_alive(pid) {
        if t0.elapsed() > Duration::from_secs(10) && !killed {
            tracing::warn!(volume, pid, "the ublk helper did not end after its device stopped: killing it");
            // SAFETY: kill(2) of the helper this plugin started (or adopted); checked just above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        if t0.elapsed() > Duration::from_secs(20) {
            return Err(AttachError::Timeout(format!("the ublk helper (pid {pid}) of {} did not end", device(id))));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match ctl.delete(id) {
        Err(e) if !gone(&e) => return Err(AttachError::Command { cmd: format!("ublk delete {}", device(id)), out: e.to_string() }),
        _ => {}
    }
    std::fs::remove_file(&file)?;
    let _ = std::fs::remove_file(log_file(state, volume));
    Ok(())
}

/// Grows a live device to `bytes` (UBLK_U_CMD_UPDATE_SIZE), or says why this kernel cannot; a
/// device already that large is left alone.
pub fn resize(id: u32, bytes: u64) -> Result<(), String> {
    // A device made after the volume grew already has its size.
    let sectors = std::fs::read_to_string(format!("/sys/block/ublkb{id}/size")).ok().and_then(|s| s.trim().parse::<u64>().ok());
    if sectors.is_some_and(|s| s * 512 >= bytes) {
        return Ok(());
    }
    let mut ctl = Control::open().map_err(|e| e.to_string())?;
    let f = ctl.features().map_err(|e| e.to_string())?;
    if f & F_UPDATE_SIZE == 0 {
        return Err(format!(
            "this kernel's ublk driver cannot change a live device's size (no UBLK_F_UPDATE_SIZE; Linux 6.14 and later have it): \
             the volume has grown, and {} takes the new size when it is staged again (or use --attach kernel-nbd)",
            device(id)
        ));
    }
    ctl.update_size(id, bytes).map_err(|e| format!("ublk resize of {}: {e}", device(id)))
}

/// The plugin's watch over its ublk devices: a device whose helper died gets a new one, which
/// takes it over (the kernel holds its I/O meanwhile). Started for each staged device, and at
/// start for every device a previous run of the plugin left.
#[derive(Default)]
pub struct Keepers {
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

impl Keepers {
    pub fn start(&self, state: &Path, volume: &str, ep: Endpoint, opts: Opts) {
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(old) = self.running.lock().insert(volume.to_string(), stop.clone()) {
            old.store(true, Ordering::Release);
        }
        let (state, volume) = (state.to_path_buf(), volume.to_string());
        let _ = std::thread::Builder::new().name(format!("ublk-keep-{volume}")).spawn(move || {
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(500));
                let Some((_, pid)) = read_state(&state_file(&state, &volume)) else { break };
                if stop.load(Ordering::Acquire) || pid_alive(pid) {
                    continue;
                }
                tracing::warn!(volume, pid, "the ublk helper is gone: starting a new one to take the device over");
                match ensure(&state, &volume, &ep, opts) {
                    Ok(dev) => tracing::info!(volume, "{dev} recovered"),
                    Err(e) => tracing::error!(volume, "recovering the ublk device: {e}"),
                }
            }
        });
    }

    /// Keepers for the devices a previous run of this plugin left in `state`.
    pub fn adopt(&self, state: &Path, ep: &Endpoint, opts: Opts) {
        let Ok(dir) = std::fs::read_dir(state) else { return };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(volume) = name.strip_suffix(".ublk") {
                tracing::info!(volume, "watching the ublk device a previous run staged");
                self.start(state, volume, ep.clone(), opts);
            }
        }
    }

    pub fn stop(&self, volume: &str) {
        if let Some(s) = self.running.lock().remove(volume) {
            s.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pid_alive;
    use std::process::Command;

    #[test]
    fn a_helper_is_alive_until_it_ends_and_a_zombie_or_another_process_is_not() {
        let mut helper = Command::new("bash").args(["-c", "exec -a ublk-disk sleep 30"]).spawn().unwrap();
        let pid = helper.id() as i32;
        let t0 = std::time::Instant::now();
        // bash execs sleep under the helper's name.
        while !pid_alive(pid) {
            assert!(t0.elapsed().as_secs() < 5, "the stand-in helper never showed up as alive");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // Not waited for by anyone else: it stays a zombie until pid_alive reaps it. A process on
        // its way out (its memory gone, not yet a zombie) already counts as dead, so the reaping
        // may take a later call.
        let t0 = std::time::Instant::now();
        while pid_alive(pid) {
            assert!(t0.elapsed().as_secs() < 5, "a killed helper still counts as alive");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
            assert!(t0.elapsed().as_secs() < 5, "the zombie was never reaped");
            assert!(!pid_alive(pid), "a dead helper counted as alive again");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = helper.wait();
        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(!pid_alive(other.id() as i32), "a process that is not a helper (a reused pid)");
        let _ = other.kill();
        let _ = other.wait();
        assert!(!pid_alive(0) && !pid_alive(-1));
    }
}
