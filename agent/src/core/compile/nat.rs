//! Routers' external gateways and floating IPs, compiled into the NAT maps of
//! `dataplane_abi::nat`. The Networking API translates IPv4 only; IPv6 is routed to
//! the external network with the tenant's addresses.
//!
//! A programmed router with `external_gateway_info` gets, when this node has an uplink,
//! for each address family it has an external fixed IP of (on a subnet with a
//! `gateway_ip`):
//! - a default route with `route_flags::EXTERNAL` (static routes and its subnets win);
//! - `ROUTER_GW` / `ROUTER_GW6`: the way out (uplink, the gateway port's MAC, the
//!   external subnet's gateway MAC as the kernel layer resolved it), and for IPv4 SNAT
//!   (`enable_snat`, the gateway's external fixed IP, the node's port range);
//! - `EXT_ADDRS4` / `EXT_ADDRS6` for the gateway address (and a `LOCAL` route: it
//!   answers pings; the uplink answers ARP and neighbour solicitations for it);
//! - `GATEWAY_MACS`: what arrives on the uplink for the gateway port's MAC and no
//!   external address is routed in untranslated (replies to ports of routers without
//!   SNAT, traffic the upstream routes to tenant subnets).
//!
//! Floating IPs are distributed: the node of the port translates them. Each associated
//! floating IP of a local port on a router programmed here gets `FIPS4` (floating →
//! fixed), `FIP_OF4` (fixed → floating) and `EXT_ADDRS4`; the unassociated ones of the
//! external networks this node's gateways are on get `EXT_ADDRS4` as `UNBOUND`, so
//! what still arrives for them is dropped and counted.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dataplane_abi::{
    ext_addr_flags, gateway_flags, route_flags, ExternalAddr, FixedAddr4, FixedNat4, FloatingIp4,
    Route, RouterGateway, RouterGateway6,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{router::Interface, DatapathTables, Slots, StatusKind, Uplink};
use crate::core::model::{FloatingIp, MacAddr, Port, Router, State};

/// `device_owner` of a router's external gateway port.
pub const ROUTER_GATEWAY_OWNER: &str = "network:router_gateway";
pub const NO_UPLINK: &str = "this node has no uplink configured for external networks";

/// A router the compiler programmed: its slot and interfaces here.
pub(super) struct ProgrammedRouter<'s> {
    pub router: &'s Router,
    pub slot: u32,
    pub interfaces: Vec<Interface>,
}

/// Statuses the external side decides: routers whose gateway is not programmed
/// (with why), and every floating IP.
#[derive(Default)]
pub(super) struct NatStatuses {
    pub routers: Vec<(String, StatusKind, String)>,
    pub floating_ips: Vec<(String, u64, StatusKind, String)>,
}

/// The router's way out, as the state describes it.
struct Gateway {
    /// Per family: the router's address on the external subnet, and that subnet's
    /// gateway (the next hop of what leaves).
    v4: Option<(Ipv4Addr, Ipv4Addr)>,
    v6: Option<(Ipv6Addr, Ipv6Addr)>,
    mac: MacAddr,
    network_id: String,
    snat: bool,
}

impl Gateway {
    /// Each family's (router address, next hop).
    fn legs(&self) -> impl Iterator<Item = (IpAddr, IpAddr)> {
        let v4 = self.v4.map(|(a, n)| (IpAddr::V4(a), IpAddr::V4(n)));
        let v6 = self.v6.map(|(a, n)| (IpAddr::V6(a), IpAddr::V6(n)));
        v4.into_iter().chain(v6)
    }
}

/// What the kernel layer must resolve on the uplink: the MAC of each external subnet
/// gateway a router uses (ARP for IPv4, neighbour discovery for IPv6), asked from the
/// router's own address and MAC.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GatewayNeighbor {
    pub nexthop: IpAddr,
    pub source: IpAddr,
    pub source_mac: MacAddr,
}

