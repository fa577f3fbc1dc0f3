//! One pool per node over one or more devices: superblocks, per-device journals, the extent
//! allocator (extents spread across devices) and the (volume, logical extent) -> physical
//! extent map. Thin: an extent is allocated, zeroed and journaled on its first write.
//!
//! Snapshots and clones share extents: `share` gives a new owner every extent of a volume at
//! once; an extent with several owners is copied (on its own device) before a write changes
//! it (`allocate`), and it is free once its last owner released it.

pub mod check;
mod crc;
pub mod csum;
pub mod journal;
pub mod superblock;

use crate::device::{AlignedBuf, BlockIo};
use journal::{Entry, Journal};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::Arc;
use superblock::{Probe, Superblock, PROBE_LEN};
use uuid::Uuid;

pub const DEFAULT_EXTENT_SIZE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{what}: {source}")]
    Io { what: &'static str, source: io::Error },
    #[error("device of {size} bytes is too small: a pool device needs at least {min} bytes")]
    TooSmall { size: u64, min: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error("device {device}: {why}; refusing to start and leaving the device untouched")]
    Corrupt { device: String, why: String },
    #[error("device {device} holds {what}; refusing to format it (pass --force-format to overwrite)")]
    Foreign { device: String, what: &'static str },
    #[error("device {device} belongs to another Strata pool ({pool}); refusing to format it (pass --force-format to overwrite)")]
    OtherPool { device: String, pool: Uuid },
    #[error("device {device} ({uuid}) of pool {pool} was not given; pass every device of the pool with --device")]
    MissingDevice { device: String, uuid: Uuid, pool: Uuid },
    #[error("device {device} is not a Strata pool device")]
    NotFormatted { device: String },
    #[error("pool metadata is inconsistent: {0}")]
    Inconsistent(String),
    #[error("the pool's journal failed earlier; metadata changes are refused until the engine restarts")]
    JournalFailed,
    #[error("the pool is full: no free extent on any device")]
    NoSpace,
    #[error("device {device} has no free extent for a copy-on-write of a shared extent; free space or delete snapshots")]
    NoSpaceForCopy { device: String },
    #[error(
        "device {device} cannot record {more} more shared extents (it holds {have} of at most {max} extent references); delete snapshots or clones"
    )]
    TooManyReferences { device: String, have: u64, more: u64, max: u64 },
}

impl PoolError {
    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> PoolError {
        move |source| PoolError::Io { what, source }
    }
}

/// A physical extent: device index in the pool and extent number on that device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PExt {
    pub dev: u16,
    pub pext: u32,
}

pub struct PoolDevice {
    pub path: String,
    pub dev: Arc<dyn BlockIo>,
    pub sb: Superblock,
    journal: Journal,
    /// Block checksums (version-2 devices).
    sums: Option<csum::DeviceSums>,
    /// Data reads and writes the device failed (not checksum mismatches).
    io_errors: std::sync::atomic::AtomicU64,
}

