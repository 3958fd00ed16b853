//! The node: desired state, its compiled form and the datapath, kept in step.
//!
//! Every change goes through one path: validate into a new [`State`], compile it
//! against the devices present, sync the datapath, and only then make the new state
//! current. A datapath error rolls the maps back to the previous compiled tables, so a
//! request either takes effect whole or not at all.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dataplane_abi::{ct_flags, ct_stat, CtEntry, CtKey, DropReason, RuleStats};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::sync::{broadcast, Mutex, Notify};
use tracing::{debug, info, warn};

use crate::{
    core::{
        compile::{
            compile, nat::gateway_neighbors, port_policy, Compiled, NodeView, PortPolicyView,
            ResourceStatus, Slots, StatusKind, Uplink,
        },
        model::{Change, MacAddr, Resource, ResourceKind, ResourceRef, State},
        trace::{self, Probe, Trace, TraceError},
        validate::ValidationError,
    },
    kernel::{
        datapath::{Counters, Datapath, DatapathError, Drift},
        links,
        monitor::{Monitor, MonitorError},
        neighbor,
    },
    store::{Store, StoreError},
};

/// What drift checks put back since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DriftTotals {
    /// Map entries, by map.
    pub entries: BTreeMap<&'static str, u64>,
    /// Dispatchers attached again.
    pub links: u64,
    /// Maps and links pinned again.
    pub pins: u64,
}

