//! The target's membership rules, attach and the volume lifecycle, in process: engines on
//! in-memory devices sharing an in-memory store (`strata_engine::testing`), with faults
//! injected by the tests. Each runs in milliseconds.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use strata_engine::meta::MetaStore;
use strata_engine::testing::TestCluster;
use strata_engine::volume::{CreateSpec, IoError, Service, UpdateSpec, VolumeError};

const MIB: u64 = 1 << 20;

async fn create(e: &Service, name: &str, repl: u32) -> Result<strata_engine::volume::VolumeInfo, VolumeError> {
    e.create(CreateSpec { name, size: 16 * MIB, repl, ..Default::default() }).await
}

/// Writes `len` bytes of `byte` at `off` through the volume's target on `e`.
async fn write(e: &Service, name: &str, off: u64, len: usize, byte: u8) -> Result<(), IoError> {
    let io = e.io(e.volume(name).expect("a handle"));
    let mut b = io.buffer(len);
    b.fill(byte);
    io.write(off, b, false).await
}

async fn read(e: &Service, name: &str, off: u64, len: usize) -> Result<Vec<u8>, IoError> {
    let io = e.io(e.volume(name).expect("a handle"));
    Ok(io.read(off, len).await?.bytes().to_vec())
}

/// `nodes` engines with volume "v" (16 MiB, `repl` replicas) created and attached on the first.
async fn attached(nodes: usize, repl: u32) -> TestCluster {
    let c = TestCluster::start(nodes).await;
    create(c.engine(0), "v", repl).await.unwrap();
    c.engine(0).attach("v", false, None).await.unwrap();
    c
}

async fn record(c: &TestCluster, name: &str) -> strata_engine::meta::VolumeRecord {
    c.store.get_volume(name).await.unwrap().expect("the record")
}

fn in_sync_sorted(r: &strata_engine::meta::VolumeRecord) -> Vec<String> {
    let mut v = r.in_sync.clone();
    v.sort();
    v
}

// ---- lifecycle ----

#[tokio::test]
async fn a_created_volume_is_detached_clean_at_epoch_one() {
    let c = TestCluster::start(1).await;
    let info = create(c.engine(0), "v", 1).await.unwrap();
    let r = record(&c, "v").await;
    assert_eq!((r.target.as_str(), r.epoch, r.clean), ("", 1, true));
    assert_eq!(r.replicas, vec!["node-1".to_string()]);
    assert_eq!(info.record.size, 16 * MIB);
    assert!(c.engine(0).connect("v").is_none(), "not served until attached");
}

#[tokio::test]
async fn bad_names_repl_and_sizes_are_refused_with_the_reason() {
    let c = TestCluster::start(1).await;
    let e = c.engine(0);
    let bad_name = e.create(CreateSpec { name: "-x", size: MIB, repl: 1, ..Default::default() }).await;
    assert!(matches!(&bad_name, Err(VolumeError::InvalidArgument(m)) if m.contains("invalid")), "{bad_name:?}");
    let repl = e.create(CreateSpec { name: "r", size: MIB, repl: 4, ..Default::default() }).await;
    assert!(matches!(&repl, Err(VolumeError::InvalidArgument(m)) if m.contains("repl 4")), "{repl:?}");
    let zero = e.create(CreateSpec { name: "z", size: 0, repl: 1, ..Default::default() }).await;
    assert!(matches!(zero, Err(VolumeError::InvalidArgument(_))));
    let huge = e.create(CreateSpec { name: "h", size: 1 << 40, repl: 1, ..Default::default() }).await;
    assert!(matches!(&huge, Err(VolumeError::ResourceExhausted(m)) if m.contains("capacity")), "{huge:?}");
    assert!(c.store.list_volumes().await.unwrap().is_empty(), "nothing recorded");
}

#[tokio::test]
async fn a_taken_name_is_refused() {
    let c = TestCluster::start(1).await;
    create(c.engine(0), "v", 1).await.unwrap();
    assert!(matches!(create(c.engine(0), "v", 1).await, Err(VolumeError::AlreadyExists(_))));
}

#[tokio::test]
async fn more_replicas_than_nodes_is_refused() {
    let c = TestCluster::start(2).await;
    let r = create(c.engine(0), "v", 3).await;
    assert!(r.is_err(), "3 replicas on 2 nodes: {r:?}");
    assert!(c.store.get_volume("v").await.unwrap().is_none());
}

#[tokio::test]
async fn replicas_go_to_distinct_nodes() {
    let c = TestCluster::start(3).await;
    let info = create(c.engine(0), "v", 3).await.unwrap();
    let mut nodes = info.record.replicas.clone();
    nodes.sort();
    assert_eq!(nodes, ["node-1", "node-2", "node-3"]);
    assert_eq!(in_sync_sorted(&info.record), nodes);
}

#[tokio::test]
async fn a_volume_grows_but_never_shrinks() {
    let c = TestCluster::start(1).await;
    let e = c.engine(0);
    create(e, "v", 1).await.unwrap();
    let grown = e.update("v", UpdateSpec { size: Some(32 * MIB), ..Default::default() }).await.unwrap();
    assert_eq!(grown.record.size, 32 * MIB);
    let shrink = e.update("v", UpdateSpec { size: Some(8 * MIB), ..Default::default() }).await;
    assert!(matches!(&shrink, Err(VolumeError::FailedPrecondition(m)) if m.contains("only grow")), "{shrink:?}");
    assert_eq!(record(&c, "v").await.size, 32 * MIB);
}

#[tokio::test]
async fn a_grown_attached_volume_takes_writes_past_its_old_end_on_every_replica() {
    let c = attached(2, 2).await;
    let e = c.engine(0);
    assert!(write(e, "v", 20 * MIB, 4096, 1).await.is_err(), "past the end");
    e.update("v", UpdateSpec { size: Some(32 * MIB), ..Default::default() }).await.unwrap();
    write(e, "v", 20 * MIB, 4096, 1).await.unwrap();
    assert_eq!(in_sync_sorted(&record(&c, "v").await), ["node-1", "node-2"], "the replica took it too");
}

