//! ARP (RFC 826) frames: the request for an IPv4 neighbour and its reply.
use std::net::Ipv4Addr;

use super::{usable_mac, ETH_HLEN};

/// An ARP packet for Ethernet and IPv4: hardware and protocol types and lengths,
/// opcode, then sender and target hardware and protocol addresses.
const ARP_LEN: usize = 28;
const FRAME_LEN: usize = ETH_HLEN + ARP_LEN;
const BROADCAST: [u8; 6] = [0xff; 6];

/// A broadcast ARP request: who has `target`, tell `source_ip` at `source_mac`.
pub fn request(source_mac: [u8; 6], source_ip: Ipv4Addr, target: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; FRAME_LEN];
    frame[0..6].copy_from_slice(&BROADCAST);
    frame[6..12].copy_from_slice(&source_mac);
    frame[12..14].copy_from_slice(&(libc::ETH_P_ARP as u16).to_be_bytes());
    let arp = &mut frame[ETH_HLEN..];
    arp[0..2].copy_from_slice(&libc::ARPHRD_ETHER.to_be_bytes());
    arp[2..4].copy_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    arp[4] = 6;
    arp[5] = 4;
    arp[6..8].copy_from_slice(&libc::ARPOP_REQUEST.to_be_bytes());
    arp[8..14].copy_from_slice(&source_mac);
    arp[14..18].copy_from_slice(&source_ip.octets());
    // The target hardware address stays zero: it is what the request asks for.
    arp[24..28].copy_from_slice(&target.octets());
    frame
}

/// The sender hardware address of `frame` if it is an Ethernet/IPv4 ARP reply from
/// `target` that names a usable unicast address.
pub fn parse_reply(frame: &[u8], target: Ipv4Addr) -> Option<[u8; 6]> {
    let arp = frame.get(ETH_HLEN..FRAME_LEN)?;
    let be16 = |at: usize| u16::from_be_bytes([arp[at], arp[at + 1]]);
    let is_reply = frame[12..14] == (libc::ETH_P_ARP as u16).to_be_bytes()
        && be16(0) == libc::ARPHRD_ETHER
        && be16(2) == libc::ETH_P_IP as u16
        && arp[4] == 6
        && arp[5] == 4
        && be16(6) == libc::ARPOP_REPLY;
    if !is_reply || arp[14..18] != target.octets() {
        return None;
    }
    usable_mac(arp[8..14].try_into().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const GATEWAY: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];
    const MY_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

    /// The gateway's answer to `request(ME, MY_IP, GATEWAY_IP)`.
    fn reply() -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&ME);
        frame.extend_from_slice(&GATEWAY);
        frame.extend_from_slice(&[0x08, 0x06]);
        frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 2]);
        frame.extend_from_slice(&GATEWAY);
        frame.extend_from_slice(&GATEWAY_IP.octets());
        frame.extend_from_slice(&ME);
        frame.extend_from_slice(&MY_IP.octets());
        frame
    }

    #[test]
    fn the_request_is_a_broadcast_who_has() {
        #[rustfmt::skip]
        let expected: [u8; 42] = [
            // Ethernet: broadcast, from us, ARP.
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x02, 0, 0, 0, 0, 0x0a,
            0x08, 0x06,
            // Ethernet/IPv4, lengths 6 and 4, request.
            0, 1, 0x08, 0x00, 6, 4, 0, 1,
            // Sender: our MAC and address.
            0x02, 0, 0, 0, 0, 0x0a, 203, 0, 113, 10,
            // Target: unknown MAC, the address asked about.
            0, 0, 0, 0, 0, 0, 203, 0, 113, 1,
        ];
        assert_eq!(request(ME, MY_IP, GATEWAY_IP), expected);
    }

    #[test]
    fn a_reply_from_the_target_gives_its_mac() {
        assert_eq!(parse_reply(&reply(), GATEWAY_IP), Some(GATEWAY));
    }

    #[test]
    fn ethernet_padding_after_the_reply_is_ignored() {
        let mut frame = reply();
        frame.resize(60, 0);
        assert_eq!(parse_reply(&frame, GATEWAY_IP), Some(GATEWAY));
    }

    #[test]
    fn requests_are_not_replies() {
        let request = request(GATEWAY, GATEWAY_IP, MY_IP);
        assert_eq!(parse_reply(&request, GATEWAY_IP), None);
        let mut frame = reply();
        frame[21] = 1;
        assert_eq!(parse_reply(&frame, GATEWAY_IP), None);
    }

    #[test]
    fn replies_from_other_addresses_are_ignored() {
        assert_eq!(parse_reply(&reply(), Ipv4Addr::new(203, 0, 113, 99)), None);
    }

    #[test]
    fn short_frames_are_ignored() {
        let frame = reply();
        for len in [0, 13, 14, 41] {
            assert_eq!(parse_reply(&frame[..len], GATEWAY_IP), None, "{len} bytes");
        }
    }

    #[test]
    fn other_protocols_and_address_kinds_are_ignored() {
        // Ethertype, hardware type, protocol type, hardware length, protocol length.
        for (at, value) in [(12, 0x86), (15, 6), (16, 0x86), (18, 8), (19, 16)] {
            let mut frame = reply();
            frame[at] = value;
            assert_eq!(parse_reply(&frame, GATEWAY_IP), None, "byte {at} = {value}");
        }
    }

    #[test]
    fn zero_and_group_sender_addresses_are_ignored() {
        for mac in [[0; 6], BROADCAST, [0x01, 0, 0x5e, 0, 0, 1]] {
            let mut frame = reply();
            frame[22..28].copy_from_slice(&mac);
            assert_eq!(parse_reply(&frame, GATEWAY_IP), None, "{mac:02x?}");
        }
    }
}
