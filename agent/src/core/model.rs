//! The Networking API's resources as the agent holds them: values parsed into their
//! types (addresses, prefixes, MACs, enums), references kept as ids.
//!
//! A [`State`] made by [`State::apply`] or [`State::replace`] (or empty, by `Default`) is
//! consistent, and `apply` relies on that: it checks only what its changes can affect.
//! The fields are public for reading; build states through those two.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
    sync::Arc,
};

use ipnet::IpNet;

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Group bit set: broadcast or multicast, never a port's own address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }

    /// The IPv6 link-local address a host derives from this MAC (fe80::/64 with the
    /// modified EUI-64 interface id: `ff:fe` in the middle, universal/local bit flipped).
    pub fn ipv6_link_local(&self) -> Ipv6Addr {
        let m = self.0;
        Ipv6Addr::from([
            0xfe,
            0x80,
            0,
            0,
            0,
            0,
            0,
            0,
            m[0] ^ 0x02,
            m[1],
            m[2],
            0xff,
            0xfe,
            m[3],
            m[4],
            m[5],
        ])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacAddrParseError {
    #[error("expected 6 colon-separated octets, found {found}")]
    OctetCount { found: usize },
    #[error("octet {octet:?} is not two hex digits")]
    Octet { octet: String },
}

impl FromStr for MacAddr {
    type Err = MacAddrParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let octets: Vec<&str> = text.split(':').collect();
        if octets.len() != 6 {
            return Err(MacAddrParseError::OctetCount {
                found: octets.len(),
            });
        }
        let mut mac = [0u8; 6];
        for (byte, octet) in mac.iter_mut().zip(&octets) {
            // from_str_radix alone would accept "+f" and single digits.
            if octet.len() != 2 || !octet.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(MacAddrParseError::Octet {
                    octet: (*octet).to_owned(),
                });
            }
            *byte = u8::from_str_radix(octet, 16).map_err(|_| MacAddrParseError::Octet {
                octet: (*octet).to_owned(),
            })?;
        }
        Ok(MacAddr(mac))
    }
}

/// Why a string is not a valid resource id, or `None` when it is one: 1-255 characters,
/// no whitespace or control characters.
pub fn id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("must not be empty")
    } else if id.chars().count() > 255 {
        Some("is longer than 255 characters")
    } else if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains whitespace or control characters")
    } else {
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpVersion {
    V4,
    V6,
}

impl IpVersion {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpVersion::V4,
            IpAddr::V6(_) => IpVersion::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> Self {
        Self::of(&net.addr())
    }

    /// 4 or 6, as the API spells it.
    pub fn number(self) -> u32 {
        match self {
            IpVersion::V4 => 4,
            IpVersion::V6 => 6,
        }
    }
}

impl fmt::Display for IpVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpVersion::V4 => "IPv4",
            IpVersion::V6 => "IPv6",
        })
    }
}

// ---------------------------------------------------------------------------------
// Networks and subnets
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NetworkType {
    Flat,
    Vlan,
    Vxlan,
    Local,
}

