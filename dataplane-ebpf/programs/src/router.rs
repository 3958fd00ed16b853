//! Distributed routing (see `dataplane_abi::router`): frames a port sends to a router
//! interface's MAC are routed here, on the sender's node; the router's own addresses
//! answer ARP, neighbour solicitations and pings.
//!
//! Every function leaves the frame ready to go and returns the FDB entry of the port it
//! goes to (the receiver, or the sender itself for an answer); the caller stamps and
//! delivers it like a switched frame. Writes go through `bpf_skb_store_bytes` and the
//! checksum helpers, which keep the packet consistent for the kernel.
use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_skb_change_tail, bpf_skb_load_bytes},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use dataplane_abi::{
    neigh_flags, route_flags, DropReason, FdbEntry, FdbKey, NeighKey4, NeighKey6, Neighbor,
    PortInfo, Route, RouteKey4, RouteKey6, RouterGateway6, RouterIf, ROUTE_FIXED_BITS,
};

use crate::{
    arp::{ARP_REPLY, ARP_REQUEST},
    csum::{add, fold, sum},
    drop,
    eth::{self, EthHdr, Mac, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6},
    ipv4::{self, Ipv4},
    ipv6::{self, Ipv6, ICMP6_NEIGH_SOLICIT, IPPROTO_ICMPV6, ND_OPT_SOURCE_LL_ADDR},
    l4::{ICMP6_ECHO_REPLY, ICMP6_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IPPROTO_ICMP},
    maps::{
        ERROR_SCRATCH, EXT_ADDRS4, FDB, GATEWAY_MACS, NEIGH4, NEIGH6, PORT_STATS, ROUTER_GW,
        ROUTER_GW6, ROUTER_IFS, ROUTES4, ROUTES6, UPLINK_STATS,
    },
    nat,
    nd::{NaMsg, ND_HOP_LIMIT, ND_LEN},
    packet::Packet,
};

/// TTL of what the router itself sends.
pub(crate) const ROUTER_TTL: u8 = 64;

/// Offsets in the IPv4 header.
const IP4_TTL: usize = ETH_HLEN + 8;
const IP4_CHECK: usize = ETH_HLEN + 10;
const IP4_SRC: usize = ETH_HLEN + 12;
const IP4_DST: usize = ETH_HLEN + 16;
/// Offsets in the IPv6 header.
const IP6_HOP_LIMIT: usize = ETH_HLEN + 7;
const IP6_SRC: usize = ETH_HLEN + 8;
const IP6_DST: usize = ETH_HLEN + 24;

/// The router interface `dst` is on the sender's network, if it is one.
#[inline(always)]
pub fn interface(port: &PortInfo, dst: &Mac) -> Option<&'static RouterIf> {
    let key = FdbKey {
        network_slot: port.network_slot,
        mac: *dst,
        _pad: [0; 2],
    };
    // SAFETY: the agent replaces entries with one update, never in place.
    unsafe { ROUTER_IFS.get(&key) }
}

