//! Randomized differential test of security groups and conntrack: random groups, rules
//! (protocols, port ranges, ICMP types, prefixes, remote groups) and memberships,
//! compiled and written by the agent's own layers; random sequences of packets between
//! ports — new connections, replies, ICMP errors about earlier packets, invalid TCP,
//! fragments — with policy changes in between. Each packet runs through the sender's
//! `port_ingress` and, if switched, the receiver's `port_egress`; both verdicts must
//! equal the plain-Rust reference (`dataplane_tests::reference_sg`). Random ports get
//! peer delivery, where the sender's `port_ingress` judges for the receiver too. Needs
//! root.
//!
//! Reproducible: `DP_DIFF_SEED`, `DP_DIFF_STATES` (default 30) and `DP_DIFF_FLOWS`
//! (default 150 per state).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{ensure, Context, Result};
use dataplane_abi::{program_names, verdict_action, DropReason, MARK_FROM_DATAPATH};
use dataplane_agent::{
    core::{
        compile::{compile, NodeView, SlotLimits, Slots},
        model::{Direction, Resource, State},
    },
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{network, port, rule, security_group, subnet, IntoResource},
    frames::{
        proto::{ICMP, ICMPV6, TCP, UDP},
        tcp_flags,
    },
    netns::{device_lab, env_number},
    reference_sg::{Flow, SgReference, SgVerdict},
    testrun::traced_datapath,
};
use etherparse::{IpNumber, PacketBuilder};
use rand::{rngs::StdRng, Rng, SeedableRng};

const NODE: &str = "sg-diff";
const PORTS: usize = 4;

fn mac(i: usize) -> [u8; 6] {
    [0xfa, 0x16, 0x3e, 0, 0, i as u8 + 1]
}

fn v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, i as u8 + 1)
}

fn v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16 + 1)
}

