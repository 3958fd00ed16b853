use super::*;
use crate::core::{fixtures::*, model::*};

/// Applies `changes` to `state`, expects the given error, and checks `state` is as it was.
#[track_caller]
fn refused(
    state: &State,
    changes: Vec<Change>,
    code: ErrorCode,
    index: usize,
    field: &str,
) -> ValidationError {
    let before = state.clone();
    let error = state
        .apply(&changes)
        .expect_err("the changes should be refused");
    assert_eq!(
        (error.code, error.index, error.field.as_str()),
        (code, Some(index), field),
        "{error:?}"
    );
    assert_eq!(*state, before, "a refused request changed the state");
    error
}

#[track_caller]
fn accepted(state: &State, changes: Vec<Change>) -> State {
    state
        .apply(&changes)
        .unwrap_or_else(|e| panic!("refused: {e:?}"))
}

fn p1() -> Port {
    Port::clone(&base_state().ports["p1"])
}

fn port_at(id: &str, mac_address: &str, address: &str) -> Port {
    let mut p = port(id, "n1", mac_address);
    p.fixed_ips = vec![fixed_ip("s1", address)];
    p
}

// ---------------------------------------------------------------------------------
// Valid batches
// ---------------------------------------------------------------------------------

#[test]
fn a_batch_may_name_a_port_before_its_network_subnet_and_groups() {
    let mut p = port("p", "n", "fa:16:3e:00:00:10");
    p.fixed_ips = vec![fixed_ip("s", "192.168.0.10")];
    p.security_group_ids = vec!["sg".to_owned()];
    p.qos_policy_id = Some("q".to_owned());
    let mut group = security_group("sg");
    group.rules = vec![Rule::remote_group("r1", "sg")];
    let state = accepted(
        &State::default(),
        vec![
            upsert(p.clone()),
            upsert(group),
            upsert(qos_policy("q")),
            upsert(subnet("s", "n", "192.168.0.0/24")),
            upsert(network("n")),
        ],
    );
    assert_eq!(*state.ports["p"], p);
    assert_eq!(state.len(), 5);
}

/// Builders of rules for these tests.
struct Rule;
impl Rule {
    fn remote_group(id: &str, group: &str) -> SecurityGroupRule {
        SecurityGroupRule {
            remote_group_id: Some(group.to_owned()),
            ..rule(id)
        }
    }
}

#[test]
fn upserting_replaces_and_deleting_removes() {
    let state = base_state();
    let mut changed = p1();
    changed.name = "renamed".to_owned();
    changed.revision_number = 2;
    let next = accepted(&state, vec![upsert(changed.clone())]);
    assert_eq!(*next.ports["p1"], changed);
    assert_eq!(state.ports["p1"].name, "", "the original is untouched");

    let next = accepted(&next, vec![delete(ResourceKind::Port, "p1")]);
    assert!(!next.ports.contains_key("p1"));
}

#[test]
fn deleting_a_resource_with_its_dependents_works_in_any_order() {
    let state = base_state();
    let next = accepted(
        &state,
        vec![
            delete(ResourceKind::Network, "n1"),
            delete(ResourceKind::Subnet, "s1"),
            delete(ResourceKind::SecurityGroup, "sg1"),
            delete(ResourceKind::Subnet, "s6"),
            delete(ResourceKind::Port, "p1"),
        ],
    );
    assert!(!next.networks.contains_key("n1"));
    assert!(next.ports.is_empty());
    assert_eq!(next.subnets.keys().collect::<Vec<_>>(), ["ext-s"]);
}

#[test]
fn revisions_equal_or_newer_are_accepted_older_refused() {
    let state = base_state();
    let mut same = p1();
    same.name = "resent".to_owned();
    accepted(&state, vec![upsert(same)]);

    let mut newer = p1();
    newer.revision_number = 7;
    let state = accepted(&state, vec![upsert(newer)]);

    let mut older = p1();
    older.revision_number = 6;
    let error = refused(
        &state,
        vec![upsert(network("n9")), upsert(older)],
        ErrorCode::FailedPrecondition,
        1,
        "upsert.port.revision_number",
    );
    assert!(error.message.contains("revision 6"), "{}", error.message);
    assert!(
        error.message.contains("held revision 7"),
        "{}",
        error.message
    );
}

#[test]
fn sync_replaces_everything_and_ignores_held_revisions() {
    let state = base_state();
    let mut n1 = network("n1");
    n1.revision_number = 0;
    let next = State::replace(vec![n1.clone().into(), network("n2").into()]).unwrap();
    assert_eq!(next.networks.len(), 2);
    assert!(next.ports.is_empty() && next.subnets.is_empty() && next.security_groups.is_empty());
    assert_eq!(next.networks["n1"], n1);
    assert_eq!(state.count_differences(&next), (1, 1, 7));
}

#[test]
fn count_differences_counts_created_updated_deleted() {
    let state = base_state();
    let mut changed = p1();
    changed.admin_state_up = false;
    let next = accepted(
        &state,
        vec![
            upsert(changed),
            upsert(network("n2")),
            upsert(security_group("sg2")),
            delete(ResourceKind::QosPolicy, "q1"),
            // Re-sent unchanged: not an update.
            upsert(network("n1")),
        ],
    );
    assert_eq!(state.count_differences(&next), (2, 1, 1));
}

// ---------------------------------------------------------------------------------
// INVALID_ARGUMENT
// ---------------------------------------------------------------------------------

#[test]
fn the_same_resource_twice_in_one_request_is_refused() {
    let state = base_state();
    refused(
        &state,
        vec![
            upsert(network("n2")),
            upsert(subnet("s2", "n2", "10.9.0.0/24")),
            upsert(network("n2")),
        ],
        ErrorCode::InvalidArgument,
        2,
        "upsert.network.id",
    );
    refused(
        &state,
        vec![
            delete(ResourceKind::QosPolicy, "q1"),
            delete(ResourceKind::QosPolicy, "q1"),
        ],
        ErrorCode::InvalidArgument,
        1,
        "delete.id",
    );
    refused(
        &state,
        vec![upsert(network("n2")), delete(ResourceKind::Network, "n2")],
        ErrorCode::InvalidArgument,
        1,
        "delete.id",
    );
    // Same id, different kinds: fine.
    accepted(
        &state,
        vec![upsert(network("x")), upsert(security_group("x"))],
    );

    let error = State::replace(vec![network("n").into(), network("n").into()]).unwrap_err();
    assert_eq!(
        (error.code, error.index, error.field.as_str()),
        (ErrorCode::InvalidArgument, Some(1), "network.id")
    );
}

