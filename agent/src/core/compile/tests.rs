use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;
use dataplane_abi::{ext_addr_flags, gateway_flags, neigh_flags, route_flags, ROUTE_FIXED_BITS};

use crate::core::{fixtures::*, model, model::*};

const NODE: &str = "node-a";

fn interfaces(names: &[(&str, u32)]) -> BTreeMap<String, u32> {
    names
        .iter()
        .map(|(name, ifindex)| ((*name).to_owned(), *ifindex))
        .collect()
}

/// Slots for tests: rules are plentiful unless a test is about them.
fn new_slots(max_ports: u32, max_networks: u32) -> Slots {
    Slots::new(SlotLimits {
        max_ports,
        max_networks,
        max_rules: 1024,
    })
}

fn run(state: &State, devices: &BTreeMap<String, u32>, slots: &mut Slots) -> Compiled {
    compile(
        state,
        &NodeView {
            node_name: NODE,
            interfaces: devices,
            peer_devices: &BTreeSet::new(),
            uplink: None,
        },
        slots,
    )
}

fn status_of(compiled: &Compiled, kind: ResourceKind, id: &str) -> (StatusKind, String) {
    let status = &compiled.statuses[&ResourceRef {
        kind,
        id: id.to_owned(),
    }];
    (status.status, status.reason.clone())
}

fn local_port(id: &str, network_id: &str, mac_address: &str, device: &str) -> Port {
    bound(port(id, network_id, mac_address), NODE, device)
}

/// Networks n1 and n2 (each with a v4 and a v6 subnet) and the given ports.
fn state_with(ports: Vec<Port>) -> State {
    let mut resources: Vec<Resource> = vec![
        network("n1").into(),
        subnet("s1", "n1", "10.0.0.0/24").into(),
        subnet("s1v6", "n1", "2001:db8:1::/64").into(),
        network("n2").into(),
        subnet("s2", "n2", "10.0.0.0/24").into(),
    ];
    resources.extend(ports.into_iter().map(Resource::from));
    State::replace(resources).expect("valid test state")
}

fn addr4(slot: u32, mac_address: &str, addr: &str) -> PortAddr4 {
    PortAddr4 {
        port_slot: slot,
        mac: mac(mac_address).0,
        _pad: [0; 2],
        addr: addr.parse::<Ipv4Addr>().unwrap().octets(),
    }
}

fn addr6(slot: u32, mac_address: &str, addr: &str) -> PortAddr6 {
    PortAddr6 {
        port_slot: slot,
        mac: mac(mac_address).0,
        _pad: [0; 2],
        addr: addr.parse::<Ipv6Addr>().unwrap().octets(),
    }
}

fn mac_key(slot: u32, mac_address: &str) -> PortMacKey {
    PortMacKey {
        port_slot: slot,
        mac: mac(mac_address).0,
        _pad: [0; 2],
    }
}

fn flood_ports(set: &FloodSet) -> Vec<(u32, u32)> {
    set.ports[..set.count as usize]
        .iter()
        .map(|entry| (entry.ifindex, entry.flags))
        .collect()
}

#[test]
fn a_port_gets_its_info_addresses_fdb_and_flood_entries() {
    let mut p = local_port("p1", "n1", "fa:16:3e:12:34:56", "tap1");
    p.fixed_ips = vec![
        fixed_ip("s1", "10.0.0.5"),
        fixed_ip("s1v6", "2001:db8:1::5"),
    ];
    let state = state_with(vec![p]);
    let devices = interfaces(&[("tap1", 11)]);
    let mut slots = new_slots(16, 16);
    let compiled = run(&state, &devices, &mut slots);

    let (slot, network_slot) = (
        slots.port_slot("p1").unwrap(),
        slots.network_slot("n1").unwrap(),
    );
    assert_eq!((slot, network_slot), (1, 1));
    // Port security and no security groups: a policy without rules (IP is dropped).
    let revision = compiled.tables.ports[&11].policy_revision;
    assert_ne!(revision, 0);
    assert_eq!(slots.policy_id(&[]), Some(1));
    assert_eq!(
        compiled.tables.ports,
        BTreeMap::from([(
            11,
            PortInfo {
                port_slot: 1,
                network_slot: 1,
                flags: port_flags::ADMIN_UP | port_flags::PORT_SECURITY | port_flags::POLICY,
                mac: mac("fa:16:3e:12:34:56").0,
                _pad: [0; 2],
                policy_id: 1,
                policy_revision: revision,
            }
        )])
    );
    assert!(compiled.tables.sg_remote4.is_empty() && compiled.tables.sg_remote6.is_empty());
    assert!(compiled.tables.sg_rules.is_empty() && compiled.rules.is_empty());
    assert_eq!(
        compiled.tables.port_macs,
        BTreeSet::from([mac_key(1, "fa:16:3e:12:34:56")])
    );
    assert_eq!(
        compiled.tables.port_ip4,
        BTreeSet::from([addr4(1, "fa:16:3e:12:34:56", "10.0.0.5")])
    );
    assert_eq!(
        compiled.tables.port_ip6,
        BTreeSet::from([
            addr6(1, "fa:16:3e:12:34:56", "2001:db8:1::5"),
            addr6(1, "fa:16:3e:12:34:56", "fe80::f816:3eff:fe12:3456"),
        ])
    );
    assert!(compiled.tables.port_net4.is_empty() && compiled.tables.port_net6.is_empty());
    assert_eq!(
        compiled.tables.fdb,
        BTreeMap::from([(
            fdb_key(1, mac("fa:16:3e:12:34:56")),
            FdbEntry {
                ifindex: 11,
                port_slot: 1,
                flags: 0
            }
        )])
    );
    assert_eq!(flood_ports(&compiled.tables.flood[&1]), [(11, 0)]);
    assert_eq!(
        compiled.ports,
        [ProgrammedPort {
            port_id: "p1".to_owned(),
            slot: 1,
            ifindex: 11,
            interface_name: "tap1".to_owned(),
        }]
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::Port, "p1"),
        (StatusKind::Active, String::new())
    );
}

