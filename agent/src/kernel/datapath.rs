//! The loaded BPF object: its maps, its programs and their attachments to port devices.
//!
//! [`Datapath::sync`] makes the maps equal to a compiled [`DatapathTables`] by writing
//! only the difference, in an order that never lets a packet see a port before its
//! address and forwarding entries exist, nor forwarding entries outlive their port.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues,
    },
    programs::{
        tc::{SchedClassifierLinkId, TcAttachOptions},
        xdp::XdpLinkId,
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp,
        XdpMode,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use dataplane_abi::{
    ct_stat, global_names, map_names, program_names, timeout_secs, CtEntry, CtKey, DropReason,
    ExternalAddr, FdbEntry, FdbKey, FixedAddr4, FixedNat4, FloatingIp4, FloodSet, NeighKey4,
    NeighKey6, Neighbor, PortAddr4, PortAddr6, PortInfo, PortMacKey, PortStats, RemoteKey4,
    RemoteKey6, Route, RouteKey4, RouteKey6, RouterGateway, RouterGateway6, RouterIf, RuleKey,
    RuleStats, SnatKey4, SnatOrigin4, Verdict, ABI_VERSION,
};
use tracing::{debug, info, warn};

use super::{monitor::MonitorMaps, BPF_OBJECT};
use crate::core::compile::{Compiled, DatapathTables, ProgrammedPort};

/// Sizes of the maps that grow with the node's ports.
#[derive(Clone, Copy, Debug)]
pub struct MapLimits {
    /// Ports programmed on this node (PORTS, PORT_STATS, also the slot space).
    pub max_ports: u32,
    /// Exact (port, MAC, address) entries, each of PORT_IP4 and PORT_IP6.
    pub max_addresses: u32,
    /// (network, MAC) forwarding entries.
    pub max_fdb: u32,
    /// Security-group rules (`RULE_STATS`, the rule slot space).
    pub max_rules: u32,
    /// Entries of each of `SG_REMOTE4` and `SG_REMOTE6`.
    pub max_remote_prefixes: u32,
    /// `SG_RULES` entries (a rule takes one per port block of its range).
    pub max_rule_entries: u32,
    /// Confirmed connections (`CT`); a new one beyond it is dropped.
    pub conntrack_entries: u32,
    /// Unconfirmed connections (`CT_NEW`, LRU: the oldest is pushed out).
    pub conntrack_new_entries: u32,
}

impl MapLimits {
    /// Sizes for a node of `max_ports` ports, derived from typical per-port needs.
    pub fn for_node(max_ports: u32, conntrack_entries: u32) -> Self {
        Self {
            max_ports,
            max_addresses: max_ports * 16,
            max_fdb: max_ports * 4,
            max_rules: 131_072,
            // Every policy holds the addresses of its remote groups' members: 10,000
            // ports' policies over groups of 1,000 members need about 310,000.
            max_remote_prefixes: 524_288,
            max_rule_entries: 524_288,
            conntrack_entries,
            conntrack_new_entries: (conntrack_entries / 4).max(16),
        }
    }
}

/// How to load the object.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin the maps under `<root>/v<ABI_VERSION>/maps` (needs bpffs there).
    pub pin_root: Option<PathBuf>,
    /// Record every `port_ingress` decision in the `VERDICT` map (packet tests only:
    /// production leaves it off and the verifier removes the code).
    pub trace_verdicts: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the BPF object")]
    Load(#[from] aya::EbpfError),
    #[error("the BPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching to {interface} ({direction})")]
    Attach {
        interface: String,
        direction: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("pinning map {map} at {path}")]
    Pin {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("preparing pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `sizeof(struct __sk_buff)` and the offsets of the fields a test run may set.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK: usize = 8;
const SKB_IFINDEX: usize = 40;
/// `sizeof(struct xdp_md)` and the offsets of `data_end` and `ingress_ifindex`.
const XDP_CTX_LEN: usize = 24;
const XDP_DATA_END: usize = 4;
const XDP_INGRESS_IFINDEX: usize = 12;

/// What one BPF_PROG_TEST_RUN did.
#[derive(Clone, Debug)]
pub struct TestRunOutcome {
    /// The program's return code (`TC_ACT_*`, `XDP_*`).
    pub return_code: i32,
    /// Average time of one run, as the kernel measured it.
    pub per_run: std::time::Duration,
    pub verdict: Verdict,
    /// The frame as the (last) run left it.
    pub frame: Vec<u8>,
}

/// Per-port and unattributed counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Non-zero drop counts by reason.
    pub drops: Vec<(DropReason, u64)>,
}

/// The uplink NIC's programs.
struct UplinkAttachment {
    interface: String,
    ifindex: u32,
    xdp: XdpLinkId,
    ingress: SchedClassifierLinkId,
}

struct Attachment {
    interface: String,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

struct Maps {
    ports: HashMap<MapData, u32, PortInfo>,
    port_macs: HashMap<MapData, PortMacKey, u32>,
    port_ip4: HashMap<MapData, PortAddr4, u32>,
    port_net4: LpmTrie<MapData, PortAddr4, u32>,
    port_ip6: HashMap<MapData, PortAddr6, u32>,
    port_net6: LpmTrie<MapData, PortAddr6, u32>,
    fdb: HashMap<MapData, FdbKey, FdbEntry>,
    flood: HashMap<MapData, u32, FloodSet>,
    port_stats: PerCpuArray<MapData, PortStats>,
    noport_drops: PerCpuArray<MapData, u64>,
    sg_remote4: LpmTrie<MapData, RemoteKey4, u32>,
    sg_remote6: LpmTrie<MapData, RemoteKey6, u32>,
    sg_rules: LpmTrie<MapData, RuleKey, u32>,
    rule_stats: PerCpuArray<MapData, RuleStats>,
    ct: HashMap<MapData, CtKey, CtEntry>,
    ct_new: HashMap<MapData, CtKey, CtEntry>,
    ct_stats: PerCpuArray<MapData, u64>,
    verdict: PerCpuArray<MapData, Verdict>,
    router_ifs: HashMap<MapData, FdbKey, RouterIf>,
    routes4: LpmTrie<MapData, RouteKey4, Route>,
    routes6: LpmTrie<MapData, RouteKey6, Route>,
    neigh4: HashMap<MapData, NeighKey4, Neighbor>,
    neigh6: HashMap<MapData, NeighKey6, Neighbor>,
    router_gw: HashMap<MapData, u32, RouterGateway>,
    gateway_macs: HashMap<MapData, [u8; 6], u32>,
    ext_addrs4: HashMap<MapData, [u8; 4], ExternalAddr>,
    router_gw6: HashMap<MapData, u32, RouterGateway6>,
    ext_addrs6: HashMap<MapData, [u8; 16], ExternalAddr>,
    fips4: HashMap<MapData, [u8; 4], FloatingIp4>,
    fip_of4: HashMap<MapData, FixedAddr4, FixedNat4>,
    snat4_in: HashMap<MapData, SnatKey4, SnatOrigin4>,
    uplink_stats: PerCpuArray<MapData, PortStats>,
}

pub struct Datapath {
    // Programs live in `ebpf`; the maps were taken out of it into `maps`.
    ebpf: Ebpf,
    maps: Maps,
    /// What the maps hold now.
    programmed: DatapathTables,
    /// Slot of each programmed port and of each rule, to notice slots that change hands.
    port_slots: BTreeMap<String, u32>,
    rule_slots: BTreeMap<String, u32>,
    limits: MapLimits,
    attachments: StdHashMap<u32, Attachment>,
    uplink: Option<UplinkAttachment>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Where this agent pins its maps: `<root>/v<ABI_VERSION>/maps`. The version in the path
/// keeps agents with another map layout from ever opening these maps.
pub fn pin_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join(format!("v{ABI_VERSION}")).join("maps")
}

impl Datapath {
    /// Loads and verifies the programs, sizes and optionally pins the maps (for
    /// inspection with bpftool; a previous run's pins are replaced), and starts
    /// forwarding the programs' log records to `tracing`.
    pub fn load(limits: MapLimits, options: &LoadOptions) -> Result<Self, DatapathError> {
        let trace = u32::from(options.trace_verdicts);
        let mut ebpf = EbpfLoader::new()
            .override_global(global_names::TRACE_VERDICT, &trace, true)
            .map_max_entries(map_names::PORTS, limits.max_ports)
            .map_max_entries(map_names::PORT_STATS, limits.max_ports)
            .map_max_entries(map_names::FLOOD, limits.max_ports)
            .map_max_entries(map_names::PORT_IP4, limits.max_addresses)
            .map_max_entries(map_names::PORT_IP6, limits.max_addresses)
            .map_max_entries(map_names::FDB, limits.max_fdb)
            .map_max_entries(map_names::RULE_STATS, limits.max_rules)
            .map_max_entries(map_names::SG_REMOTE4, limits.max_remote_prefixes)
            .map_max_entries(map_names::SG_REMOTE6, limits.max_remote_prefixes)
            .map_max_entries(map_names::SG_RULES, limits.max_rule_entries)
            .map_max_entries(map_names::CT, limits.conntrack_entries)
            .map_max_entries(map_names::CT_NEW, limits.conntrack_new_entries)
            .load(BPF_OBJECT)?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                debug!(error = %e, "programs have no log map; nothing to forward");
                None
            }
        };

        for name in [
            program_names::PORT_INGRESS,
            program_names::PORT_EGRESS,
            program_names::UPLINK_INGRESS,
        ] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program {
                    program: name,
                    source,
                })?;
        }
        xdp(&mut ebpf, program_names::UPLINK_XDP)?
            .load()
            .map_err(|source| DatapathError::Program {
                program: program_names::UPLINK_XDP,
                source,
            })?;

        if let Some(root) = &options.pin_root {
            remove_other_versions(root)?;
        }
        let pins = options.pin_root.as_deref().map(pin_dir);
        if let Some(pins) = &pins {
            replace_dir(pins)?;
        }
        let pins = pins.as_deref();
        let maps = Maps {
            ports: take(&mut ebpf, map_names::PORTS, pins)?,
            port_macs: take(&mut ebpf, map_names::PORT_MACS, pins)?,
            port_ip4: take(&mut ebpf, map_names::PORT_IP4, pins)?,
            port_net4: take(&mut ebpf, map_names::PORT_NET4, pins)?,
            port_ip6: take(&mut ebpf, map_names::PORT_IP6, pins)?,
            port_net6: take(&mut ebpf, map_names::PORT_NET6, pins)?,
            fdb: take(&mut ebpf, map_names::FDB, pins)?,
            flood: take(&mut ebpf, map_names::FLOOD, pins)?,
            port_stats: take(&mut ebpf, map_names::PORT_STATS, pins)?,
            noport_drops: take(&mut ebpf, map_names::NOPORT_DROPS, pins)?,
            sg_remote4: take(&mut ebpf, map_names::SG_REMOTE4, pins)?,
            sg_remote6: take(&mut ebpf, map_names::SG_REMOTE6, pins)?,
            sg_rules: take(&mut ebpf, map_names::SG_RULES, pins)?,
            rule_stats: take(&mut ebpf, map_names::RULE_STATS, pins)?,
            ct: take(&mut ebpf, map_names::CT, pins)?,
            ct_new: take(&mut ebpf, map_names::CT_NEW, pins)?,
            ct_stats: take(&mut ebpf, map_names::CT_STATS, pins)?,
            verdict: take(&mut ebpf, map_names::VERDICT, pins)?,
            router_ifs: take(&mut ebpf, map_names::ROUTER_IFS, pins)?,
            routes4: take(&mut ebpf, map_names::ROUTES4, pins)?,
            routes6: take(&mut ebpf, map_names::ROUTES6, pins)?,
            neigh4: take(&mut ebpf, map_names::NEIGH4, pins)?,
            neigh6: take(&mut ebpf, map_names::NEIGH6, pins)?,
            router_gw: take(&mut ebpf, map_names::ROUTER_GW, pins)?,
            gateway_macs: take(&mut ebpf, map_names::GATEWAY_MACS, pins)?,
            ext_addrs4: take(&mut ebpf, map_names::EXT_ADDRS4, pins)?,
            router_gw6: take(&mut ebpf, map_names::ROUTER_GW6, pins)?,
            ext_addrs6: take(&mut ebpf, map_names::EXT_ADDRS6, pins)?,
            fips4: take(&mut ebpf, map_names::FIPS4, pins)?,
            fip_of4: take(&mut ebpf, map_names::FIP_OF4, pins)?,
            snat4_in: take(&mut ebpf, map_names::SNAT4_IN, pins)?,
            uplink_stats: take(&mut ebpf, map_names::UPLINK_STATS, pins)?,
        };
        info!(pins = ?pins, trace = options.trace_verdicts, "datapath loaded");
        Ok(Self {
            ebpf,
            maps,
            programmed: DatapathTables::default(),
            port_slots: BTreeMap::new(),
            rule_slots: BTreeMap::new(),
            limits,
            attachments: StdHashMap::new(),
            uplink: None,
            logger,
        })
    }

    /// Takes the packet monitor's maps out of the object, once: the monitor reads them
    /// on a task of its own, not under the node's lock. Not pinned: events are only for
    /// whoever subscribes while this agent runs.
    pub fn take_monitor_maps(&mut self) -> Result<MonitorMaps, DatapathError> {
        Ok(MonitorMaps {
            events: take(&mut self.ebpf, map_names::EVENTS, None)?,
            lost: take(&mut self.ebpf, map_names::EVENTS_LOST, None)?,
            config: take(&mut self.ebpf, map_names::MONITOR_CONFIG, None)?,
        })
    }

    /// Forwards pending log records of the programs to `tracing`.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    /// The log ring buffer's fd, to wait on, if the programs log at all.
    pub fn log_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.logger.as_ref().map(|logger| logger.as_raw_fd())
    }

    /// Makes maps and attachments match `compiled`. On error the datapath may hold part
    /// of it; the caller re-syncs the previous compilation to roll back.
    pub fn sync(&mut self, compiled: &Compiled) -> Result<(), DatapathError> {
        let old = std::mem::take(&mut self.programmed);
        // Entries a new port's frames are checked against go in first, then the port;
        // on the way out the port goes first. Counters of a slot that changes hands
        // start from zero.
        let port_slots: BTreeMap<String, u32> = compiled
            .ports
            .iter()
            .map(|port| (port.port_id.clone(), port.slot))
            .collect();
        let reused_ports = changed_hands(&self.port_slots, &port_slots);
        let reused_rules = changed_hands(&self.rule_slots, &compiled.rules);
        let result = self.write(
            &old,
            &compiled.tables,
            &reused_ports,
            &reused_rules,
            &compiled.ports,
        );
        // Whatever happened, remember the tables as wanted: a failed sync is followed by
        // a sync back to the previous tables, which then rewrites every difference.
        self.programmed = compiled.tables.clone();
        self.port_slots = port_slots;
        self.rule_slots = compiled.rules.clone();
        result
    }

    fn write(
        &mut self,
        old: &DatapathTables,
        new: &DatapathTables,
        reused_ports: &BTreeSet<u32>,
        reused_rules: &BTreeSet<u32>,
        ports: &[ProgrammedPort],
    ) -> Result<(), DatapathError> {
        let m = &mut self.maps;
        for slot in reused_ports {
            zero_slot(&mut m.port_stats, *slot, map_names::PORT_STATS)?;
        }
        for slot in reused_rules {
            zero_slot(&mut m.rule_stats, *slot, map_names::RULE_STATS)?;
        }
        // Rules before the address classes that lead to them, both before the ports.
        upsert_trie_map(
            &mut m.sg_rules,
            &old.sg_rules,
            &new.sg_rules,
            map_names::SG_RULES,
        )?;
        upsert_trie_map(
            &mut m.sg_remote4,
            &old.sg_remote4,
            &new.sg_remote4,
            map_names::SG_REMOTE4,
        )?;
        upsert_trie_map(
            &mut m.sg_remote6,
            &old.sg_remote6,
            &new.sg_remote6,
            map_names::SG_REMOTE6,
        )?;
        upsert_set(
            &mut m.port_macs,
            &old.port_macs,
            &new.port_macs,
            map_names::PORT_MACS,
        )?;
        upsert_set(
            &mut m.port_ip4,
            &old.port_ip4,
            &new.port_ip4,
            map_names::PORT_IP4,
        )?;
        upsert_set(
            &mut m.port_ip6,
            &old.port_ip6,
            &new.port_ip6,
            map_names::PORT_IP6,
        )?;
        upsert_trie(
            &mut m.port_net4,
            &old.port_net4,
            &new.port_net4,
            map_names::PORT_NET4,
        )?;
        upsert_trie(
            &mut m.port_net6,
            &old.port_net6,
            &new.port_net6,
            map_names::PORT_NET6,
        )?;
        upsert_map(&mut m.fdb, &old.fdb, &new.fdb, map_names::FDB)?;
        upsert_map(&mut m.flood, &old.flood, &new.flood, map_names::FLOOD)?;
        // Routes and neighbours before the interfaces that lead to them; translations
        // before the external routes and addresses that lead to them.
        upsert_map(&mut m.neigh4, &old.neigh4, &new.neigh4, map_names::NEIGH4)?;
        upsert_map(&mut m.neigh6, &old.neigh6, &new.neigh6, map_names::NEIGH6)?;
        upsert_map(&mut m.fips4, &old.fips4, &new.fips4, map_names::FIPS4)?;
        upsert_map(
            &mut m.fip_of4,
            &old.fip_of4,
            &new.fip_of4,
            map_names::FIP_OF4,
        )?;
        upsert_map(
            &mut m.router_gw,
            &old.router_gw,
            &new.router_gw,
            map_names::ROUTER_GW,
        )?;
        upsert_map(
            &mut m.ext_addrs4,
            &old.ext_addrs4,
            &new.ext_addrs4,
            map_names::EXT_ADDRS4,
        )?;
        upsert_map(
            &mut m.router_gw6,
            &old.router_gw6,
            &new.router_gw6,
            map_names::ROUTER_GW6,
        )?;
        upsert_map(
            &mut m.ext_addrs6,
            &old.ext_addrs6,
            &new.ext_addrs6,
            map_names::EXT_ADDRS6,
        )?;
        upsert_trie_map(
            &mut m.routes4,
            &old.routes4,
            &new.routes4,
            map_names::ROUTES4,
        )?;
        upsert_trie_map(
            &mut m.routes6,
            &old.routes6,
            &new.routes6,
            map_names::ROUTES6,
        )?;
        upsert_map(
            &mut m.router_ifs,
            &old.router_ifs,
            &new.router_ifs,
            map_names::ROUTER_IFS,
        )?;
        upsert_map(
            &mut m.gateway_macs,
            &old.gateway_macs,
            &new.gateway_macs,
            map_names::GATEWAY_MACS,
        )?;
        upsert_map(&mut m.ports, &old.ports, &new.ports, map_names::PORTS)?;

        self.attach_new(ports)?;

        let m = &mut self.maps;
        remove_map(&mut m.ports, &old.ports, &new.ports, map_names::PORTS)?;
        remove_map(
            &mut m.gateway_macs,
            &old.gateway_macs,
            &new.gateway_macs,
            map_names::GATEWAY_MACS,
        )?;
        remove_map(
            &mut m.router_ifs,
            &old.router_ifs,
            &new.router_ifs,
            map_names::ROUTER_IFS,
        )?;
        remove_trie_map(
            &mut m.routes6,
            &old.routes6,
            &new.routes6,
            map_names::ROUTES6,
        )?;
        remove_trie_map(
            &mut m.routes4,
            &old.routes4,
            &new.routes4,
            map_names::ROUTES4,
        )?;
        remove_map(
            &mut m.ext_addrs6,
            &old.ext_addrs6,
            &new.ext_addrs6,
            map_names::EXT_ADDRS6,
        )?;
        remove_map(
            &mut m.router_gw6,
            &old.router_gw6,
            &new.router_gw6,
            map_names::ROUTER_GW6,
        )?;
        remove_map(
            &mut m.ext_addrs4,
            &old.ext_addrs4,
            &new.ext_addrs4,
            map_names::EXT_ADDRS4,
        )?;
        remove_map(
            &mut m.router_gw,
            &old.router_gw,
            &new.router_gw,
            map_names::ROUTER_GW,
        )?;
        remove_map(
            &mut m.fip_of4,
            &old.fip_of4,
            &new.fip_of4,
            map_names::FIP_OF4,
        )?;
        remove_map(&mut m.fips4, &old.fips4, &new.fips4, map_names::FIPS4)?;
        remove_map(&mut m.neigh6, &old.neigh6, &new.neigh6, map_names::NEIGH6)?;
        remove_map(&mut m.neigh4, &old.neigh4, &new.neigh4, map_names::NEIGH4)?;
        remove_map(&mut m.flood, &old.flood, &new.flood, map_names::FLOOD)?;
        remove_map(&mut m.fdb, &old.fdb, &new.fdb, map_names::FDB)?;
        remove_trie(
            &mut m.port_net6,
            &old.port_net6,
            &new.port_net6,
            map_names::PORT_NET6,
        )?;
        remove_trie(
            &mut m.port_net4,
            &old.port_net4,
            &new.port_net4,
            map_names::PORT_NET4,
        )?;
        remove_set(
            &mut m.port_ip6,
            &old.port_ip6,
            &new.port_ip6,
            map_names::PORT_IP6,
        )?;
        remove_set(
            &mut m.port_ip4,
            &old.port_ip4,
            &new.port_ip4,
            map_names::PORT_IP4,
        )?;
        remove_set(
            &mut m.port_macs,
            &old.port_macs,
            &new.port_macs,
            map_names::PORT_MACS,
        )?;
        remove_trie_map(
            &mut m.sg_remote6,
            &old.sg_remote6,
            &new.sg_remote6,
            map_names::SG_REMOTE6,
        )?;
        remove_trie_map(
            &mut m.sg_remote4,
            &old.sg_remote4,
            &new.sg_remote4,
            map_names::SG_REMOTE4,
        )?;
        remove_trie_map(
            &mut m.sg_rules,
            &old.sg_rules,
            &new.sg_rules,
            map_names::SG_RULES,
        )?;
        Ok(())
    }

    /// Attaches both programs to every port device not yet attached, and detaches from
    /// devices that no longer carry a programmed port (or were replaced by a new device
    /// with the same name).
    fn attach_new(&mut self, ports: &[ProgrammedPort]) -> Result<(), DatapathError> {
        let wanted: StdHashMap<u32, &ProgrammedPort> =
            ports.iter().map(|port| (port.ifindex, port)).collect();
        let stale: Vec<u32> = self
            .attachments
            .keys()
            .filter(|ifindex| !wanted.contains_key(ifindex))
            .copied()
            .collect();
        for ifindex in stale {
            if let Some(attachment) = self.attachments.remove(&ifindex) {
                self.detach(attachment);
            }
        }
        for (ifindex, port) in wanted {
            if self.attachments.contains_key(&ifindex) {
                continue;
            }
            let ingress = self.attach(program_names::PORT_INGRESS, port, TcAttachType::Ingress)?;
            let egress = match self.attach(program_names::PORT_EGRESS, port, TcAttachType::Egress) {
                Ok(egress) => egress,
                Err(e) => {
                    self.detach_one(program_names::PORT_INGRESS, ingress, &port.interface_name);
                    return Err(e);
                }
            };
            info!(interface = %port.interface_name, ifindex, port = %port.port_id, "attached");
            self.attachments.insert(
                ifindex,
                Attachment {
                    interface: port.interface_name.clone(),
                    ingress,
                    egress,
                },
            );
        }
        Ok(())
    }

    fn attach(
        &mut self,
        program: &'static str,
        port: &ProgrammedPort,
        direction: TcAttachType,
    ) -> Result<SchedClassifierLinkId, DatapathError> {
        classifier(&mut self.ebpf, program)?
            .attach_with_options(
                &port.interface_name,
                direction,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| DatapathError::Attach {
                interface: port.interface_name.clone(),
                direction: match direction {
                    TcAttachType::Ingress => "ingress",
                    _ => "egress",
                },
                source,
            })
    }

    fn detach(&mut self, attachment: Attachment) {
        self.detach_one(
            program_names::PORT_INGRESS,
            attachment.ingress,
            &attachment.interface,
        );
        self.detach_one(
            program_names::PORT_EGRESS,
            attachment.egress,
            &attachment.interface,
        );
        info!(interface = %attachment.interface, "detached");
    }

    fn detach_one(&mut self, program: &'static str, link: SchedClassifierLinkId, interface: &str) {
        // A device that is gone took its tcx links with it: nothing to undo then.
        if let Err(e) = classifier(&mut self.ebpf, program).and_then(|prog| {
            prog.detach(link)
                .map_err(|source| DatapathError::Program { program, source })
        }) {
            debug!(interface, error = %e, "detach");
        }
    }

    /// Attaches `uplink_xdp` and `uplink_ingress` to the uplink NIC `interface`
    /// (replacing an attachment to another device, or to one that was recreated).
    /// XDP in the driver where it can, else generic; always generic with `generic`:
    /// a veth's driver XDP can only send back (`XDP_TX`) to a peer that runs XDP too.
    pub fn attach_uplink(
        &mut self,
        interface: &str,
        ifindex: u32,
        generic: bool,
    ) -> Result<(), DatapathError> {
        if self.uplink_attached(ifindex) {
            return Ok(());
        }
        self.detach_uplink();
        let attach_err = |direction| {
            move |source| DatapathError::Attach {
                interface: interface.to_owned(),
                direction,
                source,
            }
        };
        let prog = xdp(&mut self.ebpf, program_names::UPLINK_XDP)?;
        let attached = if generic {
            prog.attach(interface, XdpMode::Skb)
        } else {
            prog.attach(interface, XdpMode::Driver).or_else(|e| {
                debug!(interface, error = %e, "no driver XDP; generic");
                prog.attach(interface, XdpMode::Skb)
            })
        };
        let xdp_link = attached.map_err(attach_err("xdp"))?;
        let ingress = classifier(&mut self.ebpf, program_names::UPLINK_INGRESS)?
            .attach_with_options(
                interface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            );
        let ingress = match ingress {
            Ok(link) => link,
            Err(source) => {
                let _ = xdp(&mut self.ebpf, program_names::UPLINK_XDP)
                    .map(|prog| prog.detach(xdp_link));
                return Err(attach_err("ingress")(source));
            }
        };
        info!(interface, "uplink attached");
        self.uplink = Some(UplinkAttachment {
            interface: interface.to_owned(),
            ifindex,
            xdp: xdp_link,
            ingress,
        });
        Ok(())
    }

    /// Whether the uplink programs are on device `ifindex`.
    pub fn uplink_attached(&self, ifindex: u32) -> bool {
        self.uplink.as_ref().is_some_and(|u| u.ifindex == ifindex)
    }

    /// Takes the programs off the uplink.
    pub fn detach_uplink(&mut self) {
        let Some(uplink) = self.uplink.take() else {
            return;
        };
        if let Ok(prog) = xdp(&mut self.ebpf, program_names::UPLINK_XDP) {
            if let Err(e) = prog.detach(uplink.xdp) {
                debug!(interface = %uplink.interface, error = %e, "xdp detach");
            }
        }
        self.detach_one(
            program_names::UPLINK_INGRESS,
            uplink.ingress,
            &uplink.interface,
        );
    }

    /// Counters of the uplink: rx from outside, tx to it, drops by reason.
    pub fn uplink_counters(&self) -> Result<Counters, DatapathError> {
        summed(&self.maps.uplink_stats, 0)
    }

    /// Compares every map the agent writes with what it last programmed there and puts
    /// back what differs (an entry changed, added or removed behind its back): the
    /// maps that had any, with how many entries were wrong.
    pub fn repair_drift(&mut self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        let (m, t) = (&mut self.maps, &self.programmed);
        macro_rules! repair {
            ($field:ident, $name:ident, hash) => {
                (
                    map_names::$name,
                    repair_hash(&mut m.$field, &t.$field, map_names::$name)?,
                )
            };
            ($field:ident, $name:ident, set) => {
                (
                    map_names::$name,
                    repair_hash(&mut m.$field, &as_set_map(&t.$field), map_names::$name)?,
                )
            };
            ($field:ident, $name:ident, trie) => {
                (
                    map_names::$name,
                    repair_trie(&mut m.$field, &t.$field, map_names::$name)?,
                )
            };
            ($field:ident, $name:ident, trie_set) => {
                (
                    map_names::$name,
                    repair_trie(&mut m.$field, &as_set_map(&t.$field), map_names::$name)?,
                )
            };
        }
        let drift = written_maps!(repair);
        Ok(drift.into_iter().filter(|(_, wrong)| *wrong > 0).collect())
    }

    /// The maps the agent writes: (name, entries, room for how many), the entries as
    /// last programmed.
    pub fn map_fill(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError> {
        fn room<K: aya::Pod, V>(
            map: &impl IterableMap<K, V>,
            name: &'static str,
        ) -> Result<u64, DatapathError> {
            Ok(u64::from(
                map.map().info().map_err(map_err(name))?.max_entries(),
            ))
        }
        let (m, t) = (&self.maps, &self.programmed);
        macro_rules! fill {
            ($field:ident, $name:ident, $kind:ident) => {
                (
                    map_names::$name,
                    t.$field.len() as u64,
                    room(&m.$field, map_names::$name)?,
                )
            };
        }
        Ok(written_maps!(fill).into())
    }

    /// How many SNAT bindings there are, and room for how many.
    pub fn snat_fill(&self) -> Result<(u64, u64), DatapathError> {
        let capacity = self
            .maps
            .snat4_in
            .map()
            .info()
            .map_err(map_err(map_names::SNAT4_IN))?
            .max_entries();
        Ok((self.snat_bindings()?.len() as u64, u64::from(capacity)))
    }

    /// SNAT bindings: (key as replies see it, where they go).
    pub fn snat_bindings(&self) -> Result<Vec<(SnatKey4, SnatOrigin4)>, DatapathError> {
        let mut all = Vec::new();
        for item in self.maps.snat4_in.iter() {
            match item {
                Ok(binding) => all.push(binding),
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(DatapathError::Map {
                        map: map_names::SNAT4_IN,
                        source,
                    })
                }
            }
        }
        Ok(all)
    }

    /// Runs `frame` through a loaded program with BPF_PROG_TEST_RUN, as if it had
    /// arrived on (ingress, XDP) or were leaving by (egress) device `ifindex`, `repeat`
    /// times (`mark`: the skb's, for tc programs).
    /// The device must exist in the calling thread's network namespace. For packet tests
    /// and benchmarks; the verdict is all zero unless loaded with `trace_verdicts`.
    pub fn test_run(
        &mut self,
        program: &'static str,
        ifindex: u32,
        mark: u32,
        frame: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, DatapathError> {
        let verdict_err = map_err(map_names::VERDICT);
        // Cleared first, so the one CPU entry the run fills is the only non-empty one.
        self.maps
            .verdict
            .set(0, per_cpu(Verdict::default(), map_names::VERDICT)?, 0)
            .map_err(&verdict_err)?;

        let xdp_program = matches!(
            self.ebpf.program(program),
            Some(aya::programs::Program::Xdp(_))
        );
        let ctx = if xdp_program {
            let mut ctx = vec![0u8; XDP_CTX_LEN];
            // `data_end` is the linear part's end: all of the frame.
            ctx[XDP_DATA_END..XDP_DATA_END + 4]
                .copy_from_slice(&(frame.len() as u32).to_ne_bytes());
            ctx[XDP_INGRESS_IFINDEX..XDP_INGRESS_IFINDEX + 4]
                .copy_from_slice(&ifindex.to_ne_bytes());
            ctx
        } else {
            let mut ctx = vec![0u8; SKB_CTX_LEN];
            ctx[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
            ctx[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
            ctx
        };
        // Room for a frame the program grows.
        let mut out = vec![0u8; frame.len() + 256];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        };
        // Programs only benchmarks run (the no-op floors) are loaded on first use.
        macro_rules! run_loaded {
            ($prog:expr) => {{
                let prog = $prog;
                if prog.fd().is_err() {
                    prog.load()
                        .map_err(|source| DatapathError::Program { program, source })?;
                }
                prog.test_run(options)
            }};
        }
        let result = if xdp_program {
            run_loaded!(xdp(&mut self.ebpf, program)?)
        } else {
            run_loaded!(classifier(&mut self.ebpf, program)?)
        }
        .map_err(|source| DatapathError::Program { program, source })?;

        let verdict = self
            .maps
            .verdict
            .get(&0, 0)
            .map_err(&verdict_err)?
            .iter()
            .copied()
            .find(|verdict| verdict.action != 0)
            .unwrap_or_default();
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutcome {
            return_code: result.return_value as i32,
            per_run: result.duration,
            verdict,
            frame: out,
        })
    }

    /// Counters of the port in `slot`, summed over CPUs.
    pub fn port_counters(&self, slot: u32) -> Result<Counters, DatapathError> {
        summed(&self.maps.port_stats, slot)
    }

    /// Packets and bytes the rule in `slot` allowed, summed over CPUs.
    pub fn rule_counters(&self, slot: u32) -> Result<RuleStats, DatapathError> {
        let per_cpu = self
            .maps
            .rule_stats
            .get(&slot, 0)
            .map_err(map_err(map_names::RULE_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(RuleStats::default(), |total, cpu| RuleStats {
                packets: total.packets + cpu.packets,
                bytes: total.bytes + cpu.bytes,
            }))
    }

    /// Every tracked connection: (key, entry, confirmed).
    pub fn connections(&self) -> Result<Vec<(CtKey, CtEntry, bool)>, DatapathError> {
        let mut all = Vec::new();
        for (map, confirmed, name) in [
            (&self.maps.ct, true, map_names::CT),
            (&self.maps.ct_new, false, map_names::CT_NEW),
        ] {
            for item in map.iter() {
                // An entry removed between the key walk and its read is simply gone.
                match item {
                    Ok((key, entry)) => all.push((key, entry, confirmed)),
                    Err(MapError::KeyNotFound) => {}
                    Err(source) => return Err(DatapathError::Map { map: name, source }),
                }
            }
        }
        Ok(all)
    }

    /// Forgets the connections in `zone` (a port slot); returns how many.
    pub fn flush_connections(&mut self, zone: u32) -> Result<u32, DatapathError> {
        self.remove_connections(|key, _, _| key.zone == zone)
    }

    /// Removes connections idle past their timeout (`now_ns` on the clock of
    /// `bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC); returns how many.
    pub fn expire_connections(&mut self, now_ns: u64) -> Result<u32, DatapathError> {
        self.remove_connections(|key, entry, confirmed| {
            let timeout = timeout_secs(key.protocol, entry.state, confirmed) * 1_000_000_000;
            now_ns.saturating_sub(entry.last_seen_ns) > timeout
        })
    }

    fn remove_connections(
        &mut self,
        doomed: impl Fn(&CtKey, &CtEntry, bool) -> bool,
    ) -> Result<u32, DatapathError> {
        let mut removed = 0;
        for (key, entry, confirmed) in self.connections()? {
            if !doomed(&key, &entry, confirmed) {
                continue;
            }
            let (map, name) = if confirmed {
                (&mut self.maps.ct, map_names::CT)
            } else {
                (&mut self.maps.ct_new, map_names::CT_NEW)
            };
            match map.remove(&key) {
                Ok(()) => removed += 1,
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(DatapathError::Map { map: name, source }),
            }
        }
        Ok(removed)
    }

    /// The datapath's conntrack counters (indexed by `ct_stat`), summed over CPUs, and
    /// the table sizes: (counters, CT capacity, CT_NEW capacity).
    pub fn conntrack_counters(
        &self,
    ) -> Result<([u64; ct_stat::COUNT as usize], u32, u32), DatapathError> {
        let mut counters = [0u64; ct_stat::COUNT as usize];
        for (index, total) in counters.iter_mut().enumerate() {
            *total = self
                .maps
                .ct_stats
                .get(&(index as u32), 0)
                .map_err(map_err(map_names::CT_STATS))?
                .iter()
                .sum();
        }
        Ok((
            counters,
            self.limits.conntrack_entries,
            self.limits.conntrack_new_entries,
        ))
    }

    /// Drops no port could be charged with, by reason.
    pub fn unattributed_drops(&self) -> Result<Vec<(DropReason, u64)>, DatapathError> {
        let mut totals = [0u64; DropReason::COUNT];
        for reason in DropReason::ALL {
            let per_cpu = self
                .maps
                .noport_drops
                .get(&(reason as u32), 0)
                .map_err(|source| DatapathError::Map {
                    map: map_names::NOPORT_DROPS,
                    source,
                })?;
            totals[reason as usize] = per_cpu.iter().sum();
        }
        Ok(nonzero_drops(|reason| totals[reason as usize]))
    }
}

/// The per-CPU `PortStats` at `index` of `map` (`PORT_STATS` or `UPLINK_STATS`), summed.
fn summed(map: &PerCpuArray<MapData, PortStats>, index: u32) -> Result<Counters, DatapathError> {
    let per_cpu = map.get(&index, 0).map_err(map_err(map_names::PORT_STATS))?;
    let mut drops = [0u64; DropReason::COUNT];
    let mut counters = Counters::default();
    for stats in per_cpu.iter() {
        counters.rx_packets += stats.rx_packets;
        counters.rx_bytes += stats.rx_bytes;
        counters.tx_packets += stats.tx_packets;
        counters.tx_bytes += stats.tx_bytes;
        for (total, count) in drops.iter_mut().zip(stats.drops) {
            *total += count;
        }
    }
    counters.drops = nonzero_drops(|reason| drops[reason as usize]);
    Ok(counters)
}

fn nonzero_drops(count: impl Fn(DropReason) -> u64) -> Vec<(DropReason, u64)> {
    DropReason::ALL
        .into_iter()
        .map(|reason| (reason, count(reason)))
        .filter(|(_, count)| *count > 0)
        .collect()
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    program(ebpf, name)
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DatapathError> {
    program(ebpf, name)
}

/// The program `name` of the object, as its type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DatapathError::Program {
            program: name,
            source,
        })
}

