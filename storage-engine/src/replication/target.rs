//! The volume target: the node where a replicated volume is attached. It sends every write,
//! stamped with the volume's epoch, to all in-sync replicas at once and acknowledges only when
//! all of them did. A replica that fails or times out leaves the in-sync set by a
//! compare-and-swap on the volume record before any later write is acknowledged; from then on
//! the target records the regions it misses (`dirty`) and `resync` copies them back.

use super::client::CallError;
use super::dirty::DirtyLog;
use super::frame::Command;
use super::legs::{Connector, Membership, ReplicaIo};
use crate::alerts::Severity::{Alarm, Warning};
use crate::device::AlignedBuf;
use crate::meta::{MetaError, VolumeRecord};
use crate::replica::{IoError, Local, ReadBuf, ReadData, Replica};
use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A peer a change goes to: its connection, and whether an in-flight record was made for it.
type Leg = (Arc<Peer>, Option<Arc<dyn ReplicaIo>>, bool);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PeerState {
    InSync = 0,
    OutOfSync = 1,
    /// Gets every new write (without counting for the ack) while missed regions are copied.
    CatchingUp = 2,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::InSync => "in_sync",
            PeerState::OutOfSync => "out_of_sync",
            PeerState::CatchingUp => "resyncing",
        }
    }
}

/// A remote replica as the target sees it.
pub struct Peer {
    pub node: String,
    pub addr: Mutex<String>,
    state: AtomicU8,
    /// The metadata store no longer lists this replica as in sync.
    out_recorded: AtomicBool,
    client: Mutex<Option<Arc<dyn ReplicaIo>>>,
    pub dirty: DirtyLog,
    /// No dirty record survived: the next resync copies every allocated extent.
    pub full_rebuild: AtomicBool,
    /// This target planned a full rebuild of the peer (every allocated extent recorded as
    /// missed): a rebuild the record asks for is under way or done.
    pub(super) planned_full: AtomicBool,
    /// Bytes copied by resync so far (this target's lifetime).
    pub copied: AtomicU64,
    /// Since when the peer's node reads offline (for `--replica-timeout`).
    pub(super) offline_since: Mutex<Option<std::time::Instant>>,
    /// When a rebuild elsewhere was last asked for (asked again every 30 s until it happens).
    pub(super) replace_asked: Mutex<Option<std::time::Instant>>,
    /// The replica node's boot id at the last hello: a different one on reconnect means the
    /// node rebooted, and writes it acknowledged before its last flush may be gone.
    boot: Mutex<Option<Vec<u8>>>,
}

impl Peer {
    pub fn state(&self) -> PeerState {
        match self.state.load(Ordering::Acquire) {
            0 => PeerState::InSync,
            2 => PeerState::CatchingUp,
            _ => PeerState::OutOfSync,
        }
    }
    pub(super) fn set_state(&self, s: PeerState) {
        self.state.store(s as u8, Ordering::Release);
        if s == PeerState::OutOfSync {
            self.client.lock().take();
        }
    }
    pub(super) fn set_client(&self, c: Arc<dyn ReplicaIo>) {
        *self.client.lock() = Some(c);
    }
    fn client(&self) -> Option<Arc<dyn ReplicaIo>> {
        self.client.lock().clone()
    }
    pub(super) fn client_now(&self) -> Option<Arc<dyn ReplicaIo>> {
        self.client()
    }
    /// Remembers the boot id a hello answered; true when it differs from the one before (the
    /// node rebooted in between).
    pub(super) fn rebooted(&self, boot: &[u8]) -> bool {
        self.boot.lock().replace(boot.to_vec()).is_some_and(|before| before != boot)
    }

    /// No record of what this peer misses can be trusted: the next resync rebuilds it in full.
    pub(super) async fn lose_record(self: &Arc<Self>) -> Result<(), TargetError> {
        self.full_rebuild.store(true, Ordering::Release);
        let p = self.clone();
        dirty_blocking("dropping", move || p.dirty.set_lost()).await
    }

    /// Back in the in-sync set (recorded in the metadata store by the caller).
    pub(super) fn mark_in_sync(&self) {
        self.out_recorded.store(false, Ordering::Release);
        self.state.store(PeerState::InSync as u8, Ordering::Release);
    }
}

