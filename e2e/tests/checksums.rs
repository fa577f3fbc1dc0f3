//! Block checksums on real engines: bytes flipped directly in a pool's device file are caught
//! on read. With a second replica the read still returns the right data and the bad block is
//! rewritten from it; with one replica the read fails with EIO rather than return bad data.
//! Either way an alert says so.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use strata_e2e::cluster::Cluster;
use strata_e2e::nbd::Client;
use strata_e2e::{pseudo_random, run, scrape};

const MIB: u64 = 1 << 20;
const EIO: u32 = 5;

/// Byte offset in `dev` of the 4 KiB block holding `block` (4 KiB), if any.
fn find_block(dev: &Path, block: &[u8]) -> Option<u64> {
    let bytes = std::fs::read(dev).unwrap();
    bytes.chunks(4096).position(|c| c == block).map(|i| i as u64 * 4096)
}

/// Flips one byte of the 4 KiB block at `at` in the device file `dev`.
fn flip(dev: &Path, at: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(dev).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at + 123).unwrap();
    f.write_all_at(&[b[0] ^ 0x5A], at + 123).unwrap();
    f.sync_all().unwrap();
}

fn kinds(c: &Cluster, volume: &str) -> Vec<(String, String)> {
    let resource = format!("volume/{volume}");
    c.sdk(0).alerts().into_iter().filter(|a| a.resource == resource).map(|a| (a.node, a.kind)).collect()
}

fn stratactl() -> std::path::PathBuf {
    strata_e2e::engine::engine_bin().with_file_name("stratactl")
}

#[test]
fn a_flipped_block_on_a_single_replica_reads_as_eio_and_raises_an_alert() {
    let c = Cluster::start(1, "128MiB");
    c.sdk(0).create_full("one", 16 * MIB, 1, &[]).unwrap();
    let data = pseudo_random(7, 64 * 1024);
    let mut cl = Client::connect(&c.engines[0].nbd, "one").unwrap();
    assert_eq!(cl.write(MIB, &data, strata_e2e::nbd::FLAG_FUA), 0);
    let at = find_block(&c.engines[0].devices[0], &data[..4096]).expect("the written block is in the device file");
    flip(&c.engines[0].devices[0], at);

    assert_eq!(cl.read(MIB, 64 * 1024), Err(EIO), "bad data is never returned");
    assert_eq!(cl.read(MIB, 4096), Err(EIO));
    // The blocks around it are intact and still read.
    assert_eq!(cl.read(MIB + 4096, 60 * 1024).unwrap(), data[4096..]);
    assert_eq!(kinds(&c, "one"), vec![("node-1".to_string(), "ChecksumMismatch".to_string())], "one alert, counted up on every failed read");
    let a = c.sdk(0).alerts().pop().unwrap();
    assert!(a.count >= 2 && a.severity == "ALARM" && a.message.contains(&MIB.to_string()), "{a:?}");

    // A new write of the block makes it good again.
    assert_eq!(cl.write(MIB, &data[..4096], 0), 0);
    assert_eq!(cl.read(MIB, 64 * 1024).unwrap(), data);

    // The cluster's engines serve their SDK over TLS: stratactl checks it against their CA.
    let ca = c.ca.path().join("ca.crt");
    let out = run(std::process::Command::new(stratactl()).args(["--endpoint", &c.engines[0].sdk, "alerts", "show"]).arg("--ca-file").arg(&ca));
    assert!(out.contains("ChecksumMismatch") && out.contains("volume/one") && out.contains("ALARM"), "{out}");
}

#[test]
fn a_flipped_block_with_a_second_replica_is_repaired_from_it() {
    let c = Cluster::start(2, "128MiB");
    c.sdk(0).create_full("two", 16 * MIB, 2, &[]).unwrap();
    let data = pseudo_random(9, 64 * 1024);
    let mut cl = Client::connect(&c.engines[0].nbd, "two").unwrap();
    assert_eq!(cl.write(2 * MIB, &data, strata_e2e::nbd::FLAG_FUA), 0);
    let dev = &c.engines[0].devices[0];
    let at = find_block(dev, &data[8192..12288]).expect("the written block is on node-1");
    flip(dev, at);

    assert_eq!(cl.read(2 * MIB, 64 * 1024).unwrap(), data, "the read returns the replica's copy");
    let k = kinds(&c, "two");
    assert!(k.contains(&("node-1".into(), "ChecksumMismatch".into())) && k.contains(&("node-1".into(), "ChecksumRepaired".into())), "{k:?}");
    // The block on node-1 was rewritten: the device holds the right bytes again, and the next
    // read needs no repair.
    assert_eq!(find_block(dev, &data[8192..12288]), Some(at));
    assert_eq!(cl.read(2 * MIB + 8192, 4096).unwrap(), data[8192..12288]);
    assert_eq!(c.replica_differences(0, "two"), Vec::<String>::new());
    let repaired = c.sdk(0).alerts().into_iter().filter(|a| a.kind == "ChecksumRepaired").map(|a| a.count).sum::<u64>();
    assert_eq!(repaired, 1, "one repair");
}

