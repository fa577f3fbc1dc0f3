//! Command line and environment of `strata-stork`.

use clap::Parser;
use std::net::SocketAddr;

fn secs(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration (examples: 30s, 2m, 500ms)"))?;
    if v < 0.0 {
        return Err(format!("{s:?} is negative"));
    }
    Ok(std::time::Duration::from_secs_f64(v * mult))
}

#[derive(Debug, Parser)]
#[command(name = "strata-stork", version, about = "Strata scheduler extender and storage health monitor")]
pub struct Config {
    /// Extender address (/filter, /prioritize, /healthz, /metrics): HTTPS with --tls-dir, else
    /// plain HTTP, which is refused beyond loopback unless --allow-plain-http. Default:
    /// 0.0.0.0:8099.
    #[arg(long, env = "STRATA_STORK_LISTEN", default_value = "0.0.0.0:8099", hide_default_value = true)]
    pub listen: SocketAddr,
    /// Serve HTTPS with this directory's `node.crt` and `node.key` (`strata-engine certs issue
    /// --node-id strata-stork --host <service DNS name>`); /filter and /prioritize then answer
    /// only clients presenting a certificate of its `ca.crt` (the kube-scheduler's). The same
    /// certificate and CA reach the SDK unless --sdk-ca-file is given. Reloaded on change.
    #[arg(long, env = "STRATA_STORK_TLS_DIR")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// With --tls-dir: only clients whose certificate names one of these may call /filter and
    /// /prioritize (comma-separated or repeated). Default: any certificate of the CA.
    #[arg(long, env = "STRATA_STORK_TLS_CLIENT_NAME", value_delimiter = ',')]
    pub tls_client_name: Vec<String>,
    /// Serve plain HTTP on a non-loopback --listen (anyone who reaches the port can ask the
    /// extender about any pod). Default: off.
    #[arg(long, env = "STRATA_STORK_ALLOW_PLAIN_HTTP")]
    pub allow_plain_http: bool,
    /// Strata SDK endpoint. Default: 127.0.0.1:9020.
    #[arg(long, env = "STRATA_ENDPOINT", default_value = "127.0.0.1:9020", hide_default_value = true)]
    pub sdk: String,
    /// The cluster CA's certificate: the SDK is reached over TLS under it. Default: none.
    #[arg(long, env = "STRATA_SDK_CA_FILE")]
    pub sdk_ca_file: Option<std::path::PathBuf>,
    /// The cluster's system key (the engines' --auth-system-key-file), for clusters whose SDK
    /// checks tokens: the extender signs its own short-lived view tokens with it. Default: none.
    #[arg(long, env = "STRATA_AUTH_SYSTEM_KEY_FILE")]
    pub auth_system_key_file: Option<std::path::PathBuf>,
    /// Run the health monitor. Default: on.
    #[arg(long, env = "STRATA_STORK_HEALTH_MONITOR", default_value_t = true, action = clap::ArgAction::Set, hide_default_value = true)]
    pub health_monitor: bool,
    /// How long a node's storage must be gone before its pods are moved. Default: 2m.
    #[arg(long, env = "STRATA_STORK_GRACE", default_value = "2m", value_parser = secs, hide_default_value = true)]
    pub grace: std::time::Duration,
    /// Health monitor period. Default: 10s.
    #[arg(long, env = "STRATA_STORK_INTERVAL", default_value = "10s", value_parser = secs, hide_default_value = true)]
    pub interval: std::time::Duration,
    /// Timeout of the data-port probe. Default: 2s.
    #[arg(long, env = "STRATA_STORK_PROBE_TIMEOUT", default_value = "2s", value_parser = secs, hide_default_value = true)]
    pub probe_timeout: std::time::Duration,
    /// Run the migration controller (ClusterPair and Migration resources). Its SDK calls are an
    /// admin's: with --auth-system-key-file it signs admin tokens. Default: on.
    #[arg(long, env = "STRATA_STORK_MIGRATIONS", default_value_t = true, action = clap::ArgAction::Set, hide_default_value = true)]
    pub migrations: bool,
    /// How often the migration controller looks for Migrations to run. Default: 10s.
    #[arg(long, env = "STRATA_STORK_MIGRATION_INTERVAL", default_value = "10s", value_parser = secs, hide_default_value = true)]
    pub migration_interval: std::time::Duration,
    /// Pod deletions per monitor round, at most. Default: 10.
    #[arg(long, env = "STRATA_STORK_MAX_EVICTIONS", default_value_t = 10, hide_default_value = true)]
    pub max_evictions: usize,
}
