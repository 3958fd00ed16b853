//! Packet tests of IPv6 on external networks through BPF_PROG_TEST_RUN: routed, not
//! translated (the Networking API has no IPv6 NAT). What a router routes to its
//! gateway leaves through the uplink with the tenant's address; what arrives for a
//! gateway port's MAC is routed to the port; `uplink_xdp` answers neighbour
//! solicitations and pings for the gateways' IPv6 addresses. The tables are the agent's
//! own, compiled from a desired state. Needs root.
//!
//! | port | network | addresses                  | router                          |
//! |------|---------|----------------------------|---------------------------------|
//! | a    | n1      | 10.0.1.5, 2001:db8:1::5    | r1: gateway 203.0.113.10 and    |
//! |      |         |                            | 2001:db8:e::10                  |
//! | d    | n3      | 2001:db8:3::5              | r2: gateway 2001:db8:e::20 only |
//!
//! The external network has 203.0.113.0/24 (gateway .1) and 2001:db8:e::/64 (gateway
//! 2001:db8:e::1, MAC resolved unless a test says otherwise).
use std::net::{IpAddr, Ipv6Addr};

use anyhow::{ensure, Result};
use dataplane_abi::DropReason;
use dataplane_agent::{
    core::{
        compile::{SlotLimits, Slots, Uplink},
        model::{MacAddr, Resource, State},
    },
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{
        external_network, gateway_port, network, port, router, router_port, subnet, with_gateway,
        IntoResource,
    },
    frames::{self, ethertype, icmp6_type, proto, Mac, ETH_HLEN},
    netns::device_lab,
    uplink_lab::UplinkLab as Lab,
};

const NODE: &str = "ext6-node";
const UPLINK: &str = "up0";

const MAC_A: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0a];
const MAC_D: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0d];
const R1_N1: Mac = [0xfa, 0x16, 0x3e, 0, 1, 1];
const R2_N3: Mac = [0xfa, 0x16, 0x3e, 0, 2, 3];
const R1_GW: Mac = [0xfa, 0x16, 0x3e, 0, 0x0e, 1];
const R2_GW: Mac = [0xfa, 0x16, 0x3e, 0, 0x0e, 2];
/// The external subnets' gateway.
const NEXTHOP_MAC: Mac = [0x02, 0, 0, 0, 0xee, 1];

const A6: &str = "2001:db8:1::5";
const D6: &str = "2001:db8:3::5";
const NEXTHOP6: &str = "2001:db8:e::1";
const GW1_6: &str = "2001:db8:e::10";
const GW2_6: &str = "2001:db8:e::20";
/// A host out there.
const REMOTE6: &str = "2001:db8:ff::7";

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn mac_text(mac: Mac) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn state() -> Result<State> {
    let mut resources = vec![
        external_network("ext").into_resource(),
        pb::Subnet {
            gateway_ip: "203.0.113.1".to_owned(),
            ..subnet("ext-v4", "ext", "203.0.113.0/24")
        }
        .into_resource(),
        pb::Subnet {
            gateway_ip: NEXTHOP6.to_owned(),
            ..subnet("ext-v6", "ext", "2001:db8:e::/64")
        }
        .into_resource(),
        network("n1").into_resource(),
        subnet("s1", "n1", "10.0.1.0/24").into_resource(),
        subnet("s1v6", "n1", "2001:db8:1::/64").into_resource(),
        network("n3").into_resource(),
        subnet("s3v6", "n3", "2001:db8:3::/64").into_resource(),
    ];
    for (id, net, fixed, mac, dev) in [
        (
            "a",
            "n1",
            &[("s1", "10.0.1.5"), ("s1v6", A6)][..],
            MAC_A,
            "ta",
        ),
        ("d", "n3", &[("s3v6", D6)][..], MAC_D, "td"),
    ] {
        let mut p = port(id, net, &mac_text(mac), fixed, NODE, dev);
        // Routing, not security groups, is under test here.
        p.security_group_ids.clear();
        p.port_security_enabled = Some(false);
        resources.push(p.into_resource());
    }
    resources.push(
        router_port(
            "r1-n1",
            "n1",
            &mac_text(R1_N1),
            &[("s1", "10.0.1.1"), ("s1v6", "2001:db8:1::1")],
        )
        .into_resource(),
    );
    resources.push(
        router_port(
            "r2-n3",
            "n3",
            &mac_text(R2_N3),
            &[("s3v6", "2001:db8:3::1")],
        )
        .into_resource(),
    );
    resources.push(
        gateway_port(
            "r1-gw",
            "r1",
            "ext",
            &mac_text(R1_GW),
            &[("ext-v4", "203.0.113.10"), ("ext-v6", GW1_6)],
        )
        .into_resource(),
    );
    resources.push(
        gateway_port("r2-gw", "r2", "ext", &mac_text(R2_GW), &[("ext-v6", GW2_6)]).into_resource(),
    );
    let mut r1 = with_gateway(
        router("r1", &[("s1", "r1-n1"), ("s1v6", "r1-n1")]),
        "ext",
        "ext-v4",
        "203.0.113.10",
        true,
    );
    let v6_leg = |address: &str| pb::ExternalFixedIp {
        subnet_id: "ext-v6".to_owned(),
        ip_address: address.to_owned(),
    };
    if let Some(info) = r1.external_gateway_info.as_mut() {
        info.external_fixed_ips.push(v6_leg(GW1_6));
    }
    let mut r2 = with_gateway(
        router("r2", &[("s3v6", "r2-n3")]),
        "ext",
        "ext-v6",
        GW2_6,
        false,
    );
    if let Some(info) = r2.external_gateway_info.as_mut() {
        info.external_fixed_ips = vec![v6_leg(GW2_6)];
    }
    resources.push(r1.into_resource());
    resources.push(r2.into_resource());
    let resources: Vec<Resource> = resources_from_proto(resources)?;
    Ok(State::replace(resources)?)
}

