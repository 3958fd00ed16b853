//! NAT: routed, SNAT and floating-IP paths, with 1 and 10,000 floating IPs, beside the
//! no-op programs; and on real traffic, ours against the Linux router with the iptables
//! rules Neutron's L3 agent writes (see `l3agent`), both backends.
//!
//! The state (the agent's compiler and kernel layer program ours): port `a` (10.0.0.5,
//! and one more fixed IP per further floating IP) and port `b` (10.0.0.6) on n1 behind
//! router r (10.0.0.1), whose gateway is 100.64.0.10 on the external 100.64.0.0/16
//! (its gateway, the outside, 100.64.0.1), SNAT on. The measured floating IP is
//! 100.64.1.1 → 10.0.0.5; the others map a's other fixed IPs, so every NAT table
//! holds them all.
//!
//! Real traffic: the XDP live-frames generator in the outside namespace sends 60-byte
//! UDP frames to the measured floating IP, cycling over `flows` source ports; they
//! arrive on the node's uplink `qg`, are translated and delivered to the VM's `eth0`,
//! where the sink counts them. Each measurement on a topology built anew. Sanity
//! checks: a frame to an address no floating IP has is never delivered, translated
//! traffic is, and ours counted on the uplink at least what the sink saw.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::{ensure, Result};
use dataplane_abi::program_names;
use dataplane_agent::{
    core::{
        compile::Uplink,
        model::{MacAddr, Resource, State},
    },
    kernel::links,
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{
        external_network, floating_ip, gateway_port, network, port, router, router_port, subnet,
        with_gateway, IntoResource,
    },
    generator::{udp_frame, Generator, Receiver, Sink},
    netns::NetNs,
    topology::{Vm, VM_DEV},
};
use ipnet::Ipv4Net;

use crate::{
    l3agent::{self, FloatingIp},
    progress::Progress,
    results::{Context, Part},
    traffic::{add_rates, pin_napi_threads, rate, Rate, FILTER_CPU},
    Lab, Row, NODE, SERVER_PORT,
};

pub const UPLINK: &str = "bench-up";
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
const OUTSIDE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 10);
const GATEWAY_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0x0e, 0x01];
const ROUTER_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 1, 1];
const MEASURED_FIP: Ipv4Addr = Ipv4Addr::new(100, 64, 1, 1);
const VM_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);
const VM_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 0x0a];
const B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 6);
const B_MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 0x0b];
const FIRST_SOURCE_PORT: u16 = 10_000;

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The floating IPs: the measured one first, then decoys on a's other fixed IPs.
fn floating_ips(count: usize) -> Vec<FloatingIp> {
    (0..count)
        .map(|i| {
            if i == 0 {
                return FloatingIp {
                    floating: MEASURED_FIP,
                    fixed: VM_IP,
                };
            }
            let n = i as u32;
            FloatingIp {
                floating: Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 2, 0)) + n),
                fixed: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 1, 0)) + n),
            }
        })
        .collect()
}

/// The state above with `fips` floating IPs; `a` on `a_device`, `b` on `b_device`.
fn state(fips: &[FloatingIp], a_device: &str, b_device: &str) -> Result<State> {
    let mut resources = vec![
        network("n1").into_resource(),
        subnet("s1", "n1", "10.0.0.0/16").into_resource(),
        external_network("ext").into_resource(),
        pb::Subnet {
            gateway_ip: OUTSIDE.to_string(),
            ..subnet("ext-v4", "ext", "100.64.0.0/16")
        }
        .into_resource(),
        router_port("r-n1", "n1", &mac_text(ROUTER_MAC), &[("s1", "10.0.0.1")]).into_resource(),
        gateway_port(
            "r-gw",
            "r",
            "ext",
            &mac_text(GATEWAY_MAC),
            &[("ext-v4", &GATEWAY.to_string())],
        )
        .into_resource(),
        with_gateway(
            router("r", &[("s1", "r-n1")]),
            "ext",
            "ext-v4",
            &GATEWAY.to_string(),
            true,
        )
        .into_resource(),
    ];
    let fixed: Vec<String> = fips.iter().map(|f| f.fixed.to_string()).collect();
    let mut a_ips: Vec<(&str, &str)> = fixed.iter().map(|f| ("s1", f.as_str())).collect();
    if a_ips.is_empty() {
        a_ips.push(("s1", "10.0.0.5"));
    }
    for (id, mac, ips, device) in [
        ("a", VM_MAC, a_ips, a_device),
        ("b", B_MAC, vec![("s1", "10.0.0.6")], b_device),
    ] {
        let mut p = port(id, "n1", &mac_text(mac), &ips, NODE, device);
        p.security_group_ids.clear();
        p.port_security_enabled = Some(false);
        resources.push(p.into_resource());
    }
    for (i, fip) in fips.iter().enumerate() {
        let mut f = floating_ip(&format!("fip-{i}"), "ext", &fip.floating.to_string(), "a");
        f.fixed_ip_address = fip.fixed.to_string();
        resources.push(f.into_resource());
    }
    let resources: Vec<Resource> = resources_from_proto(resources)?;
    Ok(State::replace(resources)?)
}

