use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = stratactl::Cli::parse();
    if let Err(e) = stratactl::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
