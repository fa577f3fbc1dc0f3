//! A real etcd (Debian's etcd-server) on free loopback ports, in a temporary directory.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdProc {
    child: Child,
    pub url: String,
    peer_url: String,
    /// Serving TLS with this directory's `node.crt`/`node.key`, requiring client certificates
    /// signed by its `ca.crt`.
    tls: Option<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl EtcdProc {
    /// Where this etcd keeps its data (to check what the records hold on disk).
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Starts etcd on two free loopback ports. A port taken by another process between
    /// `free_port` and etcd's bind makes etcd exit at once: then it is started again on new ports.
    pub fn start() -> EtcdProc {
        Self::start_with(None)
    }

    /// etcd over TLS only (`https://`), with `tls_dir`'s certificate (valid for 127.0.0.1),
    /// taking only clients with a certificate signed by its CA.
    pub fn start_tls(tls_dir: &std::path::Path) -> EtcdProc {
        Self::start_with(Some(tls_dir.to_path_buf()))
    }

    fn start_with(tls: Option<std::path::PathBuf>) -> EtcdProc {
        let dir = crate::tempdir();
        for _ in 0..5 {
            let (client, peer) = (free_port(), free_port());
            let scheme = if tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let _ = std::fs::remove_dir_all(dir.path().join("etcd"));
            let mut child = spawn(&dir, &url, &peer_url, tls.as_deref());
            let t0 = Instant::now();
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
                    // Another test's etcd may have bound the same port a moment earlier (both
                    // picked it while it was free): then ours exits on its failed bind, and the
                    // port answers for the other one until that test ends. Ours must live on.
                    std::thread::sleep(Duration::from_millis(300));
                    if child.try_wait().ok().flatten().is_none() {
                        return EtcdProc { child, url, peer_url, tls, _dir: dir };
                    }
                    break;
                }
                if child.try_wait().ok().flatten().is_some() {
                    break; // exited (a port was taken): try new ports
                }
                assert!(t0.elapsed() < Duration::from_secs(20), "etcd did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("etcd exited at start five times (ports taken?)");
    }

    /// Kills etcd (SIGKILL): every client loses it at once.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the killed etcd again, on the same ports and data.
    pub fn restart(&mut self) {
        self.child = spawn(&self._dir, &self.url, &self.peer_url, self.tls.as_deref());
        let addr = self.url.trim_start_matches("http://").trim_start_matches("https://").to_string();
        let t0 = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "etcd did not come back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn spawn(dir: &tempfile::TempDir, url: &str, peer_url: &str, tls: Option<&std::path::Path>) -> Child {
    let mut c = Command::new("etcd");
    if let Some(t) = tls {
        c.arg("--cert-file").arg(t.join("node.crt")).arg("--key-file").arg(t.join("node.key"));
        c.arg("--trusted-ca-file").arg(t.join("ca.crt")).arg("--client-cert-auth");
    }
    c.args(["--name", "t", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", url, "--advertise-client-urls", url])
        .args(["--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian package etcd-server) is installed")
}
