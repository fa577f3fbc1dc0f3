//! The blocks a replica missed while out of sync, kept by the target and persisted in the data
//! directory (`dirty/<volume id>.<node>`), so a target restart does not force a full copy.
//!
//! Tracked per 4 KiB block, grouped in 64 KiB regions: a region and a 16-bit mask of its blocks.
//! Scattered small writes then cost a resync what they wrote, not a region each.
//!
//! File format: the 8-byte magic `MAGIC`, then big-endian u64 entries `region << 16 | mask`
//! (entries for one region OR together). A file without the magic is the older format: plain
//! region numbers, each meaning the whole region; it is rewritten in this format when opened.
//! A newly dirty block is appended and synced before the write that dirtied it is acknowledged;
//! resync progress rewrites the file with what is left (write to a temporary file, sync, rename).
//! A missing file for a replica that is out of sync means the record is lost: a full, thin-aware
//! rebuild.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Granularity of the region index (resync visits regions in order).
pub const REGION: u64 = 64 * 1024;
/// Granularity of the record: a region's mask has a bit per block.
pub const BLOCK: u64 = 4096;
const FULL: u16 = u16::MAX;
/// Opens a file of this format (no region number of the older format can equal it).
const MAGIC: [u8; 8] = *b"STRDIRT2";

pub struct DirtyLog {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Region → mask of its missed blocks.
    regions: BTreeMap<u64, u16>,
    /// Blocks the file holds (a superset of `regions` plus in-flight writes since the last
    /// rewrite).
    on_disk: BTreeMap<u64, u16>,
    /// Regions with a write on its way to a catching-up replica: how many, and which blocks.
    inflight: HashMap<u64, (u32, u16)>,
    file: Option<File>,
    /// The record is lost (a full rebuild is due): marks stay in memory and no file is written
    /// until `persist` writes the rebuild plan, so a restart still sees the loss.
    lost: bool,
}

fn entry(region: u64, mask: u16) -> [u8; 8] {
    (region << 16 | mask as u64).to_be_bytes()
}

/// Parses a record file's bytes into region masks.
fn parse(b: &[u8]) -> BTreeMap<u64, u16> {
    let mut regions = BTreeMap::new();
    // A torn last entry was never synced, so its write was never acknowledged.
    match b.strip_prefix(&MAGIC[..]) {
        Some(rest) => {
            for c in rest.chunks_exact(8) {
                let e = u64::from_be_bytes(c.try_into().expect("8 bytes"));
                add(&mut regions, e >> 16, e as u16);
            }
        }
        None => {
            for c in b.chunks_exact(8) {
                regions.insert(u64::from_be_bytes(c.try_into().expect("8 bytes")), FULL);
            }
        }
    }
    regions
}

/// Adds `mask`'s bits of `region` to `map`; returns the bits that were not there.
fn add(map: &mut BTreeMap<u64, u16>, region: u64, mask: u16) -> u16 {
    let m = map.entry(region).or_insert(0);
    let new = mask & !*m;
    *m |= mask;
    new
}

/// Adds `[offset, offset+len)` to `regions` and, unless the record is lost, to `on_disk`;
/// returns the file entries for the blocks `on_disk` did not have.
fn add_range(regions: Option<&mut BTreeMap<u64, u16>>, on_disk: &mut BTreeMap<u64, u16>, lost: bool, offset: u64, len: u64) -> Vec<u8> {
    let mut new = Vec::new();
    let mut regions = regions;
    for (r, mask) in blocks_of(offset, len) {
        if let Some(m) = regions.as_deref_mut() {
            add(m, r, mask);
        }
        if !lost {
            let fresh = add(on_disk, r, mask);
            if fresh != 0 {
                new.extend_from_slice(&entry(r, fresh));
            }
        }
    }
    new
}

impl DirtyLog {
    pub fn path_for(dir: &Path, volume: u64, node: &str) -> PathBuf {
        dir.join("dirty").join(format!("{volume}.{node}"))
    }

