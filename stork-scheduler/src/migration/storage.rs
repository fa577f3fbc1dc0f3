//! What a migration needs from each cluster's Strata: credentials, backups, restores.

use async_trait::async_trait;
use std::collections::BTreeMap;
use std::time::Duration;
use strata_api::v1 as pb;

/// A restore runs inside one call (it answers once the volume is written): this long, at most;
/// a migration that loses the call finds the restore under way (or done) at its next look.
const RESTORE_CALL: Duration = Duration::from_secs(3600);

#[async_trait]
pub trait CloudSnaps: Send + Sync {
    /// Names of the credentials the cluster holds.
    async fn credentials(&self) -> Result<Vec<String>, String>;
    async fn create_credential(&self, c: pb::Credential) -> Result<(), String>;
    /// Starts (or, by name, finds) a backup of `volume`.
    async fn backup(&self, volume: &str, credential: &str, name: &str) -> Result<pb::CloudJob, String>;
    async fn job(&self, id: &str) -> Result<pb::CloudJob, String>;
    /// Restores backup `id` into a new volume `name` of `repl` replicas; returns once it is
    /// written.
    async fn restore(&self, credential: &str, id: &str, name: &str, repl: u32) -> Result<(), String>;
    /// Volume `name`'s labels and replica count, or None when there is no such volume.
    async fn volume(&self, name: &str) -> Result<Option<VolumeFacts>, String>;
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeFacts {
    pub labels: BTreeMap<String, String>,
    pub repl: u32,
}

fn msg(s: tonic::Status) -> String {
    s.message().to_string()
}

#[async_trait]
impl CloudSnaps for crate::storage::Sdk {
    async fn credentials(&self) -> Result<Vec<String>, String> {
        let mut c = pb::credential_service_client::CredentialServiceClient::new(self.channel().await?);
        Ok(c.list(pb::ListCredentialsRequest {}).await.map_err(msg)?.into_inner().credentials.into_iter().map(|c| c.name).collect())
    }

    async fn create_credential(&self, credential: pb::Credential) -> Result<(), String> {
        let mut c = pb::credential_service_client::CredentialServiceClient::new(self.channel_for(Duration::from_secs(60)).await?);
        c.create(pb::CreateCredentialRequest { credential: Some(credential) }).await.map_err(msg)?;
        Ok(())
    }

    async fn backup(&self, volume: &str, credential: &str, name: &str) -> Result<pb::CloudJob, String> {
        let mut c = pb::cloud_snap_service_client::CloudSnapServiceClient::new(self.channel_for(Duration::from_secs(60)).await?);
        let req = pb::CloudBackupRequest { volume: volume.into(), credential: credential.into(), full: false, name: name.into() };
        c.backup(req).await.map_err(msg)?.into_inner().job.ok_or_else(|| "the engine returned no backup job".to_string())
    }

    async fn job(&self, id: &str) -> Result<pb::CloudJob, String> {
        let mut c = pb::cloud_snap_service_client::CloudSnapServiceClient::new(self.channel().await?);
        let jobs = c.status(pb::CloudStatusRequest { id: id.into() }).await.map_err(msg)?.into_inner().jobs;
        jobs.into_iter().next().ok_or_else(|| format!("backup job {id} is unknown"))
    }

    async fn restore(&self, credential: &str, id: &str, name: &str, repl: u32) -> Result<(), String> {
        let mut c = pb::cloud_snap_service_client::CloudSnapServiceClient::new(self.channel_for(RESTORE_CALL).await?);
        let req = pb::CloudRestoreRequest { credential: credential.into(), backup_id: id.into(), name: name.into(), repl, nodes: vec![] };
        c.restore(req).await.map_err(msg)?;
        Ok(())
    }

    async fn volume(&self, name: &str) -> Result<Option<VolumeFacts>, String> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.channel().await?);
        match c.inspect(pb::InspectVolumeRequest { name: name.into() }).await {
            Ok(r) => {
                let spec = r.into_inner().volume.and_then(|v| v.spec).unwrap_or_default();
                Ok(Some(VolumeFacts { labels: spec.labels.into_iter().collect(), repl: spec.repl }))
            }
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(msg(s)),
        }
    }
}
