//! Port security (Neutron semantics): a port may only send from its own MACs and
//! addresses, may not answer for others in ARP/ND, and may not act as a router or DHCP
//! server. Only for ports with `PORT_SECURITY`.
//!
//! The checks of `port_ingress` are BPF functions of their own (`inline(never)`): their
//! keys stay off its stack frame, below which `policy::check` needs room (512 bytes for
//! the whole call chain).
use aya_ebpf::maps::lpm_trie::Key;
use dataplane_abi::{
    port_flags, DropReason, PortAddr4, PortAddr6, PortInfo, PortMacKey, PORT_ADDR_FIXED_BITS,
};

use crate::{
    arp::Arp,
    eth::{mac_eq, Eth, Mac},
    ipv4::{Ipv4, IPPROTO_UDP},
    ipv6::{self, Ipv6},
    l4,
    maps::{PORT_IP4, PORT_IP6, PORT_MACS, PORT_NET4, PORT_NET6},
    packet::Packet,
};

const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
const DHCP6_CLIENT_PORT: u16 = 546;
const DHCP6_SERVER_PORT: u16 = 547;

/// The port's own MAC needs no lookup; allowed address pairs' MACs are in `PORT_MACS`.
#[inline(always)]
fn check_mac(port: &PortInfo, mac: &Mac) -> Result<(), DropReason> {
    if mac_eq(mac, &port.mac) {
        return Ok(());
    }
    let key = PortMacKey {
        port_slot: port.port_slot,
        mac: *mac,
        _pad: [0; 2],
    };
    match PORT_MACS.get_ptr(&key) {
        Some(_) => Ok(()),
        None => Err(DropReason::SourceMacSpoofed),
    }
}

/// Any ethertype but ARP, IPv4 and IPv6 (VLAN tags included).
#[inline(always)]
pub fn other(port: &PortInfo, eth: &Eth) -> Result<(), DropReason> {
    check_mac(port, &eth.src)?;
    Err(DropReason::EthertypeNotAllowed)
}

/// A fixed IP or /32 pair is one hash lookup; the trie only for ports with wider pairs.
#[inline(always)]
fn ip4_allowed(port: &PortInfo, mac: &Mac, addr: [u8; 4]) -> bool {
    let key = PortAddr4 {
        port_slot: port.port_slot,
        mac: *mac,
        _pad: [0; 2],
        addr,
    };
    if PORT_IP4.get_ptr(&key).is_some() {
        return true;
    }
    port.flags & port_flags::HAS_NET4 != 0
        && PORT_NET4
            .get(Key::new(PORT_ADDR_FIXED_BITS + 32, key))
            .is_some()
}

#[inline(always)]
pub fn ip6_allowed(port: &PortInfo, mac: &Mac, addr: &[u8; 16]) -> bool {
    let key = PortAddr6 {
        port_slot: port.port_slot,
        mac: *mac,
        _pad: [0; 2],
        addr: *addr,
    };
    if PORT_IP6.get_ptr(&key).is_some() {
        return true;
    }
    port.flags & port_flags::HAS_NET6 != 0
        && PORT_NET6
            .get(Key::new(PORT_ADDR_FIXED_BITS + 128, key))
            .is_some()
}

#[inline(never)]
pub fn arp(port: &PortInfo, eth: &Eth, arp: &Arp) -> Result<(), DropReason> {
    check_mac(port, &eth.src)?;
    // An ARP probe (RFC 5227) has no sender address yet.
    if !mac_eq(&arp.sha, &eth.src)
        || (u32::from_ne_bytes(arp.spa) != 0 && !ip4_allowed(port, &arp.sha, arp.spa))
    {
        return Err(DropReason::ArpSpoofed);
    }
    Ok(())
}

#[inline(never)]
pub fn ipv4(pkt: &mut Packet, port: &PortInfo, eth: &Eth, ip: &Ipv4) -> Result<(), DropReason> {
    check_mac(port, &eth.src)?;
    // Port 0, which no check below names, when there is no UDP header. (An `Option`
    // here lets LLVM compare the undefined payload of `None`, which the verifier
    // rejects as a read of an uninitialised register.)
    let ports = if ip.first_fragment && ip.proto == IPPROTO_UDP {
        l4::udp_ports(pkt, ip.l4_off, ip.end)?
    } else {
        (0, 0)
    };
    if u32::from_ne_bytes(ip.src) == 0 {
        // A DHCP client has no address before its lease.
        if ports != (DHCP_CLIENT_PORT, DHCP_SERVER_PORT) {
            return Err(DropReason::SourceIpSpoofed);
        }
    } else if !ip4_allowed(port, &eth.src, ip.src) {
        return Err(DropReason::SourceIpSpoofed);
    }
    if ports == (DHCP_SERVER_PORT, DHCP_CLIENT_PORT) {
        return Err(DropReason::DhcpServerFromPort);
    }
    Ok(())
}

#[inline(never)]
pub fn ipv6(pkt: &mut Packet, port: &PortInfo, eth: &Eth, ip: &Ipv6) -> Result<(), DropReason> {
    check_mac(port, &eth.src)?;
    // Type 0 (reserved), which no check below names, when there is no ICMPv6 header:
    // see the ports in `ipv4` for why not an `Option`.
    let icmp_type = if ip.has_l4 && ip.next == ipv6::IPPROTO_ICMPV6 {
        l4::icmp6_type(pkt, ip.l4_off, ip.end)?
    } else {
        0
    };
    if ipv6::is_unspecified(&ip.src) {
        // Before it has an address a node joins groups (MLD) and runs DAD (NS).
        if !matches!(
            icmp_type,
            ipv6::ICMP6_MLD_REPORT | ipv6::ICMP6_NEIGH_SOLICIT | ipv6::ICMP6_MLD2_REPORT
        ) {
            return Err(DropReason::SourceIpSpoofed);
        }
    } else if !ip6_allowed(port, &eth.src, &ip.src) {
        return Err(DropReason::SourceIpSpoofed);
    }
    match icmp_type {
        ipv6::ICMP6_ROUTER_ADVERT => return Err(DropReason::RouterAdvertisementFromPort),
        ipv6::ICMP6_NEIGH_SOLICIT | ipv6::ICMP6_NEIGH_ADVERT => {
            // An NA claims its target for the sender; both carry the sender's MAC in
            // an option (source in an NS, target in an NA).
            let (off, end) = (ip.l4_off, ip.end);
            let kind = if icmp_type == ipv6::ICMP6_NEIGH_ADVERT {
                if !ip6_allowed(port, &eth.src, &ipv6::nd_target(pkt, off, end)?) {
                    return Err(DropReason::NdSpoofed);
                }
                ipv6::ND_OPT_TARGET_LL_ADDR
            } else {
                ipv6::ND_OPT_SOURCE_LL_ADDR
            };
            if !ipv6::nd_ll_addr_is(pkt, off, end, kind, &eth.src)? {
                return Err(DropReason::NdSpoofed);
            }
        }
        _ => {}
    }
    if ip.has_l4
        && ip.next == ipv6::IPPROTO_UDP
        && l4::udp_ports(pkt, ip.l4_off, ip.end)? == (DHCP6_SERVER_PORT, DHCP6_CLIENT_PORT)
    {
        return Err(DropReason::DhcpServerFromPort);
    }
    Ok(())
}
