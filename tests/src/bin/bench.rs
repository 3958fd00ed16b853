//! `cargo xtask bench`: cost of the port programs under BPF_PROG_TEST_RUN, measured beside
//! the no-op classifier in the same run and reported as ratios.
//!
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

use std::{collections::BTreeMap, time::Duration};

use anyhow::{ensure, Result};
use clap::Parser;
use dataplane_abi::{program_names, MARK_FROM_DATAPATH};
use dataplane_agent::{
    core::{
        compile::{compile, NodeView, SlotLimits, Slots},
        model::{Resource, State},
    },
    kernel::datapath::{Datapath, LoadOptions, MapLimits},
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{network, port, rule, security_group, subnet, IntoResource},
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
    fn program(&mut self, state: &State, devices: &BTreeMap<String, u32>) -> Result<()> {
        let compiled = compile(
            state,
            &NodeView {
                node_name: NODE,
                interfaces: devices,
            },
            &mut Slots::new(SlotLimits {
                max_ports: 64,
                max_networks: 64,
                max_rules: MapLimits::for_node(64, 1 << 20).max_rules,
            }),
        );
        self.datapath.sync(&compiled)?;
        self.slot_a = compiled
            .ports
            .iter()
            .find(|p| p.port_id == "a")
            .map(|p| p.slot)
            .unwrap_or_default();
        Ok(())
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
    let (ns, devices) = device_lab("bench", &["bench-a".to_owned(), "bench-b".to_owned()])?;

    let rows = ns.run(|| -> Result<Vec<Row>> {
        let largest = args.rules.iter().copied().max().unwrap_or(10) as u32;
        let mut limits = MapLimits::for_node(64, 1 << 20);
        limits.max_rules = limits.max_rules.max(largest + 16);
        limits.max_remote_prefixes = limits.max_remote_prefixes.max(largest + 16);
        limits.max_rule_entries = limits.max_rule_entries.max(largest * 2 + 64);
        let mut lab = Lab {
            datapath: Datapath::load(limits, &LoadOptions::default())?,
            a: devices["bench-a"],
            b: devices["bench-b"],
            slot_a: 0,
        };
        let frame = tcp_frame(true, 40000, SERVER_PORT, Flags::Ack)?;
        let mut rows: Vec<Row> = Vec::new();
        let mut measure =
            |name: String, samples: Vec<f64>, floor: Vec<f64>| rows.push((name, samples, floor));

        let (mut noop, mut l2_open, mut l2_stateless, mut egress) =
            (vec![], vec![], vec![], vec![]);
        let open = state(vec![], &[], &[])?;
        let stateless = state(vec![allow_all_stateless()], &["open"], &["open"])?;
        for _ in 0..args.rounds {
            lab.program(&open, &devices)?;
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
            lab.program(&stateless, &devices)?;
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

        for &count in &args.rules {
            let sg = state(
                vec![sender_group(count), receiver_group()],
                &["sender"],
                &["receiver"],
            )?;
            lab.program(&sg, &devices)?;
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
    })??;

    println!("Port programs under BPF_PROG_TEST_RUN, 60-byte TCP/IPv4 frames, {} rounds (median, min-max)\n", args.rounds);
    println!(
        "{:<62} {:>9} {:>17} {:>9}",
        "case", "ns/pkt", "spread", "x no-op"
    );
    let mut json = Vec::new();
    for (name, samples, floor) in &rows {
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
    if let Some(path) = args.json {
        std::fs::write(&path, format!("[{}]\n", json.join(",\n")))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
