//! Cloud snapshots: backups of volumes to an S3 bucket and restores from it, on this cluster or
//! another one with the same credential.
//!
//! A backup starts from a crash-consistent local snapshot (`<volume>.cloud.<id>`), kept as the
//! base of the next one. It is incremental: an extent the snapshot shares with the previous
//! backup's base snapshot (the same physical extent in the pool: nothing wrote to it since) is
//! not read again, and its chunk is named in the new manifest as it was in the old; changed
//! extents are read, named by their SHA-256 and uploaded unless the bucket has that chunk.
//! Every manifest lists every extent, so each backup restores alone and deleting one (its
//! chunks that no other manifest names go with it) leaves the others whole. A backup runs in
//! the background on the node that asked (it must hold an in-sync replica); its job is kept in
//! the metadata store and an engine that restarts resumes its unfinished ones (chunks already
//! uploaded are not sent again).

pub mod credentials;
pub mod repo;

use crate::clock::now_unix;
use crate::volume::{CreateSpec, PlacementSpec, Service, VolumeError, VolumeInfo};
use credentials::Credential;
use futures::StreamExt;
use repo::{Repo, RepoError};
use std::sync::Arc;

const JOBS: &str = "cloudsnap/jobs/";
/// Extents a restore downloads and writes at once.
const RESTORE_IN_FLIGHT: usize = 8;
/// Chunks a backup uploads at once.
const UPLOADS_IN_FLIGHT: usize = 8;
/// The label a volume being restored carries until every extent is written.
pub const RESTORING: &str = "strata.dev/restoring";

/// One backup, as its manifest in the bucket says.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub id: String,
    pub volume: String,
    /// The cluster the backup was taken on.
    pub cluster_id: String,
    pub size: u64,
    pub extent_size: u64,
    pub created_unix: u64,
    /// The backup this one was taken incrementally from.
    pub parent: Option<String>,
    /// The local snapshot it was taken from.
    pub snapshot: String,
    pub encrypted: bool,
    /// (logical extent, chunk); an extent not listed reads as zeroes.
    pub extents: Vec<(u64, String)>,
    /// Extents read for this backup (changed since the parent) and bytes uploaded for them.
    pub changed_extents: u64,
    pub uploaded_bytes: u64,
}

/// A backup being taken (or taken), as the metadata store keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Job {
    pub id: String,
    /// The caller's name for the backup (a CSI VolumeSnapshot's), unique; may be empty.
    #[serde(default)]
    pub name: String,
    /// The volume's `cloudsnap_schedule` policy that took it (its tag); empty: asked for.
    #[serde(default)]
    pub schedule: String,
    pub volume: String,
    pub credential: String,
    pub full: bool,
    /// The node running it.
    pub node: String,
    pub snapshot: String,
    /// "running", "done" or "failed".
    pub state: String,
    pub error: String,
    pub done_extents: u64,
    pub total_extents: u64,
    pub uploaded_bytes: u64,
    pub started_unix: u64,
}

/// Downloads, checks and writes one extent of backup `m` through `io`.
async fn restore_extent(io: &crate::volume::VolumeIo, repo: &Repo, m: &Manifest, lext: u64, hash: &str) -> Result<(), VolumeError> {
    let off = lext * m.extent_size;
    let len = m.extent_size.min(m.size.saturating_sub(off)) as usize;
    let plain = repo.get_chunk(hash, len).await.map_err(|e| match e {
        RepoError::Corrupt(why) => VolumeError::Corrupt(format!("backup {}: {why}; nothing was restored", m.id)),
        other => other.into(),
    })?;
    if plain.len() != len {
        return Err(VolumeError::Corrupt(format!("backup {}: chunk {hash} holds {} bytes, extent {lext} needs {len}", m.id, plain.len())));
    }
    let mut buf = io.buffer(len);
    buf.copy_from_slice(&plain);
    io.write(off, buf, false).await.map_err(|e| VolumeError::Meta(format!("writing extent {lext}: {e}")))
}

impl From<RepoError> for VolumeError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Store(s) => VolumeError::FailedPrecondition(s),
            RepoError::Corrupt(s) => VolumeError::Corrupt(s),
            RepoError::Key(s) => VolumeError::InvalidArgument(s),
        }
    }
}

