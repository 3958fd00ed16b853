//! Randomized differential test of NAT at routers' external gateways: random states
//! (1-2 routers with gateways, SNAT on or off, 2-6 ports over 1-3 subnets, floating IPs
//! associated, unassociated, on ports elsewhere, moved between ports mid-run), compiled
//! and written by the agent's own layers; random packets (UDP, TCP, echo, later
//! fragments) from ports to the outside, to floating IPs (others' and their own), to
//! gateways and inside; from the outside to floating IPs, to the gateways on bound and
//! unbound ports, to unknown addresses; replies to what ports received and to SNAT
//! connections (right after the packet that made them, and later); ICMP errors quoting
//! translated packets both ways; ARP on the uplink. Packets from ports run through the
//! sender's `port_ingress`; from the uplink through `uplink_xdp` and, if it passes
//! them, `uplink_ingress`. Every verdict (drop reason, target, answer), and the MACs,
//! addresses, ports, TTL and checksums of every frame that leaves, must equal the
//! plain-Rust reference (`dataplane_tests::reference_nat`), which also tracks the SNAT
//! bindings. Needs root.
//!
//! Each state has its own addresses (external subnet 100.64.k.0/24, remote hosts
//! 198.18.k.0/24, internal subnets 10.n.k.0/24): the SNAT bindings and forward entries
//! earlier states left in the maps never match (stale forward entries are the subject
//! of `packet_nat::a_connection_keeps_its_snat_port_after_its_forward_entry_went_stale`).
//!
//! Reproducible: `DP_DIFF_SEED` (one seed; default: two fixed seeds and one from the
//! clock, all printed) gives the states and the choice of packets; the SNAT ports the
//! datapath picks are its own random ones, and later packets aimed at them follow.
//! `DP_DIFF_STATES` (default 16 per seed), `DP_DIFF_FRAMES` (default 150 per state).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};
use dataplane_abi::{program_names, verdict_action, DropReason};
use dataplane_agent::{
    core::{
        compile::{compile, NodeView, SlotLimits, Slots, Uplink},
        model::{MacAddr, Resource, State},
    },
    kernel::datapath::Datapath,
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{
        external_network, floating_ip, gateway_port, network, port, router, router_port, subnet,
        with_gateway, IntoResource,
    },
    frames::{self, ethertype, proto, tcp_flags, ETH_HLEN},
    netns::{device_lab, env_number},
    reference_nat::{Expect, Input, Judged, NatReference, Node, Outcome, Packet, View, L4},
    testrun::{arrive_on_uplink, UplinkArrival, TC_ACT_OK},
};
use rand::{rngs::StdRng, seq::IndexedRandom, Rng, SeedableRng};

const NODE: &str = "nat-diff";
const UPLINK: &str = "up0";
const NETWORKS: usize = 3;
const DEVICES: usize = 6;
const FIPS: usize = 4;
const NEXTHOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 1];

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

/// Host `host` of network `network` in state `k`.
fn fixed(k: u64, network: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, network as u8, (k % 256) as u8, host)
}

/// Host `host` of state `k`'s external subnet.
fn external(k: u64, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(100, 64 + (k / 256 % 64) as u8, (k % 256) as u8, host)
}

/// Host `host` of state `k`'s outside.
fn remote(k: u64, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18 + (k / 256 % 2) as u8, (k % 256) as u8, host)
}

fn gateway_addr(k: u64, router: usize) -> Ipv4Addr {
    external(k, 10 + router as u8)
}

fn fip_addr(k: u64, j: usize) -> Ipv4Addr {
    external(k, 100 + j as u8)
}

/// A random state `k`, as resources without floating IPs, and its floating IPs.
struct Scenario {
    k: u64,
    resources: Vec<pb::Resource>,
    /// (id, address, port).
    fips: Vec<(String, Ipv4Addr, Option<String>)>,
    /// Ports a floating IP may be associated with: on a subnet of a router with a
    /// gateway (as the API requires), here or elsewhere.
    eligible: Vec<String>,
    uplink: Uplink,
}

