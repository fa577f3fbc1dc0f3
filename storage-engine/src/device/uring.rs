//! One io_uring per device, driven from tokio itself: tasks push SQEs and enter the kernel to
//! submit; the ring signals an eventfd registered with tokio's reactor, and a reaper task on the
//! same runtime completes the waiting tasks. No extra thread sits between a request and its
//! completion, so a 4 KiB I/O costs no cross-thread hand-off beyond tokio's own.
//!
//! Buffers travel with the request and stay in the slot table until their completion is reaped,
//! so a cancelled caller can never leave the kernel writing into freed memory.

use super::{AlignedBuf, BufResult};
use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

const SQ_ENTRIES: u32 = 256;
const CQ_ENTRIES: u32 = 4096;

struct Pending {
    buf: AlignedBuf,
    done: oneshot::Sender<(i32, AlignedBuf)>,
}

#[derive(Default)]
struct Slots {
    table: Vec<Option<Pending>>,
    free: Vec<usize>,
    in_use: usize,
}

struct Inner {
    ring: IoUring,
    fd: RawFd,
    /// Serialises producers of the submission queue.
    sq: Mutex<()>,
    /// The completion queue has one consumer at a time: whoever holds this.
    cq: Mutex<()>,
    slots: Mutex<Slots>,
}

pub struct Uring {
    inner: Arc<Inner>,
    reaper: tokio::task::JoinHandle<()>,
}

impl Uring {
    /// Needs a tokio runtime (the reaper runs on it).
    pub fn start(fd: RawFd) -> io::Result<Uring> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| io::Error::other("no tokio runtime for the io_uring reaper"))?;
        // Completions run as task work. Cooperative: the kernel posts them at the thread's next
        // system call or wakes it if it sleeps, instead of interrupting it as soon as a disk
        // I/O completes (kernels before 5.19 lack the flag: plain ring there).
        let ring = match IoUring::builder().setup_cqsize(CQ_ENTRIES).setup_coop_taskrun().build(SQ_ENTRIES) {
            Ok(r) => r,
            Err(_) => IoUring::builder().setup_cqsize(CQ_ENTRIES).build(SQ_ENTRIES)?,
        };
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh fd we own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let inner = Arc::new(Inner { ring, fd, sq: Mutex::new(()), cq: Mutex::new(()), slots: Mutex::new(Slots::default()) });
        let efd = {
            let _guard = handle.enter();
            // SAFETY: the OwnedFd is moved into the AsyncFd and stays open for its whole life.
            unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }.map_err(|e| io::Error::other(e.to_string()))?
        };
        let reaper = handle.spawn(reap_loop(inner.clone(), efd));
        Ok(Uring { inner, reaper })
    }

    /// Reads or writes `buf[range]` at `offset`, resubmitting short transfers.
    pub fn rw(
        &self,
        write: bool,
        offset: u64,
        buf: AlignedBuf,
        range: Range<usize>,
    ) -> impl std::future::Future<Output = BufResult> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            let mut buf = buf;
            let mut done = 0usize;
            while done < range.len() {
                let start = range.start + done;
                let len = (range.len() - done) as u32;
                let at = offset + done as u64;
                let build = |ptr: *mut u8| {
                    if write {
                        opcode::Write::new(types::Fd(inner.fd), ptr, len).offset(at).build()
                    } else {
                        opcode::Read::new(types::Fd(inner.fd), ptr, len).offset(at).build()
                    }
                };
                let (res, b) = match inner.push(buf, start, build) {
                    Ok(rx) => match {
                        // Let the other ready tasks queue their entries first, then enter the
                        // kernel once for all of them (the first task back submits them all),
                        // and collect whatever has completed meanwhile without a trip through
                        // the reactor (A/B on the memory-backed device: 4k randread QD32 +7%,
                        // QD1 unchanged). Dropped before that, the guard submits.
                        let unsubmitted = Unsubmitted(&inner);
                        tokio::task::yield_now().await;
                        drop(unsubmitted);
                        inner.reap();
                        rx
                    }
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => return (Err(io::Error::other("io_uring was shut down")), AlignedBuf::new(0)),
                    },
                    Err((e, b)) => return (Err(e), b),
                };
                buf = b;
                if res < 0 {
                    return (Err(io::Error::from_raw_os_error(-res)), buf);
                }
                if res == 0 {
                    let kind = if write { io::ErrorKind::WriteZero } else { io::ErrorKind::UnexpectedEof };
                    return (Err(io::Error::new(kind, "short transfer past the end of the device")), buf);
                }
                done += res as usize;
            }
            (Ok(()), buf)
        }
    }

    pub fn fsync(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
        let inner = self.inner.clone();
        async move {
            let fd = inner.fd;
            let rx = inner
                .push(AlignedBuf::new(0), 0, |_| opcode::Fsync::new(types::Fd(fd)).flags(types::FsyncFlags::DATASYNC).build())
                .map_err(|(e, _)| e)?;
            inner.flush();
            match rx.await {
                Ok((res, _)) if res < 0 => Err(io::Error::from_raw_os_error(-res)),
                Ok(_) => Ok(()),
                Err(_) => Err(io::Error::other("io_uring was shut down")),
            }
        }
    }
}

