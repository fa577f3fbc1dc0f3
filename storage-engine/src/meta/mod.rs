//! The metadata store behind one async trait: `embedded` (redb, one node), `etcd` (many nodes)
//! and `mem` (in memory, for tests, with injectable conflicts and outages). Callers share it by
//! `&self`.

pub mod embedded;
pub mod etcd;
pub mod mem;

use crate::pool::PoolRecord;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store: {0}")]
    Store(String),
    #[error("volume {0} already exists")]
    AlreadyExists(String),
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("volume {0} was changed concurrently; retry")]
    Conflict(String),
    #[error("node {0} is not in the cluster (removed, or never joined)")]
    NodeNotFound(String),
}

/// Operation in flight on a volume, persisted before the engine acts (so a restart can finish it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingOp {
    Delete,
    /// A snapshot or clone whose extents are being shared: undone (freed) if left behind.
    Create,
    /// The volume's data is being replaced by this snapshot's: run the restore again if left.
    Restore {
        snapshot: String,
    },
}

impl PendingOp {
    /// Why a volume with this operation in flight refuses other changes.
    pub fn describe(&self, name: &str) -> String {
        match self {
            PendingOp::Delete => format!("volume {name} is being deleted"),
            PendingOp::Create => format!("volume {name} is being created from a snapshot or volume"),
            PendingOp::Restore { snapshot } => {
                format!("volume {name} is being restored from snapshot {snapshot}; if that was interrupted run `stratactl volume restore {name} --snapshot {snapshot}` again")
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeRecord {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub repl: u32,
    pub labels: BTreeMap<String, String>,
    pub created_unix: u64,
    /// Bumped by every change: the compare-and-swap token.
    pub revision: u64,
    pub pending: Option<PendingOp>,
    #[serde(default)]
    pub qos: crate::qos::Limits,
    /// The node whose pool holds the volume (empty in records written before nodes were known:
    /// read as "this node").
    #[serde(default)]
    pub node: String,
    /// Nodes holding a replica (distinct). Empty in records written before replication: read as
    /// `[node]`.
    #[serde(default)]
    pub replicas: Vec<String>,
    /// The replicas that have every acknowledged write; only these are read from or count for an
    /// ack. A replica leaves this set (compare-and-swap) before any later write is acknowledged.
    #[serde(default)]
    pub in_sync: Vec<String>,
    /// The node serving the volume (its NBD export and the write fan-out); empty = detached.
    #[serde(default)]
    pub target: String,
    /// Bumped whenever the target changes; replicas refuse requests from older epochs.
    #[serde(default)]
    pub epoch: u64,
    /// The last target stopped cleanly (detach, or a new volume): no write can have been in
    /// flight, so a new target need not compare the replicas first.
    #[serde(default)]
    pub clean: bool,
    /// Nodes whose replica must be rebuilt in full before it counts as in sync again, whatever
    /// record of missed regions a target holds (its journal was salvaged: mappings may be gone).
    /// A node leaves this list in the compare-and-swap that puts it back in sync.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rebuild: Vec<String>,
    /// Nodes that lost their replica (ha-update, rebuild elsewhere) and have not freed its data
    /// yet: each frees it (at once, or when its engine starts) and takes itself off this list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
    /// Encrypted at rest: the key's salt and check value (never the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<crate::crypt::KeyParams>,
    /// A snapshot (read-only, never served) of this volume, taken at `created_unix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_of: Option<String>,
    /// Who may use the volume when the SDK checks tokens (empty: only admins).
    #[serde(default, skip_serializing_if = "Ownership::is_empty")]
    pub ownership: Ownership,
}

/// A collaborator's access to a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Inspect, list, clone and read its data through a clone.
    Read,
    /// Everything the owner may do but change ownership: attach, write, update, snapshot,
    /// restore, delete.
    Write,
}

impl Access {
    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "r" | "read" => Some(Access::Read),
            "w" | "rw" | "write" => Some(Access::Write),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
        }
    }
}

/// A volume's owner (a token subject) and collaborators (subjects and groups with an access).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ownership {
    pub owner: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<String, Access>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, Access>,
}

impl Ownership {
    pub fn is_empty(&self) -> bool {
        self.owner.is_empty() && self.users.is_empty() && self.groups.is_empty()
    }

    pub fn owned_by(owner: &str) -> Ownership {
        Ownership { owner: owner.into(), ..Default::default() }
    }

    /// What `subject` (in `groups`) may do: the owner everything, collaborators their best
    /// grant, others nothing.
    pub fn access(&self, subject: &str, groups: &[String]) -> Option<Access> {
        if !self.owner.is_empty() && self.owner == subject {
            return Some(Access::Write);
        }
        let by_user = self.users.get(subject).copied();
        let by_group = groups.iter().filter_map(|g| self.groups.get(g).copied()).max();
        by_user.max(by_group)
    }
}

impl VolumeRecord {
    /// Fills the replication fields of a record written before replication existed.
    pub fn normalized(mut self, this_node: &str) -> VolumeRecord {
        if self.node.is_empty() {
            self.node = this_node.to_string();
        }
        if self.replicas.is_empty() {
            self.replicas = vec![self.node.clone()];
            self.in_sync = vec![self.node.clone()];
            self.target = self.node.clone();
        }
        self
    }

