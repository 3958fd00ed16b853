//! Randomized differential test of the packet trace (`dataplane_agent::core::trace`):
//! random desired states (networks, ports with and without port security, security
//! groups stateful and stateless, routers with IPv4 and IPv6 legs, external gateways
//! with SNAT on or off, floating IPs associated or not, peer delivery on some devices)
//! compiled and written by the agent's own layers; random packet descriptions (TCP with
//! any flags, UDP including DHCP ports, ICMP echo and other types, non-IP ethertypes,
//! spoofed MACs and addresses, any TTL, to ports, routers, floating IPs, gateways and
//! the outside, and from the uplink) traced, and the frame they describe run through
//! the real programs with BPF_PROG_TEST_RUN (`port_ingress`, or `uplink_xdp` and
//! `uplink_ingress`, then `port_egress` of a receiver that is not peer-delivered, and
//! of each flood copy). The trace's verdict must be what the programs did: the action,
//! the drop reason, the target. Needs root.
//!
//! Each frame is a connection's first: conntrack is flushed after each. Reproducible:
//! `DP_DIFF_SEED`, `DP_DIFF_STATES` (default 60), `DP_DIFF_FRAMES` (default 100).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{bail, ensure, Context, Result};
use dataplane_abi::{program_names, verdict_action, DropReason, MARK_FROM_DATAPATH};
use dataplane_agent::{
    core::{
        compile::{compile, Compiled, NodeView, SlotLimits, Slots, Uplink},
        model::{MacAddr, Resource, State},
        trace::{self, Ingress, Network, Probe, Transport, Verdict},
    },
    kernel::datapath::Datapath,
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{
        external_network, floating_ip, gateway_port, network, port, router, router_port,
        security_group, subnet, with_gateway, IntoResource,
    },
    frames::{self, ethertype, BROADCAST},
    netns::{device_lab, env_number},
    testrun::{arrive_on_uplink, traced_datapath, UplinkArrival, TC_ACT_OK},
};
use rand::{rngs::StdRng, seq::IndexedRandom, Rng, SeedableRng};

const NODE: &str = "trace-diff";
const NETWORKS: usize = 3;
const DEVICES: usize = 6;
const UPLINK: &str = "up0";
/// The external subnets' gateway: next hop of what leaves, source of what arrives.
const NEXTHOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 1];
const NEXTHOP4: &str = "203.0.113.1";
const NEXTHOP6: &str = "2001:db8:e::1";

fn port_mac(i: usize) -> [u8; 6] {
    [0xfa, 0x16, 0x3e, 0, 0, i as u8 + 1]
}

fn router_mac(router: usize, network: usize) -> [u8; 6] {
    [0xfa, 0x16, 0x3e, 1, router as u8, network as u8]
}

fn gateway_mac(router: usize) -> [u8; 6] {
    [0xfa, 0x16, 0x3e, 0x0e, 0, router as u8]
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

/// Router r's gateway address (r 0, 1), floating IP i (i 0..3).
fn gateway4(router: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 10 + router as u8)
}

fn gateway6(router: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x10 + router as u16)
}

fn floating4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 100 + i as u8)
}

