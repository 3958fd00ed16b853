//! Part `control-plane`: the agent's control plane at a large node's scale, through the
//! real agent binary driven over gRPC in a namespace of its own.
//!
//! The state: 10,000 ports; 1,000 security groups of 100 rules (100,000 rules, and one
//! probe rule); 10,000 floating IPs, one per port, through one router with an interface
//! on each of the 200 networks and a gateway on the external network. The ports are 200
//! networks of 50 (the datapath floods to at most 64 ports of a network per node, so
//! the 100 x 100 of the core's scale test cannot all be local). Like that test, groups
//! `sg0..sg9` hold 1,000 ports each and every port is also in small groups; here the
//! ports of one network share their groups (a policy per network), and every group is
//! used by some local port, so every rule is programmed.
//!
//! `--control-local-ports` of them (all, by default) are bound to this node, each with a
//! device of its own (veth pairs inside the node namespace, made by one `ip -batch`,
//! and two VMs whose traffic probes enforcement); the others are bound to another node,
//! and their floating IPs are not this node's to translate. The first ports of every
//! network are the local ones, so every group is programmed whatever the count.
//!
//! Measured:
//! 1. `Sync` of the whole state, twice: first onto devices without programs (each gets
//!    its tcx links), then the same resources with every rule, port address and
//!    floating IP moved (the maps rewritten, nothing attached). Each: the RPC's
//!    latency, and the time until the node is checked to be programmed: every port and
//!    floating IP with the status the agent's own compiler gives for this state (every
//!    local port ACTIVE), and every map's fill (`/metrics`) at that compiler's entry
//!    counts; then the kernel's maps are read back from their pins and counted. The
//!    agent's log says where its commit spent the time.
//! 2. A single-rule `Apply` (the probe group's one rule moves between two UDP ports):
//!    the RPC's latency, and the time from its return until a UDP datagram from VM a
//!    to the newly allowed port of VM b arrives (a fresh source port per probe, so
//!    conntrack has not seen it); the old port is then checked to be refused.
//! 3. The agent's memory: VmRSS and VmHWM after each Sync and after the applies.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use dataplane_abi::{
    FdbEntry, FdbKey, FloatingIp4, PortInfo, RemoteKey4, RuleKey, REMOTE4_FULL_BITS,
    REMOTE6_FULL_BITS, RULE_LOOKUP_BITS,
};
use dataplane_agent::{
    core::{
        compile::StatusKind,
        compile::{compile, Compiled, NodeView, SlotLimits, Slots, Uplink},
        model::{MacAddr, ResourceKind, State},
    },
    kernel::datapath::MapLimits,
    service::convert::resources_from_proto,
};
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use dataplane_tests::{
    agent::{metric, scrape_metrics, Agent},
    api::{
        external_network, floating_ip, gateway_port, network, port, router, router_port, rule,
        security_group, subnet, upsert, with_gateway, IntoResource,
    },
    netns::NetNs,
    topology::Vm,
};
use tonic::transport::Channel;

const NODE: &str = "cp-node";
const NETWORKS: usize = 200;
const PORTS_PER_NETWORK: usize = 50;
const PORTS: usize = NETWORKS * PORTS_PER_NETWORK;
const GROUPS: usize = 1_000;
const RULES_PER_GROUP: usize = 100;
/// Groups `sg0..sg{BIG_GROUPS}` hold the ports of every `BIG_GROUPS`-th network.
const BIG_GROUPS: usize = 10;
/// Small groups per network: `sg{10 + 10k + n % 10}` for five `k` in turn.
const SMALL_PER_NETWORK: usize = 5;
/// Port slots: every port, with room to spare.
const MAX_PORTS: u32 = 16_384;
const PROBE_GROUP: &str = "probe";
const PROBE_RULE: &str = "probe-udp";
/// The probe rule allows one of these at a time.
const PROBE_PORTS: [u16; 2] = [7100, 7101];
const UPLINK: &str = "cp-up";
const OUTSIDE_DEV: &str = "cp-ext";
const EXTERNAL_GATEWAY: &str = "100.64.0.1";
const ROUTER_ADDRESS: &str = "100.64.0.2";
const METRICS: &str = "127.0.0.1:9464";
/// How long the node may take to be programmed after Sync returns.
const PROGRAMMED_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a probe to the newly allowed port may take to arrive.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a probe to a refused port is waited for (it must not come).
const REFUSED_WAIT: Duration = Duration::from_millis(20);
/// The host ports not bound to this node are bound to.
const OTHER_NODE: &str = "cp-other";
/// Largest gRPC message the benchmark takes (a list of 10,000 ports).
const MAX_MESSAGE: usize = 256 << 20;

