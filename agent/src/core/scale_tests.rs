//! Validation and compilation at the scale of a large node's desired state.

use std::{
    collections::{BTreeMap, BTreeSet},
    mem::size_of,
    time::{Duration, Instant},
};

use dataplane_abi::{RemoteKey4, RemoteKey6, RuleKey};

use super::{
    compile::{compile, Compiled, DatapathTables, NodeView, SlotLimits, Slots, StatusKind},
    fixtures::*,
    model::*,
};

const NETWORKS: usize = 100;
const PORTS_PER_NETWORK: usize = 100;
const GROUPS: usize = 1_000;
const RULES_PER_GROUP: usize = 100;
/// Groups `sg0..sg{BIG_GROUPS}` hold every port of every `BIG_GROUPS`-th network: 1,000
/// members each. Every port is also in one of the other ("small") groups.
const BIG_GROUPS: usize = 10;
/// Every this many ports, one is bound to this node.
const LOCAL_EVERY: usize = 50;

/// Bytes of one entry of an LPM trie map besides its key and value (the kernel's
/// `lpm_trie_node`: rcu head, children, flags, prefix length; allocator rounding).
const LPM_NODE_OVERHEAD: usize = 64;

fn big_group(network: usize) -> String {
    format!("sg{}", network % BIG_GROUPS)
}

fn small_group(index: usize) -> String {
    format!("sg{}", BIG_GROUPS + index % (GROUPS - BIG_GROUPS))
}

/// A group's rules, a mix in the spirit of real allow lists: a few rules by remote
/// group (a big one, whose members are 1,000 ports, and a small one), most by remote
/// prefix (single ports, ranges, ICMP types, IPv6), a few from anywhere, and the
/// default egress rules.
fn group_rules(g: usize) -> Vec<SecurityGroupRule> {
    (0..RULES_PER_GROUP)
        .map(|r| {
            let mut rule = rule(&format!("sg{g}-r{r}"));
            let port = |rule: &mut SecurityGroupRule, min: usize, max: usize| {
                rule.port_range_min = Some(min as u32);
                rule.port_range_max = Some(max as u32);
            };
            match r {
                0..5 => {
                    rule.remote_group_id = Some(format!("sg{}", g % BIG_GROUPS));
                    if r % 2 == 0 {
                        rule.protocol = Protocol::Any;
                    } else {
                        port(&mut rule, 1000 + r, 2000 + r);
                    }
                }
                5..10 => {
                    rule.remote_group_id = Some(small_group(g + r));
                    port(&mut rule, 3000 + r, 3000 + r);
                }
                10..90 => match r % 4 {
                    0 => {
                        rule.remote_ip_prefix = Some(net(&format!("172.{}.{r}.0/24", 16 + g % 16)));
                        port(&mut rule, 8000 + r, 8000 + r);
                    }
                    1 => {
                        rule.protocol = Protocol::UDP;
                        rule.remote_ip_prefix = Some(net(&format!("172.{}.{r}.0/24", 16 + g % 16)));
                        port(&mut rule, 5000, 5000 + r);
                    }
                    2 => {
                        rule.protocol = Protocol::ICMP;
                        rule.port_range_min = Some(8);
                        rule.remote_ip_prefix = Some(net(&format!("192.168.{r}.0/24")));
                    }
                    _ => {
                        rule.ethertype = EtherType::Ipv6;
                        rule.remote_ip_prefix = Some(net(&format!("2001:db8:{:x}:{r:x}::/64", g)));
                        port(&mut rule, 443, 443);
                    }
                },
                90..98 => {
                    let well_known = [22, 80, 443, 8443][r % 4];
                    port(&mut rule, well_known, well_known + r % 2);
                }
                98 => {
                    rule.direction = Direction::Egress;
                    rule.protocol = Protocol::Any;
                }
                _ => {
                    rule.direction = Direction::Egress;
                    rule.ethertype = EtherType::Ipv6;
                    rule.protocol = Protocol::Any;
                }
            }
            rule
        })
        .collect()
}

