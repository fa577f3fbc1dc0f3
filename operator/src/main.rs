//! strata-operator: watches StorageClusters and reconciles them.

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client};
use std::sync::Arc;
use strata_operator::controller::{error_policy, reconcile, Context};
use strata_operator::crd::StorageCluster;

#[derive(Debug, Parser)]
#[command(name = "strata-operator", version, about = "Installs and upgrades Strata from StorageCluster resources")]
struct Args {
    /// Watch StorageClusters in this namespace only. Default: all namespaces.
    #[arg(long, env = "STRATA_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// `/metrics` and `/healthz`.
    #[arg(long, env = "STRATA_OPERATOR_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    metrics_listen: std::net::SocketAddr,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Delete a StorageCluster and wait until the operator has finalized it (the chart's
    /// pre-delete hook runs this, so `helm uninstall` removes everything in either order).
    Uninstall {
        /// The StorageCluster's name.
        #[arg(long)]
        name: String,
        /// Its namespace.
        #[arg(long, env = "POD_NAMESPACE")]
        namespace: String,
        /// Seconds to wait for the operator to finalize it.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    strata_api::logging::init();
    let args = Args::parse();
    let client = Client::try_default().await?;
    if let Some(Cmd::Uninstall { name, namespace, timeout }) = args.cmd {
        let t = std::time::Duration::from_secs(timeout);
        strata_operator::uninstall::uninstall(client, &namespace, &name, t, std::time::Duration::from_secs(2)).await?;
        return Ok(());
    }
    let (clusters, daemonsets, deployments): (Api<StorageCluster>, Api<DaemonSet>, Api<Deployment>) = match &args.namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone())),
    };
    let metrics = Arc::new(strata_operator::metrics::Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_listen).await?;
    tokio::spawn(strata_operator::metrics::serve(listener, metrics.clone()));
    let engines = Arc::new(strata_operator::status::Sdk { client: client.clone() });
    let ctx = Arc::new(Context { client, engines, metrics });
    tracing::info!("strata-operator started");
    Controller::new(clusters, watcher::Config::default())
        .owns(daemonsets, watcher::Config::default())
        .owns(deployments, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::warn!("reconcile: {e}");
            }
        })
        .await;
    Ok(())
}
