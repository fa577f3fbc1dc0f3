//! Wires a node together: devices -> pool -> engine -> NBD, SDK and metrics listeners.

use crate::config::{CheckArgs, RunArgs};
use crate::device::{BlockIo, FileDevice, IoEngine, OpenOptions};
use crate::meta::{embedded::Embedded, MetaStore};
use crate::pool::check::{check, KnownVolume};
use crate::pool::{OpenSpec, Pool};
use crate::volume::{NodeInfo, Service};
use anyhow::{bail, Context};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// How long a device held by a dying process may stay locked before we give up.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn open_devices(paths: &[PathBuf], opts: &OpenOptions, volatile: bool) -> anyhow::Result<Vec<(String, Arc<dyn BlockIo>)>> {
    let mut out = Vec::new();
    for p in paths {
        let mut dev: Arc<dyn BlockIo> = Arc::new(FileDevice::open(p, opts).with_context(|| format!("device {}", p.display()))?);
        if volatile {
            dev = Arc::new(crate::device::volatile::VolatileCache::new(dev));
        }
        out.push((p.display().to_string(), dev));
    }
    Ok(out)
}

/// Opens the pool and the metadata store; returns the engine ready to serve.
pub async fn open_engine(args: &RunArgs, node: NodeInfo) -> anyhow::Result<Arc<Service>> {
    let mut devices = args.devices.clone();
    if args.use_all {
        let (found, left) = crate::device::discover::discover_here(&args.use_all_match, crate::pool::superblock::MAGIC);
        for l in &left {
            tracing::info!(device = %l.name, "--use-all leaves it alone: {}", l.why);
        }
        for f in found {
            if !devices.contains(&f.path) {
                tracing::info!(device = %f.path.display(), size = %strata_api::units::format_size(f.size), "--use-all pools it");
                devices.push(f.path);
            }
        }
    }
    if devices.is_empty() {
        if args.use_all {
            bail!("--use-all found no unused block device (the log says why each was left alone), and no --device was given");
        }
        bail!("no devices: pass at least one --device PATH (a block device, or a file that is created with --device-size), or --use-all");
    }
    let meta: Arc<dyn MetaStore> = if args.etcd.is_empty() {
        Arc::new(Embedded::open(&args.data_dir).with_context(|| format!("metadata store in {}", args.data_dir.display()))?)
    } else {
        let tls = args.etcd_tls.load(&args.etcd, args.tls_dir.as_deref())?;
        Arc::new(crate::meta::etcd::Etcd::connect_with(&args.etcd, &node.id, args.node_ttl, tls.as_ref()).await?)
    };
    let opts = OpenOptions { create_size: Some(args.device_size), io_engine: args.io_engine, read_only: false, lock_wait: LOCK_WAIT };
    if args.simulate_volatile_cache {
        crate::replica::new_boot_id();
        tracing::warn!("test mode: device writes stay in memory until flushed (--simulate-volatile-cache); kill -9 acts as a power cut");
    }
    let expected = meta.get_pool().await?;
    // Devices added while running (drive add, pool expand) are opened from the pool's record
    // (never created: a missing one is refused, named).
    let same = |a: &PathBuf, b: &PathBuf| a == b || matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y);
    let mut added = Vec::new();
    for (uuid, path) in expected.iter().flat_map(|r| r.devices.iter().filter(|(u, _)| r.added.contains(u))) {
        let p = PathBuf::from(path);
        if !devices.iter().any(|d| same(d, &p)) {
            tracing::info!(device = %path, %uuid, "opening a device added to the pool while running (it is in the pool's record)");
            added.push(p);
        }
    }
    let spec = OpenSpec { expected, force_format: args.force_format, extent_size: args.extent_size, check_only: false };
    // Opening devices and replaying the journal block: off the runtime threads.
    let (paths, simulate) = (devices, args.simulate_volatile_cache);
    let existing = OpenOptions { create_size: None, ..opts.clone() };
    let pool = tokio::task::spawn_blocking(move || {
        let mut devs = open_devices(&paths, &opts, simulate)?;
        devs.extend(open_devices(&added, &existing, simulate)?);
        Pool::open(devs, &spec).map_err(anyhow::Error::from)
    })
    .await??;
    let node_id = node.id.clone();
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let alerts = crate::alerts::Alerts::open(&node_id, args.data_dir.join("alerts.jsonl"));
    let mut engine = Service::new(Arc::new(pool), meta, node, alerts).await?;
    match &args.tls_dir {
        Some(dir) => {
            let tls = crate::security::Tls::load(dir).with_context(|| format!("--tls-dir {}", dir.display()))?;
            if tls.node != node_id {
                bail!(
                    "the certificate in {} is for node {:?}, but this is node {node_id:?}; issue one for this node (strata-engine certs issue)",
                    dir.display(),
                    tls.node
                );
            }
            let tls = Arc::new(tls);
            // Rotation: replaced files (a renewed Secret) are picked up without a restart.
            tls.watch(std::time::Duration::from_secs(10));
            engine.use_tls(tls);
        }
        None => tracing::warn!(
            "replication is plaintext and unauthenticated (no --tls-dir): any host that reaches the replication port can read and write replicas"
        ),
    }
    engine.auth = load_auth(args, &node_id)?;
    engine.drive_io_engine = args.io_engine;
    engine.cloud_pacer.set_rate(args.cloudsnap_rate);
    if let Some(f) = args.credentials_key_file.as_ref().or(args.auth_system_key_file.as_ref()) {
        let secret = std::fs::read(f).with_context(|| format!("credentials key {}", f.display()))?;
        if secret.len() < 32 {
            bail!("{}: a credentials key needs at least 32 bytes ({} given)", f.display(), secret.len());
        }
        engine.cloud_key = Some(crate::cloudsnap::credentials::sealing_key(&secret));
    }
    let audit = args.data_dir.join("audit.jsonl");
    crate::sdk::auth::open_audit_log(&audit).with_context(|| format!("audit log {}", audit.display()))?;
    engine.distrust_local_replicas_if_salvaged().await?;
    engine.local.readahead_window.store(args.readahead, std::sync::atomic::Ordering::Relaxed);
    engine.repl = crate::replication::target::TargetConfig {
        timeout: std::time::Duration::from_secs(args.replica_io_timeout.max(1)),
        resync_rate: args.resync_rate,
        replica_timeout: std::time::Duration::from_secs(args.replica_timeout),
        data_dir: args.data_dir.clone(),
    };
    Ok(engine.into_shared())
}

