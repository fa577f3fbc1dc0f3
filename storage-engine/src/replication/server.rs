//! The replica side of the replication protocol: a reader that parses requests, a task per
//! request (so a slow request never holds up the others), and a writer that sends replies in
//! completion order. Bounded per connection ([`Bounds`]: `--repl-max-requests`,
//! `--repl-inflight`): requests and payload bytes (writes received, reads answered) between
//! being read and their reply being written; past that the reader waits (backpressure on the
//! target).

use super::frame::{self, Reply, REQUEST_LEN};
use crate::replica::Answer;
use crate::volume::{Engine, Volume};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// What one replication connection may hold between reading a request and writing its reply.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub requests: usize,
    pub bytes: usize,
}

pub async fn serve(listener: TcpListener, engine: Arc<Engine>, bounds: Bounds) {
    crate::net::accept_tcp(listener, "replication", |s, peer| connection(s, engine.clone(), peer, bounds)).await
}

async fn connection(s: TcpStream, engine: Arc<Engine>, peer: String, bounds: Bounds) {
    let (rd, mut wr) = s.into_split();
    let mut rd = tokio::io::BufReader::with_capacity(BATCH, rd);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Reply, Answer, Held)>();
    let writer = tokio::spawn(async move {
        // Replies that are ready together leave in one write.
        let mut buf: Vec<u8> = Vec::with_capacity(BATCH);
        while let Some(first) = rx.recv().await {
            buf.clear();
            append(&mut buf, first);
            while buf.len() < BATCH {
                match rx.try_recv() {
                    Ok(next) => append(&mut buf, next),
                    Err(_) => break,
                }
            }
            if wr.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut volumes: HashMap<u64, Arc<Volume>> = HashMap::new();
    let mut hdr = [0u8; REQUEST_LEN];
    let max_units = (bounds.bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(bounds.requests.max(1)));
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
            let mut buf = engine.buffer(req.payload_len());
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
                let v = engine.replica_volume(req.volume).await;
                if let Some(v) = &v {
                    volumes.insert(req.volume, v.clone());
                }
                v
            }
        };
        let (engine, tx) = (engine.clone(), tx.clone());
        tokio::spawn(async move {
            let answer = match vol {
                Some(v) => engine.replica_request(&v, &req, payload).await,
                // Nothing is loaded for it; whatever extents it may still have go.
                None if req.op == frame::Op::Drop => match engine.drop_replica(req.volume).await {
                    Ok(()) => Answer::Done,
                    Err(_) => Answer::Error(libc::EIO as u32),
                },
                None => Answer::Error(frame::ENOENT),
            };
            let len = match &answer {
                Answer::Data(d) => d.len as u32,
                Answer::Bytes(b) => b.len() as u32,
                _ => 0,
            };
            let error = if let Answer::Error(e) = answer { e } else { 0 };
            let _ = tx.send((Reply { error, handle: req.handle, len }, answer, held));
        });
    }
    drop(tx);
    let _ = writer.await;
}

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
