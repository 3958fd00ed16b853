//! The benchmark's traffic object (`dataplane-traffic`), separate from the datapath:
//! `traffic_gen` is run with BPF_PROG_TEST_RUN in live-frames mode and sends each frame
//! out of a device, varying the UDP source port over a number of flows; `traffic_sink`
//! sits on the receiving device and counts (then drops) the UDP frames that arrive. The
//! agent never loads it, and nothing of it is pinned, so it is outside `ABI_VERSION`.

/// Program names in the traffic object.
pub mod traffic_programs {
    /// XDP, for live-frames test runs: rewrites the UDP source port, redirects.
    pub const GEN: &str = "traffic_gen";
    /// tc ingress of the receiving device: counts UDP frames into `SINK_STATS`, drops
    /// them; passes everything else (ARP, ICMP) to the stack.
    pub const SINK: &str = "traffic_sink";
    /// XDP that passes everything: on the veth the generator's frames arrive at, it
    /// turns on the NAPI that takes XDP frames from the peer, without GRO's cost.
    pub const PASS: &str = "traffic_pass";
}

/// Read-only globals of `traffic_gen`, set at load.
pub mod traffic_globals {
    /// `u32`: ifindex of the device frames leave by (in the test run's namespace).
    pub const GEN_IFINDEX: &str = "GEN_IFINDEX";
    /// `u32`: number of flows; frame `n` gets source port `GEN_FIRST_PORT + n % flows`.
    pub const GEN_FLOWS: &str = "GEN_FLOWS";
    /// `u32`: the first source port (low 16 bits).
    pub const GEN_FIRST_PORT: &str = "GEN_FIRST_PORT";
}

/// Map names in the traffic object.
pub mod traffic_maps {
    /// Per-CPU `u32`: frames this CPU generated (drives the source port).
    pub const GEN_SEQ: &str = "GEN_SEQ";
    /// Per-CPU `u64` array indexed by [`super::sink_stat`].
    pub const SINK_STATS: &str = "SINK_STATS";
    /// Array of one [`super::GenTemplate`]: the headers every frame is sent with.
    pub const GEN_TEMPLATE: &str = "GEN_TEMPLATE";
}

/// Most header bytes `traffic_gen` restores: Ethernet, IPv6, UDP.
pub const GEN_TEMPLATE_LEN: usize = 64;

/// The frame's headers as the generator's user set them. A live-frames run recycles
/// its pages as receivers free them, with whatever those wrote into them (a router
/// rewrites MACs, TTL, addresses in place): `traffic_gen` writes the headers back
/// before each send.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenTemplate {
    pub bytes: [u8; GEN_TEMPLATE_LEN],
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `Copy`, one byte array: any bytes are valid.
unsafe impl aya::Pod for GenTemplate {}

/// Indices of `SINK_STATS`.
pub mod sink_stat {
    pub const PACKETS: u32 = 0;
    pub const BYTES: u32 = 1;
    pub const COUNT: u32 = 2;
}
