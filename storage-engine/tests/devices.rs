//! Start-up refusals: devices that are too small, corrupted, foreign or missing are named in the
//! error and left byte-for-byte untouched.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn digest(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn flip(p: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
}

/// Starts an engine expected to fail; returns its log.
fn refused(e: &mut EngineProc) -> String {
    let err = e.spawn().expect_err("engine must refuse to start");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn a_device_too_small_is_refused_with_its_name() {
    let dir = tempdir();
    let mut e = EngineProc::start(dir.path(), 1, "64MiB");
    e.stop();
    e.devices.push(dir.path().join("tiny.img"));
    std::fs::write(dir.path().join("tiny.img"), vec![0u8; 4 << 20]).unwrap();
    let log = refused(&mut e);
    assert!(log.contains("tiny.img") && log.contains("too small"), "{log}");
}

/// One flipped bit in a superblock does not take the pool offline: `check` names it, the engine
/// rewrites the primary from the backup copy in the device's last 4 KiB and starts with the data
/// intact. Both copies damaged: refused, and the device is left untouched.
#[test]
fn a_corrupted_superblock_is_repaired_from_its_backup_and_both_bad_is_refused() {
    let dir = tempdir();
    let mut e = EngineProc::start(dir.path(), 2, "64MiB");
    e.sdk().create("v", 8 << 20).unwrap();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x3c 0 1M"]).arg(e.uri("v")));
    e.stop();
    let dev = e.devices[1].clone();
    let size = std::fs::metadata(&dev).unwrap().len();
    let backup = size / 4096 * 4096 - 4096;
    assert_eq!(std::fs::read(&dev).unwrap()[backup as usize..backup as usize + 8], *b"STRATAPL", "the backup copy is in the last 4 KiB");
    flip(&dev, 60);
    let (clean, report) = e.check();
    assert!(!clean && report.contains("primary superblock is corrupted") && report.contains("backup copy is good"), "{report}");
    e.spawn().expect("starts from the backup superblock");
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-r", "-c", "read -P 0x3c 0 1M"]).arg(e.uri("v")));
    assert!(!out.contains("fail"), "{out}");
    e.stop();
    let (clean, report) = e.check();
    assert!(clean, "the primary was rewritten: {report}");
    // Both copies flipped: nothing to repair from.
    flip(&dev, 60);
    flip(&dev, backup + 60);
    let before = digest(&dev);
    let log = refused(&mut e);
    assert!(log.contains("dev1.img") && log.contains("checksum"), "{log}");
    assert!(digest(&dev) == before, "the corrupted device was not modified");
    let (clean, report) = e.check();
    assert!(!clean && report.contains("checksum"), "{report}");
    flip(&dev, 60);
    e.spawn().expect("starts again once the superblock is repaired");
}

#[test]
fn a_corrupted_journal_is_detected_and_never_overwritten() {
    let dir = tempdir();
    let mut e = EngineProc::start(dir.path(), 1, "64MiB");
    e.sdk().create("v", 32 << 20).unwrap();
    // Three separate allocations: three journal record blocks in generation 1 (half 1).
    for off in ["0", "4M", "8M"] {
        run(Command::new("qemu-io").args(["-f", "raw", "-c", &format!("write {off} 4k")]).arg(e.uri("v")));
    }
    e.stop();
    let dev = e.devices[0].clone();
    // Superblock: journal offset at byte 64, length at 72 (little endian).
    let sb = std::fs::read(&dev).unwrap();
    let joff = u64::from_le_bytes(sb[64..72].try_into().unwrap());
    let jlen = u64::from_le_bytes(sb[72..80].try_into().unwrap());
    let second_record = joff + jlen / 2 + 2 * 4096 + 100;
    flip(&dev, second_record);
    let before = digest(&dev);
    let log = refused(&mut e);
    assert!(log.contains("dev0.img") && log.contains("journal") && log.contains("corrupted"), "{log}");
    assert!(digest(&dev) == before, "the device was not modified");
    let (clean, report) = e.check();
    assert!(!clean && report.contains("corrupted"), "{report}");
}

#[test]
fn a_device_with_a_filesystem_needs_force_format() {
    let dir = tempdir();
    let fs = dir.path().join("dev0.img");
    std::fs::write(&fs, vec![0u8; 64 << 20]).unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&fs));
    let before = digest(&fs);
    let mut e = EngineProc::new(dir.path(), 1, "64MiB", &[]);
    let log = refused(&mut e);
    assert!(log.contains("dev0.img") && log.contains("ext2/3/4") && log.contains("--force-format"), "{log}");
    assert!(digest(&fs) == before);
    e.extra.push("--force-format".into());
    e.spawn().expect("--force-format formats it");
    assert_eq!(e.sdk().pool().devices.len(), 1);
}

