//! Snapshots, clones and restore. A snapshot is a read-only volume record (`snapshot_of`) whose
//! extents are shared with its volume in the pools of the volume's in-sync replicas; a clone is
//! a writable volume made the same way from a snapshot or a volume; a restore replaces a
//! detached volume's data with a snapshot's on every replica. Nothing is copied: later writes
//! copy the extents they change (`Pool::allocate`).

use super::replicas::ReplicaError;
use super::{validate_labels, validate_name, Service, VolumeError, VolumeInfo};
use crate::clock::now_unix;
use crate::meta::{MetaError, PendingOp, VolumeRecord};
use crate::replication::frame::Command;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The volume label holding a Portworx `snap_schedule` (set by `--snap-schedule` or the CSI
/// StorageClass parameter).
pub const SCHEDULE_LABEL: &str = crate::meta::SCHEDULED_LABELS[0];
/// The label of a snapshot taken by a schedule: the policy that took it.
pub const SCHEDULED_BY: &str = crate::meta::SCHEDULED_LABELS[2];

/// The volume label holding a schedule of cloud backups (`snap_schedule`'s syntax), and the one
/// naming their credential.
pub const CLOUD_SCHEDULE_LABEL: &str = crate::meta::SCHEDULED_LABELS[1];
pub const CLOUD_CRED_LABEL: &str = "cloudsnap_cred";

/// A malformed `snap_schedule` or `cloudsnap_schedule` label is refused with the parser's
/// reason; a cloud schedule needs its credential.
pub(super) fn validate_schedule(labels: &BTreeMap<String, String>) -> Result<(), VolumeError> {
    for key in [SCHEDULE_LABEL, CLOUD_SCHEDULE_LABEL] {
        if let Some(s) = labels.get(key).filter(|s| !s.is_empty()) {
            strata_api::schedule::parse(s).map_err(|e| VolumeError::InvalidArgument(format!("{key}: {e}")))?;
        }
    }
    if labels.get(CLOUD_SCHEDULE_LABEL).is_some_and(|s| !s.is_empty()) && labels.get(CLOUD_CRED_LABEL).is_none_or(|c| c.is_empty()) {
        return Err(VolumeError::InvalidArgument(format!("{CLOUD_SCHEDULE_LABEL} needs {CLOUD_CRED_LABEL} (the credential of the bucket)")));
    }
    Ok(())
}

/// What `on_replicas` runs on every replica of a volume.
#[derive(Debug, Clone, Copy)]
enum Sharing {
    /// Share the volume's extents with volume id `into` (a snapshot or clone).
    Share { into: u64 },
    /// Replace the volume's data with snapshot id `from`'s.
    Restore { from: u64 },
}

impl Service {
    /// Takes a crash-consistent snapshot `name` of volume `volume`: on every in-sync replica,
    /// at one point of the write stream when the volume is attached here.
    #[tracing::instrument(name = "snapshot", skip_all, fields(volume = %volume, snapshot = %name, node = %self.node.id))]
    pub async fn snapshot(&self, volume: &str, name: &str, labels: BTreeMap<String, String>) -> Result<VolumeInfo, VolumeError> {
        let src = self.record(volume).await?;
        if src.snapshot_of.is_some() {
            return Err(VolumeError::InvalidArgument(format!("{volume} is a snapshot; clone it first to snapshot the clone")));
        }
        let ownership = src.ownership.clone();
        self.copy_of(&src, name, labels, true, ownership).await
    }

    /// Creates the writable volume `name` sharing every extent of `source` (a snapshot, or a
    /// volume at this instant). The clone lives on the source's in-sync replica nodes and is
    /// left detached (attach it where it is used). Its ownership is `ownership`, or the
    /// source's when None.
    #[tracing::instrument(name = "clone", skip_all, fields(volume = %source, clone = %name, node = %self.node.id))]
    pub async fn clone_volume(
        &self,
        source: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        ownership: Option<crate::meta::Ownership>,
    ) -> Result<VolumeInfo, VolumeError> {
        let src = self.record(source).await?;
        let ownership = ownership.unwrap_or_else(|| src.ownership.clone());
        self.copy_of(&src, name, labels, false, ownership).await
    }

    /// Replaces volume `volume`'s data with snapshot `snapshot`'s on every replica. The volume
    /// must not be in use: detached, or (one replica on this node) without NBD clients.
    #[tracing::instrument(name = "restore", skip_all, fields(volume = %volume, snapshot = %snapshot, node = %self.node.id))]
    pub async fn restore(&self, volume: &str, snapshot: &str) -> Result<VolumeInfo, VolumeError> {
        let _g = self.lifecycle.lock().await;
        let me = self.node.id.clone();
        let rec = self.record(volume).await?;
        let snap = self.record(snapshot).await?;
        if snap.snapshot_of.as_deref() != Some(volume) {
            return Err(VolumeError::InvalidArgument(match &snap.snapshot_of {
                Some(of) => format!("{snapshot} is a snapshot of volume {of}, not of {volume}"),
                None => format!("{snapshot} is not a snapshot (volume restore needs one of {volume}'s snapshots)"),
            }));
        }
        match &rec.pending {
            None => {}
            Some(PendingOp::Restore { .. }) => {}
            Some(op) => return Err(VolumeError::FailedPrecondition(op.describe(volume))),
        }
        if let Some(op) = &snap.pending {
            return Err(VolumeError::FailedPrecondition(op.describe(snapshot)));
        }
        let local_only = rec.replicas == [me.clone()];
        let in_use = self.volume(volume).map(|v| v.connections()).unwrap_or(0);
        if !(rec.target.is_empty() || (local_only && rec.target == me)) {
            return Err(VolumeError::FailedPrecondition(format!(
                "volume {volume} is attached on node {}; detach it first (stratactl host detach {volume})",
                rec.target
            )));
        }
        if in_use > 0 {
            return Err(VolumeError::FailedPrecondition(format!("volume {volume} has {in_use} connected NBD client(s); disconnect them first")));
        }
        let missing: Vec<&String> = rec.replicas.iter().filter(|n| !snap.is_in_sync(n)).collect();
        if !missing.is_empty() {
            return Err(VolumeError::FailedPrecondition(format!(
                "snapshot {snapshot} is not held by node(s) {} that hold replicas of {volume} (replicas added after the snapshot); lower repl with `stratactl volume ha-update` or clone the snapshot instead",
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
            )));
        }
        let mut next = rec.clone();
        next.pending = Some(PendingOp::Restore { snapshot: snapshot.to_string() });
        let next = self.meta.update_volume(&next).await?.normalized(&me);
        let results = self.on_replicas(&next, &next.replicas, Sharing::Restore { from: snap.id }).await;
        let failed: Vec<String> = results.iter().filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}"))).collect();
        if !failed.is_empty() {
            return Err(VolumeError::FailedPrecondition(format!(
                "restoring {volume} from {snapshot} failed on {}; the volume stays unusable until `stratactl volume restore {volume} --snapshot {snapshot}` succeeds",
                failed.join("; ")
            )));
        }
        // Every replica now holds exactly the snapshot's data.
        let mut done = self.record(volume).await?;
        done.pending = None;
        done.in_sync = done.replicas.clone();
        // Every replica now holds the snapshot's data, whatever it held before.
        done.rebuild.clear();
        done.clean = true;
        let done = self.meta.update_volume(&done).await?;
        tracing::info!(volume, snapshot, "volume restored from snapshot");
        self.info_of(done)
    }

    async fn record(&self, name: &str) -> Result<VolumeRecord, VolumeError> {
        Ok(self.meta.get_volume(name).await?.ok_or_else(|| VolumeError::NotFound(name.to_string()))?.normalized(&self.node.id))
    }

    /// A new record sharing `src`'s extents: a snapshot (read-only) or a clone.
    async fn copy_of(
        &self,
        src: &VolumeRecord,
        name: &str,
        labels: BTreeMap<String, String>,
        snapshot: bool,
        ownership: crate::meta::Ownership,
    ) -> Result<VolumeInfo, VolumeError> {
        validate_name(name)?;
        validate_labels(&labels)?;
        let _g = self.lifecycle.lock().await;
        let src = self.record(&src.name).await?;
        if let Some(op) = &src.pending {
            return Err(VolumeError::FailedPrecondition(op.describe(&src.name)));
        }
        if src.in_sync.is_empty() {
            return Err(VolumeError::FailedPrecondition(format!("volume {} has no in-sync replica", src.name)));
        }
        let rec = VolumeRecord {
            id: 0,
            name: name.to_string(),
            size: src.size,
            repl: src.in_sync.len() as u32,
            labels,
            created_unix: now_unix(),
            revision: 0,
            pending: Some(PendingOp::Create),
            qos: if snapshot { Default::default() } else { src.qos },
            node: src.in_sync[0].clone(),
            replicas: src.in_sync.clone(),
            in_sync: src.in_sync.clone(),
            target: String::new(),
            epoch: 0,
            clean: true,
            dropped: Vec::new(),
            rebuild: Vec::new(),
            secure: src.secure.clone(),
            snapshot_of: snapshot.then(|| src.name.clone()),
            ownership,
        };
        let rec = self.meta.create_volume(rec).await?;
        let holders = match self.share_into(&src, rec.id).await {
            Ok(h) if !h.is_empty() => h,
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "no replica could share its extents (see the engines' logs)".into(),
                };
                self.undo_copy(&rec).await;
                return Err(VolumeError::FailedPrecondition(format!(
                    "{} {name} of {} failed: {why}",
                    if snapshot { "snapshot" } else { "clone" },
                    src.name
                )));
            }
        };
        let mut done = rec.clone();
        for _ in 0..20 {
            done.pending = None;
            done.replicas = holders.clone();
            done.in_sync = holders.clone();
            done.repl = holders.len() as u32;
            done.node = holders[0].clone();
            match self.meta.update_volume(&done).await {
                Ok(r) => {
                    tracing::info!(source = %src.name, %name, snapshot, holders = ?holders, "extents shared");
                    // A node that failed part-way frees what it may have shared.
                    for n in rec.replicas.iter().filter(|n| !holders.contains(n)) {
                        if let Err(e) = self.free_on(n, rec.id).await {
                            tracing::warn!(volume = %name, node = %n, "freeing a failed share: {e}");
                        }
                    }
                    return self.info_of(r);
                }
                Err(MetaError::Conflict(_)) => done = self.record(name).await?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(VolumeError::Aborted(format!("volume {name} was changed concurrently; retry")))
    }

    /// Shares `src`'s extents into volume id `dst` on each in-sync replica; returns the nodes
    /// that did. An attached volume goes through its target (a write barrier); a snapshot or a
    /// detached volume has no writer and is shared on each node directly.
    async fn share_into(&self, src: &VolumeRecord, dst: u64) -> Result<Vec<String>, VolumeError> {
        let me = &self.node.id;
        if src.snapshot_of.is_none() && !src.target.is_empty() {
            if &src.target != me {
                return Err(VolumeError::FailedPrecondition(format!(
                    "volume {} is served by node {}; snapshot or clone it through that node's engine (this is {me})",
                    src.name, src.target
                )));
            }
            let handle = self.volume(&src.name).ok_or_else(|| VolumeError::NotFound(src.name.clone()))?;
            if let Some(t) = handle.target() {
                return t.share_at_barrier(&self.local, dst).await.map_err(|e| VolumeError::FailedPrecondition(e.to_string()));
            }
            if src.replicas != [me.clone()] {
                return Err(VolumeError::FailedPrecondition(format!("volume {} is not being served yet; retry in a moment", src.name)));
            }
        }
        let results = self.on_replicas(src, &src.in_sync, Sharing::Share { into: dst }).await;
        for (n, r) in &results {
            if let Err(e) = r {
                tracing::warn!(volume = %src.name, node = %n, "sharing extents failed: {e}");
            }
        }
        Ok(results.into_iter().filter(|(_, r)| r.is_ok()).map(|(n, _)| n).collect())
    }

    /// Runs `cmd` (SHARE or RESTORE) for `rec` on each of `nodes`: here directly, on other nodes
    /// over the replication protocol at the record's epoch.
    async fn on_replicas(&self, rec: &VolumeRecord, nodes: &[String], op: Sharing) -> Vec<(String, Result<(), ReplicaError>)> {
        let mut out = Vec::new();
        for n in nodes {
            let r = if *n == self.node.id {
                match (self.replica_volume(rec.id).await, op) {
                    (Some(v), Sharing::Share { into }) => self.local.share_local(&v, into).await.map_err(ReplicaError::from),
                    (Some(v), Sharing::Restore { from }) => self.local.restore_local(&v, from).await.map_err(ReplicaError::from),
                    (None, _) => Err(ReplicaError::NotHere(rec.name.clone())),
                }
            } else {
                let cmd = match op {
                    Sharing::Share { into } => Command::Share { into },
                    Sharing::Restore { from } => Command::Restore { from },
                };
                self.call_replica(n, rec.id, rec.epoch, cmd).await
            };
            out.push((n.clone(), r));
        }
        out
    }

    /// A snapshot or clone that failed: whatever was shared goes, then the record.
    async fn undo_copy(&self, rec: &VolumeRecord) {
        for n in &rec.replicas {
            if let Err(e) = self.free_on(n, rec.id).await {
                tracing::warn!(volume = %rec.name, node = %n, "undoing a failed snapshot or clone: {e} (freed when that node restarts)");
                return;
            }
        }
        if let Err(e) = self.meta.remove_volume(&rec.name).await {
            tracing::warn!(volume = %rec.name, "undoing a failed snapshot or clone: {e}");
        }
    }

    /// Runs the volumes' snapshot schedules every `every`, for the engine's life. Each volume's
    /// schedule runs on its target (or, detached, on its first in-sync replica's node).
    pub fn run_schedules(self: &Arc<Self>, every: std::time::Duration) {
        let e = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                e.schedules_once(now_unix()).await;
            }
        });
    }

    /// The policies of `rec`'s schedule in label `label`, when this node runs it: the volume's
    /// target, or for a detached volume its first in-sync replica's node. None for a snapshot,
    /// a record with a change pending, another node's volume, or no such label; a malformed
    /// schedule is logged and skipped. `rec` is normalized.
    pub(crate) fn schedule_here(&self, rec: &VolumeRecord, label: &str) -> Option<Vec<strata_api::schedule::Policy>> {
        let sched = rec.labels.get(label)?;
        let me = &self.node.id;
        let mine = &rec.target == me || (rec.target.is_empty() && rec.in_sync.first() == Some(me));
        if rec.snapshot_of.is_some() || rec.pending.is_some() || !mine {
            return None;
        }
        strata_api::schedule::parse(sched).map_err(|e| tracing::warn!(volume = %rec.name, "{label} ignored: {e}")).ok()
    }

    /// One pass of the schedules at `now`: takes the snapshots due and deletes the ones beyond
    /// each policy's KEEP.
    pub async fn schedules_once(&self, now: u64) {
        let me = self.node.id.clone();
        let Ok(all) = self.meta.scheduled_volumes().await else { return };
        let all: Vec<VolumeRecord> = all.into_iter().map(|r| r.normalized(&me)).collect();
        for rec in &all {
            let Some(policies) = self.schedule_here(rec, SCHEDULE_LABEL) else { continue };
            let taken: Vec<(String, String, u64)> = all
                .iter()
                .filter(|s| s.snapshot_of.as_deref() == Some(rec.name.as_str()))
                .filter_map(|s| s.labels.get(SCHEDULED_BY).map(|t| (s.name.clone(), t.clone(), s.created_unix)))
                .collect();
            let plan = strata_api::schedule::plan(&rec.name, &policies, rec.created_unix, &taken, now);
            for (name, tag) in plan.take {
                let labels = BTreeMap::from([(SCHEDULED_BY.to_string(), tag.clone())]);
                match self.snapshot(&rec.name, &name, labels).await {
                    Ok(_) => tracing::info!(volume = %rec.name, snapshot = %name, policy = %tag, "scheduled snapshot taken"),
                    Err(e) => tracing::warn!(volume = %rec.name, snapshot = %name, policy = %tag, "scheduled snapshot failed: {e}"),
                }
            }
            for name in plan.delete {
                match self.delete(&name, false).await {
                    Ok(()) => tracing::info!(volume = %rec.name, snapshot = %name, "scheduled snapshot past its retention deleted"),
                    Err(e) => tracing::warn!(volume = %rec.name, snapshot = %name, "deleting a scheduled snapshot past its retention failed: {e}"),
                }
            }
        }
    }

    /// Snapshots, of one volume or of all, oldest first.
    pub async fn snapshots(&self, volume: Option<&str>) -> Result<Vec<VolumeInfo>, VolumeError> {
        let mut out: Vec<VolumeInfo> = self
            .meta
            .list_volumes()
            .await?
            .into_iter()
            .filter(|r| r.snapshot_of.is_some() && volume.is_none_or(|v| r.snapshot_of.as_deref() == Some(v)))
            .map(|r| self.info_of(r))
            .collect::<Result<_, _>>()?;
        out.sort_by_key(|v| (v.record.created_unix, v.record.id));
        Ok(out)
    }
}
