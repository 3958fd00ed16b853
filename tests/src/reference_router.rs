//! A reference evaluator of distributed routing, in plain Rust over the model (not over
//! the compiled maps), written from the Networking API's semantics: a router joins
//! the subnets of its interfaces, routes by longest prefix over those subnets and its
//! static routes (a static route's next hop must be on one of them), answers ARP and
//! echo requests for its interface addresses, and decrements the TTL of what it
//! forwards. The differential test holds `port_ingress` to it.
//!
//! Scope: what a port sends to a router interface's MAC, and ARP requests for router
//! addresses, on this node (the router runs where the sender is). Ports in the states
//! it is used with have no port security and no allowed address pairs, so switching
//! and port security (held to `reference`) stay out of the way.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use dataplane_abi::DropReason;
use dataplane_agent::core::model::{MacAddr, Port, Router, State};
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
    /// Not the router's business: switched on the network as usual.
    Switched,
}

/// The node: the state, this node's name, its port devices.
pub struct RouterReference<'a> {
    pub state: &'a State,
    pub node_name: &'a str,
    pub devices: &'a BTreeMap<String, u32>,
}

/// Where a route leads.
enum Via<'a> {
    /// The router's own address.
    Local,
    OnLink(&'a Interface<'a>),
    /// A static route: out of this interface, to this next hop.
    Static(&'a Interface<'a>, IpAddr),
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
        // Longest prefix: the router's own addresses, its subnets, then static routes
        // (an entry there first wins a tie).
        let mut best: Option<(u8, Via)> = None;
        for i in &interfaces {
            if IpNet::from(i.address).contains(&dst) {
                better(&mut best, IpNet::from(i.address).prefix_len(), Via::Local);
            }
        }
        for i in &interfaces {
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
        let Some((_, via)) = best else {
            return Routed::Drop(DropReason::NoRoute);
        };
        let (out, nexthop) = match via {
            Via::Local => {
                return match sent {
                    Sent::Echo { .. } => Routed::Answer { from: dst_mac },
                    _ => Routed::Drop(DropReason::NoRoute),
                }
            }
            Via::OnLink(out) => (out, dst),
            Via::Static(out, nexthop) => (out, nexthop),
        };
        let ttl = match sent {
            Sent::Udp { ttl, .. } => *ttl,
            _ => 64,
        };
        if ttl <= 1 {
            // From the interface's address of the packet's family (else only counted).
            let has_address = interfaces.iter().any(|i| {
                i.port.mac_address == dst_mac
                    && i.port.network_id == sender.network_id
                    && i.address.is_ipv4() == dst.is_ipv4()
            });
            return if has_address {
                Routed::TimeExceeded { from: dst_mac }
            } else {
                Routed::Drop(DropReason::TtlExceeded)
            };
        }
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