impl Scenario {
    fn random(rng: &mut StdRng, k: u64, uplink_ifindex: u32) -> Scenario {
        let mut resources = vec![
            external_network("ext").into_resource(),
            pb::Subnet {
                gateway_ip: external(k, 1).to_string(),
                ..subnet("ext-v4", "ext", &format!("{}/24", external(k, 0)))
            }
            .into_resource(),
        ];
        let networks = rng.random_range(1..=NETWORKS);
        for n in 0..networks {
            resources.push(network(&format!("n{n}")).into_resource());
            resources.push(
                subnet(
                    &format!("s{n}"),
                    &format!("n{n}"),
                    &format!("{}/24", fixed(k, n, 0)),
                )
                .into_resource(),
            );
        }
        let ports = rng.random_range(2..=DEVICES);
        let mut port_network = Vec::new();
        for i in 0..ports {
            let n = rng.random_range(0..networks);
            port_network.push(n);
            let host = if rng.random_bool(0.9) {
                NODE
            } else {
                "elsewhere"
            };
            let device = if rng.random_bool(0.93) {
                format!("d{i}")
            } else {
                format!("gone{i}")
            };
            let a = fixed(k, n, 10 + i as u8).to_string();
            let mut p = port(
                &format!("p{i}"),
                &format!("n{n}"),
                &mac_text(port_mac(i)),
                &[(&format!("s{n}"), &a)],
                host,
                &device,
            );
            p.security_group_ids.clear();
            p.port_security_enabled = Some(false);
            resources.push(p.into_resource());
        }
        // Each network on one router at most.
        let routers = rng.random_range(1..=2);
        let mut owner: BTreeMap<usize, usize> = BTreeMap::new();
        for n in 0..networks {
            if rng.random_bool(0.9) {
                owner.insert(n, rng.random_range(0..routers));
            }
        }
        let mut with_gw = BTreeSet::new();
        for r in 0..routers {
            let mut interfaces = Vec::new();
            for (&n, _) in owner.iter().filter(|(_, &o)| o == r) {
                let id = format!("r{r}-n{n}");
                let a = fixed(k, n, 1).to_string();
                resources.push(
                    router_port(
                        &id,
                        &format!("n{n}"),
                        &mac_text(router_mac(r, n)),
                        &[(&format!("s{n}"), &a)],
                    )
                    .into_resource(),
                );
                interfaces.push((format!("s{n}"), id));
            }
            let pairs: Vec<(&str, &str)> = interfaces
                .iter()
                .map(|(s, p)| (s.as_str(), p.as_str()))
                .collect();
            let mut msg = router(&format!("r{r}"), &pairs);
            msg.admin_state_up = rng.random_bool(0.92);
            if let Some((&n, _)) = owner.iter().find(|(_, &o)| o == r) {
                if rng.random_bool(0.3) {
                    let host = 10 + rng.random_range(0..ports) as u8;
                    msg.routes.push(pb::Route {
                        destination: "192.168.0.0/16".into(),
                        nexthop: fixed(k, n, host).to_string(),
                    });
                }
            }
            if rng.random_bool(0.88) {
                let address = gateway_addr(k, r).to_string();
                msg = with_gateway(msg, "ext", "ext-v4", &address, rng.random_bool(0.7));
                with_gw.insert(r);
                // Rarely the gateway port is missing: no gateway is programmed.
                if rng.random_bool(0.95) {
                    resources.push(
                        gateway_port(
                            &format!("r{r}-gw"),
                            &format!("r{r}"),
                            "ext",
                            &mac_text(gateway_mac(r)),
                            &[("ext-v4", &address)],
                        )
                        .into_resource(),
                    );
                }
            }
            resources.push(msg.into_resource());
        }
        let eligible: Vec<String> = (0..ports)
            .filter(|&i| {
                owner
                    .get(&port_network[i])
                    .is_some_and(|r| with_gw.contains(r))
            })
            .map(|i| format!("p{i}"))
            .collect();
        let mut fips = Vec::new();
        let mut taken = BTreeSet::new();
        for j in 0..rng.random_range(1..=FIPS) {
            let free: Vec<&String> = eligible.iter().filter(|p| !taken.contains(*p)).collect();
            let port = match free.choose(rng) {
                Some(p) if rng.random_bool(0.75) => {
                    taken.insert((*p).clone());
                    Some((*p).clone())
                }
                _ => None,
            };
            fips.push((format!("fip{j}"), fip_addr(k, j), port));
        }
        let mut gateway_macs = BTreeMap::new();
        if rng.random_bool(0.88) {
            gateway_macs.insert(external(k, 1).into(), MacAddr(NEXTHOP_MAC));
        }
        let uplink = Uplink {
            ifindex: uplink_ifindex,
            snat_port_min: *[20_000u16, 40_000].choose(rng).unwrap(),
            snat_port_count: *[3u16, 8, 1024].choose(rng).unwrap(),
            gateway_macs,
        };
        Scenario {
            k,
            resources,
            fips,
            eligible,
            uplink,
        }
    }

