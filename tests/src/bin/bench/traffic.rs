//! Security groups on real traffic, against iptables and nftables, in one run.
//!
//! Topology, built anew for every measurement (so no conntrack or bridge state carries
//! over): a node namespace holding the ports' devices `bench-a` and `bench-b`, the
//! other ends `eth0` in VM namespaces A (10.0.0.1) and B (10.0.0.2). The XDP live-frames
//! generator (`dataplane_tests::generator`) sends 60-byte UDP frames out of A's `eth0`
//! to B's port 5001, cycling over `--flows` source ports; the sink on B's `eth0` counts
//! what arrives. Between the two devices, in turn:
//!
//! - ours: `port_ingress`/`port_egress` on the ports' devices, tables from the agent's
//!   own compiler and kernel layer; the devices are veths with the VMs' ends in other
//!   namespaces, so unicast frames go straight into the receiver's end
//!   (`fdb_flags::PEER_DELIVERY`), as the agent programs such ports;
//! - iptables as Neutron's firewall driver writes it, legacy and nft backends, and
//!   nftables with sets: a Linux bridge with `br_netfilter` (see `peers`).
//!
//! The policy: the sender's group has `rules` egress rules, the receiver's `rules`
//! ingress rules; each allows UDP to 5001 from/to 10.0.0.0/24 once, in the middle, and
//! otherwise names single ports towards /32s of another range that never match.
//!
//! Two traffic mixes per measurement: `unreplied` (nothing comes back: Linux conntrack
//! keeps such flows NEW, so every packet walks the rules; ours finds the flow in
//! `CT_NEW`), then `established` (B answers every flow once first).
//!
//! Honesty checks on every measurement: a frame to a port no rule allows (5002) must
//! not be delivered at all, allowed traffic must be, and ours must have counted every
//! delivered frame at the sending port.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, UdpSocket},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use dataplane_agent::{core::model::State, kernel::links};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{rule, security_group},
    generator::{udp_frame, Generator, Receiver, Sink},
    netns::NetNs,
    topology::{Vm, VM_DEV},
};
use ipnet::Ipv4Net;

use crate::{
    peers,
    progress::Progress,
    results::{Better, Context, Part, Record},
    state, Lab, MAC_A, MAC_B, SERVER_PORT,
};

/// A port no rule allows: the sanity check's target.
const DENIED_PORT: u16 = 5002;
const FIRST_SOURCE_PORT: u16 = 10_000;
const BRIDGE: &str = "br-bench";

/// One allow rule, as every system is configured from it.
#[derive(Clone, Debug)]
pub struct BenchRule {
    pub remote: Ipv4Net,
    pub protocol_name: &'static str,
    pub port: u16,
}

/// A port of the benchmark and its groups' rules.
#[derive(Clone, Debug)]
pub struct BenchPort {
    pub id: &'static str,
    pub device: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    pub ingress: Vec<BenchRule>,
    pub egress: Vec<BenchRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum System {
    Ours,
    IptablesLegacy,
    IptablesNft,
    NftablesSets,
}

impl System {
    pub fn from_name(name: &str) -> Option<System> {
        System::ALL.into_iter().find(|s| s.name() == name)
    }

    pub const ALL: [System; 4] = [
        System::Ours,
        System::IptablesLegacy,
        System::IptablesNft,
        System::NftablesSets,
    ];

