//! The write checker: a writer stamps every block it writes with (offset, sequence) and a
//! pattern derived from both, and records which writes were acknowledged; after the faults,
//! `verify` reads every block back and reports any block whose content is not the last
//! acknowledged write to it (or a later write that was sent but never acknowledged).

use crate::nbd::{Client, FLAG_FUA, TRIM, WRITE, WRITE_ZEROES};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A block, as the writer writes it: one stamp per block.
pub const BLOCK: u64 = 4096;

/// The content of block `offset` at write `seq`.
pub fn stamp(offset: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut b = crate::pseudo_random(offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seq, len);
    for chunk in 0..len / BLOCK as usize {
        let at = chunk * BLOCK as usize;
        b[at..at + 8].copy_from_slice(&(offset + at as u64).to_le_bytes());
        b[at + 8..at + 16].copy_from_slice(&seq.to_le_bytes());
    }
    b
}

/// What a block holds: never written (zeroes), or the stamp of (write offset, seq) at this block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Zero,
    Stamp(u64),
    Garbage,
}

/// Decodes block `block_off` of a write that started at `write_off` with `len` bytes.
fn decode(block_off: u64, data: &[u8], writes: &History) -> Seen {
    if data.iter().all(|b| *b == 0) {
        return Seen::Zero;
    }
    let off = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let seq = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if off != block_off {
        return Seen::Garbage;
    }
    // Re-create the whole write's pattern to check the block's bytes.
    match writes.by_seq.get(&seq) {
        Some(&(w_off, w_len)) if (w_off..w_off + w_len).contains(&block_off) => {
            let full = stamp(w_off, seq, w_len as usize);
            let at = (block_off - w_off) as usize;
            if full[at..at + BLOCK as usize] == *data {
                Seen::Stamp(seq)
            } else {
                Seen::Garbage
            }
        }
        _ => Seen::Garbage,
    }
}

/// What the writer did: per block, the last acknowledged seq and the later unacknowledged ones.
#[derive(Default)]
pub struct History {
    acked: HashMap<u64, u64>,
    unacked: HashMap<u64, Vec<u64>>,
    by_seq: HashMap<u64, (u64, u64)>,
    /// Sequence numbers of TRIM / WRITE_ZEROES requests: their blocks read as zeroes after.
    zeroes: HashSet<u64>,
    next_seq: u64,
    pub acked_writes: u64,
    pub failed_writes: u64,
    pub acked_bytes: u64,
}

impl History {
    fn begin(&mut self, off: u64, len: u64) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.by_seq.insert(seq, (off, len));
        for b in (off..off + len).step_by(BLOCK as usize) {
            self.unacked.entry(b).or_default().push(seq);
        }
        seq
    }

    fn ack(&mut self, off: u64, len: u64, seq: u64) {
        for b in (off..off + len).step_by(BLOCK as usize) {
            self.acked.insert(b, seq);
            if let Some(v) = self.unacked.get_mut(&b) {
                v.retain(|s| *s > seq);
            }
        }
        self.acked_writes += 1;
        self.acked_bytes += len;
    }

    /// Checks one block's content against the history; None when it is acceptable.
    pub fn judge(&self, block_off: u64, data: &[u8]) -> Option<String> {
        let seen = decode(block_off, data, self);
        let acked = self.acked.get(&block_off).copied();
        let maybe = self.unacked.get(&block_off).cloned().unwrap_or_default();
        let ok = match (seen, acked) {
            (Seen::Garbage, _) => false,
            (Seen::Zero, None) => true,
            (Seen::Zero, Some(a)) => self.zeroes.contains(&a) || maybe.iter().any(|s| self.zeroes.contains(s)),
            (Seen::Stamp(s), Some(a)) => s == a || (s > a && maybe.contains(&s)),
            (Seen::Stamp(s), None) => maybe.contains(&s),
        };
        (!ok).then(|| format!("block at {block_off}: read {seen:?}, last acknowledged write {acked:?}, unacknowledged later writes {maybe:?}"))
    }
}

/// A writer over one NBD connection: writes of `chunk` bytes at pseudo-random chunk-aligned
/// offsets within `[0, span)`, one at a time, recording acknowledgements.
pub struct Writer {
    pub client: Client,
    pub span: u64,
    pub chunk: u64,
    pub fua_every: u64,
    rng: u64,
}

impl Writer {
    pub fn new(client: Client, span: u64, chunk: u64, seed: u64) -> Writer {
        assert!(chunk.is_multiple_of(BLOCK) && span.is_multiple_of(chunk));
        Writer { client, span, chunk, fua_every: 16, rng: seed | 1 }
    }

