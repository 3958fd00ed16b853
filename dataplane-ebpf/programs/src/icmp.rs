//! ICMP errors: the connection an error is about, from the header it quotes.
use crate::{
    conntrack,
    flow::{self, Flow, FAMILY_V4},
    ipv4, ipv6,
    l4::{self, ICMP_HLEN},
    packet::Packet,
};

/// Offset beyond which `related` looks at no quote.
const MAX_L4_OFF: usize = 0x3fff;

/// Whether the ICMP error `flow` quotes a packet of a live connection of its zone (the
/// quote is the reverse of the error's own direction, which the canonical key makes no
/// matter). A quote cut short, or of no trackable connection, is of none. Overwrites
/// `flow.key` with the quoted packet's key (the caller is done with it). A BPF
/// function of its own: the quoted header and the pulls' spills stay off the stack
/// frame of `policy::check`.
#[inline(never)]
pub fn related(pkt: &mut Packet, flow: &mut Flow, now: u64) -> bool {
    // The flow is in map memory: the verifier knows nothing of its offsets until they
    // are bounded again. No transport header starts this far in.
    if flow.l4_off > MAX_L4_OFF {
        return false;
    }
    let off = flow.l4_off + ICMP_HLEN;
    let end = flow.end;
    let key = &mut flow.key;
    let family = key.family;
    *key = flow::empty_key(key.zone, family, 0);
    let l4_off;
    if family == FAMILY_V4 {
        let Some(ip) = ipv4::quoted(pkt, off, end) else {
            return false;
        };
        if !ip.first_fragment {
            return false;
        }
        flow::set_addrs4(key, &ip);
        (key.protocol, l4_off) = (ip.proto, ip.l4_off);
    } else {
        let Some(quoted) = ipv6::quoted(pkt, off, end, &mut key.addr_lo, &mut key.addr_hi) else {
            return false;
        };
        (key.protocol, l4_off) = quoted;
    }
    let (sport, dport) = if l4::has_ports(key.protocol) {
        match l4::ports(pkt, l4_off, end) {
            Ok(ports) => ports,
            Err(_) => return false,
        }
    } else if flow::is_icmp(family, key.protocol) {
        let Ok((kind, _, id)) = l4::icmp(pkt, l4_off, end) else {
            return false;
        };
        // Only echo is tracked (and errors never quote errors).
        if kind != flow::echo_request(family) && kind != flow::echo_reply(family) {
            return false;
        }
        (id, id)
    } else {
        (0, 0)
    };
    flow::sort_key(key, sport, dport);
    conntrack::lookup(key, now).is_some()
}
