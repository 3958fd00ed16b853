//! The loaded BPF object, twice: one copy of the programs per map set (see
//! `dataplane_abi::map_set`), the dispatchers in front of them, and their links to the
//! port devices and the uplink.
//!
//! An update is written into the set packets do not use and then made visible with one
//! map update ([`Datapath::stage`], [`Datapath::switch`]): no packet is ever judged by
//! part of an update. With a pin root, everything outlives the agent (see `pins`), and
//! the next run adopts it without changing what packets see.

mod attach;
pub mod batch;
mod pins;
mod tables;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    maps::{
        lpm_trie::LpmTrie, Array, HashMap, IterableMap, MapData, MapError, PerCpuArray,
        PerCpuValues, ProgramArray,
    },
    programs::{ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp},
    sys::SyscallError,
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use dataplane_abi::{
    ct_stat, global_names, map_names, map_set, program_names, timeout_secs, CtEntry, CtKey,
    DropReason, ExternalAddr, FdbEntry, FdbKey, FixedAddr4, FixedNat4, FloatingIp4, FloodSet,
    NeighKey4, NeighKey6, Neighbor, PortAddr4, PortAddr6, PortInfo, PortMacKey, PortStats,
    RemoteKey4, RemoteKey6, Route, RouteKey4, RouteKey6, RouterGateway, RouterGateway6, RouterIf,
    RuleKey, RuleStats, SnatKey4, SnatOrigin4, Verdict, REMOTE4_FULL_BITS, REMOTE6_FULL_BITS,
    RULE_LOOKUP_BITS,
};
use tracing::{debug, error, info, warn};

pub use self::pins::PinLayout;
use self::{
    attach::Link,
    pins::{Fit, MapShape},
    tables::{map_err, written_maps},
};
use super::{bpffs, monitor::MonitorMaps, BPF_OBJECT};
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
    /// Entries of each of `SG_REMOTE4` and `SG_REMOTE6`, and of each of their host maps.
    pub max_remote_prefixes: u32,
    /// Entries of each of `SG_RULES` and `SG_RULE_PORTS` (a rule takes one per port
    /// block of its range).
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

    /// The loader's `max_entries` overrides.
    fn max_entries(&self) -> BTreeMap<&'static str, u32> {
        BTreeMap::from([
            (map_names::PORTS, self.max_ports),
            (map_names::PORT_STATS, self.max_ports),
            (map_names::FLOOD, self.max_ports),
            (map_names::PORT_IP4, self.max_addresses),
            (map_names::PORT_IP6, self.max_addresses),
            (map_names::FDB, self.max_fdb),
            (map_names::RULE_STATS, self.max_rules),
            (map_names::SG_REMOTE4, self.max_remote_prefixes),
            (map_names::SG_REMOTE6, self.max_remote_prefixes),
            (map_names::SG_RULES, self.max_rule_entries),
            (map_names::SG_HOST4, self.max_remote_prefixes),
            (map_names::SG_HOST6, self.max_remote_prefixes),
            (map_names::SG_RULE_PORTS, self.max_rule_entries),
            (map_names::CT, self.conntrack_entries),
            (map_names::CT_NEW, self.conntrack_new_entries),
        ])
    }
}

/// How to load the object.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin maps and links under this directory on bpffs (see [`PinLayout`]), adopting
    /// what a previous run pinned there. Without it nothing outlives the datapath.
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
    #[error("reading the map definitions of the BPF object")]
    Object(#[from] aya_obj::ParseError),
    #[error("pinning a map at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("pinning a link at {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("link")]
    Link(#[source] aya::programs::links::LinkError),
    #[error("{runs} program runs still read map set {set}")]
    InFlight { set: u32, runs: u64 },
    #[error("preparing pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `sizeof(struct __sk_buff)` and the offsets of the fields a test run may set.
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

/// The uplink NIC's dispatchers.
struct UplinkAttachment {
    interface: String,
    ifindex: u32,
    /// XDP in generic mode only (see [`Datapath::attach_uplink`]).
    generic: bool,
    xdp: Link,
    ingress: Link,
}

/// A port device's dispatchers.
struct PortAttachment {
    interface: String,
    ingress: Link,
    egress: Link,
}

/// One map set's copy of the desired-state maps (see `dataplane_abi::map_set`).
struct SetMaps {
    ports: HashMap<MapData, u32, PortInfo>,
    port_macs: HashMap<MapData, PortMacKey, u32>,
    port_ip4: HashMap<MapData, PortAddr4, u32>,
    port_net4: LpmTrie<MapData, PortAddr4, u32>,
    port_ip6: HashMap<MapData, PortAddr6, u32>,
    port_net6: LpmTrie<MapData, PortAddr6, u32>,
    fdb: HashMap<MapData, FdbKey, FdbEntry>,
    flood: HashMap<MapData, u32, FloodSet>,
    sg_remote4: LpmTrie<MapData, RemoteKey4, u32>,
    sg_remote6: LpmTrie<MapData, RemoteKey6, u32>,
    sg_rules: LpmTrie<MapData, RuleKey, u32>,
    sg_host4: HashMap<MapData, RemoteKey4, u32>,
    sg_host6: HashMap<MapData, RemoteKey6, u32>,
    sg_rule_ports: HashMap<MapData, RuleKey, u32>,
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
}

/// Calls `$callback!` with every field of [`SetMaps`] and its map's name.
macro_rules! with_set_maps {
    ($callback:ident) => {
        $callback!(
            ports: PORTS, port_macs: PORT_MACS, port_ip4: PORT_IP4, port_net4: PORT_NET4,
            port_ip6: PORT_IP6, port_net6: PORT_NET6, fdb: FDB, flood: FLOOD,
            sg_remote4: SG_REMOTE4, sg_remote6: SG_REMOTE6, sg_rules: SG_RULES,
            sg_host4: SG_HOST4, sg_host6: SG_HOST6, sg_rule_ports: SG_RULE_PORTS,
            router_ifs: ROUTER_IFS, routes4: ROUTES4, routes6: ROUTES6, neigh4: NEIGH4,
            neigh6: NEIGH6, router_gw: ROUTER_GW, gateway_macs: GATEWAY_MACS,
            ext_addrs4: EXT_ADDRS4, router_gw6: ROUTER_GW6, ext_addrs6: EXT_ADDRS6,
            fips4: FIPS4, fip_of4: FIP_OF4,
        )
    };
}

impl SetMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        macro_rules! take_all {
            ($($field:ident: $name:ident),* $(,)?) => {
                Self { $($field: take(ebpf, map_names::$name)?),* }
            };
        }
        Ok(with_set_maps!(take_all))
    }

    /// Second handles on the same kernel maps (their fds duplicated), to read them
    /// without holding the node.
    fn reopen(&self) -> Result<Self, DatapathError> {
        macro_rules! reopen_all {
            ($($field:ident: $name:ident),* $(,)?) => {
                Self { $($field: reopen(self.$field.map(), map_names::$name)?),* }
            };
        }
        Ok(with_set_maps!(reopen_all))
    }
}