fn with_lab(body: impl FnOnce(&mut Lab) -> Result<()> + Send) -> Result<()> {
    let names: Vec<String> = ["ta", "td", UPLINK].map(str::to_owned).to_vec();
    let (ns, devices) = device_lab("ext6", &names)?;
    ns.run(move || {
        let uplink = Uplink {
            ifindex: devices[UPLINK],
            snat_port_min: 20_000,
            snat_port_count: 16,
            gateway_macs: [
                (IpAddr::V6(ip6(NEXTHOP6)), MacAddr(NEXTHOP_MAC)),
                ("203.0.113.1".parse()?, MacAddr(NEXTHOP_MAC)),
            ]
            .into(),
        };
        let mut lab = Lab {
            datapath: dataplane_tests::testrun::traced_datapath(4096)?,
            devices,
            slots: Slots::new(SlotLimits {
                max_ports: 64,
                max_networks: 64,
                max_rules: 1024,
            }),
            uplink,
            node_name: NODE,
            uplink_device: UPLINK,
        };
        lab.compile(&state()?)?;
        body(&mut lab)
    })?
}

/// An Ethernet frame with an IPv6 packet (checksums filled in) of hop limit `hops`.
fn frame6(dst: Mac, src: Mac, from: &str, to: &str, hops: u8, next: u8, l4: &[u8]) -> Vec<u8> {
    let mut packet = frames::ipv6(ip6(from), ip6(to), next, l4);
    packet[7] = hops;
    frames::ethernet(dst, src, ethertype::IPV6, &packet)
}

fn udp6(dst: Mac, src: Mac, from: &str, to: &str, hops: u8) -> Vec<u8> {
    frame6(
        dst,
        src,
        from,
        to,
        hops,
        proto::UDP,
        &frames::udp(4000, 53, b"ext6"),
    )
}

fn same(got: &[u8], expected: &[u8], what: &str) -> Result<()> {
    ensure!(
        got == expected,
        "{what}\n     got {got:02x?}\nexpected {expected:02x?}"
    );
    Ok(())
}

/// The advertisement of `target` at `mac` answering a solicitation from `solicitor`.
fn advertisement(target: &str, mac: Mac, solicitor: &str) -> Vec<u8> {
    let mut na = frames::na(ip6(target), &[frames::nd_ll_option(2, mac)]);
    na[4] = 0xe0; // router, solicited, override
    frame6(NEXTHOP_MAC, mac, target, solicitor, 255, proto::ICMPV6, &na)
}

#[test]
fn ipv6_leaves_through_the_gateway_with_the_tenants_address() -> Result<()> {
    with_lab(|lab| {
        let before = lab.datapath.uplink_counters()?.tx_packets;
        for (from, dev, port_mac, router_mac, gw_mac, source) in [
            ("a", "ta", MAC_A, R1_N1, R1_GW, A6),
            ("d", "td", MAC_D, R2_N3, R2_GW, D6),
        ] {
            let out = lab.expect_to(
                dev,
                &udp6(router_mac, port_mac, source, REMOTE6, 64),
                UPLINK,
                &format!("{from} to the outside"),
            )?;
            // Only the MACs and the hop limit change: the checksum covers neither.
            same(
                &out,
                &udp6(NEXTHOP_MAC, gw_mac, source, REMOTE6, 63),
                &format!("{from} routed out"),
            )?;
        }
        ensure!(
            lab.datapath.uplink_counters()?.tx_packets == before + 2,
            "the uplink counts what left"
        );
        // Expiring at the router: answered with time-exceeded from its interface.
        let error = lab.expect_to(
            "ta",
            &udp6(R1_N1, MAC_A, A6, REMOTE6, 1),
            "ta",
            "hop limit 1",
        )?;
        ensure!(
            error[ETH_HLEN + 40] == icmp6_type::TIME_EXCEEDED
                && error[ETH_HLEN + 8..ETH_HLEN + 24] == ip6("2001:db8:1::1").octets(),
            "time exceeded {:02x?}",
            &error[..ETH_HLEN + 48]
        );
        Ok(())
    })
}