/// Takes a map out of the object as its typed handle, pinned under `pins` if given.
fn take<T>(ebpf: &mut Ebpf, name: &'static str, pins: Option<&Path>) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })?;
    if let Some(pins) = pins {
        let path = pins.join(name);
        map.pin(&path).map_err(|source| DatapathError::Pin {
            map: name,
            path,
            source,
        })?;
    }
    T::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
}

/// Empties (or creates) the pin directory: pins from an earlier run of this agent are
/// replaced by this run's maps.
/// Removes the pins of agents with another map layout (`<root>/v<N>`, N not
/// [`ABI_VERSION`]): no agent of this layout reads them, and the state directory's lock
/// means their agent is not running.
fn remove_other_versions(root: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::PinDir {
        path: root.to_path_buf(),
        source,
    };
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    let current = format!("v{ABI_VERSION}");
    for entry in entries {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let versioned = name
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if versioned && name != current {
            std::fs::remove_dir_all(entry.path()).map_err(err)?;
            info!(pins = %entry.path().display(), "removed the pins of another map layout");
        }
    }
    Ok(())
}

fn replace_dir(dir: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::PinDir {
        path: dir.to_path_buf(),
        source,
    };
    if dir.exists() {
        for entry in std::fs::read_dir(dir).map_err(err)? {
            std::fs::remove_file(entry.map_err(err)?.path()).map_err(err)?;
        }
    }
    std::fs::create_dir_all(dir).map_err(err)
}

