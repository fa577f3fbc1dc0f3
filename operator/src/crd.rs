//! The `StorageCluster` resource (group `strata.dev`, version `v1alpha1`): one per cluster, owning
//! every Strata component. Field names follow Portworx's StorageCluster where they mean the same.

use k8s_openapi::api::core::v1::{NodeAffinity, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const GROUP: &str = "strata.dev";
pub const FINALIZER: &str = "strata.dev/uninstall";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(group = "strata.dev", version = "v1alpha1", kind = "StorageCluster", namespaced, shortname = "stc")]
#[kube(status = "StorageClusterStatus")]
#[kube(printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#)]
#[kube(printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.version"}"#)]
#[serde(rename_all = "camelCase")]
// Every field below `spec.image` has a default (container-level `serde(default)` on the
// nested structs), so a StorageCluster that names only some of a section's fields — as the Helm
// chart's values do — passes the CRD's validation.
pub struct StorageClusterSpec {
    /// Strata image (engine, CSI driver and extender share it), e.g. `ghcr.io/strata/strata:0.1.0`.
    pub image: String,
    /// Version label shown in status; defaults to the image tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub kvdb: Kvdb,
    #[serde(default)]
    pub storage: Storage,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub placement: Placement,
    #[serde(default)]
    pub csi: Csi,
    #[serde(default)]
    pub stork: Stork,
    #[serde(default)]
    pub monitoring: Monitoring,
    #[serde(default)]
    pub security: Security,
    #[serde(default)]
    pub update_strategy: UpdateStrategy,
    #[serde(default)]
    pub delete_strategy: DeleteStrategy,
    /// StorageClasses to create (Portworx parameter keys: `repl`, `io_profile`, ...).
    #[serde(default)]
    pub storage_classes: Vec<StorageClassSpec>,
}

/// Mutual TLS between engines and tokens on the SDK.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Security {
    /// On by default. Off: replication is plaintext and the SDK open (the engines warn).
    pub enabled: bool,
    /// The Secret (in the StorageCluster's namespace) holding `ca.crt` and `ca.key` (the
    /// cluster CA that signs each node's certificate at pod start) and `system.key` (signs the
    /// components' SDK tokens). The operator creates it when missing (a new self-signed CA, a
    /// random key); create it yourself to use your own CA. Default `strata-security`.
    pub secret_name: String,
}

impl Default for Security {
    fn default() -> Self {
        Security { enabled: true, secret_name: "strata-security".into() }
    }
}

/// The metadata store: an external etcd, or a 3-member etcd the operator runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Kvdb {
    /// External etcd endpoints (`http://host:2379`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Run a 3-member etcd StatefulSet instead (used when `endpoints` is empty).
    #[serde(default)]
    pub internal: bool,
    /// etcd image for the internal kvdb.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    /// Block devices for every node's pool (`/dev/vdb`).
    #[serde(default)]
    pub devices: Vec<String>,
    /// Also pool every unused whole block device of each node (the engine's `--use-all`: no
    /// partitions, filesystem, holder, mount or swap, its first MiB blank).
    #[serde(default)]
    pub use_all: bool,
    /// File-backed devices (test clusters): created under the data directory at this size.
    #[serde(default)]
    pub files: Vec<FileDevice>,
    /// Host directory for the engine's metadata and dirty-region records. Default `/var/lib/strata`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct FileDevice {
    pub name: String,
    /// Size, e.g. `10GiB`.
    pub size: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Network {
    /// gRPC SDK port. Default 9020.
    pub sdk_port: u16,
    /// Replication port. Default 9022.
    pub repl_port: u16,
    /// NBD port (node-local). Default 10809.
    pub nbd_port: u16,
    /// Metrics port. Default 9021.
    pub metrics_port: u16,
}

impl Default for Network {
    fn default() -> Self {
        Network { sdk_port: 9020, repl_port: 9022, nbd_port: 10809, metrics_port: 9021 }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Placement {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub node_affinity: Option<NodeAffinity>,
    #[serde(default)]
    #[schemars(schema_with = "any_array")]
    pub tolerations: Vec<Toleration>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Csi {
    pub enabled: bool,
    #[serde(default)]
    pub images: CsiImages,
}

impl Default for Csi {
    fn default() -> Self {
        Csi { enabled: true, images: CsiImages::default() }
    }
}

/// The kubernetes-csi sidecars.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct CsiImages {
    pub provisioner: String,
    /// Not deployed: the CSIDriver has `attachRequired: false` (the node plugin attaches).
    pub attacher: String,
    pub resizer: String,
    pub snapshotter: String,
    pub node_driver_registrar: String,
    pub livenessprobe: String,
}

impl Default for CsiImages {
    fn default() -> Self {
        CsiImages {
            provisioner: "registry.k8s.io/sig-storage/csi-provisioner:v5.2.0".into(),
            attacher: "registry.k8s.io/sig-storage/csi-attacher:v4.8.1".into(),
            resizer: "registry.k8s.io/sig-storage/csi-resizer:v1.13.2".into(),
            snapshotter: "registry.k8s.io/sig-storage/csi-snapshotter:v8.2.1".into(),
            node_driver_registrar: "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.13.0".into(),
            livenessprobe: "registry.k8s.io/sig-storage/livenessprobe:v2.15.0".into(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct Stork {
    pub enabled: bool,
    /// Extender weight in the scheduler profile. Default 5.
    pub weight: i64,
    /// kube-scheduler image for the `strata` scheduler profile.
    pub scheduler_image: String,
}

impl Default for Stork {
    fn default() -> Self {
        Stork { enabled: true, weight: 5, scheduler_image: "registry.k8s.io/kube-scheduler:v1.33.0".into() }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Monitoring {
    /// Create a Prometheus-operator ServiceMonitor for the engines' /metrics.
    #[serde(default)]
    pub service_monitor: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct UpdateStrategy {
    /// `RollingUpdate` (the operator replaces engine pods itself, waiting for every volume to be
    /// back in sync between nodes) or `OnDelete` (you delete pods).
    #[serde(rename = "type")]
    pub kind: UpdateKind,
    /// Engine pods down at once during a rolling update. Default 1.
    #[serde(default = "one")]
    pub max_unavailable: u32,
}

fn one() -> u32 {
    1
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        UpdateStrategy { kind: UpdateKind::RollingUpdate, max_unavailable: 1 }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum UpdateKind {
    RollingUpdate,
    OnDelete,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct DeleteStrategy {
    #[serde(rename = "type", default)]
    pub kind: DeleteKind,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeleteKind {
    /// Remove every component; keep the data on the nodes.
    #[default]
    Uninstall,
    /// Remove every component and wipe the pools' devices and data directories.
    UninstallAndWipe,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageClassSpec {
    pub name: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub default_class: bool,
    #[serde(default)]
    pub allow_volume_expansion: Option<bool>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageClusterStatus {
    /// Initializing, Running, Upgrading, Degraded, Uninstalling.
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub nodes: Vec<NodeStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub id: String,
    /// online, maintenance, storage_down or offline (from the engines' SDK).
    pub state: String,
    #[serde(default)]
    pub version: String,
    /// Who put the node in maintenance ("upgrade": this operator, for a rolling upgrade;
    /// "admin": a person); empty when it is not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub maintenance: String,
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn any_array(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}})
}

impl StorageCluster {
    /// The version shown in status: `spec.version`, else the image tag.
    pub fn version(&self) -> String {
        self.spec.version.clone().unwrap_or_else(|| self.spec.image.rsplit_once(':').map(|(_, t)| t.to_string()).unwrap_or_else(|| "latest".into()))
    }
}
