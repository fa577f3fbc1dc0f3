//! Block checksums of one device: a crc32c per 4 KiB block of every mapped extent, kept in
//! memory (4 bytes per 4 KiB of used space) and in the device's checksum slots.
//!
//! Data and checksum cannot be written atomically together, so a crash may leave a block whose
//! new data has the old checksum (or the reverse). The intent bitmap closes that gap, as a
//! write-intent bitmap does for a mirror: before the first write to an extent its bit is made
//! durable; the bit is cleared only after the extent has been idle for a whole settle period
//! and its slot was written and synced. At open, every extent whose bit is set has its
//! checksums recomputed from its data (a torn write leaves old or new data, both acceptable);
//! everything else is verified against its slot.

use super::superblock::{Superblock, CSUM_SLOT};
use crate::device::{AlignedBuf, BlockIo};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub const BLOCK: usize = 4096;
const PAGE: usize = 4096;
/// Unsettled extents a device may keep past one idle settle pass (the engine's `settle` cap):
/// after a crash each one is read whole to recompute its checksums (2 GiB at the default 1 MiB
/// extents).
pub const DIRTY_CAP: usize = 2048;

/// Checksums of one extent, one per 4 KiB block.
pub type ExtentSums = Arc<[AtomicU32]>;

/// The crc32c of a 4 KiB block of zeroes.
pub fn zero_block_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0u8; BLOCK]))
}

#[derive(Default)]
struct Dirty {
    /// Writes begun on the extent.
    gen: u64,
    /// `gen` at the previous settle pass.
    seen: u64,
    /// Settle passes in a row that found no write begun since the one before.
    idle: u32,
    /// Writes begun and not yet ended.
    inflight: u32,
    /// Distinguishes this entry from an earlier one of the same extent.
    id: u64,
    /// The bit of this entry is on the device.
    durable: bool,
}

#[derive(Default)]
struct Intent {
    dirty: HashMap<u32, Dirty>,
    /// The bitmap as last written to the device.
    disk: Vec<u8>,
    next_id: u64,
}

pub struct DeviceSums {
    dev: Arc<dyn BlockIo>,
    sb: Superblock,
    table: RwLock<HashMap<u32, ExtentSums>>,
    intent: Mutex<Intent>,
    /// Serialises bitmap writes (a writer that finds its bit already written skips its own).
    persist: Mutex<()>,
}

/// What loading found.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Extents whose checksums were recomputed (written while the engine stopped).
    pub recomputed: u64,
}

impl DeviceSums {
    fn blocks(&self) -> usize {
        (self.sb.extent_size / BLOCK as u64) as usize
    }

    fn bitmap_len(&self) -> usize {
        ((self.sb.csum_offset - self.sb.intent_offset) as usize).min(1 << 30)
    }