struct Results {
    pub ports: usize,
    /// Ports bound to this node, each with its device.
    pub local: usize,
    pub rules: usize,
    pub floating_ips: usize,
    /// Devices created (one per local port), and how long that took.
    pub devices: (usize, Duration),
    /// The first Sync: every port's programs still to attach.
    pub cold: SyncRun,
    /// Programs attached to the ports' devices during the first Sync (from the agent's
    /// log): how many ports, and the time from the first to the last.
    pub attached: (usize, Duration),
    /// A Sync of the same resources with every rule, port address and floating IP
    /// moved: the maps rewritten, no device attached.
    pub warm: SyncRun,
    /// Sync of the same state again: RPC latency of each.
    pub resync_rpc: Vec<Duration>,
    /// Entries by map, as counted in the kernel's maps read back from their pins.
    pub kernel_entries: Vec<(&'static str, usize)>,
    /// The maps' fill as `/metrics` reported it and as the compiler expects it.
    pub map_entries: BTreeMap<String, u64>,
    pub apply_rpc: Vec<Duration>,
    /// From the Apply returning to the first probe of the new rule arriving.
    pub apply_to_enforced: Vec<Duration>,
    /// Probes sent per apply until one arrived.
    pub probes: Vec<u32>,
    /// One-way probe time with nothing changing: the floor of `apply_to_enforced`.
    pub probe_floor: Vec<Duration>,
    /// The agent's own account of each single-rule Apply commit, by phase.
    pub apply_phases: Vec<Vec<(String, u64)>>,
    /// (VmRSS, VmHWM) in kB after the first Sync, the second, and the applies.
    pub memory: [(u64, u64); 3],
}

/// One Sync of the whole state.
struct SyncRun {
    pub rpc: Duration,
    /// From sending Sync until the node was programmed: the reply, when the check that
    /// began at it found everything programmed (the agent replies once its maps are
    /// switched to), else the end of the first check that did.
    pub to_programmed: Duration,
    /// How long the passing check took (the benchmark's reading of 10,000 statuses and
    /// the metrics, not part of the agent's time).
    pub check: Duration,
    /// The agent's own account of the commit (its log): microseconds by phase.
    pub phases: Vec<(String, u64)>,
}

fn group_id(g: usize) -> String {
    format!("sg{g}")
}

/// The groups of network `n`'s ports: its big group, and small groups of the same
/// residue, so that all their remote-group rules name the same big group.
fn groups_of(n: usize) -> Vec<String> {
    let residue = n % BIG_GROUPS;
    let first = SMALL_PER_NETWORK * (n / BIG_GROUPS);
    let small = (first..first + SMALL_PER_NETWORK)
        .map(|k| BIG_GROUPS + BIG_GROUPS * k + residue)
        .filter(|g| *g < GROUPS);
    std::iter::once(residue)
        .chain(small)
        .map(group_id)
        .collect()
}

/// A group's rules, a mix in the spirit of the core's scale test: a few by remote group
/// (its big group's 1,000 members, its own members), most by remote prefix (TCP single
/// ports, UDP ranges, ICMP types, IPv6), a few from the tenants' space, everything out.
/// `generation` 1 moves every port number and prefix: every entry of the rule maps
/// changes.
fn group_rules(g: usize, generation: usize) -> Vec<pb::SecurityGroupRule> {
    use pb::{Direction::*, EtherType::*};
    (0..RULES_PER_GROUP)
        .map(|r| {
            let id = format!("sg{g}-r{r}");
            let ports = |min: usize, max: usize| {
                (
                    Some((min + generation) as u32),
                    Some((max + generation) as u32),
                )
            };
            let v4 = |third: usize| format!("172.{}.{third}.0/24", 16 + g % 16 + generation * 8);
            let (direction, ethertype, protocol, (min, max), prefix, remote_group) = match r {
                0..5 => (
                    Ingress,
                    Ipv4,
                    "tcp",
                    ports(1000 + r, 1000 + r + (r % 2) * 15),
                    String::new(),
                    group_id(g % BIG_GROUPS),
                ),
                5..10 => (
                    Ingress,
                    Ipv4,
                    "tcp",
                    ports(3000 + r, 3000 + r),
                    String::new(),
                    group_id(g),
                ),
                10..90 => match r % 4 {
                    0 => (
                        Ingress,
                        Ipv4,
                        "tcp",
                        ports(8000 + r, 8000 + r),
                        v4(r),
                        String::new(),
                    ),
                    1 => (
                        Ingress,
                        Ipv4,
                        "udp",
                        ports(5000, 5000 + r),
                        v4(r),
                        String::new(),
                    ),
                    2 => (
                        Ingress,
                        Ipv4,
                        "icmp",
                        (Some(8), None),
                        format!("192.168.{}.0/24", r + generation * 100),
                        String::new(),
                    ),
                    _ => (
                        Ingress,
                        Ipv6,
                        "tcp",
                        ports(443, 443),
                        format!("2001:db8:{g:x}:{:x}::/64", r + generation * 0x100),
                        String::new(),
                    ),
                },
                90..98 => {
                    let well_known = [22, 80, 443, 8443][r % 4];
                    (
                        Ingress,
                        Ipv4,
                        "tcp",
                        ports(well_known, well_known + r % 2),
                        "10.0.0.0/8".to_owned(),
                        String::new(),
                    )
                }
                98 => (Egress, Ipv4, "", (None, None), String::new(), String::new()),
                _ => (Egress, Ipv6, "", (None, None), String::new(), String::new()),
            };
            pb::SecurityGroupRule {
                port_range_min: min,
                port_range_max: max,
                remote_ip_prefix: prefix,
                remote_group_id: remote_group,
                revision_number: 1 + generation as u64,
                ..rule(&id, direction, ethertype, protocol)
            }
        })
        .collect()
}

/// The probe group at `revision`: UDP to `port` from network 0's subnet.
fn probe_group(revision: u64, port: u16) -> pb::SecurityGroup {
    let probe = pb::SecurityGroupRule {
        port_range_min: Some(u32::from(port)),
        port_range_max: Some(u32::from(port)),
        remote_ip_prefix: "10.0.0.0/16".to_owned(),
        revision_number: revision,
        ..rule(
            PROBE_RULE,
            pb::Direction::Ingress,
            pb::EtherType::Ipv4,
            "udp",
        )
    };
    pb::SecurityGroup {
        revision_number: revision,
        ..security_group(PROBE_GROUP, true, vec![probe])
    }
}

/// Whether port `index` is one of the `local` bound to this node: the first ports of
/// every network are, so that every network, and every group, has local ports.
fn is_local(index: usize, local: usize) -> bool {
    let (n, j) = (index / PORTS_PER_NETWORK, index % PORTS_PER_NETWORK);
    j * NETWORKS + n < local
}

fn port_id(index: usize) -> String {
    format!("port{index:05}")
}

/// The port's device in the node namespace, and its veth peer's name.
fn device(index: usize) -> (String, String) {
    (format!("cp{index}"), format!("cq{index}"))
}

fn port_mac(index: usize) -> [u8; 6] {
    let (n, j) = (index / PORTS_PER_NETWORK, index % PORTS_PER_NETWORK);
    [0xfa, 0x16, 0x3e, n as u8, 0, j as u8]
}

/// `generation` 1 moves every port but the probe VMs (whose own addresses stay).
fn port_address(index: usize, generation: usize) -> Ipv4Addr {
    let (n, j) = (index / PORTS_PER_NETWORK, index % PORTS_PER_NETWORK);
    let moved = index != PROBE_SENDER && index != PROBE_RECEIVER;
    Ipv4Addr::new(
        10,
        n as u8,
        u8::from(moved) * generation as u8,
        10 + j as u8,
    )
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Ports 0 and 1 (network 0) are VMs: a sends the probes, b receives them.
const PROBE_SENDER: usize = 0;
const PROBE_RECEIVER: usize = 1;

/// The whole desired state, as the API server would sync it. `generation` 1 has the
/// same resources and devices, and every rule, port address and floating IP address
/// moved (revisions one up): nearly every map entry changes, no device does.
/// `local` ports are bound to this node (see [`is_local`]), the others to another.
fn desired_state(generation: usize, local: usize) -> Vec<pb::Resource> {
    let revision = 1 + generation as u64;
    let mut resources: Vec<pb::Resource> = (0..GROUPS)
        .map(|g| {
            pb::SecurityGroup {
                revision_number: revision,
                ..security_group(&group_id(g), true, group_rules(g, generation))
            }
            .into_resource()
        })
        .collect();
    resources.push(probe_group(revision, PROBE_PORTS[0]).into_resource());
    resources.push(external_network("ext").into_resource());
    resources.push(
        pb::Subnet {
            gateway_ip: EXTERNAL_GATEWAY.to_owned(),
            ..subnet("ext-v4", "ext", "100.64.0.0/16")
        }
        .into_resource(),
    );
    let mut interfaces = Vec::new();
    for n in 0..NETWORKS {
        let (net, sub) = (format!("n{n}"), format!("s{n}"));
        resources.push(network(&net).into_resource());
        resources.push(subnet(&sub, &net, &format!("10.{n}.0.0/16")).into_resource());
        let router_if = format!("r-n{n}");
        resources.push(
            router_port(
                &router_if,
                &net,
                &mac_text([0xfa, 0x16, 0x3e, n as u8, 0xff, 1]),
                &[(&sub, &format!("10.{n}.0.1"))],
            )
            .into_resource(),
        );
        interfaces.push((sub, router_if));
        let groups = groups_of(n);
        for j in 0..PORTS_PER_NETWORK {
            let index = n * PORTS_PER_NETWORK + j;
            let mut p = port(
                &port_id(index),
                &net,
                &mac_text(port_mac(index)),
                &[(
                    &format!("s{n}"),
                    &port_address(index, generation).to_string(),
                )],
                if is_local(index, local) {
                    NODE
                } else {
                    OTHER_NODE
                },
                &device(index).0,
            );
            p.revision_number = revision;
            p.security_group_ids = groups.clone();
            if index == PROBE_RECEIVER {
                p.security_group_ids.push(PROBE_GROUP.to_owned());
            }
            resources.push(p.into_resource());
        }
    }
    resources.push(
        gateway_port(
            "r-gw",
            "r",
            "ext",
            "fa:16:3e:ff:ff:01",
            &[("ext-v4", ROUTER_ADDRESS)],
        )
        .into_resource(),
    );
    let interfaces: Vec<(&str, &str)> = interfaces
        .iter()
        .map(|(s, p)| (s.as_str(), p.as_str()))
        .collect();
    resources.push(
        with_gateway(
            router("r", &interfaces),
            "ext",
            "ext-v4",
            ROUTER_ADDRESS,
            true,
        )
        .into_resource(),
    );
    for index in 0..PORTS {
        let address = format!(
            "100.64.{}.{}",
            1 + index / 250 + 100 * generation,
            1 + index % 250
        );
        resources.push(
            pb::FloatingIp {
                revision_number: revision,
                ..floating_ip(&format!("fip{index:05}"), "ext", &address, &port_id(index))
            }
            .into_resource(),
        );
    }
    resources
}

/// The node: its namespace with the port devices, the outside (the external subnet's
/// gateway) behind the uplink, and the two probe VMs.
struct Node {
    node: NetNs,
    _outside: NetNs,
    sender: Vm,
    receiver: Vm,
}

fn build_node(local: usize) -> Result<(Node, Duration)> {
    let node = NetNs::new("cp-node")?;
    for setting in [
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ] {
        node.exec_ok(&["sysctl", "-q", "-w", setting])?;
    }
    let outside = NetNs::new("cp-out")?;
    node.add_veth(UPLINK, Some(&outside), OUTSIDE_DEV)?;
    outside.ip(&[
        "addr",
        "add",
        &format!("{EXTERNAL_GATEWAY}/16"),
        "dev",
        OUTSIDE_DEV,
    ])?;

    let mut vms = Vec::new();
    for index in [PROBE_SENDER, PROBE_RECEIVER] {
        let address = format!("{}/16", port_address(index, 0)).parse()?;
        vms.push(Vm::create(
            &node,
            &format!("cp-vm{index}"),
            &device(index).0,
            port_mac(index),
            &[address],
        )?);
    }
    let receiver = vms.pop().context("two VMs")?;
    let sender = vms.pop().context("two VMs")?;
    // No ARP in the measurement.
    sender.ns.ip(&[
        "neigh",
        "add",
        &port_address(PROBE_RECEIVER, 0).to_string(),
        "lladdr",
        &mac_text(receiver.mac),
        "dev",
        dataplane_tests::topology::VM_DEV,
    ])?;

    let started = Instant::now();
    let mut batch = String::new();
    let veths = (0..PORTS).filter(|index| {
        is_local(*index, local) && *index != PROBE_SENDER && *index != PROBE_RECEIVER
    });
    for index in veths.clone() {
        let (dev, peer) = device(index);
        batch += &format!("link add {dev} type veth peer name {peer}\n");
    }
    for index in veths {
        let (dev, peer) = device(index);
        batch += &format!("link set {dev} up\nlink set {peer} up\n");
    }
    let mut ip = Command::new("ip")
        .args(["-n", node.name(), "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("ip -batch")?;
    ip.stdin
        .take()
        .context("ip's stdin")?
        .write_all(batch.as_bytes())?;
    let status = ip.wait()?;
    ensure!(
        status.success(),
        "ip -batch creating the port devices: {status}"
    );
    let created = started.elapsed();
    Ok((
        Node {
            node,
            _outside: outside,
            sender,
            receiver,
        },
        created,
    ))
}

/// What the agent's compiler makes of `resources` on this node: the entry counts every
/// map must reach.
fn expected(node: &NetNs, resources: &[pb::Resource], local: usize) -> Result<Compiled> {
    let state = State::replace(resources_from_proto(resources.to_vec())?)?;
    let names: Vec<String> = (0..PORTS)
        .filter(|index| is_local(*index, local))
        .map(|index| device(index).0)
        .collect();
    let (interfaces, uplink) = node.run(|| -> Result<_> {
        let mut interfaces = BTreeMap::new();
        for name in &names {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("no device {name}"))?;
            interfaces.insert(name.clone(), ifindex);
        }
        let uplink = nix::net::if_::if_nametoindex(UPLINK)?;
        Ok((interfaces, uplink))
    })??;
    let uplink = Uplink {
        ifindex: uplink,
        snat_port_min: 1024,
        snat_port_count: 64512,
        // Any MAC: only whether the gateway is resolved changes what is programmed.
        gateway_macs: BTreeMap::from([(
            EXTERNAL_GATEWAY.parse::<IpAddr>()?,
            MacAddr([2, 0, 0, 0, 0, 1]),
        )]),
    };
    let peers: BTreeSet<u32> = [PROBE_SENDER, PROBE_RECEIVER]
        .iter()
        .map(|index| interfaces[&device(*index).0])
        .collect();
    let limits = MapLimits::for_node(
        MAX_PORTS,
        dataplane_agent::config::DEFAULT_CONNTRACK_ENTRIES,
    );
    Ok(compile(
        &state,
        &NodeView {
            node_name: NODE,
            interfaces: &interfaces,
            peer_devices: &peers,
            uplink: Some(&uplink),
        },
        &mut Slots::new(SlotLimits {
            max_ports: MAX_PORTS,
            max_networks: MAX_PORTS,
            max_rules: limits.max_rules,
        }),
    ))
}

/// (full-length, other) entries of an LPM table the agent writes into a host map and a
/// trie (see `dataplane_abi::policy`).
fn hosts<K, V>(table: &BTreeMap<(u32, K), V>, full_bits: u32) -> (usize, usize) {
    let host = table.keys().filter(|(bits, _)| *bits == full_bits).count();
    (host, table.len() - host)
}

/// The entry count of each agent-written map the compiled tables give.
fn table_sizes(compiled: &Compiled) -> BTreeMap<String, u64> {
    use dataplane_abi::map_names as m;
    let t = &compiled.tables;
    [
        (m::PORTS, t.ports.len()),
        (m::PORT_MACS, t.port_macs.len()),
        (m::PORT_IP4, t.port_ip4.len()),
        (m::PORT_NET4, t.port_net4.len()),
        (m::PORT_IP6, t.port_ip6.len()),
        (m::PORT_NET6, t.port_net6.len()),
        (m::FDB, t.fdb.len()),
        (m::FLOOD, t.flood.len()),
        (m::SG_REMOTE4, hosts(&t.sg_remote4, REMOTE4_FULL_BITS).1),
        (m::SG_HOST4, hosts(&t.sg_remote4, REMOTE4_FULL_BITS).0),
        (m::SG_REMOTE6, hosts(&t.sg_remote6, REMOTE6_FULL_BITS).1),
        (m::SG_HOST6, hosts(&t.sg_remote6, REMOTE6_FULL_BITS).0),
        (m::SG_RULES, hosts(&t.sg_rules, RULE_LOOKUP_BITS).1),
        (m::SG_RULE_PORTS, hosts(&t.sg_rules, RULE_LOOKUP_BITS).0),
        (m::ROUTER_IFS, t.router_ifs.len()),
        (m::ROUTES4, t.routes4.len()),
        (m::ROUTES6, t.routes6.len()),
        (m::NEIGH4, t.neigh4.len()),
        (m::NEIGH6, t.neigh6.len()),
        (m::ROUTER_GW, t.router_gw.len()),
        (m::ROUTER_GW6, t.router_gw6.len()),
        (m::GATEWAY_MACS, t.gateway_macs.len()),
        (m::EXT_ADDRS4, t.ext_addrs4.len()),
        (m::EXT_ADDRS6, t.ext_addrs6.len()),
        (m::FIPS4, t.fips4.len()),
        (m::FIP_OF4, t.fip_of4.len()),
    ]
    .into_iter()
    .map(|(name, entries)| (name.to_owned(), entries as u64))
    .collect()
}

async fn client(agent: &Agent) -> Result<DataplaneClient<Channel>> {
    Ok(agent
        .client()
        .await?
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// What the node must show once programmed: every map's entry count, and the status
/// of every port and floating IP.
struct Expected {
    fill: BTreeMap<String, u64>,
    /// By (kind, id): the status kind (`pb::Status`).
    statuses: BTreeMap<(i32, String), i32>,
}

/// Whether the node is programmed: every port and floating IP with its expected status
/// (ACTIVE for the local ones), every map at its expected fill. `Err` with what is not,
/// yet.
async fn programmed(
    client: &mut DataplaneClient<Channel>,
    node: &NetNs,
    expected: &Expected,
) -> Result<std::result::Result<BTreeMap<String, u64>, String>> {
    let ports = client
        .list_ports(pb::ListRequest {})
        .await?
        .into_inner()
        .ports;
    let fips = client
        .list_floating_ips(pb::ListRequest {})
        .await?
        .into_inner()
        .floating_ips;
    let port_kind = pb::ResourceKind::Port as i32;
    let fip_kind = pb::ResourceKind::FloatingIp as i32;
    let listed = ports
        .iter()
        .map(|p| (port_kind, p.port.as_ref().map(|p| p.id.clone()), &p.status))
        .chain(fips.iter().map(|f| {
            (
                fip_kind,
                f.floating_ip.as_ref().map(|f| f.id.clone()),
                &f.status,
            )
        }));
    let mut seen = 0;
    for (kind, id, status) in listed {
        let id = id.unwrap_or_default();
        let got = status.as_ref().map(|s| s.status);
        let want = expected.statuses.get(&(kind, id.clone()));
        if got != want.copied() {
            return Ok(Err(format!("{id} is {status:?}, want {want:?}")));
        }
        seen += 1;
    }
    if seen != expected.statuses.len() {
        return Ok(Err(format!(
            "{seen} ports and floating IPs listed, want {}",
            expected.statuses.len()
        )));
    }
    let address: SocketAddr = METRICS.parse()?;
    let scrape = scrape_metrics(node, address)?;
    let mut fill = BTreeMap::new();
    for (map, want) in &expected.fill {
        let series = format!("dataplane_map_entries{{map=\"{map}\"}}");
        let got = metric(&scrape, &series).with_context(|| format!("no {series}"))? as u64;
        if got != *want {
            return Ok(Err(format!("{map} has {got} entries, want {want}")));
        }
        fill.insert(map.clone(), got);
    }
    Ok(Ok(fill))
}

/// Entries in the kernel's maps, read back from the agent's pins.
fn kernel_entries(pins: &Path) -> Result<Vec<(&'static str, usize)>> {
    use aya::maps::{lpm_trie::LpmTrie, HashMap, Map, MapData};
    use dataplane_abi::map_names as m;
    let open = |name: &str| {
        MapData::from_pin(pins.join(name)).with_context(|| format!("opening pinned {name}"))
    };
    fn keys<T, E>(keys: impl Iterator<Item = std::result::Result<T, E>>) -> Result<usize>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut count = 0;
        for key in keys {
            key?;
            count += 1;
        }
        Ok(count)
    }
    let ports: HashMap<_, u32, PortInfo> = HashMap::try_from(Map::HashMap(open(m::PORTS)?))?;
    let fdb: HashMap<_, FdbKey, FdbEntry> = HashMap::try_from(Map::HashMap(open(m::FDB)?))?;
    let fips: HashMap<_, [u8; 4], FloatingIp4> = HashMap::try_from(Map::HashMap(open(m::FIPS4)?))?;
    let remote4: LpmTrie<_, RemoteKey4, u32> =
        LpmTrie::try_from(Map::LpmTrie(open(m::SG_REMOTE4)?))?;
    let rules: LpmTrie<_, RuleKey, u32> = LpmTrie::try_from(Map::LpmTrie(open(m::SG_RULES)?))?;
    let host4: HashMap<_, RemoteKey4, u32> = HashMap::try_from(Map::HashMap(open(m::SG_HOST4)?))?;
    let rule_ports: HashMap<_, RuleKey, u32> =
        HashMap::try_from(Map::HashMap(open(m::SG_RULE_PORTS)?))?;
    Ok(vec![
        (m::PORTS, keys(ports.keys())?),
        (m::FDB, keys(fdb.keys())?),
        (m::FIPS4, keys(fips.keys())?),
        (m::SG_REMOTE4, keys(remote4.keys())?),
        (m::SG_HOST4, keys(host4.keys())?),
        (m::SG_RULES, keys(rules.keys())?),
        (m::SG_RULE_PORTS, keys(rule_ports.keys())?),
    ])
}

/// (VmRSS, VmHWM) of `pid` in kB.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The agent's log without its terminal colours.
fn plain(logs: &str) -> String {
    let mut out = String::with_capacity(logs.len());
    let mut chars = logs.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, up to a final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The phase timings (`*_us`) of the agent's commits of `operation`, oldest first.
fn commit_phases(logs: &str, operation: &str) -> Vec<Vec<(String, u64)>> {
    let quoted = format!("operation=\"{operation}\"");
    let bare = format!("operation={operation}");
    plain(logs)
        .lines()
        .filter(|line| line.contains(" committed"))
        .filter(|line| {
            line.split_whitespace()
                .any(|word| word == quoted || word == bare)
        })
        .map(|line| {
            line.split_whitespace()
                .filter_map(|word| word.split_once('='))
                .filter(|(key, _)| key.ends_with("_us"))
                .filter_map(|(key, value)| Some((key.to_owned(), value.parse().ok()?)))
                .collect()
        })
        .collect()
}

/// Seconds since midnight of a log line's timestamp (`2026-01-01T12:34:56.789012Z`).
fn log_time(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let mut fields = time.trim_end_matches('Z').split(':');
    let hours: f64 = fields.next()?.parse().ok()?;
    let minutes: f64 = fields.next()?.parse().ok()?;
    let seconds: f64 = fields.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// How many ports the agent logged as attached, and the time from the first to the last.
fn attach_span(logs: &str) -> (usize, Duration) {
    let times: Vec<f64> = plain(logs)
        .lines()
        .filter(|line| line.contains(" attached "))
        .filter_map(log_time)
        .collect();
    let span = match (times.first(), times.last()) {
        (Some(first), Some(last)) if last >= first => Duration::from_secs_f64(last - first),
        _ => Duration::ZERO,
    };
    (times.len(), span)
}

/// The receiving sockets of VM b, one per probe port.
struct Receivers(Vec<UdpSocket>);

impl Receivers {
    fn bind(vm: &Vm) -> Result<Receivers> {
        let mut sockets = Vec::new();
        for port in PROBE_PORTS {
            let address = SocketAddr::new(port_address(PROBE_RECEIVER, 0).into(), port);
            let socket = vm.ns.run(move || UdpSocket::bind(address))??;
            socket.set_nonblocking(true)?;
            sockets.push(socket);
        }
        Ok(Receivers(sockets))
    }

    fn socket(&self, port: u16) -> &UdpSocket {
        &self.0[usize::from(port == PROBE_PORTS[1])]
    }

    /// Waits up to `wait` for the datagram `tag` on `port`; older ones are skipped.
    fn arrived(&self, port: u16, tag: u64, wait: Duration) -> Result<Option<Instant>> {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 16];
        loop {
            match self.socket(port).recv(&mut buf) {
                Ok(8) if u64::from_be_bytes(buf[..8].try_into()?) == tag => {
                    return Ok(Some(Instant::now()))
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::hint::spin_loop();
        }
    }
}

/// Sends datagram `tag` from a fresh source port of VM a (the calling thread must be in
/// its namespace) to `port` of VM b: each probe is a new flow, which conntrack has not
/// seen.
fn probe(tag: u64, port: u16) -> Result<Instant> {
    let socket = UdpSocket::bind(SocketAddr::new(port_address(PROBE_SENDER, 0).into(), 0))?;
    let sent = Instant::now();
    socket.send_to(
        &tag.to_be_bytes(),
        SocketAddr::new(port_address(PROBE_RECEIVER, 0).into(), port),
    )?;
    Ok(sent)
}

/// Sends probes to `port` until one arrives; when it does, and how many were sent.
fn first_arrival(receivers: &Receivers, port: u16, tag: &mut u64) -> Result<(Instant, u32)> {
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let mut sent = 0;
    loop {
        *tag += 1;
        probe(*tag, port)?;
        sent += 1;
        if let Some(at) = receivers.arrived(port, *tag, Duration::from_micros(200))? {
            return Ok((at, sent));
        }
        if Instant::now() > deadline {
            bail!("no probe to UDP {port} arrived within {PROBE_TIMEOUT:?} ({sent} sent)");
        }
    }
}

/// Fails if a probe to `port` arrives: the rule no longer allows it.
fn refused(receivers: &Receivers, port: u16, tag: &mut u64) -> Result<()> {
    *tag += 1;
    probe(*tag, port)?;
    ensure!(
        receivers.arrived(port, *tag, REFUSED_WAIT)?.is_none(),
        "a probe to UDP {port} arrived though the rule no longer allows it"
    );
    Ok(())
}

/// What the compiler makes of `resources`, checked to program every local port, every
/// rule and the local ports' floating IPs.
fn expected_state(node: &NetNs, resources: &[pb::Resource], local: usize) -> Result<Expected> {
    let rules: usize = resources
        .iter()
        .filter_map(|r| match &r.kind {
            Some(pb::resource::Kind::SecurityGroup(g)) => Some(g.rules.len()),
            _ => None,
        })
        .sum();
    let compiled = expected(node, resources, local)?;
    ensure!(
        compiled.ports.len() == local,
        "the compiler programs {} ports, not {local}",
        compiled.ports.len()
    );
    ensure!(
        compiled.rules.len() == rules,
        "the compiler gives {} rules slots, not all {rules}",
        compiled.rules.len()
    );
    ensure!(
        compiled.tables.fips4.len() == local,
        "the compiler programs {} floating IPs, not {local}",
        compiled.tables.fips4.len()
    );
    let statuses: BTreeMap<(i32, String), i32> = compiled
        .statuses
        .iter()
        .filter_map(|(reference, status)| {
            let kind = match reference.kind {
                ResourceKind::Port => pb::ResourceKind::Port,
                ResourceKind::FloatingIp => pb::ResourceKind::FloatingIp,
                _ => return None,
            };
            let status = match status.status {
                StatusKind::Active => pb::Status::Active,
                StatusKind::Down => pb::Status::Down,
                StatusKind::Build => pb::Status::Build,
                StatusKind::Error => pb::Status::Error,
            };
            Some(((kind as i32, reference.id.clone()), status as i32))
        })
        .collect();
    let active = |kind: pb::ResourceKind| {
        statuses
            .iter()
            .filter(|((k, _), s)| *k == kind as i32 && **s == pb::Status::Active as i32)
            .count()
    };
    // Every local port and its floating IP, and the router's ports (on every node).
    ensure!(
        active(pb::ResourceKind::Port) == local + NETWORKS + 1
            && active(pb::ResourceKind::FloatingIp) == local,
        "the compiler has {} ports and {} floating IPs ACTIVE, want {} and {local}",
        active(pb::ResourceKind::Port),
        active(pb::ResourceKind::FloatingIp),
        local + NETWORKS + 1
    );
    Ok(Expected {
        fill: table_sizes(&compiled),
        statuses,
    })
}

/// Syncs `resources` and waits until the node is checked to be programmed as
/// `expected`; the map fill `/metrics` then reported.
fn sync(
    runtime: &tokio::runtime::Runtime,
    grpc: &mut DataplaneClient<Channel>,
    node: &NetNs,
    agent: &Agent,
    resources: &[pb::Resource],
    expected: &Expected,
    log: &impl Fn(&str),
) -> Result<(SyncRun, BTreeMap<String, u64>)> {
    // Built before the clock starts: the copy is the benchmark's, not the API server's.
    let request = pb::SyncRequest {
        resources: resources.to_vec(),
    };
    let started = Instant::now();
    runtime.block_on(grpc.sync(request)).context("Sync")?;
    let rpc = started.elapsed();
    log(&format!("control plane: Sync returned after {rpc:.2?}"));
    let returned = Instant::now();
    let mut first_pass = true;
    loop {
        let check_started = Instant::now();
        let outcome = runtime.block_on(programmed(grpc, node, expected))?;
        let check = check_started.elapsed();
        match outcome {
            Ok(fill) => {
                let phases = commit_phases(&agent.logs(), "sync")
                    .pop()
                    .unwrap_or_default();
                for (map, entries) in kernel_entries(&agent.active_set_maps()?)? {
                    let want = expected.fill[map];
                    ensure!(
                        entries as u64 == want,
                        "the kernel's {map} holds {entries} entries, want {want}"
                    );
                }
                let run = SyncRun {
                    rpc,
                    to_programmed: if first_pass {
                        rpc
                    } else {
                        check_started - started + check
                    },
                    check,
                    phases,
                };
                return Ok((run, fill));
            }
            Err(missing) if returned.elapsed() > PROGRAMMED_TIMEOUT => {
                bail!("not programmed {PROGRAMMED_TIMEOUT:?} after Sync returned: {missing}")
            }
            Err(missing) => log(&format!("control plane: not yet: {missing}")),
        }
        first_pass = false;
    }
}

pub fn run(applies: usize, local: usize, log: impl Fn(&str), json: &mut Vec<String>) -> Result<()> {
    ensure!(
        (2 * NETWORKS..=PORTS).contains(&local),
        "local ports: {local} is not between {} (two a network: the probe VMs are the \
         first network's first two) and {PORTS}",
        2 * NETWORKS
    );
    let states = [desired_state(0, local), desired_state(1, local)];
    let rules: usize = states[0]
        .iter()
        .filter_map(|r| match &r.kind {
            Some(pb::resource::Kind::SecurityGroup(g)) => Some(g.rules.len()),
            _ => None,
        })
        .sum();
    log(&format!(
        "control plane: {local} of {PORTS} ports on this node; creating their devices ({} veth pairs and 2 VMs)",
        local - 2
    ));
    let (node, created) = build_node(local)?;
    log(&format!("control plane: devices created in {created:.2?}"));
    let expected = [
        expected_state(&node.node, &states[0], local)?,
        expected_state(&node.node, &states[1], local)?,
    ];
    log(&format!(
        "control plane: expected map fill {:?}",
        expected[0].fill
    ));

    let runtime = tokio::runtime::Runtime::new()?;
    let agent = runtime.block_on(Agent::start_with(
        &node.node,
        NODE,
        &[
            "--max-ports",
            &MAX_PORTS.to_string(),
            "--uplink",
            UPLINK,
            "--metrics",
            METRICS,
        ],
    ))?;
    let pid = agent.pid().context("agent not running")?;
    let mut grpc = runtime.block_on(client(&agent))?;

    // 1. Sync: first onto devices without programs, then every entry moved.
    let (cold, _) = sync(
        &runtime,
        &mut grpc,
        &node.node,
        &agent,
        &states[0],
        &expected[0],
        &log,
    )?;
    let attached = attach_span(&agent.logs());
    let after_cold = memory(pid)?;
    let (warm, map_entries) = sync(
        &runtime,
        &mut grpc,
        &node.node,
        &agent,
        &states[1],
        &expected[1],
        &log,
    )?;
    let after_warm = memory(pid)?;
    let kernel_entries = kernel_entries(&agent.active_set_maps()?)?;
    let mut resync_rpc = Vec::new();
    for _ in 0..3 {
        let request = pb::SyncRequest {
            resources: states[1].clone(),
        };
        let started = Instant::now();
        runtime.block_on(grpc.sync(request)).context("Sync again")?;
        resync_rpc.push(started.elapsed());
    }

    // 2. Single-rule Applies, probed from VM a's namespace (its sockets are made there).
    let receivers = Receivers::bind(&node.receiver)?;
    let socket = agent.socket().to_owned();
    let (apply_rpc, apply_to_enforced, probes, probe_floor) =
        node.sender.ns.run(|| -> Result<_> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut grpc = runtime.block_on(dataplane_agent::client::connect_unix(&socket))?;
            let mut tag = 0;
            // The rule allows the first port, not the second; the floor: probes with
            // nothing changing.
            let mut floor = Vec::new();
            for _ in 0..50 {
                tag += 1;
                let sent = probe(tag, PROBE_PORTS[0])?;
                let at = receivers
                    .arrived(PROBE_PORTS[0], tag, PROBE_TIMEOUT)?
                    .context("a probe to the allowed port did not arrive")?;
                floor.push(at - sent);
            }
            refused(&receivers, PROBE_PORTS[1], &mut tag)?;
            let (mut rpc, mut enforced, mut probes) = (vec![], vec![], vec![]);
            for i in 0..applies {
                let (old, new) = (PROBE_PORTS[i % 2], PROBE_PORTS[(i + 1) % 2]);
                let change = upsert(probe_group(10 + i as u64, new));
                let started = Instant::now();
                runtime
                    .block_on(grpc.apply(pb::ApplyRequest {
                        changes: vec![change],
                    }))
                    .context("Apply")?;
                let returned = Instant::now();
                let (at, sent) = first_arrival(&receivers, new, &mut tag)?;
                rpc.push(returned - started);
                enforced.push(at - returned);
                probes.push(sent);
                refused(&receivers, old, &mut tag)?;
            }
            Ok((rpc, enforced, probes, floor))
        })??;
    let after_applies = memory(pid)?;
    let apply_phases = commit_phases(&agent.logs(), "apply");
    let results = Results {
        ports: PORTS,
        local,
        rules,
        floating_ips: PORTS,
        devices: (local, created),
        cold,
        attached,
        warm,
        resync_rpc,
        kernel_entries,
        map_entries,
        apply_rpc,
        apply_to_enforced,
        probes,
        probe_floor,
        apply_phases,
        memory: [after_cold, after_warm, after_applies],
    };
    // Reported before the agent stops: its exit closes every tcx link, and the kernel
    // takes minutes to detach them all.
    report(&results, json);
    log(&format!(
        "control plane: stopping the agent ({local} ports' links to detach)"
    ));
    drop(agent);
    Ok(())
}

/// The `q`-quantile (0..=1) of `samples`, nearest rank.
fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn phase_line(label: &str, phases: &[(String, u64)]) {
    let words: Vec<String> = phases
        .iter()
        .map(|(phase, micros)| {
            format!(
                "{} {:.1}",
                phase.trim_end_matches("_us"),
                *micros as f64 / 1e3
            )
        })
        .collect();
    println!("  {label} (ms): {}", words.join(", "));
}

fn phases_json(phases: &[(String, u64)]) -> String {
    let fields: Vec<String> = phases
        .iter()
        .map(|(phase, micros)| format!("\"{phase}\":{micros}"))
        .collect();
    format!("{{{}}}", fields.join(","))
}

fn report(results: &Results, json: &mut Vec<String>) {
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "\nControl plane: the agent binary over gRPC; {} ports, {} of them bound to this \
         node, each with its device (created in {:.1} s), {} security-group rules, {} \
         floating IPs",
        results.ports,
        results.local,
        results.devices.1.as_secs_f64(),
        results.rules,
        results.floating_ips
    );
    println!("{:<62} {:>16} {:>14}", "measure", "value", "target");
    for (name, run, target) in [
        (
            "first Sync (programs to attach to every device)",
            &results.cold,
            false,
        ),
        (
            "second Sync (every entry moved, devices attached)",
            &results.warm,
            true,
        ),
    ] {
        println!("{name}");
        println!("{:<62} {:>13.1} ms", "  Sync RPC latency", ms(run.rpc));
        let ok = run.to_programmed < Duration::from_secs(1);
        println!(
            "{:<62} {:>13.1} ms {:>14}",
            "  Sync sent -> programmed (ports, FIPs, map fill checked)",
            ms(run.to_programmed),
            if target {
                format!("<1 s {}", verdict(ok))
            } else {
                format!("({})", verdict(ok))
            }
        );
        println!(
            "{:<62} {:>13.1} ms",
            "    the check that confirmed it (not counted if at the reply)",
            ms(run.check)
        );
        phase_line("agent's commit", &run.phases);
    }
    println!(
        "  first Sync: {} ports' programs attached over {:.1} s ({:.1} ms a port)",
        results.attached.0,
        results.attached.1.as_secs_f64(),
        ms(results.attached.1) / results.attached.0.max(1) as f64
    );
    println!(
        "{:<62} {:>13.1} ms",
        "Sync of the same state again (median of 3)",
        ms(quantile(&results.resync_rpc, 0.5))
    );
    let (p50_rpc, p99_rpc) = (
        quantile(&results.apply_rpc, 0.5),
        quantile(&results.apply_rpc, 0.99),
    );
    let (p50, p99) = (
        quantile(&results.apply_to_enforced, 0.5),
        quantile(&results.apply_to_enforced, 0.99),
    );
    let n = results.apply_rpc.len();
    println!("single-rule Apply under that state, {n} applies");
    println!(
        "{:<62} {:>6.2} / {:>6.2} ms",
        "  Apply RPC latency, p50 / p99",
        ms(p50_rpc),
        ms(p99_rpc)
    );
    let returned_ok = p99 < Duration::from_millis(5);
    println!(
        "{:<62} {:>6.3} / {:>6.3} ms {:>14}",
        "  Apply returned -> probe of the new rule arrived, p50 / p99",
        ms(p50),
        ms(p99),
        format!("<5 ms {}", verdict(returned_ok))
    );
    let sent_ok = quantile(
        &results
            .apply_rpc
            .iter()
            .zip(&results.apply_to_enforced)
            .map(|(rpc, enforced)| *rpc + *enforced)
            .collect::<Vec<_>>(),
        0.99,
    );
    println!(
        "{:<62} {:>13.2} ms {:>14}",
        "  Apply sent -> probe arrived, p99",
        ms(sent_ok),
        format!("({})", verdict(sent_ok < Duration::from_millis(5)))
    );
    println!(
        "{:<62} {:>6.3} / {:>6.3} ms",
        "  floor: one probe with nothing changing, p50 / p99",
        ms(quantile(&results.probe_floor, 0.5)),
        ms(quantile(&results.probe_floor, 0.99))
    );
    let first_try = results.probes.iter().filter(|p| **p == 1).count();
    println!(
        "{:<62} {:>16}",
        "  applies whose first probe already passed",
        format!("{first_try} of {n}")
    );
    let mut medians = BTreeMap::<String, Vec<u64>>::new();
    for phases in &results.apply_phases {
        for (phase, micros) in phases {
            medians.entry(phase.clone()).or_default().push(*micros);
        }
    }
    let median_phases: Vec<(String, u64)> = medians
        .into_iter()
        .map(|(phase, mut values)| {
            values.sort_unstable();
            (phase, values[values.len() / 2])
        })
        .collect();
    phase_line("agent's Apply commit, medians", &median_phases);
    let mb = |kb: u64| kb as f64 / 1024.0;
    let [cold, warm, applies] = results.memory;
    let memory_ok = applies.1 < 250 * 1024;
    for (label, (rss, hwm)) in [
        ("after the first Sync", cold),
        ("after the second Sync", warm),
        ("after the Applies", applies),
    ] {
        println!(
            "{:<62} {:>6.1} / {:>6.1} MB",
            format!("agent VmRSS / VmHWM {label}"),
            mb(rss),
            mb(hwm)
        );
    }
    println!(
        "{:<62} {:>16} {:>14}",
        "agent peak memory (VmHWM)",
        format!("{:.1} MB", mb(applies.1)),
        format!("<250 MB {}", verdict(memory_ok))
    );
    let kernel: Vec<String> = results
        .kernel_entries
        .iter()
        .map(|(map, entries)| format!("{map} {entries}"))
        .collect();
    println!(
        "map entries read back from the kernel: {}",
        kernel.join(", ")
    );
    let fill: Vec<String> = results
        .map_entries
        .iter()
        .filter(|(_, entries)| **entries > 0)
        .map(|(map, entries)| format!("{map} {entries}"))
        .collect();
    println!(
        "map fill (/metrics, as the compiler expects): {}",
        fill.join(", ")
    );

    for (case, run) in [("first", &results.cold), ("second", &results.warm)] {
        json.push(format!(
            "{{\"case\":\"control plane {case} sync\",\"ports\":{},\"local_ports\":{},\
             \"rules\":{},\"floating_ips\":{},\"sync_rpc_ms\":{:.2},\"sync_to_programmed_ms\":{:.2},\
             \"check_ms\":{:.2},\"agent_commit_us\":{}}}",
            results.ports,
            results.local,
            results.rules,
            results.floating_ips,
            ms(run.rpc),
            ms(run.to_programmed),
            ms(run.check),
            phases_json(&run.phases),
        ));
    }
    json.push(format!(
        "{{\"case\":\"control plane resync unchanged\",\"sync_rpc_ms\":{:.2}}}",
        ms(quantile(&results.resync_rpc, 0.5))
    ));
    json.push(format!(
        "{{\"case\":\"control plane single-rule apply\",\"applies\":{n},\
         \"rpc_p50_ms\":{:.3},\"rpc_p99_ms\":{:.3},\"enforced_after_return_p50_ms\":{:.3},\
         \"enforced_after_return_p99_ms\":{:.3},\"sent_to_enforced_p99_ms\":{:.3},\
         \"probe_floor_p50_ms\":{:.3},\"agent_commit_median_us\":{}}}",
        ms(p50_rpc),
        ms(p99_rpc),
        ms(p50),
        ms(p99),
        ms(sent_ok),
        ms(quantile(&results.probe_floor, 0.5)),
        phases_json(&median_phases),
    ));
    for (label, (rss, hwm)) in [
        ("after first sync", cold),
        ("after second sync", warm),
        ("after applies", applies),
    ] {
        json.push(format!(
            "{{\"case\":\"control plane agent memory {label}\",\"vm_rss_kb\":{rss},\"vm_hwm_kb\":{hwm}}}"
        ));
    }
}

/// The control plane as a part of the suite: its figures, one sample each, as records.
pub struct ControlPlane {
    pub applies: usize,
    /// Ports bound to this node (the others to another node).
    pub local: usize,
    /// Expedited RCU grace periods while the part runs (see [`ExpeditedRcu`]).
    pub rcu_expedited: bool,
}

const RCU_EXPEDITED: &str = "/sys/kernel/rcu_expedited";

/// The kernel's `rcu_expedited` set to 1 while this lives, and put back after.
struct ExpeditedRcu {
    previous: String,
}

impl ExpeditedRcu {
    fn set() -> Result<Self> {
        let previous = std::fs::read_to_string(RCU_EXPEDITED).context(RCU_EXPEDITED)?;
        std::fs::write(RCU_EXPEDITED, "1").context(RCU_EXPEDITED)?;
        Ok(Self { previous })
    }
}

impl Drop for ExpeditedRcu {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(RCU_EXPEDITED, self.previous.trim()) {
            eprintln!(
                "could not put {RCU_EXPEDITED} back to {}: {e}",
                self.previous.trim()
            );
        }
    }
}

impl crate::results::Part for ControlPlane {
    fn name(&self) -> &'static str {
        "control-plane"
    }

    fn steps(&self) -> u64 {
        1
    }

    fn run(&mut self, ctx: &mut crate::results::Context<'_>) -> Result<()> {
        let _expedited = self.rcu_expedited.then(ExpeditedRcu::set).transpose()?;
        let mut lines = Vec::new();
        run(
            self.applies,
            self.local,
            |line| ctx.progress.note(line),
            &mut lines,
        )?;
        for line in lines {
            let figures: serde_json::Value = serde_json::from_str(&line)?;
            let case = figures["case"].as_str().unwrap_or_default().to_owned();
            let Some(fields) = figures.as_object() else {
                continue;
            };
            for (metric, value) in fields {
                let Some(value) = value.as_f64() else {
                    continue;
                };
                let unit = if metric.ends_with("_ms") {
                    "ms"
                } else if metric.ends_with("_kb") {
                    "KiB"
                } else {
                    "count"
                };
                ctx.results.add(crate::results::Record::new(
                    "control-plane",
                    "control plane at 10,000 ports",
                    &case,
                    "ours",
                    metric,
                    unit,
                    crate::results::Better::Lower,
                    vec![value],
                ));
            }
        }
        ctx.progress.step("control plane");
        Ok(())
    }
}
