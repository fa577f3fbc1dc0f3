//! The regions a replica missed while out of sync, kept by the target and persisted in the data
//! directory (`dirty/<volume id>.<node>`), so a target restart does not force a full copy.
//!
//! File format: a sequence of big-endian u64 region numbers. A newly dirty region is appended
//! and synced before the write that dirtied it is acknowledged; resync progress rewrites the file
//! with what is left (write to a temporary file, sync, rename). A missing file for a replica that
//! is out of sync means the record is lost: a full, thin-aware rebuild.

use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Granularity of the dirty-region record.
pub const REGION: u64 = 64 * 1024;

pub struct DirtyLog {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    regions: BTreeSet<u64>,
    file: Option<File>,
}

impl DirtyLog {
    pub fn path_for(dir: &Path, volume: u64, node: &str) -> PathBuf {
        dir.join("dirty").join(format!("{volume}.{node}"))
    }

    /// Loads the record if it exists. Returns the log and whether a file was there.
    pub fn open(path: PathBuf) -> io::Result<(DirtyLog, bool)> {
        let mut regions = BTreeSet::new();
        let existed = match File::open(&path) {
            Ok(mut f) => {
                let mut b = Vec::new();
                f.read_to_end(&mut b)?;
                // A torn last entry was never synced, so its write was never acknowledged.
                for c in b.chunks_exact(8) {
                    regions.insert(u64::from_be_bytes(c.try_into().expect("8 bytes")));
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        Ok((DirtyLog { path, inner: Mutex::new(Inner { regions, file: None }) }, existed))
    }

    fn file(inner: &mut Inner, path: &Path) -> io::Result<()> {
        if inner.file.is_none() {
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            f.sync_all()?;
            if let Some(d) = path.parent() {
                File::open(d)?.sync_all()?;
            }
            inner.file = Some(f);
        }
        Ok(())
    }

    /// Creates the (empty) record on disk: from now on its absence means "lost".
    pub fn start(&self) -> io::Result<()> {
        Self::file(&mut self.inner.lock(), &self.path)
    }

    /// Records `[offset, offset+len)` as missed; durable when this returns. Blocking.
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut inner = self.inner.lock();
        let mut new = Vec::new();
        for r in offset / REGION..=(offset + len - 1) / REGION {
            if inner.regions.insert(r) {
                new.extend_from_slice(&r.to_be_bytes());
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        Self::file(&mut inner, &self.path)?;
        let f = inner.file.as_mut().expect("opened");
        f.write_all(&new)?;
        f.sync_data()
    }

    /// Records a range in memory only (`persist` writes it down): for a rebuild plan.
    pub fn mark_quiet(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut inner = self.inner.lock();
        for r in offset / REGION..=(offset + len - 1) / REGION {
            inner.regions.insert(r);
        }
    }

    pub fn contains(&self, region: u64) -> bool {
        self.inner.lock().regions.contains(&region)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The lowest dirty region at or after `from`.
    pub fn next_from(&self, from: u64) -> Option<u64> {
        self.inner.lock().regions.range(from..).next().copied()
    }

    /// Forgets a region copied to the replica (in memory; `persist` writes it down).
    pub fn clear(&self, region: u64) {
        self.inner.lock().regions.remove(&region);
    }

    /// Rewrites the file with the regions still dirty (resync progress survives a restart).
    pub fn persist(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        let tmp = self.path.with_extension("tmp");
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let mut f = File::create(&tmp)?;
        let mut b = Vec::with_capacity(inner.regions.len() * 8);
        for r in &inner.regions {
            b.extend_from_slice(&r.to_be_bytes());
        }
        f.write_all(&b)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(d) = self.path.parent() {
            File::open(d)?.sync_all()?;
        }
        inner.file = Some(OpenOptions::new().append(true).open(&self.path)?);
        Ok(())
    }

    /// The replica is in sync again: the record goes.
    pub fn remove(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.file = None;
        inner.regions.clear();
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen_and_progress_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = DirtyLog::path_for(dir.path(), 7, "n2");
        let (log, existed) = DirtyLog::open(path.clone()).unwrap();
        assert!(!existed);
        log.start().unwrap();
        log.mark(0, 4096).unwrap();
        log.mark(REGION - 1, 2).unwrap(); // straddles regions 0 and 1
        log.mark(10 * REGION, 3 * REGION).unwrap();
        assert_eq!(log.len(), 5);
        let (again, existed) = DirtyLog::open(path.clone()).unwrap();
        assert!(existed);
        assert_eq!(again.len(), 5);
        again.clear(0);
        again.clear(10);
        again.persist().unwrap();
        again.mark(20 * REGION, 1).unwrap();
        let (third, _) = DirtyLog::open(path.clone()).unwrap();
        assert_eq!(third.next_from(0), Some(1));
        assert_eq!(third.len(), 4);
        third.remove().unwrap();
        assert!(!DirtyLog::open(path).unwrap().1, "an in-sync replica has no record");
    }
}
