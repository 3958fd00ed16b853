//! Security groups compiled into the classifier of [`dataplane_abi`]'s `policy` module:
//! per policy, direction and address family an LPM trie of remote prefixes whose values
//! are address classes, and per class an LPM trie of (protocol, port) entries whose
//! values are rule slots.
//!
//! A policy is the set of a port's security groups: ports with the same groups share
//! it. A class is the exact set of rules (by slot) whose remote contains an address;
//! classes are interned globally, so the same rule set is the same class, and its rule
//! entries are written once whichever policies reach it. Policy ids, class ids and rule
//! slots are held in [`Slots`] and keep their numbers while in use, so recompiling an
//! unchanged state gives the same tables and the same revisions.

use std::collections::{btree_map, BTreeMap};

use dataplane_abi::{
    sg_direction, RemoteKey4, RemoteKey6, RuleKey, REMOTE_FIXED_BITS, RULE_CLASS_BITS,
    RULE_PROTOCOL_BITS,
};
use ipnet::IpNet;
use rustc_hash::{FxHashMap as HashMap, FxHashSet};

use super::{DatapathTables, Slots};
use crate::core::model::{
    Direction, EtherType, IpVersion, Port, Protocol, SecurityGroup, SecurityGroupRule, State,
};

/// The policy of one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PortPolicy {
    pub id: u32,
    pub revision: u32,
    pub stateful: bool,
    /// Why some of the policy's rules are not programmed (the policy allows less than
    /// its groups say), if they are not.
    pub problem: Option<String>,
}

/// The policies of the programmed ports with port security.
#[derive(Debug, Default)]
pub(super) struct Policies<'s> {
    policies: Vec<PortPolicy>,
    by_port: HashMap<&'s str, usize>,
    /// Slot of each rule of these policies, by rule id.
    pub rules: BTreeMap<String, u32>,
}

impl Policies<'_> {
    pub fn of_port(&self, port_id: &str) -> Option<&PortPolicy> {
        self.by_port
            .get(port_id)
            .map(|&index| &self.policies[index])
    }
}

/// The (direction, family) lookups of a policy, in the order their entries are digested.
const LOOKUPS: [(Direction, IpVersion); 4] = [
    (Direction::Ingress, IpVersion::V4),
    (Direction::Ingress, IpVersion::V6),
    (Direction::Egress, IpVersion::V4),
    (Direction::Egress, IpVersion::V6),
];

/// Compiles the policies of `ports` (programmed, with port security) into `tables`.
/// Updates the rule slots, policy ids and class ids of `slots`.
pub(super) fn compile_policies<'s>(
    state: &'s State,
    ports: &[&'s Port],
    slots: &mut Slots,
    tables: &mut DatapathTables,
) -> Policies<'s> {
    compile_policies_in(state, ports, slots, tables, parallelism())
}

