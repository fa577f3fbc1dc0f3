//! The engine SDK as the driver uses it: one channel to the local (or cluster) engine, and
//! channels to other nodes' engines when a change must go through a volume's target.

use strata_api::auth::Bearer;
use strata_api::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Status;

/// The secret key (in a StorageClass's provisioner, node-stage, ... secrets) whose value is the
/// token calls for that volume are made with (Portworx's key).
pub const TOKEN_SECRET_KEY: &str = "auth-token";

/// A channel that sends a token with every call.
pub type Authed = InterceptedService<Channel, Bearer>;

/// A failed SDK call as the CO sees it: the engine is unavailable, and why.
pub fn unavailable(s: Status) -> Status {
    Status::unavailable(format!("storage engine: {}", s.message()))
}

#[derive(Clone)]
pub struct Sdk {
    ch: Channel,
    /// How other nodes' engines are reached (TLS under the cluster CA, or plaintext).
    tls: Option<strata_api::tls::ClientTls>,
    /// The driver's own token (--token-file), or the request's from its secrets.
    bearer: Bearer,
}

fn uri(addr: &str) -> String {
    strata_api::endpoint_uri(addr)
}

impl Sdk {
    /// A lazily connected channel: the driver starts even while the engine is not up yet
    /// (Probe says not ready until it answers).
    pub fn lazy(addr: &str, tls: Option<strata_api::tls::ClientTls>) -> anyhow::Result<Sdk> {
        Sdk::lazy_with(addr, tls, Bearer::default())
    }

    fn lazy_with(addr: &str, tls: Option<strata_api::tls::ClientTls>, bearer: Bearer) -> anyhow::Result<Sdk> {
        let (connect, call) = (std::time::Duration::from_secs(3), std::time::Duration::from_secs(60));
        let ch = strata_api::tls::channel_lazy(&uri(addr), tls.as_ref(), connect, call).map_err(|e| anyhow::anyhow!(e))?;
        Ok(Sdk { ch, tls, bearer })
    }

    /// This SDK sending `token` (none: no token).
    pub fn with_token(mut self, token: Option<&str>) -> anyhow::Result<Sdk> {
        self.bearer = Bearer::new(token).map_err(|e| anyhow::anyhow!("the SDK token: {e}"))?;
        Ok(self)
    }

    /// This SDK sending what `b` puts on each call.
    pub fn with_bearer(mut self, b: Bearer) -> Sdk {
        self.bearer = b;
        self
    }

    /// The SDK as a request's secrets say: with the token under `auth-token`, else with the
    /// driver's own.
    pub fn for_secrets(&self, secrets: &std::collections::HashMap<String, String>) -> Result<Sdk, Status> {
        match secrets.get(TOKEN_SECRET_KEY) {
            None => Ok(self.clone()),
            Some(t) => self.clone().with_token(Some(t)).map_err(|e| Status::invalid_argument(format!("secret {TOKEN_SECRET_KEY}: {e}"))),
        }
    }

    fn authed(&self) -> Authed {
        InterceptedService::new(self.ch.clone(), self.bearer.clone())
    }

    pub fn volumes(&self) -> pb::volume_service_client::VolumeServiceClient<Authed> {
        pb::volume_service_client::VolumeServiceClient::new(self.authed()).max_decoding_message_size(strata_api::MAX_ANSWER_BYTES)
    }

    pub fn cloud(&self) -> pb::cloud_snap_service_client::CloudSnapServiceClient<Authed> {
        pb::cloud_snap_service_client::CloudSnapServiceClient::new(self.authed())
    }

    pub fn credentials(&self) -> pb::credential_service_client::CredentialServiceClient<Authed> {
        pb::credential_service_client::CredentialServiceClient::new(self.authed())
    }

    pub async fn status(&self) -> Result<pb::ClusterStatusResponse, Status> {
        Ok(pb::cluster_service_client::ClusterServiceClient::new(self.authed()).status(pb::ClusterStatusRequest {}).await?.into_inner())
    }

    pub async fn nodes(&self) -> Result<Vec<pb::Node>, Status> {
        Ok(pb::node_service_client::NodeServiceClient::new(self.authed()).list(pb::ListNodesRequest {}).await?.into_inner().nodes)
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
            Some(n) => Sdk::lazy_with(&n.sdk_address, self.tls.clone(), self.bearer.clone()).map_err(|e| Status::unavailable(e.to_string())),
            None => Ok(self.clone()),
        }
    }
}