#[test]
fn allowed_address_pairs_exact_and_prefixes() {
    let own = "fa:16:3e:00:00:01";
    let other = "02:00:00:aa:bb:cc";
    let mut p = local_port("p1", "n1", own, "tap1");
    p.fixed_ips = vec![fixed_ip("s1", "10.0.0.5")];
    p.allowed_address_pairs = vec![
        pair("10.0.0.100", None),
        pair("10.0.9.9/32", Some(other)),
        // Held unmasked on purpose: the compiler masks.
        AllowedAddressPair {
            ip_address: net("10.1.2.3/16"),
            mac_address: None,
        },
        pair("2001:db8:9::/64", Some(other)),
        pair("2001:db8:1::77/128", None),
        pair("0.0.0.0/0", Some(other)),
    ];
    let state = state_with(vec![p]);
    let mut slots = new_slots(16, 16);
    let compiled = run(&state, &interfaces(&[("tap1", 11)]), &mut slots);
    let tables = &compiled.tables;

    assert_eq!(
        tables.ports[&11].flags,
        port_flags::ADMIN_UP
            | port_flags::PORT_SECURITY
            | port_flags::POLICY
            | port_flags::HAS_NET4
            | port_flags::HAS_NET6
    );
    assert_eq!(
        tables.port_macs,
        BTreeSet::from([mac_key(1, own), mac_key(1, other)])
    );
    assert_eq!(
        tables.port_ip4,
        BTreeSet::from([
            addr4(1, own, "10.0.0.5"),
            addr4(1, own, "10.0.0.100"),
            addr4(1, other, "10.0.9.9"),
        ])
    );
    assert_eq!(
        tables.port_net4,
        BTreeSet::from([
            (PORT_ADDR_FIXED_BITS + 16, addr4(1, own, "10.1.0.0")),
            (PORT_ADDR_FIXED_BITS, addr4(1, other, "0.0.0.0")),
        ])
    );
    assert_eq!(
        tables.port_ip6,
        BTreeSet::from([
            addr6(1, own, "2001:db8:1::77"),
            addr6(1, own, "fe80::f816:3eff:fe00:1"),
            // The pair MAC's own link-local address (locally administered bit flipped off).
            addr6(1, other, "fe80::ff:feaa:bbcc"),
        ])
    );
    assert_eq!(
        tables.port_net6,
        BTreeSet::from([(PORT_ADDR_FIXED_BITS + 64, addr6(1, other, "2001:db8:9::"))])
    );
    assert_eq!(PORT_ADDR_FIXED_BITS + 64, 160);

    // A pair MAC only this port claims is forwarded to it; the port also takes unknown
    // unicast, since frames to its other MACs may not be learnt anywhere.
    assert_eq!(
        tables.fdb[&fdb_key(1, mac(other))],
        FdbEntry {
            ifindex: 11,
            port_slot: 1,
            flags: 0
        }
    );
    assert_eq!(
        flood_ports(&tables.flood[&1]),
        [(11, flood_flags::ACCEPTS_UNKNOWN)]
    );
}

#[test]
fn a_pair_mac_claimed_by_two_ports_is_in_no_fdb_entry() {
    let shared = "02:00:00:00:00:99";
    let mut a = local_port("a", "n1", "fa:16:3e:00:00:0a", "tap-a");
    a.allowed_address_pairs = vec![pair("10.0.0.99", Some(shared))];
    let mut b = local_port("b", "n1", "fa:16:3e:00:00:0b", "tap-b");
    b.allowed_address_pairs = vec![pair("10.0.0.99", Some(shared))];
    // c names a's own MAC as its pair MAC: a keeps the FDB entry of its own MAC.
    let mut c = local_port("c", "n1", "fa:16:3e:00:00:0c", "tap-c");
    c.allowed_address_pairs = vec![pair("10.0.0.98", Some("fa:16:3e:00:00:0a"))];
    let state = state_with(vec![a, b, c]);
    let devices = interfaces(&[("tap-a", 1), ("tap-b", 2), ("tap-c", 3)]);
    let mut slots = new_slots(16, 16);
    let compiled = run(&state, &devices, &mut slots);
    let fdb = &compiled.tables.fdb;

    assert!(!fdb.contains_key(&fdb_key(1, mac(shared))));
    assert_eq!(fdb[&fdb_key(1, mac("fa:16:3e:00:00:0a"))].ifindex, 1);
    assert_eq!(fdb.len(), 3, "{fdb:?}");
    assert_eq!(
        flood_ports(&compiled.tables.flood[&1]),
        [
            (1, flood_flags::ACCEPTS_UNKNOWN),
            (2, flood_flags::ACCEPTS_UNKNOWN),
            (3, flood_flags::ACCEPTS_UNKNOWN)
        ]
    );
}

