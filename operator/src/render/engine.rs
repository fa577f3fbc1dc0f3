//! The engine DaemonSet (engine, CSI node plugin, node-driver-registrar, livenessprobe), the SDK
//! Service and, when asked, a ServiceMonitor.

use super::{certs_init, cluster_ca_volume, data_dir, image, labels, meta, selector, system_key_volume, with_system_key, Object};
use crate::crd::StorageCluster;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Service;
use kube::discovery::ApiResource;
use serde_json::{json, Value};

pub const ENGINE: &str = "engine";
const PLUGIN_DIR: &str = "/var/lib/kubelet/plugins/csi.strata.dev";

/// The engine's etcd endpoints: external ones, or the internal kvdb's members.
pub(crate) fn etcd_endpoints(sc: &StorageCluster) -> Vec<String> {
    if !sc.spec.kvdb.endpoints.is_empty() {
        return sc.spec.kvdb.endpoints.clone();
    }
    let ns = super::ns(sc);
    let scheme = if sc.spec.security.enabled { "https" } else { "http" };
    (0..3).map(|i| format!("{scheme}://strata-etcd-{i}.strata-etcd.{ns}.svc:2379")).collect()
}

fn engine_args(sc: &StorageCluster) -> Vec<String> {
    let n = &sc.spec.network;
    let dir = data_dir(sc);
    let mut a = vec![
        format!("--data-dir={dir}"),
        format!("--etcd={}", etcd_endpoints(sc).join(",")),
        "--node-id=$(NODE_NAME)".into(),
        format!("--sdk-listen=0.0.0.0:{}", n.sdk_port),
        format!("--repl-listen=0.0.0.0:{}", n.repl_port),
        format!("--advertise=$(NODE_IP):{}", n.repl_port),
        format!("--metrics-listen=0.0.0.0:{}", n.metrics_port),
        format!("--nbd-listen=127.0.0.1:{}", n.nbd_port),
        format!("--nbd-socket={dir}/nbd.sock"),
    ];
    a.extend(sc.spec.storage.devices.iter().map(|d| format!("--device={d}")));
    for f in &sc.spec.storage.files {
        a.push(format!("--device={dir}/{}.img", f.name));
    }
    if let Some(f) = sc.spec.storage.files.first() {
        a.push(format!("--device-size={}", f.size));
    }
    if sc.spec.storage.use_all {
        a.push("--use-all".into());
    }
    if sc.spec.security.enabled {
        // Every SDK client shows a certificate of the cluster CA: the CSI plugins, the
        // extender and the operator have theirs.
        a.push(format!("--tls-dir={dir}/tls"));
        a.push("--sdk-require-client-cert".into());
    }
    a
}

/// With security on: an init container that signs this node's certificate (its identity: the
/// Kubernetes node name) with the cluster CA from the security Secret into `<data-dir>/tls` at
/// every pod start; with `--watch`, the same container runs beside the engine as `certs-watch`.
/// The CA's key is mounted into those two, never into the engine or the CSI plugin.
fn engine_certs_init(sc: &StorageCluster) -> Option<Value> {
    sc.spec.security.enabled.then(|| {
        let dir = data_dir(sc);
        let mut init = certs_init(sc, "$(NODE_NAME)", &[], &format!("{dir}/tls"), json!({"name": "data", "mountPath": dir}));
        init["env"] = node_env();
        init
    })
}

fn node_env() -> Value {
    json!([
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
    ])
}

