//! `stratactl credentials ...` and `stratactl cloudsnap ...`: object-store credentials and
//! backups of volumes to them (Portworx's cloudsnaps).

use crate::{fail, render, status_err, Sdk};
use anyhow::{anyhow, Context};
use clap::Subcommand;
use strata_api::units::format_size;
use strata_api::v1 as pb;

#[derive(Debug, Subcommand)]
pub enum CredentialsCmd {
    /// Store an S3 credential (admins). The engines check that it opens the bucket, and keep it
    /// sealed in the metadata store; the secret key and passphrase are never shown again.
    Create {
        /// The credential's name.
        name: String,
        /// The object store, http(s)://host:port (Portworx's flag names).
        #[arg(long = "s3-endpoint")]
        s3_endpoint: String,
        #[arg(long)]
        bucket: String,
        #[arg(long = "s3-region", default_value = "", hide_default_value = true)]
        region: String,
        #[arg(long = "s3-access-key")]
        access_key: String,
        /// The secret key (or $STRATA_S3_SECRET_KEY).
        #[arg(long = "s3-secret-key", env = "STRATA_S3_SECRET_KEY", hide_env_values = true)]
        secret_key: String,
        /// Path-style requests (endpoint/bucket/key), as most on-premises stores want.
        #[arg(long)]
        path_style: bool,
        /// Encrypt backups client-side with a key derived from this file's passphrase (every
        /// cluster that restores them needs the same passphrase).
        #[arg(long)]
        passphrase_file: Option<std::path::PathBuf>,
    },
    /// List the credentials (without their secrets).
    List,
    /// Forget a credential.
    Delete {
        /// The credential's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CloudsnapCmd {
    /// Back up a volume to a credential's bucket: incremental after the first (only extents
    /// changed since the last backup are read and uploaded), unless --full.
    Backup {
        /// The volume.
        volume: String,
        /// The credential.
        #[arg(long)]
        cred: String,
        #[arg(long)]
        full: bool,
        /// Wait until it is done (else it runs in the background: `cloudsnap status`).
        #[arg(long)]
        wait: bool,
    },
    /// Backups being taken and taken, with their progress.
    Status {
        /// Only this backup.
        id: Option<String>,
    },
    /// The backups in a credential's bucket.
    List {
        #[arg(long)]
        cred: String,
        /// Only this volume's.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Restore a backup into a new volume (admins; this cluster's backups or another cluster's).
    Restore {
        #[arg(long)]
        cred: String,
        /// The backup's id.
        #[arg(long)]
        snap: String,
        /// The new volume's name. Default: the backed-up volume's name, `-restored-` and the
        /// backup id's last part.
        #[arg(long, default_value = "", hide_default_value = true)]
        name: String,
        /// Replicas of the new volume. Default: 1.
        #[arg(long, default_value_t = 1, hide_default_value = true)]
        repl: u32,
        /// Nodes for its replicas (comma-separated).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
    },
    /// Delete a backup (admins); chunks no other backup uses go with it.
    Delete {
        #[arg(long)]
        cred: String,
        #[arg(long)]
        snap: String,
    },
}

pub async fn credentials(ch: Sdk, cmd: CredentialsCmd, json: bool) -> anyhow::Result<()> {
    let mut c = pb::credential_service_client::CredentialServiceClient::new(ch);
    match cmd {
        CredentialsCmd::Create { name, s3_endpoint, bucket, region, access_key, secret_key, path_style, passphrase_file } => {
            let passphrase = match passphrase_file {
                Some(f) => std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?.trim_end().to_string(),
                None => String::new(),
            };
            let credential = pb::Credential {
                name: name.clone(),
                endpoint: s3_endpoint,
                bucket,
                region,
                access_key,
                secret_key,
                path_style,
                passphrase,
                encrypted: false,
            };
            c.create(pb::CreateCredentialRequest { credential: Some(credential) }).await.map_err(status_err)?;
            if json {
                print!("{}", render::doc(serde_json::json!({ "created": name })));
            } else {
                println!("Credential {name} created.");
            }
        }
        CredentialsCmd::List => {
            let creds = c.list(pb::ListCredentialsRequest {}).await.map_err(status_err)?.into_inner().credentials;
            print!("{}", render::credentials(&creds, json));
        }
        CredentialsCmd::Delete { name } => {
            c.delete(pb::DeleteCredentialRequest { name: name.clone() }).await.map_err(status_err)?;
            print!("{}", render::deleted(&name, json, &format!("Credential {name} deleted.")));
        }
    }
    Ok(())
}

pub async fn cloudsnap(ch: Sdk, cmd: CloudsnapCmd, json: bool) -> anyhow::Result<()> {
    let mut c = pb::cloud_snap_service_client::CloudSnapServiceClient::new(ch);
    match cmd {
        CloudsnapCmd::Backup { volume, cred, full, wait } => {
            let r = c.backup(pb::CloudBackupRequest { volume, credential: cred, full, name: String::new() }).await.map_err(status_err)?.into_inner();
            let mut job = r.job.ok_or_else(|| anyhow!("engine returned no job"))?;
            while wait && job.state == "running" {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let jobs = c.status(pb::CloudStatusRequest { id: job.id.clone() }).await.map_err(status_err)?.into_inner().jobs;
                job = jobs.into_iter().next().ok_or_else(|| anyhow!("backup {} vanished", job.id))?;
            }
            print!("{}", render::cloud_jobs(std::slice::from_ref(&job), json));
            if job.state == "failed" {
                return Err(fail("failed_precondition", format!("backup {} of {} failed: {}", job.id, job.volume, job.error)));
            }
        }
        CloudsnapCmd::Status { id } => {
            let jobs = c.status(pb::CloudStatusRequest { id: id.unwrap_or_default() }).await.map_err(status_err)?.into_inner().jobs;
            print!("{}", render::cloud_jobs(&jobs, json));
        }
        CloudsnapCmd::List { cred, volume } => {
            let req = pb::CloudListRequest { credential: cred, volume: volume.unwrap_or_default() };
            let backups = c.list(req).await.map_err(status_err)?.into_inner().backups;
            print!("{}", render::cloud_backups(&backups, json));
        }
        CloudsnapCmd::Restore { cred, snap, name, repl, nodes } => {
            let req = pb::CloudRestoreRequest { credential: cred, backup_id: snap.clone(), name, repl, nodes };
            let v = c.restore(req).await.map_err(status_err)?.into_inner().volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
            let size = v.spec.as_ref().map_or(0, |s| s.size_bytes);
            print!("{}", render::volume_done(&v, json, |v| format!("Volume {} ({}) restored from backup {snap}", v.name, format_size(size))));
        }
        CloudsnapCmd::Delete { cred, snap } => {
            let n =
                c.delete(pb::CloudDeleteRequest { credential: cred, backup_id: snap.clone() }).await.map_err(status_err)?.into_inner().chunks_deleted;
            if json {
                print!("{}", render::doc(serde_json::json!({"deleted": snap, "chunks_deleted": n})));
            } else {
                println!("Backup {snap} deleted ({n} chunk(s) no other backup used removed).");
            }
        }
    }
    Ok(())
}
