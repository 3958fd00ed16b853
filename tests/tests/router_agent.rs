//! Integration: distributed routing through the real agent, driven over gRPC, with real
//! ping and TCP between VM namespaces on different subnets. Needs root.
//!
//! VMs a (n1: 10.0.1.5, fd00:1::5) and b (n2: 10.0.2.5, fd00:2::5) are on router r1's
//! subnets; c (n3: 10.0.3.5) is on router r2's. Each VM's default route is its
//! subnet's gateway, which the datapath answers ARP and neighbour solicitations for.
use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use dataplane_proto::v1::{self as pb};
use dataplane_tests::{
    agent::{counters, drops, wait_active, wait_status, Agent, Awaited},
    api::{apply, default_security_group, network, port, router, router_port, subnet, upsert},
    netns::NetNs,
    topology::{Vm, VM_DEV},
    traffic::{tcp_works, EchoServer},
};

const NODE: &str = "compute-1";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

struct Routed {
    // Drop order: the agent first, then the VMs, then the node namespace.
    agent: Agent,
    a: Vm,
    b: Vm,
    c: Vm,
    _node: NetNs,
}

/// (port id, network, (subnet, address) fixed IPs, device, MAC) of a VM.
type VmSpec = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
    [u8; 6],
);

const VMS: [VmSpec; 3] = [
    (
        "port-a",
        "n1",
        &[("s1", "10.0.1.5"), ("s1v6", "fd00:1::5")],
        "tap-a",
        [0xfa, 0x16, 0x3e, 0, 0, 0x0a],
    ),
    (
        "port-b",
        "n2",
        &[("s2", "10.0.2.5"), ("s2v6", "fd00:2::5")],
        "tap-b",
        [0xfa, 0x16, 0x3e, 0, 0, 0x0b],
    ),
    (
        "port-c",
        "n3",
        &[("s3", "10.0.3.5")],
        "tap-c",
        [0xfa, 0x16, 0x3e, 0, 0, 0x0c],
    ),
];

impl Routed {
    async fn start(tag: &str) -> Result<Routed> {
        let node = NetNs::new(&format!("{tag}-node"))?;
        let agent = Agent::start(&node, NODE).await?;
        let mut vms = Vec::new();
        for (i, (_, _, ips, dev, mac)) in VMS.iter().enumerate() {
            let prefixes: Vec<ipnet::IpNet> = ips
                .iter()
                .map(|(_, a)| {
                    let len = if a.contains(':') { 64 } else { 24 };
                    format!("{a}/{len}").parse()
                })
                .collect::<Result<_, _>>()?;
            let vm = Vm::create(&node, &format!("{tag}-{i}"), dev, *mac, &prefixes)?;
            let gateway4 = ips[0].1.rsplit_once('.').unwrap().0.to_owned() + ".1";
            vm.ns.ip(&["route", "add", "default", "via", &gateway4])?;
            if let Some((_, v6)) = ips.get(1) {
                let gateway6 = v6.rsplit_once(':').unwrap().0.to_owned() + ":1";
                vm.ns.ip(&[
                    "-6", "route", "add", "default", "via", &gateway6, "dev", VM_DEV,
                ])?;
            }
            vms.push(vm);
        }
        let mut changes = vec![upsert(default_security_group())];
        changes.extend(["n1", "n2", "n3"].map(|id| upsert(network(id))));
        for (id, net, cidr) in [
            ("s1", "n1", "10.0.1.0/24"),
            ("s1v6", "n1", "fd00:1::/64"),
            ("s2", "n2", "10.0.2.0/24"),
            ("s2v6", "n2", "fd00:2::/64"),
            ("s3", "n3", "10.0.3.0/24"),
        ] {
            changes.push(upsert(subnet(id, net, cidr)));
        }
        for (id, net, ips, dev, mac) in VMS {
            let mac = mac.map(|b| format!("{b:02x}")).join(":");
            changes.push(upsert(port(id, net, &mac, ips, NODE, dev)));
        }
        changes.extend([
            upsert(router_port(
                "r1-n1",
                "n1",
                "fa:16:3e:00:01:01",
                &[("s1", "10.0.1.1"), ("s1v6", "fd00:1::1")],
            )),
            upsert(router_port(
                "r1-n2",
                "n2",
                "fa:16:3e:00:01:02",
                &[("s2", "10.0.2.1"), ("s2v6", "fd00:2::1")],
            )),
            upsert(router_port(
                "r2-n3",
                "n3",
                "fa:16:3e:00:02:03",
                &[("s3", "10.0.3.1")],
            )),
            upsert(router(
                "r1",
                &[
                    ("s1", "r1-n1"),
                    ("s1v6", "r1-n1"),
                    ("s2", "r1-n2"),
                    ("s2v6", "r1-n2"),
                ],
            )),
            upsert(router("r2", &[("s3", "r2-n3")])),
        ]);
        let mut client = agent.client().await?;
        client.apply(apply(changes)).await?;
        for (id, ..) in VMS {
            wait_status(&mut client, id, pb::Status::Active).await?;
        }
        wait_active(&mut client, Awaited::Router("r1")).await?;
        wait_active(&mut client, Awaited::Router("r2")).await?;
        let mut vms = vms.into_iter();
        Ok(Routed {
            agent,
            a: vms.next().unwrap(),
            b: vms.next().unwrap(),
            c: vms.next().unwrap(),
            _node: node,
        })
    }
}

