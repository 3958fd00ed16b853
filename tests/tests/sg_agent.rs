//! Integration: security groups enforced by the real agent on real TCP, UDP and ICMP
//! between VM namespaces, both what passes and what is blocked. Needs root.

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{bail, Result};
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use dataplane_tests::{
    agent::Agent,
    api::{apply, network, port, rule, security_group, subnet, upsert},
    netns::NetNs,
    topology::Vm,
    traffic::{echo_round_trip, tcp_connect, tcp_works, udp_socket, EchoServer},
};
use tonic::transport::Channel;

const NODE: &str = "sg-node";

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

/// Three VMs on one network: a (10.0.0.1, fd00:1::1), b (.2), c (.3), with the given
/// groups and each port's group list.
struct Lab {
    agent: Agent,
    client: DataplaneClient<Channel>,
    vms: Vec<Vm>,
    _node: NetNs,
}

const NAMES: [&str; 3] = ["a", "b", "c"];

impl Lab {
    async fn start(
        tag: &str,
        groups: Vec<pb::SecurityGroup>,
        memberships: [&[&str]; 3],
    ) -> Result<Lab> {
        Self::start_with(tag, groups, memberships, &[]).await
    }

    /// As [`Lab::start`], the agent run with `flags`.
    async fn start_with(
        tag: &str,
        groups: Vec<pb::SecurityGroup>,
        memberships: [&[&str]; 3],
        flags: &[&str],
    ) -> Result<Lab> {
        let node = NetNs::new(&format!("{tag}-node"))?;
        let agent = Agent::start_with(&node, NODE, flags).await?;
        let mut vms = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let host = i + 1;
            vms.push(Vm::create(
                &node,
                &format!("{tag}-{name}"),
                &format!("tap-{name}"),
                [0xfa, 0x16, 0x3e, 0, 0, host as u8],
                &[
                    format!("10.0.0.{host}/24").parse()?,
                    format!("fd00:1::{host}/64").parse()?,
                ],
            )?);
        }
        let mut changes: Vec<pb::Change> = groups.into_iter().map(upsert).collect();
        changes.push(upsert(network("net")));
        changes.push(upsert(subnet("sub4", "net", "10.0.0.0/24")));
        changes.push(upsert(subnet("sub6", "net", "fd00:1::/64")));
        for (i, name) in NAMES.iter().enumerate() {
            changes.push(upsert(lab_port(name, i + 1, memberships[i], 1)));
        }
        let mut client = agent.client().await?;
        client.apply(apply(changes)).await?;
        let lab = Lab {
            agent,
            client,
            vms,
            _node: node,
        };
        lab.wait_active().await?;
        Ok(lab)
    }

    fn vm(&self, name: &str) -> &Vm {
        &self.vms[NAMES.iter().position(|n| *n == name).unwrap()]
    }

    async fn wait_active(&self) -> Result<()> {
        let mut client = self.client.clone();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for name in NAMES {
            loop {
                let status = client
                    .get_port(pb::GetRequest { id: name.into() })
                    .await?
                    .into_inner()
                    .status
                    .unwrap_or_default();
                if status.status == pb::Status::Active as i32 {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("port {name}: {status:?}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    async fn apply(&mut self, changes: Vec<pb::Change>) -> Result<()> {
        self.client.apply(apply(changes)).await?;
        Ok(())
    }

    async fn drops(&mut self, port_id: &str, reason: pb::DropReason) -> Result<u64> {
        let counters = self
            .client
            .get_port_counters(pb::GetPortCountersRequest {
                port_id: port_id.to_owned(),
            })
            .await?
            .into_inner();
        Ok(counters
            .ports
            .iter()
            .flat_map(|p| &p.drops)
            .filter(|d| d.reason == reason as i32)
            .map(|d| d.packets)
            .sum())
    }
}

fn lab_port(name: &str, host: usize, groups: &[&str], revision: u64) -> pb::Port {
    let mut port = port(
        name,
        "net",
        &format!("fa:16:3e:00:00:{host:02x}"),
        &[
            ("sub4", &format!("10.0.0.{host}")),
            ("sub6", &format!("fd00:1::{host}")),
        ],
        NODE,
        &format!("tap-{name}"),
    );
    port.security_group_ids = groups.iter().map(|g| (*g).to_owned()).collect();
    port.revision_number = revision;
    port
}

fn egress_all(id: &str) -> Vec<pb::SecurityGroupRule> {
    vec![
        rule(
            &format!("{id}-out4"),
            pb::Direction::Egress,
            pb::EtherType::Ipv4,
            "",
        ),
        rule(
            &format!("{id}-out6"),
            pb::Direction::Egress,
            pb::EtherType::Ipv6,
            "",
        ),
    ]
}

fn tcp_in(id: &str, ethertype: pb::EtherType, port: u32, remote: &str) -> pb::SecurityGroupRule {
    pb::SecurityGroupRule {
        port_range_min: Some(port),
        port_range_max: Some(port),
        remote_ip_prefix: remote.to_owned(),
        ..rule(id, pb::Direction::Ingress, ethertype, "tcp")
    }
}

/// Clients: everything out, nothing in.
fn client_group() -> pb::SecurityGroup {
    security_group("client", true, egress_all("client"))
}

#[tokio::test]
async fn a_port_opened_to_one_remote_prefix_only() -> Result<()> {
    let mut web = egress_all("web");
    web.push(tcp_in("web-8080", pb::EtherType::Ipv4, 8080, "10.0.0.1/32"));
    web.push(tcp_in(
        "web-8080-v6",
        pb::EtherType::Ipv6,
        8080,
        "fd00:1::1/128",
    ));
    let mut lab = Lab::start(
        "sgprefix",
        vec![security_group("web", true, web), client_group()],
        [&["client"], &["web"], &["client"]],
    )
    .await?;
    let _v4 = EchoServer::tcp(&lab.vm("b").ns, addr("10.0.0.2:8080"))?;
    let _v6 = EchoServer::tcp(&lab.vm("b").ns, addr("[fd00:1::2]:8080"))?;
    let _other = EchoServer::tcp(&lab.vm("b").ns, addr("10.0.0.2:8081"))?;

    assert!(
        tcp_works(&lab.vm("a").ns, addr("10.0.0.2:8080")),
        "a is the allowed prefix"
    );
    assert!(
        tcp_works(&lab.vm("a").ns, addr("[fd00:1::2]:8080")),
        "and over IPv6"
    );
    assert!(
        !tcp_works(&lab.vm("c").ns, addr("10.0.0.2:8080")),
        "c is not"
    );
    assert!(
        !tcp_works(&lab.vm("c").ns, addr("[fd00:1::2]:8080")),
        "c is not, IPv6"
    );
    assert!(
        !tcp_works(&lab.vm("a").ns, addr("10.0.0.2:8081")),
        "8081 is not open"
    );
    assert!(lab.drops("b", pb::DropReason::PolicyDenied).await? > 0);

    // The allowing rule counted what it let in.
    let rules = lab
        .client
        .get_rule_counters(pb::GetRuleCountersRequest {
            security_group_id: "web".into(),
        })
        .await?
        .into_inner()
        .rules;
    let allowed = rules.iter().find(|r| r.rule_id == "web-8080").unwrap();
    assert!(allowed.packets > 0 && allowed.bytes > 0, "{rules:?}");
    Ok(())
}

#[tokio::test]
async fn replies_of_outgoing_connections_need_no_ingress_rule() -> Result<()> {
    let mut web = egress_all("web");
    web.push(tcp_in("web-8080", pb::EtherType::Ipv4, 8080, ""));
    let mut lab = Lab::start(
        "sgreply",
        vec![security_group("web", true, web), client_group()],
        [&["client"], &["web"], &["client"]],
    )
    .await?;
    let _b = EchoServer::tcp(&lab.vm("b").ns, addr("10.0.0.2:8080"))?;
    let _a = EchoServer::tcp(&lab.vm("a").ns, addr("10.0.0.1:8080"))?;
    assert!(
        tcp_works(&lab.vm("a").ns, addr("10.0.0.2:8080")),
        "a's replies come back"
    );
    assert!(
        !tcp_works(&lab.vm("b").ns, addr("10.0.0.1:8080")),
        "nothing may open towards a"
    );

    // The connection is tracked on both ports, and can be listed and flushed.
    let mut stream = tcp_connect(&lab.vm("a").ns, addr("10.0.0.2:8080"))?;
    echo_round_trip(&mut stream, b"hello")?;
    let listed = lab
        .client
        .list_connections(pb::ListConnectionsRequest {
            port_id: "a".into(),
        })
        .await?
        .into_inner()
        .connections;
    let tracked = listed
        .iter()
        .find(|c| {
            c.destination.as_ref().is_some_and(|d| d.port == 8080)
                && c.state == pb::ConnectionState::Established as i32
        })
        .unwrap_or_else(|| panic!("no established connection to 8080 in {listed:?}"));
    assert_eq!(tracked.direction, pb::ConnectionDirection::Egress as i32);
    let flushed = lab
        .client
        .flush_connections(pb::FlushConnectionsRequest {
            port_id: "a".into(),
        })
        .await?
        .into_inner()
        .flushed;
    assert!(flushed > 0);
    // a's next segment is picked up again: its egress rules allow it.
    echo_round_trip(&mut stream, b"again")?;
    Ok(())
}

#[tokio::test]
async fn a_full_conntrack_table_drops_new_connections_keeps_established_ones_and_says_so(
) -> Result<()> {
    let mut web = egress_all("web");
    web.push(tcp_in("web-8080", pb::EtherType::Ipv4, 8080, ""));
    let mut lab = Lab::start_with(
        "sgfull",
        vec![security_group("web", true, web), client_group()],
        [&["client"], &["web"], &["client"]],
        &["--conntrack-entries", "16"],
    )
    .await?;
    let _server = EchoServer::tcp(&lab.vm("b").ns, addr("10.0.0.2:8080"))?;
    // Connections are held open until one cannot be opened: each takes an entry in
    // a's zone and one in b's.
    let mut open = Vec::new();
    let refused = loop {
        anyhow::ensure!(open.len() < 40, "40 connections fit in 16 entries");
        match tcp_connect(&lab.vm("a").ns, addr("10.0.0.2:8080"))
            .and_then(|mut s| echo_round_trip(&mut s, b"hello").map(|()| s))
        {
            Ok(stream) => open.push(stream),
            Err(_) => break open.len(),
        }
    };
    assert!(
        refused >= 4,
        "only {refused} connections before the table was full"
    );
    for stream in &mut open {
        echo_round_trip(stream, b"still here")?;
    }
    let full = lab.drops("a", pb::DropReason::CtTableFull).await?
        + lab.drops("b", pb::DropReason::CtTableFull).await?;
    assert!(full > 0, "the drops are counted as ct_table_full");
    let stats = lab
        .client
        .get_conntrack_stats(pb::GetConntrackStatsRequest {})
        .await?
        .into_inner();
    assert!(stats.table_full_drops > 0, "{stats:?}");
    // The next expiry sweep (every 5 s) logs it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while !lab.agent.logs().contains("conntrack table full") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            lab.agent.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test]
async fn icmp_errors_about_a_connection_pass_back() -> Result<()> {
    let mut open_udp = egress_all("udp");
    open_udp.push(rule(
        "udp-in",
        pb::Direction::Ingress,
        pb::EtherType::Ipv4,
        "udp",
    ));
    let mut lab = Lab::start(
        "sgicmp",
        vec![security_group("udp", true, open_udp), client_group()],
        [&["client"], &["udp"], &["client"]],
    )
    .await?;
    // Nobody listens on b:9999: b's kernel answers with port unreachable, which only
    // reaches a (no ingress rules) as an error related to a's datagram.
    let socket = udp_socket(&lab.vm("a").ns, addr("10.0.0.1:40000"))?;
    socket.connect(addr("10.0.0.2:9999"))?;
    let mut refused = false;
    for _ in 0..3 {
        socket.send(b"anyone?")?;
        match socket.recv(&mut [0u8; 64]) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => {}
        }
    }
    assert!(refused, "the ICMP port unreachable did not come back");
    let stats = lab
        .client
        .get_conntrack_stats(pb::GetConntrackStatsRequest {})
        .await?
        .into_inner();
    assert!(stats.related > 0, "{stats:?}");
    Ok(())
}

#[tokio::test]
async fn remote_group_membership_changes_take_effect_for_new_and_existing_connections() -> Result<()>
{
    let mut db = egress_all("db");
    db.push(pb::SecurityGroupRule {
        port_range_min: Some(5432),
        port_range_max: Some(5432),
        remote_group_id: "app".into(),
        ..rule(
            "db-from-app",
            pb::Direction::Ingress,
            pb::EtherType::Ipv4,
            "tcp",
        )
    });
    let mut lab = Lab::start(
        "sggroup",
        vec![
            security_group("db", true, db),
            security_group("app", true, egress_all("app")),
            client_group(),
        ],
        [&["app"], &["db"], &["client"]],
    )
    .await?;
    let _server = EchoServer::tcp(&lab.vm("b").ns, addr("10.0.0.2:5432"))?;
    let mut open = tcp_connect(&lab.vm("a").ns, addr("10.0.0.2:5432"))?;
    echo_round_trip(&mut open, b"member")?;
    assert!(
        !tcp_works(&lab.vm("c").ns, addr("10.0.0.2:5432")),
        "c is not in app"
    );

    // a leaves app, c joins it.
    lab.apply(vec![
        upsert(lab_port("a", 1, &["client"], 2)),
        upsert(lab_port("c", 3, &["app"], 2)),
    ])
    .await?;
    assert!(
        echo_round_trip(&mut open, b"still?").is_err(),
        "a's open connection is cut"
    );
    assert!(
        !tcp_works(&lab.vm("a").ns, addr("10.0.0.2:5432")),
        "a cannot reconnect"
    );
    assert!(
        tcp_works(&lab.vm("c").ns, addr("10.0.0.2:5432")),
        "c, now a member, can"
    );
    assert!(lab.drops("b", pb::DropReason::ConnectionRevoked).await? > 0);
    Ok(())
}

#[tokio::test]
async fn removing_a_rule_cuts_an_established_connection() -> Result<()> {
    let mut web = egress_all("web");
    web.push(tcp_in("web-8080", pb::EtherType::Ipv4, 8080, ""));
    let mut lab = Lab::start(
        "sgcut",
        vec![security_group("web", true, web.clone()), client_group()],
        [&["client"], &["web"], &["client"]],
    )
    .await?;
    let _server = EchoServer::tcp(&lab.vm("b").ns, addr("10.0.0.2:8080"))?;
    let mut stream = tcp_connect(&lab.vm("a").ns, addr("10.0.0.2:8080"))?;
    echo_round_trip(&mut stream, b"before")?;

    web.retain(|r| r.id != "web-8080");
    let mut group = security_group("web", true, web);
    group.revision_number = 2;
    lab.apply(vec![upsert(group)]).await?;
    assert!(
        echo_round_trip(&mut stream, b"after").is_err(),
        "the connection goes on"
    );
    assert!(lab.drops("b", pb::DropReason::ConnectionRevoked).await? > 0);
    Ok(())
}

#[tokio::test]
async fn stateless_groups_need_rules_for_both_directions() -> Result<()> {
    let server_rules = vec![tcp_in("srv-8080", pb::EtherType::Ipv4, 8080, "")];
    let client_rules = egress_all("cli");
    let mut lab = Lab::start(
        "sgstateless",
        vec![
            security_group("srv", false, server_rules.clone()),
            security_group("cli", false, client_rules.clone()),
        ],
        [&["cli"], &["srv"], &["cli"]],
    )
    .await?;
    let _server = EchoServer::tcp(&lab.vm("b").ns, addr("10.0.0.2:8080"))?;
    assert!(
        !tcp_works(&lab.vm("a").ns, addr("10.0.0.2:8080")),
        "no rule lets replies out of b or into a"
    );

    // Replies: out of b from 8080, into a on its ephemeral ports.
    let mut server_rules = server_rules;
    server_rules.push(pb::SecurityGroupRule {
        ..rule("srv-out", pb::Direction::Egress, pb::EtherType::Ipv4, "tcp")
    });
    let mut client_rules = client_rules;
    client_rules.push(pb::SecurityGroupRule {
        port_range_min: Some(1024),
        port_range_max: Some(65535),
        ..rule(
            "cli-replies",
            pb::Direction::Ingress,
            pb::EtherType::Ipv4,
            "tcp",
        )
    });
    let mut srv = security_group("srv", false, server_rules);
    srv.revision_number = 2;
    let mut cli = security_group("cli", false, client_rules);
    cli.revision_number = 2;
    lab.apply(vec![upsert(srv), upsert(cli)]).await?;
    assert!(
        tcp_works(&lab.vm("a").ns, addr("10.0.0.2:8080")),
        "with rules both ways it works"
    );
    let connections = lab
        .client
        .list_connections(pb::ListConnectionsRequest::default())
        .await?
        .into_inner()
        .connections;
    assert!(
        connections.is_empty(),
        "stateless groups track nothing: {connections:?}"
    );
    Ok(())
}

#[tokio::test]
async fn ping_needs_an_icmp_rule_and_its_reply_does_not() -> Result<()> {
    let mut pingable = egress_all("pingable");
    pingable.push(pb::SecurityGroupRule {
        port_range_min: Some(8),
        ..rule(
            "echo-in",
            pb::Direction::Ingress,
            pb::EtherType::Ipv4,
            "icmp",
        )
    });
    pingable.push(pb::SecurityGroupRule {
        port_range_min: Some(128),
        ..rule(
            "echo-in-v6",
            pb::Direction::Ingress,
            pb::EtherType::Ipv6,
            "icmp",
        )
    });
    let lab = Lab::start(
        "sgping",
        vec![security_group("pingable", true, pingable), client_group()],
        [&["client"], &["pingable"], &["client"]],
    )
    .await?;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(lab.vm("a").ping(ip("10.0.0.2"), 2)?.all_replied());
    assert!(lab.vm("a").ping(ip("fd00:1::2"), 2)?.all_replied());
    assert!(
        lab.vm("b").ping(ip("10.0.0.1"), 2)?.none_replied(),
        "a allows no echo in"
    );
    assert!(lab.vm("b").ping(ip("fd00:1::1"), 2)?.none_replied());
    Ok(())
}
