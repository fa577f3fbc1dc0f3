//! The extender's HTTP side: thin handlers over `placement`, with lookups through `Cluster`
//! (Kubernetes) and `StorageView` (Strata).

pub mod types;

use crate::cluster::{topology_from_labels, Cluster};
use crate::placement::{self, Candidate, Preferences, Storage, VolumePlacement};
use crate::storage::StorageView;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Arc;
use strata_api::metrics::prometheus_client;
use types::{parse_args, ExtenderArgs, ExtenderFilterResult, HostPriority, NodeList};

/// The extender's and the health monitor's counters, served on `/metrics`.
pub struct Metrics {
    pub filter_requests: Counter,
    pub prioritize_requests: Counter,
    pub bad_requests: Counter,
    pub lookup_errors: Counter,
    pub evictions: Counter,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let m = [(); 5].map(|_| Counter::default());
        let mut registry = Registry::default();
        for (name, help, c) in [
            ("strata_stork_filter_requests", "Filter calls.", &m[0]),
            ("strata_stork_prioritize_requests", "Prioritize calls.", &m[1]),
            ("strata_stork_bad_requests", "Requests answered 400.", &m[2]),
            ("strata_stork_lookup_errors", "Kubernetes or Strata lookups that failed.", &m[3]),
            ("strata_stork_evictions", "Pods deleted by the health monitor.", &m[4]),
        ] {
            registry.register(name, help, c.clone());
        }
        let [filter_requests, prioritize_requests, bad_requests, lookup_errors, evictions] = m;
        Metrics { filter_requests, prioritize_requests, bad_requests, lookup_errors, evictions, registry }
    }
}

pub struct Extender {
    pub cluster: Arc<dyn Cluster>,
    pub storage: Arc<dyn StorageView>,
    pub metrics: Arc<Metrics>,
}

/// The pod's Strata volumes with their replicas, and every node Strata knows with its state.
struct Lookup {
    volumes: Vec<VolumePlacement>,
    states: BTreeMap<String, Storage>,
}

fn storage_state(status: &str) -> Storage {
    match status {
        "online" => Storage::Online,
        "storage_down" => Storage::StorageDown,
        "maintenance" => Storage::Maintenance,
        _ => Storage::Offline,
    }
}

/// Why a lookup failed: Kubernetes could not say which volumes the pod uses, or Strata could
/// not say where they are (the pod uses Strata: the filter fails closed).
enum LookupError {
    Kube(String),
    Strata(String),
}

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupError::Kube(e) | LookupError::Strata(e) => f.write_str(e),
        }
    }
}

impl Extender {
    async fn lookup(&self, args: &ExtenderArgs) -> Result<Lookup, LookupError> {
        let handles = self.cluster.pod_volumes(&args.pod).await.map_err(LookupError::Kube)?;
        if handles.is_empty() {
            return Ok(Lookup { volumes: vec![], states: BTreeMap::new() });
        }
        let nodes = self.storage.nodes().await.map_err(LookupError::Strata)?;
        let states = nodes.iter().map(|n| (n.id.clone(), storage_state(&n.status))).collect();
        let mut volumes = Vec::new();
        for h in handles {
            volumes.push(VolumePlacement { replicas: self.storage.replicas(&h).await.map_err(LookupError::Strata)?, volume: h });
        }
        Ok(Lookup { volumes, states })
    }

    /// The candidate node names of a request.
    fn names(args: &ExtenderArgs) -> Vec<String> {
        match &args.nodes {
            Some(list) => list.items.iter().map(|n| n.metadata.name.clone()).collect(),
            None => args.node_names.clone().unwrap_or_default(),
        }
    }

    async fn candidates(&self, args: &ExtenderArgs, states: &BTreeMap<String, Storage>) -> Result<Vec<Candidate>, String> {
        let state = |n: &str| states.get(n).copied().unwrap_or(Storage::NotRunning);
        if let Some(list) = &args.nodes {
            return Ok(list
                .items
                .iter()
                .map(|n| Candidate {
                    name: n.metadata.name.clone(),
                    topology: topology_from_labels(&n.metadata.labels),
                    storage: state(&n.metadata.name),
                })
                .collect());
        }
        let names = args.node_names.clone().unwrap_or_default();
        let topo = self.cluster.node_topology(&names).await?;
        Ok(names.iter().map(|n| Candidate { name: n.clone(), topology: topo.get(n).cloned().unwrap_or_default(), storage: state(n) }).collect())
    }

    /// Nodes Strata knows, with topology where Kubernetes tells it (replicas may sit outside the
    /// candidate list).
    async fn known(&self, candidates: &[Candidate], lookup: &Lookup) -> Vec<Candidate> {
        let mut known = candidates.to_vec();
        let missing: Vec<String> =
            lookup.volumes.iter().flat_map(|v| v.replicas.iter()).filter(|r| !known.iter().any(|k| &k.name == *r)).cloned().collect();
        if !missing.is_empty() {
            let topo = self.cluster.node_topology(&missing).await.unwrap_or_default();
            for m in missing {
                let storage = lookup.states.get(&m).copied().unwrap_or(Storage::NotRunning);
                known.push(Candidate { topology: topo.get(&m).cloned().unwrap_or_default(), name: m, storage });
            }
        }
        known
    }

