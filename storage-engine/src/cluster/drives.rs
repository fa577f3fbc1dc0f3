//! Drives of this node's pool while it runs: `service drive add PATH` (a blank block device or
//! file joins the pool; new extents spread onto it at once) and `service pool expand --size N`
//! (a new file device beside the pool's file devices). The pool's record in the metadata store
//! names every device, so the next start opens the added ones too.

use crate::device::{BlockIo, FileDevice, OpenOptions};
use crate::volume::{Service, VolumeError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

impl Service {
    /// Adds the device at `path` to this node's pool; a missing file is created with `size`
    /// bytes. Returns the device's index in the pool.
    pub async fn add_drive(&self, path: &str, size: Option<u64>) -> Result<usize, VolumeError> {
        if path.is_empty() || !path.starts_with('/') {
            return Err(VolumeError::InvalidArgument(format!("drive path {path:?}: give an absolute path (a block device or a file)")));
        }
        if size.is_none() && !Path::new(path).exists() {
            return Err(VolumeError::InvalidArgument(format!("{path} does not exist: give --size to create a file device there")));
        }
        let canon = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
        if self.pool.devices().iter().any(|d| canon(&d.path) == canon(path)) {
            return Err(VolumeError::FailedPrecondition(format!("device {path} is already in this pool")));
        }
        let opts = OpenOptions { create_size: size, io_engine: self.drive_io_engine, read_only: false, lock_wait: std::time::Duration::ZERO };
        let (pool, p) = (self.pool.clone(), path.to_string());
        let i = tokio::task::spawn_blocking(move || {
            let dev: Arc<dyn BlockIo> =
                Arc::new(FileDevice::open(Path::new(&p), &opts).map_err(|e| VolumeError::InvalidArgument(format!("opening {p}: {e}")))?);
            pool.add_device(p, dev).map_err(|e| match e {
                crate::pool::PoolError::Invalid(why) => VolumeError::FailedPrecondition(why),
                other => VolumeError::Pool(other),
            })
        })
        .await
        .map_err(|e| VolumeError::Meta(e.to_string()))??;
        // Recorded at once: the next start expects (and opens) the new device.
        self.meta.put_pool(&self.pool.record()).await?;
        self.meta.update_node(&self.own_record()).await?;
        tracing::warn!(device = %path, "drive added to the pool");
        Ok(i)
    }

    /// Grows the pool by a new file device of `size` bytes in the directory of its first file
    /// device (Portworx's `pool expand --operation add-disk`). Returns the new file's path.
    pub async fn expand_pool(&self, size: u64) -> Result<String, VolumeError> {
        let files: Vec<PathBuf> = self.pool.devices().iter().filter(|d| d.dev.describe().kind == "file").map(|d| PathBuf::from(&d.path)).collect();
        let dir = files.first().and_then(|p| p.parent()).ok_or_else(|| {
            VolumeError::FailedPrecondition(
                "this pool has no file device to grow beside: add a block device with `stratactl service drive add /dev/...`".into(),
            )
        })?;
        let path = (2..).map(|n| dir.join(format!("strata-drive-{n}.img"))).find(|p| !p.exists() && !files.contains(p)).expect("a free name");
        let path = path.display().to_string();
        self.add_drive(&path, Some(size)).await?;
        Ok(path)
    }

    /// Raises `DriveFailed` (once per drive, `seen` remembers) for each drive of the pool that
    /// failed: its journal could not be written, or it failed data I/O.
    pub fn check_drives(&self, seen: &mut std::collections::BTreeSet<String>) {
        for d in self.pool.devices().iter().filter(|d| d.failed()) {
            if !seen.insert(d.path.clone()) {
                continue;
            }
            let why = if d.io_errors() > 0 { format!("{} data I/O error(s)", d.io_errors()) } else { "its journal could not be written".into() };
            self.alerts.raise(
                crate::alerts::Severity::Alarm,
                "DriveFailed",
                &format!("node/{}/drive/{}", self.node.id, d.path),
                format!(
                    "drive {} of node {} failed ({why}): replicas here leave their volumes' in-sync sets as their writes fail; replace the drive (move the node's volumes away: stratactl cluster delete {})",
                    d.path, self.node.id, self.node.id
                ),
            );
        }
    }
}
