//! The full CSI lifecycle through real node plugins on two engines (as root): create (repl 2),
//! stage (FUSE view + loop device + mkfs + mount), publish, write files, expand while mounted,
//! unpublish, unstage, stage and publish on the other node, the files are there; snapshot while
//! mounted and a volume from it; raw block (and its expansion); idempotency and bad input.

#![allow(clippy::result_large_err)]

mod common;

use common::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use strata_api::csi;
use strata_api::csi::controller_client::ControllerClient;
use strata_api::csi::node_client::NodeClient;
use strata_api::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
use strata_e2e::cluster::Cluster;
use tonic::Code;

const MIB: i64 = 1 << 20;

fn cap(block: bool) -> csi::VolumeCapability {
    cap_fs(block, "ext4")
}

fn cap_fs(block: bool, fs: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() })
        }),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

fn node_plugin(c: &Cluster, i: usize, dir: &Path) -> Csi {
    let e = &c.engines[i];
    let state = dir.join(format!("state-{i}"));
    let id = format!("node-{}", i + 1);
    start_csi(dir, "node", e, &["--node-id", &id, "--nbd-socket", &e.socket.to_string_lossy(), "--state-dir", &state.to_string_lossy()])
}

fn stage(n: &Csi, vol: &str, staging: &Path, block: bool) -> Result<(), tonic::Status> {
    stage_fs(n, vol, staging, block, "ext4")
}

fn stage_fs(n: &Csi, vol: &str, staging: &Path, block: bool, fs: &str) -> Result<(), tonic::Status> {
    let mut c = NodeClient::new(n.ch.clone());
    n.rt.block_on(c.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap_fs(block, fs)),
        ..Default::default()
    }))
    .map(|_| ())
}

fn publish(n: &Csi, vol: &str, staging: &Path, target: &Path, block: bool, readonly: bool) -> Result<(), tonic::Status> {
    let mut c = NodeClient::new(n.ch.clone());
    n.rt.block_on(c.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: vol.into(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap(block)),
        readonly,
        ..Default::default()
    }))
    .map(|_| ())
}

fn unpublish(n: &Csi, vol: &str, target: &Path) {
    let mut c = NodeClient::new(n.ch.clone());
    n.rt.block_on(c.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: vol.into(), target_path: target.to_string_lossy().into() }))
        .unwrap();
}

fn unstage(n: &Csi, vol: &str, staging: &Path) {
    let mut c = NodeClient::new(n.ch.clone());
    n.rt.block_on(
        c.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: vol.into(), staging_target_path: staging.to_string_lossy().into() }),
    )
    .unwrap();
}

