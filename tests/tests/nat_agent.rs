//! Integration: external gateways, SNAT and floating IPs through the real agent, driven
//! over gRPC, with real ping, TCP and UDP between VM namespaces and an outside
//! namespace reached through the node's uplink. Needs root.
//!
//! - The outside (`ext0`, 203.0.113.1/24) is the external subnet's gateway and a host
//!   of its own; behind it, over a 1280-byte MTU link, the far host (198.51.100.2).
//! - Router r1 has interfaces on s1 (10.0.1.0/24) and s2 (10.0.2.0/24) and its gateway
//!   at 203.0.113.10 on the external network, SNAT on.
//! - VM a (10.0.1.5) has floating IP 203.0.113.101, VM c (10.0.2.5) 203.0.113.102, VM b
//!   (10.0.1.6) none. Group `web` lets in ICMP and TCP 7000-7003 and UDP 7100 from
//!   anywhere, and lets everything out.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use dataplane_tests::{
    agent::{counters, drops, wait_active, wait_status, Agent, Awaited},
    api::{
        apply, external_network, floating_ip, gateway_port, network, port, router, router_port,
        rule, security_group, subnet, upsert, with_gateway,
    },
    netns::NetNs,
    topology::Vm,
    traffic::{tcp_works, udp_exchange, udp_exchange_via, udp_socket, EchoServer},
};
use tonic::transport::Channel;

const NODE: &str = "compute-1";
const UPLINK: &str = "up0";
const OUTSIDE: &str = "203.0.113.1";
const GATEWAY: &str = "203.0.113.10";
const FIP_A: &str = "203.0.113.101";
const FIP_C: &str = "203.0.113.102";
const FAR: &str = "198.51.100.2";
const SNAT_FIRST: u16 = 20_000;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn at(address: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(address), port)
}

struct Nat {
    // Drop order: the agent first, then the namespaces.
    _agent: Agent,
    client: DataplaneClient<Channel>,
    a: Vm,
    b: Vm,
    c: Vm,
    outside: NetNs,
    _far: NetNs,
    _node: NetNs,
}

/// (port id, network, subnet, address, device, MAC) of a VM.
type VmSpec = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    [u8; 6],
);

const VMS: [VmSpec; 3] = [
    (
        "port-a",
        "n1",
        "s1",
        "10.0.1.5",
        "tap-a",
        [0xfa, 0x16, 0x3e, 0, 0, 0x0a],
    ),
    (
        "port-b",
        "n1",
        "s1",
        "10.0.1.6",
        "tap-b",
        [0xfa, 0x16, 0x3e, 0, 0, 0x0b],
    ),
    (
        "port-c",
        "n2",
        "s2",
        "10.0.2.5",
        "tap-c",
        [0xfa, 0x16, 0x3e, 0, 0, 0x0c],
    ),
];

fn web_group() -> pb::SecurityGroup {
    let ingress = |id: &str, protocol: &str, ports: Option<(u32, u32)>| pb::SecurityGroupRule {
        remote_ip_prefix: "0.0.0.0/0".to_owned(),
        port_range_min: ports.map(|p| p.0),
        port_range_max: ports.map(|p| p.1),
        ..rule(id, pb::Direction::Ingress, pb::EtherType::Ipv4, protocol)
    };
    security_group(
        "web",
        true,
        vec![
            rule("out", pb::Direction::Egress, pb::EtherType::Ipv4, ""),
            ingress("icmp", "icmp", None),
            ingress("tcp", "tcp", Some((7000, 7003))),
            ingress("udp", "udp", Some((7100, 7100))),
        ],
    )
}

fn fip(id: &str, address: &str, port_id: &str) -> pb::Change {
    upsert(floating_ip(id, "ext", address, port_id))
}