#[test]
fn networks_are_isolated() {
    let a = local_port("a", "n1", "fa:16:3e:00:00:01", "tap-a");
    let b = local_port("b", "n1", "fa:16:3e:00:00:02", "tap-b");
    // Same MAC as a, other network: its own FDB entry under its own network slot.
    let c = local_port("c", "n2", "fa:16:3e:00:00:01", "tap-c");
    let state = state_with(vec![a, b, c]);
    let devices = interfaces(&[("tap-a", 1), ("tap-b", 2), ("tap-c", 3)]);
    let mut slots = new_slots(16, 16);
    let compiled = run(&state, &devices, &mut slots);

    let (n1, n2) = (
        slots.network_slot("n1").unwrap(),
        slots.network_slot("n2").unwrap(),
    );
    assert_ne!(n1, n2);
    assert_eq!(compiled.tables.ports[&3].network_slot, n2);
    assert_eq!(
        compiled.tables.fdb[&fdb_key(n1, mac("fa:16:3e:00:00:01"))].ifindex,
        1
    );
    assert_eq!(
        compiled.tables.fdb[&fdb_key(n2, mac("fa:16:3e:00:00:01"))].ifindex,
        3
    );
    assert_eq!(flood_ports(&compiled.tables.flood[&n1]), [(1, 0), (2, 0)]);
    assert_eq!(flood_ports(&compiled.tables.flood[&n2]), [(3, 0)]);
    assert_eq!(compiled.tables.flood.len(), 2);
}

#[test]
fn admin_down_ports_stay_programmed_without_admin_up() {
    let mut down = local_port("a", "n1", "fa:16:3e:00:00:01", "tap-a");
    down.admin_state_up = false;
    let on_down_network = local_port("b", "n2", "fa:16:3e:00:00:02", "tap-b");
    let mut state = state_with(vec![down, on_down_network]);
    state = state
        .apply(&[upsert(Network {
            admin_state_up: false,
            ..network("n2")
        })])
        .unwrap();
    let devices = interfaces(&[("tap-a", 1), ("tap-b", 2)]);
    let mut slots = new_slots(16, 16);
    let compiled = run(&state, &devices, &mut slots);

    let secured = port_flags::PORT_SECURITY | port_flags::POLICY;
    assert_eq!(compiled.tables.ports[&1].flags, secured);
    assert_eq!(compiled.tables.ports[&2].flags, secured);
    assert_eq!(compiled.ports.len(), 2);
    assert_eq!(
        status_of(&compiled, ResourceKind::Port, "a"),
        (StatusKind::Down, "admin_state_up is false".to_owned())
    );
    let (status, reason) = status_of(&compiled, ResourceKind::Port, "b");
    assert_eq!(status, StatusKind::Down);
    assert!(
        reason.contains("network n2") && reason.contains("admin_state_up"),
        "{reason}"
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::Network, "n2"),
        (StatusKind::Down, "admin_state_up is false".to_owned())
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::Network, "n1").0,
        StatusKind::Active
    );
}

#[test]
fn port_security_comes_from_the_network_unless_the_port_sets_it() {
    let inherits = local_port("a", "n2", "fa:16:3e:00:00:01", "tap-a");
    let enabled = Port {
        port_security_enabled: Some(true),
        ..local_port("b", "n2", "fa:16:3e:00:00:02", "tap-b")
    };
    let disabled = Port {
        port_security_enabled: Some(false),
        ..local_port("c", "n1", "fa:16:3e:00:00:03", "tap-c")
    };
    let mut state = state_with(vec![inherits, enabled, disabled]);
    state = state
        .apply(&[upsert(Network {
            port_security_enabled: false,
            ..network("n2")
        })])
        .unwrap();
    let devices = interfaces(&[("tap-a", 1), ("tap-b", 2), ("tap-c", 3)]);
    let mut slots = new_slots(16, 16);
    let compiled = run(&state, &devices, &mut slots);
    let tables = &compiled.tables;

    assert_eq!(tables.ports[&1].flags, port_flags::ADMIN_UP);
    assert_eq!(
        tables.ports[&2].flags,
        port_flags::ADMIN_UP | port_flags::PORT_SECURITY | port_flags::POLICY
    );
    assert_eq!(tables.ports[&3].flags, port_flags::ADMIN_UP);
    // A policy only for the port with port security.
    assert_eq!(tables.ports[&1].policy_id, 0);
    assert_ne!(tables.ports[&2].policy_id, 0);
    assert_eq!(tables.ports[&3].policy_id, 0);
    // Address tables only for the port with port security.
    let slot_b = slots.port_slot("b").unwrap();
    assert!(tables.port_macs.iter().all(|key| key.port_slot == slot_b));
    assert!(tables.port_ip6.iter().all(|key| key.port_slot == slot_b));
    assert_eq!(tables.port_macs.len(), 1);
    // Without port security a port takes unknown unicast.
    let n2 = slots.network_slot("n2").unwrap();
    assert_eq!(
        flood_ports(&tables.flood[&n2]),
        [(1, flood_flags::ACCEPTS_UNKNOWN), (2, 0)]
    );
    let n1 = slots.network_slot("n1").unwrap();
    assert_eq!(
        flood_ports(&tables.flood[&n1]),
        [(3, flood_flags::ACCEPTS_UNKNOWN)]
    );
}

