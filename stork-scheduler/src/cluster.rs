//! What the extender and the monitor need from Kubernetes, behind a trait; `Kube` implements it
//! with kube-rs.

use crate::extender::types::Pod;
use crate::placement::Topology;
use async_trait::async_trait;
use k8s_openapi::api::core::v1 as core;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use std::collections::BTreeMap;

pub const DRIVER: &str = "csi.strata.dev";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const RACK_LABELS: [&str; 2] = ["strata.dev/rack", "topology.portworx.io/rack"];

pub fn topology_from_labels(labels: &BTreeMap<String, String>) -> Topology {
    Topology {
        region: labels.get(REGION_LABEL).cloned(),
        zone: labels.get(ZONE_LABEL).cloned(),
        rack: RACK_LABELS.iter().find_map(|k| labels.get(*k).cloned()),
    }
}

#[async_trait]
pub trait Cluster: Send + Sync {
    /// Strata volume handles of the pod's bound PVCs. Unbound claims (WaitForFirstConsumer)
    /// and claims of other drivers are skipped.
    async fn pod_volumes(&self, pod: &Pod) -> Result<Vec<String>, String>;
    /// Topology labels of the named nodes (for `NodeNames` requests).
    async fn node_topology(&self, names: &[String]) -> Result<BTreeMap<String, Topology>, String>;
    async fn record_event(&self, pod: &Pod, reason: &str, message: &str) -> Result<(), String>;
    /// Pods bound to a node, in every namespace.
    async fn pods_on_node(&self, node: &str) -> Result<Vec<Pod>, String>;
    async fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), String>;
    /// Deletes a pod with no grace period (its node will never confirm the deletion).
    async fn force_delete_pod(&self, namespace: &str, name: &str) -> Result<(), String>;
    /// Deletes the VolumeAttachments of our driver on `node` for the given volume handles
    /// (so the attach/detach controller does not wait for a dead node). Returns their names.
    async fn delete_volume_attachments(&self, node: &str, handles: &[String]) -> Result<Vec<String>, String>;
}

/// The name of the one Event per pod and reason (updated with a count on repeats).
pub fn event_name(pod: &str, reason: &str) -> String {
    let mut name = format!("{pod}.strata-{}", reason.to_ascii_lowercase());
    name.truncate(253);
    name
}

pub struct Kube {
    pub client: kube::Client,
}

fn to_pod(p: core::Pod) -> Pod {
    // Round-trip through JSON into our narrow view of a pod.
    serde_json::to_value(&p).ok().and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default()
}

#[async_trait]
impl Cluster for Kube {
    async fn pod_volumes(&self, pod: &Pod) -> Result<Vec<String>, String> {
        let ns = if pod.metadata.namespace.is_empty() { "default" } else { &pod.metadata.namespace };
        let pvcs: Api<core::PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let pvs: Api<core::PersistentVolume> = Api::all(self.client.clone());
        let mut out = Vec::new();
        for claim in pod.claims() {
            let Some(pvc) = pvcs.get_opt(&claim).await.map_err(|e| format!("reading PVC {ns}/{claim}: {e}"))? else {
                continue; // a missing claim is the scheduler's business, not ours
            };
            let Some(pv_name) = pvc.spec.and_then(|s| s.volume_name).filter(|n| !n.is_empty()) else {
                continue; // unbound (WaitForFirstConsumer): no placement yet
            };
            let Some(pv) = pvs.get_opt(&pv_name).await.map_err(|e| format!("reading PV {pv_name}: {e}"))? else { continue };
            if let Some(csi) = pv.spec.and_then(|s| s.csi) {
                if csi.driver == DRIVER {
                    out.push(csi.volume_handle);
                }
            }
        }
        Ok(out)
    }

    async fn node_topology(&self, names: &[String]) -> Result<BTreeMap<String, Topology>, String> {
        let nodes: Api<core::Node> = Api::all(self.client.clone());
        let mut out = BTreeMap::new();
        for n in names {
            if let Some(node) = nodes.get_opt(n).await.map_err(|e| format!("reading node {n}: {e}"))? {
                out.insert(n.clone(), topology_from_labels(&node.metadata.labels.unwrap_or_default()));
            }
        }
        Ok(out)
    }

