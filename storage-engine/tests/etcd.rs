//! The etcd metadata store against a real etcd (Debian's etcd-server) on loopback.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata_engine::meta::etcd::Etcd;
use strata_engine::meta::{MetaError, MetaStore, VolumeRecord};

struct EtcdProc {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn etcd() -> EtcdProc {
    let dir = tempdir();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian package etcd-server) is installed");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "etcd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    EtcdProc { child, url, _dir: dir }
}

fn rec(name: &str) -> VolumeRecord {
    VolumeRecord { id: 0, name: name.into(), size: 1 << 30, repl: 1, labels: Default::default(), created_unix: 0, revision: 0, pending: None, qos: Default::default() }
}

#[test]
fn volume_records_are_created_once_and_changed_only_by_compare_and_swap() {
    let e = etcd();
    let s = Etcd::connect(std::slice::from_ref(&e.url), "node-a").unwrap();
    let a = s.create_volume(rec("a")).unwrap();
    let b = s.create_volume(rec("b")).unwrap();
    assert!(b.id > a.id);
    assert!(matches!(s.create_volume(rec("a")), Err(MetaError::AlreadyExists(_))));
    let mut grown = a.clone();
    grown.size *= 2;
    let stored = s.update_volume(&grown).unwrap();
    assert_eq!(stored.revision, a.revision + 1);
    assert!(matches!(s.update_volume(&grown), Err(MetaError::Conflict(_))), "a stale revision is refused");
    // A second store (another engine) sees the same records and cluster id.
    let s2 = Etcd::connect(std::slice::from_ref(&e.url), "node-b").unwrap();
    assert_eq!(s2.get_volume("a").unwrap().unwrap().size, 2 << 30);
    assert_eq!(s.cluster_id().unwrap(), s2.cluster_id().unwrap());
    assert!(!s.cluster_id().unwrap().is_empty());
    // Concurrent creations from both stores never share an id.
    let h: Vec<_> = (0..2)
        .map(|i| {
            let url = e.url.clone();
            std::thread::spawn(move || {
                let s = Etcd::connect(&[url], "n").unwrap();
                (0..10).map(|j| s.create_volume(rec(&format!("c{i}-{j}"))).unwrap().id).collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut ids: Vec<u64> = h.into_iter().flat_map(|t| t.join().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20);
    s.remove_volume("b").unwrap();
    assert!(matches!(s.remove_volume("b"), Err(MetaError::NotFound(_))));
    assert_eq!(s.list_volumes().unwrap().len(), 21);
    assert!(s.get_pool().unwrap().is_none(), "pool records are per node");
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
    let s = Etcd::connect(std::slice::from_ref(&e.url), "probe").unwrap();
    assert_eq!(s.get_volume("kept").unwrap().unwrap().size, 32 << 20);
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
