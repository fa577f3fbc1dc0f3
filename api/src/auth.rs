//! SDK authorization tokens: JSON Web Tokens with a subject, roles and groups, checked by the
//! engine on every SDK call and minted by `stratactl auth token` (or by the engines themselves,
//! with the cluster's system key, for calls between nodes).
//!
//! A token is trusted when its `iss` names a configured issuer and its signature verifies with
//! that issuer's key: a shared secret (HS256) or a public key in PEM (RS256 for RSA, ES256 for
//! P-256). `aud` must contain the configured audience; `exp` is required; `nbf` is checked when
//! present; both with the configured clock skew.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The issuer of the tokens engines mint for themselves with the system key.
pub const SYSTEM_ISSUER: &str = "strata-system";
/// The audience tokens carry unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "strata";
/// The gRPC metadata key the token travels in (`authorization: Bearer <token>`).
pub const HEADER: &str = "authorization";

/// What a token lets its holder do. Portworx's names (`system.admin`, ...) are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads volume records and cluster state; changes nothing.
    View,
    /// Creates volumes (owned by the subject) and uses the volumes it owns or collaborates on.
    User,
    /// Everything, on every volume.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim().strip_prefix("system.").unwrap_or(s.trim()) {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            "view" => Some(Role::View),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::View => "view",
        }
    }
}

