//! Distributed routing (see `dataplane_abi::router`): frames a port sends to a router
//! interface's MAC are routed here, on the sender's node; the router's own addresses
//! answer ARP, neighbour solicitations and pings.
//!
//! Every function leaves the frame ready to go and returns the FDB entry of the port it
//! goes to (the receiver, or the sender itself for an answer); the caller stamps and
//! delivers it like a switched frame. Writes go through `bpf_skb_store_bytes` and the
//! checksum helpers, which keep the packet consistent for the kernel.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use dataplane_abi::{
    neigh_flags, route_flags, DropReason, FdbEntry, FdbKey, NeighKey4, NeighKey6, Neighbor,
    PortInfo, Route, RouteKey4, RouteKey6, RouterIf, ROUTE_FIXED_BITS,
};

use crate::{
    eth::{self, Mac, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6},
    ipv4::{self, Ipv4},
    ipv6::{self, Ipv6},
    maps::{FDB, NEIGH4, NEIGH6, ROUTER_IFS, ROUTES4, ROUTES6},
    packet::Packet,
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
const ICMP6_NEIGH_SOLICIT: u8 = 135;
const ICMP6_NEIGH_ADVERT: u8 = 136;
/// NA flags: router, solicited, override.
const NA_FLAGS: u8 = 0xe0;
const ND_OPT_SOURCE_LL_ADDR: u8 = 1;
const ND_OPT_TARGET_LL_ADDR: u8 = 2;
/// An NS with one link-layer option: ICMPv6 header (4), reserved (4), target (16),
/// option (8).
const NS_LEN: usize = 32;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
/// TTL of what the router itself sends.
const ROUTER_TTL: u8 = 64;

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

/// Ethernet addresses of a frame the router sends: to `dst`, from `src`.
#[inline(always)]
fn set_macs(ctx: &TcContext, dst: &Mac, src: &Mac) -> Result<(), DropReason> {
    store(ctx, 0, dst)?;
    store(ctx, 6, src)
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
    Hop(hop).decode()?.ok_or(DropReason::NoRoute)
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
struct Hop(u64);

impl Hop {
    #[inline(always)]
    fn of(result: Result<Option<FdbEntry>, DropReason>) -> u64 {
        match result {
            Ok(Some(fdb)) => u64::from(fdb.ifindex) | (u64::from(fdb.flags & 0xffff) << 32),
            Ok(None) => 0,
            Err(reason) => (reason as u64 & 0xff) << 48,
        }
    }

    #[inline(always)]
    fn decode(self) -> Result<Option<FdbEntry>, DropReason> {
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

/// Routes an IPv4 packet the sender addressed to `rif` (a [`Hop`]).
#[inline(never)]
fn route4(ctx: &TcContext, port: &PortInfo, rif: &RouterIf) -> u64 {
    Hop::of(routed4(ctx, port, rif).map(Some))
}

#[inline(always)]
fn routed4(ctx: &TcContext, port: &PortInfo, rif: &RouterIf) -> Result<FdbEntry, DropReason> {
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
    if route.flags & route_flags::LOCAL != 0 {
        return echo4(ctx, port, ip, eth_src, eth_dst);
    }
    let ttl: u8 = load(ctx, IP4_TTL)?;
    if ttl <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    let nexthop = if route.flags & route_flags::VIA != 0 {
        [
            route.nexthop[0],
            route.nexthop[1],
            route.nexthop[2],
            route.nexthop[3],
        ]
    } else {
        ip.dst
    };
    let neigh_key = NeighKey4 {
        network_slot: route.network_slot,
        addr: nexthop,
    };
    // SAFETY: as in `interface`.
    let neighbor: &Neighbor = unsafe { NEIGH4.get(&neigh_key) }.ok_or(DropReason::NoNeighbor)?;
    let target = port_of(route.network_slot, &neighbor.mac)?;
    // TTL and protocol are one 16-bit word of the header checksum.
    let proto: u8 = load(ctx, IP4_TTL + 1)?;
    let old = u16::from_be_bytes([ttl, proto]);
    let new = u16::from_be_bytes([ttl - 1, proto]);
    ctx.l3_csum_replace(IP4_CHECK, u64::from(old.to_be()), u64::from(new.to_be()), 2)
        .map_err(|_| DropReason::MalformedIpv4)?;
    store(ctx, IP4_TTL, &(ttl - 1))?;
    set_macs(ctx, &neighbor.mac, &route.mac)?;
    Ok(target)
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
    if ip.proto != IPPROTO_ICMP || !ip.first_fragment || ip.l4_off + 8 > ip.end {
        return Err(DropReason::NoRoute);
    }
    let kind: [u8; 2] = load(ctx, ip.l4_off)?;
    if kind != [ICMP_ECHO_REQUEST, 0] {
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
    if route.flags & route_flags::LOCAL != 0 {
        return echo6(ctx, port, ip, eth_src, eth_dst);
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
    // IPv6 has no header checksum.
    store(ctx, IP6_HOP_LIMIT, &(hop_limit - 1))?;
    set_macs(ctx, &neighbor.mac, &route.mac)?;
    Ok(target)
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
    if ip.next != IPPROTO_ICMPV6 || !ip.has_l4 || off + NS_LEN != ip.end {
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
    let mut msg = NaMsg {
        kind: ICMP6_NEIGH_ADVERT,
        code: 0,
        check: [0; 2],
        flags: [NA_FLAGS, 0, 0, 0],
        target,
        opt_kind: ND_OPT_TARGET_LL_ADDR,
        opt_len: 1,
        mac: router.mac,
    };
    msg.check = na_checksum(&target, &ip.src, &msg).to_be_bytes();
    store(ctx, IP6_HOP_LIMIT, &255u8)?;
    store(ctx, IP6_SRC, &target)?;
    store(ctx, IP6_DST, &ip.src)?;
    store(ctx, off, &msg)?;
    set_macs(ctx, &eth_src, &router.mac)?;
    Ok(Some(sender))
}

#[repr(C)]
struct NaMsg {
    kind: u8,
    code: u8,
    check: [u8; 2],
    flags: [u8; 4],
    target: [u8; 16],
    opt_kind: u8,
    opt_len: u8,
    mac: Mac,
}

/// The ICMPv6 checksum of `msg` from `src` to `dst` (RFC 4443 2.3).
#[inline(always)]
fn na_checksum(src: &[u8; 16], dst: &[u8; 16], msg: &NaMsg) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        let mut i = 0;
        while i + 1 < bytes.len() {
            sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
            i += 2;
        }
    };
    add(src);
    add(dst);
    add(&(NS_LEN as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(&[msg.kind, msg.code, 0, 0]);
    add(&msg.flags);
    add(&msg.target);
    add(&[msg.opt_kind, msg.opt_len]);
    add(&msg.mac);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

const _: () = assert!(core::mem::size_of::<NaMsg>() == NS_LEN);
