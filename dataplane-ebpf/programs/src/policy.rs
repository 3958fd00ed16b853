//! Security groups (Neutron semantics): IP traffic of a port with `POLICY` must be
//! allowed by a rule of its policy, egress rules for what the VM sends (remote = the
//! destination), ingress rules for what it receives (remote = the source). Two lookups
//! whatever the number of rules (see `dataplane_abi::policy`). Stateful ports
//! hand the packet to `conntrack`.
use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use dataplane_abi::{
    port_flags, sg_direction, CtKey, DropReason, PortInfo, RemoteKey4, RemoteKey6, RuleKey,
    REMOTE4_FULL_BITS, REMOTE6_FULL_BITS, RULE_LOOKUP_BITS, RULE_PROTOCOL_BITS,
};

use crate::{
    conntrack,
    flow::{self, Flow, Kind, FAMILY_V4, FAMILY_V6},
    ipv4::Ipv4,
    ipv6::Ipv6,
    l4::{IPPROTO_ICMPV6, IPPROTO_UDP},
    maps::{
        RULE_STATS, SG_FLOW, SG_HOST4, SG_HOST6, SG_REMOTE4, SG_REMOTE6, SG_RULES, SG_RULE_PORTS,
    },
    packet::Packet,
};

const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
const DHCP6_CLIENT_PORT: u16 = 546;
const DHCP6_SERVER_PORT: u16 = 547;
const ICMP6_ROUTER_ADVERT: u8 = 134;

/// `classify` found no rule.
pub const NO_RULE: u32 = u32::MAX;

/// Applies the port's security groups, in `direction` (`sg_direction`), to the IP
/// packet whose header `ipv4::parse` or `ipv6::parse` read (`v4` or `v6`). A BPF
/// function of its own: the verifier walks it once per call site, not once per path
/// into the flood loop behind it, and its stack is not `port_ingress`'s.
#[inline(never)]
pub fn check(
    ctx: &TcContext,
    port: &PortInfo,
    v4: Option<&Ipv4>,
    v6: Option<&Ipv6>,
    direction: u8,
) -> Result<(), DropReason> {
    let mut pkt = Packet::new(ctx);
    let Some(flow) = SG_FLOW.get_ptr_mut(0) else {
        // Index 0 of a one-entry array: cannot happen. Closed, should it ever.
        return Err(DropReason::PolicyDenied);
    };
    // SAFETY: per-CPU value, only touched by the program running on this CPU, and only
    // within this call (see `SG_FLOW`).
    let flow = unsafe { &mut *flow };
    *flow = Flow::new(port.port_slot);
    flow::parse(&mut pkt, v4, v6, flow)?;
    if always_allowed(flow, direction) {
        return Ok(());
    }
    let bytes = u64::from(ctx.len());
    if port.flags & port_flags::STATEFUL == 0 {
        return allow(port, flow, direction, bytes);
    }
    conntrack::track(&mut pkt, port, flow, direction, bytes)
}

/// What Neutron's firewall lets through before any rule: neighbour discovery and MLD
/// both ways (router advertisements only towards the VM), DHCP client requests out.
#[inline(always)]
fn always_allowed(flow: &Flow, direction: u8) -> bool {
    let (family, protocol) = (flow.key.family, flow.key.protocol);
    if flow.kind == Kind::Fragment {
        return false;
    }
    if family == FAMILY_V6 && protocol == IPPROTO_ICMPV6 {
        return match flow.icmp_type() {
            130..=133 | 135..=137 | 143 => true,
            ICMP6_ROUTER_ADVERT => direction == sg_direction::INGRESS,
            _ => false,
        };
    }
    direction == sg_direction::EGRESS
        && protocol == IPPROTO_UDP
        && flow.ports()
            == if family == FAMILY_V4 {
                (DHCP_CLIENT_PORT, DHCP_SERVER_PORT)
            } else {
                (DHCP6_CLIENT_PORT, DHCP6_SERVER_PORT)
            }
}

