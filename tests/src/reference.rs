//! A reference evaluator of the L2 port path, in plain Rust, over the model — not over
//! the compiled maps. It is the Networking API's semantics written down a second time,
//! independently of the compiler and the programs: randomized differential tests hold
//! the eBPF datapath to it.
//!
//! Where several checks fail at once, the reason reported follows the datapath's
//! documented order: device → admin state → Ethernet → network header → source MAC →
//! transport header where needed → source address → message-specific checks → switching.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use dataplane_abi::DropReason;
use dataplane_agent::core::model::{MacAddr, Network, Port, State};

/// What should happen to a frame a port sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    Drop(DropReason),
    /// Delivered to exactly this port.
    Unicast(String),
    /// Copied to exactly these ports.
    Flood(BTreeSet<String>),
}

/// The node as the reference sees it: the desired state, this node's name, which port
/// devices exist, and which of them deliver to their peer (frames switched to those are
/// checked for the receiver on the way in: the receiver is up, and the transport header
/// its security groups read is complete).
pub struct Reference<'a> {
    pub state: &'a State,
    pub node_name: &'a str,
    pub devices: &'a BTreeMap<String, u32>,
    pub peer_devices: &'a BTreeSet<String>,
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;

impl Reference<'_> {
    /// Ports this node switches: bound here, device present.
    fn programmed(&self) -> impl Iterator<Item = &Port> {
        self.state
            .ports
            .values()
            .map(|port| &**port)
            .filter(|port| {
                port.binding.host == self.node_name
                    && self.devices.contains_key(&port.binding.interface_name)
            })
    }

    fn network(&self, port: &Port) -> &Network {
        &self.state.networks[&port.network_id]
    }

    fn security(&self, port: &Port) -> bool {
        port.port_security_enabled
            .unwrap_or(self.network(port).port_security_enabled)
    }

    /// The verdict for `frame` arriving from the VM behind device `device`.
    pub fn ingress(&self, device: &str, frame: &[u8]) -> Expected {
        match self.evaluate(device, frame) {
            Ok(expected) => expected,
            Err(reason) => Expected::Drop(reason),
        }
    }

    fn evaluate(&self, device: &str, frame: &[u8]) -> Result<Expected, DropReason> {
        let port = self
            .programmed()
            .find(|port| port.binding.interface_name == device)
            .ok_or(DropReason::UnknownPort)?;
        if !(port.admin_state_up && self.network(port).admin_state_up) {
            return Err(DropReason::PortAdminDown);
        }
        if frame.len() < 14 {
            return Err(DropReason::MalformedEthernet);
        }
        let dst = MacAddr(frame[0..6].try_into().unwrap());
        let src = MacAddr(frame[6..12].try_into().unwrap());
        if src.is_multicast() {
            return Err(DropReason::MalformedEthernet);
        }
        let header = match u16::from_be_bytes([frame[12], frame[13]]) {
            ETHERTYPE_ARP => Header::Arp(parse_arp(frame)?),
            ETHERTYPE_IPV4 => Header::Ipv4(parse_ipv4(frame)?),
            ETHERTYPE_IPV6 => Header::Ipv6(parse_ipv6(frame)?),
            _ => Header::Other,
        };
        if self.security(port) {
            self.port_security(port, frame, src, &header)?;
            // The port's security groups read the transport header of what it sends.
            transport_header_complete(&header)?;
        }
        let expected = self.switch(port, dst)?;
        if let Expected::Unicast(id) = &expected {
            let receiver = &self.state.ports[id];
            if self.peer_devices.contains(&receiver.binding.interface_name) {
                if !receiver.admin_state_up {
                    return Err(DropReason::PortAdminDown);
                }
                if self.security(receiver) {
                    transport_header_complete(&header)?;
                }
            }
        }
        Ok(expected)
    }

    fn allowed_macs(&self, port: &Port) -> BTreeSet<MacAddr> {
        std::iter::once(port.mac_address)
            .chain(
                port.allowed_address_pairs
                    .iter()
                    .filter_map(|pair| pair.mac_address),
            )
            .collect()
    }

    /// Whether the port may send from `addr` with source MAC `mac`: a fixed IP with the
    /// port's MAC, an allowed pair's address or CIDR with the pair's MAC (the port's if
    /// the pair names none), or the EUI-64 link-local address of one of its MACs.
    fn address_allowed(&self, port: &Port, mac: MacAddr, addr: IpAddr) -> bool {
        let fixed =
            mac == port.mac_address && port.fixed_ips.iter().any(|fixed| fixed.ip_address == addr);
        let pair = port.allowed_address_pairs.iter().any(|pair| {
            pair.mac_address.unwrap_or(port.mac_address) == mac && pair.ip_address.contains(&addr)
        });
        let link_local =
            self.allowed_macs(port).contains(&mac) && addr == IpAddr::V6(mac.ipv6_link_local());
        fixed || pair || link_local
    }

    fn port_security(
        &self,
        port: &Port,
        frame: &[u8],
        src: MacAddr,
        header: &Header,
    ) -> Result<(), DropReason> {
        if !self.allowed_macs(port).contains(&src) {
            return Err(DropReason::SourceMacSpoofed);
        }
        match header {
            Header::Other => Err(DropReason::EthertypeNotAllowed),
            Header::Arp(arp) => {
                let probe = arp.spa.is_unspecified();
                if arp.sha != src
                    || (!probe && !self.address_allowed(port, arp.sha, IpAddr::V4(arp.spa)))
                {
                    return Err(DropReason::ArpSpoofed);
                }
                Ok(())
            }
            Header::Ipv4(ip) => {
                let udp = match (ip.first_fragment, ip.protocol) {
                    (true, 17) => Some(udp_ports(frame, ip.l4, ip.end)?),
                    _ => None,
                };
                if ip.src.is_unspecified() {
                    if udp != Some((68, 67)) {
                        return Err(DropReason::SourceIpSpoofed);
                    }
                } else if !self.address_allowed(port, src, IpAddr::V4(ip.src)) {
                    return Err(DropReason::SourceIpSpoofed);
                }
                if udp == Some((67, 68)) {
                    return Err(DropReason::DhcpServerFromPort);
                }
                Ok(())
            }
            Header::Ipv6(ip) => self.ipv6_security(port, frame, src, ip),
        }
    }

    fn ipv6_security(
        &self,
        port: &Port,
        frame: &[u8],
        src: MacAddr,
        ip: &Ipv6,
    ) -> Result<(), DropReason> {
        let icmp_type = match (ip.has_l4, ip.next) {
            (true, 58) => {
                if ip.l4 + 4 > ip.end {
                    return Err(DropReason::MalformedL4);
                }
                Some(frame[ip.l4])
            }
            _ => None,
        };
        if ip.src.is_unspecified() {
            if !matches!(icmp_type, Some(131 | 135 | 143)) {
                return Err(DropReason::SourceIpSpoofed);
            }
        } else if !self.address_allowed(port, src, IpAddr::V6(ip.src)) {
            return Err(DropReason::SourceIpSpoofed);
        }
        match icmp_type {
            Some(134) => Err(DropReason::RouterAdvertisementFromPort),
            Some(135) => {
                if !nd_options_name(frame, ip, 1, src)? {
                    return Err(DropReason::NdSpoofed);
                }
                Ok(())
            }
            Some(136) => {
                if ip.l4 + 24 > ip.end {
                    return Err(DropReason::MalformedL4);
                }
                let target: [u8; 16] = frame[ip.l4 + 8..ip.l4 + 24].try_into().unwrap();
                if !self.address_allowed(port, src, IpAddr::V6(Ipv6Addr::from(target)))
                    || !nd_options_name(frame, ip, 2, src)?
                {
                    return Err(DropReason::NdSpoofed);
                }
                Ok(())
            }
            Some(_) => Ok(()),
            None if ip.has_l4 && ip.next == 17 => {
                if udp_ports(frame, ip.l4, ip.end)? == (547, 546) {
                    return Err(DropReason::DhcpServerFromPort);
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Switching within the port's network, by the MACs the model gives each port.
    fn switch(&self, port: &Port, dst: MacAddr) -> Result<Expected, DropReason> {
        let peers: Vec<&Port> = self
            .programmed()
            .filter(|peer| peer.network_id == port.network_id)
            .collect();
        let others = |keep: &dyn Fn(&Port) -> bool| -> BTreeSet<String> {
            peers
                .iter()
                .filter(|peer| peer.id != port.id && keep(peer))
                .map(|peer| peer.id.clone())
                .collect()
        };
        if dst.is_multicast() {
            let targets = others(&|_| true);
            return if targets.is_empty() {
                Err(DropReason::NoFloodTarget)
            } else {
                Ok(Expected::Flood(targets))
            };
        }
        // A port's own MAC is its; a pair's foreign MAC belongs to the one port that
        // claims it, and is unknown when several do.
        let owner = peers
            .iter()
            .find(|peer| peer.mac_address == dst)
            .or_else(|| {
                let claimants: Vec<&&Port> = peers
                    .iter()
                    .filter(|peer| {
                        peer.allowed_address_pairs
                            .iter()
                            .any(|pair| pair.mac_address == Some(dst))
                    })
                    .collect();
                match claimants.as_slice() {
                    [only] => Some(*only),
                    _ => None,
                }
            });
        match owner {
            Some(owner) if owner.id == port.id => Err(DropReason::UnknownDestination),
            Some(owner) => Ok(Expected::Unicast(owner.id.clone())),
            None => {
                let targets = others(&|peer| self.accepts_unknown(peer));
                if targets.is_empty() {
                    Err(DropReason::UnknownDestination)
                } else {
                    Ok(Expected::Flood(targets))
                }
            }
        }
    }

    /// Ports that may legitimately receive frames for MACs no port owns: those without
    /// port security, and those using another MAC through an allowed pair.
    fn accepts_unknown(&self, port: &Port) -> bool {
        !self.security(port)
            || port
                .allowed_address_pairs
                .iter()
                .any(|pair| pair.mac_address.is_some_and(|mac| mac != port.mac_address))
    }
}

enum Header {
    Arp(Arp),
    Ipv4(Ipv4),
    Ipv6(Ipv6),
    Other,
}

struct Arp {
    sha: MacAddr,
    spa: Ipv4Addr,
}

struct Ipv4 {
    src: Ipv4Addr,
    protocol: u8,
    l4: usize,
    end: usize,
    first_fragment: bool,
}

struct Ipv6 {
    src: Ipv6Addr,
    next: u8,
    l4: usize,
    end: usize,
    has_l4: bool,
}

fn parse_arp(frame: &[u8]) -> Result<Arp, DropReason> {
    let arp = frame.get(14..42).ok_or(DropReason::MalformedArp)?;
    let ethernet_ipv4 =
        arp[0..2] == [0, 1] && arp[2..4] == [0x08, 0x00] && arp[4] == 6 && arp[5] == 4;
    if !ethernet_ipv4 {
        return Err(DropReason::MalformedArp);
    }
    Ok(Arp {
        sha: MacAddr(arp[8..14].try_into().unwrap()),
        spa: Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]),
    })
}

fn parse_ipv4(frame: &[u8]) -> Result<Ipv4, DropReason> {
    let header = frame.get(14..34).ok_or(DropReason::MalformedIpv4)?;
    let version = header[0] >> 4;
    let ihl = usize::from(header[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if version != 4 || ihl < 20 || total < ihl || 14 + total > frame.len() {
        return Err(DropReason::MalformedIpv4);
    }
    Ok(Ipv4 {
        src: Ipv4Addr::new(header[12], header[13], header[14], header[15]),
        protocol: header[9],
        l4: 14 + ihl,
        end: 14 + total,
        first_fragment: u16::from_be_bytes([header[6], header[7]]) & 0x1fff == 0,
    })
}

/// The fixed header and the extension-header chain (at most 6 headers, each inside
/// the payload) up to the transport header.
fn parse_ipv6(frame: &[u8]) -> Result<Ipv6, DropReason> {
    const EXTENSION_HEADERS: [u8; 4] = [0, 43, 44, 60];
    let header = frame.get(14..54).ok_or(DropReason::MalformedIpv6)?;
    let end = 54 + usize::from(u16::from_be_bytes([header[4], header[5]]));
    if header[0] >> 4 != 6 || end > frame.len() {
        return Err(DropReason::MalformedIpv6);
    }
    let mut ip = Ipv6 {
        src: Ipv6Addr::from(<[u8; 16]>::try_from(&header[8..24]).unwrap()),
        next: header[6],
        l4: 54,
        end,
        has_l4: true,
    };
    for _ in 0..6 {
        let length = match ip.next {
            44 => {
                let fragment = frame
                    .get(ip.l4..ip.l4 + 8)
                    .ok_or(DropReason::MalformedIpv6)?;
                ip.next = fragment[0];
                ip.has_l4 = u16::from_be_bytes([fragment[2], fragment[3]]) & 0xfff8 == 0;
                8
            }
            0 | 43 | 60 => {
                let extension = frame
                    .get(ip.l4..ip.l4 + 2)
                    .ok_or(DropReason::MalformedIpv6)?;
                ip.next = extension[0];
                (usize::from(extension[1]) + 1) * 8
            }
            _ => return Ok(ip),
        };
        ip.l4 += length;
        if ip.l4 > end {
            return Err(DropReason::MalformedIpv6);
        }
        if !ip.has_l4 {
            return Ok(ip);
        }
    }
    if EXTENSION_HEADERS.contains(&ip.next) {
        return Err(DropReason::MalformedIpv6);
    }
    Ok(ip)
}

/// Security groups judge IP packets by their transport header: TCP needs its 20 bytes,
/// ICMP its 8, UDP and the other port protocols their 4 bytes of ports. Non-first
/// fragments have none to read.
fn transport_header_complete(header: &Header) -> Result<(), DropReason> {
    let (family_icmp, protocol, l4, end, has_l4) = match header {
        Header::Ipv4(ip) => (1, ip.protocol, ip.l4, ip.end, ip.first_fragment),
        Header::Ipv6(ip) => (58, ip.next, ip.l4, ip.end, ip.has_l4),
        Header::Arp(_) | Header::Other => return Ok(()),
    };
    let needed = match protocol {
        6 => 20,
        17 | 33 | 132 | 136 => 4,
        p if p == family_icmp => 8,
        _ => 0,
    };
    if has_l4 && l4 + needed > end {
        return Err(DropReason::MalformedL4);
    }
    Ok(())
}

fn udp_ports(frame: &[u8], l4: usize, end: usize) -> Result<(u16, u16), DropReason> {
    if l4 + 8 > end {
        return Err(DropReason::MalformedL4);
    }
    Ok((
        u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
        u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
    ))
}

/// Whether every link-layer address option of `kind` among the first four options of
/// the NS/NA names `mac`. A malformed option list is a malformed message.
fn nd_options_name(frame: &[u8], ip: &Ipv6, kind: u8, mac: MacAddr) -> Result<bool, DropReason> {
    let mut option = ip.l4 + 24;
    if option > ip.end {
        return Err(DropReason::MalformedL4);
    }
    for _ in 0..4 {
        if option >= ip.end {
            break;
        }
        let header = frame
            .get(option..option + 2)
            .ok_or(DropReason::MalformedL4)?;
        let length = usize::from(header[1]) * 8;
        if length == 0 || option + length > ip.end {
            return Err(DropReason::MalformedL4);
        }
        if header[0] == kind && frame[option + 2..option + 8] != mac.0 {
            return Ok(false);
        }
        option += length;
    }
    Ok(true)
}
