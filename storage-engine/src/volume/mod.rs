//! Volumes on one node: lifecycle (create, grow, delete with a persisted intent) over the
//! metadata store, and the in-memory handles the NBD frontend serves.

mod io;
pub mod readahead;

pub use io::{IoError, ReadBuf, ReadData};

use crate::device::BufPool;
use crate::meta::{MetaError, MetaStore, PendingOp, VolumeRecord};
use crate::metrics::VolumeStats;
use crate::pool::{Pool, PoolError};
use crate::qos::{Limits, Throttle};
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Volume sizes are rounded up to this.
pub const SIZE_ALIGN: u64 = 4096;
pub const MAX_REPL: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("volume {0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Meta(String),
}

impl From<MetaError> for VolumeError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::AlreadyExists(n) => VolumeError::AlreadyExists(n),
            MetaError::NotFound(n) => VolumeError::NotFound(n),
            MetaError::Conflict(n) => VolumeError::Aborted(format!("volume {n} was changed concurrently; retry")),
            MetaError::Store(s) => VolumeError::Meta(s),
        }
    }
}

/// A volume being served.
pub struct Volume {
    pub id: u64,
    pub name: String,
    size: AtomicU64,
    /// Shared by ordinary I/O; exclusive for read-modify-write and for freeing extents.
    io_lock: tokio::sync::RwLock<()>,
    connections: AtomicU32,
    deleted: AtomicBool,
    /// Bumped after every completed write, trim or zeroing (readahead coherence).
    write_gen: AtomicU64,
    readahead: readahead::Readahead,
    pub qos: Throttle,
    pub stats: VolumeStats,
}

impl Volume {
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }
}

/// Holds one NBD client's claim on a volume; dropping it releases the claim.
pub struct Connection {
    pub volume: Arc<Volume>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if self.volume.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last client left: readahead for it would only hold memory.
            self.volume.readahead.clear();
        }
    }
}

/// QoS fields to change; `None` leaves a limit as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct QosUpdate {
    pub rd_iops: Option<u64>,
    pub wr_iops: Option<u64>,
    pub rd_bw: Option<u64>,
    pub wr_bw: Option<u64>,
}

impl QosUpdate {
    fn apply(&self, l: &mut Limits) {
        for (new, old) in [(self.rd_iops, &mut l.rd_iops), (self.wr_iops, &mut l.wr_iops), (self.rd_bw, &mut l.rd_bw), (self.wr_bw, &mut l.wr_bw)] {
            if let Some(v) = new {
                *old = v;
            }
        }
    }
}

/// A volume as the SDK reports it.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub record: VolumeRecord,
    pub used_bytes: u64,
    pub connections: u32,
}

pub struct NodeInfo {
    pub id: String,
    pub hostname: String,
    pub sdk_address: String,
    pub nbd_address: String,
}

pub struct Engine {
    pub pool: Arc<Pool>,
    pub meta: Arc<dyn MetaStore>,
    pub node: NodeInfo,
    volumes: RwLock<HashMap<String, Arc<Volume>>>,
    bufs: BufPool,
    /// Serialises lifecycle changes (create/update/delete) so checks and updates do not race.
    lifecycle: tokio::sync::Mutex<()>,
    /// Bytes read ahead of a sequential reader (0 = off).
    pub readahead_window: u64,
    /// Readahead bytes held by all volumes (bounded by `readahead::GLOBAL_LIMIT`).
    readahead_held: Arc<AtomicU64>,
}

