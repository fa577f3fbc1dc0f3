//! Command line and environment of `strata-engine`.

use crate::device::IoEngine;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

fn size(s: &str) -> Result<u64, String> {
    strata_api::units::parse_size(s).map_err(|e| e.to_string())
}

#[derive(Debug, Parser)]
#[command(name = "strata-engine", version, about = "Strata storage engine: pools this node's devices and serves thin volumes over NBD")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Verify superblocks, journals and allocation offline; exit 1 on any inconsistency.
    Check(CheckArgs),
    /// Make the cluster CA, or a node's replication certificate signed by it.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a new cluster CA (ca.crt, ca.key) in DIR; refuses to replace one.
    Init {
        /// Where the CA goes (keep ca.key private).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sign a certificate for one node: writes ca.crt, node.crt and node.key into OUT, the
    /// directory that node's engine gets as --tls-dir.
    Issue {
        /// The CA's directory (from `certs init`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The node id the certificate names (the engine's --node-id).
        #[arg(long)]
        node_id: String,
        /// Another name the certificate is valid for: an IP address or DNS name clients reach
        /// it by (an etcd server's, say); repeat for several.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Where the node's files go.
        #[arg(long)]
        out: PathBuf,
        /// Keep running and sign again whenever the CA's files change (checked every SECS
        /// seconds): a sidecar beside the engine, so a new CA from a rotated Secret reaches the
        /// node's certificate, which the engine reloads, without a restart. Default: sign once.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// etcd endpoints (http://host:port, comma-separated) for the metadata store instead of the
    /// embedded one. Default: none (embedded redb in --data-dir).
    #[arg(long, env = "STRATA_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub etcd_tls: EtcdTlsArgs,
    /// With --etcd: seconds without lease renewal before this node reads as offline. Default: 10.
    #[arg(long, env = "STRATA_NODE_TTL", default_value_t = 10, hide_default_value = true)]
    pub node_ttl: i64,
    /// Directory for the embedded metadata store (redb). Default: /var/lib/strata.
    #[arg(long, env = "STRATA_DATA_DIR", default_value = "/var/lib/strata", hide_default_value = true)]
    pub data_dir: PathBuf,
    /// A block device or regular file for the pool; repeat for several. Missing files are created.
    #[arg(long = "device", env = "STRATA_DEVICES", value_delimiter = ',')]
    pub devices: Vec<PathBuf>,
    /// Also pool every unused whole block device of this node (see the README: no partitions,
    /// filesystem, holder, mount or swap, its first MiB blank — or this pool's own), and log
    /// each one left alone with the reason. Default: off.
    #[arg(long, env = "STRATA_USE_ALL")]
    pub use_all: bool,
    /// With --use-all: only devices whose names match one of these shell patterns (e.g.
    /// `nvme*`, `sd?`; comma-separated or repeated). Default: every device.
    #[arg(long, env = "STRATA_USE_ALL_MATCH", value_delimiter = ',', requires = "use_all")]
    pub use_all_match: Vec<String>,
    /// Size of a device file that does not exist yet. Default: 8GiB.
    #[arg(long, env = "STRATA_DEVICE_SIZE", default_value = "8GiB", value_parser = size, hide_default_value = true)]
    pub device_size: u64,
    /// Format devices that hold a filesystem, another pool or a corrupted superblock. Destroys them.
    #[arg(long, env = "STRATA_FORCE_FORMAT")]
    pub force_format: bool,
    /// Extent size of a new pool (allocation unit). Default: 1MiB.
    #[arg(long, env = "STRATA_EXTENT_SIZE", default_value = "1MiB", value_parser = size, hide_default_value = true)]
    pub extent_size: u64,
    /// NBD over TCP. Default: 127.0.0.1:10809. Port 0 picks a free port.
    #[arg(long, env = "STRATA_NBD_LISTEN", default_value = "127.0.0.1:10809", hide_default_value = true)]
    pub nbd_listen: SocketAddr,
    /// Let --nbd-listen take an address other hosts reach without TLS (no --tls-dir): any host
    /// that reaches the port may then read and write every volume. With --tls-dir a
    /// non-loopback --nbd-listen needs no such flag: clients must start TLS (NBD_OPT_STARTTLS)
    /// with a certificate of the cluster CA.
    #[arg(long, env = "STRATA_NBD_ALLOW_REMOTE")]
    pub nbd_allow_remote: bool,
    /// Clients of the TCP --nbd-listen must start TLS with a certificate of the cluster CA
    /// before anything else, on loopback too (needs --tls-dir). Default: required beyond
    /// loopback, offered on loopback; the unix socket never uses TLS.
    #[arg(long, env = "STRATA_NBD_REQUIRE_TLS")]
    pub nbd_require_tls: bool,
    /// NBD over a unix socket at this path (created; a stale one is replaced). Default: none.
    #[arg(long, env = "STRATA_NBD_SOCKET")]
    pub nbd_socket: Option<PathBuf>,
    /// Payload bytes (writes received, reads not yet sent) one NBD connection may hold before
    /// the engine stops reading its requests (backpressure). Default: 64MiB.
    #[arg(long, env = "STRATA_NBD_CONN_INFLIGHT", default_value = "64MiB", value_parser = size, hide_default_value = true)]
    pub nbd_conn_inflight: u64,
    /// The same, for all NBD connections together; each connection may always have one
    /// request. Default: 512MiB.
    #[arg(long, env = "STRATA_NBD_INFLIGHT", default_value = "512MiB", value_parser = size, hide_default_value = true)]
    pub nbd_inflight: u64,
    /// Seconds an NBD client may take to finish the handshake before it is disconnected.
    /// Default: 10.
    #[arg(long, env = "STRATA_NBD_HANDSHAKE_TIMEOUT", default_value_t = 10, hide_default_value = true)]
    pub nbd_handshake_timeout: u64,
    /// NBD connections served at once; more are refused (closed at once). Default: 1024.
    #[arg(long, env = "STRATA_NBD_MAX_CONNECTIONS", default_value_t = 1024, hide_default_value = true)]
    pub nbd_max_connections: usize,
    /// Requests one replication connection may hold between reading them and writing their
    /// replies; past that the replica stops reading it (backpressure). Default: 512.
    #[arg(long, env = "STRATA_REPL_MAX_REQUESTS", default_value_t = 512, hide_default_value = true)]
    pub repl_max_requests: usize,
    /// Payload bytes (writes received, reads answered) one replication connection may hold in
    /// that state. Default: 128MiB.
    #[arg(long, env = "STRATA_REPL_INFLIGHT", default_value = "128MiB", value_parser = size, hide_default_value = true)]
    pub repl_inflight: u64,
    /// gRPC SDK address. Default: 127.0.0.1:9020.
    #[arg(long, env = "STRATA_SDK_LISTEN", default_value = "127.0.0.1:9020", hide_default_value = true)]
    pub sdk_listen: SocketAddr,
    /// Prometheus /metrics and /healthz. Default: 127.0.0.1:9021.
    #[arg(long, env = "STRATA_METRICS_LISTEN", default_value = "127.0.0.1:9021", hide_default_value = true)]
    pub metrics_listen: SocketAddr,
    /// Replication port: other engines send replica I/O here. Default: 127.0.0.1:9022.
    #[arg(long, env = "STRATA_REPL_LISTEN", default_value = "127.0.0.1:9022", hide_default_value = true)]
    pub repl_listen: SocketAddr,
    /// Directory with this node's replication certificate (ca.crt, node.crt, node.key, from
    /// `strata-engine certs issue`): every replication connection is then mutual TLS under the
    /// cluster CA, and a replica takes requests only from the node its volume record names as
    /// target. Default: none (plaintext replication; the engine warns).
    #[arg(long, env = "STRATA_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: the SDK takes only clients that present a certificate of the cluster CA
    /// (stratactl --cert-file/--key-file; engines use their node certificates). Default: off
    /// (a client certificate is checked when sent; tokens identify callers).
    #[arg(long, env = "STRATA_SDK_REQUIRE_CLIENT_CERT")]
    pub sdk_require_client_cert: bool,
    /// The cluster's system key (a file holding a secret of at least 32 bytes, the same on every
    /// node): the SDK then takes only calls with a bearer token (JWT) signed by it or by an
    /// --auth-issuer, and checks each call's role and the volume's owner and collaborators.
    /// Engines sign their calls to each other with it. Default: none (the SDK is open; the
    /// engine warns).
    #[arg(long, env = "STRATA_AUTH_SYSTEM_KEY_FILE")]
    pub auth_system_key_file: Option<PathBuf>,
    /// A secret (a file of at least 32 bytes, the same on every node) that seals cloud
    /// credentials (`stratactl credentials create`) in the metadata store. Default: the
    /// --auth-system-key-file; with neither, credentials cannot be stored.
    #[arg(long, env = "STRATA_CREDENTIALS_KEY_FILE")]
    pub credentials_key_file: Option<PathBuf>,
    /// A token issuer to trust, as NAME=KEYFILE: tokens whose `iss` is NAME verify with the key
    /// in KEYFILE (a PEM RSA or P-256 public key for RS256/ES256, else a shared secret for
    /// HS256). Repeat for several. Needs --auth-system-key-file. Default: none.
    #[arg(long = "auth-issuer", env = "STRATA_AUTH_ISSUERS", value_delimiter = ',', value_parser = issuer_arg)]
    pub auth_issuers: Vec<(String, PathBuf)>,
    /// The audience tokens must name (`aud`). Default: strata.
    #[arg(long, env = "STRATA_AUTH_AUDIENCE", default_value = strata_api::auth::DEFAULT_AUDIENCE, hide_default_value = true)]
    pub auth_audience: String,
    /// Seconds of clock difference allowed when checking a token's expiry and not-before.
    /// Default: 60.
    #[arg(long, env = "STRATA_AUTH_CLOCK_SKEW", default_value_t = 60, hide_default_value = true)]
    pub auth_clock_skew: u64,
    /// The address other engines use to reach --repl-listen (host:port). Default: the bound
    /// replication address.
    #[arg(long, env = "STRATA_ADVERTISE")]
    pub advertise: Option<String>,
    /// This node's zone (replicas spread across zones first). Default: none.
    #[arg(long, env = "STRATA_ZONE", default_value = "", hide_default_value = true)]
    pub zone: String,
    /// This node's rack (replicas spread across racks after zones). Default: none.
    #[arg(long, env = "STRATA_RACK", default_value = "", hide_default_value = true)]
    pub rack: String,
    /// Seconds a replica may take to answer before it is taken out of the in-sync set.
    /// Default: 5.
    #[arg(long, env = "STRATA_REPLICA_IO_TIMEOUT", default_value_t = 5, hide_default_value = true)]
    pub replica_io_timeout: u64,
    /// Seconds a replica's node may stay offline before the replica is rebuilt on another node
    /// (0 = never). Default: 600.
    #[arg(long, env = "STRATA_REPLICA_TIMEOUT", default_value_t = 600, hide_default_value = true)]
    pub replica_timeout: u64,
    /// Bandwidth of resync and rebuild per volume while clients do I/O on it (an idle volume
    /// resyncs at full speed; 0 = unlimited). Default: 256MiB (per second).
    #[arg(long, env = "STRATA_RESYNC_RATE", default_value = "256MiB", value_parser = size, hide_default_value = true)]
    pub resync_rate: u64,
    /// Bandwidth of this node's cloud backup uploads, all backups together (0 = unlimited).
    /// Default: 0.
    #[arg(long, env = "STRATA_CLOUDSNAP_RATE", default_value = "0", value_parser = size, hide_default_value = true)]
    pub cloudsnap_rate: u64,
    /// Bandwidth of the background scrub that verifies every stored block's checksum
    /// (0 = no scrub). Default: 8MiB (per second).
    #[arg(long, env = "STRATA_SCRUB_RATE", default_value = "8MiB", value_parser = size, hide_default_value = true)]
    pub scrub_rate: u64,
    /// Seconds from the start of one scrub pass to the start of the next. Default: 604800
    /// (a week).
    #[arg(long, env = "STRATA_SCRUB_INTERVAL", default_value_t = 604800, hide_default_value = true)]
    pub scrub_interval: u64,
    /// Seconds an extent must go without writes before its block checksums are written and its
    /// intent bit cleared. Until then a crash makes the engine recompute them from the data at
    /// start; a write to an extent whose bit is clear waits for the bit to be made durable (a
    /// device sync) first. Shorter: less to recompute after a crash; longer: fewer such syncs
    /// when writes come back to the same extents. A device with more than 2,048 unsettled
    /// extents settles those idle for one period (5 s) anyway. Default: 60.
    #[arg(long, env = "STRATA_CHECKSUM_SETTLE_AFTER", default_value_t = 60, hide_default_value = true)]
    pub checksum_settle_after: u64,
    /// This node's id. Default: the hostname.
    #[arg(long, env = "STRATA_NODE_ID")]
    pub node_id: Option<String>,
    /// Data path: auto (io_uring, else pread/pwrite), uring or sync. Default: auto.
    #[arg(long, env = "STRATA_IO_ENGINE", value_enum, default_value = "auto", hide_default_value = true)]
    pub io_engine: IoEngine,
    /// Read ahead of sequential readers, per volume (0 disables). Default: 16MiB.
    #[arg(long, env = "STRATA_READAHEAD", default_value = "16MiB", value_parser = size, hide_default_value = true)]
    pub readahead: u64,
    /// Threads serving NBD, SDK and metrics. Default 0 = half the cores, at least 1: on small
    /// nodes one thread beats two, because cross-thread wake-ups cost more than they give.
    #[arg(long, env = "STRATA_WORKER_THREADS", default_value_t = 0, hide_default_value = true)]
    pub worker_threads: usize,
    /// Test only: keep device writes in memory until a flush, so that killing the engine acts as
    /// a power cut on its disks (and every start counts as a reboot for the replication
    /// protocol). Never use it on a real node.
    #[arg(long, env = "STRATA_SIMULATE_VOLATILE_CACHE", hide = true)]
    pub simulate_volatile_cache: bool,
    /// Once listening, write the bound addresses here as JSON (for scripts and tests).
    #[arg(long, env = "STRATA_READY_FILE")]
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Every device of the pool.
    #[arg(long = "device", value_delimiter = ',', required = true)]
    pub devices: Vec<PathBuf>,
    /// The engine's data directory, to also check extents against the volumes it knows.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub etcd_tls: EtcdTlsArgs,
    /// Check extents against the volume records in etcd instead (URL[,URL]).
    #[arg(long, value_delimiter = ',', conflicts_with = "data_dir")]
    pub etcd: Vec<String>,
    /// With --etcd: this node's id, to find its pool record and check that every volume with
    /// extents here lists this node as a replica.
    #[arg(long, requires = "etcd")]
    pub node_id: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Fix what can be fixed on this node alone, then check again and say what was done: a
    /// damaged superblock copy is rewritten from the other, a torn journal tail is dropped,
    /// checksums left unsettled by a crash are recomputed from their data and written. Blocks
    /// failing their checksum are repaired from another node's replica by the running engine
    /// (reads, scrub), not here. Run with the engine stopped.
    #[arg(long)]
    pub repair: bool,
}

/// The runtime's worker count for `--worker-threads` (0 = auto).
pub fn worker_threads(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / 2).max(1)
}

