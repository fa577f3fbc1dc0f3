//! Data safety where Strata once split the brain or failed writes (issue: forced attaches
//! racing or following each other within a second, and an etcd outage). A writer at queue depth
//! 16 mixes WRITE, TRIM and WRITE_ZEROES; afterwards every block is checked against its history
//! (0 acknowledged writes lost) and the in-sync replicas must be identical.

#![allow(clippy::result_large_err)]

use std::time::{Duration, Instant};
use strata_e2e::checker::{verify, History, Writer};
use strata_e2e::cluster::{Cluster, FAST_FAILOVER};
use strata_e2e::nbd::Client;
use strata_e2e::sdk::Sdk;

const MIB: u64 = 1 << 20;
const SPAN: u64 = 16 * MIB;
const DEPTH: usize = 16;

fn writer(c: &Cluster, node: usize, vol: &str, seed: u64) -> Writer {
    Writer::new(Client::connect(&c.engines[node].nbd, vol).expect("the target serves the volume"), SPAN, 16 * 1024, seed)
}

fn target(c: &Cluster, vol: &str) -> usize {
    c.index(&c.sdk(0).inspect(vol).unwrap().attached_node)
}

fn settle_and_check(c: &Cluster, via: usize, vol: &str, w: &mut Writer, h: &History) {
    c.wait_in_sync(via, vol, Duration::from_secs(120));
    let bad = verify(&mut w.client, h, SPAN);
    assert!(bad.is_empty(), "{} acknowledged writes lost or corrupted, first: {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert_eq!(c.replica_differences(via, vol), Vec::<String>::new(), "in-sync replicas differ");
}

/// Runs the writer on its own thread until it fails (its target was taken over) or `deadline`
/// passes; the history comes back with it.
fn write_in_background(mut w: Writer, mut h: History, deadline: Duration) -> std::thread::JoinHandle<(Writer, History, Result<u64, String>)> {
    std::thread::spawn(move || {
        let r = w.run_mixed(&mut h, u64::MAX, deadline, DEPTH);
        (w, h, r)
    })
}

/// Three engines, a repl=3 volume `vol` attached on node-1, and a writer that has already
/// written a little to it.
fn start_writing(vol: &str, seed: u64) -> (Cluster, History, Writer) {
    let c = Cluster::start_with(3, "256MiB", &FAST_FAILOVER);
    c.sdk(0).create_full(vol, SPAN, 3, &[]).unwrap();
    let mut h = History::default();
    let mut w = writer(&c, 0, vol, seed);
    w.run_mixed(&mut h, 300, Duration::from_secs(30), DEPTH).unwrap();
    (c, h, w)
}

/// How long a writer under a takeover may go on: the takeover must fence it well before.
const FENCED_WITHIN: Duration = Duration::from_secs(30);

#[test]
fn concurrent_forced_attaches_resolve_to_one_target_and_lose_nothing() {
    const ROUNDS: usize = 20;
    let (c, mut h, mut w) = start_writing("v", 1);
    let addrs: Vec<(String, Option<strata_api::tls::ClientTls>)> = c.engines.iter().map(|e| (e.sdk.clone(), e.client_tls())).collect();
    let mut takeovers = 0;
    for round in 0..ROUNDS {
        // Two or three nodes force an attach at the same instant while the writer goes on. The
        // serving node is never the only contender, so every round is a takeover at a new epoch
        // (the serving node may take it back, at a newer epoch still, when it reads the record
        // after another one's compare-and-swap).
        let before = target(&c, "v");
        let epoch_before = c.sdk(0).inspect("v").unwrap().epoch;
        let contenders: Vec<usize> = if round % 2 == 0 { vec![(before + 1) % 3, (before + 2) % 3] } else { vec![0, 1, 2] };
        let bg = write_in_background(w, h, FENCED_WITHIN);
        std::thread::sleep(Duration::from_millis(50));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(contenders.len()));
        let racers: Vec<_> = contenders
            .iter()
            .map(|&i| {
                let (addr, barrier) = (addrs[i].clone(), barrier.clone());
                std::thread::spawn(move || {
                    let sdk = Sdk::connect(&addr.0, None, addr.1.as_ref());
                    barrier.wait();
                    sdk.attach("v", true).map(|v| v.attached_node)
                })
            })
            .collect();
        let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(results.iter().any(|r| r.is_ok()), "round {round}: no attach succeeded: {results:?}");
        let (w2, h2, r) = bg.join().unwrap();
        h = h2;
        let now = target(&c, "v");
        let epoch_now = c.sdk(0).inspect("v").unwrap().epoch;
        assert!(epoch_now > epoch_before, "round {round}: a takeover at a new epoch ({results:?})");
        takeovers += 1;
        assert!(r.is_err(), "round {round}: the old target (node-{}) kept acknowledging after node-{} took over", before + 1, now + 1);
        drop(w2);
        // Exactly one node serves it now: the recorded target takes a writer, the others refuse.
        for (i, e) in c.engines.iter().enumerate() {
            let served = Client::connect(&e.nbd, "v").is_ok();
            assert_eq!(served, i == now, "round {round}: node-{} serves the volume: {served} (target node-{})", i + 1, now + 1);
        }
        w = writer(&c, now, "v", 100 + round as u64);
        w.run_mixed(&mut h, 200, Duration::from_secs(30), DEPTH)
            .unwrap_or_else(|e| panic!("round {round}: the new target node-{} failed a write: {e}", now + 1));
    }
    eprintln!("{ROUNDS} attach races, {takeovers} takeovers; {} requests acknowledged, {} cut off", h.acked_writes, h.failed_writes);
    assert_eq!(takeovers, ROUNDS);
    let via = target(&c, "v");
    settle_and_check(&c, via, "v", &mut w, &h);
}