#[test]
fn security_groups_agree_with_the_reference_model() -> Result<()> {
    let seed = env_number("DP_DIFF_SEED", 0x5e_c0de);
    let states = env_number("DP_DIFF_STATES", 30);
    let flows_per_state = env_number("DP_DIFF_FLOWS", 150);

    let names: Vec<String> = (0..PORTS).map(|i| format!("s{i}")).collect();
    let (ns, devices) = device_lab("sgdiff", &names)?;

    let (checked, outcomes) = ns.run(move || -> Result<(u64, BTreeMap<String, u64>)> {
        let mut datapath = traced_datapath(65536)?;
        let mut slots = Slots::new(SlotLimits {
            max_ports: 64,
            max_networks: 64,
            max_rules: 4096,
        });
        let mut rng = StdRng::seed_from_u64(seed);
        let mut checked = 0u64;
        let mut outcomes = BTreeMap::new();
        for scenario in 0..states {
            // Each scenario starts with no tracked connections, like its reference.
            for zone in 0..64 {
                datapath.flush_connections(zone)?;
            }
            let stateful = rng.random_bool(0.7);
            let mut state = random_state(&mut rng, stateful);
            let mut reference = SgReference::default();
            let mut sent: Vec<(usize, usize, Flow)> = Vec::new();
            let mut peers = random_peers(&mut rng, &devices);
            for flow_index in 0..flows_per_state {
                if flow_index % 50 == 25 {
                    state = random_state(&mut rng, stateful);
                    peers = random_peers(&mut rng, &devices);
                }
                let compiled = compile(
                    &state,
                    &NodeView {
                        node_name: NODE,
                        interfaces: &devices,
                        peer_devices: &peers,
                        uplink: None,
                    },
                    &mut slots,
                );
                if flow_index % 50 == 25 || flow_index == 0 {
                    datapath.sync(&compiled)?;
                }
                let slot_of = |i: usize| {
                    compiled
                        .ports
                        .iter()
                        .find(|p| p.port_id == format!("p{i}"))
                        .map(|p| p.slot)
                        .expect("every port is programmed")
                };
                let (from, to, flow) = random_flow(&mut rng, &sent);
                let frame = serialize(mac(from), mac(to), &flow)?;
                let sender = &state.ports[&format!("p{from}")];
                let receiver = &state.ports[&format!("p{to}")];
                let context = || {
                    let earlier: Vec<String> = sent
                        .iter()
                        .filter(|(f, t, _)| [*f, *t].contains(&from) || [*f, *t].contains(&to))
                        .map(|(f, t, flow)| format!("  p{f} -> p{t} {flow:?}"))
                        .collect();
                    let groups: Vec<String> = state
                        .ports
                        .values()
                        .map(|p| format!("{}: {:?} security {:?}", p.id, p.security_group_ids, p.port_security_enabled))
                        .collect();
                    format!(
                        "seed {seed:#x} state {scenario} flow {flow_index}: p{from} -> p{to} {flow:?}\n\
                         passed before, between these ports' peers:\n{}\nports: {groups:?}\nstate {state:#?}",
                        earlier.join("\n")
                    )
                };

                let expected_out = reference.judge(&state, sender, Direction::Egress, &flow);
                let out = datapath.test_run(
                    program_names::PORT_INGRESS,
                    devices[&format!("s{from}")],
                    0,
                    &frame,
                    1,
                )?;
                let actual_out = match out.verdict.action {
                    verdict_action::DROP => SgVerdict::Drop(
                        DropReason::from_u32(out.verdict.reason).context("unknown reason")?,
                    ),
                    verdict_action::UNICAST => {
                        ensure!(
                            out.verdict.ifindexes[0] == devices[&format!("s{to}")],
                            "switched to the wrong port\n{}",
                            context()
                        );
                        SgVerdict::Pass
                    }
                    other => anyhow::bail!("verdict action {other}\n{}", context()),
                };
                // A receiver with peer delivery is judged inside the sender's
                // `port_ingress`: its verdict is the pair's.
                let peer = peers.contains(&devices[&format!("s{to}")]);
                let (side, expected) = if peer && expected_out == SgVerdict::Pass {
                    ("in", reference.judge(&state, receiver, Direction::Ingress, &flow))
                } else {
                    ("out", expected_out)
                };
                ensure!(
                    actual_out == expected,
                    "p{from} -> p{to} ({side}, peer delivery {peer}): datapath {actual_out:?}, \
                     reference {expected:?}\n{}",
                    context()
                );
                count(&mut outcomes, side, &actual_out);
                checked += 1;
                if actual_out != SgVerdict::Pass {
                    continue;
                }
                if peer {
                    sent.push((from, to, flow));
                    continue;
                }

                let expected_in = reference.judge(&state, receiver, Direction::Ingress, &flow);
                let before = datapath.port_counters(slot_of(to))?;
                let delivered = datapath.test_run(
                    program_names::PORT_EGRESS,
                    devices[&format!("s{to}")],
                    MARK_FROM_DATAPATH | slot_of(from),
                    &frame,
                    1,
                )?;
                let after = datapath.port_counters(slot_of(to))?;
                let actual_in = if delivered.return_code == 0 {
                    SgVerdict::Pass
                } else {
                    let reason = after
                        .drops
                        .iter()
                        .find(|(reason, count)| {
                            before.drops.iter().find(|(r, _)| r == reason).map_or(0, |(_, c)| *c)
                                < *count
                        })
                        .map(|(reason, _)| *reason)
                        .context("dropped without a counted reason")?;
                    SgVerdict::Drop(reason)
                };
                ensure!(
                    actual_in == expected_in,
                    "reaching p{to}: datapath {actual_in:?}, reference {expected_in:?}\n{}",
                    context()
                );
                count(&mut outcomes, "in", &actual_in);
                checked += 1;
                if actual_in == SgVerdict::Pass {
                    sent.push((from, to, flow));
                }
            }
        }
        Ok((checked, outcomes))
    })??;
    eprintln!("{checked} verdicts agreed with the reference (seed {seed:#x}): {outcomes:?}");
    for needed in [
        "out pass",
        "in pass",
        "out policy_denied",
        "in policy_denied",
        "in connection_revoked",
        "out ct_invalid",
    ] {
        ensure!(
            outcomes.contains_key(needed),
            "never reached {needed}: {outcomes:?}"
        );
    }
    Ok(())
}

