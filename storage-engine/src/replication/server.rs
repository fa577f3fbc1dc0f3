//! The replica side of the replication protocol: a reader that parses requests, and a writer
//! task that runs them all as futures at once (so a slow request never holds up the others) and
//! sends replies in completion order, those ready together in one write. Bounded per
//! connection ([`Bounds`]: `--repl-max-requests`, `--repl-inflight`): requests and payload bytes
//! (writes received, reads answered) between being read and their reply being written; past
//! that the reader waits (backpressure on the target).

use super::authority::{self, Refusal};
use super::frame::{self, Command, Reply, REQUEST_LEN};
use crate::device::AlignedBuf;
use crate::meta::{MetaError, VolumeRecord};
use crate::replica::{boot_id, IoError, Local, ReadData, Replica};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// What one replication connection may hold between reading a request and writing its reply.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub requests: usize,
    pub bytes: usize,
}

/// This node's replicas, as the replication server needs them (the volume layer has them).
#[async_trait::async_trait]
pub trait Replicas: Send + Sync + 'static {
    /// The data path every replica here shares.
    fn local(&self) -> &Local;
    /// The replica of volume id `id` on this node, loaded from the store when it was created
    /// after this engine started; None when no replica of it is here.
    async fn replica(&self, id: u64) -> Option<Arc<Replica>>;
    /// Frees this node's replica of volume id `id` (and forgets its handle).
    async fn drop_replica(&self, id: u64) -> Result<(), DropError>;
    /// This node's id.
    fn node_id(&self) -> &str;
    /// Every volume record, as the store holds it now (for `authority::check`).
    async fn records(&self) -> Result<Vec<VolumeRecord>, MetaError>;
}

/// Runs `authority::check` for a request that changes what the record governs.
async fn authorized(replicas: &dyn Replicas, volume: u64, epoch: u64, cmd: &Command<AlignedBuf>, from: Option<&str>) -> Result<(), Refusal> {
    if !authority::needs_record(cmd) {
        return Ok(());
    }
    let records = replicas.records().await.map_err(|e| Refusal::Unavailable(e.to_string()))?;
    authority::check(&records, replicas.node_id(), volume, epoch, cmd, from).inspect_err(|why| {
        tracing::warn!(volume, epoch, op = cmd.name(), "replication request refused: {why}");
    })
}

/// A data request from node `from` (known by its certificate): the node whose HELLO this
/// replica accepted may send any; another node only reads, and only as a holder of a replica of
/// the volume (a scrub repairing a detached volume's copy).
async fn data_sender_allowed(replicas: &dyn Replicas, v: &Replica, epoch: u64, cmd: &Command<AlignedBuf>, from: &str) -> Result<(), Refusal> {
    // An older epoch is answered ESTALE by the epoch check: a target that was taken over
    // learns that it is fenced, not that its replica failed.
    if v.announcer().as_deref() == Some(from) || epoch < v.newest_epoch() {
        return Ok(());
    }
    let read = matches!(cmd, Command::Read { .. } | Command::Checksum { .. } | Command::Extents);
    if read {
        let records = replicas.records().await.map_err(|e| Refusal::Unavailable(e.to_string()))?;
        let me = replicas.node_id();
        if records.iter().any(|r| r.id == v.id && r.clone().normalized(me).has_replica(from)) {
            return Ok(());
        }
    }
    Err(Refusal::NotAllowed(format!("node {from} is not the target that announced itself to this replica of volume {}", v.name)))
}

/// Why a replica could not be freed (the layer above's error).
pub type DropError = Box<dyn std::error::Error + Send + Sync>;

/// Serves the replication port. With `tls`, every connection is mutual TLS under the cluster
/// CA and its requests are checked against the node its certificate names; without, the peer is
/// unknown and only the record checks apply.
pub async fn serve(listener: TcpListener, replicas: Arc<dyn Replicas>, bounds: Bounds, tls: Option<Arc<crate::security::Tls>>) {
    crate::net::accept_tcp(listener, "replication", |s, peer| {
        // The certificate in use now (it may have been reloaded since the last connection).
        let (replicas, acceptor) = (replicas.clone(), tls.as_ref().map(|t| t.acceptor()));
        async move {
            let Some(acceptor) = acceptor else {
                let span = tracing::info_span!("replication", %peer);
                let (rd, wr) = s.into_split();
                return tracing::Instrument::instrument(connection(rd, wr, replicas, peer, bounds, None), span).await;
            };
            let s = match tokio::time::timeout(HANDSHAKE, acceptor.accept(s)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::warn!(%peer, "replication connection refused: TLS handshake failed: {e}"),
                Err(_) => return tracing::warn!(%peer, "replication connection refused: no TLS handshake within {HANDSHAKE:?}"),
            };
            let Some(node) = crate::security::peer_identity(s.get_ref().1) else {
                return tracing::warn!(%peer, "replication connection refused: the certificate names no node");
            };
            let span = tracing::info_span!("replication", %peer, from = %node);
            let (rd, wr) = tokio::io::split(s);
            tracing::Instrument::instrument(connection(rd, wr, replicas, peer, bounds, Some(node)), span).await
        }
    })
    .await
}

