//! The single-replica data path: volume offsets to extents, extents to device I/O.
//! Aligned requests (4 KiB) take the replica's I/O lock shared and go straight to the device;
//! unaligned writes and zeroing/freeing take it exclusively (read-modify-write, unmap).

use super::{offsets, IoError, Local, ReadBuf, ReadData, Replica};
use crate::alerts::Severity::Alarm;
use crate::device::{AlignedBuf, ALIGN};
use crate::pool::{PExt, Pool};
use futures::FutureExt;
use std::io;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Reads `buf[range]` from the volume's extents at `offset` (aligned) and verifies every block's
/// checksum; unmapped extents read as zeroes. Blocks that fail their checksum make the result
/// `Corrupt` (with their volume offsets) after the whole range was read.
async fn read_extents(pool: &Pool, vol: u64, offset: u64, mut buf: AlignedBuf, range: Range<usize>) -> (Result<(), IoError>, AlignedBuf) {
    let es = pool.extent_size;
    let (mut pos, mut r) = (offset, range.start);
    let mut bad = Vec::new();
    while r < range.end {
        let within = pos % es;
        let n = ((es - within) as usize).min(range.end - r);
        match pool.lookup(vol, pos / es) {
            Some(p) => {
                let (res, b) = pool.device(p).read_at(pool.offset_of(p) + within, buf, r..r + n).await;
                buf = b;
                if let Err(e) = res {
                    pool.devices()[p.dev as usize].note_io_error();
                    return (Err(e.into()), buf);
                }
                bad.extend(pool.verify(p, within, &buf[r..r + n]).into_iter().map(|b| pos + b));
            }
            None => buf[r..r + n].fill(0),
        }
        pos += n as u64;
        r += n;
    }
    if !bad.is_empty() {
        return (Err(IoError::Corrupt(bad)), buf);
    }
    (Ok(()), buf)
}

pub fn aligned(off: u64, len: u64) -> bool {
    off.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN as u64)
}

/// Devices touched by a request, as a bit set (device index < 64) or "all".
#[derive(Default)]
struct Touched(u64, bool);

impl Touched {
    fn add(&mut self, p: PExt) {
        if p.dev < 64 {
            self.0 |= 1 << p.dev;
        } else {
            self.1 = true;
        }
    }
}

