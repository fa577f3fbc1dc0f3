//! Metadata in etcd, for clusters of several engines. Keys live under `/strata/v1/`:
//! `cluster_id`, `pools/<node>`, `volumes/<name>`, `next_volume_id` (the first id no engine has
//! reserved; each reserves ids in blocks). Every volume change is a
//! compare-and-swap transaction: creation requires the key to be absent, an update requires the
//! stored record to be exactly the one the caller read (its revision is part of it).
//!
//! Calls go through etcd's async client on the caller's runtime, each bounded by a timeout.
//! These are control-plane calls (create, update, delete, list), never on the data path.

use super::{MetaError, MetaStore, NodeRecord, NodeState, VolumeRecord};
use crate::pool::PoolRecord;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub const PREFIX: &str = "/strata/v1/";
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct Etcd {
    client: Client,
    node: String,
    /// Seconds a node stays alive without renewing its lease.
    ttl: i64,
    /// This node's lease and the state its alive key carries (shared with the renewal task).
    live: Arc<parking_lot::Mutex<Live>>,
    /// The lease renewal task (from `register_node`), stopped with the store.
    renewal: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// What placement and the schedules read of the volumes: listed once, then kept by a watch.
    index: Arc<parking_lot::Mutex<VolumeIndex>>,
    /// Serializes starting that watch.
    index_start: tokio::sync::Mutex<()>,
    /// Volume ids this store may give: [next, end).
    id_block: parking_lot::Mutex<(u64, u64)>,
    /// Serializes taking a new block.
    id_block_take: tokio::sync::Mutex<()>,
}

/// Keys per page of a listing.
const PAGE: i64 = 1000;

/// Volume ids an engine reserves at once.
const ID_BLOCK: u64 = 64;

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(t) = self.renewal.lock().take() {
            t.abort();
        }
        if let Some(t) = self.index.lock().watch.take() {
            t.abort();
        }
    }
}

/// What is read of the volumes most often, kept current by a watch of `volumes/` (placement and
/// the schedules would otherwise list every volume again and again): per node, the sizes of the
/// volumes it holds replicas of, and the scheduled records whole.
#[derive(Default)]
struct VolumeIndex {
    /// Volume key → (size, replica nodes).
    vols: std::collections::HashMap<Vec<u8>, (u64, Vec<String>)>,
    per_node: std::collections::HashMap<String, u64>,
    /// The records the schedules read (`super::is_scheduled`), whole.
    scheduled: std::collections::HashMap<Vec<u8>, VolumeRecord>,
    /// The watch; None: not started, or it ended (the next call lists again).
    watch: Option<tokio::task::JoinHandle<()>>,
}

impl VolumeIndex {
    /// Records volume `k` as stored now (None: deleted, or unreadable).
    fn set(&mut self, k: Vec<u8>, rec: Option<VolumeRecord>) {
        self.scheduled.remove(&k);
        let now = rec.map(|rec| {
            let nodes: Vec<String> = super::replica_nodes(&rec).iter().filter(|n| !n.is_empty()).cloned().collect();
            let size = rec.size;
            if super::is_scheduled(&rec) {
                self.scheduled.insert(k.clone(), rec);
            }
            (size, nodes)
        });
        if let Some((size, nodes)) = self.vols.remove(&k) {
            for n in nodes {
                if let Some(p) = self.per_node.get_mut(&n) {
                    *p = p.saturating_sub(size);
                }
            }
        }
        if let Some((size, nodes)) = now {
            for n in &nodes {
                *self.per_node.entry(n.clone()).or_insert(0) += size;
            }
            self.vols.insert(k, (size, nodes));
        }
    }
}

/// A stored volume record (None: unreadable, counted as nothing).
fn stored_record(value: &[u8]) -> Option<VolumeRecord> {
    serde_json::from_slice(value).ok()
}

