//! Integration: the packet monitor and the policy view of the real agent. Real TCP
//! between VM namespaces, some of it blocked by a security group; the drops (and, when
//! asked, the deliveries) arrive over `Monitor` and from `ctl monitor`; `GetPortPolicy`
//! and `ctl policy` show the compiled rules. Needs root.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use dataplane_tests::{
    agent::{agent_binary, Agent},
    api::{apply, network, port, rule, security_group, subnet, upsert},
    netns::NetNs,
    topology::Vm,
    traffic::{tcp_connect, tcp_works, udp_socket, EchoServer},
};
use tonic::{transport::Channel, Code, Streaming};

const NODE: &str = "monitor-node";
const NAMES: [&str; 3] = ["a", "b", "c"];
/// The longest a test waits for one expected event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream must stay quiet of an unwanted event to count as without it.
const QUIET: Duration = Duration::from_millis(1500);

/// Three VMs on one network: a (10.0.0.1) and c (10.0.0.3) are clients (everything
/// out, nothing in); b (10.0.0.2) is a web server open on 8080 to a only, and on 9090
/// to the client group.
struct Lab {
    agent: Agent,
    client: DataplaneClient<Channel>,
    vms: Vec<Vm>,
    _node: NetNs,
}

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn tcp_in(id: &str, port: u32) -> pb::SecurityGroupRule {
    pb::SecurityGroupRule {
        port_range_min: Some(port),
        port_range_max: Some(port),
        ..rule(id, pb::Direction::Ingress, pb::EtherType::Ipv4, "tcp")
    }
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

impl Lab {
    async fn start(tag: &str) -> Result<Lab> {
        let node = NetNs::new(&format!("{tag}-node"))?;
        let agent = Agent::start(&node, NODE).await?;
        let mut vms = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let host = i + 1;
            vms.push(Vm::create(
                &node,
                &format!("{tag}-{name}"),
                &format!("tap-{name}"),
                [0xfa, 0x16, 0x3e, 0, 0, host as u8],
                &[format!("10.0.0.{host}/24").parse()?],
            )?);
        }
        let mut web = egress_all("web");
        web.push(pb::SecurityGroupRule {
            remote_ip_prefix: "10.0.0.1/32".to_owned(),
            ..tcp_in("web-8080", 8080)
        });
        web.push(pb::SecurityGroupRule {
            remote_group_id: "client".to_owned(),
            ..tcp_in("web-9090", 9090)
        });
        let mut changes = vec![
            upsert(security_group("web", true, web)),
            upsert(security_group("client", true, egress_all("client"))),
            upsert(network("net")),
            upsert(subnet("sub4", "net", "10.0.0.0/24")),
        ];
        for (i, name) in NAMES.iter().enumerate() {
            let host = i + 1;
            let mut port = port(
                name,
                "net",
                &format!("fa:16:3e:00:00:{host:02x}"),
                &[("sub4", &format!("10.0.0.{host}"))],
                NODE,
                &format!("tap-{name}"),
            );
            port.security_group_ids = vec![if *name == "b" { "web" } else { "client" }.to_owned()];
            changes.push(upsert(port));
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

    async fn monitor(&self, port_id: &str, trace: bool) -> Result<Streaming<pb::MonitorEvent>> {
        Ok(self
            .client
            .clone()
            .monitor(pb::MonitorRequest {
                port_id: port_id.to_owned(),
                trace,
                drop_reasons: Vec::new(),
            })
            .await?
            .into_inner())
    }
}

/// The next packet event of `stream` that `wanted` accepts, within `timeout`; `None`
/// if none came. Every packet event it passes over is handed to `seen`.
async fn find(
    stream: &mut Streaming<pb::MonitorEvent>,
    timeout: Duration,
    mut seen: impl FnMut(&pb::PacketEvent),
    wanted: impl Fn(&pb::PacketEvent) -> bool,
) -> Result<Option<pb::PacketEvent>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let message = match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => return Ok(None),
            Ok(message) => message?.context("the monitor stream ended")?,
        };
        if let Some(pb::monitor_event::Event::Packet(packet)) = message.event {
            seen(&packet);
            if wanted(&packet) {
                return Ok(Some(packet));
            }
        }
    }
}

fn summary(packet: &pb::PacketEvent) -> pb::PacketSummary {
    packet.summary.clone().unwrap_or_default()
}

/// A TCP packet from `source` to `destination`:`port`.
fn tcp_to(packet: &pb::PacketEvent, source: &str, destination: &str, port: u32) -> bool {
    let s = summary(packet);
    s.protocol == Some(6)
        && s.source_address == source
        && s.destination_address == destination
        && s.destination_port == Some(port)
}

fn is_drop(packet: &pb::PacketEvent, reason: pb::DropReason) -> bool {
    packet.verdict == pb::MonitorVerdict::Dropped as i32 && packet.drop_reason == reason as i32
}

