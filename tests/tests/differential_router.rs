//! Randomized differential test of distributed routing: random networks, subnets,
//! ports, routers (interfaces, admin state, static routes), compiled and written by the
//! agent's own layers; random frames to router MACs (UDP with random TTLs, echo
//! requests, either family) and ARP requests, run through the sender's `port_ingress`.
//! Every verdict, and the addresses and TTL of every forwarded frame, must equal the
//! plain-Rust reference (`dataplane_tests::reference_router`). Needs root.
//!
//! Reproducible: `DP_DIFF_SEED`, `DP_DIFF_STATES` (default 40), `DP_DIFF_FRAMES`
//! (default 80 per state).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{ensure, Result};
use dataplane_abi::{program_names, verdict_action, DropReason};
use dataplane_agent::{
    core::{
        compile::{compile, NodeView, SlotLimits, Slots},
        model::{MacAddr, Port, Resource, State},
    },
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{network, port, router, router_port, subnet, IntoResource},
    frames::{self, ethertype, proto, BROADCAST, ETH_HLEN},
    netns::{device_lab, env_number},
    reference_router::{Routed, RouterReference, Sent},
    testrun::traced_datapath,
};
use rand::{rngs::StdRng, seq::IndexedRandom, Rng, SeedableRng};

const NODE: &str = "route-diff";
const NETWORKS: usize = 3;
const DEVICES: usize = 6;

fn port_mac(i: usize) -> [u8; 6] {
    [0xfa, 0x16, 0x3e, 0, 0, i as u8 + 1]
}

fn router_mac(router: usize, network: usize) -> [u8; 6] {
    [0xfa, 0x16, 0x3e, 1, router as u8, network as u8]
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn v4(network: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, network as u8, 0, host)
}

fn v6(network: usize, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, network as u16, 0, 0, 0, 0, 0, host)
}

/// Networks n0..n2 with a v4 and a v6 subnet each; ports p0..p5 (some on missing
/// devices, some on another node); routers r0 and r1 on random subnets (a subnet on one
/// router at most), random admin state and static routes.
fn random_state(rng: &mut StdRng) -> State {
    let mut resources = Vec::new();
    for n in 0..NETWORKS {
        resources.push(network(&format!("n{n}")).into_resource());
        resources.push(
            subnet(
                &format!("s{n}"),
                &format!("n{n}"),
                &format!("10.{n}.0.0/24"),
            )
            .into_resource(),
        );
        resources.push(
            subnet(
                &format!("s{n}v6"),
                &format!("n{n}"),
                &format!("fd00:{n}::/64"),
            )
            .into_resource(),
        );
    }
    for i in 0..DEVICES {
        let n = rng.random_range(0..NETWORKS);
        let host = if rng.random_bool(0.9) {
            NODE
        } else {
            "elsewhere"
        };
        let device = if rng.random_bool(0.9) {
            format!("d{i}")
        } else {
            format!("gone{i}")
        };
        let (a4, a6) = (
            v4(n, 10 + i as u8).to_string(),
            v6(n, 0x10 + i as u16).to_string(),
        );
        let ips = [(format!("s{n}"), a4), (format!("s{n}v6"), a6)];
        let ips: Vec<(&str, &str)> = ips.iter().map(|(s, a)| (s.as_str(), a.as_str())).collect();
        let mut p = port(
            &format!("p{i}"),
            &format!("n{n}"),
            &mac_text(port_mac(i)),
            &ips,
            host,
            &device,
        );
        p.security_group_ids.clear();
        p.port_security_enabled = Some(false);
        resources.push(p.into_resource());
    }
    let mut owner: BTreeMap<usize, usize> = BTreeMap::new();
    for n in 0..NETWORKS {
        if rng.random_bool(0.8) {
            owner.insert(n, rng.random_range(0..2));
        }
    }
    for r in 0..2 {
        let mut interfaces = Vec::new();
        for (&n, _) in owner.iter().filter(|(_, &o)| o == r) {
            let id = format!("r{r}-n{n}");
            let (a4, a6) = (v4(n, 1).to_string(), v6(n, 1).to_string());
            let ips = [(format!("s{n}"), a4), (format!("s{n}v6"), a6)];
            let ips: Vec<(&str, &str)> =
                ips.iter().map(|(s, a)| (s.as_str(), a.as_str())).collect();
            resources.push(
                router_port(&id, &format!("n{n}"), &mac_text(router_mac(r, n)), &ips)
                    .into_resource(),
            );
            interfaces.push((format!("s{n}"), id.clone()));
            interfaces.push((format!("s{n}v6"), id));
        }
        let pairs: Vec<(&str, &str)> = interfaces
            .iter()
            .map(|(s, p)| (s.as_str(), p.as_str()))
            .collect();
        let mut r_msg = router(&format!("r{r}"), &pairs);
        r_msg.admin_state_up = rng.random_bool(0.85);
        if let Some((&n, _)) = owner.iter().find(|(_, &o)| o == r) {
            if rng.random_bool(0.6) {
                r_msg.routes.push(pb::Route {
                    destination: "192.168.0.0/16".into(),
                    nexthop: v4(n, 10 + rng.random_range(0..DEVICES as u8)).to_string(),
                });
            }
        }
        resources.push(r_msg.into_resource());
    }
    let resources: Vec<Resource> =
        resources_from_proto(resources).expect("generated resources convert");
    State::replace(&resources).expect("generated state is valid")
}

