//! A volume as a local block device without the kernel NBD module: `strata-csi fuse-disk`
//! (`fusedisk`) exposes the engine's NBD export as a file on a FUSE mount that follows the
//! export's size and survives engine restarts, and a loop device (direct I/O) is set up over
//! that file.
//! Every step first looks at the system (mounts, loop devices) so each can be repeated safely and
//! an interrupted stage or unstage can be finished by calling it again.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("{cmd} failed: {out}")]
    Command { cmd: String, out: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Timeout(String),
}

/// Runs a command; its output on failure.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, AttachError> {
    let out = Command::new(cmd).args(args).stdin(Stdio::null()).output().map_err(|e| AttachError::Command { cmd: cmd.into(), out: e.to_string() })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(AttachError::Command { cmd: format!("{cmd} {}", args.join(" ")), out: text.trim().to_string() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m) == want))
}

/// The mount's source device for `path`, if mounted.
pub fn mount_source(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (unescape(f.get(4)?) == want).then(|| f.get(sep + 2).map(|s| unescape(s)))?
    })
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Where a volume's FUSE view lives on this node.
pub fn fuse_dir(state: &Path, volume: &str) -> PathBuf {
    state.join(volume).join("fuse")
}

/// Makes sure a `strata-csi fuse-disk` helper serves the volume's export as `<fuse_dir>/disk`;
/// returns that file. The helper runs on (in its own process group) until the mount goes.
pub fn ensure_fuse(state: &Path, volume: &str, ep: &crate::fusedisk::Endpoint) -> Result<PathBuf, AttachError> {
    let dir = fuse_dir(state, volume);
    let file = dir.join("disk");
    if is_mounted(&dir) && file.exists() {
        return Ok(file);
    }
    std::fs::create_dir_all(&dir)?;
    let log = state.join(format!("{volume}.fuse.log"));
    let mut child = spawn_helper("fuse-disk", &[OsStr::new("--export"), volume.as_ref(), OsStr::new("--mount"), dir.as_os_str()], ep, &log)?;
    let t0 = Instant::now();
    while !(is_mounted(&dir) && file.exists()) {
        if let Some(e) = helper_exited(&mut child, "fuse-disk", &log) {
            return Err(e);
        }
        if t0.elapsed() > Duration::from_secs(15) {
            return Err(AttachError::Timeout(format!("the FUSE view {} did not appear within 15 s", file.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The mount is what tracks the helper; a thread waits for it so that it does not stay a
    // zombie of this plugin once it exits (at unstage).
    std::thread::Builder::new().name(format!("reap-{volume}")).spawn(move || {
        let _ = child.wait();
    })?;
    Ok(file)
}

/// Starts this executable as the helper `strata-csi NAME ARGS --socket|--tcp ENDPOINT` in its own
/// process group (it outlives a plugin restart), its log appended to `log`.
pub fn spawn_helper(name: &str, args: &[&OsStr], ep: &crate::nbdclient::Endpoint, log: &Path) -> Result<Child, AttachError> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = Command::new(&exe);
    cmd.arg(name).args(args);
    match ep {
        crate::nbdclient::Endpoint::Unix(p) => cmd.arg("--socket").arg(p),
        crate::nbdclient::Endpoint::Tcp(a) => cmd.arg("--tcp").arg(a),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| AttachError::Command { cmd: format!("{} {name}", exe.display()), out: e.to_string() })
}

/// The error of a helper that exited while it was expected to come up: its status and the last
/// line of its log.
pub fn helper_exited(child: &mut Child, name: &str, log: &Path) -> Option<AttachError> {
    let status = child.try_wait().ok()??;
    let why = std::fs::read_to_string(log).unwrap_or_default();
    Some(AttachError::Command { cmd: format!("strata-csi {name}"), out: format!("exited ({status}): {}", why.lines().last().unwrap_or("")) })
}

/// Grows the loop device over `file` to the file's (the export's) current size.
pub fn refresh_loop(dev: &str) -> Result<(), AttachError> {
    run("losetup", &["--set-capacity", dev]).map(|_| ())
}

/// Grows a mounted filesystem to its device's size.
pub fn grow_fs(dev: &str, fs: &str, mountpoint: &Path) -> Result<(), AttachError> {
    match fs {
        "xfs" => run("xfs_growfs", &[&mountpoint.to_string_lossy()]).map(|_| ()),
        _ => run("resize2fs", &[dev]).map(|_| ()).map_err(|e| match e {
            AttachError::Command { cmd, out } if out.contains("Permission denied") => AttachError::Command {
                cmd,
                out: format!("{out} (growing a mounted ext4 needs CAP_SYS_RESOURCE: give it to the node plugin's container)"),
            },
            other => other,
        }),
    }
}

/// The loop device over `file`, set up if there is none. With direct I/O: the loop device then
/// hands the filesystem's requests to the FUSE view as they come (asynchronously, many at once)
/// instead of through a second page cache (a kernel that cannot do it gets a plain loop device).
pub fn ensure_loop(file: &Path) -> Result<String, AttachError> {
    if let Some(dev) = find_loop(file)? {
        return Ok(dev);
    }
    run("losetup", &["--find", "--show", "--direct-io=on", &file.to_string_lossy()])
}

/// Whether a loop device does direct I/O on its file.
pub fn loop_direct_io(dev: &str) -> bool {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).is_ok_and(|s| s.trim() == "1")
}

/// The loop device whose backing file is `file`, if any.
pub fn find_loop(file: &Path) -> Result<Option<String>, AttachError> {
    let out = run("losetup", &["--associated", &file.to_string_lossy()])?;
    Ok(out.lines().next().and_then(|l| l.split(':').next()).map(str::to_string).filter(|s| !s.is_empty()))
}

/// The filesystem on a device, or None when it has none.
pub fn fs_type(dev: &str) -> Result<Option<String>, AttachError> {
    let out = Command::new("blkid").args(["-p", "-o", "value", "-s", "TYPE", dev]).output()?;
    match out.status.code() {
        Some(0) => Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())),
        // 2: nothing found.
        Some(2) => Ok(None),
        _ => Err(AttachError::Command { cmd: format!("blkid -p {dev}"), out: String::from_utf8_lossy(&out.stderr).into_owned() }),
    }
}

pub fn mkfs(dev: &str, fs: &str) -> Result<(), AttachError> {
    match fs {
        "xfs" => run("mkfs.xfs", &["-q", dev]).map(|_| ()),
        _ => run("mkfs.ext4", &["-q", "-F", dev]).map(|_| ()),
    }
}

/// Undoes `ensure_fuse` and `ensure_loop` (each only if present).
pub fn release(state: &Path, volume: &str) -> Result<(), AttachError> {
    let dir = fuse_dir(state, volume);
    let file = dir.join("disk");
    if is_mounted(&dir) {
        if let Some(dev) = find_loop(&file)? {
            run("losetup", &["--detach", &dev])?;
        }
        // A loop device still open somewhere is only marked to detach, and keeps the file (so
        // the FUSE mount) busy until it is closed: wait a little for that before unmounting.
        let t0 = Instant::now();
        while find_loop(&file)?.is_some() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        run("umount", &[&dir.to_string_lossy()])?;
    }
    let _ = std::fs::remove_dir(&dir);
    let _ = std::fs::remove_dir(state.join(volume));
    let _ = std::fs::remove_file(state.join(format!("{volume}.fuse.log")));
    Ok(())
}

/// statvfs of a mounted path: (total, free, used) bytes and (total, free, used) inodes.
pub fn usage(path: &Path) -> std::io::Result<([u64; 3], [u64; 3])> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs(3) with a valid NUL-terminated path and a struct to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let f = s.f_frsize;
    let bytes = [s.f_blocks * f, s.f_bavail * f, (s.f_blocks - s.f_bfree) * f];
    let inodes = [s.f_files, s.f_favail, s.f_files - s.f_ffree];
    Ok((bytes, inodes))
}