impl From<TargetError> for IoError {
    fn from(e: TargetError) -> IoError {
        IoError::Replication(Box::new(e))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("volume {0} was taken over by another node (a newer epoch); this node no longer serves it")]
    Fenced(String),
    #[error("no in-sync replica of volume {0} is reachable")]
    NoReplica(String),
    #[error("replica: {0}")]
    Call(#[from] CallError),
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
    /// The record of regions a replica missed (in the data directory) could not be kept.
    #[error("{what} (dirty-region record): {source}")]
    DirtyLog { what: &'static str, source: std::io::Error },
}

impl TargetError {
    /// Maps a failure of the dirty-region record while doing `what`.
    pub(super) fn dirty(what: &'static str) -> impl FnOnce(std::io::Error) -> TargetError {
        move |source| TargetError::DirtyLog { what, source }
    }
}

/// Runs a blocking dirty-record step on the blocking pool.
pub(super) async fn dirty_blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, TargetError> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other).and_then(|r| r).map_err(TargetError::dirty(what))
}

pub struct Target {
    pub vol: Arc<Replica>,
    pub name: String,
    pub epoch: u64,
    pub node: String,
    /// This node holds an in-sync replica (reads are served from it).
    pub local: bool,
    pub peers: Vec<Arc<Peer>>,
    /// The volume record and where the replicas' nodes are.
    pub(super) membership: Arc<dyn Membership>,
    /// Opens connections to remote replicas.
    pub(super) connector: Arc<dyn Connector>,
    /// Serialises membership changes in the metadata store.
    membership_lock: tokio::sync::Mutex<()>,
    /// Shared by I/O; exclusive while resync copies a region or an unaligned write is applied
    /// (so every replica sees the same order).
    pub(crate) region_lock: tokio::sync::RwLock<()>,
    fenced: AtomicBool,
    closed: AtomicBool,
    pub timeout: Duration,
    /// Resync bandwidth in bytes per second while clients do I/O (an idle volume resyncs at
    /// full speed).
    pub resync_rate: u64,
    pub replica_timeout: Duration,
    /// The store's lease generation when the record was last confirmed.
    lease_gen: AtomicU64,
    /// In-sync replicas are being compared after an unclean change of target (`reconcile`).
    pub verifying: AtomicBool,
    /// Client requests admitted so far: resync sees from it whether clients are busy.
    pub(super) client_ops: AtomicU64,
}

pub struct TargetConfig {
    pub timeout: Duration,
    pub resync_rate: u64,
    /// A replica whose node stays offline this long is rebuilt on another node (zero: never).
    pub replica_timeout: Duration,
    pub data_dir: std::path::PathBuf,
}

/// What a target works through: the record's compare-and-swap and the connections to the
/// replicas (the store and TCP in the engine, test doubles in unit tests).
#[derive(Clone)]
pub struct Links {
    pub membership: Arc<dyn Membership>,
    pub connector: Arc<dyn Connector>,
}

impl Links {
    /// The metadata store and the replication protocol over TCP (mutual TLS with `tls`).
    pub fn store(meta: Arc<dyn crate::meta::MetaStore>, tls: Option<Arc<crate::security::Tls>>) -> Links {
        Links { membership: Arc::new(super::legs::Store(meta)), connector: Arc::new(super::legs::Net { tls }) }
    }
}

