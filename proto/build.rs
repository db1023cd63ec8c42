// Compiles proto/blockship.proto with protox (pure Rust), so no `protoc` is needed to build.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/blockship.proto");
    let fds = protox::compile(["blockship.proto"], ["proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
