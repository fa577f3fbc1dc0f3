//! stratactl: pxctl-style command line over the Strata SDK.

// Output goes through `out`: into a closed pipe (`stratactl status | head -1`) it ends the
// process quietly instead of a panic. (SIGPIPE stays ignored: a peer that closes a socket must
// give an error, not kill the process.)
macro_rules! print {
    ($($t:tt)*) => { $crate::out(format_args!($($t)*)) };
}
macro_rules! println {
    ($($t:tt)*) => { $crate::out(format_args!("{}\n", format_args!($($t)*))) };
}

mod cloud;
pub mod context;
mod nodes;
mod render;
mod table;
mod watch;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use std::collections::HashMap;
use strata_api::auth::Bearer;
use strata_api::units::{format_size, parse_size};
use strata_api::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

fn size_arg(s: &str) -> Result<u64, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    if v == 0 {
        return Err("size must be greater than 0".into());
    }
    Ok(v)
}

fn label_arg(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} must look like key=value")),
    }
}

#[derive(Debug, Parser)]
#[command(name = "stratactl", version, about = "Manage Strata volumes, pools and the cluster")]
pub struct Cli {
    /// SDK endpoint of a strata-engine. Default: the context's, else http://127.0.0.1:9020.
    #[arg(long, global = true, env = "STRATA_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Bearer token for clusters that check tokens (see `stratactl auth token`). Default: the
    /// context's, else none.
    #[arg(long, global = true, env = "STRATA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA's certificate: talk to the SDK over TLS, checking the engine's
    /// certificate against it (engines with a certificate serve their SDK over TLS only).
    /// Default: the context's, else plaintext.
    #[arg(long, global = true, env = "STRATA_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM, signed by the cluster CA) for engines that require one
    /// (--sdk-require-client-cert), with --key-file.
    #[arg(long, global = true, env = "STRATA_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<std::path::PathBuf>,
    /// The private key of --cert-file (PEM).
    #[arg(long, global = true, env = "STRATA_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<std::path::PathBuf>,
    /// Use this saved context (endpoint and token) instead of the current one.
    #[arg(long, global = true, env = "STRATA_CONTEXT")]
    pub context: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Cluster summary: nodes, capacity, volumes.
    Status,
    /// Create, list, inspect, update and delete volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Node services (pools).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Where volumes are served: attach (become the volume's target) and detach.
    #[command(subcommand)]
    Host(HostCmd),
    /// Alerts raised by the cluster's nodes (checksum mismatches and repairs, ...).
    #[command(subcommand)]
    Alerts(AlertsCmd),
    /// Saved endpoints and tokens (like pxctl's contexts), in ~/.strata/contexts.json.
    #[command(subcommand)]
    Context(ContextCmd),
    /// Tokens for clusters that check them.
    #[command(subcommand)]
    Auth(AuthCmd),
    /// Object-store (S3) credentials for cloud snapshots.
    #[command(subcommand)]
    Credentials(cloud::CredentialsCmd),
    /// Backups of volumes to an object store, and restores from it.
    #[command(subcommand)]
    Cloudsnap(cloud::CloudsnapCmd),
}

