//! Crash consistency: kill -9 the engine during a pipelined write/trim load with FUA and FLUSH,
//! check the pool offline, restart, and verify every block against what was acknowledged.

mod common;

use common::nbd::{Client, FLAG_FUA, FLUSH, TRIM, WRITE};

use common::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const BS: usize = 4096;
const VOL: u64 = 32 << 20;
const BLOCKS: u64 = VOL / BS as u64;
const EXTENT_BLOCKS: u64 = (1 << 20) / BS as u64;

/// Per block: every version issued in order (seq, 0 = zeroes from a trim), and indexes into
/// `issued` of the acknowledged ones and of the newest durable one.
#[derive(Default, Clone)]
struct Block {
    issued: Vec<u64>,
    durable: Option<usize>,
    acked: Vec<usize>,
}

fn content(seq: u64, block: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BS);
    while v.len() < BS {
        v.extend_from_slice(&seq.to_le_bytes());
        v.extend_from_slice(&block.to_le_bytes());
    }
    v
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the load until the connection breaks or `deadline`; returns the model.
fn load(addr: String, seed: u64, mut model: HashMap<u64, Block>, next_seq: &mut u64, deadline: Instant) -> HashMap<u64, Block> {
    let Ok(mut c) = Client::connect(&addr, "crash") else { return model };
    let mut rng = Rng(seed | 1);
    while Instant::now() < deadline {
        // A pipelined batch of writes (a quarter with FUA) and now and then a trim of an extent.
        // Requests in flight together never overlap: NBD does not order concurrent requests.
        let mut pending: HashMap<u64, (Vec<(u64, usize)>, bool)> = HashMap::new();
        let mut busy = std::collections::HashSet::new();
        for _ in 0..24 {
            let seq = *next_seq;
            *next_seq += 1;
            if rng.next().is_multiple_of(40) {
                let e = rng.next() % (BLOCKS / EXTENT_BLOCKS);
                let blocks: Vec<u64> = (e * EXTENT_BLOCKS..(e + 1) * EXTENT_BLOCKS).collect();
                if blocks.iter().any(|b| busy.contains(b)) {
                    continue;
                }
                busy.extend(blocks.iter().copied());
                let fua = rng.next().is_multiple_of(2);
                let idx = blocks.iter().map(|b| (*b, issue(&mut model, *b, 0))).collect();
                if c.try_send(TRIM, if fua { FLAG_FUA } else { 0 }, seq, e * EXTENT_BLOCKS * BS as u64, (EXTENT_BLOCKS as usize * BS) as u32, &[])
                    .is_err()
                {
                    return model;
                }
                pending.insert(seq, (idx, fua));
            } else {
                let b = rng.next() % BLOCKS;
                if !busy.insert(b) {
                    continue;
                }
                let fua = rng.next().is_multiple_of(4);
                let idx = vec![(b, issue(&mut model, b, seq))];
                if c.try_send(WRITE, if fua { FLAG_FUA } else { 0 }, seq, b * BS as u64, BS as u32, &content(seq, b)).is_err() {
                    return model;
                }
                pending.insert(seq, (idx, fua));
            }
        }
        while !pending.is_empty() {
            let Ok((err, handle)) = c.reply() else { return model };
            let (blocks, fua) = pending.remove(&handle).expect("reply matches a request");
            assert_eq!(err, 0, "request {handle} failed");
            for (b, i) in blocks {
                let m = model.get_mut(&b).unwrap();
                m.acked.push(i);
                if fua {
                    m.durable = Some(i);
                }
            }
        }
        if rng.next().is_multiple_of(3) {
            if c.try_send(FLUSH, 0, u64::MAX, 0, 0, &[]).is_err() {
                return model;
            }
            let Ok((err, _)) = c.reply() else { return model };
            assert_eq!(err, 0);
            for m in model.values_mut() {
                if let Some(last) = m.acked.last() {
                    m.durable = Some(*last);
                }
            }
        }
    }
    model
}

fn issue(model: &mut HashMap<u64, Block>, b: u64, version: u64) -> usize {
    let m = model.entry(b).or_default();
    m.issued.push(version);
    m.issued.len() - 1
}

fn verify(addr: &str, model: &HashMap<u64, Block>) -> usize {
    let mut c = Client::connect(addr, "crash").expect("volume is served after restart");
    let mut checked = 0;
    for chunk in 0..(BLOCKS / 256) {
        let data = c.read(chunk * 256 * BS as u64, (256 * BS) as u32).expect("read after restart");
        for i in 0..256u64 {
            let b = chunk * 256 + i;
            let got = &data[i as usize * BS..(i as usize + 1) * BS];
            let version = if got.iter().all(|x| *x == 0) {
                0
            } else {
                let seq = u64::from_le_bytes(got[0..8].try_into().unwrap());
                assert_eq!(got, content(seq, b).as_slice(), "block {b} holds a torn or foreign block");
                seq
            };
            let m = model.get(&b).cloned().unwrap_or_default();
            match m.durable {
                // The newest durable version or anything issued after it.
                Some(d) => {
                    assert!(
                        m.issued[d..].contains(&version),
                        "block {b}: read version {version}, but version {} was durable (issued from it on: {:?}; acked {:?})",
                        m.issued[d],
                        &m.issued[d..],
                        m.acked
                    );
                }
                None => assert!(version == 0 || m.issued.contains(&version), "block {b}: version {version} was never written"),
            }
            checked += 1;
        }
    }
    c.disconnect();
    checked
}

