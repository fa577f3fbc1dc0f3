//! The reconciler, in the controller-rs shape: `reconcile(Arc<StorageCluster>, Arc<Context>)`.
//! Each pass: make sure our finalizer is on; apply every desired object with server-side apply
//! (one field manager); take the next rolling-upgrade step; write status. On deletion: remove the
//! cluster-scoped objects (namespaced ones go with their owner reference), wipe the nodes if the
//! delete strategy says so, then release the finalizer.

use crate::crd::{Condition, DeleteKind, StorageCluster, StorageClusterStatus, FINALIZER};
use crate::render::{self, Object, COMPONENT, FIELD_MANAGER, INSTANCE};
use crate::status::{EngineStatus, MaintenanceError};
use crate::upgrade::{next_step, EnginePod, Step};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Client, ResourceExt};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

pub struct Context {
    pub client: Client,
    pub engines: Arc<dyn EngineStatus>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("security Secret: {0}")]
    Secret(String),
    #[error("StorageCluster has no namespace")]
    NoNamespace,
}

/// How often a settled cluster is looked at again (status, upgrades waiting on resync).
pub const REQUEUE: Duration = Duration::from_secs(30);
pub const REQUEUE_BUSY: Duration = Duration::from_secs(5);
const WIPE: &str = "strata-wipe";

pub async fn reconcile(sc: Arc<StorageCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let ns = sc.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<StorageCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let name = sc.name_any();
    let has_finalizer = sc.finalizers().iter().any(|f| f == FINALIZER);
    if sc.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        if !cleanup(&sc, &ctx).await? {
            return Ok(Action::requeue(REQUEUE_BUSY));
        }
        let rest: Vec<String> = sc.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
        api.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": rest}}))).await?;
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        let mut all = sc.finalizers().to_vec();
        all.push(FINALIZER.into());
        api.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": all}}))).await?;
    }
    if sc.spec.security.enabled {
        crate::security::ensure(&ctx.client, &ns, &sc).await.map_err(Error::Secret)?;
    }
    let mut skipped = Vec::new();
    for obj in render::desired(&sc) {
        match apply(&ctx.client, &ns, &obj).await {
            // An optional object whose API the cluster does not serve (a ServiceMonitor without
            // the Prometheus operator): skipped, and said in a condition.
            Err(kube::Error::Api(e)) if e.code == 404 && render::optional(&obj) => {
                skipped.push(format!("{} {}: the API {} is not served by this cluster", obj.api.kind, obj.name, obj.api.api_version))
            }
            r => r?,
        }
    }
    let pods = engine_pods(&ctx.client, &ns, &name).await?;
    let report = ctx.engines.report(&sc).await;
    let sync = report.as_ref().map(|r| r.sync.clone()).unwrap_or_default();
    let step = match &report {
        Ok(_) => next_step(&pods, &sc.version(), sc.spec.update_strategy.kind, sc.spec.update_strategy.max_unavailable, &sync),
        Err(e) if pods.iter().any(|p| p.version != sc.version()) => Step::Wait(format!("engine status unknown ({e}); not upgrading")),
        Err(_) => Step::Done,
    };
    if let Ok(r) = &report {
        end_upgrade_maintenance(&ctx, &sc, &pods, &r.nodes).await;
    }
    if let Step::Replace(victims) = &step {
        let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        for p in victims {
            if let Some(node) = pods.iter().find(|x| &x.name == p).map(|x| x.node.clone()).filter(|n| !n.is_empty()) {
                enter_upgrade_maintenance(&ctx, &sc, &node).await;
            }
            tracing::info!(storagecluster = %name, pod = %p, "replacing an engine pod for the upgrade");
            pods_api.delete(p, &DeleteParams::default()).await?;
            ctx.metrics.pods_replaced.inc();
        }
    }
    let mut status = status_of(&sc, &pods, &report, &step);
    status.conditions.push(condition(
        "OptionalObjects",
        skipped.is_empty(),
        if skipped.is_empty() { "Applied" } else { "APIMissing" },
        skipped.join("; "),
    ));
    let busy = status.phase != "Running";
    api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await?;
    Ok(Action::requeue(if busy { REQUEUE_BUSY } else { REQUEUE }))
}

/// Before its engine pod is replaced, the node enters maintenance: the volumes it serves move
/// to nodes holding an in-sync replica, and no target replaces its replicas while it restarts.
/// Refused (its volumes have clients there: pods on that node use them), the upgrade goes on
/// without it: those clients' I/O pauses while the engine restarts.
async fn enter_upgrade_maintenance(ctx: &Context, sc: &StorageCluster, node: &str) {
    match ctx.engines.maintenance(sc, node, true).await {
        Ok(()) => tracing::info!(%node, "node in maintenance for the upgrade"),
        Err(MaintenanceError::InUse(why)) => {
            tracing::warn!(%node, "upgrading without maintenance (volumes in use there pause while the engine restarts): {why}")
        }
        Err(MaintenanceError::Other(why)) => tracing::warn!(%node, "upgrading without maintenance: {why}"),
    }
}

