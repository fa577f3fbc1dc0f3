//! A real etcd (Debian's etcd-server) on free loopback ports, in a temporary directory.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdProc {
    child: Child,
    pub url: String,
    peer_url: String,
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
    /// Starts etcd on two free loopback ports. A port taken by another process between
    /// `free_port` and etcd's bind makes etcd exit at once: then it is started again on new ports.
    pub fn start() -> EtcdProc {
        let dir = crate::tempdir();
        for _ in 0..5 {
            let (client, peer) = (free_port(), free_port());
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let _ = std::fs::remove_dir_all(dir.path().join("etcd"));
            let mut child = spawn(&dir, &url, &peer_url);
            let t0 = Instant::now();
            loop {
                if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
                    // Another test's etcd may have bound the same port a moment earlier (both
                    // picked it while it was free): then ours exits on its failed bind, and the
                    // port answers for the other one until that test ends. Ours must live on.
                    std::thread::sleep(Duration::from_millis(300));
                    if child.try_wait().ok().flatten().is_none() {
                        return EtcdProc { child, url, peer_url, _dir: dir };
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
        self.child = spawn(&self._dir, &self.url, &self.peer_url);
        let addr = self.url.trim_start_matches("http://").to_string();
        let t0 = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "etcd did not come back");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn spawn(dir: &tempfile::TempDir, url: &str, peer_url: &str) -> Child {
    Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path().join("etcd"))
        .args(["--listen-client-urls", url, "--advertise-client-urls", url])
        .args(["--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url])
        .args(["--initial-cluster", &format!("t={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd (Debian package etcd-server) is installed")
}
