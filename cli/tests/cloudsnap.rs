//! Cloud snapshots against a real S3 server (s3s-fs from crates.io, on loopback): full and
//! incremental backups restored bit-exact on another cluster, deletion in the middle of a
//! chain, corrupted chunks, wrong credentials, a missing bucket, and a backup resumed after
//! its engine was killed.

mod common;

use common::{ctl_cluster, json_cluster};
use std::time::{Duration, Instant};
use strata_e2e::cluster::Cluster;
use strata_e2e::nbd::Client;
use strata_e2e::s3::S3;

const MIB: u64 = 1 << 20;

/// A cluster of `n` engines sharing the credentials key `key`.
fn cluster(n: usize, key: &std::path::Path) -> Cluster {
    Cluster::start_with(n, "256MiB", &["--credentials-key-file", key.to_str().unwrap()])
}

fn secrets() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let (key, pass) = (d.path().join("credentials.key"), d.path().join("passphrase"));
    std::fs::write(&key, strata_e2e::pseudo_random(1, 32)).unwrap();
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    (d, key, pass)
}

fn create_credential(c: &Cluster, s3: &S3, name: &str, secret: &str, bucket: &str, pass: Option<&std::path::Path>) -> (bool, String) {
    let mut args = vec![
        "credentials",
        "create",
        name,
        "--s3-endpoint",
        &s3.url,
        "--bucket",
        bucket,
        "--s3-access-key",
        "AKSTRATA",
        "--s3-secret-key",
        secret,
        "--path-style",
    ];
    if let Some(p) = pass {
        args.extend(["--passphrase-file", p.to_str().unwrap()]);
    }
    let (ok, out, err) = ctl_cluster(c, 0, &args);
    (ok, format!("{out}{err}"))
}

/// The whole volume, read through engine `i`'s NBD.
fn image(c: &Cluster, i: usize, vol: &str, size: u64) -> Vec<u8> {
    let mut n = Client::connect(&c.engines[i].nbd, vol).unwrap();
    let mut out = Vec::new();
    for off in (0..size).step_by(4 * MIB as usize) {
        out.extend(n.read(off, 4 * MIB as u32).unwrap());
    }
    n.disconnect();
    out
}

fn backup(c: &Cluster, vol: &str) -> serde_json::Value {
    let job = json_cluster(c, 0, &["cloudsnap", "backup", vol, "--cred", "s3", "--wait"]);
    assert_eq!(job[0]["state"], "done", "{job}");
    let id = job[0]["id"].as_str().unwrap().to_string();
    let all = json_cluster(c, 0, &["cloudsnap", "list", "--cred", "s3", "--volume", vol]);
    all.as_array().unwrap().iter().find(|b| b["id"] == id.as_str()).cloned().expect("the backup is listed")
}

#[test]
fn full_and_incremental_backups_restore_bit_exact_on_another_cluster() {
    if let Some(s3) = S3::start() {
        full_and_incremental(&s3);
    }
}

#[test]
fn full_and_incremental_backups_restore_bit_exact_on_another_cluster_through_radosgw() {
    if let Some(s3) = S3::start_rgw() {
        full_and_incremental(&s3);
    }
}

