//! The gRPC SDK server: volumes, pools, nodes and cluster status over tonic.

pub mod auth;
mod cloud;
mod nodes;

use crate::meta::Access;
use crate::volume::{CreateSpec, Service, UpdateSpec, VolumeError, VolumeInfo};
use std::collections::BTreeMap;
use std::sync::Arc;
use strata_api::auth::{Bearer, Caller, Role};
use strata_api::v1 as pb;
use tonic::{Request, Response, Status};

pub use crate::VERSION;

impl From<VolumeError> for Status {
    fn from(e: VolumeError) -> Status {
        let msg = e.to_string();
        match e {
            VolumeError::InvalidArgument(_) => Status::invalid_argument(msg),
            VolumeError::NotFound(_) => Status::not_found(msg),
            VolumeError::AlreadyExists(_) => Status::already_exists(msg),
            VolumeError::ResourceExhausted(_) => Status::resource_exhausted(msg),
            VolumeError::FailedPrecondition(_) => Status::failed_precondition(msg),
            VolumeError::Aborted(_) => Status::aborted(msg),
            VolumeError::Pool(crate::pool::PoolError::NoSpace) => Status::resource_exhausted(msg),
            VolumeError::Pool(_) => Status::internal(msg),
            VolumeError::Meta(_) => Status::unavailable(msg),
            VolumeError::NodeNotFound(_) => Status::not_found(msg),
            VolumeError::Corrupt(_) => Status::data_loss(msg),
            VolumeError::Absent(_) => Status::not_found(msg),
            VolumeError::Exists(_) => Status::already_exists(msg),
            VolumeError::Replication(crate::replication::target::TargetError::Fenced(_)) => Status::failed_precondition(msg),
            VolumeError::Replication(_) => Status::unavailable(msg),
        }
    }
}

#[derive(Clone)]
pub struct Sdk {
    pub engine: Arc<Service>,
}

fn to_pb(engine: &Service, v: VolumeInfo) -> pb::Volume {
    let r = v.record;
    pb::Volume {
        id: r.id,
        name: r.name,
        spec: Some(pb::VolumeSpec {
            size_bytes: r.size,
            repl: r.repl,
            labels: r.labels.into_iter().collect(),
            qos: Some(pb::QosLimits { rd_iops: r.qos.rd_iops, wr_iops: r.qos.wr_iops, rd_bw: r.qos.rd_bw, wr_bw: r.qos.wr_bw }),
            secure: r.secure.is_some(),
            ownership: (!r.ownership.is_empty()).then(|| auth::ownership_pb(&r.ownership)),
            ..Default::default()
        }),
        used_bytes: v.used_bytes,
        created_unix: r.created_unix,
        state: match &r.pending {
            // A replica out of sync: the data has fewer copies than `repl` says until resync.
            None if r.in_sync.len() < r.replicas.len() => "degraded",
            None => "available",
            Some(crate::meta::PendingOp::Delete) => "deleting",
            Some(crate::meta::PendingOp::Create) => "creating",
            Some(crate::meta::PendingOp::Restore { .. }) => "restoring",
        }
        .into(),
        snapshot_of: r.snapshot_of.clone().unwrap_or_default(),
        connections: v.connections,
        attached_node: r.target.clone(),
        pool_uuid: engine.pool.uuid.to_string(),
        replica_nodes: r.replicas.clone(),
        in_sync_nodes: r.in_sync.clone(),
        epoch: r.epoch,
        verifying: v.verifying,
        replica_status: v
            .replicas
            .into_iter()
            .map(|s| pb::ReplicaStatus { node: s.node, state: s.state.into(), dirty_bytes: s.dirty_bytes, copied_bytes: s.copied_bytes })
            .collect(),
        io_stats: Some(pb::IoStats {
            read_ops: v.io.read_ops,
            write_ops: v.io.write_ops,
            read_bytes: v.io.read_bytes,
            write_bytes: v.io.write_bytes,
            flush_ops: v.io.flush_ops,
            trim_ops: v.io.trim_ops,
            errors: v.io.errors,
            read_latency_us: v.io.read_latency_us,
            write_latency_us: v.io.write_latency_us,
        }),
    }
}

/// Most volume records a paged `volume list` reads from the store at once (stratactl's pages of
/// 1,000, and the one that says more follow).
const STORE_PAGE: usize = 1001;

/// Marks a request one engine forwarded to another, which serves it itself (no second hop).
const FORWARDED: &str = "x-strata-forwarded";

