//! Volumes on one node: lifecycle (create, grow, delete with a persisted intent) over the
//! metadata store, and the in-memory handles the NBD frontend serves.

mod attach;
mod io;
mod replicas;
mod scrub;
mod secure;
mod snapshots;

pub use crate::replica::{offsets, IoError, ReadBuf, ReadData, Replica};
pub use attach::Exports;
pub use io::VolumeIo;
pub use scrub::{ScrubConfig, ScrubReport};
pub use snapshots::{CLOUD_CRED_LABEL, CLOUD_SCHEDULE_LABEL};

use crate::meta::{MetaError, MetaStore, PendingOp, VolumeRecord};
use crate::metrics::VolumeStats;
use crate::pool::{Pool, PoolError};
use crate::qos::{Limits, Throttle};
use crate::replication::target::{Links, Target, TargetConfig};
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
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
    #[error("node {0} is not in the cluster (removed, or never joined)")]
    NodeNotFound(String),
    /// Something other than a volume is absent (a credential, a backup): the text says what.
    #[error("{0} not found")]
    Absent(String),
    /// Something other than a volume exists already: the text says what.
    #[error("{0} already exists")]
    Exists(String),
    /// Data read back does not match its checksum (a damaged backup chunk).
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Replication(#[from] crate::replication::target::TargetError),
}

impl From<MetaError> for VolumeError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::AlreadyExists(n) => VolumeError::AlreadyExists(n),
            MetaError::NotFound(n) => VolumeError::NotFound(n),
            MetaError::Conflict(n) => VolumeError::Aborted(format!("volume {n} was changed concurrently; retry")),
            MetaError::Store(s) => VolumeError::Meta(s),
            MetaError::NodeNotFound(n) => VolumeError::NodeNotFound(n),
        }
    }
}

/// A volume being served (or known) here: this node's replica of it, and what serving it
/// takes (the target, NBD clients, QoS, statistics, the encryption key).
pub struct Volume {
    /// The data side (size, I/O lock, epoch fence); `Volume` derefs to it.
    pub replica: Arc<Replica>,
    pub(super) connections: AtomicU32,
    pub qos: Throttle,
    pub stats: VolumeStats,
    /// This node serves the volume's NBD export.
    served: AtomicBool,
    /// The engine is stopping (a restart or an upgrade): requests it no longer serves are not
    /// answered with an error; their connection is closed so the client sends them again.
    stopping: AtomicBool,
    /// Set while this node is the target of a volume with replicas on other nodes.
    target: RwLock<Option<Arc<Target>>>,
    /// Encrypted at rest: I/O needs the key, loaded from the passphrase at create or attach.
    pub secure: bool,
    key: RwLock<Option<Arc<crate::crypt::VolumeKey>>>,
    /// Serialises the read-modify-write of unaligned writes to an encrypted volume.
    secure_rmw: tokio::sync::Mutex<()>,
    /// Client requests hold it shared; a change of the target's replica set (ha-update, a
    /// replica replaced) holds it exclusive, so requests in flight finish on the old target and
    /// the next ones go to the new one instead of failing on the closed old one.
    pub(super) switch: tokio::sync::RwLock<()>,
}

impl std::ops::Deref for Volume {
    type Target = Replica;
    fn deref(&self) -> &Replica {
        &self.replica
    }
}

impl Volume {
    pub fn target(&self) -> Option<Arc<Target>> {
        self.target.read().clone()
    }
    /// The key for I/O: None for a plain volume; an error for an encrypted one whose key is not
    /// loaded (nothing is ever written in plaintext).
    pub(crate) fn key_for_io(&self) -> Result<Option<Arc<crate::crypt::VolumeKey>>, IoError> {
        if !self.secure {
            return Ok(None);
        }
        self.key.read().clone().map(Some).ok_or_else(|| IoError::Locked(self.name.clone()))
    }

    pub fn has_key(&self) -> bool {
        self.key.read().is_some()
    }

    pub(crate) fn set_key(&self, key: crate::crypt::VolumeKey) {
        *self.key.write() = Some(Arc::new(key));
    }