impl Nat {
    /// The topology above; SNAT gets `snat_ports` (`first-last`).
    async fn start(tag: &str, snat_ports: &str) -> Result<Nat> {
        let node = NetNs::new(&format!("{tag}-node"))?;
        let outside = NetNs::new(&format!("{tag}-out"))?;
        let far = NetNs::new(&format!("{tag}-far"))?;
        node.add_veth(UPLINK, Some(&outside), "ext0")?;
        node.set_up(UPLINK, true)?;
        outside.ip(&["addr", "add", &format!("{OUTSIDE}/24"), "dev", "ext0"])?;
        outside.set_up("ext0", true)?;
        // The far host, behind a link of a smaller MTU: path-MTU discovery's test.
        outside.add_veth("far0", Some(&far), "far1")?;
        for (ns, dev, address) in [
            (&outside, "far0", "198.51.100.1/24"),
            (&far, "far1", "198.51.100.2/24"),
        ] {
            ns.ip(&["link", "set", dev, "mtu", "1280"])?;
            ns.ip(&["addr", "add", address, "dev", dev])?;
            ns.set_up(dev, true)?;
        }
        far.ip(&["route", "add", "default", "via", "198.51.100.1"])?;
        outside.exec_ok(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])?;

        let agent = Agent::start_with(
            &node,
            NODE,
            &["--uplink", UPLINK, "--snat-ports", snat_ports],
        )
        .await?;
        let mut vms = Vec::new();
        for (i, (_, _, _, address, dev, mac)) in VMS.iter().enumerate() {
            let prefix = format!("{address}/24").parse()?;
            let vm = Vm::create(&node, &format!("{tag}-{i}"), dev, *mac, &[prefix])?;
            let gateway = address.rsplit_once('.').unwrap().0.to_owned() + ".1";
            vm.ns.ip(&["route", "add", "default", "via", &gateway])?;
            vms.push(vm);
        }

        let mut changes = vec![
            upsert(web_group()),
            upsert(external_network("ext")),
            upsert(pb::Subnet {
                gateway_ip: OUTSIDE.to_owned(),
                ..subnet("ext-v4", "ext", "203.0.113.0/24")
            }),
        ];
        changes.extend(["n1", "n2"].map(|id| upsert(network(id))));
        changes.push(upsert(subnet("s1", "n1", "10.0.1.0/24")));
        changes.push(upsert(subnet("s2", "n2", "10.0.2.0/24")));
        for (id, net, subnet_id, address, dev, mac) in VMS {
            let mac = mac.map(|b| format!("{b:02x}")).join(":");
            changes.push(upsert(pb::Port {
                security_group_ids: vec!["web".to_owned()],
                ..port(id, net, &mac, &[(subnet_id, address)], NODE, dev)
            }));
        }
        changes.extend([
            upsert(router_port(
                "r1-n1",
                "n1",
                "fa:16:3e:00:01:01",
                &[("s1", "10.0.1.1")],
            )),
            upsert(router_port(
                "r1-n2",
                "n2",
                "fa:16:3e:00:01:02",
                &[("s2", "10.0.2.1")],
            )),
            upsert(gateway_port(
                "r1-gw",
                "r1",
                "ext",
                "fa:16:3e:00:0e:01",
                &[("ext-v4", GATEWAY)],
            )),
            upsert(with_gateway(
                router("r1", &[("s1", "r1-n1"), ("s2", "r1-n2")]),
                "ext",
                "ext-v4",
                GATEWAY,
                true,
            )),
            fip("fip-a", FIP_A, "port-a"),
            fip("fip-c", FIP_C, "port-c"),
        ]);
        let mut client = agent.client().await?;
        client.apply(apply(changes)).await?;
        for (id, ..) in VMS {
            wait_status(&mut client, id, pb::Status::Active).await?;
        }
        wait_active(&mut client, Awaited::Router("r1")).await?;
        for id in ["fip-a", "fip-c"] {
            wait_active(&mut client, Awaited::FloatingIp(id)).await?;
        }
        let mut vms = vms.into_iter();
        Ok(Nat {
            _agent: agent,
            client,
            a: vms.next().unwrap(),
            b: vms.next().unwrap(),
            c: vms.next().unwrap(),
            outside,
            _far: far,
            _node: node,
        })
    }

    async fn uplink(&mut self) -> Result<pb::PortCounters> {
        self.client
            .get_port_counters(pb::GetPortCountersRequest::default())
            .await?
            .into_inner()
            .uplink
            .context("no uplink counters")
    }
}

