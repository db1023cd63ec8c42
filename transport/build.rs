// Compiles the gRPC transport's service (`Replication` in proto/proto/blockship.proto) with protox
// (pure Rust, no `protoc`); its messages are the proto crate's, so frames have one Rust type.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/proto/blockship.proto");
    let fds = protox::compile(["blockship.proto"], ["../proto/proto"])?;
    tonic_prost_build::configure()
        .extern_path(".blockship.v1", "::blockship_proto::pb")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
