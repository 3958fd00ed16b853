//! The map ABI between the eBPF programs and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of `bool`/`Option` and of implicit
//! padding (explicit `_pad` fields, checked by the size asserts at the bottom), so the
//! same bytes mean the same thing on both sides. A layout change never happens in place:
//! bump [`ABI_VERSION`] (it is part of every pin path) and add new types beside the old.
#![no_std]

mod conntrack;
mod drop_reason;
mod monitor;
mod nat;
mod policy;
mod router;
mod traffic;

pub use conntrack::*;
pub use drop_reason::DropReason;
pub use monitor::*;
pub use nat::*;
pub use policy::*;
pub use router::*;
pub use traffic::*;

/// Version of the map layout below. Part of the bpffs pin path, so an agent never
/// reads maps pinned by an agent with another layout.
/// v2: `PortInfo` gained the port's security-group policy; policy and conntrack maps.
/// v3: `FdbEntry` gained `flags` (peer delivery); routing maps.
/// v4: `route_flags::EXTERNAL`; the uplink's NAT maps and programs.
/// v5: IPv6 on external networks (`ROUTER_GW6`, `EXT_ADDRS6`).
/// v6: two map sets behind a dispatcher (`ACTIVE_SET`, `IN_FLIGHT`, the stage arrays);
/// pins split into the programs' shared state and one directory per set; the packet
/// monitor (`EVENTS`, `EVENTS_LOST`, `MONITOR_CONFIG`).
/// v7: the full-length entries of the security-group tries in hash maps of their own
/// (`SG_HOST4`, `SG_HOST6`, `SG_RULE_PORTS`), looked up first.
pub const ABI_VERSION: u32 = 7;

/// Slot 0 of ports and networks is never assigned: it stands for "no port".
pub const NO_SLOT: u32 = 0;

/// Most ports of one network that one node floods a frame to. Bounds the flood loop.
pub const MAX_FLOOD_PORTS: usize = 64;

/// Map names as they appear in the object file (and under the pin directory).
pub mod map_names {
    pub const PORTS: &str = "PORTS";
    pub const PORT_MACS: &str = "PORT_MACS";
    pub const PORT_IP4: &str = "PORT_IP4";
    pub const PORT_NET4: &str = "PORT_NET4";
    pub const PORT_IP6: &str = "PORT_IP6";
    pub const PORT_NET6: &str = "PORT_NET6";
    pub const FDB: &str = "FDB";
    pub const FLOOD: &str = "FLOOD";
    pub const PORT_STATS: &str = "PORT_STATS";
    pub const SG_REMOTE4: &str = "SG_REMOTE4";
    pub const SG_REMOTE6: &str = "SG_REMOTE6";
    pub const SG_RULES: &str = "SG_RULES";
    pub const SG_HOST4: &str = "SG_HOST4";
    pub const SG_HOST6: &str = "SG_HOST6";
    pub const SG_RULE_PORTS: &str = "SG_RULE_PORTS";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const CT: &str = "CT";
    pub const CT_NEW: &str = "CT_NEW";
    pub const CT_STATS: &str = "CT_STATS";
    pub const NOPORT_DROPS: &str = "NOPORT_DROPS";
    pub const VERDICT: &str = "VERDICT";
    pub const ROUTER_IFS: &str = "ROUTER_IFS";
    pub const ROUTES4: &str = "ROUTES4";
    pub const ROUTES6: &str = "ROUTES6";
    pub const NEIGH4: &str = "NEIGH4";
    pub const NEIGH6: &str = "NEIGH6";
    pub const ROUTER_GW: &str = "ROUTER_GW";
    pub const GATEWAY_MACS: &str = "GATEWAY_MACS";
    pub const EXT_ADDRS4: &str = "EXT_ADDRS4";
    pub const ROUTER_GW6: &str = "ROUTER_GW6";
    pub const EXT_ADDRS6: &str = "EXT_ADDRS6";
    pub const FIPS4: &str = "FIPS4";
    pub const FIP_OF4: &str = "FIP_OF4";
    pub const SNAT4_IN: &str = "SNAT4_IN";
    pub const SNAT4_OUT: &str = "SNAT4_OUT";
    pub const UPLINK_STATS: &str = "UPLINK_STATS";
    pub const ACTIVE_SET: &str = "ACTIVE_SET";
    pub const IN_FLIGHT: &str = "IN_FLIGHT";
    pub const TC_STAGES: &str = "TC_STAGES";
    pub const XDP_STAGES: &str = "XDP_STAGES";
    /// Ring buffer of [`super::MonitorEvent`]s.
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU `u64`: events dropped because `EVENTS` was full.
    pub const EVENTS_LOST: &str = "EVENTS_LOST";
    /// Array of one `u32`, a [`super::monitor_mode`], written by the agent.
    pub const MONITOR_CONFIG: &str = "MONITOR_CONFIG";
}

