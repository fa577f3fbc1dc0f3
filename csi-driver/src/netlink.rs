//! Messages for the kernel NBD driver's generic-netlink family ("nbd"), encoded and parsed by
//! pure functions: resolve the family id, CONNECT a device to sockets already in the NBD
//! transmission phase, RECONFIGURE, DISCONNECT and STATUS. Constants are the kernel's uapi values
//! (`linux/netlink.h`, `linux/genetlink.h`, `linux/nbd-netlink.h`).
//!
//! Used by `kernelnbd` (`--attach kernel-nbd`); the messages are unit-tested here, and the VM
//! tier (`e2e/vm/`) runs them against Debian's kernel.

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLMSG_ERROR: u16 = 0x2;
pub const NLA_F_NESTED: u16 = 0x8000;

pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

pub const NBD_GENL_FAMILY_NAME: &str = "nbd";
pub const NBD_GENL_VERSION: u8 = 1;
pub const NBD_CMD_CONNECT: u8 = 1;
pub const NBD_CMD_DISCONNECT: u8 = 2;
pub const NBD_CMD_RECONFIGURE: u8 = 3;
pub const NBD_CMD_STATUS: u8 = 5;

pub const NBD_ATTR_INDEX: u16 = 1;
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
pub const NBD_ATTR_TIMEOUT: u16 = 4;
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
pub const NBD_ATTR_SOCKETS: u16 = 7;
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
pub const NBD_ATTR_DEVICE_LIST: u16 = 9;
pub const NBD_SOCK_ITEM: u16 = 1;
pub const NBD_SOCK_FD: u16 = 1;
pub const NBD_DEVICE_ITEM: u16 = 1;
pub const NBD_DEVICE_INDEX: u16 = 1;
pub const NBD_DEVICE_CONNECTED: u16 = 2;

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// An attribute: type, payload, padded to 4 bytes.
pub fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut b = Vec::with_capacity(align4(len));
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize(align4(len), 0);
    b
}

pub fn attr_u32(kind: u16, v: u32) -> Vec<u8> {
    attr(kind, &v.to_ne_bytes())
}

pub fn attr_u64(kind: u16, v: u64) -> Vec<u8> {
    attr(kind, &v.to_ne_bytes())
}

pub fn nested(kind: u16, inner: &[Vec<u8>]) -> Vec<u8> {
    attr(kind | NLA_F_NESTED, &inner.concat())
}

/// A generic netlink request: netlink header, genl header, attributes.
pub fn message(family: u16, cmd: u8, version: u8, seq: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
    let body = attrs.concat();
    let len = NLMSG_HDRLEN + GENL_HDRLEN + body.len();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&family.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&[cmd, version, 0, 0]);
    b.extend_from_slice(&body);
    b
}

