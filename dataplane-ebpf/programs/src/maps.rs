//! The maps of the port path. Names, key and value types are the ABI in
//! `dataplane_abi`; sizes are defaults the loader may change with `set_max_entries`.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use dataplane_abi::{
    ct_stat, CtEntry, CtKey, DropReason, ExternalAddr, FdbEntry, FdbKey, FixedAddr4, FixedNat4,
    FloatingIp4, FloodSet, NeighKey4, NeighKey6, Neighbor, PortAddr4, PortAddr6, PortInfo,
    PortMacKey, PortStats, RemoteKey4, RemoteKey6, Route, RouteKey4, RouteKey6, RouterGateway,
    RouterGateway6, RouterIf, RuleKey, RuleStats, RuleValue, SnatBinding4, SnatFlow4, SnatKey4,
    SnatOrigin4, Verdict,
};

use crate::{flow::Flow, nat::NatScratch, router::ErrorScratch};

#[map]
pub static PORTS: HashMap<u32, PortInfo> = HashMap::with_max_entries(4096, 0);

#[map]
pub static PORT_MACS: HashMap<PortMacKey, u32> = HashMap::with_max_entries(16384, 0);

#[map]
pub static PORT_IP4: HashMap<PortAddr4, u32> = HashMap::with_max_entries(65536, 0);

/// `LpmTrie` adds `BPF_F_NO_PREALLOC` itself (the kernel requires it).
#[map]
pub static PORT_NET4: LpmTrie<PortAddr4, u32> = LpmTrie::with_max_entries(16384, 0);

#[map]
pub static PORT_IP6: HashMap<PortAddr6, u32> = HashMap::with_max_entries(65536, 0);

#[map]
pub static PORT_NET6: LpmTrie<PortAddr6, u32> = LpmTrie::with_max_entries(16384, 0);

#[map]
pub static FDB: HashMap<FdbKey, FdbEntry> = HashMap::with_max_entries(65536, 0);

#[map]
pub static FLOOD: HashMap<u32, FloodSet> = HashMap::with_max_entries(4096, 0);

#[map]
pub static PORT_STATS: PerCpuArray<PortStats> = PerCpuArray::with_max_entries(4096, 0);

/// Security groups: remote address to address class, per policy and direction.
#[map]
pub static SG_REMOTE4: LpmTrie<RemoteKey4, u32> = LpmTrie::with_max_entries(65536, 0);

#[map]
pub static SG_REMOTE6: LpmTrie<RemoteKey6, u32> = LpmTrie::with_max_entries(65536, 0);

/// (address class, protocol, port) to the slot of the rule that allows it.
#[map]
pub static SG_RULES: LpmTrie<RuleKey, RuleValue> = LpmTrie::with_max_entries(262144, 0);

/// The full-length entries of the three tries above, looked up before them (see
/// `dataplane_abi::policy`). Preallocated: a write takes no allocation, and the set being
/// written has no readers, so an element reused at once is never seen half-written.
#[map]
pub static SG_HOST4: HashMap<RemoteKey4, u32> = HashMap::with_max_entries(65536, 0);

#[map]
pub static SG_HOST6: HashMap<RemoteKey6, u32> = HashMap::with_max_entries(65536, 0);

#[map]
pub static SG_RULE_PORTS: HashMap<RuleKey, RuleValue> = HashMap::with_max_entries(262144, 0);

#[map]
pub static RULE_STATS: PerCpuArray<RuleStats> = PerCpuArray::with_max_entries(131072, 0);

/// Confirmed connections. Not LRU: a full table refuses new connections rather than
/// forget established ones.
#[map]
pub static CT: HashMap<CtKey, CtEntry> = HashMap::with_max_entries(262144, 0);

/// Connections waiting for their first reply.
#[map]
pub static CT_NEW: LruHashMap<CtKey, CtEntry> = LruHashMap::with_max_entries(65536, 0);

#[map]
pub static CT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ct_stat::COUNT, 0);

