//! The NBD server: fixed newstyle handshake, then a pipelined transmission phase. Export name =
//! volume name. Listens on TCP and/or a unix socket; one task per connection.

pub mod handshake;
pub mod transmit;

use crate::volume::Engine;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

/// Largest READ/WRITE payload we accept (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests in flight per connection before the reader waits.
pub const MAX_INFLIGHT: usize = 256;

async fn handle<S>(stream: S, engine: Arc<Engine>, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match handshake::conn::negotiate(stream, &engine).await {
        Ok(Some((stream, conn))) => {
            tracing::debug!(%peer, volume = %conn.volume.name, "nbd client attached");
            transmit::conn::serve(stream, conn, engine).await;
            tracing::debug!(%peer, "nbd client gone");
        }
        Ok(None) => tracing::debug!(%peer, "nbd negotiation ended without an export"),
        Err(e) => tracing::info!(%peer, "nbd negotiation failed: {e}"),
    }
}

pub async fn serve_tcp(listener: TcpListener, engine: Arc<Engine>) {
    crate::server::accept_tcp(listener, "nbd", |s, peer| handle(s, engine.clone(), peer)).await
}

pub async fn serve_unix(listener: UnixListener, engine: Arc<Engine>) {
    loop {
        match listener.accept().await {
            Ok((s, _)) => {
                tokio::spawn(handle(s, engine.clone(), "unix".into()));
            }
            Err(e) => {
                tracing::warn!("nbd accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
