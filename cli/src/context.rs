//! Where stratactl sends its calls and with which token: named contexts (like pxctl's) in
//! `$STRATA_CONFIG_DIR/contexts.json` (default `~/.strata/contexts.json`, mode 0600), and
//! minting tokens with a key (`stratactl auth token`).

use anyhow::{anyhow, bail, Context as _};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use strata_api::auth::{Claims, Role};

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:9020";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Context {
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// The cluster CA's certificate file: TLS to the SDK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Contexts {
    #[serde(default)]
    pub current: String,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

pub fn config_path() -> PathBuf {
    match std::env::var_os("STRATA_CONFIG_DIR") {
        Some(d) => PathBuf::from(d).join("contexts.json"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".strata").join("contexts.json"),
    }
}

impl Contexts {
    pub fn load() -> anyhow::Result<Contexts> {
        let p = config_path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is not a stratactl context file", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Contexts::default()),
            Err(e) => Err(anyhow!("reading {}: {e}", p.display())),
        }
    }

    /// Written whole (a temporary file renamed over it), readable by its owner only: it holds
    /// tokens.
    pub fn save(&self) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let p = config_path();
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let tmp = p.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
        Ok(())
    }
}

/// The endpoint, token and CA a call uses: flags and environment first, then the named context
/// (`--context`, else the current one), then the local engine without a token.
pub fn resolve(endpoint: Option<&str>, token: Option<&str>, ca_file: Option<&str>, context: Option<&str>) -> anyhow::Result<Context> {
    let all = Contexts::load()?;
    let chosen = match context {
        Some(name) => Some(all.contexts.get(name).cloned().ok_or_else(|| {
            anyhow!("no context named {name:?} in {}; create it with `stratactl context create {name} --endpoint ...`", config_path().display())
        })?),
        None if all.current.is_empty() => None,
        None => all.contexts.get(&all.current).cloned(),
    }
    .unwrap_or_default();
    Ok(Context {
        endpoint: endpoint.map(str::to_string).filter(|e| !e.is_empty()).unwrap_or(if chosen.endpoint.is_empty() {
            DEFAULT_ENDPOINT.into()
        } else {
            chosen.endpoint
        }),
        token: token.map(str::to_string).filter(|t| !t.is_empty()).unwrap_or(chosen.token),
        ca_file: ca_file.map(str::to_string).filter(|c| !c.is_empty()).or(chosen.ca_file),
    })
}

/// A duration: plain seconds, or a number with s, m, h or d.
pub fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a duration (e.g. 3600, 90m, 24h, 30d)"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    if n == 0 {
        return Err(format!("{s:?}: a duration must be longer than 0 seconds"));
    }
    Ok(std::time::Duration::from_secs(n.saturating_mul(mult)))
}

pub fn role_arg(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is not a role: use admin, user or view"))
}

/// A token for `subject`, signed with the key in `key_file` (the cluster's system key, or an
/// issuer's shared secret or private key in PEM).
pub fn mint(
    key_file: &std::path::Path,
    subject: &str,
    issuer: &str,
    audience: &str,
    roles: &[Role],
    groups: &[String],
    ttl: std::time::Duration,
) -> anyhow::Result<String> {
    if subject.trim().is_empty() {
        bail!("--subject must name the token's holder");
    }
    let key = std::fs::read(key_file).with_context(|| format!("reading the key file {}", key_file.display()))?;
    let claims = Claims::new(subject, issuer, audience, roles, groups, ttl);
    strata_api::auth::sign(&claims, &key).map_err(|e| anyhow!("{}: {e}", key_file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_arg("90m").unwrap().as_secs(), 5400);
        assert_eq!(duration_arg("3600").unwrap().as_secs(), 3600);
        assert_eq!(duration_arg("2d").unwrap().as_secs(), 172800);
        assert!(duration_arg("1y").is_err());
        assert!(duration_arg("0").is_err());
        assert!(duration_arg("soon").is_err());
    }
}
