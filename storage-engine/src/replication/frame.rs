//! The replication protocol's frames, parsed and encoded by pure functions (big-endian).
//!
//! Request: a 44-byte header, then `len` payload bytes for WRITE.
//! ```text
//!  0 magic u32 ("STRQ")   4 op u8   5 flags u8   6 reserved u16
//!  8 handle u64          16 volume id u64        24 epoch u64
//! 32 offset u64          40 len u32
//! ```
//! Reply: a 20-byte header, then `len` payload bytes (READ data, EXTENTS list, CHECKSUM).
//! ```text
//!  0 magic u32 ("STRP")   4 error u32 (0 or an errno)   8 handle u64   16 len u32
//! ```
//! Every request carries the volume's epoch; a replica answers [`ESTALE`] to one older than the
//! newest it has seen.

pub const REQUEST_MAGIC: u32 = u32::from_be_bytes(*b"STRQ");
pub const REPLY_MAGIC: u32 = u32::from_be_bytes(*b"STRP");
pub const REQUEST_LEN: usize = 44;
pub const REPLY_LEN: usize = 20;
/// The largest payload either side accepts.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Refused: the request's epoch is older than the replica's (the sender was fenced).
pub const ESTALE: u32 = libc::ESTALE as u32;
/// The replica does not hold this volume.
pub const ENOENT: u32 = libc::ENOENT as u32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    Read = 1,
    Write = 2,
    Flush = 3,
    Trim = 4,
    WriteZeroes = 5,
    /// Announces the sender as target at `epoch` and the volume size in `offset`; fences every
    /// older epoch on this replica.
    Hello = 6,
    /// The replica's allocated logical extents (u64 each), for a thin full rebuild.
    Extents = 7,
    /// Frees the replica's data of a deleted volume.
    Drop = 8,
    /// The crc32c (u32) of `len` bytes at `offset` of the replica.
    Checksum = 9,
    /// Shares every extent of the volume with the volume whose id is `offset` (a snapshot or a
    /// clone), with the replica's I/O to the volume drained.
    Share = 10,
    /// Replaces the volume's data with the snapshot whose id is `offset` (shared extents).
    Restore = 11,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Trim,
            5 => Op::WriteZeroes,
            6 => Op::Hello,
            7 => Op::Extents,
            8 => Op::Drop,
            9 => Op::Checksum,
            10 => Op::Share,
            11 => Op::Restore,
            _ => return None,
        })
    }
}

pub const FLAG_FUA: u8 = 1;
pub const FLAG_NO_HOLE: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub flags: u8,
    pub handle: u64,
    pub volume: u64,
    pub epoch: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// Bytes of payload that follow the header.
    pub fn payload_len(&self) -> usize {
        if self.op == Op::Write {
            self.len as usize
        } else {
            0
        }
    }
}

/// A replication request as its sender means it: one variant per operation, with named fields
/// (on the wire several share the header's `offset` and `len`, see [`Command::header`]). `P` is
/// WRITE's payload: `Bytes` on the sending side, the receive buffer on the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<P = bytes::Bytes> {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: P,
        fua: bool,
    },
    Flush,
    /// Unmaps the range (whole extents go back to the pool); it reads as zeroes.
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// Zeroes the range; `keep_allocated` keeps whole extents mapped instead of freeing them.
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        keep_allocated: bool,
    },
    /// Announces the sender as target at the request's epoch, and the volume's size; fences
    /// every older epoch on the replica. The reply is the replica node's boot id.
    Hello {
        size: u64,
    },
    /// The replica's allocated logical extents (u64 each), for a thin full rebuild.
    Extents,
    /// Frees the replica's data of a deleted volume.
    Drop,
    /// The crc32c (u32) of `len` bytes at `offset` of the replica.
    Checksum {
        offset: u64,
        len: u32,
    },
    /// Shares every extent of the volume with volume id `into` (a snapshot or a clone).
    Share {
        into: u64,
    },
    /// Replaces the volume's data with snapshot id `from`'s (shared extents).
    Restore {
        from: u64,
    },
}

