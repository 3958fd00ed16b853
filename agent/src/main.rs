//! `dataplane-agent run` serves the node; `dataplane-agent ctl ...` talks to a running one.

use std::{
    fs::File,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use dataplane_agent::{
    client::connect_unix,
    config::{Config, FileConfig, BPFFS_MOUNT, DEFAULT_STATE_DIR},
    core::compile::{SlotLimits, Slots},
    kernel::{
        bpffs,
        datapath::{Datapath, LoadOptions, MapLimits},
        links::LinkEvents,
        monitor::Monitor,
    },
    node::{Node, UplinkConfig},
    service::{metrics, server},
    store::Store,
};
use dataplane_proto::v1::{self as pb, dataplane_client::DataplaneClient};
use nix::fcntl::{Flock, FlockArg};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tonic::transport::Channel;
use tracing::{error, info, warn};

/// glibc's malloc kept the memory of each large commit's temporaries in its arenas, and
/// the agent's RSS grew to twice its live heap; mimalloc returns it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "eBPF data plane agent for hypervisor nodes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: serve the API and keep the datapath programmed.
    // Boxed: its flags dwarf `ctl`'s.
    Run(Box<RunArgs>),
    /// Query a running agent.
    Ctl(CtlArgs),
}

#[derive(Args)]
struct RunArgs {
    /// TOML config file; flags override its values.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    node_name: Option<String>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Also serve on this TCP address, with mutual TLS (`--tls-*`).
    #[arg(long)]
    grpc_tcp: Option<std::net::SocketAddr>,
    /// PEM certificate chain the TCP API presents.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA that clients' certificates must chain to.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Serve `--grpc-tcp` without TLS or client authentication.
    #[arg(long)]
    grpc_tcp_insecure: bool,
    /// API calls per second taken from all clients together (default 1000).
    #[arg(long)]
    max_requests_per_second: Option<u32>,
    /// Seconds between checks of the maps against the programmed state (default 30).
    #[arg(long)]
    drift_check_seconds: Option<u64>,
    /// Serve Prometheus metrics (`GET /metrics`) on this TCP address.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    #[arg(long)]
    bpffs_dir: Option<PathBuf>,
    #[arg(long)]
    max_ports: Option<u32>,
    #[arg(long)]
    conntrack_entries: Option<u32>,
    /// The NIC to the external networks (routers' gateways, floating IPs).
    #[arg(long)]
    uplink: Option<String>,
    /// SNAT's source ports, `first-last`.
    #[arg(long)]
    snat_ports: Option<String>,
    /// tracing filter, e.g. `info` or `dataplane_agent=debug` (RUST_LOG wins).
    #[arg(long, default_value = "info")]
    log: String,
}

#[derive(Args)]
struct CtlArgs {
    #[arg(long, default_value_t = format!("{DEFAULT_STATE_DIR}/agent.sock"))]
    socket: String,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Ports the agent knows, with their status.
    Ports,
    /// Packet and byte counters and drops by reason, per programmed port.
    Counters {
        /// Only this port.
        #[arg(long)]
        port: Option<String>,
    },
    /// Status of every resource.
    Status,
    /// Packets and bytes each security-group rule allowed.
    Rules {
        #[arg(long)]
        security_group: Option<String>,
    },
    /// Tracked connections of stateful security groups.
    Conntrack {
        #[command(subcommand)]
        command: ConntrackCommand,
    },
    /// SNAT bindings of this node's routers.
    Nat,
    /// What the datapath would do with a packet, stage by stage (like ovn-trace): read
    /// from the compiled state, nothing is sent.
    // Boxed: its flags dwarf the other commands'.
    Trace(Box<TraceArgs>),
    /// The compiled security-group policy of a port: groups, rules by direction,
    /// remote prefixes and group members, statefulness, allowed source addresses.
    Policy {
        #[arg(long)]
        port: String,
    },
    /// Live dropped packets, one line each (with --trace, delivered ones too), until
    /// interrupted.
    Monitor {
        /// Only this port's packets.
        #[arg(long)]
        port: Option<String>,
        /// Also every packet delivered to a port.
        #[arg(long)]
        trace: bool,
        /// Also the captured header bytes, in hex.
        #[arg(long)]
        hex: bool,
    },
}

