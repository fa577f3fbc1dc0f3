//! In-process clusters for tests: engines on in-memory devices (`device::mem`), sharing one
//! in-memory metadata store (`meta::mem`), each serving replication on a loopback port of its
//! own. No processes and no disks: a test of attach, membership or the lifecycle runs in
//! milliseconds, and faults (a replica's EIO, a store outage, CAS conflicts, a node that reads
//! offline) are switched on by the test.

use crate::device::mem::{Faults, Faulty, MemDevice};
use crate::device::BlockIo;
use crate::meta::mem::MemStore;
use crate::pool::{OpenSpec, Pool};
use crate::volume::{NodeInfo, Service};
use std::sync::Arc;
use std::time::Duration;

/// Size of each node's in-memory device.
pub const DEVICE_SIZE: u64 = 256 << 20;

pub struct TestNode {
    pub engine: Arc<Service>,
    /// This node's handle on the shared store.
    pub store: MemStore,
    /// Faults of this node's device (data path).
    pub faults: Arc<Faults>,
    server: tokio::task::JoinHandle<()>,
    data_dir: std::path::PathBuf,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

pub struct TestCluster {
    pub nodes: Vec<TestNode>,
    /// The shared store, as no node in particular sees it (faults set here apply to all).
    pub store: MemStore,
    /// The cluster CA (`security::init_ca`): every node's replication is mutual TLS under it.
    pub ca_dir: std::path::PathBuf,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.ca_dir);
    }
}

impl TestCluster {
    /// `n` engines, `node-1` .. `node-n`, each with one in-memory device.
    pub async fn start(n: usize) -> TestCluster {
        let store = MemStore::new("test");
        let ca_dir = std::env::temp_dir().join(format!("strata-test-ca-{}", uuid::Uuid::new_v4()));
        crate::security::init_ca(&ca_dir).expect("a test CA");
        let mut nodes = Vec::new();
        for i in 1..=n {
            nodes.push(TestNode::start(&store, &format!("node-{i}"), &ca_dir).await);
        }
        TestCluster { nodes, store, ca_dir }
    }

    /// A TLS identity for node `id` signed by the cluster CA (a node that is not in the
    /// cluster, or another node's, for tests of what a replica refuses).
    pub fn identity(&self, id: &str) -> Arc<crate::security::Tls> {
        issue_identity(&self.ca_dir, id, &self.ca_dir.join(id))
    }

    /// The engine of node `i` (0-based).
    pub fn engine(&self, i: usize) -> &Arc<Service> {
        &self.nodes[i].engine
    }
}

/// Signs a certificate for node `id` with the CA in `ca_dir` into `dir`, and loads it.
fn issue_identity(ca_dir: &std::path::Path, id: &str, dir: &std::path::Path) -> Arc<crate::security::Tls> {
    crate::security::issue(ca_dir, id, &[], dir).expect("a test certificate");
    Arc::new(crate::security::Tls::load(dir).expect("the test certificate loads"))
}

impl TestNode {
    /// This node's `--tls-dir` (ca.crt, node.crt, node.key).
    pub fn tls_dir(&self) -> std::path::PathBuf {
        self.data_dir.join("tls")
    }

    async fn start(shared: &MemStore, id: &str, ca_dir: &std::path::Path) -> TestNode {
        let store = shared.node(id);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let node = NodeInfo {
            id: id.to_string(),
            hostname: id.to_string(),
            repl_address: listener.local_addr().expect("bound").to_string(),
            ..Default::default()
        };
        let dev = Arc::new(Faulty::new(Arc::new(MemDevice::new(DEVICE_SIZE))));
        let faults = dev.faults.clone();
        let spec = OpenSpec { expected: None, force_format: false, extent_size: 1 << 20, check_only: false };
        let devs: Vec<(String, Arc<dyn BlockIo>)> = vec![(format!("mem:{id}"), dev)];
        let pool = Pool::open(devs, &spec).expect("a new pool on a memory device");
        let alerts = crate::alerts::Alerts::in_memory(id);
        let mut engine = Service::new(Arc::new(pool), Arc::new(store.clone()), node, alerts).await.expect("engine");
        let data_dir = std::env::temp_dir().join(format!("strata-test-{}-{id}", uuid::Uuid::new_v4()));
        engine.repl.data_dir = data_dir.clone();
        engine.repl.timeout = Duration::from_secs(1);
        engine.use_tls(issue_identity(ca_dir, id, &data_dir.join("tls")));
        // Cloud credentials can be kept (the key every test node shares).
        engine.cloud_key = Some(crate::cloudsnap::credentials::sealing_key(b"the in-process test cluster's secret"));
        let engine = engine.into_shared();
        let bounds = crate::replication::server::Bounds { requests: 512, bytes: 128 << 20 };
        let server = tokio::spawn(crate::replication::server::serve(listener, engine.clone(), bounds, engine.tls.clone()));
        TestNode { engine, store, faults, server, data_dir }
    }
}
