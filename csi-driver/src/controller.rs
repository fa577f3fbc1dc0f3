//! CSI Controller over the engine SDK: volumes by name (the CO's name is the volume id), with
//! every idempotency and error-code rule of the spec that applies to what we support.

use crate::cloud;
use crate::inflight::InFlight;
use crate::params::{self, VolumeParams};
use crate::sdk::Sdk;
use std::collections::HashMap;
use strata_api::csi::controller_service_capability::{rpc, Rpc, Type as CapType};
use strata_api::csi::{self, volume_capability::access_mode::Mode};
use strata_api::v1 as pb;
use tonic::{Code, Request, Response, Status};

/// Size of a volume whose request gives no capacity.
pub const DEFAULT_SIZE: i64 = 1 << 30;
const ALIGN: i64 = 4096;
pub const ZONE_KEY: &str = "topology.kubernetes.io/zone";
pub const RACK_KEY: &str = "strata.dev/rack";
/// Every node plugin reports its node under this key (NodeGetInfo), so topology-aware
/// provisioning works without zone or rack labels.
pub const NODE_KEY: &str = "topology.strata.dev/node";
/// The Strata cluster a node belongs to: a volume is usable from every node of its cluster,
/// which is the accessible topology CreateVolume reports.
pub const CLUSTER_KEY: &str = "topology.strata.dev/cluster";

pub struct Controller {
    pub sdk: Sdk,
    inflight: InFlight,
}

impl Controller {
    pub fn new(sdk: Sdk) -> Controller {
        Controller { sdk, inflight: InFlight::default() }
    }
}

/// Checks the capabilities we can serve: mount (ext4/xfs) or block, on one node at a time.
pub fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<(), String> {
    if caps.is_empty() {
        return Err("volume_capabilities is required".into());
    }
    for c in caps {
        let mode = c.access_mode.as_ref().map(|m| m.mode).ok_or("a volume capability has no access_mode")?;
        let mode = Mode::try_from(mode).unwrap_or(Mode::Unknown);
        if !matches!(mode, Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly | Mode::SingleNodeSingleWriter) {
            return Err(format!("access mode {} is not supported: Strata volumes are used on one node at a time", mode.as_str_name()));
        }
        match &c.access_type {
            Some(csi::volume_capability::AccessType::Block(_)) => {}
            Some(csi::volume_capability::AccessType::Mount(m)) => {
                if !matches!(m.fs_type.as_str(), "" | "ext4" | "xfs") {
                    return Err(format!("fs_type {:?} is not supported: use ext4 or xfs", m.fs_type));
                }
            }
            None => return Err("a volume capability has neither block nor mount".into()),
        }
    }
    Ok(())
}

/// The size for a capacity range: required (or the default), rounded up to 4 KiB, within limit.
pub fn size_for(range: Option<&csi::CapacityRange>) -> Result<i64, Status> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Status::invalid_argument("capacity_range must not be negative"));
    }
    if lim > 0 && req > lim {
        return Err(Status::invalid_argument(format!("capacity_range: required_bytes {req} exceeds limit_bytes {lim}")));
    }
    let want = if req > 0 {
        req
    } else if lim > 0 {
        lim.min(DEFAULT_SIZE)
    } else {
        DEFAULT_SIZE
    };
    let size = (want + ALIGN - 1) / ALIGN * ALIGN;
    if lim > 0 && size > lim {
        return Err(Status::out_of_range(format!("the smallest size Strata can give ({size} bytes, 4 KiB units) exceeds limit_bytes {lim}")));
    }
    Ok(size)
}

fn size_fits(size: i64, range: Option<&csi::CapacityRange>) -> bool {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    size >= req && (lim == 0 || size <= lim)
}

fn csi_snapshot(v: &pb::Volume) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: v.spec.as_ref().map_or(0, |s| s.size_bytes) as i64,
        snapshot_id: v.name.clone(),
        source_volume_id: v.snapshot_of.clone(),
        creation_time: Some(prost_types::Timestamp { seconds: v.created_unix as i64, nanos: 0 }),
        ready_to_use: v.state == "available",
        group_snapshot_id: String::new(),
    }
}