#[test]
fn devices_of_another_pool_and_missing_devices_are_refused() {
    let dir_a = tempdir();
    let dir_b = tempdir();
    let mut a = EngineProc::start(dir_a.path(), 1, "64MiB");
    a.stop();
    let mut b = EngineProc::start(dir_b.path(), 2, "64MiB");
    b.stop();
    // B's engine given A's device as well: it belongs to another pool.
    b.devices.push(a.devices[0].clone());
    let log = refused(&mut b);
    assert!(log.contains("another Strata pool") && log.contains(&a.devices[0].display().to_string()), "{log}");
    // B without one of its devices.
    b.devices = vec![b.devices[0].clone()];
    let log = refused(&mut b);
    assert!(log.contains("dev1.img") && log.contains("not given"), "{log}");
}

/// Loop devices this test made, detached when it ends.
struct Loops(Vec<String>);

impl Loops {
    fn attach(&mut self, file: &Path, partscan: bool) -> String {
        let mut c = Command::new("losetup");
        if partscan {
            c.arg("-P");
        }
        let out = c.args(["-f", "--show"]).arg(file).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        self.0.push(dev.clone());
        dev
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = Command::new("losetup").args(["-d", d]).status();
        }
    }
}

/// An MBR with one Linux partition (sectors 2048..+32 MiB), as fdisk writes it.
fn write_mbr(p: &Path) {
    use std::os::unix::fs::FileExt;
    let mut mbr = [0u8; 512];
    let entry = &mut mbr[446..462];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&((32u32 << 20) / 512).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    std::fs::OpenOptions::new().write(true).open(p).unwrap().write_all_at(&mbr, 0).unwrap();
}

#[test]
fn use_all_pools_only_the_blank_disks_and_leaves_partitioned_and_formatted_ones_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(64 << 20).unwrap();
        p
    };
    let (blank, parted, formatted, mbr) = (file("blank.img"), file("parted.img"), file("ext4.img"), file("mbr.img"));
    write_mbr(&parted);
    write_mbr(&mbr);
    assert!(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&formatted).status().unwrap().success());
    let mut loops = Loops(vec![]);
    let blank_dev = loops.attach(&blank, false);
    let parted_dev = loops.attach(&parted, true);
    let ext4_dev = loops.attach(&formatted, false);
    let mbr_dev = loops.attach(&mbr, false);
    let names: Vec<String> = loops.0.iter().map(|d| d.trim_start_matches("/dev/").to_string()).collect();
    let before: Vec<Vec<u8>> = [&parted, &formatted, &mbr].iter().map(|p| digest(p)).collect();

    let mut e = EngineProc::new(dir.path(), 0, "64MiB", &["--use-all", "--use-all-match", &names.join(",")]);
    // What it took and what it left, and why, are info lines.
    e.env.push(("STRATA_LOG".into(), "info".into()));
    e.spawn().expect("the engine starts on the blank disk");
    let pool = e.sdk().pool();
    let paths: Vec<&str> = pool.devices.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(paths, vec![blank_dev.as_str()], "{:?}", pool.devices);
    let log = e.log();
    // The partition-scanned one shows its partition in sysfs where the kernel scans loop
    // devices (this machine's does not: then its table is what gives it away).
    for (dev, why) in [
        (&parted_dev, &["has partitions", "MBR partition table"][..]),
        (&ext4_dev, &["holds an ext2/3/4 filesystem"]),
        (&mbr_dev, &["MBR partition table"]),
    ] {
        let name = format!("device={}", dev.trim_start_matches("/dev/"));
        assert!(log.lines().any(|l| l.ends_with(&name) && why.iter().any(|w| l.contains(w))), "{name}: {why:?} not in\n{log}");
    }
    let v = e.sdk().create("v", 8 << 20).unwrap();
    e.stop();
    let after: Vec<Vec<u8>> = [&parted, &formatted, &mbr].iter().map(|p| digest(p)).collect();
    assert!(before == after, "a disk that was left alone was written to");
    // Restarted, it finds its own disk again (a Strata superblock, not a blank one).
    e.spawn().expect("the engine restarts on its pool");
    assert_eq!(e.sdk().pool().uuid, pool.uuid);
    assert_eq!(e.sdk().inspect("v").unwrap().id, v.id);
    e.stop();
    // Nothing to take and no --device: a clear error.
    std::fs::create_dir_all(dir.path().join("none")).unwrap();
    let mut none = EngineProc::new(&dir.path().join("none"), 0, "64MiB", &["--use-all", "--use-all-match", &names[1..].join(",")]);
    let err = none.spawn().expect_err("nothing to pool");
    assert!(err.contains("--use-all found no unused block device"), "{err}");
}
