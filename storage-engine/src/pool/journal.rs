//! The per-device metadata journal: every change to which physical extent of this device belongs
//! to which (volume, logical extent) is appended here, checksummed, and fdatasync'ed before it
//! counts. Replayed at start.
//!
//! The journal region is split in two halves. Generation `g` lives in half `g % 2`: a checkpoint
//! (the device's whole extent map) followed by record blocks. When a half is full, a checkpoint
//! of generation `g + 1` is written into the other half: body blocks first, then block 0, each
//! made durable before the next step, so a valid block 0 means a complete checkpoint.
//!
//! Block (4 KiB): magic u32, crc32c u32 (of bytes 8..4096), device uuid [16], generation u64,
//! seq u64 (block index within the half), kind u8 (1 checkpoint, 2 records), flags u8,
//! count u16, total u32 (checkpoint body blocks, in block 0), then `count` entries:
//! `1, vol u64, lext u64, pext u32` (map: the first owner of a free extent), `2, pext u32`
//! (unmap: the sole owner lets go; written by version-1 engines), `3, vol, lext, pext` (share:
//! one more owner of a mapped extent — a snapshot or clone), `4, vol, lext, pext` (release: one
//! owner lets go; the extent is free when none is left) and `5, vol u64, lext u64, from u32,
//! to u32` (move: copy-on-write gave the owner its own extent; one entry so that a crash never
//! leaves it owning both or neither).
//!
//! Corruption rules: a block with our magic and device uuid whose checksum fails, a live
//! block that is unreadable while later blocks of the same generation exist, or a lost
//! checkpoint header while records of its generation exist — all are corruption, and the
//! device is refused rather than silently rolled back.

use super::superblock::{Superblock, ENTRIES_PER_BLOCK, JOURNAL_BLOCK};
use super::PoolError;
use crate::device::{AlignedBuf, BlockIo};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use uuid::Uuid;

const MAGIC: u32 = 0x534A_4E4C; // "SJNL"
const HDR: usize = 48;
const BLOCK: usize = JOURNAL_BLOCK as usize;
const KIND_CKPT: u8 = 1;
const KIND_REC: u8 = 2;
const TAG_MAP: u8 = 1;
const TAG_UNMAP: u8 = 2;
const TAG_SHARE: u8 = 3;
const TAG_RELEASE: u8 = 4;
const TAG_MOVE: u8 = 5;
/// Entry bytes a block holds.
const PAYLOAD: usize = BLOCK - HDR;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Map { vol: u64, lext: u64, pext: u32 },
    Unmap { pext: u32 },
    Share { vol: u64, lext: u64, pext: u32 },
    Release { vol: u64, lext: u64, pext: u32 },
    Move { vol: u64, lext: u64, from: u32, to: u32 },
}

impl Entry {
    fn encoded_len(&self) -> usize {
        match self {
            Entry::Unmap { .. } => 5,
            Entry::Move { .. } => 25,
            _ => 21,
        }
    }
}