/// A packet to trace; what is left out comes from the sending port.
#[derive(Args)]
struct TraceArgs {
    /// The sending port.
    #[arg(long, required_unless_present = "uplink", conflicts_with = "uplink")]
    port: Option<String>,
    /// The packet arrives on the uplink from the external network.
    #[arg(long)]
    uplink: bool,
    /// Default: the port's MAC.
    #[arg(long)]
    src_mac: Option<String>,
    /// Default: the destination's MAC on the port's network, else its router's.
    #[arg(long)]
    dst_mac: Option<String>,
    /// A non-IP frame of this ethertype (e.g. 0x88cc).
    #[arg(long, value_parser = parse_ethertype)]
    ethertype: Option<u32>,
    /// Default: the port's first address of the destination's family.
    #[arg(long)]
    src: Option<String>,
    #[arg(long)]
    dst: Option<String>,
    /// tcp, udp, icmp (ICMPv6 in IPv6), or a protocol number.
    #[arg(long, default_value = "tcp")]
    proto: String,
    #[arg(long, default_value_t = 40000)]
    sport: u32,
    #[arg(long, default_value_t = 0)]
    dport: u32,
    /// ICMP type (default: echo request of the family).
    #[arg(long)]
    icmp_type: Option<u32>,
    #[arg(long, default_value_t = 0)]
    icmp_code: u32,
    #[arg(long, default_value_t = 0)]
    icmp_id: u32,
    /// TCP flags, "|"-separated (SYN, ACK, FIN, RST).
    #[arg(long, default_value = "SYN")]
    flags: String,
    /// TTL or hop limit.
    #[arg(long)]
    ttl: Option<u32>,
    /// The packet belongs to a tracked connection (default: its first packet).
    #[arg(long)]
    established: bool,
}

fn parse_ethertype(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("{text:?} is not an ethertype (0x88cc or 34956)"))
}

#[derive(Subcommand)]
enum ConntrackCommand {
    /// List tracked connections.
    List {
        #[arg(long)]
        port: Option<String>,
    },
    /// Forget a port's connections (their next packets are judged by the rules again).
    Flush {
        #[arg(long)]
        port: String,
    },
    /// Table fill and counters.
    Stats,
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (its numbering is kept stable:
/// retired options keep their places).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Milliseconds before freed memory is given back: at once. A commit at a large node's
/// scale frees tens of megabytes of temporaries; kept for even 10 ms they were still
/// resident when the next phase allocated afresh, and the peak was 250 to 267 against
/// 230 to 244 MB (the control-plane bench at 10,000 ports), with no commit slower.
const PURGE_DELAY_MS: std::ffi::c_long = 0;

fn main() -> anyhow::Result<()> {
    // SAFETY: sets one of mimalloc's options, which it reads on every purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    match cli.command {
        Command::Run(args) => runtime.block_on(run(*args)),
        Command::Ctl(args) => runtime.block_on(ctl(args)),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log))
                .context("parsing --log")?,
        )
        .init();

    let file = match &args.config {
        Some(path) => FileConfig::read(path)?,
        None => FileConfig::default(),
    };
    let config = Config::resolve(
        FileConfig {
            node_name: args.node_name,
            state_dir: args.state_dir,
            socket: args.socket,
            grpc_tcp: args.grpc_tcp,
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
            tls_client_ca: args.tls_client_ca,
            grpc_tcp_insecure: args.grpc_tcp_insecure.then_some(true),
            max_requests_per_second: args.max_requests_per_second,
            drift_check_seconds: args.drift_check_seconds,
            metrics: args.metrics,
            bpffs_dir: args.bpffs_dir,
            max_ports: args.max_ports,
            conntrack_entries: args.conntrack_entries,
            uplink: args.uplink,
            snat_ports: args.snat_ports,
        },
        file,
    )?;
    info!(?config, "starting");

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let _lock = lock_state_dir(&config.state_dir)?;

    bpffs::ensure_mounted(Path::new(BPFFS_MOUNT)).context("mounting bpffs")?;
    bpffs::ensure_on_bpffs(&config.bpffs_dir).context("preparing the pin directory")?;
    let limits = MapLimits::for_node(config.max_ports, config.conntrack_entries);
    let mut datapath = Datapath::load(
        limits,
        &LoadOptions {
            pin_root: Some(config.bpffs_dir.clone()),
            trace_verdicts: false,
        },
    )
    .context("loading the datapath")?;
    let monitor =
        Monitor::start(datapath.take_monitor_maps()?).context("starting the packet monitor")?;
    let store_path = config.state_dir.join("state.redb");
    let store = Store::open(&store_path)?;
    let stored = store
        .load()
        .with_context(|| format!("reading the stored state in {}", store_path.display()))?;
    let stored_slots = store
        .load_slots()
        .with_context(|| format!("reading the stored slots in {}", store_path.display()))?;
    let node = Arc::new(Node::new(
        config.node_name.clone(),
        config.uplink.clone().map(|interface| UplinkConfig {
            interface,
            snat_ports: config.snat_ports,
        }),
        datapath,
        Slots::with_assignments(
            SlotLimits {
                max_ports: config.max_ports,
                max_networks: config.max_ports,
                max_rules: limits.max_rules,
            },
            stored_slots,
        ),
        Some(store),
        Some(monitor),
    ));
    // What the last run was told, programmed before the API server is heard again.
    if !stored.is_empty() {
        let resources = stored.len();
        let restored = node
            .restore(stored)
            .await
            .context("programming the stored state")?;
        info!(
            resources,
            generation = restored.generation,
            "restored the stored state"
        );
    }

    let devices = tokio::spawn(watch_devices(node.clone()));
    let logs = tokio::spawn(forward_datapath_logs(node.clone()));
    let expiry = tokio::spawn(expire_connections(node.clone()));
    let catch_up = tokio::spawn({
        let node = node.clone();
        async move { node.catch_up_idle_sets().await }
    });
    let drift = tokio::spawn(repair_drift(
        node.clone(),
        Duration::from_secs(config.drift_check_seconds),
    ));
    let metrics = match config.metrics {
        Some(address) => Some(tokio::spawn(metrics::serve(
            node.clone(),
            metrics::bind(address).await?,
        ))),
        None => None,
    };

    let mut terminate =
        tokio::signal::unix::signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
    };
    let served = server::serve(
        node.clone(),
        &config.socket,
        config.grpc_tcp.as_ref(),
        config.max_requests_per_second,
        shutdown,
    )
    .await;
    devices.abort();
    logs.abort();
    expiry.abort();
    catch_up.abort();
    drift.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    node.flush_datapath_logs().await;
    info!("stopped");
    served
}

