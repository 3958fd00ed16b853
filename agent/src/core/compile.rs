//! The compiler: from a validated [`State`] and the devices present on this node to the
//! contents the datapath's maps should have, and a status for every resource.
//!
//! Pure and deterministic: the same state, devices and slots give the same tables. The
//! kernel layer diffs two [`DatapathTables`] to update the maps.
//!
//! Security groups become the classifier of `dataplane_abi`'s policy maps (how: the
//! `policy` submodule); [`Slots`] holds the numbers that stay put across compilations.

use std::{
    borrow::Borrow,
    collections::{hash_map::Entry, BTreeMap, BTreeSet, HashMap, HashSet},
    hash::Hash,
    net::IpAddr,
    sync::Arc,
};

use dataplane_abi::{
    fdb_flags, flood_flags, port_flags, ExternalAddr, FdbEntry, FdbKey, FixedAddr4, FixedNat4,
    FloatingIp4, FloodEntry, FloodSet, NeighKey4, NeighKey6, Neighbor, PortAddr4, PortAddr6,
    PortInfo, PortMacKey, RemoteKey4, RemoteKey6, Route, RouteKey4, RouteKey6, RouterGateway,
    RouterGateway6, RouterIf, RuleKey, MAX_FLOOD_PORTS, NO_SLOT, PORT_ADDR_FIXED_BITS,
};
use ipnet::{IpNet, Ipv6Net};
use rustc_hash::FxHashMap;

use super::model::{MacAddr, Network, Port, ResourceKind, ResourceRef, State};

pub mod nat;
mod policy;
mod router;

pub use policy::{port_policy, PortPolicyView, RuleView};

/// What the compiler needs to know about the node.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    /// Ports bound to this host are local.
    pub node_name: &'a str,
    /// Device name → ifindex of the devices present on this node.
    pub interfaces: &'a BTreeMap<String, u32>,
    /// Ifindexes of the devices among them whose frames can go straight to the VM's end
    /// (veths with that end in another namespace): their ports' FDB entries get `PEER_DELIVERY`.
    pub peer_devices: &'a BTreeSet<u32>,
    /// The NIC to external networks; `None`: this node has none, routers' external
    /// gateways are not programmed.
    pub uplink: Option<&'a Uplink>,
}

/// The uplink NIC as the compiler needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uplink {
    pub ifindex: u32,
    /// SNAT's source ports: `snat_port_count` of them from `snat_port_min`.
    pub snat_port_min: u16,
    pub snat_port_count: u16,
    /// External subnet gateways' MACs, as resolved on the uplink.
    pub gateway_macs: BTreeMap<IpAddr, MacAddr>,
}

/// How many slots there are of each kind: the sizes of the arrays indexed by slot, whose
/// entry 0 is [`NO_SLOT`] (so slots are `1..max`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotLimits {
    pub max_ports: u32,
    pub max_networks: u32,
    /// Security-group rules of the ports' policies (`RULE_STATS`).
    pub max_rules: u32,
}

/// Stable small numbers for local ports, networks and security-group rules (the index of
/// per-port and per-rule arrays, the key of per-network maps), and the interned ids of
/// policies and address classes. Each keeps its number while it stays in use; a freed
/// number goes to the next newcomer (lowest first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slots {
    ports: SlotPool<String>,
    networks: SlotPool<String>,
    /// By rule id (unique across groups).
    rules: SlotPool<String>,
    /// Policy ids, by the sorted ids of the port's security groups.
    policies: SlotPool<Vec<String>>,
    /// Address class ids, by the sorted slots of the class's rules.
    classes: SlotPool<Vec<u32>>,
    /// Routers programmed on this node (route keys, not array indexes).
    routers: SlotPool<String>,
}

impl Slots {
    pub fn new(limits: SlotLimits) -> Self {
        Self {
            ports: SlotPool::new(limits.max_ports),
            networks: SlotPool::new(limits.max_networks),
            rules: SlotPool::new(limits.max_rules),
            // Map keys, not array indexes: only `u32` bounds them.
            policies: SlotPool::new(u32::MAX),
            classes: SlotPool::new(u32::MAX),
            routers: SlotPool::new(u32::MAX),
        }
    }