/// How long the node that serves a volume may take to let it go in a clean handover.
const HANDOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A channel to another engine's SDK that sends the caller's token.
type Channel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;
type VolumeClient = pb::volume_service_client::VolumeServiceClient<Channel>;

/// The caller's token again, for a call this engine makes on its behalf to another engine.
fn bearer_of<T>(req: &Request<T>) -> Bearer {
    Bearer::new(auth::token_of(req).as_deref()).unwrap_or_default()
}

/// `r` as a forwarded request.
fn forwarded<T>(r: T) -> Request<T> {
    let mut q = Request::new(r);
    q.metadata_mut().insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    q
}

fn was_forwarded<T>(r: &Request<T>) -> bool {
    r.metadata().contains_key(FORWARDED)
}

impl Sdk {
    /// A change to a volume attached on another node is made by that node (its target holds
    /// the write barrier and the clients): a client to its engine's SDK, or None to do it here
    /// (detached, served here, or already forwarded once).
    async fn forward_to_target<T>(&self, req: &Request<T>, name: &str) -> Result<Option<VolumeClient>, Status> {
        if was_forwarded(req) {
            return Ok(None);
        }
        let e = self.engine.clone();
        let me = e.node.id.clone();
        let rec = self.engine.inspect(name).await?.record;
        if rec.snapshot_of.is_some() || rec.target.is_empty() || rec.target == me {
            return Ok(None);
        }
        // A target on a node that reads offline cannot answer: the engine's own rules apply
        // here (a takeover, or a forced change).
        let nodes = nodes_pb(&self.engine).await.map_err(|e| Status::unavailable(e.to_string()))?;
        if nodes.iter().any(|n| n.id == rec.target && n.status == "offline") {
            return Ok(None);
        }
        let c = self.node_channel(&rec.target, std::time::Duration::from_secs(60), &format!("volume {name} is served by")).await?;
        Ok(Some(pb::volume_service_client::VolumeServiceClient::with_interceptor(c, bearer_of(req))))
    }

    /// A channel to the SDK of node `node`, for forwarding a request there. `why` begins the
    /// errors ("volume v is served by"): the node's address is unknown, or it does not answer.
    async fn node_channel(&self, node: &str, timeout: std::time::Duration, why: &str) -> Result<tonic::transport::Channel, Status> {
        let e = &self.engine;
        let addr = crate::meta::sdk_endpoint(&*e.meta, node)
            .await
            .map_err(VolumeError::from)?
            .ok_or_else(|| Status::failed_precondition(format!("{why} node {node}, whose SDK address is unknown")))?;
        e.peer_sdk(&addr, timeout)
            .await
            .map_err(|err| Status::unavailable(format!("{why} node {node}, whose engine ({addr}) cannot be reached: {err}")))
    }

    /// Up to `max` volumes `who` may see after the name `start` (all of them, with `max` 0), and
    /// the next page's token when more follow: pages of the store until that many are found, and
    /// one more, which says that another page follows. A store read asks for `max` + 1 records
    /// (a page of 1,000 was two reads, the second for that one volume), at most STORE_PAGE.
    async fn list_pages(&self, who: &Caller, start: String, max: usize) -> Result<(Vec<pb::Volume>, String), Status> {
        let max = if max == 0 { usize::MAX } else { max };
        let chunk = max.saturating_add(1).clamp(64, STORE_PAGE);
        let (mut vols, mut after) = (Vec::new(), start);
        loop {
            let page = self.engine.list_page(&after, chunk).await?;
            let last = page.len() < chunk;
            for v in page {
                after = v.record.name.clone();
                if !auth::may_see(who, &v.record) {
                    continue;
                }
                if vols.len() == max {
                    let next = vols.last().map(|v: &pb::Volume| v.name.clone()).unwrap_or_default();
                    return Ok((vols, next));
                }
                vols.push(to_pb(&self.engine, v));
            }
            if last {
                return Ok((vols, String::new()));
            }
        }
    }

