//! `--use-all`: the node's unused whole block devices, found under /sys/block. A device is
//! taken only when nothing else can be using it: not read-only or empty, no partitions, no
//! holders (LVM, RAID, device-mapper), not mounted or swapped on, openable exclusively, and its
//! first MiB all zeroes — or a Strata pool superblock (this pool's devices after a restart; the
//! pool refuses another pool's when it opens them). Everything left alone is reported with why.

use std::path::{Path, PathBuf};

/// How much of a device's start must be zeroes for it to count as unused.
const BLANK_SPAN: usize = 1 << 20;

/// Names never taken: RAM disks, floppies and optical drives, and the block devices Strata
/// itself makes (kernel NBD, ublk).
const NEVER: [&str; 7] = ["ram", "zram", "fd", "sr", "nbd", "ublkb", "ublkc"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub path: PathBuf,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftAlone {
    pub name: String,
    pub why: String,
}

/// Where to look: the sysfs block directory, the device directory, and what is mounted and
/// swapped on (the texts of /proc/self/mountinfo and /proc/swaps).
pub struct Host<'a> {
    pub sys_block: &'a Path,
    pub dev: &'a Path,
    pub mountinfo: &'a str,
    pub swaps: &'a str,
}

/// `discover` on this machine (/sys/block, /dev, /proc).
pub fn discover_here(patterns: &[String], own: &[u8]) -> (Vec<Found>, Vec<LeftAlone>) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    discover(&Host { sys_block: Path::new("/sys/block"), dev: Path::new("/dev"), mountinfo: &mountinfo, swaps: &swaps }, patterns, own)
}

/// Whether `name` matches the shell-style `pattern` (`*` any run, `?` one character).
pub fn glob(pattern: &str, name: &str) -> bool {
    fn m(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => m(&p[1..], n) || (!n.is_empty() && m(p, &n[1..])),
            (Some(b'?'), Some(_)) => m(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => m(&p[1..], &n[1..]),
            _ => false,
        }
    }
    m(pattern.as_bytes(), name.as_bytes())
}

/// What a device's first bytes say it holds, if anything recognisable.
fn signature(head: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let known: [(usize, &[u8], &'static str); 10] = [
        (512, b"EFI PART", "a GPT partition table"),
        (1080, &[0x53, 0xEF], "an ext2/3/4 filesystem"),
        (0, b"XFSB", "an XFS filesystem"),
        (65600, b"_BHRfS_M", "a btrfs filesystem"),
        (536, b"LVM2 001", "an LVM physical volume"),
        (0, b"LUKS\xba\xbe", "a LUKS volume"),
        (4086, b"SWAPSPACE2", "swap space"),
        (32769, b"CD001", "an ISO 9660 image"),
        (3, b"NTFS    ", "an NTFS filesystem"),
        (510, &[0x55, 0xAA], "an MBR partition table or boot sector"),
    ];
    known.iter().find(|(off, magic, _)| at(*off, magic)).map(|(_, _, what)| *what)
}

fn read_sys(dir: &Path, f: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(f)).ok().map(|s| s.trim().to_string())
}

/// The names in `dir` (none when it cannot be read).
fn names_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

