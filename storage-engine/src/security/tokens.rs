//! The SDK's token rules: which issuers' tokens verify, and this node's own tokens (signed with
//! the cluster's system key) for its calls to other engines.

use strata_api::auth::{Claims, IssuerKey, Role, Verifier, SYSTEM_ISSUER};

/// How long the tokens an engine mints for its own calls to other engines live.
const SYSTEM_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// This cluster's token rules.
pub struct Auth {
    pub verifier: Verifier,
    /// The cluster's system key (HS256): engines sign their own calls to each other with it.
    system_key: Vec<u8>,
    node: String,
}

impl Auth {
    /// Trusts tokens signed with the system key (issuer `strata-system`) and with each of
    /// `issuers`' keys.
    pub fn new(node: &str, system_key: &[u8], issuers: &[(String, IssuerKey)], audience: &str, skew: std::time::Duration) -> Result<Auth, String> {
        let system = IssuerKey::from_file_content(system_key).map_err(|e| format!("the system key: {e}"))?;
        let IssuerKey::Secret(secret) = &system else {
            return Err("the system key must be a shared secret (at least 32 bytes), not a PEM key".into());
        };
        let mut verifier = Verifier::new(audience, skew);
        verifier.trust(SYSTEM_ISSUER, &system)?;
        for (iss, key) in issuers {
            if iss == SYSTEM_ISSUER {
                return Err(format!("issuer name {SYSTEM_ISSUER:?} is the system key's"));
            }
            verifier.trust(iss, key).map_err(|e| format!("issuer {iss}: {e}"))?;
        }
        Ok(Auth { verifier, system_key: secret.clone(), node: node.into() })
    }

    /// A short-lived admin token naming this node, for its calls to other engines.
    pub fn system_token(&self) -> String {
        let c = Claims::new(&format!("node/{}", self.node), SYSTEM_ISSUER, &self.verifier.audience, &[Role::Admin], &[], SYSTEM_TOKEN_TTL);
        strata_api::auth::sign(&c, &self.system_key).unwrap_or_default()
    }
}