/// What watchers are told.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeEvent {
    Status(ResourceRef, ResourceStatus),
    Applied {
        generation: u64,
        operation: Operation,
        changes: u32,
    },
    /// A drift check put something back.
    Drift(Drift),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Apply,
    Sync,
    /// The stored state, at start.
    Restore,
    /// Port devices appeared or went away.
    Devices,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "apply",
            Operation::Sync => "sync",
            Operation::Restore => "restore",
            Operation::Devices => "devices",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("programming the datapath failed; the previous state stays in force")]
    Datapath(#[from] DatapathError),
    #[error("port {port_id} is not programmed on this node")]
    PortNotProgrammed { port_id: String },
    #[error("storing the desired state failed; the previous state stays in force")]
    Store(#[from] StoreError),
    #[error("the packet monitor")]
    Monitor(#[from] MonitorError),
}

/// Result of an accepted Apply or Sync.
#[derive(Debug)]
pub struct Committed {
    pub generation: u64,
    /// Status of each resource the request named (upserts; deletes are gone).
    pub statuses: Vec<(ResourceRef, ResourceStatus)>,
    /// Resources that are new, changed, or gone, against the state before.
    pub created: u32,
    pub updated: u32,
    pub deleted: u32,
}

/// The uplink NIC, as configured.
#[derive(Clone, Debug)]
pub struct UplinkConfig {
    pub interface: String,
    /// First SNAT port and how many.
    pub snat_ports: (u16, u16),
}

/// What [`Node::counters`] reports.
#[derive(Debug)]
pub struct NodeCounters {
    pub ports: Vec<(String, Counters)>,
    pub unattributed: Vec<(DropReason, u64)>,
    pub uplink: Option<(String, Counters)>,
}

/// How long one ARP or neighbour solicitation for an external gateway waits: the node
/// lock is held.
const GATEWAY_ASK_TIMEOUT: Duration = Duration::from_millis(200);
/// How often a resolved gateway is asked again (it may have changed its MAC), and how
/// often one that did not answer is.
const GATEWAY_REFRESH: Duration = Duration::from_secs(60);
const GATEWAY_RETRY: Duration = Duration::from_secs(2);

/// An external gateway's MAC and when it was last asked for.
#[derive(Clone, Copy, Debug)]
struct GatewayMac {
    mac: Option<MacAddr>,
    asked: Instant,
}

pub struct Node {
    node_name: String,
    /// How long each accepted Apply and Sync took, until the datapath was programmed.
    apply_seconds: Histogram,
    /// Where accepted desired state is kept across restarts; `None`: nowhere.
    store: Option<Store>,
    /// What the drift checks put back since start.
    drift_repaired: std::sync::Mutex<DriftTotals>,
    uplink: Option<UplinkConfig>,
    /// Connections the expiry sweep removed since start.
    expired_connections: AtomicU64,
    /// New connections dropped for a full conntrack table, as last reported.
    table_full_reported: AtomicU64,
    /// A commit was made: the idle map set may be behind the active one.
    committed: Notify,
    /// Link events reach the node ([`Self::watch_links`]): without them every commit
    /// dumps the links.
    links_watched: AtomicBool,
    /// A link event was seen since the last link dump (see `Inner::links`).
    links_stale: AtomicBool,
    inner: Mutex<Inner>,
    events: broadcast::Sender<NodeEvent>,
    /// The datapath's packet events; `None` where nobody reads them (tests of the node).
    monitor: Option<Monitor>,
}

struct Inner {
    state: State,
    slots: Slots,
    compiled: Compiled,
    devices: Devices,
    datapath: Datapath,
    generation: u64,
    /// External gateways' MACs as resolved on the uplink so far.
    gateway_macs: BTreeMap<IpAddr, GatewayMac>,
    /// Local ports whose device went away while they were programmed, until it returns.
    gone: BTreeSet<String>,
    /// The last link dump, by ifindex, while no link event has been seen since: at a
    /// large node's scale a dump is a tenth of a second, and most commits change no
    /// device.
    links: Option<BTreeMap<u32, links::LinkInfo>>,
}

/// The port devices present on this node, as the compiler sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Devices {
    interfaces: BTreeMap<String, u32>,
    /// Those whose VM end the datapath can hand frames to directly (`fdb_flags::PEER_DELIVERY`).
    peers: BTreeSet<u32>,
    /// The uplink, if configured and present.
    uplink: Option<Uplink>,
}

/// Watchers that fall this far behind miss events (and are told so by the channel).
const EVENT_BACKLOG: usize = 4096;

impl Node {
    pub fn new(
        node_name: String,
        uplink: Option<UplinkConfig>,
        datapath: Datapath,
        slots: Slots,
        store: Option<Store>,
        monitor: Option<Monitor>,
    ) -> Self {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Self {
            node_name,
            // 100 us to about 6.5 s.
            apply_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 17)),
            store,
            drift_repaired: std::sync::Mutex::new(DriftTotals::default()),
            uplink,
            expired_connections: AtomicU64::new(0),
            table_full_reported: AtomicU64::new(0),
            committed: Notify::new(),
            links_watched: AtomicBool::new(false),
            links_stale: AtomicBool::new(true),
            inner: Mutex::new(Inner {
                state: State::default(),
                slots,
                compiled: Compiled::default(),
                devices: Devices::default(),
                datapath,
                generation: 0,
                gateway_macs: BTreeMap::new(),
                gone: BTreeSet::new(),
                links: None,
            }),
            events,
            monitor,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// Applies a batch of changes, all or nothing.
    pub async fn apply(&self, changes: &[Change]) -> Result<Committed, NodeError> {
        let started = Instant::now();
        let mut inner = self.inner.lock().await;
        let next = inner.state.apply(changes)?;
        let named: Vec<ResourceRef> = changes
            .iter()
            .filter_map(|change| match change {
                Change::Upsert(resource) => Some(resource.reference()),
                Change::Delete(_) => None,
            })
            .collect();
        let committed = self.commit(&mut inner, next, Operation::Apply, changes.len(), &named)?;
        self.apply_seconds.observe(started.elapsed().as_secs_f64());
        Ok(committed)
    }

    /// Replaces the whole desired state.
    pub async fn sync(&self, resources: Vec<Resource>) -> Result<Committed, NodeError> {
        let started = Instant::now();
        let named: Vec<ResourceRef> = resources.iter().map(Resource::reference).collect();
        let count = resources.len();
        let mut inner = self.inner.lock().await;
        let next = State::replace(resources)?;
        let committed = self.commit(&mut inner, next, Operation::Sync, count, &named)?;
        self.apply_seconds.observe(started.elapsed().as_secs_f64());
        Ok(committed)
    }

    /// Programs `resources`, the state stored by an earlier run, at start: before the
    /// API server syncs, the datapath already does what it did.
    pub async fn restore(&self, resources: Vec<Resource>) -> Result<Committed, NodeError> {
        let count = resources.len();
        let mut inner = self.inner.lock().await;
        let next = State::replace(resources)?;
        self.commit(&mut inner, next, Operation::Restore, count, &[])
    }

    /// The durations of accepted Applies and Syncs, in seconds.
    pub fn apply_latency(&self) -> &Histogram {
        &self.apply_seconds
    }

    /// Puts back what differs from what the agent programmed (map entries, detached
    /// dispatchers, removed pins), and reports it: in the log, the metrics and to
    /// watchers.
    pub async fn repair_drift(&self) -> Result<Drift, NodeError> {
        // The maps are read back without the node's lock (commits go on meanwhile), and
        // compared under it only where they differ: a change since is compared anew.
        let probe = self.inner.lock().await.datapath.drift_probe()?;
        let maps = !tokio::task::spawn_blocking(move || probe.maps_hold())
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        let repaired = self.inner.lock().await.datapath.repair_drift(maps)?;
        if repaired.is_empty() {
            return Ok(repaired);
        }
        let mut totals = self
            .drift_repaired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (map, entries) in &repaired.entries {
            *totals.entries.entry(map).or_default() += entries;
            warn!(
                map,
                entries, "repaired drift: map entries differed from the programmed state"
            );
        }
        if repaired.links > 0 {
            warn!(
                links = repaired.links,
                "repaired drift: dispatchers were detached"
            );
        }
        if repaired.pins > 0 {
            warn!(pins = repaired.pins, "repaired drift: pins were removed");
        }
        totals.links += repaired.links;
        totals.pins += repaired.pins;
        let _ = self.events.send(NodeEvent::Drift(repaired.clone()));
        Ok(repaired)
    }

    /// What the drift checks put back since start.
    pub fn drift_repaired(&self) -> DriftTotals {
        self.drift_repaired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The agent-written maps: (name, entries, room for how many).
    pub async fn map_fill(&self) -> Result<Vec<(&'static str, u64, u64)>, NodeError> {
        Ok(self.inner.lock().await.datapath.map_fill()?)
    }

    /// How many SNAT bindings there are, and room for how many.
    pub async fn snat_fill(&self) -> Result<(u64, u64), NodeError> {
        Ok(self.inner.lock().await.datapath.snat_fill()?)
    }

    /// After each commit, a moment later (its reply goes out first), brings the idle
    /// map set up to the active one: see [`Datapath::catch_up_idle_set`]. Runs until
    /// dropped.
    pub async fn catch_up_idle_sets(&self) {
        const AFTER: Duration = Duration::from_millis(50);
        loop {
            self.committed.notified().await;
            tokio::time::sleep(AFTER).await;
            let mut inner = self.inner.lock().await;
            let started = Instant::now();
            match inner.datapath.catch_up_idle_set() {
                Ok(true) => debug!(
                    took_us = micros(started.elapsed()),
                    "idle map set caught up"
                ),
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, "catching the idle map set up failed; the next commit writes its difference")
                }
            }
        }
    }

    /// Whether link events reach [`Self::links_changed`] from now on.
    pub fn watch_links(&self, watched: bool) {
        self.links_watched.store(watched, Ordering::Release);
        self.links_changed();
    }

    /// A device came, went or changed: the next commit dumps the links anew. Called
    /// on every link event, without the node lock, before [`Self::refresh_devices`].
    pub fn links_changed(&self) {
        self.links_stale.store(true, Ordering::Release);
    }

    /// Re-resolves port devices after link events; recompiles if any came or went.
    pub async fn refresh_devices(&self) -> Result<(), NodeError> {
        let mut inner = self.inner.lock().await;
        let inner = &mut *inner;
        // Dumped anew whatever the events said: this is also the check for missed ones.
        inner.links = None;
        if self.local_devices(&inner.state, &mut inner.gateway_macs, &mut inner.links)
            == inner.devices
        {
            return Ok(());
        }
        let state = inner.state.clone();
        self.commit(inner, state, Operation::Devices, 0, &[])
            .map(|_| ())
    }

    /// Reads the current state and statuses under the lock.
    pub async fn read<T>(
        &self,
        f: impl FnOnce(&State, &BTreeMap<ResourceRef, ResourceStatus>) -> T,
    ) -> T {
        let inner = self.inner.lock().await;
        f(&inner.state, &inner.compiled.statuses)
    }

    /// Counters of one programmed port, or of all of them, drops charged to no port,
    /// and the uplink's (interface name, counters) if one is configured.
    pub async fn counters(&self, port_id: Option<&str>) -> Result<NodeCounters, NodeError> {
        let inner = self.inner.lock().await;
        let mut ports = Vec::new();
        for port in &inner.compiled.ports {
            if port_id.is_some_and(|id| id != port.port_id) {
                continue;
            }
            ports.push((
                port.port_id.clone(),
                inner.datapath.port_counters(port.slot)?,
            ));
        }
        if let Some(port_id) = port_id {
            if ports.is_empty() {
                return Err(NodeError::PortNotProgrammed {
                    port_id: port_id.to_owned(),
                });
            }
        }
        let uplink = match &self.uplink {
            Some(config) => Some((config.interface.clone(), inner.datapath.uplink_counters()?)),
            None => None,
        };
        Ok(NodeCounters {
            ports,
            unattributed: inner.datapath.unattributed_drops()?,
            uplink,
        })
    }

    /// Packets and bytes each rule allowed: (group id, rule id, counters), optionally of
    /// one group only.
    pub async fn rule_counters(
        &self,
        security_group_id: Option<&str>,
    ) -> Result<Vec<(String, String, RuleStats)>, NodeError> {
        let inner = self.inner.lock().await;
        let mut rules = Vec::new();
        for group in inner.state.security_groups.values() {
            if security_group_id.is_some_and(|id| id != group.id) {
                continue;
            }
            for rule in &group.rules {
                let counters = match inner.compiled.rules.get(&rule.id) {
                    Some(slot) => inner.datapath.rule_counters(*slot)?,
                    // A rule no programmed port uses has allowed nothing here.
                    None => RuleStats::default(),
                };
                rules.push((group.id.clone(), rule.id.clone(), counters));
            }
        }
        Ok(rules)
    }

    /// Tracked connections, optionally of one port only.
    pub async fn connections(&self, port_id: Option<&str>) -> Result<Vec<Connection>, NodeError> {
        let inner = self.inner.lock().await;
        let zone = match port_id {
            Some(id) => Some(programmed_slot(&inner, id)?),
            None => None,
        };
        let ports: BTreeMap<u32, &str> = inner
            .compiled
            .ports
            .iter()
            .map(|port| (port.slot, port.port_id.as_str()))
            .collect();
        let now = monotonic_ns();
        Ok(inner
            .datapath
            .connections()?
            .into_iter()
            .filter(|(key, _, _)| zone.is_none_or(|zone| key.zone == zone))
            .filter_map(|(key, entry, _)| {
                let port_id = ports.get(&key.zone)?;
                Some(Connection::new(port_id, &key, &entry, now))
            })
            .collect())
    }

    /// The SNAT bindings, with the ports that opened them.
    pub async fn nat_bindings(&self) -> Result<Vec<NatBinding>, NodeError> {
        let inner = self.inner.lock().await;
        let now = monotonic_ns();
        let seconds = |ns: u64| ns / 1_000_000_000;
        // The port of each (network slot, IPv4 address), looked up once per binding.
        let owners: BTreeMap<(u32, Ipv4Addr), &str> = inner
            .state
            .ports
            .values()
            .filter_map(|port| Some((inner.slots.network_slot(&port.network_id)?, port)))
            .flat_map(|(slot, port)| {
                port.fixed_ips
                    .iter()
                    .filter_map(move |fixed| match fixed.ip_address {
                        IpAddr::V4(address) => Some(((slot, address), port.id.as_str())),
                        IpAddr::V6(_) => None,
                    })
            })
            .collect();
        Ok(inner
            .datapath
            .snat_bindings()?
            .into_iter()
            .map(|(key, origin)| {
                let internal = Ipv4Addr::from(origin.internal);
                let port_id = owners
                    .get(&(origin.network_slot, internal))
                    .map(|id| (*id).to_owned());
                NatBinding {
                    protocol: key.proto,
                    internal: (internal, origin.internal_port),
                    external: (Ipv4Addr::from(key.external), key.external_port),
                    remote: (Ipv4Addr::from(key.remote), key.remote_port),
                    port_id,
                    idle_seconds: seconds(now.saturating_sub(origin.last_seen)),
                    expires_in_seconds: seconds(
                        (origin.last_seen + origin.lifetime).saturating_sub(now),
                    ),
                }
            })
            .collect())
    }

    /// What the datapath does with `probe`, from the compiled tables (no packet sent).
    pub async fn trace_packet(&self, probe: &Probe) -> Result<Trace, TraceError> {
        let inner = self.inner.lock().await;
        trace::trace(&inner.compiled, probe)
    }

    /// The compiled policy of a programmed port.
    pub async fn port_policy(&self, port_id: &str) -> Result<PortPolicyView, NodeError> {
        let inner = self.inner.lock().await;
        port_policy(&inner.state, &inner.compiled, port_id).ok_or_else(|| {
            NodeError::PortNotProgrammed {
                port_id: port_id.to_owned(),
            }
        })
    }

    /// The packet monitor, if this node has one.
    pub fn monitor(&self) -> Option<&Monitor> {
        self.monitor.as_ref()
    }

    /// Monitor events lost to a full ring buffer since start; `None` without a monitor.
    pub fn monitor_lost(&self) -> Result<Option<u64>, NodeError> {
        Ok(self.monitor.as_ref().map(Monitor::lost).transpose()?)
    }

    /// Whether `port_id` is programmed on this node now.
    pub async fn check_programmed(&self, port_id: &str) -> Result<(), NodeError> {
        programmed_slot(&*self.inner.lock().await, port_id).map(|_| ())
    }

    /// Forgets a port's tracked connections: their next packets are judged as new.
    pub async fn flush_connections(&self, port_id: &str) -> Result<u32, NodeError> {
        let mut inner = self.inner.lock().await;
        let zone = programmed_slot(&inner, port_id)?;
        Ok(inner.datapath.flush_connections(zone)?)
    }

    /// Removes connections idle past their timeout, and says so when new connections
    /// were dropped for a full table since the last sweep.
    pub async fn expire_connections(&self) -> Result<u32, NodeError> {
        let mut inner = self.inner.lock().await;
        let expired = inner.datapath.expire_connections(monotonic_ns())?;
        self.expired_connections
            .fetch_add(u64::from(expired), Ordering::Relaxed);
        let (counters, capacity, _) = inner.datapath.conntrack_counters()?;
        let full = counters[ct_stat::TABLE_FULL as usize];
        let reported = self.table_full_reported.swap(full, Ordering::Relaxed);
        if full > reported {
            warn!(
                dropped = full - reported,
                capacity, "conntrack table full: new connections were dropped (conntrack_entries)"
            );
        }
        Ok(expired)
    }

    pub async fn conntrack_stats(&self) -> Result<ConntrackStats, NodeError> {
        let inner = self.inner.lock().await;
        let (counters, confirmed_capacity, unconfirmed_capacity) =
            inner.datapath.conntrack_counters()?;
        let connections = inner.datapath.connections()?;
        let confirmed_entries = connections.iter().filter(|(_, _, c)| *c).count() as u64;
        let unconfirmed_entries = connections.len() as u64 - confirmed_entries;
        let counter = |index: u32| counters[index as usize];
        let expired = self.expired_connections.load(Ordering::Relaxed);
        Ok(ConntrackStats {
            confirmed_entries,
            unconfirmed_entries,
            confirmed_capacity: u64::from(confirmed_capacity),
            unconfirmed_capacity: u64::from(unconfirmed_capacity),
            new_inserts: counter(ct_stat::NEW_INSERTS),
            confirmed: counter(ct_stat::CONFIRMED),
            table_full_drops: counter(ct_stat::TABLE_FULL),
            deletes: counter(ct_stat::DELETES),
            // What entered CT_NEW and neither left it by confirmation, deletion or
            // expiry nor is still there was pushed out by the LRU.
            evictions: counter(ct_stat::NEW_INSERTS).saturating_sub(
                counter(ct_stat::CONFIRMED)
                    + counter(ct_stat::DELETES)
                    + expired
                    + unconfirmed_entries,
            ),
            related: counter(ct_stat::RELATED),
            expired,
        })
    }

    /// Forwards the programs' pending log records.
    pub async fn flush_datapath_logs(&self) {
        self.inner.lock().await.datapath.flush_logs();
    }

    pub async fn datapath_log_fd(&self) -> Option<std::os::fd::RawFd> {
        self.inner.lock().await.datapath.log_fd()
    }

    /// The devices of `state`'s local ports, from the link dump in `links` (dumped
    /// first if there is none, or a link event made it stale).
    fn local_devices(
        &self,
        state: &State,
        gateway_macs: &mut BTreeMap<IpAddr, GatewayMac>,
        links: &mut Option<BTreeMap<u32, links::LinkInfo>>,
    ) -> Devices {
        let names = state
            .ports
            .values()
            .filter(|port| port.binding.host == self.node_name)
            .map(|port| port.binding.interface_name.as_str())
            .filter(|name| !name.is_empty());
        // One link dump rather than a lookup per port: with thousands of devices each
        // lookup walks a hash chain of names, and a commit would pay for all of them.
        if self.links_stale.swap(false, Ordering::AcqRel)
            || !self.links_watched.load(Ordering::Acquire)
        {
            *links = None;
        }
        if links.is_none() {
            match links::devices() {
                Ok(all) => *links = Some(all),
                Err(e) => debug!(error = %e, "no link dump; no peer delivery"),
            }
        }
        let (interfaces, peers) = match links {
            Some(all) => {
                let by_name: HashMap<&str, (u32, &links::LinkInfo)> = all
                    .iter()
                    .map(|(ifindex, info)| (info.name.as_str(), (*ifindex, info)))
                    .collect();
                let mut interfaces = BTreeMap::new();
                let mut peers = BTreeSet::new();
                for name in names {
                    if let Some((ifindex, info)) = by_name.get(name) {
                        interfaces.insert(name.to_owned(), *ifindex);
                        if info.delivers_to_peer() {
                            peers.insert(*ifindex);
                        }
                    }
                }
                (interfaces, peers)
            }
            // Without an answer from rtnetlink every device still works through its own
            // transmit path.
            None => (links::resolve_interfaces(names), BTreeSet::new()),
        };
        let uplink = self
            .uplink
            .as_ref()
            .and_then(|config| self.uplink_view(config, state, gateway_macs));
        Devices {
            interfaces,
            peers,
            uplink,
        }
    }

    /// The uplink's ifindex and the MACs of the external gateways `state` needs, asking
    /// (one ARP or ND request each, `GATEWAY_ASK_TIMEOUT`) for those not known yet, at most
    /// every `GATEWAY_RETRY`, and again for known ones every `GATEWAY_REFRESH` (a MAC
    /// that is not confirmed is kept).
    fn uplink_view(
        &self,
        config: &UplinkConfig,
        state: &State,
        gateway_macs: &mut BTreeMap<IpAddr, GatewayMac>,
    ) -> Option<Uplink> {
        let ifindex =
            *links::resolve_interfaces([config.interface.as_str()]).get(&config.interface)?;
        let mut macs = BTreeMap::new();
        for neighbor in gateway_neighbors(state) {
            let known = gateway_macs.get(&neighbor.nexthop).copied();
            let due = match known {
                Some(GatewayMac {
                    mac: Some(_),
                    asked,
                }) => asked.elapsed() >= GATEWAY_REFRESH,
                Some(GatewayMac { mac: None, asked }) => asked.elapsed() >= GATEWAY_RETRY,
                None => true,
            };
            let mut mac = known.and_then(|known| known.mac);
            if due {
                match neighbor::resolve(
                    ifindex,
                    neighbor.source_mac.0,
                    neighbor.source,
                    neighbor.nexthop,
                    GATEWAY_ASK_TIMEOUT,
                ) {
                    Ok(Some(answer)) => {
                        let answer = MacAddr(answer);
                        if mac != Some(answer) {
                            info!(gateway = %neighbor.nexthop, mac = %answer, "external gateway resolved");
                        }
                        mac = Some(answer);
                    }
                    Ok(None) => {
                        debug!(gateway = %neighbor.nexthop, "external gateway did not answer")
                    }
                    Err(e) => {
                        warn!(gateway = %neighbor.nexthop, error = %e, "neighbour resolution on the uplink failed")
                    }
                }
                gateway_macs.insert(
                    neighbor.nexthop,
                    GatewayMac {
                        mac,
                        asked: Instant::now(),
                    },
                );
            }
            if let Some(mac) = mac {
                macs.insert(neighbor.nexthop, mac);
            }
        }
        Some(Uplink {
            ifindex,
            snat_port_min: config.snat_ports.0,
            snat_port_count: config.snat_ports.1,
            gateway_macs: macs,
        })
    }

    fn commit(
        &self,
        inner: &mut Inner,
        next: State,
        operation: Operation,
        changes: usize,
        named: &[ResourceRef],
    ) -> Result<Committed, NodeError> {
        let started = Instant::now();
        let devices = self.local_devices(&next, &mut inner.gateway_macs, &mut inner.links);
        let devices_done = Instant::now();
        let mut slots = inner.slots.clone();
        let mut compiled = compile(
            &next,
            &NodeView {
                node_name: &self.node_name,
                interfaces: &devices.interfaces,
                peer_devices: &devices.peers,
                uplink: devices.uplink.as_ref(),
            },
            &mut slots,
        );
        let gone = mark_gone(inner, &mut compiled);
        let compiled_done = Instant::now();
        if let (Some(config), Some(uplink)) = (&self.uplink, &devices.uplink) {
            if !inner.datapath.uplink_attached(uplink.ifindex) {
                // A veth (tests, containers) takes generic XDP: see `attach_uplink`.
                let veth = links::peer_devices().is_ok_and(|peers| peers.contains(&uplink.ifindex));
                inner
                    .datapath
                    .attach_uplink(&config.interface, uplink.ifindex, veth)?;
            }
        }
        for port in &compiled.ports {
            if !inner.devices.interfaces.contains_key(&port.interface_name) {
                if let Err(e) = links::disable_host_ipv6(&port.interface_name) {
                    warn!(interface = %port.interface_name, error = %e, "could not disable IPv6 on the port device");
                }
            }
        }
        let prepared = Instant::now();
        // Written where packets do not look yet and stored, side by side, then switched
        // to: a crash before the store commits restarts with the old state, one after it
        // with the new, and packets see one or the other, whole.
        let store = self.store.as_ref();
        let (staged, staged_at, (saved, store_time)) = std::thread::scope(|scope| {
            let saving = store.map(|store| {
                let (state, next, slots, old_slots) = (&inner.state, &next, &slots, &inner.slots);
                scope.spawn(move || {
                    let started = Instant::now();
                    let saved = save_changes(store, operation, state, next, slots, old_slots);
                    (saved, started.elapsed())
                })
            });
            let staged = inner.datapath.stage(&compiled);
            let staged_at = Instant::now();
            let saved = saving.map_or((Ok(()), Duration::ZERO), |saving| {
                saving
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            });
            (staged, staged_at, saved)
        });
        let staged = match (staged, saved) {
            (Ok(staged), Ok(())) => staged,
            (Ok(staged), Err(e)) => {
                drop(staged);
                self.roll_back(inner);
                return Err(e.into());
            }
            (Err(e), saved) => {
                if let (Some(store), Ok(())) = (store, saved) {
                    // Stored but not programmed: the store goes back to what is in force.
                    if let Err(undo) =
                        save_changes(store, operation, &next, &inner.state, &inner.slots, &slots)
                    {
                        warn!(error = %undo, "putting the store back failed too; a restart would program the refused state");
                    }
                }
                self.roll_back(inner);
                return Err(e.into());
            }
        };
        if let Err(e) = inner.datapath.switch(staged, &compiled) {
            self.roll_back(inner);
            return Err(e.into());
        }

        self.committed.notify_one();
        let (created, updated, deleted) = inner.state.count_differences(&next);
        let old = std::mem::replace(&mut inner.compiled, compiled);
        inner.state = next;
        inner.slots = slots;
        inner.devices = devices;
        inner.gone = gone;
        inner.generation += 1;
        let generation = inner.generation;
        if let Some(monitor) = &self.monitor {
            monitor.set_ports(
                inner
                    .compiled
                    .ports
                    .iter()
                    .map(|port| (port.slot, port.port_id.clone()))
                    .collect(),
            );
        }
        self.announce(&old.statuses, &inner.compiled.statuses);
        let _ = self.events.send(NodeEvent::Applied {
            generation,
            operation,
            changes: changes as u32,
        });
        info!(
            generation,
            operation = operation.as_str(),
            changes,
            ports = inner.compiled.ports.len(),
            // Where the time went: what operators and the benchmark read to tell the
            // compiler's share from the map writes'.
            devices_us = micros(devices_done - started),
            compile_us = micros(compiled_done - devices_done),
            prepare_us = micros(prepared - compiled_done),
            // The map writes and the store's transaction run side by side.
            datapath_us = micros(staged_at - prepared),
            store_us = micros(store_time),
            total_us = micros(started.elapsed()),
            "committed"
        );

        let statuses = named
            .iter()
            .filter_map(|reference| {
                inner
                    .compiled
                    .statuses
                    .get(reference)
                    .map(|status| (reference.clone(), status.clone()))
            })
            .collect();
        Ok(Committed {
            generation,
            statuses,
            created,
            updated,
            deleted,
        })
    }

    /// Takes the datapath back to the tables in force after a commit failed (what packets
    /// see is those already; this detaches the devices the failed commit attached).
    fn roll_back(&self, inner: &mut Inner) {
        if let Err(rollback) = inner.datapath.sync(&inner.compiled) {
            warn!(error = ?rollback, "rolling the datapath back failed too");
        }
    }

    /// Sends an event for every status that changed, and a DOWN "deleted" for every
    /// resource that is gone.
    fn announce(
        &self,
        old: &BTreeMap<ResourceRef, ResourceStatus>,
        new: &BTreeMap<ResourceRef, ResourceStatus>,
    ) {
        for (reference, status) in new {
            if old.get(reference) != Some(status) {
                let _ = self
                    .events
                    .send(NodeEvent::Status(reference.clone(), status.clone()));
            }
        }
        for (reference, status) in old {
            if !new.contains_key(reference) {
                let deleted = ResourceStatus {
                    status: StatusKind::Down,
                    reason: "deleted".to_owned(),
                    revision_number: status.revision_number,
                };
                let _ = self
                    .events
                    .send(NodeEvent::Status(reference.clone(), deleted));
            }
        }
    }
}

