//! Writes the ClusterPair and Migration CRDs as YAML: into the directory given, else to stdout.

const USAGE: &str = "usage: stork-crdgen [DIR]\n\nWrites the ClusterPair and Migration CRDs as YAML files into DIR (e.g. charts/strata/crds), or to stdout without one.";

fn main() -> anyhow::Result<()> {
    let crds = strata_stork::migration::crd::crds_yaml()?;
    match std::env::args().nth(1).as_deref() {
        Some("-h" | "--help") => println!("{USAGE}"),
        Some(flag) if flag.starts_with('-') => {
            eprintln!("stork-crdgen: unknown option {flag}\n{USAGE}");
            std::process::exit(2);
        }
        Some(dir) => {
            for (file, yaml) in crds {
                std::fs::write(std::path::Path::new(dir).join(file), yaml)?;
            }
        }
        None => {
            for (_, yaml) in crds {
                print!("---\n{yaml}");
            }
        }
    }
    Ok(())
}
