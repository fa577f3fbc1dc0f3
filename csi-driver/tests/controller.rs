//! The CSI controller and identity services against real engines (etcd + 2 nodes), through a
//! real unix socket: idempotency, error codes per the spec, pagination, expansion, parameters.

mod common;

use common::*;
use std::collections::HashMap;
use strata_api::csi;
use strata_api::csi::controller_client::ControllerClient;
use strata_api::csi::identity_client::IdentityClient;
use strata_api::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
use strata_e2e::cluster::Cluster;
use strata_e2e::qemu_io;
use tonic::Code;

const GIB: i64 = 1 << 30;
const MIB: i64 = 1 << 20;

fn mount_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn create_req(name: &str, size: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
        ..Default::default()
    }
}

#[test]
fn controller_lifecycle_idempotency_and_errors() {
    let c = Cluster::start(2, "3GiB");
    let dir = strata_e2e::tempdir();
    let d = start_csi(dir.path(), "controller", &c.engines[0], &[]);
    let rt = &d.rt;
    let mut id = IdentityClient::new(d.ch.clone());
    let mut ctl = ControllerClient::new(d.ch.clone());

    let info = rt.block_on(id.get_plugin_info(csi::GetPluginInfoRequest {})).unwrap().into_inner();
    assert_eq!(info.name, "csi.strata.dev");
    assert_eq!(rt.block_on(id.probe(csi::ProbeRequest {})).unwrap().into_inner().ready, Some(true));
    let caps = rt.block_on(id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})).unwrap().into_inner().capabilities;
    assert_eq!(caps.len(), 3, "controller service, accessibility constraints, online expansion");

    // Create (repl 2), twice: the same volume.
    let a = rt
        .block_on(ctl.create_volume(create_req("pvc-a", GIB, &[("repl", "2"), ("io_profile", "db"), ("csi.storage.k8s.io/pvc/name", "data")])))
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!((a.volume_id.as_str(), a.capacity_bytes), ("pvc-a", GIB));
    assert_eq!(a.volume_context["repl"], "2");
    let again = rt.block_on(ctl.create_volume(create_req("pvc-a", GIB, &[("repl", "2")]))).unwrap().into_inner().volume.unwrap();
    assert_eq!(again.volume_id, a.volume_id);
    let v = c.sdk(1).inspect("pvc-a").unwrap();
    assert_eq!(v.replica_nodes.len(), 2, "two replicas on two nodes");
    assert_eq!(v.spec.unwrap().labels["k8s_pvc_name"], "data");

    // Bad input: each with the spec's code and a message.
    let code = |r: Result<tonic::Response<csi::CreateVolumeResponse>, tonic::Status>| r.unwrap_err();
    let e = code(rt.block_on(ctl.create_volume(create_req("pvc-a", 2 * GIB, &[("repl", "2")]))));
    assert_eq!(e.code(), Code::AlreadyExists, "incompatible re-create: {}", e.message());
    let e = code(rt.block_on(ctl.create_volume(create_req("", GIB, &[]))));
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut no_caps = create_req("pvc-x", GIB, &[]);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(rt.block_on(ctl.create_volume(no_caps))).code(), Code::InvalidArgument);
    let mut rwx = create_req("pvc-x", GIB, &[]);
    rwx.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
    let e = code(rt.block_on(ctl.create_volume(rwx)));
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("MULTI_NODE_MULTI_WRITER"), "{}", e.message());
    for (k, v) in [("repl", "5"), ("fs", "zfs"), ("snap_schedule", "often"), ("bogus", "1")] {
        let e = code(rt.block_on(ctl.create_volume(create_req("pvc-x", GIB, &[(k, v)]))));
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(k), "{k}: {}", e.message());
    }
    let e = code(rt.block_on(ctl.create_volume(create_req("pvc-x", GIB, &[("repl", "3")]))));
    assert_eq!(e.code(), Code::ResourceExhausted, "not enough nodes: {}", e.message());
    let mut bad_range = create_req("pvc-x", 2 * GIB, &[]);
    bad_range.capacity_range.as_mut().unwrap().limit_bytes = GIB;
    assert_eq!(code(rt.block_on(ctl.create_volume(bad_range))).code(), Code::InvalidArgument);
    assert_eq!(c.sdk(0).inspect("pvc-x").unwrap_err().code(), Code::NotFound, "nothing was created by bad requests");

    // Validate, get, list with pagination.
    let caps = vec![mount_cap(Mode::SingleNodeWriter)];
    let ok = rt
        .block_on(ctl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-a".into(),
            volume_capabilities: caps.clone(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let e = rt
        .block_on(ctl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "nope".into(),
            volume_capabilities: caps,
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let g = rt.block_on(ctl.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: "pvc-a".into() })).unwrap().into_inner();
    assert!(!g.status.unwrap().volume_condition.unwrap().abnormal);
    for n in ["pvc-b", "pvc-c"] {
        rt.block_on(ctl.create_volume(create_req(n, 64 * MIB, &[]))).unwrap();
    }
    let p1 = rt.block_on(ctl.list_volumes(csi::ListVolumesRequest { max_entries: 2, starting_token: String::new() })).unwrap().into_inner();
    assert_eq!(p1.entries.len(), 2);
    assert_eq!(p1.next_token, "pvc-c");
    let p2 = rt.block_on(ctl.list_volumes(csi::ListVolumesRequest { max_entries: 2, starting_token: p1.next_token })).unwrap().into_inner();
    assert_eq!(p2.entries.len(), 1);
    assert!(p2.next_token.is_empty());
    let e = rt.block_on(ctl.list_volumes(csi::ListVolumesRequest { max_entries: 2, starting_token: "pvc-zzz".into() })).unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let cap = rt.block_on(ctl.get_capacity(csi::GetCapacityRequest::default())).unwrap().into_inner();
    assert!(cap.available_capacity > 0);

    // Expand (online), twice: the same answer.
    for _ in 0..2 {
        let x = rt
            .block_on(ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: "pvc-a".into(),
                capacity_range: Some(csi::CapacityRange { required_bytes: 2 * GIB, limit_bytes: 0 }),
                ..Default::default()
            }))
            .unwrap()
            .into_inner();
        assert_eq!(x.capacity_bytes, 2 * GIB);
        assert!(x.node_expansion_required);
    }
    let e = rt
        .block_on(ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "nope".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: GIB, limit_bytes: 0 }),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Unsupported RPCs say so.
    assert_eq!(
        rt.block_on(ctl.controller_publish_volume(csi::ControllerPublishVolumeRequest { volume_id: "pvc-a".into(), ..Default::default() }))
            .unwrap_err()
            .code(),
        Code::Unimplemented
    );

    // Delete, twice; and a volume that never existed.
    for n in ["pvc-a", "pvc-a", "pvc-b", "pvc-c", "never"] {
        rt.block_on(ctl.delete_volume(csi::DeleteVolumeRequest { volume_id: n.into(), ..Default::default() })).unwrap();
    }
    assert_eq!(rt.block_on(ctl.delete_volume(csi::DeleteVolumeRequest::default())).unwrap_err().code(), Code::InvalidArgument);
    for i in 0..2 {
        assert_eq!(c.sdk(i).pool().used_bytes, 0, "space returned on node-{}", i + 1);
    }
}

