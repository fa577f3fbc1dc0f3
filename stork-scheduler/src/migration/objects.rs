//! The remote cluster's copies of local objects: a migrated volume's PV and PVC, and the
//! namespace's other resources, each stripped of what belongs to the source cluster.

use serde_json::{json, Value};

/// Annotation on every copied object: the Migration (`namespace/name`) that made it.
pub const MIGRATED_BY: &str = "stork.strata.dev/migration";
/// Annotation on a Deployment or StatefulSet copied with 0 replicas: its replica count.
pub const REPLICAS: &str = "stork.strata.dev/replicas";

/// Annotations the source cluster's controllers wrote about their own binding and scheduling.
const CLUSTER_ANNOTATIONS: [&str; 7] = [
    "pv.kubernetes.io/bind-completed",
    "pv.kubernetes.io/bound-by-controller",
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/selected-node",
    "kubectl.kubernetes.io/last-applied-configuration",
    "deployment.kubernetes.io/revision",
];

/// `obj`'s metadata reduced to what a new object on another cluster carries: name, namespace,
/// labels and annotations (less the source cluster's own), plus `MIGRATED_BY`.
fn fresh_metadata(obj: &Value, migration: &str) -> Value {
    let m = &obj["metadata"];
    let mut annotations = m["annotations"].as_object().cloned().unwrap_or_default();
    for a in CLUSTER_ANNOTATIONS {
        annotations.remove(a);
    }
    annotations.insert(MIGRATED_BY.into(), json!(migration));
    let mut out = json!({"name": m["name"], "annotations": annotations});
    if let Some(ns) = m["namespace"].as_str() {
        out["namespace"] = json!(ns);
    }
    if let Some(l) = m["labels"].as_object().filter(|l| !l.is_empty()) {
        out["labels"] = json!(l);
    }
    out
}

/// The PV to create on the remote cluster for `pv` (bound to `pvc`), serving the restored
/// volume `handle`. Node affinity is dropped: the remote cluster's nodes are others.
pub fn remote_pv(pv: &Value, pvc: &Value, handle: &str, migration: &str) -> Value {
    let mut spec = pv["spec"].clone();
    if let Some(s) = spec.as_object_mut() {
        s.remove("nodeAffinity");
        s.insert(
            "claimRef".into(),
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"]}),
        );
    }
    spec["csi"]["volumeHandle"] = json!(handle);
    json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": fresh_metadata(pv, migration), "spec": spec})
}

/// The PVC to create on the remote cluster, bound to the PV `pv_name` from the start.
pub fn remote_pvc(pvc: &Value, pv_name: &str, migration: &str) -> Value {
    let mut spec = pvc["spec"].clone();
    if let Some(s) = spec.as_object_mut() {
        // The data comes with the PV; a source would make the remote provisioner act.
        s.remove("dataSource");
        s.remove("dataSourceRef");
    }
    spec["volumeName"] = json!(pv_name);
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": fresh_metadata(pvc, migration), "spec": spec})
}

/// The kinds a Migration with `includeResources` copies: (group, version, kind, plural).
pub const KINDS: [(&str, &str, &str, &str); 5] = [
    ("", "v1", "ConfigMap", "configmaps"),
    ("", "v1", "Secret", "secrets"),
    ("", "v1", "Service", "services"),
    ("apps", "v1", "Deployment", "deployments"),
    ("apps", "v1", "StatefulSet", "statefulsets"),
];

