//! Packet tests of distributed routing (`port_ingress` with the routing tables) through
//! BPF_PROG_TEST_RUN. The tables are the agent's own: a desired state with a router is
//! compiled and written by its compiler and kernel layer. Needs root.
//!
//! | port | network | addresses                 | notes                          |
//! |------|---------|---------------------------|--------------------------------|
//! | a    | n1      | 10.0.1.5, fd00:1::5       | a VM                           |
//! | b    | n2      | 10.0.2.5, fd00:2::5       | a VM; also next hop of a route |
//! | c    | n3      | 10.0.3.5                  | on another router's network    |
//!
//! Router r1 has interfaces on n1 (10.0.1.1, fd00:1::1) and n2 (10.0.2.1, fd00:2::1) and
//! a static route 192.168.0.0/16 via 10.0.2.5; router r2 has n3 (10.0.3.1) only.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{ensure, Context, Result};
use dataplane_abi::{program_names, verdict_action, DropReason};
use dataplane_agent::{
    core::{
        compile::{compile, Compiled, NodeView, SlotLimits, Slots},
        model::{Resource, State},
    },
    kernel::datapath::{Datapath, TestRunOutcome},
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{network, port, router, router_port, subnet, IntoResource},
    frames::{self, ethertype, offsets, proto, Mac, BROADCAST, ETH_HLEN, IPV4_HLEN},
    netns::device_lab,
    testrun::traced_datapath,
};

const NODE: &str = "router-node";
const MAC_A: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0a];
const MAC_B: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0b];
const MAC_C: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0c];
const R1_N1: Mac = [0xfa, 0x16, 0x3e, 0, 1, 1];
const R1_N2: Mac = [0xfa, 0x16, 0x3e, 0, 1, 2];
const R2_N3: Mac = [0xfa, 0x16, 0x3e, 0, 2, 3];

