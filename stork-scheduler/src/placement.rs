//! Filter and score: pure functions over the pod's volumes, their replica placement and the
//! candidate nodes' storage state and topology. No I/O here.

use std::collections::{BTreeMap, BTreeSet};

/// Highest score a node can get (kube-scheduler extenders score 0..=10).
pub const MAX_SCORE: i64 = 10;
const TIER_NODE: i64 = 10;
const TIER_RACK: i64 = 7;
const TIER_ZONE: i64 = 5;
const TIER_REGION: i64 = 3;
const TIER_ELSEWHERE: i64 = 0;
/// Subtracted from a node whose Strata storage is down (the engine runs, its pool does not).
pub const STORAGE_DOWN_PENALTY: i64 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Online,
    StorageDown,
    Offline,
    /// No Strata engine is known on this node.
    NotRunning,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    pub region: Option<String>,
    pub zone: Option<String>,
    pub rack: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    pub topology: Topology,
    pub storage: Storage,
}

/// One Strata volume of the pod and the nodes that hold its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlacement {
    pub volume: String,
    pub replicas: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Preferences {
    /// Only nodes that hold a replica of every volume.
    pub prefer_local_only: bool,
    /// Ignore where replicas are (all healthy nodes score the same).
    pub disable_hyperconvergence: bool,
}