    pub fn name(self) -> &'static str {
        match self {
            System::Ours => "ours",
            System::IptablesLegacy => "iptables-legacy",
            System::IptablesNft => "iptables-nft",
            System::NftablesSets => "nftables-sets",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mix {
    Unreplied,
    Established,
}

impl Mix {
    pub fn name(self) -> &'static str {
        match self {
            Mix::Unreplied => "unreplied",
            Mix::Established => "established",
        }
    }
}

/// Delivered packets per second of one measurement, the share of sent frames that
/// arrived, and the receive side's CPU cost per delivered packet (see `cpu`).
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub pps: f64,
    pub delivered: f64,
    pub cpu_per_packet: f64,
}

pub struct Settings {
    pub systems: Vec<System>,
    /// The rule sweep, at `flows` flows.
    pub rules: Vec<usize>,
    pub rounds: usize,
    pub flows: u32,
    /// The flow sweep, at `flow_rules` rules (one source address: at most
    /// [`MAX_FLOWS`]).
    pub flow_counts: Vec<u32>,
    pub flow_rules: usize,
    pub duration: Duration,
}

/// Flows of one source address: source ports from `FIRST_SOURCE_PORT` up.
pub const MAX_FLOWS: u32 = 50_000;

impl Settings {
    /// Every (rules, flows) measured: the rule sweep, then the flow sweep.
    fn cases(&self) -> Vec<(usize, u32)> {
        let mut cases: Vec<(usize, u32)> = self.rules.iter().map(|&r| (r, self.flows)).collect();
        for &flows in &self.flow_counts {
            if !cases.contains(&(self.flow_rules, flows)) {
                cases.push((self.flow_rules, flows));
            }
        }
        cases
    }
}

/// Every measurement: (rules, flows, mix, system) to one rate per round.
pub type Results = BTreeMap<(usize, u32, Mix, System), Vec<Rate>>;

fn decoy(i: usize) -> BenchRule {
    BenchRule {
        remote: Ipv4Net::new(
            Ipv4Addr::new(
                172,
                16 + ((i >> 16) % 16) as u8,
                ((i >> 8) & 255) as u8,
                (i & 255) as u8,
            ),
            32,
        )
        .expect("a /32"),
        protocol_name: "udp",
        port: 1 + (i % 60_000) as u16,
    }
}

/// `count` rules, the one that lets the benchmark's traffic through in the middle.
fn rules(count: usize) -> Vec<BenchRule> {
    let allow = BenchRule {
        remote: "10.0.0.0/24".parse().expect("a prefix"),
        protocol_name: "udp",
        port: SERVER_PORT,
    };
    let mut rules: Vec<BenchRule> = (0..count.saturating_sub(1)).map(decoy).collect();
    rules.insert(rules.len() / 2, allow);
    rules
}

pub fn ports(count: usize) -> [BenchPort; 2] {
    [
        BenchPort {
            id: "a",
            device: "bench-a".into(),
            ip: Ipv4Addr::new(10, 0, 0, 1),
            mac: MAC_A,
            ingress: vec![],
            egress: rules(count),
        },
        BenchPort {
            id: "b",
            device: "bench-b".into(),
            ip: Ipv4Addr::new(10, 0, 0, 2),
            mac: MAC_B,
            ingress: rules(count),
            egress: vec![],
        },
    ]
}

fn group(id: &str, direction: pb::Direction, rules: &[BenchRule]) -> pb::SecurityGroup {
    let remote_flag = match direction {
        pb::Direction::Egress => "to",
        _ => "from",
    };
    security_group(
        id,
        true,
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| pb::SecurityGroupRule {
                port_range_min: Some(u32::from(r.port)),
                port_range_max: Some(u32::from(r.port)),
                remote_ip_prefix: r.remote.to_string(),
                ..rule(
                    &format!("{id}-{remote_flag}-{i}"),
                    direction,
                    pb::EtherType::Ipv4,
                    r.protocol_name,
                )
            })
            .collect(),
    )
}

/// Our desired state for `ports`: a stateful group per port from its rules.
fn our_state(ports: &[BenchPort; 2]) -> Result<State> {
    let [a, b] = ports;
    state(
        vec![
            group("sender", pb::Direction::Egress, &a.egress),
            group("receiver", pb::Direction::Ingress, &b.ingress),
        ],
        &["sender"],
        &["receiver"],
    )
}

pub struct Topology {
    pub node: NetNs,
    pub a: Vm,
    pub b: Vm,
    devices: BTreeMap<String, u32>,
    _receiver: Receiver,
}