/// A random rule of group `group`: either direction and family, any or one protocol,
/// port ranges, remote prefixes or the group itself.
fn random_rule(rng: &mut StdRng, id: String, group: &str) -> pb::SecurityGroupRule {
    let v6_rule = rng.random_bool(0.3);
    let (protocol, range) = match rng.random_range(0..6) {
        0 => ("", None),
        1 => ("tcp", Some((80, 80))),
        2 => ("tcp", Some((1000, 2000))),
        3 => ("udp", Some((53, 53))),
        4 => ("udp", None),
        _ => (if v6_rule { "ipv6-icmp" } else { "icmp" }, None),
    };
    let remote_ip_prefix = match rng.random_range(0..5) {
        0 if v6_rule => "fd00::/16".to_owned(),
        0 => "10.0.0.0/8".to_owned(),
        1 if v6_rule => format!("fd00:{}::/64", rng.random_range(0..NETWORKS)),
        1 => format!("10.{}.0.0/24", rng.random_range(0..NETWORKS)),
        _ => String::new(),
    };
    let remote_group_id = if remote_ip_prefix.is_empty() && rng.random_bool(0.2) {
        group.to_owned()
    } else {
        String::new()
    };
    pb::SecurityGroupRule {
        id,
        direction: if rng.random_bool(0.5) {
            pb::Direction::Ingress
        } else {
            pb::Direction::Egress
        } as i32,
        ethertype: if v6_rule {
            pb::EtherType::Ipv6
        } else {
            pb::EtherType::Ipv4
        } as i32,
        protocol: protocol.to_owned(),
        port_range_min: range.map(|(min, _)| min),
        port_range_max: range.map(|(_, max)| max),
        remote_ip_prefix,
        remote_group_id,
        revision_number: 1,
    }
}

