//! A real `strata-engine` process on file-backed devices.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `strata-engine certs ARGS` (make a CA, issue a certificate); panics with its stderr
/// when it fails.
pub fn certs<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) {
    let out = Command::new(engine_bin()).arg("certs").args(args).output().expect("strata-engine certs");
    assert!(out.status.success(), "strata-engine certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The engine binary: `$STRATA_ENGINE_BIN`, else `strata-engine` in the target directory of the
/// running test (`target/<profile>/`, beside `deps/`). Build the workspace first.
pub fn engine_bin() -> PathBuf {
    if let Ok(p) = std::env::var("STRATA_ENGINE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("deps dir");
    let dir = if dir.ends_with("deps") { dir.parent().expect("target dir") } else { dir };
    let p = dir.join("strata-engine");
    assert!(p.exists(), "{} is missing: build the workspace first (cargo build --workspace)", p.display());
    p
}

pub struct EngineProc {
    pub dir: PathBuf,
    pub devices: Vec<PathBuf>,
    pub extra: Vec<String>,
    /// Environment of the next start (e.g. `FAILPOINTS`).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    pub sdk: String,
    pub nbd: String,
    pub metrics: String,
    /// The replication port (changes at every start: the engine binds port 0).
    pub repl: String,
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
            env: Vec::new(),
            child: None,
            sdk: String::new(),
            nbd: String::new(),
            metrics: String::new(),
            repl: String::new(),
            socket: dir.join("nbd.sock"),
        }
    }

    /// What every run of this engine wrote to its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("engine.log")).unwrap_or_default()
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new(engine_bin());
        c.arg("--data-dir").arg(self.dir.join("data"));
        for d in &self.devices {
            c.arg("--device").arg(d);
        }
        for flag in ["--nbd-listen", "--sdk-listen", "--metrics-listen", "--repl-listen"] {
            // Free ports unless the test chose one.
            if !self.extra.iter().any(|a| a == flag) {
                c.args([flag, "127.0.0.1:0"]);
            }
        }
        c.arg("--nbd-socket").arg(&self.socket);
        c.arg("--ready-file").arg(self.dir.join("ready.json"));
        c.args(&self.extra);
        c.env("STRATA_LOG", std::env::var("STRATA_TEST_LOG").unwrap_or_else(|_| "warn".into()));
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Spawns the engine and waits until it is listening; on failure returns its stderr.
    pub fn spawn(&mut self) -> Result<(), String> {
        let ready = self.dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        // Appended across restarts, so a test can read what every run of this engine said.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("engine.log")).unwrap();
        let mut child = self.command().stdout(Stdio::null()).stderr(log).spawn().expect("spawn strata-engine");
        let t0 = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&s).unwrap();
                self.sdk = v["sdk"].as_str().unwrap().to_string();
                self.nbd = v["nbd"].as_str().unwrap().to_string();
                self.metrics = v["metrics"].as_str().unwrap().to_string();
                self.repl = v["replication"].as_str().unwrap_or_default().to_string();
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

    /// Waits (at most `timeout`) for the engine to exit by itself; its status, or None if it
    /// still runs (it is then left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
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

    pub fn sdk(&self) -> crate::Sdk {
        crate::Sdk::connect(&self.sdk, None, self.client_tls().as_ref())
    }

    /// A client of this engine's SDK that sends `token`.
    pub fn sdk_as(&self, token: &str) -> crate::Sdk {
        crate::Sdk::connect(&self.sdk, Some(token), self.client_tls().as_ref())
    }

    /// The directory of this engine's certificate (`--tls-dir`), if it has one.
    pub fn tls_dir(&self) -> Option<PathBuf> {
        let i = self.extra.iter().position(|a| a == "--tls-dir")?;
        self.extra.get(i + 1).map(PathBuf::from)
    }

    /// How a client reaches this engine's SDK: over TLS under its CA when it has a certificate,
    /// presenting the node's own certificate (as the node's CSI plugin does), so an engine run
    /// with --sdk-require-client-cert answers too.
    pub fn client_tls(&self) -> Option<strata_api::tls::ClientTls> {
        self.tls_dir().map(|d| strata_api::tls::ClientTls::from_node_dir(&d).expect("the engine's certificate loads"))
    }

    /// The process id while running (for SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends a signal to the running engine (SIGSTOP pauses it, SIGCONT resumes it).
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    /// `strata-engine check` on this engine's devices and data dir (the engine must be stopped).
    pub fn check(&self) -> (bool, String) {
        self.check_with(&[])
    }

    /// `strata-engine check` of this engine's devices with `extra` arguments (`--repair`).
    pub fn check_with(&self, extra: &[&str]) -> (bool, String) {
        let data = self.dir.join("data");
        let mut args = vec!["--data-dir", data.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.check_with_store(&args)
    }

    /// `strata-engine check` of this engine's devices with exactly `args` besides the devices
    /// (`--etcd URL --node-id ID` instead of the embedded store).
    pub fn check_with_store(&self, args: &[&str]) -> (bool, String) {
        let mut c = Command::new(engine_bin());
        c.arg("check").args(args);
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
