//! Encryption at rest: what a client writes reads back, the device holds only ciphertext, and the
//! key comes only from the right passphrase.

mod common;

use common::nbd::{Client, FLAG_FUA, TRIM};
use common::*;
use tonic::Code;

const MIB: u64 = 1 << 20;

fn pattern(marker: &[u8], len: usize) -> Vec<u8> {
    marker.iter().cycle().take(len).copied().collect()
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

#[test]
fn an_encrypted_volume_stores_only_ciphertext_and_needs_its_passphrase() {
    let dir = tempdir();
    let mut e = EngineProc::start(dir.path(), 1, "128MiB");
    let sdk = e.sdk();
    assert_eq!(sdk.create_secure("weak", MIB, 1, b"short").unwrap_err().code(), Code::InvalidArgument);
    let v = sdk.create_secure("sec", 16 * MIB, 1, b"correct horse battery").unwrap();
    assert!(v.spec.unwrap().secure);
    sdk.create("plain", 16 * MIB).unwrap();
    let secret = b"SECRET-MARKER-the-volume-must-hide-this";
    let visible = b"PLAIN-MARKER-a-plain-volume-shows-this";
    let data = pattern(secret, 256 * 1024);
    let mut c = Client::connect(&e.nbd, "sec").unwrap();
    assert_eq!(c.write(0, &data, FLAG_FUA), 0);
    // An unaligned write is a read-modify-write of its sectors.
    assert_eq!(c.write(100_001, b"hello-unaligned", FLAG_FUA), 0);
    let mut want = data.clone();
    want[100_001..100_016].copy_from_slice(b"hello-unaligned");
    assert_eq!(c.read(0, want.len() as u32).unwrap(), want);
    assert_eq!(c.read(100_001, 15).unwrap(), b"hello-unaligned");
    // Never-written and trimmed ranges read as zeroes.
    assert_eq!(c.read(8 * MIB, 4096).unwrap(), vec![0; 4096]);
    c.send(TRIM, 0, 9, 0, 4096, &[]);
    assert_eq!(c.reply().unwrap().0, 0);
    assert_eq!(c.read(0, 4096).unwrap(), vec![0; 4096]);
    let mut p = Client::connect(&e.nbd, "plain").unwrap();
    assert_eq!(p.write(0, &pattern(visible, 256 * 1024), FLAG_FUA), 0);
    assert_eq!(c.flush(), 0);
    let dev = std::fs::read(&e.devices[0]).unwrap();
    assert!(count(&dev, visible) > 1000, "the scan sees plaintext where there is some");
    assert_eq!(count(&dev, secret), 0, "the encrypted volume's plaintext is on the device");
    assert_eq!(count(&dev, b"hello-unaligned"), 0);
    drop((c, p));

    // After a restart the key is gone until the passphrase comes back.
    e.restart();
    let sdk = e.sdk();
    assert!(Client::connect(&e.nbd, "sec").is_err(), "no key, no export");
    let err = sdk.attach("sec", false).unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("passphrase"), "{}", err.message());
    let err = sdk.attach_with("sec", false, b"wrong horse battery").unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("does not match"), "{}", err.message());
    sdk.attach_with("sec", false, b"correct horse battery").unwrap();
    let mut c = Client::connect(&e.nbd, "sec").unwrap();
    let mut after = want.clone();
    after[..4096].fill(0);
    assert_eq!(c.read(0, after.len() as u32).unwrap(), after);
}