#[test]
fn concurrent_creates_of_one_name_make_one_volume() {
    let c = Cluster::start(1, "256MiB");
    let dir = strata_e2e::tempdir();
    let d = start_csi(dir.path(), "controller", &c.engines[0], &[]);
    let results: Vec<Result<String, Code>> = d.rt.block_on(async {
        let calls = (0..8).map(|_| {
            let mut ctl = ControllerClient::new(d.ch.clone());
            async move {
                ctl.create_volume(create_req("same", 64 * MIB, &[])).await.map(|r| r.into_inner().volume.unwrap().volume_id).map_err(|s| s.code())
            }
        });
        futures::future::join_all(calls).await
    });
    assert!(results.iter().any(|r| r.as_deref() == Ok("same")));
    for r in &results {
        assert!(matches!(r, Ok(id) if id == "same") || *r == Err(Code::Aborted), "{r:?}");
    }
    assert_eq!(c.sdk(0).list().len(), 1);
}

fn snap_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest { name: name.into(), source_volume_id: source.into(), ..Default::default() }
}

fn from_source(name: &str, size: i64, source: csi::volume_content_source::Type) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, size, &[("repl", "2")]);
    r.volume_content_source = Some(csi::VolumeContentSource { r#type: Some(source) });
    r
}

fn snapshot_source(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource { snapshot_id: id.into() })
}