/// One agent per state directory: a second one would fight the first over the socket
/// and the pins.
fn lock_state_dir(state_dir: &Path) -> anyhow::Result<Flock<File>> {
    let path = state_dir.join("agent.lock");
    let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "another agent holds {} ({errno}); one agent per state directory",
            path.display()
        )
    })
}

/// Re-resolves port devices on every link event, and every few seconds in case an
/// event was missed.
async fn watch_devices(node: Arc<Node>) {
    const RESCAN: Duration = Duration::from_secs(2);
    let mut events = match LinkEvents::subscribe() {
        Ok(events) => {
            node.watch_links(true);
            Some(events)
        }
        Err(e) => {
            warn!(error = %e, "no rtnetlink link events; polling devices only");
            None
        }
    };
    loop {
        match &mut events {
            Some(link_events) => {
                tokio::select! {
                    changed = link_events.changed() => match changed {
                        Ok(()) => node.links_changed(),
                        Err(e) => {
                            warn!(error = %e, "rtnetlink read failed; polling devices only");
                            node.watch_links(false);
                            events = None;
                        }
                    },
                    () = tokio::time::sleep(RESCAN) => {}
                }
            }
            None => tokio::time::sleep(RESCAN).await,
        }
        if let Err(e) = node.refresh_devices().await {
            error!(error = ?e, "reprogramming after a device change failed");
        }
    }
}

/// Removes conntrack entries idle past their timeout, every few seconds.
async fn expire_connections(node: Arc<Node>) {
    const SWEEP: Duration = Duration::from_secs(5);
    loop {
        tokio::time::sleep(SWEEP).await;
        match node.expire_connections().await {
            Ok(0) => {}
            Ok(expired) => tracing::debug!(expired, "expired connections removed"),
            Err(e) => warn!(error = ?e, "conntrack expiry sweep failed"),
        }
    }
}

/// Checks the maps against the programmed state every `period`, putting back what
/// was changed behind the agent's back (the node logs each repair).
async fn repair_drift(node: Arc<Node>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        if let Err(e) = node.repair_drift().await {
            warn!(error = ?e, "drift check failed");
        }
    }
}

