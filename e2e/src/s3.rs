//! A real S3 server for tests, on a free loopback port, with access key `AKSTRATA`, secret key
//! `SKSTRATA` and a bucket `backups`: `s3s-fs` (crates.io) over a temporary directory, or
//! Ceph's RADOS Gateway on a single-host Ceph (`e2e/ceph/start.sh`).

use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "AKSTRATA";
pub const SECRET_KEY: &str = "SKSTRATA";
pub const BUCKET: &str = "backups";

pub struct S3 {
    /// s3s-fs; None for the RADOS Gateway, whose daemons write pid files into `<root>/run`.
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// s3s-fs: where the objects are files, `<root>/<bucket>/<key>`. RADOS Gateway: the Ceph
    /// cluster's directory.
    pub root: tempfile::TempDir,
}

impl Drop for S3 {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        } else {
            stop_daemons(&self.root.path().join("run"));
        }
    }
}

/// Kills the processes of the pid files in `dir`.
fn stop_daemons(dir: &std::path::Path) {
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if f.path().extension().is_some_and(|e| e == "pid") {
            if let Some(pid) = std::fs::read_to_string(f.path()).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
                // SAFETY: kill(2) of a daemon this helper started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A missing server skips the test (printing why), except under CI (`CI` set), which installs
/// them all (scripts/test.sh): there it fails.
fn missing(what: &str, e: impl std::fmt::Display) -> Option<S3> {
    assert!(std::env::var_os("CI").is_none(), "{what} cannot be started ({e}); scripts/test.sh installs it");
    eprintln!("skipped: {what} cannot be started ({e}); scripts/test.sh installs it");
    None
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
            Err(e) => return missing("s3s-fs", e),
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "s3s-fs did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(S3 { child: Some(child), url: format!("http://127.0.0.1:{port}"), root })
    }

    /// Ceph's RADOS Gateway on a single-host Ceph of its own (1 monitor, 1 OSD on a file), ready
    /// in about 15 s; None (printing why) when Ceph is not installed, except under CI.
    pub fn start_rgw() -> Option<S3> {
        if let Err(e) = Command::new("radosgw").arg("--version").output() {
            return missing("radosgw", e);
        }
        let root = crate::tempdir();
        let (mon, rgw) = (crate::free_port(), crate::free_port());
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/ceph/start.sh");
        let run = Command::new(script).arg(root.path()).args([mon.to_string(), rgw.to_string()]).output();
        let s3 = S3 { child: None, url: format!("http://127.0.0.1:{rgw}"), root };
        let failed = match &run {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(format!("{}: {}{}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failed {
            // The script's own output, its daemons' start-up errors, and the end of each log.
            let logs = s3.root.path().join("log");
            let mut report = format!("the RADOS Gateway did not start (e2e/ceph/start.sh): {why}\n");
            let mut names: Vec<_> = std::fs::read_dir(&logs).into_iter().flatten().flatten().map(|e| e.path()).collect();
            names.sort();
            for path in names {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n");
                report.push_str(&format!("--- {} (last lines)\n{tail}\n", path.display()));
            }
            panic!("{report}");
        }
        Some(s3)
    }

    /// Flips a byte in the middle of every object under `prefix` of the bucket; how many.
    pub fn corrupt_objects(&self, prefix: &str) -> usize {
        if self.child.is_some() {
            let dir = self.root.path().join(BUCKET).join(prefix);
            let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|f| f.unwrap().path()).collect();
            for path in &files {
                let mut bytes = std::fs::read(path).unwrap();
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0xFF;
                std::fs::write(path, bytes).unwrap();
            }
            return files.len();
        }
        let s3cmd = |args: &[&str]| {
            let host = self.url.trim_start_matches("http://");
            let out = Command::new("s3cmd")
                .args([
                    &format!("--host={host}"),
                    "--host-bucket=",
                    "--no-ssl",
                    &format!("--access_key={ACCESS_KEY}"),
                    &format!("--secret_key={SECRET_KEY}"),
                ])
                .args(args)
                .output()
                .expect("s3cmd runs");
            assert!(out.status.success(), "s3cmd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        let listing = s3cmd(&["ls", "--recursive", &format!("s3://{BUCKET}/{prefix}/")]);
        let keys: Vec<String> = listing.lines().filter_map(|l| l.split_whitespace().last()).map(str::to_string).collect();
        let tmp = crate::tempdir();
        let file = tmp.path().join("object");
        let f = file.to_str().unwrap();
        for key in &keys {
            s3cmd(&["get", "--force", key, f]);
            let mut bytes = std::fs::read(&file).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xFF;
            std::fs::write(&file, bytes).unwrap();
            s3cmd(&["put", f, key]);
        }
        keys.len()
    }
}