    pub fn port_slot(&self, port_id: &str) -> Option<u32> {
        self.ports.get(port_id)
    }

    pub fn network_slot(&self, network_id: &str) -> Option<u32> {
        self.networks.get(network_id)
    }

    pub fn router_slot(&self, router_id: &str) -> Option<u32> {
        self.routers.get(router_id)
    }

    pub fn rule_slot(&self, rule_id: &str) -> Option<u32> {
        self.rules.get(rule_id)
    }

    /// The policy id of ports with these security groups (any order, repeats ignored),
    /// if such a port is programmed.
    pub fn policy_id(&self, group_ids: &[&str]) -> Option<u32> {
        let mut key: Vec<String> = group_ids.iter().map(|id| (*id).to_owned()).collect();
        key.sort();
        key.dedup();
        self.policies.get(key.as_slice())
    }

    /// What changed from `old` (`None`: released), to store: [`Slots::with_assignments`]
    /// of what is held gives the same slots back, and hands out the same ones next (the
    /// lowest free one, whatever freed it).
    pub fn changes_since(&self, old: &Slots) -> SlotChanges {
        SlotChanges {
            ports: self.ports.changes_since(&old.ports),
            networks: self.networks.changes_since(&old.networks),
            rules: self.rules.changes_since(&old.rules),
            policies: self.policies.changes_since(&old.policies),
            classes: self.classes.changes_since(&old.classes),
            routers: self.routers.changes_since(&old.routers),
        }
    }

    /// Slots of `limits` holding `assignments` (as stored by an earlier run).
    pub fn with_assignments(limits: SlotLimits, assignments: SlotAssignments) -> Self {
        let mut slots = Slots::new(limits);
        slots.ports.hold(assignments.ports);
        slots.networks.hold(assignments.networks);
        slots.rules.hold(assignments.rules);
        slots.policies.hold(assignments.policies);
        slots.classes.hold(assignments.classes);
        slots.routers.hold(assignments.routers);
        slots
    }

    /// The id of the address class of exactly these rules (slots in any order), if a
    /// programmed policy uses it.
    pub fn class_id(&self, rule_slots: &[u32]) -> Option<u32> {
        let mut key = rule_slots.to_vec();
        key.sort_unstable();
        key.dedup();
        self.classes.get(key.as_slice())
    }
}

/// Slots by what holds them, per kind: a restarted agent that compiles the same state
/// with the same slots writes the same tables. `T` is the slot (held) or an optional
/// slot (a change; `None`: released).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotsBy<T> {
    pub ports: Vec<(String, T)>,
    pub networks: Vec<(String, T)>,
    pub rules: Vec<(String, T)>,
    /// By the sorted ids of the policy's security groups.
    pub policies: Vec<(Vec<String>, T)>,
    /// By the sorted slots of the class's rules.
    pub classes: Vec<(Vec<u32>, T)>,
    pub routers: Vec<(String, T)>,
}

/// The slots held.
pub type SlotAssignments = SlotsBy<u32>;
/// Slots taken and released by a commit.
pub type SlotChanges = SlotsBy<Option<u32>>;

impl SlotChanges {
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
            && self.networks.is_empty()
            && self.rules.is_empty()
            && self.policies.is_empty()
            && self.classes.is_empty()
            && self.routers.is_empty()
    }
}

/// Numbers `1..end` handed out to keys.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SlotPool<K: Hash + Eq> {
    /// One past the highest slot.
    end: u32,
    assigned: FxHashMap<K, u32>,
    /// Freed slots below `next_unused`, handed out again lowest first.
    released: BTreeSet<u32>,
    next_unused: u32,
}

impl<K: Hash + Eq> SlotPool<K> {
    fn new(end: u32) -> Self {
        Self {
            end,
            assigned: FxHashMap::default(),
            released: BTreeSet::new(),
            next_unused: NO_SLOT + 1,
        }
    }

