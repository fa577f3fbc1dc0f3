//! Volume lifecycle and bad input through the SDK; restart, grow, delete, metrics, check.

mod common;

use common::nbd::Client;
use common::*;
use std::io::{Read, Write};
use std::process::Command;
use tonic::Code;

const MIB: u64 = 1 << 20;

#[test]
fn bad_volume_requests_get_precise_codes() {
    let dir = tempdir();
    let e = EngineProc::start(dir.path(), 1, "256MiB");
    let sdk = e.sdk();
    sdk.create_full("ok", 64 * MIB, 1, &[("app", "db")]).unwrap();
    let code = |r: Result<strata_api::v1::Volume, tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(sdk.create("zero", 0)), Code::InvalidArgument);
    assert_eq!(code(sdk.create("huge", 1 << 40)), Code::ResourceExhausted);
    assert_eq!(code(sdk.create("ok", 64 * MIB)), Code::AlreadyExists);
    assert_eq!(code(sdk.create("bad name!", MIB)), Code::InvalidArgument);
    assert_eq!(code(sdk.create("", MIB)), Code::InvalidArgument);
    assert_eq!(code(sdk.create_full("r4", MIB, 4, &[])), Code::InvalidArgument);
    let repl = sdk.create_full("r2", MIB, 2, &[]).unwrap_err();
    assert_eq!(repl.code(), Code::FailedPrecondition);
    assert!(repl.message().contains("repl 2"), "{}", repl.message());
    assert_eq!(code(sdk.inspect("missing")), Code::NotFound);
    assert_eq!(code(sdk.resize("missing", MIB)), Code::NotFound);
    assert_eq!(sdk.delete("missing", false).unwrap_err().code(), Code::NotFound);
    assert_eq!(code(sdk.resize("ok", 32 * MIB)), Code::FailedPrecondition, "volumes only grow");
    assert_eq!(code(sdk.resize("ok", 1 << 40)), Code::ResourceExhausted);
    // Nothing of the refused requests was created.
    let names: Vec<String> = sdk.list().into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["ok".to_string()]);
    let ok = sdk.inspect("ok").unwrap();
    assert_eq!(ok.spec.unwrap().labels.get("app").map(String::as_str), Some("db"));
    // Sizes are rounded up to 4 KiB.
    assert_eq!(sdk.create("odd", 5000).unwrap().spec.unwrap().size_bytes, 8192);
}

#[test]
fn restart_keeps_volumes_and_data_and_uses_both_devices() {
    let dir = tempdir();
    let mut e = EngineProc::start(dir.path(), 2, "256MiB");
    e.sdk().create("keep", 64 * MIB).unwrap();
    e.sdk().create("other", 16 * MIB).unwrap();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 0 8M", "-c", "write -P 0x77 40M 1M"]).arg(e.uri("keep")));
    let before = e.sdk().pool();
    e.restart();
    let sdk = e.sdk();
    let mut names: Vec<String> = sdk.list().into_iter().map(|v| v.name).collect();
    names.sort();
    assert_eq!(names, vec!["keep".to_string(), "other".to_string()]);
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5c 0 8M", "-c", "read -P 0x77 40M 1M", "-c", "read -P 0 9M 1M"])
        .arg(e.uri("keep")));
    assert!(!out.contains("verification failed"), "{out}");
    let after = sdk.pool();
    assert_eq!(before.uuid, after.uuid);
    assert_eq!(after.used_bytes, 9 * MIB, "9 extents allocated");
    assert_eq!(sdk.inspect("keep").unwrap().used_bytes, 9 * MIB);
    let used: Vec<u64> = after.devices.iter().map(|d| d.total_extents - d.free_extents).collect();
    assert!(used.iter().all(|u| *u >= 4), "extents spread across both devices: {used:?}");
    e.stop();
    let (clean, report) = e.check();
    assert!(clean, "{report}");
}

#[test]
fn grow_while_connected_and_delete_refused_while_connected() {
    let dir = tempdir();
    let e = EngineProc::start(dir.path(), 1, "256MiB");
    let sdk = e.sdk();
    sdk.create("g", 16 * MIB).unwrap();
    let mut c = Client::connect(&e.nbd, "g").unwrap();
    assert_eq!(c.size, 16 * MIB);
    assert_eq!(c.write(0, &[7u8; 4096], 0), 0);
    assert_eq!(sdk.inspect("g").unwrap().connections, 1);
    sdk.resize("g", 48 * MIB).unwrap();
    // The old connection still works; a new one sees the new size.
    assert_eq!(c.read(0, 4096).unwrap(), vec![7u8; 4096]);
    let mut c2 = Client::connect(&e.nbd, "g").unwrap();
    assert_eq!(c2.size, 48 * MIB);
    assert_eq!(c2.write(40 * MIB, &[9u8; 4096], 0), 0);
    let err = sdk.delete("g", false).unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("2 connected"), "{}", err.message());
    c2.disconnect();
    // Forced delete while a client is connected: its I/O fails from then on.
    sdk.delete("g", true).unwrap();
    assert_ne!(c.write(0, &[1u8; 4096], 0), 0, "writes to a deleted volume fail");
    assert_eq!(sdk.pool().used_bytes, 0, "the volume's extents went back to the pool");
    assert_eq!(sdk.inspect("g").unwrap_err().code(), Code::NotFound);
}

#[test]
fn metrics_and_healthz_are_served() {
    let dir = tempdir();
    let e = EngineProc::start(dir.path(), 1, "256MiB");
    e.sdk().create("m", 16 * MIB).unwrap();
    let mut c = Client::connect(&e.nbd, "m").unwrap();
    for i in 0..10 {
        assert_eq!(c.write(i * 4096, &[1u8; 4096], 0), 0);
    }
    c.read(0, 8192).unwrap();
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(&e.metrics).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(get("/healthz").contains("ok"));
    let m = get("/metrics");
    assert!(m.contains("strata_volume_write_ops_total{volume=\"m\"} 10"), "{m}");
    assert!(m.contains("strata_volume_write_bytes_total{volume=\"m\"} 40960"), "{m}");
    assert!(m.contains("strata_volume_read_ops_total{volume=\"m\"} 1"), "{m}");
    assert!(m.contains("strata_volume_write_latency_seconds_count{volume=\"m\"} 10"), "{m}");
    assert!(m.contains(&format!("strata_pool_used_bytes{{pool=\"{}\"}} {}", e.sdk().pool().uuid, MIB)), "{m}");
    assert!(m.contains("strata_volume_connections{volume=\"m\"} 1"), "{m}");
}

#[test]
fn check_finds_extents_leaked_by_a_lost_volume_record() {
    let dir = tempdir();
    let mut e = EngineProc::start(dir.path(), 1, "256MiB");
    e.sdk().create("leak", 16 * MIB).unwrap();
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 3M"]).arg(e.uri("leak")));
    e.stop();
    assert!(e.check().0);
    // Drop the record behind the engine's back.
    {
        use strata_engine::meta::MetaStore;
        let meta = strata_engine::meta::embedded::Embedded::open(&dir.path().join("data")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(meta.remove_volume("leak")).unwrap();
    }
    let (clean, report) = e.check();
    assert!(!clean);
    assert!(report.contains("leaked"), "{report}");
    assert_eq!(report.matches("leaked").count(), 3, "{report}");
}