/// The desired-state maps exist twice, as map sets 0 and 1: the agent writes a whole
/// update into the set packets do not use, then switches `ACTIVE_SET[0]` to it, so that
/// one update becomes visible all at once. Each hook's program is a dispatcher that
/// picks the active set and tail-calls that set's copy of the real program (its stage).
pub mod map_set {
    /// How many sets there are.
    pub const COUNT: u32 = 2;
    /// `TC_STAGES` index of a tc stage: `stage * COUNT + set`.
    pub const PORT_INGRESS: u32 = 0;
    pub const PORT_EGRESS: u32 = 1;
    pub const UPLINK_INGRESS: u32 = 2;
    /// Entries of `TC_STAGES`.
    pub const TC_STAGES: u32 = 3 * COUNT;
    /// Entries of `XDP_STAGES` (`uplink_xdp`'s stage, by set).
    pub const XDP_STAGES: u32 = COUNT;
}

/// Program names as they appear in the object file.
pub mod program_names {
    /// tcx ingress of a port's device: frames the VM sends.
    pub const PORT_INGRESS: &str = "port_ingress";
    /// tcx egress of a port's device: frames delivered to the VM.
    pub const PORT_EGRESS: &str = "port_egress";
    /// A classifier that returns `TC_ACT_OK` at once: the benchmark floor.
    pub const NOOP_TC: &str = "noop_tc";
    /// XDP on the uplink NIC: ARP for the external addresses, early drops.
    pub const UPLINK_XDP: &str = "uplink_xdp";
    /// tcx ingress of the uplink NIC: inbound translation and delivery.
    pub const UPLINK_INGRESS: &str = "uplink_ingress";
    /// An XDP program that passes every frame: the benchmark floor of `uplink_xdp`.
    pub const NOOP_XDP: &str = "noop_xdp";
    /// The real programs behind the dispatchers above (see [`super::map_set`]).
    pub const PORT_INGRESS_STAGE: &str = "port_ingress_stage";
    pub const PORT_EGRESS_STAGE: &str = "port_egress_stage";
    pub const UPLINK_INGRESS_STAGE: &str = "uplink_ingress_stage";
    pub const UPLINK_XDP_STAGE: &str = "uplink_xdp_stage";
}

/// Names of read-only globals the loader may set (`.rodata`, frozen before load, so the
/// verifier removes the code they switch off).
pub mod global_names {
    /// `u32`: when 1, every packet of `port_ingress` writes its [`super::Verdict`]
    /// into the `VERDICT` map. Used by packet tests; off (0) in production.
    pub const TRACE_VERDICT: &str = "TRACE_VERDICT";
    /// `u32`: which map set (see [`super::map_set`]) this copy of the object's maps is;
    /// the stages of the copy account their runs to it.
    pub const MAP_SET: &str = "MAP_SET";
}

/// `skb->mark` stamped by `port_ingress` on frames it hands to another port, so that
/// `port_egress` can tell them from frames the host's own stack sends to the device.
/// The low 16 bits carry the sending port's slot (slots stay below 65,536: the agent's
/// `max_ports` is capped there).
pub const MARK_FROM_DATAPATH: u32 = 0x0da7_0000;
pub const MARK_MAGIC_MASK: u32 = 0xffff_0000;