/// Ends the maintenance the upgrade started, on nodes whose new engine is ready.
async fn end_upgrade_maintenance(ctx: &Context, sc: &StorageCluster, pods: &[EnginePod], nodes: &[crate::crd::NodeStatus]) {
    for n in nodes.iter().filter(|n| n.maintenance == crate::status::UPGRADE) {
        let upgraded = pods.iter().any(|p| p.node == n.id && p.version == sc.version() && p.ready && !p.terminating);
        if !upgraded {
            continue;
        }
        match ctx.engines.maintenance(sc, &n.id, false).await {
            Ok(()) => tracing::info!(node = %n.id, "upgraded: maintenance ended"),
            Err(e) => tracing::warn!(node = %n.id, "upgraded, but its maintenance could not be ended yet: {e:?}"),
        }
    }
}

pub fn error_policy(_sc: Arc<StorageCluster>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.inc();
    tracing::warn!("reconcile failed: {err}");
    Action::requeue(REQUEUE_BUSY)
}

/// Server-side apply of one object with the operator's field manager.
async fn apply(client: &Client, ns: &str, obj: &Object) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> =
        if obj.namespaced { Api::namespaced_with(client.clone(), ns, &obj.api) } else { Api::all_with(client.clone(), &obj.api) };
    api.patch(&obj.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&obj.body)).await?;
    Ok(())
}

async fn engine_pods(client: &Client, ns: &str, instance: &str) -> Result<Vec<EnginePod>, kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("{COMPONENT}=engine,{INSTANCE}={instance}"));
    Ok(api
        .list(&lp)
        .await?
        .items
        .into_iter()
        .map(|p| {
            let ready =
                p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            EnginePod {
                version: p.annotations().get("strata.dev/version").cloned().unwrap_or_default(),
                node: p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
                terminating: p.metadata.deletion_timestamp.is_some(),
                name: p.name_any(),
                ready,
            }
        })
        .collect())
}

fn condition(kind: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition { kind: kind.into(), status: if ok { "True" } else { "False" }.into(), reason: reason.into(), message }
}

/// Status from the engine pods, the engines' report and the upgrade step.
pub fn status_of(sc: &StorageCluster, pods: &[EnginePod], report: &Result<crate::status::EngineReport, String>, step: &Step) -> StorageClusterStatus {
    let ready = pods.iter().filter(|p| p.ready).count();
    let mut conditions =
        vec![condition("EnginesReady", !pods.is_empty() && ready == pods.len(), "Pods", format!("{ready} of {} engine pods ready", pods.len()))];
    let (nodes, reachable) = match report {
        Ok(r) => {
            conditions.push(condition(
                "EngineStatus",
                true,
                "Reported",
                format!("{} volume(s), {} not in sync", r.sync.volumes, r.sync.not_in_sync.len()),
            ));
            (r.nodes.clone(), true)
        }
        Err(e) => {
            conditions.push(condition("EngineStatus", false, "Unreachable", e.clone()));
            (Vec::new(), false)
        }
    };
    let upgrading = matches!(step, Step::Replace(_) | Step::Wait(_));
    let (ok, reason, msg) = match step {
        Step::Done => (true, "UpToDate", format!("every engine runs {}", sc.version())),
        Step::Replace(p) => (false, "Replacing", format!("replacing {}", p.join(", "))),
        Step::Wait(w) => (false, "Waiting", w.clone()),
        Step::Manual(n) => (false, "OnDelete", format!("{n} engine pod(s) run an old version; delete them to upgrade")),
    };
    conditions.push(condition("Upgraded", ok, reason, msg));
    let phase = if pods.is_empty() || ready == 0 {
        "Initializing"
    } else if upgrading {
        "Upgrading"
    } else if !reachable || ready < pods.len() || nodes.iter().any(|n| n.state != "online") {
        "Degraded"
    } else {
        "Running"
    };
    // The version every engine runs: it changes only once the last one runs the new one.
    let settled = !pods.is_empty() && pods.iter().all(|p| p.version == sc.version() && !p.terminating);
    let version = if settled { sc.version() } else { sc.status.as_ref().map(|s| s.version.clone()).unwrap_or_default() };
    StorageClusterStatus { phase: phase.into(), version, conditions, nodes }
}

/// Uninstall: deletes the cluster-scoped objects and, for UninstallAndWipe, runs the wipe
/// DaemonSet until every node has wiped. Returns whether it is finished.
async fn cleanup(sc: &StorageCluster, ctx: &Context) -> Result<bool, Error> {
    let ns = sc.namespace().ok_or(Error::NoNamespace)?;
    for obj in render::desired(sc).into_iter().filter(|o| !o.namespaced) {
        let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &obj.api);
        match api.delete(&obj.name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if sc.spec.delete_strategy.kind != DeleteKind::UninstallAndWipe {
        return Ok(true);
    }
    // The engines must be gone before their devices are wiped.
    let engines: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    match engines.delete("strata-engine", &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let wipe = render::wipe_daemonset(sc);
    apply(&ctx.client, &ns, &wipe).await?;
    let ds = engines.get(WIPE).await?;
    let st = ds.status.unwrap_or_default();
    let done = st.desired_number_scheduled > 0 && st.number_ready == st.desired_number_scheduled;
    if done {
        engines.delete(WIPE, &DeleteParams::default()).await?;
    }
    Ok(done)
}