    /// What only the node serving a volume knows — its NBD clients, its replicas' states, a
    /// comparison in progress — taken from that node for volumes served elsewhere: one forwarded
    /// list per serving node, at once. A node that does not answer within 2 s leaves this node's
    /// view of its volumes (0 clients).
    async fn fill_from_targets<T>(&self, req: &Request<T>, vols: &mut [pb::Volume]) {
        let bearer = bearer_of(req);
        let me = self.engine.node.id.clone();
        let targets: std::collections::BTreeSet<String> =
            vols.iter().map(|v| v.attached_node.clone()).filter(|t| !t.is_empty() && *t != me).collect();
        if targets.is_empty() {
            return;
        }
        let Ok(nodes) = nodes_pb(&self.engine).await else { return };
        let calls = targets.into_iter().filter_map(|t| {
            let n = nodes.iter().find(|n| n.id == t && n.status != "offline" && !n.sdk_address.is_empty())?;
            let uri = strata_api::endpoint_uri(&n.sdk_address);
            let bearer = bearer.clone();
            Some(async move {
                let r = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                    let ch = self.engine.peer_sdk(&uri, std::time::Duration::from_secs(2)).await.ok()?;
                    let mut c = pb::volume_service_client::VolumeServiceClient::with_interceptor(ch, bearer);
                    c.list(forwarded(pb::ListVolumesRequest::default())).await.ok()
                })
                .await;
                (t, r.ok().flatten().map(|r| r.into_inner().volumes))
            })
        });
        for (node, answer) in futures::future::join_all(calls).await {
            let Some(theirs) = answer else {
                tracing::debug!(%node, "no answer about the volumes it serves");
                continue;
            };
            for v in vols.iter_mut().filter(|v| v.attached_node == node) {
                if let Some(t) = theirs.iter().find(|t| t.name == v.name && t.attached_node == node) {
                    v.connections = t.connections;
                    v.replica_status = t.replica_status.clone();
                    v.verifying = t.verifying;
                    v.io_stats = t.io_stats;
                }
            }
        }
    }

    /// Before attaching here without force: a volume attached on another node that is up is
    /// handed over cleanly when no client uses it there (that node detaches it: its target
    /// stops, and the attach here starts a new epoch); in use there, it is refused. A node that
    /// reads offline is left to the takeover rules of `Service::attach`.
    async fn hand_over<T>(&self, req: &Request<T>, name: &str) -> Result<(), Status> {
        let owner = self.engine.inspect(name).await?.record.target;
        let unreachable = |why: &str| {
            Status::failed_precondition(format!(
                "volume {name} is attached on node {owner}, which reads online but cannot be asked to let it go ({why}); once the node reads offline an attach takes it over, or pass --force to take it over now"
            ))
        };
        let mut c = match self.forward_to_target(req, name).await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(()),
            Err(s) => return Err(unreachable(s.message())),
        };
        let ask = c.detach(forwarded(pb::DetachVolumeRequest { name: name.to_string(), force: false }));
        let answer = tokio::time::timeout(HANDOVER_TIMEOUT, ask).await.map_err(|_| unreachable("no answer within 5 s"))?;
        match answer {
            Ok(_) => {
                tracing::info!(volume = %name, from = %owner, "volume handed over: detached on its previous node");
                Ok(())
            }
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Err(Status::failed_precondition(format!(
                "volume {name} is in use on node {owner} ({}); stop its user there first, or pass --force to take it over",
                s.message()
            ))),
            Err(s) => Err(Status::unavailable(format!("volume {name}: asking node {owner} to detach it failed: {}", s.message()))),
        }
    }
}

