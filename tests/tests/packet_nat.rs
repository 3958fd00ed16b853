//! Packet tests of NAT at routers' external gateways (`port_ingress` routing out of a
//! gateway, `uplink_xdp` and `uplink_ingress` on the uplink) through BPF_PROG_TEST_RUN.
//! The tables are the agent's own: a desired state with routers, gateways and floating
//! IPs is compiled and written by its compiler and kernel layer. Each test checks one
//! behaviour, mostly byte for byte against a frame built from scratch (so every
//! checksum the datapath updated incrementally must equal a fresh one). Needs root.
//!
//! | port | network | address   | floating IP    | router            |
//! |------|---------|-----------|----------------|-------------------|
//! | a    | n1      | 10.0.1.5  | 203.0.113.101  | r1 (SNAT on)      |
//! | b    | n1      | 10.0.1.6  | none (SNAT)    | r1                |
//! | c    | n2      | 10.0.2.5  | 203.0.113.102  | r1                |
//! | d    | n3      | 10.0.3.5  | none           | r2 (SNAT off)     |
//!
//! r1: interfaces 10.0.1.1 (n1), 10.0.2.1 (n2), gateway 203.0.113.10. r2: 10.0.3.1
//! (n3), gateway 203.0.113.20. The external subnet 203.0.113.0/24 has its gateway at
//! 203.0.113.1 (MAC resolved unless a test says otherwise). Floating IP 203.0.113.103
//! is not associated. SNAT ports: 20000-20015.
use std::net::Ipv4Addr;

use anyhow::{ensure, Context, Result};
use dataplane_abi::{program_names, DropReason};
use dataplane_agent::{
    core::{
        compile::{compile, NodeView, SlotLimits, Slots, Uplink},
        model::{MacAddr, Resource, State},
    },
    service::convert::resources_from_proto,
};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    api::{
        external_network, floating_ip, gateway_port, network, port, router, router_port, subnet,
        with_gateway, IntoResource,
    },
    frames::{self, ethertype, icmp4_type, proto, tcp_flags, Mac, ETH_HLEN, IPV4_HLEN},
    netns::device_lab,
    testrun::{UplinkArrival as Arrival, TC_ACT_OK, XDP_DROP, XDP_TX},
    uplink_lab::UplinkLab as Lab,
};

const NODE: &str = "nat-node";
const UPLINK: &str = "up0";

const MAC_A: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0a];
const MAC_B: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0b];
const MAC_C: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0c];
const MAC_D: Mac = [0xfa, 0x16, 0x3e, 0, 0, 0x0d];
const R1_N1: Mac = [0xfa, 0x16, 0x3e, 0, 1, 1];
const R1_N2: Mac = [0xfa, 0x16, 0x3e, 0, 1, 2];
const R2_N3: Mac = [0xfa, 0x16, 0x3e, 0, 2, 3];
const R1_GW: Mac = [0xfa, 0x16, 0x3e, 0, 0x0e, 1];
const R2_GW: Mac = [0xfa, 0x16, 0x3e, 0, 0x0e, 2];
/// The external subnet's gateway (203.0.113.1): next hop of what leaves, source of
/// what arrives.
const NEXTHOP_MAC: Mac = [0x02, 0, 0, 0, 0xee, 1];

const A: &str = "10.0.1.5";
const B: &str = "10.0.1.6";
const C: &str = "10.0.2.5";
const D: &str = "10.0.3.5";
const NEXTHOP: &str = "203.0.113.1";
const GW1: &str = "203.0.113.10";
const GW2: &str = "203.0.113.20";
const FIP_A: &str = "203.0.113.101";
const FIP_C: &str = "203.0.113.102";
const FIP_U: &str = "203.0.113.103";
/// A host out there, and a router on the way to it (source of ICMP errors).
const REMOTE: &str = "198.51.100.7";
const ON_PATH: &str = "198.51.100.1";
const SNAT_MIN: u16 = 20_000;
const SNAT_COUNT: u16 = 16;

const PAYLOAD: &[u8] = b"nat-test";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn mac_text(mac: Mac) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The state of the table above; `gateway1` is r1's gateway address.
fn state(gateway1: &str) -> Result<State> {
    let mut resources = vec![
        external_network("ext").into_resource(),
        pb::Subnet {
            gateway_ip: NEXTHOP.to_owned(),
            ..subnet("ext-v4", "ext", "203.0.113.0/24")
        }
        .into_resource(),
    ];
    for (n, cidr) in [
        ("n1", "10.0.1.0/24"),
        ("n2", "10.0.2.0/24"),
        ("n3", "10.0.3.0/24"),
    ] {
        resources.push(network(n).into_resource());
        resources.push(subnet(&format!("s{}", &n[1..]), n, cidr).into_resource());
    }
    for (id, net, sub, mac, addr, dev) in [
        ("a", "n1", "s1", MAC_A, A, "ta"),
        ("b", "n1", "s1", MAC_B, B, "tb"),
        ("c", "n2", "s2", MAC_C, C, "tc"),
        ("d", "n3", "s3", MAC_D, D, "td"),
    ] {
        let mut p = port(id, net, &mac_text(mac), &[(sub, addr)], NODE, dev);
        // NAT, not security groups, is under test here.
        p.security_group_ids.clear();
        p.port_security_enabled = Some(false);
        resources.push(p.into_resource());
    }
    for (id, net, sub, mac, addr) in [
        ("r1-n1", "n1", "s1", R1_N1, "10.0.1.1"),
        ("r1-n2", "n2", "s2", R1_N2, "10.0.2.1"),
        ("r2-n3", "n3", "s3", R2_N3, "10.0.3.1"),
    ] {
        resources.push(router_port(id, net, &mac_text(mac), &[(sub, addr)]).into_resource());
    }
    resources.push(
        gateway_port(
            "r1-gw",
            "r1",
            "ext",
            &mac_text(R1_GW),
            &[("ext-v4", gateway1)],
        )
        .into_resource(),
    );
    resources.push(
        gateway_port("r2-gw", "r2", "ext", &mac_text(R2_GW), &[("ext-v4", GW2)]).into_resource(),
    );
    resources.push(
        with_gateway(
            router("r1", &[("s1", "r1-n1"), ("s2", "r1-n2")]),
            "ext",
            "ext-v4",
            gateway1,
            true,
        )
        .into_resource(),
    );
    resources.push(
        with_gateway(
            router("r2", &[("s3", "r2-n3")]),
            "ext",
            "ext-v4",
            GW2,
            false,
        )
        .into_resource(),
    );
    for (id, addr, port_id) in [
        ("fip-a", FIP_A, "a"),
        ("fip-c", FIP_C, "c"),
        ("fip-u", FIP_U, ""),
    ] {
        resources.push(floating_ip(id, "ext", addr, port_id).into_resource());
    }
    let resources: Vec<Resource> = resources_from_proto(resources)?;
    Ok(State::replace(resources)?)
}