/// What a CreateVolume copies its data from, by the engine's name for it.
enum Source {
    Snapshot(String),
    Volume(String),
}

impl Source {
    fn of(s: Option<&csi::VolumeContentSource>) -> Result<Option<Source>, Status> {
        use csi::volume_content_source::Type;
        match s.and_then(|s| s.r#type.as_ref()) {
            None => Ok(None),
            Some(Type::Snapshot(s)) if s.snapshot_id.is_empty() => {
                Err(Status::invalid_argument("volume_content_source.snapshot.snapshot_id is required"))
            }
            Some(Type::Volume(v)) if v.volume_id.is_empty() => Err(Status::invalid_argument("volume_content_source.volume.volume_id is required")),
            Some(Type::Snapshot(s)) => Ok(Some(Source::Snapshot(s.snapshot_id.clone()))),
            Some(Type::Volume(v)) => Ok(Some(Source::Volume(v.volume_id.clone()))),
        }
    }

    fn name(&self) -> &str {
        match self {
            Source::Snapshot(n) | Source::Volume(n) => n,
        }
    }

    fn content(&self) -> csi::VolumeContentSource {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        let t = match self {
            Source::Snapshot(n) => Type::Snapshot(SnapshotSource { snapshot_id: n.clone() }),
            Source::Volume(n) => Type::Volume(VolumeSource { volume_id: n.clone() }),
        };
        csi::VolumeContentSource { r#type: Some(t) }
    }

    /// The source as the engine has it; NOT_FOUND when it is missing or of the other kind.
    async fn find(&self, sdk: &Sdk) -> Result<pb::Volume, Status> {
        let v = sdk.inspect(self.name()).await.map_err(map_sdk)?;
        match (self, v) {
            (Source::Snapshot(_), Some(v)) if !v.snapshot_of.is_empty() => Ok(v),
            (Source::Volume(_), Some(v)) if v.snapshot_of.is_empty() => Ok(v),
            (Source::Snapshot(n), _) => Err(Status::not_found(format!("snapshot {n} does not exist"))),
            (Source::Volume(n), _) => Err(Status::not_found(format!("source volume {n} does not exist"))),
        }
    }
}

fn csi_volume(v: &pb::Volume, fs: &str) -> csi::Volume {
    let spec = v.spec.clone().unwrap_or_default();
    let mut ctx = HashMap::new();
    ctx.insert("repl".to_string(), spec.repl.to_string());
    if !fs.is_empty() {
        ctx.insert("fs".to_string(), fs.to_string());
    }
    csi::Volume {
        capacity_bytes: spec.size_bytes as i64,
        volume_id: v.name.clone(),
        volume_context: ctx,
        content_source: None,
        accessible_topology: vec![],
    }
}

fn condition(v: &pb::Volume) -> csi::VolumeCondition {
    let behind: Vec<&String> = v.replica_nodes.iter().filter(|n| !v.in_sync_nodes.contains(n)).collect();
    if behind.is_empty() && !v.verifying {
        csi::VolumeCondition { abnormal: false, message: format!("{} replica(s) in sync", v.in_sync_nodes.len()) }
    } else {
        let list: Vec<&str> = behind.iter().map(|s| s.as_str()).collect();
        csi::VolumeCondition {
            abnormal: true,
            message: format!("replica(s) out of sync: {}{}", list.join(","), if v.verifying { "; replicas being compared" } else { "" }),
        }
    }
}

/// The node a topology requirement prefers (WaitForFirstConsumer: the node the scheduler
/// selected), for the first replica and the target. Accessibility requirements say where the
/// volume must be usable from, and a Strata volume is usable from every node, so they never
/// restrict where the other replicas go (the StorageClass's `nodes`/`zones`/`racks` do).
pub fn preferred_node(req: Option<&csi::TopologyRequirement>) -> Option<String> {
    req?.preferred.iter().find_map(|t| t.segments.get(NODE_KEY).cloned())
}

/// The accessible topology of a new volume: its whole cluster, when the CO's topology carries
/// the cluster key (every node of the cluster matches it, nodes added later included); none
/// otherwise, which leaves the volume usable everywhere.
fn accessible_topology(req: Option<&csi::TopologyRequirement>) -> Vec<csi::Topology> {
    let Some(r) = req else { return vec![] };
    let cluster = r.preferred.iter().chain(&r.requisite).find_map(|t| t.segments.get(CLUSTER_KEY).cloned());
    cluster.map(|c| csi::Topology { segments: [(CLUSTER_KEY.to_string(), c)].into() }).into_iter().collect()
}

/// A page of sorted names: the token is the name to start from (stable under creations and
/// deletions). Returns the start index and the page length.
fn page_of(names: &[&str], token: &str, max_entries: i32) -> Result<(usize, usize), Status> {
    let start = if token.is_empty() {
        0
    } else {
        match names.iter().position(|n| *n >= token) {
            Some(i) if names[i] == token => i,
            _ => return Err(Status::aborted(format!("starting_token {token:?} is not valid any more"))),
        }
    };
    let left = names.len() - start;
    let n = if max_entries == 0 { left } else { (max_entries as usize).min(left) };
    Ok((start, n))
}

impl Controller {
    /// Grows a (detached, just made) volume to `size`.
    async fn grow(sdk: &Sdk, name: &str, size: i64) -> Result<pb::Volume, Status> {
        let grown = sdk
            .volumes()
            .update(pb::UpdateVolumeRequest { name: name.to_string(), size_bytes: size as u64, ..Default::default() })
            .await
            .map_err(map_sdk)?;
        grown.into_inner().volume.ok_or_else(|| Status::internal("engine returned no volume"))
    }

