//! Encryption at rest: AES-256-XTS per volume, one 4 KiB sector per XTS data unit (the tweak is
//! the sector's number in the volume). The target encrypts before a write leaves it (its own
//! replica and the other nodes get ciphertext alike) and decrypts after reads; resync, rebuild
//! and replica comparison move ciphertext and never need the key.
//!
//! The key is derived from the volume's passphrase (or key file) with PBKDF2-HMAC-SHA256 and a
//! random per-volume salt. The metadata store keeps only the salt, the iteration count and an
//! HMAC of a fixed string under the key — enough to tell a wrong passphrase, never the key.
//!
//! An all-zero sector reads as zeroes (never-written and trimmed ranges); a real ciphertext
//! sector that happens to be all zeroes has probability 2^-32768.

use aes::Aes256;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use xts_mode::Xts128;

pub const SECTOR: usize = 4096;
const ITERATIONS: u32 = 100_000;
const CHECK: &[u8] = b"strata volume key check v1";

/// What the metadata store keeps of a volume's key.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyParams {
    /// Hex.
    pub salt: String,
    pub iterations: u32,
    /// Hex HMAC-SHA256 of a fixed string under the derived key.
    pub check: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptError {
    #[error("the passphrase does not match this volume's key")]
    WrongKey,
    #[error("an encrypted volume needs a passphrase or key file of at least 8 bytes")]
    Weak,
    #[error("the volume's key parameters are corrupt")]
    Corrupt,
}

pub struct VolumeKey {
    xts: Xts128<Aes256>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

fn derive(passphrase: &[u8], salt: &[u8], iterations: u32) -> ([u8; 64], String) {
    let mut key = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha256>(passphrase, salt, iterations, &mut key);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("any key length");
    mac.update(CHECK);
    (key, hex(&mac.finalize().into_bytes()))
}

fn cipher(key: &[u8; 64]) -> VolumeKey {
    use aes::cipher::KeyInit;
    let k1 = Aes256::new_from_slice(&key[..32]).expect("32 bytes");
    let k2 = Aes256::new_from_slice(&key[32..]).expect("32 bytes");
    VolumeKey { xts: Xts128::new(k1, k2) }
}

impl VolumeKey {
    /// A new key for a new volume: returns what to store and the key.
    pub fn create(passphrase: &[u8]) -> Result<(KeyParams, VolumeKey), CryptError> {
        if passphrase.len() < 8 {
            return Err(CryptError::Weak);
        }
        let mut salt = [0u8; 16];
        getrandom::getrandom(&mut salt).map_err(|_| CryptError::Corrupt)?;
        let (key, check) = derive(passphrase, &salt, ITERATIONS);
        Ok((KeyParams { salt: hex(&salt), iterations: ITERATIONS, check }, cipher(&key)))
    }

    /// The key of an existing volume, if `passphrase` is the right one.
    pub fn open(passphrase: &[u8], p: &KeyParams) -> Result<VolumeKey, CryptError> {
        let salt = unhex(&p.salt).ok_or(CryptError::Corrupt)?;
        let (key, check) = derive(passphrase, &salt, p.iterations);
        // Constant-time enough: both are HMAC outputs of the same length.
        if check.len() != p.check.len() || check.bytes().zip(p.check.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
            return Err(CryptError::WrongKey);
        }
        Ok(cipher(&key))
    }

    /// Encrypts whole sectors in place; `buf` starts at sector `first`.
    pub fn encrypt(&self, first: u64, buf: &mut [u8]) {
        debug_assert!(buf.len().is_multiple_of(SECTOR));
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            self.xts.encrypt_sector(s, tweak(first + i as u64));
        }
    }

    /// Decrypts whole sectors in place; all-zero sectors stay zero.
    pub fn decrypt(&self, first: u64, buf: &mut [u8]) {
        debug_assert!(buf.len().is_multiple_of(SECTOR));
        for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
            if s.iter().all(|b| *b == 0) {
                continue;
            }
            self.xts.decrypt_sector(s, tweak(first + i as u64));
        }
    }
}

fn tweak(sector: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&sector.to_le_bytes());
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_wrong_key_and_zero_sectors() {
        let (params, key) = VolumeKey::create(b"correct horse").unwrap();
        let plain: Vec<u8> = (0..2 * SECTOR).map(|i| (i % 251) as u8).collect();
        let mut buf = plain.clone();
        key.encrypt(7, &mut buf);
        assert_ne!(buf, plain);
        assert_ne!(buf[..SECTOR], buf[SECTOR..], "sectors differ by tweak");
        let again = VolumeKey::open(b"correct horse", &params).unwrap();
        again.decrypt(7, &mut buf);
        assert_eq!(buf, plain);
        let mut shifted = plain.clone();
        key.encrypt(8, &mut shifted);
        again.decrypt(7, &mut shifted);
        assert_ne!(shifted, plain, "the sector number is part of the key stream");
        assert_eq!(VolumeKey::open(b"wrong horse", &params).err(), Some(CryptError::WrongKey));
        assert_eq!(VolumeKey::create(b"short").err(), Some(CryptError::Weak));
        let mut zeros = vec![0u8; SECTOR];
        key.decrypt(3, &mut zeros);
        assert!(zeros.iter().all(|b| *b == 0), "unwritten sectors read as zeroes");
        assert!(!params.check.contains("correct"), "the store never sees the passphrase");
    }
}