    pub fn is_served(&self) -> bool {
        self.served.load(Ordering::Acquire)
    }

    /// The error of a request this node does not serve: `Stopping` while the engine stops.
    pub(crate) fn not_served(&self) -> IoError {
        if self.stopping.load(Ordering::Acquire) {
            IoError::Stopping(self.name.clone())
        } else {
            IoError::NotServed(self.name.clone())
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The engine stops: see `stopping`.
    pub(super) fn mark_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// No more NBD clients here, and the target (if any) stops.
    pub(super) fn stop_serving(&self) {
        self.served.store(false, Ordering::Release);
        if let Some(t) = self.target.write().take() {
            t.close();
        }
    }
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
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
    /// Replication state of each replica, as the target sees it (empty elsewhere).
    pub replicas: Vec<ReplicaStatus>,
    /// The target is comparing the in-sync replicas after an unclean change of target.
    pub verifying: bool,
    /// Client I/O counters of this node's handle (a served volume's are on its target).
    pub io: IoTotals,
}

/// A volume's client I/O counters, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct IoTotals {
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub trim_ops: u64,
    pub errors: u64,
    pub read_latency_us: u64,
    pub write_latency_us: u64,
}

impl IoTotals {
    fn of(s: &crate::metrics::VolumeStats) -> IoTotals {
        IoTotals {
            read_ops: s.read_ops.load(Ordering::Relaxed),
            write_ops: s.write_ops.load(Ordering::Relaxed),
            read_bytes: s.read_bytes.load(Ordering::Relaxed),
            write_bytes: s.write_bytes.load(Ordering::Relaxed),
            flush_ops: s.flush_ops.load(Ordering::Relaxed),
            trim_ops: s.trim_ops.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            read_latency_us: s.read_latency.totals().1,
            write_latency_us: s.write_latency.totals().1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    pub node: String,
    pub state: &'static str,
    /// Bytes recorded as missed and not yet copied back.
    pub dirty_bytes: u64,
    /// Bytes copied by resync since this node became the target.
    pub copied_bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub id: String,
    pub hostname: String,
    pub sdk_address: String,
    pub nbd_address: String,
    /// Where other engines reach this node's replication port.
    pub repl_address: String,
    pub zone: String,
    pub rack: String,
}

/// Takes `node` off a volume's `dropped` list once it freed the data.
pub(crate) async fn forget_dropped(meta: &dyn MetaStore, name: &str, node: &str) -> Result<(), VolumeError> {
    for _ in 0..20 {
        let Some(mut rec) = meta.get_volume(name).await? else { return Ok(()) };
        if !rec.dropped.iter().any(|n| n == node) {
            return Ok(());
        }
        rec.dropped.retain(|n| n != node);
        match meta.update_volume(&rec).await {
            Err(MetaError::Conflict(_)) => continue,
            r => return r.map(|_| ()).map_err(Into::into),
        }
    }
    Err(VolumeError::Aborted(format!("volume {name} was changed concurrently; retry")))
}

/// A volume to create: the SDK request's fields.
#[derive(Debug, Clone, Default)]
pub struct CreateSpec<'a> {
    pub name: &'a str,
    /// Bytes (rounded up to 4 KiB).
    pub size: u64,
    /// Replicas, 1 to `MAX_REPL` (0 means 1).
    pub repl: u32,
    pub labels: BTreeMap<String, String>,
    pub qos: Limits,
    pub placement: PlacementSpec,
    /// Encrypt at rest under a key derived from this passphrase.
    pub passphrase: Option<&'a [u8]>,
    /// Who may use it (empty: only admins, when the SDK checks tokens).
    pub ownership: crate::meta::Ownership,
}

/// A change to a volume: each field that is set changes; a label with an empty value is
/// removed.
#[derive(Debug, Clone, Default)]
pub struct UpdateSpec {
    /// New size in bytes (grow only; rounded up to 4 KiB).
    pub size: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub qos: QosUpdate,
    /// A new owner and collaborators (replacing the old ones).
    pub ownership: Option<crate::meta::Ownership>,
}

/// Placement filters of a new volume (Portworx's `nodes`, `zones`, `racks`).
#[derive(Debug, Clone, Default)]
pub struct PlacementSpec {
    pub nodes: Vec<String>,
    pub zones: Vec<String>,
    pub racks: Vec<String>,
    /// The node for the first replica when eligible (else this node).
    pub prefer: Option<String>,
}

/// This node's volume service: the lifecycle of volumes over the metadata store (create,
/// update, delete, attach/detach, snapshot, clone, restore, ha-update, scrub), the volumes
/// known here and the targets this node runs for them. Frontends reach it only through
/// `Exports` and the `VolumeIo` handles it gives out.
pub struct Service {
    pub pool: Arc<Pool>,
    pub meta: Arc<dyn MetaStore>,
    pub node: NodeInfo,
    volumes: RwLock<HashMap<String, Arc<Volume>>>,
    /// This node's replicas' data path.
    pub local: Arc<crate::replica::Local>,
    /// Serialises lifecycle changes (create/update/delete) so checks and updates do not race.
    lifecycle: tokio::sync::Mutex<()>,
    /// Replication settings (replica timeout, resync rate, where dirty-region records live).
    pub repl: TargetConfig,
    /// What this node's targets work through (the store's compare-and-swap, TCP legs).
    pub links: Links,
    /// This node's certificate for replication (mutual TLS); None: plaintext.
    pub tls: Option<Arc<crate::security::Tls>>,
    /// The SDK's token rules; None: the SDK is open.
    pub auth: Option<Arc<crate::security::tokens::Auth>>,
    /// Replicas to rebuild elsewhere (volume, dead node), served by `run_replacements`.
    replacements: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>>,
    /// Alerts this node raised (`stratactl alerts show`).
    pub alerts: Arc<crate::alerts::Alerts>,
    /// In maintenance, and why: serves no volume, takes no new replica (kept in the node's
    /// record).
    pub(crate) maintenance: parking_lot::Mutex<Option<String>>,
    /// How drives added while running are opened (the engine's --io-engine).
    pub drive_io_engine: crate::device::IoEngine,
    /// Seals cloud credentials in the metadata store (from the cluster's secret); None: they
    /// cannot be stored.
    pub cloud_key: Option<[u8; 32]>,
    /// Paces this node's cloud backup uploads (the engine's --cloudsnap-rate).
    pub cloud_pacer: crate::clock::Pacer,
}

impl Service {
    /// A channel to another engine's SDK at `addr`: over TLS, presenting this node's
    /// certificate, when this node has one.
    pub async fn peer_sdk(&self, addr: &str, timeout: std::time::Duration) -> Result<tonic::transport::Channel, String> {
        let tls = self.tls.as_ref().map(|t| t.sdk_client());
        strata_api::tls::channel(addr, tls.as_ref(), std::time::Duration::from_secs(3), timeout).await
    }
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

impl Service {
    /// Loads volumes, finishes interrupted deletes and reports extents that belong to no volume.
    pub async fn new(pool: Arc<Pool>, meta: Arc<dyn MetaStore>, node: NodeInfo, alerts: crate::alerts::Alerts) -> Result<Service, VolumeError> {
        meta.put_pool(&pool.record()).await?;
        // Maintenance outlives a restart (an upgrade restarts the engine in maintenance).
        let maintenance = meta.list_nodes().await?.into_iter().find(|(n, _)| n.id == node.id && n.maintenance).map(|(n, _)| n.maintenance_reason);
        if maintenance.is_some() {
            tracing::warn!("this node is in maintenance: it serves no volume until `stratactl service maintenance --exit`");
        }
        meta.register_node(&Self::node_record(&node, &pool, maintenance.as_deref())).await?;
        let alerts = Arc::new(alerts);
        let engine = Service {
            local: Arc::new(crate::replica::Local::new(pool.clone(), alerts.clone(), &node.id)),
            pool,
            links: Links::store(meta.clone(), None),
            tls: None,
            auth: None,
            meta,
            node,
            volumes: RwLock::new(HashMap::new()),
            lifecycle: tokio::sync::Mutex::new(()),
            repl: TargetConfig {
                timeout: std::time::Duration::from_secs(5),
                resync_rate: 0,
                replica_timeout: std::time::Duration::ZERO,
                data_dir: std::path::PathBuf::from("."),
            },
            replacements: parking_lot::Mutex::new(None),
            alerts,
            maintenance: parking_lot::Mutex::new(maintenance),
            drive_io_engine: crate::device::IoEngine::Auto,
            cloud_key: None,
            cloud_pacer: Default::default(),
        };
        // Volumes with a replica here, or served here; others live in other nodes' pools.
        let me = engine.node.id.clone();
        let all: Vec<VolumeRecord> = engine.meta.list_volumes().await?.into_iter().map(|r| r.normalized(&me)).collect();
        let records: Vec<&VolumeRecord> = all.iter().filter(|r| r.has_replica(&me) || r.target == me).collect();
        for rec in records.iter().copied() {
            if matches!(rec.pending, Some(PendingOp::Delete | PendingOp::Create)) {
                tracing::info!(volume = %rec.name, "finishing an interrupted delete (or undoing an interrupted snapshot or clone)");
                engine.free_local(rec.id).await?;
                engine.forget_replica(rec).await?;
                continue;
            }
            engine.volumes.write().insert(rec.name.clone(), Arc::new(Self::handle(rec)));
        }
        // Replicas taken from this node while it was down (the record says so): free their data.
        for rec in all.iter().filter(|r| r.dropped.contains(&me) && !r.has_replica(&me)) {
            tracing::info!(volume = %rec.name, "freeing a replica this node no longer holds");
            engine.free_local(rec.id).await?;
            forget_dropped(&*engine.meta, &rec.name, &me).await?;
        }
        let known: std::collections::HashSet<u64> = records.iter().map(|r| r.id).collect();
        let leaked = engine.pool.all_mappings().iter().filter(|((v, _), _)| !known.contains(v)).count();
        if leaked > 0 {
            tracing::error!(leaked, "extents belong to no volume in the metadata store; run `strata-engine check`");
        }
        Ok(engine)
    }

