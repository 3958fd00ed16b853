//! The gRPC service layer: proto ⇄ core conversion, error mapping, serving.
pub mod convert;
pub mod errors;
pub mod grpc;
pub mod limits;
pub mod metrics;
pub mod server;
