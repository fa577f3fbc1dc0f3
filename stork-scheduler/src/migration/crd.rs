//! `ClusterPair` and `Migration` (group `stork.strata.dev`, version `v1alpha1`): STORK's
//! resources for moving a namespace's volumes (and optionally its other resources) to another
//! cluster through a cloud snapshot bucket both clusters can reach.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const GROUP: &str = "stork.strata.dev";

/// A remote cluster a `Migration` can move data to: its API server, its Strata SDK, and the
/// object store both clusters use. Every secret is a Secret in the ClusterPair's namespace.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(group = "stork.strata.dev", version = "v1alpha1", kind = "ClusterPair", namespaced)]
#[kube(status = "ClusterPairStatus")]
#[kube(printcolumn = r#"{"name":"Storage","type":"string","jsonPath":".status.storageStatus"}"#)]
#[kube(printcolumn = r#"{"name":"Scheduler","type":"string","jsonPath":".status.schedulerStatus"}"#)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPairSpec {
    /// The Secret holding the remote cluster's kubeconfig under the key `kubeconfig`.
    pub kubeconfig_secret: String,
    pub remote_storage: RemoteStorage,
    pub object_store: ObjectStore,
}

/// Where the remote cluster's Strata SDK answers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoteStorage {
    /// `host:port` (or an `https://` URL) of a remote engine's SDK.
    pub endpoint: String,
    /// A Secret with any of: `token` (an admin token of the remote cluster), `ca.crt` (its CA:
    /// the SDK is then reached over TLS), `tls.crt` and `tls.key` (a client certificate of that
    /// CA, for engines run with --sdk-require-client-cert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// The S3 bucket backups travel through.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStore {
    /// A Secret with `endpoint`, `bucket`, `accessKey`, `secretKey`, and optionally `region`,
    /// `pathStyle` ("true") and `passphrase` (encrypts the backups client-side). The same
    /// credential is created on both clusters.
    pub secret: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterPairStatus {
    /// "Ready" or "Error": the remote Strata SDK answers and holds the credential.
    #[serde(default)]
    pub storage_status: String,
    /// "Ready" or "Error": the remote API server answers.
    #[serde(default)]
    pub scheduler_status: String,
    /// The Strata credential both clusters use for this pair.
    #[serde(default)]
    pub credential: String,
    #[serde(default)]
    pub message: String,
}

/// Moves the PVCs of some namespaces (and optionally their other resources) to the cluster of
/// a ClusterPair: each volume is backed up to the pair's bucket, restored on the remote
/// cluster under the same name, and its PV and PVC are created there.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(group = "stork.strata.dev", version = "v1alpha1", kind = "Migration", namespaced)]
#[kube(status = "MigrationStatus")]
#[kube(printcolumn = r#"{"name":"Stage","type":"string","jsonPath":".status.stage"}"#)]
#[kube(printcolumn = r#"{"name":"Status","type":"string","jsonPath":".status.status"}"#)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// A ClusterPair in the Migration's namespace.
    pub cluster_pair: String,
    /// The namespaces whose PVCs (and resources) move.
    pub namespaces: Vec<String>,
    /// Also copy ConfigMaps, Secrets, Services, Deployments and StatefulSets. Default: true.
    #[serde(default = "yes")]
    pub include_resources: bool,
    /// Start the copied Deployments and StatefulSets; false copies them with 0 replicas (the
    /// original count kept in the `stork.strata.dev/replicas` annotation). Default: true.
    #[serde(default = "yes")]
    pub start_applications: bool,
    /// Only PVCs and resources with these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selectors: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// "Volumes", "Resources" or "Final".
    #[serde(default)]
    pub stage: String,
    /// "InProgress", "Successful", "PartialSuccess" or "Failed".
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub volumes: Vec<MigrationVolume>,
    #[serde(default)]
    pub resources: Vec<MigrationResource>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationVolume {
    pub namespace: String,
    pub persistent_volume_claim: String,
    /// The Strata volume (the PV's volume handle), restored under the same name.
    pub volume: String,
    /// The cloud backup it travels in.
    #[serde(default)]
    pub backup: String,
    #[serde(default)]
    pub uploaded_bytes: u64,
    /// "BackingUp", "Restoring", "Successful" or "Failed".
    pub status: String,
    #[serde(default)]
    pub reason: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationResource {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// "Successful" or "Failed".
    pub status: String,
    #[serde(default)]
    pub reason: String,
}

/// Both CRDs as YAML documents, as `stork-crdgen` writes them into `charts/strata/crds/`.
pub fn crds_yaml() -> Result<Vec<(&'static str, String)>, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let head = "# Generated by `cargo run -p strata-stork --bin stork-crdgen`; do not edit.\n";
    Ok(vec![
        ("clusterpairs.stork.strata.dev.yaml", format!("{head}{}", serde_yaml::to_string(&ClusterPair::crd())?)),
        ("migrations.stork.strata.dev.yaml", format!("{head}{}", serde_yaml::to_string(&Migration::crd())?)),
    ])
}