/// Stores the changes from `state` and `old_slots` to `next` and `slots`: the
/// resources an Apply or Sync changed (a restore or a device change has none), and the
/// slots handed out or released.
fn save_changes(
    store: &Store,
    operation: Operation,
    state: &State,
    next: &State,
    slots: &Slots,
    old_slots: &Slots,
) -> Result<(), StoreError> {
    let mut resources = match operation {
        Operation::Apply | Operation::Sync => Some(state.changes_to(next)),
        // What the store holds already, or the same state with other devices.
        Operation::Restore | Operation::Devices => None,
    }
    .into_iter()
    .flatten()
    .peekable();
    let slot_changes = slots.changes_since(old_slots);
    if resources.peek().is_none() && slot_changes.is_empty() {
        return Ok(());
    }
    store.save(resources, &slot_changes)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn programmed_slot(inner: &Inner, port_id: &str) -> Result<u32, NodeError> {
    inner
        .compiled
        .ports
        .iter()
        .find(|port| port.port_id == port_id)
        .map(|port| port.slot)
        .ok_or_else(|| NodeError::PortNotProgrammed {
            port_id: port_id.to_owned(),
        })
}

/// The clock of `bpf_ktime_get_coarse_ns` (at full resolution).
fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64
}

/// What [`Node::nat_bindings`] reports of one binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatBinding {
    pub protocol: u8,
    /// (address, port) as the VM sent it, as it leaves, and the remote end's.
    pub internal: (Ipv4Addr, u16),
    pub external: (Ipv4Addr, u16),
    pub remote: (Ipv4Addr, u16),
    pub port_id: Option<String>,
    pub idle_seconds: u64,
    pub expires_in_seconds: u64,
}