fn validate_name(name: &str) -> Result<(), VolumeError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(VolumeError::InvalidArgument(format!(
            "volume name {name:?} is invalid: use 1-128 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), VolumeError> {
    for (k, v) in labels {
        if k.is_empty() || k.len() > 253 || k.contains(['=', ',', ' ']) {
            return Err(VolumeError::InvalidArgument(format!("label key {k:?} is invalid: 1-253 characters without '=', ',' or spaces")));
        }
        if v.len() > 1024 {
            return Err(VolumeError::InvalidArgument(format!("label {k} value is longer than 1024 characters")));
        }
    }
    Ok(())
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Engine {
    /// Loads volumes, finishes interrupted deletes and reports extents that belong to no volume.
    pub fn new(pool: Arc<Pool>, meta: Arc<dyn MetaStore>, node: NodeInfo) -> Result<Engine, VolumeError> {
        meta.put_pool(&pool.record())?;
        meta.register_node(&crate::meta::NodeRecord {
            id: node.id.clone(),
            hostname: node.hostname.clone(),
            sdk_address: node.sdk_address.clone(),
            nbd_address: node.nbd_address.clone(),
            total_bytes: pool.total_bytes(),
            version: crate::sdk::VERSION.into(),
        })?;
        let engine = Engine {
            pool,
            meta,
            node,
            volumes: RwLock::new(HashMap::new()),
            bufs: BufPool::new(),
            lifecycle: tokio::sync::Mutex::new(()),
            readahead_window: readahead::WINDOW,
            readahead_held: Arc::new(AtomicU64::new(0)),
        };
        // Only this node's volumes are served here; others live in other nodes' pools.
        let all = engine.meta.list_volumes()?;
        let records: Vec<&VolumeRecord> = all.iter().filter(|r| engine.is_local(r)).collect();
        for rec in records.iter().copied() {
            if rec.pending == Some(PendingOp::Delete) {
                tracing::info!(volume = %rec.name, "finishing an interrupted delete");
                let extents = engine.pool.volume_extents(rec.id);
                engine.pool.free(rec.id, &extents)?;
                engine.meta.remove_volume(&rec.name)?;
                continue;
            }
            engine.volumes.write().insert(rec.name.clone(), Arc::new(Self::handle(rec)));
        }
        let known: std::collections::HashSet<u64> = records.iter().map(|r| r.id).collect();
        let leaked = engine.pool.all_mappings().iter().filter(|((v, _), _)| !known.contains(v)).count();
        if leaked > 0 {
            tracing::error!(leaked, "extents belong to no volume in the metadata store; run `strata-engine check`");
        }
        Ok(engine)
    }

    fn handle(rec: &VolumeRecord) -> Volume {
        Volume {
            id: rec.id,
            name: rec.name.clone(),
            size: AtomicU64::new(rec.size),
            io_lock: tokio::sync::RwLock::new(()),
            connections: AtomicU32::new(0),
            deleted: AtomicBool::new(false),
            write_gen: AtomicU64::new(0),
            readahead: Default::default(),
            qos: Throttle::new(rec.qos),
            stats: VolumeStats::default(),
        }
    }

    fn check_size(&self, size: u64) -> Result<u64, VolumeError> {
        if size == 0 {
            return Err(VolumeError::InvalidArgument("volume size must be greater than 0".into()));
        }
        let size = size.checked_next_multiple_of(SIZE_ALIGN).ok_or_else(|| VolumeError::InvalidArgument("volume size is too large".into()))?;
        let cap = self.pool.total_bytes();
        if size > cap {
            return Err(VolumeError::ResourceExhausted(format!(
                "volume size {} is larger than the pool's capacity of {}",
                strata_api::units::format_size(size),
                strata_api::units::format_size(cap)
            )));
        }
        Ok(size)
    }

    pub async fn create(&self, name: &str, size: u64, repl: u32, labels: BTreeMap<String, String>, qos: Limits) -> Result<VolumeInfo, VolumeError> {
        validate_name(name)?;
        validate_labels(&labels)?;
        let repl = if repl == 0 { 1 } else { repl };
        if repl > MAX_REPL {
            return Err(VolumeError::InvalidArgument(format!("repl {repl} is out of range: use 1 to {MAX_REPL}")));
        }
        if repl > 1 {
            return Err(VolumeError::FailedPrecondition(format!(
                "repl {repl} needs {repl} nodes but this cluster has 1 node (embedded metadata store); create the volume with repl 1"
            )));
        }
        let size = self.check_size(size)?;
        let _g = self.lifecycle.lock().await;
        let rec = VolumeRecord {
            id: 0,
            name: name.to_string(),
            size,
            repl,
            labels,
            created_unix: now_unix(),
            revision: 0,
            pending: None,
            qos,
            node: self.node.id.clone(),
        };
        let rec = self.meta.create_volume(rec)?;
        self.volumes.write().insert(rec.name.clone(), Arc::new(Self::handle(&rec)));
        tracing::info!(volume = %name, size, "volume created");
        self.info_of(rec)
    }

    fn info_of(&self, mut record: VolumeRecord) -> Result<VolumeInfo, VolumeError> {
        if record.node.is_empty() {
            record.node = self.node.id.clone();
        }
        let local = record.node == self.node.id;
        let connections = self.volumes.read().get(&record.name).map(|v| v.connections()).unwrap_or(0);
        let used_bytes = if local { self.pool.used_bytes_of(record.id) } else { 0 };
        Ok(VolumeInfo { used_bytes, connections, record })
    }

    /// Whether a volume's data lives in this node's pool.
    pub fn is_local(&self, r: &VolumeRecord) -> bool {
        r.node.is_empty() || r.node == self.node.id
    }

    fn must_be_local(&self, r: &VolumeRecord) -> Result<(), VolumeError> {
        if self.is_local(r) {
            return Ok(());
        }
        Err(VolumeError::FailedPrecondition(format!(
            "volume {} lives on node {}; manage it through that node's engine (this is {})",
            r.name, r.node, self.node.id
        )))
    }

    pub fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let mut out: Vec<VolumeInfo> = self.meta.list_volumes()?.into_iter().map(|r| self.info_of(r)).collect::<Result<_, _>>()?;
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    pub fn inspect(&self, name: &str) -> Result<VolumeInfo, VolumeError> {
        let rec = self.meta.get_volume(name)?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        self.info_of(rec)
    }

    /// Grows a volume (online) and/or changes labels. Shrinking is refused.
    pub async fn update(&self, name: &str, size: Option<u64>, labels: BTreeMap<String, String>, qos: QosUpdate) -> Result<VolumeInfo, VolumeError> {
        let _g = self.lifecycle.lock().await;
        let mut rec = self.meta.get_volume(name)?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        self.must_be_local(&rec)?;
        if rec.pending.is_some() {
            return Err(VolumeError::FailedPrecondition(format!("volume {name} is being deleted")));
        }
        if let Some(size) = size {
            let size = self.check_size(size)?;
            if size < rec.size {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume {name} is {} and cannot shrink to {}: volumes only grow",
                    strata_api::units::format_size(rec.size),
                    strata_api::units::format_size(size)
                )));
            }
            rec.size = size;
        }
        for (k, v) in labels {
            if v.is_empty() {
                rec.labels.remove(&k);
            } else {
                rec.labels.insert(k, v);
            }
        }
        validate_labels(&rec.labels)?;
        qos.apply(&mut rec.qos);
        let rec = self.meta.update_volume(&rec)?;
        if let Some(v) = self.volumes.read().get(name) {
            v.size.store(rec.size, Ordering::Release);
            if v.qos.limits() != rec.qos {
                v.qos.set(rec.qos);
            }
        }
        self.info_of(rec)
    }

    /// Deletes a volume: the intent is persisted first, then its extents are freed, then the
    /// record goes. Refused while clients are connected unless `force`.
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), VolumeError> {
        let _g = self.lifecycle.lock().await;
        let mut rec = self.meta.get_volume(name)?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        self.must_be_local(&rec)?;
        let handle = self.volumes.read().get(name).cloned();
        if let Some(v) = &handle {
            let n = v.connections();
            if n > 0 && !force {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume {name} has {n} connected NBD client(s); disconnect them or delete with --force"
                )));
            }
        }
        if rec.pending.is_none() {
            rec.pending = Some(PendingOp::Delete);
            rec = self.meta.update_volume(&rec)?;
        }
        let _io = match &handle {
            Some(v) => {
                v.deleted.store(true, Ordering::Release);
                Some(v.io_lock.write().await)
            }
            None => None,
        };
        let pool = self.pool.clone();
        let id = rec.id;
        tokio::task::spawn_blocking(move || {
            let extents = pool.volume_extents(id);
            pool.free(id, &extents)
        })
        .await
        .map_err(|e| VolumeError::Meta(e.to_string()))??;
        self.meta.remove_volume(name)?;
        self.volumes.write().remove(name);
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Claims a volume for an NBD client.
    pub fn connect(&self, name: &str) -> Option<Connection> {
        let v = self.volumes.read().get(name).cloned()?;
        if v.is_deleted() {
            return None;
        }
        v.connections.fetch_add(1, Ordering::AcqRel);
        Some(Connection { volume: v })
    }

    /// Names and sizes of the exports, for NBD_OPT_LIST.
    pub fn exports(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.volumes.read().values().filter(|v| !v.is_deleted()).map(|v| (v.name.clone(), v.size())).collect();
        v.sort();
        v
    }

    pub fn volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().get(name).cloned()
    }

    pub fn loaded_volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes.read().values().cloned().collect()
    }

    pub fn metrics_text(&self) -> String {
        use crate::metrics::{render, PoolSample, VolumeSample};
        let vols = self.loaded_volumes();
        let samples: Vec<VolumeSample> = vols
            .iter()
            .map(|v| VolumeSample { name: &v.name, size: v.size(), used: self.pool.used_bytes_of(v.id), connections: v.connections(), stats: &v.stats })
            .collect();
        render(&PoolSample { uuid: self.pool.uuid.to_string(), total: self.pool.total_bytes(), used: self.pool.used_bytes() }, &samples)
    }
}