impl Preferences {
    /// Reads the pod annotations (`strata.dev/...` or STORK's `stork.libopenstorage.org/...`).
    pub fn from_annotations(a: &BTreeMap<String, String>) -> Preferences {
        let flag = |key: &str| {
            ["strata.dev/", "stork.libopenstorage.org/"]
                .iter()
                .any(|p| a.get(&format!("{p}{key}")).is_some_and(|v| v.eq_ignore_ascii_case("true")))
        };
        Preferences { prefer_local_only: flag("preferLocalNodeOnly"), disable_hyperconvergence: flag("disableHyperconvergence") }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterOutcome {
    pub passed: Vec<String>,
    pub failed: BTreeMap<String, String>,
    /// Set when the pod cannot run anywhere (a volume has no online replica).
    pub error: Option<String>,
}

/// One reason per volume none of whose replicas is on an online node.
fn unavailable_volumes(vols: &[VolumePlacement], all: &[Candidate]) -> Vec<String> {
    let online: BTreeSet<&str> = all.iter().filter(|c| c.storage == Storage::Online).map(|c| c.name.as_str()).collect();
    vols.iter()
        .filter(|v| !v.replicas.iter().any(|r| online.contains(r.as_str())))
        .map(|v| format!("volume {} has no online replica (replicas on: {})", v.volume, v.replicas.join(", ")))
        .collect()
}

/// Filters `nodes` (the candidates). `known` holds every node the cluster knows, so a replica on
/// an online node that is not a candidate still counts as available.
pub fn filter(vols: &[VolumePlacement], nodes: &[Candidate], known: &[Candidate], prefs: Preferences) -> FilterOutcome {
    let mut out = FilterOutcome::default();
    if vols.is_empty() {
        out.passed = nodes.iter().map(|n| n.name.clone()).collect();
        return out;
    }
    let unavailable = unavailable_volumes(vols, known);
    for n in nodes {
        let reason = match n.storage {
            Storage::Offline => Some("Strata is offline on this node".to_string()),
            Storage::NotRunning => Some("Strata is not running on this node".to_string()),
            Storage::Online | Storage::StorageDown => None,
        };
        let reason = reason.or_else(|| {
            if !prefs.prefer_local_only || prefs.disable_hyperconvergence {
                return None;
            }
            vols.iter()
                .find(|v| !v.replicas.contains(&n.name))
                .map(|v| format!("preferLocalNodeOnly: node holds no replica of volume {}", v.volume))
        });
        match reason {
            Some(r) => {
                out.failed.insert(n.name.clone(), r);
            }
            None => out.passed.push(n.name.clone()),
        }
    }
    if !unavailable.is_empty() {
        out.error = Some(unavailable.join("; "));
    }
    out
}

fn tier(node: &Candidate, replicas: &[&Candidate]) -> i64 {
    let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
    replicas
        .iter()
        .map(|r| {
            if r.name == node.name {
                TIER_NODE
            } else if same(&r.topology.rack, &node.topology.rack) && same(&r.topology.zone, &node.topology.zone) {
                TIER_RACK
            } else if same(&r.topology.zone, &node.topology.zone) {
                TIER_ZONE
            } else if same(&r.topology.region, &node.topology.region) {
                TIER_REGION
            } else {
                TIER_ELSEWHERE
            }
        })
        .max()
        .unwrap_or(TIER_ELSEWHERE)
}

/// Scores in 0..=MAX_SCORE: per volume the best tier of any replica relative to the node,
/// averaged over volumes; StorageDown nodes lose [`STORAGE_DOWN_PENALTY`]. `known` holds every
/// node the cluster knows (replicas may sit on nodes that are not candidates).
pub fn score(vols: &[VolumePlacement], candidates: &[Candidate], known: &[Candidate], prefs: Preferences) -> Vec<(String, i64)> {
    candidates
        .iter()
        .map(|n| {
            let base = if vols.is_empty() || prefs.disable_hyperconvergence {
                0
            } else {
                let sum: i64 = vols
                    .iter()
                    .map(|v| {
                        let reps: Vec<&Candidate> = v.replicas.iter().filter_map(|r| known.iter().find(|k| &k.name == r)).collect();
                        tier(n, &reps)
                    })
                    .sum();
                sum / vols.len() as i64
            };
            let s = if n.storage == Storage::StorageDown { base - STORAGE_DOWN_PENALTY } else { base };
            (n.name.clone(), s.clamp(0, MAX_SCORE))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, region: &str, zone: &str, rack: &str, storage: Storage) -> Candidate {
        let o = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Candidate { name: name.into(), topology: Topology { region: o(region), zone: o(zone), rack: o(rack) }, storage }
    }

    fn cluster() -> Vec<Candidate> {
        vec![
            node("a", "r1", "z1", "k1", Storage::Online),
            node("b", "r1", "z1", "k1", Storage::Online),
            node("c", "r1", "z1", "k2", Storage::Online),
            node("d", "r1", "z2", "k3", Storage::Online),
            node("e", "r2", "z3", "k4", Storage::Online),
            node("f", "r1", "z1", "k1", Storage::StorageDown),
            node("g", "r1", "z1", "k1", Storage::Offline),
            node("h", "r1", "z1", "k1", Storage::NotRunning),
        ]
    }

    fn vol(name: &str, reps: &[&str]) -> VolumePlacement {
        VolumePlacement { volume: name.into(), replicas: reps.iter().map(|s| s.to_string()).collect() }
    }

    fn scores(vols: &[VolumePlacement], prefs: Preferences) -> BTreeMap<String, i64> {
        let c = cluster();
        score(vols, &c, &c, prefs).into_iter().collect()
    }

    #[test]
    fn tiers_order_node_rack_zone_region_elsewhere() {
        let s = scores(&[vol("v", &["a"])], Preferences::default());
        assert_eq!(s["a"], 10, "replica on the node");
        assert_eq!(s["b"], 7, "same rack");
        assert_eq!(s["c"], 5, "same zone");
        assert_eq!(s["d"], 3, "same region");
        assert_eq!(s["e"], 0, "elsewhere");
        assert!(s["a"] > s["b"] && s["b"] > s["c"] && s["c"] > s["d"] && s["d"] > s["e"]);
    }

    #[test]
    fn storage_down_is_penalised_and_scores_stay_in_range() {
        let s = scores(&[vol("v", &["f"])], Preferences::default());
        assert_eq!(s["f"], 10 - STORAGE_DOWN_PENALTY, "replica there, but its storage is down");
        assert_eq!(s["a"], 7, "a healthy node in the same rack beats it");
        assert!(s.values().all(|v| (0..=MAX_SCORE).contains(v)));
    }

    #[test]
    fn several_volumes_average_their_tiers() {
        let s = scores(&[vol("v1", &["a"]), vol("v2", &["d"])], Preferences::default());
        assert_eq!(s["a"], (10 + 3) / 2, "a holds v1 and shares only the region with v2's replica");
        assert_eq!(s["d"], (3 + 10) / 2);
        let s = scores(&[vol("v1", &["a", "d"]), vol("v2", &["a", "e"])], Preferences::default());
        assert_eq!(s["a"], 10, "a holds both");
        assert_eq!(s["e"], 10 / 2, "elsewhere for v1, holds v2");
    }

    #[test]
    fn pods_without_strata_volumes_pass_unchanged() {
        let c = cluster();
        let f = filter(&[], &c, &c, Preferences::default());
        assert_eq!(f.passed.len(), c.len());
        assert!(f.failed.is_empty() && f.error.is_none());
        assert!(score(&[], &c, &c, Preferences::default()).iter().all(|(_, s)| *s == 0));
    }

    #[test]
    fn offline_and_not_running_nodes_are_filtered_with_reasons() {
        let f = filter(&[vol("v", &["a"])], &cluster(), &cluster(), Preferences::default());
        assert_eq!(f.failed["g"], "Strata is offline on this node");
        assert_eq!(f.failed["h"], "Strata is not running on this node");
        assert!(f.passed.contains(&"f".to_string()), "StorageDown passes the filter (penalised in scoring)");
        assert!(f.error.is_none());
    }

    #[test]
    fn no_online_replica_is_an_error_that_names_the_volume() {
        let f = filter(&[vol("pvc-1", &["g", "h"])], &cluster(), &cluster(), Preferences::default());
        let e = f.error.expect("error");
        assert!(e.contains("pvc-1") && e.contains("no online replica") && e.contains("g, h"), "{e}");
        // A replica on an online node outside the candidate list keeps the volume available.
        let candidates: Vec<Candidate> = cluster().into_iter().filter(|c| c.name != "a").collect();
        let f = filter(&[vol("pvc-2", &["a", "g"])], &candidates, &cluster(), Preferences::default());
        assert!(f.error.is_none(), "{:?}", f.error);
    }

    #[test]
    fn prefer_local_only_keeps_replica_nodes() {
        let prefs = Preferences { prefer_local_only: true, disable_hyperconvergence: false };
        let f = filter(&[vol("v1", &["a", "b"]), vol("v2", &["b", "c"])], &cluster(), &cluster(), prefs);
        assert_eq!(f.passed, vec!["b".to_string()]);
        assert!(f.failed["a"].contains("v2"));
        assert!(f.failed["c"].contains("v1"));
    }

    #[test]
    fn disable_hyperconvergence_scores_everyone_alike() {
        let prefs = Preferences { prefer_local_only: false, disable_hyperconvergence: true };
        let s = scores(&[vol("v", &["a"])], prefs);
        assert_eq!(s["a"], s["e"]);
    }

    #[test]
    fn annotations_in_both_spellings() {
        let mut a = BTreeMap::new();
        a.insert("stork.libopenstorage.org/preferLocalNodeOnly".to_string(), "true".to_string());
        a.insert("strata.dev/disableHyperconvergence".to_string(), "True".to_string());
        assert_eq!(Preferences::from_annotations(&a), Preferences { prefer_local_only: true, disable_hyperconvergence: true });
        assert_eq!(Preferences::from_annotations(&BTreeMap::new()), Preferences::default());
    }
}
