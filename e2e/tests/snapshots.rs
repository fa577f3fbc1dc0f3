//! Snapshots, clones and restore on real engines: crash-consistent snapshots under a running
//! write load, bit-exact clones and restores, copy-on-write isolation, space accounting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_e2e::checker::{verify, verify_cut, History, Writer};
use strata_e2e::cluster::Cluster;
use strata_e2e::engine::EngineProc;
use strata_e2e::nbd::Client;
use strata_e2e::qemu_io;
use tonic::Code;

const MIB: u64 = 1 << 20;

#[test]
fn a_snapshot_under_write_load_holds_exactly_the_writes_before_its_point_on_every_replica() {
    let c = Cluster::start(2, "256MiB");
    let span = 16 * MIB;
    c.sdk(0).create_full("v", span, 2, &[]).unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let writer = {
        let (acked, stop, nbd) = (acked.clone(), stop.clone(), c.engines[0].nbd.clone());
        std::thread::spawn(move || {
            let mut h = History::default();
            let mut w = Writer::new(Client::connect(&nbd, "v").unwrap(), span, 64 * 1024, 11);
            let t0 = Instant::now();
            // One write at a time, publishing how many were acknowledged; bounded in count and time.
            while stop.load(Ordering::Acquire) == 0 && h.begun() < 20_000 && t0.elapsed() < Duration::from_secs(60) {
                w.run(&mut h, 1, Duration::from_secs(30)).unwrap();
                acked.store(h.acked_writes, Ordering::Release);
            }
            (h, w)
        })
    };
    let wait_for = |n: u64| {
        let t0 = Instant::now();
        while acked.load(Ordering::Acquire) < n {
            assert!(t0.elapsed() < Duration::from_secs(30), "writer stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(150);
    // Through node-2, which forwards to the target (node-1): the barrier is there.
    let before = acked.load(Ordering::Acquire);
    let s = c.sdk(1).snapshot("v", "s1").unwrap();
    let after = acked.load(Ordering::Acquire);
    assert_eq!(s.snapshot_of, "v");
    let mut holders = s.in_sync_nodes.clone();
    holders.sort();
    assert_eq!(holders, vec!["node-1", "node-2"], "the snapshot is on every in-sync replica");
    wait_for(after + 100);
    stop.store(1, Ordering::Release);
    let (h, mut w) = writer.join().unwrap();
    assert!(h.acked_writes > after, "writes went on after the snapshot");

    // Same content on both replicas of the snapshot.
    assert_eq!(c.replica_differences(0, "s1"), Vec::<String>::new());
    // Its content, read through a clone, is exactly the history up to one write between the
    // last acknowledged before the call and the first begun after it returned.
    let cl = c.sdk(0).clone_volume("s1", "c1").unwrap();
    assert_eq!(cl.attached_node, "", "clones start detached");
    c.sdk(0).attach("c1", false).unwrap();
    let mut cc = Client::connect(&c.engines[0].nbd, "c1").unwrap();
    let cut = verify_cut(&mut cc, &h, span).unwrap_or_else(|p| panic!("snapshot is not a point in the history: {:?}", &p[..p.len().min(5)]));
    eprintln!("snapshot cut at write {cut}: {before} acknowledged before the call, {after} when it returned, {} in all", h.acked_writes);
    assert!(cut >= before && cut <= after + 1, "cut {cut} outside [{before}, {}]", after + 1);
    // The source holds every acknowledged write, including those after the snapshot.
    assert_eq!(verify(&mut w.client, &h, span), Vec::<String>::new());

    // A write to the clone changes neither the source nor the snapshot.
    assert_eq!(cc.write(0, &vec![0xC1; 64 * 1024], 0), 0);
    cc.disconnect();
    assert_eq!(verify(&mut w.client, &h, span), Vec::<String>::new());
    c.sdk(0).clone_volume("s1", "c2").unwrap();
    c.sdk(0).attach("c2", false).unwrap();
    let mut c2 = Client::connect(&c.engines[0].nbd, "c2").unwrap();
    assert_eq!(verify_cut(&mut c2, &h, span), Ok(cut));
    c2.disconnect();

    // Restore: the detached volume gets the snapshot back on both replicas.
    assert_eq!(c.sdk(0).restore("v", "s1").unwrap_err().code(), Code::FailedPrecondition, "attached volumes are not restored");
    w.client.disconnect();
    c.wait_volume(0, "v", Duration::from_secs(10), "the client gone", |v| v.connections == 0);
    c.sdk(0).detach("v", false).unwrap();
    let r = c.sdk(1).restore("v", "s1").unwrap();
    assert_eq!(r.state, "available");
    assert_eq!(c.replica_differences(0, "v"), Vec::<String>::new());
    c.sdk(1).attach("v", false).unwrap();
    let mut vc = Client::connect(&c.engines[1].nbd, "v").unwrap();
    assert_eq!(verify_cut(&mut vc, &h, span), Ok(cut));
    vc.disconnect();

    // Deleting everything returns every extent on both nodes.
    for name in ["c1", "c2", "s1", "v"] {
        let via = if name == "v" { 1 } else { 0 };
        c.sdk(via).delete(name, false).unwrap();
    }
    for i in 0..2 {
        assert_eq!(c.sdk(i).pool().used_bytes, 0, "node-{} freed everything", i + 1);
    }
}

#[test]
fn clones_and_restores_are_bit_exact_and_share_space_until_written() {
    let c = Cluster::start(1, "256MiB");
    let sdk = c.sdk(0);
    let uri = |v: &str| c.engines[0].uri(v);
    sdk.create("v", 32 * MIB).unwrap();
    qemu_io(&uri("v"), &["write -P 0xa1 0 8M"]);
    let used = sdk.pool().used_bytes;
    assert_eq!(used, 8 * MIB);

    let s = sdk.snapshot("v", "s").unwrap();
    assert_eq!((s.snapshot_of.as_str(), s.state.as_str()), ("v", "available"));
    assert_eq!(sdk.pool().used_bytes, used, "a snapshot takes no space");
    // The source changes; only the extents written are copied.
    qemu_io(&uri("v"), &["write -P 0xb2 0 4M"]);
    assert_eq!(sdk.pool().used_bytes, 12 * MIB);

    sdk.clone_volume("s", "c").unwrap();
    sdk.attach("c", false).unwrap();
    assert_eq!(sdk.pool().used_bytes, 12 * MIB, "a clone takes no space");
    qemu_io(&uri("c"), &["read -P 0xa1 0 8M", "read -P 0 8M 24M"]);
    // Writes to the clone: the snapshot and the source keep their data.
    qemu_io(&uri("c"), &["write -P 0xc3 1M 1M"]);
    qemu_io(&uri("v"), &["read -P 0xb2 0 4M", "read -P 0xa1 4M 4M"]);
    sdk.clone_volume("v", "cv").unwrap();
    sdk.attach("cv", false).unwrap();
    qemu_io(&uri("cv"), &["read -P 0xb2 0 4M", "read -P 0xa1 4M 4M"]);
    qemu_io(&uri("c"), &["read -P 0xa1 0 1M", "read -P 0xc3 1M 1M", "read -P 0xa1 2M 6M"]);

    // Restore in place (one local replica, no clients): bit-exact snapshot content.
    sdk.restore("v", "s").unwrap();
    qemu_io(&uri("v"), &["read -P 0xa1 0 8M", "read -P 0 8M 24M"]);
    // The clone of the volume before the restore is untouched by it.
    qemu_io(&uri("cv"), &["read -P 0xb2 0 4M"]);

    // Errors name what is wrong and change nothing.
    assert_eq!(sdk.snapshot("nope", "x").unwrap_err().code(), Code::NotFound);
    assert_eq!(sdk.snapshot("v", "c").unwrap_err().code(), Code::AlreadyExists);
    let e = sdk.snapshot("s", "ss").unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("is a snapshot"), "{}", e.message());
    let e = sdk.restore("c", "s").unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("snapshot of volume v"), "{}", e.message());
    let e = sdk.attach("s", false).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("clone it"), "{}", e.message());
    assert!(Client::connect(&c.engines[0].nbd, "s").is_err(), "snapshots are not exported");
    let cl = Client::connect(&c.engines[0].nbd, "v").unwrap();
    assert_eq!(sdk.restore("v", "s").unwrap_err().code(), Code::FailedPrecondition, "a volume in use is not restored");
    cl.disconnect();
    c.wait_volume(0, "v", Duration::from_secs(10), "the client gone", |v| v.connections == 0);
    assert_eq!(sdk.snapshots("v").unwrap().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), vec!["s"]);
    assert_eq!(sdk.snapshots("").unwrap().len(), 1);
    assert_eq!(sdk.snapshots("nope").unwrap_err().code(), Code::NotFound);

    // Deletes in any order: space follows the references.
    sdk.delete("s", false).unwrap();
    qemu_io(&uri("v"), &["read -P 0xa1 0 8M"]);
    sdk.delete("c", false).unwrap();
    sdk.delete("v", false).unwrap();
    assert_eq!(sdk.pool().used_bytes, 8 * MIB, "cv's 8 MiB remain");
    qemu_io(&uri("cv"), &["read -P 0xb2 0 4M", "read -P 0xa1 4M 4M"]);
    sdk.delete("cv", false).unwrap();
    assert_eq!(sdk.pool().used_bytes, 0);
}

