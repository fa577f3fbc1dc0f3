//! Resync: copies to a returning replica the blocks it missed, while I/O continues.
//!
//! The replica first gets every new write (state `CatchingUp`), then the missed regions in
//! batches (2 MiB while clients do I/O, 16 MiB while they do none) — of each region only its missed 4 KiB blocks, adjacent ones copied
//! together, several copies in flight, read without readahead — each batch under the volume's
//! region lock so no write to it interleaves; `--resync-rate` paces it only while clients do
//! I/O on the volume; the progress is
//! written down four times a second, so an interrupted resync resumes where it stopped. With no record
//! of missed regions (it was lost, or the replica is new) every allocated extent of the source
//! and of the replica is copied: a thin full rebuild. When nothing is left the replica rejoins
//! the in-sync set by compare-and-swap, with I/O held for that moment.

use super::dirty::{runs, BLOCK, REGION};
use super::frame::Command;
use super::target::{dirty_blocking, Peer, PeerState, Target, TargetError};
use super::Host;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the target looks for replicas to resync.
const POLL: Duration = Duration::from_secs(1);
const PERSIST_EVERY: Duration = Duration::from_millis(250);

/// Raises the replica alerts an operator must see: out of sync (the volume is degraded) once
/// per departure, and back in sync.
fn alert_replica(host: &Host, t: &Target, p: &Peer, alerted: &mut std::collections::HashSet<String>) {
    use crate::alerts::Severity::{Notify, Warning};
    let resource = format!("volume/{}", t.name);
    match p.state() {
        PeerState::InSync => {
            if alerted.remove(&p.node) {
                host.local.alerts.raise(
                    Notify,
                    "ReplicaInSync",
                    &resource,
                    format!("volume {}: the replica on node {} is back in sync", t.name, p.node),
                );
            }
        }
        _ => {
            if alerted.insert(p.node.clone()) {
                host.local.alerts.raise(
                    Warning,
                    "ReplicaOutOfSync",
                    &resource,
                    format!("volume {} is degraded: the replica on node {} is out of sync (it resyncs when reachable)", t.name, p.node),
                );
            }
        }
    }
}

/// Raises VolumeDegraded when the first replica of the volume falls out of sync, and
/// VolumeHealthy when the last one is back.
fn alert_volume(host: &Host, t: &Target, out: usize, degraded: &mut bool) {
    use crate::alerts::Severity::{Notify, Warning};
    let now = out > 0;
    if now == *degraded {
        return;
    }
    *degraded = now;
    let total = t.peers.len() + usize::from(t.local);
    let resource = format!("volume/{}", t.name);
    if now {
        let msg = format!("volume {} is degraded: {} of its {total} replicas are in sync", t.name, total - out);
        host.local.alerts.raise(Warning, "VolumeDegraded", &resource, msg);
    } else {
        host.local.alerts.raise(Notify, "VolumeHealthy", &resource, format!("volume {}: every replica is in sync again", t.name));
    }
}

/// Runs for the target's life.
pub async fn run(host: Arc<Host>, t: Arc<Target>) {
    let mut alerted = std::collections::HashSet::new();
    let mut degraded = false;
    while !t.is_closed() && !t.is_fenced() {
        t.reconnect_broken().await;
        for p in &t.peers {
            alert_replica(&host, &t, p, &mut alerted);
            if p.state() != PeerState::OutOfSync || t.is_closed() {
                continue;
            }
            match resync(&host, &t, p).await {
                Ok(()) => {
                    tracing::info!(volume = %t.name, replica = %p.node, copied = p.copied.load(Ordering::Relaxed), "replica back in sync");
                    alert_replica(&host, &t, p, &mut alerted);
                }
                Err(e) => {
                    tracing::debug!(volume = %t.name, replica = %p.node, "resync not possible now: {e}");
                    if p.state() == PeerState::CatchingUp {
                        // Writes it got since are fine; the regions left are still recorded.
                        p.set_state(PeerState::OutOfSync);
                    }
                    watch_offline(&host, &t, p).await;
                }
            }
        }
        alert_volume(&host, &t, alerted.len(), &mut degraded);
        tokio::time::sleep(POLL).await;
    }
}