impl Target {
    /// Becomes the target of `rec` (already recorded with this node as target at `rec.epoch`):
    /// announces the epoch to every in-sync replica (fencing older targets) and records the ones
    /// that do not answer as out of sync. `addrs` maps node ids to replication addresses.
    /// `verify`: the previous target stopped uncleanly, so the replicas must be compared
    /// (`reconcile`, started by the caller).
    pub async fn start(
        vol: Arc<Replica>,
        rec: &VolumeRecord,
        me: &str,
        addrs: &std::collections::HashMap<String, String>,
        links: Links,
        cfg: &TargetConfig,
        verify: bool,
    ) -> Result<Arc<Target>, TargetError> {
        let mut peers = Vec::new();
        // A stale replica on this node is resynced like a remote one (over loopback).
        let stale_here = rec.has_replica(me) && !rec.is_in_sync(me);
        for n in rec.replicas.iter().filter(|n| *n != me || stale_here) {
            let (dirty, existed) = DirtyLog::open(DirtyLog::path_for(&cfg.data_dir, rec.id, n)).map_err(TargetError::dirty("opening"))?;
            let in_sync = rec.is_in_sync(n);
            // A replica the record says to rebuild (its journal was salvaged) is rebuilt in full
            // even where this node kept a record of what it missed.
            let rebuild = rec.rebuild.contains(n) && !in_sync;
            let lost = !in_sync && (!existed || rebuild);
            if lost {
                dirty.set_lost().map_err(TargetError::dirty("dropping"))?;
            }
            peers.push(Arc::new(Peer {
                node: n.clone(),
                addr: Mutex::new(addrs.get(n).cloned().unwrap_or_default()),
                state: AtomicU8::new(if in_sync { PeerState::InSync } else { PeerState::OutOfSync } as u8),
                out_recorded: AtomicBool::new(!in_sync),
                client: Mutex::new(None),
                dirty,
                full_rebuild: AtomicBool::new(lost),
                planned_full: AtomicBool::new(false),
                copied: AtomicU64::new(0),
                offline_since: Mutex::new(None),
                replace_asked: Mutex::new(None),
                boot: Mutex::new(None),
            }));
        }
        let lease_gen = AtomicU64::new(links.membership.lease_generation());
        let t = Arc::new(Target {
            lease_gen,
            verifying: AtomicBool::new(verify),
            vol,
            name: rec.name.clone(),
            epoch: rec.epoch,
            node: me.to_string(),
            local: rec.is_in_sync(me),
            peers,
            membership: links.membership,
            connector: links.connector,
            membership_lock: tokio::sync::Mutex::new(()),
            region_lock: tokio::sync::RwLock::new(()),
            fenced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            timeout: cfg.timeout,
            resync_rate: cfg.resync_rate,
            replica_timeout: cfg.replica_timeout,
            client_ops: AtomicU64::new(0),
        });
        let size = t.vol.size();
        let hellos = t.peers.iter().filter(|p| p.state() == PeerState::InSync).map(|p| {
            let t = t.clone();
            async move {
                match t.connect(p, size).await {
                    Ok(()) => Ok(()),
                    Err(e) if matches!(&e, TargetError::Call(c) if c.is_stale()) => Err(e),
                    Err(e) => {
                        tracing::warn!(volume = %t.name, replica = %p.node, "replica unreachable at attach: {e}");
                        t.peer_failed(p, None).await
                    }
                }
            }
        });
        for r in futures::future::join_all(hellos).await {
            r?;
        }
        if !t.local && !t.peers.iter().any(|p| p.state() == PeerState::InSync) {
            return Err(TargetError::NoReplica(t.name.clone()));
        }
        Ok(t)
    }

    /// Connects to a peer and announces this target's epoch and the volume size. A peer whose
    /// node rebooted since its last hello (a power cut may have taken writes it acknowledged
    /// but had not flushed, its resync copies among them) is due a full rebuild.
    pub(super) async fn connect(&self, p: &Arc<Peer>, size: u64) -> Result<(), TargetError> {
        let addr = p.addr.lock().clone();
        let c = self.connector.connect(&p.node, &addr, self.timeout).await?;
        let boot = c.call(self.vol.id, self.epoch, Command::Hello { size }).await?;
        if p.rebooted(&boot) {
            tracing::warn!(volume = %self.name, replica = %p.node, "replica node rebooted (seen at resync): writes it had not flushed may be lost; rebuilding it in full");
            p.lose_record().await?;
        }
        p.set_client(c);
        Ok(())
    }

