//! Integration: IPv6 on an external network through the real agent, driven over gRPC,
//! with real ping, TCP and UDP between a VM namespace and an outside namespace behind
//! the node's uplink. IPv6 is routed, not translated, as in the Networking API. Needs
//! root.
//!
//! - The outside (`ext0`: 203.0.113.1/24, 2001:db8:e::1/64) is both external subnets'
//!   gateway. It routes the tenant prefix 2001:db8:1::/64 to the router's gateway
//!   address, as an upstream with a route to the tenant (BGP, prefix delegation) would.
//! - Router r1 has an interface on n1 (10.0.1.1, 2001:db8:1::1) and its gateway at
//!   203.0.113.10 and 2001:db8:e::10, SNAT on.
//! - VM a (10.0.1.5, 2001:db8:1::5) is in group `web6`: everything out; in, ICMPv6 and
//!   TCP 7000 over IPv6 only.
use std::net::SocketAddr;

use anyhow::{Context, Result};
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use dataplane_tests::{
    agent::{counters, drops, metric, scrape_metrics, wait_active, wait_status, Agent, Awaited},
    api::{
        apply, external_network, gateway_port, network, port, router, router_port, rule,
        security_group, subnet, upsert, with_gateway,
    },
    netns::NetNs,
    topology::{Vm, VM_DEV},
    traffic::{tcp_works, udp_exchange, EchoServer},
};
use tonic::transport::Channel;

const NODE: &str = "compute-1";
const UPLINK: &str = "up0";
const OUTSIDE: &str = "203.0.113.1";
const OUTSIDE6: &str = "2001:db8:e::1";
const GATEWAY: &str = "203.0.113.10";
const GATEWAY6: &str = "2001:db8:e::10";
const A: &str = "10.0.1.5";
const A6: &str = "2001:db8:1::5";
/// Where the agent serves Prometheus metrics, in the node namespace.
const METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

fn at(address: &str, port: u16) -> SocketAddr {
    SocketAddr::new(address.parse().unwrap(), port)
}

struct External6 {
    // Drop order: the agent first, then the namespaces.
    _agent: Agent,
    client: DataplaneClient<Channel>,
    a: Vm,
    outside: NetNs,
    node: NetNs,
}

fn web6_group() -> pb::SecurityGroup {
    let ingress6 = |id: &str, protocol: &str, ports: Option<(u32, u32)>| pb::SecurityGroupRule {
        remote_ip_prefix: "::/0".to_owned(),
        port_range_min: ports.map(|p| p.0),
        port_range_max: ports.map(|p| p.1),
        ..rule(id, pb::Direction::Ingress, pb::EtherType::Ipv6, protocol)
    };
    security_group(
        "web6",
        true,
        vec![
            rule("out4", pb::Direction::Egress, pb::EtherType::Ipv4, ""),
            rule("out6", pb::Direction::Egress, pb::EtherType::Ipv6, ""),
            ingress6("icmp6", "ipv6-icmp", None),
            ingress6("tcp6", "tcp", Some((7000, 7000))),
        ],
    )
}

