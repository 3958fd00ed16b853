//! XDP on the uplink NIC, before the kernel makes an skb of the frame: answers ARP
//! requests and pings for the external addresses this node holds (`EXT_ADDRS4`), and
//! neighbour solicitations and pings for the gateways' IPv6 addresses (`EXT_ADDRS6`);
//! drops what is for one of them but cannot be delivered (malformed, or for a
//! floating IP with no port). Everything else goes on to `uplink_ingress` (tc), which
//! translates and delivers, and the host stack, which has the rest.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_xdp_adjust_tail,
    programs::XdpContext,
};
use dataplane_abi::{ext_addr_flags, DropReason, ExternalAddr};

use crate::{
    arp::{ArpHdr, ARP_REPLY, ARP_REQUEST},
    csum,
    eth::{EthHdr, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6},
    ipv4::Ipv4Hdr,
    ipv6::{self, Ipv6Hdr, ICMP6_NEIGH_SOLICIT, IPPROTO_ICMPV6, IPV6_HLEN},
    l4::{ICMP6_ECHO_REPLY, ICMP6_ECHO_REQUEST, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IPPROTO_ICMP},
    maps::{EXT_ADDRS4, EXT_ADDRS6, UPLINK_STATS},
    nd::{NaMsg, ND_HOP_LIMIT, ND_LEN, NS_BARE_LEN},
    router::ROUTER_TTL,
};

/// Where the ICMPv6 header of a packet without extension headers is.
const ICMP6_OFF: usize = ETH_HLEN + IPV6_HLEN;

#[repr(C, align(2))]
struct IcmpHdr {
    kind: u8,
    code: u8,
    check: [u8; 2],
}

/// The `T` at `off`, if the frame is that long. `T` is one of the headers of this crate,
/// 2-aligned as the frame's headers are (see `packet::Packet::at`).
#[inline(always)]
fn at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let p = ctx.data() + off;
    if p + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(p as *mut T)
}

pub fn run(ctx: &XdpContext) -> u32 {
    if let Some(stats) = UPLINK_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only touched by the program running on this CPU.
        let stats = unsafe { &mut *stats };
        stats.rx_packets += 1;
        stats.rx_bytes += (ctx.data_end() - ctx.data()) as u64;
    }
    match decide(ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            XDP_DROP
        }
    }
}

/// Counts a frame XDP drops against the uplink.
#[inline(always)]
pub fn count_drop(reason: DropReason) {
    if let Some(stats) = UPLINK_STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only touched by the program running on this CPU.
        crate::drop::count(unsafe { &mut *stats }, reason);
    }
}

#[inline(always)]
fn decide(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(eth) = at::<EthHdr>(ctx, 0) else {
        return Ok(XDP_PASS);
    };
    // SAFETY: `at` checked the header is inside the frame.
    let proto = u16::from_be_bytes(unsafe { (*eth).proto });
    match proto {
        ETH_P_ARP => Ok(arp(ctx, eth).unwrap_or(XDP_PASS)),
        ETH_P_IP => ipv4(ctx, eth),
        ETH_P_IPV6 => ipv6(ctx, eth),
        _ => Ok(XDP_PASS),
    }
}

/// Which external address `addr` is, if this node holds it.
#[inline(always)]
fn external(addr: &[u8; 4]) -> Option<&'static ExternalAddr> {
    // SAFETY: the agent replaces entries with one update, never in place.
    unsafe { EXT_ADDRS4.get(addr) }
}

