//! A reference evaluator of NAT at routers' external gateways, in plain Rust over the
//! model (not over the compiled maps), written from the Networking API's meaning:
//!
//! - A router with `external_gateway_info` has an address on the external network (its
//!   IPv4 external fixed IP) and a default route through that subnet's `gateway_ip`:
//!   what it routes there leaves through the node's uplink, from its gateway port's MAC
//!   to the subnet gateway's (as resolved on the uplink; unresolved: `NoNeighbor`).
//! - A floating IP associated with a port stands for that port's fixed address (the one
//!   named, else its first IPv4 one) on the external network, both ways, 1:1: what the
//!   port sends out through the floating IP's router leaves from the floating IP, ports
//!   kept; what arrives for it reaches the port at its fixed address. A floating IP
//!   with no port is nobody's: what arrives for it is dropped (`NoNatBinding`), and the
//!   node does not answer ARP for it.
//! - With `enable_snat`, a port without a floating IP leaves as the gateway's address,
//!   with a source port (echo: identifier) from the node's range that no other
//!   connection to the same remote endpoint holds; replies from that endpoint to that
//!   port reach the connection's source, and nothing else to the gateway does. A
//!   connection holds its port from the first packet the router translated, also when
//!   that packet is dropped further on (a reply that may be to such a port, whose
//!   number nobody saw, is `Outcome::Ambiguous`). Only TCP, UDP and echo requests start
//!   connections (anything else: `NatUnsupported`); ICMP errors belong to the
//!   connection of the packet they quote (none: `NoNatBinding`). A full range:
//!   `NatPortsExhausted`.
//! - Without SNAT the fixed addresses leave as they are, and the external network
//!   routes them back to the router, which delivers them (no translation).
//! - Addresses of the external network this node translates (gateways, floating IPs of
//!   its ports) are reached from inside without leaving the node (hairpin): translated
//!   out by the sender's router and in by the receiver's, one routing step (TTL − 1).
//! - ICMP errors have the packet they quote translated as its sender sent it or its
//!   receiver got it (addresses, ports; the quoted header's checksum follows).
//! - A router answers pings of its own addresses, the gateway address included (from
//!   inside, and from outside with a reply of its own TTL, 64); on the uplink the node
//!   answers ARP for the gateways and the associated floating IPs it holds, with the
//!   router's gateway port MAC.
//! - Routing inside (on-link subnets, static routes, TTL, time-exceeded errors from the
//!   interface's address; none about a later fragment) is as `reference_router` has it.
//!
//! Scope: IPv4 (the API translates nothing else), ports without port security or
//! security groups, one uplink. The packet vocabulary ([`Packet`]) comes with an
//! encoder to frames and a decoder ([`View::decode`]) that checks every checksum.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use dataplane_abi::DropReason;
use dataplane_agent::core::{
    compile::Uplink,
    model::{FloatingIp, MacAddr, Port, Router, State},
};
use ipnet::{IpNet, Ipv4Net};

use crate::frames::{self, proto, IPV4_HLEN};
use crate::reference_router::RouterReference;

/// `device_owner` of a router's gateway port.
pub const GATEWAY_OWNER: &str = "network:router_gateway";
/// The TTL of what a router sends itself.
pub const ROUTER_TTL: u8 = 64;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Payload of the UDP datagrams the encoder builds.
pub const UDP_PAYLOAD: &[u8] = b"nat-reference";

// ---------------------------------------------------------------------------------
// Packets

/// An IPv4 packet (no options) as NAT sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    /// Fragment offset (bytes, a multiple of 8) and more-fragments flag.
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub l4: L4,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    /// `checksum`: false for a datagram sent without one (0).
    Udp {
        sport: u16,
        dport: u16,
        checksum: bool,
    },
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    EchoRequest {
        id: u16,
        seq: u16,
    },
    EchoReply {
        id: u16,
        seq: u16,
    },
    /// An ICMP error about `quote` (of which its header and 8 bytes are quoted).
    Error {
        kind: u8,
        code: u8,
        rest: u32,
        quote: Box<Packet>,
    },
    /// Bytes of protocol `proto` that are no transport header (a later fragment's).
    Other {
        proto: u8,
        bytes: Vec<u8>,
    },
}

impl Packet {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Packet {
        Packet {
            src,
            dst,
            ttl: 64,
            frag_offset: 0,
            more_fragments: false,
            l4,
        }
    }

    pub fn proto(&self) -> u8 {
        match &self.l4 {
            L4::Udp { .. } => proto::UDP,
            L4::Tcp { .. } => proto::TCP,
            L4::EchoRequest { .. } | L4::EchoReply { .. } | L4::Error { .. } => proto::ICMP,
            L4::Other { proto, .. } => *proto,
        }
    }

    /// Carries its transport header (not a later fragment).
    pub fn first_fragment(&self) -> bool {
        self.frag_offset == 0
    }

    /// (source, destination) port as connections see them: echo requests have the
    /// identifier as the source port, echo replies as the destination port.
    pub fn ports(&self) -> (u16, u16) {
        match self.l4 {
            L4::Udp { sport, dport, .. } | L4::Tcp { sport, dport, .. } => (sport, dport),
            L4::EchoRequest { id, .. } => (id, 0),
            L4::EchoReply { id, .. } => (0, id),
            _ => (0, 0),
        }
    }

    /// Sets the ports of [`Packet::ports`] (the zero side of echo stays zero).
    pub fn set_ports(&mut self, src: u16, dst: u16) {
        match &mut self.l4 {
            L4::Udp { sport, dport, .. } | L4::Tcp { sport, dport, .. } => {
                (*sport, *dport) = (src, dst)
            }
            L4::EchoRequest { id, .. } => *id = src,
            L4::EchoReply { id, .. } => *id = dst,
            _ => {}
        }
    }

