use std::collections::{BTreeMap, BTreeSet};

use super::{Network, *};
use crate::core::{
    compile::{compile, NodeView, SlotLimits, Slots},
    fixtures::*,
    model::{Direction, Protocol, Resource, SecurityGroupRule, State},
};

const NODE: &str = "node-a";

/// n1 10.0.0.0/24 with web and web2 (10.0.0.5, .7, group web: TCP 80 in, everything
/// out) and db (10.0.0.6, group db: nothing in or out), n2 10.0.1.0/24 with app (10.0.1.5, no port
/// security); router r1 on both subnets (.1).
fn topology() -> Compiled {
    let mut web = bound(port("web", "n1", "fa:16:3e:00:00:05"), NODE, "tap-web");
    web.fixed_ips = vec![fixed_ip("s1", "10.0.0.5")];
    web.security_group_ids = vec!["web".into()];
    let mut web2 = bound(port("web2", "n1", "fa:16:3e:00:00:07"), NODE, "tap-web2");
    web2.fixed_ips = vec![fixed_ip("s1", "10.0.0.7")];
    web2.security_group_ids = vec!["web".into()];
    let mut db = bound(port("db", "n1", "fa:16:3e:00:00:06"), NODE, "tap-db");
    db.fixed_ips = vec![fixed_ip("s1", "10.0.0.6")];
    db.security_group_ids = vec!["db".into()];
    let mut app = bound(port("app", "n2", "fa:16:3e:00:01:05"), NODE, "tap-app");
    app.fixed_ips = vec![fixed_ip("s2", "10.0.1.5")];
    app.port_security_enabled = Some(false);
    let mut r1_n1 = port("r1-n1", "n1", "fa:16:3e:00:00:01");
    r1_n1.fixed_ips = vec![fixed_ip("s1", "10.0.0.1")];
    r1_n1.device_owner = "network:router_interface".into();
    r1_n1.device_id = "r1".into();
    let mut r1_n2 = port("r1-n2", "n2", "fa:16:3e:00:01:01");
    r1_n2.fixed_ips = vec![fixed_ip("s2", "10.0.1.1")];
    r1_n2.device_owner = "network:router_interface".into();
    r1_n2.device_id = "r1".into();
    let mut r1 = router("r1");
    r1.interfaces = vec![
        interface("s1", Some("r1-n1")),
        interface("s2", Some("r1-n2")),
    ];
    let http_in = SecurityGroupRule {
        port_range_min: Some(80),
        port_range_max: Some(80),
        ..rule("web-http")
    };
    let all_out = SecurityGroupRule {
        direction: Direction::Egress,
        protocol: Protocol::Any,
        ..rule("web-out")
    };
    let mut web_group = security_group("web");
    web_group.rules = vec![http_in, all_out];
    let db_group = security_group("db");
    let resources: Vec<Resource> = vec![
        network("n1").into(),
        subnet("s1", "n1", "10.0.0.0/24").into(),
        network("n2").into(),
        subnet("s2", "n2", "10.0.1.0/24").into(),
        web_group.into(),
        db_group.into(),
        web.into(),
        web2.into(),
        db.into(),
        app.into(),
        r1_n1.into(),
        r1_n2.into(),
        r1.into(),
    ];
    let state = State::replace(resources).expect("valid test state");
    let interfaces: BTreeMap<String, u32> = [
        ("tap-web", 5),
        ("tap-db", 6),
        ("tap-app", 7),
        ("tap-web2", 8),
    ]
    .into_iter()
    .map(|(name, ifindex)| (name.to_owned(), ifindex))
    .collect();
    let mut slots = Slots::new(SlotLimits {
        max_ports: 16,
        max_networks: 16,
        max_rules: 64,
    });
    compile(
        &state,
        &NodeView {
            node_name: NODE,
            interfaces: &interfaces,
            peer_devices: &BTreeSet::new(),
            uplink: None,
        },
        &mut slots,
    )
}

fn tcp_probe(from: &str, dst: &str, dport: u16) -> Probe {
    Probe {
        ingress: Ingress::Port(from.into()),
        src_mac: None,
        dst_mac: None,
        network: Network::V4 {
            src: None,
            dst: dst.parse().unwrap(),
            ttl: 64,
        },
        transport: Transport::Tcp {
            sport: 40000,
            dport,
            flags: SYN,
        },
        established: false,
    }
}

