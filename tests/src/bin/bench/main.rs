//! `cargo xtask bench`: the packet path measured beside the alternatives a user would
//! otherwise choose, on the same topology and traffic in the same run, written up as a
//! report (see `report`): `results.json`, `report.html`, `summary.md`.
//!
//! Parts (`--parts`), each a [`results::Part`] adding records to one [`Results`]:
//! - `testrun`: the port programs under BPF_PROG_TEST_RUN beside the no-op classifier
//!   (L2, L3, security groups against rule count, NAT against floating-IP count). The
//!   datapath is the agent's own: its compiler builds the tables, its kernel layer
//!   writes them. Established and L2 cases run `--repeat` times per call; a new flow
//!   must be new every time, so it runs once per call with a fresh source port, and is
//!   compared with the no-op run the same way;
//! - `l2`: L2 switching on real traffic, ours against a Linux bridge and the path's
//!   floor, over packet sizes, IPv4/IPv6 and flow counts (`l2`);
//! - `traffic`: security groups on real traffic, ours against iptables as Neutron
//!   writes it and nftables sets (`traffic`, `peers`);
//! - `nat-traffic`: floating IPs on real traffic, ours against the L3 agent's Linux
//!   router (`nat`, `l3agent`);
//! - `latency`: TCP round trips and new-flow latency against the same peers
//!   (`latency`).
//!
//! Rounds interleave the systems compared, so drift touches all alike; medians and
//! spreads are reported, ratios taken round by round. A measurement whose sanity check
//! fails (nothing delivered, a denied frame delivered, counters short of the sink)
//! stops the run rather than being reported.

mod control;
mod cpu;
mod l2;
mod l3agent;
mod latency;
mod nat;
mod peers;
mod progress;
mod report;
mod results;
mod traffic;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
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
    generator::{self, udp_frame, Receiver},
    netns::{device_lab, NetNs},
};
use etherparse::PacketBuilder;
use results::{Better, Context, Environment, Mode, Part, Record, Results};

/// Every figure's setting; unset ones take the mode's default (quick, full).
#[derive(Parser)]
struct Args {
    /// The quick mode (under 3 minutes): fewer rounds, shorter measurements, smaller
    /// sweeps. Without it, the full mode (under 30 minutes).
    #[arg(long)]
    quick: bool,
    /// Directory of the report (results.json, report.html, summary.md); default
    /// target/bench/<UTC timestamp>/.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write results.json here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure nothing: write the report of an earlier run's results.json (to `--out`,
    /// default next to it), e.g. after merging records of several runs.
    #[arg(long)]
    render: Option<PathBuf>,
    /// Which parts to run: `testrun` (BPF_PROG_TEST_RUN against no-op), `l2` (L2
    /// switching on real traffic against a Linux bridge), `traffic` (security groups
    /// on real traffic against iptables and nftables), `nat-traffic` (floating IPs on
    /// real traffic against the L3 agent's Linux router), `latency` (TCP round trips
    /// and new-flow latency against the same peers), `control-plane` (the agent's Sync,
    /// single-rule Apply and memory at 10,000 ports). Default: all of them, and all but
    /// `control-plane` in the quick mode (its setup alone, 20,000 tcx links made and
    /// removed, takes minutes).
    #[arg(long, value_delimiter = ',')]
    parts: Option<Vec<String>>,
    /// The traffic source: `auto` (live frames if they work here, else the socket
    /// fallback), `live-frames`, `af-packet`.
    #[arg(long, default_value = "auto")]
    generator: String,
    /// A note recorded with the run (repeatable), e.g. what else ran on the machine.
    #[arg(long)]
    note: Vec<String>,
    /// Runs of the program per measurement (one BPF_PROG_TEST_RUN call).
    #[arg(long)]
    repeat: Option<u32>,
    /// Calls per new-flow measurement (each a new connection).
    #[arg(long)]
    new_flows: Option<u32>,
    /// Measurements per test-run case; the median is reported.
    #[arg(long)]
    rounds: Option<usize>,
    /// Rule counts of the security-group test-run cases.
    #[arg(long, value_delimiter = ',')]
    rules: Option<Vec<usize>>,
    /// Single-rule Applies of the control-plane part.
    #[arg(long)]
    applies: Option<usize>,
    /// Ports of the control-plane part bound to this node, each with a device (400 to
    /// 10,000; fewer make its first Sync, which attaches every device, quicker).
    #[arg(long, default_value_t = 10_000)]
    control_local_ports: usize,
    /// Sets the kernel's `/sys/kernel/rcu_expedited` to 1 for the control-plane part
    /// (and back after it). Each tcx attachment waits for an RCU grace period under
    /// the RTNL lock; expedited ones make a node's first Sync many times quicker, but
    /// the setting is the whole machine's: only when asked.
    #[arg(long)]
    rcu_expedited: bool,
    /// Floating-IP counts of the NAT test-run cases.
    #[arg(long, value_delimiter = ',')]
    fips: Option<Vec<usize>>,
    /// Floating-IP counts of the NAT real-traffic comparison.
    #[arg(long, value_delimiter = ',')]
    nat_fips: Option<Vec<usize>>,
    /// Systems of the security-group comparison.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ours,iptables-legacy,iptables-nft,nftables-sets"
    )]
    systems: Vec<String>,
    /// Rule counts of the security-group real-traffic comparison.
    #[arg(long, value_delimiter = ',')]
    traffic_rules: Option<Vec<usize>>,
    /// Measurements per real-traffic case; the median is reported.
    #[arg(long)]
    traffic_rounds: Option<usize>,
    /// UDP flows of the real traffic (source ports in turn).
    #[arg(long, default_value_t = 1024)]
    flows: u32,
    /// Flow counts of the L2 flow sweep.
    #[arg(long, value_delimiter = ',')]
    flow_counts: Option<Vec<u32>>,
    /// Flow counts of the security-group flow sweep (at `--latency-rules` rules; at
    /// most 50,000: one source address). None in the quick mode.
    #[arg(long, value_delimiter = ',')]
    sg_flow_counts: Option<Vec<u32>>,
    /// Frame sizes on the wire (with FCS) of the L2 comparison.
    #[arg(long, value_delimiter = ',', default_value = "64,512,1500")]
    sizes: Vec<usize>,
    /// Seconds of traffic per real-traffic measurement (plus half as long to warm up).
    #[arg(long)]
    seconds: Option<f64>,
    /// Request/response transactions per latency measurement.
    #[arg(long)]
    transactions: Option<u32>,
    /// New connections per first-packet latency measurement.
    #[arg(long)]
    connects: Option<u32>,
    /// Rule count of the security-group latency comparison and flow sweep.
    #[arg(long, default_value_t = 1000)]
    latency_rules: usize,
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
    Ok(State::replace(resources)?)
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
    Ok(State::replace(resources)?)
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