/// A rule lookup for the connection of a `CtKey` (which has the addresses, family and
/// protocol).
pub struct Query {
    pub policy_id: u32,
    pub direction: u8,
    /// The remote address is the key's `hi` endpoint (else `lo`).
    pub remote_hi: bool,
    /// `RuleKey::port`.
    pub port: [u8; 2],
    /// Prefix length of the rule lookup: `RULE_LOOKUP_BITS`, or `RULE_PROTOCOL_BITS`
    /// when there is no transport header.
    pub bits: u32,
}

/// The slot of the rule that allows `q` of the connection `key`, or `NO_RULE`: the
/// remote address's class in the policy, then the class's rule for the protocol and
/// port.
#[inline(never)]
pub fn classify(key: &CtKey, q: &Query) -> u32 {
    let remote = if q.remote_hi {
        &key.addr_hi
    } else {
        &key.addr_lo
    };
    // Each lookup tries the full-length entries first (see `dataplane_abi::policy`).
    // SAFETY (the hash lookups): the agent writes a set only while no packet reads it,
    // and the values are copied out at once.
    let class = if key.family == FAMILY_V4 {
        let data = RemoteKey4 {
            policy_id: q.policy_id,
            direction: q.direction,
            _pad: [0; 3],
            addr: [remote[0], remote[1], remote[2], remote[3]],
        };
        unsafe { SG_HOST4.get(&data) }
            .or_else(|| SG_REMOTE4.get(Key::new(REMOTE4_FULL_BITS, data)))
            .copied()
    } else {
        let data = RemoteKey6 {
            policy_id: q.policy_id,
            direction: q.direction,
            _pad: [0; 3],
            addr: *remote,
        };
        unsafe { SG_HOST6.get(&data) }
            .or_else(|| SG_REMOTE6.get(Key::new(REMOTE6_FULL_BITS, data)))
            .copied()
    };
    let Some(class) = class else {
        return NO_RULE;
    };
    let data = RuleKey {
        class,
        protocol: key.protocol,
        port: q.port,
        _pad: 0,
    };
    // A lookup without a port (fragments, protocols without ports) stops short of the
    // full-length entries.
    let exact = if q.bits == RULE_LOOKUP_BITS {
        unsafe { SG_RULE_PORTS.get(&data) }
    } else {
        None
    };
    match exact.or_else(|| SG_RULES.get(Key::new(q.bits, data))) {
        Some(&slot) => slot,
        None => NO_RULE,
    }
}

/// The slot of the rule that allows `flow` in `direction`, or `NO_RULE`.
#[inline(always)]
pub fn rule(port: &PortInfo, flow: &Flow, direction: u8) -> u32 {
    let q = Query {
        policy_id: port.policy_id,
        direction,
        remote_hi: flow::remote_is_hi(direction, flow.from_lo),
        port: flow.rule_port,
        bits: if flow.kind == Kind::Fragment {
            RULE_PROTOCOL_BITS
        } else {
            RULE_LOOKUP_BITS
        },
    };
    classify(&flow.key, &q)
}

/// Counts a packet of `bytes` against the rule in `slot`.
#[inline(always)]
pub fn charge(slot: u32, bytes: u64) {
    if let Some(stats) = RULE_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, only touched by the program running on this CPU.
        let stats = unsafe { &mut *stats };
        stats.packets += 1;
        stats.bytes += bytes;
    }
}

/// Whether a rule allows `flow` in `direction` (`PolicyDenied` if none does); charges
/// the packet to that rule.
#[inline(always)]
pub fn allow(port: &PortInfo, flow: &Flow, direction: u8, bytes: u64) -> Result<(), DropReason> {
    let slot = rule(port, flow, direction);
    if slot == NO_RULE {
        return Err(DropReason::PolicyDenied);
    }
    charge(slot, bytes);
    Ok(())
}