impl fmt::Display for NetworkType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetworkType::Flat => "flat",
            NetworkType::Vlan => "vlan",
            NetworkType::Vxlan => "vxlan",
            NetworkType::Local => "local",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderNetwork {
    pub network_type: NetworkType,
    /// Empty for vxlan and local.
    pub physical_network: String,
    /// VLAN id or VXLAN VNI.
    pub segmentation_id: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub admin_state_up: bool,
    pub shared: bool,
    pub router_external: bool,
    /// 0: the default.
    pub mtu: u32,
    pub provider: Option<ProviderNetwork>,
    /// Default for the network's ports that leave theirs unset.
    pub port_security_enabled: bool,
    pub revision_number: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationPool {
    pub start: IpAddr,
    pub end: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoute {
    pub destination: IpNet,
    pub nexthop: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub id: String,
    pub network_id: String,
    pub ip_version: IpVersion,
    pub cidr: IpNet,
    pub gateway_ip: Option<IpAddr>,
    pub allocation_pools: Vec<AllocationPool>,
    pub dns_nameservers: Vec<IpAddr>,
    pub host_routes: Vec<HostRoute>,
    pub enable_dhcp: bool,
    pub name: String,
    pub project_id: String,
    pub revision_number: u64,
}

// ---------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FixedIp {
    pub subnet_id: String,
    pub ip_address: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedAddressPair {
    /// A host address is held as a /32 or /128.
    pub ip_address: IpNet,
    /// `None`: the port's own MAC.
    pub mac_address: Option<MacAddr>,
}

/// Where the port lives: empty `host` means not bound.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortBinding {
    pub host: String,
    pub interface_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub id: String,
    pub network_id: String,
    pub mac_address: MacAddr,
    pub fixed_ips: Vec<FixedIp>,
    pub allowed_address_pairs: Vec<AllowedAddressPair>,
    pub security_group_ids: Vec<String>,
    /// `None`: the network's `port_security_enabled`.
    pub port_security_enabled: Option<bool>,
    pub admin_state_up: bool,
    pub device_owner: String,
    pub device_id: String,
    pub qos_policy_id: Option<String>,
    pub binding: PortBinding,
    pub name: String,
    pub project_id: String,
    pub revision_number: u64,
}

// ---------------------------------------------------------------------------------
// Security groups
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EtherType {
    Ipv4,
    Ipv6,
}

impl EtherType {
    pub fn ip_version(self) -> IpVersion {
        match self {
            EtherType::Ipv4 => IpVersion::V4,
            EtherType::Ipv6 => IpVersion::V6,
        }
    }
}

impl fmt::Display for EtherType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ip_version().fmt(f)
    }
}

/// The IP protocol a security group rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Any,
    Number(u8),
}

/// Protocol names the Networking API accepts. The first name of a number is the one
/// shown; `icmpv6` is an alias of `ipv6-icmp`.
const PROTOCOL_NAMES: &[(&str, u8)] = &[
    ("ah", 51),
    ("dccp", 33),
    ("egp", 8),
    ("esp", 50),
    ("gre", 47),
    ("icmp", 1),
    ("ipv6-icmp", 58),
    ("icmpv6", 58),
    ("igmp", 2),
    ("ipip", 4),
    ("ipv6-encap", 41),
    ("ipv6-frag", 44),
    ("ipv6-nonxt", 59),
    ("ipv6-opts", 60),
    ("ipv6-route", 43),
    ("ospf", 89),
    ("pgm", 113),
    ("rsvp", 46),
    ("sctp", 132),
    ("tcp", 6),
    ("udp", 17),
    ("udplite", 136),
    ("vrrp", 112),
];

impl Protocol {
    pub const ICMP: Protocol = Protocol::Number(1);
    pub const TCP: Protocol = Protocol::Number(6);
    pub const UDP: Protocol = Protocol::Number(17);
    pub const DCCP: Protocol = Protocol::Number(33);
    pub const IPV6_ICMP: Protocol = Protocol::Number(58);
    pub const SCTP: Protocol = Protocol::Number(132);
    pub const UDPLITE: Protocol = Protocol::Number(136);

    /// The protocol's name, if the Networking API has one for it.
    pub fn name(self) -> Option<&'static str> {
        match self {
            Protocol::Any => None,
            Protocol::Number(number) => PROTOCOL_NAMES
                .iter()
                .find(|(_, n)| *n == number)
                .map(|(name, _)| *name),
        }
    }

    /// Rules of these protocols may give a port range.
    pub fn has_ports(self) -> bool {
        matches!(
            self,
            Protocol::TCP | Protocol::UDP | Protocol::SCTP | Protocol::UDPLITE | Protocol::DCCP
        )
    }

    /// Rules of these protocols may give an ICMP type and code in the port range fields.
    pub fn is_icmp(self) -> bool {
        matches!(self, Protocol::ICMP | Protocol::IPV6_ICMP)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.name()) {
            (Protocol::Any, _) => f.write_str("any"),
            (_, Some(name)) => f.write_str(name),
            (Protocol::Number(number), None) => write!(f, "{number}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a protocol name or number (0-255)")]
