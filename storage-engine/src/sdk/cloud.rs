//! CredentialService and CloudSnapService: object-store credentials and cloud snapshots.

use super::{auth, bearer_of, forwarded, to_pb, was_forwarded, Sdk};
use crate::cloudsnap::{credentials::Credential, Job, Manifest};
use crate::meta::Access;
use crate::volume::VolumeError;
use strata_api::auth::Role;
use strata_api::v1 as pb;
use tonic::{Request, Response, Status};

fn job_pb(j: Job) -> pb::CloudJob {
    pb::CloudJob {
        id: j.id,
        volume: j.volume,
        credential: j.credential,
        node: j.node,
        state: j.state,
        error: j.error,
        done_extents: j.done_extents,
        total_extents: j.total_extents,
        uploaded_bytes: j.uploaded_bytes,
        started_unix: j.started_unix,
        full: j.full,
        name: j.name,
    }
}

fn backup_pb(m: Manifest) -> pb::CloudBackup {
    pb::CloudBackup {
        id: m.id,
        volume: m.volume,
        cluster_id: m.cluster_id,
        size_bytes: m.size,
        created_unix: m.created_unix,
        parent: m.parent.unwrap_or_default(),
        encrypted: m.encrypted,
        extents: m.extents.len() as u64,
        changed_extents: m.changed_extents,
        uploaded_bytes: m.uploaded_bytes,
    }
}

#[tonic::async_trait]
impl pb::credential_service_server::CredentialService for Sdk {
    async fn create(&self, req: Request<pb::CreateCredentialRequest>) -> Result<Response<pb::CreateCredentialResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "credential.create")?;
        let c = req.into_inner().credential.ok_or_else(|| Status::invalid_argument("credential is required"))?;
        let name = c.name.clone();
        let cred = Credential {
            name: c.name,
            endpoint: c.endpoint,
            bucket: c.bucket,
            region: c.region,
            access_key: c.access_key,
            secret_key: c.secret_key,
            path_style: c.path_style,
            passphrase: c.passphrase,
        };
        let result = async {
            self.engine.credential_create(cred).await?;
            Ok(Response::new(pb::CreateCredentialResponse {}))
        }
        .await;
        auth::audit(&who, "credential.create", &name, false, &result);
        result
    }

    async fn list(&self, req: Request<pb::ListCredentialsRequest>) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        auth::require(&self.who(&req)?, Role::View, "credential.list")?;
        let credentials = self
            .engine
            .credential_list()
            .await?
            .into_iter()
            .map(|c| pb::Credential {
                encrypted: !c.passphrase.is_empty(),
                name: c.name,
                endpoint: c.endpoint,
                bucket: c.bucket,
                region: c.region,
                access_key: c.access_key,
                path_style: c.path_style,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::ListCredentialsResponse { credentials }))
    }

    async fn delete(&self, req: Request<pb::DeleteCredentialRequest>) -> Result<Response<pb::DeleteCredentialResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "credential.delete")?;
        let name = req.into_inner().name;
        let result = async {
            self.engine.credential_delete(&name).await?;
            Ok(Response::new(pb::DeleteCredentialResponse {}))
        }
        .await;
        auth::audit(&who, "credential.delete", &name, false, &result);
        result
    }
}

impl Sdk {
    /// A client to the cloud service of the node that must take a backup of `volume`, when that
    /// is another node: the node serving it (its snapshot is taken at the target's write
    /// barrier), or for a detached volume an online node holding an in-sync replica (a backup
    /// reads a local one) unless this node holds one.
    async fn cloud_at_target<T>(
        &self,
        req: &Request<T>,
        volume: &str,
    ) -> Result<Option<pb::cloud_snap_service_client::CloudSnapServiceClient<super::Channel>>, Status> {
        if was_forwarded(req) {
            return Ok(None);
        }
        let e = &self.engine;
        let me = e.node.id.clone();
        let rec = e.inspect(volume).await?.record.normalized(&me);
        let node = if !rec.target.is_empty() {
            rec.target.clone()
        } else if rec.is_in_sync(&me) || rec.snapshot_of.is_some() {
            return Ok(None);
        } else {
            let online: Vec<String> = super::nodes_pb(e)
                .await
                .map_err(|err| Status::unavailable(err.to_string()))?
                .into_iter()
                .filter(|n| n.status == "online")
                .map(|n| n.id)
                .collect();
            match rec.in_sync.iter().find(|n| online.contains(n)) {
                Some(n) => n.clone(),
                None => {
                    return Err(Status::failed_precondition(format!(
                        "volume {volume} is detached and no online node holds an in-sync replica of it ({}): bring one back, then back it up",
                        rec.in_sync.join(", ")
                    )))
                }
            }
        };
        if node == me {
            return Ok(None);
        }
        let ch = self.node_channel(&node, std::time::Duration::from_secs(60), &format!("a backup of volume {volume} is taken at")).await?;
        Ok(Some(pb::cloud_snap_service_client::CloudSnapServiceClient::with_interceptor(ch, bearer_of(req))))
    }
}

