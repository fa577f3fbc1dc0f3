//! The etcd metadata store against a real etcd (Debian's etcd-server) on loopback.

mod common;

use common::*;
use futures::StreamExt;
use std::process::Command;
use std::time::{Duration, Instant};
use strata_engine::meta::etcd::Etcd;
use strata_engine::meta::{MetaError, MetaStore, VolumeRecord};

fn etcd() -> EtcdProc {
    EtcdProc::start()
}

fn rec(name: &str) -> VolumeRecord {
    VolumeRecord { id: 0, name: name.into(), size: 1 << 30, repl: 1, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_records_are_created_once_and_changed_only_by_compare_and_swap() {
    let e = etcd();
    let s = Etcd::connect(std::slice::from_ref(&e.url), "node-a").await.unwrap();
    let (a, b) = strata_engine::meta::contract::volumes_are_created_once_and_updated_by_revision(&s).await;
    assert!(b.id > a.id);
    // A second store (another engine) sees the same records and cluster id.
    let s2 = Etcd::connect(std::slice::from_ref(&e.url), "node-b").await.unwrap();
    assert_eq!(s2.get_volume("a").await.unwrap().unwrap().size, 2 << 30);
    assert_eq!(s.cluster_id().await.unwrap(), s2.cluster_id().await.unwrap());
    assert!(!s.cluster_id().await.unwrap().is_empty());
    // Concurrent creations from two stores never share an id.
    let h: Vec<_> = (0..2)
        .map(|i| {
            let url = e.url.clone();
            tokio::spawn(async move {
                let s = Etcd::connect(&[url], "n").await.unwrap();
                let mut ids = Vec::new();
                for j in 0..10 {
                    ids.push(s.create_volume(rec(&format!("c{i}-{j}"))).await.unwrap().id);
                }
                ids
            })
        })
        .collect();
    let mut ids: Vec<u64> = Vec::new();
    for t in h {
        ids.extend(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    s.remove_volume("b").await.unwrap();
    assert!(matches!(s.remove_volume("b").await, Err(MetaError::NotFound(_))));
    assert_eq!(s.list_volumes().await.unwrap().len(), 21);
    assert!(s.get_pool().await.unwrap().is_none(), "pool records are per node");
}

#[test]
fn an_engine_on_etcd_keeps_its_volumes_across_restarts() {
    let e = etcd();
    let dir = tempdir();
    let mut eng = EngineProc::start_with(dir.path(), 1, "256MiB", &["--etcd", &e.url, "--node-id", "n1"]);
    eng.sdk().create("kept", 32 << 20).unwrap();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x3c 0 1M"]).arg(eng.uri("kept")));
    eng.restart();
    assert_eq!(eng.sdk().inspect("kept").unwrap().spec.unwrap().size_bytes, 32 << 20);
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x3c 0 1M"]).arg(eng.uri("kept")));
    assert!(!out.contains("verification failed"), "{out}");
    // The record really is in etcd, not in the data dir.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let kept = rt.block_on(async {
        let s = Etcd::connect(std::slice::from_ref(&e.url), "probe").await.unwrap();
        s.get_volume("kept").await.unwrap().unwrap()
    });
    assert_eq!(kept.size, 32 << 20);
    assert!(!dir.path().join("data/strata-meta.redb").exists());
}

#[test]
fn an_unreachable_etcd_is_a_clear_start_up_error() {
    let dir = tempdir();
    let url = format!("http://127.0.0.1:{}", free_port());
    let mut eng = EngineProc::new(dir.path(), 1, "256MiB", &["--etcd", &url]);
    let err = eng.spawn().expect_err("no etcd, no start");
    assert!(err.contains("etcd") && err.contains(&url), "{err}");
}

fn node_states(e: &EngineProc) -> Vec<(String, String)> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let ch = rt.block_on(tonic::transport::Channel::from_shared(format!("http://{}", e.sdk)).unwrap().connect()).unwrap();
    let mut c = strata_api::v1::node_service_client::NodeServiceClient::new(ch);
    let nodes = rt.block_on(c.list(strata_api::v1::ListNodesRequest {})).unwrap().into_inner().nodes;
    let mut v: Vec<(String, String)> = nodes.into_iter().map(|n| (n.id, n.status)).collect();
    v.sort();
    v
}

#[test]
fn nodes_register_with_a_lease_and_read_offline_when_their_engine_dies() {
    let e = etcd();
    let (d1, d2) = (tempdir(), tempdir());
    let a = EngineProc::start_with(d1.path(), 1, "128MiB", &["--etcd", &e.url, "--node-id", "node-a", "--node-ttl", "2"]);
    let mut b = EngineProc::start_with(d2.path(), 1, "128MiB", &["--etcd", &e.url, "--node-id", "node-b", "--node-ttl", "2"]);
    let online = |n: &str| (n.to_string(), "online".to_string());
    assert_eq!(node_states(&a), vec![online("node-a"), online("node-b")]);
    // Renewal keeps node-b alive well past its TTL.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(node_states(&a), vec![online("node-a"), online("node-b")]);
    b.kill9();
    let t0 = Instant::now();
    loop {
        if node_states(&a).contains(&("node-b".to_string(), "offline".to_string())) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "node-b never read offline: {:?}", node_states(&a));
        std::thread::sleep(Duration::from_millis(200));
    }
    b.spawn().unwrap();
    assert_eq!(node_states(&a), vec![online("node-a"), online("node-b")]);
}

