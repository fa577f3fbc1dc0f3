//! Desired state on its own: snapshots of the rendered objects for a few StorageClusters, every
//! object parsed as its k8s-openapi type, and the committed CRD equal to crdgen's output.
//! Refresh snapshots after an intended change with `UPDATE_SNAPSHOTS=1 cargo nextest run -p strata-operator`.

use k8s_openapi::api::{apps, core, policy, rbac, storage};
use std::path::PathBuf;
use strata_operator::crd::*;
use strata_operator::render::desired;

fn cluster(name: &str, spec: StorageClusterSpec) -> StorageCluster {
    let mut sc = StorageCluster::new(name, spec);
    sc.metadata.namespace = Some("strata".into());
    sc.metadata.uid = Some("0000-uid".into());
    sc
}

fn specs() -> Vec<(&'static str, StorageCluster)> {
    let base = StorageClusterSpec { image: "ghcr.io/strata-storage/strata:0.1.0".into(), ..Default::default() };
    vec![
        ("internal-kvdb-defaults", cluster("strata", StorageClusterSpec { kvdb: Kvdb { internal: true, ..Default::default() }, ..base.clone() })),
        (
            "external-etcd-files-monitoring",
            cluster(
                "test",
                StorageClusterSpec {
                    kvdb: Kvdb { endpoints: vec!["http://etcd-0:2379".into(), "http://etcd-1:2379".into()], ..Default::default() },
                    storage: Storage { files: vec![FileDevice { name: "disk0".into(), size: "10GiB".into() }], ..Default::default() },
                    monitoring: Monitoring { service_monitor: true },
                    stork: Stork { enabled: false, ..Default::default() },
                    storage_classes: vec![StorageClassSpec {
                        name: "strata-repl2".into(),
                        parameters: [("repl".to_string(), "2".to_string()), ("io_profile".to_string(), "db".to_string())].into_iter().collect(),
                        default_class: true,
                        allow_volume_expansion: None,
                    }],
                    ..base.clone()
                },
            ),
        ),
        (
            "devices-no-csi-ondelete",
            cluster(
                "prod",
                StorageClusterSpec {
                    kvdb: Kvdb { endpoints: vec!["http://kvdb:2379".into()], ..Default::default() },
                    storage: Storage {
                        devices: vec!["/dev/vdb".into(), "/dev/vdc".into()],
                        data_dir: Some("/srv/strata".into()),
                        ..Default::default()
                    },
                    csi: Csi { enabled: false, ..Default::default() },
                    update_strategy: UpdateStrategy { kind: UpdateKind::OnDelete, max_unavailable: 1 },
                    delete_strategy: DeleteStrategy { kind: DeleteKind::UninstallAndWipe },
                    ..base
                },
            ),
        ),
    ]
}

fn render_yaml(sc: &StorageCluster) -> String {
    desired(sc).iter().map(|o| serde_yaml::to_string(&o.body).unwrap()).collect::<Vec<_>>().join("---\n")
}

#[test]
fn rendered_objects_match_their_snapshots() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots");
    for (name, sc) in specs() {
        let got = render_yaml(&sc);
        let path = dir.join(format!("{name}.yaml"));
        if std::env::var("UPDATE_SNAPSHOTS").is_ok() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} is missing: run with UPDATE_SNAPSHOTS=1", path.display()));
        assert!(got == want, "{name}: rendering changed; diff against {} (UPDATE_SNAPSHOTS=1 to accept)\n{got}", path.display());
    }
}

/// Parses an object as the k8s-openapi type of its kind; false for kinds we do not know.
fn parses(kind: &str, v: &serde_json::Value) -> Result<bool, serde_json::Error> {
    let v = v.clone();
    Ok(match kind {
        "DaemonSet" => serde_json::from_value::<apps::v1::DaemonSet>(v).map(|_| true)?,
        "Deployment" => serde_json::from_value::<apps::v1::Deployment>(v).map(|_| true)?,
        "StatefulSet" => serde_json::from_value::<apps::v1::StatefulSet>(v).map(|_| true)?,
        "Service" => serde_json::from_value::<core::v1::Service>(v).map(|_| true)?,
        "ServiceAccount" => serde_json::from_value::<core::v1::ServiceAccount>(v).map(|_| true)?,
        "ConfigMap" => serde_json::from_value::<core::v1::ConfigMap>(v).map(|_| true)?,
        "PodDisruptionBudget" => serde_json::from_value::<policy::v1::PodDisruptionBudget>(v).map(|_| true)?,
        "ClusterRole" => serde_json::from_value::<rbac::v1::ClusterRole>(v).map(|_| true)?,
        "ClusterRoleBinding" => serde_json::from_value::<rbac::v1::ClusterRoleBinding>(v).map(|_| true)?,
        "CSIDriver" => serde_json::from_value::<storage::v1::CSIDriver>(v).map(|_| true)?,
        "StorageClass" => serde_json::from_value::<storage::v1::StorageClass>(v).map(|_| true)?,
        _ => false,
    })
}

