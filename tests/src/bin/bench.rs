//! `cargo xtask bench`: cost of the L2 port path under BPF_PROG_TEST_RUN, measured beside
//! a no-op classifier in the same run, reported as ratios.
//!
//! The datapath is the agent's own: its compiler builds the tables for two ports with
//! port security on, its kernel layer writes them. Rounds alternate between programs so
//! that drift (frequency, noisy neighbours) hits all of them alike; the median of the
//! rounds is reported, with the spread.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{ensure, Result};
use clap::Parser;
use dataplane_abi::{program_names, MARK_FROM_DATAPATH};
use dataplane_agent::{
    core::{
        compile::{compile, NodeView, Slots},
        model::{Resource, State},
    },
    kernel::datapath::{Datapath, LoadOptions, MapLimits},
    service::convert::resources_from_proto,
};
use dataplane_tests::{
    api::{network, port, subnet, IntoResource},
    frames,
    netns::NetNs,
};

#[derive(Parser)]
struct Args {
    /// Runs of the program per measurement (one BPF_PROG_TEST_RUN call).
    #[arg(long, default_value_t = 2_000_000)]
    repeat: u32,
    /// Measurements per program; the median is reported.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

const NODE: &str = "bench-node";
const MAC_A: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 0x0b];

struct Case {
    name: &'static str,
    program: &'static str,
    /// `port_egress` only passes frames stamped by `port_ingress`.
    mark: u32,
    /// Return code the program must give, so a broken path cannot look fast.
    expect: i32,
}

const CASES: [Case; 3] = [
    Case {
        name: "noop (floor)",
        program: program_names::NOOP_TC,
        mark: 0,
        expect: 0,
    },
    Case {
        name: "port_ingress: unicast IPv4, port security",
        program: program_names::PORT_INGRESS,
        mark: 0,
        expect: 7,
    },
    Case {
        name: "port_egress: delivery to the VM",
        program: program_names::PORT_EGRESS,
        mark: MARK_FROM_DATAPATH | 1,
        expect: 0,
    },
];

fn desired_state() -> Result<State> {
    let resources: Vec<Resource> = resources_from_proto(vec![
        network("net").into_resource(),
        subnet("sub", "net", "10.0.0.0/24").into_resource(),
        port(
            "a",
            "net",
            "fa:16:3e:00:00:0a",
            &[("sub", "10.0.0.1")],
            NODE,
            "bench-a",
        )
        .into_resource(),
        port(
            "b",
            "net",
            "fa:16:3e:00:00:0b",
            &[("sub", "10.0.0.2")],
            NODE,
            "bench-b",
        )
        .into_resource(),
    ])?;
    Ok(State::replace(&resources)?)
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let ns = NetNs::new("bench")?;
    let mut devices = BTreeMap::new();
    for name in ["bench-a", "bench-b"] {
        devices.insert(
            name.to_owned(),
            ns.add_veth(name, None, &format!("{name}p"))?,
        );
    }
    let state = desired_state()?;
    let frame = frames::udp4_frame(
        MAC_B,
        MAC_A,
        "10.0.0.1".parse()?,
        "10.0.0.2".parse()?,
        40000,
        5001,
    );
    // 64 bytes on the wire is 60 without the FCS.
    let mut frame = frame;
    frame.resize(frame.len().max(60), 0);

    let results = ns.run(|| -> Result<Vec<(&'static str, Vec<f64>)>> {
        let mut datapath = Datapath::load(
            MapLimits {
                max_ports: 64,
                max_addresses: 1024,
                max_fdb: 256,
            },
            &LoadOptions::default(),
        )?;
        let compiled = compile(
            &state,
            &NodeView {
                node_name: NODE,
                interfaces: &devices,
            },
            &mut Slots::new(64, 64),
        );
        datapath.sync(&compiled.tables, &compiled.ports)?;
        let a = devices["bench-a"];
        let b = devices["bench-b"];
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
        for _ in 0..args.rounds {
            for (case, out) in CASES.iter().zip(samples.iter_mut()) {
                let ifindex = if case.program == program_names::PORT_EGRESS {
                    b
                } else {
                    a
                };
                let outcome =
                    datapath.test_run(case.program, ifindex, case.mark, &frame, args.repeat)?;
                ensure!(
                    outcome.return_code == case.expect,
                    "{}: returned {}, expected {}",
                    case.name,
                    outcome.return_code,
                    case.expect
                );
                out.push(nanos(outcome.per_run));
            }
        }
        Ok(CASES.iter().map(|case| case.name).zip(samples).collect())
    })??;

    let floor = median(&mut results[0].1.clone());
    println!(
        "L2 port path, BPF_PROG_TEST_RUN, {}-byte frame, {} runs x {} rounds (median, min-max)\n",
        frame.len(),
        args.repeat,
        args.rounds
    );
    println!(
        "{:<46} {:>9} {:>17} {:>9}",
        "program", "ns/pkt", "spread", "x no-op"
    );
    let mut json = Vec::new();
    for (name, samples) in &results {
        let mut sorted = samples.clone();
        let mid = median(&mut sorted);
        println!(
            "{name:<46} {mid:>9.1} {:>8.1}-{:<8.1} {:>9.2}",
            sorted[0],
            sorted[sorted.len() - 1],
            mid / floor
        );
        json.push(format!(
            "{{\"name\":\"{name}\",\"ns_per_packet\":{mid:.2},\"min\":{:.2},\"max\":{:.2},\"ratio_to_noop\":{:.3}}}",
            sorted[0],
            sorted[sorted.len() - 1],
            mid / floor
        ));
    }
    let ingress = median(&mut results[1].1.clone());
    let egress = median(&mut results[2].1.clone());
    println!(
        "\nwhole L2 path (ingress + egress) {:.1} ns = {:.2}x one no-op, {:.2}x two (one per hook)",
        ingress + egress,
        (ingress + egress) / floor,
        (ingress + egress) / (2.0 * floor)
    );
    if let Some(path) = args.json {
        std::fs::write(&path, format!("[{}]\n", json.join(",")))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn nanos(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e9
}
