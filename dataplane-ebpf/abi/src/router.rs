//! Distributed routing (Neutron routers), done on the node of the sending port: a frame
//! a port sends to the MAC of one of a router's interfaces on its network is routed.
//!
//! 1. `ROUTER_IFS` (network, MAC) says which router the frame is for, and that
//!    interface's addresses (the source of what the router itself sends back).
//! 2. `ROUTES4`/`ROUTES6`, LPM tries keyed by (router, destination), give where it goes:
//!    a subnet of one of the router's interfaces (on-link), a static route's next hop
//!    (`VIA`), or one of the router's own addresses (`LOCAL`: it answers pings).
//! 3. `NEIGH4`/`NEIGH6` (network, address) give the next hop's MAC: the addresses of
//!    the ports on the networks routers attach to, and the routers' own (`ROUTER`:
//!    the datapath answers ARP and neighbour solicitations for those).
//!
//! The frame then leaves the router with the router's MAC on the next hop's network as
//! source, the next hop's as destination, TTL (hop limit) one less, and is switched on
//! that network like any other: the receiver's `port_egress` applies its rules. The
//! sender's egress rules judged it already, with the final destination as remote.

/// Bits of the router slot at the front of a route key: an entry's prefix length is
/// `ROUTE_FIXED_BITS + destination prefix length`.
pub const ROUTE_FIXED_BITS: u32 = 32;

/// `ROUTER_IFS`: hash map, key `FdbKey` (network slot, interface MAC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouterIf {
    pub router_slot: u32,
    /// The interface's IPv4 address on this network (network order); zero: none.
    pub ip4: [u8; 4],
    /// The interface's IPv6 address on this network; zero: none.
    pub ip6: [u8; 16],
}

/// Data of the `ROUTES4` LPM trie key. Value: [`Route`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey4 {
    pub router_slot: u32,
    /// Network byte order.
    pub addr: [u8; 4],
}

/// Data of the `ROUTES6` LPM trie key. Value: [`Route`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteKey6 {
    pub router_slot: u32,
    pub addr: [u8; 16],
}

/// `Route::flags`.
pub mod route_flags {
    /// One of the router's own addresses: the router answers echo requests to it.
    pub const LOCAL: u32 = 1 << 0;
    /// Through `nexthop` (a static route), not to the destination itself.
    pub const VIA: u32 = 1 << 1;
    /// Out through the router's external gateway (see `crate::nat`): `network_slot`,
    /// `mac` and `nexthop` are unused, `ROUTER_GW` has the way out.
    pub const EXTERNAL: u32 = 1 << 2;
    /// With `LOCAL`: another router's address (its gateway), one hop further: answered
    /// only when the TTL allows that hop.
    pub const BEYOND: u32 = 1 << 3;
}

/// Where a route leads: out of the router's interface on `network_slot`, whose MAC is
/// `mac`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Route {
    pub network_slot: u32,
    pub flags: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// With `VIA`: the next hop (IPv4 in the first 4 bytes).
    pub nexthop: [u8; 16],
}

/// `NEIGH4`: hash map key (network slot, IPv4 address). Value: [`Neighbor`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighKey4 {
    pub network_slot: u32,
    pub addr: [u8; 4],
}

/// `NEIGH6`: hash map key (network slot, IPv6 address). Value: [`Neighbor`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighKey6 {
    pub network_slot: u32,
    pub addr: [u8; 16],
}

/// `Neighbor::flags`.
pub mod neigh_flags {
    /// A router's own address: ARP requests and neighbour solicitations for it are
    /// answered by the datapath, with `mac`.
    pub const ROUTER: u32 = 1 << 0;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Neighbor {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<RouterIf>() == 24);
const _: () = assert!(core::mem::size_of::<RouteKey4>() == 8);
const _: () = assert!(core::mem::size_of::<RouteKey6>() == 20);
const _: () = assert!(core::mem::size_of::<Route>() == 32);
const _: () = assert!(core::mem::size_of::<NeighKey4>() == 8);
const _: () = assert!(core::mem::size_of::<NeighKey6>() == 20);
const _: () = assert!(core::mem::size_of::<Neighbor>() == 12);
