//! A reference evaluator of distributed routing, in plain Rust over the model (not over
//! the compiled maps), written from the Networking API's semantics: a router joins
//! the subnets of its interfaces, routes by longest prefix over those subnets and its
//! static routes (a static route's next hop must be on one of them), answers ARP and
//! echo requests for its interface addresses, and decrements the TTL of what it
//! forwards. The differential test holds `port_ingress` to it.
//!
//! IPv6 to and from external networks is routed too (the Networking API translates
//! only IPv4, held to `reference_nat`): a router with an IPv6 external fixed IP on a
//! subnet with a gateway has a default route out of the node's uplink to that gateway,
//! its gateway address (and those of the other routers on that network, one hop
//! further) answers pings, and what arrives on the uplink for its gateway port's MAC is
//! routed to its subnets.
//!
//! Scope: what a port sends to a router interface's MAC, and ARP requests for router
//! addresses, on this node (the router runs where the sender is); IPv6 arriving on the
//! uplink. Ports in the states it is used with have no port security and no allowed
//! address pairs, so switching and port security (held to `reference`) stay out of the
//! way; their external networks have IPv6 subnets only.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use dataplane_abi::DropReason;
use dataplane_agent::core::{
    compile::nat::ROUTER_GATEWAY_OWNER,
    model::{MacAddr, Port, Router, State},
};
use ipnet::IpNet;

/// What the sender put on the wire, as the generator made it.
#[derive(Clone, Debug)]
pub enum Sent {
    /// A UDP datagram to `dst` in a frame for `dst_mac`, with `ttl` (hop limit).
    Udp {
        dst_mac: MacAddr,
        dst: IpAddr,
        ttl: u8,
    },
    /// An ICMP echo request (either family) to `dst` in a frame for `dst_mac`.
    Echo { dst_mac: MacAddr, dst: IpAddr },
    /// A broadcast ARP request for `target`.
    ArpRequest { target: Ipv4Addr },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Routed {
    Drop(DropReason),
    /// Forwarded to `port` with these addresses and TTL.
    Forward {
        port: String,
        dst_mac: MacAddr,
        src_mac: MacAddr,
        ttl: u8,
    },
    /// Answered (ARP reply, echo reply) back to the sender by router MAC `from`.
    Answer {
        from: MacAddr,
    },
    /// Expired in the router: an ICMP time-exceeded error back to the sender from the
    /// interface `from`, and the expiry counted.
    TimeExceeded {
        from: MacAddr,
    },
    /// Arrived on the uplink and expired in the router: a time-exceeded error from its
    /// gateway address back out of the uplink, from its gateway port's MAC `from`.
    UplinkTimeExceeded {
        from: MacAddr,
    },
    /// Out of the uplink, to the external gateway's MAC from the router's gateway port's.
    Uplink {
        dst_mac: MacAddr,
        src_mac: MacAddr,
        ttl: u8,
    },
    /// Not the router's business: switched on the network as usual (arriving on the
    /// uplink: the host's).
    Switched,
}

/// The node: the state, this node's name, its port devices and its uplink.
pub struct RouterReference<'a> {
    pub state: &'a State,
    pub node_name: &'a str,
    pub devices: &'a BTreeMap<String, u32>,
    /// `None`: the node has no uplink, no external gateway is programmed.
    pub uplink: Option<&'a ExternalUplink>,
}

/// The uplink as the routing needs it: the external gateways' MACs resolved so far.
pub struct ExternalUplink {
    pub gateway_macs: BTreeMap<IpAddr, MacAddr>,
}

/// Where a route leads.
enum Via<'a> {
    /// An address of the router's (`beyond`: another router's gateway, one hop on).
    Local {
        beyond: bool,
    },
    OnLink(&'a Interface<'a>),
    /// A static route: out of this interface, to this next hop.
    Static(&'a Interface<'a>, IpAddr),
    /// Out of the router's IPv6 external gateway.
    External(&'a Gateway6),
}

/// A router's IPv6 way out: its address on the external network, that subnet's
/// gateway, its gateway port's MAC.
pub(crate) struct Gateway6 {
    network_id: String,
    address: IpAddr,
    nexthop: IpAddr,
    mac: MacAddr,
}

/// Keeps `via` if its prefix is longer than the best so far.
fn better<'a>(best: &mut Option<(u8, Via<'a>)>, prefix: u8, via: Via<'a>) {
    if best.as_ref().is_none_or(|(p, _)| prefix > *p) {
        *best = Some((prefix, via));
    }
}

/// A router interface this node programs: its port, subnet and address.
struct Interface<'a> {
    port: &'a Port,
    subnet: IpNet,
    address: IpAddr,
}

