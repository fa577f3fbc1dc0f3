//! What the engines say about the cluster (through the SDK): node states and whether every
//! volume is in sync. Behind a trait so the reconciler can be tested without engines.

use crate::crd::{NodeStatus, StorageCluster};
use crate::upgrade::VolumeSync;
use strata_api::v1 as pb;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineReport {
    pub nodes: Vec<NodeStatus>,
    pub sync: VolumeSync,
}

/// The maintenance reason the operator's rolling upgrade gives (and ends).
pub const UPGRADE: &str = "upgrade";

/// Why a node could not enter or leave maintenance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaintenanceError {
    /// Volumes served there have clients (pods using them on that node).
    InUse(String),
    Other(String),
}

#[async_trait::async_trait]
pub trait EngineStatus: Send + Sync {
    async fn report(&self, sc: &StorageCluster) -> Result<EngineReport, String>;
    /// Puts `node` in maintenance for the upgrade (`enter`), or ends it.
    async fn maintenance(&self, sc: &StorageCluster, node: &str, enter: bool) -> Result<(), MaintenanceError>;
}

/// Asks the engines' SDK Service of the StorageCluster (with a view token signed with the
/// cluster's system key when security is on).
pub struct Sdk {
    pub client: kube::Client,
}

type Channel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, strata_api::auth::Bearer>;

impl Sdk {
    /// A channel to the engines' SDK Service with a token of `role` (when security is on).
    async fn channel(&self, sc: &StorageCluster, role: strata_api::auth::Role, call: std::time::Duration) -> Result<Channel, String> {
        let addr = format!("http://{}", crate::render::sdk_address(sc));
        let (bearer, tls) = if sc.spec.security.enabled {
            let ns = sc.metadata.namespace.clone().unwrap_or_default();
            let s = crate::security::keys(&self.client, &ns, sc).await?;
            let bearer = strata_api::auth::Bearer::minting(&s.system_key, "operator", role, strata_api::auth::DEFAULT_AUDIENCE)?;
            let (cert, key) = &s.client_cert;
            (bearer, Some(strata_api::tls::ClientTls::new(&s.ca_cert, Some((cert.as_bytes(), key.as_bytes())))?))
        } else {
            (Default::default(), None)
        };
        let connect = std::time::Duration::from_secs(3);
        let ch = strata_api::tls::channel(&addr, tls.as_ref(), connect, call).await.map_err(|e| format!("engine SDK at {addr}: {e}"))?;
        Ok(tonic::service::interceptor::InterceptedService::new(ch, bearer))
    }
}

#[async_trait::async_trait]
impl EngineStatus for Sdk {
    async fn maintenance(&self, sc: &StorageCluster, node: &str, enter: bool) -> Result<(), MaintenanceError> {
        // Entering moves the node's volumes away: it may take a while.
        let ch = self.channel(sc, strata_api::auth::Role::Admin, std::time::Duration::from_secs(300)).await.map_err(MaintenanceError::Other)?;
        let req = pb::MaintenanceRequest { node: node.to_string(), enter, reason: UPGRADE.into() };
        match pb::node_service_client::NodeServiceClient::new(ch).maintenance(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(MaintenanceError::InUse(s.message().to_string())),
            Err(s) => Err(MaintenanceError::Other(s.message().to_string())),
        }
    }

    async fn report(&self, sc: &StorageCluster) -> Result<EngineReport, String> {
        let ch = self.channel(sc, strata_api::auth::Role::View, std::time::Duration::from_secs(10)).await?;
        let status = pb::cluster_service_client::ClusterServiceClient::new(ch.clone())
            .status(pb::ClusterStatusRequest {})
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner();
        let vols = pb::volume_service_client::VolumeServiceClient::new(ch)
            .list(pb::ListVolumesRequest::default())
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner()
            .volumes;
        Ok(EngineReport {
            nodes: status
                .nodes
                .into_iter()
                .map(|n| NodeStatus { id: n.id, state: n.status, version: n.version, maintenance: n.maintenance_reason })
                .collect(),
            sync: sync_of(&vols),
        })
    }
}

/// Which volumes are not fully in sync (a replica out, or the replicas being compared).
pub fn sync_of(vols: &[pb::Volume]) -> VolumeSync {
    let not_in_sync =
        vols.iter().filter(|v| v.verifying || v.replica_nodes.iter().any(|n| !v.in_sync_nodes.contains(n))).map(|v| v.name.clone()).collect();
    VolumeSync { volumes: vols.len(), not_in_sync }
}