/// [`compile_policies`], the policies classified in `shares` shares side by side (the
/// tables are the same whatever their number).
fn compile_policies_in<'s>(
    state: &'s State,
    ports: &[&'s Port],
    slots: &mut Slots,
    tables: &mut DatapathTables,
    shares: usize,
) -> Policies<'s> {
    // Policies: the sorted, distinct group ids of each port.
    let mut keys: BTreeMap<Vec<&'s str>, usize> = BTreeMap::new();
    let mut port_keys = Vec::with_capacity(ports.len());
    for port in ports {
        let mut key: Vec<&str> = port.security_group_ids.iter().map(String::as_str).collect();
        key.sort_unstable();
        key.dedup();
        let next = keys.len();
        let index = *keys.entry(key).or_insert(next);
        port_keys.push((port.id.as_str(), index));
    }
    let keys: Vec<Vec<&'s str>> = {
        let mut ordered = vec![Vec::new(); keys.len()];
        for (key, index) in keys {
            ordered[index] = key;
        }
        ordered
    };
    let owned_keys: FxHashSet<Vec<String>> = keys.iter().map(|key| owned(key)).collect();
    slots.policies.retain(|key| owned_keys.contains(key));
    let mut sorted_keys: Vec<usize> = (0..keys.len()).collect();
    sorted_keys.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
    let mut policy_ids = vec![0; keys.len()];
    for index in sorted_keys {
        policy_ids[index] = slots
            .policies
            .assign(owned(&keys[index]).as_slice())
            // At most one policy per programmed port, and ports are far fewer.
            .expect("policy ids are not exhausted");
    }

    // Rule slots: every rule of the policies' groups, newcomers in id order.
    let groups: BTreeMap<&str, &'s SecurityGroup> = keys
        .iter()
        .flatten()
        .filter_map(|id| state.security_groups.get(*id).map(|group| (*id, &**group)))
        .collect();
    let mut used_rules: Vec<&str> = groups
        .values()
        .flat_map(|group| &group.rules)
        .map(|rule| rule.id.as_str())
        .collect();
    used_rules.sort_unstable();
    used_rules.dedup();
    {
        let used: FxHashSet<&str> = used_rules.iter().copied().collect();
        slots.rules.retain(|id| used.contains(id.as_str()));
    }
    // Looked up by id many times per rule below: hashed, not ordered.
    let slot_of: HashMap<&str, u32> = used_rules
        .iter()
        .filter_map(|id| slots.rules.assign(*id).map(|slot| (*id, slot)))
        .collect();
    let rule_slot = |rule: &SecurityGroupRule| slot_of.get(rule.id.as_str()).copied();
    let rule_capacity = slots.rules.capacity();
    let encodings: HashMap<u32, Vec<Match>> = groups
        .values()
        .flat_map(|group| &group.rules)
        .filter_map(|rule| rule_slot(rule).map(|slot| (slot, matches_of(rule))))
        .collect();

    let remote_groups: FxHashSet<&str> = groups
        .values()
        .flat_map(|group| &group.rules)
        .filter(|rule| rule_slot(rule).is_some())
        .filter_map(|rule| rule.remote_group_id.as_deref())
        .collect();
    let members = remote_members(state, &remote_groups);

    // Address classes of each policy's lookups.
    let plan = |key: &Vec<&'s str>, classes: &mut Classes| -> Plan {
        let key_groups: Vec<&SecurityGroup> = key
            .iter()
            .filter_map(|id| groups.get(id).copied())
            .collect();
        let mut remotes: [Vec<(Prefix, usize)>; 4] = Default::default();
        for (lookup, (direction, version)) in LOOKUPS.iter().enumerate() {
            let lookup_rules: Vec<(u32, &SecurityGroupRule)> = key_groups
                .iter()
                .flat_map(|group| &group.rules)
                .filter(|rule| {
                    rule.direction == *direction && rule.ethertype.ip_version() == *version
                })
                .filter_map(|rule| rule_slot(rule).map(|slot| (slot, rule)))
                .collect();
            remotes[lookup] = classify(&lookup_rules, &members, *version, classes);
        }
        let problem = key_groups.iter().find_map(|group| {
            group
                .rules
                .iter()
                .find(|rule| rule_slot(rule).is_none())
                .map(|rule| {
                    format!(
                        "no free rule slot on this node (all {rule_capacity} in use): rule {} \
                         of security group {} is not programmed",
                        rule.id, group.id
                    )
                })
        });
        Plan {
            stateful: !key_groups.is_empty() && key_groups.iter().all(|group| group.stateful),
            problem,
            remotes,
        }
    };
    // Most of the compiler's time at a large node's scale: the policies are classified
    // on every core, a share each, and the shares' classes merged after.
    let weight = |key: &Vec<&str>| -> usize {
        key.iter()
            .filter_map(|id| groups.get(id))
            .map(|group| group.rules.len())
            .sum::<usize>()
            + 1
    };
    let shares = weighted_chunks(&keys, weight, shares);
    let classified: Vec<(Vec<Plan>, Classes)> = std::thread::scope(|scope| {
        let plan = &plan;
        let running: Vec<_> = shares
            .iter()
            .map(|share| {
                scope.spawn(move || {
                    let mut classes = Classes::default();
                    let plans = share.iter().map(|key| plan(key, &mut classes)).collect();
                    (plans, classes)
                })
            })
            .collect();
        running
            .into_iter()
            .map(|share| {
                share
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut classes = Classes::default();
    let mut plans = Vec::with_capacity(keys.len());
    for (share_plans, share_classes) in classified {
        let global: Vec<usize> = share_classes
            .sets
            .into_iter()
            .map(|set| classes.intern(set))
            .collect();
        for mut share_plan in share_plans {
            for remotes in &mut share_plan.remotes {
                for (_, class) in remotes {
                    *class = global[*class];
                }
            }
            plans.push(share_plan);
        }
    }

    // Stable class ids, newcomers in the order of their rule sets.
    slots
        .classes
        .retain(|set| classes.index.contains_key(set.as_slice()));
    let mut sorted_classes: Vec<usize> = (0..classes.sets.len()).collect();
    sorted_classes.sort_by(|a, b| classes.sets[*a].cmp(&classes.sets[*b]));
    let mut class_ids = vec![0; classes.sets.len()];
    for class in sorted_classes {
        class_ids[class] = slots
            .classes
            .assign(classes.sets[class].as_slice())
            // Each class takes at least one remote entry: memory runs out long before.
            .expect("class ids are not exhausted");
    }

    // The entries are gathered, then sorted into the tables at once: inserting them one
    // by one in this order costs more than the rest of the compiler.
    let mut sg_rules = Vec::new();
    let (mut sg_remote4, mut sg_remote6) = (Vec::new(), Vec::new());

    // Rule entries, once per class.
    let mut class_digests = vec![0; classes.sets.len()];
    for (class, set) in classes.sets.iter().enumerate() {
        let id = class_ids[class];
        let mut digest = Fnv::new();
        for (len, protocol, port, slot) in class_entries(set, &encodings) {
            let key = RuleKey {
                class: id,
                protocol,
                port: port.to_be_bytes(),
                _pad: 0,
            };
            sg_rules.push(((len, key), slot));
            digest.u32(len);
            digest.bytes(&[protocol]);
            digest.bytes(&key.port);
            digest.u32(slot);
        }
        class_digests[class] = digest.finish();
    }

    // Remote entries and revisions, per policy.
    let mut policies = Vec::with_capacity(plans.len());
    for (plan, &policy_id) in plans.iter().zip(&policy_ids) {
        let mut digest = Fnv::new();
        digest.bytes(&[u8::from(plan.stateful)]);
        let mut reached = BTreeMap::new();
        for ((direction, version), remotes) in LOOKUPS.iter().zip(&plan.remotes) {
            let direction = match direction {
                Direction::Ingress => sg_direction::INGRESS,
                Direction::Egress => sg_direction::EGRESS,
            };
            digest.bytes(&[direction, version.number() as u8]);
            digest.u32(remotes.len() as u32);
            for (prefix, class) in remotes {
                let (len, class_id) =
                    (REMOTE_FIXED_BITS + u32::from(prefix.len), class_ids[*class]);
                match version {
                    IpVersion::V4 => {
                        let key = RemoteKey4 {
                            policy_id,
                            direction,
                            _pad: [0; 3],
                            addr: (prefix.addr as u32).to_be_bytes(),
                        };
                        sg_remote4.push(((len, key), class_id));
                    }
                    IpVersion::V6 => {
                        let key = RemoteKey6 {
                            policy_id,
                            direction,
                            _pad: [0; 3],
                            addr: prefix.addr.to_be_bytes(),
                        };
                        sg_remote6.push(((len, key), class_id));
                    }
                }
                digest.bytes(&[prefix.len]);
                digest.bytes(&prefix.addr.to_be_bytes());
                digest.u32(class_id);
                reached.insert(class_id, class_digests[*class]);
            }
        }
        // The rule entries of the classes reached, through each class's own digest.
        for (class_id, class_digest) in reached {
            digest.u32(class_id);
            digest.u32(class_digest);
        }
        policies.push(PortPolicy {
            id: policy_id,
            revision: match digest.finish() {
                0 => 1,
                revision => revision,
            },
            stateful: plan.stateful,
            problem: plan.problem.clone(),
        });
    }

    // Keys are distinct: a class's entries, and a policy's lookups' prefixes, are.
    tables.sg_rules = sg_rules.into_iter().collect();
    tables.sg_remote4 = sg_remote4.into_iter().collect();
    tables.sg_remote6 = sg_remote6.into_iter().collect();

    Policies {
        policies,
        by_port: port_keys.into_iter().collect(),
        rules: used_rules
            .iter()
            .filter_map(|id| slot_of.get(id).map(|&slot| ((*id).to_owned(), slot)))
            .collect(),
    }
}

fn owned(key: &[&str]) -> Vec<String> {
    key.iter().map(|id| (*id).to_owned()).collect()
}

/// A policy before its class ids are settled.
struct Plan {
    stateful: bool,
    problem: Option<String>,
    /// Per lookup of [`LOOKUPS`]: each distinct prefix and its class (local index), in
    /// (length, address) order.
    remotes: [Vec<(Prefix, usize)>; 4],
}

/// An address prefix of one family, the address right-aligned (IPv4 in the low 32
/// bits) and masked to the length. Orders by length first: ancestors before descendants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Prefix {
    len: u8,
    addr: u128,
}

impl Prefix {
    const ALL: Prefix = Prefix { len: 0, addr: 0 };

    fn of(net: &IpNet) -> (IpVersion, Prefix) {
        match net {
            IpNet::V4(net) => (
                IpVersion::V4,
                Prefix {
                    len: net.prefix_len(),
                    addr: u128::from(u32::from(net.network())),
                },
            ),
            IpNet::V6(net) => (
                IpVersion::V6,
                Prefix {
                    len: net.prefix_len(),
                    addr: u128::from(net.network()),
                },
            ),
        }
    }

    /// The prefix of length `len` (not above its own) containing this one.
    fn truncated(self, len: u8, version: IpVersion) -> Prefix {
        let bits = match version {
            IpVersion::V4 => 32,
            IpVersion::V6 => 128,
        };
        let host_bits = u32::from(bits - len);
        let host_mask = 1u128
            .checked_shl(host_bits)
            .map_or(u128::MAX, |bit| bit - 1);
        Prefix {
            len,
            addr: self.addr & !host_mask,
        }
    }
}

/// Addresses of the ports of each remote group, by family, sorted and distinct.
#[derive(Debug, Default)]
struct Members {
    v4: Vec<Prefix>,
    v6: Vec<Prefix>,
}

impl Members {
    fn of(&self, version: IpVersion) -> &[Prefix] {
        match version {
            IpVersion::V4 => &self.v4,
            IpVersion::V6 => &self.v6,
        }
    }
}

/// Every address of every port (any host, any network) in each of `wanted`: fixed IPs
/// as host prefixes, allowed address pairs as given (masked).
fn remote_members<'s>(state: &'s State, wanted: &FxHashSet<&str>) -> HashMap<&'s str, Members> {
    let mut members: HashMap<&str, Members> = HashMap::default();
    if wanted.is_empty() {
        return members;
    }
    for port in state.ports.values() {
        let mut groups: Vec<&str> = port
            .security_group_ids
            .iter()
            .map(String::as_str)
            .filter(|id| wanted.contains(id))
            .collect();
        if groups.is_empty() {
            continue;
        }
        groups.sort_unstable();
        groups.dedup();
        let addresses: Vec<(IpVersion, Prefix)> = port
            .fixed_ips
            .iter()
            .map(|fixed_ip| IpNet::from(fixed_ip.ip_address))
            .chain(
                port.allowed_address_pairs
                    .iter()
                    .map(|pair| pair.ip_address),
            )
            .map(|net| Prefix::of(&net))
            .collect();
        for group in groups {
            let group_members = members.entry(group).or_default();
            for (version, prefix) in &addresses {
                match version {
                    IpVersion::V4 => group_members.v4.push(*prefix),
                    IpVersion::V6 => group_members.v6.push(*prefix),
                }
            }
        }
    }
    for group_members in members.values_mut() {
        for prefixes in [&mut group_members.v4, &mut group_members.v6] {
            prefixes.sort_unstable();
            prefixes.dedup();
        }
    }
    members
}

