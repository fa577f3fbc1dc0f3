use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // Output into a closed pipe (`stratactl status | head -1`) ends the process quietly, as for
    // other command-line tools, instead of a panic on EPIPE.
    // SAFETY: restores the default disposition of SIGPIPE before any other thread runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = stratactl::Cli::parse();
    if let Err(e) = stratactl::run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