#[test]
fn statuses_of_ports_not_programmed_and_of_other_resources() {
    let waiting = local_port("waiting", "n1", "fa:16:3e:00:00:01", "tap-missing");
    let elsewhere = bound(
        port("elsewhere", "n1", "fa:16:3e:00:00:02"),
        "node-b",
        "tap9",
    );
    let unbound = port("unbound", "n1", "fa:16:3e:00:00:03");
    let no_device_name = bound(port("nameless", "n1", "fa:16:3e:00:00:04"), NODE, "");
    let first = local_port("first", "n1", "fa:16:3e:00:00:05", "tap-shared");
    let second = local_port("second", "n1", "fa:16:3e:00:00:06", "tap-shared");
    let mut state = state_with(vec![
        waiting,
        elsewhere,
        unbound,
        no_device_name,
        first,
        second,
    ]);
    let mut fip = floating_ip("f1", "ext", "203.0.113.9");
    fip.revision_number = 4;
    state = state
        .apply(&[
            upsert(external_network("ext")),
            upsert(fip),
            upsert(router("r1")),
            upsert(security_group("sg")),
            upsert(qos_policy("q")),
        ])
        .unwrap();
    let mut slots = new_slots(16, 16);
    let compiled = run(
        &state,
        &interfaces(&[("tap-shared", 5), ("tap9", 9)]),
        &mut slots,
    );

    let port = |id| status_of(&compiled, ResourceKind::Port, id);
    assert_eq!(
        port("waiting"),
        (
            StatusKind::Build,
            "waiting for interface tap-missing".to_owned()
        )
    );
    // The node tells a device yet to come from one that went away by this.
    assert_eq!(
        compiled.missing_devices,
        [("waiting".to_owned(), "tap-missing".to_owned())].into()
    );
    assert_eq!(
        port("elsewhere"),
        (
            StatusKind::Down,
            "bound to host node-b, not this node".to_owned()
        )
    );
    assert_eq!(
        port("unbound"),
        (StatusKind::Down, "not bound to a node".to_owned())
    );
    assert_eq!(port("nameless").0, StatusKind::Build);
    assert_eq!(port("first").0, StatusKind::Active);
    let (status, reason) = port("second");
    assert_eq!(status, StatusKind::Error);
    assert!(
        reason.contains("tap-shared") && reason.contains("first"),
        "{reason}"
    );
    assert_eq!(compiled.ports.len(), 1);

    // A router without interfaces has nothing to route here, nor its floating IPs.
    assert_eq!(
        status_of(&compiled, ResourceKind::Router, "r1"),
        (StatusKind::Down, ROUTER_NOT_HERE.to_owned())
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::FloatingIp, "f1").0,
        StatusKind::Down
    );
    for (kind, id) in [
        (ResourceKind::Subnet, "s1"),
        (ResourceKind::SecurityGroup, "sg"),
        (ResourceKind::QosPolicy, "q"),
        (ResourceKind::Network, "ext"),
    ] {
        assert_eq!(
            status_of(&compiled, kind, id),
            (StatusKind::Active, String::new())
        );
    }
    assert_eq!(
        compiled.statuses[&ResourceRef {
            kind: ResourceKind::FloatingIp,
            id: "f1".to_owned()
        }]
            .revision_number,
        4
    );
    assert_eq!(compiled.statuses.len(), state.len());
}

#[test]
fn slots_are_stable_and_reused() {
    let devices = interfaces(&[("tap-b", 2), ("tap-c", 3), ("tap-d", 4), ("tap-a", 1)]);
    let b = local_port("b", "n1", "fa:16:3e:00:00:02", "tap-b");
    let c = local_port("c", "n1", "fa:16:3e:00:00:03", "tap-c");
    let mut slots = new_slots(16, 16);
    let state = state_with(vec![b.clone(), c.clone()]);
    let first = run(&state, &devices, &mut slots);
    assert_eq!(
        (slots.port_slot("b"), slots.port_slot("c")),
        (Some(1), Some(2))
    );
    assert_eq!(
        run(&state, &devices, &mut slots),
        first,
        "recompiling changes nothing"
    );

    // A newcomer sorting first does not move anyone.
    let a = local_port("a", "n1", "fa:16:3e:00:00:01", "tap-a");
    let state = state_with(vec![a.clone(), b.clone(), c.clone()]);
    run(&state, &devices, &mut slots);
    assert_eq!(
        (
            slots.port_slot("a"),
            slots.port_slot("b"),
            slots.port_slot("c")
        ),
        (Some(3), Some(1), Some(2))
    );

    // b goes; d takes its slot. A port whose device vanishes gives its slot up too.
    let d = local_port("d", "n1", "fa:16:3e:00:00:04", "tap-d");
    let state = state_with(vec![a.clone(), c.clone(), d]);
    let compiled = run(&state, &devices, &mut slots);
    assert_eq!(
        (
            slots.port_slot("a"),
            slots.port_slot("b"),
            slots.port_slot("c"),
            slots.port_slot("d")
        ),
        (Some(3), None, Some(2), Some(1))
    );
    assert_eq!(
        compiled
            .ports
            .iter()
            .map(|p| (p.port_id.as_str(), p.slot))
            .collect::<Vec<_>>(),
        [("a", 3), ("c", 2), ("d", 1)]
    );
    run(
        &state,
        &interfaces(&[("tap-a", 1), ("tap-d", 4)]),
        &mut slots,
    );
    assert_eq!(slots.port_slot("c"), None);

    // A network without programmed ports gives its slot up; the next network takes it.
    let e = local_port("e", "n2", "fa:16:3e:00:00:05", "tap-e");
    let state = state_with(vec![e]);
    run(&state, &interfaces(&[("tap-e", 5)]), &mut slots);
    assert_eq!(
        (slots.network_slot("n1"), slots.network_slot("n2")),
        (None, Some(1))
    );
}

