//! One pipelined connection from a target to a replica: callers send requests concurrently, a
//! writer task puts them on the socket in order, a reader task matches replies to callers by
//! handle. A broken connection fails every pending call; the target then drops the client.

use super::frame::{self, Command, Reply, REPLY_LEN};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("replica {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("connection to replica {0} is broken")]
    Broken(String),
    #[error("replica {addr} answered error {errno}")]
    Remote { addr: String, errno: u32 },
    #[error("connecting to replica {0}: {1}")]
    Connect(String, std::io::Error),
}

impl CallError {
    /// The replica refused the request's epoch: the sender is no longer the target.
    pub fn is_stale(&self) -> bool {
        matches!(self, CallError::Remote { errno, .. } if *errno == frame::ESTALE)
    }
}

/// A connection to `addr` that did not open in time.
fn timed_out(addr: &str) -> CallError {
    CallError::Connect(addr.into(), std::io::Error::from(std::io::ErrorKind::TimedOut))
}

type Waiter = oneshot::Sender<(u32, Vec<u8>)>;

struct Outgoing {
    header: [u8; frame::REQUEST_LEN],
    payload: Option<Bytes>,
}

impl Outgoing {
    fn append_to(&self, buf: &mut Vec<u8>) {
        buf.extend_from_slice(&self.header);
        if let Some(p) = &self.payload {
            buf.extend_from_slice(p);
        }
    }
}

/// Bytes gathered into one socket write or read.
const BATCH: usize = 256 * 1024;

pub struct Client {
    pub addr: String,
    tx: mpsc::UnboundedSender<Outgoing>,
    pending: Arc<Mutex<HashMap<u64, Waiter>>>,
    next: AtomicU64,
    broken: Arc<AtomicBool>,
    pub timeout: Duration,
}

impl Client {
    /// A plaintext connection (engines without `--tls-dir`, tests of the refusal of one).
    pub async fn connect(addr: &str, timeout: Duration) -> Result<Arc<Client>, CallError> {
        let s = Self::tcp(addr, timeout).await?;
        let (rd, wr) = s.into_split();
        Ok(Self::start(rd, wr, addr, timeout))
    }

    /// A connection to node `node` at `addr`: mutual TLS when `tls` is given (the replica must
    /// prove it is `node`), else plaintext.
    pub async fn connect_to(node: &str, addr: &str, timeout: Duration, tls: Option<&crate::security::Tls>) -> Result<Arc<Client>, CallError> {
        let Some(tls) = tls else { return Self::connect(addr, timeout).await };
        let s = Self::tcp(addr, timeout).await?;
        let s = tokio::time::timeout(timeout, tls.connect(s, node))
            .await
            .map_err(|_| timed_out(addr))?
            .map_err(|e| CallError::Connect(format!("{addr} (TLS to node {node})"), e))?;
        let (rd, wr) = tokio::io::split(s);
        Ok(Self::start(rd, wr, addr, timeout))
    }

