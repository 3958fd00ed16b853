//! Packet tests of the L2 port path (`port_ingress`, `port_egress`) with
//! BPF_PROG_TEST_RUN. Needs root.
//!
//! Every test builds the same node in a namespace of its own: two networks, A and B,
//! and ports on veth devices (the programs are not attached; the devices exist so that
//! the kernel resolves the test run's ifindex and the flood's clone targets):
//!
//! | port | network | flags                         | flood flags     | notes                      |
//! |------|---------|-------------------------------|-----------------|----------------------------|
//! | p1   | A       | up, port security             |                 |                            |
//! | p2   | A       | up, port security             |                 |                            |
//! | p3   | A       | up                            | ACCEPTS_UNKNOWN | port security off          |
//! | p4   | A       | up, port security, HAS_NET4/6 | ACCEPTS_UNKNOWN | allowed address pairs      |
//! | p5   | B       | up, port security             |                 | alone in its network       |
//! | p6   | A       | port security (admin down)    |                 | not in the flood set       |
//!
//! plus `x0`, a device with no port.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{ensure, Result};
use aya::programs::tc::TcAttachType;
use dataplane_abi::{
    ct_state, flood_flags, port_flags, sg_direction, verdict_action, CtEntry, DropReason, FdbEntry,
    FloodEntry, PortInfo, PortStats, MARK_FROM_DATAPATH,
};
use dataplane_tests::{
    frames::{self, ethertype, offsets, proto, tcp_flags, Ext, Mac, BROADCAST},
    netns::NetNs,
    testrun::{
        ct_key, CtTable, Harness, Outcome, RuleMatch, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        TEST_MAX_ENTRIES,
    },
};

const NET_A: u32 = 1;
const NET_B: u32 = 2;

struct Port {
    dev: &'static str,
    peer: &'static str,
    slot: u32,
    network: u32,
    flags: u32,
    flood: Option<u32>,
    mac: Mac,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    ll6: Ipv6Addr,
}

const UP_SECURE: u32 = port_flags::ADMIN_UP | port_flags::PORT_SECURITY;

const fn port(n: u8, network: u32, flags: u32, flood: Option<u32>) -> Port {
    const DEVS: [(&str, &str); 6] = [
        ("p1", "p1vm"),
        ("p2", "p2vm"),
        ("p3", "p3vm"),
        ("p4", "p4vm"),
        ("p5", "p5vm"),
        ("p6", "p6vm"),
    ];
    let (dev, peer) = DEVS[n as usize - 1];
    Port {
        dev,
        peer,
        slot: n as u32,
        network,
        flags,
        flood,
        mac: [0x02, 0xaa, 0, 0, 0, n],
        ip4: Ipv4Addr::new(10, 0, 0, n),
        ip6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n as u16),
        ll6: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, n as u16),
    }
}

const P1: Port = port(1, NET_A, UP_SECURE, Some(0));
const P2: Port = port(2, NET_A, UP_SECURE, Some(0));
const P3: Port = port(
    3,
    NET_A,
    port_flags::ADMIN_UP,
    Some(flood_flags::ACCEPTS_UNKNOWN),
);
const P4: Port = port(
    4,
    NET_A,
    UP_SECURE | port_flags::HAS_NET4 | port_flags::HAS_NET6,
    Some(flood_flags::ACCEPTS_UNKNOWN),
);
const P5: Port = port(5, NET_B, UP_SECURE, Some(0));
const P6: Port = port(6, NET_A, port_flags::PORT_SECURITY, None);
const PORTS: [&Port; 6] = [&P1, &P2, &P3, &P4, &P5, &P6];

/// p4's allowed address pairs: another MAC with an exact address and a prefix each.
const PAIR_MAC: Mac = [0x02, 0xbb, 0, 0, 0, 4];
const PAIR_IP4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const PAIR_NET4: &str = "10.1.0.0/24";
const PAIR_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const PAIR_NET6: &str = "fd00:1::/64";

const STRANGER_MAC: Mac = [0x02, 0xee, 0, 0, 0, 0x99];
const UNKNOWN_MAC: Mac = [0x02, 0xcc, 0, 0, 0, 0x42];

/// The node of the module docs, programmed, in the namespace of the running thread.
struct Node {
    h: Harness,
    ifindex: [u32; 6],
    /// `x0`: a device without a port.
    stray: u32,
}

/// Builds the node in a fresh namespace and runs `body` on a thread inside it.
fn with_node(tag: &str, body: impl FnOnce(&mut Node) -> Result<()> + Send) -> Result<()> {
    with_node_traced(tag, true, body)
}

/// As [`with_node`]; `trace: false` loads the programs as production does.
fn with_node_traced(
    tag: &str,
    trace: bool,
    body: impl FnOnce(&mut Node) -> Result<()> + Send,
) -> Result<()> {
    let ns = NetNs::new(tag)?;
    let mut ifindex = [0; 6];
    for (i, p) in PORTS.iter().enumerate() {
        ifindex[i] = ns.add_veth(p.dev, None, p.peer)?;
        ns.set_mac(p.peer, p.mac)?;
    }
    let stray = ns.add_veth("x0", None, "x0vm")?;
    ns.run(move || {
        let mut node = Node {
            h: Harness::load_with_trace(trace)?,
            ifindex,
            stray,
        };
        node.program()?;
        body(&mut node)
    })?
}

impl Node {
    fn program(&mut self) -> Result<()> {
        let mut flood_a = Vec::new();
        let mut flood_b = Vec::new();
        for p in PORTS {
            let ifindex = self.ifx(p);
            let info = PortInfo {
                port_slot: p.slot,
                network_slot: p.network,
                flags: p.flags,
                mac: p.mac,
                _pad: [0; 2],
                policy_id: 0,
                policy_revision: 0,
            };
            self.h.add_port(ifindex, info)?;
            for addr in [p.ip6, p.ll6] {
                self.h.allow_ip6(p.slot, p.mac, addr)?;
            }
            self.h.allow_ip4(p.slot, p.mac, p.ip4)?;
            let entry = FdbEntry {
                ifindex,
                port_slot: p.slot,
                flags: 0,
            };
            self.h.add_fdb(p.network, p.mac, entry)?;
            if let Some(flags) = p.flood {
                let e = FloodEntry { ifindex, flags };
                if p.network == NET_A {
                    flood_a.push(e)
                } else {
                    flood_b.push(e)
                }
            }
        }
        self.h.set_flood(NET_A, &flood_a)?;
        self.h.set_flood(NET_B, &flood_b)?;
        self.h.allow_mac(P4.slot, PAIR_MAC)?;
        self.h.allow_ip4(P4.slot, PAIR_MAC, PAIR_IP4)?;
        self.h.allow_net4(P4.slot, PAIR_MAC, PAIR_NET4.parse()?)?;
        self.h.allow_ip6(P4.slot, PAIR_MAC, PAIR_IP6)?;
        self.h.allow_net6(P4.slot, PAIR_MAC, PAIR_NET6.parse()?)?;
        Ok(())
    }

    fn ifx(&self, p: &Port) -> u32 {
        self.ifindex[p.slot as usize - 1]
    }

    fn ifxs(&self, ports: &[&Port]) -> Vec<u32> {
        ports.iter().map(|p| self.ifx(p)).collect()
    }

    fn ingress(&mut self, p: &Port, frame: &[u8]) -> Result<Outcome> {
        self.h.ingress(self.ifx(p), frame)
    }

    fn stats(&self, p: &Port) -> Result<PortStats> {
        self.h.port_stats(p.slot)
    }

