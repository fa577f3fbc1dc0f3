//! The internal kvdb: a 3-member etcd StatefulSet and its headless Service, when the
//! StorageCluster names no external endpoints.
//!
//! Its data lives on the nodes themselves (a host directory under the data directory), never on
//! a PersistentVolume: the default StorageClass is Strata's own, and the metadata store cannot
//! wait for the volumes it describes. The members run on distinct nodes (required
//! anti-affinity). A member whose node is lost for good is replaced as any etcd member is
//! (`etcdctl member remove`, then `member add` and a restart with `--initial-cluster-state=existing`).

use super::{data_dir, labels, meta, ns, selector, Object};
use crate::crd::StorageCluster;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use serde_json::json;

const KVDB: &str = "kvdb";
pub const ETCD_IMAGE: &str = "registry.k8s.io/etcd:3.5.21-0";

pub fn objects(sc: &StorageCluster) -> Vec<Object> {
    if !sc.spec.kvdb.endpoints.is_empty() {
        return Vec::new();
    }
    let ns = ns(sc);
    // With security on: TLS for clients and peers, each side proving itself with a certificate
    // of the cluster CA (the engines use their node certificates).
    let tls = sc.spec.security.enabled;
    let scheme = if tls { "https" } else { "http" };
    let peers: Vec<String> = (0..3).map(|i| format!("strata-etcd-{i}={scheme}://strata-etcd-{i}.strata-etcd.{ns}.svc:2380")).collect();
    let tls_flags = if tls {
        " --cert-file=/etc/etcd/tls/etcd.crt --key-file=/etc/etcd/tls/etcd.key --trusted-ca-file=/etc/etcd/tls/ca.crt --client-cert-auth \
         --peer-cert-file=/etc/etcd/tls/etcd.crt --peer-key-file=/etc/etcd/tls/etcd.key --peer-trusted-ca-file=/etc/etcd/tls/ca.crt --peer-client-cert-auth"
    } else {
        ""
    };
    let script = format!(
        "exec etcd --name=$(POD_NAME) --data-dir=/var/lib/etcd \
         --listen-client-urls={scheme}://0.0.0.0:2379 --advertise-client-urls={scheme}://$(POD_NAME).strata-etcd.{ns}.svc:2379 \
         --listen-peer-urls={scheme}://0.0.0.0:2380 --initial-advertise-peer-urls={scheme}://$(POD_NAME).strata-etcd.{ns}.svc:2380 \
         --initial-cluster={} --initial-cluster-state=new{tls_flags}",
        peers.join(",")
    );
    let mut mounts = vec![json!({"name": "data", "mountPath": "/var/lib/etcd"})];
    let mut volumes = vec![json!({"name": "data", "hostPath": {"path": format!("{}/kvdb", data_dir(sc)), "type": "DirectoryOrCreate"}})];
    if tls {
        mounts.push(json!({"name": "tls", "mountPath": "/etc/etcd/tls", "readOnly": true}));
        let items = ["ca.crt", "etcd.crt", "etcd.key"].map(|k| json!({"key": k, "path": k}));
        volumes.push(json!({"name": "tls", "secret": {"secretName": sc.spec.security.secret_name, "items": items}}));
    }
    let svc = Object::typed::<Service>(json!({
        "metadata": meta(sc, "strata-etcd", KVDB),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": selector(KVDB),
            "ports": [{"name": "client", "port": 2379}, {"name": "peer", "port": 2380}],
        },
    }));
    let sts = Object::typed::<StatefulSet>(json!({
        "metadata": meta(sc, "strata-etcd", KVDB),
        "spec": {
            "serviceName": "strata-etcd",
            "replicas": 3,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(KVDB)},
            "template": {
                "metadata": {"labels": labels(sc, KVDB)},
                "spec": {
                    "containers": [{
                        "name": "etcd",
                        "image": sc.spec.kvdb.image.clone().unwrap_or_else(|| ETCD_IMAGE.into()),
                        "command": ["/bin/sh", "-c", script],
                        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "ports": [{"name": "client", "containerPort": 2379}, {"name": "peer", "containerPort": 2380}],
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                        "labelSelector": {"matchLabels": selector(KVDB)},
                        "topologyKey": "kubernetes.io/hostname",
                    }]}},
                    "tolerations": sc.spec.placement.tolerations,
                },
            },
        },
    }));
    vec![svc, sts]
}