#[tokio::test]
async fn deleting_a_volume_frees_its_extents_on_every_replica() {
    let c = attached(2, 2).await;
    let e = c.engine(0);
    write(e, "v", 0, 2 * MIB as usize, 9).await.unwrap();
    let used: Vec<u64> = c.nodes.iter().map(|n| n.engine.pool.used_bytes()).collect();
    assert!(used.iter().all(|u| *u >= 2 * MIB), "{used:?}");
    e.delete("v", false).await.unwrap();
    assert!(c.store.get_volume("v").await.unwrap().is_none());
    for n in &c.nodes {
        assert_eq!(n.engine.pool.used_bytes(), 0, "{} freed its replica", n.engine.node.id);
    }
}

#[tokio::test]
async fn a_volume_with_a_connected_client_is_deleted_only_with_force() {
    let c = attached(1, 1).await;
    let e = c.engine(0);
    let client = e.connect("v").expect("served");
    let r = e.delete("v", false).await;
    assert!(matches!(&r, Err(VolumeError::FailedPrecondition(m)) if m.contains("connected NBD client")), "{r:?}");
    e.delete("v", true).await.unwrap();
    drop(client);
    assert!(c.store.get_volume("v").await.unwrap().is_none());
}

// ---- attach ----

#[tokio::test]
async fn attach_takes_a_new_epoch_and_serves_what_was_written() {
    let c = TestCluster::start(1).await;
    let e = c.engine(0);
    create(e, "v", 1).await.unwrap();
    let info = e.attach("v", false, None).await.unwrap();
    assert_eq!((info.record.target.as_str(), info.record.epoch), ("node-1", 2));
    write(e, "v", 4096, 8192, 0x5a).await.unwrap();
    assert!(read(e, "v", 4096, 8192).await.unwrap().iter().all(|b| *b == 0x5a));
    assert!(read(e, "v", 0, 4096).await.unwrap().iter().all(|b| *b == 0), "never written reads as zeroes");
}

#[tokio::test]
async fn attaching_again_where_it_is_served_changes_nothing() {
    let c = TestCluster::start(1).await;
    let e = c.engine(0);
    create(e, "v", 1).await.unwrap();
    let first = e.attach("v", false, None).await.unwrap();
    let again = e.attach("v", false, None).await.unwrap();
    assert_eq!(first.record.epoch, again.record.epoch);
}

#[tokio::test]
async fn a_volume_served_on_an_online_node_is_not_taken_without_force() {
    let c = TestCluster::start(2).await;
    create(c.engine(0), "v", 2).await.unwrap();
    c.engine(0).attach("v", false, None).await.unwrap();
    let r = c.engine(1).attach("v", false, None).await;
    assert!(matches!(&r, Err(VolumeError::FailedPrecondition(m)) if m.contains("attached on node node-1")), "{r:?}");
    assert_eq!(record(&c, "v").await.target, "node-1");
    write(c.engine(0), "v", 0, 4096, 1).await.expect("node-1 still serves");
}

#[tokio::test]
async fn a_forced_takeover_fences_the_old_target() {
    let c = TestCluster::start(2).await;
    let (a, b) = (c.engine(0), c.engine(1));
    create(a, "v", 2).await.unwrap();
    a.attach("v", false, None).await.unwrap();
    write(a, "v", 0, 4096, 1).await.unwrap();
    let taken = b.attach("v", true, None).await.unwrap();
    assert_eq!((taken.record.target.as_str(), taken.record.epoch), ("node-2", 3));
    assert!(a.connect("v").is_none(), "the old target takes no new client, before any I/O told it");
    let stale = write(a, "v", 0, 4096, 2).await;
    assert!(stale.is_err(), "the old target's write is refused: {stale:?}");
    assert!(a.connect("v").is_none(), "the fenced target serves no new client");
    assert!(read(b, "v", 0, 4096).await.unwrap().iter().all(|x| *x == 1), "the fenced write never landed");
    write(b, "v", 0, 4096, 3).await.unwrap();
}

#[tokio::test]
async fn a_volume_on_a_node_that_reads_offline_is_taken_over_without_force() {
    let c = TestCluster::start(2).await;
    create(c.engine(0), "v", 2).await.unwrap();
    c.engine(0).attach("v", false, None).await.unwrap();
    c.store.set_offline("node-1", true);
    let info = c.engine(1).attach("v", false, None).await.unwrap();
    assert_eq!(info.record.target, "node-2");
    assert!(!info.record.clean, "the old target may have died mid-write");
}

#[tokio::test]
async fn concurrent_forced_attaches_leave_exactly_one_target() {
    for _ in 0..5 {
        let c = TestCluster::start(3).await;
        create(c.engine(0), "v", 3).await.unwrap();
        let (r1, r2, r3) =
            tokio::join!(c.engine(0).attach("v", true, None), c.engine(1).attach("v", true, None), c.engine(2).attach("v", true, None));
        assert!(r1.is_ok() || r2.is_ok() || r3.is_ok(), "{r1:?} {r2:?} {r3:?}");
        let rec = record(&c, "v").await;
        let writable: Vec<usize> = {
            let mut w = Vec::new();
            for i in 0..3 {
                if c.engine(i).volume("v").is_some() && write(c.engine(i), "v", 0, 4096, i as u8 + 1).await.is_ok() {
                    w.push(i);
                }
            }
            w
        };
        assert_eq!(writable.len(), 1, "exactly one node acknowledges writes: {writable:?}");
        assert_eq!(c.engine(writable[0]).node.id, rec.target, "the one the record names");
    }
}

#[tokio::test]
async fn a_conflicting_change_of_the_record_fails_attach_and_leaves_it_unserved() {
    let c = TestCluster::start(1).await;
    let e = c.engine(0);
    create(e, "v", 1).await.unwrap();
    c.store.inject_conflicts(1);
    let r = e.attach("v", false, None).await;
    assert!(matches!(&r, Err(VolumeError::Aborted(m)) if m.contains("retry")), "{r:?}");
    assert!(e.connect("v").is_none());
    assert_eq!(record(&c, "v").await.target, "");
    e.attach("v", false, None).await.expect("a retry succeeds");
}