    /// Loads the record if it exists (rewriting one of the older format in this one). Returns
    /// the log and whether a file was there.
    pub fn open(path: PathBuf) -> io::Result<(DirtyLog, bool)> {
        let (regions, existed, legacy) = match File::open(&path) {
            Ok(mut f) => {
                let mut b = Vec::new();
                f.read_to_end(&mut b)?;
                (parse(&b), true, !b.is_empty() && !b.starts_with(&MAGIC))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (BTreeMap::new(), false, false),
            Err(e) => return Err(e),
        };
        let log =
            DirtyLog { path, inner: Mutex::new(Inner { on_disk: regions.clone(), regions, inflight: Default::default(), file: None, lost: false }) };
        if legacy {
            log.persist()?;
        }
        Ok((log, existed))
    }

    fn file(inner: &mut Inner, path: &Path) -> io::Result<()> {
        if inner.file.is_none() {
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            let mut f = OpenOptions::new().create(true).append(true).open(path)?;
            if f.metadata()?.len() == 0 {
                f.write_all(&MAGIC)?;
            }
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
        let new = add_range(Some(regions), on_disk, *lost, offset, len);
        (!new.is_empty()).then_some(new)
    }

    /// A write to `[offset, offset+len)` is about to go to a catching-up replica. If the target
    /// dies before the write completes, the replica may or may not have it, so the range must be
    /// in the file (to be copied again) before the write is sent; in memory it is only counted.
    /// Returns the entries to `append` first, or None.
    pub fn begin_inflight(&self, offset: u64, len: u64) -> Option<Vec<u8>> {
        let mut inner = self.inner.lock();
        let Inner { on_disk, inflight, lost, .. } = &mut *inner;
        for (r, mask) in blocks_of(offset, len) {
            let f = inflight.entry(r).or_default();
            f.0 += 1;
            f.1 |= mask;
        }
        let new = add_range(None, on_disk, *lost, offset, len);
        (!new.is_empty()).then_some(new)
    }

    pub fn end_inflight(&self, offset: u64, len: u64) {
        let mut inner = self.inner.lock();
        for (r, _) in blocks_of(offset, len) {
            if let Some(f) = inner.inflight.get_mut(&r) {
                f.0 -= 1;
                if f.0 == 0 {
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
        for (r, mask) in blocks_of(offset, len) {
            add(&mut inner.regions, r, mask);
        }
    }

    /// Whether any block of `region` is missed.
    pub fn contains(&self, region: u64) -> bool {
        self.inner.lock().regions.contains_key(&region)
    }

    /// The missed blocks of `region` (a bit per block), 0 when none.
    pub fn mask(&self, region: u64) -> u16 {
        self.inner.lock().regions.get(&region).copied().unwrap_or(0)
    }

    /// Regions with a missed block.
    pub fn len(&self) -> usize {
        self.inner.lock().regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes recorded as missed.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().regions.values().map(|m| m.count_ones() as u64 * BLOCK).sum()
    }

    /// The lowest region with a missed block at or after `from`.
    pub fn next_from(&self, from: u64) -> Option<u64> {
        self.inner.lock().regions.range(from..).next().map(|(r, _)| *r)
    }

    /// Forgets a region copied to the replica (in memory; `persist` writes it down).
    pub fn clear(&self, region: u64) {
        self.inner.lock().regions.remove(&region);
    }

    /// Rewrites the file with the blocks still missed (resync progress survives a restart).
    pub fn persist(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        let tmp = self.path.with_extension("tmp");
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let mut f = File::create(&tmp)?;
        // Ranges with a write in flight stay recorded until it completes.
        let mut keep = inner.regions.clone();
        for (r, (_, mask)) in &inner.inflight {
            add(&mut keep, *r, *mask);
        }
        let mut b = Vec::with_capacity(8 + keep.len() * 8);
        b.extend_from_slice(&MAGIC);
        for (r, mask) in &keep {
            b.extend_from_slice(&entry(*r, *mask));
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

/// The regions `[offset, offset+len)` touches, each with the mask of the blocks it touches
/// (none for an empty range).
fn blocks_of(offset: u64, len: u64) -> impl Iterator<Item = (u64, u16)> {
    let per = REGION / BLOCK;
    let (first, end) = if len == 0 { (0, 0) } else { (offset / BLOCK, (offset + len - 1) / BLOCK + 1) };
    let regions = if len == 0 { 0..0 } else { first / per..end.div_ceil(per) };
    regions.map(move |r| {
        let lo = first.max(r * per) - r * per;
        let hi = end.min((r + 1) * per) - r * per;
        let mask = if hi - lo == per { FULL } else { (((1u32 << (hi - lo)) - 1) << lo) as u16 };
        (r, mask)
    })
}

/// The runs of set bits in a block mask: (first block, blocks), lowest first.
pub fn runs(mask: u16) -> impl Iterator<Item = (u64, u64)> {
    let mut rest = mask as u32;
    std::iter::from_fn(move || {
        if rest == 0 {
            return None;
        }
        let start = rest.trailing_zeros();
        let n = (rest >> start).trailing_ones();
        rest &= !(((1u32 << n) - 1) << start);
        Some((start as u64, n as u64))
    })
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

    #[test]
    fn blocks_are_tracked_within_regions_and_the_older_format_still_reads() {
        assert_eq!(blocks_of(0, 4096).collect::<Vec<_>>(), vec![(0, 1)]);
        assert_eq!(blocks_of(100, 1).collect::<Vec<_>>(), vec![(0, 1)]);
        assert_eq!(blocks_of(BLOCK * 15, 2 * BLOCK).collect::<Vec<_>>(), vec![(0, 1 << 15), (1, 1)]);
        assert_eq!(blocks_of(REGION, REGION).collect::<Vec<_>>(), vec![(1, FULL)]);
        assert_eq!(blocks_of(REGION - 1, REGION + 2).collect::<Vec<_>>(), vec![(0, 1 << 15), (1, FULL), (2, 1)]);
        assert_eq!(blocks_of(5, 0).count(), 0);
        assert_eq!(runs(0b1011_0001).collect::<Vec<_>>(), vec![(0, 1), (4, 2), (7, 1)]);
        assert_eq!(runs(FULL).collect::<Vec<_>>(), vec![(0, 16)]);
        assert_eq!(runs(0).count(), 0);

        let dir = tempfile::tempdir().unwrap();
        let path = DirtyLog::path_for(dir.path(), 3, "n2");
        let (log, _) = DirtyLog::open(path.clone()).unwrap();
        log.start().unwrap();
        log.mark(3 * BLOCK, BLOCK).unwrap();
        log.mark(5 * BLOCK, 10).unwrap();
        log.mark(2 * REGION + 15 * BLOCK, BLOCK).unwrap();
        assert!(log.mark_mem(3 * BLOCK, 1).is_none(), "a block already on disk is not appended again");
        let (again, _) = DirtyLog::open(path.clone()).unwrap();
        assert_eq!(again.mask(0), 1 << 3 | 1 << 5, "scattered blocks of one region are kept apart");
        assert_eq!(again.mask(2), 1 << 15);
        assert_eq!(again.bytes(), 3 * BLOCK);
        assert_eq!(again.len(), 2);

        // A record written by an older engine: whole regions, rewritten in this format at open.
        let old = DirtyLog::path_for(dir.path(), 4, "n2");
        std::fs::write(&old, [7u64.to_be_bytes(), 9u64.to_be_bytes()].concat()).unwrap();
        let (legacy, existed) = DirtyLog::open(old.clone()).unwrap();
        assert!(existed);
        assert_eq!((legacy.mask(7), legacy.mask(9), legacy.bytes()), (FULL, FULL, 2 * REGION));
        assert!(std::fs::read(&old).unwrap().starts_with(&MAGIC));
        legacy.mark(20 * REGION, 1).unwrap();
        let (reread, _) = DirtyLog::open(old).unwrap();
        assert_eq!((reread.mask(7), reread.mask(20)), (FULL, 1));
    }
}
