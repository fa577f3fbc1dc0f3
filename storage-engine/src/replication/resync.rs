//! Resync: copies to a returning replica the regions it missed, while I/O continues.
//!
//! The replica first gets every new write (state `CatchingUp`), then the missed regions one by
//! one, each under the volume's region lock so no write to it interleaves; the progress is
//! written down four times a second, so an interrupted resync resumes where it stopped. With no record
//! of missed regions (it was lost, or the replica is new) every allocated extent of the source
//! and of the replica is copied: a thin full rebuild. When nothing is left the replica rejoins
//! the in-sync set by compare-and-swap, with I/O held for that moment.

use super::dirty::REGION;
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

/// Runs for the target's life.
pub async fn run(host: Arc<Host>, t: Arc<Target>) {
    let mut alerted = std::collections::HashSet::new();
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
    tracing::info!(volume = %t.name, replica = %p.node, regions = p.dirty.len(), full = p.full_rebuild.load(Ordering::Relaxed), "resync started");
    let mut next = 0u64;
    let mut persisted = Instant::now();
    let started = Instant::now();
    let mut bytes = 0u64;
    loop {
        let region = match p.dirty.next_from(next) {
            Some(r) => r,
            None if p.dirty.is_empty() => break,
            None => {
                next = 0;
                continue;
            }
        };
        next = region + 1;
        copy_region(e, t, p, region).await?;
        bytes += REGION;
        if persisted.elapsed() >= PERSIST_EVERY {
            persist(p).await?;
            persisted = Instant::now();
        }
        // Rate limit: stay behind `resync_rate` bytes per second on average.
        if t.resync_rate > 0 {
            let due = Duration::from_secs_f64(bytes as f64 / t.resync_rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    // What resync copied is durable on the replica before it counts as in sync (the copies are
    // written without FUA).
    let c = p.client_now().ok_or_else(|| TargetError::NoReplica(t.name.clone()))?;
    c.call(t.vol.id, t.epoch, Command::Flush).await?;
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

async fn persist(p: &Arc<Peer>) -> Result<(), TargetError> {
    let p2 = p.clone();
    dirty_blocking("recording resync progress", move || p2.dirty.persist()).await
}

/// Records every extent allocated on the source or on the replica as missed.
async fn plan_full_rebuild(e: &Host, t: &Target, p: &Arc<Peer>) -> Result<(), TargetError> {
    let c = p.client_now().ok_or_else(|| TargetError::NoReplica(t.name.clone()))?;
    let theirs = c.call(t.vol.id, t.epoch, Command::Extents).await?;
    let mut extents: std::collections::BTreeSet<u64> = theirs.chunks_exact(8).map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes"))).collect();
    extents.extend(e.local.pool.volume_extents(t.vol.id));
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

/// Copies one region from the source (this node's replica, else an in-sync peer).
async fn copy_region(e: &Host, t: &Target, p: &Arc<Peer>, region: u64) -> Result<(), TargetError> {
    let _w = t.region_lock.write().await;
    if p.state() != PeerState::CatchingUp {
        return Err(TargetError::NoReplica(format!("{} (replica {} failed during resync)", t.name, p.node)));
    }
    let size = t.vol.size();
    let off = region * REGION;
    if off >= size {
        p.dirty.clear(region);
        return Ok(());
    }
    let len = REGION.min(size - off) as usize;
    let data = t.read_source(&e.local, off, len).await;
    let data = data.map_err(|err| TargetError::NoReplica(format!("{}: reading the source: {err}", t.name)))?;
    crate::failpoint::point("resync.copy").await.map_err(|e| TargetError::NoReplica(format!("{}: {e}", t.name)))?;
    let c = p.client_now().ok_or_else(|| TargetError::NoReplica(t.name.clone()))?;
    let bytes = data.bytes();
    let r = if bytes.iter().all(|b| *b == 0) {
        c.call(t.vol.id, t.epoch, Command::WriteZeroes { offset: off, len: len as u32, fua: false, keep_allocated: false }).await
    } else {
        c.call(t.vol.id, t.epoch, Command::Write { offset: off, data: bytes::Bytes::copy_from_slice(bytes), fua: false }).await
    };
    r?;
    p.dirty.clear(region);
    p.copied.fetch_add(len as u64, Ordering::Relaxed);
    Ok(())
}
