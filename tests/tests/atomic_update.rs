//! An update is seen whole: while one datapath handle switches a node back and forth
//! between two states, a second handle on the same pins runs frames through the
//! dispatcher without pause, and every verdict is one that the first or the second
//! state gives: never one of a mixture.
//!
//! The two states are chosen so that a mixture does give another verdict. Port p1's
//! stateless group allows UDP from 10.0.0.1 to port 1000 in the first, from 10.0.0.3 to
//! port 2000 in the second; the compiled rule takes the same address class in both, so
//! that written in place, one entry at a time, the new class entry (10.0.0.3) meets the
//! old rule (port 1000) or the old class entry meets the new rule, and a frame from
//! 10.0.0.3 to port 1000 (or from 10.0.0.1 to port 2000), refused by both, passes.
//! Needs root.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use dataplane_abi::{program_names, verdict_action};
use dataplane_agent::{
    core::{
        compile::{compile, Compiled, NodeView, SlotLimits, Slots},
        model::{Resource, State},
    },
    kernel::datapath::{Datapath, LoadOptions, MapLimits},
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{network, port, rule, security_group, subnet, IntoResource},
    bpffs::BpffsMount,
    frames,
    netns::device_lab,
};

const NODE: &str = "atomic";
/// Switches the writer makes, and the longest it may take.
const SWITCHES: usize = 400;
const WRITER_LIMIT: Duration = Duration::from_secs(60);

fn state(allowed_from: &str, allowed_port: u32) -> State {
    let allow = pb::SecurityGroupRule {
        port_range_min: Some(allowed_port),
        port_range_max: Some(allowed_port),
        remote_ip_prefix: format!("{allowed_from}/32"),
        ..rule("allow", pb::Direction::Ingress, pb::EtherType::Ipv4, "udp")
    };
    let mut sender = port(
        "p0",
        "net",
        "fa:16:3e:00:00:01",
        &[("sub", "10.0.0.1")],
        NODE,
        "s0",
    );
    // Sends from any address, so that one port can stand for both remotes.
    sender.port_security_enabled = Some(false);
    sender.security_group_ids.clear();
    let mut receiver = port(
        "p1",
        "net",
        "fa:16:3e:00:00:02",
        &[("sub", "10.0.0.2")],
        NODE,
        "s1",
    );
    receiver.security_group_ids = vec!["g".to_owned()];
    let resources = vec![
        network("net").into_resource(),
        subnet("sub", "net", "10.0.0.0/24").into_resource(),
        security_group("g", false, vec![allow]).into_resource(),
        sender.into_resource(),
        receiver.into_resource(),
    ];
    let resources: Vec<Resource> = resources_from_proto(resources).expect("valid proto");
    State::replace(resources).expect("valid state")
}

fn limits() -> MapLimits {
    MapLimits::for_node(64, 4096)
}