    /// After `check --repair` salvaged a journal with mappings lost, this node's replicas may
    /// miss data: each leaves its volume's in-sync set (the target rebuilds it from the others;
    /// this run's fresh boot id tells targets that reconnect), and a volume with no other in-sync
    /// replica raises an alarm, as its lost blocks read as zeroes. Before serving.
    pub async fn distrust_local_replicas_if_salvaged(&self) -> Result<(), VolumeError> {
        if !self.pool.replicas_suspect() {
            return Ok(());
        }
        crate::replica::new_boot_id();
        let me = self.node.id.clone();
        let all: Vec<VolumeRecord> = self.meta.list_volumes().await?.into_iter().map(|r| r.normalized(&me)).collect();
        for rec in all.iter().filter(|r| r.has_replica(&me) && r.is_in_sync(&me) && r.snapshot_of.is_none()) {
            if rec.in_sync.len() < 2 {
                self.alerts.raise(
                    crate::alerts::Severity::Alarm,
                    "ReplicaDataLost",
                    &format!("volume/{}", rec.name),
                    format!("volume {}: this node's journal lost extent mappings (salvaged by check --repair) and no other in-sync replica holds the data: blocks of the lost extents read as zeroes", rec.name),
                );
                continue;
            }
            for _ in 0..20 {
                let Some(mut cur) = self.meta.get_volume(&rec.name).await?.map(|r| r.normalized(&me)) else { break };
                cur.in_sync.retain(|n| n != &me);
                if !cur.rebuild.contains(&me) {
                    cur.rebuild.push(me.clone());
                }
                match self.meta.update_volume(&cur).await {
                    Err(MetaError::Conflict(_)) => continue,
                    r => {
                        r?;
                        break;
                    }
                }
            }
            tracing::warn!(volume = %rec.name, "this node's replica may miss data (its journal was salvaged): out of the in-sync set until rebuilt");
        }
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.clear_suspect()).await.map_err(|e| VolumeError::Meta(e.to_string()))??;
        Ok(())
    }

