//! Compiles the `google.storage.v2`, `google.storage.control.v2`, `google.longrunning` and
//! `google.rpc` subsets in `proto/` with protox (a pure-Rust protobuf compiler), so no `protoc`
//! binary is needed on the build machine. `bytes` fields become `bytes::Bytes`.
//!
//! The compiled descriptors are also written to `$OUT_DIR/zonalfs_descriptors.bin`
//! (an encoded `FileDescriptorSet`): tests/proto_descriptors.rs compares every
//! message in it with the official descriptors.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/google/rpc/status.proto",
        "proto/google/longrunning/operations.proto",
        "proto/google/storage/v2/storage.proto",
        "proto/google/storage/control/v2/storage_control.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(files)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("zonalfs_descriptors.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
