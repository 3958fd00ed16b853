//! Packet tests of security groups and connection tracking (`port_ingress` applies a
//! port's egress rules, `port_egress` its ingress rules) with BPF_PROG_TEST_RUN. Needs
//! root. The policy maps are filled by hand with the ABI types, as the agent compiles
//! them (`dataplane_abi::policy`).
//!
//! Every test builds the same node in a namespace of its own, one network, ports on
//! veth devices (not attached: they make the kernel resolve the test run's ifindex):
//!
//! | port | flags                                   | policy | notes                    |
//! |------|-----------------------------------------|--------|--------------------------|
//! | sa   | up, port security, POLICY, STATEFUL     | 1      | a client VM              |
//! | sb   | up, port security, POLICY, STATEFUL     | 2      | a server VM              |
//! | sc   | up, port security, POLICY (stateless)   | 3      |                          |
//! | sd   | up, port security, POLICY, STATEFUL     | 4      | a policy without rules   |
//! | ext  | up (no port security, no policy)        | -      | the router / the outside |
//!
//! Policy `n` is port `n`'s, at revision 1. Frames towards a VM are run through its
//! `port_egress` as `port_ingress` of the sender would hand them over (marked); that
//! program traces no verdict, so its drops are checked in the port's counters.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{ensure, Context, Result};
use dataplane_abi::{
    ct_flags, ct_stat, ct_state, fdb_flags, port_flags, sg_direction, verdict_action, CtEntry,
    CtKey, DropReason, FdbEntry, FloodEntry, PortInfo, RuleStats, MARK_FROM_DATAPATH,
};
use dataplane_tests::{
    frames::{self, ethertype, icmp4_type, icmp6_type, proto, tcp_flags, Ext, Mac},
    netns::NetNs,
    testrun::{
        ct_key, monotonic_ns, port_blocks, CtTable, Harness, Outcome, RuleMatch, Sizes, TC_ACT_OK,
        TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
};
use ipnet::IpNet;

const NET: u32 = 1;
const EGRESS: u8 = sg_direction::EGRESS;
const INGRESS: u8 = sg_direction::INGRESS;

const UP_SECURE: u32 = port_flags::ADMIN_UP | port_flags::PORT_SECURITY;
const STATEFUL: u32 = UP_SECURE | port_flags::POLICY | port_flags::STATEFUL;
const STATELESS: u32 = UP_SECURE | port_flags::POLICY;

struct Port {
    dev: &'static str,
    peer: &'static str,
    slot: u32,
    flags: u32,
    mac: Mac,
    ip4: Ipv4Addr,
    ip6: Ipv6Addr,
    ll6: Ipv6Addr,
}

const fn port(n: u8, dev: &'static str, peer: &'static str, flags: u32) -> Port {
    Port {
        dev,
        peer,
        slot: n as u32,
        flags,
        mac: [0x02, 0xaa, 0, 0, 0, n],
        ip4: Ipv4Addr::new(10, 0, 0, n),
        ip6: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, n as u16),
        ll6: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, n as u16),
    }
}

const SA: Port = port(1, "sa", "savm", STATEFUL);
const SB: Port = port(2, "sb", "sbvm", STATEFUL);
const SC: Port = port(3, "sc", "scvm", STATELESS);
const SD: Port = port(4, "sd", "sdvm", STATEFUL);
const EXT: Port = port(5, "ext", "extvm", port_flags::ADMIN_UP);
const PORTS: [&Port; 5] = [&SA, &SB, &SC, &SD, &EXT];

/// Hosts beyond the router (reached through `ext`), and the router itself.
const OUT4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const OUT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
const ROUTER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

/// One end of a packet: MAC, address and port (or ICMP echo identifier).
#[derive(Clone, Copy, Debug)]
struct Ep {
    mac: Mac,
    ip: IpAddr,
    port: u16,
}

fn ep(p: &Port, ip: impl Into<IpAddr>, port: u16) -> Ep {
    Ep {
        mac: p.mac,
        ip: ip.into(),
        port,
    }
}

/// A host beyond the router.
fn out(ip: impl Into<IpAddr>, port: u16) -> Ep {
    ep(&EXT, ip, port)
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// The IP packet (no Ethernet header) from `a` to `b` carrying `l4` of `protocol`;
/// `proto::ICMP` means ICMPv6 between IPv6 addresses.
fn ip_packet(a: Ep, b: Ep, protocol: u8, l4: &[u8]) -> Vec<u8> {
    match (a.ip, b.ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => frames::ipv4(s, d, protocol, l4),
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let next = if protocol == proto::ICMP {
                proto::ICMPV6
            } else {
                protocol
            };
            frames::ipv6(s, d, next, l4)
        }
        _ => panic!("mixed families"),
    }
}

fn frame(a: Ep, b: Ep, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let ethertype = if a.ip.is_ipv4() {
        ethertype::IPV4
    } else {
        ethertype::IPV6
    };
    frames::ethernet(b.mac, a.mac, ethertype, &ip_packet(a, b, protocol, l4))
}

fn tcp(a: Ep, b: Ep, flags: u8) -> Vec<u8> {
    frame(a, b, proto::TCP, &frames::tcp(a.port, b.port, flags))
}

fn udp(a: Ep, b: Ep) -> Vec<u8> {
    frame(a, b, proto::UDP, &frames::udp(a.port, b.port, b"dataplane"))
}

/// ICMP (ICMPv6 between IPv6 addresses) echo request with identifier `a.port`.
fn echo(a: Ep, b: Ep) -> Vec<u8> {
    let l4 = if a.ip.is_ipv4() {
        frames::icmp4_echo(a.port, 1)
    } else {
        frames::icmp6_echo(a.port, 1)
    };
    frame(a, b, proto::ICMP, &l4)
}

/// Echo reply with identifier `a.port`.
fn echo_reply(a: Ep, b: Ep) -> Vec<u8> {
    let l4 = if a.ip.is_ipv4() {
        frames::icmp4_echo_reply(a.port, 1)
    } else {
        frames::icmp6_echo_reply(a.port, 1)
    };
    frame(a, b, proto::ICMP, &l4)
}

/// An ICMP error of `kind`/`code` from `a` to `b` about the IP packet of `about` (an
/// Ethernet frame).
fn icmp_error(a: Ep, b: Ep, kind: u8, code: u8, rest: u32, about: &[u8]) -> Vec<u8> {
    let about = &about[frames::ETH_HLEN..];
    let l4 = if a.ip.is_ipv4() {
        frames::icmp4_error(kind, code, rest, about)
    } else {
        frames::icmp6_error(kind, code, rest, about)
    };
    frame(a, b, proto::ICMP, &l4)
}

/// The connection key of the packet from `a` to `b` in `zone`, and whether `a` is `lo`.
fn key(zone: &Port, protocol: u8, a: Ep, b: Ep) -> (CtKey, bool) {
    ct_key(zone.slot, protocol, a.ip, a.port, b.ip, b.port)
}

struct Node {
    h: Harness,
    ifindex: [u32; 5],
    /// Address classes handed out by `allow`, by (policy, direction, remote).
    classes: HashMap<(u32, u8, IpNet), u32>,
    next_class: u32,
    revision: [u32; 5],
}

fn with_node(tag: &str, body: impl FnOnce(&mut Node) -> Result<()> + Send) -> Result<()> {
    with_node_sized(tag, true, Sizes::default(), body)
}

fn with_node_sized(
    tag: &str,
    trace: bool,
    sizes: Sizes,
    body: impl FnOnce(&mut Node) -> Result<()> + Send,
) -> Result<()> {
    let ns = NetNs::new(tag)?;
    let mut ifindex = [0; 5];
    for (i, p) in PORTS.iter().enumerate() {
        ifindex[i] = ns.add_veth(p.dev, None, p.peer)?;
    }
    ns.run(move || {
        let mut node = Node {
            h: Harness::load_sized(trace, sizes)?,
            ifindex,
            classes: HashMap::new(),
            next_class: 1000,
            revision: [1; 5],
        };
        node.program()?;
        body(&mut node)
    })?
}

impl Node {
    fn program(&mut self) -> Result<()> {
        let mut flood = Vec::new();
        for p in PORTS {
            let ifindex = self.ifx(p);
            self.set_port(p)?;
            for addr in [p.ip6, p.ll6] {
                self.h.allow_ip6(p.slot, p.mac, addr)?;
            }
            self.h.allow_ip4(p.slot, p.mac, p.ip4)?;
            self.h.add_fdb(
                NET,
                p.mac,
                FdbEntry {
                    ifindex,
                    port_slot: p.slot,
                    flags: 0,
                },
            )?;
            let flags = if p.slot == EXT.slot {
                dataplane_abi::flood_flags::ACCEPTS_UNKNOWN
            } else {
                0
            };
            flood.push(FloodEntry { ifindex, flags });
        }
        self.h.set_flood(NET, &flood)
    }

    fn set_port(&mut self, p: &Port) -> Result<()> {
        let info = PortInfo {
            port_slot: p.slot,
            network_slot: NET,
            flags: p.flags,
            mac: p.mac,
            _pad: [0; 2],
            policy_id: p.slot,
            policy_revision: self.revision[p.slot as usize - 1],
        };
        self.h.add_port(self.ifx(p), info)
    }

    /// A new revision of `p`'s policy, as the agent publishes after changing its rules.
    fn bump_revision(&mut self, p: &Port) -> Result<u32> {
        self.revision[p.slot as usize - 1] += 1;
        self.set_port(p)?;
        Ok(self.revision[p.slot as usize - 1])
    }

    fn ifx(&self, p: &Port) -> u32 {
        self.ifindex[p.slot as usize - 1]
    }

    /// `p`'s policy allows `m` in `direction` for remotes in `remote`, charged to rule
    /// `slot`. One address class per remote prefix: for tests whose prefixes of one
    /// policy and direction do not nest (nesting ones set classes themselves).
    fn allow(
        &mut self,
        p: &Port,
        direction: u8,
        remote: &str,
        m: RuleMatch,
        slot: u32,
    ) -> Result<u32> {
        let remote = net(remote);
        let class = match self.classes.get(&(p.slot, direction, remote)) {
            Some(&class) => class,
            None => {
                let class = self.next_class;
                self.next_class += 1;
                self.classes.insert((p.slot, direction, remote), class);
                self.h.add_remote(p.slot, direction, remote, class)?;
                class
            }
        };
        self.h.add_rule(class, m, slot)?;
        Ok(class)
    }

    /// `frame` from the VM of `p` through `port_ingress`.
    fn send(&mut self, p: &Port, frame: &[u8]) -> Result<Outcome> {
        self.h.ingress(self.ifx(p), frame)
    }

    /// `frame` from the VM of `p` is switched (unicast or flood).
    fn pass_out(&mut self, p: &Port, frame: &[u8], what: &str) -> Result<()> {
        let out = self.send(p, frame)?;
        ensure!(
            out.ret == TC_ACT_REDIRECT
                && matches!(
                    out.verdict.action,
                    verdict_action::UNICAST | verdict_action::FLOOD
                ),
            "{what}: expected to pass out of {}, got {}",
            p.dev,
            describe(&out)
        );
        Ok(())
    }