#[test]
fn stage_publish_write_move_to_another_node_and_raw_block() {
    let c = Cluster::start(2, "3GiB");
    let dir = strata_e2e::tempdir();
    let ctl = start_csi(dir.path(), "controller", &c.engines[0], &[]);
    let n1 = node_plugin(&c, 0, dir.path());
    let n2 = node_plugin(&c, 1, dir.path());
    let mut cc = ControllerClient::new(ctl.ch.clone());
    let create = |name: &str, block: bool| {
        ctl.rt
            .block_on(cc.clone().create_volume(csi::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(csi::CapacityRange { required_bytes: 256 * MIB, limit_bytes: 0 }),
                volume_capabilities: vec![cap(block)],
                parameters: [("repl".to_string(), "2".to_string())].into(),
                ..Default::default()
            }))
            .unwrap()
    };
    create("fsvol", false);

    // Node info and capabilities.
    let mut nc = NodeClient::new(n1.ch.clone());
    let info = n1.rt.block_on(nc.node_get_info(csi::NodeGetInfoRequest {})).unwrap().into_inner();
    assert_eq!(info.node_id, "node-1");
    let caps = n1.rt.block_on(nc.node_get_capabilities(csi::NodeGetCapabilitiesRequest {})).unwrap().into_inner().capabilities;
    assert_eq!(caps.len(), 4, "stage, stats, condition, expand");

    // Bad input, each with the spec's code.
    let st = dir.path().join("staging-1");
    let tg = dir.path().join("pods/a/mount");
    assert_eq!(stage(&n1, "", &st, false).unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(stage(&n1, "fsvol", Path::new(""), false).unwrap_err().code(), Code::InvalidArgument);
    let mut raw = NodeClient::new(n1.ch.clone());
    let e = n1
        .rt
        .block_on(raw.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: "fsvol".into(),
            staging_target_path: st.to_string_lossy().into(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "missing capability");
    assert_eq!(stage(&n1, "nope", &st, false).unwrap_err().code(), Code::NotFound);
    assert_eq!(publish(&n1, "fsvol", &st, Path::new(""), false, false).unwrap_err().code(), Code::InvalidArgument);

    // Node 1: stage (twice), publish (twice), write files.
    stage(&n1, "fsvol", &st, false).unwrap();
    stage(&n1, "fsvol", &st, false).unwrap();
    publish(&n1, "fsvol", &st, &tg, false, false).unwrap();
    publish(&n1, "fsvol", &st, &tg, false, false).unwrap();
    // The loop device under the filesystem does direct I/O on the FUSE view (no second cache).
    let dev = strata_csi::attach::mount_source(&st).expect("the staging path is mounted");
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert!(strata_csi::attach::loop_direct_io(&dev), "{dev} runs without direct I/O");
    std::fs::write(tg.join("hello.txt"), b"written on node-1").unwrap();
    std::fs::create_dir(tg.join("dir")).unwrap();
    std::fs::write(tg.join("dir/big.bin"), vec![0x5au8; 3 << 20]).unwrap();
    let stats = n1
        .rt
        .block_on(nc.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "fsvol".into(),
            volume_path: tg.to_string_lossy().into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2, "bytes and inodes");
    assert!(stats.usage[0].used >= 3 << 20, "{:?}", stats.usage);
    let cond = stats.volume_condition.unwrap();
    assert!(!cond.abnormal, "{}", cond.message);

    let grow = |vol: &str, size: i64, block: bool| {
        ctl.rt
            .block_on(cc.clone().controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: vol.into(),
                capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
                volume_capability: Some(cap(block)),
                ..Default::default()
            }))
            .unwrap()
    };
    let node_expand = |n: &Csi, vol: &str, path: &Path, staging: &Path, size: i64, block: bool| {
        n.rt.block_on(NodeClient::new(n.ch.clone()).node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: vol.into(),
            volume_path: path.to_string_lossy().into(),
            staging_target_path: staging.to_string_lossy().into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
            volume_capability: Some(cap(block)),
            ..Default::default()
        }))
    };
    // Expand while mounted (xfs: growing a mounted ext4 needs CAP_SYS_RESOURCE, which this
    // machine's root lacks — then the error says so): the controller grows the volume, the node
    // its device and filesystem.
    let caps_resource = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap() & (1 << 24) != 0)
        .unwrap();
    grow("fsvol", 512 * MIB, false);
    match node_expand(&n1, "fsvol", &tg, &st, 512 * MIB, false) {
        Ok(r) => assert!(caps_resource && r.into_inner().capacity_bytes == 512 * MIB),
        Err(e) => assert!(!caps_resource && e.message().contains("CAP_SYS_RESOURCE"), "{}", e.message()),
    }
    let stx = dir.path().join("staging-x");
    let tgx = dir.path().join("pods/x/mount");
    ctl.rt
        .block_on(cc.clone().create_volume(csi::CreateVolumeRequest {
            name: "xfsvol".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 320 * MIB, limit_bytes: 0 }),
            volume_capabilities: vec![cap_fs(false, "xfs")],
            parameters: [("repl".to_string(), "2".to_string())].into(),
            ..Default::default()
        }))
        .unwrap();
    stage_fs(&n1, "xfsvol", &stx, false, "xfs").unwrap();
    publish(&n1, "xfsvol", &stx, &tgx, false, false).unwrap();
    std::fs::write(tgx.join("hello.txt"), b"on xfs").unwrap();
    let xstats = |n: &Csi| {
        n.rt.block_on(NodeClient::new(n.ch.clone()).node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "xfsvol".into(),
            volume_path: tgx.to_string_lossy().into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
    };
    let total_before = xstats(&n1).usage[0].total;
    grow("xfsvol", 640 * MIB, false);
    for _ in 0..2 {
        assert_eq!(node_expand(&n1, "xfsvol", &tgx, &stx, 640 * MIB, false).unwrap().into_inner().capacity_bytes, 640 * MIB);
    }
    let total_after = xstats(&n1).usage[0].total;
    eprintln!("xfs size before expand {total_before}, after {total_after}");
    assert!(total_after > total_before + 250 * MIB, "the filesystem grew online: {total_before} -> {total_after}");
    assert_eq!(std::fs::read(tgx.join("hello.txt")).unwrap(), b"on xfs");
    std::fs::write(tgx.join("big.bin"), vec![0x6bu8; 400 << 20]).expect("room for more than the old size");
    assert_eq!(node_expand(&n1, "", &tgx, &stx, 0, false).unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(node_expand(&n1, "nope", &tgx, &stx, 0, false).unwrap_err().code(), Code::NotFound);
    assert_eq!(node_expand(&n1, "xfsvol", &tgx, &stx, 1024 * MIB, false).unwrap_err().code(), Code::FailedPrecondition, "bigger than the volume");
    unpublish(&n1, "xfsvol", &tgx);
    unstage(&n1, "xfsvol", &stx);

    // A read-only publish elsewhere on the node refuses writes.
    let ro = dir.path().join("pods/ro/mount");
    publish(&n1, "fsvol", &st, &ro, false, true).unwrap();
    assert!(std::fs::write(ro.join("x"), b"no").is_err(), "read-only publish is honoured");
    unpublish(&n1, "fsvol", &ro);
    unpublish(&n1, "fsvol", &tg);
    unpublish(&n1, "fsvol", &tg);
    assert!(!tg.exists());
    unstage(&n1, "fsvol", &st);
    unstage(&n1, "fsvol", &st);
    let v = c.sdk(0).inspect("fsvol").unwrap();
    assert!(v.attached_node.is_empty(), "unstage detached it: {v:?}");

    // Node 2: the files are there.
    let st2 = dir.path().join("staging-2");
    let tg2 = dir.path().join("pods/b/mount");
    stage(&n2, "fsvol", &st2, false).unwrap();
    publish(&n2, "fsvol", &st2, &tg2, false, false).unwrap();
    assert_eq!(std::fs::read(tg2.join("hello.txt")).unwrap(), b"written on node-1");
    assert_eq!(std::fs::read(tg2.join("dir/big.bin")).unwrap(), vec![0x5au8; 3 << 20]);
    assert_eq!(c.sdk(1).inspect("fsvol").unwrap().attached_node, "node-2");

    // Snapshot while mounted (a file made durable before it, one written after), then a new
    // volume from the snapshot, staged on node-1: it holds exactly the first.
    let durable = |path: &Path, data: &[u8]| {
        let mut f = std::fs::File::create(path).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
        std::fs::File::open(path.parent().unwrap()).unwrap().sync_all().unwrap();
    };
    durable(&tg2.join("before.txt"), b"before the snapshot");
    let snap = ctl
        .rt
        .block_on(cc.clone().create_snapshot(csi::CreateSnapshotRequest {
            name: "snap-fs".into(),
            source_volume_id: "fsvol".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    durable(&tg2.join("after.txt"), b"after the snapshot");
    let mut from_snap = csi::CreateVolumeRequest {
        name: "fs-restored".into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 512 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![cap(false)],
        parameters: [("repl".to_string(), "2".to_string())].into(),
        ..Default::default()
    };
    from_snap.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource { snapshot_id: "snap-fs".into() })),
    });
    ctl.rt.block_on(cc.clone().create_volume(from_snap)).unwrap();
    unpublish(&n2, "fsvol", &tg2);
    unstage(&n2, "fsvol", &st2);
    let st3 = dir.path().join("staging-3");
    let tg3 = dir.path().join("pods/d/mount");
    stage(&n1, "fs-restored", &st3, false).unwrap();
    publish(&n1, "fs-restored", &st3, &tg3, false, false).unwrap();
    assert_eq!(std::fs::read(tg3.join("before.txt")).unwrap(), b"before the snapshot");
    assert_eq!(std::fs::read(tg3.join("dir/big.bin")).unwrap(), vec![0x5au8; 3 << 20]);
    assert!(!tg3.join("after.txt").exists(), "written after the snapshot");
    std::fs::write(tg3.join("clone-only.txt"), b"x").unwrap();
    unpublish(&n1, "fs-restored", &tg3);
    unstage(&n1, "fs-restored", &st3);
    ctl.rt.block_on(cc.clone().delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: "snap-fs".into(), ..Default::default() })).unwrap();

    // Raw block: the published device file reads back what was written.
    create("blk", true);
    let stb = dir.path().join("staging-b");
    let tb = dir.path().join("pods/c/dev");
    stage(&n1, "blk", &stb, true).unwrap();
    publish(&n1, "blk", &stb, &tb, true, false).unwrap();
    {
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&tb).unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
        f.seek(SeekFrom::Start(10 * MIB as u64)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        let mut back = vec![0u8; data.len()];
        f.seek(SeekFrom::Start(10 * MIB as u64)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(back, data);
    }
    // A raw block device grows too.
    grow("blk", 384 * MIB, true);
    node_expand(&n1, "blk", &tb, &stb, 384 * MIB, true).unwrap();
    let mut f = std::fs::File::open(&tb).unwrap();
    assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), 384 * MIB as u64);
    drop(f);
    unpublish(&n1, "blk", &tb);
    unstage(&n1, "blk", &stb);

    // Delete everything: space returns on both nodes.
    for v in ["fsvol", "blk", "fs-restored", "xfsvol"] {
        ctl.rt.block_on(cc.delete_volume(csi::DeleteVolumeRequest { volume_id: v.into(), ..Default::default() })).unwrap();
    }
    for i in 0..2 {
        assert_eq!(c.sdk(i).pool().used_bytes, 0, "space returned on node-{}", i + 1);
    }
}