pub fn objects(sc: &StorageCluster) -> Vec<Object> {
    let n = &sc.spec.network;
    let dir = data_dir(sc);
    let mut containers = vec![json!({
        "name": "engine",
        "image": image(sc),
        "command": ["strata-engine"],
        "args": engine_args(sc),
        "env": node_env(),
        "securityContext": {"privileged": true},
        "ports": [
            {"name": "sdk", "containerPort": n.sdk_port},
            {"name": "replication", "containerPort": n.repl_port},
            {"name": "metrics", "containerPort": n.metrics_port},
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": n.metrics_port}, "periodSeconds": 5},
        "volumeMounts": [
            {"name": "dev", "mountPath": "/dev"},
            {"name": "data", "mountPath": dir},
        ],
    })];
    let mut volumes =
        vec![json!({"name": "dev", "hostPath": {"path": "/dev"}}), json!({"name": "data", "hostPath": {"path": dir, "type": "DirectoryOrCreate"}})];
    with_system_key(sc, &mut containers[0], None);
    if let Some(mut watch) = engine_certs_init(sc) {
        // Beside the engine for the pod's life: a rotated Secret (a new CA bundled with the old
        // one in ca.crt, the new key) is signed into the node's certificate, which the engine
        // reloads, without a restart.
        watch["name"] = json!("certs-watch");
        watch["command"].as_array_mut().expect("command").push(json!("--watch=30"));
        containers.push(watch);
    }
    if sc.spec.security.enabled {
        volumes.push(system_key_volume(sc));
        volumes.push(cluster_ca_volume(sc));
    }
    if sc.spec.csi.enabled {
        let img = &sc.spec.csi.images;
        let mut node_plugin = json!({
            "name": "csi-node",
            "image": image(sc),
            "command": ["strata-csi"],
            "args": ["--mode=node", "--endpoint=unix:///csi/csi.sock", format!("--sdk=127.0.0.1:{}", n.sdk_port), "--node-id=$(NODE_NAME)"],
            "env": node_env(),
            "securityContext": {"privileged": true},
            "ports": [{"name": "healthz", "containerPort": 9809}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "healthz"}, "periodSeconds": 10, "failureThreshold": 5},
            "volumeMounts": [
                {"name": "plugin-dir", "mountPath": "/csi"},
                {"name": "kubelet-dir", "mountPath": "/var/lib/kubelet", "mountPropagation": "Bidirectional"},
                {"name": "dev", "mountPath": "/dev"},
                {"name": "data", "mountPath": dir},
            ],
        });
        with_system_key(sc, &mut node_plugin, Some("--sdk-ca-file"));
        if sc.spec.security.enabled {
            // The node's own certificate (the init container's) is the node plugin's identity.
            let a = node_plugin["args"].as_array_mut().expect("args");
            a.push(json!(format!("--sdk-cert-file={dir}/tls/node.crt")));
            a.push(json!(format!("--sdk-key-file={dir}/tls/node.key")));
        }
        containers.push(node_plugin);
        containers.push(json!({
            "name": "node-driver-registrar",
            "image": img.node_driver_registrar,
            "args": ["--csi-address=/csi/csi.sock", format!("--kubelet-registration-path={PLUGIN_DIR}/csi.sock")],
            "volumeMounts": [
                {"name": "plugin-dir", "mountPath": "/csi"},
                {"name": "registration-dir", "mountPath": "/registration"},
            ],
        }));
        containers.push(json!({
            "name": "liveness-probe",
            "image": img.livenessprobe,
            "args": ["--csi-address=/csi/csi.sock", "--health-port=9809"],
            "volumeMounts": [{"name": "plugin-dir", "mountPath": "/csi"}],
        }));
        volumes.push(json!({"name": "plugin-dir", "hostPath": {"path": PLUGIN_DIR, "type": "DirectoryOrCreate"}}));
        volumes.push(json!({"name": "kubelet-dir", "hostPath": {"path": "/var/lib/kubelet", "type": "Directory"}}));
        volumes.push(json!({"name": "registration-dir", "hostPath": {"path": "/var/lib/kubelet/plugins_registry", "type": "Directory"}}));
    }
    let mut pod_spec = json!({
        "serviceAccountName": "strata-engine",
        "hostNetwork": true,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "priorityClassName": "system-node-critical",
        "initContainers": engine_certs_init(sc).into_iter().collect::<Vec<_>>(),
        "containers": containers,
        "volumes": volumes,
        "tolerations": sc.spec.placement.tolerations,
    });
    if let Some(a) = &sc.spec.placement.node_affinity {
        pod_spec["affinity"] = json!({"nodeAffinity": a});
    }
    let ds = Object::typed::<DaemonSet>(json!({
        "metadata": meta(sc, "strata-engine", ENGINE),
        "spec": {
            "selector": {"matchLabels": selector(ENGINE)},
            // The operator replaces engine pods itself, one node at a time, when volumes are in sync.
            "updateStrategy": {"type": "OnDelete"},
            "template": {"metadata": {"labels": labels(sc, ENGINE), "annotations": {"strata.dev/version": sc.version()}}, "spec": pod_spec},
        },
    }));
    let svc = Object::typed::<Service>(json!({
        "metadata": meta(sc, "strata-sdk", ENGINE),
        "spec": {
            "selector": selector(ENGINE),
            "ports": [
                {"name": "sdk", "port": n.sdk_port, "targetPort": n.sdk_port},
                {"name": "metrics", "port": n.metrics_port, "targetPort": n.metrics_port},
            ],
        },
    }));
    // No PodDisruptionBudget: a PDB over DaemonSet pods never allows a disruption (the
    // disruption controller needs a scale subresource DaemonSets lack), and drains skip DaemonSet
    // pods anyway. Engines leave a node through the operator's upgrade, one at a time.
    let mut out = vec![ds, svc];
    if sc.spec.monitoring.service_monitor {
        out.push(service_monitor(sc));
    }
    out
}

