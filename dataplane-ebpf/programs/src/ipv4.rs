//! IPv4 header validation.
use dataplane_abi::DropReason;

use crate::{eth::ETH_HLEN, packet::Packet};

pub const IPPROTO_UDP: u8 = 17;

#[repr(C, align(2))]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    proto: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

pub struct Ipv4 {
    /// Network order.
    pub src: [u8; 4],
    pub proto: u8,
    /// Offset of the transport header in the frame.
    pub l4_off: usize,
    /// Offset just past the datagram (Ethernet padding excluded).
    pub end: usize,
    /// Only a first fragment (or an unfragmented datagram) carries a transport header.
    pub first_fragment: bool,
}

#[inline(always)]
pub fn parse(pkt: &mut Packet) -> Result<Ipv4, DropReason> {
    let len = pkt.len();
    let h: &Ipv4Hdr = pkt.at(ETH_HLEN).ok_or(DropReason::MalformedIpv4)?;
    let ihl = (h.version_ihl & 0x0f) as usize * 4;
    let total = u16::from_be_bytes(h.total_len) as usize;
    // total >= ihl and the datagram inside the frame also puts the options inside it.
    if h.version_ihl >> 4 != 4 || ihl < 20 || total < ihl || ETH_HLEN + total > len {
        return Err(DropReason::MalformedIpv4);
    }
    Ok(Ipv4 {
        src: h.src,
        proto: h.proto,
        l4_off: ETH_HLEN + ihl,
        end: ETH_HLEN + total,
        first_fragment: u16::from_be_bytes(h.frag_off) & 0x1fff == 0,
    })
}