/// A destination: a port's, a router's, an unknown host of a subnet, or outside.
fn random_destination(rng: &mut StdRng, v6_family: bool) -> IpAddr {
    let n = rng.random_range(0..NETWORKS);
    let host = match rng.random_range(0..4) {
        0 => 1,
        1 | 2 => 10 + rng.random_range(0..DEVICES as u8),
        _ => 200,
    };
    match (v6_family, rng.random_range(0..6)) {
        (false, 0) => IpAddr::V4(Ipv4Addr::new(192, 168, 3, 4)),
        (false, 1) => IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
        (false, _) => IpAddr::V4(v4(n, host)),
        (true, 0) => IpAddr::V6("2001:db8::1".parse().unwrap()),
        (true, _) => IpAddr::V6(v6(n, u16::from(host))),
    }
}

fn frame_of(sender: &Port, sent: &Sent) -> Vec<u8> {
    let src_mac = sender.mac_address.0;
    let src4 = sender.fixed_ips.iter().find_map(|f| match f.ip_address {
        IpAddr::V4(a) => Some(a),
        _ => None,
    });
    let src6 = sender.fixed_ips.iter().find_map(|f| match f.ip_address {
        IpAddr::V6(a) => Some(a),
        _ => None,
    });
    match *sent {
        Sent::ArpRequest { target } => frames::ethernet(
            BROADCAST,
            src_mac,
            ethertype::ARP,
            &frames::arp(
                frames::arp_op::REQUEST,
                src_mac,
                src4.unwrap(),
                [0; 6],
                target,
            ),
        ),
        Sent::Udp { dst_mac, dst, ttl } => match dst {
            IpAddr::V4(dst) => {
                let mut p =
                    frames::ipv4(src4.unwrap(), dst, proto::UDP, &frames::udp(5000, 53, b"x"));
                frames::set_ttl4(&mut p, ttl);
                frames::ethernet(dst_mac.0, src_mac, ethertype::IPV4, &p)
            }
            IpAddr::V6(dst) => {
                let mut p =
                    frames::ipv6(src6.unwrap(), dst, proto::UDP, &frames::udp(5000, 53, b"x"));
                p[7] = ttl;
                frames::ethernet(dst_mac.0, src_mac, ethertype::IPV6, &p)
            }
        },
        Sent::Echo { dst_mac, dst } => match dst {
            IpAddr::V4(dst) => frames::ethernet(
                dst_mac.0,
                src_mac,
                ethertype::IPV4,
                &frames::ipv4(src4.unwrap(), dst, proto::ICMP, &frames::icmp4_echo(3, 1)),
            ),
            IpAddr::V6(dst) => frames::ethernet(
                dst_mac.0,
                src_mac,
                ethertype::IPV6,
                &frames::ipv6(src6.unwrap(), dst, proto::ICMPV6, &frames::icmp6_echo(3, 1)),
            ),
        },
    }
}

