//! The same security-group policy written the way the alternatives would enforce it on
//! a Linux bridge with `br_netfilter` (bridged frames pass the IP hooks, with
//! conntrack):
//!
//! - iptables, as Neutron's iptables firewall driver (`iptables_hybrid`) writes it: a
//!   conntrack zone per network in `raw`, `physdev` dispatch from `FORWARD` into
//!   `neutron-openvswi-sg-chain`, per port an ingress chain `i<port>`, an egress chain
//!   `o<port>` and an anti-spoofing chain `s<port>`, each rule one iptables rule
//!   (`-j RETURN`), unmatched traffic to `sg-fallback` (DROP). Loaded with
//!   `iptables-restore`, for both the legacy (x_tables) and the nft backend.
//! - nftables with sets, as its documentation recommends for large rule sets: one
//!   `ct state` rule, a verdict map per direction to the port's chain, and in each
//!   chain one lookup of (remote, protocol, port) in an interval set of concatenations.
//!   In the inet forward hook a bridged frame's devices are the bridge's, so ports are
//!   told apart by MAC (unicast between ports goes by MAC anyway), their sources
//!   checked against their fixed address.

use std::fmt::Write as _;

use ipnet::Ipv4Net;

use super::traffic::{BenchPort, BenchRule};

/// The one network's conntrack zone (Neutron uses one per network).
const ZONE: u32 = 4097;
const PREFIX: &str = "neutron-openvswi";

/// Chain-name suffix of a port: Neutron uses the first 10 characters of the port id.
fn chain_id(port: &BenchPort) -> String {
    port.id.chars().take(10).collect()
}

fn iptables_match(rule: &BenchRule, remote_flag: &str) -> String {
    let mut m = String::new();
    if rule.remote.prefix_len() != 0 {
        let _ = write!(m, "{remote_flag} {} ", rule.remote);
    }
    let _ = write!(
        m,
        "-p {p} -m {p} --dport {}",
        rule.port,
        p = rule.protocol_name
    );
    m
}

