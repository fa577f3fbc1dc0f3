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