fn random_state(rng: &mut StdRng) -> State {
    let mut resources = vec![external_network("ext").into_resource()];
    resources.push(
        pb::Subnet {
            gateway_ip: NEXTHOP4.to_owned(),
            ..subnet("ext-v4", "ext", "203.0.113.0/24")
        }
        .into_resource(),
    );
    resources.push(
        pb::Subnet {
            gateway_ip: NEXTHOP6.to_owned(),
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
    // g0 and g1 stateful, g2 stateless; mostly letting everything out.
    for g in 0..3 {
        let id = format!("g{g}");
        let mut rules: Vec<pb::SecurityGroupRule> = (0..rng.random_range(0..6))
            .map(|r| random_rule(rng, format!("g{g}-r{r}"), &id))
            .collect();
        for (direction, name, p) in [
            (pb::Direction::Egress, "out", 0.7),
            (pb::Direction::Ingress, "in", 0.3),
        ] {
            if !rng.random_bool(p) {
                continue;
            }
            for (family, ethertype) in [("v4", pb::EtherType::Ipv4), ("v6", pb::EtherType::Ipv6)] {
                rules.push(pb::SecurityGroupRule {
                    id: format!("g{g}-{name}-{family}"),
                    direction: direction as i32,
                    ethertype: ethertype as i32,
                    revision_number: 1,
                    ..Default::default()
                });
            }
        }
        resources.push(security_group(&id, g < 2, rules).into_resource());
    }
    for i in 0..DEVICES {
        let n = rng.random_range(0..NETWORKS);
        let host = if rng.random_bool(0.95) {
            NODE
        } else {
            "elsewhere"
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
            &format!("d{i}"),
        );
        p.admin_state_up = rng.random_bool(0.95);
        if rng.random_bool(0.2) {
            p.port_security_enabled = Some(false);
            p.security_group_ids.clear();
        } else {
            p.security_group_ids = match rng.random_range(0..6) {
                0 => vec![],
                1 => vec!["g0".into()],
                2 => vec!["g1".into()],
                3 => vec!["g0".into(), "g1".into()],
                _ => vec!["g2".into()],
            };
            if rng.random_bool(0.2) {
                p.allowed_address_pairs.push(pb::AllowedAddressPair {
                    ip_address: format!("10.{n}.0.128/25"),
                    mac_address: String::new(),
                });
            }
        }
        resources.push(p.into_resource());
    }
    let mut owner: BTreeMap<usize, usize> = BTreeMap::new();
    for n in 0..NETWORKS {
        if rng.random_bool(0.8) {
            owner.insert(n, rng.random_range(0..2));
        }
    }
    let mut gateways = Vec::new();
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
        r_msg.admin_state_up = rng.random_bool(0.9);
        if rng.random_bool(0.8) {
            let (a4, a6) = (gateway4(r).to_string(), gateway6(r).to_string());
            r_msg = with_gateway(r_msg, "ext", "ext-v4", &a4, rng.random_bool(0.7));
            if let Some(info) = r_msg.external_gateway_info.as_mut() {
                info.external_fixed_ips.push(pb::ExternalFixedIp {
                    subnet_id: "ext-v6".into(),
                    ip_address: a6.clone(),
                });
            }
            resources.push(
                gateway_port(
                    &format!("r{r}-gw"),
                    &format!("r{r}"),
                    "ext",
                    &mac_text(gateway_mac(r)),
                    &[("ext-v4", &a4), ("ext-v6", &a6)],
                )
                .into_resource(),
            );
            gateways.push(r);
        }
        if let Some((&n, _)) = owner.iter().find(|(_, &o)| o == r) {
            if rng.random_bool(0.5) {
                r_msg.routes.push(pb::Route {
                    destination: "192.168.0.0/16".into(),
                    nexthop: v4(n, 10 + rng.random_range(0..DEVICES as u8)).to_string(),
                });
            }
        }
        resources.push(r_msg.into_resource());
    }
    for f in 0..3 {
        let port_id = if rng.random_bool(0.7) {
            format!("p{}", rng.random_range(0..DEVICES))
        } else {
            String::new()
        };
        resources.push(
            floating_ip(
                &format!("fip{f}"),
                "ext",
                &floating4(f).to_string(),
                &port_id,
            )
            .into_resource(),
        );
    }
    let resources: Vec<Resource> =
        resources_from_proto(resources).expect("generated resources convert");
    // Two floating IPs on one port's fixed address are refused: then drop one.
    match State::replace(resources.clone()) {
        Ok(state) => state,
        Err(_) => {
            let kept: Vec<Resource> = resources
                .into_iter()
                .filter(|r| !matches!(r, Resource::FloatingIp(f) if f.id != "fip0"))
                .collect();
            State::replace(kept).expect("generated state is valid")
        }
    }
}

/// Where random packets go: ports', routers', unknown hosts, floating IPs, gateways,
/// the outside.
fn random_destination(rng: &mut StdRng, v6_family: bool) -> IpAddr {
    let n = rng.random_range(0..NETWORKS);
    let (host4, host6) = match rng.random_range(0..5) {
        0 => (1, 1),
        1..=3 => {
            let i = rng.random_range(0..DEVICES as u8);
            (10 + i, 0x10 + u16::from(i))
        }
        _ => (200, 200),
    };
    match (v6_family, rng.random_range(0..10)) {
        (false, 0 | 1) => IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
        (false, 2) => IpAddr::V4(Ipv4Addr::new(192, 168, 3, 4)),
        (false, 3) => IpAddr::V4(floating4(rng.random_range(0..3))),
        (false, 4) => IpAddr::V4(gateway4(rng.random_range(0..2))),
        (false, _) => IpAddr::V4(v4(n, host4)),
        (true, 0 | 1) => IpAddr::V6("2001:db8:ff::7".parse().unwrap()),
        (true, 2) => IpAddr::V6(gateway6(rng.random_range(0..2))),
        (true, _) => IpAddr::V6(v6(n, host6)),
    }
}

/// A transport of a connection's first packet; `unique` keeps it apart from earlier
/// frames' (SNAT bindings stay in place between frames).
fn random_transport(rng: &mut StdRng, unique: u16) -> Transport {
    let dport = *[22, 53, 67, 80, 1500, 8080].choose(rng).unwrap();
    match rng.random_range(0..11) {
        10 => Transport::Other { protocol: 47 },
        0..=3 => Transport::Tcp {
            sport: unique,
            dport,
            flags: *[
                trace::SYN,
                trace::SYN,
                trace::ACK,
                trace::SYN | trace::ACK,
                0,
                trace::SYN | trace::FIN,
                trace::FIN | trace::ACK,
                trace::RST,
            ]
            .choose(rng)
            .unwrap(),
        },
        4..=6 => {
            if rng.random_bool(0.1) {
                Transport::Udp {
                    sport: *[67, 68, 546, 547].choose(rng).unwrap(),
                    dport: *[67, 68, 546, 547].choose(rng).unwrap(),
                }
            } else {
                Transport::Udp {
                    sport: unique,
                    dport,
                }
            }
        }
        7 | 8 => Transport::Icmp {
            kind: 0xff, // echo request of the family, set by the caller
            code: 0,
            id: unique,
        },
        _ => Transport::Icmp {
            kind: 0xfe, // another type, set by the caller
            code: 0,
            id: unique,
        },
    }
}

/// The frame a traced probe describes, with the headers the trace resolved.
fn frame_of(probe: &Probe, headers: &trace::Headers) -> Vec<u8> {
    let (dst_mac, src_mac) = (headers.dst_mac.0, headers.src_mac.0);
    let l4 = |v6: bool| match probe.transport {
        Transport::Tcp {
            sport,
            dport,
            flags,
        } => frames::tcp(sport, dport, flags),
        Transport::Udp { sport, dport } => frames::udp(sport, dport, b"x"),
        Transport::Icmp { kind, code, id } => {
            let body = [id.to_be_bytes(), 1u16.to_be_bytes()].concat();
            if v6 {
                frames::icmp6(kind, code, &body)
            } else {
                frames::icmp4(kind, code, &body)
            }
        }
        Transport::Other { .. } => vec![0; 8],
    };
    let protocol = |v6: bool| match probe.transport {
        Transport::Tcp { .. } => 6,
        Transport::Udp { .. } => 17,
        Transport::Icmp { .. } if v6 => 58,
        Transport::Icmp { .. } => 1,
        Transport::Other { protocol } => protocol,
    };
    match (probe.network, headers.src) {
        (Network::V4 { dst, ttl, .. }, Some(IpAddr::V4(src))) => {
            let mut p = frames::ipv4(src, dst, protocol(false), &l4(false));
            frames::set_ttl4(&mut p, ttl);
            frames::ethernet(dst_mac, src_mac, ethertype::IPV4, &p)
        }
        (Network::V6 { dst, hop_limit, .. }, Some(IpAddr::V6(src))) => {
            let mut p = frames::ipv6(src, dst, protocol(true), &l4(true));
            p[7] = hop_limit;
            frames::ethernet(dst_mac, src_mac, ethertype::IPV6, &p)
        }
        (Network::Other { ethertype }, None) => {
            frames::ethernet(dst_mac, src_mac, ethertype, &[0; 46])
        }
        other => panic!("headers do not fit the probe: {other:?}"),
    }
}

/// What became of a frame, in terms both sides can say.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Drop(DropReason),
    /// Unicast to this device, through the receiver's checks.
    To(u32),
    /// Each copy's device and its receiver's drop, if any.
    Flood(BTreeMap<u32, Option<DropReason>>),
    AnsweredOnUplink,
    ToHost,
}