/// Follows `volumes/` from `rev` into `cache` until the watch ends (compaction, etcd away).
async fn follow_volumes(mut client: Client, rev: i64, cache: Arc<parking_lot::Mutex<VolumeIndex>>) {
    let opts = etcd_client::WatchOptions::new().with_prefix().with_start_revision(rev);
    let ended = match client.watch(key("volumes/"), Some(opts)).await {
        Ok((_watcher, mut stream)) => loop {
            match stream.message().await {
                Ok(Some(resp)) if !resp.canceled() => {
                    let mut c = cache.lock();
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let now = match ev.event_type() {
                            etcd_client::EventType::Put => stored_record(kv.value()),
                            etcd_client::EventType::Delete => None,
                        };
                        c.set(kv.key().to_vec(), now);
                    }
                }
                Ok(Some(resp)) => break format!("canceled: {} (compacted to {})", resp.cancel_reason(), resp.compact_revision()),
                Ok(None) => break "closed".to_string(),
                Err(e) => break e.to_string(),
            }
        },
        Err(e) => e.to_string(),
    };
    tracing::debug!("the watch of volumes ended ({ended}); the next look lists them again");
    cache.lock().watch = None;
}

fn err<E: std::fmt::Display>(e: E) -> MetaError {
    MetaError::Store(format!("etcd: {e}"))
}

fn key(rest: &str) -> String {
    format!("{PREFIX}{rest}")
}

/// An etcd call, bounded (the client's own timeout covers one request; this covers retries).
async fn bounded<T>(fut: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T, MetaError> {
    tokio::time::timeout(TIMEOUT * 2, fut).await.map_err(|_| err("timed out"))?.map_err(err)
}

/// TLS to etcd: the CA of its server certificate and, for etcd's --client-cert-auth, this
/// client's certificate and key (PEM).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Etcd {
    /// Connects to etcd (`http://host:port`, comma-separated for several). `node` names this
    /// engine's pool record.
    pub async fn connect(endpoints: &[String], node: &str) -> Result<Etcd, MetaError> {
        Self::connect_with_ttl(endpoints, node, 10).await
    }

    pub async fn connect_with_ttl(endpoints: &[String], node: &str, ttl: i64) -> Result<Etcd, MetaError> {
        Self::connect_with(endpoints, node, ttl, None).await
    }

    /// `connect_with_ttl` over TLS when `tls` is given (https:// endpoints).
    pub async fn connect_with(endpoints: &[String], node: &str, ttl: i64, tls: Option<&EtcdTls>) -> Result<Etcd, MetaError> {
        let at = |e: MetaError| MetaError::Store(format!("etcd at {}: {e}", endpoints.join(",")));
        let mut opts = etcd_client::ConnectOptions::new().with_connect_timeout(TIMEOUT).with_timeout(TIMEOUT);
        if let Some(t) = tls {
            let mut o = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&t.ca));
            if let Some((cert, key)) = &t.identity {
                o = o.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(o);
        }
        let client = bounded(Client::connect(endpoints.to_vec(), Some(opts))).await.map_err(at)?;
        let live = Arc::new(parking_lot::Mutex::new(Live { lease: 0, state: NodeState::Online, renewed: std::time::Instant::now(), generation: 0 }));
        let s = Etcd {
            client,
            node: node.to_string(),
            ttl: ttl.max(1),
            live,
            renewal: parking_lot::Mutex::new(None),
            index: Default::default(),
            index_start: Default::default(),
            id_block: Default::default(),
            id_block_take: Default::default(),
        };
        // Fail now, with the endpoint in the message, if etcd does not answer.
        let id = uuid::Uuid::new_v4().to_string();
        let k = key("cluster_id");
        let txn = Txn::new().when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(k, id, None)]);
        bounded(s.client.clone().txn(txn)).await.map_err(at)?;
        Ok(s)
    }

    /// A volume id never given before: from this store's block of ids, taking the next block
    /// (ID_BLOCK ids, one compare-and-swap on the cluster's counter) when it is used up. Engines
    /// creating volumes at once thus rarely contend for the counter; ids stay unique, and grow
    /// within one engine.
    async fn next_volume_id(&self) -> Result<u64, MetaError> {
        let _one = self.id_block_take.lock().await;
        {
            let mut b = self.id_block.lock();
            if b.0 < b.1 {
                b.0 += 1;
                return Ok(b.0 - 1);
            }
        }
        let counter = key("next_volume_id");
        loop {
            let cur = self.get(counter.clone()).await?;
            let first: u64 = match &cur {
                Some(b) => String::from_utf8_lossy(b).parse().map_err(err)?,
                None => 1,
            };
            let cmp = match cur {
                Some(b) => Compare::value(counter.clone(), CompareOp::Equal, b),
                None => Compare::create_revision(counter.clone(), CompareOp::Equal, 0),
            };
            let end = first + ID_BLOCK;
            if self.txn(Txn::new().when([cmp]).and_then([TxnOp::put(counter.clone(), end.to_string(), None)])).await? {
                *self.id_block.lock() = (first + 1, end);
                return Ok(first);
            }
        }
    }

    /// Every key and value under `prefix` (a full key), read in pages of PAGE keys at one
    /// revision (one response of every volume would pass gRPC's 4 MiB message limit at about
    /// 11,000 volumes); with that revision.
    async fn range(&self, prefix: &str) -> Result<(Vec<(Vec<u8>, Vec<u8>)>, i64), MetaError> {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        let (mut from, mut rev, mut out) = (prefix.as_bytes().to_vec(), 0, Vec::new());
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if rev != 0 {
                opts = opts.with_revision(rev);
            }
            let resp = bounded(self.client.clone().get(from.clone(), Some(opts))).await?;
            if rev == 0 {
                rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            out.extend(resp.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())));
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, rev)),
            }
        }
    }

    /// etcd's current revision (one per write transaction).
    pub async fn revision(&self) -> i64 {
        let resp = bounded(self.client.clone().get(key("cluster_id"), None)).await;
        resp.ok().and_then(|r| r.header().map(|h| h.revision())).unwrap_or(0)
    }

    /// Makes sure the watch-kept index of volumes runs: a paged listing, then a watch from
    /// its revision (again after the watch ended).
    async fn follow(&self) -> Result<(), MetaError> {
        let _one = self.index_start.lock().await;
        if self.index.lock().watch.as_ref().is_some_and(|w| !w.is_finished()) {
            return Ok(());
        }
        let (kvs, rev) = self.range(&key("volumes/")).await?;
        let mut fresh = VolumeIndex::default();
        for (k, v) in kvs {
            let rec = stored_record(&v);
            fresh.set(k, rec);
        }
        *self.index.lock() = fresh;
        let watch = tokio::spawn(follow_volumes(self.client.clone(), rev + 1, self.index.clone()));
        self.index.lock().watch = Some(watch);
        Ok(())
    }

    /// This engine's own change to volume key `k` (None: removed), counted at once (the watch
    /// brings the same a moment later), so its next placement sees it.
    fn note_volume(&self, k: &str, value: Option<&[u8]>) {
        let mut c = self.index.lock();
        if c.watch.is_some() {
            c.set(k.as_bytes().to_vec(), value.and_then(stored_record));
        }
    }

    async fn get(&self, k: String) -> Result<Option<Vec<u8>>, MetaError> {
        let resp = bounded(self.client.clone().get(k, None)).await?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    async fn txn(&self, txn: Txn) -> Result<bool, MetaError> {
        Ok(bounded(self.client.clone().txn(txn)).await?.succeeded())
    }

    async fn put(&self, k: String, v: impl Into<Vec<u8>>, opts: Option<etcd_client::PutOptions>) -> Result<(), MetaError> {
        bounded(self.client.clone().put(k, v, opts)).await.map(|_| ())
    }
}

