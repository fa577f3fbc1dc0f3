//! A volume made usable on this node, shared by the CSI node plugin and the Docker volume plugin:
//! the local engine becomes its target (SDK attach), it becomes a block device (ublk, kernel NBD
//! or the FUSE view under a loop device), a filesystem is made on first use and mounted; and the way
//! back. Every step looks at the system first, so each can be repeated.

use crate::attach::{self, AttachError};
use crate::kernelnbd;
use crate::sdk::Sdk;
use crate::ublk;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use strata_api::v1 as pb;
use tonic::{Code, Status};

pub use crate::nbdclient::Endpoint as NbdEndpoint;

/// Where and how this node makes block devices of volumes.
#[derive(Clone)]
pub struct Devices {
    /// Where FUSE views and kernel NBD indexes of attached volumes live.
    pub state_dir: PathBuf,
    /// The local engine's NBD server.
    pub nbd: NbdEndpoint,
    /// Kernel NBD (its devices' keepers) instead of the FUSE view.
    pub kernel_nbd: Option<Arc<kernelnbd::Keepers>>,
    pub nbd_params: kernelnbd::Params,
    /// ublk (its devices' keepers) instead of kernel NBD or the FUSE view.
    pub ublk: Option<Arc<ublk::Keepers>>,
    pub ublk_opts: ublk::Opts,
}

/// A filesystem to mount the device at.
pub struct Mount {
    pub fs: String,
    pub flags: Vec<String>,
    pub at: PathBuf,
}

pub(crate) fn internal(e: AttachError) -> Status {
    Status::internal(e.to_string())
}

/// The /dev/nbdN a volume is connected to on this node (kernel NBD), if any.
pub(crate) fn nbd_index(state: &Path, id: &str) -> Option<u32> {
    std::fs::read_to_string(kernelnbd::index_file(state, id)).ok()?.trim().parse().ok()
}

/// Runs blocking system work (mounts, mkfs) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(e.to_string()))?
}

/// The /dev/ublkbN a volume is served as on this node (ublk), if any.
pub(crate) fn ublk_id(state: &Path, id: &str) -> Option<u32> {
    ublk::read_state(&ublk::state_file(state, id)).map(|(dev, _)| dev)
}

/// Makes the volume a block device here: a ublk device (its helper watched by a keeper), kernel
/// NBD (remembered in the state directory, its sockets watched by a keeper) or a FUSE view under
/// a loop device.
fn ensure_device(d: &Devices, id: &str) -> Result<String, Status> {
    let (state, ep) = (&d.state_dir, &d.nbd);
    if let Some(keepers) = &d.ublk {
        let dev = ublk::ensure(state, id, ep, d.ublk_opts).map_err(|e| Status::internal(format!("ublk device of {id}: {e}")))?;
        keepers.start(state, id, ep.clone(), d.ublk_opts);
        return Ok(dev);
    }
    let Some((keepers, p)) = d.kernel_nbd.as_deref().map(|k| (k, d.nbd_params)) else {
        let file = attach::ensure_fuse(state, id, ep).map_err(internal)?;
        return attach::ensure_loop(&file).map_err(internal);
    };
    if let Some(i) = nbd_index(state, id) {
        return Ok(kernelnbd::device(i));
    }
    let (i, conns) = kernelnbd::connect(ep, id, p).map_err(|e| Status::internal(format!("kernel NBD connect of {id}: {e}")))?;
    std::fs::create_dir_all(state)
        .and_then(|_| std::fs::write(kernelnbd::index_file(state, id), i.to_string()))
        .map_err(|e| Status::internal(e.to_string()))?;
    keepers.start(i, ep.clone(), id, conns, p);
    Ok(kernelnbd::device(i))
}

impl Devices {
    /// Makes this node the volume's target (a no-op when it already is).
    pub async fn attach(&self, sdk: &Sdk, id: &str, passphrase: Vec<u8>) -> Result<(), Status> {
        sdk.volumes().attach(pb::AttachVolumeRequest { name: id.to_string(), force: false, passphrase }).await.map_err(|s| {
            if s.code() == Code::FailedPrecondition {
                Status::failed_precondition(s.message().to_string())
            } else {
                s
            }
        })?;
        Ok(())
    }

    /// Makes the volume a block device here and, with `mount`, a mounted filesystem (made on
    /// first use); returns the device.
    pub async fn stage(&self, id: &str, mount: Option<Mount>) -> Result<String, Status> {
        let (d, id) = (self.clone(), id.to_string());
        blocking(move || {
            let dev = ensure_device(&d, &id)?;
            let Some(Mount { fs, flags, at }) = mount else { return Ok(dev) };
            std::fs::create_dir_all(&at).map_err(|e| Status::internal(e.to_string()))?;
            if attach::is_mounted(&at) {
                return Ok(dev);
            }
            match attach::fs_type(&dev).map_err(internal)? {
                None => attach::mkfs(&dev, &fs).map_err(internal)?,
                Some(found) if found != fs => {
                    return Err(Status::failed_precondition(format!("volume {id} holds a {found} filesystem, not the requested {fs}")));
                }
                Some(_) => {}
            }
            let mut args = vec!["-t".to_string(), fs.clone()];
            if !flags.is_empty() {
                args.push("-o".into());
                args.push(flags.join(","));
            }
            args.push(dev.clone());
            args.push(at.to_string_lossy().into_owned());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            attach::run("mount", &a).map_err(internal)?;
            Ok(dev)
        })
        .await
    }

    /// Undoes `stage`: unmounts `mounted` (if given and mounted) and lets the device go.
    pub async fn unstage(&self, id: &str, mounted: Option<PathBuf>) -> Result<(), Status> {
        let (d, id) = (self.clone(), id.to_string());
        blocking(move || {
            if let Some(at) = mounted.filter(|m| attach::is_mounted(m)) {
                attach::run("umount", &[&at.to_string_lossy()]).map_err(internal)?;
            }
            if ublk_id(&d.state_dir, &id).is_some() {
                // A helper that ends looks dead to the keeper: stop it first.
                if let Some(k) = &d.ublk {
                    k.stop(&id);
                }
                ublk::release(&d.state_dir, &id).map_err(|e| Status::internal(format!("ublk release of {id}: {e}")))?;
            }
            if let Some(i) = nbd_index(&d.state_dir, &id) {
                // A disconnect looks like a dead engine to the keeper: stop it first.
                if let Some(k) = &d.kernel_nbd {
                    k.stop(&id);
                }
                kernelnbd::disconnect(i).map_err(|e| Status::internal(format!("kernel NBD disconnect of {}: {e}", kernelnbd::device(i))))?;
                std::fs::remove_file(kernelnbd::index_file(&d.state_dir, &id)).map_err(|e| Status::internal(e.to_string()))?;
            }
            attach::release(&d.state_dir, &id).map_err(internal)
        })
        .await
    }

    /// Stops serving the volume here (after `unstage`); the NBD client may take a moment to go.
    pub async fn detach(&self, sdk: &Sdk, id: &str) -> Result<(), Status> {
        for _ in 0..50 {
            match sdk.volumes().detach(pb::DetachVolumeRequest { name: id.to_string(), force: false }).await {
                Ok(_) => break,
                Err(s) if s.code() == Code::NotFound => break,
                Err(s) if s.code() == Code::FailedPrecondition && s.message().contains("connected") => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                // Served by another node now: nothing to detach here.
                Err(s) if s.code() == Code::FailedPrecondition => break,
                Err(s) => return Err(crate::sdk::unavailable(s)),
            }
        }
        Ok(())
    }
}
