//! Proto ⇄ core conversion.
//!
//! From proto, every value is parsed into its type; what does not parse is refused with
//! an INVALID_ARGUMENT [`ValidationError`] whose `field` is the path inside the request
//! list item (`upsert.port.mac_address` for Apply, `port.mac_address` for Sync), and
//! whose `index` is the item's position. To proto is lossless: converting back gives the
//! same core value. Host addresses of allowed address pairs are written without a prefix
//! length and protocol numbers with a name are written as the name, so proto text that
//! was already in that form comes back unchanged.

use std::net::IpAddr;

use dataplane_abi::DropReason;
use dataplane_proto::v1 as pb;
use ipnet::IpNet;

use crate::{
    core::{
        compile::{PortPolicyView, ResourceStatus, RuleView, StatusKind},
        model::{
            id_problem, AllocationPool, AllowedAddressPair, BandwidthLimitRule, Change, Direction,
            DscpMarkingRule, EtherType, ExternalFixedIp, ExternalGatewayInfo, FixedIp, FloatingIp,
            HostRoute, IpVersion, MacAddr, Network, NetworkType, Port, PortBinding, Protocol,
            ProtocolParseError, ProviderNetwork, QosDirection, QosPolicy, Resource, ResourceKind,
            ResourceRef, Route, Router, RouterInterface, SecurityGroup, SecurityGroupRule, Subnet,
        },
        trace::{
            self, Ingress, Network as TraceNetwork, Probe, Trace, Transport,
            Verdict as TraceVerdict,
        },
        validate::ValidationError,
    },
    kernel::monitor::{Hook, MonitorFilter, PacketEvent, Verdict},
};

type Converted<T> = Result<T, ValidationError>;

/// Apply's changes; errors carry the change's index.
pub fn changes_from_proto(changes: Vec<pb::Change>) -> Converted<Vec<Change>> {
    changes
        .into_iter()
        .enumerate()
        .map(|(index, change)| Change::try_from(change).map_err(|e| e.at(index)))
        .collect()
}

/// Sync's resources; errors carry the resource's index.
pub fn resources_from_proto(resources: Vec<pb::Resource>) -> Converted<Vec<Resource>> {
    resources
        .into_iter()
        .enumerate()
        .map(|(index, resource)| Resource::try_from(resource).map_err(|e| e.at(index)))
        .collect()
}

pub fn status_to_proto(reference: &ResourceRef, status: &ResourceStatus) -> pb::ResourceStatus {
    pb::ResourceStatus {
        r#ref: Some(reference.into()),
        status: pb::Status::from(status.status) as i32,
        reason: status.reason.clone(),
        revision_number: status.revision_number,
    }
}

pub fn drop_reason_to_proto(reason: DropReason) -> pb::DropReason {
    // Exhaustive on purpose: a new reason in the ABI does not compile until it is here.
    match reason {
        DropReason::MalformedEthernet => pb::DropReason::MalformedEthernet,
        DropReason::MalformedArp => pb::DropReason::MalformedArp,
        DropReason::MalformedIpv4 => pb::DropReason::MalformedIpv4,
        DropReason::MalformedIpv6 => pb::DropReason::MalformedIpv6,
        DropReason::MalformedL4 => pb::DropReason::MalformedL4,
        DropReason::UnknownPort => pb::DropReason::UnknownPort,
        DropReason::PortAdminDown => pb::DropReason::PortAdminDown,
        DropReason::SourceMacSpoofed => pb::DropReason::SourceMacSpoofed,
        DropReason::SourceIpSpoofed => pb::DropReason::SourceIpSpoofed,
        DropReason::ArpSpoofed => pb::DropReason::ArpSpoofed,
        DropReason::NdSpoofed => pb::DropReason::NdSpoofed,
        DropReason::RouterAdvertisementFromPort => pb::DropReason::RouterAdvertisementFromPort,
        DropReason::DhcpServerFromPort => pb::DropReason::DhcpServerFromPort,
        DropReason::EthertypeNotAllowed => pb::DropReason::EthertypeNotAllowed,
        DropReason::UnknownDestination => pb::DropReason::UnknownDestination,
        DropReason::NotFromDatapath => pb::DropReason::NotFromDatapath,
        DropReason::RedirectFailed => pb::DropReason::RedirectFailed,
        DropReason::NoFloodTarget => pb::DropReason::NoFloodTarget,
        DropReason::PolicyDenied => pb::DropReason::PolicyDenied,
        DropReason::ConnectionRevoked => pb::DropReason::ConnectionRevoked,
        DropReason::CtInvalid => pb::DropReason::CtInvalid,
        DropReason::CtTableFull => pb::DropReason::CtTableFull,
        DropReason::NoRoute => pb::DropReason::NoRoute,
        DropReason::NoNeighbor => pb::DropReason::NoNeighbor,
        DropReason::TtlExceeded => pb::DropReason::TtlExceeded,
        DropReason::NatPortsExhausted => pb::DropReason::NatPortsExhausted,
        DropReason::NoNatBinding => pb::DropReason::NoNatBinding,
        DropReason::NatUnsupported => pb::DropReason::NatUnsupported,
        DropReason::StageUnavailable => pb::DropReason::StageUnavailable,
    }
}

// ---------------------------------------------------------------------------------
// Field parsers: `field` is relative to the message being converted.
// ---------------------------------------------------------------------------------

fn invalid(field: &str, message: impl Into<String>) -> ValidationError {
    ValidationError::invalid_argument(field, message)
}

fn id(field: &str, value: String) -> Converted<String> {
    match id_problem(&value) {
        Some(problem) => Err(invalid(field, format!("id {value:?} {problem}"))),
        None => Ok(value),
    }
}

/// Empty: no reference.
fn optional_id(field: &str, value: String) -> Converted<Option<String>> {
    if value.is_empty() {
        Ok(None)
    } else {
        id(field, value).map(Some)
    }
}

fn ip(field: &str, value: &str) -> Converted<IpAddr> {
    value
        .parse()
        .map_err(|_| invalid(field, format!("{value:?} is not an IP address")))
}

/// Empty: none.
fn optional_ip(field: &str, value: &str) -> Converted<Option<IpAddr>> {
    if value.is_empty() {
        Ok(None)
    } else {
        ip(field, value).map(Some)
    }
}

/// A network prefix: host bits must be clear, as the Networking API requires of a
/// subnet's cidr and of route destinations.
fn cidr(field: &str, value: &str) -> Converted<IpNet> {
    let net: IpNet = value
        .parse()
        .map_err(|_| invalid(field, format!("{value:?} is not a CIDR")))?;
    if net.trunc() != net {
        return Err(invalid(
            field,
            format!("{value} has host bits set; the prefix is {}", net.trunc()),
        ));
    }
    Ok(net)
}

/// An address (held as /32 or /128) or a prefix, normalised to the prefix: allowed
/// address pairs and remote_ip_prefix accept `10.0.0.5/24` as `10.0.0.0/24`.
fn address_or_prefix(field: &str, value: &str) -> Converted<IpNet> {
    if let Ok(net) = value.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    value.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        invalid(
            field,
            format!("{value:?} is neither an IP address nor a CIDR"),
        )
    })
}

fn optional_address_or_prefix(field: &str, value: &str) -> Converted<Option<IpNet>> {
    if value.is_empty() {
        Ok(None)
    } else {
        address_or_prefix(field, value).map(Some)
    }
}

/// Port and pair MACs: a frame from a group or all-zero MAC is never a VM's own.
fn unicast_mac(field: &str, value: &str) -> Converted<MacAddr> {
    let mac: MacAddr = value
        .parse()
        .map_err(|e| invalid(field, format!("{value:?} is not a MAC address: {e}")))?;
    if mac.is_multicast() || mac.is_zero() {
        return Err(invalid(
            field,
            format!("{mac} is not a unicast MAC address"),
        ));
    }
    Ok(mac)
}

fn optional_unicast_mac(field: &str, value: &str) -> Converted<Option<MacAddr>> {
    if value.is_empty() {
        Ok(None)
    } else {
        unicast_mac(field, value).map(Some)
    }
}

/// Converts each item of a repeated field; errors name the item (`name[i].…`).
fn each<T, U>(items: Vec<T>, name: &str, convert: impl Fn(T) -> Converted<U>) -> Converted<Vec<U>> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| convert(item).map_err(|e| e.under(&format!("{name}[{i}]"))))
        .collect()
}

/// A proto enum field: unknown values and UNSPECIFIED are refused.
fn known<E: TryFrom<i32>>(field: &str, value: i32, type_name: &str) -> Converted<E> {
    E::try_from(value).map_err(|_| invalid(field, format!("{value} is not a {type_name} value")))
}

fn unspecified(field: &str) -> ValidationError {
    invalid(field, "must be set (not UNSPECIFIED)")
}

