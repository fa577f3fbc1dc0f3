//! Writes the StorageCluster CRD as YAML: to the path given, else to stdout.

const USAGE: &str = "usage: crdgen [PATH]\n\nWrites the StorageCluster CRD as YAML to PATH (e.g. charts/strata/crds/storageclusters.strata.dev.yaml), or to stdout without one.";

fn main() -> anyhow::Result<()> {
    let yaml = strata_operator::crd_yaml()?;
    match std::env::args().nth(1).as_deref() {
        Some("-h" | "--help") => println!("{USAGE}"),
        Some(flag) if flag.starts_with('-') => {
            eprintln!("crdgen: unknown option {flag}\n{USAGE}");
            std::process::exit(2);
        }
        Some(path) => std::fs::write(path, yaml)?,
        None => print!("{yaml}"),
    }
    Ok(())
}