#[test]
fn snapshots_and_volumes_from_snapshots_or_volumes() {
    use csi::controller_service_capability::{rpc::Type as R, Type as T};
    let c = Cluster::start(2, "1GiB");
    let dir = strata_e2e::tempdir();
    let d = start_csi(dir.path(), "controller", &c.engines[1], &[]);
    let rt = &d.rt;
    let mut ctl = ControllerClient::new(d.ch.clone());
    let caps: Vec<i32> = rt
        .block_on(ctl.controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}))
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| match c.r#type {
            Some(T::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    for want in [R::CreateDeleteSnapshot, R::ListSnapshots, R::CloneVolume] {
        assert!(caps.contains(&(want as i32)), "{want:?} offered");
    }

    // A repl-2 volume attached on node-1 (it was created there), with data.
    c.sdk(0).create_full("pvc-s", 64 * MIB as u64, 2, &[]).unwrap();
    qemu_io(&c.engines[0].uri("pvc-s"), &["write -P 0x5c 0 4M"]);

    // CreateSnapshot through node-2's engine (it forwards to the target), twice: one snapshot.
    let s1 = rt.block_on(ctl.create_snapshot(snap_req("snap-1", "pvc-s"))).unwrap().into_inner().snapshot.unwrap();
    assert_eq!((s1.snapshot_id.as_str(), s1.source_volume_id.as_str(), s1.size_bytes, s1.ready_to_use), ("snap-1", "pvc-s", 64 * MIB, true));
    assert!(s1.creation_time.as_ref().is_some_and(|t| t.seconds > 1_700_000_000));
    let again = rt.block_on(ctl.create_snapshot(snap_req("snap-1", "pvc-s"))).unwrap().into_inner().snapshot.unwrap();
    assert_eq!(again, s1);
    // The source changes after the snapshot.
    qemu_io(&c.engines[0].uri("pvc-s"), &["write -P 0x77 0 1M"]);

    // Bad input.
    c.sdk(0).create("pvc-t", 8 * MIB as u64).unwrap();
    for (req, code, why) in [
        (snap_req("", "pvc-s"), Code::InvalidArgument, "name"),
        (snap_req("snap-x", ""), Code::InvalidArgument, "source_volume_id"),
        (snap_req("snap-x", "nope"), Code::NotFound, "nope"),
        (snap_req("snap-1", "pvc-t"), Code::AlreadyExists, "snapshot of volume pvc-s"),
        (snap_req("pvc-t", "pvc-s"), Code::AlreadyExists, "a volume"),
        (snap_req("snap-x", "snap-1"), Code::NotFound, "snap-1"),
    ] {
        let e = rt.block_on(ctl.create_snapshot(req)).unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(why), "{}", e.message());
    }

    // ListSnapshots: all, by id, by source, paged.
    rt.block_on(ctl.create_snapshot(snap_req("snap-2", "pvc-s"))).unwrap();
    let list = |r: csi::ListSnapshotsRequest| rt.block_on(ControllerClient::new(d.ch.clone()).list_snapshots(r)).unwrap().into_inner();
    let names = |l: &csi::ListSnapshotsResponse| l.entries.iter().map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone()).collect::<Vec<_>>();
    assert_eq!(names(&list(Default::default())), vec!["snap-1", "snap-2"]);
    assert_eq!(names(&list(csi::ListSnapshotsRequest { snapshot_id: "snap-2".into(), ..Default::default() })), vec!["snap-2"]);
    assert_eq!(names(&list(csi::ListSnapshotsRequest { snapshot_id: "nope".into(), ..Default::default() })), Vec::<String>::new());
    assert_eq!(names(&list(csi::ListSnapshotsRequest { source_volume_id: "pvc-t".into(), ..Default::default() })), Vec::<String>::new());
    let p1 = list(csi::ListSnapshotsRequest { max_entries: 1, ..Default::default() });
    assert_eq!((names(&p1), p1.next_token.as_str()), (vec!["snap-1".to_string()], "snap-2"));
    let p2 = list(csi::ListSnapshotsRequest { max_entries: 1, starting_token: p1.next_token.clone(), ..Default::default() });
    assert_eq!((names(&p2), p2.next_token.as_str()), (vec!["snap-2".to_string()], ""));
    // Snapshots are not volumes.
    let vols = rt.block_on(ctl.list_volumes(csi::ListVolumesRequest::default())).unwrap().into_inner().entries;
    assert!(vols.iter().all(|e| !e.volume.as_ref().unwrap().volume_id.starts_with("snap-")));

    // A bigger volume from the snapshot, twice: one volume with the snapshot's data.
    for _ in 0..2 {
        let v =
            rt.block_on(ctl.create_volume(from_source("pvc-from-snap", 128 * MIB, snapshot_source("snap-1")))).unwrap().into_inner().volume.unwrap();
        assert_eq!(v.capacity_bytes, 128 * MIB);
        assert_eq!(v.content_source.unwrap().r#type, Some(snapshot_source("snap-1")));
    }
    c.sdk(1).attach("pvc-from-snap", false).unwrap();
    qemu_io(&c.engines[1].uri("pvc-from-snap"), &["read -P 0x5c 0 4M"]);
    qemu_io(&c.engines[1].uri("pvc-from-snap"), &["read -P 0 64M 64M"]);
    // A volume from a volume: its data now.
    let vsrc = csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource { volume_id: "pvc-s".into() });
    rt.block_on(ctl.create_volume(from_source("pvc-clone", 64 * MIB, vsrc.clone()))).unwrap();
    c.sdk(0).attach("pvc-clone", false).unwrap();
    qemu_io(&c.engines[0].uri("pvc-clone"), &["read -P 0x77 0 1M"]);
    qemu_io(&c.engines[0].uri("pvc-clone"), &["read -P 0x5c 1M 3M"]);
    // Smaller than the source, or a source that is missing or of the other kind.
    for (req, code) in [
        (from_source("pvc-small", 32 * MIB, snapshot_source("snap-1")), Code::OutOfRange),
        (from_source("pvc-x", 64 * MIB, snapshot_source("nope")), Code::NotFound),
        (from_source("pvc-x", 64 * MIB, snapshot_source("pvc-s")), Code::NotFound),
        (
            from_source(
                "pvc-x",
                64 * MIB,
                csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource { volume_id: "snap-1".into() }),
            ),
            Code::NotFound,
        ),
        (from_source("snap-2", 64 * MIB, vsrc), Code::AlreadyExists),
    ] {
        let e = rt.block_on(ctl.create_volume(req)).unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
    }
    assert!(c.sdk(0).inspect("pvc-small").is_err() && c.sdk(0).inspect("pvc-x").is_err(), "failed creates leave nothing");

    // DeleteVolume of a snapshot's id and DeleteSnapshot of a volume's id delete nothing.
    rt.block_on(ctl.delete_volume(csi::DeleteVolumeRequest { volume_id: "snap-1".into(), ..Default::default() })).unwrap();
    rt.block_on(ctl.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: "pvc-s".into(), ..Default::default() })).unwrap();
    assert!(c.sdk(0).inspect("snap-1").is_ok() && c.sdk(0).inspect("pvc-s").is_ok());
    assert_eq!(rt.block_on(ctl.delete_snapshot(csi::DeleteSnapshotRequest::default())).unwrap_err().code(), Code::InvalidArgument);
    // DeleteSnapshot twice, and one that never existed.
    for n in ["snap-1", "snap-1", "snap-2", "never"] {
        rt.block_on(ctl.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: n.into(), ..Default::default() })).unwrap();
    }
    assert_eq!(names(&list(Default::default())), Vec::<String>::new());
    // The volume made from the deleted snapshot keeps its data.
    qemu_io(&c.engines[1].uri("pvc-from-snap"), &["read -P 0x5c 0 4M"]);
    for (n, via) in [("pvc-from-snap", 1), ("pvc-clone", 0), ("pvc-s", 0), ("pvc-t", 0)] {
        c.sdk(via).delete(n, false).unwrap();
    }
    for i in 0..2 {
        assert_eq!(c.sdk(i).pool().used_bytes, 0, "space returned on node-{}", i + 1);
    }
}