    /// The IP packet, every checksum filled in (a later fragment has no transport
    /// checksum to fill).
    pub fn encode(&self) -> Vec<u8> {
        let l4 = match &self.l4 {
            L4::Udp { sport, dport, .. } => frames::udp(*sport, *dport, UDP_PAYLOAD),
            L4::Tcp {
                sport,
                dport,
                flags,
            } => frames::tcp(*sport, *dport, *flags),
            L4::EchoRequest { id, seq } => frames::icmp4_echo(*id, *seq),
            L4::EchoReply { id, seq } => frames::icmp4_echo_reply(*id, *seq),
            L4::Error {
                kind,
                code,
                rest,
                quote,
            } => frames::icmp4_error(*kind, *code, *rest, &quote.encode()),
            L4::Other { bytes, .. } => bytes.clone(),
        };
        let mut p = frames::ipv4_fragment(
            self.src,
            self.dst,
            self.proto(),
            self.frag_offset,
            self.more_fragments,
            &l4,
        );
        if let L4::Udp {
            checksum: false, ..
        } = self.l4
        {
            p[IPV4_HLEN + 6..IPV4_HLEN + 8].copy_from_slice(&[0, 0]);
        }
        frames::set_ttl4(&mut p, self.ttl);
        p
    }

    /// What the model compares of the packet.
    pub fn view(&self) -> View {
        let (sport, dport) = self.ports();
        let detail = match &self.l4 {
            _ if !self.first_fragment() => Detail::Fragment,
            L4::Udp { checksum, .. } => Detail::Udp {
                checksum: *checksum,
            },
            L4::Tcp { flags, .. } => Detail::Tcp { flags: *flags },
            L4::EchoRequest { seq, .. } | L4::EchoReply { seq, .. } => Detail::Echo { seq: *seq },
            L4::Error {
                kind,
                code,
                rest,
                quote,
            } => Detail::Error {
                kind: *kind,
                code: *code,
                rest: *rest,
                quote: Quote::of(quote),
            },
            L4::Other { .. } => Detail::Fragment,
        };
        View {
            src: self.src,
            dst: self.dst,
            ttl: self.ttl,
            proto: self.proto(),
            frag_offset: self.frag_offset,
            more_fragments: self.more_fragments,
            sport,
            dport,
            detail,
        }
    }
}

/// A packet as compared: addresses, TTL, protocol, fragment, ports (as
/// [`Packet::ports`]) and what else its transport says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub proto: u8,
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub sport: u16,
    pub dport: u16,
    pub detail: Detail,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Detail {
    Udp {
        checksum: bool,
    },
    Tcp {
        flags: u8,
    },
    Echo {
        seq: u16,
    },
    Error {
        kind: u8,
        code: u8,
        rest: u32,
        quote: Quote,
    },
    /// A later fragment, or a protocol without a header looked at.
    Fragment,
}

/// What an ICMP error quotes, as compared: the quoted header's addresses, TTL and
/// protocol, and the ports (identifier) of its first 8 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Quote {
    fn of(p: &Packet) -> Quote {
        let (sport, dport) = p.ports();
        Quote {
            src: p.src,
            dst: p.dst,
            ttl: p.ttl,
            proto: p.proto(),
            sport,
            dport,
        }
    }
}

