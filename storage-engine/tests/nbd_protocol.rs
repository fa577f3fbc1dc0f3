//! NBD protocol edges with our own client: option replies, garbage, truncation, range errors,
//! pipelining with out-of-order completion, several clients at once.

mod common;

use common::nbd::*;
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

const MIB: u64 = 1 << 20;
const ERR_UNSUP: u32 = (1 << 31) + 1;
const ERR_INVALID: u32 = (1 << 31) + 3;
const ERR_UNKNOWN: u32 = (1 << 31) + 6;

fn engine() -> (tempfile::TempDir, EngineProc) {
    let dir = tempdir();
    let e = EngineProc::start(dir.path(), 1, "256MiB");
    e.sdk().create("vol", 64 * MIB).unwrap();
    e.sdk().create("second", 8 * MIB).unwrap();
    (dir, e)
}

#[test]
fn options_are_answered_per_the_protocol() {
    let (_d, e) = engine();
    let mut s = greet(&e.nbd);
    // Structured replies, starttls, meta contexts and unknown options: unsupported, never a hangup.
    for opt in [8u32, 5, 9, 10, 11, 0x1234_5678] {
        send_option(&mut s, opt, b"");
        let (o, ty, msg) = read_option_reply(&mut s);
        assert_eq!((o, ty), (opt, ERR_UNSUP), "option {opt}");
        assert!(!msg.is_empty(), "an error reply carries a message");
    }
    // LIST with data is invalid; without it lists every volume then acks.
    send_option(&mut s, 3, b"x");
    assert_eq!(read_option_reply(&mut s).1, ERR_INVALID);
    send_option(&mut s, 3, b"");
    let mut names = Vec::new();
    loop {
        let (_, ty, d) = read_option_reply(&mut s);
        if ty == 1 {
            break;
        }
        assert_eq!(ty, 2);
        let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(d[4..4 + n].to_vec()).unwrap());
    }
    assert_eq!(names, vec!["second".to_string(), "vol".to_string()]);
    // INFO on an unknown export, then a malformed INFO, then a good INFO with name and block size.
    send_option(&mut s, 6, &go_payload("nope"));
    assert_eq!(read_option_reply(&mut s).1, ERR_UNKNOWN);
    send_option(&mut s, 6, &[0, 0, 0, 9, b'a']);
    assert_eq!(read_option_reply(&mut s).1, ERR_INVALID);
    let mut p = 3u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"vol");
    p.extend_from_slice(&2u16.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&3u16.to_be_bytes());
    send_option(&mut s, 6, &p);
    let mut seen = Vec::new();
    loop {
        let (_, ty, d) = read_option_reply(&mut s);
        if ty == 1 {
            break;
        }
        assert_eq!(ty, 3);
        let info = u16::from_be_bytes([d[0], d[1]]);
        match info {
            0 => assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 64 * MIB),
            1 => assert_eq!(&d[2..], b"vol"),
            3 => assert_eq!(u32::from_be_bytes(d[10..14].try_into().unwrap()), 32 << 20),
            _ => {}
        }
        seen.push(info);
    }
    assert_eq!(seen, vec![0, 1, 3]);
    // ABORT is acked.
    send_option(&mut s, 2, b"");
    assert_eq!(read_option_reply(&mut s).1, 1);
}

#[test]
fn export_name_option_enters_transmission() {
    let (_d, e) = engine();
    let mut s = greet(&e.nbd);
    send_option(&mut s, 1, b"vol");
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), 64 * MIB);
    let mut c = Client { s, size: 64 * MIB, flags: u16::from_be_bytes([r[8], r[9]]) };
    assert_eq!(c.write(4096, &[3u8; 4096], FLAG_FUA), 0);
    assert_eq!(c.read(4096, 4096).unwrap(), vec![3u8; 4096]);
    // Unknown export with EXPORT_NAME: the server can only hang up.
    let mut s = greet(&e.nbd);
    send_option(&mut s, 1, b"nope");
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
}

