//! Running frames through the port programs with BPF_PROG_TEST_RUN.
//!
//! [`Harness::load`] loads the agent's embedded object with `TRACE_VERDICT = 1`, so
//! every run leaves its [`Verdict`] in the `VERDICT` map, and loads (does not attach)
//! the classifiers. Tests fill the maps with ABI types, run frames and read back the
//! return code, the verdict, the `skb->mark` the program left, and the counters.
//!
//! Security groups are filled by hand as the agent compiles them (see
//! `dataplane_abi::policy`): [`Harness::add_remote`] maps a remote prefix to an address
//! class, [`Harness::add_rule`] what a class allows ([`RuleMatch`], port ranges split
//! into aligned blocks by [`port_blocks`]). Conntrack tables can be read and written
//! ([`Harness::ct_entries`], [`Harness::ct_insert`], [`ct_key`]).
//!
//! The kernel resolves `__sk_buff.ifindex` and `bpf_clone_redirect` targets in the
//! network namespace of the thread that calls BPF_PROG_TEST_RUN: call [`Harness::run`]
//! and friends from [`crate::netns::NetNs::run`] when frames name real devices.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, MapData, MapError, PerCpuArray, PerCpuValues,
    },
    programs::{tc::TcAttachType, SchedClassifier, TestRun, TestRunOptions},
    util::nr_cpus,
    Ebpf, EbpfLoader, Pod,
};
use dataplane_abi::{
    ct_stat, global_names, map_names, program_names, verdict_action, CtEntry, CtKey, DropReason,
    FdbEntry, FdbKey, FloodEntry, FloodSet, PortAddr4, PortAddr6, PortInfo, PortMacKey, PortStats,
    RemoteKey4, RemoteKey6, RuleKey, RuleStats, Verdict, MAX_FLOOD_PORTS, PORT_ADDR_FIXED_BITS,
    REMOTE4_FULL_BITS, REMOTE6_FULL_BITS, REMOTE_FIXED_BITS, RULE_CLASS_BITS, RULE_LOOKUP_BITS,
    RULE_PROTOCOL_BITS,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::frames::Mac;

/// `TC_ACT_*` return codes.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// `sizeof(struct __sk_buff)` and the offsets of the fields a test run may set.
const SKB_CTX_LEN: usize = 192;
const SKB_MARK: usize = 8;
const SKB_IFINDEX: usize = 40;

/// Size of every resizable map in a harness: ample for tests, and fast to create.
pub const TEST_MAX_ENTRIES: u32 = 1024;

/// Map sizes a harness loads with: [`TEST_MAX_ENTRIES`] unless a test needs a table
/// small enough to fill (conntrack full, LRU churn).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// `CT`.
    pub ct: u32,
    /// `CT_NEW`.
    pub ct_new: u32,
    /// `SG_REMOTE4`, `SG_REMOTE6`, `SG_RULES`, their host maps, and `RULE_STATS`.
    pub policy: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            ct: TEST_MAX_ENTRIES,
            ct_new: TEST_MAX_ENTRIES,
            policy: TEST_MAX_ENTRIES,
        }
    }
}

/// What a security-group rule allows, as trie entries of `SG_RULES` (the agent's
/// compilation, written again for tests that fill the maps by hand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleMatch {
    /// Any protocol.
    Any,
    /// Any port of one protocol (ICMP: any type).
    Protocol(u8),
    /// Destination ports `min..=max` of a protocol with ports.
    Ports { protocol: u8, min: u16, max: u16 },
    /// One ICMP (protocol 1) or ICMPv6 (58) type, any code.
    IcmpType { protocol: u8, kind: u8 },
    /// One ICMP type and code.
    IcmpCode { protocol: u8, kind: u8, code: u8 },
}