    fn next_offset(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % (self.span / self.chunk)) * self.chunk
    }

    /// Up to `count` writes or until `deadline`; stops at the first failure (an error reply or
    /// a broken connection) and returns how many writes were acknowledged.
    pub fn run(&mut self, h: &mut History, count: u64, deadline: Duration) -> Result<u64, String> {
        let t0 = Instant::now();
        let mut done = 0;
        while done < count && t0.elapsed() < deadline {
            let off = self.next_offset();
            let seq = h.begin(off, self.chunk);
            let data = stamp(off, seq, self.chunk as usize);
            let flags = if seq.is_multiple_of(self.fua_every) { FLAG_FUA } else { 0 };
            self.client.try_send(WRITE, flags, seq, off, self.chunk as u32, &data).map_err(|e| format!("send: {e}"))?;
            match self.client.reply() {
                Ok((0, handle)) if handle == seq => h.ack(off, self.chunk, seq),
                Ok((err, _)) => {
                    h.failed_writes += 1;
                    return Err(format!("write at {off} failed with error {err}"));
                }
                Err(e) => {
                    h.failed_writes += 1;
                    return Err(format!("reply: {e}"));
                }
            }
            done += 1;
        }
        Ok(done)
    }
}

/// What a mixed writer's request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Write,
    Trim,
    WriteZeroes,
}

impl Writer {
    /// Like `run`, with up to `depth` requests in flight at once, mixing WRITE (about 70%), TRIM
    /// and WRITE_ZEROES (FUA on every `fua_every`th). Requests in flight never overlap, so each
    /// block's acknowledgements come in order. Stops at the first failure (its request and the
    /// ones still in flight stay unacknowledged) and returns how many were acknowledged.
    pub fn run_mixed(&mut self, h: &mut History, count: u64, deadline: Duration, depth: usize) -> Result<u64, String> {
        let t0 = Instant::now();
        let (mut sent, mut done) = (0u64, 0u64);
        let mut inflight: HashMap<u64, (u64, Op)> = HashMap::new();
        let mut busy: HashSet<u64> = HashSet::new();
        loop {
            while inflight.len() < depth && sent < count && t0.elapsed() < deadline {
                let off = self.next_offset();
                if !busy.insert(off) {
                    continue; // a request on this chunk is in flight: pick another
                }
                let op = match self.rng % 10 {
                    0..=6 => Op::Write,
                    7 => Op::Trim,
                    _ => Op::WriteZeroes,
                };
                let seq = h.begin(off, self.chunk);
                let flags = if seq.is_multiple_of(self.fua_every) { FLAG_FUA } else { 0 };
                let r = match op {
                    Op::Write => self.client.try_send(WRITE, flags, seq, off, self.chunk as u32, &stamp(off, seq, self.chunk as usize)),
                    Op::Trim | Op::WriteZeroes => {
                        h.zeroes.insert(seq);
                        self.client.try_send(if op == Op::Trim { TRIM } else { WRITE_ZEROES }, flags, seq, off, self.chunk as u32, &[])
                    }
                };
                if let Err(e) = r {
                    h.failed_writes += 1;
                    return Err(format!("send: {e}"));
                }
                inflight.insert(seq, (off, op));
                sent += 1;
            }
            if inflight.is_empty() {
                return Ok(done);
            }
            match self.client.reply() {
                Ok((err, seq)) => {
                    let Some((off, op)) = inflight.remove(&seq) else { return Err(format!("reply for unknown handle {seq}")) };
                    busy.remove(&off);
                    if err != 0 {
                        h.failed_writes += 1;
                        return Err(format!("{op:?} at {off} failed with error {err}"));
                    }
                    h.ack(off, self.chunk, seq);
                    done += 1;
                }
                Err(e) => {
                    h.failed_writes += 1;
                    return Err(format!("reply: {e}"));
                }
            }
        }
    }
}

impl History {
    /// The writes begun so far (sequence numbers run from 1 without gaps).
    pub fn begun(&self) -> u64 {
        self.next_seq
    }
}

