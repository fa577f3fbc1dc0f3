//! Synchronous replication across real engines on one etcd: placement, the write path, failure
//! of replicas, resync, deletion on every node.

use std::process::Command;
use std::time::Duration;
use strata_api::v1 as pb;
use strata_e2e::checker::{verify, History, Writer};
use strata_e2e::cluster::Cluster;
use strata_e2e::nbd::Client;
use strata_e2e::run;
use tonic::Code;

const MIB: u64 = 1 << 20;

#[test]
fn repl3_volume_is_written_to_every_replica_and_deleted_everywhere() {
    let c = Cluster::start(3, "256MiB");
    let v = c.sdk(0).create_full("r3", 64 * MIB, 3, &[]).unwrap();
    let mut nodes = v.replica_nodes.clone();
    nodes.sort();
    assert_eq!(nodes, vec!["node-1", "node-2", "node-3"]);
    assert_eq!(v.replica_nodes[0], "node-1", "the creating node holds the first replica");
    assert_eq!(v.attached_node, "", "a new volume is not attached anywhere");
    assert_eq!(v.in_sync_nodes.len(), 3);
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 8M", "-c", "write -P 0x33 40M 1M"]).arg(c.engines[0].uri("r3")));
    assert_eq!(c.sdk(1).inspect("r3").unwrap().attached_node, "node-1", "an NBD client opening a detached volume attaches it on its node");
    for i in 0..3 {
        assert!(c.sdk(i).pool().used_bytes >= 9 * MIB, "node-{} holds the data", i + 1);
    }
    assert_eq!(c.replica_differences(0, "r3"), Vec::<String>::new());
    // Every node's usage reaches the others' view of the cluster within a few seconds.
    let t0 = std::time::Instant::now();
    while !c.sdk(0).nodes().iter().all(|n| n.used_bytes >= 9 * MIB) {
        assert!(t0.elapsed() < Duration::from_secs(10), "usage not reported: {:?}", c.sdk(0).nodes());
        std::thread::sleep(Duration::from_millis(200));
    }
    let out =
        run(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0x5a 0 8M", "-c", "read -P 0x33 40M 1M"]).arg(c.engines[0].uri("r3")));
    assert!(!out.contains("fail"), "{out}");
    // Only the target serves the export.
    assert!(Client::connect(&c.engines[1].nbd, "r3").is_err());

    // Placement errors are clear and create nothing.
    let e = c
        .sdk(0)
        .create_spec("pinned", pb::VolumeSpec { size_bytes: MIB, repl: 3, nodes: vec!["node-1".into(), "node-2".into()], ..Default::default() })
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("repl 3") && e.message().contains("node-3 not in the requested nodes"), "{}", e.message());
    assert_eq!(c.sdk(0).inspect("pinned").unwrap_err().code(), Code::NotFound);
    let v = c
        .sdk(1)
        .create_spec("on23", pb::VolumeSpec { size_bytes: MIB, repl: 2, nodes: vec!["node-2".into(), "node-3".into()], ..Default::default() })
        .unwrap();
    assert_eq!(v.replica_nodes, vec!["node-2", "node-3"]);

    // Deleting frees the space on every replica node.
    c.sdk(0).delete("r3", false).unwrap();
    for i in 0..3 {
        assert_eq!(c.sdk(i).pool().used_bytes, 0, "node-{} freed its replica", i + 1);
    }
    assert_eq!(c.sdk(2).inspect("r3").unwrap_err().code(), Code::NotFound);
}

/// `volume list` through a node that serves nothing shows the live figures of the node that
/// serves each volume; that node is asked only for the volumes it serves, so a listing does
/// not make every target list every volume of the cluster.
#[test]
fn a_list_through_another_node_shows_the_serving_nodes_live_figures() {
    let c = Cluster::start(2, "256MiB");
    c.sdk(0).create_full("served", 16 * MIB, 2, &[]).unwrap();
    c.sdk(0).create_full("detached", 16 * MIB, 2, &[]).unwrap();
    let mut client = Client::connect(&c.engines[0].nbd, "served").unwrap();
    assert_eq!(client.write(0, &[7u8; 4096], 0), 0);
    let listed = c.sdk(1).list();
    let v = listed.iter().find(|v| v.name == "served").expect("listed");
    assert_eq!(v.attached_node, "node-1", "{v:?}");
    assert_eq!(v.connections, 1, "{v:?}");
    assert!(v.io_stats.is_some_and(|s| s.write_ops >= 1), "{v:?}");
    assert_eq!(v.replica_status.len(), 1, "the target's view of node-2's copy: {v:?}");
    assert!(listed.iter().any(|v| v.name == "detached"));
    let names: Vec<String> = c.sdk(0).list_forwarded().into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["served".to_string()]);
    assert_eq!(c.sdk(1).list_forwarded(), Vec::<pb::Volume>::new());
}