#[inline(always)]
fn store<T>(ctx: &TcContext, off: usize, value: &T) -> Result<(), DropReason> {
    ctx.store(off, value, 0)
        .map_err(|_| DropReason::RedirectFailed)
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, DropReason> {
    ctx.load(off).map_err(|_| DropReason::MalformedL4)
}

/// Ethernet addresses of a frame the router sends: to `dst`, from `src`. Written in
/// place: no checksum covers them.
#[inline(always)]
pub(crate) fn set_macs(ctx: &TcContext, dst: &Mac, src: &Mac) -> Result<(), DropReason> {
    let mut pkt = Packet::new(ctx);
    let eth: &mut EthHdr = pkt.at_mut(0).ok_or(DropReason::MalformedEthernet)?;
    eth.dst = *dst;
    eth.src = *src;
    Ok(())
}

/// The FDB entry of `mac` on network `network_slot`.
#[inline(always)]
fn port_of(network_slot: u32, mac: &Mac) -> Result<FdbEntry, DropReason> {
    let key = FdbKey {
        network_slot,
        mac: *mac,
        _pad: [0; 2],
    };
    // SAFETY: as in `interface`.
    unsafe { FDB.get(&key) }
        .copied()
        .ok_or(DropReason::UnknownDestination)
}

/// Routes what the sender addressed to the MAC of `rif`, a frame of ethertype `proto`:
/// IPv4 and IPv6 packets, and unicast ARP requests for the interface's address.
///
/// The entry points below are BPF functions of their own: their keys and scratch stay
/// off `port_ingress`'s frame, below which the receiver's checks call `policy::check`
/// (512 bytes of stack for the whole call chain).
#[inline(always)]
pub fn route(
    ctx: &TcContext,
    port: &PortInfo,
    rif: &RouterIf,
    proto: u16,
) -> Result<FdbEntry, DropReason> {
    let hop = match proto {
        ETH_P_IP => route4(ctx, port, rif),
        ETH_P_IPV6 => route6(ctx, port, rif),
        ETH_P_ARP => arp_reply_hop(ctx, port),
        _ => return Err(DropReason::NoRoute),
    };
    match Hop(hop).decode() {
        // Expired: a time-exceeded error goes back, built by a function of its own
        // (beside `route4`/`route6` on the stack, not below them).
        Err(DropReason::TtlExceeded) => {
            let error = match proto {
                ETH_P_IP => time_exceeded4_hop(ctx, port, rif),
                _ => time_exceeded6_hop(ctx, port, rif),
            };
            Hop(error).decode()?.ok_or(DropReason::TtlExceeded)
        }
        // Out of the router's external gateway: translated by a function of its own.
        Ok(None) if proto == ETH_P_IP => Hop(nat::outbound(ctx, port, rif))
            .decode()?
            .ok_or(DropReason::NoRoute),
        other => other?.ok_or(DropReason::NoRoute),
    }
}

/// An ARP request for a router's address on the port's network becomes the reply,
/// back to the sender. `None`: not for a router; the request floods as usual.
#[inline(always)]
pub fn arp_reply(ctx: &TcContext, port: &PortInfo) -> Result<Option<FdbEntry>, DropReason> {
    Hop(arp_reply_hop(ctx, port)).decode()
}

/// A neighbour solicitation for a router's address on the port's network (with the
/// sender's link-layer option, as solicitations for resolution have) becomes the
/// advertisement, back to the sender. `None`: not for a router.
#[inline(always)]
pub fn nd_reply(
    ctx: &TcContext,
    port: &PortInfo,
    ip: &Ipv6,
) -> Result<Option<FdbEntry>, DropReason> {
    Hop(nd_reply_hop(ctx, port, ip)).decode()
}

/// What a router entry point decided, in one register: BPF functions hand back scalars,
/// not structs in the caller's memory. Bits 0-31: the target's ifindex (0: none),
/// 32-47: its FDB flags, 48-55: a drop reason (0: none).
pub(crate) struct Hop(pub(crate) u64);

impl Hop {
    #[inline(always)]
    pub(crate) fn of(result: Result<Option<FdbEntry>, DropReason>) -> u64 {
        match result {
            Ok(target) => {
                // No target is ifindex 0, with every field defined: with `None`'s left
                // undefined the compiler may compute with whatever register it likes,
                // and the verifier rejects arithmetic on a stale packet pointer even
                // when the result goes unused.
                let fdb = target.unwrap_or(FdbEntry {
                    ifindex: 0,
                    port_slot: 0,
                    flags: 0,
                });
                u64::from(fdb.ifindex) | (u64::from(fdb.flags & 0xffff) << 32)
            }
            Err(reason) => (reason as u64 & 0xff) << 48,
        }
    }

    #[inline(always)]
    pub(crate) fn decode(self) -> Result<Option<FdbEntry>, DropReason> {
        let reason = (self.0 >> 48) as u32 & 0xff;
        if reason != 0 {
            return Err(DropReason::from_u32(reason).unwrap_or(DropReason::NoRoute));
        }
        let ifindex = self.0 as u32;
        Ok((ifindex != 0).then_some(FdbEntry {
            ifindex,
            port_slot: 0,
            flags: (self.0 >> 32) as u32 & 0xffff,
        }))
    }
}

/// The sender's and the destination MAC of the frame.
#[inline(always)]
fn macs(ctx: &TcContext) -> Result<(Mac, Mac), DropReason> {
    let eth = eth::parse(&mut Packet::new(ctx))?;
    Ok((eth.src, eth.dst))
}

/// Routes an IPv4 packet the sender addressed to `rif` (a [`Hop`]); none: out of the
/// router's external gateway, for `nat::outbound`.
#[inline(never)]
fn route4(ctx: &TcContext, port: &PortInfo, rif: &RouterIf) -> u64 {
    Hop::of(routed4(ctx, port, rif))
}

#[inline(always)]
fn routed4(
    ctx: &TcContext,
    port: &PortInfo,
    rif: &RouterIf,
) -> Result<Option<FdbEntry>, DropReason> {
    let (eth_src, eth_dst) = macs(ctx)?;
    let ip = ipv4::parse(&mut Packet::new(ctx))?;
    let (ip, eth_src, eth_dst) = (&ip, &eth_src, &eth_dst);
    let key = RouteKey4 {
        router_slot: rif.router_slot,
        addr: ip.dst,
    };
    let route: &Route = ROUTES4
        .get(Key::new(ROUTE_FIXED_BITS + 32, key))
        .ok_or(DropReason::NoRoute)?;
    // The router's own addresses answer pings, another router's gateway (`BEYOND`) when
    // the ping can make the hop; a gateway address (`EXTERNAL`) has the rest translated,
    // as replies to SNAT bindings (hairpin).
    let ttl: u8 = load(ctx, IP4_TTL)?;
    if route.flags & route_flags::LOCAL != 0
        && (route.flags & route_flags::EXTERNAL == 0 || echo_request4(ctx, ip)?)
        && (route.flags & route_flags::BEYOND == 0 || ttl > 1)
    {
        return echo4(ctx, port, ip, eth_src, eth_dst).map(Some);
    }
    if ttl <= 1 {
        // Answered by `route` with a time-exceeded error.
        return Err(DropReason::TtlExceeded);
    }
    if route.flags & route_flags::EXTERNAL != 0 {
        return Ok(None);
    }
    let nexthop = nexthop4(route, ip.dst);
    let neigh_key = NeighKey4 {
        network_slot: route.network_slot,
        addr: nexthop,
    };
    // SAFETY: as in `interface`.
    let neighbor: &Neighbor = unsafe { NEIGH4.get(&neigh_key) }.ok_or(DropReason::NoNeighbor)?;
    let target = port_of(route.network_slot, &neighbor.mac)?;
    ipv4::forward(&mut Packet::new(ctx), ip.src, ip.dst)?;
    set_macs(ctx, &neighbor.mac, &route.mac)?;
    Ok(Some(target))
}

/// Whether the packet is an ICMP echo request (a whole one: first fragment, header in).
#[inline(always)]
fn echo_request4(ctx: &TcContext, ip: &Ipv4) -> Result<bool, DropReason> {
    if ip.proto != IPPROTO_ICMP || !ip.first_fragment || ip.l4_off + 8 > ip.end {
        return Ok(false);
    }
    let kind: [u8; 2] = load(ctx, ip.l4_off)?;
    Ok(kind == [ICMP_ECHO_REQUEST, 0])
}

/// Where `route` takes a packet to `dst`: its next hop (`VIA`), or `dst` itself.
#[inline(always)]
pub(crate) fn nexthop4(route: &Route, dst: [u8; 4]) -> [u8; 4] {
    if route.flags & route_flags::VIA != 0 {
        [
            route.nexthop[0],
            route.nexthop[1],
            route.nexthop[2],
            route.nexthop[3],
        ]
    } else {
        dst
    }
}

/// An echo request to one of the router's addresses becomes the reply, back to the
/// sender; anything else to the router is not for it to answer.
#[inline(always)]
fn echo4(
    ctx: &TcContext,
    port: &PortInfo,
    ip: &Ipv4,
    eth_src: &Mac,
    eth_dst: &Mac,
) -> Result<FdbEntry, DropReason> {
    if !echo_request4(ctx, ip)? {
        return Err(DropReason::NoRoute);
    }
    let sender = port_of(port.network_slot, eth_src)?;
    let ttl: [u8; 2] = load(ctx, IP4_TTL)?;
    let old_ttl = u16::from_be_bytes(ttl);
    let new_ttl = u16::from_be_bytes([ROUTER_TTL, ttl[1]]);
    ctx.l3_csum_replace(
        IP4_CHECK,
        u64::from(old_ttl.to_be()),
        u64::from(new_ttl.to_be()),
        2,
    )
    .map_err(|_| DropReason::MalformedIpv4)?;
    store(ctx, IP4_TTL, &ROUTER_TTL)?;
    // Swapped addresses leave both checksums as they are.
    store(ctx, IP4_SRC, &ip.dst)?;
    store(ctx, IP4_DST, &ip.src)?;
    let old = u16::from_be_bytes([ICMP_ECHO_REQUEST, 0]);
    let new = u16::from_be_bytes([ICMP_ECHO_REPLY, 0]);
    ctx.l4_csum_replace(
        ip.l4_off + 2,
        u64::from(old.to_be()),
        u64::from(new.to_be()),
        2,
    )
    .map_err(|_| DropReason::MalformedL4)?;
    store(ctx, ip.l4_off, &ICMP_ECHO_REPLY)?;
    set_macs(ctx, eth_src, eth_dst)?;
    Ok(sender)
}

/// Routes an IPv6 packet the sender addressed to `rif` (a [`Hop`]).
#[inline(never)]
fn route6(ctx: &TcContext, port: &PortInfo, rif: &RouterIf) -> u64 {
    Hop::of(routed6(ctx, port, rif).map(Some))
}

#[inline(always)]
fn routed6(ctx: &TcContext, port: &PortInfo, rif: &RouterIf) -> Result<FdbEntry, DropReason> {
    let (eth_src, eth_dst) = macs(ctx)?;
    let ip = ipv6::parse(&mut Packet::new(ctx))?;
    let (ip, eth_src, eth_dst) = (&ip, &eth_src, &eth_dst);
    let key = RouteKey6 {
        router_slot: rif.router_slot,
        addr: ip.dst,
    };
    let route: &Route = ROUTES6
        .get(Key::new(ROUTE_FIXED_BITS + 128, key))
        .ok_or(DropReason::NoRoute)?;
    // As in `routed4`, but a gateway address has nothing to translate: pings only.
    let hop_limit: u8 = load(ctx, IP6_HOP_LIMIT)?;
    if route.flags & route_flags::LOCAL != 0
        && (route.flags & route_flags::BEYOND == 0 || hop_limit > 1)
    {
        return echo6(ctx, port, ip, eth_src, eth_dst);
    }
    if hop_limit <= 1 {
        // Answered by `route` with a time-exceeded error.
        return Err(DropReason::TtlExceeded);
    }
    if route.flags & route_flags::EXTERNAL != 0 {
        return external6(ctx, rif, hop_limit);
    }
    let nexthop = if route.flags & route_flags::VIA != 0 {
        route.nexthop
    } else {
        ip.dst
    };
    let neigh_key = NeighKey6 {
        network_slot: route.network_slot,
        addr: nexthop,
    };
    // SAFETY: as in `interface`.
    let neighbor: &Neighbor = unsafe { NEIGH6.get(&neigh_key) }.ok_or(DropReason::NoNeighbor)?;
    let target = port_of(route.network_slot, &neighbor.mac)?;
    // IPv6 has no header checksum.
    ipv6::set_hop_limit(&mut Packet::new(ctx), hop_limit - 1)?;
    set_macs(ctx, &neighbor.mac, &route.mac)?;
    Ok(target)
}

/// Out of the router's external gateway (`ROUTER_GW6`), untranslated: the Networking
/// API routes IPv6 to external networks, with the tenant's addresses.
#[inline(always)]
fn external6(ctx: &TcContext, rif: &RouterIf, hop_limit: u8) -> Result<FdbEntry, DropReason> {
    // SAFETY: as in `interface`.
    let gw: &RouterGateway6 =
        unsafe { ROUTER_GW6.get(&rif.router_slot) }.ok_or(DropReason::NoRoute)?;
    if gw.nexthop_mac == [0; 6] {
        return Err(DropReason::NoNeighbor);
    }
    ipv6::set_hop_limit(&mut Packet::new(ctx), hop_limit - 1)?;
    set_macs(ctx, &gw.nexthop_mac, &gw.mac)?;
    nat::count_to_uplink(ctx);
    Ok(FdbEntry {
        ifindex: gw.uplink_ifindex,
        port_slot: 0,
        flags: 0,
    })
}

/// What arrives on the uplink for a router's gateway port MAC (`GATEWAY_MACS`), IPv6
/// (a [`Hop`]): routed by that router's routes to a port on one of its subnets. `None`:
/// not for a router's MAC (the host's).
#[inline(never)]
pub fn inbound6(ctx: &TcContext) -> u64 {
    Hop::of(routed_in6(ctx))
}

#[inline(always)]
fn routed_in6(ctx: &TcContext) -> Result<Option<FdbEntry>, DropReason> {
    let (_, eth_dst) = macs(ctx)?;
    // SAFETY: as in `interface`.
    let Some(router_slot) = (unsafe { GATEWAY_MACS.get(&eth_dst) }).copied() else {
        return Ok(None);
    };
    let ip = ipv6::parse(&mut Packet::new(ctx))?;
    let key = RouteKey6 {
        router_slot,
        addr: ip.dst,
    };
    let route: &Route = ROUTES6
        .get(Key::new(ROUTE_FIXED_BITS + 128, key))
        .ok_or(DropReason::NoRoute)?;
    // Only into the router: not out again, not to its own addresses (`uplink_xdp`
    // answers the gateway's).
    if route.flags & (route_flags::EXTERNAL | route_flags::LOCAL) != 0 {
        return Err(DropReason::NoRoute);
    }
    let hop_limit: u8 = load(ctx, IP6_HOP_LIMIT)?;
    if hop_limit <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    let nexthop = if route.flags & route_flags::VIA != 0 {
        route.nexthop
    } else {
        ip.dst
    };
    let neigh_key = NeighKey6 {
        network_slot: route.network_slot,
        addr: nexthop,
    };
    // SAFETY: as in `interface`.
    let neighbor: &Neighbor = unsafe { NEIGH6.get(&neigh_key) }.ok_or(DropReason::NoNeighbor)?;
    let target = port_of(route.network_slot, &neighbor.mac)?;
    ipv6::set_hop_limit(&mut Packet::new(ctx), hop_limit - 1)?;
    set_macs(ctx, &neighbor.mac, &route.mac)?;
    Ok(Some(target))
}

#[inline(always)]
fn echo6(
    ctx: &TcContext,
    port: &PortInfo,
    ip: &Ipv6,
    eth_src: &Mac,
    eth_dst: &Mac,
) -> Result<FdbEntry, DropReason> {
    if ip.next != IPPROTO_ICMPV6 || !ip.has_l4 || ip.l4_off + 8 > ip.end {
        return Err(DropReason::NoRoute);
    }
    let kind: [u8; 2] = load(ctx, ip.l4_off)?;
    if kind != [ICMP6_ECHO_REQUEST, 0] {
        return Err(DropReason::NoRoute);
    }
    let sender = port_of(port.network_slot, eth_src)?;
    store(ctx, IP6_HOP_LIMIT, &ROUTER_TTL)?;
    // Swapped addresses leave the pseudo-header's sum as it is.
    store(ctx, IP6_SRC, &ip.dst)?;
    store(ctx, IP6_DST, &ip.src)?;
    let old = u16::from_be_bytes([ICMP6_ECHO_REQUEST, 0]);
    let new = u16::from_be_bytes([ICMP6_ECHO_REPLY, 0]);
    ctx.l4_csum_replace(
        ip.l4_off + 2,
        u64::from(old.to_be()),
        u64::from(new.to_be()),
        2,
    )
    .map_err(|_| DropReason::MalformedL4)?;
    store(ctx, ip.l4_off, &ICMP6_ECHO_REPLY)?;
    set_macs(ctx, eth_src, eth_dst)?;
    Ok(sender)
}

/// What an ICMP time-exceeded error quotes: the expired packet's header (IPv4 without
/// options) and the first 8 bytes of its payload (RFC 792, RFC 4443).
const QUOTE4: usize = 20 + 8;
const QUOTE6: usize = 40 + 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP6_TIME_EXCEEDED: u8 = 3;
/// Room the error's own IP and ICMP headers take before the quote.
const ERROR4_HEADERS: usize = 20 + 8;
const ERROR6_HEADERS: usize = 40 + 8;

/// Counts the expiry of a packet answered with an error against the sender (one that
/// is not answered is counted where it is dropped).
#[inline(always)]
fn count_expired(port: &PortInfo) {
    if let Some(stats) = PORT_STATS.get_ptr_mut(port.port_slot) {
        // SAFETY: per-CPU value, only touched by the program running on this CPU.
        drop::count(unsafe { &mut *stats }, DropReason::TtlExceeded);
    }
}

/// Where an ICMP error is put together: kept off the stack, of which the call chain
/// below `port_ingress` has little. One per CPU: a program runs to its end on its CPU.
/// Not part of the ABI.
#[repr(C)]
pub struct ErrorScratch {
    // Each ICMP header right before its quote: one checksum run covers both.
    header4: [u8; 20],
    icmp4: [u8; 8],
    quote4: [u8; QUOTE4],
    header6: [u8; 40],
    icmp6: [u8; 8],
    quote6: [u8; QUOTE6],
}

/// Turns the frame into `headers` bytes of new headers and `N` bytes of what it was from
/// its network header on, and reads those into `quote`.
#[inline(always)]
fn make_room<const N: usize>(
    ctx: &TcContext,
    headers: usize,
    quote: &mut [u8; N],
) -> Result<(), DropReason> {
    ctx.adjust_room(headers as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| DropReason::TtlExceeded)?;
    let len = (ETH_HLEN + headers + N) as u32;
    // SAFETY: helpers on the context the kernel passed in; `quote` has room for the
    // constant `N` bytes read.
    let read = unsafe {
        if bpf_skb_change_tail(ctx.skb.skb, len, 0) != 0 {
            return Err(DropReason::TtlExceeded);
        }
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            (ETH_HLEN + headers) as u32,
            quote.as_mut_ptr().cast(),
            N as u32,
        )
    };
    if read != 0 {
        return Err(DropReason::TtlExceeded);
    }
    Ok(())
}

