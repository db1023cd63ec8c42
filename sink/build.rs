// Compiles the sink's control API (proto/proto/sink_control.proto) with protox (pure Rust), so no
// `protoc` is needed to build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/proto/sink_control.proto");
    let fds = protox::compile(["sink_control.proto"], ["../proto/proto"])?;
    tonic_prost_build::configure().type_attribute(".", "#[derive(serde::Serialize)]").compile_fds(fds)?;
    Ok(())
}
