//! Compiles the wire contract in proto/ with protox, a pure-Rust protobuf compiler, so that a
//! fresh machine builds without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/vtox/v1/agent.proto", "proto/vtox/v1/control.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // The services speak through `wire::LeanCodec`: prost's codec with small starting buffers.
    tonic_prost_build::configure()
        .codec_path("crate::wire::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