#[inline(always)]
fn scratch() -> Result<&'static mut ErrorScratch, DropReason> {
    let scratch = ERROR_SCRATCH
        .get_ptr_mut(0)
        .ok_or(DropReason::TtlExceeded)?;
    // SAFETY: per-CPU value, only touched by the program running on this CPU, and only
    // while one error is built.
    Ok(unsafe { &mut *scratch })
}

#[inline(never)]
fn time_exceeded4_hop(ctx: &TcContext, port: &PortInfo, rif: &RouterIf) -> u64 {
    Hop::of(macs(ctx).and_then(|(src, dst)| {
        let ip = ipv4::parse(&mut Packet::new(ctx))?;
        time_exceeded4(ctx, port, rif, &ip, &src, &dst).map(Some)
    }))
}

#[inline(never)]
fn time_exceeded6_hop(ctx: &TcContext, port: &PortInfo, rif: &RouterIf) -> u64 {
    Hop::of(macs(ctx).and_then(|(src, dst)| {
        let ip = ipv6::parse(&mut Packet::new(ctx))?;
        time_exceeded6(ctx, port, rif, &ip, &src, &dst).map(Some)
    }))
}

/// An expired IPv4 packet becomes a time-exceeded error from the router's address on
/// the sender's network, back to the sender. None when the interface has no IPv4
/// address, or the packet is not answered (see [`error4`]): those are only counted.
#[inline(always)]
fn time_exceeded4(
    ctx: &TcContext,
    port: &PortInfo,
    rif: &RouterIf,
    ip: &Ipv4,
    eth_src: &Mac,
    eth_dst: &Mac,
) -> Result<FdbEntry, DropReason> {
    if rif.ip4 == [0; 4] {
        return Err(DropReason::TtlExceeded);
    }
    answerable4(ctx, ip)?;
    let sender = port_of(port.network_slot, eth_src)?;
    error4(ctx, ip, &rif.ip4, eth_src, eth_dst)?;
    count_expired(port);
    Ok(sender)
}