/// Forwards aya-log records from the programs into tracing as they arrive.
async fn forward_datapath_logs(node: Arc<Node>) {
    let Some(fd) = node.datapath_log_fd().await else {
        return;
    };
    // SAFETY: the fd belongs to the datapath's logger, which lives inside `node`; this
    // task holds `node`, so the fd stays open for as long as it is registered.
    let readable = match unsafe { AsyncFd::register(fd) } {
        Ok(readable) => readable,
        Err(e) => {
            warn!(error = %e, "cannot wait on the datapath log buffer");
            return;
        }
    };
    loop {
        match readable.readable().await {
            Ok(mut guard) => {
                node.flush_datapath_logs().await;
                guard.clear_ready();
            }
            Err(e) => {
                warn!(error = %e, "datapath log buffer");
                return;
            }
        }
    }
}

/// Prints the trace one block per stage, then the verdict.
async fn ctl_trace(client: &mut DataplaneClient<Channel>, args: TraceArgs) -> anyhow::Result<()> {
    let v6 = args.dst.as_deref().is_some_and(|dst| dst.contains(':'));
    let icmp = matches!(args.proto.as_str(), "icmp" | "icmpv6" | "ipv6-icmp");
    let echo_request = if v6 { 128 } else { 8 };
    let request = pb::TracePacketRequest {
        port_id: args.port.unwrap_or_default(),
        from_uplink: args.uplink,
        src_mac: args.src_mac.unwrap_or_default(),
        dst_mac: args.dst_mac.unwrap_or_default(),
        ethertype: args.ethertype,
        src_ip: args.src.unwrap_or_default(),
        dst_ip: args.dst.unwrap_or_default(),
        protocol: args.proto,
        src_port: args.sport,
        dst_port: args.dport,
        icmp_type: args
            .icmp_type
            .unwrap_or(if icmp { echo_request } else { 0 }),
        icmp_code: args.icmp_code,
        icmp_id: args.icmp_id,
        tcp_flags: args.flags,
        ttl: args.ttl,
        established: args.established,
    };
    let response = client.trace_packet(request).await?.into_inner();
    for (number, stage) in response.stages.iter().enumerate() {
        println!("{}. {}", number + 1, stage.name);
        println!("   lookup:   {}", stage.lookup);
        println!("   found:    {}", stage.found);
        println!("   decision: {}", stage.decision);
    }
    let verdict = response.verdict.unwrap_or_default();
    println!("verdict: {}", verdict.summary);
    Ok(())
}

async fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    let mut client = connect_unix(Path::new(&args.socket))
        .await
        .with_context(|| format!("connecting to {}", args.socket))?;
    match args.command {
        CtlCommand::Ports => {
            let ports = client
                .list_ports(pb::ListRequest {})
                .await?
                .into_inner()
                .ports;
            println!(
                "{:<38} {:<18} {:<16} {:<8} REASON",
                "PORT", "MAC", "DEVICE", "STATUS"
            );
            for entry in ports {
                let port = entry.port.unwrap_or_default();
                let (status, reason) = status_words(entry.status.as_ref());
                let device = port.binding.map(|b| b.interface_name).unwrap_or_default();
                println!(
                    "{:<38} {:<18} {:<16} {:<8} {reason}",
                    port.id, port.mac_address, device, status
                );
            }
        }
        CtlCommand::Counters { port } => {
            let response = client
                .get_port_counters(pb::GetPortCountersRequest {
                    port_id: port.unwrap_or_default(),
                })
                .await?
                .into_inner();
            println!(
                "{:<38} {:>10} {:>12} {:>10} {:>12}  DROPS",
                "PORT", "RX_PKTS", "RX_BYTES", "TX_PKTS", "TX_BYTES"
            );
            for counters in response.ports {
                println!(
                    "{:<38} {:>10} {:>12} {:>10} {:>12}  {}",
                    counters.port_id,
                    counters.rx_packets,
                    counters.rx_bytes,
                    counters.tx_packets,
                    counters.tx_bytes,
                    drop_words(&counters.drops)
                );
            }
            if let Some(uplink) = &response.uplink {
                println!(
                    "{:<38} {:>10} {:>12} {:>10} {:>12}  {}",
                    format!("uplink {}", uplink.port_id),
                    uplink.rx_packets,
                    uplink.rx_bytes,
                    uplink.tx_packets,
                    uplink.tx_bytes,
                    drop_words(&uplink.drops)
                );
            }
            if !response.unattributed_drops.is_empty() {
                println!(
                    "unattributed drops: {}",
                    drop_words(&response.unattributed_drops)
                );
            }
        }
        CtlCommand::Rules { security_group } => ctl_rules(&mut client, security_group).await?,
        CtlCommand::Conntrack { command } => ctl_conntrack(&mut client, command).await?,
        CtlCommand::Trace(trace) => ctl_trace(&mut client, *trace).await?,
        CtlCommand::Policy { port } => ctl_policy(&mut client, port).await?,
        CtlCommand::Monitor { port, trace, hex } => {
            ctl_monitor(&mut client, port, trace, hex).await?
        }
        CtlCommand::Nat => {
            let bindings = client
                .list_nat_bindings(pb::ListNatBindingsRequest {})
                .await?
                .into_inner()
                .bindings;
            println!(
                "{:<24} {:>5} {:<22} {:<22} {:<22} {:>6} {:>8}",
                "PORT", "PROTO", "INTERNAL", "EXTERNAL", "REMOTE", "IDLE", "EXPIRES"
            );
            let endpoint = |e: Option<pb::Endpoint>| {
                e.map(|e| format!("{}:{}", e.address, e.port))
                    .unwrap_or_default()
            };
            for b in bindings {
                println!(
                    "{:<24} {:>5} {:<22} {:<22} {:<22} {:>5}s {:>7}s",
                    b.port_id,
                    b.protocol,
                    endpoint(b.internal),
                    endpoint(b.external),
                    endpoint(b.remote),
                    b.idle_seconds,
                    b.expires_in_seconds
                );
            }
        }
        CtlCommand::Status => {
            let mut events = client
                .watch(pb::WatchRequest {
                    include_current: true,
                })
                .await?
                .into_inner();
            // The current statuses arrive at once; stop when the stream goes quiet.
            while let Ok(message) =
                tokio::time::timeout(Duration::from_millis(300), events.message()).await
            {
                let Some(event) = message? else { break };
                if let Some(pb::watch_event::Event::Status(status)) = event.event {
                    let kind = status
                        .r#ref
                        .as_ref()
                        .and_then(|r| pb::ResourceKind::try_from(r.kind).ok())
                        .map(|k| {
                            k.as_str_name()
                                .trim_start_matches("RESOURCE_KIND_")
                                .to_lowercase()
                        })
                        .unwrap_or_default();
                    let id = status
                        .r#ref
                        .as_ref()
                        .map(|r| r.id.clone())
                        .unwrap_or_default();
                    let (word, reason) = status_words(Some(&status));
                    println!("{kind:<15} {id:<38} {word:<8} {reason}");
                }
            }
        }
    }
    Ok(())
}

async fn ctl_rules(
    client: &mut DataplaneClient<Channel>,
    security_group: Option<String>,
) -> anyhow::Result<()> {
    let rules = client
        .get_rule_counters(pb::GetRuleCountersRequest {
            security_group_id: security_group.unwrap_or_default(),
        })
        .await?
        .into_inner()
        .rules;
    println!(
        "{:<38} {:<38} {:>10} {:>12}",
        "SECURITY_GROUP", "RULE", "PACKETS", "BYTES"
    );
    for rule in rules {
        println!(
            "{:<38} {:<38} {:>10} {:>12}",
            rule.security_group_id, rule.rule_id, rule.packets, rule.bytes
        );
    }
    Ok(())
}