#[test]
fn back_to_back_forced_attaches_lose_nothing() {
    const ROUNDS: usize = 20;
    let (c, mut h, mut w) = start_writing("b", 7);
    let mut at = 0;
    for round in 0..ROUNDS {
        // The writer follows the target; the next node takes the volume over under it, well
        // within a second of the previous takeover.
        let next = (at + 1 + round % 2) % 3;
        let bg = write_in_background(w, h, FENCED_WITHIN);
        std::thread::sleep(Duration::from_millis(100 + (round as u64 * 53) % 400));
        let t0 = Instant::now();
        let v = c.sdk(next).attach("b", true).unwrap_or_else(|e| panic!("round {round}: forced attach on node-{}: {e}", next + 1));
        assert_eq!(v.attached_node, format!("node-{}", next + 1));
        let (_, h2, r) = bg.join().unwrap();
        h = h2;
        assert!(r.is_err(), "round {round}: the old target kept acknowledging after the takeover");
        at = next;
        w = writer(&c, at, "b", 200 + round as u64);
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
    w.run_mixed(&mut h, 300, Duration::from_secs(30), DEPTH).unwrap();
    eprintln!("{ROUNDS} back-to-back takeovers; {} requests acknowledged, {} cut off", h.acked_writes, h.failed_writes);
    settle_and_check(&c, at, "b", &mut w, &h);
}

#[test]
fn writes_go_on_through_an_etcd_outage() {
    const OUTAGE: Duration = Duration::from_secs(60);
    let (mut c, mut h, mut w) = start_writing("e", 3);
    let before = h.acked_writes;
    c.etcd.kill();
    let t0 = Instant::now();
    while t0.elapsed() < OUTAGE {
        // Every replica stays in sync, so the target needs the store for nothing: no error.
        w.run_mixed(&mut h, 2000, Duration::from_secs(5), DEPTH)
            .unwrap_or_else(|e| panic!("a write failed {:?} into the etcd outage: {e}", t0.elapsed()));
    }
    let during = h.acked_writes - before;
    c.etcd.restart();
    w.run_mixed(&mut h, 300, Duration::from_secs(30), DEPTH).unwrap();
    eprintln!("{during} requests acknowledged during a {OUTAGE:?} etcd outage, {} failed", h.failed_writes);
    assert!(during > 1000, "writes went on during the outage ({during})");
    assert_eq!(h.failed_writes, 0);
    // The operator hears of it: an alert when it started and one when it ended (with its length).
    let t0 = Instant::now();
    loop {
        let kinds: Vec<String> = c.sdk(0).alerts().into_iter().filter(|a| a.node == "node-1").map(|a| a.kind).collect();
        if kinds.iter().any(|k| k == "MetadataStoreUnreachable") && kinds.iter().any(|k| k == "MetadataStoreReachable") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no outage alerts: {kinds:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    settle_and_check(&c, 0, "e", &mut w, &h);
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches("kB").trim();
    kb.parse::<u64>().unwrap() * 1024
}

/// Clients pushing 32 MiB writes as fast as they can, never reading a reply, while the writes
/// cannot complete (the only other replica is paused, and the replica timeout is long): the
/// engine stops reading them at the configured caps instead of holding every payload.
#[test]
fn clients_that_never_read_replies_stay_under_the_memory_cap() {
    let c = Cluster::start_with(2, "1GiB", &["--nbd-conn-inflight", "32MiB", "--nbd-inflight", "64MiB", "--replica-io-timeout", "60"]);
    c.sdk(0).create_full("hog", 512 * MIB, 2, &[]).unwrap();
    drop(Client::connect(&c.engines[0].nbd, "hog").unwrap()); // attached on node-1
    let pid = c.engines[0].pid().unwrap();
    let base = rss_bytes(pid);
    c.pause(1);
    let payload = vec![0x5au8; 32 << 20];
    let hogs: Vec<_> = (0..4u64)
        .map(|i| {
            let (addr, payload) = (c.engines[0].nbd.clone(), payload.clone());
            std::thread::spawn(move || {
                let mut cl = Client::connect(&addr, "hog").unwrap();
                cl.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                // Bounded: at most 16 writes of 32 MiB (512 MiB) per client.
                let mut sent = 0u64;
                for n in 0..16u64 {
                    if cl.try_send(strata_e2e::nbd::WRITE, 0, n, ((n * 4 + i) % 16) * (32 << 20), payload.len() as u32, &payload).is_err() {
                        break;
                    }
                    sent += 1;
                }
                (cl, sent)
            })
        })
        .collect();
    let held: Vec<_> = hogs.into_iter().map(|h| h.join().unwrap()).collect();
    let grown = rss_bytes(pid).saturating_sub(base);
    let sent: u64 = held.iter().map(|(_, s)| s).sum();
    c.resume(1);
    eprintln!("4 clients that read nothing got {sent} writes of 32 MiB onto the wire; engine RSS grew by {} MiB", grown >> 20);
    assert!(sent < 16, "the engine stopped reading ({sent} of 64 writes taken)");
    // Each connection may hold one request (4 x 32 MiB) beyond the 64 MiB engine-wide cap; slack
    // for the allocator. Without the caps the engine took every write: 2 GiB.
    assert!(grown < 320 * MIB, "engine RSS grew by {} MiB with --nbd-inflight 64MiB", grown >> 20);
    drop(held);
    // The engine serves on.
    let mut cl = Client::connect(&c.engines[0].nbd, "hog").unwrap();
    assert_eq!(cl.write(0, &[1u8; 4096], 0), 0);
}

/// A replica's engine restarts while its volume is idle: the target notices the broken
/// connection and says hello again before any write needs it, so the next burst of writes keeps
/// every replica in sync (no resync), with nothing lost.
#[test]
fn an_idle_volume_keeps_its_replicas_in_sync_across_a_replica_restart() {
    let (mut c, mut h, mut w) = start_writing("idle", 9);
    c.wait_in_sync(0, "idle", Duration::from_secs(30));
    for victim in [1, 2] {
        c.restart(victim);
        // The target's keepalive runs every second.
        std::thread::sleep(Duration::from_secs(3));
        w.run_mixed(&mut h, 500, Duration::from_secs(30), DEPTH).unwrap();
        let v = c.sdk(0).inspect("idle").unwrap();
        assert_eq!(v.in_sync_nodes.len(), 3, "node-{} left the in-sync set after its restart: {v:?}", victim + 1);
        assert!(v.replica_status.iter().all(|r| r.copied_bytes == 0 && r.dirty_bytes == 0), "nothing to resync: {:?}", v.replica_status);
    }
    assert_eq!(h.failed_writes, 0);
    settle_and_check(&c, 0, "idle", &mut w, &h);
}

/// What an operator must see when a node goes away and comes back: the volume reads `degraded`,
/// alerts say which replica is out of sync and which node is offline, then that both are back.
/// A pool past 85% raises `PoolNearFull`.
#[test]
fn a_lost_node_shows_as_degraded_volumes_and_alerts() {
    let (mut c, mut h, mut w) = start_writing("d", 13);
    assert_eq!(c.sdk(1).inspect("d").unwrap().state, "available");
    c.kill9(2);
    w.run_mixed(&mut h, 200, Duration::from_secs(30), DEPTH).unwrap();
    let alerts = |c: &Cluster| c.sdk(0).alerts().into_iter().map(|a| (a.kind, a.resource)).collect::<Vec<_>>();
    let wait_for = |c: &Cluster, want: &[(&str, &str)]| {
        let t0 = Instant::now();
        loop {
            let got = alerts(c);
            if want.iter().all(|(k, r)| got.iter().any(|(gk, gr)| gk == k && gr == r)) {
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "alerts {want:?} not raised: {got:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let v = c.sdk(1).inspect("d").unwrap();
    assert_eq!(v.state, "degraded", "{v:?}");
    assert!(c.sdk(0).list().iter().any(|v| v.name == "d" && v.state == "degraded"));
    wait_for(&c, &[("ReplicaOutOfSync", "volume/d"), ("VolumeDegraded", "volume/d"), ("NodeOffline", "node/node-3")]);
    c.engines[2].spawn().unwrap();
    c.wait_in_sync(0, "d", Duration::from_secs(60));
    assert_eq!(c.sdk(0).inspect("d").unwrap().state, "available");
    wait_for(&c, &[("ReplicaInSync", "volume/d"), ("VolumeHealthy", "volume/d"), ("NodeOnline", "node/node-3")]);
    settle_and_check(&c, 0, "d", &mut w, &h);

    // Fill node-2's pool past 85%.
    c.sdk(1)
        .create_spec("fill", strata_api::v1::VolumeSpec { size_bytes: 240 * MIB, repl: 1, nodes: vec!["node-2".into()], ..Default::default() })
        .unwrap();
    let mut f = Client::connect(&c.engines[1].nbd, "fill").unwrap();
    let chunk = vec![0x77u8; 4 * MIB as usize];
    for i in 0..56 {
        assert_eq!(f.write(i * 4 * MIB, &chunk, 0), 0);
    }
    wait_for(&c, &[("PoolNearFull", "node/node-2")]);
}

/// Power cuts, simulated: every engine keeps its device writes in memory until a flush
/// (`--simulate-volatile-cache`), so `kill -9` loses exactly the unflushed writes, as a power cut
/// loses a disk's cache — and every restart counts as a reboot. Every write is FUA, so every
/// acknowledged write must survive: replicas and the target lose power under the writer, come
/// back, and the volume reads back its history with identical replicas.
#[test]
fn power_cuts_lose_no_acknowledged_durable_write() {
    const ROUNDS: usize = 6;
    let mut c = Cluster::start_with(3, "256MiB", &[&FAST_FAILOVER[..], &["--simulate-volatile-cache"]].concat());
    c.sdk(0).create_full("p", SPAN, 3, &[]).unwrap();
    let mut h = History::default();
    let mut w = writer(&c, 0, "p", 17);
    w.fua_every = 1;
    w.run_mixed(&mut h, 300, Duration::from_secs(30), DEPTH).unwrap();
    for round in 0..ROUNDS {
        let victim = if round % 3 == 2 { 0 } else { 1 + round % 2 };
        // A replica's power cut fails no write: then the writer stops at its deadline.
        let bg = write_in_background(w, h, if victim == 0 { FENCED_WITHIN } else { Duration::from_secs(2) });
        std::thread::sleep(Duration::from_millis(150));
        c.kill9(victim);
        let (w2, h2, r) = bg.join().unwrap();
        h = h2;
        if victim == 0 {
            // The target lost power mid-write: its writes stop; it comes back and serves again.
            assert!(r.is_err(), "round {round}: the writer noticed the target's power cut");
            c.engines[0].spawn().unwrap();
            w = writer(&c, 0, "p", 300 + round as u64);
            w.fua_every = 1;
        } else {
            r.unwrap_or_else(|e| panic!("round {round}: a replica's power cut failed a write: {e}"));
            w = w2;
            c.engines[victim].spawn().unwrap();
        }
        w.run_mixed(&mut h, 200, Duration::from_secs(30), DEPTH).unwrap();
        c.wait_in_sync(0, "p", Duration::from_secs(120));
    }
    eprintln!("{ROUNDS} power cuts; {} durable requests acknowledged, {} cut off", h.acked_writes, h.failed_writes);
    // A replica that lost power is rebuilt in full when it comes back (its unflushed writes,
    // resync copies among them, may be gone), and the rebuilt copies must check out below.
    let rebuilds = c.engines[0].log().matches("replica node rebooted").count();
    eprintln!("{rebuilds} rebooted replicas seen by the target");
    assert!(rebuilds >= 1, "the target noticed no replica coming back from a power cut");
    settle_and_check(&c, 0, "p", &mut w, &h);
}
