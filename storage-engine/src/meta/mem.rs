//! An in-memory metadata store for tests: one shared state stands for the cluster's store, and
//! each node gets its own handle (`MemStore::node`), as each engine has its own etcd client.
//! Faults are injectable: an outage (every call fails, the registration reads stale), a number
//! of compare-and-swap conflicts, a node that reads offline, a lapse of this node's lease.

use super::{MetaError, MetaStore, NodeRecord, NodeState, VolumeRecord};
use crate::pool::PoolRecord;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default)]
struct State {
    volumes: BTreeMap<String, VolumeRecord>,
    next_id: u64,
    nodes: BTreeMap<String, NodeRecord>,
    storage_down: HashSet<String>,
    offline: HashSet<String>,
    pools: HashMap<String, PoolRecord>,
    kv: BTreeMap<String, Vec<u8>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    down: AtomicBool,
    conflicts: AtomicU32,
    /// Calls answered (outage refusals included), for tests that count store round trips.
    calls: AtomicU64,
    cluster_id: String,
}

/// One node's handle on the shared in-memory store.
#[derive(Clone)]
pub struct MemStore {
    shared: Arc<Shared>,
    node: String,
    lease_gen: Arc<AtomicU64>,
}

impl Default for MemStore {
    fn default() -> Self {
        Self::new("node-1")
    }
}

impl MemStore {
    /// A new, empty store, seen from node `node`.
    pub fn new(node: &str) -> MemStore {
        let shared = Shared { cluster_id: uuid::Uuid::new_v4().to_string(), ..Default::default() };
        MemStore { shared: Arc::new(shared), node: node.to_string(), lease_gen: Arc::default() }
    }

    /// The same store, seen from another node.
    pub fn node(&self, node: &str) -> MemStore {
        MemStore { shared: self.shared.clone(), node: node.to_string(), lease_gen: Arc::default() }
    }

    /// Starts (true) or ends an outage: every call fails and `reachable` is false meanwhile.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::Release);
    }

    /// The next `n` volume updates fail with a compare-and-swap conflict.
    pub fn inject_conflicts(&self, n: u32) {
        self.shared.conflicts.store(n, Ordering::Release);
    }

    /// Node `id` reads offline (true: its lease expired) or online again.
    pub fn set_offline(&self, id: &str, offline: bool) {
        let mut s = self.shared.state.lock();
        if offline {
            s.offline.insert(id.to_string());
        } else {
            s.offline.remove(id);
        }
    }

    /// This node's registration lapsed and was renewed (another node may have taken over).
    pub fn lapse_lease(&self) {
        self.lease_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// Calls answered so far by the shared store.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Acquire)
    }

    /// Every check a call passes first: the store is reachable.
    fn enter(&self) -> Result<parking_lot::MutexGuard<'_, State>, MetaError> {
        self.shared.calls.fetch_add(1, Ordering::AcqRel);
        if self.shared.down.load(Ordering::Acquire) {
            return Err(MetaError::Store("in-memory store: unreachable (injected outage)".into()));
        }
        Ok(self.shared.state.lock())
    }
}

#[async_trait::async_trait]
impl MetaStore for MemStore {
    async fn register_node(&self, node: &NodeRecord) -> Result<(), MetaError> {
        let mut s = self.enter()?;
        s.offline.remove(&node.id);
        s.nodes.insert(node.id.clone(), node.clone());
        Ok(())
    }

    async fn update_node(&self, node: &NodeRecord) -> Result<(), MetaError> {
        match self.enter()?.nodes.get_mut(&node.id) {
            Some(n) => *n = node.clone(),
            None => return Err(MetaError::NodeNotFound(node.id.clone())),
        }
        Ok(())
    }