    /// Loads the checksums of the mapped extents `mapped`, recomputing those of extents whose
    /// intent bit is set. With `read_only` nothing is written (the recomputed ones stay in
    /// memory only).
    pub fn load(dev: Arc<dyn BlockIo>, sb: &Superblock, mapped: &[u32], read_only: bool) -> Result<(DeviceSums, LoadReport), String> {
        let s =
            DeviceSums { dev, sb: sb.clone(), table: RwLock::new(HashMap::new()), intent: Mutex::new(Intent::default()), persist: Mutex::new(()) };
        let n = sb.extent_count.div_ceil(8).next_multiple_of(PAGE as u64) as usize;
        let mut bitmap = AlignedBuf::new(n.min(s.bitmap_len()));
        s.dev.read_blocking(sb.intent_offset, &mut bitmap).map_err(|e| format!("cannot read the checksum intent bitmap: {e}"))?;
        let mut report = LoadReport::default();
        let mut slot = AlignedBuf::new(CSUM_SLOT as usize);
        let mut data = AlignedBuf::new(sb.extent_size as usize);
        let mut table = HashMap::new();
        for &pext in mapped {
            let marked = bitmap.get(pext as usize / 8).is_some_and(|b| b & (1 << (pext % 8)) != 0);
            let sums: Vec<u32> = if marked {
                s.dev
                    .read_blocking(sb.extent_offset(pext), &mut data)
                    .map_err(|e| format!("cannot read extent {pext} to recompute its checksums: {e}"))?;
                report.recomputed += 1;
                let mut sums = Vec::with_capacity(data.len() / BLOCK);
                super::crc::for_each_block(&data, |_, c| sums.push(c));
                sums
            } else {
                s.dev.read_blocking(sb.csum_slot_offset(pext), &mut slot).map_err(|e| format!("cannot read the checksums of extent {pext}: {e}"))?;
                slot.chunks(4).take(s.blocks()).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
            };
            let sums: ExtentSums = sums.into_iter().map(AtomicU32::new).collect();
            if marked && !read_only {
                s.write_slot(pext, &sums).map_err(|e| format!("cannot write the checksums of extent {pext}: {e}"))?;
            }
            table.insert(pext, sums);
        }
        if !read_only && bitmap.iter().any(|b| *b != 0) {
            s.dev.sync_blocking().map_err(|e| format!("cannot sync recomputed checksums: {e}"))?;
            bitmap.fill(0);
            s.dev.write_blocking(sb.intent_offset, &bitmap).map_err(|e| format!("cannot clear the checksum intent bitmap: {e}"))?;
            s.dev.sync_blocking().map_err(|e| format!("cannot sync the checksum intent bitmap: {e}"))?;
        }
        s.intent.lock().disk = if read_only { bitmap.to_vec() } else { vec![0; bitmap.len()] };
        *s.table.write() = table;
        Ok((s, report))
    }

    fn write_slot(&self, pext: u32, sums: &[AtomicU32]) -> io::Result<()> {
        let mut slot = AlignedBuf::new(CSUM_SLOT as usize);
        slot.fill(0);
        for (i, c) in sums.iter().enumerate() {
            slot[i * 4..i * 4 + 4].copy_from_slice(&c.load(Ordering::Acquire).to_le_bytes());
        }
        self.dev.write_blocking(self.sb.csum_slot_offset(pext), &slot)
    }

    /// A write to `pext` begins. True when its intent bit must be made durable first
    /// (`persist_intent`) before the data is written.
    pub fn begin(&self, pext: u32) -> bool {
        let mut i = self.intent.lock();
        i.next_id += 1;
        let id = i.next_id;
        let d = i.dirty.entry(pext).or_insert_with(|| Dirty { id, ..Default::default() });
        d.gen += 1;
        d.inflight += 1;
        !d.durable
    }

    /// A write begun with `begin` ended (its checksums recorded, or it failed).
    pub fn end(&self, pext: u32) {
        if let Some(d) = self.intent.lock().dirty.get_mut(&pext) {
            d.inflight = d.inflight.saturating_sub(1);
        }
    }

    /// Writes the intent bitmap where it differs from the device's copy, then syncs; returns
    /// whether it wrote (and synced). Blocking.
    pub fn persist_intent(&self) -> io::Result<bool> {
        let _p = self.persist.lock();
        let (want, disk, included) = {
            let i = self.intent.lock();
            let mut want = vec![0u8; i.disk.len()];
            let mut included = Vec::new();
            for (p, d) in i.dirty.iter() {
                if let Some(b) = want.get_mut(*p as usize / 8) {
                    *b |= 1 << (p % 8);
                    included.push((*p, d.id));
                }
            }
            (want, i.disk.clone(), included)
        };
        let mut wrote = false;
        let mut page = AlignedBuf::new(PAGE);
        for (n, (w, d)) in want.chunks(PAGE).zip(disk.chunks(PAGE)).enumerate() {
            if w != d {
                page.fill(0);
                page[..w.len()].copy_from_slice(w);
                self.dev.write_blocking(self.sb.intent_offset + (n * PAGE) as u64, &page)?;
                wrote = true;
            }
        }
        if wrote {
            self.dev.sync_blocking()?;
        }
        let mut i = self.intent.lock();
        i.disk = want;
        for (p, id) in included {
            if let Some(d) = i.dirty.get_mut(&p).filter(|d| d.id == id) {
                d.durable = true;
            }
        }
        Ok(wrote)
    }