#[test]
fn snapshots_and_their_sharing_survive_an_engine_restart() {
    // One engine on the embedded store over two devices, so `strata-engine check` can compare
    // the pools' extents with the volumes afterwards.
    let dir = tempfile::tempdir().unwrap();
    let mut e = EngineProc::start(dir.path(), 2, "128MiB");
    e.sdk().create("v", 16 * MIB).unwrap();
    qemu_io(&e.uri("v"), &["write -P 0x11 0 4M"]);
    e.sdk().snapshot("v", "s").unwrap();
    qemu_io(&e.uri("v"), &["write -P 0x22 0 2M"]);
    e.kill9();
    e.restart();
    assert_eq!(e.sdk().pool().used_bytes, 6 * MIB);
    e.sdk().clone_volume("s", "c").unwrap();
    e.sdk().attach("c", false).unwrap();
    qemu_io(&e.uri("c"), &["read -P 0x11 0 4M"]);
    qemu_io(&e.uri("v"), &["read -P 0x22 0 2M", "read -P 0x11 2M 2M"]);
    e.stop();
    let (ok, report) = e.check();
    assert!(ok, "{report}");
}

#[test]
fn a_snapshot_schedule_takes_snapshots_and_keeps_only_the_newest() {
    let c = Cluster::start(1, "256MiB");
    let sdk = c.sdk(0);
    // Malformed schedules are refused with the reason, at create and at update.
    let e = sdk.create_full("bad", 8 * MIB, 1, &[("snap_schedule", "hourly=5,3")]).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("snap_schedule") && e.message().contains("unknown schedule"), "{}", e.message());
    sdk.create_full("v", 8 * MIB, 1, &[("snap_schedule", "periodic=1,2")]).unwrap();
    let mut labels = std::collections::HashMap::new();
    labels.insert("snap_schedule".to_string(), "daily=25:00,1".to_string());
    let e = sdk.update(strata_api::v1::UpdateVolumeRequest { name: "v".into(), labels, ..Default::default() }).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("not a time of day"), "{}", e.message());
    qemu_io(&c.engines[0].uri("v"), &["write -P 0x31 0 1M"]);

    // Every minute (on the minute, UTC) one snapshot; with KEEP 2 the oldest goes at the third.
    let t0 = Instant::now();
    let mut first: Option<String> = None;
    loop {
        let snaps = sdk.snapshots("v").unwrap();
        assert!(snaps.len() <= 2, "KEEP 2 is kept to: {:?}", snaps.iter().map(|s| &s.name).collect::<Vec<_>>());
        for s in &snaps {
            assert!(s.name.starts_with("v.periodic.") && s.spec.as_ref().unwrap().labels["strata.dev/schedule"] == "periodic=1", "{s:?}");
        }
        if first.is_none() {
            first = snaps.first().map(|s| s.name.clone());
        }
        if let Some(f) = &first {
            if snaps.len() == 2 && !snaps.iter().any(|s| &s.name == f) {
                break; // a third was taken and the first deleted
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(240), "schedule did not run: {:?}", snaps.iter().map(|s| &s.name).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_secs(2));
    }
    // The scheduled snapshots hold the volume's data.
    let s = sdk.snapshots("v").unwrap().remove(0);
    sdk.clone_volume(&s.name, "from-schedule").unwrap();
    sdk.attach("from-schedule", false).unwrap();
    qemu_io(&c.engines[0].uri("from-schedule"), &["read -P 0x31 0 1M"]);
}