    fn get<Q>(&self, id: &Q) -> Option<u32>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.assigned.get(id).copied()
    }

    /// Frees the slots of ids `keep` says no to.
    fn retain(&mut self, keep: impl Fn(&K) -> bool) {
        let released = &mut self.released;
        self.assigned.retain(|id, slot| {
            let kept = keep(id);
            if !kept {
                released.insert(*slot);
            }
            kept
        });
    }

    fn release<Q>(&mut self, id: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if let Some(slot) = self.assigned.remove(id) {
            self.released.insert(slot);
        }
    }

    /// The id's slot, assigning the lowest free one if it has none; `None` when full.
    fn assign<Q>(&mut self, id: &Q) -> Option<u32>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        if let Some(slot) = self.get(id) {
            return Some(slot);
        }
        let slot = match self.released.pop_first() {
            Some(slot) => slot,
            None if self.next_unused < self.end => {
                self.next_unused += 1;
                self.next_unused - 1
            }
            None => return None,
        };
        self.assigned.insert(id.to_owned(), slot);
        Some(slot)
    }

    fn capacity(&self) -> u32 {
        self.end.saturating_sub(NO_SLOT + 1)
    }

    /// Keys whose slot is not what it was in `old` (`None`: released).
    fn changes_since(&self, old: &Self) -> Vec<(K, Option<u32>)>
    where
        K: Clone,
    {
        let taken = self
            .assigned
            .iter()
            .filter(|(key, slot)| old.assigned.get(*key) != Some(*slot))
            .map(|(key, slot)| (key.clone(), Some(*slot)));
        let released = old
            .assigned
            .keys()
            .filter(|key| !self.assigned.contains_key(*key))
            .map(|key| (key.clone(), None));
        taken.chain(released).collect()
    }

    /// Takes `held` as the slots assigned (an empty pool's): every slot below the
    /// highest one that nobody holds is free. Slots out of range are left out.
    fn hold(&mut self, held: Vec<(K, u32)>) {
        for (key, slot) in held {
            if slot > NO_SLOT && slot < self.end {
                self.next_unused = self.next_unused.max(slot + 1);
                self.assigned.insert(key, slot);
            }
        }
        let taken: BTreeSet<u32> = self.assigned.values().copied().collect();
        self.released = (NO_SLOT + 1..self.next_unused)
            .filter(|slot| !taken.contains(slot))
            .collect();
    }
}

/// The desired contents of the datapath's maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathTables {
    /// `PORTS`, by ifindex.
    pub ports: BTreeMap<u32, PortInfo>,
    pub port_macs: BTreeSet<PortMacKey>,
    pub port_ip4: BTreeSet<PortAddr4>,
    /// `PORT_NET4`: (trie prefix length, key with the address masked to the prefix).
    pub port_net4: BTreeSet<(u32, PortAddr4)>,
    pub port_ip6: BTreeSet<PortAddr6>,
    pub port_net6: BTreeSet<(u32, PortAddr6)>,
    pub fdb: BTreeMap<FdbKey, FdbEntry>,
    /// `FLOOD`, by network slot.
    pub flood: BTreeMap<u32, FloodSet>,
    /// `SG_REMOTE4`: (trie prefix length, key with the address masked to the prefix) →
    /// address class.
    pub sg_remote4: BTreeMap<(u32, RemoteKey4), u32>,
    pub sg_remote6: BTreeMap<(u32, RemoteKey6), u32>,
    /// `SG_RULES`: (trie prefix length, key with the port masked to the prefix) → rule
    /// slot.
    pub sg_rules: BTreeMap<(u32, RuleKey), u32>,
    /// `ROUTER_IFS`: (network slot, interface MAC) → router interface.
    pub router_ifs: BTreeMap<FdbKey, RouterIf>,
    /// `ROUTES4`/`ROUTES6`: (trie prefix length, key with the address masked) → route.
    pub routes4: BTreeMap<(u32, RouteKey4), Route>,
    pub routes6: BTreeMap<(u32, RouteKey6), Route>,
    pub neigh4: BTreeMap<NeighKey4, Neighbor>,
    pub neigh6: BTreeMap<NeighKey6, Neighbor>,
    /// `ROUTER_GW`, by router slot.
    pub router_gw: BTreeMap<u32, RouterGateway>,
    /// `ROUTER_GW6`, by router slot.
    pub router_gw6: BTreeMap<u32, RouterGateway6>,
    /// `EXT_ADDRS4`, `EXT_ADDRS6`, `FIPS4`: by external address (network order).
    pub ext_addrs4: BTreeMap<[u8; 4], ExternalAddr>,
    pub ext_addrs6: BTreeMap<[u8; 16], ExternalAddr>,
    pub fips4: BTreeMap<[u8; 4], FloatingIp4>,
    pub fip_of4: BTreeMap<FixedAddr4, FixedNat4>,
    /// `GATEWAY_MACS`: gateway port MAC → router slot.
    pub gateway_macs: BTreeMap<[u8; 6], u32>,
}