#[tonic::async_trait]
impl pb::volume_service_server::VolumeService for Sdk {
    async fn create(&self, req: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::User, "volume.create")?;
        let r = req.into_inner();
        let name = r.name.clone();
        let result = self.create_as(&who, r).await;
        auth::audit(&who, "volume.create", &name, false, &result);
        result
    }

    async fn list(&self, req: Request<pb::ListVolumesRequest>) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::View, "volume.list")?;
        let (max, start) = (req.get_ref().max_entries as usize, req.get_ref().starting_token.clone());
        let unpaged = if was_forwarded(&req) {
            // Another engine fills in the live figures of the volumes this node serves (and
            // reads nothing else of the answer): those alone, not every volume of the cluster.
            Some(self.engine.list_served().await?)
        } else if max == 0 && start.is_empty() {
            Some(self.engine.list().await?)
        } else {
            None
        };
        let (mut vols, next_token) = match unpaged {
            Some(all) => (all.into_iter().filter(|v| auth::may_see(&who, &v.record)).map(|v| to_pb(&self.engine, v)).collect(), String::new()),
            None => self.list_pages(&who, start, max).await?,
        };
        if !was_forwarded(&req) {
            self.fill_from_targets(&req, &mut vols).await;
        }
        Ok(Response::new(pb::ListVolumesResponse { volumes: vols, next_token }))
    }

    async fn inspect(&self, req: Request<pb::InspectVolumeRequest>) -> Result<Response<pb::InspectVolumeResponse>, Status> {
        let (_, _) = self.on_volume(&req, "volume.inspect", &req.get_ref().name, Access::Read).await?;
        let v = self.engine.inspect(&req.get_ref().name).await?;
        let mut vols = vec![to_pb(&self.engine, v)];
        if !was_forwarded(&req) {
            self.fill_from_targets(&req, &mut vols).await;
        }
        Ok(Response::new(pb::InspectVolumeResponse { volume: vols.pop() }))
    }

    async fn update(&self, req: Request<pb::UpdateVolumeRequest>) -> Result<Response<pb::UpdateVolumeResponse>, Status> {
        let (who, rec) = self.on_volume(&req, "volume.update", &req.get_ref().name, Access::Write).await?;
        let fwd = was_forwarded(&req);
        let name = req.get_ref().name.clone();
        let result = async {
            let ownership = req.get_ref().ownership.clone().map(auth::ownership_from_pb).transpose()?;
            if let Some(o) = &ownership {
                auth::may_change_ownership(&who, &rec, o)?;
            }
            if let Some(mut c) = self.forward_to_target(&req, &name).await? {
                return c.update(forwarded(req.into_inner())).await;
            }
            let r = req.into_inner();
            let size = (r.size_bytes != 0).then_some(r.size_bytes);
            let qos = crate::volume::QosUpdate {
                rd_iops: r.io_throttle_rd_iops,
                wr_iops: r.io_throttle_wr_iops,
                rd_bw: r.io_throttle_rd_bw,
                wr_bw: r.io_throttle_wr_bw,
            };
            let v = self.engine.update(&r.name, UpdateSpec { size, labels: r.labels.into_iter().collect(), qos, ownership }).await?;
            Ok(Response::new(pb::UpdateVolumeResponse { volume: Some(to_pb(&self.engine, v)) }))
        }
        .await;
        auth::audit(&who, "volume.update", &name, fwd, &result);
        result
    }

    async fn delete(&self, req: Request<pb::DeleteVolumeRequest>) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let (who, _) = self.on_volume(&req, "volume.delete", &req.get_ref().name, Access::Write).await?;
        let (fwd, name) = (was_forwarded(&req), req.get_ref().name.clone());
        let result = async {
            if let Some(mut c) = self.forward_to_target(&req, &name).await? {
                return c.delete(forwarded(req.into_inner())).await;
            }
            let r = req.into_inner();
            self.engine.delete(&r.name, r.force).await?;
            Ok(Response::new(pb::DeleteVolumeResponse {}))
        }
        .await;
        auth::audit(&who, "volume.delete", &name, fwd, &result);
        result
    }

    async fn attach(&self, req: Request<pb::AttachVolumeRequest>) -> Result<Response<pb::AttachVolumeResponse>, Status> {
        let (who, _) = self.on_volume(&req, "volume.attach", &req.get_ref().name, Access::Write).await?;
        let name = req.get_ref().name.clone();
        let result = async {
            // Before any handover: the volume must not leave its node for one that refuses it.
            self.engine.refuse_in_maintenance(&name)?;
            if !req.get_ref().force {
                self.hand_over(&req, &name).await?;
            }
            let r = req.into_inner();
            let passphrase = (!r.passphrase.is_empty()).then_some(r.passphrase.as_slice());
            let v = self.engine.attach(&r.name, r.force, passphrase).await?;
            Ok(Response::new(pb::AttachVolumeResponse { volume: Some(to_pb(&self.engine, v)) }))
        }
        .await;
        auth::audit(&who, "volume.attach", &name, false, &result);
        result
    }

    async fn ha_update(&self, req: Request<pb::HaUpdateRequest>) -> Result<Response<pb::HaUpdateResponse>, Status> {
        let (who, _) = self.on_volume(&req, "volume.ha_update", &req.get_ref().name, Access::Write).await?;
        let (fwd, name) = (was_forwarded(&req), req.get_ref().name.clone());
        let result = async {
            if let Some(mut c) = self.forward_to_target(&req, &name).await? {
                return c.ha_update(forwarded(req.into_inner())).await;
            }
            let r = req.into_inner();
            // Replicas change through a target (it rebuilds the new ones): a detached volume is
            // attached here for that, and stays attached while they fill.
            if self.engine.inspect(&r.name).await?.record.target.is_empty() {
                self.engine.attach(&r.name, false, None).await?;
            }
            let node = (!r.node.is_empty()).then_some(r.node);
            let v = self.engine.ha_update(&r.name, r.repl, node).await?;
            Ok(Response::new(pb::HaUpdateResponse { volume: Some(to_pb(&self.engine, v)) }))
        }
        .await;
        auth::audit(&who, "volume.ha_update", &name, fwd, &result);
        result
    }

    async fn checksums(&self, req: Request<pb::ChecksumsRequest>) -> Result<Response<pb::ChecksumsResponse>, Status> {
        let (who, _) = self.on_volume(&req, "volume.checksums", &req.get_ref().name, Access::Read).await?;
        // Checksums tell about the data: more than a viewer may learn.
        auth::require(&who, Role::User, "volume.checksums")?;
        let name = req.into_inner().name;
        let sums = self.engine.extent_checksums(&name).await?;
        Ok(Response::new(pb::ChecksumsResponse {
            extent_size: self.engine.pool.extent_size,
            extents: sums.into_iter().map(|(extent, crc32c)| pb::ExtentChecksum { extent, crc32c }).collect(),
        }))
    }

    async fn snapshot_create(&self, req: Request<pb::SnapshotCreateRequest>) -> Result<Response<pb::SnapshotCreateResponse>, Status> {
        let (who, _) = self.on_volume(&req, "snapshot.create", &req.get_ref().volume, Access::Write).await?;
        let (fwd, name) = (was_forwarded(&req), req.get_ref().volume.clone());
        let result = async {
            if let Some(mut c) = self.forward_to_target(&req, &name).await? {
                return c.snapshot_create(forwarded(req.into_inner())).await;
            }
            let r = req.into_inner();
            let v = self.engine.snapshot(&r.volume, &r.name, r.labels.into_iter().collect()).await?;
            Ok(Response::new(pb::SnapshotCreateResponse { snapshot: Some(to_pb(&self.engine, v)) }))
        }
        .await;
        auth::audit(&who, "snapshot.create", &name, fwd, &result);
        result
    }

    async fn snapshot_list(&self, req: Request<pb::SnapshotListRequest>) -> Result<Response<pb::SnapshotListResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::View, "snapshot.list")?;
        let r = req.into_inner();
        let volume = (!r.volume.is_empty()).then_some(r.volume.as_str());
        let snaps = self.engine.snapshots(volume).await?;
        if let Some(v) = volume {
            match self.engine.inspect(v).await {
                Ok(info) => auth::may(&who, &info.record, Access::Read, "snapshot.list")?,
                // A deleted volume's snapshots remain: they are listed (as far as the caller
                // may see each); a name that was never a volume is not found.
                Err(crate::volume::VolumeError::NotFound(_)) if !snaps.is_empty() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let snaps = snaps.into_iter().filter(|v| auth::may_see(&who, &v.record)).map(|v| to_pb(&self.engine, v)).collect();
        Ok(Response::new(pb::SnapshotListResponse { snapshots: snaps }))
    }

    async fn repair_replica(&self, req: Request<pb::RepairReplicaRequest>) -> Result<Response<pb::RepairReplicaResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "volume.repair_replica")?;
        let r = req.into_inner();
        let result = async {
            self.engine.repair_replica(&r.volume, &r.node, r.offset, r.length).await?;
            Ok(Response::new(pb::RepairReplicaResponse {}))
        }
        .await;
        auth::audit(&who, "volume.repair_replica", &r.volume, false, &result);
        result
    }

    async fn clone_volume(&self, req: Request<pb::CloneVolumeRequest>) -> Result<Response<pb::CloneVolumeResponse>, Status> {
        // A clone gives its owner the source's data: reading the source is what it needs.
        let (who, _) = self.on_volume(&req, "volume.clone", &req.get_ref().source, Access::Read).await?;
        auth::require(&who, Role::User, "volume.clone")?;
        let (fwd, name) = (was_forwarded(&req), req.get_ref().name.clone());
        let result = async {
            let asked = req.get_ref().ownership.clone();
            let ownership = match (who.is_admin(), asked) {
                (true, None) => None,
                (_, asked) => Some(auth::new_ownership(&who, asked, self.engine.auth.is_some())?),
            };
            if let Some(mut c) = self.forward_to_target(&req, &req.get_ref().source).await? {
                return c.clone_volume(forwarded(req.into_inner())).await;
            }
            let r = req.into_inner();
            let v = self.engine.clone_volume(&r.source, &r.name, r.labels.into_iter().collect(), ownership).await?;
            Ok(Response::new(pb::CloneVolumeResponse { volume: Some(to_pb(&self.engine, v)) }))
        }
        .await;
        auth::audit(&who, "volume.clone", &name, fwd, &result);
        result
    }

    async fn restore(&self, req: Request<pb::RestoreVolumeRequest>) -> Result<Response<pb::RestoreVolumeResponse>, Status> {
        let (who, _) = self.on_volume(&req, "volume.restore", &req.get_ref().name, Access::Write).await?;
        let (fwd, name) = (was_forwarded(&req), req.get_ref().name.clone());
        let result = async {
            if let Some(mut c) = self.forward_to_target(&req, &name).await? {
                return c.restore(forwarded(req.into_inner())).await;
            }
            let r = req.into_inner();
            let v = self.engine.restore(&r.name, &r.snapshot).await?;
            Ok(Response::new(pb::RestoreVolumeResponse { volume: Some(to_pb(&self.engine, v)) }))
        }
        .await;
        auth::audit(&who, "volume.restore", &name, fwd, &result);
        result
    }

    async fn detach(&self, req: Request<pb::DetachVolumeRequest>) -> Result<Response<pb::DetachVolumeResponse>, Status> {
        let (who, _) = self.on_volume(&req, "volume.detach", &req.get_ref().name, Access::Write).await?;
        let fwd = was_forwarded(&req);
        let r = req.into_inner();
        let result = async {
            let v = self.engine.detach(&r.name, r.force).await?;
            Ok(Response::new(pb::DetachVolumeResponse { volume: Some(to_pb(&self.engine, v)) }))
        }
        .await;
        auth::audit(&who, "volume.detach", &r.name, fwd, &result);
        result
    }
}

