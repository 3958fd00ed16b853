//! Integration: the real agent in a node namespace, VMs in namespaces of their own,
//! programmed over gRPC like the API server does, with real ping traffic. Needs root.

use std::{net::IpAddr, time::Duration};

use anyhow::Result;
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    agent::{counters, drops, wait_status, Agent},
    api::{
        apply, default_security_group, delete, network, port, rule, security_group, subnet, upsert,
    },
    frames,
    netns::NetNs,
    topology::Vm,
};
use tonic::Code;

const NODE: &str = "compute-1";
const MAC_A: [u8; 6] = [0xfa, 0x16, 0x3e, 0x00, 0x00, 0x0a];
const MAC_B: [u8; 6] = [0xfa, 0x16, 0x3e, 0x00, 0x00, 0x0b];
const MAC_C: [u8; 6] = [0xfa, 0x16, 0x3e, 0x00, 0x00, 0x0c];

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A node namespace with a running agent and two VMs, `a` and `b`, on network `net1`
/// (10.0.0.0/24 and fd00:1::/64), ports `port-a`/`port-b` programmed and ACTIVE.
struct TwoVms {
    // Drop order: the agent first, then the VMs, then the node namespace.
    agent: Agent,
    a: Vm,
    b: Vm,
    node: NetNs,
}

impl TwoVms {
    async fn start(tag: &str) -> Result<TwoVms> {
        let node = NetNs::new(&format!("{tag}-node"))?;
        let agent = Agent::start(&node, NODE).await?;
        let a = Vm::create(
            &node,
            &format!("{tag}-a"),
            "tap-a",
            MAC_A,
            &["10.0.0.1/24".parse()?, "fd00:1::1/64".parse()?],
        )?;
        let b = Vm::create(
            &node,
            &format!("{tag}-b"),
            "tap-b",
            MAC_B,
            &["10.0.0.2/24".parse()?, "fd00:1::2/64".parse()?],
        )?;
        let setup = TwoVms { agent, a, b, node };
        let mut client = setup.agent.client().await?;
        client
            .apply(apply(vec![
                upsert(default_security_group()),
                upsert(network("net1")),
                upsert(subnet("sub4", "net1", "10.0.0.0/24")),
                upsert(subnet("sub6", "net1", "fd00:1::/64")),
                upsert(port_a()),
                upsert(port_b()),
            ]))
            .await?;
        wait_status(&mut client, "port-a", pb::Status::Active).await?;
        wait_status(&mut client, "port-b", pb::Status::Active).await?;
        Ok(setup)
    }
}

impl TwoVms {
    /// VM `c` with port `port-c` on network `net2`, whose subnet has the same range as
    /// `net1`'s (overlapping tenant subnets are legal), programmed and ACTIVE.
    async fn add_vm_on_second_network(&self, tag: &str) -> Result<Vm> {
        let c = Vm::create(&self.node, tag, "tap-c", MAC_C, &["10.0.0.3/24".parse()?])?;
        let mut client = self.agent.client().await?;
        client
            .apply(apply(vec![
                upsert(network("net2")),
                upsert(subnet("sub4-2", "net2", "10.0.0.0/24")),
                upsert(port(
                    "port-c",
                    "net2",
                    &mac_text(MAC_C),
                    &[("sub4-2", "10.0.0.3")],
                    NODE,
                    "tap-c",
                )),
            ]))
            .await?;
        wait_status(&mut client, "port-c", pb::Status::Active).await?;
        Ok(c)
    }
}

fn port_a() -> pb::Port {
    port(
        "port-a",
        "net1",
        &mac_text(MAC_A),
        &[("sub4", "10.0.0.1"), ("sub6", "fd00:1::1")],
        NODE,
        "tap-a",
    )
}

fn port_b() -> pb::Port {
    port(
        "port-b",
        "net1",
        &mac_text(MAC_B),
        &[("sub4", "10.0.0.2"), ("sub6", "fd00:1::2")],
        NODE,
        "tap-b",
    )
}

#[tokio::test]
async fn two_ports_of_one_network_ping_over_ipv4_and_ipv6() -> Result<()> {
    let t = TwoVms::start("ping").await?;
    assert!(t.a.ping(ip("10.0.0.2"), 3)?.all_replied());
    assert!(t.b.ping(ip("10.0.0.1"), 3)?.all_replied());
    assert!(t.a.ping(ip("fd00:1::2"), 3)?.all_replied());
    assert!(t.b.ping(ip("fd00:1::1"), 3)?.all_replied());

    let mut client = t.agent.client().await?;
    let a = counters(&mut client, "port-a").await?;
    // 6 echo requests and 6 replies at least, plus ARP and ND.
    assert!(a.rx_packets >= 6 && a.tx_packets >= 6, "{a:?}");
    assert!(a.rx_bytes > a.rx_packets * 40, "{a:?}");
    assert_eq!(drops(&a, pb::DropReason::SourceIpSpoofed), 0, "{a:?}");
    Ok(())
}

