//! The scheduler extender (strata-stork) with its Service, and a kube-scheduler running the
//! `strata` profile that calls it (ConfigMap + Deployment).

use super::{image, labels, meta, ns, sdk_address, selector, system_key_volume, with_system_key, Object};
use crate::crd::StorageCluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use serde_json::json;

const EXTENDER: &str = "stork";
const SCHEDULER: &str = "scheduler";
const PORT: u16 = 8099;

/// The KubeSchedulerConfiguration of the `strata` profile. The extender is not ignorable (as
/// STORK ships it): it fails closed, so a pod is never bound to a node whose storage is dead
/// because the extender could not be asked.
pub fn scheduler_config(sc: &StorageCluster) -> String {
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
  - urlPrefix: http://strata-stork.{ns}.svc:{PORT}
    filterVerb: filter
    prioritizeVerb: prioritize
    weight: {weight}
    enableHTTPS: false
    nodeCacheCapable: false
    ignorable: false
"#,
        ns = ns(sc),
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
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": PORT}},
    });
    with_system_key(sc, &mut container, Some("--sdk-ca-file"));
    let volumes = if sc.spec.security.enabled { json!([system_key_volume(sc)]) } else { json!([]) };
    let extender = Object::typed::<Deployment>(json!({
        "metadata": meta(sc, "strata-stork", EXTENDER),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(EXTENDER)},
            "template": {
                "metadata": {"labels": labels(sc, EXTENDER)},
                "spec": {
                    "serviceAccountName": "strata-stork",
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
    let scheduler = Object::typed::<Deployment>(json!({
        "metadata": meta(sc, "strata-scheduler", SCHEDULER),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector(SCHEDULER)},
            "template": {
                "metadata": {"labels": labels(sc, SCHEDULER)},
                "spec": {
                    "serviceAccountName": "strata-scheduler",
                    "containers": [{
                        "name": "kube-scheduler",
                        "image": sc.spec.stork.scheduler_image,
                        "command": ["kube-scheduler", "--config=/etc/strata/scheduler-config.yaml"],
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/strata"}],
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "strata-scheduler-config"}}],
                },
            },
        },
    }));
    vec![extender, service, config, scheduler]
}