/// Devices whose ports' FDB entries get `PEER_DELIVERY`: about half of them.
fn random_peers(rng: &mut StdRng, devices: &BTreeMap<String, u32>) -> BTreeSet<u32> {
    devices
        .values()
        .copied()
        .filter(|_| rng.random_bool(0.5))
        .collect()
}

fn count(outcomes: &mut BTreeMap<String, u64>, side: &str, verdict: &SgVerdict) {
    let name = match verdict {
        SgVerdict::Pass => format!("{side} pass"),
        SgVerdict::Drop(reason) => format!("{side} {}", reason.name()),
    };
    *outcomes.entry(name).or_insert(0) += 1;
}

// ---- random policies ---------------------------------------------------------------

const GROUPS: [&str; 3] = ["g0", "g1", "g2"];
const PORT_NUMBERS: [u16; 7] = [22, 80, 443, 1500, 8080, 8050, 65535];

fn random_rule(rng: &mut StdRng, group: usize, index: usize) -> pb::SecurityGroupRule {
    let direction = if rng.random_bool(0.5) {
        pb::Direction::Ingress
    } else {
        pb::Direction::Egress
    };
    let v6 = rng.random_bool(0.3);
    let ethertype = if v6 {
        pb::EtherType::Ipv6
    } else {
        pb::EtherType::Ipv4
    };
    let protocol = match rng.random_range(0..10) {
        0..=1 => "",
        2..=4 => "tcp",
        5..=6 => "udp",
        7..=8 => "icmp",
        _ => "47",
    };
    let (min, max) = match protocol {
        "tcp" | "udp" => match rng.random_range(0..6) {
            0 | 1 => (None, None),
            2 => {
                let port = u32::from(PORT_NUMBERS[rng.random_range(0..PORT_NUMBERS.len())]);
                (Some(port), Some(port))
            }
            3 => (Some(1000), Some(2000)),
            4 => (Some(8000), Some(8100)),
            _ => (Some(1), Some(1023)),
        },
        "icmp" => match rng.random_range(0..4) {
            0 => (None, None),
            1 => (Some(if v6 { 128 } else { 8 }), None),
            2 => (Some(if v6 { 128 } else { 8 }), Some(0)),
            _ => (Some(if v6 { 1 } else { 3 }), None),
        },
        _ => (None, None),
    };
    let (remote_ip_prefix, remote_group_id) = match rng.random_range(0..10) {
        0..=3 => (String::new(), String::new()),
        4..=6 => {
            let prefixes: &[&str] = if v6 {
                &["fd00::/64", "fd00::2/128", "fd00::/126", "fd00::4/127"]
            } else {
                &["10.0.0.0/24", "10.0.0.2/32", "10.0.0.0/30", "10.0.0.4/31"]
            };
            (
                prefixes[rng.random_range(0..prefixes.len())].to_owned(),
                String::new(),
            )
        }
        _ => (
            String::new(),
            GROUPS[rng.random_range(0..GROUPS.len())].to_owned(),
        ),
    };
    pb::SecurityGroupRule {
        port_range_min: min,
        port_range_max: max,
        remote_ip_prefix,
        remote_group_id,
        ..rule(
            &format!("g{group}-r{index}"),
            direction,
            ethertype,
            protocol,
        )
    }
}