#[test]
fn routing_agrees_with_the_reference_model() -> Result<()> {
    let seed = env_number("DP_DIFF_SEED", 0x0007_0a7e);
    let states = env_number("DP_DIFF_STATES", 40);
    let frames_per_state = env_number("DP_DIFF_FRAMES", 80);
    let names: Vec<String> = (0..DEVICES).map(|i| format!("d{i}")).collect();
    let (ns, devices) = device_lab("routediff", &names)?;

    let outcomes = ns.run(move || -> Result<BTreeMap<String, u64>> {
        let mut datapath = traced_datapath(4096)?;
        let mut slots = Slots::new(SlotLimits {
            max_ports: 64,
            max_networks: 64,
            max_rules: 1024,
        });
        let mut rng = StdRng::seed_from_u64(seed);
        let mut outcomes = BTreeMap::new();
        let port_of_ifindex: BTreeMap<u32, String> =
            devices.iter().map(|(name, &i)| (i, name.clone())).collect();
        for scenario in 0..states {
            let state = random_state(&mut rng);
            let compiled = compile(
                &state,
                &NodeView {
                    node_name: NODE,
                    interfaces: &devices,
                    peer_devices: &BTreeSet::new(),
                    uplink: None,
                },
                &mut slots,
            );
            datapath.sync(&compiled)?;
            let reference = RouterReference {
                state: &state,
                node_name: NODE,
                devices: &devices,
            };
            let senders: Vec<&Port> = state
                .ports
                .values()
                .filter(|p| compiled.ports.iter().any(|c| c.port_id == p.id))
                .collect();
            if senders.is_empty() {
                continue;
            }
            for case in 0..frames_per_state {
                let sender = *senders.choose(&mut rng).unwrap();
                // Mostly a router interface of the sender's network (of a router up or
                // down), else any router's MAC for that network, attached or not.
                let n: usize = sender.network_id[1..].parse()?;
                let attached: Vec<MacAddr> = state
                    .ports
                    .values()
                    .filter(|p| p.network_id == sender.network_id && p.device_owner == "network:router_interface")
                    .map(|p| p.mac_address)
                    .collect();
                let gateway = match attached.choose(&mut rng) {
                    Some(mac) if rng.random_bool(0.85) => *mac,
                    _ => MacAddr(router_mac(rng.random_range(0..2), n)),
                };
                let v6_family = rng.random_bool(0.4);
                let sent = match rng.random_range(0..10) {
                    0..=4 => Sent::Udp {
                        dst_mac: gateway,
                        dst: random_destination(&mut rng, v6_family),
                        ttl: *[1u8, 2, 64].choose(&mut rng).unwrap(),
                    },
                    5..=7 => Sent::Echo {
                        dst_mac: gateway,
                        dst: random_destination(&mut rng, v6_family),
                    },
                    _ => Sent::ArpRequest {
                        target: match random_destination(&mut rng, false) {
                            IpAddr::V4(a) => a,
                            IpAddr::V6(_) => unreachable!(),
                        },
                    },
                };
                let frame = frame_of(sender, &sent);
                let expected = reference.judge(sender, &sent);
                let out = datapath.test_run(
                    program_names::PORT_INGRESS,
                    devices[&sender.binding.interface_name],
                    0,
                    &frame,
                    1,
                )?;
                let context = || {
                    format!(
                        "seed {seed:#x} state {scenario} frame {case}: {} sent {sent:?}\n\
                         expected {expected:?}, verdict action {} reason {:?} to {:?}\nstate {state:#?}",
                        sender.id,
                        out.verdict.action,
                        DropReason::from_u32(out.verdict.reason),
                        port_of_ifindex.get(&out.verdict.ifindexes[0]),
                    )
                };
                let unicast_to = (out.verdict.action == verdict_action::UNICAST)
                    .then(|| port_of_ifindex.get(&out.verdict.ifindexes[0]).cloned())
                    .flatten();
                let agrees = match &expected {
                    Routed::Drop(reason) => {
                        out.verdict.action == verdict_action::DROP
                            && DropReason::from_u32(out.verdict.reason) == Some(*reason)
                    }
                    Routed::Forward {
                        port,
                        dst_mac,
                        src_mac,
                        ttl,
                    } => {
                        let device = &state.ports[port].binding.interface_name;
                        let ttl_at = if frame[12..14] == [0x86, 0xdd] { ETH_HLEN + 7 } else { ETH_HLEN + 8 };
                        unicast_to.as_ref() == Some(device)
                            && out.frame[0..6] == dst_mac.0
                            && out.frame[6..12] == src_mac.0
                            && out.frame[ttl_at] == *ttl
                    }
                    Routed::Answer { from } => {
                        unicast_to.as_ref() == Some(&sender.binding.interface_name)
                            && out.frame[0..6] == sender.mac_address.0
                            && out.frame[6..12] == from.0
                    }
                    Routed::TimeExceeded { from } => {
                        let v6 = frame[12..14] == [0x86, 0xdd];
                        let (kind_at, kind) = if v6 { (ETH_HLEN + 40, 3) } else { (ETH_HLEN + 20, 11) };
                        unicast_to.as_ref() == Some(&sender.binding.interface_name)
                            && out.frame[0..6] == sender.mac_address.0
                            && out.frame[6..12] == from.0
                            && out.frame.get(kind_at) == Some(&kind)
                    }
                    Routed::Switched => {
                        unicast_to.as_ref() != Some(&sender.binding.interface_name)
                            && (out.verdict.action == verdict_action::FLOOD
                                || (out.verdict.action == verdict_action::DROP
                                    && matches!(
                                        DropReason::from_u32(out.verdict.reason),
                                        Some(DropReason::UnknownDestination | DropReason::NoFloodTarget)
                                    )))
                    }
                };
                ensure!(agrees, "{}", context());
                let name = match &expected {
                    Routed::Drop(reason) => reason.name().to_owned(),
                    Routed::Forward { .. } => "forward".to_owned(),
                    Routed::Answer { .. } => "answer".to_owned(),
                    Routed::TimeExceeded { .. } => "time_exceeded".to_owned(),
                    Routed::Switched => "switched".to_owned(),
                };
                *outcomes.entry(name).or_insert(0) += 1;
            }
        }
        Ok(outcomes)
    })??;
    eprintln!("routing verdicts agreed with the reference (seed {seed:#x}): {outcomes:?}");
    for needed in [
        "forward",
        "answer",
        "switched",
        "no_route",
        "no_neighbor",
        "time_exceeded",
    ] {
        ensure!(
            outcomes.contains_key(needed),
            "never reached {needed}: {outcomes:?}"
        );
    }
    Ok(())
}
