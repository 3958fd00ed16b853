//! A packet trace, like `ovn-trace`: what the datapath would do with a packet, stage by
//! stage, read from the compiled tables ([`Compiled`]) and not from the kernel.
//!
//! Each stage mirrors a step of the eBPF programs (`dataplane-ebpf/programs/src`) and
//! makes the same lookups in the same order with the same map semantics (hash maps
//! exact, LPM tries longest prefix first): `port_ingress` for a packet from a port
//! (port, header, port security, egress rules, switching or routing and NAT, the
//! receiver's ingress rules), `uplink_xdp` and `uplink_ingress` for one from the
//! uplink. What only exists at run time is assumed: connections are new unless the
//! probe says established, SNAT finds a free port, and no SNAT binding is known (a
//! reply to one from outside cannot be traced to its port).
//!
//! The frame traced is the one the probe describes, well formed (complete headers, no
//! IP options, not fragmented); ARP and neighbour discovery are not traced.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use dataplane_abi::{
    ext_addr_flags, flood_flags, gateway_flags, port_flags, route_flags, sg_direction, DropReason,
    FdbEntry, FdbKey, FixedAddr4, NeighKey4, NeighKey6, Neighbor, PortInfo, Route, RouterIf,
    PORT_ADDR_FIXED_BITS, REMOTE4_FULL_BITS, REMOTE6_FULL_BITS, ROUTE_FIXED_BITS, RULE_LOOKUP_BITS,
};

use super::{
    compile::{Compiled, DatapathTables},
    model::MacAddr,
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
/// DCCP, SCTP, UDP-Lite: protocols with ports the datapath reads, that a probe does
/// not describe.
const OTHER_PORTED: [u8; 3] = [33, 132, 136];
const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
const ICMP6_ROUTER_ADVERT: u8 = 134;
const ICMP6_NEIGH_SOLICIT: u8 = 135;
const ICMP6_NEIGH_ADVERT: u8 = 136;
/// TCP flags.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;
/// TTL of what a router sends itself.
const ROUTER_TTL: u8 = 64;

/// Where the packet enters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// Sent by the VM of this port (by id).
    Port(String),
    /// Arrives on the uplink NIC from the external network.
    Uplink,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    /// `src` `None`: the port's first IPv4 address.
    V4 {
        src: Option<Ipv4Addr>,
        dst: Ipv4Addr,
        ttl: u8,
    },
    V6 {
        src: Option<Ipv6Addr>,
        dst: Ipv6Addr,
        hop_limit: u8,
    },
    /// Neither IPv4 nor IPv6 (nor ARP).
    Other { ethertype: u16 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP of the packet's family (ICMPv6 in IPv6). `id`: an echo's identifier.
    Icmp {
        kind: u8,
        code: u8,
        id: u16,
    },
    /// Another IP protocol, without ports.
    Other {
        protocol: u8,
    },
}

/// A packet to trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub ingress: Ingress,
    /// `None`: the port's MAC (from the uplink: the external gateway's).
    pub src_mac: Option<MacAddr>,
    /// `None`: the MAC the destination has on the sender's network, else its router's
    /// (from the uplink: the gateway port's that answers for the destination).
    pub dst_mac: Option<MacAddr>,
    pub network: Network,
    /// Ignored for `Network::Other`.
    pub transport: Transport,
    /// The packet belongs to a tracked connection (else: its first packet).
    pub established: bool,
}

/// Why a probe cannot be traced.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("port {0} is not programmed on this node")]
    UnknownPort(String),
    /// `field`: what to give (`src_mac`, `dst_mac`, `src`).
    #[error("{field}: {why}")]
    NoDefault { field: &'static str, why: String },
    #[error("{field}: {why}")]
    Unsupported { field: &'static str, why: String },
}

/// One step of the datapath and what it decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub name: &'static str,
    /// What it looked up (map and key).
    pub lookup: String,
    /// What the lookup found.
    pub found: String,
    /// What it decided: go on, or a drop.
    pub decision: String,
}

/// A port the packet reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Empty for a device that is no port (the uplink).
    pub port_id: String,
    pub ifindex: u32,
}

/// One copy of a flooded frame and what the receiver's checks make of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloodCopy {
    pub target: Target,
    pub dropped: Option<DropReason>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To the VM of a port, through its checks.
    Delivered(Target),
    /// A router answered (echo reply, time exceeded) back to the sender, through its
    /// checks.
    Answered(Target),
    /// Copied to every port of the flood set (each copy judged by its receiver).
    Flooded(Vec<FloodCopy>),
    /// Out of the uplink NIC (`ifindex`).
    Uplink { ifindex: u32 },
    /// `uplink_xdp` answered it back out of the uplink.
    AnsweredOnUplink,
    /// From the uplink and for no address or MAC of this node's datapath: the host's.
    ToHost,
    /// Dropped, counted against `port_id` (empty: the uplink, or no port).
    Dropped { reason: DropReason, port_id: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The headers traced, defaults filled in.
    pub headers: Headers,
    pub stages: Vec<Stage>,
    pub verdict: Verdict,
}

/// The probe's addresses with the defaults taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    /// `None`: not IP.
    pub src: Option<IpAddr>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Delivered(t) => {
                write!(f, "delivered to port {} (ifindex {})", t.port_id, t.ifindex)
            }
            Verdict::Answered(t) => write!(
                f,
                "answered back to port {} (ifindex {})",
                t.port_id, t.ifindex
            ),
            Verdict::Flooded(copies) => {
                write!(f, "flooded to")?;
                for copy in copies {
                    write!(f, " {}", copy.target.port_id)?;
                    if let Some(reason) = copy.dropped {
                        write!(f, " (dropped: {})", reason.name())?;
                    }
                }
                Ok(())
            }
            Verdict::Uplink { ifindex } => write!(f, "out of the uplink (ifindex {ifindex})"),
            Verdict::AnsweredOnUplink => write!(f, "answered out of the uplink by uplink_xdp"),
            Verdict::ToHost => write!(f, "passed to the host's own stack"),
            Verdict::Dropped { reason, port_id } if port_id.is_empty() => {
                write!(f, "dropped: {}", reason.name())
            }
            Verdict::Dropped { reason, port_id } => {
                write!(f, "dropped: {} (counted at port {port_id})", reason.name())
            }
        }
    }
}

/// The packet as the stages see it: addresses after defaults, rewritten by routing and
/// NAT on the way.
#[derive(Clone, Copy, Debug)]
struct Packet {
    src_mac: MacAddr,
    dst_mac: MacAddr,
    /// `None`: not IP.
    ip: Option<Ip>,
    ethertype: u16,
    transport: Transport,
}

#[derive(Clone, Copy, Debug)]
struct Ip {
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
}

impl Packet {
    fn protocol(&self) -> u8 {
        match self.transport {
            Transport::Tcp { .. } => IPPROTO_TCP,
            Transport::Udp { .. } => IPPROTO_UDP,
            Transport::Icmp { .. } if self.is_v6() => IPPROTO_ICMPV6,
            Transport::Icmp { .. } => IPPROTO_ICMP,
            Transport::Other { protocol } => protocol,
        }
    }

    fn is_v6(&self) -> bool {
        self.ethertype == ETH_P_IPV6
    }

    /// (source, destination) port; ICMP echo: the identifier as both; else 0.
    fn ports(&self) -> (u16, u16) {
        match self.transport {
            Transport::Tcp { sport, dport, .. } | Transport::Udp { sport, dport } => (sport, dport),
            Transport::Icmp { id, .. }
                if self.kind() == Kind::EchoRequest || self.kind() == Kind::EchoReply =>
            {
                (id, id)
            }
            _ => (0, 0),
        }
    }

    fn kind(&self) -> Kind {
        match self.transport {
            Transport::Tcp { flags, .. } => Kind::Tcp(flags),
            Transport::Udp { .. } => Kind::Ports,
            Transport::Icmp { kind, .. } => match (self.is_v6(), kind) {
                (false, 8) | (true, 128) => Kind::EchoRequest,
                (false, 0) | (true, 129) => Kind::EchoReply,
                (false, 3 | 4 | 5 | 11 | 12) | (true, 1..=4) => Kind::IcmpError,
                _ => Kind::IcmpOther,
            },
            Transport::Other { .. } => Kind::Other,
        }
    }