fn topo(pairs: &[(&str, &str)]) -> csi::Topology {
    csi::Topology { segments: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
}

/// What a Kubernetes user does first: a PVC provisioned through the controller on node-1
/// (WaitForFirstConsumer picked node-2), its pod on node-2, then moved to node-1 — with the
/// kubelet's calls, on the operator's defaults (no zones, no racks).
#[test]
fn a_pvc_created_through_one_node_is_used_on_another_and_follows_its_pod() {
    let c = Cluster::start(2, "2GiB");
    let dir = strata_e2e::tempdir();
    let ctl = start_csi(dir.path(), "controller", &c.engines[0], &[]);
    let n1 = node_plugin(&c, 0, dir.path());
    let n2 = node_plugin(&c, 1, dir.path());
    let mut cc = ControllerClient::new(ctl.ch.clone());

    // NodeGetInfo always carries topology: the node and the cluster (no zone labels here).
    let info = n2.rt.block_on(NodeClient::new(n2.ch.clone()).node_get_info(csi::NodeGetInfoRequest {})).unwrap().into_inner();
    let seg = info.accessible_topology.expect("topology without zone or rack labels").segments;
    assert_eq!(seg.get("topology.strata.dev/node").map(String::as_str), Some("node-2"));
    let cluster = seg.get("topology.strata.dev/cluster").cloned().expect("cluster key");
    assert!(!cluster.is_empty());

    // The provisioner's request: the selected node preferred, every node requisite, its own
    // default fsType (ext4) while the StorageClass says `fs: xfs`.
    let all = vec![
        topo(&[("topology.strata.dev/node", "node-1"), ("topology.strata.dev/cluster", &cluster)]),
        topo(&[("topology.strata.dev/node", "node-2"), ("topology.strata.dev/cluster", &cluster)]),
    ];
    let req = csi::CreateVolumeRequest {
        name: "pvc-a".into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 320 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![cap_fs(false, "ext4")],
        parameters: [("repl".to_string(), "1".to_string()), ("fs".to_string(), "xfs".to_string())].into(),
        accessibility_requirements: Some(csi::TopologyRequirement { requisite: all.clone(), preferred: vec![all[1].clone(), all[0].clone()] }),
        ..Default::default()
    };
    let vol = ctl.rt.block_on(cc.create_volume(req)).unwrap().into_inner().volume.unwrap();
    assert_eq!(vol.accessible_topology, vec![topo(&[("topology.strata.dev/cluster", &cluster)])], "usable from the whole cluster");
    let v = c.sdk(0).inspect("pvc-a").unwrap();
    assert_eq!(v.replica_nodes, vec!["node-2"], "the replica goes to the preferred node");
    assert_eq!(v.attached_node, "", "creating does not attach");

    // Pod on node-2: stage with the CO's ext4, and the StorageClass's xfs is what gets made.
    let ctx = vol.volume_context.clone();
    let stage_ctx = |n: &Csi, vol: &str, staging: &Path| {
        n.rt.block_on(NodeClient::new(n.ch.clone()).node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(cap_fs(false, "ext4")),
            volume_context: ctx.clone(),
            ..Default::default()
        }))
        .map(|_| ())
    };
    let (st2, tg2) = (dir.path().join("st-2"), dir.path().join("pods/p2/mount"));
    stage_ctx(&n2, "pvc-a", &st2).unwrap();
    let dev = strata_csi::attach::mount_source(&st2).unwrap();
    assert_eq!(strata_csi::attach::fs_type(&dev).unwrap().as_deref(), Some("xfs"), "the StorageClass's fs decides");
    publish(&n2, "pvc-a", &st2, &tg2, false, false).unwrap();
    std::fs::write(tg2.join("data.txt"), b"written on node-2").unwrap();
    let stats = n2
        .rt
        .block_on(NodeClient::new(n2.ch.clone()).node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "pvc-a".into(),
            volume_path: tg2.to_string_lossy().into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage.len(), 2);
    // Any engine reports the clients of the node that serves the volume.
    assert!(c.sdk(0).inspect("pvc-a").unwrap().connections >= 1, "node-1's view counts node-2's NBD client");
    assert!(c.sdk(0).list().iter().any(|v| v.name == "pvc-a" && v.connections >= 1));
    // In use on node-2: node-1 cannot take it without the pod leaving.
    let (st1, tg1) = (dir.path().join("st-1"), dir.path().join("pods/p1/mount"));
    let e = stage_ctx(&n1, "pvc-a", &st1).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("in use on node node-2"), "{}", e.message());
    unpublish(&n2, "pvc-a", &tg2);
    unstage(&n2, "pvc-a", &st2);

    // The pod moves to node-1: its data is there.
    stage_ctx(&n1, "pvc-a", &st1).unwrap();
    publish(&n1, "pvc-a", &st1, &tg1, false, false).unwrap();
    assert_eq!(std::fs::read(tg1.join("data.txt")).unwrap(), b"written on node-2");
    std::fs::write(tg1.join("more.txt"), b"and on node-1").unwrap();
    unpublish(&n1, "pvc-a", &tg1);
    unstage(&n1, "pvc-a", &st1);

    // Attached on node-1 with no client (say a `host attach` left behind): node-2 still gets
    // it, by a clean handover (no --force).
    c.sdk(0).attach("pvc-a", false).unwrap();
    stage_ctx(&n2, "pvc-a", &st2).unwrap();
    publish(&n2, "pvc-a", &st2, &tg2, false, false).unwrap();
    assert_eq!(std::fs::read(tg2.join("more.txt")).unwrap(), b"and on node-1");
    let v = c.sdk(0).inspect("pvc-a").unwrap();
    assert_eq!(v.attached_node, "node-2");
    unpublish(&n2, "pvc-a", &tg2);
    unstage(&n2, "pvc-a", &st2);

    // Raw block on node-2, grown, then NodeExpandVolume without a capability: the device file
    // says it is a block volume (no resize2fs on it).
    ctl.rt
        .block_on(cc.create_volume(csi::CreateVolumeRequest {
            name: "pvc-blk".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 64 * MIB, limit_bytes: 0 }),
            volume_capabilities: vec![cap(true)],
            parameters: [("repl".to_string(), "2".to_string())].into(),
            ..Default::default()
        }))
        .unwrap();
    let (stb, tb) = (dir.path().join("st-b"), dir.path().join("pods/pb/dev"));
    stage(&n2, "pvc-blk", &stb, true).unwrap();
    publish(&n2, "pvc-blk", &stb, &tb, true, false).unwrap();
    ctl.rt
        .block_on(cc.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "pvc-blk".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
            volume_capability: Some(cap(true)),
            ..Default::default()
        }))
        .unwrap();
    let grown = n2
        .rt
        .block_on(NodeClient::new(n2.ch.clone()).node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "pvc-blk".into(),
            volume_path: tb.to_string_lossy().into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 96 * MIB, limit_bytes: 0 }),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 96 * MIB);
    let mut f = std::fs::File::open(&tb).unwrap();
    assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), 96 * MIB as u64);
    drop(f);
    unpublish(&n2, "pvc-blk", &tb);
    unstage(&n2, "pvc-blk", &stb);

    // The controller (on node-1's engine) deletes a volume last attached on node-2 with no
    // client there (forwarded to node-2), and one that is detached.
    c.sdk(1).attach("pvc-blk", false).unwrap();
    for v in ["pvc-a", "pvc-blk"] {
        ctl.rt.block_on(cc.delete_volume(csi::DeleteVolumeRequest { volume_id: v.into(), ..Default::default() })).unwrap();
    }
    for i in 0..2 {
        assert_eq!(c.sdk(i).pool().used_bytes, 0, "space returned on node-{}", i + 1);
    }
    // The FUSE helpers of unstaged volumes were reaped: no zombie children of the plugins.
    for n in [&n1, &n2] {
        let zombies = zombie_children(n.pid());
        assert!(zombies.is_empty(), "zombie helpers of the node plugin: {zombies:?}");
    }
}