/// A port whose device disappeared while it was programmed (or had before, and has not
/// come back) is DOWN, not BUILD, which stays for a device yet to appear: the ports of
/// `compiled` that are so now. Sets their statuses.
fn mark_gone(inner: &Inner, compiled: &mut Compiled) -> BTreeSet<String> {
    let mut gone = BTreeSet::new();
    for (port_id, device) in &compiled.missing_devices {
        let was_here = inner.gone.contains(port_id)
            || inner
                .compiled
                .ports
                .iter()
                .any(|port| &port.port_id == port_id);
        if !was_here {
            continue;
        }
        let reference = ResourceRef {
            kind: ResourceKind::Port,
            id: port_id.clone(),
        };
        if let Some(status) = compiled.statuses.get_mut(&reference) {
            status.status = StatusKind::Down;
            status.reason = format!("interface {device} is gone; waiting for it to come back");
        }
        gone.insert(port_id.clone());
    }
    gone
}

/// A tracked connection as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub port_id: String,
    pub protocol: u8,
    /// Who sent the first packet, and to whom.
    pub source: (std::net::IpAddr, u16),
    pub destination: (std::net::IpAddr, u16),
    /// Opened by the VM (egress) or towards it.
    pub egress: bool,
    pub state: u8,
    pub replied: bool,
    pub idle_seconds: u64,
}

