//! Compiles the gRPC contract. Uses the vendored `protoc` unless `PROTOC` is
//! set, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    let include = protoc_bin_vendored::include_path()?;
    let include = include
        .to_str()
        .ok_or("vendored protoc include path is not UTF-8")?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("provisioning_descriptor.bin"))
        .compile_with_config(
            config,
            &["proto/infobip/provisioning/v1/associations.proto"],
            &["proto", include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
