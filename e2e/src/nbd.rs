//! A minimal blocking NBD client (fixed newstyle, OPT_GO, simple replies) for tests.

use std::io::{Read, Write};
use std::net::TcpStream;

pub const READ: u16 = 0;
pub const WRITE: u16 = 1;
pub const DISC: u16 = 2;
pub const FLUSH: u16 = 3;
pub const TRIM: u16 = 4;
pub const WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;

pub struct Client {
    pub s: TcpStream,
    pub size: u64,
    pub flags: u16,
}

pub fn greet(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[0..16], b"NBDMAGICIHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle + no zeroes
    s
}

pub fn send_option(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Reads one option reply: (option, reply type, data).
pub fn read_option_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), 0x0003_e889_0455_65a9);
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    (opt, ty, d)
}

pub fn go_payload(name: &str) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p
}

impl Client {
    /// Connects and enters transmission on `export`; Err(reply type) if the server refuses.
    pub fn connect(addr: &str, export: &str) -> Result<Client, u32> {
        let mut s = greet(addr);
        send_option(&mut s, 7, &go_payload(export));
        let (mut size, mut flags) = (0, 0);
        loop {
            let (_, ty, d) = read_option_reply(&mut s);
            match ty {
                1 => return Ok(Client { s, size, flags }),
                3 if u16::from_be_bytes([d[0], d[1]]) == 0 => {
                    size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes([d[10], d[11]]);
                }
                3 => {}
                err => return Err(err),
            }
        }
    }

    pub fn send(&mut self, cmd: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        self.try_send(cmd, flags, handle, offset, len, data).unwrap()
    }

    /// Like `send`, for callers that expect the server to go away.
    pub fn try_send(&mut self, cmd: u16, flags: u16, handle: u64, offset: u64, len: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    /// Reads one simple reply header: (error, handle).
    pub fn reply(&mut self) -> std::io::Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), 0x6744_6698, "simple reply magic");
        Ok((u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap())))
    }

    pub fn read_payload(&mut self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).unwrap();
        d
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> u32 {
        self.send(WRITE, flags, 1, offset, data.len() as u32, data);
        self.reply().unwrap().0
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(READ, 0, 2, offset, len, &[]);
        let (err, _) = self.reply().unwrap();
        if err != 0 {
            return Err(err);
        }
        Ok(self.read_payload(len as usize))
    }

    pub fn flush(&mut self) -> u32 {
        self.send(FLUSH, 0, 3, 0, 0, &[]);
        self.reply().unwrap().0
    }

    pub fn disconnect(mut self) {
        self.send(DISC, 0, 4, 0, 0, &[]);
    }
}