impl PoolDevice {
    /// A data read or write on this device failed.
    pub fn note_io_error(&self) {
        self.io_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn io_errors(&self) -> u64 {
        self.io_errors.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Failed: its journal could not be written, or it failed data I/O.
    pub fn failed(&self) -> bool {
        self.journal.failed() || self.io_errors() > 0
    }
}

/// Most devices one pool holds (flushes track the devices a request touched in a 64-bit mask).
pub const MAX_DEVICES: usize = 64;

/// The pool's devices, indexed as `PExt::dev`: appended to while the pool is in use (drive
/// add), never removed or moved, so a device's index and address stay fixed.
pub struct Devices {
    slots: Box<[std::sync::OnceLock<PoolDevice>]>,
    len: std::sync::atomic::AtomicUsize,
}

impl Devices {
    fn new(devs: Vec<PoolDevice>) -> Devices {
        let slots: Box<[std::sync::OnceLock<PoolDevice>]> = (0..MAX_DEVICES).map(|_| std::sync::OnceLock::new()).collect();
        let len = devs.len();
        for (slot, d) in slots.iter().zip(devs) {
            let _ = slot.set(d);
        }
        Devices { slots, len: std::sync::atomic::AtomicUsize::new(len) }
    }

    pub fn len(&self) -> usize {
        self.len.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &PoolDevice> {
        self.slots[..self.len()].iter().map(|s| s.get().expect("a device below len"))
    }

    /// Appends a device (the caller serialises appends); its index.
    fn push(&self, d: PoolDevice) -> Result<usize, PoolError> {
        let i = self.len();
        let slot = self.slots.get(i).ok_or_else(|| PoolError::Invalid(format!("a pool holds at most {MAX_DEVICES} devices")))?;
        if slot.set(d).is_err() {
            return Err(PoolError::Invalid("a device was added concurrently".into()));
        }
        self.len.store(i + 1, std::sync::atomic::Ordering::Release);
        Ok(i)
    }
}

impl std::ops::Index<usize> for Devices {
    type Output = PoolDevice;
    fn index(&self, i: usize) -> &PoolDevice {
        assert!(i < self.len(), "device {i} of {}", self.len());
        self.slots[i].get().expect("a device below len")
    }
}

impl<'a> IntoIterator for &'a Devices {
    type Item = &'a PoolDevice;
    type IntoIter = Box<dyn Iterator<Item = &'a PoolDevice> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

/// What the metadata store remembers of the pool, to notice a missing device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PoolRecord {
    pub uuid: Uuid,
    pub extent_size: u64,
    pub devices: Vec<(Uuid, String)>,
    /// Devices added while the engine ran (drive add): the engine opens them from here at
    /// start; the others must be given with --device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added: Vec<Uuid>,
}

#[derive(Debug, Clone)]
pub struct OpenSpec {
    pub expected: Option<PoolRecord>,
    pub force_format: bool,
    pub extent_size: u64,
    /// Offline check: never format or write.
    pub check_only: bool,
}

struct Alloc {
    free: Vec<BTreeSet<u32>>,
    cursor: usize,
    /// (volume, logical extent)s being given a new extent right now (zeroed and journalled
    /// outside the lock); another caller for the same one waits on `Pool::allocated`.
    pending: std::collections::HashSet<(u64, u64)>,
}

/// Extent ownership in memory.
#[derive(Default)]
struct Maps {
    /// (volume, logical extent) -> physical extent.
    map: HashMap<(u64, u64), PExt>,
    /// Physical extents with more than one owner -> their owners.
    shared: HashMap<PExt, Vec<(u64, u64)>>,
    /// Owner entries per device (bounded by the journal's checkpoint room).
    owners: Vec<u64>,
    /// (volume, logical extent)s whose shared extent is being copied: not writable in place
    /// even if its other owners go meanwhile (the write would land in the extent left behind).
    copying: std::collections::HashSet<(u64, u64)>,
}

impl Maps {
    fn is_shared(&self, p: PExt) -> bool {
        !self.shared.is_empty() && self.shared.contains_key(&p)
    }

    /// Takes `owner` off the shared extent `p`; true when `p` had no other owner.
    fn release(&mut self, p: PExt, owner: (u64, u64)) -> bool {
        match self.shared.get_mut(&p) {
            Some(o) => {
                o.retain(|x| *x != owner);
                if o.len() <= 1 {
                    self.shared.remove(&p);
                }
                false
            }
            None => true,
        }
    }
}

pub struct Pool {
    pub uuid: Uuid,
    pub extent_size: u64,
    devices: Devices,
    maps: RwLock<Maps>,
    /// Extents mapped per volume (kept beside `map` so usage needs no scan).
    per_volume: Mutex<HashMap<u64, u64>>,
    /// Extents whose intent bit was set at open (a crash left their checksums unsettled): their
    /// checksums were recomputed from their data.
    pub unsettled_at_open: usize,
    alloc: Mutex<Alloc>,
    /// Signalled when a pending allocation ends.
    allocated: parking_lot::Condvar,
    /// Devices added while running (kept in the record).
    added: Mutex<Vec<Uuid>>,
}

impl Pool {
    /// Imports known devices, formats new ones (refusing foreign or corrupted ones unless forced).
    pub fn open(devs: Vec<(String, Arc<dyn BlockIo>)>, spec: &OpenSpec) -> Result<Pool, PoolError> {
        if devs.is_empty() {
            return Err(PoolError::Invalid("a pool needs at least one device (--device PATH)".into()));
        }
        let mut probes = Vec::new();
        for (path, dev) in &devs {
            let len = (PROBE_LEN.next_multiple_of(4096) as u64).min(dev.size() / 4096 * 4096) as usize;
            let mut head = AlignedBuf::new(len);
            dev.read_blocking(0, &mut head)
                .map_err(|e| PoolError::Corrupt { device: path.clone(), why: format!("cannot read the superblock: {e}") })?;
            let probe = match Superblock::probe(&head) {
                // The primary copy is damaged: the backup in the last 4 KiB may be good.
                Probe::Corrupt(why) => match read_backup(dev.as_ref()) {
                    Some(sb) => {
                        if spec.check_only {
                            tracing::warn!(device = %path, "the primary superblock is corrupted ({why}); the backup copy is good");
                        } else {
                            tracing::warn!(device = %path, "the primary superblock is corrupted ({why}); rewritten from the backup copy");
                            write_superblock(dev.as_ref(), &sb, 0)?;
                        }
                        Probe::Strata(sb)
                    }
                    None => Probe::Corrupt(why),
                },
                p => p,
            };
            probes.push(probe);
        }
        let pool_uuid = spec
            .expected
            .as_ref()
            .map(|r| r.uuid)
            .or_else(|| probes.iter().find_map(|p| if let Probe::Strata(sb) = p { Some(sb.pool_uuid) } else { None }))
            .unwrap_or_else(Uuid::new_v4);
        let extent_size = spec
            .expected
            .as_ref()
            .map(|r| r.extent_size)
            .or_else(|| probes.iter().find_map(|p| if let Probe::Strata(sb) = p { Some(sb.extent_size) } else { None }))
            .unwrap_or(spec.extent_size);

        let mut devices = Vec::new();
        for ((path, dev), probe) in devs.into_iter().zip(probes) {
            let may_format = spec.force_format && !spec.check_only;
            let pd = match probe {
                Probe::Strata(sb) if sb.pool_uuid == pool_uuid => {
                    if sb.extent_size != extent_size {
                        return Err(PoolError::Corrupt {
                            device: path,
                            why: format!("extent size {} differs from the pool's {extent_size}", sb.extent_size),
                        });
                    }
                    let (journal, _) = Journal::open(dev.clone(), &sb).map_err(|why| PoolError::Corrupt { device: path.clone(), why })?;
                    // Keep the backup copy current (older pools get one where their last
                    // extent leaves room).
                    if !spec.check_only && sb.has_backup_room() && read_backup(dev.as_ref()).as_ref() != Some(&sb) {
                        write_superblock(dev.as_ref(), &sb, superblock::backup_offset(sb.device_size))?;
                    }
                    PoolDevice { path, dev, sb, journal, sums: None, io_errors: Default::default() }
                }
                _ if may_format => format_device(path, dev, pool_uuid, extent_size)?,
                Probe::Strata(sb) => return Err(PoolError::OtherPool { device: path, pool: sb.pool_uuid }),
                Probe::Corrupt(why) => return Err(PoolError::Corrupt { device: path, why }),
                Probe::Foreign(what) => return Err(PoolError::Foreign { device: path, what }),
                Probe::Blank if spec.check_only => return Err(PoolError::NotFormatted { device: path }),
                Probe::Blank => format_device(path, dev, pool_uuid, extent_size)?,
            };
            if devices.iter().any(|d: &PoolDevice| d.sb.device_uuid == pd.sb.device_uuid) {
                return Err(PoolError::Invalid(format!("device {} was given twice", pd.path)));
            }
            devices.push(pd);
        }
        if let Some(rec) = &spec.expected {
            for (uuid, path) in &rec.devices {
                if !devices.iter().any(|d| d.sb.device_uuid == *uuid) {
                    return Err(PoolError::MissingDevice { device: path.clone(), uuid: *uuid, pool: rec.uuid });
                }
            }
        }
        if devices.len() > MAX_DEVICES {
            return Err(PoolError::Invalid(format!("{} devices given: a pool holds at most {MAX_DEVICES}", devices.len())));
        }

        let mut maps = Maps::default();
        let mut free = Vec::new();
        let mut unsettled_at_open = 0;
        for (i, d) in devices.iter_mut().enumerate() {
            let dm = d.journal_map();
            if d.sb.has_checksums() {
                let mapped: Vec<u32> = dm.keys().copied().collect();
                let (sums, report) = csum::DeviceSums::load(d.dev.clone(), &d.sb, &mapped, spec.check_only)
                    .map_err(|why| PoolError::Corrupt { device: d.path.clone(), why })?;
                unsettled_at_open += report.recomputed as usize;
                if report.recomputed > 0 {
                    tracing::info!(device = %d.path, extents = report.recomputed, "recomputed the checksums of extents written before an unclean stop");
                }
                d.sums = Some(sums);
            } else {
                tracing::warn!(device = %d.path, "device was formatted by an older engine (superblock version 1): its blocks have no checksums");
            }
            let mut f: BTreeSet<u32> = (0..d.sb.extent_count as u32).collect();
            let mut owners = 0;
            for (pext, who) in dm {
                f.remove(&pext);
                let p = PExt { dev: i as u16, pext };
                for (vol, lext) in &who {
                    if let Some(prev) = maps.map.insert((*vol, *lext), p) {
                        return Err(PoolError::Inconsistent(format!(
                            "volume {vol} extent {lext} is mapped twice: device {}:{} and {}:{}",
                            prev.dev, prev.pext, d.path, pext
                        )));
                    }
                }
                owners += who.len() as u64;
                if who.len() > 1 {
                    maps.shared.insert(p, who);
                }
            }
            maps.owners.push(owners);
            free.push(f);
        }
        let mut per_volume = HashMap::new();
        for (vol, _) in maps.map.keys() {
            *per_volume.entry(*vol).or_insert(0u64) += 1;
        }
        Ok(Pool {
            uuid: pool_uuid,
            extent_size,
            devices: Devices::new(devices),
            maps: RwLock::new(maps),
            per_volume: Mutex::new(per_volume),
            alloc: Mutex::new(Alloc { free, cursor: 0, pending: Default::default() }),
            allocated: parking_lot::Condvar::new(),
            unsettled_at_open,
            added: Mutex::new(spec.expected.as_ref().map(|r| r.added.clone()).unwrap_or_default()),
        })
    }

    /// Adds a device to the pool while it is in use (drive add): it must be blank (no Strata
    /// superblock, filesystem or partition table), and is formatted into this pool; new extents
    /// spread onto it at once. Blocking. Returns its index. The caller records the pool again
    /// (`record`), so the device is expected at the next start.
    pub fn add_device(&self, path: String, dev: Arc<dyn BlockIo>) -> Result<usize, PoolError> {
        let mut a = self.alloc.lock();
        if self.devices.iter().any(|d| d.path == path) {
            return Err(PoolError::Invalid(format!("device {path} is already in this pool")));
        }
        if self.devices.len() >= MAX_DEVICES {
            return Err(PoolError::Invalid(format!("the pool already has {MAX_DEVICES} devices, the most it can hold")));
        }
        let len = (PROBE_LEN.next_multiple_of(4096) as u64).min(dev.size() / 4096 * 4096) as usize;
        let mut head = AlignedBuf::new(len);
        dev.read_blocking(0, &mut head).map_err(|e| PoolError::Corrupt { device: path.clone(), why: format!("cannot read its head: {e}") })?;
        match Superblock::probe(&head) {
            Probe::Blank => {}
            Probe::Strata(sb) if sb.pool_uuid == self.uuid => return Err(PoolError::Invalid(format!("device {path} is already in this pool"))),
            Probe::Strata(sb) => {
                return Err(PoolError::Invalid(format!("device {path} belongs to another Strata pool ({}); refusing to add it", sb.pool_uuid)))
            }
            Probe::Foreign(what) => {
                return Err(PoolError::Invalid(format!("device {path} holds {what}; refusing to add it (wipe it first if its data is not needed)")))
            }
            Probe::Corrupt(why) => {
                return Err(PoolError::Invalid(format!("device {path} looks like a damaged Strata device ({why}); refusing to add it")))
            }
        }
        let d = format_device(path, dev, self.uuid, self.extent_size)?;
        let extents = d.sb.extent_count as u32;
        let mut m = self.maps.write();
        let uuid = d.sb.device_uuid;
        let i = self.devices.push(d)?;
        self.added.lock().push(uuid);
        m.owners.push(0);
        a.free.push((0..extents).collect());
        tracing::info!(device = %self.devices[i].path, extents, "device added to the pool");
        Ok(i)
    }

    /// A device's journal was salvaged with mappings lost (`check --repair`): this node's
    /// replicas may miss data until they are rebuilt.
    pub fn replicas_suspect(&self) -> bool {
        self.devices.iter().any(|d| d.sb.flags & superblock::FLAG_REPLICAS_SUSPECT != 0)
    }

    /// Clears the suspect flag once the replicas were taken out of the in-sync sets.
    pub fn clear_suspect(&self) -> Result<(), PoolError> {
        for d in &self.devices {
            if d.sb.flags & superblock::FLAG_REPLICAS_SUSPECT != 0 {
                let mut sb = d.sb.clone();
                sb.flags &= !superblock::FLAG_REPLICAS_SUSPECT;
                write_superblocks(d.dev.as_ref(), &sb)?;
            }
        }
        Ok(())
    }

    /// False once any device's journal has failed.
    pub fn healthy(&self) -> bool {
        !self.devices.iter().any(|d| d.journal.failed())
    }

    pub fn record(&self) -> PoolRecord {
        PoolRecord {
            uuid: self.uuid,
            extent_size: self.extent_size,
            devices: self.devices.iter().map(|d| (d.sb.device_uuid, d.path.clone())).collect(),
            added: self.added.lock().clone(),
        }
    }

    pub fn devices(&self) -> &Devices {
        &self.devices
    }

    pub fn lookup(&self, vol: u64, lext: u64) -> Option<PExt> {
        self.maps.read().map.get(&(vol, lext)).copied()
    }

    /// The extent a write to `(vol, lext)` may change in place: mapped and owned by `vol` alone.
    pub fn lookup_writable(&self, vol: u64, lext: u64) -> Option<PExt> {
        let m = self.maps.read();
        if !m.copying.is_empty() && m.copying.contains(&(vol, lext)) {
            return None;
        }
        m.map.get(&(vol, lext)).copied().filter(|p| !m.is_shared(*p))
    }

    /// Byte offset on its device of a physical extent.
    pub fn offset_of(&self, p: PExt) -> u64 {
        self.devices[p.dev as usize].sb.extent_offset(p.pext)
    }

    pub fn device(&self, p: PExt) -> &Arc<dyn BlockIo> {
        &self.devices[p.dev as usize].dev
    }

    /// The extent a write to `(vol, lext)` goes to, durably: a new zeroed one when unmapped, a
    /// private copy when the mapped one is shared (copy-on-write), else the mapped one.
    /// Blocking.
    pub fn allocate(&self, vol: u64, lext: u64) -> Result<PExt, PoolError> {
        let mut a = self.alloc.lock();
        // Another writer giving this logical extent its extent (a new one, or a private copy)
        // comes first: wait for it, then use that one.
        while a.pending.contains(&(vol, lext)) {
            self.allocated.wait(&mut a);
        }
        if let Some(p) = self.lookup(vol, lext) {
            if !self.maps.read().is_shared(p) {
                return Ok(p);
            }
            return self.copy_on_write(a, vol, lext, p);
        }
        let p = self.take_free(&mut a, vol, lext)?;
        drop(a);
        // Zeroing and the journal entry happen outside the allocator's lock, so allocations of
        // different extents overlap and share the syncs (both commit in groups) instead of
        // taking turns at two syncs each. The zeroes are durable before the map entry is
        // written: under one sync a disk's cache may keep the entry and lose the zeroes, and
        // the extent would show its previous owner's data.
        let d = &self.devices[p.dev as usize];
        self.begin_write(p);
        let res = d
            .dev
            .zero_range_blocking(d.sb.extent_offset(p.pext), self.extent_size)
            .map_err(PoolError::io("zeroing a new extent"))
            .and_then(|_| self.sync_new_extent(p))
            .and_then(|_| d.journal.commit(&[Entry::Map { vol, lext, pext: p.pext }]));
        self.end_new_extent(p, None, res.is_ok());
        self.finish_new(vol, lext, p, res)
    }

    /// A free extent, taken for `(vol, lext)` (pending until `finish_new`). Under the lock.
    fn take_free(&self, a: &mut Alloc, vol: u64, lext: u64) -> Result<PExt, PoolError> {
        let n = self.devices.len();
        let dev = (0..n).map(|i| (a.cursor + i) % n).find(|i| !a.free[*i].is_empty()).ok_or(PoolError::NoSpace)?;
        a.cursor = (dev + 1) % n;
        let pext = a.free[dev].pop_first().expect("non-empty free set");
        a.pending.insert((vol, lext));
        Ok(PExt { dev: dev as u16, pext })
    }

    /// Ends a pending allocation: `p` is mapped when `res` is Ok (its journal entry durable),
    /// else it is free again. Wakes writers waiting for the same logical extent.
    fn finish_new(&self, vol: u64, lext: u64, p: PExt, res: Result<(), PoolError>) -> Result<PExt, PoolError> {
        let mut a = self.alloc.lock();
        a.pending.remove(&(vol, lext));
        let res = match res {
            Err(e) => {
                a.free[p.dev as usize].insert(p.pext);
                Err(e)
            }
            Ok(()) => {
                let mut m = self.maps.write();
                m.map.insert((vol, lext), p);
                m.owners[p.dev as usize] += 1;
                drop(m);
                self.count(vol, 1);
                Ok(p)
            }
        };
        drop(a);
        self.allocated.notify_all();
        res
    }

    /// For a write of the whole of `(vol, lext)`, which has no extent: a free extent to write
    /// first and map after (`map_whole`), so it need not be zeroed (nothing maps it until its
    /// data is there, and a crash before leaves it free). None when the logical extent is mapped
    /// or being allocated (use `allocate`). The extent's change is begun here; `map_whole` makes
    /// its intent bit durable with the data, then maps it, and ends the change. Blocking.
    pub fn reserve_whole(&self, vol: u64, lext: u64) -> Result<Option<PExt>, PoolError> {
        let mut a = self.alloc.lock();
        if self.lookup(vol, lext).is_some() || a.pending.contains(&(vol, lext)) {
            return Ok(None);
        }
        let p = self.take_free(&mut a, vol, lext)?;
        drop(a);
        // The intent bit need not be durable before the data is written, only before the map
        // entry: nothing reads an unmapped extent.
        self.begin_write(p);
        // Sums of zeroes until the caller records those of its data.
        if let Some(s) = self.sums(p) {
            s.insert(p.pext, None);
        }
        Ok(Some(p))
    }

    /// Maps a `reserve_whole` extent once the caller wrote all of it and recorded its sums
    /// (`written` Ok): the data and the intent bit are made durable first, then the map entry,
    /// so a disk's cache cannot keep the entry and lose the data under one sync. On a failed
    /// write, or if the journal fails, the extent is free again. Blocking.
    pub fn map_whole(&self, vol: u64, lext: u64, p: PExt, written: Result<(), PoolError>) -> Result<PExt, PoolError> {
        let res = written
            .and_then(|_| self.sync_new_extent(p))
            .and_then(|_| self.devices[p.dev as usize].journal.commit(&[Entry::Map { vol, lext, pext: p.pext }]));
        self.end_write(p);
        if let (Err(_), Some(s)) = (&res, self.sums(p)) {
            s.remove(p.pext);
        }
        self.finish_new(vol, lext, p, res)
    }

    /// Gives `(vol, lext)` its own copy of the shared extent `old`, on the same device (one
    /// journal entry moves the owner, so a crash leaves it on the old or the new extent). The
    /// copy and its syncs happen outside the allocator's lock (`a`, released here), with
    /// `(vol, lext)` pending, so other allocations go on meanwhile.
    fn copy_on_write(&self, mut a: parking_lot::MutexGuard<'_, Alloc>, vol: u64, lext: u64, old: PExt) -> Result<PExt, PoolError> {
        let i = old.dev as usize;
        let d = &self.devices[i];
        let pext = a.free[i].pop_first().ok_or_else(|| PoolError::NoSpaceForCopy { device: d.path.clone() })?;
        a.pending.insert((vol, lext));
        self.maps.write().copying.insert((vol, lext));
        drop(a);
        let p = PExt { dev: old.dev, pext };
        // As for a new extent: the copy and its intent bit are durable, in one sync, before the
        // entry that moves the owner to it (nothing reads the copy until then).
        self.begin_write(p);
        let res = (|| {
            let mut buf = AlignedBuf::new(self.extent_size as usize);
            d.dev.read_blocking(d.sb.extent_offset(old.pext), &mut buf).map_err(PoolError::io("reading a shared extent"))?;
            d.dev.write_blocking(d.sb.extent_offset(pext), &buf).map_err(PoolError::io("copying a shared extent"))?;
            self.sync_new_extent(p)?;
            d.journal.commit(&[Entry::Move { vol, lext, from: old.pext, to: pext }])
        })();
        self.end_new_extent(p, Some(old.pext), res.is_ok());
        let mut a = self.alloc.lock();
        a.pending.remove(&(vol, lext));
        let mut m = self.maps.write();
        m.copying.remove(&(vol, lext));
        let res = match res {
            Err(e) => {
                drop(m);
                a.free[i].insert(pext);
                Err(e)
            }
            Ok(()) => {
                m.map.insert((vol, lext), p);
                if m.release(old, (vol, lext)) {
                    // Its other owners (a snapshot deleted meanwhile) are gone too: it is free.
                    drop(m);
                    self.reclaim(&mut a, old);
                }
                Ok(p)
            }
        };
        drop(a);
        self.allocated.notify_all();
        res
    }

    /// Gives volume `dst` every extent of volume `src`, shared (a snapshot or clone at this
    /// instant; the caller keeps writes to `src` out meanwhile). `dst` must own nothing yet.
    /// Blocking. Returns the number of extents shared.
    pub fn share(&self, src: u64, dst: u64) -> Result<u64, PoolError> {
        let _a = self.alloc.lock();
        let mut per_dev: Vec<Vec<(u64, u32)>> = vec![Vec::new(); self.devices.len()];
        {
            let m = self.maps.read();
            if m.map.keys().any(|(v, _)| *v == dst) {
                return Err(PoolError::Invalid(format!("volume id {dst} already owns extents in this pool")));
            }
            for ((v, l), p) in m.map.iter() {
                if *v == src {
                    per_dev[p.dev as usize].push((*l, p.pext));
                }
            }
            for (i, ext) in per_dev.iter().enumerate() {
                let (have, max) = (m.owners[i], self.devices[i].journal.max_owners());
                if have + ext.len() as u64 > max {
                    return Err(PoolError::TooManyReferences { device: self.devices[i].path.clone(), have, more: ext.len() as u64, max });
                }
            }
        }
        let mut n = 0;
        for (i, ext) in per_dev.iter().enumerate() {
            if ext.is_empty() {
                continue;
            }
            let entries: Vec<Entry> = ext.iter().map(|(l, p)| Entry::Share { vol: dst, lext: *l, pext: *p }).collect();
            self.devices[i].journal.commit(&entries)?;
            let mut m = self.maps.write();
            for (l, pext) in ext {
                let p = PExt { dev: i as u16, pext: *pext };
                m.map.insert((dst, *l), p);
                m.shared.entry(p).or_insert_with(|| vec![(src, *l)]).push((dst, *l));
            }
            m.owners[i] += ext.len() as u64;
            drop(m);
            self.count(dst, ext.len() as i64);
            n += ext.len() as u64;
        }
        Ok(n)
    }

    /// Frees the given logical extents of a volume (those that are mapped). Blocking. The caller
    /// keeps I/O to these extents out while this runs.
    pub fn free(&self, vol: u64, lexts: &[u64]) -> Result<u64, PoolError> {
        // The allocator's lock keeps a concurrent copy-on-write's end or a share out. An extent
        // of this volume still being made (new or a private copy: its writer's caller may have
        // gone, the blocking call has not) is finished first, so its entry cannot land after
        // the release.
        let mut a = self.alloc.lock();
        while a.pending.iter().any(|(v, _)| *v == vol) {
            self.allocated.wait(&mut a);
        }
        // (logical extent, physical extent) per device
        let mut per_dev: Vec<Vec<(u64, u32)>> = vec![Vec::new(); self.devices.len()];
        {
            let m = self.maps.read();
            for l in lexts {
                if let Some(p) = m.map.get(&(vol, *l)) {
                    per_dev[p.dev as usize].push((*l, p.pext));
                }
            }
        }
        let mut freed = 0;
        for (i, extents) in per_dev.iter().enumerate() {
            if extents.is_empty() {
                continue;
            }
            let d = &self.devices[i];
            let entries: Vec<Entry> = extents.iter().map(|(l, p)| Entry::Release { vol, lext: *l, pext: *p }).collect();
            d.journal.commit(&entries)?;
            let mut unowned = Vec::new();
            {
                let mut m = self.maps.write();
                for (l, pext) in extents {
                    m.map.remove(&(vol, *l));
                    if m.release(PExt { dev: i as u16, pext: *pext }, (vol, *l)) {
                        unowned.push(*pext);
                    }
                }
                m.owners[i] -= extents.len() as u64;
            }
            self.count(vol, -(extents.len() as i64));
            for pext in unowned {
                self.reclaim(&mut a, PExt { dev: i as u16, pext });
            }
            freed += extents.len() as u64;
        }
        Ok(freed)
    }

    /// Returns extent `p`, whose last owner is gone, to the free list (under the allocator's
    /// lock `a`): its space goes back to the device and its checksums are forgotten.
    fn reclaim(&self, a: &mut Alloc, p: PExt) {
        let d = &self.devices[p.dev as usize];
        d.dev.discard_blocking(d.sb.extent_offset(p.pext), self.extent_size);
        if let Some(s) = &d.sums {
            s.remove(p.pext);
        }
        a.free[p.dev as usize].insert(p.pext);
    }

    /// Makes what was written to the new extent `p` durable, with its intent bit, before its map
    /// entry is written: one sync, the intent's when the bitmap changed. Blocking.
    fn sync_new_extent(&self, p: PExt) -> Result<(), PoolError> {
        let d = &self.devices[p.dev as usize];
        let synced = match &d.sums {
            Some(s) => s.persist_intent().map_err(PoolError::io("writing the checksum intent bitmap"))?,
            None => false,
        };
        if !synced {
            // The bit was already durable (or the device keeps no checksums): the data still
            // needs its sync.
            d.dev.sync_blocking().map_err(PoolError::io("syncing a new extent"))?;
        }
        Ok(())
    }

    /// Ends the change begun (`begin_write`) on a newly taken extent `p`; when it was mapped (`ok`),
    /// its checksums are those of zeroes, or a copy of `from`'s.
    fn end_new_extent(&self, p: PExt, from: Option<u32>, ok: bool) {
        if let Some(s) = self.sums(p) {
            if ok {
                s.insert(p.pext, from);
            }
            s.end(p.pext);
        }
    }

    /// Whether any device of the pool keeps block checksums (formatted by this version; a
    /// version-1 device keeps none).
    pub fn has_checksums(&self) -> bool {
        self.devices.iter().any(|d| d.sums.is_some())
    }

    fn sums(&self, p: PExt) -> Option<&csum::DeviceSums> {
        self.devices[p.dev as usize].sums.as_ref()
    }

    /// A data write to `p` begins. True when `persist_intent(p)` must run before the data is
    /// written. Every `begin_write` is paired with an `end_write`.
    pub fn begin_write(&self, p: PExt) -> bool {
        self.sums(p).is_some_and(|s| s.begin(p.pext))
    }

    /// Makes the intent bits of `p`'s device durable. Blocking.
    pub fn persist_intent(&self, p: PExt) -> io::Result<()> {
        match self.sums(p) {
            Some(s) => s.persist_intent().map(|_| ()),
            None => Ok(()),
        }
    }

    pub fn end_write(&self, p: PExt) {
        if let Some(s) = self.sums(p) {
            s.end(p.pext);
        }
    }

    /// Records the checksums of `data` written at byte `within` of extent `p` (4 KiB aligned).
    pub fn record_sums(&self, p: PExt, within: u64, data: &[u8]) {
        if let Some(s) = self.sums(p) {
            s.record(p.pext, (within / csum::BLOCK as u64) as usize, data);
        }
    }

    /// Records `len` bytes of zeroes written at byte `within` of extent `p` (4 KiB aligned).
    pub fn record_zeroes(&self, p: PExt, within: u64, len: u64) {
        if let Some(s) = self.sums(p) {
            s.record_zeroes(p.pext, (within / csum::BLOCK as u64) as usize, (len / csum::BLOCK as u64) as usize);
        }
    }

    /// Byte offsets within `data` (read at byte `within` of extent `p`, 4 KiB aligned) of the
    /// 4 KiB blocks whose checksum does not match.
    pub fn verify(&self, p: PExt, within: u64, data: &[u8]) -> Vec<u64> {
        match self.sums(p) {
            Some(s) => s.verify(p.pext, (within / csum::BLOCK as u64) as usize, data).into_iter().map(|b| (b * csum::BLOCK) as u64).collect(),
            None => Vec::new(),
        }
    }

    /// Writes the checksums of extents idle since the last call and clears their intent bits.
    /// Blocking.
    pub fn settle_checksums(&self) -> io::Result<usize> {
        self.settle_checksums_idle(1, usize::MAX)
    }

    /// Writes the checksums of extents that no write touched over the last `passes` calls (or
    /// over the last one, on a device with more than `cap` unsettled extents) and clears their
    /// intent bits. Blocking; the engine calls it every few seconds.
    pub fn settle_checksums_idle(&self, passes: u32, cap: usize) -> io::Result<usize> {
        let mut n = 0;
        for d in &self.devices {
            if let Some(s) = &d.sums {
                n += s.settle(passes, cap)?;
            }
        }
        Ok(n)
    }

    /// Settles every checksum it can (a pass settles the extents idle since the one before, so a
    /// few passes settle all while no write comes in). Blocking. Returns the extents left.
    pub fn settle_all_checksums(&self) -> io::Result<usize> {
        for _ in 0..50 {
            self.settle_checksums()?;
            if self.unsettled_extents() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(self.unsettled_extents())
    }

    /// Extents whose checksums may be behind their data on disk.
    pub fn unsettled_extents(&self) -> usize {
        self.devices.iter().filter_map(|d| d.sums.as_ref()).map(|s| s.dirty_extents()).sum()
    }

    fn count(&self, vol: u64, delta: i64) {
        let mut c = self.per_volume.lock();
        let n = c.entry(vol).or_insert(0);
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            c.remove(&vol);
        }
    }

    /// Logical extents of a volume that are mapped, sorted.
    pub fn volume_extents(&self, vol: u64) -> Vec<u64> {
        let mut v: Vec<u64> = self.maps.read().map.keys().filter(|(v, _)| *v == vol).map(|(_, l)| *l).collect();
        v.sort_unstable();
        v
    }

    /// Bytes of the extents a volume owns, shared ones included.
    pub fn used_bytes_of(&self, vol: u64) -> u64 {
        self.per_volume.lock().get(&vol).copied().unwrap_or(0) * self.extent_size
    }

    /// Every (volume, logical extent) mapped, with its place.
    pub fn all_mappings(&self) -> Vec<((u64, u64), PExt)> {
        self.maps.read().map.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Extents owned by more than one volume (snapshots, clones).
    pub fn shared_extents(&self) -> u64 {
        self.maps.read().shared.len() as u64
    }

    pub fn total_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.sb.extent_count * self.extent_size).sum()
    }

    /// Bytes of physical extents in use (a shared extent counts once).
    pub fn used_bytes(&self) -> u64 {
        let a = self.alloc.lock();
        let free: u64 = a.free.iter().map(|f| f.len() as u64).sum();
        self.total_bytes() - free * self.extent_size
    }

    pub fn free_extents(&self, dev: usize) -> u64 {
        self.alloc.lock().free[dev].len() as u64
    }

    /// fdatasync every device.
    pub async fn sync_all(&self) -> io::Result<()> {
        let futs: Vec<_> = self.devices.iter().map(|d| d.dev.sync()).collect();
        for r in futures::future::join_all(futs).await {
            r?;
        }
        Ok(())
    }
}

impl PoolDevice {
    fn journal_map(&self) -> journal::DeviceMap {
        self.journal.map_snapshot()
    }
}

fn format_device(path: String, dev: Arc<dyn BlockIo>, pool: Uuid, extent_size: u64) -> Result<PoolDevice, PoolError> {
    let sb = Superblock::layout(pool, dev.size(), extent_size).map_err(|e| match e {
        PoolError::TooSmall { size, min } => {
            PoolError::Invalid(format!("device {path} of {size} bytes is too small: a pool device needs at least {min} bytes"))
        }
        other => other,
    })?;
    tracing::info!(device = %path, pool = %pool, extents = sb.extent_count, "formatting device");
    let journal = Journal::format(dev.clone(), &sb)?;
    dev.zero_range_blocking(sb.intent_offset, sb.csum_offset - sb.intent_offset).map_err(PoolError::io("zeroing the checksum intent bitmap"))?;
    let (sums, _) = csum::DeviceSums::load(dev.clone(), &sb, &[], false).map_err(|why| PoolError::Corrupt { device: path.clone(), why })?;
    write_superblocks(dev.as_ref(), &sb)?;
    Ok(PoolDevice { path, dev, sb, journal, sums: Some(sums), io_errors: Default::default() })
}

/// Writes both copies of `sb` (the backup first, where its layout leaves room for one).
fn write_superblocks(dev: &dyn BlockIo, sb: &Superblock) -> Result<(), PoolError> {
    if sb.has_backup_room() {
        write_superblock(dev, sb, superblock::backup_offset(sb.device_size))?;
    }
    write_superblock(dev, sb, 0)
}

/// Writes and syncs a copy of `sb` at `at` (0: the primary; the backup offset).
fn write_superblock(dev: &dyn BlockIo, sb: &Superblock, at: u64) -> Result<(), PoolError> {
    let mut block = AlignedBuf::new(superblock::SB_SIZE);
    block.copy_from_slice(&sb.encode());
    dev.write_blocking(at, &block).map_err(PoolError::io("writing the superblock"))?;
    dev.sync_blocking().map_err(PoolError::io("syncing the superblock"))
}

/// `check --repair`: salvages the journal of every device whose journal `open` refuses
/// (`Journal::salvage`), and marks such a device's replicas as suspect in its superblock (the
/// engine has them rebuilt from other nodes). Returns what was done and lost.
pub fn salvage_journals(devs: &[(String, Arc<dyn BlockIo>)]) -> Result<Vec<String>, PoolError> {
    let mut done = Vec::new();
    for (path, dev) in devs {
        let mut head = AlignedBuf::new(superblock::SB_SIZE);
        dev.read_blocking(0, &mut head).map_err(PoolError::io("reading the superblock"))?;
        let mut sb = match Superblock::probe(&head) {
            Probe::Strata(sb) => sb,
            _ => match read_backup(dev.as_ref()) {
                Some(sb) => sb,
                None => continue,
            },
        };
        let Err(why) = Journal::open(dev.clone(), &sb) else { continue };
        let (_, lost) = Journal::salvage(dev.clone(), &sb).map_err(|why| PoolError::Corrupt { device: path.clone(), why })?;
        sb.flags |= superblock::FLAG_REPLICAS_SUSPECT;
        write_superblocks(dev.as_ref(), &sb)?;
        done.push(format!(
            "device {path}: the journal was refused ({why}); salvaged into a new checkpoint with every readable mapping; lost: {}. This device's replicas are rebuilt from other nodes when the engine starts",
            if lost.is_empty() { "nothing".to_string() } else { lost.join("; ") }
        ));
    }
    Ok(done)
}

/// What is wrong with a device's superblock copies that the other copy can fix, if anything.
pub(super) fn primary_damage(dev: &dyn BlockIo) -> Option<String> {
    let mut head = AlignedBuf::new(superblock::SB_SIZE);
    dev.read_blocking(0, &mut head).ok()?;
    match (Superblock::probe(&head), read_backup(dev)) {
        (Probe::Corrupt(why), Some(_)) => {
            Some(format!("the primary superblock is corrupted ({why}); the backup copy is good (starting the engine rewrites the primary from it)"))
        }
        (Probe::Strata(sb), backup) if sb.has_backup_room() && backup.as_ref() != Some(&sb) => {
            Some("the backup superblock (last 4 KiB) is missing or damaged; starting the engine rewrites it".into())
        }
        _ => None,
    }
}

/// The backup superblock in the device's last 4 KiB, when it is valid and its layout leaves it
/// outside the data.
fn read_backup(dev: &dyn BlockIo) -> Option<Superblock> {
    let at = superblock::backup_offset(dev.size());
    if at == 0 {
        return None;
    }
    let mut block = AlignedBuf::new(superblock::SB_SIZE);
    dev.read_blocking(at, &mut block).ok()?;
    match Superblock::probe(&block) {
        Probe::Strata(sb) if sb.has_backup_room() && superblock::backup_offset(sb.device_size) == at => Some(sb),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{FileDevice, IoEngine, OpenOptions};

    fn open(dir: &std::path::Path) -> Pool {
        let opts = OpenOptions { create_size: Some(64 << 20), io_engine: IoEngine::Sync, read_only: false, lock_wait: Default::default() };
        let devs: Vec<(String, Arc<dyn BlockIo>)> = ["a", "b"]
            .iter()
            .map(|n| {
                let p = dir.join(n);
                (p.display().to_string(), Arc::new(FileDevice::open(&p, &opts).unwrap()) as Arc<dyn BlockIo>)
            })
            .collect();
        Pool::open(devs, &OpenSpec { expected: None, force_format: false, extent_size: DEFAULT_EXTENT_SIZE, check_only: false }).unwrap()
    }

    fn fill(pool: &Pool, vol: u64, lext: u64, byte: u8) {
        let p = pool.allocate(vol, lext).unwrap();
        let mut b = AlignedBuf::new(pool.extent_size as usize);
        b.fill(byte);
        pool.device(p).write_blocking(pool.offset_of(p), &b).unwrap();
    }

    fn first_byte(pool: &Pool, vol: u64, lext: u64) -> u8 {
        let p = pool.lookup(vol, lext).unwrap();
        let mut b = AlignedBuf::new(4096);
        pool.device(p).read_blocking(pool.offset_of(p), &mut b).unwrap();
        b[0]
    }

    #[test]
    fn a_device_added_in_use_takes_new_extents_and_is_found_again_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions { create_size: Some(64 << 20), io_engine: IoEngine::Sync, read_only: false, lock_wait: Default::default() };
        let file = |n: &str| {
            let p = dir.path().join(n);
            (p.display().to_string(), Arc::new(FileDevice::open(&p, &opts).unwrap()) as Arc<dyn BlockIo>)
        };
        let pool = open(dir.path());
        for l in 0..4 {
            fill(&pool, 1, l, l as u8 + 1);
        }
        let total = pool.total_bytes();
        let (path, dev) = file("c");
        assert_eq!(pool.add_device(path.clone(), dev).unwrap(), 2);
        assert!(pool.total_bytes() > total);
        for l in 4..10 {
            fill(&pool, 1, l, l as u8 + 1);
        }
        let on_new = (0..10).filter(|l| pool.lookup(1, *l).unwrap().dev == 2).count();
        assert!(on_new >= 2, "new extents spread onto the added device ({on_new} of 6)");
        // Refused: the same device again, a device of another pool, one holding a filesystem.
        let e = pool.add_device(path.clone(), pool.devices()[2].dev.clone()).unwrap_err();
        assert!(e.to_string().contains("already in this pool"), "{e}");
        let other = tempfile::tempdir().unwrap();
        let foreign_pool = open(other.path());
        let e = pool.add_device("x".into(), foreign_pool.devices()[0].dev.clone()).unwrap_err();
        drop(foreign_pool);
        assert!(e.to_string().contains("another Strata pool"), "{e}");
        let (ext4, dev) = file("ext4");
        let mut head = AlignedBuf::new(4096);
        head[1024 + 0x38] = 0x53;
        head[1024 + 0x39] = 0xEF;
        dev.write_blocking(0, &head).unwrap();
        let e = pool.add_device(ext4, dev).unwrap_err();
        assert!(e.to_string().contains("refusing to add it"), "{e}");
        assert_eq!(pool.devices().len(), 3);
        // Found again at open, with the record naming the added device.
        let rec = pool.record();
        assert_eq!(rec.devices.len(), 3);
        assert_eq!(rec.added, vec![pool.devices()[2].sb.device_uuid], "the record says which device was added while running");
        drop(pool);
        let devs = vec![file("a"), file("b"), file("c")];
        let spec = OpenSpec { expected: Some(rec.clone()), force_format: false, extent_size: DEFAULT_EXTENT_SIZE, check_only: false };
        let pool = Pool::open(devs, &spec).unwrap();
        for l in 0..10 {
            assert_eq!(first_byte(&pool, 1, l), l as u8 + 1);
        }
        // Without it, the pool refuses to start.
        drop(pool);
        let e = Pool::open(vec![file("a"), file("b")], &spec).err().expect("a missing device is refused");
        assert!(matches!(e, PoolError::MissingDevice { .. }), "{e}");
    }

    #[test]
    fn shared_extents_are_copied_before_a_write_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let pool = open(dir.path());
        let es = pool.extent_size;
        for l in 0..4 {
            fill(&pool, 1, l, 0xA0 + l as u8);
        }
        assert_eq!(pool.used_bytes(), 4 * es);
        assert_eq!(pool.share(1, 2).unwrap(), 4);
        assert_eq!(pool.used_bytes(), 4 * es, "a snapshot takes no space");
        assert_eq!(pool.used_bytes_of(2), 4 * es);
        assert!(pool.share(1, 2).is_err(), "a second share into the same id is refused");
        // A write to the source copies the extent first: the snapshot keeps the old bytes.
        let before = pool.lookup(1, 0).unwrap();
        fill(&pool, 1, 0, 0x11);
        let after = pool.lookup(1, 0).unwrap();
        assert_ne!(before, after);
        assert_eq!(after.dev, before.dev, "copies stay on their device");
        assert_eq!((first_byte(&pool, 1, 0), first_byte(&pool, 2, 0)), (0x11, 0xA0));
        assert_eq!(pool.used_bytes(), 5 * es);
        assert_eq!(pool.lookup_writable(1, 0), Some(after));
        assert_eq!(pool.lookup_writable(1, 1), None, "still shared");
        // Freeing the source leaves the snapshot's data; freeing both frees everything.
        pool.free(1, &pool.volume_extents(1)).unwrap();
        assert_eq!(pool.used_bytes(), 4 * es);
        assert_eq!(first_byte(&pool, 2, 3), 0xA3);
        // Extents of the snapshot are its own now: writable in place.
        assert_eq!(pool.lookup_writable(2, 3), pool.lookup(2, 3));
        pool.free(2, &pool.volume_extents(2)).unwrap();
        assert_eq!(pool.used_bytes(), 0);
        assert_eq!(pool.shared_extents(), 0);
    }

    #[test]
    fn sharing_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let pool = open(dir.path());
            for l in 0..3 {
                fill(&pool, 1, l, 0x10 + l as u8);
            }
            pool.share(1, 2).unwrap();
            pool.share(2, 3).unwrap();
            fill(&pool, 1, 1, 0x77);
            pool.free(2, &[0]).unwrap();
        }
        let pool = open(dir.path());
        assert_eq!(pool.used_bytes(), 4 * pool.extent_size);
        assert_eq!((first_byte(&pool, 1, 1), first_byte(&pool, 3, 1), first_byte(&pool, 2, 1)), (0x77, 0x11, 0x11));
        assert_eq!(pool.volume_extents(2), vec![1, 2]);
        assert_eq!(pool.shared_extents(), 3);
        let devs = pool.devices().iter().map(|d| (d.path.clone(), d.dev.clone())).collect();
        drop(pool);
        let report = check::check(devs, None, None);
        assert!(report.is_clean(), "{:?}", report.problems);
    }

    /// Writes 4 KiB of `byte` at block `block` of `(vol, lext)` as the engine does: intent,
    /// data, checksum.
    fn write_block(pool: &Pool, vol: u64, lext: u64, block: u64, byte: u8) -> PExt {
        let p = pool.allocate(vol, lext).unwrap();
        if pool.begin_write(p) {
            pool.persist_intent(p).unwrap();
        }
        let mut b = AlignedBuf::new(4096);
        b.fill(byte);
        pool.device(p).write_blocking(pool.offset_of(p) + block * 4096, &b).unwrap();
        pool.record_sums(p, block * 4096, &b);
        pool.end_write(p);
        p
    }

    fn poke(path: &str, at: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, at).unwrap();
    }

    fn bad_blocks(pool: &Pool, p: PExt) -> Vec<u64> {
        let mut b = AlignedBuf::new(pool.extent_size as usize);
        pool.device(p).read_blocking(pool.offset_of(p), &mut b).unwrap();
        pool.verify(p, 0, &b)
    }

    #[test]
    fn checksums_catch_flipped_bytes_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (p, path, at) = {
            let pool = open(dir.path());
            assert!(pool.has_checksums());
            let p = write_block(&pool, 1, 0, 3, 0xAB);
            assert_eq!(bad_blocks(&pool, p), Vec::<u64>::new());
            assert_eq!(pool.unsettled_extents(), 1);
            assert_eq!(pool.settle_checksums().unwrap(), 0, "an extent settles only after a whole idle period");
            assert_eq!(pool.settle_checksums().unwrap(), 1);
            assert_eq!(pool.unsettled_extents(), 0);
            (p, pool.devices()[p.dev as usize].path.clone(), pool.offset_of(p) + 3 * 4096 + 100)
        };
        poke(&path, at, &[0xAC]);
        let pool = open(dir.path());
        assert_eq!(bad_blocks(&pool, p), vec![3 * 4096], "the flipped block fails, the others pass");
        // A new write of the block gives it a matching checksum again.
        write_block(&pool, 1, 0, 3, 0x11);
        assert_eq!(bad_blocks(&pool, p), Vec::<u64>::new());
    }

    #[test]
    fn checksums_settle_after_the_idle_passes_asked_for_or_after_one_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let pool = open(dir.path());
        write_block(&pool, 1, 0, 0, 0x21);
        // Three idle passes are asked for: the first pass only notes the write.
        for pass in 1..=3 {
            assert_eq!(pool.settle_checksums_idle(3, 16).unwrap(), 0, "pass {pass}");
        }
        // A write in between starts the count again.
        write_block(&pool, 1, 0, 1, 0x22);
        for pass in 1..=3 {
            assert_eq!(pool.settle_checksums_idle(3, 16).unwrap(), 0, "pass {pass} after the second write");
        }
        assert_eq!(pool.settle_checksums_idle(3, 16).unwrap(), 1);
        assert_eq!(pool.unsettled_extents(), 0);
        // Past the cap (per device; these extents spread over both), one idle pass is enough.
        for lext in 0..5 {
            write_block(&pool, 2, lext, 0, 0x23);
        }
        assert_eq!(pool.unsettled_extents(), 5);
        assert_eq!(pool.settle_checksums_idle(3, 5).unwrap(), 0);
        assert_eq!(pool.settle_checksums_idle(3, 5).unwrap(), 0, "not past the cap: three passes");
        assert_eq!(pool.settle_checksums_idle(3, 0).unwrap(), 5, "past it: the second idle pass settles them");
        // The settled sums are right: a reopen finds no bad block.
        let written: Vec<PExt> = (0..5).map(|l| pool.lookup(2, l).unwrap()).collect();
        drop(pool);
        let pool = open(dir.path());
        for p in written {
            assert_eq!(bad_blocks(&pool, p), Vec::<u64>::new());
        }
    }

    #[test]
    fn checksums_of_extents_written_before_a_crash_are_recomputed() {
        let dir = tempfile::tempdir().unwrap();
        let (p, path, at) = {
            let pool = open(dir.path());
            let p = write_block(&pool, 1, 0, 0, 0x5A);
            pool.settle_checksums().unwrap();
            pool.settle_checksums().unwrap();
            // A write that reached the data but not the checksum before the crash.
            let p2 = write_block(&pool, 2, 0, 1, 0x77);
            let at = pool.offset_of(p2) + 4096;
            (p2, pool.devices()[p2.dev as usize].path.clone(), (at, p))
        };
        poke(&path, at.0, &[0x78; 4096]);
        let pool = open(dir.path());
        assert_eq!(bad_blocks(&pool, p), Vec::<u64>::new(), "an unsettled extent's checksums come from its data");
        assert_eq!(bad_blocks(&pool, at.1), Vec::<u64>::new());
        assert_eq!(pool.unsettled_extents(), 0);
        // Checksums follow copy-on-write: a snapshot's shared extent copied keeps them.
        pool.share(2, 3).unwrap();
        let copy = write_block(&pool, 2, 0, 2, 0x01);
        assert_ne!(copy, p);
        assert_eq!(bad_blocks(&pool, copy), Vec::<u64>::new());
        assert_eq!(bad_blocks(&pool, p), Vec::<u64>::new());
    }

    #[test]
    fn a_whole_extent_is_mapped_only_after_its_data_and_a_crash_before_leaves_it_free() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = AlignedBuf::new(DEFAULT_EXTENT_SIZE as usize);
        data.fill(0x3C);
        let free = |pool: &Pool| (0..pool.devices().len()).map(|d| pool.free_extents(d)).sum::<u64>();
        let (q, free_before) = {
            let pool = open(dir.path());
            let free_before = free(&pool);
            // Reserved and written, never mapped: the crash comes first.
            let p = pool.reserve_whole(1, 4).unwrap().expect("a free extent");
            assert!(pool.reserve_whole(1, 4).unwrap().is_none(), "already being written");
            pool.device(p).write_blocking(pool.offset_of(p), &data).unwrap();
            assert_eq!(pool.lookup(1, 4), None, "nothing maps it before its data is there");
            // Written and mapped.
            let q = pool.reserve_whole(1, 5).unwrap().expect("a free extent");
            pool.device(q).write_blocking(pool.offset_of(q), &data).unwrap();
            pool.record_sums(q, 0, &data);
            assert_eq!(pool.map_whole(1, 5, q, Ok(())).unwrap(), q);
            assert_eq!(pool.lookup(1, 5), Some(q));
            assert!(pool.reserve_whole(1, 5).unwrap().is_none(), "mapped: writes go through allocate");
            assert_eq!(pool.allocate(1, 5).unwrap(), q);
            // A failed write gives its extent back.
            let r = pool.reserve_whole(1, 6).unwrap().expect("a free extent");
            assert!(pool.map_whole(1, 6, r, Err(PoolError::NoSpace)).is_err());
            assert_eq!(pool.lookup(1, 6), None);
            (q, free_before)
        };
        let pool = open(dir.path());
        assert_eq!(pool.lookup(1, 4), None, "the reserved extent is not mapped after the crash");
        assert_eq!(pool.lookup(1, 5), Some(q));
        assert_eq!(free(&pool), free_before - 1, "only the mapped extent is taken");
        let mut back = AlignedBuf::new(DEFAULT_EXTENT_SIZE as usize);
        pool.device(q).read_blocking(pool.offset_of(q), &mut back).unwrap();
        assert!(back[..] == data[..]);
        assert_eq!(bad_blocks(&pool, q), Vec::<u64>::new(), "its checksums match its data");
    }

    /// A device for ordering tests (over a `MemDevice`): it logs its writes, zeroings and syncs
    /// in order, and its reads of a range it holds wait until it is opened.
    struct Probe {
        inner: crate::device::mem::MemDevice,
        log: parking_lot::Mutex<Vec<Op>>,
        /// The range held, and whether a read is waiting in it.
        held: parking_lot::Mutex<(Option<std::ops::Range<u64>>, bool)>,
        changed: parking_lot::Condvar,
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Op {
        Write(u64, u64),
        Zero(u64, u64),
        Sync,
    }

    impl Probe {
        fn new(size: u64) -> Arc<Probe> {
            let inner = crate::device::mem::MemDevice::new(size);
            Arc::new(Probe { inner, log: Default::default(), held: Default::default(), changed: Default::default() })
        }
        fn note(&self, op: Op) {
            self.log.lock().push(op);
        }
        fn hold(&self, r: std::ops::Range<u64>) {
            *self.held.lock() = (Some(r), false);
        }
        fn open(&self) {
            self.held.lock().0 = None;
            self.changed.notify_all();
        }
        fn wait_for_reader(&self) {
            let mut h = self.held.lock();
            let t0 = std::time::Instant::now();
            while !h.1 {
                assert!(t0.elapsed() < std::time::Duration::from_secs(10), "no read came to the held range");
                self.changed.wait_for(&mut h, std::time::Duration::from_millis(50));
            }
        }
    }

    impl BlockIo for Probe {
        fn read_at(
            &self,
            offset: u64,
            buf: AlignedBuf,
            range: std::ops::Range<usize>,
        ) -> futures::future::BoxFuture<'static, crate::device::BufResult> {
            self.inner.read_at(offset, buf, range)
        }
        fn write_at(
            &self,
            offset: u64,
            buf: AlignedBuf,
            range: std::ops::Range<usize>,
        ) -> futures::future::BoxFuture<'static, crate::device::BufResult> {
            self.note(Op::Write(offset, range.len() as u64));
            self.inner.write_at(offset, buf, range)
        }
        fn sync(&self) -> futures::future::BoxFuture<'static, io::Result<()>> {
            self.note(Op::Sync);
            self.inner.sync()
        }
        fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let mut h = self.held.lock();
            while h.0.as_ref().is_some_and(|r| r.contains(&offset)) {
                h.1 = true;
                self.changed.notify_all();
                self.changed.wait(&mut h);
            }
            drop(h);
            self.inner.read_blocking(offset, buf)
        }
        fn write_blocking(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
            self.note(Op::Write(offset, buf.len() as u64));
            self.inner.write_blocking(offset, buf)
        }
        fn sync_blocking(&self) -> io::Result<()> {
            self.note(Op::Sync);
            self.inner.sync_blocking()
        }
        fn zero_range_blocking(&self, offset: u64, len: u64) -> io::Result<()> {
            self.note(Op::Zero(offset, len));
            self.inner.zero_range_blocking(offset, len)
        }
        fn discard_blocking(&self, offset: u64, len: u64) {
            self.inner.discard_blocking(offset, len)
        }
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn describe(&self) -> crate::device::DeviceDescription {
            self.inner.describe()
        }
    }

    /// In `log`: the last write or zeroing of `[at, at + len)` is followed by a sync before the
    /// first journal write after it (the map entry).
    fn durable_before_mapped(log: &[Op], at: u64, len: u64, journal: std::ops::Range<u64>, what: &str) {
        let touches = |o: &Op| matches!(*o, Op::Write(off, _) | Op::Zero(off, _) if off >= at && off < at + len);
        let data = log.iter().rposition(touches).unwrap_or_else(|| panic!("{what}: never written: {log:?}"));
        let entry = log[data..]
            .iter()
            .position(|o| matches!(*o, Op::Write(off, _) if journal.contains(&off)))
            .unwrap_or_else(|| panic!("{what}: no journal write after the data: {log:?}"));
        assert!(log[data..data + entry].contains(&Op::Sync), "{what}: the map entry was written before the data was synced: {log:?}");
    }

    #[test]
    fn a_new_extents_data_is_synced_before_its_map_entry_is_written() {
        let dev = Probe::new(64 << 20);
        let spec = OpenSpec { expected: None, force_format: false, extent_size: DEFAULT_EXTENT_SIZE, check_only: false };
        let pool = Pool::open(vec![("probe".to_string(), dev.clone() as Arc<dyn BlockIo>)], &spec).unwrap();
        let sb = pool.devices().iter().next().unwrap().sb.clone();
        let journal = sb.journal_offset..sb.journal_offset + sb.journal_len;
        let es = pool.extent_size;

        // A partial write's new extent is zeroed: the zeroes are durable before it is mapped.
        dev.log.lock().clear();
        let p = pool.allocate(1, 0).unwrap();
        durable_before_mapped(&dev.log.lock(), pool.offset_of(p), es, journal.clone(), "a zeroed extent");

        // A whole extent written, then mapped.
        dev.log.lock().clear();
        let q = pool.reserve_whole(1, 1).unwrap().expect("a free extent");
        let mut data = AlignedBuf::new(es as usize);
        data.fill(0x5D);
        pool.device(q).write_blocking(pool.offset_of(q), &data).unwrap();
        pool.record_sums(q, 0, &data);
        pool.map_whole(1, 1, q, Ok(())).unwrap();
        durable_before_mapped(&dev.log.lock(), pool.offset_of(q), es, journal.clone(), "a whole extent");

        // A shared extent's private copy, made by the first write after a snapshot: the copy
        // is durable before the entry that moves the owner, in two syncs in all.
        pool.share(1, 2).unwrap();
        dev.log.lock().clear();
        let c = pool.allocate(1, 1).unwrap();
        assert_ne!(c, q, "a private copy");
        let log = dev.log.lock().clone();
        durable_before_mapped(&log, pool.offset_of(c), es, journal.clone(), "a copied extent");
        assert_eq!(log.iter().filter(|o| **o == Op::Sync).count(), 2, "{log:?}");

        // What was mapped reads back, with matching checksums, after a reopen.
        drop(pool);
        let pool = Pool::open(vec![("probe".to_string(), dev.clone() as Arc<dyn BlockIo>)], &spec).unwrap();
        assert_eq!(pool.lookup(1, 0), Some(p));
        assert_eq!(pool.lookup(1, 1), Some(c));
        assert_eq!(pool.lookup(2, 1), Some(q), "the snapshot keeps the original");
        for x in [q, c] {
            assert_eq!(bad_blocks(&pool, x), Vec::<u64>::new());
        }
    }

    #[test]
    fn a_copy_on_write_in_progress_holds_up_neither_other_allocations_nor_a_snapshot_delete() {
        let dev = Probe::new(64 << 20);
        let spec = OpenSpec { expected: None, force_format: false, extent_size: DEFAULT_EXTENT_SIZE, check_only: false };
        let pool = Arc::new(Pool::open(vec![("probe".to_string(), dev.clone() as Arc<dyn BlockIo>)], &spec).unwrap());
        let es = pool.extent_size;
        let original = pool.allocate(1, 0).unwrap();
        let mut data = AlignedBuf::new(es as usize);
        data.fill(0x6B);
        pool.device(original).write_blocking(pool.offset_of(original), &data).unwrap();
        pool.record_sums(original, 0, &data);
        pool.share(1, 2).unwrap();
        let free_before = pool.free_extents(0);

        // The first write after the snapshot copies the extent; its read of the original waits.
        dev.hold(pool.offset_of(original)..pool.offset_of(original) + es);
        let copier = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.allocate(1, 0))
        };
        dev.wait_for_reader();
        // Meanwhile another volume gets a new extent, and the snapshot is deleted.
        let (tx, rx) = std::sync::mpsc::channel();
        let other = {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let r = pool.allocate(3, 0).map(|p| (p, pool.free(2, &[0])));
                let _ = tx.send(());
                r
            })
        };
        let waited = rx.recv_timeout(std::time::Duration::from_secs(10));
        // The snapshot is gone but the copy is not done: a write to the extent must not go to
        // the original in place (the copy would leave it behind).
        let writable = pool.lookup_writable(1, 0);
        dev.open();
        assert!(waited.is_ok(), "another volume's allocation and the snapshot's delete waited for the copy");
        assert_eq!(writable, None, "writable in place while being copied");
        let (fresh, released) = other.join().unwrap().unwrap();
        assert_eq!(released.unwrap(), 1);
        let copy = copier.join().unwrap().unwrap();
        assert_ne!(copy, original);
        assert_ne!(fresh, copy);
        assert_eq!(pool.lookup(1, 0), Some(copy));
        // The original lost its last owner while it was being copied: it is free again.
        assert_eq!(pool.free_extents(0), free_before - 1, "the copy and the other volume's extent are taken, the original is back");
        let mut back = AlignedBuf::new(es as usize);
        pool.device(copy).read_blocking(pool.offset_of(copy), &mut back).unwrap();
        assert!(back[..] == data[..], "the copy holds the snapshot's data");
        assert_eq!(bad_blocks(&pool, copy), Vec::<u64>::new());
        // And after a reopen.
        drop(pool);
        let pool = Pool::open(vec![("probe".to_string(), dev.clone() as Arc<dyn BlockIo>)], &spec).unwrap();
        assert_eq!(pool.lookup(1, 0), Some(copy));
        assert_eq!(pool.lookup(2, 0), None);
        assert_eq!(pool.free_extents(0), free_before - 1);
    }
}