impl Topology {
    fn build(ports: &[BenchPort; 2]) -> Result<Self> {
        let node = NetNs::new("bench-node")?;
        let [pa, pb] = ports;
        let vm = |p: &BenchPort| {
            Vm::create(
                &node,
                &format!("bench-{}", p.id),
                &p.device,
                p.mac,
                &[Ipv4Net::new(p.ip, 24)?.into()],
            )
        };
        let (a, b) = (vm(pa)?, vm(pb)?);
        for ns in [&node, &a.ns, &b.ns] {
            ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])?;
        }
        // No ARP in the measurement: each VM knows the other's MAC.
        for (vm, peer) in [(&a, pb), (&b, pa)] {
            vm.ns.ip(&[
                "neigh",
                "replace",
                &peer.ip.to_string(),
                "lladdr",
                &peer.mac.map(|b| format!("{b:02x}")).join(":"),
                "dev",
                VM_DEV,
                "nud",
                "permanent",
            ])?;
        }
        // A veth takes XDP frames from its peer only with NAPI on: an XDP program that
        // passes everything turns it on (GRO would too, at a cost per packet).
        // Threaded NAPI moves the receive side, and so the filter under test, off the
        // generator's CPU: on a 2-core machine that is the other core.
        let receiver = Receiver::attach(&node, &pa.device)?;
        node.exec_ok(&[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{}/threaded", pa.device),
        ])?;
        pin_napi_threads(&pa.device, FILTER_CPU)?;
        let mut devices = BTreeMap::new();
        for p in ports {
            devices.insert(p.device.clone(), node.ifindex(&p.device)?);
        }
        Ok(Self {
            node,
            a,
            b,
            devices,
            _receiver: receiver,
        })
    }

    /// The ports' devices on a `br_netfilter` bridge, and `rules` loaded with `loader`.
    fn bridge(&self, ports: &[BenchPort; 2], loader: &[&str], rules: &str) -> Result<()> {
        let n = &self.node;
        n.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        n.ip(&["link", "set", BRIDGE, "up"])?;
        for p in ports {
            n.ip(&["link", "set", &p.device, "master", BRIDGE])?;
        }
        n.exec_ok(&["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1"])?;
        let path = std::env::temp_dir().join(format!(
            "dataplane-bench-{}-{}.rules",
            std::process::id(),
            n.name()
        ));
        std::fs::write(&path, rules)?;
        let path_text = path.display().to_string();
        let mut argv = loader.to_vec();
        argv.push(&path_text);
        let loaded = n.exec_ok(&argv);
        let _ = std::fs::remove_file(&path);
        loaded.with_context(|| format!("loading rules with {loader:?}"))?;
        Ok(())
    }
}

/// The generator runs on one CPU, the receive side (the filter under test) on another.
pub const GENERATOR_CPU: usize = 0;
pub const FILTER_CPU: usize = 1;

/// Pins thread (or process) `pid` (0: the calling thread) to `cpu`.
pub fn pin(pid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it, and
    // sched_setaffinity reads it with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("pinning {pid} to CPU {cpu}"));
        }
    }
    Ok(())
}

/// Pins the threaded-NAPI kernel threads of `device` (`napi/<device>-<id>`) to `cpu`.
/// Only one benchmark topology exists at a time, so the name is unambiguous.
pub fn pin_napi_threads(device: &str, cpu: usize) -> Result<()> {
    let prefix = format!("napi/{device}-");
    let mut pinned = 0;
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<libc::pid_t>() else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(&prefix) {
            pin(pid, cpu)?;
            pinned += 1;
        }
    }
    ensure!(pinned > 0, "no NAPI thread of {device} to pin");
    Ok(())
}

/// Sends for half of `duration` to warm up (queues, caches, the scheduler's placement),
/// then for `duration`, from `sender`'s namespace, and returns what arrived at the sink
/// in the second part.
pub fn rate(
    sender: &NetNs,
    generator: &mut Generator,
    sink: &Sink,
    frame: &[u8],
    duration: Duration,
) -> Result<Rate> {
    rate_each(
        sender,
        generator,
        sink,
        std::slice::from_ref(&frame.to_vec()),
        duration,
    )
}

/// As [`rate`], over `templates` in turn (see `Generator::send_for_each`).
pub fn rate_each(
    sender: &NetNs,
    generator: &mut Generator,
    sink: &Sink,
    templates: &[Vec<u8>],
    duration: Duration,
) -> Result<Rate> {
    let meter = crate::cpu::meter();
    let (mut before, mut cpu_before) = (0, 0.0);
    let sent = sender.run(|| -> Result<_> {
        pin(0, GENERATOR_CPU)?;
        generator.send_for_each(templates, duration / 2)?;
        (before, _) = sink.count()?;
        cpu_before = meter.read()?;
        generator.send_for_each(templates, duration)
    })??;
    // Frames still in the receiving queues.
    std::thread::sleep(Duration::from_millis(30));
    let (after, _) = sink.count()?;
    let cpu = meter.read()? - cpu_before;
    let delivered = (after - before) as f64;
    Ok(Rate {
        pps: delivered / sent.elapsed.as_secs_f64(),
        delivered: delivered / sent.packets as f64,
        cpu_per_packet: cpu / delivered.max(1.0),
    })
}

