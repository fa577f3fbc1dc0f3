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
    let d = start_csi(dir.path(), "controller", &c.engines[0].sdk, &[]);
    let rt = &d.rt;
    let mut id = IdentityClient::new(d.ch.clone());
    let mut ctl = ControllerClient::new(d.ch.clone());

    let info = rt.block_on(id.get_plugin_info(csi::GetPluginInfoRequest {})).unwrap().into_inner();
    assert_eq!(info.name, "csi.strata.dev");
    assert_eq!(rt.block_on(id.probe(csi::ProbeRequest {})).unwrap().into_inner().ready, Some(true));
    let caps = rt.block_on(id.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})).unwrap().into_inner().capabilities;
    assert_eq!(caps.len(), 3, "controller service, accessibility constraints, online expansion");

    // Create (repl 2), twice: the same volume.
    let a = rt.block_on(ctl.create_volume(create_req("pvc-a", GIB, &[("repl", "2"), ("io_profile", "db"), ("csi.storage.k8s.io/pvc/name", "data")]))).unwrap().into_inner().volume.unwrap();
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
    let ok = rt.block_on(ctl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest { volume_id: "pvc-a".into(), volume_capabilities: caps.clone(), ..Default::default() })).unwrap().into_inner();
    assert!(ok.confirmed.is_some());
    let e = rt.block_on(ctl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest { volume_id: "nope".into(), volume_capabilities: caps, ..Default::default() })).unwrap_err();
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
    let e = rt.block_on(ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest { volume_id: "nope".into(), capacity_range: Some(csi::CapacityRange { required_bytes: GIB, limit_bytes: 0 }), ..Default::default() })).unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Unsupported RPCs say so.
    assert_eq!(rt.block_on(ctl.create_snapshot(csi::CreateSnapshotRequest { source_volume_id: "pvc-a".into(), name: "s".into(), ..Default::default() })).unwrap_err().code(), Code::Unimplemented);

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
    let d = start_csi(dir.path(), "controller", &c.engines[0].sdk, &[]);
    let results: Vec<Result<String, Code>> = d.rt.block_on(async {
        let calls = (0..8).map(|_| {
            let mut ctl = ControllerClient::new(d.ch.clone());
            async move { ctl.create_volume(create_req("same", 64 * MIB, &[])).await.map(|r| r.into_inner().volume.unwrap().volume_id).map_err(|s| s.code()) }
        });
        futures::future::join_all(calls).await
    });
    assert!(results.iter().any(|r| r.as_deref() == Ok("same")));
    for r in &results {
        assert!(matches!(r, Ok(id) if id == "same") || *r == Err(Code::Aborted), "{r:?}");
    }
    assert_eq!(c.sdk(0).list().len(), 1);
}
