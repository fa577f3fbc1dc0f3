//! A blocking SDK client (its own small runtime), so tests stay synchronous.
#![allow(clippy::result_large_err)]

use strata_api::v1 as pb;

type Channel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, strata_api::auth::Bearer>;

pub struct Sdk {
    rt: tokio::runtime::Runtime,
    ch: Channel,
}

impl Sdk {
    pub fn new(addr: &str) -> Sdk {
        Sdk::with_token(addr, None)
    }

    /// A client that sends `token` with every call.
    pub fn with_token(addr: &str, token: Option<&str>) -> Sdk {
        Sdk::connect(addr, token, None)
    }

    /// A client over TLS when `tls` is given (an engine with a certificate serves its SDK over
    /// TLS only), sending `token` with every call.
    pub fn connect(addr: &str, token: Option<&str>, tls: Option<&strata_api::tls::ClientTls>) -> Sdk {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let t = std::time::Duration::from_secs(60);
        let ch = rt.block_on(strata_api::tls::channel(addr, tls, std::time::Duration::from_secs(5), t)).unwrap();
        let bearer = strata_api::auth::Bearer::new(token).unwrap();
        Sdk { rt, ch: tonic::service::interceptor::InterceptedService::new(ch, bearer) }
    }

    /// Stores an S3 credential (path-style requests; `passphrase` empty: backups unencrypted).
    pub fn create_credential(&self, name: &str, endpoint: &str, bucket: &str, keys: (&str, &str), passphrase: &str) -> Result<(), tonic::Status> {
        let mut c = pb::credential_service_client::CredentialServiceClient::new(self.ch.clone());
        let credential = pb::Credential {
            name: name.into(),
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            access_key: keys.0.into(),
            secret_key: keys.1.into(),
            path_style: true,
            passphrase: passphrase.into(),
            ..Default::default()
        };
        self.rt.block_on(c.create(pb::CreateCredentialRequest { credential: Some(credential) })).map(|_| ())
    }

    /// The backups in credential `cred`'s bucket.
    pub fn cloud_backups(&self, cred: &str) -> Result<Vec<pb::CloudBackup>, tonic::Status> {
        let mut c = pb::cloud_snap_service_client::CloudSnapServiceClient::new(self.ch.clone());
        self.rt.block_on(c.list(pb::CloudListRequest { credential: cred.into(), volume: String::new() })).map(|r| r.into_inner().backups)
    }