/// Time a peer has to finish the TLS handshake.
const HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// A replica's answer: an errno (0 = success) and, for READ and EXTENTS, data.
pub enum Answer {
    Done,
    Data(ReadData),
    Bytes(Vec<u8>),
    Error(u32),
}

/// Serves one replication connection over `rd` and `wr` (plain TCP, or the halves of a TLS
/// stream), as `serve` does for each connection it accepts; `from` is the node the peer's
/// certificate names, `peer` its address for the log.
pub async fn connection<R, W>(rd: R, mut wr: W, engine: Arc<dyn Replicas>, peer: String, bounds: Bounds, from: Option<String>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let from: Option<Arc<str>> = from.map(Into::into);
    let mut rd = tokio::io::BufReader::with_capacity(BATCH, rd);
    // Requests run in the writer's task, not one task each: the reader hands each one over as
    // a future, and the writer polls them all and sends the replies of those that finished
    // together in one write.
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    let slots = Arc::new(Semaphore::new(bounds.requests.max(1)));
    let writer = tokio::spawn(async move {
        let mut work: FuturesUnordered<Job> = FuturesUnordered::new();
        let mut buf: Vec<u8> = Vec::with_capacity(BATCH);
        let mut reading = true;
        loop {
            tokio::select! {
                biased;
                job = rx.recv(), if reading => match job {
                    Some(job) => work.push(job),
                    None => reading = false,
                },
                Some(first) = work.next(), if !work.is_empty() => {
                    buf.clear();
                    append(&mut buf, first);
                    // Every other reply that is ready now leaves in the same write.
                    while buf.len() < BATCH {
                        match work.next().now_or_never() {
                            Some(Some(next)) => append(&mut buf, next),
                            _ => break,
                        }
                    }
                    if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                        break;
                    }
                }
                else => break,
            }
        }
        // The connection broke: requests already begun still run to their end (a replica
        // write is not abandoned half-way), their replies go nowhere.
        while work.next().await.is_some() {}
    });
    let mut volumes: HashMap<u64, Arc<Replica>> = HashMap::new();
    let mut hdr = [0u8; REQUEST_LEN];
    let max_units = (bounds.bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
    let bytes = Arc::new(Semaphore::new(max_units));
    loop {
        if rd.read_exact(&mut hdr).await.is_err() {
            break;
        }
        let req = match frame::parse_request(&hdr) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%peer, "closing replication connection: {e}");
                break;
            }
        };
        // What the request holds until its reply is written: a slot, and its payload or reply
        // bytes (a request larger than the whole budget takes all of it).
        let units = (req.payload_len().max(req.len as usize).div_ceil(UNIT)).min(max_units) as u32;
        let (Ok(slot), Ok(budget)) = (slots.clone().acquire_owned().await, bytes.clone().acquire_many_owned(units).await) else { break };
        let held = Held(slot, budget);
        let payload = if req.payload_len() > 0 {
            let mut buf = engine.local().buffer(req.payload_len());
            if rd.read_exact(&mut buf).await.is_err() {
                break;
            }
            Some(buf)
        } else {
            None
        };
        let vol = match volumes.get(&req.volume) {
            Some(v) => Some(v.clone()),
            None => {
                let v = engine.replica(req.volume).await;
                if let Some(v) = &v {
                    volumes.insert(req.volume, v.clone());
                }
                v
            }
        };
        let (engine, from) = (engine.clone(), from.clone());
        let job: Job = Box::pin(async move {
            let from = from.as_deref();
            let answer = match vol {
                Some(v) => match Command::from_request(&req, payload) {
                    Some(cmd) => answer(&*engine, &v, req.epoch, cmd, from).await,
                    None => Answer::Error(libc::EINVAL as u32),
                },
                // Nothing is loaded for it; whatever extents it may still have go, if the record
                // lets them.
                None if req.op == frame::Op::Drop => match authorized(&*engine, req.volume, req.epoch, &Command::Drop, from).await {
                    Err(why) => Answer::Error(why.errno()),
                    Ok(()) => match engine.drop_replica(req.volume).await {
                        Ok(()) => Answer::Done,
                        Err(e) => {
                            tracing::warn!(volume = req.volume, "dropping replica data failed: {e}");
                            Answer::Error(libc::EIO as u32)
                        }
                    },
                },
                None => Answer::Error(frame::ENOENT),
            };
            let len = match &answer {
                Answer::Data(d) => d.len as u32,
                Answer::Bytes(b) => b.len() as u32,
                _ => 0,
            };
            let error = if let Answer::Error(e) = answer { e } else { 0 };
            (Reply { error, handle: req.handle, len }, answer, held)
        });
        if tx.send(job).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A request being served, and what its reply holds.