    /// `frame` from the VM of `p` is dropped for `reason`, counted once more.
    fn drop_out(&mut self, p: &Port, frame: &[u8], reason: DropReason, what: &str) -> Result<()> {
        let before = self.drops(p, reason)?;
        let out = self.send(p, frame)?;
        ensure!(
            out.ret == TC_ACT_SHOT && out.drop_reason() == Some(reason),
            "{what}: expected {reason:?} out of {}, got {}",
            p.dev,
            describe(&out)
        );
        let after = self.drops(p, reason)?;
        ensure!(
            after == before + 1,
            "{what}: {reason:?} counted {before} -> {after}"
        );
        Ok(())
    }

    /// `frame`, switched from `from`, through `port_egress` of `p`: its return code.
    fn deliver(&mut self, p: &Port, from: &Port, frame: &[u8]) -> Result<i32> {
        Ok(self
            .h
            .egress(self.ifx(p), MARK_FROM_DATAPATH | from.slot, frame)?
            .ret)
    }

    /// `frame` from `from` reaches the VM of `p`.
    fn pass_in(&mut self, p: &Port, from: &Port, frame: &[u8], what: &str) -> Result<()> {
        let tx = self.h.port_stats(p.slot)?.tx_packets;
        let ret = self.deliver(p, from, frame)?;
        let stats = self.h.port_stats(p.slot)?;
        ensure!(
            ret == TC_ACT_OK && stats.tx_packets == tx + 1,
            "{what}: expected to reach {}, got ret {ret}, drops {:?}",
            p.dev,
            nonzero_drops(&stats.drops)
        );
        Ok(())
    }

    /// `frame` from `from` towards the VM of `p` is dropped for `reason`.
    fn drop_in(
        &mut self,
        p: &Port,
        from: &Port,
        frame: &[u8],
        reason: DropReason,
        what: &str,
    ) -> Result<()> {
        let before = self.h.port_stats(p.slot)?;
        let ret = self.deliver(p, from, frame)?;
        let after = self.h.port_stats(p.slot)?;
        ensure!(
            ret == TC_ACT_SHOT && after.drops[reason as usize] == before.drops[reason as usize] + 1,
            "{what}: expected {reason:?} towards {}, got ret {ret}, drops {:?} -> {:?}",
            p.dev,
            nonzero_drops(&before.drops),
            nonzero_drops(&after.drops)
        );
        ensure!(
            after.tx_packets == before.tx_packets,
            "{what}: counted as delivered"
        );
        Ok(())
    }

    fn drops(&self, p: &Port, reason: DropReason) -> Result<u64> {
        Ok(self.h.port_stats(p.slot)?.drops[reason as usize])
    }

    /// The entry of `key` and its table, failing if there is none.
    fn entry(&self, key: &CtKey, what: &str) -> Result<(CtTable, CtEntry)> {
        self.h
            .ct_get(key)?
            .with_context(|| format!("{what}: no conntrack entry for {key:?}"))
    }

    fn expect_entry(
        &self,
        key: &CtKey,
        table: CtTable,
        state: u8,
        flags: u8,
        what: &str,
    ) -> Result<CtEntry> {
        let (t, e) = self.entry(key, what)?;
        ensure!(
            t == table && e.state == state && e.flags == flags,
            "{what}: expected {table:?} state {state} flags {flags:#x}, got {t:?} state {} flags {:#x}",
            e.state,
            e.flags
        );
        Ok(e)
    }

    fn expect_no_entry(&self, key: &CtKey, what: &str) -> Result<()> {
        let found = self.h.ct_get(key)?;
        ensure!(found.is_none(), "{what}: unexpected entry {found:?}");
        Ok(())
    }

    fn ct_stat(&self, stat: u32) -> Result<u64> {
        Ok(self.h.ct_stats()?[stat as usize])
    }

    /// Entries of `zone` in both tables.
    fn zone_entries(&self, zone: &Port) -> Result<usize> {
        let mut n = 0;
        for table in [CtTable::Confirmed, CtTable::New] {
            n += self
                .h
                .ct_entries(table)?
                .iter()
                .filter(|(k, _)| k.zone == zone.slot)
                .count();
        }
        Ok(n)
    }

