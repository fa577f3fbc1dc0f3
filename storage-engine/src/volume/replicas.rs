//! A volume's replicas: placement at creation, the handles of replicas held here, dropping a
//! replica's data, per-extent checksums.

use super::{Engine, PlacementSpec, Volume, VolumeError};
use crate::meta::MetaError;
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Engine {
    /// Chooses the nodes for `repl` replicas (this node first when it is eligible).
    pub(super) async fn place_replicas(&self, repl: u32, size: u64, spec: &PlacementSpec) -> Result<Vec<String>, VolumeError> {
        use crate::cluster::placement::{place, Candidate, Request};
        let meta = self.meta.clone();
        let (nodes, vols) = tokio::task::spawn_blocking(move || Ok::<_, MetaError>((meta.list_nodes()?, meta.list_volumes()?)))
            .await
            .map_err(|e| VolumeError::Meta(e.to_string()))??;
        let me = &self.node.id;
        let cands: Vec<Candidate> = nodes
            .into_iter()
            .map(|(n, state)| {
                let provisioned = vols.iter().map(|v| v.clone().normalized(me)).filter(|v| v.has_replica(&n.id)).map(|v| v.size).sum();
                let capacity = if &n.id == me { self.pool.total_bytes() } else { n.total_bytes };
                Candidate { online: state == crate::meta::NodeState::Online, zone: n.zone, rack: n.rack, capacity, provisioned, id: n.id }
            })
            .collect();
        let req = Request { repl, size, nodes: spec.nodes.clone(), zones: spec.zones.clone(), racks: spec.racks.clone(), prefer: Some(me.clone()), exclude: vec![] };
        place(&cands, &req).map_err(|e| {
            let hint = if cands.len() < repl as usize { "; add nodes (engines on one etcd) or lower repl" } else { "" };
            VolumeError::FailedPrecondition(format!("{e}{hint}"))
        })
    }

    /// A replica's data for a deleted volume: freed on its target's request.
    pub(crate) async fn drop_replica(&self, id: u64) -> Result<(), VolumeError> {
        let handle = self.volumes.read().values().find(|v| v.id == id).cloned();
        if let Some(v) = &handle {
            v.deleted.store(true, Ordering::Release);
            let _io = v.io_lock.write().await;
            self.volumes.write().remove(&v.name);
        }
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.free(id, &pool.volume_extents(id))).await.map_err(|e| VolumeError::Meta(e.to_string()))??;
        Ok(())
    }

    /// The handle of a volume with a replica here, loading it from the metadata store when it
    /// was created after this engine started. Blocking.
    pub fn replica_volume(&self, id: u64) -> Option<Arc<Volume>> {
        if let Some(v) = self.volumes.read().values().find(|v| v.id == id) {
            return Some(v.clone());
        }
        let me = &self.node.id;
        let rec = self.meta.list_volumes().ok()?.into_iter().map(|r| r.normalized(me)).find(|r| r.id == id)?;
        if !rec.has_replica(me) || rec.pending.is_some() {
            return None;
        }
        let mut vols = self.volumes.write();
        Some(vols.entry(rec.name.clone()).or_insert_with(|| Arc::new(Self::handle(&rec, me))).clone())
    }

    /// The crc32c of each allocated extent of this node's replica of `name`, by logical extent.
    pub async fn extent_checksums(&self, name: &str) -> Result<Vec<(u64, u32)>, VolumeError> {
        let rec = self.meta.get_volume(name)?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        let (e, id) = (self.myself(), rec.id);
        let v = match e {
            Some(e) => tokio::task::spawn_blocking(move || e.replica_volume(id)).await.ok().flatten(),
            None => None,
        }
        .ok_or_else(|| VolumeError::FailedPrecondition(format!("node {} holds no replica of volume {name}", self.node.id)))?;
        let es = self.pool.extent_size;
        let mut out = Vec::new();
        let mut lexts = self.pool.volume_extents(v.id);
        lexts.sort_unstable();
        for l in lexts {
            let off = l * es;
            let len = es.min(v.size().saturating_sub(off)) as usize;
            if len == 0 {
                continue;
            }
            let d = self.read_local(&v, off, len).await.map_err(|err| VolumeError::FailedPrecondition(format!("reading extent {l}: {err}")))?;
            out.push((l, crc32c::crc32c(d.bytes())));
        }
        Ok(out)
    }
}
