//! Small helpers shared by the tests.

use std::process::Command;

/// Runs `qemu-io -f raw` with each of `cmds` (`-c`) on `uri`; panics when one fails or a
/// pattern does not verify. Returns the output.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = run(c.arg(uri));
    assert!(!out.contains("fail") && !out.contains("verification"), "{cmds:?}: {out}");
    out
}

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("strata-test-").tempdir_in(std::env::var("STRATA_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap()
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no rand crate.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The body and headers of GET /metrics at `addr` (an engine's --metrics-listen).
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}
