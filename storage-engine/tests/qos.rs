//! QoS limits measured with fio through NBD: each achieved rate within ±10% of its limit, and a
//! limit changed online takes effect for a connected client's next requests.

mod common;

use common::*;
use std::process::Command;
use strata_api::v1 as pb;

const MIB: u64 = 1 << 20;

/// Runs fio for `secs` against the volume; returns (read IOPS, write IOPS, read B/s, write B/s).
fn fio(e: &EngineProc, vol: &str, args: &[&str], secs: u32) -> (f64, f64, f64, f64) {
    let out = run(Command::new("fio")
        .args([
            "--name=qos",
            "--ioengine=nbd",
            &format!("--uri={}", e.unix_uri(vol)),
            "--size=128M",
            "--time_based",
            &format!("--runtime={secs}"),
            "--ramp_time=1",
            "--output-format=json",
        ])
        .args(args));
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').expect("fio json")..]).expect("fio json parses");
    let j = &v["jobs"][0];
    let f = |side: &str, k: &str| j[side][k].as_f64().unwrap_or(0.0);
    (f("read", "iops"), f("write", "iops"), f("read", "bw_bytes"), f("write", "bw_bytes"))
}

fn within(got: f64, limit: f64, what: &str) {
    eprintln!("{what}: measured {got:.1}, limit {limit}");
    assert!((got - limit).abs() <= 0.1 * limit, "{what}: measured {got:.1}, limit {limit} (±10%)");
}

#[test]
fn fio_measures_each_limit_within_ten_percent_and_updates_apply_online() {
    let dir = tempdir();
    let e = EngineProc::start(dir.path(), 1, "512MiB");
    let sdk = e.sdk();
    let qos = pb::QosLimits { rd_iops: 400, wr_iops: 0, rd_bw: 0, wr_bw: 8 * MIB };
    let v = sdk.create_with_qos("q", 256 * MIB, qos).unwrap();
    assert_eq!(v.spec.unwrap().qos.unwrap().rd_iops, 400);

    let (riops, ..) = fio(&e, "q", &["--rw=randread", "--bs=4k", "--iodepth=8"], 4);
    within(riops, 400.0, "read IOPS");
    let (.., wbw) = fio(&e, "q", &["--rw=write", "--bs=64k", "--iodepth=4"], 4);
    within(wbw, (8 * MIB) as f64, "write bandwidth");

    // Change the limits while a client stays connected.
    let held = common::nbd::Client::connect(&e.nbd, "q").unwrap();
    sdk.update(pb::UpdateVolumeRequest {
        name: "q".into(),
        io_throttle_rd_iops: Some(0),
        io_throttle_wr_iops: Some(300),
        io_throttle_rd_bw: Some(4 * MIB),
        ..Default::default()
    })
    .unwrap();
    let q = sdk.inspect("q").unwrap().spec.unwrap().qos.unwrap();
    assert_eq!((q.rd_iops, q.wr_iops, q.rd_bw, q.wr_bw), (0, 300, 4 * MIB, 8 * MIB), "unspecified limits are kept");
    let (.., rbw, _) = fio(&e, "q", &["--rw=read", "--bs=128k", "--iodepth=4"], 4);
    within(rbw, (4 * MIB) as f64, "read bandwidth");
    let (_, wiops, ..) = fio(&e, "q", &["--rw=randwrite", "--bs=4k", "--iodepth=8"], 4);
    within(wiops, 300.0, "write IOPS");
    held.disconnect();

    // Limits survive a restart (they live in the volume record).
    drop(sdk);
    let mut e = e;
    e.restart();
    let q = e.sdk().inspect("q").unwrap().spec.unwrap().qos.unwrap();
    assert_eq!(q.wr_iops, 300);
}