    /// `RuleKey::port`: destination port, or ICMP `[type, code]`.
    fn rule_port(&self) -> [u8; 2] {
        match self.transport {
            Transport::Tcp { dport, .. } | Transport::Udp { dport, .. } => dport.to_be_bytes(),
            Transport::Icmp { kind, code, .. } => [kind, code],
            Transport::Other { .. } => [0; 2],
        }
    }

    fn icmp_type(&self) -> Option<u8> {
        match self.transport {
            Transport::Icmp { kind, .. } => Some(kind),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        let Some(ip) = self.ip else {
            return format!(
                "{} > {} ethertype {:#06x}",
                self.src_mac, self.dst_mac, self.ethertype
            );
        };
        let l4 = match self.transport {
            Transport::Tcp {
                sport,
                dport,
                flags,
            } => {
                format!("tcp {sport} > {dport} flags {}", tcp_flag_names(flags))
            }
            Transport::Udp { sport, dport } => format!("udp {sport} > {dport}"),
            Transport::Icmp { kind, code, id } => format!("icmp type {kind} code {code} id {id}"),
            Transport::Other { protocol } => format!("protocol {protocol}"),
        };
        format!(
            "{} > {} {} > {} ttl {} {l4}",
            self.src_mac, self.dst_mac, ip.src, ip.dst, ip.ttl
        )
    }
}

/// What the transport header makes of a packet (`flow::Kind` of the programs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Other,
    Ports,
    Tcp(u8),
    EchoRequest,
    EchoReply,
    IcmpError,
    IcmpOther,
}

pub fn tcp_flag_names(flags: u8) -> String {
    let names: Vec<&str> = [(SYN, "SYN"), (ACK, "ACK"), (FIN, "FIN"), (RST, "RST")]
        .into_iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| name)
        .collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join("|")
    }
}

/// Traces `probe` through the datapath `compiled` describes.
pub fn trace(compiled: &Compiled, probe: &Probe) -> Result<Trace, TraceError> {
    let mut tracer = Tracer {
        compiled,
        tables: &compiled.tables,
        stages: Vec::new(),
        established: probe.established,
        opened: None,
    };
    let verdict = match &probe.ingress {
        Ingress::Port(port_id) => {
            let programmed = compiled
                .ports
                .iter()
                .find(|p| p.port_id == *port_id)
                .ok_or_else(|| TraceError::UnknownPort(port_id.clone()))?;
            let ifindex = programmed.ifindex;
            let port = *compiled
                .tables
                .ports
                .get(&ifindex)
                .ok_or_else(|| TraceError::UnknownPort(port_id.clone()))?;
            let packet = tracer.port_packet(probe, &port)?;
            (
                headers(&packet),
                tracer.port_ingress(port_id, ifindex, &port, packet),
            )
        }
        Ingress::Uplink => {
            let packet = tracer.uplink_packet(probe)?;
            (headers(&packet), tracer.uplink(packet))
        }
    };
    let (headers, verdict) = verdict;
    Ok(Trace {
        headers,
        stages: tracer.stages,
        verdict,
    })
}

fn headers(packet: &Packet) -> Headers {
    Headers {
        src_mac: packet.src_mac,
        dst_mac: packet.dst_mac,
        src: packet.ip.map(|ip| ip.src),
    }
}

struct Tracer<'c> {
    compiled: &'c Compiled,
    tables: &'c DatapathTables,
    stages: Vec<Stage>,
    established: bool,
    /// The connection the sender's egress rules opened an entry for, in its zone: a
    /// packet of it that comes back to that port (routed back, an answer of the
    /// router's) finds the entry as conntrack would.
    opened: Option<(u32, Connection)>,
}

type Step<T> = Result<T, DropReason>;

