//! Transport headers, read only where a port security check needs them.
use dataplane_abi::DropReason;

use crate::packet::Packet;

#[repr(C, align(2))]
struct UdpHdr {
    source: [u8; 2],
    dest: [u8; 2],
    len: [u8; 2],
    check: [u8; 2],
}

#[repr(C, align(2))]
struct Icmp6Hdr {
    kind: u8,
    code: u8,
    check: [u8; 2],
}

/// (source, destination) port of the UDP header at `off`; `end` ends the datagram.
#[inline(always)]
pub fn udp_ports(pkt: &mut Packet, off: usize, end: usize) -> Result<(u16, u16), DropReason> {
    if off + core::mem::size_of::<UdpHdr>() > end {
        return Err(DropReason::MalformedL4);
    }
    let h: &UdpHdr = pkt.at(off).ok_or(DropReason::MalformedL4)?;
    Ok((u16::from_be_bytes(h.source), u16::from_be_bytes(h.dest)))
}

/// Type of the ICMPv6 message at `off`.
#[inline(always)]
pub fn icmp6_type(pkt: &mut Packet, off: usize, end: usize) -> Result<u8, DropReason> {
    if off + core::mem::size_of::<Icmp6Hdr>() > end {
        return Err(DropReason::MalformedL4);
    }
    let h: &Icmp6Hdr = pkt.at(off).ok_or(DropReason::MalformedL4)?;
    Ok(h.kind)
}