#[tokio::test]
async fn an_outside_host_reaches_a_vm_by_its_floating_ip_and_the_vm_leaves_as_it() -> Result<()> {
    let mut t = Nat::start("fip", "20000-20015").await?;
    // The gateway and the floating IPs answer ARP and ping on the uplink.
    assert!(t
        .outside
        .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", GATEWAY])?
        .status
        .success());
    let ping = |ns: &NetNs, to: &str| -> Result<bool> {
        Ok(ns
            .exec(&["ping", "-n", "-c", "3", "-i", "0.2", "-W", "1", to])?
            .status
            .success())
    };
    assert!(ping(&t.outside, FIP_A)?, "outside -> a's floating IP");
    // A packet that expires in the router is answered from the gateway's address.
    let expired = t
        .outside
        .exec(&["ping", "-n", "-c", "1", "-t", "1", "-W", "1", FIP_A])?;
    let text = String::from_utf8_lossy(&expired.stdout);
    assert!(
        text.contains(&format!("From {GATEWAY} icmp_seq=1 Time to live exceeded")),
        "ping -t 1: {text}"
    );
    let _server = EchoServer::tcp(&t.a.ns, at("10.0.1.5", 7000))?;
    assert!(
        tcp_works(&t.outside, at(FIP_A, 7000)),
        "TCP outside -> a by floating IP"
    );
    // Outbound, a is its floating IP.
    let seen = udp_exchange(
        &t.a.ns,
        at("10.0.1.5", 40000),
        &t.outside,
        at(OUTSIDE, 7200),
    )?;
    assert_eq!(
        seen,
        at(FIP_A, 40000),
        "a leaves as its floating IP, port kept"
    );
    assert!(ping(&t.a.ns, OUTSIDE)?, "a pings the outside");
    // Security groups see the fixed address: TCP 7004 is outside web's range.
    let before = counters(&mut t.client, "port-a").await?;
    let _closed = EchoServer::tcp(&t.a.ns, at("10.0.1.5", 7004))?;
    assert!(
        !tcp_works(&t.outside, at(FIP_A, 7004)),
        "TCP 7004 is not let in"
    );
    let after = counters(&mut t.client, "port-a").await?;
    let denied = |c: &pb::PortCounters| drops(c, pb::DropReason::PolicyDenied);
    assert!(denied(&after) > denied(&before), "{after:?}");
    // What arrives for an address this node does not hold goes to the host, not to a VM.
    let uplink = t.uplink().await?;
    assert!(uplink.rx_packets > 0 && uplink.tx_packets > 0, "{uplink:?}");
    Ok(())
}