fn addr(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

impl View {
    /// Decodes the IP packet `ip` (IPv4, no options), checking its header checksum and
    /// length, its transport checksum (UDP: unless 0; not in fragments, which do not
    /// hold the whole datagram), an ICMP error's checksum and its quoted header's.
    pub fn decode(ip: &[u8]) -> Result<View, String> {
        if ip.len() < IPV4_HLEN || ip[0] != 0x45 {
            return Err(format!("not an IPv4 header without options: {ip:02x?}"));
        }
        if frames::checksum(&[&ip[..IPV4_HLEN]]) != 0 {
            return Err("bad IPv4 header checksum".into());
        }
        let total = usize::from(be16(&ip[2..]));
        if total != ip.len() {
            return Err(format!("total length {total}, packet {} bytes", ip.len()));
        }
        let frag = be16(&ip[6..]);
        let (frag_offset, more_fragments) = ((frag & 0x1fff) * 8, frag & 0x2000 != 0);
        let (src, dst, ttl, proto) = (addr(&ip[12..]), addr(&ip[16..]), ip[8], ip[9]);
        let l4 = &ip[IPV4_HLEN..];
        let whole = frag_offset == 0 && !more_fragments;
        let pseudo = |len: usize| {
            let mut p = Vec::with_capacity(12);
            p.extend_from_slice(&ip[12..20]);
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
            p
        };
        let short = |n: usize| {
            if l4.len() < n {
                Err(format!("transport header of {} bytes", l4.len()))
            } else {
                Ok(())
            }
        };
        let mut view = View {
            src,
            dst,
            ttl,
            proto,
            frag_offset,
            more_fragments,
            sport: 0,
            dport: 0,
            detail: Detail::Fragment,
        };
        if frag_offset != 0 {
            return Ok(view);
        }
        match proto {
            proto::UDP => {
                short(8)?;
                (view.sport, view.dport) = (be16(l4), be16(&l4[2..]));
                let check = be16(&l4[6..]);
                if whole && check != 0 && frames::checksum(&[&pseudo(l4.len()), l4]) != 0 {
                    return Err("bad UDP checksum".into());
                }
                view.detail = Detail::Udp {
                    checksum: check != 0,
                };
            }
            proto::TCP => {
                short(20)?;
                (view.sport, view.dport) = (be16(l4), be16(&l4[2..]));
                if whole && frames::checksum(&[&pseudo(l4.len()), l4]) != 0 {
                    return Err("bad TCP checksum".into());
                }
                view.detail = Detail::Tcp { flags: l4[13] };
            }
            proto::ICMP => {
                short(8)?;
                if whole && frames::checksum(&[l4]) != 0 {
                    return Err("bad ICMP checksum".into());
                }
                match l4[0] {
                    0 | 8 => {
                        let id = be16(&l4[4..]);
                        (view.sport, view.dport) = if l4[0] == 8 { (id, 0) } else { (0, id) };
                        view.detail = Detail::Echo {
                            seq: be16(&l4[6..]),
                        };
                    }
                    ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM => {
                        let q = &l4[8..];
                        if q.len() < IPV4_HLEN + 8 || q[0] != 0x45 {
                            return Err(format!("quote {q:02x?}"));
                        }
                        if frames::checksum(&[&q[..IPV4_HLEN]]) != 0 {
                            return Err("bad quoted IPv4 header checksum".into());
                        }
                        let t = &q[IPV4_HLEN..];
                        let (qproto, qfirst) = (q[9], be16(&q[6..]) & 0x1fff == 0);
                        let (sport, dport) = match qproto {
                            _ if !qfirst => (0, 0),
                            proto::UDP | proto::TCP => (be16(t), be16(&t[2..])),
                            proto::ICMP if t[0] == 8 => (be16(&t[4..]), 0),
                            proto::ICMP if t[0] == 0 => (0, be16(&t[4..])),
                            _ => (0, 0),
                        };
                        view.detail = Detail::Error {
                            kind: l4[0],
                            code: l4[1],
                            rest: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                            quote: Quote {
                                src: addr(&q[12..]),
                                dst: addr(&q[16..]),
                                ttl: q[8],
                                proto: qproto,
                                sport,
                                dport,
                            },
                        };
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(view)
    }
}

// ---------------------------------------------------------------------------------
// What happens

/// What arrives: from a local port (a frame to `dst_mac`), or on the uplink.
#[derive(Clone, Debug)]
pub enum Input {
    FromPort {
        port: String,
        dst_mac: MacAddr,
        packet: Packet,
    },
    FromUplink {
        dst_mac: MacAddr,
        src_mac: MacAddr,
        packet: Packet,
    },
    /// A broadcast ARP request on the uplink, from `sender_mac`/`sender` for `target`.
    ArpOnUplink {
        sender_mac: MacAddr,
        sender: Ipv4Addr,
        target: Ipv4Addr,
    },
}

/// A frame as it leaves: MACs and the packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub dst_mac: MacAddr,
    pub src_mac: MacAddr,
    pub packet: Packet,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Drop(DropReason),
    /// Delivered to the local port `port`.
    ToPort {
        port: String,
        frame: Expect,
    },
    /// Out of the uplink.
    ToUplink {
        frame: Expect,
    },
    /// Arrived on the uplink for nothing this node translates or answers: the host's.
    Host,
    /// The node answers an ARP request on the uplink with `mac`.
    ArpReply {
        mac: MacAddr,
    },
    /// The node answers a ping on the uplink with this frame.
    UplinkEchoReply {
        frame: Expect,
    },
    /// A router answers the sender's ping of one of its addresses from `from` (its
    /// interface's MAC).
    Answer {
        from: MacAddr,
    },
    /// Expired in the router: a time-exceeded error back to the sender from `from`.
    TimeExceeded {
        from: MacAddr,
    },
    /// To a MAC that is no router interface of the sender's network: switched.
    Switched,
    /// The outcome depends on which free port SNAT picks: not compared.
    Ambiguous,
}

/// A connection as replies see it (SNAT: the gateway's address and port).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnatKey {
    pub gateway: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub external_port: u16,
    pub remote_port: u16,
    pub proto: u8,
}

/// Where a connection's replies go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub port: String,
    pub internal: Ipv4Addr,
    pub internal_port: u16,
    /// The router interface the connection's packets were sent to.
    pub router_mac: MacAddr,
}

/// A connection as its source sends it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub port: String,
    pub internal: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub internal_port: u16,
    pub remote_port: u16,
    pub proto: u8,
}

/// The SNAT binding a packet makes or uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub flow: Flow,
    /// `external_port` is the binding's when it exists already.
    pub key: SnatKey,
    pub origin: Origin,
    /// A new binding: its port is any of these (the range less those other
    /// connections to the endpoint hold).
    pub fresh: Option<BTreeSet<u16>>,
}

#[derive(Clone, Debug)]
pub struct Judged {
    pub outcome: Outcome,
    pub snat: Option<Pending>,
}

impl Judged {
    fn plain(outcome: Outcome) -> Judged {
        Judged {
            outcome,
            snat: None,
        }
    }

    /// The frame expected to leave, if any, with a new binding's port set to `port`.
    pub fn expected_frame(&self, port: Option<u16>) -> Option<Expect> {
        let mut frame = match &self.outcome {
            Outcome::ToPort { frame, .. } | Outcome::ToUplink { frame } => frame.clone(),
            Outcome::UplinkEchoReply { frame } => return Some(frame.clone()),
            _ => return None,
        };
        if let (Some(pending), Some(port)) = (&self.snat, port) {
            if pending.fresh.is_some() {
                let (_, dport) = frame.packet.ports();
                frame.packet.set_ports(port, dport);
            }
        }
        Some(frame)
    }
}

/// The node: state, name, port devices and uplink.
pub struct Node<'a> {
    pub state: &'a State,
    pub node_name: &'a str,
    pub devices: &'a BTreeMap<String, u32>,
    pub uplink: &'a Uplink,
}

/// A router interface this node routes through.
struct Iface<'s> {
    port: &'s Port,
    subnet: Ipv4Net,
    address: Ipv4Addr,
}

/// A router's way out.
#[derive(Clone)]
struct Gateway {
    address: Ipv4Addr,
    mac: MacAddr,
    snat: bool,
    network_id: String,
    nexthop_mac: Option<MacAddr>,
}

struct Rtr<'s> {
    router: &'s Router,
    ifaces: Vec<Iface<'s>>,
    gateway: Option<Gateway>,
}

/// An external address this node holds.
enum Held<'s> {
    Gateway(usize),
    Floating {
        port: &'s Port,
        fixed: Ipv4Addr,
        router: usize,
    },
    Unbound,
}