impl Tracer<'_> {
    fn stage(&mut self, name: &'static str, lookup: String, found: String, decision: String) {
        self.stages.push(Stage {
            name,
            lookup,
            found,
            decision,
        });
    }

    fn port_id(&self, ifindex: u32) -> String {
        self.compiled
            .ports
            .iter()
            .find(|p| p.ifindex == ifindex)
            .map(|p| p.port_id.clone())
            .unwrap_or_default()
    }

    fn rule_id(&self, slot: u32) -> String {
        self.compiled
            .rules
            .iter()
            .find(|(_, s)| **s == slot)
            .map_or_else(|| format!("slot {slot}"), |(id, _)| id.clone())
    }

    // ---- the packet ------------------------------------------------------------

    /// The probe's packet with a port's defaults filled in.
    fn port_packet(&self, probe: &Probe, port: &PortInfo) -> Result<Packet, TraceError> {
        let src_mac = probe.src_mac.unwrap_or(MacAddr(port.mac));
        let (ip, ethertype) = match probe.network {
            Network::V4 { src, dst, ttl } => {
                let src = match src {
                    Some(src) => src,
                    None => self
                        .tables
                        .port_ip4
                        .iter()
                        .find(|a| a.port_slot == port.port_slot && a.mac == port.mac)
                        .map(|a| Ipv4Addr::from(a.addr))
                        .ok_or_else(|| no_default("src", "the port has no IPv4 address"))?,
                };
                (
                    Some(Ip {
                        src: src.into(),
                        dst: dst.into(),
                        ttl,
                    }),
                    ETH_P_IP,
                )
            }
            Network::V6 {
                src,
                dst,
                hop_limit,
            } => {
                let src = match src {
                    Some(src) => src,
                    None => {
                        let own: Vec<Ipv6Addr> = self
                            .tables
                            .port_ip6
                            .iter()
                            .filter(|a| a.port_slot == port.port_slot && a.mac == port.mac)
                            .map(|a| Ipv6Addr::from(a.addr))
                            .collect();
                        own.iter()
                            .find(|a| !a.is_unicast_link_local())
                            .or(own.first())
                            .copied()
                            .ok_or_else(|| no_default("src", "the port has no IPv6 address"))?
                    }
                };
                let ip = Ip {
                    src: src.into(),
                    dst: dst.into(),
                    ttl: hop_limit,
                };
                (Some(ip), ETH_P_IPV6)
            }
            Network::Other { ethertype } => (None, ethertype),
        };
        check_supported(ethertype, probe.transport, ip.is_some())?;
        let dst_mac = match probe.dst_mac {
            Some(mac) => mac,
            None => self.default_dst_mac(port, ip.map(|ip| ip.dst))?,
        };
        Ok(Packet {
            src_mac,
            dst_mac,
            ip,
            ethertype,
            transport: probe.transport,
        })
    }

    /// The destination's MAC on the port's network, else a router interface's there.
    fn default_dst_mac(&self, port: &PortInfo, dst: Option<IpAddr>) -> Result<MacAddr, TraceError> {
        let net = port.network_slot;
        if let Some(neighbor) = dst.and_then(|dst| self.neighbor(net, dst)) {
            return Ok(MacAddr(neighbor.mac));
        }
        self.tables
            .router_ifs
            .keys()
            .find(|key| key.network_slot == net)
            .map(|key| MacAddr(key.mac))
            .ok_or_else(|| {
                no_default(
                    "dst_mac",
                    "no port of the network has the destination and no router is on it",
                )
            })
    }

    fn uplink_packet(&self, probe: &Probe) -> Result<Packet, TraceError> {
        let (ip, ethertype) = match probe.network {
            Network::V4 { src, dst, ttl } => {
                let src = src.ok_or_else(|| no_default("src", "needed from the uplink"))?;
                (
                    Some(Ip {
                        src: src.into(),
                        dst: dst.into(),
                        ttl,
                    }),
                    ETH_P_IP,
                )
            }
            Network::V6 {
                src,
                dst,
                hop_limit,
            } => {
                let src = src.ok_or_else(|| no_default("src", "needed from the uplink"))?;
                (
                    Some(Ip {
                        src: src.into(),
                        dst: dst.into(),
                        ttl: hop_limit,
                    }),
                    ETH_P_IPV6,
                )
            }
            Network::Other { ethertype } => (None, ethertype),
        };
        check_supported(ethertype, probe.transport, ip.is_some())?;
        let src_mac = match probe.src_mac {
            Some(mac) => mac,
            None => self
                .tables
                .router_gw
                .values()
                .map(|gw| gw.nexthop_mac)
                .chain(self.tables.router_gw6.values().map(|gw| gw.nexthop_mac))
                .find(|mac| *mac != [0; 6])
                .map(MacAddr)
                .ok_or_else(|| no_default("src_mac", "no external gateway is resolved"))?,
        };
        let dst_mac = match probe.dst_mac {
            Some(mac) => mac,
            None => self.default_uplink_dst_mac(ip.map(|ip| ip.dst))?,
        };
        Ok(Packet {
            src_mac,
            dst_mac,
            ip,
            ethertype,
            transport: probe.transport,
        })
    }

    /// The gateway port's MAC that answers for the destination, else of a router that
    /// routes it inside.
    fn default_uplink_dst_mac(&self, dst: Option<IpAddr>) -> Result<MacAddr, TraceError> {
        let external = match dst {
            Some(IpAddr::V4(a)) => self.tables.ext_addrs4.get(&a.octets()),
            Some(IpAddr::V6(a)) => self.tables.ext_addrs6.get(&a.octets()),
            None => None,
        };
        if let Some(ext) = external {
            return Ok(MacAddr(ext.mac));
        }
        let inside = |router: u32| {
            dst.and_then(|dst| self.route(router, dst))
                .is_some_and(|(_, r)| r.flags & (route_flags::EXTERNAL | route_flags::LOCAL) == 0)
        };
        self.tables
            .gateway_macs
            .iter()
            .find(|(_, router)| inside(**router))
            .map(|(mac, _)| MacAddr(*mac))
            .ok_or_else(|| no_default("dst_mac", "no router's gateway answers for the destination"))
    }

    // ---- lookups -----------------------------------------------------------------

    fn neighbor(&self, network_slot: u32, addr: IpAddr) -> Option<Neighbor> {
        match addr {
            IpAddr::V4(a) => self
                .tables
                .neigh4
                .get(&NeighKey4 {
                    network_slot,
                    addr: a.octets(),
                })
                .copied(),
            IpAddr::V6(a) => self
                .tables
                .neigh6
                .get(&NeighKey6 {
                    network_slot,
                    addr: a.octets(),
                })
                .copied(),
        }
    }

    /// `ROUTES4`/`ROUTES6` of `router` for `dst`: (prefix, route).
    fn route(&self, router: u32, dst: IpAddr) -> Option<(String, Route)> {
        let slot = router.to_ne_bytes();
        match dst {
            IpAddr::V4(a) => {
                let lookup = [&slot[..], &a.octets()[..]].concat();
                longest(
                    self.tables.routes4.iter().map(|((bits, key), route)| {
                        let bytes = [&key.router_slot.to_ne_bytes()[..], &key.addr[..]].concat();
                        let prefix =
                            format!("{}/{}", Ipv4Addr::from(key.addr), bits - ROUTE_FIXED_BITS);
                        (*bits, bytes, (prefix, *route))
                    }),
                    &lookup,
                    ROUTE_FIXED_BITS + 32,
                )
            }
            IpAddr::V6(a) => {
                let lookup = [&slot[..], &a.octets()[..]].concat();
                longest(
                    self.tables.routes6.iter().map(|((bits, key), route)| {
                        let bytes = [&key.router_slot.to_ne_bytes()[..], &key.addr[..]].concat();
                        let prefix =
                            format!("{}/{}", Ipv6Addr::from(key.addr), bits - ROUTE_FIXED_BITS);
                        (*bits, bytes, (prefix, *route))
                    }),
                    &lookup,
                    ROUTE_FIXED_BITS + 128,
                )
            }
        }
    }

    fn fdb(&self, network_slot: u32, mac: MacAddr) -> Option<FdbEntry> {
        self.tables.fdb.get(&fdb_key(network_slot, mac)).copied()
    }

    // ---- port_ingress ------------------------------------------------------------

    fn port_ingress(&mut self, port_id: &str, ifindex: u32, port: &PortInfo, p: Packet) -> Verdict {
        let dropped = |reason| Verdict::Dropped {
            reason,
            port_id: port_id.to_owned(),
        };
        match self.sender_checks(port_id, ifindex, port, &p) {
            Ok(()) => {}
            Err(reason) => return dropped(reason),
        }
        match self.switch(port, ifindex, p) {
            Ok(verdict) => verdict,
            Err(reason) => dropped(reason),
        }
    }

    /// Port lookup, header, port security and egress rules.
    fn sender_checks(
        &mut self,
        port_id: &str,
        ifindex: u32,
        port: &PortInfo,
        p: &Packet,
    ) -> Step<()> {
        let admin_up = port.flags & port_flags::ADMIN_UP != 0;
        self.stage(
            "port",
            format!("PORTS[ifindex {ifindex}]"),
            format!(
                "port {port_id} (slot {}, network slot {}, flags {})",
                port.port_slot,
                port.network_slot,
                port_flag_names(port.flags)
            ),
            if admin_up {
                "up".into()
            } else {
                "drop: port_admin_down".into()
            },
        );
        if !admin_up {
            return Err(DropReason::PortAdminDown);
        }
        let multicast_src = p.src_mac.is_multicast();
        self.stage(
            "header",
            "Ethernet and IP headers".into(),
            p.describe(),
            if multicast_src {
                "drop: malformed_ethernet (multicast source MAC)".into()
            } else {
                "valid".into()
            },
        );
        if multicast_src {
            return Err(DropReason::MalformedEthernet);
        }
        if port.flags & port_flags::PORT_SECURITY != 0 {
            let result = self.port_security(port, p);
            result?;
        } else {
            self.stage(
                "port security",
                "-".into(),
                "off for this port".into(),
                "pass".into(),
            );
        }
        if p.ip.is_some() {
            if port.flags & port_flags::POLICY != 0 {
                if self.policy(port, p, sg_direction::EGRESS)? {
                    self.opened = Some((port.port_slot, connection(p)));
                }
            } else {
                self.stage(
                    "egress security groups",
                    "-".into(),
                    "the port has no security groups applied".into(),
                    "pass".into(),
                );
            }
        }
        Ok(())
    }

    fn port_security(&mut self, port: &PortInfo, p: &Packet) -> Step<()> {
        const NAME: &str = "port security";
        let mac_lookup = format!(
            "source MAC {} (own, else PORT_MACS[slot {}])",
            p.src_mac, port.port_slot
        );
        let mac_ok = p.src_mac.0 == port.mac
            || self
                .tables
                .port_macs
                .iter()
                .any(|k| k.port_slot == port.port_slot && k.mac == p.src_mac.0);
        if !mac_ok {
            self.stage(
                NAME,
                mac_lookup,
                "not the port's nor an allowed pair's".into(),
                "drop: source_mac_spoofed".into(),
            );
            return Err(DropReason::SourceMacSpoofed);
        }
        let Some(ip) = p.ip else {
            self.stage(
                NAME,
                mac_lookup,
                "allowed MAC".into(),
                format!("drop: ethertype_not_allowed ({:#06x})", p.ethertype),
            );
            return Err(DropReason::EthertypeNotAllowed);
        };
        let (sport, dport) = p.ports();
        let udp = matches!(p.transport, Transport::Udp { .. });
        let addr_lookup = format!(
            "{mac_lookup}; source {} for that MAC (PORT_IP{v}, else PORT_NET{v} if the port has prefixes)",
            ip.src,
            v = if p.is_v6() { 6 } else { 4 }
        );
        let unspecified = ip.src.is_unspecified();
        let (verdict, found): (Step<()>, &str) = if !p.is_v6() {
            if unspecified && !(udp && (sport, dport) == (68, 67)) {
                (
                    Err(DropReason::SourceIpSpoofed),
                    "unspecified source, not a DHCP request",
                )
            } else if !unspecified && !self.address_allowed(port, p.src_mac, ip.src) {
                (
                    Err(DropReason::SourceIpSpoofed),
                    "source address not the port's for that MAC",
                )
            } else if udp && (sport, dport) == (67, 68) {
                (Err(DropReason::DhcpServerFromPort), "a DHCP server reply")
            } else {
                (Ok(()), "allowed MAC and address")
            }
        } else {
            let icmp = p.icmp_type().unwrap_or(0);
            if unspecified && !matches!(icmp, 131 | 135 | 143) {
                (
                    Err(DropReason::SourceIpSpoofed),
                    "unspecified source, not MLD or DAD",
                )
            } else if !unspecified && !self.address_allowed(port, p.src_mac, ip.src) {
                (
                    Err(DropReason::SourceIpSpoofed),
                    "source address not the port's for that MAC",
                )
            } else if icmp == ICMP6_ROUTER_ADVERT {
                (
                    Err(DropReason::RouterAdvertisementFromPort),
                    "a router advertisement",
                )
            } else if udp && (sport, dport) == (547, 546) {
                (Err(DropReason::DhcpServerFromPort), "a DHCPv6 server reply")
            } else {
                (Ok(()), "allowed MAC and address")
            }
        };
        let decision = match verdict {
            Ok(()) => "pass".to_owned(),
            Err(reason) => format!("drop: {}", reason.name()),
        };
        self.stage(NAME, addr_lookup, found.into(), decision);
        verdict
    }

    /// `ip4_allowed`/`ip6_allowed`: the exact hash, then the port's prefixes.
    fn address_allowed(&self, port: &PortInfo, mac: MacAddr, addr: IpAddr) -> bool {
        let t = self.tables;
        let head = |slot: u32| [&slot.to_ne_bytes()[..], &mac.0[..], &[0, 0][..]].concat();
        match addr {
            IpAddr::V4(a) => {
                let exact = t.port_ip4.iter().any(|k| {
                    k.port_slot == port.port_slot && k.mac == mac.0 && k.addr == a.octets()
                });
                exact
                    || (port.flags & port_flags::HAS_NET4 != 0
                        && longest(
                            t.port_net4.iter().map(|(bits, k)| {
                                let bytes = [
                                    &k.port_slot.to_ne_bytes()[..],
                                    &k.mac[..],
                                    &k._pad[..],
                                    &k.addr[..],
                                ]
                                .concat();
                                (*bits, bytes, ())
                            }),
                            &[&head(port.port_slot)[..], &a.octets()[..]].concat(),
                            PORT_ADDR_FIXED_BITS + 32,
                        )
                        .is_some())
            }
            IpAddr::V6(a) => {
                let exact = t.port_ip6.iter().any(|k| {
                    k.port_slot == port.port_slot && k.mac == mac.0 && k.addr == a.octets()
                });
                exact
                    || (port.flags & port_flags::HAS_NET6 != 0
                        && longest(
                            t.port_net6.iter().map(|(bits, k)| {
                                let bytes = [
                                    &k.port_slot.to_ne_bytes()[..],
                                    &k.mac[..],
                                    &k._pad[..],
                                    &k.addr[..],
                                ]
                                .concat();
                                (*bits, bytes, ())
                            }),
                            &[&head(port.port_slot)[..], &a.octets()[..]].concat(),
                            PORT_ADDR_FIXED_BITS + 128,
                        )
                        .is_some())
            }
        }
    }

    /// `policy::check` of the port's security groups in `direction`. Whether it opened
    /// a conntrack entry.
    fn policy(&mut self, port: &PortInfo, p: &Packet, direction: u8) -> Step<bool> {
        let name = if direction == sg_direction::EGRESS {
            "egress security groups"
        } else {
            "ingress security groups"
        };
        let stateful = port.flags & port_flags::STATEFUL != 0;
        let kind = p.kind();
        let (sport, dport) = p.ports();
        let always = match (p.is_v6(), p.icmp_type()) {
            (true, Some(t)) => match t {
                130..=133 | 135..=137 | 143 => true,
                ICMP6_ROUTER_ADVERT => direction == sg_direction::INGRESS,
                _ => false,
            },
            _ => {
                direction == sg_direction::EGRESS
                    && matches!(p.transport, Transport::Udp { .. })
                    && (sport, dport) == if p.is_v6() { (546, 547) } else { (68, 67) }
            }
        };
        let mode = if stateful { "stateful" } else { "stateless" };
        let (lookup, rule) = self.classify(port, p, direction);
        let matched = match rule {
            Some(slot) => format!("rule {}", self.rule_id(slot)),
            None => "no rule".to_owned(),
        };
        let (found, result): (String, Step<()>) = if always {
            (
                "neighbour discovery, MLD or a DHCP request: allowed before any rule".into(),
                Ok(()),
            )
        } else if !stateful {
            (matched, rule.map(|_| ()).ok_or(DropReason::PolicyDenied))
        } else {
            match kind {
                Kind::IcmpError if self.established => (
                    "an ICMP error about a tracked connection (assumed established)".into(),
                    Ok(()),
                ),
                Kind::IcmpError => (
                    format!("{matched}; an ICMP error about no tracked connection"),
                    rule.map(|_| ()).ok_or(DropReason::CtInvalid),
                ),
                Kind::IcmpOther => (
                    format!("{matched}; not tracked"),
                    rule.map(|_| ()).ok_or(DropReason::PolicyDenied),
                ),
                Kind::Tcp(flags) if invalid_tcp_flags(flags) => (
                    format!("TCP flags {} no connection has", tcp_flag_names(flags)),
                    Err(DropReason::CtInvalid),
                ),
                _ if self.established => (
                    "conntrack: an entry of the connection (assumed established)".into(),
                    Ok(()),
                ),
                Kind::Tcp(flags) if flags & (SYN | ACK) == SYN | ACK => (
                    "conntrack: no entry; a SYN-ACK of no connection".into(),
                    Err(DropReason::CtInvalid),
                ),
                _ => (
                    format!("conntrack: no entry (a new connection); {matched}"),
                    rule.map(|_| ()).ok_or(DropReason::PolicyDenied),
                ),
            }
        };
        let decision = match result {
            Ok(()) => format!("allow ({mode})"),
            Err(reason) => format!("drop: {} ({mode}, default deny)", reason.name()),
        };
        self.stage(name, lookup, found, decision);
        result?;
        // A new connection's first packet opens an entry, but an echo reply's (only a
        // request opens an exchange) and untracked ICMP's.
        let tracked = matches!(
            kind,
            Kind::Tcp(_) | Kind::Ports | Kind::EchoRequest | Kind::Other
        );
        Ok(stateful && !always && !self.established && tracked)
    }

    /// `policy::classify`: the remote's address class, then the class's rule for the
    /// protocol and port. (what was looked up, the rule slot).
    fn classify(&self, port: &PortInfo, p: &Packet, direction: u8) -> (String, Option<u32>) {
        let ip = p.ip.expect("classified packets are IP");
        let remote = if direction == sg_direction::EGRESS {
            ip.dst
        } else {
            ip.src
        };
        let head = [&port.policy_id.to_ne_bytes()[..], &[direction, 0, 0, 0][..]].concat();
        let class = match remote {
            IpAddr::V4(a) => longest(
                self.tables.sg_remote4.iter().map(|((bits, k), class)| {
                    let bytes = [
                        &k.policy_id.to_ne_bytes()[..],
                        &[k.direction],
                        &k._pad[..],
                        &k.addr[..],
                    ]
                    .concat();
                    (*bits, bytes, (*bits, *class))
                }),
                &[&head[..], &a.octets()[..]].concat(),
                REMOTE4_FULL_BITS,
            ),
            IpAddr::V6(a) => longest(
                self.tables.sg_remote6.iter().map(|((bits, k), class)| {
                    let bytes = [
                        &k.policy_id.to_ne_bytes()[..],
                        &[k.direction],
                        &k._pad[..],
                        &k.addr[..],
                    ]
                    .concat();
                    (*bits, bytes, (*bits, *class))
                }),
                &[&head[..], &a.octets()[..]].concat(),
                REMOTE6_FULL_BITS,
            ),
        };
        let protocol = p.protocol();
        let port_bytes = p.rule_port();
        // The map the programs find the entry in: a full-length one is in the host map.
        let family = if p.is_v6() { 6 } else { 4 };
        let full_bits = if p.is_v6() {
            REMOTE6_FULL_BITS
        } else {
            REMOTE4_FULL_BITS
        };
        let remotes = match class {
            Some((bits, _)) if bits == full_bits => "SG_HOST",
            _ => "SG_REMOTE",
        };
        let mut lookup = format!(
            "{remotes}{family}[policy {}, {}, remote {remote}]",
            port.policy_id,
            if direction == sg_direction::EGRESS {
                "egress"
            } else {
                "ingress"
            },
        );
        let Some((_, class)) = class else {
            lookup.push_str(": no address class");
            return (lookup, None);
        };
        let key = [
            &class.to_ne_bytes()[..],
            &[protocol],
            &port_bytes[..],
            &[0][..],
        ]
        .concat();
        let slot = longest(
            self.tables.sg_rules.iter().map(|((bits, k), slot)| {
                let bytes = [
                    &k.class.to_ne_bytes()[..],
                    &[k.protocol],
                    &k.port[..],
                    &[k._pad],
                ]
                .concat();
                (*bits, bytes, (*bits, *slot))
            }),
            &key,
            RULE_LOOKUP_BITS,
        );
        let rules = match slot {
            Some((RULE_LOOKUP_BITS, _)) => "SG_RULE_PORTS",
            _ => "SG_RULES",
        };
        lookup.push_str(&format!(
            " = class {class}; {rules}[class {class}, protocol {protocol}, {}]",
            match p.transport {
                Transport::Icmp { kind, code, .. } => format!("type {kind} code {code}"),
                _ => format!("port {}", u16::from_be_bytes(port_bytes)),
            }
        ));
        (lookup, slot.map(|(_, slot)| slot))
    }

    // ---- switching -----------------------------------------------------------------

    /// `l2::forward`.
    fn switch(&mut self, port: &PortInfo, ingress: u32, p: Packet) -> Step<Verdict> {
        let net = port.network_slot;
        if p.dst_mac.is_multicast() {
            self.stage(
                "l2",
                format!("destination {} (group address)", p.dst_mac),
                "-".into(),
                "flood".into(),
            );
            return self.flood(port, ingress, 0, DropReason::NoFloodTarget, &p);
        }
        let lookup = format!("FDB[network slot {net}, {}]", p.dst_mac);
        if let Some(fdb) = self.fdb(net, p.dst_mac) {
            if fdb.ifindex == ingress {
                self.stage(
                    "l2",
                    lookup,
                    "the sender itself".into(),
                    "drop: unknown_destination".into(),
                );
                return Err(DropReason::UnknownDestination);
            }
            let to = self.port_id(fdb.ifindex);
            self.stage(
                "l2",
                lookup,
                format!("port {to} (ifindex {})", fdb.ifindex),
                "switch to it".into(),
            );
            return Ok(self.deliver(&fdb, &p));
        }
        let rif_lookup = format!(
            "{lookup}: none; ROUTER_IFS[network slot {net}, {}]",
            p.dst_mac
        );
        match self
            .tables
            .router_ifs
            .get(&fdb_key(net, p.dst_mac))
            .copied()
        {
            Some(rif) => {
                self.stage(
                    "l2",
                    rif_lookup,
                    format!("interface of router slot {}", rif.router_slot),
                    "route".into(),
                );
                self.route_from_port(port, &rif, p)
            }
            None => {
                self.stage(
                    "l2",
                    rif_lookup,
                    "none".into(),
                    "flood to the ports that accept unknown unicast".into(),
                );
                self.flood(
                    port,
                    ingress,
                    flood_flags::ACCEPTS_UNKNOWN,
                    DropReason::UnknownDestination,
                    &p,
                )
            }
        }
    }

    fn flood(
        &mut self,
        port: &PortInfo,
        ingress: u32,
        need: u32,
        none: DropReason,
        p: &Packet,
    ) -> Step<Verdict> {
        let lookup = format!("FLOOD[network slot {}]", port.network_slot);
        let targets: Vec<u32> = self
            .tables
            .flood
            .get(&port.network_slot)
            .map(|set| {
                set.ports[..(set.count as usize).min(set.ports.len())]
                    .iter()
                    .filter(|e| e.ifindex != ingress && e.flags & need == need)
                    .map(|e| e.ifindex)
                    .collect()
            })
            .unwrap_or_default();
        if targets.is_empty() {
            self.stage(
                "flood",
                lookup,
                "no other port to go to".into(),
                format!("drop: {}", none.name()),
            );
            return Err(none);
        }
        let names: Vec<String> = targets.iter().map(|i| self.port_id(*i)).collect();
        self.stage(
            "flood",
            lookup,
            names.join(", "),
            "a copy to each, judged by its port_egress".into(),
        );
        let mut copies = Vec::new();
        for ifindex in targets {
            let target = Target {
                port_id: self.port_id(ifindex),
                ifindex,
            };
            let dropped = self.receiver(ifindex, p, false).err();
            copies.push(FloodCopy { target, dropped });
        }
        Ok(Verdict::Flooded(copies))
    }

    /// `deliver::unicast`: the receiver's checks, in `port_ingress` (peer delivery) or
    /// its `port_egress`.
    fn deliver(&mut self, fdb: &FdbEntry, p: &Packet) -> Verdict {
        let target = Target {
            port_id: self.port_id(fdb.ifindex),
            ifindex: fdb.ifindex,
        };
        match self.receiver(fdb.ifindex, p, false) {
            Ok(()) => Verdict::Delivered(target),
            Err(reason) => Verdict::Dropped {
                reason,
                port_id: target.port_id,
            },
        }
    }

    /// `deliver::accept` of the port on `ifindex`. `answer`: the router's answer to
    /// what that port just sent.
    fn receiver(&mut self, ifindex: u32, p: &Packet, answer: bool) -> Step<()> {
        let lookup = format!("PORTS[ifindex {ifindex}]");
        let Some(port) = self.tables.ports.get(&ifindex).copied() else {
            self.stage(
                "receiver",
                lookup,
                "no port".into(),
                "drop: unknown_port".into(),
            );
            return Err(DropReason::UnknownPort);
        };
        let id = self.port_id(ifindex);
        if port.flags & port_flags::ADMIN_UP == 0 {
            self.stage(
                "receiver",
                lookup,
                format!("port {id}, down"),
                "drop: port_admin_down".into(),
            );
            return Err(DropReason::PortAdminDown);
        }
        self.stage("receiver", lookup, format!("port {id}, up"), "judge".into());
        if p.ip.is_some() && port.flags & port_flags::POLICY != 0 {
            // The receiver's zone has no entry unless the connection is established, or
            // the packet is of (or, an error answered, about) the one the port itself
            // just opened.
            let saved = self.established;
            if let Some((zone, (opened, origin))) = self.opened {
                let (connection, source) = connection(p);
                // An echo request from the side that answers, or a reply from the side
                // that asked, is judged on its own.
                let is_reply = source != origin;
                let same_exchange = match p.kind() {
                    Kind::EchoRequest => !is_reply,
                    Kind::EchoReply => is_reply,
                    _ => true,
                };
                if zone == port.port_slot
                    && ((opened == connection && same_exchange)
                        || (answer && p.kind() == Kind::IcmpError))
                {
                    self.established = true;
                }
            }
            let result = self.policy(&port, p, sg_direction::INGRESS);
            self.established = saved;
            return result.map(|_| ());
        }
        Ok(())
    }

    // ---- routing -------------------------------------------------------------------

    /// `router::route` of what the sender addressed to `rif`.
    fn route_from_port(&mut self, port: &PortInfo, rif: &RouterIf, p: Packet) -> Step<Verdict> {
        let Some(ip) = p.ip else {
            self.stage(
                "router",
                "-".into(),
                format!("ethertype {:#06x}", p.ethertype),
                "drop: no_route".into(),
            );
            return Err(DropReason::NoRoute);
        };
        let router = rif.router_slot;
        let table = if p.is_v6() { "ROUTES6" } else { "ROUTES4" };
        let lookup = format!("{table}[router slot {router}, {}]", ip.dst);
        let Some((prefix, route)) = self.route(router, ip.dst) else {
            self.stage("router", lookup, "no route".into(), "drop: no_route".into());
            return Err(DropReason::NoRoute);
        };
        let found = format!("{prefix} {}", route_description(&route));
        let echo_request =
            p.kind() == Kind::EchoRequest && matches!(p.transport, Transport::Icmp { code: 0, .. });
        let local = route.flags & route_flags::LOCAL != 0
            && (p.is_v6() || route.flags & route_flags::EXTERNAL == 0 || echo_request)
            && (route.flags & route_flags::BEYOND == 0 || ip.ttl > 1);
        if local {
            if !echo_request {
                self.stage(
                    "router",
                    lookup,
                    found,
                    "drop: no_route (the router's own address, not an echo request)".into(),
                );
                return Err(DropReason::NoRoute);
            }
            self.stage("router", lookup, found, "echo reply from the router".into());
            let reply = Packet {
                src_mac: p.dst_mac,
                dst_mac: p.src_mac,
                ip: Some(Ip {
                    src: ip.dst,
                    dst: ip.src,
                    ttl: ROUTER_TTL,
                }),
                transport: match p.transport {
                    Transport::Icmp { id, .. } => Transport::Icmp {
                        kind: if p.is_v6() {
                            ICMP6_ECHO_REPLY
                        } else {
                            ICMP_ECHO_REPLY
                        },
                        code: 0,
                        id,
                    },
                    other => other,
                },
                ..p
            };
            return self.answer(port, reply);
        }
        if ip.ttl <= 1 {
            self.stage("router", lookup, found, format!("TTL {}: expired", ip.ttl));
            return self.time_exceeded(port, rif, p);
        }
        if route.flags & route_flags::EXTERNAL != 0 {
            self.stage(
                "router",
                lookup,
                found,
                "out of the external gateway".into(),
            );
            return if p.is_v6() {
                self.external6(rif)
            } else {
                self.outbound(port, rif, p)
            };
        }
        let nexthop = if route.flags & route_flags::VIA != 0 {
            if p.is_v6() {
                IpAddr::V6(Ipv6Addr::from(route.nexthop))
            } else {
                IpAddr::V4(Ipv4Addr::new(
                    route.nexthop[0],
                    route.nexthop[1],
                    route.nexthop[2],
                    route.nexthop[3],
                ))
            }
        } else {
            ip.dst
        };
        self.stage(
            "router",
            lookup,
            found,
            format!("next hop {nexthop}, TTL {} -> {}", ip.ttl, ip.ttl - 1),
        );
        let routed = Packet {
            src_mac: MacAddr(route.mac),
            ip: Some(Ip {
                ttl: ip.ttl - 1,
                ..ip
            }),
            ..p
        };
        let target = self.next_hop(route.network_slot, nexthop)?;
        Ok(self.deliver(
            &target,
            &Packet {
                dst_mac: self.neighbor_mac(route.network_slot, nexthop),
                ..routed
            },
        ))
    }

    fn neighbor_mac(&self, network_slot: u32, addr: IpAddr) -> MacAddr {
        self.neighbor(network_slot, addr)
            .map_or(MacAddr::default(), |n| MacAddr(n.mac))
    }

    /// `NEIGH4/6` then `FDB`: the port that has `addr` on the network.
    fn next_hop(&mut self, network_slot: u32, addr: IpAddr) -> Step<FdbEntry> {
        let table = if addr.is_ipv6() { "NEIGH6" } else { "NEIGH4" };
        let lookup = format!("{table}[network slot {network_slot}, {addr}]");
        let Some(neighbor) = self.neighbor(network_slot, addr) else {
            self.stage(
                "neighbor",
                lookup,
                "none".into(),
                "drop: no_neighbor".into(),
            );
            return Err(DropReason::NoNeighbor);
        };
        let lookup = format!(
            "{lookup} = {}; FDB[network slot {network_slot}, {}]",
            MacAddr(neighbor.mac),
            MacAddr(neighbor.mac)
        );
        match self.fdb(network_slot, MacAddr(neighbor.mac)) {
            Some(fdb) => {
                let id = self.port_id(fdb.ifindex);
                self.stage(
                    "neighbor",
                    lookup,
                    format!("port {id} (ifindex {})", fdb.ifindex),
                    "deliver".into(),
                );
                Ok(fdb)
            }
            None => {
                self.stage(
                    "neighbor",
                    lookup,
                    "no port here".into(),
                    "drop: unknown_destination".into(),
                );
                Err(DropReason::UnknownDestination)
            }
        }
    }

    /// What the router sends back to the sender: to its FDB entry, through its checks.
    fn answer(&mut self, port: &PortInfo, reply: Packet) -> Step<Verdict> {
        let lookup = format!("FDB[network slot {}, {}]", port.network_slot, reply.dst_mac);
        let Some(sender) = self.fdb(port.network_slot, reply.dst_mac) else {
            self.stage(
                "answer",
                lookup,
                "the sender's MAC is no port's".into(),
                "drop: unknown_destination".into(),
            );
            return Err(DropReason::UnknownDestination);
        };
        let id = self.port_id(sender.ifindex);
        self.stage(
            "answer",
            lookup,
            format!("port {id}"),
            format!("send {}", reply.describe()),
        );
        let target = Target {
            port_id: id,
            ifindex: sender.ifindex,
        };
        Ok(match self.receiver(sender.ifindex, &reply, true) {
            Ok(()) => Verdict::Answered(target),
            Err(reason) => Verdict::Dropped {
                reason,
                port_id: target.port_id,
            },
        })
    }

    /// `time_exceeded4/6`: an error from the router's address back to the sender.
    fn time_exceeded(&mut self, port: &PortInfo, rif: &RouterIf, p: Packet) -> Step<Verdict> {
        let ip = p.ip.expect("routed packets are IP");
        let source: Option<IpAddr> = if p.is_v6() {
            (rif.ip6 != [0; 16]).then(|| Ipv6Addr::from(rif.ip6).into())
        } else {
            (rif.ip4 != [0; 4]).then(|| Ipv4Addr::from(rif.ip4).into())
        };
        let answerable = match (p.is_v6(), p.transport) {
            (false, Transport::Icmp { kind, .. }) => {
                kind == ICMP_ECHO_REQUEST || kind == ICMP_ECHO_REPLY
            }
            (true, Transport::Icmp { kind, .. }) => kind >= ICMP6_ECHO_REQUEST,
            _ => true,
        };
        let Some(source) = source.filter(|_| answerable) else {
            self.stage(
                "time exceeded",
                "the router interface's address".into(),
                if source.is_none() {
                    "none of this family".into()
                } else {
                    "an ICMP error is not answered with one".into()
                },
                "drop: ttl_exceeded".into(),
            );
            return Err(DropReason::TtlExceeded);
        };
        let error = Packet {
            src_mac: p.dst_mac,
            dst_mac: p.src_mac,
            ip: Some(Ip {
                src: source,
                dst: ip.src,
                ttl: ROUTER_TTL,
            }),
            transport: Transport::Icmp {
                kind: if p.is_v6() {
                    ICMP6_TIME_EXCEEDED
                } else {
                    ICMP_TIME_EXCEEDED
                },
                code: 0,
                id: 0,
            },
            ..p
        };
        // Related to the sender's connection if its egress rules opened an entry
        // (`opened`), which `receiver` then finds.
        self.answer(port, error)
    }

    // ---- the external gateway ------------------------------------------------------

    /// `router::external6`: out of the uplink, untranslated.
    fn external6(&mut self, rif: &RouterIf) -> Step<Verdict> {
        let lookup = format!("ROUTER_GW6[router slot {}]", rif.router_slot);
        let Some(gw) = self.tables.router_gw6.get(&rif.router_slot).copied() else {
            self.stage("gateway", lookup, "none".into(), "drop: no_route".into());
            return Err(DropReason::NoRoute);
        };
        if gw.nexthop_mac == [0; 6] {
            self.stage(
                "gateway",
                lookup,
                "the external gateway is not resolved".into(),
                "drop: no_neighbor".into(),
            );
            return Err(DropReason::NoNeighbor);
        }
        self.stage(
            "gateway",
            lookup,
            format!("from {} to {}", MacAddr(gw.mac), MacAddr(gw.nexthop_mac)),
            "out of the uplink, one hop less".into(),
        );
        Ok(Verdict::Uplink {
            ifindex: gw.uplink_ifindex,
        })
    }

    /// `nat::outbound`: source translation, then out of the uplink or back inside.
    fn outbound(&mut self, port: &PortInfo, rif: &RouterIf, p: Packet) -> Step<Verdict> {
        let ip = p.ip.expect("routed packets are IP");
        let router = rif.router_slot;
        let gw_lookup = format!("ROUTER_GW[router slot {router}]");
        let Some(gw) = self.tables.router_gw.get(&router).copied() else {
            self.stage("nat", gw_lookup, "none".into(), "drop: no_route".into());
            return Err(DropReason::NoRoute);
        };
        let IpAddr::V4(src) = ip.src else {
            unreachable!("IPv4 is translated")
        };
        let fip = self
            .tables
            .fip_of4
            .get(&FixedAddr4 {
                network_slot: port.network_slot,
                addr: src.octets(),
            })
            .filter(|f| f.router_slot == router);
        let (sport, dport) = p.ports();
        let lookup = format!("FIP_OF4[network slot {}, {src}]", port.network_slot);
        let kind = p.kind();
        let (new_src, new_sport, found): (Ipv4Addr, u16, String) = if let Some(fip) = fip {
            let floating = Ipv4Addr::from(fip.floating);
            (floating, sport, format!("floating IP {floating}"))
        } else if gw.flags & gateway_flags::SNAT == 0 {
            (
                src,
                sport,
                "no floating IP; the router does not SNAT".into(),
            )
        } else {
            let gateway = Ipv4Addr::from(gw.ip4);
            match kind {
                Kind::Tcp(_) | Kind::Ports | Kind::EchoRequest => {
                    if gw.port_count == 0 {
                        self.stage(
                            "nat",
                            format!("{lookup}; {gw_lookup}"),
                            "SNAT with an empty port range".into(),
                            "drop: nat_ports_exhausted".into(),
                        );
                        return Err(DropReason::NatPortsExhausted);
                    }
                    let range = format!(
                        "{}-{}",
                        gw.port_min,
                        u32::from(gw.port_min) + u32::from(gw.port_count) - 1
                    );
                    // The port is picked at run time; a free one is assumed.
                    (
                        gateway,
                        0,
                        format!("no floating IP; SNAT to {gateway}, a free port of {range}"),
                    )
                }
                Kind::IcmpError if self.established => (
                    gateway,
                    0,
                    format!("an ICMP error about an SNAT connection (assumed): {gateway}"),
                ),
                Kind::IcmpError => {
                    self.stage(
                        "nat",
                        lookup,
                        "an ICMP error about no SNAT binding".into(),
                        "drop: no_nat_binding".into(),
                    );
                    return Err(DropReason::NoNatBinding);
                }
                _ => {
                    self.stage(
                        "nat",
                        lookup,
                        "SNAT has no port or echo identifier to bind".into(),
                        "drop: nat_unsupported".into(),
                    );
                    return Err(DropReason::NatUnsupported);
                }
            }
        };
        self.stage(
            "nat",
            format!("{lookup}; {gw_lookup}"),
            found,
            format!("source {src}:{sport} -> {new_src}:{new_sport}"),
        );
        let dst = match ip.dst {
            IpAddr::V4(dst) => dst,
            IpAddr::V6(_) => unreachable!("IPv4 packet"),
        };
        if let Some(ext) = self.tables.ext_addrs4.get(&dst.octets()).copied() {
            // Hairpin: for an external address this node translates.
            let translated = Packet {
                ip: Some(Ip {
                    src: new_src.into(),
                    ttl: ip.ttl - 1,
                    ..ip
                }),
                ..p
            };
            return self.inside((ext.flags, ext.mac), dst, dport, translated, "hairpin");
        }
        if gw.nexthop_mac == [0; 6] {
            self.stage(
                "gateway",
                gw_lookup,
                "the external gateway is not resolved".into(),
                "drop: no_neighbor".into(),
            );
            return Err(DropReason::NoNeighbor);
        }
        self.stage(
            "gateway",
            gw_lookup,
            format!("from {} to {}", MacAddr(gw.mac), MacAddr(gw.nexthop_mac)),
            "out of the uplink".into(),
        );
        Ok(Verdict::Uplink {
            ifindex: gw.uplink_ifindex,
        })
    }

    /// `nat::inside` and `to_inside`: an external address to the port behind it.
    fn inside(
        &mut self,
        (flags, ext_mac): (u32, [u8; 6]),
        dst: Ipv4Addr,
        dport: u16,
        p: Packet,
        name: &'static str,
    ) -> Step<Verdict> {
        let lookup = format!("EXT_ADDRS4[{dst}]");
        if flags & ext_addr_flags::FLOATING != 0 {
            let Some(fip) = self.tables.fips4.get(&dst.octets()).copied() else {
                self.stage(
                    name,
                    format!("{lookup}: floating; FIPS4[{dst}]"),
                    "none".into(),
                    "drop: no_nat_binding".into(),
                );
                return Err(DropReason::NoNatBinding);
            };
            let fixed = Ipv4Addr::from(fip.fixed);
            self.stage(
                name,
                format!("{lookup}: floating; FIPS4[{dst}]"),
                format!("fixed {fixed}"),
                format!("destination {dst}:{dport} -> {fixed}:{dport}"),
            );
            let Some(ip) = p.ip else {
                unreachable!("translated packets are IP")
            };
            // From the uplink the TTL is checked here; a hairpin had it checked by the
            // router and is one less already.
            let inbound = name == "floating IP";
            if inbound && ip.ttl <= 1 {
                self.stage(
                    "ttl",
                    format!("TTL {}", ip.ttl),
                    "expired".into(),
                    "time exceeded".into(),
                );
                return self.expired_on_uplink(MacAddr(ext_mac), &p);
            }
            let target = self.next_hop(fip.network_slot, fixed.into())?;
            let ttl = if inbound { ip.ttl - 1 } else { ip.ttl };
            let inside = Packet {
                src_mac: MacAddr(fip.router_mac),
                dst_mac: self.neighbor_mac(fip.network_slot, fixed.into()),
                ip: Some(Ip {
                    dst: fixed.into(),
                    ttl,
                    ..ip
                }),
                ..p
            };
            return Ok(self.deliver(&target, &inside));
        }
        let found = if flags & ext_addr_flags::GATEWAY != 0 {
            "a gateway address: replies to SNAT bindings (the trace holds none)"
        } else {
            "an unassociated floating IP"
        };
        self.stage(name, lookup, found.into(), "drop: no_nat_binding".into());
        Err(DropReason::NoNatBinding)
    }

    // ---- the uplink ----------------------------------------------------------------

    /// `uplink_xdp`, then `uplink_ingress`.
    fn uplink(&mut self, p: Packet) -> Verdict {
        match self.uplink_steps(p) {
            Ok(verdict) => verdict,
            Err(reason) => Verdict::Dropped {
                reason,
                port_id: String::new(),
            },
        }
    }

    fn uplink_steps(&mut self, p: Packet) -> Step<Verdict> {
        self.stage(
            "header",
            "Ethernet and IP headers".into(),
            p.describe(),
            "arrived on the uplink".into(),
        );
        let Some(ip) = p.ip else {
            self.stage(
                "uplink",
                "-".into(),
                format!("ethertype {:#06x}", p.ethertype),
                "not the datapath's: to the host".into(),
            );
            return Ok(Verdict::ToHost);
        };
        let echo =
            p.kind() == Kind::EchoRequest && matches!(p.transport, Transport::Icmp { code: 0, .. });
        match ip.dst {
            IpAddr::V4(dst) => {
                let ext = self.tables.ext_addrs4.get(&dst.octets()).copied();
                let lookup = format!("EXT_ADDRS4[{dst}]");
                match ext {
                    Some(ext) if ext.flags & ext_addr_flags::UNBOUND != 0 => {
                        self.stage(
                            "uplink_xdp",
                            lookup,
                            "an unassociated floating IP".into(),
                            "drop: no_nat_binding".into(),
                        );
                        return Err(DropReason::NoNatBinding);
                    }
                    Some(ext) if ext.flags & ext_addr_flags::GATEWAY != 0 && echo => {
                        self.stage(
                            "uplink_xdp",
                            lookup,
                            "a gateway address".into(),
                            "echo reply out of the uplink".into(),
                        );
                        return Ok(Verdict::AnsweredOnUplink);
                    }
                    Some(ext) => {
                        self.stage(
                            "uplink_xdp",
                            lookup.clone(),
                            "an external address".into(),
                            "pass to uplink_ingress".into(),
                        );
                        let (_, dport) = p.ports();
                        return self.inside((ext.flags, ext.mac), dst, dport, p, "floating IP");
                    }
                    None => self.stage(
                        "uplink_xdp",
                        lookup,
                        "none".into(),
                        "pass to uplink_ingress".into(),
                    ),
                }
            }
            IpAddr::V6(dst) => {
                if echo && self.tables.ext_addrs6.contains_key(&dst.octets()) {
                    self.stage(
                        "uplink_xdp",
                        format!("EXT_ADDRS6[{dst}]"),
                        "a gateway address".into(),
                        "echo reply out of the uplink".into(),
                    );
                    return Ok(Verdict::AnsweredOnUplink);
                }
            }
        }
        // Routed in by the router whose gateway MAC the frame is for.
        let lookup = format!("GATEWAY_MACS[{}]", p.dst_mac);
        let Some(router) = self.tables.gateway_macs.get(&p.dst_mac.0).copied() else {
            self.stage(
                "uplink_ingress",
                lookup,
                "none".into(),
                "not the datapath's: to the host".into(),
            );
            return Ok(Verdict::ToHost);
        };
        let table = if p.is_v6() { "ROUTES6" } else { "ROUTES4" };
        let route_lookup = format!(
            "{lookup} = router slot {router}; {table}[router slot {router}, {}]",
            ip.dst
        );
        let Some((prefix, route)) = self.route(router, ip.dst) else {
            self.stage(
                "router",
                route_lookup,
                "no route".into(),
                "drop: no_route".into(),
            );
            return Err(DropReason::NoRoute);
        };
        let found = format!("{prefix} {}", route_description(&route));
        if route.flags & (route_flags::EXTERNAL | route_flags::LOCAL) != 0 {
            self.stage(
                "router",
                route_lookup,
                found,
                "drop: no_route (only into the router's subnets)".into(),
            );
            return Err(DropReason::NoRoute);
        }
        let nexthop = if route.flags & route_flags::VIA != 0 {
            if p.is_v6() {
                IpAddr::V6(Ipv6Addr::from(route.nexthop))
            } else {
                IpAddr::V4(Ipv4Addr::new(
                    route.nexthop[0],
                    route.nexthop[1],
                    route.nexthop[2],
                    route.nexthop[3],
                ))
            }
        } else {
            ip.dst
        };
        if p.is_v6() && ip.ttl <= 1 {
            self.stage(
                "router",
                route_lookup,
                found,
                format!("hop limit {}: expired", ip.ttl),
            );
            return self.expired_on_uplink(p.dst_mac, &p);
        }
        self.stage("router", route_lookup, found, format!("next hop {nexthop}"));
        let target = self.next_hop(route.network_slot, nexthop)?;
        if ip.ttl <= 1 {
            self.stage(
                "ttl",
                format!("TTL {}", ip.ttl),
                "expired".into(),
                "time exceeded".into(),
            );
            return self.expired_on_uplink(p.dst_mac, &p);
        }
        let inside = Packet {
            src_mac: MacAddr(route.mac),
            dst_mac: self.neighbor_mac(route.network_slot, nexthop),
            ip: Some(Ip {
                ttl: ip.ttl - 1,
                ..ip
            }),
            ..p
        };
        Ok(self.deliver(&target, &inside))
    }

    /// `router::expired_on_uplink`: a time-exceeded error from the gateway of the router
    /// whose gateway MAC is `mac`, back out of the uplink.
    fn expired_on_uplink(&mut self, mac: MacAddr, p: &Packet) -> Step<Verdict> {
        let answerable = match (p.is_v6(), p.transport) {
            (false, Transport::Icmp { kind, .. }) => {
                kind == ICMP_ECHO_REQUEST || kind == ICMP_ECHO_REPLY
            }
            (true, Transport::Icmp { kind, .. }) => kind >= ICMP6_ECHO_REQUEST,
            _ => true,
        };
        let router = self.tables.gateway_macs.get(&mac.0).copied();
        let gateway = router.and_then(|router| {
            if p.is_v6() {
                self.tables
                    .router_gw6
                    .get(&router)
                    .map(|gw| gw.uplink_ifindex)
            } else {
                self.tables
                    .router_gw
                    .get(&router)
                    .map(|gw| gw.uplink_ifindex)
            }
        });
        let lookup = format!("GATEWAY_MACS[{mac}], its router's gateway");
        match gateway.filter(|_| answerable) {
            Some(ifindex) => {
                self.stage(
                    "time exceeded",
                    lookup,
                    "found".into(),
                    "an error back out of the uplink".into(),
                );
                Ok(Verdict::Uplink { ifindex })
            }
            None => {
                self.stage(
                    "time exceeded",
                    lookup,
                    "not answered".into(),
                    "drop: ttl_exceeded".into(),
                );
                Err(DropReason::TtlExceeded)
            }
        }
    }
}