#[test]
fn a_snapshot_deleted_through_a_node_without_a_copy_is_gone_everywhere() {
    // The CSI controller talks to any node's SDK; a snapshot is never forwarded to a target, so
    // its delete runs where the request arrived, here on the node that holds no copy.
    let c = Cluster::start(2, "256MiB");
    c.sdk(0).create_full("v", 16 * MIB, 1, &[]).unwrap();
    let holder = c.sdk(0).inspect("v").unwrap().replica_nodes;
    assert_eq!(holder.len(), 1);
    let (has, other) = if holder[0] == "node-1" { (0, 1) } else { (1, 0) };
    c.sdk(has).attach("v", false).unwrap();
    qemu_io(&c.engines[has].uri("v"), &["write -P 0x3c 0 4M"]);
    let s = c.sdk(has).snapshot("v", "s").unwrap();
    assert_eq!(s.replica_nodes, holder);
    c.sdk(other).delete("s", false).unwrap();
    for i in [has, other] {
        let e = c.sdk(i).inspect("s").unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "node-{} still sees the snapshot: {}", i + 1, e.message());
    }
    assert!(c.sdk(other).snapshots("").unwrap().is_empty());
    // Deleting it again is a plain NotFound, and the holder's pool keeps only the volume's data.
    assert_eq!(c.sdk(other).delete("s", false).unwrap_err().code(), Code::NotFound);
    qemu_io(&c.engines[has].uri("v"), &["read -P 0x3c 0 4M"]);
    assert_eq!(c.sdk(has).pool().used_bytes, 4 * MIB);
}
