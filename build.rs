//! Compiles the wire contract in proto/ with protox, a pure-Rust protobuf compiler, so that a
//! fresh machine builds without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/vtox/v1/agent.proto", "proto/vtox/v1/control.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // The descriptors themselves, for the tests that check a table names every field.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("vtox_descriptors.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    // The services speak through `wire::LeanCodec`: prost's codec with small starting buffers.
    tonic_prost_build::configure()
        .codec_path("crate::wire::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
