//! A backup repository in an S3 bucket (through the `object_store` crate): its layout, the
//! backup key, and the chunk codec (zstd, then AES-256-GCM when the repository is encrypted;
//! every chunk is named by the SHA-256 of its plaintext, which a restore checks).
//!
//! Layout under `strata-backups/`: `repository.json` (the key's salt and check value),
//! `volumes/<volume>/<backup id>.json` (one manifest per backup, listing every extent of the
//! volume, so any backup restores alone), `chunks/<sha256>`.

use super::credentials::Credential;
use aes_gcm::aead::{Aead, KeyInit};
use object_store::{path::Path, ObjectStore, PutPayload};
use sha2::{Digest, Sha256};
use std::sync::Arc;

const ROOT: &str = "strata-backups";
/// PBKDF2 rounds deriving the backup key from the credential's passphrase.
const KDF_ROUNDS: u32 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Key(String),
}

/// What a failed object-store call means to the user.
fn explain(cred: &Credential, what: &str, e: object_store::Error) -> RepoError {
    let text = e.to_string();
    let why = if text.contains("NoSuchBucket") || (matches!(e, object_store::Error::NotFound { .. }) && what == "checking the bucket") {
        format!("bucket {:?} does not exist at {}: create it first", cred.bucket, cred.endpoint)
    } else if text.contains("403") || text.contains("InvalidAccessKeyId") || text.contains("SignatureDoesNotMatch") || text.contains("AccessDenied") {
        format!("the object store at {} refused the credentials of {:?} (access key {}): {text}", cred.endpoint, cred.name, cred.access_key)
    } else {
        format!("object store at {}: {what}: {text}", cred.endpoint)
    };
    RepoError::Store(why)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RepoHeader {
    version: u32,
    /// Hex salt of the key derivation; empty: chunks are not encrypted.
    salt: String,
    /// Hex SHA-256 of the key with a fixed prefix: tells a wrong passphrase apart.
    check: String,
}

pub struct Repo {
    pub cred: Credential,
    store: Arc<dyn ObjectStore>,
    key: Option<[u8; 32]>,
}

fn check_of(key: &[u8; 32]) -> String {
    hex(&Sha256::new().chain_update(b"strata-backup-key-check").chain_update(key).finalize())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

impl Repo {
    /// Opens the repository in the credential's bucket, creating its header at first use, and
    /// derives the backup key (a wrong passphrase is refused here).
    pub async fn open(cred: &Credential) -> Result<Repo, RepoError> {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&cred.endpoint)
            .with_bucket_name(&cred.bucket)
            .with_region(if cred.region.is_empty() { "us-east-1" } else { &cred.region })
            .with_access_key_id(&cred.access_key)
            .with_secret_access_key(&cred.secret_key)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(!cred.path_style)
            .build()
            .map_err(|e| RepoError::Store(format!("credential {:?}: {e}", cred.name)))?;
        let mut repo = Repo { cred: cred.clone(), store: Arc::new(store), key: None };
        // A listing fails on a missing bucket (some stores would create one on the first put).
        {
            use futures::StreamExt;
            let root = Path::from(ROOT);
            if let Some(Err(e)) = repo.store.list(Some(&root)).next().await {
                return Err(explain(cred, "checking the bucket", e));
            }
        }
        let header = Path::from(format!("{ROOT}/repository.json"));
        let h: RepoHeader = match repo.store.get(&header).await {
            Ok(r) => {
                let b = r.bytes().await.map_err(|e| explain(cred, "reading the repository header", e))?;
                serde_json::from_slice(&b).map_err(|e| RepoError::Corrupt(format!("{header}: {e}")))?
            }
            Err(object_store::Error::NotFound { source, .. }) if source.to_string().contains("NoSuchBucket") => {
                return Err(RepoError::Store(format!("bucket {:?} does not exist at {}: create it first", cred.bucket, cred.endpoint)));
            }
            Err(object_store::Error::NotFound { .. }) => {
                let h = if cred.passphrase.is_empty() {
                    RepoHeader { version: 1, salt: String::new(), check: String::new() }
                } else {
                    let mut salt = [0u8; 16];
                    getrandom::getrandom(&mut salt).map_err(|e| RepoError::Key(e.to_string()))?;
                    let key = derive(&cred.passphrase, &salt);
                    RepoHeader { version: 1, salt: hex(&salt), check: check_of(&key) }
                };
                let body = serde_json::to_vec(&h).expect("plain data");
                repo.store.put(&header, PutPayload::from(body)).await.map_err(|e| explain(cred, "checking the bucket", e))?;
                h
            }
            Err(e) => return Err(explain(cred, "checking the bucket", e)),
        };
        match (h.salt.is_empty(), cred.passphrase.is_empty()) {
            (true, true) => {}
            (true, false) => return Err(RepoError::Key(format!("the backups in bucket {:?} are not encrypted, but credential {:?} has a passphrase: use a credential without one (or another bucket)", cred.bucket, cred.name))),
            (false, true) => return Err(RepoError::Key(format!("the backups in bucket {:?} are encrypted: credential {:?} needs their passphrase", cred.bucket, cred.name))),
            (false, false) => {
                let salt = unhex(&h.salt).ok_or_else(|| RepoError::Corrupt("repository.json: bad salt".into()))?;
                let key = derive(&cred.passphrase, &salt);
                if check_of(&key) != h.check {
                    return Err(RepoError::Key(format!("the passphrase of credential {:?} does not open the backups in bucket {:?}", cred.name, cred.bucket)));
                }
                repo.key = Some(key);
            }
        }
        Ok(repo)
    }

    pub fn manifest_path(volume: &str, id: &str) -> Path {
        Path::from(format!("{ROOT}/volumes/{volume}/{id}.json"))
    }

    fn chunk_path(hash: &str) -> Path {
        Path::from(format!("{ROOT}/chunks/{hash}"))
    }

    pub async fn put_json(&self, path: &Path, v: &impl serde::Serialize) -> Result<(), RepoError> {
        let body = serde_json::to_vec_pretty(v).expect("plain data");
        self.store.put(path, PutPayload::from(body)).await.map_err(|e| explain(&self.cred, "writing a manifest", e))?;
        Ok(())
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, RepoError> {
        match self.store.get(path).await {
            Ok(r) => {
                let b = r.bytes().await.map_err(|e| explain(&self.cred, "reading a manifest", e))?;
                Ok(Some(serde_json::from_slice(&b).map_err(|e| RepoError::Corrupt(format!("{path}: {e}")))?))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(explain(&self.cred, "reading a manifest", e)),
        }
    }

    pub async fn delete(&self, path: &Path) -> Result<(), RepoError> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(explain(&self.cred, "deleting", e)),
        }
    }

    /// Every object under `prefix` (relative to the repository root).
    pub async fn list(&self, prefix: &str) -> Result<Vec<Path>, RepoError> {
        use futures::TryStreamExt;
        let p = Path::from(format!("{ROOT}/{prefix}"));
        let metas: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&p)).try_collect().await.map_err(|e| explain(&self.cred, "listing backups", e))?;
        Ok(metas.into_iter().map(|m| m.location).collect())
    }

    /// The manifests of every backup (of `volume` when given).
    pub async fn manifests(&self, volume: Option<&str>) -> Result<Vec<Path>, RepoError> {
        let prefix = match volume {
            Some(v) => format!("volumes/{v}/"),
            None => "volumes/".into(),
        };
        Ok(self.list(&prefix).await?.into_iter().filter(|p| p.as_ref().ends_with(".json")).collect())
    }

    /// Stores one chunk unless the repository has it; the bytes stored (0 when it was there).
    pub async fn put_chunk(&self, hash: &str, plain: &[u8]) -> Result<u64, RepoError> {
        let path = Self::chunk_path(hash);
        match self.store.head(&path).await {
            Ok(_) => return Ok(0),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(explain(&self.cred, "looking for a chunk", e)),
        }
        let packed = zstd::bulk::compress(plain, 3).map_err(|e| RepoError::Store(format!("compressing a chunk: {e}")))?;
        let body = match &self.key {
            None => packed,
            Some(k) => {
                let mut nonce = [0u8; 12];
                getrandom::getrandom(&mut nonce).map_err(|e| RepoError::Key(e.to_string()))?;
                let cipher = aes_gcm::Aes256Gcm::new(k.into());
                let ct = cipher.encrypt((&nonce).into(), packed.as_slice()).map_err(|_| RepoError::Key("encrypting a chunk failed".into()))?;
                [nonce.as_slice(), &ct].concat()
            }
        };
        let n = body.len() as u64;
        self.store.put(&path, PutPayload::from(body)).await.map_err(|e| explain(&self.cred, "uploading a chunk", e))?;
        Ok(n)
    }

    /// A chunk's plaintext, checked against its name.
    pub async fn get_chunk(&self, hash: &str, max: usize) -> Result<Vec<u8>, RepoError> {
        let path = Self::chunk_path(hash);
        let body = match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| explain(&self.cred, "downloading a chunk", e))?,
            Err(object_store::Error::NotFound { .. }) => return Err(RepoError::Corrupt(format!("chunk {hash} is missing from the bucket"))),
            Err(e) => return Err(explain(&self.cred, "downloading a chunk", e)),
        };
        let corrupt = |why: &str| RepoError::Corrupt(format!("chunk {hash} is corrupted ({why})"));
        let packed = match &self.key {
            None => body.to_vec(),
            Some(k) => {
                if body.len() < 12 {
                    return Err(corrupt("too short"));
                }
                let cipher = aes_gcm::Aes256Gcm::new(k.into());
                cipher.decrypt(body[..12].into(), &body[12..]).map_err(|_| corrupt("authentication failed"))?
            }
        };
        let plain = zstd::bulk::decompress(&packed, max).map_err(|_| corrupt("not valid zstd"))?;
        if hex(&Sha256::digest(&plain)) != hash {
            return Err(corrupt("checksum mismatch"));
        }
        Ok(plain)
    }

    /// Removes every chunk no manifest names; how many went.
    pub async fn collect_garbage(&self, referenced: &std::collections::HashSet<String>) -> Result<u64, RepoError> {
        let mut n = 0;
        for p in self.list("chunks/").await? {
            let hash = p.filename().unwrap_or_default().to_string();
            if !referenced.contains(&hash) {
                self.delete(&p).await?;
                n += 1;
            }
        }
        Ok(n)
    }
}

fn derive(passphrase: &str, salt: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(passphrase.as_bytes(), salt, KDF_ROUNDS, &mut key);
    key
}

/// The SHA-256 of `data`, in hex (a chunk's name).
pub fn chunk_hash(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}