/// The classes of one lookup: every distinct prefix the rules name, with the class of
/// the rules containing it, in (length, address) order.
fn classify(
    rules: &[(u32, &SecurityGroupRule)],
    members: &HashMap<&str, Members>,
    version: IpVersion,
    classes: &mut Classes,
) -> Vec<(Prefix, usize)> {
    // The rules naming each prefix exactly. Rules of one remote group go in together.
    let mut named: HashMap<Prefix, Vec<u32>> = HashMap::default();
    let mut by_group: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (slot, rule) in rules {
        match (&rule.remote_ip_prefix, &rule.remote_group_id) {
            (Some(net), _) => {
                let (found, prefix) = Prefix::of(net);
                // A validated rule's prefix has the rule's ethertype.
                if found == version {
                    named.entry(prefix).or_default().push(*slot);
                }
            }
            (None, Some(group)) => by_group.entry(group).or_default().push(*slot),
            (None, None) => named.entry(Prefix::ALL).or_default().push(*slot),
        }
    }
    for (group, slots) in &by_group {
        if let Some(group_members) = members.get(group) {
            for prefix in group_members.of(version) {
                named.entry(*prefix).or_default().extend_from_slice(slots);
            }
        }
    }
    let mut named: Vec<(Prefix, Vec<u32>)> = named.into_iter().collect();
    named.sort_unstable_by_key(|(prefix, _)| *prefix);
    let mut lengths: Vec<u8> = named.iter().map(|(prefix, _)| prefix.len).collect();
    lengths.dedup();

    // Shorter prefixes first: a prefix's class is its own rules and the class of its
    // nearest ancestor among the named prefixes, which holds every rule naming a wider
    // prefix around it (prefixes around one address nest).
    let mut class_of: HashMap<Prefix, usize> =
        HashMap::with_capacity_and_hasher(named.len(), Default::default());
    let mut remotes = Vec::with_capacity(named.len());
    for (prefix, mut own) in named {
        own.sort_unstable();
        own.dedup();
        let ancestor = lengths
            .iter()
            .rev()
            .filter(|&&len| len < prefix.len)
            .find_map(|&len| class_of.get(&prefix.truncated(len, version)).copied());
        let class = classes.extend(ancestor, &own);
        class_of.insert(prefix, class);
        remotes.push((prefix, class));
    }
    remotes
}

