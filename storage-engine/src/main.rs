use clap::Parser;
use strata_engine::config::{CertsCommand, Cli, Command};

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
        Some(Command::Certs(CertsCommand::Init { dir })) => {
            strata_engine::security::init_ca(&dir)?;
            println!("cluster CA written to {} (keep ca.key private)", dir.display());
            Ok(())
        }
        Some(Command::Certs(CertsCommand::Issue { ca_dir, node_id, hosts, out, watch })) => {
            strata_engine::security::issue(&ca_dir, &node_id, &hosts, &out)?;
            println!("certificate for node {node_id} written to {} (pass it as --tls-dir)", out.display());
            if let Some(every) = watch {
                strata_engine::security::reissue_on_change(&ca_dir, &node_id, &hosts, &out, std::time::Duration::from_secs(every.max(1))).await;
            }
            Ok(())
        }
        None => strata_engine::server::run(cli.run).await,
    }
}