/// Rebuilds the replica elsewhere once its node has been offline for `--replica-timeout`.
async fn watch_offline(e: &Arc<Host>, t: &Arc<Target>, p: &Arc<Peer>) {
    if t.replica_timeout.is_zero() {
        return;
    }
    let offline = t.membership.is_offline(&p.node).await;
    let due = {
        let mut since = p.offline_since.lock();
        if !offline {
            *since = None;
            false
        } else {
            since.get_or_insert_with(Instant::now).elapsed() >= t.replica_timeout
        }
    };
    if due {
        let mut asked = p.replace_asked.lock();
        if asked.is_none_or(|at| at.elapsed() >= Duration::from_secs(30)) {
            *asked = Some(Instant::now());
            e.request_replacement(&t.name, &p.node);
        }
    }
}

async fn resync(e: &Host, t: &Target, p: &Arc<Peer>) -> Result<(), TargetError> {
    if let Some(addr) = t.membership.replication_address(&p.node).await {
        *p.addr.lock() = addr;
    }
    t.connect(p, t.vol.size()).await?;
    // The record may have asked for a full rebuild of this replica since this target started
    // (its node salvaged a journal): what this target recorded as missed is not enough then.
    if !p.planned_full.load(Ordering::Acquire) {
        let rec = t.membership.record(&t.name).await?;
        if rec.is_some_and(|r| r.rebuild.contains(&p.node)) && !p.full_rebuild.load(Ordering::Acquire) {
            tracing::warn!(volume = %t.name, replica = %p.node, "the record asks for a full rebuild of this replica (its journal was salvaged)");
            p.lose_record().await?;
        }
    }
    if p.full_rebuild.load(Ordering::Acquire) {
        plan_full_rebuild(e, t, p).await?;
    }
    p.set_state(PeerState::CatchingUp);
    tracing::info!(volume = %t.name, replica = %p.node, missed_bytes = p.dirty.bytes(), full = p.full_rebuild.load(Ordering::Relaxed), "resync started");
    // A resync that stops once it has begun is worth a line (one that cannot begin, while a
    // replica's node is down, is retried every second and is not).
    copy_missed(e, t, p).await.inspect_err(|err| {
        tracing::warn!(volume = %t.name, replica = %p.node, missed_bytes = p.dirty.bytes(), "resync stopped: {err}; it starts again with what is still missing");
    })
}

/// The copy of a resync, once begun: every missed block, then the replica back in the in-sync
/// set.
async fn copy_missed(e: &Host, t: &Target, p: &Arc<Peer>) -> Result<(), TargetError> {
    let mut next = 0u64;
    let mut persisted = Instant::now();
    let mut pace = Pace::new(t);
    loop {
        // The next regions with missed blocks, up to a batch.
        let (mut batch, mut batch_bytes) = (Vec::new(), 0u64);
        let mut from = next;
        let limit = if pace.busy { BATCH_BYTES_BUSY } else { BATCH_BYTES_IDLE };
        while batch_bytes < limit && batch.len() < BATCH_REGIONS {
            let Some(r) = p.dirty.next_from(from) else { break };
            batch_bytes += p.dirty.mask(r).count_ones() as u64 * BLOCK;
            batch.push(r);
            from = r + 1;
        }
        if batch.is_empty() {
            if p.dirty.is_empty() {
                break;
            }
            next = 0;
            continue;
        }
        next = from;
        let copied = copy_batch(e, t, p, &batch).await?;
        if persisted.elapsed() >= PERSIST_EVERY {
            // The copies went without FUA: they are made durable on the replica before the record
            // forgets them, else a power cut there could lose blocks no record would copy again.
            flush_replica(t, p).await?;
            persist(p).await?;
            persisted = Instant::now();
        }
        pace.after(t, copied).await;
    }
    // What resync copied is durable on the replica before it counts as in sync (the copies are
    // written without FUA).
    flush_replica(t, p).await?;
    let _w = t.region_lock.write().await;
    if p.state() != PeerState::CatchingUp || !p.dirty.is_empty() {
        return Err(TargetError::NoReplica(format!("{} (replica {} fell behind again)", t.name, p.node)));
    }
    let node = p.node.clone();
    t.change_record(move |r| {
        if !r.in_sync.contains(&node) && r.replicas.contains(&node) {
            r.in_sync.push(node.clone());
        }
        if r.replicas.contains(&node) {
            r.rebuild.retain(|n| n != &node);
        }
    })
    .await?;
    p.mark_in_sync();
    p.planned_full.store(false, Ordering::Release);
    let p2 = p.clone();
    let _ = tokio::task::spawn_blocking(move || p2.dirty.remove()).await;
    Ok(())
}