impl RuleMatch {
    /// The (prefix length, key) entries of the rule for address class `class`.
    pub fn entries(self, class: u32) -> Vec<(u32, RuleKey)> {
        let key = |protocol: u8, port: [u8; 2]| RuleKey {
            class,
            protocol,
            port,
            _pad: 0,
        };
        match self {
            RuleMatch::Any => vec![(RULE_CLASS_BITS, key(0, [0; 2]))],
            RuleMatch::Protocol(p) => vec![(RULE_PROTOCOL_BITS, key(p, [0; 2]))],
            RuleMatch::Ports { protocol, min, max } => port_blocks(min, max)
                .into_iter()
                .map(|(start, bits)| {
                    (
                        RULE_PROTOCOL_BITS + bits,
                        key(protocol, start.to_be_bytes()),
                    )
                })
                .collect(),
            RuleMatch::IcmpType { protocol, kind } => {
                vec![(RULE_PROTOCOL_BITS + 8, key(protocol, [kind, 0]))]
            }
            RuleMatch::IcmpCode {
                protocol,
                kind,
                code,
            } => vec![(RULE_PROTOCOL_BITS + 16, key(protocol, [kind, code]))],
        }
    }
}

/// `min..=max` as aligned power-of-two blocks: (first port, prefix bits of the port).
pub fn port_blocks(min: u16, max: u16) -> Vec<(u16, u32)> {
    let mut blocks = Vec::new();
    let (mut start, end) = (u32::from(min), u32::from(max));
    while start <= end {
        // The largest block aligned at `start` that does not pass `end`.
        let mut size = if start == 0 {
            1 << 16
        } else {
            start & start.wrapping_neg()
        };
        while start + size - 1 > end {
            size /= 2;
        }
        blocks.push((start as u16, 16 - size.trailing_zeros()));
        start += size;
    }
    blocks
}

/// The canonical `CtKey` of a packet from `src:sport` to `dst:dport` in `zone`, and
/// whether `src` is its `lo` endpoint (as `dataplane_abi::conntrack` defines it).
pub fn ct_key(
    zone: u32,
    protocol: u8,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
) -> (CtKey, bool) {
    let bytes = |a: IpAddr| match a {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    };
    let family = if src.is_ipv4() { 4 } else { 6 };
    let a = (bytes(src), sport);
    let b = (bytes(dst), dport);
    let from_lo = a <= b;
    let (lo, hi) = if from_lo { (a, b) } else { (b, a) };
    let key = CtKey {
        zone,
        addr_lo: lo.0,
        addr_hi: hi.0,
        port_lo: lo.1,
        port_hi: hi.1,
        family,
        protocol,
        _pad: [0; 2],
    };
    (key, from_lo)
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_coarse_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Which conntrack table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtTable {
    /// `CT`: confirmed connections.
    Confirmed,
    /// `CT_NEW`: connections waiting for a reply.
    New,
}

impl CtTable {
    fn map_name(self) -> &'static str {
        match self {
            CtTable::Confirmed => map_names::CT,
            CtTable::New => map_names::CT_NEW,
        }
    }
}

/// What one run of a program did.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// The program's return code (`TC_ACT_*`).
    pub ret: i32,
    /// The verdict the run traced.
    pub verdict: Verdict,
    /// `skb->mark` after the run.
    pub mark: u32,
}

impl Outcome {
    /// The drop reason, if the frame was dropped.
    pub fn drop_reason(&self) -> Option<DropReason> {
        (self.verdict.action == verdict_action::DROP)
            .then(|| DropReason::from_u32(self.verdict.reason))
            .flatten()
    }

    /// The ifindexes the frame went to, for a unicast or flood verdict.
    pub fn targets(&self) -> &[u32] {
        match self.verdict.action {
            verdict_action::UNICAST | verdict_action::FLOOD => {
                &self.verdict.ifindexes[..(self.verdict.count as usize).min(MAX_FLOOD_PORTS)]
            }
            _ => &[],
        }
    }
}

/// A loaded object with its port programs, ready for test runs.
pub struct Harness {
    ebpf: Ebpf,
}

