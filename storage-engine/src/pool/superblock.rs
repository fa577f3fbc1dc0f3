//! The superblock: the first 4 KiB of every pool device.
//!
//! ```text
//! 0     magic "STRATAPL"          48  extent_size u64       80  data_offset u64
//! 8     version u32               56  device_size u64       88  extent_count u64
//! 12    flags u32                 64  journal_offset u64    96  created_unix u64
//! 16    pool_uuid [16]            72  journal_len u64       104 intent_offset u64 (v2)
//! 32    device_uuid [16]                                    112 csum_offset u64 (v2)
//!                                                           4092 crc32c of bytes 0..4092
//! ```
//!
//! A second copy lives in the device's last 4 KiB ([`backup_offset`]), which new layouts keep
//! out of the data area (older pools use it when their last extent leaves it free): a bit flip in
//! one copy is repaired from the other at open.
//!
//! Version 2 adds block checksums: after the journal, the intent bitmap (one bit per extent:
//! "its checksums on disk may be behind its data") and one 4 KiB checksum slot per extent
//! (a crc32c per 4 KiB block), then the data. Version-1 devices open without checksums.

use super::PoolError;
use uuid::Uuid;

pub const SB_SIZE: usize = 4096;
pub const MAGIC: &[u8; 8] = b"STRATAPL";
pub const VERSION: u32 = 2;
/// Checksum slot bytes per extent (one crc32c per 4 KiB block; 1 MiB extents use 1 KiB of it).
pub const CSUM_SLOT: u64 = 4096;
const CRC_AT: usize = SB_SIZE - 4;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub pool_uuid: Uuid,
    pub device_uuid: Uuid,
    pub extent_size: u64,
    pub device_size: u64,
    pub journal_offset: u64,
    pub journal_len: u64,
    pub data_offset: u64,
    pub extent_count: u64,
    pub created_unix: u64,
    /// Intent bitmap (0: a version-1 device without checksums).
    pub intent_offset: u64,
    /// Checksum slots (0: a version-1 device without checksums).
    pub csum_offset: u64,
    /// [`FLAG_REPLICAS_SUSPECT`] or 0.
    pub flags: u32,
}

/// Set by `check --repair` after it salvaged a damaged journal: mappings were lost, so this
/// device's replicas may miss data. The engine takes its replicas out of the in-sync sets (they
/// are rebuilt from other nodes) before serving anything, then clears the flag.
pub const FLAG_REPLICAS_SUSPECT: u32 = 1;

/// What the first 4 KiB of a device turned out to be.
#[derive(Debug)]
pub enum Probe {
    /// A valid Strata superblock.
    Strata(Superblock),
    /// Our magic, but the checksum or fields are wrong: corrupted.
    Corrupt(String),
    /// Something else that must not be overwritten without --force-format.
    Foreign(&'static str),
    /// Nothing recognisable (zeroes or unknown bytes).
    Blank,
}

/// Entries of one 4 KiB journal block: (4096 - 48) / 21.
pub const ENTRIES_PER_BLOCK: u64 = 192;
pub const JOURNAL_BLOCK: u64 = 4096;

impl Superblock {
    /// Lays out a new device: superblock, journal sized for the worst-case checkpoint, data.
    pub fn layout(pool_uuid: Uuid, device_size: u64, extent_size: u64) -> Result<Superblock, PoolError> {
        if !extent_size.is_power_of_two() || extent_size < 64 * 1024 {
            return Err(PoolError::Invalid(format!("extent size {extent_size} must be a power of two of at least 64 KiB")));
        }
        let max_extents = device_size / extent_size;
        let ckpt_blocks = max_extents / ENTRIES_PER_BLOCK + 2;
        let half_blocks = (4 * ckpt_blocks).max(512);
        let journal_len = 2 * half_blocks * JOURNAL_BLOCK;
        if extent_size / 4096 * 4 > CSUM_SLOT {
            return Err(PoolError::Invalid(format!("extent size {extent_size} is too large: at most {} bytes", CSUM_SLOT / 4 * 4096)));
        }
        let intent_offset = SB_SIZE as u64 + journal_len;
        let csum_offset = intent_offset + max_extents.div_ceil(8).next_multiple_of(4096);
        let data_offset = (csum_offset + max_extents * CSUM_SLOT).next_multiple_of(extent_size);
        let min = data_offset + MIN_EXTENTS * extent_size + SB_SIZE as u64;
        if device_size < min {
            return Err(PoolError::TooSmall { size: device_size, min });
        }
        Ok(Superblock {
            pool_uuid,
            device_uuid: Uuid::new_v4(),
            extent_size,
            device_size,
            journal_offset: SB_SIZE as u64,
            journal_len,
            data_offset,
            // The last 4 KiB holds the backup superblock.
            extent_count: (backup_offset(device_size) - data_offset) / extent_size,
            created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            intent_offset,
            csum_offset,
            flags: 0,
        })
    }