#[test]
fn each_engine_serves_only_the_volumes_in_its_own_pool() {
    let e = etcd();
    let (d1, d2) = (tempdir(), tempdir());
    let a = EngineProc::start_with(d1.path(), 1, "128MiB", &["--etcd", &e.url, "--node-id", "node-a"]);
    let b = EngineProc::start_with(d2.path(), 1, "128MiB", &["--etcd", &e.url, "--node-id", "node-b"]);
    a.sdk().create("on-a", 16 << 20).unwrap();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x77 0 64k"]).arg(a.uri("on-a")));
    let seen = b.sdk().inspect("on-a").unwrap();
    assert_eq!(seen.attached_node, "node-a");
    assert_eq!(seen.replica_nodes, vec!["node-a".to_string()]);
    // Changes sent to node-b are forwarded to node-a, which serves the volume: a delete is
    // refused there while a client is connected.
    let held = common::nbd::Client::connect(&a.nbd, "on-a").unwrap();
    let err = b.sdk().delete("on-a", false).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("connected NBD client"), "{}", err.message());
    b.sdk().resize("on-a", 32 << 20).unwrap();
    assert_eq!(a.sdk().inspect("on-a").unwrap().spec.unwrap().size_bytes, 32 << 20);
    let out = Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read 0 4k"]).arg(b.uri("on-a")).output().unwrap();
    assert!(out.status.code() != Some(0), "node-b does not export node-a's volume");
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("attached on node node-a"), "the refusal says where the volume is: {why}");
    drop(held);
    // After node-b restarts it still does not take the volume over.
    let mut b = b;
    b.restart();
    assert!(common::nbd::Client::connect(&b.nbd, "on-a").is_err());
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x77 0 64k"]).arg(a.uri("on-a")));
    assert!(!out.contains("verification failed"));
    a.sdk().delete("on-a", true).unwrap(); // qemu-io just left; its connection may still be closing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_storage_fails_reads_storage_down_until_it_recovers() {
    use strata_engine::meta::{NodeRecord, NodeState};
    let e = etcd();
    let s = Etcd::connect_with_ttl(std::slice::from_ref(&e.url), "node-s", 2).await.unwrap();
    let n = NodeRecord {
        id: "node-s".into(),
        hostname: "h".into(),
        sdk_address: "a".into(),
        nbd_address: "b".into(),
        total_bytes: 1,
        version: "v".into(),
        ..Default::default()
    };
    s.register_node(&n).await.unwrap();
    async fn state(s: &Etcd) -> NodeState {
        s.list_nodes().await.unwrap().into_iter().find(|(r, _)| r.id == "node-s").unwrap().1
    }
    assert_eq!(state(&s).await, NodeState::Online);
    s.set_storage_ok(false).await.unwrap();
    let other = Etcd::connect(std::slice::from_ref(&e.url), "node-t").await.unwrap();
    assert_eq!(state(&other).await, NodeState::StorageDown, "seen from another node");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(state(&other).await, NodeState::StorageDown, "the state survives lease renewals");
    s.set_storage_ok(true).await.unwrap();
    assert_eq!(state(&other).await, NodeState::Online);
    drop(s);
    let t0 = Instant::now();
    while state(&other).await != NodeState::Offline {
        assert!(t0.elapsed() < Duration::from_secs(15), "the lease of a closed store expires");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn held(s: &Etcd, node: &str) -> u64 {
    s.provisioned().await.unwrap().get(node).copied().unwrap_or(0)
}

fn placed(name: &str, size: u64, replicas: &[&str]) -> VolumeRecord {
    let replicas: Vec<String> = replicas.iter().map(|s| s.to_string()).collect();
    VolumeRecord {
        name: name.into(),
        size,
        repl: replicas.len() as u32,
        node: replicas[0].clone(),
        in_sync: replicas.clone(),
        replicas,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_each_node_holds_follows_every_engines_changes_without_listing_volumes() {
    let e = etcd();
    let a = Etcd::connect(std::slice::from_ref(&e.url), "node-a").await.unwrap();
    let b = Etcd::connect(std::slice::from_ref(&e.url), "node-b").await.unwrap();
    let gib = 1u64 << 30;
    a.create_volume(placed("v1", 10 * gib, &["node-a", "node-b"])).await.unwrap();
    // The first call lists; then a's own changes count at once.
    assert_eq!((held(&a, "node-a").await, held(&a, "node-b").await), (10 * gib, 10 * gib));
    a.create_volume(placed("v2", 5 * gib, &["node-b"])).await.unwrap();
    assert_eq!(held(&a, "node-b").await, 15 * gib, "an engine's own create counts at once");
    // Another engine's changes arrive through the watch.
    assert_eq!(held(&b, "node-b").await, 15 * gib);
    let mut v2 = a.get_volume("v2").await.unwrap().unwrap();
    v2.replicas = vec!["node-a".into()];
    a.update_volume(&v2).await.unwrap();
    a.remove_volume("v1").await.unwrap();
    let t0 = Instant::now();
    loop {
        let p = b.provisioned().await.unwrap();
        if p.get("node-a") == Some(&(5 * gib)) && p.get("node-b").copied().unwrap_or(0) == 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "node-b's store never saw node-a's changes: {p:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The same as counting every record.
    assert_eq!(
        b.provisioned().await.unwrap().into_iter().filter(|(_, v)| *v > 0).collect::<std::collections::HashMap<_, _>>(),
        strata_engine::meta::provisioned_of(&b.list_volumes().await.unwrap()).into_iter().filter(|(_, v)| *v > 0).collect()
    );
    // Listings page: 2,500 records (more than one page, and a response of them all would be
    // too large for gRPC at about 11,000) come back whole, in order.
    let many: Vec<String> = (0..2500).map(|i| format!("m{i:05}")).collect();
    futures::stream::iter(&many)
        .map(|n| a.create_volume(placed(n, gib, &["node-a"])))
        .buffer_unordered(32)
        .for_each(|r| async move {
            r.unwrap();
        })
        .await;
    let listed: Vec<String> = b.list_volumes().await.unwrap().into_iter().map(|v| v.name).filter(|n| n.starts_with('m')).collect();
    assert_eq!(listed, many);
    let t0 = Instant::now();
    while held(&b, "node-a").await != 2505 * gib {
        assert!(t0.elapsed() < Duration::from_secs(10), "the watch never counted the 2,500 volumes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The schedules' records come from the same watch: another engine's scheduled volume
    // appears, and leaves when its schedule does.
    let mut sched = placed("timed", gib, &["node-a"]);
    sched.labels.insert("snap_schedule".into(), "periodic=60,2".into());
    a.create_volume(sched).await.unwrap();
    let names = |v: Vec<VolumeRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
    let t0 = Instant::now();
    while names(b.scheduled_volumes().await.unwrap()) != ["timed"] {
        assert!(t0.elapsed() < Duration::from_secs(5), "node-b never saw the scheduled volume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut timed = a.get_volume("timed").await.unwrap().unwrap();
    timed.labels.clear();
    a.update_volume(&timed).await.unwrap();
    assert!(a.scheduled_volumes().await.unwrap().is_empty(), "an engine's own change counts at once");
    let t0 = Instant::now();
    while !b.scheduled_volumes().await.unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5), "node-b never saw the schedule go");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A create is one etcd write (ids come from a block this engine reserved).
    let before = a.revision().await;
    a.create_volume(placed("v3", gib, &["node-a"])).await.unwrap();
    assert_eq!(a.revision().await, before + 1, "one revision per create");
}
