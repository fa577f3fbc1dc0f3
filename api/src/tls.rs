//! TLS for SDK clients: a gRPC channel to an engine's SDK over TLS under the cluster CA (rustls).
//!
//! Every engine's certificate names its node id, and a client reaching the SDK through an
//! address (a Service, a load balancer, 127.0.0.1) does not know which node answers: any
//! certificate the cluster CA signed for a node is accepted, and the name checked is the one
//! the certificate itself carries. A client certificate is sent when one is given.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::path::Path;
use std::sync::Arc;
use tonic::transport::{Channel, Endpoint, Uri};

/// What a reload compares to tell that certificate files changed: each file's modification time
/// and length (a missing one counts as the epoch and 0).
pub type FileStamp = Vec<(std::time::SystemTime, u64)>;

/// The `FileStamp` of `files` in `dir`.
pub fn file_stamp(dir: &Path, files: &[&str]) -> FileStamp {
    let of = |f: &&str| std::fs::metadata(dir.join(f)).map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()));
    files.iter().map(|f| of(f).unwrap_or((std::time::UNIX_EPOCH, 0))).collect()
}

/// Calls `reload` (true: new files in use) on `target` every `every` for as long as `target`
/// lives, logging each reload and each failure (the current files then stay in use): `what`
/// names the certificate, `dir` where its files are.
pub fn watch<T, F>(target: &Arc<T>, every: std::time::Duration, what: &'static str, dir: &Path, reload: F)
where
    T: Send + Sync + 'static,
    F: Fn(&T) -> Result<bool, String> + Send + 'static,
{
    let (target, dir) = (Arc::downgrade(target), dir.display().to_string());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(t) = target.upgrade() else { return };
            match reload(&t) {
                Ok(true) => tracing::info!(%dir, "{what} reloaded: new connections use it"),
                Ok(false) => {}
                Err(e) => tracing::warn!(%dir, "{what} not reloaded: {e}"),
            }
        }
    });
}

/// The node id a certificate names (its first DNS subject alternative name).
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = c.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts a certificate the CA signed for any node: the chain is checked by webpki, against
/// the name in the certificate.
#[derive(Debug)]
struct AnyNode {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for AnyNode {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let node = identity(end_entity).ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        let name = ServerName::try_from(node).map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// How an SDK client reaches engines over TLS.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// Trusts the CA certificates in `ca_pem`; presents `identity` (certificate chain and key,
    /// PEM) when given.
    pub fn new(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> Result<ClientTls, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(c.map_err(|e| format!("the CA certificate: {e}"))?).map_err(|e| format!("the CA certificate: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no CA certificate in the CA file".into());
        }
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(|e| e.to_string())?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyNode { inner }));
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(cert).collect::<Result<_, _>>().map_err(|e| format!("the client certificate: {e}"))?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("the client key: {e}"))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ClientTls { config: Arc::new(config) })
    }

    /// `new` from files: the CA file and, optionally, a certificate and key file.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<ClientTls, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let ca_pem = read(ca)?;
        match identity {
            None => ClientTls::new(&ca_pem, None),
            Some((c, k)) => ClientTls::new(&ca_pem, Some((&read(c)?, &read(k)?))),
        }
        .map_err(|e| format!("{}: {e}", ca.display()))
    }

    /// `from_files` of a directory that `strata-engine certs issue` wrote (`ca.crt`, `node.crt`,
    /// `node.key`): its certificate is the client's.
    pub fn from_node_dir(dir: &Path) -> Result<ClientTls, String> {
        ClientTls::from_files(&dir.join("ca.crt"), Some((&dir.join("node.crt"), &dir.join("node.key"))))
    }

    fn endpoint(endpoint: &str) -> Result<Endpoint, String> {
        // TLS is done here, under the channel: the URI tonic sees is plain http.
        let uri = crate::endpoint_uri(endpoint).replacen("https://", "http://", 1);
        Endpoint::from_shared(uri).map_err(|e| format!("invalid endpoint {endpoint:?}: {e}"))
    }

    fn connector(
        &self,
    ) -> impl tower::Service<
        Uri,
        Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Clone {
        let config = self.config.clone();
        tower::service_fn(move |uri: Uri| {
            let config = config.clone();
            async move {
                let host = uri.host().unwrap_or("localhost").trim_start_matches('[').trim_end_matches(']').to_string();
                let port = uri.port_u16().unwrap_or(9020);
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                // The name given here is not what is checked (see `AnyNode`).
                let name = ServerName::try_from("strata-sdk").map_err(std::io::Error::other)?;
                let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
                Ok(hyper_util::rt::TokioIo::new(tls))
            }
        })
    }

    /// A channel to `endpoint` over TLS, connected now; each call may take `timeout`.
    pub async fn connect(&self, endpoint: &str, connect_timeout: std::time::Duration, timeout: std::time::Duration) -> Result<Channel, String> {
        Self::endpoint(endpoint)?
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .connect_with_connector(self.connector())
            .await
            .map_err(|e| format!("{e}: {}", source_chain(&e)))
    }

    /// A channel to `endpoint` over TLS that connects on first use.
    pub fn connect_lazy(&self, endpoint: &str, connect_timeout: std::time::Duration, timeout: std::time::Duration) -> Result<Channel, String> {
        Ok(Self::endpoint(endpoint)?.connect_timeout(connect_timeout).timeout(timeout).connect_with_connector_lazy(self.connector()))
    }
}

/// The causes under an error, for messages that say why a connection failed.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

/// A channel to an SDK endpoint, connected now: over TLS when `tls` is given, else plaintext;
/// each call may take `timeout`.
pub async fn channel(
    endpoint: &str,
    tls: Option<&ClientTls>,
    connect_timeout: std::time::Duration,
    timeout: std::time::Duration,
) -> Result<Channel, String> {
    match tls {
        Some(t) => t.connect(endpoint, connect_timeout, timeout).await,
        None => Endpoint::from_shared(crate::endpoint_uri(endpoint))
            .map_err(|e| format!("invalid endpoint {endpoint:?}: {e}"))?
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("{e}: {}", source_chain(&e))),
    }
}

/// A channel to an SDK endpoint that connects on first use: over TLS when `tls` is given.
pub fn channel_lazy(
    endpoint: &str,
    tls: Option<&ClientTls>,
    connect_timeout: std::time::Duration,
    timeout: std::time::Duration,
) -> Result<Channel, String> {
    match tls {
        Some(t) => t.connect_lazy(endpoint, connect_timeout, timeout),
        None => Ok(Endpoint::from_shared(crate::endpoint_uri(endpoint))
            .map_err(|e| format!("invalid endpoint {endpoint:?}: {e}"))?
            .connect_timeout(connect_timeout)
            .timeout(timeout)
            .connect_lazy()),
    }
}