#[tokio::test]
async fn a_port_on_another_network_is_unreachable() -> Result<()> {
    let t = TwoVms::start("iso").await?;
    let c = t.add_vm_on_second_network("iso-c").await?;
    let mut client = t.agent.client().await?;
    assert!(c.ping(ip("10.0.0.1"), 3)?.none_replied());
    assert!(t.a.ping(ip("10.0.0.3"), 3)?.none_replied());
    // a and b still talk.
    assert!(t.a.ping(ip("10.0.0.2"), 2)?.all_replied());
    // c's ARP requests were flooded to nobody: c is alone on net2.
    let c_counters = counters(&mut client, "port-c").await?;
    assert!(
        drops(&c_counters, pb::DropReason::NoFloodTarget) > 0,
        "{c_counters:?}"
    );
    Ok(())
}

#[tokio::test]
async fn spoofed_source_ip_and_mac_are_dropped_and_counted() -> Result<()> {
    let t = TwoVms::start("spoof").await?;
    let mut client = t.agent.client().await?;
    assert!(t.a.ping(ip("10.0.0.2"), 1)?.all_replied());

    // An address the port does not own: b never sees the echo requests.
    t.a.del_address("10.0.0.1/24".parse()?)?;
    t.a.add_address("10.0.0.99/24".parse()?)?;
    assert!(t.a.ping(ip("10.0.0.2"), 3)?.none_replied());
    let a = counters(&mut client, "port-a").await?;
    // ARP from the wrong sender IP is caught first; anything IP after it.
    assert!(
        drops(&a, pb::DropReason::ArpSpoofed) + drops(&a, pb::DropReason::SourceIpSpoofed) >= 3,
        "{a:?}"
    );
    t.a.del_address("10.0.0.99/24".parse()?)?;
    t.a.add_address("10.0.0.1/24".parse()?)?;
    assert!(t.a.ping(ip("10.0.0.2"), 2)?.all_replied());

    // Another MAC: every frame is dropped at the source MAC check.
    t.a.ns
        .set_mac("eth0", [0xfa, 0x16, 0x3e, 0x66, 0x66, 0x66])?;
    assert!(t.a.ping(ip("10.0.0.2"), 3)?.none_replied());
    let a = counters(&mut client, "port-a").await?;
    assert!(drops(&a, pb::DropReason::SourceMacSpoofed) >= 3, "{a:?}");
    Ok(())
}

#[tokio::test]
async fn allowed_address_pairs_are_honoured() -> Result<()> {
    let t = TwoVms::start("pairs").await?;
    let mut client = t.agent.client().await?;
    t.a.add_address("10.0.0.100/24".parse()?)?;
    let from_pair = || {
        t.a.ns.exec(&[
            "ping",
            "-n",
            "-q",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "1",
            "-w",
            "4",
            "-I",
            "10.0.0.100",
            "10.0.0.2",
        ])
    };
    assert!(
        !from_pair()?.status.success(),
        "10.0.0.100 is not the port's yet"
    );

    let mut with_pair = port_a();
    with_pair.revision_number = 2;
    with_pair.allowed_address_pairs = vec![pb::AllowedAddressPair {
        ip_address: "10.0.0.96/28".to_owned(),
        mac_address: String::new(),
    }];
    client.apply(apply(vec![upsert(with_pair)])).await?;
    // b's neighbour entry for 10.0.0.100 may have failed above: let it retry.
    t.b.ns.ip(&["neigh", "flush", "dev", "eth0"])?;
    assert!(
        from_pair()?.status.success(),
        "a pair's CIDR allows 10.0.0.100"
    );
    Ok(())
}

#[tokio::test]
async fn port_security_disabled_lifts_the_checks() -> Result<()> {
    let t = TwoVms::start("nosec").await?;
    let mut client = t.agent.client().await?;
    t.a.del_address("10.0.0.1/24".parse()?)?;
    t.a.add_address("10.0.0.99/24".parse()?)?;
    assert!(t.a.ping(ip("10.0.0.2"), 2)?.none_replied());

    let mut open = port_a();
    open.revision_number = 2;
    open.port_security_enabled = Some(false);
    // Security groups need port security (as in Neutron).
    open.security_group_ids.clear();
    // b's groups judge what reaches b: let in anyone, 10.0.0.99 included.
    let anyone = security_group(
        "anyone",
        true,
        vec![rule(
            "anyone-in",
            pb::Direction::Ingress,
            pb::EtherType::Ipv4,
            "",
        )],
    );
    let mut b = port_b();
    b.revision_number = 2;
    b.security_group_ids.push("anyone".to_owned());
    client
        .apply(apply(vec![upsert(anyone), upsert(open), upsert(b)]))
        .await?;
    t.b.ns.ip(&["neigh", "flush", "dev", "eth0"])?;
    assert!(t.a.ping(ip("10.0.0.2"), 3)?.all_replied());
    Ok(())
}

