//! The target's rules against test doubles of its legs and of the store: no process, no
//! socket, no store; each test runs in milliseconds.

use super::*;
use crate::device::mem::MemDevice;
use crate::device::BlockIo;
use crate::pool::{OpenSpec, Pool};
use crate::replication::frame::ESTALE;
use crate::replication::legs::{Change, Connector, Membership, ReplicaIo};
use async_trait::async_trait;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicUsize;

const EIO: u32 = libc::EIO as u32;
const SIZE: u64 = 16 << 20;

/// A replica on another node: remembers what it was sent, fails on demand.
#[derive(Default)]
struct FakeLeg {
    calls: Mutex<Vec<Command>>,
    /// Changes (writes, zeroes, flushes) answer EIO.
    fail: AtomicBool,
    /// Every request answers ESTALE (a newer target said hello here).
    stale: AtomicBool,
    boot: Mutex<Vec<u8>>,
    blocks: Mutex<HashMap<u64, Bytes>>,
    /// Writes at these offsets answer EIO.
    fail_at: Mutex<HashSet<u64>>,
    /// Writes at these offsets take this long to land and be answered.
    slow_at: Mutex<HashMap<u64, Duration>>,
}

impl FakeLeg {
    fn writes(&self) -> Vec<u64> {
        self.calls.lock().iter().filter_map(|c| if let Command::Write { offset, .. } = c { Some(*offset) } else { None }).collect()
    }
}

#[async_trait]
impl ReplicaIo for FakeLeg {
    async fn call(&self, _volume: u64, _epoch: u64, cmd: Command) -> Result<Vec<u8>, CallError> {
        self.calls.lock().push(cmd.clone());
        let refuse = |errno| Err(CallError::Remote { addr: "fake".into(), errno });
        if self.stale.load(Ordering::Acquire) {
            return refuse(ESTALE);
        }
        match cmd {
            Command::Hello { .. } => Ok(self.boot.lock().clone()),
            Command::Write { .. } | Command::WriteZeroes { .. } | Command::Flush if self.fail.load(Ordering::Acquire) => refuse(EIO),
            Command::Write { offset, .. } if self.fail_at.lock().contains(&offset) => refuse(EIO),
            Command::Write { offset, data, .. } => {
                let slow = self.slow_at.lock().get(&offset).copied();
                if let Some(d) = slow {
                    tokio::time::sleep(d).await;
                }
                self.blocks.lock().insert(offset, data);
                Ok(Vec::new())
            }
            Command::Read { offset, len } => Ok(self.blocks.lock().get(&offset).map(|b| b.to_vec()).unwrap_or_else(|| vec![0; len as usize])),
            _ => Ok(Vec::new()),
        }
    }
    fn is_broken(&self) -> bool {
        false
    }
}

/// Replicas by address; an address in `refused` cannot be reached.
#[derive(Default)]
struct FakeNet {
    legs: HashMap<String, Arc<FakeLeg>>,
    refused: Mutex<HashSet<String>>,
}

#[async_trait]
impl Connector for FakeNet {
    async fn connect(&self, _node: &str, addr: &str, _timeout: Duration) -> Result<Arc<dyn ReplicaIo>, CallError> {
        if self.refused.lock().contains(addr) {
            return Err(CallError::Connect(addr.into(), std::io::ErrorKind::ConnectionRefused.into()));
        }
        let leg = self.legs.get(addr).cloned().ok_or_else(|| CallError::Connect(addr.into(), std::io::ErrorKind::NotFound.into()))?;
        Ok(leg as Arc<dyn ReplicaIo>)
    }
}

/// The volume record, held here; `down` makes every store call fail.
struct FakeStore {
    rec: Mutex<VolumeRecord>,
    down: AtomicBool,
    changes: AtomicUsize,
    lease: AtomicU64,
}