fn mac_text(mac: Mac) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn state() -> Result<State> {
    let mut resources = vec![
        network("n1").into_resource(),
        network("n2").into_resource(),
        network("n3").into_resource(),
        subnet("s1", "n1", "10.0.1.0/24").into_resource(),
        subnet("s1v6", "n1", "fd00:1::/64").into_resource(),
        subnet("s2", "n2", "10.0.2.0/24").into_resource(),
        subnet("s2v6", "n2", "fd00:2::/64").into_resource(),
        subnet("s3", "n3", "10.0.3.0/24").into_resource(),
    ];
    for (id, net, mac, ips, dev) in [
        (
            "a",
            "n1",
            MAC_A,
            vec![("s1", "10.0.1.5"), ("s1v6", "fd00:1::5")],
            "ra",
        ),
        (
            "b",
            "n2",
            MAC_B,
            vec![("s2", "10.0.2.5"), ("s2v6", "fd00:2::5")],
            "rb",
        ),
        ("c", "n3", MAC_C, vec![("s3", "10.0.3.5")], "rc"),
    ] {
        let mut p = port(id, net, &mac_text(mac), &ips, NODE, dev);
        // Routing, not security groups, is under test here.
        p.security_group_ids.clear();
        p.port_security_enabled = Some(false);
        resources.push(p.into_resource());
    }
    for (id, net, mac, ips) in [
        (
            "r1-n1",
            "n1",
            R1_N1,
            vec![("s1", "10.0.1.1"), ("s1v6", "fd00:1::1")],
        ),
        (
            "r1-n2",
            "n2",
            R1_N2,
            vec![("s2", "10.0.2.1"), ("s2v6", "fd00:2::1")],
        ),
        ("r2-n3", "n3", R2_N3, vec![("s3", "10.0.3.1")]),
    ] {
        resources.push(router_port(id, net, &mac_text(mac), &ips).into_resource());
    }
    let mut r1 = router(
        "r1",
        &[
            ("s1", "r1-n1"),
            ("s1v6", "r1-n1"),
            ("s2", "r1-n2"),
            ("s2v6", "r1-n2"),
        ],
    );
    r1.routes = vec![pb::Route {
        destination: "192.168.0.0/16".into(),
        nexthop: "10.0.2.5".into(),
    }];
    resources.push(r1.into_resource());
    resources.push(router("r2", &[("s3", "r2-n3")]).into_resource());
    let resources: Vec<Resource> = resources_from_proto(resources)?;
    Ok(State::replace(resources)?)
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn udp4(src_mac: Mac, dst_mac: Mac, src: &str, dst: &str, ttl: u8) -> Vec<u8> {
    let mut packet = frames::ipv4(
        ip4(src),
        ip4(dst),
        proto::UDP,
        &frames::udp(4000, 53, b"hi"),
    );
    frames::set_ttl4(&mut packet, ttl);
    frames::ethernet(dst_mac, src_mac, ethertype::IPV4, &packet)
}

fn udp6(src_mac: Mac, dst_mac: Mac, src: &str, dst: &str, hop_limit: u8) -> Vec<u8> {
    let mut packet = frames::ipv6(
        ip6(src),
        ip6(dst),
        proto::UDP,
        &frames::udp(4000, 53, b"hi"),
    );
    packet[7] = hop_limit;
    frames::ethernet(dst_mac, src_mac, ethertype::IPV6, &packet)
}

struct Lab {
    datapath: Datapath,
    devices: std::collections::BTreeMap<String, u32>,
    compiled: Compiled,
}

impl Lab {
    fn send(&mut self, from: &str, frame: &[u8]) -> Result<TestRunOutcome> {
        Ok(self
            .datapath
            .test_run(program_names::PORT_INGRESS, self.devices[from], 0, frame, 1)?)
    }

    /// `frame` from `from` goes to device `to`; returns the frame as it leaves.
    fn expect_to(&mut self, from: &str, frame: &[u8], to: &str, what: &str) -> Result<Vec<u8>> {
        let out = self.send(from, frame)?;
        ensure!(
            out.verdict.action == verdict_action::UNICAST
                && out.verdict.ifindexes[0] == self.devices[to],
            "{what}: verdict {:?} (action {}), expected unicast to {to}",
            DropReason::from_u32(out.verdict.reason),
            out.verdict.action
        );
        Ok(out.frame)
    }

    /// `TtlExceeded` drops counted against port `id`.
    fn ttl_drops(&self, id: &str) -> Result<u64> {
        let slot = self
            .compiled
            .ports
            .iter()
            .find(|p| p.port_id == id)
            .context("port not programmed")?
            .slot;
        let counters = self.datapath.port_counters(slot)?;
        Ok(counters
            .drops
            .iter()
            .find(|(r, _)| *r == DropReason::TtlExceeded)
            .map_or(0, |(_, n)| *n))
    }

    fn expect_drop(
        &mut self,
        from: &str,
        frame: &[u8],
        reason: DropReason,
        what: &str,
    ) -> Result<()> {
        let out = self.send(from, frame)?;
        ensure!(
            out.verdict.action == verdict_action::DROP
                && DropReason::from_u32(out.verdict.reason) == Some(reason),
            "{what}: action {}, reason {:?}, expected drop {reason:?}",
            out.verdict.action,
            DropReason::from_u32(out.verdict.reason)
        );
        Ok(())
    }
}

fn with_lab(body: impl FnOnce(&mut Lab) -> Result<()> + Send) -> Result<()> {
    let names: Vec<String> = ["ra", "rb", "rc"].map(str::to_owned).to_vec();
    let (ns, devices) = device_lab("router", &names)?;
    ns.run(move || {
        let mut datapath = traced_datapath(4096)?;
        let state = state()?;
        let compiled = compile(
            &state,
            &NodeView {
                node_name: NODE,
                interfaces: &devices,
                peer_devices: &Default::default(),
                uplink: None,
            },
            &mut Slots::new(SlotLimits {
                max_ports: 64,
                max_networks: 64,
                max_rules: 1024,
            }),
        );
        datapath.sync(&compiled)?;
        body(&mut Lab {
            datapath,
            devices,
            compiled,
        })
    })?
}

/// A's broadcast ARP request for `target`.
fn arp_request(target: &str) -> Vec<u8> {
    frames::ethernet(
        BROADCAST,
        MAC_A,
        ethertype::ARP,
        &frames::arp(
            frames::arp_op::REQUEST,
            MAC_A,
            ip4("10.0.1.5"),
            [0; 6],
            ip4(target),
        ),
    )
}

fn ttl4(frame: &[u8]) -> u8 {
    frame[ETH_HLEN + 8]
}

fn header4_valid(frame: &[u8]) -> bool {
    frames::checksum(&[&frame[ETH_HLEN..ETH_HLEN + IPV4_HLEN]]) == 0
}

#[test]
fn ipv4_between_subnets_of_one_router() -> Result<()> {
    with_lab(|lab| {
        let statuses = &lab.compiled.statuses;
        let active = statuses
            .iter()
            .filter(|(r, s)| {
                r.id == "r1" && s.status == dataplane_agent::core::compile::StatusKind::Active
            })
            .count();
        ensure!(active == 1, "r1 is not ACTIVE: {statuses:?}");

        let out = lab.expect_to(
            "ra",
            &udp4(MAC_A, R1_N1, "10.0.1.5", "10.0.2.5", 64),
            "rb",
            "a to b",
        )?;
        ensure!(
            out[0..6] == MAC_B && out[6..12] == R1_N2,
            "MACs {:02x?}",
            &out[..12]
        );
        ensure!(
            ttl4(&out) == 63 && header4_valid(&out),
            "ttl {} / checksum",
            ttl4(&out)
        );
        // And back.
        let back = lab.expect_to(
            "rb",
            &udp4(MAC_B, R1_N2, "10.0.2.5", "10.0.1.5", 9),
            "ra",
            "b to a",
        )?;
        ensure!(
            back[0..6] == MAC_A && back[6..12] == R1_N1 && ttl4(&back) == 8 && header4_valid(&back)
        );

        // A static route: through its next hop.
        let via = lab.expect_to(
            "ra",
            &udp4(MAC_A, R1_N1, "10.0.1.5", "192.168.7.7", 64),
            "rb",
            "static route",
        )?;
        ensure!(
            via[0..6] == MAC_B,
            "static route's next hop MAC {:02x?}",
            &via[..6]
        );

        // TTL 1: an ICMP time-exceeded error from the gateway goes back, quoting the
        // expired header and 8 bytes; the expiry is counted against the sender.
        let expired = udp4(MAC_A, R1_N1, "10.0.1.5", "10.0.2.5", 1);
        let before = lab.ttl_drops("a")?;
        let error = lab.expect_to("ra", &expired, "ra", "ttl 1")?;
        ensure!(lab.ttl_drops("a")? == before + 1, "expiry not counted");
        ensure!(error[0..6] == MAC_A && error[6..12] == R1_N1, "error MACs");
        let ip = &error[ETH_HLEN..];
        ensure!(
            ip.len() == 56 && ip[9] == proto::ICMP && ip[8] == 64 && header4_valid(&error),
            "error header {:02x?}",
            ip
        );
        ensure!(
            ip[12..16] == [10, 0, 1, 1] && ip[16..20] == [10, 0, 1, 5],
            "error addresses"
        );
        ensure!(
            ip[20] == 11 && ip[21] == 0 && frames::checksum(&[&ip[20..]]) == 0,
            "icmp {:02x?}",
            &ip[20..28]
        );
        ensure!(
            ip[28..] == expired[ETH_HLEN..ETH_HLEN + 28],
            "quote {:02x?}",
            &ip[28..]
        );
        // An expired ICMP error is not answered with another: dropped, counted once.
        let mut unreachable = frames::ipv4(
            ip4("10.0.1.5"),
            ip4("10.0.2.5"),
            proto::ICMP,
            &frames::icmp4_error(3, 3, 0, &expired[ETH_HLEN..]),
        );
        frames::set_ttl4(&mut unreachable, 1);
        let frame = frames::ethernet(R1_N1, MAC_A, ethertype::IPV4, &unreachable);
        let before = lab.ttl_drops("a")?;
        lab.expect_drop("ra", &frame, DropReason::TtlExceeded, "expired icmp error")?;
        ensure!(lab.ttl_drops("a")? == before + 1, "counted other than once");
        lab.expect_drop(
            "ra",
            &udp4(MAC_A, R1_N1, "10.0.1.5", "10.9.9.9", 64),
            DropReason::NoRoute,
            "no route",
        )?;
        lab.expect_drop(
            "ra",
            &udp4(MAC_A, R1_N1, "10.0.1.5", "10.0.2.99", 64),
            DropReason::NoNeighbor,
            "no such host",
        )?;
        // r2's network is not r1's: nothing routes there, and r2's MAC is not on n1.
        lab.expect_drop(
            "ra",
            &udp4(MAC_A, R1_N1, "10.0.1.5", "10.0.3.5", 64),
            DropReason::NoRoute,
            "other router",
        )?;
        lab.expect_drop(
            "ra",
            &udp4(MAC_A, R2_N3, "10.0.1.5", "10.0.3.5", 64),
            DropReason::UnknownDestination,
            "other router's MAC",
        )?;
        lab.expect_drop(
            "rc",
            &udp4(MAC_C, R2_N3, "10.0.3.5", "10.0.1.5", 64),
            DropReason::NoRoute,
            "from the other router",
        )?;
        Ok(())
    })
}

#[test]
fn the_router_answers_arp_and_ping_for_its_addresses() -> Result<()> {
    with_lab(|lab| {
        let request = arp_request("10.0.1.1");
        let reply = lab.expect_to("ra", &request, "ra", "arp for the gateway")?;
        let expected = frames::ethernet(
            MAC_A,
            R1_N1,
            ethertype::ARP,
            &frames::arp(
                frames::arp_op::REPLY,
                R1_N1,
                ip4("10.0.1.1"),
                MAC_A,
                ip4("10.0.1.5"),
            ),
        );
        ensure!(
            reply[..expected.len()] == expected[..],
            "arp reply {:02x?}",
            reply
        );
        // Not the router's address on this network: floods as usual (a has no
        // neighbour on n1 to flood to).
        let other = arp_request("10.0.2.1");
        lab.expect_drop(
            "ra",
            &other,
            DropReason::NoFloodTarget,
            "arp for the other interface",
        )?;

        // Ping either of r1's addresses from n1.
        for target in ["10.0.1.1", "10.0.2.1"] {
            let ping = frames::ethernet(
                R1_N1,
                MAC_A,
                ethertype::IPV4,
                &frames::ipv4(
                    ip4("10.0.1.5"),
                    ip4(target),
                    proto::ICMP,
                    &frames::icmp4_echo(7, 1),
                ),
            );
            let pong = lab.expect_to("ra", &ping, "ra", target)?;
            let expected = frames::ethernet(
                MAC_A,
                R1_N1,
                ethertype::IPV4,
                &frames::ipv4(
                    ip4(target),
                    ip4("10.0.1.5"),
                    proto::ICMP,
                    &frames::icmp4_echo_reply(7, 1),
                ),
            );
            // The TTL is the router's own; the header checksum follows it.
            ensure!(
                ttl4(&pong) == 64 && header4_valid(&pong),
                "echo reply header"
            );
            let icmp = ETH_HLEN + IPV4_HLEN;
            ensure!(
                pong[icmp..] == expected[icmp..],
                "echo reply {:02x?}",
                &pong[icmp..]
            );
            ensure!(
                pong[..12] == expected[..12]
                    && pong[offsets::IPV4_SRC..icmp] == expected[offsets::IPV4_SRC..icmp]
            );
        }
        // Anything but an echo request to the router is not routed anywhere.
        lab.expect_drop(
            "ra",
            &udp4(MAC_A, R1_N1, "10.0.1.5", "10.0.1.1", 64),
            DropReason::NoRoute,
            "udp to the router",
        )?;
        Ok(())
    })
}

#[test]
fn ipv6_routing_neighbour_discovery_and_ping() -> Result<()> {
    with_lab(|lab| {
        let out = lab.expect_to(
            "ra",
            &udp6(MAC_A, R1_N1, "fd00:1::5", "fd00:2::5", 64),
            "rb",
            "a to b",
        )?;
        ensure!(
            out[0..6] == MAC_B && out[6..12] == R1_N2 && out[ETH_HLEN + 7] == 63,
            "routed v6 {:02x?}",
            &out[..22]
        );
        let expired = udp6(MAC_A, R1_N1, "fd00:1::5", "fd00:2::5", 1);
        let error = lab.expect_to("ra", &expired, "ra", "hop limit 1")?;
        let ip = &error[ETH_HLEN..];
        ensure!(error[0..6] == MAC_A && error[6..12] == R1_N1, "error MACs");
        ensure!(
            ip.len() == 96 && ip[6] == proto::ICMPV6 && ip[7] == 64,
            "error header {:02x?}",
            &ip[..40]
        );
        ensure!(ip[8..24] == ip6("fd00:1::1").octets() && ip[24..40] == ip6("fd00:1::5").octets());
        let pseudo = [
            &ip[8..40],
            &[0, 0, 0, 56, 0, 0, 0, proto::ICMPV6][..],
            &ip[40..],
        ];
        ensure!(
            ip[40] == 3 && ip[41] == 0 && frames::checksum(&pseudo) == 0,
            "icmpv6 {:02x?}",
            &ip[40..48]
        );
        ensure!(ip[48..] == expired[ETH_HLEN..ETH_HLEN + 48], "quote");
        lab.expect_drop(
            "ra",
            &udp6(MAC_A, R1_N1, "fd00:1::5", "fd00:9::5", 64),
            DropReason::NoRoute,
            "no route",
        )?;

        // Neighbour solicitation for the gateway, as a host resolving it sends.
        let gateway = ip6("fd00:1::1");
        let ns = frames::ns(gateway, &[frames::nd_ll_option(1, MAC_A)]);
        let group = frames::solicited_node(gateway);
        let solicit = frames::ethernet(
            frames::multicast_mac(group),
            MAC_A,
            ethertype::IPV6,
            &frames::ipv6(ip6("fd00:1::5"), group, proto::ICMPV6, &ns),
        );
        let advert = lab.expect_to("ra", &solicit, "ra", "ns for the gateway")?;
        let na = {
            let mut body = frames::na(gateway, &[frames::nd_ll_option(2, R1_N1)]);
            body[4] = 0xe0; // router, solicited, override
            body
        };
        let expected = frames::ethernet(
            MAC_A,
            R1_N1,
            ethertype::IPV6,
            &frames::ipv6(gateway, ip6("fd00:1::5"), proto::ICMPV6, &na),
        );
        ensure!(
            advert == expected,
            "advertisement\n{:02x?}\nexpected\n{:02x?}",
            advert,
            expected
        );

        let ping = frames::ethernet(
            R1_N1,
            MAC_A,
            ethertype::IPV6,
            &frames::ipv6(
                ip6("fd00:1::5"),
                ip6("fd00:2::1"),
                proto::ICMPV6,
                &frames::icmp6_echo(9, 2),
            ),
        );
        let pong = lab.expect_to("ra", &ping, "ra", "ping6 the router")?;
        let mut expected = frames::ethernet(
            MAC_A,
            R1_N1,
            ethertype::IPV6,
            &frames::ipv6(
                ip6("fd00:2::1"),
                ip6("fd00:1::5"),
                proto::ICMPV6,
                &frames::icmp6_echo_reply(9, 2),
            ),
        );
        // The router's own hop limit.
        expected[ETH_HLEN + 7] = 64;
        ensure!(
            pong == expected,
            "echo reply\n{:02x?}\nexpected\n{:02x?}",
            pong,
            expected
        );
        Ok(())
    })
}

#[test]
fn compiled_tables_follow_the_routers() -> Result<()> {
    with_lab(|lab| {
        let t = &lab.compiled.tables;
        // Two interfaces of r1 and one of r2; on-link, local and static routes.
        ensure!(t.router_ifs.len() == 3, "router_ifs {:?}", t.router_ifs);
        ensure!(
            t.routes4.len() == 3 + 2 + 2,
            "routes4 {:?}",
            t.routes4.keys()
        );
        ensure!(t.routes6.len() == 4, "routes6 {:?}", t.routes6.keys());
        Ok(())
    })
    .context("tables")
}
