//! A volume's replicas: placement at creation, the handles of replicas held here, dropping a
//! replica's data, per-extent checksums.

use super::{PlacementSpec, Service, Volume, VolumeError, VolumeInfo, MAX_REPL};
use crate::meta::replication_address;
use crate::meta::VolumeRecord;
use crate::replication::client::Client;
use crate::replication::frame::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Why a request to one replica of a volume (on this node or another) failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("node {0} has no replication address")]
    NoAddress(String),
    #[error(transparent)]
    Call(#[from] crate::replication::client::CallError),
    #[error(transparent)]
    Io(#[from] crate::replica::IoError),
    #[error("this node holds no replica of {0}")]
    NotHere(String),
    #[error(transparent)]
    Volume(#[from] VolumeError),
}

impl Service {
    /// Chooses the nodes for `repl` replicas (the preferred node, else this node, first when it
    /// is eligible), none of
    /// them in `exclude` (the nodes that already hold one).
    pub(crate) async fn place_replicas(&self, repl: u32, size: u64, spec: &PlacementSpec, exclude: &[String]) -> Result<Vec<String>, VolumeError> {
        use crate::placement::{place, Request};
        let (nodes, provisioned) = (self.meta.list_nodes().await?, self.meta.provisioned().await?);
        let me = &self.node.id;
        let cands = crate::meta::placement_candidates(nodes, &provisioned, (me, self.pool.total_bytes(), self.in_maintenance()));
        let req = Request {
            repl,
            size,
            nodes: spec.nodes.clone(),
            zones: spec.zones.clone(),
            racks: spec.racks.clone(),
            prefer: Some(spec.prefer.clone().unwrap_or_else(|| me.clone())),
            exclude: exclude.to_vec(),
        };
        place(&cands, &req).map_err(|e| {
            let hint = if cands.len() < repl as usize { "; add nodes (engines on one etcd) or lower repl" } else { "" };
            VolumeError::FailedPrecondition(format!("{e}{hint}"))
        })
    }

    /// A replica's data for a deleted volume: freed on its target's request.
    pub(crate) async fn free_replica(&self, id: u64) -> Result<(), VolumeError> {
        let handle = self.volumes.read().values().find(|v| v.id == id).cloned();
        if let Some(v) = &handle {
            v.deleted.store(true, Ordering::Release);
            let _io = v.io_lock.write().await;
            self.volumes.write().remove(&v.name);
        }
        self.free_local(id).await
    }

    /// The handle of a volume with a replica here, loading it from the metadata store when it
    /// was created after this engine started.
    pub async fn replica_volume(&self, id: u64) -> Option<Arc<Volume>> {
        if let Some(v) = self.volumes.read().values().find(|v| v.id == id) {
            return Some(v.clone());
        }
        let me = &self.node.id;
        let rec = self.meta.list_volumes().await.ok()?.into_iter().map(|r| r.normalized(me)).find(|r| r.id == id)?;
        // A restore runs on a volume marked as being restored.
        if !rec.has_replica(me) || !matches!(rec.pending, None | Some(crate::meta::PendingOp::Restore { .. })) {
            return None;
        }
        let mut vols = self.volumes.write();
        Some(vols.entry(rec.name.clone()).or_insert_with(|| Arc::new(Self::handle(&rec))).clone())
    }

    /// The crc32c of each allocated extent of this node's replica of `name`, by logical extent.
    pub async fn extent_checksums(&self, name: &str) -> Result<Vec<(u64, u32)>, VolumeError> {
        let rec = self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        let v = self
            .replica_volume(rec.id)
            .await
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
            let d = self
                .local
                .read_local(&v.replica, off, len)
                .await
                .map_err(|err| VolumeError::FailedPrecondition(format!("reading extent {l}: {err}")))?;
            out.push((l, crc32c::crc32c(d.bytes())));
        }
        Ok(out)
    }

    /// Frees a volume's replica on another node over the replication protocol.
    pub(super) async fn drop_remote(&self, node: &str, id: u64) -> Result<(), ReplicaError> {
        // The highest epoch: a drop is never refused as stale.
        self.call_replica(node, id, u64::MAX, Command::Drop).await
    }

    /// A replication connection to `node`'s engine.
    pub(super) async fn replica_client(&self, node: &str) -> Result<Arc<Client>, ReplicaError> {
        let addr = replication_address(&*self.meta, node).await.ok_or_else(|| ReplicaError::NoAddress(node.to_string()))?;
        Ok(Client::connect_to(node, &addr, self.repl.timeout, self.tls.as_deref()).await?)
    }

    /// One replication request (no payload) for volume id `id` to `node`'s engine.
    pub(super) async fn call_replica(&self, node: &str, id: u64, epoch: u64, cmd: Command) -> Result<(), ReplicaError> {
        let c = self.replica_client(node).await?;
        c.call(id, epoch, cmd).await?;
        Ok(())
    }

    /// Frees volume id `id`'s extents on `node`: here directly, elsewhere with a DROP.
    pub(super) async fn free_on(&self, node: &str, id: u64) -> Result<(), ReplicaError> {
        if node != self.node.id {
            return self.drop_remote(node, id).await;
        }
        Ok(self.free_local(id).await?)
    }

    /// Changes the number of replicas online (`stratactl volume ha-update`). Growing places the
    /// new replicas (on `node` if given) and a thin full rebuild fills them while I/O goes on;
    /// they count as in sync once it is done. Shrinking removes `node`, else an out-of-sync
    /// replica, else the last one that is not on this node, and frees its data. Only the target
    /// changes replicas, and never below one in-sync replica.
    #[tracing::instrument(name = "ha_update", skip_all, fields(volume = %name, node = %self.node.id, repl))]
    pub async fn ha_update(&self, name: &str, repl: u32, node: Option<String>) -> Result<VolumeInfo, VolumeError> {
        if !(1..=MAX_REPL).contains(&repl) {
            return Err(VolumeError::InvalidArgument(format!("repl {repl} is out of range: use 1 to {MAX_REPL}")));
        }
        let _g = self.lifecycle.lock().await;
        let me = self.node.id.clone();
        let rec = self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?.normalized(&me);
        self.must_be_target(&rec)?;
        if let Some(op) = &rec.pending {
            return Err(VolumeError::FailedPrecondition(op.describe(name)));
        }
        let cur = rec.replicas.len() as u32;
        let mut next = rec.clone();
        let mut removed = Vec::new();
        if repl > cur {
            let spec = PlacementSpec { nodes: node.into_iter().collect(), ..Default::default() };
            let added = self.place_replicas(repl - cur, rec.size, &spec, &rec.replicas).await.map_err(|e| match e {
                VolumeError::FailedPrecondition(why) => VolumeError::FailedPrecondition(format!(
                    "cannot raise volume {name} to repl {repl}: another {} replica(s) needed; {why}",
                    repl - cur
                )),
                other => other,
            })?;
            // A node that gets a replica back rebuilds it in full; its old data is not "to free".
            next.dropped.retain(|n| !added.contains(n));
            next.replicas.extend(added);
        } else if repl < cur {
            // One step at a time, as Portworx does: dropping two copies in one call leaves no
            // moment to see that the one kept is the one wanted.
            if repl + 1 != cur {
                return Err(VolumeError::InvalidArgument(format!(
                    "volume {name} has {cur} replicas: remove one at a time (repl {}, then lower)",
                    cur - 1
                )));
            }
            removed = match node {
                Some(n) if !rec.has_replica(&n) => {
                    return Err(VolumeError::InvalidArgument(format!(
                        "node {n} holds no replica of volume {name} (replicas: {})",
                        rec.replicas.join(",")
                    )));
                }
                Some(n) => vec![n],
                None => {
                    // Out-of-sync first, then the others from the end, this node last.
                    let mut order: Vec<(usize, &String)> = rec.replicas.iter().enumerate().collect();
                    order.sort_by_key(|(i, n)| (rec.is_in_sync(n), **n == me, std::cmp::Reverse(*i)));
                    order.into_iter().take((cur - repl) as usize).map(|(_, n)| n.clone()).collect()
                }
            };
            next.replicas.retain(|n| !removed.contains(n));
            next.in_sync.retain(|n| !removed.contains(n));
            next.dropped.extend(removed.iter().cloned());
            if next.in_sync.is_empty() {
                return Err(VolumeError::FailedPrecondition(format!(
                    "removing {} would leave volume {name} without an in-sync replica; wait for the resync to finish",
                    removed.join(",")
                )));
            }
        } else if let Some(n) = node {
            if !rec.has_replica(&n) {
                return Err(VolumeError::InvalidArgument(format!(
                    "volume {name} already has {repl} replica(s); to move one to {n}, raise repl first and then lower it"
                )));
            }
        }
        next.repl = repl;
        let next = self.meta.update_volume(&next).await?.normalized(&me);
        self.retarget(&next).await?;
        for n in &removed {
            self.remove_replica_data(n, &next).await;
        }
        tracing::info!(volume = %name, repl, replicas = ?next.replicas, removed = ?removed, "replicas changed");
        self.info_of(next)
    }

    /// Replaces a replica whose node stayed offline past `--replica-timeout` with one on
    /// another node (placed like any replica). Called by the target's resync loop.
    pub async fn replace_replica(&self, name: &str, dead: &str) -> Result<Vec<String>, VolumeError> {
        let _g = self.lifecycle.lock().await;
        let me = self.node.id.clone();
        let rec = self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?.normalized(&me);
        self.must_be_target(&rec)?;
        if !rec.has_replica(dead) || rec.is_in_sync(dead) || rec.pending.is_some() {
            return Ok(rec.replicas);
        }
        // A node in maintenance keeps its replicas: they resync when it is back.
        if self.meta.list_nodes().await?.iter().any(|(n, _)| n.id == dead && n.maintenance) {
            tracing::info!(volume = %name, node = %dead, "replica kept: its node is in maintenance");
            return Ok(rec.replicas);
        }
        let added = self.place_replicas(1, rec.size, &PlacementSpec::default(), &rec.replicas).await?;
        let mut next = rec.clone();
        next.replicas.retain(|n| n != dead);
        next.replicas.extend(added.iter().cloned());
        next.dropped.push(dead.to_string());
        let next = self.meta.update_volume(&next).await?.normalized(&me);
        self.retarget(&next).await?;
        self.remove_replica_data(dead, &next).await;
        tracing::warn!(volume = %name, %dead, new = ?added, "replica rebuilt elsewhere: its node stayed offline past --replica-timeout");
        Ok(next.replicas)
    }

    /// Frees a removed replica's data (here, or on its node when reachable; a node that is down
    /// frees it when its engine starts, as the record no longer lists it).
    async fn remove_replica_data(&self, node: &str, rec: &VolumeRecord) {
        let _ = std::fs::remove_file(crate::replication::dirty::DirtyLog::path_for(&self.repl.data_dir, rec.id, node));
        match self.free_on(node, rec.id).await {
            // The node's entry in `dropped` goes once the data is gone.
            Ok(()) => {
                if let Err(e) = self.forget_node_dropped(&rec.name, node).await {
                    tracing::warn!(volume = %rec.name, %node, "freed, but the record still lists the node as to free: {e}");
                }
            }
            Err(e) => tracing::warn!(volume = %rec.name, %node, "removed replica not freed now (freed when the node is back): {e}"),
        }
    }

    async fn forget_node_dropped(&self, name: &str, node: &str) -> Result<(), VolumeError> {
        super::forget_dropped(&*self.meta, name, node).await
    }

    /// Serves `rec` with a new replica set: client I/O in flight on the old target drains
    /// first, and the requests that arrive meanwhile wait and then go to the new target.
    async fn retarget(&self, rec: &VolumeRecord) -> Result<(), VolumeError> {
        let handle = self.volume(&rec.name).ok_or_else(|| VolumeError::NotFound(rec.name.clone()))?;
        let _switch = handle.switch.write().await;
        let old = handle.target.read().clone();
        let _drain = match &old {
            Some(t) => Some(t.region_lock.write().await),
            None => None,
        };
        self.start_target(handle.clone(), rec, false).await
    }
}

#[async_trait::async_trait]
impl crate::replication::server::Replicas for Service {
    fn local(&self) -> &crate::replica::Local {
        &self.local
    }

    async fn replica(&self, id: u64) -> Option<Arc<crate::replica::Replica>> {
        self.replica_volume(id).await.map(|v| v.replica.clone())
    }

    async fn drop_replica(&self, id: u64) -> Result<(), crate::replication::server::DropError> {
        Ok(self.free_replica(id).await?)
    }

    fn node_id(&self) -> &str {
        &self.node.id
    }

    async fn records(&self) -> Result<Vec<VolumeRecord>, crate::meta::MetaError> {
        self.meta.list_volumes().await
    }
}
