//! The engine's modules form a stack (docs/ARCHITECTURE.md): a module may use the ones below it,
//! never one above. This reads every `crate::<module>` path in `src/` and checks each against
//! the declared order. `KNOWN_UPWARD` lists imports allowed to point up while they are being
//! removed: a new upward import fails, and so does a listed one that no longer exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom first. Modules on one line are one layer (they may not use each other either way,
/// except as listed).
const LAYERS: &[&[&str]] = &[
    // `placement` is a pure decision: a leaf any layer may ask.
    &["clock", "net", "placement", "failpoint"],
    &["crypt", "qos", "metrics", "alerts", "security"],
    &["device"],
    &["pool"],
    &["meta"],
    &["replica"],
    &["replication"],
    &["volume"],
    // Node lifecycle (maintenance, decommission, drives) and cloud snapshots drive volumes.
    &["cluster", "cloudsnap"],
    &["frontend"],
    &["sdk"],
    &["testing", "config"],
    &["server"],
];

/// Upward imports that exist today, as (from, to). (Empty: keep it so.)
const KNOWN_UPWARD: &[(&str, &str)] = &[];

fn layer_of(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&m))
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (from, to) -> a file where it happens.
fn edges() -> BTreeMap<(String, String), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().to_string();
        let from = rel.split('/').next().unwrap().trim_end_matches(".rs").to_string();
        if from == "lib" || from == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, _) in text.match_indices("crate::") {
            let to: String = text[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if to != from && !to.is_empty() && to.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                out.entry((from.clone(), to)).or_insert_with(|| rel.clone());
            }
        }
    }
    out
}

#[test]
fn every_module_is_in_a_layer() {
    let unknown: BTreeSet<String> = edges().keys().flat_map(|(a, b)| [a.clone(), b.clone()]).filter(|m| layer_of(m).is_none()).collect();
    assert!(unknown.is_empty(), "modules missing from LAYERS in tests/layers.rs: {unknown:?}");
}

#[test]
fn imports_point_down_the_stack() {
    let edges = edges();
    let mut upward = BTreeMap::new();
    for ((from, to), file) in &edges {
        let (Some(a), Some(b)) = (layer_of(from), layer_of(to)) else { continue };
        if b >= a {
            upward.insert((from.clone(), to.clone()), file.clone());
        }
    }
    let new: Vec<String> = upward
        .iter()
        .filter(|((a, b), _)| !KNOWN_UPWARD.contains(&(a.as_str(), b.as_str())))
        .map(|((a, b), f)| format!("{a} -> {b} (in src/{f})"))
        .collect();
    assert!(new.is_empty(), "imports that point up (or sideways) the stack: {new:?}");
    let gone: Vec<&(&str, &str)> = KNOWN_UPWARD.iter().filter(|(a, b)| !upward.contains_key(&(a.to_string(), b.to_string()))).collect();
    assert!(gone.is_empty(), "no longer imported, take them off KNOWN_UPWARD: {gone:?}");
}
