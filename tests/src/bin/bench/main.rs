//! `cargo xtask bench`: the packet path's cost, always beside a reference measured in the
//! same run, reported as ratios.
//!
//! Part one, the port programs under BPF_PROG_TEST_RUN beside the no-op classifier.
//! The datapath is the agent's own: its compiler builds the tables, its kernel layer
//! writes them. Cases:
//! - L2: a unicast IPv4 frame between two ports without security groups' cost (port
//!   security off), and the same with port security and an allow-all stateless policy;
//! - security groups at 10, 1,000 and 100,000 rules: a packet of an established TCP
//!   connection (conntrack hit) and a new connection's SYN (classification + conntrack
//!   insert), each through `port_ingress` of the sender.
//!
//! Established and L2 cases run `--repeat` times per call; a new flow must be new every
//! time, so it runs once per call with a fresh source port, and is compared with the
//! no-op run the same way. Rounds alternate between cases; medians are reported.
//!
//! Part two (`traffic`), security groups on real traffic between namespaces, ours
//! against iptables (as Neutron writes it) and nftables sets: see `traffic`.
//!
//! Part `control-plane`, the agent binary's Sync, single-rule Apply and memory at
//! 10,000 ports: see `control`.

mod control;
mod l3agent;
mod nat;
mod peers;
mod traffic;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use clap::Parser;
use dataplane_abi::{program_names, MARK_FROM_DATAPATH};
use dataplane_agent::{
    config::DEFAULT_CONNTRACK_ENTRIES,
    core::{
        compile::{compile, Compiled, NodeView, SlotLimits, Slots, Uplink},
        model::{Resource, State},
    },
    kernel::datapath::{Datapath, LoadOptions, MapLimits},
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{network, port, router, router_port, rule, security_group, subnet, IntoResource},
    netns::device_lab,
};
use etherparse::PacketBuilder;

#[derive(Parser)]
struct Args {
    /// Runs of the program per measurement (one BPF_PROG_TEST_RUN call).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Calls per new-flow measurement (each a new connection).
    #[arg(long, default_value_t = 20_000)]
    new_flows: u32,
    /// Measurements per case; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Rule counts of the security-group cases.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,100000")]
    rules: Vec<usize>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Which parts to run: `testrun` (BPF_PROG_TEST_RUN), `traffic` (security groups
    /// on real traffic against iptables and nftables), `nat-traffic` (floating IPs on
    /// real traffic against the L3 agent's Linux router), `control-plane` (the agent's
    /// Sync, single-rule Apply and memory at 10,000 ports).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "testrun,traffic,nat-traffic,control-plane"
    )]
    parts: Vec<String>,
    /// Single-rule Applies of the control-plane part.
    #[arg(long, default_value_t = 200)]
    applies: usize,
    /// Floating-IP counts of the NAT test-run cases.
    #[arg(long, value_delimiter = ',', default_value = "1,10000")]
    fips: Vec<usize>,
    /// Floating-IP counts of the NAT real-traffic comparison.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    nat_fips: Vec<usize>,
    /// Systems of the real-traffic comparison.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ours,iptables-legacy,iptables-nft,nftables-sets"
    )]
    systems: Vec<String>,
    /// Rule counts of the real-traffic comparison.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    traffic_rules: Vec<usize>,
    /// Measurements per real-traffic case; the median is reported.
    #[arg(long, default_value_t = 3)]
    traffic_rounds: usize,
    /// UDP flows of the real traffic (source ports in turn).
    #[arg(long, default_value_t = 1024)]
    flows: u32,
    /// Seconds of traffic per real-traffic measurement.
    #[arg(long, default_value_t = 0.4)]
    seconds: f64,
}

const NODE: &str = "bench-node";
const MAC_A: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 0x0b];
const SERVER_PORT: u16 = 5001;

/// Port `a` (10.0.0.1, device bench-a) and `b` (10.0.0.2, bench-b). `a_groups`: a's
/// security groups (none: port security off).
fn state(groups: Vec<pb::SecurityGroup>, a_groups: &[&str], b_groups: &[&str]) -> Result<State> {
    let mut resources = vec![
        network("net").into_resource(),
        subnet("sub", "net", "10.0.0.0/24").into_resource(),
    ];
    resources.extend(groups.into_iter().map(IntoResource::into_resource));
    for (id, mac, ip, groups) in [
        ("a", "fa:16:3e:00:00:0a", "10.0.0.1", a_groups),
        ("b", "fa:16:3e:00:00:0b", "10.0.0.2", b_groups),
    ] {
        let mut p = port(id, "net", mac, &[("sub", ip)], NODE, &format!("bench-{id}"));
        p.security_group_ids = groups.iter().map(|g| (*g).to_owned()).collect();
        p.port_security_enabled = Some(!groups.is_empty());
        resources.push(p.into_resource());
    }
    let resources: Vec<Resource> = resources_from_proto(resources)?;
    Ok(State::replace(&resources)?)
}

