//! strata-csi: parses its configuration and serves (see the library).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| "info".into())).init();
    strata_csi::run(strata_csi::Config::parse()).await
}