/// Children of `pid` in state Z.
fn zombie_children(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split(' ').collect();
        if f.first() == Some(&"Z") && f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(stat);
        }
    }
    out
}

#[test]
fn a_staged_volume_keeps_working_across_an_engine_restart() {
    let mut c = Cluster::start(1, "1GiB");
    let dir = strata_e2e::tempdir();
    let ctl = start_csi(dir.path(), "controller", &c.engines[0], &[]);
    let n1 = node_plugin(&c, 0, dir.path());
    let mut cc = ControllerClient::new(ctl.ch.clone());
    ctl.rt
        .block_on(cc.create_volume(csi::CreateVolumeRequest {
            name: "vol".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: 128 * MIB, limit_bytes: 0 }),
            volume_capabilities: vec![cap(false)],
            ..Default::default()
        }))
        .unwrap();
    let (st, tg) = (dir.path().join("staging"), dir.path().join("pods/a/mount"));
    stage(&n1, "vol", &st, false).unwrap();
    publish(&n1, "vol", &st, &tg, false, false).unwrap();
    let mut f = std::fs::File::create(tg.join("before.txt")).unwrap();
    f.write_all(b"before the restart").unwrap();
    f.sync_all().unwrap();
    drop(f);
    c.kill9(0);
    // A write and fsync while the engine is down wait for it (the FUSE view reconnects) instead
    // of failing.
    let writer = {
        let tg = tg.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut f = std::fs::File::create(tg.join("after.txt"))?;
            f.write_all(&vec![0x42; 2 << 20])?;
            f.sync_all()
        })
    };
    std::thread::sleep(std::time::Duration::from_secs(2));
    c.restart(0);
    writer.join().unwrap().expect("the write issued during the outage went through after the engine restarted");
    assert_eq!(std::fs::read(tg.join("before.txt")).unwrap(), b"before the restart");
    // The restarted engine listens on new ports: a node plugin that knows them (same state).
    drop(n1);
    let n1 = node_plugin(&c, 0, dir.path());
    unpublish(&n1, "vol", &tg);
    unstage(&n1, "vol", &st);
    // What was written after the restart is on the volume: stage it again and look.
    stage(&n1, "vol", &st, false).unwrap();
    publish(&n1, "vol", &st, &tg, false, false).unwrap();
    assert_eq!(std::fs::read(tg.join("after.txt")).unwrap(), vec![0x42; 2 << 20]);
    unpublish(&n1, "vol", &tg);
    unstage(&n1, "vol", &st);
}

#[test]
fn kernel_nbd_attach_needs_the_nbd_module() {
    let dir = strata_e2e::tempdir();
    let sock = dir.path().join("csi.sock");
    let mut child = std::process::Command::new(csi_bin())
        .args(["--mode", "node", "--node-id", "n", "--attach", "kernel-nbd", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    if Path::new("/sys/module/nbd").exists() {
        while !sock.exists() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(20), "the node plugin did not start with the nbd module loaded");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    } else {
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("nbd module is not loaded") && err.contains("--attach fuse"), "{err}");
        assert!(!sock.exists());
    }
}