#[test]
fn every_rendered_object_is_its_kubernetes_type_and_owned() {
    for (name, sc) in specs() {
        let objs = desired(&sc);
        assert!(objs.iter().any(|o| o.kind() == "DaemonSet"), "{name}: an engine DaemonSet");
        for o in &objs {
            let known = parses(o.kind(), &o.body).unwrap_or_else(|e| panic!("{name}: {} {} does not parse: {e}", o.kind(), o.name));
            assert!(known || o.kind() == "ServiceMonitor", "{name}: unexpected kind {}", o.kind());
            assert_eq!(o.body["metadata"]["labels"]["app.kubernetes.io/instance"], sc.metadata.name.clone().unwrap());
            if o.namespaced {
                assert_eq!(o.body["metadata"]["ownerReferences"][0]["uid"], "0000-uid", "{name}: {} {} is owned", o.kind(), o.name);
            }
        }
        let kinds: Vec<&str> = objs.iter().map(|o| o.kind()).collect();
        assert_eq!(kinds.contains(&"StatefulSet"), sc.spec.kvdb.endpoints.is_empty(), "{name}: internal kvdb only when no endpoints");
        assert_eq!(kinds.contains(&"CSIDriver"), sc.spec.csi.enabled);
        assert_eq!(kinds.contains(&"ConfigMap"), sc.spec.stork.enabled, "{name}: scheduler profile with stork");
    }
}

#[test]
fn engine_arguments_follow_the_spec() {
    let (_, sc) = specs().remove(2);
    let ds = desired(&sc).into_iter().find(|o| o.kind() == "DaemonSet").unwrap();
    let args: Vec<String> = serde_json::from_value(ds.body["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap();
    for want in [
        "--etcd=http://kvdb:2379",
        "--device=/dev/vdb",
        "--device=/dev/vdc",
        "--data-dir=/srv/strata",
        "--node-id=$(NODE_NAME)",
        "--advertise=$(NODE_IP):9022",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} missing from {args:?}");
    }
    assert_eq!(ds.body["spec"]["updateStrategy"]["type"], "OnDelete", "the operator drives engine rollouts");
    let containers = ds.body["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    let names: Vec<&str> = containers.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["engine", "certs-watch"], "no CSI node plugin when csi is disabled; the certificate sidecar with security on");
    let watch: Vec<String> = serde_json::from_value(containers[1]["command"].clone()).unwrap();
    assert!(watch.iter().any(|a| a.starts_with("--watch=")) && watch.iter().any(|a| a == "--node-id=$(NODE_NAME)"), "{watch:?}");
}

#[test]
fn storage_use_all_becomes_the_engines_use_all() {
    let (_, mut sc) = specs().remove(2);
    let engine_args = |sc: &StorageCluster| -> Vec<String> {
        let ds = desired(sc).into_iter().find(|o| o.kind() == "DaemonSet").unwrap();
        serde_json::from_value(ds.body["spec"]["template"]["spec"]["containers"][0]["args"].clone()).unwrap()
    };
    assert!(!engine_args(&sc).contains(&"--use-all".to_string()));
    sc.spec.storage.use_all = true;
    assert!(engine_args(&sc).contains(&"--use-all".to_string()));
}

#[test]
fn committed_crd_equals_crdgen_output() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/strata/crds/storageclusters.strata.dev.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == strata_operator::crd_yaml().unwrap(),
        "{} is stale: run `cargo run -p strata-operator --bin crdgen {}`",
        path.display(),
        path.display()
    );
}
