use std::{collections::BTreeSet, net::IpAddr};

use dataplane_abi::{port_flags, PortInfo, RULE_LOOKUP_BITS};

use super::*;
use crate::core::{
    compile::{compile, Compiled, NodeView, SlotLimits, StatusKind},
    fixtures::*,
    model::*,
};

const NODE: &str = "node-a";
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const GRE: u8 = 47;

fn new_slots() -> Slots {
    Slots::new(SlotLimits {
        max_ports: 64,
        max_networks: 16,
        max_rules: 1024,
    })
}

fn run(state: &State, slots: &mut Slots) -> Compiled {
    // A port's device keeps its ifindex whatever else changes.
    let devices: BTreeMap<String, u32> = state
        .ports
        .values()
        .filter(|port| port.binding.host == NODE)
        .map(|port| {
            let mac = port.mac_address.0;
            (
                port.binding.interface_name.clone(),
                1000 + u32::from(u16::from_be_bytes([mac[4], mac[5]])),
            )
        })
        .collect();
    let compiled = compile(
        state,
        &NodeView {
            node_name: NODE,
            interfaces: &devices,
            peer_devices: &BTreeSet::new(),
            uplink: None,
        },
        slots,
    );
    assert_canonical(&compiled.tables);
    compiled
}

/// Every trie key is masked to its prefix and padded with zeros, so equal entries are
/// equal keys (the kernel diff relies on it).
fn assert_canonical(tables: &DatapathTables) {
    for ((len, key), class) in &tables.sg_remote4 {
        assert!(*class != 0 && key.policy_id != 0 && key._pad == [0; 3]);
        assert!((REMOTE_FIXED_BITS..=REMOTE_FIXED_BITS + 32).contains(len));
        assert_eq!(
            masked(&key.addr, len - REMOTE_FIXED_BITS),
            key.addr.to_vec()
        );
    }
    for ((len, key), class) in &tables.sg_remote6 {
        assert!(*class != 0 && key.policy_id != 0 && key._pad == [0; 3]);
        assert!((REMOTE_FIXED_BITS..=REMOTE_FIXED_BITS + 128).contains(len));
        assert_eq!(
            masked(&key.addr, len - REMOTE_FIXED_BITS),
            key.addr.to_vec()
        );
    }
    for ((len, key), slot) in &tables.sg_rules {
        assert!(*slot != 0 && key.class != 0 && key._pad == 0);
        match *len {
            RULE_CLASS_BITS => assert_eq!((key.protocol, key.port), (0, [0, 0])),
            len if (RULE_PROTOCOL_BITS..=RULE_LOOKUP_BITS).contains(&len) => {
                assert_eq!(
                    masked(&key.port, len - RULE_PROTOCOL_BITS),
                    key.port.to_vec()
                )
            }
            len => panic!("rule entry of length {len}"),
        }
    }
}

fn masked(bytes: &[u8], bits: u32) -> Vec<u8> {
    bytes
        .iter()
        .enumerate()
        .map(|(i, byte)| {
            let keep = bits.saturating_sub(8 * i as u32).min(8);
            if keep == 0 {
                0
            } else {
                byte & (0xffu8 << (8 - keep))
            }
        })
        .collect()
}

fn prefix_matches(entry: &[u8], addr: &[u8], bits: u32) -> bool {
    masked(entry, bits) == masked(addr, bits)
}

fn direction_code(direction: Direction) -> u8 {
    match direction {
        Direction::Ingress => sg_direction::INGRESS,
        Direction::Egress => sg_direction::EGRESS,
    }
}

/// `SG_REMOTE4`/`SG_REMOTE6` as the kernel's LPM trie answers a lookup.
fn remote_class(
    tables: &DatapathTables,
    policy_id: u32,
    direction: Direction,
    remote: IpAddr,
) -> Option<u32> {
    let direction = direction_code(direction);
    match remote {
        IpAddr::V4(addr) => tables
            .sg_remote4
            .iter()
            .filter(|((len, key), _)| {
                key.policy_id == policy_id
                    && key.direction == direction
                    && prefix_matches(&key.addr, &addr.octets(), len - REMOTE_FIXED_BITS)
            })
            .max_by_key(|((len, _), _)| *len)
            .map(|(_, class)| *class),
        IpAddr::V6(addr) => tables
            .sg_remote6
            .iter()
            .filter(|((len, key), _)| {
                key.policy_id == policy_id
                    && key.direction == direction
                    && prefix_matches(&key.addr, &addr.octets(), len - REMOTE_FIXED_BITS)
            })
            .max_by_key(|((len, _), _)| *len)
            .map(|(_, class)| *class),
    }
}

/// `SG_RULES` as the kernel's LPM trie answers a full-length lookup.
fn rule_slot(tables: &DatapathTables, class: u32, protocol: u8, port: [u8; 2]) -> Option<u32> {
    tables
        .sg_rules
        .iter()
        .filter(|((len, key), _)| {
            key.class == class
                && (*len <= RULE_CLASS_BITS || key.protocol == protocol)
                && (*len <= RULE_PROTOCOL_BITS
                    || prefix_matches(&key.port, &port, len - RULE_PROTOCOL_BITS))
        })
        .max_by_key(|((len, _), _)| *len)
        .map(|(_, slot)| *slot)
}

/// What the datapath decides for a packet of the port: the rule slot charged, or `None`
/// for a drop.
fn judge(
    info: &PortInfo,
    tables: &DatapathTables,
    direction: Direction,
    remote: &str,
    protocol: u8,
    port: [u8; 2],
) -> Option<u32> {
    assert!(info.flags & port_flags::POLICY != 0);
    let class = remote_class(tables, info.policy_id, direction, ip(remote))?;
    rule_slot(tables, class, protocol, port)
}

fn info<'c>(compiled: &'c Compiled, port_id: &str) -> &'c PortInfo {
    let port = compiled
        .ports
        .iter()
        .find(|port| port.port_id == port_id)
        .expect("programmed");
    &compiled.tables.ports[&port.ifindex]
}

fn local(id: &str, mac_address: &str, groups: &[&str], fixed: &[(&str, &str)]) -> Port {
    let mut p = bound(port(id, "n1", mac_address), NODE, &format!("tap-{id}"));
    p.security_group_ids = groups.iter().map(|g| (*g).to_owned()).collect();
    p.fixed_ips = fixed.iter().map(|(s, a)| fixed_ip(s, a)).collect();
    p
}

/// A port on another node, on network n2.
fn elsewhere(id: &str, mac_address: &str, groups: &[&str], fixed: &[(&str, &str)]) -> Port {
    let mut p = bound(port(id, "n2", mac_address), "node-b", &format!("tap-{id}"));
    p.security_group_ids = groups.iter().map(|g| (*g).to_owned()).collect();
    p.fixed_ips = fixed.iter().map(|(s, a)| fixed_ip(s, a)).collect();
    p
}

fn group(id: &str, rules: Vec<SecurityGroupRule>) -> SecurityGroup {
    SecurityGroup {
        rules,
        ..security_group(id)
    }
}

fn with(id: &str, edit: impl FnOnce(&mut SecurityGroupRule)) -> SecurityGroupRule {
    let mut r = rule(id);
    edit(&mut r);
    r
}