/// Port `a` (10.0.1.1 on n1, device bench-a) and `b` (10.0.2.2 on n2, bench-b), no port
/// security, router r between their subnets.
fn routed() -> Result<State> {
    let mut resources = vec![
        network("n1").into_resource(),
        network("n2").into_resource(),
        subnet("s1", "n1", "10.0.1.0/24").into_resource(),
        subnet("s2", "n2", "10.0.2.0/24").into_resource(),
        router_port("r-n1", "n1", "fa:16:3e:00:01:01", &[("s1", "10.0.1.254")]).into_resource(),
        router_port("r-n2", "n2", "fa:16:3e:00:01:02", &[("s2", "10.0.2.254")]).into_resource(),
        router("r", &[("s1", "r-n1"), ("s2", "r-n2")]).into_resource(),
    ];
    for (id, net, sub, mac, ip) in [
        ("a", "n1", "s1", "fa:16:3e:00:00:0a", "10.0.1.1"),
        ("b", "n2", "s2", "fa:16:3e:00:00:0b", "10.0.2.2"),
    ] {
        let mut p = port(id, net, mac, &[(sub, ip)], NODE, &format!("bench-{id}"));
        p.security_group_ids.clear();
        p.port_security_enabled = Some(false);
        resources.push(p.into_resource());
    }
    let resources: Vec<Resource> = resources_from_proto(resources)?;
    Ok(State::replace(&resources)?)
}

/// A 60-byte TCP/IPv4 frame from a (10.0.1.1) to b (10.0.2.2) through the router.
fn routed_frame() -> Result<Vec<u8>> {
    let builder = PacketBuilder::ethernet2(MAC_A, [0xfa, 0x16, 0x3e, 0, 1, 1])
        .ipv4([10, 0, 1, 1], [10, 0, 2, 2], 64)
        .tcp(40000, SERVER_PORT, 1, 65535)
        .ack(2);
    let mut frame = Vec::new();
    builder.write(&mut frame, &[])?;
    frame.resize(frame.len().max(60), 0);
    Ok(frame)
}

/// A stateful group of `count` rules: one lets a reach b's server, the others (single
/// ports towards /32s of another range) never match, and sit on both sides of it.
fn sender_group(count: usize) -> pb::SecurityGroup {
    let mut rules = Vec::with_capacity(count);
    for i in 0..count.saturating_sub(1) {
        rules.push(pb::SecurityGroupRule {
            port_range_min: Some(1 + (i % 60000) as u32),
            port_range_max: Some(1 + (i % 60000) as u32),
            remote_ip_prefix: format!(
                "172.{}.{}.{}/32",
                16 + (i >> 16) % 16,
                (i >> 8) & 255,
                i & 255
            ),
            ..rule(
                &format!("decoy-{i}"),
                pb::Direction::Egress,
                pb::EtherType::Ipv4,
                "tcp",
            )
        });
        if i == count / 2 {
            rules.push(allow_to_server());
        }
    }
    if rules.len() < count {
        rules.push(allow_to_server());
    }
    security_group("sender", true, rules)
}

fn allow_to_server() -> pb::SecurityGroupRule {
    pb::SecurityGroupRule {
        port_range_min: Some(u32::from(SERVER_PORT)),
        port_range_max: Some(u32::from(SERVER_PORT)),
        remote_ip_prefix: "10.0.0.0/24".into(),
        ..rule(
            "to-server",
            pb::Direction::Egress,
            pb::EtherType::Ipv4,
            "tcp",
        )
    }
}

fn receiver_group() -> pb::SecurityGroup {
    security_group(
        "receiver",
        true,
        vec![pb::SecurityGroupRule {
            port_range_min: Some(u32::from(SERVER_PORT)),
            port_range_max: Some(u32::from(SERVER_PORT)),
            ..rule(
                "server-in",
                pb::Direction::Ingress,
                pb::EtherType::Ipv4,
                "tcp",
            )
        }],
    )
}

