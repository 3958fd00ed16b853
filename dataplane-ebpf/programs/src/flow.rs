//! An IP packet as security groups and connection tracking see it: its connection's
//! canonical key (addresses, ports, protocol) and what its transport header says.
//!
//! The key is the one copy of the addresses: rule lookups take the remote address out
//! of it. The flow lives in a per-CPU scratch map (`maps::SG_FLOW`), not on the stack,
//! which the call chain below `port_ingress` has 512 bytes of in all.
use dataplane_abi::{sg_direction, CtKey, DropReason};

use crate::{
    ipv4::Ipv4,
    ipv6::Ipv6,
    l4::{self, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP},
    packet::Packet,
};

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// What the transport header makes of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A protocol without ports (or ICMP of the other family): the whole protocol.
    Other,
    /// A non-first fragment: no transport header to look at.
    Fragment,
    /// UDP, UDP-Lite, SCTP, DCCP.
    Ports,
    Tcp,
    EchoRequest,
    EchoReply,
    /// Destination unreachable, time exceeded and the like: they quote the header of
    /// the packet they are about.
    IcmpError,
    /// Any other ICMP message: judged by the rules, never tracked.
    IcmpOther,
}

pub struct Flow {
    /// The connection's key in the port's zone. Ports: host order; ICMP echo: the
    /// identifier as both; 0 for protocols without ports.
    pub key: CtKey,
    /// The packet comes from the key's `lo` endpoint.
    pub from_lo: bool,
    pub kind: Kind,
    pub tcp_flags: u8,
    /// The `port` of the packet's rule key: destination port (big-endian), or ICMP
    /// `[type, code]`, or zero.
    pub rule_port: [u8; 2],
    /// Where the transport header is and where the datagram ends (ICMP errors read
    /// the header they quote from there).
    pub l4_off: usize,
    pub end: usize,
}

impl Flow {
    /// A flow of `zone` for `parse` to fill in.
    #[inline(always)]
    pub fn new(zone: u32) -> Flow {
        Flow {
            key: empty_key(zone, 0, 0),
            from_lo: true,
            kind: Kind::Other,
            tcp_flags: 0,
            rule_port: [0; 2],
            l4_off: 0,
            end: 0,
        }
    }

    /// ICMP and ICMPv6 type (`rule_port[0]` of an ICMP message).
    #[inline(always)]
    pub fn icmp_type(&self) -> u8 {
        self.rule_port[0]
    }

    /// (source, destination) port.
    #[inline(always)]
    pub fn ports(&self) -> (u16, u16) {
        if self.from_lo {
            (self.key.port_lo, self.key.port_hi)
        } else {
            (self.key.port_hi, self.key.port_lo)
        }
    }
}

/// Whether the remote address of a packet in `direction` (the destination of what the
/// VM sends, the source of what it receives) is the `hi` endpoint of its key.
#[inline(always)]
pub fn remote_is_hi(direction: u8, from_lo: bool) -> bool {
    (direction == sg_direction::EGRESS) == from_lo
}

/// ICMP of the packet's own family (ICMP in IPv4, ICMPv6 in IPv6).
#[inline(always)]
pub fn is_icmp(family: u8, protocol: u8) -> bool {
    (family == FAMILY_V4 && protocol == IPPROTO_ICMP)
        || (family == FAMILY_V6 && protocol == IPPROTO_ICMPV6)
}

/// Echo request type of the family.
#[inline(always)]
pub fn echo_request(family: u8) -> u8 {
    if family == FAMILY_V4 {
        8
    } else {
        128
    }
}

/// Echo reply type of the family.
#[inline(always)]
pub fn echo_reply(family: u8) -> u8 {
    if family == FAMILY_V4 {
        0
    } else {
        129
    }
}

#[inline(always)]
fn icmp_kind(family: u8, kind: u8) -> Kind {
    if family == FAMILY_V4 {
        match kind {
            8 => Kind::EchoRequest,
            0 => Kind::EchoReply,
            3 | 4 | 5 | 11 | 12 => Kind::IcmpError,
            _ => Kind::IcmpOther,
        }
    } else {
        match kind {
            128 => Kind::EchoRequest,
            129 => Kind::EchoReply,
            1..=4 => Kind::IcmpError,
            _ => Kind::IcmpOther,
        }
    }
}

/// A key of `zone` for `family` and `protocol`, without addresses or ports yet.
#[inline(always)]
pub fn empty_key(zone: u32, family: u8, protocol: u8) -> CtKey {
    CtKey {
        zone,
        addr_lo: [0; 16],
        addr_hi: [0; 16],
        port_lo: 0,
        port_hi: 0,
        family,
        protocol,
        _pad: [0; 2],
    }
}

/// Puts the addresses of a packet from `src` to `dst` in an `empty_key` (unsorted).
/// Addresses are moved as words: done byte by byte, the compiler keeps every byte in
/// a register of its own and the stack overflows with spills.
#[inline(always)]
pub fn set_addrs4(key: &mut CtKey, ip: &Ipv4) {
    const { assert!(core::mem::offset_of!(Ipv4, src) == 0) };
    const { assert!(core::mem::offset_of!(Ipv4, dst) == 4) };
    words_mut(&mut key.addr_lo)[0] = u32::from_ne_bytes(ip.src);
    words_mut(&mut key.addr_hi)[0] = u32::from_ne_bytes(ip.dst);
}