/// Scratch space for the flow `policy::check` works on: kept off the stack, where the
/// call chain below `port_ingress` has 512 bytes in all. One per CPU: a program runs to
/// its end on its CPU, and the only nesting (`port_egress` inside the flood copies of
/// `port_ingress`) starts after `port_ingress` is done with it. Not part of the ABI.
#[map]
pub static SG_FLOW: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static NOPORT_DROPS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(DropReason::COUNT as u32, 0);

#[map]
pub static VERDICT: PerCpuArray<Verdict> = PerCpuArray::with_max_entries(1, 0);

/// Routing (see `dataplane_abi::router`).
#[map]
pub static ROUTER_IFS: HashMap<FdbKey, RouterIf> = HashMap::with_max_entries(4096, 0);

#[map]
pub static ROUTES4: LpmTrie<RouteKey4, Route> = LpmTrie::with_max_entries(16384, 0);

#[map]
pub static ROUTES6: LpmTrie<RouteKey6, Route> = LpmTrie::with_max_entries(16384, 0);

#[map]
pub static NEIGH4: HashMap<NeighKey4, Neighbor> = HashMap::with_max_entries(65536, 0);

#[map]
pub static NEIGH6: HashMap<NeighKey6, Neighbor> = HashMap::with_max_entries(65536, 0);

/// Scratch space of the router's ICMP errors (see `router::ErrorScratch`).
#[map]
pub static ERROR_SCRATCH: PerCpuArray<ErrorScratch> = PerCpuArray::with_max_entries(1, 0);

/// The external network and NAT (see `dataplane_abi::nat`).
#[map]
pub static ROUTER_GW: HashMap<u32, RouterGateway> = HashMap::with_max_entries(4096, 0);

#[map]
pub static GATEWAY_MACS: HashMap<[u8; 6], u32> = HashMap::with_max_entries(4096, 0);

#[map]
pub static EXT_ADDRS4: HashMap<[u8; 4], ExternalAddr> = HashMap::with_max_entries(65536, 0);

#[map]
pub static ROUTER_GW6: HashMap<u32, RouterGateway6> = HashMap::with_max_entries(4096, 0);

#[map]
pub static EXT_ADDRS6: HashMap<[u8; 16], ExternalAddr> = HashMap::with_max_entries(4096, 0);

#[map]
pub static FIPS4: HashMap<[u8; 4], FloatingIp4> = HashMap::with_max_entries(65536, 0);

#[map]
pub static FIP_OF4: HashMap<FixedAddr4, FixedNat4> = HashMap::with_max_entries(65536, 0);

/// SNAT bindings. LRU: under pressure the least recently used binding goes, as an
/// idle one would after its lifetime.
#[map]
pub static SNAT4_IN: LruHashMap<SnatKey4, SnatOrigin4> = LruHashMap::with_max_entries(262144, 0);

#[map]
pub static SNAT4_OUT: LruHashMap<SnatFlow4, SnatBinding4> = LruHashMap::with_max_entries(262144, 0);

/// Scratch space of SNAT's bindings (see `nat::NatScratch`).
#[map]
pub static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// Counters of the uplink NIC: rx what arrived from outside, tx what left to it.
#[map]
pub static UPLINK_STATS: PerCpuArray<PortStats> = PerCpuArray::with_max_entries(1, 0);

/// The port on device `ifindex` and its counters. A port whose slot has no counters
/// (a slot beyond `PORT_STATS`' size) is treated as no port: nothing it does could be
/// accounted for.
#[inline(always)]
pub fn port(ifindex: u32) -> Option<(&'static PortInfo, &'static mut PortStats)> {
    // SAFETY: the agent replaces a port's entry with one update, never in place.
    let port = unsafe { PORTS.get(ifindex) }?;
    let stats = PORT_STATS.get_ptr_mut(port.port_slot)?;
    // SAFETY: per-CPU value; this program is its only user on this CPU for the packet.
    Some((port, unsafe { &mut *stats }))
}