    fn state(&self) -> Result<State> {
        let mut all = self.resources.clone();
        for (id, address, port) in &self.fips {
            all.push(
                floating_ip(
                    id,
                    "ext",
                    &address.to_string(),
                    port.as_deref().unwrap_or(""),
                )
                .into_resource(),
            );
        }
        let resources: Vec<Resource> = resources_from_proto(all)?;
        Ok(State::replace(resources)?)
    }

    /// Moves, drops or makes an association of a random floating IP.
    fn move_floating_ip(&mut self, rng: &mut StdRng) {
        let j = rng.random_range(0..self.fips.len());
        let used: BTreeSet<String> = self
            .fips
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != j)
            .filter_map(|(_, f)| f.2.clone())
            .collect();
        let free: Vec<&String> = self
            .eligible
            .iter()
            .filter(|p| !used.contains(*p))
            .collect();
        self.fips[j].2 = match free.choose(rng) {
            Some(p) if rng.random_bool(0.75) => Some((*p).clone()),
            _ => None,
        };
    }
}

/// What the datapath did with a frame (its fields read through `Debug`).
#[derive(Debug)]
#[allow(dead_code)]
enum Got {
    Drop(Option<DropReason>),
    Unicast {
        ifindex: u32,
        frame: Vec<u8>,
    },
    Flood,
    /// `uplink_ingress` left it to the host.
    Host,
    /// `uplink_xdp` sent it back out.
    Tx(Vec<u8>),
    Other(String),
}

struct Lab {
    datapath: Datapath,
    devices: BTreeMap<String, u32>,
}

impl Lab {
    fn run_from_port(&mut self, device: &str, frame: &[u8]) -> Result<Got> {
        let out = self.datapath.test_run(
            program_names::PORT_INGRESS,
            self.devices[device],
            0,
            frame,
            1,
        )?;
        Ok(match out.verdict.action {
            verdict_action::DROP => Got::Drop(DropReason::from_u32(out.verdict.reason)),
            verdict_action::UNICAST => Got::Unicast {
                ifindex: out.verdict.ifindexes[0],
                frame: out.frame,
            },
            verdict_action::FLOOD => Got::Flood,
            other => Got::Other(format!("action {other}, return code {}", out.return_code)),
        })
    }

    fn run_from_uplink(&mut self, frame: &[u8]) -> Result<Got> {
        let ifindex = self.devices[UPLINK];
        Ok(match arrive_on_uplink(&mut self.datapath, ifindex, frame) {
            Ok(UplinkArrival::Tx(out)) => Got::Tx(out),
            Ok(UplinkArrival::Dropped(counted)) => match counted[..] {
                [reason] => Got::Drop(Some(reason)),
                _ => Got::Other(format!("XDP_DROP counted as {counted:?}")),
            },
            Err(e) => Got::Other(format!("{e:#}")),
            Ok(UplinkArrival::Passed(out)) => match out.verdict.action {
                verdict_action::DROP => Got::Drop(DropReason::from_u32(out.verdict.reason)),
                verdict_action::UNICAST => Got::Unicast {
                    ifindex: out.verdict.ifindexes[0],
                    frame: out.frame,
                },
                0 if out.return_code == TC_ACT_OK => Got::Host,
                other => Got::Other(format!(
                    "uplink_ingress action {other}, code {}",
                    out.return_code
                )),
            },
        })
    }
}

fn frame_of(state: &State, input: &Input) -> Vec<u8> {
    match input {
        Input::FromPort {
            port,
            dst_mac,
            packet,
        } => frames::ethernet(
            dst_mac.0,
            state.ports[port].mac_address.0,
            ethertype::IPV4,
            &packet.encode(),
        ),
        Input::FromUplink {
            dst_mac,
            src_mac,
            packet,
        } => frames::ethernet(dst_mac.0, src_mac.0, ethertype::IPV4, &packet.encode()),
        Input::ArpOnUplink {
            sender_mac,
            sender,
            target,
        } => frames::arp_request_frame(sender_mac.0, *sender, *target),
    }
}

