//! Generated types and service stubs of the `dataplane.v1` gRPC API.

/// `dataplane.v1`, generated from `proto/dataplane.proto`.
pub mod v1 {
    // Generated code: `Change.op` holds a whole resource by design.
    #![allow(clippy::large_enum_variant)]
    tonic::include_proto!("dataplane.v1");

    /// Encoded descriptor set of `dataplane.proto`, for the gRPC reflection service.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("dataplane_descriptor");
}