/// A test-run case: where it goes in the report, its samples (ns per run), and the
/// no-op samples measured the same way, round by round.
struct Row {
    scenario: &'static str,
    case: String,
    variant: Option<String>,
    sweep: Option<(&'static str, f64)>,
    /// The no-op program itself (the floor), not a datapath program.
    floor_only: bool,
    samples: Vec<f64>,
    floor: Vec<f64>,
}

const SWITCHING: &str = "Switching and routing, one program run (BPF_PROG_TEST_RUN)";
const SG_RULES: &str = "Security groups against rule count, one program run (BPF_PROG_TEST_RUN)";

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

/// Settings of the test-run part.
struct TestRunSettings {
    repeat: u32,
    new_flows: u32,
    rounds: usize,
    rules: Vec<usize>,
    fips: Vec<usize>,
}

/// The port programs under BPF_PROG_TEST_RUN beside the no-op programs.
struct TestRun {
    settings: TestRunSettings,
}

impl Part for TestRun {
    fn name(&self) -> &'static str {
        "testrun"
    }

    fn steps(&self) -> u64 {
        // One step per group of cases: switching and routing, each rule count, each
        // floating-IP count.
        (2 + self.settings.rules.len() + self.settings.fips.len()) as u64
    }

    fn run(&mut self, ctx: &mut Context<'_>) -> Result<()> {
        let settings = &self.settings;
        let names = ["bench-a", "bench-b", nat::UPLINK].map(str::to_owned);
        let (ns, devices) = device_lab("bench", &names)?;
        let lab = &mut *ctx.lab;
        (lab.a, lab.b) = (devices["bench-a"], devices["bench-b"]);
        let progress = ctx.progress;
        progress.step("test runs: switching and routing");
        let mut rows = ns.run(|| test_run_cases(lab, &devices, settings, progress))??;
        for &count in &settings.fips {
            progress.step(&format!("test runs: NAT, {count} floating IPs"));
            rows.extend(ns.run(|| {
                nat::test_run_cases(
                    lab,
                    &devices,
                    &[count],
                    settings.rounds,
                    settings.new_flows,
                    settings.repeat,
                )
            })??);
        }
        // Off these devices before they go (see `traffic::measure`).
        ns.run(|| lab.program(&State::default(), &devices, &BTreeSet::new()))??;
        for row in rows {
            let system = if row.floor_only { "floor" } else { "ours" };
            let over: Vec<f64> = row
                .samples
                .iter()
                .zip(&row.floor)
                .map(|(s, f)| s / f)
                .collect();
            let shape = |mut r: Record| {
                if let Some(v) = &row.variant {
                    r = r.variant(v);
                }
                if let Some((name, value)) = row.sweep {
                    r = r.sweep(name, value);
                }
                r.checks(&["each run's return code is the expected verdict"])
            };
            ctx.results.add(shape(Record::new(
                self.name(),
                row.scenario,
                &row.case,
                system,
                "ns per packet",
                "ns",
                Better::Lower,
                row.samples.clone(),
            )));
            if !row.floor_only {
                ctx.results.add(shape(Record::new(
                    self.name(),
                    row.scenario,
                    &row.case,
                    system,
                    "cost over the no-op program, same round",
                    "x",
                    Better::Lower,
                    over,
                )));
            }
        }
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(path) = &args.render {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let results: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is no results.json", path.display()))?;
        let out = match &args.out {
            Some(dir) => dir.clone(),
            None => path.parent().map(PathBuf::from).unwrap_or_default(),
        };
        report::write(&results, &out)?;
        println!(
            "wrote {}/{{results.json,report.html,summary.md}}",
            out.display()
        );
        return Ok(());
    }
    let mode = if args.quick { Mode::Quick } else { Mode::Full };
    let quick = mode == Mode::Quick;
    let test_run = TestRunSettings {
        repeat: args.repeat.unwrap_or(pick(quick, 200_000, 1_000_000)),
        new_flows: args.new_flows.unwrap_or(pick(quick, 2_000, 20_000)),
        rounds: args.rounds.unwrap_or(pick(quick, 3, 5)),
        rules: args.rules.clone().unwrap_or_else(|| {
            pick(
                quick,
                vec![10, 1000, 10_000],
                vec![10, 100, 1000, 10_000, 100_000],
            )
        }),
        fips: args
            .fips
            .clone()
            .unwrap_or_else(|| pick(quick, vec![1, 1000], vec![1, 100, 10_000])),
    };
    let rounds = args.traffic_rounds.unwrap_or(pick(quick, 3, 5));
    let duration = Duration::from_secs_f64(args.seconds.unwrap_or(pick(quick, 0.2, 0.5)));
    let systems = args
        .systems
        .iter()
        .map(|name| {
            traffic::System::from_name(name).with_context(|| format!("no system {name} to compare"))
        })
        .collect::<Result<Vec<_>>>()?;

    let packet_parts = ["testrun", "l2", "traffic", "nat-traffic", "latency"];
    let names = args.parts.clone().unwrap_or_else(|| {
        let control = (!quick).then_some("control-plane");
        packet_parts
            .into_iter()
            .chain(control)
            .map(String::from)
            .collect()
    });
    let mut parts: Vec<Box<dyn Part>> = vec![];
    for name in &names {
        let part: Box<dyn Part> = match name.as_str() {
            "testrun" => Box::new(TestRun {
                settings: TestRunSettings {
                    rules: test_run.rules.clone(),
                    fips: test_run.fips.clone(),
                    ..test_run
                },
            }),
            "l2" => Box::new(l2::Switching {
                sizes: args.sizes.clone(),
                flows: args.flows,
                flow_counts: args.flow_counts.clone().unwrap_or_else(|| {
                    pick(
                        quick,
                        vec![1, 1000, 100_000],
                        vec![1, 100, 10_000, 100_000, 1_000_000],
                    )
                }),
                rounds,
                duration,
            }),
            "traffic" => Box::new(traffic::SecurityGroups {
                settings: traffic::Settings {
                    systems: systems.clone(),
                    rules: args.traffic_rules.clone().unwrap_or_else(|| {
                        pick(quick, vec![10, 1000], vec![10, 100, 1000, 10_000])
                    }),
                    rounds,
                    flows: args.flows,
                    flow_counts: args
                        .sg_flow_counts
                        .clone()
                        .unwrap_or_else(|| pick(quick, vec![], vec![1, 1000, 50_000])),
                    flow_rules: args.latency_rules,
                    duration,
                },
            }),
            "nat-traffic" => Box::new(nat::FloatingIps {
                counts: args
                    .nat_fips
                    .clone()
                    .unwrap_or_else(|| pick(quick, vec![10, 1000], vec![10, 1000, 10_000])),
                rounds,
                flows: args.flows,
                duration,
            }),
            "latency" => Box::new(latency::Latency {
                rules: args.latency_rules,
                rounds,
                transactions: args.transactions.unwrap_or(pick(quick, 2_000, 20_000)),
                connects: args.connects.unwrap_or(pick(quick, 200, 1_000)),
            }),
            "control-plane" => Box::new(control::ControlPlane {
                applies: args.applies.unwrap_or(pick(quick, 30, 100)),
                local: args.control_local_ports,
                rcu_expedited: args.rcu_expedited,
            }),
            other => bail!("no part {other}"),
        };
        parts.push(part);
    }

    let kind = select_generator(&args.generator)?;
    let largest = test_run.rules.iter().copied().max().unwrap_or(10) as u32;
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
    let mut notes = args.note.clone();
    if args.rcu_expedited && names.iter().any(|name| name == "control-plane") {
        notes.push(
            "the control-plane part ran with /sys/kernel/rcu_expedited = 1 (--rcu-expedited)"
                .to_owned(),
        );
    }
    if kind != generator::Kind::LiveFrames {
        notes.push(format!(
            "the userspace AF_PACKET generator ran ({}): its own cost limits the offered \
             load",
            if args.generator == "auto" {
                "live frames did not work here"
            } else {
                "chosen with --generator"
            }
        ));
    }
    let mut results = Results::new(environment(mode, kind, notes)?);
    let progress = progress::Progress::new(parts.iter().map(|p| p.steps()).sum());
    let started = Instant::now();
    for part in &mut parts {
        let mut ctx = Context {
            lab: &mut lab,
            progress: &progress,
            results: &mut results,
        };
        part.run(&mut ctx)
            .with_context(|| format!("part {}", part.name()))?;
        progress.note(&format!(
            "{} done at {:.0} s",
            part.name(),
            started.elapsed().as_secs_f64()
        ));
    }
    progress.finish();
    results.compute_ratios();
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/bench")
            .join(command_output(&["date", "-u", "+%Y%m%d-%H%M%S"])?),
    };
    report::write(&results, &out)?;
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)? + "\n")?;
    }
    println!("{}", report::summary(&results));
    println!(
        "wrote {}/{{results.json,report.html,summary.md}} in {:.0} s",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The quick mode's value or the full mode's.
fn pick<T>(quick: bool, quick_value: T, full_value: T) -> T {
    if quick {
        quick_value
    } else {
        full_value
    }
}

/// The generator every measurement uses: live frames where a probe shows they work,
/// else the socket fallback (or what `choice` forces).
fn select_generator(choice: &str) -> Result<generator::Kind> {
    let kind = match choice {
        "live-frames" => generator::Kind::LiveFrames,
        "af-packet" => generator::Kind::PacketSocket,
        "auto" => {
            let ns = NetNs::new("bench-probe")?;
            ns.add_veth("probe0", None, "probe1")?;
            ns.set_up("probe0", true)?;
            ns.set_up("probe1", true)?;
            let _receiver = Receiver::attach(&ns, "probe1")?;
            let ifindex = ns.ifindex("probe0")?;
            let frame = udp_frame(
                MAC_A,
                MAC_B,
                [10, 0, 0, 1].into(),
                [10, 0, 0, 2].into(),
                SERVER_PORT,
                60,
            );
            if ns.run(|| generator::live_frames_work(ifindex, &frame))? {
                generator::Kind::LiveFrames
            } else {
                generator::Kind::PacketSocket
            }
        }
        other => bail!("no generator {other} (auto, live-frames, af-packet)"),
    };
    Ok(generator::select(kind))
}

fn command_output(argv: &[&str]) -> Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    ensure!(out.status.success(), "{argv:?} failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn environment(mode: Mode, kind: generator::Kind, notes: Vec<String>) -> Result<Environment> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|m| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!(", {:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    let commit = command_output(&["git", "rev-parse", "--short=12", "HEAD"])
        .unwrap_or_else(|_| "unknown".into());
    let dirty = command_output(&["git", "status", "--porcelain", "--untracked-files=no"])
        .map(|s| !s.is_empty())
        .unwrap_or(false);
    Ok(Environment {
        machine: format!("{model}{memory}"),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_owned(),
        commit: if dirty {
            format!("{commit} (with uncommitted changes)")
        } else {
            commit
        },
        started: command_output(&["date", "-u", "+%Y-%m-%d %H:%M UTC"])?,
        mode: match mode {
            Mode::Quick => "quick".into(),
            Mode::Full => "full".into(),
        },
        command: format!(
            "cargo xtask bench -- {}",
            std::env::args()
                .skip(1)
                .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
                .collect::<Vec<_>>()
                .join(" ")
        ),
        generator: kind.name().into(),
        cpu_cost: cpu::meter().method().describe(traffic::FILTER_CPU),
        notes,
    })
}

fn test_run_cases(
    lab: &mut Lab,
    devices: &BTreeMap<String, u32>,
    settings: &TestRunSettings,
    progress: &progress::Progress,
) -> Result<Vec<Row>> {
    let frame = tcp_frame(true, 40000, SERVER_PORT, Flags::Ack)?;
    let mut rows: Vec<Row> = Vec::new();
    let mut measure = |case: &str, samples: Vec<f64>, floor: Vec<f64>| {
        rows.push(Row {
            scenario: SWITCHING,
            case: case.to_owned(),
            variant: None,
            sweep: None,
            floor_only: case.starts_with("noop"),
            samples,
            floor,
        })
    };
    let (mut noop, mut l2_open, mut l2_stateless, mut egress) = (vec![], vec![], vec![], vec![]);
    let open = state(vec![], &[], &[])?;
    let stateless = state(vec![allow_all_stateless()], &["open"], &["open"])?;
    for _ in 0..settings.rounds {
        lab.program(&open, devices, &BTreeSet::new())?;
        noop.push(lab.time(program_names::NOOP_TC, lab.a, 0, &frame, settings.repeat, 0)?);
        l2_open.push(lab.time(
            program_names::PORT_INGRESS,
            lab.a,
            0,
            &frame,
            settings.repeat,
            7,
        )?);
        egress.push(lab.time(
            program_names::PORT_EGRESS,
            lab.b,
            MARK_FROM_DATAPATH | lab.slot_a,
            &frame,
            settings.repeat,
            0,
        )?);
        lab.program(&stateless, devices, &BTreeSet::new())?;
        l2_stateless.push(lab.time(
            program_names::PORT_INGRESS,
            lab.a,
            0,
            &frame,
            settings.repeat,
            7,
        )?);
    }
    measure("noop_tc", noop.clone(), noop.clone());
    measure("L2: port_ingress, no port security", l2_open, noop.clone());
    measure(
        "L2: port_ingress, port security + allow-all stateless SG",
        l2_stateless,
        noop.clone(),
    );
    measure("L2: port_egress, delivery", egress, noop.clone());

    // Routing rewrites the frame (TTL, MACs), and a test run keeps one frame across its
    // repeats: one run per call, against the no-op run the same way.
    let routed_state = routed()?;
    let routed_frame = routed_frame()?;
    let (mut routed_runs, mut floor) = (vec![], vec![]);
    for _ in 0..settings.rounds {
        lab.program(&routed_state, devices, &BTreeSet::new())?;
        floor.push(lab.noop_single(settings.new_flows)?);
        let mut total = 0.0;
        for _ in 0..settings.new_flows {
            total += lab.time(program_names::PORT_INGRESS, lab.a, 0, &routed_frame, 1, 7)?;
        }
        routed_runs.push(total / f64::from(settings.new_flows));
    }
    measure(
        "L3: port_ingress, routed between subnets (one run per call)",
        routed_runs,
        floor.clone(),
    );
    measure("noop_tc, one run per call", floor.clone(), floor);

    let mut measure_rules = vec![];
    for &count in &settings.rules {
        progress.step(&format!("test runs: security groups, {count} rules"));
        let sg = state(
            vec![sender_group(count), receiver_group()],
            &["sender"],
            &["receiver"],
        )?;
        lab.program(&sg, devices, &BTreeSet::new())?;
        lab.establish()?;
        let (mut established, mut new, mut floor_single, mut floor) =
            (vec![], vec![], vec![], vec![]);
        for round in 0..settings.rounds {
            floor.push(lab.time(program_names::NOOP_TC, lab.a, 0, &frame, settings.repeat, 0)?);
            established.push(lab.time(
                program_names::PORT_INGRESS,
                lab.a,
                0,
                &frame,
                settings.repeat,
                7,
            )?);
            floor_single.push(lab.noop_single(settings.new_flows)?);
            new.push(lab.new_flows(settings.new_flows, round)?);
        }
        for (variant, samples, floor, floor_only) in [
            ("established TCP (conntrack hit)", established, floor, false),
            (
                "new connection (SYN, one run per call)",
                new,
                floor_single.clone(),
                false,
            ),
            (
                "noop_tc, one run per call",
                floor_single.clone(),
                floor_single,
                true,
            ),
        ] {
            measure_rules.push(Row {
                scenario: SG_RULES,
                case: format!("{count} rules"),
                variant: Some(variant.into()),
                sweep: Some(("rules", count as f64)),
                floor_only,
                samples,
                floor,
            });
        }
    }
    rows.extend(measure_rules);
    Ok(rows)
}