    async fn remove_node(&self, id: &str) -> Result<(), MetaError> {
        let mut s = self.enter()?;
        s.nodes.remove(id).ok_or_else(|| MetaError::NodeNotFound(id.to_string()))?;
        s.offline.remove(id);
        s.storage_down.remove(id);
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<(NodeRecord, NodeState)>, MetaError> {
        let s = self.enter()?;
        let state = |id: &str| match () {
            _ if s.offline.contains(id) => NodeState::Offline,
            _ if s.storage_down.contains(id) => NodeState::StorageDown,
            _ => NodeState::Online,
        };
        Ok(s.nodes.values().map(|n| (n.clone(), state(&n.id))).collect())
    }

    async fn set_storage_ok(&self, ok: bool) -> Result<(), MetaError> {
        let mut s = self.enter()?;
        if ok {
            s.storage_down.remove(&self.node);
        } else {
            s.storage_down.insert(self.node.clone());
        }
        Ok(())
    }

    async fn get_pool(&self) -> Result<Option<PoolRecord>, MetaError> {
        Ok(self.enter()?.pools.get(&self.node).cloned())
    }

    async fn put_pool(&self, rec: &PoolRecord) -> Result<(), MetaError> {
        self.enter()?.pools.insert(self.node.clone(), rec.clone());
        Ok(())
    }

    async fn create_volume(&self, mut rec: VolumeRecord) -> Result<VolumeRecord, MetaError> {
        let mut s = self.enter()?;
        if s.volumes.contains_key(&rec.name) {
            return Err(MetaError::AlreadyExists(rec.name));
        }
        s.next_id += 1;
        rec.id = s.next_id;
        rec.revision = 1;
        s.volumes.insert(rec.name.clone(), rec.clone());
        Ok(rec)
    }

    async fn get_volume(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError> {
        Ok(self.enter()?.volumes.get(name).cloned())
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        Ok(self.enter()?.volumes.values().cloned().collect())
    }

    async fn update_volume(&self, rec: &VolumeRecord) -> Result<VolumeRecord, MetaError> {
        let mut s = self.enter()?;
        let Some(stored) = s.volumes.get(&rec.name) else { return Err(MetaError::NotFound(rec.name.clone())) };
        let injected = self.shared.conflicts.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok();
        if injected || stored.revision != rec.revision || stored.id != rec.id {
            return Err(MetaError::Conflict(rec.name.clone()));
        }
        let mut next = rec.clone();
        next.revision += 1;
        s.volumes.insert(next.name.clone(), next.clone());
        Ok(next)
    }

    async fn remove_volume(&self, name: &str) -> Result<(), MetaError> {
        self.enter()?.volumes.remove(name).map(|_| ()).ok_or_else(|| MetaError::NotFound(name.to_string()))
    }

    async fn put_kv(&self, key: &str, value: &[u8]) -> Result<(), MetaError> {
        self.enter()?.kv.insert(key.to_string(), value.to_vec());
        Ok(())
    }

    async fn get_kv(&self, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
        Ok(self.enter()?.kv.get(key).cloned())
    }

    async fn list_kv(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
        Ok(self.enter()?.kv.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    async fn delete_kv(&self, key: &str) -> Result<bool, MetaError> {
        Ok(self.enter()?.kv.remove(key).is_some())
    }

    async fn cluster_id(&self) -> Result<String, MetaError> {
        drop(self.enter()?);
        Ok(self.shared.cluster_id.clone())
    }

    fn kind(&self) -> &'static str {
        "in-memory"
    }

    fn reachable(&self) -> bool {
        !self.shared.down.load(Ordering::Acquire)
    }

    fn lease_generation(&self) -> u64 {
        self.lease_gen.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::contract;

    #[tokio::test]
    async fn keeps_the_store_contract() {
        contract::volumes_are_created_once_and_updated_by_revision(&MemStore::default()).await;
    }

    #[tokio::test]
    async fn nodes_share_one_store_and_faults_are_injected() {
        let a = MemStore::new("a");
        let b = a.node("b");
        let v = a.create_volume(contract::rec("v")).await.unwrap();
        assert_eq!(b.get_volume("v").await.unwrap().unwrap().id, v.id, "b sees what a wrote");
        a.inject_conflicts(2);
        for _ in 0..2 {
            assert!(matches!(b.update_volume(&v).await, Err(MetaError::Conflict(_))), "an injected conflict");
        }
        let v2 = b.update_volume(&v).await.expect("the conflicts are used up");
        assert_eq!(v2.revision, v.revision + 1);
        a.set_down(true);
        assert!(!b.reachable());
        assert!(matches!(b.get_volume("v").await, Err(MetaError::Store(_))), "an outage fails every call");
        a.set_down(false);
        for (s, id) in [(&a, "a"), (&b, "b")] {
            s.register_node(&NodeRecord { id: id.into(), ..Default::default() }).await.unwrap();
        }
        b.set_storage_ok(false).await.unwrap();
        a.set_offline("a", true);
        let states: Vec<(String, NodeState)> = b.list_nodes().await.unwrap().into_iter().map(|(n, s)| (n.id, s)).collect();
        assert_eq!(states, [("a".to_string(), NodeState::Offline), ("b".to_string(), NodeState::StorageDown)]);
        assert_eq!(a.lease_generation(), 0);
        a.lapse_lease();
        assert_eq!((a.lease_generation(), b.lease_generation()), (1, 0), "a lease is one node's");
    }
}