#[test]
fn the_scrub_finds_a_flipped_block_on_a_replica_that_serves_no_reads() {
    // node-2's scrub runs every few seconds; node-1 (the target) holds the good copy.
    let c = Cluster::start_with(2, "128MiB", &["--scrub-interval", "2", "--scrub-rate", "256MiB"]);
    c.sdk(0).create_full("sc", 16 * MIB, 2, &[]).unwrap();
    let data = pseudo_random(11, 64 * 1024);
    let mut cl = Client::connect(&c.engines[0].nbd, "sc").unwrap();
    assert_eq!(cl.write(3 * MIB, &data, strata_e2e::nbd::FLAG_FUA), 0);
    let dev = &c.engines[1].devices[0];
    let at = find_block(dev, &data[..4096]).expect("the written block is on node-2");
    flip(dev, at);
    let t0 = Instant::now();
    while !kinds(&c, "sc").iter().any(|(n, k)| n == "node-2" && k == "ChecksumRepaired") {
        assert!(t0.elapsed() < Duration::from_secs(30), "no repair on node-2: {:?}", kinds(&c, "sc"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(kinds(&c, "sc").contains(&("node-2".into(), "ChecksumMismatch".into())));
    assert_eq!(find_block(dev, &data[..4096]), Some(at), "node-2's block was rewritten from node-1");
    assert_eq!(c.replica_differences(0, "sc"), Vec::<String>::new());
    assert_eq!(cl.read(3 * MIB, 64 * 1024).unwrap(), data);
}

#[test]
fn checksums_survive_kill9_restart_neither_failing_good_blocks_nor_missing_flips() {
    let mut c = Cluster::start_with(1, "128MiB", &["--checksum-settle-after", "5"]);
    c.sdk(0).create_full("k", 16 * MIB, 1, &[]).unwrap();
    let (a, b) = (pseudo_random(21, 256 * 1024), pseudo_random(22, 256 * 1024));
    let mut cl = Client::connect(&c.engines[0].nbd, "k").unwrap();
    assert_eq!(cl.write(0, &a, strata_e2e::nbd::FLAG_FUA), 0);
    // The first extent's checksums settle (written, intent bit cleared) within seconds.
    let t0 = Instant::now();
    while !scrape(&c.engines[0].metrics).lines().any(|l| l.starts_with("strata_pool_unsettled_extents{") && l.ends_with(" 0")) {
        assert!(t0.elapsed() < Duration::from_secs(60), "checksums never settled");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Then a write whose checksums cannot have settled, and a crash.
    assert_eq!(cl.write(4 * MIB, &b, strata_e2e::nbd::FLAG_FUA), 0);
    drop(cl);
    c.kill9(0);
    // While the engine is down, bit rot in the settled extent.
    let dev = c.engines[0].devices[0].clone();
    let at = find_block(&dev, &a[4096..8192]).expect("block in the device file");
    flip(&dev, at);
    c.restart(0);
    let mut cl = Client::connect(&c.engines[0].nbd, "k").unwrap();
    assert_eq!(cl.read(4 * MIB, b.len() as u32).unwrap(), b, "the unsettled extent's checksums were recomputed from its data");
    assert_eq!(cl.read(0, 4096).unwrap(), a[..4096]);
    assert_eq!(cl.read(4096, 4096), Err(EIO), "the settled checksums on disk catch the flip made while the engine was down");
    assert_eq!(kinds(&c, "k").len(), 1, "{:?}", kinds(&c, "k"));
}

/// A clean stop (SIGTERM) right after a write settles that write's checksums: damage made while
/// the engine is down is then caught, not taken as good data and given fresh checksums.
#[test]
fn a_clean_stop_settles_checksums_so_a_flip_made_while_down_is_caught() {
    let mut c = Cluster::start(1, "128MiB");
    c.sdk(0).create_full("t", 16 * MIB, 1, &[]).unwrap();
    let data = pseudo_random(31, 128 * 1024);
    let mut cl = Client::connect(&c.engines[0].nbd, "t").unwrap();
    assert_eq!(cl.write(2 * MIB, &data, 0), 0);
    drop(cl);
    // Well within the settle period (5 s): only the clean stop can settle these checksums.
    c.engines[0].stop();
    let dev = c.engines[0].devices[0].clone();
    let at = find_block(&dev, &data[8192..12288]).expect("block in the device file");
    flip(&dev, at);
    c.engines[0].spawn().unwrap();
    let mut cl = Client::connect(&c.engines[0].nbd, "t").unwrap();
    assert_eq!(cl.read(2 * MIB, 8192).unwrap(), data[..8192], "good blocks read");
    assert_eq!(cl.read(2 * MIB + 8192, 4096), Err(EIO), "the flip is caught, not returned as data");
    assert_eq!(kinds(&c, "t").len(), 1, "{:?}", kinds(&c, "t"));
}

/// The little-endian u64 at `at` of the device's superblock.
fn sb_field(dev: &Path, at: usize) -> u64 {
    let b = std::fs::read(dev).unwrap();
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Bit flips in the checksum area, with the engine stopped: a flipped checksum slot makes its
/// block fail (check names it; the engine answers EIO on a single replica rather than return
/// data it cannot vouch for); a flipped intent bit only makes the engine recompute that extent's
/// checksums from its data (the data reads fine). `check --repair` says what it fixed.
#[test]
fn flips_in_a_checksum_slot_and_the_intent_bitmap() {
    // One engine on its embedded store (what `check --data-dir` reads).
    let dir = strata_e2e::tempdir();
    let mut e = strata_e2e::EngineProc::start(dir.path(), 1, "128MiB");
    e.sdk().create("s", 16 * MIB).unwrap();
    let (a, b) = (pseudo_random(41, 64 * 1024), pseudo_random(42, 64 * 1024));
    let mut cl = Client::connect(&e.nbd, "s").unwrap();
    assert_eq!(cl.write(0, &a, 0), 0);
    assert_eq!(cl.write(8 * MIB, &b, 0), 0);
    drop(cl);
    e.stop(); // clean: every checksum settled
    let dev = e.devices[0].clone();
    let (extent, data_off, intent_off, csum_off) = (sb_field(&dev, 48), sb_field(&dev, 80), sb_field(&dev, 104), sb_field(&dev, 112));
    let pext = |block: &[u8]| (find_block(&dev, block).expect("block on the device") - data_off) / extent;
    let (pa, pb) = (pext(&a[..4096]), pext(&b[..4096]));
    let (clean, report) = e.check();
    assert!(clean, "{report}");
    assert!(report.contains("block(s) verified against their checksums"), "{report}");
    // The checksum of extent A's second block, and extent B's intent bit.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&dev).unwrap();
        let at = csum_off + pa * 4096 + 4;
        let mut x = [0u8; 1];
        f.read_exact_at(&mut x, at).unwrap();
        f.write_all_at(&[x[0] ^ 0x10], at).unwrap();
        let at = intent_off + pb / 8;
        f.read_exact_at(&mut x, at).unwrap();
        f.write_all_at(&[x[0] | (1 << (pb % 8))], at).unwrap();
        f.sync_all().unwrap();
    }
    let (clean, report) = e.check();
    assert!(!clean, "{report}");
    assert!(report.contains(&format!("extent {pa} block at extent byte 4096 fails its checksum")), "{report}");
    assert!(!report.contains(&format!("extent {pb} ")), "the intent bit costs nothing: {report}");
    let (_, repaired) = e.check_with(&["--repair"]);
    assert!(repaired.contains("settled the checksums of 1 extent"), "{repaired}");
    assert!(repaired.contains("fails its checksum"), "a bad slot is left to the engine's replica repair: {repaired}");
    e.spawn().unwrap();
    let mut cl = Client::connect(&e.nbd, "s").unwrap();
    assert_eq!(cl.read(0, 4096).unwrap(), a[..4096]);
    assert_eq!(cl.read(4096, 4096), Err(EIO), "data its checksum does not vouch for is never returned");
    assert_eq!(cl.read(8 * MIB, b.len() as u32).unwrap(), b, "extent B reads fine");
    assert_eq!(cl.write(4096, &a[4096..8192], 0), 0, "rewriting the block makes it good");
    assert_eq!(cl.read(0, a.len() as u32).unwrap(), a);
}

/// `check --etcd` on a node of a multi-node cluster: its extents against the records in etcd —
/// clean while the node holds its replica; once the replica was removed while the node was down,
/// the left-over extents are named.
#[test]
fn check_against_etcd_records() {
    let mut c = Cluster::start(2, "128MiB");
    c.sdk(0).create_full("x", 16 * MIB, 2, &[]).unwrap();
    let mut cl = Client::connect(&c.engines[0].nbd, "x").unwrap();
    assert_eq!(cl.write(0, &pseudo_random(51, 256 * 1024), strata_e2e::nbd::FLAG_FUA), 0);
    drop(cl);
    c.wait_in_sync(0, "x", Duration::from_secs(30));
    c.engines[1].stop();
    let url = c.etcd.url.clone();
    let check = |c: &Cluster| c.engines[1].check_with_store(&["--etcd", &url, "--node-id", "node-2"]);
    let (clean, report) = check(&c);
    assert!(clean, "{report}");
    assert!(report.contains("block(s) verified"), "{report}");
    // The replica on node-2 is removed while node-2 is down: its extents there are left over.
    c.sdk(0).ha_update("x", 1, Some("node-2")).unwrap();
    let (clean, report) = check(&c);
    assert!(!clean && report.contains("does not list this node as a replica"), "{report}");
    // The engine frees them when it starts.
    c.engines[1].spawn().unwrap();
    c.engines[1].stop();
    let (clean, report) = check(&c);
    assert!(clean, "{report}");
}

/// Damage in the middle of a replica node's journal: the engine refuses the device (check says
/// which block and what is lost); `check --repair` salvages every readable mapping into a new
/// checkpoint and marks the device's replicas suspect; the engine then starts, leaves the
/// in-sync sets, and its replica is rebuilt in full from the other node: the data is all there.
#[test]
fn a_damaged_journal_is_salvaged_and_the_replica_rebuilt() {
    let mut c = Cluster::start(2, "128MiB");
    c.sdk(0).create_full("j", 16 * MIB, 2, &[]).unwrap();
    let chunks: Vec<Vec<u8>> = (0..4).map(|i| pseudo_random(60 + i, 64 * 1024)).collect();
    let mut cl = Client::connect(&c.engines[0].nbd, "j").unwrap();
    for (i, d) in chunks.iter().enumerate() {
        assert_eq!(cl.write(i as u64 * 3 * MIB, d, strata_e2e::nbd::FLAG_FUA), 0);
    }
    c.wait_in_sync(0, "j", Duration::from_secs(30));
    c.engines[1].stop();
    let dev = c.engines[1].devices[0].clone();
    let (joff, jlen) = (sb_field(&dev, 64), sb_field(&dev, 72));
    // Generation 1 lives in half 1: its second record block, with more after it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&dev).unwrap();
        let at = joff + jlen / 2 + 2 * 4096 + 200;
        let mut x = [0u8; 1];
        f.read_exact_at(&mut x, at).unwrap();
        f.write_all_at(&[x[0] ^ 0x21], at).unwrap();
    }
    let err = c.engines[1].spawn().expect_err("a journal damaged in the middle is refused");
    assert!(err.contains("journal block 2") && err.contains("corrupted"), "{err}");
    let url = c.etcd.url.clone();
    let (clean, report) = c.engines[1].check_with_store(&["--etcd", &url, "--node-id", "node-2"]);
    assert!(!clean && report.contains("journal block 2"), "{report}");
    let (_, repaired) = c.engines[1].check_with_store(&["--etcd", &url, "--node-id", "node-2", "--repair"]);
    assert!(repaired.contains("salvaged") && repaired.contains("record block 2 fails its checksum"), "{repaired}");
    c.engines[1].spawn().expect("starts after the salvage");
    // node-2 left the in-sync set and is rebuilt from node-1.
    let v = c.wait_in_sync(0, "j", Duration::from_secs(60));
    assert_eq!(v.in_sync_nodes.len(), 2);
    assert_eq!(c.replica_differences(0, "j"), Vec::<String>::new());
    // And node-2's copy alone serves every byte.
    drop(cl);
    c.engines[0].stop();
    let t0 = Instant::now();
    let v = loop {
        match c.sdk(1).attach("j", false) {
            Ok(v) => break v,
            Err(e) => {
                assert!(t0.elapsed() < Duration::from_secs(30), "takeover by node-2: {e}");
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    };
    assert_eq!(v.attached_node, "node-2");
    let mut cl = Client::connect(&c.engines[1].nbd, "j").unwrap();
    for (i, d) in chunks.iter().enumerate() {
        assert_eq!(&cl.read(i as u64 * 3 * MIB, d.len() as u32).unwrap(), d, "chunk {i} from the rebuilt replica");
    }
}
