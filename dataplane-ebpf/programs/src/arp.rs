//! ARP over Ethernet for IPv4, the only kind a VM has reason to send.
use dataplane_abi::DropReason;

use crate::{
    eth::{Mac, ETH_HLEN, ETH_P_IP},
    packet::Packet,
};

const ARPHRD_ETHER: u16 = 1;
pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;

/// The header as it is in the frame (also read and written in place by `uplink`).
#[repr(C, align(2))]
pub struct ArpHdr {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub oper: [u8; 2],
    pub sha: Mac,
    pub spa: [u8; 4],
    pub tha: Mac,
    pub tpa: [u8; 4],
}

impl ArpHdr {
    /// Ethernet hardware and IPv4 protocol addresses: the only ARP there is to answer.
    #[inline(always)]
    pub fn is_ethernet_ipv4(&self) -> bool {
        u16::from_be_bytes(self.htype) == ARPHRD_ETHER
            && u16::from_be_bytes(self.ptype) == ETH_P_IP
            && self.hlen == 6
            && self.plen == 4
    }
}

pub struct Arp {
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address, network order.
    pub spa: [u8; 4],
}

#[inline(always)]
pub fn parse(pkt: &mut Packet) -> Result<Arp, DropReason> {
    let h: &ArpHdr = pkt.at(ETH_HLEN).ok_or(DropReason::MalformedArp)?;
    if !h.is_ethernet_ipv4() {
        return Err(DropReason::MalformedArp);
    }
    Ok(Arp {
        sha: h.sha,
        spa: h.spa,
    })
}
