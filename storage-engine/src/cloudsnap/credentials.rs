//! Object-store credentials (`stratactl credentials create`), kept in the metadata store
//! encrypted (AES-256-GCM) under a key derived from the cluster's secret
//! (`--credentials-key-file`, else the SDK's system key), so every engine can use them and the
//! store alone reveals nothing. The secret key and passphrase are never returned or logged.

use aes_gcm::aead::{Aead, KeyInit};
use sha2::{Digest, Sha256};

#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Credential {
    pub name: String,
    /// `http://host:port` or `https://...`.
    pub endpoint: String,
    pub bucket: String,
    #[serde(default)]
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// Path-style requests (`endpoint/bucket/key`), as most on-premises stores want.
    #[serde(default)]
    pub path_style: bool,
    /// Encrypts backups client-side (empty: they are only compressed and checksummed).
    #[serde(default)]
    pub passphrase: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("name", &self.name).field("endpoint", &self.endpoint).field("bucket", &self.bucket).finish_non_exhaustive()
    }
}

const PREFIX: &str = "credentials/";

/// The key that seals credentials, from the cluster's secret.
pub fn sealing_key(secret: &[u8]) -> [u8; 32] {
    Sha256::new().chain_update(b"strata-credentials-v1").chain_update(secret).finalize().into()
}

pub fn seal(key: &[u8; 32], c: &Credential) -> Result<Vec<u8>, String> {
    let mut nonce = [0u8; 12];
    getrandom::getrandom(&mut nonce).map_err(|e| e.to_string())?;
    let plain = serde_json::to_vec(c).expect("plain data");
    let ct =
        aes_gcm::Aes256Gcm::new(key.into()).encrypt((&nonce).into(), plain.as_slice()).map_err(|_| "sealing the credential failed".to_string())?;
    Ok([nonce.as_slice(), &ct].concat())
}

pub fn unseal(key: &[u8; 32], b: &[u8]) -> Result<Credential, String> {
    if b.len() < 12 {
        return Err("the stored credential is damaged".into());
    }
    let plain = aes_gcm::Aes256Gcm::new(key.into()).decrypt(b[..12].into(), &b[12..]).map_err(|_| {
        "the stored credential cannot be opened: this engine's --credentials-key-file differs from the one that stored it".to_string()
    })?;
    serde_json::from_slice(&plain).map_err(|e| format!("the stored credential is damaged: {e}"))
}

pub fn key_of(name: &str) -> String {
    format!("{PREFIX}{name}")
}

pub fn prefix() -> &'static str {
    PREFIX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_credentials_open_only_with_the_same_secret_and_hide_the_secret_key() {
        let c = Credential {
            name: "s3".into(),
            endpoint: "http://x".into(),
            bucket: "b".into(),
            region: String::new(),
            access_key: "AK".into(),
            secret_key: "very-secret".into(),
            path_style: true,
            passphrase: "pp".into(),
        };
        let k = sealing_key(b"cluster secret");
        let sealed = seal(&k, &c).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("very-secret"));
        assert_eq!(unseal(&k, &sealed).unwrap().secret_key, "very-secret");
        assert!(unseal(&sealing_key(b"other"), &sealed).unwrap_err().contains("--credentials-key-file"));
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