#[inline(always)]
pub fn set_addrs6(key: &mut CtKey, ip: &Ipv6) {
    const { assert!(core::mem::offset_of!(Ipv6, src) == 0) };
    const { assert!(core::mem::offset_of!(Ipv6, dst) == 16) };
    // SAFETY: `Ipv6` is `repr(C, align(4))` with the addresses at 0 and 16 (checked
    // above): they are 4-aligned; any bytes are valid words.
    let (src, dst) = unsafe {
        (
            *(ip.src.as_ptr() as *const [u32; 4]),
            *(ip.dst.as_ptr() as *const [u32; 4]),
        )
    };
    *words_mut(&mut key.addr_lo) = src;
    *words_mut(&mut key.addr_hi) = dst;
}

/// An address of a `CtKey` as four words, each loaded as is (network byte order).
#[inline(always)]
fn words(a: &[u8; 16]) -> &[u32; 4] {
    const { assert!(core::mem::offset_of!(CtKey, addr_lo) % 4 == 0) };
    const { assert!(core::mem::offset_of!(CtKey, addr_hi) % 4 == 0) };
    const { assert!(core::mem::align_of::<CtKey>() >= 4) };
    // SAFETY: only called on the addresses of a `CtKey`, which are 4-aligned (checked
    // above); any bytes are valid words.
    unsafe { &*(a.as_ptr() as *const [u32; 4]) }
}

#[inline(always)]
fn words_mut(a: &mut [u8; 16]) -> &mut [u32; 4] {
    // SAFETY: as `words`.
    unsafe { &mut *(a.as_mut_ptr() as *mut [u32; 4]) }
}

/// Puts the ports of the packet from `addr_lo` to `addr_hi` of an `unsorted_key` in,
/// and orders its endpoints (address bytes, then port). Whether the packet's source
/// is the `lo` endpoint.
#[inline(always)]
pub fn sort_key(key: &mut CtKey, sport: u16, dport: u16) -> bool {
    let (src, dst) = (words(&key.addr_lo), words(&key.addr_hi));
    let mut src_first = sport <= dport;
    // From the last word to the first: the first that differs decides.
    for i in (0..4).rev() {
        let (s, d) = (u32::from_be(src[i]), u32::from_be(dst[i]));
        if s != d {
            src_first = s < d;
        }
    }
    if src_first {
        key.port_lo = sport;
        key.port_hi = dport;
        return true;
    }
    for i in 0..4 {
        let w = words(&key.addr_lo)[i];
        words_mut(&mut key.addr_lo)[i] = words(&key.addr_hi)[i];
        words_mut(&mut key.addr_hi)[i] = w;
    }
    key.port_lo = dport;
    key.port_hi = sport;
    false
}

/// Fills in `flow` (a `Flow::new`) for the IP packet whose header `ipv4::parse` or
/// `ipv6::parse` read (one of `v4` and `v6`). A transport header too short for what is
/// read from it is `MalformedL4`. A BPF function of its own: the packet pulls it may
/// make spill registers, on a stack frame that is not `policy::check`'s.
#[inline(never)]
pub fn parse(
    pkt: &mut Packet,
    v4: Option<&Ipv4>,
    v6: Option<&Ipv6>,
    flow: &mut Flow,
) -> Result<(), DropReason> {
    // Offsets from the parsers, not read back from `flow` (map memory, where the
    // verifier forgets their bounds and would refuse them in packet arithmetic).
    let (l4_off, end, has_l4);
    if let Some(ip) = v4 {
        set_addrs4(&mut flow.key, ip);
        flow.key.family = FAMILY_V4;
        flow.key.protocol = ip.proto;
        (l4_off, end, has_l4) = (ip.l4_off, ip.end, ip.first_fragment);
    } else if let Some(ip) = v6 {
        set_addrs6(&mut flow.key, ip);
        flow.key.family = FAMILY_V6;
        flow.key.protocol = ip.next;
        (l4_off, end, has_l4) = (ip.l4_off, ip.end, ip.has_l4);
    } else {
        return Err(DropReason::MalformedEthernet);
    }
    (flow.l4_off, flow.end) = (l4_off, end);
    let (family, protocol) = (flow.key.family, flow.key.protocol);
    let (mut sport, mut dport) = (0, 0);
    if !has_l4 {
        flow.kind = Kind::Fragment;
    } else if protocol == IPPROTO_TCP {
        let flags;
        (sport, dport, flags) = l4::tcp(pkt, l4_off, end)?;
        flow.kind = Kind::Tcp;
        flow.tcp_flags = flags;
        flow.rule_port = dport.to_be_bytes();
    } else if l4::has_ports(protocol) {
        (sport, dport) = l4::ports(pkt, l4_off, end)?;
        flow.kind = Kind::Ports;
        flow.rule_port = dport.to_be_bytes();
    } else if is_icmp(family, protocol) {
        let (kind, code, id) = l4::icmp(pkt, l4_off, end)?;
        flow.kind = icmp_kind(family, kind);
        flow.rule_port = [kind, code];
        if matches!(flow.kind, Kind::EchoRequest | Kind::EchoReply) {
            (sport, dport) = (id, id);
        }
    }
    flow.from_lo = sort_key(&mut flow.key, sport, dport);
    Ok(())
}
