//! strata-csc: a minimal CSI Node client for tests that cannot link the test harness (the VM
//! tier runs it inside the guest): stage, publish, expand, unpublish and unstage one volume
//! through a CSI node plugin's unix socket, as the kubelet would. Exits non-zero with the gRPC
//! status on failure.
//!
//!   strata-csc --endpoint /path/csi.sock stage VOL STAGING [--block] [--fs ext4]
//!   strata-csc --endpoint /path/csi.sock publish VOL STAGING TARGET [--block]
//!   strata-csc --endpoint /path/csi.sock expand VOL PATH STAGING SIZE_BYTES [--block]
//!   strata-csc --endpoint /path/csi.sock unpublish VOL TARGET
//!   strata-csc --endpoint /path/csi.sock unstage VOL STAGING

use strata_api::csi;
use strata_api::csi::node_client::NodeClient;
use strata_api::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};

fn usage() -> ! {
    eprintln!("usage: strata-csc --endpoint SOCKET (stage VOL STAGING | publish VOL STAGING TARGET | expand VOL PATH STAGING BYTES | unpublish VOL TARGET | unstage VOL STAGING) [--block] [--fs FS]");
    std::process::exit(2)
}

fn cap(block: bool, fs: &str) -> Option<csi::VolumeCapability> {
    Some(csi::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() })
        }),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take_flag = |name: &str, value: bool| -> Option<String> {
        let i = args.iter().position(|a| a == name)?;
        args.remove(i);
        if value {
            (i < args.len()).then(|| args.remove(i)).or_else(|| usage())
        } else {
            Some(String::new())
        }
    };
    let Some(socket) = take_flag("--endpoint", true) else { usage() };
    let block = take_flag("--block", false).is_some();
    let fs = take_flag("--fs", true).unwrap_or_else(|| "ext4".into());
    let socket = socket.trim_start_matches("unix://").to_string();
    let ch = tonic::transport::Endpoint::try_from("http://csi.local")
        .expect("a static URI")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let s = socket.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(s).await?)) }
        }))
        .await
        .unwrap_or_else(|e| {
            eprintln!("strata-csc: cannot reach the CSI socket: {e}");
            std::process::exit(1)
        });
    let mut n = NodeClient::new(ch);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match a.as_slice() {
        ["stage", vol, staging] => n
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.to_string(),
                staging_target_path: staging.to_string(),
                volume_capability: cap(block, &fs),
                ..Default::default()
            })
            .await
            .map(|_| String::new()),
        ["publish", vol, staging, target] => n
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.to_string(),
                staging_target_path: staging.to_string(),
                target_path: target.to_string(),
                volume_capability: cap(block, &fs),
                ..Default::default()
            })
            .await
            .map(|_| String::new()),
        ["expand", vol, path, staging, bytes] => {
            let Ok(bytes) = bytes.parse::<i64>() else { usage() };
            n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: vol.to_string(),
                volume_path: path.to_string(),
                staging_target_path: staging.to_string(),
                capacity_range: Some(csi::CapacityRange { required_bytes: bytes, limit_bytes: 0 }),
                volume_capability: cap(block, &fs),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().capacity_bytes.to_string())
        }
        ["unpublish", vol, target] => n
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: vol.to_string(), target_path: target.to_string() })
            .await
            .map(|_| String::new()),
        ["unstage", vol, staging] => n
            .node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.to_string(), staging_target_path: staging.to_string() })
            .await
            .map(|_| String::new()),
        _ => usage(),
    };
    match r {
        Ok(out) if out.is_empty() => {}
        Ok(out) => println!("{out}"),
        Err(s) => {
            eprintln!("strata-csc: {:?}: {}", s.code(), s.message());
            std::process::exit(1)
        }
    }
}
