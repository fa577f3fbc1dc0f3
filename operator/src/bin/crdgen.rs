//! Writes the StorageCluster CRD as YAML: to the path given, else to stdout.

fn main() -> anyhow::Result<()> {
    let yaml = strata_operator::crd_yaml()?;
    match std::env::args().nth(1) {
        Some(path) => std::fs::write(&path, yaml)?,
        None => print!("{yaml}"),
    }
    Ok(())
}