fn job_key(id: &str) -> String {
    format!("{JOBS}{id}")
}

/// The name of a restore that was given none: `<volume>-restored-<the id's random part>`,
/// within the 128 characters a volume name may have (an odd id from another cluster's bucket
/// makes a name that creation refuses with its reason).
fn restored_name(volume: &str, id: &str) -> String {
    let tail = id.rsplit('-').next().unwrap_or(id);
    let keep = 128usize.saturating_sub("-restored-".len() + tail.len());
    let vol: String = volume.chars().take(keep).collect();
    format!("{vol}-restored-{tail}")
}

impl Service {
    fn sealing_key(&self) -> Result<[u8; 32], VolumeError> {
        self.cloud_key.ok_or_else(|| {
            VolumeError::FailedPrecondition(
                "credentials are stored encrypted under the cluster's secret: start the engines with --credentials-key-file (the same file on every node)"
                    .into(),
            )
        })
    }

    /// Stores a credential after checking it opens its bucket (and the passphrase its backups).
    pub async fn credential_create(&self, c: Credential) -> Result<(), VolumeError> {
        if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            return Err(VolumeError::InvalidArgument(format!("credential name {:?}: use letters, digits, '-', '_' and '.'", c.name)));
        }
        if !(c.endpoint.starts_with("http://") || c.endpoint.starts_with("https://")) || c.bucket.is_empty() {
            return Err(VolumeError::InvalidArgument("a credential needs --endpoint http(s)://host:port and --bucket".into()));
        }
        let key = self.sealing_key()?;
        if self.meta.get_kv(&credentials::key_of(&c.name)).await?.is_some() {
            return Err(VolumeError::Exists(format!("credential {}", c.name)));
        }
        Repo::open(&c).await?;
        let sealed = credentials::seal(&key, &c).map_err(VolumeError::Meta)?;
        self.meta.put_kv(&credentials::key_of(&c.name), &sealed).await?;
        tracing::info!(credential = %c.name, endpoint = %c.endpoint, bucket = %c.bucket, "credential stored");
        Ok(())
    }

    pub async fn credential(&self, name: &str) -> Result<Credential, VolumeError> {
        let key = self.sealing_key()?;
        let b = self
            .meta
            .get_kv(&credentials::key_of(name))
            .await?
            .ok_or_else(|| VolumeError::Absent(format!("credential {name} (stratactl credentials list shows them)")))?;
        credentials::unseal(&key, &b).map_err(VolumeError::FailedPrecondition)
    }

    pub async fn credential_list(&self) -> Result<Vec<Credential>, VolumeError> {
        let key = self.sealing_key()?;
        let mut out = Vec::new();
        for (_, b) in self.meta.list_kv(credentials::prefix()).await? {
            out.push(credentials::unseal(&key, &b).map_err(VolumeError::FailedPrecondition)?);
        }
        Ok(out)
    }

    pub async fn credential_delete(&self, name: &str) -> Result<(), VolumeError> {
        if !self.meta.delete_kv(&credentials::key_of(name)).await? {
            return Err(VolumeError::Absent(format!("credential {name}")));
        }
        Ok(())
    }

    /// Starts a backup of `volume` to `credential`'s bucket (`full`: not incremental); returns
    /// its job. The snapshot it reads is taken now. A backup asked for by `name` again is the
    /// same backup (one that failed is taken again).
    pub async fn cloud_backup(self: &Arc<Self>, volume: &str, credential: &str, full: bool, name: &str) -> Result<Job, VolumeError> {
        self.start_backup(volume, credential, full, name, "").await
    }

    async fn start_backup(self: &Arc<Self>, volume: &str, credential: &str, full: bool, name: &str, schedule: &str) -> Result<Job, VolumeError> {
        if !name.is_empty() {
            if let Some(j) = self.jobs().await?.into_iter().find(|j| j.name == name) {
                if j.volume != volume {
                    return Err(VolumeError::Exists(format!("backup {name:?} (of volume {})", j.volume)));
                }
                if j.state != "failed" {
                    return Ok(j);
                }
                self.meta.delete_kv(&job_key(&j.id)).await?;
            }
        }
        let rec = self.meta.get_volume(volume).await?.ok_or_else(|| VolumeError::NotFound(volume.to_string()))?.normalized(&self.node.id);
        if rec.snapshot_of.is_some() {
            return Err(VolumeError::InvalidArgument(format!("{volume} is a snapshot: back up its volume, or clone it and back up the clone")));
        }
        if !rec.is_in_sync(&self.node.id) {
            return Err(VolumeError::FailedPrecondition(format!(
                "a backup of {volume} reads a local replica: send it to a node holding an in-sync one ({})",
                rec.in_sync.join(", ")
            )));
        }
        let cred = self.credential(credential).await?;
        Repo::open(&cred).await?;
        let id = format!("{}-{}", now_unix(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let snapshot = format!("{volume}.cloud.{id}");
        let labels = [("strata.dev/cloudsnap".to_string(), id.clone())].into();
        self.snapshot(volume, &snapshot, labels).await?;
        let job = Job {
            id: id.clone(),
            name: name.to_string(),
            schedule: schedule.to_string(),
            volume: volume.to_string(),
            credential: credential.to_string(),
            full,
            node: self.node.id.clone(),
            snapshot,
            state: "running".into(),
            error: String::new(),
            done_extents: 0,
            total_extents: rec.size.div_ceil(self.pool.extent_size),
            uploaded_bytes: 0,
            started_unix: now_unix(),
        };
        self.save_job(&job).await?;
        let e = self.clone();
        tokio::spawn(async move { e.finish_backup(job).await });
        Ok(self.job(&id).await?.expect("just saved"))
    }

    async fn save_job(&self, job: &Job) -> Result<(), VolumeError> {
        Ok(self.meta.put_kv(&job_key(&job.id), &serde_json::to_vec(job).expect("plain data")).await?)
    }

    pub async fn job(&self, id: &str) -> Result<Option<Job>, VolumeError> {
        Ok(self.meta.get_kv(&job_key(id)).await?.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Every backup job the cluster knows, oldest first.
    pub async fn jobs(&self) -> Result<Vec<Job>, VolumeError> {
        let mut v: Vec<Job> = self.meta.list_kv(JOBS).await?.into_iter().filter_map(|(_, b)| serde_json::from_slice(&b).ok()).collect();
        v.sort_by(|a, b| (a.started_unix, &a.id).cmp(&(b.started_unix, &b.id)));
        Ok(v)
    }

    /// Runs the volumes' `cloudsnap_schedule`s every `every`, for the engine's life.
    pub fn run_cloud_schedules(self: &Arc<Self>, every: std::time::Duration) {
        let e = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                e.cloud_schedules_once(now_unix()).await;
            }
        });
    }

    /// One pass of the cloud schedules at `now`, on the node that runs each volume's snapshot
    /// schedule (its target; detached, its first in-sync replica's node): starts the backups
    /// due (named `VOL.cloud.KIND.STAMP`) and deletes the scheduled backups beyond each policy's
    /// KEEP (a failed one does not count).
    pub async fn cloud_schedules_once(self: &Arc<Self>, now: u64) {
        use crate::volume::{CLOUD_CRED_LABEL, CLOUD_SCHEDULE_LABEL};
        let me = self.node.id.clone();
        let (Ok(all), Ok(jobs)) = (self.meta.scheduled_volumes().await, self.jobs().await) else { return };
        for rec in all.into_iter().map(|r| r.normalized(&me)) {
            let Some(cred) = rec.labels.get(CLOUD_CRED_LABEL) else { continue };
            if rec.labels.get(CLOUD_SCHEDULE_LABEL).is_some_and(|s| s.is_empty()) {
                continue;
            }
            let Some(policies) = self.schedule_here(&rec, CLOUD_SCHEDULE_LABEL) else { continue };
            let ours: Vec<&Job> = jobs.iter().filter(|j| j.volume == rec.name && !j.schedule.is_empty() && j.state != "failed").collect();
            let taken: Vec<(String, String, u64)> = ours.iter().map(|j| (j.name.clone(), j.schedule.clone(), j.started_unix)).collect();
            let plan = strata_api::schedule::plan(&format!("{}.cloud", rec.name), &policies, rec.created_unix, &taken, now);
            for (name, tag) in plan.take {
                match self.start_backup(&rec.name, cred, false, &name, &tag).await {
                    Ok(j) => tracing::info!(volume = %rec.name, backup = %j.id, policy = %tag, "scheduled cloud backup started"),
                    Err(e) => tracing::warn!(volume = %rec.name, policy = %tag, "scheduled cloud backup not started: {e}"),
                }
            }
            for name in plan.delete {
                let Some(j) = ours.iter().find(|j| j.name == name) else { continue };
                match self.cloud_delete(&j.credential, &j.id).await {
                    Ok(_) => tracing::info!(volume = %rec.name, backup = %j.id, "scheduled cloud backup past its retention deleted"),
                    Err(e) => tracing::warn!(volume = %rec.name, backup = %j.id, "deleting a scheduled cloud backup past its retention: {e}"),
                }
            }
        }
    }

    /// Resumes this node's unfinished backups (after a restart).
    pub async fn resume_backups(self: &Arc<Self>) {
        let Ok(jobs) = self.jobs().await else { return };
        for job in jobs.into_iter().filter(|j| j.state == "running" && j.node == self.node.id) {
            tracing::info!(backup = %job.id, volume = %job.volume, "resuming an interrupted backup");
            let e = self.clone();
            tokio::spawn(async move { e.finish_backup(job).await });
        }
    }

    async fn finish_backup(self: Arc<Self>, mut job: Job) {
        let result = self.run_backup(&mut job).await;
        match result {
            Ok(m) => {
                job.state = "done".into();
                tracing::info!(backup = %job.id, volume = %job.volume, changed = m.changed_extents, uploaded = m.uploaded_bytes, "backup done");
            }
            Err(err) => {
                job.state = "failed".into();
                job.error = err.to_string();
                tracing::warn!(backup = %job.id, volume = %job.volume, "backup failed: {err}");
                // Its snapshot is nobody's base: it would only hold space.
                if let Err(e) = self.delete(&job.snapshot, false).await {
                    tracing::warn!(snapshot = %job.snapshot, "removing a failed backup's snapshot: {e}");
                }
            }
        }
        if let Err(err) = self.save_job(&job).await {
            tracing::warn!(backup = %job.id, "recording the backup's end: {err}");
        }
    }

    async fn run_backup(&self, job: &mut Job) -> Result<Manifest, VolumeError> {
        let cred = self.credential(&job.credential).await?;
        let repo = Repo::open(&cred).await?;
        let snap = self.meta.get_volume(&job.snapshot).await?.ok_or_else(|| VolumeError::NotFound(job.snapshot.clone()))?;
        let handle = self
            .replica_volume(snap.id)
            .await
            .ok_or_else(|| VolumeError::FailedPrecondition(format!("node {} holds no replica of snapshot {}", self.node.id, job.snapshot)))?;
        // The newest earlier backup whose base snapshot is still here.
        let mut parent: Option<(Manifest, u64)> = None;
        if !job.full {
            for p in repo.manifests(Some(&job.volume)).await? {
                let Some(m) = repo.get_json::<Manifest>(&p).await? else { continue };
                if m.id == job.id || m.extent_size != self.pool.extent_size {
                    continue;
                }
                let Some(base) = self.meta.get_volume(&m.snapshot).await? else { continue };
                if base.snapshot_of.as_deref() == Some(job.volume.as_str()) && parent.as_ref().is_none_or(|(q, _)| q.created_unix <= m.created_unix) {
                    parent = Some((m, base.id));
                }
            }
        }
        let es = self.pool.extent_size;
        let size = snap.size;
        let before: std::collections::HashMap<u64, String> = parent.as_ref().map(|(m, _)| m.extents.iter().cloned().collect()).unwrap_or_default();
        let mut m = Manifest {
            version: 1,
            id: job.id.clone(),
            volume: job.volume.clone(),
            cluster_id: self.meta.cluster_id().await?,
            size,
            extent_size: es,
            created_unix: job.started_unix,
            parent: parent.as_ref().map(|(p, _)| p.id.clone()),
            snapshot: job.snapshot.clone(),
            encrypted: !cred.passphrase.is_empty(),
            extents: Vec::new(),
            changed_extents: 0,
            uploaded_bytes: 0,
        };
        let mut last_save = std::time::Instant::now();
        job.uploaded_bytes = 0;
        // Extents are read one after the other and uploaded several at once (an object store
        // answers each request after a round trip or two).
        let store = &repo;
        let upload = |lext: u64, data: crate::replica::ReadData| async move {
            let hash = repo::chunk_hash(data.bytes());
            let sent = store.put_chunk(&hash, data.bytes()).await?;
            self.cloud_pacer.take(sent).await;
            Ok::<_, VolumeError>((lext, hash, sent))
        };
        let mut uploads = futures::stream::FuturesUnordered::new();
        let landed = |(lext, hash, sent): (u64, String, u64), m: &mut Manifest, job: &mut Job| {
            m.uploaded_bytes += sent;
            job.uploaded_bytes += sent;
            m.extents.push((lext, hash));
        };
        for lext in 0..size.div_ceil(es) {
            crate::failpoint::point("cloudsnap.extent").await.map_err(|e| VolumeError::Meta(e.to_string()))?;
            job.done_extents = lext.saturating_sub(uploads.len() as u64);
            if last_save.elapsed() >= std::time::Duration::from_secs(1) {
                self.save_job(job).await?;
                last_save = std::time::Instant::now();
            }
            let Some(now) = self.pool.lookup(snap.id, lext) else { continue };
            if let Some((_, base)) = &parent {
                if self.pool.lookup(*base, lext) == Some(now) {
                    // Unchanged since the parent: its chunk (none: it was all zeroes).
                    if let Some(h) = before.get(&lext) {
                        m.extents.push((lext, h.clone()));
                    }
                    continue;
                }
            }
            let off = lext * es;
            let len = es.min(size - off) as usize;
            let data =
                self.local.read_local_once(&handle.replica, off, len).await.map_err(|e| VolumeError::Meta(format!("reading extent {lext}: {e}")))?;
            m.changed_extents += 1;
            if data.bytes().iter().all(|b| *b == 0) {
                continue;
            }
            if uploads.len() >= UPLOADS_IN_FLIGHT {
                let done = futures::StreamExt::next(&mut uploads).await.expect("an upload is in flight")?;
                landed(done, &mut m, job);
            }
            uploads.push(upload(lext, data));
        }
        while let Some(done) = futures::StreamExt::next(&mut uploads).await {
            landed(done?, &mut m, job);
        }
        m.extents.sort_by_key(|(lext, _)| *lext);
        job.done_extents = job.total_extents;
        repo.put_json(&Repo::manifest_path(&job.volume, &job.id), &m).await?;
        // This backup's snapshot is the base of the next; the parent's is no longer needed.
        if let Some((p, _)) = &parent {
            if let Err(err) = self.delete(&p.snapshot, false).await {
                tracing::warn!(snapshot = %p.snapshot, "removing the previous backup's base snapshot: {err}");
            }
        }
        Ok(m)
    }

    /// The backups in `credential`'s bucket (of `volume` when given), oldest first.
    pub async fn cloud_list(&self, credential: &str, volume: Option<&str>) -> Result<Vec<Manifest>, VolumeError> {
        let repo = Repo::open(&self.credential(credential).await?).await?;
        let mut out = Vec::new();
        for p in repo.manifests(volume).await? {
            if let Some(m) = repo.get_json::<Manifest>(&p).await? {
                out.push(m);
            }
        }
        out.sort_by(|a, b| (a.created_unix, &a.id).cmp(&(b.created_unix, &b.id)));
        Ok(out)
    }

    async fn find_backup(&self, repo: &Repo, id: &str) -> Result<Manifest, VolumeError> {
        for p in repo.manifests(None).await? {
            if p.filename() == Some(&format!("{id}.json")) {
                if let Some(m) = repo.get_json::<Manifest>(&p).await? {
                    return Ok(m);
                }
            }
        }
        Err(VolumeError::Absent(format!("backup {id} (stratactl cloudsnap list shows them)")))
    }

    /// Restores backup `id` into a new volume `name` (`repl` replicas, on `nodes` when given),
    /// written through this node. The volume carries the `RESTORING` label until every extent
    /// is written; a restore that fails leaves no volume behind. The work goes on if the caller
    /// gives up waiting.
    pub async fn cloud_restore(
        self: &Arc<Self>,
        credential: &str,
        id: &str,
        name: &str,
        repl: u32,
        nodes: Vec<String>,
    ) -> Result<VolumeInfo, VolumeError> {
        let repo = Repo::open(&self.credential(credential).await?).await?;
        let m = self.find_backup(&repo, id).await?;
        let default_name;
        let name = if name.is_empty() {
            default_name = restored_name(&m.volume, &m.id);
            default_name.as_str()
        } else {
            name
        };
        let placement = PlacementSpec { nodes, ..Default::default() };
        let labels = [("strata.dev/restored-from".to_string(), id.to_string()), (RESTORING.to_string(), "true".to_string())].into();
        self.create(CreateSpec { name, size: m.size, repl: repl.max(1), labels, placement, ..Default::default() }).await?;
        let (e, name) = (self.clone(), name.to_string());
        let work = tokio::spawn(async move {
            let written = e.write_backup(&repo, &m, &name).await;
            let detached = e.detach(&name, false).await;
            let done = match written.and(detached.map(|_| ())) {
                Ok(()) => {
                    let clear = crate::volume::UpdateSpec { labels: [(RESTORING.to_string(), String::new())].into(), ..Default::default() };
                    e.update(&name, clear).await.map(|_| ())
                }
                Err(err) => Err(err),
            };
            if let Err(err) = done {
                if let Err(d) = e.delete(&name, true).await {
                    tracing::warn!(volume = %name, "removing the failed restore: {d}");
                }
                return Err(err);
            }
            tracing::info!(volume = %name, backup = %m.id, extents = m.extents.len(), "restored from the cloud");
            e.inspect(&name).await
        });
        work.await.map_err(|err| VolumeError::Meta(format!("the restore stopped: {err}")))?
    }

    async fn write_backup(&self, repo: &Repo, m: &Manifest, name: &str) -> Result<(), VolumeError> {
        self.attach(name, false, None).await?;
        let v = self.volume(name).ok_or_else(|| VolumeError::NotFound(name.to_string()))?;
        let io = self.io(v);
        // Several extents at once: each is downloaded, checked and written on its own.
        let each: Vec<_> = m.extents.iter().map(|(l, h)| restore_extent(&io, repo, m, *l, h)).collect();
        let mut work = futures::stream::iter(each).buffer_unordered(RESTORE_IN_FLIGHT);
        while let Some(r) = futures::StreamExt::next(&mut work).await {
            r?;
        }
        drop(work);
        io.flush().await.map_err(|e| VolumeError::Meta(format!("flushing: {e}")))?;
        Ok(())
    }

    /// Deletes backup `id` and the chunks no other backup names; the count of chunks removed.
    pub async fn cloud_delete(&self, credential: &str, id: &str) -> Result<u64, VolumeError> {
        let repo = Repo::open(&self.credential(credential).await?).await?;
        let m = self.find_backup(&repo, id).await?;
        repo.delete(&Repo::manifest_path(&m.volume, &m.id)).await?;
        let mut referenced = std::collections::HashSet::new();
        for p in repo.manifests(None).await? {
            if let Some(other) = repo.get_json::<Manifest>(&p).await? {
                referenced.extend(other.extents.into_iter().map(|(_, h)| h));
            }
        }
        let n = repo.collect_garbage(&referenced).await?;
        // Its base snapshot, when it lives on this cluster.
        if let Some(s) = self.meta.get_volume(&m.snapshot).await? {
            if s.snapshot_of.as_deref() == Some(m.volume.as_str()) {
                let _ = self.delete(&m.snapshot, false).await;
            }
        }
        let _ = self.meta.delete_kv(&job_key(id)).await;
        Ok(n)
    }
}