    /// CreateVolume from a snapshot or a volume: a clone (shared extents) on the source's
    /// replica nodes, grown when the request asks for more than the source's size.
    async fn create_from(sdk: &Sdk, r: &csi::CreateVolumeRequest, p: &VolumeParams, src: Source) -> Result<csi::Volume, Status> {
        if let Some((cred, id)) = cloud::parse_id(src.name()) {
            return Self::restore_from_cloud(sdk, r, p, &src, cred, id).await;
        }
        let sv = src.find(sdk).await?;
        let src_size = sv.spec.as_ref().map_or(0, |s| s.size_bytes) as i64;
        let want = size_from(r, &src, src_size)?;
        if sv.spec.as_ref().is_some_and(|s| s.secure) != p.secure {
            return Err(Status::invalid_argument(format!("secure: a copy of {} is encrypted exactly when its source is", src.name())));
        }
        let req = pb::CloneVolumeRequest {
            source: src.name().to_string(),
            name: r.name.clone(),
            labels: p.labels.clone().into_iter().collect(),
            ownership: namespace_owner(p),
        };
        let v = match sdk.volumes().clone_volume(req).await {
            Ok(resp) => resp.into_inner().volume.ok_or_else(|| Status::internal("engine returned no volume"))?,
            Err(s) if s.code() == Code::NotFound => return Err(Status::not_found(s.message().to_string())),
            Err(s) => return Err(map_sdk(s)),
        };
        Self::made_from(sdk, r, p, &src, v, want, src_size).await
    }