#[test]
fn ports_beyond_the_slots_are_errors() {
    // Slots 1..3: two ports.
    let ports: Vec<Port> = (0..3)
        .map(|i| {
            local_port(
                &format!("p{i}"),
                "n1",
                &format!("fa:16:3e:00:00:{i:02x}"),
                &format!("tap{i}"),
            )
        })
        .collect();
    let state = state_with(ports);
    let devices = interfaces(&[("tap0", 10), ("tap1", 11), ("tap2", 12)]);
    let mut slots = new_slots(3, 3);
    let compiled = run(&state, &devices, &mut slots);
    assert_eq!(
        compiled
            .ports
            .iter()
            .map(|p| p.port_id.as_str())
            .collect::<Vec<_>>(),
        ["p0", "p1"]
    );
    let (status, reason) = status_of(&compiled, ResourceKind::Port, "p2");
    assert_eq!(status, StatusKind::Error);
    assert!(reason.contains("port slot"), "{reason}");
    assert!(!compiled.tables.ports.contains_key(&12));

    // One network slot: the second network's ports are errors.
    let a = local_port("a", "n1", "fa:16:3e:00:00:01", "tap-a");
    let b = local_port("b", "n2", "fa:16:3e:00:00:02", "tap-b");
    let mut slots = new_slots(8, 2);
    let compiled = run(
        &state_with(vec![a, b]),
        &interfaces(&[("tap-a", 1), ("tap-b", 2)]),
        &mut slots,
    );
    let (status, reason) = status_of(&compiled, ResourceKind::Port, "b");
    assert_eq!(status, StatusKind::Error);
    assert!(reason.contains("network slot"), "{reason}");
    assert_eq!(slots.port_slot("b"), None);
    assert_eq!(compiled.tables.flood.len(), 1);
}

#[test]
fn a_network_floods_to_at_most_max_flood_ports() {
    let count = MAX_FLOOD_PORTS + 2;
    let ports: Vec<Port> = (0..count)
        .map(|i| {
            local_port(
                &format!("p{i:03}"),
                "n1",
                &format!("fa:16:3e:00:{:02x}:{:02x}", i / 256, i % 256),
                &format!("tap{i}"),
            )
        })
        .collect();
    let state = state_with(ports);
    let devices: BTreeMap<String, u32> = (0..count)
        .map(|i| (format!("tap{i}"), 100 + i as u32))
        .collect();
    let mut slots = new_slots(1024, 16);
    let compiled = run(&state, &devices, &mut slots);

    assert_eq!(compiled.ports.len(), MAX_FLOOD_PORTS);
    let flood = &compiled.tables.flood[&1];
    assert_eq!(flood.count as usize, MAX_FLOOD_PORTS);
    assert_eq!(
        flood.ports[MAX_FLOOD_PORTS - 1].ifindex,
        100 + MAX_FLOOD_PORTS as u32 - 1
    );
    for i in [MAX_FLOOD_PORTS, MAX_FLOOD_PORTS + 1] {
        let (status, reason) = status_of(&compiled, ResourceKind::Port, &format!("p{i:03}"));
        assert_eq!(status, StatusKind::Error);
        assert!(reason.contains(&MAX_FLOOD_PORTS.to_string()), "{reason}");
    }
    assert_eq!(slots.port_slot(&format!("p{MAX_FLOOD_PORTS:03}")), None);
}

#[test]
fn slot_pool_hands_out_the_lowest_free_slot() {
    let mut pool = SlotPool::new(4);
    assert_eq!(pool.assign("a"), Some(1));
    assert_eq!(pool.assign("b"), Some(2));
    assert_eq!(pool.assign("c"), Some(3));
    assert_eq!(pool.assign("d"), None);
    assert_eq!(pool.assign("b"), Some(2));
    pool.retain(|id| id != "c");
    pool.release("a");
    assert_eq!(pool.assign("e"), Some(1));
    assert_eq!(pool.assign("f"), Some(3));
    assert_eq!(pool.capacity(), 3);
    assert_eq!(SlotPool::<String>::new(0).capacity(), 0);
    assert_eq!(SlotPool::<String>::new(0).assign("x"), None);
}

#[test]
fn ports_on_peer_devices_get_peer_delivery() {
    let state = state_with(vec![
        local_port("p1", "n1", "fa:16:3e:00:00:01", "veth1"),
        local_port("p2", "n1", "fa:16:3e:00:00:02", "tap2"),
    ]);
    let devices = interfaces(&[("veth1", 11), ("tap2", 12)]);
    let compiled = compile(
        &state,
        &NodeView {
            node_name: NODE,
            interfaces: &devices,
            peer_devices: &BTreeSet::from([11]),
            uplink: None,
        },
        &mut new_slots(16, 16),
    );
    let network_slot = compiled.tables.ports[&11].network_slot;
    let flags = |mac_address| compiled.tables.fdb[&fdb_key(network_slot, mac(mac_address))].flags;
    assert_eq!(flags("fa:16:3e:00:00:01"), fdb_flags::PEER_DELIVERY);
    assert_eq!(flags("fa:16:3e:00:00:02"), 0);
}