#[test]
fn out_of_range_and_unknown_commands_get_error_replies() {
    let (_d, e) = engine();
    let mut c = Client::connect(&e.nbd, "vol").unwrap();
    assert_eq!(c.read(64 * MIB - 4096, 8192), Err(libc::EINVAL as u32));
    assert_eq!(c.read(u64::MAX - 10, 4096), Err(libc::EINVAL as u32));
    assert_eq!(c.write(64 * MIB, &[0u8; 512], 0), libc::ENOSPC as u32);
    c.send(TRIM, 0, 9, 64 * MIB - 4096, 8192, &[]);
    assert_eq!(c.reply().unwrap(), (libc::ENOSPC as u32, 9));
    c.send(7, 0, 10, 0, 4096, &[]); // BLOCK_STATUS without negotiation
    assert_eq!(c.reply().unwrap(), (libc::EINVAL as u32, 10));
    c.send(READ, 0, 11, 0, 64 << 20, &[]); // over the advertised maximum
    assert_eq!(c.reply().unwrap(), (libc::EINVAL as u32, 11));
    // The connection is still fine.
    assert_eq!(c.write(0, &[5u8; 4096], 0), 0);
    assert_eq!(c.read(0, 4096).unwrap(), vec![5u8; 4096]);
}

#[test]
fn garbage_and_truncated_frames_close_only_that_connection() {
    let (_d, e) = engine();
    let mut good = Client::connect(&e.nbd, "vol").unwrap();
    assert_eq!(good.write(0, &[1u8; 4096], 0), 0);
    // Garbage instead of client flags / options.
    for junk in [&b"GET / HTTP/1.1\r\n\r\n"[..], &[0xffu8; 64][..], &[0u8; 3][..]] {
        let mut s = std::net::TcpStream::connect(&e.nbd).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        let _ = s.write_all(junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // An option with a huge length: closed without reading it.
    let mut s = greet(&e.nbd);
    let mut h = b"IHAVEOPT".to_vec();
    h.extend_from_slice(&7u32.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&h).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    // Transmission: bad magic, then a truncated header, then a truncated write payload.
    let mut bad = Client::connect(&e.nbd, "vol").unwrap();
    bad.s.write_all(&[0xde; 28]).unwrap();
    assert!(matches!(bad.s.read(&mut b), Ok(0) | Err(_)));
    let mut cut = Client::connect(&e.nbd, "vol").unwrap();
    cut.s.write_all(&[0x25, 0x60, 0x95]).unwrap();
    let _ = cut.s.shutdown(std::net::Shutdown::Write);
    assert!(matches!(cut.s.read(&mut b), Ok(0) | Err(_)));
    let mut short = Client::connect(&e.nbd, "vol").unwrap();
    let mut req = Vec::new();
    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&WRITE.to_be_bytes());
    req.extend_from_slice(&1u64.to_be_bytes());
    req.extend_from_slice(&8192u64.to_be_bytes());
    req.extend_from_slice(&4096u32.to_be_bytes());
    req.extend_from_slice(&[9u8; 100]);
    short.s.write_all(&req).unwrap();
    let _ = short.s.shutdown(std::net::Shutdown::Write);
    assert!(matches!(short.s.read(&mut b), Ok(0) | Err(_)));
    // The first client and the engine are unharmed; the truncated write never landed.
    assert_eq!(good.read(0, 4096).unwrap(), vec![1u8; 4096]);
    assert_eq!(good.read(8192, 4096).unwrap(), vec![0u8; 4096]);
    assert_eq!(e.sdk().list().len(), 2);
}

#[test]
fn pipelined_requests_complete_out_of_order_matched_by_handle() {
    let (_d, e) = engine();
    let mut c = Client::connect(&e.nbd, "vol").unwrap();
    // Allocate the small writes' extent up front, so only the big write pays for allocations.
    assert_eq!(c.write(0, &[0u8; 4096], 0), 0);
    // 200 requests in flight: a large FUA write first, then small writes to distinct blocks.
    c.send(WRITE, FLAG_FUA, 1000, 32 * MIB, 8 << 20, &vec![0xee; 8 << 20]);
    for i in 0..199u64 {
        c.send(WRITE, 0, i, i * 4096, 4096, &vec![i as u8; 4096]);
    }
    let mut order = Vec::new();
    for _ in 0..200 {
        let (err, h) = c.reply().unwrap();
        assert_eq!(err, 0);
        order.push(h);
    }
    let mut sorted = order.clone();
    sorted.sort();
    let mut expect: Vec<u64> = (0..199).collect();
    expect.push(1000);
    assert_eq!(sorted, expect, "every handle answered exactly once");
    assert_ne!(order[0], 1000, "the slow FUA write did not hold back the small ones");
    // Pipelined reads return the right data for each handle.
    for i in 0..50u64 {
        c.send(READ, 0, i, i * 4096, 4096, &[]);
    }
    for _ in 0..50 {
        let (err, h) = c.reply().unwrap();
        assert_eq!(err, 0);
        assert_eq!(c.read_payload(4096), vec![h as u8; 4096]);
    }
    assert_eq!(c.flush(), 0);
}

#[test]
fn several_clients_at_once_on_tcp_and_unix() {
    let (_d, e) = engine();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let addr = e.nbd.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&addr, "vol").unwrap();
                for i in 0..64u64 {
                    let off = (t as u64 * 64 + i) * 4096;
                    assert_eq!(c.write(off, &[t + 1; 4096], 0), 0);
                }
                for i in 0..64u64 {
                    let off = (t as u64 * 64 + i) * 4096;
                    assert_eq!(c.read(off, 4096).unwrap(), vec![t + 1; 4096]);
                }
                c.disconnect();
            })
        })
        .collect();
    let out = run(std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x42 16M 1M", "-c", "read -P 0x42 16M 1M"])
        .arg(e.unix_uri("vol")));
    assert!(!out.contains("verification failed"));
    for t in threads {
        t.join().unwrap();
    }
    let t0 = std::time::Instant::now();
    while e.sdk().inspect("vol").unwrap().connections != 0 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "disconnected clients are released");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A client that connects and never finishes the handshake is disconnected after