fn large_state() -> (Vec<Resource>, BTreeMap<String, u32>) {
    let mut resources: Vec<Resource> = Vec::new();
    let mut devices = BTreeMap::new();
    for g in 0..GROUPS {
        let mut group = security_group(&format!("sg{g}"));
        group.rules = group_rules(g);
        resources.push(group.into());
    }
    for n in 0..NETWORKS {
        resources.push(network(&format!("n{n}")).into());
        resources.push(
            subnet(
                &format!("s{n}"),
                &format!("n{n}"),
                &format!("10.{n}.0.0/16"),
            )
            .into(),
        );
        for i in 0..PORTS_PER_NETWORK {
            let index = n * PORTS_PER_NETWORK + i;
            let id = format!("port{index:05}");
            let mut p = port(
                &id,
                &format!("n{n}"),
                &format!("fa:16:3e:{n:02x}:{:02x}:{:02x}", i / 256, i % 256),
            );
            p.fixed_ips = vec![fixed_ip(
                &format!("s{n}"),
                &format!("10.{n}.{}.{}", i / 200, i % 200 + 2),
            )];
            p.security_group_ids = vec![big_group(n), small_group(index)];
            if index.is_multiple_of(7) {
                p.allowed_address_pairs = vec![pair(&format!("10.{n}.200.0/24"), None)];
            }
            if index.is_multiple_of(LOCAL_EVERY) {
                let device = format!("tap{index}");
                devices.insert(device.clone(), 1000 + index as u32);
                p = bound(p, "node-a", &device);
            } else {
                p = bound(p, "node-b", &format!("tap{index}"));
            }
            resources.push(p.into());
        }
    }
    (resources, devices)
}