    /// The CSI volume made from `src` (`v` as the engine made it, of `src_size` bytes), grown
    /// to `want` first when that is more.
    async fn made_from(
        sdk: &Sdk,
        r: &csi::CreateVolumeRequest,
        p: &VolumeParams,
        src: &Source,
        mut v: pb::Volume,
        want: i64,
        src_size: i64,
    ) -> Result<csi::Volume, Status> {
        if want > src_size {
            v = Self::grow(sdk, &r.name, want).await?;
        }
        let mut out = csi_volume(&v, &p.fs);
        out.content_source = Some(src.content());
        out.accessible_topology = accessible_topology(r.accessibility_requirements.as_ref());
        Ok(out)
    }
}

/// The size of a volume made from `src` of `src_size` bytes: the request's, which may not be
/// less (OUT_OF_RANGE).
fn size_from(r: &csi::CreateVolumeRequest, src: &Source, src_size: i64) -> Result<i64, Status> {
    let range = r.capacity_range.as_ref();
    let want = if range.is_some_and(|c| c.required_bytes > 0) { size_for(range)? } else { src_size };
    if want < src_size || range.is_some_and(|c| c.limit_bytes > 0 && c.limit_bytes < src_size) {
        return Err(Status::out_of_range(format!("{} is {src_size} bytes; a volume made from it cannot be smaller", src.name())));
    }
    Ok(want)
}

impl Controller {
    /// CreateVolume from a cloud snapshot: the backup restored into a new volume (placed by the
    /// class's repl and nodes), grown when the request asks for more than the backup's size.
    async fn restore_from_cloud(
        sdk: &Sdk,
        r: &csi::CreateVolumeRequest,
        p: &VolumeParams,
        src: &Source,
        cred: &str,
        id: &str,
    ) -> Result<csi::Volume, Status> {
        if p.secure {
            return Err(Status::invalid_argument(
                "secure: a cloud snapshot restores into a plain volume (the backup is encrypted in the bucket instead)",
            ));
        }
        let list = pb::CloudListRequest { credential: cred.to_string(), volume: String::new() };
        let backups = sdk.cloud().list(list).await.map_err(map_sdk)?.into_inner().backups;
        let b = backups.iter().find(|b| b.id == id).ok_or_else(|| Status::not_found(format!("cloud snapshot {} does not exist", src.name())))?;
        let src_size = b.size_bytes as i64;
        let want = size_from(r, src, src_size)?;
        let v = cloud::restore(sdk, cred, id, &r.name, p.repl, p.nodes.clone()).await.map_err(map_sdk)?;
        Self::made_from(sdk, r, p, src, v, want, src_size).await
    }
}

/// The owner a volume made for a PVC asks for: the PVC's namespace (from the provisioner's
/// --extra-create-metadata). The engine honours it for an admin token; with a namespace's own
/// token (its secret's `auth-token`) the token's subject owns the volume.
fn namespace_owner(p: &VolumeParams) -> Option<pb::Ownership> {
    let ns = p.labels.get("k8s_pvc_namespace").filter(|n| !n.is_empty())?;
    Some(pb::Ownership { owner: ns.clone(), ..Default::default() })
}

fn map_sdk(s: Status) -> Status {
    match s.code() {
        // The engine's codes already follow gRPC's meaning; "pool full" is RESOURCE_EXHAUSTED.
        // CANCELLED is never the engine's answer: the connection broke under the call (an
        // engine refusing the driver's TLS client certificate closes it after the handshake).
        Code::Unavailable | Code::Unknown | Code::Cancelled => crate::sdk::unavailable(s),
        _ => s,
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    async fn create_volume(&self, req: Request<csi::CreateVolumeRequest>) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        check_capabilities(&r.volume_capabilities).map_err(Status::invalid_argument)?;
        let p: VolumeParams = params::parse(&r.parameters).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let size = size_for(r.capacity_range.as_ref())?;
        let source = Source::of(r.volume_content_source.as_ref())?;
        let passphrase = if p.secure {
            let s = r
                .secrets
                .get("passphrase")
                .or_else(|| r.secrets.values().next())
                .ok_or_else(|| Status::invalid_argument("secure: an encrypted volume needs a secret with a passphrase (key `passphrase`)"))?;
            s.as_bytes().to_vec()
        } else {
            Vec::new()
        };
        let sdk = self.sdk.for_secrets(&r.secrets)?;
        let _busy = self.inflight.begin(&r.name)?;
        if let Some(mut v) = sdk.inspect(&r.name).await.map_err(map_sdk)? {
            if v.spec.as_ref().is_some_and(|s| s.labels.contains_key("strata.dev/restoring")) {
                return Err(Status::aborted(format!("volume {} is being restored from a cloud snapshot; retry", r.name)));
            }
            let mut spec = v.spec.clone().unwrap_or_default();
            // A copy has its source's replicas, whatever repl says; one whose grow to the requested
            // size failed earlier is grown now.
            let repl_differs = source.is_none() && spec.repl != p.repl;
            let want = size_for(r.capacity_range.as_ref())?;
            if source.is_some()
                && v.snapshot_of.is_empty()
                && (spec.size_bytes as i64) < want
                && r.capacity_range.as_ref().is_some_and(|c| c.required_bytes > 0)
            {
                v = Self::grow(&sdk, &r.name, want).await?;
                spec = v.spec.clone().unwrap_or_default();
            }
            if !v.snapshot_of.is_empty() || !size_fits(spec.size_bytes as i64, r.capacity_range.as_ref()) || repl_differs || spec.secure != p.secure {
                return Err(Status::already_exists(format!(
                    "volume {} exists with size {} and repl {}, which this request does not match",
                    r.name, spec.size_bytes, spec.repl
                )));
            }
            let mut out = csi_volume(&v, &p.fs);
            out.content_source = source.as_ref().map(Source::content);
            out.accessible_topology = accessible_topology(r.accessibility_requirements.as_ref());
            return Ok(Response::new(csi::CreateVolumeResponse { volume: Some(out) }));
        }
        if let Some(src) = source {
            return Self::create_from(&sdk, &r, &p, src).await.map(|v| Response::new(csi::CreateVolumeResponse { volume: Some(v) }));
        }
        let spec = pb::VolumeSpec {
            size_bytes: size as u64,
            repl: p.repl,
            labels: p.labels.clone().into_iter().collect(),
            qos: Some(pb::QosLimits { rd_iops: p.rd_iops, wr_iops: p.wr_iops, rd_bw: p.rd_bw, wr_bw: p.wr_bw }),
            nodes: p.nodes.clone(),
            zones: p.zones.clone(),
            racks: p.racks.clone(),
            secure: p.secure,
            preferred_node: preferred_node(r.accessibility_requirements.as_ref()).unwrap_or_default(),
            ownership: namespace_owner(&p),
        };
        let created = sdk.volumes().create(pb::CreateVolumeRequest { name: r.name.clone(), spec: Some(spec), passphrase }).await;
        let v = match created {
            Ok(resp) => resp.into_inner().volume.ok_or_else(|| Status::internal("engine returned no volume"))?,
            // Created meanwhile by someone else: answer as for an existing one.
            Err(s) if s.code() == Code::AlreadyExists => {
                sdk.inspect(&r.name).await.map_err(map_sdk)?.ok_or_else(|| Status::aborted("volume vanished while being created; retry"))?
            }
            // Placement: not enough nodes for repl is a capacity problem for the CO.
            Err(s) if s.code() == Code::FailedPrecondition => return Err(Status::resource_exhausted(s.message().to_string())),
            Err(s) => return Err(map_sdk(s)),
        };
        let mut out = csi_volume(&v, &p.fs);
        out.accessible_topology = accessible_topology(r.accessibility_requirements.as_ref());
        Ok(Response::new(csi::CreateVolumeResponse { volume: Some(out) }))
    }

    async fn delete_volume(&self, req: Request<csi::DeleteVolumeRequest>) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let sdk = self.sdk.for_secrets(&r.secrets)?;
        let id = r.volume_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let _busy = self.inflight.begin(&id)?;
        // A snapshot's id is not a volume that exists: nothing to delete.
        if sdk.inspect(&id).await.map_err(map_sdk)?.is_some_and(|v| !v.snapshot_of.is_empty()) {
            return Ok(Response::new(csi::DeleteVolumeResponse {}));
        }
        match sdk.volumes().delete(pb::DeleteVolumeRequest { name: id, force: false }).await {
            Ok(_) => Ok(Response::new(csi::DeleteVolumeResponse {})),
            Err(s) if s.code() == Code::NotFound => Ok(Response::new(csi::DeleteVolumeResponse {})),
            Err(s) => Err(map_sdk(s)),
        }
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented("Strata attaches on the node (NodeStageVolume); PUBLISH_UNPUBLISH_VOLUME is not offered"))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented("Strata attaches on the node (NodeStageVolume); PUBLISH_UNPUBLISH_VOLUME is not offered"))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        if self.sdk.inspect(&r.volume_id).await.map_err(map_sdk)?.is_none() {
            return Err(Status::not_found(format!("volume {} does not exist", r.volume_id)));
        }
        let resp = match check_capabilities(&r.volume_capabilities) {
            Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(why) => csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message: why },
        };
        Ok(Response::new(resp))
    }

    async fn list_volumes(&self, req: Request<csi::ListVolumesRequest>) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let mut vols = self.sdk.volumes().list(pb::ListVolumesRequest::default()).await.map_err(map_sdk)?.into_inner().volumes;
        vols.retain(|v| v.snapshot_of.is_empty());
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<&str> = vols.iter().map(|v| v.name.as_str()).collect();
        let (start, n) = page_of(&names, &r.starting_token, r.max_entries)?;
        let page = &vols[start..start + n];
        let next_token = names.get(start + n).map(|s| s.to_string()).unwrap_or_default();
        let entries = page
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(csi_volume(v, "")),
                status: Some(csi::list_volumes_response::VolumeStatus { published_node_ids: vec![], volume_condition: Some(condition(v)) }),
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse { entries, next_token }))
    }

    async fn get_capacity(&self, req: Request<csi::GetCapacityRequest>) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        if !r.volume_capabilities.is_empty() && check_capabilities(&r.volume_capabilities).is_err() {
            // No volume with these capabilities fits anywhere.
            return Ok(Response::new(csi::GetCapacityResponse { available_capacity: 0, maximum_volume_size: Some(0), minimum_volume_size: None }));
        }
        params::parse(&r.parameters).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let nodes = self.sdk.nodes().await.map_err(map_sdk)?;
        let zone = r.accessible_topology.as_ref().and_then(|t| t.segments.get(ZONE_KEY));
        let free: Vec<i64> = nodes
            .iter()
            .filter(|n| n.status == "online" && zone.is_none_or(|z| *z == n.zone))
            .map(|n| n.total_bytes.saturating_sub(n.used_bytes) as i64)
            .collect();
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: free.iter().sum(),
            maximum_volume_size: Some(free.iter().copied().max().unwrap_or(0)),
            minimum_volume_size: Some(ALIGN),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let caps = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::ListVolumes,
            rpc::Type::GetCapacity,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::GetVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::CloneVolume,
        ]
        .into_iter()
        .map(|t| csi::ControllerServiceCapability { r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })) })
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse { capabilities: caps }))
    }

    async fn create_snapshot(&self, req: Request<csi::CreateSnapshotRequest>) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        if r.source_volume_id.is_empty() {
            return Err(Status::invalid_argument("source_volume_id is required"));
        }
        let sdk = self.sdk.for_secrets(&r.secrets)?;
        let _busy = self.inflight.begin(&r.name)?;
        if cloud::wants_cloud(&r.parameters)? {
            let size = match sdk.inspect(&r.source_volume_id).await.map_err(map_sdk)? {
                Some(v) if v.snapshot_of.is_empty() => v.spec.as_ref().map_or(0, |s| s.size_bytes) as i64,
                _ => return Err(Status::not_found(format!("source volume {} does not exist", r.source_volume_id))),
            };
            let snap = cloud::create(&sdk, &r, size).await.map_err(map_sdk)?;
            return Ok(Response::new(csi::CreateSnapshotResponse { snapshot: Some(snap) }));
        }
        if let Some(v) = sdk.inspect(&r.name).await.map_err(map_sdk)? {
            if v.snapshot_of == r.source_volume_id {
                return Ok(Response::new(csi::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&v)) }));
            }
            let what = if v.snapshot_of.is_empty() { "a volume".to_string() } else { format!("a snapshot of volume {}", v.snapshot_of) };
            return Err(Status::already_exists(format!("{} is already {what}, not a snapshot of {}", r.name, r.source_volume_id)));
        }
        match sdk.inspect(&r.source_volume_id).await.map_err(map_sdk)? {
            Some(v) if v.snapshot_of.is_empty() => {}
            _ => return Err(Status::not_found(format!("source volume {} does not exist", r.source_volume_id))),
        }
        let req = pb::SnapshotCreateRequest { volume: r.source_volume_id.clone(), name: r.name.clone(), labels: Default::default() };
        let snap = match sdk.volumes().snapshot_create(req).await {
            Ok(resp) => resp.into_inner().snapshot.ok_or_else(|| Status::internal("engine returned no snapshot"))?,
            Err(s) if s.code() == Code::NotFound => return Err(Status::not_found(s.message().to_string())),
            Err(s) => return Err(map_sdk(s)),
        };
        Ok(Response::new(csi::CreateSnapshotResponse { snapshot: Some(csi_snapshot(&snap)) }))
    }

    async fn delete_snapshot(&self, req: Request<csi::DeleteSnapshotRequest>) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        let sdk = self.sdk.for_secrets(&r.secrets)?;
        let id = r.snapshot_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("snapshot_id is required"));
        }
        let _busy = self.inflight.begin(&id)?;
        if let Some((cred, backup)) = cloud::parse_id(&id) {
            cloud::delete(&sdk, cred, backup).await.map_err(map_sdk)?;
            return Ok(Response::new(csi::DeleteSnapshotResponse {}));
        }
        // Only a snapshot goes: an id naming a volume is not a snapshot that exists.
        match sdk.inspect(&id).await.map_err(map_sdk)? {
            Some(v) if !v.snapshot_of.is_empty() => {}
            _ => return Ok(Response::new(csi::DeleteSnapshotResponse {})),
        }
        match sdk.volumes().delete(pb::DeleteVolumeRequest { name: id, force: false }).await {
            Ok(_) => Ok(Response::new(csi::DeleteSnapshotResponse {})),
            Err(s) if s.code() == Code::NotFound => Ok(Response::new(csi::DeleteSnapshotResponse {})),
            Err(s) => Err(map_sdk(s)),
        }
    }

    async fn list_snapshots(&self, req: Request<csi::ListSnapshotsRequest>) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Status::invalid_argument("max_entries must not be negative"));
        }
        let mut snaps = self.sdk.volumes().snapshot_list(pb::SnapshotListRequest::default()).await.map_err(map_sdk)?.into_inner().snapshots;
        snaps.retain(|s| {
            (r.snapshot_id.is_empty() || s.name == r.snapshot_id) && (r.source_volume_id.is_empty() || s.snapshot_of == r.source_volume_id)
        });
        snaps.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
        let (start, n) = page_of(&names, &r.starting_token, r.max_entries)?;
        let next_token = names.get(start + n).map(|s| s.to_string()).unwrap_or_default();
        let entries = snaps[start..start + n].iter().map(|s| csi::list_snapshots_response::Entry { snapshot: Some(csi_snapshot(s)) }).collect();
        Ok(Response::new(csi::ListSnapshotsResponse { entries, next_token }))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        if r.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let range = r.capacity_range.ok_or_else(|| Status::invalid_argument("capacity_range is required"))?;
        let size = size_for(Some(&range))?;
        let sdk = self.sdk.for_secrets(&r.secrets)?;
        let _busy = self.inflight.begin(&r.volume_id)?;
        let v =
            sdk.inspect(&r.volume_id).await.map_err(map_sdk)?.ok_or_else(|| Status::not_found(format!("volume {} does not exist", r.volume_id)))?;
        let block = matches!(r.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()), Some(csi::volume_capability::AccessType::Block(_)));
        let current = v.spec.as_ref().map_or(0, |s| s.size_bytes) as i64;
        if current >= size {
            return Ok(Response::new(csi::ControllerExpandVolumeResponse { capacity_bytes: current, node_expansion_required: !block }));
        }
        let target = sdk.for_volume(&v).await?;
        let grown = target
            .volumes()
            .update(pb::UpdateVolumeRequest { name: r.volume_id.clone(), size_bytes: size as u64, ..Default::default() })
            .await
            .map_err(map_sdk)?
            .into_inner()
            .volume
            .ok_or_else(|| Status::internal("engine returned no volume"))?;
        let capacity_bytes = grown.spec.map_or(size as u64, |s| s.size_bytes) as i64;
        Ok(Response::new(csi::ControllerExpandVolumeResponse { capacity_bytes, node_expansion_required: !block }))
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let v = self.sdk.inspect(&id).await.map_err(map_sdk)?.ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let published = if v.attached_node.is_empty() { vec![] } else { vec![v.attached_node.clone()] };
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(csi_volume(&v, "")),
            status: Some(csi::controller_get_volume_response::VolumeStatus { published_node_ids: published, volume_condition: Some(condition(&v)) }),
        }))
    }
}