fn expected(verdict: &Verdict) -> Outcome {
    match verdict {
        Verdict::Delivered(t) | Verdict::Answered(t) => Outcome::To(t.ifindex),
        Verdict::Uplink { ifindex } => Outcome::To(*ifindex),
        Verdict::Flooded(copies) => Outcome::Flood(
            copies
                .iter()
                .map(|c| (c.target.ifindex, c.dropped))
                .collect(),
        ),
        Verdict::AnsweredOnUplink => Outcome::AnsweredOnUplink,
        Verdict::ToHost => Outcome::ToHost,
        Verdict::Dropped { reason, .. } => Outcome::Drop(*reason),
    }
}

/// The node the frames run on: the datapath and what it holds.
struct Node<'a> {
    datapath: Datapath,
    compiled: &'a Compiled,
    peers: &'a BTreeSet<u32>,
    /// Port slot by ifindex.
    slots: BTreeMap<u32, u32>,
}

impl Node<'_> {
    /// `port_egress` of the port on `ifindex` for `frame` (switched by the port in
    /// `from_slot`): passed, or its counted drop reason.
    fn egress(&mut self, ifindex: u32, from_slot: u32, frame: &[u8]) -> Result<Option<DropReason>> {
        let slot = self.slots[&ifindex];
        let before = self.datapath.port_counters(slot)?;
        let run = self.datapath.test_run(
            program_names::PORT_EGRESS,
            ifindex,
            MARK_FROM_DATAPATH | from_slot,
            frame,
            1,
        )?;
        if run.return_code == TC_ACT_OK {
            return Ok(None);
        }
        let after = self.datapath.port_counters(slot)?;
        let reason = after
            .drops
            .iter()
            .find(|(reason, count)| {
                before
                    .drops
                    .iter()
                    .find(|(r, _)| r == reason)
                    .map_or(0, |(_, c)| *c)
                    < *count
            })
            .map(|(reason, _)| *reason)
            .context("port_egress dropped without a counted reason")?;
        Ok(Some(reason))
    }

    /// What a tc program's run did, the receiver's `port_egress` included.
    fn outcome(
        &mut self,
        run: &dataplane_agent::kernel::datapath::TestRunOutcome,
        from_slot: u32,
        frame: &[u8],
    ) -> Result<Outcome> {
        let verdict = &run.verdict;
        Ok(match verdict.action {
            verdict_action::DROP => Outcome::Drop(
                DropReason::from_u32(verdict.reason).context("a drop without a reason")?,
            ),
            verdict_action::UNICAST => {
                let target = verdict.ifindexes[0];
                if self.slots.contains_key(&target) && !self.peers.contains(&target) {
                    match self.egress(target, from_slot, &run.frame)? {
                        Some(reason) => Outcome::Drop(reason),
                        None => Outcome::To(target),
                    }
                } else {
                    Outcome::To(target)
                }
            }
            verdict_action::FLOOD => {
                let mut copies = BTreeMap::new();
                for &target in &verdict.ifindexes[..verdict.count as usize] {
                    copies.insert(target, self.egress(target, from_slot, frame)?);
                }
                Outcome::Flood(copies)
            }
            0 if run.return_code == TC_ACT_OK => Outcome::ToHost,
            other => bail!("verdict action {other}, return code {}", run.return_code),
        })
    }

    /// Every connection the run may have opened is forgotten: the next frame is new.
    fn forget_connections(&mut self) -> Result<()> {
        for port in &self.compiled.ports {
            self.datapath.flush_connections(port.slot)?;
        }
        Ok(())
    }
}