impl Lab {
    /// Programs `state` with `uplink` as the node's uplink (the outside's MAC known).
    fn program_nat(
        &mut self,
        state: &State,
        devices: &BTreeMap<String, u32>,
        peers: &BTreeSet<u32>,
        uplink: u32,
    ) -> Result<()> {
        let uplink = Uplink {
            ifindex: uplink,
            snat_port_min: 1024,
            snat_port_count: 64512,
            gateway_macs: BTreeMap::from([(OUTSIDE.into(), MacAddr(OUTSIDE_MAC))]),
        };
        let compiled = self.program_with(state, devices, peers, Some(&uplink))?;
        let measured = compiled.statuses.iter().find(|(r, _)| r.id == "fip-0");
        if let Some((_, status)) = measured {
            ensure!(
                status.reason.is_empty(),
                "the measured floating IP is not programmed: {}",
                status.reason
            );
        }
        Ok(())
    }
}

/// A 60-byte UDP frame (64 on the wire).
fn frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
) -> Result<Vec<u8>> {
    let builder = etherparse::PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, SERVER_PORT);
    let mut frame = Vec::new();
    builder.write(&mut frame, &[0u8; 18])?;
    Ok(frame)
}

const NAT_FIPS: &str = "NAT against floating-IP count, one program run (BPF_PROG_TEST_RUN)";

/// The test-run cases of NAT, for each floating-IP count in `counts`.
pub fn test_run_cases(
    lab: &mut Lab,
    devices: &BTreeMap<String, u32>,
    counts: &[usize],
    rounds: usize,
    calls: u32,
    repeat: u32,
) -> Result<Vec<Row>> {
    let uplink = devices[UPLINK];
    let (a, b) = (devices["bench-a"], devices["bench-b"]);
    let inbound = frame(OUTSIDE_MAC, GATEWAY_MAC, OUTSIDE, MEASURED_FIP, 40000)?;
    let fip_out = frame(VM_MAC, ROUTER_MAC, VM_IP, OUTSIDE, 40000)?;
    let snat_out = frame(B_MAC, ROUTER_MAC, B_IP, OUTSIDE, 40000)?;
    let mut rows = Vec::new();
    for &count in counts {
        let state = state(&floating_ips(count), "bench-a", "bench-b")?;
        lab.program_nat(&state, devices, &BTreeSet::new(), uplink)?;
        // The SNAT binding the measured packets then use.
        lab.time(program_names::PORT_INGRESS, b, 0, &snat_out, 1, 7)?;
        let (mut floor, mut xdp_floor) = (vec![], vec![]);
        let (mut fip_in, mut fip_outbound, mut snat, mut xdp) = (vec![], vec![], vec![], vec![]);
        let single = |lab: &mut Lab, program, ifindex, frame: &[u8], expect| -> Result<f64> {
            let mut total = 0.0;
            for _ in 0..calls {
                total += lab.time(program, ifindex, 0, frame, 1, expect)?;
            }
            Ok(total / f64::from(calls))
        };
        for _ in 0..rounds {
            floor.push(lab.noop_single(calls)?);
            fip_in.push(single(
                lab,
                program_names::UPLINK_INGRESS,
                uplink,
                &inbound,
                7,
            )?);
            fip_outbound.push(single(lab, program_names::PORT_INGRESS, a, &fip_out, 7)?);
            snat.push(single(lab, program_names::PORT_INGRESS, b, &snat_out, 7)?);
            // XDP passes the frame unchanged: many runs per call, as its no-op.
            xdp_floor.push(lab.time(program_names::NOOP_XDP, uplink, 0, &inbound, repeat, 2)?);
            xdp.push(lab.time(program_names::UPLINK_XDP, uplink, 0, &inbound, repeat, 2)?);
        }
        let fips = if count == 1 {
            "1 floating IP".to_owned()
        } else {
            format!("{count} floating IPs")
        };
        for (variant, samples, floor, floor_only) in [
            (
                "floating IP in, uplink_ingress (one run per call)",
                fip_in,
                floor.clone(),
                false,
            ),
            (
                "floating IP out, port_ingress (one run per call)",
                fip_outbound,
                floor.clone(),
                false,
            ),
            (
                "SNAT out, bound, port_ingress (one run per call)",
                snat,
                floor.clone(),
                false,
            ),
            ("noop_tc, one run per call", floor.clone(), floor, true),
            ("uplink_xdp, floating IP", xdp, xdp_floor.clone(), false),
            ("noop_xdp", xdp_floor.clone(), xdp_floor, true),
        ] {
            rows.push(Row {
                scenario: NAT_FIPS,
                case: fips.clone(),
                variant: Some(variant.into()),
                sweep: Some(("floating IPs", count as f64)),
                floor_only,
                samples,
                floor,
            });
        }
    }
    Ok(rows)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NatSystem {
    Ours,
    L3AgentNft,
    L3AgentLegacy,
}

impl NatSystem {
    pub const ALL: [NatSystem; 3] = [
        NatSystem::Ours,
        NatSystem::L3AgentNft,
        NatSystem::L3AgentLegacy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NatSystem::Ours => "ours",
            NatSystem::L3AgentNft => "l3-agent-iptables-nft",
            NatSystem::L3AgentLegacy => "l3-agent-iptables-legacy",
        }
    }
}