impl Harness {
    /// Loads `dataplane_agent::kernel::BPF_OBJECT` with verdict tracing on and maps of
    /// [`TEST_MAX_ENTRIES`], and the port programs.
    pub fn load() -> Result<Harness> {
        Harness::load_with_trace(true)
    }

    /// As [`Harness::load`]; `trace: false` loads the programs as production does
    /// (verdicts are then not written): for measurements.
    pub fn load_with_trace(trace: bool) -> Result<Harness> {
        Harness::load_sized(trace, Sizes::default())
    }

    /// As [`Harness::load_with_trace`], with the conntrack tables of `sizes`.
    pub fn load_sized(trace: bool, sizes: Sizes) -> Result<Harness> {
        let trace = u32::from(trace);
        let mut loader = EbpfLoader::new();
        loader.override_global(global_names::TRACE_VERDICT, &trace, true);
        for name in [
            map_names::PORTS,
            map_names::PORT_MACS,
            map_names::PORT_IP4,
            map_names::PORT_NET4,
            map_names::PORT_IP6,
            map_names::PORT_NET6,
            map_names::FDB,
            map_names::FLOOD,
            map_names::PORT_STATS,
        ] {
            loader.map_max_entries(name, TEST_MAX_ENTRIES);
        }
        for name in [
            map_names::SG_REMOTE4,
            map_names::SG_REMOTE6,
            map_names::SG_RULES,
            map_names::SG_HOST4,
            map_names::SG_HOST6,
            map_names::SG_RULE_PORTS,
            map_names::RULE_STATS,
        ] {
            loader.map_max_entries(name, sizes.policy);
        }
        loader.map_max_entries(map_names::CT, sizes.ct);
        loader.map_max_entries(map_names::CT_NEW, sizes.ct_new);
        let ebpf = loader
            .load(dataplane_agent::kernel::BPF_OBJECT)
            .context("loading the BPF object")?;
        Harness::from_ebpf(ebpf)
    }

    /// Wraps an object loaded some other way (it must have `TRACE_VERDICT = 1` for
    /// verdicts to mean anything) and loads its port programs.
    pub fn from_ebpf(mut ebpf: Ebpf) -> Result<Harness> {
        // `{:#}` of the error shows the verifier log.
        dataplane_agent::kernel::datapath::ready_lone_copy(&mut ebpf)
            .map_err(|e| anyhow::anyhow!("loading the programs: {e:#}"))?;
        let noop: &mut SchedClassifier = ebpf
            .program_mut(program_names::NOOP_TC)
            .context("no noop program")?
            .try_into()?;
        noop.load()
            .map_err(|e| anyhow::anyhow!("loading {}: {e:#}", program_names::NOOP_TC))?;
        Ok(Harness { ebpf })
    }