/// Entries pushed by a task that has not yet entered the kernel for them: submitted when this
/// drops, whether the task goes on or is cancelled.
struct Unsubmitted<'a>(&'a Inner);

impl Drop for Unsubmitted<'_> {
    fn drop(&mut self) {
        self.0.flush();
    }
}

impl Inner {
    /// Parks `buf` in a slot and queues the entry built for its pointer (+`start`); it reaches
    /// the kernel at the next `flush` (by this task or any other), or at once when the queue
    /// is full.
    #[allow(clippy::type_complexity)]
    fn push(
        &self,
        mut buf: AlignedBuf,
        start: usize,
        build: impl FnOnce(*mut u8) -> io_uring::squeue::Entry,
    ) -> Result<oneshot::Receiver<(i32, AlignedBuf)>, (io::Error, AlignedBuf)> {
        assert!(start <= buf.len(), "I/O range outside its buffer");
        // SAFETY: start <= len <= capacity; the heap allocation does not move when the buffer
        // (a pointer-owning struct) moves into the slot table.
        let entry = build(unsafe { buf.as_mut_ptr().add(start) });
        let (tx, rx) = oneshot::channel();
        let idx = {
            let mut s = self.slots.lock();
            let idx = s.free.pop().unwrap_or_else(|| {
                s.table.push(None);
                s.table.len() - 1
            });
            s.table[idx] = Some(Pending { buf, done: tx });
            s.in_use += 1;
            idx
        };
        let entry = entry.user_data(idx as u64);
        let _g = self.sq.lock();
        loop {
            // SAFETY: `self.sq` is held, so this is the only SubmissionQueue; the entry's buffer
            // lives in `slots` until its completion is reaped.
            let pushed = unsafe {
                let mut sq = self.ring.submission_shared();
                sq.push(&entry).is_ok()
            };
            if pushed {
                break;
            }
            if let Err(e) = self.ring.submit() {
                return Err((e, self.take(idx).map(|p| p.buf).unwrap_or_else(|| AlignedBuf::new(0))));
            }
        }
        Ok(rx)
    }

    /// Enters the kernel for every queued entry, if any are queued: one system call for all the
    /// requests that tasks pushed since the last one.
    fn flush(&self) {
        let _g = self.sq.lock();
        // SAFETY: `self.sq` is held, so this is the only SubmissionQueue.
        if unsafe { self.ring.submission_shared() }.is_empty() {
            return;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EAGAIN/EBUSY: the kernel is short of resources; the entries stay queued and
                // are submitted by the next flush.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => return,
                Err(e) => {
                    tracing::error!("io_uring submit failed: {e}");
                    return;
                }
            }
        }
    }

    fn take(&self, idx: usize) -> Option<Pending> {
        let mut s = self.slots.lock();
        let p = s.table.get_mut(idx).and_then(Option::take)?;
        s.free.push(idx);
        s.in_use -= 1;
        Some(p)
    }

    /// Completes everything in the completion queue. Returns how many were reaped.
    fn reap(&self) -> usize {
        let _g = self.cq.lock();
        // SAFETY: `self.cq` is held, so this is the only CompletionQueue.
        let done: Vec<(u64, i32)> = unsafe { self.ring.completion_shared() }.map(|c| (c.user_data(), c.result())).collect();
        for (tag, res) in &done {
            if let Some(p) = self.take(*tag as usize) {
                let _ = p.done.send((*res, p.buf));
            }
        }
        done.len()
    }
}

async fn reap_loop(inner: Arc<Inner>, efd: AsyncFd<OwnedFd>) {
    loop {
        let mut guard = match efd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("io_uring eventfd failed: {e}");
                return;
            }
        };
        let mut counter = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from our nonblocking eventfd.
        unsafe { libc::read(efd.as_raw_fd(), counter.as_mut_ptr() as *mut libc::c_void, 8) };
        guard.clear_ready();
        inner.reap();
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.reaper.abort();
        // Wait for requests still in the kernel, so no buffer is freed under it.
        while self.inner.slots.lock().in_use > 0 {
            if self.inner.reap() == 0 {
                let _ = self.inner.ring.submitter().submit_and_wait(1);
            }
        }
    }
}