/// Whether an expired IPv4 packet is answered: not with IP options, not about a
/// fragment after the first (RFC 1812 4.3.2.7), not an ICMP error (errors are not
/// answered with errors). `Err(TtlExceeded)` if not.
#[inline(always)]
fn answerable4(ctx: &TcContext, ip: &Ipv4) -> Result<(), DropReason> {
    if !ip.first_fragment || ip.l4_off != ETH_HLEN + 20 || ip.l4_off + 8 > ip.end {
        return Err(DropReason::TtlExceeded);
    }
    if ip.proto == IPPROTO_ICMP {
        let kind: u8 = load(ctx, ip.l4_off)?;
        if kind != ICMP_ECHO_REQUEST && kind != ICMP_ECHO_REPLY {
            return Err(DropReason::TtlExceeded);
        }
    }
    Ok(())
}

/// Turns the frame into a time-exceeded error about the packet, from `source` to the
/// packet's source, in a frame to `to` from `from`.
#[inline(always)]
fn error4(
    ctx: &TcContext,
    ip: &Ipv4,
    source: &[u8; 4],
    to: &Mac,
    from: &Mac,
) -> Result<(), DropReason> {
    let src = ip.src;
    let s = scratch()?;
    make_room(ctx, ERROR4_HEADERS, &mut s.quote4)?;
    let header = &mut s.header4;
    header.fill(0);
    header[0] = 0x45;
    header[2..4].copy_from_slice(&((ERROR4_HEADERS + QUOTE4) as u16).to_be_bytes());
    header[8] = ROUTER_TTL;
    header[9] = IPPROTO_ICMP;
    header[12..16].copy_from_slice(source);
    header[16..20].copy_from_slice(&src);
    let check = fold(sum(header.as_ptr(), 20, 0));
    header[10..12].copy_from_slice(&check);
    s.icmp4 = [ICMP_TIME_EXCEEDED, 0, 0, 0, 0, 0, 0, 0];
    let check = fold(sum(s.icmp4.as_ptr(), 8 + QUOTE4, 0));
    s.icmp4[2..4].copy_from_slice(&check);
    store(ctx, ETH_HLEN, &s.header4)?;
    store(ctx, ETH_HLEN + 20, &s.icmp4)?;
    set_macs(ctx, to, from)
}

