//! Sequential readahead. O_DIRECT reads get no help from the page cache, so a client streaming a
//! volume with a few large reads in flight leaves the device idle between them. When reads
//! arrive back to back, the next `window` bytes (default [`WINDOW`]) are read ahead in chunks of the client's read
//! size; a later read that matches a chunk takes it.
//!
//! Coherence: every write, trim or zeroing bumps the volume's write generation after it
//! completes and drops the chunks. A chunk is used only if the generation is unchanged since
//! the chunk's read was started, so a read never returns data older than a completed write.

use crate::device::AlignedBuf;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Default bytes read ahead of a sequential stream, per volume.
pub const WINDOW: u64 = 16 << 20;
/// Reads of this size range take part in readahead.
pub const MIN_LEN: usize = 64 << 10;
pub const MAX_LEN: usize = 4 << 20;

/// Readahead bytes held by all volumes together, at most.
pub const GLOBAL_LIMIT: u64 = 64 << 20;

/// A prefetched chunk's buffer; gives its bytes back to the engine-wide budget when dropped.
pub struct Chunked {
    pub buf: AlignedBuf,
    budget: Arc<AtomicU64>,
}

impl Drop for Chunked {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.buf.len() as u64, Ordering::AcqRel);
    }
}

impl std::ops::Deref for Chunked {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

/// Reserves `len` bytes of the engine-wide readahead budget; `None` when it is spent.
pub fn reserve(budget: &Arc<AtomicU64>, len: usize) -> Option<impl FnOnce(AlignedBuf) -> Chunked> {
    let len = len as u64;
    if budget.fetch_add(len, Ordering::AcqRel) + len > GLOBAL_LIMIT {
        budget.fetch_sub(len, Ordering::AcqRel);
        return None;
    }
    let budget = budget.clone();
    Some(move |buf: AlignedBuf| {
        debug_assert_eq!(buf.len() as u64, len);
        Chunked { buf, budget }
    })
}

pub type Prefetch = Shared<BoxFuture<'static, Option<Arc<Chunked>>>>;

struct Chunk {
    offset: u64,
    len: usize,
    gen: u64,
    data: Prefetch,
}

#[derive(Default)]
struct State {
    next: u64,
    run: u32,
    ahead: u64,
    chunks: VecDeque<Chunk>,
}

#[derive(Default)]
pub struct Readahead {
    state: Mutex<State>,
}

impl Readahead {
    /// Notes an aligned read of `[offset, offset+len)` at write generation `gen` on a volume of
    /// `size` bytes. Returns a chunk that holds exactly this read, if any, and the ranges to read
    /// ahead now.
    pub fn on_read(&self, offset: u64, len: usize, gen: u64, size: u64, window: u64) -> (Option<Prefetch>, Vec<(u64, usize)>) {
        let mut s = self.state.lock();
        let end = offset + len as u64;
        let hit = s.chunks.iter().position(|c| c.offset == offset && c.len == len && c.gen == gen).and_then(|i| s.chunks.remove(i)).map(|c| c.data);
        s.chunks.retain(|c| c.gen == gen && c.offset >= end);
        if offset == s.next {
            s.run += 1;
        } else {
            s.run = 1;
            s.chunks.clear();
            s.ahead = 0;
        }
        s.next = end;
        let mut todo = Vec::new();
        if window > 0 && s.run >= 2 && (MIN_LEN..=MAX_LEN).contains(&len) {
            let mut start = s.ahead.max(end);
            let limit = (end + window).min(size);
            while start + len as u64 <= limit {
                todo.push((start, len));
                start += len as u64;
            }
            s.ahead = start;
        }
        (hit, todo)
    }

    pub fn insert(&self, offset: u64, len: usize, gen: u64, data: Prefetch) {
        self.state.lock().chunks.push_back(Chunk { offset, len, gen, data });
    }

    /// Drops every chunk (after a write).
    pub fn clear(&self) {
        let mut s = self.state.lock();
        if !s.chunks.is_empty() {
            s.chunks.clear();
        }
        s.ahead = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn ready() -> Prefetch {
        let budget = Arc::new(AtomicU64::new(0));
        let wrap = reserve(&budget, 4096).unwrap();
        async move { Some(Arc::new(wrap(AlignedBuf::new(4096)))) }.boxed().shared()
    }

    #[test]
    fn the_global_budget_bounds_readahead_and_is_given_back() {
        let budget = Arc::new(AtomicU64::new(0));
        let n = (GLOBAL_LIMIT / (1 << 20)) as usize;
        let held: Vec<_> = (0..n).map(|_| reserve(&budget, 1 << 20).expect("within budget")(AlignedBuf::new(1 << 20))).collect();
        assert!(reserve(&budget, 1 << 20).is_none(), "budget spent");
        drop(held);
        assert_eq!(budget.load(Ordering::Acquire), 0);
        assert!(reserve(&budget, 1 << 20).is_some());
    }

    #[test]
    fn a_sequential_stream_reads_ahead_and_hits() {
        let ra = Readahead::default();
        let m = 1 << 20;
        let (hit, todo) = ra.on_read(0, m, 0, 64 * m as u64, WINDOW);
        assert!(hit.is_none() && todo.is_empty(), "one read is not a stream");
        let (_, todo) = ra.on_read(m as u64, m, 0, 64 * m as u64, WINDOW);
        assert_eq!(todo.len(), (WINDOW / m as u64) as usize);
        assert_eq!(todo[0], (2 * m as u64, m));
        for (o, l) in &todo {
            ra.insert(*o, *l, 0, ready());
        }
        let (hit, more) = ra.on_read(2 * m as u64, m, 0, 64 * m as u64, WINDOW);
        assert!(hit.is_some());
        assert_eq!(more, vec![(2 * m as u64 + WINDOW, m)], "the window slides by one chunk");
    }

    #[test]
    fn writes_and_random_reads_drop_chunks() {
        let ra = Readahead::default();
        let m = 1 << 20;
        ra.on_read(0, m, 0, 64 * m as u64, WINDOW);
        let (_, todo) = ra.on_read(m as u64, m, 0, 64 * m as u64, WINDOW);
        for (o, l) in &todo {
            ra.insert(*o, *l, 0, ready());
        }
        // A write completed: generation 1. The chunk read at generation 0 is not used.
        let (hit, _) = ra.on_read(2 * m as u64, m, 1, 64 * m as u64, WINDOW);
        assert!(hit.is_none());
        ra.clear();
        let (hit, todo) = ra.on_read(40 * m as u64, m, 1, 64 * m as u64, WINDOW);
        assert!(hit.is_none() && todo.is_empty(), "a jump ends the stream");
    }
}
