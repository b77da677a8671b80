//! Generates the tonic/prost code for kvfleet's protocol (and the etcd subset used by benchmarks)
//! with a vendored protoc, so no system protobuf compiler is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let protoc_include = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    config.bytes(["."]);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("kvfleet_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "kvfleet/v1/types.proto",
                "kvfleet/v1/kv.proto",
                "kvfleet/v1/admin.proto",
                "kvfleet/v1/controller.proto",
                "kvfleet/v1/raft.proto",
                "google/rpc/status.proto",
                "etcd/etcd_kv_subset.proto",
            ]
            .map(PathBuf::from),
            &[PathBuf::from("."), protoc_include],
        )?;
    Ok(())
}