/// A token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The caller's identity: a volume's owner and collaborators are subjects.
    pub sub: String,
    pub iss: String,
    /// One audience or several.
    pub aud: Audience,
    /// Expiry (unix seconds); required.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub iat: u64,
    /// Role names; unknown names are ignored.
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Claims {
    /// Claims for `sub` with `roles`, valid from now for `ttl`.
    pub fn new(sub: &str, iss: &str, aud: &str, roles: &[Role], groups: &[String], ttl: Duration) -> Claims {
        let now = unix_now();
        Claims {
            sub: sub.into(),
            iss: iss.into(),
            aud: Audience::One(aud.into()),
            exp: now + ttl.as_secs().max(1),
            nbf: None,
            iat: now,
            roles: roles.iter().map(|r| r.as_str().to_string()).collect(),
            groups: groups.to_vec(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Who made a call, once its token verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    pub issuer: String,
    /// The highest role the token grants (none: the token names no known role).
    pub role: Option<Role>,
    pub groups: Vec<String>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Some(Role::Admin)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no token: pass a bearer token (stratactl --token, STRATA_TOKEN or a context; the CSI secret's auth-token)")]
    Missing,
    #[error("the token is not a JSON Web Token: {0}")]
    Malformed(String),
    #[error("the token's issuer {0:?} is not trusted by this cluster")]
    UnknownIssuer(String),
    #[error("the token's signature does not verify with issuer {0:?}'s key")]
    BadSignature(String),
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet (nbf in the future)")]
    NotYetValid,
    #[error("the token is not for this cluster: its audience does not include {0:?}")]
    WrongAudience(String),
    #[error("the token was refused: {0}")]
    Invalid(String),
}

/// The key of one issuer.
#[derive(Clone)]
pub enum IssuerKey {
    /// HS256 with this secret.
    Secret(Vec<u8>),
    /// RS256 or ES256 with this public key (PEM).
    Public(Vec<u8>),
}

impl IssuerKey {
    /// A key from a file's content: a PEM public key, else the bytes (trailing newline
    /// trimmed) as a shared secret, which must be at least 32 bytes.
    pub fn from_file_content(content: &[u8]) -> Result<IssuerKey, String> {
        if is_pem(content) {
            let key = IssuerKey::Public(content.to_vec());
            key.decoding().map(|_| key)
        } else {
            shared_secret(content).map(|s| IssuerKey::Secret(s.to_vec()))
        }
    }

    fn decoding(&self) -> Result<Vec<(Algorithm, DecodingKey)>, String> {
        match self {
            IssuerKey::Secret(s) => Ok(vec![(Algorithm::HS256, DecodingKey::from_secret(s))]),
            IssuerKey::Public(pem) => {
                if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                    return Ok(vec![(Algorithm::RS256, k)]);
                }
                DecodingKey::from_ec_pem(pem)
                    .map(|k| vec![(Algorithm::ES256, k)])
                    .map_err(|e| format!("not an RSA or EC (P-256) public key in PEM: {e}"))
            }
        }
    }
}

/// The issuers a cluster trusts, its audience and the clock skew it allows.
#[derive(Clone)]
pub struct Verifier {
    issuers: Vec<(String, Vec<(Algorithm, DecodingKey)>)>,
    pub audience: String,
    pub skew: Duration,
}

impl Verifier {
    pub fn new(audience: &str, skew: Duration) -> Verifier {
        Verifier { issuers: Vec::new(), audience: audience.into(), skew }
    }

    pub fn trust(&mut self, issuer: &str, key: &IssuerKey) -> Result<(), String> {
        let keys = key.decoding()?;
        self.issuers.retain(|(i, _)| i != issuer);
        self.issuers.push((issuer.into(), keys));
        Ok(())
    }

    pub fn issuers(&self) -> impl Iterator<Item = &str> {
        self.issuers.iter().map(|(i, _)| i.as_str())
    }

    /// The caller a token names, when the token verifies.
    pub fn verify(&self, token: &str) -> Result<Caller, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        // The issuer picks the key: read it before the signature is checked, trust it after.
        let mut peek = Validation::new(header.alg);
        peek.insecure_disable_signature_validation();
        peek.validate_exp = false;
        peek.validate_aud = false;
        peek.required_spec_claims.clear();
        let unverified = jsonwebtoken::decode::<serde_json::Value>(token, &DecodingKey::from_secret(&[]), &peek)
            .map_err(|e| TokenError::Malformed(e.to_string()))?;
        let iss = unverified.claims.get("iss").and_then(|v| v.as_str()).unwrap_or_default().to_string();
        let (_, keys) = self.issuers.iter().find(|(i, _)| *i == iss).ok_or_else(|| TokenError::UnknownIssuer(iss.clone()))?;
        let (alg, key) = keys.iter().find(|(a, _)| *a == header.alg).ok_or_else(|| TokenError::BadSignature(iss.clone()))?;
        let mut v = Validation::new(*alg);
        v.set_audience(&[&self.audience]);
        v.set_issuer(&[&iss]);
        v.leeway = self.skew.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::ImmatureSignature => TokenError::NotYetValid,
                K::InvalidAudience => TokenError::WrongAudience(self.audience.clone()),
                K::InvalidSignature => TokenError::BadSignature(iss.clone()),
                _ => TokenError::Invalid(e.to_string()),
            }
        })?;
        let c = data.claims;
        if c.sub.is_empty() {
            return Err(TokenError::Invalid("the token has an empty subject".into()));
        }
        Ok(Caller { role: c.roles.iter().filter_map(|r| Role::parse(r)).max(), subject: c.sub, issuer: c.iss, groups: c.groups })
    }
}

/// A key file holding PEM (a public or private key) rather than a shared secret.
fn is_pem(content: &[u8]) -> bool {
    content.windows(11).any(|w| w == b"-----BEGIN ")
}

/// A key file's shared secret: its bytes without a trailing newline, at least 32 of them.
fn shared_secret(content: &[u8]) -> Result<&[u8], String> {
    let s = content.strip_suffix(b"\n").unwrap_or(content);
    if s.len() < 32 {
        return Err(format!("a shared secret must be at least 32 bytes (this one has {})", s.len()));
    }
    Ok(s)
}

/// Signs `claims` with `key`: HS256 for a secret; RS256 or ES256 for a private key in PEM.
pub fn sign(claims: &Claims, key: &[u8]) -> Result<String, String> {
    let (alg, k) = if is_pem(key) {
        match EncodingKey::from_rsa_pem(key) {
            Ok(k) => (Algorithm::RS256, k),
            Err(_) => {
                (Algorithm::ES256, EncodingKey::from_ec_pem(key).map_err(|e| format!("not an RSA or EC (P-256) private key in PEM (PKCS#8): {e}"))?)
            }
        }
    } else {
        (Algorithm::HS256, EncodingKey::from_secret(shared_secret(key)?))
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &k).map_err(|e| e.to_string())
}