#[derive(Debug, Subcommand)]
pub enum ContextCmd {
    /// Save a context (and make it current when it is the first).
    Create {
        /// The context's name (for --context and `context use`).
        name: String,
        /// SDK endpoint (host:port or http://host:port).
        #[arg(long)]
        endpoint: String,
        /// The bearer token to send.
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the bearer token.
        #[arg(long)]
        token_file: Option<std::path::PathBuf>,
        /// The cluster CA's certificate (TLS to the SDK).
        #[arg(long)]
        ca_file: Option<std::path::PathBuf>,
    },
    /// Make a saved context the current one.
    Use {
        /// The saved context.
        name: String,
    },
    /// List saved contexts (tokens are not printed).
    List,
    /// Forget a saved context.
    Delete {
        /// The saved context.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCmd {
    /// Print a signed token (JWT) for --subject with --role, for the SDK of a cluster whose
    /// engines trust the key: the system key (--auth-system-key-file) or an issuer's key.
    Token {
        /// The key file: a shared secret (HS256, at least 32 bytes) or a PEM private key
        /// (RSA: RS256; P-256: ES256).
        #[arg(long)]
        key_file: std::path::PathBuf,
        /// Who the token is for: it owns the volumes it creates.
        #[arg(long)]
        subject: String,
        /// admin, user or view; repeat for several.
        #[arg(long = "role", value_parser = context::role_arg, default_value = "user")]
        roles: Vec<strata_api::auth::Role>,
        /// Groups the subject is in (for volumes shared with a group); repeat for several.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The issuer the token names (the engines must trust it).
        #[arg(long, default_value = strata_api::auth::SYSTEM_ISSUER)]
        issuer: String,
        /// The audience the token names (the engines' --auth-audience).
        #[arg(long, default_value = strata_api::auth::DEFAULT_AUDIENCE)]
        audience: String,
        /// How long the token is valid: seconds, or with s, m, h or d.
        #[arg(long, value_parser = context::duration_arg, default_value = "24h")]
        ttl: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum AlertsCmd {
    /// List the alerts of every reachable node, oldest first.
    Show {
        /// Only alerts of this kind (NodeOffline, PoolNearFull, ChecksumMismatch, ...; any case);
        /// repeat or comma-separate for several.
        #[arg(long = "type", value_delimiter = ',')]
        kinds: Vec<String>,
        /// Only alerts raised (last) within this long before now, e.g. 30m, 2h, 7d.
        #[arg(long, value_parser = context::duration_arg)]
        since: Option<std::time::Duration>,
    },
    /// Remove the alerts kept on every reachable node (admins).
    Purge,
}

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Serve VOL's NBD export on a node (this endpoint's node, or --node). Taking a volume over
    /// from a target that is down bumps its epoch: the old target can no longer write.
    Attach {
        /// The volume.
        name: String,
        /// Node to attach on (its SDK address is looked up in the cluster). Default: the
        /// endpoint's node.
        #[arg(long)]
        node: Option<String>,
        /// Take the volume over even if its current target is up.
        #[arg(long)]
        force: bool,
        /// An encrypted volume's passphrase file (or $STRATA_PASSPHRASE).
        #[arg(long)]
        passphrase_file: Option<std::path::PathBuf>,
    },
    /// Stop serving VOL on its target node.
    Detach {
        /// The volume.
        name: String,
        /// Detach even while NBD clients are connected.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a thin volume.
    Create(CreateArgs),
    /// List volumes.
    List,
    /// Space used: each volume's size, the pool space its data takes on its target's view
    /// (allocated extents), the share of its size, and its snapshots; then the totals.
    Usage {
        /// Only this volume.
        name: Option<String>,
    },
    /// Show one volume.
    Inspect {
        /// The volume or snapshot.
        name: String,
        /// Follow resync: progress of every replica catching up (a bar each on a terminal, a line
        /// each per look otherwise; with --json a JSON object per look), until every replica is
        /// in sync; then the volume as without --watch.
        #[arg(long)]
        watch: bool,
        /// With --watch: seconds between looks. Default: 1.
        #[arg(long, default_value_t = 1, hide_default_value = true, value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
        /// With --watch: give up (exit 1) after this many seconds. Default: 0, never.
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        timeout: u64,
    },
    /// Client I/O on a volume, as its target counts it: operations and bytes per second and mean
    /// latency over each interval (a row per interval; with --json an object per interval).
    Stats {
        /// The volume.
        name: String,
        /// Seconds per interval. Default: 1.
        #[arg(long, default_value_t = 1, hide_default_value = true, value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
        /// Intervals to show, then exit. Default: 0, until interrupted.
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        count: u64,
    },
    /// Where a volume is: its target, its replicas (in sync or not, on which nodes, zones and
    /// racks) and its NBD export.
    Locate {
        /// The volume.
        name: String,
    },
    /// Grow a volume (online) or change its labels.
    Update(UpdateArgs),
    /// Add or remove replicas online (one at a time when removing; any node forwards it to the
    /// volume's target).
    HaUpdate {
        /// The volume.
        name: String,
        /// The new number of replicas (1..3).
        #[arg(long)]
        repl: u32,
        /// Growing: the node for the new replica. Shrinking: the node whose replica goes.
        #[arg(long)]
        node: Option<String>,
        /// Then wait until every replica is in sync (a new one rebuilt), with a progress bar per
        /// replica on a terminal; exit 1 if --timeout passes first.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up (exit 1; the rebuild goes on) after this many seconds. Default:
        /// 0, never.
        #[arg(long, default_value_t = 0, hide_default_value = true, requires = "wait")]
        timeout: u64,
    },
    /// Delete a volume and free its space.
    Delete {
        /// The volume (snapshots: `snapshot delete`).
        name: String,
        /// Delete even while NBD clients are connected.
        #[arg(long)]
        force: bool,
    },
    /// Snapshots: point-in-time, read-only, sharing extents with their volume.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// A new writable volume sharing the extents of a snapshot or of a volume (now). It is
    /// placed on the source's replica nodes and left detached: `host attach` it.
    Clone {
        /// A snapshot or a volume.
        source: String,
        #[arg(long)]
        name: String,
        /// key=value; repeat for several.
        #[arg(long = "label", short, value_parser = label_arg)]
        labels: Vec<(String, String)>,
    },
    /// Replace a volume's data with one of its snapshots (detach the volume first).
    Restore {
        /// The volume whose data is replaced.
        name: String,
        #[arg(long)]
        snapshot: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a volume, crash-consistent across its replicas (no need to stop I/O).
    Create {
        /// The volume to snapshot.
        volume: String,
        #[arg(long)]
        name: String,
        /// key=value; repeat for several.
        #[arg(long = "label", short, value_parser = label_arg)]
        labels: Vec<(String, String)>,
    },
    /// List snapshots, of one volume or of all.
    List {
        /// Only this volume's snapshots (they are listed after the volume is deleted too).
        volume: Option<String>,
    },
    /// Delete a snapshot; extents no other volume shares return to the pool.
    Delete {
        /// The snapshot.
        name: String,
    },
}

/// Portworx's io_throttle_* limits; 0 = unlimited.
#[derive(Debug, Args, Default)]
pub struct QosArgs {
    /// Read IOPS limit.
    #[arg(long)]
    pub io_throttle_rd_iops: Option<u64>,
    /// Write IOPS limit.
    #[arg(long)]
    pub io_throttle_wr_iops: Option<u64>,
    /// Read bandwidth limit per second (e.g. 100MiB).
    #[arg(long, value_parser = bw_arg)]
    pub io_throttle_rd_bw: Option<u64>,
    /// Write bandwidth limit per second (e.g. 100MiB).
    #[arg(long, value_parser = bw_arg)]
    pub io_throttle_wr_bw: Option<u64>,
}

fn bw_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The new volume's name (unique in the cluster).
    pub name: String,
    /// Size: 10, 10G, 10GiB, 512MiB.
    #[arg(long, short, value_parser = size_arg)]
    pub size: u64,
    /// Replicas (1..3). Default: 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3), hide_default_value = true)]
    pub repl: u32,
    /// key=value; repeat for several.
    #[arg(long = "label", short, value_parser = label_arg)]
    pub labels: Vec<(String, String)>,
    /// Snapshot schedule, Portworx syntax: periodic=MINUTES,KEEP; daily=HH:MM,KEEP;
    /// weekly=WEEKDAY@HH:MM,KEEP; monthly=DAY@HH:MM,KEEP (UTC; several separated by ';').
    #[arg(long)]
    pub snap_schedule: Option<String>,
    #[command(flatten)]
    pub qos: QosArgs,
    /// Place replicas only on these nodes (comma-separated ids).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Place replicas only in these zones.
    #[arg(long, value_delimiter = ',')]
    pub zones: Vec<String>,
    /// Place replicas only in these racks.
    #[arg(long, value_delimiter = ',')]
    pub racks: Vec<String>,
    /// Encrypt the volume at rest (AES-256-XTS) with a key derived from --passphrase-file (or
    /// $STRATA_PASSPHRASE).
    #[arg(long)]
    pub secure: bool,
    /// File whose content is the passphrase (a key file works too; at least 8 bytes).
    #[arg(long)]
    pub passphrase_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub grants: GrantArgs,
}

/// Who may use a volume (when the SDK checks tokens).
#[derive(Debug, Args, Default)]
pub struct GrantArgs {
    /// The volume's owner (admins only: others own what they create; an admin gives a volume
    /// away with `volume update --owner`).
    #[arg(long)]
    pub owner: Option<String>,
    /// A collaborator, NAME=read|write (NAME=none removes one in `volume update`); repeat for
    /// several. Only the owner or an admin changes them.
    #[arg(long = "collaborator", value_parser = grant_arg)]
    pub collaborators: Vec<(String, String)>,
    /// A group collaborator, GROUP=read|write|none, the same way.
    #[arg(long = "group", value_parser = grant_arg)]
    pub groups: Vec<(String, String)>,
}

impl GrantArgs {
    fn given(&self) -> bool {
        self.owner.is_some() || !self.collaborators.is_empty() || !self.groups.is_empty()
    }

    /// `o` with these grants applied (`none` removes).
    fn apply(self, o: &mut pb::Ownership) {
        if let Some(owner) = self.owner {
            o.owner = owner;
        }
        for (map, grants) in [(&mut o.users, self.collaborators), (&mut o.groups, self.groups)] {
            for (name, access) in grants {
                if access == "none" {
                    map.remove(&name);
                } else {
                    map.insert(name, access);
                }
            }
        }
    }
}

/// NAME=read|write (or NAME=none, in `volume update`, to remove a collaborator).
fn grant_arg(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((n, a)) if !n.is_empty() && matches!(a, "read" | "write" | "none") => Ok((n.to_string(), a.to_string())),
        _ => Err(format!("{s:?}: give NAME=read, NAME=write (or NAME=none to remove)")),
    }
}

/// The passphrase from --passphrase-file, else $STRATA_PASSPHRASE, else none.
fn passphrase(file: &Option<std::path::PathBuf>) -> anyhow::Result<Vec<u8>> {
    match file {
        Some(f) => std::fs::read(f).with_context(|| format!("reading the passphrase file {}", f.display())),
        None => Ok(std::env::var("STRATA_PASSPHRASE").map(|s| s.into_bytes()).unwrap_or_default()),
    }
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The volume.
    pub name: String,
    /// New size (volumes only grow).
    #[arg(long, short, value_parser = size_arg)]
    pub size: Option<u64>,
    /// key=value to set, key= to remove; repeat for several.
    #[arg(long = "label", short, value_parser = label_arg)]
    pub labels: Vec<(String, String)>,
    /// Snapshot schedule, Portworx syntax: periodic=MINUTES,KEEP; daily=HH:MM,KEEP;
    /// weekly=WEEKDAY@HH:MM,KEEP; monthly=DAY@HH:MM,KEEP (UTC; several separated by ';').
    /// An empty value removes it.
    #[arg(long)]
    pub snap_schedule: Option<String>,
    #[command(flatten)]
    pub qos: QosArgs,
    #[command(flatten)]
    pub grants: GrantArgs,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// List nodes.
    List,
    /// Show one node.
    Inspect {
        /// The node's id.
        node: String,
    },
    /// Decommission a node: move every replica and volume it holds to other nodes (a new
    /// replica is rebuilt before the node's is dropped), then remove it from the cluster. The
    /// node must be in maintenance (`service maintenance --enter --node NODE`) or offline.
    /// Refused, changing nothing, when a volume's replica has nowhere to go.
    Delete {
        /// The node's id (send the command to another node's engine).
        node: String,
        /// Seconds to wait for each new replica to be in sync. Default: 3600.
        #[arg(long, default_value_t = 3600, hide_default_value = true)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Storage pools.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Maintenance mode: entering moves every volume the node serves to a node holding an
    /// in-sync replica (refused while a volume has clients there: drain its pods first); the
    /// node then serves no volume and takes no new replica, and its replicas resync when it is
    /// back. Exiting makes it a normal node again.
    Maintenance(MaintenanceArgs),
    /// This node's drives (the devices of its pool).
    #[command(subcommand)]
    Drive(DriveCmd),
}

#[derive(Debug, Subcommand)]
pub enum DriveCmd {
    /// Add a drive to the pool of the node --endpoint reaches, while it runs: a blank block
    /// device (no partition table, filesystem or other pool) or a file; new extents spread onto
    /// it at once, and the engine opens it at every start from then on.
    Add {
        /// Absolute path of the device or file on that node.
        path: String,
        /// Create a missing file of this size (e.g. 10GiB).
        #[arg(long, value_parser = size_arg)]
        size: Option<u64>,
    },
    /// Show the drives: size, extents, free extents, state.
    Show,
}

#[derive(Debug, Args)]
pub struct MaintenanceArgs {
    /// Enter maintenance.
    #[arg(long, conflicts_with = "exit", required_unless_present = "exit")]
    pub enter: bool,
    /// Exit maintenance.
    #[arg(long)]
    pub exit: bool,
    /// The node (default: the one --endpoint reaches).
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Show the pools and their devices.
    Show,
    /// Grow the pool of the node --endpoint reaches by a new file device of --size, beside its
    /// file devices (Portworx's `--operation add-disk`; resizing a device in place is not
    /// supported). For block devices use `service drive add`.
    Expand {
        /// Bytes to add (e.g. 20GiB).
        #[arg(long, value_parser = size_arg)]
        size: u64,
    },
}

/// The client certificate and key from --cert-file/--key-file, once.
static IDENTITY: std::sync::OnceLock<Option<(std::path::PathBuf, std::path::PathBuf)>> = std::sync::OnceLock::new();

/// Set while calls go without TLS (no CA given): a broken stream then likely means the engine
/// serves TLS, and the error says so.
static PLAINTEXT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A channel to the SDK that sends the token with every call.
type Sdk = InterceptedService<Channel, Bearer>;

async fn connect(target: &context::Context, endpoint: &str) -> anyhow::Result<Sdk> {
    let ep = strata_api::endpoint_uri(endpoint);
    let bearer = Bearer::new(Some(&target.token)).map_err(|e| anyhow!("--token: {e}"))?;
    let identity = IDENTITY.get().and_then(|i| i.as_ref()).map(|(c, k)| (c.as_path(), k.as_path()));
    let tls = match target.ca_file.as_deref().filter(|f| !f.is_empty()) {
        Some(f) => Some(strata_api::tls::ClientTls::from_files(std::path::Path::new(f), identity).map_err(|e| anyhow!("--ca-file {e}"))?),
        None if identity.is_some() => bail!("--cert-file needs --ca-file (the client certificate is sent over TLS)"),
        None => None,
    };
    PLAINTEXT.store(tls.is_none(), std::sync::atomic::Ordering::Relaxed);
    let (connect, call) = (std::time::Duration::from_secs(5), std::time::Duration::from_secs(120));
    let ch = strata_api::tls::channel(&ep, tls.as_ref(), connect, call).await.map_err(|e| {
        let hint = if tls.is_none() { "; an engine with a certificate serves TLS only: pass --ca-file" } else { "" };
        fail(
            "unavailable",
            format!("cannot reach the Strata engine at {ep}: {e} (is strata-engine running? set --endpoint or STRATA_ENDPOINT{hint})"),
        )
    })?;
    Ok(InterceptedService::new(ch, bearer))
}

/// Writes to stdout; a closed pipe ends the process with status 0 (its reader wanted no more).
#[doc(hidden)]
pub fn out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|_| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}

/// Volumes listed a page at a time: an answer of every volume at once grows past gRPC's message
/// limits in a large cluster, and one page costs the engine one range read of the store.
async fn list_volumes(c: &mut pb::volume_service_client::VolumeServiceClient<Sdk>) -> anyhow::Result<Vec<pb::Volume>> {
    let (mut all, mut token) = (Vec::new(), String::new());
    loop {
        let page = c.list(pb::ListVolumesRequest { max_entries: LIST_PAGE, starting_token: token }).await.map_err(status_err)?.into_inner();
        all.extend(page.volumes);
        if page.next_token.is_empty() {
            return Ok(all);
        }
        token = page.next_token;
    }
}

/// Volumes per page of `volume list`.
const LIST_PAGE: u32 = 1000;

/// How often `volume ha-update --wait` looks at the volume.
const HA_UPDATE_LOOK: std::time::Duration = std::time::Duration::from_millis(50);

/// One volume (or snapshot) as the SDK shows it.
async fn inspect_volume(c: &mut pb::volume_service_client::VolumeServiceClient<Sdk>, name: &str) -> anyhow::Result<pb::Volume> {
    let v = c.inspect(pb::InspectVolumeRequest { name: name.to_string() }).await.map_err(status_err)?.into_inner();
    v.volume.ok_or_else(|| anyhow!("engine returned no volume"))
}

/// Turns an SDK status into a message that says what happened.
fn status_err(s: tonic::Status) -> anyhow::Error {
    // A plaintext client talking to an engine that serves TLS sees only a broken stream.
    let broken = s.message().contains("h2 protocol error") || s.message().contains("transport error");
    if PLAINTEXT.load(std::sync::atomic::Ordering::Relaxed) && s.code() == tonic::Code::Unknown && broken {
        let why = format!(
            "the engine did not speak plaintext gRPC ({}): an engine with a certificate serves its SDK over TLS only; pass --ca-file (or set STRATA_CA_FILE) with the cluster CA's certificate",
            s.message()
        );
        return fail("unavailable", why);
    }
    let (code, text) = match s.code() {
        tonic::Code::NotFound => ("not_found", "not found"),
        tonic::Code::AlreadyExists => ("already_exists", "already exists"),
        tonic::Code::InvalidArgument => ("invalid_argument", "invalid argument"),
        tonic::Code::ResourceExhausted => ("out_of_space", "out of space"),
        tonic::Code::FailedPrecondition => ("failed_precondition", "not possible now"),
        tonic::Code::Unavailable => ("unavailable", "engine unavailable"),
        tonic::Code::Unauthenticated => ("unauthenticated", "not authenticated (pass --token, set STRATA_TOKEN or use a context)"),
        tonic::Code::PermissionDenied => ("permission_denied", "permission denied"),
        _ => ("engine_error", "engine error"),
    };
    fail(code, format!("{text}: {}", s.message()))
}

/// A failed command, with a stable machine-readable `code` (`not_found`, `already_exists`,
/// `invalid_argument`, `out_of_space`, `failed_precondition`, `unavailable`,
/// `unauthenticated`, `permission_denied`, `engine_error`); other errors have the code `error`.
#[derive(Debug)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// A failed command with `code` (see `Failure`).
fn fail(code: &'static str, message: String) -> anyhow::Error {
    Failure { code, message }.into()
}

/// How a failed command is reported: `error: MESSAGE` on stderr, or under `--json` the document
/// `{"error": {"code": CODE, "message": MESSAGE}}` on stdout (what a script parses).
pub fn report(e: &anyhow::Error, json: bool) {
    let code = e.downcast_ref::<Failure>().map_or("error", |f| f.code);
    if json {
        out(format_args!("{}\n", serde_json::json!({"error": {"code": code, "message": format!("{e:#}")}})));
    } else {
        eprintln!("error: {e:#}");
    }
}

async fn snapshot_cmd(c: &mut pb::volume_service_client::VolumeServiceClient<Sdk>, cmd: SnapshotCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create { volume, name, labels } => {
            let req = pb::SnapshotCreateRequest { volume, name, labels: labels.into_iter().collect() };
            let v = c.snapshot_create(req).await.map_err(status_err)?.into_inner().snapshot.ok_or_else(|| anyhow!("engine returned no snapshot"))?;
            print!(
                "{}",
                render::volume_done(&v, json, |v| format!("Snapshot {} of {} created on {}", v.name, v.snapshot_of, v.in_sync_nodes.join(",")))
            );
        }
        SnapshotCmd::List { volume } => {
            let snaps =
                c.snapshot_list(pb::SnapshotListRequest { volume: volume.unwrap_or_default() }).await.map_err(status_err)?.into_inner().snapshots;
            print!("{}", render::snapshot_list(&snaps, json));
        }
        SnapshotCmd::Delete { name } => {
            let v = c.inspect(pb::InspectVolumeRequest { name: name.clone() }).await.map_err(status_err)?.into_inner().volume;
            if v.is_some_and(|v| v.snapshot_of.is_empty()) {
                return Err(fail(
                    "invalid_argument",
                    format!("{name} is a volume, not a snapshot; delete volumes with `stratactl volume delete {name}`"),
                ));
            }
            c.delete(pb::DeleteVolumeRequest { name: name.clone(), force: false }).await.map_err(status_err)?;
            print!("{}", render::deleted(&name, json, &format!("Snapshot {name} deleted.")));
        }
    }
    Ok(())
}