/// Delivered rates by (floating IPs, system), one per round.
pub type NatResults = BTreeMap<(usize, NatSystem), Vec<Rate>>;

struct Topology {
    outside: NetNs,
    node: NetNs,
    vm: Vm,
    qg: u32,
    _receiver: Option<Receiver>,
}

impl Topology {
    fn build(system: NatSystem) -> Result<Self> {
        let node = NetNs::new("bench-nat-node")?;
        let outside = NetNs::new("bench-nat-out")?;
        node.add_veth("qg", Some(&outside), "ext0")?;
        node.set_mac("qg", GATEWAY_MAC)?;
        outside.set_mac("ext0", OUTSIDE_MAC)?;
        let vm = Vm::create(
            &node,
            "bench-nat-vm",
            "qr",
            VM_MAC,
            &[Ipv4Net::new(VM_IP, 16)?.into()],
        )?;
        for ns in [&node, &outside, &vm.ns] {
            ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])?;
        }
        node.set_up("qg", true)?;
        outside.set_up("ext0", true)?;
        outside.ip(&["addr", "add", "100.64.0.1/16", "dev", "ext0"])?;
        // Ours runs its own XDP program on the uplink (which turns on the veth's NAPI);
        // the Linux router gets the pass-everything one.
        let receiver = match system {
            NatSystem::Ours => None,
            _ => Some(Receiver::attach(&node, "qg")?),
        };
        let qg = node.ifindex("qg")?;
        Ok(Self {
            outside,
            node,
            vm,
            qg,
            _receiver: receiver,
        })
    }

    /// Threaded NAPI for the uplink, on the filter's CPU.
    fn pin_receive(&self) -> Result<()> {
        self.node
            .exec_ok(&["sh", "-c", "echo 1 > /sys/class/net/qg/threaded"])?;
        pin_napi_threads("qg", FILTER_CPU)
    }
}

fn measure(
    system: NatSystem,
    count: usize,
    lab: &mut Lab,
    flows: u32,
    duration: Duration,
) -> Result<Rate> {
    let topo = Topology::build(system)?;
    let fips = floating_ips(count);
    match system {
        NatSystem::Ours => {
            let state = state(&fips, "qr", "unused-b")?;
            let qr = topo.node.ifindex("qr")?;
            let devices = BTreeMap::from([("qr".to_owned(), qr)]);
            let qg = topo.qg;
            topo.node.run(|| -> Result<()> {
                let peers = links::peer_devices()?;
                lab.program_nat(&state, &devices, &peers, qg)?;
                lab.datapath.attach_uplink("qg", qg, false)?;
                Ok(())
            })??;
        }
        NatSystem::L3AgentNft | NatSystem::L3AgentLegacy => {
            let loader = if system == NatSystem::L3AgentNft {
                "iptables-nft-restore"
            } else {
                "iptables-legacy-restore"
            };
            l3agent::configure_router(
                &topo.node,
                "qg",
                "qr",
                Ipv4Net::new(GATEWAY, 16)?,
                Ipv4Net::new(Ipv4Addr::new(10, 0, 0, 1), 16)?,
                &fips,
                &[loader],
            )?;
            // The sink drops ARP too: the router knows the VM's MAC.
            topo.node.ip(&[
                "neigh",
                "replace",
                "10.0.0.5",
                "lladdr",
                &mac_text(VM_MAC),
                "dev",
                "qr",
                "nud",
                "permanent",
            ])?;
        }
    }
    topo.pin_receive()?;
    let result = measure_on(system, &topo, lab, flows, duration);
    if system == NatSystem::Ours {
        // Off these devices before they go: a new device may get the same ifindex.
        topo.node.run(|| -> Result<()> {
            lab.datapath.detach_uplink();
            lab.program(&State::default(), &BTreeMap::new(), &BTreeSet::new())
        })??;
    }
    result
}