    /// `frame` from `p` is redirected to `to` alone, stamped with `p`'s slot.
    fn expect_unicast(&mut self, p: &Port, frame: &[u8], to: &Port, what: &str) -> Result<()> {
        let out = self.ingress(p, frame)?;
        let want = [self.ifx(to)];
        ensure!(
            out.ret == TC_ACT_REDIRECT
                && out.verdict.action == verdict_action::UNICAST
                && out.targets() == want,
            "{what}: expected unicast to {} ({want:?}), got {}",
            to.dev,
            describe(&out)
        );
        ensure!(
            out.mark == MARK_FROM_DATAPATH | p.slot,
            "{what}: mark {:#x}",
            out.mark
        );
        Ok(())
    }

    /// `frame` from `p` is flooded to exactly `to` (in flood set order).
    fn expect_flood(&mut self, p: &Port, frame: &[u8], to: &[&Port], what: &str) -> Result<()> {
        let out = self.ingress(p, frame)?;
        let want = self.ifxs(to);
        ensure!(
            out.ret == TC_ACT_REDIRECT
                && out.verdict.action == verdict_action::FLOOD
                && out.targets() == want,
            "{what}: expected flood to {want:?}, got {}",
            describe(&out)
        );
        ensure!(
            out.mark == MARK_FROM_DATAPATH | p.slot,
            "{what}: mark {:#x}",
            out.mark
        );
        Ok(())
    }

    /// `frame` from `p` is dropped for `reason`, counted once more against `p`.
    fn expect_drop(
        &mut self,
        p: &Port,
        frame: &[u8],
        reason: DropReason,
        what: &str,
    ) -> Result<()> {
        let before = self.stats(p)?.drops[reason as usize];
        let out = self.ingress(p, frame)?;
        ensure!(
            out.ret == TC_ACT_SHOT && out.drop_reason() == Some(reason),
            "{what}: expected drop {reason:?}, got {}",
            describe(&out)
        );
        let after = self.stats(p)?.drops[reason as usize];
        ensure!(
            after == before + 1,
            "{what}: {reason:?} counter {before} -> {after}"
        );
        Ok(())
    }
}

fn describe(out: &Outcome) -> String {
    match out.verdict.action {
        verdict_action::DROP => format!("ret {} drop {:?}", out.ret, out.drop_reason()),
        verdict_action::UNICAST => format!("ret {} unicast {:?}", out.ret, out.targets()),
        verdict_action::FLOOD => format!("ret {} flood {:?}", out.ret, out.targets()),
        other => format!("ret {} action {other}", out.ret),
    }
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// Drop counters of `stats` that are not zero, as (reason, count).
fn nonzero_drops(stats: &PortStats) -> Vec<(usize, u64)> {
    stats
        .drops
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, n)| *n != 0)
        .collect()
}

// ---------------------------------------------------------------------------------
// Forwarding

#[test]
fn unicast_to_known_mac_is_redirected_and_counted() -> Result<()> {
    with_node("unicast", |n| {
        let frames = [
            frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 5000, 53),
            frames::tcp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4),
            frames::icmp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4),
            frames::icmp6_echo_frame(P2.mac, P1.mac, P1.ip6, P2.ip6),
            frames::udp6_frame(P2.mac, P1.mac, P1.ll6, P2.ll6, 5000, 53),
        ];
        for (i, f) in frames.iter().enumerate() {
            n.expect_unicast(&P1, f, &P2, &format!("frame {i}"))?;
        }
        // The reverse direction, and into the port without port security.
        n.expect_unicast(
            &P2,
            &frames::udp4_frame(P1.mac, P2.mac, P2.ip4, P1.ip4, 1, 2),
            &P1,
            "p2->p1",
        )?;
        n.expect_unicast(
            &P1,
            &frames::tcp4_frame(P3.mac, P1.mac, P1.ip4, P3.ip4),
            &P3,
            "p1->p3",
        )?;

        let s = n.stats(&P1)?;
        let bytes: usize = frames.iter().map(Vec::len).sum::<usize>()
            + frames::tcp4_frame(P3.mac, P1.mac, P1.ip4, P3.ip4).len();
        ensure!(s.rx_packets == 6, "rx_packets {}", s.rx_packets);
        ensure!(
            s.rx_bytes == bytes as u64,
            "rx_bytes {} != {bytes}",
            s.rx_bytes
        );
        ensure!(s.tx_packets == 0 && s.tx_bytes == 0, "ingress counted tx");
        ensure!(
            nonzero_drops(&s).is_empty(),
            "drops {:?}",
            nonzero_drops(&s)
        );
        ensure!(n.stats(&P2)?.rx_packets == 1, "p2 rx");
        Ok(())
    })
}

#[test]
fn broadcast_is_flooded_to_the_other_ports_of_the_network_only() -> Result<()> {
    with_node("bcast", |n| {
        let arp = frames::arp_request_frame(P1.mac, P1.ip4, P2.ip4);
        // Not back to p1, not to p5 (network B), not to p6 (not in the flood set).
        n.expect_flood(&P1, &arp, &[&P2, &P3, &P4], "arp from p1")?;
        let arp = frames::arp_request_frame(P3.mac, P3.ip4, P2.ip4);
        n.expect_flood(&P3, &arp, &[&P1, &P2, &P4], "arp from p3")?;
        // IPv6 multicast (neighbour solicitation to the solicited-node group).
        let ns = frames::ns_frame(P1.mac, P1.ip6, P2.ip6, Some(P1.mac));
        n.expect_flood(&P1, &ns, &[&P2, &P3, &P4], "ns from p1")?;
        // p5 is alone in network B.
        let arp = frames::arp_request_frame(P5.mac, P5.ip4, P1.ip4);
        n.expect_drop(&P5, &arp, DropReason::NoFloodTarget, "arp from p5")?;
        ensure!(n.stats(&P5)?.rx_packets == 1, "p5 rx");
        Ok(())
    })
}

#[test]
fn unknown_unicast_goes_to_accepts_unknown_ports_only() -> Result<()> {
    with_node("unknown", |n| {
        let to_unknown =
            |p: &Port| frames::udp4_frame(UNKNOWN_MAC, p.mac, p.ip4, v4("10.0.0.200"), 1, 2);
        n.expect_flood(&P1, &to_unknown(&P1), &[&P3, &P4], "from p1")?;
        n.expect_flood(&P3, &to_unknown(&P3), &[&P4], "from p3")?;
        n.expect_flood(&P4, &to_unknown(&P4), &[&P3], "from p4")?;
        // Network B has no port that accepts unknown unicast.
        n.expect_drop(
            &P5,
            &to_unknown(&P5),
            DropReason::UnknownDestination,
            "from p5",
        )?;
        // A MAC of the other network is unknown in this one.
        let to_p5 = frames::udp4_frame(P5.mac, P1.mac, P1.ip4, P5.ip4, 1, 2);
        n.expect_flood(&P1, &to_p5, &[&P3, &P4], "p1 to p5's mac")?;
        // The sender's own MAC: never sent back.
        let to_self = frames::udp4_frame(P1.mac, P1.mac, P1.ip4, P1.ip4, 1, 2);
        n.expect_drop(
            &P1,
            &to_self,
            DropReason::UnknownDestination,
            "p1 to itself",
        )?;
        Ok(())
    })
}

#[test]
fn a_failed_flood_copy_is_counted_and_the_flood_goes_on() -> Result<()> {
    with_node("redirfail", |n| {
        // A stale entry first: cloning to an ifindex that does not exist fails.
        let stale = FloodEntry {
            ifindex: 4242,
            flags: 0,
        };
        let p2 = FloodEntry {
            ifindex: n.ifx(&P2),
            flags: 0,
        };
        let p3 = FloodEntry {
            ifindex: n.ifx(&P3),
            flags: flood_flags::ACCEPTS_UNKNOWN,
        };
        n.h.set_flood(NET_A, &[stale, p2, p3])?;
        let arp = frames::arp_request_frame(P1.mac, P1.ip4, P2.ip4);
        n.expect_flood(&P1, &arp, &[&P2, &P3], "flood past a stale entry")?;
        let s = n.stats(&P1)?;
        ensure!(
            nonzero_drops(&s) == [(DropReason::RedirectFailed as usize, 1)],
            "drops {:?}",
            nonzero_drops(&s)
        );
        Ok(())
    })
}