impl Sdk {
    /// Who made the request (its token verified; `anonymous` when tokens are not checked).
    #[allow(clippy::result_large_err)] // the gRPC answer itself
    fn who<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        auth::caller(self.engine.auth.as_ref(), req)
    }

    /// The caller and the volume's record, when the caller may do `op` (needing `need`) on it.
    async fn on_volume<T>(&self, req: &Request<T>, op: &str, name: &str, need: Access) -> Result<(Caller, crate::meta::VolumeRecord), Status> {
        let who = self.who(req)?;
        auth::require(&who, if need == Access::Write { Role::User } else { Role::View }, op)?;
        let rec = self.engine.inspect(name).await?.record;
        auth::may(&who, &rec, need, op)?;
        Ok((who, rec))
    }

    async fn create_as(&self, who: &Caller, r: pb::CreateVolumeRequest) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let spec = r.spec.ok_or_else(|| Status::invalid_argument("spec is required (size_bytes, repl, labels)"))?;
        let ownership = auth::new_ownership(who, spec.ownership, self.engine.auth.is_some())?;
        let labels: BTreeMap<String, String> = spec.labels.into_iter().collect();
        let q = spec.qos.unwrap_or_default();
        let qos = crate::qos::Limits { rd_iops: q.rd_iops, wr_iops: q.wr_iops, rd_bw: q.rd_bw, wr_bw: q.wr_bw };
        let prefer = (!spec.preferred_node.is_empty()).then_some(spec.preferred_node);
        let placement = crate::volume::PlacementSpec { nodes: spec.nodes, zones: spec.zones, racks: spec.racks, prefer };
        if spec.secure && r.passphrase.is_empty() {
            return Err(Status::invalid_argument("an encrypted volume (secure) needs a passphrase or key file"));
        }
        let passphrase = (spec.secure || !r.passphrase.is_empty()).then_some(r.passphrase.as_slice());
        let v = self
            .engine
            .create(CreateSpec { name: &r.name, size: spec.size_bytes, repl: spec.repl, labels, qos, placement, passphrase, ownership })
            .await?;
        Ok(Response::new(pb::CreateVolumeResponse { volume: Some(to_pb(&self.engine, v)) }))
    }
}