    pub fn encode(&self) -> [u8; SB_SIZE] {
        let mut b = [0u8; SB_SIZE];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..32].copy_from_slice(self.pool_uuid.as_bytes());
        b[32..48].copy_from_slice(self.device_uuid.as_bytes());
        let fields = [
            self.extent_size,
            self.device_size,
            self.journal_offset,
            self.journal_len,
            self.data_offset,
            self.extent_count,
            self.created_unix,
            self.intent_offset,
            self.csum_offset,
        ];
        for (i, v) in fields.iter().enumerate() {
            b[48 + i * 8..56 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Recognises the first 4 KiB (plus, for filesystem signatures, the first 64 KiB + 128 bytes).
    pub fn probe(head: &[u8]) -> Probe {
        if head.len() < SB_SIZE {
            return Probe::Corrupt(format!("device is shorter than a superblock ({} bytes)", head.len()));
        }
        if &head[0..8] == MAGIC {
            return match Self::decode(&head[..SB_SIZE]) {
                Ok(sb) => Probe::Strata(sb),
                Err(why) => Probe::Corrupt(why),
            };
        }
        if let Some(kind) = foreign_signature(head) {
            return Probe::Foreign(kind);
        }
        Probe::Blank
    }

    fn decode(b: &[u8]) -> Result<Superblock, String> {
        let stored = u32::from_le_bytes(b[CRC_AT..SB_SIZE].try_into().expect("4 bytes"));
        let actual = crc32c::crc32c(&b[..CRC_AT]);
        if stored != actual {
            return Err(format!("superblock checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != 1 && version != VERSION {
            return Err(format!("superblock version {version} is not supported (this engine reads version {VERSION})"));
        }
        let u = |i: usize| u64::from_le_bytes(b[48 + i * 8..56 + i * 8].try_into().expect("8 bytes"));
        let sb = Superblock {
            pool_uuid: Uuid::from_slice(&b[16..32]).expect("16 bytes"),
            device_uuid: Uuid::from_slice(&b[32..48]).expect("16 bytes"),
            extent_size: u(0),
            device_size: u(1),
            journal_offset: u(2),
            journal_len: u(3),
            data_offset: u(4),
            extent_count: u(5),
            created_unix: u(6),
            intent_offset: if version >= 2 { u(7) } else { 0 },
            csum_offset: if version >= 2 { u(8) } else { 0 },
            flags: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
        };
        let sane = sb.extent_size.is_power_of_two()
            && sb.journal_offset >= SB_SIZE as u64
            && sb.journal_len.is_multiple_of(2 * JOURNAL_BLOCK)
            && sb.journal_offset + sb.journal_len <= sb.data_offset
            && (sb.csum_offset == 0
                || (sb.intent_offset >= sb.journal_offset + sb.journal_len
                    && sb.csum_offset >= sb.intent_offset + sb.extent_count.div_ceil(8)
                    && sb.csum_offset + sb.extent_count * CSUM_SLOT <= sb.data_offset))
            && sb.data_offset + sb.extent_count * sb.extent_size <= sb.device_size;
        if !sane {
            return Err("superblock fields are inconsistent".into());
        }
        Ok(sb)
    }

    /// Whether the device's last 4 KiB lies outside the data area (room for the backup copy).
    pub fn has_backup_room(&self) -> bool {
        self.data_offset + self.extent_count * self.extent_size <= backup_offset(self.device_size)
    }

    /// Whether this device keeps block checksums (version 2).
    pub fn has_checksums(&self) -> bool {
        self.csum_offset != 0
    }

    /// Byte offset of physical extent `pext`'s checksum slot.
    pub fn csum_slot_offset(&self, pext: u32) -> u64 {
        self.csum_offset + pext as u64 * CSUM_SLOT
    }

    /// Byte offset of physical extent `pext`.
    pub fn extent_offset(&self, pext: u32) -> u64 {
        self.data_offset + pext as u64 * self.extent_size
    }
}

/// Where the backup copy of the superblock lives on a device of `device_size` bytes: its last
/// whole 4 KiB.
pub fn backup_offset(device_size: u64) -> u64 {
    (device_size / SB_SIZE as u64 * SB_SIZE as u64).saturating_sub(SB_SIZE as u64)
}

/// A device needs this many data extents at least.
pub const MIN_EXTENTS: u64 = 16;

/// Signatures of things we refuse to overwrite without --force-format.
fn foreign_signature(b: &[u8]) -> Option<&'static str> {
    let at = |off: usize, sig: &[u8]| b.len() >= off + sig.len() && &b[off..off + sig.len()] == sig;
    if at(1080, &[0x53, 0xEF]) {
        return Some("an ext2/3/4 filesystem");
    }
    if at(0, b"XFSB") {
        return Some("an XFS filesystem");
    }
    if at(0x10040, b"_BHRfS_M") {
        return Some("a btrfs filesystem");
    }
    if at(0, b"LUKS\xba\xbe") {
        return Some("a LUKS volume");
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return Some("swap space");
    }
    if at(512, b"EFI PART") {
        return Some("a GPT partition table");
    }
    if at(510, &[0x55, 0xAA]) {
        return Some("an MBR partition table");
    }
    None
}

/// How many bytes `probe` wants to see.
pub const PROBE_LEN: usize = 0x10040 + 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_detects_flips() {
        let sb = Superblock::layout(Uuid::new_v4(), 1 << 30, 1 << 20).unwrap();
        assert!(sb.data_offset.is_multiple_of(1 << 20));
        assert!(sb.extent_count > 1000);
        let mut bytes = sb.encode().to_vec();
        match Superblock::probe(&bytes) {
            Probe::Strata(got) => assert_eq!(got, sb),
            other => panic!("{other:?}"),
        }
        bytes[60] ^= 0x01;
        assert!(matches!(Superblock::probe(&bytes), Probe::Corrupt(w) if w.contains("checksum")));
    }

    #[test]
    fn version_1_superblocks_open_without_checksums() {
        let sb = Superblock::layout(Uuid::new_v4(), 1 << 30, 1 << 20).unwrap();
        assert!(sb.has_checksums());
        assert!(sb.csum_offset + sb.extent_count * CSUM_SLOT <= sb.data_offset);
        let mut b = sb.encode();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[104..120].fill(0);
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        match Superblock::probe(&b) {
            Probe::Strata(got) => assert!(!got.has_checksums() && got.data_offset == sb.data_offset),
            other => panic!("{other:?}"),
        }
        b[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(Superblock::probe(&b), Probe::Corrupt(w) if w.contains("version 3")));
    }

    #[test]
    fn foreign_signatures_are_recognised() {
        let mut b = vec![0u8; PROBE_LEN];
        assert!(matches!(Superblock::probe(&b), Probe::Blank));
        b[1080] = 0x53;
        b[1081] = 0xEF;
        assert!(matches!(Superblock::probe(&b), Probe::Foreign(k) if k.contains("ext")));
    }

    #[test]
    fn tiny_devices_are_refused() {
        let err = Superblock::layout(Uuid::new_v4(), 8 << 20, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("too small"), "{err}");
    }
}