fn is_delivered(packet: &pb::PacketEvent) -> bool {
    packet.verdict == pb::MonitorVerdict::Delivered as i32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_and_traces_stream_as_asked() -> Result<()> {
    let lab = Lab::start("mon").await?;
    let _web = [
        EchoServer::tcp(&lab.vm("b").ns, addr("10.0.0.2:8080"))?,
        EchoServer::tcp(&lab.vm("b").ns, addr("10.0.0.2:9090"))?,
    ];
    // Open before any traffic: the programs emit once someone listens.
    let mut drops = lab.monitor("", false).await?;
    let mut traced_b = lab.monitor("b", true).await?;
    let mut only_c = lab.monitor("c", true).await?;

    // c may not reach b's 8080: the SYN is dropped on its way to b.
    assert!(
        tcp_connect(&lab.vm("c").ns, addr("10.0.0.2:8080")).is_err(),
        "c reached b:8080"
    );
    let denied = |p: &pb::PacketEvent| {
        is_drop(p, pb::DropReason::PolicyDenied) && tcp_to(p, "10.0.0.3", "10.0.0.2", 8080)
    };
    let mut delivered_without_trace = 0;
    let drop = find(
        &mut drops,
        EVENT_TIMEOUT,
        |p| delivered_without_trace += usize::from(is_delivered(p)),
        denied,
    )
    .await?
    .context("no policy_denied drop of c -> b:8080 on the monitor")?;
    assert_eq!(drop.port_id, "b", "charged to the receiver: {drop:?}");
    assert_eq!(drop.hook, pb::MonitorHook::ToPort as i32, "{drop:?}");
    let s = summary(&drop);
    assert_eq!(s.source_mac, "fa:16:3e:00:00:03");
    assert_eq!(s.destination_mac, "fa:16:3e:00:00:02");
    assert_eq!(s.ethertype, 0x0800);
    assert!(drop.original_length >= 54, "{drop:?}");
    // The raw bytes are the frame: Ethernet destination first, the SYN's TCP flags.
    assert_eq!(drop.header[..6], [0xfa, 0x16, 0x3e, 0, 0, 2]);
    assert!(drop.time_unix_nanos > 0);
    // b's own stream has it too.
    find(&mut traced_b, EVENT_TIMEOUT, |_| {}, denied)
        .await?
        .context("the drop at b is not on b's stream")?;

    // a may: delivered to b, which b's traced stream shows and the drops stream does not.
    assert!(
        tcp_works(&lab.vm("a").ns, addr("10.0.0.2:8080")),
        "a -> b:8080"
    );
    let delivered = find(
        &mut traced_b,
        EVENT_TIMEOUT,
        |_| {},
        |p| is_delivered(p) && tcp_to(p, "10.0.0.1", "10.0.0.2", 8080),
    )
    .await?
    .context("no trace of a -> b:8080 delivered to b")?;
    assert_eq!(delivered.port_id, "b");
    assert_eq!(delivered.hook, pb::MonitorHook::ToPort as i32);
    assert_eq!(delivered.drop_reason, pb::DropReason::Unspecified as i32);
    let a_to_b = find(
        &mut drops,
        QUIET,
        |p| delivered_without_trace += usize::from(is_delivered(p)),
        |p| tcp_to(p, "10.0.0.1", "10.0.0.2", 8080),
    )
    .await?;
    assert!(
        a_to_b.is_none(),
        "the drops-only stream shows passing traffic: {a_to_b:?}"
    );
    assert_eq!(
        delivered_without_trace, 0,
        "traces on a stream that did not ask"
    );

    // The port filter: c's stream saw nothing of b's.
    let mut foreign = Vec::new();
    find(&mut only_c, QUIET, |p| foreign.push(p.clone()), |_| false).await?;
    assert!(
        foreign.iter().all(|p| p.port_id == "c"),
        "events of other ports on c's stream: {foreign:?}"
    );

    // `ctl monitor`, the real binary, prints the drop.
    let mut ctl = CtlMonitor::start(&lab.agent, &["--port", "b"])?;
    assert!(
        tcp_connect(&lab.vm("c").ns, addr("10.0.0.2:8080")).is_err(),
        "c reached b:8080"
    );
    let line = ctl
        .line_with(&[
            "xx drop (policy_denied) port b to-port",
            "10.0.0.3:",
            "-> 10.0.0.2:8080 tcp",
        ])
        .with_context(|| format!("agent log:\n{}", lab.agent.logs()))?;
    println!("ctl monitor: {line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_checked() -> Result<()> {
    let lab = Lab::start("monf").await?;
    let mut client = lab.client.clone();
    let unknown = client
        .monitor(pb::MonitorRequest {
            port_id: "nope".to_owned(),
            ..Default::default()
        })
        .await
        .err()
        .context("a filter on an unknown port was accepted")?;
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let bad = client
        .monitor(pb::MonitorRequest {
            drop_reasons: vec![pb::DropReason::PolicyDenied as i32, 999],
            ..Default::default()
        })
        .await
        .err()
        .context("an unknown drop reason was accepted")?;
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("drop_reasons[1]"), "{bad:?}");

    // A reason filter holds back the other reasons: the policy drop of c -> b:8080
    // does not come, the spoofed datagram of a does.
    let mut spoofed_only = client
        .monitor(pb::MonitorRequest {
            drop_reasons: vec![pb::DropReason::SourceIpSpoofed as i32],
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(!tcp_works(&lab.vm("c").ns, addr("10.0.0.2:8080")));
    let a = lab.vm("a");
    a.add_address("10.0.0.77/24".parse()?)?;
    // Without ARP, which port security would stop first for that address.
    a.ns.ip(&[
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        "fa:16:3e:00:00:02",
        "dev",
        "eth0",
    ])?;
    udp_socket(&a.ns, addr("10.0.0.77:0"))?.send_to(b"spoofed", addr("10.0.0.2:9"))?;
    let mut other = Vec::new();
    let spoofed = find(
        &mut spoofed_only,
        EVENT_TIMEOUT,
        |p| other.push(p.clone()),
        |p| summary(p).source_address == "10.0.0.77",
    )
    .await?
    .context("no drop of the spoofed datagram")?;
    assert!(
        other
            .iter()
            .all(|p| is_drop(p, pb::DropReason::SourceIpSpoofed)),
        "{other:?}"
    );
    assert_eq!(
        (spoofed.port_id.as_str(), spoofed.hook),
        ("a", pb::MonitorHook::FromPort as i32),
        "{spoofed:?}"
    );
    let s = summary(&spoofed);
    assert_eq!((s.protocol, s.destination_port), (Some(17), Some(9)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compiled_policy_of_a_port() -> Result<()> {
    let lab = Lab::start("monp").await?;
    let mut client = lab.client.clone();
    let policy = client
        .get_port_policy(pb::GetPortPolicyRequest {
            port_id: "b".to_owned(),
        })
        .await?
        .into_inner();
    assert!(policy.port_security && policy.stateful, "{policy:?}");
    assert_eq!(policy.security_group_ids, ["web"]);
    assert_ne!(policy.policy_id, 0);
    let ingress: Vec<(&str, &str, &str, Vec<String>, bool)> = policy
        .ingress_rules
        .iter()
        .map(|r| {
            (
                r.id.as_str(),
                r.protocol.as_str(),
                r.remote_ip_prefix.as_str(),
                r.remote_group_members.clone(),
                r.programmed,
            )
        })
        .collect();
    assert_eq!(
        ingress,
        [
            ("web-8080", "tcp", "10.0.0.1/32", vec![], true),
            (
                "web-9090",
                "tcp",
                "",
                vec!["10.0.0.1/32".to_owned(), "10.0.0.3/32".to_owned()],
                true
            ),
        ]
    );
    let egress: Vec<&str> = policy.egress_rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(egress, ["web-out4", "web-out6"]);
    assert!(
        policy
            .allowed_addresses
            .iter()
            .any(|a| a.mac_address == "fa:16:3e:00:00:02" && a.ip_prefix == "10.0.0.2/32"),
        "{:?}",
        policy.allowed_addresses
    );

    let missing = client
        .get_port_policy(pb::GetPortPolicyRequest {
            port_id: "nope".to_owned(),
        })
        .await
        .err()
        .context("a policy for an unknown port")?;
    assert_eq!(missing.code(), Code::NotFound);

    let output = Command::new(agent_binary()?)
        .arg("ctl")
        .arg("--socket")
        .arg(lab.agent.socket())
        .args(["policy", "--port", "b"])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    for expected in [
        "security groups web",
        "stateful        yes",
        "fa:16:3e:00:00:02 10.0.0.2/32",
        "ingress rules (2)",
        "web-8080 group web ipv4 tcp ports 8080 remote 10.0.0.1/32 slot",
        "web-9090 group web ipv4 tcp ports 9090 remote group client [10.0.0.1/32 10.0.0.3/32] slot",
        "egress rules (2)",
    ] {
        assert!(text.contains(expected), "no {expected:?} in\n{text}");
    }
    Ok(())
}

/// `dataplane-agent ctl monitor`, its lines read on a thread; killed when dropped.
struct CtlMonitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl CtlMonitor {
    /// Starts it and waits until it listens (its stderr says so).
    fn start(agent: &Agent, args: &[&str]) -> Result<CtlMonitor> {
        let mut child = Command::new(agent_binary()?)
            .arg("ctl")
            .arg("--socket")
            .arg(agent.socket())
            .arg("monitor")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        let stderr = child.stderr.take().context("stderr")?;
        let mut ctl = CtlMonitor {
            child,
            lines: mpsc::channel().1,
        };
        let (ready_tx, ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = ready_tx.send(line);
            }
        });
        let (lines_tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        ctl.lines = lines;
        let said = ready
            .recv_timeout(EVENT_TIMEOUT)
            .context("ctl monitor did not start listening")?;
        anyhow::ensure!(said.contains("listening"), "ctl monitor said {said:?}");
        Ok(ctl)
    }

    /// The first line containing every one of `parts`, within [`EVENT_TIMEOUT`].
    fn line_with(&mut self, parts: &[&str]) -> Result<String> {
        let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if parts.iter().all(|part| line.contains(part)) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => bail!("no line with {parts:?}; printed:\n{}", seen.join("\n")),
            }
        }
    }
}

impl Drop for CtlMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