type Job = std::pin::Pin<Box<dyn std::future::Future<Output = (Reply, Answer, Held)> + Send>>;

/// Bytes gathered into one socket read or write.
const BATCH: usize = 256 * 1024;
/// Accounting unit of the payload bound.
const UNIT: usize = 4096;

/// A request's share of its connection's bounds, released once its reply is written.
struct Held(#[allow(dead_code)] OwnedSemaphorePermit, #[allow(dead_code)] OwnedSemaphorePermit);

fn append(buf: &mut Vec<u8>, (reply, answer, _held): (Reply, Answer, Held)) {
    buf.extend_from_slice(&frame::encode_reply(&reply));
    match &answer {
        Answer::Data(d) => buf.extend_from_slice(d.bytes()),
        Answer::Bytes(b) => buf.extend_from_slice(b),
        _ => {}
    }
}

/// Serves one replication request, `cmd` at `epoch`, for replica `v` (already looked up by id).
async fn answer(replicas: &dyn Replicas, v: &Arc<Replica>, epoch: u64, cmd: Command<AlignedBuf>, from: Option<&str>) -> Answer {
    let l = replicas.local();
    if let Err(why) = authorized(replicas, v.id, epoch, &cmd, from).await {
        return Answer::Error(why.errno());
    }
    if let (Some(from), false) = (from, authority::needs_record(&cmd)) {
        if let Err(why) = data_sender_allowed(replicas, v, epoch, &cmd, from).await {
            tracing::warn!(volume = %v.name, epoch, op = cmd.name(), "replication request refused: {why}");
            return Answer::Error(why.errno());
        }
    }
    // HELLO raises the epoch with every request of older epochs drained (the fence is held
    // exclusively); any other request checks the epoch and runs under the fence shared, so
    // none of a fenced target's requests can land after a newer target said hello.
    if let Command::Hello { size } = cmd {
        let _f = v.fence.write().await;
        if !v.admit_epoch(epoch) {
            return Answer::Error(frame::ESTALE);
        }
        v.grow_to(size);
        if let Some(from) = from {
            v.set_announcer(from);
        }
        // The node's boot: a target that finds it changed since its last hello knows writes
        // not yet flushed may be gone from this replica.
        return Answer::Bytes(boot_id().to_vec());
    }
    let _f = v.fence.read().await;
    let admitted = match cmd {
        // Checked against the record (`authorized`): the epoch is the record's. A DROP frees
        // the copy whatever epoch it names.
        Command::Share { .. } | Command::Restore { .. } => v.admit_epoch(epoch).then_some(()).ok_or(Refusal::Stale(epoch, v.newest_epoch())),
        Command::Drop => Ok(()),
        _ => authority::data_epoch(v.newest_epoch(), epoch),
    };
    if let Err(why) = admitted {
        if !matches!(why, Refusal::Stale(..)) {
            tracing::warn!(volume = %v.name, epoch, "replication request refused: {why}");
        }
        return Answer::Error(why.errno());
    }
    let done = |r: Result<(), IoError>| match r {
        Ok(()) => Answer::Done,
        Err(e) => Answer::Error(e.errno(true)),
    };
    match cmd {
        Command::Hello { .. } => Answer::Done,
        Command::Read { offset, len } => match l.read_local(v, offset, len as usize).await {
            Ok(d) => Answer::Data(d),
            Err(e) => Answer::Error(e.errno(false)),
        },
        Command::Write { offset, data, fua } => {
            if let Err(e) = crate::failpoint::point("replica.write").await {
                tracing::warn!(volume = %v.name, "{e}");
                return Answer::Error(libc::EIO as u32);
            }
            done(l.write_local(v, offset, data, fua).await)
        }
        Command::Flush => done(l.flush_local(v).await),
        Command::Trim { offset, len, fua } => done(l.zero_local(v, offset, len as u64, true, fua).await),
        Command::WriteZeroes { offset, len, fua, keep_allocated } => done(l.zero_local(v, offset, len as u64, !keep_allocated, fua).await),
        Command::Extents => {
            let mut out = Vec::new();
            for l in l.pool.volume_extents(v.id) {
                out.extend_from_slice(&l.to_be_bytes());
            }
            Answer::Bytes(out)
        }
        Command::Checksum { offset, len } => match l.read_local(v, offset, len as usize).await {
            Ok(d) => Answer::Bytes(crc32c::crc32c(d.bytes()).to_be_bytes().to_vec()),
            Err(e) => Answer::Error(e.errno(false)),
        },
        Command::Share { into } => done(l.share_local(v, into).await),
        Command::Restore { from } => done(l.restore_local(v, from).await),
        Command::Drop => match replicas.drop_replica(v.id).await {
            Ok(()) => Answer::Done,
            Err(e) => {
                tracing::warn!(volume = v.id, "dropping replica data failed: {e}");
                Answer::Error(libc::EIO as u32)
            }
        },
    }
}
