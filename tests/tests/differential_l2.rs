//! Randomized differential test: random desired states, compiled by the agent's compiler
//! and written by its kernel layer, and random (often hostile, often malformed) frames
//! run through `port_ingress` with BPF_PROG_TEST_RUN — every verdict must equal the
//! reference evaluator's (`dataplane_tests::reference`). Needs root.
//!
//! Reproducible: `DP_DIFF_SEED` picks the seed (printed on failure), `DP_DIFF_STATES` and
//! `DP_DIFF_FRAMES` scale the run (defaults: 40 states x 100 frames per CI run).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{ensure, Context, Result};
use dataplane_abi::{program_names, verdict_action, DropReason, MAX_FLOOD_PORTS};
use dataplane_agent::{
    core::{
        compile::{compile, NodeView, SlotLimits, Slots},
        model::{
            AllowedAddressPair, Direction, EtherType, FixedIp, IpVersion, MacAddr, Network, Port,
            PortBinding, Protocol, Resource, SecurityGroup, SecurityGroupRule, State, Subnet,
        },
    },
    kernel::datapath::MapLimits,
};
use dataplane_tests::{
    frames::{self, ethertype, Mac, BROADCAST},
    netns::{device_lab, env_number},
    reference::{Expected, Reference},
    testrun::traced_datapath,
};
use ipnet::IpNet;
use rand::{rngs::StdRng, Rng, SeedableRng};

const NODE: &str = "diff-node";
/// Port devices in the test namespace; one more, unbound, plays an unknown device.
const DEVICES: usize = 8;

#[test]
fn port_ingress_agrees_with_the_reference_model() -> Result<()> {
    let seed = env_number("DP_DIFF_SEED", 0x5eed_1234);
    let states = env_number("DP_DIFF_STATES", 40);
    let frames_per_state = env_number("DP_DIFF_FRAMES", 100);

    let names: Vec<String> = (0..=DEVICES).map(|i| format!("d{i}")).collect();
    let (ns, devices) = device_lab("diff", &names)?;

    let checked = ns.run(move || -> Result<(u64, u64, BTreeMap<&'static str, u64>)> {
        let mut datapath = traced_datapath(4096)?;
        let mut slots = Slots::new(SlotLimits {
            max_ports: 64,
            max_networks: 64,
            max_rules: MapLimits::for_node(64, 4096).max_rules,
        });
        let mut rng = StdRng::seed_from_u64(seed);
        let mut checked = 0;
        let mut skipped = 0;
        let mut outcomes = BTreeMap::new();
        for scenario in 0..states {
            let state = random_state(&mut rng);
            // About half the devices deliver to their peer.
            let peer_names: BTreeSet<String> = devices
                .keys()
                .filter(|_| rng.random_bool(0.5))
                .cloned()
                .collect();
            let peers: BTreeSet<u32> = peer_names.iter().map(|name| devices[name]).collect();
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
            datapath.sync(&compiled)?;
            let port_of_ifindex: BTreeMap<u32, String> = compiled
                .ports
                .iter()
                .map(|port| (port.ifindex, port.port_id.clone()))
                .collect();
            let reference = Reference {
                state: &state,
                node_name: NODE,
                devices: &devices,
                peer_devices: &peer_names,
            };
            for case in 0..frames_per_state {
                let (device, frame) = random_frame(&mut rng, &state);
                if test_run_refuses(&frame) {
                    // packet_l2 sends such frames through a real veth instead.
                    skipped += 1;
                    continue;
                }
                let expected = reference.ingress(&device, &frame);
                let outcome =
                    datapath.test_run(program_names::PORT_INGRESS, devices[&device], 0, &frame, 1)?;
                let actual = observed(&outcome.verdict, &port_of_ifindex)?;
                let consistent_code = match actual {
                    Expected::Drop(_) => outcome.return_code == 2,
                    _ => outcome.return_code == 7,
                };
                ensure!(
                    actual == expected && consistent_code,
                    "seed {seed:#x} state {scenario} frame {case}: datapath {actual:?} (return \
                     code {}), reference {expected:?}\ningress {device}, frame {}\nstate {state:#?}",
                    outcome.return_code,
                    hex(&frame),
                );
                checked += 1;
                *outcomes
                    .entry(match &expected {
                        Expected::Drop(reason) => reason.name(),
                        Expected::Unicast(_) => "unicast",
                        Expected::Flood(_) => "flood",
                    })
                    .or_insert(0u64) += 1;
            }
        }
        Ok((checked, skipped, outcomes))
    })??;
    let (checked, skipped, outcomes) = checked;
    eprintln!(
        "{checked} frames agreed with the reference, {skipped} too short for a test run \
         (seed {seed:#x}): {outcomes:?}"
    );
    // The generator must keep reaching every kind of outcome, or agreement means little.
    ensure!(
        checked >= states * frames_per_state * 9 / 10,
        "too few frames checked"
    );
    let reasons = outcomes
        .keys()
        .filter(|kind| !matches!(**kind, "unicast" | "flood"))
        .count();
    ensure!(
        outcomes.contains_key("unicast") && outcomes.contains_key("flood") && reasons >= 14,
        "the generator reached too few outcomes: {outcomes:?}"
    );
    Ok(())
}

