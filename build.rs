//! Compiles the gRPC contract. Uses the vendored `protoc` unless `PROTOC` is
//! set, so a fresh machine needs no system protobuf compiler. Also names the
//! compiler for `provisioning_gateway_build_info` (`PG_RUSTC_VERSION`).

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
    // "rustc 1.95.0 (59807616e 2026-04-14)" → "1.95.0"; "unknown" if unreadable.
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PG_RUSTC_VERSION={version}");
    Ok(())
}
