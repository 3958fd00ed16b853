//! Routers, compiled into the routing tables of `dataplane_abi::router`.
//!
//! Only what this node can route is programmed: a router's interfaces on networks
//! with local ports (the networks that have a slot). Each interface gives
//! - `ROUTER_IFS` (network, the interface port's MAC) → the router and that
//!   interface's addresses, where routing starts;
//! - an on-link route to its subnet and a `LOCAL` route to its own address;
//! - a `ROUTER` neighbour entry for its address (the datapath answers ARP and ND).
//!
//! A static route goes out of the interface whose subnet holds its next hop; one whose
//! next hop no interface here reaches is left out. Neighbours are the fixed IPs and
//! exact allowed address pairs of the ports of those networks.
use std::net::IpAddr;

use dataplane_abi::{
    neigh_flags, route_flags, FdbKey, NeighKey4, NeighKey6, Neighbor, Route, RouteKey4, RouteKey6,
    RouterIf, ROUTE_FIXED_BITS,
};
use ipnet::IpNet;

use super::{nat::ProgrammedRouter, DatapathTables, Slots};
use crate::core::model::{MacAddr, Port, Router, State};

/// A router interface as programmed: network slot, MAC, one address per family.
pub(super) struct Interface {
    pub network_slot: u32,
    pub mac: MacAddr,
    pub subnet: IpNet,
    pub address: IpAddr,
}

/// Programs every admin-up router of `state` that touches a network with a slot.
/// Returns the routers programmed.
pub(super) fn compile_routers<'s>(
    state: &'s State,
    slots: &mut Slots,
    tables: &mut DatapathTables,
) -> Vec<ProgrammedRouter<'s>> {
    add_neighbors(state, slots, tables);
    let routers: Vec<&Router> = state
        .routers
        .values()
        .filter(|router| router.admin_state_up)
        .collect();
    slots
        .routers
        .retain(|id| routers.iter().any(|router| &router.id == id));
    let mut programmed = Vec::new();
    for router in routers {
        let interfaces = interfaces(state, slots, router);
        if interfaces.is_empty() {
            continue;
        }
        let Some(router_slot) = slots.routers.assign(&router.id) else {
            continue;
        };
        for interface in &interfaces {
            add_interface(tables, router_slot, interface);
        }
        for route in &router.routes {
            let Some(out) = interfaces
                .iter()
                .find(|i| i.subnet.contains(&route.nexthop))
            else {
                continue;
            };
            let mut nexthop = [0; 16];
            match route.nexthop {
                IpAddr::V4(v4) => nexthop[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => nexthop = v6.octets(),
            }
            let value = Route {
                network_slot: out.network_slot,
                flags: route_flags::VIA,
                mac: out.mac.0,
                _pad: [0; 2],
                nexthop,
            };
            add_route(tables, router_slot, route.destination, value);
        }
        programmed.push(ProgrammedRouter {
            router,
            slot: router_slot,
            interfaces,
        });
    }
    programmed
}

/// The router's interfaces this node can route through.
fn interfaces(state: &State, slots: &Slots, router: &Router) -> Vec<Interface> {
    router
        .interfaces
        .iter()
        .filter_map(|interface| {
            let subnet = state.subnets.get(&interface.subnet_id)?;
            let port = state.ports.get(interface.port_id.as_deref()?)?;
            let network_slot = slots.network_slot(&port.network_id)?;
            let address = port
                .fixed_ips
                .iter()
                .find(|fixed| fixed.subnet_id == subnet.id)
                .map(|fixed| fixed.ip_address)
                .or(subnet.gateway_ip)?;
            Some(Interface {
                network_slot,
                mac: port.mac_address,
                subnet: subnet.cidr,
                address,
            })
        })
        .collect()
}

fn add_interface(tables: &mut DatapathTables, router_slot: u32, interface: &Interface) {
    let key = FdbKey {
        network_slot: interface.network_slot,
        mac: interface.mac.0,
        _pad: [0; 2],
    };
    let entry = tables.router_ifs.entry(key).or_insert(RouterIf {
        router_slot,
        ..RouterIf::default()
    });
    match interface.address {
        IpAddr::V4(v4) => entry.ip4 = v4.octets(),
        IpAddr::V6(v6) => entry.ip6 = v6.octets(),
    }
    let on_link = Route {
        network_slot: interface.network_slot,
        flags: 0,
        mac: interface.mac.0,
        _pad: [0; 2],
        nexthop: [0; 16],
    };
    add_route(tables, router_slot, interface.subnet, on_link);
    let own = Route {
        flags: route_flags::LOCAL,
        ..on_link
    };
    add_route(tables, router_slot, IpNet::from(interface.address), own);
    add_neighbor(
        tables,
        interface.network_slot,
        interface.address,
        Neighbor {
            mac: interface.mac.0,
            _pad: [0; 2],
            flags: neigh_flags::ROUTER,
        },
    );
}

/// Adds `route` to `destination`; a more specific entry for the same prefix (a static
/// route shadowing a subnet) is not overwritten.
pub(super) fn add_route(
    tables: &mut DatapathTables,
    router_slot: u32,
    destination: IpNet,
    route: Route,
) {
    let prefix = ROUTE_FIXED_BITS + u32::from(destination.prefix_len());
    match destination.trunc() {
        IpNet::V4(net) => {
            let key = RouteKey4 {
                router_slot,
                addr: net.network().octets(),
            };
            tables.routes4.entry((prefix, key)).or_insert(route);
        }
        IpNet::V6(net) => {
            let key = RouteKey6 {
                router_slot,
                addr: net.network().octets(),
            };
            tables.routes6.entry((prefix, key)).or_insert(route);
        }
    }
}

fn add_neighbor(tables: &mut DatapathTables, network_slot: u32, addr: IpAddr, neighbor: Neighbor) {
    match addr {
        IpAddr::V4(v4) => {
            let key = NeighKey4 {
                network_slot,
                addr: v4.octets(),
            };
            tables.neigh4.insert(key, neighbor);
        }
        IpAddr::V6(v6) => {
            let key = NeighKey6 {
                network_slot,
                addr: v6.octets(),
            };
            tables.neigh6.insert(key, neighbor);
        }
    }
}

/// The addresses of the ports on networks with a slot. Router interface ports come
/// later (as `ROUTER` entries) and win.
fn add_neighbors(state: &State, slots: &Slots, tables: &mut DatapathTables) {
    for port in state.ports.values() {
        let Some(network_slot) = slots.network_slot(&port.network_id) else {
            continue;
        };
        for (mac, addr) in port_addresses(port) {
            let neighbor = Neighbor {
                mac: mac.0,
                _pad: [0; 2],
                flags: 0,
            };
            add_neighbor(tables, network_slot, addr, neighbor);
        }
    }
}

/// A port's fixed IPs (with its MAC) and the single addresses of its allowed pairs.
fn port_addresses(port: &Port) -> impl Iterator<Item = (MacAddr, IpAddr)> + '_ {
    let fixed = port
        .fixed_ips
        .iter()
        .map(|fixed| (port.mac_address, fixed.ip_address));
    let pairs = port
        .allowed_address_pairs
        .iter()
        .filter(|pair| pair.ip_address.prefix_len() == pair.ip_address.max_prefix_len())
        .map(|pair| {
            (
                pair.mac_address.unwrap_or(port.mac_address),
                pair.ip_address.addr(),
            )
        });
    fixed.chain(pairs)
}
