//! Crafted Ethernet frames: well-formed ones with correct checksums (so a real stack
//! behind a veth accepts them too), and the building blocks and byte offsets tests use
//! to make malformed ones.
//!
//! Layers compose: an L4 builder (`udp`, `icmp6`, `ns`, ...) returns the transport
//! header and payload with a zero checksum; `ipv4`/`ipv6`/`ipv6_ext` wrap it and fill in
//! every checksum; `ethernet`/`vlan_tagged` put the Ethernet header in front. The
//! `*_frame` functions are shortcuts for the frames tests use most.
use std::net::{Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const ARP_LEN: usize = 28;

/// Offsets in a frame with an untagged Ethernet header, for tests that corrupt fields.
pub mod offsets {
    use super::ETH_HLEN;
    pub const ETHERTYPE: usize = 12;
    pub const IPV4_VERSION_IHL: usize = ETH_HLEN;
    pub const IPV4_TOTAL_LEN: usize = ETH_HLEN + 2;
    pub const IPV4_FRAG_OFF: usize = ETH_HLEN + 6;
    pub const IPV4_SRC: usize = ETH_HLEN + 12;
    pub const IPV6_VERSION: usize = ETH_HLEN;
    pub const IPV6_PAYLOAD_LEN: usize = ETH_HLEN + 4;
    pub const IPV6_SRC: usize = ETH_HLEN + 8;
    pub const ARP_HTYPE: usize = ETH_HLEN;
    pub const ARP_PTYPE: usize = ETH_HLEN + 2;
    pub const ARP_HLEN: usize = ETH_HLEN + 4;
    pub const ARP_PLEN: usize = ETH_HLEN + 5;
}

pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const QINQ: u16 = 0x88a8;
    pub const IPV6: u16 = 0x86dd;
    pub const LLDP: u16 = 0x88cc;
}

pub mod proto {
    pub const HOPOPTS: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const DCCP: u8 = 33;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const GRE: u8 = 47;
    pub const ICMPV6: u8 = 58;
    pub const NONE: u8 = 59;
    pub const DSTOPTS: u8 = 60;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// TCP header flags.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const SYN_ACK: u8 = SYN | ACK;
    pub const FIN_ACK: u8 = FIN | ACK;
    pub const PSH_ACK: u8 = PSH | ACK;
}

pub mod icmp4_type {
    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACH: u8 = 3;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    /// `DEST_UNREACH` codes.
    pub const CODE_PORT_UNREACH: u8 = 3;
    pub const CODE_FRAG_NEEDED: u8 = 4;
}

pub mod icmp6_type {
    pub const DEST_UNREACH: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
    pub const MLD_QUERY: u8 = 130;
    pub const MLD_REPORT: u8 = 131;
    pub const ROUTER_SOLICIT: u8 = 133;
    pub const ROUTER_ADVERT: u8 = 134;
    pub const NEIGH_SOLICIT: u8 = 135;
    pub const NEIGH_ADVERT: u8 = 136;
    pub const MLD2_REPORT: u8 = 143;
}

pub mod arp_op {
    pub const REQUEST: u16 = 1;
    pub const REPLY: u16 = 2;
}

// ---------------------------------------------------------------------------------
// Link layer

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A frame with one 802.1Q (`tpid` 0x8100) or 802.1ad (0x88a8) tag.
pub fn vlan_tagged(
    dst: Mac,
    src: Mac,
    tpid: u16,
    vid: u16,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut tagged = Vec::with_capacity(4 + payload.len());
    tagged.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    tagged.extend_from_slice(&ethertype.to_be_bytes());
    tagged.extend_from_slice(payload);
    ethernet(dst, src, tpid, &tagged)
}