fn ip_net_to_string(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn optional_to_string<T: ToString>(value: &Option<T>) -> String {
    value.as_ref().map(ToString::to_string).unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// Enums
// ---------------------------------------------------------------------------------

fn network_type(value: i32) -> Converted<NetworkType> {
    match known("network_type", value, "NetworkType")? {
        pb::NetworkType::Unspecified => Err(unspecified("network_type")),
        pb::NetworkType::Flat => Ok(NetworkType::Flat),
        pb::NetworkType::Vlan => Ok(NetworkType::Vlan),
        pb::NetworkType::Vxlan => Ok(NetworkType::Vxlan),
        pb::NetworkType::Local => Ok(NetworkType::Local),
    }
}

impl From<NetworkType> for pb::NetworkType {
    fn from(value: NetworkType) -> Self {
        match value {
            NetworkType::Flat => pb::NetworkType::Flat,
            NetworkType::Vlan => pb::NetworkType::Vlan,
            NetworkType::Vxlan => pb::NetworkType::Vxlan,
            NetworkType::Local => pb::NetworkType::Local,
        }
    }
}

fn direction(value: i32) -> Converted<Direction> {
    match known("direction", value, "Direction")? {
        pb::Direction::Unspecified => Err(unspecified("direction")),
        pb::Direction::Ingress => Ok(Direction::Ingress),
        pb::Direction::Egress => Ok(Direction::Egress),
    }
}

impl From<Direction> for pb::Direction {
    fn from(value: Direction) -> Self {
        match value {
            Direction::Ingress => pb::Direction::Ingress,
            Direction::Egress => pb::Direction::Egress,
        }
    }
}

fn ether_type(value: i32) -> Converted<EtherType> {
    match known("ethertype", value, "EtherType")? {
        pb::EtherType::Unspecified => Err(unspecified("ethertype")),
        pb::EtherType::Ipv4 => Ok(EtherType::Ipv4),
        pb::EtherType::Ipv6 => Ok(EtherType::Ipv6),
    }
}

impl From<EtherType> for pb::EtherType {
    fn from(value: EtherType) -> Self {
        match value {
            EtherType::Ipv4 => pb::EtherType::Ipv4,
            EtherType::Ipv6 => pb::EtherType::Ipv6,
        }
    }
}

fn qos_direction(value: i32) -> Converted<QosDirection> {
    match known("direction", value, "QosDirection")? {
        pb::QosDirection::Unspecified => Err(unspecified("direction")),
        pb::QosDirection::Egress => Ok(QosDirection::Egress),
        pb::QosDirection::Ingress => Ok(QosDirection::Ingress),
    }
}

impl From<QosDirection> for pb::QosDirection {
    fn from(value: QosDirection) -> Self {
        match value {
            QosDirection::Egress => pb::QosDirection::Egress,
            QosDirection::Ingress => pb::QosDirection::Ingress,
        }
    }
}

fn resource_kind(value: i32) -> Converted<ResourceKind> {
    match known("kind", value, "ResourceKind")? {
        pb::ResourceKind::Unspecified => Err(unspecified("kind")),
        pb::ResourceKind::Network => Ok(ResourceKind::Network),
        pb::ResourceKind::Subnet => Ok(ResourceKind::Subnet),
        pb::ResourceKind::Port => Ok(ResourceKind::Port),
        pb::ResourceKind::SecurityGroup => Ok(ResourceKind::SecurityGroup),
        pb::ResourceKind::Router => Ok(ResourceKind::Router),
        pb::ResourceKind::FloatingIp => Ok(ResourceKind::FloatingIp),
        pb::ResourceKind::QosPolicy => Ok(ResourceKind::QosPolicy),
    }
}

impl From<ResourceKind> for pb::ResourceKind {
    fn from(value: ResourceKind) -> Self {
        match value {
            ResourceKind::Network => pb::ResourceKind::Network,
            ResourceKind::Subnet => pb::ResourceKind::Subnet,
            ResourceKind::Port => pb::ResourceKind::Port,
            ResourceKind::SecurityGroup => pb::ResourceKind::SecurityGroup,
            ResourceKind::Router => pb::ResourceKind::Router,
            ResourceKind::FloatingIp => pb::ResourceKind::FloatingIp,
            ResourceKind::QosPolicy => pb::ResourceKind::QosPolicy,
        }
    }
}

impl From<StatusKind> for pb::Status {
    fn from(value: StatusKind) -> Self {
        match value {
            StatusKind::Active => pb::Status::Active,
            StatusKind::Down => pb::Status::Down,
            StatusKind::Build => pb::Status::Build,
            StatusKind::Error => pb::Status::Error,
        }
    }
}

// ---------------------------------------------------------------------------------
// Networks and subnets
// ---------------------------------------------------------------------------------

impl TryFrom<pb::ProviderNetwork> for ProviderNetwork {
    type Error = ValidationError;

    fn try_from(provider: pb::ProviderNetwork) -> Converted<Self> {
        Ok(ProviderNetwork {
            network_type: network_type(provider.network_type)?,
            physical_network: provider.physical_network,
            segmentation_id: provider.segmentation_id,
        })
    }
}

impl From<&ProviderNetwork> for pb::ProviderNetwork {
    fn from(provider: &ProviderNetwork) -> Self {
        pb::ProviderNetwork {
            network_type: pb::NetworkType::from(provider.network_type) as i32,
            physical_network: provider.physical_network.clone(),
            segmentation_id: provider.segmentation_id,
        }
    }
}

impl TryFrom<pb::Network> for Network {
    type Error = ValidationError;

    fn try_from(network: pb::Network) -> Converted<Self> {
        Ok(Network {
            id: id("id", network.id)?,
            name: network.name,
            project_id: network.project_id,
            admin_state_up: network.admin_state_up,
            shared: network.shared,
            router_external: network.router_external,
            mtu: network.mtu,
            provider: network
                .provider
                .map(ProviderNetwork::try_from)
                .transpose()
                .map_err(|e| e.under("provider"))?,
            port_security_enabled: network.port_security_enabled,
            revision_number: network.revision_number,
        })
    }
}

impl From<&Network> for pb::Network {
    fn from(network: &Network) -> Self {
        pb::Network {
            id: network.id.clone(),
            name: network.name.clone(),
            project_id: network.project_id.clone(),
            admin_state_up: network.admin_state_up,
            shared: network.shared,
            router_external: network.router_external,
            mtu: network.mtu,
            provider: network.provider.as_ref().map(Into::into),
            port_security_enabled: network.port_security_enabled,
            revision_number: network.revision_number,
        }
    }
}

impl TryFrom<pb::Subnet> for Subnet {
    type Error = ValidationError;

    fn try_from(subnet: pb::Subnet) -> Converted<Self> {
        let ip_version = match subnet.ip_version {
            4 => IpVersion::V4,
            6 => IpVersion::V6,
            other => return Err(invalid("ip_version", format!("{other} is not 4 or 6"))),
        };
        Ok(Subnet {
            id: id("id", subnet.id)?,
            network_id: id("network_id", subnet.network_id)?,
            ip_version,
            cidr: cidr("cidr", &subnet.cidr)?,
            gateway_ip: optional_ip("gateway_ip", &subnet.gateway_ip)?,
            allocation_pools: each(subnet.allocation_pools, "allocation_pools", |pool| {
                Ok(AllocationPool {
                    start: ip("start", &pool.start)?,
                    end: ip("end", &pool.end)?,
                })
            })?,
            dns_nameservers: each(subnet.dns_nameservers, "dns_nameservers", |server| {
                ip("", &server)
            })?,
            host_routes: each(subnet.host_routes, "host_routes", |route| {
                Ok(HostRoute {
                    destination: cidr("destination", &route.destination)?,
                    nexthop: ip("nexthop", &route.nexthop)?,
                })
            })?,
            enable_dhcp: subnet.enable_dhcp,
            name: subnet.name,
            project_id: subnet.project_id,
            revision_number: subnet.revision_number,
        })
    }
}

impl From<&Subnet> for pb::Subnet {
    fn from(subnet: &Subnet) -> Self {
        pb::Subnet {
            id: subnet.id.clone(),
            network_id: subnet.network_id.clone(),
            ip_version: subnet.ip_version.number(),
            cidr: subnet.cidr.to_string(),
            gateway_ip: optional_to_string(&subnet.gateway_ip),
            allocation_pools: subnet
                .allocation_pools
                .iter()
                .map(|pool| pb::AllocationPool {
                    start: pool.start.to_string(),
                    end: pool.end.to_string(),
                })
                .collect(),
            dns_nameservers: subnet
                .dns_nameservers
                .iter()
                .map(ToString::to_string)
                .collect(),
            host_routes: subnet
                .host_routes
                .iter()
                .map(|route| pb::HostRoute {
                    destination: route.destination.to_string(),
                    nexthop: route.nexthop.to_string(),
                })
                .collect(),
            enable_dhcp: subnet.enable_dhcp,
            name: subnet.name.clone(),
            project_id: subnet.project_id.clone(),
            revision_number: subnet.revision_number,
        }
    }
}

// ---------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------

impl TryFrom<pb::Port> for Port {
    type Error = ValidationError;

    fn try_from(port: pb::Port) -> Converted<Self> {
        let binding = port.binding.unwrap_or_default();
        Ok(Port {
            id: id("id", port.id)?,
            network_id: id("network_id", port.network_id)?,
            mac_address: unicast_mac("mac_address", &port.mac_address)?,
            fixed_ips: each(port.fixed_ips, "fixed_ips", |fixed_ip| {
                Ok(FixedIp {
                    subnet_id: id("subnet_id", fixed_ip.subnet_id)?,
                    ip_address: ip("ip_address", &fixed_ip.ip_address)?,
                })
            })?,
            allowed_address_pairs: each(
                port.allowed_address_pairs,
                "allowed_address_pairs",
                |pair| {
                    Ok(AllowedAddressPair {
                        ip_address: address_or_prefix("ip_address", &pair.ip_address)?,
                        mac_address: optional_unicast_mac("mac_address", &pair.mac_address)?,
                    })
                },
            )?,
            security_group_ids: each(port.security_group_ids, "security_group_ids", |group| {
                id("", group)
            })?,
            port_security_enabled: port.port_security_enabled,
            admin_state_up: port.admin_state_up,
            device_owner: port.device_owner,
            device_id: port.device_id,
            qos_policy_id: optional_id("qos_policy_id", port.qos_policy_id)?,
            binding: PortBinding {
                host: binding.host,
                interface_name: binding.interface_name,
            },
            name: port.name,
            project_id: port.project_id,
            revision_number: port.revision_number,
        })
    }
}

impl From<&Port> for pb::Port {
    fn from(port: &Port) -> Self {
        let binding = &port.binding;
        pb::Port {
            id: port.id.clone(),
            network_id: port.network_id.clone(),
            mac_address: port.mac_address.to_string(),
            fixed_ips: port
                .fixed_ips
                .iter()
                .map(|fixed_ip| pb::FixedIp {
                    subnet_id: fixed_ip.subnet_id.clone(),
                    ip_address: fixed_ip.ip_address.to_string(),
                })
                .collect(),
            allowed_address_pairs: port
                .allowed_address_pairs
                .iter()
                .map(|pair| pb::AllowedAddressPair {
                    ip_address: ip_net_to_string(&pair.ip_address),
                    mac_address: optional_to_string(&pair.mac_address),
                })
                .collect(),
            security_group_ids: port.security_group_ids.clone(),
            port_security_enabled: port.port_security_enabled,
            admin_state_up: port.admin_state_up,
            device_owner: port.device_owner.clone(),
            device_id: port.device_id.clone(),
            qos_policy_id: port.qos_policy_id.clone().unwrap_or_default(),
            // An unbound port has no binding message, as it came.
            binding: (*binding != PortBinding::default()).then(|| pb::PortBinding {
                host: binding.host.clone(),
                interface_name: binding.interface_name.clone(),
            }),
            name: port.name.clone(),
            project_id: port.project_id.clone(),
            revision_number: port.revision_number,
        }
    }
}

// ---------------------------------------------------------------------------------
// Security groups
// ---------------------------------------------------------------------------------

impl TryFrom<pb::SecurityGroupRule> for SecurityGroupRule {
    type Error = ValidationError;

    fn try_from(rule: pb::SecurityGroupRule) -> Converted<Self> {
        Ok(SecurityGroupRule {
            id: id("id", rule.id)?,
            direction: direction(rule.direction)?,
            ethertype: ether_type(rule.ethertype)?,
            protocol: rule
                .protocol
                .parse()
                .map_err(|e: ProtocolParseError| invalid("protocol", e.to_string()))?,
            port_range_min: rule.port_range_min,
            port_range_max: rule.port_range_max,
            remote_ip_prefix: optional_address_or_prefix(
                "remote_ip_prefix",
                &rule.remote_ip_prefix,
            )?,
            remote_group_id: optional_id("remote_group_id", rule.remote_group_id)?,
            revision_number: rule.revision_number,
        })
    }
}

fn protocol_to_string(protocol: Protocol) -> String {
    match protocol {
        Protocol::Any => String::new(),
        Protocol::Number(_) => protocol.to_string(),
    }
}

impl From<&SecurityGroupRule> for pb::SecurityGroupRule {
    fn from(rule: &SecurityGroupRule) -> Self {
        pb::SecurityGroupRule {
            id: rule.id.clone(),
            direction: pb::Direction::from(rule.direction) as i32,
            ethertype: pb::EtherType::from(rule.ethertype) as i32,
            protocol: protocol_to_string(rule.protocol),
            port_range_min: rule.port_range_min,
            port_range_max: rule.port_range_max,
            // The Networking API shows remote prefixes with their length, /32 included.
            remote_ip_prefix: optional_to_string(&rule.remote_ip_prefix),
            remote_group_id: rule.remote_group_id.clone().unwrap_or_default(),
            revision_number: rule.revision_number,
        }
    }
}

impl TryFrom<pb::SecurityGroup> for SecurityGroup {
    type Error = ValidationError;

    fn try_from(group: pb::SecurityGroup) -> Converted<Self> {
        Ok(SecurityGroup {
            id: id("id", group.id)?,
            project_id: group.project_id,
            name: group.name,
            stateful: group.stateful,
            rules: each(group.rules, "rules", SecurityGroupRule::try_from)?,
            revision_number: group.revision_number,
        })
    }
}

impl From<&SecurityGroup> for pb::SecurityGroup {
    fn from(group: &SecurityGroup) -> Self {
        pb::SecurityGroup {
            id: group.id.clone(),
            project_id: group.project_id.clone(),
            name: group.name.clone(),
            stateful: group.stateful,
            rules: group.rules.iter().map(Into::into).collect(),
            revision_number: group.revision_number,
        }
    }
}

// ---------------------------------------------------------------------------------
// Routers and floating IPs
// ---------------------------------------------------------------------------------

impl TryFrom<pb::ExternalGatewayInfo> for ExternalGatewayInfo {
    type Error = ValidationError;

    fn try_from(gateway: pb::ExternalGatewayInfo) -> Converted<Self> {
        Ok(ExternalGatewayInfo {
            network_id: id("network_id", gateway.network_id)?,
            enable_snat: gateway.enable_snat,
            external_fixed_ips: each(
                gateway.external_fixed_ips,
                "external_fixed_ips",
                |external| {
                    Ok(ExternalFixedIp {
                        subnet_id: id("subnet_id", external.subnet_id)?,
                        ip_address: ip("ip_address", &external.ip_address)?,
                    })
                },
            )?,
        })
    }
}

impl TryFrom<pb::Router> for Router {
    type Error = ValidationError;

    fn try_from(router: pb::Router) -> Converted<Self> {
        Ok(Router {
            id: id("id", router.id)?,
            name: router.name,
            project_id: router.project_id,
            admin_state_up: router.admin_state_up,
            interfaces: each(router.interfaces, "interfaces", |interface| {
                Ok(RouterInterface {
                    subnet_id: id("subnet_id", interface.subnet_id)?,
                    port_id: optional_id("port_id", interface.port_id)?,
                })
            })?,
            external_gateway_info: router
                .external_gateway_info
                .map(ExternalGatewayInfo::try_from)
                .transpose()
                .map_err(|e| e.under("external_gateway_info"))?,
            routes: each(router.routes, "routes", |route| {
                Ok(Route {
                    destination: cidr("destination", &route.destination)?,
                    nexthop: ip("nexthop", &route.nexthop)?,
                })
            })?,
            revision_number: router.revision_number,
        })
    }
}

impl From<&Router> for pb::Router {
    fn from(router: &Router) -> Self {
        pb::Router {
            id: router.id.clone(),
            name: router.name.clone(),
            project_id: router.project_id.clone(),
            admin_state_up: router.admin_state_up,
            interfaces: router
                .interfaces
                .iter()
                .map(|interface| pb::RouterInterface {
                    subnet_id: interface.subnet_id.clone(),
                    port_id: interface.port_id.clone().unwrap_or_default(),
                })
                .collect(),
            external_gateway_info: router.external_gateway_info.as_ref().map(|gateway| {
                pb::ExternalGatewayInfo {
                    network_id: gateway.network_id.clone(),
                    enable_snat: gateway.enable_snat,
                    external_fixed_ips: gateway
                        .external_fixed_ips
                        .iter()
                        .map(|external| pb::ExternalFixedIp {
                            subnet_id: external.subnet_id.clone(),
                            ip_address: external.ip_address.to_string(),
                        })
                        .collect(),
                }
            }),
            routes: router
                .routes
                .iter()
                .map(|route| pb::Route {
                    destination: route.destination.to_string(),
                    nexthop: route.nexthop.to_string(),
                })
                .collect(),
            revision_number: router.revision_number,
        }
    }
}

impl TryFrom<pb::FloatingIp> for FloatingIp {
    type Error = ValidationError;

    fn try_from(floating_ip: pb::FloatingIp) -> Converted<Self> {
        Ok(FloatingIp {
            id: id("id", floating_ip.id)?,
            floating_network_id: id("floating_network_id", floating_ip.floating_network_id)?,
            floating_ip_address: ip("floating_ip_address", &floating_ip.floating_ip_address)?,
            port_id: optional_id("port_id", floating_ip.port_id)?,
            fixed_ip_address: optional_ip("fixed_ip_address", &floating_ip.fixed_ip_address)?,
            router_id: optional_id("router_id", floating_ip.router_id)?,
            project_id: floating_ip.project_id,
            revision_number: floating_ip.revision_number,
        })
    }
}

impl From<&FloatingIp> for pb::FloatingIp {
    fn from(floating_ip: &FloatingIp) -> Self {
        pb::FloatingIp {
            id: floating_ip.id.clone(),
            floating_network_id: floating_ip.floating_network_id.clone(),
            floating_ip_address: floating_ip.floating_ip_address.to_string(),
            port_id: floating_ip.port_id.clone().unwrap_or_default(),
            fixed_ip_address: optional_to_string(&floating_ip.fixed_ip_address),
            router_id: floating_ip.router_id.clone().unwrap_or_default(),
            project_id: floating_ip.project_id.clone(),
            revision_number: floating_ip.revision_number,
        }
    }
}

// ---------------------------------------------------------------------------------
// QoS
// ---------------------------------------------------------------------------------

impl TryFrom<pb::QosPolicy> for QosPolicy {
    type Error = ValidationError;

    fn try_from(policy: pb::QosPolicy) -> Converted<Self> {
        Ok(QosPolicy {
            id: id("id", policy.id)?,
            name: policy.name,
            project_id: policy.project_id,
            bandwidth_limit_rules: each(
                policy.bandwidth_limit_rules,
                "bandwidth_limit_rules",
                |rule| {
                    Ok(BandwidthLimitRule {
                        id: id("id", rule.id)?,
                        max_kbps: rule.max_kbps,
                        max_burst_kbps: rule.max_burst_kbps,
                        direction: qos_direction(rule.direction)?,
                    })
                },
            )?,
            dscp_marking_rules: each(policy.dscp_marking_rules, "dscp_marking_rules", |rule| {
                Ok(DscpMarkingRule {
                    id: id("id", rule.id)?,
                    dscp_mark: rule.dscp_mark,
                })
            })?,
            revision_number: policy.revision_number,
        })
    }
}

impl From<&QosPolicy> for pb::QosPolicy {
    fn from(policy: &QosPolicy) -> Self {
        pb::QosPolicy {
            id: policy.id.clone(),
            name: policy.name.clone(),
            project_id: policy.project_id.clone(),
            bandwidth_limit_rules: policy
                .bandwidth_limit_rules
                .iter()
                .map(|rule| pb::BandwidthLimitRule {
                    id: rule.id.clone(),
                    max_kbps: rule.max_kbps,
                    max_burst_kbps: rule.max_burst_kbps,
                    direction: pb::QosDirection::from(rule.direction) as i32,
                })
                .collect(),
            dscp_marking_rules: policy
                .dscp_marking_rules
                .iter()
                .map(|rule| pb::DscpMarkingRule {
                    id: rule.id.clone(),
                    dscp_mark: rule.dscp_mark,
                })
                .collect(),
            revision_number: policy.revision_number,
        }
    }
}

// ---------------------------------------------------------------------------------
// Resources, references, changes
// ---------------------------------------------------------------------------------

impl TryFrom<pb::Resource> for Resource {
    type Error = ValidationError;

    /// Fields are relative to the `Resource`: `port.mac_address`.
    fn try_from(resource: pb::Resource) -> Converted<Self> {
        use pb::resource::Kind;
        let Some(kind) = resource.kind else {
            return Err(invalid(
                "kind",
                "no resource set (network, subnet, port, ...)",
            ));
        };
        let (kind, converted) = match kind {
            Kind::Network(r) => (
                ResourceKind::Network,
                Network::try_from(r).map(Resource::Network),
            ),
            Kind::Subnet(r) => (
                ResourceKind::Subnet,
                Subnet::try_from(r).map(Resource::Subnet),
            ),
            Kind::Port(r) => (ResourceKind::Port, Port::try_from(r).map(Resource::Port)),
            Kind::SecurityGroup(r) => (
                ResourceKind::SecurityGroup,
                SecurityGroup::try_from(r).map(Resource::SecurityGroup),
            ),
            Kind::Router(r) => (
                ResourceKind::Router,
                Router::try_from(r).map(Resource::Router),
            ),
            Kind::FloatingIp(r) => (
                ResourceKind::FloatingIp,
                FloatingIp::try_from(r).map(Resource::FloatingIp),
            ),
            Kind::QosPolicy(r) => (
                ResourceKind::QosPolicy,
                QosPolicy::try_from(r).map(Resource::QosPolicy),
            ),
        };
        converted.map_err(|e| e.under(kind.field_name()))
    }
}

impl From<&Resource> for pb::Resource {
    fn from(resource: &Resource) -> Self {
        use pb::resource::Kind;
        let kind = match resource {
            Resource::Network(r) => Kind::Network(r.into()),
            Resource::Subnet(r) => Kind::Subnet(r.into()),
            Resource::Port(r) => Kind::Port(r.into()),
            Resource::SecurityGroup(r) => Kind::SecurityGroup(r.into()),
            Resource::Router(r) => Kind::Router(r.into()),
            Resource::FloatingIp(r) => Kind::FloatingIp(r.into()),
            Resource::QosPolicy(r) => Kind::QosPolicy(r.into()),
        };
        pb::Resource { kind: Some(kind) }
    }
}

impl TryFrom<pb::ResourceRef> for ResourceRef {
    type Error = ValidationError;

    fn try_from(reference: pb::ResourceRef) -> Converted<Self> {
        Ok(ResourceRef {
            kind: resource_kind(reference.kind)?,
            id: id("id", reference.id)?,
        })
    }
}

impl From<&ResourceRef> for pb::ResourceRef {
    fn from(reference: &ResourceRef) -> Self {
        pb::ResourceRef {
            kind: pb::ResourceKind::from(reference.kind) as i32,
            id: reference.id.clone(),
        }
    }
}

impl TryFrom<pb::Change> for Change {
    type Error = ValidationError;

    /// Fields are relative to the `Change`: `upsert.port.mac_address`, `delete.id`.
    fn try_from(change: pb::Change) -> Converted<Self> {
        match change.op {
            None => Err(invalid("op", "no upsert or delete set")),
            Some(pb::change::Op::Upsert(resource)) => Resource::try_from(resource)
                .map(Change::Upsert)
                .map_err(|e| e.under("upsert")),
            Some(pb::change::Op::Delete(reference)) => ResourceRef::try_from(reference)
                .map(Change::Delete)
                .map_err(|e| e.under("delete")),
        }
    }
}

impl From<&Change> for pb::Change {
    fn from(change: &Change) -> Self {
        let op = match change {
            Change::Upsert(resource) => pb::change::Op::Upsert(resource.into()),
            Change::Delete(reference) => pb::change::Op::Delete(reference.into()),
        };
        pb::Change { op: Some(op) }
    }
}

impl TryFrom<pb::TracePacketRequest> for Probe {
    type Error = ValidationError;

    /// Fields are checked in request order; the first bad one is named.
    fn try_from(request: pb::TracePacketRequest) -> Converted<Probe> {
        let ingress = match (request.port_id.is_empty(), request.from_uplink) {
            (false, false) => Ingress::Port(request.port_id.clone()),
            (true, true) => Ingress::Uplink,
            (false, true) => {
                return Err(invalid("port_id", "a packet from the uplink has no port"));
            }
            (true, false) => return Err(invalid("port_id", "required (or from_uplink)")),
        };
        let mac = |field: &str, text: &str| -> Converted<Option<MacAddr>> {
            if text.is_empty() {
                return Ok(None);
            }
            text.parse()
                .map(Some)
                .map_err(|_| invalid(field, format!("{text:?} is not a MAC address")))
        };
        let src_mac = mac("src_mac", &request.src_mac)?;
        let dst_mac = mac("dst_mac", &request.dst_mac)?;
        let address = |field: &str, text: &str| -> Converted<Option<IpAddr>> {
            if text.is_empty() {
                return Ok(None);
            }
            text.parse()
                .map(Some)
                .map_err(|_| invalid(field, format!("{text:?} is not an IP address")))
        };
        let src = address("src_ip", &request.src_ip)?;
        let dst = address("dst_ip", &request.dst_ip)?;
        let ttl = match request.ttl {
            None => 64,
            Some(ttl) => {
                u8::try_from(ttl).map_err(|_| invalid("ttl", format!("{ttl} is over 255")))?
            }
        };
        let network = match (request.ethertype, dst) {
            (Some(ethertype), _) if ethertype != 0x0800 && ethertype != 0x86dd => {
                let ethertype = u16::try_from(ethertype)
                    .map_err(|_| invalid("ethertype", format!("{ethertype} is over 65535")))?;
                TraceNetwork::Other { ethertype }
            }
            (_, None) => return Err(invalid("dst_ip", "required")),
            (ethertype, Some(IpAddr::V4(dst))) => {
                if ethertype == Some(0x86dd) {
                    return Err(invalid(
                        "dst_ip",
                        format!("{dst} is not IPv6, as ethertype says"),
                    ));
                }
                let src = match src {
                    None => None,
                    Some(IpAddr::V4(src)) => Some(src),
                    Some(IpAddr::V6(src)) => {
                        return Err(invalid(
                            "src_ip",
                            format!("{src} is not IPv4, as dst_ip is"),
                        ));
                    }
                };
                TraceNetwork::V4 { src, dst, ttl }
            }
            (ethertype, Some(IpAddr::V6(dst))) => {
                if ethertype == Some(0x0800) {
                    return Err(invalid(
                        "dst_ip",
                        format!("{dst} is not IPv4, as ethertype says"),
                    ));
                }
                let src = match src {
                    None => None,
                    Some(IpAddr::V6(src)) => Some(src),
                    Some(IpAddr::V4(src)) => {
                        return Err(invalid(
                            "src_ip",
                            format!("{src} is not IPv6, as dst_ip is"),
                        ));
                    }
                };
                TraceNetwork::V6 {
                    src,
                    dst,
                    hop_limit: ttl,
                }
            }
        };
        let port = |field: &str, value: u32| -> Converted<u16> {
            u16::try_from(value).map_err(|_| invalid(field, format!("{value} is over 65535")))
        };
        let byte = |field: &str, value: u32| -> Converted<u8> {
            u8::try_from(value).map_err(|_| invalid(field, format!("{value} is over 255")))
        };
        let protocol = match request.protocol.to_ascii_lowercase().as_str() {
            "" | "tcp" => 6,
            "udp" => 17,
            "icmp" | "icmpv6" | "ipv6-icmp" => match network {
                TraceNetwork::V6 { .. } => 58,
                _ => 1,
            },
            number => number.parse::<u8>().map_err(|_| {
                invalid(
                    "protocol",
                    format!("{number:?} is not tcp, udp, icmp, icmpv6 or a protocol number"),
                )
            })?,
        };
        let transport = match protocol {
            6 => Transport::Tcp {
                sport: port("src_port", request.src_port)?,
                dport: port("dst_port", request.dst_port)?,
                flags: tcp_flags(&request.tcp_flags)?,
            },
            17 => Transport::Udp {
                sport: port("src_port", request.src_port)?,
                dport: port("dst_port", request.dst_port)?,
            },
            1 | 58 => {
                let family = if matches!(network, TraceNetwork::V6 { .. }) {
                    58
                } else {
                    1
                };
                if protocol != family {
                    return Err(invalid(
                        "protocol",
                        format!("protocol {protocol} is not the ICMP of dst_ip's family"),
                    ));
                }
                Transport::Icmp {
                    kind: byte("icmp_type", request.icmp_type)?,
                    code: byte("icmp_code", request.icmp_code)?,
                    id: port("icmp_id", request.icmp_id)?,
                }
            }
            protocol => Transport::Other { protocol },
        };
        Ok(Probe {
            ingress,
            src_mac,
            dst_mac,
            network,
            transport,
            established: request.established,
        })
    }
}

// ---------------------------------------------------------------------------------
// The packet monitor and the policy view
// ---------------------------------------------------------------------------------

impl TryFrom<pb::MonitorRequest> for MonitorFilter {
    type Error = ValidationError;

    fn try_from(request: pb::MonitorRequest) -> Converted<Self> {
        let reasons = request
            .drop_reasons
            .iter()
            .enumerate()
            .map(|(index, &value)| {
                u32::try_from(value)
                    .ok()
                    .and_then(DropReason::from_u32)
                    .ok_or_else(|| {
                        invalid(
                            &format!("drop_reasons[{index}]"),
                            format!("{value} is no drop reason"),
                        )
                    })
            })
            .collect::<Converted<_>>()?;
        Ok(MonitorFilter {
            port_id: optional_id("port_id", request.port_id)?,
            trace: request.trace,
            reasons,
        })
    }
}

/// `"SYN|ACK"` to the flag bits; empty: SYN.
fn tcp_flags(text: &str) -> Converted<u8> {
    if text.is_empty() {
        return Ok(trace::SYN);
    }
    text.split(['|', ',', '+'])
        .map(|name| match name.trim().to_ascii_uppercase().as_str() {
            "SYN" => Ok(trace::SYN),
            "ACK" => Ok(trace::ACK),
            "FIN" => Ok(trace::FIN),
            "RST" => Ok(trace::RST),
            other => Err(invalid(
                "tcp_flags",
                format!("{other:?} is not SYN, ACK, FIN or RST"),
            )),
        })
        .try_fold(0, |flags, flag| Ok(flags | flag?))
}

pub fn trace_to_proto(trace: Trace) -> pb::TracePacketResponse {
    use pb::trace_verdict::Action;
    let summary = trace.verdict.to_string();
    let reason = |reason: DropReason| drop_reason_to_proto(reason) as i32;
    let mut verdict = pb::TraceVerdict {
        summary,
        ..pb::TraceVerdict::default()
    };
    match trace.verdict {
        TraceVerdict::Delivered(target) => {
            verdict.action = Action::Delivered as i32;
            verdict.port_id = target.port_id;
        }
        TraceVerdict::Answered(target) => {
            verdict.action = Action::Answered as i32;
            verdict.port_id = target.port_id;
        }
        TraceVerdict::Flooded(copies) => {
            verdict.action = Action::Flooded as i32;
            verdict.copies = copies
                .into_iter()
                .map(|copy| pb::FloodCopy {
                    port_id: copy.target.port_id,
                    drop_reason: copy.dropped.map_or(0, reason),
                })
                .collect();
        }
        TraceVerdict::Uplink { .. } => verdict.action = Action::Uplink as i32,
        TraceVerdict::AnsweredOnUplink => verdict.action = Action::AnsweredOnUplink as i32,
        TraceVerdict::ToHost => verdict.action = Action::ToHost as i32,
        TraceVerdict::Dropped {
            reason: dropped,
            port_id,
        } => {
            verdict.action = Action::Dropped as i32;
            verdict.drop_reason = reason(dropped);
            verdict.port_id = port_id;
        }
    }
    pb::TracePacketResponse {
        stages: trace
            .stages
            .into_iter()
            .map(|stage| pb::TraceStage {
                name: stage.name.to_owned(),
                lookup: stage.lookup,
                found: stage.found,
                decision: stage.decision,
            })
            .collect(),
        verdict: Some(verdict),
    }
}

impl From<&PacketEvent> for pb::PacketEvent {
    fn from(event: &PacketEvent) -> Self {
        let (verdict, drop_reason) = match event.verdict {
            Verdict::Dropped(reason) => (pb::MonitorVerdict::Dropped, drop_reason_to_proto(reason)),
            Verdict::Delivered => (pb::MonitorVerdict::Delivered, pb::DropReason::Unspecified),
        };
        let hook = match event.hook {
            Hook::FromPort => pb::MonitorHook::FromPort,
            Hook::ToPort => pb::MonitorHook::ToPort,
            Hook::Uplink => pb::MonitorHook::Uplink,
        };
        let summary = &event.summary;
        let (source_address, destination_address) = summary
            .addresses
            .map(|(source, destination)| (source.to_string(), destination.to_string()))
            .unwrap_or_default();
        pb::PacketEvent {
            time_unix_nanos: event
                .time
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos() as u64),
            port_id: event.port_id.clone().unwrap_or_default(),
            ifindex: event.ifindex,
            hook: hook as i32,
            verdict: verdict as i32,
            drop_reason: drop_reason as i32,
            summary: Some(pb::PacketSummary {
                source_mac: summary.source_mac.to_string(),
                destination_mac: summary.destination_mac.to_string(),
                ethertype: u32::from(summary.ethertype),
                vlan_id: summary.vlan.map_or(0, u32::from),
                source_address,
                destination_address,
                protocol: summary.protocol.map(u32::from),
                source_port: summary.ports.map(|(source, _)| u32::from(source)),
                destination_port: summary.ports.map(|(_, destination)| u32::from(destination)),
                icmp_type: summary.icmp.map(|(kind, _)| u32::from(kind)),
                icmp_code: summary.icmp.map(|(_, code)| u32::from(code)),
                arp_operation: summary.arp_operation.map(u32::from),
            }),
            header: event.header.clone(),
            original_length: event.original_length,
        }
    }
}

impl From<&RuleView> for pb::PolicyRule {
    fn from(view: &RuleView) -> Self {
        let rule = &view.rule;
        pb::PolicyRule {
            id: rule.id.clone(),
            security_group_id: view.security_group_id.clone(),
            ethertype: pb::EtherType::from(rule.ethertype) as i32,
            protocol: match rule.protocol {
                Protocol::Any => "any".to_owned(),
                Protocol::Number(_) => rule.protocol.to_string(),
            },
            port_range_min: rule.port_range_min,
            port_range_max: rule.port_range_max,
            remote_ip_prefix: optional_to_string(&rule.remote_ip_prefix),
            remote_group_id: rule.remote_group_id.clone().unwrap_or_default(),
            remote_group_members: view
                .remote_members
                .iter()
                .map(ToString::to_string)
                .collect(),
            programmed: view.slot.is_some(),
            slot: view.slot.unwrap_or_default(),
        }
    }
}

impl From<&PortPolicyView> for pb::PortPolicy {
    fn from(view: &PortPolicyView) -> Self {
        let rules = |direction: Direction| {
            view.rules
                .iter()
                .filter(|rule| rule.rule.direction == direction)
                .map(pb::PolicyRule::from)
                .collect()
        };
        pb::PortPolicy {
            port_id: view.port_id.clone(),
            port_security: view.port_security,
            security_group_ids: view.security_group_ids.clone(),
            stateful: view.stateful,
            policy_id: view.policy_id,
            policy_revision: view.policy_revision,
            ingress_rules: rules(Direction::Ingress),
            egress_rules: rules(Direction::Egress),
            allowed_addresses: view
                .allowed_addresses
                .iter()
                .map(|(mac, net)| pb::AllowedAddress {
                    mac_address: mac.to_string(),
                    ip_prefix: net.to_string(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::validate::ErrorCode;

    fn full_network() -> pb::Network {
        pb::Network {
            id: "n1".into(),
            name: "net".into(),
            project_id: "proj".into(),
            admin_state_up: true,
            shared: true,
            router_external: false,
            mtu: 9000,
            provider: Some(pb::ProviderNetwork {
                network_type: pb::NetworkType::Vlan as i32,
                physical_network: "physnet1".into(),
                segmentation_id: Some(100),
            }),
            port_security_enabled: true,
            revision_number: 3,
        }
    }

    fn full_subnet() -> pb::Subnet {
        pb::Subnet {
            id: "s1".into(),
            network_id: "n1".into(),
            ip_version: 6,
            cidr: "2001:db8::/64".into(),
            gateway_ip: "2001:db8::1".into(),
            allocation_pools: vec![pb::AllocationPool {
                start: "2001:db8::10".into(),
                end: "2001:db8::ffff".into(),
            }],
            dns_nameservers: vec!["2001:4860:4860::8888".into()],
            host_routes: vec![pb::HostRoute {
                destination: "2001:db8:ff::/48".into(),
                nexthop: "2001:db8::fe".into(),
            }],
            enable_dhcp: true,
            name: "sub".into(),
            project_id: "proj".into(),
            revision_number: 4,
        }
    }

    fn full_port() -> pb::Port {
        pb::Port {
            id: "p1".into(),
            network_id: "n1".into(),
            mac_address: "fa:16:3e:00:00:01".into(),
            fixed_ips: vec![
                pb::FixedIp {
                    subnet_id: "s4".into(),
                    ip_address: "10.0.0.5".into(),
                },
                pb::FixedIp {
                    subnet_id: "s1".into(),
                    ip_address: "2001:db8::5".into(),
                },
            ],
            allowed_address_pairs: vec![
                pb::AllowedAddressPair {
                    ip_address: "10.0.0.100".into(),
                    mac_address: String::new(),
                },
                pb::AllowedAddressPair {
                    ip_address: "192.168.0.0/16".into(),
                    mac_address: "02:00:00:00:00:01".into(),
                },
            ],
            security_group_ids: vec!["sg1".into(), "sg2".into()],
            port_security_enabled: Some(false),
            admin_state_up: true,
            device_owner: "compute:nova".into(),
            device_id: "vm1".into(),
            qos_policy_id: "q1".into(),
            binding: Some(pb::PortBinding {
                host: "node-a".into(),
                interface_name: "tap1".into(),
            }),
            name: "port".into(),
            project_id: "proj".into(),
            revision_number: 5,
        }
    }

    fn full_rule() -> pb::SecurityGroupRule {
        pb::SecurityGroupRule {
            id: "r1".into(),
            direction: pb::Direction::Ingress as i32,
            ethertype: pb::EtherType::Ipv4 as i32,
            protocol: "tcp".into(),
            port_range_min: Some(22),
            port_range_max: Some(22),
            remote_ip_prefix: "10.0.0.0/8".into(),
            remote_group_id: String::new(),
            revision_number: 2,
        }
    }

    fn full_security_group() -> pb::SecurityGroup {
        pb::SecurityGroup {
            id: "sg1".into(),
            project_id: "proj".into(),
            name: "default".into(),
            stateful: true,
            rules: vec![
                full_rule(),
                pb::SecurityGroupRule {
                    id: "r2".into(),
                    direction: pb::Direction::Egress as i32,
                    ethertype: pb::EtherType::Ipv6 as i32,
                    protocol: String::new(),
                    port_range_min: None,
                    port_range_max: None,
                    remote_ip_prefix: String::new(),
                    remote_group_id: "sg1".into(),
                    revision_number: 2,
                },
                pb::SecurityGroupRule {
                    id: "r3".into(),
                    ethertype: pb::EtherType::Ipv6 as i32,
                    protocol: "ipv6-icmp".into(),
                    port_range_min: Some(135),
                    port_range_max: None,
                    remote_ip_prefix: "2001:db8::1/128".into(),
                    ..full_rule()
                },
                pb::SecurityGroupRule {
                    id: "r4".into(),
                    protocol: "200".into(),
                    port_range_min: None,
                    port_range_max: None,
                    ..full_rule()
                },
            ],
            revision_number: 6,
        }
    }

    fn full_router() -> pb::Router {
        pb::Router {
            id: "r1".into(),
            name: "router".into(),
            project_id: "proj".into(),
            admin_state_up: true,
            interfaces: vec![
                pb::RouterInterface {
                    subnet_id: "s1".into(),
                    port_id: "rp1".into(),
                },
                pb::RouterInterface {
                    subnet_id: "s2".into(),
                    port_id: String::new(),
                },
            ],
            external_gateway_info: Some(pb::ExternalGatewayInfo {
                network_id: "ext".into(),
                enable_snat: true,
                external_fixed_ips: vec![pb::ExternalFixedIp {
                    subnet_id: "ext-s".into(),
                    ip_address: "203.0.113.2".into(),
                }],
            }),
            routes: vec![pb::Route {
                destination: "192.168.0.0/16".into(),
                nexthop: "10.0.0.254".into(),
            }],
            revision_number: 7,
        }
    }

    fn full_floating_ip() -> pb::FloatingIp {
        pb::FloatingIp {
            id: "f1".into(),
            floating_network_id: "ext".into(),
            floating_ip_address: "203.0.113.10".into(),
            port_id: "p1".into(),
            fixed_ip_address: "10.0.0.5".into(),
            router_id: "r1".into(),
            project_id: "proj".into(),
            revision_number: 8,
        }
    }

    fn full_qos_policy() -> pb::QosPolicy {
        pb::QosPolicy {
            id: "q1".into(),
            name: "gold".into(),
            project_id: "proj".into(),
            bandwidth_limit_rules: vec![pb::BandwidthLimitRule {
                id: "b1".into(),
                max_kbps: 10_000,
                max_burst_kbps: 1_000,
                direction: pb::QosDirection::Ingress as i32,
            }],
            dscp_marking_rules: vec![pb::DscpMarkingRule {
                id: "d1".into(),
                dscp_mark: 46,
            }],
            revision_number: 9,
        }
    }

    fn full_resources() -> Vec<pb::Resource> {
        use pb::resource::Kind;
        [
            Kind::Network(full_network()),
            Kind::Subnet(full_subnet()),
            Kind::Port(full_port()),
            Kind::SecurityGroup(full_security_group()),
            Kind::Router(full_router()),
            Kind::FloatingIp(full_floating_ip()),
            Kind::QosPolicy(full_qos_policy()),
        ]
        .into_iter()
        .map(|kind| pb::Resource { kind: Some(kind) })
        .collect()
    }

    #[test]
    fn every_kind_round_trips() {
        for proto in full_resources() {
            let core = Resource::try_from(proto.clone()).unwrap();
            assert_eq!(pb::Resource::from(&core), proto);
        }
    }

    #[test]
    fn parsed_values() {
        let Resource::Port(port) = Resource::try_from(full_resources()[2].clone()).unwrap() else {
            panic!("not a port");
        };
        assert_eq!(port.mac_address, MacAddr([0xfa, 0x16, 0x3e, 0, 0, 1]));
        assert_eq!(
            port.allowed_address_pairs[0].ip_address,
            "10.0.0.100/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(port.allowed_address_pairs[0].mac_address, None);
        assert_eq!(port.qos_policy_id.as_deref(), Some("q1"));
        assert_eq!(port.binding.interface_name, "tap1");

        let Resource::SecurityGroup(group) =
            Resource::try_from(full_resources()[3].clone()).unwrap()
        else {
            panic!("not a group");
        };
        let protocols: Vec<Protocol> = group.rules.iter().map(|r| r.protocol).collect();
        assert_eq!(
            protocols,
            [
                Protocol::TCP,
                Protocol::Any,
                Protocol::IPV6_ICMP,
                Protocol::Number(200)
            ]
        );
        assert_eq!(group.rules[1].remote_group_id.as_deref(), Some("sg1"));
        assert_eq!(group.rules[0].remote_group_id, None);
    }

    #[test]
    fn lenient_forms_are_normalised() {
        let mut port = full_port();
        port.allowed_address_pairs = vec![
            pb::AllowedAddressPair {
                ip_address: "10.1.2.3/16".into(),
                mac_address: "FA:16:3E:00:00:AA".into(),
            },
            pb::AllowedAddressPair {
                ip_address: "10.0.0.7/32".into(),
                mac_address: String::new(),
            },
        ];
        port.binding = Some(pb::PortBinding::default());
        let core = Port::try_from(port).unwrap();
        let back = pb::Port::from(&core);
        assert_eq!(back.allowed_address_pairs[0].ip_address, "10.1.0.0/16");
        assert_eq!(
            back.allowed_address_pairs[0].mac_address,
            "fa:16:3e:00:00:aa"
        );
        assert_eq!(back.allowed_address_pairs[1].ip_address, "10.0.0.7");
        assert_eq!(back.binding, None);
        assert_eq!(Port::try_from(back).unwrap(), core);

        let mut rule = full_rule();
        rule.remote_ip_prefix = "10.1.2.3".into();
        rule.protocol = "ICMPv6".into();
        rule.ethertype = pb::EtherType::Ipv6 as i32;
        let core = SecurityGroupRule::try_from(rule).unwrap();
        assert_eq!(core.protocol, Protocol::IPV6_ICMP);
        let back = pb::SecurityGroupRule::from(&core);
        assert_eq!(back.remote_ip_prefix, "10.1.2.3/32");
        assert_eq!(back.protocol, "ipv6-icmp");
        assert_eq!(SecurityGroupRule::try_from(back).unwrap(), core);

        let mut rule = full_rule();
        rule.remote_ip_prefix = "10.1.2.3/8".into();
        rule.protocol = "any".into();
        rule.port_range_min = None;
        rule.port_range_max = None;
        let back = pb::SecurityGroupRule::from(&SecurityGroupRule::try_from(rule).unwrap());
        assert_eq!(back.remote_ip_prefix, "10.0.0.0/8");
        assert_eq!(back.protocol, "");
    }

    #[test]
    fn changes_round_trip() {
        let changes: Vec<pb::Change> = full_resources()
            .into_iter()
            .map(|resource| pb::Change {
                op: Some(pb::change::Op::Upsert(resource)),
            })
            .chain([pb::Change {
                op: Some(pb::change::Op::Delete(pb::ResourceRef {
                    kind: pb::ResourceKind::SecurityGroup as i32,
                    id: "sg9".into(),
                })),
            }])
            .collect();
        let core = changes_from_proto(changes.clone()).unwrap();
        assert_eq!(
            core.last(),
            Some(&Change::Delete(ResourceRef {
                kind: ResourceKind::SecurityGroup,
                id: "sg9".into()
            }))
        );
        let back: Vec<pb::Change> = core.iter().map(pb::Change::from).collect();
        assert_eq!(back, changes);
        assert_eq!(resources_from_proto(full_resources()).unwrap().len(), 7);
    }

    /// Converts a Sync list with `resource` at index 1 and returns the error.
    #[track_caller]
    fn sync_error(resource: pb::resource::Kind) -> ValidationError {
        let resources = vec![
            pb::Resource {
                kind: Some(pb::resource::Kind::Network(full_network())),
            },
            pb::Resource {
                kind: Some(resource),
            },
        ];
        let error = resources_from_proto(resources).expect_err("should be refused");
        assert_eq!(error.code, ErrorCode::InvalidArgument, "{error:?}");
        assert_eq!(error.index, Some(1), "{error:?}");
        error
    }

    #[track_caller]
    fn assert_field(resource: pb::resource::Kind, field: &str) {
        let error = sync_error(resource);
        assert_eq!(error.field, field, "{error:?}");
    }

    #[test]
    fn syntax_errors_name_the_field() {
        use pb::resource::Kind;

        assert_field(
            Kind::Network(pb::Network {
                id: String::new(),
                ..full_network()
            }),
            "network.id",
        );
        assert_field(
            Kind::Network(pb::Network {
                id: "a b".into(),
                ..full_network()
            }),
            "network.id",
        );
        assert_field(
            Kind::Network(pb::Network {
                id: "x".repeat(256),
                ..full_network()
            }),
            "network.id",
        );
        let mut network = full_network();
        network.provider = Some(pb::ProviderNetwork::default());
        assert_field(Kind::Network(network), "network.provider.network_type");
        let mut network = full_network();
        network.provider = Some(pb::ProviderNetwork {
            network_type: 42,
            ..pb::ProviderNetwork::default()
        });
        assert_field(Kind::Network(network), "network.provider.network_type");

        assert_field(
            Kind::Subnet(pb::Subnet {
                ip_version: 5,
                ..full_subnet()
            }),
            "subnet.ip_version",
        );
        assert_field(
            Kind::Subnet(pb::Subnet {
                cidr: "2001:db8::1/64".into(),
                ..full_subnet()
            }),
            "subnet.cidr",
        );
        assert_field(
            Kind::Subnet(pb::Subnet {
                cidr: "2001:db8::".into(),
                ..full_subnet()
            }),
            "subnet.cidr",
        );
        assert_field(
            Kind::Subnet(pb::Subnet {
                network_id: String::new(),
                ..full_subnet()
            }),
            "subnet.network_id",
        );
        assert_field(
            Kind::Subnet(pb::Subnet {
                gateway_ip: "gw".into(),
                ..full_subnet()
            }),
            "subnet.gateway_ip",
        );
        let mut subnet = full_subnet();
        subnet.allocation_pools[0].end = "2001:db8::zz".into();
        assert_field(Kind::Subnet(subnet), "subnet.allocation_pools[0].end");
        let mut subnet = full_subnet();
        subnet.dns_nameservers.push("dns.example".into());
        assert_field(Kind::Subnet(subnet), "subnet.dns_nameservers[1]");
        let mut subnet = full_subnet();
        subnet.host_routes[0].destination = "2001:db8:ff::1/48".into();
        assert_field(Kind::Subnet(subnet), "subnet.host_routes[0].destination");

        for bad in [
            "fa:16:3e:00:00",
            "fa:16:3e:00:00:0g",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "",
        ] {
            let error = sync_error(Kind::Port(pb::Port {
                mac_address: bad.into(),
                ..full_port()
            }));
            assert_eq!(error.field, "port.mac_address", "{bad}");
        }
        let error = sync_error(Kind::Port(pb::Port {
            mac_address: "ff:ff:ff:ff:ff:ff".into(),
            ..full_port()
        }));
        assert!(
            error.message.contains("ff:ff:ff:ff:ff:ff"),
            "{}",
            error.message
        );
        let mut port = full_port();
        port.fixed_ips[1].ip_address = "10.0.0.300".into();
        let error = sync_error(Kind::Port(port));
        assert_eq!(error.field, "port.fixed_ips[1].ip_address");
        assert!(error.message.contains("10.0.0.300"), "{}", error.message);
        let mut port = full_port();
        port.fixed_ips[0].ip_address = String::new();
        assert_field(Kind::Port(port), "port.fixed_ips[0].ip_address");
        let mut port = full_port();
        port.fixed_ips[0].subnet_id = String::new();
        assert_field(Kind::Port(port), "port.fixed_ips[0].subnet_id");
        let mut port = full_port();
        port.allowed_address_pairs[1].mac_address = "33:33:00:00:00:01".into();
        assert_field(
            Kind::Port(port),
            "port.allowed_address_pairs[1].mac_address",
        );
        let mut port = full_port();
        port.allowed_address_pairs[0].ip_address = "10.0.0/8".into();
        assert_field(Kind::Port(port), "port.allowed_address_pairs[0].ip_address");
        let mut port = full_port();
        port.security_group_ids[1] = String::new();
        assert_field(Kind::Port(port), "port.security_group_ids[1]");
        assert_field(
            Kind::Port(pb::Port {
                qos_policy_id: "a\nb".into(),
                ..full_port()
            }),
            "port.qos_policy_id",
        );

        let rule_error = |rule: pb::SecurityGroupRule, field: &str| {
            let mut group = full_security_group();
            group.rules[2] = rule;
            assert_field(
                Kind::SecurityGroup(group),
                &format!("security_group.rules[2].{field}"),
            );
        };
        rule_error(
            pb::SecurityGroupRule {
                protocol: "foo".into(),
                ..full_rule()
            },
            "protocol",
        );
        rule_error(
            pb::SecurityGroupRule {
                protocol: "256".into(),
                ..full_rule()
            },
            "protocol",
        );
        rule_error(
            pb::SecurityGroupRule {
                direction: 0,
                ..full_rule()
            },
            "direction",
        );
        rule_error(
            pb::SecurityGroupRule {
                direction: 3,
                ..full_rule()
            },
            "direction",
        );
        rule_error(
            pb::SecurityGroupRule {
                ethertype: 0,
                ..full_rule()
            },
            "ethertype",
        );
        rule_error(
            pb::SecurityGroupRule {
                remote_ip_prefix: "any".into(),
                ..full_rule()
            },
            "remote_ip_prefix",
        );
        rule_error(
            pb::SecurityGroupRule {
                id: String::new(),
                ..full_rule()
            },
            "id",
        );

        let mut router = full_router();
        router.routes[0].destination = "192.168.1.0/16".into();
        assert_field(Kind::Router(router), "router.routes[0].destination");
        let mut router = full_router();
        router.routes[0].nexthop = "10.0.0.0/24".into();
        assert_field(Kind::Router(router), "router.routes[0].nexthop");
        let mut router = full_router();
        router.interfaces[1].subnet_id = String::new();
        assert_field(Kind::Router(router), "router.interfaces[1].subnet_id");
        let mut router = full_router();
        if let Some(gateway) = router.external_gateway_info.as_mut() {
            gateway.network_id = String::new();
        }
        assert_field(
            Kind::Router(router),
            "router.external_gateway_info.network_id",
        );
        let mut router = full_router();
        if let Some(gateway) = router.external_gateway_info.as_mut() {
            gateway.external_fixed_ips[0].ip_address = "x".into();
        }
        assert_field(
            Kind::Router(router),
            "router.external_gateway_info.external_fixed_ips[0].ip_address",
        );

        assert_field(
            Kind::FloatingIp(pb::FloatingIp {
                floating_ip_address: "203.0.113.0/24".into(),
                ..full_floating_ip()
            }),
            "floating_ip.floating_ip_address",
        );
        assert_field(
            Kind::FloatingIp(pb::FloatingIp {
                floating_ip_address: String::new(),
                ..full_floating_ip()
            }),
            "floating_ip.floating_ip_address",
        );
        assert_field(
            Kind::FloatingIp(pb::FloatingIp {
                fixed_ip_address: "nope".into(),
                ..full_floating_ip()
            }),
            "floating_ip.fixed_ip_address",
        );
        assert_field(
            Kind::FloatingIp(pb::FloatingIp {
                floating_network_id: String::new(),
                ..full_floating_ip()
            }),
            "floating_ip.floating_network_id",
        );

        let mut policy = full_qos_policy();
        policy.bandwidth_limit_rules[0].direction = 0;
        assert_field(
            Kind::QosPolicy(policy),
            "qos_policy.bandwidth_limit_rules[0].direction",
        );
        let mut policy = full_qos_policy();
        policy.dscp_marking_rules[0].id = String::new();
        assert_field(
            Kind::QosPolicy(policy),
            "qos_policy.dscp_marking_rules[0].id",
        );
    }

    #[test]
    fn missing_oneofs_and_bad_references() {
        let error = resources_from_proto(vec![pb::Resource { kind: None }]).unwrap_err();
        assert_eq!((error.index, error.field.as_str()), (Some(0), "kind"));

        let upsert = |resource| pb::Change {
            op: Some(pb::change::Op::Upsert(resource)),
        };
        let delete = |kind, id: &str| pb::Change {
            op: Some(pb::change::Op::Delete(pb::ResourceRef {
                kind,
                id: id.into(),
            })),
        };
        let good = || upsert(full_resources()[0].clone());
        let cases = [
            (pb::Change { op: None }, "op"),
            (upsert(pb::Resource { kind: None }), "upsert.kind"),
            (
                upsert(pb::Resource {
                    kind: Some(pb::resource::Kind::Port(pb::Port {
                        mac_address: "x".into(),
                        ..full_port()
                    })),
                }),
                "upsert.port.mac_address",
            ),
            (delete(0, "n1"), "delete.kind"),
            (delete(99, "n1"), "delete.kind"),
            (delete(pb::ResourceKind::Network as i32, ""), "delete.id"),
        ];
        for (change, field) in cases {
            let error = changes_from_proto(vec![good(), good(), change]).unwrap_err();
            assert_eq!(
                (error.code, error.index, error.field.as_str()),
                (ErrorCode::InvalidArgument, Some(2), field)
            );
        }
    }

    #[test]
    fn statuses_and_references() {
        let reference = ResourceRef {
            kind: ResourceKind::FloatingIp,
            id: "f1".into(),
        };
        let status = ResourceStatus {
            status: StatusKind::Build,
            reason: "waiting".into(),
            revision_number: 12,
        };
        assert_eq!(
            status_to_proto(&reference, &status),
            pb::ResourceStatus {
                r#ref: Some(pb::ResourceRef {
                    kind: pb::ResourceKind::FloatingIp as i32,
                    id: "f1".into(),
                }),
                status: pb::Status::Build as i32,
                reason: "waiting".into(),
                revision_number: 12,
            }
        );
        for kind in ResourceKind::ALL {
            let reference = ResourceRef {
                kind,
                id: "x".into(),
            };
            let proto = pb::ResourceRef::from(&reference);
            assert_eq!(ResourceRef::try_from(proto).unwrap(), reference);
        }
        let statuses = [
            (StatusKind::Active, pb::Status::Active),
            (StatusKind::Down, pb::Status::Down),
            (StatusKind::Build, pb::Status::Build),
            (StatusKind::Error, pb::Status::Error),
        ];
        for (core, proto) in statuses {
            assert_eq!(pb::Status::from(core), proto);
        }
    }

    #[test]
    fn drop_reasons_agree_with_the_abi() {
        for reason in DropReason::ALL {
            let proto = pb::DropReason::try_from(reason as i32).unwrap_or_else(|_| {
                panic!("{reason:?} ({}) missing from the proto", reason as i32)
            });
            assert_eq!(
                proto.as_str_name(),
                format!("DROP_REASON_{}", reason.name().to_ascii_uppercase()),
                "{reason:?}"
            );
            assert_eq!(drop_reason_to_proto(reason), proto);
        }
        // And nothing in the proto that the ABI lacks.
        let proto_values = (1..=i32::from(u8::MAX))
            .filter(|value| pb::DropReason::try_from(*value).is_ok())
            .count();
        assert_eq!(proto_values, DropReason::ALL.len());
        assert!(pb::DropReason::try_from(0).is_ok_and(|r| r == pb::DropReason::Unspecified));
    }

    fn trace_request() -> pb::TracePacketRequest {
        pb::TracePacketRequest {
            port_id: "p1".into(),
            dst_ip: "10.0.0.6".into(),
            protocol: "tcp".into(),
            src_port: 40000,
            dst_port: 80,
            tcp_flags: "syn|ack".into(),
            ..Default::default()
        }
    }

    #[test]
    fn trace_requests_take_their_defaults() {
        let probe = Probe::try_from(trace_request()).unwrap();
        assert_eq!(probe.ingress, Ingress::Port("p1".into()));
        assert_eq!(
            probe.network,
            TraceNetwork::V4 {
                src: None,
                dst: "10.0.0.6".parse().unwrap(),
                ttl: 64
            }
        );
        assert_eq!(
            probe.transport,
            Transport::Tcp {
                sport: 40000,
                dport: 80,
                flags: trace::SYN | trace::ACK
            }
        );
        let icmp6 = Probe::try_from(pb::TracePacketRequest {
            dst_ip: "fd00::6".into(),
            protocol: "icmp".into(),
            icmp_type: 128,
            ttl: Some(1),
            ..trace_request()
        })
        .unwrap();
        assert!(matches!(
            icmp6.network,
            TraceNetwork::V6 { hop_limit: 1, .. }
        ));
        assert!(matches!(icmp6.transport, Transport::Icmp { kind: 128, .. }));
    }

    #[test]
    fn a_bad_trace_request_names_its_field() {
        let bad: [(pb::TracePacketRequest, &str); 8] = [
            (
                pb::TracePacketRequest {
                    port_id: String::new(),
                    ..trace_request()
                },
                "port_id",
            ),
            (
                pb::TracePacketRequest {
                    from_uplink: true,
                    ..trace_request()
                },
                "port_id",
            ),
            (
                pb::TracePacketRequest {
                    src_mac: "zz".into(),
                    ..trace_request()
                },
                "src_mac",
            ),
            (
                pb::TracePacketRequest {
                    dst_ip: String::new(),
                    ..trace_request()
                },
                "dst_ip",
            ),
            (
                pb::TracePacketRequest {
                    src_ip: "fd00::1".into(),
                    ..trace_request()
                },
                "src_ip",
            ),
            (
                pb::TracePacketRequest {
                    ttl: Some(256),
                    ..trace_request()
                },
                "ttl",
            ),
            (
                pb::TracePacketRequest {
                    protocol: "sctp".into(),
                    ..trace_request()
                },
                "protocol",
            ),
            (
                pb::TracePacketRequest {
                    tcp_flags: "SYN|URG".into(),
                    ..trace_request()
                },
                "tcp_flags",
            ),
        ];
        for (request, field) in bad {
            let error = Probe::try_from(request).unwrap_err();
            assert_eq!(
                (error.code, error.field.as_str()),
                (ErrorCode::InvalidArgument, field),
                "{error:?}"
            );
        }
    }

    #[test]
    fn monitor_filters_from_proto() {
        let filter = MonitorFilter::try_from(pb::MonitorRequest {
            port_id: "p1".into(),
            trace: true,
            drop_reasons: vec![pb::DropReason::PolicyDenied as i32],
        })
        .unwrap();
        assert_eq!(
            filter,
            MonitorFilter {
                port_id: Some("p1".into()),
                trace: true,
                reasons: vec![DropReason::PolicyDenied],
            }
        );
        assert_eq!(
            MonitorFilter::try_from(pb::MonitorRequest::default()).unwrap(),
            MonitorFilter::default()
        );
        for (request, field) in [
            (
                pb::MonitorRequest {
                    drop_reasons: vec![pb::DropReason::CtInvalid as i32, 0],
                    ..Default::default()
                },
                "drop_reasons[1]",
            ),
            (
                pb::MonitorRequest {
                    drop_reasons: vec![-3],
                    ..Default::default()
                },
                "drop_reasons[0]",
            ),
            (
                pb::MonitorRequest {
                    port_id: "no spaces".into(),
                    ..Default::default()
                },
                "port_id",
            ),
        ] {
            let error = MonitorFilter::try_from(request).unwrap_err();
            assert_eq!(
                (error.code, error.field.as_str()),
                (ErrorCode::InvalidArgument, field)
            );
        }
    }

    #[test]
    fn a_drop_event_to_proto() {
        use crate::kernel::monitor::PacketSummary;
        let event = PacketEvent {
            time: std::time::UNIX_EPOCH + std::time::Duration::from_nanos(1_700_000_000_123),
            verdict: Verdict::Dropped(DropReason::PolicyDenied),
            hook: Hook::FromPort,
            ifindex: 9,
            port_id: Some("p1".into()),
            original_length: 74,
            header: vec![1, 2, 3],
            summary: PacketSummary {
                source_mac: MacAddr([2, 0, 0, 0, 0, 1]),
                ethertype: 0x0800,
                addresses: Some(("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap())),
                protocol: Some(6),
                ports: Some((1234, 80)),
                ..PacketSummary::default()
            },
        };
        let proto = pb::PacketEvent::from(&event);
        assert_eq!(proto.time_unix_nanos, 1_700_000_000_123);
        assert_eq!(proto.verdict, pb::MonitorVerdict::Dropped as i32);
        assert_eq!(proto.drop_reason, pb::DropReason::PolicyDenied as i32);
        assert_eq!(proto.hook, pb::MonitorHook::FromPort as i32);
        assert_eq!((proto.port_id.as_str(), proto.ifindex), ("p1", 9));
        assert_eq!(proto.header, [1, 2, 3]);
        let summary = proto.summary.unwrap();
        assert_eq!(summary.source_mac, "02:00:00:00:00:01");
        assert_eq!(
            (
                summary.source_address.as_str(),
                summary.destination_address.as_str()
            ),
            ("10.0.0.1", "10.0.0.2")
        );
        assert_eq!(
            (
                summary.protocol,
                summary.source_port,
                summary.destination_port
            ),
            (Some(6), Some(1234), Some(80))
        );
        assert_eq!((summary.icmp_type, summary.arp_operation), (None, None));
    }
}
