//! A reference evaluator of security groups, in plain Rust, over the model — not over the
//! compiled tables: the Networking API's semantics written down a second time, with a
//! connection table of its own, for differential tests against the eBPF datapath.
//!
//! Semantics: a port with port security has a policy, the union of the rules of its
//! groups; rules only allow. Stateful groups track connections per port: every packet
//! of a tracked connection passes while the *current* rules still allow the packet that
//! opened it (a connection they no longer allow is cut), and ICMP errors about a tracked
//! connection pass as related. Stateless groups judge every packet by the rules.
//! Neighbour discovery, MLD and DHCP client requests always pass.

use std::{collections::HashMap, net::IpAddr};

use dataplane_abi::DropReason;
use dataplane_agent::core::model::{
    Direction, EtherType, Port, Protocol, SecurityGroupRule, State,
};

use crate::frames::{
    proto::{ICMP, ICMPV6, TCP, UDP},
    tcp_flags,
};

/// One IP packet between two ports, as a security group sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// TCP/UDP-like ports; for ICMP echo, the identifier in both.
    pub sport: u16,
    pub dport: u16,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// For an ICMP error: the packet it is about (as that packet was sent).
    pub embedded: Option<Box<Flow>>,
    /// False for a non-first fragment: no transport header to judge.
    pub first_fragment: bool,
}

impl Flow {
    pub fn is_icmp(&self) -> bool {
        matches!(self.protocol, ICMP | ICMPV6)
    }

    fn has_ports(&self) -> bool {
        matches!(self.protocol, 6 | 17 | 33 | 132 | 136)
    }

    pub fn is_icmp_error(&self) -> bool {
        match (self.src, self.protocol) {
            (IpAddr::V4(_), ICMP) => matches!(self.icmp_type, 3 | 4 | 5 | 11 | 12),
            (IpAddr::V6(_), ICMPV6) => matches!(self.icmp_type, 1..=4),
            _ => false,
        }
    }

    fn is_echo_request(&self) -> bool {
        matches!(
            (self.src, self.icmp_type),
            (IpAddr::V4(_), 8) | (IpAddr::V6(_), 128)
        )
    }

    fn is_echo(&self) -> bool {
        match (self.src, self.protocol) {
            (IpAddr::V4(_), ICMP) => matches!(self.icmp_type, 0 | 8),
            (IpAddr::V6(_), ICMPV6) => matches!(self.icmp_type, 128 | 129),
            _ => false,
        }
    }

    /// Passes whatever the rules say (Neutron's firewall allows these itself).
    fn always_allowed(&self, direction: Direction) -> bool {
        let neighbour_discovery = matches!(self.src, IpAddr::V6(_))
            && self.protocol == ICMPV6
            && self.first_fragment
            && (matches!(self.icmp_type, 130..=133 | 135..=137 | 143)
                || (self.icmp_type == 134 && direction == Direction::Ingress));
        let dhcp_client = direction == Direction::Egress
            && self.protocol == UDP
            && self.first_fragment
            && (self.sport, self.dport)
                == match self.src {
                    IpAddr::V4(_) => (68, 67),
                    IpAddr::V6(_) => (546, 547),
                };
        neighbour_discovery || dhcp_client
    }

    fn tcp_flags_invalid(&self) -> bool {
        use tcp_flags::*;
        self.protocol == TCP
            && self.first_fragment
            && (self.tcp_flags & (SYN | FIN) == SYN | FIN
                || self.tcp_flags & (SYN | RST) == SYN | RST
                || self.tcp_flags == 0)
    }

    /// Packets that open a tracked connection; other ICMP is judged per packet.
    fn trackable(&self) -> bool {
        !self.is_icmp() || self.is_echo()
    }

    /// The endpoints in an order both directions agree on.
    fn canonical(&self) -> ConnKey {
        let (sport, dport) = if self.has_ports() || self.is_echo() {
            (self.sport, self.dport)
        } else {
            (0, 0)
        };
        let a = (self.src, sport);
        let b = (self.dst, dport);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        ConnKey {
            protocol: self.protocol,
            lo,
            hi,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    protocol: u8,
    lo: (IpAddr, u16),
    hi: (IpAddr, u16),
}

/// TCP progress, as far as verdicts depend on it: a SYN reopens a closed connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TcpState {
    SynSent,
    SynRecv,
    Established,
    Closing,
    Closed,
}

#[derive(Clone, Debug)]
struct Conn {
    direction: Direction,
    opening: Flow,
    /// A packet came back from the other end.
    confirmed: bool,
    tcp: TcpState,
    fin_from_opener: bool,
    fin_from_other: bool,
}

impl Conn {
    fn sent_by_opener(&self, flow: &Flow) -> bool {
        (flow.src, flow.sport) == (self.opening.src, self.opening.sport)
    }

