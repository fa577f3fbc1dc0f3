//! One io_uring per device, driven by its own thread. Requests arrive over a channel (with an
//! eventfd to wake the ring); completions go back to tokio through oneshot channels. Buffers
//! travel with the request, so a cancelled caller can never leave the kernel writing into freed
//! memory.

use super::{AlignedBuf, BufResult};
use io_uring::{opcode, types, IoUring};
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::thread::JoinHandle;
use tokio::sync::oneshot;

const RING_ENTRIES: u32 = 256;
const WAKE_TAG: u64 = u64::MAX;

enum Msg {
    Rw { write: bool, offset: u64, buf: AlignedBuf, start: usize, len: usize, done: oneshot::Sender<(i32, AlignedBuf)> },
    Fsync { done: oneshot::Sender<(i32, AlignedBuf)> },
}

pub struct Uring {
    tx: Option<mpsc::Sender<Msg>>,
    wake: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Uring {
    pub fn start(fd: RawFd) -> io::Result<Uring> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh fd we own.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("strata-uring".into())
            .spawn(move || {
                if let Err(e) = ring_loop(ring, fd, efd, rx) {
                    tracing::error!("io_uring thread stopped: {e}");
                }
            })?;
        Ok(Uring { tx: Some(tx), wake, thread: Some(thread) })
    }

    fn send(&self, msg: Msg) -> bool {
        let Some(tx) = &self.tx else { return false };
        if tx.send(msg).is_err() {
            return false;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        true
    }

    /// Reads or writes `buf[range]` at `offset`, resubmitting short transfers.
    pub fn rw(&self, write: bool, offset: u64, buf: AlignedBuf, range: Range<usize>) -> impl std::future::Future<Output = BufResult> + Send + 'static {
        let mut pending = Vec::new();
        let (tx, rx) = oneshot::channel();
        let sent = self.send(Msg::Rw { write, offset, buf, start: range.start, len: range.len(), done: tx });
        // Later resubmissions need the channel: keep a clone of the sender and wake fd.
        let chan = self.tx.clone();
        let wake = self.wake.as_raw_fd();
        pending.push(rx);
        async move {
            let mut rx = pending.pop().expect("one receiver");
            let mut done = 0usize;
            loop {
                let Ok((res, buf)) = rx.await else {
                    let why = if sent { "io_uring thread is gone" } else { "io_uring thread is not running" };
                    return (Err(io::Error::other(why)), AlignedBuf::new(0));
                };
                if res < 0 {
                    return (Err(io::Error::from_raw_os_error(-res)), buf);
                }
                if res == 0 {
                    let kind = if write { io::ErrorKind::WriteZero } else { io::ErrorKind::UnexpectedEof };
                    return (Err(io::Error::new(kind, "short transfer past the end of the device")), buf);
                }
                done += res as usize;
                if done >= range.len() {
                    return (Ok(()), buf);
                }
                let (tx, next) = oneshot::channel();
                let msg = Msg::Rw { write, offset: offset + done as u64, buf, start: range.start + done, len: range.len() - done, done: tx };
                let Some(chan) = &chan else { return (Err(io::Error::other("io_uring closed")), AlignedBuf::new(0)) };
                if chan.send(msg).is_err() {
                    return (Err(io::Error::other("io_uring thread is gone")), AlignedBuf::new(0));
                }
                let one: u64 = 1;
                // SAFETY: as in `send`; the fd lives as long as the Uring, which outlives in-flight I/O
                // because the ring thread is joined in Drop only after the channel closes.
                unsafe { libc::write(wake, &one as *const u64 as *const libc::c_void, 8) };
                rx = next;
            }
        }
    }

    pub fn fsync(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Fsync { done: tx });
        async move {
            match rx.await {
                Ok((res, _)) if res < 0 => Err(io::Error::from_raw_os_error(-res)),
                Ok(_) => Ok(()),
                Err(_) => Err(io::Error::other("io_uring thread is gone")),
            }
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.tx.take();
        let one: u64 = 1;
        // SAFETY: as in `send`.
        unsafe { libc::write(self.wake.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct InFlight {
    buf: AlignedBuf,
    done: oneshot::Sender<(i32, AlignedBuf)>,
}

fn ring_loop(mut ring: IoUring, fd: RawFd, efd: RawFd, rx: mpsc::Receiver<Msg>) -> io::Result<()> {
    let mut slots: Vec<Option<InFlight>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut wake_buf = [0u8; 8];
    let mut wake_armed = false;
    let mut closed = false;
    let mut inflight = 0usize;
    loop {
        if !wake_armed && !closed {
            let e = opcode::Read::new(types::Fd(efd), wake_buf.as_mut_ptr(), 8).build().user_data(WAKE_TAG);
            push(&mut ring, &e)?;
            wake_armed = true;
        }
        loop {
            match rx.try_recv() {
                Ok(msg) => {
                    let (entry_of, flight) = match msg {
                        Msg::Rw { write, offset, mut buf, start, len, done } => {
                            // SAFETY: start+len <= buf.len() (checked by callers' ranges); the buffer
                            // moves into `slots` and stays there until its completion arrives.
                            let ptr = unsafe { buf.as_mut_ptr().add(start) };
                            let e = if write {
                                opcode::Write::new(types::Fd(fd), ptr, len as u32).offset(offset).build()
                            } else {
                                opcode::Read::new(types::Fd(fd), ptr, len as u32).offset(offset).build()
                            };
                            (e, InFlight { buf, done })
                        }
                        Msg::Fsync { done } => (
                            opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build(),
                            InFlight { buf: AlignedBuf::new(0), done },
                        ),
                    };
                    let idx = free.pop().unwrap_or_else(|| {
                        slots.push(None);
                        slots.len() - 1
                    });
                    slots[idx] = Some(flight);
                    push(&mut ring, &entry_of.user_data(idx as u64))?;
                    inflight += 1;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if closed && inflight == 0 {
            return Ok(());
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (tag, res) in done {
            if tag == WAKE_TAG {
                wake_armed = false;
                continue;
            }
            if let Some(f) = slots.get_mut(tag as usize).and_then(Option::take) {
                free.push(tag as usize);
                inflight -= 1;
                let _ = f.done.send((res, f.buf));
            }
        }
    }
}

fn push(ring: &mut IoUring, e: &io_uring::squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: every pointer in `e` stays valid until its completion (buffers live in `slots`,
        // the wake buffer lives for the whole loop).
        if unsafe { ring.submission().push(e) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}