impl Local {
    fn check(&self, v: &Replica, offset: u64, len: u64) -> Result<(), IoError> {
        if v.is_deleted() {
            return Err(IoError::Deleted);
        }
        let size = v.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(IoError::OutOfRange { offset, len, size }),
        }
    }

    pub(crate) fn check_write(&self, v: &Replica, offset: u64, len: u64) -> Result<(), IoError> {
        if v.read_only {
            return Err(IoError::ReadOnly(v.name.clone()));
        }
        self.check(v, offset, len)
    }

    /// Shares every extent of `v` with volume id `dst` (a snapshot or clone of this replica),
    /// with this replica's I/O to `v` drained.
    pub(crate) async fn share_local(&self, v: &Replica, dst: u64) -> Result<(), IoError> {
        let _g = v.io_lock.write().await;
        let (pool, id) = (self.pool.clone(), v.id);
        tokio::task::spawn_blocking(move || pool.share(id, dst)).await.map_err(io::Error::other)??;
        Ok(())
    }

    /// Replaces this replica's data of `v` with snapshot `snap`'s (shared extents).
    pub(crate) async fn restore_local(&self, v: &Replica, snap: u64) -> Result<(), IoError> {
        if v.read_only {
            return Err(IoError::ReadOnly(v.name.clone()));
        }
        let _g = v.io_lock.write().await;
        let (pool, id) = (self.pool.clone(), v.id);
        let r = tokio::task::spawn_blocking(move || {
            pool.free(id, &pool.volume_extents(id))?;
            pool.share(snap, id)
        })
        .await
        .map_err(io::Error::other)?;
        self.data_changed(v);
        r?;
        Ok(())
    }

    /// A read from this node's replica (a client's: it feeds and uses readahead).
    pub(crate) async fn read_local(&self, v: &Arc<Replica>, offset: u64, len: usize) -> Result<ReadData, IoError> {
        self.read(v, offset, len, true).await
    }

    /// A read that neither uses nor starts readahead: resync, rebuild and repair copy scattered
    /// ranges once, and a window read ahead after each would be read for nothing.
    pub(crate) async fn read_local_once(&self, v: &Arc<Replica>, offset: u64, len: usize) -> Result<ReadData, IoError> {
        self.read(v, offset, len, false).await
    }

    async fn read(&self, v: &Arc<Replica>, offset: u64, len: usize, readahead: bool) -> Result<ReadData, IoError> {
        self.check(v, offset, len as u64)?;
        if readahead && aligned(offset, len as u64) {
            let gen = v.write_gen.load(Ordering::Acquire);
            let (hit, ahead) = v.readahead.on_read(offset, len, gen, v.size(), self.readahead_window.load(Relaxed));
            for (o, l) in ahead {
                self.prefetch(v, o, l, gen);
            }
            if let Some(chunk) = hit {
                if let Some(buf) = chunk.await {
                    if v.write_gen.load(Ordering::Acquire) == gen {
                        return Ok(ReadData { buf: ReadBuf::Shared(buf), start: 0, len });
                    }
                }
            }
        }
        let a0 = offset - offset % ALIGN as u64;
        let a1 = (offset + len as u64).next_multiple_of(ALIGN as u64);
        let span = (a1 - a0) as usize;
        let buf = self.read_verified(v, a0, self.bufs.get(span)).await?;
        Ok(ReadData { buf: ReadBuf::Owned(buf), start: (offset - a0) as usize, len })
    }

    /// Fills `buf` from this replica at `a0` (aligned), every block verified against its
    /// checksum. A block that fails is read again with no write in flight (a racing write can
    /// make block and checksum disagree for a moment); if it still fails, an alert is raised
    /// and the result is `Corrupt`.
    pub(crate) async fn read_verified(&self, v: &Replica, a0: u64, buf: AlignedBuf) -> Result<AlignedBuf, IoError> {
        let span = buf.len();
        let g = v.io_lock.read().await;
        let (mut res, mut buf) = read_extents(&self.pool, v.id, a0, buf, 0..span).await;
        drop(g);
        if let Err(IoError::Corrupt(_)) = res {
            let _g = v.io_lock.write().await;
            (res, buf) = read_extents(&self.pool, v.id, a0, buf, 0..span).await;
            if let Err(IoError::Corrupt(bad)) = &res {
                self.alerts.raise(
                    Alarm,
                    "ChecksumMismatch",
                    &format!("volume/{}", v.name),
                    format!(
                        "volume {}: {} block(s) of 4 KiB on node {} fail their checksum (volume offsets {})",
                        v.name,
                        bad.len(),
                        self.node,
                        offsets(bad)
                    ),
                );
            }
        }
        res.map(|_| buf)
    }

    /// Starts reading `[offset, offset+len)` ahead of a sequential stream.
    fn prefetch(&self, v: &Arc<Replica>, offset: u64, len: usize, gen: u64) {
        let Some(wrap) = super::readahead::reserve(&self.readahead_held, len) else { return };
        let (pool, vol, buf) = (self.pool.clone(), v.clone(), self.bufs.get(len));
        let task = tokio::spawn(async move {
            let _g = vol.io_lock.read().await;
            let (res, buf) = read_extents(&pool, vol.id, offset, buf, 0..len).await;
            let chunk = wrap(buf);
            res.ok().map(|_| Arc::new(chunk))
        });
        let data = async move { task.await.ok().flatten() }.boxed().shared();
        v.readahead.insert(offset, len, gen, data);
    }

    /// After any change to a volume's data: readahead taken before it must not be served.
    pub(crate) fn data_changed(&self, v: &Replica) {
        v.write_gen.fetch_add(1, Ordering::AcqRel);
        v.readahead.clear();
    }

    /// The extent a write to `lext` goes to (allocated, or copied when a snapshot shares it).
    async fn place(&self, v: &Replica, lext: u64) -> Result<PExt, IoError> {
        if let Some(p) = self.pool.lookup_writable(v.id, lext) {
            return Ok(p);
        }
        let id = v.id;
        self.blocking(move |pool| pool.allocate(id, lext)).await
    }

    /// Runs a blocking call of the pool's on tokio's blocking threads.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Pool) -> Result<T, crate::pool::PoolError> + Send + 'static) -> Result<T, IoError> {
        let pool = self.pool.clone();
        Ok(tokio::task::spawn_blocking(move || f(&pool)).await.map_err(io::Error::other)??)
    }

    /// Writes `buf[range]` at byte `within` of extent `p` and records its checksums; a failed
    /// write counts against the device.
    async fn write_extent(&self, p: PExt, within: u64, buf: AlignedBuf, range: Range<usize>) -> (io::Result<()>, AlignedBuf) {
        let (res, buf) = self.pool.device(p).write_at(self.pool.offset_of(p) + within, buf, range.clone()).await;
        match &res {
            Ok(()) => self.pool.record_sums(p, within, &buf[range]),
            Err(_) => self.pool.devices()[p.dev as usize].note_io_error(),
        }
        (res, buf)
    }

    /// Begins a change of extent `p` (its checksum intent made durable when needed); the caller
    /// ends it with `pool.end_write(p)` once it recorded the new checksums. On error it is ended.
    async fn begin_change(&self, p: PExt) -> Result<(), IoError> {
        if self.pool.begin_write(p) {
            let pool = self.pool.clone();
            let r = tokio::task::spawn_blocking(move || pool.persist_intent(p)).await.map_err(io::Error::other).and_then(|r| r);
            if let Err(e) = r {
                self.pool.end_write(p);
                return Err(e.into());
            }
        }
        Ok(())
    }

    async fn write_aligned(&self, v: &Replica, offset: u64, mut buf: AlignedBuf, touched: &mut Touched) -> (Result<(), IoError>, AlignedBuf) {
        let es = self.pool.extent_size;
        let (mut pos, mut r, end) = (offset, 0usize, buf.len());
        while r < end {
            let within = pos % es;
            let n = ((es - within) as usize).min(end - r);
            if within == 0 && n as u64 == es && self.pool.lookup(v.id, pos / es).is_none() {
                // A whole extent not yet allocated: written to a free extent, mapped after.
                let (id, lext) = (v.id, pos / es);
                let p = match self.blocking(move |pool| pool.reserve_whole(id, lext)).await {
                    Ok(p) => p,
                    Err(e) => return (Err(e), buf),
                };
                if let Some(p) = p {
                    touched.add(p);
                    let (res, b) = self.write_extent(p, 0, buf, r..r + n).await;
                    buf = b;
                    let written = res.map_err(crate::pool::PoolError::io("writing a new extent"));
                    if let Err(e) = self.blocking(move |pool| pool.map_whole(id, lext, p, written)).await {
                        return (Err(e), buf);
                    }
                    pos += n as u64;
                    r += n;
                    continue;
                }
            }
            let p = match self.place(v, pos / es).await {
                Ok(p) => p,
                Err(e) => return (Err(e), buf),
            };
            touched.add(p);
            if let Err(e) = self.begin_change(p).await {
                return (Err(e), buf);
            }
            let (res, b) = self.write_extent(p, within, buf, r..r + n).await;
            buf = b;
            self.pool.end_write(p);
            if let Err(e) = res {
                return (Err(e.into()), buf);
            }
            pos += n as u64;
            r += n;
        }
        (Ok(()), buf)
    }

    async fn sync_touched(&self, t: &Touched) -> Result<(), IoError> {
        if t.1 {
            return Ok(self.pool.sync_all().await?);
        }
        let futs: Vec<_> =
            self.pool.devices().iter().enumerate().filter(|(i, _)| *i < 64 && t.0 & (1 << i) != 0).map(|(_, d)| d.dev.sync()).collect();
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }

    /// A write to this node's replica.
    pub(crate) async fn write_local(&self, v: &Replica, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), IoError> {
        let len = data.len() as u64;
        self.check_write(v, offset, len)?;
        let mut touched = Touched::default();
        if aligned(offset, len) {
            let _g = v.io_lock.read().await;
            self.write_aligned(v, offset, data, &mut touched).await.0?;
        } else {
            let _g = v.io_lock.write().await;
            self.rmw(v, offset, len, |dst| dst.copy_from_slice(&data), &mut touched).await?;
        }
        if fua {
            self.sync_touched(&touched).await?;
        }
        Ok(())
    }

    /// Read-modify-write of the 4 KiB-aligned span around `[offset, offset+len)`. The caller
    /// holds the volume's I/O lock exclusively.
    async fn rmw(&self, v: &Replica, offset: u64, len: u64, f: impl FnOnce(&mut [u8]), touched: &mut Touched) -> Result<(), IoError> {
        let a0 = offset - offset % ALIGN as u64;
        let a1 = (offset + len).next_multiple_of(ALIGN as u64);
        let span = (a1 - a0) as usize;
        let (res, mut buf) = read_extents(&self.pool, v.id, a0, self.bufs.get(span), 0..span).await;
        res?;
        let s = (offset - a0) as usize;
        f(&mut buf[s..s + len as usize]);
        self.write_aligned(v, a0, buf, touched).await.0
    }

    /// FLUSH of this node's replica.
    pub(crate) async fn flush_local(&self, v: &Replica) -> Result<(), IoError> {
        if v.is_deleted() {
            return Err(IoError::Deleted);
        }
        Ok(self.pool.sync_all().await?)
    }

    /// Zeroing (or unmapping) on this node's replica.
    pub(crate) async fn zero_local(&self, v: &Replica, offset: u64, len: u64, punch: bool, fua: bool) -> Result<(), IoError> {
        self.check_write(v, offset, len)?;
        let _g = v.io_lock.write().await;
        let es = self.pool.extent_size;
        let mut touched = Touched::default();
        let mut to_free = Vec::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let lext = pos / es;
            let within = pos % es;
            let n = (es - within).min(end - pos);
            let mapped = self.pool.lookup(v.id, lext);
            let whole = within == 0 && n == es;
            match (mapped, whole, punch) {
                (Some(_), true, true) => to_free.push(lext),
                (None, _, true) => {}
                (None, true, false) => {
                    touched.add(self.place(v, lext).await?); // new extents are zeroed
                }
                (Some(_), _, _) if aligned(within, n) => {
                    let p = self.place(v, lext).await?; // a shared extent is copied first
                    touched.add(p);
                    let dev = self.pool.device(p).clone();
                    let at = self.pool.offset_of(p) + within;
                    self.begin_change(p).await?;
                    let r = tokio::task::spawn_blocking(move || dev.zero_range_blocking(at, n)).await.map_err(io::Error::other).and_then(|r| r);
                    if r.is_ok() {
                        self.pool.record_zeroes(p, within, n);
                    }
                    self.pool.end_write(p);
                    r?;
                }
                _ => self.rmw(v, pos, n, |d| d.fill(0), &mut touched).await?,
            }
            pos += n;
        }
        if !to_free.is_empty() {
            let pool = self.pool.clone();
            let id = v.id;
            tokio::task::spawn_blocking(move || pool.free(id, &to_free)).await.map_err(io::Error::other)??;
        }
        if fua {
            self.sync_touched(&touched).await?;
        }
        Ok(())
    }
}