#[test]
fn ipv6_for_a_gateway_mac_is_routed_to_the_port() -> Result<()> {
    with_lab(|lab| {
        let inbound = udp6(R1_GW, NEXTHOP_MAC, REMOTE6, A6, 64);
        let delivered = lab.inbound_to(&inbound, "ta", "outside to a")?;
        same(
            &delivered,
            &udp6(MAC_A, R1_N1, REMOTE6, A6, 63),
            "routed in",
        )?;
        let delivered = lab.inbound_to(&udp6(R2_GW, NEXTHOP_MAC, REMOTE6, D6, 9), "td", "to d")?;
        same(
            &delivered,
            &udp6(MAC_D, R2_N3, REMOTE6, D6, 8),
            "routed in to d",
        )?;

        // Only into the router's own subnets, never back out or across to another's.
        lab.inbound_drop(
            &udp6(R1_GW, NEXTHOP_MAC, REMOTE6, D6, 64),
            DropReason::NoRoute,
            "r2's subnet through r1",
        )?;
        lab.inbound_drop(
            &udp6(R1_GW, NEXTHOP_MAC, REMOTE6, "2001:db8:1::99", 64),
            DropReason::NoNeighbor,
            "no port at the address",
        )?;
        // Expiring in the router: a time-exceeded error from its gateway address, back
        // out of the uplink, quoting the packet as it came.
        for (gateway_mac, gateway, dst) in [(R1_GW, GW1_6, A6), (R2_GW, GW2_6, D6)] {
            let expired = udp6(gateway_mac, NEXTHOP_MAC, REMOTE6, dst, 1);
            let error = lab.inbound_to(&expired, UPLINK, "hop limit 1")?;
            // The header and 8 bytes, as the router's own errors quote.
            let about = &expired[ETH_HLEN..ETH_HLEN + 48];
            let icmp = frames::icmp6_error(icmp6_type::TIME_EXCEEDED, 0, 0, about);
            same(
                &error,
                &frame6(
                    NEXTHOP_MAC,
                    gateway_mac,
                    gateway,
                    REMOTE6,
                    64,
                    proto::ICMPV6,
                    &icmp,
                ),
                "time exceeded",
            )?;
        }
        lab.inbound_drop(
            &udp6(R1_GW, NEXTHOP_MAC, REMOTE6, GW1_6, 64),
            DropReason::NoRoute,
            "UDP to the gateway address",
        )?;
        let mut cut = inbound.clone();
        cut.truncate(cut.len() - 4);
        lab.inbound_drop(
            &cut,
            DropReason::MalformedIpv6,
            "shorter than its header says",
        )?;
        // Another MAC's traffic is the host's.
        lab.passes_to_host(
            &udp6([0x02, 0, 0, 0, 0, 0x99], NEXTHOP_MAC, REMOTE6, A6, 64),
            "another MAC",
        )
    })
}

#[test]
fn uplink_xdp_answers_neighbour_solicitations_for_gateway_addresses() -> Result<()> {
    with_lab(|lab| {
        for (gateway, mac) in [(GW1_6, R1_GW), (GW2_6, R2_GW)] {
            let solicit =
                frames::ns_frame(NEXTHOP_MAC, ip6(NEXTHOP6), ip6(gateway), Some(NEXTHOP_MAC));
            let answer = lab.answered(&solicit, gateway)?;
            same(&answer, &advertisement(gateway, mac, NEXTHOP6), gateway)?;
        }
        // A unicast reachability probe without the source option grows by the
        // target's.
        let probe = frame6(
            R1_GW,
            NEXTHOP_MAC,
            NEXTHOP6,
            GW1_6,
            255,
            proto::ICMPV6,
            &frames::ns(ip6(GW1_6), &[]),
        );
        let answer = lab.answered(&probe, "unicast probe")?;
        same(
            &answer,
            &advertisement(GW1_6, R1_GW, NEXTHOP6),
            "answer to the probe",
        )?;

        // Not ours, duplicate address detection, or from off the link: not answered.
        let other = frames::ns_frame(
            NEXTHOP_MAC,
            ip6(NEXTHOP6),
            ip6("2001:db8:e::99"),
            Some(NEXTHOP_MAC),
        );
        lab.passes_to_host(&other, "another address")?;
        let dad = frames::ns_frame(NEXTHOP_MAC, Ipv6Addr::UNSPECIFIED, ip6(GW1_6), None);
        lab.passes_to_host(&dad, "duplicate address detection")?;
        let mut routed =
            frames::ns_frame(NEXTHOP_MAC, ip6(NEXTHOP6), ip6(GW1_6), Some(NEXTHOP_MAC));
        routed[ETH_HLEN + 7] = 64;
        lab.passes_to_host(&routed, "hop limit 64")?;
        // A solicitation cut short is dropped and counted.
        let solicit = frames::ns_frame(NEXTHOP_MAC, ip6(NEXTHOP6), ip6(GW1_6), Some(NEXTHOP_MAC));
        lab.inbound_drop(
            &solicit[..solicit.len() - 4],
            DropReason::MalformedIpv6,
            "truncated solicitation",
        )
    })
}