    fn node_record(node: &NodeInfo, pool: &Pool, maintenance: Option<&str>) -> crate::meta::NodeRecord {
        crate::meta::NodeRecord {
            id: node.id.clone(),
            hostname: node.hostname.clone(),
            sdk_address: node.sdk_address.clone(),
            nbd_address: node.nbd_address.clone(),
            total_bytes: pool.total_bytes(),
            used_bytes: pool.used_bytes(),
            version: crate::VERSION.into(),
            repl_address: node.repl_address.clone(),
            zone: node.zone.clone(),
            rack: node.rack.clone(),
            maintenance: maintenance.is_some(),
            maintenance_reason: maintenance.unwrap_or_default().to_string(),
        }
    }

    /// In maintenance (`stratactl service maintenance`): it serves no volume.
    pub fn in_maintenance(&self) -> bool {
        self.maintenance.lock().is_some()
    }

    /// Why this node is in maintenance (None: it is not).
    pub fn maintenance_reason(&self) -> Option<String> {
        self.maintenance.lock().clone()
    }

    /// Refuses to serve volume `name` here while this node is in maintenance.
    pub fn refuse_in_maintenance(&self, name: &str) -> Result<(), VolumeError> {
        if self.in_maintenance() {
            return Err(VolumeError::FailedPrecondition(format!(
                "node {} is in maintenance and serves no volume: attach {name} on another node, or end maintenance (stratactl service maintenance --exit)",
                self.node.id
            )));
        }
        Ok(())
    }

