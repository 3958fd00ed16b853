//! Ethernet header.
use dataplane_abi::DropReason;

use crate::packet::Packet;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub type Mac = [u8; 6];

/// The header as it is in the frame (also read and written in place by `uplink`).
#[repr(C, align(2))]
pub struct EthHdr {
    pub dst: Mac,
    pub src: Mac,
    pub proto: [u8; 2],
}

pub struct Eth {
    pub dst: Mac,
    pub src: Mac,
    pub proto: u16,
}

#[inline(always)]
pub fn parse(pkt: &mut Packet) -> Result<Eth, DropReason> {
    let h: &EthHdr = pkt.at(0).ok_or(DropReason::MalformedEthernet)?;
    // No station sends from a group address.
    if is_multicast(&h.src) {
        return Err(DropReason::MalformedEthernet);
    }
    Ok(Eth {
        dst: h.dst,
        src: h.src,
        proto: u16::from_be_bytes(h.proto),
    })
}

/// Group (multicast or broadcast) address.
#[inline(always)]
pub fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 != 0
}

/// Compared as one 32- and one 16-bit word: array `==` may become a `bcmp` call.
#[inline(always)]
pub fn mac_eq(a: &Mac, b: &Mac) -> bool {
    u32::from_ne_bytes([a[0], a[1], a[2], a[3]]) == u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
        && u16::from_ne_bytes([a[4], a[5]]) == u16::from_ne_bytes([b[4], b[5]])
}
