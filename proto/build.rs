//! Compiles `dataplane.proto` with protox (pure Rust, so no `protoc` install) and keeps
//! the encoded descriptor set for the reflection service.
use std::{env, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=dataplane.proto");
    let descriptors = protox::compile(["dataplane.proto"], ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("dataplane_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
