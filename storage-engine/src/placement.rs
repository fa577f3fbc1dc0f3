//! Where a volume's replicas go: a pure function over the nodes the metadata store knows.
//!
//! Rules, in order: one replica per node; only online nodes not in maintenance; only the nodes, zones and racks the
//! request allows; only nodes whose pool can hold the whole volume. Among those, each next replica
//! goes to a new zone if one is left, then to a new rack, then to the least provisioned node (by
//! the share of its capacity already promised to volumes). The preferred node (the one asked to
//! create the volume, so reads stay local) goes first when it is eligible. Fewer eligible nodes
//! than `repl` is an error that says why each node was left out — never a volume with fewer
//! replicas.

use std::collections::HashSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub online: bool,
    /// In maintenance: takes no new replica.
    pub maintenance: bool,
    pub zone: String,
    pub rack: String,
    pub capacity: u64,
    /// Sum of the sizes of the volumes that already have a replica here.
    pub provisioned: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub repl: u32,
    pub size: u64,
    /// Allowed nodes (empty: any).
    pub nodes: Vec<String>,
    /// Allowed zones (empty: any).
    pub zones: Vec<String>,
    /// Allowed racks (empty: any).
    pub racks: Vec<String>,
    /// Goes first when eligible.
    pub prefer: Option<String>,
    /// Nodes that already hold a replica (adding replicas to an existing volume).
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("repl {repl} needs {repl} eligible nodes, but {eligible} of the cluster's {known} node(s) are eligible{why}")]
pub struct PlacementError {
    pub repl: u32,
    pub eligible: usize,
    pub known: usize,
    why: String,
}

/// Why a node cannot take a replica, or None when it can.
fn excluded(c: &Candidate, r: &Request) -> Option<&'static str> {
    if r.exclude.contains(&c.id) {
        Some("already holds a replica")
    } else if !c.online {
        Some("not online")
    } else if c.maintenance {
        Some("in maintenance")
    } else if !r.nodes.is_empty() && !r.nodes.contains(&c.id) {
        Some("not in the requested nodes")
    } else if !r.zones.is_empty() && !r.zones.contains(&c.zone) {
        Some("not in the requested zones")
    } else if !r.racks.is_empty() && !r.racks.contains(&c.rack) {
        Some("not in the requested racks")
    } else if c.capacity < r.size {
        Some("pool smaller than the volume")
    } else {
        None
    }
}

/// The nodes for `r.repl` replicas, best first.
pub fn place(cands: &[Candidate], r: &Request) -> Result<Vec<String>, PlacementError> {
    let mut eligible: Vec<&Candidate> = Vec::new();
    let mut why = Vec::new();
    for c in cands {
        match excluded(c, r) {
            None => eligible.push(c),
            Some(reason) => why.push(format!("{} {reason}", c.id)),
        }
    }
    let need = r.repl as usize;
    if eligible.len() < need {
        let why = if why.is_empty() { String::new() } else { format!(" ({})", why.join("; ")) };
        return Err(PlacementError { repl: r.repl, eligible: eligible.len(), known: cands.len(), why });
    }
    let load = |c: &Candidate| if c.capacity == 0 { f64::INFINITY } else { c.provisioned as f64 / c.capacity as f64 };
    let mut chosen: Vec<&Candidate> = Vec::new();
    if let Some(p) = &r.prefer {
        if let Some(i) = eligible.iter().position(|c| &c.id == p) {
            chosen.push(eligible.remove(i));
        }
    }
    while chosen.len() < need {
        let zones: HashSet<&str> = chosen.iter().map(|c| c.zone.as_str()).collect();
        let racks: HashSet<&str> = chosen.iter().map(|c| c.rack.as_str()).collect();
        // Lower is better: a used zone, then a used rack, then load, then the id (determinism).
        let key = |c: &&Candidate| (zones.contains(c.zone.as_str()), racks.contains(c.rack.as_str()), load(c));
        let best = (0..eligible.len())
            .min_by(|&a, &b| {
                let (ka, kb) = (key(&eligible[a]), key(&eligible[b]));
                ka.0.cmp(&kb.0).then(ka.1.cmp(&kb.1)).then(ka.2.total_cmp(&kb.2)).then(eligible[a].id.cmp(&eligible[b].id))
            })
            .expect("enough eligible nodes");
        chosen.push(eligible.remove(best));
    }
    Ok(chosen.into_iter().map(|c| c.id.clone()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, zone: &str, rack: &str, provisioned: u64) -> Candidate {
        Candidate { id: id.into(), online: true, maintenance: false, zone: zone.into(), rack: rack.into(), capacity: 100, provisioned }
    }

    fn req(repl: u32) -> Request {
        Request { repl, size: 10, ..Default::default() }
    }

    #[test]
    fn replicas_go_to_distinct_nodes_and_the_preferred_one_first() {
        let c = vec![node("a", "", "", 0), node("b", "", "", 0), node("c", "", "", 0)];
        let got = place(&c, &Request { prefer: Some("b".into()), ..req(3) }).unwrap();
        assert_eq!(got[0], "b");
        let set: HashSet<_> = got.iter().collect();
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn spreads_across_zones_then_racks() {
        let c = vec![node("a1", "z1", "r1", 0), node("a2", "z1", "r1", 0), node("a3", "z1", "r2", 0), node("b1", "z2", "r3", 50)];
        let got = place(&c, &Request { prefer: Some("a1".into()), ..req(3) }).unwrap();
        assert_eq!(got, vec!["a1", "b1", "a3"], "second replica in the other zone despite its load, third on a new rack");
    }

    #[test]
    fn least_provisioned_wins_when_topology_is_equal() {
        let c = vec![node("a", "", "", 90), node("b", "", "", 10), node("c", "", "", 50)];
        assert_eq!(place(&c, &req(2)).unwrap(), vec!["b", "c"]);
    }

    #[test]
    fn filters_are_honoured_and_shortfalls_explained() {
        let mut c = vec![node("a", "z1", "r1", 0), node("b", "z2", "r2", 0), node("c", "z2", "r3", 0)];
        c[2].online = false;
        assert_eq!(place(&c, &Request { nodes: vec!["b".into()], ..req(1) }).unwrap(), vec!["b"]);
        assert_eq!(place(&c, &Request { zones: vec!["z1".into()], ..req(1) }).unwrap(), vec!["a"]);
        let e = place(&c, &req(3)).unwrap_err();
        assert_eq!(e.eligible, 2);
        assert!(e.to_string().contains("c not online"), "{e}");
        let e = place(&c, &Request { racks: vec!["r2".into(), "r3".into()], ..req(2) }).unwrap_err();
        assert!(e.to_string().contains("a not in the requested racks"), "{e}");
        let e = place(&c, &Request { size: 1000, ..req(1) }).unwrap_err();
        assert!(e.to_string().contains("pool smaller than the volume"), "{e}");
        c[1].maintenance = true;
        let e = place(&c, &req(2)).unwrap_err();
        assert!(e.to_string().contains("b in maintenance"), "{e}");
        let e = place(&c, &Request { exclude: vec!["a".into()], ..req(2) }).unwrap_err();
        assert!(e.to_string().contains("a already holds a replica"), "{e}");
    }
}
