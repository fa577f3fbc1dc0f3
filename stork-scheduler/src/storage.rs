//! What the extender needs from Strata: node states and where each volume's replicas are.

use async_trait::async_trait;
use strata_api::v1 as pb;
use tonic::transport::Channel;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageNode {
    /// The Strata node id, which the DaemonSet sets to the Kubernetes node name.
    pub id: String,
    /// "online", "storage_down" or "offline".
    pub status: String,
    /// Where peers reach the node's data port.
    pub data_address: String,
}

#[async_trait]
pub trait StorageView: Send + Sync {
    async fn nodes(&self) -> Result<Vec<StorageNode>, String>;
    /// Nodes holding replicas of the volume (by CSI volume handle = Strata volume name).
    async fn replicas(&self, volume: &str) -> Result<Vec<String>, String>;
}

/// The engine SDK.
pub struct Sdk {
    endpoint: String,
    bearer: strata_api::auth::Bearer,
    tls: Option<strata_api::tls::ClientTls>,
}

pub(crate) type Authed = tonic::service::interceptor::InterceptedService<Channel, strata_api::auth::Bearer>;

impl Sdk {
    pub fn new(endpoint: &str) -> Sdk {
        Sdk { endpoint: strata_api::endpoint_uri(endpoint), bearer: Default::default(), tls: None }
    }

    /// This SDK over TLS under the cluster CA (`Some`), or plaintext.
    pub fn with_tls(mut self, tls: Option<strata_api::tls::ClientTls>) -> Sdk {
        self.tls = tls;
        self
    }

    /// This SDK putting `b`'s token on every call.
    pub fn with_bearer(mut self, b: strata_api::auth::Bearer) -> Sdk {
        self.bearer = b;
        self
    }

    pub(crate) async fn channel(&self) -> Result<Authed, String> {
        self.channel_for(std::time::Duration::from_secs(5)).await
    }

    /// A channel whose calls may take up to `call` (a restore answers once it is written).
    pub(crate) async fn channel_for(&self, call: std::time::Duration) -> Result<Authed, String> {
        let connect = std::time::Duration::from_secs(3);
        let ch = strata_api::tls::channel(&self.endpoint, self.tls.as_ref(), connect, call)
            .await
            .map_err(|e| format!("Strata SDK at {} unreachable: {e}", self.endpoint))?;
        Ok(tonic::service::interceptor::InterceptedService::new(ch, self.bearer.clone()))
    }
}

#[async_trait]
impl StorageView for Sdk {
    async fn nodes(&self) -> Result<Vec<StorageNode>, String> {
        let mut c = pb::node_service_client::NodeServiceClient::new(self.channel().await?);
        let nodes = c.list(pb::ListNodesRequest {}).await.map_err(|s| s.message().to_string())?.into_inner().nodes;
        Ok(nodes.into_iter().map(|n| StorageNode { id: n.id, status: n.status, data_address: n.nbd_address }).collect())
    }

    async fn replicas(&self, volume: &str) -> Result<Vec<String>, String> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.channel().await?);
        let v = c
            .inspect(pb::InspectVolumeRequest { name: volume.to_string() })
            .await
            .map_err(|s| format!("volume {volume}: {}", s.message()))?
            .into_inner()
            .volume
            .ok_or_else(|| format!("volume {volume}: no record"))?;
        Ok(v.replica_nodes)
    }
}
