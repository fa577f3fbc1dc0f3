use clap::Parser;
use strata_engine::config::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let workers = strata_engine::config::worker_threads(cli.run.worker_threads);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build();
    let res = rt.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(real_main(cli)));
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    strata_api::logging::init();
    match cli.command {
        Some(Command::Check(args)) => {
            if !strata_engine::server::run_check(&args).await? {
                std::process::exit(1);
            }
            Ok(())
        }
        None => strata_engine::server::run(cli.run).await,
    }
}