impl<P: AsRef<[u8]>> Command<P> {
    /// The request header that carries this command.
    pub fn header(&self, handle: u64, volume: u64, epoch: u64) -> Request {
        let fua = |f: bool| if f { FLAG_FUA } else { 0 };
        let (op, flags, offset, len) = match self {
            Command::Read { offset, len } => (Op::Read, 0, *offset, *len),
            Command::Write { offset, data, fua: f } => (Op::Write, fua(*f), *offset, data.as_ref().len() as u32),
            Command::Flush => (Op::Flush, 0, 0, 0),
            Command::Trim { offset, len, fua: f } => (Op::Trim, fua(*f), *offset, *len),
            Command::WriteZeroes { offset, len, fua: f, keep_allocated } => {
                (Op::WriteZeroes, fua(*f) | if *keep_allocated { FLAG_NO_HOLE } else { 0 }, *offset, *len)
            }
            Command::Hello { size } => (Op::Hello, 0, *size, 0),
            Command::Extents => (Op::Extents, 0, 0, 0),
            Command::Drop => (Op::Drop, 0, 0, 0),
            Command::Checksum { offset, len } => (Op::Checksum, 0, *offset, *len),
            Command::Share { into } => (Op::Share, 0, *into, 0),
            Command::Restore { from } => (Op::Restore, 0, *from, 0),
        };
        Request { op, flags, handle, volume, epoch, offset, len }
    }

    /// The payload that follows the header (WRITE's data).
    pub fn payload(&self) -> Option<&P> {
        match self {
            Command::Write { data, .. } => Some(data),
            _ => None,
        }
    }
}

impl<P> Command<P> {
    /// The operation's name (for logs).
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read { .. } => "READ",
            Command::Write { .. } => "WRITE",
            Command::Flush => "FLUSH",
            Command::Trim { .. } => "TRIM",
            Command::WriteZeroes { .. } => "WRITE_ZEROES",
            Command::Hello { .. } => "HELLO",
            Command::Extents => "EXTENTS",
            Command::Drop => "DROP",
            Command::Checksum { .. } => "CHECKSUM",
            Command::Share { .. } => "SHARE",
            Command::Restore { .. } => "RESTORE",
        }
    }

    /// The command a parsed request carries; `payload` is WRITE's data (read after the
    /// header). None for a WRITE without its payload.
    pub fn from_request(r: &Request, payload: Option<P>) -> Option<Command<P>> {
        let fua = r.flags & FLAG_FUA != 0;
        Some(match r.op {
            Op::Read => Command::Read { offset: r.offset, len: r.len },
            Op::Write => Command::Write { offset: r.offset, data: payload?, fua },
            Op::Flush => Command::Flush,
            Op::Trim => Command::Trim { offset: r.offset, len: r.len, fua },
            Op::WriteZeroes => Command::WriteZeroes { offset: r.offset, len: r.len, fua, keep_allocated: r.flags & FLAG_NO_HOLE != 0 },
            Op::Hello => Command::Hello { size: r.offset },
            Op::Extents => Command::Extents,
            Op::Drop => Command::Drop,
            Op::Checksum => Command::Checksum { offset: r.offset, len: r.len },
            Op::Share => Command::Share { into: r.offset },
            Op::Restore => Command::Restore { from: r.offset },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub error: u32,
    pub handle: u64,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    #[error("unknown op {0}")]
    Op(u8),
    #[error("payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    TooLarge(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, FrameError> {
    let magic = u32_at(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(FrameError::Magic(magic));
    }
    let op = Op::from_u8(b[4]).ok_or(FrameError::Op(b[4]))?;
    let len = u32_at(b, 40);
    // Only data moves are bounded; TRIM and WRITE_ZEROES may cover a large range.
    if matches!(op, Op::Write | Op::Read | Op::Checksum) && len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Request { op, flags: b[5], handle: u64_at(b, 8), volume: u64_at(b, 16), epoch: u64_at(b, 24), offset: u64_at(b, 32), len })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4] = r.op as u8;
    b[5] = r.flags;
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.volume.to_be_bytes());
    b[24..32].copy_from_slice(&r.epoch.to_be_bytes());
    b[32..40].copy_from_slice(&r.offset.to_be_bytes());
    b[40..44].copy_from_slice(&r.len.to_be_bytes());
    b
}

