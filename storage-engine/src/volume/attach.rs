//! Where a volume is served: attach (become its target, with a new epoch), detach, restart
//! of targets after an engine restart, and NBD clients' claims.

use super::{Service, Volume, VolumeError, VolumeInfo, VolumeIo};
use crate::meta::VolumeRecord;
use crate::replication::target::Target;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::Instrument;

impl Service {
    /// Starts serving a replicated volume here: announces the epoch to its replicas and starts
    /// resync for the ones out of sync.
    /// `verify`: the previous target may have died with writes in flight; compare the replicas.
    ///
    /// Atomic: whatever served the volume here before stops first, and the volume is served
    /// again only once the new target runs at the record's epoch; a failed start leaves it
    /// unserved (there is no local-only write path).
    pub(super) async fn start_target(&self, handle: Arc<Volume>, rec: &VolumeRecord, verify: bool) -> Result<(), VolumeError> {
        handle.stop_serving();
        let nodes = self.meta.list_nodes().await?;
        let addrs: HashMap<String, String> = nodes.into_iter().map(|(n, _)| (n.id, n.repl_address)).collect();
        let me = self.node.id.clone();
        let t = Target::start(handle.replica.clone(), rec, &me, &addrs, self.links.clone(), &self.repl, verify).await?;
        *handle.target.write() = Some(t.clone());
        handle.served.store(true, Ordering::Release);
        let host = Arc::new(crate::replication::Host { local: self.local.clone(), replacements: self.replacements.lock().clone() });
        let span = tracing::info_span!("target", volume = %rec.name, node = %me, epoch = rec.epoch);
        if verify {
            tokio::spawn(crate::replication::reconcile::run(host.clone(), t.clone()).instrument(span.clone()));
        }
        tokio::spawn(crate::replication::resync::run(host, t).instrument(span));
        Ok(())
    }

    /// Starts serving the replicated volumes whose target is this node (after a restart).
    pub async fn start_targets(&self) {
        let me = self.node.id.clone();
        let Ok(all) = self.meta.list_volumes().await else { return };
        for rec in all.into_iter().map(|r| r.normalized(&me)) {
            if rec.target != me || rec.pending.is_some() || rec.snapshot_of.is_some() {
                continue;
            }
            let Some(h) = self.volume(&rec.name) else { continue };
            // A new epoch: requests the previous run left in flight are refused by every replica.
            let mut next = rec.clone();
            next.epoch += 1;
            next.clean = false;
            let rec = match self.meta.update_volume(&next).await {
                Ok(r) => r.normalized(&me),
                Err(e) => {
                    tracing::error!(volume = %rec.name, "cannot serve the volume: recording the new epoch: {e}");
                    continue;
                }
            };
            h.epoch.fetch_max(rec.epoch, Ordering::AcqRel);
            if let Err(e) = self.start_target(h, &rec, true).await {
                tracing::error!(volume = %rec.name, "cannot serve the volume: {e}");
            }
        }
    }