#[test]
fn tokens_from_csi_secrets_and_the_pvc_namespace_as_owner() {
    use strata_api::auth::{sign, Claims, Role, SYSTEM_ISSUER};
    let dir = strata_e2e::tempdir();
    let key = dir.path().join("system.key");
    let secret = b"csi-test-system-key-0123456789abcdef";
    std::fs::write(&key, secret).unwrap();
    let mint =
        |sub: &str, role: Role| sign(&Claims::new(sub, SYSTEM_ISSUER, "strata", &[role], &[], std::time::Duration::from_secs(600)), secret).unwrap();
    let mut c = Cluster::start_with(1, "256MiB", &["--auth-system-key-file", key.to_str().unwrap()]);
    c.token = Some(mint("root", Role::Admin));
    let admin_file = dir.path().join("driver.token");
    std::fs::write(&admin_file, mint("csi-driver", Role::Admin)).unwrap();
    let d = start_csi(dir.path(), "controller", &c.engines[0], &["--token-file", admin_file.to_str().unwrap()]);
    let rt = &d.rt;
    let mut ctl = ControllerClient::new(d.ch.clone());
    let owner = |name: &str| c.sdk(0).inspect(name).unwrap().spec.unwrap().ownership.unwrap_or_default().owner;

    // The driver's admin token: the PVC's namespace owns the volume.
    rt.block_on(ctl.create_volume(create_req("pvc-1", 8 * MIB, &[("csi.storage.k8s.io/pvc/namespace", "team-a")]))).unwrap();
    assert_eq!(owner("pvc-1"), "team-a");
    // A namespace's own token in the provisioner secret: its subject owns the volume, whatever
    // namespace the request names.
    let team_b = mint("team-b", Role::User);
    let secrets: HashMap<String, String> = [("auth-token".to_string(), team_b.clone())].into();
    let mut req = create_req("pvc-2", 8 * MIB, &[("csi.storage.k8s.io/pvc/namespace", "team-a")]);
    req.secrets = secrets.clone();
    rt.block_on(ctl.create_volume(req)).unwrap();
    assert_eq!(owner("pvc-2"), "team-b");
    // team-b's token cannot delete team-a's volume, snapshot it or grow it; team-a's can.
    let del = |id: &str, s: &HashMap<String, String>| csi::DeleteVolumeRequest { volume_id: id.into(), secrets: s.clone() };
    assert_eq!(rt.block_on(ctl.delete_volume(del("pvc-1", &secrets))).unwrap_err().code(), Code::PermissionDenied);
    let mut snap = snap_req("snap-1", "pvc-1");
    snap.secrets = secrets.clone();
    assert_eq!(rt.block_on(ctl.create_snapshot(snap)).unwrap_err().code(), Code::PermissionDenied);
    let grow = csi::ControllerExpandVolumeRequest {
        volume_id: "pvc-1".into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 16 * MIB, limit_bytes: 0 }),
        secrets: secrets.clone(),
        ..Default::default()
    };
    assert_eq!(rt.block_on(ctl.controller_expand_volume(grow)).unwrap_err().code(), Code::PermissionDenied);
    let team_a: HashMap<String, String> = [("auth-token".to_string(), mint("team-a", Role::User))].into();
    rt.block_on(ctl.delete_volume(del("pvc-1", &team_a))).unwrap();
    rt.block_on(ctl.delete_volume(del("pvc-2", &secrets))).unwrap();
    assert!(c.sdk(0).list().is_empty());

    // A driver without a token is refused by the engine (UNAUTHENTICATED, saying why).
    let bare = start_csi(dir.path(), "controller", &c.engines[0], &[]);
    let mut ctl = ControllerClient::new(bare.ch.clone());
    let s = bare.rt.block_on(ctl.create_volume(create_req("pvc-3", 8 * MIB, &[]))).unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{}", s.message());
    assert!(s.message().contains("no token"), "{}", s.message());
}

