//! Randomized differential test of distributed routing: random networks, subnets,
//! ports, routers (interfaces, admin state, static routes, IPv6 external gateways),
//! compiled and written by the agent's own layers; random frames to router MACs (UDP
//! with random TTLs, echo requests, either family) and ARP requests, run through the
//! sender's `port_ingress`, and random IPv6 frames arriving on the uplink, run through
//! `uplink_xdp` and `uplink_ingress`. Every verdict, and the addresses and TTL of every
//! forwarded frame, must equal the plain-Rust reference
//! (`dataplane_tests::reference_router`). Needs root.
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
        compile::{compile, NodeView, SlotLimits, Slots, Uplink},
        model::{MacAddr, Port, Resource, State},
    },
    kernel::datapath::TestRunOutcome,
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{
        external_network, gateway_port, network, port, router, router_port, subnet, IntoResource,
    },
    frames::{self, ethertype, proto, BROADCAST, ETH_HLEN},
    netns::{device_lab, env_number},
    reference_router::{ExternalUplink, Routed, RouterReference, Sent},
    testrun::{arrive_on_uplink, traced_datapath, UplinkArrival, TC_ACT_OK},
};
use rand::{rngs::StdRng, seq::IndexedRandom, Rng, SeedableRng};

const NODE: &str = "route-diff";
const NETWORKS: usize = 3;
const DEVICES: usize = 6;
const UPLINK: &str = "up0";
/// The external IPv6 subnet's gateway: next hop of what leaves, source of what arrives.
const NEXTHOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 1];
/// A host beyond the external network.
const REMOTE6: &str = "2001:db8:ff::7";

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

/// On the external network: 1 its gateway, 0x10 + r router r's gateway address.
fn external6(host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, host)
}

fn gateway_mac(router: usize) -> [u8; 6] {
    [0xfa, 0x16, 0x3e, 0x0e, 0, router as u8]
}

/// Networks n0..n2 with a v4 and a v6 subnet each; ports p0..p5 (some on missing
/// devices, some on another node); routers r0 and r1 on random subnets (a subnet on one
/// router at most), random admin state and static routes, and mostly a gateway on the
/// external network `ext` (IPv6 only; its subnet mostly with a gateway, the router's
/// gateway port mostly there).
fn random_state(rng: &mut StdRng) -> State {
    let mut resources = vec![external_network("ext").into_resource()];
    resources.push(
        pb::Subnet {
            gateway_ip: if rng.random_bool(0.9) {
                external6(1).to_string()
            } else {
                String::new()
            },
            ..subnet("ext-v6", "ext", "2001:db8:e::/64")
        }
        .into_resource(),
    );
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
        if rng.random_bool(0.75) {
            let address = external6(0x10 + r as u16).to_string();
            r_msg.external_gateway_info = Some(pb::ExternalGatewayInfo {
                network_id: "ext".to_owned(),
                enable_snat: rng.random_bool(0.5),
                external_fixed_ips: vec![pb::ExternalFixedIp {
                    subnet_id: "ext-v6".to_owned(),
                    ip_address: address.clone(),
                }],
            });
            if rng.random_bool(0.9) {
                resources.push(
                    gateway_port(
                        &format!("r{r}-gw"),
                        &format!("r{r}"),
                        "ext",
                        &mac_text(gateway_mac(r)),
                        &[("ext-v6", &address)],
                    )
                    .into_resource(),
                );
            }
        }
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
    State::replace(resources).expect("generated state is valid")
}

/// A destination: a port's, a router's, an unknown host of a subnet, or outside.
fn random_destination(rng: &mut StdRng, v6_family: bool) -> IpAddr {
    let n = rng.random_range(0..NETWORKS);
    // A router's, a port's (port i has host 10 + i, 0x10 + i in IPv6), or nobody's.
    let (host4, host6) = match rng.random_range(0..4) {
        0 => (1, 1),
        1 | 2 => {
            let i = rng.random_range(0..DEVICES as u8);
            (10 + i, 0x10 + u16::from(i))
        }
        _ => (200, 200),
    };
    match (v6_family, rng.random_range(0..8)) {
        (false, 0) => IpAddr::V4(Ipv4Addr::new(192, 168, 3, 4)),
        (false, 1) => IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
        (false, _) => IpAddr::V4(v4(n, host4)),
        (true, 0) => IpAddr::V6(REMOTE6.parse().unwrap()),
        (true, 1) => IpAddr::V6(external6(*[1, 0x10, 0x11, 0x99].choose(rng).unwrap())),
        (true, _) => IpAddr::V6(v6(n, host6)),
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
            IpAddr::V6(dst) => {
                let mut p =
                    frames::ipv6(src6.unwrap(), dst, proto::ICMPV6, &frames::icmp6_echo(3, 1));
                // Echo requests go with hop limit 64, as the reference has them.
                p[7] = 64;
                frames::ethernet(dst_mac.0, src_mac, ethertype::IPV6, &p)
            }
        },
    }
}