impl Connection {
    fn new(port_id: &str, key: &CtKey, entry: &CtEntry, now_ns: u64) -> Self {
        let address = |bytes: [u8; 16]| -> std::net::IpAddr {
            if key.family == 4 {
                std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
            } else {
                std::net::Ipv6Addr::from(bytes).into()
            }
        };
        let lo = (address(key.addr_lo), key.port_lo);
        let hi = (address(key.addr_hi), key.port_hi);
        let (source, destination) = if entry.flags & ct_flags::ORIG_FROM_LO != 0 {
            (lo, hi)
        } else {
            (hi, lo)
        };
        Self {
            port_id: port_id.to_owned(),
            protocol: key.protocol,
            source,
            destination,
            egress: entry.flags & ct_flags::ORIG_EGRESS != 0,
            state: entry.state,
            replied: entry.flags & ct_flags::REPLIED != 0,
            idle_seconds: now_ns.saturating_sub(entry.last_seen_ns) / 1_000_000_000,
        }
    }
}

/// Conntrack table fill and counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    pub confirmed_entries: u64,
    pub unconfirmed_entries: u64,
    pub confirmed_capacity: u64,
    pub unconfirmed_capacity: u64,
    pub new_inserts: u64,
    pub confirmed: u64,
    pub table_full_drops: u64,
    pub deletes: u64,
    pub evictions: u64,
    pub related: u64,
    pub expired: u64,
}