    pub fn try_list(&self) -> Result<Vec<pb::Volume>, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.list(pb::ListVolumesRequest::default())).map(|r| r.into_inner().volumes)
    }

    pub fn create(&self, name: &str, size: u64) -> Result<pb::Volume, tonic::Status> {
        self.create_full(name, size, 1, &[])
    }

    pub fn create_full(&self, name: &str, size: u64, repl: u32, labels: &[(&str, &str)]) -> Result<pb::Volume, tonic::Status> {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.create_spec(name, pb::VolumeSpec { size_bytes: size, repl, labels, ..Default::default() })
    }

    pub fn create_with_qos(&self, name: &str, size: u64, qos: pb::QosLimits) -> Result<pb::Volume, tonic::Status> {
        self.create_spec(name, pb::VolumeSpec { size_bytes: size, repl: 1, qos: Some(qos), ..Default::default() })
    }

    /// An encrypted volume.
    pub fn create_secure(&self, name: &str, size: u64, repl: u32, passphrase: &[u8]) -> Result<pb::Volume, tonic::Status> {
        self.create_request(pb::CreateVolumeRequest {
            name: name.into(),
            spec: Some(pb::VolumeSpec { size_bytes: size, repl, secure: true, ..Default::default() }),
            passphrase: passphrase.to_vec(),
        })
    }

    fn create_request(&self, req: pb::CreateVolumeRequest) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.create(req)).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn update(&self, req: pb::UpdateVolumeRequest) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.update(req)).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn inspect(&self, name: &str) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.inspect(pb::InspectVolumeRequest { name: name.into() })).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn list(&self) -> Vec<pb::Volume> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.list(pb::ListVolumesRequest::default())).unwrap().into_inner().volumes
    }

    /// `volume list` as one engine asks another for the live figures of the volumes it serves
    /// (the request marked as forwarded).
    pub fn list_forwarded(&self) -> Vec<pb::Volume> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        let mut req = tonic::Request::new(pb::ListVolumesRequest::default());
        req.metadata_mut().insert("x-strata-forwarded", tonic::metadata::MetadataValue::from_static("1"));
        self.rt.block_on(c.list(req)).unwrap().into_inner().volumes
    }

    /// One page of `volume list`: the names on it and the next page's token.
    pub fn list_page(&self, max: u32, token: &str) -> Result<(Vec<String>, String), tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        let r = self.rt.block_on(c.list(pb::ListVolumesRequest { max_entries: max, starting_token: token.into() }))?.into_inner();
        Ok((r.volumes.into_iter().map(|v| v.name).collect(), r.next_token))
    }

    pub fn resize(&self, name: &str, size: u64) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt
            .block_on(c.update(pb::UpdateVolumeRequest { name: name.into(), size_bytes: size, ..Default::default() }))
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub fn delete(&self, name: &str, force: bool) -> Result<(), tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.delete(pb::DeleteVolumeRequest { name: name.into(), force })).map(|_| ())
    }

    pub fn attach(&self, name: &str, force: bool) -> Result<pb::Volume, tonic::Status> {
        self.attach_with(name, force, b"")
    }

    /// Attach with an encrypted volume's passphrase (empty: none).
    pub fn attach_with(&self, name: &str, force: bool, passphrase: &[u8]) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt
            .block_on(c.attach(pb::AttachVolumeRequest { name: name.into(), force, passphrase: passphrase.to_vec() }))
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub fn snapshot(&self, volume: &str, name: &str) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        let req = pb::SnapshotCreateRequest { volume: volume.into(), name: name.into(), labels: Default::default() };
        self.rt.block_on(c.snapshot_create(req)).map(|r| r.into_inner().snapshot.unwrap())
    }

    /// Snapshots of `volume` (empty: all).
    pub fn snapshots(&self, volume: &str) -> Result<Vec<pb::Volume>, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.snapshot_list(pb::SnapshotListRequest { volume: volume.into() })).map(|r| r.into_inner().snapshots)
    }

    pub fn clone_volume(&self, source: &str, name: &str) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        let req = pb::CloneVolumeRequest { source: source.into(), name: name.into(), ..Default::default() };
        self.rt.block_on(c.clone_volume(req)).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn restore(&self, volume: &str, snapshot: &str) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt
            .block_on(c.restore(pb::RestoreVolumeRequest { name: volume.into(), snapshot: snapshot.into() }))
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub fn detach(&self, name: &str, force: bool) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.detach(pb::DetachVolumeRequest { name: name.into(), force })).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn create_spec(&self, name: &str, spec: pb::VolumeSpec) -> Result<pb::Volume, tonic::Status> {
        self.create_request(pb::CreateVolumeRequest { name: name.into(), spec: Some(spec), passphrase: Vec::new() })
    }

    /// Per-extent checksums of this node's replica: (extent size, [(extent, crc32c)]).
    pub fn checksums(&self, name: &str) -> Result<(u64, Vec<(u64, u32)>), tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        let r = self.rt.block_on(c.checksums(pb::ChecksumsRequest { name: name.into() }))?.into_inner();
        Ok((r.extent_size, r.extents.into_iter().map(|e| (e.extent, e.crc32c)).collect()))
    }

    pub fn ha_update(&self, name: &str, repl: u32, node: Option<&str>) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        let req = pb::HaUpdateRequest { name: name.into(), repl, node: node.unwrap_or_default().into() };
        self.rt.block_on(c.ha_update(req)).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn nodes(&self) -> Vec<pb::Node> {
        let mut c = pb::node_service_client::NodeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.list(pb::ListNodesRequest {})).unwrap().into_inner().nodes
    }

    pub fn pool(&self) -> pb::Pool {
        let mut c = pb::pool_service_client::PoolServiceClient::new(self.ch.clone());
        self.rt.block_on(c.list(pb::ListPoolsRequest {})).unwrap().into_inner().pools.remove(0)
    }

    /// Every reachable node's alerts, oldest first.
    pub fn alerts(&self) -> Vec<pb::Alert> {
        let mut c = pb::alert_service_client::AlertServiceClient::new(self.ch.clone());
        self.rt.block_on(c.list(pb::ListAlertsRequest { local_only: false })).unwrap().into_inner().alerts
    }
}