/// Ethernet/IPv4 ARP body (28 bytes).
pub fn arp(op: u16, sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(ARP_LEN);
    a.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
    a.extend_from_slice(&ethertype::IPV4.to_be_bytes());
    a.extend_from_slice(&[6, 4]);
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

// ---------------------------------------------------------------------------------
// IPv4

/// IPv4 header (no options, DF clear, TTL 64) and `l4`, with the header checksum and,
/// for UDP, TCP and ICMP, the transport checksum filled in.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_fragment(src, dst, protocol, 0, false, l4)
}

/// Sets the TTL of the IPv4 `packet` (from its IP header on) and its header checksum.
pub fn set_ttl4(packet: &mut [u8], ttl: u8) {
    packet[8] = ttl;
    packet[10..12].copy_from_slice(&[0, 0]);
    let check = checksum(&[&packet[..IPV4_HLEN]]);
    packet[10..12].copy_from_slice(&check.to_be_bytes());
}

/// As [`ipv4`], as the fragment at `offset` (bytes, a multiple of 8). The transport
/// checksum is filled in only in a first fragment.
pub fn ipv4_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    offset: u16,
    more_fragments: bool,
    l4: &[u8],
) -> Vec<u8> {
    let total = (IPV4_HLEN + l4.len()) as u16;
    let frag = (offset / 8) | if more_fragments { 0x2000 } else { 0 };
    let mut p = Vec::with_capacity(total as usize);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&0x1234u16.to_be_bytes());
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let check = checksum(&[&p]);
    p[10..12].copy_from_slice(&check.to_be_bytes());
    let mut l4 = l4.to_vec();
    if offset == 0 {
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, protocol]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        match protocol {
            proto::UDP => fill_checksum(&mut l4, 6, &pseudo, true),
            proto::TCP => fill_checksum(&mut l4, 16, &pseudo, false),
            proto::ICMP => fill_checksum(&mut l4, 2, &[], false),
            _ => {}
        }
    }
    p.extend_from_slice(&l4);
    p
}

// ---------------------------------------------------------------------------------
// IPv6

/// An IPv6 extension header in front of the transport header.
#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-hop options; `options` is padded to a multiple of 8 with PadN.
    HopByHop(Vec<u8>),
    /// Destination options, as `HopByHop`.
    DestOpts(Vec<u8>),
    /// A routing header with segments left 0 (so no node acts on it) of
    /// `8 * (1 + len)` bytes.
    Routing { len: u8 },
    /// Fragment header; `offset` in bytes, a multiple of 8.
    Fragment { offset: u16, more: bool, id: u32 },
}

/// Router alert option (RFC 2711) for MLD, value 0.
pub const ROUTER_ALERT_MLD: [u8; 4] = [5, 2, 0, 0];

impl Ext {
    fn kind(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => proto::HOPOPTS,
            Ext::DestOpts(_) => proto::DSTOPTS,
            Ext::Routing { .. } => proto::ROUTING,
            Ext::Fragment { .. } => proto::FRAGMENT,
        }
    }

    fn encode(&self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(options) | Ext::DestOpts(options) => {
                let mut h = vec![next, 0];
                h.extend_from_slice(options);
                let pad = (8 - h.len() % 8) % 8;
                match pad {
                    0 => {}
                    1 => h.push(0), // Pad1
                    n => {
                        h.extend_from_slice(&[1, (n - 2) as u8]);
                        h.resize(h.len() + n - 2, 0);
                    }
                }
                h[1] = (h.len() / 8 - 1) as u8;
                h
            }
            Ext::Routing { len } => {
                let mut h = vec![next, *len, 0, 0];
                h.resize(8 * (1 + *len as usize), 0);
                h
            }
            Ext::Fragment { offset, more, id } => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&((offset & 0xfff8) | u16::from(*more)).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h
            }
        }
    }
}

/// IPv6 header (hop limit 255 for ICMPv6, as ND requires, else 64) and `l4`, with the
/// transport checksum of UDP, TCP and ICMPv6 filled in.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
    ipv6_ext(src, dst, &[], next, l4)
}

