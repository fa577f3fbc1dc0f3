use clap::Parser;
use strata_engine::config::{Cli, Command};

#[tokio::main]
async fn main() {
    if let Err(e) = real_main().await {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

async fn real_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => {
            if !strata_engine::server::run_check(&args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        None => strata_engine::server::run(cli.run).await,
    }
}
