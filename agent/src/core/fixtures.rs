//! Builders of valid resources for the core's tests: each test changes what it is about.

use std::net::IpAddr;

use ipnet::IpNet;

use super::model::*;

pub fn mac(text: &str) -> MacAddr {
    text.parse().expect("test MAC")
}

pub fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

pub fn net(text: &str) -> IpNet {
    text.parse().expect("test prefix")
}

pub fn network(id: &str) -> Network {
    Network {
        id: id.to_owned(),
        name: format!("{id}-name"),
        project_id: "project".to_owned(),
        admin_state_up: true,
        shared: false,
        router_external: false,
        mtu: 0,
        provider: None,
        port_security_enabled: true,
        revision_number: 1,
    }
}

pub fn external_network(id: &str) -> Network {
    Network {
        router_external: true,
        ..network(id)
    }
}

pub fn subnet(id: &str, network_id: &str, cidr: &str) -> Subnet {
    let cidr = net(cidr);
    Subnet {
        id: id.to_owned(),
        network_id: network_id.to_owned(),
        ip_version: IpVersion::of_net(&cidr),
        cidr,
        gateway_ip: None,
        allocation_pools: Vec::new(),
        dns_nameservers: Vec::new(),
        host_routes: Vec::new(),
        enable_dhcp: true,
        name: String::new(),
        project_id: "project".to_owned(),
        revision_number: 1,
    }
}

pub fn port(id: &str, network_id: &str, mac_address: &str) -> Port {
    Port {
        id: id.to_owned(),
        network_id: network_id.to_owned(),
        mac_address: mac(mac_address),
        fixed_ips: Vec::new(),
        allowed_address_pairs: Vec::new(),
        security_group_ids: Vec::new(),
        port_security_enabled: None,
        admin_state_up: true,
        device_owner: "compute:nova".to_owned(),
        device_id: format!("vm-{id}"),
        qos_policy_id: None,
        binding: PortBinding::default(),
        name: String::new(),
        project_id: "project".to_owned(),
        revision_number: 1,
    }
}

pub fn fixed_ip(subnet_id: &str, address: &str) -> FixedIp {
    FixedIp {
        subnet_id: subnet_id.to_owned(),
        ip_address: ip(address),
    }
}

pub fn pair(address: &str, mac_address: Option<&str>) -> AllowedAddressPair {
    AllowedAddressPair {
        ip_address: address.parse().unwrap_or_else(|_| IpNet::from(ip(address))),
        mac_address: mac_address.map(mac),
    }
}

pub fn bound(mut port: Port, host: &str, interface_name: &str) -> Port {
    port.binding = PortBinding {
        host: host.to_owned(),
        interface_name: interface_name.to_owned(),
    };
    port
}

pub fn security_group(id: &str) -> SecurityGroup {
    SecurityGroup {
        id: id.to_owned(),
        project_id: "project".to_owned(),
        name: String::new(),
        stateful: true,
        rules: Vec::new(),
        revision_number: 1,
    }
}

/// Ingress IPv4 TCP from anywhere, any port.
pub fn rule(id: &str) -> SecurityGroupRule {
    SecurityGroupRule {
        id: id.to_owned(),
        direction: Direction::Ingress,
        ethertype: EtherType::Ipv4,
        protocol: Protocol::TCP,
        port_range_min: None,
        port_range_max: None,
        remote_ip_prefix: None,
        remote_group_id: None,
        revision_number: 1,
    }
}

pub fn router(id: &str) -> Router {
    Router {
        id: id.to_owned(),
        name: String::new(),
        project_id: "project".to_owned(),
        admin_state_up: true,
        interfaces: Vec::new(),
        external_gateway_info: None,
        routes: Vec::new(),
        revision_number: 1,
    }
}

pub fn interface(subnet_id: &str, port_id: Option<&str>) -> RouterInterface {
    RouterInterface {
        subnet_id: subnet_id.to_owned(),
        port_id: port_id.map(str::to_owned),
    }
}

pub fn floating_ip(id: &str, network_id: &str, address: &str) -> FloatingIp {
    FloatingIp {
        id: id.to_owned(),
        floating_network_id: network_id.to_owned(),
        floating_ip_address: ip(address),
        port_id: None,
        fixed_ip_address: None,
        router_id: None,
        project_id: "project".to_owned(),
        revision_number: 1,
    }
}

pub fn qos_policy(id: &str) -> QosPolicy {
    QosPolicy {
        id: id.to_owned(),
        name: String::new(),
        project_id: "project".to_owned(),
        bandwidth_limit_rules: Vec::new(),
        dscp_marking_rules: Vec::new(),
        revision_number: 1,
    }
}

pub fn upsert(resource: impl Into<Resource>) -> Change {
    Change::Upsert(resource.into())
}

pub fn delete(kind: ResourceKind, id: &str) -> Change {
    Change::Delete(ResourceRef {
        kind,
        id: id.to_owned(),
    })
}

/// n1 (10.0.0.0/24 as s1, 2001:db8:1::/64 as s6), external network ext (203.0.113.0/24
/// as ext-s), security group sg1, QoS policy q1, and port p1 on n1 at 10.0.0.5.
pub fn base_state() -> State {
    let mut p1 = port("p1", "n1", "fa:16:3e:00:00:01");
    p1.fixed_ips = vec![fixed_ip("s1", "10.0.0.5")];
    p1.security_group_ids = vec!["sg1".to_owned()];
    State::replace(vec![
        network("n1").into(),
        subnet("s1", "n1", "10.0.0.0/24").into(),
        subnet("s6", "n1", "2001:db8:1::/64").into(),
        external_network("ext").into(),
        subnet("ext-s", "ext", "203.0.113.0/24").into(),
        security_group("sg1").into(),
        qos_policy("q1").into(),
        p1.into(),
    ])
    .expect("base state is valid")
}