/// As [`ipv6`] with extension headers `ext`, in order, between the fixed header and
/// `l4` (protocol `next`). Behind a non-first fragment header `l4` is left as is.
pub fn ipv6_ext(src: Ipv6Addr, dst: Ipv6Addr, ext: &[Ext], next: u8, l4: &[u8]) -> Vec<u8> {
    let mut l4 = l4.to_vec();
    let non_first_fragment = ext
        .iter()
        .any(|e| matches!(e, Ext::Fragment { offset, .. } if *offset != 0));
    if !non_first_fragment {
        let mut pseudo = Vec::with_capacity(40);
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, next]);
        match next {
            proto::UDP => fill_checksum(&mut l4, 6, &pseudo, true),
            proto::TCP => fill_checksum(&mut l4, 16, &pseudo, false),
            proto::ICMPV6 => fill_checksum(&mut l4, 2, &pseudo, false),
            _ => {}
        }
    }
    let mut payload = Vec::new();
    for (i, e) in ext.iter().enumerate() {
        let following = ext.get(i + 1).map_or(next, Ext::kind);
        payload.extend_from_slice(&e.encode(following));
    }
    payload.extend_from_slice(&l4);
    let first = ext.first().map_or(next, Ext::kind);
    let hop_limit = if next == proto::ICMPV6 { 255 } else { 64 };
    let mut p = Vec::with_capacity(IPV6_HLEN + payload.len());
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[first, hop_limit]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&payload);
    p
}

/// `ff02::1:ffXX:XXXX` for `addr`.
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(o[13]),
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// `33:33:` + the low 32 bits of an IPv6 multicast address.
pub fn multicast_mac(group: Ipv6Addr) -> Mac {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

// ---------------------------------------------------------------------------------
// Transport (checksums are filled in by `ipv4`/`ipv6`)

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A TCP SYN without options.
pub fn tcp_syn(sport: u16, dport: u16) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes()); // seq
    t.extend_from_slice(&0u32.to_be_bytes()); // ack
    t.extend_from_slice(&[0x50, 0x02]); // data offset 5, SYN
    t.extend_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    t
}

/// A TCP segment without options or payload, with `flags` (see [`tcp_flags`]).
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = tcp_syn(sport, dport);
    t[13] = flags;
    if flags & tcp_flags::ACK != 0 {
        t[8..12].copy_from_slice(&1u32.to_be_bytes());
    }
    t
}

/// The first 4 bytes of a header with ports (SCTP, UDP-Lite, DCCP), then `rest`.
pub fn ports_header(sport: u16, dport: u16, rest: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(4 + rest.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(rest);
    h
}

pub fn icmp4_echo(id: u16, seq: u16) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(b"dataplane-ping!!");
    m
}

pub fn icmp4_echo_reply(id: u16, seq: u16) -> Vec<u8> {
    let mut m = icmp4_echo(id, seq);
    m[0] = icmp4_type::ECHO_REPLY;
    m
}

/// Any ICMPv4 message: type, code, checksum (0), then `body` (which starts with the
/// 4 bytes after the checksum).
pub fn icmp4(kind: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(body);
    m
}

/// What an ICMP error quotes of the IP packet `packet` (IPv4 or IPv6, without the
/// Ethernet header): its header and the first 8 bytes of its payload.
pub fn quote(packet: &[u8]) -> Vec<u8> {
    let header = match packet.first().map(|b| b >> 4) {
        Some(4) => usize::from(packet[0] & 0x0f) * 4,
        _ => IPV6_HLEN,
    };
    packet[..(header + 8).min(packet.len())].to_vec()
}

/// An ICMPv4 error (destination unreachable, time exceeded, ...) with `rest` in the 4
/// bytes after the checksum (frag-needed: the next-hop MTU in the low 16 bits) about
/// the IP packet `about`.
pub fn icmp4_error(kind: u8, code: u8, rest: u32, about: &[u8]) -> Vec<u8> {
    let mut body = rest.to_be_bytes().to_vec();
    body.extend_from_slice(&quote(about));
    icmp4(kind, code, &body)
}