fn allow_all_stateless() -> pb::SecurityGroup {
    security_group(
        "open",
        false,
        vec![
            rule("open-in", pb::Direction::Ingress, pb::EtherType::Ipv4, ""),
            rule("open-out", pb::Direction::Egress, pb::EtherType::Ipv4, ""),
        ],
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Flags {
    Syn,
    SynAck,
    Ack,
}

/// A 60-byte TCP/IPv4 frame (64 on the wire with the FCS).
fn tcp_frame(from_a: bool, sport: u16, dport: u16, flags: Flags) -> Result<Vec<u8>> {
    let (src_mac, dst_mac, src, dst) = if from_a {
        (MAC_A, MAC_B, [10, 0, 0, 1], [10, 0, 0, 2])
    } else {
        (MAC_B, MAC_A, [10, 0, 0, 2], [10, 0, 0, 1])
    };
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 65535);
    let builder = match flags {
        Flags::Syn => builder.syn(),
        Flags::SynAck => builder.syn().ack(2),
        Flags::Ack => builder.ack(2),
    };
    let mut frame = Vec::new();
    builder.write(&mut frame, &[])?;
    frame.resize(frame.len().max(60), 0);
    Ok(frame)
}

/// A case: its name, its samples, and the no-op samples measured the same way.
type Row = (String, Vec<f64>, Vec<f64>);

fn median(samples: &[f64]) -> (f64, f64, f64) {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1],
    )
}

fn nanos(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e9
}

struct Lab {
    datapath: Datapath,
    a: u32,
    b: u32,
    slot_a: u32,
}

impl Lab {
    /// Programs `state` on `devices`, of which `peers` deliver to their peer.
    fn program(
        &mut self,
        state: &State,
        devices: &BTreeMap<String, u32>,
        peers: &BTreeSet<u32>,
    ) -> Result<()> {
        self.program_with(state, devices, peers, None).map(|_| ())
    }

    /// As [`Lab::program`], with `uplink` as the node's; returns what was compiled.
    fn program_with(
        &mut self,
        state: &State,
        devices: &BTreeMap<String, u32>,
        peers: &BTreeSet<u32>,
        uplink: Option<&Uplink>,
    ) -> Result<Compiled> {
        let compiled = compile(
            state,
            &NodeView {
                node_name: NODE,
                interfaces: devices,
                peer_devices: peers,
                uplink,
            },
            &mut Slots::new(SlotLimits {
                max_ports: 64,
                max_networks: 64,
                max_rules: MapLimits::for_node(64, DEFAULT_CONNTRACK_ENTRIES).max_rules,
            }),
        );
        self.datapath.sync(&compiled)?;
        self.slot_a = compiled
            .ports
            .iter()
            .find(|p| p.port_id == "a")
            .map(|p| p.slot)
            .unwrap_or_default();
        Ok(compiled)
    }

    /// Empties the conntrack tables of every zone.
    fn forget_connections(&mut self) -> Result<()> {
        for zone in 0..64 {
            self.datapath.flush_connections(zone)?;
        }
        Ok(())
    }

    /// Frames port `a` has received, summed over CPUs.
    fn rx_a(&self) -> Result<u64> {
        Ok(self.datapath.port_counters(self.slot_a)?.rx_packets)
    }

    /// ns per run of `program` on `frame`, checking its return code.
    fn time(
        &mut self,
        program: &'static str,
        ifindex: u32,
        mark: u32,
        frame: &[u8],
        repeat: u32,
        expect: i32,
    ) -> Result<f64> {
        let outcome = self
            .datapath
            .test_run(program, ifindex, mark, frame, repeat)?;
        ensure!(
            outcome.return_code == expect,
            "{program}: returned {}, expected {expect}",
            outcome.return_code
        );
        Ok(nanos(outcome.per_run))
    }

    /// Opens a connection a:40000 -> b:5001 as far as a's conntrack is concerned.
    fn establish(&mut self) -> Result<()> {
        let (a, mark) = (self.a, MARK_FROM_DATAPATH | self.slot_a);
        self.time(
            program_names::PORT_INGRESS,
            a,
            0,
            &tcp_frame(true, 40000, SERVER_PORT, Flags::Syn)?,
            1,
            7,
        )?;
        self.time(
            program_names::PORT_EGRESS,
            a,
            mark,
            &tcp_frame(false, SERVER_PORT, 40000, Flags::SynAck)?,
            1,
            0,
        )?;
        self.time(
            program_names::PORT_INGRESS,
            a,
            0,
            &tcp_frame(true, 40000, SERVER_PORT, Flags::Ack)?,
            1,
            7,
        )?;
        Ok(())
    }