/// Commands that need no engine: contexts and tokens.
fn run_local(cmd: &Cmd, json: bool) -> anyhow::Result<bool> {
    match cmd {
        Cmd::Context(c) => {
            let mut all = context::Contexts::load()?;
            match c {
                ContextCmd::Create { name, endpoint, token, token_file, ca_file } => {
                    let token = match (token, token_file) {
                        (Some(t), _) => t.trim().to_string(),
                        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?.trim().to_string(),
                        (None, None) => String::new(),
                    };
                    let ca_file = match ca_file {
                        Some(f) => std::fs::canonicalize(f).with_context(|| format!("--ca-file {}", f.display()))?.to_string_lossy().into_owned(),
                        None => String::new(),
                    };
                    all.contexts.insert(
                        name.clone(),
                        context::Context { endpoint: endpoint.clone(), token, ca_file: Some(ca_file).filter(|f| !f.is_empty()) },
                    );
                    if all.current.is_empty() {
                        all.current = name.clone();
                    }
                    all.save()?;
                    println!("context {name} saved in {}{}", context::config_path().display(), if all.current == *name { " (current)" } else { "" });
                }
                ContextCmd::Use { name } => {
                    if !all.contexts.contains_key(name) {
                        bail!("no context named {name:?}; `stratactl context list` shows the saved ones");
                    }
                    all.current = name.clone();
                    all.save()?;
                    println!("current context: {name}");
                }
                ContextCmd::List => print!("{}", render::contexts(&all, json)),
                ContextCmd::Delete { name } => {
                    if all.contexts.remove(name).is_none() {
                        bail!("no context named {name:?}");
                    }
                    if all.current == *name {
                        all.current.clear();
                    }
                    all.save()?;
                    println!("context {name} deleted");
                }
            }
            Ok(true)
        }
        Cmd::Auth(AuthCmd::Token { key_file, subject, roles, groups, issuer, audience, ttl }) => {
            println!("{}", context::mint(key_file, subject, issuer, audience, roles, groups, *ttl)?);
            Ok(true)
        }
        _ => Ok(false),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let json = cli.json;
    if run_local(&cli.command, json)? {
        return Ok(());
    }
    let ca = cli.ca_file.as_ref().map(|p| p.to_string_lossy().into_owned());
    let _ = IDENTITY.set(cli.cert_file.clone().zip(cli.key_file.clone()));
    let target = context::resolve(cli.endpoint.as_deref(), cli.token.as_deref(), ca.as_deref(), cli.context.as_deref())?;
    let ch = connect(&target, &target.endpoint).await?;
    match cli.command {
        Cmd::Context(_) | Cmd::Auth(_) => {}
        Cmd::Status => {
            let s =
                pb::cluster_service_client::ClusterServiceClient::new(ch).status(pb::ClusterStatusRequest {}).await.map_err(status_err)?.into_inner();
            print!("{}", render::status(&s, json));
        }
        Cmd::Volume(cmd) => {
            let mut c = pb::volume_service_client::VolumeServiceClient::new(ch.clone()).max_decoding_message_size(strata_api::MAX_ANSWER_BYTES);
            match cmd {
                VolumeCmd::Create(a) => {
                    let q = &a.qos;
                    let qos = pb::QosLimits {
                        rd_iops: q.io_throttle_rd_iops.unwrap_or(0),
                        wr_iops: q.io_throttle_wr_iops.unwrap_or(0),
                        rd_bw: q.io_throttle_rd_bw.unwrap_or(0),
                        wr_bw: q.io_throttle_wr_bw.unwrap_or(0),
                    };
                    let mut labels: HashMap<String, String> = a.labels.into_iter().collect();
                    if let Some(s) = a.snap_schedule {
                        labels.insert("snap_schedule".into(), s);
                    }
                    let spec = pb::VolumeSpec {
                        size_bytes: a.size,
                        repl: a.repl,
                        labels,
                        qos: Some(qos),
                        nodes: a.nodes,
                        zones: a.zones,
                        racks: a.racks,
                        secure: a.secure,
                        ownership: a.grants.given().then(|| {
                            let mut o = pb::Ownership::default();
                            a.grants.apply(&mut o);
                            o
                        }),
                        ..Default::default()
                    };
                    let passphrase = passphrase(&a.passphrase_file)?;
                    if a.secure && passphrase.is_empty() {
                        bail!("--secure needs a passphrase: pass --passphrase-file FILE or set STRATA_PASSPHRASE");
                    }
                    let v = c.create(pb::CreateVolumeRequest { name: a.name, spec: Some(spec), passphrase }).await.map_err(status_err)?.into_inner();
                    let v = v.volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    print!("{}", render::volume_done(&v, json, |v| format!("Volume successfully created: {} ({})", v.name, v.id)));
                }
                VolumeCmd::List => {
                    let mut vols = list_volumes(&mut c).await?;
                    vols.retain(|v| v.snapshot_of.is_empty());
                    print!("{}", render::volume_list(&vols, json));
                }
                VolumeCmd::Usage { name } => {
                    let all = list_volumes(&mut c).await?;
                    if let Some(n) = &name {
                        if !all.iter().any(|v| &v.name == n && v.snapshot_of.is_empty()) {
                            return Err(fail("not_found", format!("no volume {n:?} (stratactl volume list shows them)")));
                        }
                    }
                    print!("{}", render::volume_usage(&all, name.as_deref(), json));
                }
                VolumeCmd::Inspect { name, watch: false, .. } => {
                    let v = inspect_volume(&mut c, &name).await?;
                    print!("{}", render::volume_inspect(&v, json));
                }
                VolumeCmd::Inspect { name, watch: true, interval, timeout } => {
                    let report = if json { watch::Report::Json } else { watch::Report::Lines };
                    let v = watch::resync(&mut c, &name, report, std::time::Duration::from_secs(interval), std::time::Duration::from_secs(timeout))
                        .await?;
                    print!("{}", render::volume_inspect(&v, json));
                }
                VolumeCmd::Stats { name, interval, count } => {
                    watch::stats(&mut c, &name, json, std::time::Duration::from_secs(interval), count).await?;
                }
                VolumeCmd::Locate { name } => {
                    let v = inspect_volume(&mut c, &name).await?;
                    let nodes = pb::node_service_client::NodeServiceClient::new(ch.clone())
                        .list(pb::ListNodesRequest {})
                        .await
                        .map_err(status_err)?
                        .into_inner()
                        .nodes;
                    print!("{}", render::volume_locate(&v, &nodes, json));
                }
                VolumeCmd::Update(a) => {
                    let q = &a.qos;
                    let qos_given = q.io_throttle_rd_iops.is_some()
                        || q.io_throttle_wr_iops.is_some()
                        || q.io_throttle_rd_bw.is_some()
                        || q.io_throttle_wr_bw.is_some();
                    let grants = a.grants.given();
                    if a.size.is_none() && a.labels.is_empty() && !qos_given && a.snap_schedule.is_none() && !grants {
                        bail!("nothing to update: pass --size, --label key=value, --snap-schedule, --io-throttle-*, --owner and/or --collaborator");
                    }
                    // What the message says changed: only what was asked.
                    let mut changed = Vec::new();
                    if let Some(size) = a.size {
                        changed.push(format!("size {}", format_size(size)));
                    }
                    if !a.labels.is_empty() {
                        changed.push(format!("labels {}", a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")));
                    }
                    if a.snap_schedule.is_some() {
                        changed.push("snapshot schedule".to_string());
                    }
                    if qos_given {
                        changed.push("QoS limits".to_string());
                    }
                    if grants {
                        changed.push("owner and collaborators".to_string());
                    }
                    let ownership = if grants {
                        let cur = c.inspect(pb::InspectVolumeRequest { name: a.name.clone() }).await.map_err(status_err)?.into_inner().volume;
                        let mut o = cur.and_then(|v| v.spec).and_then(|s| s.ownership).unwrap_or_default();
                        a.grants.apply(&mut o);
                        Some(o)
                    } else {
                        None
                    };
                    let mut labels: HashMap<String, String> = a.labels.into_iter().collect();
                    if let Some(s) = a.snap_schedule {
                        labels.insert("snap_schedule".into(), s);
                    }
                    let req = pb::UpdateVolumeRequest {
                        name: a.name,
                        size_bytes: a.size.unwrap_or(0),
                        labels,
                        io_throttle_rd_iops: q.io_throttle_rd_iops,
                        io_throttle_wr_iops: q.io_throttle_wr_iops,
                        io_throttle_rd_bw: q.io_throttle_rd_bw,
                        io_throttle_wr_bw: q.io_throttle_wr_bw,
                        ownership,
                    };
                    let v = c.update(req).await.map_err(status_err)?.into_inner();
                    let v = v.volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    print!("{}", render::volume_done(&v, json, |v| format!("Volume {} updated: {}", v.name, changed.join(", "))));
                }
                VolumeCmd::HaUpdate { name, repl, node, wait, timeout } => {
                    let before = c.inspect(pb::InspectVolumeRequest { name: name.clone() }).await.map_err(status_err)?.into_inner();
                    let before = before.volume.map(|v| v.replica_nodes).unwrap_or_default();
                    let req = pb::HaUpdateRequest { name: name.clone(), repl, node: node.unwrap_or_default() };
                    let v = c.ha_update(req).await.map_err(status_err)?.into_inner();
                    let mut v = v.volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    if wait {
                        // Looks often enough that the command ends within a fraction of a rebuild
                        // (a GiB takes seconds), quietly unless on a terminal.
                        v = watch::resync(&mut c, &name, watch::Report::Terminal, HA_UPDATE_LOOK, std::time::Duration::from_secs(timeout)).await?;
                    }
                    print!("{}", render::volume_done(&v, json, |v| render::ha_update_text(v, &before)));
                }
                VolumeCmd::Delete { name, force } => {
                    let v = c.inspect(pb::InspectVolumeRequest { name: name.clone() }).await.map_err(status_err)?.into_inner().volume;
                    if let Some(of) = v.map(|v| v.snapshot_of).filter(|of| !of.is_empty()) {
                        return Err(fail(
                            "invalid_argument",
                            format!("{name} is a snapshot of {of}, not a volume; delete snapshots with `stratactl snapshot delete {name}`"),
                        ));
                    }
                    c.delete(pb::DeleteVolumeRequest { name: name.clone(), force }).await.map_err(status_err)?;
                    print!("{}", render::deleted(&name, json, &format!("Volume {name} successfully deleted.")));
                }
                VolumeCmd::Snapshot(cmd) => snapshot_cmd(&mut c, cmd, json).await?,
                VolumeCmd::Clone { source, name, labels } => {
                    let req = pb::CloneVolumeRequest { source, name, labels: labels.into_iter().collect(), ownership: None };
                    let v = c.clone_volume(req).await.map_err(status_err)?.into_inner().volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    print!(
                        "{}",
                        render::volume_done(&v, json, |v| format!(
                            "Volume {} cloned on {} (detached: stratactl host attach {})",
                            v.name,
                            v.replica_nodes.join(","),
                            v.name
                        ))
                    );
                }
                VolumeCmd::Restore { name, snapshot } => {
                    let req = pb::RestoreVolumeRequest { name, snapshot: snapshot.clone() };
                    let v = c.restore(req).await.map_err(status_err)?.into_inner().volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    print!("{}", render::volume_done(&v, json, |v| format!("Volume {} restored from snapshot {snapshot}", v.name)));
                }
            }
        }
        Cmd::Host(cmd) => {
            let (name, v) = match cmd {
                HostCmd::Attach { name, node, force, passphrase_file } => {
                    let passphrase = passphrase(&passphrase_file)?;
                    let ch = match node {
                        Some(id) => {
                            let nodes = pb::node_service_client::NodeServiceClient::new(ch)
                                .list(pb::ListNodesRequest {})
                                .await
                                .map_err(status_err)?
                                .into_inner()
                                .nodes;
                            let n = nodes
                                .iter()
                                .find(|n| n.id == id)
                                .ok_or_else(|| anyhow!("node {id} is not in the cluster; see stratactl cluster list"))?;
                            connect(&target, &n.sdk_address).await?
                        }
                        None => ch,
                    };
                    let mut c = pb::volume_service_client::VolumeServiceClient::new(ch);
                    (name.clone(), c.attach(pb::AttachVolumeRequest { name, force, passphrase }).await.map_err(status_err)?.into_inner().volume)
                }
                HostCmd::Detach { name, force } => {
                    let mut c = pb::volume_service_client::VolumeServiceClient::new(ch);
                    (name.clone(), c.detach(pb::DetachVolumeRequest { name, force }).await.map_err(status_err)?.into_inner().volume)
                }
            };
            let v = v.ok_or_else(|| anyhow!("engine returned no volume"))?;
            print!("{}", render::attachment(&name, &v, json));
        }
        Cmd::Cluster(ClusterCmd::List) => {
            let nodes =
                pb::node_service_client::NodeServiceClient::new(ch).list(pb::ListNodesRequest {}).await.map_err(status_err)?.into_inner().nodes;
            print!("{}", render::nodes(&nodes, json));
        }
        Cmd::Cluster(ClusterCmd::Inspect { node }) => {
            let nodes =
                pb::node_service_client::NodeServiceClient::new(ch).list(pb::ListNodesRequest {}).await.map_err(status_err)?.into_inner().nodes;
            let Some(n) = nodes.iter().find(|n| n.id == node) else {
                let known: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
                return Err(fail("not_found", format!("no node {node:?} in the cluster (nodes: {})", known.join(", "))));
            };
            print!("{}", render::node_inspect(n, json));
        }
        Cmd::Alerts(AlertsCmd::Purge) => {
            let r = pb::alert_service_client::AlertServiceClient::new(ch)
                .purge(pb::PurgeAlertsRequest { local_only: false })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                print!("{}", render::doc(serde_json::json!({"purged": r.purged, "unreachable": r.unreachable})));
            } else {
                println!("Purged {} alert(s).", r.purged);
            }
            for w in &r.unreachable {
                eprintln!("warning: not purged on {w}");
            }
        }
        Cmd::Alerts(AlertsCmd::Show { kinds, since }) => {
            let mut r = pb::alert_service_client::AlertServiceClient::new(ch)
                .list(pb::ListAlertsRequest { local_only: false })
                .await
                .map_err(status_err)?
                .into_inner();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            render::keep_alerts(&mut r.alerts, &kinds, since.map_or(0, |d| now.saturating_sub(d.as_secs())));
            let (out, warnings) = render::alerts(&r, json);
            print!("{out}");
            for w in warnings {
                eprintln!("{w}");
            }
        }
        Cmd::Credentials(cmd) => cloud::credentials(ch, cmd, json).await?,
        Cmd::Cloudsnap(cmd) => cloud::cloudsnap(ch, cmd, json).await?,
        Cmd::Service(ServiceCmd::Maintenance(m)) => nodes::maintenance(ch, m.node, m.enter, json).await?,
        Cmd::Cluster(ClusterCmd::Delete { node, timeout }) => nodes::decommission(ch, node, std::time::Duration::from_secs(timeout), json).await?,
        Cmd::Service(ServiceCmd::Drive(DriveCmd::Add { path, size })) => {
            let req = pb::AddDriveRequest { path: path.clone(), size_bytes: size.unwrap_or(0) };
            let pool = pb::pool_service_client::PoolServiceClient::new(ch).add_drive(req).await.map_err(status_err)?.into_inner().pool;
            let pool = pool.ok_or_else(|| anyhow!("engine returned no pool"))?;
            if json {
                print!("{}", render::pools(&[pool], true));
            } else {
                println!("Drive {path} added: the pool has {} ({} used).", format_size(pool.total_bytes), format_size(pool.used_bytes));
            }
        }
        Cmd::Service(ServiceCmd::Pool(PoolCmd::Expand { size })) => {
            let r = pb::pool_service_client::PoolServiceClient::new(ch)
                .expand(pb::ExpandPoolRequest { size_bytes: size })
                .await
                .map_err(status_err)?
                .into_inner();
            let pool = r.pool.ok_or_else(|| anyhow!("engine returned no pool"))?;
            if json {
                print!("{}", render::pools(&[pool], true));
            } else {
                println!("Pool expanded by {} with the file device {}: it has {}.", format_size(size), r.path, format_size(pool.total_bytes));
            }
        }
        Cmd::Service(ServiceCmd::Pool(PoolCmd::Show)) | Cmd::Service(ServiceCmd::Drive(DriveCmd::Show)) => {
            let pools =
                pb::pool_service_client::PoolServiceClient::new(ch).list(pb::ListPoolsRequest {}).await.map_err(status_err)?.into_inner().pools;
            print!("{}", render::pools(&pools, json));
        }
    }
    Ok(())
}