fn pool_pb(engine: &Service) -> pb::Pool {
    let pool = &engine.pool;
    pb::Pool {
        uuid: pool.uuid.to_string(),
        extent_size: pool.extent_size,
        total_bytes: pool.total_bytes(),
        used_bytes: pool.used_bytes(),
        devices: pool
            .devices()
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let desc = d.dev.describe();
                pb::PoolDevice {
                    uuid: d.sb.device_uuid.to_string(),
                    path: d.path.clone(),
                    size_bytes: d.sb.device_size,
                    total_extents: d.sb.extent_count,
                    free_extents: pool.free_extents(i),
                    kind: desc.kind.into(),
                    io_engine: desc.io_engine.into(),
                    direct_io: desc.direct_io,
                    failed: d.failed(),
                    io_errors: d.io_errors(),
                }
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl pb::pool_service_server::PoolService for Sdk {
    async fn list(&self, req: Request<pb::ListPoolsRequest>) -> Result<Response<pb::ListPoolsResponse>, Status> {
        auth::require(&self.who(&req)?, Role::View, "pool.list")?;
        Ok(Response::new(pb::ListPoolsResponse { pools: vec![pool_pb(&self.engine)] }))
    }

    async fn add_drive(&self, req: Request<pb::AddDriveRequest>) -> Result<Response<pb::AddDriveResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "pool.add_drive")?;
        let r = req.into_inner();
        let result = async {
            self.engine.add_drive(&r.path, (r.size_bytes > 0).then_some(r.size_bytes)).await?;
            Ok(Response::new(pb::AddDriveResponse { pool: Some(pool_pb(&self.engine)) }))
        }
        .await;
        auth::audit(&who, "pool.add_drive", &r.path, false, &result);
        result
    }

    async fn expand(&self, req: Request<pb::ExpandPoolRequest>) -> Result<Response<pb::ExpandPoolResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "pool.expand")?;
        let size = req.into_inner().size_bytes;
        let result = async {
            if size == 0 {
                return Err(Status::invalid_argument("give the size to add (--size)"));
            }
            let path = self.engine.expand_pool(size).await?;
            Ok(Response::new(pb::ExpandPoolResponse { pool: Some(pool_pb(&self.engine)), path }))
        }
        .await;
        auth::audit(&who, "pool.expand", &size.to_string(), false, &result);
        result
    }
}