/// Entries in one map and their memory: (key + value + node overhead) each.
fn memory(entries: usize, key: usize, value: usize) -> usize {
    // An LPM trie key carries its prefix length (u32) before the data.
    entries * (4 + key + value + LPM_NODE_OVERHEAD)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// How many entries of the classifier maps differ between two compilations.
fn changed_entries(old: &DatapathTables, new: &DatapathTables) -> usize {
    fn changed<K: Ord, V: PartialEq>(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> usize {
        new.iter().filter(|(k, v)| old.get(k) != Some(v)).count()
            + old.keys().filter(|k| !new.contains_key(k)).count()
    }
    changed(&old.sg_remote4, &new.sg_remote4)
        + changed(&old.sg_remote6, &new.sg_remote6)
        + changed(&old.sg_rules, &new.sg_rules)
}

fn compile_timed(
    state: &State,
    devices: &BTreeMap<String, u32>,
    slots: &mut Slots,
) -> (Compiled, Duration) {
    let started = Instant::now();
    let compiled = compile(
        state,
        &NodeView {
            node_name: "node-a",
            interfaces: devices,
            peer_devices: &BTreeSet::new(),
            uplink: None,
        },
        slots,
    );
    (compiled, started.elapsed())
}

#[test]
fn ten_thousand_ports_and_a_hundred_thousand_rules() {
    let (resources, devices) = large_state();

    let started = Instant::now();
    let state = State::replace(resources).expect("valid");
    let replaced = started.elapsed();
    assert_eq!(state.ports.len(), NETWORKS * PORTS_PER_NETWORK);
    let rules: usize = state.security_groups.values().map(|g| g.rules.len()).sum();
    assert_eq!(rules, GROUPS * RULES_PER_GROUP);
    let members = state
        .ports
        .values()
        .filter(|p| p.security_group_ids.contains(&"sg3".to_owned()))
        .count();
    assert_eq!(members, 1_000);

    // One port changed, one group with no users deleted: the incremental path.
    let mut changed = Port::clone(&state.ports["port00042"]);
    changed.revision_number += 1;
    changed.admin_state_up = false;
    let started = Instant::now();
    let next = state
        .apply(&[
            Change::Upsert(changed.into()),
            Change::Upsert(security_group("unused").into()),
        ])
        .expect("valid");
    let next = next
        .apply(&[Change::Delete(ResourceRef {
            kind: ResourceKind::SecurityGroup,
            id: "unused".to_owned(),
        })])
        .expect("valid");
    let applied = started.elapsed();

    let mut slots = Slots::new(SlotLimits {
        max_ports: 4096,
        max_networks: 4096,
        max_rules: 131_072,
    });
    let (compiled, compiled_in) = compile_timed(&next, &devices, &mut slots);

    let total = replaced + applied + compiled_in;
    println!(
        "replace {replaced:?}, apply x2 {applied:?}, compile {compiled_in:?}, total {total:?}"
    );
    assert_eq!(
        compiled.ports.len(),
        NETWORKS * PORTS_PER_NETWORK / LOCAL_EVERY
    );
    assert_eq!(compiled.statuses.len(), next.len());
    let active = compiled
        .statuses
        .values()
        .filter(|status| status.status == StatusKind::Active)
        .count();
    assert!(active > GROUPS + NETWORKS);

    let tables = &compiled.tables;
    let policies: BTreeSet<u32> = tables.ports.values().map(|info| info.policy_id).collect();
    let classes: BTreeSet<u32> = tables.sg_rules.keys().map(|(_, key)| key.class).collect();
    let (remote4, remote6, rule_entries) = (
        memory(tables.sg_remote4.len(), size_of::<RemoteKey4>(), 4),
        memory(tables.sg_remote6.len(), size_of::<RemoteKey6>(), 4),
        memory(tables.sg_rules.len(), size_of::<RuleKey>(), 4),
    );
    println!(
        "{} local ports, {} policies, {} rules with slots, {} classes",
        compiled.ports.len(),
        policies.len(),
        compiled.rules.len(),
        classes.len()
    );
    println!(
        "SG_REMOTE4 {} entries ({:.1} MiB), SG_REMOTE6 {} entries ({:.1} MiB), SG_RULES {} \
         entries ({:.1} MiB): {:.1} MiB at {LPM_NODE_OVERHEAD} bytes of node overhead per entry",
        tables.sg_remote4.len(),
        mib(remote4),
        tables.sg_remote6.len(),
        mib(remote6),
        tables.sg_rules.len(),
        mib(rule_entries),
        mib(remote4 + remote6 + rule_entries)
    );
    // Every local port has a policy (ports with the same groups share one), and every
    // rule of their groups a slot.
    let local_groups: BTreeSet<&str> = compiled
        .ports
        .iter()
        .flat_map(|port| &next.ports[&port.port_id].security_group_ids)
        .map(String::as_str)
        .collect();
    let local_policies: BTreeSet<Vec<&String>> = compiled
        .ports
        .iter()
        .map(|port| {
            next.ports[&port.port_id]
                .security_group_ids
                .iter()
                .collect()
        })
        .collect();
    assert_eq!(policies.len(), local_policies.len());
    assert!(!policies.contains(&0));
    assert_eq!(compiled.rules.len(), RULES_PER_GROUP * local_groups.len());
    // Each policy reaches a big group's 1,000 members (and a pair prefix for every 7th).
    assert!(tables.sg_remote4.len() > 1_000 * policies.len());

    // A member of a big group moves: only the entries naming it change.
    let mut moved = Port::clone(&next.ports["port00301"]);
    moved.revision_number += 1;
    moved.fixed_ips = vec![fixed_ip("s3", "10.3.250.250")];
    let started = Instant::now();
    let after = next.apply(&[Change::Upsert(moved.into())]).expect("valid");
    let (recompiled, recompiled_in) = compile_timed(&after, &devices, &mut slots);
    let revised = compiled
        .tables
        .ports
        .iter()
        .filter(|(ifindex, info)| {
            recompiled.tables.ports[ifindex].policy_revision != info.policy_revision
        })
        .count();
    let changed = changed_entries(&compiled.tables, &recompiled.tables);
    println!(
        "one member moved: apply + compile {:?}, {changed} entries changed, {revised} ports \
         revised",
        started.elapsed()
    );
    assert!(
        changed > 0 && changed <= 4 * revised,
        "{changed} for {revised}"
    );
    assert!(revised > 0 && revised < compiled.ports.len());
    // And back: the first tables again.
    let (back, _) = compile_timed(&next, &devices, &mut slots);
    assert!(back.tables == compiled.tables, "recompiling is not stable");

    assert!(
        total.as_secs_f64() < 10.0 && recompiled_in.as_secs_f64() < 10.0,
        "took {total:?} and {recompiled_in:?}"
    );
}
