//! Everything that touches the kernel: the BPF object, its maps and links, netlink.

pub mod bpffs;
pub mod datapath;
pub mod links;
pub mod monitor;
pub mod neighbor;

/// The eBPF object built from `dataplane-ebpf/programs` by this crate's build script.
pub static BPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane.bpf.o"));

/// The benchmark's traffic generator and sink (`dataplane_abi::traffic_programs`), built
/// with the datapath by the same build script. The agent never loads it.
pub static TRAFFIC_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/traffic.bpf.o"));