/// Asks the controller for the "nbd" family's id.
pub fn get_family(seq: u32) -> Vec<u8> {
    message(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, seq, &[attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0")])
}

/// What CONNECT needs: the export's size and flags (from the NBD handshake) and the socket fds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// A specific /dev/nbdN, or any free one.
    pub index: Option<u32>,
    pub size: u64,
    pub block_size: u64,
    /// Seconds a request may take before the kernel gives its socket up and requeues it.
    pub timeout_secs: u64,
    /// Seconds the kernel holds requests while every socket is dead, waiting for RECONFIGURE to
    /// give it new ones (0: fail them at once).
    pub dead_conn_timeout_secs: u64,
    pub server_flags: u64,
    pub fds: Vec<u32>,
}

fn sockets(fds: &[u32]) -> Vec<u8> {
    let items: Vec<Vec<u8>> = fds.iter().map(|fd| nested(NBD_SOCK_ITEM, &[attr_u32(NBD_SOCK_FD, *fd)])).collect();
    nested(NBD_ATTR_SOCKETS, &items)
}

pub fn connect(family: u16, seq: u32, c: &Connect) -> Vec<u8> {
    let mut attrs = Vec::new();
    if let Some(i) = c.index {
        attrs.push(attr_u32(NBD_ATTR_INDEX, i));
    }
    attrs.push(attr_u64(NBD_ATTR_SIZE_BYTES, c.size));
    attrs.push(attr_u64(NBD_ATTR_BLOCK_SIZE_BYTES, c.block_size));
    attrs.push(attr_u64(NBD_ATTR_TIMEOUT, c.timeout_secs));
    if c.dead_conn_timeout_secs > 0 {
        attrs.push(attr_u64(NBD_ATTR_DEAD_CONN_TIMEOUT, c.dead_conn_timeout_secs));
    }
    attrs.push(attr_u64(NBD_ATTR_SERVER_FLAGS, c.server_flags));
    attrs.push(sockets(&c.fds));
    message(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, seq, &attrs)
}

/// Gives a connected device new sockets (after the engine restarted) and optionally a new size.
pub fn reconfigure(family: u16, seq: u32, index: u32, fds: &[u32], size: Option<u64>) -> Vec<u8> {
    let mut attrs = vec![attr_u32(NBD_ATTR_INDEX, index)];
    if let Some(s) = size {
        attrs.push(attr_u64(NBD_ATTR_SIZE_BYTES, s));
    }
    attrs.push(sockets(fds));
    message(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, seq, &attrs)
}

pub fn disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    message(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, seq, &[attr_u32(NBD_ATTR_INDEX, index)])
}

pub fn status(family: u16, seq: u32, index: Option<u32>) -> Vec<u8> {
    let attrs: Vec<Vec<u8>> = index.map(|i| attr_u32(NBD_ATTR_INDEX, i)).into_iter().collect();
    message(family, NBD_CMD_STATUS, NBD_GENL_VERSION, seq, &attrs)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("netlink message truncated")]
    Truncated,
    #[error("kernel answered error {0}")]
    Errno(i32),
    #[error("attribute {0} missing")]
    Missing(u16),
}