/// With `port_egress` attached to the targets, each flood copy goes through it at
/// once, on this CPU, inside `port_ingress`: the copies carry the mark already, the
/// targets count them (or, p6 being down, drop and count them), and the ingress
/// verdict survives the nested runs.
#[test]
fn flood_copies_pass_the_targets_egress_program() -> Result<()> {
    with_node("nested", |n| {
        let targets = [&P2, &P6, &P3, &P4];
        for p in targets {
            n.h.attach("port_egress", p.dev, TcAttachType::Egress)?;
        }
        let set: Vec<FloodEntry> = targets
            .iter()
            .map(|p| FloodEntry {
                ifindex: n.ifx(p),
                flags: p.flood.unwrap_or(0),
            })
            .collect();
        n.h.set_flood(NET_A, &set)?;
        let arp = frames::arp_request_frame(P1.mac, P1.ip4, P2.ip4);
        n.expect_flood(&P1, &arp, &targets, "flood with egress attached")?;
        // p2, p6 and p3 got clones; p4 the original, whose redirect a test run skips.
        let down = vec![(DropReason::PortAdminDown as usize, 1)];
        for (p, tx, drops) in [
            (&P2, 1, vec![]),
            (&P6, 0, down),
            (&P3, 1, vec![]),
            (&P4, 0, vec![]),
        ] {
            let s = n.stats(p)?;
            // The host's own IPv6 stack may send on the attached devices at any time
            // (MLD, DAD): those are `NotFromDatapath` drops, not this flood's.
            let flood_drops: Vec<_> = nonzero_drops(&s)
                .into_iter()
                .filter(|(r, _)| *r != DropReason::NotFromDatapath as usize)
                .collect();
            ensure!(
                s.tx_packets == tx && flood_drops == drops,
                "{}: tx {}, drops {:?}",
                p.dev,
                s.tx_packets,
                nonzero_drops(&s)
            );
        }
        ensure!(
            nonzero_drops(&n.stats(&P1)?).is_empty(),
            "p1 counted a drop"
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Port security

#[test]
fn source_mac_spoofing_is_dropped() -> Result<()> {
    with_node("macspoof", |n| {
        let s = STRANGER_MAC;
        let frames = [
            ("ipv4", frames::udp4_frame(P2.mac, s, P1.ip4, P2.ip4, 1, 2)),
            ("ipv6", frames::icmp6_echo_frame(P2.mac, s, P1.ip6, P2.ip6)),
            ("arp", frames::arp_request_frame(s, P1.ip4, P2.ip4)),
            (
                "lldp",
                frames::ethernet(BROADCAST, s, ethertype::LLDP, &[0; 46]),
            ),
            // p4's pair MAC is p4's, not p1's.
            (
                "other port's pair mac",
                frames::udp4_frame(P2.mac, PAIR_MAC, PAIR_IP4, P2.ip4, 1, 2),
            ),
        ];
        for (what, f) in &frames {
            n.expect_drop(&P1, f, DropReason::SourceMacSpoofed, what)?;
        }
        ensure!(n.stats(&P1)?.rx_packets == frames.len() as u64, "rx");
        Ok(())
    })
}

#[test]
fn source_ip_spoofing_is_dropped() -> Result<()> {
    with_node("ipspoof", |n| {
        let m = P1.mac;
        let cases = [
            (
                "p2's ipv4",
                frames::udp4_frame(P2.mac, m, P2.ip4, P2.ip4, 1, 2),
            ),
            (
                "p4's pair ipv4",
                frames::tcp4_frame(P2.mac, m, PAIR_IP4, P2.ip4),
            ),
            (
                "p2's ipv6",
                frames::icmp6_echo_frame(P2.mac, m, P2.ip6, P2.ip6),
            ),
            (
                "p2's link-local",
                frames::udp6_frame(P2.mac, m, P2.ll6, P1.ll6, 1, 2),
            ),
            (
                "0.0.0.0 tcp",
                frames::tcp4_frame(P2.mac, m, Ipv4Addr::UNSPECIFIED, P2.ip4),
            ),
            (
                "0.0.0.0 udp 68->68",
                frames::udp4_frame(
                    BROADCAST,
                    m,
                    Ipv4Addr::UNSPECIFIED,
                    Ipv4Addr::BROADCAST,
                    68,
                    68,
                ),
            ),
            (
                "0.0.0.0 udp 67->67",
                frames::udp4_frame(
                    BROADCAST,
                    m,
                    Ipv4Addr::UNSPECIFIED,
                    Ipv4Addr::BROADCAST,
                    67,
                    67,
                ),
            ),
            (
                "0.0.0.0 icmp",
                frames::icmp4_frame(P2.mac, m, Ipv4Addr::UNSPECIFIED, P2.ip4),
            ),
            (
                ":: echo",
                frames::icmp6_echo_frame(P2.mac, m, Ipv6Addr::UNSPECIFIED, P2.ip6),
            ),
            (
                ":: udp",
                frames::udp6_frame(P2.mac, m, Ipv6Addr::UNSPECIFIED, P2.ip6, 546, 547),
            ),
            (
                ":: na",
                frames::na_frame(m, Ipv6Addr::UNSPECIFIED, P2.mac, P2.ip6, P1.ip6, None),
            ),
            (":: ra", frames::ra_frame(m, Ipv6Addr::UNSPECIFIED)),
        ];
        for (what, f) in &cases {
            n.expect_drop(&P1, f, DropReason::SourceIpSpoofed, what)?;
        }
        Ok(())
    })
}

#[test]
fn arp_spoofing_is_dropped() -> Result<()> {
    with_node("arpspoof", |n| {
        let arp = |sha: Mac, spa: Ipv4Addr| {
            let body = frames::arp(frames::arp_op::REQUEST, sha, spa, [0; 6], P2.ip4);
            frames::ethernet(BROADCAST, P1.mac, ethertype::ARP, &body)
        };
        n.expect_drop(
            &P1,
            &arp(STRANGER_MAC, P1.ip4),
            DropReason::ArpSpoofed,
            "sha not eth src",
        )?;
        n.expect_drop(
            &P1,
            &arp(P1.mac, P2.ip4),
            DropReason::ArpSpoofed,
            "p2's address",
        )?;
        n.expect_drop(
            &P1,
            &arp(P1.mac, PAIR_IP4),
            DropReason::ArpSpoofed,
            "p4's pair address",
        )?;
        // An ARP probe has no sender address yet.
        n.expect_flood(
            &P1,
            &arp(P1.mac, Ipv4Addr::UNSPECIFIED),
            &[&P2, &P3, &P4],
            "probe",
        )?;
        // A reply for the port's own address.
        let reply = frames::arp(frames::arp_op::REPLY, P1.mac, P1.ip4, P2.mac, P2.ip4);
        let reply = frames::ethernet(P2.mac, P1.mac, ethertype::ARP, &reply);
        n.expect_unicast(&P1, &reply, &P2, "reply")?;
        Ok(())
    })
}

#[test]
fn nd_spoofing_is_dropped() -> Result<()> {
    with_node("ndspoof", |n| {
        let m = P1.mac;
        let ns_bad = frames::ns_frame(m, P1.ip6, P2.ip6, Some(STRANGER_MAC));
        n.expect_drop(&P1, &ns_bad, DropReason::NdSpoofed, "ns with another slla")?;
        // The bad option behind a good one: the option walk goes on.
        let ns_l4 = frames::ns(
            P2.ip6,
            &[
                frames::nd_ll_option(1, m),
                frames::nd_ll_option(1, STRANGER_MAC),
            ],
        );
        let ns_second =
            frames::icmp6_multicast_frame(m, P1.ip6, frames::solicited_node(P2.ip6), &ns_l4);
        n.expect_drop(&P1, &ns_second, DropReason::NdSpoofed, "second slla bad")?;
        // A nonce option (14) is not a link-layer address.
        let nonce = vec![14, 1, 1, 2, 3, 4, 5, 6];
        let ns_l4 = frames::ns(P2.ip6, &[nonce, frames::nd_ll_option(1, m)]);
        let ns_nonce =
            frames::icmp6_multicast_frame(m, P1.ip6, frames::solicited_node(P2.ip6), &ns_l4);
        n.expect_flood(&P1, &ns_nonce, &[&P2, &P3, &P4], "nonce then own slla")?;
        n.expect_flood(
            &P1,
            &frames::ns_frame(m, P1.ip6, P2.ip6, None),
            &[&P2, &P3, &P4],
            "ns without slla",
        )?;

        let na = |target: Ipv6Addr, tlla: Option<Mac>| {
            frames::na_frame(m, P1.ip6, P2.mac, P2.ip6, target, tlla)
        };
        n.expect_drop(
            &P1,
            &na(P2.ip6, Some(m)),
            DropReason::NdSpoofed,
            "na for p2's address",
        )?;
        n.expect_drop(
            &P1,
            &na(PAIR_IP6, Some(m)),
            DropReason::NdSpoofed,
            "na for p4's pair",
        )?;
        n.expect_drop(
            &P1,
            &na(P1.ip6, Some(STRANGER_MAC)),
            DropReason::NdSpoofed,
            "na with another tlla",
        )?;
        n.expect_unicast(&P1, &na(P1.ip6, Some(m)), &P2, "na for own address")?;
        n.expect_unicast(
            &P1,
            &na(P1.ll6, None),
            &P2,
            "na for own link-local, no tlla",
        )?;
        // A source link-layer option in an NA is not the one checked.
        let na_l4 = frames::na(P1.ip6, &[frames::nd_ll_option(1, STRANGER_MAC)]);
        let na_slla = frames::ethernet(
            P2.mac,
            m,
            ethertype::IPV6,
            &frames::ipv6(P1.ip6, P2.ip6, proto::ICMPV6, &na_l4),
        );
        n.expect_unicast(&P1, &na_slla, &P2, "na with slla option")?;
        Ok(())
    })
}

#[test]
fn router_advertisements_and_dhcp_servers_are_dropped() -> Result<()> {
    with_node("ra-dhcp", |n| {
        let ra = frames::ra_frame(P1.mac, P1.ll6);
        n.expect_drop(&P1, &ra, DropReason::RouterAdvertisementFromPort, "ra")?;
        let offer = frames::dhcp_offer_frame(P1.mac, P1.ip4, P2.mac, P2.ip4);
        n.expect_drop(&P1, &offer, DropReason::DhcpServerFromPort, "dhcp offer")?;
        let advertise = frames::dhcp6_advertise_frame(P1.mac, P1.ll6, P2.mac, P2.ll6);
        n.expect_drop(
            &P1,
            &advertise,
            DropReason::DhcpServerFromPort,
            "dhcpv6 advertise",
        )?;
        // Client directions pass.
        n.expect_unicast(
            &P1,
            &frames::udp6_frame(P2.mac, P1.mac, P1.ll6, P2.ll6, 546, 547),
            &P2,
            "dhcpv6 client",
        )?;
        n.expect_unicast(
            &P1,
            &frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 68, 67),
            &P2,
            "dhcp renew",
        )?;
        // A router solicitation is a host's message.
        let rs = frames::icmp6(frames::icmp6_type::ROUTER_SOLICIT, 0, &[0; 4]);
        let all_routers = v6("ff02::2");
        n.expect_flood(
            &P1,
            &frames::icmp6_multicast_frame(P1.mac, P1.ll6, all_routers, &rs),
            &[&P2, &P3, &P4],
            "rs",
        )?;
        Ok(())
    })
}

#[test]
fn address_configuration_from_unspecified_source_is_allowed() -> Result<()> {
    with_node("unspec", |n| {
        let all = [&P2, &P3, &P4];
        n.expect_flood(
            &P1,
            &frames::dhcp_discover_frame(P1.mac),
            &all,
            "dhcp discover",
        )?;
        n.expect_flood(
            &P1,
            &frames::ns_frame(P1.mac, Ipv6Addr::UNSPECIFIED, P1.ip6, None),
            &all,
            "dad ns",
        )?;
        let group = frames::solicited_node(P1.ip6);
        n.expect_flood(
            &P1,
            &frames::mld2_report_frame(P1.mac, Ipv6Addr::UNSPECIFIED, group),
            &all,
            "mldv2 report",
        )?;
        n.expect_flood(
            &P1,
            &frames::mld1_report_frame(P1.mac, Ipv6Addr::UNSPECIFIED, group),
            &all,
            "mldv1 report",
        )?;
        // The MAC is still checked.
        let discover = frames::dhcp_discover_frame(STRANGER_MAC);
        n.expect_drop(
            &P1,
            &discover,
            DropReason::SourceMacSpoofed,
            "discover from another mac",
        )?;
        Ok(())
    })
}

#[test]
fn allowed_address_pairs_exact_and_cidr() -> Result<()> {
    with_node("pairs", |n| {
        let pm = PAIR_MAC;
        let ok4 = [PAIR_IP4, v4("10.1.0.77"), v4("10.1.0.0"), v4("10.1.0.255")];
        for a in ok4 {
            n.expect_unicast(
                &P4,
                &frames::udp4_frame(P1.mac, pm, a, P1.ip4, 1, 2),
                &P1,
                &format!("pair {a}"),
            )?;
        }
        // p4's own MAC and address still work.
        n.expect_unicast(
            &P4,
            &frames::udp4_frame(P1.mac, P4.mac, P4.ip4, P1.ip4, 1, 2),
            &P1,
            "own",
        )?;
        let bad4 = [
            (pm, v4("10.1.1.1"), "outside the prefix"),
            (pm, P4.ip4, "fixed ip with the pair mac"),
            (P4.mac, v4("10.1.0.77"), "pair prefix with the port mac"),
            (P4.mac, PAIR_IP4, "pair address with the port mac"),
        ];
        for (mac, a, what) in bad4 {
            n.expect_drop(
                &P4,
                &frames::udp4_frame(P1.mac, mac, a, P1.ip4, 1, 2),
                DropReason::SourceIpSpoofed,
                what,
            )?;
        }
        let ok6 = [
            PAIR_IP6,
            v6("fd00:1::abc"),
            v6("fd00:1::ffff:ffff:ffff:ffff"),
        ];
        for a in ok6 {
            n.expect_unicast(
                &P4,
                &frames::icmp6_echo_frame(P1.mac, pm, a, P1.ip6),
                &P1,
                &format!("pair {a}"),
            )?;
        }
        n.expect_drop(
            &P4,
            &frames::icmp6_echo_frame(P1.mac, pm, v6("fd00:2::1"), P1.ip6),
            DropReason::SourceIpSpoofed,
            "outside prefix6",
        )?;
        n.expect_drop(
            &P4,
            &frames::icmp6_echo_frame(P1.mac, P4.mac, v6("fd00:1::1"), P1.ip6),
            DropReason::SourceIpSpoofed,
            "prefix6 with port mac",
        )?;
        // ARP and ND for pair addresses.
        let arp = frames::arp_request_frame(pm, v4("10.1.0.5"), P1.ip4);
        n.expect_flood(&P4, &arp, &[&P1, &P2, &P3], "arp for a pair address")?;
        let na = frames::na_frame(pm, PAIR_IP6, P1.mac, P1.ip6, v6("fd00:1::5"), Some(pm));
        n.expect_unicast(&P4, &na, &P1, "na for a pair address")?;
        // Trie entries count only for a port with HAS_NET4/HAS_NET6.
        n.h.allow_net4(P1.slot, P1.mac, "10.9.0.0/16".parse()?)?;
        n.h.allow_net6(P1.slot, P1.mac, "fd09::/64".parse()?)?;
        n.expect_drop(
            &P1,
            &frames::udp4_frame(P2.mac, P1.mac, v4("10.9.0.1"), P2.ip4, 1, 2),
            DropReason::SourceIpSpoofed,
            "trie without HAS_NET4",
        )?;
        n.expect_drop(
            &P1,
            &frames::icmp6_echo_frame(P2.mac, P1.mac, v6("fd09::1"), P2.ip6),
            DropReason::SourceIpSpoofed,
            "trie without HAS_NET6",
        )?;
        Ok(())
    })
}

#[test]
fn port_security_off_switches_anything_well_formed() -> Result<()> {
    with_node("insecure", |n| {
        let s = STRANGER_MAC;
        let unicast = [
            (
                "spoofed mac",
                frames::udp4_frame(P1.mac, s, P3.ip4, P1.ip4, 1, 2),
            ),
            (
                "spoofed ip",
                frames::udp4_frame(P1.mac, P3.mac, v4("192.0.2.1"), P1.ip4, 1, 2),
            ),
            (
                "dhcp server",
                frames::dhcp_offer_frame(P3.mac, P3.ip4, P1.mac, P1.ip4),
            ),
            (
                "dhcpv6 server",
                frames::dhcp6_advertise_frame(P3.mac, P3.ll6, P1.mac, P1.ll6),
            ),
            (
                "na for p1",
                frames::na_frame(P3.mac, P3.ip6, P1.mac, P1.ip6, P1.ip6, Some(s)),
            ),
            (
                "arp spoof",
                frames::ethernet(
                    P1.mac,
                    P3.mac,
                    ethertype::ARP,
                    &frames::arp(2, s, P1.ip4, P1.mac, P1.ip4),
                ),
            ),
            (
                "vlan",
                frames::vlan_tagged(
                    P1.mac,
                    P3.mac,
                    ethertype::VLAN,
                    10,
                    ethertype::IPV4,
                    &[0; 40],
                ),
            ),
            (
                "qinq",
                frames::vlan_tagged(
                    P1.mac,
                    P3.mac,
                    ethertype::QINQ,
                    10,
                    ethertype::VLAN,
                    &[0; 40],
                ),
            ),
        ];
        for (what, f) in &unicast {
            n.expect_unicast(&P3, f, &P1, what)?;
        }
        let others = [&P1, &P2, &P4];
        n.expect_flood(&P3, &frames::ra_frame(P3.mac, P3.ll6), &others, "ra")?;
        let lldp = frames::ethernet(
            [0x01, 0x80, 0xc2, 0, 0, 0x0e],
            P3.mac,
            ethertype::LLDP,
            &[0; 46],
        );
        n.expect_flood(&P3, &lldp, &others, "lldp")?;
        // Malformed headers are dropped all the same.
        let bad = frames::with_u8(
            &frames::udp4_frame(P1.mac, P3.mac, P3.ip4, P1.ip4, 1, 2),
            offsets::IPV4_VERSION_IHL,
            0x44,
        );
        n.expect_drop(&P3, &bad, DropReason::MalformedIpv4, "bad ihl")?;
        Ok(())
    })
}

#[test]
fn vlan_tags_and_other_ethertypes_need_port_security_off() -> Result<()> {
    with_node("ethertype", |n| {
        let payload = frames::ipv4(P1.ip4, P2.ip4, proto::UDP, &frames::udp(1, 2, b"x"));
        let cases = [
            (
                "802.1q",
                frames::vlan_tagged(
                    P2.mac,
                    P1.mac,
                    ethertype::VLAN,
                    100,
                    ethertype::IPV4,
                    &payload,
                ),
            ),
            (
                "802.1ad",
                frames::vlan_tagged(
                    P2.mac,
                    P1.mac,
                    ethertype::QINQ,
                    100,
                    ethertype::VLAN,
                    &payload,
                ),
            ),
            (
                "lldp",
                frames::ethernet(
                    [0x01, 0x80, 0xc2, 0, 0, 0x0e],
                    P1.mac,
                    ethertype::LLDP,
                    &[0; 46],
                ),
            ),
            ("ipx", frames::ethernet(P2.mac, P1.mac, 0x8137, &[0; 46])),
        ];
        for (what, f) in &cases {
            n.expect_drop(&P1, f, DropReason::EthertypeNotAllowed, what)?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Ports that are down or unknown

#[test]
fn admin_down_port_drops_in_both_directions() -> Result<()> {
    with_node("down", |n| {
        let f = frames::udp4_frame(P1.mac, P6.mac, P6.ip4, P1.ip4, 1, 2);
        n.expect_drop(&P6, &f, DropReason::PortAdminDown, "ingress")?;
        let out = n.h.egress(n.ifx(&P6), MARK_FROM_DATAPATH | P1.slot, &f)?;
        ensure!(out.ret == TC_ACT_SHOT, "egress: {}", describe(&out));
        let s = n.stats(&P6)?;
        ensure!(
            s.rx_packets == 1 && s.rx_bytes == f.len() as u64,
            "rx counted while down"
        );
        ensure!(s.tx_packets == 0, "tx counted while down");
        ensure!(
            s.drops[DropReason::PortAdminDown as usize] == 2,
            "drops {:?}",
            nonzero_drops(&s)
        );
        Ok(())
    })
}

#[test]
fn devices_without_a_port_count_in_noport_drops() -> Result<()> {
    with_node("noport", |n| {
        let f = frames::udp4_frame(P1.mac, P2.mac, P2.ip4, P1.ip4, 1, 2);
        let stray = n.stray;
        let out = n.h.ingress(stray, &f)?;
        ensure!(
            out.ret == TC_ACT_SHOT && out.drop_reason() == Some(DropReason::UnknownPort),
            "ingress: {}",
            describe(&out)
        );
        let out = n.h.egress(stray, MARK_FROM_DATAPATH | 1, &f)?;
        ensure!(out.ret == TC_ACT_SHOT, "egress: {}", describe(&out));
        // A port whose slot has no counters is no port either.
        let info = PortInfo {
            port_slot: TEST_MAX_ENTRIES + 5,
            network_slot: NET_A,
            flags: UP_SECURE,
            mac: P2.mac,
            _pad: [0; 2],
            policy_id: 0,
            policy_revision: 0,
        };
        n.h.add_port(stray, info)?;
        let out = n.h.ingress(stray, &f)?;
        ensure!(
            out.drop_reason() == Some(DropReason::UnknownPort),
            "slot out of range: {}",
            describe(&out)
        );
        ensure!(
            n.h.noport_drops(DropReason::UnknownPort)? == 3,
            "noport counter"
        );
        for p in PORTS {
            ensure!(
                n.stats(p)?.rx_packets == 0,
                "{} counted a stray frame",
                p.dev
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Malformed frames

#[test]
fn malformed_ethernet_is_dropped() -> Result<()> {
    with_node("badeth", |n| {
        let group_src = frames::udp4_frame(P2.mac, [0x03, 0, 0, 0, 0, 1], P1.ip4, P2.ip4, 1, 2);
        n.expect_drop(
            &P1,
            &group_src,
            DropReason::MalformedEthernet,
            "group source, secure",
        )?;
        n.expect_drop(
            &P3,
            &group_src,
            DropReason::MalformedEthernet,
            "group source, insecure",
        )?;
        let bcast_src = frames::arp_request_frame(BROADCAST, P1.ip4, P2.ip4);
        n.expect_drop(
            &P3,
            &bcast_src,
            DropReason::MalformedEthernet,
            "broadcast source",
        )?;
        // The kernel does not run a program on less than an Ethernet header; if it
        // ever does, the frame must be dropped as malformed.
        match n.ingress(&P1, &[0xff; 10]) {
            Err(_) => {}
            Ok(out) => ensure!(
                out.drop_reason() == Some(DropReason::MalformedEthernet),
                "10-byte frame: {}",
                describe(&out)
            ),
        }
        Ok(())
    })
}

#[test]
fn malformed_ipv4_is_dropped() -> Result<()> {
    with_node("badip4", |n| {
        let good = frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 1, 2);
        let total = (good.len() - frames::ETH_HLEN) as u16;
        // A truncated header: BPF_PROG_TEST_RUN refuses it (EINVAL), see
        // `truncated_network_headers_sent_by_a_vm`.
        let cases = [
            (
                "version 6",
                frames::with_u8(&good, offsets::IPV4_VERSION_IHL, 0x65),
            ),
            (
                "ihl 4",
                frames::with_u8(&good, offsets::IPV4_VERSION_IHL, 0x44),
            ),
            (
                "ihl past total length",
                frames::with_u8(&good, offsets::IPV4_VERSION_IHL, 0x4f),
            ),
            (
                "total length < ihl",
                frames::with_u16(&good, offsets::IPV4_TOTAL_LEN, 19),
            ),
            (
                "total length past frame",
                frames::with_u16(&good, offsets::IPV4_TOTAL_LEN, total + 1),
            ),
        ];
        for (what, f) in &cases {
            n.expect_drop(&P1, f, DropReason::MalformedIpv4, what)?;
            n.expect_drop(&P3, f, DropReason::MalformedIpv4, what)?;
        }
        // Ethernet padding behind the datagram is fine.
        let mut padded = frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 1, 2);
        padded.resize(padded.len() + 20, 0);
        n.expect_unicast(&P1, &padded, &P2, "padded")?;
        // Options move the transport header: a DHCP server reply behind options.
        let udp = frames::udp(67, 68, b"offer");
        let mut ip = frames::ipv4(P1.ip4, P2.ip4, proto::UDP, &[]);
        ip[0] = 0x46;
        ip.extend_from_slice(&[1, 1, 1, 1]); // four NOP options
        ip.extend_from_slice(&udp);
        let len = ip.len() as u16;
        ip[2..4].copy_from_slice(&len.to_be_bytes());
        let f = frames::ethernet(P2.mac, P1.mac, ethertype::IPV4, &ip);
        n.expect_drop(
            &P1,
            &f,
            DropReason::DhcpServerFromPort,
            "dhcp behind ip options",
        )?;
        Ok(())
    })
}

#[test]
fn malformed_ipv6_is_dropped() -> Result<()> {
    with_node("badip6", |n| {
        let good = frames::icmp6_echo_frame(P2.mac, P1.mac, P1.ip6, P2.ip6);
        let payload = (good.len() - frames::ETH_HLEN - frames::IPV6_HLEN) as u16;
        let dst = |n: u8| Ext::DestOpts(vec![n; 4]);
        let chain = |exts: &[Ext]| {
            let ip = frames::ipv6_ext(
                P1.ip6,
                P2.ip6,
                exts,
                proto::ICMPV6,
                &frames::icmp6_echo(1, 1),
            );
            frames::ethernet(P2.mac, P1.mac, ethertype::IPV6, &ip)
        };
        let seven: Vec<Ext> = (0..7).map(dst).collect();
        let six: Vec<Ext> = (0..6).map(dst).collect();
        // A hop-by-hop header that claims more bytes than the payload has.
        let long_hbh = frames::with_u8(
            &chain(&[Ext::HopByHop(vec![0; 4])]),
            frames::ETH_HLEN + frames::IPV6_HLEN + 1,
            10,
        );
        let cases = [
            (
                "version 4",
                frames::with_u8(&good, offsets::IPV6_VERSION, 0x40),
            ),
            (
                "payload past frame",
                frames::with_u16(&good, offsets::IPV6_PAYLOAD_LEN, payload + 1),
            ),
            ("ext header past payload", long_hbh),
            (
                "ext header cut",
                frames::with_u16(
                    &chain(&[Ext::Routing { len: 1 }]),
                    offsets::IPV6_PAYLOAD_LEN,
                    10,
                ),
            ),
            (
                "fragment header cut",
                frames::with_u16(
                    &chain(&[Ext::Fragment {
                        offset: 0,
                        more: true,
                        id: 1,
                    }]),
                    offsets::IPV6_PAYLOAD_LEN,
                    4,
                ),
            ),
            ("seven ext headers", chain(&seven)),
        ];
        for (what, f) in &cases {
            n.expect_drop(&P1, f, DropReason::MalformedIpv6, what)?;
            n.expect_drop(&P3, f, DropReason::MalformedIpv6, what)?;
        }
        n.expect_unicast(&P1, &chain(&six), &P2, "six ext headers")?;
        let mixed = [
            Ext::HopByHop(vec![]),
            Ext::Routing { len: 2 },
            Ext::DestOpts(vec![1, 2]),
        ];
        n.expect_unicast(
            &P1,
            &chain(&mixed),
            &P2,
            "hop-by-hop, routing, destination options",
        )?;
        Ok(())
    })
}

/// BPF_PROG_TEST_RUN refuses frames whose IPv4 or IPv6 header is cut short, but a VM
/// can send them: these go through the attached program from the VM side of the veth.
#[test]
fn truncated_network_headers_sent_by_a_vm() -> Result<()> {
    let ns = NetNs::new("trunc")?;
    let p1 = ns.add_veth(P1.dev, None, P1.peer)?;
    let p2 = ns.add_veth(P2.dev, None, P2.peer)?;
    let info = |p: &Port| PortInfo {
        port_slot: p.slot,
        network_slot: p.network,
        flags: p.flags,
        mac: p.mac,
        _pad: [0; 2],
        policy_id: 0,
        policy_revision: 0,
    };
    let h = ns.run(|| -> Result<Harness> {
        let mut h = Harness::load()?;
        h.add_port(p1, info(&P1))?;
        h.add_port(p2, info(&P2))?;
        h.attach("port_ingress", P1.dev, TcAttachType::Ingress)?;
        Ok(h)
    })??;
    let udp4 = frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 1, 2);
    let icmp6 = frames::icmp6_echo_frame(P2.mac, P1.mac, P1.ip6, P2.ip6);
    let arp = frames::arp_request_frame(P1.mac, P1.ip4, P2.ip4);
    let cases = [
        (
            DropReason::MalformedIpv4,
            frames::truncated(&udp4, frames::ETH_HLEN + 19),
        ),
        (
            DropReason::MalformedIpv6,
            frames::truncated(&icmp6, frames::ETH_HLEN + 39),
        ),
        (
            DropReason::MalformedArp,
            frames::truncated(&arp, frames::ETH_HLEN + 27),
        ),
        (
            DropReason::MalformedEthernet,
            frames::ethernet(P2.mac, [0x01, 0, 0, 0, 0, 1], 0x0800, &[]),
        ),
    ];
    for (reason, frame) in &cases {
        ns.send_frame(P1.peer, frame)?;
        // Delivery to p1's ingress is asynchronous (the veth peer's backlog).
        let mut counted = 0;
        for _ in 0..200 {
            counted = h.port_stats(P1.slot)?.drops[*reason as usize];
            if counted > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        ensure!(counted == 1, "{reason:?} counted {counted} times");
    }
    Ok(())
}

#[test]
fn malformed_arp_is_dropped() -> Result<()> {
    with_node("badarp", |n| {
        let good = frames::arp_request_frame(P1.mac, P1.ip4, P2.ip4);
        let cases = [
            ("truncated", frames::truncated(&good, frames::ETH_HLEN + 27)),
            ("htype 6", frames::with_u16(&good, offsets::ARP_HTYPE, 6)),
            (
                "ptype ipv6",
                frames::with_u16(&good, offsets::ARP_PTYPE, ethertype::IPV6),
            ),
            ("hlen 8", frames::with_u8(&good, offsets::ARP_HLEN, 8)),
            ("plen 16", frames::with_u8(&good, offsets::ARP_PLEN, 16)),
        ];
        for (what, f) in &cases {
            n.expect_drop(&P1, f, DropReason::MalformedArp, what)?;
            n.expect_drop(&P3, f, DropReason::MalformedArp, what)?;
        }
        Ok(())
    })
}

#[test]
fn truncated_transport_headers_are_dropped_where_checked() -> Result<()> {
    with_node("badl4", |n| {
        // UDP cut to 4 bytes, IPv4 lengths consistent with it.
        let udp4 = frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 1, 2);
        let udp4 = frames::with_u16(
            &frames::truncated(&udp4, 14 + 20 + 4),
            offsets::IPV4_TOTAL_LEN,
            24,
        );
        n.expect_drop(&P1, &udp4, DropReason::MalformedL4, "udp over ipv4")?;
        // Datagram says 4 bytes of UDP even though the frame carries more.
        let short = frames::with_u16(
            &frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 1, 2),
            offsets::IPV4_TOTAL_LEN,
            24,
        );
        n.expect_drop(
            &P1,
            &short,
            DropReason::MalformedL4,
            "udp past total length",
        )?;
        let ip6 = |next: u8, l4: &[u8]| {
            frames::ethernet(
                P2.mac,
                P1.mac,
                ethertype::IPV6,
                &frames::ipv6(P1.ip6, P2.ip6, next, l4),
            )
        };
        n.expect_drop(
            &P1,
            &ip6(proto::UDP, &[0, 1, 2]),
            DropReason::MalformedL4,
            "udp over ipv6",
        )?;
        n.expect_drop(
            &P1,
            &ip6(proto::ICMPV6, &[128, 0]),
            DropReason::MalformedL4,
            "icmpv6",
        )?;
        let ns = frames::ns(P2.ip6, &[]);
        n.expect_drop(
            &P1,
            &ip6(proto::ICMPV6, &ns[..20]),
            DropReason::MalformedL4,
            "ns under 24 bytes",
        )?;
        let na = frames::na(P1.ip6, &[]);
        n.expect_drop(
            &P1,
            &ip6(proto::ICMPV6, &na[..23]),
            DropReason::MalformedL4,
            "na under 24 bytes",
        )?;
        let zero_len_opt = frames::ns(P2.ip6, &[vec![1, 0, 0, 0, 0, 0, 0, 0]]);
        n.expect_drop(
            &P1,
            &ip6(proto::ICMPV6, &zero_len_opt),
            DropReason::MalformedL4,
            "nd option of length 0",
        )?;
        let long_opt = frames::ns(P2.ip6, &[vec![1, 2, 0, 0, 0, 0, 0, 0]]);
        n.expect_drop(
            &P1,
            &ip6(proto::ICMPV6, &long_opt),
            DropReason::MalformedL4,
            "nd option past the message",
        )?;
        // TCP and ICMPv4 need no transport header: not parsed.
        let tcp = frames::with_u16(
            &frames::truncated(&frames::tcp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4), 36),
            offsets::IPV4_TOTAL_LEN,
            22,
        );
        n.expect_unicast(&P1, &tcp, &P2, "truncated tcp")?;
        // Without port security, transport headers are not looked at.
        let to_p1 = |f: &[u8]| {
            let mut f = f.to_vec();
            f[..6].copy_from_slice(&P1.mac);
            f[6..12].copy_from_slice(&P3.mac);
            f
        };
        let udp4_p3 = frames::with_u16(
            &frames::truncated(
                &frames::udp4_frame(P1.mac, P3.mac, P3.ip4, P1.ip4, 1, 2),
                38,
            ),
            offsets::IPV4_TOTAL_LEN,
            24,
        );
        n.expect_unicast(&P3, &udp4_p3, &P1, "insecure udp")?;
        n.expect_unicast(
            &P3,
            &to_p1(&ip6(proto::ICMPV6, &[128, 0])),
            &P1,
            "insecure icmpv6",
        )?;
        n.expect_unicast(
            &P3,
            &to_p1(&ip6(proto::ICMPV6, &zero_len_opt)),
            &P1,
            "insecure nd option",
        )?;
        Ok(())
    })
}

#[test]
fn fragments_only_the_first_has_a_transport_header() -> Result<()> {
    with_node("frags", |n| {
        let offer = frames::udp(67, 68, b"offer-offer");
        let v4 = |offset: u16| {
            let ip = frames::ipv4_fragment(P1.ip4, P2.ip4, proto::UDP, offset, offset == 0, &offer);
            frames::ethernet(P2.mac, P1.mac, ethertype::IPV4, &ip)
        };
        n.expect_drop(
            &P1,
            &v4(0),
            DropReason::DhcpServerFromPort,
            "ipv4 first fragment",
        )?;
        n.expect_unicast(&P1, &v4(64), &P2, "ipv4 later fragment")?;
        let advertise = frames::udp(547, 546, b"advertise");
        let v6 = |src: Ipv6Addr, offset: u16| {
            let frag = [Ext::Fragment {
                offset,
                more: offset == 0,
                id: 7,
            }];
            let ip = frames::ipv6_ext(src, P2.ip6, &frag, proto::UDP, &advertise);
            frames::ethernet(P2.mac, P1.mac, ethertype::IPV6, &ip)
        };
        n.expect_drop(
            &P1,
            &v6(P1.ip6, 0),
            DropReason::DhcpServerFromPort,
            "ipv6 first fragment",
        )?;
        n.expect_unicast(&P1, &v6(P1.ip6, 64), &P2, "ipv6 later fragment")?;
        // A later fragment has no ICMPv6 type to excuse an unspecified source.
        n.expect_drop(
            &P1,
            &v6(Ipv6Addr::UNSPECIFIED, 64),
            DropReason::SourceIpSpoofed,
            "later fragment from ::",
        )?;
        // Behind the fragment header, ICMPv6 checks still apply.
        let ra = frames::ra(P1.mac);
        let frag = [Ext::Fragment {
            offset: 0,
            more: false,
            id: 8,
        }];
        let ip = frames::ipv6_ext(P1.ll6, v6_all_nodes(), &frag, proto::ICMPV6, &ra);
        let f = frames::ethernet(
            frames::multicast_mac(v6_all_nodes()),
            P1.mac,
            ethertype::IPV6,
            &ip,
        );
        n.expect_drop(
            &P1,
            &f,
            DropReason::RouterAdvertisementFromPort,
            "ra in an atomic fragment",
        )?;
        Ok(())
    })
}

fn v6_all_nodes() -> Ipv6Addr {
    v6("ff02::1")
}

// ---------------------------------------------------------------------------------
// Egress

#[test]
fn egress_delivers_only_what_the_datapath_switched() -> Result<()> {
    with_node("egress", |n| {
        let f = frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 1, 2);
        let p2 = n.ifx(&P2);
        for mark in [0, 0x1234_0001, P1.slot, MARK_FROM_DATAPATH ^ 0x0001_0000] {
            let out = n.h.egress(p2, mark, &f)?;
            ensure!(out.ret == TC_ACT_SHOT, "mark {mark:#x}: {}", describe(&out));
            // Verdicts are port_ingress's alone: port_egress runs nested in its floods.
            ensure!(out.verdict.action == 0, "egress traced {}", describe(&out));
        }
        let out = n.h.egress(p2, MARK_FROM_DATAPATH | P1.slot, &f)?;
        ensure!(
            out.ret == TC_ACT_OK && out.verdict.action == 0,
            "switched: {}",
            describe(&out)
        );
        ensure!(
            out.mark == MARK_FROM_DATAPATH | P1.slot,
            "egress touched the mark: {:#x}",
            out.mark
        );
        // Frames from a port without port security are switched frames too.
        let out = n.h.egress(p2, MARK_FROM_DATAPATH | P3.slot, &f)?;
        ensure!(out.ret == TC_ACT_OK, "from p3: {}", describe(&out));
        let s = n.stats(&P2)?;
        ensure!(
            s.tx_packets == 2 && s.tx_bytes == 2 * f.len() as u64,
            "tx {} / {}",
            s.tx_packets,
            s.tx_bytes
        );
        ensure!(s.rx_packets == 0, "egress counted rx");
        ensure!(
            nonzero_drops(&s) == [(DropReason::NotFromDatapath as usize, 4)],
            "drops {:?}",
            nonzero_drops(&s)
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Coverage

/// One frame per drop reason: fails when a reason is added that no frame here reaches.
#[test]
fn every_drop_reason_is_reachable() -> Result<()> {
    with_node("reasons", |n| {
        let mut seen = std::collections::BTreeSet::new();
        let ingress: Vec<(&Port, Vec<u8>)> = vec![
            (
                &P1,
                frames::udp4_frame(P2.mac, [0x01, 0, 0, 0, 0, 1], P1.ip4, P2.ip4, 1, 2),
            ),
            (
                &P1,
                frames::truncated(&frames::arp_request_frame(P1.mac, P1.ip4, P2.ip4), 30),
            ),
            (
                &P1,
                frames::with_u8(
                    &frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 1, 2),
                    offsets::IPV4_VERSION_IHL,
                    0x44,
                ),
            ),
            (
                &P1,
                frames::with_u8(
                    &frames::icmp6_echo_frame(P2.mac, P1.mac, P1.ip6, P2.ip6),
                    offsets::IPV6_VERSION,
                    0x40,
                ),
            ),
            (
                &P1,
                frames::ethernet(
                    P2.mac,
                    P1.mac,
                    ethertype::IPV6,
                    &frames::ipv6(P1.ip6, P2.ip6, proto::UDP, &[0; 4]),
                ),
            ),
            (
                &P6,
                frames::udp4_frame(P2.mac, P6.mac, P6.ip4, P2.ip4, 1, 2),
            ),
            (
                &P1,
                frames::udp4_frame(P2.mac, STRANGER_MAC, P1.ip4, P2.ip4, 1, 2),
            ),
            (
                &P1,
                frames::udp4_frame(P2.mac, P1.mac, P2.ip4, P2.ip4, 1, 2),
            ),
            (&P1, frames::arp_request_frame(P1.mac, P2.ip4, P1.ip4)),
            (
                &P1,
                frames::na_frame(P1.mac, P1.ip6, P2.mac, P2.ip6, P2.ip6, None),
            ),
            (&P1, frames::ra_frame(P1.mac, P1.ll6)),
            (
                &P1,
                frames::dhcp_offer_frame(P1.mac, P1.ip4, P2.mac, P2.ip4),
            ),
            (
                &P1,
                frames::vlan_tagged(
                    P2.mac,
                    P1.mac,
                    ethertype::VLAN,
                    1,
                    ethertype::IPV4,
                    &[0; 40],
                ),
            ),
            (
                &P1,
                frames::udp4_frame(P1.mac, P1.mac, P1.ip4, P1.ip4, 1, 2),
            ),
            (&P5, frames::arp_request_frame(P5.mac, P5.ip4, P1.ip4)),
        ];
        for (p, f) in &ingress {
            if let Some(r) = n.ingress(p, f)?.drop_reason() {
                seen.insert(r);
            }
        }
        // port_egress does not trace: its drops show in the counters.
        let f = frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, 1, 2);
        n.h.egress(n.stray, 0, &f)?;
        if n.h.noport_drops(DropReason::UnknownPort)? > 0 {
            seen.insert(DropReason::UnknownPort);
        }
        n.h.egress(n.ifx(&P2), 0, &f)?;
        if n.stats(&P2)?.drops[DropReason::NotFromDatapath as usize] > 0 {
            seen.insert(DropReason::NotFromDatapath);
        }
        // A failed copy is counted, not a verdict: it does not end the frame.
        n.h.set_flood(
            NET_A,
            &[
                FloodEntry {
                    ifindex: 4242,
                    flags: 0,
                },
                FloodEntry {
                    ifindex: n.ifx(&P2),
                    flags: 0,
                },
            ],
        )?;
        n.ingress(&P1, &frames::arp_request_frame(P1.mac, P1.ip4, P2.ip4))?;
        if n.stats(&P1)?.drops[DropReason::RedirectFailed as usize] > 0 {
            seen.insert(DropReason::RedirectFailed);
        }
        // Security groups: p1 gets a stateful policy (1, revision 1) without rules.
        n.h.add_port(
            n.ifx(&P1),
            PortInfo {
                port_slot: P1.slot,
                network_slot: P1.network,
                flags: P1.flags | port_flags::POLICY | port_flags::STATEFUL,
                mac: P1.mac,
                _pad: [0; 2],
                policy_id: 1,
                policy_revision: 1,
            },
        )?;
        let udp = |sport, dport| frames::udp4_frame(P2.mac, P1.mac, P1.ip4, P2.ip4, sport, dport);
        let syn_fin = frames::ethernet(
            P2.mac,
            P1.mac,
            ethertype::IPV4,
            &frames::ipv4(
                P1.ip4,
                P2.ip4,
                proto::TCP,
                &frames::tcp(1, 2, tcp_flags::SYN | tcp_flags::FIN),
            ),
        );
        // A connection admitted under revision 0, which allowed what 1 does not.
        let (key, from_lo) = ct_key(P1.slot, proto::UDP, P1.ip4.into(), 3, P2.ip4.into(), 4);
        let entry = CtEntry {
            last_seen_ns: dataplane_tests::testrun::monotonic_ns(),
            policy_revision: 0,
            state: ct_state::OPEN,
            flags: if from_lo {
                dataplane_abi::ct_flags::ORIG_FROM_LO
            } else {
                0
            } | dataplane_abi::ct_flags::ORIG_EGRESS,
            _pad: [0; 2],
        };
        n.h.ct_insert(CtTable::New, key, entry)?;
        // A full CT, and a datagram from p2 that p1's ingress rule lets in: p1's answer
        // cannot be confirmed.
        for i in 0..TEST_MAX_ENTRIES {
            let (filler, _) = ct_key(999, proto::UDP, P1.ip4.into(), i as u16, P2.ip4.into(), 1);
            n.h.ct_insert(CtTable::Confirmed, filler, entry)?;
        }
        n.h.add_remote(1, sg_direction::INGRESS, "10.0.0.2/32".parse()?, 1)?;
        n.h.add_rule(1, RuleMatch::Protocol(proto::UDP), 1)?;
        let question = frames::udp4_frame(P1.mac, P2.mac, P2.ip4, P1.ip4, 5, 6);
        let delivered =
            n.h.egress(n.ifx(&P1), MARK_FROM_DATAPATH | P2.slot, &question)?;
        ensure!(
            delivered.ret == TC_ACT_OK,
            "question into p1: {}",
            describe(&delivered)
        );
        for f in [udp(1, 2), syn_fin, udp(3, 4), udp(6, 5)] {
            if let Some(r) = n.ingress(&P1, &f)?.drop_reason() {
                seen.insert(r);
            }
        }
        // A map set without stages: the dispatcher has nothing to hand the frame to.
        n.h.set_active_set(1)?;
        if let Some(r) = n.ingress(&P1, &udp(1, 2))?.drop_reason() {
            seen.insert(r);
        }
        n.h.set_active_set(0)?;
        // Routing's and NAT's own reasons are reached in packet_router.rs and
        // packet_nat.rs, whose nodes have routers and an uplink.
        let routing = [
            DropReason::NoRoute,
            DropReason::NoNeighbor,
            DropReason::TtlExceeded,
            DropReason::NatPortsExhausted,
            DropReason::NoNatBinding,
            DropReason::NatUnsupported,
        ];
        let missing: Vec<_> = DropReason::ALL
            .iter()
            .filter(|r| !seen.contains(*r) && !routing.contains(r))
            .collect();
        ensure!(missing.is_empty(), "no frame reached {missing:?}");
        Ok(())
    })
}
