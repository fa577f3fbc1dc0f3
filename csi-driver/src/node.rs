//! CSI Node. NodeGetInfo and NodeGetCapabilities answer; attaching a volume as a local block
//! device (kernel NBD through netlink, else FUSE over a loop device), mkfs, mount and the rest are
//! not built yet and say so with UNIMPLEMENTED — no capability is advertised for them.

use crate::controller::{RACK_KEY, ZONE_KEY};
use crate::sdk::Sdk;
use std::collections::HashMap;
use strata_api::csi;
use tonic::{Request, Response, Status};

pub struct Node {
    pub sdk: Sdk,
    pub node_id: String,
    pub max_volumes: i64,
}

const NOT_YET: &str = "the node service's attach path (NBD or FUSE over loop, mkfs, mount) is not built yet";

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    async fn node_stage_volume(&self, _: Request<csi::NodeStageVolumeRequest>) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }
    async fn node_unstage_volume(&self, _: Request<csi::NodeUnstageVolumeRequest>) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }
    async fn node_publish_volume(&self, _: Request<csi::NodePublishVolumeRequest>) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }
    async fn node_unpublish_volume(&self, _: Request<csi::NodeUnpublishVolumeRequest>) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }
    async fn node_get_volume_stats(&self, _: Request<csi::NodeGetVolumeStatsRequest>) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }
    async fn node_expand_volume(&self, _: Request<csi::NodeExpandVolumeRequest>) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented(NOT_YET))
    }

    async fn node_get_capabilities(&self, _: Request<csi::NodeGetCapabilitiesRequest>) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities: vec![] }))
    }

    /// The node id, and its zone and rack as the engine registered them (topology keys
    /// `topology.kubernetes.io/zone` and `strata.dev/rack`).
    async fn node_get_info(&self, _: Request<csi::NodeGetInfoRequest>) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let nodes = self.sdk.nodes().await.map_err(|e| Status::unavailable(format!("storage engine: {}", e.message())))?;
        let mut segments = HashMap::new();
        if let Some(n) = nodes.iter().find(|n| n.id == self.node_id) {
            if !n.zone.is_empty() {
                segments.insert(ZONE_KEY.to_string(), n.zone.clone());
            }
            if !n.rack.is_empty() {
                segments.insert(RACK_KEY.to_string(), n.rack.clone());
            }
        }
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: (!segments.is_empty()).then_some(csi::Topology { segments }),
        }))
    }
}