/// The attributes of a buffer: (type without flags, payload).
pub fn attrs(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, ParseError> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            return Err(ParseError::Truncated);
        }
        out.push((kind, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// The attributes of a genl reply (or the error a NLMSG_ERROR carries).
pub fn reply_attrs(b: &[u8]) -> Result<Vec<(u16, &[u8])>, ParseError> {
    if b.len() < NLMSG_HDRLEN {
        return Err(ParseError::Truncated);
    }
    let len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
    let kind = u16::from_ne_bytes([b[4], b[5]]);
    if len > b.len() {
        return Err(ParseError::Truncated);
    }
    if kind == NLMSG_ERROR {
        let err = i32::from_ne_bytes(b.get(16..20).ok_or(ParseError::Truncated)?.try_into().expect("4 bytes"));
        return if err == 0 { Ok(Vec::new()) } else { Err(ParseError::Errno(-err)) };
    }
    attrs(b.get(NLMSG_HDRLEN + GENL_HDRLEN..len).ok_or(ParseError::Truncated)?)
}

/// The family id in a CTRL_CMD_GETFAMILY reply.
pub fn family_id(reply: &[u8]) -> Result<u16, ParseError> {
    let a = reply_attrs(reply)?;
    let (_, v) = a.iter().find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID).ok_or(ParseError::Missing(CTRL_ATTR_FAMILY_ID))?;
    Ok(u16::from_ne_bytes(v.get(..2).ok_or(ParseError::Truncated)?.try_into().expect("2 bytes")))
}

/// The device index in a CONNECT reply.
pub fn connected_index(reply: &[u8]) -> Result<u32, ParseError> {
    let a = reply_attrs(reply)?;
    let (_, v) = a.iter().find(|(k, _)| *k == NBD_ATTR_INDEX).ok_or(ParseError::Missing(NBD_ATTR_INDEX))?;
    Ok(u32::from_ne_bytes(v.get(..4).ok_or(ParseError::Truncated)?.try_into().expect("4 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    #[test]
    fn connect_message_layout() {
        let m = connect(
            0x1c,
            7,
            &Connect {
                index: None,
                size: 1 << 30,
                block_size: 4096,
                timeout_secs: 30,
                dead_conn_timeout_secs: 120,
                server_flags: 0x1ed,
                fds: vec![5, 6],
            },
        );
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize, m.len(), "nlmsg_len covers everything");
        assert_eq!(u16_at(&m, 4), 0x1c, "family id");
        assert_eq!(u16_at(&m, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7, "sequence");
        assert_eq!(&m[16..20], &[NBD_CMD_CONNECT, NBD_GENL_VERSION, 0, 0]);
        let a = attrs(&m[20..]).unwrap();
        let kinds: Vec<u16> = a.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            kinds,
            vec![
                NBD_ATTR_SIZE_BYTES,
                NBD_ATTR_BLOCK_SIZE_BYTES,
                NBD_ATTR_TIMEOUT,
                NBD_ATTR_DEAD_CONN_TIMEOUT,
                NBD_ATTR_SERVER_FLAGS,
                NBD_ATTR_SOCKETS
            ]
        );
        assert_eq!(u64::from_ne_bytes(a[0].1.try_into().unwrap()), 1 << 30);
        assert_eq!(u64::from_ne_bytes(a[3].1.try_into().unwrap()), 120);
        // Sockets: two items, each with one fd.
        let items = attrs(a[5].1).unwrap();
        assert_eq!(items.len(), 2);
        let fds: Vec<u32> = items
            .iter()
            .map(|(_, p)| {
                let inner = attrs(p).unwrap();
                assert_eq!(inner[0].0, NBD_SOCK_FD);
                u32::from_ne_bytes(inner[0].1.try_into().unwrap())
            })
            .collect();
        assert_eq!(fds, vec![5, 6]);
        assert_ne!(u16_at(&m, 20 + 5 * 12 + 2) & NLA_F_NESTED, 0, "the sockets attribute is marked nested");
        assert!(m.len().is_multiple_of(4));
    }

    #[test]
    fn other_commands_and_replies() {
        let f = get_family(1);
        assert_eq!(u16_at(&f, 4), GENL_ID_CTRL);
        assert_eq!(f[16], CTRL_CMD_GETFAMILY);
        assert_eq!(attrs(&f[20..]).unwrap(), vec![(CTRL_ATTR_FAMILY_NAME, &b"nbd\0"[..])]);
        assert_eq!(attrs(&disconnect(0x1c, 2, 3)[20..]).unwrap(), vec![(NBD_ATTR_INDEX, &3u32.to_ne_bytes()[..])]);
        assert!(attrs(&status(0x1c, 2, None)[20..]).unwrap().is_empty());
        let r = reconfigure(0x1c, 3, 4, &[9], Some(2 << 30));
        assert_eq!(r[16], NBD_CMD_RECONFIGURE);
        assert_eq!(attrs(&r[20..]).unwrap().len(), 3);
        // A reply carrying the family id, as the kernel would send it.
        let reply = message(GENL_ID_CTRL, 1, 1, 1, &[attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0"), attr(CTRL_ATTR_FAMILY_ID, &0x1cu16.to_ne_bytes())]);
        assert_eq!(family_id(&reply), Ok(0x1c));
        let connected = message(0x1c, NBD_CMD_CONNECT, 1, 1, &[attr_u32(NBD_ATTR_INDEX, 2)]);
        assert_eq!(connected_index(&connected), Ok(2));
        // An error reply: NLMSG_ERROR with -ENOENT.
        let mut err = vec![0u8; 36];
        err[0..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[16..20].copy_from_slice(&(-2i32).to_ne_bytes());
        assert_eq!(family_id(&err), Err(ParseError::Errno(2)));
        assert_eq!(family_id(&err[..10]), Err(ParseError::Truncated));
        assert_eq!(attrs(&[8, 0, 1, 0, 0]), Err(ParseError::Truncated), "an attribute longer than the buffer");
    }
}