#[test]
fn a_dead_replica_leaves_the_in_sync_set_and_resyncs_only_what_it_missed() {
    let mut c = Cluster::start(3, "256MiB");
    c.sdk(0).create_full("v", 32 * MIB, 3, &[]).unwrap();
    let mut h = History::default();
    let mut w = Writer::new(Client::connect(&c.engines[0].nbd, "v").unwrap(), 32 * MIB, 64 * 1024, 7);
    w.run(&mut h, 200, Duration::from_secs(30)).unwrap();
    c.kill9(2);
    // Writes go on: the first waits for the replica timeout, then node-3 leaves the in-sync set.
    let before = h.acked_bytes;
    w.run(&mut h, 100, Duration::from_secs(30)).unwrap();
    let written_during_outage = h.acked_bytes - before;
    let v = c.sdk(0).inspect("v").unwrap();
    assert_eq!(v.in_sync_nodes.len(), 2, "{v:?}");
    assert!(!v.in_sync_nodes.contains(&"node-3".to_string()));
    let dirty: u64 = v.replica_status.iter().filter(|r| r.node == "node-3").map(|r| r.dirty_bytes).sum();
    assert!(dirty > 0 && dirty <= written_during_outage, "missed regions recorded: {dirty} of {written_during_outage} written");
    c.restart(2);
    let v = c.wait_in_sync(0, "v", Duration::from_secs(30));
    let copied: u64 = v.replica_status.iter().filter(|r| r.node == "node-3").map(|r| r.copied_bytes).sum();
    eprintln!("resync after outage: wrote {written_during_outage} bytes during the outage, resync copied {copied} bytes");
    assert!(copied > 0 && copied as f64 <= 1.2 * written_during_outage as f64, "copied {copied} for {written_during_outage} written");
    w.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    assert_eq!(verify(&mut w.client, &h, 32 * MIB), Vec::<String>::new());
    assert_eq!(c.replica_differences(0, "v"), Vec::<String>::new());
}

/// Scattered 4 KiB writes while a replica is down: resync copies about what was written (the
/// record keeps 4 KiB blocks), not a 64 KiB region per write.
#[test]
fn scattered_small_writes_resync_at_about_their_size() {
    let mut c = Cluster::start(2, "256MiB");
    c.sdk(0).create_full("s", 64 * MIB, 2, &[]).unwrap();
    let mut h = History::default();
    let mut w = Writer::new(Client::connect(&c.engines[0].nbd, "s").unwrap(), 64 * MIB, 4096, 11);
    w.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    c.kill9(1);
    let before = h.acked_bytes;
    w.run(&mut h, 600, Duration::from_secs(60)).unwrap();
    let written = h.acked_bytes - before;
    let v = c.sdk(0).inspect("s").unwrap();
    let dirty: u64 = v.replica_status.iter().filter(|r| r.node == "node-2").map(|r| r.dirty_bytes).sum();
    assert!(dirty > 0 && dirty <= written, "missed blocks recorded: {dirty} of {written} written");
    c.restart(1);
    let v = c.wait_in_sync(0, "s", Duration::from_secs(30));
    let copied: u64 = v.replica_status.iter().filter(|r| r.node == "node-2").map(|r| r.copied_bytes).sum();
    eprintln!("scattered 4 KiB writes: wrote {written} bytes during the outage, resync copied {copied} bytes");
    assert!(copied > 0 && copied as f64 <= 1.2 * written as f64, "copied {copied} for {written} written");
    assert_eq!(verify(&mut w.client, &h, 64 * MIB), Vec::<String>::new());
    assert_eq!(c.replica_differences(0, "s"), Vec::<String>::new());
}

