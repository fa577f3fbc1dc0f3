//! Test helpers: a strata-csi process on a unix socket and a gRPC channel to it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

pub struct Csi {
    child: Child,
    pub rt: tokio::runtime::Runtime,
    pub ch: Channel,
}

impl Csi {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Csi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn csi_bin() -> PathBuf {
    strata_e2e::engine_bin().with_file_name("strata-csi")
}

/// Starts strata-csi in `mode` against the SDK of `engine` (over TLS under its CA when it has
/// a certificate), with `extra` arguments, and connects to its socket.
pub fn start_csi(dir: &Path, mode: &str, engine: &strata_e2e::EngineProc, extra: &[&str]) -> Csi {
    let sdk = engine.sdk.as_str();
    let ca: Vec<String> =
        engine.tls_dir().map(|d| vec!["--sdk-ca-file".to_string(), d.join("ca.crt").to_string_lossy().into_owned()]).unwrap_or_default();
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let sock = dir.join(format!("csi-{mode}-{}.sock", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let child = Command::new(csi_bin())
        .args(["--mode", mode, "--sdk", sdk])
        .args(&ca)
        .args(extra)
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("strata-csi is built (cargo build --workspace)");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "strata-csi did not create its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The socket file appears at bind(), a moment before listen(): retry a refused connect.
    let ch = loop {
        let sock = sock.clone();
        let c = rt.block_on(Endpoint::try_from("http://csi.local").unwrap().connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move { Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(sock).await?)) }
        })));
        match c {
            Ok(ch) => break ch,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(20), "strata-csi does not accept on its socket: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Csi { child, rt, ch }
}
