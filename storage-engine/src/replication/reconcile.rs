//! Reconcile: after a target stopped uncleanly (crash, kill, takeover), a write it had sent may
//! have reached some replicas and not others. It was never acknowledged, but in-sync replicas
//! must still be identical, so the new target compares every allocated extent of each in-sync
//! replica with its source (this node's replica, else the first in-sync peer) and copies the
//! extents that differ. Each extent is compared and repaired under the region lock, so writes
//! cannot slip between the comparison and the copy. I/O continues meanwhile (reads come from
//! the source).

use super::frame::Command;
use super::target::{PeerState, Target, TargetError};
use super::Host;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub async fn run(e: Arc<Host>, t: Arc<Target>) {
    match reconcile(&e, &t).await {
        Ok(repaired) => {
            if repaired > 0 {
                tracing::warn!(volume = %t.name, repaired, "replicas differed after an unclean target change; extents copied from the source");
            } else {
                tracing::info!(volume = %t.name, "replicas compared: identical");
            }
        }
        Err(err) => tracing::warn!(volume = %t.name, "comparing replicas stopped: {err}"),
    }
    t.verifying.store(false, Ordering::Release);
}

/// The crc32c of `[off, off+len)` on the source.
async fn source_sum(e: &Host, t: &Target, off: u64, len: usize) -> Result<u32, TargetError> {
    let d = t.read_source(&e.local, off, len).await.map_err(|err| TargetError::NoReplica(format!("{}: {err}", t.name)))?;
    Ok(crc32c::crc32c(d.bytes()))
}

async fn reconcile(e: &Host, t: &Target) -> Result<u64, TargetError> {
    let mut extents: BTreeSet<u64> = e.local.pool.volume_extents(t.vol.id).into_iter().collect();
    for p in t.peers.iter().filter(|p| p.state() == PeerState::InSync) {
        if let Some(c) = p.client_now() {
            match c.call(t.vol.id, t.epoch, Command::Extents).await {
                Ok(b) => extents.extend(b.chunks_exact(8).map(|x| u64::from_be_bytes(x.try_into().expect("8 bytes")))),
                Err(err) if err.is_stale() => return Err(TargetError::Fenced(t.name.clone())),
                Err(err) => t.peer_failed(p, None).await.map(|_| tracing::warn!(volume = %t.name, replica = %p.node, "{err}"))?,
            }
        }
    }
    let es = e.local.pool.extent_size;
    let mut repaired = 0;
    for x in extents {
        if t.is_closed() || t.is_fenced() {
            break;
        }
        let _w = t.region_lock.write().await;
        let size = t.vol.size();
        let off = x * es;
        if off >= size {
            continue;
        }
        let len = es.min(size - off) as usize;
        let want = source_sum(e, t, off, len).await?;
        let mut data: Option<bytes::Bytes> = None;
        for p in t.peers.iter().filter(|p| p.state() == PeerState::InSync) {
            let Some(c) = p.client_now() else { continue };
            let got = match c.call(t.vol.id, t.epoch, Command::Checksum { offset: off, len: len as u32 }).await {
                Ok(b) if b.len() == 4 => u32::from_be_bytes(b[..4].try_into().expect("4 bytes")),
                Ok(_) => want ^ 1,
                Err(err) if err.is_stale() => return Err(TargetError::Fenced(t.name.clone())),
                Err(_) => {
                    t.peer_failed(p, Some((off, len as u64))).await?;
                    continue;
                }
            };
            if got == want {
                continue;
            }
            let payload = match &data {
                Some(d) => d.clone(),
                None => {
                    let d = t.read_source(&e.local, off, len).await;
                    let d = d.map_err(|err| TargetError::NoReplica(format!("{}: {err}", t.name)))?;
                    data.insert(bytes::Bytes::copy_from_slice(d.bytes())).clone()
                }
            };
            let r = c.call(t.vol.id, t.epoch, Command::Write { offset: off, data: payload, fua: false }).await;
            match r {
                Ok(_) => repaired += 1,
                Err(err) if err.is_stale() => return Err(TargetError::Fenced(t.name.clone())),
                Err(_) => t.peer_failed(p, Some((off, len as u64))).await?,
            }
        }
    }
    Ok(repaired)
}