/// An ARP request for an address this node answers for becomes the reply, sent back
/// out of the uplink.
#[inline(always)]
fn arp(ctx: &XdpContext, eth: *mut EthHdr) -> Option<u32> {
    let arp = at::<ArpHdr>(ctx, ETH_HLEN)?;
    // SAFETY: `at` checked both headers are inside the frame; nothing else holds them.
    let (eth, arp) = unsafe { (&mut *eth, &mut *arp) };
    if !arp.is_ethernet_ipv4() || u16::from_be_bytes(arp.oper) != ARP_REQUEST {
        return None;
    }
    let ext = external(&arp.tpa)?;
    if ext.flags & (ext_addr_flags::GATEWAY | ext_addr_flags::FLOATING) == 0 {
        return None;
    }
    let (sha, spa, tpa) = (arp.sha, arp.spa, arp.tpa);
    arp.oper = ARP_REPLY.to_be_bytes();
    arp.tha = sha;
    arp.tpa = spa;
    arp.sha = ext.mac;
    arp.spa = tpa;
    eth.dst = sha;
    eth.src = ext.mac;
    Some(XDP_TX)
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, eth: *mut EthHdr) -> Result<u32, DropReason> {
    let Some(ip) = at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Ok(XDP_PASS);
    };
    // SAFETY: `at` checked the header is inside the frame; nothing else holds it.
    let ip = unsafe { &mut *ip };
    let Some(ext) = external(&ip.dst) else {
        return Ok(XDP_PASS);
    };
    let ihl = ip
        .valid_len(ctx.data_end() - ctx.data())
        .ok_or(DropReason::MalformedIpv4)?;
    if ext.flags & ext_addr_flags::UNBOUND != 0 {
        return Err(DropReason::NoNatBinding);
    }
    if ext.flags & ext_addr_flags::GATEWAY != 0 && ihl == 20 && ip.proto == IPPROTO_ICMP {
        return Ok(echo(ctx, eth, ip, ext).unwrap_or(XDP_PASS));
    }
    Ok(XDP_PASS)
}

/// A ping of a router's gateway address is answered here (unless it is a reply to an
/// SNAT binding's ping, which `uplink_ingress` translates).
#[inline(always)]
fn echo(ctx: &XdpContext, eth: *mut EthHdr, ip: &mut Ipv4Hdr, ext: &ExternalAddr) -> Option<u32> {
    let icmp = at::<IcmpHdr>(ctx, ETH_HLEN + 20)?;
    // SAFETY: `at` checked both headers are inside the frame; nothing else holds them.
    let (eth, icmp) = unsafe { (&mut *eth, &mut *icmp) };
    if icmp.kind != ICMP_ECHO_REQUEST || icmp.code != 0 {
        return None;
    }
    icmp.kind = ICMP_ECHO_REPLY;
    icmp.check = csum::update(
        u16::from_be_bytes(icmp.check),
        u16::from(ICMP_ECHO_REQUEST) << 8,
        u16::from(ICMP_ECHO_REPLY) << 8,
    )
    .to_be_bytes();
    // Swapped addresses leave the header checksum as it is; a TTL of its own does not.
    core::mem::swap(&mut ip.src, &mut ip.dst);
    let old = u16::from_be_bytes([ip.ttl, ip.proto]);
    ip.ttl = ROUTER_TTL;
    let new = u16::from_be_bytes([ip.ttl, ip.proto]);
    ip.check = csum::update(u16::from_be_bytes(ip.check), old, new).to_be_bytes();
    eth.dst = eth.src;
    eth.src = ext.mac;
    Some(XDP_TX)
}

/// Which of the gateways' IPv6 addresses `addr` is, if this node holds it.
#[inline(always)]
fn external6(addr: &[u8; 16]) -> Option<&'static ExternalAddr> {
    // SAFETY: the agent replaces entries with one update, never in place.
    unsafe { EXT_ADDRS6.get(addr) }
}

