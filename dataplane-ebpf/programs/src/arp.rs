//! ARP over Ethernet for IPv4, the only kind a VM has reason to send.
use dataplane_abi::DropReason;

use crate::{
    eth::{Mac, ETH_HLEN, ETH_P_IP},
    packet::Packet,
};

const ARPHRD_ETHER: u16 = 1;

#[repr(C, align(2))]
struct ArpHdr {
    htype: [u8; 2],
    ptype: [u8; 2],
    hlen: u8,
    plen: u8,
    oper: [u8; 2],
    sha: Mac,
    spa: [u8; 4],
    tha: Mac,
    tpa: [u8; 4],
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
    if u16::from_be_bytes(h.htype) != ARPHRD_ETHER
        || u16::from_be_bytes(h.ptype) != ETH_P_IP
        || h.hlen != 6
        || h.plen != 4
    {
        return Err(DropReason::MalformedArp);
    }
    Ok(Arp {
        sha: h.sha,
        spa: h.spa,
    })
}
