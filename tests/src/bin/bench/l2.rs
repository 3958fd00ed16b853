//! L2 switching on real traffic: ours against a Linux bridge on the same topology and
//! traffic, beside the floor of the path, over packet sizes, IPv4 and IPv6, and flow
//! counts.
//!
//! Topology, built anew for every measurement: a node namespace holding the ports'
//! devices `bench-a` and `bench-b`, their other ends `eth0` in VM namespaces A
//! (10.0.0.1) and B (10.0.0.2), each knowing the other's MAC. The XDP live-frames
//! generator sends UDP frames out of A's `eth0` to B; the sink on B's `eth0` counts
//! what arrives. Between the devices:
//!
//! - ours: `port_ingress`/`port_egress` on the devices, tables from the agent's own
//!   compiler and kernel layer, port security off (no filtering: switching alone), the
//!   veths delivering straight to their peer as the agent programs such ports;
//! - `linux-bridge`: both devices on a Linux bridge with iproute2's defaults (STP off,
//!   learning on, ageing 300 s), as Neutron's Linux bridge agent plugs ports when no
//!   firewall is configured; `bridge-nf-call-iptables`/`ip6tables` off in the node
//!   namespace, so no netfilter hook sees the frames;
//! - `floor`: no switch; the sink on `bench-a` itself, right after the no-op XDP
//!   program that turns on the veth's NAPI (which both systems also have). What the
//!   path costs before any switching is done, at the same offered load.
//!
//! Sizes are of the frame on the wire, with its FCS (64 B is a 60-byte frame here);
//! the smallest IPv6 case is 66 B, the shortest UDP/IPv6 frame.
//! Flows: up to 50,000 per source address (UDP source ports); beyond that the
//! generator spreads them over several source addresses, one template each.
//!
//! Checks on every measurement: the traffic is delivered; every frame the sink
//! counted has the size under test (bytes / packets); and the switch in between
//! counted at least what the sink received (ours: port a's receive counter; the
//! bridge: `bench-b`'s transmit counter).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use dataplane_agent::{
    core::model::{Resource, State},
    kernel::links,
    service::convert::resources_from_proto,
};
use dataplane_tests::{
    api::{network, port, subnet, IntoResource},
    generator::{udp_frame, Generator, Receiver, Sink},
    netns::NetNs,
    topology::{Vm, VM_DEV},
};
use ipnet::Ipv4Net;

use crate::{
    results::{Context, Part, Record},
    traffic::{add_rates, pin_napi_threads, rate_each, Rate, FILTER_CPU},
    Lab, MAC_A, MAC_B, NODE, SERVER_PORT,
};

const BRIDGE: &str = "br-l2";
const FIRST_SOURCE_PORT: u16 = 10_000;
/// Source ports per source address of the flow spread.
const PORTS_PER_SOURCE: u32 = 50_000;
pub const A_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const B_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const A_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const B_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Switch {
    Ours,
    LinuxBridge,
    Floor,
}

impl Switch {
    pub fn name(self) -> &'static str {
        match self {
            Switch::Ours => "ours",
            Switch::LinuxBridge => "linux-bridge",
            Switch::Floor => "floor",
        }
    }
}

/// One traffic shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Traffic {
    /// On the wire, with the FCS.
    pub size: usize,
    pub ipv6: bool,
    pub flows: u32,
}

impl Traffic {
    fn family(self) -> &'static str {
        if self.ipv6 {
            "IPv6"
        } else {
            "IPv4"
        }
    }

    /// The frame's length without the FCS: `size` - 4, or the smallest UDP frame of
    /// the family (IPv6 needs 62 bytes: 64 B on the wire is 66 B for it).
    fn frame_len(self) -> usize {
        let smallest = if self.ipv6 { 14 + 40 + 8 } else { 60 };
        (self.size - 4).max(smallest)
    }

    /// (source ports per template, templates): `flows` in all, rounded up to whole
    /// templates.
    fn spread(self) -> (u32, u32) {
        let sources = self.flows.div_ceil(PORTS_PER_SOURCE).max(1);
        (self.flows.div_ceil(sources), sources)
    }

    fn templates(self) -> Vec<Vec<u8>> {
        let (_, sources) = self.spread();
        (0..sources)
            .map(|i| {
                let (src, dst) = if self.ipv6 {
                    let src = if sources == 1 {
                        A_IP6
                    } else {
                        Ipv6Addr::from(u128::from(A_IP6) + 0x1_0000 + u128::from(i))
                    };
                    (IpAddr::V6(src), IpAddr::V6(B_IP6))
                } else {
                    let src = if sources == 1 {
                        A_IP
                    } else {
                        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 1, 0)) + i)
                    };
                    (IpAddr::V4(src), IpAddr::V4(B_IP))
                };
                udp_frame(MAC_A, MAC_B, src, dst, SERVER_PORT, self.frame_len())
            })
            .collect()
    }
}