/// The frame `got` against `expected`: MACs, and the packet decoded (every checksum
/// valid) against the expected one, a new SNAT binding's port taken from what came
/// out (it must be one of the free ones). Returns that port.
fn check_frame(judged: &Judged, expected: &Expect, frame: &[u8]) -> Result<Option<u16>, String> {
    if frame.len() < ETH_HLEN || frame[12..14] != ethertype::IPV4.to_be_bytes() {
        return Err(format!("not an IPv4 frame: {frame:02x?}"));
    }
    let view = View::decode(&frame[ETH_HLEN..])?;
    let mut port = None;
    let mut want = expected.packet.view();
    if let Some(free) = judged.snat.as_ref().and_then(|p| p.fresh.as_ref()) {
        if !free.contains(&view.sport) {
            return Err(format!(
                "SNAT port {} is not a free one of {free:?}",
                view.sport
            ));
        }
        port = Some(view.sport);
        want = judged.expected_frame(port).unwrap().packet.view();
    } else if let Some(p) = &judged.snat {
        port = Some(p.key.external_port);
    }
    if frame[0..6] != expected.dst_mac.0 || frame[6..12] != expected.src_mac.0 {
        return Err(format!(
            "MACs {:02x?} -> {:02x?}, expected {:02x?} -> {:02x?}",
            &frame[6..12],
            &frame[0..6],
            expected.src_mac.0,
            expected.dst_mac.0
        ));
    }
    if view != want {
        return Err(format!("packet\n     got {view:?}\nexpected {want:?}"));
    }
    Ok(port)
}

/// Compares; returns the SNAT port a new binding got.
fn compare(
    judged: &Judged,
    got: &Got,
    sender: Option<(&str, MacAddr)>,
    devices: &BTreeMap<String, u32>,
    state: &State,
    input: &Input,
) -> Result<Option<u16>, String> {
    let device_of = |port: &str| {
        devices
            .get(&state.ports[port].binding.interface_name)
            .copied()
    };
    let fail = || Err(format!("got {got:?}"));
    match (&judged.outcome, got) {
        (Outcome::Drop(reason), Got::Drop(r)) if Some(*reason) == *r => Ok(None),
        (Outcome::ToPort { port, frame: want }, Got::Unicast { ifindex, frame })
            if device_of(port) == Some(*ifindex) =>
        {
            check_frame(judged, want, frame)
        }
        (Outcome::ToUplink { frame: want }, Got::Unicast { ifindex, frame })
            if *ifindex == devices[UPLINK] =>
        {
            check_frame(judged, want, frame)
        }
        (Outcome::Host, Got::Host) => Ok(None),
        (Outcome::ArpReply { mac }, Got::Tx(frame)) => {
            let Input::ArpOnUplink {
                sender_mac,
                sender,
                target,
            } = input
            else {
                return fail();
            };
            let reply = frames::ethernet(
                sender_mac.0,
                mac.0,
                ethertype::ARP,
                &frames::arp(frames::arp_op::REPLY, mac.0, *target, sender_mac.0, *sender),
            );
            if *frame == reply {
                Ok(None)
            } else {
                Err(format!("ARP reply {frame:02x?}, expected {reply:02x?}"))
            }
        }
        (Outcome::UplinkEchoReply { frame: want }, Got::Tx(frame)) => {
            check_frame(judged, want, frame)
        }
        (Outcome::Answer { from }, Got::Unicast { ifindex, frame })
        | (Outcome::TimeExceeded { from }, Got::Unicast { ifindex, frame }) => {
            let (device, mac) = sender.ok_or("no sender")?;
            let kind = if matches!(judged.outcome, Outcome::Answer { .. }) {
                0
            } else {
                11
            };
            if devices.get(device) == Some(ifindex)
                && frame[0..6] == mac.0
                && frame[6..12] == from.0
                && frame.get(ETH_HLEN + 20) == Some(&kind)
            {
                Ok(None)
            } else {
                fail()
            }
        }
        (Outcome::Switched, Got::Flood)
        | (
            Outcome::Switched,
            Got::Drop(Some(DropReason::UnknownDestination | DropReason::NoFloodTarget)),
        ) => Ok(None),
        (Outcome::Ambiguous, Got::Unicast { frame, .. }) => {
            Ok(View::decode(&frame[ETH_HLEN..]).ok().map(|v| v.sport))
        }
        (Outcome::Ambiguous, _) => Ok(None),
        _ => fail(),
    }
}

/// What a port received: kept to reply to and to quote in errors.
#[derive(Clone)]
struct Received {
    port: String,
    packet: Packet,
    /// Sent by another port through a gateway address, translated twice (hairpin).
    hairpin_snat: bool,
}

/// The generator's memory of one state's traffic.
#[derive(Default)]
struct History {
    received: Vec<Received>,
    /// Packets that left through the uplink, as they left.
    sent_out: Vec<Packet>,
    /// Inputs to run next (the reply to a new SNAT connection).
    next: Vec<Input>,
}

