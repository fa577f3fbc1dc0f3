//! What a target needs from the world around it, as traits, so its rules run the same against
//! the real network and store and against test doubles:
//!
//! - `ReplicaIo`: one remote leg (a connection to a replica on another node);
//! - `Connector`: how a leg is opened to a replication address;
//! - `Membership`: the volume record (read, and changed by compare-and-swap at the target's
//!   epoch) and where the replicas' nodes are.
//!
//! The local leg is this node's `replica::Local`, called directly: its writes take the caller's
//! aligned buffer without a copy and run under the replica's own fence.

use super::client::{CallError, Client};
use super::frame::Command;
use crate::meta::{MetaError, MetaStore, NodeState, VolumeRecord};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// One replica on another node, as a target talks to it.
#[async_trait]
pub trait ReplicaIo: Send + Sync {
    /// Sends `cmd` for volume id `volume` at `epoch`; the reply's data (READ, EXTENTS,
    /// CHECKSUM, HELLO's boot id).
    async fn call(&self, volume: u64, epoch: u64, cmd: Command) -> Result<Vec<u8>, CallError>;
    /// The connection failed: every later call fails too.
    fn is_broken(&self) -> bool;
}

#[async_trait]
impl ReplicaIo for Client {
    async fn call(&self, volume: u64, epoch: u64, cmd: Command) -> Result<Vec<u8>, CallError> {
        Client::call(self, volume, epoch, cmd).await
    }
    fn is_broken(&self) -> bool {
        Client::is_broken(self)
    }
}

/// Opens legs.
#[async_trait]
pub trait Connector: Send + Sync {
    /// A leg to node `node`'s replica, whose replication port is at `addr`.
    async fn connect(&self, node: &str, addr: &str, timeout: Duration) -> Result<Arc<dyn ReplicaIo>, CallError>;
}

/// Legs over the replication protocol on TCP: mutual TLS with this node's certificate when it
/// has one (the replica must prove it is the node the record names).
pub struct Net {
    pub tls: Option<Arc<crate::security::Tls>>,
}

#[async_trait]
impl Connector for Net {
    async fn connect(&self, node: &str, addr: &str, timeout: Duration) -> Result<Arc<dyn ReplicaIo>, CallError> {
        Ok(Client::connect_to(node, addr, timeout, self.tls.as_deref()).await? as Arc<dyn ReplicaIo>)
    }
}

/// A change the target makes to its volume's record.
pub type Change = Box<dyn Fn(&mut VolumeRecord) + Send + Sync>;

/// The target's view of the cluster metadata.
#[async_trait]
pub trait Membership: Send + Sync {
    /// The volume's record as stored now.
    async fn record(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError>;
    /// Applies `change` to the record by compare-and-swap, retried on conflicts, while the
    /// record's epoch is still `epoch`; `Ok(None)` once it moved on (another target took over).
    async fn change(&self, name: &str, epoch: u64, change: Change) -> Result<Option<VolumeRecord>, MetaError>;
    /// Bumped whenever this node's registration lapsed (another node may have taken over).
    fn lease_generation(&self) -> u64;
    /// Whether the store answers now (a cached view, no call).
    fn reachable(&self) -> bool;
    /// Where `node`'s replication port is, as it registered it.
    async fn replication_address(&self, node: &str) -> Option<String>;
    /// Whether `node` is known and offline (its registration lapsed).
    async fn is_offline(&self, node: &str) -> bool;
}

/// Membership kept in the cluster's metadata store.
pub struct Store(pub Arc<dyn MetaStore>);

/// Compare-and-swap attempts before a change gives up as conflicting.
const CAS_TRIES: usize = 20;

#[async_trait]
impl Membership for Store {
    async fn record(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError> {
        self.0.get_volume(name).await
    }

    async fn change(&self, name: &str, epoch: u64, change: Change) -> Result<Option<VolumeRecord>, MetaError> {
        let injected = |e: crate::failpoint::Injected| MetaError::Store(e.to_string());
        for _ in 0..CAS_TRIES {
            let mut rec = self.0.get_volume(name).await?.ok_or_else(|| MetaError::NotFound(name.to_string()))?;
            if rec.epoch != epoch {
                return Ok(None);
            }
            change(&mut rec);
            crate::failpoint::point("membership.before_cas").await.map_err(injected)?;
            match self.0.update_volume(&rec).await {
                Err(MetaError::Conflict(_)) => continue,
                r => {
                    crate::failpoint::point("membership.after_cas").await.map_err(injected)?;
                    return r.map(Some);
                }
            }
        }
        Err(MetaError::Conflict(name.to_string()))
    }

    fn lease_generation(&self) -> u64 {
        self.0.lease_generation()
    }

    fn reachable(&self) -> bool {
        self.0.reachable()
    }

    async fn replication_address(&self, node: &str) -> Option<String> {
        crate::meta::replication_address(&*self.0, node).await
    }

    async fn is_offline(&self, node: &str) -> bool {
        let nodes = self.0.list_nodes().await.unwrap_or_default();
        nodes.into_iter().any(|(n, s)| n.id == node && s == NodeState::Offline)
    }
}
