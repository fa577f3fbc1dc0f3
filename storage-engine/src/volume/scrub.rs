//! Background work on block checksums: settling (writing checksums of idle extents and
//! clearing their intent bits) and the scrub, which reads every allocated extent of every
//! replica on this node at a bounded rate and verifies it. A mismatch raises an alert; on the
//! volume's target it is repaired from an in-sync replica at once.

use super::{Engine, IoError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often idle extents' checksums are written out.
pub const SETTLE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct ScrubConfig {
    /// Bytes per second read by the scrub (0: no scrub).
    pub rate: u64,
    /// Time from the start of one pass to the start of the next.
    pub every: Duration,
}

/// What one scrub pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScrubReport {
    pub extents: u64,
    pub bad_blocks: u64,
    pub repaired_blocks: u64,
}

impl Engine {
    /// Settles checksums every `SETTLE_EVERY` and scrubs per `scrub`, for the engine's life.
    pub fn run_checksum_tasks(self: &Arc<Self>, scrub: ScrubConfig) {
        if !self.pool.has_checksums() {
            return;
        }
        let e = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SETTLE_EVERY).await;
                let pool = e.pool.clone();
                match tokio::task::spawn_blocking(move || pool.settle_checksums()).await {
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
        tokio::spawn(async move {
            loop {
                let t0 = Instant::now();
                let r = e.scrub_once(scrub.rate).await;
                tracing::info!(extents = r.extents, bad = r.bad_blocks, repaired = r.repaired_blocks, secs = t0.elapsed().as_secs(), "scrub pass done");
                tokio::time::sleep(scrub.every.saturating_sub(t0.elapsed()).max(Duration::from_secs(1))).await;
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
                if let Err(IoError::Corrupt(bad)) = self.read_verified(&v, off, buf).await {
                    report.bad_blocks += bad.len() as u64;
                    if let Some(t) = v.target().filter(|t| t.local && !t.peers.is_empty()) {
                        if t.repair_read(self, off, len as usize).await.is_ok() {
                            report.repaired_blocks += bad.len() as u64;
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
}
