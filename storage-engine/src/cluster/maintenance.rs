//! Maintenance and decommission of a node, as the engine decides them.
//!
//! A node in maintenance serves no volume and takes no new replica; the replicas it holds stay
//! (they fall out of sync while its engine is down and resync when it is back), and targets
//! never replace them. Entering moves the volumes it serves to nodes holding an in-sync replica
//! (the SDK does the moving: it asks the other engine to attach). A node leaves the cluster
//! (decommission) only while it is in maintenance or offline, and only once no volume has a
//! replica or its target there; snapshots keep their copies on the other nodes.

use crate::meta::{MetaError, NodeState, VolumeRecord};
use crate::volume::{PlacementSpec, Service, VolumeError};

/// What removing a node from the cluster needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decommission {
    /// Volumes with a replica or their target on the node.
    pub to_move: Vec<String>,
    /// Why the node cannot go (none: it can, once `to_move` is empty).
    pub blockers: Vec<String>,
}

impl Service {
    /// Enters maintenance for `reason` (Some) or exits it (None), recorded in this node's
    /// record (so it outlives a restart).
    pub async fn set_maintenance(&self, reason: Option<String>) -> Result<(), VolumeError> {
        let was = std::mem::replace(&mut *self.maintenance.lock(), reason.clone());
        if let Err(e) = self.meta.update_node(&self.own_record()).await {
            *self.maintenance.lock() = was;
            return Err(e.into());
        }
        match reason {
            Some(why) => tracing::warn!(reason = %why, "entered maintenance"),
            None => tracing::warn!("left maintenance"),
        }
        Ok(())
    }

    /// The volumes this node serves, each with its NBD clients here.
    pub async fn served_here(&self) -> Result<Vec<(VolumeRecord, u32)>, VolumeError> {
        let me = &self.node.id;
        let all = self.meta.list_volumes().await?;
        Ok(all
            .into_iter()
            .map(|r| r.normalized(me))
            .filter(|r| &r.target == me && r.snapshot_of.is_none())
            .map(|r| {
                let clients = self.volume(&r.name).map(|v| v.connections()).unwrap_or(0);
                (r, clients)
            })
            .collect())
    }

    /// Where a volume served here goes when this node enters maintenance: an online node, not
    /// in maintenance, holding an in-sync replica (the first in the record's order).
    pub async fn maintenance_destination(&self, rec: &VolumeRecord) -> Result<Option<String>, VolumeError> {
        let nodes = self.meta.list_nodes().await?;
        Ok(rec
            .in_sync
            .iter()
            .find(|n| **n != self.node.id && nodes.iter().any(|(r, s)| &r.id == *n && *s == NodeState::Online && !r.maintenance))
            .cloned())
    }

    /// What removing `node` from the cluster needs, changing nothing.
    pub async fn decommission_plan(&self, node: &str) -> Result<Decommission, VolumeError> {
        let me = self.node.id.clone();
        let nodes = self.meta.list_nodes().await?;
        let (rec, state) = nodes.iter().find(|(n, _)| n.id == node).ok_or_else(|| VolumeError::NodeNotFound(node.to_string()))?;
        let mut plan = Decommission::default();
        if node == me {
            plan.blockers.push(format!("this request reached node {node} itself: send it to another node's engine (--endpoint)"));
        }
        if *state != NodeState::Offline && !rec.maintenance {
            plan.blockers.push(format!(
                "node {node} is {} and not in maintenance: enter maintenance on it first (stratactl service maintenance --enter --node {node}), or stop its engine",
                state.as_str()
            ));
        }
        let offline = *state == NodeState::Offline;
        let all: Vec<VolumeRecord> = self.meta.list_volumes().await?.into_iter().map(|r| r.normalized(&me)).collect();
        for v in all.iter().filter(|v| v.snapshot_of.is_none() && (v.has_replica(node) || v.target == node)) {
            plan.to_move.push(v.name.clone());
            if !v.has_replica(node) {
                continue;
            }
            if offline && v.in_sync.iter().all(|n| n == node) {
                plan.blockers.push(format!(
                    "volume {}: its only in-sync replica is on node {node}, which is offline; start that engine again so the data can be copied",
                    v.name
                ));
                continue;
            }
            // A replica already added by an earlier, interrupted decommission needs no new node.
            if v.replicas.len() as u32 > v.repl {
                continue;
            }
            if let Err(e) = self.place_replicas(1, v.size, &PlacementSpec::default(), &v.replicas).await {
                plan.blockers.push(format!("volume {} (repl {}): no node can take its replica from {node}: {e}", v.name, v.repl));
            }
        }
        for s in all.iter().filter(|s| s.snapshot_of.is_some() && s.has_replica(node) && s.replicas.len() == 1) {
            plan.blockers.push(format!(
                "snapshot {} of {} exists only on node {node}: delete it (stratactl volume snapshot delete {}) or clone it first",
                s.name,
                s.snapshot_of.as_deref().unwrap_or_default(),
                s.name
            ));
        }
        Ok(plan)
    }

    /// Removes `node` from the cluster once its plan is clear: snapshots forget their copy there,
    /// records stop waiting for it to free data, and its records leave the store. Its engine,
    /// if it still runs, stops when it sees that.
    pub async fn decommission(&self, node: &str) -> Result<(), VolumeError> {
        let plan = self.decommission_plan(node).await?;
        if !plan.blockers.is_empty() {
            return Err(VolumeError::FailedPrecondition(format!("node {node} cannot be removed: {}", plan.blockers.join("; "))));
        }
        if !plan.to_move.is_empty() {
            return Err(VolumeError::FailedPrecondition(format!(
                "node {node} still holds replicas or targets of volume(s) {}: move them first (stratactl cluster delete {node} does)",
                plan.to_move.join(", ")
            )));
        }
        let me = self.node.id.clone();
        let names: Vec<String> = self
            .meta
            .list_volumes()
            .await?
            .into_iter()
            .filter(|r| r.has_replica(node) || r.dropped.iter().any(|n| n == node))
            .map(|r| r.name)
            .collect();
        for name in names {
            for _ in 0..20 {
                let Some(mut r) = self.meta.get_volume(&name).await?.map(|r| r.normalized(&me)) else { break };
                r.replicas.retain(|n| n != node);
                r.in_sync.retain(|n| n != node);
                r.dropped.retain(|n| n != node);
                r.rebuild.retain(|n| n != node);
                match self.meta.update_volume(&r).await {
                    Err(MetaError::Conflict(_)) => continue,
                    other => {
                        other?;
                        break;
                    }
                }
            }
        }
        self.meta.remove_node(node).await?;
        tracing::warn!(%node, "node removed from the cluster");
        Ok(())
    }
}