#[tokio::test]
async fn detach_with_a_client_needs_force_and_then_marks_the_record_unclean() {
    let c = attached(1, 1).await;
    let e = c.engine(0);
    let client = e.connect("v").unwrap();
    assert!(matches!(e.detach("v", false).await, Err(VolumeError::FailedPrecondition(_))));
    let r = e.detach("v", true).await.unwrap();
    assert_eq!((r.record.target.as_str(), r.record.clean), ("", false));
    drop(client);
    assert!(e.connect("v").is_none());
}

#[tokio::test]
async fn a_clean_detach_lets_another_node_attach_without_force() {
    let c = TestCluster::start(2).await;
    create(c.engine(0), "v", 2).await.unwrap();
    c.engine(0).attach("v", false, None).await.unwrap();
    write(c.engine(0), "v", 0, 4096, 7).await.unwrap();
    let r = c.engine(0).detach("v", false).await.unwrap();
    assert!(r.record.clean);
    c.engine(1).attach("v", false, None).await.unwrap();
    assert!(read(c.engine(1), "v", 0, 4096).await.unwrap().iter().all(|b| *b == 7));
}

#[tokio::test]
async fn detach_is_refused_on_a_node_that_does_not_serve_the_volume() {
    let c = TestCluster::start(2).await;
    create(c.engine(0), "v", 2).await.unwrap();
    c.engine(0).attach("v", false, None).await.unwrap();
    let r = c.engine(1).detach("v", false).await;
    assert!(matches!(&r, Err(VolumeError::FailedPrecondition(m)) if m.contains("served by node node-1")), "{r:?}");
}

#[tokio::test]
async fn a_snapshot_is_never_attached() {
    let c = attached(1, 1).await;
    let e = c.engine(0);
    e.snapshot("v", "s", BTreeMap::new()).await.unwrap();
    let r = e.attach("s", false, None).await;
    assert!(matches!(&r, Err(VolumeError::FailedPrecondition(m)) if m.contains("snapshot")), "{r:?}");
}

// ---- membership ----

#[tokio::test]
async fn a_replica_that_fails_a_write_leaves_the_in_sync_set_before_the_ack() {
    let c = attached(2, 2).await;
    let e = c.engine(0);
    write(e, "v", 0, 4096, 1).await.unwrap();
    c.nodes[1].faults.fail_writes.store(true, Ordering::Release);
    write(e, "v", 4096, 4096, 2).await.expect("acknowledged by the replica left in sync");
    let r = record(&c, "v").await;
    assert_eq!(r.in_sync, vec!["node-1".to_string()], "recorded out before the ack");
    let info = e.inspect("v").await.unwrap();
    let peer = info.replicas.iter().find(|p| p.node == "node-2").unwrap();
    assert_eq!(peer.state, "out_of_sync");
    assert!(peer.dirty_bytes > 0, "the missed region is recorded");
}

#[tokio::test]
async fn writes_go_on_through_a_store_outage_while_membership_is_unchanged() {
    let c = attached(3, 3).await;
    let e = c.engine(0);
    c.store.set_down(true);
    for i in 0..50u64 {
        write(e, "v", i * 4096, 4096, i as u8).await.expect("no store needed");
    }
    assert!(read(e, "v", 49 * 4096, 4096).await.unwrap().iter().all(|b| *b == 49));
    c.store.set_down(false);
    assert_eq!(in_sync_sorted(&record(&c, "v").await), ["node-1", "node-2", "node-3"]);
}

#[tokio::test]
async fn a_membership_change_during_a_store_outage_fails_the_write() {
    let c = attached(2, 2).await;
    let e = c.engine(0);
    c.store.set_down(true);
    c.nodes[1].faults.fail_writes.store(true, Ordering::Release);
    let r = write(e, "v", 0, 4096, 1).await;
    assert!(r.is_err(), "not acknowledged: the failed replica cannot be recorded out: {r:?}");
    c.store.set_down(false);
    assert_eq!(in_sync_sorted(&record(&c, "v").await), ["node-1", "node-2"], "the record was never changed");
}

#[tokio::test]
async fn with_no_replica_left_a_write_fails() {
    let c = TestCluster::start(2).await;
    let e = c.engine(0);
    // repl=1 placed on this node: its device failing fails the write (nothing to fail over to).
    create(e, "v", 1).await.unwrap();
    e.attach("v", false, None).await.unwrap();
    c.nodes[0].faults.fail_writes.store(true, Ordering::Release);
    assert!(write(e, "v", 0, 4096, 1).await.is_err());
}

#[tokio::test]
async fn a_lapsed_lease_makes_the_target_reread_the_record_and_stop_when_taken_over() {
    let c = TestCluster::start(2).await;
    let (a, b) = (c.engine(0), c.engine(1));
    create(a, "v", 1).await.unwrap();
    a.attach("v", false, None).await.unwrap();
    // Another node took the record over while this node's lease had lapsed (no HELLO reached
    // this replica, as in a partition), then this node renews its lease.
    let mut r = record(&c, "v").await;
    r.target = "node-2".into();
    r.epoch += 1;
    c.store.update_volume(&r).await.unwrap();
    write(a, "v", 0, 4096, 1).await.expect("the lease is still this node's: the record is not re-read");
    c.nodes[0].store.lapse_lease();
    let w = write(a, "v", 0, 4096, 2).await;
    assert!(w.is_err(), "after a lapse the target re-reads the record and finds itself replaced: {w:?}");
    assert!(b.volume("v").is_none() || b.connect("v").is_none());
}