/// r1 between n1 (local port p1) and n2 (local port p2), with a static route; r2 on n3,
/// which has no local port.
fn routed_state(r1_up: bool) -> State {
    let mut p1 = local_port("p1", "n1", "fa:16:3e:00:00:01", "tap1");
    p1.fixed_ips = vec![fixed_ip("s1", "10.0.0.5")];
    let mut p2 = local_port("p2", "n2", "fa:16:3e:00:00:02", "tap2");
    p2.fixed_ips = vec![fixed_ip("s2b", "10.2.0.5")];
    let mut gw1 = port("gw1", "n1", "fa:16:3e:00:01:01");
    gw1.fixed_ips = vec![fixed_ip("s1", "10.0.0.1")];
    let mut gw2 = port("gw2", "n2", "fa:16:3e:00:01:02");
    gw2.fixed_ips = vec![fixed_ip("s2b", "10.2.0.1")];
    let mut gw3 = port("gw3", "n3", "fa:16:3e:00:01:03");
    gw3.fixed_ips = vec![fixed_ip("s3", "10.3.0.1")];
    let mut r1 = router("r1");
    r1.admin_state_up = r1_up;
    r1.interfaces = vec![interface("s1", Some("gw1")), interface("s2b", Some("gw2"))];
    r1.routes = vec![
        model::Route {
            destination: net("192.168.0.0/16"),
            nexthop: ip("10.2.0.5"),
        },
        // No interface reaches this next hop: left out.
        model::Route {
            destination: net("172.16.0.0/12"),
            nexthop: ip("10.9.0.9"),
        },
    ];
    let mut r2 = router("r2");
    r2.interfaces = vec![interface("s3", Some("gw3"))];
    let resources: Vec<Resource> = vec![
        network("n1").into(),
        subnet("s1", "n1", "10.0.0.0/24").into(),
        network("n2").into(),
        subnet("s2b", "n2", "10.2.0.0/24").into(),
        network("n3").into(),
        subnet("s3", "n3", "10.3.0.0/24").into(),
        p1.into(),
        p2.into(),
        gw1.into(),
        gw2.into(),
        gw3.into(),
        r1.into(),
        r2.into(),
    ];
    State::replace(resources).expect("valid test state")
}

#[test]
fn routers_compile_to_interfaces_routes_and_neighbours() {
    let devices = interfaces(&[("tap1", 11), ("tap2", 12)]);
    let mut slots = new_slots(16, 16);
    let compiled = run(&routed_state(true), &devices, &mut slots);
    let t = &compiled.tables;
    let (n1, n2) = (
        slots.network_slot("n1").unwrap(),
        slots.network_slot("n2").unwrap(),
    );
    assert_eq!(slots.network_slot("n3"), None, "n3 has no local port");
    let r1 = slots.router_slot("r1").unwrap();

    assert_eq!(
        t.router_ifs[&fdb_key(n1, mac("fa:16:3e:00:01:01"))],
        RouterIf {
            router_slot: r1,
            ip4: [10, 0, 0, 1],
            ip6: [0; 16],
        }
    );
    assert_eq!(t.router_ifs.len(), 2, "r2 has nothing here");
    let route = |prefix: u32, addr: [u8; 4]| {
        t.routes4
            .get(&(
                ROUTE_FIXED_BITS + prefix,
                RouteKey4 {
                    router_slot: r1,
                    addr,
                },
            ))
            .copied()
    };
    let on_link = route(24, [10, 2, 0, 0]).unwrap();
    assert_eq!(
        (on_link.network_slot, on_link.flags, on_link.mac),
        (n2, 0, mac("fa:16:3e:00:01:02").0)
    );
    assert_eq!(route(32, [10, 0, 0, 1]).unwrap().flags, route_flags::LOCAL);
    let via = route(16, [192, 168, 0, 0]).unwrap();
    assert_eq!(
        (via.network_slot, via.flags, &via.nexthop[..4]),
        (n2, route_flags::VIA, &[10, 2, 0, 5][..])
    );
    assert_eq!(route(12, [172, 16, 0, 0]), None);
    assert_eq!(t.routes4.len(), 5);

    let neighbor = |network_slot, addr| t.neigh4[&NeighKey4 { network_slot, addr }];
    assert_eq!(
        neighbor(n2, [10, 2, 0, 5]),
        Neighbor {
            mac: mac("fa:16:3e:00:00:02").0,
            _pad: [0; 2],
            flags: 0,
        }
    );
    assert_eq!(neighbor(n1, [10, 0, 0, 1]).flags, neigh_flags::ROUTER);

    assert_eq!(
        status_of(&compiled, ResourceKind::Router, "r1").0,
        StatusKind::Active
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::Port, "gw1").0,
        StatusKind::Active
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::Router, "r2"),
        (StatusKind::Down, ROUTER_NOT_HERE.to_owned())
    );

    // Admin down: nothing of it is programmed, and its slot is freed.
    let down = run(&routed_state(false), &devices, &mut slots);
    assert!(down.tables.router_ifs.is_empty() && down.tables.routes4.is_empty());
    assert_eq!(slots.router_slot("r1"), None);
    assert_eq!(
        status_of(&down, ResourceKind::Router, "r1"),
        (StatusKind::Down, "admin_state_up is false".to_owned())
    );
}

/// `routed_state` with r1's gateway on external network `ext` (SNAT on) and floating
/// IPs: `fip-1` on p1, `fip-free` unassociated, `fip-away` on a port of another node.
fn nat_state() -> State {
    State::replace(nat_resources()).expect("valid test state")
}

