use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = stratactl::Cli::parse();
    let json = cli.json;
    if let Err(e) = stratactl::run(cli).await {
        stratactl::report(&e, json);
        std::process::exit(1);
    }
}