#[tokio::test]
async fn two_subnets_of_one_router_reach_each_other_over_ipv4_and_ipv6() -> Result<()> {
    let t = Routed::start("route").await?;
    // The gateways answer, on either of the router's interfaces.
    assert!(t.a.ping(ip("10.0.1.1"), 2)?.all_replied());
    assert!(t.a.ping(ip("10.0.2.1"), 2)?.all_replied());
    assert!(t.a.ping(ip("fd00:1::1"), 2)?.all_replied());
    // Routed both ways.
    assert!(t.a.ping(ip("10.0.2.5"), 3)?.all_replied());
    assert!(t.b.ping(ip("10.0.1.5"), 3)?.all_replied());
    assert!(t.a.ping(ip("fd00:2::5"), 3)?.all_replied());
    assert!(t.b.ping(ip("fd00:1::5"), 3)?.all_replied());
    // TCP across the router.
    let address = SocketAddr::new(ip("10.0.2.5"), 7000);
    let _server = EchoServer::tcp(&t.b.ns, address)?;
    assert!(tcp_works(&t.a.ns, address), "TCP a -> b through r1");
    let address6 = SocketAddr::new(ip("fd00:2::5"), 7000);
    let _server6 = EchoServer::tcp(&t.b.ns, address6)?;
    assert!(
        tcp_works(&t.a.ns, address6),
        "TCP over IPv6 a -> b through r1"
    );
    Ok(())
}

#[tokio::test]
async fn routers_stay_apart_and_a_ttl_of_one_stops_at_the_router() -> Result<()> {
    let t = Routed::start("apart").await?;
    // c's subnet is on r2 only: unreachable from r1's subnets, and the other way.
    assert!(t.a.ping(ip("10.0.3.5"), 2)?.none_replied());
    assert!(t.c.ping(ip("10.0.1.5"), 2)?.none_replied());
    assert!(t.c.ping(ip("10.0.3.1"), 2)?.all_replied());

    let mut client = t.agent.client().await?;
    let before = counters(&mut client, "port-a").await?;
    let out = t.a.ns.exec(&[
        "ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", "-t", "1", "10.0.2.5",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" 0 received"),
        "a ping with TTL 1 was answered: {text}"
    );
    // The router says why, from its address on a's subnet.
    assert!(
        text.contains("From 10.0.1.1") && text.contains("Time to live exceeded"),
        "no time-exceeded error from the gateway: {text}"
    );
    let after = counters(&mut client, "port-a").await?;
    let ttl = |c: &pb::PortCounters| drops(c, pb::DropReason::TtlExceeded);
    assert_eq!(ttl(&after) - ttl(&before), 2, "{after:?}");
    let no_route = |c: &pb::PortCounters| drops(c, pb::DropReason::NoRoute);
    assert!(
        no_route(&after) >= 2,
        "pings to r2's subnet count as no_route: {after:?}"
    );
    Ok(())
}
