//! stratactl: pxctl-style command line over the Strata SDK.

mod table;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::collections::HashMap;
use strata_api::units::{format_size, parse_size};
use strata_api::v1 as pb;
use table::Table;
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
    /// SDK endpoint of a strata-engine. Default: http://127.0.0.1:9020.
    #[arg(long, global = true, env = "STRATA_ENDPOINT", default_value = "http://127.0.0.1:9020")]
    pub endpoint: String,
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
}

#[derive(Debug, Subcommand)]
pub enum AlertsCmd {
    /// List the alerts of every reachable node, oldest first.
    Show,
}

#[derive(Debug, Subcommand)]
pub enum HostCmd {
    /// Serve VOL's NBD export on a node (this endpoint's node, or --node). Taking a volume over
    /// from a target that is down bumps its epoch: the old target can no longer write.
    Attach {
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
    /// Show one volume.
    Inspect { name: String },
    /// Grow a volume (online) or change its labels.
    Update(UpdateArgs),
    /// Add or remove replicas online (ask the volume's target node: --endpoint).
    HaUpdate {
        name: String,
        /// The new number of replicas (1..3).
        #[arg(long)]
        repl: u32,
        /// Growing: the node for the new replica. Shrinking: the node whose replica goes.
        #[arg(long)]
        node: Option<String>,
    },
    /// Delete a volume and free its space.
    Delete {
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
        name: String,
        #[arg(long)]
        snapshot: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a volume, crash-consistent across its replicas (no need to stop I/O).
    Create {
        volume: String,
        #[arg(long)]
        name: String,
        /// key=value; repeat for several.
        #[arg(long = "label", short, value_parser = label_arg)]
        labels: Vec<(String, String)>,
    },
    /// List snapshots, of one volume or of all.
    List { volume: Option<String> },
    /// Delete a snapshot; extents no other volume shares return to the pool.
    Delete { name: String },
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
    pub name: String,
    /// Size: 10, 10G, 10GiB, 512MiB.
    #[arg(long, short, value_parser = size_arg)]
    pub size: u64,
    /// Replicas (1..3). Default: 1.
    #[arg(long, default_value_t = 1)]
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
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// List nodes.
    List,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Storage pools.
    #[command(subcommand)]
    Pool(PoolCmd),
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Show the pools and their devices.
    Show,
}

async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    let ep = strata_api::endpoint_uri(endpoint);
    Channel::from_shared(ep.clone())
        .map_err(|e| anyhow!("invalid endpoint {endpoint:?}: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the Strata engine at {ep}: is strata-engine running? (set --endpoint or STRATA_ENDPOINT)"))
}

/// Turns an SDK status into a message that says what happened.
fn status_err(s: tonic::Status) -> anyhow::Error {
    let code = match s.code() {
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::ResourceExhausted => "out of space",
        tonic::Code::FailedPrecondition => "not possible now",
        tonic::Code::Unavailable => "engine unavailable",
        _ => "engine error",
    };
    anyhow!("{code}: {}", s.message())
}

fn volume_json(v: &pb::Volume) -> serde_json::Value {
    let spec = v.spec.clone().unwrap_or_default();
    json!({
        "id": v.id.to_string(),
        "name": v.name,
        "size_bytes": spec.size_bytes,
        "repl": spec.repl,
        "labels": spec.labels,
        "qos": spec.qos.map(|q| json!({"io_throttle_rd_iops": q.rd_iops, "io_throttle_wr_iops": q.wr_iops, "io_throttle_rd_bw": q.rd_bw, "io_throttle_wr_bw": q.wr_bw})),
        "used_bytes": v.used_bytes,
        "state": v.state,
        "connections": v.connections,
        "attached_node": v.attached_node,
        "secure": v.spec.as_ref().is_some_and(|s| s.secure),
        "replica_nodes": v.replica_nodes,
        "in_sync_nodes": v.in_sync_nodes,
        "epoch": v.epoch,
        "replica_status": v.replica_status.iter().map(|r| json!({
            "node": r.node, "state": r.state, "dirty_bytes": r.dirty_bytes, "copied_bytes": r.copied_bytes,
        })).collect::<Vec<_>>(),
        "pool_uuid": v.pool_uuid,
        "created_unix": v.created_unix,
        "snapshot_of": (!v.snapshot_of.is_empty()).then_some(&v.snapshot_of),
    })
}

fn labels_text(l: &HashMap<String, String>) -> String {
    let mut v: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.sort();
    v.join(",")
}

fn qos_text(q: Option<&pb::QosLimits>) -> String {
    let Some(q) = q else { return "unlimited".into() };
    let mut parts = Vec::new();
    if q.rd_iops > 0 {
        parts.push(format!("read {} IOPS", q.rd_iops));
    }
    if q.wr_iops > 0 {
        parts.push(format!("write {} IOPS", q.wr_iops));
    }
    if q.rd_bw > 0 {
        parts.push(format!("read {}/s", format_size(q.rd_bw)));
    }
    if q.wr_bw > 0 {
        parts.push(format!("write {}/s", format_size(q.wr_bw)));
    }
    if parts.is_empty() {
        "unlimited".into()
    } else {
        parts.join(", ")
    }
}

fn print_volume(v: &pb::Volume) {
    let spec = v.spec.clone().unwrap_or_default();
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, val) in [
        ("Name", v.name.clone()),
        ("ID", v.id.to_string()),
        ("Size", format_size(spec.size_bytes)),
        ("Used", format_size(v.used_bytes)),
        ("Replicas", spec.repl.to_string()),
        ("State", v.state.clone()),
        ("Attached on", if v.attached_node.is_empty() { "(detached)".into() } else { v.attached_node.clone() }),
        ("Epoch", v.epoch.to_string()),
        ("Replica nodes", v.replica_nodes.join(",")),
        ("In sync", v.in_sync_nodes.join(",")),
        ("Verifying replicas", if v.verifying { "yes (after an unclean change of target)".into() } else { "no".into() }),
        ("NBD clients", v.connections.to_string()),
        ("Labels", labels_text(&spec.labels)),
        ("QoS", qos_text(spec.qos.as_ref())),
        ("Encrypted", if spec.secure { "yes (AES-256-XTS)".into() } else { "no".into() }),
        ("Pool", v.pool_uuid.clone()),
        ("Snapshot of", if v.snapshot_of.is_empty() { "-".into() } else { v.snapshot_of.clone() }),
    ] {
        t.row(vec![k.into(), val]);
    }
    for r in &v.replica_status {
        let mut line = r.state.clone();
        if r.dirty_bytes > 0 || r.copied_bytes > 0 {
            line += &format!(" ({} to copy, {} copied)", format_size(r.dirty_bytes), format_size(r.copied_bytes));
        }
        t.row(vec![format!("Replica {}", r.node), line]);
    }
    print!("{}", t.render());
}

