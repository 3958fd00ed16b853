//! The agent's neighbour resolver (`dataplane_agent::kernel::neighbor`: ARP and IPv6
//! neighbour discovery) against a real host stack: a node namespace with an unaddressed
//! uplink, and a gateway namespace at the other end of the veth that answers as any
//! Linux host would. Needs root.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use dataplane_agent::kernel::neighbor;
use dataplane_tests::netns::NetNs;

const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const GATEWAY_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];
const NODE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x10);
const GATEWAY_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 1);
const UPLINK: &str = "uplink0";
const GATEWAY_DEV: &str = "gw0";

/// The node namespace with `uplink0` (no address) and the gateway namespace with
/// `gw0` at 203.0.113.1/24 and 2001:db8:e::1/64, both with known MACs and up. Returns
/// the uplink's ifindex.
fn uplink_and_gateway(tag: &str) -> Result<(NetNs, NetNs, u32)> {
    let node = NetNs::new(tag)?;
    let gateway = NetNs::new(tag)?;
    node.add_veth(UPLINK, Some(&gateway), GATEWAY_DEV)?;
    node.set_mac(UPLINK, NODE_MAC)?;
    gateway.set_mac(GATEWAY_DEV, GATEWAY_MAC)?;
    gateway.ip(&["addr", "add", "203.0.113.1/24", "dev", GATEWAY_DEV])?;
    gateway.ip(&[
        "addr",
        "add",
        "2001:db8:e::1/64",
        "dev",
        GATEWAY_DEV,
        "nodad",
    ])?;
    node.set_up(UPLINK, true)?;
    gateway.set_up(GATEWAY_DEV, true)?;
    let ifindex = node.ifindex(UPLINK)?;
    Ok((node, gateway, ifindex))
}

#[test]
fn the_gateway_answers_with_its_mac() -> Result<()> {
    let (node, _gateway, ifindex) = uplink_and_gateway("arp-gw")?;
    let mac = node.run(|| {
        neighbor::resolve(
            ifindex,
            NODE_MAC,
            NODE_IP.into(),
            GATEWAY_IP.into(),
            Duration::from_secs(2),
        )
    })??;
    ensure!(mac == Some(GATEWAY_MAC), "resolved {mac:02x?}");
    Ok(())
}

#[test]
fn the_gateway_advertises_its_ipv6_mac() -> Result<()> {
    let (node, _gateway, ifindex) = uplink_and_gateway("nd-gw")?;
    let mac = node.run(|| {
        neighbor::resolve(
            ifindex,
            NODE_MAC,
            NODE_IP6.into(),
            GATEWAY_IP6.into(),
            Duration::from_secs(2),
        )
    })??;
    ensure!(mac == Some(GATEWAY_MAC), "resolved {mac:02x?}");
    Ok(())
}

#[test]
fn mixed_families_are_refused() -> Result<()> {
    let answer = neighbor::resolve(
        1,
        NODE_MAC,
        NODE_IP.into(),
        IpAddr::V6(GATEWAY_IP6),
        Duration::from_millis(10),
    );
    ensure!(answer.is_err(), "resolved {answer:?}");
    Ok(())
}

#[test]
fn nobody_at_the_address_times_out() -> Result<()> {
    let (node, _gateway, ifindex) = uplink_and_gateway("arp-none")?;
    let unused: [(IpAddr, IpAddr); 2] = [
        (NODE_IP.into(), Ipv4Addr::new(203, 0, 113, 99).into()),
        (
            NODE_IP6.into(),
            "2001:db8:e::99".parse::<Ipv6Addr>()?.into(),
        ),
    ];
    for (source, target) in unused {
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let mac = node.run(|| neighbor::resolve(ifindex, NODE_MAC, source, target, timeout))??;
        let elapsed = started.elapsed();
        ensure!(mac.is_none(), "resolved {mac:02x?} for unused {target}");
        ensure!(
            elapsed >= timeout && elapsed < timeout + Duration::from_millis(500),
            "{target}: gave up after {elapsed:?}, asked for {timeout:?}"
        );
    }
    Ok(())
}