/// The map sets as last written, on handles of their own: compared with what the agent
/// wrote into them without the node's lock, which a comparison at a large node's scale
/// (every entry of both sets read back) would hold for a second.
pub struct DriftProbe {
    sets: Vec<(SetMaps, Option<Arc<DatapathTables>>)>,
}

impl DriftProbe {
    /// Whether every set holds what the agent last wrote into it. A set whose content
    /// is not known (adopted, or a write failed) does not, nor one written meanwhile.
    pub fn maps_hold(&self) -> Result<bool, DatapathError> {
        for (maps, tables) in &self.sets {
            match tables {
                Some(tables) if maps.holds(tables)? => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// What the programs of both sets share: their counters, conntrack and SNAT state, and
/// the switch between the sets.
struct StateMaps {
    port_stats: PerCpuArray<MapData, PortStats>,
    noport_drops: PerCpuArray<MapData, u64>,
    rule_stats: PerCpuArray<MapData, RuleStats>,
    ct: HashMap<MapData, CtKey, CtEntry>,
    ct_new: HashMap<MapData, CtKey, CtEntry>,
    ct_stats: PerCpuArray<MapData, u64>,
    verdict: PerCpuArray<MapData, Verdict>,
    snat4_in: HashMap<MapData, SnatKey4, SnatOrigin4>,
    uplink_stats: PerCpuArray<MapData, PortStats>,
    active_set: Array<MapData, u32>,
    in_flight: PerCpuArray<MapData, u64>,
    tc_stages: ProgramArray<MapData>,
    xdp_stages: ProgramArray<MapData>,
}

/// The maps of [`StateMaps`], pinned once for both sets (`aya-log`'s, if the programs
/// log, too).
const STATE_MAPS: [&str; 18] = [
    map_names::PORT_STATS,
    map_names::NOPORT_DROPS,
    map_names::RULE_STATS,
    map_names::CT,
    map_names::CT_NEW,
    map_names::CT_STATS,
    map_names::VERDICT,
    map_names::SNAT4_IN,
    map_names::SNAT4_OUT,
    map_names::UPLINK_STATS,
    map_names::ACTIVE_SET,
    map_names::IN_FLIGHT,
    map_names::TC_STAGES,
    map_names::XDP_STAGES,
    map_names::EVENTS,
    map_names::EVENTS_LOST,
    map_names::MONITOR_CONFIG,
    "AYA_LOGS",
];

macro_rules! map_names_of {
    ($($field:ident: $name:ident),* $(,)?) => {
        [$(map_names::$name),*]
    };
}
/// The maps of [`SetMaps`], pinned once per set.
const SET_MAPS: [&str; 26] = with_set_maps!(map_names_of);

/// Each tc stage: its index in `TC_STAGES` (before the set), its program, and the
/// dispatcher in front of it.
const TC_STAGES: [(u32, &str, &str); 3] = [
    (
        map_set::PORT_INGRESS,
        program_names::PORT_INGRESS_STAGE,
        program_names::PORT_INGRESS,
    ),
    (
        map_set::PORT_EGRESS,
        program_names::PORT_EGRESS_STAGE,
        program_names::PORT_EGRESS,
    ),
    (
        map_set::UPLINK_INGRESS,
        program_names::UPLINK_INGRESS_STAGE,
        program_names::UPLINK_INGRESS,
    ),
];

/// How long a switch waits for the runs still on the old set (each takes microseconds).
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// One copy of the object: its programs, which read its own set of the desired-state
/// maps (the object's `MAP_SET` is its index), and what that set holds.
struct MapSet {
    ebpf: Ebpf,
    maps: SetMaps,
    /// What the maps hold, if known: a set adopted from a previous run is not, until
    /// compared. The active set's are the node's compiled tables themselves.
    programmed: Option<Arc<DatapathTables>>,
    /// Whether the stage arrays hold this copy's programs for the set (not a previous
    /// run's).
    stages_installed: bool,
}

impl MapSet {
    /// Makes the (idle) set's maps hold `wanted`: the difference from what they hold,
    /// or, when that is not known, whatever differs. Left unknown if a write fails: the
    /// next one compares instead.
    fn hold(&mut self, wanted: &Arc<DatapathTables>) -> Result<(), DatapathError> {
        match self.programmed.take() {
            Some(old) => self.maps.write(&old, wanted)?,
            None => {
                self.maps.repair(wanted)?;
            }
        }
        self.programmed = Some(Arc::clone(wanted));
        Ok(())
    }
}

/// The map set a compiled state was written into, ready to be switched to.
#[must_use = "nothing changes for packets until `switch`"]
pub struct Staged {
    /// `None`: the active set already holds it.
    target: Option<u32>,
}

/// What a drift check found and put back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// Entries that were wrong, by map.
    pub entries: Vec<(&'static str, u64)>,
    /// Dispatchers found detached from a device, and attached again.
    pub links: u64,
    /// Pins found removed, and pinned again.
    pub pins: u64,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.links == 0 && self.pins == 0
    }
}

pub struct Datapath {
    /// Set 0's copy also holds the dispatchers.
    sets: [MapSet; 2],
    state: StateMaps,
    /// The set packets use.
    active: u32,
    /// Slot of each programmed port and of each rule, to notice slots that change hands.
    port_slots: BTreeMap<String, u32>,
    rule_slots: BTreeMap<String, u32>,
    limits: MapLimits,
    attachments: StdHashMap<u32, PortAttachment>,
    uplink: Option<UplinkAttachment>,
    pins: Option<PinLayout>,
    /// Every map pin, with a handle of its own, to pin it again should it be removed.
    pinned_maps: Vec<(PathBuf, MapData)>,
    /// What a previous run left that goes once this run has taken the links over:
    /// other versions' pins and maps moved aside. `None` once done.
    takeover: Option<Vec<PathBuf>>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

fn other(set: u32) -> u32 {
    (set + 1) % map_set::COUNT
}

/// A directory on bpffs for a datapath that is not pinned: the two copies share their
/// state maps through pins there during the load, and it is removed right after.
fn private_pin_root() -> Result<PathBuf, DatapathError> {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let mount = Path::new(bpffs::DEFAULT_MOUNT);
    bpffs::ensure_mounted(mount).map_err(|source| DatapathError::PinDir {
        path: mount.to_path_buf(),
        source,
    })?;
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(mount.join(format!("dataplane-load-{}-{n}", std::process::id())))
}

/// Moves a pin that is not adopted out of the way of the new map: its programs keep
/// using it until the switch, and it is removed after.
fn move_aside(path: &Path) -> Result<PathBuf, DatapathError> {
    // bpffs refuses names with a dot.
    let mut aside = path.as_os_str().to_owned();
    aside.push("-replaced");
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside).map_err(|source| DatapathError::PinDir {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(aside)
}

/// Loads copy `set` of the object, its maps pinned under `pins` (adopting what is
/// pinned there), and verifies its programs: the stages, and in copy 0 the dispatchers.
fn load_copy(
    set: u32,
    pins: &PinLayout,
    max_entries: &BTreeMap<&'static str, u32>,
    shapes: &BTreeMap<String, MapShape>,
    trace: u32,
) -> Result<Ebpf, DatapathError> {
    let (state_dir, set_dir) = (pins.state_dir(), pins.set_dir(set));
    let mut loader = EbpfLoader::new();
    loader
        .override_global(global_names::TRACE_VERDICT, &trace, true)
        .override_global(global_names::MAP_SET, &set, true);
    for (name, entries) in max_entries {
        loader.map_max_entries(name, *entries);
    }
    for name in STATE_MAPS.iter().filter(|name| shapes.contains_key(**name)) {
        loader.map_pin_path(name, state_dir.join(name));
    }
    for name in SET_MAPS {
        loader.map_pin_path(name, set_dir.join(name));
    }
    let mut ebpf = loader.load(BPF_OBJECT)?;
    let load_err = |program| move |source| DatapathError::Program { program, source };
    let mut tc: Vec<&'static str> = TC_STAGES.iter().map(|(_, stage, _)| *stage).collect();
    let mut xdp_programs = vec![program_names::UPLINK_XDP_STAGE];
    if set == 0 {
        tc.extend(TC_STAGES.iter().map(|(_, _, dispatcher)| *dispatcher));
        xdp_programs.push(program_names::UPLINK_XDP);
    }
    for name in tc {
        classifier(&mut ebpf, name)?
            .load()
            .map_err(load_err(name))?;
    }
    for name in xdp_programs {
        xdp(&mut ebpf, name)?.load().map_err(load_err(name))?;
    }
    Ok(ebpf)
}

/// Readies a lone copy of the object that its user writes the maps of directly (packet
/// tests): loads its stages and dispatchers and puts the stages in as set 0's, the active
/// one. What packets see then changes entry by entry, not all at once.
pub fn ready_lone_copy(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let load_err = |program| move |source| DatapathError::Program { program, source };
    let mut stages = Vec::new();
    for (stage, name, dispatcher) in TC_STAGES {
        for program in [name, dispatcher] {
            let prog = classifier(ebpf, program)?;
            if prog.fd().is_err() {
                prog.load().map_err(load_err(program))?;
            }
        }
        let fd = classifier(ebpf, name)?.fd().map_err(load_err(name))?;
        stages.push((
            map_names::TC_STAGES,
            stage * map_set::COUNT,
            owned(fd, name)?,
        ));
    }
    let name = program_names::UPLINK_XDP_STAGE;
    for program in [name, program_names::UPLINK_XDP] {
        let prog = xdp(ebpf, program)?;
        if prog.fd().is_err() {
            prog.load().map_err(load_err(program))?;
        }
    }
    let fd = xdp(ebpf, name)?.fd().map_err(load_err(name))?;
    stages.push((map_names::XDP_STAGES, 0, owned(fd, name)?));
    for (array, index, fd) in stages {
        let map = ebpf.map_mut(array).ok_or(DatapathError::Missing {
            kind: "map",
            name: array,
        })?;
        ProgramArray::<&mut MapData>::try_from(map)
            .and_then(|mut stages| stages.set(index, &fd, 0))
            .map_err(map_err(array))?;
    }
    Ok(())
}

/// A program fd of its own, to use while the object is borrowed for its maps.
fn owned(
    fd: &aya::programs::ProgramFd,
    program: &'static str,
) -> Result<aya::programs::ProgramFd, DatapathError> {
    fd.try_clone().map_err(|e| DatapathError::Program {
        program,
        source: ProgramError::IOError(e),
    })
}

impl Datapath {
    /// Loads and verifies two copies of the programs, one per map set. With a pin root,
    /// maps pinned there by a previous run are adopted (or replaced, see
    /// [`pins::Fit`]), and links pinned there are taken over at the first sync, so that
    /// packets keep being handled across a restart or upgrade. Starts forwarding the
    /// programs' log records to `tracing`.
    pub fn load(limits: MapLimits, options: &LoadOptions) -> Result<Self, DatapathError> {
        let max_entries = limits.max_entries();
        let shapes = pins::object_shapes(BPF_OBJECT, &max_entries)?;
        let root = match &options.pin_root {
            Some(root) => root.clone(),
            None => private_pin_root()?,
        };
        let layout = PinLayout::new(&root);
        let mut leftovers = layout
            .other_versions()
            .map_err(|source| DatapathError::PinDir {
                path: root.clone(),
                source,
            })?;
        // State maps of another size, to copy into their new ones.
        let mut resized = Vec::new();
        // Whether each set's maps are all new, so known to be empty.
        let mut set_fresh = [true; 2];
        // Whether a previous run left state maps (and so, stages and links) behind.
        let mut state_adopted = false;
        let links = layout.links_dir();
        std::fs::create_dir_all(&links).map_err(|source| DatapathError::PinDir {
            path: links,
            source,
        })?;
        let dirs = [
            (layout.state_dir(), &STATE_MAPS[..], None),
            (layout.set_dir(0), &SET_MAPS[..], Some(0)),
            (layout.set_dir(1), &SET_MAPS[..], Some(1)),
        ];
        for (dir, names, set) in dirs {
            std::fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir {
                path: dir.clone(),
                source,
            })?;
            for name in names {
                let Some(wanted) = shapes.get(*name) else {
                    continue;
                };
                let path = dir.join(name);
                let pinned = pins::pinned_shape(&path).map_err(map_err_named(name))?;
                let fit = pins::fit(pinned, wanted);
                if fit != Fit::Absent {
                    match set {
                        Some(set) => set_fresh[set] = false,
                        None => state_adopted = true,
                    }
                }
                match fit {
                    Fit::Absent | Fit::Adopt => {}
                    Fit::Resize { pinned } => {
                        info!(map = name, %pinned, %wanted, "pinned map has another size; replacing it");
                        let aside = move_aside(&path)?;
                        if set.is_none() {
                            resized.push((*name, aside.clone()));
                        }
                        leftovers.push(aside);
                    }
                    Fit::Mismatch { pinned } => {
                        error!(map = name, %pinned, %wanted, "pinned map has another layout under this version; not reading it");
                        leftovers.push(move_aside(&path)?);
                    }
                }
            }
        }

        let trace = u32::from(options.trace_verdicts);
        let mut copies = Vec::with_capacity(2);
        for set in 0..map_set::COUNT {
            copies.push(load_copy(set, &layout, &max_entries, &shapes, trace)?);
        }
        let [mut ebpf0, ebpf1]: [Ebpf; 2] =
            copies.try_into().map_err(|_| DatapathError::Missing {
                kind: "copy",
                name: "map set",
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf0) {
            Ok(logger) => Some(logger),
            Err(e) => {
                debug!(error = %e, "programs have no log map; nothing to forward");
                None
            }
        };
        let mut state = StateMaps {
            port_stats: take(&mut ebpf0, map_names::PORT_STATS)?,
            noport_drops: take(&mut ebpf0, map_names::NOPORT_DROPS)?,
            rule_stats: take(&mut ebpf0, map_names::RULE_STATS)?,
            ct: take(&mut ebpf0, map_names::CT)?,
            ct_new: take(&mut ebpf0, map_names::CT_NEW)?,
            ct_stats: take(&mut ebpf0, map_names::CT_STATS)?,
            verdict: take(&mut ebpf0, map_names::VERDICT)?,
            snat4_in: take(&mut ebpf0, map_names::SNAT4_IN)?,
            uplink_stats: take(&mut ebpf0, map_names::UPLINK_STATS)?,
            active_set: take(&mut ebpf0, map_names::ACTIVE_SET)?,
            in_flight: take(&mut ebpf0, map_names::IN_FLIGHT)?,
            tc_stages: take(&mut ebpf0, map_names::TC_STAGES)?,
            xdp_stages: take(&mut ebpf0, map_names::XDP_STAGES)?,
        };
        for (name, old) in resized {
            let copied = state.migrate(name, &old)?;
            info!(
                map = name,
                entries = copied,
                "copied the entries of the replaced map"
            );
        }
        let active = state
            .active_set
            .get(&0, 0)
            .map_err(map_err(map_names::ACTIVE_SET))?
            % map_set::COUNT;
        let mut sets = Vec::with_capacity(2);
        for (mut ebpf, fresh) in [(ebpf0, set_fresh[0]), (ebpf1, set_fresh[1])] {
            sets.push(MapSet {
                maps: SetMaps::take(&mut ebpf)?,
                ebpf,
                programmed: fresh.then(Arc::default),
                stages_installed: false,
            });
        }
        let sets: [MapSet; 2] = sets.try_into().map_err(|_| DatapathError::Missing {
            kind: "map set",
            name: "copy",
        })?;
        let (pins, pinned_maps, takeover) = match &options.pin_root {
            Some(_) => {
                let pinned = pinned_map_handles(&layout, &shapes)?;
                (Some(layout), pinned, Some(leftovers))
            }
            None => {
                // The copies have their maps; the pins were only the way to share them.
                std::fs::remove_dir_all(&root).map_err(|source| DatapathError::PinDir {
                    path: root.clone(),
                    source,
                })?;
                (None, Vec::new(), None)
            }
        };
        let mut datapath = Self {
            sets,
            state,
            active,
            port_slots: BTreeMap::new(),
            rule_slots: BTreeMap::new(),
            limits,
            attachments: StdHashMap::new(),
            uplink: None,
            pins,
            pinned_maps,
            takeover,
            logger,
        };
        if !state_adopted {
            // Nothing ran before: the active set's stages go in now, so that the
            // dispatchers work from the start. Adopted ones stay until the first sync
            // has checked the set they read.
            datapath.install_stages(active)?;
        }
        info!(
            pins = ?datapath.pins.as_ref().map(PinLayout::version_dir),
            adopted = state_adopted,
            active,
            trace = options.trace_verdicts,
            "datapath loaded"
        );
        Ok(datapath)
    }

    /// Takes the packet monitor's maps out of the object, once: the monitor reads them
    /// on a task of its own, not under the node's lock. They are state maps, shared by
    /// both sets' programs.
    pub fn take_monitor_maps(&mut self) -> Result<MonitorMaps, DatapathError> {
        let ebpf = &mut self.sets[0].ebpf;
        Ok(MonitorMaps {
            events: take(ebpf, map_names::EVENTS)?,
            lost: take(ebpf, map_names::EVENTS_LOST)?,
            config: take(ebpf, map_names::MONITOR_CONFIG)?,
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

    /// Makes what packets see equal to `compiled`, all at once: [`Self::stage`], then
    /// [`Self::switch`].
    pub fn sync(&mut self, compiled: &Compiled) -> Result<(), DatapathError> {
        let staged = self.stage(compiled)?;
        self.switch(staged, compiled)
    }

    /// Writes `compiled` into the map set packets do not use, and attaches the devices
    /// of new ports (whose frames the active set does not know yet). Nothing changes for
    /// packets; on error the active set is as it was.
    pub fn stage(&mut self, compiled: &Compiled) -> Result<Staged, DatapathError> {
        let active = self.active as usize;
        let holds = match &self.sets[active].programmed {
            Some(tables) => Arc::ptr_eq(tables, &compiled.tables) || *tables == compiled.tables,
            // Adopted from a previous run: compared entry by entry, once.
            None => self.sets[active].maps.holds(&compiled.tables)?,
        };
        let target = if holds {
            self.sets[active].programmed = Some(Arc::clone(&compiled.tables));
            None
        } else {
            let target = other(self.active);
            self.wait_idle(target)?;
            self.sets[target as usize].hold(&compiled.tables)?;
            Some(target)
        };
        self.attach_new(&compiled.ports)?;
        Ok(Staged { target })
    }

    /// Brings the set packets do not use up to the active set's tables; whether it had
    /// to. After a commit the idle set holds the tables before it, and the next commit
    /// would write both differences: a single-rule Apply after a large Sync paid for the
    /// whole Sync again. Done when nothing else waits, the next commit writes its own.
    pub fn catch_up_idle_set(&mut self) -> Result<bool, DatapathError> {
        let Some(wanted) = self.sets[self.active as usize].programmed.clone() else {
            return Ok(false);
        };
        let idle = other(self.active);
        if self.sets[idle as usize]
            .programmed
            .as_ref()
            .is_some_and(|held| Arc::ptr_eq(held, &wanted))
        {
            return Ok(false);
        }
        self.wait_idle(idle)?;
        self.sets[idle as usize].hold(&wanted)?;
        Ok(true)
    }

    /// Makes the staged set the one packets use, with one map update; then takes the
    /// programs off devices no port needs any more.
    pub fn switch(&mut self, staged: Staged, compiled: &Compiled) -> Result<(), DatapathError> {
        let port_slots: BTreeMap<String, u32> = compiled
            .ports
            .iter()
            .map(|port| (port.port_id.clone(), port.slot))
            .collect();
        // Counters of a slot that changes hands start from zero.
        for slot in changed_hands(&self.port_slots, &port_slots) {
            zero_slot(&mut self.state.port_stats, slot, map_names::PORT_STATS)?;
        }
        for slot in changed_hands(&self.rule_slots, &compiled.rules) {
            zero_slot(&mut self.state.rule_stats, slot, map_names::RULE_STATS)?;
        }
        let set = staged.target.unwrap_or(self.active);
        if !self.sets[set as usize].stages_installed {
            self.install_stages(set)?;
        }
        if let Some(target) = staged.target {
            self.state
                .active_set
                .set(0, target, 0)
                .map_err(map_err(map_names::ACTIVE_SET))?;
            self.active = target;
            debug!(set = target, "switched");
        }
        self.detach_stale(&compiled.ports);
        self.port_slots = port_slots;
        self.rule_slots = compiled.rules.clone();
        self.finish_takeover();
        Ok(())
    }

    /// Waits until no program run reads `set` (the runs that started before the switch
    /// away from it take microseconds).
    fn wait_idle(&self, set: u32) -> Result<(), DatapathError> {
        // Orders the switch (an earlier map update) before the reads of the counts.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let deadline = Instant::now() + IDLE_TIMEOUT;
        loop {
            let runs = self
                .state
                .in_flight
                .get(&set, 0)
                .map_err(map_err(map_names::IN_FLIGHT))?
                .iter()
                .fold(0u64, |total, count| total.wrapping_add(*count));
            if runs == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DatapathError::InFlight { set, runs });
            }
            std::thread::yield_now();
        }
    }

    /// Puts this copy's stages of `set` into the stage arrays (replacing a previous
    /// run's: same maps, new code).
    fn install_stages(&mut self, set: u32) -> Result<(), DatapathError> {
        let copy = &mut self.sets[set as usize];
        for (stage, name, _) in TC_STAGES {
            let fd = classifier(&mut copy.ebpf, name)?.fd().map_err(|source| {
                DatapathError::Program {
                    program: name,
                    source,
                }
            })?;
            self.state
                .tc_stages
                .set(stage * map_set::COUNT + set, fd, 0)
                .map_err(map_err(map_names::TC_STAGES))?;
        }
        let name = program_names::UPLINK_XDP_STAGE;
        let fd = xdp(&mut copy.ebpf, name)?
            .fd()
            .map_err(|source| DatapathError::Program {
                program: name,
                source,
            })?;
        self.state
            .xdp_stages
            .set(set, fd, 0)
            .map_err(map_err(map_names::XDP_STAGES))?;
        copy.stages_installed = true;
        Ok(())
    }

    /// Once the links are this run's, removes what a previous run left: other versions'
    /// pins, replaced maps, and links to devices no port or uplink has now.
    fn finish_takeover(&mut self) {
        let (Some(leftovers), Some(pins)) = (self.takeover.take(), &self.pins) else {
            return;
        };
        let claimed: BTreeSet<&PathBuf> = self
            .attachments
            .values()
            .flat_map(|a| [a.ingress.pin_path(), a.egress.pin_path()])
            .chain(
                self.uplink
                    .iter()
                    .flat_map(|u| [u.xdp.pin_path(), u.ingress.pin_path()]),
            )
            .flatten()
            .collect();
        let stale_links = pins.pinned_links().unwrap_or_default();
        for (_, _, path) in stale_links
            .iter()
            .filter(|(_, _, path)| !claimed.contains(path))
        {
            info!(pin = %path.display(), "removed the link of a device no port has");
            let _ = std::fs::remove_file(path);
        }
        for path in leftovers {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => info!(pins = %path.display(), "removed what a previous run left"),
                Err(e) => {
                    warn!(pins = %path.display(), error = %e, "could not remove what a previous run left")
                }
            }
        }
    }

    /// Attaches the dispatchers to every port device not yet attached (taking over
    /// their pinned links).
    fn attach_new(&mut self, ports: &[ProgrammedPort]) -> Result<(), DatapathError> {
        for port in ports {
            if self.attachments.contains_key(&port.ifindex) {
                continue;
            }
            let pin = |hook| self.pins.as_ref().map(|p| p.link(port.ifindex, hook));
            let (ingress_pin, egress_pin) = (
                pin(program_names::PORT_INGRESS),
                pin(program_names::PORT_EGRESS),
            );
            let ebpf = &mut self.sets[0].ebpf;
            let ingress = attach::tc(
                classifier(ebpf, program_names::PORT_INGRESS)?,
                &port.interface_name,
                TcAttachType::Ingress,
                ingress_pin,
            )?;
            let egress = match attach::tc(
                classifier(ebpf, program_names::PORT_EGRESS)?,
                &port.interface_name,
                TcAttachType::Egress,
                egress_pin,
            ) {
                Ok(egress) => egress,
                Err(e) => {
                    ingress.release();
                    return Err(e);
                }
            };
            info!(interface = %port.interface_name, ifindex = port.ifindex, port = %port.port_id, "attached");
            self.attachments.insert(
                port.ifindex,
                PortAttachment {
                    interface: port.interface_name.clone(),
                    ingress,
                    egress,
                },
            );
        }
        Ok(())
    }

    /// Detaches from devices that no longer carry a programmed port (or were replaced
    /// by a new device with the same name).
    fn detach_stale(&mut self, ports: &[ProgrammedPort]) {
        let wanted: BTreeSet<u32> = ports.iter().map(|port| port.ifindex).collect();
        let stale: Vec<u32> = self
            .attachments
            .keys()
            .filter(|ifindex| !wanted.contains(ifindex))
            .copied()
            .collect();
        for ifindex in stale {
            if let Some(attachment) = self.attachments.remove(&ifindex) {
                attachment.ingress.release();
                attachment.egress.release();
                info!(interface = %attachment.interface, "detached");
            }
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
        let pin = |hook| self.pins.as_ref().map(|p| p.link(ifindex, hook));
        let (xdp_pin, ingress_pin) = (
            pin(program_names::UPLINK_XDP),
            pin(program_names::UPLINK_INGRESS),
        );
        let ebpf = &mut self.sets[0].ebpf;
        let xdp_link = attach::xdp(
            xdp(ebpf, program_names::UPLINK_XDP)?,
            interface,
            generic,
            xdp_pin,
        )?;
        let ingress = match attach::tc(
            classifier(ebpf, program_names::UPLINK_INGRESS)?,
            interface,
            TcAttachType::Ingress,
            ingress_pin,
        ) {
            Ok(link) => link,
            Err(e) => {
                xdp_link.release();
                return Err(e);
            }
        };
        info!(interface, "uplink attached");
        self.uplink = Some(UplinkAttachment {
            interface: interface.to_owned(),
            ifindex,
            generic,
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
        if let Some(uplink) = self.uplink.take() {
            uplink.xdp.release();
            uplink.ingress.release();
        }
    }

    /// Counters of the uplink: rx from outside, tx to it, drops by reason.
    pub fn uplink_counters(&self) -> Result<Counters, DatapathError> {
        summed(&self.state.uplink_stats, 0)
    }

    /// What [`DriftProbe::maps_hold`] needs, to be run without the node's lock.
    pub fn drift_probe(&self) -> Result<DriftProbe, DatapathError> {
        let sets = self
            .sets
            .iter()
            .map(|set| Ok((set.maps.reopen()?, set.programmed.clone())))
            .collect::<Result<_, DatapathError>>()?;
        Ok(DriftProbe { sets })
    }

    /// Compares what the agent programmed with the kernel's view and puts back what
    /// differs: map entries changed, added or removed behind its back (in both sets;
    /// only with `maps`, where a [`DriftProbe`] found them to differ), dispatchers
    /// detached from a device, and removed pins.
    pub fn repair_drift(&mut self, maps: bool) -> Result<Drift, DatapathError> {
        let mut drift = Drift::default();
        if maps {
            self.repair_maps(&mut drift)?;
        }
        for set in 0..map_set::COUNT {
            if self.sets[set as usize].stages_installed {
                self.install_stages(set)?;
            }
        }
        drift.links = self.reattach_detached()?;
        drift.pins = self.repin_removed()?;
        Ok(drift)
    }

    /// The map entries of [`Self::repair_drift`].
    fn repair_maps(&mut self, drift: &mut Drift) -> Result<(), DatapathError> {
        let active = self.active as usize;
        let set = &mut self.sets[active];
        if let Some(wanted) = &set.programmed {
            drift.entries = set.maps.repair(wanted)?;
        }
        let inactive = other(self.active);
        self.wait_idle(inactive)?;
        let (first, second) = self.sets.split_at_mut(1);
        let (active_set, inactive_set) = if active == 0 {
            (&first[0], &mut second[0])
        } else {
            (&second[0], &mut first[0])
        };
        match (&inactive_set.programmed, &active_set.programmed) {
            (Some(wanted), _) => {
                for (map, wrong) in inactive_set.maps.repair(wanted)? {
                    match drift.entries.iter_mut().find(|(name, _)| *name == map) {
                        Some((_, total)) => *total += wrong,
                        None => drift.entries.push((map, wrong)),
                    }
                }
            }
            // Adopted and not written since: brought up to the active set's tables,
            // so that the next update writes only its difference.
            (None, Some(wanted)) => {
                inactive_set.maps.repair(wanted)?;
                inactive_set.programmed = Some(wanted.clone());
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// Attaches the dispatchers again where they were detached from a device; how
    /// many. Only the detached direction is attached again: the device refuses a
    /// dispatcher it still runs.
    fn reattach_detached(&mut self) -> Result<u64, DatapathError> {
        let mut count = 0;
        let ebpf = &mut self.sets[0].ebpf;
        for attachment in self.attachments.values_mut() {
            for (name, direction) in [
                (program_names::PORT_INGRESS, TcAttachType::Ingress),
                (program_names::PORT_EGRESS, TcAttachType::Egress),
            ] {
                let dispatcher = classifier(ebpf, name)?;
                // A device that is gone is the device watch's to notice.
                if !matches!(
                    attach::tc_attached(dispatcher, &attachment.interface, direction),
                    Ok(false)
                ) {
                    continue;
                }
                warn!(interface = %attachment.interface, ?direction, "dispatcher detached behind the agent's back; attaching again");
                let link = match direction {
                    TcAttachType::Ingress => &mut attachment.ingress,
                    _ => &mut attachment.egress,
                };
                let pin = link.pin_path().cloned();
                let attached = attach::tc(dispatcher, &attachment.interface, direction, pin);
                count += replace_link(link, attached, &attachment.interface);
            }
        }
        let Some(uplink) = &mut self.uplink else {
            return Ok(count);
        };
        let ours = xdp(ebpf, program_names::UPLINK_XDP)?
            .info()
            .map_err(|source| DatapathError::Program {
                program: program_names::UPLINK_XDP,
                source,
            })?
            .id();
        // A device that is gone is the device watch's to notice.
        if super::links::xdp_program(uplink.ifindex).is_ok_and(|now| now != Some(ours)) {
            warn!(interface = %uplink.interface, "uplink XDP dispatcher detached behind the agent's back; attaching again");
            let pin = uplink.xdp.pin_path().cloned();
            let dispatcher = xdp(ebpf, program_names::UPLINK_XDP)?;
            let attached = attach::xdp(dispatcher, &uplink.interface, uplink.generic, pin);
            count += replace_link(&mut uplink.xdp, attached, &uplink.interface);
        }
        let dispatcher = classifier(ebpf, program_names::UPLINK_INGRESS)?;
        if let Ok(false) = attach::tc_attached(dispatcher, &uplink.interface, TcAttachType::Ingress)
        {
            warn!(interface = %uplink.interface, "uplink dispatcher detached behind the agent's back; attaching again");
            let pin = uplink.ingress.pin_path().cloned();
            let attached = attach::tc(dispatcher, &uplink.interface, TcAttachType::Ingress, pin);
            count += replace_link(&mut uplink.ingress, attached, &uplink.interface);
        }
        Ok(count)
    }

    /// Pins again every map whose pin was removed; how many. (A link whose pin goes is
    /// detached with it, and attached again by [`Self::reattach_detached`].)
    fn repin_removed(&mut self) -> Result<u64, DatapathError> {
        let mut repinned = 0;
        for (path, map) in &self.pinned_maps {
            if !path.exists() {
                warn!(pin = %path.display(), "map pin removed behind the agent's back; pinning again");
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                map.pin(path).map_err(|source| DatapathError::Pin {
                    path: path.clone(),
                    source,
                })?;
                repinned += 1;
            }
        }
        Ok(repinned)
    }

    /// The maps the agent writes: (name, entries, room for how many), the entries as
    /// last programmed into the active set.
    pub fn map_fill(&self) -> Result<Vec<(&'static str, u64, u64)>, DatapathError> {
        fn room<K: aya::Pod, V>(
            map: &impl IterableMap<K, V>,
            name: &'static str,
        ) -> Result<u64, DatapathError> {
            Ok(u64::from(
                map.map().info().map_err(map_err(name))?.max_entries(),
            ))
        }
        let set = &self.sets[self.active as usize];
        let empty = DatapathTables::default();
        let (m, t) = (&set.maps, set.programmed.as_deref().unwrap_or(&empty));
        macro_rules! fill {
            ($field:ident, $name:ident, split($host:ident, $host_name:ident, $bits:ident)) => {{
                let (host, rest) = tables::split_len(&t.$field, $bits);
                vec![
                    (map_names::$name, rest, room(&m.$field, map_names::$name)?),
                    (
                        map_names::$host_name,
                        host,
                        room(&m.$host, map_names::$host_name)?,
                    ),
                ]
            }};
            ($field:ident, $name:ident, $kind:ident) => {
                vec![(
                    map_names::$name,
                    t.$field.len() as u64,
                    room(&m.$field, map_names::$name)?,
                )]
            };
        }
        Ok(written_maps!(fill).into_iter().flatten().collect())
    }

    /// How many SNAT bindings there are, and room for how many.
    pub fn snat_fill(&self) -> Result<(u64, u64), DatapathError> {
        let capacity = self
            .state
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
        for item in self.state.snat4_in.iter() {
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
        self.state
            .verdict
            .set(0, per_cpu(Verdict::default(), map_names::VERDICT)?, 0)
            .map_err(&verdict_err)?;

        let xdp_program = matches!(
            self.sets[0].ebpf.program(program),
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
            run_loaded!(xdp(&mut self.sets[0].ebpf, program)?)
        } else {
            run_loaded!(classifier(&mut self.sets[0].ebpf, program)?)
        }
        .map_err(|source| DatapathError::Program { program, source })?;

        let verdict = self
            .state
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
        summed(&self.state.port_stats, slot)
    }

    /// Packets and bytes the rule in `slot` allowed, summed over CPUs.
    pub fn rule_counters(&self, slot: u32) -> Result<RuleStats, DatapathError> {
        let per_cpu = self
            .state
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
            (&self.state.ct, true, map_names::CT),
            (&self.state.ct_new, false, map_names::CT_NEW),
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
                (&mut self.state.ct, map_names::CT)
            } else {
                (&mut self.state.ct_new, map_names::CT_NEW)
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
                .state
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
                .state
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

/// A drift check's attachment of a dispatcher again: `link` replaced by the new one;
/// 1 if it was. A device that fails is left for the next check, without holding up
/// the others.
fn replace_link(link: &mut Link, attached: Result<Link, DatapathError>, interface: &str) -> u64 {
    match attached {
        Ok(new) => {
            *link = new;
            1
        }
        Err(error) => {
            warn!(interface, %error, "could not attach again; trying at the next check");
            0
        }
    }
}

/// A second typed handle on `map` (its fd duplicated).
fn reopen<T>(map: &MapData, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let fd = map.fd().as_fd().try_clone_to_owned().map_err(|io_error| {
        map_err(name)(MapError::SyscallError(SyscallError {
            call: "dup",
            io_error,
        }))
    })?;
    let data = MapData::from_fd(fd).map_err(map_err(name))?;
    T::try_from(aya::maps::Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
}

/// Takes a map out of the object as its typed handle.
fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
}

fn map_err_named(name: &str) -> impl Fn(MapError) -> DatapathError + '_ {
    move |source| DatapathError::Map {
        map: STATE_MAPS
            .iter()
            .chain(SET_MAPS.iter())
            .find(|known| **known == name)
            .copied()
            .unwrap_or("?"),
        source,
    }
}

/// A handle of its own on every map pinned under `pins`, to pin it again.
fn pinned_map_handles(
    pins: &PinLayout,
    shapes: &BTreeMap<String, MapShape>,
) -> Result<Vec<(PathBuf, MapData)>, DatapathError> {
    let state = STATE_MAPS.iter().map(|name| pins.state_dir().join(name));
    let sets = (0..map_set::COUNT).flat_map(|set| {
        SET_MAPS
            .iter()
            .map(move |name| pins.set_dir(set).join(name))
    });
    let mut handles = Vec::new();
    for path in state.chain(sets) {
        let known = path
            .file_name()
            .is_some_and(|name| shapes.contains_key(&*name.to_string_lossy()));
        if !known {
            continue;
        }
        let map = MapData::from_pin(&path).map_err(|source| DatapathError::Map {
            map: "pinned",
            source,
        })?;
        handles.push((path, map));
    }
    Ok(handles)
}

impl StateMaps {
    /// Copies what the replaced map pinned at `old` holds into the new `name`, as much
    /// as fits: connections and counters survive a change of size.
    fn migrate(&mut self, name: &str, old: &Path) -> Result<u64, DatapathError> {
        let old =
            aya::maps::Map::from_map_data(MapData::from_pin(old).map_err(map_err_named(name))?)
                .map_err(map_err_named(name))?;
        match name {
            map_names::CT => copy_hash(&mut self.ct, old, map_names::CT),
            map_names::CT_NEW => copy_hash(&mut self.ct_new, old, map_names::CT_NEW),
            map_names::PORT_STATS => copy_per_cpu(&mut self.port_stats, old, map_names::PORT_STATS),
            map_names::RULE_STATS => copy_per_cpu(&mut self.rule_stats, old, map_names::RULE_STATS),
            _ => Ok(0),
        }
    }
}

fn copy_hash<K: aya::Pod, V: aya::Pod>(
    new: &mut HashMap<MapData, K, V>,
    old: aya::maps::Map,
    name: &'static str,
) -> Result<u64, DatapathError> {
    let old: HashMap<MapData, K, V> = HashMap::try_from(old).map_err(map_err(name))?;
    let mut copied = 0;
    for (key, value) in old.iter().filter_map(Result::ok) {
        if new.insert(key, value, 0).is_err() {
            break;
        }
        copied += 1;
    }
    Ok(copied)
}

fn copy_per_cpu<V: aya::Pod>(
    new: &mut PerCpuArray<MapData, V>,
    old: aya::maps::Map,
    name: &'static str,
) -> Result<u64, DatapathError> {
    let old: PerCpuArray<MapData, V> = PerCpuArray::try_from(old).map_err(map_err(name))?;
    let len = old.len().min(new.len());
    for index in 0..len {
        let values = old.get(&index, 0).map_err(map_err(name))?;
        new.set(index, values, 0).map_err(map_err(name))?;
    }
    Ok(u64::from(len))
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