async fn snapshot_cmd(
    c: &mut pb::volume_service_client::VolumeServiceClient<tonic::transport::Channel>,
    cmd: SnapshotCmd,
    json: bool,
) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create { volume, name, labels } => {
            let req = pb::SnapshotCreateRequest { volume, name, labels: labels.into_iter().collect() };
            let v = c.snapshot_create(req).await.map_err(status_err)?.into_inner().snapshot.ok_or_else(|| anyhow!("engine returned no snapshot"))?;
            if json {
                println!("{}", volume_json(&v));
            } else {
                println!("Snapshot {} of {} created on {}", v.name, v.snapshot_of, v.in_sync_nodes.join(","));
            }
        }
        SnapshotCmd::List { volume } => {
            let snaps =
                c.snapshot_list(pb::SnapshotListRequest { volume: volume.unwrap_or_default() }).await.map_err(status_err)?.into_inner().snapshots;
            if json {
                println!("{}", serde_json::Value::Array(snaps.iter().map(volume_json).collect()));
            } else {
                let mut t = Table::new(&["ID", "NAME", "VOLUME", "SIZE", "CREATED", "NODES", "STATE", "LABELS"]);
                for v in &snaps {
                    let spec = v.spec.clone().unwrap_or_default();
                    t.row(vec![
                        v.id.to_string(),
                        v.name.clone(),
                        v.snapshot_of.clone(),
                        format_size(spec.size_bytes),
                        strata_api::schedule::format_unix(v.created_unix),
                        v.in_sync_nodes.join(","),
                        v.state.clone(),
                        labels_text(&spec.labels),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        SnapshotCmd::Delete { name } => {
            let v = c.inspect(pb::InspectVolumeRequest { name: name.clone() }).await.map_err(status_err)?.into_inner().volume;
            if v.is_some_and(|v| v.snapshot_of.is_empty()) {
                bail!("{name} is a volume, not a snapshot; delete volumes with `stratactl volume delete {name}`");
            }
            c.delete(pb::DeleteVolumeRequest { name: name.clone(), force: false }).await.map_err(status_err)?;
            if json {
                println!("{}", json!({"deleted": name}));
            } else {
                println!("Snapshot {name} deleted.");
            }
        }
    }
    Ok(())
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let ch = connect(&cli.endpoint).await?;
    let json = cli.json;
    match cli.command {
        Cmd::Status => {
            let s =
                pb::cluster_service_client::ClusterServiceClient::new(ch).status(pb::ClusterStatusRequest {}).await.map_err(status_err)?.into_inner();
            if json {
                println!(
                    "{}",
                    json!({
                        "cluster_id": s.cluster_id, "status": s.status, "version": s.version, "metadata_store": s.metadata_store,
                        "total_bytes": s.total_bytes, "used_bytes": s.used_bytes, "volume_count": s.volume_count,
                        "nodes": s.nodes.iter().map(node_json).collect::<Vec<_>>(),
                    })
                );
            } else {
                println!("Status: {}", s.status);
                println!("Cluster ID: {}", s.cluster_id);
                println!("Metadata store: {}", s.metadata_store);
                println!("Version: {}", s.version);
                println!("Capacity: {} used of {}", format_size(s.used_bytes), format_size(s.total_bytes));
                println!("Volumes: {}", s.volume_count);
                println!();
                print!("{}", nodes_table(&s.nodes));
            }
        }
        Cmd::Volume(cmd) => {
            let mut c = pb::volume_service_client::VolumeServiceClient::new(ch);
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
                        ..Default::default()
                    };
                    let passphrase = passphrase(&a.passphrase_file)?;
                    if a.secure && passphrase.is_empty() {
                        bail!("--secure needs a passphrase: pass --passphrase-file FILE or set STRATA_PASSPHRASE");
                    }
                    let v = c.create(pb::CreateVolumeRequest { name: a.name, spec: Some(spec), passphrase }).await.map_err(status_err)?.into_inner();
                    let v = v.volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    if json {
                        println!("{}", volume_json(&v));
                    } else {
                        println!("Volume successfully created: {} ({})", v.name, v.id);
                    }
                }
                VolumeCmd::List => {
                    let mut vols = c.list(pb::ListVolumesRequest {}).await.map_err(status_err)?.into_inner().volumes;
                    vols.retain(|v| v.snapshot_of.is_empty());
                    if json {
                        println!("{}", serde_json::Value::Array(vols.iter().map(volume_json).collect()));
                    } else {
                        let mut t = Table::new(&["ID", "NAME", "SIZE", "USED", "HA", "STATE", "CLIENTS", "LABELS"]);
                        for v in &vols {
                            let spec = v.spec.clone().unwrap_or_default();
                            t.row(vec![
                                v.id.to_string(),
                                v.name.clone(),
                                format_size(spec.size_bytes),
                                format_size(v.used_bytes),
                                spec.repl.to_string(),
                                v.state.clone(),
                                v.connections.to_string(),
                                labels_text(&spec.labels),
                            ]);
                        }
                        print!("{}", t.render());
                    }
                }
                VolumeCmd::Inspect { name } => {
                    let v = c.inspect(pb::InspectVolumeRequest { name }).await.map_err(status_err)?.into_inner();
                    let v = v.volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    if json {
                        println!("{}", volume_json(&v));
                    } else {
                        print_volume(&v);
                    }
                }
                VolumeCmd::Update(a) => {
                    let q = &a.qos;
                    let qos_given = q.io_throttle_rd_iops.is_some()
                        || q.io_throttle_wr_iops.is_some()
                        || q.io_throttle_rd_bw.is_some()
                        || q.io_throttle_wr_bw.is_some();
                    if a.size.is_none() && a.labels.is_empty() && !qos_given && a.snap_schedule.is_none() {
                        bail!("nothing to update: pass --size, --label key=value, --snap-schedule and/or --io-throttle-*");
                    }
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
                    };
                    let v = c.update(req).await.map_err(status_err)?.into_inner();
                    let v = v.volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    if json {
                        println!("{}", volume_json(&v));
                    } else {
                        println!("Volume {} updated: size {}", v.name, format_size(v.spec.unwrap_or_default().size_bytes));
                    }
                }
                VolumeCmd::HaUpdate { name, repl, node } => {
                    let req = pb::HaUpdateRequest { name, repl, node: node.unwrap_or_default() };
                    let v = c.ha_update(req).await.map_err(status_err)?.into_inner();
                    let v = v.volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    if json {
                        println!("{}", volume_json(&v));
                    } else {
                        println!(
                            "Volume {}: replicas on {} (in sync: {}); new replicas fill in the background (volume inspect shows progress)",
                            v.name,
                            v.replica_nodes.join(","),
                            v.in_sync_nodes.join(",")
                        );
                    }
                }
                VolumeCmd::Delete { name, force } => {
                    c.delete(pb::DeleteVolumeRequest { name: name.clone(), force }).await.map_err(status_err)?;
                    if json {
                        println!("{}", json!({"deleted": name}));
                    } else {
                        println!("Volume {name} successfully deleted.");
                    }
                }
                VolumeCmd::Snapshot(cmd) => snapshot_cmd(&mut c, cmd, json).await?,
                VolumeCmd::Clone { source, name, labels } => {
                    let req = pb::CloneVolumeRequest { source, name, labels: labels.into_iter().collect() };
                    let v = c.clone_volume(req).await.map_err(status_err)?.into_inner().volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    if json {
                        println!("{}", volume_json(&v));
                    } else {
                        println!("Volume {} cloned on {} (detached: stratactl host attach {})", v.name, v.replica_nodes.join(","), v.name);
                    }
                }
                VolumeCmd::Restore { name, snapshot } => {
                    let req = pb::RestoreVolumeRequest { name, snapshot: snapshot.clone() };
                    let v = c.restore(req).await.map_err(status_err)?.into_inner().volume.ok_or_else(|| anyhow!("engine returned no volume"))?;
                    if json {
                        println!("{}", volume_json(&v));
                    } else {
                        println!("Volume {} restored from snapshot {snapshot}", v.name);
                    }
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
                            connect(&format!("http://{}", n.sdk_address)).await?
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
            if json {
                println!("{}", volume_json(&v));
            } else if v.attached_node.is_empty() {
                println!("Volume {name} detached.");
            } else {
                println!("Volume {name} attached on node {} (epoch {}).", v.attached_node, v.epoch);
            }
        }
        Cmd::Cluster(ClusterCmd::List) => {
            let nodes =
                pb::node_service_client::NodeServiceClient::new(ch).list(pb::ListNodesRequest {}).await.map_err(status_err)?.into_inner().nodes;
            if json {
                println!("{}", serde_json::Value::Array(nodes.iter().map(node_json).collect()));
            } else {
                print!("{}", nodes_table(&nodes));
            }
        }
        Cmd::Alerts(AlertsCmd::Show) => {
            let r = pb::alert_service_client::AlertServiceClient::new(ch)
                .list(pb::ListAlertsRequest { local_only: false })
                .await
                .map_err(status_err)?
                .into_inner();
            if json {
                let v: Vec<_> = r
                    .alerts
                    .iter()
                    .map(|a| {
                        json!({"id": a.id, "node": a.node, "severity": a.severity, "kind": a.kind, "resource": a.resource,
                                    "first_unix": a.first_unix, "last_unix": a.last_unix, "count": a.count, "message": a.message})
                    })
                    .collect();
                println!("{}", json!({"alerts": v, "unreachable": r.unreachable}));
            } else {
                if r.alerts.is_empty() {
                    println!("No alerts.");
                } else {
                    let mut t = Table::new(&["TIME", "NODE", "SEVERITY", "KIND", "RESOURCE", "COUNT", "MESSAGE"]);
                    for a in &r.alerts {
                        t.row(vec![
                            strata_api::schedule::format_unix(a.last_unix),
                            a.node.clone(),
                            a.severity.clone(),
                            a.kind.clone(),
                            a.resource.clone(),
                            a.count.to_string(),
                            a.message.clone(),
                        ]);
                    }
                    print!("{}", t.render());
                }
                for u in &r.unreachable {
                    eprintln!("warning: alerts of node {u} are missing");
                }
            }
        }
        Cmd::Service(ServiceCmd::Pool(PoolCmd::Show)) => {
            let pools =
                pb::pool_service_client::PoolServiceClient::new(ch).list(pb::ListPoolsRequest {}).await.map_err(status_err)?.into_inner().pools;
            if json {
                let v: Vec<_> = pools
                    .iter()
                    .map(|p| {
                        json!({
                            "uuid": p.uuid, "extent_size": p.extent_size, "total_bytes": p.total_bytes, "used_bytes": p.used_bytes,
                            "devices": p.devices.iter().map(|d| json!({
                                "uuid": d.uuid, "path": d.path, "size_bytes": d.size_bytes, "total_extents": d.total_extents,
                                "free_extents": d.free_extents, "kind": d.kind, "io_engine": d.io_engine, "direct_io": d.direct_io,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                for p in &pools {
                    println!(
                        "Pool {}: {} used of {}, extent size {}",
                        p.uuid,
                        format_size(p.used_bytes),
                        format_size(p.total_bytes),
                        format_size(p.extent_size)
                    );
                    let mut t = Table::new(&["DEVICE", "KIND", "SIZE", "EXTENTS", "FREE", "IO", "O_DIRECT", "UUID"]);
                    for d in &p.devices {
                        t.row(vec![
                            d.path.clone(),
                            d.kind.clone(),
                            format_size(d.size_bytes),
                            d.total_extents.to_string(),
                            d.free_extents.to_string(),
                            d.io_engine.clone(),
                            if d.direct_io { "yes".into() } else { "no".into() },
                            d.uuid.clone(),
                        ]);
                    }
                    print!("{}", t.render());
                }
            }
        }
    }
    Ok(())
}

fn node_json(n: &pb::Node) -> serde_json::Value {
    json!({"id": n.id, "hostname": n.hostname, "status": n.status, "sdk_address": n.sdk_address, "nbd_address": n.nbd_address,
           "repl_address": n.repl_address, "zone": n.zone, "rack": n.rack,
           "total_bytes": n.total_bytes, "used_bytes": n.used_bytes, "version": n.version})
}

fn nodes_table(nodes: &[pb::Node]) -> String {
    let mut t = Table::new(&["ID", "HOSTNAME", "STATUS", "CAPACITY", "USED", "ZONE", "RACK", "SDK", "REPLICATION", "VERSION"]);
    let or_dash = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    for n in nodes {
        t.row(vec![
            n.id.clone(),
            n.hostname.clone(),
            n.status.clone(),
            format_size(n.total_bytes),
            format_size(n.used_bytes),
            or_dash(&n.zone),
            or_dash(&n.rack),
            n.sdk_address.clone(),
            or_dash(&n.repl_address),
            n.version.clone(),
        ]);
    }
    t.render()
}