#[test]
fn every_frame_is_judged_by_one_whole_state_while_updates_switch_under_it() -> Result<()> {
    let names: Vec<String> = ["s0", "s1"].iter().map(|s| (*s).to_owned()).collect();
    let (ns, devices) = device_lab("atomic", &names)?;
    let bpffs = BpffsMount::new(
        &std::env::temp_dir().join(format!("dp-atomic-bpffs-{}", std::process::id())),
    )?;
    let root = bpffs.path().to_path_buf();

    // The receiver takes frames straight from the sender's `port_ingress`, which then
    // judges both sides: one run, one verdict.
    let peers: BTreeSet<u32> = [devices["s1"]].into();
    let mut slots = Slots::new(SlotLimits {
        max_ports: 64,
        max_networks: 64,
        max_rules: 64,
    });
    let view = NodeView {
        node_name: NODE,
        interfaces: &devices,
        peer_devices: &peers,
        uplink: None,
    };
    let first = compile(&state("10.0.0.1", 1000), &view, &mut slots);
    let second = compile(&state("10.0.0.3", 2000), &view, &mut slots);
    let classes =
        |c: &Compiled| -> BTreeSet<u32> { c.tables.sg_remote4.values().copied().collect() };
    ensure!(
        classes(&first) == classes(&second),
        "the states must share their address class for a mixture to show: {:?} vs {:?}",
        classes(&first),
        classes(&second)
    );

    let frame = |src: [u8; 4], dport: u16| {
        frames::udp4_frame(
            [0xfa, 0x16, 0x3e, 0, 0, 2],
            [0xfa, 0x16, 0x3e, 0, 0, 1],
            Ipv4Addr::from(src),
            Ipv4Addr::new(10, 0, 0, 2),
            40000,
            dport,
        )
    };
    // (frame, passes in the first state, passes in the second).
    let probes = [
        (frame([10, 0, 0, 1], 1000), true, false),
        (frame([10, 0, 0, 3], 2000), false, true),
        (frame([10, 0, 0, 3], 1000), false, false),
        (frame([10, 0, 0, 1], 2000), false, false),
    ];

    let writer_done = AtomicBool::new(false);
    let reader_running = AtomicBool::new(false);
    let sender = devices["s0"];
    let (switches, seen) = std::thread::scope(|scope| -> Result<(usize, Vec<[u64; 2]>)> {
        let writer = scope.spawn(|| {
            let result = ns.run(|| -> Result<usize> {
                let mut datapath = Datapath::load(
                    limits(),
                    &LoadOptions {
                        pin_root: Some(root.clone()),
                        trace_verdicts: true,
                    },
                )?;
                datapath.sync(&first)?;
                let waiting = Instant::now();
                while !reader_running.load(Ordering::SeqCst) {
                    ensure!(waiting.elapsed() < WRITER_LIMIT, "the reader never started");
                    std::thread::sleep(Duration::from_millis(10));
                }
                let started = Instant::now();
                let mut switches = 0;
                while switches < SWITCHES && started.elapsed() < WRITER_LIMIT {
                    let next = if switches % 2 == 0 { &second } else { &first };
                    datapath.sync(next)?;
                    switches += 1;
                }
                Ok(switches)
            });
            writer_done.store(true, Ordering::SeqCst);
            result
        });
        // The reader starts once the writer's first state is in.
        let reader = ns.run(|| -> Result<Vec<[u64; 2]>> {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !datapath_ready(&root) {
                ensure!(Instant::now() < deadline, "the writer never programmed");
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut datapath = Datapath::load(
                limits(),
                &LoadOptions {
                    pin_root: Some(root.clone()),
                    trace_verdicts: true,
                },
            )
            .context("loading the reader's handle")?;
            reader_running.store(true, Ordering::SeqCst);
            // Per probe: [passed, dropped].
            let mut seen = vec![[0u64; 2]; probes.len()];
            let mut rounds = 0u64;
            while !writer_done.load(Ordering::SeqCst) || rounds == 0 {
                for (i, (frame, in_first, in_second)) in probes.iter().enumerate() {
                    let out =
                        datapath.test_run(program_names::PORT_INGRESS, sender, 0, frame, 1)?;
                    let passed = match out.verdict.action {
                        verdict_action::UNICAST => true,
                        verdict_action::DROP => false,
                        other => anyhow::bail!("probe {i}: verdict action {other}"),
                    };
                    ensure!(
                        passed == *in_first || passed == *in_second,
                        "probe {i} {} in round {rounds}: neither state gives that, a mixture did",
                        if passed { "passed" } else { "was dropped" }
                    );
                    seen[i][usize::from(!passed)] += 1;
                }
                rounds += 1;
            }
            Ok(seen)
        })?;
        let switches = writer.join().expect("writer thread")??;
        Ok((switches, reader?))
    })?;
    ensure!(switches >= 50, "only {switches} switches");
    // The probes that each state judges differently saw both: the switches happened
    // under them.
    for (i, [passed, dropped]) in seen.iter().enumerate().take(2) {
        ensure!(
            *passed > 0 && *dropped > 0,
            "probe {i} passed {passed} times and was dropped {dropped}: it never saw a switch"
        );
    }
    eprintln!("{switches} switches; probes [passed, dropped]: {seen:?}");
    drop(bpffs);
    Ok(())
}

/// Whether a datapath pinned under `root` has programmed its first state (its active
/// set has ports).
fn datapath_ready(root: &std::path::Path) -> bool {
    let pins = dataplane_agent::kernel::datapath::PinLayout::new(root);
    let Ok(active) =
        aya::maps::MapData::from_pin(pins.state_dir().join(dataplane_abi::map_names::ACTIVE_SET))
            .map(aya::maps::Map::Array)
            .and_then(aya::maps::Array::<_, u32>::try_from)
    else {
        return false;
    };
    let Ok(set) = active.get(&0, 0) else {
        return false;
    };
    aya::maps::MapData::from_pin(pins.set_dir(set).join(dataplane_abi::map_names::PORTS))
        .map(aya::maps::Map::HashMap)
        .and_then(aya::maps::HashMap::<_, u32, dataplane_abi::PortInfo>::try_from)
        .is_ok_and(|ports| ports.keys().count() > 0)
}