    /// Records the checksums of `data`, written at block `first` of `pext`.
    pub fn record(&self, pext: u32, first: usize, data: &[u8]) {
        if let Some(s) = self.table.read().get(&pext) {
            super::crc::for_each_block(data, |i, c| s[first + i].store(c, Ordering::Release));
        }
    }

    /// Records `n` zeroed blocks from block `first` of `pext`.
    pub fn record_zeroes(&self, pext: u32, first: usize, n: usize) {
        if let Some(s) = self.table.read().get(&pext) {
            for c in &s[first..first + n] {
                c.store(zero_block_crc(), Ordering::Release);
            }
        }
    }

    /// A newly mapped extent: all zeroes, or a copy of `from`'s data.
    pub fn insert(&self, pext: u32, from: Option<u32>) {
        let sums: ExtentSums = match from.and_then(|f| self.table.read().get(&f).cloned()) {
            Some(src) => src.iter().map(|c| AtomicU32::new(c.load(Ordering::Acquire))).collect(),
            None => (0..self.blocks()).map(|_| AtomicU32::new(zero_block_crc())).collect(),
        };
        self.table.write().insert(pext, sums);
    }

    /// An extent went back to the free list.
    pub fn remove(&self, pext: u32) {
        self.table.write().remove(&pext);
        let mut i = self.intent.lock();
        if i.dirty.get(&pext).is_some_and(|d| d.inflight == 0) {
            i.dirty.remove(&pext);
        }
    }

    /// Blocks of `data` (read from block `first` of `pext`) whose checksum does not match, as
    /// indexes into `data`'s blocks.
    pub fn verify(&self, pext: u32, first: usize, data: &[u8]) -> Vec<usize> {
        let t = self.table.read();
        let Some(s) = t.get(&pext) else { return Vec::new() };
        let mut bad = Vec::new();
        super::crc::for_each_block(data, |i, c| {
            if s.get(first + i).is_some_and(|want| want.load(Ordering::Acquire) != c) {
                bad.push(i);
            }
        });
        bad
    }

    /// Writes the slots of extents no write touched over the last `passes` passes (the last
    /// one, past `cap` unsettled extents), syncs, and clears their intent bits. Blocking.
    /// Returns how many extents settled.
    pub fn settle(&self, passes: u32, cap: usize) -> io::Result<usize> {
        let idle: Vec<u32> = {
            let mut i = self.intent.lock();
            // Many unsettled extents would make the recomputation after a crash long.
            let passes = if i.dirty.len() > cap { 1 } else { passes.max(1) };
            let mut idle = Vec::new();
            for (p, d) in i.dirty.iter_mut() {
                d.idle = if d.inflight == 0 && d.gen == d.seen { d.idle.saturating_add(1) } else { 0 };
                if d.idle >= passes {
                    idle.push(*p);
                }
                d.seen = d.gen;
            }
            idle
        };
        if idle.is_empty() {
            return Ok(0);
        }
        let mut written = Vec::new();
        for p in &idle {
            let sums = self.table.read().get(p).cloned();
            if let Some(s) = sums {
                self.write_slot(*p, &s)?;
            }
            written.push(*p);
        }
        self.dev.sync_blocking()?;
        let mut n = 0;
        {
            let mut i = self.intent.lock();
            for p in written {
                // A write that began meanwhile keeps the extent dirty.
                if i.dirty.get(&p).is_some_and(|d| d.inflight == 0 && d.gen == d.seen) {
                    i.dirty.remove(&p);
                    n += 1;
                }
            }
        }
        self.persist_intent()?;
        Ok(n)
    }

    /// Extents whose intent bit is set in memory (for tests and status).
    pub fn dirty_extents(&self) -> usize {
        self.intent.lock().dirty.len()
    }
}
