//! CSI Identity: who we are, what we offer, and whether we are ready (the engine answers).

use crate::sdk::Sdk;
use strata_api::csi;
use strata_api::csi::plugin_capability::{service, volume_expansion, Service, Type as CapType, VolumeExpansion};
use tonic::{Request, Response, Status};

pub const DRIVER: &str = "csi.strata.dev";

pub struct Identity {
    pub sdk: Sdk,
    /// Controller mode offers the controller service.
    pub controller: bool,
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(&self, _: Request<csi::GetPluginInfoRequest>) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let svc = |t: service::Type| csi::PluginCapability { r#type: Some(CapType::Service(Service { r#type: t as i32 })) };
        let mut caps = vec![svc(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            caps.push(svc(service::Type::ControllerService));
        }
        caps.push(csi::PluginCapability {
            r#type: Some(CapType::VolumeExpansion(VolumeExpansion { r#type: volume_expansion::Type::Online as i32 })),
        });
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities: caps }))
    }

    async fn probe(&self, _: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = self.sdk.status().await.is_ok();
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