/// The rule sets of one compilation, interned.
#[derive(Debug, Default)]
struct Classes {
    /// Sorted rule slots, by local index.
    sets: Vec<Vec<u32>>,
    index: HashMap<Vec<u32>, usize>,
    /// (ancestor class, own rules) → class: the members of a remote group share both,
    /// so most prefixes need no merge.
    extended: HashMap<Option<usize>, HashMap<Vec<u32>, usize>>,
}

impl Classes {
    /// The class of rule set `set` (sorted, distinct), added if new.
    fn intern(&mut self, set: Vec<u32>) -> usize {
        if let Some(&class) = self.index.get(&set) {
            return class;
        }
        let class = self.sets.len();
        self.sets.push(set.clone());
        self.index.insert(set, class);
        class
    }

    /// The class of the rules of `ancestor` and `own` (sorted, distinct).
    fn extend(&mut self, ancestor: Option<usize>, own: &[u32]) -> usize {
        if let Some(&class) = self
            .extended
            .get(&ancestor)
            .and_then(|known| known.get(own))
        {
            return class;
        }
        let set = match ancestor {
            None => own.to_vec(),
            Some(ancestor) => merge(&self.sets[ancestor], own),
        };
        let class = self.intern(set);
        self.extended
            .entry(ancestor)
            .or_default()
            .insert(own.to_vec(), class);
        class
    }
}