impl External6 {
    async fn start(tag: &str) -> Result<External6> {
        let node = NetNs::new(&format!("{tag}-node"))?;
        let outside = NetNs::new(&format!("{tag}-out"))?;
        node.add_veth(UPLINK, Some(&outside), "ext0")?;
        node.set_up(UPLINK, true)?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE}/24"), "dev", "ext0"])?;
        outside.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{OUTSIDE6}/64"),
            "dev",
            "ext0",
            "nodad",
        ])?;
        outside.set_up("ext0", true)?;
        outside.ip(&["-6", "route", "add", "2001:db8:1::/64", "via", GATEWAY6])?;

        let agent = Agent::start_with(
            &node,
            NODE,
            &["--uplink", UPLINK, "--metrics", &METRICS.to_string()],
        )
        .await?;
        let mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0a];
        let a = Vm::create(
            &node,
            &format!("{tag}-a"),
            "tap-a",
            mac,
            &[format!("{A}/24").parse()?, format!("{A6}/64").parse()?],
        )?;
        a.ns.ip(&["route", "add", "default", "via", "10.0.1.1"])?;
        a.ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8:1::1",
            "dev",
            VM_DEV,
        ])?;

        let changes = vec![
            upsert(web6_group()),
            upsert(external_network("ext")),
            upsert(pb::Subnet {
                gateway_ip: OUTSIDE.to_owned(),
                ..subnet("ext-v4", "ext", "203.0.113.0/24")
            }),
            upsert(pb::Subnet {
                gateway_ip: OUTSIDE6.to_owned(),
                ..subnet("ext-v6", "ext", "2001:db8:e::/64")
            }),
            upsert(network("n1")),
            upsert(subnet("s1", "n1", "10.0.1.0/24")),
            upsert(subnet("s1v6", "n1", "2001:db8:1::/64")),
            upsert(pb::Port {
                security_group_ids: vec!["web6".to_owned()],
                ..port(
                    "port-a",
                    "n1",
                    "fa:16:3e:00:00:0a",
                    &[("s1", A), ("s1v6", A6)],
                    NODE,
                    "tap-a",
                )
            }),
            upsert(router_port(
                "r1-n1",
                "n1",
                "fa:16:3e:00:01:01",
                &[("s1", "10.0.1.1"), ("s1v6", "2001:db8:1::1")],
            )),
            upsert(gateway_port(
                "r1-gw",
                "r1",
                "ext",
                "fa:16:3e:00:0e:01",
                &[("ext-v4", GATEWAY), ("ext-v6", GATEWAY6)],
            )),
            upsert(dual_stack_gateway()),
        ];
        let mut client = agent.client().await?;
        client.apply(apply(changes)).await?;
        wait_status(&mut client, "port-a", pb::Status::Active).await?;
        // ACTIVE only once both external gateways answered: ARP and neighbour
        // discovery on the uplink both work.
        wait_active(&mut client, Awaited::Router("r1")).await?;
        Ok(External6 {
            _agent: agent,
            client,
            a,
            outside,
            node,
        })
    }
}

/// r1 with its gateway on both external subnets.
fn dual_stack_gateway() -> pb::Router {
    let mut r1 = with_gateway(
        router("r1", &[("s1", "r1-n1"), ("s1v6", "r1-n1")]),
        "ext",
        "ext-v4",
        GATEWAY,
        true,
    );
    if let Some(info) = r1.external_gateway_info.as_mut() {
        info.external_fixed_ips.push(pb::ExternalFixedIp {
            subnet_id: "ext-v6".to_owned(),
            ip_address: GATEWAY6.to_owned(),
        });
    }
    r1
}

fn ping(ns: &NetNs, to: &str) -> Result<bool> {
    Ok(ns
        .exec(&[
            "ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", "-w", "5", to,
        ])?
        .status
        .success())
}