fn l4_random(rng: &mut StdRng) -> L4 {
    match rng.random_range(0..20) {
        0..=10 => L4::Udp {
            sport: *[1000u16, 1001, 5000].choose(rng).unwrap(),
            dport: *[53u16, 7000].choose(rng).unwrap(),
            checksum: rng.random_bool(0.9),
        },
        11..=14 => L4::Tcp {
            sport: *[1000u16, 2000].choose(rng).unwrap(),
            dport: *[80u16, 443].choose(rng).unwrap(),
            flags: *[tcp_flags::SYN, tcp_flags::ACK, tcp_flags::FIN_ACK]
                .choose(rng)
                .unwrap(),
        },
        15..=18 => L4::EchoRequest {
            id: *[1u16, 2, 77].choose(rng).unwrap(),
            seq: rng.random_range(0..4),
        },
        _ => L4::EchoReply {
            id: rng.random_range(1..3),
            seq: 1,
        },
    }
}

fn ttl_random(rng: &mut StdRng) -> u8 {
    match rng.random_range(0..100) {
        0..=5 => 1,
        6..=12 => 2,
        _ => 64,
    }
}

/// The reply to `p` (as its receiver would answer it), if it has one.
fn reply_to(p: &Packet) -> Option<Packet> {
    let l4 = match p.l4 {
        L4::Udp {
            sport,
            dport,
            checksum,
        } => L4::Udp {
            sport: dport,
            dport: sport,
            checksum,
        },
        L4::Tcp { sport, dport, .. } => L4::Tcp {
            sport: dport,
            dport: sport,
            flags: tcp_flags::SYN_ACK,
        },
        L4::EchoRequest { id, seq } => L4::EchoReply { id, seq },
        _ => return None,
    };
    p.first_fragment().then(|| Packet::new(p.dst, p.src, l4))
}

fn error_about(rng: &mut StdRng, from: Ipv4Addr, to: Ipv4Addr, about: &Packet) -> Packet {
    let (kind, code, rest) = *[(3u8, 4u8, 1280u32), (3, 3, 0), (11, 0, 0)]
        .choose(rng)
        .unwrap();
    Packet::new(
        from,
        to,
        L4::Error {
            kind,
            code,
            rest,
            quote: Box::new(about.clone()),
        },
    )
}