pub fn parse_reply(b: &[u8; REPLY_LEN]) -> Result<Reply, FrameError> {
    let magic = u32_at(b, 0);
    if magic != REPLY_MAGIC {
        return Err(FrameError::Magic(magic));
    }
    let len = u32_at(b, 16);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Reply { error: u32_at(b, 4), handle: u64_at(b, 8), len })
}

pub fn encode_reply(r: &Reply) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&r.error.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..20].copy_from_slice(&r.len.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]
        #[test]
        fn request_parser_never_panics_and_round_trips(bytes in proptest::collection::vec(any::<u8>(), REQUEST_LEN)) {
            let b: [u8; REQUEST_LEN] = bytes.try_into().unwrap();
            if let Ok(r) = parse_request(&b) {
                let mut canon = b;
                canon[6] = 0;
                canon[7] = 0;
                prop_assert_eq!(encode_request(&r), canon);
            }
        }

        #[test]
        fn reply_parser_never_panics_and_round_trips(bytes in proptest::array::uniform20(any::<u8>())) {
            if let Ok(r) = parse_reply(&bytes) {
                prop_assert_eq!(encode_reply(&r), bytes);
            }
        }

        #[test]
        fn valid_requests_round_trip(op in 1u8..=11, flags in any::<u8>(), handle in any::<u64>(), volume in any::<u64>(), epoch in any::<u64>(), offset in any::<u64>(), len in 0..=MAX_PAYLOAD) {
            let r = Request { op: Op::from_u8(op).unwrap(), flags, handle, volume, epoch, offset, len };
            prop_assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        }
    }

    #[test]
    fn every_command_round_trips_through_its_header() {
        let data = bytes::Bytes::from(vec![7u8; 8192]);
        let all = [
            Command::Read { offset: 4096, len: 512 },
            Command::Write { offset: 8192, data: data.clone(), fua: true },
            Command::Write { offset: 0, data: data.clone(), fua: false },
            Command::Flush,
            Command::Trim { offset: 1 << 20, len: 1 << 30, fua: false },
            Command::WriteZeroes { offset: 0, len: 65536, fua: true, keep_allocated: true },
            Command::WriteZeroes { offset: 0, len: 65536, fua: false, keep_allocated: false },
            Command::Hello { size: 16 << 30 },
            Command::Extents,
            Command::Drop,
            Command::Checksum { offset: 4096, len: 4096 },
            Command::Share { into: 42 },
            Command::Restore { from: 43 },
        ];
        for c in all {
            let h = c.header(9, 2, 3);
            let parsed = parse_request(&encode_request(&h)).unwrap();
            assert_eq!((parsed.handle, parsed.volume, parsed.epoch), (9, 2, 3));
            assert_eq!(parsed.payload_len(), c.payload().map_or(0, |d| d.len()), "{c:?}");
            assert_eq!(Command::from_request(&parsed, c.payload().cloned()), Some(c.clone()));
        }
        let w = Command::Write { offset: 0, data: data.clone(), fua: false }.header(1, 1, 1);
        assert_eq!(Command::<bytes::Bytes>::from_request(&w, None), None, "a WRITE needs its payload");
    }

    #[test]
    fn bad_frames_are_named() {
        let mut b = encode_request(&Request { op: Op::Write, flags: FLAG_FUA, handle: 1, volume: 2, epoch: 3, offset: 4096, len: 4096 });
        assert_eq!(&b[0..4], b"STRQ");
        b[4] = 99;
        assert_eq!(parse_request(&b), Err(FrameError::Op(99)));
        b[4] = 2;
        b[40..44].copy_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert_eq!(parse_request(&b), Err(FrameError::TooLarge(MAX_PAYLOAD + 1)));
        b[4] = Op::WriteZeroes as u8;
        assert_eq!(parse_request(&b).map(|r| r.len), Ok(MAX_PAYLOAD + 1), "zeroing a large range is fine");
        b[0] = b'X';
        assert!(matches!(parse_request(&b), Err(FrameError::Magic(_))));
    }
}
