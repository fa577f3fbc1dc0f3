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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Online,
    StorageDown,
    Offline,
    /// The engine runs, but the node is in maintenance: it serves no volume.
    Maintenance,
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
            ["strata.dev/", "stork.libopenstorage.org/"].iter().any(|p| a.get(&format!("{p}{key}")).is_some_and(|v| v.eq_ignore_ascii_case("true")))
        };
        Preferences { prefer_local_only: flag("preferLocalNodeOnly"), disable_hyperconvergence: flag("disableHyperconvergence") }
    }
}

/// The filter's answer. It fails closed, like STORK: a node that cannot serve the pod's data
/// is in `failed` with the reason, and a volume with no online replica fails every node (never
/// an extender error, which kube-scheduler may ignore).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterOutcome {
    pub passed: Vec<String>,
    pub failed: BTreeMap<String, String>,
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
            Storage::StorageDown => Some("Strata's storage is down on this node".to_string()),
            Storage::Maintenance => Some("Strata is in maintenance on this node: it serves no volume until maintenance ends".to_string()),
            Storage::Online if !unavailable.is_empty() => Some(unavailable.join("; ")),
            Storage::Online => None,
        };
        let reason = reason.or_else(|| {
            if !prefs.prefer_local_only || prefs.disable_hyperconvergence {
                return None;
            }
            vols.iter().find(|v| !v.replicas.contains(&n.name)).map(|v| format!("preferLocalNodeOnly: node holds no replica of volume {}", v.volume))
        });
        match reason {
            Some(r) => {
                out.failed.insert(n.name.clone(), r);
            }
            None => out.passed.push(n.name.clone()),
        }
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
/// averaged over volumes (replicas on nodes whose Strata is not online do not count); a node whose Strata is not online (offline, storage down, not
/// running) scores 0. `known` holds every node the cluster knows (replicas may sit on nodes
/// that are not candidates).
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
                        // Only a replica that serves counts: being next to a dead one is worth nothing.
                        let reps: Vec<&Candidate> =
                            v.replicas.iter().filter_map(|r| known.iter().find(|k| &k.name == r && k.storage == Storage::Online)).collect();
                        tier(n, &reps)
                    })
                    .sum();
                sum / vols.len() as i64
            };
            let s = if n.storage == Storage::Online { base } else { 0 };
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
    fn nodes_whose_strata_is_not_online_score_zero_and_scores_stay_in_range() {
        let s = scores(&[vol("v", &["f", "g", "h"])], Preferences::default());
        assert_eq!((s["f"], s["g"], s["h"]), (0, 0, 0), "replicas there, but storage down / offline / not running");
        assert_eq!(s["a"], 0, "next to replicas that do not serve is worth nothing");
        let s = scores(&[vol("v", &["f", "b"])], Preferences::default());
        assert_eq!((s["f"], s["b"], s["a"]), (0, 10, 7), "the serving replica counts");
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
        assert!(f.failed.is_empty());
        assert!(score(&[], &c, &c, Preferences::default()).iter().all(|(_, s)| *s == 0));
    }

    #[test]
    fn offline_storage_down_and_not_running_nodes_are_filtered_with_reasons() {
        let f = filter(&[vol("v", &["a"])], &cluster(), &cluster(), Preferences::default());
        assert_eq!(f.failed["g"], "Strata is offline on this node");
        assert_eq!(f.failed["h"], "Strata is not running on this node");
        assert_eq!(f.failed["f"], "Strata's storage is down on this node");
        assert_eq!(f.passed, vec!["a", "b", "c", "d", "e"]);
        let mut c = cluster();
        c[1].storage = Storage::Maintenance;
        let f = filter(&[vol("v", &["a"])], &c, &c, Preferences::default());
        assert!(f.failed[&c[1].name].contains("in maintenance"), "{:?}", f.failed);
    }

    #[test]
    fn no_online_replica_fails_every_node_with_a_reason_naming_the_volume() {
        let f = filter(&[vol("pvc-1", &["g", "h"])], &cluster(), &cluster(), Preferences::default());
        assert!(f.passed.is_empty(), "fails closed: {:?}", f.passed);
        assert_eq!(f.failed.len(), cluster().len());
        let e = &f.failed["a"];
        assert!(e.contains("pvc-1") && e.contains("no online replica") && e.contains("g, h"), "{e}");
        // A replica on an online node outside the candidate list keeps the volume available.
        let candidates: Vec<Candidate> = cluster().into_iter().filter(|c| c.name != "a").collect();
        let f = filter(&[vol("pvc-2", &["a", "g"])], &candidates, &cluster(), Preferences::default());
        assert_eq!(f.passed, vec!["b", "c", "d", "e"]);
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
