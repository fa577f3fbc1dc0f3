//! The engine SDK as the driver uses it: one channel to the local (or cluster) engine, and
//! channels to other nodes' engines when a change must go through a volume's target.

use strata_api::v1 as pb;
use tonic::transport::Channel;
use tonic::Status;

/// A failed SDK call as the CO sees it: the engine is unavailable, and why.
pub fn unavailable(s: Status) -> Status {
    Status::unavailable(format!("storage engine: {}", s.message()))
}

#[derive(Clone)]
pub struct Sdk {
    pub ch: Channel,
}

fn uri(addr: &str) -> String {
    strata_api::endpoint_uri(addr)
}

impl Sdk {
    /// A lazily connected channel: the driver starts even while the engine is not up yet
    /// (Probe says not ready until it answers).
    pub fn lazy(addr: &str) -> anyhow::Result<Sdk> {
        let ch = Channel::from_shared(uri(addr))?
            .connect_timeout(std::time::Duration::from_secs(3))
            .timeout(std::time::Duration::from_secs(60))
            .connect_lazy();
        Ok(Sdk { ch })
    }

    pub fn volumes(&self) -> pb::volume_service_client::VolumeServiceClient<Channel> {
        pb::volume_service_client::VolumeServiceClient::new(self.ch.clone())
    }

    pub async fn status(&self) -> Result<pb::ClusterStatusResponse, Status> {
        Ok(pb::cluster_service_client::ClusterServiceClient::new(self.ch.clone()).status(pb::ClusterStatusRequest {}).await?.into_inner())
    }

    pub async fn nodes(&self) -> Result<Vec<pb::Node>, Status> {
        Ok(pb::node_service_client::NodeServiceClient::new(self.ch.clone()).list(pb::ListNodesRequest {}).await?.into_inner().nodes)
    }

    /// The volume, or None when the engine says it does not exist.
    pub async fn inspect(&self, name: &str) -> Result<Option<pb::Volume>, Status> {
        match self.volumes().inspect(pb::InspectVolumeRequest { name: name.into() }).await {
            Ok(r) => Ok(r.into_inner().volume),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    /// The SDK of the node that serves `v` (changes go through the target), else this one.
    pub async fn for_volume(&self, v: &pb::Volume) -> Result<Sdk, Status> {
        if v.attached_node.is_empty() {
            return Ok(self.clone());
        }
        let nodes = self.nodes().await?;
        match nodes.iter().find(|n| n.id == v.attached_node) {
            Some(n) => Sdk::lazy(&n.sdk_address).map_err(|e| Status::unavailable(e.to_string())),
            None => Ok(self.clone()),
        }
    }
}