async fn ctl_conntrack(
    client: &mut DataplaneClient<Channel>,
    command: ConntrackCommand,
) -> anyhow::Result<()> {
    match command {
        ConntrackCommand::List { port } => {
            let connections = client
                .list_connections(pb::ListConnectionsRequest {
                    port_id: port.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .connections;
            println!(
                "{:<24} {:>5} {:<8} {:<28} {:<28} {:<12} {:>6}",
                "PORT", "PROTO", "DIR", "SOURCE", "DESTINATION", "STATE", "IDLE"
            );
            for c in connections {
                let endpoint = |e: Option<pb::Endpoint>| {
                    e.map(|e| format!("{}:{}", e.address, e.port))
                        .unwrap_or_default()
                };
                let direction = pb::ConnectionDirection::try_from(c.direction)
                    .map(|d| {
                        d.as_str_name()
                            .trim_start_matches("CONNECTION_DIRECTION_")
                            .to_lowercase()
                    })
                    .unwrap_or_default();
                let state = pb::ConnectionState::try_from(c.state)
                    .map(|s| {
                        s.as_str_name()
                            .trim_start_matches("CONNECTION_STATE_")
                            .to_lowercase()
                    })
                    .unwrap_or_default();
                println!(
                    "{:<24} {:>5} {:<8} {:<28} {:<28} {:<12} {:>5}s",
                    c.port_id,
                    c.protocol,
                    direction,
                    endpoint(c.source),
                    endpoint(c.destination),
                    state,
                    c.idle_seconds
                );
            }
        }
        ConntrackCommand::Flush { port } => {
            let flushed = client
                .flush_connections(pb::FlushConnectionsRequest {
                    port_id: port.clone(),
                })
                .await?
                .into_inner()
                .flushed;
            println!("flushed {flushed} connections of port {port}");
        }
        ConntrackCommand::Stats => {
            let stats = client
                .get_conntrack_stats(pb::GetConntrackStatsRequest {})
                .await?
                .into_inner();
            println!("{stats:#?}");
        }
    }
    Ok(())
}

async fn ctl_policy(client: &mut DataplaneClient<Channel>, port: String) -> anyhow::Result<()> {
    let policy = client
        .get_port_policy(pb::GetPortPolicyRequest { port_id: port })
        .await?
        .into_inner();
    let yes_no = |value: bool| if value { "yes" } else { "no" };
    println!("port            {}", policy.port_id);
    println!("port security   {}", yes_no(policy.port_security));
    println!(
        "security groups {}",
        if policy.security_group_ids.is_empty() {
            "-".to_owned()
        } else {
            policy.security_group_ids.join(" ")
        }
    );
    println!("stateful        {}", yes_no(policy.stateful));
    println!(
        "policy          {} (revision {:08x})",
        policy.policy_id, policy.policy_revision
    );
    println!("allowed sources");
    for address in &policy.allowed_addresses {
        println!("  {} {}", address.mac_address, address.ip_prefix);
    }
    for (direction, rules) in [
        ("ingress", &policy.ingress_rules),
        ("egress", &policy.egress_rules),
    ] {
        println!("{direction} rules ({})", rules.len());
        for rule in rules {
            println!("  {}", rule_words(rule));
        }
    }
    Ok(())
}

/// One rule as `RULE GROUP ETHERTYPE PROTO PORTS REMOTE [MEMBERS] SLOT`.
fn rule_words(rule: &pb::PolicyRule) -> String {
    let ethertype = pb::EtherType::try_from(rule.ethertype)
        .map(|e| match e {
            pb::EtherType::Ipv6 => "ipv6",
            _ => "ipv4",
        })
        .unwrap_or("?");
    let ports = match (rule.port_range_min, rule.port_range_max) {
        (Some(min), Some(max)) if min == max => min.to_string(),
        (Some(min), Some(max)) => format!("{min}-{max}"),
        (Some(min), None) => format!("{min}-"),
        (None, Some(max)) => format!("-{max}"),
        (None, None) => "*".to_owned(),
    };
    let remote = if !rule.remote_group_id.is_empty() {
        format!(
            "group {} [{}]",
            rule.remote_group_id,
            rule.remote_group_members.join(" ")
        )
    } else if !rule.remote_ip_prefix.is_empty() {
        rule.remote_ip_prefix.clone()
    } else {
        "any".to_owned()
    };
    let slot = if rule.programmed {
        format!("slot {}", rule.slot)
    } else {
        "NOT PROGRAMMED".to_owned()
    };
    format!(
        "{} group {} {ethertype} {} ports {ports} remote {remote} {slot}",
        rule.id, rule.security_group_id, rule.protocol
    )
}

async fn ctl_monitor(
    client: &mut DataplaneClient<Channel>,
    port: Option<String>,
    trace: bool,
    hex: bool,
) -> anyhow::Result<()> {
    let mut events = client
        .monitor(pb::MonitorRequest {
            port_id: port.unwrap_or_default(),
            trace,
            drop_reasons: Vec::new(),
        })
        .await?
        .into_inner();
    eprintln!("listening for events; press Ctrl-C to stop");
    while let Some(event) = events.message().await? {
        match event.event {
            Some(pb::monitor_event::Event::Packet(packet)) => {
                println!("{}", monitor_line(&packet));
                if hex {
                    for chunk in packet.header.chunks(16) {
                        let bytes: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                        println!("    {}", bytes.join(" "));
                    }
                }
            }
            Some(pb::monitor_event::Event::Lost(lost)) => {
                println!("xx lost {} events", lost.count);
            }
            None => {}
        }
    }
    Ok(())
}

/// One event, cilium-monitor style: `xx drop (policy_denied) port p1 from-port
/// 10.0.0.1:1234 -> 10.0.0.2:80 tcp`, `-> delivered ...` for a trace.
fn monitor_line(packet: &pb::PacketEvent) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_nanos(packet.time_unix_nanos);
    let since_midnight = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_micros() % 86_400_000_000);
    let clock = format!(
        "{:02}:{:02}:{:02}.{:06}",
        since_midnight / 3_600_000_000,
        since_midnight / 60_000_000 % 60,
        since_midnight / 1_000_000 % 60,
        since_midnight % 1_000_000
    );
    let verdict = match pb::MonitorVerdict::try_from(packet.verdict) {
        Ok(pb::MonitorVerdict::Dropped) => {
            let reason = pb::DropReason::try_from(packet.drop_reason)
                .map(|r| {
                    r.as_str_name()
                        .trim_start_matches("DROP_REASON_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| packet.drop_reason.to_string());
            format!("xx drop ({reason})")
        }
        _ => "-> delivered".to_owned(),
    };
    let hook = pb::MonitorHook::try_from(packet.hook)
        .map(|hook| match hook {
            pb::MonitorHook::FromPort => "from-port",
            pb::MonitorHook::ToPort => "to-port",
            pb::MonitorHook::Uplink => "uplink",
            pb::MonitorHook::Unspecified => "?",
        })
        .unwrap_or("?");
    let port = if packet.port_id.is_empty() {
        format!("ifindex {}", packet.ifindex)
    } else {
        format!("port {}", packet.port_id)
    };
    let summary = packet.summary.clone().unwrap_or_default();
    let endpoint = |address: &str, port: Option<u32>| match (address.contains(':'), port) {
        (true, Some(port)) => format!("[{address}]:{port}"),
        (false, Some(port)) => format!("{address}:{port}"),
        (_, None) => address.to_owned(),
    };
    let flow = if summary.source_address.is_empty() {
        format!("{} -> {}", summary.source_mac, summary.destination_mac)
    } else {
        format!(
            "{} -> {}",
            endpoint(&summary.source_address, summary.source_port),
            endpoint(&summary.destination_address, summary.destination_port)
        )
    };
    let what = match (summary.protocol, summary.arp_operation) {
        (_, Some(1)) => "arp request".to_owned(),
        (_, Some(2)) => "arp reply".to_owned(),
        (_, Some(operation)) => format!("arp op {operation}"),
        (Some(protocol), None) => {
            let name = match protocol {
                1 => "icmp".to_owned(),
                6 => "tcp".to_owned(),
                17 => "udp".to_owned(),
                58 => "icmpv6".to_owned(),
                132 => "sctp".to_owned(),
                other => format!("proto {other}"),
            };
            match (summary.icmp_type, summary.icmp_code) {
                (Some(kind), Some(code)) => format!("{name} type {kind} code {code}"),
                _ => name,
            }
        }
        (None, None) => format!("ethertype 0x{:04x}", summary.ethertype),
    };
    format!(
        "{clock} {verdict} {port} {hook} {flow} {what} ({} bytes)",
        packet.original_length
    )
}

fn status_words(status: Option<&pb::ResourceStatus>) -> (String, String) {
    match status {
        Some(status) => (
            pb::Status::try_from(status.status)
                .map(|s| s.as_str_name().trim_start_matches("STATUS_").to_owned())
                .unwrap_or_else(|_| "?".into()),
            status.reason.clone(),
        ),
        None => ("-".into(), String::new()),
    }
}

fn drop_words(drops: &[pb::DropCount]) -> String {
    drops
        .iter()
        .map(|drop| {
            let reason = pb::DropReason::try_from(drop.reason)
                .map(|r| {
                    r.as_str_name()
                        .trim_start_matches("DROP_REASON_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| drop.reason.to_string());
            format!("{reason}={}", drop.packets)
        })
        .collect::<Vec<_>>()
        .join(" ")
}