/// The next hops of every admin-up router's external gateway.
pub fn gateway_neighbors(state: &State) -> Vec<GatewayNeighbor> {
    let mut out: Vec<GatewayNeighbor> = state
        .routers
        .values()
        .filter(|router| router.admin_state_up)
        .filter_map(|router| gateway(state, router).ok())
        .flat_map(|gw| {
            gw.legs()
                .map(|(source, nexthop)| GatewayNeighbor {
                    nexthop,
                    source,
                    source_mac: gw.mac,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The router's gateway: per family its first external fixed IP on a subnet with a
/// `gateway_ip`, which is the next hop; its gateway port's MAC. `Err`: why it has none
/// (empty: no external gateway at all).
fn gateway(state: &State, router: &Router) -> Result<Gateway, String> {
    let info = router
        .external_gateway_info
        .as_ref()
        .ok_or_else(String::new)?;
    let mut legs = info.external_fixed_ips.iter().filter_map(|fixed| {
        let subnet = state.subnets.get(&fixed.subnet_id)?;
        Some((fixed.ip_address, subnet.gateway_ip?))
    });
    let v4 = legs.clone().find_map(|leg| match leg {
        (IpAddr::V4(address), IpAddr::V4(nexthop)) => Some((address, nexthop)),
        _ => None,
    });
    let v6 = legs.find_map(|leg| match leg {
        (IpAddr::V6(address), IpAddr::V6(nexthop)) => Some((address, nexthop)),
        _ => None,
    });
    if v4.is_none() && v6.is_none() {
        return Err(
            "external gateway: no external fixed IP on a subnet with a gateway_ip".to_owned(),
        );
    }
    let port = state
        .ports
        .values()
        .find(|port| port.device_owner == ROUTER_GATEWAY_OWNER && port.device_id == router.id)
        .ok_or_else(|| {
            format!("external gateway: no port with device_owner {ROUTER_GATEWAY_OWNER}")
        })?;
    Ok(Gateway {
        v4,
        v6,
        mac: port.mac_address,
        network_id: info.network_id.clone(),
        snat: info.enable_snat,
    })
}

pub(super) fn compile_gateways(
    state: &State,
    slots: &Slots,
    uplink: Option<&Uplink>,
    routers: &[ProgrammedRouter<'_>],
    tables: &mut DatapathTables,
) -> NatStatuses {
    let mut statuses = NatStatuses::default();
    // Routers whose gateway is programmed, with it.
    let mut gateways = Vec::new();
    for programmed in routers {
        let router = programmed.router;
        let gw = match gateway(state, router) {
            Ok(gw) => gw,
            Err(reason) if reason.is_empty() => continue,
            Err(reason) => {
                statuses
                    .routers
                    .push((router.id.clone(), StatusKind::Error, reason));
                continue;
            }
        };
        let Some(uplink) = uplink else {
            statuses
                .routers
                .push((router.id.clone(), StatusKind::Error, NO_UPLINK.to_owned()));
            continue;
        };
        let unresolved: Vec<String> = gw
            .legs()
            .filter(|(_, nexthop)| !uplink.gateway_macs.contains_key(nexthop))
            .map(|(_, nexthop)| nexthop.to_string())
            .collect();
        if !unresolved.is_empty() {
            statuses.routers.push((
                router.id.clone(),
                StatusKind::Build,
                format!(
                    "resolving the external gateway {} on the uplink",
                    unresolved.join(" and ")
                ),
            ));
        }
        let nexthop_mac = |nexthop: IpAddr| {
            uplink
                .gateway_macs
                .get(&nexthop)
                .map_or([0; 6], |mac| mac.0)
        };
        let external = Route {
            flags: route_flags::EXTERNAL,
            ..Route::default()
        };
        if let Some((address, nexthop)) = gw.v4 {
            tables.router_gw.insert(
                programmed.slot,
                RouterGateway {
                    uplink_ifindex: uplink.ifindex,
                    flags: if gw.snat { gateway_flags::SNAT } else { 0 },
                    ip4: address.octets(),
                    port_min: uplink.snat_port_min,
                    port_count: uplink.snat_port_count,
                    mac: gw.mac.0,
                    nexthop_mac: nexthop_mac(IpAddr::V4(nexthop)),
                },
            );
            super::router::add_route(
                tables,
                programmed.slot,
                IpNet::V4(Ipv4Net::default()),
                external,
            );
            tables.ext_addrs4.insert(
                address.octets(),
                external_addr(gw.mac, ext_addr_flags::GATEWAY),
            );
        }
        if let Some((address, nexthop)) = gw.v6 {
            tables.router_gw6.insert(
                programmed.slot,
                RouterGateway6 {
                    uplink_ifindex: uplink.ifindex,
                    ip6: address.octets(),
                    mac: gw.mac.0,
                    nexthop_mac: nexthop_mac(IpAddr::V6(nexthop)),
                },
            );
            super::router::add_route(
                tables,
                programmed.slot,
                IpNet::V6(Ipv6Net::default()),
                external,
            );
            tables.ext_addrs6.insert(
                address.octets(),
                external_addr(gw.mac, ext_addr_flags::GATEWAY),
            );
        }
        // What arrives for the router's MAC and no external address is routed in.
        tables.gateway_macs.insert(gw.mac.0, programmed.slot);
        gateways.push((programmed, gw));
    }
    // The gateway addresses on each router's external network, its own too: pings
    // from inside are answered (as the gateway would, over the external network), the
    // rest is translated (hairpin).
    for (programmed, gw) in &gateways {
        for (router, other) in gateways
            .iter()
            .filter(|(_, o)| o.network_id == gw.network_id)
        {
            let beyond = if router.slot == programmed.slot {
                0
            } else {
                route_flags::BEYOND
            };
            for (address, _) in other.legs() {
                super::router::add_route(
                    tables,
                    programmed.slot,
                    IpNet::from(address),
                    Route {
                        flags: route_flags::LOCAL | route_flags::EXTERNAL | beyond,
                        ..Route::default()
                    },
                );
            }
        }
    }
    for fip in state.floating_ips.values() {
        let (kind, reason) = match floating_ip(state, slots, fip, &gateways, tables) {
            Ok(()) => (StatusKind::Active, String::new()),
            Err(reason) => (StatusKind::Down, reason),
        };
        statuses
            .floating_ips
            .push((fip.id.clone(), fip.revision_number, kind, reason));
    }
    statuses
}

/// Programs `fip` if its port is here and its router's gateway too; `Err`: why not.
fn floating_ip(
    state: &State,
    slots: &Slots,
    fip: &FloatingIp,
    gateways: &[(&ProgrammedRouter<'_>, Gateway)],
    tables: &mut DatapathTables,
) -> Result<(), String> {
    let IpAddr::V4(floating) = fip.floating_ip_address else {
        return Err("IPv6 floating IPs are not translated (the Networking API has none)".into());
    };
    // Floating IPs are IPv4: only routers with an IPv4 way out translate them.
    let gateways: Vec<_> = gateways.iter().filter(|(_, gw)| gw.v4.is_some()).collect();
    let on_network = gateways
        .iter()
        .find(|(_, gw)| gw.network_id == fip.floating_network_id);
    let Some(port_id) = &fip.port_id else {
        if let Some((_, gw)) = on_network {
            tables.ext_addrs4.insert(
                floating.octets(),
                external_addr(gw.mac, ext_addr_flags::UNBOUND),
            );
        }
        return Err("not associated with a port".into());
    };
    let port = state
        .ports
        .get(port_id)
        .ok_or_else(|| format!("port {port_id} does not exist"))?;
    let fixed = fixed_address(fip, port).ok_or("the port has no IPv4 fixed IP")?;
    slots
        .port_slot(port_id)
        .ok_or("its port is not on this node")?;
    let network_slot = slots
        .network_slot(&port.network_id)
        .ok_or("its port is not on this node")?;
    // The router is the one named, or the one with an interface on the port's subnet
    // that has a gateway to the floating IP's network.
    let (router, gw) = gateways
        .iter()
        .filter(|(programmed, gw)| {
            gw.network_id == fip.floating_network_id
                && fip
                    .router_id
                    .as_ref()
                    .is_none_or(|id| *id == programmed.router.id)
        })
        .find_map(|(programmed, gw)| {
            let interface = programmed.interfaces.iter().find(|i| {
                i.network_slot == network_slot && i.subnet.contains(&IpAddr::V4(fixed))
            })?;
            Some(((*programmed, interface), gw))
        })
        .ok_or("no router with an external gateway here reaches its port")?;
    let (programmed, interface) = router;
    tables.fips4.insert(
        floating.octets(),
        FloatingIp4 {
            fixed: fixed.octets(),
            network_slot,
            router_slot: programmed.slot,
            router_mac: interface.mac.0,
            _pad: [0; 2],
        },
    );
    tables.fip_of4.insert(
        FixedAddr4 {
            network_slot,
            addr: fixed.octets(),
        },
        FixedNat4 {
            floating: floating.octets(),
            router_slot: programmed.slot,
        },
    );
    tables.ext_addrs4.insert(
        floating.octets(),
        external_addr(gw.mac, ext_addr_flags::FLOATING),
    );
    Ok(())
}

/// An `EXT_ADDRS4` entry, answered for with `mac`.
fn external_addr(mac: MacAddr, flags: u32) -> ExternalAddr {
    ExternalAddr {
        mac: mac.0,
        _pad: [0; 2],
        flags,
    }
}

/// The fixed address the floating IP stands for: the one named, else the port's first
/// IPv4 fixed IP.
fn fixed_address(fip: &FloatingIp, port: &Port) -> Option<Ipv4Addr> {
    let named = match fip.fixed_ip_address {
        Some(IpAddr::V4(v4)) => Some(v4),
        Some(IpAddr::V6(_)) => return None,
        None => None,
    };
    named.or_else(|| {
        port.fixed_ips
            .iter()
            .find_map(|fixed| match fixed.ip_address {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
    })
}