    /// This node's record as it is now.
    pub(crate) fn own_record(&self) -> crate::meta::NodeRecord {
        Self::node_record(&self.node, &self.pool, self.maintenance.lock().as_deref())
    }

    /// Publishes this node's usage in its record when it changed since `last`; returns what was
    /// published.
    pub async fn report_usage(&self, last: u64) -> Result<u64, MetaError> {
        let rec = self.own_record();
        if rec.used_bytes != last {
            self.meta.update_node(&rec).await?;
        }
        Ok(rec.used_bytes)
    }

    /// Speaks mutual TLS with `tls` on every replication connection this node opens.
    pub fn use_tls(&mut self, tls: Arc<crate::security::Tls>) {
        self.links = Links::store(self.meta.clone(), Some(tls.clone()));
        self.tls = Some(tls);
    }

    /// Shares the engine (the servers and background tasks hold it).
    pub fn into_shared(self) -> Arc<Service> {
        Arc::new(self)
    }

    /// Serves replacement requests (from targets whose replica's node stayed offline) one at a
    /// time, for the engine's life.
    pub fn run_replacements(self: &Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        *self.replacements.lock() = Some(tx);
        let e = self.clone();
        tokio::spawn(async move {
            while let Some((name, node)) = rx.recv().await {
                if let Err(err) = e.replace_replica(&name, &node).await {
                    tracing::warn!(volume = %name, %node, "cannot rebuild the replica elsewhere yet: {err}");
                }
            }
        });
    }