/// `PortInfo::flags`.
pub mod port_flags {
    /// The port and its network are administratively up.
    pub const ADMIN_UP: u32 = 1 << 0;
    /// Port security checks apply (source MAC/IP, ARP, ND, RA, DHCP server).
    pub const PORT_SECURITY: u32 = 1 << 1;
    /// The port has IPv4 allowed address pairs wider than /32: consult `PORT_NET4`
    /// when `PORT_IP4` has no exact entry. Keeps the trie walk off the common path.
    pub const HAS_NET4: u32 = 1 << 2;
    /// As `HAS_NET4`, for IPv6 prefixes shorter than /128 and `PORT_NET6`.
    pub const HAS_NET6: u32 = 1 << 3;
    /// Security groups apply: IP traffic from the VM must be allowed by an egress rule,
    /// to the VM by an ingress rule, of the port's policy (`PortInfo::policy_id`).
    pub const POLICY: u32 = 1 << 4;
    /// The port's groups are stateful: connections are tracked in `CT` (zone = port
    /// slot), replies and related ICMP errors pass without a rule.
    pub const STATEFUL: u32 = 1 << 5;
}

/// `FdbEntry::flags`.
pub mod fdb_flags {
    /// The port's device is a veth whose other end (the VM's or container's) is in
    /// another network namespace: `port_ingress` applies the port's delivery checks
    /// (what `port_egress` would) and hands unicast frames straight to that end with
    /// `bpf_redirect_peer`, skipping the device's transmit path. Floods still go
    /// through the device and `port_egress`. In the FDB entry, not in `PortInfo`, so
    /// that the other ports' unicast path needs no lookup of the receiver's port.
    pub const PEER_DELIVERY: u32 = 1 << 0;
}

/// `FloodEntry::flags`.
pub mod flood_flags {
    /// Receives unicast frames whose destination MAC is in no FDB entry: ports without
    /// port security, and ports whose allowed address pairs name other MACs.
    pub const ACCEPTS_UNKNOWN: u32 = 1 << 0;
}

/// `PORTS`: hash map, key `u32` ifindex of the port's device on this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortInfo {
    pub port_slot: u32,
    pub network_slot: u32,
    pub flags: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The port's security-group policy: ports with the same groups share one.
    pub policy_id: u32,
    /// Digest of the compiled rules of `policy_id`. A tracked connection admitted under
    /// another revision is judged again by the current rules (and cut if they no longer
    /// allow it), so a policy change reaches established connections at once.
    pub policy_revision: u32,
}

/// `PORT_MACS`: hash map of the source MACs a port may send from; value `u32` (unused, 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortMacKey {
    pub port_slot: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// A (port, source MAC, source IPv4) the port may send from. Key of two maps, value
/// `u32` (unused, 1):
/// - `PORT_IP4`, a hash map of exact host addresses (fixed IPs, /32 pairs);
/// - `PORT_NET4`, an LPM trie of pair prefixes shorter than /32, as the data of its key:
///   the first [`PORT_ADDR_FIXED_BITS`] bits always match exactly, so an entry's prefix
///   length is `PORT_ADDR_FIXED_BITS + cidr prefix length`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortAddr4 {
    pub port_slot: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Network byte order.
    pub addr: [u8; 4],
}

/// As [`PortAddr4`] for IPv6: key of `PORT_IP6` (hash) and `PORT_NET6` (LPM trie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortAddr6 {
    pub port_slot: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Network byte order.
    pub addr: [u8; 16],
}

/// Bits of the port/MAC part of the address trie keys (`port_slot`, `mac`, `_pad`).
pub const PORT_ADDR_FIXED_BITS: u32 = 96;

/// `FDB`: hash map from (network, destination MAC) to the port that owns the MAC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdbKey {
    pub network_slot: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    pub ifindex: u32,
    pub port_slot: u32,
    /// `fdb_flags`.
    pub flags: u32,
}

/// One port of a network's flood set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FloodEntry {
    pub ifindex: u32,
    pub flags: u32,
}

/// `FLOOD`: hash map, key `u32` network slot; the ports of that network on this node
/// that broadcast, multicast and (with `ACCEPTS_UNKNOWN`) unknown unicast go to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FloodSet {
    /// Entries in use, from the front of `ports`.
    pub count: u32,
    pub _pad: u32,
    pub ports: [FloodEntry; MAX_FLOOD_PORTS],
}

impl Default for FloodSet {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            ports: [FloodEntry::default(); MAX_FLOOD_PORTS],
        }
    }
}

/// `PORT_STATS`: per-CPU array indexed by port slot. "rx" is what the port's device
/// received from the VM; "tx" is what was delivered to the VM.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Indexed by `DropReason as usize`.
    pub drops: [u64; DropReason::COUNT],
}