/// BPF_PROG_TEST_RUN refuses (EINVAL) frames shorter than an Ethernet header, and IPv4
/// or IPv6 frames whose network header is cut short.
fn test_run_refuses(frame: &[u8]) -> bool {
    if frame.len() < 14 {
        return true;
    }
    match u16::from_be_bytes([frame[12], frame[13]]) {
        ethertype::IPV4 => frame.len() < 14 + 20,
        ethertype::IPV6 => frame.len() < 14 + 40,
        _ => false,
    }
}

fn observed(verdict: &dataplane_abi::Verdict, ports: &BTreeMap<u32, String>) -> Result<Expected> {
    let port = |ifindex: &u32| {
        ports
            .get(ifindex)
            .cloned()
            .with_context(|| format!("verdict names ifindex {ifindex}, not a port"))
    };
    Ok(match verdict.action {
        verdict_action::DROP => {
            Expected::Drop(DropReason::from_u32(verdict.reason).context("unknown drop reason")?)
        }
        verdict_action::UNICAST => Expected::Unicast(port(&verdict.ifindexes[0])?),
        verdict_action::FLOOD => {
            let count = (verdict.count as usize).min(MAX_FLOOD_PORTS);
            let targets = verdict.ifindexes[..count]
                .iter()
                .map(port)
                .collect::<Result<BTreeSet<_>>>()?;
            ensure!(targets.len() == count, "a port got two copies: {verdict:?}");
            Expected::Flood(targets)
        }
        other => anyhow::bail!("no verdict traced (action {other})"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- random desired state ---------------------------------------------------------

/// MACs that allowed address pairs of several ports share (VRRP-style).
const SHARED_MACS: [Mac; 2] = [
    [0xfa, 0x16, 0x3e, 0x99, 0x00, 0x01],
    [0xfa, 0x16, 0x3e, 0x99, 0x00, 0x02],
];

fn port_mac(i: usize) -> Mac {
    [0xfa, 0x16, 0x3e, 0x00, 0x00, i as u8]
}

fn v4(network: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, network as u8, 0, host)
}

fn v6(network: usize, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, network as u16, 0, 0, 0, 0, 0, host)
}

fn random_state(rng: &mut StdRng) -> State {
    let network_count = rng.random_range(1..=3);
    let mut resources = vec![open_group()];
    let mut network_security = Vec::new();
    for n in 0..network_count {
        network_security.push(rng.random_bool(0.8));
        resources.push(Resource::Network(Network {
            id: format!("net{n}"),
            name: String::new(),
            project_id: String::new(),
            admin_state_up: rng.random_bool(0.9),
            shared: false,
            router_external: false,
            mtu: 1500,
            provider: None,
            port_security_enabled: network_security[n],
            revision_number: 1,
        }));
        for (suffix, cidr, version) in [
            ("4", format!("10.{n}.0.0/16"), IpVersion::V4),
            ("6", format!("fd00:{n}::/32"), IpVersion::V6),
        ] {
            resources.push(Resource::Subnet(Subnet {
                id: format!("sub{n}-{suffix}"),
                network_id: format!("net{n}"),
                ip_version: version,
                cidr: cidr.parse().unwrap(),
                gateway_ip: None,
                allocation_pools: Vec::new(),
                dns_nameservers: Vec::new(),
                host_routes: Vec::new(),
                enable_dhcp: false,
                name: String::new(),
                project_id: String::new(),
                revision_number: 1,
            }));
        }
    }
    let port_count = rng.random_range(1..=DEVICES);
    for i in 0..port_count {
        let n = rng.random_range(0..network_count);
        let mut fixed_ips = Vec::new();
        if rng.random_bool(0.9) {
            fixed_ips.push(FixedIp {
                subnet_id: format!("sub{n}-4"),
                ip_address: IpAddr::V4(v4(n, 10 + i as u8)),
            });
        }
        if rng.random_bool(0.7) {
            fixed_ips.push(FixedIp {
                subnet_id: format!("sub{n}-6"),
                ip_address: IpAddr::V6(v6(n, 0x10 + i as u16)),
            });
        }
        let pairs = (0..rng.random_range(0..=2))
            .map(|_| random_pair(rng, n, i))
            .collect();
        let host = if rng.random_bool(0.9) {
            NODE
        } else {
            "other-node"
        };
        let port_security_enabled = match rng.random_range(0..4) {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        };
        let secure = port_security_enabled.unwrap_or(network_security[n]);
        // Some ports wait for a device that does not exist.
        let interface = if rng.random_bool(0.95) {
            format!("d{i}")
        } else {
            format!("gone{i}")
        };
        resources.push(Resource::Port(Port {
            id: format!("port{i}"),
            network_id: format!("net{n}"),
            mac_address: MacAddr(port_mac(i)),
            fixed_ips,
            allowed_address_pairs: pairs,
            // Ports with port security are in a group that allows all IP both ways:
            // this test is about switching and port security, not the rules.
            security_group_ids: if secure {
                vec![OPEN_GROUP.to_owned()]
            } else {
                Vec::new()
            },
            port_security_enabled,
            admin_state_up: rng.random_bool(0.9),
            device_owner: String::new(),
            device_id: String::new(),
            qos_policy_id: None,
            binding: PortBinding {
                host: host.to_owned(),
                interface_name: interface,
            },
            name: String::new(),
            project_id: String::new(),
            revision_number: 1,
        }));
    }
    State::replace(resources).expect("generated state is valid")
}

const OPEN_GROUP: &str = "open";

/// A stateless group allowing all IP, both ways, both families.
fn open_group() -> Resource {
    let rule = |id: &str, direction, ethertype| SecurityGroupRule {
        id: id.to_owned(),
        direction,
        ethertype,
        protocol: Protocol::Any,
        port_range_min: None,
        port_range_max: None,
        remote_ip_prefix: None,
        remote_group_id: None,
        revision_number: 1,
    };
    Resource::SecurityGroup(SecurityGroup {
        id: OPEN_GROUP.to_owned(),
        project_id: String::new(),
        name: String::new(),
        stateful: false,
        rules: vec![
            rule("in4", Direction::Ingress, EtherType::Ipv4),
            rule("in6", Direction::Ingress, EtherType::Ipv6),
            rule("out4", Direction::Egress, EtherType::Ipv4),
            rule("out6", Direction::Egress, EtherType::Ipv6),
        ],
        revision_number: 1,
    })
}

fn random_pair(rng: &mut StdRng, n: usize, i: usize) -> AllowedAddressPair {
    let ip_address: IpNet = match rng.random_range(0..5) {
        0 => format!("10.{n}.0.{}/32", 100 + i),
        1 => format!("10.{n}.{}.0/24", 1 + rng.random_range(0..2)),
        2 => format!("10.{n}.0.128/25"),
        3 => format!("fd00:{n}::{:x}/128", 0x100 + i),
        _ => format!("fd00:{n}:{}::/64", 1 + rng.random_range(0..2)),
    }
    .parse()
    .unwrap();
    let mac_address = match rng.random_range(0..3) {
        0 => None,
        1 => Some(MacAddr(SHARED_MACS[rng.random_range(0..SHARED_MACS.len())])),
        _ => Some(MacAddr([0xfa, 0x16, 0x3e, 0x77, 0x00, i as u8])),
    };
    AllowedAddressPair {
        ip_address,
        mac_address,
    }
}

// ---- random frames ----------------------------------------------------------------

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// A device (usually a port's) and a frame its VM might send: honest, spoofed,
/// privileged (RA, DHCP server), or broken.
fn random_frame(rng: &mut StdRng, state: &State) -> (String, Vec<u8>) {
    let ports: Vec<&Port> = state.ports.values().map(|port| &**port).collect();
    let port = *pick(rng, &ports);
    let device = if rng.random_bool(0.04) {
        format!("d{DEVICES}")
    } else {
        port.binding.interface_name.clone()
    };
    let device = if device.starts_with("gone") {
        format!("d{}", port.id.trim_start_matches("port"))
    } else {
        device
    };

    let pair_macs: Vec<Mac> = port
        .allowed_address_pairs
        .iter()
        .filter_map(|pair| pair.mac_address.map(|mac| mac.0))
        .collect();
    let other = *pick(rng, &ports);
    let src: Mac = match rng.random_range(0..20) {
        0..=11 => port.mac_address.0,
        12..=14 if !pair_macs.is_empty() => *pick(rng, &pair_macs),
        15..=16 => other.mac_address.0,
        17 => [0x01, 0x00, 0x5e, 0, 0, 1],
        _ => [
            0x02,
            rng.random(),
            rng.random(),
            rng.random(),
            rng.random(),
            rng.random(),
        ],
    };
    let dst: Mac = match rng.random_range(0..20) {
        0..=7 => other.mac_address.0,
        8..=10 => BROADCAST,
        11..=12 => [0x33, 0x33, 0xff, 0, 0, rng.random()],
        13..=14 => *pick(rng, &SHARED_MACS),
        15 => port.mac_address.0,
        _ => [0x02, 0, 0, 0, 0, rng.random()],
    };
    let v4_src = pick_v4(rng, port, other);
    let v6_src = pick_v6(rng, port, other, src);
    let v4_dst = v4(0, 1);
    let v6_dst = v6(0, 1);

    let mut frame = match rng.random_range(0..17) {
        0 => frames::arp_request_frame(src, v4_src, v4_dst),
        1 => frames::ethernet(
            dst,
            src,
            ethertype::ARP,
            &frames::arp(
                frames::arp_op::REPLY,
                pick_mac(rng, src, port),
                v4_src,
                dst,
                v4_dst,
            ),
        ),
        2 => frames::udp4_frame(dst, src, v4_src, v4_dst, rng.random_range(1000..1010), 53),
        3 => frames::icmp4_frame(dst, src, v4_src, v4_dst),
        4 => frames::tcp4_frame(dst, src, v4_src, v4_dst),
        5 => frames::dhcp_discover_frame(src),
        6 => frames::dhcp_offer_frame(src, v4_src, dst, v4_dst),
        7 => frames::icmp6_echo_frame(dst, src, v6_src, v6_dst),
        8 => frames::ns_frame(
            src,
            v6_src,
            pick_v6(rng, port, other, src),
            rng.random_bool(0.7).then(|| pick_mac(rng, src, port)),
        ),
        9 => frames::na_frame(
            src,
            v6_src,
            dst,
            v6_dst,
            pick_v6(rng, port, other, src),
            rng.random_bool(0.7).then(|| pick_mac(rng, src, port)),
        ),
        10 => frames::ra_frame(src, v6_src),
        11 => frames::mld2_report_frame(
            src,
            if rng.random_bool(0.5) {
                Ipv6Addr::UNSPECIFIED
            } else {
                v6_src
            },
            "ff02::1:ff00:1".parse().unwrap(),
        ),
        12 => frames::mld1_report_frame(src, v6_src, "ff02::1:ff00:2".parse().unwrap()),
        13 => frames::dhcp6_advertise_frame(src, v6_src, dst, v6_dst),
        14 => frames::udp6_frame(dst, src, v6_src, v6_dst, 546, 547),
        15 => frames::vlan_tagged(
            dst,
            src,
            ethertype::VLAN,
            10,
            ethertype::IPV4,
            &frames::ipv4(v4_src, v4_dst, frames::proto::UDP, &frames::udp(1, 2, b"x")),
        ),
        _ => frames::ethernet(dst, src, ethertype::LLDP, &[0u8; 40]),
    };
    match rng.random_range(0..10) {
        // Truncated anywhere, Ethernet header included.
        0 => frame.truncate(rng.random_range(0..frame.len())),
        // A byte of the headers flipped.
        1 => {
            let at = rng.random_range(12..frame.len().min(80));
            frame[at] ^= 1 << rng.random_range(0..8);
        }
        _ => {}
    }
    (device, frame)
}

fn pick_mac(rng: &mut StdRng, src: Mac, port: &Port) -> Mac {
    if rng.random_bool(0.8) {
        src
    } else {
        let mut other = port.mac_address.0;
        other[5] ^= 1;
        other
    }
}

fn pick_v4(rng: &mut StdRng, port: &Port, other: &Port) -> Ipv4Addr {
    let own = v4_addresses(port);
    let theirs = v4_addresses(other);
    match rng.random_range(0..10) {
        0..=5 if !own.is_empty() => *pick(rng, &own),
        6 if !theirs.is_empty() => *pick(rng, &theirs),
        7 => Ipv4Addr::UNSPECIFIED,
        _ => Ipv4Addr::new(
            10,
            rng.random_range(0..3),
            rng.random_range(0..3),
            rng.random(),
        ),
    }
}

fn pick_v6(rng: &mut StdRng, port: &Port, other: &Port, src: Mac) -> Ipv6Addr {
    let own = v6_addresses(port);
    let theirs = v6_addresses(other);
    match rng.random_range(0..10) {
        0..=4 if !own.is_empty() => *pick(rng, &own),
        5 => MacAddr(src).ipv6_link_local(),
        6 if !theirs.is_empty() => *pick(rng, &theirs),
        7 => Ipv6Addr::UNSPECIFIED,
        _ => Ipv6Addr::new(
            0xfd00,
            rng.random_range(0..3),
            rng.random_range(0..3),
            0,
            0,
            0,
            0,
            rng.random(),
        ),
    }
}

fn v4_addresses(port: &Port) -> Vec<Ipv4Addr> {
    addresses(port)
        .into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
        .collect()
}

fn v6_addresses(port: &Port) -> Vec<Ipv6Addr> {
    addresses(port)
        .into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        })
        .collect()
}

/// A port's fixed IPs and one address inside each allowed pair.
fn addresses(port: &Port) -> Vec<IpAddr> {
    port.fixed_ips
        .iter()
        .map(|fixed| fixed.ip_address)
        .chain(
            port.allowed_address_pairs
                .iter()
                .map(|pair| match pair.ip_address {
                    IpNet::V4(net) => IpAddr::V4(net.hosts().nth(1).unwrap_or(net.addr())),
                    IpNet::V6(net) => IpAddr::V6(net.hosts().nth(1).unwrap_or(net.addr())),
                }),
        )
        .collect()
}