/// n1 (10.0.0.0/24 s1, 2001:db8:1::/64 s1v6) and n2 (10.0.2.0/24 s2, 2001:db8:2::/64
/// s2v6), and `resources`.
fn state_of(resources: Vec<Resource>) -> State {
    let mut all: Vec<Resource> = vec![
        network("n1").into(),
        subnet("s1", "n1", "10.0.0.0/24").into(),
        subnet("s1v6", "n1", "2001:db8:1::/64").into(),
        network("n2").into(),
        subnet("s2", "n2", "10.0.2.0/24").into(),
        subnet("s2v6", "n2", "2001:db8:2::/64").into(),
    ];
    all.extend(resources);
    State::replace(all).expect("valid test state")
}

fn slot(slots: &Slots, rule_id: &str) -> u32 {
    slots.rule_slot(rule_id).expect("rule has a slot")
}

fn class(slots: &Slots, rule_ids: &[&str]) -> u32 {
    let rule_slots: Vec<u32> = rule_ids.iter().map(|id| slot(slots, id)).collect();
    slots.class_id(&rule_slots).expect("class in use")
}

// ---------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------

#[test]
fn port_ranges_become_aligned_blocks() {
    assert_eq!(port_blocks(0, 65535), [(0, 0)]);
    assert_eq!(
        port_blocks(1, 65535),
        (0..16)
            .map(|k| (16 - k, 1u16 << k))
            .collect::<Vec<(u32, u16)>>()
    );
    assert_eq!(
        port_blocks(1000, 2000),
        [
            (13, 1000),
            (12, 1008),
            (7, 1024),
            (8, 1536),
            (9, 1792),
            (10, 1920),
            (12, 1984),
            (16, 2000)
        ]
    );
    assert_eq!(port_blocks(80, 80), [(16, 80)]);
    assert_eq!(port_blocks(65535, 65535), [(16, 65535)]);
    assert_eq!(port_blocks(0, 0), [(16, 0)]);
    assert_eq!(port_blocks(32768, 65535), [(1, 32768)]);
    assert_eq!(port_blocks(9, 8), []);

    // Any range: blocks are aligned, in order, touching, exactly covering, and as few
    // as can be (no two neighbours of one size could merge into an aligned block).
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..2000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let (a, b) = ((seed & 0xffff) as u32, ((seed >> 16) & 0xffff) as u32);
        let (min, max) = (a.min(b), a.max(b));
        let blocks = port_blocks(min, max);
        let mut next = min;
        for (i, (bits, start)) in blocks.iter().enumerate() {
            let size = 1u32 << (16 - bits);
            assert_eq!(u32::from(*start), next, "{min}-{max}: {blocks:?}");
            assert_eq!(u32::from(*start) % size, 0, "{min}-{max}: unaligned");
            next += size;
            if let Some((bits2, start2)) = blocks.get(i + 1) {
                let mergeable = bits == bits2 && u32::from(*start) % (2 * size) == 0;
                assert!(!mergeable, "{min}-{max}: {start} and {start2} merge");
            }
        }
        assert_eq!(next, max + 1, "{min}-{max}: {blocks:?}");
    }
}

#[test]
fn rule_matches_by_protocol_ports_and_icmp() {
    let of = |edit: fn(&mut SecurityGroupRule)| matches_of(&with("r", edit));
    let p = RULE_PROTOCOL_BITS;

    assert_eq!(
        of(|r| r.protocol = Protocol::Any),
        [(RULE_CLASS_BITS, 0, 0)]
    );
    assert_eq!(of(|_| {}), [(p, TCP, 0)]);
    assert_eq!(of(|r| r.protocol = Protocol::Number(GRE)), [(p, GRE, 0)]);
    assert_eq!(
        of(|r| {
            r.port_range_min = Some(80);
            r.port_range_max = Some(80)
        }),
        [(p + 16, TCP, 80)]
    );
    // Only a minimum: that one port.
    assert_eq!(
        of(|r| {
            r.protocol = Protocol::UDP;
            r.port_range_min = Some(53)
        }),
        [(p + 16, UDP, 53)]
    );
    // Only a maximum: no range (any port), as Neutron's missing minimum.
    assert_eq!(of(|r| r.port_range_max = Some(53)), [(p, TCP, 0)]);
    assert_eq!(
        of(|r| {
            r.port_range_min = Some(0);
            r.port_range_max = Some(65535)
        }),
        [(p, TCP, 0)]
    );
    assert_eq!(
        of(|r| {
            r.protocol = Protocol::SCTP;
            r.port_range_min = Some(1);
            r.port_range_max = Some(65535)
        })
        .len(),
        16
    );
    for protocol in [Protocol::DCCP, Protocol::UDPLITE] {
        let r = SecurityGroupRule {
            protocol,
            port_range_min: Some(1024),
            port_range_max: Some(2047),
            ..rule("r")
        };
        let Protocol::Number(number) = protocol else {
            unreachable!()
        };
        assert_eq!(matches_of(&r), [(p + 6, number, 1024)]);
    }

    // ICMP: type in the first byte, code in the second.
    assert_eq!(of(|r| r.protocol = Protocol::ICMP), [(p, ICMP, 0)]);
    assert_eq!(
        of(|r| {
            r.protocol = Protocol::ICMP;
            r.port_range_min = Some(8)
        }),
        [(p + 8, ICMP, 0x0800)]
    );
    assert_eq!(
        of(|r| {
            r.protocol = Protocol::ICMP;
            r.port_range_min = Some(3);
            r.port_range_max = Some(4)
        }),
        [(p + 16, ICMP, 0x0304)]
    );
    // `icmp` in an IPv6 rule is ICMPv6; `ipv6-icmp` too.
    assert_eq!(
        of(|r| {
            r.ethertype = EtherType::Ipv6;
            r.protocol = Protocol::ICMP;
            r.port_range_min = Some(128)
        }),
        [(p + 8, 58, 0x8000)]
    );
    assert_eq!(
        of(|r| {
            r.ethertype = EtherType::Ipv6;
            r.protocol = Protocol::IPV6_ICMP;
            r.port_range_min = Some(1);
            r.port_range_max = Some(4)
        }),
        [(p + 16, 58, 0x0104)]
    );
    assert_eq!(
        of(|r| {
            r.ethertype = EtherType::Ipv6;
            r.protocol = Protocol::ICMP
        }),
        [(p, 58, 0)]
    );
}