fn measure_on(
    system: NatSystem,
    topo: &Topology,
    lab: &mut Lab,
    flows: u32,
    duration: Duration,
) -> Result<Rate> {
    let name = system.name();
    let sink = Sink::attach(&topo.vm.ns, VM_DEV)?;
    let ext0 = topo.outside.ifindex("ext0")?;
    let to = |dst| {
        udp_frame(
            OUTSIDE_MAC,
            GATEWAY_MAC,
            IpAddr::V4(OUTSIDE),
            IpAddr::V4(dst),
            SERVER_PORT,
            60,
        )
    };
    let mut stray = Generator::new(ext0, 1, FIRST_SOURCE_PORT)?;
    topo.outside
        .run(|| stray.send(&to(Ipv4Addr::new(100, 64, 250, 250)), 10_000))??;
    std::thread::sleep(Duration::from_millis(30));
    let (leaked, _) = sink.count()?;
    ensure!(
        leaked == 0,
        "{name}: {leaked} frames to no floating IP reached the VM"
    );
    let uplink_before = lab.datapath.uplink_counters()?.rx_packets;
    let mut generator = Generator::new(ext0, flows, FIRST_SOURCE_PORT)?;
    let r = rate(
        &topo.outside,
        &mut generator,
        &sink,
        &to(MEASURED_FIP),
        duration,
    )?;
    ensure!(
        r.delivered > 0.0,
        "{name}: translated traffic was not delivered"
    );
    if system == NatSystem::Ours {
        let (delivered, _) = sink.count()?;
        let counted = lab.datapath.uplink_counters()?.rx_packets - uplink_before;
        ensure!(
            counted >= delivered,
            "ours: the uplink counted {counted} frames, the sink {delivered}"
        );
    }
    Ok(r)
}

/// Every (floating IPs, system), `rounds` times, interleaved as in `traffic::run`.
pub fn run(
    lab: &mut Lab,
    counts: &[usize],
    rounds: usize,
    flows: u32,
    duration: Duration,
    progress: &Progress,
) -> Result<NatResults> {
    let mut results = NatResults::new();
    for round in 0..rounds {
        for &count in counts {
            for system in NatSystem::ALL {
                progress.step(&format!(
                    "NAT: round {}/{rounds}, {count} floating IPs, {}",
                    round + 1,
                    system.name()
                ));
                let r = measure(system, count, lab, flows, duration)?;
                results.entry((count, system)).or_default().push(r);
            }
        }
    }
    Ok(results)
}

/// The part: floating IPs on real traffic, ours against the L3 agent's router.
pub struct FloatingIps {
    pub counts: Vec<usize>,
    pub rounds: usize,
    pub flows: u32,
    pub duration: Duration,
}

impl Part for FloatingIps {
    fn name(&self) -> &'static str {
        "nat-traffic"
    }

    fn steps(&self) -> u64 {
        (self.rounds * self.counts.len() * NatSystem::ALL.len()) as u64
    }

    fn run(&mut self, ctx: &mut Context<'_>) -> Result<()> {
        let results = run(
            ctx.lab,
            &self.counts,
            self.rounds,
            self.flows,
            self.duration,
            ctx.progress,
        )?;
        let scenario = format!(
            "Floating IPs on real traffic (DNAT + routing): UDP/IPv4 60-byte frames over {} flows",
            self.flows
        );
        for ((count, system), rates) in &results {
            add_rates(
                ctx.results,
                self.name(),
                &scenario,
                &format!("{count} floating IPs"),
                system.name(),
                rates,
                &[
                    "frames to an address no floating IP has never reach the VM",
                    "translated traffic is delivered",
                    "ours: the uplink counted at least every frame the sink received",
                ],
                |r| r.sweep("floating IPs", *count as f64),
            );
        }
        Ok(())
    }
}
