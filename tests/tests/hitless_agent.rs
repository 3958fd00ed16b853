//! The agent on the bad day, with real traffic: killed (`kill -9`) and started again
//! while a connection is open and pings flow; killed in the middle of a large Apply;
//! its pins removed and a dispatcher detached behind its back. Needs root.

use std::{
    ffi::CString,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use dataplane_abi::map_names;
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use dataplane_tests::{
    agent::{scrape_metrics, wait_status, Agent},
    api::{apply, network, port, rule, security_group, subnet, upsert},
    netns::NetNs,
    topology::Vm,
    traffic::{echo_round_trip, tcp_connect, tcp_works, EchoServer},
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const NODE: &str = "hitless-node";
const SERVER: &str = "10.0.0.2:8080";

/// A client group that only sends (replies come back as established connections, so
/// only while conntrack remembers them), and a server group that takes TCP 8080 and
/// pings.
fn groups() -> Vec<pb::Change> {
    let client = security_group(
        "client",
        true,
        vec![rule(
            "client-out",
            pb::Direction::Egress,
            pb::EtherType::Ipv4,
            "",
        )],
    );
    let server = security_group(
        "server",
        true,
        vec![
            rule("server-out", pb::Direction::Egress, pb::EtherType::Ipv4, ""),
            pb::SecurityGroupRule {
                port_range_min: Some(8080),
                port_range_max: Some(8080),
                ..rule(
                    "server-tcp",
                    pb::Direction::Ingress,
                    pb::EtherType::Ipv4,
                    "tcp",
                )
            },
            rule(
                "server-ping",
                pb::Direction::Ingress,
                pb::EtherType::Ipv4,
                "icmp",
            ),
        ],
    );
    vec![upsert(client), upsert(server)]
}

/// VMs a (10.0.0.1, client) and b (10.0.0.2, server), programmed and ACTIVE.
async fn client_and_server(
    node: &NetNs,
    tag: &str,
    client: &mut DataplaneClient<Channel>,
) -> Result<(Vm, Vm)> {
    let (a, b) = Vm::pair(node, tag)?;
    let mut pa = port(
        "a",
        "net",
        "fa:16:3e:00:00:01",
        &[("sub", "10.0.0.1")],
        NODE,
        "tap-a",
    );
    pa.security_group_ids = vec!["client".into()];
    let mut pb_ = port(
        "b",
        "net",
        "fa:16:3e:00:00:02",
        &[("sub", "10.0.0.2")],
        NODE,
        "tap-b",
    );
    pb_.security_group_ids = vec!["server".into()];
    let mut changes = groups();
    changes.extend([
        upsert(network("net")),
        upsert(subnet("sub", "net", "10.0.0.0/24")),
        upsert(pa),
        upsert(pb_),
    ]);
    client.apply(apply(changes)).await?;
    wait_status(client, "a", pb::Status::Active).await?;
    wait_status(client, "b", pb::Status::Active).await?;
    Ok((a, b))
}

/// A pinned map: its pin, its id and its entries (key and value bytes, sorted).
type PinnedMap = (PathBuf, u32, Vec<Vec<u8>>);

/// Every pinned map of the active set: what a restart that adopts changes nothing of.
fn active_set_snapshot(agent: &Agent) -> Result<Vec<PinnedMap>> {
    let dir = agent.active_set_maps()?;
    let mut snapshot = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let info = aya::maps::MapInfo::from_pin(&path)?;
        let entries = raw_entries(&path, info.key_size(), info.value_size())?;
        snapshot.push((path, info.id(), entries));
    }
    snapshot.sort();
    Ok(snapshot)
}

/// Every (key, value) of the map pinned at `path`, as bytes, sorted.
fn raw_entries(path: &Path, key_size: u32, value_size: u32) -> Result<Vec<Vec<u8>>> {
    let fd = bpf_obj_get(path)?;
    let (key_size, value_size) = (key_size as usize, value_size as usize);
    let mut entries = Vec::new();
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    let mut first = true;
    loop {
        let found = bpf_map_op(
            BPF_MAP_GET_NEXT_KEY,
            fd,
            if first { None } else { Some(&key) },
            &mut next,
        );
        if !found {
            break;
        }
        first = false;
        key.copy_from_slice(&next);
        if bpf_map_op(BPF_MAP_LOOKUP_ELEM, fd, Some(&key), &mut value) {
            entries.push([key.clone(), value.clone()].concat());
        }
    }
    // SAFETY: closing the fd this function opened.
    unsafe { libc::close(fd) };
    entries.sort();
    Ok(entries)
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` as the map element commands read it.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// A map element command; whether the kernel found the element.
fn bpf_map_op(cmd: libc::c_long, fd: i32, key: Option<&[u8]>, out: &mut [u8]) -> bool {
    let attr = MapElemAttr {
        map_fd: fd as u32,
        _pad: 0,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value_or_next_key: out.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: the attr points at buffers of the sizes the map has, alive for the call.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const MapElemAttr,
            std::mem::size_of::<MapElemAttr>(),
        ) == 0
    }
}

/// `BPF_OBJ_GET` or `BPF_OBJ_PIN` of `path` (with `fd`, for a pin): the syscall's result.
fn bpf_obj(cmd: libc::c_long, path: &Path, fd: u32) -> Result<i64> {
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let name = CString::new(path.as_os_str().as_encoded_bytes())?;
    let attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: fd,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: the attr points at a NUL-terminated path alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ObjAttr,
            std::mem::size_of::<ObjAttr>(),
        )
    };
    ensure!(
        rc >= 0,
        "bpf command {cmd} on {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(rc)
}

/// An fd of the object pinned at `path`.
fn bpf_obj_get(path: &Path) -> Result<i32> {
    Ok(bpf_obj(BPF_OBJ_GET, path, 0)? as i32)
}

/// Pins the object `fd` refers to at `path`.
fn bpf_obj_pin(fd: i32, path: &Path) -> Result<()> {
    bpf_obj(BPF_OBJ_PIN, path, fd as u32).map(drop)
}

/// Detaches the link pinned at `path` from its device, as `bpftool link detach` does.
fn detach_link(path: &Path) -> Result<()> {
    let fd = bpf_obj_get(path)?;
    let attr: [u32; 2] = [fd as u32, 0];
    // SAFETY: the attr is the link_detach member of `union bpf_attr`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_ptr(), 8usize) };
    let error = std::io::Error::last_os_error();
    // SAFETY: closing the fd this function opened.
    unsafe { libc::close(fd) };
    ensure!(rc == 0, "BPF_LINK_DETACH {}: {error}", path.display());
    Ok(())
}

#[tokio::test]
async fn kill_9_and_restart_lose_no_packet_and_no_connection() -> Result<()> {
    let node = NetNs::new("hl-kill")?;
    let mut agent = Agent::start(&node, NODE).await?;
    let mut client = agent.client().await?;
    let (a, b) = client_and_server(&node, "hl-kill", &mut client).await?;
    let server: SocketAddr = SERVER.parse()?;
    let _echo = EchoServer::tcp(&b.ns, server)?;
    let mut open = tcp_connect(&a.ns, server)?;
    echo_round_trip(&mut open, b"before")?;
    let before = active_set_snapshot(&agent)?;

    // 40 pings over 8 s, while the agent is killed, is gone and comes back.
    let pinger = {
        let vm_ns = a.ns.name().to_owned();
        std::thread::spawn(move || -> Result<String> {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &vm_ns, "ping", "-n", "-q", "-c", "40"])
                .args(["-i", "0.2", "-W", "1", "-w", "14", "10.0.0.2"])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.kill()?;
    // No agent: the pinned links and maps carry on.
    echo_round_trip(&mut open, b"while the agent is gone")?;
    ensure!(tcp_works(&a.ns, server), "a new connection with no agent");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.start_again().await?;
    let mut client = agent.client().await?;
    wait_status(&mut client, "a", pb::Status::Active).await?;
    echo_round_trip(&mut open, b"after the restart")?;

    let pings = pinger.join().expect("pinger")?;
    ensure!(
        pings.contains("40 packets transmitted, 40 received"),
        "pings lost across kill -9 and restart: {pings}\n{}",
        agent.logs()
    );
    // The restart adopted what was there: same maps, same entries, same active set.
    let after = active_set_snapshot(&agent)?;
    ensure!(
        before == after,
        "the restart changed the active map set\n{}",
        agent.logs()
    );
    let logs = agent.logs();
    ensure!(logs.contains("took over the pinned link"), "{logs}");
    ensure!(logs.contains("restored the stored state"), "{logs}");
    Ok(())
}

/// Group "big" at `revision` with `rules` TCP rules on ports 20000.., and one for 8080.
fn big_group(rules: u32, revision: u64) -> pb::Change {
    let mut all: Vec<pb::SecurityGroupRule> = (0..rules)
        .map(|i| pb::SecurityGroupRule {
            port_range_min: Some(20_000 + i),
            port_range_max: Some(20_000 + i),
            remote_ip_prefix: format!("10.{}.{}.0/24", 1 + i / 250, i % 250),
            ..rule(
                &format!("big-{i}"),
                pb::Direction::Ingress,
                pb::EtherType::Ipv4,
                "tcp",
            )
        })
        .collect();
    all.push(pb::SecurityGroupRule {
        port_range_min: Some(8080),
        port_range_max: Some(8080),
        ..rule(
            "big-8080",
            pb::Direction::Ingress,
            pb::EtherType::Ipv4,
            "tcp",
        )
    });
    upsert(pb::SecurityGroup {
        revision_number: revision,
        ..security_group("big", true, all)
    })
}

#[tokio::test]
async fn kill_9_in_the_middle_of_a_large_apply_leaves_the_old_or_the_new_state_whole() -> Result<()>
{
    const RULES: u32 = 3000;
    let node = NetNs::new("hl-crash")?;
    let mut agent = Agent::start(&node, NODE).await?;
    let mut client = agent.client().await?;
    let (a, b) = client_and_server(&node, "hl-crash", &mut client).await?;
    let server: SocketAddr = SERVER.parse()?;
    let _echo = EchoServer::tcp(&b.ns, server)?;
    let a_ns = &a.ns;
    // Every Apply carries a newer revision of port b than the last.
    let mut revision = 10;

    // How long the Apply takes here and now (the kills fall at fractions of it), then
    // back to the old state.
    let moved_to = |group: &str, revision: u64| {
        let mut p = port(
            "b",
            "net",
            "fa:16:3e:00:00:02",
            &[("sub", "10.0.0.2")],
            NODE,
            "tap-b",
        );
        p.security_group_ids = vec![group.into()];
        p.revision_number = revision;
        upsert(p)
    };
    revision += 1;
    let started = std::time::Instant::now();
    client
        .apply(apply(vec![
            big_group(RULES, revision),
            moved_to("big", revision),
        ]))
        .await?;
    let took = started.elapsed();
    revision += 1;
    client
        .apply(apply(vec![moved_to("server", revision)]))
        .await?;

    let mut outcomes = Vec::new();
    let fractions = [0.0, 0.25, 0.5, 0.75, 2.0];
    for (round, fraction) in fractions.into_iter().enumerate() {
        let delay_ms = (took.as_secs_f64() * fraction * 1000.0) as u64;
        // Old: b in "server" (8080 open), "big" absent or in force as last time. New:
        // b in "big" only, whose rules open 8080 again under new rule ids.
        let mut client = agent.client().await?;
        revision += 1;
        let request = apply(vec![big_group(RULES, revision), moved_to("big", revision)]);
        let applying = tokio::spawn(async move { client.apply(request).await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        agent.kill()?;
        let answered = applying.await?.is_ok();
        agent.start_again().await?;
        let mut client = agent.client().await?;
        let rules = match client
            .get_security_group(pb::GetRequest { id: "big".into() })
            .await
        {
            Ok(group) => group
                .into_inner()
                .security_group
                .map_or(0, |g| g.rules.len()),
            Err(status) if status.code() == tonic::Code::NotFound => 0,
            Err(status) => return Err(status.into()),
        };
        let port_b = client
            .get_port(pb::GetRequest { id: "b".into() })
            .await?
            .into_inner()
            .port
            .context("port b")?;
        let new = port_b.security_group_ids == ["big"];
        ensure!(
            rules == RULES as usize + 1 || (rules == 0 && !new),
            "round {round}: port b in {:?} with {rules} rules of big: a part of the Apply",
            port_b.security_group_ids
        );
        ensure!(
            !answered || new,
            "round {round}: the Apply was answered, yet is gone"
        );
        // The datapath does what the stored state says, whole: 8080 is open either way,
        // through the rule of whichever state is in force, and a port neither opens is
        // refused.
        wait_status(&mut client, "b", pb::Status::Active).await?;
        ensure!(tcp_works(a_ns, server), "round {round}: 8080 closed");
        ensure!(
            !tcp_works(a_ns, "10.0.0.2:9090".parse()?),
            "round {round}: 9090 open"
        );
        outcomes.push((delay_ms, new, answered));
        if new {
            // Back to the old state for the next round.
            revision += 1;
            client
                .apply(apply(vec![moved_to("server", revision)]))
                .await?;
        }
    }
    eprintln!("the Apply took {took:?}; (delay ms, new state, answered): {outcomes:?}");
    ensure!(
        outcomes.iter().any(|(_, new, _)| *new) && outcomes.iter().any(|(_, new, _)| !*new),
        "the kills never fell before and after the Apply took: {outcomes:?}"
    );
    Ok(())
}

#[tokio::test]
async fn removed_pins_and_a_detached_dispatcher_are_put_back_and_reported() -> Result<()> {
    let node = NetNs::new("hl-drift")?;
    // An uplink to nowhere in particular: its XDP dispatcher is one more to detach.
    let outside = NetNs::new("hl-drift-out")?;
    let uplink = node.add_veth("up0", Some(&outside), "ext0")?;
    let metrics: SocketAddr = "127.0.0.1:9479".parse()?;
    let metrics_flag = metrics.to_string();
    let agent = Agent::start_with(
        &node,
        NODE,
        &[
            "--drift-check-seconds",
            "1",
            "--metrics",
            &metrics_flag,
            "--uplink",
            "up0",
        ],
    )
    .await?;
    let mut client = agent.client().await?;
    let mut watch = client
        .watch(pb::WatchRequest {
            include_current: false,
        })
        .await?
        .into_inner();
    let (a, _b) = client_and_server(&node, "hl-drift", &mut client).await?;
    ensure!(a.ping("10.0.0.2".parse()?, 2)?.all_replied());

    let pins = agent.pins();
    let ifindex = node.ifindex("tap-a")?;
    let egress_of_a = pins.link(ifindex, "port_egress");
    ensure!(
        egress_of_a.exists(),
        "no pinned link {}",
        egress_of_a.display()
    );
    // One direction's dispatcher goes off tap-a (frames to a would reach it unfiltered),
    // the other stays: only the one is attached again, since a device refuses a
    // dispatcher it still runs. And the uplink's XDP dispatcher goes off the uplink.
    detach_link(&egress_of_a)?;
    let uplink_xdp = pins.link(uplink, "uplink_xdp");
    detach_link(&uplink_xdp)?;
    // And pins go: a map of each kind, and a link (which, held by its pin alone, is
    // detached with it).
    let ct = pins.state_dir().join(map_names::CT);
    let ports = agent.active_set_maps()?.join(map_names::PORTS);
    // (b's: a's links are attached anew, which pins them anew.)
    let egress_of_b = pins.link(node.ifindex("tap-b")?, "port_egress");
    for pin in [&ct, &ports, &egress_of_b] {
        std::fs::remove_file(pin)?;
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut links, mut repinned) = (0, 0);
    while links < 3 || repinned < 2 {
        let event = tokio::time::timeout_at(deadline, watch.next())
            .await
            .with_context(|| format!("no drift event in time\n{}", agent.logs()))?
            .context("watch ended")??;
        if let Some(pb::watch_event::Event::Drift(drift)) = event.event {
            links += drift.links;
            repinned += drift.pins;
        }
    }
    for pin in [&ct, &ports, &egress_of_b, &egress_of_a, &uplink_xdp] {
        ensure!(pin.exists(), "{} not pinned again", pin.display());
    }
    ensure!(
        a.ping("10.0.0.2".parse()?, 3)?.all_replied(),
        "{}",
        agent.logs()
    );
    let scrape = scrape_metrics(&node, metrics)?;
    for series in [
        "dataplane_drift_relinked_total",
        "dataplane_drift_repinned_total",
    ] {
        ensure!(
            dataplane_tests::agent::metric(&scrape, series).is_some_and(|v| v >= 1.0),
            "{series} in\n{scrape}"
        );
    }
    let logs = agent.logs();
    ensure!(
        logs.contains("dispatcher detached behind the agent's back"),
        "{logs}"
    );
    ensure!(
        logs.contains("map pin removed behind the agent's back"),
        "{logs}"
    );
    Ok(())
}

#[tokio::test]
async fn a_restart_with_a_bigger_conntrack_table_carries_the_connections_over() -> Result<()> {
    let node = NetNs::new("hl-resize")?;
    let mut agent = Agent::start(&node, NODE).await?;
    let mut client = agent.client().await?;
    let (a, b) = client_and_server(&node, "hl-resize", &mut client).await?;
    let server: SocketAddr = SERVER.parse()?;
    let _echo = EchoServer::tcp(&b.ns, server)?;
    let mut open = tcp_connect(&a.ns, server)?;
    echo_round_trip(&mut open, b"before")?;
    // What an agent of an older map layout would have left beside this one's.
    let pins = agent.pins();
    let ct = pins.state_dir().join(map_names::CT);
    let old_version = ct
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .context("pin root")?
        .join("v5");
    std::fs::create_dir_all(old_version.join("state"))?;
    let fd = bpf_obj_get(&ct)?;
    bpf_obj_pin(fd, &old_version.join("state").join(map_names::CT))?;
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };

    agent
        .restart_with(&[("--conntrack-entries", "8192")])
        .await?;
    // The connection's replies pass only as established: its entry was copied into
    // the new, bigger table.
    echo_round_trip(&mut open, b"after the resize")?;
    ensure!(
        aya::maps::MapInfo::from_pin(&ct)?.max_entries() == 8192,
        "CT not resized"
    );
    let logs = agent.logs();
    ensure!(
        logs.contains("pinned map has another size; replacing it"),
        "{logs}"
    );
    ensure!(
        logs.contains("copied the entries of the replaced map"),
        "{logs}"
    );
    // Once the links were taken over, the other layout's pins went.
    ensure!(
        !old_version.exists(),
        "{} still there\n{logs}",
        old_version.display()
    );
    ensure!(
        !std::fs::read_dir(pins.state_dir())?
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with("-replaced")),
        "the replaced map's pin is still there"
    );
    Ok(())
}
