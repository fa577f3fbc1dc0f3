//! A served volume's I/O as its clients see it: QoS, statistics and encryption around the
//! target, which sends each change to every in-sync replica (this node's through
//! `replica::Local`).

use super::{Service, Volume};
use crate::device::AlignedBuf;
use crate::replica::{aligned, IoError, Local, ReadData};
use std::sync::atomic::Ordering::{self, Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// The narrow handle a frontend serves: one volume's I/O (read, write, flush, trim, write
/// zeroes) and nothing of its lifecycle. One obtained from `Service::connect` or `open` holds an
/// NBD client's claim on the volume, released when it is dropped.
pub struct VolumeIo {
    local: Arc<Local>,
    pub volume: Arc<Volume>,
    claimed: bool,
}

impl Drop for VolumeIo {
    fn drop(&mut self) {
        if self.claimed && self.volume.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last client left: readahead for it would only hold memory.
            self.volume.readahead.clear();
        }
    }
}

impl Service {
    /// A pooled buffer for this node's data path.
    pub fn buffer(&self, len: usize) -> AlignedBuf {
        self.local.buffer(len)
    }

    /// The I/O handle of a volume known here, without a client's claim (the engine's own
    /// reads and writes, tests).
    pub fn io(&self, volume: Arc<Volume>) -> VolumeIo {
        VolumeIo { local: self.local.clone(), volume, claimed: false }
    }

    /// A client's claim on a volume.
    pub(super) fn claim(&self, volume: Arc<Volume>) -> VolumeIo {
        volume.connections.fetch_add(1, Ordering::AcqRel);
        VolumeIo { local: self.local.clone(), volume, claimed: true }
    }
}

impl VolumeIo {
    /// A pooled buffer for an incoming write payload.
    pub fn buffer(&self, len: usize) -> AlignedBuf {
        self.local.buffer(len)
    }

    pub async fn read(&self, offset: u64, len: usize) -> Result<ReadData, IoError> {
        let v = &self.volume;
        v.qos.admit(false, len as u64).await;
        let _s = v.switch.read().await;
        let t0 = Instant::now();
        let r = match v.key_for_io() {
            Ok(Some(k)) => self.read_secure(&k, offset, len).await,
            Ok(None) => self.read_stored(offset, len).await,
            Err(e) => Err(e),
        };
        v.stats.read_latency.observe(t0.elapsed());
        match &r {
            Ok(_) => {
                v.stats.read_ops.fetch_add(1, Relaxed);
                v.stats.read_bytes.fetch_add(len as u64, Relaxed);
            }
            Err(_) => {
                v.stats.errors.fetch_add(1, Relaxed);
            }
        }
        r
    }

    /// A read of what the volume stores (ciphertext, for an encrypted volume): from this node's
    /// replica, or through the target from another node's.
    pub(super) async fn read_stored(&self, offset: u64, len: usize) -> Result<ReadData, IoError> {
        let v = &self.volume;
        // There is no local-only path: a volume is read only through its running target.
        let t = v.target().ok_or_else(|| v.not_served())?;
        if !t.local {
            return t.read_remote(&self.local, offset, len).await;
        }
        t.admit_local()?;
        match self.local.read_local(&v.replica, offset, len).await {
            Err(IoError::Corrupt(_)) if !t.peers.is_empty() => t.repair_read(&self.local, offset, len).await,
            r => r,
        }
    }

    /// Writes `data` at `offset`; with `fua` it is durable before this returns.
    pub async fn write(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), IoError> {
        let v = &self.volume;
        let len = data.len() as u64;
        v.qos.admit(true, len).await;
        let _s = v.switch.read().await;
        let t0 = Instant::now();
        let r = match v.key_for_io() {
            Ok(Some(k)) => self.write_secure(&k, offset, data, fua).await,
            Ok(None) => self.write_stored(offset, data, fua).await,
            Err(e) => Err(e),
        };
        self.local.data_changed(v);
        v.stats.write_latency.observe(t0.elapsed());
        match &r {
            Ok(_) => {
                v.stats.write_ops.fetch_add(1, Relaxed);
                v.stats.write_bytes.fetch_add(len, Relaxed);
            }
            Err(_) => {
                v.stats.errors.fetch_add(1, Relaxed);
            }
        }
        r
    }

    /// Stores `data` (ciphertext, for an encrypted volume) through the target, or on this node.
    pub(super) async fn write_stored(&self, offset: u64, data: AlignedBuf, fua: bool) -> Result<(), IoError> {
        let v = &self.volume;
        let t = v.target().ok_or_else(|| v.not_served())?;
        // A request no replica can take is refused here, before it reaches any: else a client's
        // bad request would fail the remote legs and throw healthy replicas out of sync.
        self.local.check_write(v, offset, data.len() as u64)?;
        let a = aligned(offset, data.len() as u64);
        t.write(&self.local, offset, data, fua, a).await
    }

    /// FLUSH: every write completed before is durable on every device.
    pub async fn flush(&self) -> Result<(), IoError> {
        let v = &self.volume;
        v.stats.flush_ops.fetch_add(1, Relaxed);
        let _s = v.switch.read().await;
        v.target().ok_or_else(|| v.not_served())?.flush(&self.local).await
    }

    /// TRIM: the range reads as zeroes afterwards; whole extents go back to the pool.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        let v = &self.volume;
        v.stats.trim_ops.fetch_add(1, Relaxed);
        self.zero(offset, len, true, fua).await
    }

    /// WRITE_ZEROES; `no_hole` keeps the range allocated instead of freeing whole extents.
    pub async fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool, fua: bool) -> Result<(), IoError> {
        let v = &self.volume;
        v.stats.write_ops.fetch_add(1, Relaxed);
        self.zero(offset, len, !no_hole, fua).await
    }

    async fn zero(&self, offset: u64, len: u64, punch: bool, fua: bool) -> Result<(), IoError> {
        let v = &self.volume;
        v.qos.admit(true, 0).await;
        let _s = v.switch.read().await;
        // Refused before it reaches any replica (see `write_stored`).
        let r = match (v.target(), self.local.check_write(v, offset, len)) {
            (_, Err(e)) => Err(e),
            (Some(t), Ok(())) => t.zero(&self.local, offset, len, punch, fua).await,
            (None, Ok(())) => Err(v.not_served()),
        };
        self.local.data_changed(v);
        if r.is_err() {
            v.stats.errors.fetch_add(1, Relaxed);
        }
        r
    }
}
