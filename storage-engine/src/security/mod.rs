//! Certificates and TLS for the channels between engines. A cluster CA signs one certificate
//! per node whose subject alternative name is the node id; every replication connection is
//! mutual TLS under that CA, so each side knows which node the other is.
//!
//! On disk (a directory, e.g. a mounted Kubernetes Secret): `ca.crt` (the CA certificate),
//! `node.crt` and `node.key` (this node's certificate and key, PEM). `strata-engine certs init`
//! makes a CA (`ca.crt`, `ca.key`); `strata-engine certs issue` writes a node's directory.

pub mod tokens;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.crt";
pub const NODE_KEY: &str = "node.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {why}", path.display())]
    Pem { path: PathBuf, why: String },
    #[error("{} already exists; refusing to replace a CA", .0.display())]
    Exists(PathBuf),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("the certificate in {} names no node (no DNS subject alternative name)", .0.display())]
    NoIdentity(PathBuf),
    #[error("{0:?} is not usable as a node identity in a certificate")]
    BadName(String),
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Io { path: path.to_path_buf(), source })
}

/// Writes `path` whole: into a temporary file beside it, then renamed over it, so an engine
/// reloading the directory never reads half a certificate.
fn write(path: &Path, text: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| TlsError::Io { path: path.to_path_buf(), source };
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(if private { 0o600 } else { 0o644 }).open(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Makes a new cluster CA in `dir` (`ca.crt`, `ca.key`); refuses to replace one.
pub fn init_ca(dir: &Path) -> Result<(), TlsError> {
    let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    for p in [&cert, &key] {
        if p.exists() {
            return Err(TlsError::Exists(p.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io { path: dir.to_path_buf(), source })?;
    let (c, k) = strata_api::pki::new_ca()?;
    write(&key, &k, true)?;
    write(&cert, &c, false)
}

/// Signs again with `issue` whenever the CA's files in `ca_dir` change (checked every `every`),
/// for the process's life. A failure (files half-replaced) is logged and tried again at the
/// next change or check.
pub async fn reissue_on_change(ca_dir: &Path, node: &str, hosts: &[String], out: &Path, every: std::time::Duration) {
    let ca_stamp = || strata_api::tls::file_stamp(ca_dir, &[CA_CERT, CA_KEY]);
    let mut seen = ca_stamp();
    loop {
        tokio::time::sleep(every).await;
        let now = ca_stamp();
        if now == seen {
            continue;
        }
        match issue(ca_dir, node, hosts, out) {
            Ok(()) => {
                println!("the CA in {} changed: certificate for node {node} signed again into {}", ca_dir.display(), out.display());
                seen = now;
            }
            Err(e) => eprintln!("the CA in {} changed, but signing again failed (retrying): {e}", ca_dir.display()),
        }
    }
}

/// Signs a certificate for node `node` with the CA in `ca_dir` and writes `ca.crt`, `node.crt`
/// and `node.key` into `out`. `hosts`: more names it is valid for (IP addresses or DNS names,
/// for a server such as etcd that clients reach by address); the node id stays its identity.
pub fn issue(ca_dir: &Path, node: &str, hosts: &[String], out: &Path) -> Result<(), TlsError> {
    if node.is_empty() || ServerName::try_from(node.to_string()).is_err() {
        return Err(TlsError::BadName(node.to_string()));
    }
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let (cert, key) = strata_api::pki::sign(&ca_pem, &read(&ca_dir.join(CA_KEY))?, node, hosts)?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Io { path: out.to_path_buf(), source })?;
    write(&out.join(CA_CERT), &ca_pem, false)?;
    write(&out.join(NODE_KEY), &key, true)?;
    write(&out.join(NODE_CERT), &cert, false)
}

/// This node's TLS identity: mutual TLS configurations for both ends of a connection. Loaded
/// from a directory, and reloaded from it when its files change (`reload_if_changed`):
/// connections opened after a reload use the new certificate and CA, open ones go on.
pub struct Tls {
    /// The node id the certificate names.
    pub node: String,
    dir: PathBuf,
    current: parking_lot::RwLock<Arc<Configs>>,
    /// The files' modification times and sizes at the last load.
    stamp: parking_lot::Mutex<strata_api::tls::FileStamp>,
}

struct Configs {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// The SDK's: a client certificate is checked when one is given, not required (callers
    /// prove who they are with tokens).
    sdk: Arc<rustls::ServerConfig>,
    /// The SDK's when every client must present a certificate of the cluster CA.
    sdk_mtls: Arc<rustls::ServerConfig>,
    /// For this node's calls to other engines' SDKs (its certificate as the client's).
    sdk_client: strata_api::tls::ClientTls,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("node", &self.node).field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn stamp(dir: &Path) -> strata_api::tls::FileStamp {
    strata_api::tls::file_stamp(dir, &[CA_CERT, NODE_CERT, NODE_KEY])
}

/// Reads `ca.crt` (one CA, or several while a CA is being replaced), `node.crt` and `node.key`.
fn configs(dir: &Path) -> Result<(String, Configs), TlsError> {
    let pem = |name: &str| -> Result<(PathBuf, String), TlsError> {
        let p = dir.join(name);
        let text = read(&p)?;
        Ok((p, text))
    };
    let bad = |path: &Path, why: String| TlsError::Pem { path: path.to_path_buf(), why };
    let (ca_path, ca) = pem(CA_CERT)?;
    let (cert_path, cert) = pem(NODE_CERT)?;
    let (key_path, key) = pem(NODE_KEY)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.map_err(|e| bad(&ca_path, e.to_string()))?).map_err(|e| bad(&ca_path, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad(&ca_path, "no certificate".into()));
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<_, _>>().map_err(|e| bad(&cert_path, e.to_string()))?;
    let first = chain.first().ok_or_else(|| bad(&cert_path, "no certificate".into()))?;
    let node = identity(first).ok_or_else(|| TlsError::NoIdentity(cert_path.clone()))?;
    let key_pem = key;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| bad(&key_path, e.to_string()))?;
    let roots = Arc::new(roots);
    let config = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config)?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(config)?;
    let mut sdk_mtls = server.clone();
    sdk_mtls.alpn_protocols = vec![b"h2".to_vec()];
    let optional = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut sdk = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config)?
        .with_client_cert_verifier(optional)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(config)?;
    sdk.alpn_protocols = vec![b"h2".to_vec()];
    let sdk_client = strata_api::tls::ClientTls::new(ca.as_bytes(), Some((cert.as_bytes(), key_pem.as_bytes()))).map_err(TlsError::Config)?;
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(config)?;
    Ok((node, Configs { server: Arc::new(server), client: Arc::new(client), sdk: Arc::new(sdk), sdk_mtls: Arc::new(sdk_mtls), sdk_client }))
}

impl Tls {
    /// Loads `ca.crt`, `node.crt` and `node.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Tls, TlsError> {
        let before = stamp(dir);
        let (node, c) = configs(dir)?;
        Ok(Tls { node, dir: dir.to_path_buf(), current: parking_lot::RwLock::new(Arc::new(c)), stamp: parking_lot::Mutex::new(before) })
    }

    /// Loads the directory again if any of its files changed since the last load; true when
    /// the new files are in use. A certificate for another node, or files that do not load
    /// (half-written, say), leave the current ones in use and report why.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.dir);
        if *self.stamp.lock() == now {
            return Ok(false);
        }
        let (node, c) = configs(&self.dir)?;
        if node != self.node {
            return Err(TlsError::Config(format!(
                "the new certificate in {} is for node {node:?}, not {:?}; keeping the current one",
                self.dir.display(),
                self.node
            )));
        }
        *self.current.write() = Arc::new(c);
        *self.stamp.lock() = now;
        Ok(true)
    }

    /// Checks the directory every `every` for changed files and reloads them, for the
    /// process's life.
    pub fn watch(self: &Arc<Self>, every: std::time::Duration) {
        strata_api::tls::watch(self, every, "replication certificate", &self.dir, |t: &Tls| t.reload_if_changed().map_err(|e| e.to_string()));
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().server.clone())
    }

    /// The SDK's acceptor (the same certificate): client certificates of the cluster CA
    /// required when `require_client_cert`, else checked when given.
    pub fn sdk_acceptor(&self, require_client_cert: bool) -> tokio_rustls::TlsAcceptor {
        let c = self.current.read();
        tokio_rustls::TlsAcceptor::from(if require_client_cert { c.sdk_mtls.clone() } else { c.sdk.clone() })
    }

    /// An SDK client that presents this node's certificate (for calls to other engines), as
    /// loaded with the rest (a rotated certificate is used once reloaded).
    pub fn sdk_client(&self) -> strata_api::tls::ClientTls {
        self.current.read().sdk_client.clone()
    }

    /// Opens TLS over `io` (a TCP connection) to node `node`: the other end must present the
    /// CA's certificate for that node (and gets this node's).
    pub async fn connect<IO>(&self, io: IO, node: &str) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(node.to_string()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let client = self.current.read().client.clone();
        tokio_rustls::TlsConnector::from(client).connect(name, io).await
    }
}

/// The node a (verified) certificate names: its first DNS subject alternative name.
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    strata_api::tls::identity(cert)
}

/// The node the peer of an accepted connection proved to be.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<String> {
    conn.peer_certificates().and_then(|c| c.first()).and_then(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_and_loads() {
        let dir = std::env::temp_dir().join(format!("strata-tls-{}", uuid::Uuid::new_v4()));
        init_ca(&dir.join("ca")).unwrap();
        assert!(matches!(init_ca(&dir.join("ca")), Err(TlsError::Exists(_))), "a CA is never replaced");
        issue(&dir.join("ca"), "node-1", &[], &dir.join("node-1")).unwrap();
        let tls = Tls::load(&dir.join("node-1")).unwrap();
        assert_eq!(tls.node, "node-1");
        assert!(matches!(issue(&dir.join("ca"), "bad name!", &[], &dir.join("x")), Err(TlsError::BadName(_))));
        assert!(matches!(Tls::load(&dir.join("missing")), Err(TlsError::Io { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