/// One crash under load: the load runs against `e` while `crash` brings the engine down (and
/// sets up its next start); then `check` must be clean, the engine restarts, every block must
/// hold what was acknowledged, and the model restarts from what is on disk.
fn crash_round(
    e: &mut EngineProc,
    model: &mut HashMap<u64, Block>,
    next_seq: &mut u64,
    seed: u64,
    load_for: Duration,
    crash: impl FnOnce(&mut EngineProc),
    what: &str,
) {
    let (addr, m, mut seq) = (e.nbd.clone(), std::mem::take(model), *next_seq);
    let deadline = Instant::now() + load_for;
    let gen = std::thread::spawn(move || {
        let m = load(addr, seed, m, &mut seq, deadline);
        (m, seq)
    });
    crash(e);
    (*model, *next_seq) = gen.join().expect("load thread");
    let (clean, report) = e.check();
    assert!(clean, "check after {what}: {report}");
    e.spawn().expect("engine restarts after the crash");
    assert_eq!(verify(&e.nbd, model) as u64, BLOCKS);
    // Once an outcome is read back, it is the state the next round builds on: what a block
    // held is what it now holds durably.
    rebase(&e.nbd, model);
}

#[test]
fn kill_dash_nine_during_load_loses_no_acknowledged_durable_write() {
    let dir = tempdir();
    let mut e = EngineProc::start(dir.path(), 2, "128MiB");
    e.sdk().create("crash", VOL).unwrap();
    let mut model: HashMap<u64, Block> = HashMap::new();
    let mut next_seq = 1u64;
    let started = Instant::now();
    let mut kills = 0;
    let mut rng = Rng(0x5eed);
    while kills < 20 && started.elapsed() < Duration::from_secs(240) {
        let (seed, after) = (rng.next(), Duration::from_millis(80 + rng.next() % 300));
        kills += 1;
        let kill = |e: &mut EngineProc| {
            std::thread::sleep(after);
            e.kill9();
        };
        crash_round(&mut e, &mut model, &mut next_seq, seed, Duration::from_secs(5), kill, &format!("kill {kills}"));
    }
    assert!(kills >= 20, "only {kills} kills in the time bound");
    assert!(next_seq > 1000, "the load really ran ({next_seq} requests)");
}

/// After a verified restart, the model restarts from what is on disk: each block's current
/// version becomes its only, durable version.
fn rebase(addr: &str, model: &mut HashMap<u64, Block>) {
    let mut c = Client::connect(addr, "crash").unwrap();
    for chunk in 0..(BLOCKS / 256) {
        let data = c.read(chunk * 256 * BS as u64, (256 * BS) as u32).unwrap();
        for i in 0..256u64 {
            let got = &data[i as usize * BS..(i as usize + 1) * BS];
            let v = if got.iter().all(|x| *x == 0) { 0 } else { u64::from_le_bytes(got[0..8].try_into().unwrap()) };
            model.insert(chunk * 256 + i, Block { issued: vec![v], durable: Some(0), acked: vec![] });
        }
    }
    c.disconnect();
}

/// A crash at the one point kill -9 rarely hits: a journal batch (new extent mappings) is durable
/// but not yet applied in memory nor acknowledged (failpoint `journal.after_write`, the engine
/// exits there). After each: `check` is clean, and every acknowledged durable write reads back.
#[test]
fn a_crash_between_journal_write_and_apply_loses_no_acknowledged_durable_write() {
    let dir = tempdir();
    let mut e = EngineProc::start(dir.path(), 1, "128MiB");
    e.sdk().create("crash", VOL).unwrap();
    let mut model: HashMap<u64, Block> = HashMap::new();
    let mut next_seq = 1u64;
    let mut rng = Rng(0xfa11);
    for round in 0..4 {
        // Trims free extents, so later writes map new ones: the journal is written often.
        let skip = 2 + rng.next() % 20;
        e.stop();
        e.env = vec![("FAILPOINTS".into(), format!("journal.after_write={skip}*off->1*return(exit)"))];
        e.spawn().expect("engine starts with the failpoint");
        let exit_at_failpoint = |e: &mut EngineProc| {
            let status = e.wait_exit(Duration::from_secs(30));
            assert_eq!(status.and_then(|s| s.code()), Some(86), "round {round}: the engine exited at the failpoint");
            e.env.clear();
        };
        crash_round(&mut e, &mut model, &mut next_seq, rng.next(), Duration::from_secs(20), exit_at_failpoint, &format!("round {round}"));
    }
    assert!(next_seq > 100, "the load really ran ({next_seq} requests)");
}