async fn flush_replica(t: &Target, p: &Peer) -> Result<(), TargetError> {
    let c = p.client_now().ok_or_else(|| TargetError::NoReplica(t.name.clone()))?;
    c.call(t.vol.id, t.epoch, Command::Flush).await?;
    Ok(())
}

async fn persist(p: &Arc<Peer>) -> Result<(), TargetError> {
    let p2 = p.clone();
    dirty_blocking("recording resync progress", move || p2.dirty.persist()).await
}

/// Records every extent allocated on the source (this node's in-sync replica, else the in-sync
/// peers) or on the replica as missed.
async fn plan_full_rebuild(e: &Host, t: &Target, p: &Arc<Peer>) -> Result<(), TargetError> {
    let c = p.client_now().ok_or_else(|| TargetError::NoReplica(t.name.clone()))?;
    let theirs = c.call(t.vol.id, t.epoch, Command::Extents).await?;
    let mut extents: std::collections::BTreeSet<u64> = theirs.chunks_exact(8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))).collect();
    extents.extend(t.source_extents(&e.local).await?);
    let es = e.local.pool.extent_size;
    let size = t.vol.size();
    let p2 = p.clone();
    dirty_blocking("recording the rebuild plan", move || {
        for x in extents {
            let off = x * es;
            if off < size {
                p2.dirty.mark_quiet(off, es.min(size - off));
            }
        }
        p2.dirty.persist()
    })
    .await?;
    p.full_rebuild.store(false, Ordering::Release);
    p.planned_full.store(true, Ordering::Release);
    Ok(())
}

/// Bytes of missed blocks copied under one hold of the region lock (client I/O waits that long)
/// while clients do I/O, and while they do none; at most this many regions.
const BATCH_BYTES_BUSY: u64 = 2 << 20;
const BATCH_BYTES_IDLE: u64 = 16 << 20;
const BATCH_REGIONS: usize = 1024;
/// Largest single copy: adjacent missed blocks are read and written together up to this.
const MAX_COPY: u64 = 1 << 20;
/// Copies in flight at once within a batch.
const COPIES_IN_FLIGHT: usize = 16;

/// The resync's rate: `--resync-rate` while clients do I/O on the volume, full speed while they
/// do none (a rebuild on a quiet node runs at what the disks and the network give).
struct Pace {
    started: Instant,
    /// Bytes copied since `started` while throttled.
    bytes: u64,
    seen_ops: u64,
    /// Clients did I/O during the last batch (the next one is small, and paced).
    busy: bool,
}

impl Pace {
    fn new(t: &Target) -> Pace {
        Pace { started: Instant::now(), bytes: 0, seen_ops: t.client_ops.load(Ordering::Relaxed), busy: true }
    }