fn verdict_name(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Dropped { reason, .. } => reason.name().to_owned(),
        Verdict::Delivered(_) => "delivered".to_owned(),
        Verdict::Answered(_) => "answered".to_owned(),
        Verdict::Uplink { .. } => "uplink".to_owned(),
        Verdict::Flooded(_) => "flood".to_owned(),
        Verdict::AnsweredOnUplink => "answered_on_uplink".to_owned(),
        Verdict::ToHost => "to_host".to_owned(),
    }
}

#[test]
fn trace_verdicts_agree_with_the_programs() -> Result<()> {
    let seed = env_number("DP_DIFF_SEED", 0x7ace_0001);
    let states = env_number("DP_DIFF_STATES", 60);
    let frames_per_state = env_number("DP_DIFF_FRAMES", 100);
    let mut names: Vec<String> = (0..DEVICES).map(|i| format!("d{i}")).collect();
    names.push(UPLINK.to_owned());
    let (ns, devices) = device_lab("tracediff", &names)?;

    let (checked, outcomes) = ns.run(move || -> Result<(u64, BTreeMap<String, u64>)> {
        let mut datapath = traced_datapath(4096)?;
        let mut slots = Slots::new(SlotLimits {
            max_ports: 64,
            max_networks: 64,
            max_rules: 1024,
        });
        let mut rng = StdRng::seed_from_u64(seed);
        let mut outcomes = BTreeMap::new();
        let mut checked = 0;
        let mut unique: u16 = 30_000;
        for scenario in 0..states {
            let state = random_state(&mut rng);
            let mut gateway_macs = BTreeMap::new();
            if rng.random_bool(0.85) {
                gateway_macs.insert(NEXTHOP4.parse()?, MacAddr(NEXTHOP_MAC));
            }
            if rng.random_bool(0.85) {
                gateway_macs.insert(NEXTHOP6.parse()?, MacAddr(NEXTHOP_MAC));
            }
            let uplink = Uplink {
                ifindex: devices[UPLINK],
                snat_port_min: 20_000,
                // Sometimes none: every new SNAT connection is then out of ports.
                snat_port_count: if rng.random_bool(0.3) { 0 } else { 40_000 },
                gateway_macs,
            };
            let peers: BTreeSet<u32> = (0..DEVICES)
                .filter(|_| rng.random_bool(0.5))
                .map(|i| devices[&format!("d{i}")])
                .collect();
            let compiled = compile(
                &state,
                &NodeView {
                    node_name: NODE,
                    interfaces: &devices,
                    peer_devices: &peers,
                    uplink: Some(&uplink),
                },
                &mut slots,
            );
            datapath.sync(&compiled)?;
            let mut node = Node {
                datapath,
                compiled: &compiled,
                peers: &peers,
                slots: compiled.ports.iter().map(|p| (p.ifindex, p.slot)).collect(),
            };
            if compiled.ports.is_empty() {
                datapath = node.datapath;
                continue;
            }
            for case in 0..frames_per_state {
                unique = unique.wrapping_add(1).max(30_000);
                let from_uplink = rng.random_bool(0.2);
                let v6_family = rng.random_bool(0.35);
                let mut transport = random_transport(&mut rng, unique);
                if let Transport::Icmp { kind, .. } = &mut transport {
                    *kind = match (*kind, v6_family) {
                        (0xff, false) => 8,
                        (0xff, true) => 128,
                        (_, false) => *[0u8, 13].choose(&mut rng).unwrap(),
                        (_, true) => *[129u8, 134, 200].choose(&mut rng).unwrap(),
                    };
                }
                let ttl = *[1u8, 2, 64].choose(&mut rng).unwrap();
                let dst = random_destination(&mut rng, v6_family);
                let network = if rng.random_bool(0.04) {
                    Network::Other {
                        ethertype: ethertype::LLDP,
                    }
                } else {
                    match dst {
                        IpAddr::V4(dst) => Network::V4 {
                            src: None,
                            dst,
                            ttl,
                        },
                        IpAddr::V6(dst) => Network::V6 {
                            src: None,
                            dst,
                            hop_limit: ttl,
                        },
                    }
                };
                let mut probe = if from_uplink {
                    let remote: IpAddr = if v6_family {
                        "2001:db8:ff::7".parse()?
                    } else {
                        "198.51.100.7".parse()?
                    };
                    let network = match (network, remote) {
                        (Network::V4 { dst, ttl, .. }, IpAddr::V4(src)) => Network::V4 {
                            src: Some(src),
                            dst,
                            ttl,
                        },
                        (Network::V6 { dst, hop_limit, .. }, IpAddr::V6(src)) => Network::V6 {
                            src: Some(src),
                            dst,
                            hop_limit,
                        },
                        (other, _) => other,
                    };
                    Probe {
                        ingress: Ingress::Uplink,
                        src_mac: Some(MacAddr(NEXTHOP_MAC)),
                        dst_mac: None,
                        network,
                        transport,
                        established: false,
                    }
                } else {
                    let sender = compiled.ports.choose(&mut rng).unwrap();
                    let mut network = network;
                    // Now and then a spoofed source address or MAC.
                    if rng.random_bool(0.08) {
                        network = match network {
                            Network::V4 { dst, ttl, .. } => Network::V4 {
                                src: Some(v4(
                                    rng.random_range(0..NETWORKS),
                                    10 + rng.random_range(0..DEVICES as u8),
                                )),
                                dst,
                                ttl,
                            },
                            Network::V6 { dst, hop_limit, .. } => Network::V6 {
                                src: Some(v6(rng.random_range(0..NETWORKS), 0x99)),
                                dst,
                                hop_limit,
                            },
                            other => other,
                        };
                    }
                    let src_mac = rng
                        .random_bool(0.05)
                        .then(|| MacAddr(port_mac(rng.random_range(0..DEVICES))));
                    Probe {
                        ingress: Ingress::Port(sender.port_id.clone()),
                        src_mac,
                        dst_mac: None,
                        network,
                        transport,
                        established: false,
                    }
                };
                // Now and then another destination MAC than the default.
                if rng.random_bool(0.15) {
                    probe.dst_mac = Some(MacAddr(match rng.random_range(0..5) {
                        0 => BROADCAST,
                        1 => port_mac(rng.random_range(0..DEVICES)),
                        2 => router_mac(rng.random_range(0..2), rng.random_range(0..NETWORKS)),
                        3 => gateway_mac(rng.random_range(0..2)),
                        _ => [0x02, 0, 0, 0, 0, 0x99],
                    }));
                }
                let traced = match trace::trace(&compiled, &probe) {
                    Ok(traced) => traced,
                    // No default MAC for it (or no address): an explicit unknown one.
                    Err(trace::TraceError::NoDefault {
                        field: "dst_mac", ..
                    }) => {
                        probe.dst_mac = Some(MacAddr([0x02, 0, 0, 0, 0, 0x98]));
                        trace::trace(&compiled, &probe)?
                    }
                    Err(trace::TraceError::NoDefault { .. }) => continue,
                    Err(e) => return Err(e.into()),
                };
                let frame = frame_of(&probe, &traced.headers);
                let actual = match &probe.ingress {
                    Ingress::Port(port_id) => {
                        let sender = compiled
                            .ports
                            .iter()
                            .find(|p| &p.port_id == port_id)
                            .unwrap();
                        let run = node.datapath.test_run(
                            program_names::PORT_INGRESS,
                            sender.ifindex,
                            0,
                            &frame,
                            1,
                        )?;
                        node.outcome(&run, sender.slot, &frame)?
                    }
                    Ingress::Uplink => {
                        match arrive_on_uplink(&mut node.datapath, devices[UPLINK], &frame)? {
                            UplinkArrival::Tx(_) => Outcome::AnsweredOnUplink,
                            UplinkArrival::Dropped(reasons) => Outcome::Drop(
                                *reasons
                                    .first()
                                    .context("uplink_xdp dropped without a reason")?,
                            ),
                            UplinkArrival::Passed(run) => node.outcome(&run, 0, &frame)?,
                        }
                    }
                };
                let expected = expected(&traced.verdict);
                ensure!(
                    actual == expected,
                    "seed {seed:#x} state {scenario} frame {case}: {probe:?}\nframe {frame:02x?}\n\
                     trace says {expected:?} ({}), the programs did {actual:?}\nstages {:#?}\n\
                     state {state:#?}",
                    traced.verdict,
                    traced.stages,
                );
                let side = if from_uplink { "in:" } else { "" };
                *outcomes
                    .entry(format!("{side}{}", verdict_name(&traced.verdict)))
                    .or_insert(0) += 1;
                checked += 1;
                node.forget_connections()?;
            }
            datapath = node.datapath;
        }
        Ok((checked, outcomes))
    })??;
    eprintln!("{checked} traces agreed with the programs (seed {seed:#x}): {outcomes:?}");
    for needed in [
        "delivered",
        "answered",
        "uplink",
        "flood",
        "nat_ports_exhausted",
        "policy_denied",
        "ct_invalid",
        "source_ip_spoofed",
        "source_mac_spoofed",
        "no_route",
        "no_neighbor",
        "unknown_destination",
        "port_admin_down",
        "ethertype_not_allowed",
        "nat_unsupported",
        "no_nat_binding",
        "in:delivered",
        "in:uplink",
        "in:no_nat_binding",
        "in:answered_on_uplink",
        "in:to_host",
    ] {
        ensure!(
            outcomes.contains_key(needed),
            "never reached {needed}: {outcomes:?}"
        );
    }
    Ok(())
}