    pub fn has_replica(&self, node: &str) -> bool {
        self.replicas.iter().any(|n| n == node)
    }

    pub fn is_in_sync(&self, node: &str) -> bool {
        self.in_sync.iter().any(|n| n == node)
    }
}

/// A node as the metadata store knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub hostname: String,
    pub sdk_address: String,
    pub nbd_address: String,
    pub total_bytes: u64,
    /// Pool space in use, as last reported by the node (refreshed every few seconds).
    #[serde(default)]
    pub used_bytes: u64,
    pub version: String,
    /// Where other engines reach this node's replication port.
    #[serde(default)]
    pub repl_address: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub rack: String,
    /// In maintenance (`stratactl service maintenance --enter`): serves no volume, takes no new
    /// replica; its replicas stay and resync when it is back. Kept across engine restarts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub maintenance: bool,
    /// Who put it in maintenance ("admin", "upgrade").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub maintenance_reason: String,
}

/// How a node is doing, as the metadata store sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    Online,
    /// The engine runs and renews its lease, but its pool failed.
    StorageDown,
    Offline,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::StorageDown => "storage_down",
            NodeState::Offline => "offline",
        }
    }
}

/// The cluster metadata store. Every call is async and none blocks a runtime thread: etcd is
/// reached through its async client, redb runs on the blocking pool (in one place,
/// `embedded::Embedded::blocking`), the in-memory store answers at once.
#[async_trait::async_trait]
pub trait MetaStore: Send + Sync {
    /// Registers this node and keeps it alive (in etcd: a key bound to a lease that the store
    /// keeps renewing; when the engine dies the lease expires and the node reads as offline).
    async fn register_node(&self, node: &NodeRecord) -> Result<(), MetaError>;
    /// Rewrites this node's record (after `register_node`), e.g. with new usage figures.
    /// Fails with NodeNotFound when the node was removed from the cluster meanwhile (a removed
    /// node is never brought back by its own engine's updates).
    async fn update_node(&self, node: &NodeRecord) -> Result<(), MetaError>;
    /// Forgets node `id` (decommission): its record, its pool's record and its liveness.
    async fn remove_node(&self, id: &str) -> Result<(), MetaError>;
    /// Every node ever registered, with its state now.
    async fn list_nodes(&self) -> Result<Vec<(NodeRecord, NodeState)>, MetaError>;
    /// Reports whether this node's storage works (after `register_node`).
    async fn set_storage_ok(&self, ok: bool) -> Result<(), MetaError>;
    async fn get_pool(&self) -> Result<Option<PoolRecord>, MetaError>;
    async fn put_pool(&self, rec: &PoolRecord) -> Result<(), MetaError>;
    /// Creates a volume, assigning its id. Fails with AlreadyExists on a taken name.
    async fn create_volume(&self, rec: VolumeRecord) -> Result<VolumeRecord, MetaError>;
    async fn get_volume(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError>;
    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, MetaError>;
    /// Up to `limit` volume records in name order, the first after the name `after` ("" = from
    /// the first): one page of a listing (etcd: one range read, not a read of every record).
    async fn list_volumes_page(&self, after: &str, limit: usize) -> Result<Vec<VolumeRecord>, MetaError> {
        let mut all = self.list_volumes().await?;
        all.retain(|r| r.name.as_str() > after);
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.truncate(limit);
        Ok(all)
    }
    /// The records the periodic schedules read: volumes with a snapshot or cloud schedule, and
    /// the snapshots schedules took (`SCHEDULED_LABELS`). May trail the newest changes by a
    /// moment (etcd: kept by the same watch, so the schedules of every engine do not list
    /// every volume every few seconds).
    async fn scheduled_volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        Ok(self.list_volumes().await?.into_iter().filter(is_scheduled).collect())
    }
    /// The sum of the sizes of the volumes each node holds a replica of (what placement
    /// balances). May trail the newest changes by a moment (etcd: kept by a watch, so it costs
    /// no listing of every volume).
    async fn provisioned(&self) -> Result<std::collections::HashMap<String, u64>, MetaError> {
        Ok(provisioned_of(&self.list_volumes().await?))
    }
    /// Replaces a volume record if its stored revision equals `rec.revision`; bumps the revision.
    async fn update_volume(&self, rec: &VolumeRecord) -> Result<VolumeRecord, MetaError>;
    async fn remove_volume(&self, name: &str) -> Result<(), MetaError>;
    async fn cluster_id(&self) -> Result<String, MetaError>;
    /// Small cluster-wide records that are not volumes (cloud credentials, backup jobs), by key.
    async fn put_kv(&self, key: &str, value: &[u8]) -> Result<(), MetaError>;
    async fn get_kv(&self, key: &str) -> Result<Option<Vec<u8>>, MetaError>;
    /// Every record whose key starts with `prefix`, by key.
    async fn list_kv(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError>;
    /// Removes a record; whether it existed.
    async fn delete_kv(&self, key: &str) -> Result<bool, MetaError>;
    fn kind(&self) -> &'static str;
    /// Whether this node's registration is fresh: a target that cannot reach the store must
    /// stop acknowledging writes before another node can take its volumes over.
    fn reachable(&self) -> bool {
        true
    }
    /// Bumped whenever this node's registration lapsed and was renewed: another node may have
    /// taken volumes over meanwhile, so targets re-read their records before acknowledging more.
    fn lease_generation(&self) -> u64 {
        0
    }
}

/// Labels that make a record one the schedules read: a snapshot schedule, a cloud backup
/// schedule, and the mark of a snapshot a schedule took.
pub const SCHEDULED_LABELS: [&str; 3] = ["snap_schedule", "cloudsnap_schedule", "strata.dev/schedule"];

/// Whether the schedules read this record (`SCHEDULED_LABELS`).
pub fn is_scheduled(rec: &VolumeRecord) -> bool {
    SCHEDULED_LABELS.iter().any(|l| rec.labels.contains_key(*l))
}

/// The nodes holding a replica of the volume a record describes (a record from before
/// replication names its one node).
pub fn replica_nodes(rec: &VolumeRecord) -> &[String] {
    if rec.replicas.is_empty() {
        std::slice::from_ref(&rec.node)
    } else {
        &rec.replicas
    }
}

/// Per node, the sum of the sizes of the volumes (and snapshots) it holds a replica of: one pass.
pub fn provisioned_of(vols: &[VolumeRecord]) -> std::collections::HashMap<String, u64> {
    let mut out = std::collections::HashMap::new();
    for v in vols {
        for n in replica_nodes(v).iter().filter(|n| !n.is_empty()) {
            *out.entry(n.clone()).or_insert(0) += v.size;
        }
    }
    out
}

/// Placement's view of the nodes: `own` is this node's id, its pool's capacity and whether it
/// is in maintenance, which this node knows better than its record.
pub fn placement_candidates(
    nodes: Vec<(NodeRecord, NodeState)>,
    provisioned: &std::collections::HashMap<String, u64>,
    own: (&str, u64, bool),
) -> Vec<crate::placement::Candidate> {
    nodes
        .into_iter()
        .map(|(n, state)| {
            let mine = n.id == own.0;
            crate::placement::Candidate {
                online: state == NodeState::Online,
                maintenance: if mine { own.2 } else { n.maintenance },
                capacity: if mine { own.1 } else { n.total_bytes },
                provisioned: provisioned.get(&n.id).copied().unwrap_or(0),
                zone: n.zone,
                rack: n.rack,
                id: n.id,
            }
        })
        .collect()
}

/// The SDK endpoint (a URI) node `node` registered, if the store knows the node and its
/// address.
pub async fn sdk_endpoint(meta: &dyn MetaStore, node: &str) -> Result<Option<String>, MetaError> {
    Ok(meta
        .list_nodes()
        .await?
        .into_iter()
        .find(|(n, _)| n.id == node)
        .map(|(n, _)| n.sdk_address)
        .filter(|a| !a.is_empty())
        .map(|a| strata_api::endpoint_uri(&a)))
}

/// The replication address a node registered, if the store knows the node.
pub async fn replication_address(meta: &dyn MetaStore, node: &str) -> Option<String> {
    meta.list_nodes().await.ok()?.into_iter().find(|(n, _)| n.id == node).map(|(n, _)| n.repl_address).filter(|a| !a.is_empty())
}

/// The behaviour every store must have, run against each of them by their tests (the etcd
/// one's among the integration tests).
#[doc(hidden)]
pub mod contract {
    use super::*;