/// As [`time_exceeded4`] for IPv6.
#[inline(always)]
fn time_exceeded6(
    ctx: &TcContext,
    port: &PortInfo,
    rif: &RouterIf,
    ip: &Ipv6,
    eth_src: &Mac,
    eth_dst: &Mac,
) -> Result<FdbEntry, DropReason> {
    if rif.ip6 == [0; 16] {
        return Err(DropReason::TtlExceeded);
    }
    answerable6(ctx, ip)?;
    let sender = port_of(port.network_slot, eth_src)?;
    error6(ctx, ip, &rif.ip6, eth_src, eth_dst)?;
    count_expired(port);
    Ok(sender)
}

/// As [`answerable4`] for IPv6: long enough to quote, not an ICMPv6 error (type below
/// 128).
#[inline(always)]
fn answerable6(ctx: &TcContext, ip: &Ipv6) -> Result<(), DropReason> {
    if ETH_HLEN + QUOTE6 > ip.end {
        return Err(DropReason::TtlExceeded);
    }
    if ip.next == IPPROTO_ICMPV6 && ip.has_l4 {
        let kind: u8 = load(ctx, ip.l4_off)?;
        if kind < ICMP6_ECHO_REQUEST {
            return Err(DropReason::TtlExceeded);
        }
    }
    Ok(())
}

