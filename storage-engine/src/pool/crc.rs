//! CRC-32C (Castagnoli) of each 4 KiB block of a buffer, several blocks at once.
//!
//! A block's CRC is one long chain of dependent `crc32` instructions (3 cycles each); the
//! `crc32c` crate splits one buffer into three chains and recombines them, which for a 4 KiB
//! block costs a combine step per block. A large read or write has many blocks, each checksummed
//! on its own: running four blocks' chains side by side keeps the unit busy with no combine at
//! all. Short buffers, remainders and CPUs without SSE 4.2 go through the `crc32c` crate; the
//! results are the same (a unit test compares them).

use super::csum::BLOCK;

/// Calls `f(i, crc)` with the CRC-32C of each `BLOCK`-sized chunk `i` of `data` (the last one
/// may be shorter), in order.
pub fn for_each_block(data: &[u8], mut f: impl FnMut(usize, u32)) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if data.len() >= 4 * BLOCK && std::arch::is_x86_feature_detected!("sse4.2") {
        for (g, group) in data.chunks_exact(4 * BLOCK).enumerate() {
            // SAFETY: SSE 4.2 is present (checked above); `group` is exactly 4 blocks long.
            let crcs = unsafe { four_blocks(group) };
            for (k, c) in crcs.into_iter().enumerate() {
                f(g * 4 + k, c);
            }
            done = (g + 1) * 4;
        }
    }
    for (k, b) in data[done * BLOCK..].chunks(BLOCK).enumerate() {
        f(done + k, crc32c::crc32c(b));
    }
}

/// The CRC-32C of each of the four `BLOCK`-sized blocks of `group`.
///
/// # Safety
/// The CPU must have SSE 4.2, and `group.len()` must be `4 * BLOCK`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn four_blocks(group: &[u8]) -> [u32; 4] {
    use std::arch::x86_64::_mm_crc32_u64;
    debug_assert_eq!(group.len(), 4 * BLOCK);
    let p = group.as_ptr();
    let (mut a, mut b, mut c, mut d) = (!0u64, !0u64, !0u64, !0u64);
    let mut i = 0;
    while i < BLOCK {
        // SAFETY: i + 8 <= BLOCK and each lane's block lies within `group`; unaligned reads.
        let word = |lane: usize| unsafe { (p.add(lane * BLOCK + i) as *const u64).read_unaligned() };
        a = _mm_crc32_u64(a, u64::from_le(word(0)));
        b = _mm_crc32_u64(b, u64::from_le(word(1)));
        c = _mm_crc32_u64(c, u64::from_le(word(2)));
        d = _mm_crc32_u64(d, u64::from_le(word(3)));
        i += 8;
    }
    [!(a as u32), !(b as u32), !(c as u32), !(d as u32)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_gets_the_crc32c_crates_value_whatever_the_length() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..9 * BLOCK + 1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for len in [0, 100, BLOCK, 3 * BLOCK, 4 * BLOCK, 5 * BLOCK + 7, 8 * BLOCK, data.len()] {
            let want: Vec<u32> = data[..len].chunks(BLOCK).map(crc32c::crc32c).collect();
            let mut got = Vec::new();
            for_each_block(&data[..len], |i, c| {
                assert_eq!(i, got.len(), "blocks come in order");
                got.push(c);
            });
            assert_eq!(got, want, "length {len}");
        }
        // A known value: CRC-32C of 32 zero bytes (RFC 3720, B.4).
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8A91_36AA);
    }
}
