//! Validation: [`State::apply`] and [`State::replace`] build the next state and check it
//! whole, so a held [`State`] is always consistent.
//!
//! Checks run item by item in request order and the first failure is returned, so the
//! same request always gets the same error. Each item is checked against the resulting
//! state: its own values, the resources it references, conflicts with other resources,
//! and (for an upsert that changes what others rely on, or a delete) the resources that
//! reference it but are not themselves part of the request. Because the state before an
//! Apply was valid, a problem can only involve a resource the request touches, so
//! nothing else needs checking; lookups go through hash indexes built on first use.

use std::{cell::OnceCell, collections::hash_map::Entry, net::IpAddr};

use ipnet::IpNet;
// Indexes of a whole state, built on each request: at a large node's scale (100,000
// rule ids, 10,000 ports) SipHash was a good part of a Sync's validation.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::model::{
    id_problem, AllowedAddressPair, Change, FloatingIp, IpVersion, MacAddr, Network, NetworkType,
    Port, Protocol, QosPolicy, Resource, ResourceKind, ResourceRef, ResourceView, Router,
    SecurityGroup, SecurityGroupRule, State, Subnet,
};

/// What kind of wrong a request is; the service maps it to a gRPC code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Wrong whatever the state.
    InvalidArgument,
    /// References something that does not exist.
    NotFound,
    /// Conflicts with another resource.
    AlreadyExists,
    /// Wrong because of the state (stale revision, still in use, ...).
    FailedPrecondition,
}

/// Why a request was refused, and where in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    pub code: ErrorCode,
    /// Position in the request's list (Apply's `changes`, Sync's `resources`).
    pub index: Option<usize>,
    /// Path inside that list item, e.g. `upsert.port.fixed_ips[0].ip_address`.
    pub field: String,
    /// Names the offending value and the reason.
    pub message: String,
}

impl ValidationError {
    pub fn new(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code,
            index: None,
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn invalid_argument(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, field, message)
    }

    pub fn not_found(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, field, message)
    }

    pub fn already_exists(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::AlreadyExists, field, message)
    }

    pub fn failed_precondition(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ErrorCode::FailedPrecondition, field, message)
    }

    /// Sets the request list position.
    pub fn at(mut self, index: usize) -> Self {
        self.index = Some(index);
        self
    }

    /// Makes `field` relative to an enclosing message: `under("fixed_ips[0]")` turns
    /// `ip_address` into `fixed_ips[0].ip_address`.
    pub fn under(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() {
            prefix.to_owned()
        } else {
            format!("{prefix}.{}", self.field)
        };
        self
    }
}

type Checked = Result<(), ValidationError>;

/// The DSCP marks the Networking API accepts.
pub const VALID_DSCP_MARKS: [u32; 21] = [
    0, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 46, 48, 56,
];

/// Below this no IPv4 packet fits (RFC 791).
pub const MIN_MTU: u32 = 68;

impl State {
    /// The state after `changes`, applied in order to a copy; `self` is untouched. The
    /// whole result is checked, so a batch may name a port before its network.
    pub fn apply(&self, changes: &[Change]) -> Result<State, ValidationError> {
        let mut next = self.clone();
        let mut touched = HashMap::with_capacity_and_hasher(changes.len(), Default::default());
        let mut repeated = vec![false; changes.len()];
        for (index, change) in changes.iter().enumerate() {
            let (kind, id) = match change {
                Change::Upsert(resource) => (resource.kind(), resource.id()),
                Change::Delete(reference) => (reference.kind, reference.id.as_str()),
            };
            match touched.entry((kind, id)) {
                Entry::Occupied(_) => repeated[index] = true,
                Entry::Vacant(slot) => {
                    slot.insert(index);
                }
            }
            match change {
                Change::Upsert(resource) => next.insert(resource.clone()),
                Change::Delete(reference) => {
                    next.remove(reference.kind, &reference.id);
                }
            }
        }

        let checker = Checker::new(&next, Some(self), touched);
        for (index, change) in changes.iter().enumerate() {
            let checked = match change {
                Change::Upsert(resource) => checker
                    .upsert(index, resource.view(), repeated[index])
                    .map_err(|e| e.under(&format!("upsert.{}", resource.kind().field_name()))),
                Change::Delete(reference) => checker.delete(reference, repeated[index]),
            };
            checked.map_err(|e| e.at(index))?;
        }
        Ok(next)
    }

    /// A state of exactly `resources` (Sync), checked whole. The resources move into it:
    /// at a large node's scale a copy was most of the check's time.
    pub fn replace(resources: Vec<Resource>) -> Result<State, ValidationError> {
        let mut next = State::default();
        // (kind, id, named before) of each item, in the request's order.
        let mut items = Vec::with_capacity(resources.len());
        for resource in resources {
            let (kind, id) = (resource.kind(), resource.id().to_owned());
            let repeated = next.contains(kind, &id);
            if !repeated {
                next.insert(resource);
            }
            items.push((kind, id, repeated));
        }
        let touched = items
            .iter()
            .enumerate()
            .filter(|(_, (_, _, repeated))| !repeated)
            .map(|(index, (kind, id, _))| ((*kind, id.as_str()), index))
            .collect();

        let checker = Checker::new(&next, None, touched);
        for (index, (kind, id, repeated)) in items.iter().enumerate() {
            checker
                .upsert(
                    index,
                    next.view(*kind, id).expect("the state holds every item"),
                    *repeated,
                )
                .map_err(|e| e.under(kind.field_name()).at(index))?;
        }
        Ok(next)
    }
}