    /// Re-establishes the connection of an in-sync peer whose connection broke (its engine
    /// restarted) before a write needs it, so an idle volume's replica stays in sync across a
    /// peer restart. A peer whose node rebooted meanwhile may have lost writes it had not
    /// flushed: it leaves the in-sync set for a full rebuild instead.
    pub(super) async fn reconnect_broken(&self) {
        for p in &self.peers {
            let broken = p.client_now().is_none_or(|c| c.is_broken());
            if p.state() != PeerState::InSync || !broken || self.is_closed() || self.is_fenced() {
                continue;
            }
            // A restarted engine may listen elsewhere: its address as it registered it.
            if let Some(a) = self.membership.replication_address(&p.node).await {
                *p.addr.lock() = a;
            }
            let addr = p.addr.lock().clone();
            let c = match self.connector.connect(&p.node, &addr, self.timeout).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(volume = %self.name, replica = %p.node, "reconnect failed: {e}");
                    continue;
                }
            };
            match c.call(self.vol.id, self.epoch, Command::Hello { size: self.vol.size() }).await {
                // A write that found the old connection broken meanwhile took the peer out of
                // sync: then resync brings it back, not this.
                Ok(_) if p.state() != PeerState::InSync => {}
                Ok(boot) if !p.rebooted(&boot) => {
                    p.set_client(c);
                    tracing::info!(volume = %self.name, replica = %p.node, "replica connection re-established");
                }
                Ok(_) => {
                    tracing::warn!(volume = %self.name, replica = %p.node, "replica node rebooted: writes it had not flushed may be lost; rebuilding it");
                    if let Err(e) = p.lose_record().await {
                        tracing::warn!(volume = %self.name, replica = %p.node, "rebooted replica: {e}");
                    }
                    if let Err(e) = self.peer_failed(p, None).await {
                        tracing::warn!(volume = %self.name, replica = %p.node, "recording the rebooted replica out of sync: {e}");
                    }
                }
                Err(e) if e.is_stale() => {
                    self.fence();
                }
                Err(e) => tracing::debug!(volume = %self.name, replica = %p.node, "hello on reconnect failed: {e}"),
            }
        }
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for p in &self.peers {
            p.client.lock().take();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Before serving I/O: not fenced, the store reachable, and after a lapse of this node's
    /// registration (another node may have taken over meanwhile) the record re-read.
    ///
    /// Fencing lives in the replicas (every leg, this node's included, refuses an epoch older
    /// than the newest it has seen), so an unreachable store does not stop I/O: while it is
    /// down the record is simply not re-read, and a takeover elsewhere still fences this target
    /// through the replicas.
    async fn admit(&self) -> Result<(), IoError> {
        self.admit_local()?;
        let gen = self.membership.lease_generation();
        if gen != self.lease_gen.load(Ordering::Acquire) && self.membership.reachable() {
            match self.membership.record(&self.name).await {
                Ok(Some(r)) if r.epoch == self.epoch && r.target == self.node => self.lease_gen.store(gen, Ordering::Release),
                Ok(_) => return Err(self.fence()),
                // Unreachable after all: checked again on the next request.
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// The epoch check of this node's own replica: refused once a newer target said hello here.
    pub(crate) fn admit_local(&self) -> Result<(), IoError> {
        self.client_ops.fetch_add(1, Ordering::Relaxed);
        if self.is_fenced() || self.vol.epoch.load(Ordering::Acquire) > self.epoch {
            return Err(self.fence());
        }
        Ok(())
    }

    fn fence(&self) -> IoError {
        if !self.fenced.swap(true, Ordering::AcqRel) {
            tracing::error!(volume = %self.name, epoch = self.epoch, "fenced: a replica has seen a newer epoch; no more I/O is served here");
        }
        IoError::from(TargetError::Fenced(self.name.clone()))
    }

    /// Peers that receive writes now, with their connections.
    fn active(&self) -> Vec<Leg> {
        self.peers.iter().filter(|p| p.state() != PeerState::OutOfSync).map(|p| (p.clone(), p.client(), false)).collect()
    }

    /// A peer failed a request (or could not be reached): it leaves the in-sync set before
    /// anything else is acknowledged, and `range` is recorded as missed.
    pub(super) async fn peer_failed(&self, p: &Arc<Peer>, range: Option<(u64, u64)>) -> Result<(), TargetError> {
        // The last copy of the acknowledged data is never dropped from the in-sync set: the
        // change fails instead (it is not acknowledged), and the replica stays in sync — what it
        // holds is what was acknowledged — to be tried again once it answers.
        let others = self.local || self.peers.iter().any(|q| !Arc::ptr_eq(q, p) && q.state() == PeerState::InSync);
        if !others && p.state() == PeerState::InSync {
            p.client.lock().take();
            tracing::warn!(volume = %self.name, replica = %p.node, "the only in-sync replica failed: the change is not acknowledged");
            return Err(TargetError::NoReplica(format!("{} (its only in-sync replica, on {}, did not answer)", self.name, p.node)));
        }
        let was = p.state();
        p.set_state(PeerState::OutOfSync);
        if was != PeerState::OutOfSync {
            tracing::warn!(volume = %self.name, replica = %p.node, "replica out of sync");
        }
        let p2 = p.clone();
        // Before the replicas were compared (`reconcile`), this one may hold a write the others
        // lack anywhere: only a full rebuild is safe, and the missing record says so.
        let unverified = self.verifying.load(Ordering::Acquire);
        if unverified {
            p.full_rebuild.store(true, Ordering::Release);
        }
        dirty_blocking("recording missed regions", move || {
            if unverified {
                return p2.dirty.set_lost();
            }
            p2.dirty.start()?;
            match range {
                Some((off, len)) => p2.dirty.mark(off, len),
                None => Ok(()),
            }
        })
        .await?;
        self.record_out(p).await
    }

    /// Makes sure the metadata store no longer lists `p` as in sync.
    async fn record_out(&self, p: &Peer) -> Result<(), TargetError> {
        if p.out_recorded.load(Ordering::Acquire) {
            return Ok(());
        }
        let _m = self.membership_lock.lock().await;
        if p.out_recorded.load(Ordering::Acquire) {
            return Ok(());
        }
        let node = p.node.clone();
        self.change_record(move |r| {
            r.in_sync.retain(|n| n != &node);
        })
        .await?;
        p.out_recorded.store(true, Ordering::Release);
        Ok(())
    }

    /// Compare-and-swap on the volume record, retried on conflicts; refused when the record's
    /// epoch moved on (another target took over).
    pub(super) async fn change_record(&self, f: impl Fn(&mut VolumeRecord) + Send + Sync + 'static) -> Result<VolumeRecord, TargetError> {
        match self.membership.change(&self.name, self.epoch, Box::new(f)).await? {
            Some(rec) => Ok(rec),
            None => {
                self.fenced.store(true, Ordering::Release);
                Err(TargetError::Fenced(self.name.clone()))
            }
        }
    }

    /// Before a change to `[off, off+len)` is made anywhere: the range is recorded (durably) as
    /// missed by every out-of-sync replica, and as in flight for every catching-up one, so a
    /// crash of this target at any later point leaves nothing a resync would not copy. Returns
    /// the peers to send the change to.
    async fn prepare(&self, off: u64, len: u64) -> Result<Vec<Leg>, IoError> {
        let mut sent = Vec::new();
        let mut pending: Vec<(Arc<Peer>, Vec<u8>)> = Vec::new();
        for p in &self.peers {
            // One look at the state decides both where the change goes and what is recorded.
            let state = p.state();
            if state != PeerState::OutOfSync {
                sent.push((p.clone(), p.client(), state == PeerState::CatchingUp));
            }
            let entries = match state {
                PeerState::InSync => None,
                PeerState::OutOfSync => p.dirty.mark_mem(off, len),
                PeerState::CatchingUp => p.dirty.begin_inflight(off, len),
            };
            if let Some(e) = entries {
                pending.push((p.clone(), e));
            }
        }
        if !pending.is_empty() {
            dirty_blocking("recording missed regions", move || pending.iter().try_for_each(|(p, e)| p.dirty.append(e)))
                .await
                .map_err(IoError::from)?;
        }
        Ok(sent)
    }

    /// Settles the remote legs of a change to `[off, off+len)`: failed peers leave the in-sync
    /// set (the range recorded), and out-of-sync peers are confirmed out in the metadata store,
    /// before the change is acknowledged.
    async fn settle(&self, sent: &[Leg], results: Vec<Result<Vec<u8>, CallError>>, off: u64, len: u64) -> Result<(), IoError> {
        let mut stale = false;
        for ((p, _, _), r) in sent.iter().zip(results) {
            match r {
                Ok(_) => {}
                Err(e) if e.is_stale() => stale = true,
                Err(e) => {
                    tracing::warn!(volume = %self.name, replica = %p.node, "replica write failed: {e}");
                    self.peer_failed(p, Some((off, len))).await.map_err(IoError::from)?;
                }
            }
        }
        for p in &self.peers {
            if !sent.iter().any(|(s, _, _)| Arc::ptr_eq(s, p)) {
                self.record_out(p).await.map_err(IoError::from)?;
            }
        }
        if stale {
            return Err(self.fence());
        }
        Ok(())
    }

    /// Ends the in-flight records `prepare` made for catching-up peers.
    fn finish(&self, sent: &[Leg], off: u64, len: u64) {
        for (p, _, inflight) in sent {
            if *inflight {
                p.dirty.end_inflight(off, len);
            }
        }
    }

    /// Sends `cmd` to every leg in `sent` at once (a WRITE's payload is shared, not copied).
    async fn fan_out(&self, sent: &[Leg], cmd: Command) -> Vec<Result<Vec<u8>, CallError>> {
        let calls = sent.iter().map(|(p, c, _)| {
            let cmd = cmd.clone();
            async move {
                match c {
                    Some(c) => c.call(self.vol.id, self.epoch, cmd).await,
                    None => Err(CallError::Broken(p.node.clone())),
                }
            }
        });
        futures::future::join_all(calls).await
    }

    pub async fn write(&self, l: &Local, off: u64, data: AlignedBuf, fua: bool, aligned: bool) -> Result<(), IoError> {
        let _g = if aligned { Guard::Shared(self.region_lock.read().await) } else { Guard::Exclusive(self.region_lock.write().await) };
        self.admit().await?;
        let len = data.len() as u64;
        let sent = self.prepare(off, len).await?;
        let payload = (!sent.is_empty()).then(|| Bytes::copy_from_slice(&data));
        let remote = async {
            match payload {
                Some(data) => self.fan_out(&sent, Command::Write { offset: off, data, fua }).await,
                None => Vec::new(),
            }
        };
        self.both(&sent, l.write_local(&self.vol, off, data, fua), remote, off, len).await
    }

    /// Runs a change on this node's replica (when it holds one) and on the peers together, then
    /// settles the peers' results.
    async fn both(
        &self,
        sent: &[Leg],
        local: impl std::future::Future<Output = Result<(), IoError>>,
        remote: impl std::future::Future<Output = Vec<Result<Vec<u8>, CallError>>>,
        off: u64,
        len: u64,
    ) -> Result<(), IoError> {
        // This node's replica is fenced like a remote one: the change runs under the volume's
        // fence (shared), so a newer target's HELLO waits for it, and is refused once that HELLO
        // raised the epoch.
        let local = async {
            if !self.local {
                return Ok(());
            }
            crate::failpoint::point("target.local_leg").await.map_err(std::io::Error::from)?;
            let _f = self.vol.fence.read().await;
            if !self.vol.admit_epoch(self.epoch) {
                return Err(self.fence());
            }
            local.await
        };
        let remote = async {
            if let Err(e) = crate::failpoint::point("target.remote_legs").await {
                return sent.iter().map(|(p, _, _)| Err(CallError::Broken(format!("{} ({e})", p.node)))).collect();
            }
            remote.await
        };
        let (l, r) = tokio::join!(local, remote);
        let settled = self.settle(sent, r, off, len).await;
        self.finish(sent, off, len);
        l?;
        settled
    }

    pub async fn zero(&self, l: &Local, off: u64, len: u64, punch: bool, fua: bool) -> Result<(), IoError> {
        let _g = self.region_lock.write().await;
        self.admit().await?;
        let sent = self.prepare(off, len).await?;
        // The protocol's length is 32 bits: large ranges go in pieces.
        let remote = async {
            let mut out: Vec<Result<Vec<u8>, CallError>> = sent.iter().map(|_| Ok(Vec::new())).collect();
            let mut pos = off;
            while pos < off + len {
                let n = (off + len - pos).min(1 << 30);
                for (slot, r) in
                    out.iter_mut().zip(self.fan_out(&sent, Command::WriteZeroes { offset: pos, len: n as u32, fua, keep_allocated: !punch }).await)
                {
                    if slot.is_ok() {
                        *slot = r;
                    }
                }
                pos += n;
            }
            out
        };
        self.both(&sent, l.zero_local(&self.vol, off, len, punch, fua), remote, off, len).await
    }

    pub async fn flush(&self, l: &Local) -> Result<(), IoError> {
        let _g = self.region_lock.read().await;
        self.admit().await?;
        let sent = self.active();
        let remote = self.fan_out(&sent, Command::Flush);
        self.both(&sent, l.flush_local(&self.vol), remote, 0, 0).await
    }

    /// Reads from an in-sync replica on another node (when this node holds none).
    pub async fn read_remote(&self, l: &Local, off: u64, len: usize) -> Result<ReadData, IoError> {
        let _g = self.region_lock.read().await;
        self.admit().await?;
        self.read_peers(l, off, len).await
    }

    /// Serves a read whose blocks on this node failed their checksum: with no change in flight
    /// anywhere (region lock held exclusively), the blocks still bad here are fetched from an
    /// in-sync peer (which verifies its own checksums) and rewritten on this node.
    pub async fn repair_read(&self, l: &Local, off: u64, len: usize) -> Result<ReadData, IoError> {
        let _g = self.region_lock.write().await;
        self.admit().await?;
        let bad = match l.read_local(&self.vol, off, len).await {
            Err(IoError::Corrupt(bad)) => bad,
            other => return other,
        };
        let block = crate::device::ALIGN as u64;
        let a0 = off - off % block;
        let span = ((off + len as u64).next_multiple_of(block) - a0) as usize;
        let resource = format!("volume/{}", self.name);
        let good = match self.read_peers(l, a0, span).await {
            Ok(d) => d,
            Err(err) => {
                l.alerts.raise(
                    Alarm,
                    "ChecksumUnrepaired",
                    &resource,
                    format!("volume {}: {} block(s) failing their checksum on node {} could not be repaired: {err}", self.name, bad.len(), self.node),
                );
                return Err(IoError::Corrupt(bad));
            }
        };
        for b in &bad {
            let at = (b - a0) as usize;
            let mut buf = l.buffer(block as usize);
            buf.copy_from_slice(&good.bytes()[at..at + block as usize]);
            l.write_local(&self.vol, *b, buf, true).await?;
        }
        l.alerts.raise(
            Warning,
            "ChecksumRepaired",
            &resource,
            format!(
                "volume {}: {} block(s) failing their checksum on node {} were rewritten from an in-sync replica (volume offsets {})",
                self.name,
                bad.len(),
                self.node,
                crate::replica::offsets(&bad)
            ),
        );
        Ok(ReadData { buf: good.buf, start: good.start + (off - a0) as usize, len })
    }

    /// Rewrites `[off, off+len)` on peer `node` (whose copy failed its checksums) from a good
    /// copy, with no change in flight anywhere.
    pub async fn repair_peer(&self, l: &Local, node: &str, off: u64, len: usize) -> Result<(), IoError> {
        let _g = self.region_lock.write().await;
        self.admit().await?;
        let c = self
            .peers
            .iter()
            .find(|p| p.node == node && p.state() == PeerState::InSync)
            .and_then(|p| p.client_now())
            .ok_or_else(|| IoError::from(TargetError::NoReplica(format!("{} on node {node}", self.name))))?;
        // The bad copy answers EIO for its bad blocks, so the source is another one.
        let good = self.read_source(l, off, len).await?;
        match c.call(self.vol.id, self.epoch, Command::Write { offset: off, data: Bytes::copy_from_slice(good.bytes()), fua: true }).await {
            Ok(_) => Ok(()),
            Err(err) if err.is_stale() => Err(self.fence()),
            Err(err) => Err(IoError::from(TargetError::from(err))),
        }
    }

    /// A read from the source of copies and comparisons: this node's replica when it is in sync,
    /// else the first in-sync peer that answers (the caller holds the region lock).
    pub(super) async fn read_source(&self, l: &Local, off: u64, len: usize) -> Result<ReadData, IoError> {
        if self.local {
            l.read_local_once(&self.vol, off, len).await
        } else {
            self.read_peers(l, off, len).await
        }
    }

    /// The logical extents allocated on the source of copies: this node's replica when it is in
    /// sync, else every in-sync peer that answers (at least one must).
    pub(super) async fn source_extents(&self, l: &Local) -> Result<std::collections::BTreeSet<u64>, TargetError> {
        if self.local {
            return Ok(l.pool.volume_extents(self.vol.id).into_iter().collect());
        }
        let mut out = std::collections::BTreeSet::new();
        let mut answered = false;
        for (p, c, _) in self.active() {
            let (Some(c), PeerState::InSync) = (c, p.state()) else { continue };
            match c.call(self.vol.id, self.epoch, Command::Extents).await {
                Ok(b) => {
                    out.extend(b.chunks_exact(8).map(|x| u64::from_be_bytes(x.try_into().expect("8 bytes"))));
                    answered = true;
                }
                Err(err) if err.is_stale() => {
                    self.fence();
                    return Err(TargetError::Fenced(self.name.clone()));
                }
                Err(err) => tracing::warn!(volume = %self.name, replica = %p.node, "listing the replica's extents failed: {err}"),
            }
        }
        if !answered {
            return Err(TargetError::NoReplica(self.name.clone()));
        }
        Ok(out)
    }

    /// A read from the first in-sync peer that answers (the caller holds the region lock).
    pub(super) async fn read_peers(&self, l: &Local, off: u64, len: usize) -> Result<ReadData, IoError> {
        for (p, c, _) in self.active() {
            let (Some(c), PeerState::InSync) = (c, p.state()) else { continue };
            match c.call(self.vol.id, self.epoch, Command::Read { offset: off, len: len as u32 }).await {
                Ok(data) if data.len() == len => {
                    let mut buf = l.buffer(len);
                    buf.copy_from_slice(&data);
                    return Ok(ReadData { buf: ReadBuf::Owned(buf), start: 0, len });
                }
                Ok(_) => tracing::warn!(volume = %self.name, replica = %p.node, "short read from replica"),
                Err(err) if err.is_stale() => return Err(self.fence()),
                Err(err) => tracing::warn!(volume = %self.name, replica = %p.node, "read from replica failed: {err}"),
            }
        }
        Err(IoError::from(TargetError::NoReplica(self.name.clone())))
    }

    /// Shares the volume's extents with volume id `dst` on this node and every in-sync replica
    /// at one point of the write stream: no change is in flight anywhere meanwhile, so every
    /// copy holds the same acknowledged writes (a crash-consistent snapshot). Returns the nodes
    /// that hold the copy.
    pub async fn share_at_barrier(&self, l: &Local, dst: u64) -> Result<Vec<String>, IoError> {
        let _g = self.region_lock.write().await;
        self.admit().await?;
        let sent: Vec<Leg> = self.active().into_iter().filter(|(p, _, _)| p.state() == PeerState::InSync).collect();
        let local = async {
            if self.local {
                Some(l.share_local(&self.vol, dst).await)
            } else {
                None
            }
        };
        let (l, r) = tokio::join!(local, self.fan_out(&sent, Command::Share { into: dst }));
        let mut holders = Vec::new();
        match l {
            Some(Ok(())) => holders.push(self.node.clone()),
            Some(Err(err)) => tracing::warn!(volume = %self.name, "sharing extents on this node failed: {err}"),
            None => {}
        }
        for ((p, _, _), r) in sent.iter().zip(r) {
            match r {
                Ok(_) => holders.push(p.node.clone()),
                Err(err) if err.is_stale() => return Err(self.fence()),
                Err(err) => tracing::warn!(volume = %self.name, replica = %p.node, "sharing extents failed: {err}"),
            }
        }
        Ok(holders)
    }

    /// Tells the replicas the volume's new size (after a grow).
    pub async fn announce_size(&self, size: u64) -> Result<(), IoError> {
        let sent = self.active();
        let r = self.fan_out(&sent, Command::Hello { size }).await;
        self.settle(&sent, r, 0, 0).await
    }
}

enum Guard<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

#[cfg(test)]
#[path = "target_tests.rs"]
mod tests;