/// As [`error4`] for IPv6.
#[inline(always)]
fn error6(
    ctx: &TcContext,
    ip: &Ipv6,
    source: &[u8; 16],
    to: &Mac,
    from: &Mac,
) -> Result<(), DropReason> {
    let src = ip.src;
    let s = scratch()?;
    make_room(ctx, ERROR6_HEADERS, &mut s.quote6)?;
    let length = (8 + QUOTE6) as u16;
    let header = &mut s.header6;
    header.fill(0);
    header[0] = 0x60;
    header[4..6].copy_from_slice(&length.to_be_bytes());
    header[6] = IPPROTO_ICMPV6;
    header[7] = ROUTER_TTL;
    header[8..24].copy_from_slice(source);
    header[24..40].copy_from_slice(&src);
    s.icmp6 = [ICMP6_TIME_EXCEEDED, 0, 0, 0, 0, 0, 0, 0];
    // Pseudo-header: the addresses, then length and next header as 32-bit words.
    let pseudo = sum(s.header6[8..].as_ptr(), 32, 0);
    let pseudo = add(
        add(pseudo, u32::from_ne_bytes(u32::from(length).to_be_bytes())),
        u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]),
    );
    let check = fold(sum(s.icmp6.as_ptr(), 8 + QUOTE6, pseudo));
    s.icmp6[2..4].copy_from_slice(&check);
    store(ctx, ETH_HLEN, &s.header6)?;
    store(ctx, ETH_HLEN + 40, &s.icmp6)?;
    set_macs(ctx, to, from)
}

