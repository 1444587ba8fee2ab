//! Compiles the protobuf definitions with prost, using protox so no system `protoc`
//! is needed, and writes their descriptors (`imshard.fds`) for the JSON subprotocol
//! (`src/proto/json.rs`), so both encodings come from the same schema.
use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "src/proto/imshard.proto",
        "src/proto/store.proto",
        "src/proto/node.proto",
        "src/proto/events.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["src/proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("imshard.fds"), fds.encode_to_vec())?;
    let mut config = prost_build::Config::new();
    config.bytes([
        ".imshard.v1.MessageEnvelope.data",
        ".imshard.v1.Response.body",
        ".imshard.node.v1.ChannelPush.frame",
    ]);
    // JSON API: field names equal the proto names, enums as numbers (they are i32
    // fields), missing fields take their proto default, wrong types are refused.
    config.type_attribute(
        ".imshard.v1",
        "#[derive(serde::Serialize, serde::Deserialize)]",
    );
    config.message_attribute(".imshard.v1", "#[serde(default)]");
    config.compile_fds(fds)?;
    Ok(())
}
