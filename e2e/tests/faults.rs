//! Fault injection under a running writer: replicas and targets killed (-9), paused (SIGSTOP,
//! which looks like a partition to every peer) and restarted, also while they resync. After the
//! faults every acknowledged write must read back and the in-sync replicas must be identical.

use std::time::Duration;
use strata_e2e::checker::{verify, History, Writer};
use strata_e2e::cluster::{Cluster, FAST_FAILOVER};
use strata_e2e::nbd::Client;

const MIB: u64 = 1 << 20;
const SPAN: u64 = 16 * MIB;

fn writer(c: &Cluster, node: usize, vol: &str, seed: u64) -> Writer {
    Writer::new(Client::connect(&c.engines[node].nbd, vol).unwrap(), SPAN, 16 * 1024, seed)
}

fn settle_and_check(c: &Cluster, via: usize, vol: &str, w: &mut Writer, h: &History) {
    c.wait_in_sync(via, vol, Duration::from_secs(90));
    let bad = verify(&mut w.client, h, SPAN);
    assert!(bad.is_empty(), "{} acknowledged writes lost or corrupted, first: {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert_eq!(c.replica_differences(via, vol), Vec::<String>::new(), "in-sync replicas differ");
}

#[test]
fn replica_kills_pauses_and_restarts_lose_no_acknowledged_write() {
    const FAULTS: usize = 64;
    let mut c = Cluster::start_with(3, "256MiB", &FAST_FAILOVER);
    c.sdk(0).create_full("f", SPAN, 3, &[]).unwrap();
    let mut h = History::default();
    let mut w = writer(&c, 0, "f", 11);
    w.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    let mut dropped = 0;
    for round in 0..FAULTS {
        let victim = 1 + round % 2;
        // Half the rounds hit a fully in-sync volume; the others land while a replica resyncs.
        let synced = round % 8 < 4;
        if synced {
            c.wait_in_sync(0, "f", Duration::from_secs(60));
        }
        match round % 4 {
            // Killed, written around, brought back.
            0 => {
                c.kill9(victim);
                w.run(&mut h, 20, Duration::from_secs(30)).unwrap();
                c.engines[victim].spawn().unwrap();
            }
            // Partitioned (paused) past the replica timeout, then back.
            1 => {
                c.pause(victim);
                w.run(&mut h, 20, Duration::from_secs(30)).unwrap();
                c.resume(victim);
            }
            // Restarted at once: often while it is still resyncing.
            2 => {
                c.restart(victim);
                continue;
            }
            // Both replicas down together: the target carries on alone.
            _ => {
                c.kill9(1);
                c.pause(2);
                w.run(&mut h, 20, Duration::from_secs(30)).unwrap();
                c.resume(2);
                c.engines[1].spawn().unwrap();
            }
        }
        if synced {
            // The failed replica left the in-sync set before the writes around it were acknowledged.
            let v = c.sdk(0).inspect("f").unwrap();
            assert!(v.in_sync_nodes.len() < 3, "round {round}: a failed replica is still listed in sync: {v:?}");
            dropped += 1;
        }
        w.run(&mut h, 20, Duration::from_secs(30)).unwrap();
    }
    eprintln!("{FAULTS} replica faults ({dropped} on a fully in-sync volume); {} writes acknowledged, {} failed", h.acked_writes, h.failed_writes);
    assert_eq!(h.failed_writes, 0, "replica faults never fail a write while the target is up");
    settle_and_check(&c, 0, "f", &mut w, &h);
}

#[test]
fn target_kills_mid_write_lose_no_acknowledged_write() {
    const FAULTS: usize = 24;
    let mut c = Cluster::start_with(3, "256MiB", &FAST_FAILOVER);
    c.sdk(0).create_full("t", SPAN, 3, &[]).unwrap();
    let mut h = History::default();
    let mut w = writer(&c, 0, "t", 5);
    for round in 0..FAULTS {
        // Kill the target from another thread while a write is in flight.
        let pid = c.engines[0].pid().unwrap();
        let delay = Duration::from_millis(20 + (round as u64 * 37) % 200);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            // SAFETY: kill(2) on the engine process this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let r = w.run(&mut h, 100_000, Duration::from_secs(30));
        assert!(r.is_err(), "the writer notices the dead target");
        killer.join().unwrap();
        c.restart(0);
        // Now and then a replica restarts too, while the target compares replicas.
        if round % 3 == 2 {
            c.restart(1 + round % 2);
        }
        w = writer(&c, 0, "t", 5 + round as u64);
        w.run(&mut h, 20, Duration::from_secs(30)).unwrap();
    }
    eprintln!("{FAULTS} target kills; {} writes acknowledged, {} cut off unacknowledged", h.acked_writes, h.failed_writes);
    settle_and_check(&c, 0, "t", &mut w, &h);
}

#[test]
fn takeover_fences_the_old_target() {
    let c = Cluster::start_with(3, "256MiB", &FAST_FAILOVER);
    c.sdk(0).create_full("sb", SPAN, 3, &[]).unwrap();
    let mut h = History::default();
    let mut w = writer(&c, 0, "sb", 3);
    w.run(&mut h, 100, Duration::from_secs(30)).unwrap();
    let mut old_client = Client::connect(&c.engines[0].nbd, "sb").unwrap();
    // The target drops off the network (etcd and replicas alike).
    c.pause(0);
    let a = c.sdk(1).attach("sb", false);
    assert_eq!(a.unwrap_err().code(), tonic::Code::FailedPrecondition, "node-1 is still registered: no takeover yet");
    let t0 = std::time::Instant::now();
    while !c.sdk(1).nodes().iter().any(|n| n.id == "node-1" && n.status == "offline") {
        assert!(t0.elapsed() < Duration::from_secs(20), "node-1 never read offline");
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = c.sdk(1).attach("sb", false).unwrap();
    assert_eq!(v.attached_node, "node-2");
    assert_eq!(v.epoch, 3, "created at 1, attached by the first NBD client at 2, taken over at 3");
    assert!(!v.in_sync_nodes.contains(&"node-1".to_string()), "the unreachable old target's replica is out of sync: {v:?}");
    let mut w2 = writer(&c, 1, "sb", 4);
    w2.run(&mut h, 100, Duration::from_secs(30)).unwrap();
    // The old target wakes up: its writes must be refused.
    c.resume(0);
    let stale = strata_e2e::checker::stamp(0, u64::MAX, 4096);
    for i in 0..5 {
        let err = old_client.write(i * 4096, &stale, 0);
        assert_ne!(err, 0, "the fenced target acknowledged a write");
    }
    // Once it learned of the takeover (its refused writes may have failed on its lost lease
    // before any replica told it of the newer epoch), it takes no new clients.
    let t0 = std::time::Instant::now();
    while Client::connect(&c.engines[0].nbd, "sb").is_ok() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the fenced target still takes new clients");
        assert_ne!(old_client.write(0, &stale, 0), 0, "the fenced target acknowledged a write");
        std::thread::sleep(Duration::from_millis(200));
    }
    w2.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    // node-1's replica comes back through resync, and data equals the new target's history.
    settle_and_check(&c, 1, "sb", &mut w2, &h);
}

#[test]
fn split_brain_target_cut_from_etcd_and_one_replica_is_fenced() {
    use strata_e2e::proxy::Proxy;
    let mut c = Cluster::empty();
    let url = c.etcd.url.clone();
    // node-1 reaches etcd through a link we can cut; everyone reaches node-3's replication port
    // through another.
    let to_etcd = Proxy::start(url.trim_start_matches("http://"));
    c.add(&format!("http://{}", to_etcd.addr), "256MiB", &FAST_FAILOVER);
    c.add(&url, "256MiB", &FAST_FAILOVER);
    let port = strata_e2e::free_port();
    let to_node3 = Proxy::start(&format!("127.0.0.1:{port}"));
    c.add(&url, "256MiB", &[&FAST_FAILOVER[..], &["--repl-listen", &format!("127.0.0.1:{port}"), "--advertise", &to_node3.addr]].concat());

    c.sdk(0).create_full("sb", SPAN, 3, &[]).unwrap();
    let mut h = History::default();
    let mut w = writer(&c, 0, "sb", 21);
    w.run(&mut h, 100, Duration::from_secs(30)).unwrap();

    to_etcd.cut();
    to_node3.cut();
    // The target loses node-3 and cannot record it: it stops acknowledging.
    let r = w.run(&mut h, 1000, Duration::from_secs(30));
    assert!(r.is_err(), "a target cut off from etcd acknowledged every write");
    let t0 = std::time::Instant::now();
    while !c.sdk(1).nodes().iter().any(|n| n.id == "node-1" && n.status == "offline") {
        assert!(t0.elapsed() < Duration::from_secs(20), "node-1 never read offline");
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = c.sdk(1).attach("sb", false).unwrap();
    assert_eq!((v.attached_node.as_str(), v.epoch), ("node-2", 3));
    assert!(!v.in_sync_nodes.contains(&"node-3".to_string()), "node-3 is unreachable: {v:?}");
    let mut w2 = writer(&c, 1, "sb", 22);
    w2.run(&mut h, 100, Duration::from_secs(30)).unwrap();

    let stale = strata_e2e::checker::stamp(0, u64::MAX, 4096);
    assert_ne!(w.client.write(0, &stale, 0), 0, "the old target wrote during the partition");
    to_etcd.heal();
    to_node3.heal();
    for i in 0..5 {
        assert_ne!(w.client.write(i * 4096, &stale, 0), 0, "the old target wrote after the partition healed");
    }
    w2.run(&mut h, 50, Duration::from_secs(30)).unwrap();
    settle_and_check(&c, 1, "sb", &mut w2, &h);
}

/// A clean stop (SIGTERM, as an upgrade or a rolling restart does) under a pipelined write load
/// answers no request with an error: what the engine no longer serves gets no reply, and the
/// connection closes, so a client (the kernel's NBD driver, the node plugin's helpers) reconnects
/// and sends it again. Every acknowledged write is there after the restart.
#[test]
fn a_clean_stop_under_load_closes_connections_instead_of_failing_requests() {
    const BS: usize = 64 * 1024;
    const MAX: u64 = 4096;
    let mut c = Cluster::start(1, "512MiB");
    c.sdk(0).create_full("up", MAX * BS as u64, 1, &[]).unwrap();
    let mut cl = Client::connect(&c.engines[0].nbd, "up").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // 16 writes in flight at a time, each of its own data at its own offset, until the
    // connection closes (or MAX writes, which would make the test say nothing: asserted below).
    let load = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut next = 0u64;
        'outer: while next < MAX {
            let batch: Vec<u64> = (next..(next + 16).min(MAX)).collect();
            next += batch.len() as u64;
            for &h in &batch {
                if cl.try_send(1, 0, h, h * BS as u64, BS as u32, &strata_e2e::pseudo_random(h, BS)).is_err() {
                    break 'outer;
                }
            }
            for _ in &batch {
                match cl.reply() {
                    Ok((0, h)) => acked.push(h),
                    Ok((err, h)) => panic!("write {h} was answered with error {err} during the stop"),
                    Err(_) => break 'outer,
                }
            }
            if acked.len() == 64 {
                let _ = tx.send(());
            }
        }
        (acked, next)
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("64 writes acknowledged");
    c.engines[0].stop();
    let (acked, sent) = load.join().expect("no write failed");
    assert!(sent < MAX, "the load ended before the stop: it proves nothing");
    c.engines[0].spawn().unwrap();
    let mut cl = Client::connect(&c.engines[0].nbd, "up").unwrap();
    for h in &acked {
        assert!(cl.read(h * BS as u64, BS as u32).unwrap() == strata_e2e::pseudo_random(*h, BS), "acknowledged write {h} is not there");
    }
    println!("{} writes acknowledged before the stop closed the connection; all read back", acked.len());
}