#[tokio::test]
async fn a_newer_target_fences_every_replica_of_the_old_one() {
    let c = TestCluster::start(3).await;
    let (a, b) = (c.engine(0), c.engine(1));
    create(a, "v", 3).await.unwrap();
    a.attach("v", false, None).await.unwrap();
    b.attach("v", true, None).await.unwrap();
    for (i, e) in [a, c.engine(2)].into_iter().enumerate() {
        if let Some(v) = e.volume("v") {
            assert_eq!(v.newest_epoch(), 3, "replica {i} has seen the new epoch");
        }
    }
    assert!(write(a, "v", 0, 4096, 1).await.is_err());
}

#[tokio::test]
async fn a_flush_reaches_every_in_sync_replica() {
    let c = attached(2, 2).await;
    let e = c.engine(0);
    write(e, "v", 0, 4096, 1).await.unwrap();
    let io = e.io(e.volume("v").unwrap());
    io.flush().await.unwrap();
    // A replica whose device cannot sync leaves the set instead of the flush lying.
    c.nodes[1].faults.fail_writes.store(true, Ordering::Release);
    io.flush().await.unwrap();
    assert_eq!(record(&c, "v").await.in_sync, vec!["node-1".to_string()]);
}

#[tokio::test]
async fn writes_reach_every_replica_byte_for_byte() {
    let c = attached(3, 3).await;
    let e = c.engine(0);
    for i in 0..8u64 {
        write(e, "v", i * 65536 + 512 * i, 4096 + 512 * i as usize, 0x10 + i as u8).await.unwrap();
    }
    let sums: Vec<Vec<(u64, u32)>> = {
        let mut s = Vec::new();
        for n in &c.nodes {
            s.push(n.engine.extent_checksums("v").await.unwrap());
        }
        s
    };
    assert!(!sums[0].is_empty());
    assert!(sums.iter().all(|s| *s == sums[0]), "replicas identical: {sums:?}");
}

#[tokio::test]
async fn the_store_is_not_asked_on_the_write_path() {
    let c = attached(2, 2).await;
    let e = c.engine(0);
    write(e, "v", 0, 4096, 1).await.unwrap();
    let before = c.store.calls();
    for i in 0..20u64 {
        write(e, "v", i * 4096, 4096, 2).await.unwrap();
    }
    assert_eq!(c.store.calls(), before, "writes with unchanged membership make no store call");
}

#[tokio::test]
async fn engines_share_one_record_per_volume() {
    let c = TestCluster::start(2).await;
    create(c.engine(0), "v", 2).await.unwrap();
    let seen = c.engine(1).inspect("v").await.unwrap();
    assert_eq!(seen.record.replicas.len(), 2);
    let listed: Vec<String> = c.engine(1).list().await.unwrap().into_iter().map(|v| v.record.name).collect();
    assert_eq!(listed, ["v"]);
    let _ = Arc::clone(c.engine(1));
}

// ---- crash and race points (failpoints) ----