    /// RST closes; FINs from both ends close; a SYN+ACK answers the SYN, the ACK after
    /// it establishes.
    fn advance(&mut self, flow: &Flow) {
        use tcp_flags::*;
        let reply = !self.sent_by_opener(flow);
        if flow.tcp_flags & RST != 0 {
            self.tcp = TcpState::Closed;
            return;
        }
        if flow.tcp_flags & FIN != 0 {
            if reply {
                self.fin_from_other = true;
            } else {
                self.fin_from_opener = true;
            }
            self.tcp =
                if (self.fin_from_opener && self.fin_from_other) || self.tcp == TcpState::Closed {
                    TcpState::Closed
                } else {
                    TcpState::Closing
                };
            return;
        }
        let syn_ack = flow.tcp_flags & (SYN | ACK);
        self.tcp = match self.tcp {
            TcpState::SynSent if reply && syn_ack == SYN | ACK => TcpState::SynRecv,
            TcpState::SynRecv if !reply && syn_ack == ACK => TcpState::Established,
            other => other,
        };
    }
}

/// What a port's security groups do with a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SgVerdict {
    Pass,
    Drop(DropReason),
}

fn judged_by_rules(allowed: bool) -> SgVerdict {
    if allowed {
        SgVerdict::Pass
    } else {
        SgVerdict::Drop(DropReason::PolicyDenied)
    }
}

/// The reference's own connection tables, one per port.
#[derive(Default)]
pub struct SgReference {
    connections: HashMap<(String, ConnKey), Conn>,
}

impl SgReference {
    /// Judges `flow` at `port`, leaving it (`Egress`) or reaching it (`Ingress`).
    pub fn judge(
        &mut self,
        state: &State,
        port: &Port,
        direction: Direction,
        flow: &Flow,
    ) -> SgVerdict {
        let network = &state.networks[&port.network_id];
        if !port
            .port_security_enabled
            .unwrap_or(network.port_security_enabled)
        {
            return SgVerdict::Pass;
        }
        if flow.always_allowed(direction) {
            return SgVerdict::Pass;
        }
        let stateful = port
            .security_group_ids
            .first()
            .is_some_and(|id| state.security_groups[id].stateful);
        let allowed = |flow: &Flow| policy_allows(state, port, direction, flow);
        if !stateful {
            return judged_by_rules(allowed(flow));
        }

        if flow.is_icmp_error() {
            // About a tracked connection, or allowed by a rule; else about nothing.
            let related = flow.embedded.as_ref().is_some_and(|inner| {
                inner.first_fragment
                    && inner.trackable()
                    && self
                        .connections
                        .contains_key(&(port.id.clone(), inner.canonical()))
            });
            return if related || allowed(flow) {
                SgVerdict::Pass
            } else {
                SgVerdict::Drop(DropReason::CtInvalid)
            };
        }
        if !flow.trackable() || !flow.first_fragment {
            return judged_by_rules(allowed(flow));
        }
        if flow.tcp_flags_invalid() {
            return SgVerdict::Drop(DropReason::CtInvalid);
        }

        let key = (port.id.clone(), flow.canonical());
        if let Some(conn) = self.connections.get_mut(&key) {
            let from_opener = conn.sent_by_opener(flow);
            let syn_only = flow.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
            // An echo request from the answering end, or a reply from the asking one,
            // is not part of the exchange: judged on its own.
            if flow.is_echo() && flow.is_echo_request() != from_opener {
                return judged_by_rules(allowed(flow));
            }
            if flow.protocol == TCP && syn_only && conn.tcp == TcpState::Closed {
                self.connections.remove(&key);
                return self.open(key, direction, flow, allowed(flow));
            }
            if !policy_allows(state, port, conn.direction, &conn.opening) {
                self.connections.remove(&key);
                return SgVerdict::Drop(DropReason::ConnectionRevoked);
            }
            if flow.protocol == TCP {
                if flow.tcp_flags & tcp_flags::RST != 0 && !conn.confirmed {
                    // Refused before it was confirmed: nothing left to track.
                    self.connections.remove(&key);
                    return SgVerdict::Pass;
                }
                conn.advance(flow);
            }
            if !from_opener {
                conn.confirmed = true;
            }
            return SgVerdict::Pass;
        }
        self.open(key, direction, flow, allowed(flow))
    }