fn nat_resources() -> Vec<Resource> {
    let mut state_resources: Vec<Resource> = Vec::new();
    let routed = routed_state(true);
    state_resources.extend(routed.networks.values().cloned().map(Resource::from));
    state_resources.extend(routed.subnets.values().cloned().map(Resource::from));
    state_resources.extend(routed.ports.values().cloned().map(Resource::from));
    let mut r1 = routed.routers["r1"].clone();
    r1.external_gateway_info = Some(ExternalGatewayInfo {
        network_id: "ext".to_owned(),
        enable_snat: true,
        external_fixed_ips: vec![ExternalFixedIp {
            subnet_id: "ext-v4".to_owned(),
            ip_address: ip("203.0.113.10"),
        }],
    });
    state_resources.push(r1.into());
    state_resources.push(routed.routers["r2"].clone().into());
    let mut ext_subnet = subnet("ext-v4", "ext", "203.0.113.0/24");
    ext_subnet.gateway_ip = Some(ip("203.0.113.1"));
    let mut gw = port("r1-gw", "ext", "fa:16:3e:00:0e:01");
    gw.device_owner = nat::ROUTER_GATEWAY_OWNER.to_owned();
    gw.device_id = "r1".to_owned();
    gw.fixed_ips = vec![fixed_ip("ext-v4", "203.0.113.10")];
    let mut away = bound(port("away", "n1", "fa:16:3e:00:00:09"), "node-b", "tap9");
    away.fixed_ips = vec![fixed_ip("s1", "10.0.0.9")];
    let mut fip1 = floating_ip("fip-1", "ext", "203.0.113.101");
    fip1.port_id = Some("p1".to_owned());
    let mut fip_away = floating_ip("fip-away", "ext", "203.0.113.109");
    fip_away.port_id = Some("away".to_owned());
    state_resources.extend([
        external_network("ext").into(),
        ext_subnet.into(),
        gw.into(),
        away.into(),
        fip1.into(),
        floating_ip("fip-free", "ext", "203.0.113.102").into(),
        fip_away.into(),
    ]);
    state_resources
}

/// `nat_state` with an IPv6 subnet on `ext` too (`v6_only`: r1 has no IPv4 on it), where r1
/// has 2001:db8:e::10 behind the gateway 2001:db8:e::1.
fn dual_stack_nat_state(v6_only: bool) -> State {
    let mut resources = nat_resources();
    let mut ext6 = subnet("ext-v6", "ext", "2001:db8:e::/64");
    ext6.gateway_ip = Some(ip("2001:db8:e::1"));
    resources.push(ext6.into());
    let v6 = ExternalFixedIp {
        subnet_id: "ext-v6".to_owned(),
        ip_address: ip("2001:db8:e::10"),
    };
    for resource in &mut resources {
        match resource {
            Resource::Router(router) if router.id == "r1" => {
                let info = router.external_gateway_info.as_mut().unwrap();
                if v6_only {
                    info.external_fixed_ips.clear();
                }
                info.external_fixed_ips.push(v6.clone());
            }
            Resource::Port(port) if port.id == "r1-gw" => {
                port.fixed_ips.push(fixed_ip("ext-v6", "2001:db8:e::10"));
            }
            _ => {}
        }
    }
    State::replace(resources).expect("valid test state")
}

#[test]
fn ipv6_external_gateways_are_routed_without_translation() {
    let devices = interfaces(&[("tap1", 11), ("tap2", 12)]);
    let mut slots = new_slots(16, 16);
    let mut uplink = Uplink {
        ifindex: 40,
        snat_port_min: 20000,
        snat_port_count: 100,
        gateway_macs: BTreeMap::new(),
    };
    let compile_with = |state: &State, uplink: &Uplink, slots: &mut Slots| {
        compile(
            state,
            &NodeView {
                node_name: NODE,
                interfaces: &devices,
                peer_devices: &BTreeSet::new(),
                uplink: Some(uplink),
            },
            slots,
        )
    };
    let state = dual_stack_nat_state(false);
    assert_eq!(
        nat::gateway_neighbors(&state),
        vec![
            nat::GatewayNeighbor {
                nexthop: ip("203.0.113.1"),
                source: ip("203.0.113.10"),
                source_mac: mac("fa:16:3e:00:0e:01"),
            },
            nat::GatewayNeighbor {
                nexthop: ip("2001:db8:e::1"),
                source: ip("2001:db8:e::10"),
                source_mac: mac("fa:16:3e:00:0e:01"),
            },
        ]
    );

    // Only IPv4's gateway answered: still BUILD, naming the one it waits for.
    uplink
        .gateway_macs
        .insert(ip("203.0.113.1"), mac("02:00:00:00:00:01"));
    let compiled = compile_with(&state, &uplink, &mut slots);
    let r1 = slots.router_slot("r1").unwrap();
    assert_eq!(
        status_of(&compiled, ResourceKind::Router, "r1"),
        (
            StatusKind::Build,
            "resolving the external gateway 2001:db8:e::1 on the uplink".to_owned()
        )
    );
    assert_eq!(compiled.tables.router_gw6[&r1].nexthop_mac, [0; 6]);

    uplink
        .gateway_macs
        .insert(ip("2001:db8:e::1"), mac("02:00:00:00:00:06"));
    let compiled = compile_with(&state, &uplink, &mut slots);
    let t = &compiled.tables;
    assert_eq!(
        status_of(&compiled, ResourceKind::Router, "r1").0,
        StatusKind::Active
    );
    let gw6: [u8; 16] = "2001:db8:e::10".parse::<Ipv6Addr>().unwrap().octets();
    assert_eq!(
        t.router_gw6[&r1],
        RouterGateway6 {
            uplink_ifindex: 40,
            ip6: gw6,
            mac: mac("fa:16:3e:00:0e:01").0,
            nexthop_mac: mac("02:00:00:00:00:06").0,
        }
    );
    let route6 = |len: u32, addr: [u8; 16]| {
        t.routes6.get(&(
            ROUTE_FIXED_BITS + len,
            RouteKey6 {
                router_slot: r1,
                addr,
            },
        ))
    };
    assert_eq!(route6(0, [0; 16]).unwrap().flags, route_flags::EXTERNAL);
    assert_eq!(
        route6(128, gw6).unwrap().flags,
        route_flags::LOCAL | route_flags::EXTERNAL,
        "the gateway address answers pings from inside"
    );
    assert_eq!(
        t.ext_addrs6.get(&gw6).map(|e| (e.mac, e.flags)),
        Some((mac("fa:16:3e:00:0e:01").0, ext_addr_flags::GATEWAY))
    );
    // IPv4 is as without IPv6: translated.
    assert_eq!(t.router_gw[&r1].ip4, [203, 0, 113, 10]);
    assert!(t.fips4.contains_key(&[203, 0, 113, 101]));

    // IPv6 only: routed out, no IPv4 way out, and floating IPs have no router to
    // translate them.
    let state = dual_stack_nat_state(true);
    let compiled = compile_with(&state, &uplink, &mut slots);
    let t = &compiled.tables;
    assert!(t.router_gw.is_empty() && t.fips4.is_empty());
    assert!(!t.ext_addrs4.contains_key(&[203, 0, 113, 10]));
    assert_eq!(t.router_gw6[&r1].ip6, gw6);
    assert_eq!(
        status_of(&compiled, ResourceKind::Router, "r1").0,
        StatusKind::Active
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::FloatingIp, "fip-1"),
        (
            StatusKind::Down,
            "no router with an external gateway here reaches its port".to_owned()
        )
    );
}