impl Default for PortStats {
    fn default() -> Self {
        Self {
            rx_packets: 0,
            rx_bytes: 0,
            tx_packets: 0,
            tx_bytes: 0,
            drops: [0; DropReason::COUNT],
        }
    }
}

/// `Verdict::action`.
pub mod verdict_action {
    pub const DROP: u32 = 1;
    /// Delivered to one port: `ifindexes[0]`.
    pub const UNICAST: u32 = 2;
    /// Copied to `count` ports: `ifindexes[..count]`.
    pub const FLOOD: u32 = 3;
}

/// `VERDICT`: per-CPU array of one entry, written by `port_ingress` for each packet when
/// `TRACE_VERDICT` is set. Lets packet tests see where a frame went. `port_egress` never
/// writes it: it runs nested inside `port_ingress`'s flood copies on the same CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: u32,
    /// `DropReason` when `action` is `DROP`.
    pub reason: u32,
    pub count: u32,
    pub _pad: u32,
    pub ifindexes: [u32; MAX_FLOOD_PORTS],
}

impl Default for Verdict {
    fn default() -> Self {
        Self {
            action: 0,
            reason: 0,
            count: 0,
            _pad: 0,
            ifindexes: [0; MAX_FLOOD_PORTS],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `repr(C)`, `Copy`, with every byte part of a field (the
    // size asserts below prove there is no implicit padding), so any bytes are valid.
    unsafe impl aya::Pod for PortInfo {}
    unsafe impl aya::Pod for PortMacKey {}
    unsafe impl aya::Pod for PortAddr4 {}
    unsafe impl aya::Pod for PortAddr6 {}
    unsafe impl aya::Pod for FdbKey {}
    unsafe impl aya::Pod for FdbEntry {}
    unsafe impl aya::Pod for FloodEntry {}
    unsafe impl aya::Pod for FloodSet {}
    unsafe impl aya::Pod for PortStats {}
    unsafe impl aya::Pod for Verdict {}
    unsafe impl aya::Pod for RemoteKey4 {}
    unsafe impl aya::Pod for RemoteKey6 {}
    unsafe impl aya::Pod for RuleKey {}
    unsafe impl aya::Pod for RuleStats {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for RouterIf {}
    unsafe impl aya::Pod for RouteKey4 {}
    unsafe impl aya::Pod for RouteKey6 {}
    unsafe impl aya::Pod for Route {}
    unsafe impl aya::Pod for NeighKey4 {}
    unsafe impl aya::Pod for NeighKey6 {}
    unsafe impl aya::Pod for Neighbor {}
    unsafe impl aya::Pod for RouterGateway {}
    unsafe impl aya::Pod for RouterGateway6 {}
    unsafe impl aya::Pod for ExternalAddr {}
    unsafe impl aya::Pod for FloatingIp4 {}
    unsafe impl aya::Pod for FixedAddr4 {}
    unsafe impl aya::Pod for FixedNat4 {}
    unsafe impl aya::Pod for SnatKey4 {}
    unsafe impl aya::Pod for SnatOrigin4 {}
    unsafe impl aya::Pod for SnatFlow4 {}
    unsafe impl aya::Pod for SnatBinding4 {}
    unsafe impl aya::Pod for MonitorEvent {}
}

// No implicit padding: each size is the sum of its fields.
const _: () = assert!(core::mem::size_of::<PortInfo>() == 28);
const _: () = assert!(core::mem::size_of::<PortMacKey>() == 12);
const _: () = assert!(core::mem::size_of::<PortAddr4>() == 16);
const _: () = assert!(core::mem::size_of::<PortAddr6>() == 28);
const _: () = assert!(core::mem::size_of::<FdbKey>() == 12);
const _: () = assert!(core::mem::size_of::<FdbEntry>() == 12);
const _: () = assert!(core::mem::size_of::<FloodEntry>() == 8);
const _: () = assert!(core::mem::size_of::<FloodSet>() == 8 + 8 * MAX_FLOOD_PORTS);
const _: () = assert!(core::mem::size_of::<PortStats>() == 32 + 8 * DropReason::COUNT);
const _: () = assert!(core::mem::size_of::<Verdict>() == 16 + 4 * MAX_FLOOD_PORTS);
const _: () = assert!(PORT_ADDR_FIXED_BITS as usize == 8 * 12);
