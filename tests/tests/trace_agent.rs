//! Integration: `TracePacket` and `ctl trace` against the real agent, checked against
//! real traffic between VM namespaces: what the trace says passes does, what it says is
//! dropped is, and counted with the reason it names. Needs root.
use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{bail, ensure, Result};
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use dataplane_tests::{
    agent::{agent_binary, Agent},
    api::{apply, network, port, rule, security_group, subnet, upsert},
    netns::NetNs,
    topology::Vm,
    traffic::{tcp_works, EchoServer},
};
use tonic::{transport::Channel, Code};

const NODE: &str = "trace-node";

/// a (10.0.0.1, group client: everything out) and b (10.0.0.2, group web: everything
/// out, TCP 8080 in) on one network.
struct Lab {
    agent: Agent,
    client: DataplaneClient<Channel>,
    a: Vm,
    b: Vm,
    _node: NetNs,
}

fn egress_all(id: &str) -> Vec<pb::SecurityGroupRule> {
    vec![rule(
        &format!("{id}-out4"),
        pb::Direction::Egress,
        pb::EtherType::Ipv4,
        "",
    )]
}

impl Lab {
    async fn start() -> Result<Lab> {
        let node = NetNs::new("trace-node")?;
        let agent = Agent::start(&node, NODE).await?;
        let vm = |name: &str, host: u8| {
            Vm::create(
                &node,
                &format!("trace-{name}"),
                &format!("tap-{name}"),
                [0xfa, 0x16, 0x3e, 0, 0, host],
                &[format!("10.0.0.{host}/24").parse()?],
            )
        };
        let (a, b) = (vm("a", 1)?, vm("b", 2)?);
        let mut web = egress_all("web");
        web.push(pb::SecurityGroupRule {
            port_range_min: Some(8080),
            port_range_max: Some(8080),
            ..rule(
                "web-8080",
                pb::Direction::Ingress,
                pb::EtherType::Ipv4,
                "tcp",
            )
        });
        let lab_port = |name: &str, host: u8, group: &str| {
            let mut p = port(
                name,
                "net",
                &format!("fa:16:3e:00:00:{host:02x}"),
                &[("sub4", &format!("10.0.0.{host}"))],
                NODE,
                &format!("tap-{name}"),
            );
            p.security_group_ids = vec![group.to_owned()];
            p
        };
        let changes = vec![
            upsert(security_group("client", true, egress_all("client"))),
            upsert(security_group("web", true, web)),
            upsert(network("net")),
            upsert(subnet("sub4", "net", "10.0.0.0/24")),
            upsert(lab_port("a", 1, "client")),
            upsert(lab_port("b", 2, "web")),
        ];
        let mut client = agent.client().await?;
        client.apply(apply(changes)).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for name in ["a", "b"] {
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
        Ok(Lab {
            agent,
            client,
            a,
            b,
            _node: node,
        })
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

fn tcp_from_a(dport: u32) -> pb::TracePacketRequest {
    pb::TracePacketRequest {
        port_id: "a".into(),
        dst_ip: "10.0.0.2".into(),
        protocol: "tcp".into(),
        src_port: 40000,
        dst_port: dport,
        ..Default::default()
    }
}

fn stage<'r>(response: &'r pb::TracePacketResponse, name: &str) -> &'r pb::TraceStage {
    response
        .stages
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no stage {name}: {response:#?}"))
}

#[tokio::test]
async fn the_trace_says_what_real_traffic_does() -> Result<()> {
    let mut lab = Lab::start().await?;
    let _open = EchoServer::tcp(&lab.b.ns, "10.0.0.2:8080".parse::<SocketAddr>()?)?;
    let _closed = EchoServer::tcp(&lab.b.ns, "10.0.0.2:8081".parse::<SocketAddr>()?)?;

    // Allowed: a's egress rule, then b's ingress rule for 8080.
    let allowed = lab
        .client
        .trace_packet(tcp_from_a(8080))
        .await?
        .into_inner();
    let verdict = allowed.verdict.clone().unwrap_or_default();
    ensure!(
        verdict.action == pb::trace_verdict::Action::Delivered as i32 && verdict.port_id == "b",
        "{allowed:#?}"
    );
    ensure!(stage(&allowed, "port").decision == "up");
    ensure!(stage(&allowed, "port security").decision == "pass");
    let egress = stage(&allowed, "egress security groups");
    ensure!(egress.found.contains("rule client-out4"), "{egress:?}");
    ensure!(egress.decision.contains("stateful"), "{egress:?}");
    let l2 = stage(&allowed, "l2");
    ensure!(
        l2.lookup.contains("fa:16:3e:00:00:02") && l2.found.contains("port b"),
        "{l2:?}"
    );
    let ingress = stage(&allowed, "ingress security groups");
    ensure!(ingress.found.contains("rule web-8080"), "{ingress:?}");
    ensure!(
        tcp_works(&lab.a.ns, "10.0.0.2:8080".parse()?),
        "the trace says 8080 reaches b"
    );

    // Blocked: no ingress rule of b for 8081, counted at b.
    let blocked = lab
        .client
        .trace_packet(tcp_from_a(8081))
        .await?
        .into_inner();
    let verdict = blocked.verdict.clone().unwrap_or_default();
    ensure!(
        verdict.action == pb::trace_verdict::Action::Dropped as i32
            && verdict.drop_reason == pb::DropReason::PolicyDenied as i32
            && verdict.port_id == "b",
        "{blocked:#?}"
    );
    ensure!(stage(&blocked, "ingress security groups")
        .decision
        .contains("policy_denied"));
    let before = lab.drops("b", pb::DropReason::PolicyDenied).await?;
    ensure!(
        !tcp_works(&lab.a.ns, "10.0.0.2:8081".parse()?),
        "the trace says 8081 is dropped"
    );
    let after = lab.drops("b", pb::DropReason::PolicyDenied).await?;
    ensure!(after > before, "b counted the drop: {before} -> {after}");

    // b's replies to an established connection pass (b has no egress rule for them
    // to need: stateful), and a spoofed source is stopped at a.
    let reply = lab
        .client
        .trace_packet(pb::TracePacketRequest {
            port_id: "b".into(),
            dst_ip: "10.0.0.1".into(),
            src_port: 8080,
            dst_port: 40000,
            tcp_flags: "SYN|ACK".into(),
            established: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(
        reply.verdict.unwrap_or_default().action == pb::trace_verdict::Action::Delivered as i32
    );
    let spoofed = lab
        .client
        .trace_packet(pb::TracePacketRequest {
            src_ip: "10.0.0.9".into(),
            ..tcp_from_a(8080)
        })
        .await?
        .into_inner();
    ensure!(
        spoofed.verdict.unwrap_or_default().drop_reason == pb::DropReason::SourceIpSpoofed as i32
    );
    Ok(())
}

#[tokio::test]
async fn bad_trace_requests_name_the_field() -> Result<()> {
    let mut lab = Lab::start().await?;
    let unknown = lab
        .client
        .trace_packet(pb::TracePacketRequest {
            port_id: "nobody".into(),
            ..tcp_from_a(80)
        })
        .await
        .expect_err("an unknown port");
    ensure!(unknown.code() == Code::NotFound, "{unknown:?}");
    ensure!(unknown.message().starts_with("port_id:"), "{unknown:?}");
    for (request, field) in [
        (
            pb::TracePacketRequest {
                dst_ip: "10.0.0.300".into(),
                ..tcp_from_a(80)
            },
            "dst_ip",
        ),
        (
            pb::TracePacketRequest {
                src_ip: "fd00::1".into(),
                ..tcp_from_a(80)
            },
            "src_ip",
        ),
        (
            pb::TracePacketRequest {
                dst_port: 70000,
                ..tcp_from_a(80)
            },
            "dst_port",
        ),
        (
            pb::TracePacketRequest {
                tcp_flags: "SYN|PSH".into(),
                ..tcp_from_a(80)
            },
            "tcp_flags",
        ),
        (
            pb::TracePacketRequest {
                ethertype: Some(0x0806),
                ..tcp_from_a(80)
            },
            "ethertype",
        ),
    ] {
        let status = lab
            .client
            .trace_packet(request)
            .await
            .expect_err("a bad field");
        ensure!(
            status.code() == Code::InvalidArgument,
            "{field}: {status:?}"
        );
        ensure!(
            status.message().starts_with(&format!("{field}:")),
            "{field}: {status:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn ctl_trace_prints_each_stage_and_the_verdict() -> Result<()> {
    let lab = Lab::start().await?;
    let socket = lab.agent.socket().to_string_lossy().into_owned();
    let run = |dport: &str| {
        Command::new(agent_binary()?)
            .args([
                "ctl", "--socket", &socket, "trace", "--port", "a", "--dst", "10.0.0.2", "--proto",
                "tcp", "--dport", dport,
            ])
            .output()
            .map_err(anyhow::Error::from)
    };
    let out = run("8080")?;
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    ensure!(
        out.status.success(),
        "ctl trace failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "1. port\n   lookup:   PORTS[ifindex ",
        "egress security groups",
        "   found:    conntrack: no entry (a new connection); rule client-out4",
        "ingress security groups",
        "SG_RULE_PORTS[class",
        "rule web-8080",
        "verdict: delivered to port b",
    ] {
        ensure!(text.contains(expected), "no {expected:?} in\n{text}");
    }
    let out = run("9999")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("verdict: dropped: policy_denied (counted at port b)"),
        "{text}"
    );
    Ok(())
}
