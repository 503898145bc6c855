//! Compiles `proto/sendable/keys/v1/*.proto` with protox (pure Rust, so no `protoc` is needed on
//! the build machine) and generates the tonic server and client code. The encoded descriptor set
//! is written to `OUT_DIR/sendable_keys_descriptor.bin`; server reflection serves it, so grpcurl,
//! `buf curl` and grpcio clients work without the .proto files.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/sendable/keys/v1/key_service.proto",
        "proto/sendable/keys/v1/usage_service.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }

    // Source info keeps the comments, so `grpcurl describe` shows the documentation; imports
    // keep google/protobuf/*.proto, which reflection clients need to resolve Timestamp/Duration.
    let fds = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(protos)?
        .file_descriptor_set();

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("sendable_keys_descriptor.bin"),
        fds.encode_to_vec(),
    )?;

    // The messages that carry a full API key get a hand-written Debug that leaves it out
    // (src/grpc/redact.rs), so no `{:?}` of a request or response can print a key.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_debug([
            ".sendable.keys.v1.CreateKeyResponse",
            ".sendable.keys.v1.RotateKeyResponse",
            ".sendable.keys.v1.VerifyKeyRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