#[async_trait]
impl Membership for FakeStore {
    async fn record(&self, _name: &str) -> Result<Option<VolumeRecord>, MetaError> {
        if self.down.load(Ordering::Acquire) {
            return Err(MetaError::Store("store down".into()));
        }
        Ok(Some(self.rec.lock().clone()))
    }
    async fn change(&self, _name: &str, epoch: u64, change: Change) -> Result<Option<VolumeRecord>, MetaError> {
        if self.down.load(Ordering::Acquire) {
            return Err(MetaError::Store("store down".into()));
        }
        let mut rec = self.rec.lock();
        if rec.epoch != epoch {
            return Ok(None);
        }
        change(&mut rec);
        rec.revision += 1;
        self.changes.fetch_add(1, Ordering::AcqRel);
        Ok(Some(rec.clone()))
    }
    fn lease_generation(&self) -> u64 {
        self.lease.load(Ordering::Acquire)
    }
    fn reachable(&self) -> bool {
        !self.down.load(Ordering::Acquire)
    }
    async fn replication_address(&self, node: &str) -> Option<String> {
        Some(format!("{node}:1"))
    }
    async fn is_offline(&self, _node: &str) -> bool {
        false
    }
}

/// A repl=3 volume targeted here (node-1, whose replica is local) with fake replicas on
/// node-2 and node-3.
struct Rig {
    local: Arc<Local>,
    store: Arc<FakeStore>,
    net: Arc<FakeNet>,
    dir: std::path::PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Rig {
    fn new() -> Rig {
        let dev: Arc<dyn BlockIo> = Arc::new(MemDevice::new(64 << 20));
        let spec = OpenSpec { expected: None, force_format: false, extent_size: 1 << 20, check_only: false };
        let pool = Arc::new(Pool::open(vec![("mem".into(), dev)], &spec).expect("pool"));
        let local = Arc::new(Local::new(pool, Arc::new(crate::alerts::Alerts::in_memory("node-1")), "node-1"));
        let nodes: Vec<String> = ["node-1", "node-2", "node-3"].map(String::from).to_vec();
        let rec = VolumeRecord {
            id: 7,
            name: "v".into(),
            size: SIZE,
            repl: 3,
            node: "node-1".into(),
            replicas: nodes.clone(),
            in_sync: nodes,
            target: "node-1".into(),
            epoch: 2,
            ..Default::default()
        };
        let store =
            Arc::new(FakeStore { rec: Mutex::new(rec), down: AtomicBool::new(false), changes: AtomicUsize::new(0), lease: AtomicU64::new(0) });
        let mut net = FakeNet::default();
        for n in ["node-2", "node-3"] {
            net.legs.insert(format!("{n}:1"), Arc::new(FakeLeg::default()));
        }
        let dir = std::env::temp_dir().join(format!("strata-target-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Rig { local, store, net: Arc::new(net), dir }
    }

    fn leg(&self, node: &str) -> &FakeLeg {
        &self.net.legs[&format!("{node}:1")]
    }

    fn in_sync(&self) -> Vec<String> {
        self.store.rec.lock().in_sync.clone()
    }

    async fn start(&self) -> Result<Arc<Target>, TargetError> {
        let rec = self.store.rec.lock().clone();
        let addrs = rec.replicas.iter().map(|n| (n.clone(), format!("{n}:1"))).collect();
        let vol = Arc::new(Replica::new(rec.id, &rec.name, rec.size, rec.epoch, false));
        let links = Links { membership: self.store.clone(), connector: self.net.clone() };
        let cfg = TargetConfig { timeout: Duration::from_secs(1), resync_rate: 0, replica_timeout: Duration::ZERO, data_dir: self.dir.clone() };
        Target::start(vol, &rec, "node-1", &addrs, links, &cfg, false).await
    }

    async fn write(&self, t: &Target, off: u64, byte: u8) -> Result<(), IoError> {
        let mut buf = self.local.buffer(4096);
        buf.fill(byte);
        t.write(&self.local, off, buf, false, true).await
    }
}

fn peer<'a>(t: &'a Target, node: &str) -> &'a Arc<Peer> {
    t.peers.iter().find(|p| p.node == node).expect("a peer")
}

#[tokio::test]
async fn a_write_reaches_every_in_sync_replica_and_this_nodes_copy() {
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    rig.write(&t, 8192, 0xab).await.expect("write");
    assert_eq!(rig.leg("node-2").writes(), vec![8192]);
    assert_eq!(rig.leg("node-3").writes(), vec![8192]);
    let got = rig.local.read_local(&t.vol, 8192, 4096).await.expect("local read");
    assert!(got.bytes().iter().all(|b| *b == 0xab));
    assert_eq!(rig.store.changes.load(Ordering::Acquire), 0, "unchanged membership needs no store call");
}

#[tokio::test]
async fn a_failed_replica_leaves_the_in_sync_set_before_the_write_is_acknowledged() {
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    rig.leg("node-3").fail.store(true, Ordering::Release);
    rig.write(&t, 0, 1).await.expect("the write succeeds on the others");
    assert_eq!(rig.in_sync(), vec!["node-1", "node-2"]);
    assert_eq!(peer(&t, "node-3").state(), PeerState::OutOfSync);
    assert!(peer(&t, "node-3").dirty.contains(0), "the missed range is recorded");
    assert_eq!(rig.store.changes.load(Ordering::Acquire), 1);
}

#[tokio::test]
async fn an_out_of_sync_replica_gets_no_writes_and_its_misses_are_recorded() {
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    rig.leg("node-3").fail.store(true, Ordering::Release);
    rig.write(&t, 0, 1).await.expect("write");
    let region = crate::replication::dirty::REGION;
    rig.write(&t, 5 * region, 2).await.expect("write");
    assert_eq!(rig.leg("node-3").writes(), vec![0], "no write after it left");
    assert_eq!(rig.leg("node-2").writes(), vec![0, 5 * region]);
    assert!(peer(&t, "node-3").dirty.contains(5), "the later write is recorded as missed");
    assert_eq!(rig.store.changes.load(Ordering::Acquire), 1, "it is recorded out once");
}

#[tokio::test]
async fn a_write_whose_membership_change_cannot_be_recorded_is_not_acknowledged() {
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    rig.store.down.store(true, Ordering::Release);
    rig.leg("node-2").fail.store(true, Ordering::Release);
    let err = rig.write(&t, 0, 1).await.expect_err("a replica missed it and the store cannot say so");
    assert!(err.to_string().contains("store down"), "{err}");
    // Once the store is back, the next write records the replica out and is acknowledged.
    rig.store.down.store(false, Ordering::Release);
    rig.write(&t, 4096, 1).await.expect("write");
    assert_eq!(rig.in_sync(), vec!["node-1", "node-3"]);
}

#[tokio::test]
async fn writes_go_on_through_a_store_outage_while_membership_is_unchanged() {
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    rig.store.down.store(true, Ordering::Release);
    for i in 0..8 {
        rig.write(&t, i * 4096, i as u8).await.expect("write during the outage");
    }
    t.flush(&rig.local).await.expect("flush during the outage");
    assert_eq!(rig.leg("node-2").writes().len(), 8);
}

#[tokio::test]
async fn a_replica_that_saw_a_newer_epoch_fences_the_target() {
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    rig.leg("node-2").stale.store(true, Ordering::Release);
    let err = rig.write(&t, 0, 1).await.expect_err("fenced");
    assert!(t.is_fenced(), "{err}");
    assert_eq!(rig.in_sync().len(), 3, "a stale answer is not a failed replica");
    let sent = rig.leg("node-3").calls.lock().len();
    rig.write(&t, 4096, 1).await.expect_err("still fenced");
    assert_eq!(rig.leg("node-3").calls.lock().len(), sent, "a fenced target sends nothing");
}

#[tokio::test]
async fn a_takeover_in_the_record_fences_the_target_at_its_next_membership_change() {
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    {
        let mut rec = rig.store.rec.lock();
        rec.epoch = 3;
        rec.target = "node-2".into();
    }
    rig.leg("node-3").fail.store(true, Ordering::Release);
    rig.write(&t, 0, 1).await.expect_err("the record moved on: no membership change at an old epoch");
    assert!(t.is_fenced());
    assert_eq!(rig.store.changes.load(Ordering::Acquire), 0);
    assert_eq!(rig.in_sync().len(), 3);
}

#[tokio::test]
async fn after_a_lease_lapse_the_record_is_reread_and_a_takeover_fences() {
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    rig.write(&t, 0, 1).await.expect("write");
    rig.store.rec.lock().target = "node-2".into();
    rig.store.rec.lock().epoch = 3;
    // The record is not read while the lease holds.
    rig.write(&t, 0, 1).await.expect("write");
    rig.store.lease.fetch_add(1, Ordering::AcqRel);
    rig.write(&t, 0, 1).await.expect_err("re-read after the lapse: taken over");
    assert!(t.is_fenced());
}

#[tokio::test]
async fn after_a_lease_lapse_an_unchanged_record_keeps_serving() {
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    rig.store.lease.fetch_add(1, Ordering::AcqRel);
    rig.write(&t, 0, 1).await.expect("the record still names this target");
    assert!(!t.is_fenced());
}

#[tokio::test]
async fn start_records_an_unreachable_replica_out_of_sync() {
    let rig = Rig::new();
    rig.net.refused.lock().insert("node-2:1".into());
    let t = rig.start().await.expect("target with two of three replicas");
    assert_eq!(rig.in_sync(), vec!["node-1", "node-3"]);
    assert_eq!(peer(&t, "node-2").state(), PeerState::OutOfSync);
    rig.write(&t, 0, 1).await.expect("write");
    assert!(peer(&t, "node-2").dirty.contains(0));
}

#[tokio::test]
async fn start_without_any_in_sync_replica_fails() {
    let rig = Rig::new();
    rig.store.rec.lock().in_sync.retain(|n| n != "node-1");
    rig.net.refused.lock().extend(["node-2:1".to_string(), "node-3:1".to_string()]);
    match rig.start().await {
        Err(TargetError::NoReplica(_)) => {}
        other => panic!("expected NoReplica, got {:?}", other.err()),
    }
}

#[tokio::test]
async fn start_is_refused_when_a_replica_already_saw_a_newer_epoch() {
    let rig = Rig::new();
    rig.leg("node-3").stale.store(true, Ordering::Release);
    match rig.start().await {
        Err(TargetError::Call(c)) if c.is_stale() => {}
        other => panic!("expected a stale refusal, got {:?}", other.err()),
    }
    assert_eq!(rig.in_sync().len(), 3, "the refusing replica is not recorded out");
}

#[tokio::test]
async fn a_replica_whose_node_rebooted_is_due_a_full_rebuild_at_resync() {
    let rig = Rig::new();
    *rig.leg("node-3").boot.lock() = b"boot-a".to_vec();
    let t = rig.start().await.expect("target");
    let p = peer(&t, "node-3").clone();
    assert!(!p.full_rebuild.load(Ordering::Acquire));
    *rig.leg("node-3").boot.lock() = b"boot-b".to_vec();
    t.connect(&p, SIZE).await.expect("hello");
    assert!(p.full_rebuild.load(Ordering::Acquire), "a new boot id: writes it had not flushed may be gone");
}

#[tokio::test]
async fn reads_without_a_local_copy_come_from_an_in_sync_replica() {
    let rig = Rig::new();
    rig.store.rec.lock().in_sync.retain(|n| n != "node-1");
    let t = rig.start().await.expect("target");
    assert!(!t.local);
    rig.write(&t, 4096, 9).await.expect("write");
    let got = t.read_remote(&rig.local, 4096, 4096).await.expect("read");
    assert!(got.bytes().iter().all(|b| *b == 9));
}

#[tokio::test]
async fn a_resync_batch_with_a_failed_copy_returns_only_once_its_other_copies_have_landed() {
    // A copy abandoned in flight still reaches the replica; landing after the region lock is
    // released it could overwrite a newer client write with older data.
    let rig = Rig::new();
    let t = rig.start().await.expect("target");
    let region = crate::replication::dirty::REGION;
    rig.write(&t, 0, 1).await.expect("write");
    rig.write(&t, 8 * region, 2).await.expect("write");
    let p = peer(&t, "node-3").clone();
    p.dirty.mark_mem(0, 4096);
    p.dirty.mark_mem(8 * region, 4096);
    p.set_state(PeerState::CatchingUp);
    let leg = rig.leg("node-3");
    leg.blocks.lock().clear();
    leg.slow_at.lock().insert(0, Duration::from_millis(300));
    leg.fail_at.lock().insert(8 * region);
    let host = crate::replication::Host { local: rig.local.clone(), replacements: None };
    let res = crate::replication::resync::copy_batch(&host, &t, &p, &[0, 8]).await;
    assert!(res.is_err(), "one copy failed");
    assert!(leg.blocks.lock().contains_key(&0), "the slow copy landed before the batch let go of the region lock");
    assert!(p.dirty.contains(0) && p.dirty.contains(8), "a failed batch leaves its regions to copy again");
}
