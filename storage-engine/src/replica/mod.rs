//! One volume's data in this node's pool, as a replica: the requests a target sends over the
//! replication protocol, each checked against the volume's epoch first. A request from an older
//! epoch than the newest seen is refused (`ESTALE`): its sender was fenced by a takeover.

use crate::device::AlignedBuf;
use crate::replication::frame::{self, Op, Request, FLAG_FUA, FLAG_NO_HOLE};
use crate::volume::{Engine, IoError, ReadData, Volume};
use std::sync::atomic::Ordering;

/// A replica's answer: an errno (0 = success) and, for READ and EXTENTS, data.
pub enum Answer {
    Done,
    Data(ReadData),
    Bytes(Vec<u8>),
    Error(u32),
}

static BOOT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

/// This machine's boot (the kernel's random boot id), read once.
pub fn boot_id() -> &'static [u8] {
    BOOT.get_or_init(|| std::fs::read("/proc/sys/kernel/random/boot_id").map(|b| b.trim_ascii().to_vec()).unwrap_or_default())
}

/// A boot id of this engine run's own, so targets treat this node as rebooted (its replicas may
/// miss writes: they are rebuilt). Used under `--simulate-volatile-cache` (every start is a
/// power cycle) and after `check --repair` salvaged a journal. Call before serving.
pub fn new_boot_id() {
    let _ = BOOT.set(format!("fresh-{}-{}", std::process::id(), crate::clock::now_unix()).into_bytes());
}

impl Volume {
    /// Accepts `epoch` if it is not older than the newest seen, remembering it.
    pub fn admit_epoch(&self, epoch: u64) -> bool {
        self.epoch.fetch_max(epoch, Ordering::AcqRel) <= epoch
    }

    /// The newest epoch this replica has seen (it refuses requests of older ones).
    pub fn newest_epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

impl Engine {
    /// Serves one replication request for volume `v` (already looked up by id).
    pub async fn replica_request(&self, v: &std::sync::Arc<Volume>, req: &Request, payload: Option<AlignedBuf>) -> Answer {
        // HELLO raises the epoch with every request of older epochs drained (the fence is held
        // exclusively); any other request checks the epoch and runs under the fence shared, so
        // none of a fenced target's requests can land after a newer target said hello.
        if req.op == Op::Hello {
            let _f = v.fence.write().await;
            if !v.admit_epoch(req.epoch) {
                return Answer::Error(frame::ESTALE);
            }
            v.grow_to(req.offset);
            // The node's boot: a target that finds it changed since its last hello knows writes
            // not yet flushed may be gone from this replica.
            return Answer::Bytes(boot_id().to_vec());
        }
        let _f = v.fence.read().await;
        if !v.admit_epoch(req.epoch) {
            return Answer::Error(frame::ESTALE);
        }
        let fua = req.flags & FLAG_FUA != 0;
        let done = |r: Result<(), IoError>| match r {
            Ok(()) => Answer::Done,
            Err(e) => Answer::Error(e.errno(true)),
        };
        match req.op {
            Op::Hello => Answer::Done,
            Op::Read => match self.read_local(v, req.offset, req.len as usize).await {
                Ok(d) => Answer::Data(d),
                Err(e) => Answer::Error(e.errno(false)),
            },
            Op::Write => match payload {
                Some(buf) => done(self.write_local(v, req.offset, buf, fua).await),
                None => Answer::Error(libc::EINVAL as u32),
            },
            Op::Flush => done(self.flush_local(v).await),
            Op::Trim => done(self.zero_local(v, req.offset, req.len as u64, true, fua).await),
            Op::WriteZeroes => done(self.zero_local(v, req.offset, req.len as u64, req.flags & FLAG_NO_HOLE == 0, fua).await),
            Op::Extents => {
                let mut out = Vec::new();
                for l in self.pool.volume_extents(v.id) {
                    out.extend_from_slice(&l.to_be_bytes());
                }
                Answer::Bytes(out)
            }
            Op::Checksum => match self.read_local(v, req.offset, req.len as usize).await {
                Ok(d) => Answer::Bytes(crc32c::crc32c(d.bytes()).to_be_bytes().to_vec()),
                Err(e) => Answer::Error(e.errno(false)),
            },
            Op::Share => done(self.share_local(v, req.offset).await),
            Op::Restore => done(self.restore_local(v, req.offset).await),
            Op::Drop => match self.drop_replica(v.id).await {
                Ok(()) => Answer::Done,
                Err(e) => {
                    tracing::warn!(volume = v.id, "dropping replica data failed: {e}");
                    Answer::Error(libc::EIO as u32)
                }
            },
        }
    }
}