/// A port the datapath serves on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedPort {
    pub port_id: String,
    pub slot: u32,
    pub ifindex: u32,
    pub interface_name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusKind {
    Active,
    Down,
    Build,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceStatus {
    pub status: StatusKind,
    /// Empty when ACTIVE; otherwise why, in words an operator can act on.
    pub reason: String,
    /// The revision the status refers to.
    pub revision_number: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Shared with the datapath, which keeps the tables each map set holds.
    pub tables: Arc<DatapathTables>,
    /// By port id.
    pub ports: Vec<ProgrammedPort>,
    /// Every resource of the state.
    pub statuses: BTreeMap<ResourceRef, ResourceStatus>,
    /// Slot of each rule of the programmed ports' policies, by rule id.
    pub rules: BTreeMap<String, u32>,
    /// Local ports whose device is not on this node: port id → the device's name.
    pub missing_devices: BTreeMap<String, String>,
}

pub const ROUTER_NOT_HERE: &str = "no interface on a network with ports on this node";
/// `device_owner` of a router's interface ports.
pub const ROUTER_INTERFACE_OWNER: &str = "network:router_interface";

/// A local port whose device is present, before slots are settled.
struct Candidate<'s> {
    port: &'s Port,
    network: &'s Network,
    ifindex: u32,
}