    fn handle(rec: &VolumeRecord) -> Volume {
        Volume {
            replica: Arc::new(Replica::new(rec.id, &rec.name, rec.size, rec.epoch, rec.snapshot_of.is_some())),
            // Served once its target runs here (`attach`, `start_targets`).
            served: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            target: RwLock::new(None),
            secure: rec.secure.is_some(),
            key: RwLock::new(None),
            secure_rmw: tokio::sync::Mutex::new(()),
            switch: tokio::sync::RwLock::new(()),
            connections: AtomicU32::new(0),
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

    /// Creates a volume (detached: it is attached where it is used); with a passphrase it is
    /// encrypted at rest (AES-256-XTS) under a key derived from it, held in memory here (the
    /// store keeps only a salt and a check value).
    #[tracing::instrument(name = "create", skip_all, fields(volume = %spec.name, node = %self.node.id, repl = spec.repl))]
    pub async fn create(&self, spec: CreateSpec<'_>) -> Result<VolumeInfo, VolumeError> {
        let CreateSpec { name, size, repl, labels, qos, placement, passphrase, ownership } = spec;
        validate_name(name)?;
        validate_labels(&labels)?;
        snapshots::validate_schedule(&labels)?;
        let key = match passphrase {
            // Key derivation is deliberately slow: off the I/O threads.
            Some(p) => {
                let p = p.to_vec();
                let k =
                    tokio::task::spawn_blocking(move || crate::crypt::VolumeKey::create(&p)).await.map_err(|e| VolumeError::Meta(e.to_string()))?;
                Some(k.map_err(|e| VolumeError::InvalidArgument(e.to_string()))?)
            }
            None => None,
        };
        let repl = if repl == 0 { 1 } else { repl };
        if repl > MAX_REPL {
            return Err(VolumeError::InvalidArgument(format!("repl {repl} is out of range: use 1 to {MAX_REPL}")));
        }
        let size = self.check_size(size)?;
        let _g = self.lifecycle.lock().await;
        let replicas = self.place_replicas(repl, size, &placement, &[]).await?;
        let me = self.node.id.clone();
        let rec = VolumeRecord {
            id: 0,
            name: name.to_string(),
            size,
            repl,
            labels,
            created_unix: crate::clock::now_unix(),
            revision: 0,
            pending: None,
            qos,
            node: me.clone(),
            in_sync: replicas.clone(),
            replicas,
            // Created detached: the node where it is used attaches it (CSI NodeStage, `host
            // attach`, or an NBD client opening it).
            target: String::new(),
            epoch: 1,
            clean: true,
            dropped: Vec::new(),
            rebuild: Vec::new(),
            secure: key.as_ref().map(|(params, _)| params.clone()),
            snapshot_of: None,
            ownership,
        };
        let rec = self.meta.create_volume(rec).await?;
        let handle = Arc::new(Self::handle(&rec));
        if let Some((_, k)) = key {
            handle.set_key(k);
        }
        // Kept here even without a local replica: it holds the key of an encrypted volume, so
        // attaching here needs no passphrase again.
        self.volumes.write().insert(rec.name.clone(), handle);
        tracing::info!(volume = %name, size, replicas = ?rec.replicas, "volume created");
        self.info_of(rec)
    }

    fn info_of(&self, record: VolumeRecord) -> Result<VolumeInfo, VolumeError> {
        let record = record.normalized(&self.node.id);
        let handle = self.volumes.read().get(&record.name).cloned();
        let connections = handle.as_ref().map(|v| v.connections()).unwrap_or(0);
        let io = handle.as_ref().map(|v| IoTotals::of(&v.stats)).unwrap_or_default();
        let used_bytes = if record.has_replica(&self.node.id) { self.pool.used_bytes_of(record.id) } else { 0 };
        let target = handle.and_then(|h| h.target());
        let verifying = target.as_ref().is_some_and(|t| t.verifying.load(Ordering::Acquire));
        let replicas = match target {
            Some(t) => t
                .peers
                .iter()
                .map(|p| ReplicaStatus {
                    node: p.node.clone(),
                    state: p.state().as_str(),
                    dirty_bytes: p.dirty.bytes(),
                    copied_bytes: p.copied.load(Ordering::Relaxed),
                })
                .collect(),
            None => Vec::new(),
        };
        Ok(VolumeInfo { used_bytes, connections, record, replicas, verifying, io })
    }

    /// Whether a volume's data lives in this node's pool.
    pub fn is_local(&self, r: &VolumeRecord) -> bool {
        r.node.is_empty() || r.clone().normalized(&self.node.id).has_replica(&self.node.id)
    }

    /// Changes to a volume go through the node that serves it.
    fn must_be_target(&self, r: &VolumeRecord) -> Result<(), VolumeError> {
        let r = r.clone().normalized(&self.node.id);
        if r.target == self.node.id {
            return Ok(());
        }
        let at = if r.target.is_empty() {
            format!("is not attached; attach it (stratactl host attach {}) or use node {}", r.name, r.node)
        } else {
            format!("is served by node {}", r.target)
        };
        Err(VolumeError::FailedPrecondition(format!("volume {} {at}; manage it through that node's engine (this is {})", r.name, self.node.id)))
    }

    pub async fn list(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let mut out: Vec<VolumeInfo> = self.meta.list_volumes().await?.into_iter().map(|r| self.info_of(r)).collect::<Result<_, _>>()?;
        out.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(out)
    }

    /// Up to `limit` volumes (and snapshots) in name order, the first after `after`.
    pub async fn list_page(&self, after: &str, limit: usize) -> Result<Vec<VolumeInfo>, VolumeError> {
        self.meta.list_volumes_page(after, limit).await?.into_iter().map(|r| self.info_of(r)).collect()
    }

    /// The volumes this node serves, with their live figures: what another engine asks for to
    /// fill in a `volume list` (a read of each one's record, not a listing of every volume).
    pub async fn list_served(&self) -> Result<Vec<VolumeInfo>, VolumeError> {
        let names: Vec<String> = self.volumes.read().iter().filter(|(_, v)| v.is_served()).map(|(n, _)| n.clone()).collect();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            // As listed: a record without replicas reads as served by its own node.
            let Some(rec) = self.meta.get_volume(&name).await? else { continue };
            let info = self.info_of(rec)?;
            if info.record.target == self.node.id {
                out.push(info);
            }
        }
        Ok(out)
    }

    pub async fn inspect(&self, name: &str) -> Result<VolumeInfo, VolumeError> {
        let rec = self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        self.info_of(rec)
    }

    /// Grows a volume (online, or detached) and/or changes labels. Shrinking is refused.
    #[tracing::instrument(name = "update", skip_all, fields(volume = %name, node = %self.node.id))]
    pub async fn update(&self, name: &str, spec: UpdateSpec) -> Result<VolumeInfo, VolumeError> {
        let UpdateSpec { size, labels, qos, ownership } = spec;
        let _g = self.lifecycle.lock().await;
        let mut rec = self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        if let Some(of) = &rec.snapshot_of {
            return Err(VolumeError::FailedPrecondition(format!(
                "{name} is a snapshot of {of} and cannot be changed; clone it for a writable volume"
            )));
        }
        // A detached volume has no writer: its record alone changes (a new target announces
        // the size to the replicas when it starts).
        if !rec.clone().normalized(&self.node.id).target.is_empty() {
            self.must_be_target(&rec)?;
        }
        if let Some(op) = &rec.pending {
            return Err(VolumeError::FailedPrecondition(op.describe(name)));
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
        snapshots::validate_schedule(&rec.labels)?;
        qos.apply(&mut rec.qos);
        if let Some(o) = ownership {
            rec.ownership = o;
        }
        let rec = self.meta.update_volume(&rec).await?;
        let handle = self.volumes.read().get(name).cloned();
        if let Some(v) = handle {
            if let Some(t) = v.target() {
                // Replicas learn the size before the client can write past the old end.
                t.announce_size(rec.size).await.map_err(|e| VolumeError::FailedPrecondition(format!("telling the replicas the new size: {e}")))?;
            }
            v.size.store(rec.size, Ordering::Release);
            if v.qos.limits() != rec.qos {
                v.qos.set(rec.qos);
            }
        }
        self.info_of(rec)
    }

    /// Frees this node's extents of a volume (on the blocking pool: it writes the journal).
    pub(super) async fn free_local(&self, id: u64) -> Result<(), VolumeError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.free(id, &pool.volume_extents(id)).map(|_| ()))
            .await
            .map_err(|e| VolumeError::Meta(e.to_string()))??;
        Ok(())
    }

