//! strata-csi: the CSI Identity, Controller and Node services (driver `csi.strata.dev`) over a
//! unix socket, backed by the engine SDK.
// gRPC handlers and their helpers return tonic::Status, which is large; boxing it buys nothing here.
#![allow(clippy::result_large_err)]

pub mod attach;
pub mod cloud;
pub mod controller;
pub mod docker;
pub mod fusedisk;
pub mod identity;
pub mod inflight;
pub mod kernelnbd;
pub mod nbdclient;
pub mod netlink;
pub mod node;
pub mod params;
pub mod retrying;
pub mod sdk;
pub mod stage;
pub mod ublk;

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use strata_api::csi;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Controller,
    Node,
    /// A Docker volume plugin (Docker, Swarm): `--endpoint unix:///run/docker/plugins/strata.sock`.
    Docker,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "strata-csi", version, about = "Strata CSI driver (csi.strata.dev)")]
pub struct Config {
    /// controller (Identity + Controller), node (Identity + Node), or docker (a Docker volume
    /// plugin on --endpoint, e.g. unix:///run/docker/plugins/strata.sock).
    #[arg(long, env = "STRATA_CSI_MODE", value_enum)]
    pub mode: Mode,
    /// The CSI socket: unix:///path/csi.sock (a stale socket file is replaced).
    #[arg(long, env = "CSI_ENDPOINT")]
    pub endpoint: String,
    /// The engine SDK (host:port). Default: 127.0.0.1:9020.
    #[arg(long, env = "STRATA_SDK", default_value = "127.0.0.1:9020", hide_default_value = true)]
    pub sdk: String,
    /// The cluster CA's certificate: the SDK is reached over TLS, its certificate checked
    /// against this CA (engines with a certificate serve their SDK over TLS only). Default:
    /// none (plaintext).
    #[arg(long, env = "STRATA_SDK_CA_FILE")]
    pub sdk_ca_file: Option<PathBuf>,
    /// The driver's client certificate at a TLS SDK (engines run with
    /// --sdk-require-client-cert take no client without one), with --sdk-key-file. Default: none.
    #[arg(long, env = "STRATA_SDK_CERT_FILE", requires_all = ["sdk_key_file", "sdk_ca_file"])]
    pub sdk_cert_file: Option<PathBuf>,
    /// The private key of --sdk-cert-file. Default: none.
    #[arg(long, env = "STRATA_SDK_KEY_FILE", requires = "sdk_cert_file")]
    pub sdk_key_file: Option<PathBuf>,
    /// A file holding the driver's own SDK token, for clusters whose engines check tokens (calls
    /// whose CSI secrets carry `auth-token` use that one instead). Default: none.
    #[arg(long, env = "STRATA_TOKEN_FILE", conflicts_with = "auth_system_key_file")]
    pub token_file: Option<PathBuf>,
    /// Or the cluster's system key (the engines' --auth-system-key-file): the driver signs its
    /// own short-lived admin tokens with it (subject `csi/<node-id>`). Default: none.
    #[arg(long, env = "STRATA_AUTH_SYSTEM_KEY_FILE")]
    pub auth_system_key_file: Option<PathBuf>,
    /// This node's id (the Strata node id and the Kubernetes node name). Node mode needs it.
    #[arg(long, env = "NODE_NAME", default_value = "", hide_default_value = true)]
    pub node_id: String,
    /// Volumes this node can attach. Default: 64.
    #[arg(long, default_value_t = 64, hide_default_value = true)]
    pub max_volumes: i64,
    /// Node mode: the local engine's NBD unix socket. Default: /var/lib/strata/nbd.sock.
    #[arg(long, env = "STRATA_NBD_SOCKET", default_value = "/var/lib/strata/nbd.sock", hide_default_value = true)]
    pub nbd_socket: PathBuf,
    /// Node mode: NBD over TCP (host:port) instead of the unix socket.
    #[arg(long, env = "STRATA_NBD_ADDRESS")]
    pub nbd_address: Option<String>,
    /// Node mode: where the FUSE views of attached volumes live. Default: /var/lib/strata-csi.
    #[arg(long, env = "STRATA_CSI_STATE_DIR", default_value = "/var/lib/strata-csi", hide_default_value = true)]
    pub state_dir: PathBuf,
    /// Node mode: how a volume becomes a block device: `auto` (ublk when the kernel's ublk driver
    /// can recover devices and resize them online, else the kernel's NBD driver when the nbd
    /// module is loaded, else the FUSE view), `ublk` (/dev/ublkbN served by a helper per volume,
    /// taken over by a new helper if one dies), `kernel-nbd` (the kernel's NBD driver through
    /// netlink: several sockets, reconnected after an engine restart) or `fuse` (a FUSE view
    /// under a loop device, works everywhere). Default: auto.
    #[arg(long, env = "STRATA_CSI_ATTACH", value_enum, default_value = "auto", hide_default_value = true)]
    pub attach: AttachMode,
    /// Node mode, kernel NBD: sockets (queues) per device. Default: 2.
    #[arg(long, env = "STRATA_CSI_NBD_CONNECTIONS", default_value_t = 2, hide_default_value = true, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub nbd_connections: u32,
    /// Node mode, kernel NBD: seconds a request may go unanswered before the kernel drops its
    /// socket, reconnects and sends it again (not an error). Default: 10.
    #[arg(long, env = "STRATA_CSI_NBD_IO_TIMEOUT", default_value_t = 10, hide_default_value = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub nbd_io_timeout: u64,
    /// Node mode, kernel NBD: seconds the kernel holds I/O while the engine is unreachable
    /// (a restart or upgrade) before failing it. Default: 120.
    #[arg(long, env = "STRATA_CSI_NBD_DEAD_TIMEOUT", default_value_t = 120, hide_default_value = true, value_parser = clap::value_parser!(u64).range(1..))]
    pub nbd_dead_timeout: u64,
    /// Node mode, ublk: hardware queues per device. Default: 2.
    #[arg(long, env = "STRATA_CSI_UBLK_QUEUES", default_value_t = 2, hide_default_value = true, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub ublk_queues: u16,
    /// Node mode, ublk: requests in flight per queue. Default: 64.
    #[arg(long, env = "STRATA_CSI_UBLK_DEPTH", default_value_t = 64, hide_default_value = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub ublk_depth: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    Auto,
    Fuse,
    KernelNbd,
    Ublk,
}