    async fn after(&mut self, t: &Target, copied: u64) {
        let ops = t.client_ops.load(Ordering::Relaxed);
        self.busy = ops != self.seen_ops;
        self.seen_ops = ops;
        if t.resync_rate == 0 || !self.busy {
            // Idle: the throttle's clock starts again when clients come back.
            self.started = Instant::now();
            self.bytes = 0;
            return;
        }
        self.bytes += copied;
        let due = Duration::from_secs_f64(self.bytes as f64 / t.resync_rate as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The byte ranges of `regions`' missed blocks, adjacent ones merged up to MAX_COPY, clipped to
/// `size`.
fn copy_ranges(p: &Peer, regions: &[u64], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &r in regions {
        for (first, n) in runs(p.dirty.mask(r)) {
            let off = r * REGION + first * BLOCK;
            if off >= size {
                break;
            }
            let len = (n * BLOCK).min(size - off);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off && *l + len <= MAX_COPY => *l += len,
                _ => out.push((off, len)),
            }
        }
    }
    out
}

/// Copies the missed blocks of `regions` from the source (this node's replica, else an in-sync
/// peer), several copies in flight, under one hold of the region lock; returns the bytes copied.
///
/// When one copy fails, no new one starts, and the lock is held until every copy already sent
/// has been answered or has timed out. A request is on its way once sent: a copy abandoned in
/// flight would still reach the replica, and landing after the lock is released, it could put
/// the older data it carries over a client's newer write to the same blocks.
pub(super) async fn copy_batch(e: &Host, t: &Target, p: &Arc<Peer>, regions: &[u64]) -> Result<u64, TargetError> {
    use futures::stream::StreamExt;
    let _w = t.region_lock.write().await;
    if p.state() != PeerState::CatchingUp {
        return Err(TargetError::NoReplica(format!("{} (replica {} failed during resync)", t.name, p.node)));
    }
    let c = p.client_now().ok_or_else(|| TargetError::NoReplica(t.name.clone()))?;
    let ranges = copy_ranges(p, regions, t.vol.size());
    let copied: u64 = ranges.iter().map(|(_, l)| l).sum();
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<(), TargetError>> = futures::stream::iter(ranges)
        .map(|(off, len)| {
            let (c, failed) = (c.clone(), &failed);
            async move {
                if failed.load(Ordering::Acquire) {
                    return Ok(());
                }
                let res = copy_range(e, t, &c, off, len as usize).await;
                if res.is_err() {
                    failed.store(true, Ordering::Release);
                }
                res
            }
        })
        .buffer_unordered(COPIES_IN_FLIGHT)
        .collect()
        .await;
    if let Some(err) = results.into_iter().find_map(Result::err) {
        return Err(err);
    }
    for r in regions {
        p.dirty.clear(*r);
    }
    p.copied.fetch_add(copied, Ordering::Relaxed);
    Ok(copied)
}

/// One copy of a resync: `[off, off+len)` read from the source and written to the replica.
async fn copy_range(e: &Host, t: &Target, c: &Arc<dyn super::legs::ReplicaIo>, off: u64, len: usize) -> Result<(), TargetError> {
    let data = t.read_source(&e.local, off, len).await;
    let data = data.map_err(|err| TargetError::NoReplica(format!("{}: reading the source: {err}", t.name)))?;
    crate::failpoint::point("resync.copy").await.map_err(|e| TargetError::NoReplica(format!("{}: {e}", t.name)))?;
    let cmd = if data.bytes().iter().all(|b| *b == 0) {
        Command::WriteZeroes { offset: off, len: len as u32, fua: false, keep_allocated: false }
    } else {
        // The read's buffer goes out as it is (no copy into the frame).
        Command::Write { offset: off, data: bytes::Bytes::from_owner(data), fua: false }
    };
    c.call(t.vol.id, t.epoch, cmd).await.map(|_| ()).map_err(TargetError::from)
}
