//! Listening sockets shared by the engine's servers (NBD, replication).

/// Accepts TCP connections for the life of the engine, handing each (with Nagle off) to a task
/// of its own; a failed accept is logged and retried shortly.
pub async fn accept_tcp<F, Fut>(listener: tokio::net::TcpListener, what: &'static str, mut handle: F)
where
    F: FnMut(tokio::net::TcpStream, String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(handle(s, peer.to_string()));
            }
            Err(e) => {
                tracing::warn!("{what} accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