pub struct ProtocolParseError {
    pub text: String,
}

impl FromStr for Protocol {
    type Err = ProtocolParseError;

    /// A name (any case), a number 0-255, or empty/`any` for any protocol.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let lower = text.to_ascii_lowercase();
        if lower.is_empty() || lower == "any" {
            return Ok(Protocol::Any);
        }
        if let Some((_, number)) = PROTOCOL_NAMES.iter().find(|(name, _)| *name == lower) {
            return Ok(Protocol::Number(*number));
        }
        // Digits only: u8::from_str would also take "+6".
        if lower.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(number) = lower.parse::<u8>() {
                return Ok(Protocol::Number(number));
            }
        }
        Err(ProtocolParseError {
            text: text.to_owned(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroupRule {
    pub id: String,
    pub direction: Direction,
    pub ethertype: EtherType,
    pub protocol: Protocol,
    /// Ports for port protocols; ICMP type for ICMP.
    pub port_range_min: Option<u32>,
    /// Ports for port protocols; ICMP code for ICMP.
    pub port_range_max: Option<u32>,
    pub remote_ip_prefix: Option<IpNet>,
    pub remote_group_id: Option<String>,
    pub revision_number: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityGroup {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub stateful: bool,
    pub rules: Vec<SecurityGroupRule>,
    pub revision_number: u64,
}

// ---------------------------------------------------------------------------------
// Routers and floating IPs
// ---------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterInterface {
    pub subnet_id: String,
    /// The router's port on that subnet.
    pub port_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalFixedIp {
    pub subnet_id: String,
    pub ip_address: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalGatewayInfo {
    pub network_id: String,
    pub enable_snat: bool,
    pub external_fixed_ips: Vec<ExternalFixedIp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub destination: IpNet,
    pub nexthop: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Router {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub admin_state_up: bool,
    pub interfaces: Vec<RouterInterface>,
    pub external_gateway_info: Option<ExternalGatewayInfo>,
    pub routes: Vec<Route>,
    pub revision_number: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FloatingIp {
    pub id: String,
    pub floating_network_id: String,
    pub floating_ip_address: IpAddr,
    /// `None`: not associated.
    pub port_id: Option<String>,
    pub fixed_ip_address: Option<IpAddr>,
    pub router_id: Option<String>,
    pub project_id: String,
    pub revision_number: u64,
}

// ---------------------------------------------------------------------------------
// QoS
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QosDirection {
    /// Traffic the VM sends.
    Egress,
    Ingress,
}

impl fmt::Display for QosDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QosDirection::Egress => "egress",
            QosDirection::Ingress => "ingress",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BandwidthLimitRule {
    pub id: String,
    pub max_kbps: u64,
    pub max_burst_kbps: u64,
    pub direction: QosDirection,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DscpMarkingRule {
    pub id: String,
    pub dscp_mark: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QosPolicy {
    pub id: String,
    pub name: String,
    pub project_id: String,
    pub bandwidth_limit_rules: Vec<BandwidthLimitRule>,
    pub dscp_marking_rules: Vec<DscpMarkingRule>,
    pub revision_number: u64,
}

// ---------------------------------------------------------------------------------
// Resources, references, changes, state
// ---------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    Network,
    Subnet,
    Port,
    SecurityGroup,
    Router,
    FloatingIp,
    QosPolicy,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 7] = [
        ResourceKind::Network,
        ResourceKind::Subnet,
        ResourceKind::Port,
        ResourceKind::SecurityGroup,
        ResourceKind::Router,
        ResourceKind::FloatingIp,
        ResourceKind::QosPolicy,
    ];

    /// The name of the `Resource` oneof field of this kind: the first element of error
    /// field paths.
    pub fn field_name(self) -> &'static str {
        match self {
            ResourceKind::Network => "network",
            ResourceKind::Subnet => "subnet",
            ResourceKind::Port => "port",
            ResourceKind::SecurityGroup => "security_group",
            ResourceKind::Router => "router",
            ResourceKind::FloatingIp => "floating_ip",
            ResourceKind::QosPolicy => "qos_policy",
        }
    }
}

/// In words, for messages.
impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Network => "network",
            ResourceKind::Subnet => "subnet",
            ResourceKind::Port => "port",
            ResourceKind::SecurityGroup => "security group",
            ResourceKind::Router => "router",
            ResourceKind::FloatingIp => "floating IP",
            ResourceKind::QosPolicy => "QoS policy",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceRef {
    pub kind: ResourceKind,
    pub id: String,
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.id)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    Network(Network),
    Subnet(Subnet),
    Port(Port),
    SecurityGroup(SecurityGroup),
    Router(Router),
    FloatingIp(FloatingIp),
    QosPolicy(QosPolicy),
}

impl Resource {
    /// The resource, borrowed.
    pub fn view(&self) -> ResourceView<'_> {
        match self {
            Resource::Network(r) => ResourceView::Network(r),
            Resource::Subnet(r) => ResourceView::Subnet(r),
            Resource::Port(r) => ResourceView::Port(r),
            Resource::SecurityGroup(r) => ResourceView::SecurityGroup(r),
            Resource::Router(r) => ResourceView::Router(r),
            Resource::FloatingIp(r) => ResourceView::FloatingIp(r),
            Resource::QosPolicy(r) => ResourceView::QosPolicy(r),
        }
    }

    pub fn kind(&self) -> ResourceKind {
        self.view().kind()
    }

    pub fn id(&self) -> &str {
        self.view().id()
    }

    pub fn revision_number(&self) -> u64 {
        self.view().revision_number()
    }

    pub fn reference(&self) -> ResourceRef {
        ResourceRef {
            kind: self.kind(),
            id: self.id().to_owned(),
        }
    }
}

/// A resource borrowed from a request or from the state.
#[derive(Clone, Copy, Debug)]
pub enum ResourceView<'a> {
    Network(&'a Network),
    Subnet(&'a Subnet),
    Port(&'a Port),
    SecurityGroup(&'a SecurityGroup),
    Router(&'a Router),
    FloatingIp(&'a FloatingIp),
    QosPolicy(&'a QosPolicy),
}

impl<'a> ResourceView<'a> {
    pub fn kind(self) -> ResourceKind {
        match self {
            ResourceView::Network(_) => ResourceKind::Network,
            ResourceView::Subnet(_) => ResourceKind::Subnet,
            ResourceView::Port(_) => ResourceKind::Port,
            ResourceView::SecurityGroup(_) => ResourceKind::SecurityGroup,
            ResourceView::Router(_) => ResourceKind::Router,
            ResourceView::FloatingIp(_) => ResourceKind::FloatingIp,
            ResourceView::QosPolicy(_) => ResourceKind::QosPolicy,
        }
    }

    pub fn id(self) -> &'a str {
        match self {
            ResourceView::Network(r) => &r.id,
            ResourceView::Subnet(r) => &r.id,
            ResourceView::Port(r) => &r.id,
            ResourceView::SecurityGroup(r) => &r.id,
            ResourceView::Router(r) => &r.id,
            ResourceView::FloatingIp(r) => &r.id,
            ResourceView::QosPolicy(r) => &r.id,
        }
    }

    pub fn revision_number(self) -> u64 {
        match self {
            ResourceView::Network(r) => r.revision_number,
            ResourceView::Subnet(r) => r.revision_number,
            ResourceView::Port(r) => r.revision_number,
            ResourceView::SecurityGroup(r) => r.revision_number,
            ResourceView::Router(r) => r.revision_number,
            ResourceView::FloatingIp(r) => r.revision_number,
            ResourceView::QosPolicy(r) => r.revision_number,
        }
    }
}

macro_rules! resource_from {
    ($($kind:ident),*) => {$(
        impl From<$kind> for Resource {
            fn from(resource: $kind) -> Self {
                Resource::$kind(resource)
            }
        }
    )*};
}
resource_from!(
    Network,
    Subnet,
    Port,
    SecurityGroup,
    Router,
    FloatingIp,
    QosPolicy
);

// Mostly upserts anyway; boxing would only add an allocation per change.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Create, or replace the resource with the same kind and id.
    Upsert(Resource),
    Delete(ResourceRef),
}

/// The desired state: every resource the API server pushed, by kind and id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub networks: BTreeMap<String, Network>,
    pub subnets: BTreeMap<String, Subnet>,
    /// Shared with the states before and after an Apply (which copies the state): the
    /// largest resources are copied by reference.
    pub ports: BTreeMap<String, Arc<Port>>,
    pub security_groups: BTreeMap<String, Arc<SecurityGroup>>,
    pub routers: BTreeMap<String, Router>,
    pub floating_ips: BTreeMap<String, FloatingIp>,
    pub qos_policies: BTreeMap<String, QosPolicy>,
}

impl State {
    /// The resource `(kind, id)`, if the state holds it.
    pub fn view(&self, kind: ResourceKind, id: &str) -> Option<ResourceView<'_>> {
        match kind {
            ResourceKind::Network => self.networks.get(id).map(ResourceView::Network),
            ResourceKind::Subnet => self.subnets.get(id).map(ResourceView::Subnet),
            ResourceKind::Port => self.ports.get(id).map(|r| ResourceView::Port(r)),
            ResourceKind::SecurityGroup => self
                .security_groups
                .get(id)
                .map(|r| ResourceView::SecurityGroup(r)),
            ResourceKind::Router => self.routers.get(id).map(ResourceView::Router),
            ResourceKind::FloatingIp => self.floating_ips.get(id).map(ResourceView::FloatingIp),
            ResourceKind::QosPolicy => self.qos_policies.get(id).map(ResourceView::QosPolicy),
        }
    }

    pub fn contains(&self, kind: ResourceKind, id: &str) -> bool {
        self.view(kind, id).is_some()
    }

    /// The revision held for a resource, if it exists.
    pub fn revision_number(&self, kind: ResourceKind, id: &str) -> Option<u64> {
        self.view(kind, id).map(ResourceView::revision_number)
    }

    pub fn len(&self) -> usize {
        self.networks.len()
            + self.subnets.len()
            + self.ports.len()
            + self.security_groups.len()
            + self.routers.len()
            + self.floating_ips.len()
            + self.qos_policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(created, updated, deleted)`: resources only in `next`, in both but different,
    /// only in `self`.
    pub fn count_differences(&self, next: &State) -> (u32, u32, u32) {
        let mut counts = (0, 0, 0);
        add_differences(&mut counts, &self.networks, &next.networks);
        add_differences(&mut counts, &self.subnets, &next.subnets);
        add_differences(&mut counts, &self.ports, &next.ports);
        add_differences(&mut counts, &self.security_groups, &next.security_groups);
        add_differences(&mut counts, &self.routers, &next.routers);
        add_differences(&mut counts, &self.floating_ips, &next.floating_ips);
        add_differences(&mut counts, &self.qos_policies, &next.qos_policies);
        counts
    }

    /// What changed from this state to `next`: each new or changed resource as it is in
    /// `next`, each removed one as `None`. Made one at a time as the caller takes them,
    /// so that storing a Sync of every resource does not copy them all at once.
    pub fn changes_to<'a>(
        &'a self,
        next: &'a State,
    ) -> impl Iterator<Item = (ResourceRef, Option<Resource>)> + 'a {
        changes_of(ResourceKind::Network, &self.networks, &next.networks)
            .chain(changes_of(
                ResourceKind::Subnet,
                &self.subnets,
                &next.subnets,
            ))
            .chain(changes_of(ResourceKind::Port, &self.ports, &next.ports))
            .chain(changes_of(
                ResourceKind::SecurityGroup,
                &self.security_groups,
                &next.security_groups,
            ))
            .chain(changes_of(
                ResourceKind::Router,
                &self.routers,
                &next.routers,
            ))
            .chain(changes_of(
                ResourceKind::FloatingIp,
                &self.floating_ips,
                &next.floating_ips,
            ))
            .chain(changes_of(
                ResourceKind::QosPolicy,
                &self.qos_policies,
                &next.qos_policies,
            ))
    }

    /// Inserts or replaces; no checks (the caller validates the resulting state).
    pub(crate) fn insert(&mut self, resource: Resource) {
        match resource {
            Resource::Network(r) => {
                self.networks.insert(r.id.clone(), r);
            }
            Resource::Subnet(r) => {
                self.subnets.insert(r.id.clone(), r);
            }
            Resource::Port(r) => {
                self.ports.insert(r.id.clone(), Arc::new(r));
            }
            Resource::SecurityGroup(r) => {
                self.security_groups.insert(r.id.clone(), Arc::new(r));
            }
            Resource::Router(r) => {
                self.routers.insert(r.id.clone(), r);
            }
            Resource::FloatingIp(r) => {
                self.floating_ips.insert(r.id.clone(), r);
            }
            Resource::QosPolicy(r) => {
                self.qos_policies.insert(r.id.clone(), r);
            }
        }
    }

    /// Removes; no checks. Whether it was there.
    pub(crate) fn remove(&mut self, kind: ResourceKind, id: &str) -> bool {
        match kind {
            ResourceKind::Network => self.networks.remove(id).is_some(),
            ResourceKind::Subnet => self.subnets.remove(id).is_some(),
            ResourceKind::Port => self.ports.remove(id).is_some(),
            ResourceKind::SecurityGroup => self.security_groups.remove(id).is_some(),
            ResourceKind::Router => self.routers.remove(id).is_some(),
            ResourceKind::FloatingIp => self.floating_ips.remove(id).is_some(),
            ResourceKind::QosPolicy => self.qos_policies.remove(id).is_some(),
        }
    }
}

impl From<Arc<Port>> for Resource {
    fn from(port: Arc<Port>) -> Self {
        Resource::Port(Arc::unwrap_or_clone(port))
    }
}

impl From<Arc<SecurityGroup>> for Resource {
    fn from(group: Arc<SecurityGroup>) -> Self {
        Resource::SecurityGroup(Arc::unwrap_or_clone(group))
    }
}

fn changes_of<'a, T: PartialEq + Clone + Into<Resource>>(
    kind: ResourceKind,
    old: &'a BTreeMap<String, T>,
    new: &'a BTreeMap<String, T>,
) -> impl Iterator<Item = (ResourceRef, Option<Resource>)> + 'a {
    let reference = move |id: &String| ResourceRef {
        kind,
        id: id.clone(),
    };
    let changed = new
        .iter()
        .filter(|(id, resource)| old.get(*id) != Some(*resource))
        .map(move |(id, resource)| (reference(id), Some(resource.clone().into())));
    let removed = old
        .keys()
        .filter(|id| !new.contains_key(*id))
        .map(move |id| (reference(id), None));
    changed.chain(removed)
}

fn add_differences<T: PartialEq>(
    (created, updated, deleted): &mut (u32, u32, u32),
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
) {
    for (id, resource) in new {
        match old.get(id) {
            None => *created += 1,
            Some(previous) if previous != resource => *updated += 1,
            Some(_) => {}
        }
    }
    *deleted += old.keys().filter(|id| !new.contains_key(*id)).count() as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_displays_lowercase() {
        let mac: MacAddr = "FA:16:3e:0A:bB:01".parse().unwrap();
        assert_eq!(mac, MacAddr([0xfa, 0x16, 0x3e, 0x0a, 0xbb, 0x01]));
        assert_eq!(mac.to_string(), "fa:16:3e:0a:bb:01");
        assert_eq!(
            "fa:16:3e:0a:bb".parse::<MacAddr>(),
            Err(MacAddrParseError::OctetCount { found: 5 })
        );
        for bad in [
            "fa:16:3e:0a:bb:1",
            "fa:16:3e:0a:bb:+1",
            "fa:16:3e:0a:bb:xx",
            "fa-16-3e-0a-bb-01",
            "",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mac_kinds() {
        assert!(MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(MacAddr([0xff; 6]).is_multicast());
        assert!(!MacAddr([0xfa, 0x16, 0x3e, 0, 0, 1]).is_multicast());
        assert!(MacAddr([0; 6]).is_zero());
    }

    #[test]
    fn eui64_link_local_flips_the_universal_local_bit() {
        let mac: MacAddr = "fa:16:3e:12:34:56".parse().unwrap();
        assert_eq!(
            mac.ipv6_link_local(),
            "fe80::f816:3eff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
        let mac: MacAddr = "00:11:22:33:44:55".parse().unwrap();
        assert_eq!(
            mac.ipv6_link_local(),
            "fe80::211:22ff:fe33:4455".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn protocols_by_name_and_number() {
        let cases = [
            ("", Protocol::Any),
            ("any", Protocol::Any),
            ("ANY", Protocol::Any),
            ("tcp", Protocol::Number(6)),
            ("TCP", Protocol::Number(6)),
            ("udp", Protocol::Number(17)),
            ("icmp", Protocol::Number(1)),
            ("icmpv6", Protocol::Number(58)),
            ("ipv6-icmp", Protocol::Number(58)),
            ("sctp", Protocol::Number(132)),
            ("ah", Protocol::Number(51)),
            ("dccp", Protocol::Number(33)),
            ("egp", Protocol::Number(8)),
            ("esp", Protocol::Number(50)),
            ("gre", Protocol::Number(47)),
            ("igmp", Protocol::Number(2)),
            ("ipip", Protocol::Number(4)),
            ("ipv6-encap", Protocol::Number(41)),
            ("ipv6-frag", Protocol::Number(44)),
            ("ipv6-nonxt", Protocol::Number(59)),
            ("ipv6-opts", Protocol::Number(60)),
            ("ipv6-route", Protocol::Number(43)),
            ("ospf", Protocol::Number(89)),
            ("pgm", Protocol::Number(113)),
            ("rsvp", Protocol::Number(46)),
            ("udplite", Protocol::Number(136)),
            ("vrrp", Protocol::Number(112)),
            ("0", Protocol::Number(0)),
            ("255", Protocol::Number(255)),
            ("6", Protocol::Number(6)),
        ];
        for (text, protocol) in cases {
            assert_eq!(text.parse::<Protocol>(), Ok(protocol), "{text:?}");
        }
        for bad in ["256", "-1", "+6", "tcpp", " tcp"] {
            assert!(bad.parse::<Protocol>().is_err(), "{bad:?}");
        }
        assert_eq!(Protocol::Number(58).to_string(), "ipv6-icmp");
        assert_eq!(Protocol::Number(6).to_string(), "tcp");
        assert_eq!(Protocol::Number(200).to_string(), "200");
        assert_eq!(Protocol::Any.to_string(), "any");
    }

    #[test]
    fn ids() {
        assert_eq!(id_problem("net-1"), None);
        assert_eq!(id_problem(&"x".repeat(255)), None);
        assert!(id_problem("").is_some());
        assert!(id_problem(&"x".repeat(256)).is_some());
        assert!(id_problem("a b").is_some());
        assert!(id_problem("a\u{7}").is_some());
    }
}