    /// Makes this node the volume's target: records it with a new epoch (fencing the previous
    /// target, whose writes every replica refuses from then on) and starts serving. Moving a
    /// volume away from an online target that did not detach needs `force`.
    #[tracing::instrument(name = "attach", skip_all, fields(volume = %name, node = %self.node.id, force))]
    pub async fn attach(&self, name: &str, force: bool, passphrase: Option<&[u8]>) -> Result<VolumeInfo, VolumeError> {
        let _g = self.lifecycle.lock().await;
        let me = self.node.id.clone();
        let rec = self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?.normalized(&me);
        if let Some(op) = &rec.pending {
            return Err(VolumeError::FailedPrecondition(op.describe(name)));
        }
        self.refuse_in_maintenance(name)?;
        if let Some(of) = &rec.snapshot_of {
            return Err(VolumeError::FailedPrecondition(format!(
                "{name} is a snapshot of {of} and is not served; clone it (stratactl volume clone {name} --name NEW) and attach the clone"
            )));
        }
        let key = match (&rec.secure, passphrase) {
            (Some(params), Some(p)) => {
                let (p, params) = (p.to_vec(), params.clone());
                let k = tokio::task::spawn_blocking(move || crate::crypt::VolumeKey::open(&p, &params))
                    .await
                    .map_err(|e| VolumeError::Meta(e.to_string()))?;
                Some(k.map_err(|e| VolumeError::InvalidArgument(format!("volume {name}: {e}")))?)
            }
            (Some(_), None) if !self.volume(name).is_some_and(|v| v.has_key()) => {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume {name} is encrypted: attach it with its passphrase (--passphrase-file)"
                )));
            }
            _ => None,
        };
        if rec.target == me && self.volume(name).is_some_and(|v| v.is_served()) {
            if let (Some(k), Some(v)) = (key, self.volume(name)) {
                v.set_key(k);
            }
            return self.info_of(rec);
        }
        if !rec.target.is_empty() && rec.target != me && !force {
            let nodes = self.meta.list_nodes().await?;
            if nodes.iter().any(|(n, s)| n.id == rec.target && *s != crate::meta::NodeState::Offline) {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume {name} is attached on node {}, which is up; detach it there first, or pass --force to take it over",
                    rec.target
                )));
            }
        }
        if rec.in_sync.is_empty() {
            return Err(VolumeError::FailedPrecondition(format!("volume {name} has no in-sync replica")));
        }
        let mut next = rec.clone();
        next.target = me.clone();
        next.epoch += 1;
        next.clean = false;
        let next = self.meta.update_volume(&next).await?.normalized(&me);
        let handle = {
            let mut vols = self.volumes.write();
            let h = vols.entry(name.to_string()).or_insert_with(|| Arc::new(Self::handle(&next))).clone();
            h.epoch.fetch_max(next.epoch, Ordering::AcqRel);
            h.size.fetch_max(next.size, Ordering::AcqRel);
            h.deleted.store(false, Ordering::Release);
            h
        };
        if let Some(k) = key {
            handle.set_key(k);
        }
        self.start_target(handle, &next, !rec.clean).await?;
        tracing::info!(volume = %name, epoch = next.epoch, previous = %rec.target, "volume attached here");
        let fresh = self.meta.get_volume(name).await?.unwrap_or(next);
        self.info_of(fresh)
    }

    /// Stops serving a volume here and records it as detached. Refused while clients are
    /// connected unless `force`.
    #[tracing::instrument(name = "detach", skip_all, fields(volume = %name, node = %self.node.id, force))]
    pub async fn detach(&self, name: &str, force: bool) -> Result<VolumeInfo, VolumeError> {
        let _g = self.lifecycle.lock().await;
        let me = self.node.id.clone();
        let mut rec = self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?.normalized(&me);
        if rec.target.is_empty() {
            return self.info_of(rec);
        }
        self.must_be_target(&rec)?;
        let mut busy = false;
        if let Some(v) = self.volume(name) {
            let n = v.connections();
            busy = n > 0;
            if n > 0 && !force {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume {name} has {n} connected NBD client(s); disconnect them or detach with --force"
                )));
            }
            v.stop_serving();
            if !rec.has_replica(&me) {
                self.volumes.write().remove(name);
            }
        }
        rec.target.clear();
        // With clients cut off (force) a write may have been in flight: the next target compares.
        rec.clean = !busy;
        let rec = self.meta.update_volume(&rec).await?;
        tracing::info!(volume = %name, "volume detached");
        self.info_of(rec)
    }

    /// A clean stop (SIGTERM, SIGINT): stops serving every volume here (the records keep this
    /// node as target, so the next start serves them again at a new epoch), syncs the devices
    /// and settles every extent's checksums, so nothing is left to recompute from possibly
    /// damaged data at the next start.
    pub async fn shutdown(&self) -> std::io::Result<()> {
        tracing::info!("shutting down: no more I/O, syncing devices, settling checksums");
        // Requests already running finish (bounded wait for each volume's switch lock, which every
        // request holds); later ones find the volume stopping, and their NBD connections are
        // closed without an answer, so clients (the kernel, the node plugin's helpers) reconnect
        // to the restarted engine and send them again instead of failing them.
        for v in self.loaded_volumes() {
            v.mark_stopping();
        }
        for v in self.loaded_volumes() {
            let _running = tokio::time::timeout(std::time::Duration::from_secs(5), v.switch.write()).await;
            v.stop_serving();
        }
        // Requests already admitted finish: wait (bounded) for the volumes' I/O to drain.
        for v in self.loaded_volumes() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), v.io_lock.write()).await;
        }
        self.pool.sync_all().await?;
        let pool = self.pool.clone();
        let left = tokio::task::spawn_blocking(move || pool.settle_all_checksums()).await.map_err(std::io::Error::other)??;
        if left > 0 {
            tracing::warn!(extents = left, "stopped with extents whose checksums are recomputed at the next start");
        } else {
            tracing::info!("checksums settled; stopped cleanly");
        }
        Ok(())
    }

    /// Claims a volume for an NBD client (only where its target runs).
    pub fn connect(&self, name: &str) -> Option<VolumeIo> {
        let v = self.volumes.read().get(name).cloned()?;
        // A target whose own replica has seen a newer epoch was taken over (it learns that on
        // its next request; a new client is refused now, not after its first I/O).
        let running = v.target().is_some_and(|t| !t.is_closed() && t.admit_local().is_ok());
        if v.is_deleted() || !v.is_served() || !running || (v.secure && !v.has_key()) {
            return None;
        }
        Some(self.claim(v))
    }

    /// Claims a volume for an NBD client opening it here: a detached volume is attached here
    /// first (as `host attach` would); a volume served by another node is not taken from it.
    /// The error says why the export cannot be opened.
    pub async fn open(&self, name: &str) -> Result<VolumeIo, VolumeError> {
        if let Some(c) = self.connect(name) {
            return Ok(c);
        }
        self.describe(name).await?;
        self.attach(name, false, None).await?;
        self.connect(name).ok_or_else(|| VolumeError::Aborted(format!("volume {name} is attached here but not served (its target stopped); retry")))
    }

    /// The size of a volume an NBD client could open here (served here, or detached), or why
    /// it cannot.
    pub async fn describe(&self, name: &str) -> Result<u64, VolumeError> {
        if let Some(v) = self.volume(name).filter(|v| v.is_served()) {
            return Ok(v.size());
        }
        let rec = self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?.normalized(&self.node.id);
        if rec.snapshot_of.is_some() {
            return Err(VolumeError::FailedPrecondition(format!("{name} is a snapshot and is not served; clone it and open the clone")));
        }
        if !rec.target.is_empty() && rec.target != self.node.id {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {name} is attached on node {}; open it there, or attach it here first (stratactl host attach {name})",
                rec.target
            )));
        }
        Ok(rec.size)
    }
}

/// What a frontend needs of the engine: the exports it may list, open and describe. Opening
/// one gives the narrow `VolumeIo` handle, which is all the frontend then serves.
#[async_trait::async_trait]
pub trait Exports: Send + Sync {
    /// This node's id (for logs and spans).
    fn node_id(&self) -> &str;
    /// Names and sizes of the exports, for NBD_OPT_LIST.
    fn exports(&self) -> Vec<(String, u64)>;
    /// A client's claim on an export, attaching it here if it is detached; or why not.
    async fn open(&self, name: &str) -> Result<VolumeIo, VolumeError>;
    /// The size of an export a client could open here, or why it cannot.
    async fn describe(&self, name: &str) -> Result<u64, VolumeError>;
}

#[async_trait::async_trait]
impl Exports for Service {
    fn node_id(&self) -> &str {
        &self.node.id
    }
    fn exports(&self) -> Vec<(String, u64)> {
        Service::exports(self)
    }
    async fn open(&self, name: &str) -> Result<VolumeIo, VolumeError> {
        Service::open(self, name).await
    }
    async fn describe(&self, name: &str) -> Result<u64, VolumeError> {
        Service::describe(self, name).await
    }
}