impl AttachMode {
    /// The path this node uses: `auto` resolved against what the kernel has (`ublk_preferred`:
    /// see `ublk::preferred`).
    pub fn resolve(self, ublk_preferred: bool, nbd_loaded: bool) -> AttachMode {
        match self {
            AttachMode::Auto if ublk_preferred => AttachMode::Ublk,
            AttachMode::Auto if nbd_loaded => AttachMode::KernelNbd,
            AttachMode::Auto => AttachMode::Fuse,
            other => other,
        }
    }
}

/// `strata-csi ublk-disk`: serve one export as a ublk device (started by the node plugin).
#[derive(Debug, clap::Parser)]
#[command(name = "ublk-disk")]
pub struct UblkDiskArgs {
    #[arg(long)]
    pub export: String,
    /// Where the device's id and this process's pid are kept; naming a device whose helper died,
    /// this one takes it over.
    #[arg(long)]
    pub state_file: PathBuf,
    /// The engine's NBD unix socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Or its NBD TCP address (host:port).
    #[arg(long)]
    pub tcp: Option<String>,
    #[arg(long, default_value_t = 2)]
    pub queues: u16,
    #[arg(long, default_value_t = 64)]
    pub depth: u16,
}

/// `strata-csi fuse-disk`: serve one export as `<mount>/disk` (started by the node plugin).
#[derive(Debug, clap::Parser)]
#[command(name = "fuse-disk")]
pub struct FuseDiskArgs {
    #[arg(long)]
    pub export: String,
    #[arg(long)]
    pub mount: PathBuf,
    /// The engine's NBD unix socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Or its NBD TCP address (host:port).
    #[arg(long)]
    pub tcp: Option<String>,
}