    /// A TCP connection from the VM of `p` (`a`) to a host beyond the router (`b`),
    /// through the handshake: SYN out, SYN+ACK in, ACK out.
    fn connect_out(&mut self, p: &Port, a: Ep, b: Ep, what: &str) -> Result<()> {
        self.pass_out(p, &tcp(a, b, tcp_flags::SYN), &format!("{what}: syn"))?;
        self.pass_in(
            p,
            &EXT,
            &tcp(b, a, tcp_flags::SYN_ACK),
            &format!("{what}: syn+ack"),
        )?;
        self.pass_out(p, &tcp(a, b, tcp_flags::ACK), &format!("{what}: ack"))
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

fn nonzero_drops(drops: &[u64]) -> Vec<(DropReason, u64)> {
    drops
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != 0)
        .filter_map(|(r, n)| DropReason::from_u32(r as u32).map(|r| (r, *n)))
        .collect()
}

/// The flags of an entry opened by a packet from `a` (its `from_lo`), in `direction`.
fn orig_flags(from_lo: bool, direction: u8) -> u8 {
    let mut f = 0;
    if from_lo {
        f |= ct_flags::ORIG_FROM_LO;
    }
    if direction == EGRESS {
        f |= ct_flags::ORIG_EGRESS;
    }
    f
}

/// The FIN flag of the endpoint that is `lo` or not.
fn fin_of(is_lo: bool) -> u8 {
    if is_lo {
        ct_flags::FIN_LO
    } else {
        ct_flags::FIN_HI
    }
}

// ---------------------------------------------------------------------------------
// Classification

/// The rules of an address class: (match, rule slot).
type ClassRules<'a> = &'a [(RuleMatch, u32)];

#[test]
fn remote_prefix_longest_match_picks_the_class() -> Result<()> {
    with_node("sg-remote", |n| {
        let p = SC.slot;
        // Classes as the agent compiles nested prefixes: each holds every rule whose
        // remote contains its prefix. Rules: 1 icmp from anywhere, 2 tcp/22 to 10/8,
        // 3 udp/53 to 10.0.0/24, 4 tcp/80 to 10.0.0.9.
        let icmp = RuleMatch::Protocol(proto::ICMP);
        let ssh = RuleMatch::Ports {
            protocol: proto::TCP,
            min: 22,
            max: 22,
        };
        let dns = RuleMatch::Ports {
            protocol: proto::UDP,
            min: 53,
            max: 53,
        };
        let http = RuleMatch::Ports {
            protocol: proto::TCP,
            min: 80,
            max: 80,
        };
        let classes: [(&str, u32, ClassRules); 4] = [
            ("0.0.0.0/0", 10, &[(icmp, 1)]),
            ("10.0.0.0/8", 11, &[(icmp, 1), (ssh, 2)]),
            ("10.0.0.0/24", 12, &[(icmp, 1), (ssh, 2), (dns, 3)]),
            (
                "10.0.0.9/32",
                13,
                &[(icmp, 1), (ssh, 2), (dns, 3), (http, 4)],
            ),
        ];
        for (prefix, class, rules) in classes {
            n.h.add_remote(p, EGRESS, net(prefix), class)?;
            for &(m, slot) in rules {
                n.h.add_rule(class, m, slot)?;
            }
        }
        let me = |port| ep(&SC, SC.ip4, port);
        let to = |ip: &str, port| out(v4(ip), port);
        let cases = [
            (
                "udp/53 to 10.0.0.5",
                udp(me(5000), to("10.0.0.5", 53)),
                true,
            ),
            (
                "udp/53 to 10.1.0.1",
                udp(me(5000), to("10.1.0.1", 53)),
                false,
            ),
            ("udp/53 outside", udp(me(5000), to("192.0.2.7", 53)), false),
            (
                "tcp/22 to 10.1.0.1",
                tcp(me(40000), to("10.1.0.1", 22), tcp_flags::SYN),
                true,
            ),
            (
                "tcp/22 outside",
                tcp(me(40000), to("192.0.2.7", 22), tcp_flags::SYN),
                false,
            ),
            (
                "tcp/80 to 10.0.0.9",
                tcp(me(40000), to("10.0.0.9", 80), tcp_flags::SYN),
                true,
            ),
            (
                "tcp/80 to 10.0.0.8",
                tcp(me(40000), to("10.0.0.8", 80), tcp_flags::SYN),
                false,
            ),
            ("icmp outside", echo(me(7), to("192.0.2.7", 0)), true),
            ("icmp to 10.0.0.9", echo(me(7), to("10.0.0.9", 0)), true),
        ];
        for (what, f, allowed) in &cases {
            if *allowed {
                n.pass_out(&SC, f, what)?;
            } else {
                n.drop_out(&SC, f, DropReason::PolicyDenied, what)?;
            }
        }

        // IPv6: no /0 at all, so the outside has no class.
        n.h.add_remote(p, EGRESS, net("fd00::/16"), 20)?;
        n.h.add_rule(20, dns, 5)?;
        n.h.add_remote(p, EGRESS, net("fd00:0:0:1::/64"), 21)?;
        n.h.add_rule(21, dns, 5)?;
        n.h.add_rule(
            21,
            RuleMatch::Ports {
                protocol: proto::TCP,
                min: 443,
                max: 443,
            },
            6,
        )?;
        let me6 = |port| ep(&SC, SC.ip6, port);
        let to6 = |ip: &str, port| out(v6(ip), port);
        n.pass_out(
            &SC,
            &udp(me6(5000), to6("fd00::5", 53)),
            "v6 udp/53 to fd00::/16",
        )?;
        n.drop_out(
            &SC,
            &tcp(me6(40000), to6("fd00::5", 443), tcp_flags::SYN),
            DropReason::PolicyDenied,
            "v6 tcp/443 to fd00::/16",
        )?;
        n.pass_out(
            &SC,
            &tcp(me6(40000), to6("fd00:0:0:1::5", 443), tcp_flags::SYN),
            "v6 tcp/443 to fd00:0:0:1::/64",
        )?;
        n.drop_out(
            &SC,
            &udp(me6(5000), to6("2001:db8::7", 53)),
            DropReason::PolicyDenied,
            "v6 outside",
        )?;

        // Ingress rules are another direction: the egress classes do not apply, and the
        // remote is the source.
        n.h.add_remote(p, INGRESS, net("192.0.2.0/24"), 30)?;
        n.h.add_rule(30, ssh, 7)?;
        let ssh_in = |from: &str| tcp(out(v4(from), 40000), ep(&SC, SC.ip4, 22), tcp_flags::SYN);
        n.pass_in(&SC, &EXT, &ssh_in("192.0.2.200"), "ssh from 192.0.2.0/24")?;
        n.drop_in(
            &SC,
            &EXT,
            &ssh_in("10.0.0.9"),
            DropReason::PolicyDenied,
            "ssh from 10.0.0.9",
        )?;
        let http_in = tcp(
            out(v4("10.0.0.9"), 40000),
            ep(&SC, SC.ip4, 80),
            tcp_flags::SYN,
        );
        n.drop_in(
            &SC,
            &EXT,
            &http_in,
            DropReason::PolicyDenied,
            "egress class on ingress",
        )?;
        // Another policy's classes are not this port's.
        n.drop_out(
            &SD,
            &udp(ep(&SD, SD.ip4, 5000), to("10.0.0.5", 53)),
            DropReason::PolicyDenied,
            "policy 4",
        )?;
        Ok(())
    })
}

#[test]
fn protocol_and_port_ranges_at_block_boundaries() -> Result<()> {
    // 1000..=1999 is seven aligned blocks.
    assert_eq!(
        port_blocks(1000, 1999),
        [
            (1000, 13),
            (1008, 12),
            (1024, 7),
            (1536, 8),
            (1792, 9),
            (1920, 10),
            (1984, 12)
        ]
    );
    assert_eq!(port_blocks(0, 65535), [(0, 0)]);
    assert_eq!(port_blocks(80, 80), [(80, 16)]);
    with_node("sg-ports", |n| {
        let tcp_range = RuleMatch::Ports {
            protocol: proto::TCP,
            min: 1000,
            max: 1999,
        };
        for any in ["0.0.0.0/0", "::/0"] {
            n.allow(&SC, EGRESS, any, tcp_range, 1)?;
        }
        n.allow(
            &SC,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::Ports {
                protocol: proto::UDP,
                min: 53,
                max: 53,
            },
            2,
        )?;
        n.allow(
            &SC,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::Ports {
                protocol: proto::SCTP,
                min: 5000,
                max: 5001,
            },
            3,
        )?;
        n.allow(
            &SC,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::Ports {
                protocol: proto::UDPLITE,
                min: 7,
                max: 7,
            },
            4,
        )?;
        n.allow(
            &SC,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::Ports {
                protocol: proto::DCCP,
                min: 9,
                max: 9,
            },
            5,
        )?;
        let me = |port| ep(&SC, SC.ip4, port);
        let me6 = |port| ep(&SC, SC.ip6, port);
        let mut allowed = vec![
            1000, 1007, 1008, 1023, 1024, 1535, 1536, 1791, 1792, 1919, 1920, 1983, 1984, 1999,
        ];
        let denied = [0, 1, 999, 2000, 2047, 65535];
        for port in allowed.drain(..) {
            n.pass_out(
                &SC,
                &tcp(me(40000), out(OUT4, port), tcp_flags::SYN),
                &format!("tcp/{port}"),
            )?;
            n.pass_out(
                &SC,
                &tcp(me6(40000), out(OUT6, port), tcp_flags::SYN),
                &format!("v6 tcp/{port}"),
            )?;
        }
        for port in denied {
            n.drop_out(
                &SC,
                &tcp(me(40000), out(OUT4, port), tcp_flags::SYN),
                DropReason::PolicyDenied,
                &format!("tcp/{port}"),
            )?;
            n.drop_out(
                &SC,
                &tcp(me6(40000), out(OUT6, port), tcp_flags::SYN),
                DropReason::PolicyDenied,
                &format!("v6 tcp/{port}"),
            )?;
        }
        // The source port is not what rules match.
        n.drop_out(
            &SC,
            &tcp(me(1500), out(OUT4, 80), tcp_flags::SYN),
            DropReason::PolicyDenied,
            "source port in range",
        )?;
        // The protocol is.
        n.drop_out(
            &SC,
            &udp(me(5000), out(OUT4, 1500)),
            DropReason::PolicyDenied,
            "udp to a tcp range",
        )?;
        n.pass_out(&SC, &udp(me(5000), out(OUT4, 53)), "udp/53")?;
        n.drop_out(
            &SC,
            &udp(me(5000), out(OUT4, 54)),
            DropReason::PolicyDenied,
            "udp/54",
        )?;
        let ported = |protocol, dport| {
            frame(
                me(5000),
                out(OUT4, dport),
                protocol,
                &frames::ports_header(5000, dport, &[0; 12]),
            )
        };
        for (protocol, ok, bad) in [
            (proto::SCTP, [5000, 5001], [4999, 5002]),
            (proto::UDPLITE, [7, 7], [6, 8]),
            (proto::DCCP, [9, 9], [8, 10]),
        ] {
            for port in ok {
                n.pass_out(
                    &SC,
                    &ported(protocol, port),
                    &format!("protocol {protocol} port {port}"),
                )?;
            }
            for port in bad {
                n.drop_out(
                    &SC,
                    &ported(protocol, port),
                    DropReason::PolicyDenied,
                    &format!("protocol {protocol} port {port}"),
                )?;
            }
        }
        // A port header cut short is malformed, not judged.
        let short = frames::ip4_frame(EXT.mac, SC.mac, SC.ip4, OUT4, proto::SCTP, &[0x13, 0x88]);
        n.drop_out(
            &SC,
            &short,
            DropReason::MalformedL4,
            "sctp header of 2 bytes",
        )?;
        Ok(())
    })
}

#[test]
fn icmp_type_and_code_rules() -> Result<()> {
    with_node("sg-icmp", |n| {
        n.allow(
            &SC,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::IcmpType {
                protocol: proto::ICMP,
                kind: 8,
            },
            1,
        )?;
        n.allow(
            &SC,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::IcmpCode {
                protocol: proto::ICMP,
                kind: 3,
                code: 4,
            },
            2,
        )?;
        n.allow(
            &SC,
            EGRESS,
            "::/0",
            RuleMatch::IcmpType {
                protocol: proto::ICMPV6,
                kind: 128,
            },
            3,
        )?;
        n.allow(
            &SC,
            EGRESS,
            "::/0",
            RuleMatch::IcmpCode {
                protocol: proto::ICMPV6,
                kind: 1,
                code: 4,
            },
            4,
        )?;
        let me = ep(&SC, SC.ip4, 7);
        let me6 = ep(&SC, SC.ip6, 7);
        let there = out(OUT4, 0);
        let there6 = out(OUT6, 0);
        // Something to be about, for the errors.
        let about = udp(there, ep(&SC, SC.ip4, 53));
        let about6 = udp(there6, ep(&SC, SC.ip6, 53));
        n.pass_out(&SC, &echo(me, there), "echo request")?;
        n.drop_out(
            &SC,
            &echo_reply(me, there),
            DropReason::PolicyDenied,
            "echo reply",
        )?;
        n.pass_out(
            &SC,
            &icmp_error(me, there, 3, 4, 1400, &about),
            "frag needed (3/4)",
        )?;
        n.drop_out(
            &SC,
            &icmp_error(me, there, 3, 3, 0, &about),
            DropReason::PolicyDenied,
            "port unreachable (3/3)",
        )?;
        n.drop_out(
            &SC,
            &frame(me, there, proto::ICMP, &frames::icmp4(13, 0, &[0; 16])),
            DropReason::PolicyDenied,
            "timestamp",
        )?;
        n.pass_out(&SC, &echo(me6, there6), "v6 echo request")?;
        n.drop_out(
            &SC,
            &echo_reply(me6, there6),
            DropReason::PolicyDenied,
            "v6 echo reply",
        )?;
        n.pass_out(
            &SC,
            &icmp_error(me6, there6, 1, 4, 0, &about6),
            "v6 port unreachable (1/4)",
        )?;
        n.drop_out(
            &SC,
            &icmp_error(me6, there6, 1, 3, 0, &about6),
            DropReason::PolicyDenied,
            "v6 address unreachable (1/3)",
        )?;
        // ICMP rules of one family are not the other's.
        n.drop_out(
            &SC,
            &frame(me6, there6, proto::ICMP, &frames::icmp6(8, 0, &[0; 4])),
            DropReason::PolicyDenied,
            "v6 type 8",
        )?;
        // A message cut below its 8-byte header is malformed.
        let short = frames::ip4_frame(EXT.mac, SC.mac, SC.ip4, OUT4, proto::ICMP, &[8, 0, 0, 0]);
        n.drop_out(&SC, &short, DropReason::MalformedL4, "icmp of 4 bytes")?;
        Ok(())
    })
}

#[test]
fn any_protocol_rules_and_protocols_without_ports() -> Result<()> {
    with_node("sg-any", |n| {
        n.allow(&SC, EGRESS, "192.0.2.0/24", RuleMatch::Any, 1)?;
        n.allow(
            &SC,
            EGRESS,
            "198.51.100.0/24",
            RuleMatch::Protocol(proto::GRE),
            2,
        )?;
        n.allow(&SC, EGRESS, "2001:db8::/32", RuleMatch::Any, 3)?;
        let me = |port| ep(&SC, SC.ip4, port);
        let gre = |to: Ipv4Addr| frame(me(0), out(to, 0), proto::GRE, &[0, 0, 0x08, 0, 1, 2, 3, 4]);
        let net1 = v4("192.0.2.9");
        let net2 = v4("198.51.100.9");
        n.pass_out(&SC, &gre(net1), "gre, any protocol")?;
        n.pass_out(&SC, &udp(me(1), out(net1, 65535)), "udp, any protocol")?;
        n.pass_out(
            &SC,
            &tcp(me(1), out(net1, 1), tcp_flags::SYN),
            "tcp, any protocol",
        )?;
        n.pass_out(&SC, &echo(me(1), out(net1, 0)), "icmp, any protocol")?;
        n.pass_out(&SC, &gre(net2), "gre, gre rule")?;
        n.drop_out(
            &SC,
            &udp(me(1), out(net2, 53)),
            DropReason::PolicyDenied,
            "udp, gre rule",
        )?;
        n.drop_out(
            &SC,
            &gre(v4("203.0.113.1")),
            DropReason::PolicyDenied,
            "gre, no rule",
        )?;
        let me6 = ep(&SC, SC.ip6, 9);
        n.pass_out(&SC, &udp(me6, out(OUT6, 9)), "v6 any protocol")?;
        n.pass_out(
            &SC,
            &frame(me6, out(OUT6, 0), proto::GRE, &[0; 8]),
            "v6 gre, any protocol",
        )?;
        let stats = n.h.rule_stats(1)?;
        ensure!(stats.packets == 4, "rule 1 counted {stats:?}");
        Ok(())
    })
}

#[test]
fn empty_policy_drops_ip_but_not_arp_nd_or_dhcp_clients() -> Result<()> {
    with_node("sg-empty", |n| {
        let me = |port| ep(&SD, SD.ip4, port);
        let me6 = |port| ep(&SD, SD.ip6, port);
        let denied_out = [
            ("udp", udp(me(5000), out(OUT4, 53))),
            ("tcp syn", tcp(me(40000), out(OUT4, 80), tcp_flags::SYN)),
            ("tcp ack", tcp(me(40000), out(OUT4, 80), tcp_flags::ACK)),
            ("echo", echo(me(1), out(OUT4, 0))),
            ("gre", frame(me(0), out(OUT4, 0), proto::GRE, &[0; 8])),
            ("v6 udp", udp(me6(5000), out(OUT6, 53))),
            ("v6 echo", echo(me6(1), out(OUT6, 0))),
            ("to a neighbour", udp(me(5000), ep(&SB, SB.ip4, 53))),
            // Only the client's ports are a DHCP request.
            ("udp 68 to 68", udp(me(68), out(OUT4, 68))),
            ("dhcpv6 ports, ipv4", udp(me(546), out(OUT4, 547))),
        ];
        for (what, f) in &denied_out {
            n.drop_out(&SD, f, DropReason::PolicyDenied, what)?;
        }
        let all_routers = v6("ff02::2");
        let rs = frames::icmp6(frames::icmp6_type::ROUTER_SOLICIT, 0, &[0; 4]);
        let dhcp6_servers = v6("ff02::1:2");
        let solicit = frames::ethernet(
            frames::multicast_mac(dhcp6_servers),
            SD.mac,
            ethertype::IPV6,
            &frames::ipv6(
                SD.ll6,
                dhcp6_servers,
                proto::UDP,
                &frames::udp(546, 547, &frames::dhcp6(1)),
            ),
        );
        let renew = udp(me(68), out(ROUTER4, 67));
        let passing_out = [
            ("arp", frames::arp_request_frame(SD.mac, SD.ip4, SB.ip4)),
            ("ns", frames::ns_frame(SD.mac, SD.ip6, SB.ip6, Some(SD.mac))),
            (
                "dad ns",
                frames::ns_frame(SD.mac, Ipv6Addr::UNSPECIFIED, SD.ip6, None),
            ),
            (
                "na",
                frames::na_frame(SD.mac, SD.ip6, SB.mac, SB.ip6, SD.ip6, Some(SD.mac)),
            ),
            (
                "rs",
                frames::icmp6_multicast_frame(SD.mac, SD.ll6, all_routers, &rs),
            ),
            (
                "mldv2 report",
                frames::mld2_report_frame(SD.mac, SD.ll6, frames::solicited_node(SD.ip6)),
            ),
            (
                "mldv1 report",
                frames::mld1_report_frame(SD.mac, SD.ll6, frames::solicited_node(SD.ip6)),
            ),
            ("dhcp discover", frames::dhcp_discover_frame(SD.mac)),
            ("dhcp renew", renew),
            ("dhcpv6 solicit", solicit),
        ];
        for (what, f) in &passing_out {
            n.pass_out(&SD, f, what)?;
        }
        let from6 = |ip| ep(&EXT, ip, 0);
        let mld_query = frames::ethernet(
            frames::multicast_mac(v6("ff02::1")),
            EXT.mac,
            ethertype::IPV6,
            &frames::ipv6(
                v6("fe80::fe"),
                v6("ff02::1"),
                proto::ICMPV6,
                &frames::icmp6(130, 0, &[0; 20]),
            ),
        );
        let passing_in = [
            ("arp", frames::arp_request_frame(EXT.mac, ROUTER4, SD.ip4)),
            (
                "ns",
                frames::ns_frame(EXT.mac, ROUTER6, SD.ip6, Some(EXT.mac)),
            ),
            (
                "na",
                frames::na_frame(EXT.mac, ROUTER6, SD.mac, SD.ip6, ROUTER6, Some(EXT.mac)),
            ),
            ("ra", frames::ra_frame(EXT.mac, v6("fe80::fe"))),
            ("mld query", mld_query),
        ];
        for (what, f) in &passing_in {
            n.pass_in(&SD, &EXT, f, what)?;
        }
        let denied_in = [
            ("udp", udp(out(OUT4, 53), me(5000))),
            ("echo", echo(out(OUT4, 1), me(0))),
            ("v6 echo", echo(from6(OUT6), me6(0))),
            // DHCP replies need rules (the agent's compiler adds them for the subnet's
            // DHCP servers, as Neutron does).
            (
                "dhcp offer",
                frames::dhcp_offer_frame(EXT.mac, ROUTER4, SD.mac, SD.ip4),
            ),
            (
                "dhcpv6 advertise",
                frames::dhcp6_advertise_frame(EXT.mac, v6("fe80::fe"), SD.mac, SD.ll6),
            ),
        ];
        for (what, f) in &denied_in {
            n.drop_in(&SD, &EXT, f, DropReason::PolicyDenied, what)?;
        }
        // Nothing was tracked: denied, or allowed without tracking.
        ensure!(n.zone_entries(&SD)? == 0, "entries for sd");
        // Port security still comes first.
        n.drop_out(
            &SD,
            &frames::ra_frame(SD.mac, SD.ll6),
            DropReason::RouterAdvertisementFromPort,
            "ra from the vm",
        )?;
        n.drop_out(
            &SD,
            &udp(ep(&SD, SB.ip4, 1), out(OUT4, 2)),
            DropReason::SourceIpSpoofed,
            "spoofed",
        )?;
        Ok(())
    })
}

#[test]
fn rule_counters_count_what_each_rule_let_through() -> Result<()> {
    with_node("sg-counters", |n| {
        n.allow(
            &SC,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::Ports {
                protocol: proto::UDP,
                min: 53,
                max: 53,
            },
            7,
        )?;
        n.allow(
            &SC,
            INGRESS,
            "192.0.2.0/24",
            RuleMatch::Ports {
                protocol: proto::UDP,
                min: 5000,
                max: 5999,
            },
            8,
        )?;
        n.allow(
            &SA,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::Ports {
                protocol: proto::TCP,
                min: 443,
                max: 443,
            },
            9,
        )?;
        let q = udp(ep(&SC, SC.ip4, 5000), out(OUT4, 53));
        let r = udp(out(OUT4, 53), ep(&SC, SC.ip4, 5000));
        for _ in 0..3 {
            n.pass_out(&SC, &q, "query")?;
        }
        n.drop_out(
            &SC,
            &udp(ep(&SC, SC.ip4, 5000), out(OUT4, 54)),
            DropReason::PolicyDenied,
            "udp/54",
        )?;
        for _ in 0..2 {
            n.pass_in(&SC, &EXT, &r, "answer")?;
        }
        let s7 = n.h.rule_stats(7)?;
        let s8 = n.h.rule_stats(8)?;
        ensure!(
            s7 == RuleStats {
                packets: 3,
                bytes: 3 * q.len() as u64
            },
            "rule 7: {s7:?}"
        );
        ensure!(
            s8 == RuleStats {
                packets: 2,
                bytes: 2 * r.len() as u64
            },
            "rule 8: {s8:?}"
        );
        // Stateful: only a connection's first packet meets the rules.
        let (a, b) = (ep(&SA, SA.ip4, 40000), out(OUT4, 443));
        n.connect_out(&SA, a, b, "https")?;
        n.pass_out(&SA, &tcp(a, b, tcp_flags::PSH_ACK), "data")?;
        let s9 = n.h.rule_stats(9)?;
        let syn = tcp(a, b, tcp_flags::SYN);
        ensure!(
            s9 == RuleStats {
                packets: 1,
                bytes: syn.len() as u64
            },
            "rule 9: {s9:?}"
        );
        ensure!(n.h.rule_stats(1)? == RuleStats::default(), "rule 1 counted");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Connection tracking

#[test]
fn tcp_handshake_between_two_stateful_ports() -> Result<()> {
    with_node("sg-handshake", |n| {
        // sa may open TCP to the network; sb accepts ssh from sa only; sb has no
        // egress rules at all: its answers pass as replies.
        n.allow(
            &SA,
            EGRESS,
            "10.0.0.0/24",
            RuleMatch::Protocol(proto::TCP),
            1,
        )?;
        n.allow(&SA, EGRESS, "fd00::/64", RuleMatch::Protocol(proto::TCP), 1)?;
        n.allow(
            &SB,
            INGRESS,
            "10.0.0.1/32",
            RuleMatch::Ports {
                protocol: proto::TCP,
                min: 22,
                max: 22,
            },
            2,
        )?;
        n.allow(
            &SB,
            INGRESS,
            "fd00::1/128",
            RuleMatch::Ports {
                protocol: proto::TCP,
                min: 22,
                max: 22,
            },
            2,
        )?;
        let mut inserts = 0;
        let mut confirmed = 0;
        for (ipa, ipb) in [
            (IpAddr::V4(SA.ip4), IpAddr::V4(SB.ip4)),
            (IpAddr::V6(SA.ip6), IpAddr::V6(SB.ip6)),
        ] {
            let a = ep(&SA, ipa, 40000);
            let b = ep(&SB, ipb, 22);
            let (ka, a_lo) = key(&SA, proto::TCP, a, b);
            let (kb, _) = key(&SB, proto::TCP, a, b);
            let fa = orig_flags(a_lo, EGRESS);
            let fb = orig_flags(a_lo, INGRESS);

            n.pass_out(&SA, &tcp(a, b, tcp_flags::SYN), "syn out of sa")?;
            n.expect_entry(&ka, CtTable::New, ct_state::SYN_SENT, fa, "sa after syn")?;
            n.expect_no_entry(&kb, "sb before its egress")?;
            n.pass_in(&SB, &SA, &tcp(a, b, tcp_flags::SYN), "syn into sb")?;
            n.expect_entry(&kb, CtTable::New, ct_state::SYN_SENT, fb, "sb after syn")?;
            inserts += 2;

            n.pass_out(&SB, &tcp(b, a, tcp_flags::SYN_ACK), "syn+ack out of sb")?;
            n.expect_entry(
                &kb,
                CtTable::Confirmed,
                ct_state::SYN_RECV,
                fb | ct_flags::REPLIED,
                "sb after syn+ack",
            )?;
            n.pass_in(&SA, &SB, &tcp(b, a, tcp_flags::SYN_ACK), "syn+ack into sa")?;
            n.expect_entry(
                &ka,
                CtTable::Confirmed,
                ct_state::SYN_RECV,
                fa | ct_flags::REPLIED,
                "sa after syn+ack",
            )?;
            confirmed += 2;

            n.pass_out(&SA, &tcp(a, b, tcp_flags::ACK), "ack out of sa")?;
            n.pass_in(&SB, &SA, &tcp(a, b, tcp_flags::ACK), "ack into sb")?;
            n.expect_entry(
                &ka,
                CtTable::Confirmed,
                ct_state::ESTABLISHED,
                fa | ct_flags::REPLIED,
                "sa established",
            )?;
            n.expect_entry(
                &kb,
                CtTable::Confirmed,
                ct_state::ESTABLISHED,
                fb | ct_flags::REPLIED,
                "sb established",
            )?;
            for _ in 0..3 {
                n.pass_out(&SA, &tcp(a, b, tcp_flags::PSH_ACK), "data a->b")?;
                n.pass_in(&SB, &SA, &tcp(a, b, tcp_flags::PSH_ACK), "data into sb")?;
                n.pass_out(&SB, &tcp(b, a, tcp_flags::PSH_ACK), "data b->a")?;
                n.pass_in(&SA, &SB, &tcp(b, a, tcp_flags::PSH_ACK), "data into sa")?;
            }
            ensure!(n.ct_stat(ct_stat::NEW_INSERTS)? == inserts, "new inserts");
            ensure!(n.ct_stat(ct_stat::CONFIRMED)? == confirmed, "confirmed");

            // sb may answer, not open: a connection of its own to sa is denied on the
            // way out of sb, and sa has no ingress rule either.
            let b2 = ep(&SB, ipb, 5555);
            let a2 = ep(&SA, ipa, 80);
            n.drop_out(
                &SB,
                &tcp(b2, a2, tcp_flags::SYN),
                DropReason::PolicyDenied,
                "syn from sb",
            )?;
            n.drop_in(
                &SA,
                &SB,
                &tcp(b2, a2, tcp_flags::SYN),
                DropReason::PolicyDenied,
                "syn into sa",
            )?;
            // Another source port of sa's is another connection, which sb denies.
            let a3 = ep(&SA, ipa, 40001);
            let b3 = ep(&SB, ipb, 23);
            n.pass_out(&SA, &tcp(a3, b3, tcp_flags::SYN), "syn to telnet out of sa")?;
            n.drop_in(
                &SB,
                &SA,
                &tcp(a3, b3, tcp_flags::SYN),
                DropReason::PolicyDenied,
                "syn to telnet into sb",
            )?;
            inserts += 1;
        }
        Ok(())
    })
}

#[test]
fn fin_and_rst_close_connections() -> Result<()> {
    with_node("sg-close", |n| {
        n.allow(&SA, EGRESS, "0.0.0.0/0", RuleMatch::Protocol(proto::TCP), 1)?;
        let a = ep(&SA, SA.ip4, 40000);
        let b = out(OUT4, 443);
        let (k, a_lo) = key(&SA, proto::TCP, a, b);
        let f = orig_flags(a_lo, EGRESS) | ct_flags::REPLIED;
        n.connect_out(&SA, a, b, "conn 1")?;
        n.expect_entry(
            &k,
            CtTable::Confirmed,
            ct_state::ESTABLISHED,
            f,
            "established",
        )?;
        n.pass_out(&SA, &tcp(a, b, tcp_flags::FIN_ACK), "fin out")?;
        n.expect_entry(
            &k,
            CtTable::Confirmed,
            ct_state::CLOSING,
            f | fin_of(a_lo),
            "after fin out",
        )?;
        n.pass_in(&SA, &EXT, &tcp(b, a, tcp_flags::ACK), "ack of fin")?;
        n.expect_entry(
            &k,
            CtTable::Confirmed,
            ct_state::CLOSING,
            f | fin_of(a_lo),
            "half closed",
        )?;
        n.pass_in(&SA, &EXT, &tcp(b, a, tcp_flags::FIN_ACK), "fin in")?;
        let both = ct_flags::FIN_LO | ct_flags::FIN_HI;
        n.expect_entry(
            &k,
            CtTable::Confirmed,
            ct_state::CLOSED,
            f | both,
            "after both fins",
        )?;
        n.pass_out(&SA, &tcp(a, b, tcp_flags::ACK), "last ack")?;
        // A new SYN on the same endpoints opens a new connection.
        let deletes = n.ct_stat(ct_stat::DELETES)?;
        n.pass_out(&SA, &tcp(a, b, tcp_flags::SYN), "syn reusing the endpoints")?;
        n.expect_entry(
            &k,
            CtTable::New,
            ct_state::SYN_SENT,
            orig_flags(a_lo, EGRESS),
            "reopened",
        )?;
        ensure!(
            n.ct_stat(ct_stat::DELETES)? == deletes + 1,
            "closed entry deleted"
        );

        // RST of a confirmed connection: closed, kept for its short timeout.
        let a2 = ep(&SA, SA.ip4, 40002);
        let (k2, a2_lo) = key(&SA, proto::TCP, a2, b);
        n.connect_out(&SA, a2, b, "conn 2")?;
        n.pass_in(&SA, &EXT, &tcp(b, a2, tcp_flags::RST), "rst in")?;
        n.expect_entry(
            &k2,
            CtTable::Confirmed,
            ct_state::CLOSED,
            orig_flags(a2_lo, EGRESS) | ct_flags::REPLIED,
            "after rst",
        )?;
        n.pass_out(&SA, &tcp(a2, b, tcp_flags::RST), "rst out after rst")?;

        // RST answering a SYN: refused before it was confirmed, nothing left to track.
        let a3 = ep(&SA, SA.ip4, 40003);
        let (k3, _) = key(&SA, proto::TCP, a3, b);
        n.pass_out(&SA, &tcp(a3, b, tcp_flags::SYN), "syn 3")?;
        let deletes = n.ct_stat(ct_stat::DELETES)?;
        n.pass_in(
            &SA,
            &EXT,
            &tcp(b, a3, tcp_flags::RST | tcp_flags::ACK),
            "rst+ack refusing",
        )?;
        n.expect_no_entry(&k3, "refused")?;
        ensure!(
            n.ct_stat(ct_stat::DELETES)? == deletes + 1,
            "refused entry deleted"
        );
        // Without an entry, a second RST from outside is a packet of a new (loose)
        // connection into sa, which no ingress rule allows.
        n.drop_in(
            &SA,
            &EXT,
            &tcp(b, a3, tcp_flags::RST | tcp_flags::ACK),
            DropReason::PolicyDenied,
            "rst again",
        )?;

        // IPv6, closed by FINs from the other side first.
        n.allow(&SA, EGRESS, "::/0", RuleMatch::Protocol(proto::TCP), 1)?;
        let a6 = ep(&SA, SA.ip6, 40000);
        let b6 = out(OUT6, 443);
        let (k6, a6_lo) = key(&SA, proto::TCP, a6, b6);
        let f6 = orig_flags(a6_lo, EGRESS) | ct_flags::REPLIED;
        n.connect_out(&SA, a6, b6, "v6")?;
        n.pass_in(&SA, &EXT, &tcp(b6, a6, tcp_flags::FIN_ACK), "v6 fin in")?;
        n.expect_entry(
            &k6,
            CtTable::Confirmed,
            ct_state::CLOSING,
            f6 | fin_of(!a6_lo),
            "v6 after fin in",
        )?;
        n.pass_out(&SA, &tcp(a6, b6, tcp_flags::FIN_ACK), "v6 fin out")?;
        n.expect_entry(
            &k6,
            CtTable::Confirmed,
            ct_state::CLOSED,
            f6 | both,
            "v6 closed",
        )?;
        Ok(())
    })
}

#[test]
fn impossible_tcp_flags_are_ct_invalid() -> Result<()> {
    with_node("sg-invalid", |n| {
        for p in [&SA, &SC] {
            n.allow(p, EGRESS, "0.0.0.0/0", RuleMatch::Protocol(proto::TCP), 1)?;
            n.allow(p, INGRESS, "0.0.0.0/0", RuleMatch::Protocol(proto::TCP), 1)?;
            n.allow(p, EGRESS, "::/0", RuleMatch::Protocol(proto::TCP), 1)?;
        }
        let a = ep(&SA, SA.ip4, 40000);
        let b = out(OUT4, 80);
        let bad = [
            ("syn+fin", tcp_flags::SYN | tcp_flags::FIN),
            ("syn+rst", tcp_flags::SYN | tcp_flags::RST),
            (
                "syn+fin+ack",
                tcp_flags::SYN | tcp_flags::FIN | tcp_flags::ACK,
            ),
            ("no flags", 0),
        ];
        for (what, flags) in bad {
            n.drop_out(&SA, &tcp(a, b, flags), DropReason::CtInvalid, what)?;
            n.drop_out(
                &SA,
                &tcp(ep(&SA, SA.ip6, 1), out(OUT6, 2), flags),
                DropReason::CtInvalid,
                what,
            )?;
            n.drop_in(&SA, &EXT, &tcp(b, a, flags), DropReason::CtInvalid, what)?;
            // Only conntrack judges flags: a stateless port's rules allow these.
            n.pass_out(&SC, &tcp(ep(&SC, SC.ip4, 40000), b, flags), what)?;
        }
        // The answer to a SYN nobody sent.
        n.drop_out(
            &SA,
            &tcp(a, b, tcp_flags::SYN_ACK),
            DropReason::CtInvalid,
            "syn+ack without syn",
        )?;
        n.drop_in(
            &SA,
            &EXT,
            &tcp(b, a, tcp_flags::SYN_ACK),
            DropReason::CtInvalid,
            "syn+ack in without syn",
        )?;
        ensure!(n.zone_entries(&SA)? == 0, "invalid packets made entries");
        // Invalid flags on a tracked connection are invalid all the same.
        n.connect_out(&SA, a, b, "tracked")?;
        n.drop_in(
            &SA,
            &EXT,
            &tcp(b, a, tcp_flags::SYN | tcp_flags::FIN),
            DropReason::CtInvalid,
            "syn+fin on a connection",
        )?;
        Ok(())
    })
}

#[test]
fn mid_stream_tcp_is_picked_up_loosely() -> Result<()> {
    with_node("sg-loose", |n| {
        n.allow(
            &SA,
            EGRESS,
            "192.0.2.0/24",
            RuleMatch::Protocol(proto::TCP),
            1,
        )?;
        let a = ep(&SA, SA.ip4, 40000);
        let b = out(OUT4, 443);
        let (k, a_lo) = key(&SA, proto::TCP, a, b);
        let confirmed = n.ct_stat(ct_stat::CONFIRMED)?;
        n.pass_out(&SA, &tcp(a, b, tcp_flags::PSH_ACK), "data out, no entry")?;
        n.expect_entry(
            &k,
            CtTable::Confirmed,
            ct_state::ESTABLISHED,
            orig_flags(a_lo, EGRESS) | ct_flags::REPLIED,
            "picked up",
        )?;
        ensure!(
            n.ct_stat(ct_stat::CONFIRMED)? == confirmed + 1,
            "pick-up not counted"
        );
        ensure!(
            n.ct_stat(ct_stat::NEW_INSERTS)? == 0,
            "pick-up went through CT_NEW"
        );
        n.pass_in(&SA, &EXT, &tcp(b, a, tcp_flags::PSH_ACK), "answer")?;
        // A restart lost every entry: established connections go on.
        n.h.ct_flush(CtTable::Confirmed)?;
        // Picked up as a new connection of its own direction: inbound first, no rule.
        n.drop_in(
            &SA,
            &EXT,
            &tcp(b, a, tcp_flags::ACK),
            DropReason::PolicyDenied,
            "after flush, inbound first",
        )?;
        n.pass_out(&SA, &tcp(a, b, tcp_flags::ACK), "after flush, outbound")?;
        n.pass_in(
            &SA,
            &EXT,
            &tcp(b, a, tcp_flags::ACK),
            "after flush, inbound",
        )?;
        // Only as far as the rules allow the packet as a new connection's.
        n.drop_out(
            &SA,
            &tcp(a, out(v4("198.51.100.1"), 443), tcp_flags::ACK),
            DropReason::PolicyDenied,
            "mid-stream to elsewhere",
        )?;
        let b2 = out(OUT4, 444);
        n.drop_in(
            &SA,
            &EXT,
            &tcp(b2, a, tcp_flags::ACK),
            DropReason::PolicyDenied,
            "mid-stream in",
        )?;
        // A FIN picked up: closing at once.
        let a3 = ep(&SA, SA.ip4, 40003);
        let (k3, a3_lo) = key(&SA, proto::TCP, a3, b);
        n.pass_out(&SA, &tcp(a3, b, tcp_flags::FIN_ACK), "fin, no entry")?;
        n.expect_entry(
            &k3,
            CtTable::Confirmed,
            ct_state::CLOSING,
            orig_flags(a3_lo, EGRESS) | ct_flags::REPLIED | fin_of(a3_lo),
            "fin picked up",
        )?;
        Ok(())
    })
}

#[test]
fn udp_and_echo_replies_pass_without_ingress_rules() -> Result<()> {
    with_node("sg-replies", |n| {
        for any in ["0.0.0.0/0", "::/0"] {
            n.allow(&SA, EGRESS, any, RuleMatch::Protocol(proto::UDP), 1)?;
        }
        n.allow(
            &SA,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::Protocol(proto::ICMP),
            2,
        )?;
        n.allow(&SA, EGRESS, "::/0", RuleMatch::Protocol(proto::ICMPV6), 2)?;
        for (mine, theirs) in [
            (IpAddr::V4(SA.ip4), IpAddr::V4(OUT4)),
            (IpAddr::V6(SA.ip6), IpAddr::V6(OUT6)),
        ] {
            let fam = if mine.is_ipv4() { "v4" } else { "v6" };
            let a = ep(&SA, mine, 5000);
            let b = out(theirs, 53);
            let (k, a_lo) = key(&SA, proto::UDP, a, b);
            let f = orig_flags(a_lo, EGRESS);
            n.pass_out(&SA, &udp(a, b), &format!("{fam} query"))?;
            n.expect_entry(&k, CtTable::New, ct_state::OPEN, f, "after query")?;
            n.pass_in(&SA, &EXT, &udp(b, a), &format!("{fam} answer"))?;
            n.expect_entry(
                &k,
                CtTable::Confirmed,
                ct_state::OPEN,
                f | ct_flags::REPLIED,
                "after answer",
            )?;
            n.pass_in(&SA, &EXT, &udp(b, a), &format!("{fam} second answer"))?;
            n.pass_out(&SA, &udp(a, b), &format!("{fam} second query"))?;
            n.drop_in(
                &SA,
                &EXT,
                &udp(b, ep(&SA, mine, 5001)),
                DropReason::PolicyDenied,
                "to another port",
            )?;
            n.drop_in(
                &SA,
                &EXT,
                &udp(out(theirs, 54), a),
                DropReason::PolicyDenied,
                "from another port",
            )?;

            let pa = ep(&SA, mine, 77);
            let pb = out(theirs, 77);
            let proto_icmp = if mine.is_ipv4() {
                proto::ICMP
            } else {
                proto::ICMPV6
            };
            let (pk, pa_lo) = key(&SA, proto_icmp, pa, pb);
            let pf = orig_flags(pa_lo, EGRESS);
            n.pass_out(&SA, &echo(pa, pb), &format!("{fam} ping"))?;
            n.expect_entry(&pk, CtTable::New, ct_state::OPEN, pf, "after ping")?;
            n.pass_in(&SA, &EXT, &echo_reply(pb, pa), &format!("{fam} pong"))?;
            n.expect_entry(
                &pk,
                CtTable::Confirmed,
                ct_state::OPEN,
                pf | ct_flags::REPLIED,
                "after pong",
            )?;
            let other = out(theirs, 78);
            n.drop_in(
                &SA,
                &EXT,
                &echo_reply(other, ep(&SA, mine, 78)),
                DropReason::PolicyDenied,
                "pong of another identifier",
            )?;
            // A request from the side that answers is not part of the exchange.
            n.drop_in(
                &SA,
                &EXT,
                &echo(pb, pa),
                DropReason::PolicyDenied,
                "ping from the other side",
            )?;
            // Nor does a reply open one.
            let (ok, _) = key(&SA, proto_icmp, ep(&SA, mine, 79), out(theirs, 79));
            n.pass_out(
                &SA,
                &echo_reply(ep(&SA, mine, 79), out(theirs, 79)),
                "unsolicited pong out",
            )?;
            n.expect_no_entry(&ok, "pong made an entry")?;
        }
        Ok(())
    })
}

#[test]
fn icmp_errors_about_tracked_connections_pass_as_related() -> Result<()> {
    with_node("sg-related", |n| {
        for any in ["0.0.0.0/0", "::/0"] {
            n.allow(&SA, EGRESS, any, RuleMatch::Protocol(proto::TCP), 1)?;
            n.allow(&SA, EGRESS, any, RuleMatch::Protocol(proto::UDP), 1)?;
        }
        n.allow(
            &SA,
            EGRESS,
            "0.0.0.0/0",
            RuleMatch::Protocol(proto::ICMP),
            1,
        )?;
        let router = ep(&EXT, ROUTER4, 0);
        let router6 = ep(&EXT, ROUTER6, 0);
        let a = ep(&SA, SA.ip4, 40001);
        let b = out(OUT4, 443);
        let syn = tcp(a, b, tcp_flags::SYN);
        n.pass_out(&SA, &syn, "syn")?;
        let me = ep(&SA, SA.ip4, 0);
        let related = |n: &Node| n.ct_stat(ct_stat::RELATED);
        let r0 = related(n)?;
        // Path MTU discovery: frag needed from a router on the way.
        n.pass_in(
            &SA,
            &EXT,
            &icmp_error(router, me, 3, 4, 1400, &syn),
            "frag needed",
        )?;
        n.pass_in(
            &SA,
            &EXT,
            &icmp_error(router, me, 11, 0, 0, &syn),
            "time exceeded",
        )?;
        ensure!(related(n)? == r0 + 2, "related not counted");
        // About a connection that does not exist.
        let never = tcp(ep(&SA, SA.ip4, 40002), b, tcp_flags::SYN);
        n.drop_in(
            &SA,
            &EXT,
            &icmp_error(router, me, 3, 4, 1400, &never),
            DropReason::CtInvalid,
            "unrelated frag needed",
        )?;
        // An error quoting too little to say.
        let cut = frame(
            router,
            me,
            proto::ICMP,
            &frames::icmp4(3, 4, &[0, 0, 5, 0x78, 0x45, 0]),
        );
        n.drop_in(&SA, &EXT, &cut, DropReason::CtInvalid, "quote cut short")?;
        // A rule can still let unrelated errors in.
        n.allow(
            &SA,
            INGRESS,
            "10.0.0.254/32",
            RuleMatch::IcmpType {
                protocol: proto::ICMP,
                kind: 3,
            },
            2,
        )?;
        n.pass_in(
            &SA,
            &EXT,
            &icmp_error(router, me, 3, 4, 1400, &never),
            "unrelated, allowed by a rule",
        )?;
        ensure!(n.h.rule_stats(2)?.packets == 1, "rule 2 not charged");
        // Errors about a ping.
        let ping = echo(ep(&SA, SA.ip4, 9), out(OUT4, 9));
        n.pass_out(&SA, &ping, "ping")?;
        n.pass_in(
            &SA,
            &EXT,
            &icmp_error(ep(&EXT, v4("192.0.2.1"), 0), me, 11, 0, 0, &ping),
            "ttl exceeded of a ping",
        )?;

        // IPv6: packet too big about a datagram.
        let a6 = ep(&SA, SA.ip6, 5000);
        let b6 = out(OUT6, 53);
        let dgram = udp(a6, b6);
        n.pass_out(&SA, &dgram, "v6 datagram")?;
        let me6 = ep(&SA, SA.ip6, 0);
        n.pass_in(
            &SA,
            &EXT,
            &icmp_error(router6, me6, icmp6_type::PACKET_TOO_BIG, 0, 1280, &dgram),
            "packet too big",
        )?;
        n.pass_in(
            &SA,
            &EXT,
            &icmp_error(router6, me6, icmp6_type::DEST_UNREACH, 4, 0, &dgram),
            "v6 port unreachable",
        )?;
        let other = udp(ep(&SA, SA.ip6, 5001), b6);
        n.drop_in(
            &SA,
            &EXT,
            &icmp_error(router6, me6, icmp6_type::PACKET_TOO_BIG, 0, 1280, &other),
            DropReason::CtInvalid,
            "unrelated packet too big",
        )?;

        // Errors the VM sends about what reached it: sb accepts udp/6000 and answers
        // "port unreachable", which no egress rule of sb's allows.
        n.allow(
            &SB,
            INGRESS,
            "0.0.0.0/0",
            RuleMatch::Ports {
                protocol: proto::UDP,
                min: 6000,
                max: 6000,
            },
            3,
        )?;
        let probe = udp(out(OUT4, 53), ep(&SB, SB.ip4, 6000));
        n.pass_in(&SB, &EXT, &probe, "probe into sb")?;
        let sb = ep(&SB, SB.ip4, 0);
        n.pass_out(
            &SB,
            &icmp_error(
                sb,
                out(OUT4, 0),
                icmp4_type::DEST_UNREACH,
                icmp4_type::CODE_PORT_UNREACH,
                0,
                &probe,
            ),
            "port unreachable from sb",
        )?;
        let stray = udp(out(OUT4, 53), ep(&SB, SB.ip4, 6001));
        n.drop_out(
            &SB,
            &icmp_error(sb, out(OUT4, 0), 3, 3, 0, &stray),
            DropReason::CtInvalid,
            "unreachable about nothing",
        )?;

        // A stateless port judges errors by its rules alone.
        let sc = ep(&SC, SC.ip4, 0);
        let sc_syn = tcp(ep(&SC, SC.ip4, 40000), b, tcp_flags::SYN);
        n.drop_in(
            &SC,
            &EXT,
            &icmp_error(router, sc, 3, 4, 1400, &sc_syn),
            DropReason::PolicyDenied,
            "stateless frag needed",
        )?;
        n.allow(
            &SC,
            INGRESS,
            "10.0.0.254/32",
            RuleMatch::Protocol(proto::ICMP),
            4,
        )?;
        n.pass_in(
            &SC,
            &EXT,
            &icmp_error(router, sc, 3, 4, 1400, &sc_syn),
            "stateless, allowed",
        )?;
        Ok(())
    })
}

#[test]
fn stateless_ports_need_rules_for_replies() -> Result<()> {
    with_node("sg-stateless", |n| {
        n.allow(&SC, EGRESS, "0.0.0.0/0", RuleMatch::Protocol(proto::UDP), 1)?;
        n.allow(&SC, EGRESS, "0.0.0.0/0", RuleMatch::Protocol(proto::TCP), 1)?;
        let a = ep(&SC, SC.ip4, 5000);
        let b = out(OUT4, 53);
        n.pass_out(&SC, &udp(a, b), "query")?;
        n.drop_in(
            &SC,
            &EXT,
            &udp(b, a),
            DropReason::PolicyDenied,
            "answer without a rule",
        )?;
        let t = ep(&SC, SC.ip4, 40000);
        let s = out(OUT4, 443);
        n.pass_out(&SC, &tcp(t, s, tcp_flags::SYN), "syn")?;
        n.drop_in(
            &SC,
            &EXT,
            &tcp(s, t, tcp_flags::SYN_ACK),
            DropReason::PolicyDenied,
            "syn+ack without a rule",
        )?;
        // The answers need rules of their own (the destination port is the VM's).
        n.allow(
            &SC,
            INGRESS,
            "192.0.2.0/24",
            RuleMatch::Ports {
                protocol: proto::UDP,
                min: 5000,
                max: 5000,
            },
            2,
        )?;
        n.allow(
            &SC,
            INGRESS,
            "192.0.2.0/24",
            RuleMatch::Ports {
                protocol: proto::TCP,
                min: 32768,
                max: 60999,
            },
            3,
        )?;
        n.pass_in(&SC, &EXT, &udp(b, a), "answer with a rule")?;
        n.pass_in(
            &SC,
            &EXT,
            &tcp(s, t, tcp_flags::SYN_ACK),
            "syn+ack with a rule",
        )?;
        ensure!(
            n.zone_entries(&SC)? == 0,
            "a stateless port tracked connections"
        );
        ensure!(n.ct_stat(ct_stat::NEW_INSERTS)? == 0, "inserts");
        Ok(())
    })
}

#[test]
fn a_new_policy_revision_revokes_what_it_no_longer_allows() -> Result<()> {
    with_node("sg-revision", |n| {
        let http = RuleMatch::Ports {
            protocol: proto::TCP,
            min: 80,
            max: 80,
        };
        let https = RuleMatch::Ports {
            protocol: proto::TCP,
            min: 443,
            max: 443,
        };
        let ssh = RuleMatch::Ports {
            protocol: proto::TCP,
            min: 22,
            max: 22,
        };
        let class = n.allow(&SA, EGRESS, "0.0.0.0/0", http, 1)?;
        n.allow(&SA, EGRESS, "0.0.0.0/0", https, 2)?;
        let class_in = n.allow(&SA, INGRESS, "192.0.2.0/24", ssh, 3)?;
        let a80 = ep(&SA, SA.ip4, 40080);
        let a443 = ep(&SA, SA.ip4, 40443);
        let s80 = out(OUT4, 80);
        let s443 = out(OUT4, 443);
        n.connect_out(&SA, a80, s80, "http")?;
        n.connect_out(&SA, a443, s443, "https")?;
        // A connection into sa.
        let c = out(OUT4, 50000);
        let me22 = ep(&SA, SA.ip4, 22);
        n.pass_in(&SA, &EXT, &tcp(c, me22, tcp_flags::SYN), "ssh syn in")?;
        n.pass_out(&SA, &tcp(me22, c, tcp_flags::SYN_ACK), "ssh syn+ack out")?;
        n.pass_in(&SA, &EXT, &tcp(c, me22, tcp_flags::ACK), "ssh ack in")?;
        let (k80, _) = key(&SA, proto::TCP, a80, s80);
        let (k443, _) = key(&SA, proto::TCP, a443, s443);
        let (k22, _) = key(&SA, proto::TCP, c, me22);
        for k in [&k80, &k443, &k22] {
            ensure!(n.entry(k, "before")?.1.policy_revision == 1, "revision 1");
        }

        // http is no longer allowed.
        n.h.remove_rule(class, http)?;
        let rev = n.bump_revision(&SA)?;
        let deletes = n.ct_stat(ct_stat::DELETES)?;
        n.pass_out(&SA, &tcp(a443, s443, tcp_flags::PSH_ACK), "https goes on")?;
        ensure!(
            n.entry(&k443, "https")?.1.policy_revision == rev,
            "https revision not updated"
        );
        n.drop_in(
            &SA,
            &EXT,
            &tcp(s80, a80, tcp_flags::PSH_ACK),
            DropReason::ConnectionRevoked,
            "http answer",
        )?;
        n.expect_no_entry(&k80, "revoked http")?;
        ensure!(
            n.ct_stat(ct_stat::DELETES)? == deletes + 1,
            "revocation not counted"
        );
        // Gone: the next packet is a new connection's, which the rules deny.
        n.drop_out(
            &SA,
            &tcp(a80, s80, tcp_flags::ACK),
            DropReason::PolicyDenied,
            "http again",
        )?;
        // A connection into sa is judged in its own direction: ssh in is still allowed,
        // though sa's egress rules never allowed its answers.
        n.pass_out(
            &SA,
            &tcp(me22, c, tcp_flags::PSH_ACK),
            "ssh answer after the change",
        )?;
        ensure!(
            n.entry(&k22, "ssh")?.1.policy_revision == rev,
            "ssh revision not updated"
        );

        // Now ssh goes too: the next packet of it, either way, is cut.
        n.h.remove_rule(class_in, ssh)?;
        n.bump_revision(&SA)?;
        n.drop_out(
            &SA,
            &tcp(me22, c, tcp_flags::PSH_ACK),
            DropReason::ConnectionRevoked,
            "ssh answer",
        )?;
        n.expect_no_entry(&k22, "revoked ssh")?;
        // A new revision that allows the same: connections stay.
        let rev = n.bump_revision(&SA)?;
        n.pass_in(
            &SA,
            &EXT,
            &tcp(s443, a443, tcp_flags::PSH_ACK),
            "https after a no-op change",
        )?;
        ensure!(
            n.entry(&k443, "https")?.1.policy_revision == rev,
            "https revision"
        );

        // Unconfirmed connections too, and IPv6, and echo (judged as its request).
        n.allow(&SA, EGRESS, "::/0", RuleMatch::Protocol(proto::UDP), 4)?;
        let ping = RuleMatch::IcmpType {
            protocol: proto::ICMPV6,
            kind: 128,
        };
        let class6 = n.allow(&SA, EGRESS, "::/0", ping, 5)?;
        let a6 = ep(&SA, SA.ip6, 5353);
        let b6 = out(OUT6, 53);
        n.pass_out(&SA, &udp(a6, b6), "v6 query")?;
        let p6 = ep(&SA, SA.ip6, 99);
        let q6 = out(OUT6, 99);
        n.pass_out(&SA, &echo(p6, q6), "v6 ping")?;
        n.h.remove_rule(class6, ping)?;
        n.bump_revision(&SA)?;
        n.pass_in(&SA, &EXT, &udp(b6, a6), "v6 answer, udp still allowed")?;
        n.drop_in(
            &SA,
            &EXT,
            &echo_reply(q6, p6),
            DropReason::ConnectionRevoked,
            "v6 pong, ping no longer allowed",
        )?;
        Ok(())
    })
}

#[test]
fn a_full_ct_refuses_new_connections_and_keeps_established_ones() -> Result<()> {
    let sizes = Sizes {
        ct: 4,
        ..Sizes::default()
    };
    with_node_sized("sg-full", true, sizes, |n| {
        n.allow(&SA, EGRESS, "0.0.0.0/0", RuleMatch::Protocol(proto::TCP), 1)?;
        let b = out(OUT4, 443);
        let a = |port| ep(&SA, SA.ip4, port);
        for port in 41000..41004 {
            n.connect_out(&SA, a(port), b, &format!("connection {port}"))?;
        }
        ensure!(
            n.h.ct_entries(CtTable::Confirmed)?.len() == 4,
            "ct not full"
        );
        // The fifth: its SYN waits in CT_NEW, its answer cannot be confirmed.
        n.pass_out(&SA, &tcp(a(41004), b, tcp_flags::SYN), "fifth syn")?;
        n.drop_in(
            &SA,
            &EXT,
            &tcp(b, a(41004), tcp_flags::SYN_ACK),
            DropReason::CtTableFull,
            "fifth syn+ack",
        )?;
        ensure!(
            n.ct_stat(ct_stat::TABLE_FULL)? == 1,
            "table full not counted"
        );
        let (k5, a5_lo) = key(&SA, proto::TCP, a(41004), b);
        n.expect_entry(
            &k5,
            CtTable::New,
            ct_state::SYN_SENT,
            orig_flags(a5_lo, EGRESS),
            "fifth stays in CT_NEW",
        )?;
        // A connection picked up mid-stream needs room in CT as well; refused, it is
        // not charged to the rule that allowed it.
        let charged = n.h.rule_stats(1)?;
        n.drop_out(
            &SA,
            &tcp(a(41005), b, tcp_flags::ACK),
            DropReason::CtTableFull,
            "pick-up",
        )?;
        ensure!(n.h.rule_stats(1)? == charged, "refused pick-up charged");
        // Established connections are not affected.
        for port in 41000..41004 {
            n.pass_out(&SA, &tcp(a(port), b, tcp_flags::PSH_ACK), "established out")?;
            n.pass_in(
                &SA,
                &EXT,
                &tcp(b, a(port), tcp_flags::PSH_ACK),
                "established in",
            )?;
        }
        // Room again (the agent's sweep removed one): the retransmitted answer goes in.
        let (k1, _) = key(&SA, proto::TCP, a(41000), b);
        let mut remaining: Vec<_> = n.h.ct_entries(CtTable::Confirmed)?;
        remaining.retain(|(k, _)| *k != k1);
        n.h.ct_flush(CtTable::Confirmed)?;
        for (k, e) in remaining {
            n.h.ct_insert(CtTable::Confirmed, k, e)?;
        }
        n.pass_in(
            &SA,
            &EXT,
            &tcp(b, a(41004), tcp_flags::SYN_ACK),
            "fifth syn+ack again",
        )?;
        n.expect_entry(
            &k5,
            CtTable::Confirmed,
            ct_state::SYN_RECV,
            orig_flags(a5_lo, EGRESS) | ct_flags::REPLIED,
            "fifth confirmed",
        )?;
        Ok(())
    })
}

#[test]
fn a_syn_flood_churns_ct_new_without_evicting_ct() -> Result<()> {
    let sizes = Sizes {
        ct_new: 64,
        ..Sizes::default()
    };
    with_node_sized("sg-flood", true, sizes, |n| {
        n.allow(&SA, EGRESS, "0.0.0.0/0", RuleMatch::Protocol(proto::TCP), 1)?;
        n.allow(
            &SB,
            INGRESS,
            "0.0.0.0/0",
            RuleMatch::Ports {
                protocol: proto::TCP,
                min: 80,
                max: 80,
            },
            2,
        )?;
        let a = ep(&SA, SA.ip4, 40000);
        let b = out(OUT4, 443);
        n.connect_out(&SA, a, b, "established")?;
        let (k, a_lo) = key(&SA, proto::TCP, a, b);
        // Into sb: a flood of SYNs from spoofed ports, as an attacker sends them.
        let sb80 = ep(&SB, SB.ip4, 80);
        let first = out(OUT4, 10000);
        for port in 10000..12000 {
            let ret = n.deliver(&SB, &EXT, &tcp(out(OUT4, port), sb80, tcp_flags::SYN))?;
            ensure!(ret == TC_ACT_OK, "syn from port {port}: {ret}");
        }
        // ... and out of sa (its own scan, say).
        for port in 20000..22000 {
            let out = n.send(&SA, &tcp(ep(&SA, SA.ip4, port), b, tcp_flags::SYN))?;
            ensure!(
                out.ret == TC_ACT_REDIRECT,
                "syn from port {port}: {}",
                describe(&out)
            );
        }
        ensure!(n.ct_stat(ct_stat::NEW_INSERTS)? >= 4001, "inserts");
        let waiting = n.h.ct_entries(CtTable::New)?.len();
        ensure!(waiting <= 64, "CT_NEW holds {waiting}");
        // The established connection is still there and works.
        n.expect_entry(
            &k,
            CtTable::Confirmed,
            ct_state::ESTABLISHED,
            orig_flags(a_lo, EGRESS) | ct_flags::REPLIED,
            "after the flood",
        )?;
        n.pass_in(&SA, &EXT, &tcp(b, a, tcp_flags::PSH_ACK), "established in")?;
        n.pass_out(&SA, &tcp(a, b, tcp_flags::PSH_ACK), "established out")?;
        // The oldest SYNs were forgotten: sb's answer to one has no connection.
        n.drop_out(
            &SB,
            &tcp(sb80, first, tcp_flags::SYN_ACK),
            DropReason::CtInvalid,
            "answer to an evicted syn",
        )?;
        Ok(())
    })
}

#[test]
fn non_first_fragments_match_whole_protocol_rules_only() -> Result<()> {
    with_node("sg-frags", |n| {
        // A range from port 0: a later fragment has no port, and must not be taken
        // for port 0.
        let dns = RuleMatch::Ports {
            protocol: proto::UDP,
            min: 0,
            max: 1023,
        };
        let any_udp = RuleMatch::Protocol(proto::UDP);
        for p in [&SA, &SC] {
            n.allow(p, EGRESS, "0.0.0.0/0", dns, 1)?;
            n.allow(p, EGRESS, "::/0", dns, 1)?;
        }
        let payload = frames::udp(5000, 53, &[7; 64]);
        let v4f = |p: &Port, offset: u16| {
            let ip = frames::ipv4_fragment(p.ip4, OUT4, proto::UDP, offset, offset == 0, &payload);
            frames::ethernet(EXT.mac, p.mac, ethertype::IPV4, &ip)
        };
        let v6f = |p: &Port, offset: u16| {
            let frag = [Ext::Fragment {
                offset,
                more: offset == 0,
                id: 9,
            }];
            let ip = frames::ipv6_ext(p.ip6, OUT6, &frag, proto::UDP, &payload);
            frames::ethernet(EXT.mac, p.mac, ethertype::IPV6, &ip)
        };
        for p in [&SA, &SC] {
            n.pass_out(p, &v4f(p, 0), "first fragment")?;
            n.drop_out(
                p,
                &v4f(p, 64),
                DropReason::PolicyDenied,
                "later fragment, port rule",
            )?;
            n.pass_out(p, &v6f(p, 0), "v6 first fragment")?;
            n.drop_out(
                p,
                &v6f(p, 64),
                DropReason::PolicyDenied,
                "v6 later fragment, port rule",
            )?;
        }
        // sa tracked the first fragments, never the later ones.
        let entries = n.zone_entries(&SA)?;
        ensure!(entries == 2, "sa has {entries} entries");
        for p in [&SA, &SC] {
            n.allow(p, EGRESS, "0.0.0.0/0", any_udp, 2)?;
            n.allow(p, EGRESS, "::/0", any_udp, 2)?;
            n.pass_out(p, &v4f(p, 64), "later fragment, protocol rule")?;
            n.pass_out(p, &v6f(p, 64), "v6 later fragment, protocol rule")?;
        }
        ensure!(n.zone_entries(&SA)? == 2, "a fragment made an entry");
        ensure!(n.h.rule_stats(2)?.packets == 4, "protocol rule not charged");
        // Answers in later fragments need a rule too, even on a tracked connection.
        let answer = frames::ipv4_fragment(OUT4, SA.ip4, proto::UDP, 64, false, &payload);
        let answer = frames::ethernet(SA.mac, EXT.mac, ethertype::IPV4, &answer);
        n.drop_in(
            &SA,
            &EXT,
            &answer,
            DropReason::PolicyDenied,
            "later fragment of an answer",
        )?;
        Ok(())
    })
}

#[test]
fn expired_entries_are_absent() -> Result<()> {
    with_node("sg-expiry", |n| {
        n.allow(&SA, EGRESS, "0.0.0.0/0", RuleMatch::Protocol(proto::UDP), 1)?;
        let a = ep(&SA, SA.ip4, 5000);
        let b = out(OUT4, 53);
        let (k, a_lo) = key(&SA, proto::UDP, a, b);
        let f = orig_flags(a_lo, EGRESS);
        let entry = |age_secs: u64, flags: u8| CtEntry {
            last_seen_ns: monotonic_ns() - age_secs * 1_000_000_000,
            policy_revision: 1,
            state: ct_state::OPEN,
            flags,
            _pad: [0; 2],
        };
        // Unconfirmed: 30 s.
        n.h.ct_insert(CtTable::New, k, entry(31, f))?;
        let deletes = n.ct_stat(ct_stat::DELETES)?;
        n.drop_in(
            &SA,
            &EXT,
            &udp(b, a),
            DropReason::PolicyDenied,
            "answer after 31 s",
        )?;
        n.expect_no_entry(&k, "expired unconfirmed")?;
        ensure!(
            n.ct_stat(ct_stat::DELETES)? == deletes + 1,
            "expiry not counted"
        );
        n.h.ct_insert(CtTable::New, k, entry(25, f))?;
        n.pass_in(&SA, &EXT, &udp(b, a), "answer after 25 s")?;
        // Confirmed datagrams: 180 s.
        n.h.ct_insert(CtTable::Confirmed, k, entry(181, f | ct_flags::REPLIED))?;
        n.drop_in(
            &SA,
            &EXT,
            &udp(b, a),
            DropReason::PolicyDenied,
            "answer after 181 s",
        )?;
        n.expect_no_entry(&k, "expired confirmed")?;
        n.h.ct_insert(CtTable::Confirmed, k, entry(170, f | ct_flags::REPLIED))?;
        let before = monotonic_ns();
        n.pass_in(&SA, &EXT, &udp(b, a), "answer after 170 s")?;
        let (_, e) = n.entry(&k, "refreshed")?;
        // The datapath's clock is CLOCK_MONOTONIC at tick resolution: up to a tick
        // (10 ms at HZ=100) behind the fine one.
        ensure!(
            e.last_seen_ns >= before - 10_000_000,
            "last_seen not refreshed"
        );
        Ok(())
    })
}

/// Sanity of the test's own builders: the ICMP errors quote what they are about.
#[test]
fn icmp_error_builders_quote_the_packet() {
    let a = ep(&SA, SA.ip4, 40000);
    let b = out(OUT4, 443);
    let syn = tcp(a, b, tcp_flags::SYN);
    let err = icmp_error(ep(&EXT, ROUTER4, 0), ep(&SA, SA.ip4, 0), 3, 4, 1400, &syn);
    let off = frames::ETH_HLEN + frames::IPV4_HLEN + 8;
    assert_eq!(
        &err[off..off + 28],
        &syn[frames::ETH_HLEN..frames::ETH_HLEN + 28]
    );
    assert_eq!(err.len(), off + 28);
    let p = etherparse::SlicedPacket::from_ethernet(&err).unwrap();
    assert!(matches!(
        p.transport,
        Some(etherparse::TransportSlice::Icmpv4(_))
    ));
}

/// `sb` with `flags`, its FDB entry with `PEER_DELIVERY`: as the agent programs a veth
/// port whose VM end is in another namespace.
fn peer_port(n: &mut Node, flags: u32) -> Result<()> {
    let info = PortInfo {
        port_slot: SB.slot,
        network_slot: NET,
        flags,
        mac: SB.mac,
        _pad: [0; 2],
        policy_id: SB.slot,
        policy_revision: n.revision[SB.slot as usize - 1],
    };
    n.h.add_port(n.ifx(&SB), info)?;
    let entry = FdbEntry {
        ifindex: n.ifx(&SB),
        port_slot: SB.slot,
        flags: fdb_flags::PEER_DELIVERY,
    };
    n.h.add_fdb(NET, SB.mac, entry)
}

#[test]
fn peer_delivery_judges_the_receiver_inside_port_ingress() -> Result<()> {
    with_node("sg-peer", |n| {
        n.allow(
            &SA,
            EGRESS,
            "10.0.0.0/24",
            RuleMatch::Protocol(proto::TCP),
            1,
        )?;
        n.allow(
            &SB,
            INGRESS,
            "10.0.0.1/32",
            RuleMatch::Ports {
                protocol: proto::TCP,
                min: 22,
                max: 22,
            },
            2,
        )?;
        peer_port(n, STATEFUL)?;
        let a = ep(&SA, SA.ip4, 40000);
        let ssh = ep(&SB, SB.ip4, 22);
        let web = ep(&SB, SB.ip4, 80);

        // Allowed both ways: one run switches it and opens it in both zones; the
        // receiver counts it as sent to its VM.
        let tx = n.h.port_stats(SB.slot)?.tx_packets;
        let out = n.send(&SA, &tcp(a, ssh, tcp_flags::SYN))?;
        ensure!(
            out.ret == TC_ACT_REDIRECT
                && out.verdict.action == verdict_action::UNICAST
                && out.verdict.ifindexes[0] == n.ifx(&SB),
            "syn to ssh: {}",
            describe(&out)
        );
        ensure!(
            n.h.port_stats(SB.slot)?.tx_packets == tx + 1,
            "sb counted no tx"
        );
        let (ka, _) = key(&SA, proto::TCP, a, ssh);
        let (kb, _) = key(&SB, proto::TCP, a, ssh);
        n.entry(&ka, "sa's zone")?;
        n.entry(&kb, "sb's zone")?;

        // The sender's rules allow it, the receiver's do not: dropped in port_ingress,
        // counted against the receiver.
        let (sa_before, sb_before) = (
            n.drops(&SA, DropReason::PolicyDenied)?,
            n.drops(&SB, DropReason::PolicyDenied)?,
        );
        let out = n.send(&SA, &tcp(a, web, tcp_flags::SYN))?;
        ensure!(
            out.ret == TC_ACT_SHOT && out.drop_reason() == Some(DropReason::PolicyDenied),
            "syn to web: {}",
            describe(&out)
        );
        ensure!(
            n.drops(&SA, DropReason::PolicyDenied)? == sa_before
                && n.drops(&SB, DropReason::PolicyDenied)? == sb_before + 1,
            "the receiver's drop was counted against the sender"
        );

        // A receiver that is down takes nothing.
        peer_port(n, STATEFUL & !port_flags::ADMIN_UP)?;
        let before = n.drops(&SB, DropReason::PortAdminDown)?;
        let out = n.send(&SA, &tcp(a, ssh, tcp_flags::ACK))?;
        ensure!(
            out.drop_reason() == Some(DropReason::PortAdminDown)
                && n.drops(&SB, DropReason::PortAdminDown)? == before + 1,
            "to a port that is down: {}",
            describe(&out)
        );

        // Floods still go out of every device, peer or not, for port_egress to check.
        peer_port(n, STATEFUL)?;
        let arp = frames::ethernet(
            frames::BROADCAST,
            SA.mac,
            ethertype::ARP,
            &frames::arp(frames::arp_op::REQUEST, SA.mac, SA.ip4, [0; 6], SB.ip4),
        );
        let out = n.send(&SA, &arp)?;
        ensure!(
            out.verdict.action == verdict_action::FLOOD
                && out.verdict.ifindexes[..out.verdict.count as usize].contains(&n.ifx(&SB)),
            "arp broadcast: {}",
            describe(&out)
        );
        Ok(())
    })
}
