//! Desired state: pure functions from a `StorageCluster` to every object it needs. Objects are
//! built as JSON and parsed into their k8s-openapi types on the way (so a malformed object fails
//! here, not at the API server), then kept as JSON with the API resource to apply them with.

mod csi;
mod engine;
mod kvdb;
mod rbac;
mod stork;

pub use engine::wipe_daemonset;
pub use stork::scheduler_config;

use crate::crd::StorageCluster;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::discovery::ApiResource;
use kube::Resource;
use serde_json::{json, Value};

pub const DRIVER: &str = "csi.strata.dev";
pub const FIELD_MANAGER: &str = "strata-operator";
/// Label that marks every object the operator owns, with the StorageCluster's name as value.
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";

/// One object to apply.
#[derive(Debug, Clone)]
pub struct Object {
    pub api: ApiResource,
    pub namespaced: bool,
    pub name: String,
    pub body: Value,
}

impl Object {
    /// Parses `body` as `K` (checking it) and keeps it with `K`'s API resource.
    fn typed<K>(body: Value) -> Object
    where
        K: Resource<DynamicType = ()> + serde::de::DeserializeOwned + serde::Serialize,
    {
        let typed: K = serde_json::from_value(body).unwrap_or_else(|e| panic!("rendered {} does not parse: {e}", K::kind(&())));
        let namespaced = typed.meta().namespace.is_some();
        let name = typed.meta().name.clone().unwrap_or_default();
        let mut body = serde_json::to_value(&typed).expect("serialisable");
        body["apiVersion"] = json!(K::api_version(&()));
        body["kind"] = json!(K::kind(&()));
        Object { api: ApiResource::erase::<K>(&()), namespaced, name, body }
    }

    pub fn kind(&self) -> &str {
        &self.api.kind
    }
}

/// Metadata of a namespaced object owned by the StorageCluster.
pub(crate) fn meta(sc: &StorageCluster, name: &str, component: &str) -> Value {
    let mut m = cluster_meta(sc, name, component);
    m["namespace"] = json!(ns(sc));
    m["ownerReferences"] = json!([owner(sc)]);
    m
}

/// Metadata of a cluster-scoped object (no owner reference is possible: the finalizer deletes
/// these by label).
pub(crate) fn cluster_meta(sc: &StorageCluster, name: &str, component: &str) -> Value {
    json!({"name": name, "labels": labels(sc, component)})
}

pub(crate) fn labels(sc: &StorageCluster, component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": "strata",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        INSTANCE: sc.metadata.name.clone().unwrap_or_default(),
        COMPONENT: component,
    })
}

pub(crate) fn selector(component: &str) -> Value {
    json!({"app.kubernetes.io/name": "strata", COMPONENT: component})
}

pub(crate) fn ns(sc: &StorageCluster) -> String {
    sc.metadata.namespace.clone().unwrap_or_else(|| "kube-system".into())
}

