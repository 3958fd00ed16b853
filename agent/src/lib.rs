//! The dataplane agent: receives desired state over gRPC, compiles it into eBPF map
//! contents and keeps the node's datapath programmed.
//!
//! Layers, each a module: [`core`] is pure (model, validation, compiler: no kernel, no
//! I/O); [`kernel`] owns BPF objects, maps, links and netlink; [`node`] keeps desired
//! state and datapath in step; [`service`] converts between proto and the core and maps
//! errors to gRPC codes; `main` wires them up.
pub mod client;
pub mod config;
pub mod core;
pub mod kernel;
pub mod node;
pub mod service;
pub mod store;
