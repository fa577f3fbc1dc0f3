//! Offline consistency check: superblocks, journals and allocation.

use super::{OpenSpec, Pool, PoolRecord, DEFAULT_EXTENT_SIZE};
use crate::device::BlockIo;
use std::collections::HashMap;
use std::sync::Arc;

/// What the metadata store says about a volume, for the leak and range checks.
#[derive(Debug, Clone)]
pub struct KnownVolume {
    pub name: String,
    pub size: u64,
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub devices: usize,
    pub mapped_extents: usize,
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
                Some(_) => {}
            }
        }
    }
    report
}