fn random_state(rng: &mut StdRng, stateful: bool) -> State {
    let mut resources = vec![
        network("net").into_resource(),
        subnet("sub4", "net", "10.0.0.0/24").into_resource(),
        subnet("sub6", "net", "fd00::/64").into_resource(),
    ];
    for (g, id) in GROUPS.iter().enumerate() {
        let rules = (0..rng.random_range(0..7))
            .map(|i| random_rule(rng, g, i))
            .collect();
        resources.push(security_group(id, stateful, rules).into_resource());
    }
    for i in 0..PORTS {
        let mut p = port(
            &format!("p{i}"),
            "net",
            &format!("fa:16:3e:00:00:{:02x}", i + 1),
            &[("sub4", &v4(i).to_string()), ("sub6", &v6(i).to_string())],
            NODE,
            &format!("s{i}"),
        );
        if rng.random_bool(0.1) {
            p.port_security_enabled = Some(false);
            p.security_group_ids.clear();
        } else {
            p.security_group_ids = GROUPS
                .iter()
                .filter(|_| rng.random_bool(0.5))
                .map(|g| (*g).to_owned())
                .collect();
        }
        resources.push(p.into_resource());
    }
    let resources: Vec<Resource> = resources_from_proto(resources).expect("valid proto");
    State::replace(resources).expect("generated state is valid")
}

// ---- random packets ------------------------------------------------------------------

fn address(i: usize, v6: bool) -> IpAddr {
    if v6 {
        v6_addr(i)
    } else {
        IpAddr::V4(v4(i))
    }
}

fn v6_addr(i: usize) -> IpAddr {
    IpAddr::V6(v6(i))
}

fn base_flow(src: IpAddr, dst: IpAddr, protocol: u8) -> Flow {
    Flow {
        src,
        dst,
        protocol,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        icmp_type: 0,
        icmp_code: 0,
        embedded: None,
        first_fragment: true,
    }
}

fn random_flow(rng: &mut StdRng, sent: &[(usize, usize, Flow)]) -> (usize, usize, Flow) {
    let index_of = |addr: IpAddr| -> usize {
        match addr {
            IpAddr::V4(a) => a.octets()[3] as usize - 1,
            IpAddr::V6(a) => a.segments()[7] as usize - 1,
        }
    };
    // A reply to, or an ICMP error about, something that got through.
    if !sent.is_empty() && rng.random_bool(0.45) {
        let (_, _, earlier) = &sent[rng.random_range(0..sent.len())];
        let (from, to) = (index_of(earlier.dst), index_of(earlier.src));
        let v6 = matches!(earlier.src, IpAddr::V6(_));
        if rng.random_bool(0.2) {
            let mut error = base_flow(earlier.dst, earlier.src, if v6 { ICMPV6 } else { ICMP });
            (error.icmp_type, error.icmp_code) = if v6 { (1, 4) } else { (3, 3) };
            error.embedded = Some(Box::new(earlier.clone()));
            return (from, to, error);
        }
        let mut reply = earlier.clone();
        reply.src = earlier.dst;
        reply.dst = earlier.src;
        reply.sport = earlier.dport;
        reply.dport = earlier.sport;
        reply.embedded = None;
        reply.tcp_flags = match earlier.tcp_flags {
            f if f == tcp_flags::SYN => tcp_flags::SYN | tcp_flags::ACK,
            _ => [
                tcp_flags::ACK,
                tcp_flags::FIN | tcp_flags::ACK,
                tcp_flags::RST,
            ][rng.random_range(0..3)],
        };
        reply.icmp_type = match (v6, earlier.icmp_type) {
            (false, 8) => 0,
            (true, 128) => 129,
            (_, other) => other,
        };
        return (from, to, reply);
    }

    let from = rng.random_range(0..PORTS);
    let to = (from + rng.random_range(1..PORTS)) % PORTS;
    let v6 = rng.random_bool(0.3);
    let (src, dst) = (address(from, v6), address(to, v6));
    let sport = [40000, 40001, 50000][rng.random_range(0..3)];
    let dport = PORT_NUMBERS[rng.random_range(0..PORT_NUMBERS.len())];
    let flow = match rng.random_range(0..20) {
        0..=8 => Flow {
            sport,
            dport,
            tcp_flags: match rng.random_range(0..10) {
                0..=5 => tcp_flags::SYN,
                6..=7 => tcp_flags::ACK,
                8 => tcp_flags::SYN | tcp_flags::FIN,
                _ => tcp_flags::FIN | tcp_flags::ACK,
            },
            ..base_flow(src, dst, TCP)
        },
        9..=13 => Flow {
            sport,
            dport,
            ..base_flow(src, dst, UDP)
        },
        14..=16 => {
            let id = rng.random_range(1..4);
            Flow {
                sport: id,
                dport: id,
                icmp_type: if v6 { 128 } else { 8 },
                ..base_flow(src, dst, if v6 { ICMPV6 } else { ICMP })
            }
        }
        17 => base_flow(src, dst, 47),
        _ if !v6 => Flow {
            // A non-first fragment of a datagram: no ports to judge.
            first_fragment: false,
            ..base_flow(src, dst, UDP)
        },
        _ => Flow {
            sport,
            dport,
            ..base_flow(src, dst, UDP)
        },
    };
    (from, to, flow)
}

