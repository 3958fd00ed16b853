//! IPv4 header validation, and its rewrite by a router.
use dataplane_abi::DropReason;

use crate::{csum, eth::ETH_HLEN, packet::Packet};

pub const IPPROTO_UDP: u8 = 17;

/// The header as it is in the frame (also read and written in place by `uplink`).
#[repr(C, align(2))]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Hdr {
    /// Header length in bytes, if the version, header and total lengths are consistent
    /// and the datagram fits in a frame of `frame_len` bytes.
    #[inline(always)]
    pub fn valid_len(&self, frame_len: usize) -> Option<usize> {
        let ihl = (self.version_ihl & 0x0f) as usize * 4;
        let total = u16::from_be_bytes(self.total_len) as usize;
        // total >= ihl and the datagram inside the frame also puts the options inside it.
        (self.version_ihl >> 4 == 4 && ihl >= 20 && total >= ihl && ETH_HLEN + total <= frame_len)
            .then_some(ihl)
    }
}

/// `repr(C, align(4))` with the addresses first: `flow` reads them as aligned words.
#[repr(C, align(4))]
pub struct Ipv4 {
    /// Network order.
    pub src: [u8; 4],
    pub dst: [u8; 4],
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
    let ihl = h.valid_len(len).ok_or(DropReason::MalformedIpv4)?;
    let total = u16::from_be_bytes(h.total_len) as usize;
    Ok(Ipv4 {
        src: h.src,
        dst: h.dst,
        proto: h.proto,
        l4_off: ETH_HLEN + ihl,
        end: ETH_HLEN + total,
        first_fragment: u16::from_be_bytes(h.frag_off) & 0x1fff == 0,
    })
}

/// The header an ICMP error quotes at `off` (the datagram it is about), inside the
/// error's datagram ending at `end`. Only the header and 8 bytes of its payload are
/// there: its total length is not checked.
#[inline(always)]
pub fn quoted(pkt: &mut Packet, off: usize, end: usize) -> Option<Ipv4> {
    if off + core::mem::size_of::<Ipv4Hdr>() > end {
        return None;
    }
    let h: &Ipv4Hdr = pkt.at(off)?;
    let ihl = (h.version_ihl & 0x0f) as usize * 4;
    if h.version_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    Some(Ipv4 {
        src: h.src,
        dst: h.dst,
        proto: h.proto,
        l4_off: off + ihl,
        end,
        first_fragment: u16::from_be_bytes(h.frag_off) & 0x1fff == 0,
    })
}

/// `Err(TtlExceeded)` if the packet cannot cross a router. Checked before a router
/// rewrites anything, so that its time-exceeded error quotes the packet as it came.
#[inline(always)]
pub fn check_ttl(pkt: &mut Packet) -> Result<(), DropReason> {
    let h: &Ipv4Hdr = pkt.at(ETH_HLEN).ok_or(DropReason::MalformedIpv4)?;
    if h.ttl <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    Ok(())
}

/// The IPv4 header as the router forwards the packet: one TTL less, from `src` to
/// `dst`, the checksum updated word by word (RFC 1624). Written in place, where the
/// checksum helpers would take a call per field; the header's own sum stays what it
/// was, so a `CHECKSUM_COMPLETE` skb's sum stays right.
#[inline(always)]
pub fn forward(pkt: &mut Packet, src: [u8; 4], dst: [u8; 4]) -> Result<(), DropReason> {
    let h: &mut Ipv4Hdr = pkt.at_mut(ETH_HLEN).ok_or(DropReason::MalformedIpv4)?;
    let ttl = h.ttl;
    if ttl <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    let word = |b: &[u8; 4], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let mut check = csum::update(
        u16::from_be_bytes(h.check),
        u16::from_be_bytes([ttl, h.proto]),
        u16::from_be_bytes([ttl - 1, h.proto]),
    );
    for i in [0, 2] {
        check = csum::update(check, word(&h.src, i), word(&src, i));
        check = csum::update(check, word(&h.dst, i), word(&dst, i));
    }
    h.ttl = ttl - 1;
    h.check = check.to_be_bytes();
    h.src = src;
    h.dst = dst;
    Ok(())
}
