//! Neighbour discovery (RFC 4861) frames: the solicitation for an IPv6 neighbour and
//! its advertisement.
use std::net::Ipv6Addr;

use super::{usable_mac, ETH_HLEN};

const IPV6_HLEN: usize = 40;
const IPPROTO_ICMPV6: u8 = 58;
const NEIGH_SOLICIT: u8 = 135;
const NEIGH_ADVERT: u8 = 136;
const OPT_SOURCE_LL_ADDR: u8 = 1;
const OPT_TARGET_LL_ADDR: u8 = 2;
/// Hop limit of every ND message; one with another did not come from the link.
const HOP_LIMIT: u8 = 255;
/// A solicitation with the source link-layer option: ICMPv6 header (4), reserved (4),
/// target (16), option (8).
const NS_LEN: usize = 32;
/// An advertisement without options: ICMPv6 header, flags, target.
const NA_MIN_LEN: usize = 24;
const ICMP_OFF: usize = ETH_HLEN + IPV6_HLEN;

/// The solicited-node multicast address of `target` (RFC 4291 2.7.1).
fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ])
}

/// The ICMPv6 checksum (RFC 4443 2.3) of `message` from `src` to `dst`.
fn checksum(src: &[u8; 16], dst: &[u8; 16], message: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for word in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([word[0], *word.get(1).unwrap_or(&0)]));
        }
    };
    add(src);
    add(dst);
    add(&(message.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A multicast neighbour solicitation: who has `target`, from `source` at `source_mac`.
pub fn solicitation(source_mac: [u8; 6], source: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(target);
    let g = group.octets();
    let mut frame = Vec::with_capacity(ICMP_OFF + NS_LEN);
    frame.extend_from_slice(&[0x33, 0x33, g[12], g[13], g[14], g[15]]);
    frame.extend_from_slice(&source_mac);
    frame.extend_from_slice(&(libc::ETH_P_IPV6 as u16).to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(NS_LEN as u16).to_be_bytes());
    frame.extend_from_slice(&[IPPROTO_ICMPV6, HOP_LIMIT]);
    frame.extend_from_slice(&source.octets());
    frame.extend_from_slice(&g);
    let mut message = vec![NEIGH_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(&target.octets());
    message.extend_from_slice(&[OPT_SOURCE_LL_ADDR, 1]);
    message.extend_from_slice(&source_mac);
    let check = checksum(&source.octets(), &g, &message);
    message[2..4].copy_from_slice(&check.to_be_bytes());
    frame.extend_from_slice(&message);
    frame
}

/// The target link-layer address of `frame` if it is a valid neighbour advertisement
/// for `target` (from the link, checksum right) that names a usable unicast address.
pub fn parse_advertisement(frame: &[u8], target: Ipv6Addr) -> Option<[u8; 6]> {
    let ip = frame.get(ETH_HLEN..ICMP_OFF)?;
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let is_advert = frame[12..14] == (libc::ETH_P_IPV6 as u16).to_be_bytes()
        && ip[0] >> 4 == 6
        && ip[6] == IPPROTO_ICMPV6
        && ip[7] == HOP_LIMIT
        && payload >= NA_MIN_LEN;
    if !is_advert {
        return None;
    }
    let message = frame.get(ICMP_OFF..ICMP_OFF + payload)?;
    let (src, dst): ([u8; 16], [u8; 16]) =
        (ip[8..24].try_into().ok()?, ip[24..40].try_into().ok()?);
    if message[0..2] != [NEIGH_ADVERT, 0]
        || message[8..24] != target.octets()
        || checksum(&src, &dst, message) != 0
    {
        return None;
    }
    // Options: kind, length in 8-byte units, value.
    let mut options = &message[NA_MIN_LEN..];
    while let [kind, len, ..] = *options {
        let len = usize::from(len) * 8;
        if len == 0 || len > options.len() {
            return None;
        }
        if kind == OPT_TARGET_LL_ADDR && len == 8 {
            return usable_mac(options[2..8].try_into().ok()?);
        }
        options = &options[len..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const GATEWAY: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];
    const MY_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x10);
    const GATEWAY_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0xab, 0xcd01);

    /// The gateway's answer to `solicitation(ME, MY_IP, GATEWAY_IP)`, checksum and all.
    fn advertisement() -> Vec<u8> {
        let mut message = vec![NEIGH_ADVERT, 0, 0, 0, 0x60, 0, 0, 0];
        message.extend_from_slice(&GATEWAY_IP.octets());
        message.extend_from_slice(&[OPT_TARGET_LL_ADDR, 1]);
        message.extend_from_slice(&GATEWAY);
        let check = checksum(&GATEWAY_IP.octets(), &MY_IP.octets(), &message);
        message[2..4].copy_from_slice(&check.to_be_bytes());
        let mut frame = Vec::new();
        frame.extend_from_slice(&ME);
        frame.extend_from_slice(&GATEWAY);
        frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0, 0, 32, 58, 255]);
        frame.extend_from_slice(&GATEWAY_IP.octets());
        frame.extend_from_slice(&MY_IP.octets());
        frame.extend_from_slice(&message);
        frame
    }

    #[test]
    fn the_solicitation_goes_to_the_targets_solicited_node_group() {
        let frame = solicitation(ME, MY_IP, GATEWAY_IP);
        assert_eq!(frame.len(), ICMP_OFF + NS_LEN);
        assert_eq!(frame[0..6], [0x33, 0x33, 0xff, 0xab, 0xcd, 0x01]);
        assert_eq!(frame[6..12], ME);
        assert_eq!(frame[12..14], [0x86, 0xdd]);
        // Payload 32, ICMPv6, hop limit 255.
        assert_eq!(frame[18..22], [0, 32, 58, 255]);
        assert_eq!(frame[22..38], MY_IP.octets());
        assert_eq!(
            Ipv6Addr::from(<[u8; 16]>::try_from(&frame[38..54]).unwrap()),
            "ff02::1:ffab:cd01".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(frame[54..56], [NEIGH_SOLICIT, 0]);
        assert_eq!(frame[62..78], GATEWAY_IP.octets());
        assert_eq!(frame[78..86], [1, 1, 0x02, 0, 0, 0, 0, 0x0a]);
        // A checksum over the pseudo-header and the message adds up to zero.
        let (src, dst) = (MY_IP.octets(), frame[38..54].try_into().unwrap());
        assert_eq!(checksum(&src, &dst, &frame[ICMP_OFF..]), 0);
    }

    #[test]
    fn an_advertisement_from_the_target_gives_its_mac() {
        assert_eq!(
            parse_advertisement(&advertisement(), GATEWAY_IP),
            Some(GATEWAY)
        );
    }

    #[test]
    fn solicitations_and_other_targets_are_ignored() {
        let ns = solicitation(GATEWAY, GATEWAY_IP, MY_IP);
        assert_eq!(parse_advertisement(&ns, MY_IP), None);
        let other: Ipv6Addr = "2001:db8:e::99".parse().unwrap();
        assert_eq!(parse_advertisement(&advertisement(), other), None);
    }

    #[test]
    fn a_wrong_checksum_or_hop_limit_is_ignored() {
        let mut frame = advertisement();
        frame[ICMP_OFF + 2] ^= 1;
        assert_eq!(parse_advertisement(&frame, GATEWAY_IP), None);
        let mut frame = advertisement();
        frame[21] = 64;
        assert_eq!(parse_advertisement(&frame, GATEWAY_IP), None);
    }

    #[test]
    fn short_and_optionless_frames_are_ignored() {
        let frame = advertisement();
        for len in [0, 13, 53, 60, 77] {
            assert_eq!(
                parse_advertisement(&frame[..len], GATEWAY_IP),
                None,
                "{len} bytes"
            );
        }
        // Without the option there is no address to take (the payload says 24 bytes).
        let mut bare = frame[..ICMP_OFF + NA_MIN_LEN].to_vec();
        bare[19] = NA_MIN_LEN as u8;
        let check = checksum(&GATEWAY_IP.octets(), &MY_IP.octets(), &{
            let mut m = bare[ICMP_OFF..].to_vec();
            m[2..4].copy_from_slice(&[0, 0]);
            m
        });
        bare[ICMP_OFF + 2..ICMP_OFF + 4].copy_from_slice(&check.to_be_bytes());
        assert_eq!(parse_advertisement(&bare, GATEWAY_IP), None);
    }

    #[test]
    fn a_zero_or_group_address_is_ignored() {
        for mac in [[0; 6], [0x33, 0x33, 0, 0, 0, 1]] {
            let mut frame = advertisement();
            frame[ICMP_OFF + 26..ICMP_OFF + 32].copy_from_slice(&mac);
            // Keep the checksum right: the address is all that is wrong.
            frame[ICMP_OFF + 2..ICMP_OFF + 4].copy_from_slice(&[0, 0]);
            let ip: [u8; 16] = frame[22..38].try_into().unwrap();
            let to: [u8; 16] = frame[38..54].try_into().unwrap();
            let check = checksum(&ip, &to, &frame[ICMP_OFF..]);
            frame[ICMP_OFF + 2..ICMP_OFF + 4].copy_from_slice(&check.to_be_bytes());
            assert_eq!(parse_advertisement(&frame, GATEWAY_IP), None, "{mac:02x?}");
        }
    }
}
