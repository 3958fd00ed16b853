//! NAT at the routers' external gateways (see `dataplane_abi::nat`), IPv4, at tc:
//! outbound in `port_ingress` (what a router routes out of its gateway), inbound in
//! `uplink_ingress`, and the hairpin between them.
//!
//! Both directions end in `deliver::unicast`: inbound frames reach the port through
//! the same receiver checks as switched ones, and the port's ingress rules judge them
//! with the fixed address, after translation. Rewrites go through the kernel's
//! checksum helpers, which handle every `ip_summed` state an skb can be in (a VM's
//! TCP on a veth carries only the pseudo-header sum).
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    maps::lpm_trie::Key,
    programs::TcContext,
};
use dataplane_abi::{
    ext_addr_flags, gateway_flags, route_flags, snat_lifetime, DropReason, ExternalAddr, FdbEntry,
    FdbKey, FixedAddr4, NeighKey4, PortInfo, Route, RouteKey4, RouterGateway, RouterIf,
    SnatBinding4, SnatFlow4, SnatKey4, SnatOrigin4, ROUTE_FIXED_BITS, SNAT_PROBES,
};

use crate::{
    csum,
    eth::{self, Mac, ETH_P_IP},
    ipv4::{self, Ipv4},
    l4::{
        self, tcp_flags, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_HLEN, IPPROTO_ICMP, IPPROTO_TCP,
        IPPROTO_UDP,
    },
    maps::{
        EXT_ADDRS4, FDB, FIPS4, FIP_OF4, GATEWAY_MACS, NAT_SCRATCH, NEIGH4, ROUTER_GW, ROUTES4,
        SNAT4_IN, SNAT4_OUT, UPLINK_STATS,
    },
    packet::Packet,
    router::{nexthop4, set_macs, Hop},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// What translation looks at in a transport header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Tcp,
    Udp,
    /// Echo: the identifier stands for the requester's port (`src` of a request,
    /// `dst` of a reply); the other side's is 0.
    EchoRequest,
    EchoReply,
    /// Quotes the header of the packet it is about, which is translated too.
    IcmpError,
    /// Other ICMP messages, other protocols, fragments after the first: only the
    /// addresses can be translated.
    AddressOnly,
}

#[derive(Clone, Copy)]
struct L4 {
    kind: Kind,
    /// Host order.
    src: u16,
    dst: u16,
    tcp_flags: u8,
}

#[inline(always)]
fn transport(pkt: &mut Packet, ip: &Ipv4) -> Result<L4, DropReason> {
    let mut l4 = L4 {
        kind: Kind::AddressOnly,
        src: 0,
        dst: 0,
        tcp_flags: 0,
    };
    if !ip.first_fragment {
        return Ok(l4);
    }
    match ip.proto {
        IPPROTO_TCP => {
            (l4.src, l4.dst, l4.tcp_flags) = l4::tcp(pkt, ip.l4_off, ip.end)?;
            l4.kind = Kind::Tcp;
        }
        IPPROTO_UDP => {
            (l4.src, l4.dst) = l4::udp_ports(pkt, ip.l4_off, ip.end)?;
            l4.kind = Kind::Udp;
        }
        IPPROTO_ICMP => {
            let (kind, _, id) = l4::icmp(pkt, ip.l4_off, ip.end)?;
            match kind {
                ICMP_ECHO_REQUEST => (l4.kind, l4.src) = (Kind::EchoRequest, id),
                ICMP_ECHO_REPLY => (l4.kind, l4.dst) = (Kind::EchoReply, id),
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
                    l4.kind = Kind::IcmpError
                }
                _ => {}
            }
        }
        _ => {}
    }
    Ok(l4)
}

/// Where a translated port lives in the packet, and its checksum's offset and flags
/// for `l4_csum_replace` (None: the transport has no checksum over it).
#[inline(always)]
fn port_offsets(ip: &Ipv4, l4: &L4, source: bool) -> Option<(usize, usize, u64)> {
    let off = ip.l4_off;
    match l4.kind {
        Kind::Tcp => Some((off + if source { 0 } else { 2 }, off + 16, 0)),
        Kind::Udp => Some((
            off + if source { 0 } else { 2 },
            off + 6,
            u64::from(BPF_F_MARK_MANGLED_0),
        )),
        Kind::EchoRequest | Kind::EchoReply => Some((off + 4, off + 2, 0)),
        _ => None,
    }
}