/// A random input for `scenario`, from what happened so far.
fn random_input(
    rng: &mut StdRng,
    scenario: &Scenario,
    state: &State,
    senders: &[String],
    history: &mut History,
    reference: &NatReference,
) -> Input {
    if let Some(next) = history.next.pop() {
        return next;
    }
    let k = scenario.k;
    let routers: Vec<usize> = (0..2)
        .filter(|r| state.routers.contains_key(&format!("r{r}")))
        .collect();
    let some_fip = |rng: &mut StdRng| {
        scenario
            .fips
            .choose(rng)
            .map(|f| f.1)
            .unwrap_or(external(k, 100))
    };
    let uplink_dst_mac = MacAddr(gateway_mac(*routers.choose(rng).unwrap_or(&0)));
    let from_outside = |packet: Packet| Input::FromUplink {
        dst_mac: uplink_dst_mac,
        src_mac: MacAddr(NEXTHOP_MAC),
        packet,
    };
    match rng.random_range(0..100) {
        // From a port.
        0..=54 if !senders.is_empty() => {
            // Mostly a port with a router on its network.
            let routed: Vec<&String> = senders
                .iter()
                .filter(|id| {
                    let network = &state.ports[*id].network_id;
                    state.ports.values().any(|p| {
                        &p.network_id == network && p.device_owner == "network:router_interface"
                    })
                })
                .collect();
            let id = match routed.choose(rng) {
                Some(id) if rng.random_bool(0.95) => (*id).clone(),
                _ => senders.choose(rng).unwrap().clone(),
            };
            let sender = &state.ports[&id];
            let n: usize = sender.network_id[1..].parse().unwrap();
            let attached: Vec<MacAddr> = state
                .ports
                .values()
                .filter(|p| {
                    p.network_id == sender.network_id
                        && p.device_owner == "network:router_interface"
                })
                .map(|p| p.mac_address)
                .collect();
            let dst_mac = match attached.choose(rng) {
                Some(mac) if rng.random_bool(0.97) => *mac,
                _ => MacAddr(router_mac(rng.random_range(0..2), (n + 1) % NETWORKS)),
            };
            let src = match sender.fixed_ips[0].ip_address {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => unreachable!(),
            };
            // Errors are not answered, nor quoted. What another port sent it through SNAT
            // and a gateway address is only replied to: errors about it are not
            // translated (see the README).
            let mine: Vec<&Received> = history
                .received
                .iter()
                .filter(|r| r.port == id && !matches!(r.packet.l4, L4::Error { .. }))
                .filter(|r| !r.hairpin_snat || reply_to(&r.packet).is_some())
                .collect();
            let mut packet = match rng.random_range(0..100) {
                // A reply to, or an error about, what it received.
                0..=19 if !mine.is_empty() => {
                    let received = mine.choose(rng).unwrap();
                    let got = &received.packet;
                    match reply_to(got) {
                        Some(reply) if received.hairpin_snat => reply,
                        Some(reply) if rng.random_bool(0.7) => reply,
                        _ => error_about(rng, src, got.src, got),
                    }
                }
                r => {
                    let dst = match r {
                        0..=39 => remote(k, rng.random_range(2..6)),
                        40..=44 => external(k, 50),
                        45..=64 => some_fip(rng),
                        65..=74 => gateway_addr(k, rng.random_range(0..2)),
                        75..=84 => {
                            let n = rng.random_range(0..NETWORKS);
                            fixed(
                                k,
                                n,
                                *[1u8, 10, 11, 12, 13, 14, 15, 200].choose(rng).unwrap(),
                            )
                        }
                        _ => Ipv4Addr::new(192, 168, (k % 256) as u8, 4),
                    };
                    let mut p = Packet::new(src, dst, l4_random(rng));
                    if rng.random_bool(0.04) {
                        p.frag_offset = 8;
                        p.l4 = L4::Other {
                            proto: proto::UDP,
                            bytes: vec![0x5a; 16],
                        };
                    } else if rng.random_bool(0.03) {
                        p.more_fragments = true;
                    }
                    p
                }
            };
            packet.ttl = ttl_random(rng);
            Input::FromPort {
                port: id,
                dst_mac,
                packet,
            }
        }
        // ARP on the uplink.
        55..=59 => {
            let target = match rng.random_range(0..4) {
                0 => gateway_addr(k, rng.random_range(0..2)),
                1 | 2 => some_fip(rng),
                _ => *[external(k, 77), external(k, 1)].choose(rng).unwrap(),
            };
            Input::ArpOnUplink {
                sender_mac: MacAddr(NEXTHOP_MAC),
                sender: external(k, 1),
                target,
            }
        }
        // A reply to an SNAT connection (a later one, or one of another endpoint).
        60..=72 if !reference.bindings.is_empty() => {
            let keys: Vec<_> = reference.bindings.keys().collect();
            let key = *keys.choose(rng).unwrap();
            let wrong = rng.random_bool(0.15);
            let l4 = match key.proto {
                proto::UDP => L4::Udp {
                    sport: key.remote_port + u16::from(wrong),
                    dport: key.external_port,
                    checksum: true,
                },
                proto::TCP => L4::Tcp {
                    sport: key.remote_port + u16::from(wrong),
                    dport: key.external_port,
                    flags: tcp_flags::SYN_ACK,
                },
                _ => L4::EchoReply {
                    id: key.external_port + u16::from(wrong),
                    seq: 0,
                },
            };
            let mut packet = Packet::new(key.remote, key.gateway, l4);
            packet.ttl = ttl_random(rng);
            if key.remote.octets()[0] != 198 {
                // A hairpin connection's "remote" is inside: the reply is from a port.
                packet.src = remote(k, 2);
            }
            from_outside(packet)
        }
        // An ICMP error about what left (or about nothing that did).
        73..=82 => {
            let quotable: Vec<&Packet> = history
                .sent_out
                .iter()
                .filter(|p| !matches!(p.l4, L4::Error { .. }))
                .collect();
            let about = match quotable.choose(rng) {
                Some(p) if rng.random_bool(0.85) => (*p).clone(),
                _ => Packet::new(
                    gateway_addr(k, rng.random_range(0..2)),
                    remote(k, 9),
                    L4::Udp {
                        sport: scenario.uplink.snat_port_min,
                        dport: 9,
                        checksum: true,
                    },
                ),
            };
            let from = if rng.random_bool(0.5) {
                about.dst
            } else {
                remote(k, 1)
            };
            let mut packet = error_about(rng, from, about.src, &about);
            packet.ttl = ttl_random(rng);
            from_outside(packet)
        }
        // To a floating IP, a gateway, or someone else.
        _ => {
            let dst = match rng.random_range(0..10) {
                0..=4 => some_fip(rng),
                5..=7 => gateway_addr(k, rng.random_range(0..2)),
                8 => external(k, 77),
                _ => fixed(
                    k,
                    rng.random_range(0..NETWORKS),
                    10 + rng.random_range(0..DEVICES) as u8,
                ),
            };
            let mut l4 = l4_random(rng);
            if dst == gateway_addr(k, 0) || dst == gateway_addr(k, 1) {
                // Some port of the range, mostly bound to nothing.
                let port = scenario.uplink.snat_port_min + rng.random_range(0..3);
                match &mut l4 {
                    L4::Udp { dport, .. } | L4::Tcp { dport, .. } => *dport = port,
                    L4::EchoReply { id, .. } => *id = port,
                    _ => {}
                }
            }
            let mut packet = Packet::new(remote(k, rng.random_range(2..6)), dst, l4);
            packet.ttl = ttl_random(rng);
            from_outside(packet)
        }
    }
}