/// What arrives on the uplink: from the external gateway, a remote host's UDP or echo
/// request to `dst` with hop limit `ttl`, in a frame for `dst_mac`.
fn inbound_frame(dst_mac: [u8; 6], dst: Ipv6Addr, ttl: u8, echo: bool) -> Vec<u8> {
    let remote: Ipv6Addr = REMOTE6.parse().unwrap();
    let mut p = if echo {
        frames::ipv6(remote, dst, proto::ICMPV6, &frames::icmp6_echo(5, 1))
    } else {
        frames::ipv6(remote, dst, proto::UDP, &frames::udp(5000, 53, b"x"))
    };
    p[7] = ttl;
    frames::ethernet(dst_mac, NEXTHOP_MAC, ethertype::IPV6, &p)
}

/// The device a unicast verdict sends to.
fn unicast_to<'m>(out: &TestRunOutcome, devices: &'m BTreeMap<u32, String>) -> Option<&'m str> {
    (out.verdict.action == verdict_action::UNICAST)
        .then(|| devices.get(&out.verdict.ifindexes[0]).map(String::as_str))
        .flatten()
}

/// Whether the datapath did with `frame` what the reference expected. `sender`: the
/// sending port's device and MAC (answers and errors go back to it).
fn agrees(
    expected: &Routed,
    out: &TestRunOutcome,
    frame: &[u8],
    state: &State,
    sender: (&str, [u8; 6]),
    devices: &BTreeMap<u32, String>,
) -> bool {
    let v6 = frame[12..14] == [0x86, 0xdd];
    let ttl_at = if v6 { ETH_HLEN + 7 } else { ETH_HLEN + 8 };
    let to = unicast_to(out, devices);
    let (sender_device, sender_mac) = sender;
    match expected {
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
            to == Some(state.ports[port].binding.interface_name.as_str())
                && out.frame[0..6] == dst_mac.0
                && out.frame[6..12] == src_mac.0
                && out.frame[ttl_at] == *ttl
        }
        Routed::Uplink {
            dst_mac,
            src_mac,
            ttl,
        } => {
            to == Some(UPLINK)
                && out.frame[0..6] == dst_mac.0
                && out.frame[6..12] == src_mac.0
                && out.frame[ttl_at] == *ttl
                && out.frame[ETH_HLEN..ttl_at] == frame[ETH_HLEN..ttl_at]
                && out.frame[ttl_at + 1..] == frame[ttl_at + 1..]
        }
        Routed::UplinkTimeExceeded { from } => {
            to == Some(UPLINK)
                && out.frame[0..6] == sender_mac
                && out.frame[6..12] == from.0
                && out.frame.get(ETH_HLEN + 40) == Some(&3)
        }
        Routed::Answer { from } => {
            to == Some(sender_device) && out.frame[0..6] == sender_mac && out.frame[6..12] == from.0
        }
        Routed::TimeExceeded { from } => {
            let (kind_at, kind) = if v6 {
                (ETH_HLEN + 40, 3)
            } else {
                (ETH_HLEN + 20, 11)
            };
            to == Some(sender_device)
                && out.frame[0..6] == sender_mac
                && out.frame[6..12] == from.0
                && out.frame.get(kind_at) == Some(&kind)
        }
        Routed::Switched => {
            to != Some(sender_device)
                && (out.verdict.action == verdict_action::FLOOD
                    || (out.verdict.action == verdict_action::DROP
                        && matches!(
                            DropReason::from_u32(out.verdict.reason),
                            Some(DropReason::UnknownDestination | DropReason::NoFloodTarget)
                        )))
        }
    }
}

fn outcome_name(expected: &Routed) -> String {
    match expected {
        Routed::Drop(reason) => reason.name().to_owned(),
        Routed::Forward { .. } => "forward".to_owned(),
        Routed::Uplink { .. } => "uplink".to_owned(),
        Routed::Answer { .. } => "answer".to_owned(),
        Routed::TimeExceeded { .. } => "time_exceeded".to_owned(),
        Routed::UplinkTimeExceeded { .. } => "uplink_time_exceeded".to_owned(),
        Routed::Switched => "switched".to_owned(),
    }
}