/// An ICMPv6 error (destination unreachable, packet too big, ...) with `rest` after the
/// checksum (packet too big: the MTU) about the IPv6 packet `about`.
pub fn icmp6_error(kind: u8, code: u8, rest: u32, about: &[u8]) -> Vec<u8> {
    let mut body = rest.to_be_bytes().to_vec();
    body.extend_from_slice(&about[..about.len().min(1232)]);
    icmp6(kind, code, &body)
}

/// Any ICMPv6 message: type, code, checksum (0), then `body`.
pub fn icmp6(kind: u8, code: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(body);
    m
}

pub fn icmp6_echo(id: u16, seq: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&id.to_be_bytes());
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(b"dataplane-ping!!");
    icmp6(icmp6_type::ECHO_REQUEST, 0, &body)
}

pub fn icmp6_echo_reply(id: u16, seq: u16) -> Vec<u8> {
    let mut m = icmp6_echo(id, seq);
    m[0] = icmp6_type::ECHO_REPLY;
    m
}

/// A link-layer address ND option: 1 source, 2 target.
pub fn nd_ll_option(kind: u8, mac: Mac) -> Vec<u8> {
    let mut o = vec![kind, 1];
    o.extend_from_slice(&mac);
    o
}

/// Neighbour solicitation for `target`, then `options` (encoded, e.g. [`nd_ll_option`]).
pub fn ns(target: Ipv6Addr, options: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![0; 4];
    body.extend_from_slice(&target.octets());
    body.extend(options.iter().flatten());
    icmp6(icmp6_type::NEIGH_SOLICIT, 0, &body)
}

/// Neighbour advertisement (solicited, override) for `target`, then `options`.
pub fn na(target: Ipv6Addr, options: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![0x60, 0, 0, 0];
    body.extend_from_slice(&target.octets());
    body.extend(options.iter().flatten());
    icmp6(icmp6_type::NEIGH_ADVERT, 0, &body)
}

/// Router advertisement: hop limit 64, lifetime 1800 s, a source link-layer option.
pub fn ra(source_mac: Mac) -> Vec<u8> {
    let mut body = vec![64, 0];
    body.extend_from_slice(&1800u16.to_be_bytes());
    body.extend_from_slice(&[0; 8]); // reachable time, retrans timer
    body.extend_from_slice(&nd_ll_option(1, source_mac));
    icmp6(icmp6_type::ROUTER_ADVERT, 0, &body)
}

/// MLDv1 report for `group`.
pub fn mld1_report(group: Ipv6Addr) -> Vec<u8> {
    let mut body = vec![0; 4]; // max response delay, reserved
    body.extend_from_slice(&group.octets());
    icmp6(icmp6_type::MLD_REPORT, 0, &body)
}

/// MLDv2 report with one "change to exclude {}" (join) record for `group`.
pub fn mld2_report(group: Ipv6Addr) -> Vec<u8> {
    let mut body = vec![0, 0, 0, 1]; // reserved, one record
    body.extend_from_slice(&[4, 0, 0, 0]); // CHANGE_TO_EXCLUDE, no aux, no sources
    body.extend_from_slice(&group.octets());
    icmp6(icmp6_type::MLD2_REPORT, 0, &body)
}

/// A BOOTP/DHCP message (`op` 1 request, 2 reply) of DHCP type `msg_type` for the
/// client `chaddr`, `yiaddr` the address offered.
pub fn dhcp(op: u8, msg_type: u8, chaddr: Mac, yiaddr: Ipv4Addr) -> Vec<u8> {
    let mut m = vec![op, 1, 6, 0];
    m.extend_from_slice(&0x3903_f326u32.to_be_bytes()); // xid
    m.extend_from_slice(&[0; 4]); // secs, flags
    m.extend_from_slice(&[0; 4]); // ciaddr
    m.extend_from_slice(&yiaddr.octets());
    m.extend_from_slice(&[0; 8]); // siaddr, giaddr
    m.extend_from_slice(&chaddr);
    m.resize(236, 0); // chaddr padding, sname, file
    m.extend_from_slice(&[99, 130, 83, 99]); // magic cookie
    m.extend_from_slice(&[53, 1, msg_type, 255]);
    m
}