/// Compiles `state` for this node. Updates `slots`: ports and networks no longer
/// programmed give theirs up, new ones get one.
pub fn compile(state: &State, node: &NodeView<'_>, slots: &mut Slots) -> Compiled {
    let mut statuses = Statuses::default();
    for network in state.networks.values() {
        let (status, reason) = if network.admin_state_up {
            (StatusKind::Active, "")
        } else {
            (StatusKind::Down, "admin_state_up is false")
        };
        statuses.set(
            ResourceKind::Network,
            &network.id,
            network.revision_number,
            status,
            reason,
        );
    }
    for subnet in state.subnets.values() {
        statuses.active(ResourceKind::Subnet, &subnet.id, subnet.revision_number);
    }
    for group in state.security_groups.values() {
        statuses.active(
            ResourceKind::SecurityGroup,
            &group.id,
            group.revision_number,
        );
    }
    for policy in state.qos_policies.values() {
        statuses.active(ResourceKind::QosPolicy, &policy.id, policy.revision_number);
    }
    let mut missing_devices = BTreeMap::new();
    let mut candidates = local_candidates(state, node, &mut statuses, &mut missing_devices);
    settle_slots(&mut candidates, slots, &mut statuses);

    let mut tables = DatapathTables::default();
    let secured: Vec<&Port> = candidates
        .values()
        .flatten()
        .filter(|candidate| port_security(candidate))
        .map(|candidate| candidate.port)
        .collect();
    let policies = policy::compile_policies(state, &secured, slots, &mut tables);
    let mut programmed = Vec::new();
    for (network_id, ports) in &candidates {
        let Some(network_slot) = slots.network_slot(network_id) else {
            continue;
        };
        let claims = mac_claims(ports);
        let mut flood = FloodSet::default();
        for candidate in ports {
            let port = candidate.port;
            let Some(port_slot) = slots.port_slot(&port.id) else {
                continue;
            };
            let own_mac = port.mac_address;
            let other_macs = pair_macs(port);
            let port_security = port_security(candidate);
            let fdb_entry = FdbEntry {
                ifindex: candidate.ifindex,
                port_slot,
                flags: if node.peer_devices.contains(&candidate.ifindex) {
                    fdb_flags::PEER_DELIVERY
                } else {
                    0
                },
            };
            tables.fdb.insert(fdb_key(network_slot, own_mac), fdb_entry);
            for mac in &other_macs {
                // A MAC two ports claim is nobody's: frames to it go to both as unknown.
                if claims.get(mac) == Some(&1) {
                    tables.fdb.insert(fdb_key(network_slot, *mac), fdb_entry);
                }
            }

            // Candidates were cut to MAX_FLOOD_PORTS per network, so there is room.
            if let Some(entry) = flood.ports.get_mut(flood.count as usize) {
                *entry = FloodEntry {
                    ifindex: candidate.ifindex,
                    flags: if !port_security || !other_macs.is_empty() {
                        flood_flags::ACCEPTS_UNKNOWN
                    } else {
                        0
                    },
                };
                flood.count += 1;
            }

            let mut flags = 0;
            let (mut status, mut reason) = if !port.admin_state_up {
                (StatusKind::Down, "admin_state_up is false".to_owned())
            } else if !candidate.network.admin_state_up {
                (
                    StatusKind::Down,
                    format!("network {network_id} has admin_state_up false"),
                )
            } else {
                flags |= port_flags::ADMIN_UP;
                (StatusKind::Active, String::new())
            };
            let (mut policy_id, mut policy_revision) = (0, 0);
            if port_security {
                flags |=
                    port_flags::PORT_SECURITY | add_port_addresses(&mut tables, port_slot, port);
                if let Some(policy) = policies.of_port(&port.id) {
                    flags |= port_flags::POLICY;
                    if policy.stateful {
                        flags |= port_flags::STATEFUL;
                    }
                    (policy_id, policy_revision) = (policy.id, policy.revision);
                    if let Some(problem) = &policy.problem {
                        (status, reason) = (StatusKind::Error, problem.clone());
                    }
                }
            }
            tables.ports.insert(
                candidate.ifindex,
                PortInfo {
                    port_slot,
                    network_slot,
                    flags,
                    mac: own_mac.0,
                    _pad: [0; 2],
                    policy_id,
                    policy_revision,
                },
            );
            statuses.set(
                ResourceKind::Port,
                &port.id,
                port.revision_number,
                status,
                reason,
            );
            programmed.push(ProgrammedPort {
                port_id: port.id.clone(),
                slot: port_slot,
                ifindex: candidate.ifindex,
                interface_name: port.binding.interface_name.clone(),
            });
        }
        tables.flood.insert(network_slot, flood);
    }
    programmed.sort_by(|a, b| a.port_id.cmp(&b.port_id));
    let routers = router::compile_routers(state, slots, &mut tables);
    let nat = nat::compile_gateways(state, slots, node.uplink, &routers, &mut tables);
    for (id, revision_number, kind, reason) in nat.floating_ips {
        statuses.set(ResourceKind::FloatingIp, &id, revision_number, kind, reason);
    }
    for router in state.routers.values() {
        let gateway_problem = nat.routers.iter().find(|(id, ..)| *id == router.id);
        let (status, reason) = if !router.admin_state_up {
            (StatusKind::Down, "admin_state_up is false")
        } else if let Some((_, kind, reason)) = gateway_problem {
            (*kind, reason.as_str())
        } else if routers
            .iter()
            .any(|programmed| programmed.router.id == router.id)
        {
            (StatusKind::Active, "")
        } else {
            (StatusKind::Down, ROUTER_NOT_HERE)
        };
        statuses.set(
            ResourceKind::Router,
            &router.id,
            router.revision_number,
            status,
            reason,
        );
        // Its interface and gateway ports live wherever it does: in every node's
        // datapath.
        for port_id in router.interfaces.iter().filter_map(|i| i.port_id.as_ref()) {
            if let Some(port) = state.ports.get(port_id) {
                statuses.port(port, status, reason);
            }
        }
        for port in state.ports.values().filter(|port| {
            port.device_owner == nat::ROUTER_GATEWAY_OWNER && port.device_id == router.id
        }) {
            statuses.port(port, status, reason);
        }
    }

    Compiled {
        tables: Arc::new(tables),
        ports: programmed,
        statuses: statuses.0,
        rules: policies.rules,
        missing_devices,
    }
}

/// The port's own setting, else its network's.
fn port_security(candidate: &Candidate<'_>) -> bool {
    candidate
        .port
        .port_security_enabled
        .unwrap_or(candidate.network.port_security_enabled)
}

#[derive(Default)]
struct Statuses(BTreeMap<ResourceRef, ResourceStatus>);