#[tokio::test]
async fn vms_without_a_floating_ip_reach_the_outside_through_snat() -> Result<()> {
    let mut t = Nat::start("snat", "20000-20015").await?;
    let seen = udp_exchange(
        &t.b.ns,
        at("10.0.1.6", 40000),
        &t.outside,
        at(OUTSIDE, 7200),
    )?;
    let SocketAddr::V4(seen) = seen else {
        bail!("{seen}")
    };
    assert_eq!(
        *seen.ip(),
        GATEWAY.parse::<Ipv4Addr>()?,
        "b leaves as the gateway"
    );
    assert!(
        (SNAT_FIRST..SNAT_FIRST + 16).contains(&seen.port()),
        "SNAT port {} outside the range",
        seen.port()
    );
    // A second connection gets another port; replies reach each.
    let other = udp_exchange(
        &t.b.ns,
        at("10.0.1.6", 40001),
        &t.outside,
        at(OUTSIDE, 7201),
    )?;
    assert_eq!(other.ip(), IpAddr::V4(*seen.ip()));
    // The operator sees the binding as the outside did, with the port that opened it.
    let bindings = t
        .client
        .list_nat_bindings(pb::ListNatBindingsRequest {})
        .await?
        .into_inner()
        .bindings;
    let endpoint = |address: &str, port: u16| pb::Endpoint {
        address: address.to_owned(),
        port: u32::from(port),
    };
    let first = bindings
        .iter()
        .find(|b| b.internal == Some(endpoint("10.0.1.6", 40000)))
        .with_context(|| format!("no binding of b's first connection: {bindings:?}"))?;
    assert_eq!(first.external, Some(endpoint(GATEWAY, seen.port())));
    assert_eq!(first.remote, Some(endpoint(OUTSIDE, 7200)));
    assert_eq!((first.protocol, first.port_id.as_str()), (17, "port-b"));
    assert!(
        first.idle_seconds <= 5 && (55..=60).contains(&first.expires_in_seconds),
        "UDP bindings live 60 s after their last packet: {first:?}"
    );
    assert!(t.b.ping(ip(OUTSIDE), 3)?.all_replied(), "ping through SNAT");
    // An ICMP error from inside about a translated connection leaves translated too:
    // the outside's connected socket learns the port is closed.
    let server = udp_socket(&t.outside, at(OUTSIDE, 7202))?;
    let inside = udp_socket(&t.b.ns, at("10.0.1.6", 40002))?;
    inside.send_to(b"x", at(OUTSIDE, 7202))?;
    let mut buf = [0u8; 16];
    let (_, binding) = server.recv_from(&mut buf)?;
    drop(inside);
    server.connect(binding)?;
    server.send(b"y")?;
    let refused = server.recv(&mut buf).expect_err("b's closed port answered");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "no port unreachable from {binding}: {refused}"
    );
    let server = EchoServer::tcp(&t.outside, at(OUTSIDE, 7300))?;
    assert!(tcp_works(&t.b.ns, at(OUTSIDE, 7300)), "TCP through SNAT");
    drop(server);
    // Nothing from outside reaches b unasked: a port of the gateway with no binding.
    let before = t.uplink().await?;
    let probe = udp_socket(&t.outside, at(OUTSIDE, 0))?;
    probe.send_to(b"x", SocketAddrV4::new(GATEWAY.parse()?, SNAT_FIRST + 15))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = t.uplink().await?;
    let unbound = |c: &pb::PortCounters| drops(c, pb::DropReason::NoNatBinding);
    assert_eq!(unbound(&after), unbound(&before) + 1, "{after:?}");
    Ok(())
}

#[tokio::test]
async fn a_full_snat_port_range_is_counted_not_silent() -> Result<()> {
    let mut t = Nat::start("exhaust", "20000-20001").await?;
    for source in [41000, 41001] {
        udp_exchange(
            &t.b.ns,
            at("10.0.1.6", source),
            &t.outside,
            at(OUTSIDE, 7200),
        )?;
    }
    let before = counters(&mut t.client, "port-b").await?;
    assert!(
        udp_exchange(
            &t.b.ns,
            at("10.0.1.6", 41002),
            &t.outside,
            at(OUTSIDE, 7200)
        )
        .is_err(),
        "a third connection to one remote endpoint fits in two ports"
    );
    let after = counters(&mut t.client, "port-b").await?;
    let exhausted = |c: &pb::PortCounters| drops(c, pb::DropReason::NatPortsExhausted);
    assert!(exhausted(&after) > exhausted(&before), "{after:?}");
    // Another remote endpoint has the whole range again.
    udp_exchange(
        &t.b.ns,
        at("10.0.1.6", 41003),
        &t.outside,
        at(OUTSIDE, 7201),
    )?;
    Ok(())
}