    pub async fn filter(&self, args: ExtenderArgs) -> ExtenderFilterResult {
        let prefs = Preferences::from_annotations(&args.pod.metadata.annotations);
        let lookup = match self.lookup(&args).await {
            Ok(l) => l,
            Err(LookupError::Kube(e)) => {
                self.metrics.lookup_errors.inc();
                return ExtenderFilterResult { error: format!("strata: {e}"), ..Default::default() };
            }
            Err(LookupError::Strata(e)) => {
                // The pod uses Strata volumes whose state is unknown: no node is known to serve them.
                self.metrics.lookup_errors.inc();
                let reason = format!("strata: cannot read where the pod's volumes are: {e}");
                let _ = self.cluster.record_event(&args.pod, "FailedScheduling", &reason).await;
                let failed = Self::names(&args).into_iter().map(|n| (n, reason.clone())).collect();
                return ExtenderFilterResult {
                    nodes: args.nodes.map(|_| NodeList { items: vec![] }),
                    node_names: args.node_names.map(|_| vec![]),
                    failed_nodes: failed,
                    ..Default::default()
                };
            }
        };
        if lookup.volumes.is_empty() {
            return ExtenderFilterResult { nodes: args.nodes, node_names: args.node_names, ..Default::default() };
        }
        let candidates = match self.candidates(&args, &lookup.states).await {
            Ok(c) => c,
            Err(e) => return ExtenderFilterResult { error: format!("strata: {e}"), ..Default::default() },
        };
        let all = self.known(&candidates, &lookup).await;
        let out = placement::filter(&lookup.volumes, &candidates, &all, prefs);
        let replica_nodes_failed: Vec<String> =
            out.failed.iter().filter(|(n, _)| lookup.volumes.iter().any(|v| v.replicas.contains(n))).map(|(n, r)| format!("{n}: {r}")).collect();
        if out.passed.is_empty() {
            let reasons: std::collections::BTreeSet<&str> = out.failed.values().map(String::as_str).collect();
            let why = reasons.into_iter().collect::<Vec<_>>().join("; ");
            let _ = self.cluster.record_event(&args.pod, "FailedScheduling", &format!("strata: no node can serve the pod's data: {why}")).await;
        } else if !replica_nodes_failed.is_empty() {
            let msg = format!("strata: nodes holding the pod's data cannot serve it: {}", replica_nodes_failed.join("; "));
            let _ = self.cluster.record_event(&args.pod, "FailedScheduling", &msg).await;
        }
        let passed: std::collections::BTreeSet<&String> = out.passed.iter().collect();
        ExtenderFilterResult {
            nodes: args.nodes.map(|l| NodeList { items: l.items.into_iter().filter(|n| passed.contains(&n.metadata.name)).collect() }),
            node_names: args.node_names.map(|_| out.passed.clone()),
            failed_nodes: out.failed,
            failed_and_unresolvable: BTreeMap::new(),
            error: String::new(),
        }
    }

    pub async fn prioritize(&self, args: ExtenderArgs) -> Vec<HostPriority> {
        let prefs = Preferences::from_annotations(&args.pod.metadata.annotations);
        let lookup = match self.lookup(&args).await {
            Ok(l) => l,
            Err(e) => {
                self.metrics.lookup_errors.inc();
                tracing::warn!("prioritize without Strata data: {e}");
                Lookup { volumes: vec![], states: BTreeMap::new() }
            }
        };
        let candidates = self.candidates(&args, &lookup.states).await.unwrap_or_else(|e| {
            tracing::warn!("prioritize without node topology: {e}");
            let names = args.node_names.clone().unwrap_or_default();
            names.into_iter().map(|name| Candidate { name, topology: Default::default(), storage: Storage::NotRunning }).collect()
        });
        let known = self.known(&candidates, &lookup).await;
        if !prefs.disable_hyperconvergence {
            for v in &lookup.volumes {
                if !candidates.iter().any(|c| v.replicas.contains(&c.name)) {
                    let msg = format!("strata: no candidate node holds a replica of volume {} (replicas on: {})", v.volume, v.replicas.join(", "));
                    let _ = self.cluster.record_event(&args.pod, "NonOptimumScheduling", &msg).await;
                }
            }
        }
        placement::score(&lookup.volumes, &candidates, &known, prefs).into_iter().map(|(host, score)| HostPriority { host, score }).collect()
    }
}

fn bad_request(ext: &Extender, reason: String) -> Response {
    ext.metrics.bad_requests.inc();
    (StatusCode::BAD_REQUEST, reason).into_response()
}

async fn filter_route(State(ext): State<Arc<Extender>>, body: Bytes) -> Response {
    ext.metrics.filter_requests.inc();
    match parse_args(&body) {
        Ok(args) => Json(ext.filter(args).await).into_response(),
        Err(reason) => bad_request(&ext, reason),
    }
}

async fn prioritize_route(State(ext): State<Arc<Extender>>, body: Bytes) -> Response {
    ext.metrics.prioritize_requests.inc();
    match parse_args(&body) {
        Ok(args) => Json(ext.prioritize(args).await).into_response(),
        Err(reason) => bad_request(&ext, reason),
    }
}

async fn metrics_route(State(ext): State<Arc<Extender>>) -> impl axum::response::IntoResponse {
    ([("content-type", strata_api::metrics::CONTENT_TYPE)], strata_api::metrics::encode(&ext.metrics.registry))
}

pub fn router(ext: Arc<Extender>) -> Router {
    Router::new()
        .route("/filter", post(filter_route))
        .route("/prioritize", post(prioritize_route))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_route))
        .with_state(ext)
}
