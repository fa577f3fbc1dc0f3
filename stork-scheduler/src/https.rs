//! The extender over HTTPS: the certificate and key of `--tls-dir` (`node.crt`, `node.key`, as
//! `strata-engine certs issue` writes them) serve every route, and `/filter` and `/prioritize`
//! answer only clients that present a certificate of the cluster CA (`ca.crt`) — the
//! kube-scheduler's — optionally only the names of `--tls-client-name`. `/healthz` and
//! `/metrics` need no client certificate (kubelet probes and scrapers have none). The files are
//! read again when they change, so a renewed certificate is served without a restart.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use http::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Who called over TLS: the identity (first DNS name) of the verified client certificate, or
/// None when the client sent none. Put on every request served by [`serve`].
#[derive(Debug, Clone)]
pub struct Caller(pub Option<String>);

/// The routes that anyone may reach (probes, scrapes): read-only, no pod or node data.
const OPEN: [&str; 2] = ["/healthz", "/metrics"];

/// Which clients may call the extender's scheduling routes.
#[derive(Debug, Clone, Default)]
pub struct ClientPolicy {
    /// Identities allowed; empty: any certificate of the cluster CA.
    pub names: Vec<String>,
}

/// `router` with the scheduling routes closed to clients without an allowed certificate (401
/// without one, 403 for another name). Only meaningful behind [`serve`], which sets [`Caller`].
pub fn require_client_cert(router: Router, policy: ClientPolicy) -> Router {
    router.layer(axum::middleware::from_fn_with_state(Arc::new(policy), check_client))
}

async fn check_client(State(policy): State<Arc<ClientPolicy>>, req: Request, next: Next) -> Response {
    if OPEN.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let who = req.extensions().get::<Caller>().and_then(|c| c.0.clone());
    match who {
        None => (StatusCode::UNAUTHORIZED, "strata-stork: a client certificate of the cluster CA is required\n").into_response(),
        Some(name) if !policy.names.is_empty() && !policy.names.contains(&name) => {
            tracing::warn!(client = %name, path = %req.uri().path(), "extender call refused: client not in --tls-client-name");
            (StatusCode::FORBIDDEN, format!("strata-stork: client {name:?} may not call the extender (allowed: {})\n", policy.names.join(", ")))
                .into_response()
        }
        Some(_) => next.run(req).await,
    }
}

/// The serving certificate and the client CA, reloaded when their files change.
pub struct ServerTls {
    dir: PathBuf,
    current: parking_lot::RwLock<Arc<rustls::ServerConfig>>,
    stamp: parking_lot::Mutex<strata_api::tls::FileStamp>,
}

const FILES: [&str; 3] = ["ca.crt", "node.crt", "node.key"];

fn config(dir: &Path) -> Result<rustls::ServerConfig, String> {
    let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{}: {e}", dir.join(f).display()));
    let bad = |f: &str, e: &dyn std::fmt::Display| format!("{}: {e}", dir.join(f).display());
    let (ca, cert, key) = (read("ca.crt")?, read("node.crt")?, read("node.key")?);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.map_err(|e| bad("ca.crt", &e))?).map_err(|e| bad("ca.crt", &e))?;
    }
    if roots.is_empty() {
        return Err(bad("ca.crt", &"no certificate"));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert).collect::<Result<_, _>>().map_err(|e| bad("node.crt", &e))?;
    if chain.is_empty() {
        return Err(bad("node.crt", &"no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| bad("node.key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // A client certificate is verified when given and required per route (the probes have none).
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| bad("ca.crt", &e))?;
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .map_err(|e| bad("node.key", &e))?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

impl ServerTls {
    /// Loads `ca.crt`, `node.crt` and `node.key` from `dir`.
    pub fn load(dir: &Path) -> Result<ServerTls, String> {
        let before = strata_api::tls::file_stamp(dir, &FILES);
        let c = config(dir)?;
        Ok(ServerTls { dir: dir.to_path_buf(), current: parking_lot::RwLock::new(Arc::new(c)), stamp: parking_lot::Mutex::new(before) })
    }

    /// Loads the files again if they changed; true when the new ones are in use. Files that do
    /// not load (half-written) leave the current ones in use and say why.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = strata_api::tls::file_stamp(&self.dir, &FILES);
        if *self.stamp.lock() == now {
            return Ok(false);
        }
        *self.current.write() = Arc::new(config(&self.dir)?);
        *self.stamp.lock() = now;
        Ok(true)
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }
}

/// Serves `app` over TLS on `listener` for ever: each connection's verified client identity
/// goes on its requests as [`Caller`]. The files are checked for changes every `reload_every`.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, tls: Arc<ServerTls>, reload_every: Duration) -> std::io::Result<()> {
    strata_api::tls::watch(&tls, reload_every, "extender certificate", &tls.dir, ServerTls::reload_if_changed);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = tls.acceptor();
        let app = app.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let caller = Caller(stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(strata_api::tls::identity));
            let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(caller.clone());
                tower::ServiceExt::oneshot(app.clone(), req)
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
}