#[tonic::async_trait]
impl pb::cloud_snap_service_server::CloudSnapService for Sdk {
    async fn backup(&self, req: Request<pb::CloudBackupRequest>) -> Result<Response<pb::CloudBackupResponse>, Status> {
        let (who, _) = self.on_volume(&req, "cloudsnap.backup", &req.get_ref().volume, Access::Write).await?;
        let (fwd, volume) = (was_forwarded(&req), req.get_ref().volume.clone());
        let result = async {
            if let Some(mut c) = self.cloud_at_target(&req, &volume).await? {
                return c.backup(forwarded(req.into_inner())).await;
            }
            let r = req.into_inner();
            let job = self.engine.cloud_backup(&r.volume, &r.credential, r.full, &r.name).await?;
            Ok(Response::new(pb::CloudBackupResponse { job: Some(job_pb(job)) }))
        }
        .await;
        auth::audit(&who, "cloudsnap.backup", &volume, fwd, &result);
        result
    }

    async fn status(&self, req: Request<pb::CloudStatusRequest>) -> Result<Response<pb::CloudStatusResponse>, Status> {
        auth::require(&self.who(&req)?, Role::View, "cloudsnap.status")?;
        let id = req.into_inner().id;
        // One job is one record read (the migration controller asks about one every few
        // seconds); every job, a listing.
        let jobs = if id.is_empty() {
            self.engine.jobs().await?
        } else {
            vec![self.engine.job(&id).await?.ok_or_else(|| VolumeError::Absent(format!("backup job {id}")))?]
        };
        Ok(Response::new(pb::CloudStatusResponse { jobs: jobs.into_iter().map(job_pb).collect() }))
    }

    async fn list(&self, req: Request<pb::CloudListRequest>) -> Result<Response<pb::CloudListResponse>, Status> {
        auth::require(&self.who(&req)?, Role::View, "cloudsnap.list")?;
        let r = req.into_inner();
        let volume = (!r.volume.is_empty()).then_some(r.volume.as_str());
        let backups = self.engine.cloud_list(&r.credential, volume).await?.into_iter().map(backup_pb).collect();
        Ok(Response::new(pb::CloudListResponse { backups }))
    }

    async fn restore(&self, req: Request<pb::CloudRestoreRequest>) -> Result<Response<pb::CloudRestoreResponse>, Status> {
        // A bucket holds every owner's backups: restoring one is for admins.
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "cloudsnap.restore")?;
        let r = req.into_inner();
        let result = async {
            let v = self.engine.cloud_restore(&r.credential, &r.backup_id, &r.name, r.repl, r.nodes).await?;
            Ok(Response::new(pb::CloudRestoreResponse { volume: Some(to_pb(&self.engine, v)) }))
        }
        .await;
        auth::audit(&who, "cloudsnap.restore", &r.name, false, &result);
        result
    }

    async fn delete(&self, req: Request<pb::CloudDeleteRequest>) -> Result<Response<pb::CloudDeleteResponse>, Status> {
        let who = self.who(&req)?;
        auth::require(&who, Role::Admin, "cloudsnap.delete")?;
        let r = req.into_inner();
        let result = async {
            let chunks_deleted = self.engine.cloud_delete(&r.credential, &r.backup_id).await?;
            Ok(Response::new(pb::CloudDeleteResponse { chunks_deleted }))
        }
        .await;
        auth::audit(&who, "cloudsnap.delete", &r.backup_id, false, &result);
        result
    }
}