/// One answer from B to every flow, so each is established everywhere.
fn answer_every_flow(topo: &Topology, ports: &[BenchPort; 2], flows: u32) -> Result<()> {
    let [a, b] = ports;
    let (a_ip, b_ip) = (a.ip, b.ip);
    topo.b.ns.run(move || -> Result<()> {
        let socket = UdpSocket::bind((b_ip, SERVER_PORT))?;
        for i in 0..flows {
            socket.send_to(&[0u8; 18], (a_ip, FIRST_SOURCE_PORT + i as u16))?;
        }
        Ok(())
    })??;
    std::thread::sleep(Duration::from_millis(50));
    Ok(())
}

/// A topology of its own for `ports`, with `system` enforcing their policy.
pub fn configure(system: System, ports: &[BenchPort; 2], lab: &mut Lab) -> Result<Topology> {
    let topo = Topology::build(ports)?;
    match system {
        System::Ours => {
            // Like the peers' fresh namespaces: no connection of an earlier
            // measurement (same zones, same flows) is still tracked.
            lab.forget_connections()?;
            let state = our_state(ports)?;
            let devices = topo.devices.clone();
            topo.node.run(|| -> Result<()> {
                // As the agent does: veths whose other end is in another namespace
                // deliver to it directly.
                let peers = links::peer_devices()?;
                ensure!(
                    devices.values().all(|ifindex| peers.contains(ifindex)),
                    "ports without peer delivery"
                );
                lab.program(&state, &devices, &peers)
            })??;
        }
        System::IptablesLegacy | System::IptablesNft => {
            let loader = if system == System::IptablesLegacy {
                "iptables-legacy-restore"
            } else {
                "iptables-nft-restore"
            };
            topo.bridge(ports, &[loader], &peers::iptables_neutron(BRIDGE, ports))?;
        }
        System::NftablesSets => topo.bridge(ports, &["nft", "-f"], &peers::nftables_sets(ports))?,
    }
    Ok(topo)
}

/// Takes ours off `topo`'s devices before they go: a new device may get the same
/// ifindex.
pub fn release(system: System, topo: &Topology, lab: &mut Lab) -> Result<()> {
    if system == System::Ours {
        let devices = topo.devices.clone();
        topo.node
            .run(|| lab.program(&State::default(), &devices, &BTreeSet::new()))??;
    }
    Ok(())
}

/// Both mixes through `system` with `ports`' policy, on a topology of their own.
fn measure(
    system: System,
    ports: &[BenchPort; 2],
    lab: &mut Lab,
    flows: u32,
    duration: Duration,
) -> Result<[Rate; 2]> {
    let topo = configure(system, ports, lab)?;
    let result = measure_on(system, &topo, ports, lab, flows, duration);
    release(system, &topo, lab)?;
    result
}

fn measure_on(
    system: System,
    topo: &Topology,
    ports: &[BenchPort; 2],
    lab: &mut Lab,
    flows: u32,
    duration: Duration,
) -> Result<[Rate; 2]> {
    let [a, b] = ports;
    let sink = Sink::attach(&topo.b.ns, VM_DEV)?;
    let a_dev = topo.a.ns.ifindex(VM_DEV)?;
    let frame_to = |port| udp_frame(a.mac, b.mac, IpAddr::V4(a.ip), IpAddr::V4(b.ip), port, 60);
    let name = system.name();

    let mut denied = Generator::new(a_dev, 1, FIRST_SOURCE_PORT)?;
    topo.a
        .ns
        .run(|| denied.send(&frame_to(DENIED_PORT), 10_000))??;
    std::thread::sleep(Duration::from_millis(30));
    let (leaked, _) = sink.count()?;
    ensure!(
        leaked == 0,
        "{name}: {leaked} frames to a denied port were delivered"
    );

    let frame = frame_to(SERVER_PORT);
    let mut generator = Generator::new(a_dev, flows, FIRST_SOURCE_PORT)?;
    let rx_before = lab.rx_a()?;
    let unreplied = rate(&topo.a.ns, &mut generator, &sink, &frame, duration)?;
    answer_every_flow(topo, ports, flows)?;
    let established = rate(&topo.a.ns, &mut generator, &sink, &frame, duration)?;
    for r in [unreplied, established] {
        ensure!(
            r.delivered > 0.0,
            "{name}: allowed traffic was not delivered"
        );
    }
    if system == System::Ours {
        let (delivered, _) = sink.count()?;
        let counted = lab.rx_a()? - rx_before;
        ensure!(
            counted >= delivered,
            "ours: the sending port counted {counted} frames, the sink {delivered}"
        );
    }
    Ok([unreplied, established])
}