impl Statuses {
    fn set(
        &mut self,
        kind: ResourceKind,
        id: &str,
        revision_number: u64,
        status: StatusKind,
        reason: impl Into<String>,
    ) {
        self.0.insert(
            ResourceRef {
                kind,
                id: id.to_owned(),
            },
            ResourceStatus {
                status,
                reason: reason.into(),
                revision_number,
            },
        );
    }

    fn active(&mut self, kind: ResourceKind, id: &str, revision_number: u64) {
        self.set(kind, id, revision_number, StatusKind::Active, "");
    }

    fn port(&mut self, port: &Port, status: StatusKind, reason: impl Into<String>) {
        self.set(
            ResourceKind::Port,
            &port.id,
            port.revision_number,
            status,
            reason,
        );
    }
}

/// Local ports whose device is present, by network id, each network's in port id order
/// and at most [`MAX_FLOOD_PORTS`] of them. Gives every other port its status.
fn local_candidates<'s>(
    state: &'s State,
    node: &NodeView<'_>,
    statuses: &mut Statuses,
    missing_devices: &mut BTreeMap<String, String>,
) -> BTreeMap<&'s str, Vec<Candidate<'s>>> {
    let mut candidates: BTreeMap<&str, Vec<Candidate>> = BTreeMap::new();
    let mut device_users: HashMap<u32, &str> = HashMap::new();
    for port in state.ports.values() {
        let binding = &port.binding;
        if binding.host.is_empty() {
            statuses.port(port, StatusKind::Down, "not bound to a node");
            continue;
        }
        if binding.host != node.node_name {
            statuses.port(
                port,
                StatusKind::Down,
                format!("bound to host {}, not this node", binding.host),
            );
            continue;
        }
        if binding.interface_name.is_empty() {
            statuses.port(
                port,
                StatusKind::Build,
                "waiting for the binding's interface_name",
            );
            continue;
        }
        let Some(&ifindex) = node.interfaces.get(&binding.interface_name) else {
            statuses.port(
                port,
                StatusKind::Build,
                format!("waiting for interface {}", binding.interface_name),
            );
            missing_devices.insert(port.id.clone(), binding.interface_name.clone());
            continue;
        };
        // A validated state has the network; a state built by hand might not.
        let Some(network) = state.networks.get(&port.network_id) else {
            statuses.port(
                port,
                StatusKind::Error,
                format!("network {} does not exist", port.network_id),
            );
            continue;
        };
        // One device, one port: the map is keyed by ifindex.
        match device_users.entry(ifindex) {
            Entry::Occupied(user) => {
                statuses.port(
                    port,
                    StatusKind::Error,
                    format!(
                        "interface {} is already the device of port {}",
                        binding.interface_name,
                        user.get()
                    ),
                );
                continue;
            }
            Entry::Vacant(slot) => {
                slot.insert(&port.id);
            }
        }
        candidates
            .entry(&port.network_id)
            .or_default()
            .push(Candidate {
                port,
                network,
                ifindex,
            });
    }
    for (network_id, ports) in &mut candidates {
        if ports.len() > MAX_FLOOD_PORTS {
            for extra in ports.drain(MAX_FLOOD_PORTS..) {
                statuses.port(
                    extra.port,
                    StatusKind::Error,
                    format!(
                        "network {network_id} already has {MAX_FLOOD_PORTS} ports on this node, \
                         the most the datapath floods to"
                    ),
                );
            }
        }
    }
    candidates
}

