//! The gRPC surface: tonic service implementations that turn protos into domain values, call the
//! services, and turn the results back into protos. [`status`] is the only place where errors
//! become `tonic::Status`.

pub mod convert;
pub mod key_service;
pub mod layer;
mod redact;
pub mod status;
pub mod usage_service;

/// Generated protobuf and tonic code for `sendable.keys.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("sendable.keys.v1");

    /// The encoded descriptor set (with comments and imports) served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sendable_keys_descriptor.bin"));
}

pub use key_service::KeyGrpc;
pub use usage_service::UsageGrpc;