fn issuer_arg(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, file)) if !name.trim().is_empty() && !file.trim().is_empty() => Ok((name.trim().to_string(), PathBuf::from(file.trim()))),
        _ => Err(format!("{s:?}: give an issuer as NAME=KEYFILE (e.g. https://idp.example=/etc/strata/idp.pem)")),
    }
}

/// TLS to etcd (https:// endpoints).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// The CA that signed etcd's server certificate. Default with https:// endpoints: the
    /// --tls-dir's ca.crt.
    #[arg(long, env = "STRATA_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// This client's certificate for etcd's --client-cert-auth (with --etcd-key-file).
    /// Default with https:// endpoints: the --tls-dir's node certificate.
    #[arg(long, env = "STRATA_ETCD_CERT_FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,
    #[arg(long, env = "STRATA_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The TLS settings for `endpoints`: None for http:// ones; for https://, the files given,
    /// else those of `tls_dir` (the node's certificate).
    pub fn load(&self, endpoints: &[String], tls_dir: Option<&std::path::Path>) -> anyhow::Result<Option<crate::meta::etcd::EtcdTls>> {
        use anyhow::Context as _;
        let https = endpoints.iter().filter(|e| e.starts_with("https://")).count();
        if https == 0 {
            if self.etcd_ca_file.is_some() || self.etcd_cert_file.is_some() {
                anyhow::bail!("--etcd-ca-file/--etcd-cert-file need https:// etcd endpoints");
            }
            return Ok(None);
        }
        if https != endpoints.len() {
            anyhow::bail!("--etcd: use https:// for every endpoint or for none");
        }
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let ca = match (&self.etcd_ca_file, tls_dir) {
            (Some(f), _) => read(f)?,
            (None, Some(d)) => read(&d.join("ca.crt"))?,
            (None, None) => anyhow::bail!("https:// etcd endpoints need --etcd-ca-file (or --tls-dir, whose ca.crt is used)"),
        };
        let identity = match (&self.etcd_cert_file, &self.etcd_key_file, tls_dir) {
            (Some(c), Some(k), _) => Some((read(c)?, read(k)?)),
            (None, None, Some(d)) => Some((read(&d.join("node.crt"))?, read(&d.join("node.key"))?)),
            _ => None,
        };
        Ok(Some(crate::meta::etcd::EtcdTls { ca, identity }))
    }
}