#[tokio::test]
async fn disassociating_stops_inbound_traffic_and_moving_takes_effect_at_once() -> Result<()> {
    let mut t = Nat::start("move", "20000-20015").await?;
    let _c_server = EchoServer::tcp(&t.c.ns, at("10.0.2.5", 7003))?;
    assert!(
        !tcp_works(&t.outside, at(FIP_A, 7003)),
        "a has no server on 7003"
    );
    assert!(t
        .outside
        .exec(&["ping", "-c", "1", "-W", "1", FIP_A])?
        .status
        .success());

    t.client.apply(apply(vec![fip("fip-a", FIP_A, "")])).await?;
    let before = t.uplink().await?;
    assert!(
        !t.outside
            .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", FIP_A])?
            .status
            .success(),
        "an unassociated floating IP still reaches a"
    );
    let after = t.uplink().await?;
    let unbound = |c: &pb::PortCounters| drops(c, pb::DropReason::NoNatBinding);
    assert!(unbound(&after) >= unbound(&before) + 2, "{after:?}");

    // Moved to c (with its own floating IP gone), it reaches c's server.
    t.client
        .apply(apply(vec![
            fip("fip-c", FIP_C, ""),
            fip("fip-a", FIP_A, "port-c"),
        ]))
        .await?;
    assert!(
        tcp_works(&t.outside, at(FIP_A, 7003)),
        "floating IP moved to c"
    );
    let seen = udp_exchange(
        &t.c.ns,
        at("10.0.2.5", 40000),
        &t.outside,
        at(OUTSIDE, 7200),
    )?;
    assert_eq!(
        seen,
        at(FIP_A, 40000),
        "c now leaves as the moved floating IP"
    );
    Ok(())
}

#[tokio::test]
async fn vms_reach_floating_ips_from_inside_hairpin() -> Result<()> {
    let t = Nat::start("hairpin", "20000-20015").await?;
    let _c_server = EchoServer::tcp(&t.c.ns, at("10.0.2.5", 7001))?;
    let _a_server = EchoServer::tcp(&t.a.ns, at("10.0.1.5", 7002))?;
    // With a floating IP, without one (through SNAT), and a VM's own.
    assert!(tcp_works(&t.a.ns, at(FIP_C, 7001)), "a -> c's floating IP");
    assert!(
        tcp_works(&t.b.ns, at(FIP_C, 7001)),
        "b (SNAT) -> c's floating IP"
    );
    assert!(
        tcp_works(&t.a.ns, at(FIP_A, 7002)),
        "a -> its own floating IP"
    );
    assert!(t.a.ping(ip(FIP_C), 2)?.all_replied());
    assert!(t.b.ping(ip(FIP_C), 2)?.all_replied());
    // c sees a as its floating IP, b as the gateway.
    // By its floating IP, c sees a as a's, b as the gateway; by its fixed one, a is
    // routed without translation.
    let c_server = at("10.0.2.5", 7100);
    let seen = udp_exchange_via(
        &t.a.ns,
        at("10.0.1.5", 40000),
        &t.c.ns,
        c_server,
        at(FIP_C, 7100),
    )?;
    assert_eq!(seen, at(FIP_A, 40000));
    let seen = udp_exchange_via(
        &t.b.ns,
        at("10.0.1.6", 40000),
        &t.c.ns,
        c_server,
        at(FIP_C, 7100),
    )?;
    assert_eq!(seen.ip(), ip(GATEWAY));
    let seen = udp_exchange(&t.a.ns, at("10.0.1.5", 40001), &t.c.ns, c_server)?;
    assert_eq!(seen, at("10.0.1.5", 40001));
    Ok(())
}

/// A datagram too big for the far link makes the outside send "fragmentation needed"
/// to the floating IP (or the gateway): translated, it teaches the VM the path MTU.
#[tokio::test]
async fn icmp_errors_through_nat_are_translated_so_path_mtu_discovery_works() -> Result<()> {
    let t = Nat::start("pmtu", "20000-20015").await?;
    for vm in [&t.a, &t.b] {
        let out = vm.ns.exec(&[
            "ping", "-n", "-c", "2", "-i", "0.3", "-W", "1", "-M", "do", "-s", "1400", FAR,
        ])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let route = vm.ns.exec_ok(&["ip", "route", "get", FAR])?;
        assert!(
            route.contains("mtu 1280"),
            "no path MTU learned; ping said {text}; route: {route}"
        );
    }
    // Small packets get through both ways.
    assert!(t.a.ping(ip(FAR), 2)?.all_replied());
    assert!(t.b.ping(ip(FAR), 2)?.all_replied());
    Ok(())
}