/// Every registered node: this one with live figures, the others as the store has them.
async fn nodes_pb(engine: &Service) -> Result<Vec<pb::Node>, crate::meta::MetaError> {
    let nodes = engine.meta.list_nodes().await?;
    Ok(nodes
        .into_iter()
        .map(|(n, state)| {
            let me = n.id == engine.node.id;
            let reason = if me { engine.maintenance_reason().unwrap_or_default() } else { n.maintenance_reason.clone() };
            let maintenance = if me { engine.in_maintenance() } else { n.maintenance };
            pb::Node {
                maintenance_reason: if maintenance { reason } else { String::new() },
                status: if maintenance && state == crate::meta::NodeState::Online { "maintenance".into() } else { state.as_str().into() },
                maintenance,
                total_bytes: if me { engine.pool.total_bytes() } else { n.total_bytes },
                used_bytes: if me { engine.pool.used_bytes() } else { n.used_bytes },
                id: n.id,
                hostname: n.hostname,
                sdk_address: n.sdk_address,
                nbd_address: n.nbd_address,
                version: n.version,
                zone: n.zone,
                rack: n.rack,
                repl_address: n.repl_address,
            }
        })
        .collect())
}

#[tonic::async_trait]
impl pb::cluster_service_server::ClusterService for Sdk {
    async fn status(&self, req: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        auth::require(&self.who(&req)?, Role::View, "cluster.status")?;
        let e = &self.engine;
        let cluster_id = e.meta.cluster_id().await.map_err(|err| Status::unavailable(err.to_string()))?;
        let all = e.list().await?;
        let snapshot_count = all.iter().filter(|v| v.record.snapshot_of.is_some()).count() as u32;
        let volume_count = all.len() as u32 - snapshot_count;
        let nodes = nodes_pb(e).await.map_err(|err| Status::unavailable(err.to_string()))?;
        let status = if nodes.iter().all(|n| n.status == "online") { "ok" } else { "degraded" };
        // The cluster's capacity: every node's pool as it last reported it (this node's now).
        let (total_bytes, used_bytes) = nodes.iter().fold((0, 0), |(t, u), n| (t + n.total_bytes, u + n.used_bytes));
        Ok(Response::new(pb::ClusterStatusResponse {
            cluster_id,
            status: status.into(),
            nodes,
            total_bytes,
            used_bytes,
            volume_count,
            snapshot_count,
            metadata_store: e.meta.kind().into(),
            version: VERSION.into(),
        }))
    }
}

fn alert_pb(a: crate::alerts::Alert) -> pb::Alert {
    pb::Alert {
        id: a.id,
        first_unix: a.first_unix,
        last_unix: a.last_unix,
        count: a.count,
        severity: a.severity.as_str().into(),
        kind: a.kind,
        resource: a.resource,
        node: a.node,
        message: a.message,
    }
}

