//! One pool per node over one or more devices: superblocks, per-device journals, the extent
//! allocator (extents spread across devices) and the (volume, logical extent) -> physical
//! extent map. Thin: an extent is allocated, zeroed and journaled on its first write.

pub mod check;
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
}

impl PoolError {
    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> PoolError {
        move |source| PoolError::Io { what, source }
    }
}

/// A physical extent: device index in the pool and extent number on that device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PExt {
    pub dev: u16,
    pub pext: u32,
}

pub struct PoolDevice {
    pub path: String,
    pub dev: Arc<dyn BlockIo>,
    pub sb: Superblock,
    journal: Journal,
}

/// What the metadata store remembers of the pool, to notice a missing device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PoolRecord {
    pub uuid: Uuid,
    pub extent_size: u64,
    pub devices: Vec<(Uuid, String)>,
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
}

pub struct Pool {
    pub uuid: Uuid,
    pub extent_size: u64,
    devices: Vec<PoolDevice>,
    map: RwLock<HashMap<(u64, u64), PExt>>,
    /// Extents mapped per volume (kept beside `map` so usage needs no scan).
    per_volume: Mutex<HashMap<u64, u64>>,
    alloc: Mutex<Alloc>,
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
            dev.read_blocking(0, &mut head).map_err(|e| PoolError::Corrupt { device: path.clone(), why: format!("cannot read the superblock: {e}") })?;
            probes.push(Superblock::probe(&head));
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
                        return Err(PoolError::Corrupt { device: path, why: format!("extent size {} differs from the pool's {extent_size}", sb.extent_size) });
                    }
                    let (journal, _) = Journal::open(dev.clone(), &sb).map_err(|why| PoolError::Corrupt { device: path.clone(), why })?;
                    PoolDevice { path, dev, sb, journal }
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
        if devices.len() > u16::MAX as usize {
            return Err(PoolError::Invalid("too many devices".into()));
        }

        let mut map = HashMap::new();
        let mut free = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let dm = d.journal_map();
            let mut f: BTreeSet<u32> = (0..d.sb.extent_count as u32).collect();
            for (pext, (vol, lext)) in dm {
                f.remove(&pext);
                let p = PExt { dev: i as u16, pext };
                if let Some(prev) = map.insert((vol, lext), p) {
                    return Err(PoolError::Inconsistent(format!(
                        "volume {vol} extent {lext} is mapped twice: {}:{} and {}:{}",
                        devices[prev.dev as usize].path, prev.pext, d.path, pext
                    )));
                }
            }
            free.push(f);
        }
        let mut per_volume = HashMap::new();
        for (vol, _) in map.keys() {
            *per_volume.entry(*vol).or_insert(0u64) += 1;
        }
        Ok(Pool {
            uuid: pool_uuid,
            extent_size,
            devices,
            map: RwLock::new(map),
            per_volume: Mutex::new(per_volume),
            alloc: Mutex::new(Alloc { free, cursor: 0 }),
        })
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
        }
    }

    pub fn devices(&self) -> &[PoolDevice] {
        &self.devices
    }

    pub fn lookup(&self, vol: u64, lext: u64) -> Option<PExt> {
        self.map.read().get(&(vol, lext)).copied()
    }

    /// Byte offset on its device of a physical extent.
    pub fn offset_of(&self, p: PExt) -> u64 {
        self.devices[p.dev as usize].sb.extent_offset(p.pext)
    }

    pub fn device(&self, p: PExt) -> &Arc<dyn BlockIo> {
        &self.devices[p.dev as usize].dev
    }

    /// Maps `(vol, lext)` to a zeroed extent, durably, unless it is mapped already. Blocking.
    pub fn allocate(&self, vol: u64, lext: u64) -> Result<PExt, PoolError> {
        let mut a = self.alloc.lock();
        if let Some(p) = self.lookup(vol, lext) {
            return Ok(p);
        }
        let n = self.devices.len();
        let dev = (0..n).map(|i| (a.cursor + i) % n).find(|i| !a.free[*i].is_empty()).ok_or(PoolError::NoSpace)?;
        a.cursor = (dev + 1) % n;
        let pext = a.free[dev].pop_first().expect("non-empty free set");
        let d = &self.devices[dev];
        let res = d
            .dev
            .zero_range_blocking(d.sb.extent_offset(pext), self.extent_size)
            .map_err(PoolError::io("zeroing a new extent"))
            .and_then(|_| d.journal.commit(&[Entry::Map { vol, lext, pext }]));
        if let Err(e) = res {
            a.free[dev].insert(pext);
            return Err(e);
        }
        let p = PExt { dev: dev as u16, pext };
        self.map.write().insert((vol, lext), p);
        self.count(vol, 1);
        Ok(p)
    }

    /// Frees the given logical extents of a volume (those that are mapped). Blocking. The caller
    /// keeps I/O to these extents out while this runs.
    pub fn free(&self, vol: u64, lexts: &[u64]) -> Result<u64, PoolError> {
        // (logical extent, physical extent) per device
        let mut per_dev: Vec<Vec<(u64, u32)>> = vec![Vec::new(); self.devices.len()];
        {
            let map = self.map.read();
            for l in lexts {
                if let Some(p) = map.get(&(vol, *l)) {
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
            let entries: Vec<Entry> = extents.iter().map(|(_, p)| Entry::Unmap { pext: *p }).collect();
            d.journal.commit(&entries)?;
            {
                let mut map = self.map.write();
                for (l, _) in extents {
                    map.remove(&(vol, *l));
                }
            }
            self.count(vol, -(extents.len() as i64));
            for (_, p) in extents {
                d.dev.discard_blocking(d.sb.extent_offset(*p), self.extent_size);
            }
            self.alloc.lock().free[i].extend(extents.iter().map(|(_, p)| *p));
            freed += extents.len() as u64;
        }
        Ok(freed)
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
        let mut v: Vec<u64> = self.map.read().keys().filter(|(v, _)| *v == vol).map(|(_, l)| *l).collect();
        v.sort_unstable();
        v
    }

    pub fn used_bytes_of(&self, vol: u64) -> u64 {
        self.per_volume.lock().get(&vol).copied().unwrap_or(0) * self.extent_size
    }

    /// Every (volume, logical extent) mapped, with its place.
    pub fn all_mappings(&self) -> Vec<((u64, u64), PExt)> {
        self.map.read().iter().map(|(k, v)| (*k, *v)).collect()
    }

    pub fn total_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.sb.extent_count * self.extent_size).sum()
    }

    pub fn used_bytes(&self) -> u64 {
        self.map.read().len() as u64 * self.extent_size
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
        PoolError::TooSmall { size, min } => PoolError::Invalid(format!("device {path} of {size} bytes is too small: a pool device needs at least {min} bytes")),
        other => other,
    })?;
    tracing::info!(device = %path, pool = %pool, extents = sb.extent_count, "formatting device");
    let journal = Journal::format(dev.clone(), &sb)?;
    let mut block = AlignedBuf::new(superblock::SB_SIZE);
    block.copy_from_slice(&sb.encode());
    dev.write_blocking(0, &block).map_err(PoolError::io("writing the superblock"))?;
    dev.sync_blocking().map_err(PoolError::io("syncing the superblock"))?;
    Ok(PoolDevice { path, dev, sb, journal })
}