#[test]
fn routing_agrees_with_the_reference_model() -> Result<()> {
    let seed = env_number("DP_DIFF_SEED", 0x0007_0a7e);
    let states = env_number("DP_DIFF_STATES", 40);
    let frames_per_state = env_number("DP_DIFF_FRAMES", 80);
    let mut names: Vec<String> = (0..DEVICES).map(|i| format!("d{i}")).collect();
    names.push(UPLINK.to_owned());
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
            // Mostly an uplink, and the external gateway mostly resolved on it.
            let has_uplink = rng.random_bool(0.9);
            let mut gateway_macs = BTreeMap::new();
            if rng.random_bool(0.85) {
                gateway_macs.insert(IpAddr::V6(external6(1)), MacAddr(NEXTHOP_MAC));
            }
            let uplink = Uplink {
                ifindex: devices[UPLINK],
                snat_port_min: 20_000,
                snat_port_count: 16,
                gateway_macs: gateway_macs.clone(),
            };
            let external = ExternalUplink { gateway_macs };
            let compiled = compile(
                &state,
                &NodeView {
                    node_name: NODE,
                    interfaces: &devices,
                    peer_devices: &BTreeSet::new(),
                    uplink: has_uplink.then_some(&uplink),
                },
                &mut slots,
            );
            datapath.sync(&compiled)?;
            let reference = RouterReference {
                state: &state,
                node_name: NODE,
                devices: &devices,
                uplink: has_uplink.then_some(&external),
            };
            let senders: Vec<&Port> = state
                .ports
                .values()
                .map(|port| &**port)
                .filter(|p| compiled.ports.iter().any(|c| c.port_id == p.id))
                .collect();
            if senders.is_empty() {
                continue;
            }
            for case in 0..frames_per_state {
                if rng.random_bool(0.25) {
                    // From outside: mostly for a gateway port's MAC.
                    let dst_mac = match rng.random_range(0..5) {
                        0 | 1 => gateway_mac(0),
                        2 | 3 => gateway_mac(1),
                        _ => [0x02, 0, 0, 0, 0, 0x99],
                    };
                    let dst = match random_destination(&mut rng, true) {
                        IpAddr::V6(a) => a,
                        IpAddr::V4(_) => unreachable!(),
                    };
                    let ttl = *[1u8, 2, 64].choose(&mut rng).unwrap();
                    let echo = rng.random_bool(0.3);
                    let frame = inbound_frame(dst_mac, dst, ttl, echo);
                    let expected = reference.judge_inbound(MacAddr(dst_mac), dst.into(), ttl, echo);
                    let arrival = arrive_on_uplink(&mut datapath, devices[UPLINK], &frame)?;
                    let agreed = match (&expected, &arrival) {
                        (Routed::Answer { from }, UplinkArrival::Tx(answer)) => {
                            answer[0..6] == NEXTHOP_MAC && answer[6..12] == from.0
                        }
                        (Routed::Switched, UplinkArrival::Passed(out)) => {
                            out.return_code == TC_ACT_OK && out.verdict.action == 0
                        }
                        (_, UplinkArrival::Passed(out)) => {
                            agrees(&expected, out, &frame, &state, (UPLINK, NEXTHOP_MAC), &port_of_ifindex)
                        }
                        _ => false,
                    };
                    let got = match &arrival {
                        UplinkArrival::Tx(_) => "answered by uplink_xdp".to_owned(),
                        UplinkArrival::Dropped(reasons) => format!("dropped by uplink_xdp: {reasons:?}"),
                        UplinkArrival::Passed(out) => format!(
                            "uplink_ingress returned {} action {} reason {:?} to {:?}",
                            out.return_code,
                            out.verdict.action,
                            DropReason::from_u32(out.verdict.reason),
                            unicast_to(out, &port_of_ifindex),
                        ),
                    };
                    ensure!(
                        agreed,
                        "seed {seed:#x} state {scenario} frame {case}: from the uplink to {dst} \
                         for {dst_mac:02x?}, hop limit {ttl}, echo {echo}\nexpected {expected:?}, \
                         {got}\nstate {state:#?}"
                    );
                    *outcomes.entry(format!("in:{}", outcome_name(&expected))).or_insert(0) += 1;
                    continue;
                }
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
                let device = sender.binding.interface_name.as_str();
                ensure!(
                    agrees(&expected, &out, &frame, &state, (device, sender.mac_address.0), &port_of_ifindex),
                    "seed {seed:#x} state {scenario} frame {case}: {} sent {sent:?}\n\
                     expected {expected:?}, verdict action {} reason {:?} to {:?}\nstate {state:#?}",
                    sender.id,
                    out.verdict.action,
                    DropReason::from_u32(out.verdict.reason),
                    unicast_to(&out, &port_of_ifindex),
                );
                *outcomes.entry(outcome_name(&expected)).or_insert(0) += 1;
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
        "uplink",
        "in:forward",
        "in:answer",
        "in:switched",
        "in:no_route",
        "in:uplink_time_exceeded",
    ] {
        ensure!(
            outcomes.contains_key(needed),
            "never reached {needed}: {outcomes:?}"
        );
    }
    Ok(())
}