fn no_default(field: &'static str, why: &str) -> TraceError {
    TraceError::NoDefault {
        field,
        why: format!("cannot default: {why}; give it"),
    }
}

/// What the trace does not follow: ARP, neighbour discovery (which carry addresses of
/// their own the probe does not describe) and ported protocols it has no fields for.
fn check_supported(ethertype: u16, transport: Transport, ip: bool) -> Result<(), TraceError> {
    if ethertype == ETH_P_ARP {
        return Err(TraceError::Unsupported {
            field: "ethertype",
            why: "ARP is not traced".into(),
        });
    }
    if !ip {
        return Ok(());
    }
    match transport {
        Transport::Icmp {
            kind: ICMP6_NEIGH_SOLICIT | ICMP6_NEIGH_ADVERT,
            ..
        } if ethertype == ETH_P_IPV6 => Err(TraceError::Unsupported {
            field: "icmp_type",
            why: "neighbour discovery is not traced".into(),
        }),
        Transport::Other { protocol }
            if protocol == IPPROTO_TCP
                || protocol == IPPROTO_UDP
                || OTHER_PORTED.contains(&protocol) =>
        {
            Err(TraceError::Unsupported {
                field: "protocol",
                why: format!("protocol {protocol} has ports: give tcp or udp"),
            })
        }
        Transport::Other { protocol } if protocol == IPPROTO_ICMP || protocol == IPPROTO_ICMPV6 => {
            Err(TraceError::Unsupported {
                field: "protocol",
                why: "give icmp with its type".into(),
            })
        }
        _ => Ok(()),
    }
}

