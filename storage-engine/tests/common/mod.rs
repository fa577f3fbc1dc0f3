//! Test harness: a real `strata-engine` process on file-backed devices, an SDK client, and a
//! minimal NBD client for the cases real clients cannot produce (garbage, truncation, pipelining).
#![allow(dead_code, clippy::result_large_err)]

pub mod nbd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strata_api::v1 as pb;

pub const BIN: &str = env!("CARGO_BIN_EXE_strata-engine");

pub struct EngineProc {
    pub dir: PathBuf,
    pub devices: Vec<PathBuf>,
    pub extra: Vec<String>,
    child: Option<Child>,
    pub sdk: String,
    pub nbd: String,
    pub metrics: String,
    pub socket: PathBuf,
}

impl EngineProc {
    /// Starts an engine with `n` device files of `size` bytes in `dir`.
    pub fn start(dir: &Path, n: usize, size: &str) -> EngineProc {
        Self::start_with(dir, n, size, &[])
    }

    pub fn start_with(dir: &Path, n: usize, size: &str, extra: &[&str]) -> EngineProc {
        let mut e = Self::new(dir, n, size, extra);
        e.spawn().expect("engine starts");
        e
    }

    /// The engine's configuration, not started yet.
    pub fn new(dir: &Path, n: usize, size: &str, extra: &[&str]) -> EngineProc {
        let devices = (0..n).map(|i| dir.join(format!("dev{i}.img"))).collect();
        EngineProc {
            dir: dir.to_path_buf(),
            devices,
            extra: std::iter::once(format!("--device-size={size}")).chain(extra.iter().map(|s| s.to_string())).collect(),
            child: None,
            sdk: String::new(),
            nbd: String::new(),
            metrics: String::new(),
            socket: dir.join("nbd.sock"),
        }
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--data-dir").arg(self.dir.join("data"));
        for d in &self.devices {
            c.arg("--device").arg(d);
        }
        c.args(["--nbd-listen", "127.0.0.1:0", "--sdk-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--repl-listen", "127.0.0.1:0"]);
        c.arg("--nbd-socket").arg(&self.socket);
        c.arg("--ready-file").arg(self.dir.join("ready.json"));
        c.args(&self.extra);
        c.env("STRATA_LOG", "warn");
        c
    }

    /// Spawns the engine and waits until it is listening; on failure returns its stderr.
    pub fn spawn(&mut self) -> Result<(), String> {
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(self.dir.join("engine.log")).unwrap();
        let mut child = self.command().stdout(Stdio::null()).stderr(log).spawn().expect("spawn strata-engine");
        let t0 = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&s).unwrap();
                self.sdk = v["sdk"].as_str().unwrap().to_string();
                self.nbd = v["nbd"].as_str().unwrap().to_string();
                self.metrics = v["metrics"].as_str().unwrap().to_string();
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join("engine.log")).unwrap_or_default();
                return Err(format!("engine exited with {status}: {log}"));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                panic!("engine did not become ready in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn().expect("engine restarts");
    }

    pub fn uri(&self, vol: &str) -> String {
        format!("nbd://{}/{}", self.nbd, vol)
    }

    pub fn unix_uri(&self, vol: &str) -> String {
        format!("nbd+unix:///{}?socket={}", vol, self.socket.display())
    }

    pub fn sdk(&self) -> Sdk {
        Sdk::new(&self.sdk)
    }

    /// `strata-engine check` on this engine's devices and data dir (the engine must be stopped).
    pub fn check(&self) -> (bool, String) {
        let mut c = Command::new(BIN);
        c.arg("check").arg("--data-dir").arg(self.dir.join("data"));
        for d in &self.devices {
            c.arg("--device").arg(d);
        }
        let out = c.output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

impl Drop for EngineProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A blocking SDK client (its own small runtime), so tests stay synchronous.
pub struct Sdk {
    rt: tokio::runtime::Runtime,
    ch: tonic::transport::Channel,
}

impl Sdk {
    pub fn new(addr: &str) -> Sdk {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let ch = rt.block_on(tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect()).unwrap();
        Sdk { rt, ch }
    }

    pub fn create(&self, name: &str, size: u64) -> Result<pb::Volume, tonic::Status> {
        self.create_full(name, size, 1, &[])
    }

    pub fn create_full(&self, name: &str, size: u64, repl: u32, labels: &[(&str, &str)]) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        let spec = pb::VolumeSpec { size_bytes: size, repl, labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Default::default() };
        self.rt
            .block_on(c.create(pb::CreateVolumeRequest { name: name.into(), spec: Some(spec) }))
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub fn create_with_qos(&self, name: &str, size: u64, qos: pb::QosLimits) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        let spec = pb::VolumeSpec { size_bytes: size, repl: 1, qos: Some(qos), ..Default::default() };
        self.rt
            .block_on(c.create(pb::CreateVolumeRequest { name: name.into(), spec: Some(spec) }))
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub fn update(&self, req: pb::UpdateVolumeRequest) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.update(req)).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn inspect(&self, name: &str) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.inspect(pb::InspectVolumeRequest { name: name.into() })).map(|r| r.into_inner().volume.unwrap())
    }

    pub fn list(&self) -> Vec<pb::Volume> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.list(pb::ListVolumesRequest {})).unwrap().into_inner().volumes
    }

    pub fn resize(&self, name: &str, size: u64) -> Result<pb::Volume, tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt
            .block_on(c.update(pb::UpdateVolumeRequest { name: name.into(), size_bytes: size, ..Default::default() }))
            .map(|r| r.into_inner().volume.unwrap())
    }

    pub fn delete(&self, name: &str, force: bool) -> Result<(), tonic::Status> {
        let mut c = pb::volume_service_client::VolumeServiceClient::new(self.ch.clone());
        self.rt.block_on(c.delete(pb::DeleteVolumeRequest { name: name.into(), force })).map(|_| ())
    }

    pub fn pool(&self) -> pb::Pool {
        let mut c = pb::pool_service_client::PoolServiceClient::new(self.ch.clone());
        self.rt.block_on(c.list(pb::ListPoolsRequest {})).unwrap().into_inner().pools.remove(0)
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("strata-test-").tempdir_in(std::env::var("STRATA_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no rand crate.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
