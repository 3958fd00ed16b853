//! Security groups at scale, in the kernel: 10,000 ports, 1,000 groups of 100 rules
//! (100,000 rules), remote groups of 1,000 members. A port in every group gets a policy
//! of all 100,000 rules; the agent's compiler and kernel layer load it, and packets are
//! judged right at the far end of the rule list and by remote-group membership. Prints
//! the compile and load times and the kernel's memory for the maps. Needs root.

use std::{collections::BTreeSet, time::Instant};

use anyhow::{ensure, Result};
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

const NODE: &str = "scale-node";
const NETWORKS: usize = 10;
const PORTS_PER_NETWORK: usize = 1_000;
const GROUPS: usize = 1_000;
const RULES_PER_GROUP: usize = 100;
/// Groups `sg0..sg9` each hold all 1,000 ports of one network.
const BIG_GROUPS: usize = 10;

fn group(g: usize) -> pb::SecurityGroup {
    let rules = (0..RULES_PER_GROUP)
        .map(|r| {
            let id = format!("sg{g}-r{r}");
            let port = |min: usize, max: usize| (Some(min as u32), Some(max as u32));
            let (min, max, prefix, remote_group) = match r {
                // From a big group's members (1,000 addresses each).
                0..5 => {
                    let (min, max) = port(1000 + g % 100, 1000 + g % 100);
                    (min, max, String::new(), format!("sg{}", g % BIG_GROUPS))
                }
                // From prefixes of another range, on ports of their own.
                _ => {
                    let (min, max) = port(2000 + r * 10, 2000 + r * 10 + g % 7);
                    (
                        min,
                        max,
                        format!("172.{}.{}.0/24", 16 + g % 16, r),
                        String::new(),
                    )
                }
            };
            pb::SecurityGroupRule {
                port_range_min: min,
                port_range_max: max,
                remote_ip_prefix: prefix,
                remote_group_id: remote_group,
                ..rule(&id, pb::Direction::Ingress, pb::EtherType::Ipv4, "tcp")
            }
        })
        .collect();
    security_group(&format!("sg{g}"), true, rules)
}

fn large_state() -> Result<State> {
    let mut resources: Vec<pb::Resource> = (0..GROUPS).map(|g| group(g).into_resource()).collect();
    for n in 0..NETWORKS {
        resources.push(network(&format!("n{n}")).into_resource());
        resources.push(
            subnet(
                &format!("s{n}"),
                &format!("n{n}"),
                &format!("10.{n}.0.0/16"),
            )
            .into_resource(),
        );
        for i in 0..PORTS_PER_NETWORK {
            let address = format!("10.{n}.{}.{}", i / 200, i % 200 + 2);
            let mut p = port(
                &format!("p{n}-{i}"),
                &format!("n{n}"),
                &format!("fa:16:3e:{n:02x}:{:02x}:{:02x}", i / 256, i % 256),
                &[(&format!("s{n}"), &address)],
                "elsewhere",
                &format!("tap{n}-{i}"),
            );
            p.security_group_ids = vec![format!("sg{}", n % BIG_GROUPS)];
            if n == 0 && i < 2 {
                // The two ports on this node: the server is in every group.
                p.binding.as_mut().unwrap().host = NODE.into();
                p.binding.as_mut().unwrap().interface_name = format!("sc{i}");
                if i == 0 {
                    p.security_group_ids = (0..GROUPS).map(|g| format!("sg{g}")).collect();
                }
            }
            resources.push(p.into_resource());
        }
    }
    let resources: Vec<Resource> = resources_from_proto(resources)?;
    Ok(State::replace(resources)?)
}

/// A TCP SYN from the client port (10.0.0.3, p0-1) to the server (10.0.0.2, p0-0).
fn syn(dport: u16) -> Result<Vec<u8>> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2([0xfa, 0x16, 0x3e, 0, 0, 1], [0xfa, 0x16, 0x3e, 0, 0, 0])
        .ipv4([10, 0, 0, 3], [10, 0, 0, 2], 64)
        .tcp(40000, dport, 1, 65535)
        .syn()
        .write(&mut frame, &[])?;
    Ok(frame)
}