fn outcome_name(judged: &Judged, input: &Input) -> String {
    let hairpin = matches!(input, Input::FromPort { .. });
    match &judged.outcome {
        Outcome::Drop(r) => r.name().to_owned(),
        Outcome::ToPort { frame, .. } => {
            let error = matches!(frame.packet.l4, L4::Error { .. });
            let nat = judged.snat.is_some()
                || match input {
                    Input::FromPort { packet, .. } | Input::FromUplink { packet, .. } => {
                        packet.src != frame.packet.src || packet.dst != frame.packet.dst
                    }
                    _ => false,
                };
            match (hairpin, nat, error) {
                (true, false, _) => "routed_inside".into(),
                (true, true, false) => "hairpin".into(),
                (true, true, true) => "hairpin_error".into(),
                (false, _, true) => "error_in".into(),
                (false, _, false) if frame.packet.dst != frame_dst_before(input) => {
                    "translated_in".into()
                }
                (false, _, false) => "routed_in".into(),
            }
        }
        // Back out where it came from: expired in the router.
        Outcome::ToUplink { .. } if !hairpin => "expired_in".into(),
        Outcome::ToUplink { frame } => match (&judged.snat, &frame.packet.l4) {
            (_, L4::Error { .. }) => "error_out".into(),
            (Some(_), _) => "snat_out".into(),
            (None, _) => "out".into(),
        },
        Outcome::Host => "host".into(),
        Outcome::ArpReply { .. } => "arp_reply".into(),
        Outcome::UplinkEchoReply { .. } => "gateway_echo_reply".into(),
        Outcome::Answer { .. } => "answer".into(),
        Outcome::TimeExceeded { .. } => "time_exceeded".into(),
        Outcome::Switched => "switched".into(),
        Outcome::Ambiguous => "ambiguous".into(),
    }
}

fn frame_dst_before(input: &Input) -> Ipv4Addr {
    match input {
        Input::FromPort { packet, .. } | Input::FromUplink { packet, .. } => packet.dst,
        Input::ArpOnUplink { target, .. } => *target,
    }
}

#[derive(Default)]
struct Totals {
    verdicts: u64,
    outcomes: BTreeMap<String, u64>,
    snat_replies: u64,
}

