//! Real NBD clients (nbdinfo, qemu-io, qemu-img, fio) against a running engine.

mod common;

use common::*;
use std::process::Command;

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_lists_every_volume_over_tcp_and_unix() {
    let dir = tempdir();
    let e = EngineProc::start(dir.path(), 1, "512MiB");
    let sdk = e.sdk();
    sdk.create("alpha", 64 * MIB).unwrap();
    sdk.create("beta", 32 * MIB).unwrap();
    let tcp = run(Command::new("nbdinfo").arg("--list").arg(format!("nbd://{}", e.nbd)));
    let unix = run(Command::new("nbdinfo").arg("--list").arg(format!("nbd+unix:///?socket={}", e.socket.display())));
    for out in [&tcp, &unix] {
        assert!(out.contains("export=\"alpha\""), "{out}");
        assert!(out.contains("export=\"beta\""), "{out}");
        assert!(out.contains("67108864"), "alpha's size is listed: {out}");
    }
    let one = run(Command::new("nbdinfo").arg("--json").arg(e.uri("beta")));
    let v: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(v["exports"][0]["export-size"], 32 * MIB);
    assert_eq!(v["exports"][0]["can_fua"], true);
    // An unknown export is refused, not served.
    let out = Command::new("nbdinfo").arg(e.uri("nope")).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn qemu_io_patterns_verify_aligned_unaligned_zero_and_discard() {
    let dir = tempdir();
    let e = EngineProc::start(dir.path(), 2, "256MiB");
    e.sdk().create("v", 64 * MIB).unwrap();
    let uri = e.unix_uri("v");
    let io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for x in cmds {
            c.args(["-c", x]);
        }
        c.arg(&uri);
        let out = run(&mut c);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        out
    };
    io(&["write -P 0xab 0 4M", "write -P 0x11 1048000 2000", "write -P 0x22 5 7", "write -f -P 0x33 8M 64k"]);
    io(&[
        "read -P 0xab 12 1047988",
        "read -P 0x11 1048000 2000",
        "read -P 0x22 5 7",
        "read -P 0xab 0 5",
        "read -P 0xab 1050000 100000",
        "read -P 0x33 8M 64k",
        "read -P 0 9M 1M",
        "read -P 0 60M 4M",
    ]);
    io(&["write -z 2M 1M", "write -z 100 1000", "discard 3M 1M"]);
    io(&["read -P 0 2M 1M", "read -P 0 100 1000", "read -P 0xab 1100 4000", "read -P 0 3M 1M", "read -P 0xab 1100000 100000"]);
    // Beyond the end: refused.
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", "write 64M 4k"]).arg(&uri).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("wrote 4096/4096"), "write past the end must fail: {text}");
}

#[test]
fn qemu_img_convert_round_trip_is_bit_identical() {
    let dir = tempdir();
    let e = EngineProc::start(dir.path(), 2, "512MiB");
    e.sdk().create("img", 256 * MIB).unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let mut data = pseudo_random(42, (256 * MIB) as usize);
    // Leave some holes of zeroes so sparse handling is exercised too.
    data[(10 * MIB) as usize..(20 * MIB) as usize].fill(0);
    std::fs::write(&src, &data).unwrap();
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(&src).arg(e.uri("img")));
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(e.unix_uri("img")).arg(&back));
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "round trip differs");
    let pool = e.sdk().pool();
    for d in &pool.devices {
        assert!(d.free_extents < d.total_extents, "both devices of the pool hold data: {pool:?}");
    }
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    let dir = tempdir();
    let e = EngineProc::start(dir.path(), 1, "512MiB");
    e.sdk().create("fio", 128 * MIB).unwrap();
    // fio writes its verify state into its working directory: the test's temp dir, not the tree.
    let out = run(Command::new("fio").current_dir(dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", e.unix_uri("fio")),
        "--rw=randwrite",
        "--bs=4k,64k",
        "--bsrange=4k-64k",
        "--size=64M",
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        "--output-format=json",
    ]));
    let json_start = out.find('{').expect("fio json");
    let v: serde_json::Value = serde_json::from_str(&out[json_start..]).expect("fio json parses");
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 64 * MIB);
    assert!(job["read"]["io_bytes"].as_u64().unwrap() >= 64 * MIB, "verify phase read everything back");
}
