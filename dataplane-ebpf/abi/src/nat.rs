//! The external network and NAT (Neutron routers' gateways and floating IPs), IPv4.
//!
//! A router with an external gateway has a `ROUTES4` entry with `route_flags::EXTERNAL`
//! (its default route): what it routes there leaves through the node's uplink NIC,
//! translated:
//! - from a fixed address with a floating IP (`FIP_OF4`): source → the floating IP,
//!   1:1, no state;
//! - else, with SNAT on (`gateway_flags::SNAT`): source → the router's gateway address
//!   and a port (ICMP echo: identifier) picked from its range so that no two
//!   connections to one remote endpoint share it. `SNAT4_OUT` remembers the binding
//!   for the connection's later packets, `SNAT4_IN` maps replies back; full ranges are
//!   counted as `DropReason::NatPortsExhausted`.
//!
//! Inbound, on the uplink: `uplink_xdp` answers ARP for `EXT_ADDRS4` (the gateways' and
//! the associated floating IPs' addresses) and drops what is for an address it holds
//! no translation of; `uplink_ingress` (tc) translates (`FIPS4`: floating → fixed;
//! `SNAT4_IN`: gateway address and port → the connection's source) and delivers to
//! the port, whose ingress rules see the fixed address. A VM sending to a floating IP
//! or gateway address this node translates goes the same way without leaving the node
//! (hairpin). ICMP errors have the header they quote translated too.
//!
//! IPv6 is routed, not translated (the Networking API has no IPv6 NAT): a router with
//! an IPv6 external fixed IP has a `ROUTES6` default route with `route_flags::EXTERNAL`
//! that leaves by `ROUTER_GW6`; `uplink_xdp` answers neighbour solicitations and pings
//! for `EXT_ADDRS6` (the gateways' IPv6 addresses); what arrives for a gateway port's MAC
//! (`GATEWAY_MACS`) is routed in by the router's `ROUTES6`.

/// `ROUTER_GW`: hash map, key `u32` router slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouterGateway {
    /// The uplink NIC's ifindex.
    pub uplink_ifindex: u32,
    /// `gateway_flags`.
    pub flags: u32,
    /// The router's address on the external network: the SNAT source (network order).
    pub ip4: [u8; 4],
    /// First SNAT port and how many there are (host order).
    pub port_min: u16,
    pub port_count: u16,
    /// The router's gateway port's MAC: source of what leaves through the uplink.
    pub mac: [u8; 6],
    /// The external subnet's gateway's MAC (resolved by the agent): destination of what
    /// leaves. All zero: not resolved yet, dropped as `NoNeighbor`.
    pub nexthop_mac: [u8; 6],
}

/// `ROUTER_GW6`: hash map, key `u32` router slot. The IPv6 way out of a router with an
/// IPv6 external fixed IP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouterGateway6 {
    /// The uplink NIC's ifindex.
    pub uplink_ifindex: u32,
    /// The router's IPv6 address on the external network.
    pub ip6: [u8; 16],
    /// The router's gateway port's MAC: source of what leaves through the uplink.
    pub mac: [u8; 6],
    /// The external subnet's IPv6 gateway's MAC (resolved by the agent). All zero: not
    /// resolved yet, dropped as `NoNeighbor`.
    pub nexthop_mac: [u8; 6],
}

/// `RouterGateway::flags`.
pub mod gateway_flags {
    /// `enable_snat`: ports without a floating IP reach the outside as the gateway.
    pub const SNAT: u32 = 1 << 0;
}

// `GATEWAY_MACS`: hash map, key a router's gateway port MAC, value `u32` router slot.
// A frame on the uplink for that MAC and no `EXT_ADDRS4` address is routed by that
// router's routes, untranslated (routers without SNAT, upstreams routing tenant
// subnets to the gateway).

/// `EXT_ADDRS4`: hash map, key an IPv4 address (network order) on the uplink's
/// network: one that this node answers for or translates.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExternalAddr {
    /// The MAC ARP replies give (the router's gateway port's).
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// `ext_addr_flags`.
    pub flags: u32,
}

