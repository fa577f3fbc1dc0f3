fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/strata.proto");
    tonic_build::configure().compile_protos(&["proto/strata.proto"], &["proto"])?;
    Ok(())
}