#[tonic::async_trait]
impl pb::alert_service_server::AlertService for Sdk {
    /// This node's alerts, and (unless `local_only`) every other online node's, oldest first.
    async fn list(&self, req: Request<pb::ListAlertsRequest>) -> Result<Response<pb::ListAlertsResponse>, Status> {
        auth::require(&self.who(&req)?, Role::View, "alert.list")?;
        let bearer = bearer_of(&req);
        let e = &self.engine;
        let mut alerts: Vec<pb::Alert> = e.alerts.list().into_iter().map(alert_pb).collect();
        let mut unreachable = Vec::new();
        if !req.into_inner().local_only {
            let (theirs, failed) = self
                .on_other_nodes(&bearer, |mut c| async move { Ok(c.list(pb::ListAlertsRequest { local_only: true }).await?.into_inner().alerts) })
                .await?;
            alerts.extend(theirs.into_iter().flatten());
            unreachable = failed;
        }
        alerts.sort_by_key(|a| (a.last_unix, a.node.clone(), a.id));
        Ok(Response::new(pb::ListAlertsResponse { alerts, unreachable }))
    }

    /// Removes this node's alerts, and (unless `local_only`) every other online node's.
    async fn purge(&self, req: Request<pb::PurgeAlertsRequest>) -> Result<Response<pb::PurgeAlertsResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "alert.purge")?;
        let bearer = bearer_of(&req);
        let local_only = req.into_inner().local_only;
        let result = async {
            let mut purged = self.engine.alerts.purge().map_err(|e| Status::internal(format!("purging the alerts file: {e}")))? as u32;
            let mut unreachable = Vec::new();
            if !local_only {
                let (theirs, failed) =
                    self.on_other_nodes(&bearer, |mut c| async move {
                        Ok(c.purge(pb::PurgeAlertsRequest { local_only: true }).await?.into_inner().purged)
                    })
                    .await?;
                purged += theirs.iter().sum::<u32>();
                unreachable = failed;
            }
            Ok(Response::new(pb::PurgeAlertsResponse { purged, unreachable }))
        }
        .await;
        auth::audit(&who, "alert.purge", "", false, &result);
        result
    }
}

type AlertClient = pb::alert_service_client::AlertServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

impl Sdk {
    /// Runs `call` against every other online node's alert service (with the caller's token), at
    /// most 5 s each: what each answered, and the nodes that did not, with why.
    async fn on_other_nodes<T, F, Fut>(&self, bearer: &Bearer, call: F) -> Result<(Vec<T>, Vec<String>), Status>
    where
        F: Fn(AlertClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let e = &self.engine;
        let nodes = nodes_pb(e).await.map_err(|err| Status::unavailable(err.to_string()))?;
        let others = nodes.into_iter().filter(|n| n.id != e.node.id && n.status != "offline" && !n.sdk_address.is_empty());
        let calls = others.map(|n| {
            let (bearer, call) = (bearer.clone(), &call);
            async move {
                let url = strata_api::endpoint_uri(&n.sdk_address);
                let r = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    let ch = e.peer_sdk(&url, std::time::Duration::from_secs(5)).await?;
                    call(pb::alert_service_client::AlertServiceClient::with_interceptor(ch, bearer)).await.map_err(|s| s.message().to_string())
                })
                .await;
                match r {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(why)) => Err(format!("{}: {why}", n.id)),
                    Err(_) => Err(format!("{}: no answer within 5 s", n.id)),
                }
            }
        });
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for r in futures::future::join_all(calls).await {
            match r {
                Ok(v) => ok.push(v),
                Err(why) => failed.push(why),
            }
        }
        Ok((ok, failed))
    }
}

/// The tonic router with every SDK service.
pub fn router(engine: Arc<Service>) -> tonic::transport::server::Router {
    let sdk = Sdk { engine };
    tonic::transport::Server::builder()
        .add_service(pb::volume_service_server::VolumeServiceServer::new(sdk.clone()))
        .add_service(pb::pool_service_server::PoolServiceServer::new(sdk.clone()))
        .add_service(pb::node_service_server::NodeServiceServer::new(sdk.clone()))
        .add_service(pb::cluster_service_server::ClusterServiceServer::new(sdk.clone()))
        .add_service(pb::alert_service_server::AlertServiceServer::new(sdk.clone()))
        .add_service(pb::credential_service_server::CredentialServiceServer::new(sdk.clone()))
        .add_service(pb::cloud_snap_service_server::CloudSnapServiceServer::new(sdk))
}

/// One TLS connection to the SDK, as tonic serves it.
pub struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The SDK's connections over TLS: each accepted TCP connection's handshake runs on its own
/// (10 s at most), so a slow or silent client holds up no one; failed handshakes are logged
/// and dropped. The acceptor is taken per connection (a rotated certificate serves new ones).
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<crate::security::Tls>,
    require_client_cert: bool,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("SDK accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx) = (tls.sdk_acceptor(require_client_cert), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(TlsConn(s))).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, "SDK TLS handshake failed: {e}"),
                    Err(_) => tracing::info!(%peer, "SDK TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