/// Kernel memory of this process's BPF maps, from /proc/self/fdinfo: (maps, bytes).
fn map_memory() -> (usize, u64) {
    let mut maps = 0;
    let mut bytes = 0;
    for entry in std::fs::read_dir("/proc/self/fdinfo")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if !info.contains("map_type:") {
            continue;
        }
        maps += 1;
        bytes += info
            .lines()
            .find_map(|line| line.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    (maps, bytes)
}

#[test]
fn a_hundred_thousand_rules_load_and_enforce() -> Result<()> {
    let (ns, devices) = device_lab("scale", &["sc0".to_owned(), "sc1".to_owned()])?;

    let started = Instant::now();
    let state = large_state()?;
    let validated = started.elapsed();

    ns.run(move || -> Result<()> {
        let limits = MapLimits::for_node(64, 65536);
        let mut datapath = Datapath::load(limits, &LoadOptions::default())?;
        let (_, empty) = map_memory();
        let mut slots = Slots::new(SlotLimits {
            max_ports: 64,
            max_networks: 64,
            max_rules: limits.max_rules,
        });
        let started = Instant::now();
        let compiled = compile(
            &state,
            &NodeView {
                node_name: NODE,
                interfaces: &devices,
                peer_devices: &BTreeSet::new(),
                uplink: None,
            },
            &mut slots,
        );
        let compiled_in = started.elapsed();
        let started = Instant::now();
        datapath.sync(&compiled)?;
        let loaded_in = started.elapsed();
        let (maps, bytes) = map_memory();
        let tables = &compiled.tables;
        eprintln!(
            "10,000 ports, {} rules: validate {validated:?}, compile {compiled_in:?}, load {loaded_in:?}; \
             SG_REMOTE4 {} entries, SG_RULES {} entries, {} rule slots; {maps} maps hold {:.1} MiB \
             ({:.1} MiB of it before the policy was loaded)",
            GROUPS * RULES_PER_GROUP,
            tables.sg_remote4.len(),
            tables.sg_rules.len(),
            compiled.rules.len(),
            bytes as f64 / 1048576.0,
            empty as f64 / 1048576.0,
        );
        ensure!(compiled.rules.len() == GROUPS * RULES_PER_GROUP, "every rule has a slot");

        let server = devices["sc0"];
        let client_slot = compiled
            .ports
            .iter()
            .find(|p| p.port_id == "p0-1")
            .map(|p| p.slot)
            .unwrap();
        let mark = MARK_FROM_DATAPATH | client_slot;
        let verdict = |datapath: &mut Datapath, dport: u16| -> Result<i32> {
            Ok(datapath
                .test_run(program_names::PORT_EGRESS, server, mark, &syn(dport)?, 1)?
                .return_code)
        };
        // p0-1 is a member of sg0; rules "from sg0" of groups g ≡ 0 (mod 10) open port
        // 1000 + g % 100, e.g. sg990's on 1090 — near the end of the rule list.
        ensure!(verdict(&mut datapath, 1090)? == 0, "allowed through remote group sg0 (sg990)");
        ensure!(verdict(&mut datapath, 1000)? == 0, "allowed through remote group sg0 (sg0)");
        // Rules from sg1..sg9 open 1001..1009 (and more) to other networks' members only.
        ensure!(verdict(&mut datapath, 1001)? == 2, "sg1's members only");
        // Prefix rules are for 172.16/12 sources: not for 10.0.0.3.
        ensure!(verdict(&mut datapath, 2050)? == 2, "prefix rules do not match");
        ensure!(verdict(&mut datapath, 80)? == 2, "no rule at all");
        Ok(())
    })??;
    Ok(())
}
