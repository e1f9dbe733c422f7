//! Compiles the gRPC protocol in `proto/` with tonic-prost-build.
//!
//! protoc comes from `protoc-bin-vendored` (there is none on a fresh machine). `PROTOC` is set
//! only for this build script's process: exported globally it would break raft-rs's bundled
//! protobuf-build (see ../shared/dependencies.md).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: set_var is safe in edition 2021, and build scripts are single-threaded here.
    std::env::set_var("PROTOC", protoc);
    let protos = [
        "proto/ferry/replication/v1/replication.proto",
        "proto/ferry/witness/v1/witness.proto",
        "proto/snapshotmetadata/schema.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    Ok(())
}
