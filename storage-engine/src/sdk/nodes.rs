//! NodeService: the cluster's nodes, maintenance and decommission.

use super::{auth, bearer_of, forwarded, nodes_pb, was_forwarded, Sdk};
use crate::volume::VolumeError;
use strata_api::auth::Role;
use strata_api::v1 as pb;
use tonic::{Request, Response, Status};

impl Sdk {
    /// Moves the volumes this node serves to nodes holding an in-sync replica: each is detached
    /// here (cleanly: no client uses it) and attached there. One that no other node can serve
    /// stays detached.
    async fn move_targets<T>(&self, req: &Request<T>) -> Result<Vec<pb::MovedTarget>, Status> {
        let e = &self.engine;
        let mut moved = Vec::new();
        for (rec, _) in e.served_here().await? {
            let name = rec.name.clone();
            let failed = |note: String| pb::MovedTarget { volume: name.clone(), node: String::new(), note, failed: true };
            if let Err(err) = e.detach(&name, false).await {
                moved.push(failed(format!("not detached here: {err}")));
                continue;
            }
            let Some(dest) = e.maintenance_destination(&rec).await? else {
                let note = "detached: no other online node holds an in-sync replica to serve it".to_string();
                moved.push(pb::MovedTarget { volume: name.clone(), node: String::new(), note, failed: false });
                continue;
            };
            let attached = async {
                let ch =
                    self.node_channel(&dest, std::time::Duration::from_secs(60), "attaching it at").await.map_err(|s| s.message().to_string())?;
                let mut c = pb::volume_service_client::VolumeServiceClient::with_interceptor(ch, bearer_of(req));
                let ask = pb::AttachVolumeRequest { name: name.clone(), force: false, passphrase: Vec::new() };
                c.attach(forwarded(ask)).await.map(|_| ()).map_err(|s| s.message().to_string())
            }
            .await;
            moved.push(match attached {
                Ok(()) => {
                    tracing::info!(volume = %name, to = %dest, "maintenance: volume moved");
                    pb::MovedTarget { volume: name.clone(), node: dest, note: String::new(), failed: false }
                }
                Err(why) => failed(format!("detached here, but node {dest} did not attach it: {why}; attach it where it is needed")),
            });
        }
        Ok(moved)
    }
}

#[tonic::async_trait]
impl pb::node_service_server::NodeService for Sdk {
    async fn list(&self, req: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        auth::require(&self.who(&req)?, Role::View, "node.list")?;
        let nodes = nodes_pb(&self.engine).await.map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn maintenance(&self, req: Request<pb::MaintenanceRequest>) -> Result<Response<pb::MaintenanceResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "node.maintenance")?;
        let e = self.engine.clone();
        let fwd = was_forwarded(&req);
        let target = req.get_ref().node.clone();
        let result = async {
            if !target.is_empty() && target != e.node.id {
                if fwd {
                    return Err(Status::failed_precondition(format!("a forwarded maintenance request for node {target} reached node {}", e.node.id)));
                }
                if crate::meta::sdk_endpoint(&*e.meta, &target).await.map_err(VolumeError::from)?.is_none() {
                    return Err(Status::not_found(format!("node {target} is not in the cluster")));
                }
                let ch = self.node_channel(&target, std::time::Duration::from_secs(300), "maintenance is for").await?;
                let mut c = pb::node_service_client::NodeServiceClient::with_interceptor(ch, bearer_of(&req));
                return c.maintenance(forwarded(req.into_inner())).await;
            }
            let enter = req.get_ref().enter;
            let mut moved = Vec::new();
            if enter {
                let busy: Vec<String> =
                    e.served_here().await?.into_iter().filter(|(_, n)| *n > 0).map(|(r, n)| format!("{} ({n} client(s))", r.name)).collect();
                if !busy.is_empty() {
                    return Err(Status::failed_precondition(format!(
                        "node {} serves volume(s) in use: {}; stop their users on this node first (kubectl drain {}), then enter maintenance",
                        e.node.id,
                        busy.join(", "),
                        e.node.id
                    )));
                }
                // Recorded first: no attach lands here while the volumes move away.
                let reason = Some(req.get_ref().reason.clone()).filter(|r| !r.is_empty()).unwrap_or_else(|| "admin".into());
                e.set_maintenance(Some(reason)).await?;
                moved = self.move_targets(&req).await?;
            } else {
                e.set_maintenance(None).await?;
            }
            let node = nodes_pb(&e).await.map_err(|err| Status::unavailable(err.to_string()))?.into_iter().find(|n| n.id == e.node.id);
            Ok(Response::new(pb::MaintenanceResponse { node, moved }))
        }
        .await;
        auth::audit(&who, "node.maintenance", &target, fwd, &result);
        result
    }

    async fn decommission(&self, req: Request<pb::DecommissionRequest>) -> Result<Response<pb::DecommissionResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "node.decommission")?;
        let r = req.into_inner();
        let result = async {
            if r.dry_run {
                let plan = self.engine.decommission_plan(&r.node).await?;
                return Ok(Response::new(pb::DecommissionResponse { to_move: plan.to_move, blockers: plan.blockers, removed: false }));
            }
            self.engine.decommission(&r.node).await?;
            Ok(Response::new(pb::DecommissionResponse { to_move: vec![], blockers: vec![], removed: true }))
        }
        .await;
        if !r.dry_run {
            auth::audit(&who, "node.decommission", &r.node, false, &result);
        }
        result
    }
}