impl FuseDiskArgs {
    pub fn endpoint(&self) -> anyhow::Result<fusedisk::Endpoint> {
        endpoint(&self.socket, &self.tcp)
    }
}

impl UblkDiskArgs {
    pub fn endpoint(&self) -> anyhow::Result<fusedisk::Endpoint> {
        endpoint(&self.socket, &self.tcp)
    }
}

fn endpoint(socket: &Option<PathBuf>, tcp: &Option<String>) -> anyhow::Result<fusedisk::Endpoint> {
    match (socket, tcp) {
        (Some(p), None) => Ok(fusedisk::Endpoint::Unix(p.clone())),
        (None, Some(a)) => Ok(fusedisk::Endpoint::Tcp(a.clone())),
        _ => anyhow::bail!("pass exactly one of --socket PATH and --tcp HOST:PORT"),
    }
}

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let p = endpoint.strip_prefix("unix://").ok_or_else(|| anyhow::anyhow!("endpoint {endpoint:?} must be unix:///path/to/csi.sock"))?;
    if p.is_empty() {
        anyhow::bail!("endpoint {endpoint:?} has no path");
    }
    Ok(PathBuf::from(p))
}

/// Serves until the process ends.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    if matches!(cfg.mode, Mode::Node | Mode::Docker) && cfg.attach == AttachMode::KernelNbd && !kernelnbd::available() {
        anyhow::bail!("--attach kernel-nbd: the kernel's nbd module is not loaded (modprobe nbd), or use --attach fuse");
    }
    if matches!(cfg.mode, Mode::Node | Mode::Docker) && cfg.attach == AttachMode::Ublk && !ublk::available() {
        anyhow::bail!(
            "--attach ublk: the kernel's ublk driver is not loaded (modprobe ublk_drv; Linux 6.0 or later), or use --attach kernel-nbd or fuse"
        );
    }
    let path = socket_path(&cfg.endpoint)?;
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    let token = match &cfg.token_file {
        Some(f) => Some(std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?.trim().to_string()),
        None => None,
    };
    let tls = match &cfg.sdk_ca_file {
        Some(ca) => {
            let identity = cfg.sdk_cert_file.as_deref().zip(cfg.sdk_key_file.as_deref());
            Some(strata_api::tls::ClientTls::from_files(ca, identity).map_err(|e| anyhow::anyhow!("--sdk-ca-file {e}"))?)
        }
        None => None,
    };
    let mut sdk = sdk::Sdk::lazy(&cfg.sdk, tls)?.with_token(token.as_deref())?;
    if let Some(key) = &cfg.auth_system_key_file {
        let who = format!("csi/{}", if cfg.node_id.is_empty() { "controller" } else { &cfg.node_id });
        let b = strata_api::auth::Bearer::minting_from_file(key, &who, strata_api::auth::Role::Admin)
            .map_err(|e| anyhow::anyhow!("--auth-system-key-file {e}"))?;
        sdk = sdk.with_bearer(b);
    }
    if cfg.mode == Mode::Docker {
        let root = cfg.state_dir.join("docker");
        let plugin = std::sync::Arc::new(docker::Plugin::new(sdk, devices(&cfg), root));
        tracing::info!(socket = %path.display(), "strata-csi serving the Docker volume plugin");
        docker::serve(listener, plugin).await?;
        return Ok(());
    }
    let identity = csi::identity_server::IdentityServer::new(identity::Identity { sdk: sdk.clone(), controller: cfg.mode == Mode::Controller });
    let mut server = tonic::transport::Server::builder();
    let router = match cfg.mode {
        Mode::Controller => server.add_service(identity).add_service(csi::controller_server::ControllerServer::new(controller::Controller::new(sdk))),
        Mode::Docker => unreachable!("the Docker plugin is served above"),
        Mode::Node => {
            if cfg.node_id.is_empty() {
                anyhow::bail!("--node-id (or NODE_NAME) is required in node mode");
            }
            let n = node::Node::new(sdk, cfg.node_id.clone(), cfg.max_volumes, devices(&cfg));
            server.add_service(identity).add_service(csi::node_server::NodeServer::new(n))
        }
    };
    tracing::info!(socket = %path.display(), mode = ?cfg.mode, "strata-csi serving");
    router.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)).await?;
    Ok(())
}