pub(crate) struct Live {
    lease: i64,
    state: NodeState,
    /// When etcd last confirmed the lease.
    renewed: std::time::Instant,
    /// Leases granted after the first (each one follows a lapse).
    generation: u64,
}

/// Renews the node's lease every third of its TTL; after a failure (etcd away, lease expired)
/// grants a new lease and rebinds the alive key with the node's current state.
async fn keep_alive(mut c: Client, alive: String, ttl: i64, live: Arc<parking_lot::Mutex<Live>>) {
    let period = Duration::from_millis((ttl as u64 * 1000 / 3).max(200));
    loop {
        let lease = live.lock().lease;
        let ok = match c.lease_keep_alive(lease).await {
            Ok((mut keeper, mut stream)) => loop {
                tokio::time::sleep(period).await;
                if keeper.keep_alive().await.is_err() {
                    break false;
                }
                match stream.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => live.lock().renewed = std::time::Instant::now(),
                    _ => break false,
                }
            },
            Err(_) => false,
        };
        if !ok {
            tokio::time::sleep(period).await;
            if let Ok(l) = c.lease_grant(ttl, None).await {
                let state = live.lock().state;
                if c.put(alive.clone(), state.as_str(), Some(etcd_client::PutOptions::new().with_lease(l.id()))).await.is_ok() {
                    let mut live = live.lock();
                    live.lease = l.id();
                    live.renewed = std::time::Instant::now();
                    live.generation += 1;
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl MetaStore for Etcd {
    async fn get_pool(&self) -> Result<Option<PoolRecord>, MetaError> {
        self.get(key(&format!("pools/{}", self.node))).await?.map(|b| serde_json::from_slice(&b).map_err(err)).transpose()
    }

    async fn put_pool(&self, rec: &PoolRecord) -> Result<(), MetaError> {
        self.put(key(&format!("pools/{}", self.node)), serde_json::to_vec(rec).map_err(err)?, None).await
    }

    async fn create_volume(&self, mut rec: VolumeRecord) -> Result<VolumeRecord, MetaError> {
        rec.id = self.next_volume_id().await?;
        rec.revision = 1;
        let k = key(&format!("volumes/{}", rec.name));
        let v = serde_json::to_vec(&rec).map_err(err)?;
        let absent = Compare::create_revision(k.clone(), CompareOp::Equal, 0);
        if !self.txn(Txn::new().when([absent]).and_then([TxnOp::put(k.clone(), v.clone(), None)])).await? {
            return Err(MetaError::AlreadyExists(rec.name));
        }
        self.note_volume(&k, Some(&v));
        Ok(rec)
    }

    async fn get_volume(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError> {
        self.get(key(&format!("volumes/{name}"))).await?.map(|b| serde_json::from_slice(&b).map_err(err)).transpose()
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        let (kvs, _) = self.range(&key("volumes/")).await?;
        kvs.iter().map(|(_, v)| serde_json::from_slice(v).map_err(err)).collect()
    }

    async fn list_volumes_page(&self, after: &str, limit: usize) -> Result<Vec<VolumeRecord>, MetaError> {
        let prefix = key("volumes/");
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        // Keys sort as their names do (one prefix): the page starts just past `after`.
        let mut from = format!("{prefix}{after}").into_bytes();
        if !after.is_empty() {
            from.push(0);
        }
        let opts = GetOptions::new().with_range(end).with_limit(limit.clamp(1, i64::MAX as usize) as i64);
        let resp = bounded(self.client.clone().get(from, Some(opts))).await?;
        resp.kvs().iter().map(|kv| serde_json::from_slice(kv.value()).map_err(err)).collect()
    }

    async fn provisioned(&self) -> Result<std::collections::HashMap<String, u64>, MetaError> {
        self.follow().await?;
        Ok(self.index.lock().per_node.clone())
    }

    async fn scheduled_volumes(&self) -> Result<Vec<VolumeRecord>, MetaError> {
        self.follow().await?;
        Ok(self.index.lock().scheduled.values().cloned().collect())
    }

    async fn update_volume(&self, rec: &VolumeRecord) -> Result<VolumeRecord, MetaError> {
        let k = key(&format!("volumes/{}", rec.name));
        let Some(stored) = self.get(k.clone()).await? else { return Err(MetaError::NotFound(rec.name.clone())) };
        let current: VolumeRecord = serde_json::from_slice(&stored).map_err(err)?;
        if current.revision != rec.revision || current.id != rec.id {
            return Err(MetaError::Conflict(rec.name.clone()));
        }
        let mut next = rec.clone();
        next.revision += 1;
        let v = serde_json::to_vec(&next).map_err(err)?;
        if !self
            .txn(Txn::new().when([Compare::value(k.clone(), CompareOp::Equal, stored)]).and_then([TxnOp::put(k.clone(), v.clone(), None)]))
            .await?
        {
            return Err(MetaError::Conflict(rec.name.clone()));
        }
        self.note_volume(&k, Some(&v));
        Ok(next)
    }

    async fn remove_volume(&self, name: &str) -> Result<(), MetaError> {
        let k = key(&format!("volumes/{name}"));
        let resp = bounded(self.client.clone().delete(k.clone(), None)).await?;
        if resp.deleted() == 0 {
            return Err(MetaError::NotFound(name.to_string()));
        }
        self.note_volume(&k, None);
        Ok(())
    }

    async fn register_node(&self, node: &NodeRecord) -> Result<(), MetaError> {
        self.put(key(&format!("nodes/{}", node.id)), serde_json::to_vec(node).map_err(err)?, None).await?;
        let alive = key(&format!("alive/{}", node.id));
        // The first lease is granted here so registration fails loudly; renewal runs for the
        // store's life and re-grants after an outage.
        let state = self.live.lock().state;
        let lease = bounded(self.client.clone().lease_grant(self.ttl, None)).await?.id();
        self.put(alive.clone(), state.as_str(), Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
        {
            let mut live = self.live.lock();
            live.lease = lease;
            live.renewed = std::time::Instant::now();
        }
        let task = tokio::spawn(keep_alive(self.client.clone(), alive, self.ttl, self.live.clone()));
        if let Some(old) = self.renewal.lock().replace(task) {
            old.abort();
        }
        Ok(())
    }

    async fn update_node(&self, node: &NodeRecord) -> Result<(), MetaError> {
        let k = key(&format!("nodes/{}", node.id));
        let put = TxnOp::put(k.clone(), serde_json::to_vec(node).map_err(err)?, None);
        if !self.txn(Txn::new().when([Compare::create_revision(k, CompareOp::Greater, 0)]).and_then([put])).await? {
            return Err(MetaError::NodeNotFound(node.id.clone()));
        }
        Ok(())
    }

    async fn remove_node(&self, id: &str) -> Result<(), MetaError> {
        let resp = bounded(self.client.clone().delete(key(&format!("nodes/{id}")), None)).await?;
        if resp.deleted() == 0 {
            return Err(MetaError::NodeNotFound(id.to_string()));
        }
        bounded(self.client.clone().delete(key(&format!("pools/{id}")), None)).await?;
        bounded(self.client.clone().delete(key(&format!("alive/{id}")), None)).await?;
        Ok(())
    }

    async fn set_storage_ok(&self, ok: bool) -> Result<(), MetaError> {
        let (lease, state) = {
            let mut l = self.live.lock();
            l.state = if ok { NodeState::Online } else { NodeState::StorageDown };
            (l.lease, l.state)
        };
        self.put(key(&format!("alive/{}", self.node)), state.as_str(), Some(etcd_client::PutOptions::new().with_lease(lease))).await
    }

    async fn list_nodes(&self) -> Result<Vec<(NodeRecord, NodeState)>, MetaError> {
        let (nodes, _) = self.range(&key("nodes/")).await?;
        let (alive, _) = self.range(&key("alive/")).await?;
        let alive: std::collections::HashMap<String, NodeState> = alive
            .iter()
            .filter_map(|(k, v)| {
                let id = std::str::from_utf8(k).ok()?.strip_prefix(&key("alive/"))?.to_string();
                let state = if v == NodeState::StorageDown.as_str().as_bytes() { NodeState::StorageDown } else { NodeState::Online };
                Some((id, state))
            })
            .collect();
        nodes
            .iter()
            .map(|(_, v)| {
                let n: NodeRecord = serde_json::from_slice(v).map_err(err)?;
                let state = alive.get(&n.id).copied().unwrap_or(NodeState::Offline);
                Ok((n, state))
            })
            .collect()
    }

    async fn put_kv(&self, k: &str, value: &[u8]) -> Result<(), MetaError> {
        self.put(key(&format!("kv/{k}")), value.to_vec(), None).await
    }

    async fn get_kv(&self, k: &str) -> Result<Option<Vec<u8>>, MetaError> {
        self.get(key(&format!("kv/{k}"))).await
    }

    async fn list_kv(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, MetaError> {
        let base = key("kv/");
        let (kvs, _) = self.range(&format!("{base}{prefix}")).await?;
        Ok(kvs.into_iter().filter_map(|(k, v)| Some((String::from_utf8(k).ok()?.strip_prefix(&base)?.to_string(), v))).collect())
    }

    async fn delete_kv(&self, k: &str) -> Result<bool, MetaError> {
        Ok(bounded(self.client.clone().delete(key(&format!("kv/{k}")), None)).await?.deleted() > 0)
    }

    async fn cluster_id(&self) -> Result<String, MetaError> {
        Ok(self.get(key("cluster_id")).await?.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default())
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }

    /// Two thirds of the TTL without a renewal: the lease may expire before we learn more, and
    /// another node may take our volumes over after it does.
    fn lease_generation(&self) -> u64 {
        self.live.lock().generation
    }

    fn reachable(&self) -> bool {
        self.live.lock().renewed.elapsed() < Duration::from_millis(self.ttl as u64 * 2000 / 3)
    }
}