/// An `iptables-restore` input for `ports` on bridge `bridge`.
pub fn iptables_neutron(bridge: &str, ports: &[BenchPort]) -> String {
    let mut raw = String::from("*raw\n");
    let _ = writeln!(raw, ":{PREFIX}-PREROUTING - [0:0]");
    let _ = writeln!(raw, "-A PREROUTING -j {PREFIX}-PREROUTING");
    let _ = writeln!(
        raw,
        "-A {PREFIX}-PREROUTING -i {bridge} -m comment --comment \"Set zone for network\" -j CT --zone {ZONE}"
    );
    for port in ports {
        let _ = writeln!(
            raw,
            "-A {PREFIX}-PREROUTING -m physdev --physdev-in {} -m comment --comment \"Set zone for {}\" -j CT --zone {ZONE}",
            port.device, port.id
        );
    }
    raw.push_str("COMMIT\n");

    let mut f = String::from("*filter\n");
    let mut chains = vec![
        "neutron-filter-top".to_owned(),
        format!("{PREFIX}-FORWARD"),
        format!("{PREFIX}-INPUT"),
        format!("{PREFIX}-local"),
        format!("{PREFIX}-sg-chain"),
        format!("{PREFIX}-sg-fallback"),
    ];
    for port in ports {
        let id = chain_id(port);
        chains.extend(["i", "o", "s"].map(|kind| format!("{PREFIX}-{kind}{id}")));
    }
    for chain in &chains {
        let _ = writeln!(f, ":{chain} - [0:0]");
    }
    let _ = writeln!(f, "-A FORWARD -j neutron-filter-top");
    let _ = writeln!(f, "-A FORWARD -j {PREFIX}-FORWARD");
    let _ = writeln!(f, "-A INPUT -j {PREFIX}-INPUT");
    let _ = writeln!(f, "-A neutron-filter-top -j {PREFIX}-local");
    for port in ports {
        let (dev, id) = (&port.device, chain_id(port));
        for way in ["out", "in"] {
            let _ = writeln!(
                f,
                "-A {PREFIX}-FORWARD -m physdev --physdev-{way} {dev} --physdev-is-bridged -m comment --comment \"Direct traffic from the VM interface to the security group chain.\" -j {PREFIX}-sg-chain"
            );
        }
        let _ = writeln!(
            f,
            "-A {PREFIX}-INPUT -m physdev --physdev-in {dev} --physdev-is-bridged -m comment --comment \"Direct incoming traffic from VM to the security group chain.\" -j {PREFIX}-o{id}"
        );
        let _ = writeln!(
            f,
            "-A {PREFIX}-sg-chain -m physdev --physdev-out {dev} --physdev-is-bridged -m comment --comment \"Jump to the VM specific chain.\" -j {PREFIX}-i{id}"
        );
        let _ = writeln!(
            f,
            "-A {PREFIX}-sg-chain -m physdev --physdev-in {dev} --physdev-is-bridged -m comment --comment \"Jump to the VM specific chain.\" -j {PREFIX}-o{id}"
        );
    }
    let _ = writeln!(f, "-A {PREFIX}-sg-chain -j ACCEPT");
    let _ = writeln!(
        f,
        "-A {PREFIX}-sg-fallback -m comment --comment \"Default drop rule for unmatched traffic.\" -j DROP"
    );
    let established = "-m state --state RELATED,ESTABLISHED -m comment --comment \"Direct packets associated with a known session to the RETURN chain.\" -j RETURN";
    let invalid = "-m state --state INVALID -m comment --comment \"Drop packets that appear related to an existing connection (e.g. TCP ACK/FIN) but do not have an entry in conntrack.\" -j DROP";
    let fallback = format!(
        "-m comment --comment \"Send unmatched traffic to the fallback chain.\" -j {PREFIX}-sg-fallback"
    );
    for port in ports {
        let id = chain_id(port);
        let (i, o, s) = (
            format!("{PREFIX}-i{id}"),
            format!("{PREFIX}-o{id}"),
            format!("{PREFIX}-s{id}"),
        );
        // Ingress: what reaches the VM.
        let _ = writeln!(f, "-A {i} {established}");
        let _ = writeln!(
            f,
            "-A {i} -d {}/32 -p udp -m udp --sport 67 --dport 68 -j RETURN",
            port.ip
        );
        for rule in &port.ingress {
            let _ = writeln!(f, "-A {i} {} -j RETURN", iptables_match(rule, "-s"));
        }
        let _ = writeln!(f, "-A {i} {invalid}");
        let _ = writeln!(f, "-A {i} {fallback}");
        // Egress: what the VM sends.
        let _ = writeln!(
            f,
            "-A {o} -s 0.0.0.0/32 -d 255.255.255.255/32 -p udp -m udp --sport 68 --dport 67 -m comment --comment \"Allow DHCP client traffic.\" -j RETURN"
        );
        let _ = writeln!(f, "-A {o} -j {s}");
        let _ = writeln!(
            f,
            "-A {o} -p udp -m udp --sport 68 --dport 67 -m comment --comment \"Allow DHCP client traffic.\" -j RETURN"
        );
        let _ = writeln!(
            f,
            "-A {o} -p udp -m udp --sport 67 -m udp --dport 68 -m comment --comment \"Prevent DHCP Spoofing by VM.\" -j DROP"
        );
        let _ = writeln!(f, "-A {o} {established}");
        for rule in &port.egress {
            let _ = writeln!(f, "-A {o} {} -j RETURN", iptables_match(rule, "-d"));
        }
        let _ = writeln!(f, "-A {o} {invalid}");
        let _ = writeln!(f, "-A {o} {fallback}");
        // Anti-spoofing.
        let _ = writeln!(
            f,
            "-A {s} -s {}/32 -m mac --mac-source {} -m comment --comment \"Allow traffic from defined IP/MAC pairs.\" -j RETURN",
            port.ip,
            mac_text(port.mac).to_uppercase()
        );
        let _ = writeln!(
            f,
            "-A {s} -m comment --comment \"Drop traffic without an IP/MAC allow rule.\" -j DROP"
        );
    }
    f.push_str("COMMIT\n");
    raw + &f
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn set_elements(rules: &[BenchRule]) -> String {
    rules
        .iter()
        .map(|rule| {
            let remote: Ipv4Net = rule.remote;
            format!("{remote} . {} . {}", rule.protocol_name, rule.port)
        })
        .collect::<Vec<_>>()
        .join(",\n      ")
}

/// An `nft -f` input: table `inet dataplane_bench` enforcing `ports`' rules with sets.
pub fn nftables_sets(ports: &[BenchPort]) -> String {
    let mut t = String::from("table inet dataplane_bench {\n");
    for port in ports {
        for (way, rules) in [("egress", &port.egress), ("ingress", &port.ingress)] {
            let elements = if rules.is_empty() {
                String::new()
            } else {
                format!("    elements = {{\n      {}\n    }}\n", set_elements(rules))
            };
            let _ = writeln!(
                t,
                "  set {}_{way}_rules {{\n    type ipv4_addr . inet_proto . inet_service\n    flags interval\n{elements}  }}",
                port.id
            );
        }
        let _ = writeln!(
            t,
            "  chain {id}_egress {{\n    ip saddr != {ip} drop\n    ip daddr . meta l4proto . th dport @{id}_egress_rules return\n    drop\n  }}",
            id = port.id,
            ip = port.ip
        );
        let _ = writeln!(
            t,
            "  chain {id}_ingress {{\n    ip saddr . meta l4proto . th dport @{id}_ingress_rules return\n    drop\n  }}",
            id = port.id
        );
    }
    let by_mac = |way: &str| {
        ports
            .iter()
            .map(|port| format!("{} : jump {}_{way}", mac_text(port.mac), port.id))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let macs = ports
        .iter()
        .map(|port| mac_text(port.mac))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        t,
        "  chain forward {{\n    type filter hook forward priority filter; policy drop;\n    ct state established,related accept\n    ct state invalid drop\n    ether saddr != {{ {macs} }} drop\n    ether saddr vmap {{ {} }}\n    ether daddr vmap {{ {} }}\n    accept\n  }}",
        by_mac("egress"),
        by_mac("ingress")
    );
    t.push_str("}\n");
    t
}