impl RouterReference<'_> {
    pub(crate) fn local(&self, port: &Port) -> bool {
        port.binding.host == self.node_name
            && self.devices.contains_key(&port.binding.interface_name)
    }

    /// A network the node has ports of (only those are routed here).
    pub(crate) fn network_here(&self, network_id: &str) -> bool {
        self.state
            .ports
            .values()
            .any(|p| p.network_id == network_id && self.local(p))
    }

    fn interfaces<'s>(&'s self, router: &'s Router) -> Vec<Interface<'s>> {
        router
            .interfaces
            .iter()
            .filter_map(|i| {
                let subnet = &self.state.subnets[&i.subnet_id];
                let port = &self.state.ports[i.port_id.as_deref()?];
                if !self.network_here(&port.network_id) {
                    return None;
                }
                let address = port
                    .fixed_ips
                    .iter()
                    .find(|f| f.subnet_id == subnet.id)
                    .map(|f| f.ip_address)
                    .or(subnet.gateway_ip)?;
                Some(Interface {
                    port,
                    subnet: subnet.cidr,
                    address,
                })
            })
            .collect()
    }

    /// The router's IPv6 way out, if the node has an uplink and the router an IPv6
    /// external fixed IP on a subnet with a gateway, and a gateway port.
    fn gateway6(&self, router: &Router) -> Option<Gateway6> {
        self.uplink?;
        let info = router.external_gateway_info.as_ref()?;
        let port = self
            .state
            .ports
            .values()
            .find(|p| p.device_owner == ROUTER_GATEWAY_OWNER && p.device_id == router.id)?;
        info.external_fixed_ips.iter().find_map(|fixed| {
            let nexthop = self.state.subnets.get(&fixed.subnet_id)?.gateway_ip?;
            (fixed.ip_address.is_ipv6() && nexthop.is_ipv6()).then(|| Gateway6 {
                network_id: info.network_id.clone(),
                address: fixed.ip_address,
                nexthop,
                mac: port.mac_address,
            })
        })
    }

    /// Routers that run here: admin up, with an interface programmed.
    fn routers(&self) -> impl Iterator<Item = (&Router, Vec<Interface<'_>>)> {
        self.state
            .routers
            .values()
            .filter(|r| r.admin_state_up)
            .map(|r| (r, self.interfaces(r)))
            .filter(|(_, i)| !i.is_empty())
    }

    /// What becomes of `sent` from `sender`.
    pub fn judge(&self, sender: &Port, sent: &Sent) -> Routed {
        let (dst_mac, dst) = match sent {
            Sent::ArpRequest { target } => {
                let answer = self.routers().find_map(|(_, interfaces)| {
                    interfaces
                        .iter()
                        .find(|i| {
                            i.port.network_id == sender.network_id
                                && i.address == IpAddr::V4(*target)
                        })
                        .map(|i| i.port.mac_address)
                });
                return match answer {
                    Some(from) => Routed::Answer { from },
                    None => Routed::Switched,
                };
            }
            Sent::Udp { dst_mac, dst, .. } | Sent::Echo { dst_mac, dst } => (*dst_mac, *dst),
        };
        let Some((router, interfaces)) = self.routers().find(|(_, interfaces)| {
            interfaces
                .iter()
                .any(|i| i.port.network_id == sender.network_id && i.port.mac_address == dst_mac)
        }) else {
            return Routed::Switched;
        };
        let gateways = self.gateways6();
        let Some(via) = self.route(router, &interfaces, &gateways, dst) else {
            return Routed::Drop(DropReason::NoRoute);
        };
        let ttl = match sent {
            Sent::Udp { ttl, .. } => *ttl,
            _ => 64,
        };
        let echo = matches!(sent, Sent::Echo { .. });
        let (out, nexthop) = match via {
            Via::Local { beyond } if !beyond || ttl > 1 => {
                return if echo {
                    Routed::Answer { from: dst_mac }
                } else {
                    Routed::Drop(DropReason::NoRoute)
                };
            }
            // Another router's gateway, a hop further than the TTL reaches.
            Via::Local { .. } => return self.expired(&interfaces, sender, dst_mac, dst),
            _ if ttl <= 1 => return self.expired(&interfaces, sender, dst_mac, dst),
            Via::External(gw) => {
                let resolved = self.uplink.and_then(|u| u.gateway_macs.get(&gw.nexthop));
                return match resolved {
                    Some(&mac) => Routed::Uplink {
                        dst_mac: mac,
                        src_mac: gw.mac,
                        ttl: ttl - 1,
                    },
                    None => Routed::Drop(DropReason::NoNeighbor),
                };
            }
            Via::OnLink(out) => (out, dst),
            Via::Static(out, nexthop) => (out, nexthop),
        };
        self.to_neighbor(out, nexthop, ttl)
    }

    /// The routers whose IPv6 gateway is programmed, with it.
    fn gateways6(&self) -> Vec<(&Router, Gateway6)> {
        self.routers()
            .filter_map(|(r, _)| Some((r, self.gateway6(r)?)))
            .collect()
    }

    /// The route `router` takes to `dst`, longest prefix first: its own addresses, its
    /// subnets, static routes (an entry there first wins a tie), then its external
    /// default route.
    fn route<'s>(
        &self,
        router: &Router,
        interfaces: &'s [Interface<'s>],
        gateways: &'s [(&Router, Gateway6)],
        dst: IpAddr,
    ) -> Option<Via<'s>> {
        let mut best: Option<(u8, Via)> = None;
        for i in interfaces {
            if IpNet::from(i.address).contains(&dst) {
                better(
                    &mut best,
                    IpNet::from(i.address).prefix_len(),
                    Via::Local { beyond: false },
                );
            }
        }
        let own = gateways
            .iter()
            .find(|(r, _)| r.id == router.id)
            .map(|(_, gw)| gw);
        if let Some(own) = own {
            for (other, gw) in gateways
                .iter()
                .filter(|(_, gw)| gw.network_id == own.network_id)
            {
                if gw.address == dst {
                    better(
                        &mut best,
                        128,
                        Via::Local {
                            beyond: other.id != router.id,
                        },
                    );
                }
            }
        }
        for i in interfaces {
            if i.subnet.contains(&dst) {
                better(&mut best, i.subnet.prefix_len(), Via::OnLink(i));
            }
        }
        for route in &router.routes {
            if route.destination.contains(&dst) {
                if let Some(out) = interfaces
                    .iter()
                    .find(|i| i.subnet.contains(&route.nexthop))
                {
                    let via = Via::Static(out, route.nexthop);
                    better(&mut best, route.destination.prefix_len(), via);
                }
            }
        }
        if let Some(own) = own.filter(|_| dst.is_ipv6()) {
            better(&mut best, 0, Via::External(own));
        }
        best.map(|(_, via)| via)
    }

    /// An expired packet: a time-exceeded error from the interface's address of the
    /// packet's family, else only counted.
    fn expired(
        &self,
        interfaces: &[Interface<'_>],
        sender: &Port,
        dst_mac: MacAddr,
        dst: IpAddr,
    ) -> Routed {
        let has_address = interfaces.iter().any(|i| {
            i.port.mac_address == dst_mac
                && i.port.network_id == sender.network_id
                && i.address.is_ipv4() == dst.is_ipv4()
        });
        if has_address {
            Routed::TimeExceeded { from: dst_mac }
        } else {
            Routed::Drop(DropReason::TtlExceeded)
        }
    }

    /// What becomes of an IPv6 packet to `dst` with hop limit `ttl` arriving on the
    /// uplink in a frame for `dst_mac` (`echo`: an echo request, else UDP).
    pub fn judge_inbound(&self, dst_mac: MacAddr, dst: IpAddr, ttl: u8, echo: bool) -> Routed {
        let gateways = self.gateways6();
        // `uplink_xdp` answers pings of the gateways' addresses, whatever the MAC.
        if let Some((_, gw)) = gateways.iter().find(|(_, gw)| echo && gw.address == dst) {
            return Routed::Answer { from: gw.mac };
        }
        let Some((router, interfaces)) = self.routers().find(|(r, _)| {
            gateways
                .iter()
                .any(|(g, gw)| g.id == r.id && gw.mac == dst_mac)
        }) else {
            return Routed::Switched;
        };
        let gw = gateways
            .iter()
            .find(|(g, _)| g.id == router.id)
            .map(|(_, gw)| gw);
        match self.route(router, &interfaces, &gateways, dst) {
            None | Some(Via::Local { .. } | Via::External(_)) => Routed::Drop(DropReason::NoRoute),
            // The frames it is used with are all long enough to quote, and no errors.
            Some(_) if ttl <= 1 => match gw {
                Some(gw) => Routed::UplinkTimeExceeded { from: gw.mac },
                None => Routed::Drop(DropReason::TtlExceeded),
            },
            Some(Via::OnLink(out)) => self.to_neighbor(out, dst, ttl),
            Some(Via::Static(out, nexthop)) => self.to_neighbor(out, nexthop, ttl),
        }
    }

    /// Forwarded out of `out` to `nexthop`'s port, one TTL less.
    fn to_neighbor(&self, out: &Interface<'_>, nexthop: IpAddr, ttl: u8) -> Routed {
        // The next hop's MAC: a port of that network with that address (a router's own
        // address answers with its interface's MAC).
        let network = &out.port.network_id;
        let router_mac = self.routers().find_map(|(_, interfaces)| {
            interfaces
                .iter()
                .find(|i| &i.port.network_id == network && i.address == nexthop)
                .map(|i| i.port.mac_address)
        });
        let neighbor = router_mac.or_else(|| {
            self.state
                .ports
                .values()
                .filter(|p| &p.network_id == network)
                .filter(|p| p.fixed_ips.iter().any(|f| f.ip_address == nexthop))
                .map(|p| p.mac_address)
                .next_back()
        });
        let Some(neighbor) = neighbor else {
            return Routed::Drop(DropReason::NoNeighbor);
        };
        match self
            .state
            .ports
            .values()
            .find(|p| &p.network_id == network && p.mac_address == neighbor && self.local(p))
        {
            Some(port) => Routed::Forward {
                port: port.id.clone(),
                dst_mac: neighbor,
                src_mac: out.port.mac_address,
                ttl: ttl - 1,
            },
            None => Routed::Drop(DropReason::UnknownDestination),
        }
    }
}