fn zero_slot<T: aya::Pod + Default>(
    stats: &mut PerCpuArray<MapData, T>,
    slot: u32,
    map: &'static str,
) -> Result<(), DatapathError> {
    let zero = per_cpu(T::default(), map)?;
    stats.set(slot, zero, 0).map_err(map_err(map))
}

/// Slots now held by another id than before (or newly taken).
fn changed_hands(old: &BTreeMap<String, u32>, new: &BTreeMap<String, u32>) -> BTreeSet<u32> {
    new.iter()
        .filter(|(id, slot)| old.get(*id) != Some(slot))
        .map(|(_, slot)| *slot)
        .collect()
}

/// `value` on every possible CPU.
fn per_cpu<T: aya::Pod>(value: T, map: &'static str) -> Result<PerCpuValues<T>, DatapathError> {
    let cpus = nr_cpus().map_err(|(_, source)| DatapathError::Map {
        map,
        source: MapError::IoError(source),
    })?;
    PerCpuValues::try_from(vec![value; cpus]).map_err(|source| DatapathError::Map {
        map,
        source: MapError::IoError(source),
    })
}

type MapResult = Result<(), DatapathError>;

fn map_err(map: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

fn upsert_map<K, V>(
    map: &mut HashMap<MapData, K, V>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    name: &'static str,
) -> MapResult
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    for (key, value) in new {
        if old.get(key) != Some(value) {
            map.insert(key, value, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

fn remove_map<K, V>(
    map: &mut HashMap<MapData, K, V>,
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    name: &'static str,
) -> MapResult
where
    K: aya::Pod + Ord,
    V: aya::Pod,
{
    for key in old.keys().filter(|key| !new.contains_key(key)) {
        remove_present(map.remove(key), name)?;
    }
    Ok(())
}

fn upsert_set<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u32>,
    old: &BTreeSet<K>,
    new: &BTreeSet<K>,
    name: &'static str,
) -> MapResult {
    for key in new.difference(old) {
        map.insert(key, 1, 0).map_err(map_err(name))?;
    }
    Ok(())
}

fn remove_set<K: aya::Pod + Ord>(
    map: &mut HashMap<MapData, K, u32>,
    old: &BTreeSet<K>,
    new: &BTreeSet<K>,
    name: &'static str,
) -> MapResult {
    for key in old.difference(new) {
        remove_present(map.remove(key), name)?;
    }
    Ok(())
}

fn upsert_trie<K: aya::Pod + Ord>(
    trie: &mut LpmTrie<MapData, K, u32>,
    old: &BTreeSet<(u32, K)>,
    new: &BTreeSet<(u32, K)>,
    name: &'static str,
) -> MapResult {
    for (prefix_len, data) in new.difference(old) {
        trie.insert(&LpmKey::new(*prefix_len, *data), 1, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

fn remove_trie<K: aya::Pod + Ord>(
    trie: &mut LpmTrie<MapData, K, u32>,
    old: &BTreeSet<(u32, K)>,
    new: &BTreeSet<(u32, K)>,
    name: &'static str,
) -> MapResult {
    for (prefix_len, data) in old.difference(new) {
        remove_present(trie.remove(&LpmKey::new(*prefix_len, *data)), name)?;
    }
    Ok(())
}

fn upsert_trie_map<K: aya::Pod + Ord, V: aya::Pod + PartialEq>(
    trie: &mut LpmTrie<MapData, K, V>,
    old: &BTreeMap<(u32, K), V>,
    new: &BTreeMap<(u32, K), V>,
    name: &'static str,
) -> MapResult {
    for ((prefix_len, data), value) in new {
        if old.get(&(*prefix_len, *data)) != Some(value) {
            trie.insert(&LpmKey::new(*prefix_len, *data), *value, 0)
                .map_err(map_err(name))?;
        }
    }
    Ok(())
}

fn remove_trie_map<K: aya::Pod + Ord, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, V>,
    old: &BTreeMap<(u32, K), V>,
    new: &BTreeMap<(u32, K), V>,
    name: &'static str,
) -> MapResult {
    for (prefix_len, data) in old.keys().filter(|key| !new.contains_key(key)) {
        remove_present(trie.remove(&LpmKey::new(*prefix_len, *data)), name)?;
    }
    Ok(())
}

/// Every map the agent writes from `DatapathTables`, once: `$each!(field, NAME, kind)`
/// for each, the kind saying how the table is kept (`hash` and `trie` maps, `set` and
/// `trie_set` key sets written with value 1). The per-CPU counters, conntrack and SNAT
/// maps are the programs' own.
macro_rules! written_maps {
    ($each:ident) => {
        [
            $each!(ports, PORTS, hash),
            $each!(port_macs, PORT_MACS, set),
            $each!(port_ip4, PORT_IP4, set),
            $each!(port_net4, PORT_NET4, trie_set),
            $each!(port_ip6, PORT_IP6, set),
            $each!(port_net6, PORT_NET6, trie_set),
            $each!(fdb, FDB, hash),
            $each!(flood, FLOOD, hash),
            $each!(sg_remote4, SG_REMOTE4, trie),
            $each!(sg_remote6, SG_REMOTE6, trie),
            $each!(sg_rules, SG_RULES, trie),
            $each!(router_ifs, ROUTER_IFS, hash),
            $each!(routes4, ROUTES4, trie),
            $each!(routes6, ROUTES6, trie),
            $each!(neigh4, NEIGH4, hash),
            $each!(neigh6, NEIGH6, hash),
            $each!(router_gw, ROUTER_GW, hash),
            $each!(router_gw6, ROUTER_GW6, hash),
            $each!(gateway_macs, GATEWAY_MACS, hash),
            $each!(ext_addrs4, EXT_ADDRS4, hash),
            $each!(ext_addrs6, EXT_ADDRS6, hash),
            $each!(fips4, FIPS4, hash),
            $each!(fip_of4, FIP_OF4, hash),
        ]
    };
}
use written_maps;

/// A key set as the map the agent writes it into: each key with value 1.
fn as_set_map<K: Copy + Ord>(keys: &BTreeSet<K>) -> BTreeMap<K, u32> {
    keys.iter().map(|key| (*key, 1)).collect()
}

/// How many entries `actual` has wrong against `wanted`: different, missing or extra.
fn drift<K: Ord, V: PartialEq>(actual: &BTreeMap<K, V>, wanted: &BTreeMap<K, V>) -> u64 {
    let wrong = wanted
        .iter()
        .filter(|(k, v)| actual.get(k) != Some(v))
        .count();
    let extra = actual.keys().filter(|k| !wanted.contains_key(k)).count();
    (wrong + extra) as u64
}

/// Makes the hash map hold `wanted` exactly; how many entries it had wrong.
fn repair_hash<K, V>(
    map: &mut HashMap<MapData, K, V>,
    wanted: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<u64, DatapathError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    // An entry removed while the walk runs is simply not there.
    let actual: BTreeMap<K, V> = map.iter().filter_map(Result::ok).collect();
    let wrong = drift(&actual, wanted);
    if wrong > 0 {
        upsert_map(map, &actual, wanted, name)?;
        remove_map(map, &actual, wanted, name)?;
    }
    Ok(wrong)
}

/// As [`repair_hash`] for an LPM trie, keyed by (prefix length, data).
fn repair_trie<K, V>(
    trie: &mut LpmTrie<MapData, K, V>,
    wanted: &BTreeMap<(u32, K), V>,
    name: &'static str,
) -> Result<u64, DatapathError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let actual: BTreeMap<(u32, K), V> = trie
        .iter()
        .filter_map(Result::ok)
        .map(|(key, value)| ((key.prefix_len(), key.data()), value))
        .collect();
    let wrong = drift(&actual, wanted);
    if wrong > 0 {
        upsert_trie_map(trie, &actual, wanted, name)?;
        remove_trie_map(trie, &actual, wanted, name)?;
    }
    Ok(wrong)
}

/// A removal of an entry that is already gone is what the caller wanted anyway.
fn remove_present(result: Result<(), MapError>, name: &'static str) -> MapResult {
    match result {
        Err(MapError::KeyNotFound) => {
            warn!(map = name, "entry to remove was already gone");
            Ok(())
        }
        other => other.map_err(map_err(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pins_of_other_layouts_are_removed() {
        let root = std::env::temp_dir().join(format!("dp-pins-{}", std::process::id()));
        let current = pin_dir(&root);
        for dir in [
            root.join("v3").join("maps"),
            root.join("v12"),
            current.clone(),
            root.join("vx"),
            root.join("other"),
        ] {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::write(root.join("v3").join("maps").join("PORTS"), b"").unwrap();
        remove_other_versions(&root).unwrap();
        assert!(!root.join("v3").exists() && !root.join("v12").exists());
        assert!(current.exists() && root.join("vx").exists() && root.join("other").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