#[tokio::test]
async fn ipv6_is_routed_to_and_from_the_outside_with_the_tenants_address() -> Result<()> {
    let mut t = External6::start("ext6").await?;
    // The gateway's IPv6 address answers neighbour discovery and ping on the uplink.
    assert!(ping(&t.outside, GATEWAY6)?, "outside -> the gateway");
    assert!(ping(&t.a.ns, GATEWAY6)?, "a -> the gateway");
    // Out and back, untranslated: the outside sees a's own address and port.
    assert!(ping(&t.a.ns, OUTSIDE6)?, "a -> the outside");
    let seen = udp_exchange(&t.a.ns, at(A6, 40000), &t.outside, at(OUTSIDE6, 7200))?;
    assert_eq!(seen, at(A6, 40000), "a leaves with its own address");
    // IPv4 beside it is still translated.
    let seen = udp_exchange(&t.a.ns, at(A, 40001), &t.outside, at(OUTSIDE, 7201))?;
    assert_eq!(seen.ip(), at(GATEWAY, 0).ip(), "IPv4 leaves through SNAT");

    // In from the outside, through a's security group.
    assert!(ping(&t.outside, A6)?, "outside -> a over IPv6");
    // A packet that expires in the router is answered from the gateway's address.
    let expired = t
        .outside
        .exec(&["ping", "-n", "-c", "1", "-t", "1", "-W", "1", A6])?;
    let text = String::from_utf8_lossy(&expired.stdout);
    assert!(
        text.contains(&format!("From {GATEWAY6} icmp_seq=1 Time exceeded")),
        "ping -t 1: {text}"
    );
    let _open = EchoServer::tcp(&t.a.ns, at(A6, 7000))?;
    assert!(tcp_works(&t.outside, at(A6, 7000)), "TCP 7000 is let in");
    let before = counters(&mut t.client, "port-a").await?;
    let _closed = EchoServer::tcp(&t.a.ns, at(A6, 7001))?;
    assert!(
        !tcp_works(&t.outside, at(A6, 7001)),
        "TCP 7001 is not let in"
    );
    let after = counters(&mut t.client, "port-a").await?;
    assert!(denied_count(&after) > denied_count(&before), "{after:?}");
    let uplink = t
        .client
        .get_port_counters(pb::GetPortCountersRequest::default())
        .await?
        .into_inner()
        .uplink
        .context("no uplink counters")?;
    assert!(uplink.rx_packets > 0 && uplink.tx_packets > 0, "{uplink:?}");

    // The same figures on the metrics endpoint, beside the tables' fill and this
    // agent's build and apply latency.
    let scrape = scrape_metrics(&t.node, METRICS)?;
    let value = |series: &str| metric(&scrape, series);
    let version = env!("CARGO_PKG_VERSION");
    let abi = dataplane_abi::ABI_VERSION;
    assert_eq!(
        value(&format!(
            "dataplane_build_info{{version=\"{version}\",abi_version=\"{abi}\"}}"
        )),
        Some(1.0),
        "{scrape}"
    );
    let denied = value("dataplane_port_drops_total{port=\"port-a\",reason=\"policy_denied\"}");
    assert!(
        denied >= Some(denied_count(&after) as f64) && denied > Some(0.0),
        "{scrape}"
    );
    assert!(
        value("dataplane_port_rx_packets_total{port=\"port-a\"}") > Some(0.0),
        "{scrape}"
    );
    assert!(
        value("dataplane_uplink_tx_packets_total") > Some(0.0),
        "{scrape}"
    );
    assert!(
        value("dataplane_snat_bindings") >= Some(1.0),
        "IPv4 went through SNAT: {scrape}"
    );
    assert!(value("dataplane_snat_capacity") > Some(0.0), "{scrape}");
    assert!(
        value("dataplane_conntrack_capacity{table=\"confirmed\"}") > Some(0.0),
        "{scrape}"
    );
    assert!(
        value("dataplane_conntrack_entries{table=\"confirmed\"}") >= Some(1.0),
        "{scrape}"
    );
    assert!(
        value("dataplane_apply_duration_seconds_count") >= Some(1.0),
        "{scrape}"
    );
    Ok(())
}

fn denied_count(counters: &pb::PortCounters) -> u64 {
    drops(counters, pb::DropReason::PolicyDenied)
}

#[tokio::test]
async fn removing_the_ipv6_leg_stops_ipv6_and_keeps_ipv4() -> Result<()> {
    let mut t = External6::start("ext6-leg").await?;
    assert!(ping(&t.a.ns, OUTSIDE6)?, "a -> the outside over IPv6");
    let mut r1 = dual_stack_gateway();
    if let Some(info) = r1.external_gateway_info.as_mut() {
        info.external_fixed_ips.truncate(1);
    }
    r1.revision_number += 1;
    t.client.apply(apply(vec![upsert(r1)])).await?;
    wait_active(&mut t.client, Awaited::Router("r1")).await?;
    assert!(!ping(&t.a.ns, OUTSIDE6)?, "no IPv6 way out any more");
    assert!(
        !ping(&t.outside, GATEWAY6)?,
        "the address is not answered for"
    );
    assert!(ping(&t.a.ns, OUTSIDE)?, "IPv4 still leaves");
    Ok(())
}