/// Splits entries into runs that each fit one block.
fn blocks(entries: &[Entry]) -> Vec<&[Entry]> {
    let mut out = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, e) in entries.iter().enumerate() {
        if used + e.encoded_len() > PAYLOAD || i - start == u16::MAX as usize {
            out.push(&entries[start..i]);
            (start, used) = (i, 0);
        }
        used += e.encoded_len();
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

/// physical extent -> its owners (volume id, logical extent); more than one when shared by
/// snapshots or clones.
pub type DeviceMap = BTreeMap<u32, Vec<(u64, u64)>>;

struct Header {
    gen: u64,
    seq: u64,
    kind: u8,
    total: u32,
}

enum Decoded {
    Valid(Header, Vec<Entry>),
    /// Our magic and uuid, bad checksum or bad entries; carries the (unverified) generation.
    Corrupt(u64),
    /// Zeroes, a stale block of another device, or garbage.
    NotOurs,
}

fn encode(dev: &Uuid, gen: u64, seq: u64, kind: u8, total: u32, entries: &[Entry], out: &mut [u8]) {
    debug_assert!(entries.iter().map(Entry::encoded_len).sum::<usize>() <= PAYLOAD);
    out.fill(0);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..24].copy_from_slice(dev.as_bytes());
    out[24..32].copy_from_slice(&gen.to_le_bytes());
    out[32..40].copy_from_slice(&seq.to_le_bytes());
    out[40] = kind;
    out[42..44].copy_from_slice(&(entries.len() as u16).to_le_bytes());
    out[44..48].copy_from_slice(&total.to_le_bytes());
    let mut p = HDR;
    for e in entries {
        let mut owner = |tag: u8, vol: u64, lext: u64, pext: u32, p: &mut usize| {
            out[*p] = tag;
            out[*p + 1..*p + 9].copy_from_slice(&vol.to_le_bytes());
            out[*p + 9..*p + 17].copy_from_slice(&lext.to_le_bytes());
            out[*p + 17..*p + 21].copy_from_slice(&pext.to_le_bytes());
            *p += 21;
        };
        match *e {
            Entry::Map { vol, lext, pext } => owner(TAG_MAP, vol, lext, pext, &mut p),
            Entry::Share { vol, lext, pext } => owner(TAG_SHARE, vol, lext, pext, &mut p),
            Entry::Release { vol, lext, pext } => owner(TAG_RELEASE, vol, lext, pext, &mut p),
            Entry::Move { vol, lext, from, to } => {
                owner(TAG_MOVE, vol, lext, from, &mut p);
                out[p..p + 4].copy_from_slice(&to.to_le_bytes());
                p += 4;
            }
            Entry::Unmap { pext } => {
                out[p] = TAG_UNMAP;
                out[p + 1..p + 5].copy_from_slice(&pext.to_le_bytes());
                p += 5;
            }
        }
    }
    let crc = crc32c::crc32c(&out[8..BLOCK]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn decode(dev: &Uuid, b: &[u8]) -> Decoded {
    let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
    let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
    if u32at(0) != MAGIC || &b[8..24] != dev.as_bytes() {
        return Decoded::NotOurs;
    }
    let gen = u64at(24);
    if u32at(4) != crc32c::crc32c(&b[8..BLOCK]) {
        return Decoded::Corrupt(gen);
    }
    let hdr = Header { gen, seq: u64at(32), kind: b[40], total: u32at(44) };
    let count = u16::from_le_bytes([b[42], b[43]]) as usize;
    let mut entries = Vec::with_capacity(count);
    let mut p = HDR;
    for _ in 0..count {
        match b.get(p) {
            Some(&tag @ (TAG_MAP | TAG_SHARE | TAG_RELEASE)) if p + 21 <= BLOCK => {
                let (vol, lext, pext) = (u64at(p + 1), u64at(p + 9), u32at(p + 17));
                entries.push(match tag {
                    TAG_MAP => Entry::Map { vol, lext, pext },
                    TAG_SHARE => Entry::Share { vol, lext, pext },
                    _ => Entry::Release { vol, lext, pext },
                });
                p += 21;
            }
            Some(&TAG_MOVE) if p + 25 <= BLOCK => {
                entries.push(Entry::Move { vol: u64at(p + 1), lext: u64at(p + 9), from: u32at(p + 17), to: u32at(p + 21) });
                p += 25;
            }
            Some(&TAG_UNMAP) if p + 5 <= BLOCK => {
                entries.push(Entry::Unmap { pext: u32at(p + 1) });
                p += 5;
            }
            _ => return Decoded::Corrupt(gen),
        }
    }
    Decoded::Valid(hdr, entries)
}

/// Applies entries to a map; an entry that contradicts the map is an inconsistency.
pub fn apply(map: &mut DeviceMap, entries: &[Entry], extent_count: u64) -> Result<(), String> {
    let first_owner = |map: &mut DeviceMap, vol: u64, lext: u64, pext: u32| {
        if pext as u64 >= extent_count {
            return Err(format!("extent {pext} is beyond the device's {extent_count} extents"));
        }
        match map.get(&pext).and_then(|o| o.first()) {
            Some(prev) => Err(format!("extent {pext} mapped twice: to volume {} extent {} and to volume {vol} extent {lext}", prev.0, prev.1)),
            None => {
                map.insert(pext, vec![(vol, lext)]);
                Ok(())
            }
        }
    };
    let release = |map: &mut DeviceMap, vol: u64, lext: u64, pext: u32| {
        let owners = map.get_mut(&pext).ok_or_else(|| format!("extent {pext} freed while not mapped"))?;
        let at = owners
            .iter()
            .position(|o| *o == (vol, lext))
            .ok_or_else(|| format!("extent {pext} released by volume {vol} extent {lext}, which does not own it"))?;
        owners.swap_remove(at);
        if owners.is_empty() {
            map.remove(&pext);
        }
        Ok::<(), String>(())
    };
    for e in entries {
        match *e {
            Entry::Map { vol, lext, pext } => first_owner(map, vol, lext, pext)?,
            Entry::Unmap { pext } => match map.remove(&pext) {
                Some(o) if o.len() == 1 => {}
                Some(o) => return Err(format!("extent {pext} unmapped while {} volumes share it", o.len())),
                None => return Err(format!("extent {pext} freed while not mapped")),
            },
            Entry::Share { vol, lext, pext } => {
                let owners = map.get_mut(&pext).ok_or_else(|| format!("extent {pext} shared while not mapped"))?;
                if owners.contains(&(vol, lext)) {
                    return Err(format!("extent {pext} shared twice with volume {vol} extent {lext}"));
                }
                owners.push((vol, lext));
            }
            Entry::Release { vol, lext, pext } => release(map, vol, lext, pext)?,
            Entry::Move { vol, lext, from, to } => {
                release(map, vol, lext, from)?;
                first_owner(map, vol, lext, to)?;
            }
        }
    }
    Ok(())
}

struct Writer {
    gen: u64,
    next_seq: u64,
    map: DeviceMap,
    block: AlignedBuf,
}

struct Pending {
    entries: Vec<Entry>,
    last_ticket: u64,
}

pub struct Journal {
    dev: Arc<dyn BlockIo>,
    uuid: Uuid,
    offset: u64,
    half_blocks: u64,
    extent_count: u64,
    writer: Mutex<Writer>,
    pending: Mutex<Pending>,
    committed: AtomicU64,
    poisoned: AtomicBool,
}

impl Journal {
    fn new(dev: Arc<dyn BlockIo>, sb: &Superblock, gen: u64, next_seq: u64, map: DeviceMap) -> Journal {
        Journal {
            dev,
            uuid: sb.device_uuid,
            offset: sb.journal_offset,
            half_blocks: sb.journal_len / 2 / JOURNAL_BLOCK,
            extent_count: sb.extent_count,
            writer: Mutex::new(Writer { gen, next_seq, map, block: AlignedBuf::new(BLOCK) }),
            pending: Mutex::new(Pending { entries: Vec::new(), last_ticket: 0 }),
            committed: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    fn half_offset(&self, gen: u64) -> u64 {
        self.offset + (gen % 2) * self.half_blocks * JOURNAL_BLOCK
    }

    /// Writes an empty journal (generation 1) on a freshly formatted device.
    pub fn format(dev: Arc<dyn BlockIo>, sb: &Superblock) -> Result<Journal, PoolError> {
        let zero = AlignedBuf::new(sb.journal_len as usize);
        dev.write_blocking(sb.journal_offset, &zero).map_err(PoolError::io("zeroing the journal"))?;
        let j = Journal::new(dev, sb, 0, 0, DeviceMap::new());
        let mut w = j.writer.lock();
        j.checkpoint(&mut w, 1)?;
        drop(w);
        Ok(j)
    }

    /// Replays the journal. Returns the journal ready for appends and the device's extent map.
    pub fn open(dev: Arc<dyn BlockIo>, sb: &Superblock) -> Result<(Journal, DeviceMap), String> {
        let (half, halves) = read_halves(dev.as_ref(), sb)?;
        let uuid = sb.device_uuid;
        let block = |h: usize, k: usize| &halves[h][k * BLOCK..(k + 1) * BLOCK];
        let mut best: Option<(u64, u32)> = None;
        let mut corrupt_heads = Vec::new();
        for h in 0..2 {
            match decode(&uuid, block(h, 0)) {
                Decoded::Valid(hd, _) if hd.kind == KIND_CKPT && hd.seq == 0 && hd.gen % 2 == h as u64 && best.is_none_or(|(g, _)| hd.gen > g) => {
                    best = Some((hd.gen, hd.total));
                }
                Decoded::Corrupt(g) => corrupt_heads.push(g),
                _ => {}
            }
        }
        let Some((gen, total)) = best else {
            return Err("journal has no valid checkpoint (checksum mismatch or overwritten)".into());
        };
        if let Some(g) = corrupt_heads.iter().find(|g| **g > gen) {
            return Err(format!("journal checkpoint of generation {g} is corrupted (checksum mismatch)"));
        }
        let h = (gen % 2) as usize;
        let blocks = half / BLOCK;
        // A later generation's records without its checkpoint header means the header was lost.
        for k in 1..blocks {
            if let Decoded::Valid(hd, _) = decode(&uuid, block(1 - h, k)) {
                if hd.gen == gen + 1 {
                    return Err(format!("journal checkpoint of generation {} is missing but its blocks exist", gen + 1));
                }
            }
        }
        // Whether any block of this generation (valid or not) follows block `k`.
        let any_after = |k: usize| {
            (k + 1..blocks).any(|l| {
                matches!(decode(&uuid, block(h, l)), Decoded::Valid(hd, _) if hd.gen == gen)
                    || matches!(decode(&uuid, block(h, l)), Decoded::Corrupt(g) if g == gen)
            })
        };
        let mut map = DeviceMap::new();
        let mut k = 1usize;
        while k < blocks {
            let want_kind = if k <= total as usize { KIND_CKPT } else { KIND_REC };
            match decode(&uuid, block(h, k)) {
                Decoded::Valid(hd, entries) if hd.gen == gen && hd.seq == k as u64 && hd.kind == want_kind => {
                    apply(&mut map, &entries, sb.extent_count).map_err(|e| format!("journal block {k} of generation {gen}: {e}"))?;
                }
                // The last record block torn by a crash (power loss mid-write): its batch was never
                // synced, so never acknowledged; the log ends before it, as write-ahead logs do.
                Decoded::Corrupt(g) if g == gen && k > total as usize && !any_after(k) => {
                    tracing::warn!(
                        block = k,
                        generation = gen,
                        device = %sb.device_uuid,
                        "journal: the last block fails its checksum: a write cut off by a crash (its batch was never acknowledged), so the log is truncated before it; if the node did not crash, the mappings of that last batch are lost: run `strata-engine check`"
                    );
                    break;
                }
                Decoded::Corrupt(g) if g == gen => {
                    return Err(format!(
                        "journal block {k} of generation {gen} (byte {} of the device) is corrupted (checksum mismatch) with records after it: the extent mappings in it and after it would be lost; run `strata-engine check` and restore this device's replicas from another node",
                        sb.journal_offset + (h * half + k * BLOCK) as u64
                    ));
                }
                _ if k <= total as usize => {
                    return Err(format!("journal checkpoint block {k} of generation {gen} is missing or corrupted"));
                }
                _ => break,
            }
            k += 1;
        }
        for later in k + 1..blocks {
            match decode(&uuid, block(h, later)) {
                Decoded::Valid(hd, _) if hd.gen == gen => {
                    return Err(format!(
                        "journal block {k} of generation {gen} is unreadable but block {later} after it is valid: the log is corrupted"
                    ))
                }
                Decoded::Corrupt(g) if g == gen => return Err(format!("journal block {later} of generation {gen} is corrupted (checksum mismatch)")),
                _ => {}
            }
        }
        let j = Journal::new(dev, sb, gen, k as u64, map.clone());
        Ok((j, map))
    }

    /// `check --repair` of a journal that `open` refuses: keeps every mapping that a readable
    /// block of the newest generation with a valid checkpoint header still holds, skipping the
    /// damaged blocks (and any whose entries contradict the rest), and writes the result as a
    /// new checkpoint. Returns the journal and what was lost; the mappings of the skipped blocks
    /// are gone, so the device's replicas must be rebuilt from other nodes.
    pub fn salvage(dev: Arc<dyn BlockIo>, sb: &Superblock) -> Result<(Journal, Vec<String>), String> {
        let (half, halves) = read_halves(dev.as_ref(), sb)?;
        let uuid = sb.device_uuid;
        let block = |h: usize, k: usize| &halves[h][k * BLOCK..(k + 1) * BLOCK];
        let best = (0..2)
            .filter_map(|h| match decode(&uuid, block(h, 0)) {
                Decoded::Valid(hd, _) if hd.kind == KIND_CKPT && hd.seq == 0 && hd.gen % 2 == h as u64 => Some((hd.gen, hd.total)),
                _ => None,
            })
            .max();
        let Some((gen, total)) = best else {
            return Err("journal has no valid checkpoint header in either half: nothing to salvage".into());
        };
        let h = (gen % 2) as usize;
        let mut map = DeviceMap::new();
        let mut lost = Vec::new();
        for k in 1..half / BLOCK {
            let what = if k <= total as usize { "checkpoint" } else { "record" };
            match decode(&uuid, block(h, k)) {
                Decoded::Valid(hd, entries) if hd.gen == gen && hd.seq == k as u64 => {
                    let mut next = map.clone();
                    match apply(&mut next, &entries, sb.extent_count) {
                        Ok(()) => map = next,
                        Err(e) => lost.push(format!("{what} block {k} ({} mapping(s)) contradicts the others: {e}", entries.len())),
                    }
                }
                Decoded::Corrupt(g) if g == gen => lost.push(format!("{what} block {k} fails its checksum: its mappings are lost")),
                _ if k <= total as usize => lost.push(format!("checkpoint block {k} is missing: its mappings are lost")),
                _ => {}
            }
        }
        let j = Journal::new(dev, sb, gen, 1, map);
        let mut w = j.writer.lock();
        j.checkpoint(&mut w, gen + 1).map_err(|e| format!("writing the salvaged map: {e}"))?;
        drop(w);
        Ok((j, lost))
    }

    /// Makes `entries` durable (group commit: one writer at a time takes everything pending).
    pub fn commit(&self, entries: &[Entry]) -> Result<(), PoolError> {
        if entries.is_empty() {
            return Ok(());
        }
        let ticket = {
            let mut p = self.pending.lock();
            p.entries.extend_from_slice(entries);
            p.last_ticket += 1;
            p.last_ticket
        };
        let mut w = self.writer.lock();
        if self.poisoned.load(Ordering::Acquire) {
            return Err(PoolError::JournalFailed);
        }
        if self.committed.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let (batch, upto) = {
            let mut p = self.pending.lock();
            (std::mem::take(&mut p.entries), p.last_ticket)
        };
        let res = self
            .write_batch(&mut w, &batch)
            .and_then(|_| crate::failpoint::point_blocking("journal.after_write").map_err(|e| PoolError::io("writing the journal")(e.into())));
        match res {
            Ok(()) => {
                self.committed.store(upto, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                self.poisoned.store(true, Ordering::Release);
                tracing::error!("journal write failed, the pool refuses further metadata changes: {e}");
                Err(e)
            }
        }
    }

    fn write_batch(&self, w: &mut Writer, batch: &[Entry]) -> Result<(), PoolError> {
        apply(&mut w.map, batch, self.extent_count).map_err(PoolError::Inconsistent)?;
        let chunks = blocks(batch);
        if w.next_seq + chunks.len() as u64 > self.half_blocks {
            return self.checkpoint(w, w.gen + 1);
        }
        let base = self.half_offset(w.gen);
        for chunk in chunks {
            let (gen, seq) = (w.gen, w.next_seq);
            encode(&self.uuid, gen, seq, KIND_REC, 0, chunk, &mut w.block);
            self.dev.write_blocking(base + seq * JOURNAL_BLOCK, &w.block).map_err(PoolError::io("writing the journal"))?;
            w.next_seq += 1;
        }
        self.dev.sync_blocking().map_err(PoolError::io("syncing the journal"))
    }

    /// Writes the whole map as generation `gen`: body, sync, header, sync.
    fn checkpoint(&self, w: &mut Writer, gen: u64) -> Result<(), PoolError> {
        let all: Vec<Entry> = w
            .map
            .iter()
            .flat_map(|(p, owners)| {
                owners.iter().enumerate().map(|(i, (v, l))| {
                    if i == 0 {
                        Entry::Map { vol: *v, lext: *l, pext: *p }
                    } else {
                        Entry::Share { vol: *v, lext: *l, pext: *p }
                    }
                })
            })
            .collect();
        let chunks = blocks(&all);
        let n = chunks.len();
        if n as u64 + 1 >= self.half_blocks {
            return Err(PoolError::Inconsistent(format!("checkpoint of {n} blocks does not fit the journal")));
        }
        let base = self.half_offset(gen);
        if n > 0 {
            let mut body = AlignedBuf::new(n * BLOCK);
            for (i, c) in chunks.iter().enumerate() {
                encode(&self.uuid, gen, i as u64 + 1, KIND_CKPT, 0, c, &mut body[i * BLOCK..(i + 1) * BLOCK]);
            }
            self.dev.write_blocking(base + JOURNAL_BLOCK, &body).map_err(PoolError::io("writing a checkpoint"))?;
            self.dev.sync_blocking().map_err(PoolError::io("syncing a checkpoint"))?;
        }
        encode(&self.uuid, gen, 0, KIND_CKPT, n as u32, &[], &mut w.block);
        self.dev.write_blocking(base, &w.block).map_err(PoolError::io("writing a checkpoint header"))?;
        self.dev.sync_blocking().map_err(PoolError::io("syncing a checkpoint header"))?;
        w.gen = gen;
        w.next_seq = n as u64 + 1;
        Ok(())
    }

    /// Whether a journal write failed (the pool refuses metadata changes until a restart).
    pub fn failed(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// The device's extent map as the journal has it.
    pub fn map_snapshot(&self) -> DeviceMap {
        self.writer.lock().map.clone()
    }

    pub fn generation(&self) -> u64 {
        self.writer.lock().gen
    }

    /// Owner entries a checkpoint may hold while leaving half of its half for records: the
    /// bound on shared references (snapshots, clones) on this device.
    pub fn max_owners(&self) -> u64 {
        self.half_blocks / 2 * ENTRIES_PER_BLOCK
    }
}

/// Both halves of the journal region, and a half's length in bytes.
fn read_halves(dev: &dyn BlockIo, sb: &Superblock) -> Result<(usize, [AlignedBuf; 2]), String> {
    let half = (sb.journal_len / 2) as usize;
    let mut halves = [AlignedBuf::new(half), AlignedBuf::new(half)];
    for (i, h) in halves.iter_mut().enumerate() {
        dev.read_blocking(sb.journal_offset + i as u64 * half as u64, h).map_err(|e| format!("reading the journal: {e}"))?;
    }
    Ok((half, halves))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{FileDevice, IoEngine, OpenOptions};

    fn dev(dir: &std::path::Path, name: &str) -> (Arc<dyn BlockIo>, Superblock) {
        let opts = OpenOptions { create_size: Some(64 << 20), io_engine: IoEngine::Sync, read_only: false, lock_wait: Default::default() };
        let d = FileDevice::open(&dir.join(name), &opts).unwrap();
        let sb = Superblock::layout(Uuid::new_v4(), 64 << 20, 1 << 20).unwrap();
        (Arc::new(d), sb)
    }

    #[test]
    fn replay_returns_committed_entries_across_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let (d, sb) = dev(dir.path(), "a");
        let j = Journal::format(d.clone(), &sb).unwrap();
        let half = sb.journal_len / 2 / JOURNAL_BLOCK;
        // Enough single-entry commits to wrap the halves several times.
        let mut expect = DeviceMap::new();
        for i in 0..(half * 3) {
            let pext = (i % sb.extent_count) as u32;
            if let std::collections::btree_map::Entry::Vacant(e) = expect.entry(pext) {
                j.commit(&[Entry::Map { vol: 7, lext: i, pext }]).unwrap();
                e.insert(vec![(7, i)]);
            } else if i % 3 == 0 {
                // A snapshot's owner comes and goes; the extent stays with volume 7.
                j.commit(&[Entry::Share { vol: 8, lext: i, pext }]).unwrap();
                j.commit(&[Entry::Release { vol: 8, lext: i, pext }]).unwrap();
                let lext = expect[&pext][0].1;
                j.commit(&[Entry::Release { vol: 7, lext, pext }]).unwrap();
                expect.remove(&pext);
            } else {
                j.commit(&[Entry::Unmap { pext }]).unwrap();
                expect.remove(&pext);
            }
        }
        assert!(j.generation() >= 3, "halves were switched");
        drop(j);
        let (_, map) = Journal::open(d, &sb).unwrap();
        assert_eq!(map, expect);
    }

    /// A journal with three single-entry record blocks (1, 2, 3) in generation 1 (half 1).
    fn three_records(dir: &std::path::Path) -> (Arc<dyn BlockIo>, Superblock) {
        let (d, sb) = dev(dir, "a");
        let j = Journal::format(d.clone(), &sb).unwrap();
        for p in 0..3 {
            j.commit(&[Entry::Map { vol: 1, lext: p as u64, pext: p }]).unwrap();
        }
        (d, sb)
    }

    /// Changes record block `k` of generation 1 (half 1) on the device with `f`.
    fn damage(d: &Arc<dyn BlockIo>, sb: &Superblock, k: u64, f: impl FnOnce(&mut [u8])) {
        let at = sb.journal_offset + sb.journal_len / 2 + k * JOURNAL_BLOCK;
        let mut b = AlignedBuf::new(BLOCK);
        d.read_blocking(at, &mut b).unwrap();
        f(&mut b);
        d.write_blocking(at, &b).unwrap();
    }

    #[test]
    fn a_flipped_byte_in_a_live_block_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (d, sb) = three_records(dir.path());
        // Generation 1 lives in half 1; its records are blocks 1.. (empty checkpoint body).
        let rec = sb.journal_offset + sb.journal_len / 2 + 2 * JOURNAL_BLOCK;
        for at in [rec + 60, rec] {
            let mut b = AlignedBuf::new(BLOCK);
            d.read_blocking(rec, &mut b).unwrap();
            b[(at - rec) as usize] ^= 0x40;
            d.write_blocking(rec, &b).unwrap();
            let err = Journal::open(d.clone(), &sb).err().expect("corruption detected");
            assert!(err.contains("corrupted"), "{err}");
            b[(at - rec) as usize] ^= 0x40;
            d.write_blocking(rec, &b).unwrap();
        }
        assert_eq!(Journal::open(d, &sb).unwrap().1.len(), 3);
    }

    #[test]
    fn a_torn_last_block_is_truncated_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (d, sb) = three_records(dir.path());
        // Power loss tore the last record block (3): only part of its 4 KiB reached the disk.
        damage(&d, &sb, 3, |b| {
            b[2048..].fill(0);
            b[100] ^= 0x01;
        });
        let (j, map) = Journal::open(d.clone(), &sb).expect("a torn tail does not take the pool offline");
        assert_eq!(map.len(), 2, "the torn batch (never acknowledged) is dropped, the others kept");
        assert!(!map.contains_key(&2));
        // The log goes on from there, and replays.
        j.commit(&[Entry::Map { vol: 1, lext: 9, pext: 9 }]).unwrap();
        drop(j);
        let map = Journal::open(d, &sb).unwrap().1;
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), vec![0, 1, 9]);
    }

    #[test]
    fn salvage_keeps_the_readable_blocks_around_a_damaged_one() {
        let dir = tempfile::tempdir().unwrap();
        let (d, sb) = three_records(dir.path());
        damage(&d, &sb, 2, |b| b[200] ^= 0x08);
        assert!(Journal::open(d.clone(), &sb).is_err(), "open refuses damage in the middle");
        let (_, lost) = Journal::salvage(d.clone(), &sb).unwrap();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("record block 2"), "{lost:?}");
        // The salvaged map is a new checkpoint: the journal opens, with blocks 1 and 3's mappings.
        let map = Journal::open(d, &sb).unwrap().1;
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), vec![0, 2]);
    }

    #[test]
    fn shared_owners_and_moves_survive_a_checkpoint_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (d, sb) = dev(dir.path(), "a");
        let j = Journal::format(d.clone(), &sb).unwrap();
        j.commit(&[Entry::Map { vol: 1, lext: 0, pext: 0 }, Entry::Map { vol: 1, lext: 1, pext: 1 }]).unwrap();
        j.commit(&[Entry::Share { vol: 2, lext: 0, pext: 0 }, Entry::Share { vol: 2, lext: 1, pext: 1 }, Entry::Share { vol: 3, lext: 1, pext: 1 }])
            .unwrap();
        // Copy-on-write of volume 1's extent 1 to extent 5.
        j.commit(&[Entry::Move { vol: 1, lext: 1, from: 1, to: 5 }]).unwrap();
        let mut expect = DeviceMap::new();
        expect.insert(0, vec![(1, 0), (2, 0)]);
        expect.insert(1, vec![(3, 1), (2, 1)]);
        expect.insert(5, vec![(1, 1)]);
        let mut got = Journal::open(d.clone(), &sb).unwrap().1;
        got.values_mut().for_each(|o| o.sort());
        expect.values_mut().for_each(|o| o.sort());
        assert_eq!(got, expect);
        // A checkpoint writes shared owners as map + share entries.
        let mut w = j.writer.lock();
        let next = w.gen + 1;
        j.checkpoint(&mut w, next).unwrap();
        drop(w);
        let mut again = Journal::open(d, &sb).unwrap().1;
        again.values_mut().for_each(|o| o.sort());
        assert_eq!(again, expect);
    }

    #[test]
    fn large_batches_of_long_entries_split_into_blocks_that_fit() {
        let e: Vec<Entry> = (0..1000).map(|i| Entry::Move { vol: 1, lext: i, from: i as u32, to: i as u32 + 1 }).collect();
        let b = blocks(&e);
        assert_eq!(b.iter().map(|c| c.len()).sum::<usize>(), 1000);
        assert!(b.iter().all(|c| c.iter().map(Entry::encoded_len).sum::<usize>() <= PAYLOAD));
        assert_eq!(b[0].len(), PAYLOAD / 25);
    }

    #[test]
    fn contradicting_entries_are_inconsistent() {
        let mut m = DeviceMap::new();
        apply(&mut m, &[Entry::Map { vol: 1, lext: 0, pext: 3 }], 10).unwrap();
        assert!(apply(&mut m, &[Entry::Map { vol: 2, lext: 0, pext: 3 }], 10).unwrap_err().contains("twice"));
        assert!(apply(&mut m, &[Entry::Unmap { pext: 4 }], 10).unwrap_err().contains("not mapped"));
        assert!(apply(&mut m, &[Entry::Map { vol: 2, lext: 0, pext: 10 }], 10).unwrap_err().contains("beyond"));
        assert!(apply(&mut m, &[Entry::Release { vol: 2, lext: 0, pext: 3 }], 10).unwrap_err().contains("does not own"));
        assert!(apply(&mut m, &[Entry::Share { vol: 2, lext: 0, pext: 4 }], 10).unwrap_err().contains("not mapped"));
        apply(&mut m, &[Entry::Share { vol: 2, lext: 0, pext: 3 }], 10).unwrap();
        assert!(apply(&mut m, &[Entry::Unmap { pext: 3 }], 10).unwrap_err().contains("share it"));
    }
}
