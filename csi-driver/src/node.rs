//! CSI Node: attach a volume on this node (the local engine becomes its target), expose it as a
//! block device (`--attach`: a ublk device served by a helper, the kernel's NBD driver, or our
//! FUSE view under a loop device), make a filesystem on first use, mount, bind-mount into pods,
//! grow, report usage. Every RPC can be repeated: each step looks at the system first.

use crate::attach;
use crate::controller::{CLUSTER_KEY, NODE_KEY, RACK_KEY, ZONE_KEY};
use crate::inflight::InFlight;
use crate::kernelnbd;
use crate::sdk::Sdk;
use crate::stage::{blocking, internal, nbd_index, ublk_id, Devices, Mount};
use crate::ublk;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use strata_api::csi::node_service_capability::{rpc, Rpc, Type as CapType};
use strata_api::csi::volume_capability::AccessType;
use strata_api::csi::{self, volume_usage::Unit};
use strata_api::v1 as pb;
use tonic::{Request, Response, Status};

pub struct Node {
    pub sdk: Sdk,
    pub node_id: String,
    pub max_volumes: i64,
    /// How volumes become block devices here (shared with the Docker plugin).
    pub devices: Devices,
    inflight: InFlight,
}

pub use crate::stage::NbdEndpoint;

/// The block device of a volume staged on this node: its /dev/nbdN, its /dev/ublkbN, or the
/// loop device over its FUSE view.
fn staged_device(state: &Path, id: &str) -> Result<String, Status> {
    if let Some(i) = nbd_index(state, id) {
        return Ok(kernelnbd::device(i));
    }
    if let Some(u) = ublk_id(state, id) {
        return Ok(ublk::device(u));
    }
    attach::find_loop(&attach::fuse_dir(state, id).join("disk"))
        .map_err(internal)?
        .ok_or_else(|| Status::failed_precondition(format!("volume {id} is not staged on this node")))
}

/// The filesystem to stage with: the StorageClass's `fs` (in the volume context) when it set
/// one, since the provisioner fills the capability's fsType with its own default; else the
/// capability's fsType; else ext4.
pub fn stage_fs(class_fs: Option<&str>, cap_fs: &str) -> String {
    match class_fs.filter(|f| !f.is_empty()) {
        Some(f) => f.to_string(),
        None if !cap_fs.is_empty() => cap_fs.to_string(),
        None => "ext4".into(),
    }
}

/// Whether a published volume path is a raw block volume: a block device node (bind-mounted
/// device) or a plain file, as opposed to a directory with a filesystem mounted.
pub fn is_block_path(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).map(|m| m.file_type().is_block_device() || m.is_file()).unwrap_or(false)
}

fn required<'a>(v: &'a str, what: &str) -> Result<&'a str, Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    Ok(v)
}

impl Node {
    pub fn new(sdk: Sdk, node_id: String, max_volumes: i64, devices: Devices) -> Node {
        Node { sdk, node_id, max_volumes, devices, inflight: InFlight::default() }
    }

    async fn volume(&self, id: &str) -> Result<pb::Volume, Status> {
        self.sdk.inspect(id).await.map_err(crate::sdk::unavailable)?.ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))
    }
}

