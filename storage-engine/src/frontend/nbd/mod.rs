//! The NBD server: fixed newstyle handshake, then a pipelined transmission phase. Export name =
//! volume name. Listens on TCP and/or a unix socket; one task per connection.

pub mod handshake;
pub mod transmit;

use crate::volume::Exports;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tracing::Instrument;

/// Largest READ/WRITE payload we accept (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests in flight per connection before the reader waits.
pub const MAX_INFLIGHT: usize = 256;

/// What NBD clients may hold of this engine: payload bytes per connection and in all, time to
/// finish the handshake, connections at once. Memory stays bounded whatever a client does (a
/// client that never reads its replies only stops being read).
pub struct Limits {
    pub conn_bytes: u64,
    pub total_bytes: u64,
    pub handshake: Duration,
    connections: Arc<tokio::sync::Semaphore>,
    /// Payload bytes held by all connections now.
    held: AtomicU64,
}

impl Limits {
    pub fn new(conn_bytes: u64, total_bytes: u64, handshake: Duration, max_connections: usize) -> Arc<Limits> {
        Arc::new(Limits {
            conn_bytes,
            total_bytes,
            handshake,
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            held: AtomicU64::new(0),
        })
    }

    /// Whether a connection holding `mine` bytes may take another request: always when it holds
    /// nothing, else while both its own and the engine-wide total are under their caps.
    pub fn may_read(&self, mine: u64) -> bool {
        mine == 0 || (mine < self.conn_bytes && self.held.load(Ordering::Acquire) < self.total_bytes)
    }

    pub fn charge(&self, n: u64) {
        self.held.fetch_add(n, Ordering::AcqRel);
    }

    pub fn release(&self, n: u64) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

/// TLS on the TCP listener: the engine's certificate (reloaded as it changes), and whether
/// clients must start TLS before anything else.
#[derive(Clone)]
pub struct TcpTls {
    pub tls: Arc<crate::security::Tls>,
    pub required: bool,
}

async fn handle<S>(stream: S, engine: Arc<dyn Exports>, limits: Arc<Limits>, peer: String, tls: Option<TcpTls>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(_slot) = limits.connections.clone().try_acquire_owned() else {
        tracing::warn!(%peer, "nbd connection refused: --nbd-max-connections reached");
        return;
    };
    let start_tls = tls.map(|t| handshake::conn::StartTls { acceptor: t.tls.acceptor(), required: t.required });
    match tokio::time::timeout(limits.handshake, handshake::conn::negotiate(stream, &*engine, start_tls.as_ref())).await {
        Ok(Ok(Some((stream, conn)))) => {
            // Every event of this client's session carries the volume and node.
            let span = tracing::info_span!("nbd", volume = %conn.volume.name, node = %engine.node_id(), %peer);
            async {
                tracing::debug!("nbd client attached");
                transmit::conn::serve(stream, conn, limits.clone()).await;
                tracing::debug!("nbd client gone");
            }
            .instrument(span)
            .await;
        }
        Ok(Ok(None)) => tracing::debug!(%peer, "nbd negotiation ended without an export"),
        Ok(Err(e)) => tracing::info!(%peer, "nbd negotiation failed: {e}"),
        Err(_) => tracing::info!(%peer, timeout = ?limits.handshake, "nbd client did not finish the handshake in time: disconnected"),
    }
}

/// Serves NBD on `listener`; with `tls`, clients may (or, when required, must) start TLS.
pub async fn serve_tcp(listener: TcpListener, engine: Arc<dyn Exports>, limits: Arc<Limits>, tls: Option<TcpTls>) {
    crate::net::accept_tcp(listener, "nbd", |s, peer| handle(s, engine.clone(), limits.clone(), peer, tls.clone())).await
}

pub async fn serve_unix(listener: UnixListener, engine: Arc<dyn Exports>, limits: Arc<Limits>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(handle(s, engine.clone(), limits.clone(), "unix".into(), None));
            }
            Err(e) => {
                tracing::warn!("nbd accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