/// The token in a request's metadata value (`Bearer <token>`, or the bare token).
pub fn bearer(value: &str) -> &str {
    let v = value.trim();
    v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")).unwrap_or(v).trim()
}

/// A tonic interceptor that puts a token on every request: a fixed one, one it mints and
/// renews itself from a key, or none.
#[derive(Clone, Default)]
pub struct Bearer(Source);

#[derive(Clone, Default)]
enum Source {
    #[default]
    None,
    Fixed(tonic::metadata::MetadataValue<tonic::metadata::Ascii>),
    Minted(std::sync::Arc<Minter>),
}

/// Signs short-lived tokens for one subject and renews them before they expire.
struct Minter {
    key: Vec<u8>,
    claims: Claims,
    ttl: Duration,
    current: std::sync::Mutex<(tonic::metadata::MetadataValue<tonic::metadata::Ascii>, u64)>,
}

impl Minter {
    fn sign(&self) -> Result<(tonic::metadata::MetadataValue<tonic::metadata::Ascii>, u64), String> {
        let mut c = self.claims.clone();
        let now = unix_now();
        (c.iat, c.exp) = (now, now + self.ttl.as_secs());
        let v = format!("Bearer {}", sign(&c, &self.key)?).parse().map_err(|_| "a signed token is not a header value".to_string())?;
        Ok((v, c.exp))
    }

