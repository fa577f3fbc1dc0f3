//! Cloud snapshots through CSI: a VolumeSnapshotClass with `portworx/snapshot-type: cloud`
//! (Portworx's key; `strata.dev/snapshot-type` works too) makes each VolumeSnapshot a backup to
//! the bucket of `portworx/cloud-cred-id` (or `strata.dev/cloud-credential`; when neither is
//! given and the cluster has exactly one credential, that one). Its snapshot id is
//! `cloud:<credential>:<backup id>`; it is ready once the backup is done, DeleteSnapshot
//! deletes the backup, and a PVC made from it is a restore.

use crate::sdk::Sdk;
use strata_api::csi;
use strata_api::v1 as pb;
use tonic::{Code, Status};

const TYPE_KEYS: [&str; 2] = ["portworx/snapshot-type", "strata.dev/snapshot-type"];
const CRED_KEYS: [&str; 2] = ["portworx/cloud-cred-id", "strata.dev/cloud-credential"];

/// Whether the class asks for cloud snapshots (an unknown type is refused).
pub fn wants_cloud(params: &std::collections::HashMap<String, String>) -> Result<bool, Status> {
    match TYPE_KEYS.iter().find_map(|k| params.get(*k)).map(String::as_str) {
        None | Some("local") => Ok(false),
        Some("cloud") => Ok(true),
        Some(other) => Err(Status::invalid_argument(format!("snapshot type {other:?}: use local or cloud"))),
    }
}

/// `cloud:<credential>:<backup id>` split, or None for a local snapshot's id.
pub fn parse_id(id: &str) -> Option<(&str, &str)> {
    id.strip_prefix("cloud:")?.split_once(':')
}

async fn credential(sdk: &Sdk, params: &std::collections::HashMap<String, String>) -> Result<String, Status> {
    if let Some(c) = CRED_KEYS.iter().find_map(|k| params.get(*k)).filter(|c| !c.is_empty()) {
        return Ok(c.clone());
    }
    let creds = sdk.credentials().list(pb::ListCredentialsRequest {}).await?.into_inner().credentials;
    match creds.as_slice() {
        [one] => Ok(one.name.clone()),
        [] => Err(Status::failed_precondition("cloud snapshots need a credential: stratactl credentials create, then set portworx/cloud-cred-id")),
        _ => Err(Status::invalid_argument("several credentials exist: say which with the class parameter portworx/cloud-cred-id")),
    }
}

/// CreateSnapshot of the cloud kind: a backup named after the VolumeSnapshot (asking again
/// returns it, with its progress).
pub async fn create(sdk: &Sdk, r: &csi::CreateSnapshotRequest, size: i64) -> Result<csi::Snapshot, Status> {
    let cred = credential(sdk, &r.parameters).await?;
    let req = pb::CloudBackupRequest { volume: r.source_volume_id.clone(), credential: cred.clone(), full: false, name: r.name.clone() };
    let job = sdk.cloud().backup(req).await?.into_inner().job.ok_or_else(|| Status::internal("engine returned no backup"))?;
    if job.state == "failed" {
        return Err(Status::internal(format!("cloud backup {} of {} failed: {}", job.id, job.volume, job.error)));
    }
    Ok(csi::Snapshot {
        size_bytes: size,
        snapshot_id: format!("cloud:{cred}:{}", job.id),
        source_volume_id: r.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp { seconds: job.started_unix as i64, nanos: 0 }),
        ready_to_use: job.state == "done",
        group_snapshot_id: String::new(),
    })
}

/// DeleteSnapshot of a cloud snapshot: its backup goes (one already gone is fine).
pub async fn delete(sdk: &Sdk, cred: &str, id: &str) -> Result<(), Status> {
    match sdk.cloud().delete(pb::CloudDeleteRequest { credential: cred.into(), backup_id: id.into() }).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(s),
    }
}

/// CreateVolume from a cloud snapshot: the backup restored into volume `name`.
pub async fn restore(sdk: &Sdk, cred: &str, id: &str, name: &str, repl: u32, nodes: Vec<String>) -> Result<pb::Volume, Status> {
    let req = pb::CloudRestoreRequest { credential: cred.into(), backup_id: id.into(), name: name.into(), repl, nodes };
    sdk.cloud().restore(req).await?.into_inner().volume.ok_or_else(|| Status::internal("engine returned no volume"))
}