/// A Prometheus-operator ServiceMonitor (no k8s-openapi type: built as JSON).
fn service_monitor(sc: &StorageCluster) -> Object {
    let api = ApiResource {
        group: "monitoring.coreos.com".into(),
        version: "v1".into(),
        api_version: "monitoring.coreos.com/v1".into(),
        kind: "ServiceMonitor".into(),
        plural: "servicemonitors".into(),
    };
    let body = json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta(sc, "strata-engine", ENGINE),
        "spec": {"selector": {"matchLabels": selector(ENGINE)}, "endpoints": [{"port": "metrics", "path": "/metrics"}]},
    });
    Object { api, namespaced: true, name: "strata-engine".into(), body }
}

/// UninstallAndWipe: on every engine node, an init container clears the pool's devices' Strata
/// superblocks and the data directory; the pod then idles Ready so the operator can tell that
/// every node is done.
pub fn wipe_daemonset(sc: &StorageCluster) -> Object {
    let dir = data_dir(sc);
    let mut script = format!("set -e; rm -rf {dir}/*;");
    for d in &sc.spec.storage.devices {
        script.push_str(&format!(" dd if=/dev/zero of={d} bs=1M count=64 conv=fsync;"));
    }
    let mut pod_spec = json!({
        "initContainers": [{
            "name": "wipe",
            "image": image(sc),
            "command": ["/bin/sh", "-c", script],
            "securityContext": {"privileged": true},
            "volumeMounts": [{"name": "dev", "mountPath": "/dev"}, {"name": "data", "mountPath": dir}],
        }],
        "containers": [{"name": "done", "image": image(sc), "command": ["/bin/sh", "-c", "sleep infinity"]}],
        "volumes": [
            {"name": "dev", "hostPath": {"path": "/dev"}},
            {"name": "data", "hostPath": {"path": dir, "type": "DirectoryOrCreate"}},
        ],
        "tolerations": sc.spec.placement.tolerations,
    });
    if let Some(a) = &sc.spec.placement.node_affinity {
        pod_spec["affinity"] = json!({"nodeAffinity": a});
    }
    Object::typed::<DaemonSet>(json!({
        "metadata": meta(sc, "strata-wipe", "wipe"),
        "spec": {
            "selector": {"matchLabels": selector("wipe")},
            "template": {"metadata": {"labels": labels(sc, "wipe")}, "spec": pod_spec},
        },
    }))
}