/// `ExternalAddr::flags`.
pub mod ext_addr_flags {
    /// A router's gateway address: replies to its SNAT bindings arrive here.
    pub const GATEWAY: u32 = 1 << 0;
    /// An associated floating IP (in `FIPS4`).
    pub const FLOATING: u32 = 1 << 1;
    /// A floating IP not associated with a port: not answered for; what arrives for it
    /// is dropped as `NoNatBinding`, never handed to the host.
    pub const UNBOUND: u32 = 1 << 2;
}

// `EXT_ADDRS6`: hash map, key an IPv6 address on the uplink's network, value
// `ExternalAddr` (flags `GATEWAY` only): the routers' IPv6 gateway addresses, which
// `uplink_xdp` answers neighbour solicitations and pings for.

/// `FIPS4`: hash map, key the floating IPv4 address (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FloatingIp4 {
    /// The port's fixed address it stands for.
    pub fixed: [u8; 4],
    /// The port's network.
    pub network_slot: u32,
    pub router_slot: u32,
    /// The router's interface MAC on that network: source of what it delivers.
    pub router_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// `FIP_OF4` key: a fixed address on a network. Value: [`FixedNat4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FixedAddr4 {
    pub network_slot: u32,
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FixedNat4 {
    pub floating: [u8; 4],
    /// The router the floating IP is on: only its routing translates.
    pub router_slot: u32,
}

/// `SNAT4_IN` key: a translated connection as replies see it. Ports in host order;
/// ICMP echo: the identifier as `external_port`, `remote_port` 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnatKey4 {
    pub external: [u8; 4],
    pub remote: [u8; 4],
    pub external_port: u16,
    pub remote_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `SNAT4_IN` value: where replies go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnatOrigin4 {
    pub internal: [u8; 4],
    pub network_slot: u32,
    pub internal_port: u16,
    /// The router's interface MAC on that network.
    pub router_mac: [u8; 6],
    /// `bpf_ktime_get_coarse_ns` of the connection's last packet, either way.
    pub last_seen: u64,
    /// How long after `last_seen` the binding may be taken by another connection (ns).
    pub lifetime: u64,
}

/// `SNAT4_OUT` key: a connection as its source sends it (ports host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnatFlow4 {
    pub network_slot: u32,
    pub internal: [u8; 4],
    pub remote: [u8; 4],
    pub internal_port: u16,
    pub remote_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// `SNAT4_OUT` value: the binding of a connection. Valid while `SNAT4_IN` at
/// (`external`, `external_port`, remote) still points back to the connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SnatBinding4 {
    pub external: [u8; 4],
    pub external_port: u16,
    pub _pad: [u8; 2],
}

/// How long an idle binding holds its port, by protocol state (ns).
pub mod snat_lifetime {
    pub const TCP: u64 = 7_440 * 1_000_000_000;
    /// After a FIN or RST.
    pub const TCP_CLOSING: u64 = 10 * 1_000_000_000;
    pub const UDP: u64 = 60 * 1_000_000_000;
    pub const ICMP: u64 = 30 * 1_000_000_000;
}

/// How many ports SNAT tries for a new connection before counting the range as
/// exhausted: all of them in a range this small or smaller.
pub const SNAT_PROBES: u32 = 32;

const _: () = assert!(core::mem::size_of::<RouterGateway>() == 28);
const _: () = assert!(core::mem::size_of::<RouterGateway6>() == 32);
const _: () = assert!(core::mem::size_of::<ExternalAddr>() == 12);
const _: () = assert!(core::mem::size_of::<FloatingIp4>() == 20);
const _: () = assert!(core::mem::size_of::<FixedAddr4>() == 8);
const _: () = assert!(core::mem::size_of::<FixedNat4>() == 8);
const _: () = assert!(core::mem::size_of::<SnatKey4>() == 16);
const _: () = assert!(core::mem::size_of::<SnatOrigin4>() == 32);
const _: () = assert!(core::mem::size_of::<SnatFlow4>() == 20);
const _: () = assert!(core::mem::size_of::<SnatBinding4>() == 8);