/// The SDK's token rules from --auth-*, or None (open SDK, with a warning).
fn load_auth(args: &RunArgs, node_id: &str) -> anyhow::Result<Option<Arc<crate::sdk::auth::Auth>>> {
    let Some(path) = &args.auth_system_key_file else {
        if !args.auth_issuers.is_empty() {
            bail!("--auth-issuer needs --auth-system-key-file (the cluster's own key, which turns token checks on)");
        }
        tracing::warn!("the SDK is open (no --auth-system-key-file): anyone who reaches the SDK port may change any volume");
        return Ok(None);
    };
    let system = std::fs::read(path).with_context(|| format!("--auth-system-key-file {}", path.display()))?;
    let mut issuers = Vec::new();
    for (name, file) in &args.auth_issuers {
        let content = std::fs::read(file).with_context(|| format!("--auth-issuer {name}={}", file.display()))?;
        let key =
            strata_api::auth::IssuerKey::from_file_content(&content).map_err(|e| anyhow::anyhow!("--auth-issuer {name}={}: {e}", file.display()))?;
        issuers.push((name.clone(), key));
    }
    let skew = std::time::Duration::from_secs(args.auth_clock_skew);
    let auth = crate::sdk::auth::Auth::new(node_id, &system, &issuers, &args.auth_audience, skew)
        .map_err(|e| anyhow::anyhow!("--auth-system-key-file {}: {e}", path.display()))?;
    tracing::info!(issuers = ?auth.verifier.issuers().collect::<Vec<_>>(), audience = %args.auth_audience, "the SDK takes only calls with a valid token");
    Ok(Some(Arc::new(auth)))
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    crate::failpoint::configure_from_env();
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    let remote_nbd = !args.nbd_listen.ip().is_loopback();
    if args.nbd_require_tls && args.tls_dir.is_none() {
        bail!("--nbd-require-tls needs --tls-dir (the engine's certificate, which NBD clients verify)");
    }
    if remote_nbd && args.tls_dir.is_none() {
        if !args.nbd_allow_remote {
            bail!(
                "--nbd-listen {}: without --tls-dir NBD has no authentication, so the engine serves it only on loopback and --nbd-socket; give --tls-dir (clients then need TLS with a certificate of the cluster CA), or --nbd-allow-remote to serve every volume to any host that reaches this port",
                args.nbd_listen
            );
        }
        tracing::warn!(listen = %args.nbd_listen, "NBD is served beyond this node without authentication (--nbd-allow-remote)");
    }
    let nbd = tokio::net::TcpListener::bind(args.nbd_listen).await.with_context(|| format!("NBD listen {}", args.nbd_listen))?;
    let sdk = tokio::net::TcpListener::bind(args.sdk_listen).await.with_context(|| format!("SDK listen {}", args.sdk_listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen).await.with_context(|| format!("metrics listen {}", args.metrics_listen))?;
    let repl = tokio::net::TcpListener::bind(args.repl_listen).await.with_context(|| format!("replication listen {}", args.repl_listen))?;
    let (nbd_addr, sdk_addr, metrics_addr, repl_addr) = (nbd.local_addr()?, sdk.local_addr()?, metrics.local_addr()?, repl.local_addr()?);
    let node = NodeInfo {
        id: args.node_id.clone().unwrap_or_else(|| hostname.clone()),
        hostname,
        sdk_address: sdk_addr.to_string(),
        nbd_address: nbd_addr.to_string(),
        repl_address: args.advertise.clone().unwrap_or_else(|| repl_addr.to_string()),
        zone: args.zone.clone(),
        rack: args.rack.clone(),
    };
    let engine = open_engine(&args, node).await?;
    let bounds = crate::replication::server::Bounds { requests: args.repl_max_requests, bytes: args.repl_inflight as usize };
    tokio::spawn(crate::replication::server::serve(repl, engine.clone(), bounds, engine.tls.clone()));
    engine.run_replacements();
    engine.run_schedules(std::time::Duration::from_secs(10));
    engine.run_checksum_tasks(crate::volume::ScrubConfig {
        rate: args.scrub_rate,
        every: std::time::Duration::from_secs(args.scrub_interval.max(1)),
        settle_after: std::time::Duration::from_secs(args.checksum_settle_after),
    });
    engine.start_targets().await;
    engine.resume_backups().await;
    engine.run_cloud_schedules(std::time::Duration::from_secs(10));

    let limits = crate::frontend::nbd::Limits::new(
        args.nbd_conn_inflight,
        args.nbd_inflight,
        std::time::Duration::from_secs(args.nbd_handshake_timeout.max(1)),
        args.nbd_max_connections.max(1),
    );
    let nbd_tls = engine.tls.clone().map(|tls| crate::frontend::nbd::TcpTls { tls, required: args.nbd_require_tls || remote_nbd });
    tokio::spawn(crate::frontend::nbd::serve_tcp(nbd, engine.clone(), limits.clone(), nbd_tls));
    if let Some(path) = &args.nbd_socket {
        if path.exists() {
            std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
        }
        let l = tokio::net::UnixListener::bind(path).with_context(|| format!("NBD socket {}", path.display()))?;
        tokio::spawn(crate::frontend::nbd::serve_unix(l, engine.clone(), limits.clone()));
    }
    let router = crate::sdk::router(engine.clone());
    let sdk_tls = engine.tls.clone();
    let require_client_cert = args.sdk_require_client_cert;
    if require_client_cert && sdk_tls.is_none() {
        bail!("--sdk-require-client-cert needs --tls-dir (the SDK is served over TLS with this node's certificate)");
    }
    tokio::spawn(async move {
        // With a certificate the SDK is served over TLS only (clients trust the cluster CA).
        let served = match sdk_tls {
            Some(tls) => router.serve_with_incoming(crate::sdk::tls_incoming(sdk, tls, require_client_cert)).await,
            None => router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(sdk)).await,
        };
        if let Err(e) = served {
            tracing::error!("SDK server stopped: {e}");
        }
    });
    tokio::spawn(serve_metrics(metrics, engine.clone()));
    let mut health = tokio::spawn(report_storage_health(engine.clone()));

    let ready = serde_json::json!({
        "nbd": nbd_addr.to_string(),
        "nbd_socket": args.nbd_socket.as_ref().map(|p| p.display().to_string()),
        "sdk": sdk_addr.to_string(),
        "metrics": metrics_addr.to_string(),
        "replication": repl_addr.to_string(),
        "pool": engine.pool.uuid.to_string(),
    });
    if let Some(f) = &args.ready_file {
        let tmp = f.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string())?;
        std::fs::rename(&tmp, f)?;
    }
    tracing::info!(nbd = %nbd_addr, sdk = %sdk_addr, metrics = %metrics_addr, pool = %engine.pool.uuid, "strata-engine ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let removed = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = term.recv() => false,
        _ = &mut health => true,
    };
    engine.shutdown().await?;
    if removed {
        bail!(
            "node {} was removed from the cluster (stratactl cluster delete): this engine stopped; to join again, wipe its devices and data directory and start it as a new node",
            engine.node.id
        );
    }
    Ok(())
}