fn stage<'t>(trace: &'t Trace, name: &str) -> &'t Stage {
    trace
        .stages
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no stage {name} in {trace:#?}"))
}

fn target(port_id: &str, ifindex: u32) -> Target {
    Target {
        port_id: port_id.into(),
        ifindex,
    }
}

#[test]
fn switched_to_a_port_its_ingress_rule_allows() {
    let compiled = topology();
    let trace = trace(&compiled, &tcp_probe("web", "10.0.0.7", 80)).unwrap();
    assert_eq!(trace.verdict, Verdict::Delivered(target("web2", 8)));
    let l2 = stage(&trace, "l2");
    assert!(l2.found.contains("port web2"), "{l2:?}");
    let egress = stage(&trace, "egress security groups");
    assert!(egress.found.contains("rule web-out"));
    // Each lookup names the map the entry is in: "any protocol" is a trie entry, a
    // single port a host map's.
    assert!(egress.lookup.contains("SG_RULES[class"), "{egress:?}");
    let ingress = stage(&trace, "ingress security groups");
    assert!(ingress.found.contains("rule web-http"), "{ingress:?}");
    assert!(ingress.decision.contains("stateful"), "{ingress:?}");
    assert!(
        ingress.lookup.starts_with("SG_REMOTE4[") && ingress.lookup.contains("SG_RULE_PORTS[class"),
        "{ingress:?}"
    );
}

#[test]
fn a_port_without_egress_rules_is_denied_with_the_sender_charged() {
    let compiled = topology();
    let trace = trace(&compiled, &tcp_probe("db", "10.0.0.5", 22)).unwrap();
    // db's group has no egress rule at all.
    assert_eq!(
        trace.verdict,
        Verdict::Dropped {
            reason: DropReason::PolicyDenied,
            port_id: "db".into()
        }
    );
    assert!(stage(&trace, "egress security groups")
        .decision
        .contains("policy_denied"));
}

#[test]
fn the_receivers_default_deny_is_counted_at_the_receiver() {
    let compiled = topology();
    let trace = trace(&compiled, &tcp_probe("web", "10.0.0.6", 5432)).unwrap();
    assert_eq!(
        trace.verdict,
        Verdict::Dropped {
            reason: DropReason::PolicyDenied,
            port_id: "db".into()
        }
    );
    assert!(stage(&trace, "egress security groups")
        .found
        .contains("rule web-out"));
}

#[test]
fn established_connections_pass_on_their_entry() {
    let compiled = topology();
    let probe = Probe {
        established: true,
        transport: Transport::Tcp {
            sport: 5432,
            dport: 40000,
            flags: ACK,
        },
        ..tcp_probe("web", "10.0.0.6", 0)
    };
    assert_eq!(
        trace(&compiled, &probe).unwrap().verdict,
        Verdict::Delivered(target("db", 6))
    );
}

#[test]
fn a_spoofed_source_is_stopped_by_port_security() {
    let compiled = topology();
    let mut probe = tcp_probe("web", "10.0.0.6", 80);
    probe.network = Network::V4 {
        src: Some("10.0.0.99".parse().unwrap()),
        dst: "10.0.0.6".parse().unwrap(),
        ttl: 64,
    };
    let trace = trace(&compiled, &probe).unwrap();
    assert_eq!(
        trace.verdict,
        Verdict::Dropped {
            reason: DropReason::SourceIpSpoofed,
            port_id: "web".into()
        }
    );
    probe.network = Network::V4 {
        src: None,
        dst: "10.0.0.6".parse().unwrap(),
        ttl: 64,
    };
    probe.src_mac = Some(mac("fa:16:3e:99:99:99"));
    assert_eq!(
        super::trace(&compiled, &probe).unwrap().verdict,
        Verdict::Dropped {
            reason: DropReason::SourceMacSpoofed,
            port_id: "web".into()
        }
    );
}

#[test]
fn routed_to_the_other_subnet_with_one_hop_less() {
    let compiled = topology();
    let trace = trace(&compiled, &tcp_probe("web", "10.0.1.5", 80)).unwrap();
    assert_eq!(trace.verdict, Verdict::Delivered(target("app", 7)));
    // The destination is on another network: the router's MAC by default.
    assert!(stage(&trace, "header").found.contains("fa:16:3e:00:00:01"));
    let router = stage(&trace, "router");
    assert!(router.found.contains("10.0.1.0/24"), "{router:?}");
    assert!(router.decision.contains("TTL 64 -> 63"), "{router:?}");
}

