//! Compiles the gRPC contract. Uses the vendored `protoc` unless `PROTOC` is
//! set, so a fresh machine needs no system protobuf compiler. Also names the
//! compiler for `provisioning_gateway_build_info` (`PG_RUSTC_VERSION`).
//!
//! The contract imports `google/longrunning` and `google/rpc` definitions:
//! taken from `GOOGLEAPIS_PROTO_DIR` when set, else fetched (pinned,
//! checksummed) by `scripts/googleapis` into `OUT_DIR`. The code generated
//! for `google.longrunning` holds the `Operations` server the gateway serves;
//! `google.rpc.Status` is tonic-types' own.

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
    let googleapis = match std::env::var_os("GOOGLEAPIS_PROTO_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            let dir = out_dir.join("googleapis");
            let status = std::process::Command::new("bash")
                .arg("scripts/googleapis")
                .arg(&dir)
                .status()?;
            if !status.success() {
                return Err("scripts/googleapis could not fetch the Google API definitions".into());
            }
            dir
        }
    };
    let googleapis = googleapis
        .to_str()
        .ok_or("Google API definitions path is not UTF-8")?;
    tonic_prost_build::configure()
        .build_client(true)
        .file_descriptor_set_path(out_dir.join("provisioning_descriptor.bin"))
        .extern_path(".google.rpc.Status", "::tonic_types::pb::Status")
        .compile_with_config(
            config,
            &[
                "proto/infobip/provisioning/v1/associations.proto",
                "google/longrunning/operations.proto",
            ],
            &["proto", googleapis, include],
        )?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=scripts/googleapis");
    println!("cargo:rerun-if-env-changed=GOOGLEAPIS_PROTO_DIR");
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