    /// Attaches the classifier `program` to `iface` (tcx where the kernel has it), for
    /// tests that send real frames. Call from the namespace of `iface`; the link goes
    /// with the harness.
    pub fn attach(&mut self, program: &str, iface: &str, attach_type: TcAttachType) -> Result<()> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .with_context(|| format!("no program {program}"))?
            .try_into()?;
        prog.attach(iface, attach_type)
            .with_context(|| format!("attaching {program} to {iface}"))?;
        Ok(())
    }

    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// One of the loaded classifiers.
    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?)
    }

    // ---- maps ---------------------------------------------------------------------

    fn hash<K: Pod, V: Pod>(&mut self, name: &str) -> Result<HashMap<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))?;
        Ok(HashMap::try_from(map)?)
    }

    fn trie<K: Pod, V: Pod>(&mut self, name: &str) -> Result<LpmTrie<&mut MapData, K, V>> {
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("no map {name}"))?;
        Ok(LpmTrie::try_from(map)?)
    }

    /// `ACTIVE_SET[0] = set`: the map set whose stages the dispatchers hand frames to (a
    /// lone copy has set 0's only).
    pub fn set_active_set(&mut self, set: u32) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(map_names::ACTIVE_SET)
            .context("no ACTIVE_SET")?;
        aya::maps::Array::<&mut MapData, u32>::try_from(map)?.set(0, set, 0)?;
        Ok(())
    }

    /// `PORTS[ifindex] = port`.
    pub fn add_port(&mut self, ifindex: u32, port: PortInfo) -> Result<()> {
        self.hash::<u32, PortInfo>(map_names::PORTS)?
            .insert(ifindex, port, 0)?;
        Ok(())
    }

    /// Lets port `slot` send from `mac` (an allowed address pair's MAC).
    pub fn allow_mac(&mut self, slot: u32, mac: Mac) -> Result<()> {
        let key = PortMacKey {
            port_slot: slot,
            mac,
            _pad: [0; 2],
        };
        self.hash::<PortMacKey, u32>(map_names::PORT_MACS)?
            .insert(key, 1, 0)?;
        Ok(())
    }

    /// `PORT_IP4`: port `slot` may send from `mac` with source `addr`.
    pub fn allow_ip4(&mut self, slot: u32, mac: Mac, addr: Ipv4Addr) -> Result<()> {
        let key = PortAddr4 {
            port_slot: slot,
            mac,
            _pad: [0; 2],
            addr: addr.octets(),
        };
        self.hash::<PortAddr4, u32>(map_names::PORT_IP4)?
            .insert(key, 1, 0)?;
        Ok(())
    }

    /// `PORT_NET4`: port `slot` may send from `mac` with any source in `net`. The port
    /// also needs `HAS_NET4` in its flags.
    pub fn allow_net4(&mut self, slot: u32, mac: Mac, net: Ipv4Net) -> Result<()> {
        let data = PortAddr4 {
            port_slot: slot,
            mac,
            _pad: [0; 2],
            addr: net.network().octets(),
        };
        let key = Key::new(PORT_ADDR_FIXED_BITS + u32::from(net.prefix_len()), data);
        self.trie::<PortAddr4, u32>(map_names::PORT_NET4)?
            .insert(&key, 1, 0)?;
        Ok(())
    }

    /// `PORT_IP6`: port `slot` may send from `mac` with source `addr`.
    pub fn allow_ip6(&mut self, slot: u32, mac: Mac, addr: Ipv6Addr) -> Result<()> {
        let key = PortAddr6 {
            port_slot: slot,
            mac,
            _pad: [0; 2],
            addr: addr.octets(),
        };
        self.hash::<PortAddr6, u32>(map_names::PORT_IP6)?
            .insert(key, 1, 0)?;
        Ok(())
    }

    /// `PORT_NET6`: as [`Harness::allow_net4`]; the port needs `HAS_NET6`.
    pub fn allow_net6(&mut self, slot: u32, mac: Mac, net: Ipv6Net) -> Result<()> {
        let data = PortAddr6 {
            port_slot: slot,
            mac,
            _pad: [0; 2],
            addr: net.network().octets(),
        };
        let key = Key::new(PORT_ADDR_FIXED_BITS + u32::from(net.prefix_len()), data);
        self.trie::<PortAddr6, u32>(map_names::PORT_NET6)?
            .insert(&key, 1, 0)?;
        Ok(())
    }

    /// `FDB[network, mac] = entry`.
    pub fn add_fdb(&mut self, network: u32, mac: Mac, entry: FdbEntry) -> Result<()> {
        let key = FdbKey {
            network_slot: network,
            mac,
            _pad: [0; 2],
        };
        self.hash::<FdbKey, FdbEntry>(map_names::FDB)?
            .insert(key, entry, 0)?;
        Ok(())
    }

    /// `FLOOD[network]` = `ports`.
    pub fn set_flood(&mut self, network: u32, ports: &[FloodEntry]) -> Result<()> {
        ensure!(
            ports.len() <= MAX_FLOOD_PORTS,
            "more than {MAX_FLOOD_PORTS} flood ports"
        );
        let mut set = FloodSet {
            count: ports.len() as u32,
            ..FloodSet::default()
        };
        set.ports[..ports.len()].copy_from_slice(ports);
        self.hash::<u32, FloodSet>(map_names::FLOOD)?
            .insert(network, set, 0)?;
        Ok(())
    }

    /// `PORT_STATS[slot]`, summed over CPUs.
    pub fn port_stats(&self, slot: u32) -> Result<PortStats> {
        let values = self.per_cpu::<PortStats>(map_names::PORT_STATS, slot)?;
        let mut sum = PortStats::default();
        for v in values.iter() {
            sum.rx_packets += v.rx_packets;
            sum.rx_bytes += v.rx_bytes;
            sum.tx_packets += v.tx_packets;
            sum.tx_bytes += v.tx_bytes;
            for (s, d) in sum.drops.iter_mut().zip(v.drops) {
                *s += d;
            }
        }
        Ok(sum)
    }

    // ---- security groups ----------------------------------------------------------

    /// `SG_REMOTE4`/`SG_REMOTE6`: in `policy_id`'s `direction` (`sg_direction`), remote
    /// addresses in `net` are of address class `class` (unless a longer prefix says
    /// otherwise). A single address goes into the host map, as the agent writes it.
    pub fn add_remote(
        &mut self,
        policy_id: u32,
        direction: u8,
        net: IpNet,
        class: u32,
    ) -> Result<()> {
        let bits = REMOTE_FIXED_BITS + u32::from(net.prefix_len());
        match net {
            IpNet::V4(net) => {
                let data = RemoteKey4 {
                    policy_id,
                    direction,
                    _pad: [0; 3],
                    addr: net.network().octets(),
                };
                if bits == REMOTE4_FULL_BITS {
                    self.hash::<RemoteKey4, u32>(map_names::SG_HOST4)?
                        .insert(data, class, 0)?;
                } else {
                    self.trie::<RemoteKey4, u32>(map_names::SG_REMOTE4)?
                        .insert(&Key::new(bits, data), class, 0)?;
                }
            }
            IpNet::V6(net) => {
                let data = RemoteKey6 {
                    policy_id,
                    direction,
                    _pad: [0; 3],
                    addr: net.network().octets(),
                };
                if bits == REMOTE6_FULL_BITS {
                    self.hash::<RemoteKey6, u32>(map_names::SG_HOST6)?
                        .insert(data, class, 0)?;
                } else {
                    self.trie::<RemoteKey6, u32>(map_names::SG_REMOTE6)?
                        .insert(&Key::new(bits, data), class, 0)?;
                }
            }
        }
        Ok(())
    }

    /// `SG_RULES`: address class `class` allows `m`, charged to rule `slot` (a single
    /// port in `SG_RULE_PORTS`, as the agent writes it).
    pub fn add_rule(&mut self, class: u32, m: RuleMatch, slot: u32) -> Result<()> {
        for (bits, key) in m.entries(class) {
            if bits == RULE_LOOKUP_BITS {
                self.hash::<RuleKey, u32>(map_names::SG_RULE_PORTS)?
                    .insert(key, slot, 0)?;
            } else {
                self.trie::<RuleKey, u32>(map_names::SG_RULES)?.insert(
                    &Key::new(bits, key),
                    slot,
                    0,
                )?;
            }
        }
        Ok(())
    }

    /// Takes `m` out of what `class` allows.
    pub fn remove_rule(&mut self, class: u32, m: RuleMatch) -> Result<()> {
        for (bits, key) in m.entries(class) {
            if bits == RULE_LOOKUP_BITS {
                self.hash::<RuleKey, u32>(map_names::SG_RULE_PORTS)?
                    .remove(&key)?;
            } else {
                self.trie::<RuleKey, u32>(map_names::SG_RULES)?
                    .remove(&Key::new(bits, key))?;
            }
        }
        Ok(())
    }

    /// `RULE_STATS[slot]`, summed over CPUs.
    pub fn rule_stats(&self, slot: u32) -> Result<RuleStats> {
        let values = self.per_cpu::<RuleStats>(map_names::RULE_STATS, slot)?;
        Ok(values
            .iter()
            .fold(RuleStats::default(), |sum, v| RuleStats {
                packets: sum.packets + v.packets,
                bytes: sum.bytes + v.bytes,
            }))
    }

    /// `CT_STATS`, summed over CPUs, by `ct_stat` index.
    pub fn ct_stats(&self) -> Result<[u64; ct_stat::COUNT as usize]> {
        let mut stats = [0; ct_stat::COUNT as usize];
        for (i, s) in stats.iter_mut().enumerate() {
            *s = self
                .per_cpu::<u64>(map_names::CT_STATS, i as u32)?
                .iter()
                .sum();
        }
        Ok(stats)
    }

    /// Every entry of a conntrack table.
    pub fn ct_entries(&self, table: CtTable) -> Result<Vec<(CtKey, CtEntry)>> {
        let name = table.map_name();
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("no map {name}"))?;
        let map = HashMap::<_, CtKey, CtEntry>::try_from(map)?;
        Ok(map.iter().collect::<Result<Vec<_>, MapError>>()?)
    }

    /// The entry of `key` and the table it is in.
    pub fn ct_get(&self, key: &CtKey) -> Result<Option<(CtTable, CtEntry)>> {
        for table in [CtTable::Confirmed, CtTable::New] {
            let name = table.map_name();
            let map = self
                .ebpf
                .map(name)
                .with_context(|| format!("no map {name}"))?;
            match HashMap::<_, CtKey, CtEntry>::try_from(map)?.get(key, 0) {
                Ok(entry) => return Ok(Some((table, entry))),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Writes an entry, as a connection from before a restart, or one aged by hand.
    pub fn ct_insert(&mut self, table: CtTable, key: CtKey, entry: CtEntry) -> Result<()> {
        self.hash::<CtKey, CtEntry>(table.map_name())?
            .insert(key, entry, 0)?;
        Ok(())
    }

    /// Empties a conntrack table (as a flush does).
    pub fn ct_flush(&mut self, table: CtTable) -> Result<()> {
        let keys: Vec<CtKey> = self
            .ct_entries(table)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut map = self.hash::<CtKey, CtEntry>(table.map_name())?;
        for key in keys {
            map.remove(&key)?;
        }
        Ok(())
    }

    /// `NOPORT_DROPS[reason]`, summed over CPUs.
    pub fn noport_drops(&self, reason: DropReason) -> Result<u64> {
        let values = self.per_cpu::<u64>(map_names::NOPORT_DROPS, reason as u32)?;
        Ok(values.iter().sum())
    }

    fn per_cpu<T: Pod>(&self, name: &str, index: u32) -> Result<PerCpuValues<T>> {
        let map = self
            .ebpf
            .map(name)
            .with_context(|| format!("no map {name}"))?;
        Ok(PerCpuArray::<_, T>::try_from(map)?.get(&index, 0)?)
    }

    // ---- runs ---------------------------------------------------------------------

    /// Runs `frame` through `port_ingress` as received on device `ifindex`.
    pub fn ingress(&mut self, ifindex: u32, frame: &[u8]) -> Result<Outcome> {
        self.run(program_names::PORT_INGRESS, ifindex, 0, frame)
    }

    /// Runs `frame` through `port_egress` as sent to device `ifindex` with `mark`.
    pub fn egress(&mut self, ifindex: u32, mark: u32, frame: &[u8]) -> Result<Outcome> {
        self.run(program_names::PORT_EGRESS, ifindex, mark, frame)
    }

    /// Runs `frame` once through the classifier `program` with a `__sk_buff` whose
    /// `ifindex` and `mark` are set. The verdict is cleared before the run, so a
    /// program that traces nothing leaves `action == 0`.
    pub fn run(&mut self, program: &str, ifindex: u32, mark: u32, frame: &[u8]) -> Result<Outcome> {
        self.clear_verdict()?;
        let mut ctx_in = [0u8; SKB_CTX_LEN];
        ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
        ctx_in[SKB_IFINDEX..SKB_IFINDEX + 4].copy_from_slice(&ifindex.to_ne_bytes());
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let result = self
            .program(program)?
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ctx_in: Some(&ctx_in),
                ctx_out: Some(&mut ctx_out),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program} on ifindex {ifindex}"))?;
        let mark = u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into()?);
        Ok(Outcome {
            ret: result.return_value as i32,
            verdict: self.verdict()?,
            mark,
        })
    }

    fn clear_verdict(&mut self) -> Result<()> {
        let cpus = nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let map = self
            .ebpf
            .map_mut(map_names::VERDICT)
            .context("no VERDICT map")?;
        let mut verdicts = PerCpuArray::<_, Verdict>::try_from(map)?;
        verdicts.set(
            0,
            PerCpuValues::try_from(vec![Verdict::default(); cpus])?,
            0,
        )?;
        Ok(())
    }

    /// The verdict of the last run: the CPU it ran on is the one that wrote one.
    fn verdict(&self) -> Result<Verdict> {
        let values = self.per_cpu::<Verdict>(map_names::VERDICT, 0)?;
        let mut written = values.iter().filter(|v| v.action != 0);
        let verdict = written.next().copied().unwrap_or_default();
        if written.next().is_some() {
            bail!("more than one CPU wrote a verdict");
        }
        Ok(verdict)
    }
}

