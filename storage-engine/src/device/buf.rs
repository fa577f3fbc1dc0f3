//! Aligned I/O buffers, reused from a pool so the data path does not allocate per request.

use parking_lot::Mutex;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every buffer: enough for O_DIRECT on 4Kn devices.
pub const ALIGN: usize = 4096;
const MIN_CLASS: u32 = 12; // 4 KiB
const MAX_CLASS: u32 = 25; // 32 MiB
const KEEP_PER_CLASS: usize = 64;
/// Bytes of free buffers kept per size class: small classes keep [`KEEP_PER_CLASS`], large ones
/// fewer (at least one), so the pool holds at most about 100 MiB once a burst of large requests
/// has passed instead of 64 buffers of every size.
const KEEP_BYTES_PER_CLASS: usize = 8 << 20;

/// How many free buffers of size class `class` the pool keeps.
fn keep(class: u32) -> usize {
    (KEEP_BYTES_PER_CLASS >> class).clamp(1, KEEP_PER_CLASS)
}

/// A heap buffer aligned to [`ALIGN`], with a length inside its capacity.
/// Dropping it returns the allocation to the pool it came from.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
    pool: Option<Arc<PoolInner>>,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes, not pooled.
    pub fn new(len: usize) -> Self {
        let cap = len.max(ALIGN).next_multiple_of(ALIGN);
        let layout = Layout::from_size_align(cap, ALIGN).expect("buffer layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len, pool: None }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// Sets the length; panics if it exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "buffer length {len} over capacity {}", self.cap);
        self.len = len;
    }
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes and initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}
impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let class = class_of(self.cap);
            if self.cap == 1 << class {
                let mut free = pool.free[(class - MIN_CLASS) as usize].lock();
                if free.len() < keep(class) {
                    free.push(AlignedBuf { ptr: self.ptr, cap: self.cap, len: 0, pool: None });
                    return;
                }
            }
        }
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("buffer layout");
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) };
    }
}

struct PoolInner {
    free: Vec<Mutex<Vec<AlignedBuf>>>,
}

/// Size-classed pool of aligned buffers (powers of two from 4 KiB to 32 MiB).
#[derive(Clone)]
pub struct BufPool {
    inner: Arc<PoolInner>,
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new()
    }
}

fn class_of(len: usize) -> u32 {
    let len = len.max(1 << MIN_CLASS);
    usize::BITS - (len - 1).leading_zeros()
}

impl BufPool {
    pub fn new() -> Self {
        let free = (MIN_CLASS..=MAX_CLASS).map(|_| Mutex::new(Vec::new())).collect();
        BufPool { inner: Arc::new(PoolInner { free }) }
    }

    /// A buffer of `len` bytes. Its content is whatever the last user left: callers fill it.
    pub fn get(&self, len: usize) -> AlignedBuf {
        let class = class_of(len);
        if class > MAX_CLASS {
            return AlignedBuf::new(len);
        }
        let reused = self.inner.free[(class - MIN_CLASS) as usize].lock().pop();
        let mut buf = reused.unwrap_or_else(|| AlignedBuf::new(1 << class));
        buf.pool = Some(self.inner.clone());
        buf.set_len(len);
        buf
    }

    /// A buffer of `len` zero bytes.
    pub fn get_zeroed(&self, len: usize) -> AlignedBuf {
        let mut b = self.get(len);
        b.fill(0);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_reused() {
        let pool = BufPool::new();
        let b = pool.get(5000);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        let p = b.as_ptr();
        drop(b);
        let c = pool.get(8000);
        assert_eq!(c.as_ptr(), p, "a freed buffer of the same class is reused");
        let big = pool.get(64 << 20);
        assert_eq!(big.len(), 64 << 20);
    }

    #[test]
    fn the_pool_keeps_few_large_buffers() {
        let pool = BufPool::new();
        let kept = |len: usize| pool.inner.free[(class_of(len) - MIN_CLASS) as usize].lock().len();
        let large: Vec<AlignedBuf> = (0..10).map(|_| pool.get(32 << 20)).collect();
        let small: Vec<AlignedBuf> = (0..100).map(|_| pool.get(4096)).collect();
        drop(large);
        drop(small);
        assert_eq!(kept(32 << 20), 1, "a burst of 32 MiB buffers leaves one behind");
        assert_eq!(kept(4096), KEEP_PER_CLASS, "small buffers are kept as before");
        assert_eq!(kept(1 << 20), 0);
        let _ = pool.get(1 << 20);
        let ones: Vec<AlignedBuf> = (0..20).map(|_| pool.get(1 << 20)).collect();
        drop(ones);
        assert_eq!(kept(1 << 20), 8, "8 MiB of 1 MiB buffers");
    }
}