#[test]
fn uplink_xdp_answers_pings_of_ipv6_gateway_addresses() -> Result<()> {
    with_lab(|lab| {
        let ping = frame6(
            R1_GW,
            NEXTHOP_MAC,
            REMOTE6,
            GW1_6,
            60,
            proto::ICMPV6,
            &frames::icmp6_echo(7, 1),
        );
        let pong = lab.answered(&ping, "ping of the gateway")?;
        // The gateway's own hop limit.
        same(
            &pong,
            &frame6(
                NEXTHOP_MAC,
                R1_GW,
                GW1_6,
                REMOTE6,
                64,
                proto::ICMPV6,
                &frames::icmp6_echo_reply(7, 1),
            ),
            "echo reply",
        )?;
        lab.inbound_drop(
            &ping[..ping.len() - 2],
            DropReason::MalformedIpv6,
            "truncated ping",
        )?;
        // A reply to a VM's ping is routed in, not answered.
        let reply = frame6(
            R1_GW,
            NEXTHOP_MAC,
            REMOTE6,
            A6,
            60,
            proto::ICMPV6,
            &frames::icmp6_echo_reply(7, 1),
        );
        lab.inbound_to(&reply, "ta", "echo reply to a")?;
        Ok(())
    })
}

#[test]
fn a_vm_pings_ipv6_gateway_addresses() -> Result<()> {
    with_lab(|lab| {
        for (gateway, hops) in [(GW1_6, 64), (GW2_6, 64), (GW1_6, 1)] {
            let ping = frame6(
                R1_N1,
                MAC_A,
                A6,
                gateway,
                hops,
                proto::ICMPV6,
                &frames::icmp6_echo(3, 4),
            );
            let pong = lab.expect_to("ta", &ping, "ta", &format!("ping {gateway}, {hops} hops"))?;
            same(
                &pong,
                &frame6(
                    MAC_A,
                    R1_N1,
                    gateway,
                    A6,
                    64,
                    proto::ICMPV6,
                    &frames::icmp6_echo_reply(3, 4),
                ),
                gateway,
            )?;
        }
        // Another router's gateway is a hop further.
        let ping = frame6(
            R1_N1,
            MAC_A,
            A6,
            GW2_6,
            1,
            proto::ICMPV6,
            &frames::icmp6_echo(3, 5),
        );
        let error = lab.expect_to("ta", &ping, "ta", "ping of r2's gateway, 1 hop")?;
        ensure!(
            error[ETH_HLEN + 40] == icmp6_type::TIME_EXCEEDED,
            "expired at r1"
        );
        lab.expect_drop(
            "ta",
            &udp6(R1_N1, MAC_A, A6, GW1_6, 64),
            DropReason::NoRoute,
            "UDP to the gateway address",
        )
    })
}

#[test]
fn an_unresolved_ipv6_gateway_drops_what_leaves_as_no_neighbor() -> Result<()> {
    with_lab(|lab| {
        lab.uplink.gateway_macs.remove(&IpAddr::V6(ip6(NEXTHOP6)));
        lab.compile(&state()?)?;
        lab.expect_drop(
            "ta",
            &udp6(R1_N1, MAC_A, A6, REMOTE6, 64),
            DropReason::NoNeighbor,
            "unresolved",
        )?;
        // IPv4 has its own next hop, still resolved.
        let v4 = frames::ethernet(
            R1_N1,
            MAC_A,
            ethertype::IPV4,
            &frames::ipv4(
                "10.0.1.5".parse()?,
                "198.51.100.7".parse()?,
                proto::UDP,
                &frames::udp(4000, 53, b"ext6"),
            ),
        );
        lab.expect_to("ta", &v4, UPLINK, "IPv4 still leaves")?;
        Ok(())
    })
}