    /// TCP to `addr`, no delay.
    async fn tcp(addr: &str, timeout: Duration) -> Result<TcpStream, CallError> {
        let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out(addr))?
            .map_err(|e| CallError::Connect(addr.into(), e))?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    fn start<R, W>(rd: R, mut wr: W, addr: &str, timeout: Duration) -> Arc<Client>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let pending: Arc<Mutex<HashMap<u64, Waiter>>> = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let b = broken.clone();
        tokio::spawn(async move {
            // Everything queued goes out in one write: one syscall for a burst of requests.
            let mut buf: Vec<u8> = Vec::with_capacity(BATCH);
            while let Some(o) = rx.recv().await {
                buf.clear();
                o.append_to(&mut buf);
                while buf.len() < BATCH {
                    match rx.try_recv() {
                        Ok(o) => o.append_to(&mut buf),
                        Err(_) => break,
                    }
                }
                if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                    break;
                }
            }
            b.store(true, Ordering::Release);
            let _ = wr.shutdown().await;
        });
        let (p, b) = (pending.clone(), broken.clone());
        tokio::spawn(async move {
            let mut rd = tokio::io::BufReader::with_capacity(BATCH, rd);
            let mut hdr = [0u8; REPLY_LEN];
            loop {
                if rd.read_exact(&mut hdr).await.is_err() {
                    break;
                }
                let Ok(Reply { error, handle, len }) = frame::parse_reply(&hdr) else { break };
                let mut data = vec![0u8; len as usize];
                if rd.read_exact(&mut data).await.is_err() {
                    break;
                }
                if let Some(w) = p.lock().remove(&handle) {
                    let _ = w.send((error, data));
                }
            }
            b.store(true, Ordering::Release);
            // Dropping the waiters fails their calls.
            p.lock().clear();
        });
        Arc::new(Client { addr: addr.into(), tx, pending, next: AtomicU64::new(1), broken, timeout })
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Sends one request for volume id `volume` at `epoch` and waits for its reply (data for
    /// READ, EXTENTS, CHECKSUM and HELLO).
    pub async fn call(&self, volume: u64, epoch: u64, cmd: Command) -> Result<Vec<u8>, CallError> {
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        let req = cmd.header(handle, volume, epoch);
        let payload = match cmd {
            Command::Write { data, .. } => Some(data),
            _ => None,
        };
        let (wtx, wrx) = oneshot::channel();
        self.pending.lock().insert(handle, wtx);
        if self.is_broken() || self.tx.send(Outgoing { header: frame::encode_request(&req), payload }).is_err() {
            self.pending.lock().remove(&handle);
            return Err(CallError::Broken(self.addr.clone()));
        }
        match tokio::time::timeout(self.timeout, wrx).await {
            Err(_) => {
                self.pending.lock().remove(&handle);
                Err(CallError::Timeout(self.addr.clone(), self.timeout))
            }
            Ok(Err(_)) => Err(CallError::Broken(self.addr.clone())),
            Ok(Ok((0, data))) => Ok(data),
            Ok(Ok((errno, _))) => Err(CallError::Remote { addr: self.addr.clone(), errno }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::frame::{self, Command, Reply, REQUEST_LEN};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A replica at the far end of `io`: it reads 4 KiB every millisecond (slower than the
    /// target sends) and answers every request.
    async fn slow_replica(io: tokio::io::DuplexStream, tls: Arc<crate::security::Tls>) {
        let mut s = tls.acceptor().accept(io).await.unwrap();
        let mut pending: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 4096];
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                return;
            }
            pending.extend_from_slice(&chunk[..n]);
            let mut replies = Vec::new();
            while let Some(hdr) = pending.get(..REQUEST_LEN) {
                let req = frame::parse_request(hdr.try_into().unwrap()).unwrap();
                if pending.len() < REQUEST_LEN + req.payload_len() {
                    break;
                }
                pending.drain(..REQUEST_LEN + req.payload_len());
                replies.extend_from_slice(&frame::encode_reply(&Reply { error: 0, handle: req.handle, len: 0 }));
            }
            if !replies.is_empty() {
                s.write_all(&replies).await.unwrap();
                s.flush().await.unwrap();
            }
        }
    }

    #[tokio::test]
    async fn every_request_over_tls_reaches_a_replica_that_reads_slower_than_it_is_sent() {
        let dir = std::env::temp_dir().join(format!("strata-client-tls-{}", uuid::Uuid::new_v4()));
        crate::security::init_ca(&dir.join("ca")).unwrap();
        let identity = |id: &str| {
            crate::security::issue(&dir.join("ca"), id, &[], &dir.join(id)).unwrap();
            Arc::new(crate::security::Tls::load(&dir.join(id)).unwrap())
        };
        let (replica, target) = (identity("node-2"), identity("node-1"));
        // A pipe that holds 4 KiB: TLS records the target hands to it while it is full wait in
        // the TLS session until the pipe has room.
        let (near, far) = tokio::io::duplex(4096);
        tokio::spawn(slow_replica(far, replica));
        let (rd, wr) = tokio::io::split(target.connect(near, "node-2").await.unwrap());
        let c = Client::start(rd, wr, "node-2", Duration::from_secs(3));
        // Writes of 64 KiB, one at a time: each is the last thing sent until its reply comes
        // back, so its final records must be pushed out (flushed), not left in the session.
        for i in 0..4u64 {
            let data = bytes::Bytes::from(vec![i as u8; 64 << 10]);
            let r = c.call(7, 1, Command::Write { offset: i << 16, data, fua: false }).await;
            r.unwrap_or_else(|e| panic!("write {i}: {e}"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