fn with_lab(body: impl FnOnce(&mut Lab) -> Result<()> + Send) -> Result<()> {
    let names: Vec<String> = ["ta", "tb", "tc", "td", UPLINK].map(str::to_owned).to_vec();
    let (ns, devices) = device_lab("nat", &names)?;
    ns.run(move || {
        let uplink = Uplink {
            ifindex: devices[UPLINK],
            snat_port_min: SNAT_MIN,
            snat_port_count: SNAT_COUNT,
            gateway_macs: [(ip(NEXTHOP).into(), MacAddr(NEXTHOP_MAC))].into(),
        };
        let datapath = dataplane_tests::testrun::traced_datapath(4096)?;
        let mut lab = Lab {
            datapath,
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
        lab.compile(&state(GW1)?)?;
        body(&mut lab)
    })?
}

/// An IPv4 packet with every checksum filled in and `ttl`.
fn ip4(src: &str, dst: &str, ttl: u8, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = frames::ipv4(ip(src), ip(dst), protocol, l4);
    frames::set_ttl4(&mut p, ttl);
    p
}

fn eth(dst: Mac, src: Mac, packet: &[u8]) -> Vec<u8> {
    frames::ethernet(dst, src, ethertype::IPV4, packet)
}

fn udp(sport: u16, dport: u16) -> Vec<u8> {
    frames::udp(sport, dport, PAYLOAD)
}

fn tcp(sport: u16, dport: u16) -> Vec<u8> {
    frames::tcp(sport, dport, tcp_flags::SYN)
}

/// The source port (or echo identifier) of the IPv4 packet in `frame`.
fn source_port(frame: &[u8]) -> u16 {
    let l4 = ETH_HLEN + IPV4_HLEN;
    let at = if frame[ETH_HLEN + 9] == proto::ICMP {
        l4 + 4
    } else {
        l4
    };
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

fn snat_port(frame: &[u8], what: &str) -> Result<u16> {
    let port = source_port(frame);
    ensure!(
        (SNAT_MIN..SNAT_MIN + SNAT_COUNT).contains(&port),
        "{what}: SNAT port {port} outside {SNAT_MIN}-{}",
        SNAT_MIN + SNAT_COUNT - 1
    );
    Ok(port)
}

fn same(got: &[u8], expected: &[u8], what: &str) -> Result<()> {
    ensure!(
        got == expected,
        "{what}:\n     got {got:02x?}\nexpected {expected:02x?}"
    );
    Ok(())
}

/// The quote of `packet` (header and 8 bytes) with its source (or destination) address
/// replaced and its header checksum recomputed, and the 16-bit port at `port_at` of its
/// transport header replaced: what a NAT makes of the quote of an ICMP error. The
/// quoted transport checksum is left as it was.
fn translated_quote(
    packet: &[u8],
    source: bool,
    addr: &str,
    port_at: usize,
    port: Option<u16>,
) -> Vec<u8> {
    let mut q = frames::quote(packet);
    let at = if source { 12 } else { 16 };
    q[at..at + 4].copy_from_slice(&ip(addr).octets());
    if let Some(port) = port {
        q[IPV4_HLEN + port_at..IPV4_HLEN + port_at + 2].copy_from_slice(&port.to_be_bytes());
    }
    q[10..12].copy_from_slice(&[0, 0]);
    let check = frames::checksum(&[&q[..IPV4_HLEN]]);
    q[10..12].copy_from_slice(&check.to_be_bytes());
    q
}

/// Fragmentation needed (type 3 code 4, next-hop MTU 1280) from `from` to `to` about
/// `about` (an IP packet, quoted as given when it is already a quote).
fn frag_needed(from: &str, to: &str, ttl: u8, about: &[u8]) -> Vec<u8> {
    ip4(
        from,
        to,
        ttl,
        proto::ICMP,
        &frames::icmp4_error(
            icmp4_type::DEST_UNREACH,
            icmp4_type::CODE_FRAG_NEEDED,
            1280,
            about,
        ),
    )
}

/// Port unreachable (type 3 code 3) from `from` to `to` about `about`.
fn port_unreachable(from: &str, to: &str, ttl: u8, about: &[u8]) -> Vec<u8> {
    ip4(
        from,
        to,
        ttl,
        proto::ICMP,
        &frames::icmp4_error(
            icmp4_type::DEST_UNREACH,
            icmp4_type::CODE_PORT_UNREACH,
            0,
            about,
        ),
    )
}

fn arp_request(target: &str) -> Vec<u8> {
    frames::arp_request_frame(NEXTHOP_MAC, ip(NEXTHOP), ip(target))
}

fn arp_reply(owner: Mac, target: &str) -> Vec<u8> {
    frames::ethernet(
        NEXTHOP_MAC,
        owner,
        ethertype::ARP,
        &frames::arp(
            frames::arp_op::REPLY,
            owner,
            ip(target),
            NEXTHOP_MAC,
            ip(NEXTHOP),
        ),
    )
}

#[test]
fn floating_ip_inbound_is_translated_to_the_fixed_address() -> Result<()> {
    with_lab(|lab| {
        let cases: [(u8, Vec<u8>); 3] = [
            (proto::UDP, udp(5353, 7000)),
            (proto::TCP, tcp(5353, 7000)),
            (proto::ICMP, frames::icmp4_echo(9, 4)),
        ];
        for (protocol, l4) in cases {
            let what = format!("protocol {protocol} to a's floating IP");
            let frame = eth(R1_GW, NEXTHOP_MAC, &ip4(REMOTE, FIP_A, 57, protocol, &l4));
            let out = lab.inbound_to(&frame, "ta", &what)?;
            // From r1's interface on n1 to a, to the fixed address, TTL one less, every
            // checksum as if built so; ports untouched.
            let expected = eth(MAC_A, R1_N1, &ip4(REMOTE, A, 56, protocol, &l4));
            same(&out, &expected, &what)?;
        }
        Ok(())
    })
}

/// The time-exceeded error `gateway` sends back out of the uplink about `expired`
/// (identification 0, as the router's own packets have it).
fn expired_at(gateway: &str, gateway_mac: Mac, expired: &[u8]) -> Vec<u8> {
    let error = frames::icmp4_error(icmp4_type::TIME_EXCEEDED, 0, 0, expired);
    let mut packet = ip4(gateway, REMOTE, 64, proto::ICMP, &error);
    packet[4..6].fill(0);
    packet[10..12].fill(0);
    let check = frames::checksum(&[&packet[..IPV4_HLEN]]);
    packet[10..12].copy_from_slice(&check.to_be_bytes());
    eth(NEXTHOP_MAC, gateway_mac, &packet)
}

#[test]
fn what_expires_on_the_way_in_is_answered_from_the_gateway_address() -> Result<()> {
    with_lab(|lab| {
        // b's binding, for its reply below.
        let request = eth(
            R1_N1,
            MAC_B,
            &ip4(B, REMOTE, 64, proto::UDP, &udp(40000, 53)),
        );
        let out = lab.expect_to("tb", &request, UPLINK, "udp out")?;
        let port = snat_port(&out, "udp")?;
        let before = lab.uplink_drops(DropReason::TtlExceeded)?;
        for (what, gateway, gateway_mac, dst, l4) in [
            ("to a's floating IP", GW1, R1_GW, FIP_A, udp(5353, 7000)),
            ("b's SNAT reply", GW1, R1_GW, GW1, udp(53, port)),
            (
                "to d behind r2, untranslated",
                GW2,
                R2_GW,
                D,
                udp(5353, 7000),
            ),
        ] {
            let packet = ip4(REMOTE, dst, 1, proto::UDP, &l4);
            let mac = if gateway == GW2 { R2_GW } else { R1_GW };
            let error = lab.inbound_to(&eth(mac, NEXTHOP_MAC, &packet), UPLINK, what)?;
            // Quoting the packet as it came: nothing of it was translated yet.
            same(&error, &expired_at(gateway, gateway_mac, &packet), what)?;
        }
        ensure!(
            lab.uplink_drops(DropReason::TtlExceeded)? == before + 3,
            "each expiry is counted"
        );
        // An ICMP error is not answered with one: only counted.
        let about = ip4(FIP_A, REMOTE, 64, proto::UDP, &udp(7000, 5353));
        let unreachable = eth(
            R1_GW,
            NEXTHOP_MAC,
            &port_unreachable(REMOTE, FIP_A, 1, &about),
        );
        lab.inbound_drop(&unreachable, DropReason::TtlExceeded, "expired error")
    })
}

#[test]
fn floating_ip_outbound_leaves_as_the_floating_ip() -> Result<()> {
    with_lab(|lab| {
        for (protocol, l4) in [
            (proto::UDP, udp(40000, 53)),
            (proto::TCP, tcp(40000, 443)),
            (proto::ICMP, frames::icmp4_echo(33, 1)),
        ] {
            let what = format!("protocol {protocol} from a");
            let frame = eth(R1_N1, MAC_A, &ip4(A, REMOTE, 64, protocol, &l4));
            let out = lab.expect_to("ta", &frame, UPLINK, &what)?;
            // To the external subnet's gateway, from r1's gateway port: a as its
            // floating IP, 1:1, ports and identifier kept.
            let expected = eth(NEXTHOP_MAC, R1_GW, &ip4(FIP_A, REMOTE, 63, protocol, &l4));
            same(&out, &expected, &what)?;
        }
        // c, behind r1's other interface, as its own.
        let frame = eth(R1_N2, MAC_C, &ip4(C, REMOTE, 64, proto::UDP, &udp(1, 2)));
        let out = lab.expect_to("tc", &frame, UPLINK, "c")?;
        same(
            &out,
            &eth(
                NEXTHOP_MAC,
                R1_GW,
                &ip4(FIP_C, REMOTE, 63, proto::UDP, &udp(1, 2)),
            ),
            "c",
        )
    })
}

#[test]
fn snat_outbound_then_the_reply_maps_back() -> Result<()> {
    with_lab(|lab| {
        // UDP: b leaves as the gateway with a port of the range; the flow keeps it.
        let request = eth(
            R1_N1,
            MAC_B,
            &ip4(B, REMOTE, 64, proto::UDP, &udp(40000, 53)),
        );
        let out = lab.expect_to("tb", &request, UPLINK, "udp out")?;
        let port = snat_port(&out, "udp")?;
        same(
            &out,
            &eth(
                NEXTHOP_MAC,
                R1_GW,
                &ip4(GW1, REMOTE, 63, proto::UDP, &udp(port, 53)),
            ),
            "udp out",
        )?;
        let again = lab.expect_to("tb", &request, UPLINK, "udp again")?;
        ensure!(
            source_port(&again) == port,
            "the flow changed port: {} then {}",
            port,
            source_port(&again)
        );
        let bindings = lab.datapath.snat_bindings()?;
        ensure!(
            bindings.iter().any(|(k, o)| k.external == ip(GW1).octets()
                && k.external_port == port
                && k.remote == ip(REMOTE).octets()
                && k.remote_port == 53
                && o.internal == ip(B).octets()
                && o.internal_port == 40000),
            "binding {bindings:?}"
        );
        // The reply: to b, its own address and port again.
        let reply = eth(
            R1_GW,
            NEXTHOP_MAC,
            &ip4(REMOTE, GW1, 50, proto::UDP, &udp(53, port)),
        );
        let back = lab.inbound_to(&reply, "tb", "udp reply")?;
        same(
            &back,
            &eth(
                MAC_B,
                R1_N1,
                &ip4(REMOTE, B, 49, proto::UDP, &udp(53, 40000)),
            ),
            "udp reply",
        )?;
        // Only from the endpoint the binding is for.
        let other = eth(
            R1_GW,
            NEXTHOP_MAC,
            &ip4(REMOTE, GW1, 50, proto::UDP, &udp(54, port)),
        );
        let before = lab.uplink_drops(DropReason::NoNatBinding)?;
        lab.inbound_drop(&other, DropReason::NoNatBinding, "other remote port")?;
        ensure!(
            lab.uplink_drops(DropReason::NoNatBinding)? == before + 1,
            "not counted"
        );

        // TCP.
        let syn = eth(
            R1_N1,
            MAC_B,
            &ip4(B, REMOTE, 64, proto::TCP, &tcp(40001, 443)),
        );
        let out = lab.expect_to("tb", &syn, UPLINK, "tcp out")?;
        let tport = snat_port(&out, "tcp")?;
        same(
            &out,
            &eth(
                NEXTHOP_MAC,
                R1_GW,
                &ip4(GW1, REMOTE, 63, proto::TCP, &tcp(tport, 443)),
            ),
            "tcp out",
        )?;
        let syn_ack = frames::tcp(443, tport, tcp_flags::SYN_ACK);
        let back = lab.inbound_to(
            &eth(
                R1_GW,
                NEXTHOP_MAC,
                &ip4(REMOTE, GW1, 64, proto::TCP, &syn_ack),
            ),
            "tb",
            "syn-ack",
        )?;
        same(
            &back,
            &eth(
                MAC_B,
                R1_N1,
                &ip4(
                    REMOTE,
                    B,
                    63,
                    proto::TCP,
                    &frames::tcp(443, 40001, tcp_flags::SYN_ACK),
                ),
            ),
            "syn-ack",
        )?;

        // Echo: the identifier is the port.
        let ping = eth(
            R1_N1,
            MAC_B,
            &ip4(B, REMOTE, 64, proto::ICMP, &frames::icmp4_echo(77, 3)),
        );
        let out = lab.expect_to("tb", &ping, UPLINK, "echo out")?;
        let id = snat_port(&out, "echo")?;
        same(
            &out,
            &eth(
                NEXTHOP_MAC,
                R1_GW,
                &ip4(GW1, REMOTE, 63, proto::ICMP, &frames::icmp4_echo(id, 3)),
            ),
            "echo out",
        )?;
        let pong = eth(
            R1_GW,
            NEXTHOP_MAC,
            &ip4(
                REMOTE,
                GW1,
                60,
                proto::ICMP,
                &frames::icmp4_echo_reply(id, 3),
            ),
        );
        let back = lab.inbound_to(&pong, "tb", "echo reply")?;
        same(
            &back,
            &eth(
                MAC_B,
                R1_N1,
                &ip4(REMOTE, B, 59, proto::ICMP, &frames::icmp4_echo_reply(77, 3)),
            ),
            "echo reply",
        )
    })
}

#[test]
fn frag_needed_for_a_floating_ip_reaches_the_vm_translated() -> Result<()> {
    with_lab(|lab| {
        // What a sent, as it left.
        let out = lab.expect_to(
            "ta",
            &eth(
                R1_N1,
                MAC_A,
                &ip4(A, REMOTE, 64, proto::UDP, &udp(40000, 7200)),
            ),
            UPLINK,
            "a out",
        )?;
        let sent = &out[ETH_HLEN..];
        let error = eth(R1_GW, NEXTHOP_MAC, &frag_needed(ON_PATH, FIP_A, 62, sent));
        let got = lab.inbound_to(&error, "ta", "frag needed")?;
        // Outer destination and quoted source: a's fixed address; the quoted header's
        // checksum and the error's follow.
        let quote = translated_quote(sent, true, A, 0, None);
        same(
            &got,
            &eth(MAC_A, R1_N1, &frag_needed(ON_PATH, A, 61, &quote)),
            "frag needed",
        )?;
        Ok(())
    })
}

#[test]
fn frag_needed_for_snat_flows_reaches_the_vm_translated() -> Result<()> {
    with_lab(|lab| {
        // UDP, then echo, from b through SNAT.
        for (l4, protocol, internal, port_at) in [
            (udp(40000, 7200), proto::UDP, 40000, 0),
            (frames::icmp4_echo(77, 1), proto::ICMP, 77, 4),
        ] {
            let what = format!("protocol {protocol}");
            let out = lab.expect_to(
                "tb",
                &eth(R1_N1, MAC_B, &ip4(B, REMOTE, 64, protocol, &l4)),
                UPLINK,
                &what,
            )?;
            snat_port(&out, &what)?;
            let sent = &out[ETH_HLEN..];
            let error = eth(R1_GW, NEXTHOP_MAC, &frag_needed(ON_PATH, GW1, 62, sent));
            let got = lab.inbound_to(&error, "tb", &what)?;
            // The quote is of b's packet as b sent it: its address, its port (identifier).
            let quote = translated_quote(sent, true, B, port_at, Some(internal));
            same(
                &got,
                &eth(MAC_B, R1_N1, &frag_needed(ON_PATH, B, 61, &quote)),
                &what,
            )?;
            ensure!(
                frames::checksum(&[&got[ETH_HLEN + 28..ETH_HLEN + 48]]) == 0,
                "{what}: quoted header checksum"
            );
            ensure!(
                frames::checksum(&[&got[ETH_HLEN + 20..]]) == 0,
                "{what}: icmp checksum"
            );
        }
        // An error about no connection of the gateway is not delivered.
        let stray = ip4(
            GW1,
            REMOTE,
            63,
            proto::UDP,
            &udp(SNAT_MIN + SNAT_COUNT - 1, 9),
        );
        let error = eth(R1_GW, NEXTHOP_MAC, &frag_needed(ON_PATH, GW1, 62, &stray));
        lab.inbound_drop(&error, DropReason::NoNatBinding, "error about no binding")
    })
}

/// A VM behind SNAT answers a reply of its own connection with an ICMP error (its
/// socket is gone): the error belongs to the connection and leaves translated.
#[test]
fn an_icmp_error_from_a_snat_vm_about_its_connection_is_translated() -> Result<()> {
    with_lab(|lab| {
        let out = lab.expect_to(
            "tb",
            &eth(
                R1_N1,
                MAC_B,
                &ip4(B, REMOTE, 64, proto::UDP, &udp(40000, 53)),
            ),
            UPLINK,
            "b out",
        )?;
        let port = snat_port(&out, "b")?;
        let reply = eth(
            R1_GW,
            NEXTHOP_MAC,
            &ip4(REMOTE, GW1, 60, proto::UDP, &udp(53, port)),
        );
        let got = lab.inbound_to(&reply, "tb", "reply")?;
        let received = &got[ETH_HLEN..];
        let unreachable = port_unreachable(B, REMOTE, 64, received);
        let out = lab.expect_to(
            "tb",
            &eth(R1_N1, MAC_B, &unreachable),
            UPLINK,
            "port unreachable",
        )?;
        let quote = translated_quote(received, false, GW1, 2, Some(port));
        let expected = port_unreachable(GW1, REMOTE, 63, &quote);
        same(
            &out,
            &eth(NEXTHOP_MAC, R1_GW, &expected),
            "port unreachable",
        )
    })
}

#[test]
fn hairpin_to_floating_ips_stays_on_the_node() -> Result<()> {
    with_lab(|lab| {
        // a to c's floating IP: c sees a as a's floating IP.
        let frame = eth(
            R1_N1,
            MAC_A,
            &ip4(A, FIP_C, 64, proto::UDP, &udp(40000, 7100)),
        );
        let got = lab.expect_to("ta", &frame, "tc", "a to c's floating IP")?;
        same(
            &got,
            &eth(
                MAC_C,
                R1_N2,
                &ip4(FIP_A, C, 63, proto::UDP, &udp(40000, 7100)),
            ),
            "a to fip c",
        )?;
        // a to its own floating IP.
        let frame = eth(
            R1_N1,
            MAC_A,
            &ip4(A, FIP_A, 64, proto::TCP, &tcp(40000, 22)),
        );
        let got = lab.expect_to("ta", &frame, "ta", "a to its own floating IP")?;
        same(
            &got,
            &eth(
                MAC_A,
                R1_N1,
                &ip4(FIP_A, A, 63, proto::TCP, &tcp(40000, 22)),
            ),
            "a to fip a",
        )?;
        // b (SNAT) to c's floating IP: c sees the gateway; c's reply finds b.
        let frame = eth(
            R1_N1,
            MAC_B,
            &ip4(B, FIP_C, 64, proto::UDP, &udp(40001, 7100)),
        );
        let got = lab.expect_to("tb", &frame, "tc", "b to c's floating IP")?;
        let port = snat_port(&got, "b to fip c")?;
        same(
            &got,
            &eth(MAC_C, R1_N2, &ip4(GW1, C, 63, proto::UDP, &udp(port, 7100))),
            "b to fip c",
        )?;
        let reply = eth(R1_N2, MAC_C, &ip4(C, GW1, 64, proto::UDP, &udp(7100, port)));
        let got = lab.expect_to("tc", &reply, "tb", "c's reply to b")?;
        same(
            &got,
            &eth(
                MAC_B,
                R1_N1,
                &ip4(FIP_C, B, 63, proto::UDP, &udp(7100, 40001)),
            ),
            "c to b",
        )?;
        // Echo both ways.
        let ping = eth(
            R1_N1,
            MAC_A,
            &ip4(A, FIP_C, 64, proto::ICMP, &frames::icmp4_echo(5, 1)),
        );
        let got = lab.expect_to("ta", &ping, "tc", "ping fip c")?;
        same(
            &got,
            &eth(
                MAC_C,
                R1_N2,
                &ip4(FIP_A, C, 63, proto::ICMP, &frames::icmp4_echo(5, 1)),
            ),
            "ping",
        )?;
        let pong = eth(
            R1_N2,
            MAC_C,
            &ip4(C, FIP_A, 64, proto::ICMP, &frames::icmp4_echo_reply(5, 1)),
        );
        let got = lab.expect_to("tc", &pong, "ta", "pong fip a")?;
        same(
            &got,
            &eth(
                MAC_A,
                R1_N1,
                &ip4(FIP_C, A, 63, proto::ICMP, &frames::icmp4_echo_reply(5, 1)),
            ),
            "pong",
        )?;
        // An unassociated floating IP is no way in from inside either.
        let frame = eth(R1_N1, MAC_A, &ip4(A, FIP_U, 64, proto::UDP, &udp(1, 2)));
        lab.expect_drop(
            "ta",
            &frame,
            DropReason::NoNatBinding,
            "to the unassociated floating IP",
        )
    })
}

#[test]
fn uplink_xdp_answers_arp_for_the_gateway_and_associated_floating_ips_only() -> Result<()> {
    with_lab(|lab| {
        for (target, owner) in [(GW1, R1_GW), (FIP_A, R1_GW), (FIP_C, R1_GW), (GW2, R2_GW)] {
            match lab.arrive(&arp_request(target))? {
                Arrival::Tx(reply) => same(&reply, &arp_reply(owner, target), target)?,
                _ => anyhow::bail!("ARP for {target} not answered"),
            }
        }
        // Not for the unassociated floating IP, nor for addresses this node does not
        // hold: those go on, untouched, to the host (uplink_ingress leaves them be).
        for target in [FIP_U, "203.0.113.77", NEXTHOP] {
            match lab.arrive(&arp_request(target))? {
                Arrival::Passed(out) => ensure!(
                    out.return_code == TC_ACT_OK && out.verdict.action == 0,
                    "ARP for {target}: uplink_ingress returned {} verdict {}",
                    out.return_code,
                    out.verdict.action
                ),
                _ => anyhow::bail!("ARP for {target} was answered or dropped"),
            }
        }
        Ok(())
    })
}

#[test]
fn uplink_xdp_drops_ipv4_for_an_unassociated_floating_ip() -> Result<()> {
    with_lab(|lab| {
        let before = lab.uplink_drops(DropReason::NoNatBinding)?;
        for (protocol, l4) in [
            (proto::UDP, udp(1, 2)),
            (proto::ICMP, frames::icmp4_echo(1, 1)),
        ] {
            let frame = eth(R1_GW, NEXTHOP_MAC, &ip4(REMOTE, FIP_U, 64, protocol, &l4));
            let code = lab
                .datapath
                .test_run(program_names::UPLINK_XDP, lab.devices[UPLINK], 0, &frame, 1)?
                .return_code;
            ensure!(code == XDP_DROP, "protocol {protocol}: XDP returned {code}");
        }
        ensure!(
            lab.uplink_drops(DropReason::NoNatBinding)? == before + 2,
            "no_nat_binding not counted"
        );
        // A malformed header for an address it holds: dropped too, as such.
        let mut frame = eth(
            R1_GW,
            NEXTHOP_MAC,
            &ip4(REMOTE, FIP_A, 64, proto::UDP, &udp(1, 2)),
        );
        frame[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&500u16.to_be_bytes());
        lab.inbound_drop(
            &frame,
            DropReason::MalformedIpv4,
            "total length past the frame",
        )?;
        // For the router's MAC but no address it holds or routes to: no route.
        let frame = eth(
            R1_GW,
            NEXTHOP_MAC,
            &ip4(REMOTE, "203.0.113.77", 64, proto::UDP, &udp(1, 2)),
        );
        lab.inbound_drop(&frame, DropReason::NoRoute, "for the router, to nowhere")?;
        // For another MAC and no address of this node: the host's, passed.
        let frame = eth(
            [0x02, 0, 0, 0, 0, 0x99],
            NEXTHOP_MAC,
            &ip4(REMOTE, "203.0.113.77", 64, proto::UDP, &udp(1, 2)),
        );
        match lab.arrive(&frame)? {
            Arrival::Passed(out) => ensure!(
                out.return_code == TC_ACT_OK && out.verdict.action == 0,
                "not the host's"
            ),
            _ => anyhow::bail!("a stranger's packet was answered or dropped"),
        }
        Ok(())
    })
}

#[test]
fn uplink_xdp_answers_pings_of_the_gateway() -> Result<()> {
    with_lab(|lab| {
        let ping = eth(
            R1_GW,
            NEXTHOP_MAC,
            &ip4(REMOTE, GW1, 60, proto::ICMP, &frames::icmp4_echo(3, 9)),
        );
        let Arrival::Tx(pong) = lab.arrive(&ping)? else {
            anyhow::bail!("ping of the gateway not answered");
        };
        ensure!(
            pong[0..6] == NEXTHOP_MAC && pong[6..12] == R1_GW,
            "MACs {:02x?}",
            &pong[..12]
        );
        let reply = &pong[ETH_HLEN..];
        ensure!(
            reply[12..16] == ip(GW1).octets() && reply[16..20] == ip(REMOTE).octets(),
            "addresses"
        );
        ensure!(
            frames::checksum(&[&reply[..IPV4_HLEN]]) == 0,
            "header checksum"
        );
        ensure!(
            reply[20] == icmp4_type::ECHO_REPLY && frames::checksum(&[&reply[20..]]) == 0,
            "icmp"
        );
        ensure!(reply[24..28] == [0, 3, 0, 9], "identifier and sequence");
        Ok(())
    })
}

#[test]
fn an_unresolved_external_gateway_drops_what_leaves_as_no_neighbor() -> Result<()> {
    with_lab(|lab| {
        lab.uplink.gateway_macs.clear();
        lab.compile(&state(GW1)?)?;
        for (from, mac, addr, what) in [("ta", MAC_A, A, "floating IP"), ("tb", MAC_B, B, "SNAT")] {
            let frame = eth(
                R1_N1,
                mac,
                &ip4(addr, REMOTE, 64, proto::UDP, &udp(40000, 53)),
            );
            lab.expect_drop(from, &frame, DropReason::NoNeighbor, what)?;
        }
        // What stays on the node needs no next hop.
        let frame = eth(
            R1_N1,
            MAC_A,
            &ip4(A, FIP_C, 64, proto::UDP, &udp(40000, 7100)),
        );
        lab.expect_to("ta", &frame, "tc", "hairpin")?;
        // Resolved again: out it goes.
        lab.uplink
            .gateway_macs
            .insert(ip(NEXTHOP).into(), MacAddr(NEXTHOP_MAC));
        lab.compile(&state(GW1)?)?;
        let frame = eth(
            R1_N1,
            MAC_A,
            &ip4(A, REMOTE, 64, proto::UDP, &udp(40000, 53)),
        );
        lab.expect_to("ta", &frame, UPLINK, "resolved")?;
        Ok(())
    })
}

#[test]
fn snat_refuses_what_it_cannot_translate() -> Result<()> {
    with_lab(|lab| {
        // A later fragment has no ports; other ICMP than echo requests has no
        // identifier a reply could come back by.
        let fragment = frames::ipv4_fragment(ip(B), ip(REMOTE), proto::UDP, 8, false, &[0; 16]);
        lab.expect_drop(
            "tb",
            &eth(R1_N1, MAC_B, &fragment),
            DropReason::NatUnsupported,
            "later fragment",
        )?;
        let reply = ip4(B, REMOTE, 64, proto::ICMP, &frames::icmp4_echo_reply(1, 1));
        lab.expect_drop(
            "tb",
            &eth(R1_N1, MAC_B, &reply),
            DropReason::NatUnsupported,
            "echo reply",
        )?;
        // With a floating IP, a later fragment leaves as it (addresses only).
        let fragment = frames::ipv4_fragment(ip(A), ip(REMOTE), proto::UDP, 8, false, &[0; 16]);
        let out = lab.expect_to(
            "ta",
            &eth(R1_N1, MAC_A, &fragment),
            UPLINK,
            "a's later fragment",
        )?;
        let mut expected =
            frames::ipv4_fragment(ip(FIP_A), ip(REMOTE), proto::UDP, 8, false, &[0; 16]);
        frames::set_ttl4(&mut expected, 63);
        same(
            &out,
            &eth(NEXTHOP_MAC, R1_GW, &expected),
            "a's later fragment",
        )
    })
}

#[test]
fn a_full_port_range_is_counted_as_exhausted() -> Result<()> {
    with_lab(|lab| {
        let mut ports = std::collections::BTreeSet::new();
        for sport in 0..SNAT_COUNT {
            let frame = eth(
                R1_N1,
                MAC_B,
                &ip4(B, REMOTE, 64, proto::UDP, &udp(30000 + sport, 53)),
            );
            let out = lab.expect_to("tb", &frame, UPLINK, "filling the range")?;
            ports.insert(snat_port(&out, "filling")?);
        }
        ensure!(
            ports.len() == usize::from(SNAT_COUNT),
            "ports shared: {ports:?}"
        );
        let frame = eth(
            R1_N1,
            MAC_B,
            &ip4(B, REMOTE, 64, proto::UDP, &udp(31000, 53)),
        );
        lab.expect_drop("tb", &frame, DropReason::NatPortsExhausted, "one more")?;
        // Another remote port is another endpoint: the whole range again.
        let frame = eth(
            R1_N1,
            MAC_B,
            &ip4(B, REMOTE, 64, proto::UDP, &udp(31000, 54)),
        );
        lab.expect_to("tb", &frame, UPLINK, "other endpoint")?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------
// Cases where the datapath does not do what the Networking API means (see the report
// in each `ignore`): kept as precise reproductions.

/// A VM pings its router's gateway address: the router's own address answers, as
/// the router's interface addresses do and as the gateway does from outside.
#[test]
fn a_vm_pings_its_routers_gateway_address() -> Result<()> {
    with_lab(|lab| {
        for (dev, mac, addr) in [("ta", MAC_A, A), ("tb", MAC_B, B)] {
            let ping = eth(
                R1_N1,
                mac,
                &ip4(addr, GW1, 64, proto::ICMP, &frames::icmp4_echo(4, 1)),
            );
            let pong = lab.expect_to(dev, &ping, dev, "ping of the gateway")?;
            let reply = &pong[ETH_HLEN..];
            ensure!(reply[20] == icmp4_type::ECHO_REPLY, "not an echo reply");
            ensure!(
                reply[12..16] == ip(GW1).octets() && reply[16..20] == ip(addr).octets(),
                "addresses"
            );
        }
        Ok(())
    })
}

/// Another router's gateway address is one hop further: a ping of it is answered
/// when its TTL allows the hop, and with TTL 1 expires at the VM's own router.
#[test]
fn another_routers_gateway_is_one_hop_further() -> Result<()> {
    with_lab(|lab| {
        let ping = |ttl| {
            eth(
                R1_N1,
                MAC_A,
                &ip4(A, GW2, ttl, proto::ICMP, &frames::icmp4_echo(5, 1)),
            )
        };
        let pong = lab.expect_to("ta", &ping(64), "ta", "ping of r2's gateway")?;
        let reply = &pong[ETH_HLEN..];
        ensure!(reply[20] == icmp4_type::ECHO_REPLY, "not an echo reply");
        ensure!(reply[12..16] == ip(GW2).octets(), "not from r2's gateway");
        let expired = lab.expect_to("ta", &ping(1), "ta", "TTL 1 to r2's gateway")?;
        let error = &expired[ETH_HLEN..];
        ensure!(error[20] == icmp4_type::TIME_EXCEEDED, "not time exceeded");
        ensure!(error[12..16] == [10, 0, 1, 1], "not from a's gateway");
        Ok(())
    })
}

/// A router without SNAT sends its ports' traffic out untranslated; the replies come
/// back to those fixed addresses through the gateway and must be routed to the ports.
#[test]
fn a_router_without_snat_routes_replies_to_fixed_addresses() -> Result<()> {
    with_lab(|lab| {
        let out = lab.expect_to(
            "td",
            &eth(
                R2_N3,
                MAC_D,
                &ip4(D, REMOTE, 64, proto::UDP, &udp(40000, 53)),
            ),
            UPLINK,
            "d out",
        )?;
        same(
            &out,
            &eth(
                NEXTHOP_MAC,
                R2_GW,
                &ip4(D, REMOTE, 63, proto::UDP, &udp(40000, 53)),
            ),
            "d out",
        )?;
        let reply = eth(
            R2_GW,
            NEXTHOP_MAC,
            &ip4(REMOTE, D, 60, proto::UDP, &udp(53, 40000)),
        );
        let got = lab.inbound_to(&reply, "td", "reply to d")?;
        same(
            &got,
            &eth(
                MAC_D,
                R2_N3,
                &ip4(REMOTE, D, 59, proto::UDP, &udp(53, 40000)),
            ),
            "reply to d",
        )
    })
}

/// An ICMP error between two VMs through their floating IPs (hairpin): both addresses
/// of the quote are translated back to what the error's receiver sent.
#[test]
fn a_hairpinned_icmp_error_between_floating_ips_quotes_what_its_receiver_sent() -> Result<()> {
    with_lab(|lab| {
        // c sends to a's floating IP; a answers with port unreachable.
        let sent = ip4(C, FIP_A, 64, proto::UDP, &udp(7100, 7000));
        let got = lab.expect_to("tc", &eth(R1_N2, MAC_C, &sent), "ta", "c to fip a")?;
        let received = &got[ETH_HLEN..];
        let out = lab.expect_to(
            "ta",
            &eth(R1_N1, MAC_A, &port_unreachable(A, FIP_C, 64, received)),
            "tc",
            "error to c",
        )?;
        // c gets it from a's floating IP, quoting c's packet as c sent it: from c's
        // fixed address to a's floating IP (TTL as it was when a got it).
        let quote = translated_quote(received, true, C, 0, None);
        let quote = translated_quote(&quote, false, FIP_A, 0, None);
        same(
            &out,
            &eth(MAC_C, R1_N2, &port_unreachable(FIP_A, C, 63, &quote)),
            "fip hairpin error",
        )
    })
}

/// An ICMP error from a VM with a floating IP about what a VM behind SNAT sent it
/// (hairpin through the gateway address): it belongs to the SNAT connection and
/// reaches that VM, translated.
#[test]
fn a_hairpinned_icmp_error_to_the_gateway_reaches_the_snat_vm() -> Result<()> {
    with_lab(|lab| {
        let got = lab.expect_to(
            "tb",
            &eth(
                R1_N1,
                MAC_B,
                &ip4(B, FIP_C, 64, proto::UDP, &udp(40001, 7100)),
            ),
            "tc",
            "b to fip c",
        )?;
        snat_port(&got, "b to fip c")?;
        let received = &got[ETH_HLEN..];
        let out = lab.expect_to(
            "tc",
            &eth(R1_N2, MAC_C, &port_unreachable(C, GW1, 64, received)),
            "tb",
            "error to b",
        )?;
        let quote = translated_quote(received, true, B, 0, Some(40001));
        let quote = translated_quote(&quote, false, FIP_C, 0, None);
        same(
            &out,
            &eth(MAC_B, R1_N1, &port_unreachable(FIP_C, B, 63, &quote)),
            "snat hairpin error",
        )
    })
}

/// The gateway's echo reply is a datagram of its own, with the router's TTL (64, as
/// the router's echo replies inside have), not what was left of the request's: a
/// request that arrives with TTL 1 (the last hop of a traceroute) gets a reply that
/// can make it back.
#[test]
fn the_gateways_echo_reply_has_a_ttl_of_its_own() -> Result<()> {
    with_lab(|lab| {
        let ping = eth(
            R1_GW,
            NEXTHOP_MAC,
            &ip4(REMOTE, GW1, 1, proto::ICMP, &frames::icmp4_echo(3, 9)),
        );
        let Arrival::Tx(pong) = lab.arrive(&ping)? else {
            anyhow::bail!("ping of the gateway not answered");
        };
        ensure!(pong[ETH_HLEN + 8] == 64, "reply TTL {}", pong[ETH_HLEN + 8]);
        ensure!(
            frames::checksum(&[&pong[ETH_HLEN..ETH_HLEN + IPV4_HLEN]]) == 0,
            "header checksum"
        );
        Ok(())
    })
}

/// A connection keeps its SNAT port for as long as it lives, also when its forward
/// entry (`SNAT4_OUT`) outlived the binding it named: here because the gateway's
/// address changed; in production when another connection took its port after it
/// idled past its lifetime. The connection binds a new port once, and its forward
/// entry is replaced: the next packets keep that port.
#[test]
fn a_connection_keeps_its_snat_port_after_its_forward_entry_went_stale() -> Result<()> {
    with_lab(|lab| {
        // Many ports, so that a new port by chance equal to the stale one is unlikely.
        lab.uplink.snat_port_count = 1000;
        lab.compile(&state(GW1)?)?;
        let frame = eth(
            R1_N1,
            MAC_B,
            &ip4(B, REMOTE, 64, proto::UDP, &udp(40000, 53)),
        );
        lab.expect_to("tb", &frame, UPLINK, "before the change")?;
        // The router's gateway moves to another address.
        lab.compile(&state("203.0.113.11")?)?;
        let mut ports = Vec::new();
        for _ in 0..4 {
            let out = lab.expect_to("tb", &frame, UPLINK, "after the change")?;
            ensure!(
                out[ETH_HLEN + 12..ETH_HLEN + 16] == [203, 0, 113, 11],
                "not the new gateway"
            );
            ports.push(source_port(&out));
        }
        let bindings = lab.datapath.snat_bindings()?.len();
        ensure!(
            ports.windows(2).all(|w| w[0] == w[1]),
            "one connection, ports {ports:?} ({bindings} bindings)"
        );
        Ok(())
    })
}

/// An ICMP error a VM behind SNAT sends about a reply of its connection leaves with
/// the connection's current port, also when the forward entry went stale (as in
/// `a_connection_keeps_its_snat_port_after_its_forward_entry_went_stale`): the
/// forward entry counts only while `SNAT4_IN` still points back to the connection.
#[test]
fn an_icmp_error_about_a_connection_uses_its_current_port() -> Result<()> {
    with_lab(|lab| {
        lab.uplink.snat_port_count = 1000;
        lab.compile(&state(GW1)?)?;
        let frame = eth(
            R1_N1,
            MAC_B,
            &ip4(B, REMOTE, 64, proto::UDP, &udp(40000, 53)),
        );
        lab.expect_to("tb", &frame, UPLINK, "before the change")?;
        lab.compile(&state("203.0.113.11")?)?;
        let out = lab.expect_to("tb", &frame, UPLINK, "after the change")?;
        let port = source_port(&out);
        let reply = eth(
            R1_GW,
            NEXTHOP_MAC,
            &ip4(REMOTE, "203.0.113.11", 60, proto::UDP, &udp(53, port)),
        );
        let got = lab.inbound_to(&reply, "tb", "reply")?;
        let received = &got[ETH_HLEN..];
        let error = eth(R1_N1, MAC_B, &port_unreachable(B, REMOTE, 64, received));
        let out = lab.expect_to("tb", &error, UPLINK, "port unreachable")?;
        let quote = translated_quote(received, false, "203.0.113.11", 2, Some(port));
        same(
            &out,
            &eth(
                NEXTHOP_MAC,
                R1_GW,
                &port_unreachable("203.0.113.11", REMOTE, 63, &quote),
            ),
            "port unreachable",
        )
    })
}

#[test]
fn compiled_nat_tables_follow_the_state() -> Result<()> {
    with_lab(|lab| {
        let state = state(GW1)?;
        let compiled = compile(
            &state,
            &NodeView {
                node_name: NODE,
                interfaces: &lab.devices,
                peer_devices: &Default::default(),
                uplink: Some(&lab.uplink),
            },
            &mut lab.slots,
        );
        let t = &compiled.tables;
        ensure!(t.router_gw.len() == 2, "router_gw {:?}", t.router_gw);
        // Two gateways, two associated floating IPs, one unassociated.
        ensure!(t.ext_addrs4.len() == 5, "ext_addrs4 {:?}", t.ext_addrs4);
        ensure!(
            t.fips4.len() == 2 && t.fip_of4.len() == 2,
            "fips4 {:?}",
            t.fips4
        );
        Ok(())
    })
    .context("tables")
}

/// `Datapath::test_run` runs XDP programs on the whole frame.
#[test]
fn datapath_test_run_gives_xdp_programs_the_whole_frame() -> Result<()> {
    with_lab(|lab| {
        let out = lab.datapath.test_run(
            program_names::UPLINK_XDP,
            lab.devices[UPLINK],
            0,
            &arp_request(GW1),
            1,
        )?;
        ensure!(
            out.return_code == XDP_TX,
            "XDP returned {} for ARP for the gateway",
            out.return_code
        );
        same(&out.frame, &arp_reply(R1_GW, GW1), "arp reply")
    })
}

/// RFC 1812 4.3.2.7 (and RFC 1122 3.2.2): no ICMP error about a datagram that is not
/// the first fragment. Routing, not NAT: found by the NAT differential test.
#[test]
fn no_time_exceeded_error_about_a_later_fragment() -> Result<()> {
    with_lab(|lab| {
        let mut fragment = frames::ipv4_fragment(ip(A), ip(C), proto::UDP, 8, false, &[0x5a; 16]);
        frames::set_ttl4(&mut fragment, 1);
        lab.expect_drop(
            "ta",
            &eth(R1_N1, MAC_A, &fragment),
            DropReason::TtlExceeded,
            "expired later fragment",
        )
    })
}