    /// One Event per pod and reason: created the first time, then updated (count, last time,
    /// message) instead of a new Event per scheduling attempt.
    async fn record_event(&self, pod: &Pod, reason: &str, message: &str) -> Result<(), String> {
        let ns = if pod.metadata.namespace.is_empty() { "default".to_string() } else { pod.metadata.namespace.clone() };
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        let name = event_name(&pod.metadata.name, reason);
        let api: Api<core::Event> = Api::namespaced(self.client.clone(), &ns);
        let uid = (!pod.metadata.uid.is_empty()).then(|| pod.metadata.uid.clone());
        if let Some(mut ev) = api.get_opt(&name).await.map_err(|e| format!("reading event {ns}/{name}: {e}"))? {
            if ev.involved_object.uid == uid {
                ev.count = Some(ev.count.unwrap_or(1) + 1);
            } else {
                // A new pod of the same name (a StatefulSet's): its own count.
                ev.involved_object.uid = uid;
                ev.count = Some(1);
                ev.first_timestamp = Some(now.clone());
            }
            ev.last_timestamp = Some(now);
            ev.message = Some(message.into());
            return match api.replace(&name, &PostParams::default(), &ev).await {
                Ok(_) => Ok(()),
                // Updated concurrently by another attempt: that one counted.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(format!("updating event {ns}/{name}: {e}")),
            };
        }
        let ev = core::Event {
            metadata: kube::api::ObjectMeta { name: Some(name), namespace: Some(ns.clone()), ..Default::default() },
            involved_object: core::ObjectReference {
                kind: Some("Pod".into()),
                api_version: Some("v1".into()),
                name: Some(pod.metadata.name.clone()),
                namespace: Some(ns.clone()),
                uid: (!pod.metadata.uid.is_empty()).then(|| pod.metadata.uid.clone()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some("Warning".into()),
            source: Some(core::EventSource { component: Some("strata-stork".into()), ..Default::default() }),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &ev).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(format!("recording event: {e}")),
        }
    }

    async fn pods_on_node(&self, node: &str) -> Result<Vec<Pod>, String> {
        let pods: Api<core::Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let list = pods.list(&lp).await.map_err(|e| format!("listing pods on {node}: {e}"))?;
        Ok(list.items.into_iter().map(to_pod).collect())
    }

    async fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), String> {
        let pods: Api<core::Pod> = Api::namespaced(self.client.clone(), namespace);
        pods.delete(name, &DeleteParams::default()).await.map(|_| ()).map_err(|e| format!("deleting pod {namespace}/{name}: {e}"))
    }

    async fn force_delete_pod(&self, namespace: &str, name: &str) -> Result<(), String> {
        let pods: Api<core::Pod> = Api::namespaced(self.client.clone(), namespace);
        match pods.delete(name, &DeleteParams { grace_period_seconds: Some(0), ..Default::default() }).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(format!("force-deleting pod {namespace}/{name}: {e}")),
        }
    }

    async fn delete_volume_attachments(&self, node: &str, handles: &[String]) -> Result<Vec<String>, String> {
        use k8s_openapi::api::storage::v1::VolumeAttachment;
        let vas: Api<VolumeAttachment> = Api::all(self.client.clone());
        let pvs: Api<core::PersistentVolume> = Api::all(self.client.clone());
        let list = vas.list(&ListParams::default()).await.map_err(|e| format!("listing volume attachments: {e}"))?;
        let mut deleted = Vec::new();
        for va in list.items {
            if va.spec.attacher != DRIVER || va.spec.node_name != node {
                continue;
            }
            let Some(pv_name) = va.spec.source.persistent_volume_name.clone() else { continue };
            let handle = pvs
                .get_opt(&pv_name)
                .await
                .map_err(|e| format!("reading PV {pv_name}: {e}"))?
                .and_then(|pv| pv.spec)
                .and_then(|s| s.csi)
                .map(|c| c.volume_handle);
            if !handle.is_some_and(|h| handles.contains(&h)) {
                continue;
            }
            let name = va.metadata.name.clone().unwrap_or_default();
            match vas.delete(&name, &DeleteParams::default()).await {
                Ok(_) => deleted.push(name),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(format!("deleting volume attachment {name}: {e}")),
            }
        }
        Ok(deleted)
    }
}
