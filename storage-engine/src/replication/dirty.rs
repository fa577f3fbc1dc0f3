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
    /// Regions the file holds (a superset of `regions` plus in-flight writes since the last
    /// rewrite).
    on_disk: BTreeSet<u64>,
    /// Regions with a write on its way to a catching-up replica, and how many.
    inflight: std::collections::HashMap<u64, u32>,
    file: Option<File>,
    /// The record is lost (a full rebuild is due): marks stay in memory and no file is written
    /// until `persist` writes the rebuild plan, so a restart still sees the loss.
    lost: bool,
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
        Ok((
            DirtyLog { path, inner: Mutex::new(Inner { on_disk: regions.clone(), regions, inflight: Default::default(), file: None, lost: false }) },
            existed,
        ))
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
        let mut inner = self.inner.lock();
        if inner.lost {
            return Ok(());
        }
        Self::file(&mut inner, &self.path)
    }

    /// Declares the record lost: the file goes, and nothing is written until `persist`.
    pub fn set_lost(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.lost = true;
        inner.file = None;
        inner.on_disk.clear();
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Records `[offset, offset+len)` as missed; durable when this returns. Blocking.
    pub fn mark(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.mark_mem(offset, len) {
            Some(new) => self.append(&new),
            None => Ok(()),
        }
    }

    /// Records a range as missed in memory; returns the entries the file still needs (write
    /// them with `append` before the range is acknowledged), or None.
    pub fn mark_mem(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let mut inner = self.inner.lock();
        let Inner { regions, on_disk, lost, .. } = &mut *inner;
        let mut new = Vec::new();
        for r in regions_of(offset, len) {
            regions.insert(r);
            if !*lost && on_disk.insert(r) {
                new.extend_from_slice(&r.to_be_bytes());
            }
        }
        (!new.is_empty()).then_some(new)
    }

    /// A write to `[offset, offset+len)` is about to go to a catching-up replica. If the target
    /// dies before the write completes, the replica may or may not have it, so the range must be
    /// in the file (to be copied again) before the write is sent; in memory it is only counted.
    /// Returns the entries to `append` first, or None.
    pub fn begin_inflight(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let mut inner = self.inner.lock();
        let Inner { on_disk, inflight, lost, .. } = &mut *inner;
        let mut new = Vec::new();
        for r in regions_of(offset, len) {
            *inflight.entry(r).or_default() += 1;
            if !*lost && on_disk.insert(r) {
                new.extend_from_slice(&r.to_be_bytes());
            }
        }
        (!new.is_empty()).then_some(new)
    }

    pub fn end_inflight(&self, offset: u64, len: u64) {
        let mut inner = self.inner.lock();
        for r in regions_of(offset, len) {
            if let Some(n) = inner.inflight.get_mut(&r) {
                *n -= 1;
                if *n == 0 {
                    inner.inflight.remove(&r);
                }
            }
        }
    }

    /// Appends entries to the file and syncs it. Blocking.
    pub fn append(&self, entries: &[u8]) -> io::Result<()> {
        let mut inner = self.inner.lock();
        if inner.lost {
            return Ok(());
        }
        Self::file(&mut inner, &self.path)?;
        let f = inner.file.as_mut().expect("opened");
        f.write_all(entries)?;
        f.sync_data()
    }

    /// Records a range in memory only (`persist` writes it down): for a rebuild plan.
    pub fn mark_quiet(&self, offset: u64, len: u64) {
        let mut inner = self.inner.lock();
        for r in regions_of(offset, len) {
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
        // Ranges with a write in flight stay recorded until it completes.
        let keep: BTreeSet<u64> = inner.regions.iter().copied().chain(inner.inflight.keys().copied()).collect();
        let mut b = Vec::with_capacity(keep.len() * 8);
        for r in &keep {
            b.extend_from_slice(&r.to_be_bytes());
        }
        f.write_all(&b)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        inner.lost = false;
        inner.on_disk = keep;
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
        inner.on_disk.clear();
        inner.lost = false;
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The regions `[offset, offset+len)` touches (none for an empty range).
fn regions_of(offset: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    offset / REGION..(offset + len - 1) / REGION + 1
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
        third.set_lost().unwrap();
        third.mark(30 * REGION, 1).unwrap();
        third.start().unwrap();
        assert!(!DirtyLog::open(path.clone()).unwrap().1, "a lost record stays lost across marks");
        third.persist().unwrap();
        assert_eq!(DirtyLog::open(path.clone()).unwrap().0.len(), 5, "the rebuild plan is written down");
        // A write in flight to a catching-up replica is on disk first, and survives a rewrite.
        let entries = third.begin_inflight(40 * REGION, REGION).expect("new on disk");
        third.append(&entries).unwrap();
        assert!(third.begin_inflight(40 * REGION, 1).is_none(), "already on disk");
        third.persist().unwrap();
        let (reopened, _) = DirtyLog::open(path.clone()).unwrap();
        assert!(reopened.contains(40), "an in-flight range is recopied after a crash");
        assert!(!third.contains(40), "but it is not missed while the write can still complete");
        third.end_inflight(40 * REGION, REGION);
        third.end_inflight(40 * REGION, 1);
        third.persist().unwrap();
        assert!(!DirtyLog::open(path.clone()).unwrap().0.contains(40));
        third.remove().unwrap();
        assert!(!DirtyLog::open(path).unwrap().1, "an in-sync replica has no record");
    }
}