    /// The current token, renewed when less than a third of its life is left.
    fn value(&self) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.1 < unix_now() + self.ttl.as_secs() / 3 {
            match self.sign() {
                Ok(next) => *cur = next,
                Err(e) => tracing::warn!("renewing the SDK token failed (the current one is sent until it expires): {e}"),
            }
        }
        cur.0.clone()
    }
}

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(Source::None)),
            Some(t) => format!("Bearer {t}")
                .parse()
                .map(|v| Bearer(Source::Fixed(v)))
                .map_err(|_| "the token has characters a header cannot carry".to_string()),
        }
    }

    /// Tokens for `subject` with `role`, signed with the cluster's system key and renewed
    /// before they expire (components that hold the key: CSI driver, extender, operator).
    pub fn minting(system_key: &[u8], subject: &str, role: Role, audience: &str) -> Result<Bearer, String> {
        let ttl = Duration::from_secs(600);
        let claims = Claims::new(subject, SYSTEM_ISSUER, audience, &[role], &[], ttl);
        let key = shared_secret(system_key)?.to_vec();
        let m = Minter { key, claims, ttl, current: std::sync::Mutex::new((tonic::metadata::MetadataValue::from_static(""), 0)) };
        let first = m.sign()?;
        *m.current.lock().unwrap_or_else(|p| p.into_inner()) = first;
        Ok(Bearer(Source::Minted(std::sync::Arc::new(m))))
    }

    /// `minting` with the key in `path` (the mounted system key Secret).
    pub fn minting_from_file(path: &std::path::Path, subject: &str, role: Role) -> Result<Bearer, String> {
        let key = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Bearer::minting(&key, subject, role, DEFAULT_AUDIENCE).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn is_set(&self) -> bool {
        !matches!(self.0, Source::None)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        match &self.0 {
            Source::None => {}
            Source::Fixed(v) => {
                req.metadata_mut().insert(HEADER, v.clone());
            }
            Source::Minted(m) => {
                req.metadata_mut().insert(HEADER, m.value());
            }
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        let mut v = Verifier::new("strata", Duration::from_secs(30));
        v.trust("issuer.example", &IssuerKey::Secret(SECRET.to_vec())).unwrap();
        v
    }

    fn claims() -> Claims {
        Claims::new("alice", "issuer.example", "strata", &[Role::User], &["dev".into()], Duration::from_secs(600))
    }

    #[test]
    fn a_signed_token_names_its_caller() {
        let t = sign(&claims(), SECRET).unwrap();
        let c = verifier().verify(&t).unwrap();
        assert_eq!((c.subject.as_str(), c.role, c.groups), ("alice", Some(Role::User), vec!["dev".to_string()]));
        // Portworx role names, and the highest of several.
        let mut cl = claims();
        cl.roles = vec!["system.view".into(), "system.admin".into(), "bogus".into()];
        assert!(verifier().verify(&sign(&cl, SECRET).unwrap()).unwrap().is_admin());
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let v = verifier();
        assert_eq!(v.verify(""), Err(TokenError::Missing));
        assert!(matches!(v.verify("not-a-token"), Err(TokenError::Malformed(_))));
        let mut expired = claims();
        expired.exp = unix_now() - 120;
        assert_eq!(v.verify(&sign(&expired, SECRET).unwrap()), Err(TokenError::Expired));
        // Within the clock skew an expired token still passes.
        let mut just = claims();
        just.exp = unix_now() - 5;
        assert!(v.verify(&sign(&just, SECRET).unwrap()).is_ok());
        let mut early = claims();
        early.nbf = Some(unix_now() + 3600);
        assert_eq!(v.verify(&sign(&early, SECRET).unwrap()), Err(TokenError::NotYetValid));
        let mut other = claims();
        other.aud = Audience::Many(vec!["another-cluster".into()]);
        assert_eq!(v.verify(&sign(&other, SECRET).unwrap()), Err(TokenError::WrongAudience("strata".into())));
        let forged = sign(&claims(), b"ffffffffffffffffffffffffffffffff").unwrap();
        assert_eq!(v.verify(&forged), Err(TokenError::BadSignature("issuer.example".into())));
        let mut stranger = claims();
        stranger.iss = "someone.else".into();
        assert_eq!(v.verify(&sign(&stranger, SECRET).unwrap()), Err(TokenError::UnknownIssuer("someone.else".into())));
        // A token whose payload was edited after signing.
        let t = sign(&claims(), SECRET).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        let mut admin = claims();
        admin.roles = vec!["admin".into()];
        let body = sign(&admin, SECRET).unwrap();
        let tampered = format!("{}.{}.{}", parts[0], body.split('.').nth(1).unwrap(), parts[2]);
        assert_eq!(v.verify(&tampered), Err(TokenError::BadSignature("issuer.example".into())));
    }

    #[test]
    fn a_public_key_issuer_verifies_its_tokens_and_not_a_secret_signed_one() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut v = Verifier::new("strata", Duration::from_secs(30));
        v.trust("idp", &IssuerKey::from_file_content(key.public_key_pem().as_bytes()).unwrap()).unwrap();
        let mut c = claims();
        c.iss = "idp".into();
        let t = sign(&c, key.serialize_pem().as_bytes()).unwrap();
        assert_eq!(v.verify(&t).unwrap().subject, "alice");
        // Algorithm confusion: an HS256 token keyed with the public key's text.
        let pem = key.public_key_pem();
        let confused = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, &EncodingKey::from_secret(pem.as_bytes())).unwrap();
        assert_eq!(v.verify(&confused), Err(TokenError::BadSignature("idp".into())));
        assert_eq!(v.verify(&sign(&c, SECRET).unwrap()), Err(TokenError::BadSignature("idp".into())));
    }

    #[test]
    fn a_minting_bearer_signs_verifiable_tokens_for_its_subject() {
        use tonic::service::Interceptor as _;
        let mut v = Verifier::new("strata", Duration::from_secs(30));
        v.trust(SYSTEM_ISSUER, &IssuerKey::Secret(SECRET.to_vec())).unwrap();
        let mut b = Bearer::minting(SECRET, "csi/node-1", Role::Admin, "strata").unwrap();
        let req = b.call(tonic::Request::new(())).unwrap();
        let token = bearer(req.metadata().get(HEADER).unwrap().to_str().unwrap()).to_string();
        let c = v.verify(&token).unwrap();
        assert_eq!((c.subject.as_str(), c.role), ("csi/node-1", Some(Role::Admin)));
        assert!(Bearer::minting(b"short", "x", Role::View, "strata").is_err());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(IssuerKey::from_file_content(b"short\n").is_err());
        assert!(sign(&claims(), b"short").is_err());
        assert!(IssuerKey::from_file_content(&[b'k'; 32]).is_ok());
    }
}
