fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/strata.proto");
    println!("cargo:rerun-if-changed=proto/csi.proto");
    tonic_build::configure().compile_protos(&["proto/strata.proto", "proto/csi.proto"], &["proto"])?;
    Ok(())
}
