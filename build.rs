//! Compiles the `google.storage.v2`, `google.storage.control.v2` and `google.rpc`
//! subsets in `proto/` with protox (a pure-Rust protobuf compiler), so no `protoc`
//! binary is needed on the build machine. `bytes` fields become `bytes::Bytes`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/google/rpc/status.proto",
        "proto/google/storage/v2/storage.proto",
        "proto/google/storage/control/v2/storage_control.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