/// Frees the slots of what is no longer programmed, then gives newcomers slots in id
/// order; a candidate that gets none becomes ERROR and is dropped.
fn settle_slots(
    candidates: &mut BTreeMap<&str, Vec<Candidate<'_>>>,
    slots: &mut Slots,
    statuses: &mut Statuses,
) {
    slots
        .networks
        .retain(|id| candidates.contains_key(id.as_str()));
    let network_capacity = slots.networks.capacity();
    for (network_id, ports) in candidates.iter_mut() {
        if slots.networks.assign(*network_id).is_none() {
            for candidate in ports.drain(..) {
                statuses.port(
                    candidate.port,
                    StatusKind::Error,
                    format!("no free network slot on this node (all {network_capacity} in use)"),
                );
            }
        }
    }

    let wanted: BTreeSet<&str> = candidates
        .values()
        .flatten()
        .map(|candidate| candidate.port.id.as_str())
        .collect();
    slots.ports.retain(|id| wanted.contains(id.as_str()));
    let port_capacity = slots.ports.capacity();
    let without_slot: HashSet<&str> = wanted
        .into_iter()
        .filter(|id| slots.ports.assign(*id).is_none())
        .collect();
    for ports in candidates.values_mut() {
        ports.retain(|candidate| {
            let has_slot = !without_slot.contains(candidate.port.id.as_str());
            if !has_slot {
                statuses.port(
                    candidate.port,
                    StatusKind::Error,
                    format!("no free port slot on this node (all {port_capacity} in use)"),
                );
            }
            has_slot
        });
    }
    candidates.retain(|network_id, ports| {
        if ports.is_empty() {
            slots.networks.release(*network_id);
        }
        !ports.is_empty()
    });
}

/// How many of the network's programmed ports claim each MAC (own or pair MAC).
fn mac_claims(ports: &[Candidate<'_>]) -> HashMap<MacAddr, usize> {
    let mut claims = HashMap::new();
    for candidate in ports {
        let own = candidate.port.mac_address;
        for mac in std::iter::once(own).chain(pair_macs(candidate.port)) {
            *claims.entry(mac).or_insert(0) += 1;
        }
    }
    claims
}

/// The port's pair MACs other than its own, each once.
fn pair_macs(port: &Port) -> BTreeSet<MacAddr> {
    port.allowed_address_pairs
        .iter()
        .filter_map(|pair| pair.mac_address)
        .filter(|mac| *mac != port.mac_address)
        .collect()
}

fn fdb_key(network_slot: u32, mac: MacAddr) -> FdbKey {
    FdbKey {
        network_slot,
        mac: mac.0,
        _pad: [0; 2],
    }
}

/// Adds the (MAC, address) pairs the port may send from; returns the `HAS_NET*` flags.
fn add_port_addresses(tables: &mut DatapathTables, slot: u32, port: &Port) -> u32 {
    let own = port.mac_address;
    let mut flags = 0;
    let mut allow = |mac: MacAddr, net: IpNet| match net {
        IpNet::V4(net) => {
            let key = |addr: std::net::Ipv4Addr| PortAddr4 {
                port_slot: slot,
                mac: mac.0,
                _pad: [0; 2],
                addr: addr.octets(),
            };
            if net.prefix_len() == net.max_prefix_len() {
                tables.port_ip4.insert(key(net.addr()));
            } else {
                let prefix = PORT_ADDR_FIXED_BITS + u32::from(net.prefix_len());
                tables.port_net4.insert((prefix, key(net.network())));
                flags |= port_flags::HAS_NET4;
            }
        }
        IpNet::V6(net) => {
            let key = |addr: std::net::Ipv6Addr| PortAddr6 {
                port_slot: slot,
                mac: mac.0,
                _pad: [0; 2],
                addr: addr.octets(),
            };
            if net.prefix_len() == net.max_prefix_len() {
                tables.port_ip6.insert(key(net.addr()));
            } else {
                let prefix = PORT_ADDR_FIXED_BITS + u32::from(net.prefix_len());
                tables.port_net6.insert((prefix, key(net.network())));
                flags |= port_flags::HAS_NET6;
            }
        }
    };
    let link_local = |mac: MacAddr| IpNet::V6(Ipv6Net::from(mac.ipv6_link_local()));

    for fixed_ip in &port.fixed_ips {
        allow(own, IpNet::from(fixed_ip.ip_address));
    }
    // Neutron lets every port use the link-local address of each of its MACs.
    allow(own, link_local(own));
    for pair in &port.allowed_address_pairs {
        allow(pair.mac_address.unwrap_or(own), pair.ip_address);
    }
    let other_macs = pair_macs(port);
    for mac in &other_macs {
        allow(*mac, link_local(*mac));
    }
    for mac in std::iter::once(own).chain(other_macs) {
        tables.port_macs.insert(PortMacKey {
            port_slot: slot,
            mac: mac.0,
            _pad: [0; 2],
        });
    }
    flags
}

#[cfg(test)]
mod tests;