/// ICMPv6 straight after the fixed header: solicitations for a gateway's address, and
/// pings of it, are answered here. Anything else goes on (`uplink_ingress` routes what
/// is for a gateway's MAC).
#[inline(always)]
fn ipv6(ctx: &XdpContext, eth: *mut EthHdr) -> Result<u32, DropReason> {
    let (Some(ip), Some(icmp)) = (at::<Ipv6Hdr>(ctx, ETH_HLEN), at::<IcmpHdr>(ctx, ICMP6_OFF))
    else {
        return Ok(XDP_PASS);
    };
    // SAFETY: `at` checked both headers are inside the frame; nothing else holds them.
    let (ip, icmp) = unsafe { (&mut *ip, &mut *icmp) };
    if ip.next != IPPROTO_ICMPV6 || icmp.code != 0 {
        return Ok(XDP_PASS);
    }
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    let whole =
        ip.version_tc_flow[0] >> 4 == 6 && ICMP6_OFF + payload <= ctx.data_end() - ctx.data();
    match icmp.kind {
        ICMP6_NEIGH_SOLICIT => {
            let Some(target) = at::<[u8; 16]>(ctx, ICMP6_OFF + 8) else {
                return Ok(XDP_PASS);
            };
            // SAFETY: as above.
            let target = unsafe { *target };
            let Some(ext) = external6(&target) else {
                return Ok(XDP_PASS);
            };
            // Neither a solicitation that is cut short, nor one from a router hops away
            // (RFC 4861 7.1.1), nor duplicate address detection is answered.
            if !whole || (payload != ND_LEN && payload != NS_BARE_LEN) {
                return Err(DropReason::MalformedIpv6);
            }
            if ip.hop_limit != ND_HOP_LIMIT || ipv6::is_unspecified(&ip.src) {
                return Ok(XDP_PASS);
            }
            let (mac, solicitor) = (ext.mac, ip.src);
            Ok(advertise(ctx, target, mac, solicitor).unwrap_or(XDP_PASS))
        }
        ICMP6_ECHO_REQUEST => {
            let Some(ext) = external6(&ip.dst) else {
                return Ok(XDP_PASS);
            };
            if !whole || payload < 8 {
                return Err(DropReason::MalformedIpv6);
            }
            // SAFETY: `at` checked the header is inside the frame.
            let eth = unsafe { &mut *eth };
            icmp.kind = ICMP6_ECHO_REPLY;
            // Swapped addresses leave the pseudo-header's sum as it is.
            icmp.check = csum::update(
                u16::from_be_bytes(icmp.check),
                u16::from(ICMP6_ECHO_REQUEST) << 8,
                u16::from(ICMP6_ECHO_REPLY) << 8,
            )
            .to_be_bytes();
            core::mem::swap(&mut ip.src, &mut ip.dst);
            ip.hop_limit = ROUTER_TTL;
            eth.dst = eth.src;
            eth.src = ext.mac;
            Ok(XDP_TX)
        }
        _ => Ok(XDP_PASS),
    }
}

/// The solicitation becomes the advertisement of `target` at `mac`, back to
/// `solicitor`: one without the source link-layer option first grows by it.
#[inline(always)]
fn advertise(ctx: &XdpContext, target: [u8; 16], mac: [u8; 6], solicitor: [u8; 16]) -> Option<u32> {
    const LEN: usize = ICMP6_OFF + ND_LEN;
    let grow = LEN as i32 - (ctx.data_end() - ctx.data()) as i32;
    // SAFETY: helper on the context the kernel passed in; the pointers are taken anew
    // after it.
    if grow != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, grow) } != 0 {
        return None;
    }
    let eth = at::<EthHdr>(ctx, 0)?;
    let ip = at::<Ipv6Hdr>(ctx, ETH_HLEN)?;
    let msg = at::<NaMsg>(ctx, ICMP6_OFF)?;
    // SAFETY: `at` checked the headers are inside the frame; nothing else holds them.
    let (eth, ip) = unsafe { (&mut *eth, &mut *ip) };
    eth.dst = eth.src;
    eth.src = mac;
    ip.payload_len = (ND_LEN as u16).to_be_bytes();
    ip.src = target;
    ip.dst = solicitor;
    // SAFETY: as above.
    unsafe { msg.write(NaMsg::answer(&target, &mac, &solicitor)) };
    Some(XDP_TX)
}