/// `--nbd-handshake-timeout`, and the engine goes on serving.
#[test]
fn an_idle_handshake_is_cut_off() {
    let dir = tempdir();
    let e = EngineProc::start_with(dir.path(), 1, "256MiB", &["--nbd-handshake-timeout", "1"]);
    e.sdk().create("v", 16 << 20).unwrap();
    let mut s = std::net::TcpStream::connect(&e.nbd).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let mut total = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(err) => panic!("the engine did not close an idle handshake: {err}"),
        }
    }
    assert_eq!(total, 18, "the greeting, then EOF");
    assert!(t0.elapsed() < Duration::from_secs(5), "closed after about 1 s ({:?})", t0.elapsed());
    let _ = s.write_all(b"late");
    let mut c = common::nbd::Client::connect(&e.nbd, "v").unwrap();
    assert_eq!(c.write(0, &[1u8; 4096], 0), 0);
}

/// Writes that are running when their client's connection breaks still run to their end: one
/// whose reply can no longer be sent is not abandoned half-way.
#[test]
fn a_write_running_when_its_connection_breaks_still_lands() {
    let dir = tempdir();
    let mut e = EngineProc::new(dir.path(), 1, "256MiB", &[]);
    // Of two writes, the first to reach the volume's local leg waits 1.5 s and the other 0.8 s:
    // when the second one's reply is written the connection is gone, and the first is still
    // running. The reset comes at 0.3 s, once the engine has long read both.
    e.env = vec![("FAILPOINTS".into(), "target.local_leg=1*return(delay:1500)->1*return(delay:800)".into())];
    e.spawn().expect("engine starts with the failpoint");
    e.sdk().create("v", 16 * MIB).unwrap();
    let writes = [(1u64, 0u64, 0xb1u8), (2, MIB, 0xb2)];
    let mut c = Client::connect(&e.nbd, "v").unwrap();
    // Both requests leave at once (no Nagle wait for the first one's ACK), so both are read
    // before the reset.
    c.s.set_nodelay(true).unwrap();
    for (handle, offset, byte) in writes {
        c.send(WRITE, 0, handle, offset, 4096, &[byte; 4096]);
    }
    std::thread::sleep(Duration::from_millis(300));
    // A reset, not a close: the engine's next write to the socket fails.
    socket2::SockRef::from(&c.s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(c);
    let mut check = Client::connect(&e.nbd, "v").unwrap();
    let t0 = std::time::Instant::now();
    for (_, offset, byte) in writes {
        while check.read(offset, 4096).unwrap() != vec![byte; 4096] {
            assert!(t0.elapsed() < Duration::from_secs(10), "the write at {offset} never landed");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