/// A packet that arrived on the uplink and expired in the router it was for (a
/// [`Hop`]): a time-exceeded error from the router's gateway address, back out of the
/// uplink to the MAC it came from. The router is the one whose gateway port the
/// external address it was for is answered with (`EXT_ADDRS4`), else whose gateway
/// MAC the frame was for. The expiry is counted either way.
#[inline(never)]
pub fn expired_on_uplink(ctx: &TcContext) -> u64 {
    Hop::of(uplink_error(ctx).map(Some))
}

#[inline(always)]
fn uplink_error(ctx: &TcContext) -> Result<FdbEntry, DropReason> {
    let (eth_src, eth_dst) = macs(ctx)?;
    let mut pkt = Packet::new(ctx);
    if eth::parse(&mut pkt)?.proto == ETH_P_IPV6 {
        let ip = ipv6::parse(&mut pkt)?;
        let slot = gateway_router(&eth_dst)?;
        // SAFETY: as in `interface`.
        let gw = unsafe { ROUTER_GW6.get(&slot) }.ok_or(DropReason::TtlExceeded)?;
        answerable6(ctx, &ip)?;
        error6(ctx, &ip, &gw.ip6, &eth_src, &gw.mac)?;
    } else {
        let ip = ipv4::parse(&mut pkt)?;
        // SAFETY: as in `interface`.
        let mac = unsafe { EXT_ADDRS4.get(&ip.dst) }.map_or(eth_dst, |ext| ext.mac);
        let slot = gateway_router(&mac)?;
        // SAFETY: as in `interface`.
        let gw = unsafe { ROUTER_GW.get(&slot) }.ok_or(DropReason::TtlExceeded)?;
        answerable4(ctx, &ip)?;
        error4(ctx, &ip, &gw.ip4, &eth_src, &gw.mac)?;
    }
    if let Some(stats) = UPLINK_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only touched by the program running on this CPU.
        drop::count(unsafe { &mut *stats }, DropReason::TtlExceeded);
    }
    nat::count_to_uplink(ctx);
    // SAFETY: `skb` is the context the kernel passed in.
    let uplink = unsafe { (*ctx.skb.skb).ifindex };
    Ok(FdbEntry {
        ifindex: uplink,
        port_slot: 0,
        flags: 0,
    })
}

