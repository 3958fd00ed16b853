//! Transport headers: read where a port security check needs them, and for security
//! groups (ports, TCP flags, ICMP type, code and echo identifier).
use dataplane_abi::DropReason;

use crate::packet::Packet;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_DCCP: u8 = 33;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_UDPLITE: u8 = 136;

/// ICMP and ICMPv6 echo types.
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP6_ECHO_REQUEST: u8 = 128;
pub const ICMP6_ECHO_REPLY: u8 = 129;

/// `TcpHdr::flags`.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Protocols whose header starts with a source and a destination port.
#[inline(always)]
pub fn has_ports(protocol: u8) -> bool {
    matches!(
        protocol,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_DCCP | IPPROTO_SCTP | IPPROTO_UDPLITE
    )
}

#[repr(C, align(2))]
struct UdpHdr {
    source: [u8; 2],
    dest: [u8; 2],
    len: [u8; 2],
    check: [u8; 2],
}

/// The first 4 bytes of UDP, UDP-Lite, SCTP and DCCP headers.
#[repr(C, align(2))]
struct PortsHdr {
    source: [u8; 2],
    dest: [u8; 2],
}

/// TCP up to the flags.
#[repr(C, align(2))]
struct TcpHdr {
    source: [u8; 2],
    dest: [u8; 2],
    seq: [u8; 4],
    ack_seq: [u8; 4],
    doff: u8,
    flags: u8,
}

/// Minimum length of a TCP header (data offset 5).
const TCP_HLEN: usize = 20;

#[repr(C, align(2))]
struct Icmp6Hdr {
    kind: u8,
    code: u8,
    check: [u8; 2],
}

/// The 8-byte header every ICMP and ICMPv6 message has; for echo, identifier and
/// sequence number.
#[repr(C, align(2))]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    check: [u8; 2],
    id: [u8; 2],
    seq: [u8; 2],
}

pub const ICMP_HLEN: usize = 8;

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

/// (source, destination) port of the UDP-like header at `off` (its first 4 bytes).
#[inline(always)]
pub fn ports(pkt: &mut Packet, off: usize, end: usize) -> Result<(u16, u16), DropReason> {
    if off + core::mem::size_of::<PortsHdr>() > end {
        return Err(DropReason::MalformedL4);
    }
    let h: &PortsHdr = pkt.at(off).ok_or(DropReason::MalformedL4)?;
    Ok((u16::from_be_bytes(h.source), u16::from_be_bytes(h.dest)))
}

/// (source port, destination port, flags) of the TCP header at `off`.
#[inline(always)]
pub fn tcp(pkt: &mut Packet, off: usize, end: usize) -> Result<(u16, u16, u8), DropReason> {
    if off + TCP_HLEN > end {
        return Err(DropReason::MalformedL4);
    }
    let h: &TcpHdr = pkt.at(off).ok_or(DropReason::MalformedL4)?;
    Ok((
        u16::from_be_bytes(h.source),
        u16::from_be_bytes(h.dest),
        h.flags,
    ))
}

/// (type, code, echo identifier) of the ICMP or ICMPv6 message at `off`.
#[inline(always)]
pub fn icmp(pkt: &mut Packet, off: usize, end: usize) -> Result<(u8, u8, u16), DropReason> {
    if off + ICMP_HLEN > end {
        return Err(DropReason::MalformedL4);
    }
    let h: &IcmpHdr = pkt.at(off).ok_or(DropReason::MalformedL4)?;
    Ok((h.kind, h.code, u16::from_be_bytes(h.id)))
}