fn owner(sc: &StorageCluster) -> Value {
    json!({
        "apiVersion": StorageCluster::api_version(&()),
        "kind": StorageCluster::kind(&()),
        "name": sc.metadata.name.clone().unwrap_or_default(),
        "uid": sc.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// The SDK address components use: the engines' Service.
pub(crate) fn sdk_address(sc: &StorageCluster) -> String {
    format!("strata-sdk.{}.svc:{}", ns(sc), sc.spec.network.sdk_port)
}

/// Every object of the cluster, in apply order (RBAC and config before workloads).
pub fn desired(sc: &StorageCluster) -> Vec<Object> {
    let mut out = Vec::new();
    out.extend(rbac::objects(sc));
    out.extend(kvdb::objects(sc));
    out.extend(engine::objects(sc));
    if sc.spec.csi.enabled {
        out.extend(csi::objects(sc));
    }
    if sc.spec.stork.enabled {
        out.extend(stork::objects(sc));
    }
    out.extend(storage_classes(sc));
    out
}

fn storage_classes(sc: &StorageCluster) -> Vec<Object> {
    sc.spec
        .storage_classes
        .iter()
        .map(|c| {
            let mut m = cluster_meta(sc, &c.name, "storageclass");
            if c.default_class {
                m["annotations"] = json!({"storageclass.kubernetes.io/is-default-class": "true"});
            }
            Object::typed::<StorageClass>(json!({
                "metadata": m,
                "provisioner": DRIVER,
                "parameters": c.parameters,
                "allowVolumeExpansion": c.allow_volume_expansion.unwrap_or(true),
                "reclaimPolicy": "Delete",
                "volumeBindingMode": "WaitForFirstConsumer",
            }))
        })
        .collect()
}

/// Where components find the system key (mounted from the security Secret).
pub(crate) const SYSTEM_KEY_DIR: &str = "/etc/strata/auth";
pub(crate) const SYSTEM_KEY_VOLUME: &str = "system-key";

/// The security Secret's `system.key` and `ca.crt` (never the CA's key), as a pod volume.
pub(crate) fn system_key_volume(sc: &StorageCluster) -> Value {
    let items = ["system.key", "ca.crt"].map(|k| json!({"key": k, "path": k}));
    json!({"name": SYSTEM_KEY_VOLUME, "secret": {"secretName": sc.spec.security.secret_name, "items": items}})
}

/// A container's flags and mount for the system key (its SDK tokens) and the CA certificate
/// (TLS to the SDK), when security is on. `ca_flag`: the container's flag for the CA file.
pub(crate) fn with_system_key(sc: &StorageCluster, container: &mut Value, ca_flag: Option<&str>) {
    if !sc.spec.security.enabled {
        return;
    }
    if let Some(a) = container["args"].as_array_mut() {
        a.push(json!(format!("--auth-system-key-file={SYSTEM_KEY_DIR}/system.key")));
        if let Some(f) = ca_flag {
            a.push(json!(format!("{f}={SYSTEM_KEY_DIR}/ca.crt")));
        }
    }
    let mount = json!({"name": SYSTEM_KEY_VOLUME, "mountPath": SYSTEM_KEY_DIR, "readOnly": true});
    match container["volumeMounts"].as_array_mut() {
        Some(m) => m.push(mount),
        None => container["volumeMounts"] = json!([mount]),
    }
}

/// The security Secret's CA certificate and key, as a pod volume: mounted only into the
/// containers that sign certificates (`certs_init`, and the engines' `certs-watch` sidecar),
/// never into the components that use them.
pub(crate) fn cluster_ca_volume(sc: &StorageCluster) -> Value {
    let items = ["ca.crt", "ca.key"].map(|k| json!({"key": k, "path": k}));
    json!({"name": "cluster-ca", "secret": {"secretName": sc.spec.security.secret_name, "items": items}})
}

/// An init container that signs a certificate for `id` (its identity; also valid for
/// `hosts`) with the cluster CA and writes `ca.crt`, `node.crt` and `node.key` into `out`,
/// mounted from `out_mount` (a volume mount), at every pod start. The CA's key reaches this
/// container, not the pod's others.
pub(crate) fn certs_init(sc: &StorageCluster, id: &str, hosts: &[String], out: &str, out_mount: Value) -> Value {
    let mut command =
        vec![json!("strata-engine"), json!("certs"), json!("issue"), json!("--ca-dir=/etc/strata/ca"), json!(format!("--node-id={id}"))];
    command.extend(hosts.iter().map(|h| json!(format!("--host={h}"))));
    command.push(json!(format!("--out={out}")));
    json!({
        "name": "certs",
        "image": image(sc),
        "command": command,
        "volumeMounts": [{"name": "cluster-ca", "mountPath": "/etc/strata/ca", "readOnly": true}, out_mount],
    })
}

/// Where a Deployment's component keeps the certificate its init container signed (beside, not
/// under, the kube-scheduler's read-only config volume at /etc/strata).
pub(crate) const COMPONENT_TLS_DIR: &str = "/etc/strata-tls";

/// A component's own certificate (identity `id`, valid for `hosts`), when security is on: the
/// init container that signs it into an in-memory volume, and the pod's volumes (that one and
/// the CA's). The containers mount `tls` at `COMPONENT_TLS_DIR`.
pub(crate) fn component_certs(sc: &StorageCluster, id: &str, hosts: &[String]) -> Option<(Value, Vec<Value>)> {
    sc.spec.security.enabled.then(|| {
        let mount = json!({"name": "tls", "mountPath": COMPONENT_TLS_DIR});
        let init = certs_init(sc, id, hosts, COMPONENT_TLS_DIR, mount);
        (init, vec![json!({"name": "tls", "emptyDir": {"medium": "Memory"}}), cluster_ca_volume(sc)])
    })
}

/// The engines' image for the components that share it.
pub(crate) fn image(sc: &StorageCluster) -> String {
    sc.spec.image.clone()
}

/// The host directory of the engines' data (and of the internal kvdb's).
pub fn data_dir(sc: &StorageCluster) -> String {
    sc.spec.storage.data_dir.clone().unwrap_or_else(|| "/var/lib/strata".into())
}

/// Objects of APIs a cluster may not serve (the Prometheus operator's): when their API is
/// missing they are skipped with a condition instead of stopping the reconcile.
pub fn optional(obj: &Object) -> bool {
    obj.api.group == "monitoring.coreos.com"
}
