//! The CSI controller Deployment (strata-csi with the kubernetes-csi sidecars) and the CSIDriver.

use super::{
    cluster_meta, component_certs, image, labels, meta, sdk_address, selector, system_key_volume, with_system_key, Object, COMPONENT_TLS_DIR, DRIVER,
};
use crate::crd::StorageCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::storage::v1::CSIDriver;
use serde_json::json;

const CONTROLLER: &str = "csi-controller";

fn sidecar(name: &str, image: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--csi-address=/csi/csi.sock".to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    json!({"name": name, "image": image, "args": args, "volumeMounts": [{"name": "socket-dir", "mountPath": "/csi"}]})
}

pub fn objects(sc: &StorageCluster) -> Vec<Object> {
    let img = &sc.spec.csi.images;
    let le = "--leader-election";
    let mut driver_container = json!({
        "name": "csi-controller",
        "image": image(sc),
        "command": ["strata-csi"],
        "args": ["--mode=controller", "--endpoint=unix:///csi/csi.sock", format!("--sdk={}", sdk_address(sc)), "--node-id=$(NODE_NAME)"],
        "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        "ports": [{"name": "healthz", "containerPort": 9808}],
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "healthz"}, "periodSeconds": 10},
        "volumeMounts": [{"name": "socket-dir", "mountPath": "/csi"}],
    });
    with_system_key(sc, &mut driver_container, Some("--sdk-ca-file"));
    let mut volumes = vec![json!({"name": "socket-dir", "emptyDir": {}})];
    let mut init = vec![];
    if let Some((c, v)) = component_certs(sc, "strata-csi-controller", &[]) {
        volumes.push(system_key_volume(sc));
        volumes.extend(v);
        init.push(c);
        let a = driver_container["args"].as_array_mut().expect("args");
        a.push(json!(format!("--sdk-cert-file={COMPONENT_TLS_DIR}/node.crt")));
        a.push(json!(format!("--sdk-key-file={COMPONENT_TLS_DIR}/node.key")));
        driver_container["volumeMounts"]
            .as_array_mut()
            .expect("mounts")
            .push(json!({"name": "tls", "mountPath": COMPONENT_TLS_DIR, "readOnly": true}));
    }
    let deployment = Object::typed::<Deployment>(json!({
        "metadata": meta(sc, "strata-csi-controller", CONTROLLER),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(CONTROLLER)},
            "template": {
                "metadata": {"labels": labels(sc, CONTROLLER)},
                "spec": {
                    "serviceAccountName": "strata-csi-controller",
                    "initContainers": init,
                    "containers": [
                        driver_container,
                        sidecar("csi-provisioner", &img.provisioner, &[le, "--feature-gates=Topology=true", "--extra-create-metadata", "--default-fstype=ext4"]),
                        sidecar("csi-resizer", &img.resizer, &[le]),
                        sidecar("csi-snapshotter", &img.snapshotter, &[le]),
                        sidecar("liveness-probe", &img.livenessprobe, &["--health-port=9808"]),
                    ],
                    "volumes": volumes,
                },
            },
        },
    }));
    let driver = Object::typed::<CSIDriver>(json!({
        "metadata": cluster_meta(sc, DRIVER, "csi"),
        "spec": {
            // The node plugin attaches (NodeStageVolume): the engines decide by compare-and-swap
            // which one node serves a volume, so no VolumeAttachment or csi-attacher is needed.
            "attachRequired": false,
            "podInfoOnMount": false,
            "fsGroupPolicy": "File",
            "volumeLifecycleModes": ["Persistent"],
        },
    }));
    vec![deployment, driver]
}