/// The router whose gateway port has `mac`.
#[inline(always)]
fn gateway_router(mac: &Mac) -> Result<u32, DropReason> {
    // SAFETY: as in `interface`.
    unsafe { GATEWAY_MACS.get(mac) }
        .copied()
        .ok_or(DropReason::TtlExceeded)
}

/// Which router answers for `addr` on the port's network, if one does.
#[inline(always)]
fn router_neighbor4(port: &PortInfo, addr: [u8; 4]) -> Option<&'static Neighbor> {
    let key = NeighKey4 {
        network_slot: port.network_slot,
        addr,
    };
    // SAFETY: as in `interface`.
    let neighbor = unsafe { NEIGH4.get(&key) }?;
    (neighbor.flags & neigh_flags::ROUTER != 0).then_some(neighbor)
}

#[inline(never)]
fn arp_reply_hop(ctx: &TcContext, port: &PortInfo) -> u64 {
    Hop::of(answer_arp(ctx, port))
}

#[inline(always)]
fn answer_arp(ctx: &TcContext, port: &PortInfo) -> Result<Option<FdbEntry>, DropReason> {
    const OPER: usize = ETH_HLEN + 6;
    const SHA: usize = ETH_HLEN + 8;
    const SPA: usize = ETH_HLEN + 14;
    const THA: usize = ETH_HLEN + 18;
    const TPA: usize = ETH_HLEN + 24;
    let oper: [u8; 2] = load(ctx, OPER)?;
    if u16::from_be_bytes(oper) != ARP_REQUEST {
        return Ok(None);
    }
    let tpa: [u8; 4] = load(ctx, TPA)?;
    let Some(router) = router_neighbor4(port, tpa) else {
        return Ok(None);
    };
    let (eth_src, _) = macs(ctx)?;
    let sender = port_of(port.network_slot, &eth_src)?;
    let sha: Mac = load(ctx, SHA)?;
    let spa: [u8; 4] = load(ctx, SPA)?;
    store(ctx, OPER, &ARP_REPLY.to_be_bytes())?;
    store(ctx, SHA, &router.mac)?;
    store(ctx, SPA, &tpa)?;
    store(ctx, THA, &sha)?;
    store(ctx, TPA, &spa)?;
    set_macs(ctx, &eth_src, &router.mac)?;
    Ok(Some(sender))
}

#[inline(never)]
fn nd_reply_hop(ctx: &TcContext, port: &PortInfo, ip: &Ipv6) -> u64 {
    Hop::of(answer_nd(ctx, port, ip))
}

#[inline(always)]
fn answer_nd(ctx: &TcContext, port: &PortInfo, ip: &Ipv6) -> Result<Option<FdbEntry>, DropReason> {
    let off = ip.l4_off;
    // Checked inside the call, not before it: before it, the checks would grow
    // `port_ingress`'s frame past what the deepest call chain leaves it.
    if ip.next != IPPROTO_ICMPV6 || !ip.has_l4 || off + ND_LEN != ip.end {
        return Ok(None);
    }
    let head: [u8; 2] = load(ctx, off)?;
    let opt: [u8; 2] = load(ctx, off + 24)?;
    // An unspecified source is duplicate address detection: nothing to answer.
    if head != [ICMP6_NEIGH_SOLICIT, 0] || opt != [ND_OPT_SOURCE_LL_ADDR, 1] || ip.src == [0; 16] {
        return Ok(None);
    }
    let target: [u8; 16] = load(ctx, off + 8)?;
    let key = NeighKey6 {
        network_slot: port.network_slot,
        addr: target,
    };
    // SAFETY: as in `interface`.
    let Some(router) = (unsafe { NEIGH6.get(&key) }) else {
        return Ok(None);
    };
    if router.flags & neigh_flags::ROUTER == 0 {
        return Ok(None);
    }
    let (eth_src, _) = macs(ctx)?;
    let sender = port_of(port.network_slot, &eth_src)?;
    // The advertisement: from the target to the solicitor, type and flags, the target
    // link-layer option with the router's MAC; its checksum computed anew.
    let msg = NaMsg::answer(&target, &router.mac, &ip.src);
    store(ctx, IP6_HOP_LIMIT, &ND_HOP_LIMIT)?;
    store(ctx, IP6_SRC, &target)?;
    store(ctx, IP6_DST, &ip.src)?;
    store(ctx, off, &msg)?;
    set_macs(ctx, &eth_src, &router.mac)?;
    Ok(Some(sender))
}