/// Checks that `[0, span)` read through `client` (a snapshot's clone) holds exactly the writes
/// up to one point of the history: some `n` such that every block is the last write with
/// sequence ≤ `n` to it (or zeroes when none). Returns `n`, or the blocks that break it.
pub fn verify_cut(client: &mut Client, h: &History, span: u64) -> Result<u64, Vec<String>> {
    let mut seen = Vec::new();
    let mut problems = each_block(client, span, |b, block| match decode(b, block, h) {
        Seen::Garbage => Some(format!("block at {b}: garbage")),
        s => {
            seen.push((b, s));
            None
        }
    });
    let cut = seen.iter().filter_map(|(_, s)| if let Seen::Stamp(q) = s { Some(*q) } else { None }).max().unwrap_or(0);
    // Per block, the writes to it in order.
    let mut writes: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut seqs: Vec<(&u64, &(u64, u64))> = h.by_seq.iter().collect();
    seqs.sort();
    for (seq, (w_off, w_len)) in seqs {
        for b in (*w_off..w_off + w_len).step_by(BLOCK as usize) {
            writes.entry(b).or_default().push(*seq);
        }
    }
    for (b, s) in seen {
        let want = writes.get(&b).and_then(|w| w.iter().rev().find(|q| **q <= cut)).copied();
        let ok = match (s, want) {
            (Seen::Zero, None) => true,
            (Seen::Zero, Some(w)) => h.zeroes.contains(&w),
            (Seen::Stamp(q), Some(w)) => q == w,
            _ => false,
        };
        if !ok {
            problems.push(format!("block at {b}: holds {s:?}, but the last write up to {cut} is {want:?}"));
        }
    }
    if problems.is_empty() {
        Ok(cut)
    } else {
        Err(problems)
    }
}

/// Reads `[0, span)` through `client` and returns every block that breaks the history.
pub fn verify(client: &mut Client, h: &History, span: u64) -> Vec<String> {
    each_block(client, span, |b, block| h.judge(b, block))
}

/// Reads `[0, span)` through `client` 1 MiB at a time and calls `f` on every block; returns
/// what `f` reported and the reads that failed.
fn each_block(client: &mut Client, span: u64, mut f: impl FnMut(u64, &[u8]) -> Option<String>) -> Vec<String> {
    let mut problems = Vec::new();
    let step = 1 << 20;
    let mut off = 0;
    while off < span {
        let n = step.min(span - off);
        match client.read(off, n as u32) {
            Ok(data) => {
                for (i, block) in data.chunks(BLOCK as usize).enumerate() {
                    problems.extend(f(off + i as u64 * BLOCK, block));
                }
            }
            Err(e) => problems.push(format!("read at {off} failed with error {e}")),
        }
        off += n;
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_judge_accepts_history_and_rejects_anything_else() {
        let mut h = History::default();
        let s1 = h.begin(0, 8192);
        h.ack(0, 8192, s1);
        let s2 = h.begin(4096, 4096); // never acknowledged
        let block = |off: u64, seq: u64, w_off: u64, w_len: u64| {
            let full = stamp(w_off, seq, w_len as usize);
            full[(off - w_off) as usize..(off - w_off + BLOCK) as usize].to_vec()
        };
        assert_eq!(h.judge(0, &block(0, s1, 0, 8192)), None);
        assert_eq!(h.judge(4096, &block(4096, s1, 0, 8192)), None);
        assert_eq!(h.judge(4096, &block(4096, s2, 4096, 4096)), None, "a later unacknowledged write may have landed");
        assert!(h.judge(0, &vec![0; 4096]).is_some(), "an acknowledged write was lost");
        assert_eq!(h.judge(8192, &vec![0; 4096]), None, "never written");
        let mut torn = block(0, s1, 0, 8192);
        torn[100] ^= 1;
        assert!(h.judge(0, &torn).is_some(), "corruption is caught");
        assert!(h.judge(4096, &block(0, s1, 0, 8192)).is_some(), "a block from the wrong place is caught");
        let s3 = h.begin(0, 4096);
        h.ack(0, 4096, s3);
        assert!(h.judge(0, &block(0, s1, 0, 8192)).is_some(), "an older acknowledged write is stale");
        // A zeroing: zeroes are right after it is acknowledged, the data before it is not.
        let z = h.begin(0, 4096);
        h.zeroes.insert(z);
        assert_eq!(h.judge(0, &vec![0; 4096]), None, "an unacknowledged zeroing may have landed");
        assert_eq!(h.judge(0, &block(0, s3, 0, 4096)), None, "or not yet");
        h.ack(0, 4096, z);
        assert_eq!(h.judge(0, &vec![0; 4096]), None);
        assert!(h.judge(0, &block(0, s3, 0, 4096)).is_some(), "data an acknowledged zeroing replaced came back");
    }
}