/// The IP packet of `flow` (no Ethernet header).
fn ip_packet(flow: &Flow) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match (flow.src, flow.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => write_l4(
            PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            flow,
            &mut out,
        )?,
        (IpAddr::V6(s), IpAddr::V6(d)) => write_l4(
            PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            flow,
            &mut out,
        )?,
        _ => anyhow::bail!("mixed families"),
    }
    if !flow.first_fragment {
        // Fragment offset 185 (1480 bytes in), header checksum recomputed.
        out[6] = 0x00;
        out[7] = 185;
        out[10] = 0;
        out[11] = 0;
        let sum = checksum(&out[..20]);
        out[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    Ok(out)
}

fn write_l4(
    builder: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    flow: &Flow,
    out: &mut Vec<u8>,
) -> Result<()> {
    let payload = b"dataplane";
    let v6 = matches!(flow.src, IpAddr::V6(_));
    match flow.protocol {
        TCP => {
            let mut tcp = builder.tcp(flow.sport, flow.dport, 1000, 65535);
            if flow.tcp_flags & tcp_flags::SYN != 0 {
                tcp = tcp.syn();
            }
            if flow.tcp_flags & tcp_flags::ACK != 0 {
                tcp = tcp.ack(1);
            }
            if flow.tcp_flags & tcp_flags::FIN != 0 {
                tcp = tcp.fin();
            }
            if flow.tcp_flags & tcp_flags::RST != 0 {
                tcp = tcp.rst();
            }
            tcp.write(out, payload)?;
        }
        UDP => builder.udp(flow.sport, flow.dport).write(out, payload)?,
        ICMP | ICMPV6 => {
            let inner = match &flow.embedded {
                Some(inner) => ip_packet(inner)?,
                None => payload.to_vec(),
            };
            // Echo: identifier and sequence in bytes 5-8.
            let rest = [(flow.sport >> 8) as u8, flow.sport as u8, 0, 1];
            if v6 {
                builder
                    .icmpv6_raw(flow.icmp_type, flow.icmp_code, rest)
                    .write(out, &inner)?
            } else {
                builder
                    .icmpv4_raw(flow.icmp_type, flow.icmp_code, rest)
                    .write(out, &inner)?
            }
        }
        other => builder.write(out, IpNumber(other), payload)?,
    }
    Ok(())
}

fn serialize(src: [u8; 6], dst: [u8; 6], flow: &Flow) -> Result<Vec<u8>> {
    let ethertype: u16 = if matches!(flow.src, IpAddr::V6(_)) {
        0x86dd
    } else {
        0x0800
    };
    let mut frame = Vec::with_capacity(128);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(&ip_packet(flow)?);
    Ok(frame)
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