#[tokio::test]
async fn admin_down_drops_the_ports_traffic() -> Result<()> {
    let t = TwoVms::start("admin").await?;
    let mut client = t.agent.client().await?;
    let mut down = port_b();
    down.revision_number = 2;
    down.admin_state_up = false;
    client.apply(apply(vec![upsert(down)])).await?;
    wait_status(&mut client, "port-b", pb::Status::Down).await?;
    assert!(t.a.ping(ip("10.0.0.2"), 3)?.none_replied());
    let b = counters(&mut client, "port-b").await?;
    assert!(drops(&b, pb::DropReason::PortAdminDown) >= 3, "{b:?}");

    let mut up = port_b();
    up.revision_number = 3;
    client.apply(apply(vec![upsert(up)])).await?;
    wait_status(&mut client, "port-b", pb::Status::Active).await?;
    assert!(t.a.ping(ip("10.0.0.2"), 2)?.all_replied());
    Ok(())
}

#[tokio::test]
async fn ports_added_changed_and_removed_at_runtime_take_effect() -> Result<()> {
    let t = TwoVms::start("runtime").await?;
    let mut client = t.agent.client().await?;

    // A port whose device does not exist yet is BUILD, then ACTIVE when it appears.
    client
        .apply(apply(vec![upsert(port(
            "port-c",
            "net1",
            &mac_text(MAC_C),
            &[("sub4", "10.0.0.3")],
            NODE,
            "tap-c",
        ))]))
        .await?;
    wait_status(&mut client, "port-c", pb::Status::Build).await?;
    let c = Vm::create(
        &t.node,
        "runtime-c",
        "tap-c",
        MAC_C,
        &["10.0.0.3/24".parse()?],
    )?;
    wait_status(&mut client, "port-c", pb::Status::Active).await?;
    assert!(c.ping(ip("10.0.0.1"), 2)?.all_replied());

    // Changing b's fixed IP: the old address is now spoofed, the new one works.
    let mut moved = port_b();
    moved.revision_number = 2;
    moved.fixed_ips[0].ip_address = "10.0.0.20".to_owned();
    client.apply(apply(vec![upsert(moved)])).await?;
    t.a.ns.ip(&["neigh", "flush", "dev", "eth0"])?;
    assert!(t.a.ping(ip("10.0.0.2"), 2)?.none_replied());
    t.b.add_address("10.0.0.20/24".parse()?)?;
    assert!(t.a.ping(ip("10.0.0.20"), 2)?.all_replied());

    // Removing c: its traffic stops.
    client
        .apply(apply(vec![delete(pb::ResourceKind::Port, "port-c")]))
        .await?;
    assert!(c.ping(ip("10.0.0.1"), 2)?.none_replied());
    let listed = client
        .list_ports(pb::ListRequest {})
        .await?
        .into_inner()
        .ports;
    assert_eq!(listed.len(), 2);
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_precise_codes_and_change_nothing() -> Result<()> {
    let t = TwoVms::start("badreq").await?;
    let mut client = t.agent.client().await?;
    let before = client.list_ports(pb::ListRequest {}).await?.into_inner();

    let mut bad_mac = port("port-x", "net1", "not-a-mac", &[], NODE, "tap-x");
    bad_mac.revision_number = 1;
    let mut outside = port(
        "port-x",
        "net1",
        "fa:16:3e:00:00:99",
        &[("sub4", "10.9.0.1")],
        NODE,
        "tap-x",
    );
    outside.revision_number = 1;
    let dup_mac = port("port-x", "net1", &mac_text(MAC_A), &[], NODE, "tap-x");
    let dup_ip = port(
        "port-x",
        "net1",
        "fa:16:3e:00:00:99",
        &[("sub4", "10.0.0.1")],
        NODE,
        "tap-x",
    );
    let no_net = port(
        "port-x",
        "net-missing",
        "fa:16:3e:00:00:99",
        &[],
        NODE,
        "tap-x",
    );
    let mut stale = port_a();
    stale.revision_number = 0;

    let cases: Vec<(Vec<pb::Change>, Code, &str)> = vec![
        (
            vec![upsert(bad_mac)],
            Code::InvalidArgument,
            "changes[0].upsert.port.mac_address",
        ),
        (
            vec![upsert(network("net9")), upsert(outside)],
            Code::InvalidArgument,
            "changes[1].upsert.port.fixed_ips[0].ip_address",
        ),
        (
            vec![upsert(dup_mac)],
            Code::AlreadyExists,
            "changes[0].upsert.port.mac_address",
        ),
        (
            vec![upsert(dup_ip)],
            Code::AlreadyExists,
            "changes[0].upsert.port.fixed_ips[0].ip_address",
        ),
        (
            vec![upsert(no_net)],
            Code::NotFound,
            "changes[0].upsert.port.network_id",
        ),
        (
            vec![delete(pb::ResourceKind::Network, "net1")],
            Code::FailedPrecondition,
            "changes[0].delete",
        ),
        (
            vec![delete(pb::ResourceKind::Port, "nope")],
            Code::NotFound,
            "changes[0].delete.id",
        ),
        (
            vec![upsert(stale)],
            Code::FailedPrecondition,
            "changes[0].upsert.port.revision_number",
        ),
    ];
    for (changes, code, field) in cases {
        let status = client.apply(apply(changes)).await.expect_err(field);
        assert_eq!(status.code(), code, "{field}: {status:?}");
        let details = tonic_types::StatusExt::get_error_details(&status);
        let violations = details
            .bad_request()
            .map(|b| b.field_violations.clone())
            .unwrap_or_default();
        assert!(
            violations.iter().any(|v| v.field == field),
            "{field} not named in {violations:?} ({})",
            status.message()
        );
    }
    let after = client.list_ports(pb::ListRequest {}).await?.into_inner();
    assert_eq!(before, after, "a refused request changed state");
    assert!(client
        .get_network(pb::GetRequest { id: "net9".into() })
        .await
        .is_err());
    // Traffic is untouched too.
    assert!(t.a.ping(ip("10.0.0.2"), 2)?.all_replied());
    Ok(())
}

#[tokio::test]
async fn broadcast_reaches_the_networks_other_ports_only() -> Result<()> {
    let t = TwoVms::start("flood").await?;
    let c = t.add_vm_on_second_network("flood-c").await?;

    // A broadcast UDP datagram from a, marked so it can be told from other traffic.
    let marker = b"dataplane-flood-test";
    let frame = frames::ethernet(
        frames::BROADCAST,
        MAC_A,
        frames::ethertype::IPV4,
        &frames::ipv4(
            "10.0.0.1".parse()?,
            "10.0.0.255".parse()?,
            frames::proto::UDP,
            &frames::udp(40000, 9, marker),
        ),
    );
    let carries_marker = |frames: &[Vec<u8>]| {
        frames
            .iter()
            .any(|f| f.windows(marker.len()).any(|w| w == marker))
    };
    let (_, at_b) =
        t.b.capture_while(Duration::from_millis(500), || t.a.send_frame(&frame))?;
    let (_, at_c) = c.capture_while(Duration::from_millis(500), || t.a.send_frame(&frame))?;
    assert!(
        carries_marker(&at_b),
        "b, on a's network, got the broadcast"
    );
    assert!(!carries_marker(&at_c), "c, on another network, must not");
    Ok(())
}

/// A device's own transmit counter, as the kernel keeps it.
fn device_tx_packets(ns: &NetNs, dev: &str) -> Result<u64> {
    let text = ns.exec_ok(&[
        "cat",
        &format!("/sys/class/net/{dev}/statistics/tx_packets"),
    ])?;
    Ok(text.trim().parse()?)
}

#[tokio::test]
async fn unicast_to_a_veth_port_goes_straight_to_the_vm_end() -> Result<()> {
    let t = TwoVms::start("peer").await?;
    // Neighbours resolved (ARP is broadcast: it still goes out of the device).
    assert!(t.a.ping(ip("10.0.0.2"), 1)?.all_replied());
    let mut client = t.agent.client().await?;
    let port_before = counters(&mut client, "port-b").await?.tx_packets;
    let device_before = device_tx_packets(&t.node, "tap-b")?;
    assert!(t.a.ping(ip("10.0.0.2"), 5)?.all_replied());
    let port_sent = counters(&mut client, "port-b").await?.tx_packets - port_before;
    let device_sent = device_tx_packets(&t.node, "tap-b")? - device_before;
    // The datapath delivered (and counted) every request; the host device sent
    // next to none of them (at most a neighbour probe).
    assert!(port_sent >= 5, "port-b was sent {port_sent}");
    assert!(device_sent <= 2, "tap-b transmitted {device_sent}");
    Ok(())
}