/// The block devices under `host` whose names match one of `patterns` (all when empty) and that
/// are free to pool (blank, or starting with `own`, the pool superblock's magic), and those left
/// alone with the reason.
pub fn discover(host: &Host<'_>, patterns: &[String], own: &[u8]) -> (Vec<Found>, Vec<LeftAlone>) {
    let mut names = names_in(host.sys_block);
    names.sort();
    let mounted: Vec<&str> = host.mountinfo.lines().filter_map(|l| l.split_whitespace().nth(2)).collect();
    let (mut found, mut left) = (Vec::new(), Vec::new());
    for name in names {
        if !patterns.is_empty() && !patterns.iter().any(|p| glob(p, &name)) {
            continue;
        }
        let mut leave = |why: String| left.push(LeftAlone { name: name.clone(), why });
        if NEVER.iter().any(|p| name.starts_with(p)) {
            leave("not a disk Strata pools (RAM, optical or its own NBD/ublk device)".into());
            continue;
        }
        let sys = host.sys_block.join(&name);
        let size = read_sys(&sys, "size").and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) * 512;
        if size == 0 {
            leave("empty (no medium, or a loop device without a file)".into());
            continue;
        }
        if read_sys(&sys, "ro").as_deref() == Some("1") {
            leave("read-only".into());
            continue;
        }
        let holders = names_in(&sys.join("holders"));
        if !holders.is_empty() {
            leave(format!("held by {} (LVM, RAID or device-mapper)", holders.join(",")));
            continue;
        }
        let parts: Vec<String> = names_in(&sys).into_iter().filter(|p| sys.join(p).join("partition").exists()).collect();
        if !parts.is_empty() {
            leave(format!("has partitions ({})", parts.join(",")));
            continue;
        }
        let devno = read_sys(&sys, "dev").unwrap_or_default();
        if !devno.is_empty() && mounted.contains(&devno.as_str()) {
            leave("mounted".into());
            continue;
        }
        let path = host.dev.join(&name);
        if host.swaps.lines().skip(1).any(|l| l.split_whitespace().next() == Some(&path.to_string_lossy())) {
            leave("swap space in use".into());
            continue;
        }
        // O_EXCL on a block device fails while the kernel uses it (mounted, claimed).
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(&path) {
            Ok(f) => f,
            Err(e) => {
                leave(format!("cannot be opened exclusively: {e}"));
                continue;
            }
        };
        let mut head = vec![0u8; BLANK_SPAN.min(size as usize)];
        if let Err(e) = std::io::Read::read_exact(&mut f, &mut head) {
            leave(format!("cannot be read: {e}"));
            continue;
        }
        // This pool's own device (after a restart); the pool refuses another pool's at open.
        if head.starts_with(own) {
            found.push(Found { path, size });
            continue;
        }
        match signature(&head) {
            Some(what) => leave(format!("holds {what}")),
            None if head.iter().any(|&b| b != 0) => leave("holds data (its first MiB is not blank)".into()),
            None => found.push(Found { path, size }),
        }
    }
    (found, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool magic for these tests (the real one is the pool's).
    const OWN: &[u8] = b"OURPOOL!";

    #[test]
    fn globs() {
        assert!(glob("loop*", "loop3") && glob("nvme?n1", "nvme0n1") && glob("*", "vda") && glob("vda", "vda"));
        assert!(!glob("loop*", "vda") && !glob("nvme?n1", "nvme10n1") && !glob("sd", "sda"));
    }

    #[test]
    fn signatures_name_what_a_device_holds() {
        let with = |off: usize, magic: &[u8]| {
            let mut b = vec![0u8; 70_000];
            b[off..off + magic.len()].copy_from_slice(magic);
            signature(&b)
        };
        assert_eq!(signature(&[0u8; 70_000]), None);
        assert_eq!(with(1080, &[0x53, 0xEF]), Some("an ext2/3/4 filesystem"));
        assert_eq!(with(510, &[0x55, 0xAA]), Some("an MBR partition table or boot sector"));
        assert_eq!(with(512, b"EFI PART"), Some("a GPT partition table"));
        assert_eq!(with(65600, b"_BHRfS_M"), Some("a btrfs filesystem"));
        assert_eq!(signature(&[0u8; 100]), None, "a short head is no signature");
    }

    #[test]
    fn sysfs_states_leave_devices_alone() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys");
        let dev = d.path().join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        let disk = |name: &str, sectors: u64, ro: &str, devno: &str| {
            let s = sys.join(name);
            std::fs::create_dir_all(s.join("holders")).unwrap();
            std::fs::write(s.join("size"), sectors.to_string()).unwrap();
            std::fs::write(s.join("ro"), ro).unwrap();
            std::fs::write(s.join("dev"), devno).unwrap();
            s
        };
        disk("blank", 4096, "0", "7:1");
        std::fs::write(dev.join("blank"), vec![0u8; 4096 * 512]).unwrap();
        disk("empty", 0, "0", "7:2");
        disk("rom", 4096, "1", "7:3");
        let held = disk("held", 4096, "0", "7:4");
        std::fs::create_dir_all(held.join("holders/dm-0")).unwrap();
        let parted = disk("parted", 4096, "0", "7:5");
        std::fs::create_dir_all(parted.join("parted1")).unwrap();
        std::fs::write(parted.join("parted1/partition"), "1").unwrap();
        disk("root", 4096, "0", "254:0");
        disk("zram0", 4096, "0", "252:0");
        disk("used", 4096, "0", "7:6");
        let mut data = vec![0u8; 4096 * 512];
        data[1080..1082].copy_from_slice(&[0x53, 0xEF]);
        std::fs::write(dev.join("used"), data).unwrap();
        // A device of this pool (after a restart): its superblock is data, but its own.
        disk("ours", 4096, "0", "7:7");
        let mut data = vec![0x5a; 4096 * 512];
        data[..OWN.len()].copy_from_slice(OWN);
        std::fs::write(dev.join("ours"), data).unwrap();
        let host = Host { sys_block: &sys, dev: &dev, mountinfo: "22 1 254:0 / / rw - ext4 /dev/vda rw\n", swaps: "Filename\n" };
        let (found, left) = discover(&host, &[], OWN);
        assert_eq!(found, vec![Found { path: dev.join("blank"), size: 4096 * 512 }, Found { path: dev.join("ours"), size: 4096 * 512 }]);
        let why = |n: &str| left.iter().find(|l| l.name == n).map(|l| l.why.clone()).unwrap_or_default();
        assert!(why("empty").starts_with("empty"), "{left:?}");
        assert_eq!(why("rom"), "read-only");
        assert!(why("held").contains("held by dm-0"));
        assert!(why("parted").contains("has partitions (parted1)"));
        assert_eq!(why("root"), "mounted");
        assert!(why("zram0").starts_with("not a disk"));
        assert_eq!(why("used"), "holds an ext2/3/4 filesystem");
        // Patterns narrow the search.
        let (found, left) = discover(&host, &["bl*".to_string()], OWN);
        assert_eq!((found.len(), left.len()), (1, 0));
    }
}
