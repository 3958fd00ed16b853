//! Integration: the agent's API surface and lifecycle — stock gRPC health and reflection,
//! Watch, Sync, the desired state kept across a restart, a second agent on the same
//! state directory, SIGTERM. Needs root.

use std::{os::unix::fs::PermissionsExt, time::Duration};

use anyhow::Result;
use dataplane_abi::{PortInfo, RemoteKey4};
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use dataplane_tests::{
    agent::{agent_binary, wait_status, Agent},
    api::{apply, default_security_group, delete, network, port, subnet, upsert, IntoResource},
    netns::NetNs,
    topology::Vm,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

const NODE: &str = "api-node";

#[tokio::test]
async fn health_and_reflection_answer_stock_clients() -> Result<()> {
    let node = NetNs::new("api-health")?;
    let agent = Agent::start(&node, NODE).await?;
    let channel = dataplane_agent::client::unix_channel(agent.socket()).await?;

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "dataplane.v1.Dataplane"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.next().await.expect("a reflection response")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["dataplane.v1.Dataplane", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    // The socket is for root only.
    let mode = std::fs::metadata(agent.socket())?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    Ok(())
}

#[tokio::test]
async fn watch_streams_build_then_active_when_the_device_appears() -> Result<()> {
    let node = NetNs::new("api-watch")?;
    let agent = Agent::start(&node, NODE).await?;
    let mut client = agent.client().await?;
    let mut events = client
        .watch(pb::WatchRequest {
            include_current: false,
        })
        .await?
        .into_inner();

    client
        .apply(apply(vec![
            upsert(default_security_group()),
            upsert(network("net")),
            upsert(subnet("sub", "net", "10.0.0.0/24")),
            upsert(port(
                "p",
                "net",
                "fa:16:3e:00:00:01",
                &[("sub", "10.0.0.1")],
                NODE,
                "tap-p",
            )),
        ]))
        .await?;
    let _vm = Vm::create(
        &node,
        "api-watch-vm",
        "tap-p",
        [0xfa, 0x16, 0x3e, 0, 0, 1],
        &[],
    )?;

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.contains(&pb::Status::Active) {
        let event = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("ACTIVE within 10 s")
            .expect("stream open")?;
        match event.event {
            Some(pb::watch_event::Event::Status(status))
                if status.r#ref.as_ref().is_some_and(|r| r.id == "p") =>
            {
                seen.push(pb::Status::try_from(status.status)?);
            }
            _ => {}
        }
    }
    assert_eq!(seen, [pb::Status::Build, pb::Status::Active]);
    Ok(())
}

#[tokio::test]
async fn sync_replaces_the_whole_state() -> Result<()> {
    let node = NetNs::new("api-sync")?;
    let agent = Agent::start(&node, NODE).await?;
    let mut client = agent.client().await?;
    let a = Vm::create(
        &node,
        "api-sync-a",
        "tap-a",
        [0xfa, 0x16, 0x3e, 0, 0, 1],
        &["10.0.0.1/24".parse()?],
    )?;
    let b = Vm::create(
        &node,
        "api-sync-b",
        "tap-b",
        [0xfa, 0x16, 0x3e, 0, 0, 2],
        &["10.0.0.2/24".parse()?],
    )?;
    let base = vec![
        default_security_group().into_resource(),
        network("net").into_resource(),
        subnet("sub", "net", "10.0.0.0/24").into_resource(),
        port(
            "a",
            "net",
            "fa:16:3e:00:00:01",
            &[("sub", "10.0.0.1")],
            NODE,
            "tap-a",
        )
        .into_resource(),
    ];
    let mut with_b = base.clone();
    with_b.push(
        port(
            "b",
            "net",
            "fa:16:3e:00:00:02",
            &[("sub", "10.0.0.2")],
            NODE,
            "tap-b",
        )
        .into_resource(),
    );

    let synced = client
        .sync(pb::SyncRequest { resources: with_b })
        .await?
        .into_inner();
    assert_eq!((synced.created, synced.updated, synced.deleted), (5, 0, 0));
    assert!(a.ping("10.0.0.2".parse()?, 2)?.all_replied());

    // b is not in the next Sync: it is removed, and its traffic with it.
    let synced = client
        .sync(pb::SyncRequest { resources: base })
        .await?
        .into_inner();
    assert_eq!((synced.created, synced.updated, synced.deleted), (0, 0, 1));
    assert!(client
        .get_port(pb::GetRequest { id: "b".into() })
        .await
        .is_err());
    assert!(b.ping("10.0.0.1".parse()?, 2)?.none_replied());
    Ok(())
}

/// The port of VM device `device` on network `net`, in the default group.
fn port_of(id: &str, mac: &str, address: &str, device: &str) -> pb::Change {
    upsert(port(id, "net", mac, &[("sub", address)], NODE, device))
}

/// VMs a (10.0.0.1) and b (10.0.0.2) on `tap-a` and `tap-b` in `node`, and the network
/// with their ports applied.
async fn two_ports(
    node: &NetNs,
    tag: &str,
    client: &mut DataplaneClient<Channel>,
) -> Result<(Vm, Vm)> {
    let (a, b) = Vm::pair(node, tag)?;
    client
        .apply(apply(vec![
            upsert(default_security_group()),
            upsert(network("net")),
            upsert(subnet("sub", "net", "10.0.0.0/24")),
            port_of("a", "fa:16:3e:00:00:01", "10.0.0.1", "tap-a"),
            port_of("b", "fa:16:3e:00:00:02", "10.0.0.2", "tap-b"),
        ]))
        .await?;
    Ok((a, b))
}

#[tokio::test]
async fn a_restarted_agent_programs_the_stored_state_before_any_sync() -> Result<()> {
    let node = NetNs::new("api-store")?;
    let mut agent = Agent::start(&node, NODE).await?;
    let mut client = agent.client().await?;
    let (a, _b) = two_ports(&node, "api-store", &mut client).await?;
    // A later Apply removes something: the store keeps what is, not what was.
    client
        .apply(apply(vec![delete(pb::ResourceKind::Port, "b")]))
        .await?;
    client
        .apply(apply(vec![port_of(
            "b2",
            "fa:16:3e:00:00:02",
            "10.0.0.2",
            "tap-b",
        )]))
        .await?;
    wait_status(&mut client, "b2", pb::Status::Active).await?;
    assert!(a.ping("10.0.0.2".parse()?, 2)?.all_replied());
    let before = client
        .list_ports(pb::ListRequest::default())
        .await?
        .into_inner();

    let ports_before = agent.active_set_maps()?.join("PORTS");
    let ports_map = aya::maps::MapInfo::from_pin(&ports_before)?.id();

    agent.restart().await?;
    // The stored state, slots and all, compiles to what the active set holds: adopted
    // as it is, no switch to the other set.
    assert_eq!(agent.active_set_maps()?.join("PORTS"), ports_before);
    assert_eq!(aya::maps::MapInfo::from_pin(&ports_before)?.id(), ports_map);
    let mut client = agent.client().await?;
    let after = client
        .list_ports(pb::ListRequest::default())
        .await?
        .into_inner();
    assert_eq!(after, before, "the ports as the last run held them");
    assert!(client
        .get_port(pb::GetRequest { id: "b".into() })
        .await
        .is_err());
    // Programmed by the agent itself at start: no Apply or Sync since.
    wait_status(&mut client, "b2", pb::Status::Active).await?;
    assert!(a.ping("10.0.0.2".parse()?, 2)?.all_replied());
    assert!(
        agent.logs().contains("restored the stored state"),
        "{}",
        agent.logs()
    );
    Ok(())
}

/// How many fixed IPs the agent holds for port `id`.
async fn fixed_ips_of(client: &mut DataplaneClient<Channel>, id: &str) -> Result<usize> {
    let port = client
        .get_port(pb::GetRequest { id: id.into() })
        .await?
        .into_inner()
        .port
        .unwrap_or_default();
    Ok(port.fixed_ips.len())
}

#[tokio::test]
async fn an_apply_the_maps_cannot_hold_is_refused_and_not_stored() -> Result<()> {
    // Room for two ports (slot 0 is nobody's) and 48 addresses: b with 62 does not fit
    // PORT_IP4, which only the map write finds, after the store has taken the change
    // beside it.
    let node = NetNs::new("api-full")?;
    let mut agent = Agent::start_with(&node, NODE, &["--max-ports", "3"]).await?;
    let mut client = agent.client().await?;
    let (_a, _b) = two_ports(&node, "api-full", &mut client).await?;
    wait_status(&mut client, "b", pb::Status::Active).await?;
    let addresses: Vec<String> = (2..64).map(|i| format!("10.0.0.{i}")).collect();
    let wide: Vec<(&str, &str)> = addresses.iter().map(|ip| ("sub", ip.as_str())).collect();
    let refused = client
        .apply(apply(vec![upsert(port(
            "b",
            "net",
            "fa:16:3e:00:00:02",
            &wide,
            NODE,
            "tap-b",
        ))]))
        .await
        .expect_err("PORT_IP4 has no room for b's addresses");
    assert_eq!(refused.code(), tonic::Code::Internal, "{refused:?}");
    assert_eq!(fixed_ips_of(&mut client, "b").await?, 1);
    assert!(
        agent.logs().contains("datapath operation failed"),
        "the refusal is logged: {}",
        agent.logs()
    );
    // What was stored beside the failed write was taken back: the restarted agent
    // programs b as it was.
    agent.restart().await?;
    let mut client = agent.client().await?;
    wait_status(&mut client, "b", pb::Status::Active).await?;
    assert_eq!(fixed_ips_of(&mut client, "b").await?, 1, "{}", agent.logs());
    Ok(())
}

#[tokio::test]
async fn many_concurrent_clients_each_get_their_changes_applied() -> Result<()> {
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 5;
    let node = NetNs::new("api-many")?;
    let agent = Agent::start(&node, NODE).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let mut client = agent.client().await?;
        tasks.spawn(async move {
            let (net, sub) = (format!("net-{i}"), format!("sub-{i}"));
            client
                .apply(apply(vec![
                    upsert(network(&net)),
                    upsert(subnet(&sub, &net, &format!("10.{i}.0.0/24"))),
                ]))
                .await?;
            // Each round replaces the client's port with a newer revision, reading
            // between the writes.
            for round in 0..ROUNDS {
                let mut p = port(
                    &format!("port-{i}"),
                    &net,
                    &format!("fa:16:3e:00:{i:02x}:01"),
                    &[(&sub, &format!("10.{i}.0.5"))],
                    NODE,
                    &format!("tap-{i}"),
                );
                p.security_group_ids.clear();
                p.revision_number = round as u64 + 1;
                client.apply(apply(vec![upsert(p)])).await?;
                client.list_ports(pb::ListRequest::default()).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let mut client = agent.client().await?;
    let ports = client
        .list_ports(pb::ListRequest::default())
        .await?
        .into_inner()
        .ports;
    assert_eq!(ports.len(), CLIENTS);
    assert!(
        ports
            .iter()
            .all(|p| p.port.as_ref().map(|p| p.revision_number) == Some(ROUNDS as u64)),
        "every port at its last revision: {ports:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_port_whose_device_goes_away_is_down_until_it_comes_back() -> Result<()> {
    let node = NetNs::new("api-gone")?;
    let agent = Agent::start(&node, NODE).await?;
    let mut client = agent.client().await?;
    let (a, b) = two_ports(&node, "api-gone", &mut client).await?;
    wait_status(&mut client, "b", pb::Status::Active).await?;
    assert!(a.ping("10.0.0.2".parse()?, 2)?.all_replied());

    // The VM goes, and its veth with it.
    drop(b);
    wait_status(&mut client, "b", pb::Status::Down).await?;
    let status = client
        .get_port(pb::GetRequest { id: "b".into() })
        .await?
        .into_inner()
        .status
        .unwrap_or_default();
    assert!(
        status.reason.contains("interface tap-b is gone"),
        "{status:?}"
    );
    // It comes back under the same device name: ACTIVE again, and reachable.
    let _b = Vm::create(
        &node,
        "api-gone-b2",
        "tap-b",
        [0xfa, 0x16, 0x3e, 0, 0, 2],
        &["10.0.0.2/24".parse()?],
    )?;
    wait_status(&mut client, "b", pb::Status::Active).await?;
    assert!(a.ping("10.0.0.2".parse()?, 3)?.all_replied());
    Ok(())
}

#[tokio::test]
async fn map_entries_changed_behind_the_agents_back_are_put_back() -> Result<()> {
    let node = NetNs::new("api-drift")?;
    let agent = Agent::start_with(&node, NODE, &["--drift-check-seconds", "1"]).await?;
    let mut client = agent.client().await?;
    let (a, _b) = two_ports(&node, "api-drift", &mut client).await?;
    wait_status(&mut client, "b", pb::Status::Active).await?;
    assert!(a.ping("10.0.0.2".parse()?, 2)?.all_replied());

    // Someone removes the ports from the pinned PORTS map (their frames would be
    // dropped as unknown_port) and adds one of their own, and empties SG_HOST4 (the
    // default group's members, whose ingress pings would be denied)...
    let maps = agent.active_set_maps()?;
    let mut ports: aya::maps::HashMap<_, u32, PortInfo> = aya::maps::HashMap::try_from(
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(maps.join("PORTS"))?),
    )?;
    let mut hosts: aya::maps::HashMap<_, RemoteKey4, u32> = aya::maps::HashMap::try_from(
        aya::maps::Map::HashMap(aya::maps::MapData::from_pin(maps.join("SG_HOST4"))?),
    )?;
    let programmed: Vec<(u32, PortInfo)> = ports.iter().collect::<Result<_, _>>()?;
    assert_eq!(programmed.len(), 2, "both ports programmed");
    let members: Vec<(RemoteKey4, u32)> = hosts.iter().collect::<Result<_, _>>()?;
    assert!(!members.is_empty(), "the default group's members are hosts");
    for (ifindex, _) in &programmed {
        ports.remove(ifindex)?;
    }
    ports.insert(9999, programmed[0].1, 0)?;
    for (key, _) in &members {
        hosts.remove(key)?;
    }
    // ...and the drift check puts both maps back as they were programmed, and says so.
    let sorted = |mut entries: Vec<(u32, PortInfo)>| {
        entries.sort_by_key(|(ifindex, _)| *ifindex);
        entries
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now: Vec<(u32, PortInfo)> = ports.iter().collect::<Result<_, _>>()?;
        let mut hosts_now: Vec<(RemoteKey4, u32)> = hosts.iter().collect::<Result<_, _>>()?;
        hosts_now.sort();
        let mut wanted_hosts = members.clone();
        wanted_hosts.sort();
        if sorted(now) == sorted(programmed.clone()) && hosts_now == wanted_hosts {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", agent.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.ping("10.0.0.2".parse()?, 2)?.all_replied());
    let logs = agent.logs();
    for map in ["PORTS", "SG_HOST4"] {
        assert!(
            logs.lines()
                .any(|line| line.contains("repaired drift") && line.contains(map)),
            "{logs}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_second_agent_on_the_same_state_dir_refuses_and_sigterm_stops_cleanly() -> Result<()> {
    let node = NetNs::new("api-life")?;
    let mut agent = Agent::start(&node, NODE).await?;
    let state_dir = agent.socket().parent().unwrap().to_path_buf();

    let second = std::process::Command::new(agent_binary()?)
        .args(["run", "--node-name", "other"])
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--socket")
        .arg(state_dir.join("second.sock"))
        .output()?;
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another agent holds"), "{stderr}");

    let status = agent.terminate()?;
    assert!(status.success(), "exit status {status}");
    assert!(!agent.socket().exists(), "socket removed on shutdown");
    assert!(agent.logs().contains("stopped"));
    Ok(())
}
