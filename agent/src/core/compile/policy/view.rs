//! What a port's compiled policy amounts to, for operators (`ctl policy`): read from
//! the compiled tables and the state they were compiled from, never recomputed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dataplane_abi::{port_flags, PORT_ADDR_FIXED_BITS};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rustc_hash::FxHashSet;

use super::{remote_members, Prefix};
use crate::core::{
    compile::Compiled,
    model::{IpVersion, MacAddr, SecurityGroupRule, State},
};

/// The policy programmed for one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPolicyView {
    pub port_id: String,
    /// Port security (source checks and security groups) applies.
    pub port_security: bool,
    /// The port's groups, sorted; they apply only with port security.
    pub security_group_ids: Vec<String>,
    /// Connections are tracked: replies pass without a rule.
    pub stateful: bool,
    /// `PortInfo::policy_id` and `policy_revision`; 0 without a policy.
    pub policy_id: u32,
    pub policy_revision: u32,
    /// The rules of the groups, group by group, when the policy applies.
    pub rules: Vec<RuleView>,
    /// The (source MAC, source prefix) pairs port security lets the VM send from.
    pub allowed_addresses: Vec<(MacAddr, IpNet)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleView {
    pub security_group_id: String,
    pub rule: SecurityGroupRule,
    /// `None`: not programmed (no free rule slot on this node).
    pub slot: Option<u32>,
    /// For a remote group: the addresses of its ports (of the rule's family), which
    /// the rule's remote stands for.
    pub remote_members: Vec<IpNet>,
}

/// The policy of `port_id` as `compiled` from `state`; `None` if the port is not
/// programmed on this node.
pub fn port_policy(state: &State, compiled: &Compiled, port_id: &str) -> Option<PortPolicyView> {
    let programmed = compiled.ports.iter().find(|port| port.port_id == port_id)?;
    let info = compiled.tables.ports.get(&programmed.ifindex)?;
    let port = state.ports.get(port_id)?;
    let mut security_group_ids = port.security_group_ids.clone();
    security_group_ids.sort_unstable();
    security_group_ids.dedup();

    let mut rules = Vec::new();
    if info.flags & port_flags::POLICY != 0 {
        let groups: Vec<_> = security_group_ids
            .iter()
            .filter_map(|id| state.security_groups.get(id))
            .collect();
        let wanted: FxHashSet<&str> = groups
            .iter()
            .flat_map(|group| &group.rules)
            .filter_map(|rule| rule.remote_group_id.as_deref())
            .collect();
        let members = remote_members(state, &wanted);
        for group in groups {
            for rule in &group.rules {
                let version = rule.ethertype.ip_version();
                let remote_members = rule
                    .remote_group_id
                    .as_deref()
                    .and_then(|id| members.get(id))
                    .map(|members| {
                        members
                            .of(version)
                            .iter()
                            .map(|prefix| prefix.net(version))
                            .collect()
                    })
                    .unwrap_or_default();
                rules.push(RuleView {
                    security_group_id: group.id.clone(),
                    rule: rule.clone(),
                    slot: compiled.rules.get(&rule.id).copied(),
                    remote_members,
                });
            }
        }
    }

    // Exact addresses, then the shorter prefixes of allowed address pairs.
    let slot = info.port_slot;
    let tables = &compiled.tables;
    let mut allowed_addresses = Vec::new();
    let mut allow = |mac: [u8; 6], addr: IpAddr, len: u32| {
        if let Ok(net) = IpNet::new(addr, len as u8) {
            allowed_addresses.push((MacAddr(mac), net));
        }
    };
    for key in tables.port_ip4.iter().filter(|key| key.port_slot == slot) {
        allow(key.mac, Ipv4Addr::from(key.addr).into(), 32);
    }
    for (len, key) in tables
        .port_net4
        .iter()
        .filter(|(_, key)| key.port_slot == slot)
    {
        allow(
            key.mac,
            Ipv4Addr::from(key.addr).into(),
            len - PORT_ADDR_FIXED_BITS,
        );
    }
    for key in tables.port_ip6.iter().filter(|key| key.port_slot == slot) {
        allow(key.mac, Ipv6Addr::from(key.addr).into(), 128);
    }
    for (len, key) in tables
        .port_net6
        .iter()
        .filter(|(_, key)| key.port_slot == slot)
    {
        allow(
            key.mac,
            Ipv6Addr::from(key.addr).into(),
            len - PORT_ADDR_FIXED_BITS,
        );
    }

    Some(PortPolicyView {
        port_id: port_id.to_owned(),
        port_security: info.flags & port_flags::PORT_SECURITY != 0,
        security_group_ids,
        stateful: info.flags & port_flags::STATEFUL != 0,
        policy_id: info.policy_id,
        policy_revision: info.policy_revision,
        rules,
        allowed_addresses,
    })
}

impl Prefix {
    fn net(self, version: IpVersion) -> IpNet {
        match version {
            IpVersion::V4 => Ipv4Net::new((self.addr as u32).into(), self.len)
                .expect("a member prefix is at most 32 bits long")
                .into(),
            IpVersion::V6 => Ipv6Net::new(self.addr.into(), self.len)
                .expect("a member prefix is at most 128 bits long")
                .into(),
        }
    }
}
