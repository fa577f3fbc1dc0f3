//! Embedded metadata store: redb in the engine's data directory.

use super::{MetaError, MetaStore, NodeRecord, NodeState, VolumeRecord};
use crate::pool::PoolRecord;
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");

pub struct Embedded {
    db: Database,
    node: parking_lot::Mutex<Option<NodeRecord>>,
    storage_ok: std::sync::atomic::AtomicBool,
}

fn err<E: std::fmt::Display>(e: E) -> MetaError {
    MetaError::Store(e.to_string())
}

impl Embedded {
    pub fn open(dir: &Path) -> Result<Embedded, MetaError> {
        std::fs::create_dir_all(dir).map_err(|e| MetaError::Store(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join("strata-meta.redb");
        let db = Database::create(&path).map_err(|e| MetaError::Store(format!("opening {}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(err)?;
        {
            let mut meta = tx.open_table(META).map_err(err)?;
            tx.open_table(VOLUMES).map_err(err)?;
            if meta.get("cluster_id").map_err(err)?.is_none() {
                let id = uuid::Uuid::new_v4().to_string();
                meta.insert("cluster_id", id.as_bytes()).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        Ok(Embedded { db, node: parking_lot::Mutex::new(None), storage_ok: std::sync::atomic::AtomicBool::new(true) })
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(META).map_err(err)?;
        Ok(t.get(key).map_err(err)?.map(|v| v.value().to_vec()))
    }
}

impl MetaStore for Embedded {
    fn get_pool(&self) -> Result<Option<PoolRecord>, MetaError> {
        self.get_meta("pool")?.map(|b| serde_json::from_slice(&b).map_err(err)).transpose()
    }

    fn put_pool(&self, rec: &PoolRecord) -> Result<(), MetaError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut t = tx.open_table(META).map_err(err)?;
            let bytes = serde_json::to_vec(rec).map_err(err)?;
            t.insert("pool", bytes.as_slice()).map_err(err)?;
        }
        tx.commit().map_err(err)
    }

    fn create_volume(&self, mut rec: VolumeRecord) -> Result<VolumeRecord, MetaError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut meta = tx.open_table(META).map_err(err)?;
            let mut vols = tx.open_table(VOLUMES).map_err(err)?;
            if vols.get(rec.name.as_str()).map_err(err)?.is_some() {
                return Err(MetaError::AlreadyExists(rec.name));
            }
            let next = match meta.get("next_volume_id").map_err(err)? {
                Some(v) => u64::from_le_bytes(v.value().try_into().map_err(err)?),
                None => 1,
            };
            meta.insert("next_volume_id", next.wrapping_add(1).to_le_bytes().as_slice()).map_err(err)?;
            rec.id = next;
            rec.revision = 1;
            let bytes = serde_json::to_vec(&rec).map_err(err)?;
            vols.insert(rec.name.as_str(), bytes.as_slice()).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(rec)
    }

    fn get_volume(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(VOLUMES).map_err(err)?;
        let v = t.get(name).map_err(err)?;
        v.map(|b| serde_json::from_slice(b.value()).map_err(err)).transpose()
    }

    fn list_volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        let tx = self.db.begin_read().map_err(err)?;
        let t = tx.open_table(VOLUMES).map_err(err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(err)? {
            let (_, v) = item.map_err(err)?;
            out.push(serde_json::from_slice(v.value()).map_err(err)?);
        }
        Ok(out)
    }

    fn update_volume(&self, rec: &VolumeRecord) -> Result<VolumeRecord, MetaError> {
        let tx = self.db.begin_write().map_err(err)?;
        let mut next = rec.clone();
        {
            let mut t = tx.open_table(VOLUMES).map_err(err)?;
            let stored: VolumeRecord = match t.get(rec.name.as_str()).map_err(err)? {
                Some(b) => serde_json::from_slice(b.value()).map_err(err)?,
                None => return Err(MetaError::NotFound(rec.name.clone())),
            };
            if stored.revision != rec.revision || stored.id != rec.id {
                return Err(MetaError::Conflict(rec.name.clone()));
            }
            next.revision += 1;
            let bytes = serde_json::to_vec(&next).map_err(err)?;
            t.insert(rec.name.as_str(), bytes.as_slice()).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(next)
    }

    fn remove_volume(&self, name: &str) -> Result<(), MetaError> {
        let tx = self.db.begin_write().map_err(err)?;
        {
            let mut t = tx.open_table(VOLUMES).map_err(err)?;
            if t.remove(name).map_err(err)?.is_none() {
                return Err(MetaError::NotFound(name.to_string()));
            }
        }
        tx.commit().map_err(err)
    }

    fn register_node(&self, node: &NodeRecord) -> Result<(), MetaError> {
        *self.node.lock() = Some(node.clone());
        Ok(())
    }

    fn update_node(&self, node: &NodeRecord) -> Result<(), MetaError> {
        *self.node.lock() = Some(node.clone());
        Ok(())
    }

    /// One node: this one, alive while the store is open.
    fn list_nodes(&self) -> Result<Vec<(NodeRecord, NodeState)>, MetaError> {
        let state = if self.storage_ok.load(std::sync::atomic::Ordering::Acquire) { NodeState::Online } else { NodeState::StorageDown };
        Ok(self.node.lock().clone().into_iter().map(|n| (n, state)).collect())
    }

    fn set_storage_ok(&self, ok: bool) -> Result<(), MetaError> {
        self.storage_ok.store(ok, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn cluster_id(&self) -> Result<String, MetaError> {
        let v = self.get_meta("cluster_id")?.unwrap_or_default();
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    fn kind(&self) -> &'static str {
        "embedded (redb)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> VolumeRecord {
        VolumeRecord { id: 0, name: name.into(), size: 1 << 30, repl: 1, ..Default::default() }
    }

    #[test]
    fn volumes_are_created_once_and_updated_by_revision() {
        let dir = tempfile::tempdir().unwrap();
        let s = Embedded::open(dir.path()).unwrap();
        let a = s.create_volume(rec("a")).unwrap();
        let b = s.create_volume(rec("b")).unwrap();
        assert_ne!(a.id, b.id);
        assert!(matches!(s.create_volume(rec("a")), Err(MetaError::AlreadyExists(_))));
        let mut grown = a.clone();
        grown.size *= 2;
        let stored = s.update_volume(&grown).unwrap();
        assert_eq!(stored.revision, a.revision + 1);
        assert!(matches!(s.update_volume(&grown), Err(MetaError::Conflict(_))), "stale revision refused");
        drop(s);
        let s = Embedded::open(dir.path()).unwrap();
        assert_eq!(s.get_volume("a").unwrap().unwrap().size, 2 << 30);
        s.remove_volume("a").unwrap();
        assert_eq!(s.list_volumes().unwrap().len(), 1);
        assert!(s.create_volume(rec("c")).unwrap().id > b.id, "ids are never reused");
    }
}
