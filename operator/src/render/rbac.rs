//! ServiceAccounts, ClusterRoles and their bindings for the engine, the CSI controller, the
//! extender and the scheduler.

use super::{cluster_meta, meta, ns, Object};
use crate::crd::StorageCluster;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::{json, Value};

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

const RW: &[&str] = &["get", "list", "watch", "create", "update", "patch", "delete"];
const RO: &[&str] = &["get", "list", "watch"];

/// (account, component, rules, extra built-in ClusterRoles to bind)
fn accounts() -> Vec<(&'static str, &'static str, Vec<Value>, Vec<&'static str>)> {
    vec![
        ("strata-engine", "engine", vec![rule(&[""], &["nodes"], RO)], vec![]),
        (
            "strata-csi-controller",
            "csi-controller",
            vec![
                rule(&[""], &["persistentvolumes"], RW),
                rule(&[""], &["persistentvolumeclaims"], &["get", "list", "watch", "update", "patch"]),
                rule(&[""], &["persistentvolumeclaims/status"], &["update", "patch"]),
                rule(&[""], &["nodes", "pods"], RO),
                rule(&[""], &["events"], &["list", "watch", "create", "update", "patch"]),
                rule(&["storage.k8s.io"], &["storageclasses", "csinodes"], RO),
                rule(&["storage.k8s.io"], &["volumeattachments"], &["get", "list", "watch", "update", "patch"]),
                rule(&["storage.k8s.io"], &["volumeattachments/status"], &["patch"]),
                rule(&["snapshot.storage.k8s.io"], &["volumesnapshots", "volumesnapshotclasses"], RO),
                rule(&["snapshot.storage.k8s.io"], &["volumesnapshotcontents"], RW),
                rule(&["snapshot.storage.k8s.io"], &["volumesnapshotcontents/status"], &["update", "patch"]),
                rule(&["coordination.k8s.io"], &["leases"], RW),
            ],
            vec![],
        ),
        (
            "strata-stork",
            "stork",
            vec![
                rule(&[""], &["pods"], &["get", "list", "watch", "delete"]),
                rule(&[""], &["persistentvolumeclaims", "persistentvolumes", "nodes"], RO),
                rule(&[""], &["events"], &["get", "create", "update", "patch"]),
                rule(&["storage.k8s.io"], &["volumeattachments"], &["get", "list", "delete"]),
                // Migrations: the pair's Secrets, and the migrated namespaces' resources, read.
                rule(&["stork.strata.dev"], &["clusterpairs", "migrations"], RO),
                rule(&["stork.strata.dev"], &["clusterpairs/status", "migrations/status"], &["get", "update", "patch"]),
                rule(&[""], &["secrets", "configmaps", "services"], RO),
                rule(&["apps"], &["deployments", "statefulsets"], RO),
            ],
            vec![],
        ),
        (
            "strata-scheduler",
            "scheduler",
            vec![rule(&[""], &["configmaps"], RO), rule(&["coordination.k8s.io"], &["leases"], RW)],
            vec!["system:kube-scheduler", "system:volume-scheduler"],
        ),
    ]
}

pub fn objects(sc: &StorageCluster) -> Vec<Object> {
    let mut out = Vec::new();
    let ns = ns(sc);
    for (name, component, rules, builtin) in accounts() {
        out.push(Object::typed::<ServiceAccount>(json!({"metadata": meta(sc, name, component)})));
        out.push(Object::typed::<ClusterRole>(json!({"metadata": cluster_meta(sc, name, component), "rules": rules})));
        let subject = json!([{"kind": "ServiceAccount", "name": name, "namespace": ns}]);
        out.push(Object::typed::<ClusterRoleBinding>(json!({
            "metadata": cluster_meta(sc, name, component),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": subject,
        })));
        for role in builtin {
            out.push(Object::typed::<ClusterRoleBinding>(json!({
                "metadata": cluster_meta(sc, &format!("{name}-{}", role.trim_start_matches("system:")), component),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": subject,
            })));
        }
    }
    out
}
