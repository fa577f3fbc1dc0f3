//! Transmission frames: the 28-byte request and the 16-byte simple reply.

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const REQUEST_LEN: usize = 28;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const TX_HAS_FLAGS: u16 = 1 << 0;
pub const TX_SEND_FLUSH: u16 = 1 << 2;
pub const TX_SEND_FUA: u16 = 1 << 3;
pub const TX_SEND_TRIM: u16 = 1 << 5;
pub const TX_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TX_CAN_MULTI_CONN: u16 = 1 << 8;

/// What every Strata export supports. FLUSH syncs whole devices, so it covers writes completed
/// on any connection: multi-conn is safe.
pub const EXPORT_FLAGS: u16 = TX_HAS_FLAGS | TX_SEND_FLUSH | TX_SEND_FUA | TX_SEND_TRIM | TX_SEND_WRITE_ZEROES | TX_CAN_MULTI_CONN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad request magic {0:#010x}")]
pub struct BadMagic(pub u32);

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request, BadMagic> {
    let magic = u32::from_be_bytes(b[0..4].try_into().expect("4"));
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(magic));
    }
    Ok(Request {
        flags: u16::from_be_bytes([b[4], b[5]]),
        cmd: u16::from_be_bytes([b[6], b[7]]),
        handle: u64::from_be_bytes(b[8..16].try_into().expect("8")),
        offset: u64::from_be_bytes(b[16..24].try_into().expect("8")),
        len: u32::from_be_bytes(b[24..28].try_into().expect("4")),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]
        #[test]
        fn request_parser_never_panics_and_round_trips(bytes in proptest::array::uniform28(any::<u8>())) {
            if let Ok(r) = parse_request(&bytes) {
                prop_assert_eq!(encode_request(&r), bytes);
            } else {
                prop_assert_ne!(u32::from_be_bytes(bytes[0..4].try_into().unwrap()), REQUEST_MAGIC);
            }
        }
    }

    #[test]
    fn reply_layout() {
        let r = simple_reply(5, 0x0102030405060708);
        assert_eq!(&r[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 5);
        assert_eq!(&r[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
