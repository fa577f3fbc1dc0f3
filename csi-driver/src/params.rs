//! StorageClass parameters with Portworx's keys, parsed by a pure function. Unknown keys and
//! malformed values are errors that name the key; `csi.storage.k8s.io/...` keys (added by the
//! external-provisioner) are metadata, kept as labels.

use std::collections::{BTreeMap, HashMap};
use strata_api::units::parse_size;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeParams {
    pub repl: u32,
    /// ext4 or xfs (Portworx's `fs`); empty when the StorageClass does not say, and then the
    /// CO's fsType decides (ext4 when it gives none). When set it wins over the CO's fsType,
    /// which the provisioner fills with its own default.
    pub fs: String,
    pub io_profile: Option<String>,
    pub priority_io: Option<String>,
    pub nodes: Vec<String>,
    pub zones: Vec<String>,
    pub racks: Vec<String>,
    pub snap_schedule: Option<String>,
    pub secure: bool,
    pub rd_iops: u64,
    pub wr_iops: u64,
    pub rd_bw: u64,
    pub wr_bw: u64,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("StorageClass parameter {key}: {why}")]
pub struct ParamError {
    pub key: String,
    pub why: String,
}

fn err(key: &str, why: impl Into<String>) -> ParamError {
    ParamError { key: key.into(), why: why.into() }
}

fn list(v: &str) -> Vec<String> {
    v.split([',', ';']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

fn number(key: &str, v: &str) -> Result<u64, ParamError> {
    v.trim().parse().map_err(|_| err(key, format!("{v:?} is not a whole number")))
}

fn bandwidth(key: &str, v: &str) -> Result<u64, ParamError> {
    // Portworx gives bandwidth in MB/s as a bare number; a unit suffix is also accepted.
    if let Ok(n) = v.trim().parse::<u64>() {
        return Ok(n * 1024 * 1024);
    }
    parse_size(v).map_err(|e| err(key, format!("{v:?}: {e}")))
}

fn flag(key: &str, v: &str) -> Result<bool, ParamError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" | "" => Ok(false),
        _ => Err(err(key, format!("{v:?} is not true or false"))),
    }
}

pub fn parse(params: &HashMap<String, String>) -> Result<VolumeParams, ParamError> {
    let mut p = VolumeParams { repl: 1, ..Default::default() };
    let mut keys: Vec<&String> = params.keys().collect();
    keys.sort();
    for k in keys {
        let v = params[k].as_str();
        match k.as_str() {
            "repl" => {
                p.repl = number(k, v)? as u32;
                if !(1..=3).contains(&p.repl) {
                    return Err(err(k, format!("{v} is out of range: use 1, 2 or 3")));
                }
            }
            "fs" => {
                p.fs = v.trim().to_ascii_lowercase();
                if !matches!(p.fs.as_str(), "ext4" | "xfs") {
                    return Err(err(k, format!("{v:?} is not supported: use ext4 or xfs")));
                }
            }
            "io_profile" => {
                if !matches!(v, "auto" | "db" | "db_remote" | "sequential" | "random" | "cms" | "sync_shared" | "none") {
                    return Err(err(k, format!("{v:?} is not one of auto, db, db_remote, sequential, random, cms, sync_shared, none")));
                }
                p.io_profile = Some(v.into());
            }
            "priority_io" => {
                if !matches!(v, "low" | "medium" | "high") {
                    return Err(err(k, format!("{v:?} is not low, medium or high")));
                }
                p.priority_io = Some(v.into());
            }
            "nodes" => p.nodes = list(v),
            "zones" => p.zones = list(v),
            "racks" => p.racks = list(v),
            "snap_schedule" => {
                strata_api::schedule::parse(v).map_err(|e| err(k, e.to_string()))?;
                p.snap_schedule = Some(v.into());
            }
            "cloudsnap_schedule" => {
                strata_api::schedule::parse(v).map_err(|e| err(k, e.to_string()))?;
                p.labels.insert(k.into(), v.into());
            }
            "cloudsnap_cred" => {
                p.labels.insert(k.into(), v.into());
            }
            "secure" => p.secure = flag(k, v)?,
            "io_throttle_rd_iops" => p.rd_iops = number(k, v)?,
            "io_throttle_wr_iops" => p.wr_iops = number(k, v)?,
            "io_throttle_rd_bw" => p.rd_bw = bandwidth(k, v)?,
            "io_throttle_wr_bw" => p.wr_bw = bandwidth(k, v)?,
            "labels" => {
                for pair in list(v) {
                    let (lk, lv) = pair.split_once('=').ok_or_else(|| err(k, format!("{pair:?} is not key=value")))?;
                    p.labels.insert(lk.trim().into(), lv.trim().into());
                }
            }
            other if other.starts_with("csi.storage.k8s.io/") => {
                // PVC/PV names from the provisioner's --extra-create-metadata: kept as labels.
                let short = other.trim_start_matches("csi.storage.k8s.io/").replace('/', "_");
                p.labels.insert(format!("k8s_{short}"), v.into());
            }
            other => return Err(err(other, "unknown parameter (see the README for the keys Strata takes)")),
        }
    }
    for (label, value) in [("io_profile", &p.io_profile), ("priority_io", &p.priority_io), ("snap_schedule", &p.snap_schedule)] {
        if let Some(v) = value {
            p.labels.insert(label.into(), v.clone());
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn portworx_keys_parse_and_bad_values_name_their_key() {
        let p = parse(&m(&[
            ("repl", "3"),
            ("fs", "xfs"),
            ("io_profile", "db"),
            ("priority_io", "high"),
            ("zones", "z1,z2"),
            ("io_throttle_rd_iops", "500"),
            ("io_throttle_wr_bw", "20"),
            ("labels", "app=pg, tier=db"),
            ("snap_schedule", "periodic=60,10"),
            ("cloudsnap_schedule", "daily=02:00,7"),
            ("cloudsnap_cred", "s3"),
            ("csi.storage.k8s.io/pvc/name", "data-pg-0"),
        ]))
        .unwrap();
        assert_eq!((p.repl, p.fs.as_str(), p.rd_iops, p.wr_bw), (3, "xfs", 500, 20 << 20));
        assert_eq!(p.zones, vec!["z1", "z2"]);
        assert_eq!(p.labels["app"], "pg");
        assert_eq!(p.labels["k8s_pvc_name"], "data-pg-0");
        assert_eq!(p.labels["io_profile"], "db");
        assert_eq!((p.labels["cloudsnap_schedule"].as_str(), p.labels["cloudsnap_cred"].as_str()), ("daily=02:00,7", "s3"));
        for (k, v) in [
            ("repl", "4"),
            ("repl", "two"),
            ("fs", "btrfs"),
            ("io_profile", "fast"),
            ("priority_io", "urgent"),
            ("secure", "maybe"),
            ("io_throttle_rd_iops", "-1"),
            ("snap_schedule", "hourly=5"),
            ("cloudsnap_schedule", "weekly=7"),
            ("labels", "novalue"),
            ("color", "blue"),
        ] {
            let e = parse(&m(&[(k, v)])).unwrap_err();
            assert_eq!(e.key, k, "{e}");
        }
        assert_eq!(parse(&m(&[])).unwrap().repl, 1);
    }
}
