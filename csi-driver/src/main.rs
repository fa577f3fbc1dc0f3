//! strata-csi: parses its configuration and serves (see the library).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    strata_api::logging::init();
    // The node plugin's FUSE helper (one process per staged volume).
    if std::env::args().nth(1).as_deref() == Some("fuse-disk") {
        let a = strata_csi::FuseDiskArgs::parse_from(std::env::args().skip(1));
        return strata_csi::fusedisk::serve(a.endpoint()?, &a.export, &a.mount);
    }
    // The node plugin's ublk helper (one process per staged volume).
    if std::env::args().nth(1).as_deref() == Some("ublk-disk") {
        let a = strata_csi::UblkDiskArgs::parse_from(std::env::args().skip(1));
        let opts = strata_csi::ublk::Opts { queues: a.queues, depth: a.depth, ..Default::default() };
        return strata_csi::ublk::serve(a.endpoint()?, &a.export, &a.state_file, opts);
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(strata_csi::run(strata_csi::Config::parse()))
}
