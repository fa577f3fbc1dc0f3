//! The Docker volume plugin (`strata-csi --mode docker`) against a real Docker Engine (Debian's
//! docker.io, its own daemon on its own socket, no network): create with options, a container
//! writes, the volume follows to another node's plugin, a second container reads, bad options
//! give Docker a clear error, container exit leaves no mount or loop device, a swarm service
//! (one-node swarm on loopback) mounts a new volume with options, Portworx's inline
//! `-v "name=...;size=...:/data"` works, and `docker volume rm` deletes the volume everywhere. Skipped, saying why, only where dockerd cannot start.

mod common;

use common::csi_bin;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use strata_e2e::cluster::Cluster;
use tonic::Code;

/// A Docker Engine of the test's own, stopped on drop.
struct Dockerd {
    child: Child,
    sock: PathBuf,
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops its containerd and unmounts what it mounted.
        unsafe_kill(self.child.id(), libc::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process we started.
    unsafe { libc::kill(pid as i32, sig) };
}

impl Dockerd {
    fn start(dir: &Path) -> Result<Dockerd, String> {
        let bin = ["/usr/sbin/dockerd", "/usr/bin/dockerd"].into_iter().find(|p| Path::new(p).exists()).ok_or("dockerd is not installed")?;
        let sock = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log")).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let d = Dockerd { child, sock };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(60) {
            if d.docker(&["info"]).status.success() {
                return Ok(d);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(format!("dockerd did not answer within 60 s: {}", std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()))
    }

    fn docker(&self, args: &[&str]) -> Output {
        let client = if Path::new("/usr/bin/docker").exists() { "/usr/bin/docker" } else { "docker" };
        Command::new(client)
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("the docker client runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(o.status.success(), "docker {}: {}{}", args.join(" "), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }
}

/// A base image made from busybox-static (nothing can be pulled here).
fn import_busybox(d: &Dockerd, dir: &Path) -> Result<&'static str, String> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| Path::new(p).exists()).ok_or("busybox is not installed")?;
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).map_err(|e| e.to_string())?;
    std::fs::copy(busybox, root.join("bin/busybox")).map_err(|e| e.to_string())?;
    for a in ["sh", "cat", "echo", "sync", "ls", "test", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).map_err(|e| e.to_string())?;
    }
    let tar = dir.join("rootfs.tar");
    let s = Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg(".").status().map_err(|e| e.to_string())?;
    if !s.success() {
        return Err("tar failed".into());
    }
    d.ok(&["import", &tar.to_string_lossy(), "strata-test-busybox:1"]);
    Ok("strata-test-busybox:1")
}

/// A plugin process on `socket` against engine `i` of the cluster.
struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn plugin(c: &Cluster, i: usize, socket: &Path, state: &Path) -> Plugin {
    let e = &c.engines[i];
    let mut cmd = Command::new(csi_bin());
    cmd.args(["--mode", "docker", "--sdk", &e.sdk, "--attach", "fuse"])
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--nbd-socket")
        .arg(&e.socket)
        .arg("--state-dir")
        .arg(state);
    if let Some(d) = e.tls_dir() {
        cmd.arg("--sdk-ca-file").arg(d.join("ca.crt"));
    }
    let _ = std::fs::remove_file(socket);
    let child = cmd.stderr(Stdio::null()).spawn().expect("strata-csi is built");
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the plugin did not create its socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    Plugin(child)
}

/// Mounts and loop devices under the plugins' state directories (`<dir>/node-*`): what a
/// container's exit must not leave behind.
fn leftovers(dir: &Path) -> Vec<String> {
    let d = dir.join("node-").to_string_lossy().into_owned();
    let mut out: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&d))
        .map(|m| format!("mount {m}"))
        .collect();
    let loops = Command::new("losetup").args(["-n", "-O", "NAME,BACK-FILE"]).output().unwrap();
    out.extend(String::from_utf8_lossy(&loops.stdout).lines().filter(|l| l.contains(&d)).map(|l| format!("loop {l}")));
    out
}