/// Ports a and b on one network with an IPv4 and an IPv6 subnet, port security off.
fn our_state() -> Result<State> {
    let mut resources = vec![
        network("net").into_resource(),
        subnet("sub4", "net", "10.0.0.0/24").into_resource(),
        subnet("sub6", "net", "fd00::/64").into_resource(),
    ];
    for (id, mac, ip, ip6) in [
        ("a", "fa:16:3e:00:00:0a", "10.0.0.1", "fd00::1"),
        ("b", "fa:16:3e:00:00:0b", "10.0.0.2", "fd00::2"),
    ] {
        let mut p = port(
            id,
            "net",
            mac,
            &[("sub4", ip), ("sub6", ip6)],
            NODE,
            &format!("bench-{id}"),
        );
        p.security_group_ids.clear();
        p.port_security_enabled = Some(false);
        resources.push(p.into_resource());
    }
    let resources: Vec<Resource> = resources_from_proto(resources)?;
    Ok(State::replace(resources)?)
}

/// The L2 topology above, `switch` in place.
pub struct Topology {
    pub node: NetNs,
    pub a: Vm,
    pub b: Vm,
    devices: BTreeMap<String, u32>,
    _receiver: Receiver,
}

impl Topology {
    pub fn build(switch: Switch, lab: &mut Lab) -> Result<Self> {
        let node = NetNs::new("bench-l2")?;
        let vm = |id: &str, mac, ip| {
            Vm::create(
                &node,
                &format!("bench-l2{id}"),
                &format!("bench-{id}"),
                mac,
                &[Ipv4Net::new(ip, 24)?.into()],
            )
        };
        let (a, b) = (vm("a", MAC_A, A_IP)?, vm("b", MAC_B, B_IP)?);
        for ns in [&node, &a.ns, &b.ns] {
            ns.exec_ok(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"])?;
        }
        for (vm, ip, mac) in [(&a, B_IP, MAC_B), (&b, A_IP, MAC_A)] {
            vm.ns.ip(&[
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                &mac.map(|b| format!("{b:02x}")).join(":"),
                "dev",
                VM_DEV,
                "nud",
                "permanent",
            ])?;
        }
        // As in `traffic`: NAPI on for XDP frames, threaded, on the filter's CPU.
        let receiver = Receiver::attach(&node, "bench-a")?;
        node.exec_ok(&["sh", "-c", "echo 1 > /sys/class/net/bench-a/threaded"])?;
        pin_napi_threads("bench-a", FILTER_CPU)?;
        let mut devices = BTreeMap::new();
        for dev in ["bench-a", "bench-b"] {
            devices.insert(dev.to_owned(), node.ifindex(dev)?);
        }
        let topo = Self {
            node,
            a,
            b,
            devices,
            _receiver: receiver,
        };
        match switch {
            Switch::Ours => {
                lab.forget_connections()?;
                let state = our_state()?;
                let devices = topo.devices.clone();
                topo.node.run(|| -> Result<()> {
                    let peers = links::peer_devices()?;
                    ensure!(
                        devices.values().all(|ifindex| peers.contains(ifindex)),
                        "ports without peer delivery"
                    );
                    lab.program(&state, &devices, &peers)
                })??;
            }
            Switch::LinuxBridge => {
                let n = &topo.node;
                n.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
                n.ip(&["link", "set", BRIDGE, "up"])?;
                for dev in ["bench-a", "bench-b"] {
                    n.ip(&["link", "set", dev, "master", BRIDGE])?;
                }
                // Present only once br_netfilter is loaded (the security-group part
                // loads it); per namespace.
                n.exec_ok(&[
                    "sh",
                    "-c",
                    "for f in /proc/sys/net/bridge/bridge-nf-call-iptables \
                     /proc/sys/net/bridge/bridge-nf-call-ip6tables; do \
                     [ -e $f ] && echo 0 > $f; done; true",
                ])?;
            }
            Switch::Floor => {}
        }
        Ok(topo)
    }

    /// Takes ours off the devices before they go (a new device may reuse an ifindex).
    pub fn release(&self, switch: Switch, lab: &mut Lab) -> Result<()> {
        if switch == Switch::Ours {
            let devices = self.devices.clone();
            self.node
                .run(|| lab.program(&State::default(), &devices, &BTreeSet::new()))??;
        }
        Ok(())
    }

    /// `bench-b`'s transmitted packets, as the node's stack counts them.
    fn bench_b_tx(&self) -> Result<u64> {
        let json = self.node.ip(&["-s", "-j", "link", "show", "bench-b"])?;
        let links: serde_json::Value = serde_json::from_str(&json)?;
        links[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .context("no tx packets of bench-b")
    }
}

fn measure(switch: Switch, traffic: Traffic, lab: &mut Lab, duration: Duration) -> Result<Rate> {
    let topo = Topology::build(switch, lab)?;
    let result = measure_on(switch, traffic, &topo, lab, duration);
    topo.release(switch, lab)?;
    result
}

fn measure_on(
    switch: Switch,
    traffic: Traffic,
    topo: &Topology,
    lab: &mut Lab,
    duration: Duration,
) -> Result<Rate> {
    let name = switch.name();
    let sink = match switch {
        Switch::Floor => Sink::attach(&topo.node, "bench-a")?,
        _ => Sink::attach(&topo.b.ns, VM_DEV)?,
    };
    let (ports, _) = traffic.spread();
    let mut generator = Generator::new(topo.a.ns.ifindex(VM_DEV)?, ports, FIRST_SOURCE_PORT)?;
    let templates = traffic.templates();
    let (rx_before, tx_before) = (lab.rx_a()?, topo.bench_b_tx()?);
    let (sink_before, bytes_before) = sink.count()?;
    let r = rate_each(&topo.a.ns, &mut generator, &sink, &templates, duration)?;
    ensure!(r.delivered > 0.0, "{name}: the traffic was not delivered");
    let (packets, bytes) = sink.count()?;
    let (packets, bytes) = (packets - sink_before, bytes - bytes_before);
    let frame_len = traffic.frame_len() as u64;
    ensure!(
        bytes == packets * frame_len,
        "{name}: the sink received {bytes} bytes in {packets} frames of {frame_len} bytes"
    );
    let counted = match switch {
        Switch::Ours => lab.rx_a()? - rx_before,
        Switch::LinuxBridge => topo.bench_b_tx()? - tx_before,
        Switch::Floor => packets,
    };
    ensure!(
        counted >= packets,
        "{name}: the switch counted {counted} frames, the sink {packets}"
    );
    Ok(r)
}

/// The part: sizes and families at `flows` flows, then the flow sweep at 64 B IPv4.
pub struct Switching {
    pub sizes: Vec<usize>,
    pub flows: u32,
    pub flow_counts: Vec<u32>,
    pub rounds: usize,
    pub duration: Duration,
}

impl Switching {
    fn cases(&self) -> Vec<(&'static str, Traffic)> {
        let mut cases: Vec<(&'static str, Traffic)> = self
            .sizes
            .iter()
            .map(|&size| {
                (
                    "sizes",
                    Traffic {
                        size,
                        ipv6: false,
                        flows: self.flows,
                    },
                )
            })
            .collect();
        cases.push((
            "sizes",
            Traffic {
                size: 64,
                ipv6: true,
                flows: self.flows,
            },
        ));
        cases.extend(self.flow_counts.iter().map(|&flows| {
            (
                "flows",
                Traffic {
                    size: 64,
                    ipv6: false,
                    flows,
                },
            )
        }));
        cases
    }
}

const SWITCHES: [Switch; 3] = [Switch::Ours, Switch::LinuxBridge, Switch::Floor];

impl Part for Switching {
    fn name(&self) -> &'static str {
        "l2"
    }

    fn steps(&self) -> u64 {
        (self.rounds * self.cases().len() * SWITCHES.len()) as u64
    }

    fn run(&mut self, ctx: &mut Context<'_>) -> Result<()> {
        let cases = self.cases();
        let mut results: BTreeMap<(usize, Switch), Vec<Rate>> = BTreeMap::new();
        for round in 0..self.rounds {
            for (i, (_, traffic)) in cases.iter().enumerate() {
                for switch in SWITCHES {
                    ctx.progress.step(&format!(
                        "L2: round {}/{}, {} B {}, {} flows, {}",
                        round + 1,
                        self.rounds,
                        traffic.frame_len() + 4,
                        traffic.family(),
                        traffic.flows,
                        switch.name()
                    ));
                    let r = measure(switch, *traffic, ctx.lab, self.duration)?;
                    results.entry((i, switch)).or_default().push(r);
                }
            }
        }
        let checks = [
            "the traffic is delivered",
            "every frame the sink received has the size under test",
            "the switch counted at least every frame the sink received (ours: the \
             sending port; linux-bridge: bench-b's transmit counter)",
        ];
        for ((i, switch), rates) in &results {
            let (kind, traffic) = cases[*i];
            let (scenario, case, shape): (String, String, Box<dyn Fn(Record) -> Record>) =
                if kind == "sizes" {
                    (
                        format!(
                            "L2 switching on real traffic: packet sizes and families, {} flows",
                            self.flows
                        ),
                        format!("{} B {}", traffic.frame_len() + 4, traffic.family()),
                        Box::new(|r| r),
                    )
                } else {
                    let (ports, sources) = traffic.spread();
                    let flows = ports * sources;
                    (
                        "L2 switching on real traffic: flow count, 64 B IPv4".to_owned(),
                        if sources > 1 {
                            format!("{flows} flows ({sources} sources x {ports} ports)")
                        } else {
                            format!("{flows} flows")
                        },
                        Box::new(move |r: Record| r.sweep("flows", f64::from(flows))),
                    )
                };
            add_rates(
                ctx.results,
                self.name(),
                &scenario,
                &case,
                switch.name(),
                rates,
                &checks,
                shape,
            );
        }
        Ok(())
    }
}