/// Who refers to a resource: (kind, id) of the referrer.
type Referrers<'a> = HashMap<&'a str, Vec<(ResourceKind, &'a str)>>;

/// Checks items of one request against the resulting state.
struct Checker<'a> {
    state: &'a State,
    /// The state an Apply started from; `None` for Sync.
    before: Option<&'a State>,
    /// Every resource the request names, with the position of its (first) item.
    touched: HashMap<(ResourceKind, &'a str), usize>,
    ports_by_mac: OnceCell<HashMap<(&'a str, MacAddr), Vec<&'a str>>>,
    ports_by_fixed_ip: OnceCell<HashMap<(&'a str, IpAddr), Vec<&'a str>>>,
    subnets_by_network: OnceCell<HashMap<&'a str, Vec<&'a Subnet>>>,
    /// Rule id → the groups that have a rule with it.
    groups_by_rule_id: OnceCell<HashMap<&'a str, Vec<&'a str>>>,
    /// Per target kind, built on first use.
    referrers: [OnceCell<Referrers<'a>>; 7],
}

fn kind_slot(kind: ResourceKind) -> usize {
    match kind {
        ResourceKind::Network => 0,
        ResourceKind::Subnet => 1,
        ResourceKind::Port => 2,
        ResourceKind::SecurityGroup => 3,
        ResourceKind::Router => 4,
        ResourceKind::FloatingIp => 5,
        ResourceKind::QosPolicy => 6,
    }
}

impl<'a> Checker<'a> {
    fn new(
        state: &'a State,
        before: Option<&'a State>,
        touched: HashMap<(ResourceKind, &'a str), usize>,
    ) -> Self {
        Self {
            state,
            before,
            touched,
            ports_by_mac: OnceCell::new(),
            ports_by_fixed_ip: OnceCell::new(),
            subnets_by_network: OnceCell::new(),
            groups_by_rule_id: OnceCell::new(),
            referrers: Default::default(),
        }
    }

    fn is_touched(&self, kind: ResourceKind, id: &str) -> bool {
        self.touched.contains_key(&(kind, id))
    }

    /// A conflict between the item at `index` and another resource is reported on the
    /// later of the two, so it is reported once and on the item that introduced it.
    fn reports_conflict_with(&self, kind: ResourceKind, other_id: &str, index: usize) -> bool {
        self.touched
            .get(&(kind, other_id))
            .is_none_or(|&other| other < index)
    }

    /// Resources not named by the request that reference `(kind, id)`.
    fn untouched_referrers(
        &self,
        kind: ResourceKind,
        id: &str,
    ) -> impl Iterator<Item = (ResourceKind, &'a str)> + '_ {
        let index = self.referrers[kind_slot(kind)].get_or_init(|| referrers_of(self.state, kind));
        index
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .copied()
            .filter(|(kind, id)| !self.is_touched(*kind, id))
    }

    fn subnets_of(&self, network_id: &str) -> &[&'a Subnet] {
        let index = self.subnets_by_network.get_or_init(|| {
            let mut index: HashMap<&str, Vec<&Subnet>> = HashMap::default();
            for subnet in self.state.subnets.values() {
                index.entry(&subnet.network_id).or_default().push(subnet);
            }
            index
        });
        index.get(network_id).map(Vec::as_slice).unwrap_or_default()
    }

    fn groups_with_rule(&self, rule_id: &str) -> &[&'a str] {
        let index = self.groups_by_rule_id.get_or_init(|| {
            let mut index: HashMap<&str, Vec<&str>> = HashMap::default();
            for group in self.state.security_groups.values() {
                for rule in &group.rules {
                    let groups = index.entry(rule.id.as_str()).or_default();
                    // A group using an id twice is reported on its own.
                    if groups.last() != Some(&group.id.as_str()) {
                        groups.push(&group.id);
                    }
                }
            }
            index
        });
        index.get(rule_id).map(Vec::as_slice).unwrap_or_default()
    }

    fn ports_with_mac(&self, network_id: &'a str, mac: MacAddr) -> &[&'a str] {
        let index = self.ports_by_mac.get_or_init(|| {
            let mut index: HashMap<_, Vec<&str>> = HashMap::default();
            for port in self.state.ports.values() {
                index
                    .entry((port.network_id.as_str(), port.mac_address))
                    .or_default()
                    .push(&port.id);
            }
            index
        });
        index
            .get(&(network_id, mac))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn ports_with_fixed_ip(&self, network_id: &'a str, ip: IpAddr) -> &[&'a str] {
        let index = self.ports_by_fixed_ip.get_or_init(|| {
            let mut index: HashMap<_, Vec<&str>> = HashMap::default();
            for port in self.state.ports.values() {
                for fixed_ip in &port.fixed_ips {
                    let ports = index
                        .entry((port.network_id.as_str(), fixed_ip.ip_address))
                        .or_default();
                    // A port listing an address twice is reported on its own.
                    if ports.last() != Some(&port.id.as_str()) {
                        ports.push(&port.id);
                    }
                }
            }
            index
        });
        index
            .get(&(network_id, ip))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Checks an upserted resource; fields relative to the resource.
    /// Checks the upsert at `index`.
    fn upsert(&self, index: usize, item: ResourceView<'a>, repeated: bool) -> Checked {
        let (kind, id) = (item.kind(), item.id());
        if repeated {
            return Err(ValidationError::invalid_argument(
                "id",
                format!("{kind} {id} appears more than once in this request"),
            ));
        }
        if let Some(held) = self
            .before
            .and_then(|before| before.revision_number(kind, id))
        {
            let revision = item.revision_number();
            if revision < held {
                return Err(ValidationError::failed_precondition(
                    "revision_number",
                    format!(
                        "revision {revision} of {kind} {id} is older than the held revision {held}"
                    ),
                ));
            }
        }
        check_id("id", id)?;
        match item {
            ResourceView::Network(network) => self.network(network),
            ResourceView::Subnet(subnet) => self.subnet(index, subnet),
            ResourceView::Port(port) => self.port(index, port),
            ResourceView::SecurityGroup(group) => self.security_group(index, group),
            ResourceView::Router(router) => self.router(router),
            ResourceView::FloatingIp(floating_ip) => self.floating_ip(floating_ip),
            ResourceView::QosPolicy(policy) => check_qos_policy(policy),
        }
    }

    /// Checks a delete; fields relative to the change.
    fn delete(&self, reference: &ResourceRef, repeated: bool) -> Checked {
        if repeated {
            return Err(ValidationError::invalid_argument(
                "delete.id",
                format!("{reference} appears more than once in this request"),
            ));
        }
        let existed = self
            .before
            .is_some_and(|before| before.contains(reference.kind, &reference.id));
        if !existed {
            return Err(ValidationError::not_found(
                "delete.id",
                format!("no {reference}"),
            ));
        }
        if let Some((kind, id)) = self
            .untouched_referrers(reference.kind, &reference.id)
            .next()
        {
            return Err(ValidationError::failed_precondition(
                "delete",
                format!("{reference} is still used by {kind} {id}"),
            ));
        }
        Ok(())
    }

    fn network(&self, network: &'a Network) -> Checked {
        check_network(network)?;
        let previous = self.before.and_then(|b| b.networks.get(&network.id));
        if previous.is_some_and(|old| old.router_external != network.router_external) {
            self.network_dependents(network)?;
        }
        if previous.is_some_and(|old| old.port_security_enabled && !network.port_security_enabled) {
            for (kind, id) in self.untouched_referrers(ResourceKind::Network, &network.id) {
                if let Some(port) = self
                    .state
                    .ports
                    .get(id)
                    .filter(|_| kind == ResourceKind::Port)
                {
                    check_port_security(port, network)
                        .map_err(|e| depends_on("port_security_enabled", kind, id, e))?;
                }
            }
        }
        Ok(())
    }

    /// Floating IPs and gateways need the network external; router interfaces need it
    /// internal.
    fn network_dependents(&self, network: &Network) -> Checked {
        let blame = |kind, id, error| depends_on("router_external", kind, id, error);
        for (kind, id) in self.untouched_referrers(ResourceKind::Network, &network.id) {
            match kind {
                ResourceKind::FloatingIp => {
                    if let Some(floating_ip) = self.state.floating_ips.get(id) {
                        check_floating_network(floating_ip, network)
                            .map_err(|e| blame(kind, id, e))?;
                    }
                }
                ResourceKind::Router => {
                    check_gateway_network(network).map_err(|e| blame(kind, id, e))?;
                }
                _ => {}
            }
        }
        for subnet in self.subnets_of(&network.id) {
            for (kind, id) in self.untouched_referrers(ResourceKind::Subnet, &subnet.id) {
                let Some(router) = self
                    .state
                    .routers
                    .get(id)
                    .filter(|_| kind == ResourceKind::Router)
                else {
                    continue;
                };
                for (i, interface) in router.interfaces.iter().enumerate() {
                    if interface.subnet_id == subnet.id {
                        check_interface_network(i, subnet, network)
                            .map_err(|e| blame(kind, id, e))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn subnet(&self, index: usize, subnet: &'a Subnet) -> Checked {
        check_subnet(subnet)?;
        let Some(network) = self.state.networks.get(&subnet.network_id) else {
            return Err(ValidationError::not_found(
                "network_id",
                format!("no network {}", subnet.network_id),
            ));
        };
        for other in self.subnets_of(&subnet.network_id) {
            if other.id != subnet.id
                && overlaps(&other.cidr, &subnet.cidr)
                && self.reports_conflict_with(ResourceKind::Subnet, &other.id, index)
            {
                return Err(ValidationError::already_exists(
                    "cidr",
                    format!(
                        "{} overlaps {} of subnet {} on network {}",
                        subnet.cidr, other.cidr, other.id, subnet.network_id
                    ),
                ));
            }
        }
        let previous = self.before.and_then(|b| b.subnets.get(&subnet.id));
        if previous
            .is_some_and(|old| old.cidr != subnet.cidr || old.network_id != subnet.network_id)
        {
            self.subnet_dependents(subnet, network)?;
        }
        Ok(())
    }

    /// Fixed IPs, router interfaces and gateway addresses on the subnet must still fit it.
    fn subnet_dependents(&self, subnet: &Subnet, network: &Network) -> Checked {
        for (kind, id) in self.untouched_referrers(ResourceKind::Subnet, &subnet.id) {
            let on_network = |e| depends_on("network_id", kind, id, e);
            let on_cidr = |e| depends_on("cidr", kind, id, e);
            if let Some(port) = self
                .state
                .ports
                .get(id)
                .filter(|_| kind == ResourceKind::Port)
            {
                for (i, fixed_ip) in port.fixed_ips.iter().enumerate() {
                    if fixed_ip.subnet_id == subnet.id {
                        check_fixed_ip_network(port, i, subnet).map_err(on_network)?;
                        check_fixed_ip_address(i, fixed_ip.ip_address, subnet).map_err(on_cidr)?;
                    }
                }
            }
            if let Some(router) = self
                .state
                .routers
                .get(id)
                .filter(|_| kind == ResourceKind::Router)
            {
                for (i, interface) in router.interfaces.iter().enumerate() {
                    if interface.subnet_id == subnet.id {
                        check_interface_network(i, subnet, network).map_err(on_network)?;
                    }
                }
                self.router_interfaces_overlap(router).map_err(on_cidr)?;
                if let Some(gateway) = &router.external_gateway_info {
                    for (i, external) in gateway.external_fixed_ips.iter().enumerate() {
                        if external.subnet_id == subnet.id {
                            check_external_subnet(&gateway.network_id, i, subnet)
                                .map_err(on_network)?;
                            check_external_address(i, external.ip_address, subnet)
                                .map_err(on_cidr)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn port(&self, index: usize, port: &'a Port) -> Checked {
        check_port(port)?;
        if !self.state.networks.contains_key(&port.network_id) {
            return Err(ValidationError::not_found(
                "network_id",
                format!("no network {}", port.network_id),
            ));
        }
        for (i, fixed_ip) in port.fixed_ips.iter().enumerate() {
            let Some(subnet) = self.state.subnets.get(&fixed_ip.subnet_id) else {
                return Err(ValidationError::not_found(
                    format!("fixed_ips[{i}].subnet_id"),
                    format!("no subnet {}", fixed_ip.subnet_id),
                ));
            };
            check_fixed_ip_network(port, i, subnet)?;
            check_fixed_ip_address(i, fixed_ip.ip_address, subnet)?;
        }
        for (i, group_id) in port.security_group_ids.iter().enumerate() {
            if !self.state.security_groups.contains_key(group_id) {
                return Err(ValidationError::not_found(
                    format!("security_group_ids[{i}]"),
                    format!("no security group {group_id}"),
                ));
            }
        }
        if let Some(network) = self.state.networks.get(&port.network_id) {
            check_port_security(port, network)?;
        }
        check_groups_agree(port, self.state)?;
        if let Some(policy_id) = &port.qos_policy_id {
            if !self.state.qos_policies.contains_key(policy_id) {
                return Err(ValidationError::not_found(
                    "qos_policy_id",
                    format!("no QoS policy {policy_id}"),
                ));
            }
        }

        let conflicting = |other: &&str| {
            *other != port.id && self.reports_conflict_with(ResourceKind::Port, other, index)
        };
        if let Some(other) = self
            .ports_with_mac(&port.network_id, port.mac_address)
            .iter()
            .copied()
            .find(conflicting)
        {
            return Err(ValidationError::already_exists(
                "mac_address",
                format!(
                    "{} is already used by port {other} on network {}",
                    port.mac_address, port.network_id
                ),
            ));
        }
        for (i, fixed_ip) in port.fixed_ips.iter().enumerate() {
            if let Some(other) = self
                .ports_with_fixed_ip(&port.network_id, fixed_ip.ip_address)
                .iter()
                .copied()
                .find(conflicting)
            {
                return Err(ValidationError::already_exists(
                    format!("fixed_ips[{i}].ip_address"),
                    format!(
                        "{} is already used by port {other} on network {}",
                        fixed_ip.ip_address, port.network_id
                    ),
                ));
            }
        }

        let previous = self.before.and_then(|b| b.ports.get(&port.id));
        if previous.is_some_and(|old| old.fixed_ips != port.fixed_ips) {
            for (kind, id) in self.untouched_referrers(ResourceKind::Port, &port.id) {
                if let Some(floating_ip) = self
                    .state
                    .floating_ips
                    .get(id)
                    .filter(|_| kind == ResourceKind::FloatingIp)
                {
                    check_floating_fixed_ip(floating_ip, port)
                        .map_err(|e| depends_on("fixed_ips", kind, id, e))?;
                }
            }
        }
        Ok(())
    }

    fn security_group(&self, index: usize, group: &SecurityGroup) -> Checked {
        check_security_group(group)?;
        for (i, rule) in group.rules.iter().enumerate() {
            if let Some(remote) = &rule.remote_group_id {
                if !self.state.security_groups.contains_key(remote) {
                    return Err(ValidationError::not_found(
                        format!("rules[{i}].remote_group_id"),
                        format!("no security group {remote}"),
                    ));
                }
            }
        }
        // Rule ids name rules across groups (their counters, for one).
        for (i, rule) in group.rules.iter().enumerate() {
            if let Some(other) = self.groups_with_rule(&rule.id).iter().find(|other| {
                **other != group.id
                    && self.reports_conflict_with(ResourceKind::SecurityGroup, other, index)
            }) {
                return Err(ValidationError::already_exists(
                    format!("rules[{i}].id"),
                    format!(
                        "rule id {} is already used by security group {other}",
                        rule.id
                    ),
                ));
            }
        }
        let previous = self.before.and_then(|b| b.security_groups.get(&group.id));
        if previous.is_some_and(|old| old.stateful != group.stateful) {
            for (kind, id) in self.untouched_referrers(ResourceKind::SecurityGroup, &group.id) {
                if let Some(port) = self
                    .state
                    .ports
                    .get(id)
                    .filter(|_| kind == ResourceKind::Port)
                {
                    check_groups_agree(port, self.state)
                        .map_err(|e| depends_on("stateful", kind, id, e))?;
                }
            }
        }
        Ok(())
    }

    fn router(&self, router: &Router) -> Checked {
        check_router(router)?;
        for (i, interface) in router.interfaces.iter().enumerate() {
            let Some(subnet) = self.state.subnets.get(&interface.subnet_id) else {
                return Err(ValidationError::not_found(
                    format!("interfaces[{i}].subnet_id"),
                    format!("no subnet {}", interface.subnet_id),
                ));
            };
            if let Some(port_id) = &interface.port_id {
                if !self.state.ports.contains_key(port_id) {
                    return Err(ValidationError::not_found(
                        format!("interfaces[{i}].port_id"),
                        format!("no port {port_id}"),
                    ));
                }
            }
            // A missing network is the subnet's own error, reported on its item.
            if let Some(network) = self.state.networks.get(&subnet.network_id) {
                check_interface_network(i, subnet, network)?;
            }
        }
        self.router_interfaces_overlap(router)?;
        if let Some(gateway) = &router.external_gateway_info {
            let Some(network) = self.state.networks.get(&gateway.network_id) else {
                return Err(ValidationError::not_found(
                    "external_gateway_info.network_id",
                    format!("no network {}", gateway.network_id),
                ));
            };
            check_gateway_network(network)?;
            for (i, external) in gateway.external_fixed_ips.iter().enumerate() {
                let Some(subnet) = self.state.subnets.get(&external.subnet_id) else {
                    return Err(ValidationError::not_found(
                        format!("external_gateway_info.external_fixed_ips[{i}].subnet_id"),
                        format!("no subnet {}", external.subnet_id),
                    ));
                };
                check_external_subnet(&gateway.network_id, i, subnet)?;
                check_external_address(i, external.ip_address, subnet)?;
            }
        }
        Ok(())
    }

    /// A router cannot route between overlapping subnets.
    fn router_interfaces_overlap(&self, router: &Router) -> Checked {
        let attached: Vec<(usize, &Subnet)> = router
            .interfaces
            .iter()
            .enumerate()
            .filter_map(|(i, interface)| {
                self.state
                    .subnets
                    .get(&interface.subnet_id)
                    .map(|subnet| (i, subnet))
            })
            .collect();
        // Few interfaces per router: pairs are cheaper than an interval structure.
        for (later, (j, subnet)) in attached.iter().enumerate() {
            for (i, earlier) in &attached[..later] {
                if earlier.id != subnet.id && overlaps(&earlier.cidr, &subnet.cidr) {
                    return Err(ValidationError::failed_precondition(
                        format!("interfaces[{j}].subnet_id"),
                        format!(
                            "{} of subnet {} overlaps {} of subnet {} on interfaces[{i}]",
                            subnet.cidr, subnet.id, earlier.cidr, earlier.id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn floating_ip(&self, floating_ip: &FloatingIp) -> Checked {
        check_floating_ip(floating_ip)?;
        let Some(network) = self.state.networks.get(&floating_ip.floating_network_id) else {
            return Err(ValidationError::not_found(
                "floating_network_id",
                format!("no network {}", floating_ip.floating_network_id),
            ));
        };
        check_floating_network(floating_ip, network)?;
        if let Some(port_id) = &floating_ip.port_id {
            let Some(port) = self.state.ports.get(port_id) else {
                return Err(ValidationError::not_found(
                    "port_id",
                    format!("no port {port_id}"),
                ));
            };
            check_floating_fixed_ip(floating_ip, port)?;
        }
        if let Some(router_id) = &floating_ip.router_id {
            if !self.state.routers.contains_key(router_id) {
                return Err(ValidationError::not_found(
                    "router_id",
                    format!("no router {router_id}"),
                ));
            }
        }
        Ok(())
    }
}

/// Every reference to a resource of kind `target`, by the referenced id. Built from the
/// resulting state, in kind and id order so reports are deterministic.
fn referrers_of<'s>(state: &'s State, target: ResourceKind) -> Referrers<'s> {
    let mut index: Referrers<'s> = HashMap::default();
    let mut add = |target_id: &'s str, kind: ResourceKind, id: &'s str| {
        let referrers = index.entry(target_id).or_default();
        if referrers.last() != Some(&(kind, id)) {
            referrers.push((kind, id));
        }
    };
    match target {
        ResourceKind::Network => {
            for subnet in state.subnets.values() {
                add(&subnet.network_id, ResourceKind::Subnet, &subnet.id);
            }
            for port in state.ports.values() {
                add(&port.network_id, ResourceKind::Port, &port.id);
            }
            for router in state.routers.values() {
                if let Some(gateway) = &router.external_gateway_info {
                    add(&gateway.network_id, ResourceKind::Router, &router.id);
                }
            }
            for floating_ip in state.floating_ips.values() {
                add(
                    &floating_ip.floating_network_id,
                    ResourceKind::FloatingIp,
                    &floating_ip.id,
                );
            }
        }
        ResourceKind::Subnet => {
            for port in state.ports.values() {
                for fixed_ip in &port.fixed_ips {
                    add(&fixed_ip.subnet_id, ResourceKind::Port, &port.id);
                }
            }
            for router in state.routers.values() {
                for interface in &router.interfaces {
                    add(&interface.subnet_id, ResourceKind::Router, &router.id);
                }
                for external in router
                    .external_gateway_info
                    .iter()
                    .flat_map(|gateway| &gateway.external_fixed_ips)
                {
                    add(&external.subnet_id, ResourceKind::Router, &router.id);
                }
            }
        }
        ResourceKind::Port => {
            for router in state.routers.values() {
                for port_id in router.interfaces.iter().filter_map(|i| i.port_id.as_ref()) {
                    add(port_id, ResourceKind::Router, &router.id);
                }
            }
            for floating_ip in state.floating_ips.values() {
                if let Some(port_id) = &floating_ip.port_id {
                    add(port_id, ResourceKind::FloatingIp, &floating_ip.id);
                }
            }
        }
        ResourceKind::SecurityGroup => {
            for port in state.ports.values() {
                for group_id in &port.security_group_ids {
                    add(group_id, ResourceKind::Port, &port.id);
                }
            }
            for group in state.security_groups.values() {
                for remote in group
                    .rules
                    .iter()
                    .filter_map(|r| r.remote_group_id.as_ref())
                {
                    // A group's rules naming the group itself do not keep it alive.
                    if *remote != group.id {
                        add(remote, ResourceKind::SecurityGroup, &group.id);
                    }
                }
            }
        }
        ResourceKind::QosPolicy => {
            for port in state.ports.values() {
                if let Some(policy_id) = &port.qos_policy_id {
                    add(policy_id, ResourceKind::Port, &port.id);
                }
            }
        }
        ResourceKind::Router => {
            for floating_ip in state.floating_ips.values() {
                if let Some(router_id) = &floating_ip.router_id {
                    add(router_id, ResourceKind::FloatingIp, &floating_ip.id);
                }
            }
        }
        ResourceKind::FloatingIp => {}
    }
    index
}

/// An upsert that would break a resource outside the request: reported on the upsert,
/// naming the resource it breaks.
fn depends_on(
    field: &str,
    kind: ResourceKind,
    id: &str,
    error: ValidationError,
) -> ValidationError {
    ValidationError::failed_precondition(
        field,
        format!(
            "{kind} {id} depends on it: {}: {}",
            error.field, error.message
        ),
    )
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

fn check_id(field: &str, id: &str) -> Checked {
    match id_problem(id) {
        Some(problem) => Err(ValidationError::invalid_argument(
            field,
            format!("id {id:?} {problem}"),
        )),
        None => Ok(()),
    }
}

/// Ports and pairs must name a unicast MAC: the datapath drops frames from group MACs.
fn check_unicast_mac(field: &str, mac: MacAddr) -> Checked {
    if mac.is_multicast() || mac.is_zero() {
        return Err(ValidationError::invalid_argument(
            field,
            format!("{mac} is not a unicast MAC address"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Checks of one resource's own values (INVALID_ARGUMENT whatever the state)
// ---------------------------------------------------------------------------------

fn check_network(network: &Network) -> Checked {
    if network.mtu != 0 && network.mtu < MIN_MTU {
        return Err(ValidationError::invalid_argument(
            "mtu",
            format!("mtu {} is below the minimum of {MIN_MTU}", network.mtu),
        ));
    }
    let Some(provider) = &network.provider else {
        return Ok(());
    };
    let kind = provider.network_type;
    let segment_range = match kind {
        NetworkType::Vlan => Some(1..=4094),
        NetworkType::Vxlan => Some(1..=16_777_215),
        NetworkType::Flat | NetworkType::Local => None,
    };
    match (segment_range, provider.segmentation_id) {
        (Some(range), Some(id)) if !range.contains(&id) => {
            return Err(ValidationError::invalid_argument(
                "provider.segmentation_id",
                format!(
                    "segmentation_id {id} is outside {}-{} for {kind}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        (Some(range), None) => {
            return Err(ValidationError::invalid_argument(
                "provider.segmentation_id",
                format!(
                    "{kind} needs a segmentation_id in {}-{}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        (None, Some(id)) => {
            return Err(ValidationError::invalid_argument(
                "provider.segmentation_id",
                format!("{kind} takes no segmentation_id, got {id}"),
            ));
        }
        _ => {}
    }
    let needs_physical = matches!(kind, NetworkType::Flat | NetworkType::Vlan);
    match (needs_physical, provider.physical_network.is_empty()) {
        (true, true) => Err(ValidationError::invalid_argument(
            "provider.physical_network",
            format!("{kind} needs a physical_network"),
        )),
        (false, false) => Err(ValidationError::invalid_argument(
            "provider.physical_network",
            format!(
                "{kind} takes no physical_network, got {:?}",
                provider.physical_network
            ),
        )),
        _ => Ok(()),
    }
}

fn check_version(field: &str, what: &str, addr: &IpAddr, version: IpVersion) -> Checked {
    let found = IpVersion::of(addr);
    if found != version {
        return Err(ValidationError::invalid_argument(
            field,
            format!("{what} {addr} is {found}, the subnet is {version}"),
        ));
    }
    Ok(())
}

fn check_inside_cidr(field: &str, what: &str, addr: &IpAddr, subnet: &Subnet) -> Checked {
    check_version(field, what, addr, subnet.ip_version)?;
    if !subnet.cidr.contains(addr) {
        return Err(ValidationError::invalid_argument(
            field,
            format!(
                "{what} {addr} is not inside the subnet's cidr {}",
                subnet.cidr
            ),
        ));
    }
    Ok(())
}

fn check_subnet(subnet: &Subnet) -> Checked {
    let cidr_version = IpVersion::of_net(&subnet.cidr);
    if cidr_version != subnet.ip_version {
        return Err(ValidationError::invalid_argument(
            "cidr",
            format!(
                "{} is an {cidr_version} prefix but ip_version is {}",
                subnet.cidr,
                subnet.ip_version.number()
            ),
        ));
    }
    if subnet.cidr.trunc() != subnet.cidr {
        return Err(ValidationError::invalid_argument(
            "cidr",
            format!(
                "{} has host bits set; the prefix is {}",
                subnet.cidr,
                subnet.cidr.trunc()
            ),
        ));
    }
    if let Some(gateway) = &subnet.gateway_ip {
        check_inside_cidr("gateway_ip", "gateway", gateway, subnet)?;
    }
    for (i, pool) in subnet.allocation_pools.iter().enumerate() {
        check_inside_cidr(
            &format!("allocation_pools[{i}].start"),
            "pool start",
            &pool.start,
            subnet,
        )?;
        check_inside_cidr(
            &format!("allocation_pools[{i}].end"),
            "pool end",
            &pool.end,
            subnet,
        )?;
        if pool.start > pool.end {
            return Err(ValidationError::invalid_argument(
                format!("allocation_pools[{i}]"),
                format!("pool start {} is after its end {}", pool.start, pool.end),
            ));
        }
    }
    for (i, server) in subnet.dns_nameservers.iter().enumerate() {
        check_version(
            &format!("dns_nameservers[{i}]"),
            "DNS server",
            server,
            subnet.ip_version,
        )?;
    }
    for (i, route) in subnet.host_routes.iter().enumerate() {
        check_version(
            &format!("host_routes[{i}].destination"),
            "destination",
            &route.destination.addr(),
            subnet.ip_version,
        )?;
        check_version(
            &format!("host_routes[{i}].nexthop"),
            "nexthop",
            &route.nexthop,
            subnet.ip_version,
        )?;
    }
    Ok(())
}

fn check_port(port: &Port) -> Checked {
    check_unicast_mac("mac_address", port.mac_address)?;
    let mut addresses = HashSet::with_capacity_and_hasher(port.fixed_ips.len(), Default::default());
    for (i, fixed_ip) in port.fixed_ips.iter().enumerate() {
        if !addresses.insert(fixed_ip.ip_address) {
            return Err(ValidationError::invalid_argument(
                format!("fixed_ips[{i}].ip_address"),
                format!("{} is listed twice", fixed_ip.ip_address),
            ));
        }
    }
    for (i, pair) in port.allowed_address_pairs.iter().enumerate() {
        if let AllowedAddressPair {
            mac_address: Some(mac),
            ..
        } = pair
        {
            check_unicast_mac(&format!("allowed_address_pairs[{i}].mac_address"), *mac)?;
        }
    }
    Ok(())
}

/// A fixed IP must lie in its subnet and, for IPv4 subnets with room for them, be
/// neither the network nor the broadcast address.
fn check_fixed_ip_address(i: usize, addr: IpAddr, subnet: &Subnet) -> Checked {
    let field = || format!("fixed_ips[{i}].ip_address");
    if !subnet.cidr.contains(&addr) {
        return Err(ValidationError::invalid_argument(
            field(),
            format!(
                "{addr} is not inside subnet {} ({})",
                subnet.id, subnet.cidr
            ),
        ));
    }
    // /31 and /32 have neither (RFC 3021).
    if let IpNet::V4(cidr) = subnet.cidr {
        if cidr.prefix_len() < 31 {
            let role = if addr == IpAddr::V4(cidr.network()) {
                Some("network")
            } else if addr == IpAddr::V4(cidr.broadcast()) {
                Some("broadcast")
            } else {
                None
            };
            if let Some(role) = role {
                return Err(ValidationError::invalid_argument(
                    field(),
                    format!(
                        "{addr} is the {role} address of subnet {} ({})",
                        subnet.id, subnet.cidr
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_fixed_ip_network(port: &Port, i: usize, subnet: &Subnet) -> Checked {
    if subnet.network_id != port.network_id {
        return Err(ValidationError::failed_precondition(
            format!("fixed_ips[{i}].subnet_id"),
            format!(
                "subnet {} belongs to network {}, not the port's network {}",
                subnet.id, subnet.network_id, port.network_id
            ),
        ));
    }
    Ok(())
}

/// Without port security a port has no policy, so security groups on it would do
/// nothing (Neutron refuses them too).
fn check_port_security(port: &Port, network: &Network) -> Checked {
    if port.security_group_ids.is_empty()
        || port
            .port_security_enabled
            .unwrap_or(network.port_security_enabled)
    {
        return Ok(());
    }
    let whose = match port.port_security_enabled {
        Some(_) => "the port".to_owned(),
        None => format!("its network {}", network.id),
    };
    Err(ValidationError::failed_precondition(
        "security_group_ids",
        format!(
            "port {} has port security disabled (by {whose}); security groups need it",
            port.id
        ),
    ))
}

/// A port's groups are all stateful or all stateless: one policy, tracked or not.
fn check_groups_agree(port: &Port, state: &State) -> Checked {
    let mut groups = port
        .security_group_ids
        .iter()
        .filter_map(|id| state.security_groups.get(id));
    let Some(first) = groups.next() else {
        return Ok(());
    };
    match groups.find(|group| group.stateful != first.stateful) {
        None => Ok(()),
        Some(other) => {
            let kind = |group: &SecurityGroup| {
                if group.stateful {
                    "stateful"
                } else {
                    "stateless"
                }
            };
            Err(ValidationError::failed_precondition(
                "security_group_ids",
                format!(
                    "security group {} is {} but {} is {}; the groups of port {} must be \
                     all stateful or all stateless",
                    first.id,
                    kind(first),
                    other.id,
                    kind(other),
                    port.id
                ),
            ))
        }
    }
}

fn check_security_group(group: &SecurityGroup) -> Checked {
    let mut ids = HashSet::with_capacity_and_hasher(group.rules.len(), Default::default());
    for (i, rule) in group.rules.iter().enumerate() {
        check_rule(rule).map_err(|e| e.under(&format!("rules[{i}]")))?;
        if !ids.insert(rule.id.as_str()) {
            return Err(ValidationError::invalid_argument(
                format!("rules[{i}].id"),
                format!("rule id {} is used twice in the group", rule.id),
            ));
        }
    }
    Ok(())
}

fn check_rule(rule: &SecurityGroupRule) -> Checked {
    check_id("id", &rule.id)?;
    let protocol = rule.protocol;
    let version = rule.ethertype.ip_version();
    if protocol == Protocol::IPV6_ICMP && version == IpVersion::V4 {
        return Err(ValidationError::invalid_argument(
            "protocol",
            format!("{protocol} needs ethertype IPv6"),
        ));
    }
    let (min, max) = (rule.port_range_min, rule.port_range_max);
    if protocol.has_ports() {
        for (field, port) in [("port_range_min", min), ("port_range_max", max)] {
            if let Some(port) = port.filter(|&port| port > 65535) {
                return Err(ValidationError::invalid_argument(
                    field,
                    format!("port {port} is above 65535"),
                ));
            }
        }
        if let (Some(min), Some(max)) = (min, max) {
            if min > max {
                return Err(ValidationError::invalid_argument(
                    "port_range_min",
                    format!("port_range_min {min} is above port_range_max {max}"),
                ));
            }
        }
    } else if protocol.is_icmp() {
        for (field, what, value) in [
            ("port_range_min", "type", min),
            ("port_range_max", "code", max),
        ] {
            if let Some(value) = value.filter(|&value| value > 255) {
                return Err(ValidationError::invalid_argument(
                    field,
                    format!("ICMP {what} {value} is above 255"),
                ));
            }
        }
        if min.is_none() && max.is_some() {
            return Err(ValidationError::invalid_argument(
                "port_range_max",
                "an ICMP code (port_range_max) needs an ICMP type (port_range_min)",
            ));
        }
    } else {
        for (field, value) in [("port_range_min", min), ("port_range_max", max)] {
            if let Some(value) = value {
                return Err(ValidationError::invalid_argument(
                    field,
                    format!("protocol {protocol} has no ports, got {value}"),
                ));
            }
        }
    }
    if let Some(prefix) = &rule.remote_ip_prefix {
        let found = IpVersion::of_net(prefix);
        if found != version {
            return Err(ValidationError::invalid_argument(
                "remote_ip_prefix",
                format!("{prefix} is {found} but the rule's ethertype is {version}"),
            ));
        }
        if rule.remote_group_id.is_some() {
            return Err(ValidationError::invalid_argument(
                "remote_group_id",
                "remote_group_id and remote_ip_prefix are mutually exclusive",
            ));
        }
    }
    Ok(())
}

fn check_router(router: &Router) -> Checked {
    let mut attached =
        HashMap::with_capacity_and_hasher(router.interfaces.len(), Default::default());
    for (i, interface) in router.interfaces.iter().enumerate() {
        if let Some(first) = attached.insert(interface.subnet_id.as_str(), i) {
            return Err(ValidationError::invalid_argument(
                format!("interfaces[{i}].subnet_id"),
                format!(
                    "subnet {} is already attached by interfaces[{first}]",
                    interface.subnet_id
                ),
            ));
        }
    }
    for (i, route) in router.routes.iter().enumerate() {
        let destination = IpVersion::of_net(&route.destination);
        let nexthop = IpVersion::of(&route.nexthop);
        if destination != nexthop {
            return Err(ValidationError::invalid_argument(
                format!("routes[{i}].nexthop"),
                format!(
                    "nexthop {} is {nexthop} but destination {} is {destination}",
                    route.nexthop, route.destination
                ),
            ));
        }
    }
    Ok(())
}

fn check_interface_network(i: usize, subnet: &Subnet, network: &Network) -> Checked {
    if network.router_external {
        return Err(ValidationError::failed_precondition(
            format!("interfaces[{i}].subnet_id"),
            format!(
                "subnet {} is on external network {}; attach it as the gateway instead",
                subnet.id, network.id
            ),
        ));
    }
    Ok(())
}

fn check_gateway_network(network: &Network) -> Checked {
    if !network.router_external {
        return Err(ValidationError::failed_precondition(
            "external_gateway_info.network_id",
            format!("network {} is not router_external", network.id),
        ));
    }
    Ok(())
}

fn check_external_subnet(gateway_network_id: &str, i: usize, subnet: &Subnet) -> Checked {
    if subnet.network_id != gateway_network_id {
        return Err(ValidationError::failed_precondition(
            format!("external_gateway_info.external_fixed_ips[{i}].subnet_id"),
            format!(
                "subnet {} belongs to network {}, not the gateway network {gateway_network_id}",
                subnet.id, subnet.network_id
            ),
        ));
    }
    Ok(())
}

fn check_external_address(i: usize, addr: IpAddr, subnet: &Subnet) -> Checked {
    if !subnet.cidr.contains(&addr) {
        return Err(ValidationError::invalid_argument(
            format!("external_gateway_info.external_fixed_ips[{i}].ip_address"),
            format!(
                "{addr} is not inside subnet {} ({})",
                subnet.id, subnet.cidr
            ),
        ));
    }
    Ok(())
}

fn check_floating_ip(floating_ip: &FloatingIp) -> Checked {
    if let (Some(fixed), None) = (&floating_ip.fixed_ip_address, &floating_ip.port_id) {
        return Err(ValidationError::invalid_argument(
            "fixed_ip_address",
            format!("fixed_ip_address {fixed} needs a port_id"),
        ));
    }
    Ok(())
}

fn check_floating_network(floating_ip: &FloatingIp, network: &Network) -> Checked {
    if !network.router_external {
        return Err(ValidationError::failed_precondition(
            "floating_network_id",
            format!(
                "network {} of floating IP {} is not router_external",
                network.id, floating_ip.id
            ),
        ));
    }
    Ok(())
}

fn check_floating_fixed_ip(floating_ip: &FloatingIp, port: &Port) -> Checked {
    let Some(fixed) = floating_ip.fixed_ip_address else {
        return Ok(());
    };
    if !port.fixed_ips.iter().any(|f| f.ip_address == fixed) {
        return Err(ValidationError::failed_precondition(
            "fixed_ip_address",
            format!("{fixed} is not a fixed IP of port {}", port.id),
        ));
    }
    Ok(())
}

fn check_qos_policy(policy: &QosPolicy) -> Checked {
    let mut rule_ids = HashSet::default();
    let mut directions = HashMap::default();
    for (i, rule) in policy.bandwidth_limit_rules.iter().enumerate() {
        let field = |name: &str| format!("bandwidth_limit_rules[{i}].{name}");
        check_id(&field("id"), &rule.id)?;
        if !rule_ids.insert(rule.id.as_str()) {
            return Err(ValidationError::invalid_argument(
                field("id"),
                format!("rule id {} is used twice in the policy", rule.id),
            ));
        }
        if rule.max_kbps == 0 {
            return Err(ValidationError::invalid_argument(
                field("max_kbps"),
                "max_kbps must be above 0",
            ));
        }
        if let Some(first) = directions.insert(rule.direction, i) {
            return Err(ValidationError::invalid_argument(
                field("direction"),
                format!(
                    "bandwidth_limit_rules[{first}] already limits {}",
                    rule.direction
                ),
            ));
        }
    }
    for (i, rule) in policy.dscp_marking_rules.iter().enumerate() {
        let field = |name: &str| format!("dscp_marking_rules[{i}].{name}");
        check_id(&field("id"), &rule.id)?;
        if !rule_ids.insert(rule.id.as_str()) {
            return Err(ValidationError::invalid_argument(
                field("id"),
                format!("rule id {} is used twice in the policy", rule.id),
            ));
        }
        if !VALID_DSCP_MARKS.contains(&rule.dscp_mark) {
            return Err(ValidationError::invalid_argument(
                field("dscp_mark"),
                format!("{} is not a valid DSCP mark", rule.dscp_mark),
            ));
        }
        if i > 0 {
            return Err(ValidationError::invalid_argument(
                format!("dscp_marking_rules[{i}]"),
                "a policy has at most one DSCP marking rule",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
