//! A real S3 server for tests: `s3s-fs` (crates.io) on a free loopback port over a temporary
//! directory, with access key `AKSTRATA`, secret key `SKSTRATA` and a bucket `backups`.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "AKSTRATA";
pub const SECRET_KEY: &str = "SKSTRATA";
pub const BUCKET: &str = "backups";

pub struct S3 {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Where the objects are files: `<root>/<bucket>/<key>`.
    pub root: tempfile::TempDir,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3 {
    /// The server, listening; None (printing why, so the caller can skip) when `s3s-fs` cannot
    /// be started — except under CI (`CI` set), where that fails the test.
    pub fn start() -> Option<S3> {
        let root = crate::tempdir();
        std::fs::create_dir(root.path().join(BUCKET)).unwrap();
        let port = crate::free_port();
        let child = match Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                // CI installs it (scripts/test.sh): there, a missing server is a failure.
                assert!(std::env::var_os("CI").is_none(), "s3s-fs cannot be started ({e}); scripts/test.sh installs it");
                eprintln!("skipped: s3s-fs cannot be started ({e}); scripts/test.sh installs it (cargo install s3s-fs)");
                return None;
            }
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "s3s-fs did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(S3 { child, url: format!("http://127.0.0.1:{port}"), root })
    }
}
