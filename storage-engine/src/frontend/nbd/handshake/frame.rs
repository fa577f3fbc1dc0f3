//! Handshake frames of the NBD protocol (fixed newstyle), parsed and encoded over byte buffers.
//! Field layouts and numbers follow the protocol document (NetworkBlockDevice/nbd, proto.md).

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The longest option payload we read; longer ones close the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Export names longer than this are refused (the protocol caps strings at 4096 bytes).
pub const MAX_NAME_LEN: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("option payload of {0} bytes is too long")]
    OptionTooLong(u32),
    #[error("malformed option payload: {0}")]
    Malformed(&'static str),
}

/// The server's first 18 bytes.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

pub fn parse_client_flags(b: [u8; 4]) -> Result<ClientFlags, FrameError> {
    let f = u32::from_be_bytes(b);
    if f & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(FrameError::UnknownClientFlags(f));
    }
    Ok(ClientFlags { fixed_newstyle: f & CLIENT_FIXED_NEWSTYLE != 0, no_zeroes: f & CLIENT_NO_ZEROES != 0 })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(b: [u8; 16]) -> Result<OptionHeader, FrameError> {
    let magic = u64::from_be_bytes(b[0..8].try_into().expect("8"));
    if magic != IHAVEOPT {
        return Err(FrameError::BadMagic(magic));
    }
    let option = u32::from_be_bytes(b[8..12].try_into().expect("4"));
    let len = u32::from_be_bytes(b[12..16].try_into().expect("4"));
    if len > MAX_OPTION_LEN {
        return Err(FrameError::OptionTooLong(len));
    }
    Ok(OptionHeader { option, len })
}

/// Payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub fn parse_info_request(p: &[u8]) -> Result<InfoRequest, FrameError> {
    if p.len() < 6 {
        return Err(FrameError::Malformed("shorter than a name length and a request count"));
    }
    let name_len = u32::from_be_bytes(p[0..4].try_into().expect("4")) as usize;
    if name_len > MAX_NAME_LEN || 4 + name_len + 2 > p.len() {
        return Err(FrameError::Malformed("export name length does not fit the payload"));
    }
    let name = std::str::from_utf8(&p[4..4 + name_len]).map_err(|_| FrameError::Malformed("export name is not UTF-8"))?;
    let rest = &p[4 + name_len..];
    let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    if rest.len() != 2 + 2 * n {
        return Err(FrameError::Malformed("information request count does not match the payload"));
    }
    let requests = rest[2..].chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name: name.to_string(), requests })
}

pub fn parse_export_name(p: &[u8]) -> Result<String, FrameError> {
    if p.len() > MAX_NAME_LEN {
        return Err(FrameError::Malformed("export name is too long"));
    }
    std::str::from_utf8(p).map(str::to_string).map_err(|_| FrameError::Malformed("export name is not UTF-8"))
}

/// Appends one option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

pub fn info_name(name: &str) -> Vec<u8> {
    let mut d = INFO_NAME.to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

pub fn info_description(text: &str) -> Vec<u8> {
    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
    d.extend_from_slice(text.as_bytes());
    d
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, preferred, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d
}

/// Payload of NBD_REP_SERVER for NBD_OPT_LIST.
pub fn list_entry(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// The reply to NBD_OPT_EXPORT_NAME.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut d = size.to_be_bytes().to_vec();
    d.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        d.extend_from_slice(&[0u8; 124]);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_is_fixed_newstyle() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn info_request_round_trip_and_errors() {
        let mut p = 3u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"vol");
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(&INFO_NAME.to_be_bytes());
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info_request(&p).unwrap(), InfoRequest { name: "vol".into(), requests: vec![1, 3] });
        assert!(parse_info_request(&p[..p.len() - 1]).is_err());
        let mut long = u32::MAX.to_be_bytes().to_vec();
        long.extend_from_slice(&[0; 2]);
        assert!(parse_info_request(&long).is_err());
    }

    #[test]
    fn option_header_checks_magic_and_length() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(parse_option_header(b).unwrap(), OptionHeader { option: OPT_GO, len: 10 });
        b[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(parse_option_header(b), Err(FrameError::OptionTooLong(_))));
        b[0] = 0;
        assert!(matches!(parse_option_header(b), Err(FrameError::BadMagic(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]
        #[test]
        fn handshake_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_info_request(&bytes);
            let _ = parse_export_name(&bytes);
            if bytes.len() >= 16 {
                let _ = parse_option_header(bytes[..16].try_into().unwrap());
            }
            if bytes.len() >= 4 {
                let _ = parse_client_flags(bytes[..4].try_into().unwrap());
            }
        }

        #[test]
        fn well_formed_info_requests_parse_back(name in "[a-z0-9-]{0,64}", reqs in proptest::collection::vec(any::<u16>(), 0..20)) {
            let mut p = (name.len() as u32).to_be_bytes().to_vec();
            p.extend_from_slice(name.as_bytes());
            p.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
            for r in &reqs { p.extend_from_slice(&r.to_be_bytes()); }
            prop_assert_eq!(parse_info_request(&p).unwrap(), InfoRequest { name, requests: reqs });
        }
    }
}
