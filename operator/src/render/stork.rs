//! The scheduler extender (strata-stork) with its Service, and a kube-scheduler running the
//! `strata` profile that calls it (ConfigMap + Deployment).

use super::{component_certs, image, labels, meta, ns, sdk_address, selector, system_key_volume, with_system_key, Object, COMPONENT_TLS_DIR};
use crate::crd::StorageCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use serde_json::json;

const EXTENDER: &str = "stork";
const SCHEDULER: &str = "scheduler";
const PORT: u16 = 8099;
/// The identities of the extender's and the scheduler's certificates.
const EXTENDER_ID: &str = "strata-stork";
const SCHEDULER_ID: &str = "strata-scheduler";

/// The extender's Service name, which the scheduler reaches it by (and its certificate names).
fn extender_host(sc: &StorageCluster) -> String {
    format!("strata-stork.{}.svc", ns(sc))
}

/// The KubeSchedulerConfiguration of the `strata` profile. The extender is not ignorable (as
/// STORK ships it): it fails closed, so a pod is never bound to a node whose storage is dead
/// because the extender could not be asked.
/// With security on, over HTTPS: the scheduler checks the extender's certificate against the
/// cluster CA and presents its own, which the extender requires.
pub fn scheduler_config(sc: &StorageCluster) -> String {
    let (scheme, tls) = if sc.spec.security.enabled {
        (
            "https",
            format!(
                "    enableHTTPS: true\n    tlsConfig:\n      caFile: {d}/ca.crt\n      certFile: {d}/node.crt\n      keyFile: {d}/node.key\n",
                d = COMPONENT_TLS_DIR
            ),
        )
    } else {
        ("http", "    enableHTTPS: false\n".to_string())
    };
    format!(
        r#"apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
leaderElection:
  leaderElect: true
  resourceNamespace: {ns}
  resourceName: strata-scheduler
profiles:
  - schedulerName: strata
extenders:
  - urlPrefix: {scheme}://{host}:{PORT}
    filterVerb: filter
    prioritizeVerb: prioritize
    weight: {weight}
{tls}    nodeCacheCapable: false
    ignorable: false
"#,
        ns = ns(sc),
        host = extender_host(sc),
        weight = sc.spec.stork.weight
    )
}

pub fn objects(sc: &StorageCluster) -> Vec<Object> {
    let mut container = json!({
        "name": "stork",
        "image": image(sc),
        "command": ["strata-stork"],
        "args": [format!("--listen=0.0.0.0:{PORT}"), format!("--sdk={}", sdk_address(sc))],
        "ports": [{"name": "http", "containerPort": PORT}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": PORT, "scheme": if sc.spec.security.enabled { "HTTPS" } else { "HTTP" }}},
    });
    // Its certificate serves HTTPS and is its client identity at the SDK (with its CA).
    with_system_key(sc, &mut container, None);
    let certs = component_certs(sc, EXTENDER_ID, &[extender_host(sc)]);
    let mut volumes = vec![];
    let mut init = vec![];
    let args = container["args"].as_array_mut().expect("args");
    match certs {
        Some((c, v)) => {
            args.extend([json!(format!("--tls-dir={COMPONENT_TLS_DIR}")), json!(format!("--tls-client-name={SCHEDULER_ID}"))]);
            container["volumeMounts"].as_array_mut().expect("mounts").push(json!({"name": "tls", "mountPath": COMPONENT_TLS_DIR, "readOnly": true}));
            init.push(c);
            volumes.push(system_key_volume(sc));
            volumes.extend(v);
        }
        None => args.push(json!("--allow-plain-http")),
    }
    let extender = Object::typed::<Deployment>(json!({
        "metadata": meta(sc, "strata-stork", EXTENDER),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(EXTENDER)},
            "template": {
                "metadata": {"labels": labels(sc, EXTENDER)},
                "spec": {
                    "serviceAccountName": "strata-stork",
                    "initContainers": init,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }));
    let service = Object::typed::<Service>(json!({
        "metadata": meta(sc, "strata-stork", EXTENDER),
        "spec": {"selector": selector(EXTENDER), "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]},
    }));
    let config = Object::typed::<ConfigMap>(json!({
        "metadata": meta(sc, "strata-scheduler-config", SCHEDULER),
        "data": {"scheduler-config.yaml": scheduler_config(sc)},
    }));
    let mut scheduler_mounts = vec![json!({"name": "config", "mountPath": "/etc/strata"})];
    let mut scheduler_volumes = vec![json!({"name": "config", "configMap": {"name": "strata-scheduler-config"}})];
    let mut scheduler_init = vec![];
    if let Some((c, v)) = component_certs(sc, SCHEDULER_ID, &[]) {
        scheduler_mounts.push(json!({"name": "tls", "mountPath": COMPONENT_TLS_DIR, "readOnly": true}));
        scheduler_init.push(c);
        scheduler_volumes.extend(v);
    }
    let scheduler = Object::typed::<Deployment>(json!({
        "metadata": meta(sc, "strata-scheduler", SCHEDULER),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(SCHEDULER)},
            "template": {
                "metadata": {"labels": labels(sc, SCHEDULER)},
                "spec": {
                    "serviceAccountName": "strata-scheduler",
                    "initContainers": scheduler_init,
                    "containers": [{
                        "name": "kube-scheduler",
                        "image": sc.spec.stork.scheduler_image,
                        "command": ["kube-scheduler", "--config=/etc/strata/scheduler-config.yaml"],
                        "volumeMounts": scheduler_mounts,
                    }],
                    "volumes": scheduler_volumes,
                },
            },
        },
    }));
    vec![extender, service, config, scheduler]
}
