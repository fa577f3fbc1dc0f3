//! Background work on block checksums: settling (writing checksums of idle extents and
//! clearing their intent bits) and the scrub, which reads every allocated extent of every
//! replica on this node at a bounded rate and verifies it. A mismatch raises an alert; on the
//! volume's target it is repaired from an in-sync replica at once.

use super::{IoError, Service, Volume, VolumeError};
use crate::alerts::Severity::{Alarm, Warning};
use crate::replication::frame::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A repair that failed on the data path.
fn unrepaired(e: IoError) -> VolumeError {
    VolumeError::FailedPrecondition(e.to_string())
}

/// How often idle extents' checksums are written out.
pub const SETTLE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct ScrubConfig {
    /// Bytes per second read by the scrub (0: no scrub).
    pub rate: u64,
    /// Time from the start of one pass to the start of the next.
    pub every: Duration,
    /// Time without writes after which an extent's checksums settle.
    pub settle_after: Duration,
}

/// What one scrub pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub extents: u64,
    pub bad_blocks: u64,
    pub repaired_blocks: u64,
}

impl Service {
    /// Settles checksums every `SETTLE_EVERY` and scrubs per `scrub`, for the engine's life.
    pub fn run_checksum_tasks(self: &Arc<Self>, scrub: ScrubConfig) {
        if !self.pool.has_checksums() {
            return;
        }
        let e = self.clone();
        // Idle passes an extent needs before it settles (at least one: a pass that saw no write).
        let passes = scrub.settle_after.as_millis().div_ceil(SETTLE_EVERY.as_millis()).max(1) as u32;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SETTLE_EVERY).await;
                let pool = e.pool.clone();
                match tokio::task::spawn_blocking(move || pool.settle_checksums_idle(passes, crate::pool::csum::DIRTY_CAP)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => tracing::warn!("writing block checksums failed (retried in {SETTLE_EVERY:?}): {err}"),
                    Err(err) => tracing::warn!("checksum settle task failed: {err}"),
                }
            }
        });
        if scrub.rate == 0 {
            return;
        }
        let e = self.clone();
        // When the last pass started is kept in the data directory, so restarts neither skip
        // passes nor start extra ones; a new node starts its clock now.
        let stamp = self.repl.data_dir.join("scrub.last");
        tokio::spawn(async move {
            let now = crate::clock::now_unix();
            let last = std::fs::read_to_string(&stamp).ok().and_then(|s| s.trim().parse::<u64>().ok()).filter(|t| *t <= now);
            if last.is_none() {
                let _ = std::fs::write(&stamp, now.to_string());
            }
            let mut wait = Duration::from_secs((last.unwrap_or(now) + scrub.every.as_secs()).saturating_sub(now));
            loop {
                tokio::time::sleep(wait).await;
                if let Err(err) = std::fs::write(&stamp, crate::clock::now_unix().to_string()) {
                    tracing::warn!(file = %stamp.display(), "cannot record the scrub's start: {err}");
                }
                let t0 = Instant::now();
                let r = e.scrub_once(scrub.rate).await;
                tracing::info!(
                    extents = r.extents,
                    bad = r.bad_blocks,
                    repaired = r.repaired_blocks,
                    secs = t0.elapsed().as_secs(),
                    "scrub pass done"
                );
                wait = scrub.every.saturating_sub(t0.elapsed()).max(Duration::from_secs(1));
            }
        });
    }

    /// One pass over every extent this node stores, at most `rate` bytes per second.
    pub async fn scrub_once(&self, rate: u64) -> ScrubReport {
        let es = self.pool.extent_size;
        let mut report = ScrubReport::default();
        let t0 = Instant::now();
        for v in self.loaded_volumes() {
            for lext in self.pool.volume_extents(v.id) {
                if v.is_deleted() {
                    break;
                }
                let off = lext * es;
                let len = es.min(v.size().saturating_sub(off));
                if len == 0 {
                    continue;
                }
                report.extents += 1;
                let buf = self.buffer(len.next_multiple_of(crate::device::ALIGN as u64) as usize);
                if let Err(IoError::Corrupt(bad)) = self.local.read_verified(&v, off, buf).await {
                    report.bad_blocks += bad.len() as u64;
                    match self.repair_here(&v, off, len as usize, &bad).await {
                        Ok(()) => report.repaired_blocks += bad.len() as u64,
                        Err(why) => {
                            self.alerts.raise(
                                Alarm,
                                "ChecksumUnrepaired",
                                &format!("volume/{}", v.name),
                                format!(
                                    "volume {}: {} block(s) failing their checksum on node {} could not be repaired: {why}",
                                    v.name,
                                    bad.len(),
                                    self.node.id
                                ),
                            );
                        }
                    }
                }
                if rate > 0 {
                    let due = Duration::from_secs_f64((report.extents * es) as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        report
    }

    /// Rewrites the range `[off, off+len)` of this node's replica of `v` (which holds the bad
    /// blocks `bad`) from a good copy: on the target, from an in-sync peer; elsewhere, by the
    /// target (which keeps writes out meanwhile); for a detached volume, from another in-sync
    /// replica directly (no writer exists; the fence keeps a new target out meanwhile).
    async fn repair_here(&self, v: &Arc<Volume>, off: u64, len: usize, bad: &[u64]) -> Result<(), VolumeError> {
        if let Some(t) = v.target().filter(|t| t.local) {
            if t.peers.is_empty() {
                return Err(VolumeError::FailedPrecondition("the volume has no other replica".into()));
            }
            return t.repair_read(&self.local, off, len).await.map(|_| ()).map_err(unrepaired);
        }
        let rec = self.meta.get_volume(&v.name).await?.ok_or_else(|| VolumeError::NotFound(v.name.clone()))?;
        let me = self.node.id.clone();
        let source = if !rec.target.is_empty() && rec.target != me {
            self.ask_target_to_repair(&rec.target, &v.name, off, len).await?;
            format!("by its target, node {}", rec.target)
        } else {
            let _f = v.fence.read().await;
            let epoch = v.epoch.load(std::sync::atomic::Ordering::Acquire);
            let mut got = None;
            for node in rec.in_sync.iter().filter(|n| **n != me) {
                let Ok(c) = self.replica_client(node).await else { continue };
                if let Ok(d) = c.call(v.id, epoch, Command::Read { offset: off, len: len as u32 }).await {
                    if d.len() == len {
                        got = Some((node.clone(), d));
                        break;
                    }
                }
            }
            let (node, data) = got.ok_or_else(|| VolumeError::FailedPrecondition("no other in-sync replica could supply the range".into()))?;
            let mut buf = self.buffer(len);
            buf.copy_from_slice(&data);
            self.local.write_local(v, off, buf, true).await.map_err(unrepaired)?;
            format!("from the replica on node {node}")
        };
        // Confirm: the range verifies now.
        let buf = self.buffer(len.next_multiple_of(crate::device::ALIGN));
        self.local.read_verified(v, off, buf).await.map_err(|e| VolumeError::FailedPrecondition(format!("still failing after the rewrite: {e}")))?;
        self.alerts.raise(
            Warning,
            "ChecksumRepaired",
            &format!("volume/{}", v.name),
            format!(
                "volume {}: {} block(s) failing their checksum on node {} were rewritten {source} (volume offsets {})",
                v.name,
                bad.len(),
                me,
                super::offsets(bad)
            ),
        );
        Ok(())
    }

    /// Asks the volume's target, on another node, to rewrite this node's copy of the range (the
    /// target alone can keep writes out of it meanwhile): through that node's SDK.
    async fn ask_target_to_repair(&self, target: &str, name: &str, off: u64, len: usize) -> Result<(), VolumeError> {
        use strata_api::v1 as pb;
        let remote = |what: String| VolumeError::FailedPrecondition(format!("target node {target}: {what}"));
        let url = crate::meta::sdk_endpoint(&*self.meta, target).await?.ok_or_else(|| remote("no SDK address".into()))?;
        let ch = self.peer_sdk(&url, std::time::Duration::from_secs(60)).await.map_err(remote)?;
        // A call of this node's own: signed with the cluster's system key when tokens are checked.
        let token = self.auth.as_ref().map(|a| a.system_token());
        let bearer = strata_api::auth::Bearer::new(token.as_deref()).map_err(remote)?;
        let mut c = pb::volume_service_client::VolumeServiceClient::with_interceptor(ch, bearer);
        let req = pb::RepairReplicaRequest { volume: name.into(), node: self.node.id.clone(), offset: off, length: len as u64 };
        c.repair_replica(req).await.map_err(|s| remote(s.message().to_string()))?;
        Ok(())
    }

    /// On the volume's target: rewrites `[off, off+len)` on `node`'s replica from a good copy.
    pub async fn repair_replica(&self, name: &str, node: &str, off: u64, len: u64) -> Result<(), VolumeError> {
        let v = self.volume(name).ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        let t = v.target().ok_or_else(|| VolumeError::FailedPrecondition(format!("volume {name} is not served by node {}", self.node.id)))?;
        if len == 0 || len > 64 << 20 || off.checked_add(len).is_none_or(|end| end > v.size()) {
            return Err(VolumeError::InvalidArgument(format!("range {off}+{len} is empty, longer than 64 MiB or past the volume's end")));
        }
        t.repair_peer(&self.local, node, off, len as usize).await.map_err(|e| VolumeError::FailedPrecondition(e.to_string()))
    }
}
