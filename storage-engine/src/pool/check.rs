//! Offline consistency check: superblocks (both copies), journals, allocation, and every stored
//! block against its checksum.

use super::{OpenSpec, Pool, PoolRecord, DEFAULT_EXTENT_SIZE};
use crate::device::BlockIo;
use std::collections::HashMap;
use std::sync::Arc;

/// What the metadata store says about a volume, for the leak and range checks.
#[derive(Debug, Clone)]
pub struct KnownVolume {
    pub name: String,
    pub size: u64,
    /// Whether the record lists this node as holding a replica (None: not known, no node id).
    pub replica_here: Option<bool>,
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub devices: usize,
    pub mapped_extents: usize,
    /// 4 KiB blocks read and compared with their checksums.
    pub verified_blocks: u64,
    /// Extents a crash left with unsettled checksums (recomputed from their data at the next
    /// start, so not verified here).
    pub unsettled_extents: usize,
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the pool on `devs`. With `volumes` (from the metadata store) it also finds extents
/// leaked to volumes that no longer exist and extents mapped past a volume's end.
pub fn check(devs: Vec<(String, Arc<dyn BlockIo>)>, expected: Option<PoolRecord>, volumes: Option<&HashMap<u64, KnownVolume>>) -> CheckReport {
    let mut report = CheckReport { devices: devs.len(), ..Default::default() };
    for (path, dev) in &devs {
        if let Some(why) = super::primary_damage(dev.as_ref()) {
            report.problems.push(format!("device {path}: {why}"));
        }
    }
    let spec = OpenSpec { expected, force_format: false, extent_size: DEFAULT_EXTENT_SIZE, check_only: true };
    let pool = match Pool::open(devs, &spec) {
        Ok(p) => p,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    let maps = pool.all_mappings();
    report.mapped_extents = maps.len();
    report.unsettled_extents = pool.unsettled_at_open;
    verify_blocks(&pool, &maps, &mut report);
    for (i, d) in pool.devices().iter().enumerate() {
        let mapped = maps.iter().filter(|(_, p)| p.dev as usize == i).map(|(_, p)| p.pext).collect::<std::collections::BTreeSet<_>>().len() as u64;
        if mapped + pool.free_extents(i) != d.sb.extent_count {
            report.problems.push(format!("device {}: {} mapped + {} free != {} extents", d.path, mapped, pool.free_extents(i), d.sb.extent_count));
        }
    }
    if let Some(vols) = volumes {
        for ((vol, lext), p) in &maps {
            let place = format!("{}:{}", pool.devices()[p.dev as usize].path, p.pext);
            match vols.get(vol) {
                None => report.problems.push(format!("extent {place} is leaked: it belongs to volume id {vol}, which does not exist")),
                Some(v) if *lext * pool.extent_size >= v.size => report.problems.push(format!(
                    "extent {place} is mapped at logical extent {lext} of volume {}, past its size of {} bytes",
                    v.name, v.size
                )),
                Some(v) if v.replica_here == Some(false) => report.problems.push(format!(
                    "extent {place} belongs to volume {}, whose record does not list this node as a replica (left over from a removed replica: the engine frees it at start)",
                    v.name
                )),
                Some(_) => {}
            }
        }
    }
    report
}

/// Reads every mapped extent and compares each 4 KiB block with its checksum (an extent shared
/// by snapshots is read once). Extents whose intent bit was set had their checksums recomputed
/// from their data when the pool was opened: they match by construction.
fn verify_blocks(pool: &Pool, maps: &[((u64, u64), super::PExt)], report: &mut CheckReport) {
    let mut seen = std::collections::HashSet::new();
    let es = pool.extent_size;
    let mut buf = crate::device::AlignedBuf::new(es as usize);
    for ((vol, lext), p) in maps {
        if !seen.insert((p.dev, p.pext)) {
            continue;
        }
        let d = &pool.devices()[p.dev as usize];
        if d.sums.is_none() {
            continue;
        }
        if let Err(e) = d.dev.read_blocking(d.sb.extent_offset(p.pext), &mut buf) {
            report.problems.push(format!("device {}: extent {} cannot be read: {e}", d.path, p.pext));
            continue;
        }
        report.verified_blocks += es / 4096;
        for bad in pool.verify(*p, 0, &buf) {
            report.problems.push(format!(
                "device {}: extent {} block at extent byte {bad} fails its checksum (volume id {vol}, volume byte {}): its data or its checksum slot is damaged; the engine repairs it from an in-sync replica on another node when it reads or scrubs it, and answers EIO where there is none",
                d.path,
                p.pext,
                lext * es + bad
            ));
        }
    }
}