/// A DHCPv6 message of `msg_type` (2 advertise, 7 reply from a server).
pub fn dhcp6(msg_type: u8) -> Vec<u8> {
    vec![msg_type, 0x12, 0x34, 0x56]
}

// ---------------------------------------------------------------------------------
// Whole frames

pub fn arp_request_frame(src: Mac, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    ethernet(
        BROADCAST,
        src,
        ethertype::ARP,
        &arp(arp_op::REQUEST, src, spa, [0; 6], tpa),
    )
}

pub fn udp4_frame(
    dst: Mac,
    src: Mac,
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let l4 = udp(sport, dport, b"dataplane");
    ethernet(
        dst,
        src,
        ethertype::IPV4,
        &ipv4(saddr, daddr, proto::UDP, &l4),
    )
}

/// An IPv4 packet of `protocol` carrying `l4`, in an Ethernet frame.
pub fn ip4_frame(
    dst: Mac,
    src: Mac,
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
    protocol: u8,
    l4: &[u8],
) -> Vec<u8> {
    ethernet(dst, src, ethertype::IPV4, &ipv4(saddr, daddr, protocol, l4))
}

/// An IPv6 packet of `next` carrying `l4`, in an Ethernet frame.
pub fn ip6_frame(
    dst: Mac,
    src: Mac,
    saddr: Ipv6Addr,
    daddr: Ipv6Addr,
    next: u8,
    l4: &[u8],
) -> Vec<u8> {
    ethernet(dst, src, ethertype::IPV6, &ipv6(saddr, daddr, next, l4))
}

pub fn tcp4_frame(dst: Mac, src: Mac, saddr: Ipv4Addr, daddr: Ipv4Addr) -> Vec<u8> {
    let l4 = tcp_syn(40000, 80);
    ethernet(
        dst,
        src,
        ethertype::IPV4,
        &ipv4(saddr, daddr, proto::TCP, &l4),
    )
}

pub fn icmp4_frame(dst: Mac, src: Mac, saddr: Ipv4Addr, daddr: Ipv4Addr) -> Vec<u8> {
    let l4 = icmp4_echo(7, 1);
    ethernet(
        dst,
        src,
        ethertype::IPV4,
        &ipv4(saddr, daddr, proto::ICMP, &l4),
    )
}

/// DHCPDISCOVER: 0.0.0.0:68 to 255.255.255.255:67, broadcast.
pub fn dhcp_discover_frame(client: Mac) -> Vec<u8> {
    let l4 = udp(68, 67, &dhcp(1, 1, client, Ipv4Addr::UNSPECIFIED));
    let ip = ipv4(Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, proto::UDP, &l4);
    ethernet(BROADCAST, client, ethertype::IPV4, &ip)
}

/// DHCPOFFER from a server at `server`/`server_ip` offering `offered` to `client`.
pub fn dhcp_offer_frame(
    server: Mac,
    server_ip: Ipv4Addr,
    client: Mac,
    offered: Ipv4Addr,
) -> Vec<u8> {
    let l4 = udp(67, 68, &dhcp(2, 2, client, offered));
    ethernet(
        client,
        server,
        ethertype::IPV4,
        &ipv4(server_ip, offered, proto::UDP, &l4),
    )
}

pub fn udp6_frame(
    dst: Mac,
    src: Mac,
    saddr: Ipv6Addr,
    daddr: Ipv6Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let l4 = udp(sport, dport, b"dataplane");
    ethernet(
        dst,
        src,
        ethertype::IPV6,
        &ipv6(saddr, daddr, proto::UDP, &l4),
    )
}

