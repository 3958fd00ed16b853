//! Builders for `dataplane.v1` requests, as an API server would send them.

use dataplane_proto::v1 as pb;

pub fn network(id: &str) -> pb::Network {
    pb::Network {
        id: id.to_owned(),
        name: id.to_owned(),
        project_id: "tenant".to_owned(),
        admin_state_up: true,
        mtu: 1500,
        provider: Some(pb::ProviderNetwork {
            network_type: pb::NetworkType::Local as i32,
            ..Default::default()
        }),
        port_security_enabled: true,
        revision_number: 1,
        ..Default::default()
    }
}

pub fn subnet(id: &str, network_id: &str, cidr: &str) -> pb::Subnet {
    let ip_version = if cidr.contains(':') { 6 } else { 4 };
    pb::Subnet {
        id: id.to_owned(),
        network_id: network_id.to_owned(),
        ip_version,
        cidr: cidr.to_owned(),
        name: id.to_owned(),
        project_id: "tenant".to_owned(),
        revision_number: 1,
        ..Default::default()
    }
}

/// The group every test port is in, like Neutron's `default`: everything out, and in
/// from other members of the group.
pub const DEFAULT_GROUP: &str = "default";

pub fn default_security_group() -> pb::SecurityGroup {
    security_group(
        DEFAULT_GROUP,
        true,
        vec![
            rule(
                "default-egress-v4",
                pb::Direction::Egress,
                pb::EtherType::Ipv4,
                "",
            ),
            rule(
                "default-egress-v6",
                pb::Direction::Egress,
                pb::EtherType::Ipv6,
                "",
            ),
            pb::SecurityGroupRule {
                remote_group_id: DEFAULT_GROUP.to_owned(),
                ..rule(
                    "default-ingress-v4",
                    pb::Direction::Ingress,
                    pb::EtherType::Ipv4,
                    "",
                )
            },
            pb::SecurityGroupRule {
                remote_group_id: DEFAULT_GROUP.to_owned(),
                ..rule(
                    "default-ingress-v6",
                    pb::Direction::Ingress,
                    pb::EtherType::Ipv6,
                    "",
                )
            },
        ],
    )
}

pub fn security_group(
    id: &str,
    stateful: bool,
    rules: Vec<pb::SecurityGroupRule>,
) -> pb::SecurityGroup {
    pb::SecurityGroup {
        id: id.to_owned(),
        project_id: "tenant".to_owned(),
        name: id.to_owned(),
        stateful,
        rules,
        revision_number: 1,
    }
}

/// A rule for `protocol` ("" for any) from/to anywhere; set ports and remotes with
/// struct update syntax.
pub fn rule(
    id: &str,
    direction: pb::Direction,
    ethertype: pb::EtherType,
    protocol: &str,
) -> pb::SecurityGroupRule {
    pb::SecurityGroupRule {
        id: id.to_owned(),
        direction: direction as i32,
        ethertype: ethertype as i32,
        protocol: protocol.to_owned(),
        revision_number: 1,
        ..Default::default()
    }
}

/// A port bound to `host`'s device `interface`, with `(subnet_id, address)` fixed IPs,
/// in the default security group.
pub fn port(
    id: &str,
    network_id: &str,
    mac: &str,
    fixed_ips: &[(&str, &str)],
    host: &str,
    interface: &str,
) -> pb::Port {
    pb::Port {
        id: id.to_owned(),
        network_id: network_id.to_owned(),
        mac_address: mac.to_owned(),
        fixed_ips: fixed_ips
            .iter()
            .map(|(subnet_id, ip)| pb::FixedIp {
                subnet_id: (*subnet_id).to_owned(),
                ip_address: (*ip).to_owned(),
            })
            .collect(),
        security_group_ids: vec![DEFAULT_GROUP.to_owned()],
        admin_state_up: true,
        device_owner: "compute:nova".to_owned(),
        binding: Some(pb::PortBinding {
            host: host.to_owned(),
            interface_name: interface.to_owned(),
        }),
        name: id.to_owned(),
        project_id: "tenant".to_owned(),
        revision_number: 1,
        ..Default::default()
    }
}