#[test]
fn docker_volumes_follow_their_containers_and_leave_nothing_behind() {
    let dir = tempfile::Builder::new().prefix("strata-docker-").tempdir_in("/var/tmp").unwrap();
    let d = match Dockerd::start(dir.path()) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED: the Docker Engine cannot start here: {why}");
            return;
        }
    };
    let image = import_busybox(&d, dir.path()).unwrap();
    let c = Cluster::start(2, "1GiB");
    // Docker finds legacy plugins by socket name in /run/docker/plugins.
    std::fs::create_dir_all("/run/docker/plugins").unwrap();
    let driver = format!("strata-t{}", std::process::id());
    let socket = PathBuf::from(format!("/run/docker/plugins/{driver}.sock"));
    let state: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("node-{}", i + 1))).collect();
    let p1 = plugin(&c, 0, &socket, &state[0]);

    // Create with options: the StorageClass keys plus size.
    d.ok(&["volume", "create", "-d", &driver, "--opt", "size=256MiB", "--opt", "repl=2", "dv"]);
    let v = c.sdk(0).inspect("dv").unwrap();
    assert_eq!((v.spec.as_ref().unwrap().size_bytes, v.replica_nodes.len()), (256 << 20, 2), "{v:?}");
    assert!(d.ok(&["volume", "ls", "-q"]).lines().any(|l| l == "dv"));
    let inspect = d.ok(&["volume", "inspect", "dv"]);
    assert!(inspect.contains("\"Scope\": \"global\""), "{inspect}");

    // Bad options: Docker shows the plugin's reason, and nothing is made.
    let bad = d.docker(&["volume", "create", "-d", &driver, "--opt", "repl=7", "bad"]);
    assert!(!bad.status.success());
    let why = String::from_utf8_lossy(&bad.stderr);
    assert!(why.contains("option repl") && why.contains("out of range"), "{why}");
    assert_eq!(c.sdk(0).inspect("bad").unwrap_err().code(), Code::NotFound);

    // A container on node-1 writes a file and exits: the volume is unmounted and detached.
    d.ok(&["run", "--rm", "--network", "none", "-v", "dv:/data", image, "sh", "-c", "echo written-on-node-1 > /data/f && sync"]);
    assert_eq!(leftovers(dir.path()), Vec::<String>::new(), "a container's exit left these behind");
    assert_eq!(c.sdk(0).inspect("dv").unwrap().attached_node, "", "detached after the container left");

    // The task moves to node-2: node-2's plugin mounts it there, and the file is there.
    drop(p1);
    let p2 = plugin(&c, 1, &socket, &state[1]);
    let read = d.ok(&["run", "--rm", "--network", "none", "-v", "dv:/data", image, "cat", "/data/f"]);
    assert_eq!(read, "written-on-node-1");
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());

    // Two containers at once share one mount; it goes when the last one leaves.
    let long = d.ok(&["run", "-d", "--network", "none", "-v", "dv:/data", image, "sleep", "30"]);
    d.ok(&["run", "--rm", "--network", "none", "-v", "dv:/data", image, "sh", "-c", "echo second > /data/g"]);
    assert_eq!(c.sdk(1).inspect("dv").unwrap().attached_node, "node-2", "still mounted for the first container");
    assert!(!leftovers(dir.path()).is_empty(), "the first container's mount stays");
    d.ok(&["rm", "-f", &long]);
    assert_eq!(leftovers(dir.path()), Vec::<String>::new(), "the last container's exit unmounts");

    // Swarm: a service whose task mounts a new volume through the plugin, with options.
    let port = 42000 + std::process::id() % 1000;
    d.ok(&["swarm", "init", "--advertise-addr", "127.0.0.1", "--listen-addr", &format!("127.0.0.1:{port}")]);
    let mount = format!("type=volume,source=swv,target=/data,volume-driver={driver},volume-opt=size=128MiB,volume-opt=repl=2");
    let once = ["--detach", "--name", "sw", "--restart-condition", "none", "--no-resolve-image"];
    d.ok(&[&["service", "create"][..], &once, &["--mount", &mount, image, "sh", "-c", "echo from-swarm > /data/f"]].concat());
    let t0 = Instant::now();
    loop {
        let st = d.ok(&["service", "ps", "sw", "--format", "{{.CurrentState}}|{{.Error}}"]);
        if st.starts_with("Complete") {
            break;
        }
        assert!(!st.starts_with("Failed") && !st.starts_with("Rejected"), "the swarm task failed: {st}");
        assert!(t0.elapsed() < Duration::from_secs(90), "the swarm task did not complete: {st}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let sv = c.sdk(1).inspect("swv").unwrap();
    assert_eq!((sv.spec.as_ref().unwrap().size_bytes, sv.replica_nodes.len()), (128 << 20, 2), "the service's volume-opt reached the volume");
    d.ok(&["service", "rm", "sw"]);
    let read = d.ok(&["run", "--rm", "--network", "none", "-v", "swv:/data", image, "cat", "/data/f"]);
    assert_eq!(read, "from-swarm");
    d.ok(&["swarm", "leave", "--force"]);
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    // The service's task container may take a moment to be removed after `service rm`.
    let t0 = Instant::now();
    while !d.docker(&["volume", "rm", "swv"]).status.success() {
        assert!(t0.elapsed() < Duration::from_secs(30), "docker volume rm swv kept failing");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Portworx's inline form: the volume is named and sized in `-v` itself.
    let inline = "name=inl;size=64MiB;repl=2";
    let spec = format!("{inline}:/data");
    d.ok(&["run", "--rm", "--network", "none", "--volume-driver", &driver, "-v", &spec, image, "sh", "-c", "echo inline > /data/f"]);
    let iv = c.sdk(1).inspect("inl").unwrap();
    assert_eq!((iv.spec.as_ref().unwrap().size_bytes, iv.replica_nodes.len()), (64 << 20, 2), "the inline options reached the volume");
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    d.ok(&["volume", "rm", inline]);
    assert_eq!(c.sdk(1).inspect("inl").unwrap_err().code(), Code::NotFound);

    // Once no container uses it, `docker volume rm` deletes it on every replica.
    d.ok(&["volume", "rm", "dv"]);
    for i in 0..2 {
        assert_eq!(c.sdk(i).inspect("dv").unwrap_err().code(), Code::NotFound);
        assert_eq!(c.sdk(i).pool().used_bytes, 0, "node-{} freed its replica", i + 1);
    }
    drop(p2);
    let _ = std::fs::remove_file(&socket);
}