#[tokio::test]
async fn a_local_write_of_the_old_target_that_arrives_after_a_takeover_is_refused() {
    let _f = fail::FailScenario::setup();
    let c = TestCluster::start(2).await;
    let (a, b) = (c.engine(0).clone(), c.engine(1).clone());
    create(&a, "v", 2).await.unwrap();
    a.attach("v", false, None).await.unwrap();
    write(&a, "v", 0, 4096, 1).await.unwrap();
    // The old target's write reaches the replicas late: after the new target's HELLO (and
    // after the comparison of replicas that an unclean takeover starts).
    fail::cfg("target.local_leg", "1*return(delay:300)").unwrap();
    fail::cfg("target.remote_legs", "1*return(delay:300)").unwrap();
    let late = tokio::spawn({
        let a = a.clone();
        async move { write(&a, "v", 0, 4096, 2).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    b.attach("v", true, None).await.unwrap();
    let r = late.await.unwrap();
    assert!(r.is_err(), "the fenced target's write is not acknowledged: {r:?}");
    assert_eq!(a.extent_checksums("v").await.unwrap(), b.extent_checksums("v").await.unwrap(), "and it landed on neither replica");
    assert!(read(&b, "v", 0, 4096).await.unwrap().iter().all(|x| *x == 1));
}

/// A replica's requests that are running when their connection breaks still run to their end:
/// one whose reply can no longer be sent is not abandoned half-way.
#[tokio::test]
async fn a_replica_write_running_when_its_connection_breaks_still_lands() {
    use std::time::Duration;
    use strata_engine::replication::client::Client;
    use strata_engine::replication::frame::{self, Command};
    use tokio::io::AsyncWriteExt;
    let _f = fail::FailScenario::setup();
    let c = attached(2, 2).await;
    let rec = record(&c, "v").await;
    let n2 = c.engine(1).node.clone();
    let target = c.engine(0).tls.clone().unwrap();
    // Of two writes, the first to reach the replica's data path waits 1.5 s and the other
    // 0.8 s: when the second one's reply is written the connection is gone, and the first is
    // still running. The reset comes at 0.3 s, once the replica has long read both.
    fail::cfg("replica.write", "1*return(delay:1500)->1*return(delay:800)").unwrap();
    let tcp = tokio::net::TcpStream::connect(&n2.repl_address).await.unwrap();
    let mut s = target.connect(tcp, &n2.id).await.unwrap();
    let writes = [(1u64, 0u64, 0xa1u8), (2, MIB, 0xa2)];
    let mut out = Vec::new();
    for (handle, offset, byte) in writes {
        let cmd = Command::Write { offset, data: bytes::Bytes::from(vec![byte; 4096]), fua: false };
        out.extend_from_slice(&frame::encode_request(&cmd.header(handle, rec.id, rec.epoch)));
        out.extend_from_slice(&[byte; 4096]);
    }
    s.write_all(&out).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A reset, not a close: the replica's next write to the socket fails.
    socket2::SockRef::from(s.get_ref().0).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
    let leg = Client::connect_to(&n2.id, &n2.repl_address, Duration::from_secs(2), Some(&target)).await.unwrap();
    let t0 = std::time::Instant::now();
    for (_, offset, byte) in writes {
        loop {
            let got = leg.call(rec.id, rec.epoch, Command::Read { offset, len: 4096 }).await.unwrap();
            if got.iter().all(|b| *b == byte) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "the write at {offset} never landed on the replica");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads `want` bytes from `s`, 4 KiB a millisecond; panics when `who` stops sending for 3 s.
async fn read_slowly<S: tokio::io::AsyncRead + Unpin>(s: &mut S, want: usize, who: &str) {
    use tokio::io::AsyncReadExt;
    let (mut got, mut buf) = (0usize, vec![0u8; 4096]);
    while got < want {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        let n = tokio::time::timeout(std::time::Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{who} stopped sending after {got} of {want} bytes"))
            .unwrap();
        assert!(n > 0, "{who} closed the connection after {got} of {want} bytes");
        got += n;
    }
}

#[tokio::test]
async fn a_read_reply_over_tls_reaches_a_target_that_reads_it_slowly() {
    use strata_engine::replication::frame::{self, Command, REPLY_LEN};
    use strata_engine::replication::server::{connection, Bounds, Replicas};
    use tokio::io::AsyncWriteExt;
    let c = attached(2, 2).await;
    let rec = record(&c, "v").await;
    let (target, replica) = (c.engine(0).tls.clone().unwrap(), c.engine(1).tls.clone().unwrap());
    // A pipe that holds 4 KiB, read 4 KiB a millisecond: TLS records of a reply that the
    // replica hands to it while it is full wait in the TLS session until it has room.
    let (near, far) = tokio::io::duplex(4096);
    let engine: Arc<dyn Replicas> = c.engine(1).clone();
    tokio::spawn(async move {
        let (rd, wr) = tokio::io::split(replica.acceptor().accept(far).await.unwrap());
        connection(rd, wr, engine, "test".into(), Bounds { requests: 16, bytes: 16 << 20 }, Some("node-1".into())).await
    });
    let mut s = target.connect(near, "node-2").await.unwrap();
    // One read, then nothing: the last records of its reply must be pushed out (flushed) once
    // the pipe has room, as nothing else would send them.
    let len = 256usize << 10;
    let cmd: Command = Command::Read { offset: 0, len: len as u32 };
    s.write_all(&frame::encode_request(&cmd.header(1, rec.id, rec.epoch))).await.unwrap();
    s.flush().await.unwrap();
    read_slowly(&mut s, REPLY_LEN + len, "the replica").await;
}

#[tokio::test]
async fn an_nbd_read_reply_over_tls_reaches_a_client_that_reads_it_slowly() {
    use strata_engine::frontend::nbd::transmit::{conn::serve, frame};
    use tokio::io::AsyncWriteExt;
    let c = attached(1, 1).await;
    let e = c.engine(0);
    let conn = e.io(e.volume("v").expect("a handle"));
    let (engine, client) = (e.tls.clone().unwrap(), c.identity("client"));
    // A pipe that holds 4 KiB, read 4 KiB a millisecond: TLS records of a reply that the
    // engine hands to it while it is full wait in the TLS session until it has room.
    let (near, far) = tokio::io::duplex(4096);
    tokio::spawn(async move {
        let s = engine.acceptor().accept(far).await.unwrap();
        let limits = strata_engine::frontend::nbd::Limits::new(64 << 20, 256 << 20, std::time::Duration::from_secs(10), 8);
        serve(s, conn, limits).await
    });
    let mut s = client.connect(near, "node-1").await.unwrap();
    // One read, then nothing: the last records of its reply must be pushed out (flushed) once
    // the pipe has room, as no other reply would send them.
    let len = 256usize << 10;
    let req = frame::Request { flags: 0, cmd: frame::CMD_READ, handle: 9, offset: 0, len: len as u32 };
    s.write_all(&frame::encode_request(&req)).await.unwrap();
    s.flush().await.unwrap();
    read_slowly(&mut s, 16 + len, "the engine").await;
}

#[tokio::test]
async fn a_target_that_fails_right_after_recording_a_replica_out_acknowledges_nothing() {
    let _f = fail::FailScenario::setup();
    let c = attached(2, 2).await;
    let e = c.engine(0);
    c.nodes[1].faults.fail_writes.store(true, Ordering::Release);
    fail::cfg("membership.after_cas", "1*return(error)").unwrap();
    let r = write(e, "v", 0, 4096, 1).await;
    assert!(r.is_err(), "not acknowledged: {r:?}");
    assert_eq!(record(&c, "v").await.in_sync, vec!["node-1".to_string()], "the replica is out in the record all the same");
    write(e, "v", 0, 4096, 1).await.expect("the next write goes to the replica left");
}

#[tokio::test]
async fn a_compare_and_swap_that_cannot_be_made_fails_the_write_and_changes_nothing() {
    let _f = fail::FailScenario::setup();
    let c = attached(2, 2).await;
    let e = c.engine(0);
    c.nodes[1].faults.fail_writes.store(true, Ordering::Release);
    fail::cfg("membership.before_cas", "1*return(error)").unwrap();
    assert!(write(e, "v", 0, 4096, 1).await.is_err());
    assert_eq!(in_sync_sorted(&record(&c, "v").await), ["node-1", "node-2"]);
}

#[tokio::test]
async fn a_replica_the_record_asks_to_rebuild_is_rebuilt_in_full_not_from_the_dirty_log() {
    let c = attached(2, 2).await;
    let e = c.engine(0);
    for x in 0..4u64 {
        write(e, "v", x * MIB, 4096, 1).await.unwrap();
    }
    c.nodes[1].faults.fail_writes.store(true, Ordering::Release);
    write(e, "v", 0, 4096, 2).await.unwrap();
    // Its node salvaged a journal meanwhile: the record asks for a full rebuild, though this
    // target's record of what the replica missed holds one 64 KiB region.
    let mut r = record(&c, "v").await;
    assert_eq!(r.in_sync, vec!["node-1".to_string()]);
    r.rebuild = vec!["node-2".into()];
    c.store.update_volume(&r).await.unwrap();
    c.nodes[1].faults.fail_writes.store(false, Ordering::Release);
    let t0 = std::time::Instant::now();
    while record(&c, "v").await.in_sync.len() < 2 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "the replica never came back");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let info = e.inspect("v").await.unwrap();
    let copied = info.replicas.iter().find(|p| p.node == "node-2").unwrap().copied_bytes;
    assert!(copied >= 4 * MIB, "every allocated extent was copied, not just the logged region: {copied} bytes");
    assert!(record(&c, "v").await.rebuild.is_empty(), "the request is cleared with the return to the in-sync set");
    assert_eq!(c.engine(0).extent_checksums("v").await.unwrap(), c.engine(1).extent_checksums("v").await.unwrap());
}

/// What a peer on the node network can do to a replica over the replication port (issue #17):
/// without a certificate nothing; with a certificate of the cluster CA but not the target's,
/// nothing that changes the replica or its epoch; and the record allows no future epoch, no
/// growth, and no DROP, SHARE or RESTORE outside the operation it records.
#[tokio::test]
async fn a_hostile_peer_cannot_fence_write_grow_drop_share_or_restore_a_replica() {
    use std::time::Duration;
    use strata_engine::replication::client::{CallError, Client};
    use strata_engine::replication::frame::Command;
    let c = attached(3, 3).await;
    let e = c.engine(0);
    write(e, "v", 0, 64 * 1024, 7).await.unwrap();
    let rec = record(&c, "v").await;
    let replica = c.engine(1).node.repl_address.clone();
    let t = Duration::from_secs(1);
    let block = || bytes::Bytes::from(vec![0xeeu8; 4096]);
    let eperm = libc::EPERM as u32;
    let refused = |what: &str, r: Result<Vec<u8>, CallError>| match r {
        Err(CallError::Remote { errno, .. }) => assert_eq!(errno, eperm, "{what}"),
        other => panic!("{what}: expected EPERM, got {other:?}"),
    };

    // No certificate: the TLS handshake fails and no request is served.
    let plain = Client::connect(&replica, t).await.unwrap();
    let r = plain.call(rec.id, rec.epoch, Command::Write { offset: 0, data: block(), fua: false }).await;
    assert!(matches!(r, Err(CallError::Broken(_) | CallError::Timeout(..))), "{r:?}");

    // Another replica holder of the cluster (node-3): it may read what it holds, nothing more.
    let node3 = c.engine(2).tls.clone().unwrap();
    let peer = Client::connect_to("node-2", &replica, t, Some(&node3)).await.unwrap();
    refused("HELLO from a non-target", peer.call(rec.id, rec.epoch, Command::Hello { size: rec.size }).await);
    refused("WRITE from a non-target", peer.call(rec.id, rec.epoch, Command::Write { offset: 0, data: block(), fua: false }).await);
    refused(
        "WRITE_ZEROES from a non-target",
        peer.call(rec.id, rec.epoch, Command::WriteZeroes { offset: 0, len: 1 << 20, fua: false, keep_allocated: false }).await,
    );
    refused("SHARE from a non-target", peer.call(rec.id, rec.epoch, Command::Share { into: 999 }).await);

    // A certificate of the CA for a node that holds nothing of the volume.
    let stranger = c.identity("node-9");
    let s = Client::connect_to("node-2", &replica, t, Some(&stranger)).await.unwrap();
    let probes: Vec<(&str, u64, Command)> = vec![
        ("HELLO at the highest epoch", u64::MAX, Command::Hello { size: rec.size }),
        ("HELLO at the next epoch", rec.epoch + 1, Command::Hello { size: rec.size }),
        ("HELLO growing the replica", rec.epoch, Command::Hello { size: 1 << 50 }),
        ("READ", rec.epoch, Command::Read { offset: 0, len: 4096 }),
        ("WRITE", rec.epoch, Command::Write { offset: 0, data: block(), fua: false }),
        ("WRITE at the highest epoch", u64::MAX, Command::Write { offset: 0, data: block(), fua: false }),
        ("WRITE_ZEROES", u64::MAX, Command::WriteZeroes { offset: 0, len: 1 << 20, fua: false, keep_allocated: false }),
        ("FLUSH", u64::MAX, Command::Flush),
        ("DROP", u64::MAX, Command::Drop),
        ("DROP at the epoch", rec.epoch, Command::Drop),
        ("SHARE", rec.epoch, Command::Share { into: 999 }),
        ("RESTORE", rec.epoch, Command::Restore { from: rec.id }),
    ];
    for (what, epoch, cmd) in probes {
        refused(what, s.call(rec.id, epoch, cmd).await);
    }

    // The target still writes to all three, and every copy holds the same data.
    write(e, "v", 4096, 4096, 8).await.unwrap();
    assert_eq!(record(&c, "v").await.in_sync.len(), 3);
    let target = e.tls.clone().unwrap();
    let mut sums = Vec::new();
    for i in 1..3 {
        let n = &c.engine(i).node;
        let leg = Client::connect_to(&n.id, &n.repl_address, t, Some(&target)).await.unwrap();
        sums.push(leg.call(rec.id, rec.epoch, Command::Checksum { offset: 0, len: 64 * 1024 }).await.unwrap());
    }
    let here = read(e, "v", 0, 64 * 1024).await.unwrap();
    assert_eq!(sums[0], sums[1]);
    assert_eq!(sums[0], crc32c::crc32c(&here).to_be_bytes().to_vec());
    assert!(here[..4096].iter().all(|b| *b == 7) && here[4096..8192].iter().all(|b| *b == 8));
}

#[tokio::test]
async fn a_replica_proves_its_identity_to_the_target() {
    use strata_engine::replication::client::{CallError, Client};
    use strata_engine::replication::frame::Command;
    let c = attached(2, 2).await;
    let rec = record(&c, "v").await;
    let me = c.engine(0).tls.clone().unwrap();
    // node-2's port answers only as node-2: a connection that expects another node fails.
    let r = Client::connect_to("node-3", &c.engine(1).node.repl_address, std::time::Duration::from_secs(1), Some(&me)).await;
    assert!(matches!(r, Err(CallError::Connect(..))), "{:?}", r.err());
    let ok = Client::connect_to("node-2", &c.engine(1).node.repl_address, std::time::Duration::from_secs(1), Some(&me)).await.unwrap();
    ok.call(rec.id, rec.epoch, Command::Flush).await.unwrap();
}

/// Certificates are replaced under write load, first the CA (a bundle of old and new while it
/// changes), then every node's certificate: no write fails, no replica leaves the in-sync set,
/// connections opened afterwards use the new certificates, and the old CA is trusted no more.
#[tokio::test]
async fn certificates_rotate_under_write_load_without_a_failed_write() {
    use std::time::Duration;
    use strata_engine::replication::client::Client;
    use strata_engine::replication::frame::Command;
    use strata_engine::security::{init_ca, issue, CA_CERT, NODE_CERT, NODE_KEY};
    let c = attached(3, 3).await;
    let e = c.engine(0).clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (e2, stop2) = (e.clone(), stop.clone());
    let load = tokio::spawn(async move {
        let mut n = 0u64;
        // Bounded: at most 20,000 writes, until the rotation is done.
        while n < 20_000 && !stop2.load(Ordering::Acquire) {
            write(&e2, "v", (n % 1024) * 4096, 4096, n as u8).await.expect("a write during rotation");
            n += 1;
        }
        n
    });
    let reload_all = |c: &TestCluster| {
        for n in &c.nodes {
            assert!(n.engine.tls.as_ref().unwrap().reload_if_changed().expect("the new files load"), "{} saw no change", n.engine.node.id);
        }
    };
    let new_ca = c.ca_dir.join("ca2");
    init_ca(&new_ca).unwrap();
    let old_pem = std::fs::read_to_string(c.ca_dir.join(CA_CERT)).unwrap();
    let new_pem = std::fs::read_to_string(new_ca.join(CA_CERT)).unwrap();
    // 1. Every node trusts both CAs.
    for n in &c.nodes {
        std::fs::write(n.tls_dir().join(CA_CERT), format!("{old_pem}{new_pem}")).unwrap();
    }
    reload_all(&c);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // 2. Every node gets a certificate of the new CA.
    for n in &c.nodes {
        let tmp = c.ca_dir.join(format!("new-{}", n.engine.node.id));
        issue(&new_ca, &n.engine.node.id, &[], &tmp).unwrap();
        for f in [NODE_CERT, NODE_KEY] {
            std::fs::copy(tmp.join(f), n.tls_dir().join(f)).unwrap();
        }
    }
    reload_all(&c);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // 3. The old CA goes.
    for n in &c.nodes {
        std::fs::write(n.tls_dir().join(CA_CERT), &new_pem).unwrap();
    }
    reload_all(&c);
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Release);
    let writes = load.await.unwrap();
    assert!(writes > 0);
    let rec = record(&c, "v").await;
    assert_eq!(rec.in_sync.len(), 3, "no replica left the in-sync set");
    // New connections: the target's new certificate works; one of the old CA does not.
    let n2 = &c.engine(1).node;
    let t = Duration::from_secs(1);
    let leg = Client::connect_to(&n2.id, &n2.repl_address, t, e.tls.as_deref()).await.unwrap();
    leg.call(rec.id, rec.epoch, Command::Flush).await.unwrap();
    let old = c.identity("node-1");
    let r = Client::connect_to(&n2.id, &n2.repl_address, t, Some(&old)).await;
    assert!(r.is_err(), "a certificate of the old CA no longer verifies the replica");
}

#[tokio::test]
async fn snapshots_are_not_listed_as_exports() {
    let c = attached(1, 1).await;
    let e = c.engine(0);
    let snap = e.snapshot("v", "s", BTreeMap::new()).await.unwrap();
    // Its handle is loaded as at an engine start (or as a replication request loads it).
    assert!(e.replica_volume(snap.record.id).await.is_some_and(|v| v.read_only), "the snapshot is known here");
    let names: Vec<String> = e.exports().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["v".to_string()], "NBD_OPT_LIST offers only what can be opened");
}

#[tokio::test]
async fn a_drive_that_fails_data_io_is_shown_failed_and_raises_drive_failed_once() {
    let c = attached(1, 1).await;
    let e = c.engine(0);
    write(e, "v", 0, 4096, 1).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    e.check_drives(&mut seen);
    assert!(!e.pool.devices()[0].failed());
    c.nodes[0].faults.fail_writes.store(true, Ordering::Release);
    assert!(write(e, "v", 0, 4096, 2).await.is_err());
    assert!(e.pool.devices()[0].failed() && e.pool.devices()[0].io_errors() >= 1);
    e.check_drives(&mut seen);
    e.check_drives(&mut seen);
    let raised: Vec<_> = e.alerts.list().into_iter().filter(|a| a.kind == "DriveFailed").collect();
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert!(raised[0].message.contains("failed (1 data I/O error(s))"), "{}", raised[0].message);
}

// ---- cloud snapshots ----

/// Credential "s3" for the test S3 server (unencrypted backups).
fn s3_credential(s3: &strata_e2e::s3::S3) -> strata_engine::cloudsnap::credentials::Credential {
    use strata_e2e::s3::{ACCESS_KEY, BUCKET, SECRET_KEY};
    strata_engine::cloudsnap::credentials::Credential {
        name: "s3".into(),
        endpoint: s3.url.clone(),
        bucket: BUCKET.into(),
        region: String::new(),
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        path_style: true,
        passphrase: String::new(),
    }
}

async fn backups_settled(e: &Service, n: usize) -> Vec<strata_engine::cloudsnap::Job> {
    for _ in 0..200 {
        let jobs: Vec<_> = e.jobs().await.unwrap().into_iter().filter(|j| !j.schedule.is_empty()).collect();
        if jobs.len() == n && jobs.iter().all(|j| j.state == "done") {
            return jobs;
        }
        assert!(jobs.iter().all(|j| j.state != "failed"), "{jobs:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{n} scheduled backups did not finish: {:?}", e.jobs().await.unwrap());
}

#[tokio::test]
async fn a_cloud_schedule_takes_backups_when_due_and_keeps_only_its_newest() {
    let Some(s3) = strata_e2e::s3::S3::start() else { return };
    let c = TestCluster::start(1).await;
    let e = c.engine(0);
    e.credential_create(s3_credential(&s3)).await.unwrap();
    let spec = |labels: &[(&str, &str)]| CreateSpec {
        name: "sched",
        size: 16 * MIB,
        repl: 1,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    };
    let err = e.create(spec(&[("cloudsnap_schedule", "periodic=1,2")])).await.unwrap_err();
    assert!(err.to_string().contains("needs cloudsnap_cred"), "{err}");
    let err = e.create(spec(&[("cloudsnap_schedule", "hourly=1"), ("cloudsnap_cred", "s3")])).await.unwrap_err();
    assert!(err.to_string().contains("cloudsnap_schedule"), "{err}");
    e.create(spec(&[("cloudsnap_schedule", "periodic=1,2"), ("cloudsnap_cred", "s3")])).await.unwrap();
    e.attach("sched", false, None).await.unwrap();
    write(e, "sched", 0, 1 << 20, 7).await.unwrap();
    let t0 = record(&c, "sched").await.created_unix;
    // Not due before the next whole minute after its creation (periodic times fall on whole
    // minutes of the clock); then one backup per pass that finds it due.
    e.cloud_schedules_once(t0 / 60 * 60 + 59).await;
    assert!(e.jobs().await.unwrap().is_empty());
    for (i, at) in [t0 + 61, t0 + 122, t0 + 183].into_iter().enumerate() {
        // Backups started in distinct seconds, so their order is plain.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        e.cloud_schedules_once(at).await;
        // The third pass takes one and deletes the oldest (KEEP 2).
        let jobs = backups_settled(e, (i + 1).min(2)).await;
        assert!(jobs.iter().all(|j| j.schedule == "periodic=1" && j.name.starts_with("sched.cloud.periodic.")), "{jobs:?}");
    }
    let left = e.cloud_list("s3", Some("sched")).await.unwrap();
    assert_eq!(left.len(), 2, "KEEP 2: {:?}", left.iter().map(|m| &m.id).collect::<Vec<_>>());
    assert_eq!(e.jobs().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_write_its_only_in_sync_replica_fails_is_not_acknowledged_and_the_replica_stays_in_sync() {
    let c = TestCluster::start(2).await;
    let (e1, e2) = (c.engine(0), c.engine(1));
    let placement = strata_engine::volume::PlacementSpec { nodes: vec!["node-2".into()], ..Default::default() };
    e1.create(CreateSpec { name: "far", size: 16 * MIB, repl: 1, placement, ..Default::default() }).await.unwrap();
    // Served on node-1, which holds no replica: node-2's is the only copy.
    e1.attach("far", false, None).await.unwrap();
    write(e1, "far", 0, 4096, 1).await.unwrap();
    c.nodes[1].faults.fail_writes.store(true, Ordering::Release);
    assert!(write(e1, "far", 4096, 4096, 2).await.is_err(), "a write no replica stored is not acknowledged");
    assert!(write(e1, "far", 8192, 4096, 3).await.is_err());
    assert_eq!(record(&c, "far").await.in_sync, vec!["node-2".to_string()], "the last copy stays in the in-sync set");
    c.nodes[1].faults.fail_writes.store(false, Ordering::Release);
    // Once node-2 answers again, writes go on (the target reconnects it within a second or so).
    let mut ok = false;
    for _ in 0..50 {
        if write(e1, "far", 4096, 4096, 4).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(ok, "writes resume once the replica answers");
    assert_eq!(read(e1, "far", 0, 8192).await.unwrap(), [vec![1u8; 4096], vec![4u8; 4096]].concat());
    // A new target on node-2 reads the same (its replica was never dropped).
    e1.detach("far", false).await.unwrap();
    e2.attach("far", false, None).await.unwrap();
    assert_eq!(read(e2, "far", 0, 8192).await.unwrap(), [vec![1u8; 4096], vec![4u8; 4096]].concat());
}

#[tokio::test]
async fn a_failed_backup_says_why_leaves_no_snapshot_and_is_taken_again_by_name() {
    let Some(s3) = strata_e2e::s3::S3::start() else { return };
    let c = attached(1, 1).await;
    let e = c.engine(0);
    e.credential_create(s3_credential(&s3)).await.unwrap();
    write(e, "v", 0, 1 << 20, 5).await.unwrap();
    let scenario = fail::FailScenario::setup();
    fail::cfg("cloudsnap.extent", "return(error)").unwrap();
    let first = e.cloud_backup("v", "s3", false, "nightly").await.unwrap();
    let settled = |id: String| async move {
        for _ in 0..200 {
            let j = e.job(&id).await.unwrap().unwrap();
            if j.state != "running" {
                return j;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("backup {id} did not end");
    };
    let j = settled(first.id.clone()).await;
    assert_eq!(j.state, "failed");
    assert!(j.error.contains("failpoint cloudsnap.extent"), "{}", j.error);
    assert!(e.snapshots(Some("v")).await.unwrap().is_empty(), "the failed backup's snapshot is gone");
    fail::remove("cloudsnap.extent");
    drop(scenario);
    let again = e.cloud_backup("v", "s3", false, "nightly").await.unwrap();
    assert_ne!(again.id, first.id, "a failed backup is taken again under its name");
    assert_eq!(settled(again.id.clone()).await.state, "done");
    assert_eq!(e.cloud_backup("v", "s3", false, "nightly").await.unwrap().id, again.id, "then the name is that backup");
    assert_eq!(e.cloud_list("s3", Some("v")).await.unwrap().len(), 1);
}