/// A router's interface port on `network_id` (no binding: a distributed router lives
/// on every node), with `(subnet_id, address)` fixed IPs.
pub fn router_port(id: &str, network_id: &str, mac: &str, fixed_ips: &[(&str, &str)]) -> pb::Port {
    pb::Port {
        security_group_ids: Vec::new(),
        port_security_enabled: Some(false),
        device_owner: "network:router_interface".to_owned(),
        binding: None,
        ..port(id, network_id, mac, fixed_ips, "", "")
    }
}

/// An admin-up router with an interface on each `(subnet_id, port_id)`.
pub fn router(id: &str, interfaces: &[(&str, &str)]) -> pb::Router {
    pb::Router {
        id: id.to_owned(),
        name: id.to_owned(),
        project_id: "tenant".to_owned(),
        admin_state_up: true,
        interfaces: interfaces
            .iter()
            .map(|(subnet_id, port_id)| pb::RouterInterface {
                subnet_id: (*subnet_id).to_owned(),
                port_id: (*port_id).to_owned(),
            })
            .collect(),
        revision_number: 1,
        ..Default::default()
    }
}

/// A flat provider network that routers use as their external gateway.
pub fn external_network(id: &str) -> pb::Network {
    pb::Network {
        router_external: true,
        port_security_enabled: false,
        ..network(id)
    }
}

/// The port of router `router_id`'s gateway on external network `network_id`.
pub fn gateway_port(
    id: &str,
    router_id: &str,
    network_id: &str,
    mac: &str,
    fixed_ips: &[(&str, &str)],
) -> pb::Port {
    pb::Port {
        security_group_ids: Vec::new(),
        port_security_enabled: Some(false),
        device_owner: "network:router_gateway".to_owned(),
        device_id: router_id.to_owned(),
        binding: None,
        ..port(id, network_id, mac, fixed_ips, "", "")
    }
}

/// `router` with an external gateway on `network_id` at `address` of `subnet_id`.
pub fn with_gateway(
    router: pb::Router,
    network_id: &str,
    subnet_id: &str,
    address: &str,
    enable_snat: bool,
) -> pb::Router {
    pb::Router {
        external_gateway_info: Some(pb::ExternalGatewayInfo {
            network_id: network_id.to_owned(),
            enable_snat,
            external_fixed_ips: vec![pb::ExternalFixedIp {
                subnet_id: subnet_id.to_owned(),
                ip_address: address.to_owned(),
            }],
        }),
        ..router
    }
}

/// Floating IP `address` on `network_id`, associated with `port_id` if not empty.
pub fn floating_ip(id: &str, network_id: &str, address: &str, port_id: &str) -> pb::FloatingIp {
    pb::FloatingIp {
        id: id.to_owned(),
        floating_network_id: network_id.to_owned(),
        floating_ip_address: address.to_owned(),
        port_id: port_id.to_owned(),
        project_id: "tenant".to_owned(),
        revision_number: 1,
        ..Default::default()
    }
}

/// Any resource message, wrapped as `Resource`.
pub trait IntoResource {
    fn into_resource(self) -> pb::Resource;
}

macro_rules! into_resource {
    ($($message:ident => $variant:ident),+ $(,)?) => {$(
        impl IntoResource for pb::$message {
            fn into_resource(self) -> pb::Resource {
                pb::Resource { kind: Some(pb::resource::Kind::$variant(self)) }
            }
        }
    )+};
}

into_resource!(
    Network => Network,
    Subnet => Subnet,
    Port => Port,
    SecurityGroup => SecurityGroup,
    Router => Router,
    FloatingIp => FloatingIp,
    QosPolicy => QosPolicy,
);

pub fn upsert(resource: impl IntoResource) -> pb::Change {
    pb::Change {
        op: Some(pb::change::Op::Upsert(resource.into_resource())),
    }
}

pub fn delete(kind: pb::ResourceKind, id: &str) -> pb::Change {
    pb::Change {
        op: Some(pb::change::Op::Delete(pb::ResourceRef {
            kind: kind as i32,
            id: id.to_owned(),
        })),
    }
}

pub fn apply(changes: Vec<pb::Change>) -> pb::ApplyRequest {
    pb::ApplyRequest { changes }
}
