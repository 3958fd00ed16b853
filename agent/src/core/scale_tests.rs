//! Validation and compilation at the scale of a large node's desired state.

use std::{collections::BTreeMap, time::Instant};

use super::{
    compile::{compile, NodeView, Slots, StatusKind},
    fixtures::*,
    model::*,
};

const NETWORKS: usize = 100;
const PORTS_PER_NETWORK: usize = 100;
const GROUPS: usize = 1_000;
const RULES_PER_GROUP: usize = 100;
/// Every this many ports, one is bound to this node.
const LOCAL_EVERY: usize = 50;

fn large_state() -> (Vec<Resource>, BTreeMap<String, u32>) {
    let mut resources: Vec<Resource> = Vec::new();
    let mut devices = BTreeMap::new();
    for g in 0..GROUPS {
        let mut group = security_group(&format!("sg{g}"));
        group.rules = (0..RULES_PER_GROUP)
            .map(|r| {
                let mut rule = rule(&format!("sg{g}-r{r}"));
                match r % 3 {
                    0 => rule.remote_group_id = Some(format!("sg{}", (g + r) % GROUPS)),
                    1 => rule.remote_ip_prefix = Some(net(&format!("10.{}.0.0/16", r % 256))),
                    _ => {
                        rule.port_range_min = Some(1000 + r as u32);
                        rule.port_range_max = Some(2000 + r as u32);
                    }
                }
                rule
            })
            .collect();
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
            p.security_group_ids = vec![
                format!("sg{}", index % GROUPS),
                format!("sg{}", (index + 1) % GROUPS),
            ];
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

#[test]
fn ten_thousand_ports_and_a_hundred_thousand_rules() {
    let (resources, devices) = large_state();

    let started = Instant::now();
    let state = State::replace(&resources).expect("valid");
    let replaced = started.elapsed();

    // One port changed, one group with no users deleted: the incremental path.
    let mut changed = state.ports["port00042"].clone();
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

    let mut slots = Slots::new(4096, 4096);
    let started = Instant::now();
    let compiled = compile(
        &next,
        &NodeView {
            node_name: "node-a",
            interfaces: &devices,
        },
        &mut slots,
    );
    let compiled_in = started.elapsed();

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
    assert!(total.as_secs_f64() < 5.0, "took {total:?}");
}