/// How this node makes block devices (node and Docker modes): `--attach` resolved against the
/// kernel, logged.
fn devices(cfg: &Config) -> stage::Devices {
    let nbd = match &cfg.nbd_address {
        Some(a) => stage::NbdEndpoint::Tcp(a.clone()),
        None => stage::NbdEndpoint::Unix(cfg.nbd_socket.clone()),
    };
    let ublk_features = ublk::features();
    let attach = cfg.attach.resolve(ublk::preferred(ublk_features), kernelnbd::available());
    tracing::info!(
        ?attach,
        ublk_features = format!("{:#x}", ublk_features.unwrap_or(0)),
        "volumes become block devices through {}",
        match attach {
            AttachMode::Ublk => "ublk (a helper per volume; devices recovered when a helper dies)",
            AttachMode::KernelNbd => "the kernel's NBD driver",
            _ => "a FUSE view under a loop device (the kernel has neither a usable ublk driver nor the nbd module)",
        }
    );
    let nbd_params =
        kernelnbd::Params { connections: cfg.nbd_connections, io_timeout_secs: cfg.nbd_io_timeout, dead_conn_timeout_secs: cfg.nbd_dead_timeout };
    let kernel_nbd = (attach == AttachMode::KernelNbd).then(|| {
        let k = std::sync::Arc::new(kernelnbd::Keepers::default());
        k.adopt(&cfg.state_dir, &nbd, nbd_params);
        k
    });
    let ublk_opts = ublk::Opts { queues: cfg.ublk_queues, depth: cfg.ublk_depth, ..ublk::Opts::default() };
    let ublk = (attach == AttachMode::Ublk).then(|| {
        let k = std::sync::Arc::new(ublk::Keepers::default());
        k.adopt(&cfg.state_dir, &nbd, ublk_opts);
        k
    });
    stage::Devices { state_dir: cfg.state_dir.clone(), nbd, kernel_nbd, nbd_params, ublk, ublk_opts }
}

#[cfg(test)]
mod tests {
    use super::AttachMode;

    #[test]
    fn auto_attach_takes_ublk_then_kernel_nbd_then_fuse() {
        assert_eq!(AttachMode::Auto.resolve(true, true), AttachMode::Ublk);
        assert_eq!(AttachMode::Auto.resolve(false, true), AttachMode::KernelNbd);
        assert_eq!(AttachMode::Auto.resolve(false, false), AttachMode::Fuse);
        assert_eq!(AttachMode::Fuse.resolve(true, true), AttachMode::Fuse, "a forced mode stays");
        assert_eq!(AttachMode::KernelNbd.resolve(true, false), AttachMode::KernelNbd);
        assert_eq!(AttachMode::Ublk.resolve(false, true), AttachMode::Ublk);
    }

    #[test]
    fn auto_takes_ublk_only_with_recovery_and_online_resize() {
        use crate::ublk::{preferred, F_UPDATE_SIZE, F_USER_RECOVERY, F_USER_RECOVERY_REISSUE};
        assert!(!preferred(None), "no ublk driver");
        // Linux 6.12: recovery, but no UPDATE_SIZE.
        assert!(!preferred(Some(F_USER_RECOVERY | F_USER_RECOVERY_REISSUE | 0xff)));
        assert!(preferred(Some(F_USER_RECOVERY | F_USER_RECOVERY_REISSUE | F_UPDATE_SIZE)));
        assert!(!preferred(Some(F_UPDATE_SIZE | F_USER_RECOVERY)), "recovery must reissue what the dead helper had");
    }
}