fn full_and_incremental(s3: &S3) {
    let (_d, key, pass) = secrets();
    let a = cluster(1, &key);
    let (ok, out) = create_credential(&a, s3, "s3", "SKSTRATA", "backups", Some(&pass));
    assert!(ok, "{out}");
    let size = 32 * MIB;
    a.sdk(0).create("db", size).unwrap();
    let mut expected = vec![0u8; size as usize];
    let mut nbd = Client::connect(&a.engines[0].nbd, "db").unwrap();
    let put = |nbd: &mut Client, expected: &mut Vec<u8>, extent: u64, seed: u64| {
        let data = strata_e2e::pseudo_random(seed, MIB as usize);
        assert_eq!(nbd.write(extent * MIB, &data, 0), 0);
        expected[(extent * MIB) as usize..((extent + 1) * MIB) as usize].copy_from_slice(&data);
    };
    for e in 0..8 {
        put(&mut nbd, &mut expected, e, 100 + e);
    }
    let full = backup(&a, "db");
    assert_eq!(full["parent"], "", "the first backup is full: {full}");
    assert_eq!(full["extents"], 8);
    assert_eq!(full["changed_extents"], 8, "{full}");
    assert!(full["uploaded_bytes"].as_u64().unwrap() > 0, "{full}");
    let mut ids = vec![full["id"].as_str().unwrap().to_string()];
    let mut images = vec![expected.clone()];
    for round in 1..=3u64 {
        // Two extents rewritten and one new: 3 MiB changed.
        put(&mut nbd, &mut expected, round * 2, 200 + round);
        put(&mut nbd, &mut expected, round * 2 + 1, 300 + round);
        put(&mut nbd, &mut expected, 20 + round, 400 + round);
        let b = backup(&a, "db");
        assert_eq!(b["parent"], ids.last().unwrap().as_str(), "incremental: {b}");
        assert_eq!(b["changed_extents"], 3, "only the changed extents are read: {b}");
        let up = b["uploaded_bytes"].as_u64().unwrap();
        assert!(up <= 3 * MIB * 12 / 10, "uploaded {up} bytes for 3 MiB changed: {b}");
        ids.push(b["id"].as_str().unwrap().to_string());
        images.push(expected.clone());
    }
    nbd.disconnect();
    // Only the newest backup's snapshot stays, as the base of the next incremental.
    let snaps = a.sdk(0).snapshots("db").unwrap();
    assert_eq!(snaps.len(), 1, "{:?}", snaps.iter().map(|s| &s.name).collect::<Vec<_>>());

    // Another cluster (its own etcd and engine) with the same credential and passphrase.
    let b = cluster(1, &key);
    let (ok, out) = create_credential(&b, s3, "s3", "SKSTRATA", "backups", Some(&pass));
    assert!(ok, "{out}");
    assert_eq!(json_cluster(&b, 0, &["cloudsnap", "list", "--cred", "s3"]).as_array().unwrap().len(), 4);
    // Deleting a backup in the middle of the chain keeps the others whole.
    let del = json_cluster(&a, 0, &["cloudsnap", "delete", "--cred", "s3", "--snap", &ids[2]]);
    assert_eq!(del["deleted"], ids[2].as_str());
    for (i, id) in ids.iter().enumerate() {
        let name = format!("r{i}");
        if i == 2 {
            let (ok, _, err) = ctl_cluster(&b, 0, &["cloudsnap", "restore", "--cred", "s3", "--snap", id, "--name", &name]);
            assert!(!ok && err.contains("not found"), "{err}");
            continue;
        }
        json_cluster(&b, 0, &["cloudsnap", "restore", "--cred", "s3", "--snap", id, "--name", &name]);
        assert!(image(&b, 0, &name, size) == images[i], "backup {i} ({id}) restores bit-exact");
    }

    // Damaged chunks are caught on restore, and no half-restored volume is left.
    assert!(s3.corrupt_objects("strata-backups/chunks") > 0);
    let (ok, _, err) = ctl_cluster(&b, 0, &["cloudsnap", "restore", "--cred", "s3", "--snap", &ids[0], "--name", "damaged"]);
    assert!(!ok && err.contains("is corrupted") && err.contains("authentication failed"), "{err}");
    assert!(b.sdk(0).inspect("damaged").is_err(), "the failed restore left no volume");
}

#[test]
fn wrong_credentials_a_missing_bucket_and_a_wrong_passphrase_are_refused_clearly() {
    if let Some(s3) = S3::start() {
        refusals(&s3);
    }
}

#[test]
fn wrong_credentials_a_missing_bucket_and_a_wrong_passphrase_are_refused_clearly_by_radosgw() {
    if let Some(s3) = S3::start_rgw() {
        refusals(&s3);
    }
}

