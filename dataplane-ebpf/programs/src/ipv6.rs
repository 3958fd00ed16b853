//! IPv6: fixed header, extension header chain, and the parts of neighbour discovery
//! port security looks at.
use dataplane_abi::DropReason;

use crate::{
    eth::{mac_eq, Mac, ETH_HLEN},
    packet::Packet,
};

pub const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up on the chain.
const MAX_EXT_HDRS: usize = 6;

pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const ICMP6_MLD_REPORT: u8 = 131;
pub const ICMP6_ROUTER_ADVERT: u8 = 134;
pub const ICMP6_NEIGH_SOLICIT: u8 = 135;
pub const ICMP6_NEIGH_ADVERT: u8 = 136;
pub const ICMP6_MLD2_REPORT: u8 = 143;

pub const ND_OPT_SOURCE_LL_ADDR: u8 = 1;
pub const ND_OPT_TARGET_LL_ADDR: u8 = 2;
/// ND options walked; a VM's NS/NA carries one.
const MAX_ND_OPTS: usize = 4;

/// The fixed header as it is in the frame (also read and written in place by `uplink`).
#[repr(C, align(2))]
pub struct Ipv6Hdr {
    pub version_tc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// Hop-by-hop, routing and destination options: next header and length in 8-byte
/// units beyond the first 8.
#[repr(C, align(2))]
struct ExtHdr {
    next: u8,
    len: u8,
}

#[repr(C, align(2))]
struct FragHdr {
    next: u8,
    reserved: u8,
    offset_flags: [u8; 2],
    id: [u8; 4],
}

/// Neighbour solicitation and advertisement: ICMPv6 header, flags/reserved, target.
#[repr(C, align(2))]
struct NdMsg {
    icmp: [u8; 4],
    flags: [u8; 4],
    target: [u8; 16],
}

#[repr(C, align(2))]
struct NdOpt {
    kind: u8,
    /// In units of 8 bytes, including these two.
    len: u8,
}

#[repr(C, align(2))]
struct NdLlOpt {
    kind: u8,
    len: u8,
    addr: Mac,
}

/// `repr(C, align(4))` with the addresses first: `flow` reads them as aligned words.
#[repr(C, align(4))]
pub struct Ipv6 {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Protocol of the header at `l4_off` (the first that is not an extension header).
    pub next: u8,
    pub l4_off: usize,
    /// Offset just past the payload.
    pub end: usize,
    /// False for a non-first fragment: no transport header to look at.
    pub has_l4: bool,
}

#[inline(always)]
pub fn parse(pkt: &mut Packet) -> Result<Ipv6, DropReason> {
    let len = pkt.len();
    let h: &Ipv6Hdr = pkt.at(ETH_HLEN).ok_or(DropReason::MalformedIpv6)?;
    let end = ETH_HLEN + IPV6_HLEN + u16::from_be_bytes(h.payload_len) as usize;
    if h.version_tc_flow[0] >> 4 != 6 || end > len {
        return Err(DropReason::MalformedIpv6);
    }
    let mut ip = Ipv6 {
        src: h.src,
        dst: h.dst,
        next: h.next,
        l4_off: ETH_HLEN + IPV6_HLEN,
        end,
        has_l4: true,
    };
    for _ in 0..MAX_EXT_HDRS {
        let hdr_len = match ip.next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let e: &ExtHdr = pkt.at(ip.l4_off).ok_or(DropReason::MalformedIpv6)?;
                ip.next = e.next;
                (e.len as usize + 1) * 8
            }
            NEXTHDR_FRAGMENT => {
                let f: &FragHdr = pkt.at(ip.l4_off).ok_or(DropReason::MalformedIpv6)?;
                ip.next = f.next;
                ip.has_l4 = u16::from_be_bytes(f.offset_flags) & 0xfff8 == 0;
                8
            }
            _ => return Ok(ip),
        };
        ip.l4_off += hdr_len;
        if ip.l4_off > end {
            return Err(DropReason::MalformedIpv6);
        }
        if !ip.has_l4 {
            return Ok(ip);
        }
    }
    match ip.next {
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_FRAGMENT => {
            Err(DropReason::MalformedIpv6)
        }
        _ => Ok(ip),
    }
}

/// Sets the hop limit in place (IPv6 has no header checksum).
#[inline(always)]
pub fn set_hop_limit(pkt: &mut Packet, hop_limit: u8) -> Result<(), DropReason> {
    let h: &mut Ipv6Hdr = pkt.at_mut(ETH_HLEN).ok_or(DropReason::MalformedIpv6)?;
    h.hop_limit = hop_limit;
    Ok(())
}

/// `::`. Compared as two words: array `==` may become a `bcmp` call.
#[inline(always)]
pub fn is_unspecified(a: &[u8; 16]) -> bool {
    let hi = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let lo = u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    hi | lo == 0
}

/// Target address of the NS/NA at `off`.
#[inline(always)]
pub fn nd_target(pkt: &mut Packet, off: usize, end: usize) -> Result<[u8; 16], DropReason> {
    if off + core::mem::size_of::<NdMsg>() > end {
        return Err(DropReason::MalformedL4);
    }
    let m: &NdMsg = pkt.at(off).ok_or(DropReason::MalformedL4)?;
    Ok(m.target)
}

/// Whether every link-layer address option of type `kind` in the NS/NA at `off` names
/// `mac`. Options past the first `MAX_ND_OPTS` are not looked at.
#[inline(always)]
pub fn nd_ll_addr_is(
    pkt: &mut Packet,
    off: usize,
    end: usize,
    kind: u8,
    mac: &Mac,
) -> Result<bool, DropReason> {
    let mut opt = off + core::mem::size_of::<NdMsg>();
    if opt > end {
        return Err(DropReason::MalformedL4);
    }
    for _ in 0..MAX_ND_OPTS {
        if opt >= end {
            break;
        }
        let o: &NdOpt = pkt.at(opt).ok_or(DropReason::MalformedL4)?;
        let (opt_kind, opt_len) = (o.kind, o.len as usize * 8);
        if opt_len == 0 || opt + opt_len > end {
            return Err(DropReason::MalformedL4);
        }
        if opt_kind == kind {
            let ll: &NdLlOpt = pkt.at(opt).ok_or(DropReason::MalformedL4)?;
            if !mac_eq(&ll.addr, mac) {
                return Ok(false);
            }
        }
        opt += opt_len;
    }
    Ok(true)
}

/// The header an ICMPv6 error quotes at `off`, inside the error's payload ending at
/// `end`: its addresses are copied into `src` and `dst`; its next header and the offset
/// of what follows are returned. Extension headers are not walked: a quoted packet
/// with any is about no connection `conntrack` could find.
#[inline(always)]
pub fn quoted(
    pkt: &mut Packet,
    off: usize,
    end: usize,
    src: &mut [u8; 16],
    dst: &mut [u8; 16],
) -> Option<(u8, usize)> {
    if off + IPV6_HLEN > end {
        return None;
    }
    let h: &Ipv6Hdr = pkt.at(off)?;
    if h.version_tc_flow[0] >> 4 != 6 {
        return None;
    }
    *src = h.src;
    *dst = h.dst;
    Some((h.next, off + IPV6_HLEN))
}