/// Tells the metadata store when this node's pool fails (StorageDown) or recovers, and keeps the
/// node record's usage figure current (for placement views, capacity and `cluster list`).
/// Pool usage at which `PoolNearFull` is raised.
const NEAR_FULL: f64 = 0.85;

/// Watches what an operator must hear about, every 2 s: this pool's usage (near full at 85%,
/// full), the metadata store's reachability (logged at warn once per outage, with its duration,
/// and an alert), and — on the online node with the lowest id, so the alert is raised once —
/// other nodes going offline and coming back. Returns when this node was removed from the
/// cluster (decommission): its record is gone from the store.
async fn report_storage_health(engine: Arc<Service>) {
    use crate::alerts::Severity::{Alarm, Notify, Warning};
    let mut reported = true;
    let mut used = u64::MAX;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    let mut fill = 0u8; // 0 fine, 1 near full, 2 full
    let mut unreachable_since: Option<std::time::Instant> = None;
    let mut offline: Option<std::collections::BTreeSet<String>> = None;
    let mut failed_drives = std::collections::BTreeSet::new();
    loop {
        tick.tick().await;
        engine.check_drives(&mut failed_drives);
        let (total, now_used) = (engine.pool.total_bytes(), engine.pool.used_bytes());
        let level = if total > 0 && now_used >= total {
            2
        } else if total > 0 && now_used as f64 >= total as f64 * NEAR_FULL {
            1
        } else {
            0
        };
        if level != fill {
            let resource = format!("node/{}", engine.node.id);
            let pct = (now_used * 100).checked_div(total).unwrap_or(0);
            match level {
                2 => {
                    engine.alerts.raise(
                        Alarm,
                        "PoolFull",
                        &resource,
                        format!(
                            "the pool of node {} is full ({pct}% of {} used): writes to new extents fail",
                            engine.node.id,
                            strata_api::units::format_size(total)
                        ),
                    );
                }
                1 => {
                    engine.alerts.raise(
                        Warning,
                        "PoolNearFull",
                        &resource,
                        format!(
                            "the pool of node {} is {pct}% full (of {}); add a drive or move volumes",
                            engine.node.id,
                            strata_api::units::format_size(total)
                        ),
                    );
                }
                _ => {
                    engine.alerts.raise(
                        Notify,
                        "PoolUsageNormal",
                        &resource,
                        format!("the pool of node {} is below {}% full again ({pct}%)", engine.node.id, (NEAR_FULL * 100.0) as u32),
                    );
                }
            }
            fill = level;
        }
        match (engine.meta.reachable(), unreachable_since) {
            (false, None) => {
                tracing::warn!("the metadata store is unreachable: I/O goes on, volume changes wait for it");
                engine.alerts.raise(
                    Warning,
                    "MetadataStoreUnreachable",
                    &format!("node/{}", engine.node.id),
                    format!("node {} cannot reach the metadata store", engine.node.id),
                );
                unreachable_since = Some(std::time::Instant::now());
            }
            (true, Some(since)) => {
                tracing::warn!(outage = ?since.elapsed(), "the metadata store is reachable again");
                engine.alerts.raise(
                    Notify,
                    "MetadataStoreReachable",
                    &format!("node/{}", engine.node.id),
                    format!("node {} reaches the metadata store again after {:?}", engine.node.id, since.elapsed()),
                );
                unreachable_since = None;
            }
            _ => {}
        }
        if unreachable_since.is_none() {
            if let Ok(nodes) = engine.meta.list_nodes().await {
                let me = &engine.node.id;
                if !nodes.iter().any(|(n, _)| &n.id == me) {
                    tracing::error!("this node was removed from the cluster (decommissioned); stopping");
                    return;
                }
                let now_off: std::collections::BTreeSet<String> =
                    nodes.iter().filter(|(_, s)| *s == crate::meta::NodeState::Offline).map(|(n, _)| n.id.clone()).collect();
                let speaker = nodes.iter().filter(|(_, s)| *s != crate::meta::NodeState::Offline).map(|(n, _)| &n.id).min() == Some(me);
                if let (Some(before), true) = (&offline, speaker) {
                    for n in now_off.difference(before) {
                        engine.alerts.raise(
                            Alarm,
                            "NodeOffline",
                            &format!("node/{n}"),
                            format!("node {n} is offline (its engine stopped renewing its lease); its replicas are out of sync"),
                        );
                    }
                    for n in before.difference(&now_off) {
                        engine.alerts.raise(Notify, "NodeOnline", &format!("node/{n}"), format!("node {n} is online again"));
                    }
                }
                offline = Some(now_off);
            }
        }
        match engine.report_usage(used).await {
            Ok(now) => used = now,
            Err(err) => tracing::debug!("cannot report usage: {err}"),
        }
        let ok = engine.pool.healthy();
        if ok != reported {
            match engine.meta.set_storage_ok(ok).await {
                Ok(()) => {
                    tracing::warn!(storage_ok = ok, "reported this node's storage state");
                    reported = ok;
                }
                Err(err) => tracing::warn!("cannot report storage state: {err}"),
            }
        }
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, engine: Arc<Service>) {
    use axum::{routing::get, Router};
    let app = Router::new()
        .route(
            "/metrics",
            get({
                let e = engine.clone();
                move || {
                    let e = e.clone();
                    async move { ([("content-type", strata_api::metrics::CONTENT_TYPE)], e.metrics_text()) }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics server stopped: {e}");
    }
}

/// `strata-engine check`: returns whether the pool is clean.
/// `check --repair`: opens the pool as the engine does (a damaged superblock copy is rewritten
/// from the other, a torn journal tail dropped, checksums of extents a crash left unsettled
/// recomputed), settles every checksum and syncs. Returns what it did.
fn repair(args: &CheckArgs, expected: Option<crate::pool::PoolRecord>) -> anyhow::Result<Vec<String>> {
    let opts = OpenOptions { create_size: None, io_engine: IoEngine::Sync, read_only: false, lock_wait: LOCK_WAIT };
    let devs = open_devices(&args.devices, &opts, false)?;
    let spec = OpenSpec { expected, force_format: false, extent_size: crate::pool::DEFAULT_EXTENT_SIZE, check_only: false };
    let mut done = crate::pool::salvage_journals(&devs)?;
    let pool = Pool::open(devs, &spec).context("opening the pool to repair it")?;
    let unsettled = pool.unsettled_at_open + pool.unsettled_extents();
    pool.settle_all_checksums()?;
    for d in pool.devices() {
        d.dev.sync_blocking()?;
    }
    if unsettled > 0 {
        done.push(format!("settled the checksums of {unsettled} extent(s) a crash had left unsettled (recomputed from their data)"));
    }
    Ok(done)
}

pub async fn run_check(args: &CheckArgs) -> anyhow::Result<bool> {
    let opts = OpenOptions { create_size: None, io_engine: IoEngine::Sync, read_only: true, lock_wait: LOCK_WAIT };
    let devs = open_devices(&args.devices, &opts, false)?;
    let known = |records: Vec<crate::meta::VolumeRecord>, node: Option<&str>| -> HashMap<u64, KnownVolume> {
        records
            .into_iter()
            .map(|v| {
                let replica_here = node.map(|n| v.clone().normalized(n).has_replica(n));
                (v.id, KnownVolume { name: v.name, size: v.size, replica_here })
            })
            .collect()
    };
    let (expected, volumes) = match (&args.data_dir, args.etcd.is_empty()) {
        (Some(dir), _) => {
            let meta = Embedded::open(dir).with_context(|| format!("metadata store in {} (is the engine still running?)", dir.display()))?;
            (meta.get_pool().await?, Some(known(meta.list_volumes().await?, None)))
        }
        (None, false) => {
            // Reads only: the records of every volume, and this node's pool record.
            let node = args.node_id.clone().unwrap_or_default();
            let tls = args.etcd_tls.load(&args.etcd, None)?;
            let meta = crate::meta::etcd::Etcd::connect_with(&args.etcd, &node, 10, tls.as_ref())
                .await
                .with_context(|| format!("etcd at {}", args.etcd.join(",")))?;
            let pool = if node.is_empty() { None } else { meta.get_pool().await? };
            (pool, Some(known(meta.list_volumes().await?, args.node_id.as_deref())))
        }
        (None, true) => (None, None),
    };
    let mut report = check(devs, expected.clone(), volumes.as_ref());
    let mut repaired = Vec::new();
    if args.repair {
        repaired = repair(args, expected.clone())?;
        let before = report.problems.clone();
        report = check(open_devices(&args.devices, &opts, false)?, expected, volumes.as_ref());
        repaired.extend(before.into_iter().filter(|p| !report.problems.contains(p)).map(|p| format!("fixed: {p}")));
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"clean": report.is_clean(), "devices": report.devices, "mapped_extents": report.mapped_extents, "verified_blocks": report.verified_blocks, "unsettled_extents": report.unsettled_extents, "repaired": repaired, "problems": report.problems})
        );
    } else {
        for r in &repaired {
            println!("REPAIRED: {r}");
        }
        println!(
            "checked {} device(s), {} mapped extent(s), {} block(s) verified against their checksums",
            report.devices, report.mapped_extents, report.verified_blocks
        );
        if report.unsettled_extents > 0 {
            println!(
                "NOTE: {} extent(s) were written just before an unclean stop: their checksums are recomputed from their data at the next start (or now with --repair), so they were not verified",
                report.unsettled_extents
            );
        }
        for p in &report.problems {
            println!("PROBLEM: {p}");
        }
        println!("{}", if report.is_clean() { "clean" } else { "INCONSISTENT" });
    }
    Ok(report.is_clean())
}