/// How many shares to split work into: one per core, at most four.
fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| cores.get().min(4))
}

/// `items` cut into at most `shares` consecutive runs of about equal `weight`, none
/// empty.
fn weighted_chunks<T>(items: &[T], weight: impl Fn(&T) -> usize, shares: usize) -> Vec<&[T]> {
    let total: usize = items.iter().map(&weight).sum();
    let target = total.div_ceil(shares.max(1)).max(1);
    let mut chunks = Vec::with_capacity(shares);
    let (mut start, mut filled) = (0, 0);
    for (index, item) in items.iter().enumerate() {
        filled += weight(item);
        if filled >= target && chunks.len() + 1 < shares {
            chunks.push(&items[start..=index]);
            (start, filled) = (index + 1, 0);
        }
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

/// The union of two sorted, distinct lists, sorted and distinct.
fn merge(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut merged = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                merged.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                merged.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                merged.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    merged.extend_from_slice(&a[i..]);
    merged.extend_from_slice(&b[j..]);
    merged
}

const ICMPV6: u8 = 58;

/// One `SG_RULES` entry of a rule, before its class is known: (trie prefix length,
/// protocol, port or ICMP `[type, code]` as a number, masked to the prefix).
type Match = (u32, u8, u16);

/// What a rule allows of protocol and port, as trie entries.
fn matches_of(rule: &SecurityGroupRule) -> Vec<Match> {
    let number = match rule.protocol {
        Protocol::Any => return vec![(RULE_CLASS_BITS, 0, 0)],
        Protocol::Number(number) => number,
    };
    let protocol = Protocol::Number(number);
    let (min, max) = (rule.port_range_min, rule.port_range_max);
    if protocol.is_icmp() {
        // `icmp` in an IPv6 rule means ICMPv6, as in Neutron.
        let number = match rule.ethertype {
            EtherType::Ipv6 => ICMPV6,
            EtherType::Ipv4 => number,
        };
        // Validated types and codes fit a byte; anything else matches nothing.
        let byte = |value: u32| u8::try_from(value).ok();
        return match (min.map(byte), max.map(byte)) {
            (None, _) => vec![(RULE_PROTOCOL_BITS, number, 0)],
            (Some(Some(kind)), None) => {
                vec![(
                    RULE_PROTOCOL_BITS + 8,
                    number,
                    u16::from_be_bytes([kind, 0]),
                )]
            }
            (Some(Some(kind)), Some(Some(code))) => vec![(
                RULE_PROTOCOL_BITS + 16,
                number,
                u16::from_be_bytes([kind, code]),
            )],
            _ => Vec::new(),
        };
    }
    match min.filter(|_| protocol.has_ports()) {
        Some(min) => port_blocks(min, max.unwrap_or(min))
            .into_iter()
            .map(|(bits, start)| (RULE_PROTOCOL_BITS + bits, number, start))
            .collect(),
        None => vec![(RULE_PROTOCOL_BITS, number, 0)],
    }
}

/// The fewest aligned power-of-two blocks covering ports `min..=max`, in order: (bits of
/// the port fixed by the block, first port). Empty when the range is.
fn port_blocks(min: u32, max: u32) -> Vec<(u32, u16)> {
    let max = max.min(u32::from(u16::MAX));
    let mut blocks = Vec::new();
    let mut start = min;
    while start <= max {
        // The largest block aligned at `start` that ends within the range.
        let mut size_log = start.trailing_zeros().min(16);
        while start + (1 << size_log) - 1 > max {
            size_log -= 1;
        }
        blocks.push((16 - size_log, start as u16));
        start += 1 << size_log;
    }
    blocks
}

/// The mask of the first `bits` bits of a port.
fn port_mask(bits: u32) -> u16 {
    match bits {
        0 => 0,
        bits => u16::MAX << (16 - bits.min(16)),
    }
}

/// The `SG_RULES` entries of a class, in key order: (length, protocol, port, rule slot).
///
/// The value of an entry is the lowest-slot rule allowing what it matches, as the ABI
/// says: rules giving the same key keep the lowest slot, and an entry inside a shorter
/// one whose rule's slot is no higher is left out (the lookup falls back to the shorter
/// entry, with the same answer and the same rule charged).
fn class_entries(rules: &[u32], encodings: &HashMap<u32, Vec<Match>>) -> Vec<(u32, u8, u16, u32)> {
    let mut wanted: BTreeMap<Match, u32> = BTreeMap::new();
    for slot in rules {
        for entry in encodings.get(slot).into_iter().flatten() {
            match wanted.entry(*entry) {
                btree_map::Entry::Vacant(vacant) => {
                    vacant.insert(*slot);
                }
                btree_map::Entry::Occupied(mut occupied) => {
                    let lowest = occupied.get_mut();
                    *lowest = (*lowest).min(*slot);
                }
            }
        }
    }
    // Key order is length first: an entry's ancestors are settled before it.
    let mut kept: HashMap<Match, u32> =
        HashMap::with_capacity_and_hasher(wanted.len(), Default::default());
    let mut entries = Vec::with_capacity(wanted.len());
    for ((len, protocol, port), slot) in wanted {
        let port_ancestors = (RULE_PROTOCOL_BITS..len).rev().map(|shorter| {
            (
                shorter,
                protocol,
                port & port_mask(shorter - RULE_PROTOCOL_BITS),
            )
        });
        let any_protocol = (len > RULE_CLASS_BITS).then_some((RULE_CLASS_BITS, 0, 0));
        let inherited = port_ancestors
            .chain(any_protocol)
            .find_map(|ancestor| kept.get(&ancestor).copied());
        if inherited.is_some_and(|inherited| inherited <= slot) {
            continue;
        }
        kept.insert((len, protocol, port), slot);
        entries.push((len, protocol, port, slot));
    }
    entries
}

/// 32-bit FNV-1a.
struct Fnv(u32);

impl Fnv {
    fn new() -> Self {
        Self(0x811c_9dc5)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u32::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0193);
        }
    }

    fn u32(&mut self, value: u32) {
        self.bytes(&value.to_be_bytes());
    }

    fn finish(&self) -> u32 {
        self.0
    }
}

mod view;

pub use view::{port_policy, PortPolicyView, RuleView};

#[cfg(test)]
mod tests;