#[test]
fn an_interrupted_resync_resumes_instead_of_starting_over() {
    // Slow resync (4 MiB/s while a client reads), so it can be interrupted midway: first the
    // replica dies, then the target restarts; each time the copy continues from what is left.
    let mut c = Cluster::start_with(2, "256MiB", &["--resync-rate", "4MiB"]);
    c.sdk(0).create_full("slow", 32 * MIB, 2, &[]).unwrap();
    let mut h = History::default();
    let mut w = Writer::new(Client::connect(&c.engines[0].nbd, "slow").unwrap(), 32 * MIB, MIB, 9);
    c.kill9(1);
    w.run(&mut h, 24, Duration::from_secs(60)).unwrap();
    let missed = |c: &Cluster| -> (u64, u64) {
        let v = c.sdk(0).inspect("slow").unwrap();
        let r = v.replica_status.iter().find(|r| r.node == "node-2").expect("node-2 status").clone();
        (r.dirty_bytes, r.copied_bytes)
    };
    let (dirty0, _) = missed(&c);
    assert!(dirty0 >= 8 * MIB, "{dirty0} bytes missed");
    // --resync-rate paces a resync only while clients do I/O (an idle volume resyncs at full
    // speed): a reader keeps this one busy until the target restarts. Bounded: 60 s at most.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (addr, stop) = (c.engines[0].nbd.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut r = Client::connect(&addr, "slow").unwrap();
            let t0 = std::time::Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                assert!(r.read(0, 4096).is_ok());
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    c.engines[1].spawn().unwrap();
    let t0 = std::time::Instant::now();
    while missed(&c).1 < dirty0 / 4 {
        assert!(t0.elapsed() < Duration::from_secs(30), "resync did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Interruption 1: the replica dies midway.
    c.kill9(1);
    std::thread::sleep(Duration::from_millis(300));
    let (left1, copied1) = missed(&c);
    assert!(left1 < dirty0, "progress was kept: {left1} of {dirty0} left");
    c.engines[1].spawn().unwrap();
    let t0 = std::time::Instant::now();
    while missed(&c).1 < copied1 + left1 / 3 {
        assert!(t0.elapsed() < Duration::from_secs(30), "resync did not resume");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Interruption 2: the target restarts midway (progress is on disk).
    let (_, copied2) = missed(&c);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    c.restart(0);
    let v = c.wait_in_sync(0, "slow", Duration::from_secs(60));
    let copied3: u64 = v.replica_status.iter().filter(|r| r.node == "node-2").map(|r| r.copied_bytes).sum();
    let total = copied2 + copied3;
    eprintln!("interrupted resync: {dirty0} bytes missed; copied {copied1} before the replica died, {copied2} before the target restarted, {copied3} after: {total} in all");
    assert!(total as f64 <= 1.25 * dirty0 as f64, "the resync started over: copied {total} for {dirty0} missed");
    let mut r = Client::connect(&c.engines[0].nbd, "slow").unwrap();
    assert_eq!(verify(&mut r, &h, 32 * MIB), Vec::<String>::new());
    assert_eq!(c.replica_differences(0, "slow"), Vec::<String>::new());
}

#[test]
fn ha_update_adds_and_removes_replicas_online() {
    let c = Cluster::start(3, "256MiB");
    let v = c.sdk(0).create_spec("ha", pb::VolumeSpec { size_bytes: 32 * MIB, repl: 1, ..Default::default() }).unwrap();
    assert_eq!(v.replica_nodes, vec!["node-1"]);
    let mut h = History::default();
    let mut w = Writer::new(Client::connect(&c.engines[0].nbd, "ha").unwrap(), 32 * MIB, 64 * 1024, 3);
    w.run(&mut h, 100, Duration::from_secs(30)).unwrap();
    // Up to 3 while the writer keeps going: the new replicas are rebuilt from allocated extents.
    let v = c.sdk(0).ha_update("ha", 2, Some("node-3")).unwrap();
    assert_eq!(v.replica_nodes, vec!["node-1", "node-3"]);
    w.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    c.sdk(0).ha_update("ha", 3, None).unwrap();
    w.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    let v = c.wait_in_sync(0, "ha", Duration::from_secs(60));
    assert_eq!(v.replica_nodes.len(), 3);
    assert_eq!(c.replica_differences(0, "ha"), Vec::<String>::new());
    let used = v.used_bytes;
    assert!(c.sdk(1).pool().used_bytes >= used, "node-2 holds a full copy");
    // Bad requests.
    assert_eq!(c.sdk(0).ha_update("ha", 4, None).unwrap_err().code(), Code::InvalidArgument);
    let e = c.sdk(0).ha_update("ha", 1, None).unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().contains("remove one at a time"), "3 -> 1 in one call: {e:?}");
    assert_eq!(c.sdk(0).inspect("ha").unwrap().replica_nodes.len(), 3, "nothing was removed");
    assert_eq!(c.sdk(0).ha_update("ha", 2, Some("node-9")).unwrap_err().code(), Code::InvalidArgument);
    // Sent to another node, the change is forwarded to the target (which answers for it).
    let e = c.sdk(1).ha_update("ha", 2, Some("node-9")).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("node-9 holds no replica"), "{}", e.message());
    // Down to 2, dropping node-2: its space comes back at once.
    let v = c.sdk(0).ha_update("ha", 2, Some("node-2")).unwrap();
    assert_eq!(v.replica_nodes, vec!["node-1", "node-3"]);
    assert_eq!(c.sdk(1).pool().used_bytes, 0);
    w.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    assert_eq!(verify(&mut w.client, &h, 32 * MIB), Vec::<String>::new());
    assert_eq!(c.replica_differences(0, "ha"), Vec::<String>::new());
}

#[test]
fn a_replica_offline_past_the_replica_timeout_is_rebuilt_elsewhere() {
    let mut c = Cluster::start_with(4, "256MiB", &["--replica-timeout", "2"]);
    let spec = pb::VolumeSpec { size_bytes: 16 * MIB, repl: 2, nodes: vec!["node-1".into(), "node-2".into()], ..Default::default() };
    c.sdk(0).create_spec("rr", spec).unwrap();
    let mut h = History::default();
    let mut w = Writer::new(Client::connect(&c.engines[0].nbd, "rr").unwrap(), 16 * MIB, 64 * 1024, 8);
    w.run(&mut h, 100, Duration::from_secs(30)).unwrap();
    c.kill9(1);
    w.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    // node-2 reads offline after its TTL, then after --replica-timeout its replica moves.
    let v = c.wait_volume(0, "rr", Duration::from_secs(40), "replica rebuilt elsewhere", |v| {
        !v.replica_nodes.contains(&"node-2".to_string()) && v.in_sync_nodes.len() == 2
    });
    assert_eq!(v.replica_nodes.len(), 2, "{v:?}");
    w.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    assert_eq!(verify(&mut w.client, &h, 16 * MIB), Vec::<String>::new());
    assert_eq!(c.replica_differences(0, "rr"), Vec::<String>::new());
    // node-2 comes back and frees the replica it no longer holds.
    c.engines[1].spawn().unwrap();
    assert_eq!(c.sdk(1).pool().used_bytes, 0);
}

#[test]
fn an_encrypted_replicated_volume_keeps_ciphertext_on_every_node_through_resync() {
    let mut c = Cluster::start(2, "128MiB");
    c.sdk(0).create_secure("enc", 16 * MIB, 2, b"a long enough passphrase").unwrap();
    let marker = b"REPLICATED-SECRET-MARKER-0123456789";
    let data: Vec<u8> = marker.iter().cycle().take(1 << 20).copied().collect();
    let mut cl = Client::connect(&c.engines[0].nbd, "enc").unwrap();
    assert_eq!(cl.write(0, &data, strata_e2e::nbd::FLAG_FUA), 0);
    // node-2 misses a write, then resyncs it (as ciphertext: it never has the key).
    c.kill9(1);
    assert_eq!(cl.write(4 * MIB, &data, strata_e2e::nbd::FLAG_FUA), 0);
    c.engines[1].spawn().unwrap();
    c.wait_in_sync(0, "enc", Duration::from_secs(30));
    assert_eq!(c.replica_differences(0, "enc"), Vec::<String>::new());
    assert_eq!(cl.read(4 * MIB, data.len() as u32).unwrap(), data);
    assert_eq!(cl.flush(), 0);
    for e in &c.engines {
        let dev = std::fs::read(&e.devices[0]).unwrap();
        assert_eq!(dev.windows(marker.len()).filter(|w| *w == marker).count(), 0, "plaintext on {}", e.devices[0].display());
    }
}

#[test]
fn a_replica_added_by_a_target_without_an_in_sync_copy_is_rebuilt_from_the_replicas_that_have_the_data() {
    let c = Cluster::start(3, "256MiB");
    let spec = pb::VolumeSpec { size_bytes: 16 * MIB, repl: 1, nodes: vec!["node-2".into()], ..Default::default() };
    c.sdk(0).create_spec("far", spec).unwrap();
    // Opened on node-1, which holds no replica: node-1 becomes the target, node-2 has the data.
    let mut nbd = Client::connect(&c.engines[0].nbd, "far").unwrap();
    let data = strata_e2e::pseudo_random(3, 4 * MIB as usize);
    assert_eq!(nbd.write(2 * MIB, &data, 0), 0);
    // A new replica on the target's own node, then one on a third node.
    c.sdk(0).ha_update("far", 2, Some("node-1")).unwrap();
    c.wait_in_sync(0, "far", Duration::from_secs(60));
    c.sdk(0).ha_update("far", 3, Some("node-3")).unwrap();
    let v = c.wait_in_sync(0, "far", Duration::from_secs(60));
    assert_eq!(v.in_sync_nodes.len(), 3);
    assert_eq!(c.replica_differences(0, "far"), Vec::<String>::new(), "every new replica holds node-2's data");
    for i in [0, 2] {
        assert!(c.sdk(i).pool().used_bytes >= 4 * MIB, "node-{} holds a copy", i + 1);
    }
    // With node-2's copy gone, the data reads back from the new replicas.
    c.sdk(0).ha_update("far", 2, Some("node-2")).unwrap();
    assert!(nbd.read(2 * MIB, 4 * MIB as u32).unwrap() == data, "the data reads back from the rebuilt replicas");
}