/// The agent's datapath (`Datapath`, tables written by its kernel layer), loaded for
/// tests that run frames through it: verdicts traced, room for 64 ports and
/// `conntrack_entries` connections.
pub fn traced_datapath(
    conntrack_entries: u32,
) -> Result<dataplane_agent::kernel::datapath::Datapath> {
    use dataplane_agent::kernel::datapath::{Datapath, LoadOptions, MapLimits};
    Ok(Datapath::load(
        MapLimits::for_node(64, conntrack_entries),
        &LoadOptions {
            pin_root: None,
            trace_verdicts: true,
        },
    )?)
}

/// `XDP_*` return codes.
pub const XDP_DROP: i32 = 1;
pub const XDP_PASS: i32 = 2;
pub const XDP_TX: i32 = 3;

/// What became of a frame arriving on the uplink: `uplink_xdp` sent it back or dropped
/// it (with the drop reasons it counted), or passed it on to `uplink_ingress`.
pub enum UplinkArrival {
    Tx(Vec<u8>),
    Dropped(Vec<DropReason>),
    Passed(Box<dataplane_agent::kernel::datapath::TestRunOutcome>),
}

/// Runs `frame` through `uplink_xdp` on device `ifindex`, and through `uplink_ingress`
/// if it passed (unchanged, which is checked).
pub fn arrive_on_uplink(
    datapath: &mut dataplane_agent::kernel::datapath::Datapath,
    ifindex: u32,
    frame: &[u8],
) -> Result<UplinkArrival> {
    let before = datapath.uplink_counters()?.drops;
    let run = datapath.test_run(program_names::UPLINK_XDP, ifindex, 0, frame, 1)?;
    match run.return_code {
        XDP_TX => Ok(UplinkArrival::Tx(run.frame)),
        XDP_DROP => {
            let after = datapath.uplink_counters()?.drops;
            let counted = after
                .iter()
                .filter(|(r, n)| before.iter().find(|(b, _)| b == r).map_or(0, |(_, m)| *m) < *n)
                .map(|(r, _)| *r)
                .collect();
            Ok(UplinkArrival::Dropped(counted))
        }
        XDP_PASS => {
            ensure!(run.frame == frame, "uplink_xdp passed a changed frame");
            Ok(UplinkArrival::Passed(Box::new(datapath.test_run(
                program_names::UPLINK_INGRESS,
                ifindex,
                0,
                frame,
                1,
            )?)))
        }
        other => bail!("uplink_xdp returned {other}"),
    }
}