fn capability(c: Option<csi::VolumeCapability>) -> Result<(bool, String, Vec<String>), Status> {
    let c = c.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    crate::controller::check_capabilities(std::slice::from_ref(&c)).map_err(Status::invalid_argument)?;
    Ok(match c.access_type {
        Some(AccessType::Block(_)) => (true, String::new(), vec![]),
        Some(AccessType::Mount(m)) => (false, m.fs_type, m.mount_flags),
        None => unreachable!("checked above"),
    })
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    async fn node_stage_volume(&self, req: Request<csi::NodeStageVolumeRequest>) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let (block, fs, flags) = capability(r.volume_capability)?;
        let _busy = self.inflight.begin(&id)?;
        self.volume(&id).await?;
        // This node becomes the volume's target (a no-op when it already is).
        let passphrase = r.secrets.get("passphrase").map(|s| s.as_bytes().to_vec()).unwrap_or_default();
        let sdk = self.sdk.for_secrets(&r.secrets)?;
        let dev = &self.devices;
        dev.attach(&sdk, &id, passphrase).await?;
        let fs = stage_fs(r.volume_context.get("fs").map(String::as_str), &fs);
        let mount = (!block).then_some(Mount { fs, flags, at: staging });
        dev.stage(&id, mount).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(&self, req: Request<csi::NodeUnstageVolumeRequest>) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let _busy = self.inflight.begin(&id)?;
        let dev = &self.devices;
        dev.unstage(&id, Some(staging)).await?;
        dev.detach(&self.sdk, &id).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(&self, req: Request<csi::NodePublishVolumeRequest>) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let staging = PathBuf::from(required(&r.staging_target_path, "staging_target_path")?);
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let (block, _, _) = capability(r.volume_capability)?;
        let readonly = r.readonly;
        let _busy = self.inflight.begin(&id)?;
        let state = self.devices.state_dir.clone();
        blocking(move || {
            if attach::is_mounted(&target) {
                return Ok(());
            }
            let source = if block {
                let dev = staged_device(&state, &id)?;
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| Status::internal(e.to_string()))?;
                }
                std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&target).map_err(|e| Status::internal(e.to_string()))?;
                dev
            } else {
                if !attach::is_mounted(&staging) {
                    return Err(Status::failed_precondition(format!("volume {id} is not staged at {}", staging.display())));
                }
                std::fs::create_dir_all(&target).map_err(|e| Status::internal(e.to_string()))?;
                staging.to_string_lossy().into_owned()
            };
            let t = target.to_string_lossy().into_owned();
            attach::run("mount", &["--bind", &source, &t]).map_err(internal)?;
            if readonly {
                attach::run("mount", &["-o", "remount,bind,ro", &t]).map_err(internal)?;
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let _busy = self.inflight.begin(&id)?;
        blocking(move || {
            if attach::is_mounted(&target) {
                attach::run("umount", &[&target.to_string_lossy()]).map_err(internal)?;
            }
            if target.is_dir() {
                let _ = std::fs::remove_dir(&target);
            } else if target.exists() {
                let _ = std::fs::remove_file(&target);
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(&self, req: Request<csi::NodeGetVolumeStatsRequest>) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let v = self.volume(&id).await?;
        if !path.exists() {
            return Err(Status::not_found(format!("volume path {} does not exist", path.display())));
        }
        let behind: Vec<&String> = v.replica_nodes.iter().filter(|n| !v.in_sync_nodes.contains(n)).collect();
        let condition = csi::VolumeCondition {
            abnormal: !behind.is_empty(),
            message: if behind.is_empty() { "all replicas in sync".into() } else { format!("replica(s) out of sync: {behind:?}") },
        };
        let usage = if path.is_dir() {
            let (b, i) = attach::usage(&path).map_err(|e| Status::internal(e.to_string()))?;
            vec![
                csi::VolumeUsage { total: b[0] as i64, available: b[1] as i64, used: b[2] as i64, unit: Unit::Bytes as i32 },
                csi::VolumeUsage { total: i[0] as i64, available: i[1] as i64, used: i[2] as i64, unit: Unit::Inodes as i32 },
            ]
        } else {
            let size = v.spec.map_or(0, |s| s.size_bytes) as i64;
            vec![csi::VolumeUsage { total: size, available: 0, used: 0, unit: Unit::Bytes as i32 }]
        };
        Ok(Response::new(csi::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) }))
    }

    /// Grows the staged device to the volume's size (ControllerExpandVolume grew the volume):
    /// the FUSE view follows the export, the loop device is told its new capacity, and a
    /// mounted filesystem is grown online (resize2fs, xfs_growfs).
    async fn node_expand_volume(&self, req: Request<csi::NodeExpandVolumeRequest>) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let _busy = self.inflight.begin(&id)?;
        let v = self.volume(&id).await?;
        let size = v.spec.as_ref().map_or(0, |s| s.size_bytes);
        if let Some(want) = r.capacity_range.as_ref().map(|c| c.required_bytes).filter(|b| *b as u64 > size) {
            return Err(Status::failed_precondition(format!(
                "volume {id} is {size} bytes, less than the {want} asked for: expand it through the controller first"
            )));
        }
        let block = match r.volume_capability.as_ref().and_then(|c| c.access_type.as_ref()) {
            Some(csi::volume_capability::AccessType::Block(_)) => true,
            Some(csi::volume_capability::AccessType::Mount(_)) => false,
            None => is_block_path(&path),
        };
        let mountpoint = if r.staging_target_path.is_empty() { path.clone() } else { PathBuf::from(&r.staging_target_path) };
        let state = self.devices.state_dir.clone();
        let capacity = blocking(move || {
            if !path.exists() {
                return Err(Status::not_found(format!("volume_path {} does not exist", path.display())));
            }
            let dev = staged_device(&state, &id)?;
            if let Some(i) = nbd_index(&state, &id) {
                kernelnbd::resize(i, size).map_err(|e| Status::internal(format!("kernel NBD resize of {dev}: {e}")))?;
            } else if let Some(u) = ublk_id(&state, &id) {
                ublk::resize(u, size).map_err(Status::failed_precondition)?;
            } else {
                // The FUSE view asks the engine for the export's size on every stat.
                let file = attach::fuse_dir(&state, &id).join("disk");
                let t0 = std::time::Instant::now();
                while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) < size {
                    if t0.elapsed() > std::time::Duration::from_secs(10) {
                        return Err(Status::unavailable(format!("the device of volume {id} did not reach {size} bytes within 10 s")));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                attach::refresh_loop(&dev).map_err(internal)?;
            }
            if !block {
                let fs = attach::fs_type(&dev).map_err(internal)?.unwrap_or_else(|| "ext4".into());
                attach::grow_fs(&dev, &fs, &mountpoint).map_err(internal)?;
            }
            Ok(size as i64)
        })
        .await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse { capacity_bytes: capacity }))
    }

    async fn node_get_capabilities(&self, _: Request<csi::NodeGetCapabilitiesRequest>) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let caps = [rpc::Type::StageUnstageVolume, rpc::Type::GetVolumeStats, rpc::Type::VolumeCondition, rpc::Type::ExpandVolume]
            .into_iter()
            .map(|t| csi::NodeServiceCapability { r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })) })
            .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities: caps }))
    }

    /// The node id and its topology: always the node (`topology.strata.dev/node`) and the
    /// cluster (`topology.strata.dev/cluster`), plus its zone and rack as the engine registered
    /// them (`topology.kubernetes.io/zone`, `strata.dev/rack`).
    async fn node_get_info(&self, _: Request<csi::NodeGetInfoRequest>) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let status = self.sdk.status().await.map_err(crate::sdk::unavailable)?;
        let mut segments = HashMap::from([(NODE_KEY.to_string(), self.node_id.clone()), (CLUSTER_KEY.to_string(), status.cluster_id.clone())]);
        if let Some(n) = status.nodes.iter().find(|n| n.id == self.node_id) {
            if !n.zone.is_empty() {
                segments.insert(ZONE_KEY.to_string(), n.zone.clone());
            }
            if !n.rack.is_empty() {
                segments.insert(RACK_KEY.to_string(), n.rack.clone());
            }
        }
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(csi::Topology { segments }),
        }))
    }
}