/// The copy of a namespaced resource for the remote cluster, or None for what is not copied:
/// objects a controller owns (it makes them again there), the cluster's own CA bundle and
/// service-account tokens (each cluster has its own).
pub fn remote_resource(obj: &Value, kind: &str, start_applications: bool, migration: &str) -> Option<Value> {
    let m = &obj["metadata"];
    if m["ownerReferences"].as_array().is_some_and(|o| !o.is_empty()) {
        return None;
    }
    if kind == "ConfigMap" && m["name"] == "kube-root-ca.crt" {
        return None;
    }
    if kind == "Secret" && obj["type"] == "kubernetes.io/service-account-token" {
        return None;
    }
    let mut out = obj.clone();
    let o = out.as_object_mut()?;
    o.remove("status");
    o.insert("metadata".into(), fresh_metadata(obj, migration));
    match kind {
        "Service" => {
            // Addresses and node ports are the source cluster's; the remote one assigns its own.
            if let Some(spec) = o.get_mut("spec").and_then(Value::as_object_mut) {
                for k in ["clusterIP", "clusterIPs", "healthCheckNodePort"] {
                    spec.remove(k);
                }
                if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        p.remove("nodePort");
                    }
                }
            }
        }
        "Deployment" | "StatefulSet" if !start_applications => {
            let replicas = o.get("spec").and_then(|s| s.get("replicas")).and_then(Value::as_i64).unwrap_or(1);
            o["metadata"]["annotations"][REPLICAS] = json!(replicas.to_string());
            o["spec"]["replicas"] = json!(0);
        }
        _ => {}
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pv_is_bound_to_its_claim_by_name_and_keeps_no_node_affinity() {
        let pv = json!({"metadata": {"name": "pvc-1", "uid": "u", "resourceVersion": "9", "labels": {"a": "b"},
            "annotations": {"pv.kubernetes.io/provisioned-by": "csi.strata.dev", "pv.kubernetes.io/bound-by-controller": "yes"}},
            "spec": {"capacity": {"storage": "1Gi"}, "csi": {"driver": "csi.strata.dev", "volumeHandle": "pvc-1", "fsType": "ext4"},
                "claimRef": {"namespace": "shop", "name": "data", "uid": "old", "resourceVersion": "3"},
                "nodeAffinity": {"required": {}}, "persistentVolumeReclaimPolicy": "Delete"},
            "status": {"phase": "Bound"}});
        let pvc = json!({"metadata": {"name": "data", "namespace": "shop"}});
        let out = remote_pv(&pv, &pvc, "pvc-1", "shop/move");
        assert_eq!(
            out["metadata"],
            json!({"name": "pvc-1", "labels": {"a": "b"},
            "annotations": {"pv.kubernetes.io/provisioned-by": "csi.strata.dev", MIGRATED_BY: "shop/move"}})
        );
        assert_eq!(out["spec"]["claimRef"], json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "shop", "name": "data"}));
        assert!(out["spec"].get("nodeAffinity").is_none() && out.get("status").is_none(), "{out}");
        assert_eq!(out["spec"]["csi"]["fsType"], "ext4");
        assert_eq!(out["spec"]["persistentVolumeReclaimPolicy"], "Delete");
    }

    #[test]
    fn resources_lose_the_source_clusters_state_and_stopped_apps_remember_their_replicas() {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop", "uid": "u"},
            "spec": {"clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"], "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {}}});
        let out = remote_resource(&svc, "Service", true, "shop/move").unwrap();
        assert_eq!(out["spec"], json!({"type": "NodePort", "ports": [{"port": 80}]}));
        assert!(out.get("status").is_none() && out["metadata"].get("uid").is_none());
        let deploy =
            json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"replicas": 3}});
        let stopped = remote_resource(&deploy, "Deployment", false, "shop/move").unwrap();
        assert_eq!((stopped["spec"]["replicas"].clone(), stopped["metadata"]["annotations"][REPLICAS].clone()), (json!(0), json!("3")));
        assert_eq!(remote_resource(&deploy, "Deployment", true, "shop/move").unwrap()["spec"]["replicas"], 3);
        let owned = json!({"metadata": {"name": "x", "ownerReferences": [{"kind": "Deployment", "name": "web"}]}});
        assert!(remote_resource(&owned, "ConfigMap", true, "m").is_none());
        assert!(remote_resource(&json!({"metadata": {"name": "kube-root-ca.crt"}}), "ConfigMap", true, "m").is_none());
        assert!(remote_resource(&json!({"metadata": {"name": "t"}, "type": "kubernetes.io/service-account-token"}), "Secret", true, "m").is_none());
    }
}