/// Every (rules, flows, mix, system), `rounds` times, interleaved: round by round,
/// each case, each system in turn, so drift over the run touches all alike.
pub fn run(lab: &mut Lab, settings: &Settings, progress: &Progress) -> Result<Results> {
    let cases = settings.cases();
    ensure!(
        cases
            .iter()
            .all(|(_, flows)| (1..=MAX_FLOWS).contains(flows)),
        "security groups: flows must be 1 to {MAX_FLOWS} (one source address)"
    );
    let mut results = Results::new();
    for round in 0..settings.rounds {
        for &(count, flows) in &cases {
            let ports = ports(count);
            for &system in &settings.systems {
                progress.step(&format!(
                    "security groups: round {}/{}, {count} rules, {flows} flows, {}",
                    round + 1,
                    settings.rounds,
                    system.name()
                ));
                let [unreplied, established] =
                    measure(system, &ports, lab, flows, settings.duration)?;
                for (mix, r) in [(Mix::Unreplied, unreplied), (Mix::Established, established)] {
                    results
                        .entry((count, flows, mix, system))
                        .or_default()
                        .push(r);
                }
            }
        }
    }
    Ok(results)
}

const SCENARIO: &str = "Security groups on real traffic";

/// Checks every figure of the traffic parts passed.
pub const CHECKS: [&str; 3] = [
    "frames to a port no rule allows (5002) are not delivered at all",
    "allowed traffic is delivered",
    "ours: the sending port counted at least every frame the sink received",
];

/// The records of one (case, system): delivered pps, drop ratio, CPU per packet.
#[allow(clippy::too_many_arguments)]
pub fn add_rates(
    out: &mut crate::results::Results,
    part: &str,
    scenario: &str,
    case: &str,
    system: &str,
    rates: &[Rate],
    checks: &[&str],
    shape: impl Fn(Record) -> Record,
) {
    let (cpu_metric, cpu_unit) = crate::cpu::meter().method().metric();
    for (metric, unit, better, values) in [
        (
            "delivered packets per second",
            "pps",
            Better::Higher,
            rates.iter().map(|r| r.pps).collect::<Vec<_>>(),
        ),
        (
            "drop ratio at the generator's offered load",
            "share",
            Better::Lower,
            rates.iter().map(|r| 1.0 - r.delivered).collect(),
        ),
        (
            cpu_metric,
            cpu_unit,
            Better::Lower,
            rates.iter().map(|r| r.cpu_per_packet).collect(),
        ),
    ] {
        out.add(shape(
            Record::new(part, scenario, case, system, metric, unit, better, values).checks(checks),
        ));
    }
}

/// The part: every (rules, mix, system) on real traffic.
pub struct SecurityGroups {
    pub settings: Settings,
}

impl Part for SecurityGroups {
    fn name(&self) -> &'static str {
        "traffic"
    }

    fn steps(&self) -> u64 {
        (self.settings.rounds * self.settings.cases().len() * self.settings.systems.len()) as u64
    }

    fn run(&mut self, ctx: &mut Context<'_>) -> Result<()> {
        let results = run(ctx.lab, &self.settings, ctx.progress)?;
        let settings = &self.settings;
        let by_rules = format!(
            "{SCENARIO}: rule count, UDP/IPv4 60-byte frames over {} flows",
            settings.flows
        );
        let by_flows = format!(
            "{SCENARIO}: flow count, {} rules, UDP/IPv4 60-byte frames",
            settings.flow_rules
        );
        for ((count, flows, mix, system), rates) in &results {
            if *flows == settings.flows && settings.rules.contains(count) {
                add_rates(
                    ctx.results,
                    self.name(),
                    &by_rules,
                    &format!("{count} rules"),
                    system.name(),
                    rates,
                    &CHECKS,
                    |r| r.sweep("rules", *count as f64).variant(mix.name()),
                );
            }
            if *count == settings.flow_rules && settings.flow_counts.contains(flows) {
                add_rates(
                    ctx.results,
                    self.name(),
                    &by_flows,
                    &format!("{flows} flows"),
                    system.name(),
                    rates,
                    &CHECKS,
                    |r| r.sweep("flows", f64::from(*flows)).variant(mix.name()),
                );
            }
        }
        Ok(())
    }
}