#[test]
fn gateways_and_floating_ips_compile_to_the_nat_tables() {
    let devices = interfaces(&[("tap1", 11), ("tap2", 12)]);
    let mut slots = new_slots(16, 16);
    let state = nat_state();
    let mut uplink = Uplink {
        ifindex: 40,
        snat_port_min: 20000,
        snat_port_count: 100,
        gateway_macs: BTreeMap::new(),
    };
    let compile_with = |uplink: Option<&Uplink>, slots: &mut Slots| {
        compile(
            &state,
            &NodeView {
                node_name: NODE,
                interfaces: &devices,
                peer_devices: &BTreeSet::new(),
                uplink,
            },
            slots,
        )
    };

    // No uplink on this node: routing as before, the gateway is an error to report.
    let compiled = compile_with(None, &mut slots);
    assert!(compiled.tables.router_gw.is_empty() && compiled.tables.fips4.is_empty());
    assert_eq!(
        status_of(&compiled, ResourceKind::Router, "r1"),
        (StatusKind::Error, nat::NO_UPLINK.to_owned())
    );

    // The gateway's MAC not resolved yet: programmed (dropped as no_neighbor), BUILD.
    let compiled = compile_with(Some(&uplink), &mut slots);
    let r1 = slots.router_slot("r1").unwrap();
    assert_eq!(compiled.tables.router_gw[&r1].nexthop_mac, [0; 6]);
    assert_eq!(
        status_of(&compiled, ResourceKind::Router, "r1").0,
        StatusKind::Build
    );

    uplink
        .gateway_macs
        .insert(ip("203.0.113.1"), mac("02:00:00:00:00:01"));
    let compiled = compile_with(Some(&uplink), &mut slots);
    let t = &compiled.tables;
    let n1 = slots.network_slot("n1").unwrap();
    assert_eq!(
        t.router_gw[&r1],
        RouterGateway {
            uplink_ifindex: 40,
            flags: gateway_flags::SNAT,
            ip4: [203, 0, 113, 10],
            port_min: 20000,
            port_count: 100,
            mac: mac("fa:16:3e:00:0e:01").0,
            nexthop_mac: mac("02:00:00:00:00:01").0,
        }
    );
    let default = t.routes4[&(
        ROUTE_FIXED_BITS,
        RouteKey4 {
            router_slot: r1,
            addr: [0; 4],
        },
    )];
    assert_eq!(default.flags, route_flags::EXTERNAL);
    assert_eq!(
        t.fips4[&[203, 0, 113, 101]],
        FloatingIp4 {
            fixed: [10, 0, 0, 5],
            network_slot: n1,
            router_slot: r1,
            router_mac: mac("fa:16:3e:00:01:01").0,
            _pad: [0; 2],
        }
    );
    assert_eq!(
        t.fip_of4[&FixedAddr4 {
            network_slot: n1,
            addr: [10, 0, 0, 5],
        }],
        FixedNat4 {
            floating: [203, 0, 113, 101],
            router_slot: r1,
        }
    );
    let ext = |addr: [u8; 4]| t.ext_addrs4.get(&addr).map(|e| e.flags);
    assert_eq!(ext([203, 0, 113, 10]), Some(ext_addr_flags::GATEWAY));
    assert_eq!(ext([203, 0, 113, 101]), Some(ext_addr_flags::FLOATING));
    assert_eq!(ext([203, 0, 113, 102]), Some(ext_addr_flags::UNBOUND));
    assert_eq!(ext([203, 0, 113, 109]), None, "another node translates it");
    assert_eq!(
        status_of(&compiled, ResourceKind::Router, "r1").0,
        StatusKind::Active
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::FloatingIp, "fip-1").0,
        StatusKind::Active
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::FloatingIp, "fip-free"),
        (StatusKind::Down, "not associated with a port".to_owned())
    );
    assert_eq!(
        status_of(&compiled, ResourceKind::FloatingIp, "fip-away"),
        (StatusKind::Down, "its port is not on this node".to_owned())
    );
    assert_eq!(
        nat::gateway_neighbors(&state),
        vec![nat::GatewayNeighbor {
            nexthop: ip("203.0.113.1"),
            source: ip("203.0.113.10"),
            source_mac: mac("fa:16:3e:00:0e:01"),
        }]
    );
}