pub fn icmp6_echo_frame(dst: Mac, src: Mac, saddr: Ipv6Addr, daddr: Ipv6Addr) -> Vec<u8> {
    ethernet(
        dst,
        src,
        ethertype::IPV6,
        &ipv6(saddr, daddr, proto::ICMPV6, &icmp6_echo(7, 1)),
    )
}

/// An ICMPv6 message `l4` from `src`/`saddr` to the IPv6 multicast group `group`.
pub fn icmp6_multicast_frame(src: Mac, saddr: Ipv6Addr, group: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
    ethernet(
        multicast_mac(group),
        src,
        ethertype::IPV6,
        &ipv6(saddr, group, proto::ICMPV6, l4),
    )
}

/// NS for `target` to its solicited-node group, with a source link-layer option when
/// `slla` is given. From `::` this is duplicate address detection.
pub fn ns_frame(src: Mac, saddr: Ipv6Addr, target: Ipv6Addr, slla: Option<Mac>) -> Vec<u8> {
    let options: Vec<Vec<u8>> = slla.map(|m| nd_ll_option(1, m)).into_iter().collect();
    icmp6_multicast_frame(src, saddr, solicited_node(target), &ns(target, &options))
}

/// Unicast NA for `target` to `dst`/`daddr`, with a target link-layer option when
/// `tlla` is given.
pub fn na_frame(
    src: Mac,
    saddr: Ipv6Addr,
    dst: Mac,
    daddr: Ipv6Addr,
    target: Ipv6Addr,
    tlla: Option<Mac>,
) -> Vec<u8> {
    let options: Vec<Vec<u8>> = tlla.map(|m| nd_ll_option(2, m)).into_iter().collect();
    ethernet(
        dst,
        src,
        ethertype::IPV6,
        &ipv6(saddr, daddr, proto::ICMPV6, &na(target, &options)),
    )
}

/// RA to all nodes (ff02::1).
pub fn ra_frame(src: Mac, saddr: Ipv6Addr) -> Vec<u8> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    icmp6_multicast_frame(src, saddr, all_nodes, &ra(src))
}

/// MLDv2 report to ff02::16 behind a hop-by-hop header with a router alert, as a
/// kernel sends it.
pub fn mld2_report_frame(src: Mac, saddr: Ipv6Addr, group: Ipv6Addr) -> Vec<u8> {
    let all_mld_routers = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
    let hbh = [Ext::HopByHop(ROUTER_ALERT_MLD.to_vec())];
    let ip = ipv6_ext(
        saddr,
        all_mld_routers,
        &hbh,
        proto::ICMPV6,
        &mld2_report(group),
    );
    ethernet(multicast_mac(all_mld_routers), src, ethertype::IPV6, &ip)
}

/// MLDv1 report for `group`, sent to the group, behind a hop-by-hop router alert.
pub fn mld1_report_frame(src: Mac, saddr: Ipv6Addr, group: Ipv6Addr) -> Vec<u8> {
    let hbh = [Ext::HopByHop(ROUTER_ALERT_MLD.to_vec())];
    let ip = ipv6_ext(saddr, group, &hbh, proto::ICMPV6, &mld1_report(group));
    ethernet(multicast_mac(group), src, ethertype::IPV6, &ip)
}

/// DHCPv6 advertise from a server at `src`/`saddr` (udp 547) to a client (udp 546).
pub fn dhcp6_advertise_frame(src: Mac, saddr: Ipv6Addr, dst: Mac, daddr: Ipv6Addr) -> Vec<u8> {
    let l4 = udp(547, 546, &dhcp6(2));
    ethernet(
        dst,
        src,
        ethertype::IPV6,
        &ipv6(saddr, daddr, proto::UDP, &l4),
    )
}

// ---------------------------------------------------------------------------------
// Helpers

/// `frame` cut to `len` bytes.
pub fn truncated(frame: &[u8], len: usize) -> Vec<u8> {
    frame[..len.min(frame.len())].to_vec()
}

/// `frame` with the big-endian u16 at `off` replaced by `value`.
pub fn with_u16(frame: &[u8], off: usize, value: u16) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[off..off + 2].copy_from_slice(&value.to_be_bytes());
    f
}