fn refusals(s3: &S3) {
    let (_d, key, pass) = secrets();
    let c = cluster(1, &key);
    let (ok, out) = create_credential(&c, s3, "bad", "WRONG", "backups", None);
    assert!(!ok && out.contains("refused the credentials"), "{out}");
    let (ok, out) = create_credential(&c, s3, "nobucket", "SKSTRATA", "missing", None);
    assert!(!ok && out.contains("bucket \"missing\" does not exist"), "{out}");
    let (ok, out) = create_credential(&c, s3, "s3", "SKSTRATA", "backups", Some(&pass));
    assert!(ok, "{out}");
    let other = pass.with_file_name("other");
    std::fs::write(&other, "another passphrase").unwrap();
    let (ok, out) = create_credential(&c, s3, "s3b", "SKSTRATA", "backups", Some(&other));
    assert!(!ok && out.contains("does not open the backups"), "{out}");
    let listed = json_cluster(&c, 0, &["credentials", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(!listed.to_string().contains("SKSTRATA") && !listed.to_string().contains("horse"), "no secret is shown: {listed}");
    // Without a credentials key the engine cannot keep credentials.
    let bare = Cluster::start(1, "256MiB");
    let (ok, out) = create_credential(&bare, s3, "s3", "SKSTRATA", "backups", None);
    assert!(!ok && out.contains("--credentials-key-file"), "{out}");
}

#[test]
fn a_backup_interrupted_by_kill_9_resumes_when_its_engine_restarts() {
    let Some(s3) = S3::start() else { return };
    let (_d, key, pass) = secrets();
    let mut c = cluster(1, &key);
    let (ok, out) = create_credential(&c, &s3, "s3", "SKSTRATA", "backups", Some(&pass));
    assert!(ok, "{out}");
    let size = 24 * MIB;
    c.sdk(0).create("slow", size).unwrap();
    let mut nbd = Client::connect(&c.engines[0].nbd, "slow").unwrap();
    for e in 0..24 {
        assert_eq!(nbd.write(e * MIB, &strata_e2e::pseudo_random(e, MIB as usize), 0), 0);
    }
    nbd.disconnect();
    let want = image(&c, 0, "slow", size);
    // Each extent takes 150 ms: the backup runs about 4 s.
    c.engines[0].env = vec![("FAILPOINTS".into(), "cloudsnap.extent=return(delay:150)".into())];
    c.restart(0);
    let job = json_cluster(&c, 0, &["cloudsnap", "backup", "slow", "--cred", "s3"]);
    let id = job[0]["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1500));
    c.kill9(0);
    c.engines[0].env.clear();
    c.engines[0].spawn().unwrap();
    let t0 = Instant::now();
    loop {
        let s = json_cluster(&c, 0, &["cloudsnap", "status", &id]);
        if s[0]["state"] == "done" {
            break;
        }
        assert!(s[0]["state"] == "running" && t0.elapsed() < Duration::from_secs(60), "{s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    json_cluster(&c, 0, &["cloudsnap", "restore", "--cred", "s3", "--snap", &id, "--name", "back"]);
    assert!(image(&c, 0, "back", size) == want, "the resumed backup restores bit-exact");
}

#[test]
fn a_detached_volume_is_backed_up_by_a_node_holding_its_replica_whichever_node_is_asked() {
    let Some(s3) = S3::start() else { return };
    let (_d, key, _pass) = secrets();
    let c = cluster(2, &key);
    let (ok, out) = create_credential(&c, &s3, "s3", "SKSTRATA", "backups", None);
    assert!(ok, "{out}");
    // The only replica is on node-2; node-1 is asked.
    let (ok, out, err) = ctl_cluster(&c, 0, &["volume", "create", "away", "--size", "8MiB", "--repl", "1", "--nodes", "node-2"]);
    assert!(ok, "{out}{err}");
    let mut nbd = Client::connect(&c.engines[1].nbd, "away").unwrap();
    assert_eq!(nbd.write(MIB, &strata_e2e::pseudo_random(7, MIB as usize), 0), 0);
    nbd.disconnect();
    let want = image(&c, 1, "away", 8 * MIB);
    let (ok, out, err) = ctl_cluster(&c, 1, &["host", "detach", "away"]);
    assert!(ok, "{out}{err}");
    let b = backup(&c, "away");
    assert_eq!(b["volume"], "away", "{b}");
    let id = b["id"].as_str().unwrap();
    let job = json_cluster(&c, 0, &["cloudsnap", "status", id]);
    assert_eq!(job[0]["node"], "node-2", "taken where the replica is: {job}");
    // Without --name, the restore is named after the volume and the backup.
    let v = json_cluster(&c, 0, &["cloudsnap", "restore", "--cred", "s3", "--snap", id, "--nodes", "node-1"]);
    let name = v["name"].as_str().unwrap();
    assert_eq!(name, format!("away-restored-{}", id.rsplit('-').next().unwrap()), "{v}");
    assert!(image(&c, 0, name, 8 * MIB) == want, "restored bit-exact");
}

#[test]
fn cloudsnap_rate_bounds_a_backups_upload_bandwidth() {
    let Some(s3) = S3::start() else { return };
    let (_d, key, _pass) = secrets();
    // 1 MiB/s for uploads.
    let c = Cluster::start_with(1, "256MiB", &["--credentials-key-file", key.to_str().unwrap(), "--cloudsnap-rate", "1MiB"]);
    let (ok, out) = create_credential(&c, &s3, "s3", "SKSTRATA", "backups", None);
    assert!(ok, "{out}");
    c.sdk(0).create("paced", 8 * MIB).unwrap();
    let mut nbd = Client::connect(&c.engines[0].nbd, "paced").unwrap();
    for e in 0..8 {
        assert_eq!(nbd.write(e * MIB, &strata_e2e::pseudo_random(50 + e, MIB as usize), 0), 0);
    }
    nbd.disconnect();
    let t0 = Instant::now();
    let b = backup(&c, "paced");
    let took = t0.elapsed();
    let uploaded = b["uploaded_bytes"].as_u64().unwrap();
    assert!(uploaded >= 2 * MIB, "{b}");
    // Every chunk sent is paid for before the next; a second's worth of slack.
    let floor = Duration::from_secs_f64((uploaded - MIB) as f64 / MIB as f64);
    assert!(took >= floor, "{uploaded} bytes uploaded in {took:?}: faster than 1 MiB/s allows ({floor:?})");
}