    /// A packet no connection knows: judged by the rules and, if allowed, tracked.
    fn open(
        &mut self,
        key: (String, ConnKey),
        direction: Direction,
        flow: &Flow,
        allowed: bool,
    ) -> SgVerdict {
        use tcp_flags::*;
        let tcp = flow.protocol == TCP;
        if tcp && flow.tcp_flags & (SYN | ACK) == SYN | ACK {
            // The answer to a SYN nobody sent.
            return SgVerdict::Drop(DropReason::CtInvalid);
        }
        if !allowed {
            return SgVerdict::Drop(DropReason::PolicyDenied);
        }
        if flow.is_echo() && !flow.is_echo_request() {
            // Only a request opens an echo exchange.
            return SgVerdict::Pass;
        }
        let mut conn = Conn {
            direction,
            opening: flow.clone(),
            confirmed: false,
            tcp: TcpState::SynSent,
            fin_from_opener: false,
            fin_from_other: false,
        };
        if tcp && flow.tcp_flags & SYN == 0 {
            // Mid-stream (after a restart or flush): picked up as established, as
            // Linux's nf_conntrack_tcp_loose does.
            conn.confirmed = true;
            conn.tcp = TcpState::Established;
            conn.advance(flow);
        }
        self.connections.insert(key, conn);
        SgVerdict::Pass
    }

    /// Forgets a port's connections (as a flush does).
    pub fn flush(&mut self, port_id: &str) {
        self.connections.retain(|(port, _), _| port != port_id);
    }
}

/// Whether any rule of the port's groups allows `flow` in `direction`.
pub fn policy_allows(state: &State, port: &Port, direction: Direction, flow: &Flow) -> bool {
    port.security_group_ids
        .iter()
        .flat_map(|id| &state.security_groups[id].rules)
        .any(|rule| rule_allows(state, rule, direction, flow))
}

fn rule_allows(state: &State, rule: &SecurityGroupRule, direction: Direction, flow: &Flow) -> bool {
    let family_matches = matches!(
        (rule.ethertype, flow.src),
        (EtherType::Ipv4, IpAddr::V4(_)) | (EtherType::Ipv6, IpAddr::V6(_))
    );
    if rule.direction != direction || !family_matches {
        return false;
    }
    let protocol = match rule.protocol {
        Protocol::Any => return remote_matches(state, rule, direction, flow),
        // `icmp` in an IPv6 rule means ICMPv6, as in Neutron.
        Protocol::Number(1) if rule.ethertype == EtherType::Ipv6 => ICMPV6,
        Protocol::Number(number) => number,
    };
    if protocol != flow.protocol {
        return false;
    }
    let detail_matches = if Protocol::Number(protocol).has_ports() {
        match (rule.port_range_min, rule.port_range_max) {
            (None, _) => true,
            (Some(min), max) => {
                let max = max.unwrap_or(min);
                if flow.first_fragment {
                    (min..=max).contains(&u32::from(flow.dport))
                } else {
                    // No port to judge: only a rule for every port allows a fragment.
                    min == 0 && max == 65535
                }
            }
        }
    } else if Protocol::Number(protocol).is_icmp() {
        match (rule.port_range_min, rule.port_range_max) {
            (None, _) => true,
            (Some(_), _) if !flow.first_fragment => false,
            (Some(kind), None) => u32::from(flow.icmp_type) == kind,
            (Some(kind), Some(code)) => {
                u32::from(flow.icmp_type) == kind && u32::from(flow.icmp_code) == code
            }
        }
    } else {
        true
    };
    detail_matches && remote_matches(state, rule, direction, flow)
}

/// The remote end (destination of what leaves the port, source of what reaches it) is
/// in the rule's prefix, or is an address of a port in its remote group.
fn remote_matches(
    state: &State,
    rule: &SecurityGroupRule,
    direction: Direction,
    flow: &Flow,
) -> bool {
    let remote = match direction {
        Direction::Egress => flow.dst,
        Direction::Ingress => flow.src,
    };
    if let Some(prefix) = rule.remote_ip_prefix {
        return prefix.contains(&remote);
    }
    let Some(group) = &rule.remote_group_id else {
        return true;
    };
    state
        .ports
        .values()
        .filter(|member| member.security_group_ids.contains(group))
        .any(|member| {
            member
                .fixed_ips
                .iter()
                .any(|fixed| fixed.ip_address == remote)
                || member
                    .allowed_address_pairs
                    .iter()
                    .any(|pair| pair.ip_address.contains(&remote))
        })
}