#[test]
fn rule_entries_through_the_compiler() {
    let web = group(
        "web",
        vec![
            with("a-any", |r| {
                r.protocol = Protocol::Any;
                r.direction = Direction::Egress
            }),
            with("b-range", |r| {
                r.port_range_min = Some(1000);
                r.port_range_max = Some(2000)
            }),
            with("c-ping", |r| {
                r.protocol = Protocol::ICMP;
                r.port_range_min = Some(8);
                r.port_range_max = Some(0)
            }),
            with("d-icmp6", |r| {
                r.ethertype = EtherType::Ipv6;
                r.protocol = Protocol::ICMP;
                r.port_range_min = Some(135)
            }),
        ],
    );
    let state = state_of(vec![
        web.into(),
        local("p", "fa:16:3e:00:00:01", &["web"], &[("s1", "10.0.0.5")]).into(),
    ]);
    let mut slots = new_slots();
    let compiled = run(&state, &mut slots);
    let tables = &compiled.tables;
    let rule_key = |class, protocol, port: u16| RuleKey {
        class,
        protocol,
        port: port.to_be_bytes(),
        _pad: 0,
    };

    let p = RULE_PROTOCOL_BITS;
    // The IPv4 ingress rules share their remote (/0), so one class holds both.
    let (any, in4, icmp6) = (
        class(&slots, &["a-any"]),
        class(&slots, &["b-range", "c-ping"]),
        class(&slots, &["d-icmp6"]),
    );
    let mut expected = BTreeMap::from([
        (
            (RULE_CLASS_BITS, rule_key(any, 0, 0)),
            slot(&slots, "a-any"),
        ),
        (
            (p + 16, rule_key(in4, ICMP, 0x0800)),
            slot(&slots, "c-ping"),
        ),
        (
            (p + 8, rule_key(icmp6, 58, 0x8700)),
            slot(&slots, "d-icmp6"),
        ),
    ]);
    for (bits, start) in port_blocks(1000, 2000) {
        expected.insert(
            (p + bits, rule_key(in4, TCP, start)),
            slot(&slots, "b-range"),
        );
    }
    assert_eq!(tables.sg_rules, expected);
    assert_eq!(
        compiled.rules,
        BTreeMap::from([
            ("a-any".to_owned(), 1),
            ("b-range".to_owned(), 2),
            ("c-ping".to_owned(), 3),
            ("d-icmp6".to_owned(), 4),
        ])
    );

    // Each rule is its lookup's only one, with no remote: /0 of its family and direction.
    let id = info(&compiled, "p").policy_id;
    let remote4 = |direction, class| {
        (
            (
                REMOTE_FIXED_BITS,
                RemoteKey4 {
                    policy_id: id,
                    direction,
                    _pad: [0; 3],
                    addr: [0; 4],
                },
            ),
            class,
        )
    };
    assert_eq!(
        tables.sg_remote4,
        BTreeMap::from([
            remote4(sg_direction::EGRESS, any),
            remote4(sg_direction::INGRESS, in4),
        ])
    );
    assert_eq!(
        tables.sg_remote6,
        BTreeMap::from([(
            (
                REMOTE_FIXED_BITS,
                RemoteKey6 {
                    policy_id: id,
                    direction: sg_direction::INGRESS,
                    _pad: [0; 3],
                    addr: [0; 16],
                }
            ),
            icmp6
        )])
    );

    let p_info = info(&compiled, "p");
    let judge = |direction, remote, protocol, port| {
        judge(p_info, tables, direction, remote, protocol, port)
    };
    assert_eq!(
        judge(Direction::Ingress, "192.0.2.1", TCP, [0x03, 0xe8]),
        Some(2)
    ); // 1000
    assert_eq!(
        judge(Direction::Ingress, "192.0.2.1", TCP, [0x07, 0xd0]),
        Some(2)
    ); // 2000
    assert_eq!(
        judge(Direction::Ingress, "192.0.2.1", TCP, [0x07, 0xd1]),
        None
    ); // 2001
    assert_eq!(
        judge(Direction::Ingress, "192.0.2.1", TCP, [0x03, 0xe7]),
        None
    ); // 999
    assert_eq!(
        judge(Direction::Ingress, "192.0.2.1", UDP, [0x03, 0xe8]),
        None
    );
    assert_eq!(
        judge(Direction::Ingress, "192.0.2.1", ICMP, [8, 0]),
        Some(3)
    );
    assert_eq!(judge(Direction::Ingress, "192.0.2.1", ICMP, [8, 1]), None);
    assert_eq!(judge(Direction::Ingress, "192.0.2.1", ICMP, [0, 0]), None);
    assert_eq!(
        judge(Direction::Ingress, "2001:db8::1", 58, [135, 0]),
        Some(4)
    );
    assert_eq!(
        judge(Direction::Ingress, "2001:db8::1", 58, [135, 9]),
        Some(4)
    );
    assert_eq!(
        judge(Direction::Ingress, "2001:db8::1", ICMP, [135, 0]),
        None
    );
    assert_eq!(judge(Direction::Egress, "2001:db8::1", TCP, [0, 80]), None);
    assert_eq!(
        judge(Direction::Egress, "198.51.100.7", GRE, [0, 0]),
        Some(1)
    );
    assert_eq!(
        judge(Direction::Egress, "198.51.100.7", TCP, [0xff, 0xff]),
        Some(1)
    );
}

// ---------------------------------------------------------------------------------
// Classes
// ---------------------------------------------------------------------------------

#[test]
fn nested_prefixes_get_the_rules_of_every_prefix_around_them() {
    let g = group(
        "g",
        vec![
            with("r-all", |_| {}),
            with("r-10", |r| {
                r.protocol = Protocol::UDP;
                r.remote_ip_prefix = Some(net("10.0.0.0/8"))
            }),
            // Held unmasked: the compiler masks.
            with("r-10-1", |r| {
                r.protocol = Protocol::ICMP;
                r.remote_ip_prefix = Some(net("10.1.77.1/16"))
            }),
            with("r-host", |r| {
                r.protocol = Protocol::Any;
                r.remote_ip_prefix = Some(net("10.1.2.3/32"))
            }),
            // Beside the others, not inside them.
            with("r-172", |r| {
                r.protocol = Protocol::Number(GRE);
                r.remote_ip_prefix = Some(net("172.16.0.0/12"))
            }),
            // The same prefix as r-10: one entry for both.
            with("r-10-again", |r| {
                r.protocol = Protocol::SCTP;
                r.remote_ip_prefix = Some(net("10.0.0.0/8"))
            }),
        ],
    );
    let state = state_of(vec![
        g.into(),
        local("p", "fa:16:3e:00:00:01", &["g"], &[("s1", "10.0.0.5")]).into(),
    ]);
    let mut slots = new_slots();
    let compiled = run(&state, &mut slots);
    let tables = &compiled.tables;
    let id = info(&compiled, "p").policy_id;

    let entry = |len: u32, addr: &str, rules: &[&str]| {
        let IpAddr::V4(addr) = ip(addr) else {
            unreachable!()
        };
        (
            (
                REMOTE_FIXED_BITS + len,
                RemoteKey4 {
                    policy_id: id,
                    direction: sg_direction::INGRESS,
                    _pad: [0; 3],
                    addr: addr.octets(),
                },
            ),
            class(&slots, rules),
        )
    };
    assert_eq!(
        tables.sg_remote4,
        BTreeMap::from([
            entry(0, "0.0.0.0", &["r-all"]),
            entry(8, "10.0.0.0", &["r-all", "r-10", "r-10-again"]),
            entry(12, "172.16.0.0", &["r-all", "r-172"]),
            entry(16, "10.1.0.0", &["r-all", "r-10", "r-10-again", "r-10-1"]),
            entry(
                32,
                "10.1.2.3",
                &["r-all", "r-10", "r-10-again", "r-10-1", "r-host"]
            ),
        ])
    );

    let p = info(&compiled, "p");
    let allowed = |remote, protocol| {
        judge(p, tables, Direction::Ingress, remote, protocol, [0, 80]).is_some()
    };
    let protocols = [TCP, UDP, ICMP, GRE, 132, 50];
    let table = |remote| -> Vec<bool> { protocols.iter().map(|p| allowed(remote, *p)).collect() };
    // Longest match: each address gets exactly the rules whose prefix contains it.
    assert_eq!(
        table("192.0.2.1"),
        [true, false, false, false, false, false]
    );
    assert_eq!(table("10.200.0.1"), [true, true, false, false, true, false]);
    assert_eq!(table("10.1.200.1"), [true, true, true, false, true, false]);
    assert_eq!(table("10.1.2.3"), [true, true, true, true, true, true]);
    assert_eq!(table("10.1.2.4"), [true, true, true, false, true, false]);
    assert_eq!(
        table("172.31.255.255"),
        [true, false, false, true, false, false]
    );
    assert_eq!(
        table("172.32.0.0"),
        [true, false, false, false, false, false]
    );
    // Rules of the other direction and family add nothing.
    assert!(tables.sg_remote6.is_empty());
}