impl<'a> Node<'a> {
    /// The routing model's view of the same node.
    fn routing(&self) -> RouterReference<'a> {
        RouterReference {
            state: self.state,
            node_name: self.node_name,
            devices: self.devices,
            uplink: None,
        }
    }

    pub fn local(&self, port: &Port) -> bool {
        self.routing().local(port)
    }

    fn network_here(&self, network_id: &str) -> bool {
        self.routing().network_here(network_id)
    }

    fn gateway(&self, router: &Router) -> Option<Gateway> {
        let info = router.external_gateway_info.as_ref()?;
        let (subnet, address) =
            info.external_fixed_ips
                .iter()
                .find_map(|f| match f.ip_address {
                    IpAddr::V4(a) => Some((self.state.subnets.get(&f.subnet_id)?, a)),
                    IpAddr::V6(_) => None,
                })?;
        let Some(IpAddr::V4(nexthop)) = subnet.gateway_ip else {
            return None;
        };
        let port = self
            .state
            .ports
            .values()
            .find(|p| p.device_owner == GATEWAY_OWNER && p.device_id == router.id)?;
        Some(Gateway {
            address,
            mac: port.mac_address,
            snat: info.enable_snat,
            network_id: info.network_id.clone(),
            nexthop_mac: self.uplink.gateway_macs.get(&IpAddr::V4(nexthop)).copied(),
        })
    }

    /// Routers that run here: admin up, with an (IPv4) interface on a network with
    /// local ports.
    fn routers(&self) -> Vec<Rtr<'a>> {
        self.state
            .routers
            .values()
            .filter(|r| r.admin_state_up)
            .filter_map(|router| {
                let ifaces: Vec<Iface> = router
                    .interfaces
                    .iter()
                    .filter_map(|i| {
                        let subnet = self.state.subnets.get(&i.subnet_id)?;
                        let IpNet::V4(net) = subnet.cidr else {
                            return None;
                        };
                        let port = self.state.ports.get(i.port_id.as_deref()?)?;
                        if !self.network_here(&port.network_id) {
                            return None;
                        }
                        let address = port
                            .fixed_ips
                            .iter()
                            .find(|f| f.subnet_id == subnet.id)
                            .map(|f| f.ip_address)
                            .or(subnet.gateway_ip)?;
                        let IpAddr::V4(address) = address else {
                            return None;
                        };
                        Some(Iface {
                            port,
                            subnet: net,
                            address,
                        })
                    })
                    .collect();
                (!ifaces.is_empty()).then(|| Rtr {
                    router,
                    gateway: self.gateway(router),
                    ifaces,
                })
            })
            .collect()
    }

    /// The fixed address a floating IP stands for.
    fn fixed_of(fip: &FloatingIp, port: &Port) -> Option<Ipv4Addr> {
        match fip.fixed_ip_address {
            Some(IpAddr::V4(a)) => Some(a),
            Some(IpAddr::V6(_)) => None,
            None => port.fixed_ips.iter().find_map(|f| match f.ip_address {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            }),
        }
    }

    /// What `addr` is of the external addresses this node holds.
    fn held(&self, routers: &[Rtr<'a>], addr: Ipv4Addr) -> Option<Held<'a>> {
        if let Some(r) = routers
            .iter()
            .position(|r| r.gateway.as_ref().is_some_and(|g| g.address == addr))
        {
            return Some(Held::Gateway(r));
        }
        let fip = self
            .state
            .floating_ips
            .values()
            .find(|f| f.floating_ip_address == IpAddr::V4(addr))?;
        let on_network = |r: &Rtr| {
            r.gateway
                .as_ref()
                .is_some_and(|g| g.network_id == fip.floating_network_id)
        };
        let Some(port_id) = &fip.port_id else {
            return routers.iter().any(on_network).then_some(Held::Unbound);
        };
        let port = self.state.ports.get(port_id)?;
        if !self.local(port) {
            return None;
        }
        let fixed = Self::fixed_of(fip, port)?;
        let router = routers.iter().position(|r| {
            on_network(r)
                && fip.router_id.as_ref().is_none_or(|id| *id == r.router.id)
                && r.ifaces
                    .iter()
                    .any(|i| i.port.network_id == port.network_id && i.subnet.contains(&fixed))
        })?;
        Some(Held::Floating {
            port,
            fixed,
            router,
        })
    }

    /// The floating IP `port` sends from as `src` through router `router`, if any.
    fn floating_of(
        &self,
        routers: &[Rtr<'a>],
        port: &Port,
        src: Ipv4Addr,
        router: usize,
    ) -> Option<Ipv4Addr> {
        self.state.floating_ips.values().find_map(|fip| {
            let IpAddr::V4(floating) = fip.floating_ip_address else {
                return None;
            };
            if fip.port_id.as_deref() != Some(port.id.as_str()) {
                return None;
            }
            match self.held(routers, floating)? {
                Held::Floating {
                    fixed, router: r, ..
                } if fixed == src && r == router => Some(floating),
                _ => None,
            }
        })
    }

    /// The interface of router `r` on `port`'s network (whose subnet holds `addr`).
    fn iface_mac(routers: &[Rtr], r: usize, port: &Port, addr: Ipv4Addr) -> MacAddr {
        routers[r]
            .ifaces
            .iter()
            .find(|i| i.port.network_id == port.network_id && i.subnet.contains(&addr))
            .map(|i| i.port.mac_address)
            .unwrap_or_default()
    }
}

/// SNAT bindings the routers made so far, and the NAT semantics over a [`Node`].
#[derive(Clone, Debug, Default)]
pub struct NatReference {
    pub bindings: BTreeMap<SnatKey, Origin>,
    flows: BTreeMap<Flow, SnatKey>,
    /// Connections whose first packet was translated but dropped further on: they
    /// hold a port whose number nobody saw. By flow: (gateway, remote, remote port,
    /// protocol).
    leaked: BTreeMap<Flow, (Ipv4Addr, Ipv4Addr, u16, u8)>,
}

/// How the source of a packet leaves its router.
enum Source {
    /// Untranslated (no SNAT) or as its floating IP.
    As(Ipv4Addr),
    /// Through SNAT, with this binding.
    Snat(Pending),
}

impl NatReference {
    pub fn new() -> NatReference {
        NatReference::default()
    }

    /// Takes in what a judged packet did: the binding it made (its port `port` as seen
    /// in the frame that left) or holds.
    pub fn record(&mut self, judged: &Judged, port: Option<u16>) {
        let Some(pending) = &judged.snat else {
            return;
        };
        match (&judged.outcome, &pending.fresh) {
            (Outcome::ToPort { .. } | Outcome::ToUplink { .. }, Some(_)) => {
                let Some(port) = port else { return };
                let key = SnatKey {
                    external_port: port,
                    ..pending.key.clone()
                };
                self.leaked.remove(&pending.flow);
                self.flows.insert(pending.flow.clone(), key.clone());
                self.bindings.insert(key, pending.origin.clone());
            }
            (Outcome::Ambiguous, Some(_)) if port.is_some() => {
                let key = SnatKey {
                    external_port: port.unwrap_or_default(),
                    ..pending.key.clone()
                };
                self.leaked.remove(&pending.flow);
                self.flows.insert(pending.flow.clone(), key.clone());
                self.bindings.insert(key, pending.origin.clone());
            }
            (Outcome::Drop(_) | Outcome::Ambiguous, Some(_))
                if !self.flows.contains_key(&pending.flow) =>
            {
                let k = &pending.key;
                self.leaked.insert(
                    pending.flow.clone(),
                    (k.gateway, k.remote, k.remote_port, k.proto),
                );
            }
            _ => {}
        }
    }

    /// Whether a connection whose port nobody saw may be the one `key` (its port
    /// aside) stands for.
    fn maybe_leaked(&self, key: &SnatKey) -> bool {
        self.leaked
            .values()
            .any(|&l| l == (key.gateway, key.remote, key.remote_port, key.proto))
    }

    /// Whether `quote` (a packet that came in to `port`) is of a connection whose port
    /// nobody saw.
    fn leaked_flow(&self, port: &Port, quote: &Packet) -> bool {
        let (qs, qd) = quote.ports();
        self.leaked.keys().any(|f| {
            f.port == port.id
                && f.internal == quote.dst
                && f.remote == quote.src
                && f.internal_port == qd
                && f.remote_port == qs
                && f.proto == quote.proto()
        })
    }

    /// The binding SNAT gives `flow` through gateway `gw`.
    fn snat(
        &self,
        node: &Node,
        gw: &Gateway,
        flow: Flow,
        origin: Origin,
    ) -> Result<Pending, DropReason> {
        let base = SnatKey {
            gateway: gw.address,
            remote: flow.remote,
            external_port: 0,
            remote_port: flow.remote_port,
            proto: flow.proto,
        };
        if let Some(key) = self.flows.get(&flow) {
            if key.gateway == gw.address && self.bindings.get(key) == Some(&origin) {
                return Ok(Pending {
                    flow,
                    key: key.clone(),
                    origin,
                    fresh: None,
                });
            }
        }
        let same_endpoint = |k: &SnatKey| {
            k.gateway == base.gateway
                && k.remote == base.remote
                && k.remote_port == base.remote_port
                && k.proto == base.proto
        };
        let taken: BTreeSet<u16> = self
            .bindings
            .keys()
            .filter(|k| same_endpoint(k))
            .map(|k| k.external_port)
            .collect();
        let leaked = self
            .leaked
            .iter()
            .filter(|(f, &(g, r, rp, p))| {
                **f != flow
                    && (g, r, rp, p) == (base.gateway, base.remote, base.remote_port, base.proto)
            })
            .count();
        let (min, count) = (node.uplink.snat_port_min, node.uplink.snat_port_count);
        let free: BTreeSet<u16> = (0..count)
            .map(|i| min.wrapping_add(i))
            .filter(|p| !taken.contains(p))
            .collect();
        if !self.leaked.contains_key(&flow) && taken.len() + leaked >= usize::from(count) {
            return Err(DropReason::NatPortsExhausted);
        }
        Ok(Pending {
            flow,
            key: base,
            origin,
            fresh: Some(free),
        })
    }

    /// The connection an ICMP error from inside (from `port`, through gateway `gw`) is
    /// about: the quote is a packet of it that came in.
    fn related(&self, gw: &Gateway, port: &Port, quote: &Packet) -> Option<(SnatKey, &Origin)> {
        let (qs, qd) = quote.ports();
        self.bindings
            .iter()
            .find(|(k, o)| {
                k.gateway == gw.address
                    && k.remote == quote.src
                    && k.remote_port == qs
                    && k.proto == quote.proto()
                    && o.port == port.id
                    && o.internal == quote.dst
                    && o.internal_port == qd
            })
            .map(|(k, o)| (k.clone(), o))
    }

    /// What becomes of `input` on `node`.
    pub fn judge(&self, node: &Node, input: &Input) -> Judged {
        match input {
            Input::FromPort {
                port,
                dst_mac,
                packet,
            } => self.outbound(node, &node.state.ports[port], *dst_mac, packet),
            Input::FromUplink {
                dst_mac,
                src_mac,
                packet,
            } => Judged::plain(self.inbound(node, *dst_mac, *src_mac, packet)),
            Input::ArpOnUplink { target, .. } => {
                let routers = node.routers();
                Judged::plain(match node.held(&routers, *target) {
                    Some(Held::Gateway(r)) => Outcome::ArpReply {
                        mac: routers[r].gateway.as_ref().unwrap().mac,
                    },
                    Some(Held::Floating { router, .. }) => Outcome::ArpReply {
                        mac: routers[router].gateway.as_ref().unwrap().mac,
                    },
                    _ => Outcome::Host,
                })
            }
        }
    }

    fn outbound(&self, node: &Node, sender: &Port, dst_mac: MacAddr, packet: &Packet) -> Judged {
        let routers = node.routers();
        let Some(r) = routers.iter().position(|r| {
            r.ifaces
                .iter()
                .any(|i| i.port.network_id == sender.network_id && i.port.mac_address == dst_mac)
        }) else {
            return Judged::plain(Outcome::Switched);
        };
        let router = &routers[r];
        let dst = packet.dst;
        // Longest prefix: own addresses, subnets, static routes (first wins a tie),
        // then the gateway's default route.
        enum Via<'i, 's> {
            Local,
            OnLink(&'i Iface<'s>),
            Static(&'i Iface<'s>, Ipv4Addr),
        }
        let mut candidates: Vec<(u8, Via)> = Vec::new();
        // The gateway address is the router's own too.
        if router.gateway.as_ref().is_some_and(|g| g.address == dst) {
            candidates.push((32, Via::Local));
        }
        for i in &router.ifaces {
            if i.address == dst {
                candidates.push((32, Via::Local));
            }
        }
        for i in &router.ifaces {
            if i.subnet.contains(&dst) {
                candidates.push((i.subnet.prefix_len(), Via::OnLink(i)));
            }
        }
        for route in &router.router.routes {
            let (IpNet::V4(destination), IpAddr::V4(nexthop)) = (route.destination, route.nexthop)
            else {
                continue;
            };
            if destination.contains(&dst) {
                if let Some(out) = router.ifaces.iter().find(|i| i.subnet.contains(&nexthop)) {
                    candidates.push((destination.prefix_len(), Via::Static(out, nexthop)));
                }
            }
        }
        let mut best: Option<(u8, Via)> = None;
        for (prefix, via) in candidates {
            if best.as_ref().is_none_or(|(p, _)| prefix > *p) {
                best = Some((prefix, via));
            }
        }
        let echo_request = packet.first_fragment() && matches!(packet.l4, L4::EchoRequest { .. });
        // Routers answer pings of their addresses, also of another router's gateway
        // address held on this node (the ping would reach that router).
        let other_gateway = matches!(node.held(&routers, dst), Some(Held::Gateway(_)));
        match &best {
            Some((_, Via::Local)) if echo_request => {
                return Judged::plain(Outcome::Answer { from: dst_mac })
            }
            // To the gateway address: a reply to a connection through it, below.
            Some((_, Via::Local)) if router.gateway.as_ref().is_some_and(|g| g.address == dst) => {
                return self.external(node, &routers, r, sender, dst_mac, packet)
            }
            Some((_, Via::Local)) => return Judged::plain(Outcome::Drop(DropReason::NoRoute)),
            None if router.gateway.is_none() => {
                return Judged::plain(Outcome::Drop(DropReason::NoRoute))
            }
            _ => {}
        }
        if packet.ttl <= 1 {
            let errors_about_it = packet.first_fragment()
                && !matches!(packet.l4, L4::Error { .. } | L4::Other { .. });
            return Judged::plain(if errors_about_it {
                Outcome::TimeExceeded { from: dst_mac }
            } else {
                Outcome::Drop(DropReason::TtlExceeded)
            });
        }
        let (out, nexthop) = match best {
            None => {
                if echo_request && other_gateway {
                    return Judged::plain(Outcome::Answer { from: dst_mac });
                }
                return self.external(node, &routers, r, sender, dst_mac, packet);
            }
            Some((_, Via::OnLink(out))) => (out, dst),
            Some((_, Via::Static(out, nexthop))) => (out, nexthop),
            Some((_, Via::Local)) => unreachable!(),
        };
        // Inside: the next hop's MAC, a router's address first.
        let network = &out.port.network_id;
        let router_mac = routers.iter().find_map(|r| {
            r.ifaces
                .iter()
                .find(|i| &i.port.network_id == network && i.address == nexthop)
                .map(|i| i.port.mac_address)
        });
        let neighbor = router_mac.or_else(|| {
            node.state
                .ports
                .values()
                .filter(|p| &p.network_id == network)
                .filter(|p| {
                    p.fixed_ips
                        .iter()
                        .any(|f| f.ip_address == IpAddr::V4(nexthop))
                })
                .map(|p| p.mac_address)
                .next_back()
        });
        let Some(neighbor) = neighbor else {
            return Judged::plain(Outcome::Drop(DropReason::NoNeighbor));
        };
        Judged::plain(
            match node
                .state
                .ports
                .values()
                .find(|p| &p.network_id == network && p.mac_address == neighbor && node.local(p))
            {
                Some(port) => Outcome::ToPort {
                    port: port.id.clone(),
                    frame: Expect {
                        dst_mac: neighbor,
                        src_mac: out.port.mac_address,
                        packet: Packet {
                            ttl: packet.ttl - 1,
                            ..packet.clone()
                        },
                    },
                },
                None => Outcome::Drop(DropReason::UnknownDestination),
            },
        )
    }

    /// What router `r` routes out of its gateway (or to its gateway address).
    fn external(
        &self,
        node: &Node,
        routers: &[Rtr],
        r: usize,
        sender: &Port,
        dst_mac: MacAddr,
        packet: &Packet,
    ) -> Judged {
        let gw = routers[r].gateway.clone().expect("routed out of a gateway");
        if packet.ttl <= 1 {
            let errors_about_it = packet.first_fragment()
                && !matches!(packet.l4, L4::Error { .. } | L4::Other { .. });
            return Judged::plain(if errors_about_it {
                Outcome::TimeExceeded { from: dst_mac }
            } else {
                Outcome::Drop(DropReason::TtlExceeded)
            });
        }
        let mut out = Packet {
            ttl: packet.ttl - 1,
            ..packet.clone()
        };
        // The source.
        let source = if let Some(floating) = node.floating_of(routers, sender, packet.src, r) {
            Source::As(floating)
        } else if !gw.snat {
            Source::As(packet.src)
        } else {
            match &packet.l4 {
                _ if !packet.first_fragment() => {
                    return Judged::plain(Outcome::Drop(DropReason::NatUnsupported))
                }
                L4::Udp { .. } | L4::Tcp { .. } | L4::EchoRequest { .. } => {
                    let (sport, dport) = packet.ports();
                    let flow = Flow {
                        port: sender.id.clone(),
                        internal: packet.src,
                        remote: packet.dst,
                        internal_port: sport,
                        remote_port: dport,
                        proto: packet.proto(),
                    };
                    let origin = Origin {
                        port: sender.id.clone(),
                        internal: packet.src,
                        internal_port: sport,
                        router_mac: dst_mac,
                    };
                    match self.snat(node, &gw, flow, origin) {
                        Ok(pending) => Source::Snat(pending),
                        Err(reason) => return Judged::plain(Outcome::Drop(reason)),
                    }
                }
                L4::Error { quote, .. } => match self.related(&gw, sender, quote) {
                    // The error leaves as the connection: its quote's destination is
                    // the gateway's address and port.
                    Some((key, _)) => {
                        let L4::Error { quote, .. } = &mut out.l4 else {
                            unreachable!()
                        };
                        quote.dst = gw.address;
                        let (qs, _) = quote.ports();
                        quote.set_ports(qs, key.external_port);
                        Source::As(gw.address)
                    }
                    // About a connection whose port nobody saw, or none.
                    None if self.leaked_flow(sender, quote) => {
                        return Judged::plain(Outcome::Ambiguous)
                    }
                    None => return Judged::plain(Outcome::Drop(DropReason::NoNatBinding)),
                },
                _ => return Judged::plain(Outcome::Drop(DropReason::NatUnsupported)),
            }
        };
        let (src, sport, pending) = match source {
            Source::As(src) => {
                // A floating IP's error quotes what came in for the floating IP.
                if let L4::Error { quote, .. } = &mut out.l4 {
                    if quote.dst == packet.src {
                        quote.dst = src;
                    }
                }
                (src, packet.ports().0, None)
            }
            Source::Snat(pending) => {
                let port = pending.key.external_port;
                (gw.address, port, Some(pending))
            }
        };
        out.src = src;
        let (_, dport) = packet.ports();
        out.set_ports(sport, dport);
        let with = |outcome: Outcome, pending: Option<Pending>| Judged {
            outcome,
            snat: pending,
        };
        // The destination: an external address held here, else out.
        match node.held(routers, packet.dst) {
            Some(Held::Unbound) => with(Outcome::Drop(DropReason::NoNatBinding), pending),
            Some(Held::Floating {
                port,
                fixed,
                router,
            }) => {
                out.dst = fixed;
                if let L4::Error { quote, .. } = &mut out.l4 {
                    if quote.src == packet.dst {
                        quote.src = fixed;
                    }
                }
                let frame = Expect {
                    dst_mac: port.mac_address,
                    src_mac: Node::iface_mac(routers, router, port, fixed),
                    packet: out,
                };
                let outcome = Outcome::ToPort {
                    port: port.id.clone(),
                    frame,
                };
                with(outcome, pending)
            }
            Some(Held::Gateway(g)) => {
                let gateway = routers[g].gateway.as_ref().unwrap().address;
                // A reply to a connection through that gateway (an error: the
                // connection of its quote).
                let (proto, remote_port, external_port) = match &out.l4 {
                    L4::Error { quote, .. } => {
                        let (qs, qd) = quote.ports();
                        (quote.proto(), qd, qs)
                    }
                    _ if !out.first_fragment() => {
                        return with(Outcome::Drop(DropReason::NoNatBinding), pending)
                    }
                    L4::Udp { .. } | L4::Tcp { .. } | L4::EchoReply { .. } => {
                        (out.proto(), out.ports().0, dport)
                    }
                    _ => return with(Outcome::Drop(DropReason::NoNatBinding), pending),
                };
                let lookup = |remote_port: u16| SnatKey {
                    gateway,
                    remote: src,
                    external_port,
                    remote_port,
                    proto,
                };
                // With a port not picked yet, the reply's lookup depends on it.
                let error = matches!(out.l4, L4::Error { .. });
                if let Some(Some(free)) = pending.as_ref().map(|p| &p.fresh) {
                    // (Its own new binding, to its own gateway at the port it gets,
                    // is one of them.)
                    let own = gateway == gw.address && free.contains(&external_port);
                    let hit = own || free.iter().any(|p| self.bindings.contains_key(&lookup(*p)));
                    return if hit {
                        with(Outcome::Ambiguous, pending)
                    } else {
                        with(Outcome::Drop(DropReason::NoNatBinding), pending)
                    };
                }
                let remote_port = if error { remote_port } else { sport };
                let Some(origin) = self.bindings.get(&lookup(remote_port)) else {
                    if self.maybe_leaked(&lookup(remote_port)) {
                        return with(Outcome::Ambiguous, pending);
                    }
                    return with(Outcome::Drop(DropReason::NoNatBinding), pending);
                };
                out.dst = origin.internal;
                if let L4::Error { quote, .. } = &mut out.l4 {
                    quote.src = origin.internal;
                    let (_, qd) = quote.ports();
                    quote.set_ports(origin.internal_port, qd);
                } else {
                    out.set_ports(sport, origin.internal_port);
                }
                let target = &node.state.ports[&origin.port];
                let frame = Expect {
                    dst_mac: target.mac_address,
                    src_mac: origin.router_mac,
                    packet: out,
                };
                with(
                    Outcome::ToPort {
                        port: origin.port.clone(),
                        frame,
                    },
                    pending,
                )
            }
            None => match gw.nexthop_mac {
                None => with(Outcome::Drop(DropReason::NoNeighbor), pending),
                Some(nexthop) => with(
                    Outcome::ToUplink {
                        frame: Expect {
                            dst_mac: nexthop,
                            src_mac: gw.mac,
                            packet: out,
                        },
                    },
                    pending,
                ),
            },
        }
    }

    fn inbound(&self, node: &Node, dst_mac: MacAddr, src_mac: MacAddr, packet: &Packet) -> Outcome {
        let routers = node.routers();
        let mut out = Packet {
            ttl: packet.ttl.saturating_sub(1),
            ..packet.clone()
        };
        // Expiring in the router `gw` is the gateway of: a time-exceeded error from the
        // gateway address back out of the uplink, quoting the packet as it came (not
        // about a later fragment or an ICMP error: those are only counted).
        let deliver = |out: Packet, port: &Port, router_mac: MacAddr, gw: &Gateway| {
            if packet.ttl <= 1 {
                if packet.frag_offset != 0 || matches!(packet.l4, L4::Error { .. }) {
                    return Outcome::Drop(DropReason::TtlExceeded);
                }
                return Outcome::ToUplink {
                    frame: Expect {
                        dst_mac: src_mac,
                        src_mac: gw.mac,
                        packet: Packet {
                            src: gw.address,
                            dst: packet.src,
                            ttl: ROUTER_TTL,
                            frag_offset: 0,
                            more_fragments: false,
                            l4: L4::Error {
                                kind: ICMP_TIME_EXCEEDED,
                                code: 0,
                                rest: 0,
                                quote: Box::new(packet.clone()),
                            },
                        },
                    },
                };
            }
            Outcome::ToPort {
                port: port.id.clone(),
                frame: Expect {
                    dst_mac: port.mac_address,
                    src_mac: router_mac,
                    packet: out,
                },
            }
        };
        match node.held(&routers, packet.dst) {
            Some(Held::Unbound) => Outcome::Drop(DropReason::NoNatBinding),
            Some(Held::Floating {
                port,
                fixed,
                router,
            }) => {
                out.dst = fixed;
                if let L4::Error { quote, .. } = &mut out.l4 {
                    if quote.src == packet.dst {
                        quote.src = fixed;
                    }
                }
                let gw = routers[router].gateway.as_ref().unwrap();
                deliver(
                    out,
                    port,
                    Node::iface_mac(&routers, router, port, fixed),
                    gw,
                )
            }
            Some(Held::Gateway(g)) => {
                let gw = routers[g].gateway.as_ref().unwrap();
                if packet.first_fragment() && !packet.more_fragments {
                    if let L4::EchoRequest { id, seq } = packet.l4 {
                        return Outcome::UplinkEchoReply {
                            frame: Expect {
                                dst_mac: src_mac,
                                src_mac: gw.mac,
                                packet: Packet {
                                    src: packet.dst,
                                    dst: packet.src,
                                    ttl: ROUTER_TTL,
                                    l4: L4::EchoReply { id, seq },
                                    ..packet.clone()
                                },
                            },
                        };
                    }
                }
                let key = match &packet.l4 {
                    _ if !packet.first_fragment() => None,
                    L4::Udp { .. } | L4::Tcp { .. } | L4::EchoReply { .. } => {
                        let (sport, dport) = packet.ports();
                        Some(SnatKey {
                            gateway: gw.address,
                            remote: packet.src,
                            external_port: dport,
                            remote_port: sport,
                            proto: packet.proto(),
                        })
                    }
                    L4::Error { quote, .. } if quote.first_fragment() => {
                        let (qs, qd) = quote.ports();
                        let request = !matches!(quote.l4, L4::EchoReply { .. });
                        (request && quote.src == gw.address).then(|| SnatKey {
                            gateway: gw.address,
                            remote: quote.dst,
                            external_port: qs,
                            remote_port: qd,
                            proto: quote.proto(),
                        })
                    }
                    _ => None,
                };
                let Some(origin) = key.as_ref().and_then(|k| self.bindings.get(k)) else {
                    if key.is_some_and(|k| self.maybe_leaked(&k)) {
                        return Outcome::Ambiguous;
                    }
                    return Outcome::Drop(DropReason::NoNatBinding);
                };
                out.dst = origin.internal;
                if let L4::Error { quote, .. } = &mut out.l4 {
                    quote.src = origin.internal;
                    let (_, qd) = quote.ports();
                    quote.set_ports(origin.internal_port, qd);
                } else {
                    let (sport, _) = packet.ports();
                    out.set_ports(sport, origin.internal_port);
                }
                let port = &node.state.ports[&origin.port];
                deliver(out, port, origin.router_mac, gw)
            }
            None => {
                // Sent to a router's gateway port for no address it holds: routed by
                // that router into its subnets, untranslated (routers without SNAT
                // have theirs routed to them; with SNAT too, as Neutron's routers do).
                // For any other MAC: the host's.
                let Some(router) = routers
                    .iter()
                    .find(|r| r.gateway.as_ref().is_some_and(|g| g.mac == dst_mac))
                else {
                    return Outcome::Host;
                };
                let Some(iface) = router
                    .ifaces
                    .iter()
                    .find(|i| i.subnet.contains(&packet.dst) && i.address != packet.dst)
                else {
                    return Outcome::Drop(DropReason::NoRoute);
                };
                let network = &iface.port.network_id;
                match node.state.ports.values().find(|p| {
                    &p.network_id == network
                        && p.fixed_ips
                            .iter()
                            .any(|f| f.ip_address == IpAddr::V4(packet.dst))
                }) {
                    Some(port) if node.local(port) => {
                        let gw = router.gateway.as_ref().unwrap();
                        deliver(out, port, iface.port.mac_address, gw)
                    }
                    Some(_) => Outcome::Drop(DropReason::UnknownDestination),
                    None => Outcome::Drop(DropReason::NoNeighbor),
                }
            }
        }
    }
}