/// `frame` with the byte at `off` replaced by `value`.
pub fn with_u8(frame: &[u8], off: usize, value: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[off] = value;
    f
}

/// Internet checksum over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    let mut odd: Option<u8> = None;
    for byte in parts.iter().flat_map(|p| p.iter().copied()) {
        match odd.take() {
            Some(hi) => sum += u32::from(u16::from_be_bytes([hi, byte])),
            None => odd = Some(byte),
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes the checksum of `pseudo` + `l4` at `at` in `l4` (which holds zero there).
/// UDP sends a computed 0 as 0xffff. A message too short to hold it is left alone.
fn fill_checksum(l4: &mut [u8], at: usize, pseudo: &[u8], udp: bool) {
    if l4.len() < at + 2 {
        return;
    }
    let mut sum = checksum(&[pseudo, l4]);
    if udp && sum == 0 {
        sum = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

#[cfg(test)]
mod tests {
    //! The builders checked against an independent parser.
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    const A: Mac = [0x02, 0, 0, 0, 0, 1];
    const B: Mac = [0x02, 0, 0, 0, 0, 2];

    fn v4(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn v6(last: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last)
    }

    #[test]
    fn udp4_parses_with_valid_checksums() {
        let f = udp4_frame(B, A, v4(1), v4(2), 1234, 53);
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(NetSlice::Ipv4(ip)) = &p.net else {
            panic!("not ipv4")
        };
        let header = ip.header().to_header();
        assert_eq!(header.header_checksum, header.calc_header_checksum());
        let Some(TransportSlice::Udp(u)) = &p.transport else {
            panic!("not udp")
        };
        let expected = u
            .to_header()
            .calc_checksum_ipv4(&header, u.payload())
            .unwrap();
        assert_eq!(u.checksum(), expected);
        assert_eq!((u.source_port(), u.destination_port()), (1234, 53));
    }

    #[test]
    fn icmp6_behind_hop_by_hop_parses_with_valid_checksum() {
        let f = mld2_report_frame(A, Ipv6Addr::UNSPECIFIED, v6(0x99));
        let p = SlicedPacket::from_ethernet(&f).unwrap();
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            panic!("not ipv6")
        };
        assert_eq!(ip.header().next_header().0, proto::HOPOPTS);
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("not icmpv6")
        };
        assert_eq!(icmp.type_u8(), icmp6_type::MLD2_REPORT);
        let header = ip.header().to_header();
        let expected = icmp
            .icmp_type()
            .calc_checksum(header.source, header.destination, icmp.payload())
            .unwrap();
        assert_eq!(icmp.checksum(), expected);
    }

    #[test]
    fn na_tcp_arp_and_vlan_parse() {
        let na = na_frame(A, v6(1), B, v6(2), v6(1), Some(A));
        let p = SlicedPacket::from_ethernet(&na).unwrap();
        let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
            panic!("not icmpv6")
        };
        assert_eq!(icmp.type_u8(), icmp6_type::NEIGH_ADVERT);

        let tcp = tcp4_frame(B, A, v4(1), v4(2));
        let p = SlicedPacket::from_ethernet(&tcp).unwrap();
        let Some(TransportSlice::Tcp(t)) = &p.transport else {
            panic!("not tcp")
        };
        assert!(t.syn());

        let arp = arp_request_frame(A, v4(1), v4(2));
        let p = SlicedPacket::from_ethernet(&arp).unwrap();
        assert!(matches!(p.net, Some(NetSlice::Arp(_))));

        let tagged = vlan_tagged(
            B,
            A,
            ethertype::VLAN,
            100,
            ethertype::IPV4,
            &tcp[ETH_HLEN..],
        );
        let p = SlicedPacket::from_ethernet(&tagged).unwrap();
        assert!(matches!(p.transport, Some(TransportSlice::Tcp(_))));
    }

    #[test]
    fn checksum_of_rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
    }
}