#[test]
fn remote_groups_follow_their_members() {
    let web = group(
        "web",
        vec![with("from-db", |r| {
            r.remote_group_id = Some("db".to_owned())
        })],
    );
    let db = group("db", Vec::new());
    let p = local("p", "fa:16:3e:00:00:01", &["web"], &[("s1", "10.0.0.5")]);
    // Members anywhere: another node, another network, several addresses.
    let b = elsewhere(
        "b",
        "fa:16:3e:00:00:0b",
        &["db"],
        &[("s2", "10.0.2.11"), ("s2v6", "2001:db8:2::b")],
    );
    let c = elsewhere(
        "c",
        "fa:16:3e:00:00:0c",
        &["db", "web"],
        &[("s2", "10.0.2.12")],
    );
    let d = local("d", "fa:16:3e:00:00:0d", &["db"], &[("s1", "10.0.0.13")]);
    let state = state_of(vec![
        web.clone().into(),
        db.into(),
        p.into(),
        b.clone().into(),
        c.clone().into(),
    ]);
    let mut slots = new_slots();
    let first = run(&state, &mut slots);
    let id = info(&first, "p").policy_id;
    let revision = info(&first, "p").policy_revision;
    let remotes = |compiled: &Compiled| -> Vec<(u32, String)> {
        compiled
            .tables
            .sg_remote4
            .keys()
            .filter(|(_, key)| key.policy_id == id)
            .map(|(len, key)| {
                (
                    len - REMOTE_FIXED_BITS,
                    std::net::Ipv4Addr::from(key.addr).to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        remotes(&first),
        [(32, "10.0.2.11".to_owned()), (32, "10.0.2.12".to_owned())]
    );
    // The IPv6 address of b is not a remote of IPv4 rules.
    assert!(first
        .tables
        .sg_remote6
        .keys()
        .all(|(_, key)| key.policy_id != id));
    let judge_p = |compiled: &Compiled, remote| {
        judge(
            info(compiled, "p"),
            &compiled.tables,
            Direction::Ingress,
            remote,
            TCP,
            [0, 22],
        )
    };
    assert_eq!(judge_p(&first, "10.0.2.11"), Some(slot(&slots, "from-db")));
    assert_eq!(judge_p(&first, "10.0.2.13"), None);

    // A port joins the group: its address is a remote at once.
    let joined = state.apply(&[upsert(d.clone())]).unwrap();
    let second = run(&joined, &mut slots);
    assert_eq!(
        remotes(&second),
        [
            (32, "10.0.0.13".to_owned()),
            (32, "10.0.2.11".to_owned()),
            (32, "10.0.2.12".to_owned())
        ]
    );
    assert_eq!(judge_p(&second, "10.0.0.13"), Some(slot(&slots, "from-db")));
    assert_eq!(info(&second, "p").policy_id, id);
    let revision2 = info(&second, "p").policy_revision;
    assert_ne!(revision2, revision);

    // A member leaves the group.
    let left = joined
        .apply(&[upsert(Port {
            security_group_ids: vec!["web".to_owned()],
            revision_number: 2,
            ..c.clone()
        })])
        .unwrap();
    let third = run(&left, &mut slots);
    assert_eq!(
        remotes(&third),
        [(32, "10.0.0.13".to_owned()), (32, "10.0.2.11".to_owned())]
    );
    assert_eq!(judge_p(&third, "10.0.2.12"), None);
    let revision3 = info(&third, "p").policy_revision;
    assert!(revision3 != revision2 && revision3 != revision);

    // A member's fixed IP changes.
    let moved = left
        .apply(&[upsert(Port {
            fixed_ips: vec![
                fixed_ip("s2", "10.0.2.99"),
                fixed_ip("s2v6", "2001:db8:2::b"),
            ],
            revision_number: 2,
            ..b.clone()
        })])
        .unwrap();
    let fourth = run(&moved, &mut slots);
    assert_eq!(
        remotes(&fourth),
        [(32, "10.0.0.13".to_owned()), (32, "10.0.2.99".to_owned())]
    );
    assert_eq!(judge_p(&fourth, "10.0.2.11"), None);
    assert_eq!(judge_p(&fourth, "10.0.2.99"), Some(slot(&slots, "from-db")));
    assert_ne!(info(&fourth, "p").policy_revision, revision3);

    // Back to the first state: the same tables and revision again.
    let back = run(&state, &mut slots);
    assert_eq!(back.tables, first.tables);
    assert_eq!(info(&back, "p").policy_revision, revision);

    // A group with no members: its rules allow nothing, and take no entry.
    let empty = state
        .apply(&[
            delete(ResourceKind::Port, "b"),
            delete(ResourceKind::Port, "c"),
        ])
        .unwrap();
    let none = run(&empty, &mut slots);
    assert!(none.tables.sg_remote4.is_empty() && none.tables.sg_rules.is_empty());
    assert_eq!(judge_p(&none, "10.0.2.11"), None);
    assert!(none.rules.contains_key("from-db"));
}

#[test]
fn allowed_address_pairs_are_members_too() {
    let web = group(
        "web",
        vec![
            with("from-db", |r| r.remote_group_id = Some("db".to_owned())),
            with("from-db6", |r| {
                r.ethertype = EtherType::Ipv6;
                r.remote_group_id = Some("db".to_owned())
            }),
            with("from-net", |r| {
                r.protocol = Protocol::UDP;
                r.remote_ip_prefix = Some(net("10.9.0.0/16"))
            }),
        ],
    );
    let mut member = elsewhere("m", "fa:16:3e:00:00:0b", &["db"], &[("s2", "10.0.2.11")]);
    member.allowed_address_pairs = vec![
        // Unmasked on purpose.
        AllowedAddressPair {
            ip_address: net("10.9.1.77/24"),
            mac_address: None,
        },
        pair("10.9.1.5", Some("02:00:00:00:00:01")),
        pair("2001:db8:99::/48", None),
        // The member's own address again.
        pair("10.0.2.11", None),
    ];
    let state = state_of(vec![
        web.into(),
        group("db", Vec::new()).into(),
        local("p", "fa:16:3e:00:00:01", &["web"], &[("s1", "10.0.0.5")]).into(),
        member.into(),
    ]);
    let mut slots = new_slots();
    let compiled = run(&state, &mut slots);
    let id = info(&compiled, "p").policy_id;
    let v4: Vec<(u32, String, u32)> = compiled
        .tables
        .sg_remote4
        .iter()
        .map(|((len, key), class)| {
            assert_eq!(key.policy_id, id);
            (
                len - REMOTE_FIXED_BITS,
                std::net::Ipv4Addr::from(key.addr).to_string(),
                *class,
            )
        })
        .collect();
    let group_class = class(&slots, &["from-db"]);
    let both = class(&slots, &["from-db", "from-net"]);
    assert_eq!(
        v4,
        [
            (16, "10.9.0.0".to_owned(), class(&slots, &["from-net"])),
            (24, "10.9.1.0".to_owned(), both),
            (32, "10.0.2.11".to_owned(), group_class),
            (32, "10.9.1.5".to_owned(), both),
        ]
    );
    let v6: Vec<(u32, String)> = compiled
        .tables
        .sg_remote6
        .keys()
        .map(|(len, key)| {
            (
                len - REMOTE_FIXED_BITS,
                std::net::Ipv6Addr::from(key.addr).to_string(),
            )
        })
        .collect();
    assert_eq!(v6, [(48, "2001:db8:99::".to_owned())]);

    let p = info(&compiled, "p");
    let allowed = |remote, protocol| {
        judge(
            p,
            &compiled.tables,
            Direction::Ingress,
            remote,
            protocol,
            [0, 53],
        )
    };
    assert_eq!(allowed("10.9.1.200", TCP), Some(slot(&slots, "from-db")));
    assert_eq!(allowed("10.9.1.200", UDP), Some(slot(&slots, "from-net")));
    assert_eq!(allowed("10.9.2.1", TCP), None);
    assert_eq!(allowed("10.9.2.1", UDP), Some(slot(&slots, "from-net")));
    assert_eq!(
        allowed("2001:db8:99:1::1", TCP),
        Some(slot(&slots, "from-db6"))
    );
    assert_eq!(allowed("2001:db8:98::1", TCP), None);
}

#[test]
fn policies_and_classes_are_interned() {
    let a = group(
        "a",
        vec![
            with("a1", |r| r.remote_ip_prefix = Some(net("10.0.0.0/8"))),
            with("a2", |r| r.protocol = Protocol::UDP),
        ],
    );
    let b = group("b", vec![with("b1", |r| r.protocol = Protocol::ICMP)]);
    let none = group("none", Vec::new());
    let state = state_of(vec![
        a.into(),
        b.into(),
        none.into(),
        local("p1", "fa:16:3e:00:00:01", &["a", "b"], &[]).into(),
        // Same groups, other order, one twice: the same policy.
        local("p2", "fa:16:3e:00:00:02", &["b", "a", "b"], &[]).into(),
        local("p3", "fa:16:3e:00:00:03", &["a"], &[]).into(),
        // Other groups, the same rules: another policy, the same classes.
        local("p4", "fa:16:3e:00:00:04", &["a", "none"], &[]).into(),
        local("p5", "fa:16:3e:00:00:05", &[], &[]).into(),
    ]);
    let mut slots = new_slots();
    let compiled = run(&state, &mut slots);
    let policy = |id| info(&compiled, id).policy_id;
    let revision = |id| info(&compiled, id).policy_revision;

    assert_eq!(policy("p1"), policy("p2"));
    assert_eq!(revision("p1"), revision("p2"));
    let ids: BTreeSet<u32> = ["p1", "p3", "p4", "p5"].into_iter().map(policy).collect();
    assert_eq!(ids.len(), 4);
    assert!(!ids.contains(&0));
    assert_eq!(slots.policy_id(&["b", "a"]), Some(policy("p1")));
    assert_eq!(slots.policy_id(&["none", "a"]), Some(policy("p4")));
    assert_eq!(slots.policy_id(&[]), Some(policy("p5")));
    assert_eq!(slots.policy_id(&["b"]), None);
    // p3 and p4 differ in groups only: the same classes, so the same revision.
    assert_eq!(revision("p3"), revision("p4"));
    assert_ne!(revision("p1"), revision("p3"));

    let remote_classes = |port| -> Vec<u32> {
        let id = policy(port);
        compiled
            .tables
            .sg_remote4
            .iter()
            .filter(|((_, key), _)| key.policy_id == id)
            .map(|(_, class)| *class)
            .collect()
    };
    let (a_wide, a_narrow) = (class(&slots, &["a2"]), class(&slots, &["a1", "a2"]));
    assert_eq!(remote_classes("p3"), [a_wide, a_narrow]);
    assert_eq!(remote_classes("p4"), [a_wide, a_narrow]);
    let (all_wide, all_narrow) = (
        class(&slots, &["a2", "b1"]),
        class(&slots, &["a1", "a2", "b1"]),
    );
    assert_eq!(remote_classes("p1"), [all_wide, all_narrow]);
    assert!(remote_classes("p5").is_empty());
    // Four classes, each written once.
    let classes: BTreeSet<u32> = compiled
        .tables
        .sg_rules
        .keys()
        .map(|(_, k)| k.class)
        .collect();
    assert_eq!(
        classes,
        BTreeSet::from([a_wide, a_narrow, all_wide, all_narrow])
    );
    assert_eq!(compiled.tables.sg_rules.len(), 1 + 2 + 2 + 3);
}

#[test]
fn an_entry_inside_another_is_charged_to_the_lowest_slot() {
    // Slots go in id order: "a-web" 1, "b-any" 2, "c-wide" 3, "d-same" 4.
    let g = group(
        "g",
        vec![
            with("b-any", |_| {}),
            with("a-web", |r| {
                r.port_range_min = Some(80);
                r.port_range_max = Some(80)
            }),
            // Inside b-any with a higher slot: left out.
            with("c-wide", |r| {
                r.port_range_min = Some(1024);
                r.port_range_max = Some(2047)
            }),
            // The same key as a-web: the lower slot stays.
            with("d-same", |r| r.port_range_min = Some(80)),
            with("e-gre", |r| r.protocol = Protocol::Number(GRE)),
        ],
    );
    let state = state_of(vec![
        g.into(),
        local("p", "fa:16:3e:00:00:01", &["g"], &[]).into(),
    ]);
    let mut slots = new_slots();
    let compiled = run(&state, &mut slots);
    let class = class(&slots, &["a-web", "b-any", "c-wide", "d-same", "e-gre"]);
    let entries: Vec<(u32, u8, [u8; 2], u32)> = compiled
        .tables
        .sg_rules
        .iter()
        .map(|((len, key), slot)| {
            assert_eq!(key.class, class);
            (*len, key.protocol, key.port, *slot)
        })
        .collect();
    assert_eq!(
        entries,
        [
            (RULE_PROTOCOL_BITS, TCP, [0, 0], 2),
            (RULE_PROTOCOL_BITS, GRE, [0, 0], 5),
            (RULE_PROTOCOL_BITS + 16, TCP, [0, 80], 1),
        ]
    );
    let p = info(&compiled, "p");
    let charged = |port: u16| {
        judge(
            p,
            &compiled.tables,
            Direction::Ingress,
            "192.0.2.1",
            TCP,
            port.to_be_bytes(),
        )
    };
    assert_eq!(charged(80), Some(1));
    assert_eq!(charged(1500), Some(2));
    assert_eq!(charged(81), Some(2));
}

// ---------------------------------------------------------------------------------
// Ports, flags, slots, revisions
// ---------------------------------------------------------------------------------

#[test]
fn flags_follow_port_security_and_statefulness() {
    let stateless = SecurityGroup {
        stateful: false,
        ..group("stateless", vec![rule("r1")])
    };
    let stateful = group("stateful", vec![rule("r2")]);
    let open = Port {
        port_security_enabled: Some(false),
        ..local("open", "fa:16:3e:00:00:01", &[], &[])
    };
    let state = state_of(vec![
        stateless.into(),
        stateful.into(),
        open.into(),
        local("full", "fa:16:3e:00:00:02", &["stateful"], &[]).into(),
        local("loose", "fa:16:3e:00:00:03", &["stateless"], &[]).into(),
        local("bare", "fa:16:3e:00:00:04", &[], &[]).into(),
    ]);
    let mut slots = new_slots();
    let compiled = run(&state, &mut slots);
    let secured = port_flags::ADMIN_UP | port_flags::PORT_SECURITY | port_flags::POLICY;

    let open = info(&compiled, "open");
    assert_eq!(
        (open.flags, open.policy_id, open.policy_revision),
        (port_flags::ADMIN_UP, 0, 0)
    );
    assert_eq!(
        info(&compiled, "full").flags,
        secured | port_flags::STATEFUL
    );
    assert_eq!(info(&compiled, "loose").flags, secured);
    // Port security and no groups: a policy with no rules, so all IP is dropped.
    let bare = info(&compiled, "bare");
    assert_eq!(bare.flags, secured);
    assert!(bare.policy_id != 0 && bare.policy_revision != 0);
    assert!(compiled
        .tables
        .sg_remote4
        .keys()
        .all(|(_, key)| key.policy_id != bare.policy_id));
    assert!(compiled
        .tables
        .sg_remote6
        .keys()
        .all(|(_, key)| key.policy_id != bare.policy_id));
    assert_eq!(
        judge(
            bare,
            &compiled.tables,
            Direction::Ingress,
            "10.0.0.1",
            TCP,
            [0, 80]
        ),
        None
    );
    for id in ["stateful", "stateless"] {
        assert_eq!(
            compiled.statuses[&ResourceRef {
                kind: ResourceKind::SecurityGroup,
                id: id.to_owned(),
            }]
                .status,
            StatusKind::Active
        );
    }
}

#[test]
fn only_the_policies_of_programmed_ports_are_compiled() {
    let state = state_of(vec![
        group("mine", vec![rule("m1")]).into(),
        group("theirs", vec![rule("t1"), rule("t2")]).into(),
        local("p", "fa:16:3e:00:00:01", &["mine"], &[]).into(),
        elsewhere("q", "fa:16:3e:00:00:02", &["theirs"], &[]).into(),
        // Local, but its device is missing.
        Port {
            binding: PortBinding {
                host: NODE.to_owned(),
                interface_name: "tap-absent".to_owned(),
            },
            ..elsewhere("r", "fa:16:3e:00:00:03", &["theirs"], &[])
        }
        .into(),
    ]);
    let mut slots = new_slots();
    let devices = BTreeMap::from([("tap-p".to_owned(), 7)]);
    let compiled = compile(
        &state,
        &NodeView {
            node_name: NODE,
            interfaces: &devices,
            peer_devices: &BTreeSet::new(),
            uplink: None,
        },
        &mut slots,
    );
    assert_eq!(compiled.rules, BTreeMap::from([("m1".to_owned(), 1)]));
    assert_eq!(slots.rule_slot("t1"), None);
    assert_eq!(compiled.tables.sg_remote4.len(), 1);
    assert_eq!(compiled.tables.sg_rules.len(), 1);
    assert_eq!(slots.policy_id(&["theirs"]), None);
}

#[test]
fn rule_slots_are_stable_and_reused() {
    let g = |rules: &[&str]| group("g", rules.iter().map(|id| rule(id)).collect());
    let p = local("p", "fa:16:3e:00:00:01", &["g"], &[]);
    let mut slots = new_slots();
    let state = state_of(vec![g(&["r2", "r3"]).into(), p.clone().into()]);
    let first = run(&state, &mut slots);
    assert_eq!(
        first.rules,
        BTreeMap::from([("r2".to_owned(), 1), ("r3".to_owned(), 2)])
    );
    assert_eq!(
        run(&state, &mut slots),
        first,
        "recompiling changes nothing"
    );

    // A newcomer sorting first moves nobody.
    let state = state_of(vec![g(&["r1", "r2", "r3"]).into(), p.clone().into()]);
    let second = run(&state, &mut slots);
    assert_eq!(
        second.rules,
        BTreeMap::from([
            ("r1".to_owned(), 3),
            ("r2".to_owned(), 1),
            ("r3".to_owned(), 2)
        ])
    );
    // r2 goes, r4 takes its slot; r3 changes but keeps its own.
    let mut changed = g(&["r1", "r3", "r4"]);
    changed.rules[1].protocol = Protocol::UDP;
    let state = state_of(vec![changed.into(), p.clone().into()]);
    let third = run(&state, &mut slots);
    assert_eq!(
        third.rules,
        BTreeMap::from([
            ("r1".to_owned(), 3),
            ("r3".to_owned(), 2),
            ("r4".to_owned(), 1)
        ])
    );
    // No programmed port uses the group: its rules give their slots up.
    let state = state_of(vec![g(&["r1"]).into()]);
    let fourth = run(&state, &mut slots);
    assert!(fourth.rules.is_empty());
    assert_eq!(slots.rule_slot("r1"), None);
}

#[test]
fn rules_beyond_the_slots_leave_the_port_in_error_allowing_less() {
    let mut slots = Slots::new(SlotLimits {
        max_ports: 8,
        max_networks: 8,
        // Slots 1 and 2.
        max_rules: 3,
    });
    let g = group(
        "g",
        vec![
            with("r1", |r| r.port_range_min = Some(1)),
            with("r2", |r| r.port_range_min = Some(2)),
            with("r3", |r| r.port_range_min = Some(3)),
        ],
    );
    let small = group("small", vec![with("s1", |r| r.protocol = Protocol::UDP)]);
    let state = state_of(vec![
        g.into(),
        small.into(),
        local("p", "fa:16:3e:00:00:01", &["g"], &[]).into(),
        local("q", "fa:16:3e:00:00:02", &["small"], &[]).into(),
    ]);
    let compiled = run(&state, &mut slots);
    assert_eq!(
        compiled.rules,
        BTreeMap::from([("r1".to_owned(), 1), ("r2".to_owned(), 2)])
    );
    let status = |id: &str| {
        compiled.statuses[&ResourceRef {
            kind: ResourceKind::Port,
            id: id.to_owned(),
        }]
            .clone()
    };
    let p = status("p");
    assert_eq!(p.status, StatusKind::Error);
    assert!(
        p.reason.contains("rule slot") && p.reason.contains("r3"),
        "{}",
        p.reason
    );
    // q's rule found no slot either; both stay programmed, allowing only what fits.
    assert_eq!(status("q").status, StatusKind::Error);
    let p = info(&compiled, "p");
    let judge = |port: u16| {
        judge(
            p,
            &compiled.tables,
            Direction::Ingress,
            "192.0.2.1",
            TCP,
            port.to_be_bytes(),
        )
    };
    assert_eq!((judge(1), judge(2), judge(3)), (Some(1), Some(2), None));
    assert!(info(&compiled, "q").flags & port_flags::POLICY != 0);
}

#[test]
fn revisions_are_stable_and_follow_the_content() {
    let base = |rules: Vec<SecurityGroupRule>, stateful: bool| {
        state_of(vec![
            SecurityGroup {
                stateful,
                ..group("g", rules)
            }
            .into(),
            local("p", "fa:16:3e:00:00:01", &["g"], &[]).into(),
        ])
    };
    let revision_of = |state: &State, slots: &mut Slots| {
        let compiled = run(state, slots);
        let revision = info(&compiled, "p").policy_revision;
        assert_ne!(revision, 0);
        revision
    };
    let mut slots = new_slots();
    let one = base(vec![rule("r1")], true);
    let first = revision_of(&one, &mut slots);
    assert_eq!(revision_of(&one, &mut slots), first);
    // The same content compiled from scratch.
    assert_eq!(revision_of(&one, &mut new_slots()), first);

    let mut seen = BTreeSet::from([first]);
    let variants = [
        base(vec![with("r1", |r| r.protocol = Protocol::UDP)], true),
        base(vec![with("r1", |r| r.port_range_min = Some(22))], true),
        base(vec![with("r1", |r| r.direction = Direction::Egress)], true),
        base(vec![with("r1", |r| r.ethertype = EtherType::Ipv6)], true),
        base(
            vec![with("r1", |r| r.remote_ip_prefix = Some(net("10.0.0.0/8")))],
            true,
        ),
        base(
            vec![rule("r1"), with("r2", |r| r.protocol = Protocol::UDP)],
            true,
        ),
        base(vec![rule("r1")], false),
        base(Vec::new(), true),
    ];
    for (i, variant) in variants.iter().enumerate() {
        let revision = revision_of(variant, &mut slots);
        assert!(seen.insert(revision), "variant {i} repeats a revision");
    }
    assert_eq!(revision_of(&one, &mut slots), first);
}

// ---------------------------------------------------------------------------------
// The tables against the rules themselves
// ---------------------------------------------------------------------------------

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// Whether `rule` allows the packet, by the Networking API's words.
fn rule_allows(
    state: &State,
    rule: &SecurityGroupRule,
    direction: Direction,
    remote: IpAddr,
    protocol: u8,
    port: [u8; 2],
) -> bool {
    if rule.direction != direction || rule.ethertype.ip_version() != IpVersion::of(&remote) {
        return false;
    }
    let remote_ok = match (&rule.remote_ip_prefix, &rule.remote_group_id) {
        (Some(prefix), _) => prefix.contains(&remote),
        (None, Some(group)) => state
            .ports
            .values()
            .filter(|member| member.security_group_ids.contains(group))
            .any(|member| {
                member.fixed_ips.iter().any(|f| f.ip_address == remote)
                    || member
                        .allowed_address_pairs
                        .iter()
                        .any(|pair| pair.ip_address.contains(&remote))
            }),
        (None, None) => true,
    };
    let number = match rule.protocol {
        Protocol::Any => return remote_ok,
        Protocol::Number(1) if rule.ethertype == EtherType::Ipv6 => 58,
        Protocol::Number(number) => number,
    };
    let detail_ok = if number != protocol {
        false
    } else if Protocol::Number(number).has_ports() {
        match rule.port_range_min {
            None => true,
            Some(min) => {
                let max = rule.port_range_max.unwrap_or(min);
                (min..=max).contains(&u32::from(u16::from_be_bytes(port)))
            }
        }
    } else if Protocol::Number(number).is_icmp() {
        match (rule.port_range_min, rule.port_range_max) {
            (None, _) => true,
            (Some(kind), None) => u32::from(port[0]) == kind,
            (Some(kind), Some(code)) => u32::from(port[0]) == kind && u32::from(port[1]) == code,
        }
    } else {
        true
    };
    detail_ok && remote_ok
}

#[test]
fn lookups_agree_with_the_rules_on_random_policies() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let prefixes4 = [
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.0.0.0/16",
        "10.0.2.0/24",
        "10.0.2.128/25",
        "10.0.2.7/32",
        "192.0.2.0/24",
    ];
    let prefixes6 = [
        "::/0",
        "2001:db8::/32",
        "2001:db8:2::/64",
        "2001:db8:2::7/128",
    ];
    let groups = ["g0", "g1", "g2", "g3"];
    let protocols = [
        Protocol::Any,
        Protocol::TCP,
        Protocol::UDP,
        Protocol::ICMP,
        Protocol::Number(GRE),
    ];
    let addresses4 = [
        "10.0.2.7",
        "10.0.2.8",
        "10.0.2.130",
        "10.0.2.200",
        "10.0.0.9",
        "10.1.0.1",
        "192.0.2.50",
        "198.51.100.1",
        "10.0.0.21",
        "10.0.0.22",
        "10.0.2.21",
    ];
    let addresses6 = [
        "2001:db8:2::7",
        "2001:db8:2::8",
        "2001:db8:1::21",
        "2001:db8:2::21",
        "2001:db8:ffff::1",
        "2001:db9::1",
    ];
    let ports: [u16; 9] = [0, 22, 53, 80, 443, 1000, 1023, 1024, 65535];

    for round in 0..30 {
        let mut resources: Vec<Resource> = Vec::new();
        for (g, group_id) in groups.iter().enumerate() {
            let rules = (0..rng.below(7))
                .map(|r| {
                    let mut rule = rule(&format!("{group_id}-r{r}"));
                    rule.direction = rng.pick(&[Direction::Ingress, Direction::Egress]);
                    rule.ethertype = rng.pick(&[EtherType::Ipv4, EtherType::Ipv6]);
                    rule.protocol = rng.pick(&protocols);
                    if rule.protocol.has_ports() && rng.below(3) > 0 {
                        let (a, b) = (rng.pick(&ports), rng.pick(&ports));
                        rule.port_range_min = Some(u32::from(a.min(b)));
                        rule.port_range_max =
                            Some(u32::from(a.max(b))).filter(|_| rng.below(4) > 0);
                    }
                    if rule.protocol.is_icmp() && rng.below(2) > 0 {
                        rule.port_range_min = Some(rng.pick(&[0, 3, 8]));
                        rule.port_range_max = rng.pick(&[None, Some(0), Some(1)]);
                    }
                    match rng.below(3) {
                        0 => {}
                        1 => {
                            rule.remote_ip_prefix = Some(net(match rule.ethertype {
                                EtherType::Ipv4 => rng.pick(&prefixes4),
                                EtherType::Ipv6 => rng.pick(&prefixes6),
                            }))
                        }
                        _ => rule.remote_group_id = Some(rng.pick(&groups).to_string()),
                    }
                    rule
                })
                .collect();
            resources.push(
                SecurityGroup {
                    stateful: true,
                    ..group(group_id, rules)
                }
                .into(),
            );
            // A member elsewhere, with a pair.
            let mut member = elsewhere(
                &format!("m{g}"),
                &format!("fa:16:3e:00:01:{g:02x}"),
                &[group_id],
                &[
                    ("s2", &format!("10.0.2.2{g}")),
                    ("s2v6", &format!("2001:db8:2::2{g}")),
                ],
            );
            if rng.below(2) == 0 {
                member.allowed_address_pairs = vec![pair(rng.pick(&prefixes4[2..]), None)];
            }
            resources.push(member.into());
        }
        let local_ports: Vec<Port> = (0..4)
            .map(|i| {
                let chosen: Vec<&str> = groups
                    .iter()
                    .copied()
                    .filter(|_| rng.below(2) == 0)
                    .collect();
                local(
                    &format!("p{i}"),
                    &format!("fa:16:3e:00:00:{i:02x}"),
                    &chosen,
                    &[("s1", &format!("10.0.0.2{i}"))],
                )
            })
            .collect();
        resources.extend(local_ports.iter().cloned().map(Resource::from));
        let state = state_of(resources);
        let mut slots = new_slots();
        let compiled = run(&state, &mut slots);

        for port in &local_ports {
            let info = info(&compiled, &port.id);
            for direction in [Direction::Ingress, Direction::Egress] {
                for remote in addresses4.iter().chain(&addresses6) {
                    for protocol in [TCP, UDP, ICMP, 58, GRE] {
                        for port_bytes in [[0, 22], [3, 0], [3, 1], [8, 0], [4, 0], [0xff, 0xff]] {
                            let remote_ip = ip(remote);
                            let expected = port
                                .security_group_ids
                                .iter()
                                .flat_map(|id| &state.security_groups[id].rules)
                                .filter(|rule| {
                                    rule_allows(
                                        &state, rule, direction, remote_ip, protocol, port_bytes,
                                    )
                                })
                                .map(|rule| slot(&slots, &rule.id))
                                .min();
                            let found = judge(
                                info,
                                &compiled.tables,
                                direction,
                                remote,
                                protocol,
                                port_bytes,
                            );
                            assert_eq!(
                                found, expected,
                                "round {round}, port {}, {direction:?} {remote} protocol \
                                 {protocol} {port_bytes:?}\n{:#?}",
                                port.id, port.security_group_ids
                            );
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The operator's view
// ---------------------------------------------------------------------------------

#[test]
fn the_policy_view_shows_rules_slots_members_and_allowed_addresses() {
    let web = group(
        "web",
        vec![
            with("from-db", |r| r.remote_group_id = Some("db".to_owned())),
            with("ssh-out", |r| {
                r.direction = Direction::Egress;
                r.port_range_min = Some(22);
                r.port_range_max = Some(22);
                r.remote_ip_prefix = Some(net("192.0.2.0/24"))
            }),
        ],
    );
    let mut p = local(
        "p",
        "fa:16:3e:00:00:01",
        &["web", "web"],
        &[("s1", "10.0.0.5")],
    );
    p.allowed_address_pairs = vec![pair("10.0.0.128/25", Some("02:00:00:00:00:01"))];
    let member = elsewhere(
        "m",
        "fa:16:3e:00:00:0b",
        &["db"],
        &[("s2", "10.0.2.11"), ("s2v6", "2001:db8:2::b")],
    );
    let open = Port {
        port_security_enabled: Some(false),
        ..local("open", "fa:16:3e:00:00:02", &[], &[("s1", "10.0.0.6")])
    };
    let state = state_of(vec![
        web.into(),
        group("db", Vec::new()).into(),
        p.into(),
        member.into(),
        open.into(),
    ]);
    let mut slots = new_slots();
    let compiled = run(&state, &mut slots);

    let view = port_policy(&state, &compiled, "p").expect("p is programmed");
    let programmed = info(&compiled, "p");
    assert!(view.port_security && view.stateful);
    assert_eq!(view.security_group_ids, ["web"]);
    assert_eq!(
        (view.policy_id, view.policy_revision),
        (programmed.policy_id, programmed.policy_revision)
    );
    assert_ne!(view.policy_id, 0);
    let rules: Vec<(&str, Direction, Option<u32>, Vec<String>)> = view
        .rules
        .iter()
        .map(|r| {
            (
                r.rule.id.as_str(),
                r.rule.direction,
                r.slot,
                r.remote_members.iter().map(ToString::to_string).collect(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            (
                "from-db",
                Direction::Ingress,
                Some(slot(&slots, "from-db")),
                // The member's IPv6 address is no remote of an IPv4 rule.
                vec!["10.0.2.11/32".to_owned()]
            ),
            (
                "ssh-out",
                Direction::Egress,
                Some(slot(&slots, "ssh-out")),
                Vec::new()
            ),
        ]
    );
    let allowed: Vec<String> = view
        .allowed_addresses
        .iter()
        .map(|(mac, net)| format!("{mac} {net}"))
        .collect();
    for expected in [
        "fa:16:3e:00:00:01 10.0.0.5/32",
        "02:00:00:00:00:01 10.0.0.128/25",
        "fa:16:3e:00:00:01 fe80::f816:3eff:fe00:1/128",
    ] {
        assert!(
            allowed.iter().any(|a| a == expected),
            "{expected} not in {allowed:?}"
        );
    }

    let open = port_policy(&state, &compiled, "open").expect("open is programmed");
    assert!(!open.port_security && !open.stateful);
    assert!(open.security_group_ids.is_empty());
    assert!(open.rules.is_empty() && open.allowed_addresses.is_empty());
    assert_eq!(open.policy_id, 0);

    assert_eq!(port_policy(&state, &compiled, "m"), None, "on another node");
    assert_eq!(port_policy(&state, &compiled, "nope"), None);
}

/// Ports in overlapping combinations of groups whose rules name nested prefixes, each
/// other as remote groups, and both families: classes shared across policies.
fn overlapping_policies() -> State {
    let mut resources: Vec<Resource> = vec![
        network("n1").into(),
        subnet("s1", "n1", "10.0.0.0/16").into(),
        subnet("s6", "n1", "2001:db8:1::/64").into(),
    ];
    const GROUPS: usize = 7;
    for g in 0..GROUPS {
        let mut group = security_group(&format!("sg{g}"));
        for r in 0..6 {
            let mut rule = rule(&format!("sg{g}-r{r}"));
            rule.direction = if r % 2 == 0 {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            match r % 3 {
                0 => rule.remote_ip_prefix = Some(net(&format!("10.0.{}.0/{}", g % 3, 20 + r))),
                1 => rule.remote_group_id = Some(format!("sg{}", (g + r) % GROUPS)),
                _ => {
                    rule.ethertype = EtherType::Ipv6;
                    rule.remote_ip_prefix = Some(net("2001:db8:1::/64"));
                }
            }
            if r >= 3 {
                rule.protocol = Protocol::UDP;
                rule.port_range_min = Some(1000 + r as u32);
                rule.port_range_max = Some(1000 + 10 * r as u32 + g as u32);
            }
            group.rules.push(rule);
        }
        resources.push(group.into());
    }
    for i in 0..30usize {
        let mut p = port(
            &format!("p{i:02}"),
            "n1",
            &format!("fa:16:3e:00:00:{i:02x}"),
        );
        p.fixed_ips = vec![
            fixed_ip("s1", &format!("10.0.{}.{}", i % 4, i + 2)),
            fixed_ip("s6", &format!("2001:db8:1::{:x}", i + 2)),
        ];
        p.security_group_ids = (0..GROUPS)
            .filter(|g| (i >> (g % 5)) & 1 == 1 || i % GROUPS == *g)
            .map(|g| format!("sg{g}"))
            .collect();
        resources.push(bound(p, NODE, &format!("tap{i}")).into());
    }
    State::replace(resources).expect("valid")
}

#[test]
fn the_policies_compile_the_same_in_any_number_of_shares() {
    let state = overlapping_policies();
    let ports: Vec<&Port> = state.ports.values().map(|port| &**port).collect();
    let compiled = |shares| {
        let (mut slots, mut tables) = (new_slots(), DatapathTables::default());
        let policies = compile_policies_in(&state, &ports, &mut slots, &mut tables, shares);
        let by_port: Vec<_> = ports
            .iter()
            .map(|port| policies.of_port(&port.id).cloned())
            .collect();
        (
            tables.sg_rules,
            tables.sg_remote4,
            tables.sg_remote6,
            by_port,
        )
    };
    let one = compiled(1);
    assert!(
        one.0.len() > 20 && one.1.len() > 20 && !one.2.is_empty(),
        "{one:?}"
    );
    for shares in 2..=5 {
        assert_eq!(compiled(shares), one, "{shares} shares");
    }
}

#[test]
fn weighted_chunks_cut_in_order_by_weight_and_leave_none_empty() {
    let items = [5, 1, 1, 1, 1, 1, 5, 1];
    let chunks = weighted_chunks(&items, |&w| w, 2);
    assert_eq!(chunks, vec![&items[..4], &items[4..]]);
    assert_eq!(weighted_chunks(&items, |&w| w, 1), vec![&items[..]]);
    assert_eq!(weighted_chunks(&items[..1], |&w| w, 4), vec![&items[..1]]);
    assert!(weighted_chunks(&[] as &[usize], |&w| w, 3).is_empty());
    let many = weighted_chunks(&items, |&w| w, 8);
    assert!(many.len() <= 8 && many.iter().all(|chunk| !chunk.is_empty()));
    assert_eq!(many.concat(), items);
}