/// A connection as conntrack keys it (protocol and both endpoints, in order), and the
/// endpoint a packet of it comes from.
type Connection = ((u8, [(IpAddr, u16); 2]), (IpAddr, u16));

fn connection(p: &Packet) -> Connection {
    let ip = p.ip.expect("tracked packets are IP");
    let (sport, dport) = p.ports();
    let mut endpoints = [(ip.src, sport), (ip.dst, dport)];
    endpoints.sort();
    ((p.protocol(), endpoints), (ip.src, sport))
}

/// SYN+FIN, SYN+RST, or no flag at all.
fn invalid_tcp_flags(flags: u8) -> bool {
    flags & (SYN | FIN) == SYN | FIN || flags & (SYN | RST) == SYN | RST || flags == 0
}

fn fdb_key(network_slot: u32, mac: MacAddr) -> FdbKey {
    FdbKey {
        network_slot,
        mac: mac.0,
        _pad: [0; 2],
    }
}

fn port_flag_names(flags: u32) -> String {
    let names: Vec<&str> = [
        (port_flags::ADMIN_UP, "admin_up"),
        (port_flags::PORT_SECURITY, "port_security"),
        (port_flags::HAS_NET4, "has_net4"),
        (port_flags::HAS_NET6, "has_net6"),
        (port_flags::POLICY, "policy"),
        (port_flags::STATEFUL, "stateful"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join("|")
    }
}

fn route_description(route: &Route) -> String {
    let mut parts = Vec::new();
    if route.flags & route_flags::LOCAL != 0 {
        parts.push("local".to_owned());
    }
    if route.flags & route_flags::EXTERNAL != 0 {
        parts.push("external".to_owned());
    }
    if route.flags & route_flags::BEYOND != 0 {
        parts.push("another router's".to_owned());
    }
    if route.flags & route_flags::VIA != 0 {
        parts.push("via a next hop".to_owned());
    }
    if route.flags & (route_flags::LOCAL | route_flags::EXTERNAL) == 0 {
        parts.push(format!(
            "out of interface {} on network slot {}",
            MacAddr(route.mac),
            route.network_slot
        ));
    }
    parts.join(", ")
}

/// The LPM trie lookup: of the entries (prefix bits, key bytes, value) whose prefix is
/// no longer than `lookup_bits` and whose first bits equal `lookup`'s, the longest.
fn longest<V>(
    entries: impl Iterator<Item = (u32, Vec<u8>, V)>,
    lookup: &[u8],
    lookup_bits: u32,
) -> Option<V> {
    entries
        .filter(|(bits, key, _)| *bits <= lookup_bits && prefix_matches(key, lookup, *bits))
        .max_by_key(|(bits, _, _)| *bits)
        .map(|(_, _, value)| value)
}

fn prefix_matches(a: &[u8], b: &[u8], bits: u32) -> bool {
    let whole = (bits / 8) as usize;
    let rest = bits % 8;
    if a.len() < whole || b.len() < whole || a[..whole] != b[..whole] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(whole), b.get(whole)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
