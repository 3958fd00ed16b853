//! `cargo xtask demo`: a small node, programmed over gRPC as an API server would, with
//! traffic that passes and traffic that is blocked, and the counters that say why.
//! Everything lives in namespaces the demo creates and removes. Exits non-zero if the
//! datapath does not behave as the narration says.

use std::{net::IpAddr, process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use dataplane_proto::v1 as pb;
use dataplane_tests::{
    agent::{agent_binary, Agent},
    api::{
        apply, default_security_group, external_network, floating_ip, gateway_port, network, port,
        router, router_port, rule, security_group, subnet, upsert, with_gateway,
    },
    netns::NetNs,
    topology::Vm,
};

const NODE: &str = "demo-node";

/// The db VM's port, at `revision`.
fn db_port(revision: u64) -> pb::Port {
    let mut db = port(
        "db",
        "blue",
        "fa:16:3e:00:01:02",
        &[("blue-v4", "10.1.0.12"), ("blue-v6", "fd00:b1::12")],
        NODE,
        "tap-db",
    );
    db.revision_number = revision;
    db
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn show(what: &str, ok: bool) {
    println!(
        "    {} {what}",
        if ok { "[as expected]" } else { "[UNEXPECTED]" }
    );
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("literal address")
}

#[tokio::main]
async fn main() -> Result<()> {
    step("creating a node namespace, its uplink to an 'outside' namespace (203.0.113.1), and starting dataplane-agent in it");
    let node = NetNs::new("demo-node")?;
    let outside = NetNs::new("demo-outside")?;
    node.add_veth("demo-up", Some(&outside), "ext0")?;
    node.set_up("demo-up", true)?;
    outside.ip(&["addr", "add", "203.0.113.1/24", "dev", "ext0"])?;
    outside.set_up("ext0", true)?;
    let agent = Agent::start_with(&node, NODE, &["--uplink", "demo-up"]).await?;
    println!(
        "    agent up, API on unix socket {}",
        agent.socket().display()
    );

    step("creating four VMs: web and db on network 'blue', app on 'green', intruder on 'red'");
    let web = Vm::create(
        &node,
        "demo-web",
        "tap-web",
        [0xfa, 0x16, 0x3e, 0, 1, 1],
        &["10.1.0.11/24".parse()?, "fd00:b1::11/64".parse()?],
    )?;
    let db = Vm::create(
        &node,
        "demo-db",
        "tap-db",
        [0xfa, 0x16, 0x3e, 0, 1, 2],
        &["10.1.0.12/24".parse()?, "fd00:b1::12/64".parse()?],
    )?;
    let intruder = Vm::create(
        &node,
        "demo-red",
        "tap-red",
        [0xfa, 0x16, 0x3e, 0, 2, 1],
        &["10.1.0.13/24".parse()?],
    )?;
    let app = Vm::create(
        &node,
        "demo-green",
        "tap-app",
        [0xfa, 0x16, 0x3e, 0, 3, 1],
        &["10.2.0.21/24".parse()?],
    )?;
    // Each VM's default route is its subnet's gateway: router r1's interface.
    web.ns.ip(&["route", "add", "default", "via", "10.1.0.1"])?;
    app.ns.ip(&["route", "add", "default", "via", "10.2.0.1"])?;
    intruder
        .ns
        .ip(&["route", "add", "default", "via", "10.1.0.1"])?;

    step("Apply over gRPC: a security group, 4 networks, 5 subnets, 4 ports, router r1 joining blue and green with its gateway on 'public' (SNAT), a floating IP for web (one all-or-nothing batch)");
    let mut client = agent.client().await?;
    let response = client
        .apply(apply(vec![
            upsert(default_security_group()),
            upsert(network("blue")),
            upsert(network("red")),
            upsert(subnet("blue-v4", "blue", "10.1.0.0/24")),
            upsert(subnet("blue-v6", "blue", "fd00:b1::/64")),
            upsert(subnet("red-v4", "red", "10.1.0.0/24")),
            upsert(port(
                "web",
                "blue",
                "fa:16:3e:00:01:01",
                &[("blue-v4", "10.1.0.11"), ("blue-v6", "fd00:b1::11")],
                NODE,
                "tap-web",
            )),
            upsert(db_port(1)),
            upsert(port(
                "intruder",
                "red",
                "fa:16:3e:00:02:01",
                &[("red-v4", "10.1.0.13")],
                NODE,
                "tap-red",
            )),
            upsert(network("green")),
            upsert(subnet("green-v4", "green", "10.2.0.0/24")),
            upsert(port(
                "app",
                "green",
                "fa:16:3e:00:03:01",
                &[("green-v4", "10.2.0.21")],
                NODE,
                "tap-app",
            )),
            upsert(router_port(
                "r1-blue",
                "blue",
                "fa:16:3e:00:0f:01",
                &[("blue-v4", "10.1.0.1")],
            )),
            upsert(router_port(
                "r1-green",
                "green",
                "fa:16:3e:00:0f:02",
                &[("green-v4", "10.2.0.1")],
            )),
            upsert(external_network("public")),
            upsert(pb::Subnet {
                gateway_ip: "203.0.113.1".into(),
                ..subnet("public-v4", "public", "203.0.113.0/24")
            }),
            upsert(gateway_port(
                "r1-gw",
                "r1",
                "public",
                "fa:16:3e:00:0f:0e",
                &[("public-v4", "203.0.113.10")],
            )),
            upsert(with_gateway(
                router("r1", &[("blue-v4", "r1-blue"), ("green-v4", "r1-green")]),
                "public",
                "public-v4",
                "203.0.113.10",
                true,
            )),
            upsert(floating_ip("fip-web", "public", "203.0.113.50", "web")),
        ]))
        .await?
        .into_inner();
    for status in &response.statuses {
        let reference = status.r#ref.clone().unwrap_or_default();
        println!(
            "    {:<10} {:<10} {:?} {}",
            reference.id,
            pb::ResourceKind::try_from(reference.kind)
                .map(|k| k.as_str_name())
                .unwrap_or("?"),
            pb::Status::try_from(status.status).unwrap_or_default(),
            status.reason
        );
    }

    let mut all_ok = true;
    let mut expect = |what: &str, ok: bool| {
        show(what, ok);
        all_ok &= ok;
    };

    step("traffic that passes: web <-> db on 'blue'");
    expect(
        "web pings db over IPv4",
        web.ping(ip("10.1.0.12"), 3)?.all_replied(),
    );
    expect(
        "db pings web over IPv6",
        db.ping(ip("fd00:b1::11"), 3)?.all_replied(),
    );

    step("traffic that is routed: web (blue) <-> app (green) through router r1, on this node");
    expect(
        "web pings its gateway 10.1.0.1 (the datapath answers ARP and ping)",
        web.ping(ip("10.1.0.1"), 2)?.all_replied(),
    );
    expect(
        "web pings app across r1",
        web.ping(ip("10.2.0.21"), 3)?.all_replied(),
    );
    let expired = web
        .ns
        .exec(&["ping", "-n", "-c", "1", "-W", "1", "-t", "1", "10.2.0.21"])?;
    expect(
        "a ping with TTL 1 is answered by r1: time to live exceeded",
        String::from_utf8_lossy(&expired.stdout).contains("Time to live exceeded"),
    );

    step("the outside: SNAT, a floating IP, and the gateway answering on the uplink");
    let outside_ping = |to: &str| -> Result<bool> {
        Ok(outside
            .exec(&["ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", to])?
            .status
            .success())
    };
    expect(
        "the outside pings r1's gateway 203.0.113.10 (ARP and ping answered in XDP)",
        outside_ping("203.0.113.10")?,
    );
    expect(
        "app (no floating IP) pings the outside host: SNAT to 203.0.113.10",
        app.ping(ip("203.0.113.1"), 3)?.all_replied(),
    );
    expect(
        "web pings the outside host, as its floating IP 203.0.113.50",
        web.ping(ip("203.0.113.1"), 3)?.all_replied(),
    );
    expect(
        "the outside cannot ping web by its floating IP: web's group (default) lets in only its members",
        !outside_ping("203.0.113.50")?,
    );

    step("traffic that is blocked");
    expect(
        "intruder on 'red' cannot reach app: 'red' is on no router",
        intruder.ping(ip("10.2.0.21"), 2)?.none_replied(),
    );
    expect(
        "intruder on 'red' cannot reach web, though its subnet has the same range",
        intruder.ping(ip("10.1.0.11"), 3)?.none_replied(),
    );
    web.del_address("10.1.0.11/24".parse()?)?;
    web.add_address("10.1.0.66/24".parse()?)?;
    expect(
        "web, now claiming 10.1.0.66 (not its address), cannot reach db",
        web.ping(ip("10.1.0.12"), 3)?.none_replied(),
    );
    web.del_address("10.1.0.66/24".parse()?)?;
    web.add_address("10.1.0.11/24".parse()?)?;

    let mut down = db_port(2);
    down.admin_state_up = false;
    client.apply(apply(vec![upsert(down)])).await?;
    expect(
        "db set admin_state_up=false: web's pings are dropped at db's port",
        web.ping(ip("10.1.0.12"), 3)?.none_replied(),
    );

    let ssh_only = security_group(
        "ssh-only",
        true,
        vec![
            pb::SecurityGroupRule {
                port_range_min: Some(22),
                port_range_max: Some(22),
                ..rule("ssh-in", pb::Direction::Ingress, pb::EtherType::Ipv4, "tcp")
            },
            rule("all-out", pb::Direction::Egress, pb::EtherType::Ipv4, ""),
        ],
    );
    let mut guarded = db_port(3);
    guarded.security_group_ids = vec!["ssh-only".into()];
    client
        .apply(apply(vec![upsert(ssh_only), upsert(guarded)]))
        .await?;
    expect(
        "db back up, but in security group 'ssh-only' (TCP 22 in): web's pings are denied",
        web.ping(ip("10.1.0.12"), 3)?.none_replied(),
    );

    step("the counters that explain it (dataplane-agent ctl counters)");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ctl = Command::new(agent_binary()?)
        .args(["ctl", "--socket"])
        .arg(agent.socket())
        .arg("counters")
        .output()
        .context("running dataplane-agent ctl")?;
    print!("{}", String::from_utf8_lossy(&ctl.stdout));
    ensure!(
        ctl.status.success(),
        "ctl failed: {}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    let counters = client
        .get_port_counters(pb::GetPortCountersRequest::default())
        .await?
        .into_inner();
    let count = |port_id: &str, reason: pb::DropReason| -> u64 {
        counters
            .ports
            .iter()
            .filter(|p| p.port_id == port_id)
            .flat_map(|p| &p.drops)
            .filter(|d| d.reason == reason as i32)
            .map(|d| d.packets)
            .sum()
    };
    expect(
        "web's spoofed frames are counted (source_ip_spoofed / arp_spoofed)",
        count("web", pb::DropReason::SourceIpSpoofed) + count("web", pb::DropReason::ArpSpoofed)
            > 0,
    );
    expect(
        "db's admin-down drops are counted",
        count("db", pb::DropReason::PortAdminDown) > 0,
    );
    expect(
        "db's security group denials are counted (policy_denied)",
        count("db", pb::DropReason::PolicyDenied) > 0,
    );
    expect(
        "intruder's ARP found nobody on 'red' (no_flood_target)",
        count("intruder", pb::DropReason::NoFloodTarget) > 0,
    );
    expect(
        "web's expired ping is counted (ttl_exceeded)",
        count("web", pb::DropReason::TtlExceeded) > 0,
    );

    expect(
        "the pings to web's floating IP are counted at web's port (policy_denied)",
        count("web", pb::DropReason::PolicyDenied) > 0,
    );

    step("cleaning up: agent stopped (SIGTERM), namespaces deleted");
    drop(agent);
    ensure!(all_ok, "the datapath did not behave as described above");
    println!("\ndemo finished: every expectation held");
    Ok(())
}
