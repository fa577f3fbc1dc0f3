//! Embedded metadata store: redb in the engine's data directory. redb's calls block (they
//! read and fsync the file), so every one runs on tokio's blocking pool, through `blocking`.

use super::{MetaError, MetaStore, NodeRecord, NodeState, VolumeRecord};
use crate::pool::PoolRecord;
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");

pub struct Embedded {
    db: std::sync::Arc<Database>,
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
        Ok(Embedded { db: std::sync::Arc::new(db), node: parking_lot::Mutex::new(None), storage_ok: std::sync::atomic::AtomicBool::new(true) })
    }

    /// Runs a redb call on the blocking pool: the one place this store blocks.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Database) -> Result<T, MetaError> + Send + 'static) -> Result<T, MetaError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(err)?
    }
}

fn get_meta(db: &Database, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
    let tx = db.begin_read().map_err(err)?;
    let t = tx.open_table(META).map_err(err)?;
    Ok(t.get(key).map_err(err)?.map(|v| v.value().to_vec()))
}

#[async_trait::async_trait]
impl MetaStore for Embedded {
    async fn get_pool(&self) -> Result<Option<PoolRecord>, MetaError> {
        self.blocking(|db| get_meta(db, "pool")?.map(|b| serde_json::from_slice(&b).map_err(err)).transpose()).await
    }

    async fn put_pool(&self, rec: &PoolRecord) -> Result<(), MetaError> {
        let bytes = serde_json::to_vec(rec).map_err(err)?;
        self.blocking(move |db| put_pool(db, &bytes)).await
    }

    async fn create_volume(&self, rec: VolumeRecord) -> Result<VolumeRecord, MetaError> {
        self.blocking(move |db| create_volume(db, rec)).await
    }

    async fn get_volume(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError> {
        let name = name.to_string();
        self.blocking(move |db| get_volume(db, &name)).await
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        self.blocking(list_volumes).await
    }

    async fn update_volume(&self, rec: &VolumeRecord) -> Result<VolumeRecord, MetaError> {
        let rec = rec.clone();
        self.blocking(move |db| update_volume(db, &rec)).await
    }

    async fn remove_volume(&self, name: &str) -> Result<(), MetaError> {
        let name = name.to_string();
        self.blocking(move |db| remove_volume(db, &name)).await
    }

    async fn register_node(&self, node: &NodeRecord) -> Result<(), MetaError> {
        *self.node.lock() = Some(node.clone());
        Ok(())
    }

    async fn update_node(&self, node: &NodeRecord) -> Result<(), MetaError> {
        *self.node.lock() = Some(node.clone());
        Ok(())
    }

    async fn remove_node(&self, id: &str) -> Result<(), MetaError> {
        Err(MetaError::Store(format!("the embedded store holds one node; node {id} cannot be removed from it (decommission needs etcd)")))
    }

    /// One node: this one, alive while the store is open.
    async fn list_nodes(&self) -> Result<Vec<(NodeRecord, NodeState)>, MetaError> {
        let state = if self.storage_ok.load(std::sync::atomic::Ordering::Acquire) { NodeState::Online } else { NodeState::StorageDown };
        Ok(self.node.lock().clone().into_iter().map(|n| (n, state)).collect())
    }

    async fn set_storage_ok(&self, ok: bool) -> Result<(), MetaError> {
        self.storage_ok.store(ok, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    async fn put_kv(&self, key: &str, value: &[u8]) -> Result<(), MetaError> {
        let (key, value) = (format!("kv/{key}"), value.to_vec());
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(err)?;
            tx.open_table(META).map_err(err)?.insert(key.as_str(), value.as_slice()).map_err(err)?;
            tx.commit().map_err(err)
        })
        .await
    }

    async fn get_kv(&self, key: &str) -> Result<Option<Vec<u8>>, MetaError> {
        let key = format!("kv/{key}");
        self.blocking(move |db| get_meta(db, &key)).await
    }

    async fn list_kv(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
        let prefix = format!("kv/{prefix}");
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(err)?;
            let t = tx.open_table(META).map_err(err)?;
            let mut out = Vec::new();
            for row in t.range(prefix.as_str()..).map_err(err)? {
                let (k, v) = row.map_err(err)?;
                let Some(rest) = k.value().strip_prefix(&prefix) else { break };
                out.push((format!("{}{rest}", &prefix[3..]), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn delete_kv(&self, key: &str) -> Result<bool, MetaError> {
        let key = format!("kv/{key}");
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(err)?;
            let existed = tx.open_table(META).map_err(err)?.remove(key.as_str()).map_err(err)?.is_some();
            tx.commit().map_err(err)?;
            Ok(existed)
        })
        .await
    }

    async fn cluster_id(&self) -> Result<String, MetaError> {
        let v = self.blocking(|db| get_meta(db, "cluster_id")).await?.unwrap_or_default();
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    fn kind(&self) -> &'static str {
        "embedded (redb)"
    }
}

fn put_pool(db: &Database, bytes: &[u8]) -> Result<(), MetaError> {
    let tx = db.begin_write().map_err(err)?;
    {
        let mut t = tx.open_table(META).map_err(err)?;
        t.insert("pool", bytes).map_err(err)?;
    }
    tx.commit().map_err(err)
}

fn create_volume(db: &Database, mut rec: VolumeRecord) -> Result<VolumeRecord, MetaError> {
    let tx = db.begin_write().map_err(err)?;
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

fn get_volume(db: &Database, name: &str) -> Result<Option<VolumeRecord>, MetaError> {
    let tx = db.begin_read().map_err(err)?;
    let t = tx.open_table(VOLUMES).map_err(err)?;
    let v = t.get(name).map_err(err)?;
    v.map(|b| serde_json::from_slice(b.value()).map_err(err)).transpose()
}

fn list_volumes(db: &Database) -> Result<Vec<VolumeRecord>, MetaError> {
    let tx = db.begin_read().map_err(err)?;
    let t = tx.open_table(VOLUMES).map_err(err)?;
    let mut out = Vec::new();
    for item in t.iter().map_err(err)? {
        let (_, v) = item.map_err(err)?;
        out.push(serde_json::from_slice(v.value()).map_err(err)?);
    }
    Ok(out)
}

fn update_volume(db: &Database, rec: &VolumeRecord) -> Result<VolumeRecord, MetaError> {
    let tx = db.begin_write().map_err(err)?;
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

fn remove_volume(db: &Database, name: &str) -> Result<(), MetaError> {
    let tx = db.begin_write().map_err(err)?;
    {
        let mut t = tx.open_table(VOLUMES).map_err(err)?;
        if t.remove(name).map_err(err)?.is_none() {
            return Err(MetaError::NotFound(name.to_string()));
        }
    }
    tx.commit().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> VolumeRecord {
        VolumeRecord { id: 0, name: name.into(), size: 1 << 30, repl: 1, ..Default::default() }
    }

    #[tokio::test]
    async fn volumes_are_created_once_and_updated_by_revision() {
        let dir = tempfile::tempdir().unwrap();
        let s = Embedded::open(dir.path()).unwrap();
        let (a, b) = crate::meta::contract::volumes_are_created_once_and_updated_by_revision(&s).await;
        drop(s);
        let s = Embedded::open(dir.path()).unwrap();
        assert_eq!(s.get_volume("a").await.unwrap().unwrap().size, 2 << 30, "kept across a reopen");
        s.remove_volume("a").await.unwrap();
        assert_eq!(s.list_volumes().await.unwrap().len(), 1);
        assert!(s.create_volume(rec("c")).await.unwrap().id > b.id.max(a.id), "ids are never reused");
    }
}