    pub fn rec(name: &str) -> VolumeRecord {
        VolumeRecord { id: 0, name: name.into(), size: 1 << 30, repl: 1, ..Default::default() }
    }

    /// Creates `a` and `b`, grows `a` to 2 GiB by compare-and-swap; returns both as created.
    pub async fn volumes_are_created_once_and_updated_by_revision(s: &dyn MetaStore) -> (VolumeRecord, VolumeRecord) {
        let a = s.create_volume(rec("a")).await.unwrap();
        let b = s.create_volume(rec("b")).await.unwrap();
        assert_ne!(a.id, b.id);
        assert!(matches!(s.create_volume(rec("a")).await, Err(MetaError::AlreadyExists(_))));
        let mut grown = a.clone();
        grown.size *= 2;
        let stored = s.update_volume(&grown).await.unwrap();
        assert_eq!(stored.revision, a.revision + 1);
        assert!(matches!(s.update_volume(&grown).await, Err(MetaError::Conflict(_))), "stale revision refused");
        assert_eq!(s.get_volume("a").await.unwrap().unwrap().size, 2 << 30);
        assert!(matches!(s.remove_volume("nope").await, Err(MetaError::NotFound(_))));
        let mut gone = b.clone();
        gone.name = "nope".into();
        assert!(matches!(s.update_volume(&gone).await, Err(MetaError::NotFound(_))));
        (a, b)
    }
}