#[test]
fn an_engine_requiring_client_certificates_answers_only_a_driver_with_one() {
    let dir = strata_e2e::tempdir();
    let c = Cluster::start_with(1, "256MiB", &["--sdk-require-client-cert"]);
    let out = dir.path().join("csi");
    let ca = c.ca.path().to_str().unwrap().to_string();
    strata_e2e::certs(&["issue", "--ca-dir", &ca, "--node-id", "strata-csi-controller", "--out", out.to_str().unwrap()]);
    let (cert, key) = (out.join("node.crt"), out.join("node.key"));

    let bare = start_csi(dir.path(), "controller", &c.engines[0], &[]);
    let mut ctl = ControllerClient::new(bare.ch.clone());
    let s = bare.rt.block_on(ctl.create_volume(create_req("pvc-1", 8 * MIB, &[]))).unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert!(c.sdk(0).list().is_empty(), "nothing was made");

    let d = start_csi(dir.path(), "controller", &c.engines[0], &["--sdk-cert-file", cert.to_str().unwrap(), "--sdk-key-file", key.to_str().unwrap()]);
    let mut ctl = ControllerClient::new(d.ch.clone());
    d.rt.block_on(ctl.create_volume(create_req("pvc-1", 8 * MIB, &[]))).unwrap();
    assert_eq!(c.sdk(0).inspect("pvc-1").unwrap().spec.unwrap().size_bytes as i64, 8 * MIB);

    // A key without its certificate is refused at parse time.
    let out = std::process::Command::new(csi_bin()).args(["--mode", "controller", "--sdk-key-file", key.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--sdk-cert-file"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_cloud_snapshot_class_backs_up_volumes_and_pvcs_from_its_snapshots_are_restores() {
    use strata_e2e::s3::{ACCESS_KEY, BUCKET, S3, SECRET_KEY};
    let Some(s3) = S3::start() else { return };
    let dir = strata_e2e::tempdir();
    let key = dir.path().join("credentials.key");
    std::fs::write(&key, strata_e2e::pseudo_random(9, 32)).unwrap();
    let c = Cluster::start_with(2, "1GiB", &["--credentials-key-file", key.to_str().unwrap()]);
    c.sdk(0).create_credential("s3", &s3.url, BUCKET, (ACCESS_KEY, SECRET_KEY), "").unwrap();
    c.sdk(0).create_full("pvc-c", 16 * MIB as u64, 1, &[]).unwrap();
    qemu_io(&c.engines[0].uri("pvc-c"), &["write -P 0x7e 0 4M"]);
    let d = start_csi(dir.path(), "controller", &c.engines[0], &[]);
    let rt = &d.rt;
    let mut ctl = ControllerClient::new(d.ch.clone());
    // The class's type is "cloud" and the cluster's only credential is used.
    let mut req = snap_req("vs-1", "pvc-c");
    req.parameters = [("portworx/snapshot-type".to_string(), "cloud".to_string())].into();
    let t0 = std::time::Instant::now();
    let snap = loop {
        let s = rt.block_on(ctl.create_snapshot(req.clone())).unwrap().into_inner().snapshot.unwrap();
        if s.ready_to_use {
            break s;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "the backup is not done: {s:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(snap.snapshot_id.starts_with("cloud:s3:"), "{snap:?}");
    assert_eq!((snap.source_volume_id.as_str(), snap.size_bytes), ("pvc-c", 16 * MIB));
    let again = rt.block_on(ctl.create_snapshot(req.clone())).unwrap().into_inner().snapshot.unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id, "the same VolumeSnapshot is the same backup");
    assert_eq!(c.sdk(0).cloud_backups("s3").unwrap().len(), 1);
    let mut bad = req.clone();
    bad.parameters.insert("portworx/snapshot-type".into(), "tape".into());
    assert_eq!(rt.block_on(ctl.create_snapshot(bad)).unwrap_err().code(), Code::InvalidArgument);

    // A PVC from it (larger than the volume) is a restore.
    let r = rt.block_on(ctl.create_volume(from_source("pvc-r", 32 * MIB, snapshot_source(&snap.snapshot_id)))).unwrap().into_inner().volume.unwrap();
    assert_eq!(r.capacity_bytes, 32 * MIB);
    qemu_io(&c.engines[0].uri("pvc-r"), &["read -P 0x7e 0 4M", "read -P 0 4M 28M"]);
    let v = c.sdk(0).inspect("pvc-r").unwrap();
    assert_eq!(v.in_sync_nodes.len(), 2, "restored with the class's repl 2: {v:?}");
    assert!(!v.spec.unwrap().labels.contains_key("strata.dev/restoring"), "the restore finished");
    assert_eq!(c.replica_differences(0, "pvc-r"), Vec::<String>::new());
    // Asking again returns the same volume.
    rt.block_on(ctl.create_volume(from_source("pvc-r", 32 * MIB, snapshot_source(&snap.snapshot_id)))).unwrap();
    let e = rt.block_on(ctl.create_volume(from_source("pvc-x", 32 * MIB, snapshot_source("cloud:s3:nope")))).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // DeleteSnapshot deletes the backup; twice is fine.
    let del = csi::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() };
    rt.block_on(ctl.delete_snapshot(del.clone())).unwrap();
    rt.block_on(ctl.delete_snapshot(del)).unwrap();
    assert!(c.sdk(0).cloud_backups("s3").unwrap().is_empty());
}