#[test]
fn an_expired_packet_is_answered_by_the_router() {
    let compiled = topology();
    let mut probe = tcp_probe("web", "10.0.1.5", 80);
    probe.network = Network::V4 {
        src: None,
        dst: "10.0.1.5".parse().unwrap(),
        ttl: 1,
    };
    let trace = trace(&compiled, &probe).unwrap();
    assert_eq!(trace.verdict, Verdict::Answered(target("web", 5)));
    assert!(stage(&trace, "answer")
        .decision
        .contains("10.0.0.1 > 10.0.0.5"));
}

#[test]
fn no_route_and_no_neighbor() {
    let compiled = topology();
    let probe = |dst: &str| Probe {
        dst_mac: Some(mac("fa:16:3e:00:00:01")),
        ..tcp_probe("web", dst, 80)
    };
    assert_eq!(
        trace(&compiled, &probe("192.0.2.1")).unwrap().verdict,
        Verdict::Dropped {
            reason: DropReason::NoRoute,
            port_id: "web".into()
        }
    );
    assert_eq!(
        trace(&compiled, &probe("10.0.1.77")).unwrap().verdict,
        Verdict::Dropped {
            reason: DropReason::NoNeighbor,
            port_id: "web".into()
        }
    );
}

#[test]
fn broadcast_floods_to_the_other_ports_of_the_network() {
    let compiled = topology();
    let probe = Probe {
        dst_mac: Some(MacAddr([0xff; 6])),
        transport: Transport::Udp {
            sport: 5000,
            dport: 5000,
        },
        ..tcp_probe("web", "10.0.0.255", 0)
    };
    let trace = trace(&compiled, &probe).unwrap();
    // No ingress rule of db or web2 allows UDP: each drops its copy.
    assert_eq!(
        trace.verdict,
        Verdict::Flooded(vec![
            FloodCopy {
                target: target("db", 6),
                dropped: Some(DropReason::PolicyDenied),
            },
            FloodCopy {
                target: target("web2", 8),
                dropped: Some(DropReason::PolicyDenied),
            },
        ])
    );
}

#[test]
fn what_cannot_be_traced_is_refused_with_the_field() {
    let compiled = topology();
    assert_eq!(
        trace(&compiled, &tcp_probe("nope", "10.0.0.5", 80)),
        Err(TraceError::UnknownPort("nope".into()))
    );
    let arp = Probe {
        network: Network::Other { ethertype: 0x0806 },
        ..tcp_probe("web", "10.0.0.6", 80)
    };
    assert!(matches!(
        trace(&compiled, &arp),
        Err(TraceError::Unsupported {
            field: "ethertype",
            ..
        })
    ));
    let from_uplink = Probe {
        ingress: Ingress::Uplink,
        ..tcp_probe("web", "10.0.0.6", 80)
    };
    assert!(matches!(
        trace(&compiled, &from_uplink),
        Err(TraceError::NoDefault { field: "src", .. })
    ));
}

#[test]
fn other_ethertypes_are_not_allowed_from_secured_ports() {
    let compiled = topology();
    let probe = Probe {
        dst_mac: Some(mac("fa:16:3e:00:00:06")),
        network: Network::Other { ethertype: 0x88cc },
        ..tcp_probe("web", "10.0.0.6", 80)
    };
    assert_eq!(
        trace(&compiled, &probe).unwrap().verdict,
        Verdict::Dropped {
            reason: DropReason::EthertypeNotAllowed,
            port_id: "web".into()
        }
    );
}

#[test]
fn the_trie_lookup_takes_the_longest_prefix_within_the_lookup() {
    let entries = || {
        vec![
            (8, vec![10, 0, 0, 0], "8"),
            (24, vec![10, 1, 2, 0], "24"),
            (25, vec![10, 1, 2, 128], "25"),
        ]
        .into_iter()
    };
    assert_eq!(longest(entries(), &[10, 1, 2, 3], 32), Some("24"));
    assert_eq!(longest(entries(), &[10, 1, 2, 200], 32), Some("25"));
    assert_eq!(longest(entries(), &[10, 1, 2, 200], 24), Some("24"));
    assert_eq!(longest(entries(), &[11, 1, 2, 3], 32), None);
}