/// The L4 checksum an address is part of (through the pseudo-header), if any.
#[inline(always)]
fn pseudo_checksum(ip: &Ipv4, l4: &L4) -> Option<(usize, u64)> {
    match l4.kind {
        Kind::Tcp => Some((ip.l4_off + 16, 0)),
        Kind::Udp => Some((ip.l4_off + 6, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    }
}

#[inline(always)]
fn store<T>(ctx: &TcContext, off: usize, value: &T) -> Result<(), DropReason> {
    ctx.store(off, value, 0)
        .map_err(|_| DropReason::RedirectFailed)
}

/// The transport checksum after an address went from `old` to `new`, through the
/// pseudo-header (the helper keeps every `ip_summed` state right).
#[inline(always)]
fn set_pseudo(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), DropReason> {
    let Some((check, flags)) = pseudo_checksum(ip, l4).filter(|_| old != new) else {
        return Ok(());
    };
    let (from, to) = (
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
    );
    ctx.l4_csum_replace(check, from, to, u64::from(BPF_F_PSEUDO_HDR) | flags | 4)
        .map_err(|_| DropReason::MalformedL4)
}

/// Writes `new` over the source (or destination) port, or the echo identifier.
#[inline(always)]
fn set_port(
    ctx: &TcContext,
    ip: &Ipv4,
    l4: &L4,
    source: bool,
    old: u16,
    new: u16,
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let Some((off, check, flags)) = port_offsets(ip, l4, source) else {
        return Ok(());
    };
    let (from, to) = (u64::from(old.to_be()), u64::from(new.to_be()));
    ctx.l4_csum_replace(check, from, to, flags | 2)
        .map_err(|_| DropReason::MalformedL4)?;
    store(ctx, off, &new.to_be_bytes())
}

/// The packet's addresses and ports after translation.
#[derive(Clone, Copy)]
struct Rewrite {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
}

/// Applies `to` to the packet (and, for an ICMP error, to the header it quotes).
#[inline(always)]
fn apply(ctx: &TcContext, ip: &Ipv4, l4: &L4, to: &Rewrite) -> Result<(), DropReason> {
    if l4.kind == Kind::IcmpError {
        quoted(ctx, ip, to)?;
    } else {
        set_port(ctx, ip, l4, true, l4.src, to.sport)?;
        set_port(ctx, ip, l4, false, l4.dst, to.dport)?;
    }
    set_pseudo(ctx, ip, l4, ip.src, to.src)?;
    set_pseudo(ctx, ip, l4, ip.dst, to.dst)?;
    ipv4::forward(&mut Packet::new(ctx), to.src, to.dst)
}

/// The quote of an ICMP error about a translated connection: the packet the other
/// side sent, so its source becomes what `to` makes the error's destination (and its
/// source port `to.dport`), its destination what `to` makes the error's source (and
/// its destination port `to.sport`), each where the error's own address changes (both
/// for a hairpin). Its header checksum is updated, and the error's checksum for every
/// word changed. The quoted transport checksum is left: only the first 8 bytes are
/// quoted, and receivers match errors by addresses and ports.
#[inline(always)]
fn quoted(ctx: &TcContext, ip: &Ipv4, to: &Rewrite) -> Result<(), DropReason> {
    let inner = ip.l4_off + ICMP_HLEN;
    let mut pkt = Packet::new(ctx);
    let q = ipv4::quoted(&mut pkt, inner, ip.end).ok_or(DropReason::MalformedL4)?;
    if to.dst != ip.dst {
        quote_side(ctx, ip, &q, (12, q.src, to.dst), (0, to.dport))?;
    }
    if to.src != ip.src {
        quote_side(ctx, ip, &q, (16, q.dst, to.src), (2, to.sport))?;
    }
    Ok(())
}

/// One side of the quote `q`: its address at `addr.0` (from the quote's start) from
/// `addr.1` to `addr.2`, and its port at `port.0` (from its transport header) to
/// `port.1` (0: kept).
#[inline(always)]
fn quote_side(
    ctx: &TcContext,
    ip: &Ipv4,
    q: &Ipv4,
    addr: (usize, [u8; 4], [u8; 4]),
    port: (usize, u16),
) -> Result<(), DropReason> {
    quote_address(ctx, ip, ip.l4_off + ICMP_HLEN + addr.0, addr.1, addr.2)?;
    let port_off = match q.proto {
        IPPROTO_TCP | IPPROTO_UDP => q.l4_off + port.0,
        IPPROTO_ICMP => q.l4_off + 4,
        _ => return Ok(()),
    };
    if q.first_fragment && port.1 != 0 {
        quote_word(ctx, ip, port_off, port.1.to_be_bytes())?;
    }
    Ok(())
}

/// Writes `new` over the quoted address at `off` (was `old`), with the quote's header
/// checksum and the error's checksum.
#[inline(always)]
fn quote_address(
    ctx: &TcContext,
    ip: &Ipv4,
    off: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), DropReason> {
    if old == new {
        return Ok(());
    }
    let check_off = ip.l4_off + ICMP_HLEN + 10;
    let check: [u8; 2] = ctx.load(check_off).map_err(|_| DropReason::MalformedL4)?;
    let mut c = u16::from_ne_bytes(check);
    for i in 0..2 {
        let from = u16::from_ne_bytes([old[2 * i], old[2 * i + 1]]);
        let to = u16::from_ne_bytes([new[2 * i], new[2 * i + 1]]);
        c = csum::update(c, from, to);
    }
    ctx.l4_csum_replace(
        ip.l4_off + 2,
        u64::from(u32::from_ne_bytes(old)),
        u64::from(u32::from_ne_bytes(new)),
        4,
    )
    .map_err(|_| DropReason::MalformedL4)?;
    store(ctx, off, &new)?;
    quote_word(ctx, ip, check_off, c.to_ne_bytes())
}

/// Writes the 16-bit word `new` at `off` inside the quote, with the error's checksum.
#[inline(always)]
fn quote_word(ctx: &TcContext, ip: &Ipv4, off: usize, new: [u8; 2]) -> Result<(), DropReason> {
    let old: [u8; 2] = ctx.load(off).map_err(|_| DropReason::MalformedL4)?;
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(
        ip.l4_off + 2,
        u64::from(u16::from_ne_bytes(old)),
        u64::from(u16::from_ne_bytes(new)),
        2,
    )
    .map_err(|_| DropReason::MalformedL4)?;
    store(ctx, off, &new)
}

/// The packet an ICMP error quotes: (protocol, source, destination, source port,
/// destination port). Echo: the identifier as the requester's port.
#[inline(always)]
fn quoted_connection(
    ctx: &TcContext,
    ip: &Ipv4,
) -> Result<(u8, [u8; 4], [u8; 4], u16, u16), DropReason> {
    let mut pkt = Packet::new(ctx);
    let q = ipv4::quoted(&mut pkt, ip.l4_off + ICMP_HLEN, ip.end).ok_or(DropReason::MalformedL4)?;
    if !q.first_fragment {
        return Ok((q.proto, q.src, q.dst, 0, 0));
    }
    // 8 bytes of the quote's transport header are there.
    let (sport, dport) = match q.proto {
        IPPROTO_TCP | IPPROTO_UDP => l4::ports(&mut pkt, q.l4_off, ip.end)?,
        IPPROTO_ICMP => match l4::icmp(&mut pkt, q.l4_off, ip.end)? {
            (ICMP_ECHO_REQUEST, _, id) => (id, 0),
            (ICMP_ECHO_REPLY, _, id) => (0, id),
            _ => return Err(DropReason::NoNatBinding),
        },
        _ => (0, 0),
    };
    Ok((q.proto, q.src, q.dst, sport, dport))
}

/// Where a translated packet goes inside: the address and port it was for, on which
/// network, from which router MAC.
#[derive(Clone, Copy)]
struct Inside {
    addr: [u8; 4],
    port: u16,
    network_slot: u32,
    router_mac: Mac,
}

/// The inside destination of a packet to `ext` (an external address) from
/// `remote`:`remote_port`, for its `dst_port`. Refreshes the SNAT binding it uses.
#[inline(always)]
fn inside(
    ext: &ExternalAddr,
    dst: [u8; 4],
    dst_port: u16,
    remote: [u8; 4],
    remote_port: u16,
    proto: u8,
    tcp_flags: u8,
) -> Result<Inside, DropReason> {
    if ext.flags & ext_addr_flags::FLOATING != 0 {
        // SAFETY: the agent replaces entries with one update, never in place.
        let fip = unsafe { FIPS4.get(&dst) }.ok_or(DropReason::NoNatBinding)?;
        return Ok(Inside {
            addr: fip.fixed,
            port: dst_port,
            network_slot: fip.network_slot,
            router_mac: fip.router_mac,
        });
    }
    if ext.flags & ext_addr_flags::GATEWAY == 0 {
        return Err(DropReason::NoNatBinding);
    }
    let key = SnatKey4 {
        external: dst,
        remote,
        external_port: dst_port,
        remote_port,
        proto,
        _pad: [0; 3],
    };
    let origin = SNAT4_IN.get_ptr_mut(&key).ok_or(DropReason::NoNatBinding)?;
    // SAFETY: a map value; a racing update of the same binding only moves its clock.
    let origin = unsafe { &mut *origin };
    origin.last_seen = now();
    origin.lifetime = lifetime(proto, tcp_flags, origin.lifetime);
    Ok(Inside {
        addr: origin.internal,
        port: origin.internal_port,
        network_slot: origin.network_slot,
        router_mac: origin.router_mac,
    })
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// How long a binding holds its port after this packet: a FIN or RST shortens a TCP
/// binding's life, nothing lengthens it again.
#[inline(always)]
fn lifetime(proto: u8, flags: u8, current: u64) -> u64 {
    match proto {
        IPPROTO_TCP if flags & (tcp_flags::FIN | tcp_flags::RST) != 0 => snat_lifetime::TCP_CLOSING,
        IPPROTO_TCP if current != 0 => current,
        IPPROTO_TCP => snat_lifetime::TCP,
        IPPROTO_UDP => snat_lifetime::UDP,
        _ => snat_lifetime::ICMP,
    }
}

/// The port of the inside host with `addr` on `network_slot`, and its MAC.
#[inline(always)]
fn inside_port(inside: &Inside) -> Result<(FdbEntry, Mac), DropReason> {
    let key = NeighKey4 {
        network_slot: inside.network_slot,
        addr: inside.addr,
    };
    // SAFETY: the agent replaces entries with one update, never in place.
    let neighbor = unsafe { NEIGH4.get(&key) }.ok_or(DropReason::NoNeighbor)?;
    let fdb_key = FdbKey {
        network_slot: inside.network_slot,
        mac: neighbor.mac,
        _pad: [0; 2],
    };
    // SAFETY: as above.
    let target = unsafe { FDB.get(&fdb_key) }
        .copied()
        .ok_or(DropReason::UnknownDestination)?;
    Ok((target, neighbor.mac))
}

/// As [`inside_port`], with the frame's MACs set for it: from the router's interface,
/// to the host.
#[inline(always)]
fn to_inside(ctx: &TcContext, inside: &Inside) -> Result<FdbEntry, DropReason> {
    let (target, mac) = inside_port(inside)?;
    set_macs(ctx, &mac, &inside.router_mac)?;
    Ok(target)
}

/// A frame arriving on the uplink (a [`Hop`]): translated and headed for its port;
/// `None` (0) if it is for no address this node translates (the host's own traffic).
#[inline(never)]
pub fn inbound(ctx: &TcContext) -> u64 {
    Hop::of(translate_inbound(ctx))
}

#[inline(always)]
fn translate_inbound(ctx: &TcContext) -> Result<Option<FdbEntry>, DropReason> {
    let mut pkt = Packet::new(ctx);
    if eth::parse(&mut pkt)?.proto != ETH_P_IP {
        return Ok(None);
    }
    let ip = ipv4::parse(&mut pkt)?;
    // SAFETY: the agent replaces entries with one update, never in place.
    let Some(ext) = (unsafe { EXT_ADDRS4.get(&ip.dst) }) else {
        return route_in(ctx, &ip);
    };
    let l4 = transport(&mut pkt, &ip)?;
    // An error is about the connection of the packet it quotes, which left translated.
    let (proto, remote, dport, sport) = if l4.kind == Kind::IcmpError {
        let (proto, _, remote, sport, dport) = quoted_connection(ctx, &ip)?;
        (proto, remote, sport, dport)
    } else {
        (ip.proto, ip.src, l4.dst, l4.src)
    };
    let inside = inside(ext, ip.dst, dport, remote, sport, proto, l4.tcp_flags)?;
    ipv4::check_ttl(&mut Packet::new(ctx))?;
    let to = Rewrite {
        src: ip.src,
        dst: inside.addr,
        sport: l4.src,
        dport: if ext.flags & ext_addr_flags::GATEWAY != 0 {
            inside.port
        } else {
            l4.dst
        },
    };
    apply(ctx, &ip, &l4, &to)?;
    to_inside(ctx, &inside).map(Some)
}

/// A frame for a router's gateway MAC and no external address: routed by that
/// router's routes to a port, untranslated (one TTL less, the router interface's MAC
/// as source). `None`: not for a router's MAC (the host's).
#[inline(always)]
fn route_in(ctx: &TcContext, ip: &Ipv4) -> Result<Option<FdbEntry>, DropReason> {
    let dst: Mac = ctx.load(0).map_err(|_| DropReason::MalformedEthernet)?;
    // SAFETY: the agent replaces entries with one update, never in place.
    let Some(router_slot) = (unsafe { GATEWAY_MACS.get(&dst) }).copied() else {
        return Ok(None);
    };
    let key = RouteKey4 {
        router_slot,
        addr: ip.dst,
    };
    let route: &Route = ROUTES4
        .get(Key::new(ROUTE_FIXED_BITS + 32, key))
        .ok_or(DropReason::NoRoute)?;
    // Only into the router: not out again, not to its own addresses.
    if route.flags & (route_flags::EXTERNAL | route_flags::LOCAL) != 0 {
        return Err(DropReason::NoRoute);
    }
    let inside = Inside {
        addr: nexthop4(route, ip.dst),
        port: 0,
        network_slot: route.network_slot,
        router_mac: route.mac,
    };
    let (target, mac) = inside_port(&inside)?;
    let mut pkt = Packet::new(ctx);
    ipv4::check_ttl(&mut pkt)?;
    ipv4::forward(&mut pkt, ip.src, ip.dst)?;
    set_macs(ctx, &mac, &inside.router_mac)?;
    Ok(Some(target))
}

/// A packet the router of `rif` routes out of its external gateway (a [`Hop`]): to the
/// uplink, translated; or, for an external address this node translates, back inside
/// (hairpin).
#[inline(never)]
pub fn outbound(ctx: &TcContext, port: &PortInfo, rif: &RouterIf) -> u64 {
    Hop::of(translate_outbound(ctx, port, rif).map(Some))
}

#[inline(always)]
fn translate_outbound(
    ctx: &TcContext,
    port: &PortInfo,
    rif: &RouterIf,
) -> Result<FdbEntry, DropReason> {
    // SAFETY: the agent replaces entries with one update, never in place.
    let gw: &RouterGateway =
        unsafe { ROUTER_GW.get(&rif.router_slot) }.ok_or(DropReason::NoRoute)?;
    let mut pkt = Packet::new(ctx);
    let router_mac = eth::parse(&mut pkt)?.dst;
    let ip = ipv4::parse(&mut pkt)?;
    let l4 = transport(&mut pkt, &ip)?;
    let (src, sport) = source_nat(ctx, port, rif, &router_mac, gw, &ip, &l4)?;
    // The translation is put together in the scratch: the call chain has little stack.
    let s = scratch()?;
    // SAFETY: as above.
    if let Some(ext) = unsafe { EXT_ADDRS4.get(&ip.dst) } {
        // An error is about the connection it quotes, whose source was translated.
        let (proto, dport, remote_port) = if l4.kind == Kind::IcmpError {
            let (proto, _, _, quote_sport, quote_dport) = quoted_connection(ctx, &ip)?;
            (proto, quote_sport, quote_dport)
        } else {
            (ip.proto, l4.dst, sport)
        };
        s.inside = inside(ext, ip.dst, dport, src, remote_port, proto, l4.tcp_flags)?;
        s.rewrite = Rewrite {
            src,
            dst: s.inside.addr,
            sport,
            dport: if ext.flags & ext_addr_flags::GATEWAY != 0 {
                s.inside.port
            } else {
                l4.dst
            },
        };
        apply(ctx, &ip, &l4, &s.rewrite)?;
        return to_inside(ctx, &s.inside);
    }
    if gw.nexthop_mac == [0; 6] {
        return Err(DropReason::NoNeighbor);
    }
    s.rewrite = Rewrite {
        src,
        dst: ip.dst,
        sport,
        dport: l4.dst,
    };
    apply(ctx, &ip, &l4, &s.rewrite)?;
    set_macs(ctx, &gw.nexthop_mac, &gw.mac)?;
    count_to_uplink(ctx);
    Ok(FdbEntry {
        ifindex: gw.uplink_ifindex,
        port_slot: 0,
        flags: 0,
    })
}

/// Counts a frame the datapath sends out of the uplink.
#[inline(always)]
pub(crate) fn count_to_uplink(ctx: &TcContext) {
    if let Some(stats) = UPLINK_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only touched by the program running on this CPU.
        let stats = unsafe { &mut *stats };
        stats.tx_packets += 1;
        stats.tx_bytes += u64::from(ctx.len());
    }
}

/// The source the packet leaves with: the sender's floating IP on this router, else
/// the gateway's address and a bound port with SNAT, else its own. `router_mac`: the
/// router interface's the sender sent to, where the replies come from.
#[inline(always)]
fn source_nat(
    ctx: &TcContext,
    port: &PortInfo,
    rif: &RouterIf,
    router_mac: &Mac,
    gw: &RouterGateway,
    ip: &Ipv4,
    l4: &L4,
) -> Result<([u8; 4], u16), DropReason> {
    let key = FixedAddr4 {
        network_slot: port.network_slot,
        addr: ip.src,
    };
    // SAFETY: the agent replaces entries with one update, never in place.
    if let Some(fip) = unsafe { FIP_OF4.get(&key) } {
        if fip.router_slot == rif.router_slot {
            return Ok((fip.floating, l4.src));
        }
    }
    if gw.flags & gateway_flags::SNAT == 0 {
        return Ok((ip.src, l4.src));
    }
    match l4.kind {
        Kind::Tcp | Kind::Udp | Kind::EchoRequest => {}
        Kind::IcmpError => return quoted_binding(ctx, port, ip),
        _ => return Err(DropReason::NatUnsupported),
    }
    let s = scratch()?;
    s.flow = SnatFlow4 {
        network_slot: port.network_slot,
        internal: ip.src,
        remote: ip.dst,
        internal_port: l4.src,
        remote_port: l4.dst,
        proto: ip.proto,
        _pad: [0; 3],
    };
    s.origin = SnatOrigin4 {
        internal: ip.src,
        network_slot: port.network_slot,
        internal_port: l4.src,
        router_mac: *router_mac,
        last_seen: now(),
        lifetime: lifetime(ip.proto, l4.tcp_flags, 0),
    };
    s.key = SnatKey4 {
        external: gw.ip4,
        remote: ip.dst,
        external_port: 0,
        remote_port: l4.dst,
        proto: ip.proto,
        _pad: [0; 3],
    };
    if let Some(binding) = SNAT4_OUT.get_ptr(&s.flow) {
        // SAFETY: a map value, read once.
        s.key.external_port = unsafe { (*binding).external_port };
        if let Some(held) = SNAT4_IN.get_ptr_mut(&s.key) {
            // SAFETY: a map value; a racing update of the same binding only moves its clock.
            let held = unsafe { &mut *held };
            if held.internal == ip.src
                && held.internal_port == l4.src
                && held.network_slot == port.network_slot
            {
                held.last_seen = s.origin.last_seen;
                held.lifetime = lifetime(ip.proto, l4.tcp_flags, held.lifetime);
                return Ok((gw.ip4, s.key.external_port));
            }
        }
    }
    bind(gw, s)?;
    Ok((gw.ip4, s.key.external_port))
}

/// The binding of the connection an ICMP error from inside is about: the quote is a
/// packet of it that came in translated. Its port, as the "source port" of the error,
/// is what `quoted` writes into the quote's destination.
#[inline(always)]
fn quoted_binding(
    ctx: &TcContext,
    port: &PortInfo,
    ip: &Ipv4,
) -> Result<([u8; 4], u16), DropReason> {
    let (proto, remote, internal, remote_port, internal_port) = quoted_connection(ctx, ip)?;
    let flow = SnatFlow4 {
        network_slot: port.network_slot,
        internal,
        remote,
        internal_port,
        remote_port,
        proto,
        _pad: [0; 3],
    };
    let binding = SNAT4_OUT.get_ptr(&flow).ok_or(DropReason::NoNatBinding)?;
    // SAFETY: a map value, read once.
    let binding = unsafe { *binding };
    // Still the connection's: the reply side points back to it.
    let key = SnatKey4 {
        external: binding.external,
        remote,
        external_port: binding.external_port,
        remote_port,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: a map value, read once.
    let held = SNAT4_IN.get_ptr(&key).map(|held| unsafe { *held });
    match held {
        Some(held)
            if held.internal == internal
                && held.internal_port == internal_port
                && held.network_slot == port.network_slot =>
        {
            Ok((binding.external, binding.external_port))
        }
        _ => Err(DropReason::NoNatBinding),
    }
}

/// Where SNAT puts together a new binding, and `outbound` its translation: kept off the
/// stack, of which the call chain below `port_ingress` has little. One per CPU: a
/// program runs to its end on its CPU. Not part of the ABI.
#[repr(C)]
pub struct NatScratch {
    flow: SnatFlow4,
    origin: SnatOrigin4,
    key: SnatKey4,
    inside: Inside,
    rewrite: Rewrite,
}

#[inline(always)]
fn scratch() -> Result<&'static mut NatScratch, DropReason> {
    let s = NAT_SCRATCH.get_ptr_mut(0).ok_or(DropReason::NoRoute)?;
    // SAFETY: per-CPU value, only touched by the program running on this CPU, and only
    // while one packet is translated.
    Ok(unsafe { &mut *s })
}

/// Binds a free port of the gateway's range (or one whose binding outlived its
/// lifetime) to the connection `s.flow`, into `s.key.external_port`.
#[inline(always)]
fn bind(gw: &RouterGateway, s: &mut NatScratch) -> Result<(), DropReason> {
    let (flow, origin, key) = (&s.flow, &s.origin, &mut s.key);
    let count = u32::from(gw.port_count);
    if count == 0 {
        return Err(DropReason::NatPortsExhausted);
    }
    // SAFETY: helper without arguments.
    let start = unsafe { bpf_get_prandom_u32() };
    for i in 0..SNAT_PROBES {
        if i >= count {
            break;
        }
        key.external_port = gw.port_min + (start.wrapping_add(i) % count) as u16;
        let taken = match SNAT4_IN.get_ptr(&*key) {
            // SAFETY: a map value, read once.
            Some(held) => {
                let held = unsafe { *held };
                origin.last_seen.saturating_sub(held.last_seen) <= held.lifetime
            }
            None => false,
        };
        if taken {
            continue;
        }
        if SNAT4_IN.insert(&*key, origin, u64::from(BPF_ANY)).is_err() {
            continue;
        }
        let binding = SnatBinding4 {
            external: gw.ip4,
            external_port: key.external_port,
            _pad: [0; 2],
        };
        // Replaces a stale entry of the connection (its port was taken over). A lost
        // write only costs the connection a new port at its next packet.
        let _ = SNAT4_OUT.insert(flow, &binding, u64::from(BPF_ANY));
        return Ok(());
    }
    Err(DropReason::NatPortsExhausted)
}