fn run_seed(seed: u64, states: u64, frames_per_state: u64) -> Result<Totals> {
    let mut names: Vec<String> = (0..DEVICES).map(|i| format!("d{i}")).collect();
    names.push(UPLINK.to_owned());
    let (ns, devices) = device_lab("natdiff", &names)?;
    ns.run(move || -> Result<Totals> {
        let datapath = dataplane_tests::testrun::traced_datapath(4096)?;
        let mut lab = Lab { datapath, devices };
        let mut slots = Slots::new(SlotLimits {
            max_ports: 64,
            max_networks: 64,
            max_rules: 1024,
        });
        let mut rng = StdRng::seed_from_u64(seed);
        let mut totals = Totals::default();
        for k in 0..states {
            let mut scenario = Scenario::random(&mut rng, k, lab.devices[UPLINK]);
            let mut reference = NatReference::new();
            let mut history = History::default();
            let mut state = scenario.state()?;
            let mut senders: Vec<String> = Vec::new();
            for case in 0..frames_per_state {
                if case == 0 || (case % (frames_per_state / 3).max(1) == 0 && rng.random_bool(0.8))
                {
                    if case != 0 {
                        scenario.move_floating_ip(&mut rng);
                        state = scenario.state()?;
                    }
                    let compiled = compile(
                        &state,
                        &NodeView {
                            node_name: NODE,
                            interfaces: &lab.devices,
                            peer_devices: &BTreeSet::new(),
                            uplink: Some(&scenario.uplink),
                        },
                        &mut slots,
                    );
                    lab.datapath.sync(&compiled)?;
                    senders = compiled.ports.iter().map(|p| p.port_id.clone()).collect();
                }
                let input = random_input(
                    &mut rng,
                    &scenario,
                    &state,
                    &senders,
                    &mut history,
                    &reference,
                );
                let node = Node {
                    state: &state,
                    node_name: NODE,
                    devices: &lab.devices,
                    uplink: &scenario.uplink,
                };
                let judged = reference.judge(&node, &input);
                let frame = frame_of(&state, &input);
                let (got, sender) = match &input {
                    Input::FromPort { port, .. } => {
                        let p = &state.ports[port];
                        let device = p.binding.interface_name.clone();
                        (
                            lab.run_from_port(&device, &frame)?,
                            Some((device, p.mac_address)),
                        )
                    }
                    _ => (lab.run_from_uplink(&frame)?, None),
                };
                let verdict = compare(
                    &judged,
                    &got,
                    sender.as_ref().map(|(d, m)| (d.as_str(), *m)),
                    &lab.devices,
                    &state,
                    &input,
                );
                let port = match verdict {
                    Ok(port) => port,
                    Err(why) => bail!(
                        "seed {seed:#x} state {k} frame {case}: {why}\ninput {input:#?}\n\
                             frame {frame:02x?}\nexpected {judged:#?}\ngot {got:?}\n\
                             bindings {:#?}\nuplink {:?}\nstate {state:#?}",
                        reference.bindings,
                        scenario.uplink,
                    ),
                };
                reference.record(&judged, port);
                totals.verdicts += 1;
                *totals
                    .outcomes
                    .entry(outcome_name(&judged, &input))
                    .or_insert(0) += 1;
                // Remember what went where, for replies and errors.
                let expected = judged.expected_frame(port);
                match (&judged.outcome, expected) {
                    (Outcome::ToPort { port: to, .. }, Some(e)) => {
                        if let Input::FromUplink { packet, .. } = &input {
                            let to_gateway = (0..2).any(|r| gateway_addr(k, r) == packet.dst);
                            if to_gateway && !matches!(packet.l4, L4::Error { .. }) {
                                totals.snat_replies += 1;
                            }
                        }
                        let hairpin_snat = matches!(input, Input::FromPort { .. })
                            && (0..2).any(|r| gateway_addr(k, r) == e.packet.src);
                        history.received.push(Received {
                            port: to.clone(),
                            packet: e.packet,
                            hairpin_snat,
                        });
                    }
                    (Outcome::ToUplink { .. }, Some(e)) => {
                        if judged.snat.as_ref().is_some_and(|p| p.fresh.is_some())
                            && rng.random_bool(0.5)
                        {
                            if let Some(mut reply) = reply_to(&e.packet) {
                                reply.ttl = 60;
                                history.next.push(Input::FromUplink {
                                    dst_mac: e.src_mac,
                                    src_mac: MacAddr(NEXTHOP_MAC),
                                    packet: reply,
                                });
                            }
                        }
                        history.sent_out.push(e.packet);
                    }
                    _ => {}
                }
                if history.received.len() > 64 {
                    history.received.remove(0);
                }
                if history.sent_out.len() > 64 {
                    history.sent_out.remove(0);
                }
            }
        }
        Ok(totals)
    })?
}

#[test]
fn nat_agrees_with_the_reference_model() -> Result<()> {
    let seeds: Vec<u64> = match std::env::var("DP_DIFF_SEED") {
        Ok(_) => vec![env_number("DP_DIFF_SEED", 0)],
        Err(_) => {
            let clock = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            vec![0x00ba_7a11, 0x5eed_0002, clock]
        }
    };
    let states = env_number("DP_DIFF_STATES", 16);
    let frames_per_state = env_number("DP_DIFF_FRAMES", 150);
    let started = Instant::now();
    let mut all = Totals::default();
    for seed in seeds {
        eprintln!("NAT differential: seed {seed:#x} (DP_DIFF_SEED={seed})");
        let t =
            run_seed(seed, states, frames_per_state).with_context(|| format!("seed {seed:#x}"))?;
        all.verdicts += t.verdicts;
        all.snat_replies += t.snat_replies;
        for (name, n) in t.outcomes {
            *all.outcomes.entry(name).or_insert(0) += n;
        }
    }
    eprintln!(
        "NAT verdicts compared: {} in {:.1?} ({} replies to SNAT connections mapped back)\n\
         outcomes {:?}",
        all.verdicts,
        started.elapsed(),
        all.snat_replies,
        all.outcomes
    );
    for needed in [
        "snat_out",
        "out",
        "translated_in",
        "hairpin",
        "error_in",
        "error_out",
        "arp_reply",
        "host",
        "routed_inside",
        "time_exceeded",
        "expired_in",
        "no_nat_binding",
        "nat_unsupported",
        "no_neighbor",
        "no_route",
    ] {
        ensure!(
            all.outcomes.contains_key(needed),
            "never reached {needed}: {:?}",
            all.outcomes
        );
    }
    ensure!(
        all.snat_replies > 0,
        "no reply to an SNAT connection mapped back"
    );
    Ok(())
}