    /// Mean ns of `calls` single runs, each a SYN from a new source port.
    fn new_flows(&mut self, calls: u32, round: usize) -> Result<f64> {
        let mut total = 0.0;
        for i in 0..calls {
            let sport = 1024 + ((round as u32 * calls + i) % 60000) as u16;
            let frame = tcp_frame(true, sport, SERVER_PORT, Flags::Syn)?;
            total += self.time(program_names::PORT_INGRESS, self.a, 0, &frame, 1, 7)?;
        }
        Ok(total / f64::from(calls))
    }

    fn noop_single(&mut self, calls: u32) -> Result<f64> {
        let frame = tcp_frame(true, 40000, SERVER_PORT, Flags::Syn)?;
        let mut total = 0.0;
        for _ in 0..calls {
            total += self.time(program_names::NOOP_TC, self.a, 0, &frame, 1, 0)?;
        }
        Ok(total / f64::from(calls))
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let largest = args.rules.iter().copied().max().unwrap_or(10) as u32;
    // Conntrack sized as the agent sizes it by default.
    let mut limits = MapLimits::for_node(64, DEFAULT_CONNTRACK_ENTRIES);
    limits.max_rules = limits.max_rules.max(largest + 16);
    limits.max_remote_prefixes = limits.max_remote_prefixes.max(largest + 16);
    limits.max_rule_entries = limits.max_rule_entries.max(largest * 2 + 64);
    let mut lab = Lab {
        datapath: Datapath::load(limits, &LoadOptions::default())?,
        a: 0,
        b: 0,
        slot_a: 0,
    };
    let mut json = Vec::new();
    if args.parts.iter().any(|p| p == "testrun") {
        let names = ["bench-a", "bench-b", nat::UPLINK].map(str::to_owned);
        let (ns, devices) = device_lab("bench", &names)?;
        (lab.a, lab.b) = (devices["bench-a"], devices["bench-b"]);
        let mut rows = ns.run(|| test_run_cases(&mut lab, &devices, &args))??;
        rows.extend(ns.run(|| {
            nat::test_run_cases(
                &mut lab,
                &devices,
                &args.fips,
                args.rounds,
                args.new_flows,
                args.repeat,
            )
        })??);
        // Off these devices before they go (see `traffic::measure`).
        ns.run(|| lab.program(&State::default(), &devices, &BTreeSet::new()))??;
        report_test_run(&args, &rows, &mut json);
    }
    if args.parts.iter().any(|p| p == "traffic") {
        let systems = args
            .systems
            .iter()
            .map(|name| {
                traffic::System::from_name(name)
                    .with_context(|| format!("no system {name} to compare"))
            })
            .collect::<Result<Vec<_>>>()?;
        let settings = traffic::Settings {
            systems,
            rules: args.traffic_rules.clone(),
            rounds: args.traffic_rounds,
            flows: args.flows,
            duration: Duration::from_secs_f64(args.seconds),
        };
        let ceiling = traffic::source_ceiling(&settings)?;
        let results = traffic::run(&mut lab, &settings, |line| eprintln!("{line}"))?;
        report_traffic(&settings, ceiling, &results, &mut json);
    }
    if args.parts.iter().any(|p| p == "nat-traffic") {
        let duration = Duration::from_secs_f64(args.seconds);
        let results = nat::run(
            &mut lab,
            &args.nat_fips,
            args.traffic_rounds,
            args.flows,
            duration,
            |line| eprintln!("{line}"),
        )?;
        nat::report(&args.nat_fips, args.flows, &results, &mut json);
    }
    if args.parts.iter().any(|p| p == "control-plane") {
        control::run(args.applies, |line| eprintln!("{line}"), &mut json)?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, format!("[{}]\n", json.join(",\n")))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn test_run_cases(lab: &mut Lab, devices: &BTreeMap<String, u32>, args: &Args) -> Result<Vec<Row>> {
    let frame = tcp_frame(true, 40000, SERVER_PORT, Flags::Ack)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut measure =
        |name: String, samples: Vec<f64>, floor: Vec<f64>| rows.push((name, samples, floor));
    let (mut noop, mut l2_open, mut l2_stateless, mut egress) = (vec![], vec![], vec![], vec![]);
    let open = state(vec![], &[], &[])?;
    let stateless = state(vec![allow_all_stateless()], &["open"], &["open"])?;
    for _ in 0..args.rounds {
        lab.program(&open, devices, &BTreeSet::new())?;
        noop.push(lab.time(program_names::NOOP_TC, lab.a, 0, &frame, args.repeat, 0)?);
        l2_open.push(lab.time(
            program_names::PORT_INGRESS,
            lab.a,
            0,
            &frame,
            args.repeat,
            7,
        )?);
        egress.push(lab.time(
            program_names::PORT_EGRESS,
            lab.b,
            MARK_FROM_DATAPATH | lab.slot_a,
            &frame,
            args.repeat,
            0,
        )?);
        lab.program(&stateless, devices, &BTreeSet::new())?;
        l2_stateless.push(lab.time(
            program_names::PORT_INGRESS,
            lab.a,
            0,
            &frame,
            args.repeat,
            7,
        )?);
    }
    measure("noop_tc (floor)".into(), noop.clone(), noop.clone());
    measure(
        "L2: port_ingress, no port security".into(),
        l2_open,
        noop.clone(),
    );
    measure(
        "L2: port_ingress, port security + allow-all stateless SG".into(),
        l2_stateless,
        noop.clone(),
    );
    measure("L2: port_egress, delivery".into(), egress, noop.clone());

    // Routing rewrites the frame (TTL, MACs), and a test run keeps one frame across its
    // repeats: one run per call, against the no-op run the same way.
    let routed_state = routed()?;
    let routed_frame = routed_frame()?;
    let (mut routed_runs, mut floor) = (vec![], vec![]);
    for _ in 0..args.rounds {
        lab.program(&routed_state, devices, &BTreeSet::new())?;
        floor.push(lab.noop_single(args.new_flows)?);
        let mut total = 0.0;
        for _ in 0..args.new_flows {
            total += lab.time(program_names::PORT_INGRESS, lab.a, 0, &routed_frame, 1, 7)?;
        }
        routed_runs.push(total / f64::from(args.new_flows));
    }
    measure(
        "L3: port_ingress, routed between subnets (one run per call)".into(),
        routed_runs,
        floor.clone(),
    );
    measure(
        "L3: noop, one run per call (floor)".into(),
        floor.clone(),
        floor,
    );

    for &count in &args.rules {
        let sg = state(
            vec![sender_group(count), receiver_group()],
            &["sender"],
            &["receiver"],
        )?;
        lab.program(&sg, devices, &BTreeSet::new())?;
        lab.establish()?;
        let (mut established, mut new, mut floor_single, mut floor) =
            (vec![], vec![], vec![], vec![]);
        for round in 0..args.rounds {
            floor.push(lab.time(program_names::NOOP_TC, lab.a, 0, &frame, args.repeat, 0)?);
            established.push(lab.time(
                program_names::PORT_INGRESS,
                lab.a,
                0,
                &frame,
                args.repeat,
                7,
            )?);
            floor_single.push(lab.noop_single(args.new_flows)?);
            new.push(lab.new_flows(args.new_flows, round)?);
        }
        measure(
            format!("SG {count} rules: established TCP (conntrack hit)"),
            established,
            floor,
        );
        measure(
            format!("SG {count} rules: new connection (SYN, one run per call)"),
            new,
            floor_single.clone(),
        );
        measure(
            format!("SG {count} rules: noop, one run per call (floor)"),
            floor_single.clone(),
            floor_single,
        );
    }
    Ok(rows)
}

fn report_test_run(args: &Args, rows: &[Row], json: &mut Vec<String>) {
    println!("Port programs under BPF_PROG_TEST_RUN, 60-byte TCP/IPv4 frames, {} rounds (median, min-max)\n", args.rounds);
    println!(
        "{:<62} {:>9} {:>17} {:>9}",
        "case", "ns/pkt", "spread", "x no-op"
    );
    for (name, samples, floor) in rows {
        let (mid, min, max) = median(samples);
        let (floor_mid, _, _) = median(floor);
        let ratio = mid / floor_mid;
        println!("{name:<62} {mid:>9.1} {min:>8.1}-{max:<8.1} {ratio:>9.2}");
        json.push(format!(
            "{{\"case\":\"{name}\",\"ns_per_packet\":{mid:.2},\"min\":{min:.2},\"max\":{max:.2},\"floor_ns\":{floor_mid:.2},\"ratio_to_noop\":{ratio:.3}}}"
        ));
    }
    let established = |count: usize| {
        rows.iter()
            .find(|(name, _, _)| {
                name == &format!("SG {count} rules: established TCP (conntrack hit)")
            })
            .map(|(_, s, _)| median(s).0)
    };
    let new = |count: usize| {
        rows.iter()
            .find(|(name, _, _)| {
                name == &format!("SG {count} rules: new connection (SYN, one run per call)")
            })
            .map(|(_, s, _)| median(s).0)
    };
    if let (Some(&few), Some(&many)) = (args.rules.first(), args.rules.last()) {
        if let (Some(e_few), Some(e_many), Some(n_few), Some(n_many)) =
            (established(few), established(many), new(few), new(many))
        {
            println!(
                "\ncost growth from {few} to {many} rules: established {:.2}x, new connection {:.2}x",
                e_many / e_few,
                n_many / n_few
            );
        }
    }
}

/// Delivered pps per system, and ours over each peer: the ratio is taken round by round
/// (the same round's measurements, made one after the other) and its median reported.
fn report_traffic(
    settings: &traffic::Settings,
    ceiling: f64,
    results: &traffic::Results,
    json: &mut Vec<String>,
) {
    use traffic::{Mix, System};
    println!(
        "\nSecurity groups on real traffic: UDP/IPv4 60-byte frames over {} flows, XDP live-frames source -> veth -> \
         filter -> veth -> tc sink; delivered packets per second, median of {} rounds",
        settings.flows, settings.rounds
    );
    println!(
        "source ceiling (generator straight into a sink): {:.0} pps\n",
        ceiling
    );
    let peers: Vec<System> = settings
        .systems
        .iter()
        .copied()
        .filter(|s| *s != System::Ours)
        .collect();
    let mut header = format!("{:>7} {:<12} {:>10}", "rules", "traffic", "ours");
    for peer in &peers {
        header += &format!(" {:>16}", peer.name());
    }
    for peer in &peers {
        header += &format!(" {:>22}", format!("ours/{}", peer.name()));
    }
    println!("{header}");
    for mix in [Mix::Unreplied, Mix::Established] {
        for &count in &settings.rules {
            let Some(ours) = results.get(&(count, mix, System::Ours)) else {
                continue;
            };
            let pps = |system| -> Vec<f64> {
                results
                    .get(&(count, mix, system))
                    .map(|rates| rates.iter().map(|r| r.pps).collect())
                    .unwrap_or_default()
            };
            let mut line = format!(
                "{count:>7} {:<12} {:>10.0}",
                mix.name(),
                median(&pps(System::Ours)).0
            );
            for &peer in &peers {
                line += &format!(" {:>16.0}", median(&pps(peer)).0);
            }
            for &peer in &peers {
                let ratios: Vec<f64> = ours.iter().zip(pps(peer)).map(|(o, p)| o.pps / p).collect();
                let (mid, min, max) = median(&ratios);
                line += &format!(" {:>22}", format!("{mid:.2}x ({min:.2}-{max:.2})"));
                json.push(format!(
                    "{{\"case\":\"traffic {count} rules {}: ours / {}\",\"ratio\":{mid:.3},\"min\":{min:.3},\"max\":{max:.3}}}",
                    mix.name(),
                    peer.name()
                ));
            }
            for &system in &settings.systems {
                let rates = &results[&(count, mix, system)];
                let (mid, min, max) = median(&rates.iter().map(|r| r.pps).collect::<Vec<_>>());
                let (delivered, _, _) =
                    median(&rates.iter().map(|r| r.delivered).collect::<Vec<_>>());
                json.push(format!(
                    "{{\"case\":\"traffic {count} rules {}: {}\",\"pps\":{mid:.0},\"min\":{min:.0},\"max\":{max:.0},\"delivered_share\":{delivered:.3}}}",
                    mix.name(),
                    system.name()
                ));
            }
            println!("{line}");
        }
    }
    json.push(format!(
        "{{\"case\":\"traffic source ceiling\",\"pps\":{ceiling:.0}}}"
    ));
}
