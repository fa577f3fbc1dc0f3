use clap::Parser;
use std::sync::Arc;
use strata_stork::{cluster::Kube, config::Config, extender, health, https, migration, storage::Sdk};

#[tokio::main]
async fn main() {
    strata_api::logging::init();
    if let Err(e) = run(Config::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    if cfg.tls_dir.is_none() && !cfg.listen.ip().is_loopback() && !cfg.allow_plain_http {
        anyhow::bail!(
            "--listen {} is reachable beyond this host and would serve plain HTTP: give --tls-dir (HTTPS, kube-scheduler's client certificate checked), a loopback --listen, or --allow-plain-http",
            cfg.listen
        );
    }
    let client = kube::Client::try_default().await.map_err(|e| anyhow::anyhow!("Kubernetes client: {e} (in-cluster config or KUBECONFIG needed)"))?;
    let cluster = Arc::new(Kube { client });
    let bearer = match &cfg.auth_system_key_file {
        Some(key) => strata_api::auth::Bearer::minting_from_file(key, "stork", strata_api::auth::Role::View)
            .map_err(|e| anyhow::anyhow!("--auth-system-key-file {e}"))?,
        None => Default::default(),
    };
    let tls = match (&cfg.sdk_ca_file, &cfg.tls_dir) {
        (Some(ca), _) => Some(strata_api::tls::ClientTls::from_files(ca, None).map_err(|e| anyhow::anyhow!("--sdk-ca-file {e}"))?),
        // The extender's own certificate is its client identity at the SDK.
        (None, Some(d)) => Some(strata_api::tls::ClientTls::from_node_dir(d).map_err(|e| anyhow::anyhow!("--tls-dir {e}"))?),
        (None, None) => None,
    };
    if cfg.migrations {
        let admin = match &cfg.auth_system_key_file {
            Some(key) => strata_api::auth::Bearer::minting_from_file(key, "stork-migration", strata_api::auth::Role::Admin)
                .map_err(|e| anyhow::anyhow!("--auth-system-key-file {e}"))?,
            None => Default::default(),
        };
        let migrator = Arc::new(migration::Migrator {
            local: cluster.client.clone(),
            storage: Arc::new(Sdk::new(&cfg.sdk).with_bearer(admin).with_tls(tls.clone())),
            remote_kube: Arc::new(migration::FromKubeconfig),
            poll: std::time::Duration::from_secs(2),
        });
        tokio::spawn(migrator.run(cfg.migration_interval));
    }
    let storage = Arc::new(Sdk::new(&cfg.sdk).with_bearer(bearer).with_tls(tls));
    let metrics = Arc::new(extender::Metrics::default());
    if cfg.health_monitor {
        let mc = health::MonitorConfig { grace: cfg.grace, probe_timeout: cfg.probe_timeout, max_evictions_per_cycle: cfg.max_evictions };
        tokio::spawn(health::Monitor::new(mc, cluster.clone(), storage.clone(), metrics.clone()).run(cfg.interval));
    }
    let ext = Arc::new(extender::Extender { cluster, storage, metrics });
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    match &cfg.tls_dir {
        Some(dir) => {
            let server = https::ServerTls::load(dir).map_err(|e| anyhow::anyhow!("--tls-dir {e}"))?;
            let app = https::require_client_cert(extender::router(ext), https::ClientPolicy { names: cfg.tls_client_name.clone() });
            tracing::info!(listen = %cfg.listen, sdk = %cfg.sdk, "strata-stork ready (HTTPS, client certificates required)");
            https::serve(listener, app, Arc::new(server), std::time::Duration::from_secs(10)).await?;
        }
        None => {
            tracing::warn!(listen = %cfg.listen, "strata-stork serves plain HTTP: anyone who reaches the port may call the extender (--tls-dir for HTTPS)");
            tracing::info!(listen = %cfg.listen, sdk = %cfg.sdk, "strata-stork ready");
            axum::serve(listener, extender::router(ext)).await?;
        }
    }
    Ok(())
}