#[test]
fn ids_must_be_valid() {
    let state = base_state();
    refused(
        &state,
        vec![upsert(network(""))],
        ErrorCode::InvalidArgument,
        0,
        "upsert.network.id",
    );
    refused(
        &state,
        vec![upsert(network("a b"))],
        ErrorCode::InvalidArgument,
        0,
        "upsert.network.id",
    );
    let mut group = security_group("sg2");
    group.rules = vec![rule("ok"), rule("bad\tid")];
    refused(
        &state,
        vec![upsert(group)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.security_group.rules[1].id",
    );
}

#[test]
fn subnet_values_must_agree_with_the_subnet() {
    let state = base_state();
    let check = |subnet: Subnet, field: &str| {
        refused(
            &state,
            vec![upsert(subnet)],
            ErrorCode::InvalidArgument,
            0,
            field,
        )
    };

    let mut s = subnet("s2", "n1", "10.1.0.0/24");
    s.ip_version = IpVersion::V6;
    check(s, "upsert.subnet.cidr");

    let mut s = subnet("s2", "n1", "10.1.0.0/24");
    s.cidr = net("10.1.0.1/24");
    check(s, "upsert.subnet.cidr");

    let mut s = subnet("s2", "n1", "10.1.0.0/24");
    s.gateway_ip = Some(ip("10.2.0.1"));
    let error = check(s, "upsert.subnet.gateway_ip");
    assert!(error.message.contains("10.2.0.1"), "{}", error.message);

    let mut s = subnet("s2", "n1", "10.1.0.0/24");
    s.gateway_ip = Some(ip("2001:db8::1"));
    check(s, "upsert.subnet.gateway_ip");

    let mut s = subnet("s2", "n1", "10.1.0.0/24");
    s.allocation_pools = vec![AllocationPool {
        start: ip("10.1.0.10"),
        end: ip("10.1.1.10"),
    }];
    check(s, "upsert.subnet.allocation_pools[0].end");

    let mut s = subnet("s2", "n1", "10.1.0.0/24");
    s.allocation_pools = vec![
        AllocationPool {
            start: ip("10.1.0.2"),
            end: ip("10.1.0.9"),
        },
        AllocationPool {
            start: ip("10.1.0.100"),
            end: ip("10.1.0.50"),
        },
    ];
    check(s, "upsert.subnet.allocation_pools[1]");

    let mut s = subnet("s2", "n1", "10.1.0.0/24");
    s.dns_nameservers = vec![ip("8.8.8.8"), ip("2001:4860::8888")];
    check(s, "upsert.subnet.dns_nameservers[1]");

    let mut s = subnet("s2", "n1", "10.1.0.0/24");
    s.host_routes = vec![HostRoute {
        destination: net("192.168.0.0/16"),
        nexthop: ip("fe80::1"),
    }];
    check(s, "upsert.subnet.host_routes[0].nexthop");

    let mut s = subnet("s2", "n1", "2001:db8:2::/64");
    s.host_routes = vec![HostRoute {
        destination: net("192.168.0.0/16"),
        nexthop: ip("2001:db8:2::1"),
    }];
    check(s, "upsert.subnet.host_routes[0].destination");

    // All of it right: accepted; a nexthop outside the cidr is allowed.
    let mut s = subnet("s2", "n1", "10.1.0.0/24");
    s.gateway_ip = Some(ip("10.1.0.1"));
    s.allocation_pools = vec![AllocationPool {
        start: ip("10.1.0.2"),
        end: ip("10.1.0.254"),
    }];
    s.dns_nameservers = vec![ip("8.8.8.8")];
    s.host_routes = vec![HostRoute {
        destination: net("192.168.0.0/16"),
        nexthop: ip("10.9.9.9"),
    }];
    accepted(&state, vec![upsert(s)]);
}

#[test]
fn fixed_ips_must_be_inside_their_subnet() {
    let state = base_state();
    let error = refused(
        &state,
        vec![upsert(port_at("p2", "fa:16:3e:00:00:02", "10.1.0.5"))],
        ErrorCode::InvalidArgument,
        0,
        "upsert.port.fixed_ips[0].ip_address",
    );
    assert_eq!(
        error.message,
        "10.1.0.5 is not inside subnet s1 (10.0.0.0/24)"
    );

    let error = refused(
        &state,
        vec![upsert(port_at("p2", "fa:16:3e:00:00:02", "10.0.0.0"))],
        ErrorCode::InvalidArgument,
        0,
        "upsert.port.fixed_ips[0].ip_address",
    );
    assert!(
        error.message.contains("network address"),
        "{}",
        error.message
    );
    let error = refused(
        &state,
        vec![upsert(port_at("p2", "fa:16:3e:00:00:02", "10.0.0.255"))],
        ErrorCode::InvalidArgument,
        0,
        "upsert.port.fixed_ips[0].ip_address",
    );
    assert!(
        error.message.contains("broadcast address"),
        "{}",
        error.message
    );

    // IPv6 has no broadcast: the subnet's first address is a valid (router anycast) one.
    let mut p = port("p2", "n1", "fa:16:3e:00:00:02");
    p.fixed_ips = vec![fixed_ip("s1", "10.0.0.6"), fixed_ip("s6", "2001:db8:1::")];
    accepted(&state, vec![upsert(p)]);

    let mut p = port("p2", "n1", "fa:16:3e:00:00:02");
    p.fixed_ips = vec![fixed_ip("s1", "10.0.0.6"), fixed_ip("s1", "10.0.0.6")];
    refused(
        &state,
        vec![upsert(p)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.port.fixed_ips[1].ip_address",
    );
}

#[test]
fn port_macs_must_be_unicast() {
    let state = base_state();
    refused(
        &state,
        vec![upsert(port("p2", "n1", "01:00:5e:00:00:01"))],
        ErrorCode::InvalidArgument,
        0,
        "upsert.port.mac_address",
    );
    refused(
        &state,
        vec![upsert(port("p2", "n1", "00:00:00:00:00:00"))],
        ErrorCode::InvalidArgument,
        0,
        "upsert.port.mac_address",
    );
    let mut p = port("p2", "n1", "fa:16:3e:00:00:02");
    p.allowed_address_pairs = vec![pair("10.0.0.9", Some("ff:ff:ff:ff:ff:ff"))];
    refused(
        &state,
        vec![upsert(p)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.port.allowed_address_pairs[0].mac_address",
    );
}

#[test]
fn allowed_address_pairs_of_any_version_and_prefix_are_fine() {
    let state = base_state();
    let mut p = port("p2", "n1", "fa:16:3e:00:00:02");
    p.allowed_address_pairs = vec![
        pair("2001:db8:ffff::/48", None),
        pair("172.16.0.0/12", Some("fa:16:3e:aa:aa:aa")),
        pair("0.0.0.0/0", None),
        pair("10.0.0.5", None),
    ];
    accepted(&state, vec![upsert(p)]);
}

#[test]
fn security_group_rule_values() {
    let state = base_state();
    let check = |tested: SecurityGroupRule, field: &str| {
        let mut group = security_group("sg2");
        group.rules = vec![rule("first"), tested];
        refused(
            &state,
            vec![upsert(group)],
            ErrorCode::InvalidArgument,
            0,
            &format!("upsert.security_group.rules[1].{field}"),
        )
    };
    let ports = |protocol, min, max| SecurityGroupRule {
        protocol,
        port_range_min: min,
        port_range_max: max,
        ..rule("r")
    };

    let error = check(ports(Protocol::TCP, Some(90), Some(80)), "port_range_min");
    assert!(
        error.message.contains("90") && error.message.contains("80"),
        "{}",
        error.message
    );
    check(ports(Protocol::UDP, Some(1), Some(65536)), "port_range_max");
    check(ports(Protocol::SCTP, Some(70000), None), "port_range_min");
    check(
        ports(Protocol::UDPLITE, Some(70000), None),
        "port_range_min",
    );
    check(ports(Protocol::DCCP, None, Some(65536)), "port_range_max");
    check(ports(Protocol::ICMP, Some(256), None), "port_range_min");
    check(ports(Protocol::ICMP, Some(8), Some(256)), "port_range_max");
    check(ports(Protocol::ICMP, None, Some(0)), "port_range_max");
    check(ports(Protocol::Any, Some(80), Some(80)), "port_range_min");
    check(
        ports(Protocol::Number(47), None, Some(80)),
        "port_range_max",
    );
    let icmpv6_v4 = SecurityGroupRule {
        protocol: Protocol::IPV6_ICMP,
        ..rule("r")
    };
    check(icmpv6_v4, "protocol");
    let v6_prefix = SecurityGroupRule {
        remote_ip_prefix: Some(net("2001:db8::/32")),
        ..rule("r")
    };
    check(v6_prefix, "remote_ip_prefix");
    let both = SecurityGroupRule {
        remote_ip_prefix: Some(net("10.0.0.0/8")),
        remote_group_id: Some("sg1".to_owned()),
        ..rule("r")
    };
    check(both, "remote_group_id");
    let mut group = security_group("sg2");
    group.rules = vec![rule("same"), rule("same")];
    refused(
        &state,
        vec![upsert(group)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.security_group.rules[1].id",
    );

    let mut group = security_group("sg2");
    group.rules = vec![
        ports(Protocol::TCP, Some(0), Some(65535)),
        SecurityGroupRule {
            id: "r2".to_owned(),
            ..ports(Protocol::UDP, Some(53), Some(53))
        },
        SecurityGroupRule {
            id: "r3".to_owned(),
            ..ports(Protocol::ICMP, Some(8), Some(0))
        },
        SecurityGroupRule {
            id: "r4".to_owned(),
            ..ports(Protocol::ICMP, Some(255), None)
        },
        SecurityGroupRule {
            id: "r5".to_owned(),
            ethertype: EtherType::Ipv6,
            remote_ip_prefix: Some(net("2001:db8::/32")),
            ..ports(Protocol::IPV6_ICMP, Some(135), None)
        },
        SecurityGroupRule {
            id: "r6".to_owned(),
            ..ports(Protocol::Number(47), None, None)
        },
        SecurityGroupRule {
            id: "r7".to_owned(),
            remote_group_id: Some("sg2".to_owned()),
            ..ports(Protocol::Any, None, None)
        },
    ];
    accepted(&state, vec![upsert(group)]);
}

#[test]
fn network_mtu_and_provider() {
    let state = base_state();
    let with_mtu = |mtu| Network {
        mtu,
        ..network("n2")
    };
    let error = refused(
        &state,
        vec![upsert(with_mtu(67))],
        ErrorCode::InvalidArgument,
        0,
        "upsert.network.mtu",
    );
    assert!(error.message.contains("67"), "{}", error.message);
    accepted(&state, vec![upsert(with_mtu(0))]);
    accepted(&state, vec![upsert(with_mtu(68))]);

    let with = |network_type, physical_network: &str, segmentation_id| Network {
        provider: Some(ProviderNetwork {
            network_type,
            physical_network: physical_network.to_owned(),
            segmentation_id,
        }),
        ..network("n2")
    };
    let segment = "upsert.network.provider.segmentation_id";
    let physical = "upsert.network.provider.physical_network";
    for (network, field) in [
        (with(NetworkType::Vlan, "physnet1", None), segment),
        (with(NetworkType::Vlan, "physnet1", Some(0)), segment),
        (with(NetworkType::Vlan, "physnet1", Some(4095)), segment),
        (with(NetworkType::Vlan, "", Some(100)), physical),
        (with(NetworkType::Vxlan, "", Some(0)), segment),
        (with(NetworkType::Vxlan, "", Some(16_777_216)), segment),
        (with(NetworkType::Vxlan, "", None), segment),
        (with(NetworkType::Vxlan, "physnet1", Some(5)), physical),
        (with(NetworkType::Flat, "physnet1", Some(5)), segment),
        (with(NetworkType::Flat, "", None), physical),
        (with(NetworkType::Local, "physnet1", None), physical),
        (with(NetworkType::Local, "", Some(1)), segment),
    ] {
        refused(
            &state,
            vec![upsert(network)],
            ErrorCode::InvalidArgument,
            0,
            field,
        );
    }
    for network in [
        with(NetworkType::Vlan, "physnet1", Some(1)),
        with(NetworkType::Vlan, "physnet1", Some(4094)),
        with(NetworkType::Vxlan, "", Some(16_777_215)),
        with(NetworkType::Flat, "physnet1", None),
        with(NetworkType::Local, "", None),
    ] {
        accepted(&state, vec![upsert(network)]);
    }
}

#[test]
fn qos_rule_values() {
    let state = base_state();
    let dscp = |id: &str, dscp_mark| DscpMarkingRule {
        id: id.to_owned(),
        dscp_mark,
    };
    let limit = |id: &str, max_kbps, direction| BandwidthLimitRule {
        id: id.to_owned(),
        max_kbps,
        max_burst_kbps: 0,
        direction,
    };
    let mut policy = qos_policy("q2");
    policy.dscp_marking_rules = vec![dscp("d", 7)];
    let error = refused(
        &state,
        vec![upsert(policy)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.qos_policy.dscp_marking_rules[0].dscp_mark",
    );
    assert!(error.message.contains('7'), "{}", error.message);

    let mut policy = qos_policy("q2");
    policy.bandwidth_limit_rules = vec![limit("b", 0, QosDirection::Egress)];
    refused(
        &state,
        vec![upsert(policy)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.qos_policy.bandwidth_limit_rules[0].max_kbps",
    );

    let mut policy = qos_policy("q2");
    policy.bandwidth_limit_rules = vec![
        limit("b1", 1000, QosDirection::Egress),
        limit("b2", 1000, QosDirection::Egress),
    ];
    refused(
        &state,
        vec![upsert(policy)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.qos_policy.bandwidth_limit_rules[1].direction",
    );

    for mark in VALID_DSCP_MARKS {
        let mut policy = qos_policy("q2");
        policy.dscp_marking_rules = vec![dscp("d", mark)];
        policy.bandwidth_limit_rules = vec![
            limit("b1", 1000, QosDirection::Egress),
            limit("b2", 500, QosDirection::Ingress),
        ];
        accepted(&state, vec![upsert(policy)]);
    }
    for mark in [1, 2, 9, 42, 44, 50, 57, 64] {
        let mut policy = qos_policy("q2");
        policy.dscp_marking_rules = vec![dscp("d", mark)];
        refused(
            &state,
            vec![upsert(policy)],
            ErrorCode::InvalidArgument,
            0,
            "upsert.qos_policy.dscp_marking_rules[0].dscp_mark",
        );
    }
}

#[test]
fn router_and_floating_ip_values() {
    let state = base_state();
    let mut r = router("r1");
    r.routes = vec![Route {
        destination: net("192.168.0.0/16"),
        nexthop: ip("2001:db8::1"),
    }];
    refused(
        &state,
        vec![upsert(r)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.router.routes[0].nexthop",
    );

    let mut r = router("r1");
    r.interfaces = vec![interface("s1", None), interface("s1", None)];
    refused(
        &state,
        vec![upsert(r)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.router.interfaces[1].subnet_id",
    );

    let mut fip = floating_ip("f1", "ext", "203.0.113.10");
    fip.fixed_ip_address = Some(ip("10.0.0.5"));
    refused(
        &state,
        vec![upsert(fip)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.floating_ip.fixed_ip_address",
    );
}

// ---------------------------------------------------------------------------------
// NOT_FOUND
// ---------------------------------------------------------------------------------

#[test]
fn references_to_missing_resources() {
    let state = base_state();
    let check = |change: Change, field: &str| {
        let error = refused(
            &state,
            vec![upsert(network("n2")), change],
            ErrorCode::NotFound,
            1,
            field,
        );
        assert!(error.message.contains("nope"), "{}", error.message);
    };

    check(
        upsert(port("p2", "nope", "fa:16:3e:00:00:02")),
        "upsert.port.network_id",
    );
    check(
        upsert(subnet("s2", "nope", "10.5.0.0/24")),
        "upsert.subnet.network_id",
    );

    let mut p = port("p2", "n1", "fa:16:3e:00:00:02");
    p.fixed_ips = vec![fixed_ip("s1", "10.0.0.9"), fixed_ip("nope", "10.0.0.8")];
    check(upsert(p), "upsert.port.fixed_ips[1].subnet_id");

    let mut p = port("p2", "n1", "fa:16:3e:00:00:02");
    p.security_group_ids = vec!["sg1".to_owned(), "nope".to_owned()];
    check(upsert(p), "upsert.port.security_group_ids[1]");

    let mut p = port("p2", "n1", "fa:16:3e:00:00:02");
    p.qos_policy_id = Some("nope".to_owned());
    check(upsert(p), "upsert.port.qos_policy_id");

    let mut group = security_group("sg2");
    group.rules = vec![rule("a"), Rule::remote_group("b", "nope")];
    check(
        upsert(group),
        "upsert.security_group.rules[1].remote_group_id",
    );

    let mut r = router("r1");
    r.interfaces = vec![interface("nope", None)];
    check(upsert(r), "upsert.router.interfaces[0].subnet_id");

    let mut r = router("r1");
    r.interfaces = vec![interface("s1", Some("nope"))];
    check(upsert(r), "upsert.router.interfaces[0].port_id");

    let mut r = router("r1");
    r.external_gateway_info = Some(ExternalGatewayInfo {
        network_id: "nope".to_owned(),
        enable_snat: true,
        external_fixed_ips: Vec::new(),
    });
    check(upsert(r), "upsert.router.external_gateway_info.network_id");

    let mut r = router("r1");
    r.external_gateway_info = Some(ExternalGatewayInfo {
        network_id: "ext".to_owned(),
        enable_snat: true,
        external_fixed_ips: vec![ExternalFixedIp {
            subnet_id: "nope".to_owned(),
            ip_address: ip("203.0.113.2"),
        }],
    });
    check(
        upsert(r),
        "upsert.router.external_gateway_info.external_fixed_ips[0].subnet_id",
    );

    check(
        upsert(floating_ip("f1", "nope", "203.0.113.10")),
        "upsert.floating_ip.floating_network_id",
    );
    let mut fip = floating_ip("f1", "ext", "203.0.113.10");
    fip.port_id = Some("nope".to_owned());
    check(upsert(fip), "upsert.floating_ip.port_id");
    let mut fip = floating_ip("f1", "ext", "203.0.113.10");
    fip.router_id = Some("nope".to_owned());
    check(upsert(fip), "upsert.floating_ip.router_id");

    check(delete(ResourceKind::Port, "nope"), "delete.id");
}

#[test]
fn a_reference_to_something_deleted_in_the_same_batch() {
    let state = base_state();
    // Deleting then re-using: the upsert's reference is what fails.
    refused(
        &state,
        vec![
            delete(ResourceKind::QosPolicy, "q1"),
            upsert(Port {
                qos_policy_id: Some("q1".to_owned()),
                revision_number: 2,
                ..p1()
            }),
        ],
        ErrorCode::NotFound,
        1,
        "upsert.port.qos_policy_id",
    );
}

// ---------------------------------------------------------------------------------
// ALREADY_EXISTS
// ---------------------------------------------------------------------------------

#[test]
fn a_mac_twice_on_one_network() {
    let state = base_state();
    let error = refused(
        &state,
        vec![upsert(port("p2", "n1", "fa:16:3e:00:00:01"))],
        ErrorCode::AlreadyExists,
        0,
        "upsert.port.mac_address",
    );
    assert!(
        error.message.contains("fa:16:3e:00:00:01") && error.message.contains("p1"),
        "{}",
        error.message
    );

    // Both in the request: reported on the later one.
    refused(
        &state,
        vec![
            upsert(port("p2", "n1", "fa:16:3e:00:00:09")),
            upsert(network("n2")),
            upsert(port("p3", "n1", "fa:16:3e:00:00:09")),
        ],
        ErrorCode::AlreadyExists,
        2,
        "upsert.port.mac_address",
    );

    // Other network: fine. Moving the MAC from one port to another in one batch: fine.
    accepted(
        &state,
        vec![
            upsert(network("n2")),
            upsert(port("p2", "n2", "fa:16:3e:00:00:01")),
        ],
    );
    accepted(
        &state,
        vec![
            upsert(port("p2", "n1", "fa:16:3e:00:00:01")),
            delete(ResourceKind::Port, "p1"),
        ],
    );
}

#[test]
fn a_fixed_ip_twice_on_one_network() {
    let state = base_state();
    let error = refused(
        &state,
        vec![upsert(port_at("p2", "fa:16:3e:00:00:02", "10.0.0.5"))],
        ErrorCode::AlreadyExists,
        0,
        "upsert.port.fixed_ips[0].ip_address",
    );
    assert!(
        error.message.contains("10.0.0.5") && error.message.contains("p1"),
        "{}",
        error.message
    );

    let error = State::replace(vec![
        network("n1").into(),
        subnet("s1", "n1", "10.0.0.0/24").into(),
        port_at("a", "fa:16:3e:00:00:0a", "10.0.0.7").into(),
        port_at("b", "fa:16:3e:00:00:0b", "10.0.0.7").into(),
    ])
    .unwrap_err();
    assert_eq!(
        (error.code, error.index, error.field.as_str()),
        (
            ErrorCode::AlreadyExists,
            Some(3),
            "port.fixed_ips[0].ip_address"
        )
    );
}

#[test]
fn overlapping_subnets_of_one_network() {
    let state = base_state();
    let error = refused(
        &state,
        vec![upsert(subnet("s2", "n1", "10.0.0.128/25"))],
        ErrorCode::AlreadyExists,
        0,
        "upsert.subnet.cidr",
    );
    assert!(
        error.message.contains("10.0.0.0/24") && error.message.contains("s1"),
        "{}",
        error.message
    );
    refused(
        &state,
        vec![upsert(subnet("s2", "n1", "10.0.0.0/8"))],
        ErrorCode::AlreadyExists,
        0,
        "upsert.subnet.cidr",
    );
    // Another network may reuse the range.
    accepted(
        &state,
        vec![
            upsert(network("n2")),
            upsert(subnet("s2", "n2", "10.0.0.0/24")),
        ],
    );
}

// ---------------------------------------------------------------------------------
// FAILED_PRECONDITION
// ---------------------------------------------------------------------------------

#[test]
fn a_fixed_ip_on_a_subnet_of_another_network() {
    let state = base_state();
    let mut p = port("p2", "n1", "fa:16:3e:00:00:02");
    p.fixed_ips = vec![fixed_ip("ext-s", "203.0.113.5")];
    let error = refused(
        &state,
        vec![upsert(p)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.port.fixed_ips[0].subnet_id",
    );
    assert!(error.message.contains("ext"), "{}", error.message);
}

#[test]
fn deleting_what_is_still_used() {
    let mut state = base_state();
    let mut r = router("r1");
    r.interfaces = vec![interface("s6", None)];
    let mut router_port = port("rp", "n1", "fa:16:3e:00:00:99");
    router_port.fixed_ips = vec![fixed_ip("s1", "10.0.0.1")];
    let mut r2 = router("r2");
    r2.interfaces = vec![interface("s1", Some("rp"))];
    let mut fip = floating_ip("f1", "ext", "203.0.113.10");
    fip.port_id = Some("p1".to_owned());
    fip.router_id = Some("r2".to_owned());
    let mut remote = security_group("sg2");
    remote.rules = vec![Rule::remote_group("x", "sg1")];
    let mut own = security_group("sg3");
    own.rules = vec![Rule::remote_group("y", "sg3")];
    let mut qos_user = port("pq", "n1", "fa:16:3e:00:00:98");
    qos_user.qos_policy_id = Some("q1".to_owned());
    state = accepted(
        &state,
        vec![
            upsert(r),
            upsert(router_port),
            upsert(r2),
            upsert(fip),
            upsert(remote),
            upsert(own),
            upsert(qos_user),
        ],
    );

    for (kind, id, user) in [
        (ResourceKind::Network, "n1", "subnet s1"),
        (ResourceKind::Network, "ext", "subnet ext-s"),
        (ResourceKind::Subnet, "s1", "port p1"),
        (ResourceKind::Subnet, "s6", "router r1"),
        (ResourceKind::SecurityGroup, "sg1", "port p1"),
        (ResourceKind::QosPolicy, "q1", "port pq"),
        (ResourceKind::Port, "p1", "floating IP f1"),
        (ResourceKind::Port, "rp", "router r2"),
        (ResourceKind::Router, "r2", "floating IP f1"),
    ] {
        let error = refused(
            &state,
            vec![upsert(network("n9")), delete(kind, id)],
            ErrorCode::FailedPrecondition,
            1,
            "delete",
        );
        assert!(
            error.message.contains(user),
            "{kind:?} {id}: {}",
            error.message
        );
    }

    // A security group used only as a remote group by another group's rule.
    let unused_by_ports = Port {
        security_group_ids: Vec::new(),
        revision_number: 2,
        ..Port::clone(&state.ports["p1"])
    };
    let error = refused(
        &state,
        vec![
            upsert(unused_by_ports.clone()),
            delete(ResourceKind::SecurityGroup, "sg1"),
        ],
        ErrorCode::FailedPrecondition,
        1,
        "delete",
    );
    assert!(
        error.message.contains("security group sg2"),
        "{}",
        error.message
    );
    // Its own rules naming it do not keep a group alive.
    accepted(&state, vec![delete(ResourceKind::SecurityGroup, "sg3")]);
    // With every user gone in the same batch, deletes work.
    accepted(
        &state,
        vec![
            delete(ResourceKind::SecurityGroup, "sg1"),
            upsert(unused_by_ports),
            delete(ResourceKind::SecurityGroup, "sg2"),
        ],
    );
}

#[test]
fn router_interfaces_and_gateways() {
    let state = base_state();
    let state = accepted(
        &state,
        vec![
            upsert(network("n2")),
            upsert(subnet("s2", "n2", "10.0.0.0/16")),
            upsert(subnet("s3", "n2", "10.1.0.0/16")),
        ],
    );

    let mut r = router("r1");
    r.interfaces = vec![
        interface("s3", None),
        interface("s1", None),
        interface("s2", None),
    ];
    let error = refused(
        &state,
        vec![upsert(r)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.router.interfaces[2].subnet_id",
    );
    assert!(
        error.message.contains("s1") && error.message.contains("s2"),
        "{}",
        error.message
    );

    let mut r = router("r1");
    r.interfaces = vec![interface("ext-s", None)];
    refused(
        &state,
        vec![upsert(r)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.router.interfaces[0].subnet_id",
    );

    let gateway = |network_id: &str, subnet_id: &str, address: &str| ExternalGatewayInfo {
        network_id: network_id.to_owned(),
        enable_snat: true,
        external_fixed_ips: vec![ExternalFixedIp {
            subnet_id: subnet_id.to_owned(),
            ip_address: ip(address),
        }],
    };
    let mut r = router("r1");
    r.external_gateway_info = Some(gateway("n1", "s1", "10.0.0.1"));
    refused(
        &state,
        vec![upsert(r)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.router.external_gateway_info.network_id",
    );

    let mut r = router("r1");
    r.external_gateway_info = Some(gateway("ext", "s1", "10.0.0.1"));
    refused(
        &state,
        vec![upsert(r)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.router.external_gateway_info.external_fixed_ips[0].subnet_id",
    );

    let mut r = router("r1");
    r.external_gateway_info = Some(gateway("ext", "ext-s", "198.51.100.1"));
    refused(
        &state,
        vec![upsert(r)],
        ErrorCode::InvalidArgument,
        0,
        "upsert.router.external_gateway_info.external_fixed_ips[0].ip_address",
    );

    let mut r = router("r1");
    r.interfaces = vec![interface("s1", None), interface("s3", None)];
    r.external_gateway_info = Some(gateway("ext", "ext-s", "203.0.113.2"));
    r.routes = vec![Route {
        destination: net("192.168.0.0/16"),
        nexthop: ip("10.0.0.254"),
    }];
    accepted(&state, vec![upsert(r)]);
}

#[test]
fn floating_ips() {
    let state = base_state();
    let mut fip = floating_ip("f1", "n1", "10.0.0.77");
    let error = refused(
        &state,
        vec![upsert(fip.clone())],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.floating_ip.floating_network_id",
    );
    assert!(error.message.contains("n1"), "{}", error.message);

    fip.floating_network_id = "ext".to_owned();
    fip.port_id = Some("p1".to_owned());
    fip.fixed_ip_address = Some(ip("10.0.0.6"));
    let error = refused(
        &state,
        vec![upsert(fip.clone())],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.floating_ip.fixed_ip_address",
    );
    assert!(
        error.message.contains("10.0.0.6") && error.message.contains("p1"),
        "{}",
        error.message
    );

    fip.fixed_ip_address = Some(ip("10.0.0.5"));
    accepted(&state, vec![upsert(fip.clone())]);
    fip.fixed_ip_address = None;
    accepted(&state, vec![upsert(fip)]);
}

#[test]
fn upserts_that_break_resources_outside_the_request() {
    let state = base_state();
    let mut fip = floating_ip("f1", "ext", "203.0.113.10");
    fip.port_id = Some("p1".to_owned());
    fip.fixed_ip_address = Some(ip("10.0.0.5"));
    let mut r = router("r1");
    r.interfaces = vec![interface("s1", None)];
    let mut r2 = router("r2");
    r2.interfaces = vec![interface("s6", None)];
    let state = accepted(
        &state,
        vec![
            upsert(fip),
            upsert(r),
            upsert(r2),
            upsert(network("n2")),
            upsert(subnet("s2", "n2", "10.2.0.0/24")),
        ],
    );

    // A subnet's new cidr leaves p1's address outside.
    let moved = Subnet {
        cidr: net("10.1.0.0/24"),
        revision_number: 2,
        ..state.subnets["s1"].clone()
    };
    let error = refused(
        &state,
        vec![upsert(moved)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.subnet.cidr",
    );
    assert!(error.message.contains("port p1"), "{}", error.message);
    assert!(error.message.contains("10.0.0.5"), "{}", error.message);

    // Moving a subnet to another network strands its ports' fixed IPs.
    let rehomed = Subnet {
        network_id: "n2".to_owned(),
        cidr: net("10.0.0.0/24"),
        ..state.subnets["s1"].clone()
    };
    refused(
        &state,
        vec![upsert(rehomed)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.subnet.network_id",
    );

    // A cidr change making two interfaces of router r2 overlap.
    let mut r2 = state.routers["r2"].clone();
    r2.interfaces.push(interface("s2", None));
    let state = accepted(&state, vec![upsert(r2)]);
    let widened = Subnet {
        cidr: net("10.2.0.0/23"),
        ..state.subnets["s2"].clone()
    };
    accepted(&state, vec![upsert(widened)]);
    let mut s2_v6 = subnet("s2", "n2", "2001:db8:1::/48");
    s2_v6.revision_number = 2;
    refused(
        &state,
        vec![upsert(s2_v6)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.subnet.cidr",
    );

    // The floating network stops being external.
    let internal = Network {
        router_external: false,
        ..state.networks["ext"].clone()
    };
    let error = refused(
        &state,
        vec![upsert(internal)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.network.router_external",
    );
    assert!(
        error.message.contains("floating IP f1"),
        "{}",
        error.message
    );

    // A network with router interfaces on its subnets becomes external.
    let external = Network {
        router_external: true,
        ..state.networks["n1"].clone()
    };
    let error = refused(
        &state,
        vec![upsert(external)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.network.router_external",
    );
    assert!(error.message.contains("router r1"), "{}", error.message);

    // p1 drops the address a floating IP is bound to.
    let readdressed = Port {
        fixed_ips: vec![fixed_ip("s1", "10.0.0.50")],
        ..Port::clone(&state.ports["p1"])
    };
    let error = refused(
        &state,
        vec![upsert(readdressed.clone())],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.port.fixed_ips",
    );
    assert!(
        error.message.contains("floating IP f1"),
        "{}",
        error.message
    );

    // ...which is fine when the floating IP follows in the same batch.
    let mut fip = state.floating_ips["f1"].clone();
    fip.fixed_ip_address = Some(ip("10.0.0.50"));
    accepted(&state, vec![upsert(readdressed), upsert(fip)]);
}

// ---------------------------------------------------------------------------------
// Security groups on ports
// ---------------------------------------------------------------------------------

fn stateless(id: &str) -> SecurityGroup {
    SecurityGroup {
        stateful: false,
        ..security_group(id)
    }
}

#[test]
fn a_ports_groups_are_all_stateful_or_all_stateless() {
    let state = accepted(
        &base_state(),
        vec![upsert(stateless("loose")), upsert(stateless("loose2"))],
    );
    let mixed = Port {
        security_group_ids: vec!["sg1".to_owned(), "loose".to_owned()],
        ..p1()
    };
    let error = refused(
        &state,
        vec![upsert(mixed)],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.port.security_group_ids",
    );
    assert!(
        error.message.contains("sg1") && error.message.contains("loose"),
        "{}",
        error.message
    );
    // Agreeing groups of either kind are fine.
    accepted(
        &state,
        vec![upsert(Port {
            security_group_ids: vec!["loose".to_owned(), "loose2".to_owned()],
            ..p1()
        })],
    );
    let mut p2 = port_at("p2", "fa:16:3e:00:00:02", "10.0.0.6");
    p2.security_group_ids = vec!["sg1".to_owned(), "loose".to_owned()];
    let error = State::replace(vec![
        network("n1").into(),
        subnet("s1", "n1", "10.0.0.0/24").into(),
        security_group("sg1").into(),
        stateless("loose").into(),
        p2.into(),
    ])
    .unwrap_err();
    assert_eq!(
        (error.code, error.index, error.field.as_str()),
        (
            ErrorCode::FailedPrecondition,
            Some(4),
            "port.security_group_ids"
        )
    );
}

#[test]
fn a_group_turning_stateless_under_a_port_with_stateful_groups() {
    let state = accepted(&base_state(), vec![upsert(security_group("sg2"))]);
    let state = accepted(
        &state,
        vec![upsert(Port {
            security_group_ids: vec!["sg1".to_owned(), "sg2".to_owned()],
            ..p1()
        })],
    );
    let flipped = SecurityGroup {
        revision_number: 2,
        ..stateless("sg2")
    };
    let error = refused(
        &state,
        vec![upsert(flipped.clone())],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.security_group.stateful",
    );
    assert!(error.message.contains("port p1"), "{}", error.message);
    // Both of the port's groups flip together: fine.
    accepted(
        &state,
        vec![
            upsert(flipped.clone()),
            upsert(SecurityGroup {
                revision_number: 2,
                ..stateless("sg1")
            }),
        ],
    );
    // The port leaves the group in the same request: fine.
    accepted(
        &state,
        vec![
            upsert(flipped.clone()),
            upsert(Port {
                security_group_ids: vec!["sg1".to_owned()],
                ..p1()
            }),
        ],
    );
    // The port stays in both: reported on the port, which the request names.
    refused(
        &state,
        vec![
            upsert(flipped),
            upsert(Port {
                name: "renamed".to_owned(),
                ..Port::clone(&state.ports["p1"])
            }),
        ],
        ErrorCode::FailedPrecondition,
        1,
        "upsert.port.security_group_ids",
    );
    // A group alone on its ports may change.
    let state = accepted(&state, vec![upsert(security_group("sg3"))]);
    let mut p2 = port_at("p2", "fa:16:3e:00:00:02", "10.0.0.6");
    p2.security_group_ids = vec!["sg3".to_owned()];
    let state = accepted(&state, vec![upsert(p2)]);
    accepted(&state, vec![upsert(stateless("sg3"))]);
}

#[test]
fn rule_ids_are_unique_across_groups() {
    let mut sg1 = security_group("sg1");
    sg1.rules = vec![rule("r1"), rule("r2")];
    let state = accepted(&base_state(), vec![upsert(sg1.clone())]);

    let mut sg2 = security_group("sg2");
    sg2.rules = vec![rule("r3"), rule("r2")];
    let error = refused(
        &state,
        vec![upsert(sg2.clone())],
        ErrorCode::AlreadyExists,
        0,
        "upsert.security_group.rules[1].id",
    );
    assert!(
        error.message.contains("r2") && error.message.contains("sg1"),
        "{}",
        error.message
    );
    // Moving a rule to another group in one request: fine, in either order.
    let mut moved = sg1.clone();
    moved.rules.retain(|r| r.id != "r2");
    accepted(&state, vec![upsert(sg2.clone()), upsert(moved.clone())]);
    accepted(&state, vec![upsert(moved), upsert(sg2.clone())]);
    // Both naming it in one request: reported on the later one.
    let mut sg3 = security_group("sg3");
    sg3.rules = vec![rule("r9")];
    let mut sg4 = security_group("sg4");
    sg4.rules = vec![rule("r8"), rule("r9")];
    refused(
        &state,
        vec![upsert(sg3), upsert(network("n9")), upsert(sg4)],
        ErrorCode::AlreadyExists,
        2,
        "upsert.security_group.rules[1].id",
    );
    // Re-sending a group with its own rules is no conflict.
    accepted(&state, vec![upsert(sg1)]);
    // Sync: the later group.
    let mut a = security_group("a");
    a.rules = vec![rule("x")];
    let mut b = security_group("b");
    b.rules = vec![rule("x")];
    let error = State::replace(vec![a.into(), b.into()]).unwrap_err();
    assert_eq!(
        (error.code, error.index, error.field.as_str()),
        (
            ErrorCode::AlreadyExists,
            Some(1),
            "security_group.rules[0].id"
        )
    );
}

#[test]
fn security_groups_need_port_security() {
    let state = base_state();
    // Disabled on the port.
    let error = refused(
        &state,
        vec![upsert(Port {
            port_security_enabled: Some(false),
            ..p1()
        })],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.port.security_group_ids",
    );
    assert!(error.message.contains("port p1"), "{}", error.message);
    // Without groups, fine.
    accepted(
        &state,
        vec![upsert(Port {
            port_security_enabled: Some(false),
            security_group_ids: Vec::new(),
            ..p1()
        })],
    );

    // Inherited from a network without port security.
    let open_network = Network {
        port_security_enabled: false,
        ..network("open")
    };
    let state = accepted(
        &state,
        vec![
            upsert(open_network),
            upsert(subnet("open-s", "open", "192.168.0.0/24")),
        ],
    );
    let mut p2 = port("p2", "open", "fa:16:3e:00:00:02");
    p2.security_group_ids = vec!["sg1".to_owned()];
    let error = refused(
        &state,
        vec![upsert(p2.clone())],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.port.security_group_ids",
    );
    assert!(error.message.contains("network open"), "{}", error.message);
    // The port turning it on for itself: fine.
    accepted(
        &state,
        vec![upsert(Port {
            port_security_enabled: Some(true),
            ..p2
        })],
    );

    // The network turns it off under p1, which inherits it and has a group.
    let closed = Network {
        port_security_enabled: false,
        revision_number: 2,
        ..state.networks["n1"].clone()
    };
    let error = refused(
        &state,
        vec![upsert(closed.clone())],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.network.port_security_enabled",
    );
    assert!(error.message.contains("port p1"), "{}", error.message);
    // ...fine when p1 keeps it on for itself, or drops its groups, in the same request.
    accepted(
        &state,
        vec![
            upsert(closed.clone()),
            upsert(Port {
                port_security_enabled: Some(true),
                ..p1()
            }),
        ],
    );
    accepted(
        &state,
        vec![
            upsert(Port {
                security_group_ids: Vec::new(),
                ..p1()
            }),
            upsert(closed),
        ],
    );
}

// ---------------------------------------------------------------------------------
// Determinism
// ---------------------------------------------------------------------------------

#[test]
fn the_first_error_in_request_order_is_reported() {
    let state = base_state();
    let missing_network = upsert(port("p2", "nope", "fa:16:3e:00:00:02"));
    let bad_cidr = upsert(Subnet {
        ip_version: IpVersion::V6,
        ..subnet("s2", "n1", "10.7.0.0/24")
    });
    let stale = upsert(Port {
        revision_number: 0,
        ..p1()
    });
    let error = refused(
        &state,
        vec![
            upsert(network("n2")),
            missing_network.clone(),
            bad_cidr.clone(),
            stale.clone(),
        ],
        ErrorCode::NotFound,
        1,
        "upsert.port.network_id",
    );
    let again = state
        .apply(&[
            upsert(network("n2")),
            missing_network.clone(),
            bad_cidr.clone(),
            stale.clone(),
        ])
        .unwrap_err();
    assert_eq!(error, again);
    refused(
        &state,
        vec![
            upsert(network("n2")),
            bad_cidr,
            missing_network,
            stale.clone(),
        ],
        ErrorCode::InvalidArgument,
        1,
        "upsert.subnet.cidr",
    );
    refused(
        &state,
        vec![stale],
        ErrorCode::FailedPrecondition,
        0,
        "upsert.port.revision_number",
    );
}

#[test]
fn sync_errors_are_relative_to_the_resource() {
    let error = State::replace(vec![
        network("n1").into(),
        subnet("s1", "n1", "10.0.0.0/24").into(),
        port_at("p", "fa:16:3e:00:00:01", "10.9.0.1").into(),
    ])
    .unwrap_err();
    assert_eq!(
        (error.code, error.index, error.field.as_str()),
        (
            ErrorCode::InvalidArgument,
            Some(2),
            "port.fixed_ips[0].ip_address"
        )
    );
    let error = State::replace(vec![port("p", "n1", "fa:16:3e:00:00:01").into()]).unwrap_err();
    assert_eq!(
        (error.code, error.index, error.field.as_str()),
        (ErrorCode::NotFound, Some(0), "port.network_id")
    );
}