    /// After this node freed its replica of a volume being deleted: takes the node off the
    /// record, and removes the record when no replica is left.
    async fn forget_replica(&self, rec: &VolumeRecord) -> Result<(), VolumeError> {
        let me = &self.node.id;
        let mut rec = rec.clone();
        for _ in 0..20 {
            rec.replicas.retain(|n| n != me);
            rec.in_sync.retain(|n| n != me);
            if rec.replicas.is_empty() {
                return match self.meta.remove_volume(&rec.name).await {
                    Err(MetaError::NotFound(_)) => Ok(()),
                    r => Ok(r?),
                };
            }
            match self.meta.update_volume(&rec).await {
                Err(MetaError::Conflict(_)) => {
                    rec = match self.meta.get_volume(&rec.name).await? {
                        Some(r) => r.normalized(me),
                        None => return Ok(()),
                    };
                }
                r => return r.map(|_| ()).map_err(Into::into),
            }
        }
        Err(VolumeError::Aborted(format!("volume {} was changed concurrently; retry", rec.name)))
    }

    /// Deletes a volume: the intent is persisted first, then every replica's extents are freed
    /// (this node's directly, other nodes' over the replication protocol), then the record goes.
    /// A replica on a node that is down is freed when that node's engine starts again; until
    /// then the volume reads as "deleting". Refused while clients are connected unless `force`.
    #[tracing::instrument(name = "delete", skip_all, fields(volume = %name, node = %self.node.id, force))]
    pub async fn delete(&self, name: &str, force: bool) -> Result<(), VolumeError> {
        let _g = self.lifecycle.lock().await;
        let me = self.node.id.clone();
        let mut rec = self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?.normalized(&me);
        if !rec.target.is_empty() && rec.target != me && !force {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {name} is attached on node {}; detach it there first (stratactl host detach {name}) or delete with --force",
                rec.target
            )));
        }
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
            rec = self.meta.update_volume(&rec).await?.normalized(&me);
        }
        let _io = match &handle {
            Some(v) => {
                v.deleted.store(true, Ordering::Release);
                if let Some(t) = v.target.write().take() {
                    t.close();
                }
                Some(v.io_lock.write().await)
            }
            None => None,
        };
        // Other nodes first: each one that confirms is taken off the record.
        for node in rec.replicas.clone().into_iter().filter(|n| n != &me) {
            let dropped = self.drop_remote(&node, rec.id).await;
            match dropped {
                Ok(()) => {
                    rec.replicas.retain(|n| n != &node);
                    rec.in_sync.retain(|n| n != &node);
                    if rec.replicas.is_empty() {
                        // The last copy was another node's (a snapshot or a volume this node
                        // holds no replica of): the record goes below. Stored without replicas
                        // it would read back, normalized, as a volume attached on its `node`.
                        break;
                    }
                    rec = self.meta.update_volume(&rec).await?;
                }
                Err(e) => tracing::warn!(volume = %name, %node, "replica not freed now (freed when the node is back): {e}"),
            }
        }
        let local = rec.has_replica(&me);
        if local {
            self.free_local(rec.id).await?;
        }
        if local || rec.replicas.is_empty() {
            self.forget_replica(&rec).await?;
        }
        self.volumes.write().remove(name);
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Names and sizes of the exports, for NBD_OPT_LIST: volumes, not snapshots (which are not
    /// served: a client that listed one could not open it).
    pub fn exports(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> =
            self.volumes.read().values().filter(|v| !v.is_deleted() && !v.read_only).map(|v| (v.name.clone(), v.size())).collect();
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
            .map(|v| VolumeSample {
                name: &v.name,
                size: v.size(),
                used: self.pool.used_bytes_of(v.id),
                connections: v.connections(),
                stats: &v.stats,
                replicas: v.target().map(|t| {
                    let local = t.local as u64;
                    let in_sync = t.peers.iter().filter(|p| p.state() == crate::replication::target::PeerState::InSync).count() as u64;
                    [t.peers.len() as u64 + local, in_sync + local, t.peers.iter().map(|p| p.dirty.bytes()).sum()]
                }),
            })
            .collect();
        render(
            &PoolSample {
                uuid: self.pool.uuid.to_string(),
                total: self.pool.total_bytes(),
                used: self.pool.used_bytes(),
                unsettled: self.pool.unsettled_extents() as u64,
                failed_drives: self.pool.devices().iter().filter(|d| d.failed()).count() as u64,
            },
            &samples,
        )
    }
}
